"""numba CPU encoder and decoder of the lossless float format (see :mod:`modelpress.kernels.entropy`).

Both run in parallel over blocks (``numba.prange``; set the thread count with ``numba.set_num_threads``).
The decoder decodes the four lanes of a block in lockstep: four independent dependency chains (table
lookup -> code length -> next bit position) keep the core busy where one lane would wait on loads.
Inputs come only from :func:`entropy.validate`; the decoder still clamps every word index it reads, so
even data that passed a forged checksum cannot read outside the stream, and it reports lanes that end in
the wrong place or hit an invalid code through ``status``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..errors import CorruptData
from . import entropy as E

_U1 = np.uint64(1)
_U63 = np.uint64(63)


@njit(cache=True, inline="always")
def _peek(a64, p, wmax):
    """64 stream bits starting at bit ``p`` (LSB first); the word index is clamped to ``wmax``."""
    w = p >> 6
    if w > wmax:
        w = wmax
    s = np.uint64(p & 63)
    return (a64[w] >> s) | ((a64[w + 1] << _U1) << (_U63 - s))


@njit(cache=True, inline="always")
def _step(bits, lut, tmask, rbits, rmask):
    """Decode one weight from the low bits of ``bits``: ``(word, bits consumed, remaining bits)``.

    Validated codes are complete (Kraft sum 1), so every table entry is a valid code: no check here.
    """
    e = np.uint64(lut[(bits >> rbits) & tmask])
    length = e & np.uint64(15)
    d = rbits + length
    return (e ^ length) | (bits & rmask), np.int64(d), bits >> d


@njit(cache=True, inline="always")
def _lane_end_ok(p, end_bit):
    return end_bit - 8 < p <= end_bit


@njit(cache=True, parallel=True)
def decode_kernel(a64, lane_start, lane_size, n, lut, tmask, raw_bits, steps, out, status):
    """Decode every lane into ``out`` (uint16 or uint32); ``status[k]`` != 0 marks a lane that does not end
    where its byte length says (corrupt data).

    ``steps`` weights are decoded from each 64-bit read (``steps * (raw_bits + max code length) <= 64``).
    """
    n_lanes = lane_start.shape[0] - 1
    n_blocks = (n_lanes + 3) // 4
    wmax = a64.shape[0] - 2
    rbits = np.uint64(raw_bits)
    rmask = np.uint64((1 << raw_bits) - 1)
    ls = np.uint64(lane_size)
    for b in prange(n_blocks):
        k0 = 4 * b
        if k0 + 3 < n_lanes - 1 or (k0 + 3 == n_lanes - 1 and n == n_lanes * lane_size):
            # four full lanes in lockstep: four independent dependency chains
            p0 = lane_start[k0] * 8
            p1 = lane_start[k0 + 1] * 8
            p2 = lane_start[k0 + 2] * 8
            p3 = lane_start[k0 + 3] * 8
            o = np.uint64(k0) * ls
            o1 = o + ls
            o2 = o1 + ls
            o3 = o2 + ls
            nchunks = lane_size // steps
            for c in range(nchunks):
                b0 = _peek(a64, p0, wmax)
                b1 = _peek(a64, p1, wmax)
                b2 = _peek(a64, p2, wmax)
                b3 = _peek(a64, p3, wmax)
                for _ in range(steps):
                    v0, d0, b0 = _step(b0, lut, tmask, rbits, rmask)
                    v1, d1, b1 = _step(b1, lut, tmask, rbits, rmask)
                    v2, d2, b2 = _step(b2, lut, tmask, rbits, rmask)
                    v3, d3, b3 = _step(b3, lut, tmask, rbits, rmask)
                    out[o] = v0
                    out[o1] = v1
                    out[o2] = v2
                    out[o3] = v3
                    p0 += d0
                    p1 += d1
                    p2 += d2
                    p3 += d3
                    o += _U1
                    o1 += _U1
                    o2 += _U1
                    o3 += _U1
            for _ in range(lane_size - nchunks * steps):
                v0, d0, _b = _step(_peek(a64, p0, wmax), lut, tmask, rbits, rmask)
                v1, d1, _b = _step(_peek(a64, p1, wmax), lut, tmask, rbits, rmask)
                v2, d2, _b = _step(_peek(a64, p2, wmax), lut, tmask, rbits, rmask)
                v3, d3, _b = _step(_peek(a64, p3, wmax), lut, tmask, rbits, rmask)
                out[o] = v0
                out[o1] = v1
                out[o2] = v2
                out[o3] = v3
                p0 += d0
                p1 += d1
                p2 += d2
                p3 += d3
                o += _U1
                o1 += _U1
                o2 += _U1
                o3 += _U1
            ends = (p0, p1, p2, p3)
            for j in range(4):
                if not _lane_end_ok(ends[j], lane_start[k0 + j + 1] * 8):
                    status[k0 + j] = 1
        else:
            for k in range(k0, min(k0 + 4, n_lanes)):
                p = lane_start[k] * 8
                o = np.uint64(k) * ls
                for _ in range(min(lane_size, n - k * lane_size)):
                    v, d, _b = _step(_peek(a64, p, wmax), lut, tmask, rbits, rmask)
                    out[o] = v
                    p += d
                    o += _U1
                if not _lane_end_ok(p, lane_start[k + 1] * 8):
                    status[k] = 1


@njit(cache=True, parallel=True)
def histogram_kernel(words, raw_bits, n_sym, chunk):
    """Symbol histogram (``words >> raw_bits``), in parallel over chunks."""
    n = words.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    part = np.zeros((n_chunks, n_sym), dtype=np.int64)
    for c in prange(n_chunks):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            part[c, np.int64(words[i]) >> raw_bits] += 1
    return part.sum(axis=0)


@njit(cache=True, parallel=True)
def lane_bits_kernel(words, lane_size, lengths, raw_bits, out_bits):
    """Bits each lane will take."""
    n = words.shape[0]
    n_lanes = out_bits.shape[0]
    for k in prange(n_lanes):
        s = 0
        for i in range(k * lane_size, min(n, (k + 1) * lane_size)):
            s += lengths[np.int64(words[i]) >> raw_bits] + raw_bits
        out_bits[k] = s


@njit(cache=True, parallel=True)
def encode_kernel(words, lane_size, lengths, rcodes, raw_bits, lane_start, body):
    """Write every lane's bits at its byte offset in ``body``."""
    n = words.shape[0]
    n_lanes = lane_start.shape[0] - 1
    rmask = (1 << raw_bits) - 1
    for k in prange(n_lanes):
        pos = lane_start[k]
        acc = np.uint64(0)
        nacc = 0
        for i in range(k * lane_size, min(n, (k + 1) * lane_size)):
            w = np.int64(words[i])
            s = w >> raw_bits
            ln = lengths[s]
            acc |= np.uint64((w & rmask) | (rcodes[s] << raw_bits)) << np.uint64(nacc)
            nacc += ln + raw_bits
            while nacc >= 8:
                body[pos] = np.uint8(acc & np.uint64(0xFF))
                acc >>= np.uint64(8)
                nacc -= 8
                pos += 1
        if nacc > 0:
            body[pos] = np.uint8(acc & np.uint64(0xFF))


def symbol_counts(words: np.ndarray, word_bits: int, sym_bits: int) -> np.ndarray:
    """Histogram of the coded symbols of ``words``."""
    if words.shape[0] == 0:
        return np.zeros(1 << sym_bits, dtype=np.int64)
    return histogram_kernel(words, word_bits - sym_bits, 1 << sym_bits, 1 << 20)


def encode(words: np.ndarray, dtype: str, lane_size: int = 16384, sym_mant_bits: int = 2,
           max_len: int = 14, counts: np.ndarray | None = None) -> E.Encoded:
    """Encode raw float bit patterns (``words``: uint16 for bf16/fp16, uint32 for fp32); ``counts`` (the
    symbol histogram, from :func:`symbol_counts`) is computed when not given."""
    _, word_bits, _ = E.DTYPES[dtype]
    words = np.ascontiguousarray(words.reshape(-1)).view(E.WORD_DTYPE[word_bits])
    sym_bits = E.symbol_bits(dtype, sym_mant_bits, max_len)
    if counts is None:
        counts = symbol_counts(words, word_bits, sym_bits)
    lengths = E.package_merge_lengths(counts, max_len)
    rcodes = E.reverse_bits(E.canonical_codes(lengths), lengths)
    n = words.shape[0]
    n_lanes, _, _ = E.lane_layout(n, lane_size)
    bits = np.zeros(n_lanes, dtype=np.int64)
    lengths64 = lengths.astype(np.int64)
    if n:
        lane_bits_kernel(words, lane_size, lengths64, word_bits - sym_bits, bits)
    nbytes = (bits + 7) // 8
    lane_start = np.concatenate([[0], np.cumsum(nbytes)]).astype(np.int64)
    body = np.zeros(int(lane_start[-1]), dtype=np.uint8)
    if n:
        encode_kernel(words, lane_size, lengths64, rcodes, word_bits - sym_bits, lane_start, body)
    return E.assemble(dtype, n, lane_size, sym_bits, lengths, nbytes, body)


def decode_plan(plan: E.Plan, out: np.ndarray | None = None, where: str = "lossless tensor") -> np.ndarray:
    """Decode a validated plan into ``out`` (or a new array) of raw bit patterns."""
    wd = E.WORD_DTYPE[plan.word_bits]
    if out is None:
        out = np.empty(plan.n, dtype=wd)
    if out.dtype != wd or out.shape != (plan.n,) or not out.flags.c_contiguous:
        raise ValueError(f"output must be a contiguous {np.dtype(wd).name}[{plan.n}] array")
    if plan.n == 0:
        return out
    status = np.zeros(plan.lane_count.shape[0], dtype=np.int32)
    steps = 64 // (plan.raw_bits + plan.table_bits)
    decode_kernel(plan.stream64, plan.lane_start, plan.lane_size, plan.n, plan.lut,
                  np.uint64((1 << plan.table_bits) - 1), plan.raw_bits, steps, out, status)
    bad = np.nonzero(status)[0]
    if bad.size:
        raise CorruptData(f"{bad.size} lanes do not end where their byte lengths say "
                          f"(first: lane {int(bad[0])})", where)
    return out


def decode(enc: E.Encoded, out: np.ndarray | None = None, verify_checksums: bool = True,
           where: str = "lossless tensor") -> np.ndarray:
    """Validate ``enc`` and decode it; raises :class:`CorruptData` for anything inconsistent."""
    return decode_plan(E.validate(enc, verify_checksums, where), out, where)
