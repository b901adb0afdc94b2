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
"""Image decoding and the scorers' image preprocessing: weight-free and picklable, so it can run in DataLoader
workers."""

import hashlib
import io
import os
from typing import Callable, Dict, List

import numpy as np
import torch
from PIL import Image


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL image to RGB the way the reward models expect it.

    Transparency (RGBA, LA, PA, palette images with a transparent colour) is composited on white, 16-bit grayscale
    is scaled to 8 bits, and everything else (L, 1, P, CMYK, YCbCr, ...) goes through PIL's own RGB conversion.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image, got {type(image).__name__}.")
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source) -> Image.Image:
    """Opens an image from a path, raw bytes, a datasets Image dict or a PIL image and returns it in RGB.

    Raises ValueError naming the source when the data cannot be decoded.
    """
    name = source if isinstance(source, str) else type(source).__name__
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, dict):
            if source.get("bytes") is not None:
                return load_image(source["bytes"])
            if source.get("path"):
                return load_image(source["path"])
            raise ValueError("the image dict has neither 'bytes' nor 'path'")
        elif isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(source)))
        elif isinstance(source, (str, os.PathLike)):
            image = Image.open(source)
        else:
            raise TypeError(f"unsupported image type {type(source).__name__}")
        image.load()
        return to_rgb(image)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"Cannot decode image {name!r}: {error}") from error


def hash_image(image) -> str:
    """Content hash of a PIL image (mode, size and pixel bytes) or of a pixel tensor (dtype, shape and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(image, Image.Image):
        digest.update(f"{image.mode}:{image.size}".encode())
        digest.update(image.tobytes())
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().to("cpu").contiguous()
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        raise TypeError(f"Cannot hash {type(image).__name__}.")
    return digest.hexdigest()


def _as_image_list(images) -> List[Image.Image]:
    if isinstance(images, Image.Image):
        return [images]
    return list(images)


class CLIPImagePreprocessor:
    """CLIP's PIL pipeline: bicubic resize of the shortest side, center crop, scale to [0, 1], normalise.

    It reproduces the transformers CLIP image processor with `backend="pil"` (resize size `int(size * long /
    short)`, crop offset `(h - crop_h) // 2`), holds no model weights, and is picklable, so it can run in DataLoader
    workers. Returns a float32 CPU tensor `[N, 3, crop_h, crop_w]`.
    """

    def __init__(self, size=224, crop_size=None, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, resample=3):
        if isinstance(size, dict):
            size = size.get("shortest_edge") or (size["height"], size["width"])
        self.size = size if isinstance(size, int) else tuple(int(s) for s in size)
        if crop_size is None:
            crop_size = self.size if isinstance(self.size, tuple) else (self.size, self.size)
        if isinstance(crop_size, dict):
            crop_size = (crop_size["height"], crop_size["width"])
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.resample = int(resample)

    @property
    def key(self) -> str:
        """Identifies the pipeline: scorers whose preprocessors have equal keys share one preprocessed tensor."""
        size = self.size if isinstance(self.size, int) else "x".join(map(str, self.size))
        return (
            f"clip-{size}-crop{self.crop_size[0]}x{self.crop_size[1]}-r{self.resample}"
            f"-m{','.join(f'{m:.6g}' for m in self.image_mean)}-s{','.join(f'{s:.6g}' for s in self.image_std)}"
        )

    def _resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if isinstance(self.size, tuple):
            new_height, new_width = self.size
        else:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.size, int(self.size * long / short)
            new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        return image.resize((new_width, new_height), resample=self.resample)

    def _crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        crop_height, crop_width = self.crop_size
        if crop_height > height or crop_width > width:
            # Smaller than the crop: pad with black around the centre first, as the processor does.
            canvas = Image.new("RGB", (max(width, crop_width), max(height, crop_height)), (0, 0, 0))
            canvas.paste(image, ((canvas.width - width + 1) // 2, (canvas.height - height + 1) // 2))
            image, (width, height) = canvas, canvas.size
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
        return image.crop((left, top, left + crop_width, top + crop_height))

    def process_one(self, image: Image.Image) -> np.ndarray:
        image = self._crop(self._resize(to_rgb(image)))
        array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return array.transpose(2, 0, 1)

    def __call__(self, images) -> torch.Tensor:
        images = _as_image_list(images)
        if not images:
            return torch.zeros(0, 3, *self.crop_size)
        return torch.from_numpy(np.ascontiguousarray(np.stack([self.process_one(im) for im in images])))

    def __repr__(self):
        return f"{type(self).__name__}({self.key})"


class PadToSquarePreprocessor:
    """HPS preprocessing: bicubic resize so the longest side is `size` (keeping the aspect ratio), pad to a square
    with black (left/top get the smaller half), scale to [0, 1] and normalise. Picklable, weight-free, CPU only."""

    def __init__(self, size=224, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, fill=0, resample=3):
        self.size = int(size)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.fill = int(fill)
        self.resample = int(resample)

    @property
    def key(self) -> str:
        return (
            f"pad_square-{self.size}-fill{self.fill}-r{self.resample}"
            f"-m{','.join(f'{m:.6g}' for m in self.image_mean)}-s{','.join(f'{s:.6g}' for s in self.image_std)}"
        )

    def process_one(self, image: Image.Image) -> np.ndarray:
        image = to_rgb(image)
        width, height = image.size
        scale = self.size / float(max(width, height))
        new_width, new_height = round(width * scale), round(height * scale)
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), resample=self.resample)
        canvas = Image.new("RGB", (self.size, self.size), (self.fill,) * 3)
        canvas.paste(image, ((self.size - new_width) // 2, (self.size - new_height) // 2))
        array = np.asarray(canvas, dtype=np.float32) / np.float32(255.0)
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return array.transpose(2, 0, 1)

    def __call__(self, images) -> torch.Tensor:
        images = _as_image_list(images)
        if not images:
            return torch.zeros(0, 3, self.size, self.size)
        return torch.from_numpy(np.ascontiguousarray(np.stack([self.process_one(im) for im in images])))

    def __repr__(self):
        return f"{type(self).__name__}({self.key})"


class MultiPreprocessor:
    """Runs each distinct preprocessing once: list of PIL images -> {preprocess_key: Tensor[N, 3, H, W]}.

    Picklable (it only holds the weight-free preprocessors), so it can be the transform of a DataLoader worker.
    """

    def __init__(self, preprocessors: Dict[str, Callable]):
        self.preprocessors = dict(preprocessors)

    @property
    def keys(self) -> List[str]:
        return list(self.preprocessors)

    def __call__(self, images) -> Dict[str, torch.Tensor]:
        images = [to_rgb(image) for image in _as_image_list(images)]
        return {key: preprocessor(images) for key, preprocessor in self.preprocessors.items()}

    def __repr__(self):
        return f"{type(self).__name__}({list(self.preprocessors.values())})"
