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
"""BalancedDPO: LoRA Diffusion-DPO for Stable Diffusion 1.x / 2.x with a multi-metric consensus label.

Every pair is scored on the fly by several reward models (PickScore, HPSv2, CLIP score, LAION aesthetics, ...);
`rewards.py` turns the scores into one consensus label (majority vote by default) and the pair is trained with the
Diffusion-DPO loss in that order. This file holds what is Stable Diffusion's own (its models, CLIP text
conditioning, DDPM noise with an epsilon or v-prediction target, its pipeline); the training loop is `training.py`.
See README.md.
"""

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import check_min_version
from transformers import AutoTokenizer, CLIPTextModel

import balanced_dpo
import training
import training_args


check_min_version("0.34.0")


class TokenizeCaptions:
    """Picklable collate-time tokenizer, so tokenization runs in the DataLoader workers."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, captions):
        ids = self.tokenizer(
            list(captions),
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return {"input_ids": ids}


def encode_prompt(text_encoder, input_ids):
    """The UNet's cross-attention conditioning: the last hidden states of the CLIP text encoder."""
    return text_encoder(input_ids.to(text_encoder.device), return_dict=False)[0]


class StableDiffusionFamily(training.ModelFamily):
    """Stable Diffusion 1.x / 2.x: UNet, one CLIP text encoder, DDPM noise, epsilon or v-prediction."""

    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"
    description = "Stable Diffusion 1.x / 2.x"
    defaults = {
        "resolution": 512,
        "train_batch_size": 16,
        "output_dir": "balanced-dpo-lora",
        "lora_target_modules": "to_k,to_q,to_v,to_out.0",
        "validation_inference_steps": 25,
    }
    model_card_tags = ("stable-diffusion", "stable-diffusion-diffusers")

    def __init__(self, args, unet, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype):
        super().__init__(args, unet, vae, weight_dtype)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler

    @classmethod
    def from_pretrained(cls, args, device, weight_dtype):
        path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision, use_fast=False)
        text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", revision=revision, variant=variant
        )
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant)
        for model in (unet, vae, text_encoder):
            model.requires_grad_(False)
            model.to(device, dtype=weight_dtype)
        return cls(args, unet, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype)

    def tokenize_fn(self):
        return TokenizeCaptions(self.tokenizer)

    def conditioning(self, batch, index, label):
        input_ids = batch["input_ids"][index.to(batch["input_ids"].device)]
        return {"encoder_hidden_states": encode_prompt(self.text_encoder, input_ids).repeat(2, 1, 1)}

    def noised_pairs(self, latents, generator):
        return balanced_dpo.ddpm_noised_pairs(self.noise_scheduler, latents, generator)

    def predict(self, model, noised, conditioning):
        return model(noised.model_input, noised.timesteps, return_dict=False, **conditioning)[0]

    def validation_pipeline(self, lora_dir=None):
        args = self.args
        components = {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        if lora_dir is None:
            components["unet"] = self.denoiser
        pipeline = StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path,
            revision=args.revision,
            variant=args.variant,
            torch_dtype=self.weight_dtype,
            safety_checker=None,
            **components,
        )
        if lora_dir is not None:
            pipeline.load_lora_weights(lora_dir, weight_name=training.LORA_WEIGHTS_NAME)
        return pipeline

    def default_license(self):
        # SD 2.x (OpenCLIP-H text encoder, 1024-wide cross-attention) is released under openrail++.
        if self.text_encoder.config.hidden_size == 1024:
            return "openrail++"
        return "creativeml-openrail-m"


def parse_args(input_args=None):
    return training_args.parse_args(StableDiffusionFamily, input_args)


def main(args):
    return training.train(args, StableDiffusionFamily)


if __name__ == "__main__":
    main(parse_args())
