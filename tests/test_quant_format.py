"""The one quantized-weight format (modelpress.quant.primitives, modelpress.quant.packed, modelpress.prune.sparse):
bit-stream packing of 1..8-bit codes and signs, GPTQ / RTN results as packed layers, sparse layers, and their
save / load through the artifact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.artifact import load_artifact, write_artifact
from modelpress.model import ModelHandle
from modelpress.modules import materialize, module_class, set_submodule
from modelpress.prune.sparse import SparseConv2d, SparseLinear, sparse_from_dense
from modelpress.quant.gptq import gptq_quantize, hessian_from_inputs, rtn_quantize
from modelpress.quant.packed import PackedConv2d, PackedLinear
from modelpress.quant.primitives import (group_grids, pack_codes, pack_signs, packed_bytes, quant_grid, unpack_codes,
                                         unpack_signs)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_stream_roundtrip_size_and_bit_order(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (333,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(333, bits) == -(-333 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 333), codes)
    stream = [(int(packed[k // 8]) >> (k % 8)) & 1 for k in range(333 * bits)]
    for i in (0, 1, 100, 332):  # bit j of code i is bit i * b + j of the stream, LSB first
        assert sum(stream[i * bits + j] << j for j in range(bits)) == int(codes[i])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_whole_byte_widths_are_the_familiar_codes_per_byte(bits: int) -> None:
    per = 8 // bits
    codes = torch.randint(0, 2**bits, (64,), generator=torch.Generator().manual_seed(0))
    expected = (codes.view(-1, per) << (torch.arange(per) * bits)).sum(dim=1).to(torch.uint8)
    assert torch.equal(pack_codes(codes, bits), expected)


@pytest.mark.parametrize("cols", [1, 31, 32, 70])
def test_sign_packing_is_the_one_bit_stream_per_row(cols: int) -> None:
    pos = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) > 0.5
    packed = pack_signs(pos)
    words = -(-cols // 32)
    assert packed.dtype == torch.int32 and packed.shape == (5, words)
    for r in range(5):
        row = torch.zeros(words * 32, dtype=torch.bool)
        row[:cols] = pos[r]
        assert torch.equal(packed[r].contiguous().view(torch.uint8), pack_codes(row, 1))
    assert torch.equal(unpack_signs(packed, cols), pos.float() * 2 - 1)


def test_group_grids_are_quant_grid_per_group() -> None:
    w = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    s, z = group_grids(w, 3, 16, False)
    assert s.shape == z.shape == (6, 4)
    for g, c0 in enumerate(range(0, 50, 16)):
        gs, gz = quant_grid(w[:, c0:c0 + 16], 3, False)
        assert torch.equal(s[:, g], gs) and torch.equal(z[:, g], gz)


@pytest.mark.parametrize("bits,sym,group", [(2, False, 16), (3, False, 64), (4, True, 0), (8, False, 48)])
def test_rtn_and_gptq_results_become_packed_layers_with_the_same_weights(bits: int, sym: bool, group: int) -> None:
    g = torch.Generator().manual_seed(bits)
    lin = nn.Linear(96, 20)
    x = torch.randn(64, 96, generator=g)
    for res in (rtn_quantize(lin.weight, bits, group, sym), gptq_quantize(lin.weight, hessian_from_inputs(x), bits, group, sym)):
        mod = res.to_module(lin, sym)
        assert isinstance(mod, PackedLinear) and mod.qweight.numel() == packed_bytes(96 * 20, bits)
        torch.testing.assert_close(mod.dequantized_weight(), res.dequantize(), rtol=0, atol=0)
        torch.testing.assert_close(mod.dequantized_weight(), res.dequant, rtol=0, atol=1e-6)
        torch.testing.assert_close(mod(x), F.linear(x, res.dequantize(), lin.bias), rtol=0, atol=0)
        p = mod.export_parameters()
        idx = torch.arange(96) // p["group_size"]
        rebuilt = (p["codes"].float() - p["zero_points"].float()[:, idx]) * p["scales"][:, idx]
        assert torch.equal(p["codes"], res.codes) and torch.equal(rebuilt, mod.dequantized_weight())
        plain = mod.decompressed()
        assert type(plain) is nn.Linear and torch.equal(plain.weight, mod.dequantized_weight())


def test_packed_conv_keeps_the_convolution() -> None:
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    res = rtn_quantize(conv.weight.reshape(6, -1), 3, 16, False)
    mod = res.to_module(conv, False)
    x = torch.randn(2, 4, 9, 9)
    assert isinstance(mod, PackedConv2d)
    ref = F.conv2d(x, res.dequant.reshape(conv.weight.shape), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(mod(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(mod.decompressed()(x), ref, rtol=0, atol=0)


def test_sparse_layers_store_values_and_a_bitmask() -> None:
    lin, conv = nn.Linear(40, 10), nn.Conv2d(3, 5, 3, padding=1)
    for layer in (lin, conv):
        w = layer.weight.detach().clone().half()
        w[w.abs() < w.abs().median()] = 0
        mod = sparse_from_dense(layer, w)
        assert isinstance(mod, SparseLinear if layer is lin else SparseConv2d)
        assert mod.values.numel() == int((w != 0).sum()) and mod.mask.numel() == packed_bytes(w.numel(), 1)
        assert torch.equal(mod.dense_weight(), w) and torch.equal(mod.export_parameters()["mask"], w != 0)
        assert torch.equal(mod.decompressed().weight, w)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Conv2d(2, 4, 3, padding=1))


def test_packed_and_sparse_layers_round_trip_through_the_artifact(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    m = _tiny()
    handle = ModelHandle(m, "generic", "tiny", {"class": "x"})
    set_submodule(m, "0", rtn_quantize(m[0].weight, 3, 32, False).to_module(m[0], False, torch.float16))
    w = m[2].weight.detach().clone().half()
    w[w.abs() < 0.1] = 0
    set_submodule(m, "2", sparse_from_dense(m[2], w))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    write_artifact(tmp_path / "a", handle)
    assert set(load_file(str(tmp_path / "a" / "model.safetensors"))) == set(before)
    module = _tiny()
    manifest = json.loads((tmp_path / "a" / "modelpress.json").read_text())
    assert {e["class"] for e in manifest["compressed_modules"]} == {"PackedLinear", "SparseConv2d"}
    for e in manifest["compressed_modules"]:
        set_submodule(module, e["path"], module_class(e["class"]).from_module_config(e["config"]))
    module.load_state_dict(load_file(str(tmp_path / "a" / "model.safetensors")))
    assert torch.equal(module[0].dequantized_weight(), m[0].dequantized_weight())
    assert torch.equal(module[2].dense_weight(), w)
    x = torch.randn(3, 64)
    torch.testing.assert_close(module[0](x), m[0](x), rtol=0, atol=0)
    plain = materialize(module)
    assert type(plain[0]) is nn.Linear and type(plain[2]) is nn.Conv2d


def test_artifact_loader_rebuilds_packed_layers(tmp_path: Path) -> None:
    import transformers

    from modelpress.model import describe_architecture

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(cfg).eval()
    h = ModelHandle(bert, "classifier", "tiny", describe_architecture(bert))
    q = bert.bert.encoder.layer[0].attention.self.query
    set_submodule(bert, "bert.encoder.layer.0.attention.self.query", rtn_quantize(q.weight, 4, 16, True).to_module(q, True))
    write_artifact(tmp_path / "b", h)
    loaded = load_artifact(tmp_path / "b").module
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(loaded(input_ids=ids).logits, bert(input_ids=ids).logits, rtol=0, atol=0)
