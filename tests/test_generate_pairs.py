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
"""generate_pairs.py: a Pick-a-Pic-format training set from prompts alone, deterministic, resumable, trainable."""

import argparse
import io
import json
import os

import numpy as np
import pytest
import torch
from launch_utils import launch, read_scalars


PROMPTS = ["a red cube", "a blue ball", "", "a green tree", "the sun over a lake", "a cat"]
IMAGES_PER_PROMPT = 3


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def generate(assets, prompts, output_dir, *extra):
    import generate_pairs

    args = generate_pairs.parse_args(
        [
            "--pretrained_model_name_or_path", assets["sd"],
            "--prompts", prompts,
            "--images_per_prompt", str(IMAGES_PER_PROMPT),
            "--reward_config", assets["reward_config"],
            "--output_dir", str(output_dir),
            "--num_inference_steps", "2",
            "--resolution", "32",
            "--batch_size", "4",
            "--prompts_per_shard", "2",
            "--device", "cpu",
            *extra,
        ]
    )  # fmt: skip
    return generate_pairs.main(args)


def read_rows(output_dir):
    import datasets

    return datasets.load_dataset(str(output_dir), split="train").to_list()


@pytest.fixture(scope="module")
def straight(tiny_assets_dir, prompt_file, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("generated") / "straight"
    summary = generate(tiny_assets_dir, prompt_file, output_dir)
    return output_dir, summary


def test_generated_pairs_are_a_labelled_pick_a_pic_dataset(tiny_assets_dir, straight):
    import generate_pairs
    import rewards

    output_dir, summary = straight
    rows = read_rows(output_dir)
    prompts = [p for p in PROMPTS if p]
    assert [row["caption"] for row in rows] == prompts  # extremes: one pair per prompt, in prompt order
    assert summary["prompts"] == 5 and summary["prompts_skipped"] == 1 and summary["images"] == 15
    assert summary["candidate_pairs"] == 5 * 3 and summary["pairs"] == 5
    assert os.path.isfile(os.path.join(output_dir, "preview.png"))
    assert not os.path.exists(os.path.join(output_dir, "generation.progress.json"))
    with open(os.path.join(output_dir, "summary.json")) as f:
        assert json.load(f)["pairs"] == 5

    names = list(rewards.DEFAULT_REWARD_MODELS)
    scorers = rewards.build_scorers(names, tiny_assets_dir["reward_config"], device="cpu")
    defaults = generate_pairs.parse_args(
        ["--pretrained_model_name_or_path", "x", "--prompts", "x", "--output_dir", "x"]
    )
    labeler = rewards.ConsensusLabeler.from_args(
        argparse.Namespace(human_vote=False, **vars(defaults)), scorers.temperatures, scorers.weights
    )
    for p, row in enumerate(rows):
        assert row["label_0"] == 0.5  # no human label
        assert row["image_index_0"] < row["image_index_1"]
        assert row["seed_0"] == p * IMAGES_PER_PROMPT + row["image_index_0"]
        assert row["seed_1"] == p * IMAGES_PER_PROMPT + row["image_index_1"]
        # The stored scores are the scorers' scores of the stored images (PNG keeps the scored pixels), and the
        # stored consensus is the consensus of those scores.
        images = [rewards.load_image(row[f"jpg_{i}"]) for i in (0, 1)]
        scores = scorers.score(images, [row["caption"]] * 2)
        for m in names:
            for i in (0, 1):
                assert row[f"score_{m}_{i}"] == pytest.approx(float(scores[m][i]), rel=1e-4, abs=1e-4)
        result = labeler({m: scores[m][:1] for m in names}, {m: scores[m][1:] for m in names})
        assert bool(result.keep[0]) == row["consensus_keep"]
        if row["consensus_keep"]:
            assert row["consensus_label"] == pytest.approx(float(result.label[0]))
            assert row["consensus_prob"] == pytest.approx(float(result.prob[0]), abs=1e-5)


def test_an_image_depends_only_on_its_prompt_and_seed(tiny_assets_dir, straight):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    row = read_rows(straight[0])[3]  # fourth prompt: its image is not the first of its generation batch
    pipe = StableDiffusionPipeline.from_pretrained(tiny_assets_dir["sd"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        row["caption"],
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(row["seed_1"]),
    ).images[0]
    stored = np.asarray(Image.open(io.BytesIO(row["jpg_1"])))
    assert np.abs(np.asarray(image).astype(int) - stored.astype(int)).max() <= 1


def test_resume_after_a_kill_writes_what_an_uninterrupted_run_writes(tiny_assets_dir, prompt_file, straight, tmp_path):
    from multi_metric import cli

    killed = tmp_path / "killed"
    original_flush = cli.ShardWriter._flush
    flushes = []

    def flush_then_die(self, rows):
        if len(flushes) == 1:  # the second shard never reaches the disk
            raise KeyboardInterrupt
        flushes.append(len(rows))
        original_flush(self, rows)

    cli.ShardWriter._flush = flush_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(tiny_assets_dir, prompt_file, killed)
    finally:
        cli.ShardWriter._flush = original_flush
    with pytest.raises(SystemExit, match="--resume"):  # finished work is never replaced by accident
        generate(tiny_assets_dir, prompt_file, killed)
    with pytest.raises(SystemExit):  # a bad argument stops before any model is loaded
        generate(tiny_assets_dir, prompt_file, killed, "--resume", "--scheduler", "NoSuchScheduler")
    with pytest.raises(SystemExit, match="num_inference_steps"):
        generate(tiny_assets_dir, prompt_file, killed, "--resume", "--num_inference_steps", "3")

    summary = generate(tiny_assets_dir, prompt_file, killed, "--resume")
    assert read_rows(killed) == read_rows(straight[0])
    expected = {
        k: v for k, v in straight[1].items() if k not in ("seconds", "generation_seconds", "images_per_second")
    }
    assert {k: summary[k] for k in expected} == expected


@pytest.mark.parametrize("precomputed", [False, True], ids=["live", "precomputed"])
def test_generated_pairs_train(tiny_assets_dir, straight, tmp_path, precomputed):
    output_dir = str(tmp_path / "lora")
    extra = ["--precomputed_consensus"] if precomputed else ["--reward_config", tiny_assets_dir["reward_config"]]
    launch(
        "train_balanced_dpo.py",
        [
            "--pretrained_model_name_or_path", tiny_assets_dir["sd"],
            "--dataset_name", str(straight[0]),
            *extra,
            "--output_dir", output_dir,
            "--resolution", "32",
            "--train_batch_size", "2",
            "--max_train_steps", "2",
            "--seed", "0",
        ],
    )  # fmt: skip
    assert os.path.isfile(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    scalars = read_scalars(output_dir)
    assert [step for step, _ in scalars["pairs"]] == [1, 2]
    assert sum(v for _, v in scalars["pairs"]) > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_matching_pipelines_generate_pairs(tiny_flow_assets, prompt_file, tmp_path, family, one_thread):
    import generate_pairs

    output_dir = tmp_path / family

    args = generate_pairs.parse_args(
        [
            "--pretrained_model_name_or_path", tiny_flow_assets[family],
            "--prompts", prompt_file,
            "--max_prompts", "2",
            "--images_per_prompt", "2",
            "--reward_config", tiny_flow_assets["reward_config"],
            "--reward_models", "clip,aesthetic",
            "--output_dir", str(output_dir),
            "--num_inference_steps", "1",
            "--resolution", "32",
            "--max_sequence_length", "16",
            "--device", "cpu",
        ]
    )  # fmt: skip
    summary = generate_pairs.main(args)
    rows = read_rows(output_dir)
    assert [row["caption"] for row in rows] == PROMPTS[:2] and summary["images"] == 4
    assert summary["settings"]["max_sequence_length"] == 16
    assert all(row["jpg_0"] != row["jpg_1"] for row in rows)  # two seeds, two images
