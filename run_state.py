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
"""What a run saves, restores and agrees on across processes.

- Checkpoints: atomic `checkpoint-N` folders, `latest`, `--checkpoints_total_limit`, and never a non-finite LoRA.
- `RunState`: the progress, bad-row counts, noise generator and consensus state a resumed run needs to continue
  exactly as the uninterrupted one (JSON and safetensors, no pickle), and the snapshot that abandons a partial step.
- `GracefulStop`: SIGTERM / SIGINT become a request the loop reads between micro-batches.
- `record_bad_examples`: bad rows counted and logged once over every process.
"""

import json
import os
import re
import shutil
import signal

import torch


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "checkpoint_complete"


def list_checkpoints(output_dir):
    """Complete `checkpoint-N` folders, oldest first (partial or temporary folders are never listed)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, COMPLETE_MARKER)):
            found.append((int(match.group(1)), name))
    return [name for _, name in sorted(found)]


def resolve_resume_checkpoint(output_dir, resume_from_checkpoint):
    """The checkpoint folder to resume from, `None` to start fresh, or a clear error."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return os.path.join(output_dir, checkpoints[-1]) if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist. Pass a `checkpoint-N` folder"
            f" (absolute, or inside --output_dir {output_dir!r}) or `latest`."
        )
    if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} file); pick an older one.")
    return path


def save_checkpoint(accelerator, output_dir, global_step, total_limit=None, logger=None):
    """Writes `checkpoint-<global_step>` atomically, then prunes old ones to respect `total_limit`.

    Everything is written to `.checkpoint-N.tmp` first and renamed when complete, so a crash or a full disk
    leaves the previous checkpoints valid and `latest` never resolves to a partial folder. Old checkpoints are
    removed only after the new one is complete. Call on every process (accelerate gathers state collectively).
    """
    final_path = os.path.join(output_dir, f"checkpoint-{global_step}")
    tmp_path = os.path.join(output_dir, f".checkpoint-{global_step}.tmp")
    if accelerator.is_main_process and os.path.exists(tmp_path):
        shutil.rmtree(tmp_path)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp_path, COMPLETE_MARKER), "w") as f:
            f.write(f"{global_step}\n")
        if os.path.exists(final_path):
            shutil.rmtree(final_path)
        os.replace(tmp_path, final_path)
        if total_limit is not None:
            checkpoints = list_checkpoints(output_dir)
            for name in checkpoints[: max(0, len(checkpoints) - total_limit)]:
                shutil.rmtree(os.path.join(output_dir, name))
                if logger is not None:
                    logger.info(f"Removed old checkpoint {name} (--checkpoints_total_limit {total_limit})")
        if logger is not None:
            logger.info(f"Saved state to {final_path}")
    accelerator.wait_for_everyone()
    return final_path


def check_finite_lora(state_dict, what="The LoRA"):
    """Refuses to write LoRA weights with NaN or inf values (they would load and produce black images)."""
    bad_keys = [key for key, value in state_dict.items() if not torch.isfinite(value).all()]
    if bad_keys:
        raise RuntimeError(
            f"{what} has non-finite values ({', '.join(bad_keys[:3])}{', ...' if len(bad_keys) > 3 else ''}); it was"
            " not written. Earlier checkpoints are intact: resume from one with a lower --learning_rate or --beta_dpo."
        )


# ----------------------------------------------------------------------------------------------------------------
# The small state a resumed run needs besides the adapters and the optimizer (no pickle: JSON and safetensors)
# ----------------------------------------------------------------------------------------------------------------


def _flatten(state, prefix=""):
    scalars, tensors = {}, {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not value:
            scalars[name] = {}  # kept explicitly: an empty dict has no leaves to rebuild it from
        elif isinstance(value, dict):
            sub_scalars, sub_tensors = _flatten(value, prefix=f"{name}/")
            scalars.update(sub_scalars)
            tensors.update(sub_tensors)
        elif isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
        else:
            scalars[name] = value
    return scalars, tensors


def _unflatten(flat):
    state = {}
    for name, value in flat.items():
        node = state
        *parents, leaf = name.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return state


def save_training_state(directory, state, name="training_state"):
    """Writes a nested dict of scalars and tensors as `<name>.json` + `<name>.safetensors`."""
    from safetensors.torch import save_file

    scalars, tensors = _flatten(state)
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        json.dump(scalars, f, indent=1, sort_keys=True)
    if tensors:
        save_file(tensors, os.path.join(directory, f"{name}.safetensors"))


def load_training_state(directory, name="training_state"):
    from safetensors.torch import load_file

    with open(os.path.join(directory, f"{name}.json")) as f:
        flat = json.load(f)
    tensor_path = os.path.join(directory, f"{name}.safetensors")
    if os.path.isfile(tensor_path):
        flat.update(load_file(tensor_path))
    return _unflatten(flat)


class TrainingProgress:
    """Where the run is: optimizer steps done, epoch, and batches consumed in that epoch (for exact resumes)."""

    def __init__(self):
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.nonfinite_steps = 0  # optimizer steps in a row skipped for a non-finite loss or gradient
        self.skipped_steps = 0  # all optimizer steps skipped so far (non-finite, or fp16 overflow)

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, int(value))


def generator_state_name(process_index):
    return f"training_generator_{process_index}.safetensors"


class RunState:
    """Everything besides the adapters and the optimizer that a resumed run needs to continue identically: the
    progress, the bad-row counts, this process's noise generator and the consensus labeler's state.

    `snapshot()` / `restore()` return the run to the start of an optimizer step: a signal that arrives between two
    micro-batches abandons the partial step, and the checkpoint then written resumes exactly.
    """

    def __init__(self, progress, bad_examples, generator, labeler=None, process_index=0):
        self.progress = progress
        self.bad_examples = bad_examples
        self.generator = generator
        self.labeler = labeler
        self.process_index = process_index

    def state_dict(self):
        state = {
            "progress": self.progress.state_dict(),
            "bad_examples": self.bad_examples.state_dict(),
            "generator": self.generator.get_state(),
        }
        if self.labeler is not None:
            state["consensus"] = self.labeler.state_dict()
        return state

    def load_state_dict(self, state):
        self.progress.load_state_dict(state["progress"])
        self.bad_examples.load_state_dict(state.get("bad_examples", {}))
        self.generator.set_state(state["generator"])
        if self.labeler is not None and "consensus" in state:
            self.labeler.load_state_dict(state["consensus"])

    def snapshot(self):
        import copy

        return copy.deepcopy(self.state_dict())

    def restore(self, snapshot):
        self.load_state_dict(snapshot)

    def save(self, directory):
        """Every process saves its own generator (they are seeded differently); the main process the rest."""
        from safetensors.torch import save_file

        save_file(
            {"state": self.generator.get_state()}, os.path.join(directory, generator_state_name(self.process_index))
        )
        if self.process_index == 0:
            save_training_state(directory, self.state_dict())

    def load(self, directory):
        from safetensors.torch import load_file

        self.load_state_dict(load_training_state(directory))
        path = os.path.join(directory, generator_state_name(self.process_index))
        if os.path.isfile(path):
            self.generator.set_state(load_file(path)["state"])


def training_generator(accelerator, seed):
    """The generator for the training noise, timesteps and VAE samples of this process.

    A dedicated generator (saved in every checkpoint) rather than the global RNG: DataLoader iterators, validation
    and third-party code draw from the global RNG at times that differ between an interrupted and an uninterrupted
    run, which would make a resumed run diverge.
    """
    generator = torch.Generator(device=accelerator.device)
    generator.manual_seed((seed if seed is not None else torch.initial_seed()) + 1000003 * accelerator.process_index)
    return generator


# ----------------------------------------------------------------------------------------------------------------
# Signals and bad rows, agreed by every process
# ----------------------------------------------------------------------------------------------------------------


class GracefulStop:
    """SIGTERM / SIGINT (preemption, Ctrl-C, `scancel`): stop at the next micro-batch, save a checkpoint, exit.

    The handler only sets a flag; the loop reads it between any two micro-batches, agreed by all processes (a signal
    may reach only some of them, and a process that went on alone would hang the others in their next collective).
    Further signals while stopping are ignored: launchers such as torchrun forward the signal that the scheduler also
    sends to every process, and a second one must not abort the checkpoint. Use as a context manager so the previous
    handlers come back.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    @property
    def requested_here(self):
        return self.signum is not None


def ignore_stop_signals(worker_id=None):
    """`worker_init_fn` of the DataLoaders: workers leave SIGTERM/SIGINT to the main process.

    Schedulers (and Ctrl-C in a terminal) signal every process of a job. A DataLoader worker killed by the signal
    makes PyTorch raise in the main process at once, before it could save its checkpoint; the main process shuts its
    workers down itself when it exits.
    """
    for sig in GracefulStop.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def record_bad_examples(accelerator, tracker, batch):
    """Counts and logs the bad rows of this micro-batch on every process, then applies `--max_bad_examples`.

    The rows of all processes are gathered first, so each bad row is logged once with its row id whichever process
    read it, the counts (logged and saved in checkpoints) are those of the whole run, and every process takes the
    same stop decision: one process stopping alone would leave the others waiting for it forever.
    """
    bad, num_rows, num_skipped = list(batch["bad_examples"]), int(batch["num_rows"]), int(batch["skipped_examples"])
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(bad, num_rows, num_skipped)])
        bad = [item for part in gathered for item in part[0]]
        num_rows = sum(part[1] for part in gathered)
        num_skipped = sum(part[2] for part in gathered)
    tracker.update(bad, num_seen=num_rows, num_skipped=num_skipped)
