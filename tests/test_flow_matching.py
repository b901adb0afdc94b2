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
"""The Flow-DPO noise and loss (`balanced_dpo.flow_matching_noised_pairs`, `per_example_mse`, `dpo_loss`) against
hand computations of their definitions, on fixed tensors."""

import math

import pytest
import torch

import balanced_dpo


def sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


def fixed_latents(num_pairs=3, shape=(4, 6, 6), seed=7):
    return torch.randn((2 * num_pairs, *shape), generator=torch.Generator().manual_seed(seed))


def test_noised_pairs_follow_the_rectified_flow_with_one_sigma_and_noise_per_pair():
    latents = fixed_latents()
    global_state = torch.get_rng_state()
    noised = balanced_dpo.flow_matching_noised_pairs(latents, torch.Generator().manual_seed(3), sd3_scheduler())
    assert torch.equal(torch.get_rng_state(), global_state), "the noise must come from the training generator only"

    # The same draws by hand: the noise of the 3 pairs, then u ~ logit-normal(0, 1), then SD3's shift-3 sigma of the
    # training grid: s = (1000 - floor(1000 u)) / 1000, sigma = 3 s / (1 + 2 s).
    replay = torch.Generator().manual_seed(3)
    noise = torch.randn((3, 4, 6, 6), generator=replay)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(3,), generator=replay))
    s = (1000 - torch.floor(1000 * u)) / 1000
    sigma = 3 * s / (1 + 2 * s)
    for k in range(6):
        pair, eps = k % 3, noise[k % 3]
        expected_input = (1 - sigma[pair]) * latents[k] + sigma[pair] * eps
        torch.testing.assert_close(noised.model_input[k], expected_input, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(noised.target[k], eps - latents[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(noised.timesteps, (1000 * sigma).repeat(2), rtol=1e-5, atol=1e-3)
    # Winner k and loser k of a pair: the same sigma and the same noise.
    assert torch.equal(noised.timesteps[:3], noised.timesteps[3:])
    torch.testing.assert_close(noised.target[:3] + latents[:3], noised.target[3:] + latents[3:], rtol=0, atol=1e-6)
    assert noised.weighting.shape == (6, 1, 1, 1) and torch.equal(noised.weighting, torch.ones(6, 1, 1, 1))


def test_flux_schedule_trains_on_unshifted_sigmas_and_draws_are_reproducible():
    latents = fixed_latents(num_pairs=64, shape=(2, 2, 2))
    a = balanced_dpo.flow_matching_noised_pairs(latents, torch.Generator().manual_seed(0), flux_scheduler())
    b = balanced_dpo.flow_matching_noised_pairs(latents, torch.Generator().manual_seed(0), flux_scheduler())
    assert torch.equal(a.model_input, b.model_input) and torch.equal(a.timesteps, b.timesteps)
    replay = torch.Generator().manual_seed(0)
    torch.randn((64, 2, 2, 2), generator=replay)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(64,), generator=replay))
    # FLUX shifts by resolution at inference only: training sigma is 1 - floor(1000 u) / 1000.
    torch.testing.assert_close(a.timesteps[:64] / 1000, (1000 - torch.floor(1000 * u)) / 1000, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "mode", "none"])
def test_weighting_schemes_are_diffusers_densities_and_loss_weights(scheme):
    latents = fixed_latents(num_pairs=4, shape=(1, 2, 2))
    noised = balanced_dpo.flow_matching_noised_pairs(
        latents, torch.Generator().manual_seed(1), sd3_scheduler(), weighting_scheme=scheme, mode_scale=1.29
    )
    replay = torch.Generator().manual_seed(1)
    torch.randn((4, 1, 2, 2), generator=replay)
    u = torch.rand((4,), generator=replay)
    if scheme == "mode":
        u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    s = (1000 - torch.floor(1000 * u).clamp(max=999)) / 1000
    sigma = (3 * s / (1 + 2 * s)).repeat(2)
    torch.testing.assert_close(noised.timesteps / 1000, sigma, rtol=1e-5, atol=1e-6)
    expected = {
        "sigma_sqrt": sigma**-2.0,
        "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)),
    }.get(scheme, torch.ones(8))
    torch.testing.assert_close(noised.weighting.flatten(), expected, rtol=1e-5, atol=1e-6)


def test_a_scheduler_used_for_sampling_is_refused():
    scheduler = sd3_scheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="set_timesteps"):
        balanced_dpo.flow_matching_noised_pairs(fixed_latents(), torch.Generator().manual_seed(0), scheduler)


def test_flow_dpo_loss_equals_the_formula_on_fixed_tensors():
    """e = mean over channels and pixels of w (v - v_theta)^2; h = -1/2 beta [(e_w - e_l) - (e_ref_w - e_ref_l)];
    loss = -log sigmoid(h), or the soft-label expectation."""
    generator = torch.Generator().manual_seed(11)
    latents = fixed_latents(num_pairs=2, shape=(3, 4, 4))
    noised = balanced_dpo.flow_matching_noised_pairs(latents, generator, sd3_scheduler(), weighting_scheme="cosmap")
    policy = noised.target + 0.3 * torch.randn(noised.target.shape, generator=generator)
    reference = noised.target + 0.3 * torch.randn(noised.target.shape, generator=generator)
    beta = 100.0

    errors = balanced_dpo.per_example_mse(policy, noised.target, noised.weighting)
    ref_errors = balanced_dpo.per_example_mse(reference, noised.target, noised.weighting)
    loss, h = balanced_dpo.dpo_loss(*errors.chunk(2), *ref_errors.chunk(2), beta)
    q_w = torch.tensor([0.8, 0.6])
    soft_loss, _ = balanced_dpo.dpo_loss(*errors.chunk(2), *ref_errors.chunk(2), beta, winner_prob=q_w)

    for pair in range(2):
        w, l = pair, pair + 2

        def error(prediction, k):
            total = 0.0
            for value in (noised.weighting[k] * (noised.target[k] - prediction[k]) ** 2).flatten().tolist():
                total += value
            return total / noised.target[k].numel()

        expected_h = (
            -0.5 * beta * ((error(policy, w) - error(policy, l)) - (error(reference, w) - error(reference, l)))
        )
        assert h[pair].item() == pytest.approx(expected_h, rel=1e-4, abs=1e-5)
        assert loss[pair].item() == pytest.approx(math.log1p(math.exp(-expected_h)), rel=1e-4, abs=1e-6)
        expected_soft = q_w[pair].item() * math.log1p(math.exp(-expected_h)) + (1 - q_w[pair].item()) * math.log1p(
            math.exp(expected_h)
        )
        assert soft_loss[pair].item() == pytest.approx(expected_soft, rel=1e-4, abs=1e-6)
