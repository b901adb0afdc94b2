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
"""Image-preference pairs for Diffusion-DPO style training: loading, validation, decoding, joint augmentation.

A training example is a prompt and two images of it, optionally with a human label (`label_0` = 1.0 when image 0 is
preferred, 0.0 when image 1 is, 0.5 for a tie), in the Pick-a-Pic v2 layout by default. This module is shared by
both training scripts:

- `load_preference_dataset` loads a Hub dataset, a local folder of data files or a `save_to_disk` folder, map-style
  or streaming, and `check_columns` fails early (before any model is loaded) on missing columns or wrong types.
- `decode_image` turns any stored image (bytes, `{"bytes", "path"}` dicts, PIL images, file paths; any PIL mode)
  into a fully decoded RGB image, and `normalize_label` validates the human label.
- `PairTransform` augments the two images of a pair jointly (same flip, same relative crop) and reports the
  original size and crop offset SDXL needs for its micro-conditioning.
- `PreferencePairs` (map-style) and `StreamingPreferencePairs` (iterable, split across DataLoader workers and
  processes) turn rows into training items. Every random decision is drawn from a generator seeded by
  `(seed, epoch, row id)`, so an item does not depend on the number of workers or on where a run was resumed.
  A bad row never raises: it becomes `{"index": i, "bad_reason": ...}`.
- `PairCollator` batches the usable items and reports the bad ones, and `BadExampleTracker` counts them and stops
  the run (`--max_bad_examples`) when the data is mostly broken.
"""

import argparse
import collections
import io
import json
import logging
import math
import numbers
import os
import random

import numpy as np
import torch
from PIL import Image, ImageOps


logger = logging.getLogger(__name__)

# Column names of Pick-a-Pic v2 (yuvalkirstain/pickapic_v2), the reference format.
PICKAPIC_COLUMNS = {"caption": "caption", "image_0": "jpg_0", "image_1": "jpg_1", "label_0": "label_0"}

# The command line flag that names each column, quoted in error messages so that users know what to change.
COLUMN_FLAGS = {
    "caption": "--caption_column",
    "image_0": "--image_0_column",
    "image_1": "--image_1_column",
    "label_0": "--label_0_column",
}

# Keys of a training item; extra columns must not shadow them.
ITEM_KEYS = (
    "index",
    "caption",
    "train_caption",
    "label_0",
    "pixel_values_0",
    "pixel_values_1",
    "original_size_0",
    "original_size_1",
    "crop_top_left_0",
    "crop_top_left_1",
    "flip",
    "scorer_inputs",
)

# Keys of a batch; extra columns must not shadow them either.
BATCH_KEYS = (
    "pixel_values_0",
    "pixel_values_1",
    "original_sizes",
    "crop_top_lefts",
    "flips",
    "label_0",
    "captions",
    "train_captions",
    "indices",
    "scorer_inputs",
    "bad_examples",
    "skipped_examples",
    "batch_size",
    "num_rows",
)

_SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}


class DataError(ValueError):
    """The dataset or its configuration cannot be used; the message says what is wrong and which flag fixes it."""


class BadExampleError(ValueError):
    """One row cannot be used (undecodable image, invalid label, empty caption...); the message gives the reason."""


class _FlagValueError(ValueError, argparse.ArgumentTypeError):
    # An ArgumentTypeError too, so that argparse shows our message when used as `type=`.
    pass


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------------


def _is_saved_to_disk(path):
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in _SAVE_TO_DISK_MARKERS)


def _available_splits(path, config_name, cache_dir):
    import datasets

    try:
        return list(datasets.get_dataset_split_names(path, config_name, cache_dir=cache_dir))
    except Exception:  # the list is only a hint in an error message
        return None


def _load_from_disk(path, split, streaming, num_shards):
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"Split '{split}' not found in the dataset saved at {path}; available splits: "
                f"{', '.join(loaded.keys())}. Set --dataset_split_name to one of them."
            )
        dataset = loaded[split]
    else:
        dataset = loaded
        if dataset.split is not None and str(dataset.split) != split:
            raise DataError(
                f"The dataset saved at {path} holds only the '{dataset.split}' split, not '{split}'. "
                f"Set --dataset_split_name {dataset.split}."
            )
    if streaming:
        if num_shards is None:
            # Several shards let `StreamingPreferencePairs(split_by="shards")` spread them over readers.
            num_shards = max(1, min(len(dataset), 64))
        dataset = dataset.to_iterable_dataset(num_shards=num_shards)
    return dataset


def load_preference_dataset(
    dataset_name=None,
    dataset_config_name=None,
    train_data_dir=None,
    split="train",
    streaming=False,
    cache_dir=None,
    shuffle_seed=None,
    max_train_samples=None,
    shuffle_buffer_size=1000,
    num_shards=None,
):
    """Loads one split of a preference dataset, map-style or streaming.

    Args:
        dataset_name (`str`, *optional*):
            A Hub dataset id (e.g. `yuvalkirstain/pickapic_v2`), a local folder of data files that
            `datasets.load_dataset` understands (parquet, json, csv...), a single data file, or a folder written by
            `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (detected and loaded with `datasets.load_from_disk`).
        dataset_config_name (`str`, *optional*): The dataset configuration, for Hub datasets that have several.
        train_data_dir (`str`, *optional*): A local folder, loaded like `dataset_name`. Give exactly one of the two.
        split (`str`): The split to load.
        streaming (`bool`): Return a `datasets.IterableDataset` (a `save_to_disk` folder is converted with
            `to_iterable_dataset`).
        cache_dir (`str`, *optional*): The `datasets` cache directory.
        shuffle_seed (`int`, *optional*): Streaming: shuffle with this seed (shard order and a buffer of
            `shuffle_buffer_size` rows; `set_epoch` reshuffles). Map-style: draw the `max_train_samples` subset at
            random with this seed; the stored order is kept otherwise (the DataLoader shuffles map-style data, and
            row ids in logs stay the stored row numbers). `None` keeps the stored order.
        max_train_samples (`int`, *optional*): Keep only the first rows (after shuffling): `select` map-style,
            `take` streaming.
        shuffle_buffer_size (`int`): Buffer size of the streaming shuffle.
        num_shards (`int`, *optional*): Shards of the iterable dataset made from a `save_to_disk` folder
            (default: up to 64).

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`.

    Raises:
        `DataError`: both or neither source given, a path that does not exist, an unknown split (the message
        lists the available ones), an empty split, or an invalid `max_train_samples`.
    """
    import datasets

    if (dataset_name is None) == (train_data_dir is None):
        raise DataError(
            "Give exactly one data source: --dataset_name (a Hub dataset id or a local dataset path) or "
            "--train_data_dir (a local folder of data files)."
        )
    if max_train_samples is not None and max_train_samples < 1:
        raise DataError(f"--max_train_samples must be a positive number of rows, got {max_train_samples}.")
    flag = "--dataset_name" if dataset_name is not None else "--train_data_dir"
    path = dataset_name if dataset_name is not None else train_data_dir
    if train_data_dir is not None and not os.path.isdir(train_data_dir):
        raise DataError(f"--train_data_dir {train_data_dir} is not a folder.")
    if path.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(path)):
        raise DataError(f"{flag} {path} does not exist.")  # a local path, not a Hub id
    path = os.path.expanduser(path)

    if _is_saved_to_disk(path):
        dataset = _load_from_disk(path, split, streaming, num_shards)
    else:
        builder_args = (path, dataset_config_name)
        builder_kwargs = {}
        if os.path.isfile(path):
            extension = os.path.splitext(path)[1].lower()
            if extension not in _FILE_BUILDERS:
                raise DataError(
                    f"{flag} {path} is a file of unknown type; give a folder, or a "
                    f"{'/'.join(sorted(_FILE_BUILDERS))} file."
                )
            builder_args = (_FILE_BUILDERS[extension],)
            builder_kwargs = {"data_files": {split: path}}
        try:
            dataset = datasets.load_dataset(
                *builder_args, split=split, streaming=streaming, cache_dir=cache_dir, **builder_kwargs
            )
        except ValueError as error:
            if "split" not in str(error).lower():
                raise DataError(f"{flag} {path} could not be loaded: {error}") from error
            available = _available_splits(path, dataset_config_name, cache_dir)
            hint = f"available splits: {', '.join(available)}" if available else str(error)
            raise DataError(
                f"Split '{split}' not found in {path} ({hint}). Set --dataset_split_name to one of them."
            ) from error
        except FileNotFoundError as error:
            raise DataError(
                f"{flag} {path} is neither a local dataset path nor a dataset that can be reached on the Hub "
                f"({error})."
            ) from error

    if not streaming and len(dataset) == 0:
        raise DataError(f"Split '{split}' of {path} is empty.")
    if shuffle_seed is not None:
        if streaming:
            dataset = dataset.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer_size)
        elif max_train_samples is not None and max_train_samples < len(dataset):
            # Map-style data is shuffled by the DataLoader's sampler; shuffling here only draws a random subset.
            # Without a subset the stored order is kept, so that row ids in logs are the stored row numbers.
            dataset = dataset.shuffle(seed=shuffle_seed)
    if max_train_samples is not None:
        if streaming:
            dataset = dataset.take(max_train_samples)
        else:
            dataset = dataset.select(range(min(max_train_samples, len(dataset))))
    return dataset


def _peek(dataset):
    """The first example of a (streaming) dataset, or None when it is empty."""
    for example in dataset.take(1):
        return example
    return None


def _feature_kind(feature):
    """Coarse kind of a `datasets` feature: "text", "binary", "number", "image", "image_struct" or "other"."""
    import datasets

    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.ClassLabel):
        return "number"
    if isinstance(feature, datasets.Value):
        dtype = feature.dtype
        if dtype in ("string", "large_string"):
            return "text"
        if dtype in ("binary", "large_binary"):
            return "binary"
        if dtype == "bool" or dtype.startswith(("int", "uint", "float")):
            return "number"
        return "other"
    if isinstance(feature, dict) and ("bytes" in feature or "path" in feature):
        return "image_struct"  # an Image column stored as a plain struct
    return "other"


def _value_kind(value):
    """Coarse kind of one stored value (used when a streaming dataset does not know its features)."""
    if value is None:
        return None
    if isinstance(value, str):
        return "text"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "binary"
    if isinstance(value, Image.Image):
        return "image"
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        return "image_struct"
    if isinstance(value, (numbers.Number, np.number)):
        return "number"
    return "other"


def _describe(feature):
    text = repr(feature)
    return text if len(text) < 80 else text[:77] + "..."


def check_columns(
    dataset,
    caption_column,
    image_0_column,
    image_1_column,
    label_0_column=None,
    require_label=False,
    extra_columns=(),
):
    """Fails early, with an actionable message, when the dataset lacks a column or a column has the wrong type.

    Works on `datasets.Dataset` and `datasets.IterableDataset`; when a streaming dataset does not know its
    features, the first example is read to check the types.

    Args:
        dataset: The dataset returned by `load_preference_dataset`.
        caption_column, image_0_column, image_1_column (`str`): Column names (flags `--caption_column`,
            `--image_0_column`, `--image_1_column`).
        label_0_column (`str`, *optional*): The human label column (`--label_0_column`), or None.
        require_label (`bool`): Whether a human label column is needed (e.g. to drop human ties).
        extra_columns (sequence of `str`, or `dict` column -> flag): Further columns that must exist.

    Raises:
        `DataError`: naming each missing column, the columns present and the flag to set, or a column whose type
        cannot be used.
    """
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DataError(
            f"Expected one split, got a dataset with splits {', '.join(dataset.keys())}; choose one with "
            "--dataset_split_name."
        )
    if require_label and label_0_column is None:
        raise DataError(
            "A human label column is needed (human consensus, human vote or dropping human ties) but none was "
            "given: set --label_0_column."
        )
    if isinstance(extra_columns, dict):
        extra = dict(extra_columns)
    else:
        extra = {name: f"the '{name}' column" for name in extra_columns}

    wanted = [
        ("caption", caption_column, COLUMN_FLAGS["caption"]),
        ("image_0", image_0_column, COLUMN_FLAGS["image_0"]),
        ("image_1", image_1_column, COLUMN_FLAGS["image_1"]),
    ]
    if label_0_column is not None:
        wanted.append(("label_0", label_0_column, COLUMN_FLAGS["label_0"]))
    wanted += [("extra", name, flag) for name, flag in extra.items()]

    features = dataset.features
    example = None
    if features is None:
        example = _peek(dataset)
        if example is None:
            raise DataError("The dataset is empty: it yielded no rows.")
        present = list(example.keys())
    else:
        present = list(features.keys())

    missing = [(role, name, flag) for role, name, flag in wanted if name not in present]
    if missing:
        lines = [
            f"column '{name}' (set {flag} to the right column)" if role != "extra" else f"column '{name}' ({flag})"
            for role, name, flag in missing
        ]
        raise DataError(
            "The dataset is missing "
            + "; ".join(lines)
            + f". Columns present: {', '.join(present) if present else '(none)'}."
        )

    expected = {
        "caption": ({"text"}, "text (strings)"),
        "image_0": ({"binary", "image", "image_struct", "text"}, "images (encoded bytes, an Image feature or paths)"),
        "image_1": ({"binary", "image", "image_struct", "text"}, "images (encoded bytes, an Image feature or paths)"),
        "label_0": ({"number"}, "numbers (1.0, 0.0 or 0.5)"),
    }
    for role, name, flag in wanted:
        if role == "extra":
            continue
        allowed, description = expected[role]
        if features is not None:
            kind, shown = _feature_kind(features[name]), _describe(features[name])
        else:
            value = example[name]
            kind, shown = _value_kind(value), type(value).__name__
            if kind is None:
                continue  # a missing value in the first row says nothing about the type
        if kind not in allowed:
            raise DataError(
                f"Column '{name}' ({flag}) should hold {description} but holds {shown}. "
                f"Set {flag} to the right column."
            )


# ----------------------------------------------------------------------------------------------------------------
# Decoding and labels
# ----------------------------------------------------------------------------------------------------------------


def _composite_on_white(image):
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _gray_to_rgb(array):
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).convert("RGB")


def _to_rgb(image):
    """Converts any PIL mode to RGB. Transparent pixels are composited on white, high bit depths scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        if mode == "La":
            image = image.convert("LA")
        return _composite_on_white(image)
    if mode.startswith("I;16"):
        # 16-bit grayscale (e.g. 16-bit PNG): full range 0..65535, scaled to 0..255.
        array = np.asarray(image).astype(np.float32)
        return _gray_to_rgb(np.rint(array / 257.0))
    if mode == "I":
        # 32-bit integers: 8-bit data as is, anything larger is taken as 16-bit.
        array = np.asarray(image)
        if array.size and (array.min() < 0 or array.max() > 255):
            return _gray_to_rgb(np.rint(np.clip(array, 0, 65535).astype(np.float32) / 257.0))
        return _gray_to_rgb(array)
    if mode == "F":
        # Floats: [0, 1] data is scaled to [0, 255], anything else clipped to it.
        array = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if array.size and array.min() >= 0.0 and array.max() <= 1.0:
            array = array * 255.0
        return _gray_to_rgb(np.rint(np.clip(array, 0.0, 255.0)))
    # L, 1, P, CMYK, YCbCr, RGBX, HSV...: PIL's own conversion.
    return image.convert("RGB")


def decode_image(value):
    """Decodes one stored image into a fully loaded RGB `PIL.Image.Image`.

    Accepts encoded bytes, `{"bytes": ..., "path": ...}` dicts (the storage of `datasets.Image`), PIL images and
    file paths. The pixels are loaded immediately, so truncated files fail here and not later in training. EXIF
    orientation is applied. Every mode becomes RGB: transparency (RGBA, LA, P with a transparent colour) is
    composited on white, 16-bit grayscale is scaled to 8 bits, CMYK and the others use PIL's conversion.

    Raises:
        `BadExampleError`: missing, empty, undecodable or truncated data.
    """
    if value is None:
        raise BadExampleError("image is missing")
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            value = data
        elif path:
            value = path
        else:
            raise BadExampleError("image is missing (no bytes and no path)")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            if len(value) == 0:
                raise BadExampleError("image data is empty")
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, (str, os.PathLike)):
            if not os.path.isfile(value):
                raise BadExampleError(f"image file not found: {value}")
            with open(value, "rb") as f:
                data = f.read()
            if not data:
                raise BadExampleError(f"image file is empty: {value}")
            image = Image.open(io.BytesIO(data))
        else:
            raise BadExampleError(f"cannot decode an image from a {type(value).__name__}")
        # Decode now: a truncated file raises here instead of handing grey pixels to training.
        image.load()
        orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        image.load()
    except BadExampleError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        message = str(error) or type(error).__name__
        raise BadExampleError(f"undecodable image ({type(error).__name__}: {message})") from error
    if image.width < 1 or image.height < 1:
        raise BadExampleError("image has no pixels")
    return image


def normalize_label(value):
    """Validates a human label: returns 1.0 (image 0 preferred), 0.0 (image 1 preferred) or 0.5 (tie).

    `None` and NaN mean "unlabelled" and give `float("nan")`.

    Raises:
        `BadExampleError`: any other value (e.g. 0.7, 2, "abc").
    """
    if value is None:
        return float("nan")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise BadExampleError(f"label {value!r} is not a number (expected 1, 0 or 0.5)") from None
    elif isinstance(value, (numbers.Number, np.number, np.bool_)) and not isinstance(value, complex):
        number = float(value)
    else:
        raise BadExampleError(f"label of type {type(value).__name__} is not a number (expected 1, 0 or 0.5)")
    if math.isnan(number):
        return float("nan")
    for allowed in (1.0, 0.0, 0.5):
        if abs(number - allowed) < 1e-6:
            return allowed
    raise BadExampleError(f"label {value!r} is not one of 1, 0 or 0.5")


# ----------------------------------------------------------------------------------------------------------------
# Joint augmentation
# ----------------------------------------------------------------------------------------------------------------


class PairTransform:
    """Resizes, crops and flips the two images of a pair with the same random decisions.

    Each image is resized so that its shorter side equals `resolution` (bilinear, antialiased), then cropped to
    `resolution` x `resolution`, then optionally flipped horizontally. Both images get the same flip and the same
    crop position expressed as a fraction of their free space (`offset = floor(u * (free + 1))`), so a pair of
    different sizes is cropped at the same relative place; a winner and a loser are never augmented differently.

    Outputs follow the SDXL micro-conditioning convention of diffusers' SDXL training examples:
    `original_size = (height, width)` of the decoded image before resizing, and `crop_top_left = (top, left)` of
    the crop in the resized image. When the crop is flipped, `left` is measured in the flipped resized image
    (`resized_width - resolution - left`), which is what the examples report when they flip before cropping: the
    reported offset is where the training pixels really are in the flipped picture.

    Args:
        resolution (`int`): Output side length.
        center_crop (`bool`): Center crops instead of random ones.
        random_flip (`bool`): Flip both images horizontally with probability 0.5.
    """

    def __init__(self, resolution, center_crop=False, random_flip=False):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __repr__(self):
        return (
            f"{type(self).__name__}(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip})"
        )

    def _resize(self, image):
        width, height = image.size
        size = self.resolution
        # Same rounding as torchvision's Resize(size): the long side is truncated.
        if width <= height:
            new_width, new_height = size, int(size * height / width)
        else:
            new_width, new_height = int(size * width / height), size
        new_width, new_height = max(new_width, size), max(new_height, size)
        if (new_width, new_height) == (width, height):
            return image
        return image.resize((new_width, new_height), Image.Resampling.BILINEAR)

    def _offset(self, free, fraction):
        if self.center_crop:
            return int(round(free / 2.0))
        return min(free, int(fraction * (free + 1)))

    def _to_tensor(self, image):
        # One pass from HWC uint8 into a contiguous CHW float32 buffer, scaled to [-1, 1] in place. NumPy rather
        # than torch ops: single-threaded and predictable in the main process as in DataLoader workers.
        array = np.asarray(image)
        chw = np.empty((3, self.resolution, self.resolution), dtype=np.float32)
        np.divide(array.transpose(2, 0, 1), np.float32(127.5), out=chw)
        np.subtract(chw, np.float32(1.0), out=chw)
        return torch.from_numpy(chw)

    def apply(self, image, flip, top_fraction, left_fraction):
        """Applies given decisions to one RGB image; returns (pixel values, original size, crop top-left)."""
        original_size = (image.height, image.width)
        resized = self._resize(image)
        free_h, free_w = resized.height - self.resolution, resized.width - self.resolution
        top, left = self._offset(free_h, top_fraction), self._offset(free_w, left_fraction)
        cropped = resized.crop((left, top, left + self.resolution, top + self.resolution))
        if flip:
            cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = free_w - left
        return self._to_tensor(cropped), original_size, (top, left)

    def __call__(self, image_0, image_1, rng=None):
        """Augments a pair of RGB PIL images with one set of random decisions drawn from `rng`.

        Returns:
            `dict` with `pixel_values_0`, `pixel_values_1` (float32 `[3, R, R]` in [-1, 1]), `original_size_0`,
            `original_size_1` (`(h, w)`), `crop_top_left_0`, `crop_top_left_1` (`(top, left)`), `flip` (`bool`).
        """
        rng = rng if rng is not None else random.Random()
        # Always draw the same number of values so that changing an option does not shift the other decisions.
        flip_draw, top_fraction, left_fraction = rng.random(), rng.random(), rng.random()
        flip = self.random_flip and flip_draw < 0.5
        pixels_0, size_0, crop_0 = self.apply(image_0, flip, top_fraction, left_fraction)
        pixels_1, size_1, crop_1 = self.apply(image_1, flip, top_fraction, left_fraction)
        return {
            "pixel_values_0": pixels_0,
            "pixel_values_1": pixels_1,
            "original_size_0": size_0,
            "original_size_1": size_1,
            "crop_top_left_0": crop_0,
            "crop_top_left_1": crop_1,
            "flip": flip,
        }


# ----------------------------------------------------------------------------------------------------------------
# Datasets of training items
# ----------------------------------------------------------------------------------------------------------------


def _shared_epoch():
    # In shared memory so that `set_epoch` also reaches persistent DataLoader workers.
    epoch = torch.zeros((), dtype=torch.int64)
    try:
        epoch.share_memory_()
    except RuntimeError:  # shared memory unavailable: fine without persistent workers
        pass
    return epoch


def _undecoded(dataset, columns):
    """Casts `datasets.Image` columns to undecoded storage so that images are decoded once, by `decode_image`."""
    import datasets

    features = dataset.features
    if features is None:
        return dataset
    for column in columns:
        feature = features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


class _PairBuilder:
    """Turns one raw row into a training item; shared by the map-style and the streaming dataset."""

    def __init__(
        self,
        dataset,
        transform,
        caption_column="caption",
        image_0_column="jpg_0",
        image_1_column="jpg_1",
        label_0_column="label_0",
        proportion_empty_prompts=0.0,
        drop_human_ties=False,
        scorer_preprocessor=None,
        seed=0,
        extra_columns=(),
    ):
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts}")
        if drop_human_ties and label_0_column is None:
            raise DataError("Dropping human ties needs the human label column: set --label_0_column.")
        self.transform = transform
        self.caption_column = caption_column
        self.image_0_column = image_0_column
        self.image_1_column = image_1_column
        self.label_0_column = label_0_column
        self.proportion_empty_prompts = float(proportion_empty_prompts)
        self.drop_human_ties = drop_human_ties
        self.scorer_preprocessor = scorer_preprocessor
        self.seed = int(seed)
        self.extra_columns = tuple(extra_columns)
        reserved = set(ITEM_KEYS) | set(BATCH_KEYS) | {"bad_reason", "skip_reason"}
        clashes = [c for c in self.extra_columns if c in reserved]
        if clashes:
            raise ValueError(f"extra_columns {clashes} clash with the keys of a training item")
        self.columns = [caption_column, image_0_column, image_1_column]
        if label_0_column is not None:
            self.columns.append(label_0_column)
        self.columns += [c for c in self.extra_columns if c not in self.columns]
        if dataset.features is not None:
            check_columns(
                dataset, caption_column, image_0_column, image_1_column, label_0_column, False, extra_columns
            )
            dataset = dataset.select_columns(self.columns)
            dataset = _undecoded(dataset, [image_0_column, image_1_column])
        self.dataset = dataset.with_format(None)  # plain Python values, whatever format the caller set
        self._epoch = _shared_epoch()

    @property
    def epoch(self):
        return int(self._epoch)

    def set_epoch(self, epoch):
        """Sets the epoch that seeds every random decision (and the streaming shuffle)."""
        self._epoch.fill_(int(epoch))

    def rng_for(self, index, epoch=None):
        """The generator of one row: seeded by `(seed, epoch, index)` only (str seeds hash with SHA-512)."""
        epoch = self.epoch if epoch is None else epoch
        return random.Random(f"{self.seed}:{epoch}:{index}")

    def build(self, row, index, epoch):
        index = int(index)
        try:
            caption = row.get(self.caption_column)
            if caption is None:
                raise BadExampleError("caption is missing")
            if not isinstance(caption, str):
                raise BadExampleError(f"caption is a {type(caption).__name__}, not text")
            if not caption.strip():
                raise BadExampleError("caption is empty")
            label_0 = float("nan")
            if self.label_0_column is not None:
                label_0 = normalize_label(row.get(self.label_0_column))
                if self.drop_human_ties and label_0 == 0.5:
                    return {"index": index, "skip_reason": "human tie"}
            images = []
            for name, column in (("image_0", self.image_0_column), ("image_1", self.image_1_column)):
                try:
                    images.append(decode_image(row.get(column)))
                except BadExampleError as error:
                    raise BadExampleError(f"{name} ({column}): {error}") from None
        except BadExampleError as error:
            return {"index": index, "bad_reason": str(error)}

        rng = self.rng_for(index, epoch)
        # Drawn first and always, so that crops and flips do not depend on proportion_empty_prompts.
        empty_draw = rng.random()
        item = {
            "index": index,
            "caption": caption,
            "train_caption": "" if empty_draw < self.proportion_empty_prompts else caption,
            "label_0": label_0,
        }
        item.update(self.transform(images[0], images[1], rng))
        if self.scorer_preprocessor is not None:
            # Scorers see the decoded originals, not the training crops.
            inputs = self.scorer_preprocessor(images)
            if not isinstance(inputs, dict):
                raise TypeError(f"scorer_preprocessor must return a dict of tensors, got {type(inputs).__name__}")
            item["scorer_inputs"] = {key: value.contiguous() for key, value in inputs.items()}
        for column in self.extra_columns:
            item[column] = row.get(column)
        return item


class PreferencePairs(torch.utils.data.Dataset):
    """Map-style dataset of training items built from a `datasets.Dataset` of preference pairs.

    An item is a dict with `index` (the row's position in `dataset`), `caption` (the real caption, for scoring),
    `train_caption` (`""` with probability `proportion_empty_prompts`), `label_0` (float, NaN when unknown),
    the `PairTransform` outputs, `scorer_inputs` (when `scorer_preprocessor` is given: its output on the two
    decoded original images, each value `[2, 3, H, W]`) and the values of `extra_columns` as stored.
    A bad row gives `{"index": i, "bad_reason": ...}`; with `drop_human_ties`, a tie gives
    `{"index": i, "skip_reason": "human tie"}`.

    All randomness (crop, flip, empty prompt) comes from `random.Random` seeded by `(seed, epoch, index)`.

    Args:
        dataset (`datasets.Dataset`): The rows.
        transform (`PairTransform`): The joint augmentation.
        caption_column, image_0_column, image_1_column (`str`): Column names.
        label_0_column (`str`, *optional*): Human label column, or None when the data has no human label.
        proportion_empty_prompts (`float`): Share of training captions replaced by `""`.
        drop_human_ties (`bool`): Skip rows whose human label is 0.5.
        scorer_preprocessor (*optional*): Picklable callable `list[PIL.Image] -> dict[str, Tensor[N, 3, H, W]]`.
        seed (`int`): Seed of every random decision.
        extra_columns (sequence of `str`): Columns passed through unchanged (e.g. precomputed consensus labels).
    """

    def __init__(
        self,
        dataset,
        transform,
        caption_column="caption",
        image_0_column="jpg_0",
        image_1_column="jpg_1",
        label_0_column="label_0",
        proportion_empty_prompts=0.0,
        drop_human_ties=False,
        scorer_preprocessor=None,
        seed=0,
        extra_columns=(),
    ):
        self.builder = _PairBuilder(
            dataset,
            transform,
            caption_column=caption_column,
            image_0_column=image_0_column,
            image_1_column=image_1_column,
            label_0_column=label_0_column,
            proportion_empty_prompts=proportion_empty_prompts,
            drop_human_ties=drop_human_ties,
            scorer_preprocessor=scorer_preprocessor,
            seed=seed,
            extra_columns=extra_columns,
        )
        self.dataset = self.builder.dataset

    @property
    def epoch(self):
        return self.builder.epoch

    def set_epoch(self, epoch):
        """Sets the epoch that seeds the random decisions of every item."""
        self.builder.set_epoch(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.builder.build(self.dataset[int(index)], index, self.builder.epoch)

    def __getitems__(self, indices):
        # One Arrow read per batch instead of one per row (DataLoader calls this with the batch's indices).
        indices = [int(i) for i in indices]
        columns = self.dataset[indices]
        epoch = self.builder.epoch
        return [
            self.builder.build({name: values[k] for name, values in columns.items()}, index, epoch)
            for k, index in enumerate(indices)
        ]


class StreamingPreferencePairs(torch.utils.data.IterableDataset):
    """Iterable dataset of training items built from a streaming `datasets.IterableDataset`.

    Items are those of `PreferencePairs`. The work is split over `world_size` processes times the DataLoader
    workers of each ("readers"), without duplicating or losing rows, in one of two ways:

    - `split_by="rows"` (default): every reader walks the stream in its single-process order and builds only the
      rows whose position `p` satisfies `p % num_readers == reader`; the others are skipped as Arrow data,
      without being decoded. `index` is `p`, the row's position in the stream (the stored row number when the
      stream is not shuffled), so items are the same whatever the number of workers or processes, `take()` and
      `shuffle()` keep their meaning, and processes get equal shares (within one row). Every reader reads the
      whole stream, which is cheap for local data; for remote data prefer "shards".
    - `split_by="shards"`: each reader reads whole source shards (files), shard `s` going to reader
      `s % num_readers`; the dataset needs at least `num_readers` shards. `index` is `s + num_shards * k` for the
      `k`-th row of shard `s` (shard = index % num_shards), also independent of the number of readers. Processes
      may get unequal shares (whole shards). `take()` and `shuffle()` apply per shard, as `datasets` does when it
      shards a dataset itself.

    Pass the dataset before any `split_dataset_by_node`: the split across processes happens here.

    Args:
        dataset (`datasets.IterableDataset`): The rows.
        transform, caption_column, image_0_column, image_1_column, label_0_column, proportion_empty_prompts,
        drop_human_ties, scorer_preprocessor, seed, extra_columns: As for `PreferencePairs`.
        rank (`int`), world_size (`int`): This process and the number of processes.
        split_by (`str`): "rows" or "shards", see above.
        read_batch_size (`int`): Rows read from the stream at a time.
    """

    def __init__(
        self,
        dataset,
        transform,
        caption_column="caption",
        image_0_column="jpg_0",
        image_1_column="jpg_1",
        label_0_column="label_0",
        proportion_empty_prompts=0.0,
        drop_human_ties=False,
        scorer_preprocessor=None,
        seed=0,
        extra_columns=(),
        rank=0,
        world_size=1,
        split_by="rows",
        read_batch_size=64,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if split_by not in ("rows", "shards"):
            raise ValueError(f"split_by must be 'rows' or 'shards', got {split_by!r}")
        self.builder = _PairBuilder(
            dataset,
            transform,
            caption_column=caption_column,
            image_0_column=image_0_column,
            image_1_column=image_1_column,
            label_0_column=label_0_column,
            proportion_empty_prompts=proportion_empty_prompts,
            drop_human_ties=drop_human_ties,
            scorer_preprocessor=scorer_preprocessor,
            seed=seed,
            extra_columns=extra_columns,
        )
        self.dataset = self.builder.dataset
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.split_by = split_by
        self.read_batch_size = int(read_batch_size)
        self._skip = None  # (epoch, num_batches, batch_size) set by skip_batches
        if split_by == "shards":
            self._check_shards(self.world_size)

    def _check_shards(self, num_readers):
        num_shards = self.dataset.num_shards
        if num_shards < num_readers:
            raise DataError(
                f"split_by='shards' needs at least one dataset shard per reader, but the dataset has {num_shards} "
                f"shards for {num_readers} readers (processes x DataLoader workers). Use split_by='rows', fewer "
                "--dataloader_num_workers, or a dataset with more files."
            )

    @property
    def epoch(self):
        return self.builder.epoch

    def set_epoch(self, epoch):
        """Sets the epoch: it seeds every random decision and reshuffles a shuffled stream."""
        self.builder.set_epoch(epoch)

    def skip_batches(self, num_batches, batch_size, epoch=None):
        """Resumes mid-epoch cheaply: the next iteration of `epoch` continues exactly where a
        `DataLoader(self, batch_size=batch_size, num_workers=W)` stopped after yielding `num_batches` batches of
        that epoch, without decoding the skipped rows.

        Workers yield whole batches in turn, so the reader that produced batch `b` is `b % W` and each reader skips
        `batch_size` rows per batch it had produced. The DataLoader restarts with worker 0, so worker `w` takes the
        role of reader `(w + num_batches) % W`, which keeps the batch order of the uninterrupted run. Call it with
        the same `batch_size` and number of workers as before the interruption, before creating the iterator.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        self._skip = (epoch, int(num_batches), int(batch_size))

    def _plan(self, epoch):
        """(reader, number of readers, rows to skip) for this process and DataLoader worker."""
        info = torch.utils.data.get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        to_skip = 0
        if self._skip is not None and self._skip[0] == epoch:
            _, num_batches, batch_size = self._skip
            worker = (worker + num_batches) % num_workers
            to_skip = len(range(worker, num_batches, num_workers)) * batch_size
        return self.rank * num_workers + worker, self.world_size * num_workers, to_skip

    def _arrow_batches(self, dataset, epoch):
        dataset = dataset.with_format("arrow")
        dataset.set_epoch(epoch)  # after with_format, which starts a new epoch counter
        # `iter` reads in the single-process order; plain iteration would let `datasets` split by worker itself.
        yield from dataset.iter(batch_size=self.read_batch_size)

    def _indexed_rows(self, reader, num_readers, epoch):
        """Yields (index, row) for the rows of this reader, converting only those rows to Python."""
        if self.split_by == "rows":
            position = 0
            for table in self._arrow_batches(self.dataset, epoch):
                first = (reader - position) % num_readers
                mine = list(range(first, table.num_rows, num_readers))
                if mine:
                    for offset, row in zip(mine, table.take(mine).to_pylist()):
                        yield position + offset, row
                position += table.num_rows
            return
        self._check_shards(num_readers)
        num_shards = self.dataset.num_shards
        for shard in range(reader, num_shards, num_readers):
            source = self.dataset.shard(num_shards=num_shards, index=shard, contiguous=True)
            position = 0
            for table in self._arrow_batches(source, epoch):
                for offset, row in enumerate(table.to_pylist()):
                    yield shard + num_shards * (position + offset), row
                position += table.num_rows

    def __iter__(self):
        epoch = self.epoch
        reader, num_readers, to_skip = self._plan(epoch)
        for index, row in self._indexed_rows(reader, num_readers, epoch):
            if to_skip > 0:
                to_skip -= 1
                continue
            yield self.builder.build(row, index, epoch)


# ----------------------------------------------------------------------------------------------------------------
# Batching and bad-row accounting
# ----------------------------------------------------------------------------------------------------------------


def _is_number(value):
    return isinstance(value, (numbers.Number, np.number, np.bool_)) and not isinstance(value, complex)


def _stack_column(values):
    """Numbers -> a tensor (bool, int64 or float32), tensors of one shape -> stacked, anything else -> the list."""
    if values and all(_is_number(v) for v in values):
        if all(isinstance(v, (bool, np.bool_)) for v in values):
            return torch.tensor([bool(v) for v in values], dtype=torch.bool)
        if all(isinstance(v, (numbers.Integral, np.integer)) for v in values):
            return torch.tensor([int(v) for v in values], dtype=torch.long)
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    if values and all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
        return torch.stack(values)
    return list(values)


class PairCollator:
    """Batches training items, dropping the bad and skipped ones and reporting them.

    Returns a dict with `pixel_values_0`, `pixel_values_1` (`[B, 3, R, R]` float32, contiguous),
    `original_sizes` and `crop_top_lefts` (`[B, 2, 2]` long; `[:, 0]` is image 0's `(h, w)` / `(top, left)`,
    `[:, 1]` image 1's), `flips` (`[B]` bool: both images flipped), `label_0` (`[B]` float32, NaN when unknown),
    `captions`, `train_captions` (lists of str),
    `indices` (`[B]` long), `scorer_inputs` (`dict` of `[B, 2, 3, H, W]`, when the items have them), the extra
    columns (tensors when numeric, else lists), the outputs of `tokenize_fn(train_captions)`, and the bookkeeping
    `bad_examples` (list of `(index, reason)`), `skipped_examples` (int), `batch_size` (B) and `num_rows`
    (rows that went into the batch: B + bad + skipped).

    When every row of a batch is bad or skipped, the batch is well formed with `batch_size` 0: empty tensors
    (`[0, 3, R, R]` when `resolution` is given) and no tokenizer outputs. Callers skip such batches.

    Args:
        tokenize_fn (*optional*): Picklable callable `list[str] -> dict[str, Tensor]` for the text encoders.
        resolution (`int`, *optional*): Only used to shape the pixel tensors of an empty batch.
    """

    def __init__(self, tokenize_fn=None, resolution=None):
        self.tokenize_fn = tokenize_fn
        self.resolution = resolution

    def __call__(self, examples):
        bad, skipped, kept = [], 0, []
        for example in examples:
            if "bad_reason" in example:
                bad.append((int(example["index"]), example["bad_reason"]))
            elif "skip_reason" in example:
                skipped += 1
            else:
                kept.append(example)

        batch = {"bad_examples": bad, "skipped_examples": skipped, "batch_size": len(kept), "num_rows": len(examples)}
        if not kept:
            side = self.resolution or 0
            batch.update(
                {
                    "pixel_values_0": torch.empty((0, 3, side, side)),
                    "pixel_values_1": torch.empty((0, 3, side, side)),
                    "original_sizes": torch.empty((0, 2, 2), dtype=torch.long),
                    "crop_top_lefts": torch.empty((0, 2, 2), dtype=torch.long),
                    "flips": torch.empty((0,), dtype=torch.bool),
                    "label_0": torch.empty((0,)),
                    "captions": [],
                    "train_captions": [],
                    "indices": torch.empty((0,), dtype=torch.long),
                }
            )
            return batch

        batch["pixel_values_0"] = torch.stack([e["pixel_values_0"] for e in kept]).contiguous()
        batch["pixel_values_1"] = torch.stack([e["pixel_values_1"] for e in kept]).contiguous()
        batch["original_sizes"] = torch.tensor(
            [[e["original_size_0"], e["original_size_1"]] for e in kept], dtype=torch.long
        )
        batch["crop_top_lefts"] = torch.tensor(
            [[e["crop_top_left_0"], e["crop_top_left_1"]] for e in kept], dtype=torch.long
        )
        batch["flips"] = torch.tensor([bool(e.get("flip", False)) for e in kept], dtype=torch.bool)
        batch["label_0"] = torch.tensor([float(e["label_0"]) for e in kept], dtype=torch.float32)
        batch["captions"] = [e["caption"] for e in kept]
        batch["train_captions"] = [e["train_caption"] for e in kept]
        batch["indices"] = torch.tensor([int(e["index"]) for e in kept], dtype=torch.long)
        if "scorer_inputs" in kept[0]:
            batch["scorer_inputs"] = {
                key: torch.stack([e["scorer_inputs"][key] for e in kept]) for key in kept[0]["scorer_inputs"]
            }
        for key in kept[0]:
            if key not in ITEM_KEYS:
                batch[key] = _stack_column([e[key] for e in kept])
        if self.tokenize_fn is not None:
            batch.update(self.tokenize_fn(batch["train_captions"]))
        return batch


def parse_max_bad_examples(value):
    """Parses `--max_bad_examples`: "100" -> 100 (a count), "0.05" -> 0.05 (a fraction), "none"/None -> None.

    Usable as an argparse `type=`. Raises `ValueError` naming the flag for anything else.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "null", "off"):
            return None
        try:
            number = float(text)
        except ValueError:
            number = None
    elif _is_number(value) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
    else:
        number = None
    if number is None or not math.isfinite(number) or number < 0 or (number >= 1 and number != int(number)):
        raise _FlagValueError(
            f"--max_bad_examples must be a whole number of rows (e.g. 100), a fraction between 0 and 1 "
            f"(e.g. 0.05) or 'none', got {value!r}."
        )
    if number >= 1 or number == 0:
        return int(number)
    return number


class BadExampleTracker:
    """Counts bad rows, logs each one with its row id, and stops the run when the data is mostly broken.

    `max_bad_examples` (see `parse_max_bad_examples`): a whole number N >= 1 allows N bad rows and stops at the
    next (0 stops at the first); a fraction 0 < f < 1 stops when more than f of the rows seen so far are bad,
    checked once at least `min_rows_for_fraction` rows were seen (default 100, so that a bad first batch does not
    stop a run); None never stops. Counts are part of the training state (`state_dict` / `load_state_dict`).

    Args:
        max_bad_examples (`int`, `float` or `None`): The limit.
        logger (*optional*): Where to log (`logging.Logger` or accelerate's logger); this module's by default.
        min_rows_for_fraction (`int`): Rows to see before a fraction limit applies.
        num_recent (`int`): How many recent reasons to keep for the error message.
    """

    def __init__(self, max_bad_examples=None, logger=None, min_rows_for_fraction=100, num_recent=5):
        if max_bad_examples is not None:
            max_bad_examples = parse_max_bad_examples(max_bad_examples)
        self.max_bad_examples = max_bad_examples
        self.logger = logger if logger is not None else logging.getLogger(__name__)
        self.min_rows_for_fraction = int(min_rows_for_fraction)
        self.num_bad = 0
        self.num_seen = 0
        self.num_skipped = 0
        self.recent = collections.deque(maxlen=num_recent)

    def update(self, bad_examples, num_seen, num_skipped=0):
        """Records one batch.

        Args:
            bad_examples (list of `(index, reason)`): The batch's bad rows (`batch["bad_examples"]`).
            num_seen (`int`): Rows examined in this update, bad and skipped ones included (`batch["num_rows"]`).
            num_skipped (`int`): Rows skipped on purpose (e.g. human ties); counted, never a reason to stop.

        Raises:
            `DataError`: when the bad rows exceed `max_bad_examples`.
        """
        for index, reason in bad_examples:
            self.logger.warning(f"Skipping bad example (row {index}): {reason}")
            self.recent.append((int(index), str(reason)))
        self.num_bad += len(bad_examples)
        self.num_seen += int(num_seen)
        self.num_skipped += int(num_skipped)
        if self.max_bad_examples is None:
            return
        limit = self.max_bad_examples
        if isinstance(limit, int):
            over = self.num_bad > limit
            what = f"more than {limit} bad rows"
        else:
            over = self.num_seen >= self.min_rows_for_fraction and self.num_bad > limit * self.num_seen
            what = f"more than {limit:.2%} of the rows seen"
        if over:
            reasons = "; ".join(f"row {index}: {reason}" for index, reason in self.recent)
            raise DataError(
                f"Stopping: {self.num_bad} bad rows out of {self.num_seen} seen, {what} (--max_bad_examples "
                f"{limit}). Last reasons: {reasons}. Fix the data or the column flags (--caption_column, "
                "--image_0_column, --image_1_column, --label_0_column), or raise --max_bad_examples (a count, a "
                "fraction below 1, or 'none' to never stop)."
            )

    def state_dict(self):
        return {
            "num_bad": self.num_bad,
            "num_seen": self.num_seen,
            "num_skipped": self.num_skipped,
            "recent": [list(item) for item in self.recent],
        }

    def load_state_dict(self, state_dict):
        self.num_bad = int(state_dict.get("num_bad", 0))
        self.num_seen = int(state_dict.get("num_seen", 0))
        self.num_skipped = int(state_dict.get("num_skipped", 0))
        self.recent.clear()
        for index, reason in state_dict.get("recent", []):
            self.recent.append((int(index), str(reason)))


# ----------------------------------------------------------------------------------------------------------------
# Prompts: for evaluation, generated pairs and online training
# ----------------------------------------------------------------------------------------------------------------

# Prompt sets of the paper's evaluation (docs/method.md §7), by name.
BUILTIN_PROMPT_SETS = {
    # Pick-a-Pic v2 `validation_unique`: 500 unique captions.
    "pickapic": {"dataset": "yuvalkirstain/pickapic_v2", "split": "validation_unique", "column": "caption"},
    # PartiPrompts: 1,632 prompts.
    "partiprompts": {"dataset": "nateraw/parti-prompts", "split": "train", "column": "Prompt"},
    # HPDv2 test split: 400 prompts, `test.json` of the HPDv2 dataset repository (a list of {"prompt", ...}).
    "hpdv2": {"repo_id": "ymhao/HPDv2", "filename": "test.json", "column": "prompt"},
}
PROMPT_COLUMN_CANDIDATES = ("caption", "prompt", "Prompt", "text")


def _clean_prompt(value):
    """The prompt as text, or None for an empty, missing or undecodable one (those are skipped and counted)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def _clean_prompts(values):
    prompts = [_clean_prompt(v) for v in values]
    return [p for p in prompts if p is not None], sum(p is None for p in prompts)


def _column(names, column, source):
    if column is not None:
        if column not in names:
            raise ValueError(f"Column {column!r} not in {source} (columns: {', '.join(names)}).")
        return column
    for candidate in PROMPT_COLUMN_CANDIDATES:
        if candidate in names:
            return candidate
    raise ValueError(f"No prompt column in {source} (columns: {', '.join(names)}); pass --prompt_column.")


def _dataset_prompts(path, column=None, split=None, max_prompts=None, parquet=False, **load_kwargs):
    """Prompts from a dataset column; streams, so a prompt column of a large Hub dataset needs no full download."""
    import datasets

    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if os.path.isfile(path) and extension in ("parquet", "csv", "json", "jsonl", "tsv"):
        builder = {"jsonl": "json", "tsv": "csv"}.get(extension, extension)
        if extension == "tsv":
            load_kwargs["sep"] = "\t"
        streams = datasets.load_dataset(builder, data_files=path, streaming=True, **load_kwargs)
    else:
        kwargs = dict(load_kwargs)
        if parquet and column is not None:
            kwargs["columns"] = [column]  # read only the prompt column (Pick-a-Pic rows carry two JPEGs each)
        streams = datasets.load_dataset(path, streaming=True, **kwargs)
    if split is None:
        split = next((s for s in ("test", "validation", "train") if s in streams), next(iter(streams)))
    elif split not in streams:
        raise ValueError(f"Split {split!r} not in {path} (splits: {', '.join(streams)}).")
    stream = streams[split]
    names = list(stream.features) if stream.features is not None else None
    prompts = []
    skipped = 0
    for row in stream:
        if names is None:
            names = list(row)
        column = _column(names, column, path)
        prompt = _clean_prompt(row[column])
        if prompt is None:
            skipped += 1
            continue
        prompts.append(prompt)
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
    return prompts, {"source": path, "split": split, "column": column, "skipped": skipped}


def load_prompts(source, column=None, split=None, max_prompts=None, cache_dir=None):
    """Prompts (for evaluation, generated pairs and online training) and a description of where they came from.

    `source` is a built-in name (`pickapic`, `partiprompts`, `hpdv2`), a `.txt` file (one prompt per line), a `.json`
    file (a list of strings, or of objects with a prompt column), or a dataset: a local folder or data file, or a
    Hub id, read from `column` of `split`. Order is kept; `max_prompts` keeps the first N. Empty, missing and
    undecodable prompts are skipped and counted in `info["skipped"]`.
    """
    if source in BUILTIN_PROMPT_SETS:
        spec = BUILTIN_PROMPT_SETS[source]
        if "repo_id" in spec:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(spec["repo_id"], spec["filename"], repo_type="dataset", cache_dir=cache_dir)
            with open(path, encoding="utf-8") as f:
                prompts, skipped = _clean_prompts(row.get(spec["column"]) for row in json.load(f))
            info = {
                "source": f"{spec['repo_id']}/{spec['filename']}",
                "split": "test",
                "column": spec["column"],
                "skipped": skipped,
            }
        else:
            prompts, info = _dataset_prompts(
                spec["dataset"],
                column=spec["column"],
                split=spec["split"],
                max_prompts=max_prompts,
                parquet=source == "pickapic",
            )
        info["name"] = source
    elif os.path.isfile(source) and source.lower().endswith(".txt"):
        with open(source, encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip("\n") for line in f]
        prompts, skipped = _clean_prompts(None if "\ufffd" in line else line for line in lines)
        info = {"source": source, "split": None, "column": None, "skipped": skipped}
    elif os.path.isfile(source) and source.lower().endswith(".json"):
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{source} must hold a JSON list of prompts.")
        if data and isinstance(data[0], dict):
            column = _column(list(data[0]), column, source)
            prompts, skipped = _clean_prompts(row.get(column) if isinstance(row, dict) else None for row in data)
        else:
            prompts, skipped = _clean_prompts(data)
        info = {"source": source, "split": None, "column": column, "skipped": skipped}
    else:
        prompts, info = _dataset_prompts(source, column=column, split=split, max_prompts=max_prompts)
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise ValueError(f"No prompts found in {source}.")
    return prompts, info
