"""Delta compression on the zoo: BitDelta, Delta-CoMe, DARE and DAREx-q against the fine-tune.

For each (base, fine-tune) pair — minilm -> minilm-docs (small delta) and minilm -> minilm-docs-large
(large delta) — every method runs in the same process on the same data, and the table gives:

* test accuracy on pydocs-10 and its retention (compressed / fine-tune), the fine-tune's own accuracy and
  the base-with-the-fine-tune's-head ("no delta") as the floor;
* mean KL(fine-tune || compressed) of the class distributions on the test split;
* stored delta bytes (compressed linear deltas + kept norms/biases/head) against the fp16 delta of the
  same tensors, and the linear-layers-only ratio;
* DARE vs DAREx-q (unlabelled, analytic, labelled) and magnitude / importance pruning over
  p in {0.5, 0.9, 0.95, 0.99};
* BitDelta over a bitsandbytes int8 / NF4 base;
* multi-tenant serving: one batched forward over requests of two fine-tunes against running each
  fine-tune separately (min of repeats), and the numba packed-sign kernel against a dense matmul.

Usage::

    python benchmarks/delta.py                     # everything, writes benchmarks/results/delta.md
    python benchmarks/delta.py --quick             # fewer test examples and distillation steps
    python benchmarks/delta.py --pairs minilm-docs --sections main
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelpress import zoo  # noqa: E402
from modelpress.codecs.bitdelta import BitDeltaPass  # noqa: E402
from modelpress.codecs.dare import DarePass, DarexPass  # noqa: E402
from modelpress.codecs.delta import delta_size_report, match_linear_layers, quantize_base  # noqa: E402
from modelpress.codecs.delta_come import DeltaCoMePass  # noqa: E402
from modelpress.model import ModelHandle  # noqa: E402
from modelpress.passes import Context  # noqa: E402


def test_logits(handle: ModelHandle, data: tuple[torch.Tensor, ...], batch: int = 128) -> torch.Tensor:
    canon = handle.canonical().eval()
    with torch.no_grad():
        return torch.cat([canon(data[0][i:i + batch], data[1][i:i + batch]) for i in range(0, len(data[0]), batch)])


def metrics(logits: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    acc = float((logits.argmax(-1) == labels).float().mean())
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(logits.double(), -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return {"acc": acc, "kl": kl}


def no_delta(ft: ModelHandle, base: ModelHandle) -> ModelHandle:
    """The base's weights with the fine-tune's head and norms: what is left when the delta is dropped."""
    m = copy.deepcopy(ft.module)
    with torch.no_grad():
        for layer in match_linear_layers(m, base.module):
            layer.module.weight.copy_(layer.base_weight)
    return ft.replace_module(m)


def run_method(label: str, cls, cfg: dict, ft: ModelHandle, base: ModelHandle, data, ref, seed: int = 0):
    ctx = Context(seed=seed, base=base, show_progress=False)
    t0 = time.perf_counter()
    out = cls(cls.Config(**cfg)).apply(ft.copy(), ctx)  # passes change their input
    secs = time.perf_counter() - t0
    m = metrics(test_logits(out, data), ref, data[2])
    size = delta_size_report(out.module, base.module)
    log = ctx.log.get(cls.name, {})
    row = {"method": label, **m, "bytes": size["total_bytes"], "fp16_bytes": size["total_fp16_bytes"],
           "ratio": size["total_ratio"], "linear_ratio": size["linear_ratio"],
           "bits_per_param": 8 * size["linear_delta_bytes"] / (size["linear_fp16_bytes"] / 2), "seconds": secs}
    if "q" in log and not isinstance(log["q"], dict):
        row["q"] = log["q"]
    elif "q" in log:
        qs = list(log["q"].values())
        row["q"] = f"{min(qs):.3f}..{max(qs):.3f}"
    print(f"  {label:42s} acc={m['acc']:.4f} kl={m['kl']:.4f} ratio={size['total_ratio']:.1f} "
          f"({secs:.0f}s)", flush=True)
    return row, out


def fmt_rows(rows: list[dict], ft_acc: float) -> list[str]:
    lines = ["| method | test acc | retention | KL(ft‖c) | delta bytes | vs fp16 delta | linear bits/param | q | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r.get("q", "")
        q = f"{q:.3f}" if isinstance(q, float) else q
        lines.append(f"| {r['method']} | {r['acc']:.4f} | {100 * r['acc'] / ft_acc:.1f}% | {r['kl']:.4f} | "
                     f"{r.get('bytes', 0):,} | {r.get('ratio', 0):.1f}x | {r.get('bits_per_param', 0):.2f} | {q} | "
                     f"{r.get('seconds', 0):.0f} |")
    return lines


def main_section(name: str, base: ModelHandle, ft: ModelHandle, data, args) -> tuple[list[str], dict]:
    ref = test_logits(ft, data)
    ft_m = metrics(ref, ref, data[2])
    floor = metrics(test_logits(no_delta(ft, base), data), ref, data[2])
    rows = [{"method": "fine-tune (fp32)", **ft_m, "bytes": 0, "ratio": 1.0},
            {"method": "no delta (base + ft head/norms)", **floor}]
    print(f"[{name}] fine-tune acc {ft_m['acc']:.4f}, no-delta acc {floor['acc']:.4f}", flush=True)
    steps = args.steps
    equal = [
        ("BitDelta, alpha = mean abs(delta) (no distillation)", BitDeltaPass, {"steps": 0}),
        (f"BitDelta + scale distillation ({steps} steps x 4)", BitDeltaPass, {"steps": steps, "lr": args.lr}),
        ("Delta-CoMe 1 bit/param (8b:2, 3b:4, 2b:fill), GPTQ", DeltaCoMePass, {"samples": 64}),
        ("Delta-CoMe 1 bit/param, RTN instead of GPTQ", DeltaCoMePass, {"quantizer": "rtn"}),
        ("low-rank 8-bit only, 1 bit/param, GPTQ", DeltaCoMePass, {"groups": [{"bits": 8, "count": -1}],
                                                                  "samples": 64}),
        ("DARE p=0.95 (0.8 bit/param)", DarePass, {"p": 0.95}),
        ("DAREx-q p=0.95 unlabelled q", DarexPass, {"p": 0.95, "q_mode": "unlabelled"}),
    ]
    if args.main_methods == "core":
        equal = [e for e in equal if "RTN" not in e[0] and "low-rank" not in e[0]]
    for label, cls, cfg in equal:
        row, out = run_method(label, cls, cfg, ft, base, data, ref)
        rows.append(row)
        if label.startswith("BitDelta +"):
            distilled = out
    results = {"fine_tune": ft_m, "no_delta": floor, "equal_size": rows}
    lines = [f"### {name} (test n={len(data[2])})", ""] + fmt_rows(rows, ft_m["acc"]) + [""]

    # quantized base under the distilled BitDelta delta
    qrows = []
    for mode in ("int8", "nf4"):
        m = copy.deepcopy(distilled.module)
        try:
            quantize_base(m, mode)
            r = metrics(test_logits(distilled.replace_module(m), data), ref, data[2])
            qrows.append({"method": f"BitDelta over a bitsandbytes {mode} base", **r})
        except Exception as exc:  # report, don't hide
            qrows.append({"method": f"BitDelta over {mode} base: FAILED ({type(exc).__name__}: {exc})", "acc": 0, "kl": 0})
    results["quantized_base"] = qrows
    lines += [f"Quantized base ({name}):", ""] + \
             ["| method | test acc | retention | KL(ft‖c) |", "|---|---|---|---|"] + \
             [f"| {r['method']} | {r['acc']:.4f} | {100 * r['acc'] / ft_m['acc']:.1f}% | {r['kl']:.4f} |" for r in qrows] + [""]
    return lines, results


def dare_section(name: str, base: ModelHandle, ft: ModelHandle, data, args) -> tuple[list[str], dict]:
    ref = test_logits(ft, data)
    ft_acc = metrics(ref, ref, data[2])["acc"]
    methods = [("DARE 1/(1-p)", DarePass, {}, False),
               ("DAREx-q unlabelled (global q)", DarexPass, {"q_mode": "unlabelled"}, False),
               ("DAREx-q analytic (per layer)", DarexPass, {"q_mode": "analytic"}, False),
               ("DAREx-q labelled (global q, val split)", DarexPass, {"q_mode": "labelled"}, True),
               ("magnitude pruning + unlabelled q", DarexPass, {"prune": "magnitude", "q_mode": "unlabelled"}, True),
               ("importance abs(d)·‖x‖ + unlabelled q", DarexPass, {"prune": "importance", "q_mode": "unlabelled"}, True)]
    table: dict[str, dict[float, dict]] = {}
    for p in args.ps:
        for label, cls, cfg, costly in methods:
            if costly and p not in args.full_ps:
                continue
            if args.skip_magnitude and label.startswith("magnitude"):
                continue
            extra = {}
            if cls is DarexPass:
                extra = {"samples": args.search_samples, "grid": args.grid}
                if cfg.get("q_mode") == "labelled":
                    extra["val_samples"] = args.val_samples
            row, _ = run_method(f"{label} p={p}", cls, {"p": p, **cfg, **extra}, ft, base, data, ref)
            table.setdefault(label, {})[p] = row
    head = "| method | " + " | ".join(f"p={p} acc (KL)" for p in args.ps) + " |"
    lines = [f"### DARE vs DAREx-q, {name} (fine-tune acc {ft_acc:.4f})", "", head,
             "|---|" + "---|" * len(args.ps)]
    for label, by_p in table.items():
        cells = []
        for p in args.ps:
            r = by_p.get(p)
            if r is None:
                cells.append("–")
                continue
            q = r.get("q", "")
            q = f", q={q:.3g}" if isinstance(q, float) else (f", q={q}" if q else "")
            cells.append(f"{r['acc']:.4f} ({r['kl']:.3f}{q})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for label, by_p in table.items():
        lines.append(f"- stored delta vs fp16 delta, {label}: " +
                     ", ".join(f"p={p}: {r['ratio']:.1f}x" for p, r in by_p.items()))
    lines.append("")
    lines.append("(random masks store a seed + fp16 kept values; magnitude/importance also store positions.)")
    lines.append("")
    return lines, {k: {str(p): v for p, v in d.items()} for k, d in table.items()}


def serving_section(base: ModelHandle, fts: list[ModelHandle], args) -> tuple[list[str], dict]:
    from modelpress.codecs.serving import MultiTenantModel
    from modelpress.kernels.sign_gemv import sign_matmul
    from modelpress.zoo.text import docs_tensors

    tenants = [BitDeltaPass(BitDeltaPass.Config(steps=0)).apply(ft.copy(), Context(base=base, show_progress=False)).module
               for ft in fts]
    ids, mask, _ = docs_tensors("test", 8, 64)
    tid = torch.tensor([i % len(tenants) for i in range(8)])
    res = {}

    def best(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    lines = ["### Multi-tenant serving (BitDelta, batch of 8 requests over %d fine-tunes, 64 tokens)" % len(tenants), "",
             "| forward | min time (ms) | matches per-fine-tune outputs |", "|---|---|---|"]
    with torch.no_grad():
        ref = torch.cat([tenants[int(t)](input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
                         for b, t in enumerate(tid)])
        for use_kernel in (False, True):
            server = MultiTenantModel(tenants, use_kernel=use_kernel).eval()
            got = server(tid, input_ids=ids, attention_mask=mask).logits
            t = best(lambda: server(tid, input_ids=ids, attention_mask=mask))
            ok = bool(torch.allclose(got, ref, atol=1e-4, rtol=1e-4))
            name = "batched, numba packed-sign kernel" if use_kernel else "batched, unpacked signs (torch matmul)"
            lines.append(f"| {name} | {1000 * t:.1f} | {ok} |")
            res[name] = {"ms": 1000 * t, "match": ok}

        def separate():
            for k, m in enumerate(tenants):
                rows = tid == k
                m(input_ids=ids[rows], attention_mask=mask[rows])

        t = best(separate)
        lines.append(f"| each fine-tune separately on its rows (dense fp32 deltas unpacked) | {1000 * t:.1f} | reference |")
        res["separate"] = {"ms": 1000 * t}
    # the kernel alone: one 1536x384 sign matrix, GEMV and a 512-row GEMM, vs torch on unpacked signs
    g = np.random.default_rng(0)
    signs = torch.from_numpy(g.random((1536, 384)) > 0.5)
    from modelpress.quant.primitives import pack_signs, unpack_signs

    packed = pack_signs(signs).numpy()
    dense = unpack_signs(torch.from_numpy(packed), 384)
    lines += ["", "| packed-sign product 1536x384 | numba kernel (ms) | torch dense fp32 matmul (ms) | sign bytes vs fp32 |",
              "|---|---|---|---|"]
    for n in (1, 512):
        x = g.standard_normal((n, 384)).astype(np.float32)
        tk = best(lambda: sign_matmul(x, packed, 384), reps=7)
        xt = torch.from_numpy(x)
        td = best(lambda: xt @ dense.T, reps=7)
        lines.append(f"| X [{n}, 384] | {1000 * tk:.3f} | {1000 * td:.3f} | {packed.nbytes:,} vs {dense.numel() * 4:,} |")
        res[f"kernel_n{n}"] = {"kernel_ms": 1000 * tk, "dense_ms": 1000 * td}
    lines.append("")
    return lines, res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="minilm-docs,minilm-docs-large")
    ap.add_argument("--sections", default="main,dare,serving")
    ap.add_argument("--n-test", type=int, default=None, help="test examples (default: the whole split)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ps", default="0.5,0.9,0.95,0.99")
    ap.add_argument("--full-ps", default="0.5,0.9,0.95,0.99",
                    help="p values at which the labelled search and magnitude/importance pruning also run")
    ap.add_argument("--search-samples", type=int, default=32, help="DAREx calibration texts (search/statistics)")
    ap.add_argument("--grid", type=int, default=20, help="q values tried by the DAREx global searches")
    ap.add_argument("--val-samples", type=int, default=200, help="validation examples of the labelled q search")
    ap.add_argument("--skip-magnitude", action="store_true", help="leave out magnitude pruning (time)")
    ap.add_argument("--main-methods", default="all", help="'all' or 'core' (skips the RTN and low-rank ablations)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "delta.md"))
    args = ap.parse_args()
    args.ps = [float(p) for p in args.ps.split(",")]
    args.full_ps = [float(p) for p in args.full_ps.split(",")]
    if args.quick:
        args.n_test = args.n_test or 256
        args.steps = min(args.steps, 50)
    torch.set_num_threads(args.threads)
    from modelpress.zoo.text import docs_tensors

    data = docs_tensors("test", args.n_test, 64)
    base = zoo.load("minilm")
    sections = args.sections.split(",")
    lines = ["# Delta compression benchmark", "",
             f"`python benchmarks/delta.py {' '.join(sys.argv[1:])}` — torch {torch.__version__}, "
             f"{args.threads} threads, CPU.", ""]
    results: dict = {}
    fts = []
    for name in args.pairs.split(","):
        ft = zoo.load(name)
        fts.append(ft)
        if "main" in sections:
            l, r = main_section(name, base, ft, data, args)
            lines += l
            results[f"{name}/main"] = r
        if "dare" in sections:
            l, r = dare_section(name, base, ft, data, args)
            lines += l
            results[f"{name}/dare"] = r
    if "serving" in sections:
        l, r = serving_section(base, fts, args)
        lines += l
        results["serving"] = r
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
