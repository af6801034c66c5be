"""Entropy-coded integer codes: the shared packed format's codes, Huffman coded on disk.

Deep Compression (Han, Mao, Dally, ICLR 2016, Sec. 4) ends with Huffman coding of the quantized weights' codes:
their values are far from uniform (trained weights are bell-shaped, so the middle codes dominate), and an
order-0 code of them saves 20-30% losslessly. Here the codec is the one of the ``dfloat11`` pass
(:mod:`modelpress.kernels.entropy`: canonical Huffman with package-merge length limit, lanes, crc32 per block,
everything validated before a kernel runs), fed with the codes unpacked to one byte each (container format
version 4, dtype ``uint8``).

:class:`EntropyCodedCodes` is the mixin of every compressed module that stores ``b``-bit codes as packed bit
streams (:func:`~modelpress.quant.primitives.pack_codes`): :class:`~modelpress.quant.packed.PackedWeight`
(GPTQ / RTN / EvoPress levels), the diffusion PTQ layers (:mod:`modelpress.quant.layers`) and Delta-CoMe's
factors. A module lists its code streams in :meth:`~EntropyCodedCodes.code_buffers`;
:meth:`~EntropyCodedCodes.entropy_code` replaces each stream *where it pays* (coded bytes, side data included,
below the packed bytes) by the five tensors of its encoding, ``<name>_ec_<field>``, and keeps the packed stream
as a non-persistent buffer: the layer computes from the same packed codes as before (outputs bit-identical),
and the artifact stores only the encoding. Loading decodes every encoding with the numba kernel of
:mod:`modelpress.kernels.entropy_cpu` and packs the codes with :mod:`modelpress.kernels.bitpack` (checksums,
code values and count checked first).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import CorruptData
from ..kernels import bitpack
from ..kernels import entropy as E

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


def encode_codes(codes: np.ndarray, lane_size: int = 16384, max_code_length: int = 14) -> E.Encoded:
    """Encode unsigned integer codes (values below 256, any shape, flattened) with the lossless codec."""
    from ..kernels import entropy_cpu

    words = np.ascontiguousarray(codes.reshape(-1), dtype=np.uint8)
    return entropy_cpu.encode(words, "uint8", lane_size, 0, max_code_length)


def decode_codes(enc: E.Encoded, bits: int, count: int, where: str) -> np.ndarray:
    """Validate ``enc`` (header, codebook, lane table, crc32 of every block) and decode it with the numba
    kernel: ``count`` codes of ``bits`` bits as uint8; :class:`CorruptData` for anything inconsistent."""
    from ..kernels import entropy_cpu

    plan = E.validate(enc, True, where)
    if plan.dtype != "uint8" or plan.n != count:
        raise CorruptData(f"encoded codes are {plan.n} x {plan.dtype}, the layer expects {count} x uint8", where)
    if plan.lengths[1 << bits:].any():
        raise CorruptData(f"the code table has values beyond {bits} bits", where)
    return entropy_cpu.decode_plan(plan, None, where)


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
            enc = encode_codes(codes, lane_size, max_code_length)
            pays = encoding_pays(enc.nbytes, packed.numel() * packed.element_size())
            report[name] = {"codes": count, "bits": bits, "packed_bytes": packed.numel() * packed.element_size(),
                            "coded_bytes": enc.nbytes, "coded": pays,
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
            codes = decode_codes(enc, bits, count, f"{prefix}{name}")
            packed = getattr(self, name)
            setattr(self, name, torch.from_numpy(bitpack.pack_codes(codes, bits)).to(packed.device))
