"""Entropy-coded integer codes: the shared packed format's codes, Huffman coded on disk.

Deep Compression (Han, Mao, Dally, ICLR 2016, Sec. 4) ends with Huffman coding of the quantized weights' codes:
their values are far from uniform (trained weights are bell-shaped, so the middle codes dominate), and an
order-0 code of them saves 20-30% losslessly. Here the codec is the one of the ``dfloat11`` pass
(:mod:`modelpress.kernels.entropy`: canonical Huffman with package-merge length limit, lanes, crc32 per block,
everything validated before a kernel runs), fed with the codes as bytes: one code per byte, or two (four,
eight) narrow codes per byte where that is smaller (container format version 5, dtype ``uint8``; version 4,
one code per byte, is still read).

:class:`EntropyCodedCodes` is the mixin of every compressed module that stores ``b``-bit codes as packed bit
streams (:func:`~modelpress.quant.primitives.pack_codes`): :class:`~modelpress.quant.packed.PackedWeight`
(GPTQ / RTN / EvoPress levels), the diffusion PTQ layers (:mod:`modelpress.quant.layers`) and Delta-CoMe's
factors. A module lists its code streams in :meth:`~EntropyCodedCodes.code_buffers`;
:meth:`~EntropyCodedCodes.entropy_code` replaces each stream *where it pays* (coded bytes, side data included,
below the packed bytes) by the five tensors of its encoding, ``<name>_ec_<field>``, and keeps the packed stream
as a non-persistent buffer: the layer computes from the same packed codes as before (outputs bit-identical),
and the artifact stores only the encoding. Loading decodes every encoding with the numba kernel of
:mod:`modelpress.kernels.entropy_cpu` and packs the words with :mod:`modelpress.kernels.bitpack` (checksums,
code values and count checked first).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import CorruptData
from ..kernels import bitpack
from ..kernels import entropy as E
from .primitives import packed_bytes

#: the torch dtype of each tensor of an encoding (:data:`modelpress.kernels.entropy.FIELDS`)
FIELD_DTYPES: dict[str, torch.dtype] = {k: torch.from_numpy(np.zeros(0, dt)).dtype for k, dt in E.FIELDS.items()}
SUFFIX = "_ec_"
#: what one more tensor costs on disk beyond its bytes, about: its entry in the safetensors header (name, dtype,
#: shape and offsets as JSON, ~60 bytes plus the name). An encoding is five tensors in place of one.
TENSOR_ENTRY_BYTES = 128


def encoding_pays(coded_bytes: int, plain_bytes: int) -> bool:
    """Whether storing a tensor's encoding (five tensors, ``coded_bytes`` in all) instead of the tensor
    (``plain_bytes``) makes the artifact smaller, the four extra safetensors header entries counted."""
    return coded_bytes + (len(E.FIELDS) - 1) * TENSOR_ENTRY_BYTES < plain_bytes


def codes_per_word_choices(bits: int) -> tuple[int, ...]:
    """How many ``bits``-bit codes one coded symbol may hold: 1, 2, 4 or 8, as long as they fit in a byte
    (so pairs for 2- to 4-bit codes, up to eight 1-bit codes, single 5- to 8-bit codes)."""
    return tuple(k for k in E.CODES_PER_WORD if k * bits <= 8)


def group_codes(codes: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Words of ``k`` consecutive codes each (code ``j k + i`` at bit ``i b``; the last word zero-filled): the
    ``k b``-bit fields of the packed code stream."""
    flat = np.ascontiguousarray(codes.reshape(-1), dtype=np.uint8)
    if k == 1:
        return flat
    padded = np.zeros(-(-flat.size // k) * k, dtype=np.uint8)
    padded[:flat.size] = flat
    fields = padded.reshape(-1, k)
    words = fields[:, 0].copy()
    for i in range(1, k):
        words |= fields[:, i] << np.uint8(i * bits)
    return words


def encode_codes(codes: np.ndarray, bits: int, lane_size: int = 16384, max_code_length: int = 14) -> E.Encoded:
    """Encode unsigned ``bits``-bit integer codes (any shape, flattened) with the lossless codec (format version
    5): as single codes and, where ``k`` codes fit in a byte, as words of ``k`` codes
    (:func:`codes_per_word_choices`); the smallest encoding, side data included, is kept (ties: fewer codes
    per word). Coding pairs is an order-0 code of the pairs' joint distribution, at most the single codes'
    order-0 entropy and rounded to whole bits once per two codes."""
    from ..kernels import entropy_cpu

    best = None
    for k in codes_per_word_choices(bits):
        enc = entropy_cpu.encode(group_codes(codes, bits, k), "uint8", lane_size, 0, max_code_length,
                                 codes_per_word=k)
        if best is None or enc.nbytes < best.nbytes:
            best = enc
    return best


def decode_packed(enc: E.Encoded, bits: int, count: int, where: str) -> np.ndarray:
    """Validate ``enc`` (header, codebook, lane table, crc32 of every block, the words' width and count against
    ``count`` codes of ``bits`` bits) and decode it with the numba kernel into the packed code stream
    (:func:`~modelpress.kernels.bitpack.pack_codes` of the codes, bit for bit); :class:`CorruptData` for
    anything inconsistent, before any kernel runs. The one thing only decoding shows, a last word with codes
    past ``count`` (the packed stream's padding must be zero), is refused after the kernel."""
    from ..kernels import entropy_cpu

    plan = E.validate(enc, True, where)
    k = plan.codes_per_word
    if plan.dtype != "uint8" or k * bits > 8 or plan.n != -(-count // k):
        raise CorruptData(f"encoded codes are {plan.n} x {plan.dtype} of {k} codes, the layer expects {count} "
                          f"codes of {bits} bits", where)
    if plan.lengths[1 << (k * bits):].any():
        raise CorruptData(f"the code table has values beyond {k} x {bits} bits", where)
    words = entropy_cpu.decode_plan(plan, None, where)
    tail = count - (plan.n - 1) * k
    if plan.n and int(words[-1]) >> (tail * bits):
        raise CorruptData(f"the last word holds codes past the {count} the layer has", where)
    return bitpack.pack_codes(words, k * bits)[:packed_bytes(count, bits)]


def code_histogram(codes: np.ndarray) -> np.ndarray:
    """How often each byte value occurs among ``codes`` (256 bins)."""
    return np.bincount(codes.reshape(-1), minlength=256)


class EntropyCodedCodes:
    """Mixin: the packed code streams of a compressed module, optionally stored entropy coded (see the module
    docstring). Subclasses define :meth:`code_buffers`; everything else is here."""

    def code_buffers(self) -> dict[str, tuple[int, int]]:
        """``{buffer name: (bits, number of codes)}`` of the packed code streams this module stores."""
        raise NotImplementedError

    def coded_sizes(self) -> dict[str, dict[str, int]]:
        """``{buffer name: {field: elements}}`` of the streams stored entropy coded (for the artifact's manifest:
        :meth:`prepare_coded` rebuilds empty tensors of these sizes before loading)."""
        return {name: {k: int(getattr(self, f"{name}{SUFFIX}{k}").numel()) for k in E.FIELDS}
                for name in getattr(self, "_coded_streams", ())}

    def prepare_coded(self, sizes: dict[str, dict[str, int]]) -> None:
        """Register empty encodings of ``sizes`` (from :meth:`coded_sizes`) for a load to fill."""
        streams = self.code_buffers()
        for name, fields in sizes.items():
            if name not in streams or set(fields) != set(E.FIELDS):
                raise CorruptData(f"{type(self).__name__} has no code stream {name!r} with fields {sorted(E.FIELDS)}")
            self._set_encoding(name, {k: torch.zeros(int(fields[k]), dtype=FIELD_DTYPES[k]) for k in E.FIELDS})

    def entropy_code(self, lane_size: int = 16384, max_code_length: int = 14) -> dict[str, dict[str, Any]]:
        """Entropy code every packed code stream where the encoding is smaller on disk (:func:`encoding_pays`); returns,
        per stream, its codes, bits, packed and coded bytes, order-0 entropy (bits per code) and whether it
        is now stored coded."""
        report = {}
        for name, (bits, count) in self.code_buffers().items():
            if name in getattr(self, "_coded_streams", ()):
                continue
            packed = getattr(self, name)
            codes = bitpack.unpack_codes(packed.detach().cpu().numpy(), bits, count)
            enc = encode_codes(codes, bits, lane_size, max_code_length)
            pays = encoding_pays(enc.nbytes, packed.numel() * packed.element_size())
            report[name] = {"codes": count, "bits": bits, "packed_bytes": packed.numel() * packed.element_size(),
                            "coded_bytes": enc.nbytes, "coded": pays, "codes_per_symbol": int(enc.header[10]),
                            "entropy_bits": round(E.order0_entropy_bits(code_histogram(codes)), 4)}
            if pays:
                self._set_encoding(name, {k: torch.from_numpy(a.copy()) for k, a in enc.arrays().items()})
        return report

    def _set_encoding(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        packed = getattr(self, name)
        self.register_buffer(name, packed, persistent=False)  # kept in memory, no longer stored
        for k, t in tensors.items():
            self.register_buffer(f"{name}{SUFFIX}{k}", t.to(packed.device))
        self._coded_streams = sorted({*getattr(self, "_coded_streams", ()), name})

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """After the module's own tensors are loaded, decode every encoding into its packed stream."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        streams = self.code_buffers()
        for name in getattr(self, "_coded_streams", ()):
            bits, count = streams[name]
            enc = E.Encoded(**{k: getattr(self, f"{name}{SUFFIX}{k}").detach().cpu().numpy() for k in E.FIELDS})
            packed = getattr(self, name)
            setattr(self, name, torch.from_numpy(decode_packed(enc, bits, count, f"{prefix}{name}")).to(packed.device))
