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
"""Unit tests of the shared training core: loss, winner/loser ordering, reference adapter, checkpoints, arguments."""

import contextlib
import math
import os

import pytest
import torch

import balanced_dpo
import run_state
import training


def hand_h(ew, el, rw, rl, beta):
    return -0.5 * beta * ((ew - el) - (rw - rl))


def test_sigmoid_loss_matches_definition_and_diffusers_scale():
    ew, el, rw, rl = (
        torch.tensor([0.30, 0.10]),
        torch.tensor([0.20, 0.40]),
        torch.tensor([0.25, 0.2]),
        torch.tensor([0.25, 0.3]),
    )
    loss, h = balanced_dpo.dpo_loss(ew, el, rw, rl, beta=10.0)
    expected_h = torch.tensor([hand_h(*v, 10.0) for v in zip(ew.tolist(), el.tolist(), rw.tolist(), rl.tolist())])
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-expected_h)))
    # diffusers' SD example computes -logsigmoid(beta' * (ref_diff - model_diff)); beta = 2 beta' here.
    diffusers_loss = -torch.nn.functional.logsigmoid(5.0 * ((rw - rl) - (ew - el)))
    torch.testing.assert_close(loss, diffusers_loss)


def test_soft_label_loss_equals_hand_computation():
    ew, el, rw, rl = torch.tensor([0.3]), torch.tensor([0.1]), torch.tensor([0.2]), torch.tensor([0.2])
    beta, q = 4.0, torch.tensor([0.8])
    loss, h = balanced_dpo.dpo_loss(ew, el, rw, rl, beta=beta, winner_prob=q)
    hv = hand_h(0.3, 0.1, 0.2, 0.2, beta)  # = -0.4
    sig = 1 / (1 + math.exp(-hv))
    expected = -(0.8 * math.log(sig) + 0.2 * math.log(1 - sig))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # q = 1 is the hard label; q = 0.5 makes the loss symmetric in the winner/loser order.
    hard, _ = balanced_dpo.dpo_loss(ew, el, rw, rl, beta=beta)
    one, _ = balanced_dpo.dpo_loss(ew, el, rw, rl, beta=beta, winner_prob=torch.ones(1))
    torch.testing.assert_close(hard, one)
    half_a, _ = balanced_dpo.dpo_loss(ew, el, rw, rl, beta=beta, winner_prob=torch.tensor([0.5]))
    half_b, _ = balanced_dpo.dpo_loss(el, ew, rl, rw, beta=beta, winner_prob=torch.tensor([0.5]))
    torch.testing.assert_close(half_a, half_b)


def test_ipo_and_hinge_losses():
    ew, el, rw, rl = torch.tensor([0.3]), torch.tensor([0.1]), torch.tensor([0.2]), torch.tensor([0.25])
    beta = 8.0
    hv = hand_h(0.3, 0.1, 0.2, 0.25, beta)
    ipo, _ = balanced_dpo.dpo_loss(ew, el, rw, rl, beta=beta, loss_type="ipo")
    assert ipo.item() == pytest.approx((hv / beta - 1 / (2 * beta)) ** 2, rel=1e-5)
    hinge, _ = balanced_dpo.dpo_loss(ew, el, rw, rl, beta=beta, loss_type="hinge")
    assert hinge.item() == pytest.approx(max(0.0, 1 - hv), rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        balanced_dpo.dpo_loss(ew, el, rw, rl, beta=beta, loss_type="nope")


def test_order_by_label_puts_winner_first():
    a = torch.arange(3).float().view(3, 1) + 10
    b = torch.arange(3).float().view(3, 1) + 20
    label = torch.tensor([1.0, 0.0, 1.0])
    ordered = balanced_dpo.order_by_label(a, b, label)
    assert ordered.squeeze(1).tolist() == [10, 21, 12, 20, 11, 22]
    # Swapping the images and the label gives the same winner/loser batch.
    torch.testing.assert_close(balanced_dpo.order_by_label(b, a, 1 - label), ordered)
    prob = torch.tensor([0.9, 0.2, 0.6])
    torch.testing.assert_close(balanced_dpo.winner_probability(label, prob), torch.tensor([0.9, 0.8, 0.6]))


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(4, 4)
        self.to_k = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.to_k(self.to_q(x))


def make_unet_like(dynamic, dtype=torch.float32):
    """A small diffusers ModelMixin with peft adapters, like the UNet."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).to(dtype)  # fmt: skip
    unet.requires_grad_(False)
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_k"])
    trainable = balanced_dpo.add_lora_adapters(unet, config, dynamic_reference=dynamic)
    return unet, trainable


def unet_inputs():
    torch.manual_seed(1)
    return torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)


@pytest.mark.parametrize("dynamic", [False, True])
def test_reference_model_context_restores_policy_and_grad_flags(dynamic):
    unet, trainable = make_unet_like(dynamic)
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert names and all(".default." in n and "lora_" in n for n in names)
    assert len(trainable) == len(names)
    # Make the policy differ from the base model and from the reference.
    with torch.no_grad():
        for p in trainable:
            p.add_(0.5)
    x, t, c = unet_inputs()
    policy_out = unet(x, t, c).sample
    with balanced_dpo.reference_model(unet, dynamic):
        ref_out = unet(x, t, c).sample
        assert not ref_out.requires_grad
    unet.disable_adapters()
    base_out = unet(x, t, c).sample
    unet.enable_adapters()
    # The reference at initialisation is the base model in both modes.
    torch.testing.assert_close(ref_out, base_out)
    assert not torch.allclose(policy_out, ref_out)
    torch.testing.assert_close(unet(x, t, c).sample, policy_out)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == names


def test_reference_context_restores_even_on_error():
    unet, _ = make_unet_like(True)
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError):
        with balanced_dpo.reference_model(unet, True):
            raise RuntimeError("boom")
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == names
    assert unet.active_adapters() == [balanced_dpo.POLICY_ADAPTER]


def randomize_lora(unet, adapter, seed):
    """Gives the adapter non-zero, seed-dependent LoRA factors (gaussian init leaves lora_B at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name and f".{adapter}." in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))


def grad_flags(unet):
    return {name: p.requires_grad for name, p in unet.named_parameters()}


def diffusers_output(unet, inputs, switch):
    """The UNet's output with adapters switched by diffusers' own API, then back to the policy."""
    switch(unet)
    with torch.no_grad():
        out = unet(*inputs).sample
    unet.enable_adapters()
    unet.set_adapter(balanced_dpo.POLICY_ADAPTER)
    balanced_dpo.freeze_all_but_policy(unet)  # diffusers' switches flip requires_grad
    return out


def assert_policy_restored(unet, inputs, policy_out, flags, whole_policy_trainable=True):
    torch.testing.assert_close(unet(*inputs).sample, policy_out, rtol=0, atol=0)
    assert grad_flags(unet) == flags
    if whole_policy_trainable:
        assert {n for n, f in flags.items() if f} == {
            n for n in flags if "lora_" in n and f".{balanced_dpo.POLICY_ADAPTER}." in n
        }
    assert unet.active_adapters() == [balanced_dpo.POLICY_ADAPTER]


def reference_case(dynamic):
    """(unet, inputs, policy output, reference output by diffusers' API, grad flags) with distinct adapters."""
    unet, _ = make_unet_like(dynamic)
    randomize_lora(unet, balanced_dpo.POLICY_ADAPTER, seed=2)
    if dynamic:
        randomize_lora(unet, balanced_dpo.REFERENCE_ADAPTER, seed=3)
        switch = lambda u: u.set_adapter(balanced_dpo.REFERENCE_ADAPTER)  # noqa: E731
    else:
        switch = lambda u: u.disable_adapters()  # noqa: E731
    inputs = unet_inputs()
    expected = diffusers_output(unet, inputs, switch)
    policy_out = unet(*inputs).sample
    return unet, inputs, policy_out, expected, grad_flags(unet)


@pytest.mark.parametrize("dynamic", [False, True])
def test_reference_model_matches_diffusers_adapter_switch(dynamic):
    unet, inputs, policy_out, expected, flags = reference_case(dynamic)
    assert not torch.allclose(policy_out, expected, atol=1e-4)
    for _ in range(2):  # the second use runs from the cached layer list
        with balanced_dpo.reference_model(unet, dynamic):
            ref_out = unet(*inputs).sample
            assert not ref_out.requires_grad
        torch.testing.assert_close(ref_out, expected, rtol=0, atol=0)
        assert_policy_restored(unet, inputs, policy_out, flags)
    if dynamic:
        base_out = diffusers_output(unet, inputs, lambda u: u.disable_adapters())
        assert not torch.allclose(ref_out, base_out, atol=1e-4), "the reference adapter must not be the base model"


@pytest.mark.parametrize("dynamic", [False, True])
def test_reference_model_restores_policy_after_an_error(dynamic):
    unet, inputs, policy_out, expected, flags = reference_case(dynamic)
    with pytest.raises(RuntimeError, match="boom"):
        with balanced_dpo.reference_model(unet, dynamic):
            torch.testing.assert_close(unet(*inputs).sample, expected, rtol=0, atol=0)
            raise RuntimeError("boom")
    assert_policy_restored(unet, inputs, policy_out, flags)


def test_reference_model_does_not_walk_the_unet_once_cached(monkeypatch):
    unet, inputs, policy_out, expected, flags = reference_case(True)
    with balanced_dpo.reference_model(unet, True):
        pass

    def forbidden(*args, **kwargs):
        raise AssertionError("walked the whole UNet on a cached switch")

    for walk in ("modules", "named_modules", "parameters", "named_parameters"):
        monkeypatch.setattr(unet, walk, forbidden)
    with balanced_dpo.reference_model(unet, True):
        ref_out = unet(*inputs).sample
    monkeypatch.undo()
    torch.testing.assert_close(ref_out, expected, rtol=0, atol=0)
    assert_policy_restored(unet, inputs, policy_out, flags)


def test_reference_model_sees_an_adapter_added_after_first_use():
    import copy

    from peft import LoraConfig

    unet, _ = make_unet_like(False)
    randomize_lora(unet, balanced_dpo.POLICY_ADAPTER, seed=2)
    with balanced_dpo.reference_model(unet, False):
        pass
    # The new adapter also covers to_v, so it brings LoRA layers the first use never saw.
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    unet.add_adapter(copy.deepcopy(config), adapter_name=balanced_dpo.REFERENCE_ADAPTER)
    randomize_lora(unet, balanced_dpo.REFERENCE_ADAPTER, seed=3)
    unet.set_adapter(balanced_dpo.POLICY_ADAPTER)
    balanced_dpo.freeze_all_but_policy(unet)
    inputs = unet_inputs()
    policy_out = unet(*inputs).sample
    flags = grad_flags(unet)
    for dynamic, switch in ((True, lambda u: u.set_adapter(balanced_dpo.REFERENCE_ADAPTER)), (False, None)):
        expected = diffusers_output(unet, inputs, switch or (lambda u: u.disable_adapters()))
        with balanced_dpo.reference_model(unet, dynamic):
            ref_out = unet(*inputs).sample
        torch.testing.assert_close(ref_out, expected, rtol=0, atol=0)
        assert_policy_restored(unet, inputs, policy_out, flags)


@pytest.mark.parametrize("dynamic", [False, True])
def test_reference_model_through_peft_methods_restores_grad_flags(monkeypatch, dynamic):
    """Layer types that override peft's switches go through them; their requires_grad flips are undone."""
    monkeypatch.setattr(balanced_dpo, "_switches_directly", lambda layer: False)
    unet, inputs, policy_out, expected, flags = reference_case(dynamic)
    # A frozen policy weight, which peft's set_adapter / enable_adapters would make trainable again.
    frozen = next(n for n in flags if "lora_A" in n and f".{balanced_dpo.POLICY_ADAPTER}." in n)
    unet.get_parameter(frozen).requires_grad_(False)
    flags[frozen] = False
    for fail in (False, True):
        with contextlib.suppress(RuntimeError):
            with balanced_dpo.reference_model(unet, dynamic):
                ref_out = unet(*inputs).sample
                if fail:
                    raise RuntimeError("boom")
        torch.testing.assert_close(ref_out, expected, rtol=0, atol=0)
        assert_policy_restored(unet, inputs, policy_out, flags, whole_policy_trainable=False)


def test_reference_model_requires_the_adapters():
    unet, _ = make_unet_like(False)
    with pytest.raises(ValueError, match="reference"):
        with balanced_dpo.reference_model(unet, True):
            pass
    assert unet.active_adapters() == [balanced_dpo.POLICY_ADAPTER]


def test_reference_update_copy_and_ema():
    unet, trainable = make_unet_like(True)
    with torch.no_grad():
        for p in trainable:
            p.add_(1.0)
    policy = balanced_dpo.adapter_state_dict(unet, balanced_dpo.POLICY_ADAPTER)
    before = balanced_dpo.adapter_state_dict(unet, balanced_dpo.REFERENCE_ADAPTER)
    balanced_dpo.update_reference_adapter(unet, "ema", decay=0.75)
    after = balanced_dpo.adapter_state_dict(unet, balanced_dpo.REFERENCE_ADAPTER)
    for k in policy:
        torch.testing.assert_close(after[k], 0.75 * before[k] + 0.25 * policy[k])
    balanced_dpo.update_reference_adapter(unet, "copy")
    copied = balanced_dpo.adapter_state_dict(unet, balanced_dpo.REFERENCE_ADAPTER)
    for k in policy:
        torch.testing.assert_close(copied[k], policy[k])
    # Updating the reference never makes it trainable.
    assert all(".default." in n for n, p in unet.named_parameters() if p.requires_grad)


def test_reference_adapter_stays_float32_on_a_bfloat16_model_and_follows_small_ema_steps(tmp_path):
    """In bfloat16, EMA updates of the reference round away: it lags the policy, then jumps."""
    unet, trainable = make_unet_like(True, dtype=torch.bfloat16)
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values()), "every LoRA weight must be float32"
    assert any(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if "lora_" not in n)

    # A policy that drifts by 1e-3 per step: the EMA reference must track it as float32 arithmetic does.
    expected = {
        k: v.detach().clone() for k, v in balanced_dpo.adapter_state_dict(unet, balanced_dpo.REFERENCE_ADAPTER).items()
    }
    for _ in range(20):
        with torch.no_grad():
            for p in trainable:
                p.add_(1e-3)
        policy = balanced_dpo.adapter_state_dict(unet, balanced_dpo.POLICY_ADAPTER)
        balanced_dpo.update_reference_adapter(unet, "ema", decay=0.99)
        expected = {k: 0.99 * expected[k] + 0.01 * policy[k] for k in expected}
    reference = balanced_dpo.adapter_state_dict(unet, balanced_dpo.REFERENCE_ADAPTER)
    for k in expected:
        torch.testing.assert_close(reference[k], expected[k], rtol=0, atol=1e-6)

    # Loading a saved reference keeps it float32.
    balanced_dpo.save_reference_adapter(unet, str(tmp_path))
    balanced_dpo.load_reference_adapter(unet, str(tmp_path))
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if "lora_" in n)


def test_adapter_state_round_trip_into_existing_adapter():
    unet, trainable = make_unet_like(True)
    with torch.no_grad():
        for p in trainable:
            p.normal_()
    saved = balanced_dpo.adapter_state_dict(unet, balanced_dpo.POLICY_ADAPTER)
    other, _ = make_unet_like(True)
    balanced_dpo.load_adapter_state_dict(other, saved, balanced_dpo.POLICY_ADAPTER)
    assert sorted(other.peft_config) == sorted(unet.peft_config), "loading must not add an adapter"
    loaded = balanced_dpo.adapter_state_dict(other, balanced_dpo.POLICY_ADAPTER)
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k])


def test_checkpoint_listing_ignores_partial_folders(tmp_path):
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False), (".checkpoint-14.tmp", True)):  # fmt: skip
        os.makedirs(tmp_path / name)
        if complete:
            (tmp_path / name / run_state.COMPLETE_MARKER).write_text("x")
    assert run_state.list_checkpoints(str(tmp_path)) == ["checkpoint-2", "checkpoint-10"]
    assert run_state.resolve_resume_checkpoint(str(tmp_path), "latest").endswith("checkpoint-10")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        run_state.resolve_resume_checkpoint(str(tmp_path), "checkpoint-12")
    with pytest.raises(ValueError, match="does not exist"):
        run_state.resolve_resume_checkpoint(str(tmp_path), "checkpoint-99")
    assert run_state.resolve_resume_checkpoint(str(tmp_path / "empty"), "latest") is None


def test_training_state_round_trip(tmp_path):
    state = {
        "progress": {"global_step": 3, "epoch": 1},
        "consensus": {"generator": torch.arange(5, dtype=torch.uint8), "n": 2.5, "counts": {}},
    }
    run_state.save_training_state(str(tmp_path), state)
    loaded = run_state.load_training_state(str(tmp_path))
    assert loaded["progress"] == {"global_step": 3, "epoch": 1}
    assert torch.equal(loaded["consensus"]["generator"], state["consensus"]["generator"])
    assert loaded["consensus"]["n"] == 2.5
    assert loaded["consensus"]["counts"] == {}


# ----------------------------------------------------------------------------------------------------------------
# Latent cache
# ----------------------------------------------------------------------------------------------------------------


def _tiny_vae_and_images(n=6, seed=0):
    import tiny_assets

    torch.manual_seed(seed)
    vae = tiny_assets._tiny_vae().eval()
    images = torch.rand(n, 3, 32, 32) * 2 - 1
    return vae, images


def test_latent_cache_samples_like_encode_latents_and_encodes_each_key_once():
    vae, images = _tiny_vae_and_images()
    keys = [(row, 0, False, (0, 0)) for row in range(len(images))]
    calls = []
    hook = vae.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    cache = training.LatentCache()
    try:
        for _ in range(2):  # the second pass encodes nothing and draws the same latents from the same generator
            expected = training.encode_latents(vae, images, 4, torch.Generator().manual_seed(1))
            got = cache.encode(vae, images, keys, 4, torch.Generator().manual_seed(1))
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    finally:
        hook.remove()
    assert calls == [4, 2, 4, 2, 4, 2] and len(cache) == 6  # encode_latents twice, the cache once
    assert (cache.hits, cache.misses) == (
        6,
        6,
    ) and cache.nbytes == 6 * 8 * 16 * 16 * 4  # mean + log-variance of 4 x 16 x 16, fp32

    # Fresh samples each time, not a frozen latent.
    again = cache.encode(vae, images, keys, 4, torch.Generator().manual_seed(2))
    assert not torch.equal(again, got)
    # A new flip (or crop, or side) of a row is a new image: only those are encoded.
    mixed = keys[:3] + [(row, 0, True, (0, 0)) for row in range(3)]
    flipped = torch.cat([images[:3], images[:3].flip(-1)])
    cached = cache.encode(vae, flipped, mixed, 4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(cached, training.encode_latents(vae, flipped, 4, torch.Generator().manual_seed(3)))
    assert len(cache) == 9 and cache.misses == 9
    with pytest.raises(ValueError, match="cache keys"):
        cache.encode(vae, images, keys[:2], 4)


def test_latent_cache_keys_follow_the_winner_first_order():
    batch = {
        "indices": torch.tensor([10, 11, 12]),
        "flips": torch.tensor([True, False, True]),
        "crop_top_lefts": torch.tensor([[[1, 2], [3, 4]], [[0, 0], [0, 0]], [[5, 6], [7, 8]]]),
    }
    index = torch.tensor([0, 2])  # the middle pair was dropped
    label = torch.tensor([1.0, 0.0])  # image 0 wins the first kept pair, image 1 the second
    keys = training.latent_cache_keys(batch, index, label)
    assert keys == [(10, 0, True, (1, 2)), (12, 1, True, (7, 8)), (10, 1, True, (3, 4)), (12, 0, True, (5, 6))]


def test_latent_cache_memory_check_fails_before_training_with_the_fix():
    import types

    vae, _ = _tiny_vae_and_images()  # 2 down blocks: latents are 4 x 16 x 16 at 32 px, fp32 -> 8 KiB per image
    args = types.SimpleNamespace(resolution=32, num_train_epochs=3, random_crop=False, no_hflip=False)
    # 100 pairs over 2 processes, 2 images, 2 flips, 2 processes on this machine.
    needed = training.check_latent_cache_fits(args, vae, 100, 2, 2, available_bytes=10 * 2**30)
    assert needed == 50 * 2 * 2 * 8192 * 2
    args.no_hflip = True
    assert training.check_latent_cache_fits(args, vae, 100, 2, 2, available_bytes=10 * 2**30) == needed // 2
    args.random_crop = True  # a new crop every epoch, in the worst case
    assert training.check_latent_cache_fits(args, vae, 100, 2, 2, available_bytes=10 * 2**30) == needed // 2 * 3
    with pytest.raises(ValueError, match=r"--cache_latents could need .* Drop --cache_latents.*--max_train_samples"):
        training.check_latent_cache_fits(args, vae, 100, 2, 2, available_bytes=1_000_000)
