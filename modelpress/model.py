"""The model handle: a torch module plus what the methods need to know about it.

A *kind* names the model's role and fixes one canonical call signature, the same for the torch module,
its ONNX / .ort / .pte exports and every metric:

==============  ======================================================  ===================
kind            canonical inputs                                        canonical output
==============  ======================================================  ===================
``encoder``     ``input_ids, attention_mask`` (int64, [B, L])           last hidden state
``classifier``  ``input_ids, attention_mask``                           class logits [B, C]
``causal-lm``   ``input_ids, attention_mask`` (padding on the right)    next-token logits [B, L, V]
``unet``        ``sample [B, C, H, W], timestep [B] (int64)``           predicted noise
``unet-cond``   ``sample, timestep, encoder_hidden_states [B, L, D]``   predicted noise
==============  ======================================================  ===================

``architecture`` says how to rebuild the module without its weights (library, class and config), so an
artifact can be loaded anywhere without the source checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError

KINDS = ("encoder", "classifier", "causal-lm", "unet", "unet-cond")
#: the kinds whose canonical inputs are token ids and an attention mask
TEXT_KINDS = ("encoder", "classifier", "causal-lm")
#: the output attribute each transformers kind's canonical call returns
_OUTPUT_FIELD = {"encoder": "last_hidden_state", "classifier": "logits", "causal-lm": "logits"}


@dataclass
class ModelHandle:
    """A model and its metadata. ``extras`` carries kind-specific objects (tokenizer directory, scheduler
    config, zoo name) that methods and metrics may need."""

    module: nn.Module
    kind: str
    source: str
    architecture: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)

    def canonical(self) -> nn.Module:
        """The module behind the kind's canonical signature (see the module docstring)."""
        return canonical_module(self.module, self.kind)

    def replace_module(self, module: nn.Module) -> "ModelHandle":
        return ModelHandle(module, self.kind, self.source, self.architecture, dict(self.extras))

    def copy(self) -> "ModelHandle":
        """A handle over a deep copy of the module (passes change the model they are given in place)."""
        import copy

        return self.replace_module(copy.deepcopy(self.module))


def compute_device(module: nn.Module) -> torch.device:
    """The device a module computes on: that of its first parameter or buffer (the CPU if none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in: that of its first floating-point parameter or buffer (fp32 if none)."""
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in module.buffers():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


class _Canonical(nn.Module):
    """The kind's canonical call. Floating-point inputs are fed in the dtype the model computes in (a bf16 /
    fp16 model gets bf16 / fp16 samples and prompt embeddings); integer inputs (token ids, timesteps) as given."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner = inner
        self.kind = kind

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        dtype, device = compute_dtype(self.inner), compute_device(self.inner)
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype
                     else a for a in args)
        if device.type != "cpu":  # a model on a GPU takes CPU inputs and gives its output back on the CPU
            return self._call(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)).cpu()
        return self._call(*args)

    def _call(self, *args: torch.Tensor) -> torch.Tensor:
        if self.kind in _OUTPUT_FIELD:
            out = self.inner(input_ids=args[0], attention_mask=args[1])
            value = getattr(out, _OUTPUT_FIELD[self.kind], None)
            if value is None:
                raise UserError(f"a {type(self.inner).__name__} gives no {_OUTPUT_FIELD[self.kind]}: it is not "
                                f"a {self.kind} model (set model.kind to the model's kind)")
            return value
        if self.kind == "unet":
            return self.inner(args[0], args[1]).sample
        if self.kind == "unet-cond":
            return self.inner(args[0], args[1], encoder_hidden_states=args[2]).sample
        raise ValueError(f"unknown model kind {self.kind!r}")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2-style ``Conv1D``: a linear layer whose weight is stored transposed, ``[in, out]``
    (``y = x @ W + b``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is a dependency, but keep the module usable without it
        return False
    return isinstance(module, Conv1D)


def cast_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters and persistent buffers (what a checkpoint stores) to ``dtype``, in
    place. Non-persistent buffers (a rotary embedding's ``inv_freq``) keep their dtype, as in a model that
    transformers' ``from_pretrained(dtype=...)`` loads, or that an artifact of the cast weights rebuilds."""
    stored = set(module.state_dict(keep_vars=True))
    for name, p in module.named_parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for prefix, mod in module.named_modules():
        for name, b in list(mod._buffers.items()):
            key = f"{prefix}.{name}" if prefix else name
            if b is not None and b.is_floating_point() and key in stored:
                mod._buffers[name] = b.to(dtype)
    return module


def state_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s state dict as held in memory (parameters and buffers, their own dtypes)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def canonical_module(module: nn.Module, kind: str) -> nn.Module:
    """Wrap ``module`` so that it takes the kind's canonical positional inputs and returns one tensor."""
    if kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    return _Canonical(module, kind)


# ---------------------------------------------------------------------------------------------------
# Architectures: rebuild a module (random init) from a JSON-able description.

def describe_architecture(module: nn.Module) -> dict[str, Any]:
    """The library, class and config that rebuild ``module``'s structure."""
    config = getattr(module, "config", None)
    cls = type(module).__name__
    if hasattr(module, "_internal_dict") or type(module).__module__.startswith("diffusers"):
        return {"library": "diffusers", "class": cls, "config": dict(module.config)}
    if config is not None and hasattr(config, "to_dict"):
        return {"library": "transformers", "class": cls, "config": config.to_dict()}
    raise UserError(f"cannot describe a {cls} module: only transformers and diffusers models are supported")


def build_architecture(arch: dict[str, Any]) -> nn.Module:
    """Instantiate the module described by :func:`describe_architecture`, with fresh weights."""
    library, cls_name, config = arch["library"], arch["class"], dict(arch["config"])
    if library == "transformers":
        import transformers

        cls = getattr(transformers, cls_name, None)
        if cls is None:
            raise UserError(f"transformers has no model class {cls_name!r}")
        cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
        return cls(cfg).eval()
    if library == "diffusers":
        import diffusers
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise UserError(f"diffusers has no model class {cls_name!r}")
        clean = {k: v for k, v in config.items() if not k.startswith("_")}
        return cls.from_config(clean).eval()
    raise UserError(f"unknown model library {library!r}")


# ---------------------------------------------------------------------------------------------------
# Loading checkpoints by path.

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON ({exc.msg} at line {exc.lineno})", str(path)) from None


def guess_kind(arch: dict[str, Any]) -> str | None:
    cls = arch["class"]
    if cls == "UNet2DModel":
        return "unet"
    if cls == "UNet2DConditionModel":
        return "unet-cond"
    if cls.endswith("ForSequenceClassification"):
        return "classifier"
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if cls.endswith("Model") and arch["library"] == "transformers":
        return "encoder"
    return None


def check_kind(arch: dict[str, Any], kind: str, where: str) -> None:
    """A one-line error when ``kind`` (forced by ``model.kind``) cannot fit the class: a causal LM as an
    encoder, a UNet as a classifier. Classes whose kind cannot be told from their name are let through (their
    canonical call fails with a one-line error if the output is not there)."""
    if kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}", where)
    guessed = guess_kind(arch)
    text_lib = arch["library"] == "transformers"
    if (kind in TEXT_KINDS) != text_lib or (guessed is not None and guessed != kind):
        raise UserError(f"a {arch['class']} is not {'an' if kind == 'encoder' else 'a'} {kind} model"
                        + (f" (it is a {guessed} model: drop model.kind or set it to {guessed})" if guessed else ""),
                        where)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a corrupt or truncated file into a one-line error."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt headers and short files
        raise UserError(f"not a readable safetensors file ({str(exc).splitlines()[0]})", str(path)) from None


def checkpoint_record(files: list[Path], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the user's checkpoint is on disk: its weight files' bytes and the dtype its float tensors are
    stored in (the reference of every size in the report)."""
    counts: dict[str, int] = {}
    for t in state.values():
        if t.dtype.is_floating_point:
            name = str(t.dtype).replace("torch.", "")
            counts[name] = counts.get(name, 0) + t.numel()
    return {"bytes": sum(Path(f).stat().st_size for f in files), "files": [str(f) for f in files],
            "dtype": max(counts, key=counts.get) if counts else None}


def tied_names(module: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for every state-dict entry that is the same tensor as an earlier one (tied
    weights: a causal LM's ``lm_head.weight`` and its input embedding)."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, str] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if not t.numel():
            continue
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if sig in first:
            out[name] = first[sig]
        else:
            first[sig] = name
    return out


def load_weights_into(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` strictly; a missing, unexpected or mis-shaped tensor is a one-line error.

    Tensors keep the checkpoint's dtypes (a bf16 / fp16 checkpoint is not upcast to the float32 the module
    was built in). Tied weights stay tied: a checkpoint may hold only one name of a tied pair (a causal LM
    saved without ``lm_head.weight``); the other name takes the same tensor."""
    own = module.state_dict()
    # Older checkpoints carry buffers that are non-persistent now (BERT's position_ids): not weights.
    non_persistent = {name for name, _ in module.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in non_persistent}
    tied = tied_names(module)
    for name, target in tied.items():
        if name not in state and target in state:
            state[name] = state[target]
        elif target not in state and name in state:
            state[target] = state[name]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"weights do not match the config: {len(missing)} missing, {len(unexpected)} unexpected "
                        f"tensors ({detail})", where)
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"weights do not match the config: {k} has shape {tuple(v.shape)}, "
                            f"the config needs {tuple(own[k].shape)}", where)
    for k, v in state.items():
        if own[k].is_floating_point() != v.is_floating_point():
            raise UserError(f"weights do not match the config: {k} is {v.dtype}, the model needs "
                            f"{own[k].dtype}", where)
    # assign: every tensor keeps the checkpoint's dtype; then the tied names share one parameter again
    module.load_state_dict({k: v for k, v in state.items() if k not in tied}, strict=False, assign=True)
    for name, target in tied.items():
        path, _, leaf = name.rpartition(".")
        tpath, _, tleaf = target.rpartition(".")
        setattr(module.get_submodule(path), leaf, getattr(module.get_submodule(tpath), tleaf))


def checkpoint_paths(path: str | Path, config: str | Path | None = None) -> tuple[list[Path], Path]:
    """The weight files and the config.json of a checkpoint directory or a single ``.safetensors`` file."""
    p = Path(path)
    if not p.exists():
        raise UserError("no such file or directory", str(p))
    if p.is_dir():
        cfg_path = p / "config.json"
        weights = sorted(p.glob("*.safetensors"))
        if not weights:
            if list(p.glob("*.bin")) or list(p.glob("*.pt")):
                raise UserError("only safetensors checkpoints are loaded (pickle files are unsafe)", str(p))
            raise UserError("no .safetensors weights in this directory", str(p))
    else:
        if p.suffix != ".safetensors":
            raise UserError("expected a directory or a .safetensors file", str(p))
        cfg_path = Path(config) if config else p.parent / "config.json"
        weights = [p]
    if not cfg_path.exists():
        raise UserError("no config.json beside the weights (give one with model.config)", str(cfg_path))
    return weights, cfg_path


def read_architecture(cfg_path: Path) -> dict[str, Any]:
    """The architecture (library, class, config) a checkpoint's ``config.json`` describes, read without
    building the model (a bare transformers config names its class through its ``model_type``)."""
    cfg = _read_json(cfg_path)
    if "_diffusers_version" in cfg or "_class_name" in cfg:
        return {"library": "diffusers", "class": cfg.get("_class_name", "UNet2DModel"), "config": cfg}
    if cfg.get("architectures"):
        return {"library": "transformers", "class": cfg["architectures"][0], "config": cfg}
    if "model_type" not in cfg:
        raise UserError("config.json is neither a transformers nor a diffusers config", str(cfg_path))
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    cls = MODEL_MAPPING_NAMES.get(cfg["model_type"])
    if cls is None:
        import transformers

        try:
            cls = type(transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**cfg))).__name__
        except Exception as exc:
            raise UserError(f"cannot build the model from its config ({str(exc).splitlines()[0]})",
                            str(cfg_path)) from None
    return {"library": "transformers", "class": cls, "config": cfg}


def build_checkpoint_module(arch: dict[str, Any], cfg_path: Path) -> nn.Module:
    """:func:`build_architecture`, a config it cannot build being a one-line error naming the config file."""
    try:
        return build_architecture(arch)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot build the model from its config ({str(exc).splitlines()[0]})", str(cfg_path)) from None


def checkpoint_kind(path: str | Path, kind: str | None = None, config: str | Path | None = None) -> str:
    """The kind of the checkpoint at ``path``, read from its config alone: ``kind`` when it fits the model
    class (a one-line error when it does not), else the kind guessed from the class."""
    _, cfg_path = checkpoint_paths(path, config)
    arch = read_architecture(cfg_path)
    if kind is not None:
        check_kind(arch, kind, str(path))
        return kind
    guessed = guess_kind(arch)
    if guessed is None:
        raise UserError(f"cannot tell the kind of a {arch['class']}; set model.kind", str(path))
    return guessed


def load_checkpoint(path: str | Path, kind: str | None = None, config: str | Path | None = None) -> ModelHandle:
    """Load a Hugging Face transformers directory, a diffusers model directory, or a single
    ``.safetensors`` file whose ``config.json`` lies beside it (or is given as ``config``)."""
    p = Path(path)
    weights, cfg_path = checkpoint_paths(p, config)
    arch = read_architecture(cfg_path)
    module = build_checkpoint_module(arch, cfg_path)
    state: dict[str, torch.Tensor] = {}
    for w in weights:
        state.update(load_state_dict_file(w))
    state = align_prefix(module, state)
    if kind is not None:
        check_kind(arch, kind, str(p))
    load_weights_into(module, state, str(p))
    kind = kind or guess_kind(arch)
    if kind is None:
        raise UserError(f"cannot tell the kind of a {arch['class']}; set model.kind", str(p))
    extras: dict[str, Any] = {"checkpoint": checkpoint_record(weights, state), **tokenizer_extras(p, arch)}
    return ModelHandle(module.eval(), kind, str(p), describe_architecture(module), extras)


def tokenizer_extras(path: Path, arch: dict[str, Any]) -> dict[str, Any]:
    """``{"tokenizer_dir": ...}`` when a transformers checkpoint has its tokenizer beside its config."""
    d = path if path.is_dir() else path.parent
    return {"tokenizer_dir": str(d)} if arch["library"] == "transformers" and (d / "tokenizer.json").exists() else {}


def align_prefix(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints of a bare encoder sometimes carry the head class's prefix (``bert.``) or lack it."""
    own = module.state_dict().keys()
    if set(state) <= set(own):
        return state
    prefix = getattr(module, "base_model_prefix", "") + "."
    stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if set(stripped) <= set(own):
        return stripped
    added = {prefix + k if prefix + k in own else k: v for k, v in state.items()}
    return added if set(added) <= set(own) else state


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied weights): keep one name per storage, in order, and
    return the others as ``{other name: kept name}``."""
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if sig is not None and sig in seen:
            aliases[key] = seen[sig]
            continue
        if sig is not None:
            seen[sig] = key
        kept[key] = t.detach().contiguous()
    return kept, aliases


def save_checkpoint(handle: ModelHandle, directory: str | Path) -> None:
    """Write ``handle`` as a plain checkpoint directory (config.json + model.safetensors); a tied weight is written
    once, under its first name, as ``save_pretrained`` does (``lm_head.weight`` of a tied LM is left out)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(handle.architecture["config"])
    if handle.architecture["library"] == "diffusers":
        cfg["_class_name"] = handle.architecture["class"]
    else:
        cfg["architectures"] = [handle.architecture["class"]]
    (d / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    save_file(unique_tensors(handle.module.state_dict())[0], str(d / "model.safetensors"))


def sample_shape(handle: ModelHandle) -> tuple[int, int, int]:
    """``(C, H, W)`` of a UNet's samples (its config's ``in_channels`` and ``sample_size``; a recipe's
    ``model.sample_size``, ``extras["sample_size"]``, overrides the size: the latent size of a pipeline)."""
    cfg = handle.architecture["config"]
    size = handle.extras.get("sample_size") or cfg.get("sample_size", 16)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(cfg.get("in_channels", 1)), int(h), int(w)


def max_positions(handle: ModelHandle) -> int | None:
    """The longest input a text model takes (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    cfg = handle.architecture.get("config", {})
    n = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    return int(n) if n else None


def example_inputs(handle: ModelHandle, batch: int = 2, seq_len: int = 32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs in the kind's canonical signature (for tracing, export and smoke tests)."""
    g = torch.Generator().manual_seed(seed)
    cfg = handle.architecture["config"]
    if handle.kind == "causal-lm":
        vocab = int(cfg.get("vocab_size", 1000))
        return torch.randint(0, vocab, (batch, seq_len), generator=g), torch.ones(batch, seq_len, dtype=torch.long)
    if handle.kind in ("encoder", "classifier"):
        vocab = int(cfg.get("vocab_size", 1000))
        ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, seq_len), generator=g)
        ids[:, 0] = 101 if vocab > 2000 else 0  # [CLS] for BERT vocabularies
        return ids, torch.ones(batch, seq_len, dtype=torch.long)
    if handle.kind in ("unet", "unet-cond"):
        x = torch.randn(batch, *sample_shape(handle), generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        if handle.kind == "unet":
            return x, t
        dim = cfg.get("cross_attention_dim", 384)
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        return x, t, torch.randn(batch, 16, dim, generator=g)
    raise UserError(f"unknown model kind {handle.kind!r}")


def align_to_base(model: nn.Module, base: nn.Module) -> dict[str, str]:
    """Map each state-dict key of a fine-tune to the base model's key for the same tensor.

    Fine-tunes often wrap the base in a head class (``bert.encoder...`` vs ``encoder...``); keys are matched
    after stripping either model's ``base_model_prefix``. Keys with no counterpart (a new head) are absent.
    """
    base_keys = set(base.state_dict())
    out: dict[str, str] = {}
    prefixes = {getattr(model, "base_model_prefix", ""), getattr(base, "base_model_prefix", "")} - {""}
    for key in model.state_dict():
        candidates = [key] + [key[len(p) + 1:] for p in prefixes if key.startswith(p + ".")] + \
                     [f"{p}.{key}" for p in prefixes]
        for c in candidates:
            if c in base_keys:
                out[key] = c
                break
    return out


def is_transformers(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers model class (not a diffusers or torch one)."""
    return type(module).__module__.startswith("transformers")


def find_blocks(module: nn.Module) -> str:
    """The dotted path of the model's stack of repeated blocks: the longest ``nn.ModuleList`` whose items
    share one class and contain Linear layers (``model.layers`` of a Llama, ``bert.encoder.layer`` of a BERT);
    a one-line error when there is none (a UNet's blocks change channels and resolution: none repeats)."""
    best, best_len = "", 0
    if not is_transformers(module):
        raise UserError(f"a {type(module).__name__} has no stack of repeated blocks")
    for name, mod in module.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best_len and len({type(m) for m in mod}) == 1:
            if any(isinstance(m, nn.Linear) or is_conv1d(m) for m in mod[0].modules()):
                best, best_len = name, len(mod)
    if best_len < 2:
        raise UserError(f"a {type(module).__name__} has no stack of repeated blocks")
    return best


def output_head_path(model: nn.Module) -> str | None:
    """The module path of a causal LM's output projection (``lm_head``), ``None`` for other models."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
