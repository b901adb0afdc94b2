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
    assert len(report["memory_targets"]) == len(load_benchmark_module().MEMORY_TARGETS)


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


def test_flow_matching_benchmarks_on_tiny_assets_time_the_training_step(tmp_path):
    """SD3 and FLUX through the same step code, in-process: the text encoders are freed by the cached embeddings."""
    from accelerate.state import AcceleratorState, GradientState

    bench = load_benchmark_module()
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        report = bench.main(
            bench.parse_args(
                ["--model", "tiny-sd3", "tiny-flux", "--pairs", "1", "--gradient_checkpointing", "on",
                 "--modes", "human", "live", "--warmup_steps", "1", "--steps", "1", "--num_threads", "1",
                 "--device", "cpu", "--json", str(tmp_path / "flow.json")]
            )
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert [(r["model"], r["mode"], r["status"]) for r in report["results"]] == [
        (model, mode, "ok") for model in ("tiny-sd3", "tiny-flux") for mode in ("human", "live")
    ]
    for info in report["models"]:
        assert info["cached_text_embeddings"] and info["text_encoders_freed"]
        assert len(info["text_encoder_parameters_m"]) == (3 if info["model"] == "tiny-sd3" else 2)
    for r in report["results"]:
        breakdown = r["breakdown_ms"]
        for phase in ("vae_encode", "unet_forward", "reference_forward", "unet_backward", "optimizer"):
            assert breakdown[phase] > 0, (phase, r)
        assert breakdown["text_encode"] == 0  # cached: no text encoder runs in the step
        assert (r["scoring_share"] > 0) == (r["mode"] == "live")


def test_flow_matching_full_size_configs_are_the_published_architectures(tmp_path):
    """SD3.5-Medium's and FLUX.1-dev's transformers, their VAE and T5-XXL, built on the meta device (no memory), and
    the families the benchmark assembles from them."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    bench = load_benchmark_module()
    meta = torch.device("meta")

    def millions(module):
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)

    def build(constructor):
        return millions(bench._construct(constructor, meta, torch.bfloat16))

    assert build(lambda: SD3Transformer2DModel(**bench.SD35M_TRANSFORMER_CONFIG)) == 2243.17
    assert build(lambda: FluxTransformer2DModel(**bench.FLUX_DEV_TRANSFORMER_CONFIG)) == 11901.41
    assert build(lambda: T5EncoderModel(T5Config(**bench.T5_XXL_CONFIG))) == 4762.31
    assert build(lambda: AutoencoderKL(**bench.SD3_VAE_CONFIG)) == build(
        lambda: AutoencoderKL(**bench.FLUX_VAE_CONFIG)
    )

    import train_balanced_dpo_flux
    import train_balanced_dpo_sd3

    options = bench.parse_args(["--mixed_precision", "bf16", "--device", "cpu"])
    for name, family_class in (("sd35m", train_balanced_dpo_sd3.StableDiffusion3Family),
                               ("flux", train_balanced_dpo_flux.FluxFamily)):  # fmt: skip
        spec = bench.MODEL_SPECS[name]
        args, _ = bench.configuration_args(family_class, spec, spec.resolution, "human", 1, True, options)
        family = bench.build_flow_family(name, spec, family_class, args, meta, torch.bfloat16, str(tmp_path), 0)
        assert isinstance(family, family_class) and family.denoiser.dtype == torch.bfloat16
        # Cached text embeddings; T5 tokens as in training (SD3: 77, FLUX.1-dev: 512).
        assert family.prompt_embeddings.cached and family.max_sequence_length == (77 if name == "sd35m" else 512)
        encoders = [millions(e) for e in family.text_encoders]
        assert encoders == ([123.65, 694.66, 4762.31] if name == "sd35m" else [123.06, 4762.31])
