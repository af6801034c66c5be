"""Uniform quantization primitives: the one place where integer ranges, grids, rounding and bit packing live.

Two code conventions are in use, both written here once:

* **signed codes** (the diffusion PTQ layers, :mod:`modelpress.quant.layers`): per-channel scale ``s`` and
  integer zero point ``z`` inside the signed range, ``q = clamp(round(x / s) + z, qmin, qmax)`` with
  ``[qmin, qmax] = [-(2^(b-1) - 1), 2^(b-1) - 1]`` symmetric (``z = 0``) or ``[-2^(b-1), 2^(b-1) - 1]``
  asymmetric, so that ONNX QDQ export (int8 codes) is direct (Nagel et al., "A White Paper on Neural Network
  Quantization", 2021, Sec. 2.2, Eq. 3-7);
* **unsigned codes** on GPTQ's min-max grid (Frantar et al., "GPTQ", ICLR 2023, Sec. 4 "Step 3" and the
  reference's ``Quantizer``): codes in ``[0, 2^b - 1]``, one ``(scale, zero)`` per row and per group of
  ``group_size`` consecutive columns; symmetric grids put the zero point at ``2^(b-1)``.

Either way ``x ~= (q - z) * s`` (:func:`dequantize`). Codes of ``b`` bits (1..8) are stored as one dense
little-endian bit stream (:func:`pack_codes`, ``ceil(n b / 8)`` bytes; bit ``j`` of code ``i`` is bit
``i b + j`` of the stream); sign / mask bits are its 1-bit case (:func:`pack_signs`: 32 per int32 word,
row by row, the layout :mod:`modelpress.kernels.sign_gemv` reads).
"""
from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------------
# Integer ranges and grids


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Signed integer code range: narrow ``[-(2^(b-1)-1), 2^(b-1)-1]`` when symmetric (zero point 0),
    full ``[-2^(b-1), 2^(b-1)-1]`` when asymmetric (integer zero point inside the range)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def uint_range(bits: int) -> tuple[int, int]:
    """Unsigned code range ``[0, 2^b - 1]`` of GPTQ's grid (1..8 bits)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return 0, 2**bits - 1


def symmetric_zero(bits: int) -> float:
    """Zero point of a symmetric unsigned grid: ``(2^b - 1 + 1) / 2 = 2^(b-1)`` (GPTQ's convention)."""
    return float(2 ** (bits - 1))


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that map ``[lo, hi]`` (widened to contain 0) onto the signed code range."""
    qmin, qmax = int_range(bits, symmetric)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(1e-8)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


def quant_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max grid of ``w`` ([rows, k]) for unsigned codes: returns ``(scale, zero)`` of shape [rows].

    Asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``. Symmetric (GPTQ's
    convention): the range is ``[-max|w|, max|w|]`` and ``zero = 2^(b-1)``, so zero is exact. A row that is
    all zeros gets the range ``[-1, 1]``.
    """
    maxq = uint_range(bits)[1]
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    dead = (xmax - xmin) == 0
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, symmetric_zero(bits))
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def group_slices(cols: int, group_size: int) -> list[slice]:
    """The column slices of the quantization groups of a ``cols``-wide row (the last may be shorter)."""
    return [slice(g, min(g + group_size, cols)) for g in range(0, cols, group_size)]


def group_grids(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quant_grid` of every group of ``group_size`` columns of ``w`` [rows, cols]: ``(scales, zeros)``
    of shape [rows, ceil(cols / group_size)] (GPTQ's grouping, Sec. 4 "Additional details")."""
    grids = [quant_grid(w[:, sl], bits, sym) for sl in group_slices(w.shape[1], group_size)]
    return torch.stack([s for s, _ in grids], dim=1), torch.stack([z for _, z in grids], dim=1)


def expand_groups(t: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """Per-group values ``[rows, G]`` repeated over their columns: ``[rows, cols]``."""
    return t[:, torch.arange(cols, device=t.device) // group_size]


# ---------------------------------------------------------------------------------------------------
# Quantize / dequantize


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (Bengio et al. 2013; the STE of QAT and BRECQ)."""
    return (x.round() - x).detach() + x


def quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, symmetric: bool = False,
             signed: bool = True) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, qmin, qmax)`` (a float tensor holding integers), in the signed
    range of :func:`int_range` or, with ``signed=False``, the unsigned range of :func:`uint_range`."""
    qmin, qmax = int_range(bits, symmetric) if signed else uint_range(bits)
    return torch.clamp(torch.round(x / scale) + zp, qmin, qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s``."""
    return (codes - zp) * scale


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-wise :func:`dequantize` of ``codes`` [rows, cols] with ``scales`` / ``zeros`` [rows, G] (float32)."""
    cols = codes.shape[1]
    return dequantize(codes.float(), expand_groups(scales.float(), cols, group_size),
                      expand_groups(zeros.float(), cols, group_size))


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """``s * (clamp(round(x/s) + z) - z)`` on the signed range, with a straight-through estimator for the
    rounding (as in QAT / BRECQ / Q-Diffusion calibration)."""
    qmin, qmax = int_range(bits, symmetric)
    zp = zp.to(x.dtype)
    return (torch.clamp(round_ste(x / scale) + zp, qmin, qmax) - zp) * scale


# ---------------------------------------------------------------------------------------------------
# Bit packing


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes of ``bits`` bits in one bit stream."""
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (any shape, values ``< 2^bits``, 1..8 bits) into a flat uint8 bit stream,
    least significant bit first, in row-major order. 2-, 4- and 8-bit streams are the familiar four / two /
    one codes per byte (first code in the low bits)."""
    uint_range(bits)
    u = codes.reshape(-1).to(torch.uint8)
    planes = torch.stack([(u >> j) & 1 for j in range(bits)], dim=1).reshape(-1)  # [n * bits] bits
    pad = (-planes.numel()) % 8
    if pad:
        planes = torch.cat([planes, planes.new_zeros(pad)])
    planes = planes.view(-1, 8)
    out = torch.zeros(planes.shape[0], dtype=torch.uint8, device=u.device)
    for k in range(8):
        out |= planes[:, k] << k
    return out


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes, flat, int64."""
    uint_range(bits)
    p = packed.reshape(-1).to(torch.uint8)
    stream = torch.stack([(p >> k) & 1 for k in range(8)], dim=1).reshape(-1)[: numel * bits].view(numel, bits)
    out = torch.zeros(numel, dtype=torch.int64, device=p.device)
    for j in range(bits):
        out |= stream[:, j].to(torch.int64) << j
    return out


def pack_signed_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` of signed codes (the range of :func:`int_range`), offset by ``2^(b-1)``."""
    return pack_codes(codes.to(torch.int16) + 2 ** (bits - 1), bits)


def unpack_signed_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_signed_codes`: flat int8 codes."""
    return (unpack_codes(packed, bits, numel) - 2 ** (bits - 1)).to(torch.int8)


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """Pack a boolean ``[rows, cols]`` matrix (True = +1 / kept) into int32 ``[rows, ceil(cols/32)]``: the 1-bit
    case of :func:`pack_codes`, each row padded to whole 32-bit words. Bit ``j`` (LSB first) of word ``k`` of
    a row holds column ``32 k + j``; padding bits are 0."""
    rows, cols = positive.shape
    words = math.ceil(cols / 32)
    padded = torch.zeros(rows, words * 32, dtype=torch.uint8, device=positive.device)
    padded[:, :cols] = positive.to(torch.uint8)
    return pack_codes(padded, 1).view(torch.int32).reshape(rows, words)


def unpack_signs(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: a float32 ``[rows, cols]`` matrix of +-1."""
    rows, words = packed.shape
    bits = unpack_codes(packed.contiguous().view(torch.uint8), 1, rows * words * 32).view(rows, words * 32)
    return bits[:, :cols].float() * 2.0 - 1.0


__all__ = ["int_range", "uint_range", "symmetric_zero", "qparams_from_range", "quant_grid", "group_slices",
           "group_grids", "expand_groups", "round_ste", "quantize", "dequantize", "dequantize_groups", "fake_quant",
           "packed_bytes", "pack_codes", "unpack_codes", "pack_signed_codes", "unpack_signed_codes", "pack_signs",
           "unpack_signs"]
