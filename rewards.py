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
"""Multi-metric reward scorers, pairwise preference probabilities and consensus labels for BalancedDPO.

Library:

    scorers = build_scorers("pickscore,hpsv2,clip,aesthetic", config="reward_config.json", device="cuda")
    scores_0, scores_1 = scorers.score_pairs(images_0, images_1, prompts)
    labeler = ConsensusLabeler(mode="majority", temperatures=scorers.temperatures, weights=scorers.weights)
    result = labeler(scores_0, scores_1, human_label)  # result.label, result.prob, result.keep, result.agreement

Command line:

    python rewards.py score --images a.png b.png --prompt "a red circle"
    python rewards.py label --dataset_name yuvalkirstain/pickapic_v2 --streaming --output_dir labeled
    python rewards.py calibrate --dataset_name labeled --output reward_config.json
"""

import argparse
import glob
import json
import logging
import math
import os
import pickle
import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from multi_metric.consensus import (
    CONSENSUS_MODES,
    DEFAULT_TEMPERATURES,
    DROP_REASONS,
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    TIE_POLICIES,
    ConsensusLabeler,
    ConsensusResult,
    NormalizedSumState,
    _check_mode,
    _nll,
    _sigmoid_np,
    consensus,
    fit_temperature,
    pairwise_probabilities,
)
from multi_metric.cuda_graphs import CUDAGraphRunner, _padded_prompt_chunks, _run_forward
from multi_metric.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPImagePreprocessor,
    MultiPreprocessor,
    PadToSquarePreprocessor,
    hash_image,
    load_image,
    to_rgb,
)
from multi_metric.scoring import (
    _SCORERS,
    DEFAULT_REWARD_MODELS,
    PendingScores,  # noqa: F401
    ScoreCache,
    ScoreContext,
    Scorer,
    ScorerSet,
    _parse_names,
    available_scorers,
    build_scorer,
    build_scorers,
    default_scorer_dtype,
    load_reward_config,
    register_scorer,
)


logger = logging.getLogger(__name__)


__all__ = [
    "DEFAULT_REWARD_MODELS",
    "DEFAULT_TEMPERATURES",
    "CONSENSUS_MODES",
    "TIE_POLICIES",
    "DROP_REASONS",
    "CLIPImagePreprocessor",
    "PadToSquarePreprocessor",
    "MultiPreprocessor",
    "Scorer",
    "PooledModel",
    "ScoreCache",
    "ScorerSet",
    "ConsensusResult",
    "NormalizedSumState",
    "ConsensusLabeler",
    "register_scorer",
    "available_scorers",
    "build_scorer",
    "build_scorers",
    "default_scorer_dtype",
    "load_reward_config",
    "pairwise_probabilities",
    "consensus",
    "fit_temperature",
    "to_rgb",
    "load_image",
    "hash_image",
]


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
# Small helpers
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


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _add_scorer_args(parser):
    parser.add_argument(
        "--reward_models",
        "--metrics",
        dest="reward_models",
        type=str,
        default=",".join(DEFAULT_REWARD_MODELS),
        help=f"Comma-separated metrics (registered names or package.module:Class). Available: {available_scorers()}.",
    )
    parser.add_argument(
        "--reward_config",
        type=str,
        default=None,
        help="JSON file mapping each metric to its build_scorer options (paths, temperature, weight, ...).",
    )
    parser.add_argument("--device", type=str, default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--dtype", type=str, default=None, help="Scorer weight dtype: float32 (default), bfloat16, float16."
    )
    parser.add_argument(
        "--no_cuda_graphs", action="store_true", help="Run scorer forwards eagerly instead of replaying CUDA graphs."
    )


def _add_consensus_args(parser):
    parser.add_argument("--consensus", type=str, default="majority", help=f"Consensus mode: {CONSENSUS_MODES}.")
    parser.add_argument("--abstain_margin", type=float, default=0.0, help="A metric abstains when |p - 0.5| <= this.")
    parser.add_argument("--tie_policy", type=str, default="mean_prob", choices=TIE_POLICIES)
    parser.add_argument("--min_agreement", type=float, default=0.0, help="Drop pairs whose agreement is below this.")
    parser.add_argument("--human_vote", action="store_true", help="Count the human label as one more voter.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random_metric draws.")
    parser.add_argument(
        "--normalize_warmup_pairs", type=int, default=2048, help="Pairs used to estimate sigma for normalized_sum."
    )


def _add_dataset_args(parser):
    parser.add_argument("--dataset_name", type=str, required=True, help="Hub dataset id or local path.")
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--split", type=str, default="train")
    parser.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--caption_column", type=str, default="caption")
    parser.add_argument("--image_0_column", type=str, default="jpg_0")
    parser.add_argument("--image_1_column", type=str, default="jpg_1")
    parser.add_argument("--label_0_column", type=str, default="label_0", help="Human label column (may be absent).")
    parser.add_argument("--max_samples", type=int, default=None, help="Process at most this many pairs.")
    parser.add_argument("--batch_size", type=int, default=16, help="Pairs scored per step.")
    parser.add_argument(
        "--max_bad_examples",
        type=str,
        default=None,
        help="Stop when more rows than this (count, or a fraction < 1) are unusable; bad rows are skipped and logged.",
    )


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Score images with several reward models and build consensus preference labels."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    score = subparsers.add_parser("score", help="Score images against a prompt; pairs consecutive images.")
    score.add_argument("--images", nargs="+", required=True, help="Image files; (1st, 2nd), (3rd, 4th) ... are pairs.")
    score.add_argument("--prompt", type=str, required=True)
    score.add_argument("--json", action="store_true", help="Print one JSON object instead of tables.")
    _add_scorer_args(score)
    _add_consensus_args(score)

    label = subparsers.add_parser("label", help="Add per-metric scores and consensus labels to a preference dataset.")
    _add_dataset_args(label)
    _add_scorer_args(label)
    _add_consensus_args(label)
    label.add_argument("--output_dir", type=str, required=True, help="Parquet shards go to <output_dir>/data/.")
    label.add_argument("--rows_per_shard", type=int, default=1000)
    label.add_argument(
        "--resume",
        action="store_true",
        help="Continue an interrupted run in --output_dir from its last written shard (same arguments).",
    )
    label.add_argument(
        "--overwrite", action="store_true", help="Start over even if --output_dir holds an unfinished run."
    )

    calibrate = subparsers.add_parser("calibrate", help="Fit each metric's temperature to the human labels.")
    _add_dataset_args(calibrate)
    _add_scorer_args(calibrate)
    _add_consensus_args(calibrate)
    calibrate.add_argument("--output", type=str, required=True, help="Where to write the reward-config JSON.")
    calibrate.add_argument(
        "--rescore",
        action="store_true",
        help="Score the images even when the dataset already has score_<metric>_0/1 columns (from `label`).",
    )

    args = parser.parse_args(input_args)
    # Check the consensus options before any model is loaded.
    try:
        _check_mode(args.consensus, args.tie_policy, args.abstain_margin, args.min_agreement)
    except ValueError as error:
        parser.error(str(error))
    if args.consensus.startswith("single:") and args.consensus[len("single:") :] not in _parse_names(
        args.reward_models
    ):
        parser.error(f"--consensus {args.consensus}: the metric is not in --reward_models {args.reward_models}.")
    # Unknown metrics fail here, not after the dataset was opened.
    for name in _parse_names(args.reward_models):
        if name not in _SCORERS and ":" not in name:
            parser.error(
                f"unknown metric '{name}' in --reward_models; available: {', '.join(available_scorers())} (or a user"
                " scorer as package.module:Class)."
            )
    if getattr(args, "max_bad_examples", None) is not None:
        from preference_data import parse_max_bad_examples

        try:
            args.max_bad_examples = parse_max_bad_examples(args.max_bad_examples)
        except ValueError as error:
            parser.error(str(error))
    return args


def _default_device(device):
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _labeler_from_args(args, temperatures, weights) -> ConsensusLabeler:
    return ConsensusLabeler(
        mode=args.consensus,
        temperatures=temperatures,
        weights=weights,
        abstain_margin=args.abstain_margin,
        tie_policy=args.tie_policy,
        min_agreement=args.min_agreement,
        human_vote=args.human_vote,
        seed=args.seed,
        normalize_warmup_pairs=args.normalize_warmup_pairs,
    )


def _format_row(cells, widths):
    return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def _print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(_format_row(header, widths))
    for row in rows:
        print(_format_row(row, widths))


def cmd_score(args):
    images = []
    for path in args.images:
        try:
            images.append(load_image(path))
        except (ValueError, FileNotFoundError, OSError) as error:
            raise SystemExit(f"error: cannot read image '{path}': {error}")
    scorers = build_scorers(
        args.reward_models,
        args.reward_config,
        device=_default_device(args.device),
        dtype=args.dtype,
        cuda_graphs=not args.no_cuda_graphs,
    )
    scores = scorers.score(images, [args.prompt] * len(images))
    labeler = _labeler_from_args(args, scorers.temperatures, scorers.weights)
    pairs = []
    for i in range(0, len(images) - 1, 2):
        s0 = {m: v[i : i + 1] for m, v in scores.items()}
        s1 = {m: v[i + 1 : i + 2] for m, v in scores.items()}
        result = labeler(s0, s1)
        pairs.append(
            {
                "image_0": args.images[i],
                "image_1": args.images[i + 1],
                "probs": {m: float(p[0]) for m, p in result.probs.items()},
                "votes": {m: int(v[0]) for m, v in result.votes.items()},
                "label": float(result.label[0]),
                "prob": float(result.prob[0]),
                "agreement": float(result.agreement[0]),
                "keep": bool(result.keep[0]),
            }
        )
    output = {
        "prompt": args.prompt,
        "images": list(args.images),
        "scores": {m: [float(s) for s in v] for m, v in scores.items()},
        "temperatures": scorers.temperatures,
        "consensus": args.consensus,
        "pairs": pairs,
    }
    if args.json:
        print(json.dumps(output, indent=2))
        return output
    print(f"prompt: {args.prompt}")
    _print_table(
        ["image"] + scorers.names,
        [[p] + [f"{scores[m][i]:.4f}" for m in scorers.names] for i, p in enumerate(args.images)],
    )
    for pair in pairs:
        print(f"\npair: image 0 = {pair['image_0']}, image 1 = {pair['image_1']}")
        _print_table(
            ["metric", "tau", "p(image 0)", "vote"],
            [
                [m, f"{scorers.temperatures[m]:.4g}", f"{pair['probs'][m]:.4f}", f"{pair['votes'][m]:+d}"]
                for m in scorers.names
            ],
        )
        winner = {1.0: "image 0", 0.0: "image 1"}.get(pair["label"], "none (tie)")
        print(
            f"consensus ({args.consensus}): preferred {winner}, prob {pair['prob']:.4f}, agreement "
            f"{pair['agreement']:.3f}, {'kept' if pair['keep'] else 'dropped'}"
        )
    if len(images) % 2:
        print(f"\n(no pair for the last image {args.images[-1]}: give an even number of images to compare pairs)")
    return output


def _load_dataset(args):
    import datasets

    saved = ("dataset_info.json", "dataset_dict.json")
    if os.path.isdir(args.dataset_name) and any(os.path.isfile(os.path.join(args.dataset_name, f)) for f in saved):
        dataset = datasets.load_from_disk(args.dataset_name)  # a save_to_disk folder
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[args.split]
        if args.streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        dataset = datasets.load_dataset(
            args.dataset_name,
            args.dataset_config_name,
            split=args.split,
            streaming=args.streaming,
            cache_dir=args.cache_dir,
        )
    from preference_data import DataError, check_columns

    features = dataset.features
    columns = list(features) if features is not None else None
    # Missing columns and wrong types stop here, before any scorer is loaded. The human label is optional.
    label_column = args.label_0_column if columns is None or args.label_0_column in columns else None
    try:
        check_columns(dataset, args.caption_column, args.image_0_column, args.image_1_column, label_column)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    if columns is not None:
        for column in (args.image_0_column, args.image_1_column):
            if isinstance(features[column], datasets.Image) and features[column].decode:
                # Keep the encoded bytes: decoding happens here, with undecodable images skipped and counted.
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _iter_batches(dataset, batch_size, max_samples, with_ids=False, start=0):
    """Batches of rows; with `with_ids`, (row ids, rows) where a row id is the row's position in the dataset.
    `start` skips that many rows first (without decoding them)."""
    if start:
        import datasets

        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.skip(start)
        else:
            dataset = dataset.select(range(start, len(dataset)))
    batch, ids = [], []
    for count, row in enumerate(dataset, start=start):
        if max_samples is not None and count >= max_samples:
            break
        batch.append(row)
        ids.append(count)
        if len(batch) == batch_size:
            yield (ids, batch) if with_ids else batch
            batch, ids = [], []
    if batch:
        yield (ids, batch) if with_ids else batch


def _decode_pairs(rows, args, row_ids=None):
    """Checks and decodes each row; returns (kept rows, images_0, images_1, bad rows).

    A bad row (undecodable image, missing or empty caption, label not in {0, 0.5, 1}) is skipped and reported as
    `(row id, reason, undecodable)`; grayscale, RGBA, CMYK or palette images and pairs of different sizes are fine.
    """
    from preference_data import BadExampleError, normalize_label

    kept, images_0, images_1, bad = [], [], [], []
    for row_id, row in zip(row_ids if row_ids is not None else range(len(rows)), rows):
        try:
            caption = row.get(args.caption_column)
            if not isinstance(caption, str) or not caption.strip():
                raise BadExampleError("caption is missing or empty")
            if args.label_0_column in row:
                normalize_label(row[args.label_0_column])
        except BadExampleError as error:
            bad.append((row_id, str(error), False))
            continue
        try:
            image_0, image_1 = load_image(row[args.image_0_column]), load_image(row[args.image_1_column])
        except (ValueError, FileNotFoundError, OSError, TypeError) as error:
            bad.append((row_id, f"undecodable image: {error}", True))
            continue
        kept.append(row)
        images_0.append(image_0)
        images_1.append(image_1)
    return kept, images_0, images_1, bad


def _human_labels(rows, column):
    if not rows or column not in rows[0]:
        return None
    return torch.tensor([float("nan") if r[column] is None else float(r[column]) for r in rows], dtype=torch.float64)


def _precomputed_columns(names):
    return [f"score_{m}_{i}" for m in names for i in (0, 1)]


class _ShardWriter:
    """Writes rows to `<output_dir>/data/<split>-NNNNN-of-MMMMM.parquet` so `datasets.load_dataset(output_dir)` reads
    them back as split `<split>`.

    Shards are written as `.parquet.tmp` files while labeling runs and renamed at the end. A shard holds every
    buffered row once there are at least `rows_per_shard`, so it always ends at a batch boundary: what is on disk is
    then exactly the rows up to a known input position, which is what resuming needs. `resume_paths` are the shards of
    an interrupted run, kept and continued.
    """

    def __init__(self, output_dir, split, rows_per_shard, features, resume_paths=None):
        self.data_dir = os.path.join(output_dir, "data")
        os.makedirs(self.data_dir, exist_ok=True)
        keep = set(resume_paths or [])
        for old in glob.glob(os.path.join(self.data_dir, f"{split}-*.parquet*")):
            if old not in keep:
                os.remove(old)
        self.split, self.rows_per_shard, self.features = split, rows_per_shard, features
        self.rows, self.paths = [], list(resume_paths or [])

    def add(self, rows) -> bool:
        """Buffers rows; returns True when that wrote a shard."""
        self.rows.extend(rows)
        if len(self.rows) < self.rows_per_shard:
            return False
        self._flush(self.rows)
        self.rows = []
        return True

    def _flush(self, rows):
        import datasets

        path = os.path.join(self.data_dir, f"{self.split}-{len(self.paths):05d}.parquet.tmp")
        partial = path + ".partial"  # a shard cut short by a kill is never taken for a finished one
        datasets.Dataset.from_list(rows, features=self.features).to_parquet(partial)
        os.replace(partial, path)
        self.paths.append(path)

    def close(self):
        if self.rows or not self.paths:
            self._flush(self.rows)
            self.rows = []
        final = []
        for i, path in enumerate(self.paths):
            target = os.path.join(self.data_dir, f"{self.split}-{i:05d}-of-{len(self.paths):05d}.parquet")
            os.replace(path, target)
            final.append(target)
        return final


# What decides the labels: a resumed run must use the same.
_LABEL_RUN_KEYS = (
    "dataset_name", "dataset_config_name", "split", "streaming", "caption_column", "image_0_column", "image_1_column",
    "label_0_column", "max_samples", "batch_size", "rows_per_shard", "reward_models", "dtype", "consensus",
    "abstain_margin", "tie_policy", "min_agreement", "human_vote", "seed", "normalize_warmup_pairs",
)  # fmt: skip


def _label_run_fingerprint(args) -> dict:
    fingerprint = {key: getattr(args, key, None) for key in _LABEL_RUN_KEYS}
    fingerprint["reward_config"] = load_reward_config(args.reward_config)
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def _label_progress_path(args) -> str:
    return os.path.join(args.output_dir, f"labeling_{args.split}.progress.json")


def _read_label_progress(args) -> Optional[dict]:
    """The state of an interrupted `label` run in `--output_dir`, checked against these arguments; None when there
    is none or `--overwrite` is given. Stops with a clear error when one exists and neither `--resume` nor
    `--overwrite` says what to do with it, so that finished shards are never deleted by accident."""
    path = _label_progress_path(args)
    if not os.path.isfile(path) or args.overwrite:
        return None
    with open(path, encoding="utf-8") as f:
        progress = json.load(f)
    if not args.resume:
        raise SystemExit(
            f"error: {args.output_dir} holds an unfinished labeling run ({progress['rows_consumed']} input rows "
            "done). Add --resume to continue it, or --overwrite to start over."
        )
    fingerprint = _label_run_fingerprint(args)
    changed = sorted(k for k in fingerprint if fingerprint[k] != progress["fingerprint"].get(k))
    if changed:
        raise SystemExit(
            f"error: --resume with other settings than the interrupted run ({', '.join(changed)}). Use the same "
            "arguments, or --overwrite to start over."
        )
    data_dir = os.path.join(args.output_dir, "data")
    paths = [os.path.join(data_dir, name) for name in progress["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"error: cannot resume: shard {missing[0]} is gone. Use --overwrite to start over.")
    progress["shard_paths"] = paths
    return progress


def _write_label_progress(args, state: dict):
    path = _label_progress_path(args)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def _output_features(dataset, names):
    import datasets

    features = dataset.features
    if features is None:
        return None
    features = datasets.Features(dict(features))
    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            features[column] = datasets.Image()
    for column in _precomputed_columns(names) + ["consensus_label", "consensus_prob", "agreement"]:
        features[column] = datasets.Value("float32")
    features["consensus_keep"] = datasets.Value("bool")
    return features


def _write_label_progress_if_started(
    args, writer, fingerprint, rows_consumed, counts, agreement_sum, bad_examples, labeler
):
    """Records the position after which an interrupted run resumes; only once a shard exists (before that, a
    resumed run simply starts over)."""
    if not writer.paths:
        return
    _write_label_progress(
        args,
        {
            "fingerprint": fingerprint,
            "rows_consumed": rows_consumed,
            "shards": [os.path.basename(p) for p in writer.paths],
            "counts": counts,
            "agreement_sum": agreement_sum,
            "bad_examples": bad_examples.state_dict(),
            "labeler": {
                "normalized_sum": labeler.normalized_state.state_dict(),
                "generator": labeler.generator.get_state().tolist(),
            },
        },
    )


def cmd_label(args):
    from tqdm.auto import tqdm

    from preference_data import BadExampleTracker, DataError

    dataset = _load_dataset(args)
    scorers = build_scorers(
        args.reward_models,
        args.reward_config,
        device=_default_device(args.device),
        dtype=args.dtype,
        cuda_graphs=not args.no_cuda_graphs,
    )
    labeler = _labeler_from_args(args, scorers.temperatures, scorers.weights)
    progress_state = _read_label_progress(args)
    writer = _ShardWriter(
        args.output_dir,
        args.split,
        args.rows_per_shard,
        _output_features(dataset, scorers.names),
        resume_paths=progress_state["shard_paths"] if progress_state else None,
    )
    total = None if args.streaming else len(dataset)
    if args.max_samples is not None:
        total = min(total, args.max_samples) if total is not None else args.max_samples
    counts = {
        "rows": 0,
        "skipped_undecodable": 0,
        "skipped_invalid": 0,
        "kept": 0,
        "agree_with_human": 0,
        "human_decisive": 0,
    }
    bad_examples = BadExampleTracker(args.max_bad_examples, logger=logger)
    agreement_sum = 0.0
    start = 0
    if progress_state is not None:
        start = progress_state["rows_consumed"]
        counts.update(progress_state["counts"])
        agreement_sum = progress_state["agreement_sum"]
        bad_examples.load_state_dict(progress_state["bad_examples"])
        labeler.normalized_state.load_state_dict(progress_state["labeler"]["normalized_sum"])
        labeler.generator.set_state(torch.tensor(progress_state["labeler"]["generator"], dtype=torch.uint8))
        print(f"resuming after {start} input rows ({len(writer.paths)} shard(s) kept)")
    fingerprint = _label_run_fingerprint(args)
    progress = tqdm(total=total, initial=start, unit="pair", desc="labeling")
    for row_ids, rows in _iter_batches(dataset, args.batch_size, args.max_samples, with_ids=True, start=start):
        progress.update(len(rows))
        num_rows = len(rows)
        rows_consumed = row_ids[-1] + 1
        rows, images_0, images_1, bad = _decode_pairs(rows, args, row_ids)
        counts["skipped_undecodable"] += sum(1 for *_, undecodable in bad if undecodable)
        counts["skipped_invalid"] += sum(1 for *_, undecodable in bad if not undecodable)
        try:
            bad_examples.update([(row_id, reason) for row_id, reason, _ in bad], num_seen=num_rows)
        except DataError as error:
            raise SystemExit(f"error: {error}") from None
        if not rows:
            if not writer.rows:  # nothing buffered: the position can move on
                _write_label_progress_if_started(args, writer, fingerprint, rows_consumed, counts, agreement_sum,
                                                 bad_examples, labeler)  # fmt: skip
            continue
        scores_0, scores_1 = scorers.score_pairs(images_0, images_1, [r[args.caption_column] for r in rows])
        human = _human_labels(rows, args.label_0_column)
        result = labeler(scores_0, scores_1, human)
        out_rows = []
        for i, row in enumerate(rows):
            row = dict(row)
            for m in scorers.names:
                row[f"score_{m}_0"], row[f"score_{m}_1"] = float(scores_0[m][i]), float(scores_1[m][i])
            keep = bool(result.keep[i])
            # Dropped pairs carry NaN labels, so a reader that only looks at the label cannot train on them.
            row["consensus_label"] = float(result.label[i]) if keep else float("nan")
            row["consensus_prob"] = float(result.prob[i]) if keep else float("nan")
            row["agreement"] = float(result.agreement[i])
            row["consensus_keep"] = keep
            out_rows.append(row)
        counts["rows"] += len(rows)
        counts["kept"] += result.num_kept
        agreement_sum += float(result.agreement.sum())
        if human is not None:
            decisive = result.keep & torch.isfinite(human) & (human != 0.5)
            counts["human_decisive"] += int(decisive.sum())
            counts["agree_with_human"] += int((decisive & ((result.label > 0.5) == (human > 0.5))).sum())
        if writer.add(out_rows):
            # Everything up to this row is on disk: a killed run resumes from here (`--resume`).
            _write_label_progress_if_started(args, writer, fingerprint, rows_consumed, counts, agreement_sum,
                                             bad_examples, labeler)  # fmt: skip
    progress.close()
    shards = writer.close()
    summary = {
        "dataset_name": args.dataset_name,
        "split": args.split,
        "reward_models": scorers.names,
        "reward_config": load_reward_config(args.reward_config),
        "temperatures": scorers.temperatures,
        "weights": scorers.weights,
        "consensus": labeler.config(),
        "normalized_sum_state": labeler.normalized_state.state_dict(),
        "counts": counts,
        "bad_examples": bad_examples.state_dict(),
        "shards": [os.path.relpath(s, args.output_dir) for s in shards],
    }
    with open(os.path.join(args.output_dir, f"labeling_{args.split}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    if os.path.exists(_label_progress_path(args)):
        os.remove(_label_progress_path(args))
    rows = max(counts["rows"], 1)
    print(f"wrote {counts['rows']} pairs to {len(shards)} parquet shard(s) under {writer.data_dir}")
    print(f"skipped {counts['skipped_undecodable']} pair(s) with undecodable images")
    if counts["skipped_invalid"]:
        print(f"skipped {counts['skipped_invalid']} pair(s) with a missing or empty caption or an invalid label")
    print(
        f"kept {counts['kept']} / {counts['rows']} pairs ({100.0 * counts['kept'] / rows:.1f}%), "
        f"mean agreement {agreement_sum / rows:.3f}"
    )
    if counts["human_decisive"]:
        print(
            f"consensus agrees with the human label on {counts['agree_with_human']} / {counts['human_decisive']} "
            "kept pairs with a decisive human label"
        )
    return summary


def _accuracy(deltas: np.ndarray, human: np.ndarray) -> float:
    """Share of decisive human pairs where the metric prefers the same image (metric ties count 1/2)."""
    decisive = np.isfinite(human) & (human != 0.5) & np.isfinite(deltas)
    if not decisive.any():
        return float("nan")
    agree = np.sign(deltas[decisive]) == np.sign(human[decisive] - 0.5)
    ties = deltas[decisive] == 0
    return float(np.mean(np.where(ties, 0.5, agree.astype(np.float64))))


def _expected_accuracy(deltas, human, temperature):
    decisive = np.isfinite(human) & (human != 0.5) & np.isfinite(deltas)
    if not decisive.any():
        return float("nan")
    p = _sigmoid_np(deltas[decisive] / temperature)
    return float(np.mean(np.where(human[decisive] > 0.5, p, 1.0 - p)))


def _consensus_accuracy(args, scores_0, scores_1, human, temperatures, weights):
    labeler = _labeler_from_args(args, temperatures, weights)
    labeler.human_vote = False  # measure the metrics' consensus against the human label
    result = labeler(scores_0, scores_1, human if args.tie_policy == "human" or args.consensus == "human" else None)
    human = human.numpy()
    decisive = result.keep.numpy() & np.isfinite(human) & (human != 0.5)
    accuracy = (
        float(np.mean((result.label.numpy()[decisive] > 0.5) == (human[decisive] > 0.5)))
        if decisive.any()
        else float("nan")
    )
    return accuracy, float(result.keep.float().mean()) if len(result.keep) else float("nan")


def cmd_calibrate(args):
    from tqdm.auto import tqdm

    dataset = _load_dataset(args)
    names = _parse_names(args.reward_models)
    config = load_reward_config(args.reward_config)
    columns = list(dataset.features) if dataset.features is not None else []
    precomputed = not args.rescore and all(c in columns for c in _precomputed_columns(names))
    if args.label_0_column not in columns and columns:
        raise SystemExit(f"error: calibration needs human labels; no column '{args.label_0_column}' in {columns}.")
    scorers = None
    if precomputed:
        print(f"using the precomputed score columns {_precomputed_columns(names)}")
        temperatures = {
            m: float(config.get(m, {}).get("temperature", DEFAULT_TEMPERATURES.get(m, 1.0))) for m in names
        }
        weights = {m: float(config.get(m, {}).get("weight", 1.0)) for m in names}
    else:
        scorers = build_scorers(
            names, config, device=_default_device(args.device), dtype=args.dtype, cuda_graphs=not args.no_cuda_graphs
        )
        temperatures, weights = scorers.temperatures, scorers.weights
    from preference_data import BadExampleTracker, DataError

    bad_examples = BadExampleTracker(args.max_bad_examples, logger=logger)
    all_0 = {m: [] for m in names}
    all_1 = {m: [] for m in names}
    human_all, skipped = [], 0
    batches = _iter_batches(dataset, args.batch_size, args.max_samples, with_ids=True)
    for row_ids, rows in tqdm(batches, desc="calibrating", unit="batch"):
        if precomputed:
            scores_0 = {m: torch.tensor([float(r[f"score_{m}_0"]) for r in rows]) for m in names}
            scores_1 = {m: torch.tensor([float(r[f"score_{m}_1"]) for r in rows]) for m in names}
        else:
            num_rows = len(rows)
            rows, images_0, images_1, bad = _decode_pairs(rows, args, row_ids)
            skipped += len(bad)
            try:
                bad_examples.update([(row_id, reason) for row_id, reason, _ in bad], num_seen=num_rows)
            except DataError as error:
                raise SystemExit(f"error: {error}") from None
            if not rows:
                continue
            scores_0, scores_1 = scorers.score_pairs(images_0, images_1, [r[args.caption_column] for r in rows])
        for m in names:
            all_0[m].append(scores_0[m].double())
            all_1[m].append(scores_1[m].double())
        human_all.append(_human_labels(rows, args.label_0_column))
    if not human_all:
        raise SystemExit("error: no usable pairs to calibrate on.")
    scores_0 = {m: torch.cat(v) for m, v in all_0.items()}
    scores_1 = {m: torch.cat(v) for m, v in all_1.items()}
    human = torch.cat(human_all)
    human_np = human.numpy()
    known = np.isfinite(human_np)

    fitted, report = {}, []
    for m in names:
        deltas = (scores_0[m] - scores_1[m]).numpy()
        tau = fit_temperature(deltas[known], human_np[known])
        if tau is None:
            print(
                f"warning: '{m}' does not agree with the human labels better than chance; keeping tau={temperatures[m]:.4g}"
            )
            tau = temperatures[m]
        fitted[m] = tau
        report.append(
            [
                m,
                f"{temperatures[m]:.4g}",
                f"{tau:.4g}",
                f"{_accuracy(deltas, human_np):.3f}",
                f"{_expected_accuracy(deltas, human_np, temperatures[m]):.3f}",
                f"{_expected_accuracy(deltas, human_np, tau):.3f}",
                f"{_nll(deltas[known], human_np[known], temperatures[m]):.4f}",
                f"{_nll(deltas[known], human_np[known], tau):.4f}",
            ]
        )
    print(
        f"\n{int(known.sum())} pairs with a human label ({int((known & (human_np == 0.5)).sum())} ties as 0.5 targets); "
        f"{skipped} pair(s) skipped as unusable (undecodable image, empty caption or invalid label)"
    )
    print("accuracy: share of decisive human pairs where the metric prefers the same image (a temperature does not")
    print(
        "change it); expected accuracy: mean probability given to the human choice; nll: mean negative log-likelihood"
    )
    _print_table(
        [
            "metric",
            "tau before",
            "tau after",
            "accuracy",
            "exp.acc before",
            "exp.acc after",
            "nll before",
            "nll after",
        ],
        report,
    )
    before = _consensus_accuracy(args, scores_0, scores_1, human, temperatures, weights)
    after = _consensus_accuracy(args, scores_0, scores_1, human, fitted, weights)
    print(
        f"consensus ({args.consensus}) accuracy vs human labels: before {before[0]:.3f} (kept {100 * before[1]:.1f}%), "
        f"after {after[0]:.3f} (kept {100 * after[1]:.1f}%)"
    )
    for m in names:
        config.setdefault(m, {})["temperature"] = fitted[m]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    print(f"wrote {args.output}")
    return {"temperatures_before": temperatures, "temperatures": fitted, "config": config}


def main(input_args=None):
    args = parse_args(input_args)
    if args.command == "score":
        return cmd_score(args)
    if args.command == "label":
        return cmd_label(args)
    return cmd_calibrate(args)


if __name__ == "__main__":
    main()
