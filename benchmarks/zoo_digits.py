"""Measure the digits zoo: classifier accuracy, Fréchet distances (real-vs-real, noise, digits-ddpm, digits-t2i
at several DDIM step counts), prompt agreement vs guidance scale, the cost of the ``fd`` metric, and the
sample grids of docs/zoo-digits.md. Writes benchmarks/results/zoo_digits.md and docs/images/digits-*.png.

    python benchmarks/zoo_digits.py                 # N=200 samples
    python benchmarks/zoo_digits.py --samples 300   # as many as the held-out split
"""
from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path

import torch

from modelpress import zoo
from modelpress.metrics import EvalContext, get_metric
from modelpress.metrics.diffusion import fd_between
from modelpress.sampling import ddim_sample, to_unit_range
from modelpress.zoo import digits

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "zoo_digits.md"
IMAGES = ROOT / "docs" / "images"


_CANONICAL: dict[int, torch.nn.Module] = {}


def _metric(name: str, handle, n: int, steps: int, seed: int = 0, **options) -> tuple[float, float, object]:
    """Value, seconds and result of metric ``name``; one canonical callable per handle, so that
    ``prompt_agreement`` after ``fd`` on the same settings reuses the samples (as in a pipeline run)."""
    model = _CANONICAL.setdefault(id(handle), handle.canonical())
    ctx = EvalContext(seed=seed, samples=n, options={"steps": steps, **options}, show_progress=False)
    t0 = time.perf_counter()
    res = get_metric(name).fn(model, handle, ctx)
    return res.value, time.perf_counter() - t0, res


def save_grid(images: torch.Tensor, path: Path, titles: list[str] | None = None, cols: int = 8) -> None:
    """A PNG grid of ``images`` [N,1,H,W] in [0,1], with an optional title (prompt) under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    rows = (n + cols - 1) // cols
    size = 1.8 if titles else 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size * (1.3 if titles else 1)))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if titles:
                ax.set_title(textwrap.fill(titles[i], 26), fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args()
    n = args.samples
    lines = [f"# Digits zoo measurements (torch threads: {torch.get_num_threads()}, N = {n} samples, seed 0)", ""]

    xt, _ = digits.digits_data("train")
    xh, yh = digits.digits_data("heldout")
    acc = (digits.classify(xh) == yh).float().mean().item()
    lines += [f"digits-classifier held-out accuracy: **{acc:.4f}** (300 images)", ""]

    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    rows = ["| samples vs held-out real digits | DDIM steps | guidance | FD | prompt agreement | seconds |",
            "|---|---:|---:|---:|---:|---:|"]
    rows.append(f"| real (train split, {min(n, 300)} images) | - | - | {fd_between(xt[:min(n, 300)], xh):.2f} | - | - |")
    rows.append(f"| noise N(0,1) clipped | - | - | {fd_between(noise, xh):.2f} | - | - |")

    ddpm = zoo.load("digits-ddpm")
    for steps in (50, 25):
        fd, sec, res = _metric("fd", ddpm, n, steps)
        rows.append(f"| digits-ddpm | {steps} | - | {fd:.2f} | - | {sec:.1f} |")
        if steps == 50:
            save_grid(res.images, IMAGES / "digits-ddpm-samples.png")

    t2i = zoo.load("digits-t2i")
    for steps, w in ((25, 2.0), (25, 1.0), (25, 3.0)):
        fd, sec, res = _metric("fd", t2i, n, steps, guidance_scale=w)
        pa, _, _ = _metric("prompt_agreement", t2i, n, steps, guidance_scale=w)  # reuses the same samples
        rows.append(f"| digits-t2i (eval prompts) | {steps} | {w} | {fd:.2f} | {pa:.3f} | {sec:.1f} |")
        if w == 2.0:
            save_grid(res.images[:24], IMAGES / "digits-t2i-samples.png", titles=res.details["prompts"][:24], cols=6)
    lines += rows + [""]

    for name in ("digits-ddpm", "digits-t2i"):
        tr = zoo.load(name).extras["training"]
        lines.append(f"{name} training: {json.dumps(tr)}")
    lines.append("")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
