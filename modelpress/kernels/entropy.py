"""Lossless float coding: the container format, code construction and a plain numpy reference codec.

The method follows DFloat11 (Zhang et al., "70% Size, 100% Accuracy: Lossless LLM Compression for Efficient
GPU Inference via Dynamic-Length Float", 2025): the exponent of each weight is Huffman coded, the rest is
stored raw. Two measured changes make it smaller and safer (see docs/lossless.md):

* the coded *symbol* is the sign, the exponent **and the top ``k`` mantissa bits** (default 2). Trained weights
  follow a smooth, roughly log-uniform density inside each binade, so the leading mantissa bits are not
  uniform (Benford's law); coding them jointly with the exponent goes *below* the order-0 exponent bound
  (all-MiniLM-L6-v2 bf16: 10.58 bits/weight with Huffman against 10.61 for the bound).
* the Huffman code is length-limited and built optimally with package-merge (Larmore & Hirschberg 1990),
  canonical (only code lengths are stored) and covers *every* symbol that occurs, Inf/NaN and
  subnormals included (DFloat11's LUT scheme cannot code exponents >= 240).

Bitstream (format version 3; version 2 is read too). Every weight ``w`` (``W`` = 8, 16 or 32 bits) becomes ``symbol = w >> R`` (its
top ``S`` bits: sign, exponent, ``k`` mantissa bits) and ``raw = w & (2**R - 1)`` (the ``R = W - S`` low
mantissa bits). The sign costs one bit inside the code, exactly as if stored raw, because it is independent
of the rest. Weights are cut into *lanes* of ``lane_size`` consecutive weights; each lane starts on a byte
boundary and has its byte length stored (int32). A lane holds first its *raw section* (the raw bits of its
weights packed back to back, ``ceil(count * R / 8)`` bytes, so the raw bits of weight ``i`` sit at the fixed
bit offset ``i * R``) and then its *code section* (the symbols' codes back to back, zero-padded to a byte).
Both are least significant bit first; codes are stored bit-reversed so that a decoder indexes a lookup table
with the next bits. Keeping the codes apart from the raw bits (version 1 interleaved them) makes the code
section a pure prefix-code stream, so a decoder can resolve up to four short codes with one table lookup
(:func:`multi_table`) and fill in the raw bits in a separate, branch-free pass. Four consecutive lanes form a
*block*, the unit of checksums (crc32) and of CPU threads; a CPU thread decodes its block's four lanes in
lockstep (instruction-level parallelism).

Tensors of one encoded weight (all little-endian, stored in the artifact's safetensors):

``header``    int64[12]: magic, version, dtype code, n, lane_size, symbol bits S, lo0, hi0, lo1, hi1,
              row length (version 3; 0 = lanes not aligned to rows; version 2: reserved, 0), meta crc
``codebook``  uint8: code lengths of the used symbol ranges ``[lo0, hi0)`` (positive) then ``[lo1, hi1)``
              (negative weights), two 4-bit lengths per byte each (max length 15)
``lane_nbytes`` int32[n_lanes]: byte length of every lane
``checksums`` int32[n_blocks]: crc32 of each block's bytes (bit pattern of the uint32)
``stream``    uint8: the lanes back to back, then zero padding to a multiple of 8 bytes plus 16 bytes

Version 3 adds two things. (1) *Row-aligned lanes*: ``header[10]`` is the length of a weight row (the
tensor's last dimension for a Linear / Embedding weight) and ``lane_size`` is a multiple of it, so every lane
holds whole rows. A fused decode + matmul kernel can then give each CPU thread (CUDA block) whole rows
(:func:`modelpress.kernels.entropy_cpu.fused_linear`), and an embedding lookup decodes only the lanes of the
rows it reads. (2) fp8 dtypes (``float8_e4m3fn``, ``float8_e5m2``): the symbol is the whole byte (``S = 8``,
``R = 0``, no raw section; with at most 3 mantissa bits, coding them jointly is the order-0 optimum) and the
decode table entries are ``symbol << 4 | length`` in uint16. Version 2 data (no row length, 16/32-bit dtypes)
decodes unchanged; it just cannot use the row-wise paths when its lanes do not happen to hold whole rows.

Version 4 adds *integer codes* (dtype ``uint8``, code 5): the words are the unsigned 1-8-bit codes of a quantized
weight (the packed format of :mod:`modelpress.quant.packed`, unpacked to one code per byte), coded whole as
fp8 words are (``S = 8``, ``R = 0``): an order-0 Huffman code of the code values, the last stage of Deep
Compression (Han et al., ICLR 2016, Sec. 4). Only integer data is written as version 4, so float tensors keep
their version-3 bytes.

Version 5 (integer codes only; what integer codes are written in now) lets one word hold ``k`` consecutive
``b``-bit codes, ``k`` in 1, 2, 4, 8 with ``k b <= 8``: word ``j`` is ``sum_i code[j k + i] << (i b)``, i.e. the
``k b``-bit fields of the packed code stream, the last word zero-filled past the last code. ``header[10]``
holds ``k`` (for floats it is the row length). An order-0 code of pairs follows the joint distribution of
neighbouring codes (same channel, same scale), so it can go below the codes' own order-0 entropy, and it
halves both Huffman's per-symbol rounding loss (per code) and the number of symbols to decode. The encoder (:func:`modelpress.quant.coded.encode_codes`)
keeps the ``k`` with the fewest bytes; version 4 (``k = 1``, ``header[10] = 0``) is still read.

Version 6 (floats of 16 or 32 bits whose sign is stored raw; DFloat11's own layout with ``k = 0``) is version 3
with the sign moved out of the symbol: ``header[5]`` = ``S`` = exponent bits + ``k``, and the ``R = W - S`` raw bits
of a weight are ``sign << (R - 1) | low mantissa bits`` (bf16, ``k = 0``: one raw byte per weight). The encoders
code :func:`raw_sign_order`'s words as usual; the decode table holds ``symbol << (R - 1) | length`` and the
decoders put the raw field's top bit into the sign bit (:func:`deposit_raw`). Exponent-only codes are ~1 bit
shorter than sign-and-exponent ones, so a multi-code lookup resolves more of them (3.6 against 2.6 per lookup on
LLM-like bf16 weights); the size is the same, since the sign costs one bit either way.

The meta crc covers the header's first eleven fields, the codebook and the lane lengths. Everything is
validated here, in numpy, before any kernel runs (:func:`validate`); the kernels also clamp their reads.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptData

MAGIC = 0x4D50_4C4C  # "MPLL"
VERSION = 3
#: the version integer codes are written in (5: ``header[10]`` = codes per word)
INT_VERSION = 5
#: the first version with integer codes (one code per word)
FIRST_INT_VERSION = 4
#: the version of float data whose sign is stored raw (the symbol is the exponent and ``k`` mantissa bits only)
RAW_SIGN_VERSION = 6
#: versions this module reads (2: no row length, no fp8; 3: header[10] = row length, fp8 dtypes; 4: integer
#: codes, one per word; 5: integer codes, header[10] = codes per word; 6: version 3 with the sign stored raw)
READABLE_VERSIONS = (2, 3, 4, 5, 6)
#: how many integer codes one word may hold (version 5)
CODES_PER_WORD = (1, 2, 4, 8)
LANES_PER_BLOCK = 4
PAD_BYTES = 16
MAX_CODE_LEN = 15
HEADER_LEN = 12

#: dtype name -> (code, word bits, exponent bits); ``uint8`` holds integer codes (no exponent, version 4)
DTYPES: dict[str, tuple[int, int, int]] = {"bfloat16": (0, 16, 8), "float16": (1, 16, 5), "float32": (2, 32, 8),
                                           "float8_e4m3fn": (3, 8, 4), "float8_e5m2": (4, 8, 5), "uint8": (5, 8, 0)}
#: dtypes whose words are integer codes, not floats
INT_DTYPES = ("uint8",)
_DTYPE_BY_CODE = {code: name for name, (code, _, _) in DTYPES.items()}
WORD_DTYPE = {8: np.uint8, 16: np.uint16, 32: np.uint32}
#: decode-table entry type per word width (8-bit words: ``symbol << 4 | length`` in a uint16, see
#: :func:`decode_table`)
LUT_DTYPE = {8: np.uint16, 16: np.uint16, 32: np.uint32}


#: the arrays of one encoded tensor and their dtypes (see the module docstring)
FIELDS: dict[str, type] = {"header": np.int64, "codebook": np.uint8, "lane_nbytes": np.int32,
                           "checksums": np.int32, "stream": np.uint8}


@dataclass
class Encoded:
    """One encoded tensor (flat); see the module docstring for the layout."""

    header: np.ndarray
    codebook: np.ndarray
    lane_nbytes: np.ndarray
    checksums: np.ndarray
    stream: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"header": self.header, "codebook": self.codebook, "lane_nbytes": self.lane_nbytes,
                "checksums": self.checksums, "stream": self.stream}

    @property
    def nbytes(self) -> int:
        """Every stored byte, side data included."""
        return sum(int(a.nbytes) for a in self.arrays().values())


@dataclass
class Plan:
    """A validated :class:`Encoded`, ready for a kernel: everything derived and checked."""

    dtype: str
    n: int
    word_bits: int
    sym_bits: int
    raw_bits: int
    lane_size: int
    lengths: np.ndarray        # uint8[2**S]
    lut: np.ndarray            # word dtype [2**table_bits]: symbol << R | length (0 = invalid code)
    table_bits: int
    lane_start: np.ndarray     # int64[n_lanes + 1], byte offsets
    lane_count: np.ndarray     # int64[n_lanes], weights per lane
    raw_bytes: np.ndarray      # int64[n_lanes], bytes of each lane's raw section (its code section follows)
    stream: np.ndarray         # uint8, the stream (padded, see the module docstring)
    stream64: np.ndarray       # uint64 view of the stream
    multi_lut: np.ndarray      # multi-code table, uint32 or uint64 (16-bit words; a dummy otherwise)
    row_len: int = 0           # weights per row when every lane holds whole rows (version 3), else 0
    codes_per_word: int = 1    # integer codes held by one word (version 5; 1 before)
    raw_sign: bool = False     # the sign is the top bit of the raw field, not of the symbol (version 6)


# ---------------------------------------------------------------------------------------------------
# Splitting words into symbols and raw bits.

def split_words(words: np.ndarray, word_bits: int, sym_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(symbol, raw)`` of every word: its top ``sym_bits`` bits and the rest."""
    w = words.astype(np.int64)
    raw_bits = word_bits - sym_bits
    return w >> raw_bits, w & ((1 << raw_bits) - 1)


def raw_sign_order(words: np.ndarray, word_bits: int, raw_bits: int) -> np.ndarray:
    """The words with their sign moved below the symbol (format version 6, DFloat11's layout): a word ``sign |
    symbol (S bits) | low (R - 1 bits)`` becomes ``symbol | sign | low``, so that its top ``S`` bits are the
    symbol (exponent and ``k`` mantissa bits) and its low ``R`` bits the raw field ``sign << (R - 1) | low``.
    The encoder codes these words as usual; the decoders put the sign back (:func:`deposit_raw`)."""
    w = words.astype(np.int64)
    low = (1 << (raw_bits - 1)) - 1
    word_mask = (1 << word_bits) - 1
    return (((w << 1) & word_mask & ~((1 << raw_bits) - 1)) | ((w >> (word_bits - 1)) << (raw_bits - 1))
            | (w & low)).astype(WORD_DTYPE[word_bits])


def deposit_raw(raw: int, raw_bits: int, raw_sign: bool, word_bits: int) -> int:
    """A raw field moved to its place in the word: the low ``R`` bits, or with ``raw_sign`` its top bit to the
    sign bit and the rest to the low ``R - 1`` bits."""
    if not raw_sign:
        return raw
    return (raw & ((1 << (raw_bits - 1)) - 1)) | ((raw >> (raw_bits - 1)) << (word_bits - 1))


# ---------------------------------------------------------------------------------------------------
# Code construction.

def package_merge_lengths(counts: np.ndarray, max_len: int) -> np.ndarray:
    """Optimal length-limited prefix code lengths (package-merge, Larmore & Hirschberg 1990).

    Minimises ``sum(counts[s] * len[s])`` subject to ``len[s] <= max_len``. Symbols with count 0 get length
    0 (no code); a single used symbol gets length 1. Ties are broken deterministically (by symbol).
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.shape[0], dtype=np.uint8)
    used = np.nonzero(counts)[0]
    m = used.shape[0]
    if m == 0:
        return lengths
    if m == 1:
        lengths[used[0]] = 1
        return lengths
    if m > (1 << max_len):
        raise ValueError(f"{m} symbols cannot be coded with codes of at most {max_len} bits")
    order = np.argsort(counts[used], kind="stable")
    leaf_w = counts[used][order]
    leaf_id = np.arange(m, dtype=np.int64)
    kinds = [leaf_id]                      # level 1: leaves only; -1 marks a package
    level_w = leaf_w
    for _ in range(max_len - 1):
        npk = level_w.shape[0] // 2
        pk_w = level_w[0:2 * npk:2] + level_w[1:2 * npk:2]
        w = np.concatenate([leaf_w, pk_w])
        kind = np.concatenate([leaf_id, np.full(npk, -1, dtype=np.int64)])
        o = np.argsort(w, kind="stable")   # leaves before packages on ties
        level_w, kind = w[o], kind[o]
        kinds.append(kind)
    per_leaf = np.zeros(m, dtype=np.int64)
    take = 2 * m - 2
    for kind in reversed(kinds):
        sel = kind[:take]
        np.add.at(per_leaf, sel[sel >= 0], 1)
        take = 2 * int(np.count_nonzero(sel < 0))
    lengths[used[order]] = per_leaf.astype(np.uint8)
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (MSB-first values) for ``lengths``: shorter codes first, ties by symbol."""
    codes = np.zeros(lengths.shape[0], dtype=np.int64)
    syms = [s for s in np.lexsort((np.arange(lengths.shape[0]), lengths)) if lengths[s] > 0]
    code, prev = 0, 0
    for s in syms:
        length = int(lengths[s])
        code <<= length - prev
        codes[s] = code
        code += 1
        prev = length
    return codes


def reverse_bits(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each code with its ``lengths`` low bits reversed (the order an LSB-first stream holds them)."""
    out = np.zeros(codes.shape[0], dtype=np.int64)
    for s in np.nonzero(lengths)[0]:
        length = int(lengths[s])
        out[s] = int(format(int(codes[s]), f"0{length}b")[::-1], 2)
    return out


def kraft_sum(lengths: np.ndarray) -> float:
    used = lengths[lengths > 0].astype(np.int64)
    return float(np.sum(np.ldexp(1.0, -used))) if used.size else 0.0


def decode_table(lengths: np.ndarray, word_bits: int, raw_sign: bool = False) -> tuple[np.ndarray, int]:
    """LSB-first decode table: index = next ``table_bits`` stream bits, entry = ``symbol << R | length``
    (the output word's top bits with the code length in its low bits; entry 0 marks an invalid code); with
    ``raw_sign`` (version 6) ``symbol << (R - 1) | length``, the symbol's bits below the sign bit.
    8-bit words have no raw bits to hold the length: their entries are ``symbol << 4 | length`` (uint16)."""
    raw_bits = word_bits - int(np.log2(lengths.shape[0])) - int(raw_sign)
    if word_bits == 8:
        raw_bits = 4
    table_bits = max(int(lengths.max(initial=0)), 1)
    lut = np.zeros(1 << table_bits, dtype=LUT_DTYPE[word_bits])
    rev = reverse_bits(canonical_codes(lengths), lengths)
    used = np.nonzero(lengths)[0]
    if used.size == 1:  # a one-symbol code: both values of its 1-bit code decode to it (the encoder writes 0)
        lut[:] = (int(used[0]) << raw_bits) | 1
        return lut, table_bits
    for s in used:
        length = int(lengths[s])
        idx = int(rev[s]) + (np.arange(1 << (table_bits - length), dtype=np.int64) << length)
        lut[idx] = (int(s) << raw_bits) | length
    return lut, table_bits


#: the two multi-code tables: (index bits, codes per entry, entry type); both 16 KiB, within the L1 cache
PAIR_TABLE = (12, 2, np.uint32)
QUAD_TABLE = (11, 4, np.uint64)


def multi_code_table(lut: np.ndarray, table_bits: int, raw_bits: int, p_bits: int, max_codes: int,
                     entry_type: type) -> np.ndarray:
    """Multi-code decode table for 16-bit words, indexed by the next ``p_bits`` code bits.

    Entry (``max_codes`` 16-bit quarters of ``entry_type``): the output words (``symbol << R``) of the codes
    that lie wholly within the ``p_bits`` bits, up to ``max_codes``, one per quarter (unused quarters 0), so
    one store writes them all; in the free low ``R >= 4`` bits of the first word the number of code bits they
    consume, in those of the second the number of codes (0 when the first code is longer than ``p_bits``: the
    decoder then takes the one-code table ``lut``).
    """
    tmask = (1 << table_bits) - 1
    keep = ~((1 << raw_bits) - 1) & 0xFFFF
    x = np.arange(1 << p_bits, dtype=np.int64)
    used = np.zeros_like(x)
    count = np.zeros_like(x)
    active = np.ones(x.shape, dtype=bool)
    entry = np.zeros(x.shape, dtype=np.uint64)
    for i in range(max_codes):
        e = lut[(x >> used) & tmask].astype(np.int64)   # bits beyond p_bits read as 0: only whole codes are kept
        length = e & 15
        fits = active & (used + length <= p_bits)
        entry |= np.where(fits, e & keep, 0).astype(np.uint64) << np.uint64(16 * i)
        used += np.where(fits, length, 0)
        count += fits
        active &= fits
    return (entry | used.astype(np.uint64) | (count.astype(np.uint64) << np.uint64(16))).astype(entry_type)


def codes_per_lookup(table: np.ndarray) -> float:
    """Expected codes resolved per lookup of a multi-code table: its entries' mean count, since a Huffman
    code's stream bits are (close to) uniformly random under the distribution its lengths imply."""
    count = (table.astype(np.uint64) >> np.uint64(16)) & np.uint64(7)
    return float(np.maximum(count, 1).mean())


def multi_table(lut: np.ndarray, table_bits: int, raw_bits: int) -> np.ndarray:
    """The faster of the two multi-code tables for this code (:func:`multi_code_table`): two codes per
    lookup from 12 bits in uint32 entries, or four from 11 bits in uint64 entries, whichever resolves more
    codes per lookup. Both are 16 KiB (a 32 KiB table measured slower: it competes with the stream and the
    output for the L1 cache). The default symbol (sign, exponent, two mantissa bits; codes ~5.6 bits on
    LLM-like weights) takes the pair table (~1.7 codes per lookup); the exponent-only symbol
    (``mantissa_bits: 0``, ~3.7 bits) the four-code table (~2.6 codes per lookup), and so does the exponent alone
    with the sign stored raw (version 6, ~2.7 bits: ~3.6 codes per lookup; measured by :func:`codes_per_lookup`
    on a synthetic 4096x4096 bf16 weight)."""
    pair, quad = (multi_code_table(lut, table_bits, raw_bits, *t) for t in (PAIR_TABLE, QUAD_TABLE))
    return quad if codes_per_lookup(quad) > codes_per_lookup(pair) else pair


# ---------------------------------------------------------------------------------------------------
# Codebook and header packing.

def _nibbles(seg: np.ndarray) -> np.ndarray:
    seg = seg.astype(np.uint8)
    if seg.size % 2:
        seg = np.concatenate([seg, np.zeros(1, np.uint8)])
    return (seg[0::2] | (seg[1::2] << 4)).astype(np.uint8)


def pack_codebook(lengths: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Nibble-pack the lengths of the used range of each half (positive / negative symbols)."""
    half = lengths.shape[0] // 2
    parts, bounds = [], []
    for base in (0, half):
        used = np.nonzero(lengths[base:base + half])[0]
        lo, hi = (base + int(used[0]), base + int(used[-1]) + 1) if used.size else (base, base)
        parts.append(_nibbles(lengths[lo:hi]))
        bounds += [lo, hi]
    return np.concatenate(parts), bounds


def unpack_codebook(codebook: np.ndarray, bounds: list[int], sym_bits: int) -> np.ndarray:
    lengths = np.zeros(1 << sym_bits, dtype=np.uint8)
    at = 0
    for lo, hi in ((bounds[0], bounds[1]), (bounds[2], bounds[3])):
        nb = (hi - lo + 1) // 2
        part = codebook[at:at + nb]
        seg = np.empty(part.size * 2, dtype=np.uint8)
        seg[0::2] = part & 0xF
        seg[1::2] = part >> 4
        lengths[lo:hi] = seg[: hi - lo]
        at += nb
    return lengths


def _crc(*arrays: np.ndarray) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).tobytes(), crc)
    return crc


def raw_section_bytes(lane_count: np.ndarray, raw_bits: int) -> np.ndarray:
    """Bytes of each lane's raw section."""
    return (lane_count * raw_bits + 7) // 8


def lane_layout(n: int, lane_size: int) -> tuple[int, int, np.ndarray]:
    """``(n_lanes, n_blocks, lane_count)`` for ``n`` weights."""
    n_lanes = -(-n // lane_size)
    n_blocks = -(-n_lanes // LANES_PER_BLOCK)
    count = np.full(n_lanes, lane_size, dtype=np.int64)
    if n_lanes:
        count[-1] = n - lane_size * (n_lanes - 1)
    return n_lanes, n_blocks, count


def stream_bytes(body_bytes: int) -> int:
    """Length of the stream holding ``body_bytes`` of lanes: rounded up to whole 64-bit words, then
    ``PAD_BYTES`` of zeros (the decoders' 64-bit reads past the last lane stay inside it)."""
    return -(-body_bytes // 8) * 8 + PAD_BYTES


def block_checksums(stream: np.ndarray, lane_start: np.ndarray) -> np.ndarray:
    """crc32 of every block's bytes, as int32 bit patterns."""
    n_lanes = lane_start.shape[0] - 1
    n_blocks = -(-n_lanes // LANES_PER_BLOCK)
    out = np.empty(n_blocks, dtype=np.uint32)
    mv = memoryview(stream)
    for b in range(n_blocks):
        a = int(lane_start[b * LANES_PER_BLOCK])
        e = int(lane_start[min((b + 1) * LANES_PER_BLOCK, n_lanes)])
        out[b] = zlib.crc32(mv[a:e])
    return out.view(np.int32)


def symbol_bits(dtype: str, sym_mant_bits: int, max_len: int, raw_sign: bool = False) -> int:
    """Width ``S`` of the coded symbol (sign, exponent, ``sym_mant_bits`` mantissa bits; with ``raw_sign`` no
    sign: it is stored raw, format version 6); checks ``max_len``.

    8-bit (fp8) words are coded whole (``S = 8``) whatever ``sym_mant_bits`` says; they cannot store the sign
    raw."""
    _, word_bits, exp_bits = DTYPES[dtype]
    if raw_sign and (word_bits == 8 or dtype in INT_DTYPES):
        raise ValueError(f"the sign can be stored raw only for 16- and 32-bit floats, not {dtype}")
    sym_bits = 8 if word_bits == 8 else int(not raw_sign) + exp_bits + sym_mant_bits
    # the decode-table entry keeps the code length in the 4 bits below the symbol (below the sign: R - 1)
    if word_bits > 8 and sym_bits > word_bits - 4 - int(raw_sign):
        raise ValueError(f"at most {word_bits - 5 - exp_bits} mantissa bits can join the symbol of {dtype}")
    if not 1 <= max_len <= MAX_CODE_LEN or max_len < sym_bits:
        raise ValueError(f"max code length must be in [{sym_bits}, {MAX_CODE_LEN}], got {max_len}")
    return sym_bits


def build_code(words: np.ndarray, dtype: str, sym_mant_bits: int, max_len: int,
               raw_sign: bool = False) -> tuple[np.ndarray, int]:
    """Per-tensor code lengths (package-merge) for the symbols of ``words`` (in symbol order: see
    :func:`raw_sign_order`); returns ``(lengths, S)``."""
    sym_bits = symbol_bits(dtype, sym_mant_bits, max_len, raw_sign)
    sym, _ = split_words(words.reshape(-1), DTYPES[dtype][1], sym_bits)
    counts = np.bincount(sym, minlength=1 << sym_bits)
    return package_merge_lengths(counts, max_len), sym_bits


def order0_entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy (bits per symbol) of a symbol histogram: the bound no symbol-by-symbol code beats."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    if n == 0:
        return 0.0
    p = c[c > 0] / n
    return float(-(p * np.log2(p)).sum())


def exponent_bound_from_counts(counts: np.ndarray, dtype: str) -> float:
    """Order-0 exponent bound (bits per weight) from a symbol histogram (see :func:`exponent_entropy_bits`)."""
    _, word_bits, exp_bits = DTYPES[dtype]
    sym_bits = int(np.log2(counts.shape[0]))
    exps = (np.arange(counts.shape[0]) >> (sym_bits - 1 - exp_bits)) & ((1 << exp_bits) - 1)
    c = np.bincount(exps, weights=counts, minlength=1 << exp_bits)
    n = c.sum()
    if n == 0:
        return 0.0
    p = c[c > 0] / n
    return float(-(p * np.log2(p)).sum()) + word_bits - exp_bits


def format_version(dtype: str, raw_sign: bool = False) -> int:
    """The version a tensor of ``dtype`` is written in: 5 for integer codes, 3 for floats, 6 for floats whose
    sign is stored raw."""
    return INT_VERSION if dtype in INT_DTYPES else RAW_SIGN_VERSION if raw_sign else VERSION


def assemble(dtype: str, n: int, lane_size: int, sym_bits: int, lengths: np.ndarray, lane_nbytes: np.ndarray,
             body: np.ndarray, row_len: int = 0, version: int | None = None, codes_per_word: int = 1,
             raw_sign: bool = False) -> Encoded:
    """Wrap an encoded body (the lanes back to back) into the container (``version``: default
    :func:`format_version`; 2 and 4 only for tests of old artifacts: 2 has no row length and no fp8, 4 one
    integer code per word). ``codes_per_word``: integer codes per word (version 5, kept in ``header[10]``);
    ``raw_sign``: the body's words were in :func:`raw_sign_order` (version 6).

    ``body`` is either the lanes alone (copied into a padded stream) or already the whole stream, padding
    included (:func:`stream_bytes` of the lanes' total, zero after it): then it is taken as it is, without a
    copy (the CPU encoder writes the lanes straight into it, so that coding a tensor holds its output once)."""
    version = format_version(dtype, raw_sign) if version is None else version
    if (version == RAW_SIGN_VERSION) != raw_sign:
        raise ValueError(f"floats whose sign is stored raw, and only they, are written in format version "
                         f"{RAW_SIGN_VERSION}")
    if version == 2 and (row_len or DTYPES[dtype][1] == 8):
        raise ValueError("format version 2 has no row length and no fp8")
    if (dtype in INT_DTYPES) != (version in (FIRST_INT_VERSION, INT_VERSION)):
        raise ValueError(f"integer codes, and only they, are written in format version {FIRST_INT_VERSION} or later")
    if dtype in INT_DTYPES:
        if row_len or codes_per_word not in (CODES_PER_WORD if version > FIRST_INT_VERSION else (1,)):
            raise ValueError(f"integer codes have no row length and 1, 2, 4 or 8 codes per word (1 in version "
                             f"{FIRST_INT_VERSION}), got {row_len} and {codes_per_word}")
        row_len = codes_per_word if version > FIRST_INT_VERSION else 0
    codebook, bounds = pack_codebook(lengths)
    lane_start = np.concatenate([[0], np.cumsum(lane_nbytes, dtype=np.int64)])
    total = int(lane_start[-1])
    if body.shape[0] == stream_bytes(total):
        stream = body
    elif body.shape[0] == total:
        stream = np.zeros(stream_bytes(total), dtype=np.uint8)
        stream[:total] = body
    else:
        raise ValueError(f"a body of {body.shape[0]} bytes for lanes of {total} bytes")
    header = np.array([MAGIC, version, DTYPES[dtype][0], n, lane_size, sym_bits, *bounds, row_len, 0],
                      dtype=np.int64)
    lane_nbytes = lane_nbytes.astype(np.int32)
    header[11] = _crc(header[:11], codebook, lane_nbytes)
    return Encoded(header, codebook, lane_nbytes, block_checksums(stream, lane_start), stream)


# ---------------------------------------------------------------------------------------------------
# Validation: nothing reaches a kernel before this passes.

def validate(enc: Encoded, verify_checksums: bool = True, where: str = "lossless tensor") -> Plan:
    """Check every field, offset and length of ``enc``; raise :class:`CorruptData` on any inconsistency."""
    def bad(msg: str) -> CorruptData:
        return CorruptData(msg, where)

    for name, dt in FIELDS.items():
        a = getattr(enc, name)
        if not isinstance(a, np.ndarray) or a.dtype != dt or a.ndim != 1:
            raise bad(f"{name} must be a 1-D {np.dtype(dt).name} array")
    h = enc.header
    if h.shape[0] != HEADER_LEN or int(h[0]) != MAGIC:
        raise bad("not a modelpress lossless tensor (bad header or magic)")
    version = int(h[1])
    if version not in READABLE_VERSIONS:
        raise bad(f"format version {version} is not supported (this modelpress reads versions "
                  f"{', '.join(map(str, READABLE_VERSIONS))})")
    if _crc(h[:11], enc.codebook, enc.lane_nbytes) != int(h[11]):
        raise bad("header, codebook or lane table fails its checksum")
    code, n, lane_size, sym_bits = (int(x) for x in h[2:6])
    bounds = [int(x) for x in h[6:10]]
    row_len = int(h[10])
    if code not in _DTYPE_BY_CODE or (version == 2 and code > 2) or (version < FIRST_INT_VERSION and
                                                                     _DTYPE_BY_CODE[code] in INT_DTYPES):
        raise bad(f"unknown dtype code {code}")
    dtype = _DTYPE_BY_CODE[code]
    _, word_bits, exp_bits = DTYPES[dtype]
    if n < 0 or lane_size < 1 or lane_size > (1 << 24):
        raise bad(f"bad element count {n} or lane size {lane_size}")
    codes_per_word = 1
    if version == INT_VERSION and dtype in INT_DTYPES:   # header[10]: codes per word, not a row length
        codes_per_word, row_len = row_len, 0
        if codes_per_word not in CODES_PER_WORD:
            raise bad(f"bad number of codes per word {codes_per_word}")
    elif version == INT_VERSION:
        raise bad(f"format version {version} holds integer codes only")
    raw_sign = version == RAW_SIGN_VERSION
    if raw_sign and (word_bits == 8 or dtype in INT_DTYPES):
        raise bad(f"format version {version} holds 16- and 32-bit floats only")
    if row_len < 0 or (version == 2 and row_len) or (row_len and (lane_size % row_len or n % row_len)):
        raise bad(f"bad row length {row_len} for lanes of {lane_size} and {n} weights")
    if not (sym_bits == 8 if word_bits == 8 else exp_bits + 1 - raw_sign <= sym_bits <= word_bits - 4 - raw_sign):
        raise bad(f"bad symbol width {sym_bits} for {dtype}")
    raw_bits = word_bits - sym_bits
    half = 1 << (sym_bits - 1)
    lo0, hi0, lo1, hi1 = bounds
    if (not 0 <= lo0 <= hi0 <= half or not half <= lo1 <= hi1 <= 2 * half
            or enc.codebook.shape[0] != (hi0 - lo0 + 1) // 2 + (hi1 - lo1 + 1) // 2):
        raise bad("codebook ranges do not match its size")
    lengths = unpack_codebook(enc.codebook, bounds, sym_bits)
    if int(lengths.max(initial=0)) > MAX_CODE_LEN or (n > 0 and not lengths.any()):
        raise bad("code lengths out of range")
    n_used = int(np.count_nonzero(lengths))
    if not (kraft_sum(lengths) == 1.0 or (n_used == 1 and int(lengths.max()) == 1) or (n == 0 and n_used == 0)):
        raise bad("code lengths do not form a complete prefix code (Kraft sum must be 1)")
    n_lanes, n_blocks, lane_count = lane_layout(n, lane_size)
    if enc.lane_nbytes.shape[0] != n_lanes or enc.checksums.shape[0] != n_blocks:
        raise bad(f"expected {n_lanes} lanes and {n_blocks} block checksums, found "
                  f"{enc.lane_nbytes.shape[0]} and {enc.checksums.shape[0]}")
    nb = enc.lane_nbytes.astype(np.int64)
    min_code = int(lengths[lengths > 0].min(initial=1))
    max_code = int(lengths.max(initial=1))
    raw_bytes = raw_section_bytes(lane_count, raw_bits)
    code_bytes = nb - raw_bytes
    if np.any(code_bytes < (lane_count * min_code + 7) // 8) or np.any(code_bytes > (lane_count * max_code + 7) // 8):
        raise bad("a lane's byte length is impossible for its weight count")
    lane_start = np.concatenate([[0], np.cumsum(nb)]).astype(np.int64)
    total = int(lane_start[-1])
    if enc.stream.shape[0] != stream_bytes(total):
        raise bad(f"stream is {enc.stream.shape[0]} bytes, the lane table implies "
                  f"{stream_bytes(total)} (truncated or padded)")
    if verify_checksums:
        if enc.stream[total:].any():  # the padding no block checksum covers: zero, as written
            raise bad("the stream's padding after its last lane is not zero")
        crcs = block_checksums(enc.stream, lane_start)
        wrong = np.nonzero(crcs != enc.checksums)[0]
        if wrong.size:
            raise bad(f"{wrong.size} of {n_blocks} blocks fail their crc32 (first: block {int(wrong[0])})")
    lut, table_bits = decode_table(lengths, word_bits, raw_sign)
    if word_bits == 16:
        multi_lut = multi_table(lut, table_bits, raw_bits - raw_sign)
    else:
        multi_lut = np.zeros(1, np.uint32)
    stream = enc.stream if enc.stream.flags.c_contiguous else np.ascontiguousarray(enc.stream)
    return Plan(dtype, n, word_bits, sym_bits, raw_bits, lane_size, lengths, lut, table_bits, lane_start,
                lane_count, raw_bytes, stream, stream.view(np.uint64), multi_lut, row_len, codes_per_word, raw_sign)


# ---------------------------------------------------------------------------------------------------
# Plain numpy / Python reference codec (slow; the kernels are tested bit-exactly against it).

def encode_reference(words: np.ndarray, dtype: str, lane_size: int = 16384, sym_mant_bits: int = 2,
                     max_len: int = 14, row_len: int = 0, version: int | None = None,
                     codes_per_word: int = 1, raw_sign: bool = False) -> Encoded:
    """Encode ``words`` (the raw bit patterns, uint8, uint16 or uint32) with numpy only; ``raw_sign``: store the
    sign raw (format version 6)."""
    _, word_bits, _ = DTYPES[dtype]
    words = np.ascontiguousarray(words.reshape(-1)).view(WORD_DTYPE[word_bits])
    sym_bits = symbol_bits(dtype, sym_mant_bits, max_len, raw_sign)
    raw_bits = word_bits - sym_bits
    if raw_sign:
        words = raw_sign_order(words, word_bits, raw_bits)
    lengths, sym_bits = build_code(words, dtype, sym_mant_bits, max_len, raw_sign)
    rev = reverse_bits(canonical_codes(lengths), lengths)
    sym, raw = split_words(words, word_bits, sym_bits)
    n = words.shape[0]
    n_lanes, _, lane_count = lane_layout(n, lane_size)
    pieces, nbytes = [], []
    for k in range(n_lanes):
        s = sym[k * lane_size: k * lane_size + int(lane_count[k])]
        r = raw[k * lane_size: k * lane_size + int(lane_count[k])]
        raw_part = _pack_lsb_first(r, np.full(r.shape[0], raw_bits, dtype=np.int64))
        code_part = _pack_lsb_first(rev[s], lengths[s].astype(np.int64))
        pieces += [raw_part, code_part]
        nbytes.append(raw_part.shape[0] + code_part.shape[0])
    body = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    return assemble(dtype, n, lane_size, sym_bits, lengths, np.array(nbytes, dtype=np.int64), body, row_len, version,
                    codes_per_word, raw_sign)


def _pack_lsb_first(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The low ``widths[i]`` bits of every value, back to back, least significant bit first, as bytes."""
    bit_idx = np.arange(int(widths.max(initial=0)))
    bits = ((values[:, None] >> bit_idx[None, :]) & 1).astype(np.uint8)
    return np.packbits(bits[bit_idx[None, :] < widths[:, None]], bitorder="little")


def decode_reference(enc: Encoded) -> np.ndarray:
    """Decode with a Python loop over weights (tests only): the bit patterns, uint16 or uint32."""
    p = validate(enc)
    bits = np.unpackbits(enc.stream, bitorder="little").astype(np.int64)
    out = np.zeros(p.n, dtype=np.int64)
    weights = 1 << np.arange(max(p.table_bits, p.raw_bits), dtype=np.int64)
    for k in range(p.lane_count.shape[0]):
        raw_pos = int(p.lane_start[k]) * 8
        pos = (int(p.lane_start[k]) + int(p.raw_bytes[k])) * 8
        end = int(p.lane_start[k + 1]) * 8
        for i in range(int(p.lane_count[k])):
            if pos > end:
                raise CorruptData(f"lane {k} runs past its end")
            raw = int(bits[raw_pos:raw_pos + p.raw_bits] @ weights[:p.raw_bits])
            raw_pos += p.raw_bits
            entry = int(p.lut[int(bits[pos:pos + p.table_bits] @ weights[:p.table_bits])])
            length = entry & 15
            out[k * p.lane_size + i] = ((entry >> 4) if p.word_bits == 8 else
                                        (entry - length) | deposit_raw(raw, p.raw_bits, p.raw_sign, p.word_bits))
            pos += length
        if pos > end or pos <= end - 8:
            raise CorruptData(f"lane {k} does not end where its length says")
    return out.astype(WORD_DTYPE[p.word_bits])


FUSED_ACC = 32


def linear_reference(w: np.ndarray, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ w.T + bias`` (float32 ``w`` ``(N, K)``, ``x`` ``(B, K)``) in the fused kernels' summation order:
    ``K`` is zero-padded to a multiple of ``FUSED_ACC`` = 32; every output has 32 partial sums, ``acc[j]``
    accumulating the products of every ``k = j (mod 32)`` in increasing ``k`` (each product and each sum
    rounded to float32, no fused multiply-add), then the halving tree ``acc[j] += acc[j + h]`` for
    ``h = 16, 8, 4, 2, 1``, then ``+ bias``. Both fused kernels (CPU and CUDA) reproduce this bit for bit."""
    w = np.asarray(w, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    k_pad = -(-x.shape[1] // FUSED_ACC) * FUSED_ACC
    wp = np.zeros((w.shape[0], k_pad), np.float32)
    xp = np.zeros((x.shape[0], k_pad), np.float32)
    wp[:, :w.shape[1]], xp[:, :x.shape[1]] = w, x
    acc = np.zeros((x.shape[0], w.shape[0], FUSED_ACC), dtype=np.float32)
    with np.errstate(all="ignore"):
        for c in range(0, k_pad, FUSED_ACC):
            acc += xp[:, None, c:c + FUSED_ACC] * wp[None, :, c:c + FUSED_ACC]
        h = FUSED_ACC // 2
        while h >= 1:
            acc[..., :h] += acc[..., h:2 * h]
            h //= 2
        y = acc[..., 0]
        return y + np.asarray(bias, dtype=np.float32) if bias is not None else y.copy()


def exponent_entropy_bits(words: np.ndarray, dtype: str) -> float:
    """Order-0 bound in bits per weight: exponent entropy plus the other bits stored raw."""
    _, word_bits, exp_bits = DTYPES[dtype]
    w = words.reshape(-1).astype(np.int64)
    sym = (w >> (word_bits - 1 - exp_bits)) & ((1 << exp_bits) - 1)
    if sym.size == 0:
        return 0.0
    c = np.bincount(sym)
    p = c[c > 0] / sym.size
    return float(-(p * np.log2(p)).sum()) + word_bits - exp_bits
