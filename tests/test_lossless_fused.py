"""Fused decode + matmul, row-wise embedding lookup, format version 3 (row-aligned lanes, fp8) and loading
version-2 data: every kernel against the numpy reference (``entropy.linear_reference``, the reference codec)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modelpress.codecs.lossless import (LosslessEmbedding, LosslessLinear, decode_tensor, encode_tensor,
                                          row_lane_size)
from modelpress.errors import CorruptData
from modelpress.kernels import entropy as E
from modelpress.kernels import entropy_cpu as C

INT = {"bfloat16": torch.int16, "float16": torch.int16, "float32": torch.int32}


def weight_words(shape: tuple[int, int], dtype: str, seed: int = 0, specials: bool = True) -> tuple[np.ndarray, torch.Tensor]:
    """Trained-looking weights (plus subnormals, +-0, large values; Inf/NaN when ``specials``), as words and
    as a float tensor."""
    rng = np.random.default_rng(seed)
    w = torch.from_numpy((rng.standard_normal(shape) * 0.05).astype(np.float32)).to(getattr(torch, dtype))
    flat = w.view(-1)
    tiny = torch.finfo(getattr(torch, dtype)).tiny
    flat[:4] = torch.tensor([tiny / 4, -tiny / 8, -0.0, 300.0]).to(flat.dtype)  # subnormals, -0, large
    if specials:
        flat[5:7] = torch.tensor([float("inf"), float("nan")]).to(flat.dtype)
    words = w.view(INT[dtype]).numpy().reshape(-1).view(E.WORD_DTYPE[16 if dtype != "float32" else 32]).copy()
    return words, w


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal, NaN where NaN (payloads of computed NaNs are not compared)."""
    return bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.nan_to_num(a, nan=0.0),
                                                                            np.nan_to_num(b, nan=0.0)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape,rows_per_lane", [((37, 200), 3), ((64, 96), 1), ((9, 33), 2), ((130, 64), 4)])
@pytest.mark.parametrize("mant,raw_sign", [(0, False), (2, False), (0, True), (3, True)])
def test_fused_linear_equals_reference_bit_for_bit(dtype: str, shape: tuple[int, int], rows_per_lane: int,
                                                   mant: int, raw_sign: bool) -> None:
    """Full and partial blocks, K not a multiple of 32 (and of 8: raw bits in a pass of their own, else merged
    while widening where the CPU has BMI2), batch 1..17, bias or not, special values; the pair table
    (``mant`` 2) and the four-code table (``mant`` 0); the sign stored raw (format version 6: one raw byte per
    weight for bf16 with ``mant`` 0 and fp16 with 3, merged with vector code; other widths by ``pdep``)."""
    words, w = weight_words(shape, dtype, seed=shape[0], specials=shape[0] != 130)
    enc = C.encode(words, dtype, lane_size=rows_per_lane * shape[1], sym_mant_bits=mant, row_len=shape[1],
                   raw_sign=raw_sign)
    plan = E.validate(enc)
    assert plan.row_len == shape[1] and C.fused_supported(plan, shape[1])
    rng = np.random.default_rng(1)
    wf = w.float().numpy()
    for batch in (1, 3, 17):
        x = rng.standard_normal((batch, shape[1])).astype(np.float32)
        bias = rng.standard_normal(shape[0]).astype(np.float32) if batch != 3 else None
        y = C.fused_linear(plan, x, bias)
        assert y.shape == (batch, shape[0]) and same(y, E.linear_reference(wf, x, bias))
        if shape[0] == 130:  # finite weights: the reference is a float32 matmul up to summation order
            assert np.allclose(y, x @ wf.T + (0 if bias is None else bias), rtol=1e-4, atol=1e-4)


def test_fused_linear_threads_and_thread_count_give_identical_results() -> None:
    import numba

    words, w = weight_words((300, 128), "bfloat16", specials=False)
    plan = E.validate(C.encode(words, "bfloat16", lane_size=256, row_len=128))
    x = np.random.default_rng(0).standard_normal((5, 128)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = C.fused_linear(plan, x)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        b = C.fused_linear(plan, x)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(a, b) and np.array_equal(a, E.linear_reference(w.float().numpy(), x))


def test_fused_kernel_reports_corrupt_lanes_and_needs_whole_rows() -> None:
    words, _ = weight_words((40, 64), "bfloat16", specials=False)
    enc = C.encode(words, "bfloat16", lane_size=128, row_len=64)
    bad = E.Encoded(enc.header, enc.codebook, enc.lane_nbytes, enc.checksums, np.full_like(enc.stream, 0xFF))
    with pytest.raises(CorruptData, match="do not end where"):
        C.fused_linear(E.validate(bad, verify_checksums=False), np.ones((1, 64), np.float32))
    unaligned = E.validate(C.encode(words, "bfloat16", lane_size=100))
    assert not C.fused_supported(unaligned, 64)
    with pytest.raises(ValueError, match="whole rows"):
        C.fused_linear(unaligned, np.ones((1, 64), np.float32))


def _linear(dtype: torch.dtype, out_f: int = 48, in_f: int = 80, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lossless_linear_fused_and_dense_paths(dtype: torch.dtype) -> None:
    """Small batches: the fused kernel (== reference, rounded once to the dtype); large batches and
    ``fused_max_rows = 0``: decode + F.linear, bit-identical to nn.Linear."""
    lin = _linear(dtype)
    enc, _ = encode_tensor(lin.weight, block_size=1024)
    assert enc.header[1] == 3 and enc.header[10] == 80 and enc.header[4] == row_lane_size(256, 80) == 240
    m = LosslessLinear.from_linear(lin, enc, fused_max_rows=256)
    x = torch.randn(2, 3, 80).to(dtype)
    with torch.no_grad():
        y = m(x)
        ref = E.linear_reference(lin.weight.float().numpy(), x.reshape(6, 80).float().numpy(), lin.bias.float().numpy())
        assert torch.equal(y, torch.from_numpy(ref).to(dtype).reshape(2, 3, 48))
        dense = lin(x)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # about one ulp at |y|~1
        assert torch.allclose(y.float(), dense.float(), rtol=tol, atol=tol)
        m.fused_max_rows = 4
        assert torch.equal(m(x), dense)               # 6 rows > 4: dense path
        big = torch.randn(300, 80).to(dtype)
        m.fused_max_rows = 256
        assert torch.equal(m(big), lin(big))
    x.requires_grad_(True)
    assert torch.equal(m(x), lin(x))                  # autograd: the dense path


def _v2_encoded(weight: torch.Tensor, lane_size: int) -> E.Encoded:
    """What modelpress wrote before format version 3 (the reference encoder, version 2)."""
    words = weight.detach().contiguous().view(INT[str(weight.dtype)[6:]]).numpy().reshape(-1)
    words = words.view(E.WORD_DTYPE[words.dtype.itemsize * 8])
    enc = E.encode_reference(words, str(weight.dtype)[6:], lane_size=lane_size, version=2)
    assert enc.header[1] == 2 and enc.header[10] == 0
    return enc


def test_version_2_artifacts_still_load_and_run(tmp_path) -> None:
    """Version-2 buffers (lanes not aligned to rows) load through the state dict and give nn.Linear's output
    (dense path); version-2 data whose lanes happen to hold whole rows also runs fused."""
    lin = _linear(torch.bfloat16, 40, 80)
    x = torch.randn(3, 80).to(torch.bfloat16)
    for lane, fused in ((100, False), (160, True)):
        old = LosslessLinear.from_linear(lin, _v2_encoded(lin.weight, lane), fused_max_rows=256)
        save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "old.safetensors"))
        fresh = LosslessLinear.from_module_config(old.module_config())
        fresh.load_state_dict(load_file(str(tmp_path / "old.safetensors")))
        assert torch.equal(fresh.decoded_weight(), lin.weight)
        assert fresh._fused_ok(x, 3) == fused
        with torch.no_grad():
            y = fresh(x)
            if fused:
                ref = E.linear_reference(lin.weight.float().numpy(), x.float().numpy(), lin.bias.float().numpy())
                assert torch.equal(y, torch.from_numpy(ref).to(torch.bfloat16))
            else:
                assert torch.equal(y, lin(x))


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embedding_decodes_only_the_rows_it_reads(version: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(301, 48, padding_idx=0).to(dtype)
    enc = encode_tensor(emb.weight, block_size=1024)[0] if version == 3 else _v2_encoded(emb.weight, 100)
    m = LosslessEmbedding.from_embedding(emb, enc)
    ids = torch.tensor([[0, 5, 300, 5], [299, 2, 1, 150]])
    with torch.no_grad():
        assert torch.equal(m(ids), emb(ids))
        assert torch.equal(m(torch.zeros(0, dtype=torch.int64)), emb(torch.zeros(0, dtype=torch.int64)))
    plan = m.plan()
    rows = np.array([300, 7, 7, 0, 123])
    full = C.decode_plan(plan).reshape(301, 48)
    assert np.array_equal(C.decode_rows(plan, rows, 48), full[rows])
    with pytest.raises(IndexError):
        m(torch.tensor([301]))


def test_corrupt_lane_in_a_row_lookup_is_reported() -> None:
    words, _ = weight_words((64, 32), "bfloat16", specials=False)
    enc = C.encode(words, "bfloat16", lane_size=64, row_len=32)
    bad = E.Encoded(enc.header, enc.codebook, enc.lane_nbytes, enc.checksums, np.full_like(enc.stream, 0xFF))
    with pytest.raises(CorruptData, match="do not end where"):
        C.decode_rows(E.validate(bad, verify_checksums=False), np.array([3]), 32)


def test_version_3_header_checks() -> None:
    words, _ = weight_words((10, 32), "bfloat16", specials=False)
    enc = C.encode(words, "bfloat16", lane_size=64, row_len=32)
    h = enc.header.copy()
    h[10] = 48   # lanes of 64 weights cannot hold whole rows of 48
    h[11] = E._crc(h[:11], enc.codebook, enc.lane_nbytes)
    with pytest.raises(CorruptData, match="bad row length"):
        E.validate(E.Encoded(h, enc.codebook, enc.lane_nbytes, enc.checksums, enc.stream))
    with pytest.raises(ValueError, match="version 2"):
        E.encode_reference(np.zeros(4, np.uint8), "float8_e5m2", version=2)


def test_version_6_header_checks() -> None:
    """Version 6 (sign stored raw) holds 16- and 32-bit floats only, with a symbol of the exponent and at most
    ``W - 5 - exponent bits`` mantissa bits; fp8 and integer codes cannot store a sign raw."""
    for dtype in ("float8_e4m3fn", "uint8"):
        with pytest.raises(ValueError, match="stored raw only"):
            E.encode_reference(np.zeros(4, np.uint8), dtype, raw_sign=True)
    assert E.symbol_bits("bfloat16", 3, 14, raw_sign=True) == 11   # R = 5: 4 bits below the symbol, the sign above
    with pytest.raises(ValueError, match="at most 3 mantissa bits"):
        E.symbol_bits("bfloat16", 4, 14, raw_sign=True)   # the symbol would reach the code length's 4 bits

    def forged(enc: E.Encoded, version: int) -> E.Encoded:
        h = enc.header.copy()
        h[1] = version
        h[11] = E._crc(h[:11], enc.codebook, enc.lane_nbytes)
        return E.Encoded(h, enc.codebook, enc.lane_nbytes, enc.checksums, enc.stream)
    fp8 = E.encode_reference(np.arange(256, dtype=np.uint8), "float8_e5m2", lane_size=64)
    with pytest.raises(CorruptData, match="16- and 32-bit floats only"):
        E.validate(forged(fp8, 6))
    words, _ = weight_words((10, 32), "bfloat16", specials=False)
    wide = C.encode(words, "bfloat16", lane_size=64, sym_mant_bits=3, row_len=32)   # S = 12: too wide for v6
    with pytest.raises(CorruptData, match="bad symbol width"):
        E.validate(forged(wide, 6))
    raw = C.encode(words, "bfloat16", lane_size=64, sym_mant_bits=0, row_len=32, raw_sign=True)
    assert int(raw.header[1]) == 6 and int(raw.header[5]) == 8 and int(raw.header[10]) == 32
    assert np.array_equal(C.decode(raw), words)
    with pytest.raises(ValueError, match="version 6"):
        E.encode_reference(words, "bfloat16", version=6)   # a version-6 header on words with the sign in the symbol


# ---------------------------------------------------------------------------------------------------
# fp8 and fp16: every bit pattern.

@pytest.mark.parametrize("dtype,raw_sign", [("float8_e4m3fn", False), ("float8_e5m2", False), ("float16", False),
                                            ("bfloat16", False), ("float16", True), ("bfloat16", True)])
def test_every_bit_pattern_round_trips(dtype: str, raw_sign: bool) -> None:
    """All 256 fp8 / 65536 16-bit patterns (every NaN, +-Inf, -0, subnormals) among trained-looking weights:
    numba and numpy encoders agree byte for byte, both decoders give the words back, and so does the tensor API;
    also with the sign stored raw (format version 6, DFloat11's layout: exponent-only symbol)."""
    word_bits = E.DTYPES[dtype][1]
    wd = E.WORD_DTYPE[word_bits]
    rng = np.random.default_rng(0)
    t = torch.from_numpy((rng.standard_normal(6000) * 0.05).astype(np.float32)).to(getattr(torch, dtype))
    trained = t.view(torch.uint8 if word_bits == 8 else torch.int16).numpy().view(wd)
    every = np.arange(1 << word_bits, dtype=np.int64).astype(wd)
    words = np.concatenate([every, trained, every[::-1]])
    lane = 700
    mant = 0 if raw_sign else 2
    enc = C.encode(words, dtype, lane_size=lane, sym_mant_bits=mant, raw_sign=raw_sign)
    ref = E.encode_reference(words, dtype, lane_size=lane, sym_mant_bits=mant, raw_sign=raw_sign)
    for (name, a), b in zip(enc.arrays().items(), ref.arrays().values()):
        assert np.array_equal(a, b), name
    assert np.array_equal(C.decode(enc), words)
    if raw_sign:
        assert np.array_equal(E.decode_reference(enc), words)
    if word_bits == 8:
        assert np.array_equal(E.decode_reference(enc), words)
        assert E.validate(enc).sym_bits == 8 and E.validate(enc).raw_bits == 0
    rows = C.decode_rows(E.validate(enc), np.array([3, 0]), 50)   # rows of 50 in lanes of 700: unaligned
    assert np.array_equal(rows, words[:words.size // 50 * 50].reshape(-1, 50)[[3, 0]])
    tensor = torch.from_numpy(words.view(np.uint8 if word_bits == 8 else np.int16).copy()).view(getattr(torch, dtype))
    enc2, _ = encode_tensor(tensor.reshape(-1, 8), block_size=1024, mantissa_bits=mant, raw_sign=raw_sign)
    assert int(enc2.header[1]) == (6 if raw_sign else 3)
    back = decode_tensor(enc2, tuple(tensor.reshape(-1, 8).shape))
    assert back.dtype == tensor.dtype
    assert torch.equal(back.reshape(-1).view(torch.uint8 if word_bits == 8 else torch.int16),
                       tensor.view(torch.uint8 if word_bits == 8 else torch.int16))


def test_fp8_weights_compress() -> None:
    rng = np.random.default_rng(0)
    w = torch.from_numpy((rng.standard_normal(200_000) * 0.02).astype(np.float32))
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        enc, _ = encode_tensor(w.to(dtype), block_size=65536)
        assert enc.nbytes * 8 / w.numel() < 7.5   # a Gaussian's fp8 bytes carry well under 8 bits
        assert torch.equal(decode_tensor(enc).view(torch.uint8), w.to(dtype).view(torch.uint8))
