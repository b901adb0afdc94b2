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
"""Tests of preference_data.py: loading, validation, decoding, joint augmentation, batching, bad-row accounting."""

import argparse
import io
import logging
import math
import os
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import preference_data as pd
from tiny_assets import build_tiny_pickapic_dataset, make_pickapic_rows


FEATURES = datasets.Features(
    {
        "caption": datasets.Value("string"),
        "jpg_0": datasets.Value("binary"),
        "jpg_1": datasets.Value("binary"),
        "label_0": datasets.Value("float64"),
        "label_1": datasets.Value("float64"),
    }
)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_shutdown_sleep(monkeypatch):
    # `datasets` sleeps 5 s after each pass over a shuffled parquet stream (a pyarrow thread-shutdown workaround);
    # harmless once per epoch in training, but it would dominate these tests.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_pickapic_dataset(str(tmp_path_factory.mktemp("pickapic")), num_train=48, num_test=16)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """24 rows in 4 parquet files, so that a streaming dataset has 4 shards."""
    root = tmp_path_factory.mktemp("sharded")
    os.makedirs(root / "data")
    rows = make_pickapic_rows(24, seed=3, image_size=48)
    for shard in range(4):
        part = datasets.Dataset.from_list(rows[shard * 6 : (shard + 1) * 6], features=FEATURES)
        part.to_parquet(str(root / "data" / f"train-{shard:05d}-of-00004.parquet"))
    return str(root)


def encode(image, format="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def asymmetric_image(width, height, seed=0):
    """A picture that differs from its mirror image and from any shifted crop of itself."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def pair_dataset(rows):
    """A map-style dataset from rows given as dicts (missing keys default to a valid pair)."""
    base = make_pickapic_rows(1)[0]
    full = [{**base, **row} for row in rows]
    return datasets.Dataset.from_list(full, features=FEATURES)


def item_tensors_equal(a, b):
    if a.keys() != b.keys():
        return False
    for key in a:
        if isinstance(a[key], torch.Tensor):
            if not torch.equal(a[key], b[key]):
                return False
        elif isinstance(a[key], float) and math.isnan(a[key]):
            if not math.isnan(b[key]):
                return False
        elif a[key] != b[key]:
            return False
    return True


class FixedRng:
    """Stands in for random.Random with predetermined draws (flip, top fraction, left fraction)."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


class ThumbnailPreprocessor:
    """A tiny picklable scorer preprocessor: each image resized to 8x8, scaled to [0, 1]."""

    def __call__(self, images):
        arrays = [np.array(image.resize((8, 8), Image.Resampling.BILINEAR)) for image in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return {"pixel_values": pixels}


class CountingTokenizer:
    """Picklable tokenize_fn: one id per character, padded to 16."""

    def __call__(self, captions):
        ids = torch.zeros((len(captions), 16), dtype=torch.long)
        for i, caption in enumerate(captions):
            codes = [ord(c) % 100 for c in caption[:16]]
            ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        return {"input_ids": ids}


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def test_load_by_path_map_style_and_max_train_samples(tiny_dir):
    dataset = pd.load_preference_dataset(dataset_name=tiny_dir)
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 48
    assert set(pd.PICKAPIC_COLUMNS.values()) <= set(dataset.column_names)

    same = pd.load_preference_dataset(train_data_dir=tiny_dir, split="test")
    assert len(same) == 16

    first = pd.load_preference_dataset(dataset_name=tiny_dir, max_train_samples=5)
    assert first["caption"] == dataset["caption"][:5]

    shuffled = pd.load_preference_dataset(dataset_name=tiny_dir, shuffle_seed=1, max_train_samples=10)
    assert len(shuffled) == 10
    assert shuffled["jpg_0"] != dataset["jpg_0"][:10]
    assert set(shuffled["jpg_0"]) <= set(dataset["jpg_0"])
    # Without a subset the stored order is kept (the DataLoader shuffles), so row ids are stored row numbers.
    assert pd.load_preference_dataset(dataset_name=tiny_dir, shuffle_seed=1)["jpg_0"] == dataset["jpg_0"]

    with pytest.raises(pd.DataError, match="exactly one"):
        pd.load_preference_dataset()
    with pytest.raises(pd.DataError, match="exactly one"):
        pd.load_preference_dataset(dataset_name=tiny_dir, train_data_dir=tiny_dir)
    with pytest.raises(pd.DataError, match="does not exist"):
        pd.load_preference_dataset(dataset_name=os.path.join(tiny_dir, "missing"))
    with pytest.raises(pd.DataError, match="--max_train_samples"):
        pd.load_preference_dataset(dataset_name=tiny_dir, max_train_samples=0)


def test_load_streaming_and_max_train_samples(tiny_dir):
    reference = pd.load_preference_dataset(dataset_name=tiny_dir)
    stream = pd.load_preference_dataset(dataset_name=tiny_dir, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert [row["caption"] for row in stream] == reference["caption"]

    taken = pd.load_preference_dataset(dataset_name=tiny_dir, streaming=True, max_train_samples=7)
    assert [row["caption"] for row in taken] == reference["caption"][:7]

    shuffled = pd.load_preference_dataset(dataset_name=tiny_dir, streaming=True, shuffle_seed=0, max_train_samples=7)
    captions = [row["jpg_0"] for row in shuffled]
    assert len(captions) == 7 and captions != reference["jpg_0"][:7]


def test_unknown_split_lists_available_splits(tiny_dir):
    for streaming in (False, True):
        with pytest.raises(pd.DataError) as error:
            pd.load_preference_dataset(dataset_name=tiny_dir, split="validation", streaming=streaming)
        message = str(error.value)
        assert "validation" in message and "train" in message and "test" in message
        assert "--dataset_split_name" in message


def test_load_save_to_disk_folders(tiny_dir, tmp_path):
    reference = pd.load_preference_dataset(dataset_name=tiny_dir)
    dict_dir, single_dir = str(tmp_path / "dict"), str(tmp_path / "single")
    datasets.DatasetDict({"train": reference, "test": reference.select(range(3))}).save_to_disk(dict_dir)
    reference.select(range(12)).save_to_disk(single_dir)

    loaded = pd.load_preference_dataset(dataset_name=dict_dir, split="test")
    assert isinstance(loaded, datasets.Dataset) and loaded["caption"] == reference["caption"][:3]
    stream = pd.load_preference_dataset(dataset_name=dict_dir, streaming=True, max_train_samples=9)
    assert isinstance(stream, datasets.IterableDataset)
    assert [row["caption"] for row in stream] == reference["caption"][:9]
    with pytest.raises(pd.DataError, match="available splits: train, test"):
        pd.load_preference_dataset(dataset_name=dict_dir, split="validation")

    single = pd.load_preference_dataset(train_data_dir=single_dir, max_train_samples=4)
    assert single["caption"] == reference["caption"][:4]
    single_stream = pd.load_preference_dataset(dataset_name=single_dir, streaming=True)
    assert single_stream.num_shards > 1  # several shards so that readers can split them
    assert sorted(row["caption"] for row in single_stream) == sorted(reference["caption"][:12])


# ----------------------------------------------------------------------------------------------------------------
# Column checks
# ----------------------------------------------------------------------------------------------------------------


def test_missing_columns_name_column_and_flag(tiny_dir):
    dataset = pd.load_preference_dataset(dataset_name=tiny_dir)
    with pytest.raises(pd.DataError) as error:
        pd.check_columns(dataset, "prompt", "jpg_0", "image_b", label_0_column="preference")
    message = str(error.value)
    for expected in ("'prompt'", "--caption_column", "'image_b'", "--image_1_column", "'preference'"):
        assert expected in message
    assert "--label_0_column" in message and "caption, jpg_0, jpg_1, label_0, label_1" in message
    assert "--image_0_column" not in message

    with pytest.raises(pd.DataError, match="--label_0_column"):
        pd.check_columns(dataset, "caption", "jpg_0", "jpg_1", label_0_column=None, require_label=True)
    with pytest.raises(pd.DataError, match="'consensus_label'"):
        pd.check_columns(dataset, "caption", "jpg_0", "jpg_1", extra_columns=("consensus_label",))
    pd.check_columns(dataset, "caption", "jpg_0", "jpg_1", label_0_column="label_0", require_label=True)

    stream = pd.load_preference_dataset(dataset_name=tiny_dir, streaming=True)
    with pytest.raises(pd.DataError, match="--caption_column"):
        pd.check_columns(stream, "text", "jpg_0", "jpg_1")


def test_wrong_column_types(tiny_dir):
    dataset = pd.load_preference_dataset(dataset_name=tiny_dir)
    with pytest.raises(pd.DataError, match=r"'label_1' \(--caption_column\) should hold text"):
        pd.check_columns(dataset, "label_1", "jpg_0", "jpg_1")
    with pytest.raises(pd.DataError, match=r"'label_1' \(--image_0_column\) should hold images"):
        pd.check_columns(dataset, "caption", "label_1", "jpg_1")
    with pytest.raises(pd.DataError, match=r"'caption' \(--label_0_column\) should hold numbers"):
        pd.check_columns(dataset, "caption", "jpg_0", "jpg_1", label_0_column="caption")

    # Image features and path strings are valid image columns.
    images = datasets.Dataset.from_dict(
        {"caption": ["a"], "jpg_0": [asymmetric_image(8, 8)], "jpg_1": ["/some/path.png"], "label_0": [1]}
    ).cast_column("jpg_0", datasets.Image())
    pd.check_columns(images, "caption", "jpg_0", "jpg_1", label_0_column="label_0")

    # A stream without known features is checked on its first example.
    def generate():
        yield {"caption": 3, "jpg_0": b"x", "jpg_1": b"y"}

    unknown = datasets.IterableDataset.from_generator(generate)
    unknown = unknown.map(lambda row: row)  # mapping drops the known features
    assert unknown.features is None
    with pytest.raises(pd.DataError, match="should hold text"):
        pd.check_columns(unknown, "caption", "jpg_0", "jpg_1")
    with pytest.raises(pd.DataError, match="--image_1_column"):
        pd.check_columns(unknown, "caption", "jpg_0", "image_1")


# ----------------------------------------------------------------------------------------------------------------
# Decoding and labels
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, format",
    [("L", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("P", "PNG"), ("1", "PNG"), ("RGB", "JPEG")],
)
def test_decode_modes_equal_pil_rgb_conversion(mode, format):
    source = asymmetric_image(24, 16).convert(mode)
    data = encode(source, format=format)
    stored = Image.open(io.BytesIO(data))
    assert stored.mode == mode
    decoded = pd.decode_image(data)
    assert decoded.mode == "RGB" and decoded.size == (24, 16)
    assert np.array_equal(np.asarray(decoded), np.asarray(stored.convert("RGB")))


def test_decode_transparency_is_composited_on_white():
    rgb = np.asarray(asymmetric_image(20, 10)).astype(np.float64)
    alpha = np.tile(np.linspace(0, 255, 20).round(), (10, 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), mode="RGBA")
    decoded = np.asarray(pd.decode_image(encode(rgba))).astype(np.float64)
    expected = rgb * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0)
    assert decoded.shape == (10, 20, 3)
    assert np.abs(decoded - expected).max() <= 1.0
    assert decoded[:, 0].min() == 255  # fully transparent column: white, not black

    gray_alpha = Image.fromarray(np.dstack([np.full((4, 4), 0, np.uint8), np.zeros((4, 4), np.uint8)]), mode="LA")
    assert np.asarray(pd.decode_image(encode(gray_alpha))).min() == 255

    palette = asymmetric_image(6, 6).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    reopened = Image.open(io.BytesIO(encode(palette)))
    assert "transparency" in reopened.info
    decoded = np.asarray(pd.decode_image(reopened))
    assert tuple(decoded[0, 0]) == (255, 255, 255)


def test_decode_16_bit_grayscale_scales_to_8_bits():
    array = (np.arange(16 * 12).reshape(12, 16) * 340).astype(np.uint16)
    stored = Image.open(io.BytesIO(encode(Image.fromarray(array))))
    assert stored.mode == "I;16"
    decoded = pd.decode_image(stored)
    expected = Image.fromarray(np.rint(array / 257.0).astype(np.uint8)).convert("RGB")
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))

    floats = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4))
    assert floats.mode == "F"
    assert np.asarray(pd.decode_image(floats))[..., 0].max() == 255


def test_decode_accepts_dicts_paths_and_pil_images(tmp_path):
    image = asymmetric_image(12, 9)
    data = encode(image)
    path = str(tmp_path / "image.png")
    with open(path, "wb") as f:
        f.write(data)
    expected = np.asarray(image)
    for value in (data, {"bytes": data, "path": None}, {"bytes": None, "path": path}, path, image):
        assert np.array_equal(np.asarray(pd.decode_image(value)), expected)


def test_undecodable_images_raise_bad_example_error():
    jpeg = encode(asymmetric_image(64, 64), format="JPEG")
    for value, reason in [
        (jpeg[: len(jpeg) // 2], "undecodable"),
        (b"definitely not an image", "undecodable"),
        (b"", "empty"),
        (None, "missing"),
        ({"bytes": None, "path": None}, "missing"),
        ("/no/such/file.png", "not found"),
        (12, "cannot decode"),
    ]:
        with pytest.raises(pd.BadExampleError, match=reason):
            pd.decode_image(value)


def test_normalize_label():
    assert pd.normalize_label(1) == 1.0 and pd.normalize_label(0.0) == 0.0 and pd.normalize_label(0.5) == 0.5
    assert pd.normalize_label(np.float32(0.5)) == 0.5 and pd.normalize_label(True) == 1.0
    assert math.isnan(pd.normalize_label(None)) and math.isnan(pd.normalize_label(float("nan")))
    for value in (0.7, 2, -1, "abc", [1.0], float("inf")):
        with pytest.raises(pd.BadExampleError):
            pd.normalize_label(value)


# ----------------------------------------------------------------------------------------------------------------
# Bad rows
# ----------------------------------------------------------------------------------------------------------------


def test_bad_rows_are_reported_not_raised():
    good = make_pickapic_rows(1)[0]
    jpeg = good["jpg_0"]
    dataset = pair_dataset(
        [
            {},
            {"jpg_0": jpeg[: len(jpeg) // 2]},
            {"jpg_1": b"garbage bytes"},
            {"jpg_1": None},
            {"label_0": 0.7},
            {"label_0": 2.0},
            {"caption": ""},
            {"caption": "   "},
            {"caption": None},
            {"label_0": None},
        ]
    )
    pairs = pd.PreferencePairs(dataset, pd.PairTransform(16))
    items = [pairs[i] for i in range(len(pairs))]
    assert "bad_reason" not in items[0] and "bad_reason" not in items[9]
    assert math.isnan(items[9]["label_0"])  # unlabelled is allowed
    expected = {
        1: "image_0 (jpg_0): undecodable",
        2: "image_1 (jpg_1): undecodable",
        3: "image_1 (jpg_1): image is missing",
        4: "label 0.7",
        5: "label 2.0",
        6: "caption is empty",
        7: "caption is empty",
        8: "caption is missing",
    }
    for index, reason in expected.items():
        assert items[index] == {"index": index, "bad_reason": items[index]["bad_reason"]}
        assert reason in items[index]["bad_reason"]


def test_drop_human_ties(tiny_dir):
    dataset = pd.load_preference_dataset(dataset_name=tiny_dir)
    ties = [i for i, label in enumerate(dataset["label_0"]) if label == 0.5]
    assert ties
    dropping = pd.PreferencePairs(dataset, pd.PairTransform(16), drop_human_ties=True)
    keeping = pd.PreferencePairs(dataset, pd.PairTransform(16))
    for i in ties:
        assert dropping[i] == {"index": i, "skip_reason": "human tie"}
        assert keeping[i]["label_0"] == 0.5
    other = next(i for i in range(len(dataset)) if i not in ties)
    assert dropping[other]["label_0"] in (0.0, 1.0)
    with pytest.raises(pd.DataError, match="--label_0_column"):
        pd.PreferencePairs(dataset, pd.PairTransform(16), label_0_column=None, drop_human_ties=True)


# ----------------------------------------------------------------------------------------------------------------
# Joint augmentation
# ----------------------------------------------------------------------------------------------------------------


def test_same_image_twice_gives_identical_pixels():
    transform = pd.PairTransform(32, center_crop=False, random_flip=True)
    image = asymmetric_image(80, 48)
    outputs = [transform(image, image, random.Random(seed)) for seed in range(24)]
    for out in outputs:
        assert torch.equal(out["pixel_values_0"], out["pixel_values_1"])
        assert out["crop_top_left_0"] == out["crop_top_left_1"]
        assert out["pixel_values_0"].dtype == torch.float32 and out["pixel_values_0"].is_contiguous()
        assert out["pixel_values_0"].shape == (3, 32, 32)
        assert -1.0 <= out["pixel_values_0"].min() and out["pixel_values_0"].max() <= 1.0
    # The decisions really vary: several crops, both flip states.
    resized = image.resize((53, 32), Image.Resampling.BILINEAR)
    mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    to_tensor = pd.PairTransform(32)._to_tensor
    assert len({out["crop_top_left_0"] for out in outputs}) > 3
    flips = set()
    for out in outputs:
        top, left = out["crop_top_left_0"]
        if torch.equal(out["pixel_values_0"], to_tensor(mirrored.crop((left, top, left + 32, top + 32)))):
            flips.add(True)
        else:
            assert torch.equal(out["pixel_values_0"], to_tensor(resized.crop((left, top, left + 32, top + 32))))
            flips.add(False)
    assert flips == {True, False}


def test_different_sizes_get_same_flip_and_proportional_crop():
    resolution = 16
    transform = pd.PairTransform(resolution, center_crop=False, random_flip=True)
    image_0, image_1 = asymmetric_image(40, 20, seed=1), asymmetric_image(30, 10, seed=2)
    free_0, free_1 = 40 * resolution // 20 - resolution, 30 * resolution // 10 - resolution
    flips = set()
    for seed in range(40):
        out = transform(image_0, image_1, random.Random(seed))
        assert out["original_size_0"] == (20, 40) and out["original_size_1"] == (10, 30)
        states = []
        for image, key, free in ((image_0, "0", free_0), (image_1, "1", free_1)):
            top, left = out[f"crop_top_left_{key}"]
            assert top == 0 and 0 <= left <= free
            resized = image.resize((resolution + free, resolution), Image.Resampling.BILINEAR)
            pixels = out[f"pixel_values_{key}"]
            as_is = pd.PairTransform(resolution)._to_tensor(resized.crop((left, 0, left + resolution, resolution)))
            mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            flipped = pd.PairTransform(resolution)._to_tensor(mirrored.crop((left, 0, left + resolution, resolution)))
            # crop_top_left locates the output pixels in the (flipped, if flipped) resized image.
            assert torch.equal(pixels, as_is) or torch.equal(pixels, flipped)
            states.append((torch.equal(pixels, flipped), left / (free + 1)))
        assert states[0][0] == states[1][0]  # same flip
        flips.add(states[0][0])
        # Same fraction of the free space, up to the rounding of each image's pixel grid.
        assert abs(states[0][1] - states[1][1]) <= 1.0 / (free_0 + 1)
    assert flips == {True, False}


def test_sdxl_original_size_and_crop_for_a_known_case():
    image = asymmetric_image(100, 60)  # (h, w) = (60, 100); resized to 30 x 50, free width 20
    resolution = 30
    resized = image.resize((50, 30), Image.Resampling.BILINEAR)
    to_tensor = pd.PairTransform(resolution)._to_tensor

    center = pd.PairTransform(resolution, center_crop=True)(image, image, FixedRng(0.9, 0.9, 0.9))
    assert center["original_size_0"] == (60, 100) and center["crop_top_left_0"] == (0, 10)
    assert torch.equal(center["pixel_values_0"], to_tensor(resized.crop((10, 0, 40, 30))))

    random_crop = pd.PairTransform(resolution, random_flip=True)
    out = random_crop(image, image, FixedRng(0.9, 0.5, 0.25))  # no flip, left = floor(0.25 * 21) = 5
    assert out["crop_top_left_0"] == (0, 5)
    assert torch.equal(out["pixel_values_0"], to_tensor(resized.crop((5, 0, 35, 30))))

    out = random_crop(image, image, FixedRng(0.1, 0.5, 0.25))  # flip: the crop sits at 20 - 5 in the mirror
    assert out["original_size_0"] == (60, 100) and out["crop_top_left_0"] == (0, 15)
    mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert torch.equal(out["pixel_values_0"], to_tensor(mirrored.crop((15, 0, 45, 30))))

    tall = pd.PairTransform(20)(asymmetric_image(40, 90), asymmetric_image(40, 90), FixedRng(0.9, 1.0 - 1e-9, 0.0))
    assert tall["original_size_0"] == (90, 40) and tall["crop_top_left_0"] == (25, 0)


# ----------------------------------------------------------------------------------------------------------------
# Items: determinism, captions, scorer inputs
# ----------------------------------------------------------------------------------------------------------------


def test_items_depend_only_on_seed_epoch_and_index(tiny_dir):
    dataset = pd.load_preference_dataset(dataset_name=tiny_dir)
    make = lambda seed=0: pd.PreferencePairs(  # noqa: E731
        dataset, pd.PairTransform(24, random_flip=True), proportion_empty_prompts=0.5, seed=seed
    )
    pairs = make()
    forward = [pairs[i] for i in range(12)]
    other = make()
    backward = {i: other[i] for i in reversed(range(12))}
    batched = other.__getitems__(list(range(11, -1, -1)))[::-1]
    for i in range(12):
        assert item_tensors_equal(forward[i], backward[i])
        assert item_tensors_equal(forward[i], batched[i])

    pairs.set_epoch(1)
    assert pairs.epoch == 1
    epoch_1 = [pairs[i] for i in range(12)]
    assert any(not torch.equal(a["pixel_values_0"], b["pixel_values_0"]) for a, b in zip(forward, epoch_1))
    pairs.set_epoch(0)
    assert all(item_tensors_equal(a, pairs[i]) for i, a in enumerate(forward))
    reseeded = make(seed=1)
    assert any(not torch.equal(a["pixel_values_0"], reseeded[i]["pixel_values_0"]) for i, a in enumerate(forward))


def test_proportion_empty_prompts(tiny_dir):
    dataset = pd.load_preference_dataset(dataset_name=tiny_dir, max_train_samples=10)
    crops = {}
    for proportion in (0.0, 1.0, 0.5):
        pairs = pd.PreferencePairs(
            dataset, pd.PairTransform(24, random_flip=True), proportion_empty_prompts=proportion
        )
        items = [pairs[i] for i in range(10)]
        assert [item["caption"] for item in items] == dataset["caption"]
        empty = [item["train_caption"] == "" for item in items]
        if proportion == 0.0:
            assert [item["train_caption"] for item in items] == dataset["caption"]
        elif proportion == 1.0:
            assert all(empty)
        else:
            assert any(empty) and not all(empty)
        crops[proportion] = [item["pixel_values_0"] for item in items]
    # Emptying prompts does not change the crops and flips.
    assert all(torch.equal(a, b) for a, b in zip(crops[0.0], crops[1.0]))


def test_scorer_preprocessor_sees_the_original_images():
    image_0, image_1 = asymmetric_image(40, 24, seed=5), asymmetric_image(24, 40, seed=6)
    dataset = pair_dataset([{"jpg_0": encode(image_0), "jpg_1": encode(image_1)}])
    preprocessor = ThumbnailPreprocessor()
    pairs = pd.PreferencePairs(dataset, pd.PairTransform(16, random_flip=True), scorer_preprocessor=preprocessor)
    item = pairs[0]
    expected = preprocessor([image_0, image_1])["pixel_values"]
    assert item["scorer_inputs"]["pixel_values"].shape == (2, 3, 8, 8)
    assert torch.equal(item["scorer_inputs"]["pixel_values"], expected)
    # Not the training crops: the thumbnails of the crops differ.
    crops = [
        Image.fromarray(((item[f"pixel_values_{k}"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
        for k in (0, 1)
    ]
    assert not torch.allclose(preprocessor(crops)["pixel_values"], expected, atol=0.05)
    assert "scorer_inputs" not in pd.PreferencePairs(dataset, pd.PairTransform(16))[0]


def test_extra_columns_pass_through_and_stack():
    dataset = pair_dataset([{}, {}, {}]).add_column("consensus_label", [1, 0, 1])
    dataset = dataset.add_column("consensus_prob", [0.9, 0.2, 0.6]).add_column("note", ["a", None, "c"])
    pairs = pd.PreferencePairs(
        dataset, pd.PairTransform(16), extra_columns=("consensus_label", "consensus_prob", "note")
    )
    items = [pairs[i] for i in range(3)]
    assert items[1]["consensus_prob"] == 0.2 and items[1]["note"] is None
    batch = pd.PairCollator()(items)
    assert batch["consensus_label"].dtype == torch.long and batch["consensus_label"].tolist() == [1, 0, 1]
    assert batch["consensus_prob"].dtype == torch.float32
    assert torch.allclose(batch["consensus_prob"], torch.tensor([0.9, 0.2, 0.6]))
    assert batch["note"] == ["a", None, "c"]
    with pytest.raises(ValueError, match="clash"):
        pd.PreferencePairs(dataset.add_column("caption_2", [""] * 3), pd.PairTransform(16), extra_columns=("index",))


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


def test_collate_reports_bad_rows_and_keeps_the_rest():
    dataset = pair_dataset([{}, {"jpg_0": b"broken"}, {"label_0": 0.5}, {"caption": "  "}, {"label_0": 0.0}])
    pairs = pd.PreferencePairs(
        dataset, pd.PairTransform(16), drop_human_ties=True, scorer_preprocessor=ThumbnailPreprocessor()
    )
    collator = pd.PairCollator(tokenize_fn=CountingTokenizer())
    batch = collator([pairs[i] for i in range(5)])
    assert batch["batch_size"] == 2 and batch["num_rows"] == 5 and batch["skipped_examples"] == 1
    assert [index for index, _ in batch["bad_examples"]] == [1, 3]
    assert "undecodable" in batch["bad_examples"][0][1] and "empty" in batch["bad_examples"][1][1]
    assert batch["indices"].tolist() == [0, 4] and batch["indices"].dtype == torch.long
    assert batch["pixel_values_0"].shape == (2, 3, 16, 16) and batch["pixel_values_0"].is_contiguous()
    assert batch["pixel_values_1"].dtype == torch.float32
    assert batch["original_sizes"].shape == (2, 2, 2) and batch["original_sizes"].dtype == torch.long
    assert batch["original_sizes"][0].tolist() == [[64, 64], [64, 64]]
    assert batch["crop_top_lefts"].shape == (2, 2, 2)
    assert batch["label_0"].tolist() == [pairs[0]["label_0"], 0.0] and batch["label_0"].dtype == torch.float32
    assert batch["captions"] == batch["train_captions"] == [dataset[0]["caption"], dataset[4]["caption"]]
    assert batch["scorer_inputs"]["pixel_values"].shape == (2, 2, 3, 8, 8)
    assert torch.equal(batch["input_ids"], CountingTokenizer()(batch["train_captions"])["input_ids"])


def test_collate_all_bad_batch_is_empty_and_well_formed():
    items = [{"index": 3, "bad_reason": "caption is empty"}, {"index": 4, "skip_reason": "human tie"}]
    batch = pd.PairCollator(tokenize_fn=CountingTokenizer(), resolution=16)(items)
    assert batch["batch_size"] == 0 and batch["num_rows"] == 2
    assert batch["bad_examples"] == [(3, "caption is empty")] and batch["skipped_examples"] == 1
    assert batch["pixel_values_0"].shape == (0, 3, 16, 16) and batch["indices"].shape == (0,)
    assert batch["original_sizes"].shape == (0, 2, 2) and batch["captions"] == []
    assert "input_ids" not in batch


# ----------------------------------------------------------------------------------------------------------------
# DataLoader workers, processes and resuming
# ----------------------------------------------------------------------------------------------------------------


def collect(dataset, num_workers, batch_size=5, **kwargs):
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=lambda items: items, **kwargs
    )
    return [item for batch in loader for item in batch]


def by_index(items):
    table = {}
    for item in items:
        assert item["index"] not in table, f"row {item['index']} was produced twice"
        table[item["index"]] = item
    return table


def test_map_style_workers_give_the_same_items(tiny_dir):
    dataset = pd.load_preference_dataset(dataset_name=tiny_dir, max_train_samples=20)
    pairs = pd.PreferencePairs(
        dataset, pd.PairTransform(16, random_flip=True), proportion_empty_prompts=0.5, drop_human_ties=True
    )
    pairs.set_epoch(2)
    single, multi = collect(pairs, 0), collect(pairs, 2)
    assert [item["index"] for item in multi] == list(range(20))
    assert all(item_tensors_equal(a, b) for a, b in zip(single, multi))


@pytest.mark.parametrize("split_by", ["rows", "shards"])
def test_streaming_workers_neither_duplicate_nor_lose_rows(sharded_dir, split_by):
    stream = pd.load_preference_dataset(dataset_name=sharded_dir, streaming=True)
    assert stream.num_shards == 4
    make = lambda **kwargs: pd.StreamingPreferencePairs(  # noqa: E731
        stream, pd.PairTransform(16, random_flip=True), seed=3, split_by=split_by, read_batch_size=4, **kwargs
    )
    single = by_index(collect(make(), 0))
    multi = by_index(collect(make(), 2))
    assert len(single) == 24 and single.keys() == multi.keys()
    assert all(item_tensors_equal(single[i], multi[i]) for i in single)
    captions = sorted(item["caption"] for item in single.values())
    assert captions == sorted(row["caption"] for row in stream)

    # Two processes with two workers each: a partition of the same items.
    ranks = [by_index(collect(make(rank=rank, world_size=2), 2)) for rank in (0, 1)]
    assert not ranks[0].keys() & ranks[1].keys()
    assert ranks[0].keys() | ranks[1].keys() == single.keys()
    assert all(item_tensors_equal(single[i], ranks[i in ranks[1]][i]) for i in single)


def test_streaming_row_ids_follow_the_stream(tiny_dir):
    stream = pd.load_preference_dataset(dataset_name=tiny_dir, streaming=True, max_train_samples=13)
    pairs = pd.StreamingPreferencePairs(stream, pd.PairTransform(16), read_batch_size=5)
    items = collect(pairs, 2, batch_size=3)
    assert sorted(item["index"] for item in items) == list(range(13))
    reference = pd.load_preference_dataset(dataset_name=tiny_dir)
    assert all(item["caption"] == reference[item["index"]]["caption"] for item in items)
    # A streaming item equals the map-style item of the same row.
    mapped = pd.PreferencePairs(reference, pd.PairTransform(16))
    assert all(item_tensors_equal(item, mapped[item["index"]]) for item in items)

    with pytest.raises(pd.DataError, match="split_by='rows'"):
        pd.StreamingPreferencePairs(stream, pd.PairTransform(16), split_by="shards", world_size=2)


def test_streaming_epochs_and_skip_batches(sharded_dir):
    stream = pd.load_preference_dataset(dataset_name=sharded_dir, streaming=True, shuffle_seed=0)
    pairs = pd.StreamingPreferencePairs(stream, pd.PairTransform(16, random_flip=True), read_batch_size=4)
    for num_workers in (0, 2):
        pairs.set_epoch(1)
        full = collect(pairs, num_workers, batch_size=3)
        assert sorted(item["index"] for item in full) == list(range(24))
        pairs.skip_batches(5, batch_size=3)
        resumed = collect(pairs, num_workers, batch_size=3)
        assert len(resumed) == len(full) - 15
        assert all(item_tensors_equal(a, b) for a, b in zip(full[15:], resumed))
        pairs.set_epoch(2)  # the skip only applies to the epoch it was set for
        epoch_2 = collect(pairs, num_workers, batch_size=3)
        assert len(epoch_2) == 24
        assert [item["caption"] for item in epoch_2] != [item["caption"] for item in full]
        pairs._skip = None


def test_set_epoch_reaches_persistent_workers(tiny_dir):
    dataset = pd.load_preference_dataset(dataset_name=tiny_dir, max_train_samples=8)
    pairs = pd.PreferencePairs(dataset, pd.PairTransform(16, random_flip=True))
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=lambda items: items
    )
    epochs = []
    for epoch in range(2):
        pairs.set_epoch(epoch)
        epochs.append([item for batch in loader for item in batch])
    fresh = pd.PreferencePairs(dataset, pd.PairTransform(16, random_flip=True))
    fresh.set_epoch(1)
    assert all(item_tensors_equal(item, fresh[item["index"]]) for item in epochs[1])
    assert any(not item_tensors_equal(a, b) for a, b in zip(epochs[0], epochs[1]))


# ----------------------------------------------------------------------------------------------------------------
# Bad-row accounting
# ----------------------------------------------------------------------------------------------------------------


def test_parse_max_bad_examples():
    assert pd.parse_max_bad_examples("100") == 100 and isinstance(pd.parse_max_bad_examples("100"), int)
    assert pd.parse_max_bad_examples("0.05") == 0.05
    assert pd.parse_max_bad_examples("0") == 0
    assert pd.parse_max_bad_examples("none") is None and pd.parse_max_bad_examples(None) is None
    for value in ("abc", "-1", "1.5", "nan", "inf"):
        with pytest.raises(ValueError, match="--max_bad_examples"):
            pd.parse_max_bad_examples(value)
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_bad_examples", type=pd.parse_max_bad_examples)
    assert parser.parse_args(["--max_bad_examples", "0.1"]).max_bad_examples == 0.1


def test_tracker_count_limit_and_logging(caplog):
    tracker = pd.BadExampleTracker(max_bad_examples=3, logger=logging.getLogger("tracker-test"))
    with caplog.at_level(logging.WARNING, logger="tracker-test"):
        tracker.update([(7, "caption is empty"), (9, "label 0.7 is not one of 1, 0 or 0.5")], num_seen=10)
    assert "row 7" in caplog.text and "caption is empty" in caplog.text and "row 9" in caplog.text
    tracker.update([(12, "image_0 (jpg_0): undecodable image")], num_seen=10)
    assert tracker.num_bad == 3 and tracker.num_seen == 20
    with pytest.raises(pd.DataError) as error:
        tracker.update([(15, "image_1 (jpg_1): image is missing")], num_seen=10)
    message = str(error.value)
    assert "4 bad rows out of 30" in message and "--max_bad_examples" in message and "row 15" in message

    never = pd.BadExampleTracker(None)
    never.update([(i, "broken") for i in range(50)], num_seen=50)
    assert never.num_bad == 50


def test_tracker_fraction_limit_waits_for_enough_rows():
    tracker = pd.BadExampleTracker(max_bad_examples=0.1)
    tracker.update([(i, "broken") for i in range(20)], num_seen=40)  # 50% bad, but only 40 rows seen
    tracker.update([], num_seen=400)  # 20 / 440 = 4.5%
    with pytest.raises(pd.DataError, match="more than 10.00%"):
        tracker.update([(i, "broken") for i in range(31)], num_seen=60)  # 51 / 500 > 10%

    strict = pd.BadExampleTracker(max_bad_examples=0.5, min_rows_for_fraction=10)
    strict.update([(0, "broken")] * 5, num_seen=10)  # exactly 50%: allowed
    with pytest.raises(pd.DataError):
        strict.update([(1, "broken")], num_seen=1)


def test_tracker_state_round_trip():
    tracker = pd.BadExampleTracker(max_bad_examples=5)
    tracker.update([(1, "caption is empty"), (2, "broken")], num_seen=8, num_skipped=1)
    restored = pd.BadExampleTracker(max_bad_examples=5)
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()
    assert (restored.num_bad, restored.num_seen, restored.num_skipped) == (2, 8, 1)
    restored.update([(3, "x"), (4, "y"), (5, "z")], num_seen=3)
    with pytest.raises(pd.DataError, match="6 bad rows"):
        restored.update([(6, "w")], num_seen=1)


def test_prompts_skip_and_count_empty_and_undecodable_ones(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_bytes(b"a red circle\n\n   \nbad \xff\xfe bytes\na blue square\n")
    prompts, info = pd.load_prompts(str(text))
    assert prompts == ["a red circle", "a blue square"] and info["skipped"] == 3
    listing = tmp_path / "prompts.json"
    listing.write_text('[{"prompt": "x"}, {"prompt": ""}, {"prompt": null}, {"prompt": " y "}]')
    prompts, info = pd.load_prompts(str(listing))
    assert prompts == ["x", "y"] and info["skipped"] == 2
