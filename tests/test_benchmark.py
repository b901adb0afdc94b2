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
"""benchmarks/benchmark_step.py: runs end to end on the tiny assets, reports sane values, and its full-size configs
are the published architectures. Nothing here asserts on speed."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "benchmark_step.py")


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_on_tiny_assets_reports_every_mode(tmp_path):
    out = tmp_path / "benchmark.json"
    command = [
        sys.executable, SCRIPT,
        "--model", "tiny",
        "--pairs", "1", "2",
        "--gradient_checkpointing", "on",
        "--warmup_steps", "1",
        "--steps", "1",
        "--num_threads", "1",
        "--device", "cpu",
        "--json", str(out),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "x human" in completed.stdout and "Step breakdown" in completed.stdout

    report = json.loads(out.read_text())
    assert report["meta"]["device_type"] == "cpu"
    assert report["models"][0]["attention_processors"]
    results = report["results"]
    assert sorted((r["pairs"], r["mode"]) for r in results) == sorted(
        (p, m) for p in (1, 2) for m in ("human", "live", "live_plain", "precomputed")
    )
    for r in results:
        assert r["status"] == "ok", r
        assert r["gradient_checkpointing"] is True
        assert len(r["step_seconds"]) == 1
        assert r["median_step_seconds"] > 0
        assert math.isclose(r["pairs_per_second"], r["pairs"] / r["median_step_seconds"])
        assert r["kept_pairs"] == r["pairs"]  # no human ties: every mode trains on every pair
        assert r["optimizer"].startswith(("bitsandbytes AdamW8bit", "torch AdamW"))
        assert r["peak_memory_gib"] is None or r["peak_memory_gib"] >= 0
        breakdown = r["breakdown_ms"]
        for phase in ("vae_encode", "text_encode", "unet_forward", "reference_forward", "unet_backward", "optimizer"):
            assert breakdown[phase] > 0, (phase, r)
        assert sum(v for k, v in breakdown.items() if k != "other") <= 1000 * r["median_step_seconds"] * 1.01
        if r["mode"].startswith("live"):
            assert 0 < r["scoring_share"] < 1
            # Scoring batch i + 1 starts within step i (score-ahead), so its time is within the consensus phase.
            assert breakdown["consensus"] > 0 and r["median_scoring_seconds"] > 0
        else:
            assert r["scoring_share"] == 0  # no scorer runs in Diffusion-DPO or with precomputed labels
        if r["mode"] == "human":
            assert r["step_time_vs_human"] == 1.0
        else:
            assert r["step_time_vs_human"] > 0
    assert len(report["memory_targets"]) == 2


def test_full_size_configs_have_the_published_parameter_counts():
    """The hard-coded configs build the published architectures (on the meta device: no memory, no weights)."""
    import open_clip
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    bench = load_benchmark_module()
    meta = torch.device("meta")

    def millions(constructor):
        model = bench._construct(constructor, meta, torch.bfloat16)
        return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)

    assert millions(lambda: UNet2DConditionModel(**bench.SD15_UNET_CONFIG)) == 859.52
    assert millions(lambda: UNet2DConditionModel(**bench.SDXL_UNET_CONFIG)) == 2567.46
    assert millions(lambda: AutoencoderKL(**bench.SD15_VAE_CONFIG)) == 83.65
    assert millions(lambda: AutoencoderKL(**bench.SDXL_VAE_CONFIG)) == 83.65
    assert millions(lambda: CLIPTextModel(CLIPTextConfig(**bench.CLIP_L_TEXT_CONFIG))) == 123.06
    assert millions(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**bench.SDXL_TEXT_ENCODER_2_CONFIG))) == 694.66
    assert millions(lambda: CLIPModel(CLIPConfig(**bench.CLIP_VIT_H_14_CONFIG))) == 986.11
    assert millions(lambda: CLIPModel(CLIPConfig(**bench.CLIP_VIT_L_14_CONFIG))) == 427.62
    assert millions(lambda: open_clip.create_model(bench.HPSV2_OPEN_CLIP_ARCH, device=meta)) == 986.11
    head = bench._aesthetic_head_state(0)
    assert sum(v.numel() for v in head.values()) == 927_969  # LAION aesthetic predictor v2: 768-1024-128-64-16-1
