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
"""Builds tiny random stand-ins for every model and dataset a real run downloads from the Hub.

Everything is written in the real on-disk formats (diffusers pipeline folders, transformers model folders with
a real CLIP tokenizer, open_clip checkpoints, parquet files in the Pick-a-Pic v2 layout) so that tests and the
quickstart go through exactly the loading code a real run uses, offline.

    python tiny_assets.py --output_dir tiny_assets [--sd3] [--flux]

writes `sd/`, `sdxl/`, `scorers/` (plus `scorers/reward_config.json`) and `pickapic/` under the output dir, and with
`--sd3` / `--flux` the flow-matching pipelines `sd3/` and `flux/` (whose T5 tokenizers are trained on the spot).
"""

import argparse
import gzip
import io
import json
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode():
    """CLIP's reversible byte -> printable unicode table (the same table GPT-2 and open_clip use)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(output_dir, pad_token="<|endoftext|>", model_max_length=77):
    """Writes the real 49,408-token CLIP BPE tokenizer (vocab.json, merges.txt) from the copy open_clip ships.

    The result loads with `transformers.CLIPTokenizer.from_pretrained(output_dir)` and tokenizes exactly like the
    tokenizers of Stable Diffusion, CLIP and PickScore, without the Hub.
    """
    import open_clip

    bpe_path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(bpe_path) as f:
        merges = f.read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(output_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(
        os.path.join(output_dir, "vocab.json"),
        os.path.join(output_dir, "merges.txt"),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer


# A vocabulary for the tiny T5 tokenizers: the words of the tiny dataset's captions, of the validation prompts the
# tests and the quickstart use, and every letter, so that any caption tokenizes into known pieces.
_T5_CORPUS_WORDS = (
    "a an the of on in with and photo image background picture astronaut riding horse watercolor fox snow cat dog"
    " red green blue yellow purple orange white black grey gray circle square triangle shape"
)


def write_t5_tokenizer(output_dir, vocab_size=160, model_max_length=512):
    """Trains a small T5 tokenizer offline and saves it in the folder format of the real ones (`tokenizer.json`).

    It is a SentencePiece-style Unigram model, as T5's is, with T5's special tokens at T5's ids (`<pad>` 0, `</s>` 1,
    `<unk>` 2), trained with the `tokenizers` library on caption-like text; `T5TokenizerFast.from_pretrained` loads
    it. The training is deterministic, so every build gives the same vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    words = _T5_CORPUS_WORDS.split()
    corpus = [" ".join(words[i : i + 6]) for i in range(len(words))]
    corpus += [" ".join(words)] * 4 + [" ".join(chr(c) for c in range(ord("a"), ord("z") + 1))]
    corpus += [" ".join(str(d) for d in range(10)) + " , . ! ? ' -"]
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    unigram.train_from_iterator(corpus, trainer)
    # T5 appends </s> and decodes the metaspace; the whole pipeline is built here, so that transformers 4.x (which
    # cannot make a fast T5 tokenizer from a bare vocabulary) and 5.x load the same tokenizer.json.
    unigram.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    unigram.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer = T5TokenizerFast(
        tokenizer_object=unigram,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def _tiny_t5_encoder(vocab_size):
    """A two-layer T5 v1.1-style encoder (gated GELU), the architecture of the T5-XXL encoder of SD3 and FLUX."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion pipelines
# ----------------------------------------------------------------------------------------------------------------


def _tiny_clip_text_config(projection_dim=None, hidden_size=32):
    from transformers import CLIPTextConfig

    kwargs = {"projection_dim": projection_dim} if projection_dim is not None else {}
    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="gelu",
        **kwargs,
    )


def _tiny_vae(latent_channels=4, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=32,
        **config,
    )


def _tiny_flow_vae(shift_factor, scaling_factor):
    """The SD3 / FLUX VAE layout: 16 latent channels, a shift and a scale, no quant convs."""
    return _tiny_vae(
        latent_channels=16,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_sd_pipeline(output_dir, prediction_type="epsilon", seed=0):
    """A tiny Stable Diffusion 1.x/2.x pipeline folder that `StableDiffusionPipeline.from_pretrained` loads."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_tiny_clip_text_config())
    tokenizer = write_clip_tokenizer(os.path.join(output_dir, "tokenizer"))
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(output_dir)
    return output_dir


def build_tiny_sdxl_pipeline(output_dir, seed=0):
    """A tiny SDXL pipeline folder (two text encoders, `text_time` UNet) that `StableDiffusionXLPipeline` loads."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text embedding
        cross_attention_dim=64,  # 32 + 32 penultimate hidden states
        norm_num_groups=16,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_tiny_clip_text_config(projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_text_config(projection_dim=32))
    tokenizer = write_clip_tokenizer(os.path.join(output_dir, "tokenizer"))
    tokenizer_2 = write_clip_tokenizer(os.path.join(output_dir, "tokenizer_2"), pad_token="!")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )
    pipe.save_pretrained(output_dir)
    return output_dir


# ----------------------------------------------------------------------------------------------------------------
# Flow-matching pipelines (SD3 / SD3.5, FLUX.1)
# ----------------------------------------------------------------------------------------------------------------


def build_tiny_sd3_pipeline(output_dir, seed=0):
    """A tiny SD3.5-style pipeline folder that `StableDiffusion3Pipeline.from_pretrained` loads: two CLIP text encoders
    with projections, a T5 encoder, an MMDiT with SD3.5's dual-attention block and QK RMS norm, the 16-channel VAE
    with SD3's shift and scale, and SD3's shifted flow-matching schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(os.path.join(output_dir, "tokenizer"))
    tokenizer_2 = write_clip_tokenizer(os.path.join(output_dir, "tokenizer_2"))
    tokenizer_3 = write_t5_tokenizer(os.path.join(output_dir, "tokenizer_3"))
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,  # the T5 width; the two CLIPs' 16 + 16 are padded to it
            caption_projection_dim=32,
            pooled_projection_dim=32,  # the two CLIPs' 16 + 16 projections
            out_channels=16,
            pos_embed_max_size=32,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_flow_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(_tiny_clip_text_config(projection_dim=16, hidden_size=16)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_text_config(projection_dim=16, hidden_size=16)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_tiny_t5_encoder(len(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(output_dir)
    return output_dir


def build_tiny_flux_pipeline(output_dir, seed=0, guidance_embeds=True):
    """A tiny FLUX.1 pipeline folder that `FluxPipeline.from_pretrained` loads: a CLIP text encoder (pooled), a T5
    encoder, a transformer with double- and single-stream blocks and 3-axis RoPE, the 16-channel VAE with FLUX's shift
    and scale, and FLUX's resolution-dependent flow-matching schedule. `guidance_embeds=True` is FLUX.1-dev's
    guidance-distilled layout, False FLUX.1-schnell's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(os.path.join(output_dir, "tokenizer"))
    tokenizer_2 = write_t5_tokenizer(os.path.join(output_dir, "tokenizer_2"))
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels x a 2 x 2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(_tiny_clip_text_config()),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_t5_encoder(len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(output_dir)
    return output_dir


# ----------------------------------------------------------------------------------------------------------------
# Scorers (tiny random versions of every built-in reward model, in their real file formats)
# ----------------------------------------------------------------------------------------------------------------


_TINY_SCORER_IMAGE_SIZE = 32  # every tiny scorer sees 32x32 inputs, so the CLIP-style ones share one preprocessing
_TINY_PROJECTION_DIM = 16


def _reinit_large(module, seed, std=0.5):
    """Re-draws weight matrices, embeddings and biases with a large std (LayerNorms stay at 1/0): default tiny
    initialisations give nearly equal scores to different images, and tests need real preferences."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            is_norm = "norm" in name.lower() or "ln_" in name or name.startswith("ln")
            if name.endswith("logit_scale") or (is_norm and param.ndim == 1):
                continue
            if param.ndim >= 2 or "embedding" in name or "class_embedding" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std / max(1.0, param.shape[-1] ** 0.25))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _write_tiny_clip_dir(output_dir, seed, logit_scale=float(np.log(100.0)), with_processor=True):
    """A tiny transformers CLIPModel folder, plus (`with_processor`) a saved CLIPProcessor: the real CLIP tokenizer and
    a CLIP image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    text_config = _tiny_clip_text_config(projection_dim=_TINY_PROJECTION_DIM, hidden_size=16).to_dict()
    text_config["num_attention_heads"] = 2
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": _TINY_SCORER_IMAGE_SIZE,
        "patch_size": 8,
        "projection_dim": _TINY_PROJECTION_DIM,
        "hidden_act": "gelu",
    }
    config = CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=_TINY_PROJECTION_DIM,
        logit_scale_init_value=logit_scale,
    )
    model = CLIPModel(config).eval()
    _reinit_large(model, seed)
    model.save_pretrained(output_dir)
    if not with_processor:
        return output_dir
    tokenizer = write_clip_tokenizer(output_dir)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _TINY_SCORER_IMAGE_SIZE},
        crop_size={"height": _TINY_SCORER_IMAGE_SIZE, "width": _TINY_SCORER_IMAGE_SIZE},
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output_dir)
    return output_dir


def _write_tiny_hpsv2(output_dir, seed):
    """An open_clip model-config JSON plus a `{"state_dict": ...}` checkpoint, like HPS_v2.1_compressed.pt."""
    import open_clip

    os.makedirs(output_dir, exist_ok=True)
    config_path = os.path.join(output_dir, "tiny-hpsv2-vit.json")
    model_config = {
        "embed_dim": _TINY_PROJECTION_DIM,
        "vision_cfg": {
            "image_size": _TINY_SCORER_IMAGE_SIZE,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    }
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(model_config, f, indent=2)
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-hpsv2-vit", pretrained=None).eval()
    _reinit_large(model, seed + 1)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(100.0)))  # HPS v2 checkpoints have a scale of about 100
    checkpoint_path = os.path.join(output_dir, "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": model.state_dict()}, checkpoint_path)
    return config_path, checkpoint_path


def _random_linear_stack(dims, generator, indices=(0, 2, 4, 6, 7), prefix="layers.", last_bias=0.0, gain=1.0):
    """`layers.N.weight/bias` tensors of an activation-free MLP with the given widths at the given Sequential
    indices (the gaps are the original dropout layers)."""
    state = {}
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        index = indices[i]
        state[f"{prefix}{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) * (2.0 / fan_in) ** 0.5
        state[f"{prefix}{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.1
    state[f"{prefix}{indices[0]}.weight"] *= gain
    state[f"{prefix}{indices[len(dims) - 2]}.bias"] += last_bias
    return state


def _write_tiny_aesthetic_head(path, seed):
    """The LAION aesthetic MLP layout (`layers.0/2/4/6/7`), input = the tiny CLIP projection dim."""
    generator = torch.Generator().manual_seed(seed)
    # A gain on the first layer spreads the tiny scores over about a rating point, like the real predictor's.
    state = _random_linear_stack([_TINY_PROJECTION_DIM, 32, 16, 8, 4, 1], generator, last_bias=5.0, gain=8.0)
    torch.save(state, path)
    return path


_TINY_BERT_WORDS = (
    ["a", "an", "the", "of", "on", "in", "with", "and", "photo", "image", "background", "picture"]
    + ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "gray"]
    + ["circle", "square", "triangle", "shape", "cat", "dog"]
)


def _write_tiny_bert_tokenizer(output_dir):
    """A small uncased WordPiece vocabulary in BERT's folder format (vocab.txt + tokenizer files)."""
    from transformers import BertTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("!\"#$%&'()*+,-./:;<=>?@[]^_`{|}~")
    vocab += letters + [f"##{c}" for c in letters] + _TINY_BERT_WORDS
    vocab = list(dict.fromkeys(vocab))
    os.makedirs(output_dir, exist_ok=True)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    return output_dir, len(vocab)


def _write_tiny_imagereward(path, vocab_size, seed, hidden=32, layers=2, intermediate=64, patch=8, max_positions=64):
    """A checkpoint in ImageReward.pt's original key layout: BLIP's timm ViT (`blip.visual_encoder.*`), the BERT
    text encoder with cross-attention (`blip.text_encoder.*`), BLIP's projections and the reward MLP (`mlp.layers.*`).
    Built from plain tensors, independently of the transformers classes the scorer loads it into."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, std=0.5):
        return torch.randn(*shape, generator=generator) * std / max(1.0, shape[-1] ** 0.25)

    def linear(prefix, fan_in, fan_out):
        return {
            f"{prefix}.weight": normal(fan_out, fan_in),
            f"{prefix}.bias": torch.randn(fan_out, generator=generator) * 0.1,
        }

    def norm(prefix, width):
        return {
            f"{prefix}.weight": 1.0 + 0.1 * torch.randn(width, generator=generator),
            f"{prefix}.bias": 0.1 * torch.randn(width, generator=generator),
        }

    grid = _TINY_SCORER_IMAGE_SIZE // patch
    state = {
        "blip.visual_encoder.cls_token": normal(1, 1, hidden),
        "blip.visual_encoder.pos_embed": normal(1, grid * grid + 1, hidden),
        "blip.visual_encoder.patch_embed.proj.weight": normal(hidden, 3, patch, patch),
        "blip.visual_encoder.patch_embed.proj.bias": 0.1 * torch.randn(hidden, generator=generator),
    }
    for i in range(layers):
        block = f"blip.visual_encoder.blocks.{i}"
        state.update(norm(f"{block}.norm1", hidden))
        state.update(linear(f"{block}.attn.qkv", hidden, 3 * hidden))
        state.update(linear(f"{block}.attn.proj", hidden, hidden))
        state.update(norm(f"{block}.norm2", hidden))
        state.update(linear(f"{block}.mlp.fc1", hidden, intermediate))
        state.update(linear(f"{block}.mlp.fc2", intermediate, hidden))
    state.update(norm("blip.visual_encoder.norm", hidden))

    text = "blip.text_encoder"
    state[f"{text}.embeddings.position_ids"] = torch.arange(max_positions).unsqueeze(0)
    state[f"{text}.embeddings.word_embeddings.weight"] = normal(vocab_size, hidden)
    state[f"{text}.embeddings.position_embeddings.weight"] = normal(max_positions, hidden)
    state.update(norm(f"{text}.embeddings.LayerNorm", hidden))
    for i in range(layers):
        layer = f"{text}.encoder.layer.{i}"
        for attention, kv_width in (("attention", hidden), ("crossattention", hidden)):
            state.update(linear(f"{layer}.{attention}.self.query", hidden, hidden))
            state.update(linear(f"{layer}.{attention}.self.key", kv_width, hidden))
            state.update(linear(f"{layer}.{attention}.self.value", kv_width, hidden))
            state.update(linear(f"{layer}.{attention}.output.dense", hidden, hidden))
            state.update(norm(f"{layer}.{attention}.output.LayerNorm", hidden))
        state.update(linear(f"{layer}.intermediate.dense", hidden, intermediate))
        state.update(linear(f"{layer}.output.dense", intermediate, hidden))
        state.update(norm(f"{layer}.output.LayerNorm", hidden))
    state.update(linear("blip.vision_proj", hidden, 8))
    state.update(linear("blip.text_proj", hidden, 8))
    state.update(_random_linear_stack([hidden, 32, 16, 8, 4, 1], generator, prefix="mlp.layers."))
    torch.save(state, path)
    return path


def build_tiny_scorers(output_dir, seed=0, include_imagereward=False):
    """Writes tiny random versions of the built-in scorers and returns the matching `--reward_config` dict.

    The dict maps each metric name to its `rewards.build_scorer` options (local paths); it is also written to
    `<output_dir>/reward_config.json`. `clip` and `aesthetic` use the same CLIP folder, as in a real run, so the
    shared model and image embedding are exercised. `imagereward` is included only when asked for.
    """
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    clip_dir = _write_tiny_clip_dir(os.path.join(output_dir, "clip"), seed=seed + 1)
    # Like the real PickScore, whose tokenizer and image processor come from another repo (here: the CLIP folder).
    pickscore_dir = _write_tiny_clip_dir(os.path.join(output_dir, "pickscore"), seed=seed, with_processor=False)
    hps_config, hps_checkpoint = _write_tiny_hpsv2(os.path.join(output_dir, "hpsv2"), seed=seed + 2)
    head_path = _write_tiny_aesthetic_head(os.path.join(output_dir, "sac+logos+ava1-l14-linearMSE.pth"), seed=seed + 3)
    config = {
        "pickscore": {"path": pickscore_dir, "processor_path": clip_dir},
        "hpsv2": {"path": hps_checkpoint, "arch": hps_config},
        "clip": {"path": clip_dir},
        "aesthetic": {"path": clip_dir, "head_path": head_path},
    }
    if include_imagereward:
        bert_dir, vocab_size = _write_tiny_bert_tokenizer(os.path.join(output_dir, "imagereward", "bert"))
        # The original vocabulary has two extra tokens ([DEC], [ENC]) beyond bert-base-uncased's.
        checkpoint = _write_tiny_imagereward(
            os.path.join(output_dir, "imagereward", "ImageReward.pt"), vocab_size + 2, seed=seed + 4
        )
        config["imagereward"] = {"path": checkpoint, "tokenizer_path": bert_dir, "vision_heads": 2, "text_heads": 2}
    with open(os.path.join(output_dir, "reward_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return config


# ----------------------------------------------------------------------------------------------------------------
# A tiny Pick-a-Pic v2 format dataset
# ----------------------------------------------------------------------------------------------------------------

_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
}
_SHAPES = ["circle", "square", "triangle"]
_BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}


def draw_shape_image(color, shape, background, size=64, scale=0.5, offset=(0.0, 0.0), noise=0.0, rng=None):
    """A simple synthetic picture: one coloured shape on a plain background, optionally off-centre and noisy."""
    rng = rng or np.random.default_rng(0)
    image = Image.new("RGB", (size, size), _BACKGROUNDS.get(background, background))
    draw = ImageDraw.Draw(image)
    rgb = _COLORS.get(color, color)
    half = scale * size / 2
    cx, cy = size / 2 + offset[0] * size, size / 2 + offset[1] * size
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=rgb)
    if noise > 0:
        array = np.asarray(image).astype(np.float32)
        array = np.clip(array + rng.normal(0, noise * 255, array.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    return image


def _jpeg_bytes(image, quality=90):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_pickapic_rows(num_pairs, seed=0, image_size=64):
    """Rows in the Pick-a-Pic v2 layout: `caption`, `jpg_0`, `jpg_1` (JPEG bytes), `label_0`, `label_1`.

    Image 0 and image 1 show the same prompt, one drawn faithfully and one with a wrong colour, an off-centre
    shape or noise, so that scorers and the human label have something to disagree about. About one pair in
    eight is a human tie (label 0.5), as in Pick-a-Pic.
    """
    rng = np.random.default_rng(seed)
    py_rng = random.Random(seed)
    rows = []
    for i in range(num_pairs):
        color = py_rng.choice(list(_COLORS))
        shape = py_rng.choice(_SHAPES)
        background = py_rng.choice(list(_BACKGROUNDS))
        caption = f"a {color} {shape} on a {background} background"
        good = draw_shape_image(color, shape, background, size=image_size, scale=0.55, rng=rng)
        flaw = i % 3
        if flaw == 0:
            other = py_rng.choice([c for c in _COLORS if c != color])
            bad = draw_shape_image(other, shape, background, size=image_size, scale=0.55, rng=rng)
        elif flaw == 1:
            bad = draw_shape_image(color, shape, background, size=image_size, scale=0.3, offset=(0.25, -0.2), rng=rng)
        else:
            bad = draw_shape_image(color, shape, background, size=image_size, scale=0.55, noise=0.25, rng=rng)
        good_first = bool(rng.random() < 0.5)
        human = 1.0 if good_first else 0.0
        if i % 8 == 7:
            human = 0.5
        elif rng.random() < 0.15:  # human raters are noisy
            human = 1.0 - human
        image_0, image_1 = (good, bad) if good_first else (bad, good)
        rows.append(
            {
                "caption": caption,
                "jpg_0": _jpeg_bytes(image_0),
                "jpg_1": _jpeg_bytes(image_1),
                "label_0": human,
                "label_1": 1.0 - human if human != 0.5 else 0.5,
            }
        )
    return rows


def write_pickapic_split(rows, path):
    """Writes rows of `make_pickapic_rows` (or rows with the same columns) as one Pick-a-Pic-format parquet file."""
    import datasets

    features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Value("binary"),
            "jpg_1": datasets.Value("binary"),
            "label_0": datasets.Value("float64"),
            "label_1": datasets.Value("float64"),
        }
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(path)
    return path


def build_tiny_pickapic_dataset(output_dir, num_train=48, num_test=16, seed=0, image_size=64):
    """Writes `train` and `test` parquet splits that `datasets.load_dataset(output_dir)` loads as Pick-a-Pic v2."""
    for split, count, split_seed in (("train", num_train, seed), ("test", num_test, seed + 1)):
        rows = make_pickapic_rows(count, seed=split_seed, image_size=image_size)
        write_pickapic_split(rows, os.path.join(output_dir, "data", f"{split}-00000-of-00001.parquet"))
    return output_dir


# ----------------------------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------------------------


def build_all(output_dir, sdxl=True, seed=0, sd3=False, flux=False):
    """Builds the tiny assets under `output_dir` and returns a dict of their paths: the SD pipeline, the dataset and
    the scorers always, the SDXL, SD3 and FLUX pipelines when asked for."""
    paths = {
        "sd": build_tiny_sd_pipeline(os.path.join(output_dir, "sd"), seed=seed),
        "pickapic": build_tiny_pickapic_dataset(os.path.join(output_dir, "pickapic"), seed=seed),
    }
    if sdxl:
        paths["sdxl"] = build_tiny_sdxl_pipeline(os.path.join(output_dir, "sdxl"), seed=seed)
    if sd3:
        paths["sd3"] = build_tiny_sd3_pipeline(os.path.join(output_dir, "sd3"), seed=seed)
    if flux:
        paths["flux"] = build_tiny_flux_pipeline(os.path.join(output_dir, "flux"), seed=seed)
    build_tiny_scorers(os.path.join(output_dir, "scorers"), seed=seed)
    paths["reward_config"] = os.path.join(output_dir, "scorers", "reward_config.json")
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="tiny_assets", help="Where to write the tiny assets.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_sdxl", action="store_true", help="Skip the tiny SDXL pipeline.")
    parser.add_argument("--sd3", action="store_true", help="Also build the tiny SD3 pipeline.")
    parser.add_argument("--flux", action="store_true", help="Also build the tiny FLUX pipeline.")
    args = parser.parse_args()
    paths = build_all(args.output_dir, sdxl=not args.no_sdxl, seed=args.seed, sd3=args.sd3, flux=args.flux)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
