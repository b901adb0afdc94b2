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
"""Run by tests/test_online.py: runs a training script whose N-th sampling call of the policy sends the process a
SIGTERM, as a scheduler would, then prints how many sampling calls came after it.

    python tests/online_signal.py N path/to/train_balanced_dpo.py --online_prompts ...
"""

import os
import runpy
import signal
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import training  # noqa: E402


def main():
    signal_at, script, *args = sys.argv[1:]
    calls = []
    sample_latents = training.ModelFamily.sample_latents

    def sample_then_signal(self, *a, **k):
        calls.append(1)
        latents = sample_latents(self, *a, **k)
        if len(calls) == int(signal_at):
            os.kill(os.getpid(), signal.SIGTERM)
        return latents

    training.ModelFamily.sample_latents = sample_then_signal
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        print(f"sampling calls after the signal: {max(0, len(calls) - int(signal_at))}", flush=True)


if __name__ == "__main__":
    main()
