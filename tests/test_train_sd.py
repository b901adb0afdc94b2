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
"""End-to-end tests of train_balanced_dpo.py through `accelerate launch`, on tiny local models and data."""

import json
import os
import shutil

import pytest
import torch
from launch_utils import launch, read_scalars
from safetensors.torch import load_file


SCRIPT = "train_balanced_dpo.py"


def base_args(assets, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", assets["sd"],
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


def run_pipeline(model_dir, lora_dir=None, return_pipe=False):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
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
    return (pipe, images) if return_pipe else images


def assert_lora_keys_match_unet(lora_path, model_dir):
    from diffusers import UNet2DConditionModel

    state = load_file(lora_path)
    assert state, "the LoRA file is empty"
    unet_modules = {
        name for name, _ in UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").named_modules()
    }
    for key in state:
        assert key.startswith("unet."), key
        assert any(part in key for part in (".lora.down.", ".lora.up.", ".lora_A.", ".lora_B.")), key
        module = key[len("unet.") :].split(".lora")[0]
        assert module in unet_modules, f"{key} names no UNet module"
    assert all(torch.isfinite(v).all() for v in state.values())
    return state


def test_smoke_live_consensus_lora_loads_and_changes_output(tiny_assets_dir, tmp_path):
    output_dir = str(tmp_path / "out")
    launch(
        SCRIPT,
        base_args(
            tiny_assets_dir, output_dir,
            "--max_train_steps", "3",
            "--checkpointing_steps", "100",
            "--use_8bit_adam",
            "--gradient_checkpointing",
            "--validation_prompts", "a blue square on a black background",
            "--validation_inference_steps", "1",
            "--score_validation",
            "--rank", "4",
            "--lora_alpha", "8",
        ),
    )  # fmt: skip
    lora_path = os.path.join(output_dir, "pytorch_lora_weights.safetensors")
    assert_lora_keys_match_unet(lora_path, tiny_assets_dir["sd"])

    base = run_pipeline(tiny_assets_dir["sd"])
    pipe, tuned = run_pipeline(tiny_assets_dir["sd"], output_dir, return_pipe=True)
    assert base.shape == tuned.shape
    assert abs(base - tuned).max() > 1e-4, "loading the LoRA did not change the pipeline output"
    # lora_alpha travels with the weights: the loaded LoRA has the trained scale alpha / r = 2.
    scalings = [s for m in pipe.unet.modules() for s in getattr(m, "scaling", {}).values()]
    assert scalings and all(s == pytest.approx(2.0) for s in scalings)

    card = open(os.path.join(output_dir, "README.md")).read()
    for tag in ("diffusers", "lora", "text-to-image", "dpo", "balanced-dpo"):
        assert f"- {tag}" in card
    assert "load_lora_weights" in card and "majority" in card
    assert "| pickscore |" in card, "validation scores missing from the model card"

    scalars = read_scalars(output_dir)
    for name in ("loss", "implicit_acc", "model_diff", "ref_diff", "dropped_share", "differs_from_human",
                 "scoring_time_share", "agreement/pickscore", "agreement/hpsv2", "agreement/clip", "agreement/aesthetic"):  # fmt: skip
        assert name in scalars, f"{name} was not logged; got {sorted(scalars)}"
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3], "metrics must be logged once per optimizer step"


def test_checkpoint_limit_and_resume_removes_old_checkpoints(tiny_assets_dir, tmp_path):
    output_dir = str(tmp_path / "out")
    common = ("--reward_models", "clip,aesthetic", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    launch(SCRIPT, base_args(tiny_assets_dir, output_dir, "--max_train_steps", "3", *common))
    assert sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]

    launch(
        SCRIPT,
        base_args(
            tiny_assets_dir, output_dir, "--max_train_steps", "5", "--resume_from_checkpoint", "latest", *common
        ),
    )
    assert sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]
    assert not [d for d in os.listdir(output_dir) if d.endswith(".tmp")]


@pytest.mark.parametrize("consensus", ["majority", "random_metric"])
def test_resume_equals_uninterrupted(tiny_assets_dir, tmp_path, consensus):
    common = (
        "--reward_models", "pickscore,clip,aesthetic",
        "--consensus", consensus,
        "--gradient_accumulation_steps", "2",
        "--train_batch_size", "3",
        "--random_crop",
        "--ref_update_steps", "2",
        "--proportion_empty_prompts", "0.3",
    )  # fmt: skip
    # The uninterrupted run scores each batch when it trains on it; the resumed one scores a batch ahead (default).
    straight = str(tmp_path / "straight")
    launch(
        SCRIPT,
        base_args(
            tiny_assets_dir, straight, "--max_train_steps", "4", "--checkpointing_steps", "100", "--no_score_ahead",
            *common,
        ),
    )  # fmt: skip

    resumed = str(tmp_path / "resumed")
    launch(
        SCRIPT, base_args(tiny_assets_dir, resumed, "--max_train_steps", "2", "--checkpointing_steps", "2", *common)
    )
    launch(
        SCRIPT,
        base_args(
            tiny_assets_dir, resumed, "--max_train_steps", "4", "--checkpointing_steps", "100",
            "--resume_from_checkpoint", "latest", *common,
        ),
    )  # fmt: skip
    a = load_file(os.path.join(straight, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(resumed, "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{key} differs after resume")
    # Sanity: training moved the weights, so the comparison above is not trivially true.
    assert any(v.abs().max() > 0 for k, v in a.items() if ".lora.up." in k or "lora_B" in k)


def test_v_prediction_run(tiny_assets_dir, tmp_path):
    from tiny_assets import build_tiny_sd_pipeline

    model_dir = str(tmp_path / "sd_v")
    build_tiny_sd_pipeline(model_dir, prediction_type="v_prediction")
    output_dir = str(tmp_path / "out")
    args = base_args(tiny_assets_dir, output_dir, "--max_train_steps", "2", "--consensus", "human")
    args[args.index(tiny_assets_dir["sd"])] = model_dir
    launch(SCRIPT, args)
    assert_lora_keys_match_unet(os.path.join(output_dir, "pytorch_lora_weights.safetensors"), model_dir)
    assert json.load(open(os.path.join(model_dir, "scheduler", "scheduler_config.json")))["prediction_type"] == (
        "v_prediction"
    )


def test_human_consensus_is_diffusion_dpo_with_ties_dropped(tiny_assets_dir, tmp_path):
    import datasets

    train = datasets.load_dataset(tiny_assets_dir["pickapic"], split="train")
    tie_share = sum(label == 0.5 for label in train["label_0"]) / len(train)
    assert tie_share > 0

    output_dir = str(tmp_path / "out")
    # One epoch in one step: every pair is seen once, so the dropped share must equal the share of human ties.
    launch(
        SCRIPT,
        base_args(
            tiny_assets_dir, output_dir, "--consensus", "human", "--reward_config", str(tmp_path / "missing.json"),
            "--train_batch_size", str(len(train)), "--max_train_steps", "1",
        ),
        check=False,
    )  # fmt: skip
    # A missing --reward_config is an argument error even in human mode: it must fail fast.
    assert not os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))

    args = base_args(tiny_assets_dir, output_dir, "--consensus", "human", "--train_batch_size", str(len(train)))
    args[args.index("--reward_config") + 1] = tiny_assets_dir["reward_config"]
    launch(SCRIPT, [*args, "--max_train_steps", "1"])
    scalars = read_scalars(output_dir)
    assert scalars["dropped_share"][0][1] == pytest.approx(tie_share, abs=1e-6)
    assert scalars["differs_from_human"][0][1] == 0.0
    assert "agreement/human" in scalars and scalars["agreement/human"][0][1] == 1.0
    assert "scoring_time_share" not in scalars or scalars["scoring_time_share"][0][1] == 0.0


def test_cache_latents_trains_like_encoding_every_epoch(tiny_assets_dir, tmp_path):
    # 8 rows in batches of 4 for 6 steps: three epochs, so epochs 2 and 3 reuse the cached encodings.
    common = ("--consensus", "human", "--max_train_samples", "8", "--max_train_steps", "6", "--no_hflip")
    plain, cached = str(tmp_path / "plain"), str(tmp_path / "cached")
    launch(SCRIPT, base_args(tiny_assets_dir, plain, *common))
    result = launch(SCRIPT, base_args(tiny_assets_dir, cached, *common, "--cache_latents"))
    assert "Latent cache: 16 images" in result.stdout + result.stderr  # 8 pairs, 2 images each, encoded once
    a = load_file(os.path.join(plain, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(cached, "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=f"{key} differs with --cache_latents")
    assert any(v.abs().max() > 0 for k, v in a.items() if ".lora.up." in k or "lora_B" in k)


def test_reference_adapter_follows_policy_only_at_updates(tiny_assets_dir, tmp_path):
    output_dir = str(tmp_path / "out")
    launch(
        SCRIPT,
        base_args(
            tiny_assets_dir, output_dir, "--consensus", "human", "--max_train_steps", "3",
            "--checkpointing_steps", "1", "--ref_update_steps", "2",
        ),
    )  # fmt: skip

    def weights(step, name):
        return load_file(os.path.join(output_dir, f"checkpoint-{step}", name))

    policy = {s: weights(s, "pytorch_lora_weights.safetensors") for s in (1, 2, 3)}
    reference = {s: weights(s, "reference_lora_weights.safetensors") for s in (1, 2, 3)}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # Before the first update the reference is the initial policy: B = 0, so it is the base model.
    up_keys = [k for k in reference[1] if ".lora.up." in k or "lora_B" in k]
    assert up_keys and all(reference[1][k].abs().max() == 0 for k in up_keys)
    assert not same(policy[1], reference[1])
    # At step 2 the reference becomes the policy ...
    assert same(policy[2], reference[2])
    # ... and stays fixed until the next update, while the policy moves on.
    assert same(reference[2], reference[3])
    assert not same(policy[3], reference[3])


def test_precomputed_consensus_loads_no_scorer(tiny_assets_dir, tmp_path):
    import subprocess
    import sys

    from launch_utils import REPO_ROOT

    labelled = str(tmp_path / "labelled")
    subprocess.run(
        [
            sys.executable, os.path.join(REPO_ROOT, "rewards.py"), "label",
            "--dataset_name", tiny_assets_dir["pickapic"],
            "--reward_models", "pickscore,clip",
            "--reward_config", tiny_assets_dir["reward_config"],
            "--output_dir", labelled,
        ],
        check=True, capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip

    # A reward config whose model paths do not exist: loading any scorer would fail.
    broken = {name: {**opts} for name, opts in json.load(open(tiny_assets_dir["reward_config"])).items()}
    for opts in broken.values():
        for key in list(opts):
            if "path" in key:
                opts[key] = str(tmp_path / "does-not-exist")
    broken_config = tmp_path / "broken_config.json"
    broken_config.write_text(json.dumps(broken))

    output_dir = str(tmp_path / "out")
    args = base_args(tiny_assets_dir, output_dir, "--precomputed_consensus", "--max_train_steps", "2")
    args[args.index("--dataset_name") + 1] = labelled
    args[args.index("--reward_config") + 1] = str(broken_config)
    launch(SCRIPT, [*args, "--label_mode", "soft"])
    assert os.path.isfile(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    shutil.rmtree(labelled)
