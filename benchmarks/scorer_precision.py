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
"""How many consensus labels change when the scorers run in bfloat16 or float16 instead of float32.

Scores the same image pairs with the same scorers in each dtype, labels them with every consensus mode, and counts
the pairs whose label (image 0 wins / image 1 wins / dropped) differs from the float32 label, and the metric votes
that flip. This is what `--scorer_dtype` trades against speed and memory.

    python benchmarks/scorer_precision.py                      # tiny random scorers (CPU, about a minute)
    python benchmarks/scorer_precision.py --reward_config reward_config.json --device cuda   # your scorers

The tiny scorers are random CLIPs: their score differences are not those of PickScore or HPSv2, so the numbers
say how sensitive a vote is to rounding, not how often it happens with the real models on real images.
"""

import argparse
import json
import os
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rewards  # noqa: E402
import tiny_assets  # noqa: E402


MODES = ("majority", "mean_prob", "reward_sum", "normalized_sum", "single:pickscore", "single:hpsv2")
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward_config", default=None, help="Scorer config (default: tiny random scorers).")
    parser.add_argument("--reward_models", default=",".join(rewards.DEFAULT_REWARD_MODELS))
    parser.add_argument("--num_pairs", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    return parser.parse_args(input_args)


def score_pairs(config, names, dtype, device, images_0, images_1, captions, batch_size=64):
    scorers = rewards.build_scorers(names, config, device=device, dtype=dtype)
    scores_0, scores_1 = {m: [] for m in names}, {m: [] for m in names}
    for start in range(0, len(captions), batch_size):
        part = slice(start, start + batch_size)
        s0, s1 = scorers.score_pairs(images_0[part], images_1[part], captions[part])
        for m in names:
            scores_0[m].append(s0[m])
            scores_1[m].append(s1[m])
    cat = {m: (torch.cat(scores_0[m]), torch.cat(scores_1[m])) for m in names}
    return {m: v[0] for m, v in cat.items()}, {m: v[1] for m, v in cat.items()}, scorers.temperatures


def label_of(result):
    """+1 image 0 wins, -1 image 1 wins, 0 dropped."""
    return torch.where(~result.keep, 0, torch.where(result.label > 0.5, 1, -1))


def main(args):
    names = [m.strip() for m in args.reward_models.split(",") if m.strip()]
    config = args.reward_config
    workdir = None
    if config is None:
        workdir = tempfile.TemporaryDirectory()
        config = tiny_assets.build_tiny_scorers(workdir.name, seed=args.seed)
    rows = tiny_assets.make_pickapic_rows(args.num_pairs, seed=args.seed + 1)
    images_0 = [rewards.load_image(r["jpg_0"]) for r in rows]
    images_1 = [rewards.load_image(r["jpg_1"]) for r in rows]
    captions = [r["caption"] for r in rows]

    scored = {dtype: score_pairs(config, names, dtype, args.device, images_0, images_1, captions) for dtype in DTYPES}
    reference_0, reference_1, temperatures = scored["float32"]
    results = {"num_pairs": args.num_pairs, "metrics": names, "dtypes": {}}
    modes = [m for m in MODES if not m.startswith("single:") or m.split(":", 1)[1] in names]
    for dtype in DTYPES[1:]:
        scores_0, scores_1, _ = scored[dtype]
        entry = {"labels_changed": {}, "votes_flipped": {}, "max_abs_score_error": {}}
        for mode in modes:
            kwargs = {"mode": mode, "temperatures": temperatures}
            ref = rewards.consensus(reference_0, reference_1, **kwargs)
            low = rewards.consensus(scores_0, scores_1, **kwargs)
            entry["labels_changed"][mode] = int((label_of(ref) != label_of(low)).sum())
        ref = rewards.consensus(reference_0, reference_1, temperatures=temperatures)
        low = rewards.consensus(scores_0, scores_1, temperatures=temperatures)
        for m in names:
            entry["votes_flipped"][m] = int((ref.votes[m] != low.votes[m]).sum())
            error = torch.cat([scores_0[m] - reference_0[m], scores_1[m] - reference_1[m]]).abs().max()
            entry["max_abs_score_error"][m] = float(error)
        results["dtypes"][dtype] = entry

    print(f"{args.num_pairs} pairs, metrics {', '.join(names)}; labels that differ from float32 scoring:")
    header = ["mode"] + list(DTYPES[1:])
    print("  " + " | ".join(f"{h:>16}" for h in header))
    for mode in modes:
        cells = [
            f"{results['dtypes'][d]['labels_changed'][mode]:>5} ({100 * results['dtypes'][d]['labels_changed'][mode] / args.num_pairs:4.1f}%)"
            for d in DTYPES[1:]
        ]
        print("  " + " | ".join(f"{c:>16}" for c in [mode] + cells))
    print("metric votes that flip (majority inputs):")
    for m in names:
        cells = [f"{results['dtypes'][d]['votes_flipped'][m]:>5}" for d in DTYPES[1:]]
        print("  " + " | ".join(f"{c:>16}" for c in [m] + cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if workdir is not None:
        workdir.cleanup()
    return results


if __name__ == "__main__":
    main(parse_args())
