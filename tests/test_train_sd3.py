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
"""Tests of train_balanced_dpo_sd3.py on a tiny SD3.5-style pipeline built locally in the real folder format: a run
through `accelerate launch` whose LoRA loads into StableDiffusion3Pipeline, the loss of a step against the Flow-DPO
formula by hand, the reference model, resuming after SIGTERM, cached text embeddings, sampling, two processes, and
argument errors."""

import os
import signal
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
    pair_pixels,
    reset_accelerate_state,
    set_random_lora_weights,
    uniform_sigmas,
    write_precomputed_consensus_dataset,
)
from launch_utils import launch, read_scalars, torchrun
from trainer_utils import batch_of, build_trainer

import training


SCRIPT = "train_balanced_dpo_sd3.py"
PROMPT = "a red circle on a white background"


def sd3_args(assets, output_dir, *extra):
    import train_balanced_dpo_sd3

    return train_balanced_dpo_sd3.parse_args(
        base_args(assets["sd3"], assets, output_dir, "--reward_models", "clip,aesthetic", *extra)
    )


@pytest.fixture
def fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def sd3_trainer(assets, tmp_path, *extra):
    from accelerate import Accelerator

    import train_balanced_dpo_sd3

    torch.manual_seed(0)  # the LoRA's random initialisation
    args = sd3_args(assets, tmp_path, *extra)
    return build_trainer(Accelerator(cpu=True), args, train_balanced_dpo_sd3.StableDiffusion3Family)


def run_pipeline(model_dir, lora_dir=None):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    images = pipe(
        PROMPT,
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    return pipe, images


# ----------------------------------------------------------------------------------------------------------------
# A real run
# ----------------------------------------------------------------------------------------------------------------


def test_smoke_live_consensus_lora_loads_into_sd3_with_its_alpha_and_changes_output(tiny_flow_assets, tmp_path):
    output_dir = str(tmp_path / "out")
    launch(
        SCRIPT,
        base_args(
            tiny_flow_assets["sd3"], tiny_flow_assets, output_dir,
            "--max_train_steps", "3",
            "--checkpointing_steps", "100",
            "--rank", "4",
            "--lora_alpha", "8",
            "--use_8bit_adam",
            "--gradient_checkpointing",
            "--validation_prompts", "a blue square on a black background",
            "--validation_inference_steps", "2",
            "--score_validation",
        ),
    )  # fmt: skip
    _, base = run_pipeline(tiny_flow_assets["sd3"])
    pipe, tuned = run_pipeline(tiny_flow_assets["sd3"], output_dir)
    state = assert_peft_lora_of(output_dir, pipe.transformer)
    # diffusers' SD3 LoRA targets: the joint attention's image and text projections.
    targeted = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in state}
    assert {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"} <= targeted
    assert base.shape == tuned.shape == (1, 32, 32, 3)
    assert abs(base - tuned).max() > 1e-4, "loading the LoRA did not change the pipeline output"
    # lora_alpha travels with the weights: the loaded LoRA has the trained scale alpha / r = 2.
    scalings = [s for m in pipe.transformer.modules() for s in getattr(m, "scaling", {}).values()]
    assert scalings and all(s == pytest.approx(2.0) for s in scalings)

    card = open(os.path.join(output_dir, "README.md")).read()
    for tag in ("diffusers", "lora", "text-to-image", "dpo", "balanced-dpo", "sd3"):
        assert f"- {tag}" in card
    assert "StableDiffusion3Pipeline" in card and "load_lora_weights" in card and "| pickscore |" in card
    assert os.path.isfile(os.path.join(output_dir, "image_0.png"))
    scalars = read_scalars(output_dir)
    for name in ("loss", "implicit_acc", "model_diff", "ref_diff", "agreement/pickscore", "agreement/aesthetic"):
        assert name in scalars, f"{name} was not logged; got {sorted(scalars)}"
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3], "metrics must be logged once per optimizer step"


# ----------------------------------------------------------------------------------------------------------------
# The loss and the reference, in-process
# ----------------------------------------------------------------------------------------------------------------


def test_a_step_loss_is_the_flow_dpo_formula_by_hand(tiny_flow_assets, tmp_path, fresh_accelerate_state):
    from diffusers import StableDiffusion3Pipeline

    trainer, pairs = sd3_trainer(
        tiny_flow_assets, tmp_path, "--label_mode", "soft", "--ref_update_steps", "1", "--weighting_scheme", "cosmap"
    )
    family, transformer = trainer.family, trainer.family.denoiser
    set_random_lora_weights(transformer)  # policy, reference adapter and base model all differ
    batch = batch_of(trainer, pairs, range(4))
    label, prob = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0.9, 0.3, 0.1, 0.6])
    start = trainer.generator.get_state()
    noised_seen = []
    noised_pairs = family.noised_pairs

    def recording_noised_pairs(latents, generator):
        noised_seen.append(noised_pairs(latents, generator))
        return noised_seen[-1]

    family.noised_pairs = recording_noised_pairs
    losses = trainer.pair_losses(batch, torch.arange(4), label, prob)

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


def test_the_reference_gets_no_gradient_and_no_update(tiny_flow_assets, tmp_path, fresh_accelerate_state):
    trainer, pairs = sd3_trainer(tiny_flow_assets, tmp_path, "--ref_update_steps", "5")
    transformer = trainer.family.denoiser
    set_random_lora_weights(transformer)
    grad_enabled = []
    predict = trainer.family.predict
    trainer.family.predict = lambda *a: grad_enabled.append(torch.is_grad_enabled()) or predict(*a)
    reference = {n: p.detach().clone() for n, p in transformer.named_parameters() if ".reference." in n}
    policy = {n: p.detach().clone() for n, p in transformer.named_parameters() if ".default." in n}
    assert reference and policy

    batch = batch_of(trainer, pairs, range(4))
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
# Checkpoints, resume and signals, in-process
# ----------------------------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(
    tiny_flow_assets, tmp_path, monkeypatch, fresh_accelerate_state
):
    import train_balanced_dpo_sd3

    # Accumulation, soft labels, a dynamic reference updated between the interruption and the end, random crops.
    common = (
        "--reward_models", "clip,aesthetic", "--consensus", "mean_prob", "--label_mode", "soft",
        "--gradient_accumulation_steps", "2", "--train_batch_size", "2", "--ref_update_steps", "2", "--random_crop",
        "--checkpointing_steps", "1", "--report_to", "none", "--max_train_steps", "3",
    )  # fmt: skip

    def run(output_dir, *extra):
        reset_accelerate_state()
        args = base_args(tiny_flow_assets["sd3"], tiny_flow_assets, output_dir, *common, *extra)
        return train_balanced_dpo_sd3.main(train_balanced_dpo_sd3.parse_args(args))

    straight = str(tmp_path / "straight")
    run(straight)

    calls = []
    accumulate = training.DPOTrainer.accumulate

    def accumulate_then_signal(self, batch, labels):
        calls.append(1)
        result = accumulate(self, batch, labels)
        if len(calls) == 3:  # the first micro-batch of optimizer step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    interrupted = str(tmp_path / "interrupted")
    monkeypatch.setattr(training.DPOTrainer, "accumulate", accumulate_then_signal)
    assert run(interrupted) is None, "an interrupted run returns no LoRA"
    assert len(calls) == 3 and training.list_checkpoints(interrupted) == ["checkpoint-1"]
    assert not os.path.exists(os.path.join(interrupted, LORA_NAME))
    monkeypatch.setattr(training.DPOTrainer, "accumulate", accumulate)
    assert run(interrupted, "--resume_from_checkpoint", "latest")
    assert_same_lora(straight, interrupted)
    assert os.path.isfile(os.path.join(interrupted, "checkpoint-3", "reference_lora_weights.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# Cached text embeddings and sampling
# ----------------------------------------------------------------------------------------------------------------


def test_cached_text_embeddings_free_the_encoders_and_condition_the_same(
    tiny_flow_assets, tmp_path, fresh_accelerate_state
):
    prompts = ["a blue square on a black background"]
    plain, pairs = sd3_trainer(tiny_flow_assets, tmp_path / "plain")
    reset_accelerate_state()
    cached, cached_pairs = sd3_trainer(
        tiny_flow_assets, tmp_path / "cached", "--cache_text_embeddings", "--validation_prompts", *prompts
    )
    assert cached.family.text_encoders is None and cached.family.prompt_embeddings.released
    assert cached.family.tokenize_fn() is None, "cached captions need no token ids"
    index, label = torch.arange(4), torch.tensor([1.0, 0.0, 1.0, 1.0])
    expected = plain.family.conditioning(batch_of(plain, pairs, range(4)), index, label)
    got = cached.family.conditioning(batch_of(cached, cached_pairs, range(4)), index, label)
    assert expected.keys() == got.keys()
    for key in expected:
        assert got[key].shape[0] == 8  # winners and losers
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    # The validation pipeline works without any text encoder, and gives the images of the one with encoders.
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
    images = [
        trainer.family.validation_pipeline()(prompts[0], generator=torch.Generator().manual_seed(1), **kwargs).images
        for trainer in (plain, cached)
    ]
    np.testing.assert_allclose(images[1], images[0], atol=1e-5)
    with pytest.raises(RuntimeError, match="not in the text-embedding cache"):
        cached.family.validation_pipeline()("a prompt never encoded", **kwargs)


def test_sampled_latents_decode_to_the_pipelines_own_images(tiny_flow_assets, tmp_path, fresh_accelerate_state):
    from diffusers import StableDiffusion3Pipeline

    trainer, pairs = sd3_trainer(tiny_flow_assets, tmp_path)
    family = trainer.family
    prompts = ["a red circle on a white background", "a green triangle"]
    latents = family.sample_latents(
        family.validation_pipeline(), prompts, [torch.Generator().manual_seed(s) for s in (5, 6)], 3, 4.0
    )
    expected = StableDiffusion3Pipeline.from_pretrained(tiny_flow_assets["sd3"])(
        prompts,
        generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
        num_inference_steps=3,
        guidance_scale=4.0,
        height=32,
        width=32,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="np",
    ).images
    decoded = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in family.decode_latents(latents)])
    np.testing.assert_allclose(decoded, expected, atol=1.5 / 255)  # PIL's 8 bits
    # In the training space: what scale_latents(VAE sample) gives for an image at the training resolution.
    batch = batch_of(trainer, pairs, range(1))
    with torch.no_grad():
        encoded = family.scale_latents(family.vae.encode(batch["pixel_values_0"]).latent_dist.mode())
    assert latents.shape == (2, *encoded.shape[1:]) == (2, 16, 16, 16)


# ----------------------------------------------------------------------------------------------------------------
# Two processes; argument errors
# ----------------------------------------------------------------------------------------------------------------


def test_two_processes_precomputed_soft_consensus_and_dynamic_reference(tiny_flow_assets, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    dataset, kept = write_precomputed_consensus_dataset(str(tmp_path / "labelled"))
    output_dir = str(tmp_path / "out")
    args = base_args(
        tiny_flow_assets["sd3"], tiny_flow_assets, output_dir, "--precomputed_consensus", "--label_mode", "soft",
        "--ref_update_steps", "1", "--checkpointing_steps", "2", "--report_to", "tensorboard",
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
    assert {training.generator_state_name(i) for i in range(2)} | {"reference_lora_weights.safetensors"} <= set(names)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_flow_assets["sd3"])
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, NF4 runs (tests/test_train_flux.py has the GPU run)")
def test_nf4_base_without_a_gpu_is_an_argument_error_naming_the_fix(tmp_path):
    import train_balanced_dpo_sd3

    args = train_balanced_dpo_sd3.parse_args(
        ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(tmp_path / "no-data"),
         "--output_dir", str(tmp_path / "out"), "--quantize_base", "nf4"]
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"--quantize_base nf4 needs a GPU.*Drop --quantize_base"):
        train_balanced_dpo_sd3.main(args)
    assert not os.path.exists(tmp_path / "out")
