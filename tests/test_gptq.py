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



# ---------------------------------------------------------------------------------------------------
# The pass (type: gptq): block by block on a causal LM (the zoo's trained 4-block Llama, pydocs-lm)

SMALL = {"bits": 3, "group_size": 32, "samples": 16, "batch_size": 8, "seq_len": 32}


def _context():
    from modelpress.passes import CalibrationSpec, Context

    return Context(seed=7, calibration=CalibrationSpec(), data=None)  # data: the zoo model's own


@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_pass_is_the_papers_block_by_block_loop(sequential: bool) -> None:
    """The pass equals the loop written out with the whole model's forward (data.capture.model_hessians, GPTQ's
    ``H = 2 X^T X / n``): sequential, block k's Hessians come from the model whose blocks before k are already
    quantized (GPTQ Sec. 4); otherwise every Hessian comes from the input model. Same packed bytes."""
    from modelpress import zoo
    from modelpress.data.capture import model_hessians
    from modelpress.modules import set_submodule
    from modelpress.passes import get_pass
    from modelpress.quant.gptq import quantize_layer

    torch.set_num_threads(1)
    cls = get_pass("gptq")
    p = cls(cls.Config(**SMALL, sequential=sequential))
    got = p.apply(zoo.load("pydocs-lm"), _context()).module

    ref = zoo.load("pydocs-lm")
    batches = p._batches(ref, _context())
    blocks = [[f"model.layers.{i}.{n}" for n, m in ref.module.model.layers[i].named_modules()
               if isinstance(m, torch.nn.Linear)] for i in range(len(ref.module.model.layers))]
    dense = {} if sequential else model_hessians(ref, [n for b in blocks for n in b], batches, scale=2.0)
    for names in blocks:
        H = model_hessians(ref, names, batches, scale=2.0) if sequential else dense
        for n in names:
            set_submodule(ref.module, n, quantize_layer(ref.module.get_submodule(n), H[n], **{
                k: SMALL[k] for k in ("bits", "group_size")}, sym=False))
    want = ref.module.state_dict()
    state = got.state_dict()
    assert sorted(state) == sorted(want) and sum(k.endswith("qweight") for k in state) == 28
    for k, v in want.items():
        assert torch.equal(state[k], v), k


def test_gptq_pass_beats_rtn_on_the_model_outputs() -> None:
    """At 3 bits, GPTQ's logits are closer to the bf16 model's than round-to-nearest's on the same grid, on
    held-out text (pydocs-10/test windows the calibration never saw)."""
    from modelpress import zoo
    from modelpress.passes import get_pass
    from modelpress.zoo import lm

    torch.set_num_threads(1)
    ref = zoo.load("pydocs-lm")
    ids = lm.token_windows(lm.find("pydocs-lm"), lm.area_texts("test"), 64)[:8]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        dense = ref.canonical()(ids, mask).float().log_softmax(-1)
    kl = {}
    for method in ("gptq", "rtn"):
        cls = get_pass("gptq")
        out = cls(cls.Config(**SMALL, method=method)).apply(zoo.load("pydocs-lm"), _context())
        with torch.no_grad():
            q = out.canonical()(ids, mask).float().log_softmax(-1)
        kl[method] = float((dense.exp() * (dense - q)).sum(-1).mean())
    assert kl["gptq"] < 0.7 * kl["rtn"], kl
