"""numba CPU kernels for the packed code stream of :func:`modelpress.quant.primitives.pack_codes`: ``b``-bit codes
(1..8) back to back, least significant bit first, code ``i`` at bit ``i * b``; the last byte zero-padded.

Eight codes are ``b`` whole bytes, so both kernels work on groups of eight codes in parallel (one 64-bit word
per group). The torch functions in :mod:`modelpress.quant.primitives` are the reference they are tested
against; these exist because the lossless codec's load path (:mod:`modelpress.quant.coded`) packs and
unpacks every code of a model on the CPU, where the torch bit-plane version is 10-100x slower.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def _pack_kernel(codes, bits, out):
    n = codes.shape[0]
    nb = out.shape[0]
    for g in prange((n + 7) // 8):
        acc = np.uint64(0)
        for j in range(8):
            i = g * 8 + j
            if i < n:
                acc |= np.uint64(codes[i]) << np.uint64(j * bits)
        for k in range(bits):
            at = g * bits + k
            if at < nb:
                out[at] = np.uint8((acc >> np.uint64(8 * k)) & np.uint64(0xFF))


@njit(cache=True, parallel=True)
def _unpack_kernel(packed, bits, out):
    n = out.shape[0]
    nb = packed.shape[0]
    mask = np.uint64((1 << bits) - 1)
    for g in prange((n + 7) // 8):
        acc = np.uint64(0)
        for k in range(bits):
            at = g * bits + k
            if at < nb:
                acc |= np.uint64(packed[at]) << np.uint64(8 * k)
        for j in range(8):
            i = g * 8 + j
            if i < n:
                out[i] = np.uint8((acc >> np.uint64(j * bits)) & mask)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (uint8, values below ``2**bits``, flattened) as the packed stream, ``ceil(n b / 8)`` bytes."""
    _check_bits(bits)
    flat = np.ascontiguousarray(codes.reshape(-1), dtype=np.uint8)
    out = np.zeros(-(-flat.shape[0] * bits // 8), dtype=np.uint8)
    if flat.shape[0]:
        _pack_kernel(flat, bits, out)
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of the packed stream ``packed`` (uint8), as uint8."""
    _check_bits(bits)
    if packed.shape[0] * 8 < count * bits:
        raise ValueError(f"{packed.shape[0]} bytes hold fewer than {count} codes of {bits} bits")
    out = np.empty(count, dtype=np.uint8)
    if count:
        _unpack_kernel(np.ascontiguousarray(packed.reshape(-1), dtype=np.uint8), bits, out)
    return out
