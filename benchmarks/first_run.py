"""The first ten minutes: a fresh clone, the README's first command (install + quickstart), timed.

Each run clones this repository into an empty temporary directory, takes the README's first command exactly
as written (the first line of its first ``bash`` block), and runs it in a clean shell with an empty
modelpress cache (``MODELPRESS_CACHE``), so zoo models that are built on first use are built. The install
part (everything before ``modelpress run``) and the quickstart part are timed apart; pip's own download
cache is kept (``--cold-pip`` empties it too, which then measures the network as much as the install).

    python benchmarks/first_run.py --runs 3 --out benchmarks/results/first_run.md
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_first_command(readme: Path) -> str:
    """The first line of the README's first ```bash block."""
    block = re.search(r"```bash\n(.*?)```", readme.read_text(), flags=re.S)
    if block is None:
        raise SystemExit(f"{readme}: no ```bash block")
    return block.group(1).strip().splitlines()[0]


def split_install(command: str) -> tuple[str, str]:
    """``(install, quickstart)``: the command split before ``modelpress run`` (the venv activation is
    repeated in the second part, which runs in its own shell)."""
    head, sep, tail = command.partition("&& modelpress run")
    if not sep:
        raise SystemExit(f"the README's first command does not run the quickstart: {command}")
    return head.strip(), ". .venv/bin/activate && modelpress run" + tail


def timed(command: str, cwd: Path, env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"`{command}` failed with status {proc.returncode}; see {log}")
    return time.perf_counter() - t0


def one_run(i: int, cold_pip: bool, keep: bool) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"first-run-{i}-"))
    clone = work / "modelpress"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    install, quickstart = split_install(readme_first_command(clone / "README.md"))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MODELPRESS_CACHE")}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    env["MODELPRESS_CACHE"] = str(work / "cache")
    env["NUMBA_CACHE_DIR"] = str(work / "numba-cache")
    if cold_pip:
        env["PIP_NO_CACHE_DIR"] = "1"
    log = work / "log.txt"
    t_install = timed(install, clone, env, log)
    t_quick = timed(quickstart, clone, env, log)
    print(f"run {i}: install {t_install:.0f} s, quickstart {t_quick:.0f} s, total {t_install + t_quick:.0f} s "
          f"(log {log})", flush=True)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"install": t_install, "quickstart": t_quick, "total": t_install + t_quick}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold-pip", action="store_true", help="no pip cache either (measures the download too)")
    ap.add_argument("--keep", action="store_true", help="keep each run's clone, venv, cache and log")
    ap.add_argument("--out", default="benchmarks/results/first_run.md")
    args = ap.parse_args()
    command = readme_first_command(ROOT / "README.md")
    runs = [one_run(i, args.cold_pip, args.keep) for i in range(args.runs)]
    rows = [f"| {i} | {r['install']:.0f} | {r['quickstart']:.0f} | {r['total']:.0f} |" for i, r in enumerate(runs)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("install", "quickstart", "total")}
    mn = {k: min(r[k] for r in runs) for k in ("install", "quickstart", "total")}
    load = os.getloadavg()
    text = "\n".join([
        "# Fresh clone to finished quickstart", "",
        f"`python benchmarks/first_run.py --runs {args.runs}{' --cold-pip' if args.cold_pip else ''}` on "
        f"{os.cpu_count()} cores (load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}); pip cache "
        f"{'empty' if args.cold_pip else 'kept'}, modelpress cache empty. The command:", "",
        f"    {command}", "",
        "| run | install (s) | quickstart (s) | total (s) |", "|---|---:|---:|---:|", *rows,
        f"| min | {mn['install']:.0f} | {mn['quickstart']:.0f} | {mn['total']:.0f} |",
        f"| median | {med['install']:.0f} | {med['quickstart']:.0f} | {med['total']:.0f} |", ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
