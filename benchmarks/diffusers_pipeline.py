"""Cost of every diffusion pass on a Stable-Diffusion-shaped diffusers pipeline: wall time and peak memory.

The pipeline is random (no hub on these machines; the cost does not depend on the weights): a
``UNet2DConditionModel`` with Stable Diffusion 1.x's layout (three cross-attention levels and a plain one, two
ResNets per level) at reduced width, a 4-layer CLIP text encoder, an ``AutoencoderKL`` that downsamples by 8,
and Stable Diffusion's DDIM scheduler config. Each pass runs from the Python API in its own process (so that
its peak resident memory, ``ru_maxrss``, is its own), calibrated on ``recipes/data/prompts.txt`` (``aptp``: on
prompt-image pairs written for the run, coloured squares at the pipeline's pixel size); rows give
the wall time of load + pass + artifact write (the package import, slow on a loaded machine, is left out and
recorded apart), the pass's own time, and that peak; for the passes with block reconstruction, also the peak
of the reconstruction step alone (``VmHWM`` reset before it) and the size of the largest block's capture
(its inputs + full-precision outputs over the calibration set). The quality of random weights
means nothing, so no metric is reported.

    python benchmarks/diffusers_pipeline.py                 # writes benchmarks/results/diffusers_pipeline.{json,md}
    python benchmarks/diffusers_pipeline.py --quick         # the tests' tiny pipeline, tiny settings
    python benchmarks/diffusers_pipeline.py --only ptq4dm --samples 256 --recon-storage memory disk
        # the reconstruction's memory: the same pass with its captures in memory, then spooled to disk
        # (writes benchmarks/results/diffusers_pipeline-recon_storage.{json,md})
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ROOT / "recipes" / "data" / "prompts.txt"

#: the larger pipeline (Stable Diffusion 1.x is (320, 640, 1280, 1280), 2 layers per block, 768-wide text)
LARGE = dict(channels=(64, 128, 256, 256), layers_per_block=2, text_width=256, text_layers=4, sample_size=16,
             vae_channels=(32, 64, 64, 64))
TINY: dict = {}

#: each pass at the settings of a short calibration run (the docs' recipe uses 64 samples, 25 steps)
PASSES = {
    "ptq": {"type": "ptq", "steps": 10, "samples": 32, "batch_size": 16},
    "ptq4dm": {"type": "ptq4dm", "steps": 10, "samples": 32, "batch_size": 16, "recon_iters": 20, "recon_batch": 8},
    "tfmq": {"type": "tfmq", "steps": 10, "samples": 32, "batch_size": 16, "recon_iters": 20, "recon_batch": 8,
             "w_bits": 4},
    "evopress": {"type": "evopress", "family": "sparsity", "method": "magnitude", "budget": 0.5, "grouping": "none",
                 "generations": 4, "offspring": 4, "survivors": [2, 1], "stage_samples": [4, 8],
                 "calibration_samples": 8, "hessian_samples": 8, "baseline_samples": 8, "batch_size": 8},
    # trains on prompt-image pairs (PAIRS of them, written for the run), not on the prompts file
    "aptp": {"type": "aptp", "codes": 4, "target_macs": 0.6, "router_steps": 40, "finetune_steps": 5,
             "batch_size": 8, "prompt_pool": 32, "threads": 1},
}
#: prompt-image pairs for the passes that train on images (coloured squares at the pipeline's pixel size)
PAIRS = 64
QUICK = {"steps": 4, "samples": 8, "recon_iters": 2}

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import modelpress
from modelpress.quant import ptq, tfmq
cfg, model, prompts, out = json.loads(sys.argv[1])
recon = {}

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def measured(reconstruct_blocks):
    # the peak resident memory of block reconstruction alone: reset the high-water mark (clear_refs 5), read it after
    def run(*a, **k):
        open("/proc/self/clear_refs", "w").write("5")
        recon["rss_before_mib"] = round(hwm_mib(), 1)
        t = time.perf_counter()
        reconstruct_blocks(*a, **k)
        recon["peak_rss_mib"], recon["seconds"] = round(hwm_mib(), 1), round(time.perf_counter() - t, 1)
    return run

ptq.reconstruct_blocks = measured(ptq.reconstruct_blocks)
tfmq.reconstruct_blocks = measured(tfmq.reconstruct_blocks)
t1 = time.perf_counter()
r = modelpress.compress(model, [cfg], calibration={"dataset": prompts})
r.save(out)
units = r.log[cfg["type"]].get("reconstruction", {}).get("units", {})
print(json.dumps({"import_seconds": round(t1 - t0, 1), "seconds": round(time.perf_counter() - t1, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "pass_seconds": r.log[cfg["type"]].get("seconds"),
                  "recon_storage": sorted({u["storage"] for u in units.values()}) or None,
                  "largest_unit_captured_mib": max((u["captured_mib"] for u in units.values()), default=None),
                  "reconstruction": recon or None}))
"""


def run_pass(cfg: dict, model: Path, data: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([cfg, str(model), str(data), str(out)])],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{cfg['type']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=list(PASSES))
    ap.add_argument("--samples", type=int, help="calibration samples of the PTQ passes (default: their row's)")
    ap.add_argument("--recon-storage", nargs="*", choices=["auto", "memory", "disk"],
                    help="run each reconstructing pass once per storage of its block captures (recon_storage)")
    ap.add_argument("--append", action="store_true",
                    help="keep the results file's rows of the passes not run now (their settings and load stay theirs)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_sd import make_pipeline, write_prompt_images  # the tests' pipeline and pairs builders

    shape = TINY if args.quick else LARGE
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pipe = make_pipeline(Path(tmp) / "sd", **shape)
        from modelpress.sources import load_model

        h = load_model(str(pipe))
        unet_params = sum(p.numel() for p in h.module.parameters())
        stem = "diffusers_pipeline" + ("-quick" if args.quick else "") + ("-recon_storage" if args.recon_storage else "")
        if args.append and (RESULTS / f"{stem}.json").exists():
            rows = [r for r in json.loads((RESULTS / f"{stem}.json").read_text())["rows"]
                    if r["pass"] not in (args.only or PASSES)]
        for name in args.only or PASSES:
            for storage in (args.recon_storage or [None]) if "recon_iters" in PASSES[name] else [None]:
                cfg = dict(PASSES[name])
                if args.quick:
                    cfg.update({k: v for k, v in QUICK.items() if k in cfg})
                if args.samples and "samples" in cfg:
                    cfg["samples"] = args.samples
                if storage:
                    cfg["recon_storage"] = storage
                if name == "evopress":  # its level database in the run's scratch, not the shared cache
                    cfg["database"] = str(Path(tmp) / "evopress-db")
                t = time.perf_counter()
                data = PROMPTS
                if name == "aptp":
                    (Path(tmp) / "pairs").mkdir(exist_ok=True)
                    data = write_prompt_images(Path(tmp) / "pairs", PAIRS, size=8 * shape.get("sample_size", 8))
                got = run_pass(cfg, pipe, data, Path(tmp) / f"out-{name}")
                rows.append({"pass": name, "config": cfg, **got, "load_average_after": [round(v, 1) for v in os.getloadavg()]})
                print(name, got, f"({time.perf_counter() - t:.0f} s)", flush=True)
                write(rows, shape, unet_params, stem, " ".join(sys.argv[1:]))  # after every row: partial results survive


def write(rows: list[dict], shape: dict, unet_params: int, stem: str, args: str) -> None:
    import torch

    record = {"pipeline": {k: list(v) if isinstance(v, tuple) else v for k, v in (shape or {"tiny": True}).items()},
              "unet_parameters": unet_params, "torch_threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
              "load_average_at_write": [round(v, 1) for v in os.getloadavg()], "rows": rows,
              "command": f"python benchmarks/diffusers_pipeline.py {args}".strip()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=1))
    lines = [f"UNet parameters: {unet_params:,}; torch threads {record['torch_threads']}; {record['cpus']} CPUs, "
             f"load average {record['load_average_at_write']} when written", "",
             "| pass | settings | wall s (load + pass + save) | pass s | peak RSS MiB | largest block capture MiB "
             "| reconstruction: RSS before / peak MiB, s | load average after |", "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k not in ("type", "database"))
        lines.append(f"| {r['pass']} | {settings} | {r['seconds']} | {r['pass_seconds']} | {r['peak_rss_mib']} | "
                     f"{r.get('largest_unit_captured_mib') or '-'} | {_recon(r.get('reconstruction'))} | "
                     f"{r.get('load_average_after', '-')} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _recon(rec: dict | None) -> str:
    return f"{rec['rss_before_mib']} / {rec['peak_rss_mib']}, {rec['seconds']}" if rec else "-"


if __name__ == "__main__":
    main()
