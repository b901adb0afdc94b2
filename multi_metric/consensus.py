# Copyright 2026 The BalancedDPO authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Per-metric pairwise probabilities, the consensus label of a pair and temperature fitting (docs/method.md §3-4).

Scores in, labels out: nothing here loads a model, so this module imports only torch and numpy.
"""

import dataclasses
import math
from typing import Dict, List, Optional

import numpy as np
import torch


# ImageReward's released score normalisation; its standard deviation also sets that metric's native temperature.
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
# Native Bradley-Terry scale of each built-in metric (docs/method.md §3). The `hpsv2` scorer reads its value from the
# checkpoint's logit scale (about 0.01 for the released ones); 0.01 is only the fallback when no scorer is built.
DEFAULT_TEMPERATURES = {
    "pickscore": 1.0,
    "hpsv2": 0.01,
    "clip": 1.0,
    "aesthetic": 0.25,
    "imagereward": 1.0 / IMAGEREWARD_STD,
}

# `single:<metric>` stands for any one scored metric, e.g. `single:pickscore`.
CONSENSUS_MODES = [
    "majority",
    "mean_prob",
    "human",
    "single:<metric>",
    "reward_sum",
    "normalized_sum",
    "random_metric",
]
TIE_POLICIES = ["mean_prob", "human", "drop"]
# Why the consensus drops a pair (ConsensusResult.drop_reasons).
DROP_REASONS = ("human_tie", "no_vote", "tie", "min_agreement")


# ----------------------------------------------------------------------------------------------------------------
# Pairwise probabilities and consensus
# ----------------------------------------------------------------------------------------------------------------


def _centered_prob(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(x) - 0.5, computed so that it is exactly odd in x (swapping a pair negates it bit for bit)."""
    return torch.sign(x) * (0.5 * torch.tanh(x.abs() * 0.5))


def _as_float64(values) -> torch.Tensor:
    return torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1)


def _check_score_dicts(scores_0: dict, scores_1: dict) -> List[str]:
    if not scores_0:
        raise ValueError("No scores given.")
    if set(scores_0) != set(scores_1):
        raise ValueError(f"scores_0 and scores_1 have different metrics: {sorted(scores_0)} vs {sorted(scores_1)}.")
    names = sorted(scores_0)
    sizes = {len(_as_float64(scores_0[m])) for m in names} | {len(_as_float64(scores_1[m])) for m in names}
    if len(sizes) != 1:
        raise ValueError("All score tensors must have the same length.")
    return names


def _temperature(temperatures: Optional[dict], name: str) -> float:
    value = (temperatures or {}).get(name, DEFAULT_TEMPERATURES.get(name, 1.0))
    value = float(value)
    if not value > 0:
        raise ValueError(f"Temperature of '{name}' must be > 0, got {value}.")
    return value


def pairwise_probabilities(
    scores_0: dict, scores_1: dict, temperatures: Optional[dict] = None
) -> Dict[str, torch.Tensor]:
    """`p_m = sigmoid((s0 - s1) / tau_m)`: probability that image 0 is preferred, per metric (float32 tensors).

    Temperatures default to each metric's native scale (DEFAULT_TEMPERATURES; 1.0 for unknown metrics)."""
    names = _check_score_dicts(scores_0, scores_1)
    probs = {}
    for m in names:
        x = (_as_float64(scores_0[m]) - _as_float64(scores_1[m])) / _temperature(temperatures, m)
        probs[m] = (0.5 + _centered_prob(x)).float()
    return probs


@dataclasses.dataclass
class ConsensusResult:
    """Per-pair consensus.

    label: 1.0 = image 0 preferred, 0.0 = image 1 preferred, 0.5 = unresolved tie (always dropped).
    prob: soft probability that image 0 is preferred (the soft DPO target).
    agreement: weighted share of the non-abstaining voters that vote for the label's image (for unresolved ties:
        the larger side's share; 0 when no voter votes).
    keep: False for dropped pairs (unresolved ties, human ties/unknowns in `human` mode, agreement < min_agreement).
    votes: voter name -> int8 tensor (+1 image 0, -1 image 1, 0 abstain); includes "human" when it votes.
    probs: metric name -> p_m.
    """

    label: torch.Tensor
    prob: torch.Tensor
    agreement: torch.Tensor
    keep: torch.Tensor
    votes: Dict[str, torch.Tensor]
    probs: Dict[str, torch.Tensor]
    mode: str = "majority"

    @property
    def num_kept(self) -> int:
        return int(self.keep.sum())

    def drop_reasons(self) -> Dict[str, int]:
        """Why the dropped pairs were dropped: {reason: count} over DROP_REASONS.

        `human_tie`: in `human` mode, the human label is a tie or unknown. `no_vote`: every voter abstained (identical
        images, or score differences within --abstain_margin). `tie`: the votes split evenly and the tie policy could
        not break the tie. `min_agreement`: a label was found but its agreement is below --min_agreement.
        """
        unresolved = self.label == 0.5
        if self.votes:
            voted = torch.stack([v.cpu() != 0 for v in self.votes.values()]).any(0)
        else:
            voted = torch.zeros_like(self.keep.cpu())
        unresolved, keep = unresolved.cpu(), self.keep.cpu()
        human = self.mode == "human"
        return {
            "human_tie": int(unresolved.sum()) if human else 0,
            "no_vote": 0 if human else int((unresolved & ~voted).sum()),
            "tie": 0 if human else int((unresolved & voted).sum()),
            "min_agreement": int((~unresolved & ~keep).sum()),
        }


class NormalizedSumState:
    """Running scale of each metric's score difference for `normalized_sum`.

    sigma_m is the root mean square of Delta_m over the first `warmup_pairs` pairs, then frozen. (Delta is
    antisymmetric in the pair order, so its mean is zero by symmetry; the RMS does not depend on which image is
    listed first.) Save it with the training checkpoint via state_dict()/load_state_dict().
    """

    def __init__(self, warmup_pairs: int = 2048):
        self.warmup_pairs = int(warmup_pairs)
        self.counts: Dict[str, int] = {}
        self.sum_squares: Dict[str, float] = {}

    def frozen(self, name: str) -> bool:
        return self.counts.get(name, 0) >= self.warmup_pairs

    def update(self, deltas: Dict[str, torch.Tensor]):
        for name, delta in deltas.items():
            if self.frozen(name):
                continue
            delta = _as_float64(delta)
            delta = delta[torch.isfinite(delta)]
            self.counts[name] = self.counts.get(name, 0) + int(delta.numel())
            self.sum_squares[name] = self.sum_squares.get(name, 0.0) + float((delta * delta).sum())

    def sigma(self, name: str) -> float:
        count = self.counts.get(name, 0)
        return math.sqrt(self.sum_squares[name] / count) if count else float("nan")

    def state_dict(self) -> dict:
        return {"warmup_pairs": self.warmup_pairs, "counts": dict(self.counts), "sum_squares": dict(self.sum_squares)}

    def load_state_dict(self, state: dict):
        self.warmup_pairs = int(state["warmup_pairs"])
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.sum_squares = {k: float(v) for k, v in state["sum_squares"].items()}


def _check_mode(mode: str, tie_policy: str, abstain_margin: float, min_agreement: float):
    if not (mode in CONSENSUS_MODES or (mode.startswith("single:") and len(mode) > len("single:"))):
        raise ValueError(f"Unknown consensus mode '{mode}'; choose one of {CONSENSUS_MODES}.")
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"Unknown tie_policy '{tie_policy}'; choose one of {TIE_POLICIES}.")
    if not 0.0 <= abstain_margin < 0.5:
        raise ValueError(f"abstain_margin must be in [0, 0.5), got {abstain_margin}.")
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}.")


def _sign(x: torch.Tensor) -> torch.Tensor:
    """+1 / -1 / 0 as float64, NaN -> 0."""
    return torch.where(x > 0, 1.0, torch.where(x < 0, -1.0, 0.0)).to(torch.float64)


def consensus(
    scores_0: Dict[str, torch.Tensor],
    scores_1: Dict[str, torch.Tensor],
    mode: str = "majority",
    temperatures: Optional[Dict[str, float]] = None,
    weights: Optional[Dict[str, float]] = None,
    human_label=None,
    human_vote: bool = False,
    abstain_margin: float = 0.0,
    tie_policy: str = "mean_prob",
    min_agreement: float = 0.0,
    state: Optional[NormalizedSumState] = None,
    generator: Optional[torch.Generator] = None,
) -> ConsensusResult:
    """The consensus preference of each pair (docs/method.md §4).

    Args:
        scores_0, scores_1: metric name -> scores of image 0 / image 1 of each pair (tensors [B]).
        mode: "majority" (weighted vote count; default), "mean_prob" (weighted mean of p_m), "human" (the human label
            only; human ties and unknowns dropped), "single:<metric>", "reward_sum" (sign of the weighted sum of raw
            score differences), "normalized_sum" (sign of sum_m w_m Delta_m / sigma_m, sigma_m from `state` or, without
            one, from this batch) or "random_metric" (the vote of one metric per pair drawn with probability
            proportional to its weight, using `generator`; a fixed default generator when None).
        temperatures, weights: per metric (defaults: native temperatures, weight 1). `weights["human"]` weighs the
            human voter.
        human_label: float tensor [B]: 1.0 image 0, 0.0 image 1, 0.5 tie, NaN unknown.
        human_vote: count the human label as one more voter (majority, mean_prob, agreement).
        abstain_margin: delta; a metric votes for image 0 when p_m > 0.5 + delta, for image 1 when p_m < 0.5 - delta.
        tie_policy: "mean_prob" (break a tie by the weighted mean probability of the metrics, drop if exactly 0.5),
            "human" (fall back to the human label, drop if that is a tie or unknown) or "drop".
        min_agreement: drop pairs whose agreement is below it.

    Decision statistics are computed so that swapping image 0 and image 1 flips every label exactly. `prob` is the
    mode's soft target: majority -> weighted share of votes for image 0; mean_prob -> the weighted mean probability;
    single/random_metric -> that metric's p_m; reward_sum / normalized_sum -> sigmoid of the summed difference; human
    -> the human label. For a tie broken by mean_prob (or by the human label), `prob` is that mean probability (or
    the human label).
    """
    _check_mode(mode, tie_policy, abstain_margin, min_agreement)
    # The human label alone needs no scorer (plain Diffusion-DPO).
    names = [] if mode == "human" and not scores_0 and not scores_1 else _check_score_dicts(scores_0, scores_1)
    if mode.startswith("single:") and mode[len("single:") :] not in names:
        raise ValueError(
            f"Consensus mode '{mode}': metric not scored; choose one of {['single:' + m for m in names]}."
        )
    weights = dict(weights or {})
    w = {m: float(weights.get(m, 1.0)) for m in names}
    if any(v < 0 for v in w.values()):
        raise ValueError(f"Weights must be >= 0, got {w}.")
    s0 = {m: _as_float64(scores_0[m]) for m in names}
    s1 = {m: _as_float64(scores_1[m]) for m in names}
    batch = len(s0[names[0]]) if names else len(_as_float64(human_label if human_label is not None else []))

    human = None
    if human_label is not None:
        human = _as_float64(human_label)
        if len(human) != batch:
            raise ValueError(f"human_label has {len(human)} entries for {batch} pairs.")
    if (mode == "human" or tie_policy == "human" or human_vote) and human is None:
        raise ValueError(f"mode='{mode}', tie_policy='{tie_policy}', human_vote={human_vote} need human_label.")

    delta = {m: s0[m] - s1[m] for m in names}
    x = {m: delta[m] / _temperature(temperatures, m) for m in names}
    centered = {m: _centered_prob(x[m]) for m in names}
    probs = {m: (0.5 + centered[m]).float() for m in names}
    # p > 0.5 + delta  <=>  x > logit(0.5 + delta); comparing x keeps votes exactly antisymmetric.
    threshold = 2.0 * math.atanh(2.0 * abstain_margin) if abstain_margin > 0 else 0.0
    votes = {m: torch.where(x[m] > threshold, 1.0, torch.where(x[m] < -threshold, -1.0, 0.0)) for m in names}
    voter_weights = dict(w)
    if human_vote or (mode == "human" and not names):
        # Without scored metrics, the human label is the only voter in "human" mode.
        votes["human"] = _sign(human - 0.5)
        voter_weights["human"] = float(weights.get("human", 1.0))
    zeros = torch.zeros(batch, dtype=torch.float64)
    pos = sum((voter_weights[v] * (votes[v] > 0) for v in votes), zeros.clone())
    neg = sum((voter_weights[v] * (votes[v] < 0) for v in votes), zeros.clone())
    total = pos + neg

    metric_weight = sum(w.values())
    mean_centered = sum((w[m] * centered[m] for m in names), zeros.clone()) / metric_weight if metric_weight else zeros

    if mode == "majority":
        stat = torch.where((pos - neg).abs() <= 1e-9 * total, 0.0, pos - neg)
        prob = torch.where(total > 0, pos / total.clamp_min(1e-300), 0.5)
    elif mode == "mean_prob":
        numerator = sum((w[m] * centered[m] for m in names), zeros.clone())
        denominator = zeros + metric_weight
        if human_vote:
            known = torch.isfinite(human)
            numerator = numerator + voter_weights["human"] * 0.5 * votes["human"]
            denominator = denominator + voter_weights["human"] * known
        stat = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), 0.0)
        prob = 0.5 + stat
    elif mode == "human":
        stat = human - 0.5
        prob = torch.where(torch.isfinite(human), human, 0.5)
    elif mode.startswith("single:"):
        metric = mode[len("single:") :]
        stat = votes[metric].clone()
        prob = 0.5 + centered[metric]
    elif mode == "reward_sum":
        stat = sum((w[m] * delta[m] for m in names), zeros.clone())
        prob = 0.5 + _centered_prob(stat)
    elif mode == "normalized_sum":
        if state is not None:
            state.update(delta)
            sigma = {m: state.sigma(m) for m in names}
        else:
            sigma = {}
            for m in names:
                finite = delta[m][torch.isfinite(delta[m])]
                sigma[m] = float(finite.pow(2).mean().sqrt()) if finite.numel() else float("nan")
        sigma = {m: max(s, 1e-12) if math.isfinite(s) else 1.0 for m, s in sigma.items()}
        stat = sum((w[m] * delta[m] / sigma[m] for m in names), zeros.clone())
        prob = 0.5 + _centered_prob(stat)
    else:  # random_metric
        if metric_weight <= 0:
            raise ValueError("random_metric needs at least one metric with a positive weight.")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        stat, prob = zeros.clone(), zeros + 0.5
        if batch:
            choice = torch.multinomial(
                torch.tensor([w[m] for m in names], dtype=torch.float64), batch, replacement=True, generator=generator
            )
            stacked_votes = torch.stack([votes[m] for m in names])
            stacked_centered = torch.stack([centered[m] for m in names])
            rows = torch.arange(batch)
            stat = stacked_votes[choice, rows]
            prob = 0.5 + stacked_centered[choice, rows]

    decision = _sign(stat)
    prob = prob.clone()
    if mode != "human":
        tie = decision == 0
        if tie_policy == "mean_prob":
            fallback = _sign(mean_centered)
            resolved = tie & (fallback != 0)
            prob = torch.where(resolved, 0.5 + mean_centered, prob)
        elif tie_policy == "human":
            fallback = _sign(human - 0.5)
            resolved = tie & (fallback != 0)
            prob = torch.where(resolved, (fallback > 0).to(torch.float64), prob)
        else:
            fallback = zeros
        decision = torch.where(tie, fallback, decision)
    keep = decision != 0

    agree = sum((voter_weights[v] * ((votes[v] == decision) & (votes[v] != 0)) for v in votes), zeros.clone())
    larger = torch.maximum(pos, neg)
    agreement = torch.where(decision != 0, agree, larger) / total.clamp_min(1e-300)
    agreement = torch.where(total > 0, agreement, 0.0)
    if min_agreement > 0:
        keep = keep & (agreement >= min_agreement - 1e-9)

    label = torch.where(decision > 0, 1.0, torch.where(decision < 0, 0.0, 0.5))
    return ConsensusResult(
        label=label.float(),
        prob=prob.float(),
        agreement=agreement.float(),
        keep=keep,
        votes={v: votes[v].to(torch.int8) for v in votes},
        probs=probs,
        mode=mode,
    )


class ConsensusLabeler:
    """What a trainer holds: the consensus configuration, the running state of `normalized_sum` and the random
    generator of `random_metric`. `state_dict()` / `load_state_dict()` make a resumed run label identically."""

    def __init__(
        self,
        mode: str = "majority",
        temperatures: Optional[Dict[str, float]] = None,
        weights: Optional[Dict[str, float]] = None,
        abstain_margin: float = 0.0,
        tie_policy: str = "mean_prob",
        min_agreement: float = 0.0,
        human_vote: bool = False,
        seed: int = 0,
        normalize_warmup_pairs: int = 2048,
    ):
        _check_mode(mode, tie_policy, abstain_margin, min_agreement)
        self.mode = mode
        self.temperatures = dict(temperatures or {})
        self.weights = dict(weights or {})
        self.abstain_margin = float(abstain_margin)
        self.tie_policy = tie_policy
        self.min_agreement = float(min_agreement)
        self.human_vote = bool(human_vote)
        self.seed = int(seed)
        self.normalized_state = NormalizedSumState(normalize_warmup_pairs)
        self.generator = torch.Generator().manual_seed(self.seed)

    @classmethod
    def from_args(
        cls, args, temperatures: Optional[Dict[str, float]] = None, weights: Optional[Dict[str, float]] = None
    ) -> "ConsensusLabeler":
        """The labeler that parsed arguments ask for: `consensus`, `abstain_margin`, `tie_policy`, `min_agreement`,
        `human_vote`, `seed` (None counts as 0) and `normalize_warmup_pairs`, named as in `rewards.py` and the
        training scripts. `temperatures` and `weights` are usually the run's `ScorerSet.temperatures` / `.weights`."""
        return cls(
            mode=args.consensus,
            temperatures=temperatures,
            weights=weights,
            abstain_margin=args.abstain_margin,
            tie_policy=args.tie_policy,
            min_agreement=args.min_agreement,
            human_vote=args.human_vote,
            seed=args.seed if args.seed is not None else 0,
            normalize_warmup_pairs=args.normalize_warmup_pairs,
        )

    def __call__(self, scores_0, scores_1, human_label=None) -> ConsensusResult:
        return consensus(
            scores_0,
            scores_1,
            mode=self.mode,
            temperatures=self.temperatures,
            weights=self.weights,
            human_label=human_label,
            human_vote=self.human_vote,
            abstain_margin=self.abstain_margin,
            tie_policy=self.tie_policy,
            min_agreement=self.min_agreement,
            state=self.normalized_state,
            generator=self.generator,
        )

    def config(self) -> dict:
        return {
            "mode": self.mode,
            "temperatures": dict(self.temperatures),
            "weights": dict(self.weights),
            "abstain_margin": self.abstain_margin,
            "tie_policy": self.tie_policy,
            "min_agreement": self.min_agreement,
            "human_vote": self.human_vote,
            "seed": self.seed,
        }

    def state_dict(self) -> dict:
        return {
            "config": self.config(),
            "normalized_sum": self.normalized_state.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict):
        self.normalized_state.load_state_dict(state["normalized_sum"])
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------------------------
# Temperature calibration
# ----------------------------------------------------------------------------------------------------------------


def _sigmoid_np(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _nll(deltas: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    z = deltas / temperature
    # softplus(z) - y z: the Bradley-Terry negative log-likelihood with (soft) targets y.
    return float(np.mean(np.logaddexp(0.0, z) - targets * z)) if len(z) else float("nan")


def fit_temperature(deltas, targets, max_iter: int = 200) -> Optional[float]:
    """Maximum-likelihood temperature of `p = sigmoid(delta / tau)` for targets in [0, 1] (ties as 0.5; NaN
    skipped). Returns None when the metric is not positively informative (the likelihood is best at tau = inf)."""
    deltas = np.asarray(deltas, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    mask = np.isfinite(deltas) & np.isfinite(targets)
    deltas, targets = deltas[mask], targets[mask]
    if not len(deltas) or not np.any(deltas != 0):
        return None

    def gradient(beta):  # d NLL / d beta, beta = 1 / tau; the NLL is convex in beta
        return float(np.sum(deltas * (_sigmoid_np(beta * deltas) - targets)))

    if gradient(0.0) >= 0:
        return None
    scale = float(np.median(np.abs(deltas[deltas != 0])))
    low, high = 0.0, 1.0 / scale
    while gradient(high) < 0:
        low, high = high, high * 2.0
        if high > 1e8 / scale:  # perfectly separated: the likelihood keeps improving as tau -> 0
            return 1.0 / high
    for _ in range(max_iter):
        middle = 0.5 * (low + high)
        if gradient(middle) < 0:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * high:
            break
    return 1.0 / (0.5 * (low + high))
