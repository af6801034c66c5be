"""The user's terminal: what modelpress itself shows, kept apart from what other libraries print.

The command line runs inside :func:`third_party_output_to`: file descriptors 1 and 2 (and so every Python
``warnings`` message, every logging handler and every native library that writes to them — torchao's
"Failed to load ...so", torch's ``_pytree`` notices, ExecuTorch's ``cpuinfo`` lines) go to a log file,
while modelpress's own output — progress, warnings, errors, the end-of-run summary — goes to the terminal
through :func:`terminal` and :func:`out`. Outside it (the Python API, tests) both are plain
``sys.stderr`` / ``sys.stdout``.

Progress bars (:func:`progress`) are tqdm bars on a terminal; when stderr is not a terminal (CI logs,
``2> log.txt``) a top-level stage prints one line when it starts and nested bars print nothing.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

_TERMINAL: TextIO | None = None  # stderr of the terminal while third-party output is redirected
_OUT: TextIO | None = None


#: set by :func:`mute`: a worker rank other than 0 keeps the terminal for rank 0
_MUTED: TextIO | None = None


def mute() -> None:
    """Send this process's progress, warnings and results nowhere (a rank other than 0 of a distributed run:
    rank 0 speaks for the run); :func:`say` with ``always=True`` still reaches the terminal."""
    global _MUTED
    _MUTED = _MUTED or open(os.devnull, "w")


def terminal() -> TextIO:
    """Where modelpress's progress, warnings and errors go."""
    return _MUTED or _TERMINAL or sys.stderr


def out() -> TextIO:
    """Where modelpress's results (paths, the summary) go."""
    return _MUTED or _OUT or sys.stdout


def say(message: str, *, result: bool = False, always: bool = False) -> None:
    """One line of ours on the terminal (``result=True``: on standard output; ``always``: even when muted)."""
    stream = (_TERMINAL or sys.stderr) if always else out() if result else terminal()
    print(message, file=stream, flush=True)


def progress(iterable: Any = None, *, total: int | None = None, desc: str = "", nested: bool = False,
             disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar on the terminal. Without a terminal: one line for a top-level stage, nothing for a nested
    one (``nested=True``), so that logs do not fill with redrawn bars."""
    from tqdm.auto import tqdm

    stream = terminal()
    if not disable and not _isatty(stream):
        if not nested and desc:
            n = total if total is not None else _len(iterable)
            say(f"{desc}" + (f" ({n})" if n else "") + " ...")
        disable = True
    return tqdm(iterable, total=total, desc=desc, disable=disable, file=stream, leave=not nested,
                dynamic_ncols=True, **kwargs)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _len(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


@contextlib.contextmanager
def third_party_output_to(log_path: Path) -> Iterator[Path]:
    """Redirect file descriptors 1 and 2 into ``log_path`` for the duration; modelpress keeps the terminal.

    When ``sys.stderr`` / ``sys.stdout`` are not the process's own streams (a test harness captured them),
    modelpress keeps writing to those objects, so that in-process callers still see its output.
    """
    global _TERMINAL, _OUT
    sys.stdout.flush()
    sys.stderr.flush()
    own_err = sys.stderr is sys.__stderr__
    own_out = sys.stdout is sys.__stdout__
    saved_err, saved_out = os.dup(2), os.dup(1)
    log = open(log_path, "a", buffering=1)
    try:
        os.dup2(log.fileno(), 2)
        os.dup2(log.fileno(), 1)
        _TERMINAL = os.fdopen(os.dup(saved_err), "w", buffering=1) if own_err else sys.stderr
        _OUT = os.fdopen(os.dup(saved_out), "w", buffering=1) if own_out else sys.stdout
        if own_err:
            sys.stderr = log
        if own_out:
            sys.stdout = log
        yield log_path
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if own_err:
            sys.stderr = sys.__stderr__
        if own_out:
            sys.stdout = sys.__stdout__
        for mine, theirs in ((_TERMINAL, own_err), (_OUT, own_out)):
            if theirs and mine is not None:
                with contextlib.suppress(Exception):
                    mine.close()
        _TERMINAL = _OUT = None
        os.dup2(saved_err, 2)
        os.dup2(saved_out, 1)
        os.close(saved_err)
        os.close(saved_out)
        log.close()
