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
"""BalancedDPO, the method: the loss, the noise both images of a pair share, and the dynamic reference model.

- `dpo_loss`: the Diffusion-DPO objective on per-pair denoising errors, with hard or soft consensus labels
  (sigmoid, IPO, hinge); `per_example_mse` says how those errors are averaged.
- `order_by_label` / `winner_probability`: (image 0, image 1, consensus label) -> (winner, loser), and q_w.
- `ddpm_noised_pairs`: noisy input, timesteps and target of a winner/loser batch for the DDPM families (SD 1.x/2.x,
  SDXL): both images of a pair get the same noise and timestep.
- `flow_matching_noised_pairs`: the same for the rectified-flow families (SD3 / SD3.5, FLUX.1): x_t = (1 - σ) x_0 + σ ε,
  velocity target ε - x_0, one σ and one ε per pair.
- The dynamic reference model: a second, frozen LoRA adapter on the same denoiser (`add_lora_adapters`,
  `reference_model`, `update_reference_adapter`), or the base model with adapters disabled.
- `consensus_across_processes`: the consensus of a batch is decided on the pairs of every process at once.

The consensus itself lives in `rewards.py`, the data pipeline in `preference_data.py`, and the training loop every
model family shares in `training.py`.
"""

import contextlib
import copy
import dataclasses
import os
from typing import Optional

import torch
import torch.nn.functional as F


POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------


def per_example_mse(prediction, target, weighting=None):
    """Squared error per example, averaged over latent channels and pixels, in float32.

    `weighting` (broadcastable to the prediction, e.g. SD3's per-example loss weighting) multiplies the squared
    error before the average."""
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if weighting is not None:
        error = error * weighting.float()
    return error.mean(dim=list(range(1, prediction.ndim)))


def dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta, loss_type="sigmoid", winner_prob=None):
    """Per-pair Diffusion-DPO loss.

        h = -1/2 * beta * [(e_w - e_l) - (e_ref_w - e_ref_l)]
        sigmoid: -log sigmoid(h)      ipo: (h / beta - 1 / (2 beta))^2      hinge: relu(1 - h)

    With `winner_prob` (the consensus probability q_w that the winner really is better), the loss becomes the
    expectation over both orientations: q_w * f(h) + (1 - q_w) * f(-h). For `sigmoid` that is the binary
    cross-entropy of sigmoid(h) against q_w. `winner_prob=None` is the hard label (q_w = 1).

    Returns `(loss [B], h [B])`. beta means the same in every script; beta = 5000 here equals `--beta_dpo 2500` in
    diffusers' SD Diffusion-DPO example (which omits the 1/2) and 5000 in its SDXL one.
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
# Noise and target: the same noise and timestep for both images of a pair
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NoisedPairs:
    """What the denoiser sees for a winner-first, loser-second batch [2P, ...], and what it should predict.

    `weighting` (optional) multiplies the squared error of each example (see `per_example_mse`)."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weighting: Optional[torch.Tensor] = None


def pair_noise(latents, generator):
    """One Gaussian noise per pair, repeated for its winner and loser: [2P, ...] for latents [2P, ...]."""
    num_pairs = latents.shape[0] // 2
    noise = torch.randn(
        (num_pairs, *latents.shape[1:]), generator=generator, device=latents.device, dtype=latents.dtype
    )
    return noise.repeat(2, *([1] * (latents.ndim - 1)))


def ddpm_noised_pairs(noise_scheduler, latents, generator, timesteps=None):
    """DDPM forward process of winner-first latents [2P, C, H, W]: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, with the
    same eps and t for both images of a pair; the target is eps or, for v-prediction, the velocity.

    `timesteps` ([P]) may be given (SDXL-Turbo's grid); otherwise they are uniform over the training schedule.
    `generator` draws the noise, then the timesteps."""
    num_pairs = latents.shape[0] // 2
    noise = pair_noise(latents, generator)
    if timesteps is None:
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (num_pairs,), generator=generator, device=latents.device
        )
    timesteps = timesteps.long().to(latents.device).repeat(2)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
    return NoisedPairs(noisy_latents, timesteps, target)


# diffusers' names of the timestep densities and loss weightings of SD3 training (`--weighting_scheme`).
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")


def flow_matching_sigmas(
    num_pairs,
    noise_scheduler,
    generator,
    weighting_scheme="logit_normal",
    logit_mean=0.0,
    logit_std=1.0,
    mode_scale=1.29,
):
    """(σ, timesteps) of `num_pairs` pairs, drawn as diffusers' SD3 and FLUX training scripts draw them.

    u comes from `diffusers.training_utils.compute_density_for_timestep_sampling` (logit-normal, `mode`, or uniform
    for the schemes that weight the loss instead), drawn with `generator`; then σ = `noise_scheduler.sigmas[floor(u N)]`
    and the timestep `noise_scheduler.timesteps[floor(u N)]` (= σ N), N = `num_train_timesteps`. The scheduler must be
    a FlowMatchEulerDiscreteScheduler on which `set_timesteps` was never called: its table then holds the training
    σs, shifted by its `shift` (SD3: 3) unless it shifts dynamically by resolution at inference (FLUX), in which case
    training uses the unshifted σ, as diffusers' FLUX script does. Both are float32 tensors [num_pairs] on the
    generator's device.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if len(noise_scheduler.sigmas) != num_train_timesteps:
        raise ValueError(
            "flow_matching_sigmas needs the scheduler's training table of sigmas; set_timesteps() was called on this"
            " scheduler. Use a copy that is not used for sampling."
        )
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=num_pairs,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=generator.device,
        generator=generator,
    )
    # u can reach 1.0 (the `mode` density at u = 0, a saturated sigmoid): the last entry then, not an index error.
    indices = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1).cpu()
    sigmas = noise_scheduler.sigmas[indices].float()
    timesteps = noise_scheduler.timesteps[indices].float()
    return sigmas.to(generator.device), timesteps.to(generator.device)


def flow_matching_noised_pairs(
    latents,
    generator,
    noise_scheduler,
    weighting_scheme="logit_normal",
    logit_mean=0.0,
    logit_std=1.0,
    mode_scale=1.29,
):
    """Rectified-flow forward process of winner-first latents [2P, ...]:

        x_t = (1 - σ) x_0 + σ ε,      target v = ε - x_0

    with the same ε and σ for both images of a pair (σ from `flow_matching_sigmas`). `weighting` is diffusers'
    `compute_loss_weighting_for_sd3(weighting_scheme, σ)`, shaped to broadcast over each example (all ones except for
    `sigma_sqrt` and `cosmap`); `per_example_mse` applies it. x_t is computed in float32 and returned in the latents'
    dtype; the target is float32. `generator` draws the noise, then σ.
    """
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    num_pairs = latents.shape[0] // 2
    noise = pair_noise(latents, generator)
    sigmas, timesteps = flow_matching_sigmas(
        num_pairs, noise_scheduler, generator, weighting_scheme, logit_mean, logit_std, mode_scale
    )
    shape = (2 * num_pairs,) + (1,) * (latents.ndim - 1)
    sigmas = sigmas.to(latents.device).repeat(2).view(shape)
    timesteps = timesteps.to(latents.device).repeat(2)
    x_0, noise = latents.float(), noise.float()
    noisy_latents = ((1.0 - sigmas) * x_0 + sigmas * noise).to(latents.dtype)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas).float()
    return NoisedPairs(noisy_latents, timesteps, noise - x_0, weighting)


# ----------------------------------------------------------------------------------------------------------------
# LoRA adapters and the dynamic reference model
# ----------------------------------------------------------------------------------------------------------------


def add_lora_adapters(denoiser, lora_config, dynamic_reference):
    """Adds the trainable policy adapter and, for a dynamic reference, a frozen reference adapter; both in float32.

    The reference starts equal to the policy (both are zero updates at initialisation), so at step 0 the
    reference is the base model, as in Diffusion-DPO. Returns the list of trainable parameters.
    """
    denoiser.add_adapter(copy.deepcopy(lora_config), adapter_name=POLICY_ADAPTER)
    if dynamic_reference:
        denoiser.add_adapter(copy.deepcopy(lora_config), adapter_name=REFERENCE_ADAPTER)
        copy_adapter_weights(denoiser, POLICY_ADAPTER, REFERENCE_ADAPTER)
        denoiser.set_adapter(POLICY_ADAPTER)
    cast_lora_to_float32(denoiser)
    return freeze_all_but_policy(denoiser)


def cast_lora_to_float32(denoiser):
    """Keeps every LoRA weight, the frozen reference adapter included, in float32 whatever the model's dtype.

    The policy must be float32 for the optimizer; the reference too, or its EMA updates
    (`ref <- d * ref + (1 - d) * policy`) round away in bfloat16 and it lags the policy, then jumps. LoRA weights are
    a small share of the model, so this costs little memory.
    """
    for name, param in denoiser.named_parameters():
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()


def freeze_all_but_policy(denoiser):
    """Marks exactly the policy LoRA parameters trainable (peft's `set_adapter` flips `requires_grad`)."""
    marker = f".{POLICY_ADAPTER}."
    trainable = []
    for name, param in denoiser.named_parameters():
        is_policy = "lora_" in name and marker in name
        param.requires_grad_(is_policy)
        if is_policy:
            trainable.append(param)
    return trainable


def _adapter_pairs(denoiser, source, target):
    params = dict(denoiser.named_parameters())
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
def copy_adapter_weights(denoiser, source, target):
    for source_param, target_param in _adapter_pairs(denoiser, source, target):
        target_param.copy_(source_param)


@torch.no_grad()
def update_reference_adapter(denoiser, mode="copy", decay=0.0):
    """Moves the reference towards the current policy: a hard copy, or ref <- decay * ref + (1 - decay) * policy.

    The EMA acts on the LoRA factors A and B separately (the reference is itself a LoRA of the same rank); with
    `copy` the reference equals the policy exactly.
    """
    if mode == "copy":
        copy_adapter_weights(denoiser, POLICY_ADAPTER, REFERENCE_ADAPTER)
    elif mode == "ema":
        for policy_param, ref_param in _adapter_pairs(denoiser, POLICY_ADAPTER, REFERENCE_ADAPTER):
            ref_param.mul_(decay).add_(policy_param.to(ref_param.dtype), alpha=1.0 - decay)
    else:
        raise ValueError(f"Unknown --ref_update_mode {mode!r}; choose 'copy' or 'ema'.")


class _TunerLayerCache:
    """The peft tuner layers of each denoiser, found once: walking every module costs milliseconds on every step.

    Keyed weakly by the denoiser, and rebuilt whenever its adapters change (a new or re-added adapter brings a new
    config object into `peft_config`).
    """

    def __init__(self):
        import weakref

        self._by_model = weakref.WeakKeyDictionary()

    def get(self, denoiser):
        """(direct, by_method, by_method_params): see `_switches_directly`."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        peft_config = getattr(denoiser, "peft_config", None) or {}
        key = tuple((name, id(config)) for name, config in peft_config.items())
        cached = self._by_model.get(denoiser)
        if cached is not None and cached[0] == key:
            return cached[1]
        if not key:
            raise ValueError("No adapter loaded. Please load an adapter first.")
        direct, by_method = [], []
        for module in denoiser.modules():
            if isinstance(module, BaseTunerLayer):
                (direct if _switches_directly(module) else by_method).append(module)
        if not direct and not by_method:
            raise ValueError("The model has a peft_config but no adapter layers.")
        by_method_params = list({id(p): p for layer in by_method for p in layer.parameters()}.values())
        self._by_model[denoiser] = (key, (direct, by_method, by_method_params))
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
def reference_model(denoiser, dynamic_reference):
    """Runs the denoiser as the reference model inside the block, then restores the policy.

    Without a dynamic reference the adapters are disabled (the base model is the reference); with one, the frozen
    reference adapter is activated. Gradients are off inside; each LoRA layer's active/disabled state and every
    `requires_grad` flag are restored afterwards whatever happens. Costs well under a microsecond per LoRA layer: no
    walk over the model's modules or parameters.
    """
    direct, by_method, by_method_params = _TUNER_LAYERS.get(denoiser)
    if dynamic_reference and REFERENCE_ADAPTER not in denoiser.peft_config:
        raise ValueError(f"The model has no {REFERENCE_ADAPTER!r} adapter; add it with add_lora_adapters.")
    # The same switch as diffusers' `set_adapter(REFERENCE_ADAPTER)` / `disable_adapters()`.
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
            yield denoiser
    finally:
        for layer, old in zip(direct, saved):
            object.__setattr__(layer, field, old)
        for layer, (active, disabled) in zip(by_method, saved_by_method):
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for param, flag in zip(by_method_params, saved_grads):
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def adapter_state_dict(denoiser, adapter_name=POLICY_ADAPTER, diffusers_format=True):
    """The adapter's LoRA weights as float32 CPU tensors, in diffusers' format (`lora.down` / `lora.up`, what the UNet
    families save) or peft's (`lora_A` / `lora_B`, what diffusers' transformer families save)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    if diffusers_format:
        from diffusers.utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(state)
    return {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in state.items()}


def load_adapter_state_dict(denoiser, state_dict, adapter_name=POLICY_ADAPTER, prefix="unet"):
    """Loads LoRA weights into the *existing* adapter (never adds a second one, which would restart training)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items()}
    peft_state = convert_unet_state_dict_to_peft(state_dict)
    result = set_peft_model_state_dict(denoiser, peft_state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA checkpoint has keys the model does not: {unexpected[:5]}")


REFERENCE_WEIGHTS_NAME = "reference_lora_weights.safetensors"


def save_reference_adapter(denoiser, directory, prefix="unet", diffusers_format=True):
    """Writes the reference adapter next to the policy LoRA, with the same `<prefix>.`-prefixed keys."""
    from safetensors.torch import save_file

    state = adapter_state_dict(denoiser, REFERENCE_ADAPTER, diffusers_format=diffusers_format)
    save_file({f"{prefix}.{k}": v for k, v in state.items()}, os.path.join(directory, REFERENCE_WEIGHTS_NAME))


def load_reference_adapter(denoiser, directory, prefix="unet"):
    from safetensors.torch import load_file

    path = os.path.join(directory, REFERENCE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{directory} has no {REFERENCE_WEIGHTS_NAME}: it was saved with --ref_update_steps 0. Resume with the"
            " same --ref_update_steps as the original run."
        )
    load_adapter_state_dict(denoiser, load_file(path), REFERENCE_ADAPTER, prefix=prefix)


# ----------------------------------------------------------------------------------------------------------------
# The consensus of a batch, decided on the pairs of every process
# ----------------------------------------------------------------------------------------------------------------


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
