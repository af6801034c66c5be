"""APTP (prompt-routed pruning) vs static pruning at the same average MACs vs the unpruned digits-t2i.

One run, one seed, the same eval prompts and the same initial noise for every model:

1. ``aptp`` pass on ``digits-t2i`` (K codes, target MACs ratio): router training, slicing, per-code fine-tuning;
2. the average MACs ratio APTP actually spends on the eval prompts (each prompt's code, averaged);
3. ``static_prune`` (one architecture for all prompts) with that average as its target and the same router
   steps, fine-tuned for the per-code steps ("same steps per model", the paper's protocol: each expert is
   fine-tuned in its own run), and a copy fine-tuned on to the experts' *total* (K x per-code steps);
4. for the unpruned, APTP and static models: Fréchet distance to held-out real digits (digits-classifier
   features) and prompt agreement, overall and per APTP code (over the prompts routed to each code, so every
   model is judged on the same prompt subset and noise); which prompts go to which code (table + PNG);
   latency per code: median of repeated forwards of each physically smaller UNet, beside the full UNet and the
   static one.

    python benchmarks/aptp.py --router-steps 250 --finetune-steps 200 --batch 24 --seed S   # the documented runs
                                                               # (~8 min each on 2 quiet cores)
    python benchmarks/aptp.py --router-steps 40 --finetune-steps 10 --samples 100   # smoke run

Writes ``benchmarks/results/aptp.md`` (+ ``.json``) and ``docs/images/aptp-routing.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelpress import zoo  # noqa: E402
from modelpress.metrics import EvalContext  # noqa: E402
from modelpress.metrics.diffusion import feature_stats, frechet_distance, generate  # noqa: E402
from modelpress.passes import Context, seeded  # noqa: E402
from modelpress.sources import load_dataset  # noqa: E402
from modelpress.prune.aptp import (APTPModel, APTPPass, StaticPrunePass, training_data,  # noqa: E402
                                   finetune_expert)
from modelpress.zoo.digits import PRINTED, classifier_features, classify, digits_data  # noqa: E402

_REAL: list = []


def fd_to_real(samples: torch.Tensor) -> float:
    """FD to the 300 held-out real digits in the digits classifier's features (the ``fd`` metric's definition)."""
    if not _REAL:
        _REAL.extend(feature_stats(classifier_features(digits_data("heldout")[0])))
    return frechet_distance(*feature_stats(classifier_features(samples)), *_REAL)


def scores(samples: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor | None = None) -> dict[str, float]:
    """FD over the samples of handwritten prompts (a printed prompt asks for one fixed glyph), agreement over
    all of them; with printed prompts also the agreement of each kind."""
    if idx is not None:
        samples, labels = samples[idx], labels[idx]
    hand = labels < PRINTED
    hits = (classify(samples) == labels % PRINTED).float() if len(samples) else torch.zeros(0)
    out = {"fd": fd_to_real(samples[hand]) if int(hand.sum()) > 2 else float("nan"),
           "agreement": float(hits.mean()) if len(samples) else float("nan"), "n": len(samples)}
    if not hand.all():
        out.update(agreement_handwritten=float(hits[hand].mean()) if hand.any() else float("nan"),
                   agreement_printed=float(hits[~hand].mean()), n_printed=int((~hand).sum()))
    return out


def quality_table(samples: dict[str, torch.Tensor], labels: torch.Tensor, codes: torch.Tensor, k: int) -> dict:
    """FD / prompt agreement of every model, overall and over the prompts APTP routes to each code."""
    table = {name: {"overall": scores(s, labels)} for name, s in samples.items()}
    for name, s in samples.items():
        for c in range(k):
            table[name][f"code {c}"] = scores(s, labels, torch.nonzero(codes == c).flatten())
    return table


@torch.no_grad()
def latency_ms(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def routing_png(path: Path, codes: torch.Tensor, labels: torch.Tensor, samples: torch.Tensor,
                macs: list[float], k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modelpress.sampling import to_unit_range

    columns = PRINTED + 10 if bool((labels >= PRINTED).any()) else 10  # handwritten 0-9, then printed 0-9
    counts = torch.zeros(k, columns)
    for c, d in zip(codes.tolist(), labels.tolist()):
        counts[c, d] += 1
    fig = plt.figure(figsize=(12 if columns == 10 else 15, 1.0 + 1.1 * k))
    ax = fig.add_axes([0.10, 0.12, 0.34, 0.78])
    ax.imshow(counts, cmap="viridis", aspect="auto")
    for c in range(k):
        for d in range(columns):
            ax.text(d, c, int(counts[c, d]), ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(columns), [str(d) if d < PRINTED else f"p{d - PRINTED}" for d in range(columns)])
    ax.set_xlabel("digit named by the prompt" + (" (pN: printed N)" if columns > 10 else ""))
    ax.set_yticks(range(k), [f"code {c}\n{macs[c]:.2f} MACs" for c in range(k)])
    ax.set_title("eval prompts routed to each code")
    per_row = 12
    for c in range(k):
        idx = torch.nonzero(codes == c).flatten()[:per_row]
        for j, i in enumerate(idx.tolist()):
            a = fig.add_axes([0.47 + j * 0.044, 0.90 - (c + 1) * 0.78 / k, 0.04, 0.78 / k * 0.9])
            a.imshow(to_unit_range(samples[i, 0]).numpy(), cmap="gray", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            lab = int(labels[i])
            a.set_title(str(lab) if lab < PRINTED else f"p{lab - PRINTED}", fontsize=7, pad=1)
    fig.text(0.47, 0.93, "APTP samples per code (title: digit asked for)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-t2i", help="zoo model: digits-t2i, or digits-t2i-printed (30%% of "
                   "prompts ask for a printed digit, one fixed glyph: prompts of two difficulties)")
    p.add_argument("--codes", type=int, default=4)
    p.add_argument("--target", type=float, default=0.6)
    p.add_argument("--router-steps", type=int, default=200)
    p.add_argument("--finetune-steps", type=int, default=100, help="per code (static gets codes x this)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--router-lr", type=float, default=None)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--train-templates", action="store_true",
                   help="also score every model on prompts written with the training templates (seen wording); "
                   "the static models' MACs still match APTP's on the eval prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--progress", action="store_true", help="progress bars even when not on a terminal")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aptp.md"))
    p.add_argument("--png", default=str(ROOT / "docs" / "images" / "aptp-routing.png"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    show = sys.stderr.isatty() or args.progress
    handle = zoo.load(args.model)
    results: dict = {"args": vars(args)}
    extra = {"router_lr": args.router_lr} if args.router_lr else {}

    # 1. APTP
    cfg = APTPPass.Config(codes=args.codes, target_macs=args.target, router_steps=args.router_steps,
                          finetune_steps=args.finetune_steps, batch_size=args.batch, threads=args.threads, **extra)
    ctx = Context(seed=args.seed, show_progress=show)
    t0 = time.time()
    with seeded(args.seed):
        aptp_handle = APTPPass(cfg).apply(handle.copy(), ctx)  # passes change their input
    results["aptp_seconds"] = round(time.time() - t0, 1)
    results["aptp_log"] = ctx.log["aptp"]
    model: APTPModel = aptp_handle.module
    k = model.n_codes
    code_macs = model.info["code_macs_ratio"]
    print(f"aptp built in {results['aptp_seconds']} s: code MACs {code_macs}, "
          f"train counts {model.info['train_prompt_counts']}", flush=True)

    # eval prompts, same as the fd / prompt_agreement metrics
    ectx = EvalContext(seed=args.seed, samples=args.samples, options={"steps": args.steps}, show_progress=show)
    gen_a = generate(aptp_handle.canonical(), aptp_handle, ectx)
    from modelpress.zoo.text import encode_prompts

    prompts, labels = gen_a["prompts"], gen_a["labels"]
    cond = torch.cat([encode_prompts(prompts[i:i + 256]) for i in range(0, len(prompts), 256)])
    codes = model.route(cond)
    counts = torch.bincount(codes, minlength=k).tolist()
    avg_macs = sum(code_macs[c] * n for c, n in enumerate(counts)) / len(codes)
    results.update(eval_counts=counts, aptp_avg_macs=avg_macs)
    print(f"eval routing {counts}, average MACs ratio {avg_macs:.4f}", flush=True)

    # 2. static at the same average MACs: fine-tuned first for the per-code steps ("same steps per model"),
    #    then a copy continues for (K-1) x per-code more steps ("static": the same total as APTP's K experts)
    scfg = StaticPrunePass.Config(target_macs=round(avg_macs, 4), router_steps=args.router_steps,
                                  finetune_steps=args.finetune_steps, batch_size=args.batch, threads=args.threads,
                                  **extra)
    sctx = Context(seed=args.seed, show_progress=show)
    t0 = time.time()
    with seeded(args.seed):
        short = StaticPrunePass(scfg).apply(handle.copy(), sctx)
    full = short.replace_module(copy.deepcopy(short.module))
    data = training_data(handle, load_dataset("digits-prompts/train"), scfg.prompt_pool, args.seed)
    with seeded(args.seed):
        cont = finetune_expert(full.module.experts[0], handle.module, data, torch.arange(scfg.prompt_pool), scfg,
                               sctx, 990, args.finetune_steps * (k - 1), "static: further fine-tuning")
    results["static_seconds"] = round(time.time() - t0, 1)
    results["static_log"] = {**sctx.log["static_prune"], "continued_finetune": cont}
    statics = {"static (same steps per model)": short, "static": full}
    print(f"static built in {results['static_seconds']} s: MACs {short.module.info['code_macs_ratio'][0]}", flush=True)

    # 3. quality
    samples = {"unpruned": generate(handle.canonical(), handle, ectx)["samples"], "APTP": gen_a["samples"]}
    macs = {"unpruned": 1.0, "APTP": avg_macs}
    for label, h in statics.items():
        samples[label] = generate(h.canonical(), h, ectx)["samples"]
        macs[label] = h.module.info["code_macs_ratio"][0]
    table = quality_table(samples, labels, codes, k)
    results["quality"] = table
    if args.train_templates:
        tctx = EvalContext(seed=args.seed, samples=args.samples, options={"steps": args.steps, "prompt_split": "train"},
                           show_progress=show)
        handles = {"unpruned": handle, "APTP": aptp_handle, **statics}
        seen = {name: generate(h.canonical(), h, tctx) for name, h in handles.items()}
        t_prompts, t_labels = seen["APTP"]["prompts"], seen["APTP"]["labels"]
        t_codes = model.route(torch.cat([encode_prompts(t_prompts[i:i + 256]) for i in range(0, len(t_prompts), 256)]))
        results["quality_train_templates"] = quality_table({n: g["samples"] for n, g in seen.items()}, t_labels,
                                                           t_codes, k)
        results["train_templates_counts"] = torch.bincount(t_codes, minlength=k).tolist()
    results["macs"] = macs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))  # partial
    print(json.dumps({n: {"macs": macs[n], **table[n]["overall"]} for n in table}), flush=True)

    # 4. latency (forward of one batch, single model call)
    g = torch.Generator().manual_seed(0)
    b = args.latency_batch
    x = torch.randn(b, 1, 16, 16, generator=g)
    t = torch.full((b,), 500, dtype=torch.long)
    e = cond[:b]
    lat = {"unpruned": latency_ms(lambda: handle.module(x, t, encoder_hidden_states=e), args.repeats),
           "static": latency_ms(lambda: statics["static"].module.experts[0](x, t, encoder_hidden_states=e), args.repeats)}
    for c in range(k):
        lat[f"code {c}"] = latency_ms(lambda c=c: model.experts[c](x, t, encoder_hidden_states=e), args.repeats)
    mixed = sum(lat[f"code {c}"] * n for c, n in enumerate(counts)) / len(codes)
    lat["APTP (routing mix)"] = mixed
    results["latency_ms"] = lat

    # 5. which prompts go where
    routing = {c: {"digits": torch.bincount(labels[codes == c] % PRINTED, minlength=10).tolist(),
                   "printed": int((labels[codes == c] >= PRINTED).sum()),
                   "examples": [prompts[i] for i in torch.nonzero(codes == c).flatten()[:4].tolist()]}
               for c in range(k)}
    results["routing"] = routing
    routing_png(Path(args.png), codes, labels, samples["APTP"], code_macs, k)

    lines = write_tables(results, table, macs, lat, routing, code_macs, counts, k, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(lines))


def reseeded(aptp_log: dict) -> str:
    """``step: codes`` of every dead-code re-seeding in the router log (``min_code_share``)."""
    return ", ".join(f"{u['step']}: {u['revived']}" for u in aptp_log["router"].get("code_usage", [])
                     if u["revived"])


def write_tables(results, table, macs, lat, routing, code_macs, counts, k, args) -> list[str]:  # noqa: ANN001
    a = args
    lines = [f"# APTP on {a.model} (seed {a.seed}, {a.samples} eval prompts, DDIM {a.steps} steps, guidance 3)", "",
             f"K={a.codes}, target MACs {a.target}, router {a.router_steps} steps, fine-tune {a.finetune_steps} "
             f"steps per code; 'static (same steps per model)': {a.finetune_steps} (the paper's protocol: every "
             f"expert and the baseline get the same fine-tuning run); 'static': {a.finetune_steps * k}, the same "
             f"total as the K experts together. Batch {a.batch}, {a.threads} threads. "
             f"APTP pass {results['aptp_seconds']} s, static pass {results['static_seconds']} s.", "",
             f"Training prompts per code: {results['aptp_log']['train_prompt_counts']}; codes re-seeded during "
             f"router training (step: codes): {reseeded(results['aptp_log']) or 'none'}.", "",
             "## Overall", ""]
    mixed = "agreement_printed" in table["APTP"]["overall"]
    if mixed:
        lines += [f"{table['APTP']['overall']['n_printed']} of {a.samples} eval prompts ask for a printed digit; FD is "
                  "over the samples of the handwritten prompts.", "",
                  "| model | MACs ratio | FD to real (lower is better) | prompt agreement | handwritten | printed |",
                  "|---|---|---|---|---|---|"]
    else:
        lines += ["| model | MACs ratio | FD to real (lower is better) | prompt agreement |", "|---|---|---|---|"]
    for name in table:
        o = table[name]["overall"]
        kinds = f" | {o['agreement_handwritten']:.3f} | {o['agreement_printed']:.3f}" if mixed else ""
        lines.append(f"| {name} | {macs[name]:.3f} | {o['fd']:.2f} | {o['agreement']:.3f}{kinds} |")
    if "quality_train_templates" in results:
        tq = results["quality_train_templates"]
        lines += ["", f"## Overall on prompts written with the training templates (seen wording; APTP routes "
                  f"them {results['train_templates_counts']})", "",
                  "| model | FD to real | prompt agreement |", "|---|---|---|"]
        for name, t in tq.items():
            lines.append(f"| {name} | {t['overall']['fd']:.2f} | {t['overall']['agreement']:.3f} |")
    names = ("unpruned", "APTP", "static (same steps per model)", "static")
    lines += ["", "## Per APTP code (the prompts routed to each code; every model on the same prompts and noise)", "",
              "FD / prompt agreement of: unpruned; APTP; static with the same steps per model; static with the same "
              "total steps.", "",
              "| code | MACs ratio | eval prompts | FD | | | | agreement | | | |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in range(k):
        r = [table[n][f"code {c}"] for n in names]
        lines.append(f"| {c} | {code_macs[c]:.3f} | {counts[c]} | " + " | ".join(f"{x['fd']:.2f}" for x in r)
                     + " | " + " | ".join(f"{x['agreement']:.3f}" for x in r) + " |")
    lines += ["", f"## Latency (forward of a batch of {a.latency_batch}, median of {a.repeats}, {a.threads} threads)", "",
              "| model | ms | vs unpruned |", "|---|---|---|"]
    for name, v in lat.items():
        lines.append(f"| {name} | {v:.1f} | {v / lat['unpruned']:.2f}x |")
    lines += ["", "## Which prompts go to which code (eval prompts; counts per digit 0..9)", "",
              "| code | MACs | " + " | ".join(str(d) for d in range(10)) + " | of them printed | example prompts |",
              "|---|---|" + "---|" * 11 + "---|"]
    for c in range(k):
        r = routing[c]
        ex = "; ".join(f"\"{p}\"" for p in r["examples"][:3])
        lines.append(f"| {c} | {code_macs[c]:.3f} | " + " | ".join(str(v) for v in r["digits"])
                     + f" | {r['printed']} | {ex} |")
    return lines


if __name__ == "__main__":
    main()
