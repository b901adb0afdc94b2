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
"""Helpers to run the training scripts the way users do (`accelerate launch`) and read what they wrote."""

import glob
import os
import subprocess
import sys


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, args, timeout=600, env=None, check=True):
    """Runs `accelerate launch <script> <args>` on the CPU in one process and returns the CompletedProcess.

    (`accelerate launch --cpu --num_processes 2` starts one process without MPI; two-process tests use torchrun, see
    tests/test_robustness.py.)"""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        os.path.join(REPO_ROOT, script),
        *[str(a) for a in args],
    ]
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO_ROOT)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed with exit code {result.returncode}\n--- stdout ---\n{result.stdout[-5000:]}"
            f"\n--- stderr ---\n{result.stderr[-10000:]}"
        )
    return result


def read_scalars(output_dir):
    """All scalars logged to TensorBoard under `output_dir`: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for path in glob.glob(os.path.join(output_dir, "logs", "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def torchrun(script, args, num_processes=2, timeout=420):
    """Runs `torchrun --nproc_per_node N script args` on the CPU (DDP over gloo: DistributedType.MULTI_CPU) and returns
    the CompletedProcess; the process group is ended if it runs past `timeout`. (tests/test_robustness.py has the
    same launcher for its signal tests.)"""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
        os.path.join(REPO_ROOT, script), *[str(a) for a in args],
    ]  # fmt: skip
    env = dict(
        os.environ,
        ACCELERATE_USE_CPU="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        # torchrun starts each worker in a session of its own: end them one by one, then torchrun.
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"{script} hung for {timeout}s:\n{stderr[-8000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
