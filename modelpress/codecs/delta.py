"""Shared mechanics of delta compression (BitDelta, Delta-CoMe, DARE/DAREx).

A *delta* is ``W_ft - W_base`` for a tensor the fine-tune shares with its base. This module:

* finds the linear layers of any transformers / diffusers model generically (``nn.Linear`` and
  transformers' GPT-2 ``Conv1D``, whose weight is stored transposed, ``[in, out]``);
* matches them to the base with :func:`modelpress.model.align_to_base`;
* defines :class:`DeltaLinear`, the base class of every compressed delta module. It keeps the **base**
  weight under the original layer's state-dict name (``weight``, in the original layout) so the artifact
  can drop it and refill it from the base at load time, plus the fine-tune's bias, plus the method's own
  compressed tensors. ``forward(x) = base(x) + delta(x) + bias``;
* handles the non-linear tensors (embeddings, norms, biases) by option: ``keep`` the fine-tune's values
  (stored in full) or revert them to the ``base`` (their delta is dropped; the artifact then stores nothing
  for them). Tensors with no base counterpart (a new classification head) are always kept;
* re-exports the sign packing of :mod:`modelpress.quant.primitives` (BitDelta's and DARE's masks);
* counts the stored bytes of a compressed delta against the fp16 delta;
* draws calibration batches and reference outputs for the distillation / search steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.capture import model_hessians
from ..errors import UserError
from ..model import TEXT_KINDS, ModelHandle, align_to_base, is_conv1d, tied_names
from ..passes import Context, PassConfig

TensorOption = Literal["keep", "base"]


class DeltaConfig(PassConfig):
    """Options every delta pass shares: what happens to the tensors that are not compressed linear
    deltas (``keep`` the fine-tune's, or revert to the ``base``'s and store nothing), and module-path
    substrings left uncompressed."""

    embeddings: TensorOption | None = Field(
        None, description="keep the fine-tune's embeddings or revert them to the base; default: keep on causal LMs "
                          "(the LLM papers keep what they do not compress at full precision, BitDelta Sec. 3), base "
                          "otherwise")
    norms: TensorOption = "keep"
    biases: TensorOption = "keep"
    skip: list[str] = Field(default_factory=list, description="module-path substrings left uncompressed")

    def embeddings_for(self, kind: str) -> TensorOption:
        """The ``embeddings`` option, its default resolved for a model of ``kind``."""
        return self.embeddings or ("keep" if kind == "causal-lm" else "base")


# ---------------------------------------------------------------------------------------------------
# Finding linear layers


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2 style, weight ``[in, out]``)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_transposed(module: nn.Module) -> bool:
    return is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` whatever the layer's storage layout."""
    w = module.weight.detach()
    return w.t() if is_transposed(module) else w


def find_linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear layer of ``model`` (``nn.Linear`` and ``Conv1D``), by module path."""
    return [(name, m) for name, m in model.named_modules() if name and is_linear(m)]


@dataclass
class DeltaLayer:
    """One linear layer of the fine-tune matched to the base."""

    name: str                     # module path in the fine-tune
    module: nn.Module             # the fine-tune's layer
    base_weight: torch.Tensor     # the base's weight, in the layer's own storage layout
    transposed: bool

    @property
    def delta(self) -> torch.Tensor:
        """``W_ft - W_base`` as ``[out, in]`` float32 (subtracted in place: one float32 matrix in memory)."""
        d = self.module.weight.detach().to(torch.float32, copy=True).sub_(self.base_weight)
        return d.t().contiguous() if self.transposed else d

    @property
    def out_features(self) -> int:
        return self.delta_shape[0]

    @property
    def in_features(self) -> int:
        return self.delta_shape[1]

    @property
    def delta_shape(self) -> tuple[int, int]:
        s = tuple(self.module.weight.shape)
        return (s[1], s[0]) if self.transposed else (s[0], s[1])


def tied_linear_paths(model: nn.Module) -> list[str]:
    """Linear layers whose weight is tied to another module's (a causal LM's ``lm_head`` sharing the input
    embedding): they are an embedding, follow the ``embeddings`` option and are never compressed as a linear
    delta (that would untie them)."""
    tied = tied_names(model)
    names = set(tied) | set(tied.values())
    return [n for n, m in find_linear_layers(model) if f"{n}.weight" in names]


def match_linear_layers(model: nn.Module, base: nn.Module, skip: Iterable[str] = (),
                        copy_base: bool = True) -> list[DeltaLayer]:
    """The fine-tune's linear layers that have a same-shaped weight in the base (heads have none).

    ``skip`` lists module-path substrings to leave alone (e.g. ``["classifier"]``). ``copy_base``: each layer gets
    its own copy of the base weight (the delta modules keep it), so that the base model stays independent of the
    compressed one; a streamed unit, whose base unit is dropped after it, shares the base's tensors instead.
    """
    mapping = align_to_base(model, base)
    base_state = base.state_dict()
    out = []
    skip = tuple(skip)
    tied = {f"{path}.weight" for path in tied_linear_paths(model)}
    for name, mod in find_linear_layers(model):
        if any(s and s in name for s in skip) or f"{name}.weight" in tied:
            continue
        key = mapping.get(f"{name}.weight")
        if key is None or tuple(base_state[key].shape) != tuple(mod.weight.shape):
            continue
        weight = base_state[key].detach()
        out.append(DeltaLayer(name, mod, weight.clone() if copy_base else weight, is_transposed(mod)))
    return out


def require_base(name: str, model: ModelHandle, ctx: Context) -> ModelHandle:
    """The context's base model, or a clear error."""
    if ctx.base is None:
        raise UserError(f"pass {name!r} compresses a fine-tune against its base: set `base:` in the recipe",
                        "recipe")
    layers = match_linear_layers(model.module, ctx.base.module)
    if not layers:
        raise UserError(f"pass {name!r}: no linear layer of the model matches a layer of the base; "
                        "is `base:` the model this one was fine-tuned from?", "recipe")
    return ctx.base


# ---------------------------------------------------------------------------------------------------
# The delta module base class


class DeltaLinear(nn.Module):
    """A linear layer computing ``x W_base^T + delta(x) + b``; subclasses define ``delta_forward``.

    ``weight`` is the base weight (a buffer, in the replaced layer's layout: ``[out, in]`` for
    ``nn.Linear``, ``[in, out]`` for ``Conv1D``, and in the base's dtype) and ``bias`` the fine-tune's bias. ``base_op`` may be set
    to a callable replacing the base product (e.g. a bitsandbytes 8-bit / NF4 layer, see
    :func:`quantize_base`); it is not saved.
    """

    def __init__(self, in_features: int, out_features: int, has_bias: bool, transposed: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.transposed = transposed
        shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.register_buffer("weight", torch.zeros(shape))
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)
        self.base_op: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._cache: dict[str, torch.Tensor] = {}

    # -- construction helpers
    def _init_from(self, layer: DeltaLayer) -> None:
        # the base weight in the base's dtype, so that the artifact finds it equal to the base's and drops it
        self.weight = layer.base_weight.detach()  # match_linear_layers' copy (or a streamed unit's base tensor)
        if self.bias is not None:
            self.bias.copy_(layer.module.bias.detach())

    def _base_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "has_bias": self.bias is not None, "transposed": self.transposed}

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # noqa: D401 - torch hook
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "DeltaLinear":
        self._cache.clear()  # .to(device) replaces the buffers the cached tensors were made from
        return super()._apply(fn, *args, **kwargs)

    # -- math
    def base_weight_oi(self) -> torch.Tensor:
        """The base weight as ``[out, in]``."""
        return self.weight.t() if self.transposed else self.weight

    def delta_weight(self) -> torch.Tensor:
        """The dense reconstructed delta ``[out, in]`` (float32)."""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ delta^T``; subclasses may override with a cheaper product."""
        return F.linear(x, self.delta_weight().to(x.dtype))

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_op is not None:
            return self.base_op(x).to(x.dtype)
        return F.linear(x, self.base_weight_oi().to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x) + self.delta_forward(x)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def decompressed(self) -> nn.Linear:
        """The plain ``nn.Linear`` computing the same function, weight ``W_base + delta`` (for export)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight.data = (self.base_weight_oi().float() + self.delta_weight().float()).to(self.weight.dtype)
        if self.bias is not None:
            lin.bias.data = self.bias.detach().clone()
        return lin.requires_grad_(False)

    def compressed_tensors(self) -> dict[str, torch.Tensor]:
        """The method's own stored tensors (everything but ``weight`` and ``bias``)."""
        return {k: v for k, v in self.state_dict().items() if k not in ("weight", "bias")}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


# ---------------------------------------------------------------------------------------------------
# Non-linear tensors: embeddings, norms, biases


def classify_tensor(model: nn.Module, key: str) -> str:
    """``embedding``, ``norm``, ``bias``, ``linear`` or ``other`` for a state-dict key of ``model``."""
    path, _, leaf = key.rpartition(".")
    try:
        mod = model.get_submodule(path) if path else model
    except AttributeError:
        return "other"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)) or "norm" in type(mod).__name__.lower():
        return "norm"
    if is_linear(mod) or isinstance(mod, DeltaLinear):
        return "bias" if leaf == "bias" else "linear"
    if leaf == "bias":
        return "bias"
    return "other"


@torch.no_grad()
def handle_other_tensors(model: nn.Module, base: nn.Module, embeddings: TensorOption, norms: TensorOption,
                         biases: TensorOption) -> dict[str, list[str]]:
    """Apply the keep/base option to every non-linear tensor shared with the base.

    ``base`` copies the base's value into the fine-tune (the delta of that tensor is dropped);
    ``keep`` leaves the fine-tune's value (stored in full by the artifact if it differs from the base).
    Linear-layer biases follow ``biases``. Returns which keys were reverted and which kept-and-different.
    """
    mapping = align_to_base(model, base)
    base_state = base.state_dict()
    options = {"embedding": embeddings, "norm": norms, "bias": biases, "other": "keep"}
    reverted, kept = [], []
    own = dict(model.state_dict(keep_vars=True))
    for key, tensor in own.items():
        cls = classify_tensor(model, key)
        if cls == "linear" or key not in mapping:
            continue
        bt = base_state[mapping[key]]
        if bt.shape != tensor.shape or torch.equal(bt.to(tensor.dtype), tensor.detach()):
            continue
        if options[cls] == "base":
            tensor.data.copy_(bt.to(tensor.dtype))
            reverted.append(key)
        else:
            kept.append(key)
    return {"reverted": reverted, "kept": kept}


# ---------------------------------------------------------------------------------------------------
# Sizes


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def delta_size_report(model: nn.Module, base: nn.Module) -> dict[str, Any]:
    """Bytes of the compressed delta as stored, against the fp16 delta of the same tensors.

    *Stored*: every compressed tensor of each :class:`DeltaLinear` plus every other tensor of the model
    that differs from the base or has no base counterpart (kept norms, biases, embeddings, the head),
    at its stored dtype. *fp16 delta*: 2 bytes for every element of the same tensors (the linear
    layers' full deltas plus those other tensors).
    """
    mapping = align_to_base(model, base)
    base_state = base.state_dict()
    linear_stored = linear_fp16 = other = other_fp16 = 0
    delta_paths = set()
    for name, mod in model.named_modules():
        if isinstance(mod, DeltaLinear):
            delta_paths.add(name)
            linear_stored += sum(tensor_bytes(t) for t in mod.compressed_tensors().values())
            linear_fp16 += 2 * mod.in_features * mod.out_features
    seen: set[tuple[int, tuple[int, ...]]] = set()  # tied tensors (a tied lm_head) are stored once
    for key, t in model.state_dict().items():
        path, _, leaf = key.rpartition(".")
        if path in delta_paths and leaf == "weight":
            continue
        if (t.data_ptr(), tuple(t.shape)) in seen:
            continue
        seen.add((t.data_ptr(), tuple(t.shape)))
        bkey = mapping.get(key)
        if path in delta_paths and leaf != "bias":
            continue  # compressed tensors, counted above
        if bkey is not None and base_state[bkey].shape == t.shape and torch.equal(base_state[bkey].to(t.dtype), t):
            continue
        other += tensor_bytes(t)
        other_fp16 += 2 * t.numel()
    return {"linear_delta_bytes": linear_stored, "linear_fp16_bytes": linear_fp16,
            "other_bytes": other, "other_fp16_bytes": other_fp16,
            "total_bytes": linear_stored + other, "total_fp16_bytes": linear_fp16 + other_fp16,
            "linear_ratio": linear_fp16 / max(1, linear_stored),
            "total_ratio": (linear_fp16 + other_fp16) / max(1, linear_stored + other)}


# ---------------------------------------------------------------------------------------------------
# Calibration data and reference outputs


def calibration_batches(handle: ModelHandle, ctx: Context, pass_name: str, n_samples: int, batch_size: int,
                        seq_len: int = 128, offset: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Canonical input batches of the recipe's calibration data (``n_samples`` rounded up to whole batches
    of ``batch_size``), drawn with the recipe seed plus ``offset`` (each method its own draw)."""
    return ctx.calibration_batches(handle, pass_name, n_samples, batch_size, seq_len, offset)


def model_outputs(handle: ModelHandle, module: nn.Module, batch: tuple[torch.Tensor, ...],
                  target: Literal["output", "hidden", "both"] = "both") -> dict[str, torch.Tensor]:
    """The tensors compared in distillation and in DAREx's output-change search.

    ``output``: the canonical output (logits of a classifier; a causal LM's next-token logits at the real
    tokens, the logits BitDelta's Eq. 3 matches). ``hidden``: the last hidden state of a transformers text
    model (the last layer's output, masked to real tokens); other kinds have no separate hidden state and use
    the output.
    """
    out: dict[str, torch.Tensor] = {}
    if handle.kind in TEXT_KINDS and target in ("hidden", "both"):
        res = module(input_ids=batch[0], attention_mask=batch[1], output_hidden_states=True)
        hidden = res.hidden_states[-1] if getattr(res, "hidden_states", None) is not None else res.last_hidden_state
        out["hidden"] = hidden * batch[1].unsqueeze(-1).to(hidden.dtype)
        if target == "both":
            out["output"] = res.last_hidden_state if handle.kind == "encoder" else res.logits
    else:
        out["output"] = handle.replace_module(module).canonical()(*batch)
    if handle.kind == "causal-lm" and "output" in out:  # padding positions predict nothing
        out["output"] = out["output"] * batch[1].unsqueeze(-1).to(out["output"].dtype)
    return out


def output_mse(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the compared tensors of the mean squared difference."""
    return sum(F.mse_loss(a[k].float(), b[k].float()) for k in a)


def output_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Mean absolute change of the last layer's output (DAREx's unlabelled proxy)."""
    key = "hidden" if "hidden" in a else "output"
    return float((a[key].float() - b[key].float()).abs().mean())


#: the delta methods' input Hessian is ``X^T X / n`` (Delta-CoMe Sec. 3.3), not GPTQ's ``2 X^T X / n``
INPUT_HESSIAN_SCALE = 1.0


def collect_input_hessians(handle: ModelHandle, layers: list[DeltaLayer], batches: list[tuple[torch.Tensor, ...]],
                           ctx: Context, desc: str = "calibration") -> dict[str, torch.Tensor]:
    """``H = X^T X / n`` (float64, ``[in, in]``) of each layer's inputs over ``batches`` (real tokens only
    when the batch carries an attention mask; :func:`modelpress.data.capture.model_hessians`)."""
    return model_hessians(handle, [l.name for l in layers], ctx.progress(batches, desc=desc),
                          scale=INPUT_HESSIAN_SCALE)


# ---------------------------------------------------------------------------------------------------
# Quantized base (bitsandbytes)


def quantize_base(model: nn.Module, mode: Literal["int8", "nf4"]) -> int:
    """Run the base product of every :class:`DeltaLinear` through a bitsandbytes layer (LLM.int8() or
    NF4), as BitDelta does over a quantized base. The delta term stays exact. Returns the number of
    layers changed. The saved state is unchanged (the base is quantized on the fly, not stored)."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # pragma: no cover - bitsandbytes is a pinned dependency
        raise UserError(f"bitsandbytes is not importable ({exc})") from None
    n = 0
    for _name, mod in model.named_modules():
        if not isinstance(mod, DeltaLinear):
            continue
        w = mod.base_weight_oi().detach().float().contiguous()
        if mode == "int8":
            layer = bnb.nn.Linear8bitLt(mod.in_features, mod.out_features, bias=False, has_fp16_weights=False,
                                        threshold=6.0)
            layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        elif mode == "nf4":
            layer = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.float32,
                                      quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
        else:
            raise UserError(f"unknown base quantization {mode!r}; choose int8 or nf4")
        layer = layer.to("cpu") if not torch.cuda.is_available() else layer.to("cuda")
        mod.base_op = layer
        n += 1
    return n
