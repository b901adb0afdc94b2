#!/usr/bin/env python
# coding=utf-8
# Copyright 2026 The BalancedDPO authors and The HuggingFace Inc. team. All rights reserved.
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
"""BalancedDPO: LoRA Diffusion-DPO for Stable Diffusion XL (and SDXL-Turbo) with a multi-metric consensus label.

Every pair is scored on the fly by several reward models (PickScore, HPSv2, CLIP score, LAION aesthetics, ...);
`rewards.py` turns the scores into one consensus label (majority vote by default) and the pair is trained with the
Diffusion-DPO loss in that order. The loss, the consensus and the dynamic reference model are the ones of
`train_balanced_dpo.py` (both scripts use `balanced_dpo.py`); this script adds what SDXL needs: two text encoders,
per-image micro-conditioning, an optional fp16-safe VAE, SDXL-Turbo's timestep grid and cached text embeddings.
See README.md.
"""

import argparse
import gc
import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path

import diffusers
import torch
import torch.utils.checkpoint
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import check_min_version
from peft import LoraConfig
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

import balanced_dpo
import preference_data
import rewards


check_min_version("0.30.0")

logger = get_logger(__name__)

DEFAULT_REWARD_MODELS = "pickscore,hpsv2,clip,aesthetic"
PRECOMPUTED_COLUMNS = ("consensus_label", "consensus_prob", "agreement")
# SDXL-Turbo was distilled for 1-4 sampling steps on the "trailing" grid 249, 499, 749, 999.
TURBO_NUM_STEPS = 4
# The floor diffusers' Euler schedulers put on a zero terminal alpha_bar at inference (fp16's smallest subnormal).
ZERO_SNR_ALPHA_CUMPROD = 2**-24
TEXT_ENCODE_BATCH_SIZE = 64


def save_model_card(repo_id, args, images=None, validation_scores=None, repo_folder=None):
    """Writes the model card (README.md) of the LoRA: base model, data, consensus settings, scores and usage."""
    from huggingface_hub import ModelCard, ModelCardData

    img_str = ""
    for i, image in enumerate(images or []):
        image.save(os.path.join(repo_folder, f"image_{i}.png"))
        img_str += f"![img_{i}](./image_{i}.png)\n"
    scores_str = ""
    if validation_scores:
        scores_str = (
            "\n## Validation scores (mean over the validation prompts)\n\n| metric | base | LoRA |\n|---|---|---|\n"
        )
        for metric, (base, lora) in validation_scores.items():
            scores_str += f"| {metric} | {base:.4f} | {lora:.4f} |\n"
    consensus = "precomputed (`rewards.py label`)" if args.precomputed_consensus else args.consensus
    vae_line = ""
    vae_load = ""
    vae_arg = ""
    if args.pretrained_vae_model_name_or_path is not None:
        vae_line = f"- VAE used for training: `{args.pretrained_vae_model_name_or_path}`\n"
        vae_load = (
            "from diffusers import AutoencoderKL\n\n"
            f'vae = AutoencoderKL.from_pretrained("{args.pretrained_vae_model_name_or_path}", torch_dtype=torch.float16)\n'
        )
        vae_arg = "vae=vae, "
    turbo_line = "- SDXL-Turbo: timesteps on its 4-step grid (249, 499, 749, 999)\n" if args.is_turbo else ""
    call = (
        'pipe("a photo of an astronaut riding a horse", num_inference_steps=4, guidance_scale=0.0).images[0]'
        if args.is_turbo
        else 'pipe("a photo of an astronaut riding a horse").images[0]'
    )
    model_description = f"""
# BalancedDPO LoRA (SDXL) - {repo_id}

LoRA weights for **{args.pretrained_model_name_or_path}**, trained with BalancedDPO (Diffusion-DPO with a
multi-metric consensus label) on **{args.dataset_name or args.train_data_dir}** at {args.resolution} px.

- consensus: `{consensus}`, metrics: `{args.reward_models if not args.precomputed_consensus else "from the dataset"}`,
  tie policy `{args.tie_policy}`, abstain margin {args.abstain_margin}, min agreement {args.min_agreement},
  human vote: {args.human_vote}, label mode `{args.label_mode}`
- loss `{args.loss_type}`, beta {args.beta_dpo}, reference updates every {args.ref_update_steps} steps
  ({args.ref_update_mode}), LoRA rank {args.rank}, learning rate {args.learning_rate},
  {args.max_train_steps} steps of {args.train_batch_size} pairs x {args.gradient_accumulation_steps} accumulation
{turbo_line}{vae_line}{scores_str}
{img_str}

## How to use

```python
import torch
from diffusers import DiffusionPipeline
{vae_load}
pipe = DiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}", {vae_arg}torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{repo_id}")
image = {call}
```
"""
    # Built locally (no Hub round trip), so offline runs and runs without --push_to_hub get the same card.
    card_data = ModelCardData(
        license="openrail++",
        base_model=args.pretrained_model_name_or_path,
        library_name="diffusers",
        inference=True,
        tags=[
            "text-to-image",
            "diffusers",
            "diffusers-training",
            "lora",
            "dpo",
            "balanced-dpo",
            "stable-diffusion-xl",
            "stable-diffusion-xl-diffusers",
        ],
    )
    model_card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{model_description}")
    model_card.save(os.path.join(repo_folder, "README.md"))


def log_validation(
    args,
    accelerator,
    unet,
    vae,
    text_encoders,
    weight_dtype,
    step,
    prompts,
    scorer_set=None,
    lora_dir=None,
):
    """Generates one image per prompt (and per `--num_validation_images`) with the LoRA and, when scoring, with the
    base model from the same seeds. The training VAE (fp32 unless an fp16-safe one was given) and, when still
    loaded, the training text encoders are reused. Returns (images, {metric: (base mean, lora mean)})."""
    logger.info(f"Running validation on {len(prompts)} prompts")
    components = {"vae": vae}
    if text_encoders is not None:
        components["text_encoder"], components["text_encoder_2"] = text_encoders
    if lora_dir is None:
        components["unet"] = accelerator.unwrap_model(unet)
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        torch_dtype=weight_dtype,
        **components,
    )
    if lora_dir is not None:
        pipeline.load_lora_weights(lora_dir)
    pipeline = pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    num_inference_steps = args.validation_inference_steps
    if num_inference_steps is None:
        num_inference_steps = TURBO_NUM_STEPS if args.is_turbo else 25
    pipeline_kwargs = {"guidance_scale": 0.0} if args.is_turbo else {}

    def generate():
        images = []
        for i, prompt in enumerate(prompts):
            for j in range(args.num_validation_images):
                seed = (args.seed if args.seed is not None else 0) + i * 1000 + j
                generator = torch.Generator(device=accelerator.device).manual_seed(seed)
                images.append(
                    pipeline(
                        prompt,
                        num_inference_steps=num_inference_steps,
                        generator=generator,
                        height=args.resolution,
                        width=args.resolution,
                        **pipeline_kwargs,
                    ).images[0]
                )
        return images

    lora_images = generate()
    scores = {}
    if scorer_set is not None:
        if lora_dir is not None:
            pipeline.disable_lora()
            base_images = generate()
            pipeline.enable_lora()
        else:
            with balanced_dpo.reference_model(accelerator.unwrap_model(unet), dynamic_reference=False):
                base_images = generate()
        repeated = [p for p in prompts for _ in range(args.num_validation_images)]
        lora_scores = scorer_set.score(lora_images, repeated)
        base_scores = scorer_set.score(base_images, repeated)
        scores = {m: (base_scores[m].mean().item(), lora_scores[m].mean().item()) for m in lora_scores}
        logger.info(
            "Validation scores (base -> LoRA): " + ", ".join(f"{m} {b:.4f} -> {l:.4f}" for m, (b, l) in scores.items())
        )

    tracker_key = "test" if lora_dir is not None else "validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            np_images = np.stack([np.asarray(img) for img in lora_images])
            tracker.writer.add_images(tracker_key, np_images, step, dataformats="NHWC")
        if tracker.name == "wandb":
            import wandb

            tracker.log({tracker_key: [wandb.Image(img, caption=p) for img, p in zip(lora_images, prompts)]})
        for metric, (base, lora) in scores.items():
            accelerator.log({f"{tracker_key}/{metric}_base": base, f"{tracker_key}/{metric}_lora": lora}, step=step)
    pipeline = None  # free memory before training continues
    return lora_images, scores


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="BalancedDPO LoRA training for Stable Diffusion XL.")
    # Model
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Path to a pretrained SDXL pipeline folder or a model identifier from huggingface.co/models.",
    )
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help=(
            "A VAE to use instead of the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix. It runs in the training"
            " precision; the pipeline's own SDXL VAE overflows in fp16 and always runs in fp32."
        ),
    )
    group.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    group.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    group.add_argument(
        "--is_turbo",
        action="store_true",
        help="The model is SDXL-Turbo: train on its 4-step timestep grid (249, 499, 749, 999) and validate with 4"
        " steps and no guidance.",
    )
    # Data
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub dataset id (e.g. yuvalkirstain/pickapic_v2) or a local path datasets can load.",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset config name.")
    group.add_argument("--train_data_dir", type=str, default=None, help="A local folder of data files instead.")
    group.add_argument("--dataset_split_name", type=str, default="train", help="The split to train on.")
    group.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    group.add_argument(
        "--streaming_split",
        type=str,
        default="rows",
        choices=["rows", "shards"],
        help="How a stream is shared by processes x DataLoader workers: each reads the whole stream and keeps every"
        " N-th row ('rows': equal shares, fine for local data), or reads whole data files of its own ('shards': each"
        " file is downloaded once; needs at least as many files as readers).",
    )
    group.add_argument("--caption_column", type=str, default="caption")
    group.add_argument("--image_0_column", type=str, default="jpg_0")
    group.add_argument("--image_1_column", type=str, default="jpg_1")
    group.add_argument(
        "--label_0_column",
        type=str,
        default="label_0",
        help="Human label column (1 = image 0 preferred, 0 = image 1, 0.5 = tie). Pass '' if the data has none.",
    )
    group.add_argument("--drop_human_ties", action="store_true", help="Drop pairs the human label calls a tie.")
    group.add_argument("--proportion_empty_prompts", type=float, default=0.0, help="Share of captions replaced by ''.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Truncate the dataset (works streaming).")
    group.add_argument(
        "--max_bad_examples",
        type=str,
        default=None,
        help="Stop when more rows than this (count, or a fraction < 1) are unusable.",
    )
    group.add_argument("--resolution", type=int, default=1024, help="Training resolution (SDXL-Turbo: 512).")
    group.add_argument(
        "--random_crop", action="store_true", help="Random instead of center crops (same crop for both images)."
    )
    group.add_argument(
        "--no_hflip", action="store_true", help="Disable random horizontal flips (same flip for both images)."
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Data loading processes (0 = main process). Resume a streaming run with the same number.",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    group.add_argument(
        "--cache_text_embeddings",
        action="store_true",
        help=(
            "Encode each distinct caption once and keep its embeddings in CPU memory (about 310 KiB per caption"
            " in bf16). Map-style datasets are encoded before training and the text encoders are then freed;"
            " streaming datasets are encoded on first sight."
        ),
    )
    group.add_argument(
        "--text_embeddings_cache_size",
        type=int,
        default=None,
        help="Most captions kept by --cache_text_embeddings (least recently used go first; default: no limit).",
    )
    # LoRA
    group = parser.add_argument_group("LoRA")
    group.add_argument("--rank", type=int, default=8, help="The dimension of the LoRA update matrices.")
    group.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: equal to --rank).")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout.")
    group.add_argument(
        "--lora_target_modules",
        type=str,
        default="to_k,to_q,to_v,to_out.0",
        help="Comma-separated UNet module names that get LoRA layers.",
    )
    # Consensus
    group = parser.add_argument_group("consensus")
    group.add_argument(
        "--reward_models", type=str, default=DEFAULT_REWARD_MODELS, help="Comma-separated metrics scored on the fly."
    )
    group.add_argument(
        "--reward_config",
        type=str,
        default=None,
        help="JSON mapping metric -> build_scorer options (see `rewards.py calibrate`).",
    )
    group.add_argument(
        "--consensus",
        type=str,
        default="majority",
        help="majority, mean_prob, human, single:<metric>, reward_sum, normalized_sum or random_metric.",
    )
    group.add_argument("--tie_policy", type=str, default="mean_prob", choices=["mean_prob", "human", "drop"])
    group.add_argument("--abstain_margin", type=float, default=0.0, help="A metric abstains when |p - 0.5| <= this.")
    group.add_argument(
        "--min_agreement", type=float, default=0.0, help="Drop pairs whose voter agreement is below this."
    )
    group.add_argument("--human_vote", action="store_true", help="The human label votes too.")
    group.add_argument(
        "--label_mode",
        type=str,
        default="hard",
        choices=["hard", "soft"],
        help="Hard labels or the consensus probability as a soft target.",
    )
    group.add_argument(
        "--precomputed_consensus",
        action="store_true",
        help="Read consensus_label/consensus_prob columns written by `rewards.py label`; load no scorer.",
    )
    group.add_argument(
        "--scorer_dtype",
        type=str,
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="Scorer weights dtype (default: the training weight dtype).",
    )
    group.add_argument(
        "--offload_scorers",
        action="store_true",
        help="Keep scorers on the CPU and move each to the GPU only while it scores (for 24 GB cards).",
    )
    group.add_argument(
        "--no_scorer_cuda_graphs",
        action="store_true",
        help="Run scorer forwards eagerly instead of replaying CUDA graphs (graphs are used on CUDA without offload).",
    )
    group.add_argument(
        "--no_score_ahead",
        action="store_true",
        help="Score each batch when it is trained on instead of one batch ahead on a side CUDA stream.",
    )
    group.add_argument(
        "--normalize_warmup_pairs", type=int, default=2048, help="Pairs used to estimate the scales of normalized_sum."
    )
    # Loss and reference
    group = parser.add_argument_group("loss and reference model")
    group.add_argument("--loss_type", type=str, default="sigmoid", choices=list(balanced_dpo.LOSS_TYPES))
    group.add_argument(
        "--beta_dpo", type=float, default=5000.0, help="DPO beta (the same meaning in the SD and SDXL scripts)."
    )
    group.add_argument(
        "--ref_update_steps",
        type=int,
        default=0,
        help="Make the reference the current policy every N optimizer steps (0 = frozen base model).",
    )
    group.add_argument("--ref_update_mode", type=str, default="copy", choices=["copy", "ema"])
    group.add_argument(
        "--ref_ema_decay", type=float, default=0.9, help="EMA decay of the reference for --ref_update_mode ema."
    )
    # Optimization
    group = parser.add_argument_group("optimization")
    group.add_argument("--train_batch_size", type=int, default=8, help="Pairs per device per micro-step.")
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps (overrides epochs).")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    group.add_argument("--learning_rate", type=float, default=1e-5)
    group.add_argument("--scale_lr", action="store_true", help="Scale the lr by GPUs x accumulation x batch size.")
    group.add_argument("--lr_scheduler", type=str, default="constant", help="Any diffusers scheduler name.")
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--lr_num_cycles", type=int, default=1)
    group.add_argument("--lr_power", type=float, default=1.0)
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-08)
    group.add_argument("--max_grad_norm", default=1.0, type=float)
    group.add_argument(
        "--max_nonfinite_steps", type=int, default=5, help="Stop after this many non-finite steps in a row."
    )
    group.add_argument("--vae_encode_batch_size", type=int, default=8)
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Keep each image's VAE encoding (per flip and crop) in host memory and reuse it in later epochs; latents "
        "are still sampled fresh every time. For multi-epoch runs on datasets that fit in RAM.",
    )
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    group.add_argument("--allow_tf32", action="store_true")
    group.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    group.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    # Checkpoints, logging, Hub
    group = parser.add_argument_group("checkpoints, logging and the Hub")
    group.add_argument("--output_dir", type=str, default="balanced-dpo-sdxl-lora")
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint-N folder or 'latest'.")
    group.add_argument("--logging_dir", type=str, default="logs")
    group.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    group.add_argument("--tracker_name", type=str, default="balanced-dpo-sdxl-lora")
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_token", type=str, default=None)
    group.add_argument("--hub_model_id", type=str, default=None)
    group.add_argument("--local_rank", type=int, default=-1)
    # Validation
    group = parser.add_argument_group("validation")
    group.add_argument(
        "--validation_prompts",
        type=str,
        nargs="+",
        default=None,
        help="Prompts, or one text file with a prompt per line.",
    )
    group.add_argument("--num_validation_images", type=int, default=1)
    group.add_argument("--validation_steps", type=int, default=200)
    group.add_argument(
        "--validation_inference_steps", type=int, default=None, help="Sampling steps (default 25; 4 with --is_turbo)."
    )
    group.add_argument(
        "--score_validation", action="store_true", help="Score LoRA and base validation images with the reward models."
    )

    args = parser.parse_args(input_args) if input_args is not None else parser.parse_args()
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    if args.label_0_column == "":
        args.label_0_column = None
    return args


def validate_sdxl_args(args):
    """The SDXL-only argument checks; `balanced_dpo.validate_args` does the shared ones."""
    if args.resolution % 8 != 0:
        raise ValueError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {args.resolution}.")
    if args.text_embeddings_cache_size is not None:
        if not args.cache_text_embeddings:
            raise ValueError("--text_embeddings_cache_size needs --cache_text_embeddings.")
        if args.text_embeddings_cache_size < 1:
            raise ValueError("--text_embeddings_cache_size must be a positive number of captions.")


class TokenizeCaptions:
    """Picklable collate-time tokenizer for SDXL's two tokenizers, so tokenization runs in the DataLoader workers."""

    def __init__(self, tokenizers):
        self.tokenizers = tokenizers

    def __call__(self, captions):
        return dict(zip(("input_ids", "input_ids_2"), tokenize_prompt(self.tokenizers, captions)))


def tokenize_prompt(tokenizers, captions):
    return [
        tokenizer(
            list(captions),
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tokenizer in tokenizers
    ]


@torch.no_grad()
def encode_prompt(text_encoders, input_ids_list):
    """SDXL's prompt conditioning, as `StableDiffusionXLPipeline.encode_prompt` computes it.

    The penultimate hidden states of both encoders are concatenated ([B, 77, 768 + 1280] for SDXL); the pooled
    embedding is the projected output of the second encoder (`CLIPTextModelWithProjection`).
    """
    prompt_embeds_list = []
    pooled_prompt_embeds = None
    for text_encoder, input_ids in zip(text_encoders, input_ids_list):
        output = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True, return_dict=True)
        prompt_embeds_list.append(output.hidden_states[-2])
        pooled = getattr(output, "text_embeds", None)
        pooled_prompt_embeds = pooled if pooled is not None else output.pooler_output
    prompt_embeds = torch.cat(prompt_embeds_list, dim=-1)
    return prompt_embeds, pooled_prompt_embeds.view(prompt_embeds.shape[0], -1)


class PromptEncoder:
    """Turns the captions of a batch into SDXL's `(prompt_embeds, pooled_prompt_embeds)` on the training device.

    Without a cache the token ids tokenized in the DataLoader workers are encoded every micro-step. With
    `cache=True` the embeddings of each distinct caption are computed once and kept on the CPU (in the encoders'
    dtype), keyed by the caption text; `max_entries` bounds the cache (least recently used captions go first).
    `precompute` fills the cache up front, after which `release_text_encoders` frees the encoders' memory.
    """

    def __init__(self, tokenizers, text_encoders, device, cache=False, max_entries=None):
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.device = device
        self.cache = OrderedDict() if cache else None
        self.max_entries = max_entries

    @property
    def cached(self):
        return self.cache is not None

    def _encode_captions(self, captions):
        if self.text_encoders is None:
            missing = ", ".join(repr(c) for c in captions[:3])
            raise RuntimeError(
                f"Captions {missing} were not precomputed and the text encoders were already freed."
                " This is a bug: every caption of the dataset should have been encoded before training."
            )
        return encode_prompt(self.text_encoders, tokenize_prompt(self.tokenizers, captions))

    def precompute(self, captions, batch_size=TEXT_ENCODE_BATCH_SIZE):
        """Encodes every distinct caption in `captions` that is not cached yet. Returns the number encoded."""
        todo = [c for c in dict.fromkeys(captions) if c not in self.cache]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            embeds, pooled = self._encode_captions(chunk)
            self._store(chunk, embeds, pooled)
        return len(todo)

    def _store(self, captions, embeds, pooled):
        # One clone per caption, so that an evicted entry does not keep its whole batch alive.
        entries = {
            c: (e.clone(), p.clone()) for c, e, p in zip(captions, embeds.detach().cpu(), pooled.detach().cpu())
        }
        for caption, entry in entries.items():
            self.cache[caption] = entry
            self.cache.move_to_end(caption)
        if self.max_entries is not None:
            while len(self.cache) > self.max_entries:
                self.cache.popitem(last=False)
        return entries

    def cache_bytes(self):
        return sum(e.numel() * e.element_size() + p.numel() * p.element_size() for e, p in self.cache.values())

    def release_text_encoders(self):
        """Drops this object's references to the text encoders (the caller drops its own)."""
        self.text_encoders = None

    def __call__(self, batch, index):
        """Embeddings of the training captions of the pairs `index` of `batch`."""
        if not self.cached:
            input_ids = [batch[key][index.to(batch[key].device)] for key in ("input_ids", "input_ids_2")]
            embeds, pooled = encode_prompt(self.text_encoders, input_ids)
            return embeds.to(self.device), pooled.to(self.device)
        captions = [batch["train_captions"][i] for i in index.tolist()]
        found, missing = {}, []
        for caption in dict.fromkeys(captions):
            if caption in self.cache:
                self.cache.move_to_end(caption)
                found[caption] = self.cache[caption]
            else:
                missing.append(caption)
        if missing:
            found.update(self._store(missing, *self._encode_captions(missing)))
        embeds = torch.stack([found[c][0] for c in captions]).to(self.device, non_blocking=True)
        pooled = torch.stack([found[c][1] for c in captions]).to(self.device, non_blocking=True)
        return embeds, pooled


def compute_time_ids(original_sizes, crop_top_lefts, resolution):
    """SDXL micro-conditioning of each image of each pair: `[B, 2, 6]` float32.

    Row `[b, k]` is `(original height, original width, crop top, crop left, resolution, resolution)` of image `k`
    of pair `b`, from that image's own decoded size and crop (`PairTransform`), as `StableDiffusionXLPipeline`
    builds `add_time_ids` (original_size + crops_coords_top_left + target_size). They stay float32: sizes such as
    1023 are not representable in bf16, and the UNet embeds them in float32 anyway.
    """
    original_sizes = original_sizes.float()
    target = torch.full_like(original_sizes, float(resolution))
    return torch.cat([original_sizes, crop_top_lefts.to(original_sizes), target], dim=-1)


def pair_time_ids(original_sizes, crop_top_lefts, label, resolution):
    """Time ids `[2B, 6]` ordered like the latents: winners first (image 0 where `label > 0.5`), then losers."""
    time_ids = compute_time_ids(original_sizes, crop_top_lefts, resolution)
    return balanced_dpo.order_by_label(time_ids[:, 0], time_ids[:, 1], label)


def turbo_timesteps(num_pairs, num_train_timesteps, generator=None):
    """Timesteps drawn uniformly from SDXL-Turbo's 4-step "trailing" grid (249, 499, 749, 999 for 1000 steps), on the
    generator's device."""
    device = generator.device if generator is not None else "cpu"
    grid = torch.tensor(
        [round(num_train_timesteps * (k + 1) / TURBO_NUM_STEPS) - 1 for k in range(TURBO_NUM_STEPS)],
        dtype=torch.long,
        device=device,
    )
    return grid[torch.randint(0, TURBO_NUM_STEPS, (num_pairs,), generator=generator, device=device)]


def load_noise_scheduler(args):
    """The training noise schedule, with a zero terminal SNR made safe for epsilon prediction.

    With `rescale_betas_zero_snr` the last alpha_bar is exactly 0: x_t is then pure noise, the epsilon target is the
    model's own input, and winner and loser (same noise) become identical, so the step carries no preference signal
    while still pulling the model towards copying its input. diffusers' Euler schedulers, which SDXL samples with,
    replace that 0 by 2**-24 at inference; training uses the same value so it sees exactly what sampling sees.
    v-prediction is well defined at zero SNR and is left as is.
    """
    noise_scheduler = DDPMScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
    )
    if noise_scheduler.config.get("rescale_betas_zero_snr", False):
        if noise_scheduler.config.prediction_type == "epsilon":
            noise_scheduler.alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
            logger.info(
                "Zero terminal SNR schedule with epsilon prediction: alpha_bar(T) set to 2**-24 (as at inference)."
            )
    return noise_scheduler


def main(args):
    balanced_dpo.validate_args(args)
    validate_sdxl_args(args)
    max_bad_examples = preference_data.parse_max_bad_examples(args.max_bad_examples)
    dynamic_reference = args.ref_update_steps > 0

    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if torch.backends.mps.is_available():
        accelerator.native_amp = False

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()

    if args.seed is not None:
        set_seed(args.seed)

    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id

    # Data first: a wrong column name must fail before any model is loaded.
    with accelerator.main_process_first():
        train_dataset = preference_data.load_preference_dataset(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_data_dir=args.train_data_dir,
            split=args.dataset_split_name,
            streaming=args.streaming,
            cache_dir=args.cache_dir,
            shuffle_seed=args.seed,
            max_train_samples=args.max_train_samples,
        )
    extra_columns = PRECOMPUTED_COLUMNS[:2] if args.precomputed_consensus else ()
    preference_data.check_columns(
        train_dataset,
        args.caption_column,
        args.image_0_column,
        args.image_1_column,
        label_0_column=args.label_0_column,
        require_label=args.consensus == "human" or args.human_vote or args.drop_human_ties,
        extra_columns=extra_columns,
    )

    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16

    # Models
    noise_scheduler = load_noise_scheduler(args)
    tokenizers = [
        AutoTokenizer.from_pretrained(
            args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision, use_fast=False
        )
        for subfolder in ("tokenizer", "tokenizer_2")
    ]
    text_encoder_one = CLIPTextModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder", revision=args.revision, variant=args.variant
    )
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder_2", revision=args.revision, variant=args.variant
    )
    if args.pretrained_vae_model_name_or_path is None:
        vae = AutoencoderKL.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, variant=args.variant
        )
    else:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, revision=args.revision)
    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant
    )
    for model in (vae, text_encoder_one, text_encoder_two, unet):
        model.requires_grad_(False)
    unet.to(accelerator.device, dtype=weight_dtype)
    # The stock SDXL VAE produces inf/NaN in fp16: keep it in fp32 unless an fp16-safe VAE was given.
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path is not None else torch.float32
    vae.to(accelerator.device, dtype=vae_dtype)
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)
    text_encoders = (text_encoder_one, text_encoder_two)

    lora_config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.rank,
        lora_dropout=args.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=[m.strip() for m in args.lora_target_modules.split(",") if m.strip()],
    )
    balanced_dpo.add_lora_adapters(unet, lora_config, dynamic_reference)
    if accelerator.mixed_precision in ("fp16", "bf16"):
        # Only the trainable LoRA parameters are upcast; the reference adapter may stay in the weight dtype.
        cast_training_params(unet, dtype=torch.float32)
    params_to_optimize = balanced_dpo.freeze_all_but_policy(unet)
    # Saved with the LoRA so that `load_lora_weights` restores lora_alpha (and so the scale) when it differs from r.
    lora_metadata = unet.peft_config[balanced_dpo.POLICY_ADAPTER].to_dict()

    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # Text conditioning, optionally cached. A map-style dataset is encoded up front and the encoders freed.
    prompt_encoder = PromptEncoder(
        tokenizers,
        text_encoders,
        accelerator.device,
        cache=args.cache_text_embeddings,
        max_entries=args.text_embeddings_cache_size,
    )
    if args.cache_text_embeddings and not args.streaming:
        captions = train_dataset.select_columns([args.caption_column])[args.caption_column]
        captions = [c for c in dict.fromkeys(captions) if isinstance(c, str) and c.strip()]
        captions.append("")  # --proportion_empty_prompts
        if args.text_embeddings_cache_size is not None and len(captions) > args.text_embeddings_cache_size:
            logger.warning(
                f"{len(captions)} distinct captions exceed --text_embeddings_cache_size"
                f" {args.text_embeddings_cache_size}: encoding them on the fly and keeping the text encoders."
            )
        else:
            start = time.perf_counter()
            prompt_encoder.precompute(captions)
            prompt_encoder.release_text_encoders()
            text_encoders = text_encoder_one = text_encoder_two = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.info(
                f"Encoded {len(captions)} distinct captions in {time.perf_counter() - start:.1f}s"
                f" ({prompt_encoder.cache_bytes() / 2**30:.2f} GiB in CPU memory); text encoders freed."
            )

    # Scorers and the consensus
    scorer_set = None
    if args.scored_metrics or args.score_validation:
        scorer_dtype = (
            args.scorer_dtype
            or {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[weight_dtype]
        )
        names = args.scored_metrics or args.reward_model_list
        scorer_set = rewards.build_scorers(
            names,
            config=args.reward_config,
            device=accelerator.device,
            dtype=scorer_dtype,
            offload=args.offload_scorers,
            cuda_graphs=not args.no_scorer_cuda_graphs,
        )
    labeler = balanced_dpo.make_labeler(args, scorer_set)
    bad_examples = preference_data.BadExampleTracker(max_bad_examples, logger=logger)
    progress = balanced_dpo.TrainingProgress()
    generator = balanced_dpo.training_generator(accelerator, args.seed)

    # Checkpoints hold only the LoRA adapters (policy and reference) and the small training state.
    def save_model_hook(models, weights, output_dir):
        for model in models:
            unwrapped = accelerator.unwrap_model(model)
            # Checked on every process, so that all of them stop together instead of waiting for the main one.
            lora_state = balanced_dpo.adapter_state_dict(unwrapped, balanced_dpo.POLICY_ADAPTER)
            balanced_dpo.check_finite_lora(lora_state, f"The LoRA of {os.path.basename(output_dir)}")
            if accelerator.is_main_process:
                StableDiffusionXLPipeline.save_lora_weights(
                    output_dir, unet_lora_layers=lora_state, unet_lora_adapter_metadata=lora_metadata
                )
                if dynamic_reference:
                    balanced_dpo.save_reference_adapter(unwrapped, output_dir)
                balanced_dpo.save_run_state(output_dir, progress, bad_examples, generator, labeler)
            if weights:
                weights.pop()
        balanced_dpo.save_generator_state(output_dir, generator, accelerator.process_index)

    def load_model_hook(models, input_dir):
        while models:
            unwrapped = accelerator.unwrap_model(models.pop())
            lora_state, _ = StableDiffusionXLPipeline.lora_state_dict(input_dir)
            balanced_dpo.load_adapter_state_dict(unwrapped, lora_state, balanced_dpo.POLICY_ADAPTER)
            if dynamic_reference:
                balanced_dpo.load_reference_adapter(unwrapped, input_dir)
            if accelerator.mixed_precision in ("fp16", "bf16"):
                cast_training_params(unwrapped, dtype=torch.float32)
            balanced_dpo.freeze_all_but_policy(unwrapped)
        balanced_dpo.load_run_state(
            input_dir, progress, bad_examples, generator, labeler, process_index=accelerator.process_index
        )

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.scale_lr:
        args.learning_rate = (
            args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        )
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("To use 8-bit Adam, install bitsandbytes: `pip install bitsandbytes`.") from None
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(
        params_to_optimize,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Data pipeline: decoding, joint augmentation (which also records each image's original size and crop for the
    # time ids), scorer preprocessing and tokenization run in the workers.
    transform = preference_data.PairTransform(
        args.resolution, center_crop=not args.random_crop, random_flip=not args.no_hflip
    )
    dataset_kwargs = {
        "transform": transform,
        "caption_column": args.caption_column,
        "image_0_column": args.image_0_column,
        "image_1_column": args.image_1_column,
        "label_0_column": args.label_0_column,
        "proportion_empty_prompts": args.proportion_empty_prompts,
        "drop_human_ties": args.drop_human_ties,
        "scorer_preprocessor": scorer_set.preprocessor if args.scored_metrics else None,
        "seed": args.seed if args.seed is not None else 0,
        "extra_columns": extra_columns,
    }
    if args.streaming:
        pairs = preference_data.StreamingPreferencePairs(
            train_dataset,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            split_by=args.streaming_split,
            **dataset_kwargs,
        )
    else:
        pairs = preference_data.PreferencePairs(train_dataset, **dataset_kwargs)
    train_dataloader = torch.utils.data.DataLoader(
        pairs,
        batch_size=args.train_batch_size,
        shuffle=not args.streaming,
        # Cached text embeddings are looked up by caption: no token ids needed.
        collate_fn=preference_data.PairCollator(
            None if args.cache_text_embeddings else TokenizeCaptions(tokenizers), resolution=args.resolution
        ),
        num_workers=args.dataloader_num_workers,
        worker_init_fn=balanced_dpo.ignore_stop_signals,
        pin_memory=accelerator.device.type == "cuda",  # lets the scorer inputs reach the GPU asynchronously
        drop_last=False,
        # Its own generator, so creating an iterator never draws from the global RNG.
        generator=torch.Generator().manual_seed(args.seed if args.seed is not None else 0),
    )

    if args.streaming:
        num_update_steps_per_epoch = None
    else:
        num_update_steps_per_epoch = math.ceil(
            math.ceil(len(train_dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps
        )
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    if args.streaming:
        # Streaming pairs shard themselves across processes; accelerate would read every row on every rank.
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, train_dataloader, lr_scheduler
        )
        num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    unwrapped_unet = accelerator.unwrap_model(unet)

    if accelerator.is_main_process and args.report_to != "none":
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_name, config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running BalancedDPO training (SDXL) *****")
    logger.info(
        f"  Consensus = {'precomputed' if args.precomputed_consensus else args.consensus}, scored metrics = {args.scored_metrics}"
    )
    logger.info(f"  Pairs per optimizer step = {total_batch_size}, optimizer steps = {args.max_train_steps}")
    logger.info(
        f"  Resolution = {args.resolution}, VAE dtype = {vae_dtype}, turbo timesteps = {args.is_turbo},"
        f" cached text embeddings = {args.cache_text_embeddings}"
    )

    resume_path = balanced_dpo.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"No checkpoint found in {args.output_dir}; starting a new training run.")
    if resume_path is not None:
        logger.info(f"Resuming from checkpoint {resume_path}")
        accelerator.load_state(resume_path)

    # SIGTERM/SIGINT (preemption, Ctrl-C): finish the current optimizer step, save a checkpoint, exit cleanly.
    graceful_stop = balanced_dpo.GracefulStop()

    validation_prompts = balanced_dpo.read_validation_prompts(args.validation_prompts)
    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=progress.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    metrics = balanced_dpo.StepMetrics()
    latent_cache = balanced_dpo.make_latent_cache(args, vae, pairs, accelerator.num_processes, logger)
    step_start = time.perf_counter()
    unet.train()
    interrupted = False

    with graceful_stop:
        while progress.global_step < args.max_train_steps and not interrupted:
            epoch = progress.epoch
            pairs.set_epoch(epoch)
            if hasattr(train_dataloader, "set_epoch"):
                train_dataloader.set_epoch(epoch)
            epoch_loader = train_dataloader
            if progress.batches_in_epoch > 0 and not args.streaming:
                epoch_loader = accelerator.skip_first_batches(train_dataloader, progress.batches_in_epoch)
            elif progress.batches_in_epoch > 0:
                # Skips the rows already trained on without decoding them; the batch order stays the same.
                pairs.skip_batches(progress.batches_in_epoch, args.train_batch_size)
            # Scoring of the next batch overlaps this one's step (on CUDA); see balanced_dpo.score_ahead.
            for batch in balanced_dpo.score_ahead(epoch_loader, args, scorer_set):
                progress.batches_in_epoch += 1
                balanced_dpo.record_bad_examples(accelerator, bad_examples, batch)

                # 1. Consensus label for every pair of the batch.
                label, prob, keep = balanced_dpo.consensus_for_batch(
                    args, accelerator, batch, scorer_set, labeler, metrics
                )
                if balanced_dpo.no_pairs_on_some_process(accelerator, keep):
                    progress.skipped_batches += 1
                    continue  # skipped on every process alike, without touching the optimizer

                # 2. Diffusion-DPO on the kept pairs, winner first.
                with accelerator.accumulate(unet):
                    loss = dpo_step(
                        args,
                        accelerator,
                        batch,
                        label,
                        prob,
                        keep,
                        unet,
                        unwrapped_unet,
                        vae,
                        prompt_encoder,
                        noise_scheduler,
                        weight_dtype,
                        dynamic_reference,
                        metrics,
                        generator,
                        latent_cache,
                    )
                    finite = torch.isfinite(loss.detach()).float()
                    if accelerator.num_processes > 1:
                        finite = accelerator.reduce(finite.to(accelerator.device), "min")
                    if finite.item() > 0:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            grad_norm = accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
                            if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                                finite = torch.zeros(())
                    if finite.item() > 0:
                        optimizer.step()
                        lr_scheduler.step()
                    else:
                        progress.nonfinite_steps += 1
                        logger.warning(f"Non-finite loss or gradient at step {progress.global_step}; step skipped.")
                        if progress.nonfinite_steps >= args.max_nonfinite_steps:
                            raise RuntimeError(
                                f"{progress.nonfinite_steps} non-finite steps in a row. Lower --learning_rate or --beta_dpo,"
                                " use --mixed_precision bf16 instead of fp16, or drop --pretrained_vae_model_name_or_path"
                                " if that VAE is not fp16-safe. The last checkpoint is intact."
                            )
                    optimizer.zero_grad(set_to_none=True)

                if accelerator.sync_gradients:
                    if finite.item() > 0:
                        progress.nonfinite_steps = 0
                    progress.global_step += 1
                    progress_bar.update(1)
                    if dynamic_reference and progress.global_step % args.ref_update_steps == 0:
                        balanced_dpo.update_reference_adapter(unwrapped_unet, args.ref_update_mode, args.ref_ema_decay)

                    metrics.step_seconds = time.perf_counter() - step_start
                    logs = metrics.reduce(accelerator)
                    logs["lr"] = lr_scheduler.get_last_lr()[0]
                    logs["bad_examples"] = bad_examples.num_bad
                    logs["skipped_batches"] = progress.skipped_batches
                    accelerator.log(logs, step=progress.global_step)
                    progress_bar.set_postfix(
                        loss=f"{logs.get('loss', float('nan')):.4f}",
                        acc=f"{logs.get('implicit_acc', float('nan')):.2f}",
                    )
                    metrics.reset()
                    step_start = time.perf_counter()

                    # A stop on the last step simply finishes the run (and writes the final LoRA).
                    stopping = graceful_stop.requested(accelerator) and progress.global_step < args.max_train_steps
                    if stopping or progress.global_step % args.checkpointing_steps == 0:
                        balanced_dpo.save_checkpoint(
                            accelerator, args.output_dir, progress.global_step, args.checkpoints_total_limit, logger
                        )
                    if stopping:
                        logger.info(
                            f"Stopping on a signal at step {progress.global_step}: checkpoint saved. Resume with"
                            " --resume_from_checkpoint latest."
                        )
                        interrupted = True
                        break
                    if validation_prompts and progress.global_step % args.validation_steps == 0:
                        if accelerator.is_main_process:
                            log_validation(
                                args,
                                accelerator,
                                unet,
                                vae,
                                text_encoders,
                                weight_dtype,
                                progress.global_step,
                                validation_prompts,
                                scorer_set if args.score_validation else None,
                            )
                        accelerator.wait_for_everyone()
                    if progress.global_step >= args.max_train_steps:
                        break
            else:
                progress.epoch += 1
                progress.batches_in_epoch = 0
                if args.streaming and progress.global_step == 0 and progress.skipped_batches == 0:
                    raise ValueError("The streaming dataset yielded no usable pairs.")

    if latent_cache is not None:
        logger.info(
            f"Latent cache: {len(latent_cache)} images, {latent_cache.nbytes / 2**30:.2f} GiB; "
            f"{latent_cache.hits} hits, {latent_cache.misses} encodes."
        )
    accelerator.wait_for_everyone()
    if interrupted:
        accelerator.end_training()
        return None

    # Final LoRA, model card and Hub upload.
    lora_path = None
    if accelerator.is_main_process:
        lora_state = balanced_dpo.adapter_state_dict(unwrapped_unet, balanced_dpo.POLICY_ADAPTER)
        balanced_dpo.check_finite_lora(lora_state, "The trained LoRA")
        StableDiffusionXLPipeline.save_lora_weights(
            args.output_dir, unet_lora_layers=lora_state, unet_lora_adapter_metadata=lora_metadata
        )
        lora_path = os.path.join(args.output_dir, "pytorch_lora_weights.safetensors")
        logger.info(f"LoRA weights saved to {lora_path}")

        images, scores = [], {}
        if validation_prompts:
            # The final images come from a fresh pipeline with the saved LoRA: free the training UNet first.
            del unet, unwrapped_unet, optimizer, params_to_optimize
            accelerator.free_memory()
            images, scores = log_validation(
                args,
                accelerator,
                None,
                vae,
                text_encoders,
                weight_dtype,
                progress.global_step,
                validation_prompts,
                scorer_set if args.score_validation else None,
                lora_dir=args.output_dir,
            )
        save_model_card(
            repo_id or Path(args.output_dir).name,
            args,
            images=images,
            validation_scores=scores,
            repo_folder=args.output_dir,
        )
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*", "step_*", "epoch_*"],
                token=args.hub_token,
            )
    accelerator.end_training()
    return lora_path


def dpo_step(
    args,
    accelerator,
    batch,
    label,
    prob,
    keep,
    unet,
    unwrapped_unet,
    vae,
    prompt_encoder,
    noise_scheduler,
    weight_dtype,
    dynamic_reference,
    metrics,
    generator,
    latent_cache=None,
):
    """One micro-step of Diffusion-DPO on the kept pairs of the batch, winner/loser ordered by the consensus."""
    device = accelerator.device
    index, weights = balanced_dpo.kept_pairs(keep)
    weights = weights.to(device)
    label, prob = label[index], prob[index]

    def take(key):
        return batch[key][index.to(batch[key].device)]

    # Winner first, loser second along the batch dimension: pixels and time ids in the same order.
    feed_pixel_values = balanced_dpo.order_by_label(take("pixel_values_0"), take("pixel_values_1"), label)
    feed_pixel_values = feed_pixel_values.to(device, dtype=vae.dtype)
    time_ids = pair_time_ids(take("original_sizes"), take("crop_top_lefts"), label, args.resolution).to(device)
    with torch.no_grad():
        latents = balanced_dpo.encode_pair_latents(
            args, vae, batch, index, label, feed_pixel_values, generator, latent_cache
        )
        latents = latents.to(weight_dtype)  # the stock VAE runs in fp32
        prompt_embeds, pooled_prompt_embeds = prompt_encoder(batch, index)
    unet_kwargs = {
        "encoder_hidden_states": prompt_embeds.to(weight_dtype).repeat(2, 1, 1),
        "added_cond_kwargs": {
            "text_embeds": pooled_prompt_embeds.to(weight_dtype).repeat(2, 1),
            "time_ids": time_ids,
        },
    }
    timesteps = None
    if args.is_turbo:
        timesteps = turbo_timesteps(label.shape[0], noise_scheduler.config.num_train_timesteps, generator)

    return balanced_dpo.diffusion_dpo_loss(
        args,
        unet,
        unwrapped_unet,
        latents,
        unet_kwargs,
        noise_scheduler,
        label,
        prob,
        weights,
        dynamic_reference,
        metrics,
        timesteps=timesteps,
        generator=generator,
    )


if __name__ == "__main__":
    main(parse_args())
