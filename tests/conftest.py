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
"""Shared fixtures: tiny offline assets built once per test session, and clean state for in-process runs."""

import os
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests never touch the network: every model and dataset is a tiny local one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import tiny_assets  # noqa: E402


@pytest.fixture(scope="session")
def tiny_scorers_dir(tmp_path_factory):
    """(folder, reward config dict) of the tiny pickscore, hpsv2, clip and aesthetic scorers."""
    output_dir = str(tmp_path_factory.mktemp("tiny_scorers"))
    config = tiny_assets.build_tiny_scorers(output_dir)
    return output_dir, config


@pytest.fixture(scope="session")
def tiny_assets_dir(tmp_path_factory):
    """Dict of paths of every tiny asset (`sd`, `sdxl`, `pickapic`, `reward_config`)."""
    return tiny_assets.build_all(str(tmp_path_factory.mktemp("tiny_assets")))


@pytest.fixture(scope="session")
def tiny_flow_assets(tiny_assets_dir, tmp_path_factory):
    """`tiny_assets_dir` (the tiny data, scorers and SD pipelines) plus the tiny flow-matching pipelines `sd3` and
    `flux` (FLUX.1-dev's layout)."""
    output_dir = str(tmp_path_factory.mktemp("tiny_flow_assets"))
    return {
        **tiny_assets_dir,
        "sd3": tiny_assets.build_tiny_sd3_pipeline(os.path.join(output_dir, "sd3")),
        "flux": tiny_assets.build_tiny_flux_pipeline(os.path.join(output_dir, "flux")),
    }


@pytest.fixture
def fresh_accelerate_state():
    """In-process runs create an Accelerator; accelerate's singletons are reset so every test starts clean."""
    from trainer_utils import reset_accelerate_state

    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture
def one_thread():
    """One torch thread: for tiny models, a second thread on a busy 2-core machine (or beside a second test worker)
    only adds contention, up to 50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
