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
"""The arguments every model family shares, and the checks that run in seconds, before anything is loaded.

`parse_args(Family)` builds the parser from these and the family's own arguments (`Family.add_arguments`), with the
family's defaults; `validate_args(args, Family)` checks them all and returns the `RunPlan` it decides (what is
scored, whether the reference is dynamic, whether pairs are generated online). Credentials never reach a tracker or
an upload (`tracker_config`, `upload_ignore_patterns`).
"""

import argparse
import dataclasses
import os
import re
from pathlib import Path
from typing import List

import balanced_dpo
import preference_data
import rewards
from run_state import resolve_resume_checkpoint


PRECOMPUTED_COLUMNS = ("consensus_label", "consensus_prob")
# Defaults of the shared arguments that differ between families (a family's `defaults` overrides them).
FAMILY_DEFAULTS = {
    "resolution": 512,
    "train_batch_size": 16,
    "output_dir": "balanced-dpo-lora",
    "lora_target_modules": "to_k,to_q,to_v,to_out.0",
    "validation_inference_steps": 25,
}


def parse_args(family, input_args=None):
    """Every argument: the shared ones (with `family.defaults`) and the family's own (`family.add_arguments`)."""
    defaults = {**FAMILY_DEFAULTS, **family.defaults}
    parser = argparse.ArgumentParser(description=f"BalancedDPO LoRA training for {family.description}.")
    # Model
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Path to a pretrained pipeline folder or a model identifier from huggingface.co/models.",
    )
    group.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    group.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    # Data
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A local path `datasets` can load, or a Hub dataset id, in the Pick-a-Pic format (see README).",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset config name.")
    group.add_argument("--train_data_dir", type=str, default=None, help="A local folder of data files instead.")
    group.add_argument("--dataset_split_name", type=str, default="train", help="The split to train on.")
    group.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    group.add_argument(
        "--streaming_split",
        type=str,
        default="rows",
        choices=["rows", "shards"],
        help="How a stream is shared by processes x DataLoader workers: each reads the whole stream and keeps every"
        " N-th row ('rows': equal shares, fine for local data), or reads whole data files of its own ('shards': each"
        " file is downloaded once; needs at least as many files as readers).",
    )
    group.add_argument("--caption_column", type=str, default="caption")
    group.add_argument("--image_0_column", type=str, default="jpg_0")
    group.add_argument("--image_1_column", type=str, default="jpg_1")
    group.add_argument(
        "--label_0_column",
        type=str,
        default="label_0",
        help="Human label column (1 = image 0 preferred, 0 = image 1, 0.5 = tie). Pass '' if the data has none.",
    )
    group.add_argument("--drop_human_ties", action="store_true", help="Drop pairs the human label calls a tie.")
    group.add_argument("--proportion_empty_prompts", type=float, default=0.0, help="Share of captions replaced by ''.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Truncate the dataset (works streaming).")
    group.add_argument(
        "--max_bad_examples",
        type=str,
        default=None,
        help="Stop when more rows than this (count, or a fraction < 1) are unusable.",
    )
    group.add_argument("--resolution", type=int, default=defaults["resolution"], help="Training resolution.")
    group.add_argument(
        "--random_crop", action="store_true", help="Random instead of center crops (same crop for both images)."
    )
    group.add_argument(
        "--no_hflip", action="store_true", help="Disable random horizontal flips (same flip for both images)."
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Data loading processes (0 = main process). Resume a streaming run with the same number.",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    # LoRA
    group = parser.add_argument_group("LoRA")
    group.add_argument("--rank", type=int, default=8, help="The dimension of the LoRA update matrices.")
    group.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: equal to --rank).")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout.")
    group.add_argument(
        "--lora_target_modules",
        type=str,
        default=defaults["lora_target_modules"],
        help="Comma-separated module names of the denoiser that get LoRA layers.",
    )
    # Online pairs
    group = parser.add_argument_group("online pairs (generated by the policy; replaces --dataset_name)")
    group.add_argument(
        "--online_prompts",
        type=str,
        default=None,
        help="Train online on prompts: partiprompts, hpdv2, pickapic, a .txt/.json file, or a dataset (a local path"
        " or Hub id, with --online_prompt_column). Each round the policy generates the pairs it trains on.",
    )
    group.add_argument("--online_prompt_column", type=str, default=None, help="Prompt column of a prompt dataset.")
    group.add_argument("--online_prompt_split", type=str, default=None, help="Split of a prompt dataset.")
    group.add_argument("--online_max_prompts", type=int, default=None, help="Use the first N prompts only.")
    group.add_argument(
        "--online_round_prompts",
        type=int,
        default=64,
        help="Prompts per round, over all processes (each generates its share).",
    )
    group.add_argument("--online_images_per_prompt", type=int, default=4, help="Images generated per prompt (K >= 2).")
    group.add_argument(
        "--online_pair_selection",
        type=str,
        default="extremes",
        choices=["extremes", "all", "random"],
        help="Pairs kept among a prompt's K images: the consensus winner against the consensus loser (extremes), every"
        " pair (all), or one random pair.",
    )
    group.add_argument(
        "--online_num_inference_steps", type=int, default=20, help="Sampling steps of the round's images."
    )
    group.add_argument(
        "--online_guidance_scale",
        type=float,
        default=defaults.get("online_guidance_scale", 5.0),
        help="Classifier-free guidance of the round's images.",
    )
    group.add_argument(
        "--online_scheduler",
        type=str,
        default=defaults.get("online_scheduler", "DPMSolverMultistepScheduler"),
        help="diffusers scheduler class that samples the round's images ('' keeps the pipeline's).",
    )
    group.add_argument("--online_generation_batch_size", type=int, default=8, help="Images per sampling call.")
    group.add_argument(
        "--online_ref_update",
        type=str,
        default="none",
        choices=["none", "round"],
        help="none: the reference stays the base model (or moves every --ref_update_steps); round: at the end of"
        " every round it follows the policy that generated the round (iterative DPO; --ref_update_mode copy or"
        " ema). none is the default: in the synthetic experiment, following the policy every round removed the"
        " anchor and lost the metrics the base model was good at (docs/synthetic_experiment.md).",
    )
    # Consensus
    group = parser.add_argument_group("consensus")
    group.add_argument(
        "--reward_models",
        type=str,
        default=",".join(rewards.DEFAULT_REWARD_MODELS),
        help="Comma-separated metrics scored on the fly.",
    )
    group.add_argument(
        "--reward_config",
        type=str,
        default=None,
        help="JSON mapping metric -> build_scorer options (see `rewards.py calibrate`).",
    )
    group.add_argument(
        "--consensus",
        type=str,
        default="majority",
        help="majority, mean_prob, human, single:<metric>, reward_sum, normalized_sum or random_metric.",
    )
    group.add_argument("--tie_policy", type=str, default="mean_prob", choices=list(rewards.TIE_POLICIES))
    group.add_argument("--abstain_margin", type=float, default=0.0, help="A metric abstains when |p - 0.5| <= this.")
    group.add_argument(
        "--min_agreement", type=float, default=0.0, help="Drop pairs whose voter agreement is below this."
    )
    group.add_argument("--human_vote", action="store_true", help="The human label votes too.")
    group.add_argument(
        "--label_mode",
        type=str,
        default="hard",
        choices=["hard", "soft"],
        help="Hard labels or the consensus probability as a soft target.",
    )
    group.add_argument(
        "--precomputed_consensus",
        action="store_true",
        help="Read consensus_label/consensus_prob columns written by `rewards.py label`; load no scorer.",
    )
    group.add_argument(
        "--max_consecutive_dropped_pairs",
        type=int,
        default=10000,
        help="Stop with an error saying why when this many pairs in a row (or a whole epoch) were dropped.",
    )
    group.add_argument(
        "--scorer_dtype",
        type=str,
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="Scorer weights dtype (default: float16 on CUDA, float32 elsewhere: bfloat16 rounding flips close votes;"
        " see README).",
    )
    group.add_argument(
        "--offload_scorers",
        action="store_true",
        help="Keep scorers on the CPU and move each to the GPU only while it scores (for 24 GB cards).",
    )
    group.add_argument(
        "--no_scorer_cuda_graphs",
        action="store_true",
        help="Run scorer forwards eagerly instead of replaying CUDA graphs (graphs are used on CUDA without offload).",
    )
    group.add_argument(
        "--no_score_ahead",
        action="store_true",
        help="Score each batch when it is trained on instead of one batch ahead on a side CUDA stream.",
    )
    group.add_argument(
        "--normalize_warmup_pairs", type=int, default=2048, help="Pairs used to estimate the scales of normalized_sum."
    )
    # Loss and reference
    group = parser.add_argument_group("loss and reference model")
    group.add_argument("--loss_type", type=str, default="sigmoid", choices=list(balanced_dpo.LOSS_TYPES))
    group.add_argument(
        "--beta_dpo", type=float, default=defaults.get("beta_dpo", 5000.0), help="DPO beta (the same in every script)."
    )
    group.add_argument(
        "--ref_update_steps",
        type=int,
        default=0,
        help="Make the reference the current policy every N optimizer steps (0 = frozen base model).",
    )
    group.add_argument("--ref_update_mode", type=str, default="copy", choices=["copy", "ema"])
    group.add_argument(
        "--ref_ema_decay", type=float, default=0.9, help="EMA decay of the reference for --ref_update_mode ema."
    )
    # Optimization
    group = parser.add_argument_group("optimization")
    group.add_argument(
        "--train_batch_size",
        type=int,
        default=defaults["train_batch_size"],
        help="Pairs per device per micro-step.",
    )
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps (overrides epochs).")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    group.add_argument("--learning_rate", type=float, default=1e-5)
    group.add_argument("--scale_lr", action="store_true", help="Scale the lr by GPUs x accumulation x batch size.")
    group.add_argument("--lr_scheduler", type=str, default="constant", help="Any diffusers scheduler name.")
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--lr_num_cycles", type=int, default=1)
    group.add_argument("--lr_power", type=float, default=1.0)
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-08)
    group.add_argument("--max_grad_norm", default=1.0, type=float)
    group.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=5,
        help="Stop after this many optimizer steps in a row with a non-finite loss or gradient (fp16 overflows that"
        " the gradient scaler handles do not count).",
    )
    group.add_argument("--vae_encode_batch_size", type=int, default=8)
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Keep each image's VAE encoding (per flip and crop) in host memory and reuse it in later epochs; latents "
        "are still sampled fresh every time. For multi-epoch runs on datasets that fit in RAM.",
    )
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    group.add_argument("--allow_tf32", action="store_true")
    group.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    group.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    # Checkpoints, logging, Hub
    group = parser.add_argument_group("checkpoints, logging and the Hub")
    group.add_argument("--output_dir", type=str, default=defaults["output_dir"])
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint-N folder or 'latest'.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, relative to --output_dir.")
    group.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    group.add_argument("--tracker_name", type=str, default=defaults["output_dir"])
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument(
        "--hub_token",
        type=str,
        default=None,
        help="Hub token for --push_to_hub. Prefer `hf auth login`: a token on the command line stays in your shell"
        " history. It is never written to a file or a tracker.",
    )
    group.add_argument("--hub_model_id", type=str, default=None)
    group.add_argument("--local_rank", type=int, default=-1)
    # Validation
    group = parser.add_argument_group("validation")
    group.add_argument(
        "--validation_prompts",
        type=str,
        nargs="+",
        default=None,
        help="Prompts, or one text file with a prompt per line.",
    )
    group.add_argument("--num_validation_images", type=int, default=1)
    group.add_argument("--validation_steps", type=int, default=200)
    group.add_argument(
        "--validation_inference_steps",
        type=int,
        default=None,
        help=f"Sampling steps of validation images (default {defaults['validation_inference_steps']}).",
    )
    group.add_argument(
        "--score_validation", action="store_true", help="Score LoRA and base validation images with the reward models."
    )
    family.add_arguments(parser)

    args = parser.parse_args(input_args) if input_args is not None else parser.parse_args()
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    if args.label_0_column == "":
        args.label_0_column = None
    return args


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What `validate_args` decides from the arguments."""

    reward_models: List[str]  # --reward_models, parsed
    scored_metrics: List[str]  # the metrics scored live for the consensus (none when precomputed or human)
    dynamic_reference: bool  # the reference is a second adapter that follows the policy
    max_bad_examples: object  # --max_bad_examples, parsed (int, fraction or None)
    online: bool = False  # --online_prompts: pairs generated by the policy, round after round


def parse_consensus_mode(mode, reward_models):
    """Validates `--consensus` against the loaded metrics; returns the metric names the mode needs scored."""
    if mode.startswith("single:"):
        metric = mode.split(":", 1)[1]
        if metric not in reward_models:
            raise ValueError(
                f"--consensus {mode} names metric {metric!r}, which is not in --reward_models"
                f" ({','.join(reward_models) or 'empty'}). Add it to --reward_models or pick one of those."
            )
        return [metric]
    if mode not in rewards.CONSENSUS_MODES:
        raise ValueError(f"Unknown --consensus {mode!r}; choose one of {', '.join(rewards.CONSENSUS_MODES)}.")
    if mode == "human":
        return []
    if not reward_models:
        raise ValueError(f"--consensus {mode} needs at least one metric in --reward_models.")
    return list(reward_models)


def _check_positive(args, *names):
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1 (got {getattr(args, name)}).")


def validate_args(args, family=None):
    """Checks every argument that can be checked without loading a model or a dataset (raises ValueError) and returns
    the RunPlan decided from them. Runs the family's own checks too."""
    if args.beta_dpo <= 0:
        raise ValueError(f"--beta_dpo must be positive (got {args.beta_dpo}); the default is 5000.")
    if args.loss_type not in balanced_dpo.LOSS_TYPES:
        raise ValueError(
            f"Unknown --loss_type {args.loss_type!r}; choose one of {', '.join(balanced_dpo.LOSS_TYPES)}."
        )
    online = args.online_prompts is not None
    sources = [
        name for name in ("dataset_name", "train_data_dir", "online_prompts") if getattr(args, name) is not None
    ]
    if not sources:
        raise ValueError(
            "Specify --dataset_name (a local path or a Hub id), --train_data_dir, or --online_prompts (pairs generated"
            " from prompts)."
        )
    if len(sources) > 1:
        raise ValueError(f"Specify only one of --dataset_name, --train_data_dir and --online_prompts (got {sources}).")
    if online:
        _check_online_args(args)
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError("--proportion_empty_prompts must be in [0, 1].")
    if not 0.0 <= args.min_agreement <= 1.0:
        raise ValueError("--min_agreement must be in [0, 1].")
    if not 0.0 <= args.abstain_margin < 0.5:
        raise ValueError("--abstain_margin must be in [0, 0.5).")
    if args.ref_update_steps < 0:
        raise ValueError("--ref_update_steps must be >= 0 (0 keeps the base model as the reference).")
    if args.ref_update_mode not in ("copy", "ema"):
        raise ValueError("--ref_update_mode must be 'copy' or 'ema'.")
    if not 0.0 <= args.ref_ema_decay < 1.0:
        raise ValueError("--ref_ema_decay must be in [0, 1).")
    if args.label_mode not in ("hard", "soft"):
        raise ValueError("--label_mode must be 'hard' or 'soft'.")
    if args.rank <= 0:
        raise ValueError("--rank must be positive.")
    # Used as `step % N` or as counts: 0 would crash or hang hours into a run.
    _check_positive(
        args,
        "gradient_accumulation_steps",
        "train_batch_size",
        "checkpointing_steps",
        "validation_steps",
        "max_nonfinite_steps",
        "max_consecutive_dropped_pairs",
        "num_validation_images",
        "validation_inference_steps",
        "vae_encode_batch_size",
    )
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError("--checkpoints_total_limit must be >= 1 (or left unset to keep every checkpoint).")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError("--max_train_steps must be >= 1.")
    if not args.max_grad_norm > 0:
        raise ValueError(f"--max_grad_norm must be positive (got {args.max_grad_norm}); the default is 1.0.")
    if args.resolution < 8 or args.resolution % 8 != 0:
        raise ValueError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}."
        )
    if getattr(args, "cache_latents", False) and args.streaming:
        raise ValueError(
            "--cache_latents needs a map-style dataset (rows with stable indices across epochs); drop --streaming, "
            "or drop --cache_latents."
        )
    if args.streaming and args.max_train_steps is None:
        raise ValueError("--streaming needs --max_train_steps (the length of a streamed dataset is unknown).")
    if args.ref_update_mode == "ema" and args.ref_update_steps == 0 and not online:
        raise ValueError(
            "--ref_update_mode ema has no effect with --ref_update_steps 0 (the reference stays the base model);"
            " set --ref_update_steps N to update the reference every N steps."
        )

    reward_models = [m.strip() for m in args.reward_models.split(",") if m.strip()] if args.reward_models else []
    if args.precomputed_consensus:
        # The label was decided offline by `rewards.py label`: live consensus options would be silently ignored.
        if args.consensus != "majority" or args.human_vote:
            raise ValueError(
                "--precomputed_consensus reads the labels written by `rewards.py label`, so --consensus and"
                " --human_vote have no effect: pass them to `rewards.py label` instead, or drop"
                " --precomputed_consensus to label live."
            )
        scored_metrics = []
    else:
        known = set(rewards.available_scorers())
        for metric in reward_models:
            if metric not in known and ":" not in metric:
                raise ValueError(
                    f"Unknown metric {metric!r} in --reward_models; available: {', '.join(sorted(known))}"
                    " (or a user scorer given as package.module:Class)."
                )
        scored_metrics = parse_consensus_mode(args.consensus, reward_models)
    if args.human_vote and args.label_0_column is None:
        raise ValueError("--human_vote needs the human label column (--label_0_column).")
    if (args.consensus == "human" or args.tie_policy == "human") and args.label_0_column is None:
        raise ValueError(f"--consensus {args.consensus} / --tie_policy {args.tie_policy} need --label_0_column.")
    if args.reward_config is not None and not os.path.isfile(args.reward_config):
        raise ValueError(
            f"--reward_config {args.reward_config!r} does not exist (write one with `rewards.py calibrate`)."
        )
    if args.validation_prompts is None and args.score_validation:
        raise ValueError("--score_validation needs --validation_prompts.")
    if args.resume_from_checkpoint not in (None, "latest"):
        resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        # As in diffusers' examples: a wandb run stores its command line and config.
        raise ValueError(
            "You cannot use --report_to wandb together with --hub_token: the token would be stored in the wandb run."
            " Log in with `hf auth login` (or set HF_TOKEN) and drop --hub_token."
        )
    if args.push_to_hub:
        check_hub_credentials(args.hub_token)
    if args.report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--report_to wandb needs `pip install wandb`.") from None
    if family is not None:
        family.validate_args(args)
    return RunPlan(
        reward_models=reward_models,
        scored_metrics=scored_metrics,
        dynamic_reference=args.ref_update_steps > 0 or (online and args.online_ref_update == "round"),
        max_bad_examples=preference_data.parse_max_bad_examples(args.max_bad_examples),
        online=online,
    )


def _check_online_args(args):
    """--online_prompts: generated pairs have no human label and no dataset behind them."""
    if args.max_train_steps is None:
        raise ValueError("--online_prompts needs --max_train_steps (rounds go on until then).")
    if args.online_images_per_prompt < 2:
        raise ValueError("--online_images_per_prompt must be >= 2 (a pair needs two images of a prompt).")
    _check_positive(args, "online_round_prompts", "online_num_inference_steps", "online_generation_batch_size")
    conflicts = [
        flag
        for flag, used in (
            ("--precomputed_consensus", args.precomputed_consensus),
            ("--consensus human", args.consensus == "human"),
            ("--human_vote", args.human_vote),
            ("--tie_policy human", args.tie_policy == "human"),
            ("--drop_human_ties", args.drop_human_ties),
            ("--streaming", args.streaming),
            ("--cache_latents", getattr(args, "cache_latents", False)),
        )
        if used
    ]
    if conflicts:
        raise ValueError(
            f"--online_prompts labels the pairs it generates with a metric consensus, so {', '.join(conflicts)} cannot"
            " apply: drop them (or train on a dataset with --dataset_name)."
        )
    if args.online_scheduler:
        import diffusers

        if not hasattr(diffusers, args.online_scheduler):
            raise ValueError(f"--online_scheduler {args.online_scheduler!r} is not a diffusers scheduler class.")


def check_hub_credentials(hub_token=None):
    """Fails fast when `--push_to_hub` cannot authenticate, instead of after hours of training."""
    from huggingface_hub import get_token

    if hub_token is None and get_token() is None:
        raise ValueError(
            "--push_to_hub needs Hub credentials: run `hf auth login` (or set HF_TOKEN), or pass --hub_token."
        )


# Argument names that hold credentials: never written to a tracker, a file or an upload.
_SECRET_ARGUMENT = re.compile(r"(token|secret|password|api_key)", re.IGNORECASE)


def tracker_config(args):
    """The run's arguments for the trackers (TensorBoard's hparams, a wandb config), without any credential."""
    return {
        key: value
        for key, value in vars(args).items()
        if isinstance(value, (int, float, str, bool)) and not _SECRET_ARGUMENT.search(key)
    }


def upload_ignore_patterns(args):
    """What `--push_to_hub` leaves out of the upload: checkpoints and the tracker logs (wherever --logging_dir is)."""
    patterns = ["checkpoint-*", ".checkpoint-*", "checkpoint-*/**", ".checkpoint-*/**"]
    logging_dir = os.path.normpath(os.path.join(args.output_dir, args.logging_dir))
    relative = os.path.relpath(logging_dir, os.path.normpath(args.output_dir))
    if relative != "." and not relative.startswith(".."):
        relative = Path(relative).as_posix()
        patterns += [relative, f"{relative}/*", f"{relative}/**"]
    return patterns


def read_validation_prompts(value):
    """`--validation_prompts` takes prompts or a single path to a text file with one prompt per line."""
    if not value:
        return []
    if len(value) == 1 and os.path.isfile(value[0]):
        with open(value[0], encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return list(value)
