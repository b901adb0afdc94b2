# Copyright 2026 The BalancedDPO authors and The HuggingFace Inc. team. All rights reserved.
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
"""The BalancedDPO training run every model family shares.

A family script (`train_balanced_dpo.py` for SD 1.x/2.x, `train_balanced_dpo_sdxl.py` for SDXL, ...) defines a
`ModelFamily` with what is its own: loading its models, its text conditioning, its noise and target, its validation
pipeline. It then calls `train(args, Family)`, and everything else happens here, once:

- `DPOTrainer`: one optimizer step. The consensus labels each micro-batch, `pair_losses` computes the DPO loss of the
  kept pairs (the loss, in one function), `accumulate` runs their backward, and `optimizer_step` reduces the
  gradients of every process and micro-batch so that each kept pair weighs the same, then clips and steps (or skips a
  non-finite step; under fp16 the gradient scaler decides).
- `micro_batches`: groups batches into optimizer steps, agreed by every process, and honours a stop signal between
  any two micro-batches.
- `train`: the run top to bottom: accelerator and trackers, data (or online rounds, `online.py`), models and LoRA,
  scorers, optimizer, checkpoints, the loop, the final LoRA, validation, model card and Hub upload.

The arguments and their checks are in `training_args.py`, checkpoints and the saved run state in `run_state.py`, the
loss and the reference model in `balanced_dpo.py`, the consensus in `rewards.py`, the data pipeline in
`preference_data.py`.
"""

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from accelerate.logging import get_logger

import balanced_dpo
import preference_data
from run_state import (
    GracefulStop,
    RunState,
    TrainingProgress,
    check_finite_lora,
    ignore_stop_signals,
    record_bad_examples,
    resolve_resume_checkpoint,
    save_checkpoint,
    training_generator,
)
from training_args import (
    FAMILY_DEFAULTS,
    PRECOMPUTED_COLUMNS,
    read_validation_prompts,
    tracker_config,
    upload_ignore_patterns,
    validate_args,
)


logger = get_logger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# What a model family brings
# ----------------------------------------------------------------------------------------------------------------


class ModelFamily:
    """The parts of one model family (SD 1.x/2.x, SDXL, ...) that the shared loop calls.

    A subclass sets the class attributes, loads its models in `from_pretrained` (or receives them in `__init__`, as
    the benchmark does) and implements the methods marked as such. The instance holds `denoiser` (the model that
    gets the LoRA: a UNet or a transformer), `vae` and `weight_dtype`.
    """

    # The diffusers pipeline: `save_lora_weights` / `lora_state_dict` / `from_pretrained` for validation.
    pipeline_class = None
    # What the denoiser is called in the pipeline and in the saved LoRA's keys ("unet" or "transformer").
    denoiser_name = "unet"
    # UNet LoRAs are saved in diffusers' key format, transformer LoRAs in peft's, as diffusers' own scripts do.
    lora_in_diffusers_format = True
    # Defaults of the shared arguments that differ between families.
    defaults = FAMILY_DEFAULTS
    model_card_tags = ()
    description = "a text-to-image diffusion model"

    def __init__(self, args, denoiser, vae, weight_dtype):
        self.args = args
        self.denoiser = denoiser
        self.vae = vae
        self.weight_dtype = weight_dtype

    # -- arguments and loading: the family's own ------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser):
        """Arguments only this family has."""

    @classmethod
    def validate_args(cls, args):
        """Checks of this family's arguments that need no model (raise ValueError)."""

    @classmethod
    def from_pretrained(cls, args, device, weight_dtype):
        """Loads the family's models from `args.pretrained_model_name_or_path`, frozen and on `device`."""
        raise NotImplementedError

    def prepare(self, train_dataset, streaming, prompts=()):
        """Called once before training, after the data is loaded (e.g. to cache text embeddings). An online run
        (`--online_prompts`) has no dataset: `train_dataset` is None and `prompts` are the prompts it samples from."""

    def tokenize_fn(self):
        """Picklable `list[str] -> dict[str, Tensor]` run by the collator in the DataLoader workers, or None."""
        return None

    # -- one micro-step: the family's own ---------------------------------------------------------------------------

    def scale_latents(self, latents):
        """VAE latents -> the denoiser's latent space: (x - shift_factor) * scaling_factor."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def conditioning(self, batch, index, label):
        """The denoiser's conditioning of the pairs `index` of `batch`, doubled to match the winner-first latents
        ([2P, ...]; `label` says which image of each pair is the winner)."""
        raise NotImplementedError

    def noised_pairs(self, latents, generator):
        """`balanced_dpo.NoisedPairs` of winner-first latents: the same noise and timestep for both images of a pair,
        drawn with `generator`."""
        raise NotImplementedError

    def predict(self, model, noised, conditioning):
        """The denoiser's prediction for `noised` (what `noised.target` is compared with)."""
        raise NotImplementedError

    # -- saving and validation ---------------------------------------------------------------------------------------

    def save_lora_weights(self, output_dir, lora_state, metadata):
        name = self.denoiser_name
        self.pipeline_class.save_lora_weights(
            output_dir, **{f"{name}_lora_layers": lora_state, f"{name}_lora_adapter_metadata": metadata}
        )

    def lora_state_dict(self, input_dir):
        # An explicit weight name: diffusers < 0.40 refuses to guess it offline, even for a local folder.
        state = self.pipeline_class.lora_state_dict(input_dir, weight_name=LORA_WEIGHTS_NAME)
        return state[0] if isinstance(state, tuple) else state

    def validation_pipeline(self, lora_dir=None):
        """A pipeline for validation images: with the training denoiser (LoRA on) or, with `lora_dir`, the base model
        and the saved LoRA. Reuses the frozen training components where it can."""
        raise NotImplementedError

    def validation_call_kwargs(self):
        """Extra keyword arguments of the validation pipeline call (steps, guidance)."""
        steps = self.args.validation_inference_steps or self.defaults["validation_inference_steps"]
        return {"num_inference_steps": steps}

    # -- sampling with the policy (online pairs): the base implementations serve every pipeline that returns latents
    # in the denoiser's space with output_type="latent"; a family with packed latents overrides them ------------------

    def sample_latents(self, pipeline, prompts, generators, num_inference_steps, guidance_scale):
        """Final latents [N, ...] of `pipeline` (built by `validation_pipeline()`, so the training denoiser with the
        policy LoRA on) for `prompts`, one generator per prompt, in the space training starts from: what
        `scale_latents(vae sample)` gives for an image."""
        return pipeline(
            list(prompts),
            generator=list(generators),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=self.args.resolution,
            width=self.args.resolution,
            output_type="latent",
        ).images

    @torch.no_grad()
    def decode_latents(self, latents):
        """PIL images of latents in the denoiser's space (the inverse of `scale_latents`, then the VAE decoder)."""
        from diffusers.image_processor import VaeImageProcessor

        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        pixels = self.vae.decode((latents / self.vae.config.scaling_factor + shift).to(self.vae.dtype)).sample
        return VaeImageProcessor().postprocess(pixels.float(), output_type="pil")

    def release_denoiser(self):
        """Drops the training denoiser before the final validation, which loads the saved LoRA into a fresh one."""
        self.denoiser = None

    def license(self):
        """The model card licence: the base model's, when its model card says, else this family's."""
        return self.license_fields()["license"]

    def license_fields(self):
        """`license` (and, for `license: other`, `license_name` and `license_link`) of the model card: the base
        model card's, when it has a licence, else this family's (`default_license_fields`)."""
        fields, default = base_model_license_fields(self.args), self.default_license_fields()
        if not fields:
            return default
        if "license_link" not in fields and default.get("license_link"):
            if fields.get("license_name") == default.get("license_name"):
                fields["license_link"] = default["license_link"]  # a local copy of a card with a relative link
        return fields

    def default_license(self):
        return "creativeml-openrail-m"

    def default_license_fields(self):
        return {"license": self.default_license()}

    def model_card_notes(self):
        """Family-specific lines of the model card."""
        return ""

    def usage_snippet(self, repo_id):
        """How to use the LoRA, for the model card."""
        return f"""```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{self.args.pretrained_model_name_or_path}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{repo_id}")
image = pipe("a photo of an astronaut riding a horse").images[0]
```"""


def base_model_license(args):
    """The `license` of the base model's card (README.md of a local folder, or of the Hub repo when online)."""
    fields = base_model_license_fields(args)
    return fields["license"] if fields else None


def base_model_license_fields(args):
    """`{"license": ..., "license_name": ..., "license_link": ...}` of the base model's card (README.md of a local
    folder, or of the Hub repo when online), the last two only where the card has them; None when the card names no
    licence. A relative `license_link` of a Hub repo becomes its address on the Hub, so that it still leads to the
    licence from the LoRA's own repo."""
    path = args.pretrained_model_name_or_path
    card = os.path.join(path, "README.md")
    try:
        from huggingface_hub import ModelCard

        if os.path.isfile(card):
            data = ModelCard.load(card).data
        elif os.path.isdir(path) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            return None
        else:
            data = ModelCard.load(path, token=args.hub_token).data
    except Exception:  # noqa: BLE001 - the card is only a courtesy; never fail a finished run over it
        return None
    license_ = getattr(data, "license", None)
    if not isinstance(license_, str) or not license_:
        return None
    fields = {"license": license_}
    for key in ("license_name", "license_link"):
        value = getattr(data, key, None)
        if isinstance(value, str) and value:
            fields[key] = value
    link = fields.get("license_link")
    if link and "://" not in link:
        if os.path.isdir(path):
            del fields["license_link"]  # relative to a repo this local folder does not name
        else:
            fields["license_link"] = f"https://huggingface.co/{path}/blob/main/{link.lstrip('./')}"
    return fields


# ----------------------------------------------------------------------------------------------------------------
# What is logged once per optimizer step
# ----------------------------------------------------------------------------------------------------------------


class StepMetrics:
    """Sums per-pair statistics over the micro-batches of one optimizer step, then reduces them across processes.

    Sums (not means) are accumulated so that the logged means weigh every pair equally, whatever the number of pairs
    of each process and micro-batch; the logged `loss` is therefore the loss the step optimised. The names are fixed
    when the run starts, so that every process reduces the same tensor even when some had no pair to train on.
    Sums of device tensors stay on the device until `reduce` (no synchronisation per micro-batch).
    """

    PAIR_NAMES = ("loss", "implicit_acc", "model_diff", "ref_diff")

    def __init__(self, voters=(), human_label=False):
        names = list(self.PAIR_NAMES) + ["dropped_share", "consensus_agreement"]
        names += [f"agreement/{voter}" for voter in voters]
        if human_label:
            names.append("differs_from_human")
        self.names = names
        self._index = {name: i for i, name in enumerate(names)}
        self.reset()

    def reset(self):
        self._host = torch.zeros(len(self.names), 2, dtype=torch.float64)
        self._device = None
        self.scoring_seconds = 0.0
        self.step_seconds = 0.0

    def add(self, name, total, count):
        if name not in self._index:
            return  # a voter that is not logged (e.g. a metric scored only for validation)
        row = self._index[name]
        if isinstance(total, torch.Tensor) and total.device.type != "cpu":
            if self._device is None:
                self._device = torch.zeros(len(self.names), 2, dtype=torch.float64, device=total.device)
            self._device[row, 0] += total.detach().double()
            self._device[row, 1] += float(count)
        else:
            self._host[row, 0] += float(total)
            self._host[row, 1] += float(count)

    def add_pairs(self, loss, h, model_diff, ref_diff):
        n = h.numel()
        self.add("loss", loss.detach().float().sum(), n)
        accuracy = (h > 0).float() + 0.5 * (h == 0).float()
        self.add("implicit_acc", accuracy.sum(), n)
        self.add("model_diff", model_diff.detach().float().sum(), n)
        self.add("ref_diff", ref_diff.detach().float().sum(), n)

    def add_consensus(self, result, keep, human_label=None):
        """Per-voter agreement with the consensus and the share that differs from the human label, over the pairs
        `keep` trains on; `dropped_share` over all pairs."""
        label = result.label.cpu()
        self.add("dropped_share", (~keep).sum(), keep.numel())
        kept = int(keep.sum())
        if kept == 0:
            return
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
        values = self._host.to(accelerator.device)
        if self._device is not None:
            values = values + self._device.to(accelerator.device)
        timing = torch.tensor([[self.scoring_seconds, self.step_seconds]], dtype=torch.float64)
        values = torch.cat([values, timing.to(accelerator.device)])
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="sum")
        values = values.cpu()
        logs = {name: v / n for name, (v, n) in zip(self.names, values[:-1].tolist()) if n > 0}
        scoring, step = values[-1].tolist()
        if step > 0:
            logs["scoring_time_share"] = scoring / step
        return logs


# ----------------------------------------------------------------------------------------------------------------
# Latents: the VAE encoding of the winner-first images, optionally cached (--cache_latents)
# ----------------------------------------------------------------------------------------------------------------


def encode_latents(vae, pixel_values, batch_size, generator=None):
    """VAE latent samples (drawn with `generator`, not yet scaled), encoded in chunks of `batch_size`."""
    latents = [
        vae.encode(pixel_values[i : i + batch_size]).latent_dist.sample(generator=generator)
        for i in range(0, pixel_values.shape[0], batch_size)
    ]
    return torch.cat(latents)


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
        return torch.cat(latents)


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


def make_latent_cache(args, vae, pairs, num_processes):
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


# ----------------------------------------------------------------------------------------------------------------
# Scorers and the consensus labeler
# ----------------------------------------------------------------------------------------------------------------


def build_scorer_set(args, plan, device):
    """The reward models scored live (and for --score_validation), or None when nothing is scored."""
    if not plan.scored_metrics and not args.score_validation:
        return None
    import rewards

    return rewards.build_scorers(
        plan.scored_metrics or plan.reward_models,
        config=args.reward_config,
        device=device,
        dtype=args.scorer_dtype or rewards.default_scorer_dtype(device),
        offload=args.offload_scorers,
        cuda_graphs=not args.no_scorer_cuda_graphs,
    )


def make_labeler(args, scorer_set):
    """The run's `rewards.ConsensusLabeler` from the consensus arguments (None with `--precomputed_consensus`)."""
    if args.precomputed_consensus:
        return None
    import rewards

    return rewards.ConsensusLabeler.from_args(
        args,
        scorer_set.temperatures if scorer_set is not None else None,
        scorer_set.weights if scorer_set is not None else None,
    )


def logged_voters(args, plan):
    """The voters whose agreement with the consensus is logged."""
    if args.precomputed_consensus:
        return []
    voters = list(plan.scored_metrics)
    if args.human_vote or (args.consensus == "human" and not plan.scored_metrics):
        voters.append("human")
    return voters


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step: consensus, the loss of the kept pairs, backward, gradient reduction, clipping, step
# ----------------------------------------------------------------------------------------------------------------

# Per-step counters, summed over micro-batches and processes: pairs trained, non-finite losses, pairs read, and why
# the others were not trained (unreadable rows, human ties skipped by --drop_human_ties, precomputed labels that are
# NaN, then the consensus' own reasons, rewards.DROP_REASONS).
_STEP_COUNTERS = ("pairs", "nonfinite_loss", "rows", "unreadable", "skipped_human_tie", "no_precomputed_label")


def step_counter_names():
    import rewards

    return _STEP_COUNTERS + tuple(rewards.DROP_REASONS)


@dataclasses.dataclass
class PairLabels:
    """The consensus of this process's pairs of one micro-batch (CPU tensors)."""

    label: torch.Tensor  # 1 where image 0 wins
    prob: torch.Tensor  # probability that image 0 is the better image (the soft target)
    keep: torch.Tensor  # False for dropped pairs
    drops: Dict[str, int]  # why the dropped pairs were dropped


@dataclasses.dataclass
class StepOutcome:
    """What one optimizer step did, the same on every process."""

    status: str  # "stepped", "empty" (no pair to train on), "nonfinite_loss", "nonfinite_gradient", "fp16_overflow"
    pairs: int  # pairs trained on, over every process and micro-batch
    rows: int  # pairs read
    drops: Dict[str, int]  # why the other pairs were not trained on
    grad_norm: Optional[float] = None
    loss_scale: Optional[float] = None
    logs: Dict[str, float] = dataclasses.field(default_factory=dict)  # StepMetrics means (not for empty steps)
    scoring_seconds: float = 0.0  # this process's scoring time on the critical path of the step

    @property
    def counts_as_step(self):
        """Every step but an empty one advances the run (a skipped step is a step the optimizer did not take)."""
        return self.status != "empty"


class DPOTrainer:
    """One optimizer step of BalancedDPO, the same for every model family (and what the benchmark times).

    For each micro-batch, `consensus` labels the pairs and `accumulate` runs the backward of the kept ones;
    `optimizer_step` then sums the gradients over the micro-batches and processes, divides them by the number of
    pairs trained on in all, so that every kept pair weighs the same whichever process or micro-batch it came from,
    and steps. A process without a kept pair contributes nothing and waits for no one: the gradients are reduced once
    per optimizer step, not by DDP in the backward. The logged loss is the mean over the same pairs, the loss the step
    optimised.
    """

    def __init__(
        self,
        *,
        args,
        plan,
        accelerator,
        family,
        params,
        optimizer,
        lr_scheduler,
        generator,
        scorer_set=None,
        labeler=None,
        latent_cache=None,
    ):
        self.args = args
        self.plan = plan
        self.accelerator = accelerator
        self.family = family
        self.params = params
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.generator = generator
        self.scorer_set = scorer_set
        self.labeler = labeler
        self.latent_cache = latent_cache
        # Losses are summed, then divided by the pairs of the whole step. Dividing by the nominal number first keeps
        # the backward's magnitudes those of a mean (which matters to fp16's gradient scaler).
        self.nominal_pairs = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        self.counter_names = step_counter_names()
        self.metrics = StepMetrics(
            voters=logged_voters(args, plan),
            human_label=args.label_0_column is not None and not args.precomputed_consensus,
        )
        self.reset_step()

    def reset_step(self):
        """Forgets the micro-batches accumulated so far (after a step, or when a partial step is abandoned)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._counts = dict.fromkeys(self.counter_names, 0)
        self._finite = None  # device flag: every loss of the step is finite
        self.metrics.reset()
        self._step_start = time.perf_counter()

    # -- labels -------------------------------------------------------------------------------------------------

    def start_scoring(self, batch):
        """Starts the live scoring of the batch's pairs (asynchronous on CUDA): see `--no_score_ahead`."""
        if self.args.precomputed_consensus or not self.plan.scored_metrics or batch["batch_size"] == 0:
            return
        if batch.get("online"):
            return
        batch["pending_scores"] = self.scorer_set.score_pairs_async(batch["scorer_inputs"], list(batch["captions"]))

    def consensus(self, batch):
        """PairLabels of the batch: from the precomputed columns, or live scoring and the `rewards` consensus, decided
        on the pairs of every process at once. Scoring time on the critical path is added to
        `metrics.scoring_seconds`."""
        args = self.args
        human = batch["label_0"].float().cpu() if args.label_0_column is not None else None
        if batch.get("online"):
            # Online pairs were labelled when their round was generated (online.OnlineRounds).
            keep = torch.ones(batch["batch_size"], dtype=torch.bool)
            return PairLabels(batch["consensus_label"].float().cpu(), batch["consensus_prob"].float().cpu(), keep, {})
        if args.precomputed_consensus:
            if batch["batch_size"] == 0:
                empty = torch.zeros(0)
                return PairLabels(empty, empty, empty.bool(), {})
            label = batch["consensus_label"].float().cpu()
            prob = batch["consensus_prob"].float().cpu()
            keep = torch.isfinite(label) & torch.isfinite(prob)
            self.metrics.add("dropped_share", (~keep).sum(), keep.numel())
            return PairLabels(
                torch.nan_to_num(label, nan=0.5),
                torch.nan_to_num(prob, nan=0.5),
                keep,
                {"no_precomputed_label": int((~keep).sum())},
            )

        scores_0 = {m: torch.empty(0) for m in self.plan.scored_metrics}
        scores_1 = {m: torch.empty(0) for m in self.plan.scored_metrics}
        if batch.get("pending_scores") is None:
            self.start_scoring(batch)  # not scored ahead (--no_score_ahead)
        pending = batch.pop("pending_scores", None)
        if pending is not None:
            start = time.perf_counter()
            scores_0, scores_1 = pending.result()
            self.metrics.scoring_seconds += pending.host_seconds + time.perf_counter() - start
        result = balanced_dpo.consensus_across_processes(self.accelerator, self.labeler, scores_0, scores_1, human)
        keep = result.keep.bool().cpu()
        self.metrics.add_consensus(result, keep, human)
        return PairLabels(result.label.float().cpu(), result.prob.float().cpu(), keep, result.drop_reasons())

    # -- the loss -----------------------------------------------------------------------------------------------

    def encode_pair_latents(self, batch, index, label):
        """Latents of the winner-first feed [2P, ...] in the denoiser's space, through the latent cache if any."""
        vae = self.family.vae

        def take(key):
            return batch[key][index.to(batch[key].device)]

        if "latents_0" in batch:  # generated pairs: the sampled latents are the training latents
            latents = balanced_dpo.order_by_label(take("latents_0"), take("latents_1"), label)
            return latents.to(self.accelerator.device, dtype=self.family.weight_dtype)
        pixels = balanced_dpo.order_by_label(take("pixel_values_0"), take("pixel_values_1"), label)
        pixels = pixels.to(self.accelerator.device, dtype=vae.dtype)
        batch_size = self.args.vae_encode_batch_size
        with torch.no_grad():
            if self.latent_cache is None:
                latents = encode_latents(vae, pixels, batch_size, self.generator)
            else:
                keys = latent_cache_keys(batch, index, label)
                latents = self.latent_cache.encode(vae, pixels, keys, batch_size, self.generator)
            return self.family.scale_latents(latents).to(self.family.weight_dtype)

    def pair_losses(self, batch, index, label, prob):
        """The BalancedDPO loss of the pairs `index` of `batch` ([P]), winner and loser as the consensus says.

        Both images of a pair get the same noise and timestep; the policy (LoRA on) and the reference (base model,
        or the frozen reference adapter) see the same inputs; the errors are averaged over channels and pixels; then
        `balanced_dpo.dpo_loss`, with the consensus probability as the soft target under `--label_mode soft`.
        """
        family = self.family
        latents = self.encode_pair_latents(batch, index, label)
        with torch.no_grad():
            conditioning = family.conditioning(batch, index, label)
        noised = family.noised_pairs(latents, self.generator)
        with self.accelerator.autocast():
            prediction = family.predict(family.denoiser, noised, conditioning)
            with balanced_dpo.reference_model(family.denoiser, self.plan.dynamic_reference):
                reference = family.predict(family.denoiser, noised, conditioning)
        model_err_w, model_err_l = balanced_dpo.per_example_mse(prediction, noised.target, noised.weighting).chunk(2)
        ref_err_w, ref_err_l = balanced_dpo.per_example_mse(reference, noised.target, noised.weighting).chunk(2)
        winner_prob = None
        if self.args.label_mode == "soft":
            winner_prob = balanced_dpo.winner_probability(label, prob).to(model_err_w.device)
        losses, h = balanced_dpo.dpo_loss(
            model_err_w, model_err_l, ref_err_w, ref_err_l, self.args.beta_dpo, self.args.loss_type, winner_prob
        )
        self.metrics.add_pairs(losses, h, model_err_w - model_err_l, ref_err_w - ref_err_l)
        return losses

    def accumulate(self, batch, labels):
        """Backward of the kept pairs of one micro-batch (nothing when there are none). Returns how many."""
        counts = self._counts
        counts["rows"] += int(batch["num_rows"])
        counts["unreadable"] += len(batch["bad_examples"])
        counts["skipped_human_tie"] += int(batch["skipped_examples"])
        for reason, count in labels.drops.items():
            counts[reason] += int(count)
        index = labels.keep.nonzero().squeeze(1)
        if index.numel() == 0:
            return 0
        loss = self.pair_losses(batch, index, labels.label[index], labels.prob[index]).sum()
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        self.accelerator.backward(loss / self.nominal_pairs)
        counts["pairs"] += index.numel()
        return index.numel()

    # -- the optimizer step -------------------------------------------------------------------------------------

    def _reduce(self):
        """Sums the gradients and counters of every process (one collective); returns the global counters."""
        accelerator = self.accelerator
        counts = torch.tensor([float(self._counts[n]) for n in self.counter_names], dtype=torch.float32)
        nonfinite = self.counter_names.index("nonfinite_loss")
        if accelerator.num_processes == 1:
            if self._finite is not None:
                counts[nonfinite] = float(not bool(self._finite))  # the step's one synchronisation
            return dict(zip(self.counter_names, counts.tolist()))
        device = accelerator.device
        tail = counts.to(device)
        if self._finite is not None:
            tail[nonfinite] = (~self._finite).float()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = accelerator.reduce(torch.cat([g.reshape(-1).float() for g in grads] + [tail]), reduction="sum")
        offset = 0
        for param in self.params:
            param.grad = flat[offset : offset + param.numel()].view_as(param).to(param.dtype)
            offset += param.numel()
        return dict(zip(self.counter_names, flat[offset:].tolist()))

    def optimizer_step(self):
        """Reduces, clips and steps (see the class docstring). Returns the StepOutcome, the same on every process."""
        accelerator = self.accelerator
        counts = self._reduce()
        pairs, rows = int(counts["pairs"]), int(counts["rows"])
        drops = {k: int(v) for k, v in counts.items() if k not in ("pairs", "nonfinite_loss", "rows") and v}
        outcome = StepOutcome(status="stepped", pairs=pairs, rows=rows, drops=drops)
        if pairs == 0:
            outcome.status = "empty"
        elif counts["nonfinite_loss"] > 0:
            outcome.status = "nonfinite_loss"
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, self.nominal_pairs / pairs)
            grad_norm = accelerator.clip_grad_norm_(self.params, self.args.max_grad_norm)
            if accelerator.scaler is not None:
                # fp16: the scaler skips the step on an overflow and lowers its scale, as in diffusers' examples.
                self.optimizer.step()
                self.lr_scheduler.step()
                if accelerator.optimizer_step_was_skipped:
                    outcome.status = "fp16_overflow"
                outcome.loss_scale = float(accelerator.scaler.get_scale())
                outcome.grad_norm = float(grad_norm)
            else:
                outcome.grad_norm = float(grad_norm)
                if math.isfinite(outcome.grad_norm):
                    self.optimizer.step()
                    self.lr_scheduler.step()
                else:
                    outcome.status = "nonfinite_gradient"
        outcome.scoring_seconds = self.metrics.scoring_seconds
        if outcome.counts_as_step:
            self.metrics.step_seconds = time.perf_counter() - self._step_start
            outcome.logs = self.metrics.reduce(accelerator)
        self.reset_step()
        return outcome


# ----------------------------------------------------------------------------------------------------------------
# Validation images and the model card
# ----------------------------------------------------------------------------------------------------------------


def log_validation(args, accelerator, family, step, prompts, scorer_set=None, lora_dir=None):
    """Generates `--num_validation_images` images per prompt with the LoRA and, when scoring, with the base model
    from the same seeds; logs them and the mean scores. Returns (images, {metric: (base mean, lora mean)})."""
    logger.info(f"Running validation on {len(prompts)} prompts")
    pipeline = family.validation_pipeline(lora_dir=lora_dir).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    call_kwargs = family.validation_call_kwargs()
    repeated = [p for p in prompts for _ in range(args.num_validation_images)]
    training = family.denoiser is not None and lora_dir is None and family.denoiser.training

    def generate():
        images = []
        for i, prompt in enumerate(prompts):
            for j in range(args.num_validation_images):
                seed = (args.seed if args.seed is not None else 0) + i * 1000 + j
                generator = torch.Generator(device=accelerator.device).manual_seed(seed)
                images.append(
                    pipeline(
                        prompt, generator=generator, height=args.resolution, width=args.resolution, **call_kwargs
                    ).images[0]
                )
        return images

    if training:
        family.denoiser.eval()
    try:
        lora_images = generate()
        scores = {}
        if scorer_set is not None:
            if lora_dir is not None:
                pipeline.disable_lora()
                base_images = generate()
                pipeline.enable_lora()
            else:
                with balanced_dpo.reference_model(family.denoiser, dynamic_reference=False):
                    base_images = generate()
            lora_scores = scorer_set.score(lora_images, repeated)
            base_scores = scorer_set.score(base_images, repeated)
            scores = {m: (base_scores[m].mean().item(), lora_scores[m].mean().item()) for m in lora_scores}
            logger.info(
                "Validation scores (base -> LoRA): "
                + ", ".join(f"{m} {b:.4f} -> {l:.4f}" for m, (b, l) in scores.items())
            )
    finally:
        if training:
            family.denoiser.train()

    tracker_key = "test" if lora_dir is not None else "validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            np_images = np.stack([np.asarray(img) for img in lora_images])
            tracker.writer.add_images(tracker_key, np_images, step, dataformats="NHWC")
        if tracker.name == "wandb":
            import wandb

            tracker.log({tracker_key: [wandb.Image(img, caption=p) for img, p in zip(lora_images, repeated)]})
    if scores:
        accelerator.log(
            {f"{tracker_key}/{metric}_{which}": value for metric, pair in scores.items()
             for which, value in zip(("base", "lora"), pair)},
            step=step,
        )  # fmt: skip
    return lora_images, scores


def save_model_card(args, family, repo_id, images=None, validation_scores=None, repo_folder=None):
    """Writes the model card (README.md) of the LoRA: base model, data, consensus settings, scores and usage."""
    from huggingface_hub import ModelCard, ModelCardData

    img_str = ""
    for i, image in enumerate(images or []):
        image.save(os.path.join(repo_folder, f"image_{i}.png"))
        img_str += f"![img_{i}](./image_{i}.png)\n"
    scores_str = ""
    if validation_scores:
        scores_str = (
            "\n## Validation scores (mean over the validation prompts)\n\n| metric | base | LoRA |\n|---|---|---|\n"
        )
        for metric, (base, lora) in validation_scores.items():
            scores_str += f"| {metric} | {base:.4f} | {lora:.4f} |\n"
    consensus = "precomputed (`rewards.py label`)" if args.precomputed_consensus else args.consensus
    metrics = args.reward_models if not args.precomputed_consensus else "from the dataset"
    data = args.dataset_name or args.train_data_dir
    if args.online_prompts:
        data = (
            f"pairs the policy generated online from the prompts `{args.online_prompts}` ({args.online_images_per_prompt}"
            f" images per prompt, `{args.online_pair_selection}` pairs)"
        )
    model_description = f"""
# BalancedDPO LoRA - {repo_id}

LoRA weights for **{args.pretrained_model_name_or_path}**, trained with BalancedDPO (Diffusion-DPO with a
multi-metric consensus label) on **{data}** at {args.resolution} px.

- consensus: `{consensus}`, metrics: `{metrics}`,
  tie policy `{args.tie_policy}`, abstain margin {args.abstain_margin}, min agreement {args.min_agreement},
  human vote: {args.human_vote}, label mode `{args.label_mode}`
- loss `{args.loss_type}`, beta {args.beta_dpo}, reference updates every {args.ref_update_steps} steps
  ({args.ref_update_mode}), LoRA rank {args.rank}, learning rate {args.learning_rate},
  {args.max_train_steps} steps of {args.train_batch_size} pairs x {args.gradient_accumulation_steps} accumulation
{family.model_card_notes()}{scores_str}
{img_str}

## How to use

{family.usage_snippet(repo_id)}
"""
    # Built locally (no Hub round trip), so offline runs and runs without --push_to_hub get the same card.
    card_data = ModelCardData(
        **family.license_fields(),
        base_model=args.pretrained_model_name_or_path,
        library_name="diffusers",
        inference=True,
        tags=[
            "text-to-image",
            "diffusers",
            "diffusers-training",
            "lora",
            "dpo",
            "balanced-dpo",
            *family.model_card_tags,
        ],
    )
    model_card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{model_description}")
    model_card.save(os.path.join(repo_folder, "README.md"))


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


class RunStopped(RuntimeError):
    """The run cannot make progress: raised, after the last completed step was checkpointed, with what to change."""


def dropped_pairs_message(args, rows, drops, what):
    """Why no pair was trained on: the counts of each drop reason and the argument to change for each."""
    hints = {
        "unreadable": "unreadable rows (fix the data or the column flags; see the warnings above)",
        "skipped_human_tie": "human ties skipped by --drop_human_ties",
        "no_precomputed_label": "no label in the precomputed consensus columns (rerun `rewards.py label` with other"
        " consensus settings, or train with a live consensus)",
        "human_tie": "human ties or unknown human labels (--consensus human trains on the human label alone)",
        "no_vote": "every metric abstained: the two images score the same (identical images?)"
        + (f" or within --abstain_margin {args.abstain_margin}" if args.abstain_margin > 0 else ""),
        "tie": f"the votes tied and --tie_policy {args.tie_policy} could not break the tie",
        "min_agreement": f"agreement below --min_agreement {args.min_agreement}",
    }
    reasons = "; ".join(f"{count} {hints.get(reason, reason)}" for reason, count in drops.items() if count)
    advice = []
    if drops.get("no_vote"):
        advice.append(
            "check that jpg_0 and jpg_1 hold different images"
            + (", lower --abstain_margin" if args.abstain_margin > 0 else "")
        )
    if drops.get("tie"):
        advice.append("use --tie_policy mean_prob or add metrics to --reward_models")
    if drops.get("min_agreement"):
        advice.append("lower --min_agreement")
    if drops.get("human_tie") or drops.get("skipped_human_tie"):
        advice.append("use a metric consensus (--consensus majority) or drop --drop_human_ties")
    advice_text = f" To train, {'; '.join(advice)}." if advice else ""
    return f"Every pair was dropped: no pair was kept in {what} ({rows} pairs read). Why: {reasons or 'unknown'}.{advice_text}"


def _agree(accelerator, *flags):
    """Each flag set on any process, as a tuple of bools on every process (one small collective)."""
    if accelerator.num_processes == 1:
        return tuple(bool(f) for f in flags)
    values = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return tuple(v > 0 for v in accelerator.reduce(values, reduction="max").tolist())


def micro_batches(loader, trainer, graceful_stop, score_ahead):
    """Yields (batch, closes_step, stop) for the batches of one epoch, agreed by every process.

    `closes_step` is True when the batch completes an optimizer step: after --gradient_accumulation_steps batches,
    or at the end of the epoch. The end is seen by looking one batch ahead on every process, so the grouping never
    depends on prefetching or on which process runs out first; the look-ahead is also where the scoring of the next
    batch starts (score-ahead). `stop` is True when a stop signal reached any process: the caller then abandons the
    step without using `batch`.
    """
    accelerator = trainer.accelerator
    accumulation = trainer.args.gradient_accumulation_steps
    iterator = iter(loader)
    upcoming = next(iterator, None)
    if upcoming is not None and score_ahead:
        trainer.start_scoring(upcoming)
    in_step = 0
    while True:
        current, upcoming = upcoming, None
        if current is not None:
            upcoming = next(iterator, None)
            if upcoming is not None and score_ahead:
                trainer.start_scoring(upcoming)
        stop, missing, last = _agree(accelerator, graceful_stop.requested_here, current is None, upcoming is None)
        if stop:
            yield current, False, True
            return
        if missing:
            return
        in_step += 1
        closes = in_step == accumulation or last
        yield current, closes, False
        if closes:
            in_step = 0
        if last:
            return


def make_pair_dataset(args, plan, train_dataset, scorer_set, accelerator):
    """The training items (decoded, jointly augmented pairs with their scorer inputs), map-style or streaming."""
    dataset_kwargs = {
        "transform": preference_data.PairTransform(
            args.resolution, center_crop=not args.random_crop, random_flip=not args.no_hflip
        ),
        "caption_column": args.caption_column,
        "image_0_column": args.image_0_column,
        "image_1_column": args.image_1_column,
        "label_0_column": args.label_0_column,
        "proportion_empty_prompts": args.proportion_empty_prompts,
        "drop_human_ties": args.drop_human_ties,
        "scorer_preprocessor": scorer_set.preprocessor if plan.scored_metrics else None,
        "seed": args.seed if args.seed is not None else 0,
        "extra_columns": PRECOMPUTED_COLUMNS if args.precomputed_consensus else (),
    }
    if args.streaming:
        return preference_data.StreamingPreferencePairs(
            train_dataset,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            split_by=args.streaming_split,
            **dataset_kwargs,
        )
    return preference_data.PreferencePairs(train_dataset, **dataset_kwargs)


def make_dataloader(args, pairs, family, accelerator):
    """Batches of pairs; decoding, augmentation, scorer preprocessing and tokenization run in the workers."""
    return torch.utils.data.DataLoader(
        pairs,
        batch_size=args.train_batch_size,
        shuffle=not args.streaming,
        collate_fn=preference_data.PairCollator(family.tokenize_fn(), resolution=args.resolution),
        num_workers=args.dataloader_num_workers,
        worker_init_fn=ignore_stop_signals,
        pin_memory=accelerator.device.type == "cuda",  # lets the scorer inputs reach the GPU asynchronously
        drop_last=False,
        # Its own generator, so creating an iterator never draws from the global RNG.
        generator=torch.Generator().manual_seed(args.seed if args.seed is not None else 0),
    )


def load_training_data(args, accelerator):
    """The preference dataset, its columns checked (before any model is loaded: a wrong name fails in seconds)."""
    with accelerator.main_process_first():
        train_dataset = preference_data.load_preference_dataset(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_data_dir=args.train_data_dir,
            split=args.dataset_split_name,
            streaming=args.streaming,
            cache_dir=args.cache_dir,
            shuffle_seed=args.seed,
            max_train_samples=args.max_train_samples,
        )
    preference_data.check_columns(
        train_dataset,
        args.caption_column,
        args.image_0_column,
        args.image_1_column,
        label_0_column=args.label_0_column,
        require_label=args.consensus == "human" or args.human_vote or args.drop_human_ties,
        extra_columns=PRECOMPUTED_COLUMNS if args.precomputed_consensus else (),
    )
    if not args.streaming and len(train_dataset) == 0:
        raise preference_data.DataError(f"The dataset {args.dataset_name or args.train_data_dir} has no rows.")
    return train_dataset


def add_lora(args, plan, family, accelerator):
    """Adds the LoRA adapters to the family's denoiser: the policy and, for a dynamic reference, the reference (both
    float32). Returns (trainable parameters, the adapter config saved with the LoRA)."""
    from peft import LoraConfig

    lora_config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.rank,
        lora_dropout=args.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=[m.strip() for m in args.lora_target_modules.split(",") if m.strip()],
    )
    params = balanced_dpo.add_lora_adapters(family.denoiser, lora_config, plan.dynamic_reference)
    if accelerator.num_processes > 1:
        # Without DDP (see DPOTrainer), every process starts from the main process's random LoRA initialisation.
        import torch.distributed as dist

        for param in params:
            dist.broadcast(param.data, src=0)
    # Saved with the LoRA so that `load_lora_weights` applies lora_alpha / rank, not 1.
    metadata = family.denoiser.peft_config[balanced_dpo.POLICY_ADAPTER].to_dict()
    return params, metadata


def make_optimizer(args, params):
    """AdamW, or bitsandbytes' AdamW8bit with --use_8bit_adam."""
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("To use 8-bit Adam, install bitsandbytes: `pip install bitsandbytes`.") from None
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def train(args, family_class):
    """A whole BalancedDPO run of `family_class` (see the module docstring). Returns the final LoRA's path, or None
    when the run was interrupted (a checkpoint was saved)."""
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    plan = validate_args(args, family_class)

    # 1. Accelerator, logging, output folder. Accumulation is counted here, not by accelerate (see DPOTrainer).
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if torch.backends.mps.is_available():
        accelerator.native_amp = False
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.seed is not None:
        set_seed(args.seed)
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id

    # 2. Data first: a wrong column name must fail before any model is loaded.
    train_dataset = None
    if plan.online:
        prompts, prompt_info = preference_data.load_prompts(
            args.online_prompts,
            args.online_prompt_column,
            args.online_prompt_split,
            args.online_max_prompts,
            cache_dir=args.cache_dir,
        )
        logger.info(
            f"Online pairs from {len(prompts)} prompts of {prompt_info['source']}"
            f" ({prompt_info.get('skipped', 0)} empty or undecodable prompts skipped)."
        )
    else:
        train_dataset = load_training_data(args, accelerator)

    # 3. Models, frozen, and the LoRA adapters (policy and, for a dynamic reference, the reference; both float32).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    family = family_class.from_pretrained(args, accelerator.device, weight_dtype)
    params_to_optimize, lora_metadata = add_lora(args, plan, family, accelerator)
    if args.enable_xformers_memory_efficient_attention:
        family.denoiser.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        family.denoiser.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # 4. Scorers and the consensus labeler; run state.
    scorer_set = build_scorer_set(args, plan, accelerator.device)
    labeler = make_labeler(args, scorer_set)
    bad_examples = preference_data.BadExampleTracker(plan.max_bad_examples, logger=logger)
    progress = TrainingProgress()
    generator = training_generator(accelerator, args.seed)
    run_state = RunState(progress, bad_examples, generator, labeler, accelerator.process_index)
    family.prepare(train_dataset, args.streaming, prompts if plan.online else ())

    # 5. Data pipeline: decoding, joint augmentation, scorer preprocessing and tokenization run in the workers.
    # Online, each round's pairs are generated by the policy instead (online.OnlineRounds).
    pairs = train_dataloader = rounds = None
    if plan.online:
        import online

        rounds = online.OnlineRounds(args, plan, accelerator, family, scorer_set, labeler, prompts)
    else:
        pairs = make_pair_dataset(args, plan, train_dataset, scorer_set, accelerator)
        train_dataloader = make_dataloader(args, pairs, family, accelerator)

    # 6. Optimizer and schedule.
    if args.scale_lr:
        args.learning_rate = (
            args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        )
    optimizer = make_optimizer(args, params_to_optimize)
    if train_dataloader is not None and not args.streaming:
        batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
        num_update_steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    if args.streaming or plan.online:
        # Streaming pairs shard themselves across processes (accelerate would read every row on every rank), and
        # online pairs are each process's own.
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    else:
        optimizer, train_dataloader, lr_scheduler = accelerator.prepare(optimizer, train_dataloader, lr_scheduler)
        num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    latent_cache = None if plan.online else make_latent_cache(args, family.vae, pairs, accelerator.num_processes)
    trainer = DPOTrainer(
        args=args,
        plan=plan,
        accelerator=accelerator,
        family=family,
        params=params_to_optimize,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        generator=generator,
        scorer_set=scorer_set,
        labeler=labeler,
        latent_cache=latent_cache,
    )

    # 7. Checkpoints hold the LoRA adapters (policy and reference), the optimizer, schedule and the run state.
    def save_model_hook(models, weights, output_dir):
        # Checked on every process, so that all of them stop together instead of waiting for the main one.
        lora_state = balanced_dpo.adapter_state_dict(
            family.denoiser, balanced_dpo.POLICY_ADAPTER, diffusers_format=family.lora_in_diffusers_format
        )
        check_finite_lora(lora_state, f"The LoRA of {os.path.basename(output_dir)}")
        if accelerator.is_main_process:
            family.save_lora_weights(output_dir, lora_state, lora_metadata)
            if plan.dynamic_reference:
                balanced_dpo.save_reference_adapter(
                    family.denoiser, output_dir, family.denoiser_name, family.lora_in_diffusers_format
                )
        run_state.save(output_dir)
        if rounds is not None:
            rounds.save(output_dir)
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            models.pop()
        lora_state = family.lora_state_dict(input_dir)
        balanced_dpo.load_adapter_state_dict(
            family.denoiser, lora_state, balanced_dpo.POLICY_ADAPTER, prefix=family.denoiser_name
        )
        if plan.dynamic_reference:
            balanced_dpo.load_reference_adapter(family.denoiser, input_dir, prefix=family.denoiser_name)
        balanced_dpo.cast_lora_to_float32(family.denoiser)
        balanced_dpo.freeze_all_but_policy(family.denoiser)
        run_state.load(input_dir)
        if rounds is not None:
            rounds.load(input_dir)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # 8. Trackers: the arguments without any credential.
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.tracker_name, config=tracker_config(args))

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Running BalancedDPO training ({family_class.description}) *****")
    logger.info(
        f"  Consensus = {'precomputed' if args.precomputed_consensus else args.consensus},"
        f" scored metrics = {plan.scored_metrics}"
    )
    logger.info(f"  Pairs per optimizer step = {total_batch_size}, optimizer steps = {args.max_train_steps}")

    resume_path = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"No checkpoint found in {args.output_dir}; starting a new training run.")
    if resume_path is not None:
        logger.info(f"Resuming from checkpoint {resume_path}")
        accelerator.load_state(resume_path)
    last_checkpoint = progress.global_step if resume_path is not None else None

    def checkpoint():
        nonlocal last_checkpoint
        if progress.global_step > 0 and last_checkpoint != progress.global_step:
            save_checkpoint(accelerator, args.output_dir, progress.global_step, args.checkpoints_total_limit, logger)
            last_checkpoint = progress.global_step

    validation_prompts = read_validation_prompts(args.validation_prompts)
    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=progress.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    score_ahead = not args.no_score_ahead and bool(plan.scored_metrics)
    graceful_stop = GracefulStop()
    interrupted = False
    # Pairs read since the last one trained on, and why they were dropped (for the error when nothing can train).
    dropped_in_a_row, drops_in_a_row = 0, {}
    family.denoiser.train()

    # 9. The loop: micro-batches grouped into optimizer steps, a stop signal honoured between any two of them.
    with graceful_stop:
        while progress.global_step < args.max_train_steps and not interrupted:
            from_epoch_start = progress.batches_in_epoch == 0
            if plan.online:
                # An epoch is a round: generated now, or restored with the checkpoint that was taken during it.
                if from_epoch_start or rounds.round_index != progress.epoch:
                    round_logs = rounds.generate(
                        progress.epoch, lambda: _agree(accelerator, graceful_stop.requested_here)[0]
                    )
                    if round_logs is None:
                        interrupted = True
                        break
                    report_round(args, accelerator, progress, round_logs)
                epoch_loader = rounds.batches(progress.batches_in_epoch)
            else:
                pairs.set_epoch(progress.epoch)
                if hasattr(train_dataloader, "set_epoch"):
                    train_dataloader.set_epoch(progress.epoch)
                epoch_loader = train_dataloader
                if not from_epoch_start and not args.streaming:
                    epoch_loader = accelerator.skip_first_batches(train_dataloader, progress.batches_in_epoch)
                elif not from_epoch_start:
                    # Skips the rows already trained on without decoding them; the batch order stays the same.
                    pairs.skip_batches(progress.batches_in_epoch, args.train_batch_size)
            rows_in_epoch, kept_in_epoch = 0, 0
            step_start = run_state.snapshot()
            try:
                for batch, closes_step, stop in micro_batches(epoch_loader, trainer, graceful_stop, score_ahead):
                    if stop:
                        # Abandon the partial step: the checkpoint is that of the last completed step.
                        run_state.restore(step_start)
                        trainer.reset_step()
                        interrupted = True
                        break
                    progress.batches_in_epoch += 1
                    record_bad_examples(accelerator, bad_examples, batch)
                    trainer.accumulate(batch, trainer.consensus(batch))
                    if not closes_step:
                        continue

                    outcome = trainer.optimizer_step()
                    rows_in_epoch += outcome.rows
                    kept_in_epoch += outcome.pairs
                    if outcome.pairs == 0:
                        dropped_in_a_row += outcome.rows
                        for reason, count in outcome.drops.items():
                            drops_in_a_row[reason] = drops_in_a_row.get(reason, 0) + count
                        if dropped_in_a_row >= args.max_consecutive_dropped_pairs:
                            what = f"the last {dropped_in_a_row} pairs (--max_consecutive_dropped_pairs)"
                            raise RunStopped(dropped_pairs_message(args, dropped_in_a_row, drops_in_a_row, what))
                    else:
                        dropped_in_a_row, drops_in_a_row = 0, {}
                    if outcome.counts_as_step:
                        progress.global_step += 1
                        progress_bar.update(1)
                        report_step(args, accelerator, trainer, progress, bad_examples, outcome, progress_bar)
                        if args.ref_update_steps > 0 and progress.global_step % args.ref_update_steps == 0:
                            balanced_dpo.update_reference_adapter(
                                family.denoiser, args.ref_update_mode, args.ref_ema_decay
                            )
                        if progress.global_step % args.checkpointing_steps == 0:
                            checkpoint()
                        if validation_prompts and progress.global_step % args.validation_steps == 0:
                            if accelerator.is_main_process:
                                log_validation(
                                    args,
                                    accelerator,
                                    family,
                                    progress.global_step,
                                    validation_prompts,
                                    scorer_set if args.score_validation else None,
                                )
                            accelerator.wait_for_everyone()
                    step_start = run_state.snapshot()
                    if progress.global_step >= args.max_train_steps:
                        break
                else:
                    # The epoch is over: every batch of it was read.
                    if from_epoch_start and rows_in_epoch == 0 and not plan.online:
                        raise RunStopped("The training data yielded no pairs in a whole epoch.")
                    if from_epoch_start and kept_in_epoch == 0 and not plan.online:
                        raise RunStopped(dropped_pairs_message(args, rows_in_epoch, drops_in_a_row, "a whole epoch"))
                    if plan.online and args.online_ref_update == "round":
                        # Iterative DPO: the next round is judged against the policy that generated this one.
                        balanced_dpo.update_reference_adapter(
                            family.denoiser, args.ref_update_mode, args.ref_ema_decay
                        )
                    progress.epoch += 1
                    progress.batches_in_epoch = 0
            except (RunStopped, preference_data.DataError):
                # Nothing finished is lost: the last completed step is checkpointed before the error propagates.
                run_state.restore(step_start)
                try:
                    checkpoint()
                except RuntimeError as error:  # a LoRA that is not finite is never written (check_finite_lora)
                    logger.warning(f"No checkpoint written before stopping: {error}")
                raise

        if interrupted:
            checkpoint()
            logger.info(
                f"Stopping on a signal at step {progress.global_step}: checkpoint saved. Resume with"
                " --resume_from_checkpoint latest."
            )

    if latent_cache is not None:
        logger.info(
            f"Latent cache: {len(latent_cache)} images, {latent_cache.nbytes / 2**30:.2f} GiB; "
            f"{latent_cache.hits} hits, {latent_cache.misses} encodes."
        )
    accelerator.wait_for_everyone()
    if interrupted:
        accelerator.end_training()
        return None

    # 10. Final LoRA, validation with the saved LoRA, model card and Hub upload.
    lora_path = None
    if accelerator.is_main_process:
        lora_state = balanced_dpo.adapter_state_dict(
            family.denoiser, balanced_dpo.POLICY_ADAPTER, diffusers_format=family.lora_in_diffusers_format
        )
        check_finite_lora(lora_state, "The trained LoRA")
        family.save_lora_weights(args.output_dir, lora_state, lora_metadata)
        lora_path = os.path.join(args.output_dir, LORA_WEIGHTS_NAME)
        logger.info(f"LoRA weights saved to {lora_path}")

        images, scores = [], {}
        if validation_prompts:
            # The final images come from a fresh pipeline with the saved LoRA: free the training model first.
            del trainer, optimizer, params_to_optimize
            family.release_denoiser()
            accelerator.free_memory()
            images, scores = log_validation(
                args,
                accelerator,
                family,
                progress.global_step,
                validation_prompts,
                scorer_set if args.score_validation else None,
                lora_dir=args.output_dir,
            )
        save_model_card(args, family, repo_id or Path(args.output_dir).name, images, scores, args.output_dir)
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=upload_ignore_patterns(args),
                token=args.hub_token,
            )
    accelerator.end_training()
    return lora_path


def report_round(args, accelerator, progress, logs):
    """Logs an online round; stops when it kept no pair at all."""
    logger.info(
        f"Online round {int(logs['online/round'])}: {int(logs['online/images'])} images in"
        f" {logs['online/generation_seconds']:.1f}s, {int(logs['online/pairs'])} pairs kept"
        f" ({logs['online/dropped_share']:.1%} of the selected ones dropped)"
    )
    accelerator.log(logs, step=progress.global_step)
    if logs["online/pairs"] == 0:
        drops = {k[len("online/dropped/") :]: int(v) for k, v in logs.items() if k.startswith("online/dropped/")}
        raise RunStopped(
            dropped_pairs_message(
                args, int(logs["online/selected"]), drops, f"online round {int(logs['online/round'])}"
            )
        )


def report_step(args, accelerator, trainer, progress, bad_examples, outcome, progress_bar):
    """Logs one optimizer step and applies --max_nonfinite_steps."""
    logs = dict(outcome.logs)
    logs.update(
        {
            "lr": trainer.lr_scheduler.get_last_lr()[0],
            "pairs": outcome.pairs,
            "pairs_read": outcome.rows,
            "bad_examples": bad_examples.num_bad,
            "skipped_steps": progress.skipped_steps + (outcome.status != "stepped"),
        }
    )
    if outcome.grad_norm is not None and math.isfinite(outcome.grad_norm):
        logs["grad_norm"] = outcome.grad_norm
    if outcome.loss_scale is not None:
        logs["loss_scale"] = outcome.loss_scale
    step = progress.global_step
    if outcome.status == "stepped":
        progress.nonfinite_steps = 0
    else:
        progress.skipped_steps += 1
    if outcome.status == "fp16_overflow":
        # The scaler has already skipped the step and lowered its scale; the run goes on, as in diffusers' examples.
        logger.warning(
            f"fp16 overflow in the gradients of optimizer step {step}: the gradient scaler skipped the step and"
            f" lowered its scale to {outcome.loss_scale:g}."
        )
        if outcome.loss_scale < 1.0:
            raise RunStopped(
                f"fp16 gradients overflow even with a loss scale of {outcome.loss_scale:g}: the run cannot make"
                " progress in fp16. Use --mixed_precision bf16, or lower --learning_rate or --beta_dpo."
            )
    elif outcome.status in ("nonfinite_loss", "nonfinite_gradient"):
        progress.nonfinite_steps += 1
        what = "loss" if outcome.status == "nonfinite_loss" else "gradient"
        logger.warning(
            f"Non-finite {what} at optimizer step {step}: step skipped ({progress.nonfinite_steps} optimizer step(s)"
            " in a row)."
        )
        if progress.nonfinite_steps >= args.max_nonfinite_steps:
            raise RunStopped(
                f"{progress.nonfinite_steps} optimizer steps in a row had a non-finite loss or gradient. Lower"
                " --learning_rate or --beta_dpo, or use --mixed_precision bf16 instead of fp16. The last checkpoint is"
                " intact."
            )
    accelerator.log(logs, step=step)
    progress_bar.set_postfix(
        loss=f"{logs.get('loss', float('nan')):.4f}", acc=f"{logs.get('implicit_acc', float('nan')):.2f}"
    )
