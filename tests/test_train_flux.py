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
"""Tests of train_balanced_dpo_flux.py on tiny FLUX.1-dev- and schnell-style pipelines built locally in the real
folder format.

One run (cached text embeddings, random-metric consensus, soft labels, an EMA reference, empty prompts, validation
with no text encoder left) equals the same run stopped by SIGTERM and resumed, and its LoRA loads into FluxPipeline
with its alpha, changes its output and is evaluated by evaluate_balanced_dpo.py; the loss of a step equals the
Flow-DPO formula by hand (packed latents, position ids, the guidance embedding; same sigma and noise for winner and
loser) and the reference (adapters off) gets no gradient; sampling unpacks FLUX's latents; schnell; two processes
training online on pairs they generate; the NF4 base."""

import json
import os

import numpy as np
import pytest
import torch
from flow_test_utils import (
    LORA_NAME,
    MAX_SEQUENCE_LENGTH,
    assert_peft_lora_of,
    assert_same_lora,
    base_args,
    flow_dpo_losses,
    generate_images,
    human_label_trainer,
    interrupt_then_resume,
    logit_normal_sigmas,
    pair_pixels,
    run_script,
    set_random_lora_weights,
)
from launch_utils import read_scalars, torchrun
from trainer_utils import batch_of


SCRIPT = "train_balanced_dpo_flux.py"
PROMPT = "a red circle on a white background"
VALIDATION_PROMPT = "a blue square on a black background"


pytestmark = pytest.mark.usefixtures("one_thread")


def flux_trainer(assets, output_dir, *extra):
    import train_balanced_dpo_flux

    return human_label_trainer(
        train_balanced_dpo_flux, train_balanced_dpo_flux.FluxFamily, assets["flux"], assets, output_dir, *extra
    )


def generate(pipe, prompts=PROMPT, seed=0, steps=2, guidance_scale=3.5):
    return generate_images(pipe, prompts, seed, steps, guidance_scale)


def pack(latents):
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: each 2x2 patch, channels first within it, row-major over the patches."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(packed, channels, height, width):
    b = packed.shape[0]
    return (
        packed.view(b, height // 2, width // 2, channels, 2, 2)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(b, channels, height, width)
    )


# ----------------------------------------------------------------------------------------------------------------
# A run, the same run interrupted and resumed, its LoRA in the pipeline and in the evaluation
# ----------------------------------------------------------------------------------------------------------------


def test_run_equals_its_resumed_run_and_its_lora_loads_with_alpha_changes_output_and_evaluates(
    tiny_flow_assets, tmp_path, monkeypatch
):
    from diffusers import FluxPipeline

    import evaluate_balanced_dpo
    import train_balanced_dpo_flux

    assets = tiny_flow_assets
    common = (
        "--consensus", "random_metric", "--label_mode", "soft", "--gradient_accumulation_steps", "2",
        "--train_batch_size", "2", "--ref_update_steps", "2", "--ref_update_mode", "ema",
        "--proportion_empty_prompts", "0.3", "--cache_text_embeddings", "--rank", "4", "--lora_alpha", "8",
        "--use_8bit_adam", "--gradient_checkpointing", "--checkpointing_steps", "1", "--max_train_steps", "3",
    )  # fmt: skip

    def run(output_dir, *extra):
        return run_script(train_balanced_dpo_flux, base_args(assets["flux"], assets, output_dir, *common, *extra))

    straight = str(tmp_path / "straight")
    # Validation (during the run with the training transformer, at the end with the saved LoRA) needs no text
    # encoder: the validation prompt was encoded with the captions before they were freed.
    validation = (
        "--validation_prompts", VALIDATION_PROMPT, "--validation_inference_steps", "2", "--validation_steps", "2",
        "--score_validation",
    )  # fmt: skip
    assert run(straight, *validation) == os.path.join(straight, LORA_NAME)
    interrupted = str(tmp_path / "interrupted")
    # The signal comes with the last micro-batch of step 2: that step completes and is checkpointed, then the run
    # stops before the next micro-batch.
    assert interrupt_then_resume(monkeypatch, lambda *a: run(*a, "--report_to", "none"), interrupted, 4) == [
        "checkpoint-1",
        "checkpoint-2",
    ]
    assert_same_lora(straight, interrupted)

    scalars = read_scalars(straight)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3], "metrics must be logged once per optimizer step"
    assert "agreement/hpsv2" in scalars and "implicit_acc" in scalars
    assert "validation/clip_lora" in scalars and "test/clip_lora" in scalars
    card = open(os.path.join(straight, "README.md")).read()
    for line in ("license: other", "license_name: flux-1-dev-non-commercial-license", "- flux", "- balanced-dpo"):
        assert line in card, line
    assert "FluxPipeline" in card and "guidance_scale=3.5" in card and "| pickscore |" in card
    assert os.path.isfile(os.path.join(straight, "image_0.png"))

    pipe = FluxPipeline.from_pretrained(assets["flux"])
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe)
    pipe.load_lora_weights(straight, weight_name=LORA_NAME)
    tuned = generate(pipe)
    state = assert_peft_lora_of(straight, pipe.transformer)
    # diffusers' FLUX LoRA targets: attention and feed-forward of the double-stream blocks, single-stream attention.
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in state)
    assert any(".ff_context.net.2." in k for k in state) and any(".attn.to_add_out." in k for k in state)
    scalings = [s for m in pipe.transformer.modules() for s in getattr(m, "scaling", {}).values()]
    assert scalings and all(s == pytest.approx(2.0) for s in scalings)
    assert base.shape == tuned.shape == (1, 32, 32, 3)
    assert abs(base - tuned).max() > 1e-4, "loading the LoRA did not change the pipeline output"

    assert evaluate_balanced_dpo.detect_model_family(assets["flux"]) == "flux"
    results = evaluate_balanced_dpo.main(
        evaluate_balanced_dpo.parse_args(
            ["--pretrained_model_name_or_path", assets["flux"], "--lora_a", straight, "--prompts", assets["pickapic"],
             "--max_prompts", "2", "--reward_models", "clip", "--reward_config", assets["reward_config"],
             "--num_inference_steps", "2", "--resolution", "32", "--max_sequence_length", str(MAX_SEQUENCE_LENGTH),
             "--bootstrap_samples", "100", "--output_dir", str(tmp_path / "eval")]
        )
    )  # fmt: skip
    assert results["num_prompts"] == 2 and results["generation"]["guidance_scale"] == 3.5  # FluxPipeline's default
    records = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert any(r["scores_a"] != r["scores_b"] for r in records), "the LoRA made no difference to the evaluation"


# ----------------------------------------------------------------------------------------------------------------
# The loss and the reference, in-process
# ----------------------------------------------------------------------------------------------------------------


def test_a_step_loss_is_the_flow_dpo_formula_by_hand_and_the_reference_gets_no_gradient(
    tiny_flow_assets, tmp_path, fresh_accelerate_state
):
    from diffusers import FluxPipeline

    # A guidance value other than the default, so that the test sees it reach the transformer.
    trainer, pairs = flux_trainer(tiny_flow_assets, tmp_path, "--label_mode", "soft", "--guidance_scale", "2.0")
    family, transformer = trainer.family, trainer.family.denoiser
    set_random_lora_weights(transformer)
    batch = batch_of(trainer, pairs, range(4))
    label, prob = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0.2, 0.7, 0.95, 0.45])
    start = trainer.generator.get_state()
    noised_seen = []
    noised_pairs = family.noised_pairs
    family.noised_pairs = lambda latents, generator: (
        noised_seen.append(noised_pairs(latents, generator)) or (noised_seen[-1])
    )
    losses = trainer.pair_losses(batch, torch.arange(4), label, prob)
    family.noised_pairs = noised_pairs

    generator = torch.Generator().set_state(start)
    with torch.no_grad():
        vae = family.vae
        x_0 = vae.encode(pair_pixels(batch, label)).latent_dist.sample(generator=generator)
        x_0 = (x_0 - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn((4, *x_0.shape[1:]), generator=generator).repeat(2, 1, 1, 1)
        # FLUX's schedule shifts by resolution at inference only: training sigmas are unshifted.
        sigmas = logit_normal_sigmas(generator, 4, shift=1.0).repeat(2)
        x_t = (1 - sigmas.view(-1, 1, 1, 1)) * x_0 + sigmas.view(-1, 1, 1, 1) * noise
        pipe = FluxPipeline.from_pretrained(tiny_flow_assets["flux"], transformer=None, vae=None)
        embeds, pooled, text_ids = pipe.encode_prompt(batch["train_captions"], None, max_sequence_length=16)
        _, channels, height, width = x_0.shape
        image_ids = torch.zeros(height // 2, width // 2, 3)
        image_ids[..., 1] = torch.arange(height // 2)[:, None]
        image_ids[..., 2] = torch.arange(width // 2)[None, :]

        def predict():
            packed = transformer(
                hidden_states=pack(x_t),
                timestep=sigmas,
                guidance=torch.full((8,), 2.0),
                encoder_hidden_states=embeds.repeat(2, 1, 1),
                pooled_projections=pooled.repeat(2, 1),
                txt_ids=text_ids,
                img_ids=image_ids.reshape(-1, 3),
            ).sample
            return unpack(packed, channels, height, width)

        prediction = predict()
        transformer.disable_adapters()  # without a dynamic reference, the reference is the base model
        reference = predict()
        transformer.enable_adapters()
    expected, h = flow_dpo_losses(prediction, reference, noise - x_0, sigmas, label, prob, 500.0, "logit_normal")
    assert h.abs().max() > 0.05, "the test needs the policy and the reference to disagree"
    torch.testing.assert_close(losses.double(), expected, rtol=1e-4, atol=1e-6)
    (noised,) = noised_seen
    assert torch.equal(noised.timesteps[:4], noised.timesteps[4:])
    torch.testing.assert_close(noised.target + x_0, noise, rtol=0, atol=1e-5)

    # A micro-step and an optimizer step: only the policy LoRA gets gradients and moves; the base model, the
    # reference here, never does.
    trainer.reset_step()
    grad_enabled = []
    predict_ = family.predict
    family.predict = lambda *a: grad_enabled.append(torch.is_grad_enabled()) or predict_(*a)
    base = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" not in n}
    policy = {n: p.detach().clone() for n, p in transformer.named_parameters() if ".default." in n}
    assert trainer.accumulate(batch, trainer.consensus(batch)) > 0
    assert grad_enabled == [True, False], "the reference forward must run without gradients"
    for name, param in transformer.named_parameters():
        if name in policy:
            assert param.grad is not None and param.grad.abs().max() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, f"{name} got a gradient"
    assert trainer.optimizer_step().status == "stepped"
    named = dict(transformer.named_parameters())
    assert all(torch.equal(named[n], value) for n, value in base.items()), "the optimizer moved the base model"
    assert any(not torch.equal(named[n], value) for n, value in policy.items())


# ----------------------------------------------------------------------------------------------------------------
# Sampling; schnell
# ----------------------------------------------------------------------------------------------------------------


def test_sampled_latents_unpack_and_decode_to_the_pipelines_own_images(
    tiny_flow_assets, tmp_path, fresh_accelerate_state
):
    from diffusers import FluxPipeline

    prompts = ["a red circle on a white background", "a green triangle"]
    trainer, pairs = flux_trainer(tiny_flow_assets, tmp_path)
    family = trainer.family
    latents = family.sample_latents(
        family.validation_pipeline(), prompts, [torch.Generator().manual_seed(s) for s in (5, 6)], 3, 3.5
    )
    pipe = FluxPipeline.from_pretrained(tiny_flow_assets["flux"])
    pipe.set_progress_bar_config(disable=True)
    expected = generate(pipe, prompts, seed=5, steps=3, guidance_scale=3.5)
    decoded = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in family.decode_latents(latents)])
    np.testing.assert_allclose(decoded, expected, atol=1.5 / 255)  # PIL's 8 bits
    batch = batch_of(trainer, pairs, range(1))
    with torch.no_grad():
        encoded = family.scale_latents(family.vae.encode(batch["pixel_values_0"]).latent_dist.mode())
    assert latents.shape == (2, *encoded.shape[1:]) == (2, 16, 16, 16)


def test_schnell_takes_no_guidance_and_defaults_to_its_length_steps_and_licence(
    tiny_flow_assets, tmp_path, fresh_accelerate_state
):
    from accelerate import PartialState

    import tiny_assets
    import train_balanced_dpo_flux

    PartialState(cpu=True)  # the training scripts log through accelerate

    schnell = tiny_assets.build_tiny_flux_pipeline(str(tmp_path / "schnell"), guidance_embeds=False)
    args = base_args(schnell, tiny_flow_assets, tmp_path / "out", "--reward_models", "clip,aesthetic")
    del args[args.index("--max_sequence_length") : args.index("--max_sequence_length") + 2]
    family = train_balanced_dpo_flux.FluxFamily.from_pretrained(
        train_balanced_dpo_flux.parse_args(args), torch.device("cpu"), torch.float32
    )
    assert not family.guidance_embeds and family.max_sequence_length == 256
    assert family.validation_call_kwargs()["num_inference_steps"] == 4
    assert family.license_fields() == {"license": "apache-2.0"}
    seen = {}
    forward = family.denoiser.forward

    def recording_forward(*args, **kwargs):
        seen.update(kwargs)
        return forward(*args, **kwargs)

    family.denoiser.forward = recording_forward
    latents = torch.randn(4, 16, 16, 16)
    noised = family.noised_pairs(latents, torch.Generator().manual_seed(0))
    embeds = family.prompt_embeddings.encode_captions(["a cat", "a dog"])
    conditioning = family.conditioning_kwargs([e.repeat(2, *([1] * (e.ndim - 1))) for e in embeds])
    with torch.no_grad():
        prediction = family.predict(family.denoiser, noised, conditioning)
    assert prediction.shape == latents.shape and seen["guidance"] is None
    assert seen["encoder_hidden_states"].shape[1] == 256


# ----------------------------------------------------------------------------------------------------------------
# Two processes training online; the NF4 base
# ----------------------------------------------------------------------------------------------------------------


def test_two_processes_train_online_on_pairs_they_generate_with_cached_embeddings(tiny_flow_assets, tmp_path):
    from diffusers import FluxPipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\na blue square\na green triangle\na yellow circle\n")
    output_dir = str(tmp_path / "out")
    args = base_args(tiny_flow_assets["flux"], tiny_flow_assets, output_dir, "--reward_models", "clip,aesthetic")
    # Rounds of 4 prompts x 2 images (each process samples 2 prompts), one pair per prompt, one pair per process and
    # step: 2 optimizer steps per round; the reference follows the policy at each round's end (iterative DPO).
    del args[args.index("--dataset_name") : args.index("--dataset_name") + 2]
    args += [
        "--online_prompts", str(prompts), "--online_round_prompts", "4", "--online_images_per_prompt", "2",
        "--online_num_inference_steps", "2", "--train_batch_size", "1", "--max_train_steps", "3",
        "--checkpointing_steps", "2", "--cache_text_embeddings", "--online_ref_update", "round",
    ]  # fmt: skip
    result = torchrun(SCRIPT, args)
    assert result.returncode == 0, result.stderr[-8000:]
    assert "DistributedType.MULTI_CPU" in result.stderr and "Num processes: 2" in result.stderr
    assert "text encoders freed" in result.stderr
    scalars = read_scalars(output_dir)
    assert scalars["online/images"] == [(0, 8.0), (2, 8.0)]
    assert [v for _, v in scalars["pairs"]] == [2.0, 2.0, 2.0]
    names = os.listdir(os.path.join(output_dir, "checkpoint-2"))
    assert {"online_round_0.safetensors", "online_round_1.safetensors", "reference_lora_weights.safetensors"} <= set(
        names
    )
    pipe = FluxPipeline.from_pretrained(tiny_flow_assets["flux"], vae=None)
    assert_peft_lora_of(output_dir, pipe.transformer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the NF4 run below is the test")
def test_nf4_base_without_a_gpu_is_an_argument_error_naming_the_fix(tmp_path):
    import train_balanced_dpo_flux

    args = train_balanced_dpo_flux.parse_args(
        ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(tmp_path / "no-data"),
         "--output_dir", str(tmp_path / "out"), "--quantize_base", "nf4"]
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"--quantize_base nf4 needs a GPU.*Drop --quantize_base"):
        train_balanced_dpo_flux.main(args)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' 4-bit quantization needs a GPU")
def test_nf4_base_trains_a_lora_that_loads_into_the_unquantized_pipeline(tiny_flow_assets, tmp_path):
    import bitsandbytes as bnb

    import train_balanced_dpo_flux

    output_dir = str(tmp_path / "out")
    seen = {}
    load_transformer = train_balanced_dpo_flux.FluxFamily.load_transformer.__func__

    def recording_load(cls, *a, **k):
        transformer = load_transformer(cls, *a, **k)
        seen["4bit"] = any(isinstance(m, bnb.nn.Linear4bit) for m in transformer.modules())
        return transformer

    argv = base_args(
        tiny_flow_assets["flux"], tiny_flow_assets, output_dir, "--reward_models", "clip,aesthetic",
        "--quantize_base", "nf4", "--mixed_precision", "bf16", "--max_train_steps", "2", "--report_to", "none",
        "--validation_prompts", PROMPT, "--validation_inference_steps", "2",
    )  # fmt: skip
    train_balanced_dpo_flux.FluxFamily.load_transformer = classmethod(recording_load)
    try:
        run_script(train_balanced_dpo_flux, argv)
    finally:
        train_balanced_dpo_flux.FluxFamily.load_transformer = classmethod(load_transformer)
    assert seen["4bit"], "the base transformer was not quantized"
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flow_assets["flux"], vae=None)
    pipe.load_lora_weights(output_dir, weight_name=LORA_NAME)
    assert_peft_lora_of(output_dir, pipe.transformer)


def test_nf4_base_loads_the_transformer_through_diffusers_bitsandbytes_config(monkeypatch):
    """What `--quantize_base nf4` asks of diffusers (the 4-bit quantization itself needs a GPU)."""
    import peft
    from diffusers import BitsAndBytesConfig

    import train_balanced_dpo_flux

    calls = {}

    class Transformer(torch.nn.Module):
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            calls["from_pretrained"] = (path, kwargs)
            return cls()

    def prepare(model, use_gradient_checkpointing=True):
        calls["prepared"] = use_gradient_checkpointing
        return model

    monkeypatch.setattr(train_balanced_dpo_flux.FluxFamily, "transformer_class", Transformer)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    args = train_balanced_dpo_flux.parse_args(
        ["--pretrained_model_name_or_path", "black-forest-labs/FLUX.1-dev", "--dataset_name", "d",
         "--quantize_base", "nf4"]
    )  # fmt: skip
    train_balanced_dpo_flux.FluxFamily.load_transformer(args, torch.device("cpu"), torch.bfloat16)
    path, kwargs = calls["from_pretrained"]
    config = kwargs["quantization_config"]
    assert path == "black-forest-labs/FLUX.1-dev" and kwargs["subfolder"] == "transformer"
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["torch_dtype"] == torch.bfloat16
    assert kwargs["device_map"] == {"": torch.device("cpu")} and calls["prepared"] is False


def test_family_defaults():
    import train_balanced_dpo_flux

    args = train_balanced_dpo_flux.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    assert (args.beta_dpo, args.resolution, args.guidance_scale, args.train_batch_size) == (100.0, 1024, 3.5, 1)
    assert args.online_scheduler == "" and args.online_guidance_scale == 3.5
