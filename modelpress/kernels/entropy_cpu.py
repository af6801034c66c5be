"""numba CPU encoder and decoder of the lossless float format (see :mod:`modelpress.kernels.entropy`).

Both run in parallel over blocks (``numba.prange``; set the thread count with ``numba.set_num_threads``).

Decoding a lane takes two passes over its output (see the format in :mod:`entropy`):

1. *codes*: the code section is a pure prefix-code stream. For 16-bit words one lookup in a two-code table
   (:func:`entropy.pair_table`, 16 KiB) resolves the next one or two codes and gives both output words with
   their raw bits zero; both are written with one 32-bit store and the output index advances by one or two
   (the second word is overwritten by the next lookup when only one code was resolved). A code longer than
   the pair table's 12 bits falls back to the full one-code table. 64 stream bits are loaded per
   ``57 // max code length`` lookups (one unaligned load and a shift), and a thread decodes the four lanes
   of a block in lockstep (four independent dependency chains). 32-bit words use the one-code table.
2. *raw bits*: the raw section holds ``R`` bits per weight at fixed offsets, so eight weights' raw bits are
   ``R`` bytes; they are spread to 16-bit lanes with shifts and masks and OR-ed into the output four words
   at a time, branch-free.

Safety: inputs come only from :func:`entropy.validate` (lane offsets consistent with the stream length,
codes complete). The fast loop runs only while every 64-bit read it can make lies inside the stream and
while every lane has room for the words it can write; the rest of a lane is decoded one code at a time
with clamped reads. So no stream content, even with forged checksums, can read or write out of bounds; a
lane whose codes do not end where its byte length says is reported through ``status``.

Threads: numba's default threading layer here is OpenMP, whose worker threads spin-wait; with more runnable
threads than cores (a shared machine) that spinning steals the cores from the threads doing the work, and
every parallel region waits for all of its threads to be scheduled. So this module asks OpenMP for passive
waiting (``OMP_WAIT_POLICY=PASSIVE``, unless the user set it); this only takes effect if no OpenMP runtime
was started before (``import torch`` starts one: set the variable in the environment, or
``NUMBA_THREADING_LAYER=workqueue`` for single-threaded callers). :func:`decode_plan` also decodes a tensor on
the calling thread unless it has at least ``PARALLEL_MIN_BLOCKS_PER_THREAD`` blocks per thread (8 blocks =
512K weights, about half a millisecond of work), so small tensors never pay for waking threads.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before numba's OpenMP runtime starts (see docstring)

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from ..errors import CorruptData  # noqa: E402
from . import entropy as E  # noqa: E402

_U1 = np.uint64(1)
_U15 = np.uint64(15)
_U16 = np.uint64(16)
_U32 = np.uint64(32)
_LONG = np.uint64(0x20000)
#: a tensor is decoded in parallel only with at least this many blocks (64K weights each) per thread
PARALLEL_MIN_BLOCKS_PER_THREAD = 8  # pair-table flag: the first code is longer than the pair table's index


# ---------------------------------------------------------------------------------------------------
# Unaligned loads and stores (x86 and ARMv8 allow them; numba has no other way to express them).

@intrinsic
def _load64(typingctx, arr, idx):
    """The 8 bytes starting at element ``idx`` of a contiguous array, as a uint64 (no bounds check)."""
    sig = types.uint64(arr, idx)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(64).as_pointer())
        return builder.load(ptr, align=1)
    return sig, codegen


def _unaligned_store(width: int):
    """An intrinsic ``store(arr, idx, val)``: the low ``width`` bits of ``val`` at element ``idx``, no
    bounds check."""
    @intrinsic
    def store(typingctx, arr, idx, val):
        sig = types.void(arr, idx, val)

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(width).as_pointer())
            v = args[2] if width == 64 else builder.trunc(args[2], ir.IntType(width))
            builder.store(v, ptr, align=1)
            return context.get_dummy_value()
        return sig, codegen
    return store


_store32 = _unaligned_store(32)
_store64 = _unaligned_store(64)


@njit(cache=True, inline="always")
def _bits_at(stream, p, last):
    """64 stream bits from bit ``p`` (at least 57 valid), the byte index clamped to ``last``."""
    b = p >> 3
    if b > last:
        b = last
    return _load64(stream, b) >> np.uint64(p & 7)


# ---------------------------------------------------------------------------------------------------
# Pass 1: codes.

@njit(cache=True, boundscheck=False)
def _codes_one_by_one(stream, p, o, o_end, lut, tmask, out):
    """Decode codes with the one-code table from bit ``p`` into ``out[o:o_end]`` (clamped reads);
    returns the bit position after the last code."""
    last = stream.shape[0] - 8
    while o < o_end:
        e = np.uint64(lut[_bits_at(stream, p, last) & tmask])
        d = e & _U15
        out[o] = e ^ d
        p += np.int64(d)
        o += 1
    return p


@intrinsic
def _clz64(typingctx, val):
    """Leading zero bits of a uint64."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, sig, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))
    return sig, codegen


@njit(cache=True, inline="always")
def _fill(stream, p):
    """56 stream bits from bit ``p`` with a sentinel one bit above them: after the chunk has shifted out its
    codes, ``(p & ~7) + clz(bits)`` is the new bit position (so ``p`` is not updated per code)."""
    s = np.uint64(p & 7)
    return (_load64(stream, p >> 3) >> s) | (np.uint64(1) << (np.uint64(63) - s))


@njit(cache=True, boundscheck=False)
def _codes_pairs4(stream, p0, p1, p2, p3, o0, o1, o2, o3, n_out, pair, lut, tmask, out):
    """Four lanes in lockstep with the 12-bit two-code table, four lookups per lane per 64-bit read (codes
    of at most 14 bits); stops when a lane has fewer than 8 words left of its ``n_out`` or a read could
    leave the stream. The words are written with their low ``R`` bits holding table fields; the raw pass
    overwrites those bits. Returns the four bit positions and output indices reached."""
    pmax = (stream.shape[0] - 8) * 8
    e0, e1, e2, e3 = o0 + n_out - 8, o1 + n_out - 8, o2 + n_out - 8, o3 + n_out - 8
    pm = np.uint64((1 << E.PAIR_TABLE_MAX_BITS) - 1)
    m7 = ~np.int64(7)
    while o0 <= e0 and o1 <= e1 and o2 <= e2 and o3 <= e3 and max(max(p0, p1), max(p2, p3)) <= pmax:
        b0 = _fill(stream, p0)
        b1 = _fill(stream, p1)
        b2 = _fill(stream, p2)
        b3 = _fill(stream, p3)
        for _ in range(4):
            x0 = np.uint64(pair[b0 & pm])
            x1 = np.uint64(pair[b1 & pm])
            x2 = np.uint64(pair[b2 & pm])
            x3 = np.uint64(pair[b3 & pm])
            if x0 & _LONG:
                x0 = np.uint64(lut[b0 & tmask])
            if x1 & _LONG:
                x1 = np.uint64(lut[b1 & tmask])
            if x2 & _LONG:
                x2 = np.uint64(lut[b2 & tmask])
            if x3 & _LONG:
                x3 = np.uint64(lut[b3 & tmask])
            _store32(out, o0, x0)
            _store32(out, o1, x1)
            _store32(out, o2, x2)
            _store32(out, o3, x3)
            b0 >>= x0 & _U15
            b1 >>= x1 & _U15
            b2 >>= x2 & _U15
            b3 >>= x3 & _U15
            o0 += 1 + np.int64((x0 >> _U16) & _U1)
            o1 += 1 + np.int64((x1 >> _U16) & _U1)
            o2 += 1 + np.int64((x2 >> _U16) & _U1)
            o3 += 1 + np.int64((x3 >> _U16) & _U1)
        p0 = (p0 & m7) + _clz64(b0)
        p1 = (p1 & m7) + _clz64(b1)
        p2 = (p2 & m7) + _clz64(b2)
        p3 = (p3 & m7) + _clz64(b3)
    return p0, p1, p2, p3, o0, o1, o2, o3


@njit(cache=True, boundscheck=False)
def _codes_pairs1(stream, p, o, o_end, pair, lut, tmask, out):
    """One lane with the two-code table (what :func:`_codes_pairs4` leaves of a lane that is behind the
    others); stops 8 words before ``o_end`` or when a read could leave the stream. Returns ``(p, o)``."""
    pmax = (stream.shape[0] - 8) * 8
    pm = np.uint64((1 << E.PAIR_TABLE_MAX_BITS) - 1)
    while o <= o_end - 8 and p <= pmax:
        b = _fill(stream, p)
        for _ in range(4):
            x = np.uint64(pair[b & pm])
            if x & _LONG:
                x = np.uint64(lut[b & tmask])
            _store32(out, o, x)
            b >>= x & _U15
            o += 1 + np.int64((x >> _U16) & _U1)
        p = (p & ~np.int64(7)) + _clz64(b)
    return p, o


@njit(cache=True, boundscheck=False)
def _codes_lockstep4(stream, p0, p1, p2, p3, o0, n_out, lane_size, lut, tmask, steps, out):
    """Four lanes in lockstep with the one-code table (32-bit words): every lane decodes ``steps`` codes per
    64-bit read; stops before the last ``steps`` words or when a read could leave the stream. Returns the
    four bit positions and the number of words decoded per lane."""
    pmax = (stream.shape[0] - 8) * 8
    i = 0
    o1, o2, o3 = o0 + lane_size, o0 + 2 * lane_size, o0 + 3 * lane_size
    while i + steps <= n_out and max(max(p0, p1), max(p2, p3)) <= pmax:
        b0 = _load64(stream, p0 >> 3) >> np.uint64(p0 & 7)
        b1 = _load64(stream, p1 >> 3) >> np.uint64(p1 & 7)
        b2 = _load64(stream, p2 >> 3) >> np.uint64(p2 & 7)
        b3 = _load64(stream, p3 >> 3) >> np.uint64(p3 & 7)
        for _ in range(steps):
            x0 = np.uint64(lut[b0 & tmask])
            x1 = np.uint64(lut[b1 & tmask])
            x2 = np.uint64(lut[b2 & tmask])
            x3 = np.uint64(lut[b3 & tmask])
            d0, d1, d2, d3 = x0 & _U15, x1 & _U15, x2 & _U15, x3 & _U15
            out[o0 + i] = x0 ^ d0
            out[o1 + i] = x1 ^ d1
            out[o2 + i] = x2 ^ d2
            out[o3 + i] = x3 ^ d3
            b0 >>= d0
            b1 >>= d1
            b2 >>= d2
            b3 >>= d3
            p0 += np.int64(d0)
            p1 += np.int64(d1)
            p2 += np.int64(d2)
            p3 += np.int64(d3)
            i += 1
    return p0, p1, p2, p3, i


# ---------------------------------------------------------------------------------------------------
# Pass 2: raw bits.

def _fast_pdep() -> bool:
    """Whether this CPU has a fast BMI2 ``pdep`` (x86 with bmi2, except AMD before Zen 3, where it is
    microcoded and slow)."""
    try:
        info = open("/proc/cpuinfo").read(20000)
    except OSError:
        return False
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    family = next((line.split(":")[1].strip() for line in info.splitlines() if line.startswith("cpu family")), "0")
    return " bmi2" in flags and not ("AuthenticAMD" in info and int(family) < 25)


@intrinsic
def _pdep64(typingctx, val, mask):
    """x86 BMI2 parallel bit deposit (only compiled where :func:`_fast_pdep` is true)."""
    sig = types.uint64(types.uint64, types.uint64)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn = builder.module.declare_intrinsic("llvm.x86.bmi.pdep.64", fnty=ir.FunctionType(i64, [i64, i64]))
        return builder.call(fn, args)
    return sig, codegen


@njit(cache=True, boundscheck=False)
def _raw16_pdep(stream, start, o, count, raw_bits, out):
    """:func:`_raw16_swar` with one ``pdep`` per four weights instead of the shift-and-mask steps."""
    f = (1 << raw_bits) - 1
    spread = np.uint64(f | (f << 16) | (f << 32) | (f << 48))
    keep4 = ~spread
    half = raw_bits // 2
    shift_hi = np.uint64(4 * raw_bits - 8 * half)
    for g in range(count // 8):
        at = start + g * raw_bits
        oo = o + 8 * g
        _store64(out, oo, (_load64(out, oo) & keep4) | _pdep64(_load64(stream, at), spread))
        _store64(out, oo + 4, (_load64(out, oo + 4) & keep4) | _pdep64(_load64(stream, at + half) >> shift_hi, spread))
    keep = np.uint16(~f & 0xFFFF)
    rmask = np.uint64(f)
    for i in range(count // 8 * 8, count):
        bp = start * 8 + i * raw_bits
        out[o + i] = (out[o + i] & keep) | ((_load64(stream, bp >> 3) >> np.uint64(bp & 7)) & rmask)


@njit(cache=True, boundscheck=False)
def _raw16_swar(stream, start, o, count, raw_bits, out):
    """Set the low ``R`` bits of 16-bit ``out[o:o + count]`` to the raw bits (raw section at byte ``start``).

    Eight weights' raw bits are ``R`` bytes; each half (four weights, ``4R <= 40`` bits) is spread to four
    16-bit lanes in two shift-and-mask steps and merged in with one 64-bit load and store.
    """
    r = np.uint64(raw_bits)
    two_r = np.uint64(2 * raw_bits)
    m_lo = np.uint64((1 << (2 * raw_bits)) - 1)            # fields 0, 1 stay, fields 2, 3 move to bit 32
    f = (1 << raw_bits) - 1
    m_f = np.uint64(f | (f << 32))                          # fields 0 and 2 stay, 1 and 3 move up 16 - R
    m_g = np.uint64((f << raw_bits) | (f << (32 + raw_bits)))
    up2 = np.uint64(16 - raw_bits)
    keep = (~((1 << raw_bits) - 1)) & 0xFFFF
    keep4 = np.uint64(keep | (keep << 16) | (keep << 32) | (keep << 48))
    half = raw_bits // 2
    shift_hi = np.uint64(4 * raw_bits - 8 * half)
    for g in range(count // 8):
        at = start + g * raw_bits
        for h in range(2):
            v = _load64(stream, at) if h == 0 else _load64(stream, at + half) >> shift_hi
            v = (v & m_lo) | (((v >> two_r) & m_lo) << _U32)
            v = (v & m_f) | ((v & m_g) << up2)
            oo = o + 8 * g + 4 * h
            _store64(out, oo, (_load64(out, oo) & keep4) | v)
    rmask = np.uint64((1 << raw_bits) - 1)
    for i in range(count // 8 * 8, count):
        bp = start * 8 + i * raw_bits
        out[o + i] = (out[o + i] & np.uint16(keep)) | ((_load64(stream, bp >> 3) >> np.uint64(bp & 7)) & rmask)


_raw16 = _raw16_pdep if _fast_pdep() else _raw16_swar


@njit(cache=True, boundscheck=False)
def _raw_generic(stream, start, o, count, raw_bits, out):
    """OR the raw bits of ``count`` weights into ``out[o:]`` one at a time (32-bit words)."""
    rmask = np.uint64((1 << raw_bits) - 1)
    bp = start * 8
    for i in range(count):
        out[o + i] |= (_load64(stream, bp >> 3) >> np.uint64(bp & 7)) & rmask
        bp += raw_bits


# ---------------------------------------------------------------------------------------------------
# One block (four lanes), and the kernels over blocks.

@njit(cache=True, boundscheck=False)
def _decode_block(b, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, pair, raw_bits, steps, out,
                  status):
    """Decode block ``b``: its full lanes' codes in lockstep (``steps`` codes per 64-bit read), then every
    lane's remaining codes one by one, its end check and its raw bits."""
    n_lanes = lane_start.shape[0] - 1
    k0 = 4 * b
    k_end = min(k0 + 4, n_lanes)
    ends = np.empty(4, dtype=np.int64)
    for j in range(4):  # code start of every lane; the last lanes of a partial block start empty
        k = min(k0 + j, n_lanes - 1)
        ends[j] = (lane_start[k] + raw_bytes[k]) * 8
    done = np.zeros(4, dtype=np.int64)
    if k_end - k0 == 4 and (k_end < n_lanes or n == n_lanes * lane_size):
        o0 = k0 * lane_size
        if out.itemsize == 2 and steps >= 4:
            r = _codes_pairs4(stream, ends[0], ends[1], ends[2], ends[3], o0, o0 + lane_size,
                              o0 + 2 * lane_size, o0 + 3 * lane_size, lane_size, pair, lut, tmask, out)
            for j in range(4):
                o = o0 + j * lane_size
                ends[j], o = _codes_pairs1(stream, r[j], r[4 + j], o + lane_size, pair, lut, tmask, out)
                done[j] = o - (o0 + j * lane_size)
        else:
            r = _codes_lockstep4(stream, ends[0], ends[1], ends[2], ends[3], o0, lane_size, lane_size, lut,
                                 tmask, steps, out)
            for j in range(4):
                ends[j] = r[j]
                done[j] = r[4]
    for j in range(k_end - k0):
        k = k0 + j
        o = k * lane_size
        count = min(lane_size, n - o)
        p = _codes_one_by_one(stream, ends[j], o + done[j], o + count, lut, tmask, out)
        end_bit = lane_start[k + 1] * 8
        if not end_bit - 8 < p <= end_bit:
            status[k] = 1
        if out.itemsize == 2:
            _raw16(stream, lane_start[k], o, count, raw_bits, out)
        else:
            _raw_generic(stream, lane_start[k], o, count, raw_bits, out)


@njit(cache=True, parallel=True)
def decode_kernel(stream, lane_start, raw_bytes, lane_size, n, lut, tmask, pair, raw_bits, steps, out,
                  status):
    """Decode every block into ``out`` (uint16 or uint32), in parallel over blocks; ``status[k]`` != 0 marks a
    lane whose codes do not end where its byte length says (corrupt data)."""
    for b in prange((lane_start.shape[0] + 2) // 4):
        _decode_block(b, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, pair, raw_bits, steps,
                      out, status)


@njit(cache=True)
def decode_kernel_serial(stream, lane_start, raw_bytes, lane_size, n, lut, tmask, pair, raw_bits, steps,
                         out, status):
    """:func:`decode_kernel` on the calling thread only."""
    for b in range((lane_start.shape[0] + 2) // 4):
        _decode_block(b, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, pair, raw_bits, steps,
                      out, status)


# ---------------------------------------------------------------------------------------------------
# Encoder.

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
    """Bits of each lane's code section."""
    n = words.shape[0]
    n_lanes = out_bits.shape[0]
    for k in prange(n_lanes):
        s = 0
        for i in range(k * lane_size, min(n, (k + 1) * lane_size)):
            s += lengths[np.int64(words[i]) >> raw_bits]
        out_bits[k] = s


@njit(cache=True, parallel=True)
def encode_kernel(words, lane_size, lengths, rcodes, raw_bits, lane_start, raw_bytes, body):
    """Write every lane (raw section, then code section) at its byte offset in ``body``."""
    n = words.shape[0]
    n_lanes = lane_start.shape[0] - 1
    rmask = (1 << raw_bits) - 1
    for k in prange(n_lanes):
        a, e = k * lane_size, min(n, (k + 1) * lane_size)
        for section in range(2):
            pos = lane_start[k] + (raw_bytes[k] if section else 0)
            acc = np.uint64(0)
            nacc = 0
            for i in range(a, e):
                w = np.int64(words[i])
                if section:
                    acc |= np.uint64(rcodes[w >> raw_bits]) << np.uint64(nacc)
                    nacc += lengths[w >> raw_bits]
                else:
                    acc |= np.uint64(w & rmask) << np.uint64(nacc)
                    nacc += raw_bits
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
    raw_bits = word_bits - sym_bits
    if counts is None:
        counts = symbol_counts(words, word_bits, sym_bits)
    lengths = E.package_merge_lengths(counts, max_len)
    rcodes = E.reverse_bits(E.canonical_codes(lengths), lengths)
    n = words.shape[0]
    n_lanes, _, lane_count = E.lane_layout(n, lane_size)
    bits = np.zeros(n_lanes, dtype=np.int64)
    lengths64 = lengths.astype(np.int64)
    if n:
        lane_bits_kernel(words, lane_size, lengths64, raw_bits, bits)
    raw_bytes = E.raw_section_bytes(lane_count, raw_bits)
    nbytes = raw_bytes + (bits + 7) // 8
    lane_start = np.concatenate([[0], np.cumsum(nbytes)]).astype(np.int64)
    body = np.zeros(int(lane_start[-1]), dtype=np.uint8)
    if n:
        encode_kernel(words, lane_size, lengths64, rcodes, raw_bits, lane_start, raw_bytes, body)
    return E.assemble(dtype, n, lane_size, sym_bits, lengths, nbytes, body)


# ---------------------------------------------------------------------------------------------------
# Decoding entry points.

def decode_plan(plan: E.Plan, out: np.ndarray | None = None, where: str = "lossless tensor") -> np.ndarray:
    """Decode a validated plan into ``out`` (or a new array) of raw bit patterns.

    Tensors with fewer than ``PARALLEL_MIN_BLOCKS_PER_THREAD * numba.get_num_threads()`` blocks are decoded on
    the calling thread (see the module docstring), larger ones in parallel over blocks.
    """
    wd = E.WORD_DTYPE[plan.word_bits]
    if out is None:
        out = np.empty(plan.n, dtype=wd)
    if out.dtype != wd or out.shape != (plan.n,) or not out.flags.c_contiguous:
        raise ValueError(f"output must be a contiguous {np.dtype(wd).name}[{plan.n}] array")
    if plan.n == 0:
        return out
    n_lanes = plan.lane_count.shape[0]
    status = np.zeros(n_lanes, dtype=np.int32)
    threads = numba.get_num_threads()
    parallel = threads > 1 and -(-n_lanes // E.LANES_PER_BLOCK) >= PARALLEL_MIN_BLOCKS_PER_THREAD * threads
    kernel = decode_kernel if parallel else decode_kernel_serial
    kernel(plan.stream, plan.lane_start, plan.raw_bytes, plan.lane_size, plan.n, plan.lut,
           np.uint64((1 << plan.table_bits) - 1), plan.pair_lut,
           plan.raw_bits, 57 // plan.table_bits, out, status)
    bad = np.nonzero(status)[0]
    if bad.size:
        raise CorruptData(f"{bad.size} lanes do not end where their byte lengths say "
                          f"(first: lane {int(bad[0])})", where)
    return out


def decode(enc: E.Encoded, out: np.ndarray | None = None, verify_checksums: bool = True,
           where: str = "lossless tensor") -> np.ndarray:
    """Validate ``enc`` and decode it; raises :class:`CorruptData` for anything inconsistent."""
    return decode_plan(E.validate(enc, verify_checksums, where), out, where)
