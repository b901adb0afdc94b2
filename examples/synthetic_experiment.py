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
"""Majority vote against reward mixing, in miniature, on the CPU.

A self-contained experiment that runs the whole BalancedDPO pipeline on a toy problem where every number can be
checked:

1. Trains a tiny text-to-image latent diffusion model from scratch (VAE, then UNet; a frozen random CLIP text encoder
   with the real CLIP tokenizer) on synthetic pictures "a <colour> <shape>": one shape on a plain background whose
   brightness, saturation, position and size are random and not named in the caption, so the model's samples for
   one prompt vary along all of them. It is saved as an ordinary diffusers pipeline folder.
2. Scores images with three programmatic metrics on very different scales (`synthetic_metrics.py`: brightness x1000,
   colourfulness x1, centring x0.01), plugged in through the public `rewards.py` scorer interface as
   `synthetic_metrics:<Class>`, exactly as a user's own reward model would be.
3. Builds preference pairs from the base model's own samples (two seeds per prompt), as a Pick-a-Pic-format parquet
   dataset (`caption`, `jpg_0`, `jpg_1`, `label_0`; there is no human label, so `label_0` is 0.5).
4. Trains one LoRA per `--consensus` mode (`majority`, `mean_prob`, `reward_sum`, `normalized_sum`, and
   `single:<metric>` for each metric) with `accelerate launch train_balanced_dpo.py`, same data, steps and seed.
5. Evaluates every LoRA against the base model with `evaluate_balanced_dpo.py` (same prompts and seeds for all) and
   prints one table of per-metric and average win rates, also written as `results.md`, `results.json` and a bar
   chart `win_rates.png` under `--output_dir`.

    python examples/synthetic_experiment.py --output_dir synthetic_experiment          # about 15 minutes, 2 cores
    python examples/synthetic_experiment.py --output_dir /tmp/quick --quick           # a smoke run

A finished stage (base model, pairs, each LoRA, each evaluation) is reused when the script runs again with the same
`--output_dir`, so an interrupted experiment resumes; delete the folder to start over after changing a setting.
"""

import argparse
import colorsys
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time


EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(EXAMPLES_DIR)
for path in (REPO_ROOT, EXAMPLES_DIR):  # the project modules and the metrics module, however this is started
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from synthetic_metrics import METRICS  # noqa: E402

import evaluate_balanced_dpo  # noqa: E402
import tiny_assets  # noqa: E402


logger = logging.getLogger(__name__)

# Hue of each colour word (HSV); saturation and value are drawn at random, so "a red circle" may be vivid or pale.
HUES = {"red": 0.0, "orange": 0.08, "yellow": 0.16, "green": 0.33, "blue": 0.62, "purple": 0.78}
SHAPES = ("circle", "square", "triangle")
CAPTIONS = [f"a {color} {shape}" for color in HUES for shape in SHAPES]
DEFAULT_MODES = ["majority", "mean_prob", "reward_sum", "normalized_sum"] + [f"single:{m}" for m in METRICS]

FULL = {
    "num_train_images": 4096,
    "vae_steps": 600,
    "vae_batch_size": 16,
    "unet_steps": 1000,
    "unet_batch_size": 64,
    "num_pairs": 512,
    "dpo_steps": 150,
    "dpo_batch_size": 16,
    "num_eval_prompts": 256,
    "num_inference_steps": 20,
}
QUICK = {
    "num_train_images": 128,
    "vae_steps": 4,
    "vae_batch_size": 8,
    "unet_steps": 4,
    "unet_batch_size": 8,
    "num_pairs": 8,
    "dpo_steps": 2,
    "dpo_batch_size": 4,
    "num_eval_prompts": 6,
    "num_inference_steps": 3,
}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Synthetic multi-metric BalancedDPO experiment (majority vote vs reward mixing), CPU-sized.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output_dir", type=str, default="synthetic_experiment")
    parser.add_argument("--quick", action="store_true", help="Very few steps everywhere: checks that it all runs.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data, the base model and the pairs.")
    parser.add_argument(
        "--dpo_seed", type=int, default=None, help="Seed of the DPO runs and the evaluation (default: --seed)."
    )
    parser.add_argument(
        "--base_from",
        type=str,
        default=None,
        help="Reuse the base model and pairs of an earlier experiment folder (e.g. to repeat the DPO runs with "
        "another --dpo_seed on the same data).",
    )
    parser.add_argument(
        "--modes", type=str, default=",".join(DEFAULT_MODES), help="Comma-separated --consensus modes to compare."
    )
    group = parser.add_argument_group("base model (defaults: full run; --quick shrinks them)")
    group.add_argument("--resolution", type=int, default=32, help="Image size.")
    group.add_argument("--num_train_images", type=int, default=None)
    group.add_argument("--vae_steps", type=int, default=None)
    group.add_argument("--vae_batch_size", type=int, default=None)
    group.add_argument("--unet_steps", type=int, default=None)
    group.add_argument("--unet_batch_size", type=int, default=None)
    group.add_argument("--base_learning_rate", type=float, default=2e-3, help="Peak lr of the VAE and UNet.")
    group = parser.add_argument_group("preference pairs and DPO")
    group.add_argument("--num_pairs", type=int, default=None)
    group.add_argument("--dpo_steps", type=int, default=None)
    group.add_argument("--dpo_batch_size", type=int, default=None)
    group.add_argument("--learning_rate", type=float, default=5e-4, help="LoRA learning rate.")
    group.add_argument("--beta_dpo", type=float, default=5000.0)
    group.add_argument("--rank", type=int, default=8)
    group.add_argument(
        "--lora_target_modules",
        type=str,
        default="to_k,to_q,to_v,to_out.0",
        help="UNet modules that get LoRA layers (passed to the training script).",
    )
    group.add_argument("--parallel_runs", type=int, default=2, help="Training runs launched at the same time.")
    group = parser.add_argument_group("sampling and evaluation")
    group.add_argument("--num_eval_prompts", type=int, default=None)
    group.add_argument("--num_inference_steps", type=int, default=None)
    group.add_argument("--guidance_scale", type=float, default=3.0)
    group.add_argument("--scheduler", type=str, default="DPMSolverMultistepScheduler")
    group.add_argument("--batch_size", type=int, default=64, help="Images per pipeline call when sampling.")
    group.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help=(
            "torch threads of this process (model training, sampling, evaluation). 1 is robust when other jobs share "
            "the cores; the DPO runs use the cores through --parallel_runs processes instead."
        ),
    )
    args = parser.parse_args(input_args) if input_args is not None else parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.dpo_seed is None:
        args.dpo_seed = args.seed
    return args


# ----------------------------------------------------------------------------------------------------------------
# 1. Synthetic data and the base model
# ----------------------------------------------------------------------------------------------------------------


def draw_example(rng, color, shape, size=32):
    """One training picture for "a <color> <shape>": background grey level, saturation, value, size and position
    are uniform at random. Drawn at 4x and box-filtered down, so edges are anti-aliased."""
    grey = int(round(255 * rng.uniform(0.0, 1.0)))
    r, g, b = colorsys.hsv_to_rgb(HUES[color], rng.uniform(0.1, 1.0), rng.uniform(0.5, 1.0))
    image = tiny_assets.draw_shape_image(
        (int(255 * r), int(255 * g), int(255 * b)),
        shape,
        (grey, grey, grey),
        size=4 * size,
        scale=rng.uniform(0.35, 0.6),
        offset=tuple(rng.uniform(-0.2, 0.2, size=2)),
    )
    return image.resize((size, size), Image.BOX)


def make_dataset(num_images, size, seed):
    """(captions, images as a float tensor [N, 3, size, size] in [-1, 1]); every caption equally often."""
    rng = np.random.default_rng(seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(num_images)]
    arrays = []
    for caption in captions:
        _, color, shape = caption.split()
        arrays.append(np.asarray(draw_example(rng, color, shape, size)))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return captions, pixels


def _new_vae(size):
    from diffusers import AutoencoderKL

    # Three levels (4x down: 8x8 latents at 32 px, cheap for the UNet) with few channels at full resolution (cheap to
    # train). One GroupNorm group: with one channel per group the norms would erase each image's mean colour.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=size,
        mid_block_add_attention=False,
    )


def _one_cycle(optimizer, lr, steps):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(steps, 1), pct_start=0.1)


# RGB -> (luma, blue-difference, red-difference) of ITU-R BT.601.
_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def reconstruction_loss(reconstruction, target, chroma_weight=8.0):
    """MSE in YCbCr with the colour-difference channels weighted up: plain RGB MSE is dominated by luma edges, and a
    short training then returns every shape in brown and grey. Same cost, far better colour."""
    error = torch.einsum("ij,bjhw->bihw", _YCBCR, reconstruction - target)
    return error[:, :1].pow(2).mean() + chroma_weight * error[:, 1:].pow(2).mean()


def train_vae(pixels, args):
    """A deterministic autoencoder in AutoencoderKL form, with latents standardised per channel.

    It is trained on the posterior mean (a sampled latent with the initial unit variance would bury colour, which
    then takes far longer to learn) with a colour-weighted loss; afterwards the log-variance output is pinned to its minimum, so
    `latent_dist.sample()` (used by the training script) equals the mean, and each latent channel is shifted and
    scaled to zero mean and unit variance inside `quant_conv` / `post_quant_conv` (the pipelines apply only
    `scaling_factor`, which stays 1).
    """
    torch.manual_seed(args.seed)
    vae = _new_vae(args.resolution)
    optimizer = torch.optim.AdamW(vae.parameters(), args.base_learning_rate)
    scheduler = _one_cycle(optimizer, args.base_learning_rate, args.vae_steps)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.vae_steps):
        batch = pixels[torch.randint(0, len(pixels), (args.vae_batch_size,), generator=generator)]
        reconstruction = vae.decode(vae.encode(batch).latent_dist.mean).sample
        loss = reconstruction_loss(reconstruction, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.vae_steps - 1:
            logger.info(f"VAE step {step}: reconstruction MSE {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
        mean = latents.mean(dim=(0, 2, 3))
        std = latents.std(dim=(0, 2, 3)).clamp_min(1e-4)
        c = vae.config.latent_channels
        # z' = (z - mean) / std inside the encoder, z = z' * std + mean inside the decoder.
        vae.quant_conv.weight[:c] /= std[:, None, None, None]
        vae.quant_conv.bias[:c] = (vae.quant_conv.bias[:c] - mean) / std
        vae.quant_conv.weight[c:] = 0.0
        vae.quant_conv.bias[c:] = -30.0  # log-variance at DiagonalGaussianDistribution's floor: std 3e-7
        w = vae.post_quant_conv.weight  # [c_out, c_in, 1, 1]
        vae.post_quant_conv.bias += (w[:, :, 0, 0] * mean[None, :]).sum(dim=1)
        vae.post_quant_conv.weight *= std[None, :, None, None]
        mse = torch.nn.functional.mse_loss(
            vae.decode(vae.encode(pixels[:256]).latent_dist.sample()).sample, pixels[:256]
        )
    vae.register_to_config(scaling_factor=1.0)
    logger.info(f"VAE reconstruction MSE after standardisation: {mse.item():.4f}")
    return vae


def _new_unet(latent_size):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,  # the tiny CLIP text encoder's width
        attention_head_dim=8,
        norm_num_groups=16,
    )


def encode_prompts(tokenizer, text_encoder, prompts):
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def train_unet(latents, captions, tokenizer, text_encoder, noise_scheduler, args):
    """Plain epsilon-prediction denoising on precomputed latents, 10% empty captions for classifier-free guidance."""
    torch.manual_seed(args.seed)
    unet = _new_unet(latents.shape[-1])
    unique = sorted(set(captions)) + [""]
    embeddings = encode_prompts(tokenizer, text_encoder, unique)
    caption_index = torch.tensor([unique.index(c) for c in captions])
    empty_index = len(unique) - 1
    optimizer = torch.optim.AdamW(unet.parameters(), args.base_learning_rate, weight_decay=0.0)
    scheduler = _one_cycle(optimizer, args.base_learning_rate, args.unet_steps)
    generator = torch.Generator().manual_seed(args.seed + 1)
    for step in range(args.unet_steps):
        rows = torch.randint(0, len(latents), (args.unet_batch_size,), generator=generator)
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
        index = torch.where(torch.rand(len(rows), generator=generator) < 0.1, empty_index, caption_index[rows])
        prediction = unet(noise_scheduler.add_noise(x0, noise, timesteps), timesteps, embeddings[index]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == args.unet_steps - 1:
            logger.info(f"UNet step {step}: loss {loss.item():.4f}")
    return unet.eval()


def build_base_model(args, model_dir):
    """Trains the tiny text-to-image model and saves it as a StableDiffusionPipeline folder."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    start = time.perf_counter()
    captions, pixels = make_dataset(args.num_train_images, args.resolution, args.seed)
    # The tokenizer (real CLIP BPE), the frozen random text encoder and the folder layout come from tiny_assets.
    scaffold = os.path.join(model_dir + "_scaffold")
    tiny_assets.build_tiny_sd_pipeline(scaffold, seed=args.seed)
    pipeline = StableDiffusionPipeline.from_pretrained(scaffold, safety_checker=None, requires_safety_checker=False)
    # A cosine schedule reaches (almost) zero signal at the last step, so samples can start from pure noise and
    # still reach very dark or very bright backgrounds.
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)

    vae = train_vae(pixels, args)
    with torch.no_grad():
        latents = (
            torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
            * vae.config.scaling_factor
        )
    logger.info(f"VAE trained ({time.perf_counter() - start:.0f} s); latents {tuple(latents.shape[1:])}")
    unet = train_unet(latents, captions, pipeline.tokenizer, pipeline.text_encoder, noise_scheduler, args)
    logger.info(f"UNet trained ({time.perf_counter() - start:.0f} s)")

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=unet,
        scheduler=noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(model_dir)
    shutil.rmtree(scaffold, ignore_errors=True)
    save_strip(pixels[:16], os.path.join(args.output_dir, "training_examples.png"))


def save_strip(pixels_or_images, path, columns=8, scale=3):
    """A contact sheet of images ([-1, 1] tensors or PIL images), upscaled so 32 px pictures can be seen."""
    if isinstance(pixels_or_images, torch.Tensor):
        arrays = ((pixels_or_images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        images = [Image.fromarray(a) for a in arrays]
    else:
        images = list(pixels_or_images)
    size = images[0].width * scale
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (size + 2), rows * (size + 2)), "white")
    for i, image in enumerate(images):
        sheet.paste(
            image.resize((size, size), Image.NEAREST), ((i % columns) * (size + 2), (i // columns) * (size + 2))
        )
    sheet.save(path)


# ----------------------------------------------------------------------------------------------------------------
# 2-3. Preference pairs from the model's own samples
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(model_dir, scheduler_name):
    import diffusers
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = getattr(diffusers, scheduler_name).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, prompts, seeds, args):
    images = []
    for start in range(0, len(prompts), args.batch_size):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + args.batch_size]]
        with torch.no_grad():
            images += pipeline(
                list(prompts[start : start + args.batch_size]),
                generator=generators,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                height=args.resolution,
                width=args.resolution,
            ).images
    return images


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: JPEG would blur 32 px pictures and shift the metrics
    return buffer.getvalue()


def build_pairs(args, model_dir, pairs_dir):
    """Two samples per prompt (different seeds) from the base model, as a Pick-a-Pic-format parquet dataset."""
    import datasets

    pipeline = load_pipeline(model_dir, args.scheduler)
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.num_pairs)]
    # Seeds far from the evaluation seeds (seed + prompt index), so no evaluation image is a training image.
    base_seed = args.seed + 1_000_000
    images_0 = generate(pipeline, prompts, [base_seed + 2 * i for i in range(len(prompts))], args)
    images_1 = generate(pipeline, prompts, [base_seed + 2 * i + 1 for i in range(len(prompts))], args)
    rows = {
        "caption": prompts,
        "jpg_0": [_png_bytes(im) for im in images_0],
        "jpg_1": [_png_bytes(im) for im in images_1],
        "label_0": [0.5] * len(prompts),  # no human judged these pairs
        "label_1": [0.5] * len(prompts),
    }
    os.makedirs(os.path.join(pairs_dir, "data"), exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(os.path.join(pairs_dir, "data", "train-00000-of-00001.parquet"))
    save_strip(images_0[:16], os.path.join(args.output_dir, "base_samples.png"))


# ----------------------------------------------------------------------------------------------------------------
# 4. One LoRA per consensus mode
# ----------------------------------------------------------------------------------------------------------------


def metric_name(short):
    return METRICS.get(short, short)


def full_mode(mode):
    """`single:brightness` -> `single:synthetic_metrics:Brightness`; other modes unchanged."""
    if mode.startswith("single:"):
        return "single:" + metric_name(mode[len("single:") :])
    return mode


def short_mode(mode):
    for short, full in METRICS.items():
        mode = mode.replace(full, short)
    return mode


def mode_dir(mode):
    return short_mode(mode).replace(":", "-")


def training_command(args, mode, model_dir, pairs_dir, lora_dir):
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if not torch.cuda.is_available():
        launch.append("--cpu")
    launch += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch + [
        os.path.join(REPO_ROOT, "train_balanced_dpo.py"),
        "--pretrained_model_name_or_path",
        model_dir,
        "--dataset_name",
        pairs_dir,
        "--reward_models",
        ",".join(METRICS.values()),
        "--consensus",
        full_mode(mode),
        "--output_dir",
        lora_dir,
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        str(args.dpo_batch_size),
        "--max_train_steps",
        str(args.dpo_steps),
        "--learning_rate",
        str(args.learning_rate),
        "--beta_dpo",
        str(args.beta_dpo),
        "--rank",
        str(args.rank),
        "--lora_target_modules",
        args.lora_target_modules,
        "--normalize_warmup_pairs",
        str(min(256, args.num_pairs)),
        "--checkpointing_steps",
        str(10**9),
        "--seed",
        str(args.dpo_seed),
    ]


def train_loras(args, model_dir, pairs_dir):
    """Launches the training runs, `--parallel_runs` at a time (one thread each); returns {mode: lora_dir}."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [EXAMPLES_DIR, REPO_ROOT, os.environ.get("PYTHONPATH")]))
    lora_dirs, pending, running = {}, [], []
    for mode in args.modes:
        lora_dir = os.path.join(args.output_dir, "loras", mode_dir(mode))
        lora_dirs[mode] = lora_dir
        if not os.path.isfile(os.path.join(lora_dir, "pytorch_lora_weights.safetensors")):
            pending.append(mode)
    while pending or running:
        while pending and len(running) < max(1, args.parallel_runs):
            mode = pending.pop(0)
            lora_dir = lora_dirs[mode]
            os.makedirs(lora_dir, exist_ok=True)
            log = open(os.path.join(lora_dir, "train.log"), "w")
            command = training_command(args, mode, model_dir, pairs_dir, lora_dir)
            logger.info(f"Training --consensus {full_mode(mode)}: {' '.join(command[3:])}")
            running.append((mode, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(0.5)
        for item in list(running):
            mode, process, log = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            if process.returncode != 0:
                for _, other, _ in running:
                    other.terminate()
                with open(os.path.join(lora_dirs[mode], "train.log")) as f:
                    tail = f.read()[-6000:]
                raise RuntimeError(f"Training --consensus {mode} failed ({process.returncode}):\n{tail}")
            logger.info(f"Finished --consensus {full_mode(mode)}")
    return lora_dirs


def label_agreement(args, pairs_dir):
    """What each consensus asks for: on the training pairs, the share of kept pairs whose label agrees with each
    metric (the sign of its score difference; equal scores count 1/2), and the share of pairs kept.

    Computed with the same `rewards.ConsensusLabeler` the training script uses, in one pass over all pairs (the
    training script sees them in batches, so `normalized_sum` may differ slightly during its warm-up).
    """
    import datasets

    import rewards

    rows = datasets.load_dataset(pairs_dir, split="train")
    scorers = rewards.build_scorers(list(METRICS.values()))
    images_0 = [rewards.load_image(b) for b in rows["jpg_0"]]
    images_1 = [rewards.load_image(b) for b in rows["jpg_1"]]
    scores_0, scores_1 = scorers.score_pairs(images_0, images_1, rows["caption"])
    agreement = {}
    for mode in args.modes:
        labeler = rewards.ConsensusLabeler(
            mode=full_mode(mode),
            temperatures=scorers.temperatures,
            weights=scorers.weights,
            seed=args.dpo_seed,
            normalize_warmup_pairs=min(256, args.num_pairs),
        )
        result = labeler(scores_0, scores_1)
        keep = result.keep
        x0_wins = result.label[keep] > 0.5
        row = {}
        for short, full in METRICS.items():
            delta = (scores_0[full] - scores_1[full])[keep]
            agrees = torch.where(delta == 0, 0.5, ((delta > 0) == x0_wins).float())
            row[short] = float(agrees.mean()) if len(agrees) else float("nan")
        agreement[short_mode(full_mode(mode))] = {"agreement": row, "kept": float(keep.float().mean())}
    return agreement


# ----------------------------------------------------------------------------------------------------------------
# 5. Evaluation and the report
# ----------------------------------------------------------------------------------------------------------------


def evaluate(args, model_dir, lora_dirs):
    """Win rates of every LoRA against the base model, on the same prompts and seeds; {mode: results dict}."""
    prompts_file = os.path.join(args.output_dir, "eval_prompts.txt")
    with open(prompts_file, "w", encoding="utf-8") as f:
        f.write("\n".join(CAPTIONS[i % len(CAPTIONS)] for i in range(args.num_eval_prompts)) + "\n")
    results = {}
    for mode, lora_dir in lora_dirs.items():
        eval_args = evaluate_balanced_dpo.parse_args(
            [
                "--pretrained_model_name_or_path",
                model_dir,
                "--lora_a",
                lora_dir,
                "--name_a",
                f"LoRA ({short_mode(full_mode(mode))})",
                "--name_b",
                "base",
                "--prompts",
                prompts_file,
                "--reward_models",
                ",".join(METRICS.values()),
                "--scheduler",
                args.scheduler,
                "--num_inference_steps",
                str(args.num_inference_steps),
                "--guidance_scale",
                str(args.guidance_scale),
                "--resolution",
                str(args.resolution),
                "--batch_size",
                str(args.batch_size),
                "--seed",
                str(args.dpo_seed),
                "--output_dir",
                os.path.join(args.output_dir, "eval", mode_dir(mode)),
                "--num_grid_pairs",
                "6",
                # The base model's images are the same in every comparison: generated once, then read back.
                "--image_cache_dir",
                os.path.join(args.output_dir, "eval", "image_cache"),
            ]
        )
        logger.info(f"Evaluating --consensus {full_mode(mode)} against the base model")
        results[mode] = evaluate_balanced_dpo.main(eval_args)
    return results


def summarize(results):
    """{mode: {"metrics": {short metric: (rate, low, high)}, "average": (rate, low, high)}}."""
    summary = {}
    for mode, result in results.items():
        per_metric = {
            short: tuple(result["win_rate"][full][k] for k in ("win_rate", "ci_low", "ci_high"))
            for short, full in METRICS.items()
        }
        average = tuple(result["average_win_rate"][k] for k in ("win_rate", "ci_low", "ci_high"))
        change = {
            short: result["win_rate"][full]["mean_score_a"] - result["win_rate"][full]["mean_score_b"]
            for short, full in METRICS.items()
        }
        summary[short_mode(full_mode(mode))] = {"metrics": per_metric, "average": average, "mean_change": change}
    return summary


def markdown_table(summary, num_prompts):
    metrics = list(METRICS)
    lines = [
        f"Win rate of each LoRA against the base model on {num_prompts} prompts (ties 1/2; 95% bootstrap interval "
        "over prompts).",
        "",
        "| --consensus | " + " | ".join(metrics) + " | average |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for mode, row in summary.items():
        cells = [f"{r:.3f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in (row["metrics"][m] for m in metrics)]
        r, lo, hi = row["average"]
        cells.append(f"**{r:.3f}** [{lo:.2f}, {hi:.2f}]")
        lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def change_table(summary):
    metrics = list(METRICS)
    lines = [
        "Mean score change of each LoRA against the base model (LoRA - base, in each metric's own units).",
        "",
        "| --consensus | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for mode, row in summary.items():
        lines.append(f"| `{mode}` | " + " | ".join(f"{row['mean_change'][m]:+.4g}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def agreement_table(agreement):
    metrics = list(METRICS)
    lines = [
        "Share of the training pairs on which each metric prefers the image the label makes the winner (ties 1/2).",
        "",
        "| --consensus | " + " | ".join(metrics) + " | mean | pairs kept |",
        "|---|" + "---|" * (len(metrics) + 2),
    ]
    for mode, row in agreement.items():
        values = [row["agreement"][m] for m in metrics]
        cells = [f"{v:.2f}" for v in values] + [f"{np.mean(values):.2f}", f"{row['kept']:.2f}"]
        lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(summary, path):
    """Grouped bars (one group per mode: each metric and the average) with 95% intervals, drawn with PIL."""
    metrics = list(METRICS) + ["average"]
    colors = ["#f2b134", "#e0468c", "#4a90d9", "#333333"]
    group_width, bar_width, margin_left, margin_bottom, height = 150, 30, 60, 70, 360
    width = margin_left + max(group_width * len(summary), 130 * len(metrics)) + 20
    image = Image.new("RGB", (width, height + margin_bottom + 40), "white")
    draw = ImageDraw.Draw(image)
    top = 30

    def y(value):
        return top + (1.0 - value) * height

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([(margin_left, y(tick)), (width - 10, y(tick))], fill="#999999" if tick == 0.5 else "#e5e5e5")
        draw.text((10, y(tick) - 6), f"{tick:.2f}", fill="black")
    draw.text((margin_left, 8), "win rate against the base model (95% interval)", fill="black")
    for g, (mode, row) in enumerate(summary.items()):
        x0 = margin_left + g * group_width + 10
        values = [row["metrics"][m] for m in metrics[:-1]] + [row["average"]]
        for k, (rate, low, high) in enumerate(values):
            left = x0 + k * bar_width
            draw.rectangle([left, y(rate), left + bar_width - 4, y(0.0)], fill=colors[k])
            center = left + (bar_width - 4) / 2
            draw.line([(center, y(high)), (center, y(low))], fill="black", width=1)
            for value in (low, high):
                draw.line([(center - 4, y(value)), (center + 4, y(value))], fill="black")
        draw.text((x0, y(0.0) + 6), mode.replace("single:", "single:\n"), fill="black")
    for k, metric in enumerate(metrics):
        left = margin_left + k * 130
        draw.rectangle([left, height + margin_bottom + 15, left + 12, height + margin_bottom + 27], fill=colors[k])
        draw.text((left + 16, height + margin_bottom + 15), metric, fill="black")
    image.save(path)


def main(args):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    timings = {}
    source_dir = args.base_from or args.output_dir
    model_dir = os.path.join(source_dir, "base_model")
    pairs_dir = os.path.join(source_dir, "pairs")
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        build_base_model(args, model_dir)
    timings["base_model_s"] = time.perf_counter() - start
    if not os.path.isdir(os.path.join(pairs_dir, "data")):
        build_pairs(args, model_dir, pairs_dir)
    timings["pairs_s"] = time.perf_counter() - start - sum(timings.values())
    agreement = label_agreement(args, pairs_dir)
    lora_dirs = train_loras(args, model_dir, pairs_dir)
    timings["dpo_training_s"] = time.perf_counter() - start - sum(timings.values())
    results = evaluate(args, model_dir, lora_dirs)
    timings["evaluation_s"] = time.perf_counter() - start - sum(timings.values())
    timings["total_s"] = time.perf_counter() - start

    summary = summarize(results)
    table = markdown_table(summary, args.num_eval_prompts)
    labels = change_table(summary) + "\n" + agreement_table(agreement)
    settings = vars(args)
    timings = {k: round(v, 1) for k, v in timings.items()}
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("# Synthetic multi-metric experiment\n\n" + table + "\n" + labels)
        f.write(f"\nSettings: `{json.dumps(settings)}`\n\nTimings (s): `{json.dumps(timings)}`\n")
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"summary": summary, "label_agreement": agreement, "settings": settings, "timings": timings}, f, indent=2
        )
    bar_chart(summary, os.path.join(args.output_dir, "win_rates.png"))
    print("\n" + table + "\n" + labels)
    print(f"Total time {timings['total_s']:.0f} s; results in {args.output_dir} (results.md, win_rates.png)")
    return summary


if __name__ == "__main__":
    main(parse_args())
