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
"""Pairs from prompts alone: which of the K images generated for a prompt are paired, and how they are labelled.

The consensus labels any pair, so a list of prompts is enough training data. For each prompt, K >= 2 images are
generated (one seed each, `image_seed`) and scored once; every pair of them is labelled by the run's consensus
(`label_candidates`), and `select_pairs` keeps:

- `extremes` (default): the image that wins the most consensus comparisons among the K against the one that wins
  the fewest (a Copeland ranking: no raw scores of different metrics are ever mixed); one pair per prompt, the one
  whose consensus is clearest;
- `all`: every pair, K(K-1)/2 per prompt (more pairs, but each image appears in K-1 of them and many are near-ties);
- `random`: one pair per prompt, drawn with a seeded generator.

`generate_pairs.py` writes such pairs as a dataset (offline); the training scripts generate them with the policy
itself, round after round (`--online_prompts`).
"""

import dataclasses
import itertools
from typing import Callable, Dict, List

import torch


PAIR_SELECTIONS = ("extremes", "all", "random")


def image_seed(seed, draw_index, image_index, images_per_prompt):
    """The seed of image `image_index` of the `draw_index`-th prompt drawn (prompts drawn again get new seeds)."""
    return int(seed) + int(draw_index) * int(images_per_prompt) + int(image_index)


def candidate_pairs(images_per_prompt):
    """Every unordered pair (i, j), i < j, of the K images of a prompt."""
    return list(itertools.combinations(range(images_per_prompt), 2))


def label_candidates(scores: Dict[str, torch.Tensor], consensus: Callable):
    """Labels every candidate pair of every prompt.

    `scores`: metric -> [P, K] scores of the K images of each of P prompts. `consensus(scores_0, scores_1)` returns a
    `rewards.ConsensusResult` for those pairs (the run's labeler, decided across processes when several).
    Returns (candidates [(prompt, i, j)], the ConsensusResult of every candidate, in that order).
    """
    num_prompts, images_per_prompt = next(iter(scores.values())).shape
    pairs = candidate_pairs(images_per_prompt)
    candidates = [(p, i, j) for p in range(num_prompts) for i, j in pairs]
    prompt = torch.tensor([c[0] for c in candidates], dtype=torch.long)
    first = torch.tensor([c[1] for c in candidates], dtype=torch.long)
    second = torch.tensor([c[2] for c in candidates], dtype=torch.long)
    scores_0 = {m: s.float()[prompt, first] for m, s in scores.items()}
    scores_1 = {m: s.float()[prompt, second] for m, s in scores.items()}
    return candidates, consensus(scores_0, scores_1)


def copeland_scores(candidates, result, num_prompts, images_per_prompt):
    """(wins, preference) [P, K]: consensus wins of each image over the others of its prompt (a dropped comparison
    counts half for each), and the sum of the consensus probabilities that it is the better image (the tie-break)."""
    wins = torch.zeros(num_prompts, images_per_prompt, dtype=torch.float64)
    preference = torch.zeros(num_prompts, images_per_prompt, dtype=torch.float64)
    label, prob, keep = result.label.tolist(), result.prob.tolist(), result.keep.tolist()
    for (p, i, j), first_wins, p_first, kept in zip(candidates, label, prob, keep):
        if not kept:
            wins[p, i] += 0.5
            wins[p, j] += 0.5
        elif first_wins > 0.5:
            wins[p, i] += 1.0
        else:
            wins[p, j] += 1.0
        preference[p, i] += p_first
        preference[p, j] += 1.0 - p_first
    return wins, preference


@dataclasses.dataclass
class SelectedPairs:
    """The pairs kept for training: prompt index, image 0 and image 1 (index within the prompt's K, image 0 first
    in generation order), and the consensus of each (label 1 = image 0 is preferred, prob, keep, agreement)."""

    prompt: List[int]
    image_0: List[int]
    image_1: List[int]
    label: torch.Tensor
    prob: torch.Tensor
    keep: torch.Tensor
    agreement: torch.Tensor
    candidates: int  # pairs labelled to choose these

    def __len__(self):
        return len(self.prompt)


def select_pairs(candidates, result, num_prompts, images_per_prompt, selection="extremes", generator=None):
    """Chooses the pairs of each prompt from its labelled candidates (see the module docstring)."""
    if selection not in PAIR_SELECTIONS:
        raise ValueError(f"Unknown pair selection {selection!r}; choose one of {', '.join(PAIR_SELECTIONS)}.")
    by_key = {c: n for n, c in enumerate(candidates)}
    chosen = []
    if selection == "all":
        chosen = list(range(len(candidates)))
    elif selection == "random":
        pairs = candidate_pairs(images_per_prompt)
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        for p in range(num_prompts):
            i, j = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
            chosen.append(by_key[(p, i, j)])
    else:
        wins, preference = copeland_scores(candidates, result, num_prompts, images_per_prompt)
        for p in range(num_prompts):
            order = range(images_per_prompt)
            # Most wins, then the highest summed preference, then the first generated.
            best = max(order, key=lambda k: (wins[p, k].item(), preference[p, k].item(), -k))
            worst = min((k for k in order if k != best), key=lambda k: (wins[p, k].item(), preference[p, k].item(), k))
            chosen.append(by_key[(p, min(best, worst), max(best, worst))])
    index = torch.tensor(chosen, dtype=torch.long)
    return SelectedPairs(
        prompt=[candidates[n][0] for n in chosen],
        image_0=[candidates[n][1] for n in chosen],
        image_1=[candidates[n][2] for n in chosen],
        label=result.label[index],
        prob=result.prob[index],
        keep=result.keep[index],
        agreement=result.agreement[index],
        candidates=len(candidates),
    )
