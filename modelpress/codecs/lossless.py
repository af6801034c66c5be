"""``dfloat11``: lossless entropy coding of float weights, decoded on the fly (DFloat11-style).

Paper: Zhang et al., "70% Size, 100% Accuracy: Lossless LLM Compression for Efficient GPU Inference via
Dynamic-Length Float" (DFloat11, 2025), section 3: the exponent of bf16 weights has ~2.6 bits of entropy,
so Huffman coding it (and keeping sign and mantissa raw) stores weights in ~70% of their size with
bit-identical outputs. Our codec (``modelpress.kernels.entropy``) codes sign, exponent and the top mantissa
bits jointly with an optimal length-limited canonical Huffman code, which lands below the order-0 exponent
bound; see docs/lossless.md for the format, the measured sizes and the differences from DFloat11.

Each selected ``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Embedding`` / ``nn.Conv2d`` is replaced by a module that
keeps only the encoded weight (five registered buffers, so the artifact's safetensors hold it). By default a
``LosslessLinear`` decodes its weight into a temporary tensor at every forward and calls ``F.linear``: the
outputs are bit-identical to the uncompressed model in the stored dtype (DFloat11's claim, Sec. 3). With
``fused_max_rows`` > 0 (the pass's ``fused_rows`` option) inputs of at most that many rows (tokens) run a fused
decode + matmul kernel that never writes the dense weight (CPU: numba; CUDA: numba.cuda), whose output equals
``entropy.linear_reference`` bit for bit and torch's ``F.linear`` up to float32 summation order. A
``LosslessEmbedding`` decodes only the lanes of the rows it looks up; ``LosslessConv2d`` decodes its kernel.
Peak memory is the compressed model plus at most one decoded weight. Tied weights (a causal LM's ``lm_head``
sharing its input embedding; DFloat11 Sec. 3 codes every weight matrix of the LLM) are coded once: both
replacements hold the same buffers, which the artifact stores once.

The only lossy step is the optional cast (``cast: true``) of a model whose weights are in another dtype
(e.g. fp32 -> bf16), which casts the whole model; with ``cast: false`` such a model is an error.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .. import distributed
from ..errors import CorruptData, UserError
from ..kernels import entropy as E
from ..model import ModelHandle, align_to_base, cast_weights, is_conv1d
from ..modules import compressed_modules, register_module, set_submodule
from ..passes import Context, Pass, PassConfig, in_model_order, register_pass
from ..quant.coded import FIELD_DTYPES, EntropyCodedCodes, encoding_pays

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_INT_VIEW = {8: torch.uint8, 16: torch.int16, 32: torch.int32}
#: a LosslessLinear forward on the CPU with at most this many rows (tokens) runs the fused decode + matmul
#: kernel; above it, decode once and torch's dense F.linear. Measured (benchmarks/lossless_kernels.py, 2
#: shared AVX2 cores, 4096x4096 bf16): the fused kernel beat decode + bf16 F.linear at every batch measured
#: (1-256), because torch's bf16 GEMM on a CPU without native bf16 runs at ~10 GFLOP/s; on a Zen 4 with
#: AVX512-BF16 the dense path wins from batch 4 on (fused / decode + dense: 0.87x at batch 1, 1.15x at 4), so
#: use 1 there. It is the recommended ``fused_rows`` of the dfloat11 pass on AVX2-only CPUs; the
#: default is 0 (never fused), so that outputs stay bit-identical to the uncompressed model.
FUSED_MAX_ROWS = 256
BUFFERS = tuple(E.FIELDS)
#: buffer sizes of a module built from an encoding: empty until ``_set_encoded`` puts the encoding's arrays in
#: (allocating and zeroing buffers of the final sizes first cost a third of the dfloat11 pass)
_UNFILLED = dict.fromkeys(BUFFERS, 0)


# ---------------------------------------------------------------------------------------------------
# Tensor-level API.

def tensor_words(weight: torch.Tensor) -> tuple[np.ndarray, str]:
    """The raw bit patterns of a float tensor (uint8 / uint16 / uint32, flat) and its dtype name."""
    dtype = str(weight.dtype).replace("torch.", "")
    if dtype not in E.DTYPES:
        raise UserError(f"lossless coding supports {', '.join(E.DTYPES)} tensors, not {dtype}")
    bits = E.DTYPES[dtype][1]
    flat = weight.detach().cpu().contiguous().reshape(-1).view(_INT_VIEW[bits])
    return flat.numpy().view(E.WORD_DTYPE[bits]), dtype


#: lane size (weights) aimed at for embedding tables: a lookup decodes whole lanes, so short lanes (one
#: 4096-wide row) make it ~4x cheaper than the default 16K-weight lanes, for ~0.008 more bits/weight of
#: lane lengths and checksums
EMBEDDING_LANE_WEIGHTS = 4096


def row_lane_size(lane_weights: int, row_len: int) -> int:
    """Lane size for rows of ``row_len`` weights: the whole number of rows closest to ``lane_weights`` from
    below (at least one row), so that every lane holds whole rows (format version 3)."""
    return max(1, lane_weights // row_len) * row_len


def encode_tensor(weight: torch.Tensor, block_size: int = 65536, mantissa_bits: int = 2,
                  max_code_length: int = 14, rows: bool | None = None,
                  lane_weights: int | None = None, raw_sign: bool = False) -> tuple[E.Encoded, float]:
    """Encode a bf16 / fp16 / fp32 / fp8 tensor losslessly (any shape; flattened in C order).

    ``raw_sign`` stores the sign raw with the low mantissa bits and codes only the exponent and ``mantissa_bits``
    mantissa bits (format version 6; with ``mantissa_bits=0`` DFloat11's own layout: shorter codes, more of them
    per table lookup; fp8 words are coded whole either way).

    ``rows`` (default: for 2-D tensors, i.e. Linear and Embedding weights) aligns the lanes to the rows of the
    last dimension (:func:`row_lane_size` of ``lane_weights``, default ``block_size / 4``), which the fused
    decode + matmul kernels and the row-wise embedding lookup need. Returns the encoding and the tensor's
    order-0 exponent bound in bits per weight (for reports)."""
    from ..kernels import entropy_cpu

    if block_size % E.LANES_PER_BLOCK:
        raise UserError(f"block_size must be a multiple of {E.LANES_PER_BLOCK}, got {block_size}")
    words, dtype = tensor_words(weight)
    rows = weight.dim() == 2 if rows is None else rows
    row_len = int(weight.shape[-1]) if rows and weight.dim() >= 1 and weight.shape[-1] > 0 else 0
    target = lane_weights or block_size // E.LANES_PER_BLOCK
    lane_size = row_lane_size(target, row_len) if row_len else block_size // E.LANES_PER_BLOCK
    if lane_size > 1 << 24:
        lane_size, row_len = block_size // E.LANES_PER_BLOCK, 0
    word_bits = E.DTYPES[dtype][1]
    raw_sign = raw_sign and word_bits > 8
    try:
        sym_bits = E.symbol_bits(dtype, mantissa_bits, max_code_length, raw_sign)
    except ValueError as exc:
        raise UserError(str(exc), "dfloat11") from None
    # the bound needs the sign-and-exponent histogram; the raw-sign encoder counts its own symbols
    counts = entropy_cpu.symbol_counts(words, word_bits, sym_bits + raw_sign)
    enc = entropy_cpu.encode(words, dtype, lane_size, mantissa_bits, max_code_length, None if raw_sign else counts,
                             row_len, raw_sign=raw_sign)
    return enc, E.exponent_bound_from_counts(counts, dtype)


def decode_tensor(enc: E.Encoded, shape: tuple[int, ...] | None = None, verify_checksums: bool = True,
                  where: str = "lossless tensor") -> torch.Tensor:
    """Validate and decode ``enc`` back into a tensor of its stored dtype."""
    plan = E.validate(enc, verify_checksums, where)
    return decode_plan(plan, shape if shape is not None else (plan.n,), where)


def numba_threads_like_torch() -> int:
    """Run numba's kernels on torch's intra-op thread count (capped by numba's pool) and return it.

    How the two pools share the cores: a forward is synchronous, so a numba kernel and a torch op never run at
    the same time; numba uses the same number of threads as torch, and its OpenMP workers wait passively
    (``OMP_WAIT_POLICY=PASSIVE``, see :mod:`modelpress.kernels.entropy_cpu`), so neither pool's idle threads
    spin on cores the other needs."""
    import numba

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def _words_to_torch(words: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor of ``dtype`` sharing the memory of its bit patterns ``words``."""
    bits = words.dtype.itemsize * 8
    t = torch.from_numpy(words.view(np.uint8) if bits == 8 else words.view(f"int{bits}"))
    return t.view(TORCH_DTYPES[dtype])


def decode_plan(plan: E.Plan, shape: tuple[int, ...], where: str = "lossless tensor") -> torch.Tensor:
    from ..kernels import entropy_cpu

    numba_threads_like_torch()
    out = torch.empty(plan.n, dtype=_INT_VIEW[plan.word_bits])
    entropy_cpu.decode_plan(plan, out.numpy().view(E.WORD_DTYPE[plan.word_bits]), where)
    return out.view(TORCH_DTYPES[plan.dtype]).reshape(shape)


def encoded_from_buffers(bufs: dict[str, torch.Tensor]) -> E.Encoded:
    return E.Encoded(**{k: bufs[k].detach().cpu().numpy() for k in BUFFERS})


# ---------------------------------------------------------------------------------------------------
# Compressed modules.

class _LosslessWeight(nn.Module):
    """Holds one encoded weight as buffers ``df11_<field>`` and decodes it on demand."""

    def _init_encoded(self, shape: tuple[int, ...], dtype: str, sizes: dict[str, int]) -> None:
        self.weight_shape = tuple(int(s) for s in shape)
        self.weight_dtype = dtype
        for k in BUFFERS:
            self.register_buffer(f"df11_{k}", torch.zeros(sizes[k], dtype=FIELD_DTYPES[k]))
        self._plan: E.Plan | None = None
        self._cuda: Any = None

    def _set_encoded(self, enc: E.Encoded, copy: bool = True) -> None:
        """Hold ``enc``'s arrays as the buffers: copies, or (``copy=False``, an encoding nobody else uses) the
        arrays themselves."""
        for k, a in enc.arrays().items():
            setattr(self, f"df11_{k}", torch.from_numpy(a.copy() if copy else a))
        self._plan = self._cuda = None

    def encoded_sizes(self) -> dict[str, int]:
        return {k: int(getattr(self, f"df11_{k}").numel()) for k in BUFFERS}

    def encoded(self) -> E.Encoded:
        return encoded_from_buffers({k: getattr(self, f"df11_{k}") for k in BUFFERS})

    def after_load(self) -> None:
        """Called by the artifact loader: forget the validated plan of the previous buffers."""
        self._plan = self._cuda = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._plan = self._cuda = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "_LosslessWeight":
        self._plan = self._cuda = None  # .to(device) replaces the buffers
        return super()._apply(fn, *args, **kwargs)

    def plan(self) -> E.Plan:
        """The validated decode plan (checksums verified once, then cached until new buffers load)."""
        if self._plan is None:
            plan = E.validate(self.encoded(), True, type(self).__name__)
            if plan.dtype != self.weight_dtype or plan.n != int(np.prod(self.weight_shape, dtype=np.int64)):
                raise CorruptData(f"encoded weight is {plan.n} x {plan.dtype}, the module expects "
                                    f"{self.weight_shape} x {self.weight_dtype}", type(self).__name__)
            self._plan = plan
        return self._plan

    def decoded_weight(self) -> torch.Tensor:
        """The dense weight, decoded now into a fresh tensor (nothing dense is kept): on the CPU with the
        numba CPU kernel, on a CUDA device with the numba CUDA kernel."""
        plan = self.plan()
        if self.df11_stream.device.type != "cuda":
            return decode_plan(plan, self.weight_shape, type(self).__name__)
        from numba import cuda

        out = torch.empty(plan.n, dtype=_INT_VIEW[plan.word_bits], device=self.df11_stream.device)
        self._cuda_decoder().decode(cuda.as_cuda_array(out))
        return out.view(TORCH_DTYPES[plan.dtype]).reshape(self.weight_shape)

    def _cuda_decoder(self) -> Any:
        from ..kernels.entropy_cuda import CudaDecoder

        if self._cuda is None:
            self._cuda = CudaDecoder(self.plan(), where=type(self).__name__)
        return self._cuda

    def compressed_bytes(self) -> int:
        return sum(int(getattr(self, f"df11_{k}").numel()) * getattr(self, f"df11_{k}").element_size()
                   for k in BUFFERS)

    def _weight_config(self) -> dict[str, Any]:
        return {"weight_shape": list(self.weight_shape), "weight_dtype": self.weight_dtype,
                "sizes": self.encoded_sizes()}


@register_module
class LosslessLinear(_LosslessWeight):
    """``nn.Linear`` whose weight is entropy coded and decoded at every forward."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, weight_dtype: str,
                 sizes: dict[str, int], fused_max_rows: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_encoded((out_features, in_features), weight_dtype, sizes)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=TORCH_DTYPES[weight_dtype])) if has_bias else None
        #: at most this many rows (tokens) per forward take the fused kernel (see ``FUSED_MAX_ROWS``); 0 =
        #: never, so that outputs are bit-identical to ``nn.Linear`` (torch's own summation order)
        self.fused_max_rows = int(fused_max_rows)

    @classmethod
    def from_linear(cls, lin: nn.Linear, enc: E.Encoded, fused_max_rows: int = 0,
                    copy: bool = True) -> "LosslessLinear":
        dtype = str(lin.weight.dtype).replace("torch.", "")
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, dtype,
                _UNFILLED, fused_max_rows)
        m._set_encoded(enc, copy)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return m

    def module_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "has_bias": self.bias is not None, "weight_dtype": self.weight_dtype, "sizes": self.encoded_sizes(),
                "fused_max_rows": self.fused_max_rows}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "LosslessLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["has_bias"], cfg["weight_dtype"], cfg["sizes"],
                   cfg.get("fused_max_rows", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Small batches (at most ``fused_max_rows`` rows): the fused decode + matmul kernel, which never
        writes the dense weight (CPU: numba, :func:`modelpress.kernels.entropy_cpu.fused_linear`; CUDA:
        :meth:`modelpress.kernels.entropy_cuda.CudaDecoder.linear`). Its output equals
        :func:`modelpress.kernels.entropy.linear_reference` on the decoded weight bit for bit and differs from
        torch's ``F.linear`` only by summation order (float32 accumulation both; after rounding to bf16 at
        most one bf16 ulp apart in practice, see docs/lossless.md). Larger batches, autograd, and weights
        whose lanes are not whole rows: decode once, then ``F.linear`` (bit-identical to ``nn.Linear``)."""
        rows = x.numel() // self.in_features if self.in_features else 0
        if self._fused_ok(x, rows):
            return self._fused(x, rows)
        return F.linear(x, self.decoded_weight(), self.bias)

    def _fused_ok(self, x: torch.Tensor, rows: int) -> bool:
        if rows > self.fused_max_rows or x.dtype != TORCH_DTYPES[self.weight_dtype] or x.dim() == 0:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        device = self.df11_stream.device.type
        if x.device.type != device or device not in ("cpu", "cuda"):
            return False
        if device == "cuda":
            return bool(self._cuda_decoder().fused_ok(self.in_features))
        from ..kernels.entropy_cpu import fused_supported

        return fused_supported(self.plan(), self.in_features)

    def _fused(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        plan, dtype = self.plan(), TORCH_DTYPES[self.weight_dtype]
        x2 = x.detach().reshape(rows, self.in_features).float()
        bias = None if self.bias is None else self.bias.detach().float()
        if x.device.type == "cuda":
            y = torch.empty(rows, self.out_features, dtype=torch.float32, device=x.device)
            self._cuda_decoder().linear(x2.contiguous(), bias, out=y)
        else:
            from ..kernels.entropy_cpu import fused_linear

            numba_threads_like_torch()
            y = torch.from_numpy(fused_linear(plan, x2.numpy(), None if bias is None else bias.numpy(),
                                              type(self).__name__))
        return y.to(dtype).reshape(*x.shape[:-1], self.out_features)

    def decompressed(self) -> nn.Linear:
        """The plain ``nn.Linear`` with the decoded weight (for export)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=TORCH_DTYPES[self.weight_dtype])
        lin.weight.data = self.decoded_weight()
        if self.bias is not None:
            lin.bias.data = self.bias.detach().clone()
        return lin.requires_grad_(False)


@register_module
class LosslessEmbedding(_LosslessWeight):
    """``nn.Embedding`` whose table is entropy coded and decoded at every forward."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, weight_dtype: str,
                 sizes: dict[str, int], max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.max_norm, self.norm_type = max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
        self._init_encoded((num_embeddings, embedding_dim), weight_dtype, sizes)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, enc: E.Encoded, copy: bool = True) -> "LosslessEmbedding":
        dtype = str(emb.weight.dtype).replace("torch.", "")
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, dtype,
                _UNFILLED, emb.max_norm, emb.norm_type,
                emb.scale_grad_by_freq, emb.sparse)
        m._set_encoded(enc, copy)
        return m

    def module_config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "weight_dtype": self.weight_dtype, "sizes": self.encoded_sizes(),
                "max_norm": self.max_norm, "norm_type": self.norm_type,
                "scale_grad_by_freq": self.scale_grad_by_freq, "sparse": self.sparse}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "LosslessEmbedding":
        return cls(**cfg)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table (models such as BERT read ``word_embeddings.weight.dtype``)."""
        return self.decoded_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """On the CPU (and without ``max_norm``, which renormalises the table): decode only the rows read
        (:meth:`rows`); else decode the table and ``F.embedding``. The same values either way."""
        if self.max_norm is None and ids.device.type == "cpu" and self.df11_stream.device.type == "cpu":
            return self.rows(ids)
        return F.embedding(ids, self.decoded_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``table[ids]``, decoding only the lanes that hold the distinct rows in ``ids`` (version-3 data: a
        lane is a whole number of rows; older data: the one or two lanes each row touches)."""
        from ..kernels.entropy_cpu import decode_rows

        flat = ids.detach().reshape(-1).to(torch.int64).numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise IndexError(f"index out of range in self (ids in [{flat.min()}, {flat.max()}], "
                             f"{self.num_embeddings} rows)")
        uniq, inverse = np.unique(flat, return_inverse=True)
        numba_threads_like_torch()
        words = decode_rows(self.plan(), uniq, self.embedding_dim, type(self).__name__)
        table = _words_to_torch(words, self.weight_dtype)
        return table[torch.from_numpy(inverse.reshape(-1))].reshape(*ids.shape, self.embedding_dim)

    def decompressed(self) -> nn.Embedding:
        """The plain ``nn.Embedding`` with the decoded table (for export)."""
        return nn.Embedding.from_pretrained(self.decoded_weight(), freeze=True, padding_idx=self.padding_idx,
                                            max_norm=self.max_norm, norm_type=self.norm_type,
                                            scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)


@register_module
class LosslessConv2d(_LosslessWeight):
    """``nn.Conv2d`` (zero padding) whose kernel is entropy coded and decoded at every forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], stride: list[int],
                 padding: list[int] | str, dilation: list[int], groups: int, has_bias: bool, weight_dtype: str,
                 sizes: dict[str, int]) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_encoded(shape, weight_dtype, sizes)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=TORCH_DTYPES[weight_dtype])) if has_bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, enc: E.Encoded, copy: bool = True) -> "LosslessConv2d":
        dtype = str(conv.weight.dtype).replace("torch.", "")
        m = cls(conv.in_channels, conv.out_channels, list(conv.kernel_size), list(conv.stride),
                conv.padding if isinstance(conv.padding, str) else list(conv.padding), list(conv.dilation),
                conv.groups, conv.bias is not None, dtype, _UNFILLED)
        m._set_encoded(enc, copy)
        if conv.bias is not None:
            m.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        return m

    def module_config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "has_bias": self.bias is not None,
                "weight_dtype": self.weight_dtype, "sizes": self.encoded_sizes()}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "LosslessConv2d":
        return cls(**cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.decoded_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def decompressed(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` with the decoded kernel (for export)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None, dtype=TORCH_DTYPES[self.weight_dtype])
        conv.weight.data = self.decoded_weight()
        if self.bias is not None:
            conv.bias.data = self.bias.detach().clone()
        return conv.requires_grad_(False)


@register_module
class LosslessConv1D(LosslessLinear):
    """transformers' GPT-2 ``Conv1D`` (``y = x @ W + b``, ``W`` stored ``[in, out]``) whose weight is entropy
    coded in its own layout and decoded at every forward; the product is Conv1D's own ``addmm``, so outputs
    are bit-identical to the uncoded layer."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, weight_dtype: str,
                 sizes: dict[str, int], fused_max_rows: int = 0) -> None:
        super().__init__(in_features, out_features, has_bias, weight_dtype, sizes, 0)  # always its own addmm
        self.weight_shape = (in_features, out_features)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, enc: E.Encoded, copy: bool = True) -> "LosslessConv1D":
        in_f, out_f = conv.weight.shape
        m = cls(in_f, out_f, conv.bias is not None, str(conv.weight.dtype).replace("torch.", ""),
                _UNFILLED)
        m._set_encoded(enc, copy)
        if conv.bias is not None:
            m.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.decoded_weight()
        bias = self.bias if self.bias is not None else torch.zeros(self.out_features, dtype=w.dtype, device=w.device)
        y = torch.addmm(bias, x.view(-1, x.size(-1)), w)
        return y.view(x.size()[:-1] + (self.out_features,))

    def decompressed(self) -> nn.Module:
        """transformers' ``Conv1D`` with the decoded weight (for export)."""
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(self.out_features, self.in_features).to(TORCH_DTYPES[self.weight_dtype])
        conv.weight.data = self.decoded_weight()
        if self.bias is not None:
            conv.bias.data = self.bias.detach().clone()
        else:
            conv.bias.data.zero_()
        return conv.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# The pass.

_KINDS: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Embedding": nn.Embedding, "Conv2d": nn.Conv2d}


def _selected(m: nn.Module, kinds: list[str]) -> bool:
    if is_conv1d(m):  # GPT-2's linear layers
        return "Linear" in kinds
    return type(m) in tuple(_KINDS[k] for k in kinds) and not (isinstance(m, nn.Conv2d) and m.padding_mode != "zeros")


def _candidates(module: nn.Module, kinds: list[str], min_elements: int
                ) -> tuple[list[tuple[str, nn.Module]], dict[str, str], list[str]]:
    """Modules to code; tied modules ``{path: path of the module coded first with the same weight}`` (a causal
    LM's ``lm_head`` and input embedding: coded once, the buffers shared); and tied modules left alone
    because another module sharing their weight is not coded."""
    sharing: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            sharing.setdefault(id(w), []).append((name, m))
    chosen, tied, skipped = [], {}, []
    for group in sharing.values():
        picked = [(n, m) for n, m in group if _selected(m, kinds) and m.weight.numel() >= min_elements]
        if not picked:
            continue
        if len(picked) < len(group):  # some other user of the weight would keep a dense copy
            skipped += [n for n, _ in group]
            continue
        chosen.append(picked[0])
        tied.update({n: picked[0][0] for n, _ in picked[1:]})
    order = {n: i for i, (n, _) in enumerate(module.named_modules())}
    return sorted(chosen, key=lambda c: order[c[0]]), tied, sorted(skipped, key=order.__getitem__)


def _coded_module(m: nn.Module, enc: E.Encoded, fused_rows: int = 0, copy: bool = True) -> nn.Module:
    """The coded replacement of ``m`` holding ``enc`` (``copy=False``: its arrays themselves)."""
    if is_conv1d(m):
        return LosslessConv1D.from_conv1d(m, enc, copy)
    if isinstance(m, nn.Linear):
        return LosslessLinear.from_linear(m, enc, fused_rows, copy)
    if isinstance(m, nn.Embedding):
        return LosslessEmbedding.from_embedding(m, enc, copy)
    return LosslessConv2d.from_conv(m, enc, copy)


@register_pass
class DFloat11(Pass):
    """Lossless entropy coding of weight matrices (DFloat11-style), decoded on the fly at inference."""

    name = "dfloat11"
    export_note = ("ONNX and ExecuTorch have no entropy codec: an export stores the weights decoded, "
                   "as large as the uncoded model (or larger, where the exporter writes them in float32)")

    class Config(PassConfig):
        #: dtype the weights are stored (and run) in
        dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
        #: cast a model in another dtype first (the only lossy step); false: such a model is an error
        cast: bool = True
        #: module types whose weights are coded
        modules: list[Literal["Linear", "Embedding", "Conv2d"]] = ["Linear", "Embedding", "Conv2d"]
        #: weights per block (the unit of checksums and CPU threads: four lanes with their own offsets)
        block_size: int = Field(65536, ge=1024, le=1 << 22, multiple_of=4)
        #: mantissa bits coded together with sign and exponent (the rest are stored raw)
        mantissa_bits: int = Field(2, ge=0, le=3)
        #: store the sign raw and code only exponent + ``mantissa_bits`` (format version 6; with ``mantissa_bits:
        #: 0`` DFloat11's layout, the fastest fused batch-1 kernel; see docs/lossless.md)
        raw_sign: bool = False
        #: longest Huffman code (decode table has 2**this entries)
        max_code_length: int = Field(14, ge=12, le=15)
        #: weights with fewer elements are left as they are (side data would dominate)
        min_elements: int = Field(4096, ge=0)
        #: inputs of at most this many rows (tokens) run the fused decode + matmul kernel (faster, outputs equal
        #: to F.linear up to float32 summation order); 0 keeps outputs bit-identical. Measured: 256 on AVX2-only
        #: CPUs (FUSED_MAX_ROWS), 1 with native bf16 (AVX512-BF16); ``mantissa_bits: 0`` with ``raw_sign: true``
        #: decodes fastest (recipes/lossless_fused.yaml)
        fused_rows: int = Field(0, ge=0, le=1 << 20)

    compresses = True
    follows_compression = True
    lossless = True

    @classmethod
    def refuses_after_compression(cls, config: PassConfig) -> str:
        if "dtype" in config.model_fields_set or ("cast" in config.model_fields_set and config.cast):
            return ("stacked on a compressing pass, dfloat11 codes what that pass stores exactly as it is and casts "
                    "nothing; remove 'dtype' / 'cast' (a 'cast' pass first casts the float model)")
        return ""

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        if compressed_modules(model.module):
            return self._apply_stacked(model, ctx)
        module, part = self._code(model.module, ctx)
        if part is None:  # another rank than 0, and only rank 0 uses the coded model
            return model
        self.record_units([part], ctx)
        return model.replace_module(module)

    units_independent = True

    def streams(self) -> bool:
        return True  # every weight is coded on its own

    def apply_unit(self, unit: ModelHandle, ctx: Context, base: nn.Module | None,
                   first_layer: int) -> tuple[ModelHandle, dict[str, Any]]:
        if compressed_modules(unit.module):
            raise UserError("dfloat11 stacked on a compressing pass does not stream yet; set stream: false", "dfloat11")
        module, part = self._code(unit.module, ctx)
        return unit.replace_module(module), part

    def _code(self, module: nn.Module, ctx: Context) -> tuple[nn.Module, dict[str, Any] | None]:
        """Cast (if asked) and code the weights of ``module``; returns it and the raw record part (``None`` on a
        rank other than 0 when only rank 0 uses the result: its share is coded and sent, the module is left
        as it is)."""
        cfg = self.config
        target = TORCH_DTYPES[cfg.dtype]
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if dtypes != {target}:
            if not cfg.cast:
                raise UserError(f"the model's weights are {sorted(str(d) for d in dtypes)}, not {cfg.dtype}; "
                                f"set cast: true to cast them first (lossy) or choose dtype to match", "dfloat11")
            cast_weights(module, target)
        chosen, tied, skipped = _candidates(module, list(cfg.modules), cfg.min_elements)
        originals = {n: module.get_submodule(n) for n in tied}
        coded: list[tuple[str, int, int, float, int]] = []  # name, elements, coded bytes, bound, element size
        encodings = self._encode_all(chosen, ctx)
        if encodings is None:
            return module, None
        for (name, m), (enc, bound) in zip(chosen, encodings):
            new = _coded_module(m, enc, cfg.fused_rows, copy=False)  # the encodings are this pass's own
            for other, owner in tied.items():  # the same coded buffers (stored once: artifact aliases)
                if owner == name:
                    twin = _coded_module(originals[other], enc, copy=False)  # its buffers are new's
                    for k in BUFFERS:
                        setattr(twin, f"df11_{k}", getattr(new, f"df11_{k}"))
                    set_submodule(module, other, twin)
            coded.append((name, m.weight.numel(), enc.nbytes, bound, m.weight.element_size()))
            if name:
                set_submodule(module, name, new)
            else:
                module = new
        return module, {"dtypes": sorted(str(d).replace("torch.", "") for d in dtypes), "coded": coded,
                        "tied": tied, "skipped": skipped}

    def _encode_all(self, chosen: list[tuple[str, nn.Module]], ctx: Context
                    ) -> list[tuple[E.Encoded, float]] | None:
        """:func:`encode_tensor` of every chosen weight; with several ranks each codes its share (by weight
        count, :func:`modelpress.distributed.owners`): the same bytes as one process, since coding a weight
        depends on that weight only. Every rank gets every encoding (:func:`~modelpress.distributed.map_shared`),
        or, when only rank 0 uses the result (:meth:`Context.result_on_main_only`), rank 0 alone gets them as raw
        arrays (:func:`~modelpress.distributed.map_to_main`) and the others get ``None``."""
        cfg = self.config

        def encode(item: tuple[str, nn.Module]) -> tuple[E.Encoded, float]:
            m = item[1]
            return encode_tensor(m.weight, cfg.block_size, cfg.mantissa_bits, cfg.max_code_length,
                                 lane_weights=EMBEDDING_LANE_WEIGHTS if isinstance(m, nn.Embedding) else None,
                                 raw_sign=cfg.raw_sign)

        def encode_to_arrays(item: tuple[str, nn.Module]) -> tuple[list[np.ndarray], float]:
            enc, bound = encode(item)
            return list(enc.arrays().values()), bound

        numba_threads_like_torch()  # several ranks on one machine: one thread each (the launcher's OMP_NUM_THREADS)
        items, costs = ctx.progress(chosen, desc="dfloat11"), [m.weight.numel() for _, m in chosen]
        if not ctx.result_on_main_only():
            return distributed.map_shared(encode, items, costs)
        got = distributed.map_to_main(encode_to_arrays, items, costs)
        return None if got is None else [(E.Encoded(*arrays), bound) for arrays, bound in got]

    def record_units(self, parts: list[dict[str, Any]], ctx: Context,
                     rank: Callable[[str], int] | None = None) -> None:
        dtypes = sorted({d for p in parts for d in p["dtypes"]})
        per_module: dict[str, Any] = {}
        dense_bytes = coded_bytes = 0
        bound_bits = 0.0
        for name, n, nbytes, bound, element_size in in_model_order([c for p in parts for c in p["coded"]], rank,
                                                                   key=lambda c: c[0]):
            per_module[name] = {"elements": n, "bits_per_weight": round(nbytes * 8 / n, 4),
                                "exponent_bound": round(bound, 4)}
            dense_bytes += n * element_size
            coded_bytes += nbytes
            bound_bits += bound * n
        tied = {k: v for p in parts for k, v in p["tied"].items()}
        total = sum(v["elements"] for v in per_module.values())
        ctx.record(self.name, dtype=self.config.dtype, cast_from=None if dtypes == [self.config.dtype] else dtypes,
                   fused_rows=self.config.fused_rows,
                   modules=len(per_module), tied_shared={k: tied[k] for k in in_model_order(tied, rank)},
                   tied_skipped=in_model_order([n for p in parts for n in p["skipped"]], rank),
                   dense_bytes=dense_bytes, coded_bytes=coded_bytes,
                   bits_per_weight=round(coded_bytes * 8 / total, 4) if total else None,
                   exponent_bound_bits_per_weight=round(bound_bits / total, 4) if total else None,
                   per_module=per_module)

    def _apply_stacked(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        """After a compressing pass: code, losslessly and without any cast, what the artifact of that pass stores
        (docs/stacking.md): the integer codes of its quantized modules (:meth:`~modelpress.quant.coded.
        EntropyCodedCodes.entropy_code`) and the float weights of the plain layers left outside its compressed
        modules, in their own dtype, except those equal to the base's (a delta artifact takes them from the
        base). Each tensor only where its encoding makes the artifact smaller (:func:`~modelpress.quant.coded.
        encoding_pays`); outputs stay bit-identical."""
        cfg = self.config
        module = model.module
        owned = [p for p, _ in compressed_modules(module)]
        codes = {p: m.entropy_code(cfg.block_size // E.LANES_PER_BLOCK, cfg.max_code_length)
                 for p, m in compressed_modules(module) if isinstance(m, EntropyCodedCodes)}
        from_base = _equal_to_base(module, ctx.base.module) if ctx.base is not None else set()
        chosen, tied, _ = _candidates(module, list(cfg.modules), cfg.min_elements)
        floats: dict[str, Any] = {}
        for name, m in chosen:
            if (not name or any(name == p or name.startswith(p + ".") for p in owned) or name in tied.values()
                    or f"{name}.weight" in from_base or str(m.weight.dtype).replace("torch.", "") not in TORCH_DTYPES):
                continue
            enc, _ = encode_tensor(m.weight, cfg.block_size, cfg.mantissa_bits, cfg.max_code_length,
                                   lane_weights=EMBEDDING_LANE_WEIGHTS if isinstance(m, nn.Embedding) else None,
                                   raw_sign=cfg.raw_sign)
            dense = m.weight.numel() * m.weight.element_size()
            pays = encoding_pays(enc.nbytes, dense)
            floats[name] = {"dtype": str(m.weight.dtype).replace("torch.", ""), "dense_bytes": dense,
                            "coded_bytes": enc.nbytes, "coded": pays}
            if pays:
                set_submodule(module, name, _coded_module(m, enc))
        streams = [s for per in codes.values() for s in per.values()]
        coded = [s for s in streams if s["coded"]]
        n_codes = sum(s["codes"] for s in coded)
        ctx.record(self.name, mode="stacked", cast_from=None,
                   integer_streams=len(streams), integer_streams_coded=len(coded),
                   integer_packed_bytes=sum(s["packed_bytes"] for s in coded),
                   integer_coded_bytes=sum(s["coded_bytes"] for s in coded),
                   bits_per_code=round(sum(s["coded_bytes"] for s in coded) * 8 / n_codes, 4) if n_codes else None,
                   entropy_bits_per_code=round(sum(s["entropy_bits"] * s["codes"] for s in coded) / n_codes, 4)
                   if n_codes else None,
                   float_modules_coded=sum(f["coded"] for f in floats.values()),
                   float_dense_bytes=sum(f["dense_bytes"] for f in floats.values() if f["coded"]),
                   float_coded_bytes=sum(f["coded_bytes"] for f in floats.values() if f["coded"]),
                   left_to_base=len(from_base), per_module={"codes": codes, "floats": floats})
        if not coded and not any(f["coded"] for f in floats.values()):
            ctx.warn(self.name, f"found nothing to code: of what the artifact stores, {len(streams)} integer code "
                                f"streams and {len(floats)} float weights of at least {cfg.min_elements} elements, "
                                "none is smaller entropy coded; the model is unchanged")
        return model.replace_module(module)


def _equal_to_base(module: nn.Module, base: nn.Module) -> set[str]:
    """State-dict keys of ``module`` equal to the base's tensor (a delta artifact refills them from the base)."""
    base_state = base.state_dict()
    own = module.state_dict()
    return {k for k, bk in align_to_base(module, base).items()
            if own[k].dtype == base_state[bk].dtype and own[k].shape == base_state[bk].shape
            and torch.equal(own[k], base_state[bk])}
