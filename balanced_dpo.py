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
"""The algorithm pieces both training scripts share, written once.

- `dpo_loss`: the Diffusion-DPO objective with hard or soft consensus labels (sigmoid, IPO, hinge).
- `order_by_label`: turns (image 0, image 1, consensus label) into (winner, loser).
- The dynamic reference model: a second, frozen LoRA adapter on the same UNet (`add_lora_adapters`,
  `reference_model`, `update_reference_adapter`), or the base model with adapters disabled.
- `StepMetrics`: what is logged once per optimizer step.
- Checkpoint housekeeping: atomic `checkpoint-N` folders, `latest`, `--checkpoints_total_limit`.
- `validate_args`: the argument checks that must fail in seconds, before any model or dataset is loaded.
- Robustness on many processes: `GracefulStop` (SIGTERM/SIGINT -> checkpoint, agreed by every process),
  `record_bad_examples` (bad rows counted over all processes), `check_finite_lora` (no NaN LoRA is ever written).

Scoring and the consensus label itself live in `rewards.py`; the data pipeline in `preference_data.py`.
"""

import contextlib
import math
import os
import re
import shutil
import signal

import torch
import torch.nn.functional as F


POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
CONSENSUS_MODES = ("majority", "mean_prob", "human", "reward_sum", "normalized_sum", "random_metric")


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------


def per_example_mse(prediction, target):
    """Squared error per example, averaged over latent channels and pixels, in float32."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=list(range(1, prediction.ndim)))


def dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, loss_type="sigmoid", winner_prob=None):
    """Per-pair Diffusion-DPO loss.

        h = -1/2 * beta * [(e_w - e_l) - (e_ref_w - e_ref_l)]
        sigmoid: -log sigmoid(h)      ipo: (h / beta - 1 / (2 beta))^2      hinge: relu(1 - h)

    With `winner_prob` (the consensus probability q_w that the winner really is better), the loss becomes the
    expectation over both orientations: q_w * f(h) + (1 - q_w) * f(-h). For `sigmoid` that is the binary
    cross-entropy of sigmoid(h) against q_w. `winner_prob=None` is the hard label (q_w = 1).

    Returns `(loss [B], h [B])`. beta means the same in the SD and SDXL scripts; beta = 5000 here equals
    `--beta_dpo 2500` in diffusers' SD Diffusion-DPO example (which omits the 1/2) and 5000 in its SDXL one.
    """
    h = -0.5 * beta * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))

    def one_side(x):
        if loss_type == "sigmoid":
            return -F.logsigmoid(x)
        if loss_type == "ipo":
            # IPO regresses the log-likelihood-ratio margin (h / beta) onto 1 / (2 beta).
            return (x / beta - 1.0 / (2.0 * beta)) ** 2
        if loss_type == "hinge":
            return torch.relu(1.0 - x)
        raise ValueError(f"Unknown --loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}.")

    loss = one_side(h)
    if winner_prob is not None:
        winner_prob = winner_prob.to(h.dtype)
        loss = winner_prob * loss + (1.0 - winner_prob) * one_side(-h)
    return loss, h


def order_by_label(tensor_0, tensor_1, label):
    """Stacks (winner, loser) along the batch: image 0 wins where `label > 0.5`, image 1 otherwise."""
    first_wins = (label > 0.5).view(-1, *([1] * (tensor_0.ndim - 1))).to(tensor_0.device)
    winner = torch.where(first_wins, tensor_0, tensor_1)
    loser = torch.where(first_wins, tensor_1, tensor_0)
    return torch.cat([winner, loser], dim=0)


def winner_probability(label, prob):
    """q_w: the consensus probability that the chosen winner is the better image."""
    return torch.where(label > 0.5, prob, 1.0 - prob)


# ----------------------------------------------------------------------------------------------------------------
# LoRA adapters and the dynamic reference model
# ----------------------------------------------------------------------------------------------------------------


def add_lora_adapters(unet, lora_config, dynamic_reference):
    """Adds the trainable policy adapter and, for a dynamic reference, a frozen reference adapter.

    The reference starts equal to the policy (both are zero updates at initialisation), so at step 0 the
    reference is the base model, as in Diffusion-DPO. Returns the list of trainable parameters.
    """
    import copy

    unet.add_adapter(copy.deepcopy(lora_config), adapter_name=POLICY_ADAPTER)
    if dynamic_reference:
        unet.add_adapter(copy.deepcopy(lora_config), adapter_name=REFERENCE_ADAPTER)
        copy_adapter_weights(unet, POLICY_ADAPTER, REFERENCE_ADAPTER)
        unet.set_adapter(POLICY_ADAPTER)
    return freeze_all_but_policy(unet)


def freeze_all_but_policy(unet):
    """Marks exactly the policy LoRA parameters trainable (peft's `set_adapter` flips `requires_grad`)."""
    marker = f".{POLICY_ADAPTER}."
    trainable = []
    for name, param in unet.named_parameters():
        is_policy = "lora_" in name and marker in name
        param.requires_grad_(is_policy)
        if is_policy:
            trainable.append(param)
    return trainable


def _adapter_pairs(unet, source, target):
    params = dict(unet.named_parameters())
    pairs = []
    for name, param in params.items():
        if "lora_" in name and f".{source}." in name:
            target_name = name.replace(f".{source}.", f".{target}.")
            if target_name not in params:
                raise KeyError(f"Adapter {target!r} has no parameter matching {name}.")
            pairs.append((param, params[target_name]))
    if not pairs:
        raise ValueError(f"No LoRA parameters found for adapter {source!r}.")
    return pairs


@torch.no_grad()
def copy_adapter_weights(unet, source, target):
    for source_param, target_param in _adapter_pairs(unet, source, target):
        target_param.copy_(source_param)


@torch.no_grad()
def update_reference_adapter(unet, mode="copy", decay=0.0):
    """Moves the reference towards the current policy: a hard copy, or ref <- decay * ref + (1 - decay) * policy.

    The EMA acts on the LoRA factors A and B separately (the reference is itself a LoRA of the same rank); with
    `copy` the reference equals the policy exactly.
    """
    if mode == "copy":
        copy_adapter_weights(unet, POLICY_ADAPTER, REFERENCE_ADAPTER)
    elif mode == "ema":
        for policy_param, ref_param in _adapter_pairs(unet, POLICY_ADAPTER, REFERENCE_ADAPTER):
            ref_param.mul_(decay).add_(policy_param.to(ref_param.dtype), alpha=1.0 - decay)
    else:
        raise ValueError(f"Unknown --ref_update_mode {mode!r}; choose 'copy' or 'ema'.")


class _TunerLayerCache:
    """The peft tuner layers of each UNet, found once: walking every module costs milliseconds on every step.

    Keyed weakly by the UNet, and rebuilt whenever its adapters change (a new or re-added adapter brings a new
    config object into `unet.peft_config`).
    """

    def __init__(self):
        import weakref

        self._by_unet = weakref.WeakKeyDictionary()

    def get(self, unet):
        """(direct, by_method, by_method_params): see `_switches_directly`."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        peft_config = getattr(unet, "peft_config", None) or {}
        key = tuple((name, id(config)) for name, config in peft_config.items())
        cached = self._by_unet.get(unet)
        if cached is not None and cached[0] == key:
            return cached[1]
        if not key:
            raise ValueError("No adapter loaded. Please load an adapter first.")
        direct, by_method = [], []
        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                (direct if _switches_directly(module) else by_method).append(module)
        if not direct and not by_method:
            raise ValueError("The UNet has a peft_config but no adapter layers.")
        by_method_params = list({id(p): p for layer in by_method for p in layer.parameters()}.values())
        self._by_unet[unet] = (key, (direct, by_method, by_method_params))
        return direct, by_method, by_method_params


_TUNER_LAYERS = _TunerLayerCache()


def _switches_directly(layer):
    """Whether the layer's adapters can be switched by writing the two fields its forward reads.

    Besides those two fields, peft's stock `BaseTunerLayer.set_adapter` / `enable_adapters` only flip
    `requires_grad` of every adapter weight: that is what makes them slow, and it is moot under `torch.no_grad`.
    Layer types that override either method are switched through the method instead.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    cls = type(layer)
    return (
        cls.set_adapter is BaseTunerLayer.set_adapter
        and cls.enable_adapters is BaseTunerLayer.enable_adapters
        and "_active_adapter" in vars(BaseTunerLayer)
        and "_disable_adapters" in vars(BaseTunerLayer)
    )


@contextlib.contextmanager
def reference_model(unet, dynamic_reference):
    """Runs the UNet as the reference model inside the block, then restores the policy.

    `unet` must be the unwrapped model (DDP has no adapter methods). Without a dynamic reference the adapters are
    disabled (the base model is the reference); with one, the frozen reference adapter is activated. Gradients
    are off inside; each LoRA layer's active/disabled state and every `requires_grad` flag are restored afterwards
    whatever happens. Costs well under a microsecond per LoRA layer: no walk over the UNet's modules or parameters.
    """
    direct, by_method, by_method_params = _TUNER_LAYERS.get(unet)
    if dynamic_reference and REFERENCE_ADAPTER not in unet.peft_config:
        raise ValueError(f"The UNet has no {REFERENCE_ADAPTER!r} adapter; add it with add_lora_adapters.")
    # The same switch as diffusers' `unet.set_adapter(REFERENCE_ADAPTER)` / `unet.disable_adapters()`.
    field, value = ("_active_adapter", [REFERENCE_ADAPTER]) if dynamic_reference else ("_disable_adapters", True)
    saved = [getattr(layer, field) for layer in direct]
    saved_by_method = [(layer.active_adapter, layer.disable_adapters) for layer in by_method]
    saved_grads = [p.requires_grad for p in by_method_params]
    try:
        for layer in direct:
            # nn.Module.__setattr__ costs microseconds and only matters for parameters, buffers and submodules.
            object.__setattr__(layer, field, value)
        for layer in by_method:
            if dynamic_reference:
                layer.set_adapter(REFERENCE_ADAPTER)
            else:
                layer.enable_adapters(False)
        with torch.no_grad():
            yield unet
    finally:
        for layer, old in zip(direct, saved):
            object.__setattr__(layer, field, old)
        for layer, (active, disabled) in zip(by_method, saved_by_method):
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for param, flag in zip(by_method_params, saved_grads):
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def adapter_state_dict(unet, adapter_name=POLICY_ADAPTER):
    """The adapter's LoRA weights in diffusers' format (what `load_lora_weights` reads), as float32 CPU tensors."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    state = convert_state_dict_to_diffusers(state)
    return {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in state.items()}


def load_adapter_state_dict(unet, state_dict, adapter_name=POLICY_ADAPTER):
    """Loads LoRA weights into the *existing* adapter (never adds a second one, which would restart training)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict = {k.removeprefix("unet."): v for k, v in state_dict.items()}
    peft_state = convert_unet_state_dict_to_peft(state_dict)
    result = set_peft_model_state_dict(unet, peft_state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA checkpoint has keys the UNet does not: {unexpected[:5]}")


REFERENCE_WEIGHTS_NAME = "reference_lora_weights.safetensors"


def save_reference_adapter(unet, directory):
    """Writes the reference adapter next to the policy LoRA, with the same `unet.`-prefixed diffusers keys."""
    from safetensors.torch import save_file

    state = adapter_state_dict(unet, REFERENCE_ADAPTER)
    save_file({f"unet.{k}": v for k, v in state.items()}, os.path.join(directory, REFERENCE_WEIGHTS_NAME))


def load_reference_adapter(unet, directory):
    from safetensors.torch import load_file

    path = os.path.join(directory, REFERENCE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{directory} has no {REFERENCE_WEIGHTS_NAME}: it was saved with --ref_update_steps 0. Resume with the"
            " same --ref_update_steps as the original run."
        )
    load_adapter_state_dict(unet, load_file(path), REFERENCE_ADAPTER)


# ----------------------------------------------------------------------------------------------------------------
# Logging, once per optimizer step
# ----------------------------------------------------------------------------------------------------------------


class StepMetrics:
    """Sums per-pair statistics over the micro-steps of one optimizer step, then reduces across processes.

    Sums (not means) are accumulated so that the logged means weigh every pair equally whatever the batch sizes
    on each process and micro-step.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = {}
        self.scoring_seconds = 0.0
        self.step_seconds = 0.0

    def add(self, name, total, count):
        value, n = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (value + float(total), n + float(count))

    def add_pairs(self, loss, h, model_diff, ref_diff):
        n = h.numel()
        self.add("loss", loss.detach().float().sum(), n)
        accuracy = (h > 0).float() + 0.5 * (h == 0).float()
        self.add("implicit_acc", accuracy.sum(), n)
        self.add("model_diff", model_diff.detach().float().sum(), n)
        self.add("ref_diff", ref_diff.detach().float().sum(), n)

    def add_consensus(self, result, human_label=None):
        """Per-metric agreement with the consensus, the share that differs from the human label, the share dropped."""
        keep = result.keep.cpu()
        label = result.label.cpu()
        total = keep.numel()
        self.add("dropped_share", (~keep).sum(), total)
        kept = keep.sum()
        if kept > 0:
            self.add("consensus_agreement", result.agreement.cpu()[keep].float().sum(), kept)
            consensus_vote = torch.where(label > 0.5, 1, -1)[keep]
            for name, votes in result.votes.items():
                votes = votes.cpu()[keep]
                voted = votes != 0
                self.add(f"agreement/{name}", (votes[voted] == consensus_vote[voted]).sum(), voted.sum())
            if human_label is not None:
                human = human_label.cpu().float()[keep]
                known = torch.isfinite(human) & (human != 0.5)
                differs = (human[known] > 0.5) != (label[keep][known] > 0.5)
                self.add("differs_from_human", differs.sum(), known.sum())

    def reduce(self, accelerator):
        """Means over every pair of every process; call on all processes."""
        names = sorted(self.sums)
        if not names:
            return {}
        values = torch.tensor([[self.sums[n][0], self.sums[n][1]] for n in names], dtype=torch.float64)
        timing = torch.tensor([self.scoring_seconds, self.step_seconds], dtype=torch.float64)
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values.to(accelerator.device), reduction="sum").cpu()
            timing = accelerator.reduce(timing.to(accelerator.device), reduction="sum").cpu()
        logs = {name: v / n for name, (v, n) in zip(names, values.tolist()) if n > 0}
        if "loss" in names:
            # Pairs trained in this optimizer step over all processes (dropped and unreadable pairs excluded).
            logs["pairs"] = values[names.index("loss"), 1].item()
        if timing[1] > 0:
            logs["scoring_time_share"] = (timing[0] / timing[1]).item()
        return logs


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "checkpoint_complete"


def list_checkpoints(output_dir):
    """Complete `checkpoint-N` folders, oldest first (partial or temporary folders are never listed)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, COMPLETE_MARKER)):
            found.append((int(match.group(1)), name))
    return [name for _, name in sorted(found)]


def resolve_resume_checkpoint(output_dir, resume_from_checkpoint):
    """The checkpoint folder to resume from, `None` to start fresh, or a clear error."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return os.path.join(output_dir, checkpoints[-1]) if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist. Pass a `checkpoint-N` folder"
            f" (absolute, or inside --output_dir {output_dir!r}) or `latest`."
        )
    if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} file); pick an older one.")
    return path


def checkpoint_step(path):
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not match:
        raise ValueError(f"Cannot read the step from checkpoint folder name {path!r} (expected checkpoint-N).")
    return int(match.group(1))


def save_checkpoint(accelerator, output_dir, global_step, total_limit=None, logger=None):
    """Writes `checkpoint-<global_step>` atomically, then prunes old ones to respect `total_limit`.

    Everything is written to `.checkpoint-N.tmp` first and renamed when complete, so a crash or a full disk
    leaves the previous checkpoints valid and `latest` never resolves to a partial folder. Old checkpoints are
    removed only after the new one is complete. Call on every process (accelerate gathers state collectively).
    """
    final_path = os.path.join(output_dir, f"checkpoint-{global_step}")
    tmp_path = os.path.join(output_dir, f".checkpoint-{global_step}.tmp")
    if accelerator.is_main_process and os.path.exists(tmp_path):
        shutil.rmtree(tmp_path)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp_path, COMPLETE_MARKER), "w") as f:
            f.write(f"{global_step}\n")
        if os.path.exists(final_path):
            shutil.rmtree(final_path)
        os.replace(tmp_path, final_path)
        if total_limit is not None:
            checkpoints = list_checkpoints(output_dir)
            for name in checkpoints[: max(0, len(checkpoints) - total_limit)]:
                shutil.rmtree(os.path.join(output_dir, name))
                if logger is not None:
                    logger.info(f"Removed old checkpoint {name} (--checkpoints_total_limit {total_limit})")
        if logger is not None:
            logger.info(f"Saved state to {final_path}")
    accelerator.wait_for_everyone()
    return final_path


def check_finite_lora(state_dict, what="The LoRA"):
    """Refuses to write LoRA weights with NaN or inf values (they would load and produce black images)."""
    bad_keys = [key for key, value in state_dict.items() if not torch.isfinite(value).all()]
    if bad_keys:
        raise RuntimeError(
            f"{what} has non-finite values ({', '.join(bad_keys[:3])}{', ...' if len(bad_keys) > 3 else ''}); it was"
            " not written. Earlier checkpoints are intact: resume from one with a lower --learning_rate or --beta_dpo."
        )


def generator_state_name(process_index):
    return f"training_generator_{process_index}.safetensors"


def save_generator_state(directory, generator, process_index):
    """Each process saves its own noise generator (they are seeded differently), so a multi-process resume draws
    the same noise on every process as the uninterrupted run."""
    from safetensors.torch import save_file

    save_file({"state": generator.get_state()}, os.path.join(directory, generator_state_name(process_index)))


def load_generator_state(directory, generator, process_index):
    from safetensors.torch import load_file

    path = os.path.join(directory, generator_state_name(process_index))
    if os.path.isfile(path):
        generator.set_state(load_file(path)["state"])


class GracefulStop:
    """SIGTERM / SIGINT (preemption, Ctrl-C, `scancel`): finish the current optimizer step, save a checkpoint, exit.

    The handler only sets a flag; the training loop asks `requested(accelerator)` once per optimizer step. The answer
    is agreed by all processes (a max over them), because a signal may reach only some of them, and a process that
    went on to save a checkpoint alone would hang the others in their next collective. Further signals while stopping
    are ignored: launchers such as torchrun forward the signal that the scheduler also sends to every process, and a
    second one must not abort the checkpoint. Use as a context manager so the previous handlers come back.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def requested(self, accelerator):
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="max")
        return flag.item() > 0


def ignore_stop_signals(worker_id=None):
    """`worker_init_fn` of the DataLoaders: workers leave SIGTERM/SIGINT to the main process.

    Schedulers (and Ctrl-C in a terminal) signal every process of a job. A DataLoader worker killed by the signal
    makes PyTorch raise in the main process at once, before it could save its checkpoint; the main process shuts its
    workers down itself when it exits.
    """
    for sig in GracefulStop.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def record_bad_examples(accelerator, tracker, batch):
    """Counts and logs the bad rows of this micro-batch on every process, then applies `--max_bad_examples`.

    The rows of all processes are gathered first, so each bad row is logged once with its row id whichever process
    read it, the counts (logged and saved in checkpoints) are those of the whole run, and every process takes the
    same stop decision: one process stopping alone would leave the others waiting for it forever.
    """
    bad, num_rows, num_skipped = list(batch["bad_examples"]), int(batch["num_rows"]), int(batch["skipped_examples"])
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(bad, num_rows, num_skipped)])
        bad = [item for part in gathered for item in part[0]]
        num_rows = sum(part[1] for part in gathered)
        num_skipped = sum(part[2] for part in gathered)
    tracker.update(bad, num_seen=num_rows, num_skipped=num_skipped)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks that run before anything expensive
# ----------------------------------------------------------------------------------------------------------------


def parse_consensus_mode(mode, reward_models):
    """Validates `--consensus` against the loaded metrics; returns the metric names the mode needs scored."""
    if mode.startswith("single:"):
        metric = mode.split(":", 1)[1]
        if metric not in reward_models:
            raise ValueError(
                f"--consensus {mode} names metric {metric!r}, which is not in --reward_models"
                f" ({','.join(reward_models) or 'empty'}). Add it to --reward_models or pick one of those."
            )
        return [metric]
    if mode not in CONSENSUS_MODES:
        raise ValueError(
            f"Unknown --consensus {mode!r}; choose one of {', '.join(CONSENSUS_MODES)} or single:<metric>."
        )
    if mode == "human":
        return []
    if not reward_models:
        raise ValueError(f"--consensus {mode} needs at least one metric in --reward_models.")
    return list(reward_models)


def validate_args(args):
    """Checks every argument that can be checked without loading a model or a dataset. Raises ValueError."""
    if args.beta_dpo <= 0:
        raise ValueError(f"--beta_dpo must be positive (got {args.beta_dpo}); the default is 5000.")
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown --loss_type {args.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}.")
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Specify --dataset_name (Hub id or local path) or --train_data_dir.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("Specify only one of --dataset_name and --train_data_dir.")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError("--proportion_empty_prompts must be in [0, 1].")
    if not 0.0 <= args.min_agreement <= 1.0:
        raise ValueError("--min_agreement must be in [0, 1].")
    if not 0.0 <= args.abstain_margin < 0.5:
        raise ValueError("--abstain_margin must be in [0, 0.5).")
    if args.ref_update_steps < 0:
        raise ValueError("--ref_update_steps must be >= 0 (0 keeps the base model as the reference).")
    if args.ref_update_mode not in ("copy", "ema"):
        raise ValueError("--ref_update_mode must be 'copy' or 'ema'.")
    if not 0.0 <= args.ref_ema_decay < 1.0:
        raise ValueError("--ref_ema_decay must be in [0, 1).")
    if args.label_mode not in ("hard", "soft"):
        raise ValueError("--label_mode must be 'hard' or 'soft'.")
    if args.rank <= 0:
        raise ValueError("--rank must be positive.")
    if args.gradient_accumulation_steps < 1:
        raise ValueError("--gradient_accumulation_steps must be >= 1.")
    if args.train_batch_size < 1:
        raise ValueError("--train_batch_size must be >= 1 (pairs per device per micro-step).")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError("--checkpoints_total_limit must be >= 1 (or left unset to keep every checkpoint).")
    # Both are used as `step % N`: 0 would crash after the first step, hours into a run.
    if args.checkpointing_steps < 1:
        raise ValueError("--checkpointing_steps must be >= 1 (a large value saves only at interruptions).")
    if args.validation_steps < 1:
        raise ValueError("--validation_steps must be >= 1.")
    if args.max_nonfinite_steps < 1:
        raise ValueError("--max_nonfinite_steps must be >= 1.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError("--max_train_steps must be >= 1.")
    if getattr(args, "cache_latents", False) and args.streaming:
        raise ValueError(
            "--cache_latents needs a map-style dataset (rows with stable indices across epochs); drop --streaming, "
            "or drop --cache_latents."
        )
    if args.streaming and args.max_train_steps is None:
        raise ValueError("--streaming needs --max_train_steps (the length of a streamed dataset is unknown).")
    if args.ref_update_mode == "ema" and args.ref_update_steps == 0:
        raise ValueError(
            "--ref_update_mode ema has no effect with --ref_update_steps 0 (the reference stays the base model);"
            " set --ref_update_steps N to update the reference every N steps."
        )

    reward_models = [m.strip() for m in args.reward_models.split(",") if m.strip()] if args.reward_models else []
    if args.precomputed_consensus:
        # The label was decided offline by `rewards.py label`: live consensus options would be silently ignored.
        if args.consensus != "majority" or args.human_vote:
            raise ValueError(
                "--precomputed_consensus reads the labels written by `rewards.py label`, so --consensus and"
                " --human_vote have no effect: pass them to `rewards.py label` instead, or drop"
                " --precomputed_consensus to label live."
            )
        args.scored_metrics = []
    else:
        import rewards

        known = set(rewards.available_scorers())
        for metric in reward_models:
            if metric not in known and ":" not in metric:
                raise ValueError(
                    f"Unknown metric {metric!r} in --reward_models; available: {', '.join(sorted(known))}"
                    " (or a user scorer given as package.module:Class)."
                )
        args.scored_metrics = parse_consensus_mode(args.consensus, reward_models)
    args.reward_model_list = reward_models
    if args.human_vote and args.label_0_column is None:
        raise ValueError("--human_vote needs the human label column (--label_0_column).")
    if (args.consensus == "human" or args.tie_policy == "human") and args.label_0_column is None:
        raise ValueError(f"--consensus {args.consensus} / --tie_policy {args.tie_policy} need --label_0_column.")
    if args.reward_config is not None and not os.path.isfile(args.reward_config):
        raise ValueError(
            f"--reward_config {args.reward_config!r} does not exist (write one with `rewards.py calibrate`)."
        )
    if args.validation_prompts is None and args.score_validation:
        raise ValueError("--score_validation needs --validation_prompts.")
    if args.resume_from_checkpoint not in (None, "latest"):
        resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.push_to_hub:
        check_hub_credentials(args.hub_token)
    if args.report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--report_to wandb needs `pip install wandb`.") from None
    return args


def check_hub_credentials(hub_token=None):
    """Fails fast when `--push_to_hub` cannot authenticate, instead of after hours of training."""
    from huggingface_hub import get_token

    if hub_token is None and get_token() is None:
        raise ValueError(
            "--push_to_hub needs Hub credentials: run `hf auth login` (or set HF_TOKEN), or pass --hub_token."
        )


def read_validation_prompts(value):
    """`--validation_prompts` takes prompts or a single path to a text file with one prompt per line."""
    if not value:
        return []
    if len(value) == 1 and os.path.isfile(value[0]):
        with open(value[0], encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return list(value)


def num_update_steps(num_batches, gradient_accumulation_steps):
    return math.ceil(num_batches / gradient_accumulation_steps)


# ----------------------------------------------------------------------------------------------------------------
# Small training state that travels with each checkpoint (no pickle: JSON for scalars, safetensors for tensors)
# ----------------------------------------------------------------------------------------------------------------


def _flatten(state, prefix=""):
    scalars, tensors = {}, {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not value:
            scalars[name] = {}  # kept explicitly: an empty dict has no leaves to rebuild it from
        elif isinstance(value, dict):
            sub_scalars, sub_tensors = _flatten(value, prefix=f"{name}/")
            scalars.update(sub_scalars)
            tensors.update(sub_tensors)
        elif isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
        else:
            scalars[name] = value
    return scalars, tensors


def _unflatten(flat):
    state = {}
    for name, value in flat.items():
        node = state
        *parents, leaf = name.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return state


def save_training_state(directory, state, name="training_state"):
    """Writes a nested dict of scalars and tensors as `<name>.json` + `<name>.safetensors`."""
    import json

    from safetensors.torch import save_file

    scalars, tensors = _flatten(state)
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        json.dump(scalars, f, indent=1, sort_keys=True)
    if tensors:
        save_file(tensors, os.path.join(directory, f"{name}.safetensors"))


def load_training_state(directory, name="training_state"):
    import json

    from safetensors.torch import load_file

    with open(os.path.join(directory, f"{name}.json")) as f:
        flat = json.load(f)
    tensor_path = os.path.join(directory, f"{name}.safetensors")
    if os.path.isfile(tensor_path):
        flat.update(load_file(tensor_path))
    return _unflatten(flat)


class TrainingProgress:
    """Where the run is: optimizer steps done, epoch, and batches consumed in that epoch (for exact resumes)."""

    def __init__(self):
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.skipped_batches = 0
        self.nonfinite_steps = 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, int(value))


def save_run_state(directory, progress, bad_examples, generator, labeler=None):
    """Everything besides the adapters and the optimizer that a resumed run needs to continue identically."""
    state = {
        "progress": progress.state_dict(),
        "bad_examples": bad_examples.state_dict(),
        "generator": generator.get_state(),
    }
    if labeler is not None:
        state["consensus"] = labeler.state_dict()
    save_training_state(directory, state)


def load_run_state(directory, progress, bad_examples, generator, labeler=None, process_index=0):
    state = load_training_state(directory)
    progress.load_state_dict(state["progress"])
    bad_examples.load_state_dict(state.get("bad_examples", {}))
    generator.set_state(state["generator"])
    load_generator_state(directory, generator, process_index)
    if labeler is not None and "consensus" in state:
        labeler.load_state_dict(state["consensus"])


def consensus_across_processes(accelerator, labeler, scores_0, scores_1, human_label):
    """Decides the consensus on the global batch so stateful modes (normalized_sum, random_metric) stay identical on
    every process, then returns this process's slice. Scores are tiny, so gathering them costs nothing."""
    if accelerator.num_processes == 1:
        return labeler(scores_0, scores_1, human_label=human_label)
    from accelerate.utils import gather_object

    local = {
        "scores_0": {k: v.detach().cpu() for k, v in scores_0.items()},
        "scores_1": {k: v.detach().cpu() for k, v in scores_1.items()},
        "human": human_label.detach().cpu() if human_label is not None else None,
    }
    gathered = gather_object([local])
    sizes = [
        len(part["human"]) if part["human"] is not None else len(next(iter(part["scores_0"].values())))
        for part in gathered
    ]
    merged_0 = {k: torch.cat([part["scores_0"][k] for part in gathered]) for k in local["scores_0"]}
    merged_1 = {k: torch.cat([part["scores_1"][k] for part in gathered]) for k in local["scores_1"]}
    merged_human = torch.cat([part["human"] for part in gathered]) if human_label is not None else None
    result = labeler(merged_0, merged_1, human_label=merged_human)
    start = sum(sizes[: accelerator.process_index])
    stop = start + sizes[accelerator.process_index]
    return slice_consensus(result, start, stop)


def slice_consensus(result, start, stop):
    import dataclasses

    fields = {}
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if isinstance(value, torch.Tensor):
            fields[field.name] = value[start:stop]
        elif isinstance(value, dict):
            fields[field.name] = {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        else:
            fields[field.name] = value
    return type(result)(**fields)


# ----------------------------------------------------------------------------------------------------------------
# One training micro-step, shared by the SD and SDXL scripts
# ----------------------------------------------------------------------------------------------------------------


def training_generator(accelerator, seed):
    """The generator for the training noise, timesteps and VAE samples of this process.

    A dedicated generator (saved in every checkpoint) rather than the global RNG: DataLoader iterators, validation
    and third-party code draw from the global RNG at times that differ between an interrupted and an uninterrupted
    run, which would make a resumed run diverge.
    """
    generator = torch.Generator(device=accelerator.device)
    generator.manual_seed((seed if seed is not None else torch.initial_seed()) + 1000003 * accelerator.process_index)
    return generator


def encode_latents(vae, pixel_values, batch_size, generator=None):
    """VAE latents (sampled with `generator`, scaled), encoded in chunks of `batch_size` to bound memory."""
    latents = [
        vae.encode(pixel_values[i : i + batch_size]).latent_dist.sample(generator=generator)
        for i in range(0, pixel_values.shape[0], batch_size)
    ]
    return torch.cat(latents) * vae.config.scaling_factor


class LatentCache:
    """VAE latent distributions of training images, encoded once per image and augmentation (`--cache_latents`).

    Keyed by (dataset row, side of the pair, flip, crop position), it keeps the encoder's moments (mean and
    log-variance, in the VAE's dtype, on the CPU) rather than a latent sample, so every use still draws a fresh
    sample with the training generator, chunk by chunk, exactly as `encode_latents` does. It pays off from the second
    epoch (with random flips, half the images come back with the other flip); each image costs
    8 x (resolution / 8)^2 values of host memory (64 KiB at 512 px in bf16, 256 KiB at 1024 px).
    """

    def __init__(self):
        self._moments = {}  # key -> moments [2 * latent channels, h, w]
        self.hits = 0
        self.misses = 0

    def __len__(self):
        return len(self._moments)

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self._moments.values())

    @torch.no_grad()
    def encode(self, vae, pixel_values, keys, batch_size, generator=None):
        """As `encode_latents(vae, pixel_values, batch_size, generator)`, encoding only images not seen before."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} cache keys for {pixel_values.shape[0]} images.")
        missing, seen = [], set()
        for i, key in enumerate(keys):
            if key not in self._moments and key not in seen:
                seen.add(key)
                missing.append(i)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            new = pixel_values.index_select(0, torch.tensor(missing, device=pixel_values.device))
            moments = torch.cat(
                [
                    vae.encode(new[i : i + batch_size]).latent_dist.parameters
                    for i in range(0, len(missing), batch_size)
                ]
            ).cpu()
            for i, row in zip(missing, moments):
                self._moments[keys[i]] = row.clone()
        moments = torch.stack([self._moments[key] for key in keys]).to(pixel_values.device)
        latents = [
            DiagonalGaussianDistribution(moments[i : i + batch_size]).sample(generator=generator)
            for i in range(0, len(keys), batch_size)
        ]
        return torch.cat(latents) * vae.config.scaling_factor


def _available_host_memory():
    """MemAvailable of /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_latent_cache_fits(args, vae, num_rows, num_processes=1, local_processes=1, available_bytes=None):
    """Host memory `--cache_latents` may need on this machine, in bytes; a ValueError before training when it
    exceeds 80% of the available memory (a run killed for memory hours later would lose its work since the last
    checkpoint).

    Each process caches its own rows: 2 images per pair, 2 versions of each with random flips, and with random crops
    one more version per epoch in the worst case.
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = args.resolution // factor
    bytes_per_image = 2 * vae.config.latent_channels * side * side * vae.dtype.itemsize
    epochs = max(1, int(args.num_train_epochs or 1))
    versions = epochs if args.random_crop else min(epochs, 1 if args.no_hflip else 2)
    rows_per_process = math.ceil(num_rows / max(1, num_processes))
    needed = rows_per_process * 2 * versions * bytes_per_image * max(1, local_processes)
    available = _available_host_memory() if available_bytes is None else available_bytes
    if available is not None and needed > 0.8 * available:
        raise ValueError(
            f"--cache_latents could need {needed / 2**30:.1f} GiB of host memory on this machine "
            f"({rows_per_process} pairs per process x 2 images x {versions} flip/crop version(s) x "
            f"{bytes_per_image // 1024} KiB x {max(1, local_processes)} process(es)), more than 80% of the "
            f"{available / 2**30:.1f} GiB available. Drop --cache_latents, train on fewer rows (--max_train_samples), "
            "or add --no_hflip (and drop --random_crop) to keep one version per image."
        )
    return needed


def make_latent_cache(args, vae, pairs, num_processes, logger):
    """The run's LatentCache with `--cache_latents` (after checking it fits in host memory), else None. `pairs` is
    the map-style training dataset (streams have no length, and `validate_args` refuses them with the cache)."""
    if not args.cache_latents:
        return None
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    needed = check_latent_cache_fits(args, vae, len(pairs), num_processes, local_processes)
    logger.info(f"--cache_latents: up to {needed / 2**30:.2f} GiB of host memory on this machine.")
    if args.num_train_epochs <= 1:
        logger.warning("--cache_latents with a single epoch: no encoding will be reused.")
    if args.random_crop:
        logger.warning("--cache_latents with --random_crop: each epoch crops anew, so few encodings are reused.")
    return LatentCache()


def latent_cache_keys(batch, index, label):
    """Cache keys of the images fed to the VAE (winners of the kept pairs, then losers; see `order_by_label`)."""
    rows = batch["indices"][index.to(batch["indices"].device)].tolist()
    flips = batch["flips"][index.to(batch["flips"].device)].tolist()
    crops = batch["crop_top_lefts"][index.to(batch["crop_top_lefts"].device)].tolist()
    winners, losers = [], []
    for row, flip, crop, first_wins in zip(rows, flips, crops, (label > 0.5).tolist()):
        keys = [(row, side, bool(flip), tuple(crop[side])) for side in (0, 1)]
        winners.append(keys[0] if first_wins else keys[1])
        losers.append(keys[1] if first_wins else keys[0])
    return winners + losers


def encode_pair_latents(args, vae, batch, index, label, feed_pixel_values, generator, latent_cache=None):
    """Latents of the winner-first feed: through `latent_cache` when one is given, else by encoding every image."""
    if latent_cache is None:
        return encode_latents(vae, feed_pixel_values, args.vae_encode_batch_size, generator)
    keys = latent_cache_keys(batch, index, label)
    return latent_cache.encode(vae, feed_pixel_values, keys, args.vae_encode_batch_size, generator)


def make_labeler(args, scorer_set):
    """The run's `rewards.ConsensusLabeler` from the consensus arguments (None with `--precomputed_consensus`)."""
    if args.precomputed_consensus:
        return None
    import rewards

    return rewards.ConsensusLabeler(
        mode=args.consensus,
        temperatures=scorer_set.temperatures if scorer_set is not None else None,
        weights=scorer_set.weights if scorer_set is not None else None,
        abstain_margin=args.abstain_margin,
        tie_policy=args.tie_policy,
        min_agreement=args.min_agreement,
        human_vote=args.human_vote,
        seed=args.seed if args.seed is not None else 0,
        normalize_warmup_pairs=args.normalize_warmup_pairs,
    )


def start_scoring(args, batch, scorer_set):
    """Starts the live scoring of the batch's pairs (asynchronous on CUDA); None when nothing is scored."""
    if args.precomputed_consensus or not args.scored_metrics or batch["batch_size"] == 0:
        return None
    return scorer_set.score_pairs_async(batch["scorer_inputs"], list(batch["captions"]))


def score_ahead(batches, args, scorer_set):
    """Yields `batches`, starting the scoring of each one a batch early: on CUDA the reward models of batch N+1 run
    on a side stream while batch N trains, instead of in front of it. Scores depend only on the images and prompts,
    and the consensus is still decided batch by batch in order, so training is the same as without it."""
    if args.precomputed_consensus or not args.scored_metrics or args.no_score_ahead:
        yield from batches
        return
    previous = None
    for batch in batches:
        batch["pending_scores"] = start_scoring(args, batch, scorer_set)
        if previous is not None:
            yield previous
        previous = batch
    if previous is not None:
        yield previous


def consensus_for_batch(args, accelerator, batch, scorer_set, labeler, metrics):
    """(label, prob, keep) for the local batch: from precomputed columns, or live scoring + the `rewards` consensus.

    `label` is 1 where image 0 wins, `prob` the soft probability that image 0 is better, `keep` False for dropped
    pairs. Scoring time on the critical path (starting it, then waiting for it) is added to
    `metrics.scoring_seconds`.
    """
    import time

    human = batch["label_0"].float().cpu() if args.label_0_column is not None else None
    if args.precomputed_consensus:
        label = batch["consensus_label"].float().cpu()
        prob = batch["consensus_prob"].float().cpu()
        keep = torch.isfinite(label) & torch.isfinite(prob)
        metrics.add("dropped_share", (~keep).sum(), keep.numel())
        return torch.nan_to_num(label, nan=0.5), torch.nan_to_num(prob, nan=0.5), keep

    scores_0 = {m: torch.empty(0) for m in args.scored_metrics}
    scores_1 = {m: torch.empty(0) for m in args.scored_metrics}
    pending = batch.get("pending_scores") or start_scoring(args, batch, scorer_set)
    if pending is not None:
        start = time.perf_counter()
        scores_0, scores_1 = pending.result()
        metrics.scoring_seconds += pending.host_seconds + time.perf_counter() - start
    result = consensus_across_processes(accelerator, labeler, scores_0, scores_1, human)
    metrics.add_consensus(result, human)
    return result.label.float().cpu(), result.prob.float().cpu(), result.keep.bool().cpu()


def no_pairs_on_some_process(accelerator, keep):
    """True when this micro-batch must be skipped: some process has no pair left to train on.

    Every process must take the same decision (a process that skipped the backward alone would hang the DDP
    all-reduce), so a micro-batch is skipped everywhere as soon as one process has no kept pair. That is rare
    (every pair of a local batch dropped or unreadable) and only costs that micro-batch.
    """
    if accelerator.num_processes == 1:
        return not bool(keep.any())  # `keep` is on the CPU: no device synchronisation
    kept = torch.tensor([float(keep.sum())], device=accelerator.device)
    return accelerator.gather(kept).min().item() == 0


def kept_pairs(keep):
    """Indices of the pairs to train on (the consensus kept them) and their loss weights."""
    index = keep.nonzero().squeeze(1)
    return index, torch.ones(index.numel())


def diffusion_dpo_loss(
    args,
    unet,
    unwrapped_unet,
    latents,
    unet_kwargs,
    noise_scheduler,
    label,
    prob,
    weights,
    dynamic_reference,
    metrics,
    timesteps=None,
    generator=None,
):
    """The Diffusion-DPO micro-step on winner-first, loser-second `latents` ([2P, C, H, W]).

    Both images of a pair get the same noise and timestep. `unet_kwargs` holds the (already doubled) conditioning:
    `encoder_hidden_states` and, for SDXL, `added_cond_kwargs`. `timesteps` ([P]) may be given (SDXL-Turbo's grid);
    otherwise they are uniform over the training schedule. `generator` (see `training_generator`) draws the noise
    and timesteps. Returns the weighted mean loss.
    """
    device = latents.device
    num_pairs = latents.shape[0] // 2
    noise = torch.randn(
        (num_pairs, *latents.shape[1:]), generator=generator, device=device, dtype=latents.dtype
    ).repeat(2, 1, 1, 1)
    if timesteps is None:
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (num_pairs,), generator=generator, device=device
        )
    timesteps = timesteps.long().to(device).repeat(2)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")

    model_pred = unet(noisy_latents, timesteps, return_dict=False, **unet_kwargs)[0]
    model_err_w, model_err_l = per_example_mse(model_pred, target).chunk(2)
    with reference_model(unwrapped_unet, dynamic_reference):
        ref_pred = unwrapped_unet(noisy_latents, timesteps, return_dict=False, **unet_kwargs)[0]
        ref_err_w, ref_err_l = per_example_mse(ref_pred, target).chunk(2)

    winner_prob = winner_probability(label, prob).to(device) if args.label_mode == "soft" else None
    losses, h = dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, args.beta_dpo, args.loss_type, winner_prob)
    weights = weights.to(device)
    loss = (losses * weights).sum() / weights.sum().clamp(min=1.0)
    kept = weights > 0
    if kept.any():
        metrics.add_pairs(losses[kept], h[kept], (model_err_w - model_err_l)[kept], (ref_err_w - ref_err_l)[kept])
    return loss
