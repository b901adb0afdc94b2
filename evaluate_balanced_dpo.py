#!/usr/bin/env python
# coding=utf-8
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
"""Per-metric win rate of text-to-image model A against model B.

Each model is a diffusers pipeline (Stable Diffusion 1.x / 2.x, SDXL, SD3 / SD3.5, FLUX.1: `DiffusionPipeline` picks
the class, `detect_model_family` names its family) plus zero or one LoRA. For every prompt both models generate one image from the same seed (`--seed` + prompt index), sampler,
number of steps and guidance; both images are scored with every `rewards.py` metric (`--reward_models`,
`--reward_config`, as in training). A wins a prompt on metric m when its score is higher; equal scores count 1/2.
The per-metric win rate is the mean over prompts, the average win rate the mean over metrics, each with a 95%
interval (bootstrap over prompts by default, or Wilson per metric).

    python evaluate_balanced_dpo.py \
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --lora_a balanced-dpo-sd15 --prompts pickapic --output_dir eval/balanced-vs-base

Writes `results.json`, `results.md`, `samples.png` (a grid of sample pairs with their scores) and `scores.jsonl`
(per-prompt scores, appended after every batch). Running the same command again resumes: prompts already in
`scores.jsonl` are not generated again.
"""

import argparse
import hashlib
import inspect
import json
import logging
import math
import os
import textwrap
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

import rewards
from preference_data import PROMPT_COLUMN_CANDIDATES, load_prompts


logger = logging.getLogger(__name__)

DEFAULT_REWARD_MODELS = ",".join(rewards.DEFAULT_REWARD_MODELS)

SCORES_FILE = "scores.jsonl"
CONFIG_FILE = "eval_config.json"
IMAGES_DIR = "images"


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Win rate of model A (base + optional LoRA) against model B, per reward metric.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Models
    group = parser.add_argument_group("models")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Base pipeline of model A (a local folder or a Hub id); also model B's unless --pretrained_model_b.",
    )
    group.add_argument("--lora_a", type=str, default=None, help="LoRA of model A: a folder, a file or a Hub id.")
    group.add_argument(
        "--pretrained_model_b", type=str, default=None, help="Base pipeline of model B (default: model A's)."
    )
    group.add_argument(
        "--lora_b", type=str, default=None, help="LoRA of model B (default: none, i.e. the base model)."
    )
    group.add_argument("--lora_scale_a", type=float, default=1.0, help="LoRA strength of model A.")
    group.add_argument("--lora_scale_b", type=float, default=1.0, help="LoRA strength of model B.")
    group.add_argument("--name_a", type=str, default=None, help="Label of model A in the tables.")
    group.add_argument("--name_b", type=str, default=None, help="Label of model B in the tables.")
    group.add_argument("--revision", type=str, default=None, help="Revision of the base model(s) on the Hub.")
    group.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use in both models instead of the pipelines' own (e.g. madebyollin/sdxl-vae-fp16-fix).",
    )
    # Prompts
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--prompts",
        type=str,
        default="pickapic",
        help=(
            "pickapic, partiprompts, hpdv2 (the paper's prompt sets on the Hub), a text file with one prompt per "
            "line, a JSON list, or a dataset (local folder, data file or Hub id) with --prompt_column."
        ),
    )
    group.add_argument(
        "--prompt_column",
        type=str,
        default=None,
        help=f"Dataset column holding the prompts (default: the first of {', '.join(PROMPT_COLUMN_CANDIDATES)}).",
    )
    group.add_argument("--prompt_split", type=str, default=None, help="Dataset split (default: test, else train).")
    group.add_argument("--max_prompts", type=int, default=None, help="Use only the first N prompts.")
    # Generation
    group = parser.add_argument_group("generation")
    group.add_argument(
        "--scheduler",
        type=str,
        default=None,
        help="A diffusers scheduler class, e.g. DPMSolverMultistepScheduler (default: the pipeline's own).",
    )
    group.add_argument("--num_inference_steps", type=int, default=50)
    group.add_argument(
        "--guidance_scale", type=float, default=None, help="Classifier-free guidance (default: the pipeline's)."
    )
    group.add_argument("--negative_prompt", type=str, default=None)
    group.add_argument(
        "--resolution", type=int, default=None, help="Image height and width (default: the pipeline's)."
    )
    group.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 tokens of the prompts of SD3 / FLUX.1 pipelines (default: the pipeline's; the training scripts"
        " validate with their --max_sequence_length, 77 for SD3 and 512 for FLUX.1-dev by default).",
    )
    group.add_argument("--batch_size", type=int, default=8, help="Prompts generated per pipeline call.")
    group.add_argument("--seed", type=int, default=0, help="Prompt i is generated from seed + i by both models.")
    group.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "fp16", "bf16"],
        help="Weight dtype of the pipelines.",
    )
    group.add_argument("--device", type=str, default=None, help="cuda, cpu, ... (default: cuda when available).")
    # Scoring
    group = parser.add_argument_group("scoring")
    group.add_argument(
        "--reward_models",
        type=str,
        default=DEFAULT_REWARD_MODELS,
        help="Comma-separated metrics, as in training (built-in names or module:Class).",
    )
    group.add_argument(
        "--reward_config", type=str, default=None, help="JSON mapping metric -> build_scorer options, as in training."
    )
    group.add_argument(
        "--scorer_dtype",
        type=str,
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="Scorer weights dtype (default: float16 on CUDA, float32 elsewhere; see rewards.default_scorer_dtype).",
    )
    group.add_argument(
        "--offload_scorers", action="store_true", help="Keep scorers on the CPU, each on the device only to score."
    )
    group.add_argument(
        "--no_scorer_cuda_graphs",
        action="store_true",
        help="Run scorer forwards eagerly instead of replaying CUDA graphs (graphs are used on CUDA without offload).",
    )
    group.add_argument(
        "--tie_tolerance",
        type=float,
        default=0.0,
        help="Scores closer than this count as a tie (1/2). 0 = only exactly equal scores.",
    )
    # Statistics and outputs
    group = parser.add_argument_group("statistics and outputs")
    group.add_argument(
        "--interval",
        type=str,
        default="bootstrap",
        choices=["bootstrap", "wilson"],
        help=(
            "95%% interval of each win rate: percentile bootstrap over prompts, or the Wilson score interval per "
            "metric (the average win rate always uses the bootstrap)."
        ),
    )
    group.add_argument("--confidence", type=float, default=0.95, help="Coverage of the intervals.")
    group.add_argument("--bootstrap_samples", type=int, default=10000, help="Bootstrap resamples of the prompts.")
    group.add_argument("--output_dir", type=str, default="balanced-dpo-eval")
    group.add_argument("--num_grid_pairs", type=int, default=8, help="Sample pairs shown in samples.png.")
    group.add_argument("--save_images", action="store_true", help="Save every generated image, not only the grid's.")
    group.add_argument(
        "--image_cache_dir",
        type=str,
        default=None,
        help=(
            "Keep every generated image here, keyed by model, generation settings, prompt and seed, and reuse it: "
            "evaluating several LoRAs against the same base model generates the base images once."
        ),
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="Start over, discarding the per-prompt scores of an earlier run in --output_dir (default: resume it).",
    )

    args = parser.parse_args(input_args) if input_args is not None else parser.parse_args()
    if args.batch_size < 1:
        raise ValueError("--batch_size must be at least 1.")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError("--max_prompts must be at least 1.")
    if not 0 < args.confidence < 1:
        raise ValueError("--confidence must be in (0, 1).")
    if args.pretrained_model_b is None:
        args.pretrained_model_b = args.pretrained_model_name_or_path
    return args


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# Win rates and intervals
# ----------------------------------------------------------------------------------------------------------------


def pairwise_outcomes(scores_a, scores_b, tie_tolerance=0.0):
    """1 where A scores higher, 0 where B does, 1/2 for a tie (|difference| <= tie_tolerance)."""
    diff = np.asarray(scores_a, dtype=np.float64) - np.asarray(scores_b, dtype=np.float64)
    return np.where(np.abs(diff) <= tie_tolerance, 0.5, (diff > 0).astype(np.float64))


def wilson_interval(p_hat, n, confidence=0.95):
    """Wilson score interval of a proportion observed as `p_hat` over `n` trials.

    Ties enter as half a win; they make the outcomes less variable than Bernoulli ones, so the interval is then
    slightly conservative. It always contains `p_hat` and lies in [0, 1].
    """
    if n == 0:
        return 0.0, 1.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denominator = 1 + z**2 / n
    center = (p_hat + z**2 / (2 * n)) / denominator
    half = z * math.sqrt(p_hat * (1 - p_hat) / n + z**2 / (4 * n**2)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_intervals(outcomes, confidence=0.95, num_samples=10000, seed=0):
    """Percentile bootstrap over prompts of the mean of each column of `outcomes` [num_prompts, k].

    Prompts are resampled as units, so correlations between metrics carry over to the average win rate.
    Returns (low, high) arrays of length k.
    """
    outcomes = np.asarray(outcomes, dtype=np.float64)
    n, k = outcomes.shape
    rng = np.random.default_rng(seed)
    means = np.empty((num_samples, k))
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, num_samples, chunk):
        stop = min(num_samples, start + chunk)
        index = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = outcomes[index].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=0)
    point = outcomes.mean(axis=0)
    # The percentile interval of a mean contains the mean except through Monte-Carlo error with a handful of prompts.
    return np.minimum(low, point), np.maximum(high, point)


def compute_win_rates(
    metrics, scores_a, scores_b, interval="bootstrap", confidence=0.95, num_samples=10000, tie_tolerance=0.0, seed=0
):
    """Per-metric and average win rates of A over B.

    `scores_a` and `scores_b` map each metric to a sequence of per-prompt scores (same prompt order). Returns
    `(per_metric, average)`: per metric a dict with `win_rate`, `ci_low`, `ci_high`, `wins`, `ties`, `losses`,
    `mean_score_a`, `mean_score_b`; the average a dict with `win_rate`, `ci_low`, `ci_high`.
    """
    outcomes = np.stack(
        [pairwise_outcomes(scores_a[m], scores_b[m], tie_tolerance) for m in metrics], axis=1
    )  # [num_prompts, num_metrics]
    n = outcomes.shape[0]
    columns = np.concatenate([outcomes, outcomes.mean(axis=1, keepdims=True)], axis=1)
    low, high = bootstrap_intervals(columns, confidence, num_samples, seed)
    per_metric = {}
    for j, metric in enumerate(metrics):
        rate = float(outcomes[:, j].mean())
        lo, hi = (float(low[j]), float(high[j])) if interval == "bootstrap" else wilson_interval(rate, n, confidence)
        per_metric[metric] = {
            "win_rate": rate,
            "ci_low": lo,
            "ci_high": hi,
            "wins": int((outcomes[:, j] == 1).sum()),
            "ties": int((outcomes[:, j] == 0.5).sum()),
            "losses": int((outcomes[:, j] == 0).sum()),
            "mean_score_a": float(np.mean(scores_a[metric])),
            "mean_score_b": float(np.mean(scores_b[metric])),
        }
    average = {"win_rate": float(columns[:, -1].mean()), "ci_low": float(low[-1]), "ci_high": float(high[-1])}
    return per_metric, average


def compute_joint_win_rates(
    metrics, scores_a, scores_b, confidence=0.95, num_samples=10000, tie_tolerance=0.0, seed=0
):
    """The joint win rate: the share of prompts on which A beats B on every metric, and B beats A on every metric,
    each with a percentile-bootstrap interval over prompts. The direct measure of "balanced": a model that buys one
    metric with another wins on some metrics of a prompt, not on all. A tie on any metric is no joint win.

    Returns {"a": {...}, "b": {...}}, each with `rate`, `ci_low`, `ci_high`, `prompts` (how many such prompts)."""
    outcomes = np.stack([pairwise_outcomes(scores_a[m], scores_b[m], tie_tolerance) for m in metrics], axis=1)
    joint = np.stack([(outcomes == 1).all(axis=1), (outcomes == 0).all(axis=1)], axis=1).astype(np.float64)
    low, high = bootstrap_intervals(joint, confidence, num_samples, seed)
    return {
        side: {
            "rate": float(joint[:, k].mean()),
            "ci_low": float(low[k]),
            "ci_high": float(high[k]),
            "prompts": int(joint[:, k].sum()),
        }
        for k, side in enumerate(("a", "b"))
    }


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def _lora_location(lora):
    """(path or Hub id, weight_name) for `load_lora_weights`; a file path is split into its folder and name."""
    if os.path.isfile(lora):
        return os.path.dirname(os.path.abspath(lora)), os.path.basename(lora)
    if os.path.isdir(lora) and os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors")):
        return lora, "pytorch_lora_weights.safetensors"
    return lora, None


# The pipeline classes of the model families the training scripts cover (`_class_name` of model_index.json).
MODEL_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
# The training script of each family.
TRAINING_SCRIPTS = {
    "sd": "train_balanced_dpo.py",
    "sdxl": "train_balanced_dpo_sdxl.py",
    "sd3": "train_balanced_dpo_sd3.py",
    "flux": "train_balanced_dpo_flux.py",
}


def detect_model_family(pretrained, revision=None):
    """The family of a pipeline folder or Hub id: "sd" (SD 1.x / 2.x), "sdxl", "sd3" (SD3 / SD3.5) or "flux"
    (FLUX.1 dev / schnell), read from its model_index.json alone (no weights); None for any other pipeline class."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(pretrained, revision=revision)
    return MODEL_FAMILIES.get(index.get("_class_name"))


def load_pipeline(args, pretrained, dtype, device):
    """A text-to-image pipeline of any class `DiffusionPipeline` knows (SD 1.x/2.x, SDXL, SD3, FLUX.1, ...), safety
    checker off."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    kwargs = {"torch_dtype": dtype, "revision": args.revision, "variant": args.variant}
    components = DiffusionPipeline.load_config(pretrained, revision=args.revision)
    if "safety_checker" in components:
        # A checker would black out some images of one model and not the other, which is no preference signal.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if args.pretrained_vae_model_name_or_path is not None:
        kwargs["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, torch_dtype=dtype)
    pipeline = DiffusionPipeline.from_pretrained(pretrained, **kwargs)
    if args.scheduler is not None:
        import diffusers

        scheduler_class = getattr(diffusers, args.scheduler, None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise ValueError(f"Unknown scheduler {args.scheduler!r}; pass a diffusers scheduler class name.")
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def pipeline_defaults(pretrained, revision=None):
    """What a pipeline does when not told otherwise, read from its config files only (no weights): the default
    guidance scale of its class, its scheduler class and its native resolution. Unknown values are None."""
    import diffusers
    from diffusers import DiffusionPipeline

    defaults = {"guidance_scale": None, "scheduler": None, "resolution": None}
    index = DiffusionPipeline.load_config(pretrained, revision=revision)
    pipeline_class = getattr(diffusers, index.get("_class_name", ""), None)
    if pipeline_class is not None:
        parameter = inspect.signature(pipeline_class.__call__).parameters.get("guidance_scale")
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            defaults["guidance_scale"] = parameter.default
    if isinstance(index.get("scheduler"), (list, tuple)):
        defaults["scheduler"] = index["scheduler"][-1]
    family = MODEL_FAMILIES.get(index.get("_class_name"))
    try:
        vae = diffusers.AutoencoderKL.load_config(pretrained, subfolder="vae", revision=revision)
        vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        if family == "flux":
            # FluxPipeline's default_sample_size: its transformer config has no sample size.
            defaults["resolution"] = 128 * vae_scale_factor
            transformer = diffusers.FluxTransformer2DModel.load_config(
                pretrained, subfolder="transformer", revision=revision
            )
            if not transformer.get("guidance_embeds", False):
                defaults["guidance_scale"] = 0.0  # FLUX.1-schnell takes no guidance
        else:
            if family == "sd3":
                config = diffusers.SD3Transformer2DModel.load_config(
                    pretrained, subfolder="transformer", revision=revision
                )
            else:
                config = diffusers.UNet2DConditionModel.load_config(pretrained, subfolder="unet", revision=revision)
            defaults["resolution"] = config["sample_size"] * vae_scale_factor
    except (OSError, KeyError, TypeError, ValueError):
        pass
    return defaults


class ModelPair:
    """Models A and B. When they share a base pipeline it is loaded once and each LoRA is one named adapter of it,
    switched on for its model and off for the other (half the memory of two pipelines)."""

    def __init__(self, args, dtype, device):
        self.args, self.dtype, self.device = args, dtype, device
        self.specs = {
            "a": (args.pretrained_model_name_or_path, args.lora_a, args.lora_scale_a),
            "b": (args.pretrained_model_b, args.lora_b, args.lora_scale_b),
        }
        self.pipelines = {}

    def load(self):
        """Loads the pipelines and LoRAs on first use (not at all when every image comes from the cache)."""
        if self.pipelines:
            return
        for key, (pretrained, lora, _) in self.specs.items():
            if pretrained not in self.pipelines:
                logger.info(f"Loading {pretrained}")
                self.pipelines[pretrained] = load_pipeline(self.args, pretrained, self.dtype, self.device)
            if lora is not None:
                path, weight_name = _lora_location(lora)
                logger.info(f"Loading LoRA {lora} for model {key.upper()}")
                self.pipelines[pretrained].load_lora_weights(
                    path, weight_name=weight_name, adapter_name=f"model_{key}"
                )

    def pipeline(self, key):
        """The pipeline of model `key` ("a" or "b") with exactly its own adapter active."""
        self.load()
        pretrained, lora, scale = self.specs[key]
        pipeline = self.pipelines[pretrained]
        has_adapters = any(spec[0] == pretrained and spec[1] is not None for spec in self.specs.values())
        if lora is not None:
            pipeline.enable_lora()
            pipeline.set_adapters([f"model_{key}"], [scale])
        elif has_adapters:
            pipeline.disable_lora()
        return pipeline

    def generate(self, key, prompts, seeds, args):
        pipeline = self.pipeline(key)
        # One generator per prompt, so an image depends only on its prompt and seed, not on the batch it is in.
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        kwargs = {
            "prompt": list(prompts),
            "generator": generators,
            "num_inference_steps": args.num_inference_steps,
            "output_type": "pil",
        }
        if args.guidance_scale is not None:
            kwargs["guidance_scale"] = args.guidance_scale
        if args.negative_prompt is not None:
            kwargs["negative_prompt"] = [args.negative_prompt] * len(prompts)
        if args.resolution is not None:
            kwargs["height"] = kwargs["width"] = args.resolution
        if getattr(args, "max_sequence_length", None) is not None:
            kwargs["max_sequence_length"] = args.max_sequence_length
        with torch.no_grad():
            return pipeline(**kwargs).images


# ----------------------------------------------------------------------------------------------------------------
# Records (resume) and reports
# ----------------------------------------------------------------------------------------------------------------


def _file_digest(path):
    if path is None or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _lora_digest(lora):
    """Identifies a local LoRA by its content, so that retraining into the same folder is not mistaken for it."""
    if lora is None:
        return None
    path, weight_name = _lora_location(lora)
    return _file_digest(os.path.join(path, weight_name)) if weight_name else None


def _folder_stamp(folder):
    """A local pipeline folder by path and by the size and modification time of its files (cheap, unlike hashing
    gigabytes of weights), so a model rebuilt in the same folder does not reuse the old model's images."""
    stamp = [os.path.abspath(folder)]
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith((".json", ".safetensors", ".bin")):
                stat = os.stat(os.path.join(root, name))
                stamp.append(f"{os.path.relpath(os.path.join(root, name), folder)}:{stat.st_size}:{stat.st_mtime_ns}")
    return stamp


class ImageCache:
    """Generated images on disk (lossless PNG), keyed by everything that determines them.

    A model's key covers its base, LoRA (by content), LoRA scale, VAE and the generation settings; an image's name
    covers its prompt and seed. Reloaded PNGs are bit-identical to the pipeline's 8-bit output, so their scores are
    the scores the fresh images would get.
    """

    def __init__(self, cache_dir, args, effective):
        self.cache_dir = cache_dir
        settings = {
            "vae": args.pretrained_vae_model_name_or_path,
            "revision": args.revision,
            "variant": args.variant,
            "num_inference_steps": args.num_inference_steps,
            "negative_prompt": args.negative_prompt,
            "mixed_precision": args.mixed_precision,
        }
        if getattr(args, "max_sequence_length", None) is not None:
            settings["max_sequence_length"] = args.max_sequence_length
        self.model_keys = {}
        for key, pretrained, lora, scale in (
            ("a", args.pretrained_model_name_or_path, args.lora_a, args.lora_scale_a),
            ("b", args.pretrained_model_b, args.lora_b, args.lora_scale_b),
        ):
            model = {"pretrained": _folder_stamp(pretrained) if os.path.isdir(pretrained) else pretrained}
            if lora is not None:
                model.update(lora=_lora_digest(lora) or lora, scale=scale)
            blob = json.dumps({"model": model, "settings": settings, "effective": effective[key]}, sort_keys=True)
            self.model_keys[key] = hashlib.sha256(blob.encode()).hexdigest()[:20]

    def path(self, key, prompt, seed):
        name = hashlib.sha256(f"{seed}\n{prompt}".encode()).hexdigest()[:32]
        return os.path.join(self.cache_dir, self.model_keys[key], f"{name}.png")

    def load(self, key, prompt, seed):
        path = self.path(key, prompt, seed)
        if not os.path.isfile(path):
            return None
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError:  # a file cut short by an interruption
            return None

    def save(self, key, prompt, seed, image):
        path = self.path(key, prompt, seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)


def generate_or_load(models, cache, key, prompts, seeds, args):
    """Model `key`'s images of `prompts`: from the cache where present, generated (and cached) otherwise.
    Returns (images, number generated)."""
    images = [cache.load(key, p, s) if cache is not None else None for p, s in zip(prompts, seeds)]
    missing = [j for j, image in enumerate(images) if image is None]
    if missing:
        generated = models.generate(key, [prompts[j] for j in missing], [seeds[j] for j in missing], args)
        for j, image in zip(missing, generated):
            images[j] = image
            if cache is not None:
                cache.save(key, prompts[j], seeds[j], image)
    return images, len(missing)


def run_config(args, prompt_info, metric_names, effective):
    """Everything that decides the per-prompt scores; a resumed run must match it. `effective` holds each model's
    scheduler, guidance scale and resolution after the pipelines' own defaults (they differ for SD and SDXL)."""
    config = {
        "model_a": {
            "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
            "lora": args.lora_a,
            "lora_sha256": _lora_digest(args.lora_a),
            "lora_scale": args.lora_scale_a if args.lora_a else None,
            **effective["a"],
        },
        "model_b": {
            "pretrained_model_name_or_path": args.pretrained_model_b,
            "lora": args.lora_b,
            "lora_sha256": _lora_digest(args.lora_b),
            "lora_scale": args.lora_scale_b if args.lora_b else None,
            **effective["b"],
        },
        "revision": args.revision,
        "variant": args.variant,
        "vae": args.pretrained_vae_model_name_or_path,
        "prompts": {k: v for k, v in prompt_info.items() if k != "count"},
        "scheduler": args.scheduler,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        "resolution": args.resolution,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
        "metrics": list(metric_names),
        "reward_config": args.reward_config,
        "reward_config_sha256": _file_digest(args.reward_config),
        "scorer_dtype": args.scorer_dtype,
    }
    if getattr(args, "max_sequence_length", None) is not None:  # only when set: earlier evaluations still resume
        config["max_sequence_length"] = args.max_sequence_length
    return config


def read_records(path, prompts):
    """Per-prompt records of an earlier run, keyed by prompt index; a record is kept only if its prompt still is
    the prompt at that index. A line cut short by an interruption is ignored."""
    records = {}
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            index = record.get("index")
            if isinstance(index, int) and 0 <= index < len(prompts) and record.get("prompt") == prompts[index]:
                records[index] = record
    return records


def prepare_output_dir(args, config):
    """Creates the output folder; returns True if an earlier run with the same settings may be resumed."""
    os.makedirs(os.path.join(args.output_dir, IMAGES_DIR), exist_ok=True)
    config_path = os.path.join(args.output_dir, CONFIG_FILE)
    scores_path = os.path.join(args.output_dir, SCORES_FILE)
    resume = False
    if not args.overwrite and os.path.isfile(config_path) and os.path.isfile(scores_path):
        with open(config_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous == json.loads(json.dumps(config)):
            resume = True
        else:
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            raise ValueError(
                f"{args.output_dir} holds an evaluation with other settings ({', '.join(changed)}); "
                "pass --overwrite to replace it or choose another --output_dir."
            )
    if not resume and os.path.exists(scores_path):
        os.remove(scores_path)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return resume


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def make_grid(entries, metrics, name_a, name_b, cell=256):
    """A PNG-ready grid: one row per prompt with A's and B's images and every metric's two scores (winner in green).

    `entries` is a list of (prompt, image_a, image_b, scores_a, scores_b).
    """
    font, small = _font(16), _font(14)
    line = 18
    text_height = line * (2 + len(metrics)) + 8
    width, row_height = 2 * cell + 30, cell + text_height + 24
    grid = Image.new("RGB", (width, 28 + row_height * len(entries)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((10, 6), f"left: A = {name_a}    right: B = {name_b}", fill="black", font=font)
    for row, (prompt, image_a, image_b, scores_a, scores_b) in enumerate(entries):
        top = 28 + row * row_height
        for col, image in enumerate((image_a, image_b)):
            resample = Image.NEAREST if image.width < cell else Image.BICUBIC  # keep tiny images crisp
            grid.paste(image.convert("RGB").resize((cell, cell), resample), (10 + col * (cell + 10), top))
        y = top + cell + 4
        for text in textwrap.wrap(prompt, width=60)[:2]:
            draw.text((10, y), text, fill="black", font=small)
            y += line
        for metric in metrics:
            a, b = scores_a[metric], scores_b[metric]
            color = "green" if a > b else "firebrick" if a < b else "black"
            draw.text((10, y), f"{metric}: A {a:.4g}  B {b:.4g}", fill=color, font=small)
            y += line
    return grid


def format_markdown(results):
    """The results as a Markdown report: settings, then one row per metric and the average."""
    a, b = results["model_a"]["name"], results["model_b"]["name"]
    g = results["generation"]
    interval = results["interval"]
    lines = [
        f"# Win rate of {a} (A) against {b} (B)",
        "",
        f"- prompts: {results['num_prompts']} from `{results['prompts']['source']}`"
        + (f" (split `{results['prompts']['split']}`)" if results["prompts"].get("split") else ""),
        f"- generation: seed {g['seed']} + prompt index (the same seed for A and B), {g['num_inference_steps']} steps, "
        f"guidance {g['guidance_scale']}, scheduler {g['scheduler']}, resolution {g['resolution']}",
        f"- a win is a higher score, a tie counts 1/2; {int(interval['confidence'] * 100)}% interval: "
        + (
            f"percentile bootstrap over prompts ({interval['bootstrap_samples']} resamples)"
            if interval["method"] == "bootstrap"
            else "Wilson score interval (average: percentile bootstrap over prompts)"
        ),
        "",
        "| metric | win rate of A | interval | A wins / ties / B wins | mean score A | mean score B |",
        "|---|---|---|---|---|---|",
    ]
    for metric, r in results["win_rate"].items():
        lines.append(
            f"| {metric} | {r['win_rate']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
            f"{r['wins']} / {r['ties']} / {r['losses']} | {r['mean_score_a']:.4g} | {r['mean_score_b']:.4g} |"
        )
    avg = results["average_win_rate"]
    lines.append(f"| **average** | **{avg['win_rate']:.3f}** | [{avg['ci_low']:.3f}, {avg['ci_high']:.3f}] | | | |")
    joint = results.get("joint_win_rate")
    if joint:
        lines += [
            "",
            "Joint win rate: the share of prompts on which one model beats the other on every metric "
            f"({int(interval['confidence'] * 100)}% percentile bootstrap over prompts).",
            "",
            "| | share of prompts | interval | prompts |",
            "|---|---|---|---|",
        ]
        for side, name in (("a", a), ("b", b)):
            j = joint[side]
            lines.append(
                f"| {name} beats {b if side == 'a' else a} on every metric | {j['rate']:.3f} | "
                f"[{j['ci_low']:.3f}, {j['ci_high']:.3f}] | {j['prompts']} |"
            )
    return "\n".join(lines) + "\n"


def _default_name(pretrained, lora):
    if lora is None:
        return f"{os.path.basename(os.path.normpath(pretrained))} (base)"
    return os.path.basename(os.path.normpath(lora))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    start_time = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    scorer_dtype = args.scorer_dtype or rewards.default_scorer_dtype(device)
    name_a = args.name_a or _default_name(args.pretrained_model_name_or_path, args.lora_a)
    name_b = args.name_b or _default_name(args.pretrained_model_b, args.lora_b)

    prompts, prompt_info = load_prompts(args.prompts, args.prompt_column, args.prompt_split, args.max_prompts)
    prompt_info["count"] = len(prompts)
    logger.info(f"{len(prompts)} prompts from {prompt_info['source']}")

    metrics = [name.strip() for name in args.reward_models.split(",") if name.strip()]
    effective = {}
    for key, pretrained in (("a", args.pretrained_model_name_or_path), ("b", args.pretrained_model_b)):
        defaults = pipeline_defaults(pretrained, args.revision)
        effective[key] = {
            "scheduler": args.scheduler or defaults["scheduler"],
            "guidance_scale": args.guidance_scale if args.guidance_scale is not None else defaults["guidance_scale"],
            "resolution": args.resolution or defaults["resolution"],
        }

    # Checked before any model is loaded: a folder holding another evaluation fails at once.
    config = run_config(args, prompt_info, metrics, effective)
    resume = prepare_output_dir(args, config)
    scores_path = os.path.join(args.output_dir, SCORES_FILE)
    records = read_records(scores_path, prompts) if resume else {}
    if records:
        logger.info(f"Resuming: {len(records)} of {len(prompts)} prompts already evaluated in {scores_path}")
    # Rewritten with the valid records only, so that a line cut short by an interruption is not continued.
    with open(scores_path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(records[i]) + "\n" for i in sorted(records))
    os.replace(scores_path + ".tmp", scores_path)
    grid_indices = set(range(min(args.num_grid_pairs, len(prompts))))
    todo = [i for i in range(len(prompts)) if i not in records]
    images_dir = os.path.join(args.output_dir, IMAGES_DIR)

    cache = None
    if args.image_cache_dir is not None:
        cache = ImageCache(args.image_cache_dir, args, effective)
    num_generated = {"a": 0, "b": 0}
    models = ModelPair(args, dtype, device)
    scorer_set = None
    if todo:
        scorer_set = rewards.build_scorers(
            metrics,
            config=args.reward_config,
            device=device,
            dtype=scorer_dtype,
            offload=args.offload_scorers,
            cuda_graphs=not args.no_scorer_cuda_graphs,
        )

    progress = tqdm(total=len(prompts), initial=len(records), desc="Prompts", unit="prompt")
    with open(scores_path, "a", encoding="utf-8") as scores_file:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            batch_prompts = [prompts[i] for i in batch]
            seeds = [args.seed + i for i in batch]
            images = {}
            for key in ("a", "b"):
                images[key], count = generate_or_load(models, cache, key, batch_prompts, seeds, args)
                num_generated[key] += count
            # Each model's images are scored in their own call, so identical images get bit-identical scores.
            scores = {key: scorer_set.score(images[key], batch_prompts) for key in ("a", "b")}
            for j, index in enumerate(batch):
                record = {
                    "index": index,
                    "prompt": prompts[index],
                    "seed": seeds[j],
                    "scores_a": {m: float(scores["a"][m][j]) for m in metrics},
                    "scores_b": {m: float(scores["b"][m][j]) for m in metrics},
                }
                records[index] = record
                scores_file.write(json.dumps(record) + "\n")
                if args.save_images or index in grid_indices:
                    for key in ("a", "b"):
                        images[key][j].save(os.path.join(images_dir, f"{index:05d}_{key}.png"))
            # Written through before the next batch, so an interruption loses at most the batch in flight.
            scores_file.flush()
            os.fsync(scores_file.fileno())
            progress.update(len(batch))
            done = [records[i] for i in sorted(records)]
            running = np.mean(
                [
                    pairwise_outcomes(r["scores_a"][m], r["scores_b"][m], args.tie_tolerance)
                    for r in done
                    for m in metrics
                ]
            )
            progress.set_postfix(avg_win_rate=f"{running:.3f}")
    progress.close()

    ordered = [records[i] for i in range(len(prompts))]
    scores_a = {m: [r["scores_a"][m] for r in ordered] for m in metrics}
    scores_b = {m: [r["scores_b"][m] for r in ordered] for m in metrics}
    per_metric, average = compute_win_rates(
        metrics,
        scores_a,
        scores_b,
        interval=args.interval,
        confidence=args.confidence,
        num_samples=args.bootstrap_samples,
        tie_tolerance=args.tie_tolerance,
        seed=args.seed,
    )
    joint = compute_joint_win_rates(
        metrics,
        scores_a,
        scores_b,
        confidence=args.confidence,
        num_samples=args.bootstrap_samples,
        tie_tolerance=args.tie_tolerance,
        seed=args.seed,
    )
    results = {
        "model_a": dict(config["model_a"], name=name_a),
        "model_b": dict(config["model_b"], name=name_b),
        "prompts": prompt_info,
        "num_prompts": len(prompts),
        "metrics": metrics,
        "generation": {
            "seed": args.seed,
            "seeds": "seed + prompt index, the same for both models",
            "scheduler": effective["a"]["scheduler"],
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": effective["a"]["guidance_scale"],
            "negative_prompt": args.negative_prompt,
            "resolution": effective["a"]["resolution"],
            "batch_size": args.batch_size,
            "mixed_precision": args.mixed_precision,
            "device": str(device),
        },
        "interval": {
            "method": args.interval,
            "confidence": args.confidence,
            "bootstrap_samples": args.bootstrap_samples,
            "average": "bootstrap",
        },
        "tie_tolerance": args.tie_tolerance,
        "win_rate": per_metric,
        "average_win_rate": average,
        "joint_win_rate": joint,
        "num_prompts_evaluated_this_run": len(todo),
        "num_prompts_resumed": len(prompts) - len(todo),
        "num_images_generated": num_generated,
        "num_images_from_cache": {k: len(todo) - v for k, v in num_generated.items()},
        "elapsed_s": round(time.perf_counter() - start_time, 2),
    }
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    markdown = format_markdown(results)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown)

    entries = []
    for index in sorted(grid_indices):
        paths = [os.path.join(images_dir, f"{index:05d}_{key}.png") for key in ("a", "b")]
        if all(os.path.isfile(p) for p in paths):
            r = records[index]
            images = [Image.open(p) for p in paths]
            entries.append((r["prompt"], images[0], images[1], r["scores_a"], r["scores_b"]))
    if entries:
        make_grid(entries, metrics, name_a, name_b).save(os.path.join(args.output_dir, "samples.png"))

    print(markdown)
    logger.info(f"Results written to {args.output_dir} (results.json, results.md, samples.png)")
    return results


if __name__ == "__main__":
    args = parse_args()
    main(args)
