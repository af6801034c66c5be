"""CPU kernel for the packed 1-bit delta product ``Y = X @ sign(Delta)^T`` (BitDelta serving).

BitDelta (Liu et al., "BitDelta: Your Fine-Tune May Only Be Worth One Bit", 2024), Sec. 3.3: a batch of
requests for different fine-tunes shares one base GEMM; each request adds ``alpha_i * X_i @ S_i^T`` with
its own sign matrix ``S_i`` kept as packed bits. Layout (same as
:func:`modelpress.quant.primitives.pack_signs`): ``packed[o, k]`` is an int32 whose bit ``j`` (LSB first)
is 1 when ``S[o, 32 k + j] = +1`` and 0 when it is -1.

Since ``S = 2 B - 1`` for the bit matrix ``B``, ``x . s_o = 2 * sum_{j: bit set} x_j - sum_j x_j``; the
kernel sums the inputs over set bits (one pass over each 32-bit word) and applies that identity.
Parallel over output rows with numba's ``prange``. :func:`sign_matmul_reference` is the plain numpy
version the kernel is tested against.
"""
from __future__ import annotations

import numpy as np

try:
    import numba
    from numba import njit, prange
except Exception:  # pragma: no cover - numba is a pinned dependency
    numba = None

__all__ = ["sign_matmul", "sign_matmul_reference", "unpack_sign_matrix"]


def unpack_sign_matrix(packed: np.ndarray, cols: int) -> np.ndarray:
    """``[out, words]`` int32 -> ``[out, cols]`` float32 of +-1 (numpy reference unpacking)."""
    as_bytes = np.ascontiguousarray(packed).astype("<i4").view(np.uint8).reshape(packed.shape[0], -1)
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")[:, :cols]
    return bits.astype(np.float32) * 2.0 - 1.0


def sign_matmul_reference(x: np.ndarray, packed: np.ndarray, cols: int) -> np.ndarray:
    """``x [n, cols] @ S^T`` with ``S`` unpacked from ``packed`` (float32 result ``[n, out]``)."""
    return (x.astype(np.float32) @ unpack_sign_matrix(packed, cols).T).astype(np.float32)


if numba is not None:

    @njit(parallel=True, fastmath=True, cache=True)
    def _sign_matmul_kernel(x: np.ndarray, packed: np.ndarray, cols: int, out: np.ndarray) -> None:
        n = x.shape[0]
        rows, words = packed.shape
        totals = np.empty(n, dtype=np.float32)
        for r in range(n):
            s = np.float32(0.0)
            for c in range(cols):
                s += x[r, c]
            totals[r] = s
        for o in prange(rows):
            for r in range(n):
                acc = np.float32(0.0)
                for k in range(words):
                    w = np.uint32(packed[o, k])
                    base = k * 32
                    for j in range(32):
                        if (w >> np.uint32(j)) & np.uint32(1):
                            acc += x[r, base + j]
                out[r, o] = np.float32(2.0) * acc - totals[r]

    @njit(parallel=True, fastmath=True, cache=True)
    def _sign_matmul_dense_kernel(x: np.ndarray, packed: np.ndarray, cols: int, out: np.ndarray) -> None:
        # Blocked variant for larger batches: expand one row of signs at a time (+-1 floats), then dot with
        # every input row. Each sign row is unpacked once and reused across the batch.
        n = x.shape[0]
        rows, words = packed.shape
        for o in prange(rows):
            srow = np.empty(cols, dtype=np.float32)
            for k in range(words):
                w = np.uint32(packed[o, k])
                for j in range(32):
                    c = k * 32 + j
                    if c < cols:
                        srow[c] = np.float32(1.0) if (w >> np.uint32(j)) & np.uint32(1) else np.float32(-1.0)
            for r in range(n):
                acc = np.float32(0.0)
                for c in range(cols):
                    acc += x[r, c] * srow[c]
                out[r, o] = acc


def sign_matmul(x: np.ndarray, packed: np.ndarray, cols: int) -> np.ndarray:
    """``x [n, cols] @ S^T`` for packed signs ``packed [out, ceil(cols/32)]`` (int32), float32 ``[n, out]``.

    Uses the numba kernel (the set-bit sum for one or two input rows, the row-unpacking kernel for more);
    falls back to the numpy reference when numba is unavailable.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    packed = np.ascontiguousarray(packed, dtype=np.int32)
    if x.ndim != 2 or x.shape[1] != cols or packed.shape[1] * 32 < cols:
        raise ValueError(f"shape mismatch: x {x.shape}, packed {packed.shape}, cols {cols}")
    if numba is None:
        return sign_matmul_reference(x, packed, cols)
    out = np.empty((x.shape[0], packed.shape[0]), dtype=np.float32)
    if x.shape[0] <= 2:
        _sign_matmul_kernel(x, packed, cols, out)
    else:
        _sign_matmul_dense_kernel(x, packed, cols, out)
    return out
