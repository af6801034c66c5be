"""Running one recipe on several processes with torch.distributed (issue 20, part 3).

The workers are started by torch.distributed's own launcher: ``modelpress run RECIPE --nproc N`` calls its
elastic launch API (:func:`launch`), or a user runs ``torchrun --nproc-per-node N -m modelpress.cli run RECIPE``
(across machines too). Either way each worker finds ``RANK`` / ``WORLD_SIZE`` in its environment and
:func:`init_from_env` joins the process group: gloo on the CPU, nccl when the recipe's device is a GPU.

Every rank runs the same recipe with the same seed and draws the same random numbers; work is split by
*deterministic* shares (:func:`owners`: a function of the work list and the world size only) and the results
are exchanged with object collectives, so every rank ends with the same values as one process would compute,
in the same order. Only rank 0 writes (staging + atomic rename, :func:`modelpress.artifact.atomic_directory`),
prints and evaluates. A collective that fails because another rank died raises :class:`PeerFailed`.

In one process (no process group) every helper here is the identity: the rank is 0, the world is 1.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import torch

T = TypeVar("T")
R = TypeVar("R")

#: how long a rank waits at a collective for the others (rank 0 may evaluate while the others wait to exit)
TIMEOUT = timedelta(hours=2)


class PeerFailed(RuntimeError):
    """A collective failed: another rank died or failed (its own error is what the run reports)."""


#: > 0 inside :func:`alone`
_ALONE = 0
#: > 0 inside :func:`results_on_main`
_MAIN_ONLY = 0


def active() -> bool:
    """Whether this process is one of several ranks of an initialized process group (and not inside
    :func:`alone`)."""
    return not _ALONE and _joined()


@contextmanager
def alone() -> Iterator[None]:
    """Work inside the block is this rank's own: the helpers here act as in one process (no exchanges), e.g.
    while a rank compresses the one unit it was given."""
    global _ALONE
    _ALONE += 1
    try:
        yield
    finally:
        _ALONE -= 1


@contextmanager
def results_on_main() -> Iterator[None]:
    """Inside the block only rank 0 uses what the passes return (the recipe runner: rank 0 alone writes,
    evaluates and exports), so the last pass may gather its shared work to rank 0 alone and the other ranks may
    skip building its result (:meth:`modelpress.passes.Context.result_on_main_only`)."""
    global _MAIN_ONLY
    _MAIN_ONLY += 1
    try:
        yield
    finally:
        _MAIN_ONLY -= 1


def results_on_main_only() -> bool:
    """Whether this is one of several ranks inside :func:`results_on_main`."""
    return bool(_MAIN_ONLY) and active()


def _dist() -> Any:
    import torch.distributed as dist  # imported on use: the command line starts without torch

    return dist


def _joined() -> bool:
    if "torch.distributed" not in sys.modules:  # nobody joined a process group in this process
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in one process; inside :func:`alone` still its own)."""
    return _dist().get_rank() if _joined() else 0


def world_size() -> int:
    """The number of ranks (1 in one process; inside :func:`alone` still all of them)."""
    return _dist().get_world_size() if _joined() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that prints, writes and evaluates."""
    return rank() == 0


def launched() -> bool:
    """Whether torch.distributed's launcher (torchrun or ``--nproc``) started this process as a worker."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: "torch.device | None" = None) -> bool:
    """Join the process group the launcher's environment describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT``): nccl when ``device`` is a CUDA device, else gloo. Returns whether this
    process is one of several ranks; a no-op when already joined or not launched."""
    if _joined() or not launched():
        return _joined()
    import torch

    dist = _dist()
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return True


def shutdown() -> None:
    if _joined():
        _dist().destroy_process_group()


def _collective(name: str, *args: Any) -> Any:
    try:
        return getattr(_dist(), name)(*args)
    except RuntimeError as exc:  # torch.distributed.DistError is one
        raise PeerFailed(f"rank {rank()}: a collective failed, another rank stopped "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def barrier() -> None:
    if active():
        # gloo and nccl both take an object collective; a tiny one is a barrier that reports a dead peer
        _collective("all_gather_object", [None] * world_size(), None)


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective("all_gather_object", out, obj)
    return out


def from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (a decision that could differ between ranks, e.g. one taken on the memory
    available now); ``obj`` in one process."""
    if not active():
        return obj
    box = [obj]
    _collective("broadcast_object_list", box, 0)
    return box[0]


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` on rank 0 in rank order; ``None`` on the others (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    _collective("gather_object", obj, out, 0)
    return out


def sum_in_rank_order(t: "torch.Tensor") -> "torch.Tensor":
    """``t`` summed over the ranks, added in rank order (``((t_0 + t_1) + t_2) ...``), so that every rank gets
    the same bits; ``t`` itself in one process. The tensor travels on the CPU with gloo, on the GPU with nccl."""
    if not active():
        return t
    import torch

    local = _on_backend_device(t.contiguous())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    _collective("all_gather", parts, local)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total.to(t.device)


def owners(costs: Sequence[float], size: int | None = None) -> list[int]:
    """The rank that does each of ``len(costs)`` work items: longest first, each to the least loaded rank (ties:
    the lower item index, the lower rank). Deterministic: it depends on the costs and the world size only."""
    size = world_size() if size is None else size
    load = [0.0] * size
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


def map_shared(fn: Callable[[T], R], items: Sequence[T], costs: Sequence[float] | None = None) -> list[R]:
    """``[fn(x) for x in items]``, each item computed on one rank (:func:`owners` of ``costs``, default equal)
    and the results exchanged, so every rank returns the whole list in item order."""
    if not active():
        return [fn(x) for x in items]
    own = owners(costs if costs is not None else [1.0] * len(items))
    mine = {i: fn(x) for i, x in enumerate(items) if own[i] == rank()}
    merged: dict[int, Any] = {}
    for part in all_gather(mine):
        merged.update(part)
    return [merged[i] for i in range(len(items))]


def map_tensors(fn: Callable[[T], "torch.Tensor"], items: Sequence[T],
                costs: Sequence[float] | None = None) -> list["torch.Tensor"]:
    """``[fn(x) for x in items]`` for ``fn`` returning a tensor: each item computed on one rank (:func:`owners`
    of ``costs``, default equal) and broadcast from it as a tensor (shapes and dtypes first, as small objects),
    so every rank returns the whole list in item order, without pickling the bulk."""
    if not active():
        return [fn(x) for x in items]
    import torch

    own = owners(costs if costs is not None else [1.0] * len(items))
    mine = {i: fn(x).contiguous() for i, x in enumerate(items) if own[i] == rank()}
    kinds: dict[int, tuple[torch.Size, torch.dtype]] = {}
    for part in all_gather({i: (t.shape, t.dtype) for i, t in mine.items()}):
        kinds.update(part)
    out = []
    for i in range(len(items)):
        t = mine[i] if i in mine else torch.empty(kinds[i][0], dtype=kinds[i][1])
        travelling = _on_backend_device(t)
        _collective("broadcast", travelling, own[i])
        out.append(travelling.to(t.device))
    return out


def map_to_main(fn: Callable[[T], tuple[list[np.ndarray], Any]], items: Sequence[T],
                costs: Sequence[float] | None = None) -> list[tuple[list[np.ndarray], Any]] | None:
    """``[fn(x) for x in items]`` on rank 0, ``None`` on the others: each item is computed on one rank
    (:func:`owners` of ``costs``, default equal) and sent to rank 0 alone. ``fn`` returns numpy arrays (the
    bulk: each rank's travel as one byte tensor, not pickled) and a small picklable rest."""
    if not active():
        return [fn(x) for x in items]
    own = owners(costs if costs is not None else [1.0] * len(items))
    mine = {i: fn(x) for i, x in enumerate(items) if own[i] == rank()}
    layouts = gather_to_main({i: ([(a.dtype.str, a.shape) for a in arrays], rest)
                              for i, (arrays, rest) in mine.items()})
    if layouts is None:
        _send_arrays([a for arrays, _ in mine.values() for a in arrays])
        return None
    merged = dict(mine)
    for src in range(1, world_size()):
        received = iter(_recv_arrays([kind for layout, _ in layouts[src].values() for kind in layout], src))
        for i, (layout, rest) in layouts[src].items():
            merged[i] = ([next(received) for _ in layout], rest)
    return [merged[i] for i in range(len(items))]


def _send_arrays(arrays: list["np.ndarray"]) -> None:
    """Send ``arrays`` to rank 0, each as one uint8 tensor sharing its memory (no copy, no pickling)."""
    import torch

    for a in arrays:
        if a.nbytes:
            _collective("send", _on_backend_device(torch.from_numpy(a.reshape(-1).view("uint8"))), 0)


def _recv_arrays(kinds: list[tuple[str, tuple[int, ...]]], src: int) -> list["np.ndarray"]:
    """The arrays (``(dtype, shape)`` each, C-contiguous) that rank ``src`` sent with :func:`_send_arrays`."""
    import numpy as np
    import torch

    out = []
    for d, shape in kinds:
        buf = _on_backend_device(torch.empty(int(np.dtype(d).itemsize * np.prod(shape, dtype=np.int64)),
                                             dtype=torch.uint8))
        if buf.numel():
            _collective("recv", buf, src)
        out.append(buf.cpu().numpy().view(np.dtype(d)).reshape(shape))
    return out


def _on_backend_device(t: "torch.Tensor") -> "torch.Tensor":
    """``t`` where the process group's backend takes it (nccl: this rank's GPU; gloo: the CPU)."""
    import torch

    return t.to(f"cuda:{torch.cuda.current_device()}") if _dist().get_backend() == "nccl" else t


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. it fills a cache on disk), then the others (who find it filled)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ---------------------------------------------------------------------------------------------------
# Starting workers


def launch(argv: list[str], nproc: int) -> dict[int, int]:
    """Run ``python -m modelpress.cli *argv`` as ``nproc`` local workers through torch.distributed's elastic
    launcher (a standalone c10d rendezvous on localhost, no restarts; the one torchrun ``--standalone`` uses).
    Returns ``{rank: exit status}`` of the workers that failed (negative: killed by that signal), empty when all
    succeeded; the launcher stops the other workers (SIGTERM) as soon as one fails."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL + 1)
    logging.getLogger("torch.distributed.launcher").setLevel(logging.CRITICAL + 1)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several workers per machine
    try:
        elastic_launch(config, sys.executable)("-m", "modelpress.cli", *argv)
    except ChildFailedError as exc:
        return {int(r): int(f.exitcode) for r, f in exc.failures.items()}
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return {}
