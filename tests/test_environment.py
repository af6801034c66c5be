"""The pinned set: the libraries a user of modelpress reaches for import on their own, each in a fresh
interpreter (no modelpress import first, no work-around)."""
from __future__ import annotations

import subprocess
import sys

import pytest

IMPORTS = [
    "import diffusers",
    "from diffusers import UNet2DConditionModel, UNet2DModel, AutoencoderKL, DDIMScheduler",
    "import torchao",
    "import executorch",
    "import optimum.onnxruntime",
]


@pytest.mark.parametrize("statement", IMPORTS)
def test_library_imports_cleanly_in_a_fresh_interpreter(statement: str) -> None:
    proc = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{statement!r} failed:\n{proc.stderr[-2000:]}"
