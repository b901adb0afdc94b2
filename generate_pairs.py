#!/usr/bin/env python
# coding=utf-8
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
"""A BalancedDPO training set from a list of prompts: K images per prompt, scored, paired and labelled.

BalancedDPO needs no human label: the consensus of the metrics labels any pair. For each prompt, the base model
(optionally with a LoRA) generates `--images_per_prompt` images, one seed each; every image is scored once by the
metrics; every pair of a prompt's images is labelled by the consensus; `--pair_selection` keeps some of them
(`pair_generation.py`: by default the consensus winner against the consensus loser). The result is a
Pick-a-Pic-format dataset with the columns `rewards.py label` writes, so it trains both with a live consensus and
with `--precomputed_consensus`:

    python generate_pairs.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --prompts partiprompts --images_per_prompt 4 --reward_models pickscore,hpsv2,clip,aesthetic \\
      --output_dir parti_pairs
    accelerate launch train_balanced_dpo.py ... --dataset_name parti_pairs --precomputed_consensus

Prompts are processed in chunks (`--prompts_per_shard`); each finished chunk is one parquet shard, and a killed run
continues with `--resume`, writing what an uninterrupted run writes. `preview.png` shows a few pairs with their
scores and `summary.json` the counts, agreement and timing.
"""

import argparse
import io
import json
import logging
import os
import time

import torch
from tqdm.auto import tqdm

import evaluate_balanced_dpo
import pair_generation
import preference_data
import rewards
from multi_metric.cli import ShardWriter, consensus_columns, consensus_features


logger = logging.getLogger(__name__)

PROGRESS_FILE = "generation.progress.json"
SUMMARY_FILE = "summary.json"
PREVIEW_FILE = "preview.png"
# What decides the output: a resumed run must use the same.
_RUN_KEYS = (
    "pretrained_model_name_or_path", "revision", "variant", "pretrained_vae_model_name_or_path", "lora", "prompts",
    "prompt_column", "prompt_split", "max_prompts", "images_per_prompt", "seed", "num_inference_steps",
    "guidance_scale", "scheduler", "resolution", "mixed_precision", "reward_models", "scorer_dtype", "consensus",
    "tie_policy", "abstain_margin", "min_agreement", "normalize_warmup_pairs", "pair_selection", "prompts_per_shard",
    "image_format", "max_sequence_length",
)  # fmt: skip


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Preference pairs generated from prompts and labelled by the multi-metric consensus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="A pipeline folder or Hub id.")
    group.add_argument("--revision", type=str, default=None)
    group.add_argument("--variant", type=str, default=None)
    group.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None, help="A VAE to use instead.")
    group.add_argument("--lora", type=str, default=None, help="Generate with this LoRA (a folder, file or Hub id).")
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--prompts",
        type=str,
        required=True,
        help="partiprompts, hpdv2, pickapic, a .txt or .json file, or a dataset (local path or Hub id).",
    )
    group.add_argument("--prompt_column", type=str, default=None, help="Prompt column of a prompt dataset.")
    group.add_argument("--prompt_split", type=str, default=None, help="Split of a prompt dataset.")
    group.add_argument("--max_prompts", type=int, default=None, help="Use the first N prompts only.")
    group = parser.add_argument_group("generation")
    group.add_argument("--images_per_prompt", type=int, default=4, help="K >= 2 images per prompt, one seed each.")
    group.add_argument("--seed", type=int, default=0, help="Image k of prompt p has seed `seed + p * K + k`.")
    group.add_argument("--num_inference_steps", type=int, default=30)
    group.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's own.")
    group.add_argument(
        "--scheduler", type=str, default=None, help="A diffusers scheduler class (default: the model's)."
    )
    group.add_argument("--resolution", type=int, default=None, help="Default: the model's native resolution.")
    group.add_argument("--batch_size", type=int, default=8, help="Images per pipeline call.")
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Pipeline weights dtype (default on CUDA: bf16 for SD3 / FLUX.1, fp16 for the others;"
                       " no on the CPU).")  # fmt: skip
    group.add_argument("--max_sequence_length", type=int, default=None,
                       help="T5 tokens of the prompts of SD3 / FLUX.1 pipelines (default: the pipeline's).")  # fmt: skip
    group.add_argument("--device", type=str, default=None, help="Default: cuda when available.")
    group = parser.add_argument_group("scoring and pairs")
    group.add_argument("--reward_models", type=str, default=",".join(rewards.DEFAULT_REWARD_MODELS))
    group.add_argument("--reward_config", type=str, default=None, help="Scorer options (see `rewards.py`).")
    group.add_argument("--scorer_dtype", type=str, default=None, choices=["float32", "float16", "bfloat16"])
    group.add_argument("--consensus", type=str, default="majority", help="Any consensus mode but `human`.")
    group.add_argument(
        "--tie_policy", type=str, default="mean_prob", choices=[p for p in rewards.TIE_POLICIES if p != "human"]
    )
    group.add_argument("--abstain_margin", type=float, default=0.0)
    group.add_argument("--min_agreement", type=float, default=0.0)
    group.add_argument("--normalize_warmup_pairs", type=int, default=2048)
    group.add_argument(
        "--pair_selection",
        type=str,
        default="extremes",
        choices=list(pair_generation.PAIR_SELECTIONS),
        help="extremes: the consensus winner against the consensus loser of each prompt (one clear pair per"
        " prompt); all: every pair; random: one random pair.",
    )
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", type=str, required=True)
    group.add_argument("--prompts_per_shard", type=int, default=64, help="Prompts per parquet shard (resume unit).")
    group.add_argument("--image_format", type=str, default="png", choices=["png", "jpeg"],
                       help="png keeps the scored pixels exactly; jpeg (quality 95) is smaller.")  # fmt: skip
    group.add_argument("--num_preview_pairs", type=int, default=8)
    group.add_argument("--resume", action="store_true", help="Continue an interrupted run in --output_dir.")
    group.add_argument("--overwrite", action="store_true", help="Replace what --output_dir holds.")
    args = parser.parse_args(input_args)
    if args.consensus == "human":
        parser.error("--consensus human needs human labels; generated pairs have none.")
    if args.images_per_prompt < 2:
        parser.error("--images_per_prompt must be >= 2 (a pair needs two images of a prompt).")
    for name in ("num_inference_steps", "batch_size", "prompts_per_shard"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    if args.resume and args.overwrite:
        parser.error("Give --resume or --overwrite, not both.")
    if args.scheduler is not None:
        import diffusers

        if not hasattr(getattr(diffusers, args.scheduler, None), "from_config"):
            parser.error(f"--scheduler {args.scheduler!r} is not a diffusers scheduler class (e.g. DDIMScheduler).")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------------------


def run_fingerprint(args):
    fingerprint = {key: getattr(args, key) for key in _RUN_KEYS}
    fingerprint["reward_config"] = rewards.load_reward_config(args.reward_config)
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def read_progress(args):
    """The state of an interrupted run in --output_dir (None when there is none, or with --overwrite)."""
    path = os.path.join(args.output_dir, PROGRESS_FILE)
    finished = os.path.isfile(os.path.join(args.output_dir, SUMMARY_FILE))
    if args.overwrite or not (os.path.isfile(path) or finished):
        return None
    if finished and not os.path.isfile(path):
        raise SystemExit(f"error: {args.output_dir} already holds generated pairs; pass --overwrite to replace them.")
    if not args.resume:
        raise SystemExit(
            f"error: {args.output_dir} holds an interrupted run; pass --resume to continue it or --overwrite to start"
            " over."
        )
    with open(path) as f:
        progress = json.load(f)
    if progress["fingerprint"] != run_fingerprint(args):
        changed = sorted(
            k for k in progress["fingerprint"] if progress["fingerprint"][k] != run_fingerprint(args).get(k)
        )
        raise SystemExit(f"error: --resume with other settings than the interrupted run ({', '.join(changed)}).")
    return progress


def write_progress(args, state):
    path = os.path.join(args.output_dir, PROGRESS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def labeler_state(labeler):
    state = labeler.state_dict()
    state["generator"] = state["generator"].tolist()
    return state


def load_labeler_state(labeler, state):
    state = dict(state)
    state["generator"] = torch.tensor(state["generator"], dtype=torch.uint8)
    labeler.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def encode_image(image, image_format):
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def output_features(names):
    import datasets

    features = {
        "caption": datasets.Value("string"),
        "jpg_0": datasets.Value("binary"),
        "jpg_1": datasets.Value("binary"),
        "label_0": datasets.Value("float64"),
        "label_1": datasets.Value("float64"),
        "prompt_index": datasets.Value("int64"),
        "image_index_0": datasets.Value("int64"),
        "image_index_1": datasets.Value("int64"),
        "seed_0": datasets.Value("int64"),
        "seed_1": datasets.Value("int64"),
    }
    features.update(consensus_features(names))
    return datasets.Features(features)


def generate_images(pipeline, prompts, seeds, args, call_kwargs, progress):
    """One image per (prompt, seed), `--batch_size` per pipeline call, each from its own CPU generator (so an image
    depends only on its prompt and seed, not on the batch it is in)."""
    images = []
    for start in range(0, len(prompts), args.batch_size):
        generators = [
            torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start : start + args.batch_size]
        ]
        with torch.no_grad():
            images += pipeline(
                list(prompts[start : start + args.batch_size]), generator=generators, **call_kwargs
            ).images
        progress.update(len(generators))
    return images


def main(args):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.INFO)
    start_time = time.perf_counter()
    progress_state = read_progress(args)
    prompts, prompt_info = preference_data.load_prompts(
        args.prompts, args.prompt_column, args.prompt_split, args.max_prompts
    )
    names = [m.strip() for m in args.reward_models.split(",") if m.strip()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    family = evaluate_balanced_dpo.detect_model_family(args.pretrained_model_name_or_path, args.revision)
    if args.max_sequence_length is not None and family not in ("sd3", "flux"):
        raise SystemExit("error: --max_sequence_length is for SD3 and FLUX.1 pipelines (their T5 prompts).")
    # SD3 and FLUX.1 were released in bf16; fp16 overflows in their T5 encoder.
    cuda_dtype = "bf16" if family in ("sd3", "flux") else "fp16"
    mixed_precision = args.mixed_precision or (cuda_dtype if torch.device(device).type == "cuda" else "no")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    rewards.ConsensusLabeler.from_args(argparse.Namespace(human_vote=False, **vars(args)))  # a bad mode fails now
    os.makedirs(args.output_dir, exist_ok=True)

    scorers = rewards.build_scorers(
        names, args.reward_config, device=device, dtype=args.scorer_dtype or rewards.default_scorer_dtype(device)
    )
    labeler = rewards.ConsensusLabeler.from_args(
        argparse.Namespace(human_vote=False, **vars(args)), scorers.temperatures, scorers.weights
    )
    pipeline = evaluate_balanced_dpo.load_pipeline(args, args.pretrained_model_name_or_path, dtype, device)
    if args.lora is not None:
        path, weight_name = evaluate_balanced_dpo._lora_location(args.lora)
        pipeline.load_lora_weights(path, weight_name=weight_name)
    defaults = evaluate_balanced_dpo.pipeline_defaults(args.pretrained_model_name_or_path, args.revision)
    call_kwargs = {"num_inference_steps": args.num_inference_steps, "output_type": "pil"}
    if args.max_sequence_length is not None:
        call_kwargs["max_sequence_length"] = args.max_sequence_length
    if args.guidance_scale is not None:
        call_kwargs["guidance_scale"] = args.guidance_scale
    resolution = args.resolution or defaults["resolution"]
    if resolution is not None:
        call_kwargs["height"] = call_kwargs["width"] = resolution

    # Counts and the position: everything in `state` is what a resumed run continues from.
    state = {
        "fingerprint": run_fingerprint(args),
        "shards_done": 0,
        "shards": [],
        "counts": {"prompts": 0, "images": 0, "candidates": 0, "pairs": 0, "kept": 0},
        "agreement_sum": 0.0,
        "score_sums": dict.fromkeys(names, 0.0),
        "generation_seconds": 0.0,
        "preview": [],
    }
    if progress_state is not None:
        state.update({k: progress_state[k] for k in state if k != "fingerprint"})
        load_labeler_state(labeler, progress_state["labeler"])
        logger.info(f"Resuming after {state['shards_done']} shards ({state['counts']['prompts']} prompts).")
    writer = ShardWriter(args.output_dir, "train", 1, output_features(names), resume_paths=state["shards"])
    per_prompt = args.images_per_prompt
    chunks = [
        range(s, min(s + args.prompts_per_shard, len(prompts))) for s in range(0, len(prompts), args.prompts_per_shard)
    ]
    bar = tqdm(total=len(prompts) * per_prompt, initial=state["counts"]["images"], unit="image", desc="generating")
    for chunk_index, chunk in enumerate(chunks):
        if chunk_index < state["shards_done"]:
            continue
        chunk_prompts = [prompts[p] for p in chunk]
        image_prompts = [prompt for prompt in chunk_prompts for _ in range(per_prompt)]
        seeds = [pair_generation.image_seed(args.seed, p, k, per_prompt) for p in chunk for k in range(per_prompt)]
        started = time.perf_counter()
        images = generate_images(pipeline, image_prompts, seeds, args, call_kwargs, bar)
        state["generation_seconds"] += time.perf_counter() - started
        generated = state["counts"]["images"] + len(images)
        bar.set_postfix(images_per_s=f"{generated / max(state['generation_seconds'], 1e-9):.2f}")

        flat = scorers.score(images, image_prompts)
        scores = {m: flat[m].view(len(chunk), per_prompt) for m in names}
        candidates, result = pair_generation.label_candidates(scores, lambda s0, s1: labeler(s0, s1))
        selected = pair_generation.select_pairs(candidates, result, len(chunk), per_prompt, args.pair_selection,
                                                torch.Generator().manual_seed(args.seed + chunk_index))  # fmt: skip
        rows = []
        for n in range(len(selected)):
            p, i, j = selected.prompt[n], selected.image_0[n], selected.image_1[n]
            row = {
                "caption": chunk_prompts[p],
                "jpg_0": encode_image(images[p * per_prompt + i], args.image_format),
                "jpg_1": encode_image(images[p * per_prompt + j], args.image_format),
                "label_0": 0.5,  # no human judged these pairs
                "label_1": 0.5,
                "prompt_index": chunk[p],
                "image_index_0": i,
                "image_index_1": j,
                "seed_0": seeds[p * per_prompt + i],
                "seed_1": seeds[p * per_prompt + j],
            }
            row.update(
                consensus_columns(
                    {m: float(scores[m][p, i]) for m in names},
                    {m: float(scores[m][p, j]) for m in names},
                    float(selected.label[n]),
                    float(selected.prob[n]),
                    bool(selected.keep[n]),
                    float(selected.agreement[n]),
                )
            )
            rows.append(row)
            if len(state["preview"]) < args.num_preview_pairs:
                state["preview"].append({"shard": chunk_index, "row": len(rows) - 1})
        writer.add(rows)
        counts = state["counts"]
        counts["prompts"] += len(chunk)
        counts["images"] += len(images)
        counts["candidates"] += selected.candidates
        counts["pairs"] += len(selected)
        counts["kept"] += int(selected.keep.sum())
        state["agreement_sum"] += float(selected.agreement[selected.keep].sum())
        for m in names:
            state["score_sums"][m] += float(scores[m].sum())
        state["shards_done"] = chunk_index + 1
        state["shards"] = list(writer.paths)
        write_progress(args, dict(state, labeler=labeler_state(labeler)))
    bar.close()
    final = writer.close()

    summary = summarize(args, state, prompt_info, len(prompts), time.perf_counter() - start_time, final)
    write_preview(args, state, final, names)
    with open(os.path.join(args.output_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    progress_path = os.path.join(args.output_dir, PROGRESS_FILE)
    if os.path.isfile(progress_path):
        os.remove(progress_path)
    logger.info(
        f"{summary['pairs']} pairs ({summary['kept']} kept) from {summary['prompts']} prompts, "
        f"{summary['images_per_second']:.2f} images/s; dataset in {args.output_dir}"
    )
    return summary


def summarize(args, state, prompt_info, num_prompts, seconds, shards):
    counts = state["counts"]
    images = max(counts["images"], 1)
    return {
        "prompts": counts["prompts"],
        "prompts_skipped": prompt_info.get("skipped", 0),
        "prompt_source": prompt_info["source"],
        "images": counts["images"],
        "candidate_pairs": counts["candidates"],
        "pairs": counts["pairs"],
        "kept": counts["kept"],
        "dropped": counts["pairs"] - counts["kept"],
        "mean_agreement": state["agreement_sum"] / counts["kept"] if counts["kept"] else None,
        "mean_scores": {m: total / images for m, total in state["score_sums"].items()},
        "generation_seconds": round(state["generation_seconds"], 2),
        "images_per_second": counts["images"] / max(state["generation_seconds"], 1e-9),
        "seconds": round(seconds, 2),
        "shards": [os.path.relpath(p, args.output_dir) for p in shards],
        "settings": run_fingerprint(args),
    }


def write_preview(args, state, shards, names):
    """preview.png: the first pairs with both images and every metric's two scores."""
    import datasets

    if not state["preview"] or not shards:
        return
    from PIL import Image

    entries = []
    for item in state["preview"]:
        row = datasets.Dataset.from_parquet(shards[item["shard"]])[item["row"]]
        label = row["consensus_label"]
        verdict = "dropped" if label != label else ("image 0 wins" if label > 0.5 else "image 1 wins")
        entries.append(
            (
                f"{row['caption']}  [{verdict}, agreement {row['agreement']:.2f}]",
                Image.open(io.BytesIO(row["jpg_0"])),
                Image.open(io.BytesIO(row["jpg_1"])),
                {m: row[f"score_{m}_0"] for m in names},
                {m: row[f"score_{m}_1"] for m in names},
            )
        )
    grid = evaluate_balanced_dpo.make_grid(entries, names, "image 0", "image 1")
    grid.save(os.path.join(args.output_dir, PREVIEW_FILE))


if __name__ == "__main__":
    main(parse_args())
