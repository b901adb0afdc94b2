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
"""Robustness of both training scripts and `rewards.py label`: bad data, non-finite values, interruptions, atomic
checkpoints, argument errors, unsafe pickles and many processes. Offline, on the CPU, with tiny models and data."""

import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from launch_utils import REPO_ROOT, launch, read_scalars
from PIL import Image
from safetensors.torch import load_file

import run_state
import tiny_assets


SCRIPTS = {"sd": "train_balanced_dpo.py", "sdxl": "train_balanced_dpo_sdxl.py"}
LORA_NAME = "pytorch_lora_weights.safetensors"

# Rows of the corrupted dataset that must be skipped, and why.
BAD_ROWS = {1: "truncated JPEG", 3: "garbage bytes", 9: "empty caption", 11: "label 0.7", 13: "missing caption"}
# Rows that look odd but are usable: they must be trained on, not skipped.
ODD_ROWS = {4: "grayscale", 5: "RGBA", 6: "CMYK", 7: "palette", 8: "different sizes"}


def base_args(assets, model, output_dir, *extra, dataset=None):
    return [
        "--pretrained_model_name_or_path", assets[model],
        "--dataset_name", dataset or assets["pickapic"],
        "--reward_config", assets["reward_config"],
        "--reward_models", "clip,aesthetic",
        "--output_dir", output_dir,
        "--resolution", "32",
        "--train_batch_size", "4",
        "--learning_rate", "1e-3",
        "--beta_dpo", "500",
        "--report_to", "tensorboard",
        *extra,
    ]  # fmt: skip


def script_env():
    # One thread each: tests run several training processes side by side on two cores.
    return dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"
    )


def start_torchrun(script, args, num_processes=2):
    """Starts `torchrun --nproc_per_node N script args` on the CPU (DDP over gloo: DistributedType.MULTI_CPU).

    `accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up, so this goes through
    torchrun, which is also what `accelerate launch --multi_gpu` uses on GPUs.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
        os.path.join(REPO_ROOT, script), *[str(a) for a in args],
    ]  # fmt: skip
    env = dict(script_env(), ACCELERATE_USE_CPU="1")
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )


def finish(process, timeout=420):
    """Waits for a process started by `start_torchrun`; ends the whole group if it hangs."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        # torchrun starts each worker in a session of its own: end them one by one, then torchrun.
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"the run hung for {timeout}s:\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def torchrun(script, args, num_processes=2, timeout=420):
    return finish(start_torchrun(script, args, num_processes), timeout)


def output_of(result):
    return f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}"


# ----------------------------------------------------------------------------------------------------------------
# Data: a Pick-a-Pic-format parquet dataset with every kind of broken and odd row
# ----------------------------------------------------------------------------------------------------------------


def encode(image, format, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def write_parquet(rows, output_dir, features=None):
    import datasets

    os.makedirs(os.path.join(output_dir, "data"), exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(
        os.path.join(output_dir, "data", "train-00000-of-00001.parquet")
    )
    return output_dir


def pickapic_features():
    import datasets

    return datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Value("binary"),
            "jpg_1": datasets.Value("binary"),
            "label_0": datasets.Value("float64"),
            "label_1": datasets.Value("float64"),
        }
    )


@pytest.fixture(scope="module")
def corrupted_rows():
    rows = tiny_assets.make_pickapic_rows(16, seed=5)
    image = Image.open(io.BytesIO(rows[4]["jpg_0"])).convert("RGB")
    rows[1]["jpg_0"] = rows[1]["jpg_0"][: len(rows[1]["jpg_0"]) // 2]
    rows[3]["jpg_1"] = b"\x00\x01 definitely not an image \xff" * 8
    rows[4]["jpg_0"] = encode(image.convert("L"), "JPEG")
    rows[5]["jpg_1"] = encode(image.convert("RGBA"), "PNG")
    rows[6]["jpg_0"] = encode(image.convert("CMYK"), "JPEG")
    rows[7]["jpg_1"] = encode(image.convert("P"), "PNG")
    rows[8]["jpg_1"] = encode(image.resize((96, 40)), "JPEG")
    rows[9]["caption"] = "   "
    rows[11]["label_0"] = 0.7
    rows[13]["caption"] = None
    return rows


@pytest.fixture(scope="module")
def corrupted_pickapic(tmp_path_factory, corrupted_rows):
    return write_parquet(corrupted_rows, str(tmp_path_factory.mktemp("corrupted_pickapic")), pickapic_features())


@pytest.fixture(scope="module")
def mostly_broken_pickapic(tmp_path_factory):
    """Every row at an odd position is undecodable, so with two processes reading a stream, all of them reach the
    second process."""
    rows = tiny_assets.make_pickapic_rows(16, seed=6)
    for i in range(1, 16, 2):
        rows[i]["jpg_0"] = b"garbage"
    return write_parquet(rows, str(tmp_path_factory.mktemp("mostly_broken")), pickapic_features())


def test_corrupted_dataset_is_what_it_claims(corrupted_rows):
    import preference_data

    for i, row in enumerate(corrupted_rows):
        if i in BAD_ROWS:
            continue
        images = [preference_data.decode_image(row[c]) for c in ("jpg_0", "jpg_1")]
        assert all(im.mode == "RGB" for im in images), i
    modes = {i: Image.open(io.BytesIO(corrupted_rows[i][c])).mode for i, c in [(4, "jpg_0"), (5, "jpg_1"), (6, "jpg_0"), (7, "jpg_1")]}  # fmt: skip
    assert modes == {4: "L", 5: "RGBA", 6: "CMYK", 7: "P"}


# ----------------------------------------------------------------------------------------------------------------
# Argument and data errors: seconds, before any model or dataset is loaded
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripts():
    import train_balanced_dpo
    import train_balanced_dpo_sdxl

    return {"sd": train_balanced_dpo, "sdxl": train_balanced_dpo_sdxl}


ARGUMENT_ERRORS = {
    "beta_zero": (["--beta_dpo", "0"], "--beta_dpo must be positive"),
    "beta_negative": (["--beta_dpo", "-1"], "--beta_dpo must be positive"),
    "unknown_metric": (["--reward_models", "clip,pickscroe"], "Unknown metric 'pickscroe'"),
    "single_not_loaded": (["--reward_models", "clip,aesthetic", "--consensus", "single:hpsv2"], "not in --reward_models"),
    "unknown_consensus": (["--consensus", "vote"], "Unknown --consensus 'vote'"),
    "resume_missing": (["--resume_from_checkpoint", "checkpoint-77"], "does not exist"),
    "both_sources": (["--train_data_dir", "/tmp"], "only one of --dataset_name, --train_data_dir and --online_prompts"),
    "streaming_without_steps": (["--streaming"], "--streaming needs --max_train_steps"),
    "cache_latents_on_a_stream": (["--streaming", "--max_train_steps", "2", "--cache_latents"], "--cache_latents needs a map-style"),
    "precomputed_with_live_options": (["--precomputed_consensus", "--consensus", "mean_prob"], "--precomputed_consensus"),
    "ema_without_updates": (["--ref_update_mode", "ema"], "--ref_update_steps N"),
    "checkpointing_zero": (["--checkpointing_steps", "0"], "--checkpointing_steps must be >= 1"),
    "bad_max_bad_examples": (["--max_bad_examples", "lots"], "--max_bad_examples must be"),
    "reward_config_missing": (["--reward_config", "/nonexistent/reward_config.json"], "does not exist"),
}  # fmt: skip


@pytest.mark.parametrize("model", SCRIPTS)
@pytest.mark.parametrize("case", ARGUMENT_ERRORS)
def test_argument_errors_fail_fast_with_what_to_change(scripts, model, case, tmp_path):
    # Neither the model nor the dataset exists: an error about them would mean something was loaded first.
    extra, message = ARGUMENT_ERRORS[case]
    args = [
        "--pretrained_model_name_or_path", str(tmp_path / "no-model"),
        "--dataset_name", str(tmp_path / "no-dataset"),
        "--output_dir", str(tmp_path / "out"),
        *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(message)):
        scripts[model].main(scripts[model].parse_args(args))
    assert time.perf_counter() - start < 5
    assert not os.path.exists(tmp_path / "out"), "nothing may be written before the arguments are checked"


@pytest.mark.parametrize("model", SCRIPTS)
def test_push_to_hub_without_credentials_fails_before_training(scripts, model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    args = scripts[model].parse_args(
        ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(tmp_path / "no-data"),
         "--output_dir", str(tmp_path / "out"), "--push_to_hub"]
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"--push_to_hub needs Hub credentials.*hf auth login.*--hub_token"):
        scripts[model].main(args)


def test_argument_error_through_accelerate_launch_exits_quickly(tiny_assets_dir, tmp_path):
    start = time.perf_counter()
    result = launch(
        SCRIPTS["sd"],
        base_args(tiny_assets_dir, "sd", str(tmp_path / "out"), "--beta_dpo", "-5"),
        check=False,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    assert "--beta_dpo must be positive (got -5.0); the default is 5000." in result.stderr
    # Starting Python and importing torch and diffusers is most of it (10 s idle, up to a minute on a busy machine).
    assert elapsed < 120, f"an argument error took {elapsed:.0f}s"
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture(scope="module")
def misshapen_datasets(tmp_path_factory, corrupted_rows):
    """A dataset without the `jpg_1` column and one whose captions are numbers."""
    root = tmp_path_factory.mktemp("misshapen")
    no_jpg_1 = [{k: v for k, v in r.items() if k != "jpg_1"} for r in corrupted_rows[:4]]
    numbers = [dict(r, caption=i) for i, r in enumerate(tiny_assets.make_pickapic_rows(4, seed=3))]
    return {
        "missing": (write_parquet(no_jpg_1, str(root / "missing")), r"missing column 'jpg_1' \(set --image_1_column"),
        "wrong_type": (write_parquet(numbers, str(root / "wrong_type")), r"Column 'caption' \(--caption_column\) should hold text"),
    }  # fmt: skip


@pytest.mark.parametrize("model", SCRIPTS)
@pytest.mark.parametrize("problem", ["missing", "wrong_type"])
def test_missing_column_or_wrong_type_fails_before_any_model_load(
    scripts, misshapen_datasets, model, problem, tmp_path, fresh_accelerate_state
):
    import preference_data

    dataset, message = misshapen_datasets[problem]
    # The model path does not exist: if any model were loaded first, the error would be about the model.
    args = scripts[model].parse_args(
        ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", dataset,
         "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    )  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(preference_data.DataError, match=message):
        scripts[model].main(args)
    assert time.perf_counter() - start < 30


# ----------------------------------------------------------------------------------------------------------------
# Bad rows with `rewards.py label`
# ----------------------------------------------------------------------------------------------------------------


def test_label_skips_counts_and_logs_bad_rows(tiny_assets_dir, corrupted_pickapic, tmp_path, caplog):
    import datasets

    import rewards

    output_dir = str(tmp_path / "labeled")
    with caplog.at_level("WARNING"):
        summary = rewards.main(
            ["label", "--dataset_name", corrupted_pickapic, "--output_dir", output_dir, "--reward_models",
             "clip,aesthetic", "--reward_config", tiny_assets_dir["reward_config"], "--device", "cpu",
             "--batch_size", "4", "--max_bad_examples", "5"]
        )  # fmt: skip
    for row in BAD_ROWS:
        assert f"(row {row})" in caplog.text, f"bad row {row} ({BAD_ROWS[row]}) was not logged"
    for row in ODD_ROWS:
        assert f"(row {row})" not in caplog.text, f"usable row {row} ({ODD_ROWS[row]}) was skipped"
    assert summary["counts"]["skipped_undecodable"] == 2 and summary["counts"]["skipped_invalid"] == 3
    assert summary["bad_examples"]["num_bad"] == 5 and summary["counts"]["rows"] == 11
    labeled = datasets.load_dataset(output_dir, split="train")
    assert len(labeled) == 11 and all(isinstance(c, str) and c.strip() for c in labeled["caption"])


def test_label_resumes_after_a_kill_and_equals_an_uninterrupted_run(tiny_assets_dir, corrupted_pickapic, tmp_path):
    import datasets

    import rewards
    from multi_metric import cli

    def label(output_dir, *extra):
        return rewards.main(
            ["label", "--dataset_name", corrupted_pickapic, "--output_dir", output_dir, "--reward_models",
             "clip,aesthetic", "--reward_config", tiny_assets_dir["reward_config"], "--device", "cpu",
             "--batch_size", "4", "--rows_per_shard", "2", "--max_bad_examples", "5", "--consensus", "random_metric",
             *extra]
        )  # fmt: skip

    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    expected = label(straight)

    original_flush = cli.ShardWriter._flush
    flushes = []

    def flush_then_die(self, rows):
        if len(flushes) == 2:
            raise KeyboardInterrupt  # killed while writing the third shard
        flushes.append(len(rows))
        original_flush(self, rows)

    cli.ShardWriter._flush = flush_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            label(killed)
    finally:
        cli.ShardWriter._flush = original_flush
    written = sorted(glob.glob(os.path.join(killed, "data", "*")))
    assert len(written) == 2 and all(p.endswith(".parquet.tmp") for p in written)

    # Finished shards are never deleted by accident, nor continued with other settings.
    with pytest.raises(SystemExit, match="unfinished labeling run .* Add --resume"):
        label(killed)
    with pytest.raises(SystemExit, match="other settings .*consensus"):
        label(killed, "--resume", "--consensus", "majority")
    assert sorted(glob.glob(os.path.join(killed, "data", "*"))) == written

    resumed = label(killed, "--resume")
    assert resumed["counts"] == expected["counts"]
    for key in ("num_bad", "num_seen", "num_skipped"):
        assert resumed["bad_examples"][key] == expected["bad_examples"][key], key
    assert [row for row, _ in resumed["bad_examples"]["recent"]] == sorted(BAD_ROWS)
    assert not os.path.exists(os.path.join(killed, "labeling_train.progress.json"))
    a = datasets.load_dataset(straight, split="train").to_pandas()
    b = datasets.load_dataset(killed, split="train").to_pandas()
    assert len(a) == 11 and a.drop(columns=["jpg_0", "jpg_1"]).equals(b.drop(columns=["jpg_0", "jpg_1"]))
    assert a["jpg_0"].tolist() == b["jpg_0"].tolist() and a["jpg_1"].tolist() == b["jpg_1"].tolist()


def test_label_max_bad_examples_and_missing_column(tiny_assets_dir, corrupted_pickapic, misshapen_datasets, tmp_path):
    import rewards

    common = ["--reward_models", "clip,aesthetic", "--reward_config", tiny_assets_dir["reward_config"], "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"Stopping: 4 bad rows out of 12 seen.*row 9: caption is missing or empty"):
        rewards.main(["label", "--dataset_name", corrupted_pickapic, "--output_dir", str(tmp_path / "a"),
                      "--batch_size", "4", "--max_bad_examples", "2", *common])  # fmt: skip
    # A missing column stops before any scorer is loaded (this reward config names no existing model).
    missing, _ = misshapen_datasets["missing"]
    with pytest.raises(SystemExit, match=r"missing column 'jpg_1'"):
        rewards.main(["label", "--dataset_name", missing, "--output_dir", str(tmp_path / "b"), "--reward_models",
                      "clip", "--reward_config", str(tmp_path / "nowhere.json")])  # fmt: skip
    with pytest.raises(SystemExit):
        rewards.main(["label", "--dataset_name", missing, "--output_dir", str(tmp_path / "c"), "--reward_models", "clip,pickscroe"])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Atomic checkpoints
# ----------------------------------------------------------------------------------------------------------------


class FakeAccelerator:
    """Just what `save_checkpoint` uses; `save_state` writes files, and optionally runs out of disk halfway."""

    is_main_process = True
    num_processes = 1

    def __init__(self, fail=False):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "optimizer.bin"), "wb") as f:
            f.write(b"new optimizer state")
        if self.fail:
            raise OSError(28, "No space left on device")
        with open(os.path.join(path, LORA_NAME), "wb") as f:
            f.write(b"new lora")


def test_failed_save_leaves_previous_checkpoint_valid(tmp_path):
    output_dir = str(tmp_path)
    run_state.save_checkpoint(FakeAccelerator(), output_dir, 1)
    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(output_dir, "checkpoint-1", "*"))}

    # The disk fills up while checkpoint-2 is written.
    with pytest.raises(OSError, match="No space left"):
        run_state.save_checkpoint(FakeAccelerator(fail=True), output_dir, 2)
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-2")), "a partial checkpoint has the final name"
    assert run_state.list_checkpoints(output_dir) == ["checkpoint-1"]
    assert run_state.resolve_resume_checkpoint(output_dir, "latest") == os.path.join(output_dir, "checkpoint-1")
    assert {p: open(p, "rb").read() for p in before} == before

    # Saving the same step again fails too: the complete older copy of it must survive.
    with pytest.raises(OSError):
        run_state.save_checkpoint(FakeAccelerator(fail=True), output_dir, 1)
    assert {p: open(p, "rb").read() for p in before} == before
    assert run_state.list_checkpoints(output_dir) == ["checkpoint-1"]

    # The next successful save replaces the leftover temporary folder and becomes `latest`.
    run_state.save_checkpoint(FakeAccelerator(), output_dir, 2)
    assert run_state.list_checkpoints(output_dir) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(os.listdir(os.path.join(output_dir, "checkpoint-2"))) == sorted(
        ["optimizer.bin", LORA_NAME, run_state.COMPLETE_MARKER]
    )
    assert not glob.glob(os.path.join(output_dir, ".checkpoint-2*"))


def test_resume_from_a_partial_checkpoint_is_refused(tmp_path):
    partial = tmp_path / "checkpoint-5"
    partial.mkdir()
    (partial / LORA_NAME).write_bytes(b"half")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        run_state.resolve_resume_checkpoint(str(tmp_path), str(partial))
    assert run_state.resolve_resume_checkpoint(str(tmp_path), "latest") is None


def test_nan_lora_is_never_written():
    with pytest.raises(RuntimeError, match="non-finite values .*lora_B.*it was not written"):
        run_state.check_finite_lora(
            {"a.lora_A.weight": torch.ones(2), "a.lora_B.weight": torch.tensor([float("nan")])}
        )
    run_state.check_finite_lora({"a.lora_A.weight": torch.ones(2)})


# ----------------------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_turns_signals_into_a_request_and_restores_handlers(signum):
    previous = signal.getsignal(signum)
    with run_state.GracefulStop() as stop:
        assert not stop.requested_here
        os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signum)  # a second signal (e.g. forwarded by a launcher) must not abort the save
        time.sleep(0.05)
        assert stop.requested_here and stop.signum == signum
    assert signal.getsignal(signum) is previous


def wait_for(predicate, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resume_equals_uninterrupted(tiny_assets_dir, tmp_path):
    script = os.path.join(REPO_ROOT, SCRIPTS["sd"])
    straight_dir, interrupted_dir = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    common = ("--seed", "0", "--report_to", "none", "--train_batch_size", "2", "--dataloader_num_workers", "1")

    def start(output_dir, *extra):
        command = [sys.executable, script, *base_args(tiny_assets_dir, "sd", output_dir, *common, *extra)]
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=script_env(),
            cwd=REPO_ROOT,
            start_new_session=True,  # a process group of its own, to signal it as a scheduler does
        )

    # The uninterrupted run and the one to interrupt run side by side.
    straight = start(straight_dir, "--max_train_steps", "6", "--checkpointing_steps", "100")
    interrupted = start(interrupted_dir, "--max_train_steps", "40", "--checkpointing_steps", "2")
    appeared = wait_for(lambda: run_state.list_checkpoints(interrupted_dir), interrupted)
    assert appeared, f"no checkpoint appeared:\n{interrupted.communicate()[1][-5000:]}"
    # Like a scheduler's preemption (or Ctrl-C in a terminal), the signal reaches every process of the run, the
    # DataLoader worker included.
    os.killpg(interrupted.pid, signal.SIGTERM)
    _, stderr = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 0, f"exit code {interrupted.returncode} after SIGTERM:\n{stderr[-5000:]}"
    match = re.search(r"Stopping on a signal at step (\d+): checkpoint saved", stderr)
    assert match, stderr[-5000:]
    step = int(match.group(1))
    # The signal came once checkpoint-2 existed: the run stops before its next micro-batch, at step 2 or soon after.
    assert 2 <= step < 6, f"the run stopped at step {step}"
    assert run_state.list_checkpoints(interrupted_dir)[-1] == f"checkpoint-{step}"
    assert not os.path.exists(os.path.join(interrupted_dir, LORA_NAME)), "an interrupted run wrote a final LoRA"

    resumed = start(interrupted_dir, "--max_train_steps", "6", "--checkpointing_steps", "100",
                    "--resume_from_checkpoint", "latest")  # fmt: skip
    _, resumed_err = resumed.communicate(timeout=300)
    _, straight_err = straight.communicate(timeout=300)
    assert resumed.returncode == 0, resumed_err[-5000:]
    assert straight.returncode == 0, straight_err[-5000:]
    a = load_file(os.path.join(straight_dir, LORA_NAME))
    b = load_file(os.path.join(interrupted_dir, LORA_NAME))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{key} differs after SIGTERM and resume")
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or ".lora.up." in k)


# ----------------------------------------------------------------------------------------------------------------
# Non-finite values
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", SCRIPTS)
def test_nonfinite_steps_are_skipped_then_stop_the_run_without_writing_a_lora(tiny_assets_dir, model, tmp_path):
    output_dir = str(tmp_path / "out")
    # An absurd learning rate blows the LoRA up after the first step; every later loss is inf or NaN.
    args = base_args(
        tiny_assets_dir, model, output_dir,
        "--learning_rate", "1e30", "--max_train_steps", "20",
        "--checkpointing_steps", "1", "--max_nonfinite_steps", "3", "--seed", "0",
    )  # fmt: skip
    result = launch(SCRIPTS[model], args, check=False, timeout=300)
    assert result.returncode != 0, output_of(result)
    assert "3 optimizer steps in a row had a non-finite loss or gradient. Lower --learning_rate or --beta_dpo" in (
        result.stderr
    ), output_of(result)
    skipped = re.findall(r"Non-finite (?:loss|gradient) at optimizer step (\d+): step skipped", result.stderr)
    # `accelerate launch` prints the child's output again when it fails: count each step once.
    steps = sorted({int(s) for s in skipped})
    assert len(steps) == 3 and steps == list(range(steps[0], steps[0] + 3)), skipped
    assert not os.path.exists(os.path.join(output_dir, LORA_NAME)), "a LoRA was written after non-finite steps"
    checkpoints = run_state.list_checkpoints(output_dir)
    assert checkpoints and checkpoints[0] == "checkpoint-1", checkpoints
    for name in checkpoints:
        state = load_file(os.path.join(output_dir, name, LORA_NAME))
        assert all(torch.isfinite(v).all() for v in state.values()), f"{name} holds a non-finite LoRA"


# ----------------------------------------------------------------------------------------------------------------
# Safety: nothing is unpickled that could run code
# ----------------------------------------------------------------------------------------------------------------


class WritesAMarker:
    """Unpickling this runs code: it would create `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("metric, option", [("aesthetic", "head_path"), ("hpsv2", "path")])
def test_a_pickle_that_runs_code_is_refused(tiny_assets_dir, tmp_path, metric, option):
    import rewards

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    real = torch.load(json.load(open(tiny_assets_dir["reward_config"]))[metric][option], weights_only=True)
    torch.save({"state_dict": real, "payload": WritesAMarker(str(marker))}, evil)
    options = dict(json.load(open(tiny_assets_dir["reward_config"]))[metric])
    options[option] = str(evil)
    options.pop("temperature", None)
    options.pop("weight", None)
    with pytest.raises(ValueError, match="Refusing to load .*could run\\s+code"):
        rewards.build_scorer(metric, **options)
    assert not marker.exists(), "loading the scorer ran code from the pickle"


def test_every_torch_load_is_weights_only_and_no_remote_code():
    sources = [
        path
        for path in glob.glob(os.path.join(REPO_ROOT, "**", "*.py"), recursive=True)
        if not os.path.relpath(path, REPO_ROOT).startswith((".", "tests"))
    ]
    assert len(sources) >= 5
    for path in sources:
        text = open(path, encoding="utf-8").read()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{os.path.basename(path)}: {call}"
        assert not re.search(r"trust_remote_code\s*=\s*True", text), os.path.basename(path)
        assert "pickle.load(" not in text, os.path.basename(path)


# ----------------------------------------------------------------------------------------------------------------
# Many processes (torchrun, CPU, gloo)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", SCRIPTS)
def test_two_processes_skip_bad_rows_gather_metrics_and_write_once(
    tiny_assets_dir, corrupted_pickapic, model, tmp_path
):
    output_dir = str(tmp_path / "out")
    args = base_args(tiny_assets_dir, model, output_dir, "--seed", "0", "--max_bad_examples", "8",
                     "--checkpointing_steps", "1", dataset=corrupted_pickapic)  # fmt: skip
    result = torchrun(SCRIPTS[model], args)
    assert result.returncode == 0, output_of(result)
    assert (
        "Distributed environment: DistributedType.MULTI_CPU" in result.stderr and "Num processes: 2" in result.stderr
    )

    # Each row was read by one process only; the bad ones are logged once each with their row id, whichever process
    # read them, and the usable odd ones (grayscale, RGBA, CMYK, palette, different sizes) were trained on.
    for row, why in BAD_ROWS.items():
        assert result.stderr.count(f"Skipping bad example (row {row})") == 1, f"row {row} ({why})\n{output_of(result)}"
    for row in ODD_ROWS:
        assert f"(row {row})" not in result.stderr
    scalars = read_scalars(output_dir)
    # 16 rows, 4 pairs per process and step: one epoch is 2 optimizer steps, logged once each by the main process.
    assert [step for step, _ in scalars["loss"]] == [1, 2], scalars["loss"]
    event_files = glob.glob(os.path.join(output_dir, "logs", "**", "events.out.tfevents.*"), recursive=True)
    writers = {
        name.split(".")[-2] for name in map(os.path.basename, event_files)
    }  # ...tfevents.<time>.<host>.<pid>.<n>
    assert len(writers) == 1, f"TensorBoard files from {len(writers)} processes: {event_files}"
    assert scalars["bad_examples"][-1][1] == len(BAD_ROWS)
    # The pairs of both processes count: 11 usable pairs, more than one process had (8 rows in 2 steps).
    assert sum(value for _, value in scalars["pairs"]) == 16 - len(BAD_ROWS)
    assert max(value for _, value in scalars["pairs"]) > 4

    # Checkpoints hold every process's noise generator; the LoRA loads in diffusers and changes the output.
    assert sorted(glob.glob(os.path.join(output_dir, "checkpoint-2", "training_generator_*.safetensors"))) == [
        os.path.join(output_dir, "checkpoint-2", run_state.generator_state_name(i)) for i in range(2)
    ]
    assert torch.isfinite(
        torch.cat([v.flatten() for v in load_file(os.path.join(output_dir, LORA_NAME)).values()])
    ).all()
    pipe_class = "StableDiffusionPipeline" if model == "sd" else "StableDiffusionXLPipeline"
    import diffusers

    pipe = getattr(diffusers, pipe_class).from_pretrained(tiny_assets_dir[model])
    kwargs = {"num_inference_steps": 1, "height": 32, "width": 32, "output_type": "np"}
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(output_dir)
    tuned = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(base - tuned).max() > 1e-5

    if model == "sd":
        # Two processes resumed from checkpoint-1 end where the uninterrupted run ended: each process's data position
        # and noise generator come back.
        resumed_dir = str(tmp_path / "resumed")
        shutil.copytree(os.path.join(output_dir, "checkpoint-1"), os.path.join(resumed_dir, "checkpoint-1"))
        args = base_args(tiny_assets_dir, model, resumed_dir, "--seed", "0", "--max_bad_examples", "8",
                         "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest",
                         dataset=corrupted_pickapic)  # fmt: skip
        resumed = torchrun(SCRIPTS[model], args)
        assert resumed.returncode == 0, output_of(resumed)
        a = load_file(os.path.join(output_dir, LORA_NAME))
        b = load_file(os.path.join(resumed_dir, LORA_NAME))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{key} differs after resume")


def test_two_processes_stop_together_when_data_is_mostly_broken(tiny_assets_dir, mostly_broken_pickapic, tmp_path):
    output_dir = str(tmp_path / "out")
    # Streaming splits rows by position: the second process reads every odd row, so all the bad ones.
    args = base_args(tiny_assets_dir, "sd", output_dir, "--streaming", "--max_train_steps", "4",
                     "--train_batch_size", "2", "--max_bad_examples", "2", dataset=mostly_broken_pickapic)  # fmt: skip
    start = time.perf_counter()
    result = torchrun(SCRIPTS["sd"], args, timeout=300)
    assert result.returncode != 0
    # Both processes stop on the same batch with the same message (neither is left waiting for the other), and the
    # rows the second process read are logged with their ids.
    stops = re.findall(r"DataError: Stopping: \d+ bad rows out of \d+ seen, more than 2 bad rows", result.stderr)
    assert len(stops) == 2, output_of(result)
    assert "Fix the data or the column flags" in result.stderr
    for row in (1, 3, 5):
        assert f"Skipping bad example (row {row})" in result.stderr, output_of(result)
    assert not os.path.exists(os.path.join(output_dir, LORA_NAME))
    assert time.perf_counter() - start < 240


def test_a_signal_to_one_process_stops_every_process_with_one_checkpoint(tiny_assets_dir, tmp_path):
    import psutil

    output_dir = str(tmp_path / "out")
    args = base_args(tiny_assets_dir, "sd", output_dir, "--seed", "0", "--train_batch_size", "2",
                     "--max_train_steps", "40", "--checkpointing_steps", "2", "--report_to", "none")  # fmt: skip
    process = start_torchrun(SCRIPTS["sd"], args)
    if not wait_for(lambda: run_state.list_checkpoints(output_dir), process):
        pytest.fail(f"no checkpoint appeared:\n{finish(process).stderr[-8000:]}")
    # Only the second process gets the signal, as when a scheduler or a user signals one worker.
    workers = [p for p in psutil.Process(process.pid).children(recursive=True) if "LOCAL_RANK" in p.environ()]
    (second,) = [p for p in workers if p.environ()["LOCAL_RANK"] == "1"]
    second.send_signal(signal.SIGTERM)
    result = finish(process, timeout=240)
    assert result.returncode == 0, output_of(result)
    match = re.search(r"Stopping on a signal at step (\d+): checkpoint saved", result.stderr)
    assert match, output_of(result)
    step = int(match.group(1))
    assert run_state.list_checkpoints(output_dir)[-1] == f"checkpoint-{step}" and step < 40
    names = os.listdir(os.path.join(output_dir, f"checkpoint-{step}"))
    assert {run_state.generator_state_name(i) for i in range(2)} <= set(names)
    assert not os.path.exists(os.path.join(output_dir, LORA_NAME))
