"""The digits half of the zoo: data, prompts, classifier, DDIM sampler, Fréchet distance, and the quality of
the committed digits-ddpm / digits-t2i weights (small sample counts, so this file stays fast)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.metrics import EvalContext, get_metric
from modelpress.metrics.diffusion import fd_between, feature_stats, frechet_distance
from modelpress.model import ModelHandle, describe_architecture
from modelpress.sampling import ddim_sample, ddim_timesteps
from modelpress.zoo import digits, load

SCHED = digits.SCHEDULER_CONFIG


# ---------------------------------------------------------------------------------------------------
# data and prompts

def test_digits_data_split_is_fixed_disjoint_and_scaled():
    xt, yt = digits.digits_data("train")
    xh, yh = digits.digits_data("heldout")
    assert xt.shape == (1497, 1, 16, 16) and xh.shape == (300, 1, 16, 16)
    assert xt.dtype == torch.float32 and xt.min() >= -1 and xt.max() <= 1
    assert set(yt.tolist()) == set(range(10)) and set(yh.tolist()) == set(range(10))
    # no held-out image appears in the train split
    flat_t = {tuple(r) for r in xt.flatten(1).numpy().round(4).tolist()}
    assert not any(tuple(r) in flat_t for r in xh.flatten(1).numpy().round(4).tolist())
    assert torch.equal(digits.digits_data("heldout")[0], xh)


def test_digit_prompts_name_their_digit_and_splits_use_disjoint_templates():
    for split in ("train", "eval"):
        prompts, labels = digits.digit_prompts(200, seed=3, split=split)
        assert len(prompts) == 200 and torch.bincount(labels, minlength=10).tolist() == [20] * 10
        for p, d in zip(prompts, labels.tolist()):
            words = p.replace(",", " ").split()
            assert digits.NUMBER_WORDS[d] in words or str(d) in words, p
        assert digits.digit_prompts(200, seed=3, split=split)[0] == prompts
    assert not set(digits._NOUNS_TRAIN) & set(digits._NOUNS_EVAL)


# ---------------------------------------------------------------------------------------------------
# Fréchet distance against closed forms

def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_and_shifted_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 6))
    cov = np.cov(a, rowvar=False)
    assert abs(frechet_distance(a.mean(0), cov, a.mean(0), cov)) < 1e-8
    mu, sigma = feature_stats(torch.from_numpy(a))
    shift = np.full(6, 0.5)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(6 * 0.25, rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# DDIM sampler

def _tiny_unet():
    import diffusers
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def test_ddim_timesteps_are_the_documented_leading_spacing():
    assert ddim_timesteps(SCHED, 50)[:3] == [980, 960, 940] and ddim_timesteps(SCHED, 50)[-1] == 0
    assert ddim_timesteps(SCHED, 25) == list(range(960, -1, -40))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_matches_diffusers_ddim_scheduler(eta):
    import diffusers
    unet = _tiny_unet()
    model = ModelHandle(unet, "unet", "t", describe_architecture(unet)).canonical()
    ours, traj = ddim_sample(model, SCHED, 3, steps=10, seed=5, eta=eta, return_trajectory=True)
    sched = diffusers.DDIMScheduler.from_config({k: v for k, v in SCHED.items() if k != "variance_type"})
    sched.set_timesteps(10)
    assert [int(t) for t in sched.timesteps] == [t for t, _ in traj]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 16, 16, generator=g)
    assert torch.equal(traj[0][1], x)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            assert torch.allclose(traj[i][1], x, atol=1e-4)
            noise = torch.randn(x.shape, generator=g) if eta > 0 else None
            eps = unet(x, t.repeat(3)).sample
            x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    assert torch.allclose(ours, x, atol=1e-4)


def test_ddim_sample_is_deterministic_per_seed_and_batch_size_invariant():
    unet = _tiny_unet()
    model = ModelHandle(unet, "unet", "t", describe_architecture(unet)).canonical()
    a = ddim_sample(model, SCHED, 5, steps=4, seed=1, batch_size=2)
    b = ddim_sample(model, SCHED, 5, steps=4, seed=1, batch_size=5)
    c = ddim_sample(model, SCHED, 5, steps=4, seed=2)
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-2)


def test_classifier_free_guidance_is_one_batched_call_with_the_guided_combination():
    calls = []

    def model(x, t, e):
        calls.append(x.shape[0])
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        return 0.1 * x + e.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    cond = torch.ones(4, 16, 384)
    uncond = torch.zeros(1, 16, 384)
    guided = ddim_sample(model, SCHED, 4, steps=3, seed=0, cond=cond, uncond=uncond, guidance_scale=2.0)
    assert calls == [8, 8, 8]

    def combined(x, t, e):  # eps_u + 2 (eps_c - eps_u) with eps_u = 0.1 x, eps_c = 0.1 x + 1
        return 0.1 * x + 2.0

    direct = ddim_sample(combined, SCHED, 4, steps=3, seed=0, cond=cond, uncond=None)
    assert torch.allclose(guided, direct, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the committed models

def test_classifier_heldout_accuracy_above_95_percent():
    xh, yh = digits.digits_data("heldout")
    acc = (digits.classify(xh) == yh).float().mean().item()
    assert acc > 0.95
    assert digits.classifier_features(xh[:7]).shape == (7, digits.DigitsClassifier.FEATURE_DIM)


def test_fd_real_vs_real_is_small_and_noise_is_far():
    xt, _ = digits.digits_data("train")
    xh, _ = digits.digits_data("heldout")
    real_real = fd_between(xt[:300], xh)
    noise = torch.randn(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noise_real = fd_between(noise, xh)
    assert noise_real > 20 * real_real


def test_zoo_handles_and_fd_of_ddpm_far_below_noise():
    handle = load("digits-ddpm")
    assert handle.kind == "unet" and handle.extras["scheduler"]["num_train_timesteps"] == 1000
    ctx = EvalContext(seed=0, samples=128, options={"steps": 10}, show_progress=False)
    res = get_metric("fd").fn(handle.canonical(), handle, ctx)
    assert res.images.shape == (64, 1, 16, 16) and 0 <= res.images.min() and res.images.max() <= 1
    assert res.details["n"] == 128 and res.details["seed"] == 0 and res.details["steps"] == 10

    xh, _ = digits.digits_data("heldout")
    noise = torch.randn(128, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert res.value < 0.2 * fd_between(noise, xh)


def test_t2i_prompt_agreement_far_above_chance():
    handle = load("digits-t2i")
    assert handle.kind == "unet-cond"
    ctx = EvalContext(seed=0, samples=64, options={"steps": 8}, show_progress=False)
    res = get_metric("prompt_agreement").fn(handle.canonical(), handle, ctx)
    assert res.value > 0.5, res.details
    assert len(res.details["prompts"]) == 64 and res.images.shape[0] == 64


# ---------------------------------------------------------------------------------------------------
# digits-t2i-printed: prompts of two difficulties

def test_printed_prompts_have_their_own_templates_and_leave_digits_t2i_prompts_unchanged():
    prompts, labels = digits.digit_prompts(200, seed=3, split="eval", printed_fraction=0.3)
    printed = labels >= digits.PRINTED
    assert int(printed.sum()) == 60
    assert torch.bincount(labels % digits.PRINTED, minlength=10).tolist() == [20] * 10
    for p, is_printed in zip(prompts, printed.tolist()):
        assert any(w in p for w in ("typeset", "print", "font")) == is_printed, p
    assert not set(digits._PRINTED_TRAIN) & set(digits._PRINTED_EVAL)
    # without printed prompts the prompts are exactly the digits-t2i ones (same random stream)
    assert digits.digit_prompts(50, 1, "train", 0.0)[0] == digits.digit_prompts(50, 1, "train")[0]


def test_printed_glyphs_are_train_images_the_classifier_recognises():
    glyphs = digits.printed_glyphs()
    xt, yt = digits.digits_data("train")
    assert glyphs.shape == (10, 1, 16, 16)
    for d in range(10):
        assert any(torch.equal(glyphs[d], x) for x in xt[yt == d])
    assert digits.classify(glyphs).tolist() == list(range(10))


def test_t2i_printed_draws_glyphs_for_printed_prompts_and_handwriting_otherwise():
    """Printed prompts come out near their one glyph; handwritten prompts keep their spread, and both name
    the right digit far above chance. The metrics score FD on the handwritten samples only."""
    from modelpress.zoo.text import encode_prompts

    handle = load("digits-t2i-printed")
    assert handle.extras["training"]["init"] == "digits-t2i"
    prompts, labels = digits.digit_prompts(60, seed=0, split="eval", printed_fraction=0.3)
    x = ddim_sample(handle.canonical(), SCHED, 60, steps=10, seed=0, cond=encode_prompts(prompts),
                    uncond=digits.empty_prompt_embedding(), guidance_scale=3.0, sample_shape=(1, 16, 16))
    printed, digit = labels >= digits.PRINTED, labels % digits.PRINTED
    to_glyph = ((x - digits.printed_glyphs()[digit]) ** 2).flatten(1).mean(1)
    assert to_glyph[printed].median() < 0.5 * to_glyph[~printed].median()
    assert (digits.classify(x) == digit).float().mean() > 0.6
    ctx = EvalContext(seed=0, samples=40, options={"steps": 8}, show_progress=False)
    fd = get_metric("fd").fn(handle.canonical(), handle, ctx)
    assert fd.details["samples_compared"] == 28  # the 12 printed prompts' samples are left out
    agree = get_metric("prompt_agreement").fn(handle.canonical(), handle, ctx)
    assert {"handwritten", "printed"} <= set(agree.details) and agree.value > 0.5
