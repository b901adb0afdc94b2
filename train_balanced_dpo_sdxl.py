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

The loss, the consensus, the dynamic reference model and the training loop are those of every family
(`balanced_dpo.py`, `rewards.py`, `training.py`); this file holds what SDXL needs of its own: two text encoders (with
optionally cached embeddings), per-image micro-conditioning, an optional fp16-safe VAE, SDXL-Turbo's timestep grid
and a zero-terminal-SNR schedule made safe for epsilon prediction. See README.md.
"""

import functools
import gc
import time

import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import check_min_version
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

import balanced_dpo
import text_embeddings
import training
import training_args


check_min_version("0.34.0")

logger = get_logger(__name__)

# SDXL-Turbo was distilled for 1-4 sampling steps on the "trailing" grid 249, 499, 749, 999.
TURBO_NUM_STEPS = 4
# The floor diffusers' Euler schedulers put on a zero terminal alpha_bar at inference (fp16's smallest subnormal).
ZERO_SNR_ALPHA_CUMPROD = 2**-24
TEXT_ENCODE_BATCH_SIZE = 64


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


def encode_token_ids(text_encoders, token_ids):
    """`encode_prompt` of the token ids `TokenizeCaptions` made (`input_ids`, `input_ids_2`)."""
    return encode_prompt(text_encoders, [token_ids["input_ids"], token_ids["input_ids_2"]])


def prompt_embeddings(tokenizers, text_encoders, device, cache=False, max_entries=None):
    """SDXL's captions -> `(prompt_embeds, pooled_prompt_embeds)` on the training device, encoded every micro-step or,
    with `cache=True`, once per distinct caption (`text_embeddings.PromptEmbeddings`)."""
    return text_embeddings.PromptEmbeddings(
        TokenizeCaptions(tokenizers),
        functools.partial(encode_token_ids, tuple(text_encoders)),
        device,
        cache=cache,
        max_entries=max_entries,
    )


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


class StableDiffusionXLFamily(training.ModelFamily):
    """SDXL and SDXL-Turbo: UNet with two CLIP text encoders, pooled embeddings and time ids, DDPM noise."""

    pipeline_class = StableDiffusionXLPipeline
    denoiser_name = "unet"
    description = "Stable Diffusion XL"
    defaults = {
        "resolution": 1024,
        "train_batch_size": 8,
        "output_dir": "balanced-dpo-sdxl-lora",
        "lora_target_modules": "to_k,to_q,to_v,to_out.0",
        "validation_inference_steps": 25,
    }
    model_card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")

    @classmethod
    def add_arguments(cls, parser):
        group = parser.add_argument_group("SDXL")
        group.add_argument(
            "--pretrained_vae_model_name_or_path",
            type=str,
            default=None,
            help=(
                "A VAE to use instead of the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix. It runs in the training"
                " precision; the pipeline's own SDXL VAE overflows in fp16 and always runs in fp32."
            ),
        )
        group.add_argument(
            "--is_turbo",
            action="store_true",
            help="The model is SDXL-Turbo: train on its 4-step timestep grid (249, 499, 749, 999) and validate with 4"
            " steps and no guidance (use --resolution 512).",
        )
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

    @classmethod
    def validate_args(cls, args):
        if args.text_embeddings_cache_size is not None:
            if not args.cache_text_embeddings:
                raise ValueError("--text_embeddings_cache_size needs --cache_text_embeddings.")
            if args.text_embeddings_cache_size < 1:
                raise ValueError("--text_embeddings_cache_size must be a positive number of captions.")

    def __init__(self, args, unet, vae, text_encoders, tokenizers, noise_scheduler, weight_dtype):
        super().__init__(args, unet, vae, weight_dtype)
        self.text_encoders = tuple(text_encoders)
        self.tokenizers = list(tokenizers)
        self.noise_scheduler = noise_scheduler
        self.prompt_embeddings = prompt_embeddings(
            self.tokenizers,
            self.text_encoders,
            unet.device,
            cache=getattr(args, "cache_text_embeddings", False),
            max_entries=getattr(args, "text_embeddings_cache_size", None),
        )

    @classmethod
    def from_pretrained(cls, args, device, weight_dtype):
        path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
        noise_scheduler = load_noise_scheduler(args)
        tokenizers = [
            AutoTokenizer.from_pretrained(path, subfolder=subfolder, revision=revision, use_fast=False)
            for subfolder in ("tokenizer", "tokenizer_2")
        ]
        text_encoders = (
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, variant=variant),
            CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", revision=revision, variant=variant
            ),
        )
        if args.pretrained_vae_model_name_or_path is None:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant)
            vae_dtype = torch.float32  # the stock SDXL VAE produces inf/NaN in fp16
        else:
            vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, revision=revision)
            vae_dtype = weight_dtype
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant)
        for model in (unet, vae, *text_encoders):
            model.requires_grad_(False)
        for model in (unet, *text_encoders):
            model.to(device, dtype=weight_dtype)
        vae.to(device, dtype=vae_dtype)
        logger.info(
            f"SDXL: resolution {args.resolution}, VAE dtype {vae_dtype}, turbo timesteps {args.is_turbo},"
            f" cached text embeddings {args.cache_text_embeddings}"
        )
        return cls(args, unet, vae, text_encoders, tokenizers, noise_scheduler, weight_dtype)

    def prepare(self, train_dataset, streaming, prompts=()):
        """With --cache_text_embeddings on a map-style dataset (or the prompts of an online run), encodes every
        caption now and frees the encoders."""
        args = self.args
        if not args.cache_text_embeddings or streaming:
            return  # streams are encoded on first sight
        captions = list(prompts)
        if train_dataset is not None:
            captions += train_dataset.select_columns([args.caption_column])[args.caption_column]
        captions = [c for c in dict.fromkeys(captions) if isinstance(c, str) and c.strip()]
        captions.append("")  # --proportion_empty_prompts
        if args.text_embeddings_cache_size is not None and len(captions) > args.text_embeddings_cache_size:
            logger.warning(
                f"{len(captions)} distinct captions exceed --text_embeddings_cache_size"
                f" {args.text_embeddings_cache_size}: encoding them on the fly and keeping the text encoders."
            )
            return
        start = time.perf_counter()
        self.prompt_embeddings.precompute(captions, batch_size=TEXT_ENCODE_BATCH_SIZE)
        self.prompt_embeddings.release_text_encoders()
        self.text_encoders = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info(
            f"Encoded {len(captions)} distinct captions in {time.perf_counter() - start:.1f}s"
            f" ({self.prompt_embeddings.cache_bytes() / 2**30:.2f} GiB in CPU memory); text encoders freed."
        )

    def tokenize_fn(self):
        # Cached text embeddings are looked up by caption: no token ids needed.
        return None if self.prompt_embeddings.cached else TokenizeCaptions(self.tokenizers)

    def conditioning(self, batch, index, label):
        def take(key):
            return batch[key][index.to(batch[key].device)]

        # Time ids in the order of the latents: winners first, then losers, each from its own image's size and crop.
        time_ids = pair_time_ids(take("original_sizes"), take("crop_top_lefts"), label, self.args.resolution)
        prompt_embeds, pooled_prompt_embeds = self.prompt_embeddings(batch, index)
        return {
            "encoder_hidden_states": prompt_embeds.to(self.weight_dtype).repeat(2, 1, 1),
            "added_cond_kwargs": {
                "text_embeds": pooled_prompt_embeds.to(self.weight_dtype).repeat(2, 1),
                "time_ids": time_ids.to(self.denoiser.device),
            },
        }

    def noised_pairs(self, latents, generator):
        timesteps = None
        if self.args.is_turbo:
            timesteps = turbo_timesteps(
                latents.shape[0] // 2, self.noise_scheduler.config.num_train_timesteps, generator
            )
        return balanced_dpo.ddpm_noised_pairs(self.noise_scheduler, latents, generator, timesteps)

    def predict(self, model, noised, conditioning):
        return model(noised.model_input, noised.timesteps, return_dict=False, **conditioning)[0]

    def validation_pipeline(self, lora_dir=None):
        """The training VAE (fp32 unless an fp16-safe one was given) and, when still loaded, the training text
        encoders are reused."""
        args = self.args
        components = {"vae": self.vae}
        if self.text_encoders is not None:
            components["text_encoder"], components["text_encoder_2"] = self.text_encoders
        if lora_dir is None:
            components["unet"] = self.denoiser
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            args.pretrained_model_name_or_path,
            revision=args.revision,
            variant=args.variant,
            torch_dtype=self.weight_dtype,
            **components,
        )
        if lora_dir is not None:
            pipeline.load_lora_weights(lora_dir, weight_name=training.LORA_WEIGHTS_NAME)
        return pipeline

    def validation_call_kwargs(self):
        steps = self.args.validation_inference_steps or (TURBO_NUM_STEPS if self.args.is_turbo else 25)
        return {"num_inference_steps": steps, **({"guidance_scale": 0.0} if self.args.is_turbo else {})}

    def default_license(self):
        return "openrail++"

    def model_card_notes(self):
        args = self.args
        notes = ""
        if args.is_turbo:
            notes += "- SDXL-Turbo: timesteps on its 4-step grid (249, 499, 749, 999)\n"
        if args.pretrained_vae_model_name_or_path is not None:
            notes += f"- VAE used for training: `{args.pretrained_vae_model_name_or_path}`\n"
        return notes

    def usage_snippet(self, repo_id):
        args = self.args
        vae_load, vae_arg = "", ""
        if args.pretrained_vae_model_name_or_path is not None:
            vae_load = (
                "from diffusers import AutoencoderKL\n\n"
                f'vae = AutoencoderKL.from_pretrained("{args.pretrained_vae_model_name_or_path}", torch_dtype=torch.float16)\n'
            )
            vae_arg = "vae=vae, "
        call = (
            'pipe("a photo of an astronaut riding a horse", num_inference_steps=4, guidance_scale=0.0).images[0]'
            if args.is_turbo
            else 'pipe("a photo of an astronaut riding a horse").images[0]'
        )
        return f"""```python
import torch
from diffusers import DiffusionPipeline
{vae_load}
pipe = DiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}", {vae_arg}torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{repo_id}")
image = {call}
```"""


def parse_args(input_args=None):
    return training_args.parse_args(StableDiffusionXLFamily, input_args)


def main(args):
    return training.train(args, StableDiffusionXLFamily)


if __name__ == "__main__":
    main(parse_args())
