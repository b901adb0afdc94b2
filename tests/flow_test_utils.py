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
"""What the SD3 and FLUX test files share: arguments for the tiny pipelines, in-process runs of a script's `main`
(interrupted by SIGTERM and resumed), a dataset with precomputed consensus columns, LoRA checks, and the Flow-DPO
loss written out by hand."""

import math
import os
import signal

import torch
from safetensors.torch import load_file
from trainer_utils import build_trainer, reset_accelerate_state

import run_state
import tiny_assets
import training


LORA_NAME = "pytorch_lora_weights.safetensors"
# Short T5 prompts keep the tiny runs fast; the code path is the one of 77 or 512 tokens.
MAX_SEQUENCE_LENGTH = 16


def base_args(model_dir, assets, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", model_dir,
        "--dataset_name", assets["pickapic"],
        "--reward_config", assets["reward_config"],
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--train_batch_size", "4",
        "--learning_rate", "1e-3",
        "--beta_dpo", "500",
        "--max_sequence_length", str(MAX_SEQUENCE_LENGTH),
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def human_label_trainer(script, family_class, model_dir, assets, output_dir, *extra):
    """A DPOTrainer of `script`'s family on a tiny pipeline, with the human label as consensus (no scorer to load)."""
    from accelerate import Accelerator

    torch.manual_seed(0)  # the LoRA's random initialisation
    args = script.parse_args(base_args(model_dir, assets, output_dir, "--consensus", "human", *extra))
    return build_trainer(Accelerator(cpu=True), args, family_class)


def generate_images(pipe, prompts, seed, steps, guidance_scale):
    """32 px images as numpy arrays, prompt i from seed + i, with the tests' short T5 prompts."""
    generators = [
        torch.Generator().manual_seed(seed + i) for i in range(1 if isinstance(prompts, str) else len(prompts))
    ]
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=32,
        width=32,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=generators,
        output_type="np",
    ).images


def run_script(script, argv):
    """`script.main(script.parse_args(argv))` in this process, as `accelerate launch` would run it on one CPU."""
    reset_accelerate_state()
    try:
        return script.main(script.parse_args([str(a) for a in argv]))
    finally:
        reset_accelerate_state()


def interrupt_then_resume(monkeypatch, run, output_dir, signal_after_micro_batch):
    """Runs `run(output_dir)` with a SIGTERM sent to this process right after micro-batch `signal_after_micro_batch`
    (counted from 1) has been accumulated, checks that the run stopped without a final LoRA and kept only the
    checkpoints of completed steps, then resumes it with `--resume_from_checkpoint latest` to the end. Returns the
    checkpoints the interrupted run left."""
    calls = []
    accumulate = training.DPOTrainer.accumulate

    def accumulate_then_signal(self, batch, labels):
        calls.append(1)
        result = accumulate(self, batch, labels)
        if len(calls) == signal_after_micro_batch:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(training.DPOTrainer, "accumulate", accumulate_then_signal)
    assert run(output_dir) is None, "an interrupted run returns no LoRA"
    assert len(calls) == signal_after_micro_batch, "the run went on after the signal"
    assert not os.path.exists(os.path.join(output_dir, LORA_NAME))
    checkpoints = run_state.list_checkpoints(output_dir)
    monkeypatch.setattr(training.DPOTrainer, "accumulate", accumulate)
    assert run(output_dir, "--resume_from_checkpoint", "latest")
    return checkpoints


def write_precomputed_consensus_dataset(output_dir, num_pairs=16, seed=4):
    """Pick-a-Pic rows with `consensus_label` / `consensus_prob` columns as `rewards.py label` writes them; every
    fifth pair was dropped by the consensus (NaN)."""
    import datasets

    rows = tiny_assets.make_pickapic_rows(num_pairs, seed=seed)
    for i, row in enumerate(rows):
        dropped = i % 5 == 4
        row["consensus_label"] = math.nan if dropped else float(i % 3 != 0)
        row["consensus_prob"] = math.nan if dropped else (0.8 if i % 3 != 0 else 0.3)
    path = os.path.join(output_dir, "data", "train-00000-of-00001.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(path)
    kept = sum(1 for i in range(num_pairs) if i % 5 != 4)
    return str(output_dir), kept


def assert_peft_lora_of(lora_dir, transformer):
    """The saved LoRA has diffusers' transformer key format (`transformer.<module>.lora_A/B.weight`), finite values,
    and every key names a module of `transformer`."""
    state = load_file(os.path.join(lora_dir, LORA_NAME))
    modules = {name for name, _ in transformer.named_modules()}
    assert state, "the LoRA file is empty"
    for key in state:
        assert key.startswith("transformer.") and (".lora_A." in key or ".lora_B." in key), key
        assert key[len("transformer.") :].split(".lora_")[0] in modules, f"{key} names no transformer module"
    assert all(torch.isfinite(v).all() for v in state.values())
    return state


def assert_same_lora(dir_a, dir_b, atol=1e-6):
    a, b = load_file(os.path.join(dir_a, LORA_NAME)), load_file(os.path.join(dir_b, LORA_NAME))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=f"{key} differs")
    # Training moved the weights (B starts at zero), so the comparison is not trivially true.
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)


def set_random_lora_weights(denoiser, seed=0, std=0.05):
    """Gives every LoRA factor of every adapter (policy and reference alike) its own random values, so that the
    policy, the reference adapter and the base model all predict differently."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def pair_pixels(batch, label):
    """Winners' pixels, then the losers' (image 0 wins where label > 0.5), written out pair by pair."""
    winners, losers = [], []
    for i, first_wins in enumerate((label > 0.5).tolist()):
        images = (batch["pixel_values_0"][i], batch["pixel_values_1"][i])
        winners.append(images[0] if first_wins else images[1])
        losers.append(images[1] if first_wins else images[0])
    return torch.stack(winners + losers)


def flow_dpo_losses(prediction, reference, target, sigmas, label, prob, beta, weighting_scheme):
    """The soft-label Flow-DPO loss by its definition: e = mean over channels and pixels of w(sigma) (v - v_theta)^2,
    h = -1/2 beta [(e_w - e_l) - (e_ref_w - e_ref_l)], loss = q_w softplus(-h) + (1 - q_w) softplus(h)."""
    if weighting_scheme == "cosmap":
        weights = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    elif weighting_scheme == "sigma_sqrt":
        weights = sigmas**-2.0
    else:
        weights = torch.ones_like(sigmas)
    weights = weights.double().view(-1, 1, 1, 1)
    errors = (weights * (target.double() - prediction.double()) ** 2).mean(dim=(1, 2, 3))
    ref_errors = (weights * (target.double() - reference.double()) ** 2).mean(dim=(1, 2, 3))
    pairs = len(label)
    h = -0.5 * beta * ((errors[:pairs] - errors[pairs:]) - (ref_errors[:pairs] - ref_errors[pairs:]))
    q_w = torch.where(label > 0.5, prob, 1 - prob).double()
    softplus = torch.nn.functional.softplus
    return q_w * softplus(-h) + (1 - q_w) * softplus(h), h


def logit_normal_sigmas(generator, num_pairs, shift):
    """SD3's training sigmas by hand: u ~ logit-normal(0, 1), s = 1 - floor(1000 u) / 1000, sigma = shift s / (1 +
    (shift - 1) s) (shift 1: FLUX, which shifts at inference only)."""
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(num_pairs,), generator=generator))
    s = (1000 - torch.floor(1000 * u)) / 1000
    return shift * s / (1 + (shift - 1) * s)


def uniform_sigmas(generator, num_pairs, shift):
    """The same for the schemes that draw u uniformly (`cosmap`, `sigma_sqrt`, `none`)."""
    u = torch.rand((num_pairs,), generator=generator)
    s = (1000 - torch.floor(1000 * u)) / 1000
    return shift * s / (1 + (shift - 1) * s)
