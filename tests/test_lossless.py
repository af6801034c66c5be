"""Lossless float coding (DFloat11-style): code construction, bit-exact round trips, the numba CPU kernels
against the numpy reference, validation and fuzzing of corrupt data, the ``dfloat11`` pass end to end."""
from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from modelpress.codecs.lossless import (DFloat11, LosslessConv2d, LosslessEmbedding, LosslessLinear,
                                          decode_tensor, encode_tensor)
from modelpress.errors import CorruptData, UserError
from modelpress.kernels import entropy as E
from modelpress.kernels import entropy_cpu as C
from modelpress.model import ModelHandle, describe_architecture
from modelpress.passes import Context

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORDS = {"bfloat16": np.uint16, "float16": np.uint16, "float32": np.uint32}


def huffman_cost(counts: np.ndarray) -> int:
    """Total bits of an unrestricted Huffman code (plain heap construction)."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) < 2:
        return sum(heap)
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def weights_like(n: int, dtype: str, seed: int = 0) -> np.ndarray:
    """Bit patterns of trained-looking weights (Gaussian, std 0.02) plus a sprinkle of special values."""
    rng = np.random.default_rng(seed)
    t = torch.from_numpy((rng.standard_normal(n) * 0.02).astype(np.float32)).to(getattr(torch, dtype))
    bits = {"bfloat16": torch.int16, "float16": torch.int16, "float32": torch.int32}[dtype]
    return t.view(bits).numpy().view(WORDS[dtype]).copy()


# ---------------------------------------------------------------------------------------------------
# Code construction.

@SETTINGS
@given(st.lists(st.integers(0, 10**6), min_size=2, max_size=300), st.integers(9, 15))
def test_package_merge_is_optimal_and_length_limited(counts: list[int], max_len: int) -> None:
    c = np.array(counts, dtype=np.int64)
    used = int(np.count_nonzero(c))
    if used > 1 << max_len:
        return
    lengths = E.package_merge_lengths(c, max_len)
    assert int(lengths.max(initial=0)) <= max_len
    assert np.all((lengths > 0) == (c > 0))
    if used >= 2:
        assert E.kraft_sum(lengths) == 1.0  # complete: every decode table entry is a valid code
        cost = int((c * lengths).sum())
        assert cost >= huffman_cost(c)  # never better than unrestricted Huffman (which is optimal) ...
        if used <= 1 << (max_len - 8) and c.max() < 2 ** 8:  # ... and equal to it when the limit cannot bind
            assert cost == huffman_cost(c)


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code lengths of an unrestricted Huffman code (every count > 0)."""
    heap = [(int(c), i, [i]) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    lengths = np.zeros(len(counts), dtype=np.int64)
    tie = len(counts)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        for s in a[2] + b[2]:
            lengths[s] += 1
        heapq.heappush(heap, (a[0] + b[0], tie, a[2] + b[2]))
        tie += 1
    return lengths


def naive_clamp_lengths(counts: np.ndarray, max_len: int) -> np.ndarray:
    """The naive length limit: clamp Huffman's lengths at ``max_len``, then repair the Kraft sum by
    lengthening the rarest symbol that is still shorter than the limit, one bit at a time."""
    lengths = np.minimum(huffman_lengths(counts), max_len)
    while E.kraft_sum(lengths) > 1.0:
        short = np.nonzero(lengths < max_len)[0]
        lengths[short[np.argmin(counts[short])]] += 1
    return lengths


def test_package_merge_binding_limit_beats_naive_clamp() -> None:
    c = np.array([2 ** i for i in range(20)], dtype=np.int64)  # Fibonacci-like skew: Huffman wants 19 bits
    lengths = E.package_merge_lengths(c, 12)
    naive = naive_clamp_lengths(c, 12)
    assert lengths.max() == 12 and E.kraft_sum(lengths) == 1.0
    assert naive.max() == 12 and E.kraft_sum(naive) <= 1.0  # the naive code is valid too ...
    cost, naive_cost = int((c * lengths).sum()), int((c * naive).sum())
    assert huffman_cost(c) < cost < naive_cost  # ... and package-merge's optimal limited code beats it


def test_canonical_codes_are_prefix_free() -> None:
    lengths = E.package_merge_lengths(np.array([50, 1, 1, 7, 30, 2, 0, 9]), 15)
    codes = E.canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{int(lengths[s])}b") for s in np.nonzero(lengths)[0]]
    assert not any(a != b and b.startswith(a) for a in words for b in words)


# ---------------------------------------------------------------------------------------------------
# Round trips, CPU kernels against the numpy reference.

@SETTINGS
@given(st.sampled_from(["bfloat16", "float16", "float32"]), st.integers(0, 3000), st.integers(1, 700),
       st.integers(0, 2), st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_round_trip_arbitrary_bit_patterns(dtype: str, n: int, lane: int, mant: int, seed: int,
                                           trained: bool, raw_sign: bool) -> None:
    """Any bit pattern (NaN payloads, -0, Inf, subnormals): CPU encode == reference encode, decode exact; with the
    sign coded in the symbol (format version 3) or stored raw (version 6)."""
    rng = np.random.default_rng(seed)
    if trained:
        words = weights_like(n, dtype, seed)
        k = rng.integers(0, n + 1, size=min(n, 20))
        words[k[k < n]] = rng.integers(0, np.iinfo(WORDS[dtype]).max, size=int((k < n).sum()), dtype=WORDS[dtype])
    else:
        words = rng.integers(0, np.iinfo(WORDS[dtype]).max, size=n, dtype=WORDS[dtype], endpoint=True)
    max_len = 15
    enc = C.encode(words, dtype, lane, mant, max_len, raw_sign=raw_sign)
    ref = E.encode_reference(words, dtype, lane, mant, max_len, raw_sign=raw_sign)
    assert int(enc.header[1]) == (6 if raw_sign else 3)
    for (name, a), b in zip(enc.arrays().items(), ref.arrays().values()):
        assert np.array_equal(a, b), name
    out = C.decode(enc)
    assert out.dtype == WORDS[dtype] and np.array_equal(out, words)
    if n <= 600:
        assert np.array_equal(E.decode_reference(enc), words)


def test_encoder_holds_its_output_once() -> None:
    """The CPU encoder writes the lanes straight into the padded stream, which the container keeps as it is: the
    memory numpy allocates while coding a tensor (tracemalloc traces it) is its output plus less than 10% (before,
    the lanes and the stream were two copies: twice the output)."""
    import tracemalloc

    words = weights_like(1 << 20, "bfloat16")
    C.encode(words[:4096], "bfloat16")  # compiled (and cached) before the measurement
    tracemalloc.start()
    try:
        enc = C.encode(words, "bfloat16")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert enc.stream.nbytes < peak < 1.1 * enc.stream.nbytes  # 1.04 measured; 2.04 before
    padded = np.zeros(E.stream_bytes(int(enc.lane_nbytes.astype(np.int64).sum())), np.uint8)
    body = enc.stream[:int(enc.lane_nbytes.astype(np.int64).sum())]
    padded[:body.shape[0]] = body
    lengths = E.package_merge_lengths(C.symbol_counts(words, 16, int(enc.header[5])), 14)
    again = E.assemble("bfloat16", words.shape[0], int(enc.header[4]), int(enc.header[5]), lengths,
                       enc.lane_nbytes.astype(np.int64), padded)
    assert again.stream is padded  # taken as it is, not copied
    assert all(np.array_equal(a, b) for a, b in zip(again.arrays().values(), enc.arrays().values()))


def test_every_bf16_exponent_and_special_value_round_trips() -> None:
    """All 256 exponents (0x00 subnormals, 0xFF Inf/NaN: unencodable in DFloat11) in one tensor."""
    exps = np.arange(256, dtype=np.uint16)
    words = np.concatenate([(exps << 7) | 0x15, (exps << 7) | 0x8000 | 0x7F,
                            np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7FC1, 0xFFFF, 0x0001, 0x807F],
                                     dtype=np.uint16), weights_like(5000, "bfloat16")])
    enc = C.encode(words, "bfloat16", lane_size=256)
    assert np.array_equal(C.decode(enc), words)
    t = torch.from_numpy(words.view(np.int16)).view(torch.bfloat16)
    enc2, _ = encode_tensor(t, block_size=1024)
    back = decode_tensor(enc2)
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))


@pytest.mark.parametrize("words", [np.zeros(0, np.uint16), np.zeros(1, np.uint16), np.full(9999, 0x3F80, np.uint16),
                                   np.array([0x7FC0] * 7 + [0xFFC0], np.uint16)])
def test_degenerate_tensors(words: np.ndarray) -> None:
    """Empty, one element, one distinct value (a 1-bit code), two values."""
    enc = C.encode(words, "bfloat16", lane_size=1000)
    assert np.array_equal(C.decode(enc), words)
    assert np.array_equal(E.decode_reference(enc), words)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_lockstep_and_tail_paths(dtype: str) -> None:
    """Full blocks (four lanes in lockstep), a partial last block, lane sizes not divisible by the step."""
    for n, lane in [(4 * 301, 301), (4 * 301 + 5, 301), (8 * 257 - 1, 257), (3 * 64, 64)]:
        words = weights_like(n, dtype, seed=n)
        enc = C.encode(words, dtype, lane_size=lane)
        assert np.array_equal(C.decode(enc), words)


def test_trained_weights_beat_the_exponent_bound() -> None:
    words = weights_like(200_000, "bfloat16")
    enc = C.encode(words, "bfloat16", lane_size=16384)
    bits = enc.nbytes * 8 / words.size
    bound = E.exponent_entropy_bits(words, "bfloat16")
    assert bits < bound, (bits, bound)  # joint sign/exponent/mantissa-top coding goes below it


@pytest.mark.parametrize("mant,raw_sign", [(0, False), (2, False), (0, True)])
def test_multi_code_tables_match_the_one_code_table(mant: int, raw_sign: bool) -> None:
    """Every entry of both multi-code tables holds exactly the whole codes (at most 2 or 4) that a one-code
    table decodes from its index bits, their bit count and their number (0: first code too long); the
    exponent-only symbol takes the four-code table, the default symbol the pair table; both decode exactly.
    With the sign stored raw (DFloat11's layout) the exponent-only codes are shorter: more codes per lookup."""
    words = weights_like(60000, "bfloat16", seed=mant)
    words[:6] = [0x7F80, 0xFFC1, 0x0001, 0x8000, 0x4700, 0x3F80]  # Inf, NaN, subnormal, -0, large: long codes
    enc = C.encode(words, "bfloat16", lane_size=4096, sym_mant_bits=mant, raw_sign=raw_sign)
    plan = E.validate(enc)
    assert plan.raw_sign == raw_sign
    tmask = (1 << plan.table_bits) - 1
    free = plan.raw_bits - raw_sign    # the low bits below the symbol (the sign bit sits above it when raw)
    keep = ~((1 << free) - 1) & 0xFFFF
    for p_bits, max_codes, entry_type in (E.PAIR_TABLE, E.QUAD_TABLE):
        table = E.multi_code_table(plan.lut, plan.table_bits, free, p_bits, max_codes, entry_type)
        assert table.dtype == entry_type and table.shape == (1 << p_bits,)
        for idx in range(1 << p_bits):
            used, got = 0, []
            while len(got) < max_codes:
                e = int(plan.lut[(idx >> used) & tmask])
                if used + (e & 15) > p_bits:
                    break
                got.append(e & keep)
                used += e & 15
            entry = int(table[idx])
            expect = sum(w << (16 * i) for i, w in enumerate(got)) | used | (len(got) << 16)
            assert entry == expect, (p_bits, idx)
    assert plan.multi_lut.dtype == (np.uint64 if mant == 0 else np.uint32)
    assert E.codes_per_lookup(plan.multi_lut) > (3.3 if raw_sign else 2.5 if mant == 0 else 1.5)
    assert np.array_equal(C.decode(enc), words)


@pytest.mark.parametrize("raw_bits,raw_sign", [(r, False) for r in range(4, 11)] + [(r, True) for r in range(5, 11)])
def test_raw_bit_passes_match_numpy(raw_bits: int, raw_sign: bool) -> None:
    """Both raw-bit passes of the CPU decoder (shift-and-mask, and BMI2 pdep where this CPU has a fast one)
    set exactly the low R bits of every word from the packed raw section (with ``raw_sign``: the low R - 1 bits
    and the sign bit from the field's top bit; R >= 5 then, so that 4 low bits hold the code length), leaving the
    other bits alone."""
    rng = np.random.default_rng(raw_bits)
    count, start = 1003, 3
    stream = rng.integers(0, 256, size=start + (count * raw_bits + 7) // 8 + 16, dtype=np.uint8)
    bits = np.unpackbits(stream[start:], bitorder="little")[: count * raw_bits].reshape(count, raw_bits)
    raw = (bits.astype(np.int64) << np.arange(raw_bits)).sum(axis=1)
    before = rng.integers(0, 1 << 16, size=count + 5, dtype=np.uint16)
    if raw_sign:
        low = (1 << (raw_bits - 1)) - 1
        field, raw = 0x8000 | low, (raw & low) | ((raw >> (raw_bits - 1)) << 15)
    else:
        field = (1 << raw_bits) - 1
    expect = before.copy()
    expect[2:2 + count] = (before[2:2 + count] & (~field & 0xFFFF)) | raw
    variants = [C._raw16_swar] + ([C._raw16_pdep] if C._fast_pdep() else [])
    for fn in variants:
        out = before.copy()
        fn(stream, start, 2, count, raw_bits, raw_sign, out)
        assert np.array_equal(out, expect), fn


def test_threads_give_identical_results() -> None:
    import numba

    words = weights_like(100_000, "bfloat16")
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = C.encode(words, "bfloat16", lane_size=2048)
        da = C.decode(a)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        b = C.encode(words, "bfloat16", lane_size=2048)
        db = C.decode(b)
    finally:
        numba.set_num_threads(before)
    assert all(np.array_equal(x, y) for x, y in zip(a.arrays().values(), b.arrays().values()))
    assert np.array_equal(da, words) and np.array_equal(db, words)


# ---------------------------------------------------------------------------------------------------
# Validation and fuzzing.

def _sample() -> tuple[np.ndarray, E.Encoded]:
    words = weights_like(6000, "bfloat16", seed=7)
    return words, C.encode(words, "bfloat16", lane_size=500)


def _replace(enc: E.Encoded, **arrays: np.ndarray) -> E.Encoded:
    d = {k: v.copy() for k, v in enc.arrays().items()}
    d.update(arrays)
    return E.Encoded(**d)


def test_clear_errors_for_bad_headers() -> None:
    _, enc = _sample()
    h = enc.header.copy()
    h[1] = 99
    with pytest.raises(CorruptData, match="format version 99 is not supported"):
        C.decode(_replace(enc, header=h))
    h = enc.header.copy()
    h[0] = 0
    with pytest.raises(CorruptData, match="not a modelpress lossless tensor"):
        C.decode(_replace(enc, header=h))
    with pytest.raises(CorruptData, match="must be a 1-D int32"):
        C.decode(_replace(enc, lane_nbytes=enc.lane_nbytes.astype(np.int64)))


@pytest.mark.parametrize("field", ["header", "codebook", "lane_nbytes", "checksums", "stream"])
def test_truncation_is_detected(field: str) -> None:
    _, enc = _sample()
    a = enc.arrays()[field]
    for cut in (1, a.shape[0] // 2, a.shape[0]):
        with pytest.raises(CorruptData):
            C.decode(_replace(enc, **{field: a[: a.shape[0] - cut].copy()}))


def test_random_bit_flips_are_detected_or_harmless() -> None:
    """Flip random bits anywhere: CorruptData, or (padding bytes only) the exact original output."""
    words, enc = _sample()
    rng = np.random.default_rng(0)
    names = list(enc.arrays())
    detected = 0
    for trial in range(300):
        name = names[trial % len(names)]
        a = enc.arrays()[name].copy()
        raw = a.view(np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, raw.size))
            raw[i] ^= np.uint8(1 << int(rng.integers(0, 8)))
        try:
            out = C.decode(_replace(enc, **{name: a}))
        except CorruptData:
            detected += 1
            continue
        assert np.array_equal(out, words), name
    assert detected >= 280


def test_kernel_is_safe_on_corrupt_data_that_skips_checksums() -> None:
    """Without the crc check, corrupt streams must still never crash or read out of bounds: the kernel
    clamps its reads and reports lanes that end in the wrong place."""
    words, enc = _sample()
    rng = np.random.default_rng(1)
    caught = 0
    for _ in range(200):
        s = enc.stream.copy()
        body = int(enc.lane_nbytes.astype(np.int64).sum())
        for i in rng.integers(0, body, size=int(rng.integers(1, 30))):
            s[int(i)] = np.uint8(rng.integers(0, 256))
        try:
            out = C.decode(_replace(enc, stream=s), verify_checksums=False)
        except CorruptData:
            caught += 1
            continue
        assert out.shape == words.shape
    # a garbage stream where every byte is 0xFF: each lane is read past its end, clamped, and reported
    with pytest.raises(CorruptData, match="do not end where"):
        C.decode(_replace(enc, stream=np.full_like(enc.stream, 0xFF)), verify_checksums=False)
    assert caught > 100


@pytest.mark.parametrize("forge", ["lane_nbytes", "codebook"])
def test_forged_tables_with_valid_meta_crc_are_rejected(forge: str) -> None:
    """Tables that pass the meta checksum (recomputed by an attacker) still go through the range checks."""
    _, enc = _sample()
    d = {k: v.copy() for k, v in enc.arrays().items()}
    if forge == "lane_nbytes":
        d["lane_nbytes"][0] = 2**31 - 1
    else:
        d["codebook"][:] = 0x11  # every used length 1: Kraft sum > 1
    h = d["header"]
    h[11] = E._crc(h[:11], d["codebook"], d["lane_nbytes"])
    with pytest.raises(CorruptData):
        C.decode(E.Encoded(**d))


# ---------------------------------------------------------------------------------------------------
# The pass and the compressed modules.

def _tiny_bert() -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _run(handle: ModelHandle, **cfg: object) -> tuple[ModelHandle, Context]:
    ctx = Context(show_progress=False)
    return DFloat11(DFloat11.Config(**cfg)).apply(handle, ctx), ctx


@pytest.mark.parametrize("dtype,raw_sign", [("bfloat16", False), ("float16", False), ("float32", False),
                                            ("bfloat16", True)])
def test_pass_outputs_are_bit_identical(dtype: str, raw_sign: bool) -> None:
    """Outputs bit-identical to the uncoded model on the decode path, close on the fused one; ``raw_sign`` (with
    ``mantissa_bits: 0``: DFloat11's layout) writes format version 6."""
    m = _tiny_bert()
    ref = _tiny_bert().to(getattr(torch, dtype))
    handle = ModelHandle(m, "encoder", "tiny", describe_architecture(m))
    out, ctx = _run(handle, dtype=dtype, min_elements=1024, block_size=4096, fused_rows=256,
                    **({"raw_sign": True, "mantissa_bits": 0} if raw_sign else {}))
    mod = out.module
    assert int(mod.encoder.layer[0].attention.self.query.df11_header[1]) == (6 if raw_sign else 3)
    assert isinstance(mod.embeddings.word_embeddings, LosslessEmbedding)
    assert isinstance(mod.encoder.layer[0].attention.self.query, LosslessLinear)
    assert not any(isinstance(x, nn.Linear) and x.weight.numel() >= 1024 for x in mod.modules())
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        fused = mod(input_ids=ids, attention_mask=mask).last_hidden_state   # 24 rows: the fused kernels
        for lin in mod.modules():
            if isinstance(lin, LosslessLinear):
                lin.fused_max_rows = 0   # decode + F.linear: torch's own summation order
        a = mod(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert a.dtype == getattr(torch, dtype) and torch.equal(a, b)
    # the fused kernels sum in another order (float32 both): equal up to rounding, through 2 layers + LayerNorm
    assert fused.dtype == a.dtype and torch.allclose(fused.float(), b.float(), rtol=0, atol=0.05 if dtype != "float32" else 1e-4)
    log = ctx.log["dfloat11"]
    # 12 encoder Linears, the pooler, word and position embeddings (token types: 128 elements, left raw)
    assert log["modules"] == 2 * 6 + 3 and log["cast_from"] == (None if dtype == "float32" else ["float32"])
    assert log["coded_bytes"] < log["dense_bytes"]


def test_only_compressed_weights_are_kept() -> None:
    """Peak memory: the module keeps the encoded buffers only; the dense weight lives during forward."""
    m = _tiny_bert()
    out, _ = _run(ModelHandle(m, "encoder", "tiny", describe_architecture(m)), min_elements=1024, block_size=4096)
    q = out.module.encoder.layer[0].attention.self.query
    names = {k for k, _ in q.named_buffers()} | {k for k, _ in q.named_parameters()}
    assert names == {"df11_header", "df11_codebook", "df11_lane_nbytes", "df11_checksums", "df11_stream", "bias"}
    assert q.compressed_bytes() < 0.85 * q.weight_shape[0] * q.weight_shape[1] * 2
    assert "weight" not in q.__dict__ and not hasattr(q, "_decoded")


def test_cast_false_refuses_a_mismatched_model() -> None:
    m = _tiny_bert()
    with pytest.raises(UserError, match="set cast: true"):
        _run(ModelHandle(m, "encoder", "tiny", describe_architecture(m)), cast=False)


def test_conv2d_and_tied_weights() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, padding=1, stride=2)
            self.emb = nn.Embedding(100, 64)
            self.head = nn.Linear(64, 100, bias=False)
            self.head.weight = self.emb.weight  # tied: coded once, shared

        def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return self.conv(x).sum() + self.head(self.emb(ids)).sum()

    torch.manual_seed(0)
    net = Net().to(torch.bfloat16)
    x = torch.randn(2, 8, 9, 9).to(torch.bfloat16)
    ids = torch.randint(0, 100, (3, 5))
    with torch.no_grad():
        conv_ref = net.conv(x)
        net_head_ref = net.head(net.emb(ids))
    handle = ModelHandle(net, "unet", "tiny", {})
    out, ctx = _run(handle, min_elements=64)
    assert isinstance(out.module.conv, LosslessConv2d)
    assert ctx.log["dfloat11"]["tied_shared"] == {"head": "emb"} and ctx.log["dfloat11"]["tied_skipped"] == []
    assert out.module.head.df11_stream is out.module.emb.df11_stream
    with torch.no_grad():
        assert torch.equal(out.module.head(out.module.emb(ids)), net_head_ref)
    with torch.no_grad():
        assert torch.equal(out.module.conv(x), conv_ref)
    cfg = out.module.conv.module_config()
    fresh = LosslessConv2d.from_module_config(cfg)
    fresh.load_state_dict(out.module.conv.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), conv_ref)


def test_artifact_round_trip(tmp_path: Path) -> None:
    from modelpress.artifact import load_artifact, write_artifact

    m = _tiny_bert()
    ref = _tiny_bert().to(torch.bfloat16)
    out, ctx = _run(ModelHandle(m, "encoder", "tiny", describe_architecture(m)), min_elements=1024, block_size=4096)
    write_artifact(tmp_path / "a", out, pass_log=ctx.log)
    loaded = load_artifact(tmp_path / "a")
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = loaded.module(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        b = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.equal(a, b)
    # a corrupted artifact tensor is a clear error at first use, not a crash
    q = loaded.module.encoder.layer[1].output.dense
    q.df11_stream[10] ^= 0x40
    q.after_load()
    with pytest.raises(CorruptData, match="crc32"):
        q(torch.zeros(1, 128, dtype=torch.bfloat16))


def test_recipe_runs_end_to_end(tmp_path: Path, tiny_classifier_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from modelpress.artifact import load_artifact, read_manifest
    from modelpress.model import example_inputs, load_checkpoint
    from modelpress.pipeline import run_recipe

    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "lossless.yaml").read_text())
    recipe["model"] = str(tiny_classifier_dir)
    recipe["passes"][0]["min_elements"] = 1024
    recipe.pop("evaluate", None)
    recipe.pop("export", None)
    recipe["output"] = "out"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    art = run_recipe(tmp_path / "r.yaml", export=False, evaluate=False, show_progress=False)
    manifest = read_manifest(art)
    assert any(e["class"] == "LosslessLinear" for e in manifest["compressed_modules"])
    handle = load_artifact(art)
    original = load_checkpoint(tiny_classifier_dir)
    original.module.to(torch.bfloat16)
    inputs = example_inputs(handle, seq_len=8)
    with torch.no_grad():
        assert torch.equal(handle.canonical()(*inputs), original.canonical()(*inputs))


def test_materialize_rebuilds_plain_layers_for_export() -> None:
    """Exporters see the decoded model: plain nn layers, same outputs bit for bit."""
    from modelpress.modules import compressed_modules, materialize

    m = _tiny_bert()
    handle = ModelHandle(m, "encoder", "tiny", describe_architecture(m))
    out, _ = _run(handle, dtype="bfloat16", min_elements=1024, block_size=4096)
    plain = materialize(out.module)
    assert not compressed_modules(plain) and compressed_modules(out.module)
    assert isinstance(plain.encoder.layer[0].attention.self.query, nn.Linear)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask).last_hidden_state
        b = out.module(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)
