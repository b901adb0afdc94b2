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
"""Tests of rewards.py: scorers against independent computations, pairwise probabilities, consensus modes, the
cache, shared embeddings, bad input and the command line. Everything runs offline on tiny random models."""

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
import tiny_assets
from multi_metric import cuda_graphs, scoring


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_METRICS = ["pickscore", "hpsv2", "clip", "aesthetic", "imagereward"]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer_config(tmp_path_factory):
    """Tiny versions of all five built-in scorers (ImageReward included)."""
    output_dir = str(tmp_path_factory.mktemp("scorers_with_imagereward"))
    return tiny_assets.build_tiny_scorers(output_dir, include_imagereward=True)


@pytest.fixture(scope="module")
def scorer_set(scorer_config):
    return rewards.build_scorers(ALL_METRICS, scorer_config)


@pytest.fixture(scope="module")
def pair_rows():
    return tiny_assets.make_pickapic_rows(6, seed=3)


@pytest.fixture(scope="module")
def images(pair_rows):
    """Decoded images of several sizes and aspect ratios (exercising resize, crop and padding)."""
    rng = np.random.default_rng(0)
    decoded = [rewards.load_image(r["jpg_0"]) for r in pair_rows[:3]]
    decoded += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 37), (31, 80)]]
    decoded.append(tiny_assets.draw_shape_image("blue", "triangle", "white", size=45))
    return decoded


def _prompts(n):
    """n prompts with repeats (as in pairs, where both images share a prompt)."""
    base = ["a red circle on a white background", "a green square", "a photo of a blue triangle"]
    return [base[i % len(base)] for i in range(n)]


def _hook_counter(module):
    """Counts forward calls of `module` and the batch sizes it saw."""
    calls = []
    handle = module.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(_batch_size(args, kwargs)), with_kwargs=True
    )
    return calls, handle


def _batch_size(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Registry, options and bad input
# ----------------------------------------------------------------------------------------------------------------


def test_available_scorers_lists_builtins():
    assert set(ALL_METRICS) <= set(rewards.available_scorers())


def test_the_facade_exports_what_it_lists():
    missing = [name for name in rewards.__all__ if not hasattr(rewards, name)]
    assert not missing
    assert rewards.Scorer is scoring.Scorer and rewards.register_scorer is scoring.register_scorer


def test_unknown_metric_lists_available():
    with pytest.raises(ValueError) as error:
        rewards.build_scorer("no_such_metric")
    for name in ALL_METRICS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="pickscore"):
        rewards.build_scorers("clip,nope")


def test_unknown_option_is_an_error(scorer_config):
    with pytest.raises(ValueError, match="head_path"):
        rewards.build_scorer("clip", path=scorer_config["clip"]["path"], head_path="x.pth")


@pytest.mark.parametrize(
    "metric, options, hint",
    [
        ("hpsv2", {"path": "/nonexistent/dir/HPS_v2.1_compressed.pt"}, "xswu/HPSv2"),
        (
            "aesthetic",
            {"head_path": "/nonexistent/dir/sac+logos+ava1-l14-linearMSE.pth"},
            "improved-aesthetic-predictor",
        ),
        ("imagereward", {"path": "/nonexistent/dir/ImageReward.pt"}, "THUDM/ImageReward"),
        ("clip", {"path": "/nonexistent/dir/clip"}, "openai/clip-vit-large-patch14"),
        ("pickscore", {"path": "/nonexistent/dir/pickscore"}, "yuvalkirstain/PickScore_v1"),
    ],
)
def test_missing_weights_name_the_path_and_source(metric, options, hint, scorer_config):
    if metric == "aesthetic":
        options = dict(options, path=scorer_config["clip"]["path"])
    if metric == "hpsv2":
        options = dict(options, arch=scorer_config["hpsv2"]["arch"])
    with pytest.raises(FileNotFoundError) as error:
        rewards.build_scorer(metric, **options)
    message = str(error.value)
    assert "/nonexistent/dir" in message and hint in message


def test_folder_without_the_weights_file(tmp_path, scorer_config):
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        rewards.build_scorer("hpsv2", path=str(tmp_path), arch=scorer_config["hpsv2"]["arch"])


def test_reward_config_validation(tmp_path):
    assert rewards.load_reward_config(None) == {}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"clip": {"temperature": 2.0}}))
    assert rewards.load_reward_config(str(path)) == {"clip": {"temperature": 2.0}}
    with pytest.raises(ValueError):
        rewards.load_reward_config({"clip": 3})
    with pytest.raises(FileNotFoundError):
        rewards.load_reward_config(str(tmp_path / "missing.json"))


USER_SCORER_MODULE = '''
import rewards


class Brightness(rewards.Scorer):
    """Mean normalised pixel value times `scale`."""

    default_temperature = 0.1

    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.preprocessor = rewards.CLIPImagePreprocessor(size=16)

    def compute_scores(self, pixel_values, prompts):
        return self.scale * pixel_values.float().mean(dim=(1, 2, 3))
'''


def test_user_scorer_as_module_class(tmp_path, monkeypatch, images, scorer_config):
    (tmp_path / "user_scorers.py").write_text(USER_SCORER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = rewards.build_scorer("user_scorers:Brightness", scale=2.0, batch_size=2)
    assert scorer.name == "user_scorers:Brightness" and scorer.temperature == 0.1
    expected = 2.0 * rewards.CLIPImagePreprocessor(size=16)(images).mean(dim=(1, 2, 3))
    torch.testing.assert_close(scorer.score(images, "a photo"), expected)
    with pytest.raises(ValueError, match="scale"):
        rewards.build_scorer("user_scorers:Brightness", scael=2.0)
    with pytest.raises(ValueError):
        rewards.build_scorer("user_scorers:NoSuchClass")
    # Mixed with a built-in in one set, with its own preprocessing key.
    scorers = rewards.build_scorers(["clip", "user_scorers:Brightness"], scorer_config)
    assert len(scorers.preprocessor.keys) == 2
    scores = scorers.score(images, _prompts(len(images)))
    torch.testing.assert_close(scores["user_scorers:Brightness"], expected / 2.0)


def test_command_line_takes_a_user_scorer_as_module_class(tmp_path):
    # `python rewards.py` runs as __main__, and the user module imports `rewards` again: both must share one Scorer
    # base class and one registry.
    (tmp_path / "user_scorers.py").write_text(USER_SCORER_MODULE)
    image = str(tmp_path / "red.png")
    tiny_assets.draw_shape_image("red", "circle", "white", size=48).save(image)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, os.path.join(ROOT, "rewards.py"), "score", "--images", image, "--prompt", "x",
               "--reward_models", "user_scorers:Brightness", "--device", "cpu", "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = rewards.CLIPImagePreprocessor(size=16)([rewards.load_image(image)]).mean()
    assert json.loads(result.stdout)["scores"]["user_scorers:Brightness"] == [pytest.approx(float(expected))]


def test_user_scorer_with_decorator(images):
    @rewards.register_scorer("test_darkness")
    class Darkness(rewards.Scorer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.preprocessor = rewards.CLIPImagePreprocessor(size=8)

        def compute_scores(self, pixel_values, prompts):
            return -pixel_values.mean(dim=(1, 2, 3))

    try:
        assert "test_darkness" in rewards.available_scorers()
        scorer = rewards.build_scorer("test_darkness", weight=2.0)
        assert scorer.weight == 2.0
        expected = -rewards.CLIPImagePreprocessor(size=8)(images).mean(dim=(1, 2, 3))
        torch.testing.assert_close(scorer.score(images, "x"), expected)
    finally:
        scoring._SCORERS.pop("test_darkness", None)
    with pytest.raises(TypeError):
        rewards.register_scorer("not_a_scorer")(object)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------


def test_clip_preprocessor_matches_transformers_pil_processor(scorer_config, images):
    from transformers import AutoImageProcessor

    path = scorer_config["pickscore"]["processor_path"]
    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    assert processor.backend == "pil"
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    scorer = rewards.build_scorer("pickscore", **scorer_config["pickscore"])
    ours = scorer.preprocess(images)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_hps_preprocessor_matches_open_clip_longest_resize_and_pad(scorer_config, images):
    import open_clip

    transform = open_clip.image_transform(32, is_train=False, resize_mode="longest", fill_color=0)
    expected = torch.stack([transform(image) for image in images])
    ours = rewards.build_scorer("hpsv2", **scorer_config["hpsv2"]).preprocess(images)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_preprocess_keys_and_picklable_preprocessor(scorer_set, images):
    keys = {name: s.preprocess_key for name, s in scorer_set.scorers.items()}
    assert keys["pickscore"] == keys["clip"] == keys["aesthetic"] == keys["imagereward"]
    assert keys["hpsv2"] != keys["clip"]
    outputs = scorer_set.preprocessor(images)
    assert set(outputs) == {keys["clip"], keys["hpsv2"]}
    # Picklable and weight-free: usable as the collate function of DataLoader workers.
    payload = pickle.dumps(scorer_set.preprocessor)
    assert len(payload) < 10_000
    restored = pickle.loads(payload)
    for key, value in restored(images).items():
        torch.testing.assert_close(value, outputs[key])
    loader = torch.utils.data.DataLoader(
        images, batch_size=len(images), num_workers=1, collate_fn=scorer_set.preprocessor
    )
    for key, value in next(iter(loader)).items():
        torch.testing.assert_close(value, outputs[key])


def test_image_modes_score_like_their_rgb_form(scorer_set):
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1)))
    rgba = base.copy()
    rgba.putalpha(alpha)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    gray = base.convert("L")
    palette = base.quantize(16)
    variants = [
        (gray, gray.convert("RGB")),
        (base.convert("CMYK"), base.convert("CMYK").convert("RGB")),
        (palette, palette.convert("RGB")),
        (rgba, Image.alpha_composite(white, rgba).convert("RGB")),
        (Image.new("RGBA", (30, 30), (10, 200, 30, 0)), Image.new("RGB", (30, 30), (255, 255, 255))),
        (Image.fromarray((np.asarray(gray).astype(np.uint16) * 257)).convert("I;16"), gray.convert("RGB")),
    ]
    inputs = [v for v, _ in variants]
    references = [r for _, r in variants]
    prompts = ["a colourful picture"] * len(inputs)
    got = scorer_set.score(inputs, prompts)
    want = scorer_set.score(references, prompts)
    for name in scorer_set.names:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0)


def test_undecodable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        rewards.load_image(str(bad))
    with pytest.raises(ValueError):
        rewards.load_image(b"garbage")


# ----------------------------------------------------------------------------------------------------------------
# Each score equals an independent computation of its definition
# ----------------------------------------------------------------------------------------------------------------


def _clip_reference(options, images, prompts):
    """Cosine similarity and logit scale straight from a transformers CLIPModel and its PIL-backend processor."""
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    path = options["path"]
    processor_path = options.get("processor_path", path)
    model = CLIPModel.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(processor_path, backend="pil")
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    tokenizer = CLIPTokenizer.from_pretrained(processor_path)
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    cos = (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)
    return cos, model.logit_scale.exp().item(), image


def test_pickscore_equals_definition(scorer_set, scorer_config, images):
    prompts = _prompts(len(images))
    cos, logit_scale, _ = _clip_reference(scorer_config["pickscore"], images, prompts)
    assert abs(logit_scale - 100.0) < 1e-3
    torch.testing.assert_close(
        scorer_set.scorers["pickscore"].score(images, prompts), logit_scale * cos, atol=1e-3, rtol=1e-5
    )


def test_clip_score_equals_definition(scorer_set, scorer_config, images):
    prompts = _prompts(len(images))
    cos, _, _ = _clip_reference(scorer_config["clip"], images, prompts)
    torch.testing.assert_close(scorer_set.scorers["clip"].score(images, prompts), 100.0 * cos, atol=1e-3, rtol=1e-5)
    assert (cos < 0).any(), "the CLIP score is not clamped"


def test_aesthetic_equals_definition(scorer_set, scorer_config, images):
    _, _, embeds = _clip_reference(scorer_config["aesthetic"], images, ["unused"] * len(images))
    x = embeds / embeds.norm(dim=-1, keepdim=True)
    head = torch.load(scorer_config["aesthetic"]["head_path"], weights_only=True)
    assert sorted({k.split(".")[1] for k in head}) == ["0", "2", "4", "6", "7"]
    for index in (0, 2, 4, 6, 7):  # Linear layers with dropout (identity at inference) in between, no activations
        x = F.linear(x, head[f"layers.{index}.weight"], head[f"layers.{index}.bias"])
    scores = scorer_set.scorers["aesthetic"].score(images, "ignored")
    torch.testing.assert_close(scores, x.squeeze(-1), atol=1e-4, rtol=1e-5)
    assert float(scores.max() - scores.min()) > 0.1


def test_hpsv2_equals_definition(scorer_set, scorer_config, images):
    import open_clip

    arch = scorer_config["hpsv2"]["arch"]
    open_clip.add_model_config(arch)
    name = os.path.splitext(os.path.basename(arch))[0]
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=scorer_config["hpsv2"]["path"])
    model.eval()
    transform = open_clip.image_transform(32, is_train=False, resize_mode="longest", fill_color=0)
    prompts = _prompts(len(images))
    with torch.no_grad():
        image = model.encode_image(torch.stack([transform(im) for im in images]), normalize=True)
        text = model.encode_text(open_clip.get_tokenizer(name)(prompts), normalize=True)
    scorer = scorer_set.scorers["hpsv2"]
    torch.testing.assert_close(scorer.score(images, prompts), (image * text).sum(-1), atol=1e-5, rtol=1e-5)
    assert scorer.temperature == pytest.approx(1.0 / model.logit_scale.exp().item())


def _reference_imagereward(state, pixel_values, input_ids, attention_mask, heads=2):
    """ImageReward's forward written directly on the original checkpoint keys: BLIP's timm ViT (pre-norm blocks,
    fused qkv, final norm on all tokens, LayerNorm eps 1e-6) and the BERT encoder with cross-attention (post-norm,
    eps 1e-12), [CLS] feature, the MLP head and the published normalisation."""

    def norm(x, key, eps):
        return F.layer_norm(x, x.shape[-1:], state[key + ".weight"], state[key + ".bias"], eps)

    def linear(x, key):
        return F.linear(x, state[key + ".weight"], state[key + ".bias"])

    def attention(q, k, v, mask=None):
        batch, length, width = q.shape
        q, k, v = (t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
        if mask is not None:
            logits = logits + (1.0 - mask[:, None, None, :].float()) * -10000.0
        return (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)

    v = "blip.visual_encoder."
    patch = state[v + "patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixel_values, state[v + "patch_embed.proj.weight"], state[v + "patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state[v + "cls_token"].expand(len(x), -1, -1), x], dim=1) + state[v + "pos_embed"]
    blocks = len({k.split(".")[3] for k in state if k.startswith(v + "blocks.")})
    for i in range(blocks):
        b = f"{v}blocks.{i}."
        q, k, val = linear(norm(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        x = x + linear(attention(q, k, val), b + "attn.proj")
        x = x + linear(F.gelu(linear(norm(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = norm(x, v + "norm", 1e-6)

    t = "blip.text_encoder."
    h = state[t + "embeddings.word_embeddings.weight"][input_ids]
    h = norm(
        h + state[t + "embeddings.position_embeddings.weight"][: input_ids.shape[1]], t + "embeddings.LayerNorm", 1e-12
    )
    layers = len({k.split(".")[4] for k in state if k.startswith(t + "encoder.layer.")})
    for i in range(layers):
        layer = f"{t}encoder.layer.{i}."
        a = layer + "attention."
        out = attention(
            linear(h, a + "self.query"), linear(h, a + "self.key"), linear(h, a + "self.value"), attention_mask
        )
        h = norm(linear(out, a + "output.dense") + h, a + "output.LayerNorm", 1e-12)
        c = layer + "crossattention."
        out = attention(linear(h, c + "self.query"), linear(image, c + "self.key"), linear(image, c + "self.value"))
        h = norm(linear(out, c + "output.dense") + h, c + "output.LayerNorm", 1e-12)
        ffn = linear(F.gelu(linear(h, layer + "intermediate.dense")), layer + "output.dense")
        h = norm(ffn + h, layer + "output.LayerNorm", 1e-12)
    x = h[:, 0]
    for index in (0, 2, 4, 6, 7):
        x = linear(x, f"mlp.layers.{index}")
    return (x.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_equals_reference_on_original_keys(scorer_set, scorer_config, images):
    from transformers import AutoTokenizer

    options = scorer_config["imagereward"]
    state = torch.load(options["path"], weights_only=True)
    prompts = _prompts(len(images))
    tokens = AutoTokenizer.from_pretrained(options["tokenizer_path"])(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    scorer = scorer_set.scorers["imagereward"]
    with torch.no_grad():
        expected = _reference_imagereward(
            state, scorer.preprocess(images), tokens["input_ids"], tokens["attention_mask"]
        )
    scores = scorer.score(images, prompts)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert float(scores.max() - scores.min()) > 0.1
    assert scorer.temperature == pytest.approx(1 / 1.03334, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Scoring mechanics: dtype, devices, cache, shared models and embeddings
# ----------------------------------------------------------------------------------------------------------------


def test_scores_are_float32_cpu_normal_tensors(scorer_set, images):
    scores = scorer_set.score(images, _prompts(len(images)))
    weight = torch.ones((), requires_grad=True)
    for name, value in scores.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu" and value.shape == (len(images),)
        assert not value.is_inference(), name
        (weight * value).sum().backward()  # usable next to autograd-recorded code
    # Preprocessed input (the dict from the set's preprocessor) gives the same scores as PIL input.
    again = scorer_set.score(scorer_set.preprocessor(images), _prompts(len(images)))
    for name in scores:
        torch.testing.assert_close(again[name], scores[name])


def test_weights_are_cast_to_dtype(scorer_config, images):
    fp32 = rewards.build_scorers(["clip", "aesthetic"], scorer_config)
    bf16 = rewards.build_scorers(["clip", "aesthetic"], scorer_config, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.scorers["clip"].model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16.scorers["aesthetic"].head.parameters())
    prompts = _prompts(len(images))
    low, high = bf16.score(images, prompts), fp32.score(images, prompts)
    for name in low:
        assert low[name].dtype == torch.float32
        assert torch.corrcoef(torch.stack([low[name], high[name]]))[0, 1] > 0.95


def test_logit_scales_and_temperatures_are_read_in_float32(scorer_config):
    """In bfloat16, log(100) rounds to 4.59375: PickScore would be scaled by 98.86 and the HPSv2 temperature be 0.010115
    if they were read from the cast weights."""
    fp32 = rewards.build_scorers(["pickscore", "hpsv2"], scorer_config)
    for dtype in ("bfloat16", "float16"):
        low = rewards.build_scorers(["pickscore", "hpsv2"], scorer_config, dtype=dtype)
        assert low.scorers["pickscore"].model.logit_scale.dtype == getattr(torch, dtype)
        assert low.scorers["pickscore"].logit_scale == fp32.scorers["pickscore"].logit_scale
        assert low.scorers["pickscore"].logit_scale == pytest.approx(100.0, rel=1e-6)
        assert low.temperatures["hpsv2"] == fp32.temperatures["hpsv2"] == pytest.approx(0.01, rel=1e-6)


def test_clip_and_aesthetic_share_one_model_and_one_image_forward(scorer_config, images):
    scorers = rewards.build_scorers(["clip", "aesthetic"], scorer_config)
    model = scorers.scorers["clip"].model
    assert scorers.scorers["aesthetic"].model is model
    vision_calls, vision_hook = _hook_counter(model.vision_model)
    text_calls, text_hook = _hook_counter(model.text_model)
    try:
        prompts = ["a red circle", "a blue square", "a red circle"] * 2
        scorers.score(images, prompts)
    finally:
        vision_hook.remove()
        text_hook.remove()
    assert vision_calls == [len(images)]  # one forward for both metrics
    assert text_calls == [2]  # each unique prompt encoded once


def test_pairs_encode_each_prompt_once(scorer_set, images):
    model = scorer_set.scorers["pickscore"].model
    text_calls, text_hook = _hook_counter(model.text_model)
    image_calls, image_hook = _hook_counter(model.vision_model)
    captions = ["a red circle", "a blue square", "a green triangle"]
    try:
        scores_0, scores_1 = scorer_set.score_pairs(images[:3], images[3:], captions)
    finally:
        text_hook.remove()
        image_hook.remove()
    assert text_calls == [3] and image_calls == [6]
    together = scorer_set.score(images, captions + captions)
    preprocessed = scorer_set.score_pairs(
        scorer_set.preprocessor(images[:3]), scorer_set.preprocessor(images[3:]), captions
    )
    for name in scorer_set.names:
        torch.testing.assert_close(torch.cat([scores_0[name], scores_1[name]]), together[name])
        torch.testing.assert_close(torch.cat([preprocessed[0][name], preprocessed[1][name]]), together[name])


def test_cache_prevents_a_second_forward(scorer_config, images):
    cache = rewards.ScoreCache()
    scorers = rewards.build_scorers(["clip", "aesthetic", "hpsv2"], scorer_config, cache=cache)
    clip_calls, clip_hook = _hook_counter(scorers.scorers["clip"].model.vision_model)
    hps_calls, hps_hook = _hook_counter(scorers.scorers["hpsv2"].model.visual)
    prompts = _prompts(len(images))
    try:
        first = scorers.score(images[:4], prompts[:4])
        assert clip_calls == [4] and hps_calls == [4]
        second = scorers.score(images[:4], prompts[:4])
        assert clip_calls == [4] and hps_calls == [4]  # nothing ran
        for name in first:
            torch.testing.assert_close(second[name], first[name])
        # Two cached images and one new one: the model sees only the new one.
        mixed = scorers.score([images[0], images[4], images[1]], [prompts[0], prompts[4], prompts[1]])
        assert clip_calls == [4, 1] and hps_calls == [4, 1]
        torch.testing.assert_close(mixed["clip"][[0, 2]], first["clip"][[0, 1]])
        # The same image with another prompt is a new entry, except for the prompt-free aesthetic score.
        scorers.score([images[0]], ["something else entirely"])
        assert hps_calls == [4, 1, 1] and clip_calls == [4, 1, 1]
    finally:
        clip_hook.remove()
        hps_hook.remove()
    assert len(cache) == 6 + 6 + 5 and cache.hits > 0


def test_offload_gives_the_same_scores(scorer_set, scorer_config, images):
    prompts = _prompts(len(images))
    expected = scorer_set.score(images, prompts)
    offloaded = rewards.build_scorers(["clip", "aesthetic", "pickscore"], scorer_config, device="cpu", offload=True)
    assert offloaded._groups == [["clip", "aesthetic"], ["pickscore"]]
    got = offloaded.score(images, prompts)
    for name in got:
        torch.testing.assert_close(got[name], expected[name])
    assert offloaded.scorers["clip"].device.type == "cpu"


def _pair_inputs(scorer_set, images_0, images_1):
    """What the training collator gives: {preprocess key: [B, 2, 3, H, W]}."""
    inputs_0, inputs_1 = scorer_set.preprocessor(images_0), scorer_set.preprocessor(images_1)
    return {key: torch.stack([inputs_0[key], inputs_1[key]], dim=1) for key in inputs_0}


def test_score_pairs_async_equals_score_pairs_and_follows_a_swap(scorer_set, images):
    captions = ["a red circle", "a blue square", "a red circle"]
    expected_0, expected_1 = scorer_set.score_pairs(images[:3], images[3:], captions)
    pending = scorer_set.score_pairs_async(_pair_inputs(scorer_set, images[:3], images[3:]), captions)
    got_0, got_1 = pending.result()
    swapped_1, swapped_0 = scorer_set.score_pairs_async(
        _pair_inputs(scorer_set, images[3:], images[:3]), captions
    ).result()
    assert pending.done() and list(got_0) == scorer_set.names
    for name in scorer_set.names:
        torch.testing.assert_close(got_0[name], expected_0[name])
        torch.testing.assert_close(got_1[name], expected_1[name])
        torch.testing.assert_close(swapped_0[name], expected_0[name])
        torch.testing.assert_close(swapped_1[name], expected_1[name])
        assert not torch.equal(got_0[name], got_1[name])


def test_identical_images_in_one_call_score_identically_and_run_once(scorer_set, images):
    """The promise: within one scoring call, identical (image, prompt) rows get bit-identical scores, whatever the
    thread count, because the models see each of them only once."""
    duplicated = [images[0], images[1], images[0], images[2], images[1], images[0]]
    prompts = ["a photo"] * 6
    model = scorer_set.scorers["pickscore"].model
    vision_calls, hook = _hook_counter(model.vision_model)
    try:
        scores = scorer_set.score(duplicated, prompts)
    finally:
        hook.remove()
    assert vision_calls == [3], "the model must see each distinct image once"
    for name, values in scores.items():
        assert values[0] == values[2] == values[5] and values[1] == values[4], name
        assert values[0] != values[1], name
    # The same image with another prompt is another row for prompt-dependent metrics.
    other = scorer_set.score([images[0], images[0]], ["a photo", "a drawing"])
    assert other["pickscore"][0] != other["pickscore"][1]
    assert other["aesthetic"][0] == other["aesthetic"][1]  # prompt-free, same image: same forward anyway
    # The same promise through a single scorer, score_pairs and the training path (score_pairs_async).
    single = scorer_set.scorers["hpsv2"].score(duplicated, prompts)
    assert single[0] == single[2] == single[5] and single[1] == single[4]
    pair_0, pair_1 = scorer_set.score_pairs([images[3], images[4]], [images[3], images[5]], ["x", "y"])
    pending_0, pending_1 = scorer_set.score_pairs_async(
        _pair_inputs(scorer_set, [images[3], images[4]], [images[3], images[5]]), ["x", "y"]
    ).result()
    for name in scorer_set.names:
        assert pair_0[name][0] == pair_1[name][0] and pending_0[name][0] == pending_1[name][0], name
        torch.testing.assert_close(pending_0[name], pair_0[name])
        torch.testing.assert_close(pending_1[name], pair_1[name])


def test_rows_equal_in_the_sampled_pixels_only_are_not_merged(scorer_set, images):
    """Duplicates are found from a few sampled pixels, then confirmed on all of them."""
    pixels = scorer_set.preprocessor([images[0], images[0]])
    for key, tensor in pixels.items():
        tensor[1, 0, 0, 1] += 0.5  # off the sampled grid: only a full comparison can tell the two rows apart
    assert scoring._tensor_duplicates(pixels, ["p", "p"]) == (None, None)
    assert scoring._tensor_duplicates(scorer_set.preprocessor([images[0]] * 2), ["p", "q"]) == (None, [0, 0])


def test_prompt_buckets_are_few_powers_of_two():
    assert [cuda_graphs._prompt_bucket(n, 16) for n in range(1, 18)] == [1, 2, 4, 4] + [8] * 4 + [16] * 9
    chunks = list(cuda_graphs._padded_prompt_chunks(["a", "b", "c", "d", "e"], 4, bucket=True))
    assert chunks == [(["a", "b", "c", "d"], 4), (["e"], 1)]
    assert list(cuda_graphs._padded_prompt_chunks(["a", "b", "c"], 8, bucket=True)) == [(["a", "b", "c", "c"], 3)]


def test_graph_shaped_forwards_give_the_eager_scores(scorer_config, images):
    """The CUDA-graph path pads text to the full context without a mask and pads the prompt batch to a bucket;
    off CUDA the runner runs those same padded forwards eagerly, so this checks that padding changes no score."""
    metrics = ["pickscore", "hpsv2", "clip", "aesthetic"]
    plain = rewards.build_scorers(metrics, scorer_config)
    padded = rewards.build_scorers(metrics, scorer_config)
    runner = rewards.CUDAGraphRunner()
    for scorer in padded.scorers.values():
        scorer.graphs = runner
    prompts = ["a red circle", "a red circle on a white background with a long caption", "a green square"] * 2
    text_calls, hook = _hook_counter(padded.scorers["pickscore"].model.text_model)
    try:
        got = padded.score(images, prompts)
    finally:
        hook.remove()
    assert text_calls == [4]  # three distinct prompts, bucketed to four rows
    expected = plain.score(images, prompts)
    for name in metrics:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)
    assert len(runner) == 0  # nothing is captured off CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_scores_equal_eager_scores_on_gpu(scorer_config, images):
    metrics = ["pickscore", "hpsv2", "clip", "aesthetic", "imagereward"]
    eager = rewards.build_scorers(metrics, scorer_config, device="cuda", dtype="float32")
    graphed = rewards.build_scorers(metrics, scorer_config, device="cuda", dtype="float32", cuda_graphs=True)
    runner = graphed.scorers["pickscore"].graphs
    assert runner is not None and all(s.graphs is runner for s in graphed.scorers.values())
    captions = ["a red circle", "a blue square", "a red circle"]
    pair_inputs = _pair_inputs(eager, images[:3], images[3:])
    expected_0, expected_1 = eager.score_pairs_async(pair_inputs, captions).result()
    for _ in range(3):  # capture, then replays
        pending = graphed.score_pairs_async(pair_inputs, captions)
        got_0, got_1 = pending.result()
        for name in metrics:
            torch.testing.assert_close(got_0[name], expected_0[name], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_1[name], expected_1[name], rtol=1e-4, atol=1e-4)
    assert len(runner) >= 6 and not runner.disabled  # image and text forwards of three models
    # Another batch size captures new graphs and still scores right.
    expected = eager.score(images[:5], _prompts(5))
    got = graphed.score(images[:5], _prompts(5))
    for name in metrics:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_uncapturable_forward_falls_back_to_eager_on_gpu():
    runner = rewards.CUDAGraphRunner()
    x = torch.arange(4.0, device="cuda")
    torch.testing.assert_close(runner("double", lambda t: t * 2, x), x * 2)
    assert len(runner) == 1 and not runner.disabled

    def synchronising(t):
        return t * float(t.sum().item())  # a host synchronisation cannot be captured

    torch.testing.assert_close(runner("sync", synchronising, x), x * 6.0)
    assert runner.disabled
    # Everything runs eagerly from then on, with right results.
    torch.testing.assert_close(runner("sync", synchronising, x + 1), (x + 1) * 10.0)
    torch.testing.assert_close(runner("double", lambda t: t * 2, x + 1), (x + 1) * 2)
    torch.testing.assert_close(runner("triple", lambda t: t * 3, x), x * 3)
    assert len(runner) == 1


# ----------------------------------------------------------------------------------------------------------------
# Pairwise probabilities
# ----------------------------------------------------------------------------------------------------------------


def test_pairwise_probability_definition_and_symmetry(scorer_set, pair_rows):
    images_0 = [rewards.load_image(r["jpg_0"]) for r in pair_rows]
    images_1 = [rewards.load_image(r["jpg_1"]) for r in pair_rows]
    captions = [r["caption"] for r in pair_rows]
    scores = scorer_set.score(images_0 + images_1, captions + captions)
    n = len(pair_rows)
    s0 = {m: v[:n] for m, v in scores.items()}
    s1 = {m: v[n:] for m, v in scores.items()}
    forward = rewards.pairwise_probabilities(s0, s1, scorer_set.temperatures)
    backward = rewards.pairwise_probabilities(s1, s0, scorer_set.temperatures)
    for m in scorer_set.names:
        expected = torch.sigmoid((s0[m].double() - s1[m].double()) / scorer_set.temperatures[m]).float()
        torch.testing.assert_close(forward[m], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(forward[m], 1.0 - backward[m], atol=1e-6, rtol=0)
    # Default temperatures are the native ones.
    default = rewards.pairwise_probabilities({"aesthetic": torch.tensor([6.0])}, {"aesthetic": torch.tensor([5.5])})
    assert default["aesthetic"].item() == pytest.approx(1 / (1 + math.exp(-2.0)), abs=1e-6)


def test_identical_images_give_one_half_and_abstain(scorer_set, images):
    pair = [images[3], images[3]]
    scores = scorer_set.score(pair, ["a photo", "a photo"])
    s0 = {m: v[:1] for m, v in scores.items()}
    s1 = {m: v[1:] for m, v in scores.items()}
    probs = rewards.pairwise_probabilities(s0, s1, scorer_set.temperatures)
    assert all(p.item() == 0.5 for p in probs.values())
    for mode in ["majority", "mean_prob", "reward_sum", "normalized_sum", "random_metric", "single:clip"]:
        result = rewards.consensus(s0, s1, mode=mode, temperatures=scorer_set.temperatures)
        assert all(v.item() == 0 for v in result.votes.values())
        assert not result.keep.item() and result.label.item() == 0.5 and result.prob.item() == 0.5
        assert result.agreement.item() == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Consensus
# ----------------------------------------------------------------------------------------------------------------


def _table(*rows):
    """Score differences per pair for metrics a, b, c (image 1 scores are zero)."""
    deltas = torch.tensor(rows, dtype=torch.float32)
    s0 = {m: deltas[:, i] for i, m in enumerate("abc")}
    s1 = {m: torch.zeros(len(rows)) for m in "abc"}
    return s0, s1


TEMPS = {"a": 1.0, "b": 1.0, "c": 1.0}


def test_majority_vote_table():
    s0, s1 = _table([1.0, 1.0, -1.0], [1.0, -1.0, 0.0], [2.0, -1.0, 0.0], [0.0, 0.0, 0.0], [-3.0, -0.5, 0.2])
    result = rewards.consensus(s0, s1, temperatures=TEMPS)
    assert result.label.tolist() == [1.0, 0.5, 1.0, 0.5, 0.0]
    assert result.keep.tolist() == [True, False, True, False, True]
    assert result.votes["c"].tolist() == [-1, 0, 0, 0, 1]
    assert result.votes["a"].dtype == torch.int8 and "human" not in result.votes
    torch.testing.assert_close(result.agreement, torch.tensor([2 / 3, 0.5, 0.5, 0.0, 2 / 3]))
    # prob = weighted share of votes for image 0; a tie broken by mean probability takes that probability.
    mean_c = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(-1.0)) + 0.5) / 3
    torch.testing.assert_close(result.prob, torch.tensor([2 / 3, 0.5, mean_c.item(), 0.5, 1 / 3]))

    weighted = rewards.consensus(s0, s1, temperatures=TEMPS, weights={"c": 3.0})
    assert weighted.label[0].item() == 0.0 and weighted.agreement[0].item() == pytest.approx(0.6)

    dropped = rewards.consensus(s0, s1, temperatures=TEMPS, tie_policy="drop")
    assert dropped.keep.tolist() == [True, False, False, False, True]

    human = torch.tensor([0.0, 1.0, 0.5, float("nan"), 1.0])
    by_human = rewards.consensus(s0, s1, temperatures=TEMPS, tie_policy="human", human_label=human)
    assert by_human.label.tolist() == [1.0, 1.0, 0.5, 0.5, 0.0]
    assert by_human.keep.tolist() == [True, True, False, False, True]
    assert by_human.prob[1].item() == 1.0

    voting = rewards.consensus(s0, s1, temperatures=TEMPS, human_label=human, human_vote=True)
    assert voting.votes["human"].tolist() == [-1, 1, 0, 0, 1]
    # Pairs 0 and 4 become 2-2 ties, broken by the metrics' mean probability; pair 3 has no voter at all.
    assert voting.label.tolist() == [1.0, 1.0, 1.0, 0.5, 0.0]
    torch.testing.assert_close(voting.agreement, torch.tensor([0.5, 2 / 3, 0.5, 0.0, 0.5]))

    margin = rewards.consensus(s0, s1, temperatures=TEMPS, abstain_margin=0.2)  # |x| <= logit(0.7) = 0.847 abstains
    assert margin.votes["b"].tolist() == [1, -1, -1, 0, 0] and margin.votes["c"].tolist() == [-1, 0, 0, 0, 0]
    assert margin.label[4].item() == 0.0 and margin.agreement[4].item() == 1.0

    strict = rewards.consensus(s0, s1, temperatures=TEMPS, min_agreement=0.7)
    assert strict.keep.tolist() == [False, False, False, False, False]
    assert strict.label.tolist() == result.label.tolist()  # the decision stays visible; keep says it is dropped


def test_drop_reasons_say_why_each_pair_was_dropped():
    s0, s1 = _table([1.0, 1.0, -1.0], [1.0, -1.0, 0.0], [2.0, -1.0, 0.0], [0.0, 0.0, 0.0], [-3.0, -0.5, 0.2])
    # Pair 1: one vote each way and a mean probability of exactly 0.5; pair 3: identical scores, nobody votes.
    result = rewards.consensus(s0, s1, temperatures=TEMPS)
    assert result.drop_reasons() == {"human_tie": 0, "no_vote": 1, "tie": 1, "min_agreement": 0}
    strict = rewards.consensus(s0, s1, temperatures=TEMPS, min_agreement=0.7)
    assert strict.drop_reasons() == {"human_tie": 0, "no_vote": 1, "tie": 1, "min_agreement": 3}
    margin = rewards.consensus(s0, s1, temperatures=TEMPS, abstain_margin=0.45, tie_policy="drop")
    assert margin.drop_reasons()["no_vote"] == int((~margin.keep).sum())
    human = rewards.consensus({}, {}, mode="human", human_label=torch.tensor([0.0, 1.0, 0.5, float("nan"), 1.0]))
    assert human.drop_reasons() == {"human_tie": 2, "no_vote": 0, "tie": 0, "min_agreement": 0}
    assert set(result.drop_reasons()) == set(rewards.DROP_REASONS)


def test_human_vote_tie_breaks_by_mean_probability():
    s0, s1 = _table([1.0, 1.0, -1.0])
    result = rewards.consensus(s0, s1, temperatures=TEMPS, human_label=torch.tensor([0.0]), human_vote=True)
    # 2 votes each way; the metrics' mean probability favours image 0.
    assert result.label.item() == 1.0 and result.keep.item()
    assert result.agreement.item() == pytest.approx(0.5)


def test_other_modes_table():
    s0, s1 = _table([1.0, 1.0, -1.0], [0.2, -3.0, 0.1], [0.0, 0.0, 0.0])
    human = torch.tensor([0.0, 1.0, 1.0])

    mean_prob = rewards.consensus(s0, s1, mode="mean_prob", temperatures=TEMPS)
    assert mean_prob.label.tolist() == [1.0, 0.0, 0.5] and mean_prob.keep.tolist() == [True, True, False]
    expected = torch.stack([torch.sigmoid(s0[m] - s1[m]) for m in "abc"]).mean(0)
    torch.testing.assert_close(mean_prob.prob, expected)

    human_mode = rewards.consensus(s0, s1, mode="human", temperatures=TEMPS, human_label=human)
    assert human_mode.label.tolist() == [0.0, 1.0, 1.0] and human_mode.prob.tolist() == [0.0, 1.0, 1.0]
    torch.testing.assert_close(human_mode.agreement, torch.tensor([1 / 3, 2 / 3, 0.0]))
    ties = rewards.consensus(s0, s1, mode="human", human_label=torch.tensor([0.5, float("nan"), 1.0]))
    assert ties.keep.tolist() == [False, False, True]

    single = rewards.consensus(s0, s1, mode="single:c", temperatures=TEMPS)
    assert single.label.tolist() == [0.0, 1.0, 0.5] and single.keep.tolist() == [True, True, False]
    torch.testing.assert_close(single.prob[:2], torch.sigmoid(s0["c"][:2]))


def test_reward_scale_conflict_between_modes():
    # Metric a lives on a scale 100x larger than b; both metrics are equally sure, in opposite directions.
    s0 = {"a": torch.tensor([10.0, -10.0]), "b": torch.tensor([-0.2, 0.0])}
    s1 = {"a": torch.zeros(2), "b": torch.zeros(2)}
    temps = {"a": 5.0, "b": 0.05}
    raw = rewards.consensus(s0, s1, mode="reward_sum", temperatures=temps)
    assert raw.label[0].item() == 1.0  # the large-scale metric dominates the raw sum
    torch.testing.assert_close(raw.prob[0], torch.sigmoid(torch.tensor(9.8)))
    mean = rewards.consensus(s0, s1, mode="mean_prob", temperatures=temps)
    assert mean.label[0].item() == 0.0  # sigmoid(2) vs sigmoid(-4): b is more confident
    # normalized_sum: sigma_a = rms(10, -10) = 10, sigma_b = rms(-0.2, 0) = 0.1414: b's difference is larger in sigmas.
    normalized = rewards.consensus(s0, s1, mode="normalized_sum", temperatures=temps)
    assert normalized.label[0].item() == 0.0
    torch.testing.assert_close(normalized.prob[0], torch.sigmoid(torch.tensor(1.0 - 0.2 / math.sqrt(0.02))))


def test_random_metric_uses_the_generator():
    s0, s1 = _table(*[[1.0, -1.0, 0.0]] * 64)
    result = rewards.consensus(
        s0, s1, mode="random_metric", temperatures=TEMPS, generator=torch.Generator().manual_seed(5)
    )
    choice = torch.multinomial(
        torch.ones(3, dtype=torch.float64), 64, replacement=True, generator=torch.Generator().manual_seed(5)
    )
    expected_label = torch.tensor([1.0, 0.0, 0.5])[choice]
    expected_keep = choice != 2  # c abstains; the mean probability of a, b, c is exactly 0.5, so the pair is dropped
    assert result.keep.tolist() == expected_keep.tolist()
    assert result.label[expected_keep].tolist() == expected_label[expected_keep].tolist()
    only_b = rewards.consensus(s0, s1, mode="random_metric", weights={"a": 0.0, "b": 1.0, "c": 0.0})
    assert (only_b.label == 0.0).all()
    default = rewards.consensus(s0, s1, mode="random_metric")
    again = rewards.consensus(s0, s1, mode="random_metric")
    assert default.label.tolist() == again.label.tolist()  # deterministic without a generator


def test_invalid_modes_and_metrics():
    s0, s1 = _table([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="majority"):
        rewards.consensus(s0, s1, mode="vote")
    with pytest.raises(ValueError, match="single:a"):
        rewards.consensus(s0, s1, mode="single:foo")
    with pytest.raises(ValueError, match="mean_prob"):
        rewards.consensus(s0, s1, tie_policy="coin")
    with pytest.raises(ValueError, match="human_label"):
        rewards.consensus(s0, s1, mode="human")
    with pytest.raises(ValueError):
        rewards.consensus(s0, {"a": torch.zeros(1)})
    with pytest.raises(ValueError):
        rewards.ConsensusLabeler(mode="nope")


def _swap_cases():
    for mode in ["majority", "mean_prob", "human", "single:b", "reward_sum", "normalized_sum", "random_metric"]:
        for tie_policy in rewards.TIE_POLICIES:
            for human_vote in (False, True):
                for margin, min_agreement in ((0.0, 0.0), (0.1, 0.6)):
                    yield mode, tie_policy, human_vote, margin, min_agreement


def test_swapping_a_pair_flips_the_label_in_every_mode():
    generator = torch.Generator().manual_seed(0)
    n = 256
    s0 = {m: torch.randn(n, generator=generator).mul(2).round() / 2 for m in "abc"}
    s1 = {m: torch.randn(n, generator=generator).mul(2).round() / 2 for m in "abc"}
    for m in "abc":  # exact ties and identical pairs
        s1[m][:32] = s0[m][:32]
    human = torch.tensor([1.0, 0.0, 0.5, float("nan")]).repeat(n // 4)
    temps = {"a": 0.7, "b": 1.3, "c": 0.25}
    weights = {"a": 1.0, "b": 2.0, "c": 1.0, "human": 1.5}
    checked = 0
    for mode, tie_policy, human_vote, margin, min_agreement in _swap_cases():
        kwargs = {
            "mode": mode,
            "temperatures": temps,
            "weights": weights,
            "human_vote": human_vote,
            "abstain_margin": margin,
            "tie_policy": tie_policy,
            "min_agreement": min_agreement,
        }
        forward = rewards.consensus(
            s0,
            s1,
            human_label=human,
            state=rewards.NormalizedSumState(100),
            generator=torch.Generator().manual_seed(1),
            **kwargs,
        )
        backward = rewards.consensus(
            s1,
            s0,
            human_label=1.0 - human,
            state=rewards.NormalizedSumState(100),
            generator=torch.Generator().manual_seed(1),
            **kwargs,
        )
        case = (mode, tie_policy, human_vote, margin, min_agreement)
        assert forward.keep.tolist() == backward.keep.tolist(), case
        assert (forward.label + backward.label).tolist() == [1.0] * n, case
        torch.testing.assert_close(forward.prob, 1.0 - backward.prob, atol=1e-6, rtol=0, msg=str(case))
        torch.testing.assert_close(forward.agreement, backward.agreement, msg=str(case))
        for voter in forward.votes:
            assert (forward.votes[voter] == -backward.votes[voter]).all(), case
        assert forward.keep.any() and not forward.keep.all(), case
        checked += 1
    assert checked == 7 * 3 * 2 * 2


def test_normalized_sum_state_warms_up_then_freezes():
    state = rewards.NormalizedSumState(warmup_pairs=4)
    state.update({"a": torch.tensor([3.0, -4.0])})
    assert state.sigma("a") == pytest.approx(math.sqrt(12.5)) and not state.frozen("a")
    state.update({"a": torch.tensor([1.0, 1.0, float("nan")])})
    assert state.frozen("a") and state.counts["a"] == 4
    frozen = state.sigma("a")
    state.update({"a": torch.tensor([100.0])})
    assert state.sigma("a") == frozen == pytest.approx(math.sqrt(27 / 4))
    restored = rewards.NormalizedSumState()
    restored.load_state_dict(state.state_dict())
    assert restored.sigma("a") == frozen and restored.frozen("a")


def test_labeler_state_round_trip_resumes_identically(tmp_path):
    generator = torch.Generator().manual_seed(3)
    batches = [
        (
            {m: torch.randn(8, generator=generator) for m in "abc"},
            {m: torch.randn(8, generator=generator) for m in "abc"},
        )
        for _ in range(5)
    ]
    for mode in ["random_metric", "normalized_sum"]:
        labeler = rewards.ConsensusLabeler(mode=mode, temperatures=TEMPS, seed=7, normalize_warmup_pairs=20)
        for s0, s1 in batches[:2]:
            labeler(s0, s1)
        path = tmp_path / f"{mode}.pt"
        torch.save(labeler.state_dict(), path)
        continued = [labeler(s0, s1) for s0, s1 in batches[2:]]
        resumed = rewards.ConsensusLabeler(mode=mode, temperatures=TEMPS, seed=999, normalize_warmup_pairs=20)
        resumed.load_state_dict(torch.load(path, weights_only=True))
        replayed = [resumed(s0, s1) for s0, s1 in batches[2:]]
        for a, b in zip(continued, replayed):
            assert a.label.tolist() == b.label.tolist() and a.keep.tolist() == b.keep.tolist()
            torch.testing.assert_close(a.prob, b.prob)
        fresh = rewards.ConsensusLabeler(mode=mode, temperatures=TEMPS, seed=999, normalize_warmup_pairs=20)
        differs = [fresh(s0, s1).prob for s0, s1 in batches[2:]]
        assert any(not torch.equal(d, c.prob) for d, c in zip(differs, continued)), mode


def test_labeler_from_args_is_the_labeler_of_the_command_line_and_the_trainer():
    import argparse
    import types

    import training

    temperatures, weights = {"clip": 2.0}, {"clip": 0.5}
    args = argparse.Namespace(consensus="random_metric", abstain_margin=0.1, tie_policy="drop", min_agreement=0.5,
                              human_vote=True, seed=None, normalize_warmup_pairs=64, precomputed_consensus=False)  # fmt: skip
    labeler = rewards.ConsensusLabeler.from_args(args, temperatures, weights)
    assert labeler.config() == {
        "mode": "random_metric",
        "temperatures": temperatures,
        "weights": weights,
        "abstain_margin": 0.1,
        "tie_policy": "drop",
        "min_agreement": 0.5,
        "human_vote": True,
        "seed": 0,  # the trainer's --seed defaults to None
    }
    assert labeler.normalized_state.warmup_pairs == 64
    scorer_set = types.SimpleNamespace(temperatures=temperatures, weights=weights)
    assert training.make_labeler(args, scorer_set).config() == labeler.config()
    cli_args = rewards.parse_args(["score", "--images", "a.png", "--prompt", "x", "--consensus", "mean_prob"])
    assert rewards.ConsensusLabeler.from_args(cli_args).config() == rewards.ConsensusLabeler(mode="mean_prob").config()


def test_fit_temperature_recovers_the_scale():
    rng = np.random.default_rng(0)
    deltas = rng.normal(0, 3, 20000)
    targets = (rng.random(20000) < 1 / (1 + np.exp(-deltas / 1.5))).astype(np.float64)
    assert rewards.fit_temperature(deltas, targets) == pytest.approx(1.5, rel=0.05)
    assert rewards.fit_temperature(deltas, 1.0 - targets) is None  # anti-correlated: no positive temperature
    ties = np.full(100, 0.5)
    assert rewards.fit_temperature(rng.normal(size=100), ties) is None


def test_consensus_module_imports_no_model_library():
    # Labelling precomputed scores must not pay for (or need) the model libraries.
    code = (
        "import multi_metric.consensus, sys; "
        "loaded = {'transformers', 'open_clip'} & set(sys.modules); assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_file(scorer_config, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "reward_config.json"
    path.write_text(json.dumps({m: scorer_config[m] for m in rewards.DEFAULT_REWARD_MODELS}))
    return str(path)


@pytest.fixture(scope="module")
def pickapic_with_a_broken_pair(tmp_path_factory):
    """A Pick-a-Pic-format parquet dataset of 10 pairs whose 4th pair has an undecodable image."""
    import datasets

    output_dir = tmp_path_factory.mktemp("pickapic_broken")
    rows = tiny_assets.make_pickapic_rows(10, seed=11)
    rows[3]["jpg_1"] = b"this is not a jpeg"
    (output_dir / "data").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(output_dir / "data" / "train-00000-of-00001.parquet"))
    return str(output_dir), rows


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, config_file, pickapic_with_a_broken_pair):
    """Runs `python rewards.py score`, `label` and `calibrate` as separate processes, concurrently (each spends most
    of its time importing torch and transformers)."""
    work = tmp_path_factory.mktemp("cli")
    dataset_dir, _ = pickapic_with_a_broken_pair
    images = []
    for color in ["red", "blue"]:
        path = str(work / f"{color}.png")
        tiny_assets.draw_shape_image(color, "circle", "white", size=48).save(path)
        images.append(path)
    outputs = {"labeled": str(work / "labeled"), "calibrated": str(work / "calibrated.json"), "images": images}
    common = ["--reward_config", config_file, "--device", "cpu"]
    commands = {
        "score": ["score", "--images", *images, "--prompt", "a red circle", "--json", *common],
        "label": ["label", "--dataset_name", dataset_dir, "--output_dir", outputs["labeled"], "--batch_size", "4",
                  "--max_samples", "9", "--rows_per_shard", "5", "--min_agreement", "0.8", *common],
        "calibrate": ["calibrate", "--dataset_name", dataset_dir, "--output", outputs["calibrated"],
                      "--max_samples", "9", *common],
    }  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    processes = {
        name: subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "rewards.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for name, args in commands.items()
    }
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"rewards.py {name} failed:\n{stderr[-3000:]}"
        outputs[name] = stdout
    return outputs


def test_cli_score(cli_runs, scorer_set):
    output = json.loads(cli_runs["score"])
    images = [rewards.load_image(p) for p in cli_runs["images"]]
    expected = scorer_set.score(images, ["a red circle"] * 2)
    for name in rewards.DEFAULT_REWARD_MODELS:
        np.testing.assert_allclose(output["scores"][name], expected[name].numpy(), atol=1e-4)
    (pair,) = output["pairs"]
    s0 = {m: expected[m][:1] for m in rewards.DEFAULT_REWARD_MODELS}
    s1 = {m: expected[m][1:] for m in rewards.DEFAULT_REWARD_MODELS}
    result = rewards.consensus(s0, s1, temperatures=scorer_set.temperatures)
    assert pair["label"] == result.label.item() and pair["keep"] == result.keep.item()
    assert set(pair["probs"]) == set(rewards.DEFAULT_REWARD_MODELS)


def test_cli_score_tables_and_bad_image(tmp_path, config_file, capsys):
    good = tmp_path / "good.png"
    tiny_assets.draw_shape_image("red", "square", "black", size=40).save(good)
    rewards.main(
        ["score", "--images", str(good), str(good), str(good), "--prompt", "x", "--reward_config", config_file,
         "--metrics", "clip,aesthetic"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "consensus (majority)" in printed and "dropped" in printed and "no pair for the last image" in printed
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(SystemExit) as error:
        rewards.main(["score", "--images", str(good), str(bad), "--prompt", "x", "--reward_config", config_file])
    assert "bad.jpg" in str(error.value)


def _pair_scores(scorers, rows):
    images_0 = [rewards.load_image(r["jpg_0"]) for r in rows]
    images_1 = [rewards.load_image(r["jpg_1"]) for r in rows]
    return scorers.score_pairs(images_0, images_1, [r["caption"] for r in rows])


def test_cli_label(cli_runs, scorer_set, pickapic_with_a_broken_pair):
    import datasets

    _, rows = pickapic_with_a_broken_pair
    output_dir = cli_runs["labeled"]
    assert "skipped 1 pair(s) with undecodable images" in cli_runs["label"]
    labeled = datasets.load_dataset(output_dir)["train"]
    assert len(labeled) == 8 and len(os.listdir(os.path.join(output_dir, "data"))) == 2
    for column in [
        "consensus_label",
        "consensus_prob",
        "agreement",
        "consensus_keep",
        "score_hpsv2_0",
        "score_clip_1",
    ]:
        assert column in labeled.column_names
    kept_rows = [r for i, r in enumerate(rows[:9]) if i != 3]
    assert labeled["caption"] == [r["caption"] for r in kept_rows]

    # The stored scores and labels are what the library computes.
    s0, s1 = _pair_scores(scorer_set, kept_rows)
    for m in rewards.DEFAULT_REWARD_MODELS:
        np.testing.assert_allclose(labeled[f"score_{m}_0"], s0[m].numpy(), atol=1e-4)
        np.testing.assert_allclose(labeled[f"score_{m}_1"], s1[m].numpy(), atol=1e-4)
    s0 = {m: s0[m] for m in rewards.DEFAULT_REWARD_MODELS}
    s1 = {m: s1[m] for m in rewards.DEFAULT_REWARD_MODELS}
    human = torch.tensor([r["label_0"] for r in kept_rows])
    expected = rewards.consensus(s0, s1, temperatures=scorer_set.temperatures, human_label=human, min_agreement=0.8)
    assert labeled["consensus_keep"] == expected.keep.tolist() and not all(expected.keep.tolist())
    # Kept pairs carry their label and soft target; dropped pairs NaN.
    np.testing.assert_array_equal(labeled["consensus_label"], torch.where(expected.keep, expected.label, float("nan")))
    np.testing.assert_allclose(
        labeled["consensus_prob"], torch.where(expected.keep, expected.prob, float("nan")).numpy(), atol=1e-6
    )
    np.testing.assert_allclose(labeled["agreement"], expected.agreement.numpy(), atol=1e-6)
    summary = json.load(open(os.path.join(output_dir, "labeling_train.json")))
    assert summary["counts"]["skipped_undecodable"] == 1 and summary["counts"]["rows"] == 8


def _expected_temperature(deltas, human, default):
    fitted = rewards.fit_temperature(deltas, human)
    return fitted if fitted is not None else default


def test_cli_calibrate(cli_runs, scorer_config, scorer_set, pickapic_with_a_broken_pair):
    _, rows = pickapic_with_a_broken_pair
    stdout = cli_runs["calibrate"]
    assert "accuracy" in stdout and "nll after" in stdout and "1 pair(s) skipped" in stdout
    calibrated = json.load(open(cli_runs["calibrated"]))
    kept_rows = [r for i, r in enumerate(rows[:9]) if i != 3]
    s0, s1 = _pair_scores(scorer_set, kept_rows)
    human = np.asarray([r["label_0"] for r in kept_rows])
    for m in rewards.DEFAULT_REWARD_MODELS:
        for key, value in scorer_config[m].items():
            assert calibrated[m][key] == value  # the given options are kept
        deltas = (s0[m].double() - s1[m].double()).numpy()
        expected = _expected_temperature(deltas, human, scorer_set.temperatures[m])
        assert calibrated[m]["temperature"] == pytest.approx(expected, rel=1e-3)


def test_calibrate_on_precomputed_scores_and_streaming_label(cli_runs, tmp_path, config_file, capsys):
    import datasets

    # calibrate on the output of `label` reads its score columns instead of scoring.
    output = str(tmp_path / "from_columns.json")
    result = rewards.main(
        ["calibrate", "--dataset_name", cli_runs["labeled"], "--output", output, "--reward_config", config_file]
    )
    assert "precomputed score columns" in capsys.readouterr().out
    labeled = datasets.load_dataset(cli_runs["labeled"], split="train")
    human = np.asarray(labeled["label_0"])
    for m in rewards.DEFAULT_REWARD_MODELS:
        deltas = np.asarray(labeled[f"score_{m}_0"]) - np.asarray(labeled[f"score_{m}_1"])
        expected = _expected_temperature(deltas, human, rewards.DEFAULT_TEMPERATURES[m])
        assert result["temperatures"][m] == pytest.approx(expected, rel=1e-6)

    # label --streaming, another split, another consensus mode.
    dataset_dir = tiny_assets.build_tiny_pickapic_dataset(str(tmp_path / "pickapic"), num_train=4, num_test=3)
    output_dir = str(tmp_path / "streamed")
    rewards.main(
        ["label", "--dataset_name", dataset_dir, "--output_dir", output_dir, "--reward_config", config_file,
         "--reward_models", "clip,aesthetic", "--streaming", "--split", "test", "--consensus", "mean_prob"]
    )  # fmt: skip
    labeled = datasets.load_dataset(output_dir, split="test")
    assert len(labeled) == 3 and "score_aesthetic_1" in labeled.column_names
    assert set(labeled["consensus_keep"]) <= {True, False}


def test_human_mode_needs_no_scorer():
    human = torch.tensor([1.0, 0.0, 0.5, float("nan")])
    result = rewards.consensus({}, {}, mode="human", human_label=human)
    assert result.label.tolist()[:2] == [1.0, 0.0]
    assert result.keep.tolist() == [True, True, False, False]
    assert result.agreement.tolist()[:2] == [1.0, 1.0]
    swapped = rewards.consensus({}, {}, mode="human", human_label=1 - human)
    assert swapped.label.tolist()[:2] == [0.0, 1.0]
    with pytest.raises(ValueError):
        rewards.consensus({}, {}, mode="majority", human_label=human)
