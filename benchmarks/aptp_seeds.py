"""Summarise several seeds of ``benchmarks/aptp.py``: per-seed rows and mean / std per model.

    python benchmarks/aptp_seeds.py benchmarks/results/aptp-ft200-seed*.json --out benchmarks/results/aptp-ft200.md

Each JSON is one full run (its own router, experts, static baselines, eval prompts and noise). The paired
differences (APTP minus each static baseline, same seed, same prompts and noise) are summarised too, since the
seeds' FD levels differ more than the models within a seed.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

BASELINES = ("static (same steps per model)", "static")


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(runs: list[dict]) -> list[str]:
    a = runs[0]["args"]
    models = list(runs[0]["quality"])
    lines = [f"# APTP vs static pruning on {a.get('model', 'digits-t2i')}, {len(runs)} seeds", "",
             f"K={a['codes']}, target MACs {a['target']}, router {a['router_steps']} steps, fine-tune "
             f"{a['finetune_steps']} steps per expert ('static (same steps per model)': {a['finetune_steps']}, the "
             f"paper's protocol; 'static': {a['finetune_steps'] * a['codes']}, the experts' total), batch {a['batch']}, "
             f"{a['samples']} eval prompts, DDIM {a['steps']} steps. Seeds: "
             + ", ".join(str(r["args"]["seed"]) for r in runs) + ".", "",
             "## Per seed (MACs ratio / FD / prompt agreement)", "",
             "| seed | " + " | ".join(models) + " | eval prompts per code | training prompts per code |",
             "|---|" + "---|" * len(models) + "---|---|"]
    for r in runs:
        cells = [f"{r['macs'][m]:.3f} / {r['quality'][m]['overall']['fd']:.2f} / "
                 f"{r['quality'][m]['overall']['agreement']:.3f}" for m in models]
        lines.append(f"| {r['args']['seed']} | " + " | ".join(cells) + f" | {r['eval_counts']} | "
                     f"{r['aptp_log']['train_prompt_counts']} |")
    lines += ["", "## Mean ± std over seeds", "", "| model | MACs ratio | FD (lower is better) | prompt agreement |",
              "|---|---|---|---|"]
    for m in models:
        lines.append(f"| {m} | {mean_std([r['macs'][m] for r in runs])} | "
                     f"{mean_std([r['quality'][m]['overall']['fd'] for r in runs])} | "
                     f"{mean_std([r['quality'][m]['overall']['agreement'] for r in runs])} |")
    lines += ["", "## APTP minus static, paired by seed (negative FD and positive agreement favour APTP)", "",
              "| baseline | FD difference per seed | mean | agreement difference per seed | mean | APTP better on both |",
              "|---|---|---|---|---|---|"]
    for b in BASELINES:
        dfd = [r["quality"]["APTP"]["overall"]["fd"] - r["quality"][b]["overall"]["fd"] for r in runs]
        dpa = [r["quality"]["APTP"]["overall"]["agreement"] - r["quality"][b]["overall"]["agreement"] for r in runs]
        both = sum(1 for f, p in zip(dfd, dpa) if f < 0 and p > 0)
        lines.append(f"| {b} | " + ", ".join(f"{v:+.2f}" for v in dfd) + f" | {statistics.mean(dfd):+.2f} | "
                     + ", ".join(f"{v:+.3f}" for v in dpa) + f" | {statistics.mean(dpa):+.3f} | "
                     f"{both} of {len(runs)} seeds |")
    if "agreement_printed" in runs[0]["quality"]["APTP"]["overall"]:
        lines += printed_tables(runs, models)
    return lines


def printed_tables(runs: list[dict], models: list[str]) -> list[str]:
    """Runs on digits-t2i-printed: agreement on each kind of prompt, and where APTP sends the printed ones."""
    lines = ["", "## Prompt agreement per kind of prompt (mean ± std over seeds)", "",
             "| model | handwritten prompts | printed prompts |", "|---|---|---|"]
    for m in models:
        o = [r["quality"][m]["overall"] for r in runs]
        lines.append(f"| {m} | {mean_std([x['agreement_handwritten'] for x in o])} | "
                     f"{mean_std([x['agreement_printed'] for x in o])} |")
    lines += ["", "## Where APTP sends the printed prompts (eval prompts per code)", "",
              "| seed | code MACs ratios | all prompts per code | printed prompts per code |", "|---|---|---|---|"]
    for r in runs:
        k = len(r["eval_counts"])
        macs = ", ".join(f"{v:.3f}" for v in r["aptp_log"]["code_macs_ratio"])
        printed = [r["routing"][str(c)]["printed"] for c in range(k)]
        lines.append(f"| {r['args']['seed']} | {macs} | {r['eval_counts']} | {printed} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="JSON files written by benchmarks/aptp.py")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    runs = sorted((json.loads(f.read_text()) for f in args.runs), key=lambda r: r["args"]["seed"])
    lines = summarise(runs)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
