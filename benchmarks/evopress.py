"""EvoPress vs uniform levels vs DP on summed per-layer errors (vs ShortGPT block influence for dropping).

Every configuration runs through the ``evopress`` pass (``strategy: evolution | uniform | dp | cosine``) on the
same level database, the same calibration pool (pydocs-10 train split, seed 0) and the same budget; the
result is measured on held-out data the search never saw:

* ``minilm-docs`` (36 linear layers / 6 blocks): test-split accuracy and KL(dense || compressed) of the class
  distributions (the definitions of ``accuracy`` / ``logit_kl`` in modelpress/metrics/text.py) at
  3 bits on average (GPTQ levels 2..8), 50% and 70% average sparsity (SparseGPT levels 0..90%), and 2 of 6
  blocks dropped;
* ``digits-ddpm``: Fréchet distance (digits-classifier features, DDIM) at one equal budget.

Search time is the wall time of the pass's search (the database is built once and shared, and reported apart).

    python benchmarks/evopress.py                 # everything (about an hour on a loaded 2-core machine)
    python benchmarks/evopress.py --only text --generations 30

Writes a markdown table to ``benchmarks/results/evopress.md`` (and prints it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelpress import zoo  # noqa: E402
from modelpress.passes import Context  # noqa: E402
from modelpress.search.evopress import EvoPressPass  # noqa: E402

#: sparsity levels of the database (evenly spaced, so level switches keep the budget exact)
SPARSITY_LEVELS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]

TEXT_SETTINGS = [
    # (family, method, budget, label, strategies); the bits method is --bits-method
    ("bits", "gptq", 3.0, "3 bits avg ({method} 2..8)", ["uniform", "dp", "evolution"]),
    ("sparsity", "sparsegpt", 0.5, "50% sparse (SparseGPT 20..90%)", ["uniform", "dp", "evolution"]),
    ("sparsity", "sparsegpt", 0.7, "70% sparse (SparseGPT 20..90%)", ["uniform", "dp", "evolution"]),
    ("drop", "auto", 2, "2 of 6 blocks dropped", ["cosine", "dp", "evolution"]),
]


@torch.no_grad()
def text_metrics(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                 dense: torch.Tensor | None, batch: int = 64) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean KL(dense || model), logits) on the held-out examples."""
    logits = torch.cat([model(ids[i:i + batch], mask[i:i + batch]).float() for i in range(0, len(ids), batch)])
    acc = float((logits.argmax(-1) == labels).float().mean())
    if dense is None:
        return acc, 0.0, logits
    lp_d, lp_m = torch.log_softmax(dense.double(), -1), torch.log_softmax(logits.double(), -1)
    kl = float((lp_d.exp() * (lp_d - lp_m)).sum(-1).mean())
    return acc, kl, logits


def run_pass(handle, cfg: EvoPressPass.Config, seed: int):
    ctx = Context(seed=seed, show_progress=sys.stderr.isatty())
    t0 = time.perf_counter()
    out = EvoPressPass(cfg).apply(handle.copy(), ctx)  # passes change their input
    return out, ctx.log["evopress"], time.perf_counter() - t0


def search_kwargs(args: argparse.Namespace) -> dict:
    return dict(generations=args.generations, offspring=args.offspring, survivors=args.survivors,
                stage_samples=args.stage_samples, calibration_samples=args.pool, hessian_samples=args.hessian_samples,
                baseline_samples=args.baseline_samples, batch_size=args.batch_size)


def bench_text(args: argparse.Namespace) -> list[str]:
    from modelpress.zoo.text import docs_tensors

    handle = zoo.load("minilm-docs")
    ids, mask, labels = docs_tensors("test", args.eval_samples)
    canon = handle.canonical()
    dense_acc, _, dense_logits = text_metrics(canon, ids, mask, labels, None)
    lines = [f"### minilm-docs (held-out: {len(labels)} test examples; dense accuracy {dense_acc:.4f})", "",
             "| budget | method | achieved | test accuracy | test KL | calib fitness | search s | pass s |",
             "|---|---|---|---|---|---|---|---|"]
    results = {}
    for family, method, budget, label, strategies in TEXT_SETTINGS:
        if args.families and family not in args.families:
            continue
        if family == "bits":
            method = args.bits_method
            label = label.format(method="GPTQ" if method == "gptq" else "RTN")
        levels = SPARSITY_LEVELS if family == "sparsity" else None
        for strat in strategies:
            cfg = EvoPressPass.Config(family=family, method=method, budget=budget, strategy=strat, levels=levels,
                                      **search_kwargs(args))
            out, log, secs = run_pass(handle, cfg, args.seed)
            acc, kl, _ = text_metrics(out.canonical(), ids, mask, labels, dense_logits)
            fit = log.get("fitness_history", [float("nan")])[-1] if strat == "evolution" else float("nan")
            name = {"evolution": "EvoPress", "uniform": "uniform", "dp": "DP (summed errors)",
                    "cosine": "ShortGPT block influence"}[strat]
            row = (f"| {label} | {name} | {log['achieved_budget']:.4g} | {acc:.4f} | {kl:.4f} | "
                   f"{'' if fit != fit else f'{fit:.4g}'} | {log.get('search_seconds', 0.0):.0f} | {secs:.0f} |")
            print(row, flush=True)
            lines.append(row)
            results[f"{family}-{budget}-{strat}"] = {"acc": acc, "kl": kl, "log_level_map": log["level_map"],
                                                     "achieved": log["achieved_budget"],
                                                     "search_seconds": log.get("search_seconds"),
                                                     "fitness_history": log.get("fitness_history")}
    path = ROOT / "benchmarks" / "results" / "evopress_text.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(results)  # runs of different --families add to one file
    path.write_text(json.dumps(merged, indent=1))
    return lines


def bench_drop_oracle(args: argparse.Namespace) -> list[str]:
    """All C(6, 2) = 15 ways of dropping 2 of 6 blocks, ranked by calibration KL on ``--oracle-samples``
    pool samples: where do the maps chosen by each method (from evopress_text.json) rank?"""
    import itertools

    import numpy as np

    from modelpress.search.space import calibration_pool
    from modelpress.sources import load_dataset
    from modelpress.search.levels import LevelSpec, LevelSwitcher, search_units

    handle = zoo.load("minilm-docs")
    units, _ = search_units(handle.module, "drop")
    pool = calibration_pool(handle, load_dataset("pydocs-10/train"), args.pool, args.seed + 1,
                            args.batch_size)  # other samples than the search's
    canon = handle.canonical()
    pool.set_targets(canon)
    ids = np.arange(min(args.oracle_samples, len(pool)))
    sw = LevelSwitcher(handle.module, LevelSpec.make("drop"), units, None)
    scores = {}
    for combo in itertools.combinations(range(len(units)), 2):
        sw.apply([0 if i in combo else 1 for i in range(len(units))])
        scores[combo] = pool.fitness(canon, ids)
    sw.apply([None] * len(units))
    ranked = sorted(scores, key=scores.get)
    lines = [f"### Dropping 2 of 6 blocks: all 15 choices ranked by KL on {len(ids)} other calibration samples", "",
             "| method | dropped blocks | KL | rank of 15 |", "|---|---|---|---|"]
    path = ROOT / "benchmarks" / "results" / "evopress_text.json"
    found = json.loads(path.read_text()) if path.exists() else {}
    for key, res in sorted(found.items()):
        if not key.startswith("drop-"):
            continue
        combo = tuple(i for i, u in enumerate(units) if res["log_level_map"][u] == 1.0)
        lines.append(f"| {key.split('-')[-1]} | {combo} | {scores[combo]:.4f} | {ranked.index(combo) + 1} |")
    lines.append(f"| best of all 15 | {ranked[0]} | {scores[ranked[0]]:.4f} | 1 |")
    lines.append(f"| worst of all 15 | {ranked[-1]} | {scores[ranked[-1]]:.4f} | 15 |")
    print("\n".join(lines), flush=True)
    return lines


def bench_digits(args: argparse.Namespace) -> list[str]:
    from modelpress.metrics import EvalContext, get_metric

    handle = zoo.load("digits-ddpm")
    fd = get_metric("fd").fn
    ectx = EvalContext(seed=0, samples=args.fd_samples, options={"steps": args.fd_steps}, show_progress=False)
    dense_fd = fd(handle.canonical(), handle, ectx).value
    family, method, budget = args.digits_family, args.digits_method, args.digits_budget
    lines = [f"### digits-ddpm ({family} {budget}, {method}, grouping {args.digits_grouping}; FD of {args.fd_samples} DDIM-{args.fd_steps} samples "
             f"to held-out digits; dense FD {dense_fd:.3f})", "",
             "| method | achieved | FD | calib fitness (eps MSE) | search s | pass s |", "|---|---|---|---|---|---|"]
    for strat in ("uniform", "dp", "evolution"):
        cfg = EvoPressPass.Config(family=family, method=method, budget=budget, strategy=strat,
                                  grouping=args.digits_grouping, **search_kwargs(args))
        out, log, secs = run_pass(handle, cfg, args.seed)
        value = fd(out.canonical(), out, ectx).value
        fit = log.get("fitness_history", [float("nan")])[-1] if strat == "evolution" else float("nan")
        name = {"evolution": "EvoPress", "uniform": "uniform", "dp": "DP (summed errors)"}[strat]
        row = (f"| {name} | {log['achieved_budget']:.4g} | {value:.3f} | {'' if fit != fit else f'{fit:.4g}'} | "
               f"{log.get('search_seconds', 0.0):.0f} | {secs:.0f} |")
        print(row, flush=True)
        lines.append(row)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["text", "digits", "drop-oracle"], default=None)
    p.add_argument("--oracle-samples", type=int, default=32)
    p.add_argument("--families", nargs="*", default=None, help="text families to run (bits sparsity drop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--generations", type=int, default=40)
    p.add_argument("--offspring", type=int, default=12)
    p.add_argument("--survivors", type=int, nargs="+", default=[3, 2, 1])
    p.add_argument("--stage-samples", type=int, nargs="+", default=[16, 48, 128])
    p.add_argument("--pool", type=int, default=512, help="calibration pool the stages draw from")
    p.add_argument("--hessian-samples", type=int, default=128)
    p.add_argument("--baseline-samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=None, help="test examples (default: all)")
    p.add_argument("--bits-method", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--digits-family", default="bits")
    p.add_argument("--digits-method", default="gptq")
    p.add_argument("--digits-budget", type=float, default=3.0)
    p.add_argument("--digits-grouping", choices=["size", "none"], default="none",
                   help="none: 11 of the UNet's 63 layers have a size of their own (32%% of the weights)")
    p.add_argument("--fd-samples", type=int, default=256)
    p.add_argument("--fd-steps", type=int, default=25)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "evopress.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lines = ["# EvoPress benchmark", "",
             f"Search: {args.generations} generations x {args.offspring} offspring, survivors {args.survivors} "
             f"on {args.stage_samples} fresh samples per stage (pool {args.pool}); DP errors on "
             f"{args.baseline_samples} samples; seed {args.seed}; torch threads {args.threads}.", ""]
    if args.only in (None, "text"):
        lines += bench_text(args) + [""]
    if args.only in (None, "drop-oracle"):
        lines += bench_drop_oracle(args) + [""]
    if args.only in (None, "digits"):
        lines += bench_digits(args) + [""]
    lines.append(f"Total wall time: {time.perf_counter() - t0:.0f} s.")
    out = Path(args.out)
    if args.families:
        out = out.with_name(f"{out.stem}-{'-'.join(args.families)}{out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
