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
"""Run by tests/test_training_loop.py under `torchrun --nproc_per_node 2` (DDP over gloo on the CPU).

For hand-made kept-pair masks, one optimizer step of `training.DPOTrainer` (SGD, lr 1, no clipping) must move the LoRA
by the mean gradient over every kept pair of every process and micro-batch: the gradient of the mean loss of those
pairs. Prints "OK <scenario>" for each scenario that holds.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/two_process_weighting.py SD PICKAPIC CONFIG OUT
"""

import sys

import torch
import torch.distributed as dist
from trainer_utils import batch_of, build_sd_trainer, sd_args

import training


# Kept pairs per micro-batch (two micro-batches of 4 pairs) on process 0 and process 1.
SCENARIOS = {
    "uneven": ([[0], [1, 2, 3]], [[0, 3], []]),  # 1 + 3 pairs against 2: a mean of means would weigh them unequally
    "one_process_without_pairs": ([[2], []], [[], []]),
    "no_pairs_anywhere": ([[], []], [[], []]),
}


def main(model, dataset, reward_config, output_dir):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    assets = {"sd": model, "pickapic": dataset, "reward_config": reward_config}
    args = sd_args(assets, output_dir, "--gradient_accumulation_steps", "2", "--max_grad_norm", "1e9")
    trainer, pairs = build_sd_trainer(
        accelerator, args, optimizer_factory=lambda args, params: torch.optim.SGD(params, lr=1.0)
    )
    batches = [batch_of(trainer, pairs, range(4 * (2 * rank + k), 4 * (2 * rank + k) + 4)) for k in range(2)]
    for name, kept in SCENARIOS.items():
        masks = kept[rank]
        # The expected update: the gradient of the mean loss over every kept pair, computed directly.
        trainer.generator.manual_seed(1234 + rank)
        total = [torch.zeros_like(p) for p in trainer.params]
        count = 0
        for batch, index in zip(batches, masks):
            if index:
                index = torch.tensor(index)
                labels = torch.ones(len(index))
                losses = trainer.pair_losses(batch, index, labels, labels)
                for t, g in zip(total, torch.autograd.grad(losses.sum(), trainer.params)):
                    t += g
                count += len(index)
        flat = torch.cat([t.reshape(-1) for t in total] + [torch.tensor([float(count)])])
        dist.all_reduce(flat)
        pairs_in_all = int(flat[-1])
        expected = flat[:-1] / max(pairs_in_all, 1)

        # The trainer's optimizer step on the same pairs with the same noise.
        trainer.reset_step()
        trainer.generator.manual_seed(1234 + rank)
        before = [p.detach().clone() for p in trainer.params]
        for batch, index in zip(batches, masks):
            keep = torch.zeros(batch["batch_size"], dtype=torch.bool)
            keep[index] = True
            ones = torch.ones(batch["batch_size"])
            trainer.accumulate(batch, training.PairLabels(ones, ones, keep, {}))
        outcome = trainer.optimizer_step()
        moved = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, trainer.params)])
        assert outcome.pairs == pairs_in_all, (name, outcome)
        if pairs_in_all == 0:
            assert outcome.status == "empty" and moved.abs().max() == 0, (name, outcome)
        else:
            assert outcome.status == "stepped", (name, outcome)
            torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-7, msg=f"{name}: wrong update")
            assert expected.abs().max() > 0
        # Same start for the next scenario.
        with torch.no_grad():
            for p, b in zip(trainer.params, before):
                p.copy_(b)
        if rank == 0:
            print(f"OK {name}", flush=True)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:5])
