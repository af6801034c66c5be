"""Diffusion PTQ on the zoo's digits DDPM: min-max baseline vs PTQ4DM vs TFMQ-DM, plus the papers' ablations.

Every row quantizes the same full-precision model with one pass, then measures the Fréchet distance
(``fd`` metric: DDIM 25 steps, digits-classifier features vs held-out real digits) of its samples, the
quantization wall time, and the stored size (state-dict bytes vs the fp16 size of the original).

Fair by construction: every method gets the same knobs — first and last layers at 8 bits (all three
passes' default), the same calibration set size, DDIM steps, evaluation samples — and each seed ``s`` runs
the *whole* pipeline: the calibration draw, the method's own randomness (reconstruction minibatches,
activation subsampling) and the FD sampling all use seed ``s``. Rows give mean ± std and the median over
those seeds. A markdown table is written to ``--out`` after every row (partial results survive an
interruption), and 8x8 sample grids next to it.

    python benchmarks/diffusion_ptq.py                       # main table + ablations (~1 h on 2 cores)
    python benchmarks/diffusion_ptq.py --only main --main-seeds 3
    python benchmarks/diffusion_ptq.py --quick               # smoke run with tiny settings
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress import zoo
from modelpress.metrics import EvalContext
from modelpress.metrics.diffusion import fd_metric
from modelpress.model import state_bytes
from modelpress.passes import CalibrationSpec, Context, get_pass


def save_grid(images: torch.Tensor, path: Path) -> None:
    """An 8x8 grid PNG of ``images`` [N, 1, H, W] in [0, 1]."""
    from PIL import Image

    imgs = images[:64].clamp(0, 1).numpy()
    n, _, h, w = imgs.shape
    cols = 8
    rows = -(-n // cols)
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = imgs[i, 0]
    Image.fromarray((grid * 255).astype(np.uint8)).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def fd_once(handle: Any, seed: int, n: int, steps: int) -> tuple[float, torch.Tensor]:
    """FD of ``n`` samples drawn with ``seed``, and the samples."""
    with torch.no_grad():
        r = fd_metric(handle.canonical().eval(), handle, EvalContext(seed=seed, samples=n, options={"steps": steps},
                                                                     show_progress=False))
    return r.value, r.images


def fmt(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def fmt_median(vals: list[float]) -> str:
    return f"{statistics.median(vals):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits-ddpm")
    ap.add_argument("--fd-samples", type=int, default=500)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=3, help="FD seeds of the full-precision model (its noise level)")
    ap.add_argument("--main-seeds", type=int, default=3, help="full-pipeline seeds of each main-table row")
    ap.add_argument("--ablation-seeds", type=int, default=1, help="full-pipeline seeds of each ablation row")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from here (to add seeds to an earlier run)")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--recon-ptq4dm", type=int, default=100)
    ap.add_argument("--recon-tfmq", type=int, default=200)
    ap.add_argument("--methods", default="ptq,ptq4dm,tfmq,tfmq-qdrop", help="comma-separated main-table methods: ptq, ptq4dm, tfmq, tfmq-qdrop, tfmq-mse, tfmq-cosine")
    ap.add_argument("--only", choices=["main", "ablations", "all"], default="all")
    ap.add_argument("--settings", default="8/8,4/8,4/6", help="comma-separated W/A bit settings of the main table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablations", default="calib,metric,tiar,maint,lsq,qdrop,w8a8", help="comma-separated ablation groups to run")
    ap.add_argument("--fp-fd", default=None, help="comma-separated FP FD values of an earlier run at the same settings "
                    "(skips re-measuring full precision)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/diffusion_ptq.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.fd_samples, args.seeds, args.main_seeds, args.calib, args.recon_ptq4dm, args.recon_tfmq = 64, 1, 1, 32, 2, 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grids = out.parent / f"{out.stem}_grids"  # diffusion_ptq_grids for the default --out
    grids.mkdir(exist_ok=True)
    seeds = list(range(args.seeds))
    main_seeds = list(range(args.first_seed, args.first_seed + args.main_seeds))
    abl_seeds = list(range(args.first_seed, args.first_seed + args.ablation_seeds))

    fp = zoo.load(args.model)
    fp_bytes16 = 2 * sum(p.numel() for p in fp.module.parameters())
    rows: list[dict[str, Any]] = []
    if args.fp_fd:
        fp_fd = [float(v) for v in args.fp_fd.split(",")]
    else:
        runs = [fd_once(fp, s, args.fd_samples, args.steps) for s in seeds]
        fp_fd = [v for v, _ in runs]
        save_grid(runs[0][1], grids / "fp.png")
    fp_mean = statistics.mean(fp_fd)
    noise = statistics.stdev(fp_fd) if len(fp_fd) > 1 else float("nan")
    rows.append({"table": "main", "setting": "FP32", "method": "full precision", "fd": fp_fd, "seconds": 0.0,
                 "bytes": state_bytes(fp.module)})

    def run(table: str, setting: str, method: str, pass_name: str, run_seeds: list[int], **cfg: Any) -> None:
        """One row: for each seed, the whole pipeline (calibration draw, method, FD sampling) with that seed."""
        P = get_pass(pass_name)
        vals, secs, extra = [], [], {}
        for s in run_seeds:
            ctx = Context(seed=s, calibration=CalibrationSpec(samples=args.calib, batch_size=64), show_progress=False)
            t0 = time.perf_counter()
            q = P(P.Config(steps=args.steps, **cfg)).apply(zoo.load(args.model), ctx)
            secs.append(time.perf_counter() - t0)
            v, g = fd_once(q, s, args.fd_samples, args.steps)
            vals.append(v)
            if s == run_seeds[0]:
                tag = f"{table}-{setting}-{method}".replace("/", "").replace(" ", "_").replace("+", "")
                save_grid(g, grids / f"{tag}.png")
            log = ctx.log[pass_name]
            if "maintenance" in log:
                extra.setdefault("cache_kept", []).append(sum(v["kept"] == "cache" for v in log["maintenance"].values()))
                extra["tib_outputs"] = len(log["maintenance"])
        rows.append({"table": table, "setting": setting, "method": method, "fd": vals,
                     "seconds": statistics.median(secs), "bytes": state_bytes(q.module), **extra})
        print(f"{table:10s} {setting:6s} {method:40s} FD {fmt(vals):>14s}  {statistics.median(secs):7.1f}s", flush=True)
        write(out, rows, fp_mean, noise, fp_bytes16, args)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))  # per-seed values, after every row

    if args.only in ("main", "all"):
        for setting in args.settings.split(","):
            w, a = (int(v) for v in setting.split("/"))
            name = f"W{w}A{a}"
            shared = dict(w_bits=w, a_bits=a, first_last_8bit=True)  # every method: the same knobs
            methods = args.methods.split(",")
            if "ptq" in methods:
                run("main", name, "min-max baseline (ptq)", "ptq", main_seeds, **shared)
            if "ptq4dm" in methods:
                run("main", name, "PTQ4DM (ptq4dm)", "ptq4dm", main_seeds, recon_iters=args.recon_ptq4dm, **shared)
            if "tfmq" in methods:
                run("main", name, "TFMQ-DM (tfmq, select)", "tfmq", main_seeds, recon_iters=args.recon_tfmq, **shared)
            if "tfmq-qdrop" in methods:
                run("main", name, "TFMQ-DM + QDrop 0.5 (tfmq, recon_qdrop)", "tfmq", main_seeds,
                    recon_iters=args.recon_tfmq, recon_qdrop=0.5, **shared)
            for metric in ("mse", "cosine"):  # range metrics other than the papers' Lp (p = 2.4)
                if f"tfmq-{metric}" in methods:
                    run("main", name, f"TFMQ-DM, {metric} ranges (tfmq, metric: {metric})", "tfmq", main_seeds,
                        recon_iters=args.recon_tfmq, metric=metric, **shared)
    if args.only in ("ablations", "all"):
        base = dict(w_bits=4, a_bits=8, first_last_8bit=True)
        groups = args.ablations.split(",")
        for sampler in ("ndtc", "uniform", "single_t") if "calib" in groups else ():
            run("calib", "W4A8", f"PTQ4DM, {sampler} calibration, no recon", "ptq4dm", abl_seeds, sampler=sampler,
                recon_iters=0, **base)
        for metric in ("lp", "mse", "cosine", "kl", "minmax") if "metric" in groups else ():
            run("metric", "W4A8", f"PTQ4DM, {metric} range metric, no recon", "ptq4dm", abl_seeds, metric=metric,
                recon_iters=0, **base)
        if "tiar" in groups:
            run("tiar", "W4A8", "TFMQ, TIB-based, TIAR on", "tfmq", abl_seeds, tiar=True, maintenance="tib",
                recon_iters=args.recon_tfmq, **base)
            run("tiar", "W4A8", "TFMQ, TIB-based, TIAR off (TIB in BRECQ blocks)", "tfmq", abl_seeds, tiar=False,
                maintenance="tib", recon_iters=args.recon_tfmq, **base)
        if "maint" in groups:
            run("maint", "W4A8", "TFMQ, cache-based", "tfmq", abl_seeds, maintenance="cache",
                recon_iters=args.recon_tfmq, **base)
            run("maint", "W4A8", "TFMQ, FSC off, TIB-based", "tfmq", abl_seeds, fsc=False, maintenance="tib",
                recon_iters=args.recon_tfmq, **base)
        if "w8a8" in groups:  # what separates PTQ4DM from the min-max baseline at W8A8: ranges or AdaRound
            w8 = dict(w_bits=8, a_bits=8, first_last_8bit=True)
            for metric, iters in (("minmax", 0), ("lp", 0), ("minmax", args.recon_ptq4dm)):
                run("w8a8", "W8A8", f"PTQ4DM, {metric} ranges, recon {iters} iters", "ptq4dm", abl_seeds,
                    metric=metric, recon_iters=iters, **w8)
            run("w8a8", "W8A8", f"TFMQ-DM, minmax ranges, recon {args.recon_tfmq} iters", "tfmq", abl_seeds,
                metric="minmax", recon_iters=args.recon_tfmq, **w8)
        if "qdrop" in groups:  # QDrop inside block reconstruction, PTQ4DM's short schedule
            for prob in (0.0, 0.5):
                run("qdrop", "W4A8", f"PTQ4DM, recon {args.recon_ptq4dm} iters, QDrop {prob}", "ptq4dm", abl_seeds,
                    recon_iters=args.recon_ptq4dm, recon_qdrop=prob, **base)
        if "lsq" in groups:
            for lr in (0.0, 0.01):
                run("lsq", "W4A8", f"PTQ4DM, recon {args.recon_ptq4dm} iters, activation step lr {lr}", "ptq4dm",
                    abl_seeds, recon_iters=args.recon_ptq4dm, recon_act_lr=lr, **base)
    write(out, rows, fp_mean, noise, fp_bytes16, args)
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))


def write(out: Path, rows: list[dict[str, Any]], fp_mean: float, noise: float, fp16: int, args: Any) -> None:
    lines = [f"# Diffusion PTQ on {args.model}", "",
             f"FD: {args.fd_samples} DDIM-{args.steps} samples vs the 300 held-out digits (digits-classifier features); "
             f"calibration {args.calib} samples; AdaRound iterations per block: PTQ4DM {args.recon_ptq4dm}, "
             f"TFMQ {args.recon_tfmq}. Shared by every method: first and last layers at 8 bits, calibration size, "
             f"DDIM steps, FD samples. Each seed runs the whole pipeline (calibration draw, method, FD sampling); "
             f"main table: mean ± std and median over {args.main_seeds} seeds, ablations over {args.ablation_seeds}. "
             f"Full-precision FD noise (std over {args.seeds} sampling seeds): {noise:.2f}. "
             "Gap ratio: the row's mean FD gap over the min-max baseline's at the same setting. "
             "Size: state-dict bytes / fp16 size of the original; quant. time: median over seeds.", "",
             "| table | setting | method | FD mean ± std | FD median | FD gap to FP | gap / min-max gap | quant. time (s) | size / fp16 | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    baseline_gap = {r["setting"]: statistics.mean(r["fd"]) - fp_mean for r in rows if r["method"].startswith("min-max")}
    for r in rows:
        gap = statistics.mean(r["fd"]) - fp_mean
        ref = baseline_gap.get(r["setting"])
        ratio = f"{gap / ref:.2f}x" if ref and not r["method"].startswith("min-max") else ""
        note = (f"cache kept for {'/'.join(map(str, r['cache_kept']))} of {r['tib_outputs']} projections"
                if "cache_kept" in r else "")
        lines.append(f"| {r['table']} | {r['setting']} | {r['method']} | {fmt(r['fd'])} | {fmt_median(r['fd'])} | "
                     f"{gap:+.2f} | {ratio} | {r['seconds']:.1f} | {r['bytes'] / fp16:.3f} | {note} |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
