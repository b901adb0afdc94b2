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
"""A `training.DPOTrainer` on a tiny pipeline (Stable Diffusion, or any family), assembled in-process from the same
set-up functions `training.train` uses, for tests that drive single optimizer steps."""

import os
import sys


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

import run_state  # noqa: E402
import training  # noqa: E402
import training_args  # noqa: E402


def reset_accelerate_state():
    """Forgets accelerate's process-wide singletons (an in-process run creates an Accelerator)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def sd_args(assets, output_dir, *extra):
    import train_balanced_dpo

    config = ["--reward_config", assets["reward_config"]] if assets.get("reward_config") else []
    return train_balanced_dpo.parse_args(
        [
            "--pretrained_model_name_or_path", assets["sd"],
            "--dataset_name", assets["pickapic"],
            *config,
            "--reward_models", "clip,aesthetic",
            "--output_dir", str(output_dir),
            "--resolution", "32",
            "--train_batch_size", "4",
            "--learning_rate", "1e-3",
            "--beta_dpo", "500",
            "--seed", "0",
            *extra,
        ]
    )  # fmt: skip


def build_sd_trainer(accelerator, args, optimizer_factory=None):
    """(trainer, pair dataset) for `args`, as `training.train` sets them up (constant learning rate)."""
    import train_balanced_dpo

    return build_trainer(accelerator, args, train_balanced_dpo.StableDiffusionFamily, optimizer_factory)


def build_trainer(accelerator, args, family_class, optimizer_factory=None):
    """(trainer, pair dataset) of any family for `args`, as `training.train` sets them up (float32 weights, constant
    learning rate, `family.prepare` called on the map-style training split)."""
    import datasets
    from diffusers.optimization import get_scheduler

    plan = training_args.validate_args(args, family_class)
    family = family_class.from_pretrained(args, accelerator.device, torch.float32)
    params, _ = training.add_lora(args, plan, family, accelerator)
    optimizer = accelerator.prepare((optimizer_factory or training.make_optimizer)(args, params))
    lr_scheduler = accelerator.prepare(get_scheduler("constant", optimizer=optimizer))
    scorer_set = training.build_scorer_set(args, plan, accelerator.device)
    trainer = training.DPOTrainer(
        args=args,
        plan=plan,
        accelerator=accelerator,
        family=family,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        generator=run_state.training_generator(accelerator, args.seed),
        scorer_set=scorer_set,
        labeler=training.make_labeler(args, scorer_set),
    )
    dataset = datasets.load_dataset(args.dataset_name, split="train")
    family.prepare(dataset, streaming=False)
    pairs = training.make_pair_dataset(args, plan, dataset, scorer_set, accelerator)
    return trainer, pairs


def batch_of(trainer, pairs, rows):
    """The collated batch of the given dataset rows, as the training DataLoader builds it."""
    import preference_data

    collate = preference_data.PairCollator(trainer.family.tokenize_fn(), resolution=trainer.args.resolution)
    return collate(pairs.__getitems__(list(rows)))
