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
"""The training loop every family shares (`training.py`): optimizer steps at epoch ends, fp16 overflows, equal
weight of every kept pair across processes and micro-batches, runs whose every pair is dropped, signals between
micro-batches, secrets, and the model card."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from launch_utils import REPO_ROOT, launch, read_scalars
from safetensors.torch import load_file
from trainer_utils import batch_of, build_sd_trainer, sd_args

import run_state
import tiny_assets
import training
import training_args


SCRIPT = "train_balanced_dpo.py"
LORA_NAME = "pytorch_lora_weights.safetensors"


def base_args(assets, output_dir, *extra, dataset=None):
    return [
        "--pretrained_model_name_or_path", assets["sd"],
        "--dataset_name", dataset or assets["pickapic"],
        "--reward_config", assets["reward_config"],
        "--reward_models", "clip,aesthetic",
        "--output_dir", output_dir,
        "--resolution", "32",
        "--train_batch_size", "4",
        "--learning_rate", "1e-3",
        "--beta_dpo", "500",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def assert_same_lora(dir_a, dir_b, atol=1e-6):
    a, b = load_file(os.path.join(dir_a, LORA_NAME)), load_file(os.path.join(dir_b, LORA_NAME))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=f"{key} differs")
    # Training moved the weights, so the comparison is not trivially true.
    assert any(v.abs().max() > 0 for k, v in a.items() if ".lora.up." in k or "lora_B" in k)


def write_pairs(rows, output_dir):
    tiny_assets.write_pickapic_split(rows, os.path.join(output_dir, "train.parquet"))
    return str(output_dir)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer steps are the same with and without scoring ahead, across epoch ends
# ----------------------------------------------------------------------------------------------------------------


def test_score_ahead_forms_the_same_optimizer_steps_across_epoch_ends(tiny_assets_dir, tmp_path):
    # 14 pairs in batches of 3: five micro-batches an epoch (the last of 2 pairs) and 2 per optimizer step, so each
    # epoch ends with a short step. 8 steps cross two epoch ends.
    common = (
        "--max_train_samples", "14", "--train_batch_size", "3", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "8", "--checkpointing_steps", "100",
    )  # fmt: skip
    in_turn, ahead = str(tmp_path / "in_turn"), str(tmp_path / "ahead")
    launch(SCRIPT, base_args(tiny_assets_dir, in_turn, *common, "--no_score_ahead"))
    launch(SCRIPT, base_args(tiny_assets_dir, ahead, *common))
    assert_same_lora(in_turn, ahead, atol=0)
    for output_dir in (in_turn, ahead):
        read = [value for _, value in read_scalars(output_dir)["pairs_read"]]
        assert read == [6, 6, 2, 6, 6, 2, 6, 6], f"optimizer steps formed from {read} pairs"


# ----------------------------------------------------------------------------------------------------------------
# fp16: the gradient scaler handles an overflow, and training goes on
# ----------------------------------------------------------------------------------------------------------------


def run_step(trainer, pairs, rows_per_micro_batch):
    for rows in rows_per_micro_batch:
        batch = batch_of(trainer, pairs, rows)
        trainer.accumulate(batch, trainer.consensus(batch))
    return trainer.optimizer_step()


def test_fp16_overflow_skips_the_step_lowers_the_scale_and_the_run_goes_on(
    tiny_assets_dir, tmp_path, fresh_accelerate_state, caplog
):
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    # accelerate runs fp16 with a gradient scaler on GPUs only; here its scaler is switched on by hand (autocast off:
    # what is tested is the scaler's handling, not fp16 arithmetic on the CPU).
    accelerator = Accelerator(cpu=True, mixed_precision="fp16", kwargs_handlers=[AutocastKwargs(enabled=False)])
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    args = sd_args(tiny_assets_dir, tmp_path, "--gradient_accumulation_steps", "2")
    trainer, pairs = build_sd_trainer(accelerator, args)
    overflow = {"on": False}
    trainer.params[0].register_hook(lambda grad: grad * float("inf") if overflow["on"] else grad)
    progress, bad = run_state.TrainingProgress(), training.preference_data.BadExampleTracker()

    def step(first_row):
        outcome = run_step(trainer, pairs, [range(first_row, first_row + 4), range(first_row + 4, first_row + 8)])
        progress.global_step += 1
        training.report_step(args, accelerator, trainer, progress, bad, outcome, _NoBar())
        return outcome

    assert step(0).status == "stepped"
    before = [p.detach().clone() for p in trainer.params]
    scale = accelerator.scaler.get_scale()
    overflow["on"] = True
    with caplog.at_level("WARNING"):
        skipped = step(8)
    overflow["on"] = False
    assert skipped.status == "fp16_overflow" and skipped.loss_scale == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params)), "an overflowing step changed the LoRA"
    assert "fp16 overflow in the gradients of optimizer step 2" in caplog.text
    # The next step trains (the scaler was stepped and updated, so clipping may unscale again).
    after = step(16)
    assert after.status == "stepped"
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert progress.skipped_steps == 1 and progress.nonfinite_steps == 0


class _NoBar:
    def set_postfix(self, **kwargs):
        pass


def test_nonfinite_loss_skips_the_step_without_touching_the_scaler(tiny_assets_dir, tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    accelerator = Accelerator(cpu=True, mixed_precision="fp16", kwargs_handlers=[AutocastKwargs(enabled=False)])
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    args = sd_args(tiny_assets_dir, tmp_path)
    trainer, pairs = build_sd_trainer(accelerator, args)
    original = trainer.pair_losses
    trainer.pair_losses = lambda *a: original(*a) * float("nan")
    before = [p.detach().clone() for p in trainer.params]
    outcome = run_step(trainer, pairs, [range(4)])
    assert outcome.status == "nonfinite_loss" and accelerator.scaler.get_scale() == 2.0**10
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    trainer.pair_losses = original
    assert run_step(trainer, pairs, [range(4)]).status == "stepped"


# ----------------------------------------------------------------------------------------------------------------
# Every kept pair weighs the same, whichever process and micro-batch it came from
# ----------------------------------------------------------------------------------------------------------------


def test_every_kept_pair_weighs_the_same_across_processes_and_micro_batches(tiny_assets_dir, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(REPO_ROOT, "tests", "two_process_weighting.py"),
        tiny_assets_dir["sd"], tiny_assets_dir["pickapic"], tiny_assets_dir["reward_config"], str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=420, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    for scenario in ("uneven", "one_process_without_pairs", "no_pairs_anywhere"):
        assert f"OK {scenario}" in result.stdout, result.stdout[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# A run whose every pair is dropped stops, in bounded time, and says why
# ----------------------------------------------------------------------------------------------------------------


def test_a_run_whose_every_pair_is_dropped_stops_and_says_why(tiny_assets_dir, tmp_path):
    rows = tiny_assets.make_pickapic_rows(12, seed=5)
    for row in rows:
        row["jpg_1"] = row["jpg_0"]  # the same image twice: every metric abstains
    dataset = write_pairs(rows, tmp_path / "identical")
    output_dir = str(tmp_path / "out")
    start = time.perf_counter()
    result = launch(
        SCRIPT, base_args(tiny_assets_dir, output_dir, "--max_train_steps", "5", dataset=dataset), check=False
    )
    assert result.returncode != 0
    assert "Every pair was dropped: no pair was kept in a whole epoch (12 pairs read)" in result.stderr
    assert "12 every metric abstained" in result.stderr and "jpg_0 and jpg_1 hold different images" in result.stderr
    assert time.perf_counter() - start < 240
    assert not os.path.exists(os.path.join(output_dir, LORA_NAME))


def test_dropped_pairs_message_names_each_reason_and_its_fix():
    args = sd_args({"sd": "x", "pickapic": "y", "reward_config": None}, "out", "--min_agreement", "0.9")
    message = training.dropped_pairs_message(
        args, 40, {"tie": 10, "min_agreement": 25, "unreadable": 5}, "the last 40 pairs"
    )
    assert "10 the votes tied and --tie_policy mean_prob could not break the tie" in message
    assert "25 agreement below --min_agreement 0.9" in message and "lower --min_agreement" in message
    assert "5 unreadable rows" in message


# ----------------------------------------------------------------------------------------------------------------
# A signal is honoured between any two micro-batches, and the resumed run equals an uninterrupted one
# ----------------------------------------------------------------------------------------------------------------


def test_a_signal_between_micro_batches_stops_before_the_next_one(
    tiny_assets_dir, tmp_path, fresh_accelerate_state, monkeypatch
):
    import train_balanced_dpo

    common = ("--gradient_accumulation_steps", "4", "--train_batch_size", "2", "--checkpointing_steps", "1",
              "--report_to", "none")  # fmt: skip

    def run(output_dir, *extra):
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return train_balanced_dpo.main(
            train_balanced_dpo.parse_args(base_args(tiny_assets_dir, output_dir, *common, *extra))
        )

    straight = str(tmp_path / "straight")
    run(straight, "--max_train_steps", "3")

    calls = []
    accumulate = training.DPOTrainer.accumulate

    def accumulate_then_signal(self, batch, labels):
        calls.append(1)
        result = accumulate(self, batch, labels)
        if len(calls) == 6:  # the second micro-batch of optimizer step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    interrupted = str(tmp_path / "interrupted")
    monkeypatch.setattr(training.DPOTrainer, "accumulate", accumulate_then_signal)
    assert run(interrupted, "--max_train_steps", "3") is None
    assert len(calls) == 6, "a micro-batch was trained after the signal"
    assert run_state.list_checkpoints(interrupted) == ["checkpoint-1"]
    assert not os.path.exists(os.path.join(interrupted, LORA_NAME))

    monkeypatch.setattr(training.DPOTrainer, "accumulate", accumulate)
    assert run(interrupted, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert_same_lora(straight, interrupted)


# ----------------------------------------------------------------------------------------------------------------
# No secret is ever written
# ----------------------------------------------------------------------------------------------------------------


def test_the_hub_token_reaches_no_file(tiny_assets_dir, tmp_path):
    token = "hf_doNotWriteMe0123456789"
    output_dir = str(tmp_path / "out")
    launch(
        SCRIPT,
        base_args(
            tiny_assets_dir, output_dir, "--max_train_steps", "2", "--checkpointing_steps", "1",
            "--report_to", "tensorboard", "--hub_token", token,
        ),
    )  # fmt: skip
    written = [os.path.join(d, f) for d, _, files in os.walk(output_dir) for f in files]
    assert any("hparams" in path or "tfevents" in path for path in written)
    for path in written:
        with open(path, "rb") as f:
            assert token.encode() not in f.read(), f"the token was written to {path}"


def test_tracker_config_and_upload_leave_out_secrets_and_logs(tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    args = sd_args({"sd": "x", "pickapic": "y", "reward_config": None}, tmp_path, "--hub_token", "hf_secret",
                   "--logging_dir", "tracker/runs")  # fmt: skip
    config = training_args.tracker_config(args)
    assert "hub_token" not in config and "hf_secret" not in config.values() and config["rank"] == args.rank
    files = ["pytorch_lora_weights.safetensors", "README.md", "image_0.png", "tracker/runs/a/events.out",
             "checkpoint-2/optimizer.bin", ".checkpoint-3.tmp/x", "logs_of_mine.txt"]  # fmt: skip
    kept = list(filter_repo_objects(files, ignore_patterns=training_args.upload_ignore_patterns(args)))
    assert kept == ["pytorch_lora_weights.safetensors", "README.md", "image_0.png", "logs_of_mine.txt"]


def test_wandb_with_a_hub_token_is_refused_before_anything_runs(tmp_path):
    args = sd_args({"sd": "x", "pickapic": "y", "reward_config": None}, tmp_path, "--report_to", "wandb",
                   "--hub_token", "hf_x")  # fmt: skip
    with pytest.raises(ValueError, match=r"--report_to wandb together with --hub_token.*hf auth login"):
        training_args.validate_args(args)


# ----------------------------------------------------------------------------------------------------------------
# Validation logging and the model card
# ----------------------------------------------------------------------------------------------------------------


class _FakePipeline:
    def __init__(self):
        self.calls = []

    def to(self, device):
        return self

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, generator=None, height=None, width=None, **kwargs):
        from PIL import Image

        self.calls.append(prompt)
        shade = int(torch.randint(0, 255, (1,), generator=generator))
        return type("Output", (), {"images": [Image.new("RGB", (width, height), (shade, 0, 0))]})()


def test_validation_captions_follow_their_images_and_scores_are_logged_once(
    tmp_path, monkeypatch, fresh_accelerate_state
):
    import types

    from accelerate import PartialState

    PartialState(cpu=True)  # accelerate's logger needs it

    logged, wandb_images = [], []
    fake_wandb = types.SimpleNamespace(Image=lambda image, caption: (image, caption))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)

    class Tracker:
        name = "wandb"

        def log(self, values):
            wandb_images.extend(values["validation"])

    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), trackers=[Tracker(), types.SimpleNamespace(name="other")],
        log=lambda values, step: logged.append((values, step)),
    )  # fmt: skip
    pipeline = _FakePipeline()
    family = types.SimpleNamespace(
        denoiser=None, validation_pipeline=lambda lora_dir=None: pipeline, validation_call_kwargs=lambda: {}
    )
    args = sd_args({"sd": "x", "pickapic": "y", "reward_config": None}, tmp_path, "--num_validation_images", "2")

    class Scores:
        def score(self, images, prompts):
            return {"brightness": torch.tensor([float(len(p)) for p in prompts])}

    monkeypatch.setattr(training.balanced_dpo, "reference_model", lambda *a, **k: _nullcontext())
    family.denoiser = torch.nn.Identity()
    training.log_validation(args, accelerator, family, 3, ["a cat", "a big dog"], scorer_set=Scores())
    assert [caption for _, caption in wandb_images] == ["a cat", "a cat", "a big dog", "a big dog"]
    assert len(logged) == 1, "validation scores must be logged once, not once per tracker"
    assert logged[0] == ({"validation/brightness_base": 7.0, "validation/brightness_lora": 7.0}, 3)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_model_card_licence_comes_from_the_base_model_else_the_family(tmp_path):
    import types

    import train_balanced_dpo
    import train_balanced_dpo_sdxl

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base model\n")
    args = sd_args({"sd": str(base), "pickapic": "y", "reward_config": None}, tmp_path)
    assert training.base_model_license(args) == "mit"
    args.pretrained_model_name_or_path = str(tmp_path / "no-card")
    assert training.base_model_license(args) is None

    def sd_family(hidden_size):
        family = train_balanced_dpo.StableDiffusionFamily.__new__(train_balanced_dpo.StableDiffusionFamily)
        family.args = args
        family.text_encoder = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=hidden_size))
        return family

    assert sd_family(768).license() == "creativeml-openrail-m"  # SD 1.x
    assert sd_family(1024).license() == "openrail++"  # SD 2.x
    sdxl = train_balanced_dpo_sdxl.StableDiffusionXLFamily.__new__(train_balanced_dpo_sdxl.StableDiffusionXLFamily)
    sdxl.args = args
    assert sdxl.license() == "openrail++"
    args.pretrained_model_name_or_path = str(base)
    assert sdxl.license() == "mit"
