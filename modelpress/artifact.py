"""The artifact: a directory holding a compressed model, its manifest, and what the run made of it.

::

    <output>/
      model.safetensors   every tensor of the compressed model (packed ints, codes, scales), never pickle
      modelpress.json     manifest: format version, package version, recipe, pass log, per-tensor codec,
                          compressed-module configs, sha256 of every input checkpoint
      recipe.yaml         the recipe as given
      exports/            onnx / ort / pte files           (pipeline)
      report.json, report.md, *.png                        (pipeline)

A delta artifact does not store tensors equal to the base model's: the manifest lists them under
``from_base`` and loading refills them from the base, after checking the base's sha256.

Writing goes to a staging directory beside ``output`` that replaces it only at the end, so a failed,
interrupted or killed run leaves nothing at ``output`` and an earlier artifact there intact, and two runs
writing the same ``output`` at once end with one complete artifact (the last to finish), never a mix; see
:func:`atomic_directory`.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .errors import UserError
from .model import ModelHandle, align_to_base, build_architecture, load_state_dict_file, unique_tensors
from .modules import compressed_modules, module_class, set_submodule

FORMAT = "modelpress-artifact"
FORMAT_VERSION = 1
MANIFEST = "modelpress.json"
WEIGHTS = "model.safetensors"


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a checkpoint: sha256 over sorted names, dtypes, shapes and raw bytes.

    It identifies a model independently of its file format, so a base can be checked however it is stored."""
    h = hashlib.sha256()
    for key in sorted(state):
        hash_tensor(h, key, state[key])
    return h.hexdigest()


def hash_tensor(h: Any, key: str, tensor: torch.Tensor) -> None:
    """Add one named tensor to a :func:`tensors_sha256` hash (callers feed the names in sorted order)."""
    t = tensor.detach().contiguous().cpu()
    h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy() if t.numel() else b"")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    system or file system cannot (the caller then renames in two steps)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` itself for the block (no lock file is left behind; no lock
    where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_and_clean(output: Path) -> None:
    """Under the lock: put back an earlier artifact a killed two-step swap left aside (``output`` missing, its
    ``.old-*`` copy present), and remove staging and aside directories of processes that no longer run."""
    parent, name = output.parent, output.name
    asides = sorted(parent.glob(f".{glob.escape(name)}.old-*"))
    if not output.exists() and asides:
        asides[-1].rename(output)
        asides = asides[:-1]
    for d in [*parent.glob(f".{glob.escape(name)}.partial-*"), *asides]:
        pid = d.name.rsplit("-", 2)[-2]
        if not pid.isdigit() or not _pid_alive(int(pid)) or d in asides:
            shutil.rmtree(d, ignore_errors=True)


@contextmanager
def atomic_directory(output: Path) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``output``; when the block succeeds it replaces ``output``, when
    it raises (an error, Ctrl-C) it is removed and ``output`` is untouched.

    The replacement is one atomic step where the system has ``renameat2(RENAME_EXCHANGE)`` (Linux): staging
    and ``output`` are exchanged, then the old artifact (now in the staging path) is removed. Elsewhere
    ``output`` is renamed aside to ``.<name>.old-<pid>-<id>`` and staging renamed into place; a process killed
    between the two renames leaves the aside copy, which the next run on ``output`` puts back. The swap and
    that recovery hold an exclusive lock (``flock``) on the directory that holds ``output``, so two runs
    writing the same ``output`` at once commit one after the other: each commit is a whole artifact, the last
    one stays, and no files are mixed. Staging directories of killed runs (``.<name>.partial-<pid>-<id>``
    whose process is gone) are removed by the next run on ``output``."""
    output = Path(output)
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = parent / f".{output.name}.partial-{token}"
    with _locked(parent):
        _recover_and_clean(output)
        staging.mkdir()
    _LIVE_STAGING.add(staging)
    try:
        yield staging
        old = _commit(staging, output, parent / f".{output.name}.old-{token}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _LIVE_STAGING.discard(staging)
    if old is not None:  # outside the lock: a large old artifact may take a while to delete
        shutil.rmtree(old, ignore_errors=True)


#: staging directories of this process not yet committed or removed (see :func:`discard_staging`)
_LIVE_STAGING: set[Path] = set()


def discard_staging() -> None:
    """Remove this process's uncommitted staging directories: what a worker terminated by its launcher (another
    rank failed) does before it exits, so that nothing half written remains."""
    for staging in list(_LIVE_STAGING):
        shutil.rmtree(staging, ignore_errors=True)
        _LIVE_STAGING.discard(staging)


def _commit(staging: Path, output: Path, aside: Path) -> Path | None:
    """Under the lock, put ``staging`` in place of ``output``; returns where the previous artifact now is (to
    be deleted), ``None`` if there was none."""
    with _locked(output.parent):
        _recover_and_clean(output)
        if not output.exists():
            staging.rename(output)
            return None
        if _exchange(staging, output):
            return staging  # the previous artifact, now at the staging path
        output.rename(aside)
        staging.rename(output)
        return aside


def _codec_of(key: str, modules: list[dict[str, Any]], dtype: torch.dtype) -> str:
    for m in modules:
        if m["path"] == "" or key.startswith(m["path"] + "."):
            return m["class"]
    return f"raw-{str(dtype).replace('torch.', '')}"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def artifact_state(module: nn.Module, base: nn.Module | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """What the artifact stores of ``module``: its state dict with each shared tensor once (``aliases``: other
    name -> stored name) and, for a delta, without the tensors equal to the base's (``from_base``: name -> the
    base's name), in state-dict order."""
    state, aliases = unique_tensors(module.state_dict())
    from_base: dict[str, str] = {}
    if base is not None:
        base_state = base.state_dict()
        for key, base_key in align_to_base(module, base).items():
            if key in state and state[key].dtype == base_state[base_key].dtype \
                    and state[key].shape == base_state[base_key].shape and torch.equal(state[key], base_state[base_key]):
                from_base[key] = base_key
                del state[key]
    return state, aliases, from_base


def _module_entry(path: str, module: nn.Module) -> dict[str, Any]:
    """A compressed module's manifest entry: path, class, config and, for a module whose integer codes are
    stored entropy coded (:class:`~modelpress.quant.coded.EntropyCodedCodes`), the sizes of their encodings."""
    entry = {"path": path, "class": type(module).__name__, "config": _jsonable(module.module_config())}
    coded = module.coded_sizes() if callable(getattr(module, "coded_sizes", None)) else {}
    if coded:
        entry["coded"] = coded
    return entry


def module_entries(module: nn.Module) -> list[dict[str, Any]]:
    """The manifest's ``compressed_modules``: one :func:`_module_entry` per compressed module."""
    return [_module_entry(p, m) for p, m in compressed_modules(module)]


def tensor_entry(key: str, dtype: torch.dtype, shape: tuple[int, ...], modules: list[dict[str, Any]]) -> dict[str, Any]:
    """One tensor's entry in the manifest's ``tensors``: its codec, dtype, shape and bytes."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return {"codec": _codec_of(key, modules, dtype), "dtype": str(dtype).replace("torch.", ""),
            "shape": list(shape), "bytes": numel * dtype.itemsize}


def build_manifest(handle: ModelHandle, modules: list[dict[str, Any]], tensors: dict[str, Any],
                   aliases: dict[str, str], from_base: dict[str, str], *, recipe: dict[str, Any] | None = None,
                   pass_log: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of an artifact of ``handle`` (its module is not read: kind, source, architecture, extras)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modelpress_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": handle.kind,
        "source": handle.source,
        "architecture": _jsonable(handle.architecture),
        # the input checkpoint's record describes the input, not this artifact (its sha256 is under "inputs")
        "extras": _jsonable({k: v for k, v in handle.extras.items()
                             if k != "checkpoint" and isinstance(v, (str, int, float, bool, dict, list))}),
        "recipe": recipe or {},
        "passes": _jsonable(pass_log or {}),
        "compressed_modules": modules,
        "tensors": tensors,
        "aliases": aliases,
        "from_base": from_base,
        "inputs": inputs or {},
    }


#: the one metadata entry of the weights file (one key: safetensors orders metadata keys randomly)
WEIGHTS_METADATA = {"format": f"{FORMAT}/{FORMAT_VERSION}"}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1))


def write_artifact(directory: Path, handle: ModelHandle, *, recipe: dict[str, Any] | None = None,
                   pass_log: dict[str, Any] | None = None, base: ModelHandle | None = None,
                   inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the model and manifest into ``directory`` (a staging directory); returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, aliases, from_base = artifact_state(handle.module, base.module if base is not None else None)
    modules = module_entries(handle.module)
    tensors = {k: tensor_entry(k, t.dtype, tuple(t.shape), modules) for k, t in state.items()}
    manifest = build_manifest(handle, modules, tensors, aliases, from_base, recipe=recipe, pass_log=pass_log,
                              inputs=inputs)
    save_file(state, str(directory / WEIGHTS), metadata=WEIGHTS_METADATA)
    write_manifest(directory, manifest)
    return manifest


class WeightsSpool:
    """Writes ``model.safetensors`` a few tensors at a time, byte for byte what safetensors' ``save_file`` writes
    for the same tensors (streamed compression: the artifact is the same as the in-memory path's).

    :meth:`add` appends each tensor's bytes to a spool file beside the output and forgets the tensor;
    :meth:`finish` writes the safetensors header (tensors ordered as safetensors orders them: by dtype, widest
    first, then by name; offsets follow that order), then copies the bytes from the spool in that order, and
    deletes the spool. Peak memory is one tensor plus a copy buffer; the disk holds the artifact twice
    until the end."""

    _COPY = 16 << 20

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool = open(self.spool_path, "wb")
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}  # dtype, shape, offset, bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        offset = self._spool.tell()
        self._spool.write(memoryview(data) if t.numel() else data)
        self.entries[name] = (t.dtype, tuple(t.shape), offset, t.numel() * t.element_size())

    def _order(self) -> list[str]:
        """safetensors' own order of the tensors, asked of safetensors (empty tensors of the same names and
        dtypes: the order depends on nothing else)."""
        from safetensors.torch import save

        blob = save({k: torch.empty(0, dtype=e[0]) for k, e in self.entries.items()})
        n = int.from_bytes(blob[:8], "little")
        return [k for k in json.loads(blob[8:8 + n]) if k != "__metadata__"]

    def finish(self, metadata: dict[str, str]) -> None:
        from safetensors.torch import _TYPES  # safetensors' dtype names

        names = {v: k for k, v in _TYPES.items()}
        self._spool.close()
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        order = self._order()
        for k in order:
            dtype, shape, _, nbytes = self.entries[k]
            header[k] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(self.path, "wb") as out, open(self.spool_path, "rb") as spool:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for k in order:
                _, _, start, nbytes = self.entries[k]
                spool.seek(start)
                while nbytes:
                    chunk = spool.read(min(nbytes, self._COPY))
                    out.write(chunk)
                    nbytes -= len(chunk)
        self.spool_path.unlink()

    def close(self) -> None:
        """Drop the spool (after an error)."""
        if not self._spool.closed:
            self._spool.close()
        self.spool_path.unlink(missing_ok=True)


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    mf = p / MANIFEST
    if not p.is_dir() or not mf.exists():
        raise UserError("not a modelpress artifact (no modelpress.json)", str(p))
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"corrupt manifest ({exc.msg} at line {exc.lineno})", str(mf)) from None
    if manifest.get("format") != FORMAT:
        raise UserError("not a modelpress artifact manifest", str(mf))
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(f"artifact format {manifest['format_version']} is newer than this modelpress "
                        f"understands ({FORMAT_VERSION}); upgrade modelpress", str(mf))
    return manifest


def _resolve_base(manifest: dict[str, Any], base: ModelHandle | str | None, where: str) -> ModelHandle:
    from .sources import load_model

    info = manifest["inputs"].get("base") or {}
    if base is None:
        if not info.get("source"):
            raise UserError("this delta artifact needs its base model, and the manifest names none", where)
        base = info["source"]
    if isinstance(base, str):
        base = load_model(base)
    check_base_sha256(manifest, tensors_sha256(base.module.state_dict()), where)
    return base


def check_base_sha256(manifest: dict[str, Any], sha256: str, where: str) -> None:
    """The base given to a delta artifact is the one it was made against (its tensors' sha256, one-line error)."""
    info = manifest["inputs"].get("base") or {}
    expected = info.get("sha256")
    if expected and sha256 != expected:
        raise UserError(f"wrong base model: its sha256 does not match the one this delta was made against "
                        f"({expected[:12]}…, {info.get('source')})", where)


def compressed_module(entry: dict[str, Any], where: str) -> nn.Module:
    """The compressed module of a manifest entry (``compressed_modules``), before its tensors are loaded."""
    new = module_class(entry["class"]).from_module_config(entry["config"])
    if entry.get("coded"):
        if not callable(getattr(new, "prepare_coded", None)):
            raise UserError(f"artifact does not match its manifest: {entry['class']} stores no coded codes", where)
        new.prepare_coded(entry["coded"])
    return new


def load_tensors(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Give ``module`` the artifact's tensors ``state`` (one for each of its state-dict names; a shape that differs
    is a one-line error), then let its compressed modules rebuild derived state (tables, caches: ``after_load``)."""
    own = module.state_dict()
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise UserError(f"artifact tensor {k} has shape {tuple(t.shape)}, expected {tuple(own[k].shape)}", where)
    module.load_state_dict(state, strict=True, assign=True)
    for m in module.modules():
        hook = getattr(m, "after_load", None)
        if callable(hook):
            hook()


def load_artifact(path: str | Path, base: ModelHandle | str | None = None) -> ModelHandle:
    """Rebuild the compressed model of the artifact at ``path`` as a runnable module.

    ``base`` (a handle, zoo name or path) is needed for delta artifacts; by default the base named in the
    manifest is loaded and its sha256 checked."""
    p = Path(path)
    manifest = read_manifest(p)
    where = str(p)
    module: nn.Module = build_architecture(manifest["architecture"])
    for entry in manifest["compressed_modules"]:
        new = compressed_module(entry, where)
        if entry["path"] == "":
            module = new
        else:
            set_submodule(module, entry["path"], new)
    state = load_state_dict_file(p / WEIGHTS)
    if manifest["from_base"]:
        base_handle = _resolve_base(manifest, base, where)
        base_state = base_handle.module.state_dict()
        for key, base_key in manifest["from_base"].items():
            if base_key not in base_state:
                raise UserError(f"wrong base model: it has no tensor {base_key!r}", where)
            state[key] = base_state[base_key]
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"artifact does not match its manifest: {len(missing)} missing tensors {missing[:3]}, "
                        f"{len(unexpected)} unexpected {unexpected[:3]}", where)
    load_tensors(module, state, where)
    return ModelHandle(module.eval(), manifest["kind"], manifest["source"], manifest["architecture"],
                       dict(manifest.get("extras", {})))


def load(path: str | Path, base: ModelHandle | str | None = None) -> nn.Module:
    """``modelpress.load(path)``: the artifact's compressed model as a runnable torch module."""
    return load_artifact(path, base).module
