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
"""The built-in scorers (PickScore, CLIP score, LAION aesthetics, HPSv2, ImageReward), with what they share: finding
their weights (a local path, a Hub id or a URL), loading models once per `ScorerSet` (`PooledModel`) and computing
CLIP embeddings once per call. Importing this module registers them.
"""

import logging
import math
import os
import pickle
import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .consensus import DEFAULT_TEMPERATURES, IMAGEREWARD_MEAN, IMAGEREWARD_STD
from .cuda_graphs import CUDAGraphRunner, _padded_prompt_chunks, _run_forward
from .images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPImagePreprocessor, PadToSquarePreprocessor
from .scoring import ScoreContext, Scorer, register_scorer


# Where the default weights live, and what to tell a user whose copy is missing.
_HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
_HOW_TO = {
    "pickscore": "PickScore is the Hub model 'yuvalkirstain/PickScore_v1' (processor: "
    "'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'); download it with `hf download yuvalkirstain/PickScore_v1` "
    "or pass a local transformers CLIPModel folder as `path`.",
    "clip": "The CLIP score uses the Hub model 'openai/clip-vit-large-patch14'; download it with "
    "`hf download openai/clip-vit-large-patch14` or pass a local transformers CLIPModel folder as `path`.",
    "hpsv2": "HPSv2 weights are 'HPS_v2.1_compressed.pt' (or 'HPS_v2_compressed.pt' for v2.0) in the Hub repo "
    "'xswu/HPSv2' (https://huggingface.co/xswu/HPSv2); download with `hf download xswu/HPSv2 "
    "HPS_v2.1_compressed.pt` and pass the file as `path`.",
    "aesthetic": "The LAION aesthetic predictor v2 head is 'sac+logos+ava1-l14-linearMSE.pth' from "
    "https://github.com/christophschuhmann/improved-aesthetic-predictor (the same weights are 'aesthetic-model.pth' "
    "in the Hub repo 'trl-lib/ddpo-aesthetic-predictor'); pass the file as `head_path`.",
    "imagereward": "ImageReward weights are 'ImageReward.pt' in the Hub repo 'THUDM/ImageReward' "
    "(https://huggingface.co/THUDM/ImageReward); download with `hf download THUDM/ImageReward "
    "ImageReward.pt` and pass the file as `path` (and a BERT tokenizer, e.g. 'bert-base-uncased', as `tokenizer_path`).",
}


# ----------------------------------------------------------------------------------------------------------------
# Locating weights (local path or Hub)
# ----------------------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json")


def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not path.lower().endswith(_WEIGHT_SUFFIXES) and ".." not in path


def _resolve_weights_file(path: str, filename: str, metric: str, what: str) -> str:
    """Returns a local file for `path`: an existing file, `filename` inside an existing folder, a Hub repo id (the
    file is downloaded with `hf_hub_download`) or an http(s) URL. Otherwise raises FileNotFoundError naming the path
    and how to obtain the file."""
    path = os.path.expanduser(str(path))
    how_to = _HOW_TO.get(metric, "")
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        if os.path.isfile(candidate):
            return candidate
        raise FileNotFoundError(f"{what} for '{metric}': no file '{filename}' in folder '{path}'. {how_to}")
    if path.startswith(("http://", "https://")):
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(path.split("?")[0]))
        try:
            if not os.path.isfile(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                torch.hub.download_url_to_file(path, target, progress=True)
            return target
        except Exception as error:
            raise FileNotFoundError(
                f"{what} for '{metric}': could not download '{path}' ({error}). {how_to}"
            ) from error
    if _looks_like_hub_id(path):
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(repo_id=path, filename=filename)
        except Exception as error:
            raise FileNotFoundError(
                f"{what} for '{metric}': '{path}' is not a local file and '{filename}' could not be downloaded from "
                f"the Hub repo '{path}' ({type(error).__name__}: {error}). {how_to}"
            ) from error
    raise FileNotFoundError(f"{what} for '{metric}' not found: '{path}' does not exist. {how_to}")


def _check_pretrained_location(path: str, metric: str, what: str) -> str:
    """A transformers `from_pretrained` location must be an existing folder or a Hub id."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path) or _looks_like_hub_id(path):
        return path
    raise FileNotFoundError(f"{what} for '{metric}' not found: '{path}' is not a folder. {_HOW_TO.get(metric, '')}")


def _from_pretrained(loader, path: str, metric: str, what: str, **kwargs):
    path = _check_pretrained_location(path, metric, what)
    try:
        return loader(path, **kwargs)
    except OSError as error:
        raise FileNotFoundError(
            f"Could not load {what} for '{metric}' from '{path}' ({error}). {_HOW_TO.get(metric, '')}"
        ) from error


def _load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Loads a checkpoint with weights_only=True, unwrapping `{"state_dict": ...}` and a DDP `module.` prefix."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            # weights_only=True refuses any object that is not a tensor or a plain container: unpickling it could
            # run arbitrary code.
            raise ValueError(
                f"Refusing to load '{path}': it holds Python objects besides tensors, and unpickling them could run"
                " code. Re-save only its state dict (torch.save(model.state_dict(), path)) or as .safetensors."
            ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' does not hold a state dict.")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


# ----------------------------------------------------------------------------------------------------------------
# Shared model loading and embeddings
# ----------------------------------------------------------------------------------------------------------------


def _module_device_dtype(module: nn.Module):
    """The device and floating dtype a module's weights live on (shared models may have moved)."""
    for param in module.parameters():
        return param.device, param.dtype
    return torch.device("cpu"), torch.float32


def _features(output) -> torch.Tensor:
    """Embedding tensor from a transformers `get_*_features` result: a tensor (4.x) or an output object (5.x)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def _clip_preprocessor_from(processor_path: str, metric: str) -> CLIPImagePreprocessor:
    """Reads a CLIP image-processor config (PIL backend when the installed transformers has backends)."""
    from transformers import AutoImageProcessor

    try:
        processor = _from_pretrained(
            AutoImageProcessor.from_pretrained, processor_path, metric, "image processor", backend="pil"
        )
    except TypeError:  # transformers without image-processor backends
        processor = _from_pretrained(AutoImageProcessor.from_pretrained, processor_path, metric, "image processor")
    size = processor.size if getattr(processor, "do_resize", True) else None
    size = dict(size) if size is not None else {"shortest_edge": 224}
    size = size.get("shortest_edge") or (size["height"], size["width"])
    crop = processor.crop_size if getattr(processor, "do_center_crop", True) else None
    crop = dict(crop) if crop is not None else None
    resample = getattr(processor, "resample", 3)
    return CLIPImagePreprocessor(
        size=size,
        crop_size=(crop["height"], crop["width"]) if crop else None,
        image_mean=processor.image_mean or OPENAI_CLIP_MEAN,
        image_std=processor.image_std or OPENAI_CLIP_STD,
        resample=int(resample if resample is not None else 3),
    )


class PooledModel(NamedTuple):
    """A scoring model as the scorers of a ScorerSet share it (`model_pool` values).

    `logit_scale` is `exp(logit_scale)` read from the float32 weights before the model was cast to the scoring
    dtype: in bfloat16 the stored logit scale of PickScore and HPSv2 (log 100) rounds to 4.59375, which would scale
    PickScore by 98.86 instead of 100 and set the HPSv2 temperature to 0.010115 instead of 0.01.
    """

    model: nn.Module
    tokenizer: Any
    preprocessor: Callable
    logit_scale: float


def _fp32_logit_scale(model: nn.Module) -> float:
    return float(model.logit_scale.detach().double().exp().item())


def _load_clip(scorer: Scorer, metric: str, path: str, processor_path: str) -> PooledModel:
    """Loads (or reuses from the scorer set's pool) a transformers CLIPModel with its tokenizer and preprocessor."""
    from transformers import AutoTokenizer, CLIPModel

    key = ("clip", os.path.expanduser(str(path)), os.path.expanduser(str(processor_path)), scorer.dtype)
    if key not in scorer.model_pool:
        # Loaded in float32 so the logit scale is read before the cast (see PooledModel).
        model = _from_pretrained(CLIPModel.from_pretrained, path, metric, "CLIP model", dtype=torch.float32)
        logit_scale = _fp32_logit_scale(model)
        model = model.to(device=scorer.device, dtype=scorer.dtype).eval().requires_grad_(False)
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, processor_path, metric, "tokenizer")
        preprocessor = _clip_preprocessor_from(processor_path, metric)
        scorer.model_pool[key] = PooledModel(model, tokenizer, preprocessor, logit_scale)
    return scorer.model_pool[key]


def _clip_image_embeds(
    context: ScoreContext, model, pixel_values: torch.Tensor, batch_size: int, graphs: Optional[CUDAGraphRunner] = None
) -> torch.Tensor:
    """Projected CLIP image embeddings (float32), computed once per model and input tensor within a call."""

    def forward(chunk):
        return _features(model.get_image_features(pixel_values=chunk)).float()

    def compute():
        device, dtype = _module_device_dtype(model)
        chunks = [
            _run_forward(graphs, f"clip_image:{id(model)}", forward, chunk.to(device=device, dtype=dtype))
            for chunk in pixel_values.split(batch_size)
        ]
        return torch.cat(chunks)

    return context.get(("clip_image", id(model), id(pixel_values)), compute)


def _unique(prompts: List[str]):
    unique = list(dict.fromkeys(prompts))
    position = {p: i for i, p in enumerate(unique)}
    return unique, [position[p] for p in prompts]


def _clip_text_embeds(
    context: ScoreContext, model, tokenizer, prompts: List[str], batch_size: int, graphs=None
) -> torch.Tensor:
    """Projected CLIP text embeddings (float32) of each prompt, each unique prompt encoded once per call.

    Under CUDA graphs the tokens are padded to the full context (77) without an attention mask, so shapes stay fixed:
    CLIP's text encoder is causal and pools at the first end-of-text token, so padding after it changes nothing.
    """
    unique, index = _unique(prompts)

    def forward(input_ids):
        return _features(model.get_text_features(input_ids=input_ids)).float()

    def compute():
        device, _ = _module_device_dtype(model)
        max_length = min(int(getattr(tokenizer, "model_max_length", 77) or 77), 77)
        chunks = []
        for chunk, real in _padded_prompt_chunks(unique, batch_size, bucket=graphs is not None):
            if graphs is not None:
                tokens = tokenizer(
                    chunk, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
                )
                input_ids = tokens["input_ids"].to(device, non_blocking=True)
                chunks.append(_run_forward(graphs, f"clip_text:{id(model)}", forward, input_ids)[:real])
                continue
            tokens = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            chunks.append(_features(model.get_text_features(**tokens)).float())
        return torch.cat(chunks)

    embeds = context.get(("clip_text", id(model), id(tokenizer), tuple(unique)), compute)
    return embeds[torch.tensor(index).to(embeds.device, non_blocking=True)]


def _clip_cosine(scorer, pixel_values, prompts, context) -> torch.Tensor:
    """cos(image, text) of a scorer holding a transformers CLIPModel (`model`, `tokenizer`), embeddings shared
    through `context`."""
    image = _clip_image_embeds(context, scorer.model, pixel_values, scorer.batch_size, scorer.graphs)
    text = _clip_text_embeds(context, scorer.model, scorer.tokenizer, prompts, scorer.batch_size, scorer.graphs)
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


class LinearStack(nn.Module):
    """An MLP head rebuilt from a state dict with `layers.N.weight/bias` keys (the LAION aesthetic predictor and the
    ImageReward head): Linear layers at the stored indices, identity (dropout at inference) in the gaps, and no
    activations, exactly like the original `nn.Sequential`."""

    def __init__(self, state_dict: Dict[str, torch.Tensor], source: str = "head"):
        super().__init__()
        indices = sorted(
            {int(k.split(".")[1]) for k in state_dict if k.startswith("layers.") and k.endswith("weight")}
        )
        if not indices:
            raise ValueError(f"{source}: no 'layers.N.weight' keys found (got {sorted(state_dict)[:8]}).")
        layers = [nn.Identity() for _ in range(indices[-1] + 1)]
        for i in indices:
            weight = state_dict[f"layers.{i}.weight"]
            layers[i] = nn.Linear(weight.shape[1], weight.shape[0], bias=f"layers.{i}.bias" in state_dict)
        self.layers = nn.Sequential(*layers)
        self.load_state_dict({k: v for k, v in state_dict.items() if k.startswith("layers.")}, strict=True)
        self.input_dim = state_dict[f"layers.{indices[0]}.weight"].shape[1]

    def forward(self, x):
        return self.layers(x)


# ----------------------------------------------------------------------------------------------------------------
# Built-in scorers
# ----------------------------------------------------------------------------------------------------------------


@register_scorer("pickscore")
class PickScoreScorer(Scorer):
    """PickScore: `logit_scale.exp() * cos(image, text)` of a CLIP-H/14 fine-tuned on Pick-a-Pic (about 100 * cos).

    Options: `path` (CLIPModel; Hub id or folder, default "yuvalkirstain/PickScore_v1"), `processor_path` (tokenizer
    and image-processor config, default "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"). Native temperature 1.0.
    """

    default_temperature = DEFAULT_TEMPERATURES["pickscore"]

    def __init__(
        self,
        path: str = "yuvalkirstain/PickScore_v1",
        processor_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.model, self.tokenizer, self.preprocessor, self.logit_scale = _load_clip(
            self, "pickscore", path, processor_path
        )
        self._identity = {"path": str(path), "processor_path": str(processor_path)}

    def modules(self):
        return [self.model]

    def _score_pixels(self, pixel_values, prompts, context):
        return self.logit_scale * _clip_cosine(self, pixel_values, prompts, context)


@register_scorer("clip")
class CLIPScorer(Scorer):
    """CLIP score `100 * cos(image, text)` (not clamped at 0, so pairwise differences keep their sign).

    Options: `path` (CLIPModel; default "openai/clip-vit-large-patch14"), `processor_path` (default: `path`).
    Native temperature 1.0 on this scale.
    """

    default_temperature = DEFAULT_TEMPERATURES["clip"]

    def __init__(self, path: str = "openai/clip-vit-large-patch14", processor_path: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        processor_path = processor_path or path
        self.model, self.tokenizer, self.preprocessor, _ = _load_clip(self, "clip", path, processor_path)
        self._identity = {"path": str(path), "processor_path": str(processor_path)}

    def modules(self):
        return [self.model]

    def _score_pixels(self, pixel_values, prompts, context):
        return 100.0 * _clip_cosine(self, pixel_values, prompts, context)


@register_scorer("aesthetic")
class AestheticScorer(Scorer):
    """LAION improved aesthetic predictor v2: an MLP (768-1024-128-64-16-1, no activations) on the L2-normalised
    CLIP ViT-L/14 image embedding; roughly 1..10. The prompt is ignored.

    Options: `path` (CLIPModel, default "openai/clip-vit-large-patch14"; when it equals the `clip` scorer's path, a
    ScorerSet loads the model once and computes the image embedding once), `processor_path` (default: `path`),
    `head_path` (the MLP `.pth` with its original `layers.N` keys; a file, a folder holding `head_filename`, a Hub
    repo id or a URL; default the Hub copy "trl-lib/ddpo-aesthetic-predictor"), `head_filename`.
    Native temperature 0.25 (half a rating point gives about 88%).
    """

    default_temperature = DEFAULT_TEMPERATURES["aesthetic"]
    prompt_free = True

    def __init__(
        self,
        path: str = "openai/clip-vit-large-patch14",
        head_path: str = "trl-lib/ddpo-aesthetic-predictor",
        head_filename: str = "aesthetic-model.pth",
        processor_path: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        processor_path = processor_path or path
        head_file = _resolve_weights_file(head_path, head_filename, "aesthetic", "Aesthetic MLP head")
        self.model, _, self.preprocessor, _ = _load_clip(self, "aesthetic", path, processor_path)
        self.head = LinearStack(_load_state_dict_file(head_file), source=head_file)
        self.head = self.head.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self._identity = {"path": str(path), "processor_path": str(processor_path), "head_path": str(head_path)}

    def modules(self):
        return [self.model, self.head]

    def _score_pixels(self, pixel_values, prompts, context):
        embeds = F.normalize(
            _clip_image_embeds(context, self.model, pixel_values, self.batch_size, self.graphs), dim=-1
        )
        device, dtype = _module_device_dtype(self.head)
        return self.head(embeds.to(device=device, dtype=dtype)).float().reshape(-1)


def _open_clip_model_name(arch: str) -> str:
    """An open_clip model name, registering a model-config JSON file first when `arch` is a path."""
    import open_clip

    if arch.endswith(".json") or os.path.sep in arch or os.path.isfile(arch):
        if not os.path.isfile(arch):
            raise FileNotFoundError(f"open_clip model config '{arch}' not found (hpsv2 `arch`).")
        open_clip.add_model_config(arch)
        return os.path.splitext(os.path.basename(arch))[0]
    if arch not in open_clip.list_models():
        raise ValueError(
            f"Unknown open_clip architecture '{arch}' for hpsv2; use a name from open_clip.list_models() "
            "or the path of an open_clip model-config JSON file."
        )
    return arch


@register_scorer("hpsv2")
class HPSv2Scorer(Scorer):
    """Human Preference Score v2: `cos(image, text)` of an open_clip ViT-H-14 fine-tuned on HPD v2.

    Options: `path` (the checkpoint `{"state_dict": ...}`: a file, a folder holding it, or a Hub repo id; default
    "xswu/HPSv2"), `version` ("v2.1" -> HPS_v2.1_compressed.pt, default; "v2.0" -> HPS_v2_compressed.pt),
    `filename` (overrides the file picked by `version`), `arch` (an open_clip model name, default "ViT-H-14", or the
    path of an open_clip model-config JSON). Preprocessing: longest side to the model's image size, padded to a square.
    Native temperature `1 / logit_scale.exp()` of the checkpoint (about 0.01).
    """

    default_temperature = DEFAULT_TEMPERATURES["hpsv2"]

    def __init__(
        self,
        path: str = "xswu/HPSv2",
        arch: str = "ViT-H-14",
        version: str = "v2.1",
        filename: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        import open_clip

        if version not in _HPS_FILES:
            raise ValueError(f"Unknown HPS version '{version}'; choose one of {sorted(_HPS_FILES)}.")
        checkpoint = _resolve_weights_file(path, filename or _HPS_FILES[version], "hpsv2", "HPSv2 checkpoint")
        model_name = _open_clip_model_name(str(arch))
        key = ("open_clip", model_name, os.path.abspath(checkpoint), self.dtype)
        if key not in self.model_pool:
            previous = logging.root.manager.disable
            logging.disable(
                logging.WARNING
            )  # open_clip warns that no pretrained weights were loaded: we load them next
            try:
                model = open_clip.create_model(model_name, pretrained=None, device="cpu")
            finally:
                logging.disable(previous)
            state = _load_state_dict_file(checkpoint)
            if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
                state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
            model.load_state_dict(state, strict=True)
            logit_scale = _fp32_logit_scale(model)  # before the cast (see PooledModel)
            model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
            cfg = open_clip.get_model_preprocess_cfg(model)
            size = cfg.get("size", 224)
            size = size[0] if isinstance(size, (tuple, list)) else size
            preprocessor = PadToSquarePreprocessor(
                size=size, image_mean=cfg.get("mean", OPENAI_CLIP_MEAN), image_std=cfg.get("std", OPENAI_CLIP_STD)
            )
            self.model_pool[key] = PooledModel(model, open_clip.get_tokenizer(model_name), preprocessor, logit_scale)
        self.model, self.tokenizer, self.preprocessor, logit_scale = self.model_pool[key]
        if not self._temperature_override:
            self.temperature = 1.0 / logit_scale
        self._identity = {"path": str(path), "checkpoint": os.path.basename(checkpoint), "arch": str(arch)}

    def modules(self):
        return [self.model]

    def _score_pixels(self, pixel_values, prompts, context):
        model = self.model
        device, dtype = _module_device_dtype(model)

        def encode_image(chunk):
            return model.encode_image(chunk).float()

        def encode_text(tokens):
            return model.encode_text(tokens).float()

        def image_features():
            chunks = [
                _run_forward(self.graphs, f"open_clip_image:{id(model)}", encode_image, chunk.to(device, dtype))
                for chunk in pixel_values.split(self.batch_size)
            ]
            return torch.cat(chunks)

        unique, index = _unique(prompts)

        def text_features():
            # open_clip's tokenizer always pads to the full context, so only the batch is bucketed for graphs.
            chunks = []
            for chunk, real in _padded_prompt_chunks(unique, self.batch_size, bucket=self.graphs is not None):
                tokens = self.tokenizer(chunk).to(device, non_blocking=True)
                chunks.append(_run_forward(self.graphs, f"open_clip_text:{id(model)}", encode_text, tokens)[:real])
            return torch.cat(chunks)

        image = F.normalize(context.get(("open_clip_image", id(model), id(pixel_values)), image_features), dim=-1)
        text = F.normalize(context.get(("open_clip_text", id(model), tuple(unique)), text_features), dim=-1)
        text = text[torch.tensor(index).to(text.device, non_blocking=True)]
        return (image * text).sum(-1)


def _imagereward_vision_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Renames BLIP's timm-style ViT keys (`blip.visual_encoder.*`) to transformers' BlipVisionModel keys."""
    prefix = "blip.visual_encoder."
    renames = [
        (r"^cls_token$", "embeddings.class_embedding"),
        (r"^pos_embed$", "embeddings.position_embedding"),
        (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
        (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
        (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
        (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
        (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
        (r"^blocks\.(\d+)\.mlp\.fc(\d)\.", r"encoder.layers.\1.mlp.fc\2."),
        (r"^norm\.", "post_layernorm."),
    ]
    renamed = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        new_key = key[len(prefix) :]
        for pattern, replacement in renames:
            new_key, count = re.subn(pattern, replacement, new_key)
            if count:
                break
        else:
            raise ValueError(f"Unexpected ImageReward vision key '{key}'.")
        renamed[new_key] = value
    return renamed


@register_scorer("imagereward")
class ImageRewardScorer(Scorer):
    """ImageReward: BLIP ViT-L/16 image encoder + BERT text encoder with cross-attention to the image + MLP head on
    the [CLS] token; score `(mlp - 0.16717) / 1.03334`. Rebuilt on transformers' BlipVisionModel and BlipTextModel
    (called with `is_decoder=False`) from the original `ImageReward.pt` key layout.

    Options: `path` (ImageReward.pt: a file, a folder holding it, or a Hub repo id; default "THUDM/ImageReward"),
    `filename` (default "ImageReward.pt"), `tokenizer_path` (BERT tokenizer, default "bert-base-uncased"),
    `vision_heads` / `text_heads` (attention heads; default hidden size / 64, as in BLIP), `max_length` (35, as the
    original). Sizes are read from the checkpoint. Native temperature 1 / 1.03334 on the normalised score.
    """

    default_temperature = DEFAULT_TEMPERATURES["imagereward"]

    def __init__(
        self,
        path: str = "THUDM/ImageReward",
        filename: str = "ImageReward.pt",
        tokenizer_path: str = "bert-base-uncased",
        vision_heads: Optional[int] = None,
        text_heads: Optional[int] = None,
        max_length: int = 35,
        **kwargs,
    ):
        super().__init__(**kwargs)
        from transformers import AutoTokenizer

        checkpoint = _resolve_weights_file(path, filename, "imagereward", "ImageReward checkpoint")
        key = ("imagereward", os.path.abspath(checkpoint), vision_heads, text_heads, self.dtype)
        if key not in self.model_pool:
            self.model_pool[key] = self._load(checkpoint, vision_heads, text_heads)
        self.vision_model, self.text_model, self.head, image_size = self.model_pool[key]
        self.tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, tokenizer_path, "imagereward", "tokenizer")
        self.max_length = int(max_length)
        self.preprocessor = CLIPImagePreprocessor(size=image_size, crop_size=image_size)
        self._identity = {"path": str(path), "checkpoint": os.path.basename(checkpoint), "tokenizer": tokenizer_path}

    def _load(self, checkpoint, vision_heads, text_heads):
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        state = _load_state_dict_file(checkpoint)
        vision = _imagereward_vision_state(state)
        text_prefix = "blip.text_encoder."
        text = {k[len(text_prefix) :]: v for k, v in state.items() if k.startswith(text_prefix)}
        text.pop("embeddings.position_ids", None)  # a buffer in the original, non-persistent in transformers
        head = {k[len("mlp.") :]: v for k, v in state.items() if k.startswith("mlp.")}
        if not vision or not text or not head:
            raise ValueError(
                f"'{checkpoint}' is not an ImageReward checkpoint (blip.visual_encoder.*, "
                "blip.text_encoder.* and mlp.layers.* keys expected)."
            )

        hidden = vision["embeddings.class_embedding"].shape[-1]
        patch = vision["embeddings.patch_embedding.weight"].shape[-1]
        grid = int(round(math.sqrt(vision["embeddings.position_embedding"].shape[1] - 1)))
        vision_layers = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
        vision_config = BlipVisionConfig(
            hidden_size=hidden,
            intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads or max(1, hidden // 64),
            image_size=grid * patch,
            patch_size=patch,
            layer_norm_eps=1e-6,  # timm ViT in BLIP
            hidden_act="gelu",
        )
        words = text["embeddings.word_embeddings.weight"]
        text_layers = len({k.split(".")[2] for k in text if k.startswith("encoder.layer.")})
        text_config = BlipTextConfig(
            vocab_size=words.shape[0],
            hidden_size=words.shape[1],
            encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
            intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads or max(1, words.shape[1] // 64),
            max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
            layer_norm_eps=1e-12,  # BERT
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            is_decoder=True,  # builds the cross-attention layers; the forward runs with is_decoder=False
            pad_token_id=0,
            bos_token_id=words.shape[0] - 2,  # BLIP's added [DEC] token
            sep_token_id=min(102, words.shape[0] - 1),
        )
        vision_model = BlipVisionModel(vision_config)
        vision_model.load_state_dict(vision, strict=True)
        text_model = BlipTextModel(text_config, add_pooling_layer=False)
        text_model.load_state_dict(text, strict=True)
        head_model = LinearStack(head, source=checkpoint)
        modules = []
        for module in (vision_model, text_model, head_model):
            modules.append(module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False))
        return (*modules, grid * patch)

    def modules(self):
        return [self.vision_model, self.text_model, self.head]

    def _score_pixels(self, pixel_values, prompts, context):
        device, dtype = _module_device_dtype(self.vision_model)
        unique, index = _unique(prompts)
        tokens = self.tokenizer(
            unique, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        order = torch.tensor(index)
        input_ids, attention_mask = tokens["input_ids"][order], tokens["attention_mask"][order]
        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            image_embeds = self.vision_model(
                pixel_values=pixel_values[start:stop].to(device=device, dtype=dtype)
            ).last_hidden_state
            text = self.text_model(
                input_ids=input_ids[start:stop].to(device),
                attention_mask=attention_mask[start:stop].to(device),
                encoder_hidden_states=image_embeds,
                is_decoder=False,
            ).last_hidden_state[:, 0, :]
            reward = self.head(text).float().reshape(-1)
            outputs.append((reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD)
        return torch.cat(outputs)
