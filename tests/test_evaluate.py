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
"""Win-rate evaluation (evaluate_balanced_dpo.py) on the tiny assets, and a quick run of the synthetic experiment."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate_balanced_dpo as ev


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


def test_outcomes_count_ties_as_half():
    outcomes = ev.pairwise_outcomes([1.0, 2.0, 3.0, 5.0], [0.0, 2.0, 4.0, 5.0 + 1e-9])
    np.testing.assert_array_equal(outcomes, [1.0, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(ev.pairwise_outcomes([5.0], [5.0 + 1e-9], tie_tolerance=1e-6), [0.5])


@pytest.mark.parametrize("interval", ["bootstrap", "wilson"])
def test_win_rates_and_intervals(interval):
    rng = np.random.default_rng(0)
    metrics = ["m1", "m2", "m3"]
    scores_a = {"m1": rng.normal(1, 1, 40), "m2": rng.normal(0, 1, 40), "m3": np.zeros(40)}
    scores_b = {"m1": rng.normal(0, 1, 40), "m2": rng.normal(0, 1, 40), "m3": np.zeros(40)}
    per_metric, average = ev.compute_win_rates(metrics, scores_a, scores_b, interval=interval, num_samples=2000)
    for m in metrics:
        r = per_metric[m]
        expected = ev.pairwise_outcomes(scores_a[m], scores_b[m]).mean()
        assert r["win_rate"] == pytest.approx(expected)
        assert 0.0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1.0
        assert r["wins"] + r["ties"] + r["losses"] == 40
    assert per_metric["m1"]["win_rate"] > 0.6 and per_metric["m1"]["ci_low"] > 0.5
    assert per_metric["m3"]["win_rate"] == 0.5 and per_metric["m3"]["ties"] == 40
    assert average["win_rate"] == pytest.approx(np.mean([per_metric[m]["win_rate"] for m in metrics]))
    assert 0.0 <= average["ci_low"] <= average["win_rate"] <= average["ci_high"] <= 1.0


def test_joint_win_rate_equals_a_hand_count():
    metrics = ["m1", "m2", "m3"]
    # Prompt 0: A wins all; 1: A wins two, ties one; 2: B wins all; 3: mixed; 4: A wins all.
    scores_a = {"m1": [2, 2, 0, 2, 5], "m2": [2, 2, 0, 0, 5], "m3": [2, 1, 0, 2, 5]}
    scores_b = {"m1": [1, 1, 1, 1, 1], "m2": [1, 1, 1, 1, 1], "m3": [1, 1, 1, 1, 1]}
    joint = ev.compute_joint_win_rates(metrics, scores_a, scores_b, num_samples=2000)
    assert joint["a"]["prompts"] == 2 and joint["a"]["rate"] == pytest.approx(2 / 5)
    assert joint["b"]["prompts"] == 1 and joint["b"]["rate"] == pytest.approx(1 / 5)
    assert joint["a"]["ci_low"] <= 0.4 <= joint["a"]["ci_high"] and 0 <= joint["b"]["ci_low"] <= 0.2
    # Swapping the models swaps the sides.
    swapped = ev.compute_joint_win_rates(metrics, scores_b, scores_a, num_samples=2000)
    assert swapped["a"]["prompts"] == 1 and swapped["b"]["prompts"] == 2


@pytest.mark.parametrize("p_hat,n", [(0.0, 1), (1.0, 1), (0.5, 3), (0.9, 10), (0.03, 500), (1.0, 500)])
def test_wilson_interval_bounds(p_hat, n):
    low, high = ev.wilson_interval(p_hat, n)
    assert 0.0 <= low <= p_hat <= high <= 1.0
    assert high - low < 1.0 or n == 1


# ----------------------------------------------------------------------------------------------------------------
# Prompt sources
# ----------------------------------------------------------------------------------------------------------------


def test_prompts_from_files_and_datasets(tmp_path, tiny_assets_dir):
    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\n\n  a blue square  \n")
    assert ev.load_prompts(str(text))[0] == ["a red circle", "a blue square"]
    listing = tmp_path / "prompts.json"
    listing.write_text(json.dumps([{"prompt": "x"}, {"prompt": "y"}]))
    assert ev.load_prompts(str(listing))[0] == ["x", "y"]
    prompts, info = ev.load_prompts(tiny_assets_dir["pickapic"], max_prompts=5)
    assert len(prompts) == 5 and info["split"] == "test" and info["column"] == "caption"
    prompts, info = ev.load_prompts(tiny_assets_dir["pickapic"], column="caption", split="train")
    assert len(prompts) == 48 and info["split"] == "train"
    with pytest.raises(ValueError, match="not_a_column"):
        ev.load_prompts(tiny_assets_dir["pickapic"], column="not_a_column")


def test_builtin_prompt_sets_use_the_papers_sources(monkeypatch, tmp_path):
    """The built-in names map to the Hub datasets, splits and columns of the paper's prompt sets (no network here)."""
    import datasets
    import huggingface_hub

    calls = []

    class FakeStream(list):
        features = None

    def fake_load_dataset(path, streaming=False, **kwargs):
        calls.append((path, streaming, kwargs))
        column = {"yuvalkirstain/pickapic_v2": "caption", "nateraw/parti-prompts": "Prompt"}[path]
        split = {"yuvalkirstain/pickapic_v2": "validation_unique", "nateraw/parti-prompts": "train"}[path]
        return {split: FakeStream([{column: f"{path} {i}"} for i in range(3)])}

    hpd = tmp_path / "test.json"
    hpd.write_text(json.dumps([{"prompt": "hpd 0", "image_path": ["a.jpg"]}, {"prompt": "hpd 1"}]))

    def fake_hf_hub_download(repo_id, filename, repo_type=None, cache_dir=None):
        calls.append((repo_id, filename, repo_type))
        return str(hpd)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)

    prompts, info = ev.load_prompts("pickapic", max_prompts=2)
    assert prompts == ["yuvalkirstain/pickapic_v2 0", "yuvalkirstain/pickapic_v2 1"]
    assert info["split"] == "validation_unique" and calls[-1][1] is True
    assert calls[-1][2]["columns"] == ["caption"]  # only the caption column is read from the parquet files
    prompts, info = ev.load_prompts("partiprompts")
    assert len(prompts) == 3 and info["column"] == "Prompt" and calls[-1][0] == "nateraw/parti-prompts"
    prompts, info = ev.load_prompts("hpdv2")
    assert prompts == ["hpd 0", "hpd 1"] and calls[-1] == ("ymhao/HPDv2", "test.json", "dataset")


# ----------------------------------------------------------------------------------------------------------------
# End to end on the tiny assets
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora(tiny_assets_dir, tmp_path_factory):
    """A LoRA for the tiny SD UNet with random (non-zero) up-projections, so the images really change."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_assets_dir["sd"], subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    output_dir = str(tmp_path_factory.mktemp("tiny_lora"))
    StableDiffusionPipeline.save_lora_weights(
        output_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    )
    return output_dir


def _args(assets, output_dir, *extra, prompts=None, metrics="pickscore,hpsv2,clip,aesthetic"):
    return ev.parse_args(
        [
            "--pretrained_model_name_or_path",
            assets["sd"],
            "--prompts",
            prompts or assets["pickapic"],
            "--max_prompts",
            "4",
            "--reward_models",
            metrics,
            "--reward_config",
            assets["reward_config"],
            "--num_inference_steps",
            "2",
            "--resolution",
            "32",
            "--batch_size",
            "2",
            "--bootstrap_samples",
            "500",
            "--output_dir",
            str(output_dir),
            *extra,
        ]
    )


def _check_results(results, output_dir, metrics, num_prompts):
    on_disk = json.loads((output_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["metrics"] == metrics and on_disk["num_prompts"] == num_prompts
    for key in (
        "model_a",
        "model_b",
        "prompts",
        "generation",
        "interval",
        "win_rate",
        "average_win_rate",
        "joint_win_rate",
    ):
        assert key in on_disk
    assert on_disk["generation"]["seed"] == 0 and on_disk["interval"]["confidence"] == 0.95
    for metric in metrics:
        r = on_disk["win_rate"][metric]
        assert 0.0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1.0
        assert r["wins"] + r["ties"] + r["losses"] == num_prompts
        assert r["win_rate"] == pytest.approx((r["wins"] + 0.5 * r["ties"]) / num_prompts)
    average = on_disk["average_win_rate"]
    assert average["win_rate"] == pytest.approx(np.mean([on_disk["win_rate"][m]["win_rate"] for m in metrics]))
    assert 0.0 <= average["ci_low"] <= average["win_rate"] <= average["ci_high"] <= 1.0
    records = [json.loads(line) for line in (output_dir / "scores.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(num_prompts))
    assert (output_dir / "samples.png").is_file()
    assert "| **average** |" in (output_dir / "results.md").read_text()
    return on_disk


def test_lora_against_base(tiny_assets_dir, tiny_lora, tmp_path):
    output_dir = tmp_path / "eval"
    results = ev.main(_args(tiny_assets_dir, output_dir, "--lora_a", tiny_lora))
    on_disk = _check_results(results, output_dir, ["pickscore", "hpsv2", "clip", "aesthetic"], 4)
    assert on_disk["model_a"]["lora"] == tiny_lora and on_disk["model_b"]["lora"] is None
    # The LoRA changes the images, so (tiny random) scorers separate A from B on most prompts.
    assert sum(r["ties"] for r in on_disk["win_rate"].values()) < 16
    records = [json.loads(line) for line in (output_dir / "scores.jsonl").read_text().splitlines()]
    assert any(r["scores_a"] != r["scores_b"] for r in records)


def test_identical_models_tie_exactly(tiny_assets_dir, tiny_lora, tmp_path):
    """Same model on both sides: every prompt is a tie on every metric, so every win rate is exactly 1/2."""
    for extra in ([], ["--lora_a", tiny_lora, "--lora_b", tiny_lora, "--interval", "wilson"]):
        output_dir = tmp_path / f"eval{len(extra)}"
        results = ev.main(_args(tiny_assets_dir, output_dir, *extra, metrics="clip,aesthetic"))
        _check_results(results, output_dir, ["clip", "aesthetic"], 4)
        for r in results["win_rate"].values():
            assert r["win_rate"] == 0.5 and r["ties"] == 4
        assert results["average_win_rate"]["win_rate"] == 0.5


def test_resume_after_interruption_regenerates_nothing_done(tiny_assets_dir, tiny_lora, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    original_call = StableDiffusionPipeline.__call__
    calls = {"count": 0, "fail_at": None}

    def counting_call(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == calls["fail_at"]:
            raise KeyboardInterrupt  # the run is killed while the second batch is being generated
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting_call)
    extra = ["--lora_a", tiny_lora]
    output_dir = tmp_path / "interrupted"

    calls.update(count=0, fail_at=3)  # batch 1 = calls 1 (A) and 2 (B); the kill comes in batch 2
    with pytest.raises(KeyboardInterrupt):
        ev.main(_args(tiny_assets_dir, output_dir, *extra, metrics="clip,aesthetic"))
    assert len((output_dir / "scores.jsonl").read_text().splitlines()) == 2

    calls.update(count=0, fail_at=None)
    resumed = ev.main(_args(tiny_assets_dir, output_dir, *extra, metrics="clip,aesthetic"))
    assert calls["count"] == 2  # only the remaining batch, once per model
    assert resumed["num_prompts_resumed"] == 2 and resumed["num_prompts_evaluated_this_run"] == 2
    _check_results(resumed, output_dir, ["clip", "aesthetic"], 4)

    calls.update(count=0)
    again = ev.main(_args(tiny_assets_dir, output_dir, *extra, metrics="clip,aesthetic"))
    assert calls["count"] == 0 and again["num_prompts_resumed"] == 4

    uninterrupted = ev.main(_args(tiny_assets_dir, tmp_path / "straight", *extra, metrics="clip,aesthetic"))
    assert calls["count"] == 4
    assert resumed["win_rate"] == uninterrupted["win_rate"]

    # Other settings in the same folder are refused rather than mixed in; --overwrite starts over.
    with pytest.raises(ValueError, match="num_inference_steps"):
        ev.main(_args(tiny_assets_dir, output_dir, *extra, "--num_inference_steps", "3", metrics="clip,aesthetic"))
    calls.update(count=0)
    ev.main(
        _args(
            tiny_assets_dir, output_dir, *extra, "--num_inference_steps", "3", "--overwrite", metrics="clip,aesthetic"
        )
    )
    assert calls["count"] == 4


def test_image_cache_generates_the_base_images_once(tiny_assets_dir, tiny_lora, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    original_call = StableDiffusionPipeline.__call__
    calls = []
    monkeypatch.setattr(
        StableDiffusionPipeline, "__call__", lambda self, *a, **k: calls.append(1) or original_call(self, *a, **k)
    )
    cache = ["--image_cache_dir", str(tmp_path / "cache")]
    first = ev.main(_args(tiny_assets_dir, tmp_path / "first", "--lora_a", tiny_lora, *cache, metrics="clip"))
    assert len(calls) == 4 and first["num_images_generated"] == {"a": 4, "b": 4}
    calls.clear()
    second = ev.main(
        _args(
            tiny_assets_dir,
            tmp_path / "second",
            "--lora_a",
            tiny_lora,
            "--lora_scale_a",
            "0.5",
            *cache,
            metrics="clip",
        )
    )
    assert len(calls) == 2  # only the new model A; the base images come from the cache
    assert second["num_images_from_cache"] == {"a": 0, "b": 4}
    scores = [
        [json.loads(line)["scores_b"] for line in (tmp_path / name / "scores.jsonl").read_text().splitlines()]
        for name in ("first", "second")
    ]
    assert scores[0] == scores[1]


def test_sdxl_pipeline_is_detected(tiny_assets_dir, tmp_path):
    output_dir = tmp_path / "sdxl"
    args = _args(tiny_assets_dir, output_dir, "--max_prompts", "2", metrics="clip")
    args.pretrained_model_name_or_path = args.pretrained_model_b = tiny_assets_dir["sdxl"]
    results = ev.main(args)
    _check_results(results, output_dir, ["clip"], 2)
    assert results["win_rate"]["clip"]["win_rate"] == 0.5
    assert results["generation"]["guidance_scale"] == 5.0  # StableDiffusionXLPipeline's default, recorded


# ----------------------------------------------------------------------------------------------------------------
# The synthetic experiment, with very few steps
# ----------------------------------------------------------------------------------------------------------------


def test_synthetic_experiment_quick(tmp_path):
    output_dir = tmp_path / "experiment"
    command = [
        sys.executable,
        os.path.join(ROOT, "examples", "synthetic_experiment.py"),
        "--quick",
        "--modes",
        "majority",
        "--online",
        "--online_modes",
        "majority",
        "--output_dir",
        str(output_dir),
        "--num_threads",
        "1",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    summary = json.loads((output_dir / "results.json").read_text())["summary"]
    assert list(summary) == ["majority", "online:majority"]
    for row in summary.values():
        assert set(row["metrics"]) == {"brightness", "colorfulness", "centering"}
        for rate, low, high in list(row["metrics"].values()) + [row["average"], row["joint"], row["joint_base"]]:
            assert 0.0 <= low <= rate <= high <= 1.0
    for name in ("results.md", "win_rates.png", "base_samples.png", "pairs/data/train-00000-of-00001.parquet"):
        assert (output_dir / name).is_file(), name
    assert (output_dir / "loras" / "online-majority" / "pytorch_lora_weights.safetensors").is_file()
    assert "| `majority` |" in (output_dir / "results.md").read_text()
    assert "joint: LoRA wins all" in (output_dir / "results.md").read_text()
    # Every LoRA was evaluated against the same base images (same prompts and seeds).
    base_scores = [
        [
            json.loads(line)["scores_b"]
            for line in (output_dir / "eval" / mode / "scores.jsonl").read_text().splitlines()
        ]
        for mode in ("majority", "online-majority")
    ]
    assert base_scores[0] == base_scores[1]
