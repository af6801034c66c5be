"""numba CPU encoder and decoder of the lossless float format (see :mod:`modelpress.kernels.entropy`).

Both run in parallel over blocks (``numba.prange``; set the thread count with ``numba.set_num_threads``).

Decoding a lane takes two passes over its output (see the format in :mod:`entropy`):

1. *codes*: the code section is a pure prefix-code stream. For 16-bit words one lookup in a multi-code table
   (:func:`entropy.multi_table`, 16 KiB: up to two codes from 12 bits or up to four from 11 bits, whichever
   resolves more per lookup for the tensor's code) gives the output words of the next codes with their raw
   bits zero; they are written with one 64-bit store and the output index advances by their count (the
   words past it are overwritten by the next lookup). A code longer than the table's index falls back to
   the full one-code table. 64 stream bits are loaded per ``57 // max code length`` lookups
   (one unaligned load and a shift), and a thread decodes the four lanes of a block in lockstep (four
   independent dependency chains). 32-bit words use the one-code table.
2. *raw bits*: the raw section holds ``R`` bits per weight at fixed offsets, so eight weights' raw bits are
   ``R`` bytes; they are spread to 16-bit lanes with shifts and masks and OR-ed into the output four words
   at a time, branch-free (format version 6: the field's top bit goes to the sign bit; with one raw byte per
   weight the fused kernel merges the bytes with vector code, and at batch 1 multiplies without storing the row).

Beyond whole tensors: :func:`decode_rows` decodes only the lanes that hold given rows (embedding lookups), and
:func:`fused_linear` decodes a weight block by block into thread-local, cache-sized buffers and multiplies each
block's rows with the activations right away (DFloat11, Zhang et al. 2025, section 3.3, decodes whole
transformer blocks into memory instead), in the summation order of :func:`entropy.linear_reference`. 8-bit
(fp8) words are decoded one code at a time (no raw bits).

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

_U15 = np.uint64(15)
_U16 = np.uint64(16)
_U32 = np.uint64(32)
_COUNT = np.uint64(0x70000)    # multi-code table entry: the number of codes (0: first code too long)
_ONE_CODE = np.uint64(0x10000)
_PAIR_MASK = np.uint64((1 << E.PAIR_TABLE[0]) - 1)   # index masks of the two multi-code tables
_QUAD_MASK = np.uint64((1 << E.QUAD_TABLE[0]) - 1)
#: a tensor is decoded in parallel only with at least this many blocks (64K weights each) per thread
PARALLEL_MIN_BLOCKS_PER_THREAD = 8


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
def _codes_multi4(stream, p0, p1, p2, p3, o0, o1, o2, o3, n_out, multi, lut, tmask, out):
    """Four lanes in lockstep with the 12-bit multi-code table (:func:`entropy.multi_table`): each lookup
    writes its up to four words with one 64-bit store and advances the lane's output index by its count;
    four lookups per lane per 64-bit read (codes of at most 14 bits). Stops when a lane has fewer than 16 words
    left of its ``n_out`` or a read could leave the stream. The words are written with their low ``R`` bits
    holding table fields; the raw pass overwrites those bits. Returns the four bit positions and output
    indices reached."""
    pmax = (stream.shape[0] - 8) * 8
    e0, e1, e2, e3 = o0 + n_out - 16, o1 + n_out - 16, o2 + n_out - 16, o3 + n_out - 16
    pm = _PAIR_MASK if multi.itemsize == 4 else _QUAD_MASK  # compile-time constants
    m7 = ~np.int64(7)
    while o0 <= e0 and o1 <= e1 and o2 <= e2 and o3 <= e3 and max(max(p0, p1), max(p2, p3)) <= pmax:
        b0 = _fill(stream, p0)
        b1 = _fill(stream, p1)
        b2 = _fill(stream, p2)
        b3 = _fill(stream, p3)
        for _ in range(4):
            x0 = np.uint64(multi[b0 & pm])
            if (x0 & _COUNT) == 0:  # the first code is longer than the table's bits (rare)
                x0 = np.uint64(lut[b0 & tmask]) | _ONE_CODE
            x1 = np.uint64(multi[b1 & pm])
            if (x1 & _COUNT) == 0:
                x1 = np.uint64(lut[b1 & tmask]) | _ONE_CODE
            x2 = np.uint64(multi[b2 & pm])
            if (x2 & _COUNT) == 0:
                x2 = np.uint64(lut[b2 & tmask]) | _ONE_CODE
            x3 = np.uint64(multi[b3 & pm])
            if (x3 & _COUNT) == 0:
                x3 = np.uint64(lut[b3 & tmask]) | _ONE_CODE
            if multi.itemsize == 4:  # a pair table (fixed per compiled specialization)
                _store32(out, o0, x0)
                _store32(out, o1, x1)
                _store32(out, o2, x2)
                _store32(out, o3, x3)
            else:
                _store64(out, o0, x0)
                _store64(out, o1, x1)
                _store64(out, o2, x2)
                _store64(out, o3, x3)
            b0 >>= x0 & _U15
            b1 >>= x1 & _U15
            b2 >>= x2 & _U15
            b3 >>= x3 & _U15
            o0 += np.int64((x0 & _COUNT) >> _U16)
            o1 += np.int64((x1 & _COUNT) >> _U16)
            o2 += np.int64((x2 & _COUNT) >> _U16)
            o3 += np.int64((x3 & _COUNT) >> _U16)
        p0 = (p0 & m7) + _clz64(b0)
        p1 = (p1 & m7) + _clz64(b1)
        p2 = (p2 & m7) + _clz64(b2)
        p3 = (p3 & m7) + _clz64(b3)
    return p0, p1, p2, p3, o0, o1, o2, o3


@njit(cache=True, boundscheck=False)
def _codes_multi1(stream, p, o, o_end, multi, lut, tmask, out):
    """One lane with the multi-code table (what :func:`_codes_multi4` leaves of a lane that is behind the
    others); stops 16 words before ``o_end`` or when a read could leave the stream. Returns ``(p, o)``."""
    pmax = (stream.shape[0] - 8) * 8
    pm = _PAIR_MASK if multi.itemsize == 4 else _QUAD_MASK  # compile-time constants
    while o <= o_end - 16 and p <= pmax:
        b = _fill(stream, p)
        for _ in range(4):
            x = np.uint64(multi[b & pm])
            if (x & _COUNT) == 0:  # the first code is longer than the table's bits
                x = np.uint64(lut[b & tmask]) | _ONE_CODE
            if multi.itemsize == 4:
                _store32(out, o, x)
            else:
                _store64(out, o, x)
            b >>= x & _U15
            o += np.int64((x & _COUNT) >> _U16)
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


@njit(cache=True, inline="always")
def _raw_field(raw_bits, raw_sign, word_bits):
    """The bits of a word that its ``R = raw_bits`` raw bits fill: the low ``R``, or with ``raw_sign`` (format
    version 6) the sign bit and the low ``R - 1`` (the raw field is ``sign << (R - 1) | low mantissa bits``)."""
    if raw_sign:
        return (1 << (word_bits - 1)) | ((1 << (raw_bits - 1)) - 1)
    return (1 << raw_bits) - 1


@njit(cache=True, inline="always")
def _deposit(r, raw_bits, raw_sign, word_bits):
    """The raw field ``r`` (``R`` bits) moved to its place in the word (:func:`_raw_field`)."""
    if raw_sign:
        low = np.uint64((1 << (raw_bits - 1)) - 1)
        return (r & low) | ((r >> np.uint64(raw_bits - 1)) << np.uint64(word_bits - 1))
    return r


@njit(cache=True, boundscheck=False)
def _raw16_pdep(stream, start, o, count, raw_bits, raw_sign, out):
    """:func:`_raw16_swar` with one ``pdep`` per four weights instead of the shift-and-mask steps (``pdep`` puts
    each weight's raw bits straight into its word's raw field, the sign bit included with ``raw_sign``)."""
    f = _raw_field(raw_bits, raw_sign, 16)
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
    field = np.uint64(f)
    for i in range(count // 8 * 8, count):
        bp = start * 8 + i * raw_bits
        out[o + i] = (out[o + i] & keep) | _pdep64(_load64(stream, bp >> 3) >> np.uint64(bp & 7), field)


@njit(cache=True, boundscheck=False)
def _raw16_swar(stream, start, o, count, raw_bits, raw_sign, out):
    """Set the raw field (:func:`_raw_field`) of 16-bit ``out[o:o + count]`` to the raw bits (raw section at byte
    ``start``).

    Eight weights' raw bits are ``R`` bytes; each half (four weights, ``4R <= 40`` bits) is spread to four
    16-bit lanes in two shift-and-mask steps (with ``raw_sign``, a third moves each lane's bit ``R - 1`` to its
    sign bit) and merged in with one 64-bit load and store.
    """
    two_r = np.uint64(2 * raw_bits)
    m_lo = np.uint64((1 << (2 * raw_bits)) - 1)            # fields 0, 1 stay, fields 2, 3 move to bit 32
    f = (1 << raw_bits) - 1
    m_f = np.uint64(f | (f << 32))                          # fields 0 and 2 stay, 1 and 3 move up 16 - R
    m_g = np.uint64((f << raw_bits) | (f << (32 + raw_bits)))
    up2 = np.uint64(16 - raw_bits)
    s = 1 << (raw_bits - 1)
    sign4 = np.uint64(s | (s << 16) | (s << 32) | (s << 48)) if raw_sign else np.uint64(0)
    field = _raw_field(raw_bits, raw_sign, 16)
    keep = ~field & 0xFFFF
    keep4 = np.uint64(keep | (keep << 16) | (keep << 32) | (keep << 48))
    half = raw_bits // 2
    shift_hi = np.uint64(4 * raw_bits - 8 * half)
    for g in range(count // 8):
        at = start + g * raw_bits
        for h in range(2):
            v = _load64(stream, at) if h == 0 else _load64(stream, at + half) >> shift_hi
            v = (v & m_lo) | (((v >> two_r) & m_lo) << _U32)
            v = (v & m_f) | ((v & m_g) << up2)
            v = (v & ~sign4) | ((v & sign4) << up2)
            oo = o + 8 * g + 4 * h
            _store64(out, oo, (_load64(out, oo) & keep4) | v)
    rmask = np.uint64((1 << raw_bits) - 1)
    for i in range(count // 8 * 8, count):
        bp = start * 8 + i * raw_bits
        r = (_load64(stream, bp >> 3) >> np.uint64(bp & 7)) & rmask
        out[o + i] = (out[o + i] & np.uint16(keep)) | _deposit(r, raw_bits, raw_sign, 16)


_raw16 = _raw16_pdep if _fast_pdep() else _raw16_swar


@njit(cache=True, boundscheck=False)
def _raw_generic(stream, start, o, count, raw_bits, raw_sign, out):
    """OR the raw bits of ``count`` weights into ``out[o:]`` one at a time (32-bit words)."""
    rmask = np.uint64((1 << raw_bits) - 1)
    bp = start * 8
    for i in range(count):
        r = (_load64(stream, bp >> 3) >> np.uint64(bp & 7)) & rmask
        out[o + i] |= _deposit(r, raw_bits, raw_sign, 32)
        bp += raw_bits


# ---------------------------------------------------------------------------------------------------
# One block (four lanes), and the kernels over blocks.

@njit(cache=True, boundscheck=False)
def _codes8_one_by_one(stream, p, o, o_end, lut, tmask, out):
    """:func:`_codes_one_by_one` for 8-bit words, whose table entries are ``symbol << 4 | length``."""
    last = stream.shape[0] - 8
    while o < o_end:
        e = np.uint64(lut[_bits_at(stream, p, last) & tmask])
        out[o] = e >> np.uint64(4)
        p += np.int64(e & _U15)
        o += 1
    return p


@njit(cache=True, boundscheck=False)
def _finish_lane(k, p, o, done, count, stream, lane_start, lut, tmask, multi, raw_bits, raw_sign, steps, out, status,
                 with_raw=True):
    """Lane ``k`` whose first ``done`` codes are decoded (up to bit ``p``) into ``out[o:o + count]``: its other
    codes (multi-code table while far from the end, for codes of at most 14 bits, then one at a time with
    clamped reads), the end check (``status[k] = 1`` when the codes do not end in the lane's last byte) and,
    ``with_raw``, the raw bits (the fused kernel merges them while widening instead)."""
    if out.itemsize == 2 and done == 0 and steps >= 4:
        p, oo = _codes_multi1(stream, p, o, o + count, multi, lut, tmask, out)
        done = oo - o
    if out.itemsize == 1:
        p = _codes8_one_by_one(stream, p, o + done, o + count, lut, tmask, out)
    else:
        p = _codes_one_by_one(stream, p, o + done, o + count, lut, tmask, out)
    end_bit = lane_start[k + 1] * 8
    if not end_bit - 8 < p <= end_bit:
        status[k] = 1
    if not with_raw:
        return
    if out.itemsize == 2:
        _raw16(stream, lane_start[k], o, count, raw_bits, raw_sign, out)
    elif out.itemsize == 4:
        _raw_generic(stream, lane_start[k], o, count, raw_bits, raw_sign, out)


@njit(cache=True, boundscheck=False)
def _decode_block(b, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps, out,
                  status, base, with_raw=True):
    """Decode block ``b`` (weights from ``4 * b * lane_size``) into ``out`` at index ``weight - base``: its
    full lanes' codes in lockstep (``steps`` codes per 64-bit read), then every lane's remaining codes one by
    one, its end check and its raw bits. 8-bit words skip the lockstep loop."""
    n_lanes = lane_start.shape[0] - 1
    k0 = 4 * b
    k_end = min(k0 + 4, n_lanes)
    ends = np.empty(4, dtype=np.int64)
    for j in range(4):  # code start of every lane; the last lanes of a partial block start empty
        k = min(k0 + j, n_lanes - 1)
        ends[j] = (lane_start[k] + raw_bytes[k]) * 8
    done = np.zeros(4, dtype=np.int64)
    if k_end - k0 == 4 and (k_end < n_lanes or n == n_lanes * lane_size) and out.itemsize > 1:
        o0 = k0 * lane_size - base
        if out.itemsize == 2 and steps >= 4:
            r = _codes_multi4(stream, ends[0], ends[1], ends[2], ends[3], o0, o0 + lane_size,
                              o0 + 2 * lane_size, o0 + 3 * lane_size, lane_size, multi, lut, tmask, out)
            for j in range(4):
                o = o0 + j * lane_size
                ends[j], o = _codes_multi1(stream, r[j], r[4 + j], o + lane_size, multi, lut, tmask, out)
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
        _finish_lane(k, ends[j], o - base, done[j], count, stream, lane_start, lut, tmask, multi, raw_bits, raw_sign,
                     steps, out, status, with_raw)


@njit(cache=True, parallel=True)
def decode_kernel(stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps, out,
                  status):
    """Decode every block into ``out`` (uint8, uint16 or uint32), in parallel over blocks; ``status[k]`` != 0
    marks a lane whose codes do not end where its byte length says (corrupt data)."""
    for b in prange((lane_start.shape[0] + 2) // 4):
        _decode_block(b, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps,
                      out, status, 0)


@njit(cache=True)
def decode_kernel_serial(stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps,
                         out, status):
    """:func:`decode_kernel` on the calling thread only."""
    for b in range((lane_start.shape[0] + 2) // 4):
        _decode_block(b, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps,
                      out, status, 0)


@njit(cache=True, boundscheck=False)
def _decode_lanes(j0, j1, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps,
                  lanes, out, status):
    for j in range(j0, j1):
        k = lanes[j]
        count = min(lane_size, n - k * lane_size)
        _finish_lane(k, (lane_start[k] + raw_bytes[k]) * 8, j * lane_size, 0, count, stream, lane_start, lut,
                     tmask, multi, raw_bits, raw_sign, steps, out, status)


@njit(cache=True, parallel=True)
def decode_lanes_kernel(stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps,
                        lanes, out, status):
    """Decode only the lanes ``lanes`` (sorted, distinct), lane ``lanes[j]`` into ``out[j * lane_size:]``, in
    parallel over lanes (an embedding lookup: only the rows it reads)."""
    for j in prange(lanes.shape[0]):
        _decode_lanes(j, j + 1, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign,
                      steps, lanes, out, status)


@njit(cache=True)
def decode_lanes_kernel_serial(stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign,
                               steps, lanes, out, status):
    """:func:`decode_lanes_kernel` on the calling thread only."""
    _decode_lanes(0, lanes.shape[0], stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits,
                  raw_sign, steps, lanes, out, status)


# ---------------------------------------------------------------------------------------------------
# Fused decode + matmul (GEMV / small-batch GEMM).

#: partial sums per output in the fused kernels (the summation order of :func:`entropy.linear_reference`)
FUSED_ACC = E.FUSED_ACC
_KIND = {"bfloat16": 0, "float16": 1, "float32": 2}


def _ir_loop(builder, name: str) -> tuple:
    """Open a counted loop in LLVM IR: returns ``(pre, body, done, i)`` with the builder in the loop header
    after the ``i`` phi (starting at 0 from ``pre``); the caller adds its own phis, branches to ``body`` or
    ``done``, emits the body and the phis' back edges, and branches back to the header."""
    i64 = ir.IntType(64)
    pre = builder.block
    loop = builder.append_basic_block(f"{name}.loop")
    body = builder.append_basic_block(f"{name}.body")
    done = builder.append_basic_block(f"{name}.done")
    builder.branch(loop)
    builder.position_at_end(loop)
    i = builder.phi(i64)
    i.add_incoming(ir.Constant(i64, 0), pre)
    return pre, body, done, i


def _widen_vector(builder, v, kind: int):
    """Eight words (an LLVM ``<8 x i16>`` or ``<8 x i32>``) as ``<8 x float>``: bf16 zero-extended and shifted
    left 16, fp16 by ``fpext`` from half (exact for subnormals, Inf and NaN), fp32 as is."""
    vf = ir.VectorType(ir.FloatType(), 8)
    if kind == 0:
        return builder.bitcast(builder.shl(builder.zext(v, ir.VectorType(ir.IntType(32), 8)),
                                           ir.Constant(ir.VectorType(ir.IntType(32), 8), [16] * 8)), vf)
    if kind == 1:
        return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), 8)), vf)
    return builder.bitcast(v, vf)


def _emit_widen_loop(context, builder, sig, args, kind: int, name: str, merge=None) -> None:
    """The loop of the widening intrinsics: ``row[8 i:8 i + 8]`` = float32 of the words ``buf[a + 8 i:]`` for ``i <
    n_vec`` (``args`` start with ``buf, a, n_vec, row``), each group of eight first passed through ``merge(v, i,
    off)`` (the raw bits' merge, on the words as ``<8 x i16>``) when given."""
    i64 = ir.IntType(64)
    vw = ir.VectorType(ir.IntType(32 if kind == 2 else 16), 8)
    vf = ir.VectorType(ir.FloatType(), 8)
    ba = context.make_array(sig.args[0])(context, builder, args[0])
    ra = context.make_array(sig.args[3])(context, builder, args[3])
    _, body, done, i = _ir_loop(builder, name)
    builder.cbranch(builder.icmp_signed("<", i, args[2]), body, done)
    builder.position_at_end(body)
    off = builder.mul(i, ir.Constant(i64, 8))
    v = builder.load(builder.bitcast(builder.gep(ba.data, [builder.add(args[1], off)]), vw.as_pointer()), align=2)
    if merge is not None:
        v = merge(v, i, off)
    builder.store(_widen_vector(builder, v, kind), builder.bitcast(builder.gep(ra.data, [off]), vf.as_pointer()),
                  align=4)
    i.add_incoming(builder.add(i, ir.Constant(i64, 1)), builder.block)
    builder.branch(i.parent)
    builder.position_at_end(done)


def _widen_intrinsic(kind: int):
    """An intrinsic ``widen(buf, a, n_vec, row)``: ``row[:8 * n_vec]`` = the float32 values of the words
    ``buf[a:a + 8 * n_vec]``, eight at a time as LLVM vectors (:func:`_widen_vector`). A numba loop did not
    vectorize (26 ms for a 4096x4096 bf16 weight, against 1.5 ms for the whole GEMV)."""
    @intrinsic
    def widen(typingctx, buf, a, n_vec, row):
        sig = types.void(buf, a, n_vec, row)

        def codegen(context, builder, sig, args):
            _emit_widen_loop(context, builder, sig, args, kind, "widen")
            return context.get_dummy_value()
        return sig, codegen
    return widen


def _widen_raw_intrinsic(kind: int):
    """An intrinsic ``widen_raw(buf, a, n_vec, row, stream, at, raw_bits, field)`` for 16-bit words: as
    ``widen`` (:func:`_widen_intrinsic`), but first sets the bits ``field`` (:func:`_raw_field`: the low ``R =
    raw_bits`` bits, or the sign and the low ``R - 1``) of every word to its raw bits, read from the raw section
    at byte ``at`` (eight weights' raw bits are ``R`` bytes; each half is spread to four 16-bit words with one
    BMI2 ``pdep``), so the fused kernel needs no separate raw pass over its buffer. Only compiled where
    :func:`_fast_pdep` is true."""
    @intrinsic
    def widen_raw(typingctx, buf, a, n_vec, row, stream, at, raw_bits, field):
        sig = types.void(buf, a, n_vec, row, stream, at, raw_bits, field)

        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            c64 = lambda v: ir.Constant(i64, v)  # noqa: E731
            i32 = lambda v: ir.Constant(ir.IntType(32), v)  # noqa: E731
            vw = ir.VectorType(ir.IntType(16), 8)
            vk = ir.VectorType(i64, 2)
            sa = context.make_array(sig.args[4])(context, builder, args[4])
            pdep = builder.module.declare_intrinsic("llvm.x86.bmi.pdep.64", fnty=ir.FunctionType(i64, [i64, i64]))
            r = args[6]
            f = args[7]                                                         # one word's raw field
            spread = f
            for q in (16, 32, 48):
                spread = builder.or_(spread, builder.shl(f, c64(q)))
            keep = builder.xor(spread, c64(-1))
            half = builder.udiv(r, c64(2))                                     # bytes to the second half
            shift_hi = builder.sub(builder.mul(r, c64(4)), builder.mul(half, c64(8)))

            def load_raw(byte):
                return builder.load(builder.bitcast(builder.gep(sa.data, [byte]), i64.as_pointer()), align=1)

            def merge(v, i, off):
                rb = builder.add(args[5], builder.mul(i, r))
                lo = builder.call(pdep, [load_raw(rb), spread])
                hi = builder.call(pdep, [builder.lshr(load_raw(builder.add(rb, half)), shift_hi), spread])
                rv = builder.insert_element(builder.insert_element(ir.Constant(vk, None), lo, i32(0)), hi, i32(1))
                kv = builder.insert_element(builder.insert_element(ir.Constant(vk, None), keep, i32(0)), keep, i32(1))
                return builder.bitcast(builder.or_(builder.and_(builder.bitcast(v, vk), kv), rv), vw)
            _emit_widen_loop(context, builder, sig, args, kind, "widen_raw", merge)
            return context.get_dummy_value()
        return sig, codegen
    return widen_raw


def _merge_raw_bytes(builder, v, r):
    """Eight 16-bit words ``v`` (decoded codes: the symbol in bits 7-14) with their raw bytes ``r`` (``<8 x i8>``:
    the sign on top of seven mantissa bits) put in: ``v & 0x7f80 | (r & 0x80) << 8 | r & 0x7f``."""
    vw = ir.VectorType(ir.IntType(16), 8)
    splat = lambda c: ir.Constant(vw, [c] * 8)  # noqa: E731
    r = builder.zext(r, vw)
    raw = builder.or_(builder.shl(builder.and_(r, splat(0x80)), splat(8)), builder.and_(r, splat(0x7F)))
    return builder.or_(builder.and_(v, splat(0x7F80)), raw)


def _widen_bytes_intrinsic(kind: int):
    """An intrinsic ``widen_bytes(buf, a, n_vec, row, stream, at)`` for 16-bit words whose raw field is one byte,
    the sign on top (format version 6 with ``R = 8``: bf16 with the exponent-only symbol, DFloat11's layout, or
    fp16 with three mantissa bits in the symbol): as ``widen`` (:func:`_widen_intrinsic`), but first puts the
    raw bytes from byte ``at`` of the stream into the words, ``(r & 0x80) << 8 | (r & 0x7f)``, eight at a time
    in vector registers (no bit spreading, no ``pdep``: works on any CPU)."""
    @intrinsic
    def widen_bytes(typingctx, buf, a, n_vec, row, stream, at):
        sig = types.void(buf, a, n_vec, row, stream, at)

        def codegen(context, builder, sig, args):
            vb = ir.VectorType(ir.IntType(8), 8)
            sa = context.make_array(sig.args[4])(context, builder, args[4])

            def merge(v, i, off):
                return _merge_raw_bytes(builder, v, _load_vector(builder, sa, builder.add(args[5], off), vb, 1))
            _emit_widen_loop(context, builder, sig, args, kind, "widen_bytes", merge)
            return context.get_dummy_value()
        return sig, codegen
    return widen_bytes


_widen_bf16, _widen_f16, _widen_f32 = (_widen_intrinsic(k) for k in range(3))
_widen_raw_bf16, _widen_raw_f16 = (_widen_raw_intrinsic(k) for k in range(2))
_widen_bytes_bf16, _widen_bytes_f16 = (_widen_bytes_intrinsic(k) for k in range(2))
#: whether the fused kernel merges the raw bits while widening (BMI2 ``pdep``) instead of a separate raw pass
RAW_IN_WIDEN = _fast_pdep()


@njit(cache=True, boundscheck=False)
def _widen_row(buf, a, k_len, kind, row):
    """``row[:k_len]`` = the float32 values of the words ``buf[a:a + k_len]`` (bf16, fp16 or fp32 bits), exact;
    ``row[k_len:]`` = 0. Reads up to 7 words past ``a + k_len`` (the thread buffer has 8 spare words)."""
    n_vec = (k_len + 7) // 8
    if kind == 0:
        _widen_bf16(buf, a, n_vec, row)
    elif kind == 1:
        _widen_f16(buf, a, n_vec, row)
    else:
        _widen_f32(buf, a, n_vec, row)
    for k in range(k_len, row.shape[0]):
        row[k] = np.float32(0.0)


@njit(cache=True, boundscheck=False)
def _widen_raw_row(buf, a, k_len, kind, row, stream, at, raw_bits, raw_sign):
    """:func:`_widen_row` for 16-bit words whose raw bits are not yet in ``buf`` (``k_len`` a multiple of 8, the
    row's raw bits from byte ``at`` of the stream): one raw byte per weight with ``raw_sign`` (vector code),
    else ``pdep`` (only where :data:`RAW_IN_WIDEN`)."""
    field = np.int64(_raw_field(raw_bits, raw_sign, 16))
    if raw_sign and raw_bits == 8:
        if kind == 0:
            _widen_bytes_bf16(buf, a, k_len // 8, row, stream, at)
        else:
            _widen_bytes_f16(buf, a, k_len // 8, row, stream, at)
    elif kind == 0:
        _widen_raw_bf16(buf, a, k_len // 8, row, stream, at, raw_bits, field)
    else:
        _widen_raw_f16(buf, a, k_len // 8, row, stream, at, raw_bits, field)
    for k in range(k_len, row.shape[0]):
        row[k] = np.float32(0.0)


def _emit_dot_loop(builder, n32, product) -> ir.Value:
    """The loop of the dot-product intrinsics, in the order of :func:`entropy.linear_reference`: four ``<8 x
    float>`` accumulators (the 32 partial sums) take ``product(i, q)`` (the products of weights ``32 i + 8 q`` to
    ``+ 8``) for ``i < n32``, then the halving tree; returns the float sum."""
    i64 = ir.IntType(64)
    v8 = ir.VectorType(ir.FloatType(), 8)
    pre, body, done, i = _ir_loop(builder, "dot")
    accs = [builder.phi(v8) for _ in range(4)]
    zero = ir.Constant(v8, [0.0] * 8)
    for a in accs:
        a.add_incoming(zero, pre)
    builder.cbranch(builder.icmp_unsigned("<", i, n32), body, done)
    builder.position_at_end(body)
    new = [builder.fadd(accs[q], product(i, q)) for q in range(4)]
    nxt = builder.add(i, ir.Constant(i64, 1))
    for a, v in zip(accs, new):
        a.add_incoming(v, builder.block)
    i.add_incoming(nxt, builder.block)
    builder.branch(i.parent)
    builder.position_at_end(done)
    b0 = builder.fadd(accs[0], accs[2])     # h = 16: lanes 0-15 += lanes 16-31
    b1 = builder.fadd(accs[1], accs[3])
    c = builder.fadd(b0, b1)                # h = 8
    lo = builder.shuffle_vector(c, c, ir.Constant(ir.VectorType(ir.IntType(32), 4), [0, 1, 2, 3]))
    hi = builder.shuffle_vector(c, c, ir.Constant(ir.VectorType(ir.IntType(32), 4), [4, 5, 6, 7]))
    d = builder.fadd(lo, hi)                # h = 4
    e0 = builder.fadd(builder.extract_element(d, ir.Constant(ir.IntType(32), 0)),
                      builder.extract_element(d, ir.Constant(ir.IntType(32), 2)))   # h = 2
    e1 = builder.fadd(builder.extract_element(d, ir.Constant(ir.IntType(32), 1)),
                      builder.extract_element(d, ir.Constant(ir.IntType(32), 3)))
    return builder.fadd(e0, e1)             # h = 1


def _load_vector(builder, ary, idx, vtype, align: int):
    """``vtype`` (an LLVM vector) loaded from element ``idx`` of a numba array's data."""
    return builder.load(builder.bitcast(builder.gep(ary.data, [idx]), vtype.as_pointer()), align=align)


@intrinsic
def _dot(typingctx, r, x):
    """``sum_k r[k] * x[k]`` of two contiguous float32 arrays (length a multiple of 32, ``x`` at least as long as
    ``r``) in the fixed order of :func:`entropy.linear_reference`: 32 partial sums (``a_j`` takes every
    ``k = j (mod 32)`` in increasing ``k``; product and sum each rounded to float32, no FMA), then the halving
    tree ``a_j += a_(j + h)``, ``h = 16 .. 1``.

    Emitted as LLVM IR on ``<8 x float>`` vectors (four accumulators = the 32 partial sums, in AVX registers):
    numba's loops do not vectorize this without ``fastmath`` (measured 1.2 GMAC/s as a loop over an array or 32
    scalars), and ``fastmath`` would let LLVM pick the summation order."""
    sig = types.float32(r, x)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        v8 = ir.VectorType(ir.FloatType(), 8)
        ra = context.make_array(sig.args[0])(context, builder, args[0])
        xa = context.make_array(sig.args[1])(context, builder, args[1])
        n = builder.udiv(builder.extract_value(ra.shape, 0), ir.Constant(i64, 32))

        def product(i, q):
            off = builder.add(builder.mul(i, ir.Constant(i64, 32)), ir.Constant(i64, 8 * q))
            return builder.fmul(_load_vector(builder, ra, off, v8, 4), _load_vector(builder, xa, off, v8, 4))
        return _emit_dot_loop(builder, n, product)
    return sig, codegen


@intrinsic
def _dot_raw_bytes(typingctx, buf, a, n32, stream, at, x):
    """:func:`_dot` of one weight row of 16-bit words with one raw byte each (what :func:`_widen_bytes_intrinsic`
    widens: ``buf[a:]`` the decoded codes, the raw bytes from ``stream[at:]``, ``32 * n32`` weights) with the
    float32 ``x``, merged, widened and multiplied in registers: the row is never stored (batch 1). Same
    summation order, so the same bits as widening first and then :func:`_dot` (bf16 words only)."""
    sig = types.float32(buf, a, n32, stream, at, x)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        vw = ir.VectorType(ir.IntType(16), 8)
        vb = ir.VectorType(ir.IntType(8), 8)
        v8 = ir.VectorType(ir.FloatType(), 8)
        ba = context.make_array(sig.args[0])(context, builder, args[0])
        sa = context.make_array(sig.args[3])(context, builder, args[3])
        xa = context.make_array(sig.args[5])(context, builder, args[5])

        def product(i, q):
            off = builder.add(builder.mul(i, ir.Constant(i64, 32)), ir.Constant(i64, 8 * q))
            v = _load_vector(builder, ba, builder.add(args[1], off), vw, 2)
            r = _load_vector(builder, sa, builder.add(args[4], off), vb, 1)
            w = _widen_vector(builder, _merge_raw_bytes(builder, v, r), 0)
            return builder.fmul(w, _load_vector(builder, xa, off, v8, 4))
        return _emit_dot_loop(builder, args[2], product)
    return sig, codegen


@njit(cache=True, boundscheck=False)
def _fused_block(b, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps, status,
                 kind, k_len, x, bias, has_bias, y, buf, row):
    """Decode block ``b`` (whole rows: ``lane_size`` is a multiple of ``k_len``) into ``buf`` (a thread's own,
    ``4 * lane_size`` words: L2-sized) and multiply its rows with ``x`` right away: ``y[:, r]`` for its rows.
    ``x`` and ``row`` are zero-padded to a multiple of 32 columns (the reference pads the same way). With BMI2
    (``RAW_IN_WIDEN``), 16-bit words and rows of a multiple of 8 weights (so every row's raw bits start on a
    byte), the raw bits are merged while widening each row, not in a pass of their own."""
    base = 4 * b * lane_size
    merge = (RAW_IN_WIDEN or (raw_sign and raw_bits == 8)) and kind < 2 and k_len % 8 == 0
    _decode_block(b, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps, buf,
                  status, base, not merge)
    end = min(n, base + 4 * lane_size)
    direct = raw_sign and raw_bits == 8 and kind == 0 and x.shape[0] == 1 and k_len % FUSED_ACC == 0
    for r in range(base // k_len, end // k_len):
        if direct:  # batch 1, one raw byte per bf16 weight: merge, widen and multiply in registers
            k = r * k_len // lane_size
            v = _dot_raw_bytes(buf, r * k_len - base, k_len // FUSED_ACC, stream,
                               lane_start[k] + r * k_len - k * lane_size, x[0])
            y[0, r] = v + bias[r] if has_bias else v
            continue
        if merge:
            k = r * k_len // lane_size
            at = lane_start[k] + (r * k_len - k * lane_size) * raw_bits // 8
            _widen_raw_row(buf, r * k_len - base, k_len, kind, row, stream, at, raw_bits, raw_sign)
        else:
            _widen_row(buf, r * k_len - base, k_len, kind, row)
        for i in range(x.shape[0]):
            v = _dot(row, x[i])
            y[i, r] = v + bias[r] if has_bias else v


@njit(cache=True, parallel=True)
def fused_linear_kernel(stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps,
                        status, kind, k_len, x, bias, has_bias, y, bufs, rows):
    """:func:`_fused_block` over all blocks, in parallel (``numba.prange``); thread ``t`` works in ``bufs[t]``
    and ``rows[t]`` (allocated once per call: nothing the size of the weight is written)."""
    for b in prange((lane_start.shape[0] + 2) // 4):
        t = numba.get_thread_id()
        _fused_block(b, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps,
                     status, kind, k_len, x, bias, has_bias, y, bufs[t], rows[t])


@njit(cache=True)
def fused_linear_kernel_serial(stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign,
                               steps, status, kind, k_len, x, bias, has_bias, y, bufs, rows):
    """:func:`fused_linear_kernel` on the calling thread only."""
    for b in range((lane_start.shape[0] + 2) // 4):
        _fused_block(b, stream, lane_start, raw_bytes, lane_size, n, lut, tmask, multi, raw_bits, raw_sign, steps,
                     status, kind, k_len, x, bias, has_bias, y, bufs[0], rows[0])


def fused_supported(plan: E.Plan, k_len: int) -> bool:
    """Whether :func:`fused_linear` can run on ``plan`` as a ``(n / k_len, k_len)`` weight: a 16/32-bit float
    dtype, lanes of whole rows (format version 3 records it; version 2 data qualifies when its lane size
    happens to be a multiple of the row), and blocks of at most 4M weights (each thread's buffer)."""
    return (plan.dtype in _KIND and k_len > 0 and plan.n % k_len == 0 and plan.lane_size % k_len == 0
            and 4 * plan.lane_size <= 1 << 22)


def fused_linear(plan: E.Plan, x: np.ndarray, bias: np.ndarray | None = None,
                 where: str = "lossless tensor") -> np.ndarray:
    """``y = x @ W.T + bias`` in float32 for the encoded weight ``W`` (``plan``, shape ``(N, K)``) and float32
    activations ``x`` of shape ``(B, K)``, decoding ``W`` block by block in cache-sized thread buffers
    (DFloat11, Zhang et al. 2025, section 3.3 decodes a transformer block just before use into GPU memory;
    here the decoded tile never leaves the thread's cache). The result equals
    :func:`entropy.linear_reference` on the decoded weight bit for bit. Threads: ``numba.get_num_threads()``
    over blocks of four lanes, one thread when there are fewer than two blocks per thread."""
    k_len = x.shape[1]
    if not fused_supported(plan, k_len):
        raise ValueError(f"fused kernel needs lanes of whole rows of {k_len} weights (lane size {plan.lane_size})")
    n_rows = plan.n // k_len
    k_pad = -(-k_len // FUSED_ACC) * FUSED_ACC
    xp = np.zeros((x.shape[0], k_pad), dtype=np.float32)
    xp[:, :k_len] = x
    y = np.empty((x.shape[0], n_rows), dtype=np.float32)
    if plan.n == 0 or x.shape[0] == 0:
        if x.shape[0] and bias is not None:
            y[:] = bias
        return y
    n_blocks = -(-plan.lane_count.shape[0] // E.LANES_PER_BLOCK)
    parallel = _use_threads(n_blocks, 2)
    nt = numba.config.NUMBA_NUM_THREADS if parallel else 1
    wd = E.WORD_DTYPE[plan.word_bits]
    bufs = np.empty((nt, 4 * plan.lane_size + 8), dtype=wd)
    rows = np.zeros((nt, k_pad), dtype=np.float32)
    has_bias = bias is not None
    b = np.ascontiguousarray(bias, dtype=np.float32) if has_bias else np.zeros(1, np.float32)
    status = np.zeros(plan.lane_count.shape[0], dtype=np.int32)
    kernel = fused_linear_kernel if parallel else fused_linear_kernel_serial
    kernel(*_plan_args(plan), status, _KIND[plan.dtype], k_len, xp, b, has_bias, y, bufs, rows)
    _check_status(status, where)
    return y


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
           max_len: int = 14, counts: np.ndarray | None = None, row_len: int = 0,
           codes_per_word: int = 1, raw_sign: bool = False) -> E.Encoded:
    """Encode raw float bit patterns (``words``: uint8 for fp8, uint16 for bf16/fp16, uint32 for fp32) or
    integer codes (``uint8``: ``codes_per_word`` codes per word, format version 5); ``counts`` (the symbol
    histogram, from :func:`symbol_counts`) is computed when not given. ``row_len`` (a divisor of ``lane_size``)
    records that every lane holds whole rows of that length (format version 3). ``raw_sign`` stores the sign
    raw, beside the low mantissa bits, and codes only the exponent and ``sym_mant_bits`` mantissa bits (format
    version 6, DFloat11's layout with ``sym_mant_bits = 0``; ``counts`` must then be given of
    :func:`entropy.raw_sign_order`'s words, or not at all)."""
    _, word_bits, _ = E.DTYPES[dtype]
    words = np.ascontiguousarray(words.reshape(-1)).view(E.WORD_DTYPE[word_bits])
    sym_bits = E.symbol_bits(dtype, sym_mant_bits, max_len, raw_sign)
    raw_bits = word_bits - sym_bits
    if raw_sign:
        words = E.raw_sign_order(words, word_bits, raw_bits)
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
    body = np.zeros(E.stream_bytes(int(lane_start[-1])), dtype=np.uint8)  # the padded stream itself: no copy
    if n:
        encode_kernel(words, lane_size, lengths64, rcodes, raw_bits, lane_start, raw_bytes, body)
    return E.assemble(dtype, n, lane_size, sym_bits, lengths, nbytes, body, row_len, codes_per_word=codes_per_word,
                      raw_sign=raw_sign)


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
    parallel = _use_threads(-(-n_lanes // E.LANES_PER_BLOCK), PARALLEL_MIN_BLOCKS_PER_THREAD)
    kernel = decode_kernel if parallel else decode_kernel_serial
    kernel(*_plan_args(plan), out, status)
    _check_status(status, where)
    return out


def _plan_args(plan: E.Plan) -> tuple:
    """The plan's arrays and constants in the order every decode kernel takes them."""
    return (plan.stream, plan.lane_start, plan.raw_bytes, plan.lane_size, plan.n, plan.lut,
            np.uint64((1 << plan.table_bits) - 1), plan.multi_lut, plan.raw_bits, plan.raw_sign,
            57 // plan.table_bits)


def _check_status(status: np.ndarray, where: str) -> None:
    bad = np.nonzero(status)[0]
    if bad.size:
        raise CorruptData(f"{bad.size} lanes do not end where their byte lengths say "
                          f"(first: lane {int(bad[0])})", where)


def _use_threads(work_units: int, min_per_thread: int) -> bool:
    threads = numba.get_num_threads()
    return threads > 1 and work_units >= min_per_thread * threads


def decode_rows(plan: E.Plan, rows: np.ndarray, row_len: int, where: str = "lossless tensor") -> np.ndarray:
    """Decode only the rows ``rows`` (any order, repeats allowed) of a tensor of rows of ``row_len`` weights:
    the lanes holding them are decoded (one lane of version-3 row-aligned data holds ``lane_size / row_len``
    whole rows; older data may have rows that straddle two lanes, then both are decoded). Returns the rows'
    words, shape ``(len(rows), row_len)``."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    wd = E.WORD_DTYPE[plan.word_bits]
    if rows.size == 0 or row_len == 0:
        return np.zeros((rows.size, row_len), dtype=wd)
    first = rows * row_len
    lo, hi = first // plan.lane_size, (first + row_len - 1) // plan.lane_size
    span = int((hi - lo).max()) + 1
    lanes = np.unique((lo[:, None] + np.arange(span)[None, :]).clip(max=hi[:, None]))
    out = np.empty(lanes.size * plan.lane_size + 8, dtype=wd)
    status = np.zeros(plan.lane_count.shape[0], dtype=np.int32)
    kernel = decode_lanes_kernel if _use_threads(lanes.size, 2) else decode_lanes_kernel_serial
    kernel(*_plan_args(plan), lanes, out, status)
    _check_status(status, where)
    # lanes holding one row are consecutive in ``lanes``, so a row is contiguous in ``out``
    start = np.searchsorted(lanes, lo) * plan.lane_size + first - lo * plan.lane_size
    return out[start[:, None] + np.arange(row_len)[None, :]]


def decode(enc: E.Encoded, out: np.ndarray | None = None, verify_checksums: bool = True,
           where: str = "lossless tensor") -> np.ndarray:
    """Validate ``enc`` and decode it; raises :class:`CorruptData` for anything inconsistent."""
    return decode_plan(E.validate(enc, verify_checksums, where), out, where)
