"""The diffusion PTQ quantization modules (modelpress.quant.primitives / ranges / act / layers / attention /
timesteps): quantizers against numpy references, range search,
bit packing, quantized layers (storage, export, save/load), split and per-timestep activation ranges,
quantized attention matmuls, AdaRound's rectified sigmoid."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.quant.act import ActQuantizer
from modelpress.quant.attention import QuantAttnProcessor
from modelpress.quant.layers import QuantConv2d, QuantLinear, _QuantLayer, adaround_h, adaround_logit
from modelpress.quant.primitives import (fake_quant, int_range, pack_signed_codes, packed_bytes, qparams_from_range,
                                         unpack_signed_codes)
from modelpress.quant.ranges import range_error, search_qparams
from modelpress.quant.timesteps import TimestepTap, current_timesteps, set_current_timesteps


def np_fake_quant(x: np.ndarray, lo: float, hi: float, bits: int, symmetric: bool) -> np.ndarray:
    """Plain numpy reference of an affine quantizer over [lo, hi] (widened to contain 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = max(max(-lo, hi) / qmax, 1e-8)
        return np.clip(np.round(x / scale), -qmax, qmax) * scale
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    scale = max((hi - lo) / (qmax - qmin), 1e-8)
    zp = np.clip(qmin - np.round(lo / scale), qmin, qmax)
    return (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_matches_numpy(bits: int, symmetric: bool) -> None:
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(4, 50)).astype(np.float32) * 3
    lo, hi = x.min(1), x.max(1)
    s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
    got = fake_quant(torch.tensor(x), s[:, None], z[:, None], bits, symmetric).numpy()
    ref = np.stack([np_fake_quant(x[i], lo[i], hi[i], bits, symmetric) for i in range(4)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    qmin, qmax = int_range(bits, symmetric)
    assert qmax - qmin + 1 == 2 ** bits - (1 if symmetric else 0)


def test_lp_error_matches_numpy_and_search_beats_minmax() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_t(df=2, size=(3, 600)).astype(np.float32)  # heavy tails: clipping pays off
    xq = x + rng.normal(size=x.shape).astype(np.float32) * 0.1
    np.testing.assert_allclose(range_error(torch.tensor(x), torch.tensor(xq), "lp", 2.4).numpy(),
                               (np.abs(x - xq) ** 2.4).mean(1), rtol=1e-4)
    xt = torch.tensor(x)
    s_mm, z_mm = search_qparams(xt, 4, False, "minmax")
    s_lp, z_lp = search_qparams(xt, 4, False, "lp")
    err = lambda s, z: range_error(xt, fake_quant(xt, s[:, None], z[:, None], 4, False), "lp")  # noqa: E731
    assert (err(s_lp, z_lp) <= err(s_mm, z_mm)).all() and err(s_lp, z_lp).sum() < 0.95 * err(s_mm, z_mm).sum()
    assert (s_lp <= s_mm + 1e-7).all()  # the search only clips
    for metric in ("mse", "cosine", "kl"):
        s, z = search_qparams(xt, 4, False, metric)
        assert torch.isfinite(s).all() and (s > 0).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_roundtrip_and_size(bits: int) -> None:
    qmin, qmax = int_range(bits, False)
    codes = torch.randint(qmin, qmax + 1, (7, 13), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    packed = pack_signed_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_bytes(codes.numel(), bits) == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_signed_codes(packed, bits, codes.numel()).reshape(7, 13), codes)
    if bits == 4:
        assert packed.numel() == -(-codes.numel() // 2)  # two 4-bit codes per byte


def _calibrated(layer: nn.Module, x: torch.Tensor, bits: int = 4) -> _QuantLayer:
    q = (QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear).from_float(
        layer, w_bits=bits, w_symmetric=False, act_bits=8)
    q.init_weight_qparams("lp")
    q.act.observing = True
    q(x)
    q.act.fit("lp")
    return q


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_quant_layer_freeze_export_and_reload(kind: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(24, 10) if kind == "linear" else nn.Conv2d(6, 10, 3, padding=1)
    x = torch.randn(5, 24) if kind == "linear" else torch.randn(2, 6, 5, 5)
    q = _calibrated(layer, x)
    before = q(x)
    q.freeze()
    assert q.fp_weight is None
    after = q(x)
    assert torch.equal(before, after)  # the integers reproduce the calibrated fake-quant exactly
    assert torch.equal(after, q(x))  # deterministic
    ex = q.export_qparams()
    assert ex["weight_codes"].dtype == torch.int8 and ex["weight_codes"].shape == layer.weight.shape
    assert ex["has_act_quant"] and ex["act_bits"] == 8 and ex["weight_bits"] == 4
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    deq = (ex["weight_codes"].float() - ex["weight_zero_point"].float().reshape(shape)) * ex["weight_scale"].reshape(shape)
    assert torch.allclose(deq, q.current_weight())
    assert ((deq - layer.weight).norm() / layer.weight.norm()) < 0.15  # 4-bit per-channel
    # the artifact path: rebuild from module_config, load the state dict
    fresh = type(q).from_module_config(q.module_config())
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), after)
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert stored < 2 * (layer.weight.numel() + layer.bias.numel())  # smaller than fp16


def test_split_and_per_timestep_activation_ranges() -> None:
    a = ActQuantizer(8, False, split=3, channel_dim=1)
    x = torch.cat([torch.rand(4, 3, 2, 2) * 0.01, torch.rand(4, 5, 2, 2) * 100], dim=1)
    a.observing = True
    a(x)
    a.fit("minmax")
    assert a.scale.shape == (1, 2) and a.scale[0, 0] < a.scale[0, 1] / 1000
    assert (a(x)[:, :3] - x[:, :3]).abs().max() < 1e-4  # the small half keeps its resolution

    f = ActQuantizer(8, False, n_timesteps=2, channel_dim=-1)
    set_current_timesteps(torch.tensor([10, 500]))
    v = torch.stack([torch.linspace(-1, 1, 16), torch.linspace(-50, 50, 16)])
    f.observing = True
    f(v)
    f.fit("minmax")
    assert f.timesteps.tolist() == [10, 500]
    assert f.scale[0, 0] * 40 < f.scale[1, 0]
    set_current_timesteps(torch.tensor([500, 10]))
    out = f(v.flip(0))
    assert (out - v.flip(0)).abs()[1].max() < 0.01  # row with t=10 uses the fine range
    set_current_timesteps(None)


def test_range_search_sees_every_pixel_position() -> None:
    """The observed subsample is random, not strided: a stride of H*W would keep only the corner pixel of
    every channel (here the only small value) and the Lp search would clip all the others."""
    x = torch.full((64, 64, 16, 16), 3.0)
    x[..., 0, 0] = 0.01
    x[:, :, 5, 7] = torch.linspace(-3, 3, 64)
    a = ActQuantizer(8, False)
    a.observing = True
    a(x)
    a.fit("lp")
    assert (a(x) - x).abs().max() < 0.05  # nothing clipped: the range covers [-3, 3]
    b = ActQuantizer(8, False)
    b.observing = True
    b(x)
    b.fit("lp")
    assert torch.equal(a.scale, b.scale)  # seeded: the same calibration gives the same ranges


def test_subsample_follows_the_run_seed() -> None:
    """The observation subsample is part of the calibration draw: the run's seed moves it, seed 0 keeps
    the historical draw."""
    x = torch.randn(64, 16, 8, 8) * torch.linspace(0.1, 3, 16).reshape(1, 16, 1, 1)

    def fitted(seed: int | None) -> torch.Tensor:
        a = ActQuantizer(4, False)
        if seed is not None:
            a.seed_subsample(seed)
        a.observing = True
        a(x)
        a.fit("lp")
        return a.scale.clone()

    assert torch.equal(fitted(None), fitted(0))
    assert torch.equal(fitted(5), fitted(5)) and not torch.equal(fitted(0), fitted(5))


def test_qdrop_keeps_full_precision_values_with_its_probability() -> None:
    a = ActQuantizer(2, False)
    x = torch.randn(20000)
    a.observing = True
    a(x)
    a.fit("minmax")
    xq = a(x)
    assert (xq != x).float().mean() > 0.99  # 2-bit: (almost) every value moves
    a.drop_quantization(0.5, torch.Generator().manual_seed(0))
    mixed = a(x)
    kept_fp = mixed == x
    assert 0.47 < kept_fp.float().mean() < 0.53
    assert torch.equal(mixed[~kept_fp], xq[~kept_fp])  # the rest is quantized as before
    a.drop_quantization(0.0)
    assert torch.equal(a(x), xq)


def test_learned_step_size_folds_into_scale() -> None:
    a = ActQuantizer(4, False)
    a.observing = True
    x = torch.randn(256)
    a(x)
    a.fit("minmax")
    s0 = a.scale.clone()
    u = a.learn_step_size()
    loss = (a(x) - x).pow(2).mean()
    loss.backward()
    assert u.grad is not None and u.grad.abs().sum() > 0  # LSQ gradient reaches the step size
    with torch.no_grad():
        u.fill_(0.5)
    y = a(x)
    a.fix_step_size()
    assert a.log_step is None and torch.allclose(a.scale, s0 * np.exp(0.5))
    assert torch.allclose(a(x), y)


def test_adaround_rectified_sigmoid() -> None:
    frac = torch.linspace(0.05, 0.95, 11)
    assert torch.allclose(adaround_h(adaround_logit(frac)), frac, atol=1e-5)
    assert adaround_h(torch.tensor([-50.0, 50.0])).tolist() == [0.0, 1.0]


def test_quant_attention_processor_matches_default_when_off_and_is_saved() -> None:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, residual_connection=True, norm_num_groups=4, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    x = torch.randn(2, 16, 4, 4)
    ref = attn(x)
    attn.set_processor(QuantAttnProcessor(8))
    proc = attn.processor
    assert "processor" in dict(attn.named_children())
    for aq in proc.quantizers():
        aq.enabled = False
    assert torch.allclose(attn(x), ref, atol=1e-5)
    for aq in proc.quantizers():
        aq.observing = True
    attn(x)
    for aq in proc.quantizers():
        aq.fit("lp")
        aq.enabled = True
    out = attn(x)
    assert not torch.equal(out, ref) and ((out - ref).norm() / ref.norm()) < 0.05
    assert any(k.startswith("processor.probs_quant") for k in attn.state_dict())
    assert set(proc.export_qparams()) == {"q", "k", "v", "probs"}


def test_timestep_tap_matches_timesteps() -> None:
    from diffusers.models.embeddings import Timesteps

    ts = Timesteps(32, True, 0)
    tap = TimestepTap.from_timesteps(ts)
    t = torch.tensor([0, 17, 999])
    assert torch.equal(tap(t), ts(t))
    assert torch.equal(current_timesteps(), t)
