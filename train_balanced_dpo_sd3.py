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
"""BalancedDPO: LoRA Diffusion-DPO for Stable Diffusion 3 / 3.5 with a multi-metric consensus label.

The loss, the consensus, the dynamic reference model and the training loop are those of every family
(`balanced_dpo.py`, `rewards.py`, `training.py`), and the rectified-flow noise, the text-embedding cache and the NF4
base those of both flow-matching families (`flow_matching_family.py`). This file holds what SD3 has of its own: three
text encoders (two CLIPs with projections and T5) and how the pipeline combines them, the MMDiT's inputs, and the
pipeline call with classifier-free guidance. See README.md.
"""

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils import check_min_version
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

import flow_matching_family
import training
import training_args


check_min_version("0.34.0")

# diffusers' SD3 DreamBooth LoRA example: every attention projection of the joint (image and text) attention.
SD3_LORA_TARGET_MODULES = (
    "attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,attn.to_out.0,attn.to_q,attn.to_v"
)
# StableDiffusion3Pipeline's default guidance, and the one flow_grpo samples SD3.5-Medium with.
SD3_GUIDANCE_SCALE = 7.0
SD35_GUIDANCE_SCALE = 4.5


class TokenizeCaptions:
    """Picklable collate-time tokenizer for SD3's three tokenizers, so tokenization runs in the DataLoader workers.

    The CLIP prompts are padded to the CLIP length (77) and T5's to `max_sequence_length`, with truncation, as
    `StableDiffusion3Pipeline.encode_prompt` tokenizes them."""

    def __init__(self, tokenizers, max_sequence_length):
        self.tokenizers = tokenizers
        self.max_sequence_length = max_sequence_length

    def __call__(self, captions):
        clip_1, clip_2, t5 = self.tokenizers
        ids = {}
        for key, tokenizer, length in (
            ("input_ids", clip_1, clip_1.model_max_length),
            ("input_ids_2", clip_2, clip_1.model_max_length),  # the pipeline pads both CLIPs to tokenizer 1's length
            ("input_ids_3", t5, self.max_sequence_length),
        ):
            ids[key] = tokenizer(
                list(captions),
                padding="max_length",
                max_length=length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
        return ids


@torch.no_grad()
def encode_prompt(text_encoders, token_ids):
    """SD3's text conditioning, as `StableDiffusion3Pipeline.encode_prompt` computes it (no clip skip).

    The penultimate hidden states of the two CLIP encoders are concatenated (768 + 1280 channels for SD3), zero-padded
    to T5's width (4096) and put before T5's last hidden states along the sequence: [B, 77 + T, 4096]. The pooled
    embedding is the concatenation of both CLIPs' projected outputs: [B, 768 + 1280].
    """
    clip_embeds, pooled = [], []
    for encoder, key in zip(text_encoders[:2], ("input_ids", "input_ids_2")):
        output = encoder(token_ids[key].to(encoder.device), output_hidden_states=True)
        pooled.append(output[0])
        clip_embeds.append(output.hidden_states[-2])
    t5 = text_encoders[2]
    t5_embeds = t5(token_ids["input_ids_3"].to(t5.device))[0]
    clip_embeds = torch.cat(clip_embeds, dim=-1)
    clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    prompt_embeds = torch.cat([clip_embeds.to(t5_embeds.dtype), t5_embeds], dim=-2)
    return prompt_embeds, torch.cat(pooled, dim=-1)


class StableDiffusion3Family(flow_matching_family.FlowMatchingFamily):
    """SD3 and SD3.5 (Medium, Large): MMDiT transformer, CLIP-L + CLIP-G + T5-XXL text encoders, pooled projections."""

    pipeline_class = StableDiffusion3Pipeline
    transformer_class = SD3Transformer2DModel
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    description = "Stable Diffusion 3 / 3.5"
    # diffusers' SD3 DreamBooth example trains with 77 T5 tokens, as SD3 itself was trained.
    default_max_sequence_length = 77
    defaults = {
        "resolution": 1024,
        "train_batch_size": 4,
        "output_dir": "balanced-dpo-sd3-lora",
        "lora_target_modules": SD3_LORA_TARGET_MODULES,
        "validation_inference_steps": 28,
        # flow_grpo's SD3.5-Medium DPO: errors averaged over channels and pixels, the same 1/2 (docs/flow_matching.md).
        "beta_dpo": 100.0,
        # Online rounds sample with the pipeline's own FlowMatchEulerDiscreteScheduler.
        "online_scheduler": "",
        "online_guidance_scale": SD35_GUIDANCE_SCALE,
    }
    model_card_tags = ("sd3", "sd3-diffusers")

    @classmethod
    def add_arguments(cls, parser):
        super().add_arguments(parser)
        group = parser.add_argument_group("SD3")
        group.add_argument(
            "--validation_guidance_scale",
            type=float,
            default=SD3_GUIDANCE_SCALE,
            help="Classifier-free guidance of validation images (StableDiffusion3Pipeline's default 7.0; the SD3.5"
            " model cards use 3.5 to 4.5).",
        )

    @classmethod
    def load_text_encoders(cls, args, weight_dtype):
        path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
        # The tokenizer classes of StableDiffusion3Pipeline's model_index.json.
        tokenizers = [
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision),
            T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", revision=revision),
        ]
        text_encoders = [
            CLIPTextModelWithProjection.from_pretrained(
                path, subfolder=subfolder, revision=revision, variant=variant, dtype=weight_dtype
            )
            for subfolder in ("text_encoder", "text_encoder_2")
        ]
        text_encoders.append(
            T5EncoderModel.from_pretrained(
                path, subfolder="text_encoder_3", revision=revision, variant=variant, dtype=weight_dtype
            )
        )
        return tokenizers, text_encoders

    def tokenizer_fn(self):
        return TokenizeCaptions(self.tokenizers, self.max_sequence_length)

    def encode(self, token_ids):
        return encode_prompt(self.text_encoders, token_ids)

    def conditioning_kwargs(self, embeddings):
        prompt_embeds, pooled_prompt_embeds = embeddings
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}

    def predict(self, model, noised, conditioning):
        # SD3 takes the timestep in [0, 1000] (sigma * 1000), as its pipeline passes the scheduler's timesteps.
        return model(hidden_states=noised.model_input, timestep=noised.timesteps, return_dict=False, **conditioning)[0]

    def pipeline_prompt_kwargs(self, prompts):
        embeds, pooled = self.prompt_embeddings.lookup(prompts)
        negative, negative_pooled = self.prompt_embeddings.lookup([""] * len(prompts))
        # The pipeline's own negative prompt is "" too; giving its embeddings keeps guidance free of the encoders.
        return {
            "prompt_embeds": embeds.to(self.weight_dtype),
            "pooled_prompt_embeds": pooled.to(self.weight_dtype),
            "negative_prompt_embeds": negative.to(self.weight_dtype),
            "negative_pooled_prompt_embeds": negative_pooled.to(self.weight_dtype),
        }

    def validation_call_kwargs(self):
        args = self.args
        return {
            "num_inference_steps": args.validation_inference_steps or self.defaults["validation_inference_steps"],
            "guidance_scale": args.validation_guidance_scale,
        }

    def default_license_fields(self):
        # The licence SD3 Medium and the SD3.5 models are released under (their model cards: license other); the
        # base model card's own licence takes precedence when it can be read.
        return {
            "license": "other",
            "license_name": "stabilityai-ai-community",
            "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md",
        }

    def model_card_notes(self):
        args = self.args
        notes = (
            f"- rectified flow: sigma from `{args.weighting_scheme}`, {self.max_sequence_length} T5 tokens;"
            f" validation with guidance {args.validation_guidance_scale}\n"
        )
        if args.quantize_base:
            notes += f"- trained on a {args.quantize_base.upper()}-quantized base transformer\n"
        return notes

    def usage_snippet(self, repo_id):
        args = self.args
        return f"""```python
import torch
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained("{args.pretrained_model_name_or_path}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo_id}")
image = pipe(
    "a photo of an astronaut riding a horse",
    num_inference_steps={self.validation_call_kwargs()["num_inference_steps"]},
    guidance_scale={args.validation_guidance_scale},
    max_sequence_length={self.max_sequence_length},
).images[0]
```"""


def parse_args(input_args=None):
    return training_args.parse_args(StableDiffusion3Family, input_args)


def main(args):
    return training.train(args, StableDiffusion3Family)


if __name__ == "__main__":
    main(parse_args())
