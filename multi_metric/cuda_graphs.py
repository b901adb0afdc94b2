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
"""CUDA graphs for the frozen forwards of the scorers, and the prompt buckets that keep the number of graphs small."""

import logging
from typing import Callable, Dict, List, Optional

import torch


logger = logging.getLogger(__name__)


class CUDAGraphRunner:
    """Replays CUDA graphs of frozen forwards (one graph per function and input shape) instead of launching kernels.

    A CLIP forward is about a thousand small kernels: inside a training step the host time to launch them costs more
    than the GPU work itself. A replayed graph launches them at once. Inputs are copied into the graph's static
    buffers and outputs cloned out, so results equal the eager forward. Used only for models that stay on one CUDA
    device (never with offloading); if a forward cannot be captured, all forwards run eagerly from then on, with a
    warning.
    Graphs share one memory pool; that is safe because replays never run concurrently and outputs are cloned.
    """

    def __init__(self, max_graphs: int = 64, warmup_runs: int = 2):
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self._graphs: Dict[tuple, tuple] = {}
        self.disabled = False
        self._pool = None

    def __len__(self):
        return len(self._graphs)

    def __call__(self, name: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        if not inputs[0].is_cuda or self.disabled:
            return fn(*inputs)
        key = (name,) + tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return fn(*inputs)
            entry = self._capture(name, key, fn, inputs)
            if entry is None:
                return fn(*inputs)
        graph, static_inputs, static_output = entry
        for static, x in zip(static_inputs, inputs):
            static.copy_(x, non_blocking=True)
        graph.replay()
        return static_output.clone()

    def _capture(self, name, key, fn, inputs):
        device = inputs[0].device
        static_inputs = [x.clone() for x in inputs]
        current = torch.cuda.current_stream(device)
        warmup = torch.cuda.Stream(device=device)
        warmup.wait_stream(current)
        try:
            # Lazy initialisation (cuBLAS handles, autotuning) must happen outside the capture.
            with torch.cuda.stream(warmup):
                for _ in range(self.warmup_runs):
                    fn(*static_inputs)
            current.wait_stream(warmup)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: a DataLoader pin-memory thread may allocate while we capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static_output = fn(*static_inputs)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to the eager forward
            # A failed capture leaves the allocator's graph pool unusable for later captures, so from here on every
            # forward of this runner runs eagerly (eager forwards are unaffected).
            self.disabled = True
            torch.cuda.synchronize(device)
            logger.warning(
                f"Scorer forward {name} cannot be captured in a CUDA graph ({str(error).splitlines()[0]}); scorer"
                " forwards run eagerly (as with --no_scorer_cuda_graphs)."
            )
            return None
        self._graphs[key] = (graph, static_inputs, static_output)
        return self._graphs[key]


def _run_forward(graphs: Optional[CUDAGraphRunner], name: str, fn: Callable[..., torch.Tensor], *inputs):
    return graphs(name, fn, *inputs) if graphs is not None else fn(*inputs)


def _prompt_bucket(count: int, batch_size: int) -> int:
    """Number of text rows to run for `count` prompts under CUDA graphs: the next power of two (at most
    `batch_size`), so a few graphs serve every batch whatever its number of distinct prompts."""
    return min(batch_size, 1 << max(count - 1, 0).bit_length())


def _padded_prompt_chunks(prompts: List[str], batch_size: int, bucket: bool):
    """Chunks of at most `batch_size` prompts, each padded (with its last prompt) to its bucket size when `bucket`.
    Yields (chunk, number of real prompts)."""
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        real = len(chunk)
        if bucket:
            chunk = chunk + [chunk[-1]] * (_prompt_bucket(real, batch_size) - real)
        yield chunk, real
