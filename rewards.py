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
"""Multi-metric reward scorers, pairwise preference probabilities and consensus labels for BalancedDPO.

This module is what users import and run; the code lives in the `multi_metric` package beside it:

- `multi_metric/consensus.py`: per-metric pairwise probabilities `p_m = sigmoid(delta_m / tau_m)`, the consensus
  label (`consensus`, `ConsensusLabeler`, the modes and tie policies) and temperature fitting. Torch and numpy only.
- `multi_metric/scoring.py`: the `Scorer` base class and its registry (`register_scorer`, `build_scorer`), the score
  cache, and `ScorerSet` / `build_scorers`, which run several scorers on shared models and preprocessing.
- `multi_metric/builtin_scorers.py`: PickScore, CLIP score, LAION aesthetics, HPSv2 and ImageReward, and where their
  weights come from (local paths, Hub ids, URLs).
- `multi_metric/images.py`: image decoding and the picklable preprocessors that DataLoader workers run.
- `multi_metric/cuda_graphs.py`: CUDA-graph replay of the frozen scorer forwards.
- `multi_metric/cli.py`: the `score`, `label` and `calibrate` commands.

Library:

    scorers = build_scorers("pickscore,hpsv2,clip,aesthetic", config="reward_config.json", device="cuda")
    scores_0, scores_1 = scorers.score_pairs(images_0, images_1, prompts)
    labeler = ConsensusLabeler(mode="majority", temperatures=scorers.temperatures, weights=scorers.weights)
    result = labeler(scores_0, scores_1, human_label)  # result.label, result.prob, result.keep, result.agreement

A training script builds its labeler from its `--consensus` arguments with
`ConsensusLabeler.from_args(args, scorers.temperatures, scorers.weights)`.

Command line:

    python rewards.py score --images a.png b.png --prompt "a red circle"
    python rewards.py label --dataset_name yuvalkirstain/pickapic_v2 --streaming --output_dir labeled
    python rewards.py calibrate --dataset_name labeled --output reward_config.json
"""

from multi_metric.builtin_scorers import (
    AestheticScorer,
    CLIPScorer,
    HPSv2Scorer,
    ImageRewardScorer,
    LinearStack,
    PickScoreScorer,
    PooledModel,
)
from multi_metric.cli import cmd_calibrate, cmd_label, cmd_score, main, parse_args
from multi_metric.consensus import (
    CONSENSUS_MODES,
    DEFAULT_TEMPERATURES,
    DROP_REASONS,
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    TIE_POLICIES,
    ConsensusLabeler,
    ConsensusResult,
    NormalizedSumState,
    consensus,
    fit_temperature,
    pairwise_probabilities,
)
from multi_metric.cuda_graphs import CUDAGraphRunner
from multi_metric.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPImagePreprocessor,
    MultiPreprocessor,
    PadToSquarePreprocessor,
    hash_image,
    load_image,
    to_rgb,
)
from multi_metric.scoring import (
    DEFAULT_REWARD_MODELS,
    PendingScores,
    ScoreCache,
    ScoreContext,
    Scorer,
    ScorerSet,
    available_scorers,
    build_scorer,
    build_scorers,
    default_scorer_dtype,
    load_reward_config,
    register_scorer,
)


__all__ = [
    # Constants
    "DEFAULT_REWARD_MODELS",
    "DEFAULT_TEMPERATURES",
    "CONSENSUS_MODES",
    "TIE_POLICIES",
    "DROP_REASONS",
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    # Images and preprocessing
    "to_rgb",
    "load_image",
    "hash_image",
    "CLIPImagePreprocessor",
    "PadToSquarePreprocessor",
    "MultiPreprocessor",
    # Scorers
    "Scorer",
    "register_scorer",
    "available_scorers",
    "build_scorer",
    "build_scorers",
    "default_scorer_dtype",
    "load_reward_config",
    "ScoreCache",
    "ScoreContext",
    "ScorerSet",
    "PendingScores",
    "CUDAGraphRunner",
    "PooledModel",
    "LinearStack",
    "PickScoreScorer",
    "CLIPScorer",
    "AestheticScorer",
    "HPSv2Scorer",
    "ImageRewardScorer",
    # Probabilities and consensus
    "pairwise_probabilities",
    "consensus",
    "ConsensusResult",
    "NormalizedSumState",
    "ConsensusLabeler",
    "fit_temperature",
    # Command line
    "parse_args",
    "cmd_score",
    "cmd_label",
    "cmd_calibrate",
    "main",
]


if __name__ == "__main__":
    main()
