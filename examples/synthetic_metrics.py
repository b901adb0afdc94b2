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
"""Three cheap programmatic image metrics on deliberately different scales, written as user scorers.

They plug into `rewards.py` exactly as a user's own reward model would: subclasses of `rewards.Scorer`, given to the
training and evaluation scripts as `module:Class` names (with this folder on `PYTHONPATH`):

    --reward_models synthetic_metrics:Brightness,synthetic_metrics:Colorfulness,synthetic_metrics:Centering

| metric | score | typical range | native temperature |
|---|---|---|---|
| `Brightness` | 1000 x mean luma (ITU-R BT.601) of the image in [0, 1] | 0 .. 1000 | 50 |
| `Colorfulness` | Hasler & Suesstrunk (2003) colourfulness on 0..255 RGB | 0 .. ~150 | 5 |
| `Centering` | 0.01 x (1 - distance of the foreground centroid from the image centre / half diagonal) | 0 .. 0.01 | 0.0005 |

Summing the raw scores (`--consensus reward_sum`) is therefore decided by brightness alone, while the temperatures
put the three on one probability scale for the consensus. The scores ignore the prompt.
"""

import numpy as np
import torch
from PIL import Image

import rewards


class RGBPreprocessor:
    """PIL images -> float32 tensor [N, 3, size, size] in [0, 1] (box-filtered resize). Picklable, weight-free."""

    def __init__(self, size=32):
        self.size = int(size)

    @property
    def key(self):
        return f"synthetic-rgb-{self.size}"

    def __call__(self, images):
        arrays = []
        for image in images:
            image = rewards.to_rgb(image)
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.BOX)
            arrays.append(np.asarray(image, dtype=np.float32) / np.float32(255.0))
        if not arrays:
            return torch.zeros(0, 3, self.size, self.size)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class _SyntheticScorer(rewards.Scorer):
    """Shared set-up: a fixed-size RGB preprocessor, no weights, no prompt dependence."""

    prompt_free = True

    def __init__(self, size: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.dtype = torch.float32  # pixel statistics are cheap; half precision would only add ties
        self.preprocessor = RGBPreprocessor(size)


class Brightness(_SyntheticScorer):
    """1000 x mean luma: prefers bright images."""

    default_temperature = 50.0

    def compute_scores(self, pixel_values, prompts):
        luma = 0.299 * pixel_values[:, 0] + 0.587 * pixel_values[:, 1] + 0.114 * pixel_values[:, 2]
        return 1000.0 * luma.mean(dim=(1, 2))


class Colorfulness(_SyntheticScorer):
    """Hasler & Suesstrunk's colourfulness M = sigma_rgyb + 0.3 mu_rgyb on the 0..255 scale: prefers vivid colour."""

    default_temperature = 5.0

    def compute_scores(self, pixel_values, prompts):
        r, g, b = (255.0 * pixel_values).unbind(dim=1)
        rg, yb = r - g, 0.5 * (r + g) - b
        std = torch.sqrt(rg.var(dim=(1, 2), unbiased=False) + yb.var(dim=(1, 2), unbiased=False))
        mean = torch.sqrt(rg.mean(dim=(1, 2)) ** 2 + yb.mean(dim=(1, 2)) ** 2)
        return std + 0.3 * mean


class Centering(_SyntheticScorer):
    """0.01 x (1 - normalised distance between the image centre and the centroid of the foreground).

    The background colour is the median of the border pixels; each pixel weighs by its distance from it, so the
    centroid is that of whatever stands out from the background.
    """

    default_temperature = 5e-4

    def compute_scores(self, pixel_values, prompts):
        n, _, height, width = pixel_values.shape
        border = torch.cat(
            [
                pixel_values[:, :, 0, :],
                pixel_values[:, :, -1, :],
                pixel_values[:, :, 1:-1, 0],
                pixel_values[:, :, 1:-1, -1],
            ],
            dim=2,
        )
        background = border.median(dim=2).values[:, :, None, None]
        weight = (pixel_values - background).norm(dim=1) + 1e-6  # [N, H, W]; uniform images centre exactly
        ys = torch.arange(height, dtype=weight.dtype, device=weight.device)[None, :, None]
        xs = torch.arange(width, dtype=weight.dtype, device=weight.device)[None, None, :]
        total = weight.sum(dim=(1, 2))
        cy = (weight * ys).sum(dim=(1, 2)) / total - (height - 1) / 2
        cx = (weight * xs).sum(dim=(1, 2)) / total - (width - 1) / 2
        distance = torch.sqrt(cx**2 + cy**2) / (0.5 * float(np.hypot(height - 1, width - 1)))
        return 0.01 * (1.0 - distance)


METRICS = {
    "brightness": "synthetic_metrics:Brightness",
    "colorfulness": "synthetic_metrics:Colorfulness",
    "centering": "synthetic_metrics:Centering",
}
