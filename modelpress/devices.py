"""Where passes, calibration and evaluation run: the recipe's ``device: auto | cpu | cuda``.

``auto`` takes the first CUDA GPU when torch sees one, else the CPU; ``cuda`` without a GPU is a one-line error.
The CPU path always works and is the one the tests run; methods that compute on a device move what they compute
with there and return the model on the CPU (the artifact is written from the CPU).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(option: str | torch.device | None = "auto", where: str = "device") -> torch.device:
    """The torch device ``option`` names (``None`` is ``auto``)."""
    if isinstance(option, torch.device):
        option = option.type
    option = option or "auto"
    if option not in DEVICES:
        raise UserError(f"unknown device {option!r}; choose one of {', '.join(DEVICES)}", where)
    if option == "cuda" or (option == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device: cuda, but torch sees no CUDA GPU on this machine (use auto or cpu)", where)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def on_device(device: torch.device | None, *modules: nn.Module) -> Iterator[None]:
    """Run the block with ``modules`` on ``device`` and bring them back to the CPU after (a no-op on the CPU).
    Parameters keep their identity (``Module.to`` swaps their data), so optimizers made inside see them."""
    if device is None or device.type == "cpu":
        yield
        return
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")
