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
"""The command line of `rewards.py`: `score` (scores, probabilities and the consensus of image pairs), `label` (adds
scores and consensus labels to a preference dataset, resumably) and `calibrate` (fits each metric's temperature to
human labels). Run it as `python rewards.py <command>`.
"""

import argparse
import glob
import json
import logging
import os
from typing import Optional

import numpy as np
import torch

from .consensus import (
    CONSENSUS_MODES,
    DEFAULT_TEMPERATURES,
    TIE_POLICIES,
    ConsensusLabeler,
    _check_mode,
    _nll,
    _sigmoid_np,
    fit_temperature,
)
from .images import load_image
from .scoring import DEFAULT_REWARD_MODELS, _parse_names, available_scorers, build_scorers, load_reward_config


logger = logging.getLogger(__name__)


def _add_scorer_args(parser):
    parser.add_argument(
        "--reward_models",
        "--metrics",
        dest="reward_models",
        type=str,
        default=",".join(DEFAULT_REWARD_MODELS),
        help=f"Comma-separated metrics (registered names or package.module:Class). Available: {available_scorers()}.",
    )
    parser.add_argument(
        "--reward_config",
        type=str,
        default=None,
        help="JSON file mapping each metric to its build_scorer options (paths, temperature, weight, ...).",
    )
    parser.add_argument("--device", type=str, default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--dtype", type=str, default=None, help="Scorer weight dtype: float32 (default), bfloat16, float16."
    )
    parser.add_argument(
        "--no_cuda_graphs", action="store_true", help="Run scorer forwards eagerly instead of replaying CUDA graphs."
    )


def _add_consensus_args(parser):
    parser.add_argument("--consensus", type=str, default="majority", help=f"Consensus mode: {CONSENSUS_MODES}.")
    parser.add_argument("--abstain_margin", type=float, default=0.0, help="A metric abstains when |p - 0.5| <= this.")
    parser.add_argument("--tie_policy", type=str, default="mean_prob", choices=TIE_POLICIES)
    parser.add_argument("--min_agreement", type=float, default=0.0, help="Drop pairs whose agreement is below this.")
    parser.add_argument("--human_vote", action="store_true", help="Count the human label as one more voter.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random_metric draws.")
    parser.add_argument(
        "--normalize_warmup_pairs", type=int, default=2048, help="Pairs used to estimate sigma for normalized_sum."
    )


def _add_dataset_args(parser):
    parser.add_argument("--dataset_name", type=str, required=True, help="Hub dataset id or local path.")
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--split", type=str, default="train")
    parser.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--caption_column", type=str, default="caption")
    parser.add_argument("--image_0_column", type=str, default="jpg_0")
    parser.add_argument("--image_1_column", type=str, default="jpg_1")
    parser.add_argument("--label_0_column", type=str, default="label_0", help="Human label column (may be absent).")
    parser.add_argument("--max_samples", type=int, default=None, help="Process at most this many pairs.")
    parser.add_argument("--batch_size", type=int, default=16, help="Pairs scored per step.")
    parser.add_argument(
        "--max_bad_examples",
        type=str,
        default=None,
        help="Stop when more rows than this (count, or a fraction < 1) are unusable; bad rows are skipped and logged.",
    )


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Score images with several reward models and build consensus preference labels."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    score = subparsers.add_parser("score", help="Score images against a prompt; pairs consecutive images.")
    score.add_argument("--images", nargs="+", required=True, help="Image files; (1st, 2nd), (3rd, 4th) ... are pairs.")
    score.add_argument("--prompt", type=str, required=True)
    score.add_argument("--json", action="store_true", help="Print one JSON object instead of tables.")
    _add_scorer_args(score)
    _add_consensus_args(score)

    label = subparsers.add_parser("label", help="Add per-metric scores and consensus labels to a preference dataset.")
    _add_dataset_args(label)
    _add_scorer_args(label)
    _add_consensus_args(label)
    label.add_argument("--output_dir", type=str, required=True, help="Parquet shards go to <output_dir>/data/.")
    label.add_argument("--rows_per_shard", type=int, default=1000)
    label.add_argument(
        "--resume",
        action="store_true",
        help="Continue an interrupted run in --output_dir from its last written shard (same arguments).",
    )
    label.add_argument(
        "--overwrite", action="store_true", help="Start over even if --output_dir holds an unfinished run."
    )

    calibrate = subparsers.add_parser("calibrate", help="Fit each metric's temperature to the human labels.")
    _add_dataset_args(calibrate)
    _add_scorer_args(calibrate)
    _add_consensus_args(calibrate)
    calibrate.add_argument("--output", type=str, required=True, help="Where to write the reward-config JSON.")
    calibrate.add_argument(
        "--rescore",
        action="store_true",
        help="Score the images even when the dataset already has score_<metric>_0/1 columns (from `label`).",
    )

    args = parser.parse_args(input_args)
    # Check the consensus options before any model is loaded.
    try:
        _check_mode(args.consensus, args.tie_policy, args.abstain_margin, args.min_agreement)
    except ValueError as error:
        parser.error(str(error))
    if args.consensus.startswith("single:") and args.consensus[len("single:") :] not in _parse_names(
        args.reward_models
    ):
        parser.error(f"--consensus {args.consensus}: the metric is not in --reward_models {args.reward_models}.")
    # Unknown metrics fail here, not after the dataset was opened.
    for name in _parse_names(args.reward_models):
        if name not in available_scorers() and ":" not in name:
            parser.error(
                f"unknown metric '{name}' in --reward_models; available: {', '.join(available_scorers())} (or a user"
                " scorer as package.module:Class)."
            )
    if getattr(args, "max_bad_examples", None) is not None:
        from preference_data import parse_max_bad_examples

        try:
            args.max_bad_examples = parse_max_bad_examples(args.max_bad_examples)
        except ValueError as error:
            parser.error(str(error))
    return args


def _default_device(device):
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _format_row(cells, widths):
    return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def _print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(_format_row(header, widths))
    for row in rows:
        print(_format_row(row, widths))


def cmd_score(args):
    images = []
    for path in args.images:
        try:
            images.append(load_image(path))
        except (ValueError, FileNotFoundError, OSError) as error:
            raise SystemExit(f"error: cannot read image '{path}': {error}")
    scorers = build_scorers(
        args.reward_models,
        args.reward_config,
        device=_default_device(args.device),
        dtype=args.dtype,
        cuda_graphs=not args.no_cuda_graphs,
    )
    scores = scorers.score(images, [args.prompt] * len(images))
    labeler = ConsensusLabeler.from_args(args, scorers.temperatures, scorers.weights)
    pairs = []
    for i in range(0, len(images) - 1, 2):
        s0 = {m: v[i : i + 1] for m, v in scores.items()}
        s1 = {m: v[i + 1 : i + 2] for m, v in scores.items()}
        result = labeler(s0, s1)
        pairs.append(
            {
                "image_0": args.images[i],
                "image_1": args.images[i + 1],
                "probs": {m: float(p[0]) for m, p in result.probs.items()},
                "votes": {m: int(v[0]) for m, v in result.votes.items()},
                "label": float(result.label[0]),
                "prob": float(result.prob[0]),
                "agreement": float(result.agreement[0]),
                "keep": bool(result.keep[0]),
            }
        )
    output = {
        "prompt": args.prompt,
        "images": list(args.images),
        "scores": {m: [float(s) for s in v] for m, v in scores.items()},
        "temperatures": scorers.temperatures,
        "consensus": args.consensus,
        "pairs": pairs,
    }
    if args.json:
        print(json.dumps(output, indent=2))
        return output
    print(f"prompt: {args.prompt}")
    _print_table(
        ["image"] + scorers.names,
        [[p] + [f"{scores[m][i]:.4f}" for m in scorers.names] for i, p in enumerate(args.images)],
    )
    for pair in pairs:
        print(f"\npair: image 0 = {pair['image_0']}, image 1 = {pair['image_1']}")
        _print_table(
            ["metric", "tau", "p(image 0)", "vote"],
            [
                [m, f"{scorers.temperatures[m]:.4g}", f"{pair['probs'][m]:.4f}", f"{pair['votes'][m]:+d}"]
                for m in scorers.names
            ],
        )
        winner = {1.0: "image 0", 0.0: "image 1"}.get(pair["label"], "none (tie)")
        print(
            f"consensus ({args.consensus}): preferred {winner}, prob {pair['prob']:.4f}, agreement "
            f"{pair['agreement']:.3f}, {'kept' if pair['keep'] else 'dropped'}"
        )
    if len(images) % 2:
        print(f"\n(no pair for the last image {args.images[-1]}: give an even number of images to compare pairs)")
    return output


def _load_dataset(args):
    import datasets

    saved = ("dataset_info.json", "dataset_dict.json")
    if os.path.isdir(args.dataset_name) and any(os.path.isfile(os.path.join(args.dataset_name, f)) for f in saved):
        dataset = datasets.load_from_disk(args.dataset_name)  # a save_to_disk folder
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[args.split]
        if args.streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        dataset = datasets.load_dataset(
            args.dataset_name,
            args.dataset_config_name,
            split=args.split,
            streaming=args.streaming,
            cache_dir=args.cache_dir,
        )
    from preference_data import DataError, check_columns

    features = dataset.features
    columns = list(features) if features is not None else None
    # Missing columns and wrong types stop here, before any scorer is loaded. The human label is optional.
    label_column = args.label_0_column if columns is None or args.label_0_column in columns else None
    try:
        check_columns(dataset, args.caption_column, args.image_0_column, args.image_1_column, label_column)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    if columns is not None:
        for column in (args.image_0_column, args.image_1_column):
            if isinstance(features[column], datasets.Image) and features[column].decode:
                # Keep the encoded bytes: decoding happens here, with undecodable images skipped and counted.
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _iter_batches(dataset, batch_size, max_samples, with_ids=False, start=0):
    """Batches of rows; with `with_ids`, (row ids, rows) where a row id is the row's position in the dataset.
    `start` skips that many rows first (without decoding them)."""
    if start:
        import datasets

        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.skip(start)
        else:
            dataset = dataset.select(range(start, len(dataset)))
    batch, ids = [], []
    for count, row in enumerate(dataset, start=start):
        if max_samples is not None and count >= max_samples:
            break
        batch.append(row)
        ids.append(count)
        if len(batch) == batch_size:
            yield (ids, batch) if with_ids else batch
            batch, ids = [], []
    if batch:
        yield (ids, batch) if with_ids else batch


def _decode_pairs(rows, args, row_ids=None):
    """Checks and decodes each row; returns (kept rows, images_0, images_1, bad rows).

    A bad row (undecodable image, missing or empty caption, label not in {0, 0.5, 1}) is skipped and reported as
    `(row id, reason, undecodable)`; grayscale, RGBA, CMYK or palette images and pairs of different sizes are fine.
    """
    from preference_data import BadExampleError, normalize_label

    kept, images_0, images_1, bad = [], [], [], []
    for row_id, row in zip(row_ids if row_ids is not None else range(len(rows)), rows):
        try:
            caption = row.get(args.caption_column)
            if not isinstance(caption, str) or not caption.strip():
                raise BadExampleError("caption is missing or empty")
            if args.label_0_column in row:
                normalize_label(row[args.label_0_column])
        except BadExampleError as error:
            bad.append((row_id, str(error), False))
            continue
        try:
            image_0, image_1 = load_image(row[args.image_0_column]), load_image(row[args.image_1_column])
        except (ValueError, FileNotFoundError, OSError, TypeError) as error:
            bad.append((row_id, f"undecodable image: {error}", True))
            continue
        kept.append(row)
        images_0.append(image_0)
        images_1.append(image_1)
    return kept, images_0, images_1, bad


def _human_labels(rows, column):
    if not rows or column not in rows[0]:
        return None
    return torch.tensor([float("nan") if r[column] is None else float(r[column]) for r in rows], dtype=torch.float64)


def _precomputed_columns(names):
    return [f"score_{m}_{i}" for m in names for i in (0, 1)]


def consensus_columns(scores_0, scores_1, label, prob, keep, agreement):
    """The columns `rewards.py label` (and `generate_pairs.py`) write for one pair: `score_<metric>_0/1`,
    `consensus_label` and `consensus_prob` (NaN when the pair is dropped, so a reader that only looks at the label
    cannot train on it), `agreement` and `consensus_keep`; what `--precomputed_consensus` reads."""
    row = {}
    for m in scores_0:
        row[f"score_{m}_0"], row[f"score_{m}_1"] = float(scores_0[m]), float(scores_1[m])
    row["consensus_label"] = float(label) if keep else float("nan")
    row["consensus_prob"] = float(prob) if keep else float("nan")
    row["agreement"] = float(agreement)
    row["consensus_keep"] = bool(keep)
    return row


def consensus_features(names):
    """`datasets` features of `consensus_columns`."""
    import datasets

    features = {column: datasets.Value("float32") for column in _precomputed_columns(names)}
    features.update({c: datasets.Value("float32") for c in ("consensus_label", "consensus_prob", "agreement")})
    features["consensus_keep"] = datasets.Value("bool")
    return features


class ShardWriter:
    """Writes rows to `<output_dir>/data/<split>-NNNNN-of-MMMMM.parquet` so `datasets.load_dataset(output_dir)` reads
    them back as split `<split>`.

    Shards are written as `.parquet.tmp` files while labeling runs and renamed at the end. A shard holds every
    buffered row once there are at least `rows_per_shard`, so it always ends at a batch boundary: what is on disk is
    then exactly the rows up to a known input position, which is what resuming needs. `resume_paths` are the shards of
    an interrupted run, kept and continued.
    """

    def __init__(self, output_dir, split, rows_per_shard, features, resume_paths=None):
        self.data_dir = os.path.join(output_dir, "data")
        os.makedirs(self.data_dir, exist_ok=True)
        keep = set(resume_paths or [])
        for old in glob.glob(os.path.join(self.data_dir, f"{split}-*.parquet*")):
            if old not in keep:
                os.remove(old)
        self.split, self.rows_per_shard, self.features = split, rows_per_shard, features
        self.rows, self.paths = [], list(resume_paths or [])

    def add(self, rows) -> bool:
        """Buffers rows; returns True when that wrote a shard."""
        self.rows.extend(rows)
        if len(self.rows) < self.rows_per_shard:
            return False
        self._flush(self.rows)
        self.rows = []
        return True

    def _flush(self, rows):
        import datasets

        path = os.path.join(self.data_dir, f"{self.split}-{len(self.paths):05d}.parquet.tmp")
        partial = path + ".partial"  # a shard cut short by a kill is never taken for a finished one
        datasets.Dataset.from_list(rows, features=self.features).to_parquet(partial)
        os.replace(partial, path)
        self.paths.append(path)

    def close(self):
        if self.rows or not self.paths:
            self._flush(self.rows)
            self.rows = []
        final = []
        for i, path in enumerate(self.paths):
            target = os.path.join(self.data_dir, f"{self.split}-{i:05d}-of-{len(self.paths):05d}.parquet")
            os.replace(path, target)
            final.append(target)
        return final


# What decides the labels: a resumed run must use the same.
_LABEL_RUN_KEYS = (
    "dataset_name", "dataset_config_name", "split", "streaming", "caption_column", "image_0_column", "image_1_column",
    "label_0_column", "max_samples", "batch_size", "rows_per_shard", "reward_models", "dtype", "consensus",
    "abstain_margin", "tie_policy", "min_agreement", "human_vote", "seed", "normalize_warmup_pairs",
)  # fmt: skip


def _label_run_fingerprint(args) -> dict:
    fingerprint = {key: getattr(args, key, None) for key in _LABEL_RUN_KEYS}
    fingerprint["reward_config"] = load_reward_config(args.reward_config)
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def _label_progress_path(args) -> str:
    return os.path.join(args.output_dir, f"labeling_{args.split}.progress.json")


def _read_label_progress(args) -> Optional[dict]:
    """The state of an interrupted `label` run in `--output_dir`, checked against these arguments; None when there
    is none or `--overwrite` is given. Stops with a clear error when one exists and neither `--resume` nor
    `--overwrite` says what to do with it, so that finished shards are never deleted by accident."""
    path = _label_progress_path(args)
    if not os.path.isfile(path) or args.overwrite:
        return None
    with open(path, encoding="utf-8") as f:
        progress = json.load(f)
    if not args.resume:
        raise SystemExit(
            f"error: {args.output_dir} holds an unfinished labeling run ({progress['rows_consumed']} input rows "
            "done). Add --resume to continue it, or --overwrite to start over."
        )
    fingerprint = _label_run_fingerprint(args)
    changed = sorted(k for k in fingerprint if fingerprint[k] != progress["fingerprint"].get(k))
    if changed:
        raise SystemExit(
            f"error: --resume with other settings than the interrupted run ({', '.join(changed)}). Use the same "
            "arguments, or --overwrite to start over."
        )
    data_dir = os.path.join(args.output_dir, "data")
    paths = [os.path.join(data_dir, name) for name in progress["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"error: cannot resume: shard {missing[0]} is gone. Use --overwrite to start over.")
    progress["shard_paths"] = paths
    return progress


def _write_label_progress(args, state: dict):
    path = _label_progress_path(args)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def _output_features(dataset, names):
    import datasets

    features = dataset.features
    if features is None:
        return None
    features = datasets.Features(dict(features))
    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            features[column] = datasets.Image()
    features.update(consensus_features(names))
    return features


def _write_label_progress_if_started(
    args, writer, fingerprint, rows_consumed, counts, agreement_sum, bad_examples, labeler
):
    """Records the position after which an interrupted run resumes; only once a shard exists (before that, a
    resumed run simply starts over)."""
    if not writer.paths:
        return
    _write_label_progress(
        args,
        {
            "fingerprint": fingerprint,
            "rows_consumed": rows_consumed,
            "shards": [os.path.basename(p) for p in writer.paths],
            "counts": counts,
            "agreement_sum": agreement_sum,
            "bad_examples": bad_examples.state_dict(),
            "labeler": {
                "normalized_sum": labeler.normalized_state.state_dict(),
                "generator": labeler.generator.get_state().tolist(),
            },
        },
    )


def cmd_label(args):
    from tqdm.auto import tqdm

    from preference_data import BadExampleTracker, DataError

    dataset = _load_dataset(args)
    scorers = build_scorers(
        args.reward_models,
        args.reward_config,
        device=_default_device(args.device),
        dtype=args.dtype,
        cuda_graphs=not args.no_cuda_graphs,
    )
    labeler = ConsensusLabeler.from_args(args, scorers.temperatures, scorers.weights)
    progress_state = _read_label_progress(args)
    writer = ShardWriter(
        args.output_dir,
        args.split,
        args.rows_per_shard,
        _output_features(dataset, scorers.names),
        resume_paths=progress_state["shard_paths"] if progress_state else None,
    )
    total = None if args.streaming else len(dataset)
    if args.max_samples is not None:
        total = min(total, args.max_samples) if total is not None else args.max_samples
    counts = {
        "rows": 0,
        "skipped_undecodable": 0,
        "skipped_invalid": 0,
        "kept": 0,
        "agree_with_human": 0,
        "human_decisive": 0,
    }
    bad_examples = BadExampleTracker(args.max_bad_examples, logger=logger)
    agreement_sum = 0.0
    start = 0
    if progress_state is not None:
        start = progress_state["rows_consumed"]
        counts.update(progress_state["counts"])
        agreement_sum = progress_state["agreement_sum"]
        bad_examples.load_state_dict(progress_state["bad_examples"])
        labeler.normalized_state.load_state_dict(progress_state["labeler"]["normalized_sum"])
        labeler.generator.set_state(torch.tensor(progress_state["labeler"]["generator"], dtype=torch.uint8))
        print(f"resuming after {start} input rows ({len(writer.paths)} shard(s) kept)")
    fingerprint = _label_run_fingerprint(args)
    progress = tqdm(total=total, initial=start, unit="pair", desc="labeling")
    for row_ids, rows in _iter_batches(dataset, args.batch_size, args.max_samples, with_ids=True, start=start):
        progress.update(len(rows))
        num_rows = len(rows)
        rows_consumed = row_ids[-1] + 1
        rows, images_0, images_1, bad = _decode_pairs(rows, args, row_ids)
        counts["skipped_undecodable"] += sum(1 for *_, undecodable in bad if undecodable)
        counts["skipped_invalid"] += sum(1 for *_, undecodable in bad if not undecodable)
        try:
            bad_examples.update([(row_id, reason) for row_id, reason, _ in bad], num_seen=num_rows)
        except DataError as error:
            raise SystemExit(f"error: {error}") from None
        if not rows:
            if not writer.rows:  # nothing buffered: the position can move on
                _write_label_progress_if_started(args, writer, fingerprint, rows_consumed, counts, agreement_sum,
                                                 bad_examples, labeler)  # fmt: skip
            continue
        scores_0, scores_1 = scorers.score_pairs(images_0, images_1, [r[args.caption_column] for r in rows])
        human = _human_labels(rows, args.label_0_column)
        result = labeler(scores_0, scores_1, human)
        out_rows = []
        for i, row in enumerate(rows):
            row = dict(row)
            row.update(
                consensus_columns(
                    {m: float(scores_0[m][i]) for m in scorers.names},
                    {m: float(scores_1[m][i]) for m in scorers.names},
                    float(result.label[i]),
                    float(result.prob[i]),
                    bool(result.keep[i]),
                    float(result.agreement[i]),
                )
            )
            out_rows.append(row)
        counts["rows"] += len(rows)
        counts["kept"] += result.num_kept
        agreement_sum += float(result.agreement.sum())
        if human is not None:
            decisive = result.keep & torch.isfinite(human) & (human != 0.5)
            counts["human_decisive"] += int(decisive.sum())
            counts["agree_with_human"] += int((decisive & ((result.label > 0.5) == (human > 0.5))).sum())
        if writer.add(out_rows):
            # Everything up to this row is on disk: a killed run resumes from here (`--resume`).
            _write_label_progress_if_started(args, writer, fingerprint, rows_consumed, counts, agreement_sum,
                                             bad_examples, labeler)  # fmt: skip
    progress.close()
    shards = writer.close()
    summary = {
        "dataset_name": args.dataset_name,
        "split": args.split,
        "reward_models": scorers.names,
        "reward_config": load_reward_config(args.reward_config),
        "temperatures": scorers.temperatures,
        "weights": scorers.weights,
        "consensus": labeler.config(),
        "normalized_sum_state": labeler.normalized_state.state_dict(),
        "counts": counts,
        "bad_examples": bad_examples.state_dict(),
        "shards": [os.path.relpath(s, args.output_dir) for s in shards],
    }
    with open(os.path.join(args.output_dir, f"labeling_{args.split}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    if os.path.exists(_label_progress_path(args)):
        os.remove(_label_progress_path(args))
    rows = max(counts["rows"], 1)
    print(f"wrote {counts['rows']} pairs to {len(shards)} parquet shard(s) under {writer.data_dir}")
    print(f"skipped {counts['skipped_undecodable']} pair(s) with undecodable images")
    if counts["skipped_invalid"]:
        print(f"skipped {counts['skipped_invalid']} pair(s) with a missing or empty caption or an invalid label")
    print(
        f"kept {counts['kept']} / {counts['rows']} pairs ({100.0 * counts['kept'] / rows:.1f}%), "
        f"mean agreement {agreement_sum / rows:.3f}"
    )
    if counts["human_decisive"]:
        print(
            f"consensus agrees with the human label on {counts['agree_with_human']} / {counts['human_decisive']} "
            "kept pairs with a decisive human label"
        )
    return summary


def _accuracy(deltas: np.ndarray, human: np.ndarray) -> float:
    """Share of decisive human pairs where the metric prefers the same image (metric ties count 1/2)."""
    decisive = np.isfinite(human) & (human != 0.5) & np.isfinite(deltas)
    if not decisive.any():
        return float("nan")
    agree = np.sign(deltas[decisive]) == np.sign(human[decisive] - 0.5)
    ties = deltas[decisive] == 0
    return float(np.mean(np.where(ties, 0.5, agree.astype(np.float64))))


def _expected_accuracy(deltas, human, temperature):
    decisive = np.isfinite(human) & (human != 0.5) & np.isfinite(deltas)
    if not decisive.any():
        return float("nan")
    p = _sigmoid_np(deltas[decisive] / temperature)
    return float(np.mean(np.where(human[decisive] > 0.5, p, 1.0 - p)))


def _consensus_accuracy(args, scores_0, scores_1, human, temperatures, weights):
    labeler = ConsensusLabeler.from_args(args, temperatures, weights)
    labeler.human_vote = False  # measure the metrics' consensus against the human label
    result = labeler(scores_0, scores_1, human if args.tie_policy == "human" or args.consensus == "human" else None)
    human = human.numpy()
    decisive = result.keep.numpy() & np.isfinite(human) & (human != 0.5)
    accuracy = (
        float(np.mean((result.label.numpy()[decisive] > 0.5) == (human[decisive] > 0.5)))
        if decisive.any()
        else float("nan")
    )
    return accuracy, float(result.keep.float().mean()) if len(result.keep) else float("nan")


def cmd_calibrate(args):
    from tqdm.auto import tqdm

    dataset = _load_dataset(args)
    names = _parse_names(args.reward_models)
    config = load_reward_config(args.reward_config)
    columns = list(dataset.features) if dataset.features is not None else []
    precomputed = not args.rescore and all(c in columns for c in _precomputed_columns(names))
    if args.label_0_column not in columns and columns:
        raise SystemExit(f"error: calibration needs human labels; no column '{args.label_0_column}' in {columns}.")
    scorers = None
    if precomputed:
        print(f"using the precomputed score columns {_precomputed_columns(names)}")
        temperatures = {
            m: float(config.get(m, {}).get("temperature", DEFAULT_TEMPERATURES.get(m, 1.0))) for m in names
        }
        weights = {m: float(config.get(m, {}).get("weight", 1.0)) for m in names}
    else:
        scorers = build_scorers(
            names, config, device=_default_device(args.device), dtype=args.dtype, cuda_graphs=not args.no_cuda_graphs
        )
        temperatures, weights = scorers.temperatures, scorers.weights
    from preference_data import BadExampleTracker, DataError

    bad_examples = BadExampleTracker(args.max_bad_examples, logger=logger)
    all_0 = {m: [] for m in names}
    all_1 = {m: [] for m in names}
    human_all, skipped = [], 0
    batches = _iter_batches(dataset, args.batch_size, args.max_samples, with_ids=True)
    for row_ids, rows in tqdm(batches, desc="calibrating", unit="batch"):
        if precomputed:
            scores_0 = {m: torch.tensor([float(r[f"score_{m}_0"]) for r in rows]) for m in names}
            scores_1 = {m: torch.tensor([float(r[f"score_{m}_1"]) for r in rows]) for m in names}
        else:
            num_rows = len(rows)
            rows, images_0, images_1, bad = _decode_pairs(rows, args, row_ids)
            skipped += len(bad)
            try:
                bad_examples.update([(row_id, reason) for row_id, reason, _ in bad], num_seen=num_rows)
            except DataError as error:
                raise SystemExit(f"error: {error}") from None
            if not rows:
                continue
            scores_0, scores_1 = scorers.score_pairs(images_0, images_1, [r[args.caption_column] for r in rows])
        for m in names:
            all_0[m].append(scores_0[m].double())
            all_1[m].append(scores_1[m].double())
        human_all.append(_human_labels(rows, args.label_0_column))
    if not human_all:
        raise SystemExit("error: no usable pairs to calibrate on.")
    scores_0 = {m: torch.cat(v) for m, v in all_0.items()}
    scores_1 = {m: torch.cat(v) for m, v in all_1.items()}
    human = torch.cat(human_all)
    human_np = human.numpy()
    known = np.isfinite(human_np)

    fitted, report = {}, []
    for m in names:
        deltas = (scores_0[m] - scores_1[m]).numpy()
        tau = fit_temperature(deltas[known], human_np[known])
        if tau is None:
            print(
                f"warning: '{m}' does not agree with the human labels better than chance; keeping tau={temperatures[m]:.4g}"
            )
            tau = temperatures[m]
        fitted[m] = tau
        report.append(
            [
                m,
                f"{temperatures[m]:.4g}",
                f"{tau:.4g}",
                f"{_accuracy(deltas, human_np):.3f}",
                f"{_expected_accuracy(deltas, human_np, temperatures[m]):.3f}",
                f"{_expected_accuracy(deltas, human_np, tau):.3f}",
                f"{_nll(deltas[known], human_np[known], temperatures[m]):.4f}",
                f"{_nll(deltas[known], human_np[known], tau):.4f}",
            ]
        )
    print(
        f"\n{int(known.sum())} pairs with a human label ({int((known & (human_np == 0.5)).sum())} ties as 0.5 targets); "
        f"{skipped} pair(s) skipped as unusable (undecodable image, empty caption or invalid label)"
    )
    print("accuracy: share of decisive human pairs where the metric prefers the same image (a temperature does not")
    print(
        "change it); expected accuracy: mean probability given to the human choice; nll: mean negative log-likelihood"
    )
    _print_table(
        [
            "metric",
            "tau before",
            "tau after",
            "accuracy",
            "exp.acc before",
            "exp.acc after",
            "nll before",
            "nll after",
        ],
        report,
    )
    before = _consensus_accuracy(args, scores_0, scores_1, human, temperatures, weights)
    after = _consensus_accuracy(args, scores_0, scores_1, human, fitted, weights)
    print(
        f"consensus ({args.consensus}) accuracy vs human labels: before {before[0]:.3f} (kept {100 * before[1]:.1f}%), "
        f"after {after[0]:.3f} (kept {100 * after[1]:.1f}%)"
    )
    for m in names:
        config.setdefault(m, {})["temperature"] = fitted[m]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    print(f"wrote {args.output}")
    return {"temperatures_before": temperatures, "temperatures": fitted, "config": config}


def main(input_args=None):
    args = parse_args(input_args)
    if args.command == "score":
        return cmd_score(args)
    if args.command == "label":
        return cmd_label(args)
    return cmd_calibrate(args)
