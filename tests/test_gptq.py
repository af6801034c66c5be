"""GPTQ and RTN quantizers (modelpress.quant.gptq)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.quant.gptq import gptq_quantize, hessian_from_inputs, rtn_quantize
from modelpress.quant.primitives import quant_grid


def _problem(rows: int = 32, cols: int = 96, n: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # correlated inputs with uneven scales: where GPTQ's error feedback pays off
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = (torch.randn(n, cols, generator=g) * torch.linspace(0.2, 3.0, cols)) @ mix
    return W, X


def _out_err(W, Wq, X):
    return float(((X @ (W - Wq).T) ** 2).mean())


def test_rtn_matches_numpy_reference():
    W, _ = _problem()
    res = rtn_quantize(W, bits=3, group_size=32, sym=False)
    Wn = W.numpy()
    ref = np.empty_like(Wn)
    for g0 in range(0, Wn.shape[1], 32):
        blk = Wn[:, g0:g0 + 32]
        lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
        scale = (hi - lo) / 7
        zero = np.round(-lo / scale)
        q = np.clip(np.round(blk / scale[:, None]) + zero[:, None], 0, 7)
        ref[:, g0:g0 + 32] = (q - zero[:, None]) * scale[:, None]
    np.testing.assert_allclose(res.dequant.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= 7
    torch.testing.assert_close(res.dequantize(), res.dequant)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (3, None, True), (2, 64, False)])
def test_gptq_beats_rtn_and_is_consistent(bits, group_size, sym):
    W, X = _problem()
    H = hessian_from_inputs(X)
    g = gptq_quantize(W, H, bits, group_size, sym)
    r = rtn_quantize(W, bits, group_size, sym)
    # codes, scales and zeros reproduce the dequantized weights exactly
    torch.testing.assert_close(g.dequantize(), g.dequant, rtol=1e-5, atol=1e-6)
    assert int(g.codes.max()) <= 2**bits - 1
    assert _out_err(W, g.dequant, X) < 0.9 * _out_err(W, r.dequant, X)


def test_gptq_act_order_and_dead_columns():
    W, X = _problem(cols=64)
    X[:, 5] = 0.0
    H = hessian_from_inputs(X)
    g = gptq_quantize(W, H, 4, 16, False, act_order=True)
    torch.testing.assert_close(g.dequantize(), g.dequant, rtol=1e-5, atol=1e-6)
    assert _out_err(W, g.dequant, X) < _out_err(W, rtn_quantize(W, 4, 16).dequant, X)


def test_gptq_high_bits_is_nearly_exact():
    W, X = _problem()
    g = gptq_quantize(W, hessian_from_inputs(X), 8, 128, False)
    assert float((g.dequant - W).abs().max()) < 0.05


def test_quant_grid_symmetric_zero_is_exact():
    w = torch.tensor([[-1.0, 0.0, 0.5]])
    scale, zero = quant_grid(w, 4, sym=True)
    assert float(zero) == 8.0
    q = torch.clamp(torch.round(torch.zeros(1) / scale) + zero, 0, 15)
    assert float((q - zero) * scale) == 0.0


def test_bad_input():
    with pytest.raises(ValueError):
        rtn_quantize(torch.zeros(3), 4)
    with pytest.raises(ValueError):
        gptq_quantize(torch.zeros(2, 4), torch.eye(3), 4)
