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
"""Tests of train_balanced_dpo_sd3.py on a tiny SD3.5-style pipeline built locally in the real folder format.

Few runs, each checked for many things: one run (live consensus, soft labels, a dynamic reference, checkpoints,
validation, model card) equals the same run stopped by SIGTERM and resumed, and its LoRA loads into
StableDiffusion3Pipeline with its alpha, changes its output and is evaluated by evaluate_balanced_dpo.py; the loss of
a step equals the Flow-DPO formula by hand (same sigma and noise for winner and loser) and the reference gets no
gradient; cached text embeddings condition and sample as the pipeline does; two processes; argument errors."""

import json
import os
import time

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
    pair_pixels,
    run_script,
    set_random_lora_weights,
    uniform_sigmas,
    write_precomputed_consensus_dataset,
)
from launch_utils import read_scalars, torchrun
from trainer_utils import batch_of

import run_state


SCRIPT = "train_balanced_dpo_sd3.py"
PROMPT = "a red circle on a white background"
VALIDATION_PROMPT = "a blue square on a black background"


pytestmark = pytest.mark.usefixtures("one_thread")


def sd3_trainer(assets, output_dir, *extra):
    import train_balanced_dpo_sd3

    return human_label_trainer(
        train_balanced_dpo_sd3,
        train_balanced_dpo_sd3.StableDiffusion3Family,
        assets["sd3"],
        assets,
        output_dir,
        *extra,
    )


def generate(pipe, prompts=PROMPT, seed=0, steps=2, guidance_scale=7.0):
    return generate_images(pipe, prompts, seed, steps, guidance_scale)


# ----------------------------------------------------------------------------------------------------------------
# A run, the same run interrupted and resumed, its LoRA in the pipeline and in the evaluation
# ----------------------------------------------------------------------------------------------------------------


def test_run_equals_its_resumed_run_and_its_lora_loads_with_alpha_changes_output_and_evaluates(
    tiny_flow_assets, tmp_path, monkeypatch
):
    from diffusers import StableDiffusion3Pipeline

    import evaluate_balanced_dpo
    import train_balanced_dpo_sd3

    assets = tiny_flow_assets
    # Live mean-probability consensus of four scorers with soft labels, accumulation, a dynamic reference updated
    # after the interruption, random crops, LoRA alpha 2 x rank, 8-bit Adam, gradient checkpointing.
    common = (
        "--consensus", "mean_prob", "--label_mode", "soft", "--gradient_accumulation_steps", "2",
        "--train_batch_size", "2", "--ref_update_steps", "2", "--random_crop", "--rank", "4", "--lora_alpha", "8",
        "--use_8bit_adam", "--gradient_checkpointing", "--checkpointing_steps", "1", "--max_train_steps", "3",
    )  # fmt: skip

    def run(output_dir, *extra):
        return run_script(train_balanced_dpo_sd3, base_args(assets["sd3"], assets, output_dir, *common, *extra))

    straight = str(tmp_path / "straight")
    validation = ("--validation_prompts", VALIDATION_PROMPT, "--validation_inference_steps", "2", "--score_validation")
    assert run(straight, *validation) == os.path.join(straight, LORA_NAME)
    interrupted = str(tmp_path / "interrupted")
    # The signal comes after the first micro-batch of step 2: that partial step is redone on resuming.
    assert interrupt_then_resume(monkeypatch, lambda *a: run(*a, "--report_to", "none"), interrupted, 3) == [
        "checkpoint-1"
    ]
    assert_same_lora(straight, interrupted)
    assert os.path.isfile(os.path.join(interrupted, "checkpoint-3", "reference_lora_weights.safetensors"))

    # Metrics once per optimizer step; the model card with SD3's licence, tags, scores and usage.
    scalars = read_scalars(straight)
    for name in ("loss", "implicit_acc", "model_diff", "ref_diff", "agreement/pickscore", "agreement/aesthetic"):
        assert name in scalars, f"{name} was not logged; got {sorted(scalars)}"
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
    card = open(os.path.join(straight, "README.md")).read()
    for line in ("license: other", "license_name: stabilityai-ai-community", "- sd3", "- balanced-dpo", "- lora"):
        assert line in card, line
    assert "StableDiffusion3Pipeline" in card and "load_lora_weights" in card and "| pickscore |" in card
    assert os.path.isfile(os.path.join(straight, "image_0.png"))

    # The LoRA loads into the pipeline with its alpha (scale alpha / r = 2) and changes what it generates.
    pipe = StableDiffusion3Pipeline.from_pretrained(assets["sd3"])
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe)
    pipe.load_lora_weights(straight, weight_name=LORA_NAME)
    tuned = generate(pipe)
    state = assert_peft_lora_of(straight, pipe.transformer)
    # diffusers' SD3 LoRA targets: the joint attention's image and text projections.
    targeted = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in state}
    assert {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"} <= targeted
    scalings = [s for m in pipe.transformer.modules() for s in getattr(m, "scaling", {}).values()]
    assert scalings and all(s == pytest.approx(2.0) for s in scalings)
    assert base.shape == tuned.shape == (1, 32, 32, 3)
    assert abs(base - tuned).max() > 1e-4, "loading the LoRA did not change the pipeline output"

    # The evaluation detects the family and compares the LoRA with the base model.
    assert evaluate_balanced_dpo.detect_model_family(assets["sd3"]) == "sd3"
    results = evaluate_balanced_dpo.main(
        evaluate_balanced_dpo.parse_args(
            ["--pretrained_model_name_or_path", assets["sd3"], "--lora_a", straight, "--prompts", assets["pickapic"],
             "--max_prompts", "2", "--reward_models", "clip", "--reward_config", assets["reward_config"],
             "--num_inference_steps", "2", "--resolution", "32", "--max_sequence_length", str(MAX_SEQUENCE_LENGTH),
             "--bootstrap_samples", "100", "--output_dir", str(tmp_path / "eval")]
        )
    )  # fmt: skip
    assert results["num_prompts"] == 2 and results["generation"]["guidance_scale"] == 7.0  # the pipeline's default
    records = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert any(r["scores_a"] != r["scores_b"] for r in records), "the LoRA made no difference to the evaluation"


# ----------------------------------------------------------------------------------------------------------------
# The loss and the reference, in-process
# ----------------------------------------------------------------------------------------------------------------


def test_a_step_loss_is_the_flow_dpo_formula_by_hand_and_the_reference_gets_no_gradient(
    tiny_flow_assets, tmp_path, fresh_accelerate_state
):
    from diffusers import StableDiffusion3Pipeline

    trainer, pairs = sd3_trainer(
        tiny_flow_assets, tmp_path, "--label_mode", "soft", "--ref_update_steps", "5", "--weighting_scheme", "cosmap"
    )
    family, transformer = trainer.family, trainer.family.denoiser
    set_random_lora_weights(transformer)  # policy, reference adapter and base model all differ
    batch = batch_of(trainer, pairs, range(4))
    label, prob = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0.9, 0.3, 0.1, 0.6])
    start = trainer.generator.get_state()
    noised_seen = []
    noised_pairs = family.noised_pairs
    family.noised_pairs = lambda latents, generator: (
        noised_seen.append(noised_pairs(latents, generator)) or (noised_seen[-1])
    )
    losses = trainer.pair_losses(batch, torch.arange(4), label, prob)
    family.noised_pairs = noised_pairs

    # By hand, with the same draws of the training generator: VAE samples, one noise per pair, then sigma.
    generator = torch.Generator().set_state(start)
    with torch.no_grad():
        vae = family.vae
        x_0 = vae.encode(pair_pixels(batch, label)).latent_dist.sample(generator=generator)
        x_0 = (x_0 - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn((4, *x_0.shape[1:]), generator=generator).repeat(2, 1, 1, 1)
        sigmas = uniform_sigmas(generator, 4, shift=3.0).repeat(2)  # cosmap draws u uniformly
        x_t = (1 - sigmas.view(-1, 1, 1, 1)) * x_0 + sigmas.view(-1, 1, 1, 1) * noise
        # The text conditioning from the pipeline's own encode_prompt.
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_flow_assets["sd3"], transformer=None, vae=None)
        embeds, _, pooled, _ = pipe.encode_prompt(
            batch["train_captions"], None, None, do_classifier_free_guidance=False, max_sequence_length=16
        )

        def predict():
            return transformer(
                hidden_states=x_t,
                timestep=1000 * sigmas,
                encoder_hidden_states=embeds.repeat(2, 1, 1),
                pooled_projections=pooled.repeat(2, 1),
            ).sample

        prediction = predict()
        transformer.set_adapter("reference")
        reference = predict()
        transformer.set_adapter("default")
    expected, h = flow_dpo_losses(prediction, reference, noise - x_0, sigmas, label, prob, 500.0, "cosmap")
    assert h.abs().max() > 0.05, "the test needs the policy and the reference to disagree"
    torch.testing.assert_close(losses.double(), expected, rtol=1e-4, atol=1e-6)
    # Winner and loser of each pair saw the same sigma and the same noise.
    (noised,) = noised_seen
    assert torch.equal(noised.timesteps[:4], noised.timesteps[4:])
    torch.testing.assert_close(noised.target + x_0, noise, rtol=0, atol=1e-5)

    # A micro-step and an optimizer step: only the policy LoRA gets gradients and moves.
    trainer.reset_step()
    transformer.train()
    grad_enabled = []
    predict_ = family.predict
    family.predict = lambda *a: grad_enabled.append(torch.is_grad_enabled()) or predict_(*a)
    reference = {n: p.detach().clone() for n, p in transformer.named_parameters() if ".reference." in n}
    policy = {n: p.detach().clone() for n, p in transformer.named_parameters() if ".default." in n}
    assert reference and policy
    assert trainer.accumulate(batch, trainer.consensus(batch)) > 0
    assert grad_enabled == [True, False], "the reference forward must run without gradients"
    for name, param in transformer.named_parameters():
        if name in policy:
            assert param.grad is not None, name
        else:
            assert param.grad is None and not param.requires_grad, f"{name} got a gradient"
    # (The last block's text queries feed only its discarded text output: their gradient is zero.)
    moved = [n for n, p in transformer.named_parameters() if n in policy and p.grad.abs().max() > 0]
    assert len(moved) > len(policy) / 2
    assert set(map(id, trainer.params)) == {id(p) for n, p in transformer.named_parameters() if n in policy}
    assert trainer.optimizer_step().status == "stepped"
    named = dict(transformer.named_parameters())
    assert all(torch.equal(named[n], value) for n, value in reference.items()), "the optimizer moved the reference"
    assert any(not torch.equal(named[n], value) for n, value in policy.items())


# ----------------------------------------------------------------------------------------------------------------
# Cached text embeddings: conditioning and sampling without text encoders
# ----------------------------------------------------------------------------------------------------------------


def test_cached_text_embeddings_free_the_encoders_and_condition_and_sample_as_the_pipeline(
    tiny_flow_assets, tmp_path, fresh_accelerate_state
):
    from diffusers import StableDiffusion3Pipeline

    prompts = ["a blue square on a black background", "a green triangle"]
    trainer, pairs = sd3_trainer(
        tiny_flow_assets, tmp_path, "--cache_text_embeddings", "--validation_prompts", *prompts
    )
    family = trainer.family
    assert family.text_encoders is None and family.prompt_embeddings.released
    assert family.tokenize_fn() is None, "cached captions need no token ids"

    # The conditioning of a batch is the pipeline's own encode_prompt of its captions, doubled (winners, losers).
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_flow_assets["sd3"])
    pipe.set_progress_bar_config(disable=True)
    batch = batch_of(trainer, pairs, range(4))
    conditioning = family.conditioning(batch, torch.arange(4), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            batch["train_captions"], None, None, do_classifier_free_guidance=False, max_sequence_length=16
        )
    torch.testing.assert_close(conditioning["encoder_hidden_states"], embeds.repeat(2, 1, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conditioning["pooled_projections"], pooled.repeat(2, 1), rtol=1e-5, atol=1e-6)

    # Sampling for online pairs (no text encoder left) decodes to the pipeline's own images, guidance included.
    sampler = family.validation_pipeline()
    latents = family.sample_latents(sampler, prompts, [torch.Generator().manual_seed(s) for s in (5, 6)], 3, 4.0)
    expected = generate(pipe, prompts, seed=5, steps=3, guidance_scale=4.0)
    decoded = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in family.decode_latents(latents)])
    np.testing.assert_allclose(decoded, expected, atol=1.5 / 255)  # PIL's 8 bits
    # In the training space: what scale_latents(VAE sample) gives for an image at the training resolution.
    with torch.no_grad():
        encoded = family.scale_latents(family.vae.encode(batch["pixel_values_0"][:1]).latent_dist.mode())
    assert latents.shape == (2, *encoded.shape[1:]) == (2, 16, 16, 16)
    with pytest.raises(RuntimeError, match="not in the text-embedding cache"):
        sampler("a prompt never encoded", num_inference_steps=2, height=32, width=32, output_type="np")


# ----------------------------------------------------------------------------------------------------------------
# Two processes; argument errors
# ----------------------------------------------------------------------------------------------------------------


def test_two_processes_precomputed_soft_consensus_and_dynamic_reference(tiny_flow_assets, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    dataset, kept = write_precomputed_consensus_dataset(str(tmp_path / "labelled"))
    output_dir = str(tmp_path / "out")
    args = base_args(
        tiny_flow_assets["sd3"], tiny_flow_assets, output_dir, "--precomputed_consensus", "--label_mode", "soft",
        "--ref_update_steps", "1", "--checkpointing_steps", "2",
    )  # fmt: skip
    args[args.index("--dataset_name") + 1] = dataset
    result = torchrun(SCRIPT, args)
    assert result.returncode == 0, result.stderr[-8000:]
    assert "DistributedType.MULTI_CPU" in result.stderr and "Num processes: 2" in result.stderr
    scalars = read_scalars(output_dir)
    # 16 rows, 4 per process and step: one epoch of 2 optimizer steps, logged once each, counting both processes.
    assert [step for step, _ in scalars["loss"]] == [1, 2]
    assert sum(value for _, value in scalars["pairs"]) == kept
    names = os.listdir(os.path.join(output_dir, "checkpoint-2"))
    assert {run_state.generator_state_name(i) for i in range(2)} | {"reference_lora_weights.safetensors"} <= set(names)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_flow_assets["sd3"], vae=None)
    assert_peft_lora_of(output_dir, pipe.transformer)


ARGUMENT_ERRORS = {
    "resolution": (["--resolution", "40"], "--resolution must be a multiple of 16"),
    "cache_size": (["--text_embeddings_cache_size", "10"], "--text_embeddings_cache_size needs --cache_text_embeddings"),
    "sequence_length": (["--max_sequence_length", "1000"], "--max_sequence_length must be in [1, 512]"),
    "weighting": (["--logit_std", "0"], "--logit_std must be positive"),
}  # fmt: skip


@pytest.mark.parametrize("case", ARGUMENT_ERRORS)
def test_argument_errors_fail_before_loading_anything(case, tmp_path):
    import train_balanced_dpo_sd3

    extra, message = ARGUMENT_ERRORS[case]
    args = train_balanced_dpo_sd3.parse_args(
        ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(tmp_path / "no-data"),
         "--output_dir", str(tmp_path / "out"), *extra]
    )  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        train_balanced_dpo_sd3.main(args)
    assert time.perf_counter() - start < 5 and not os.path.exists(tmp_path / "out")


def test_family_defaults_and_the_model_card_licence(tmp_path):
    import train_balanced_dpo_sd3

    family_class = train_balanced_dpo_sd3.StableDiffusion3Family
    args = train_balanced_dpo_sd3.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    family = family_class.__new__(family_class)
    family.args = args
    link = "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"
    community = {"license": "other", "license_name": "stabilityai-ai-community", "license_link": link}
    # No card to read (offline Hub id): SD3's own licence.
    assert family.license_fields() == community
    # A local copy of the base model's card: its licence, with the Hub link where its own link is relative.
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: stabilityai-ai-community\nlicense_link: LICENSE.md\n---\n"
    )
    args.pretrained_model_name_or_path = str(tmp_path)
    assert family.license_fields() == community
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    assert family.license_fields() == {"license": "mit"} and family.license() == "mit"

    assert (args.beta_dpo, args.resolution, args.max_sequence_length, args.weighting_scheme) == (
        100.0,
        1024,
        77,
        "logit_normal",
    )
    # Online rounds sample with the pipeline's own flow-matching scheduler.
    assert args.online_scheduler == "" and args.online_guidance_scale == 4.5
