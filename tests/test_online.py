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
"""Online BalancedDPO (`--online_prompts`): the policy generates its own pairs, round after round."""

import math
import os
import subprocess
import sys

import pytest
import torch
from launch_utils import REPO_ROOT, launch, read_scalars
from safetensors.torch import load_file

import run_state
import training_args


SCRIPT = "train_balanced_dpo.py"
LORA_NAME = "pytorch_lora_weights.safetensors"
PROMPTS = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a green triangle on a grey background",
    "a yellow circle on a black background",
    "",  # empty: skipped and counted
    "a purple square on a white background",
]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def online_args(assets, prompts, output_dir, *extra):
    # Rounds of 4 prompts x 2 images, one pair per prompt: 4 optimizer steps of one pair per round. The reference
    # follows the policy at round ends (--online_ref_update round), so resuming must also restore the reference.
    return [
        "--pretrained_model_name_or_path", assets["sd"],
        "--online_prompts", prompts,
        "--reward_config", assets["reward_config"],
        "--reward_models", "clip,aesthetic",
        "--output_dir", output_dir,
        "--resolution", "32",
        "--train_batch_size", "1",
        "--learning_rate", "1e-3",
        "--beta_dpo", "500",
        "--seed", "0",
        "--online_round_prompts", "4",
        "--online_images_per_prompt", "2",
        "--online_num_inference_steps", "2",
        "--online_generation_batch_size", "4",
        "--online_ref_update", "round",
        "--report_to", "tensorboard",
        *extra,
    ]  # fmt: skip


def lora(output_dir):
    return load_file(os.path.join(output_dir, LORA_NAME))


def assert_same_lora(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{key} differs")
    assert any(v.abs().max() > 0 for k, v in a.items() if ".lora.up." in k or "lora_B" in k)


@pytest.fixture(scope="module")
def straight_run(tiny_assets_dir, prompt_file, tmp_path_factory):
    """6 optimizer steps: the whole of round 0 and half of round 1."""
    output_dir = str(tmp_path_factory.mktemp("online") / "straight")
    launch(SCRIPT, online_args(tiny_assets_dir, prompt_file, output_dir, "--max_train_steps", "6"))
    return output_dir


def test_online_run_trains_on_its_own_samples_and_writes_a_lora_that_changes_the_output(tiny_assets_dir, straight_run):
    from diffusers import StableDiffusionPipeline

    def images(lora_dir=None):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_assets_dir["sd"], safety_checker=None)
        if lora_dir:
            pipe.load_lora_weights(lora_dir)
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a red circle", num_inference_steps=1, height=32, width=32, generator=generator, output_type="np"
        ).images

    assert abs(images() - images(straight_run)).max() > 1e-4
    scalars = read_scalars(straight_run)
    # One entry per round: images, kept pairs, agreement, dropped share, mean scores of the policy's samples.
    assert [step for step, _ in scalars["online/round"]] == [0, 4]
    assert [v for _, v in scalars["online/images"]] == [8.0, 8.0]
    for name in ("online/pairs", "online/agreement", "online/dropped_share", "online/generation_seconds",
                 "online/score/clip", "online/score/aesthetic"):  # fmt: skip
        assert name in scalars, sorted(scalars)
    assert [step for step, _ in scalars["loss"]] == list(range(1, 7))
    # The first step of round 1 (step 5) compares the policy with itself: the reference followed it at the round end.
    loss = dict(scalars["loss"])
    assert loss[5] == pytest.approx(math.log(2), abs=1e-6)
    assert any(abs(loss[step] - math.log(2)) > 1e-4 for step in (2, 3, 4))
    card = open(os.path.join(straight_run, "README.md")).read()
    assert "generated online" in card


def test_online_resume_mid_round_and_after_a_signal_equals_an_uninterrupted_run(
    tiny_assets_dir, prompt_file, straight_run, tmp_path
):
    # Mid-round: stop after step 2 (the checkpoint holds round 0's pairs), resume to step 6.
    resumed = str(tmp_path / "resumed")
    launch(
        SCRIPT,
        online_args(tiny_assets_dir, prompt_file, resumed, "--max_train_steps", "2", "--checkpointing_steps", "2"),
    )
    assert os.path.isfile(os.path.join(resumed, "checkpoint-2", "online_round_0.safetensors"))
    launch(
        SCRIPT,
        online_args(
            tiny_assets_dir, prompt_file, resumed, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"
        ),
    )
    assert_same_lora(lora(straight_run), lora(resumed))

    # A signal while round 1 is being generated: the run stops before the next sampling call, keeps checkpoint-4,
    # and the resumed run generates round 1 again from the same policy.
    signalled = str(tmp_path / "signalled")
    command = [
        sys.executable, os.path.join(REPO_ROOT, "tests", "online_signal.py"), str(5),
        os.path.join(REPO_ROOT, SCRIPT),
        *online_args(tiny_assets_dir, prompt_file, signalled, "--max_train_steps", "6", "--checkpointing_steps", "4",
                     "--online_generation_batch_size", "2"),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Stopping on a signal at step 4: checkpoint saved" in result.stderr, result.stderr[-5000:]
    assert "sampling calls after the signal: 0" in result.stdout
    assert run_state.list_checkpoints(signalled) == ["checkpoint-4"]
    assert not os.path.exists(os.path.join(signalled, LORA_NAME))
    launch(
        SCRIPT,
        online_args(
            tiny_assets_dir, prompt_file, signalled, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"
        ),
    )
    assert_same_lora(lora(straight_run), lora(signalled))


def test_online_two_processes_each_generate_their_share(tiny_assets_dir, prompt_file, tmp_path):
    output_dir = str(tmp_path / "ddp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(REPO_ROOT, SCRIPT),
        *online_args(tiny_assets_dir, prompt_file, output_dir, "--max_train_steps", "3"),
    ]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-6000:]
    scalars = read_scalars(output_dir)
    # Each round's 4 prompts x 2 images are split over the two processes; each optimizer step trains on one pair of
    # each process, so a round of 4 pairs is 2 steps.
    assert scalars["online/images"] == [(0, 8.0), (2, 8.0)]
    assert [v for _, v in scalars["pairs"]] == [2.0, 2.0, 2.0]
    assert os.path.isfile(os.path.join(output_dir, LORA_NAME))


def test_online_argument_errors_say_what_to_change(tiny_assets_dir, prompt_file, tmp_path):
    import train_balanced_dpo

    def error(*extra, steps=("--max_train_steps", "2")):
        args = train_balanced_dpo.parse_args(online_args(tiny_assets_dir, prompt_file, str(tmp_path), *steps, *extra))
        with pytest.raises(ValueError) as caught:
            training_args.validate_args(args, train_balanced_dpo.StableDiffusionFamily)
        return str(caught.value)

    assert "--online_prompts needs --max_train_steps" in error(steps=())
    assert "--online_images_per_prompt must be >= 2" in error("--online_images_per_prompt", "1")
    assert "--consensus human" in error("--consensus", "human")
    assert "only one of --dataset_name, --train_data_dir and --online_prompts" in error(
        "--dataset_name", tiny_assets_dir["pickapic"]
    )
    assert "not a diffusers scheduler" in error("--online_scheduler", "FastestScheduler")
