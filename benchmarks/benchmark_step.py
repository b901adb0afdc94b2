#!/usr/bin/env python
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
"""Step time, throughput and memory of BalancedDPO training against the Diffusion-DPO baseline.

In one process and on the same models, times the training step of `train_balanced_dpo.py` (SD 1.x),
`train_balanced_dpo_sdxl.py` (SDXL), `train_balanced_dpo_sd3.py` (SD3.5-Medium) or `train_balanced_dpo_flux.py`
(FLUX.1-dev, optionally on an NF4 base) in three modes:

- `human`: Diffusion-DPO with the human label (`--consensus human`): VAE encode of both images, text encode, policy
  forward and backward, reference forward with the adapters disabled, optimizer step, as in diffusers' example.
- `live`: BalancedDPO with the consensus of pickscore, hpsv2, clip and aesthetic scored on every batch.
- `precomputed`: BalancedDPO with consensus labels read from dataset columns (`--precomputed_consensus`).

For each mode, pairs per step and gradient checkpointing setting it reports the median step time, pairs per second,
peak memory, the share of the step spent scoring, a breakdown of the step, and ratios against `human`. The step is
the training loop's own code: `training.micro_batches` (where scoring the next batch starts), `DPOTrainer.consensus`,
`DPOTrainer.accumulate` (the family's conditioning, noise and prediction, the loss, backward) and
`DPOTrainer.optimizer_step`; batches come from the training data pipeline (`training.make_pair_dataset` and
`PairCollator`, including the scorers' 224 px preprocessing), prepared before timing as DataLoader workers would.

    # CPU, tiny random models (seconds)
    python benchmarks/benchmark_step.py --model tiny --json tiny.json
    # GPU, full-size SD1.5 / SDXL and CLIP-H/14, CLIP-L/14 scorers with random weights (no Hub needed)
    python benchmarks/benchmark_step.py --model sd15 sdxl --json gpu.json
    # GPU, SD3.5-Medium and FLUX.1-dev (bf16 and NF4 base) at 1024 px, 1 pair, gradient checkpointing, cached text
    # embeddings (the T5 encoder encodes the batch's captions once and is freed, as --cache_text_embeddings does)
    python benchmarks/benchmark_step.py --model sd35m flux flux-nf4 --pairs 1 --gradient_checkpointing on \
      --modes human live precomputed --json flow.json

The full-size models are built from their published configs (below) with random weights: that measures speed and
memory faithfully and says nothing about image quality.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict, Optional


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Everything is built locally; never wait for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import balanced_dpo  # noqa: E402
import preference_data  # noqa: E402
import rewards  # noqa: E402
import run_state  # noqa: E402
import tiny_assets  # noqa: E402
import training  # noqa: E402
import training_args  # noqa: E402


# live_plain: live scoring as a plain implementation does it (eager forwards, each batch scored when it is
# trained on); live: the training default (CUDA-graph forwards, scored one batch ahead on a side stream).
MODES = ("human", "live", "live_plain", "precomputed")
LIVE_METRICS = ("pickscore", "hpsv2", "clip", "aesthetic")
PHASES = (
    "vae_encode",
    "text_encode",
    "consensus",
    "unet_forward",
    "reference_forward",
    "unet_backward",
    "optimizer",
)
GIB = 2**30

# ----------------------------------------------------------------------------------------------------------------
# Published configs (random weights are drawn from them; no download)
# ----------------------------------------------------------------------------------------------------------------

# stable-diffusion-v1-5/stable-diffusion-v1-5: unet/config.json (859.5 M parameters)
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# stable-diffusion-v1-5: vae/config.json (83.7 M parameters)
SD15_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# The text tower of openai/clip-vit-large-patch14: SD1.5's text encoder and SDXL's first one (123.1 M parameters).
CLIP_L_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# The training noise schedule of SD1.5 and SDXL base (the keys of their scheduler configs that DDPMScheduler reads).
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json (2567.5 M parameters)
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "upcast_attention": False,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# stable-diffusion-xl-base-1.0: vae/config.json (the same architecture as madebyollin/sdxl-vae-fp16-fix)
SDXL_VAE_CONFIG = dict(SD15_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# stable-diffusion-xl-base-1.0: text_encoder_2/config.json, OpenCLIP ViT-bigG/14's text tower (694.7 M parameters)
SDXL_TEXT_ENCODER_2_CONFIG = dict(
    CLIP_L_TEXT_CONFIG,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
)
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K = yuvalkirstain/PickScore_v1's architecture (986.1 M parameters)
CLIP_VIT_H_14_CONFIG = {
    "text_config": dict(
        CLIP_L_TEXT_CONFIG,
        hidden_size=1024,
        intermediate_size=4096,
        projection_dim=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        hidden_act="gelu",
    ),
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "projection_dim": 1024,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    },
    "projection_dim": 1024,
    "logit_scale_init_value": 2.6592,
}
# openai/clip-vit-large-patch14 (427.6 M parameters): the clip scorer and the aesthetic predictor's backbone
CLIP_VIT_L_14_CONFIG = {
    "text_config": dict(CLIP_L_TEXT_CONFIG),
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "projection_dim": 768,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
}
# stabilityai/stable-diffusion-3.5-medium: transformer/config.json, the MMDiT-X (2243.2 M parameters)
SD35M_TRANSFORMER_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
# black-forest-labs/FLUX.1-dev: transformer/config.json (11901.4 M parameters)
FLUX_DEV_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# The 16-channel VAE of SD3 / SD3.5 (vae/config.json, 83.8 M parameters); FLUX.1's differs only in shift and scale.
SD3_VAE_CONFIG = dict(
    SD15_VAE_CONFIG,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
FLUX_VAE_CONFIG = dict(SD3_VAE_CONFIG, scaling_factor=0.3611, shift_factor=0.1159)
# google/t5-v1_1-xxl's encoder: text_encoder_3 of SD3 and text_encoder_2 of FLUX.1 (4762.3 M parameters)
T5_XXL_CONFIG = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
}
# scheduler/scheduler_config.json of SD3.5 and of FLUX.1-dev (which shifts by resolution at inference only).
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# HPS v2 is open_clip's built-in "ViT-H-14" architecture; the LAION aesthetic predictor v2 an MLP at these
# nn.Sequential indices (the gaps are dropout layers).
HPSV2_OPEN_CLIP_ARCH = "ViT-H-14"
AESTHETIC_HEAD_DIMS = (768, 1024, 128, 64, 16, 1)
AESTHETIC_HEAD_INDICES = (0, 2, 4, 6, 7)


@dataclasses.dataclass
class ModelSpec:
    family: str  # "sd", "sdxl", "sd3" or "flux"
    resolution: int
    warmup_steps: int
    steps: int
    full_size: bool
    label: str
    quantize_base: Optional[str] = None  # --quantize_base of the flow-matching families

    @property
    def sdxl(self):
        return self.family == "sdxl"

    @property
    def flow_matching(self):
        return self.family in ("sd3", "flux")


MODEL_SPECS = {
    # The tiny assets of the test suite: the CPU smoke runs.
    "tiny": ModelSpec("sd", resolution=32, warmup_steps=1, steps=3, full_size=False, label="tiny SD"),
    "tiny-sdxl": ModelSpec("sdxl", resolution=32, warmup_steps=1, steps=3, full_size=False, label="tiny SDXL"),
    "tiny-sd3": ModelSpec("sd3", resolution=32, warmup_steps=1, steps=3, full_size=False, label="tiny SD3"),
    "tiny-flux": ModelSpec("flux", resolution=32, warmup_steps=1, steps=3, full_size=False, label="tiny FLUX"),
    "sd15": ModelSpec("sd", resolution=512, warmup_steps=2, steps=6, full_size=True, label="SD1.5"),
    "sdxl": ModelSpec("sdxl", resolution=1024, warmup_steps=1, steps=3, full_size=True, label="SDXL"),
    "sd35m": ModelSpec("sd3", resolution=1024, warmup_steps=1, steps=3, full_size=True, label="SD3.5-Medium"),
    "flux": ModelSpec("flux", resolution=1024, warmup_steps=1, steps=3, full_size=True, label="FLUX.1-dev"),
    "flux-nf4": ModelSpec(
        "flux", resolution=1024, warmup_steps=1, steps=3, full_size=True, label="FLUX.1-dev NF4", quantize_base="nf4"
    ),
}
# (model, resolution, pairs, gradient checkpointing, memory limit in GiB): the targets of the README. The flow-matching
# families run with cached text embeddings (the T5 encoder freed before training).
MEMORY_TARGETS = (
    ("sd15", 512, 8, True, 16.0),
    ("sdxl", 1024, 1, None, 24.0),  # None: with or without checkpointing, whichever was measured (on first)
    ("sd35m", 1024, 1, True, 24.0),
    ("flux", 1024, 1, True, 48.0),
    ("flux-nf4", 1024, 1, True, 24.0),
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Step time, throughput and memory of BalancedDPO (live / precomputed consensus) against "
        "Diffusion-DPO (human labels), on the same models in one process.",
    )
    parser.add_argument(
        "--model",
        nargs="+",
        default=["tiny"],
        choices=sorted(MODEL_SPECS),
        help="tiny, tiny-sdxl, tiny-sd3, tiny-flux: the tiny test assets (CPU); sd15, sdxl, sd35m, flux, flux-nf4:"
        " full-size architectures from their published configs, random weights (flux-nf4: its transformer in NF4).",
    )
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 4, 8], help="Pairs per training step.")
    parser.add_argument("--gradient_checkpointing", choices=["on", "off", "both"], default="both")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--warmup_steps", type=int, default=None, help="Untimed steps per configuration (default: per model)."
    )
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per configuration (default: per model).")
    parser.add_argument("--json", type=str, default=None, help="Write the results here (rewritten after each run).")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available).")
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="As the training scripts' flag: weights in this dtype, LoRA in fp32 (default: bf16 on GPU, no on CPU).",
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="Override the model's resolution (e.g. a cheap CPU check)."
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    parser.add_argument(
        "--no_8bit_adam", action="store_true", help="torch AdamW instead of bitsandbytes' AdamW8bit (the default)."
    )
    parser.add_argument(
        "--sdxl_vae",
        choices=["fp16-fix", "stock"],
        default="fp16-fix",
        help="fp16-fix: the VAE runs in the weight dtype, as with --pretrained_vae_model_name_or_path "
        "madebyollin/sdxl-vae-fp16-fix (the recommended setting); stock: in fp32, the script's default.",
    )
    parser.add_argument("--offload_scorers", action="store_true", help="As the training flag of the same name.")
    parser.add_argument("--allow_tf32", action="store_true", help="As the training flag of the same name.")
    parser.add_argument(
        "--time_budget_s",
        type=float,
        default=None,
        help="Start no new configuration after this many seconds; the rest are reported as skipped.",
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 is steadiest on busy CPUs).",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(input_args)


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates the time of named phases of a step.

    On CUDA, phases are bracketed with CUDA events (no synchronization inside the step: the timed step is the real
    one); on the CPU with `perf_counter`. `collect()` must follow a synchronization.
    """

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.enabled = False
        self.reset()

    def reset(self):
        self.spans = {}
        self.seconds = {}
        self._open = {}

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name):
        if self.enabled:
            self._open.setdefault(name, []).append(self._mark())

    def stop(self, name):
        if self.enabled and self._open.get(name):
            self.spans.setdefault(name, []).append((self._open[name].pop(), self._mark()))

    def add_seconds(self, name, seconds):
        if self.enabled:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, name):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def collect(self) -> Dict[str, float]:
        """Seconds per phase since the last call (completed spans only)."""
        out = dict(self.seconds)
        for name, spans in self.spans.items():
            if self.cuda:
                total = sum(start.elapsed_time(end) for start, end in spans) / 1000.0
            else:
                total = sum(end - start for start, end in spans)
            out[name] = out.get(name, 0.0) + total
        self.reset()
        return out


class Instrumentation:
    """Hooks that time the VAE encode, the text encoders and the policy / reference UNet forwards.

    The UNet call made with gradients enabled is the policy forward; the one without (inside
    `balanced_dpo.reference_model`) the reference forward.
    """

    def __init__(self, timer, vae, text_encoders, unet, accelerator):
        self.timer = timer
        self.handles = []
        self.vae = vae
        self.accelerator = accelerator
        self._unet_stack = []
        original_encode = vae.encode
        original_backward = accelerator.backward

        def timed_encode(*args, **kwargs):
            with timer.phase("vae_encode"):
                return original_encode(*args, **kwargs)

        def timed_backward(*args, **kwargs):
            with timer.phase("unet_backward"):
                return original_backward(*args, **kwargs)

        # Instance attributes shadowing the methods; removed in `remove()`.
        vae.encode = timed_encode
        accelerator.backward = timed_backward
        for encoder in text_encoders:
            self.handles.append(encoder.register_forward_pre_hook(lambda module, args: timer.start("text_encode")))
            self.handles.append(encoder.register_forward_hook(lambda module, args, out: timer.stop("text_encode")))

        def unet_pre(module, args):
            name = "unet_forward" if torch.is_grad_enabled() else "reference_forward"
            self._unet_stack.append(name)
            timer.start(name)

        def unet_post(module, args, output):
            if self._unet_stack:
                timer.stop(self._unet_stack.pop())

        self.handles.append(unet.register_forward_pre_hook(unet_pre))
        self.handles.append(unet.register_forward_hook(unet_post))

    def reset(self):
        self._unet_stack.clear()

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if "encode" in self.vae.__dict__:
            del self.vae.encode
        if "backward" in self.accelerator.__dict__:
            del self.accelerator.backward


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class MemoryMeter:
    """Peak memory of one configuration: `torch.cuda.max_memory_allocated` on CUDA; on the CPU the growth of the
    peak resident set size over the resident size at the start (Linux: the peak is reset through
    /proc/self/clear_refs), or None where that is unavailable."""

    def __init__(self, device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_delta"
        self._start_kib = None

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self._start_kib = _proc_status_kib("VmRSS")
        except OSError:
            self._start_kib = None

    def peak_gib(self) -> Optional[float]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        if self._start_kib is None:
            return None
        return max(0, _proc_status_kib("VmHWM") - self._start_kib) / 2**20

    def reserved_gib(self) -> Optional[float]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device) / GIB
        return None


def free_memory(device, collect=True):
    """Releases cached device memory; `collect` also runs the garbage collector (about 0.3 s with these libraries
    loaded, so once per configuration)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pipeline:
    """The models of one family, set up as the training script sets them up (LoRA added, frozen weights cast)."""

    name: str
    spec: ModelSpec
    resolution: int
    family_class: type
    family: object  # a training.ModelFamily holding the models
    accelerator: object
    params_to_optimize: list
    text_encoders: list  # the ones the step runs (none once cached text embeddings freed them)
    text_encoder_parameters_m: list = dataclasses.field(default_factory=list)
    scorer_set: object = None
    reward_config: Optional[str] = None
    scorers_on_device: bool = True

    @property
    def denoiser(self):
        return self.family.denoiser

    @property
    def vae(self):
        return self.family.vae

    @property
    def weight_dtype(self):
        return self.family.weight_dtype


def configuration_args(
    family_class, spec, resolution, mode, pairs, gradient_checkpointing, options, reward_config=None
):
    """The training script's own argument namespace for one configuration (its defaults for everything else)."""
    argv = [
        "--pretrained_model_name_or_path", "benchmark",
        "--dataset_name", "benchmark",
        "--resolution", str(resolution),
        "--train_batch_size", str(pairs),
        "--rank", str(options.rank),
        "--mixed_precision", options.mixed_precision,
        "--report_to", "none",
        "--seed", str(options.seed),
    ]  # fmt: skip
    if not options.no_8bit_adam:
        argv.append("--use_8bit_adam")
    if gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if options.offload_scorers:
        argv.append("--offload_scorers")
    if spec.sdxl and options.sdxl_vae == "fp16-fix":
        argv += ["--pretrained_vae_model_name_or_path", "madebyollin/sdxl-vae-fp16-fix"]
    if spec.flow_matching:
        argv.append("--cache_text_embeddings")
        if spec.quantize_base:
            argv += ["--quantize_base", spec.quantize_base]
    if mode == "human":
        argv += ["--consensus", "human"]
    elif mode == "precomputed":
        argv.append("--precomputed_consensus")
    else:
        argv += ["--reward_models", ",".join(LIVE_METRICS)]
        if mode == "live_plain":
            argv += ["--no_scorer_cuda_graphs", "--no_score_ahead"]
        if reward_config is not None:
            argv += ["--reward_config", reward_config]
    args = training_args.parse_args(family_class, argv)
    return args, training_args.validate_args(args, family_class)


def _cast_models(pipeline_parts, device, weight_dtype, vae_dtype):
    unet, vae, text_encoders = pipeline_parts
    for model in (vae, *text_encoders, unet):
        model.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=vae_dtype)
    for encoder in text_encoders:
        encoder.to(device, dtype=weight_dtype)


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _construct(constructor, device, dtype):
    """Builds a randomly initialised model directly on `device` (initialising billions of parameters on the CPU and
    copying them over would take minutes) and casts it to `dtype` at once, so that only one model at a time is ever
    in float32. On the CPU, where memory is short, it is initialised in `dtype` directly."""
    init_dtype = torch.float32 if device.type == "cuda" else dtype
    with torch.device(device), _default_dtype(init_dtype):
        model = constructor()
    return model.to(dtype=dtype)


def build_full_size_models(name, spec, device, weight_dtype, workdir, seed):
    """UNet, VAE, text encoders, tokenizers and noise scheduler of SD1.5 or SDXL from their configs, random weights.

    The VAE is returned in float32; the caller casts it as the training script would."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def build(constructor, *args, dtype=weight_dtype):
        return _construct(lambda: constructor(*args), device, dtype)

    torch.manual_seed(seed)
    if spec.sdxl:
        unet = build(lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG))
        vae = build(lambda: AutoencoderKL(**SDXL_VAE_CONFIG), dtype=torch.float32)
        text_encoders = [
            build(CLIPTextModel, CLIPTextConfig(**CLIP_L_TEXT_CONFIG)),
            build(CLIPTextModelWithProjection, CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG)),
        ]
    else:
        unet = build(lambda: UNet2DConditionModel(**SD15_UNET_CONFIG))
        vae = build(lambda: AutoencoderKL(**SD15_VAE_CONFIG), dtype=torch.float32)
        text_encoders = [build(CLIPTextModel, CLIPTextConfig(**CLIP_L_TEXT_CONFIG))]
    # The real 49,408-token CLIP BPE (written from open_clip's copy); SDXL's second tokenizer pads with "!".
    tokenizers = [tiny_assets.write_clip_tokenizer(os.path.join(workdir, name, "tokenizer"))]
    if spec.sdxl:
        tokenizers.append(tiny_assets.write_clip_tokenizer(os.path.join(workdir, name, "tokenizer_2"), pad_token="!"))
    return unet, vae, text_encoders, tokenizers, DDPMScheduler(**SD_SCHEDULER_CONFIG)


def build_tiny_models(spec, assets):
    """The tiny test pipeline, loaded as the training scripts load a pipeline folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path = assets["sdxl"] if spec.sdxl else assets["sd"]
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False)]
    if spec.sdxl:
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False))
    return unet, vae, text_encoders, tokenizers, DDPMScheduler.from_pretrained(path, subfolder="scheduler")


def _aesthetic_head_state(seed):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, fan_in, fan_out in zip(AESTHETIC_HEAD_INDICES, AESTHETIC_HEAD_DIMS[:-1], AESTHETIC_HEAD_DIMS[1:]):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) * fan_in**-0.5
        state[f"layers.{index}.bias"] = torch.zeros(fan_out)
    return state


def build_full_size_scorers(device, dtype, workdir, seed, offload=False):
    """pickscore (CLIP-H/14), hpsv2 (open_clip ViT-H-14), clip and aesthetic (one shared CLIP-L/14) with random
    weights, built through `rewards.build_scorer`.

    The models are created here and handed to the scorers through `build_scorer`'s `model_pool` (the pool a
    ScorerSet shares between its scorers), so no multi-GB random checkpoint has to be written and read back; the
    scorers, their preprocessing, tokenizers and scoring code are rewards.py's own. The aesthetic head is small and
    is loaded from a real `.pth` file.
    """
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    tokenizer_dir = os.path.join(workdir, "scorers", "clip_tokenizer")
    clip_tokenizer = tiny_assets.write_clip_tokenizer(tokenizer_dir)
    # Both CLIP processor configs: shortest side 224 (bicubic), center crop 224, OpenAI mean and std.
    clip_preprocessor = rewards.CLIPImagePreprocessor(size=224, crop_size=224)

    def build(constructor):
        return _construct(constructor, device, dtype).eval().requires_grad_(False)

    torch.manual_seed(seed)
    clip_h = build(lambda: CLIPModel(CLIPConfig(**CLIP_VIT_H_14_CONFIG)))
    clip_l = build(lambda: CLIPModel(CLIPConfig(**CLIP_VIT_L_14_CONFIG)))
    hps_model = build(lambda: open_clip.create_model(HPSV2_OPEN_CLIP_ARCH, pretrained=None, device=device))

    pickscore_path = os.path.join(workdir, "scorers", "PickScore_v1")
    clip_l_path = os.path.join(workdir, "scorers", "clip-vit-large-patch14")
    head_path = os.path.join(workdir, "scorers", "sac+logos+ava1-l14-linearMSE.pth")
    hps_checkpoint = os.path.join(workdir, "scorers", "HPS_v2.1_compressed.pt")
    torch.save(_aesthetic_head_state(seed), head_path)
    torch.save({"state_dict": {}}, hps_checkpoint)  # a placeholder: the model comes from the pool

    hps_cfg = open_clip.get_model_preprocess_cfg(hps_model)
    hps_size = hps_cfg.get("size", 224)
    hps_preprocessor = rewards.PadToSquarePreprocessor(
        size=hps_size[0] if isinstance(hps_size, (tuple, list)) else hps_size,
        image_mean=hps_cfg.get("mean", rewards.OPENAI_CLIP_MEAN),
        image_std=hps_cfg.get("std", rewards.OPENAI_CLIP_STD),
    )

    # The pool keys of rewards.py's loaders: ("clip", path, processor path, dtype), ("open_clip", arch, file, dtype).
    def pooled(model, tokenizer, preprocessor):
        return rewards.PooledModel(model, tokenizer, preprocessor, float(model.logit_scale.double().exp()))

    pool = {
        ("clip", pickscore_path, tokenizer_dir, dtype): pooled(clip_h, clip_tokenizer, clip_preprocessor),
        ("clip", clip_l_path, clip_l_path, dtype): pooled(clip_l, clip_tokenizer, clip_preprocessor),
        ("open_clip", HPSV2_OPEN_CLIP_ARCH, os.path.abspath(hps_checkpoint), dtype): pooled(
            hps_model, open_clip.get_tokenizer(HPSV2_OPEN_CLIP_ARCH), hps_preprocessor
        ),
    }
    options = {
        "pickscore": {"path": pickscore_path, "processor_path": tokenizer_dir},
        "hpsv2": {"path": hps_checkpoint, "arch": HPSV2_OPEN_CLIP_ARCH},
        "clip": {"path": clip_l_path},
        "aesthetic": {"path": clip_l_path, "head_path": head_path},
    }
    scorers = {
        name: rewards.build_scorer(name, model_pool=pool, device=device, dtype=dtype, **options[name])
        for name in LIVE_METRICS
    }
    expected = {"pickscore": clip_h, "hpsv2": hps_model, "clip": clip_l, "aesthetic": clip_l}
    for name, model in expected.items():
        if getattr(scorers[name], "model", None) is not model:
            raise RuntimeError(
                f"rewards.build_scorer('{name}') did not take its model from the pool; the pool keys in "
                "benchmark_step.py no longer match rewards.py's loaders."
            )
    if offload:
        for scorer in scorers.values():
            scorer.to("cpu")
    return rewards.ScorerSet(scorers, device=device, offload=offload)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_flow_family(name, spec, family_class, args, device, weight_dtype, workdir, seed):
    """The SD3.5-Medium or FLUX.1-dev family with random weights from the published configs, holding its models as
    its `from_pretrained` would (frozen, in the weight dtype, the VAE in the dtype the family gives it). With
    `spec.quantize_base` the transformer is written to `workdir` and loaded back through the family's own
    `load_transformer` (diffusers' BitsAndBytesConfig), as the training script loads it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def build(constructor, dtype=weight_dtype):
        return _construct(constructor, device, dtype).requires_grad_(False)

    torch.manual_seed(seed)
    folder = os.path.join(workdir, name)
    t5 = build(lambda: T5EncoderModel(T5Config(**T5_XXL_CONFIG)))
    # A small T5 vocabulary stands in for T5's 32,128 pieces: its ids index the same embedding table.
    t5_tokenizer = tiny_assets.write_t5_tokenizer(os.path.join(folder, "tokenizer_t5"))
    clip_tokenizer = tiny_assets.write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    if spec.family == "sd3":
        vae_config, scheduler_config = SD3_VAE_CONFIG, SD3_SCHEDULER_CONFIG
        transformer_class, transformer_config = SD3Transformer2DModel, SD35M_TRANSFORMER_CONFIG
        text_encoders = [
            build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))),
            build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))),
            t5,
        ]
        clip_g_tokenizer = tiny_assets.write_clip_tokenizer(os.path.join(folder, "tokenizer_2"), pad_token="!")
        tokenizers = [clip_tokenizer, clip_g_tokenizer, t5_tokenizer]
    else:
        vae_config, scheduler_config = FLUX_VAE_CONFIG, FLUX_SCHEDULER_CONFIG
        transformer_class, transformer_config = FluxTransformer2DModel, FLUX_DEV_TRANSFORMER_CONFIG
        text_encoders = [build(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))), t5]
        tokenizers = [clip_tokenizer, t5_tokenizer]
    vae = build(lambda: AutoencoderKL(**vae_config), dtype=family_class.vae_dtype(vae_config, weight_dtype))
    transformer = build(lambda: transformer_class(**transformer_config))
    if spec.quantize_base:
        transformer.save_pretrained(os.path.join(folder, "transformer"))
        del transformer
        free_memory(device)
        load_args = argparse.Namespace(**vars(args))
        load_args.pretrained_model_name_or_path = folder
        transformer = family_class.load_transformer(load_args, device, weight_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
    return family_class(args, transformer, vae, text_encoders, tokenizers, scheduler, weight_dtype)


def build_pipeline(name, options, accelerator, device, workdir):
    """Builds the models of `name` as the family's `from_pretrained` would and adds the LoRA as `training.train` does."""
    spec = MODEL_SPECS[name]
    if spec.flow_matching:
        return build_flow_pipeline(name, spec, options, accelerator, device, workdir)
    if spec.sdxl:
        from train_balanced_dpo_sdxl import StableDiffusionXLFamily as family_class
    else:
        from train_balanced_dpo import StableDiffusionFamily as family_class
    resolution = options.resolution or spec.resolution
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[options.mixed_precision]
    scorer_dtype = rewards.default_scorer_dtype(device)  # the training default (--scorer_dtype unset)
    need_scorers = any(m.startswith("live") for m in options.modes)
    reward_config = None
    if spec.full_size:
        unet, vae, text_encoders, tokenizers, noise_scheduler = build_full_size_models(
            name, spec, device, weight_dtype, workdir, options.seed
        )
        scorer_set = (
            build_full_size_scorers(device, scorer_dtype, workdir, options.seed, options.offload_scorers)
            if need_scorers
            else None
        )
    else:
        assets = tiny_assets.build_all(os.path.join(workdir, "tiny_assets"), sdxl=spec.sdxl, seed=options.seed)
        unet, vae, text_encoders, tokenizers, noise_scheduler = build_tiny_models(spec, assets)
        reward_config = assets["reward_config"]
        scorer_set = None
        if need_scorers:
            scorer_set = rewards.build_scorers(
                list(LIVE_METRICS),
                config=reward_config,
                device=device,
                dtype=scorer_dtype,
                offload=options.offload_scorers,
            )

    # What the family's from_pretrained and training.train do with the models, in the same order.
    args, plan = configuration_args(family_class, spec, resolution, "human", 1, False, options)
    vae_dtype = weight_dtype
    if spec.sdxl and args.pretrained_vae_model_name_or_path is None:
        vae_dtype = torch.float32  # the stock SDXL VAE overflows in fp16: the script keeps it in fp32
    _cast_models((unet, vae, text_encoders), device, weight_dtype, vae_dtype)
    if spec.sdxl:
        family = family_class(args, unet, vae, text_encoders, tokenizers, noise_scheduler, weight_dtype)
    else:
        family = family_class(args, unet, vae, text_encoders[0], tokenizers[0], noise_scheduler, weight_dtype)
    params_to_optimize, _ = training.add_lora(args, plan, family, accelerator)
    family.denoiser.train()
    return Pipeline(
        name=name,
        spec=spec,
        resolution=resolution,
        family_class=family_class,
        family=family,
        accelerator=accelerator,
        params_to_optimize=params_to_optimize,
        text_encoders=list(text_encoders),
        text_encoder_parameters_m=[round(count_parameters(e) / 1e6, 2) for e in text_encoders],
        scorer_set=scorer_set,
        reward_config=reward_config,
    )


def build_flow_pipeline(name, spec, options, accelerator, device, workdir):
    """SD3 / FLUX: the family built (full size) or loaded from the tiny assets by its own `from_pretrained`, the LoRA
    added, then `family.prepare` with the benchmark's captions: with --cache_text_embeddings it encodes them once and
    frees the text encoders, T5 included, as in training."""
    import datasets

    if spec.family == "sd3":
        from train_balanced_dpo_sd3 import StableDiffusion3Family as family_class
    else:
        from train_balanced_dpo_flux import FluxFamily as family_class
    resolution = options.resolution or spec.resolution
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[options.mixed_precision]
    scorer_dtype = rewards.default_scorer_dtype(device)
    need_scorers = any(m.startswith("live") for m in options.modes)
    args, plan = configuration_args(family_class, spec, resolution, "human", 1, False, options)
    reward_config = None
    if spec.full_size:
        family = build_flow_family(name, spec, family_class, args, device, weight_dtype, workdir, options.seed)
        scorer_set = (
            build_full_size_scorers(device, scorer_dtype, workdir, options.seed, options.offload_scorers)
            if need_scorers
            else None
        )
    else:
        assets = {
            "sd3": tiny_assets.build_tiny_sd3_pipeline,
            "flux": tiny_assets.build_tiny_flux_pipeline,
        }[spec.family](os.path.join(workdir, "tiny_assets", spec.family), seed=options.seed)
        tiny_assets.build_tiny_scorers(os.path.join(workdir, "tiny_assets", "scorers"), seed=options.seed)
        reward_config = os.path.join(workdir, "tiny_assets", "scorers", "reward_config.json")
        load_args = argparse.Namespace(**vars(args))
        load_args.pretrained_model_name_or_path = assets
        family = family_class.from_pretrained(load_args, device, weight_dtype)
        family.args = args
        scorer_set = None
        if need_scorers:
            scorer_set = rewards.build_scorers(
                list(LIVE_METRICS),
                config=reward_config,
                device=device,
                dtype=scorer_dtype,
                offload=options.offload_scorers,
            )
    text_encoder_parameters_m = [round(count_parameters(e) / 1e6, 2) for e in family.text_encoders]
    params_to_optimize, _ = training.add_lora(args, plan, family, accelerator)
    captions = [benchmark_caption(i) for i in range(max(options.pairs))]
    family.prepare(datasets.Dataset.from_dict({"caption": captions}), streaming=False)
    free_memory(device)
    family.denoiser.train()
    return Pipeline(
        name=name,
        spec=spec,
        resolution=resolution,
        family_class=family_class,
        family=family,
        accelerator=accelerator,
        params_to_optimize=params_to_optimize,
        text_encoders=list(family.text_encoders or []),
        text_encoder_parameters_m=text_encoder_parameters_m,
        scorer_set=scorer_set,
        reward_config=reward_config,
    )


def reference_switch_ms(unet, repeats=5):
    """Host CPU time of entering and leaving `balanced_dpo.reference_model` once (adapters off and on again,
    `requires_grad` restored), without the forward: Python work every training step does between the policy and the
    reference forward. It delays the step when it exceeds the device work queued at that point (small batches)."""
    with balanced_dpo.reference_model(unet, dynamic_reference=False):
        pass
    start = time.process_time()
    for _ in range(repeats):
        with balanced_dpo.reference_model(unet, dynamic_reference=False):
            pass
    return 1000.0 * (time.process_time() - start) / repeats


def describe_pipeline(pipeline, options):
    unet = pipeline.denoiser
    info = {
        "model": pipeline.name,
        "resolution": pipeline.resolution,
        "weight_dtype": str(pipeline.weight_dtype).replace("torch.", ""),
        "vae_dtype": str(pipeline.vae.dtype).replace("torch.", ""),
        "unet_parameters_m": round(sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n) / 1e6, 2),
        "lora_parameters_m": round(sum(p.numel() for p in pipeline.params_to_optimize) / 1e6, 3),
        "vae_parameters_m": round(count_parameters(pipeline.vae) / 1e6, 2),
        "text_encoder_parameters_m": pipeline.text_encoder_parameters_m,
        "attention_processors": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
        "reference_switch_cpu_ms": reference_switch_ms(unet),
    }
    if pipeline.spec.sdxl:
        info["sdxl_vae"] = options.sdxl_vae
    if pipeline.spec.flow_matching:
        info["cached_text_embeddings"] = pipeline.family.prompt_embeddings.cached
        info["text_encoders_freed"] = pipeline.family.text_encoders is None
        info["quantize_base"] = pipeline.spec.quantize_base
    if pipeline.scorer_set is not None:
        seen, scorer_params = set(), {}
        for name, scorer in pipeline.scorer_set.scorers.items():
            count = sum(count_parameters(m) for m in scorer.modules() if id(m) not in seen)
            seen.update(id(m) for m in scorer.modules())
            scorer_params[name] = round(count / 1e6, 2)
        info["scorer_parameters_m"] = scorer_params  # a shared model is counted once, for its first scorer
        info["scorer_dtype"] = str(next(iter(pipeline.scorer_set.scorers.values())).dtype).replace("torch.", "")
    return info


# ----------------------------------------------------------------------------------------------------------------
# Batches (the real data pipeline, run before timing as the DataLoader workers would)
# ----------------------------------------------------------------------------------------------------------------

_CONTENT = [
    ("red", "circle", "white"),
    ("blue", "square", "black"),
    ("green", "triangle", "grey"),
    ("yellow", "circle", "black"),
    ("purple", "square", "white"),
    ("orange", "triangle", "white"),
]


def _jpeg(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def benchmark_caption(i):
    color, shape, background = _CONTENT[i % len(_CONTENT)]
    return f"a {color} {shape} on a {background} background, picture {i}"


def make_rows(num_pairs, image_size, seed=0):
    """Pick-a-Pic-layout rows at `image_size` px with a distinct prompt per pair (`benchmark_caption`), no human ties
    (every mode trains on every pair) and precomputed consensus columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_pairs):
        color, shape, background = _CONTENT[i % len(_CONTENT)]
        caption = benchmark_caption(i)
        image_0 = tiny_assets.draw_shape_image(color, shape, background, size=image_size, noise=0.1, rng=rng)
        image_1 = tiny_assets.draw_shape_image(
            color, shape, background, size=image_size, scale=0.3, offset=(0.2, -0.2), noise=0.1, rng=rng
        )
        rows.append(
            {
                "caption": caption,
                "jpg_0": _jpeg(image_0),
                "jpg_1": _jpeg(image_1),
                "label_0": float(i % 2 == 0),
                "consensus_label": float(i % 3 != 0),
                "consensus_prob": 0.75 if i % 3 != 0 else 0.25,
            }
        )
    return rows


def make_batch(pipeline, args, plan, rows, pairs):
    """One batch of `pairs` pairs through the training data pipeline (`training.make_pair_dataset` and the collator
    of the family), with the columns that `args` needs."""
    import datasets

    dataset = datasets.Dataset.from_list(rows[:pairs])
    pair_dataset = training.make_pair_dataset(args, plan, dataset, pipeline.scorer_set, pipeline.accelerator)
    collate = preference_data.PairCollator(pipeline.family.tokenize_fn(), resolution=pipeline.resolution)
    batch = collate(pair_dataset.__getitems__(list(range(pairs))))
    if batch["batch_size"] != pairs:
        raise RuntimeError(f"The benchmark batch has {batch['batch_size']} usable pairs instead of {pairs}.")
    return batch


# ----------------------------------------------------------------------------------------------------------------
# One training step: the body of the training loop of both scripts
# ----------------------------------------------------------------------------------------------------------------


_ADAMW8BIT = {}


def adamw8bit_class(device):
    """(bitsandbytes.optim.AdamW8bit, None) when bitsandbytes imports and runs an 8-bit step on `device`, else
    (None, the reason). A build without kernels for the device fails only at the first step, hence the probe."""
    key = str(device)
    if key not in _ADAMW8BIT:
        try:
            import bitsandbytes as bnb

            param = torch.nn.Parameter(torch.zeros(4096, device=device))  # 4096 elements: the 8-bit state path
            param.grad = torch.ones_like(param)
            bnb.optim.AdamW8bit([param], lr=1e-3).step()
            synchronize(device)
            _ADAMW8BIT[key] = (bnb.optim.AdamW8bit, None)
        except Exception as error:
            _ADAMW8BIT[key] = (None, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    return _ADAMW8BIT[key]


def make_optimizer(args, params):
    """The training script's optimizer (`training.make_optimizer`: AdamW8bit with --use_8bit_adam, falling back to
    AdamW where bitsandbytes cannot run on the device); returns (optimizer, description)."""
    description = "torch AdamW"
    if args.use_8bit_adam:
        adamw8bit, reason = adamw8bit_class(params[0].device)
        if adamw8bit is not None:
            description = "bitsandbytes AdamW8bit"
        else:
            args.use_8bit_adam = False
            description = f"torch AdamW (bitsandbytes AdamW8bit unavailable: {reason})"
    return training.make_optimizer(args, params), description


def training_step(trainer, micro_batches, timer):
    """One optimizer step of the training loop (one micro-batch, no accumulation): the loop's own batch iteration
    (`training.micro_batches`, where the scoring of the next batch starts), the consensus, the loss, backward and
    `DPOTrainer.optimizer_step`. Returns the StepOutcome."""
    start = time.perf_counter()
    batch, _, _ = next(micro_batches)
    labels = trainer.consensus(batch)
    timer.add_seconds("consensus", time.perf_counter() - start)
    trainer.accumulate(batch, labels)
    with timer.phase("optimizer"):
        return trainer.optimizer_step()


def place_scorers(pipeline, live, device):
    """Scorers sit on the device only for `live` runs: Diffusion-DPO and precomputed runs load no scorer, and their
    peak memory must not include them."""
    scorer_set = pipeline.scorer_set
    if scorer_set is None or scorer_set.offload or device.type != "cuda" or pipeline.scorers_on_device == live:
        return
    for scorer in scorer_set.scorers.values():
        scorer.to(device if live else "cpu")
    scorer_set.device = device
    pipeline.scorers_on_device = live
    free_memory(device, collect=False)


def run_configuration(pipeline, options, device, mode, pairs, gradient_checkpointing, rows, timer, instrumentation):
    from diffusers.optimization import get_scheduler

    spec = pipeline.spec
    warmup_steps = spec.warmup_steps if options.warmup_steps is None else options.warmup_steps
    steps = spec.steps if options.steps is None else options.steps
    result = {
        "model": pipeline.name,
        "resolution": pipeline.resolution,
        "pairs": pairs,
        "gradient_checkpointing": gradient_checkpointing,
        "mode": mode,
        "status": "ok",
        "warmup_steps": warmup_steps,
        "steps": steps,
    }
    args, plan = configuration_args(
        pipeline.family_class,
        spec,
        pipeline.resolution,
        mode,
        pairs,
        gradient_checkpointing,
        options,
        pipeline.reward_config,
    )
    pipeline.family.args = args  # the family reads its arguments (resolution, SDXL-Turbo) at every step
    place_scorers(pipeline, mode.startswith("live"), device)
    if pipeline.scorer_set is not None:
        pipeline.scorer_set.set_cuda_graphs(not args.no_scorer_cuda_graphs)
    if gradient_checkpointing:
        pipeline.denoiser.enable_gradient_checkpointing()
    else:
        pipeline.denoiser.disable_gradient_checkpointing()
    batch = make_batch(pipeline, args, plan, rows, pairs)

    memory = MemoryMeter(device)
    memory.reset()
    optimizer, optimizer_description = make_optimizer(args, pipeline.params_to_optimize)
    # Prepared as in training: under fp16 the accelerated optimizer unscales and skips steps through the grad scaler.
    optimizer = pipeline.accelerator.prepare(optimizer)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=0, num_training_steps=1)
    trainer = training.DPOTrainer(
        args=args,
        plan=plan,
        accelerator=pipeline.accelerator,
        family=pipeline.family,
        params=pipeline.params_to_optimize,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        generator=run_state.training_generator(pipeline.accelerator, options.seed),
        scorer_set=pipeline.scorer_set,
        labeler=training.make_labeler(args, pipeline.scorer_set),
    )
    result["optimizer"] = optimizer_description
    step_seconds, scoring_seconds, breakdowns, kept_pairs, nonfinite = [], [], [], [], 0
    # The training loop's own batch iteration: fetching batch i starts scoring batch i + 1 (score-ahead).
    micro_batches = training.micro_batches(
        (dict(batch) for _ in range(warmup_steps + steps + 1)),
        trainer,
        run_state.GracefulStop(),  # never entered: no signal handling here
        score_ahead=not args.no_score_ahead and bool(plan.scored_metrics),
    )
    try:
        for i in range(warmup_steps + steps):
            measured = i >= warmup_steps
            timer.enabled = measured
            synchronize(device)
            start = time.perf_counter()
            outcome = training_step(trainer, micro_batches, timer)
            synchronize(device)
            seconds = time.perf_counter() - start
            phases = timer.collect()
            instrumentation.reset()
            if measured:
                step_seconds.append(seconds)
                scoring_seconds.append(outcome.scoring_seconds)
                breakdowns.append(phases)
                kept_pairs.append(outcome.pairs)
                nonfinite += int(outcome.status != "stepped")
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        result["status"] = "OOM"
        result["error"] = str(error).splitlines()[0][:300]
    timer.enabled = False
    timer.reset()
    instrumentation.reset()
    result["peak_memory_gib"] = memory.peak_gib()
    result["peak_memory_kind"] = memory.kind if result["peak_memory_gib"] is not None else "n/a"
    result["peak_reserved_gib"] = memory.reserved_gib()
    # Free everything of this configuration (also after an out-of-memory error) before the next one.
    trainer = optimizer = lr_scheduler = micro_batches = None
    pipeline.denoiser.zero_grad(set_to_none=True)
    # Drops accelerate's references to the prepared optimizer (after its own garbage collection), then the cache.
    pipeline.accelerator.free_memory()
    free_memory(device, collect=False)

    if result["status"] == "ok":
        median = statistics.median(step_seconds)
        result.update(
            {
                "step_seconds": step_seconds,
                "median_step_seconds": median,
                "pairs_per_second": pairs / median,
                "scoring_share": sum(scoring_seconds) / sum(step_seconds),
                "median_scoring_seconds": statistics.median(scoring_seconds),
                "kept_pairs": statistics.mean(kept_pairs),
                "nonfinite_steps": nonfinite,
                "breakdown_ms": summarize_breakdown(breakdowns, step_seconds),
            }
        )
    return result


def summarize_breakdown(breakdowns, step_seconds):
    """Median milliseconds per phase over the timed steps; `other` is what the phases leave of the step (host to
    device copies, noise and loss arithmetic, synchronizations, launch gaps)."""
    summary = {}
    for phase in PHASES:
        summary[phase] = 1000.0 * statistics.median([b.get(phase, 0.0) for b in breakdowns])
    others = [seconds - sum(b.get(p, 0.0) for p in PHASES) for b, seconds in zip(breakdowns, step_seconds)]
    summary["other"] = 1000.0 * statistics.median(others)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------


def add_ratios(results):
    """Ratios of every mode against `human` with the same model, pairs and checkpointing."""
    baselines = {
        (r["model"], r["resolution"], r["pairs"], r["gradient_checkpointing"]): r
        for r in results
        if r["mode"] == "human" and r["status"] == "ok"
    }
    for result in results:
        base = baselines.get(
            (result["model"], result["resolution"], result["pairs"], result["gradient_checkpointing"])
        )
        if base is None or result["status"] != "ok":
            continue
        result["step_time_vs_human"] = result["median_step_seconds"] / base["median_step_seconds"]
        result["throughput_vs_human"] = result["pairs_per_second"] / base["pairs_per_second"]
        # Only GPU peaks compare: a CPU resident-set delta mostly shows what the allocator had to grow by.
        if result.get("peak_memory_kind") == "cuda_max_allocated" and base.get("peak_memory_gib"):
            result["memory_vs_human"] = result["peak_memory_gib"] / base["peak_memory_gib"]


def memory_target_lines(results, device):
    """One line per README memory target: the lowest live-scoring peak measured for it (and the precomputed one)."""
    lines = []
    for model, resolution, pairs, checkpointing, limit in MEMORY_TARGETS:
        what = f"{MODEL_SPECS[model].label} {resolution} px, {pairs} pair{'s' if pairs > 1 else ''}"
        if checkpointing:
            what += ", gradient checkpointing"
        if MODEL_SPECS[model].flow_matching:
            what += ", cached text embeddings"

        def measured(mode):
            runs = [
                r
                for r in results
                if (r["model"], r["resolution"], r["pairs"], r["mode"]) == (model, resolution, pairs, mode)
                and r["status"] in ("ok", "OOM")
                and (checkpointing is None or r["gradient_checkpointing"] == checkpointing)
            ]
            # The configuration that fits best: a completed run with the lowest peak, else an out-of-memory one.
            runs.sort(key=lambda r: (r["status"] != "ok", r.get("peak_memory_gib") or 0.0))
            return runs[0] if runs else None

        def describe(r):
            setting = "" if checkpointing else f", checkpointing {'on' if r['gradient_checkpointing'] else 'off'}"
            if r["status"] == "OOM":
                return f"out of memory{setting}"
            return f"{r['peak_memory_gib']:.2f} GiB{setting}"

        head = f"Memory target, {what}, four live scorers, < {limit:g} GiB:"
        live = measured("live") or measured("live_plain")
        if device.type != "cuda":
            lines.append(f"{head} n/a (GPU memory; this run is on {device.type})")
        elif live is None:
            lines.append(f"{head} not measured in this run")
        else:
            met = live["status"] == "ok" and live["peak_memory_gib"] < limit
            line = f"{head} {describe(live)}: {'met' if met else 'NOT MET'}"
            precomputed = measured("precomputed")
            if precomputed is not None:
                line += f" (precomputed consensus: {describe(precomputed)})"
            lines.append(line)
    return lines


def _fmt(value, pattern, missing="-"):
    return missing if value is None else pattern.format(value)


def _table(header, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def format_report(report):
    results = report["results"]
    on_gpu = report["meta"]["device_type"] == "cuda"
    memory_header, memory_format = ("peak GiB", "{:.2f}") if on_gpu else ("RSS+ GiB", "{:.3f}")
    header = [
        "model",
        "px",
        "pairs",
        "ckpt",
        "mode",
        "step s",
        "pairs/s",
        "x human",
        memory_header,
        "mem x human",
        "scoring",
    ]
    rows = []
    for r in results:
        common = [r["model"], r["resolution"], r["pairs"], "on" if r["gradient_checkpointing"] else "off", r["mode"]]
        if r["status"] != "ok":
            peak = _fmt(r.get("peak_memory_gib"), memory_format, "n/a")
            rows.append(common + [r["status"], "", "", peak if r["status"] == "OOM" else "", "", ""])
            continue
        rows.append(
            common
            + [
                f"{r['median_step_seconds']:.4f}",
                f"{r['pairs_per_second']:.2f}",
                _fmt(r.get("step_time_vs_human"), "{:.3f}"),
                _fmt(r.get("peak_memory_gib"), memory_format, "n/a"),
                _fmt(r.get("memory_vs_human"), "{:.3f}"),
                f"{100 * r['scoring_share']:.1f}%",
            ]
        )
    text = [_table(header, rows)]
    text.append(
        "x human: median step time / that of Diffusion-DPO (human labels) at the same pairs and checkpointing;"
        " scoring: share of the step spent in the reward models (StepMetrics.scoring_seconds)."
        + (
            ""
            if on_gpu
            else " RSS+ GiB: growth of the peak resident set over the start of the run (not comparable across modes)."
        )
    )
    breakdown_rows = []
    for r in results:
        if r["status"] != "ok":
            continue
        b = r["breakdown_ms"]
        breakdown_rows.append(
            [r["model"], r["pairs"], "on" if r["gradient_checkpointing"] else "off", r["mode"]]
            + [f"{b[p]:.1f}" for p in (*PHASES, "other")]
            + [f"{1000 * r['median_step_seconds']:.1f}"]
        )
    if breakdown_rows:
        header = ["model", "pairs", "ckpt", "mode", "vae enc", "text enc", "consensus"]
        header += ["unet fwd", "ref fwd", "unet bwd", "optimizer", "other", "step"]
        text.append("\nStep breakdown, median ms (consensus includes the scoring; unet bwd includes recomputation):")
        text.append(_table(header, breakdown_rows))
    text.append("")
    for info in report["models"]:
        text.append(
            f"{info['model']}: host CPU time of one balanced_dpo.reference_model switch (adapters off and on,"
            f" requires_grad restored; no forward): {info['reference_switch_cpu_ms']:.1f} ms per step"
        )
    text += report["memory_targets"]
    return "\n".join(text)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device, options):
    import accelerate
    import diffusers
    import peft
    import transformers

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "mixed_precision": options.mixed_precision,
        "lora_rank": options.rank,
        "allow_tf32": options.allow_tf32,
        "offload_scorers": options.offload_scorers,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
        },
        "random_weights": True,
    }
    try:
        import bitsandbytes

        meta["versions"]["bitsandbytes"] = bitsandbytes.__version__
    except Exception as error:
        meta["versions"]["bitsandbytes"] = f"unavailable ({type(error).__name__})"
    return meta


def write_json(path, report):
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def configurations(pairs_list, checkpointing_list, modes):
    """Pairs first, then checkpointing, then modes, alternating the mode order so that the scorers move between
    the device and the host at most once per (pairs, checkpointing)."""
    ordered, flip = [], False
    for pairs in pairs_list:
        for checkpointing in checkpointing_list:
            mode_order = sorted(modes, key=lambda m: m.startswith("live") != flip)
            ordered += [(pairs, checkpointing, mode) for mode in mode_order]
            flip = not flip
    return ordered


def skipped_result(name, resolution, pairs, checkpointing, mode):
    return {
        "model": name,
        "resolution": resolution,
        "pairs": pairs,
        "gradient_checkpointing": checkpointing,
        "mode": mode,
        "status": "skipped (time budget)",
    }


def main(options):
    from accelerate import Accelerator

    started = time.perf_counter()
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if options.mixed_precision is None:
        options.mixed_precision = "bf16" if device.type == "cuda" else "no"
    if options.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if options.num_threads is not None:
        torch.set_num_threads(options.num_threads)
    accelerator = Accelerator(mixed_precision=options.mixed_precision, cpu=device.type == "cpu")
    checkpointing_list = {"on": [True], "off": [False], "both": [True, False]}[options.gradient_checkpointing]
    modes = [m for m in MODES if m in options.modes]
    report = {"meta": environment(device, options), "models": [], "results": [], "memory_targets": []}
    print(f"Device: {report['meta']['device']}, mixed precision {options.mixed_precision}", flush=True)

    def over_budget():
        return options.time_budget_s is not None and time.perf_counter() - started > options.time_budget_s

    for name in options.model:
        if over_budget():
            resolution = options.resolution or MODEL_SPECS[name].resolution
            for pairs, checkpointing, mode in configurations(options.pairs, checkpointing_list, modes):
                report["results"].append(skipped_result(name, resolution, pairs, checkpointing, mode))
            continue
        with tempfile.TemporaryDirectory(prefix="balanced_dpo_benchmark_") as workdir:
            build_start = time.perf_counter()
            pipeline = build_pipeline(name, options, accelerator, device, workdir)
            rows = make_rows(max(options.pairs), pipeline.resolution if pipeline.spec.full_size else 64, options.seed)
            info = describe_pipeline(pipeline, options)
            info["build_seconds"] = time.perf_counter() - build_start
            report["models"].append(info)
            print(f"Built {name} in {info['build_seconds']:.1f} s: {json.dumps(info)}", flush=True)

            timer = PhaseTimer(device)
            instrumentation = Instrumentation(
                timer, pipeline.vae, pipeline.text_encoders, pipeline.denoiser, pipeline.accelerator
            )
            try:
                for pairs, checkpointing, mode in configurations(options.pairs, checkpointing_list, modes):
                    if over_budget():
                        result = skipped_result(name, pipeline.resolution, pairs, checkpointing, mode)
                    else:
                        result = run_configuration(
                            pipeline,
                            options,
                            device,
                            mode,
                            pairs,
                            checkpointing,
                            rows,
                            timer,
                            instrumentation,
                        )
                    report["results"].append(result)
                    summary = {k: v for k, v in result.items() if k not in ("step_seconds", "breakdown_ms")}
                    print(json.dumps(summary), flush=True)
                    add_ratios(report["results"])
                    report["memory_targets"] = memory_target_lines(report["results"], device)
                    report["meta"]["total_seconds"] = time.perf_counter() - started
                    write_json(options.json, report)
            finally:
                instrumentation.remove()
                del pipeline, timer, instrumentation
                accelerator.free_memory()
                free_memory(device)

    add_ratios(report["results"])
    report["memory_targets"] = memory_target_lines(report["results"], device)
    report["meta"]["total_seconds"] = time.perf_counter() - started
    write_json(options.json, report)
    optimizers = sorted({r["optimizer"] for r in report["results"] if "optimizer" in r})
    print()
    print(f"Device: {report['meta']['device']}; optimizer: {', '.join(optimizers) or '-'}; random weights")
    print(format_report(report))
    print(f"Total {report['meta']['total_seconds']:.1f} s")
    return report


if __name__ == "__main__":
    main(parse_args())
