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
"""BalancedDPO: LoRA Diffusion-DPO for FLUX.1 (dev and schnell) with a multi-metric consensus label.

The loss, the consensus, the dynamic reference model and the training loop are those of every family
(`balanced_dpo.py`, `rewards.py`, `training.py`), and the rectified-flow noise, the text-embedding cache and the NF4
base those of both flow-matching families (`flow_matching_family.py`). This file holds what FLUX has of its own: a
CLIP (pooled) and a T5 text encoder, latents packed into 2x2 patches with their position ids, the guidance embedding
of guidance-distilled models (`--guidance_scale`), and sampling that returns packed latents. See README.md.
"""

import torch
from accelerate.logging import get_logger
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.utils import check_min_version
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

import flow_matching_family
import training
import training_args


check_min_version("0.34.0")

logger = get_logger(__name__)

# diffusers' FLUX DreamBooth LoRA example: the attention projections and the feed-forward layers of the double-stream
# blocks (their image and text streams); the single-stream blocks' attention projections match `attn.to_*` too.
FLUX_LORA_TARGET_MODULES = (
    "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,"
    "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"
)
# FLUX.1-dev's guidance value (diffusers' FluxPipeline and FLUX DreamBooth default).
FLUX_GUIDANCE_SCALE = 3.5
# T5 tokens: FluxPipeline's default (dev), and the most FLUX.1-schnell accepts.
FLUX_DEV_MAX_SEQUENCE_LENGTH = 512
FLUX_SCHNELL_MAX_SEQUENCE_LENGTH = 256
# Sampling steps: FLUX.1-dev's model card, and the 1-4 steps schnell was distilled for.
FLUX_DEV_STEPS = 28
FLUX_SCHNELL_STEPS = 4


class TokenizeCaptions:
    """Picklable collate-time tokenizer for FLUX's CLIP and T5 tokenizers, so tokenization runs in the DataLoader
    workers, as `FluxPipeline.encode_prompt` tokenizes (padded to the CLIP length and `max_sequence_length`)."""

    def __init__(self, tokenizers, max_sequence_length):
        self.tokenizers = tokenizers
        self.max_sequence_length = max_sequence_length

    def __call__(self, captions):
        clip, t5 = self.tokenizers
        ids = {}
        for key, tokenizer, length in (
            ("input_ids", clip, clip.model_max_length),
            ("input_ids_2", t5, self.max_sequence_length),
        ):
            ids[key] = tokenizer(
                list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            ).input_ids
        return ids


@torch.no_grad()
def encode_prompt(text_encoders, token_ids):
    """FLUX's text conditioning, as `FluxPipeline.encode_prompt` computes it: T5's last hidden states
    ([B, T, 4096]) and CLIP's pooled output ([B, 768])."""
    clip, t5 = text_encoders
    pooled = clip(token_ids["input_ids"].to(clip.device), output_hidden_states=False).pooler_output
    prompt_embeds = t5(token_ids["input_ids_2"].to(t5.device), output_hidden_states=False)[0]
    return prompt_embeds, pooled


def pack_latents(latents):
    """[B, C, H, W] latents -> FLUX's sequence of 2x2 patches [B, H/2 * W/2, 4C] (FluxPipeline._pack_latents)."""
    batch_size, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch_size, channels, height, width)


def unpack_latents(packed, latent_height, latent_width, vae_scale_factor):
    """The inverse of `pack_latents` for latents of `latent_height` x `latent_width` (FluxPipeline._unpack_latents,
    which takes the image size)."""
    return FluxPipeline._unpack_latents(
        packed, latent_height * vae_scale_factor, latent_width * vae_scale_factor, vae_scale_factor
    )


class FluxFamily(flow_matching_family.FlowMatchingFamily):
    """FLUX.1 dev and schnell: a double- and single-stream transformer on packed latents, CLIP-L (pooled) and T5-XXL
    text encoders, a guidance embedding when the model is guidance-distilled (dev)."""

    pipeline_class = FluxPipeline
    transformer_class = FluxTransformer2DModel
    text_encoder_names = ("text_encoder", "text_encoder_2")
    description = "FLUX.1"
    defaults = {
        "resolution": 1024,
        "train_batch_size": 1,
        "output_dir": "balanced-dpo-flux-lora",
        "lora_target_modules": FLUX_LORA_TARGET_MODULES,
        "validation_inference_steps": FLUX_DEV_STEPS,
        # The same error averaging, target and 1/2 as the SD3 script, whose beta comes from flow_grpo
        # (docs/flow_matching.md).
        "beta_dpo": 100.0,
        # Online rounds sample with the pipeline's own FlowMatchEulerDiscreteScheduler and FLUX.1-dev's guidance.
        "online_scheduler": "",
        "online_guidance_scale": FLUX_GUIDANCE_SCALE,
    }
    model_card_tags = ("flux", "flux-diffusers")

    @classmethod
    def add_arguments(cls, parser):
        super().add_arguments(parser)
        group = parser.add_argument_group("FLUX")
        group.add_argument(
            "--guidance_scale",
            type=float,
            default=FLUX_GUIDANCE_SCALE,
            help="The guidance value a guidance-distilled model (FLUX.1-dev) takes as an input, in training and"
            " validation alike; unused by models without a guidance embedding (FLUX.1-schnell).",
        )

    @classmethod
    def max_sequence_length_help(cls):
        return f"{FLUX_DEV_MAX_SEQUENCE_LENGTH} for guidance-distilled models (dev), {FLUX_SCHNELL_MAX_SEQUENCE_LENGTH} for schnell"

    def resolve_max_sequence_length(self, args):
        if args.max_sequence_length is not None:
            if not self.guidance_embeds and args.max_sequence_length > FLUX_SCHNELL_MAX_SEQUENCE_LENGTH:
                logger.warning(
                    f"--max_sequence_length {args.max_sequence_length}: FLUX.1-schnell was trained with at most"
                    f" {FLUX_SCHNELL_MAX_SEQUENCE_LENGTH} T5 tokens."
                )
            return args.max_sequence_length
        return FLUX_DEV_MAX_SEQUENCE_LENGTH if self.guidance_embeds else FLUX_SCHNELL_MAX_SEQUENCE_LENGTH

    @classmethod
    def load_text_encoders(cls, args, weight_dtype):
        path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
        # The tokenizer classes of FluxPipeline's model_index.json.
        tokenizers = [
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
            T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", revision=revision),
        ]
        text_encoders = [
            CLIPTextModel.from_pretrained(
                path, subfolder="text_encoder", revision=revision, variant=variant, dtype=weight_dtype
            ),
            T5EncoderModel.from_pretrained(
                path, subfolder="text_encoder_2", revision=revision, variant=variant, dtype=weight_dtype
            ),
        ]
        return tokenizers, text_encoders

    def tokenizer_fn(self):
        return TokenizeCaptions(self.tokenizers, self.max_sequence_length)

    def encode(self, token_ids):
        return encode_prompt(self.text_encoders, token_ids)

    def conditioning_kwargs(self, embeddings):
        prompt_embeds, pooled_prompt_embeds = embeddings
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}

    def predict(self, model, noised, conditioning):
        """The velocity of `noised` ([2P, C, H, W]), unpacked: the transformer sees packed latents with their image
        position ids, zero text ids (as FluxPipeline gives it), sigma as its timestep and, when distilled, the
        guidance value."""
        latents = noised.model_input
        batch_size, _, height, width = latents.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch_size, height // 2, width // 2, latents.device, latents.dtype
        )
        encoder_hidden_states = conditioning["encoder_hidden_states"]
        text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((batch_size,), self.args.guidance_scale, device=latents.device, dtype=torch.float32)
        packed = model(
            hidden_states=pack_latents(latents),
            # The transformer multiplies by 1000: it takes sigma, as FluxPipeline passes timestep / 1000.
            timestep=noised.timesteps / self.noise_scheduler.config.num_train_timesteps,
            guidance=guidance,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
            **conditioning,
        )[0]
        return unpack_latents(packed, height, width, self.vae_scale_factor)

    def pipeline_prompt_kwargs(self, prompts):
        embeds, pooled = self.prompt_embeddings.lookup(prompts)
        return {"prompt_embeds": embeds.to(self.weight_dtype), "pooled_prompt_embeds": pooled.to(self.weight_dtype)}

    def sample_latents(self, pipeline, prompts, generators, num_inference_steps, guidance_scale):
        """FluxPipeline returns packed latents with output_type="latent": unpacked here into the training space."""
        packed = super().sample_latents(pipeline, prompts, generators, num_inference_steps, guidance_scale)
        side = 2 * (self.args.resolution // (self.vae_scale_factor * 2))
        return unpack_latents(packed, side, side, self.vae_scale_factor)

    def validation_call_kwargs(self):
        default_steps = FLUX_DEV_STEPS if self.guidance_embeds else FLUX_SCHNELL_STEPS
        return {
            "num_inference_steps": self.args.validation_inference_steps or default_steps,
            "guidance_scale": self.args.guidance_scale,
        }

    def default_license_fields(self):
        # FLUX.1-dev: the FLUX.1 [dev] Non-Commercial License (its model card: license other); FLUX.1-schnell:
        # Apache 2.0. The base model card's own licence takes precedence when it can be read.
        if not self.guidance_embeds:
            return {"license": "apache-2.0"}
        return {
            "license": "other",
            "license_name": "flux-1-dev-non-commercial-license",
            "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
        }

    def model_card_notes(self):
        args = self.args
        guidance = f"guidance {args.guidance_scale}" if self.guidance_embeds else "no guidance embedding (schnell)"
        notes = f"- rectified flow: sigma from `{args.weighting_scheme}`, {self.max_sequence_length} T5 tokens, {guidance}\n"
        if args.quantize_base:
            notes += f"- trained on a {args.quantize_base.upper()}-quantized base transformer\n"
        return notes

    def usage_snippet(self, repo_id):
        call = self.validation_call_kwargs()
        guidance = call["guidance_scale"] if self.guidance_embeds else 0.0
        return f"""```python
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained("{self.args.pretrained_model_name_or_path}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo_id}")
image = pipe(
    "a photo of an astronaut riding a horse",
    num_inference_steps={call["num_inference_steps"]},
    guidance_scale={guidance},
    max_sequence_length={self.max_sequence_length},
).images[0]
```"""


def parse_args(input_args=None):
    return training_args.parse_args(FluxFamily, input_args)


def main(args):
    return training.train(args, FluxFamily)


if __name__ == "__main__":
    main(parse_args())
