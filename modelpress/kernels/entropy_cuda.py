"""numba CUDA decoder of the lossless float format (see :mod:`modelpress.kernels.entropy`).

DFloat11's GPU decoder has every thread start at a fixed *byte* position of the stream and needs per-thread
side data (5-bit "gaps" to the first code boundary plus one output position per thread block, ~0.2 bit per
weight) and two passes (count symbols, block prefix sum, decode again and write). We store only one byte
length per lane of 16K weights (0.002 bit/weight) and build the fine-grained index on the GPU instead:

1. ``index`` (once per tensor, cached with the decoder): one thread per lane walks its lane's code section (table
   lookups only, no writes) and records the bit position of every ``sub``-th weight (a *sub-lane*). It also
   returns where each lane ends, which the host checks against the lane table (corrupt data -> error).
2. ``decode`` (every forward): one thread per sub-lane (32 weights by default: 512K threads for a 16M-weight
   matrix) starts at its recorded bit position and decodes, taking each weight's raw bits from their fixed
   offset in the lane's raw section: a single pass, no prefix sum and no re-decoding. By default a thread block
   stages its output in shared memory and writes it out coalesced (:func:`staged_kernel`).

Decoding uses the same complete, length-limited code table as the CPU (entry = symbol bits | code length),
so every exponent, 0xFF (Inf/NaN) and subnormals included, decodes. Word indices are clamped, so no
thread can read outside the stream even on corrupt input. The index costs 4 bytes per sub-lane in GPU
memory only (bit offsets within the lane; 1 bit/weight at ``sub=32``); it is never stored.

Tested bit-exactly against the numpy reference under ``NUMBA_ENABLE_CUDASIM=1`` (the simulator, in CI) and on
an H200 (``benchmarks/lossless_cuda.py``, docs/lossless.md). Measured there on a Llama-7B-shaped block: 36 GB/s
for 256-weight sub-lanes with direct stores, 174 with 32-weight sub-lanes (a warp's reads stay within a few
cache lines), 270 with staged output, 336 with register bit buffers (0.18x of a device copy of the same bf16
bytes); DFloat11 reports the ~200 GB/s class.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda
from numba.core import config

from ..errors import CorruptData
from . import entropy as E

MAX_CODE_BITS = E.MAX_CODE_LEN  # a refilled code buffer must hold the longest code


@cuda.jit(device=True, inline=True)
def _peek(a64, p, wmax):
    w = p >> 6
    if w > wmax:
        w = wmax
    s = np.uint64(p & 63)
    return (a64[w] >> s) | ((a64[w + 1] << np.uint64(1)) << (np.uint64(63) - s))


@cuda.jit
def _index_kernel(a64, lane_start, raw_bytes, lane_size, n, lut, tmask, sub, subs_per_lane, sub_pos, lane_end):
    k = cuda.grid(1)
    n_lanes = lane_start.shape[0] - 1
    if k >= n_lanes:
        return
    wmax = a64.shape[0] - 2
    base = lane_start[k] * 8
    p = base + raw_bytes[k] * 8
    cnt = min(lane_size, n - k * lane_size)
    for i in range(cnt):
        if i % sub == 0:
            sub_pos[k * subs_per_lane + i // sub] = p - base
        e = np.uint64(lut[_peek(a64, p, wmax) & tmask])
        p += np.int64(e & np.uint64(15))
    lane_end[k] = p


@cuda.jit(device=True, inline=True)
def _decode_run(a64, lane_bit, code_off, first, cnt, lut, tmask, raw_bits, sign_shift, dst, at):
    """Decode ``cnt`` weights of a lane starting at its weight ``first`` (whose code is ``code_off`` bits into
    the lane) into ``dst[at:]``; the raw bits sit at fixed offsets in the lane's raw section. ``sign_shift``:
    0, or for data whose sign is stored raw (format version 6) ``W - R``, the shift that takes the raw field's top
    bit to the word's sign bit.

    Both streams are read through 64-bit register buffers, refilled only when fewer bits than the longest code
    (or one raw field) remain: about one refill per 8 codes and per 12 raw fields of bf16, instead of two
    unaligned loads per weight for each."""
    wmax = a64.shape[0] - 2
    rbits = np.uint64(raw_bits)
    rmask = np.uint64((1 << raw_bits) - 1)
    top = np.uint64(1 << (raw_bits - 1)) if raw_bits else np.uint64(0)
    sshift = np.uint64(sign_shift)
    p = lane_bit + code_off
    rp = lane_bit + first * raw_bits
    buf = _peek(a64, p, wmax)
    avail = 64
    rbuf = _peek(a64, rp, wmax)
    ravail = 64
    for i in range(cnt):
        if avail < MAX_CODE_BITS:
            buf = _peek(a64, p, wmax)
            avail = 64
        if ravail < raw_bits:
            rbuf = _peek(a64, rp, wmax)
            ravail = 64
        e = np.uint64(lut[buf & tmask])
        length = e & np.uint64(15)
        r = rbuf & rmask
        dst[at + i] = (e ^ length) | (r & ~top) | ((r & top) << sshift)
        buf >>= length
        avail -= np.int64(length)
        p += np.int64(length)
        rbuf >>= rbits
        ravail -= raw_bits
        rp += raw_bits


@cuda.jit
def _decode_kernel(a64, sub_pos, lane_start, lane_size, n, lut, tmask, raw_bits, sign_shift, sub, subs_per_lane, out):
    t = cuda.grid(1)
    if t >= sub_pos.shape[0]:
        return
    k = t // subs_per_lane
    j = t - k * subs_per_lane
    first = j * sub
    start = k * lane_size + first
    if first >= lane_size or start >= n:
        return
    _decode_run(a64, lane_start[k] * 8, sub_pos[t], first, min(sub, lane_size - first, n - start), lut, tmask,
                raw_bits, sign_shift, out, start)


#: launch configuration used when a caller names none (the model's modules do not)
#: (fastest measured on an H200: benchmarks/results/lossless_cuda.md, 336 GB/s on a Llama-7B-shaped block)
DEFAULTS: dict[str, Any] = {"sub": 32, "threads": 128, "staged": True}
#: bytes of shared memory a staged block may use (the default per-block limit without opting in)
STAGED_SMEM_BYTES = 48 * 1024


@lru_cache(maxsize=None)
def staged_kernel(sub: int, threads: int, word_bits: int) -> Any:
    """The decode kernel with its output staged in shared memory (compiled once per configuration).

    The plain kernel's threads each write ``sub`` consecutive weights, so one warp's stores of one step land
    in 32 different cache lines. Here a thread block decodes into shared memory first (row stride ``sub + 2``
    words, so that the threads' rows fall in different banks) and then copies its whole output range, which
    is contiguous because ``sub`` divides the lane size, with consecutive threads on consecutive weights.
    """
    stride = sub + 2
    size = threads * stride
    word = np.uint16 if word_bits == 16 else np.uint32

    @cuda.jit
    def kernel(a64, sub_pos, lane_start, lane_size, n, lut, tmask, raw_bits, sign_shift, subs_per_lane, out):
        buf = cuda.shared.array(size, word)
        tid = cuda.threadIdx.x
        t = cuda.blockIdx.x * threads + tid
        if t < sub_pos.shape[0]:
            k = t // subs_per_lane
            first = (t - k * subs_per_lane) * sub
            start = k * lane_size + first
            if start < n:
                _decode_run(a64, lane_start[k] * 8, sub_pos[t], first, min(sub, n - start), lut, tmask, raw_bits,
                            sign_shift, buf, tid * stride)
        cuda.syncthreads()
        base = cuda.blockIdx.x * threads * sub
        end = min(base + threads * sub, n)
        for e in range(base + tid, end, threads):
            local = e - base
            r = local // sub
            out[e] = buf[r * stride + local - r * sub]

    return kernel


# ---------------------------------------------------------------------------------------------------
# Fused decode + matmul (GEMV / small-batch GEMM).

if config.ENABLE_CUDASIM:
    @cuda.jit(device=True)
    def _mul_rn(a, b):
        return a * b   # numpy float32 scalars: one IEEE rounding, no FMA

    @cuda.jit(device=True)
    def _add_rn(a, b):
        return a + b
else:  # pragma: no cover - needs a GPU
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _mul_rn(a, b):
        return libdevice.fmul_rn(a, b)   # never contracted into an FMA (the summation order is fixed)

    @cuda.jit(device=True, inline=True)
    def _add_rn(a, b):
        return libdevice.fadd_rn(a, b)

#: the fused kernel's shared memory: the decoded row (words), the row in float32 and the partial sums
FUSED_SMEM_BYTES = 48 * 1024


@lru_cache(maxsize=None)
def fused_kernel(k_len: int, threads: int, sub: int, word_bits: int) -> Any:
    """Fused decode + matmul: one thread block per weight row (compiled once per row length).

    The block's threads decode the row's ``k_len / sub`` sub-lanes (from the sub-lane index, as
    :func:`staged_kernel` does) into shared memory, widen them to float32 (bf16: shift left 16; fp32: as is),
    and then every warp takes batch rows: lane ``j`` of the warp sums the products of every ``k = j (mod 32)``
    in increasing ``k`` (``fmul_rn`` / ``fadd_rn``: no FMA contraction) and lane 0 adds the 32 partial sums in
    the halving tree, so the result is :func:`entropy.linear_reference` bit for bit, like the CPU kernel.
    Nothing the size of the weight is written: DFloat11 (Zhang et al. 2025, section 3.3) decodes a whole
    transformer block into global memory before its matmuls instead."""
    word = np.uint16 if word_bits == 16 else np.uint32
    k_pad = -(-k_len // 32) * 32
    warps = threads // 32

    @cuda.jit
    def kernel(a64, sub_pos, lane_start, lane_size, lut, tmask, raw_bits, sign_shift, subs_per_lane, x, bias, has_bias,
               y):
        wbuf = cuda.shared.array(k_len, word)
        rowf = cuda.shared.array(k_pad, np.float32)
        red = cuda.shared.array(threads, np.float32)
        rowu = rowf.view(np.uint32)
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        g0 = r * (k_len // sub)
        for j in range(tid, k_len // sub, threads):
            g = g0 + j
            k = g // subs_per_lane
            _decode_run(a64, lane_start[k] * 8, sub_pos[g], (g - k * subs_per_lane) * sub, sub, lut, tmask,
                        raw_bits, sign_shift, wbuf, j * sub)
        cuda.syncthreads()
        for k in range(tid, k_pad, threads):
            if k >= k_len:
                rowf[k] = np.float32(0.0)
            elif word_bits == 16:
                rowu[k] = np.uint32(wbuf[k]) << np.uint32(16)
            else:
                rowu[k] = wbuf[k]
        cuda.syncthreads()
        w = tid // 32
        lane = tid - 32 * w
        for b0 in range(0, x.shape[0], warps):
            b = b0 + w
            if b < x.shape[0]:
                acc = np.float32(0.0)
                for k in range(lane, k_pad, 32):   # the padding adds +0.0, as the reference does
                    acc = _add_rn(acc, _mul_rn(rowf[k], x[b, k]) if k < k_len else np.float32(0.0))
                red[tid] = acc
            cuda.syncthreads()
            if b < x.shape[0] and lane == 0:
                h = 16
                while h >= 1:
                    for j in range(h):
                        red[tid + j] = _add_rn(red[tid + j], red[tid + j + h])
                    h //= 2
                y[b, r] = _add_rn(red[tid], bias[r]) if has_bias else red[tid]
            cuda.syncthreads()

    return kernel


class CudaDecoder:
    """Decoder for one validated tensor: uploads the stream and table once, builds the sub-lane index."""

    def __init__(self, plan: E.Plan, sub: int | None = None, threads: int | None = None,
                 where: str = "lossless tensor", staged: bool | None = None) -> None:
        sub = DEFAULTS["sub"] if sub is None else sub
        threads = DEFAULTS["threads"] if threads is None else threads
        staged = DEFAULTS["staged"] if staged is None else staged
        self.plan, self.sub, self.threads, self.where = plan, sub, threads, where
        # staging needs sub-lanes that tile a lane exactly and a buffer that fits in shared memory
        self.staged = (staged and plan.lane_size % sub == 0
                       and threads * (sub + 2) * plan.word_bits // 8 <= STAGED_SMEM_BYTES)
        n_lanes = plan.lane_count.shape[0]
        self.subs_per_lane = -(-plan.lane_size // sub)
        self.a64 = cuda.to_device(plan.stream64)
        self.lut = cuda.to_device(plan.lut)
        self.tmask = np.uint64((1 << plan.table_bits) - 1)
        self.sign_shift = plan.word_bits - plan.raw_bits if plan.raw_sign else 0
        # bit offsets from the lane's start: int32 unless a lane is longer than 2**31 bits
        wide = n_lanes and int(np.diff(plan.lane_start).max()) * 8 >= 2**31
        self.sub_pos = cuda.to_device(np.zeros(max(n_lanes * self.subs_per_lane, 1),
                                               dtype=np.int64 if wide else np.int32))
        if plan.n == 0:
            return
        self.lane_start = cuda.to_device(plan.lane_start)
        raw_bytes = cuda.to_device(plan.raw_bytes)
        lane_end = cuda.to_device(np.zeros(n_lanes, dtype=np.int64))
        blocks = -(-n_lanes // threads)
        _index_kernel[blocks, threads](self.a64, self.lane_start, raw_bytes, plan.lane_size, plan.n, self.lut,
                                      self.tmask, sub, self.subs_per_lane, self.sub_pos, lane_end)
        ends = lane_end.copy_to_host()
        expect = plan.lane_start[1:] * 8
        bad = np.nonzero((ends > expect) | (ends <= expect - 8))[0]
        if bad.size:
            raise CorruptData(f"{bad.size} lanes do not end where their byte lengths say (first: lane {int(bad[0])})",
                              where)

    def fused_ok(self, k_len: int) -> bool:
        """Whether :meth:`linear` runs for rows of ``k_len`` weights: bf16 or fp32, lanes of whole rows, rows
        made of whole sub-lanes, and the row fitting in shared memory."""
        p = self.plan
        smem = k_len * p.word_bits // 8 + (-(-k_len // 32) * 32 + self.threads) * 4
        return (p.dtype in ("bfloat16", "float32") and k_len > 0 and p.n % k_len == 0 and p.lane_size % k_len == 0
                and k_len % self.sub == 0 and p.lane_size % self.sub == 0 and self.threads % 32 == 0
                and smem <= FUSED_SMEM_BYTES)

    def linear(self, x: Any, bias: Any = None, out: Any = None) -> Any:
        """``x @ W.T + bias`` in float32 (``x``: ``(B, K)`` float32, a device array or anything
        ``numba.cuda`` accepts, torch CUDA tensors included), decoded row by row in shared memory
        (:func:`fused_kernel`); returns ``out`` (a new ``(B, N)`` device array when not given), bit-identical to
        :func:`entropy.linear_reference` of the decoded weight."""
        p = self.plan
        xd = _device(x)
        k_len = xd.shape[1]
        if not self.fused_ok(k_len):
            raise ValueError(f"fused CUDA kernel cannot run rows of {k_len} weights of this tensor")
        n_rows = p.n // k_len
        y = cuda.device_array((xd.shape[0], n_rows), dtype=np.float32) if out is None else _device(out)
        has_bias = bias is not None
        b = _device(bias) if has_bias else cuda.to_device(np.zeros(1, np.float32))
        if n_rows and xd.shape[0]:
            fused_kernel(k_len, self.threads, self.sub, p.word_bits)[n_rows, self.threads](
                self.a64, self.sub_pos, self.lane_start, p.lane_size, self.lut, self.tmask, p.raw_bits,
                self.sign_shift, self.subs_per_lane, xd, b, has_bias, y)
        return out if out is not None else y

    def decode(self, out: Any = None) -> Any:
        """Decode into ``out`` (a device array of uint16 / uint32 words, or anything numba.cuda accepts);
        returns it."""
        p = self.plan
        if out is None:
            out = cuda.device_array(p.n, dtype=E.WORD_DTYPE[p.word_bits])
        if p.n == 0:
            return out
        total = self.sub_pos.shape[0]
        grid = -(-total // self.threads)
        if self.staged:
            staged_kernel(self.sub, self.threads, p.word_bits)[grid, self.threads](
                self.a64, self.sub_pos, self.lane_start, p.lane_size, p.n, self.lut, self.tmask, p.raw_bits,
                self.sign_shift, self.subs_per_lane, out)
            return out
        _decode_kernel[grid, self.threads](self.a64, self.sub_pos, self.lane_start, p.lane_size, p.n, self.lut,
                                           self.tmask, p.raw_bits, self.sign_shift, self.sub, self.subs_per_lane, out)
        return out


def _device(a: Any) -> Any:
    """A numba device array for ``a`` (host arrays are copied to the device, device arrays and torch CUDA
    tensors are shared)."""
    if isinstance(a, np.ndarray):
        return cuda.to_device(a)
    if cuda.is_cuda_array(a):
        return cuda.as_cuda_array(a)
    return a


def decode(enc: E.Encoded, sub: int | None = None, threads: int | None = None, where: str = "lossless tensor",
           staged: bool | None = None) -> np.ndarray:
    """Validate on the host, decode on the GPU (or the simulator), return the words on the host."""
    dec = CudaDecoder(E.validate(enc, True, where), sub, threads, where, staged)
    out = dec.decode()
    return out.copy_to_host() if hasattr(out, "copy_to_host") else np.asarray(out)
