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
"""Tests of train_balanced_dpo_sdxl.py: SDXL helpers in-process, and training runs through `accelerate launch` on
tiny local models and data."""

import json
import os
import shutil

import pytest
import torch
from launch_utils import launch, read_scalars
from PIL import Image
from safetensors.torch import load_file


SCRIPT = "train_balanced_dpo_sdxl.py"


def base_args(assets, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", assets["sdxl"],
        "--dataset_name", assets["pickapic"],
        "--reward_config", assets["reward_config"],
        "--output_dir", output_dir,
        "--resolution", "32",
        "--train_batch_size", "4",
        "--learning_rate", "1e-3",
        "--beta_dpo", "500",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def run_pipeline(model_dir, lora_dir=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        "a red circle on a white background",
        num_inference_steps=1,
        height=32,
        width=32,
        generator=generator,
        output_type="np",
    ).images
    return pipe, images


def checkpoints(output_dir):
    return sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint"))


# ----------------------------------------------------------------------------------------------------------------
# Helpers, in-process
# ----------------------------------------------------------------------------------------------------------------


def test_time_ids_use_each_images_real_size_and_crop_in_winner_loser_order():
    import preference_data
    from train_balanced_dpo_sdxl import compute_time_ids, pair_time_ids

    transform = preference_data.PairTransform(32, center_crop=True, random_flip=False)
    # Pair 0: a landscape image 0 (h 40, w 80) and a portrait image 1 (h 100, w 40); pair 1: the other way round.
    wide, tall = Image.new("RGB", (80, 40), (200, 0, 0)), Image.new("RGB", (40, 100), (0, 0, 200))
    items = [
        {"index": 0, "caption": "a", "train_caption": "a", "label_0": 1.0, **transform(wide, tall)},
        {"index": 1, "caption": "b", "train_caption": "b", "label_0": 0.0, **transform(tall, wide)},
    ]
    batch = preference_data.PairCollator(resolution=32)(items)
    # Center crops: the wide image is resized to 32 x 64 and cropped 16 px from the left; the tall one to 80 x 32
    # and cropped 24 px from the top. Target size is (resolution, resolution).
    wide_ids = torch.tensor([40.0, 80.0, 0.0, 16.0, 32.0, 32.0])
    tall_ids = torch.tensor([100.0, 40.0, 24.0, 0.0, 32.0, 32.0])

    ids = compute_time_ids(batch["original_sizes"], batch["crop_top_lefts"], 32)
    assert ids.shape == (2, 2, 6) and ids.dtype == torch.float32
    torch.testing.assert_close(ids[0], torch.stack([wide_ids, tall_ids]))
    torch.testing.assert_close(ids[1], torch.stack([tall_ids, wide_ids]))

    # Label 1 = image 0 wins, 0 = image 1 wins: winners of both pairs first, then the losers, like the latents.
    ordered = pair_time_ids(batch["original_sizes"], batch["crop_top_lefts"], torch.tensor([1.0, 0.0]), 32)
    torch.testing.assert_close(ordered, torch.stack([wide_ids, wide_ids, tall_ids, tall_ids]))
    ordered = pair_time_ids(batch["original_sizes"], batch["crop_top_lefts"], torch.tensor([0.0, 1.0]), 32)
    torch.testing.assert_close(ordered, torch.stack([tall_ids, tall_ids, wide_ids, wide_ids]))


def test_turbo_grid_and_zero_terminal_snr(tmp_path):
    from accelerate import PartialState
    from diffusers import DDPMScheduler

    from train_balanced_dpo_sdxl import ZERO_SNR_ALPHA_CUMPROD, load_noise_scheduler, parse_args, turbo_timesteps

    PartialState()  # accelerate's logger needs it
    torch.manual_seed(0)
    timesteps = turbo_timesteps(4000, 1000)
    assert sorted(set(timesteps.tolist())) == [249, 499, 749, 999]

    for prediction_type, expected_last in (("epsilon", ZERO_SNR_ALPHA_CUMPROD), ("v_prediction", 0.0)):
        model_dir = tmp_path / prediction_type
        DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type).save_pretrained(
            model_dir / "scheduler"
        )
        args = parse_args(["--pretrained_model_name_or_path", str(model_dir), "--dataset_name", "unused"])
        scheduler = load_noise_scheduler(args)
        assert scheduler.alphas_cumprod[-1].item() == expected_last
        assert scheduler.alphas_cumprod[:-1].min() > 0
        noisy = scheduler.add_noise(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([999]))
        assert noisy.abs().max() == pytest.approx(expected_last**0.5)  # the clean image is never fully erased


def test_prompt_encoder_cache_matches_direct_encoding(tiny_assets_dir):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from train_balanced_dpo_sdxl import TokenizeCaptions, encode_prompt, prompt_embeddings

    path = tiny_assets_dir["sdxl"]
    tokenizers = [
        AutoTokenizer.from_pretrained(path, subfolder=s, use_fast=False) for s in ("tokenizer", "tokenizer_2")
    ]
    encoders = (
        CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
    )
    captions = ["a red circle", "", "a blue square", "a red circle"]
    batch = {"train_captions": captions, **TokenizeCaptions(tokenizers)(captions)}
    index = torch.tensor([3, 1, 2])

    direct = prompt_embeddings(tokenizers, encoders, "cpu")(batch, index)
    assert direct[0].shape == (3, 77, 64) and direct[1].shape == (3, 32)  # 32 + 32 hidden, pooled from encoder 2
    expected = encode_prompt(encoders, [batch["input_ids"][index], batch["input_ids_2"][index]])
    torch.testing.assert_close(direct, expected)

    # On-the-fly cache, bounded: the least recently used caption is evicted, results stay right.
    on_the_fly = prompt_embeddings(tokenizers, encoders, "cpu", cache=True, max_entries=2)
    for _ in range(2):
        torch.testing.assert_close(on_the_fly(batch, index), direct, rtol=1e-5, atol=1e-6)
    assert len(on_the_fly.cache) == 2

    # Precomputed cache, encoders released: no text encoder runs during training.
    precomputed = prompt_embeddings(tokenizers, encoders, "cpu", cache=True)
    assert precomputed.precompute(captions) == 3
    precomputed.release_text_encoders()
    torch.testing.assert_close(precomputed(batch, index), direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="not precomputed"):
        precomputed({"train_captions": ["never seen"]}, torch.tensor([0]))


# ----------------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------------


def test_smoke_live_consensus_lora_loads_into_sdxl_and_changes_output(tiny_assets_dir, tmp_path):
    output_dir = str(tmp_path / "out")
    launch(
        SCRIPT,
        base_args(
            tiny_assets_dir, output_dir,
            "--max_train_steps", "3",
            "--checkpointing_steps", "100",
            "--rank", "4",
            "--lora_alpha", "8",
            "--use_8bit_adam",
            "--gradient_checkpointing",
            "--validation_prompts", "a blue square on a black background",
            "--validation_inference_steps", "1",
            "--score_validation",
        ),
    )  # fmt: skip
    from diffusers import UNet2DConditionModel

    state = load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    unet_modules = {
        name
        for name, _ in UNet2DConditionModel.from_pretrained(tiny_assets_dir["sdxl"], subfolder="unet").named_modules()
    }
    assert state and all(torch.isfinite(v).all() for v in state.values())
    for key in state:
        # diffusers' format (lora.down / lora.up), which `convert_state_dict_to_diffusers` writes, or peft's.
        assert key.startswith("unet.") and any(f".{w}." in key for w in ("lora.down", "lora.up", "lora_A", "lora_B"))
        module = key[len("unet.") :].split(".lora")[0]
        assert module in unet_modules, f"{key} names no UNet module"

    _, base = run_pipeline(tiny_assets_dir["sdxl"])
    pipe, tuned = run_pipeline(tiny_assets_dir["sdxl"], output_dir)
    assert base.shape == tuned.shape
    assert abs(base - tuned).max() > 1e-4, "loading the LoRA did not change the pipeline output"
    # lora_alpha travels with the weights: the loaded LoRA has the trained scale alpha / r = 2.
    scalings = [s for m in pipe.unet.modules() for s in getattr(m, "scaling", {}).values()]
    assert scalings and all(s == pytest.approx(2.0) for s in scalings)

    card = open(os.path.join(output_dir, "README.md")).read()
    for tag in ("diffusers", "lora", "text-to-image", "dpo", "balanced-dpo", "stable-diffusion-xl"):
        assert f"- {tag}" in card
    assert "load_lora_weights" in card and "majority" in card
    assert "| pickscore |" in card, "validation scores missing from the model card"

    scalars = read_scalars(output_dir)
    for name in ("loss", "implicit_acc", "model_diff", "ref_diff", "dropped_share", "differs_from_human",
                 "scoring_time_share", "agreement/pickscore", "agreement/hpsv2", "agreement/clip", "agreement/aesthetic"):  # fmt: skip
        assert name in scalars, f"{name} was not logged; got {sorted(scalars)}"
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3], "metrics must be logged once per optimizer step"


# Shared by the resume and the cached-embeddings tests: accumulation, random crops, empty prompts, reference updates.
RESUME_ARGS = (
    "--reward_models", "clip,aesthetic",
    "--gradient_accumulation_steps", "2",
    "--train_batch_size", "3",
    "--random_crop",
    "--ref_update_steps", "2",
    "--proportion_empty_prompts", "0.3",
)  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(tiny_assets_dir, tmp_path_factory):
    """An uninterrupted run of 4 optimizer steps."""
    output_dir = str(tmp_path_factory.mktemp("straight") / "out")
    launch(
        SCRIPT,
        base_args(tiny_assets_dir, output_dir, "--max_train_steps", "4", "--checkpointing_steps", "100", *RESUME_ARGS),
    )
    return output_dir


def test_resume_equals_uninterrupted_and_checkpoint_limit(tiny_assets_dir, straight_run, tmp_path):
    resumed = str(tmp_path / "resumed")
    common = ("--checkpointing_steps", "1", "--checkpoints_total_limit", "1", *RESUME_ARGS)
    launch(SCRIPT, base_args(tiny_assets_dir, resumed, "--max_train_steps", "2", *common))
    assert checkpoints(resumed) == ["checkpoint-2"]

    launch(
        SCRIPT,
        base_args(tiny_assets_dir, resumed, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common),
    )
    assert checkpoints(resumed) == ["checkpoint-4"], "resuming must keep pruning old checkpoints"
    assert not [d for d in os.listdir(resumed) if d.endswith(".tmp")]
    assert sorted(step for step, _ in read_scalars(resumed)["loss"]) == [1, 2, 3, 4]

    a = load_file(os.path.join(straight_run, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(resumed, "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{key} differs after resume")
    # Sanity: training moved the weights (B starts at zero), so the comparison above is not trivially true.
    assert any(v.abs().max() > 0 for k, v in a.items() if ".lora.up." in k or ".lora_B." in k)


def test_cached_text_embeddings_give_the_same_loss(tiny_assets_dir, straight_run, tmp_path):
    cached = str(tmp_path / "cached")
    result = launch(
        SCRIPT,
        base_args(
            tiny_assets_dir, cached, "--max_train_steps", "2", "--cache_text_embeddings", *RESUME_ARGS
        ),
    )  # fmt: skip
    assert "text encoders freed" in result.stdout + result.stderr

    # At step 1 the policy equals the reference (LoRA B = 0), so the loss is log 2 whatever the conditioning: the
    # errors themselves (model_diff, ref_diff) and the step-2 loss are what show the embeddings are the same.
    a, b = ({k: sorted(v) for k, v in read_scalars(d).items()} for d in (straight_run, cached))
    for name in ("loss", "model_diff", "ref_diff"):
        for step in (0, 1):
            assert a[name][step][0] == b[name][step][0] == step + 1
            assert b[name][step][1] == pytest.approx(a[name][step][1], rel=1e-4, abs=1e-7), (name, step + 1)
    assert a["loss"][1][1] != pytest.approx(a["loss"][0][1], abs=1e-6), "step 2 should have moved the loss"


def test_turbo_run_on_a_zero_terminal_snr_schedule(tiny_assets_dir, tmp_path):
    model_dir = tmp_path / "sdxl_turbo"
    shutil.copytree(tiny_assets_dir["sdxl"], model_dir)
    config_path = model_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(
        {
            "_class_name": "EulerAncestralDiscreteScheduler",
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
        }
    )
    config_path.write_text(json.dumps(config))

    output_dir = str(tmp_path / "out")
    args = base_args(
        tiny_assets_dir, output_dir, "--is_turbo", "--reward_models", "clip,aesthetic", "--max_train_steps", "2",
        "--validation_prompts", "a blue square on a black background",
    )  # fmt: skip
    args[args.index(tiny_assets_dir["sdxl"])] = str(model_dir)
    launch(SCRIPT, args)
    state = load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(torch.isfinite(torch.tensor(v)) for _, v in read_scalars(output_dir)["loss"])
    card = open(os.path.join(output_dir, "README.md")).read()
    assert "guidance_scale=0.0" in card and os.path.isfile(os.path.join(output_dir, "image_0.png"))
