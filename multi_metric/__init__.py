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
"""Multi-metric scoring and the consensus label of BalancedDPO; `rewards.py` is its public face.

- `consensus`: per-metric pairwise probabilities, the consensus label and temperature fitting (torch and numpy only).
- `images`: image decoding and the picklable, weight-free preprocessing that DataLoader workers run.
- `scoring`: the `Scorer` base class and its registry, the score cache, `ScorerSet` and `build_scorers`.
- `cuda_graphs`: CUDA-graph replay of the frozen scorer forwards.
- `builtin_scorers`: PickScore, CLIP score, LAION aesthetics, HPSv2 and ImageReward, with their weight loading.
- `cli`: the `score`, `label` and `calibrate` commands of `python rewards.py`.
"""
