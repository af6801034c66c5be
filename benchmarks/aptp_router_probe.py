"""Does APTP's router see which prompts are easy? A probe on digits-t2i-printed (30% printed-digit prompts,
each asking for one fixed glyph: easy; 70% handwritten: a whole distribution).

1. How MiniLM (the router's input) groups the training prompts: mean cosine similarity of pooled embeddings
   within the printed prompts, within the handwritten ones, across the two kinds, and within / across digits.
2. How much pruning hurts each kind with the UNet frozen (all the router ever sees): the unpruned UNet's
   eps-MSE and the pruned UNet's MSE to the unpruned output (the distillation loss), per kind, under each
   prompt's own warm-up architecture; the same noise and timesteps for both kinds.
3. The router after its warm-up (router alone, UNet frozen, as in APTP's first phase; 300 steps): the MACs
   ratio of each prompt's own deterministic architecture, printed vs handwritten, with the paper's contrastive
   loss (weight 100) and without it; and how the training prompts of each kind are then routed to the K codes.

    python benchmarks/aptp_router_probe.py --threads 1 --out benchmarks/results/aptp-router-probe.md   # ~2 min
    python benchmarks/aptp_router_probe.py --out benchmarks/results/aptp-router-probe-2threads.md

(The thread count changes float summation order, and the router's training follows it: the two files differ
in their numbers, not in their findings.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelpress import zoo  # noqa: E402
from modelpress.passes import Context  # noqa: E402
from modelpress.prune import aptp  # noqa: E402
from modelpress.prune.gates import GatedUNet  # noqa: E402
from modelpress.sources import load_dataset  # noqa: E402
from modelpress.zoo import digits  # noqa: E402


def embedding_groups(data: aptp.PromptImageData, printed: torch.Tensor) -> list[str]:
    x = F.normalize(data.pooled, dim=-1)
    sim = x @ x.T
    digit = data.prompt_labels % digits.PRINTED
    same = digit[:, None] == digit[None, :]
    return ["| pairs of training prompts | mean cosine similarity |", "|---|---|",
            f"| both printed | {sim[printed][:, printed].mean():.3f} |",
            f"| both handwritten | {sim[~printed][:, ~printed].mean():.3f} |",
            f"| one of each kind | {sim[printed][:, ~printed].mean():.3f} |",
            f"| same digit | {sim[same].mean():.3f} |",
            f"| different digits | {sim[~same].mean():.3f} |"]


@torch.no_grad()
def pruning_errors(gated: GatedUNet, data: aptp.PromptImageData, gates: torch.Tensor, seed: int,
                   repeats: int = 4) -> dict[str, torch.Tensor]:
    """Per training prompt, mean over ``repeats`` noisings of one of its images: the unpruned UNet's eps-MSE and
    the gated UNet's MSE to the unpruned output."""
    g = torch.Generator().manual_seed(seed)
    n = len(data.ehs)
    eps_err, distill = torch.zeros(n), torch.zeros(n)
    for _ in range(repeats):
        for i in range(0, n, 250):
            idx = torch.arange(i, min(n, i + 250))
            xt, t, eps = data.noised(data.images_for(idx, g), g)
            full = gated(xt, t, data.ehs[idx])
            pruned = gated(xt, t, data.ehs[idx], gates=gates[idx])
            eps_err[idx] += ((full - eps) ** 2).flatten(1).mean(1) / repeats
            distill[idx] += ((pruned - full) ** 2).flatten(1).mean(1) / repeats
    return {"eps": eps_err, "distill": distill}


def router_after_warmup(unet: torch.nn.Module, data: aptp.PromptImageData, printed: torch.Tensor, k: int,
                        steps: int, w_contrastive: float, seed: int) -> tuple[str, str | None]:
    """The router-table row, and (with the contrastive loss) the pruning-error row for its architectures."""
    cfg = aptp.APTPPass.Config(codes=k, target_macs=0.6, router_steps=steps, warmup_fraction=0.99, batch_size=24,
                               w_contrastive=w_contrastive)
    example = (torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long), data.ehs[:1])
    with aptp._frozen(unet):
        gated = GatedUNet(unet, example, cfg.units, cfg.ff_groups)
        try:
            router, codes, _ = aptp.train_router(gated, data, k, cfg, Context(seed=seed, show_progress=False))
            with torch.no_grad():
                routed, gates = aptp.route_by_codes(router, codes, data.pooled, gated.units, cfg)
                ratio = gated.macs_ratio(gates)
                errors = pruning_errors(gated, data, gates, seed) if w_contrastive else None
        finally:
            gated.remove_hooks()
    error_row = None if errors is None else (
        f"| {errors['eps'][printed].mean():.4f} | {errors['eps'][~printed].mean():.4f} | "
        f"{errors['distill'][printed].mean():.4f} | {errors['distill'][~printed].mean():.4f} |")
    return (f"| {w_contrastive:g} | {ratio[printed].mean():.3f} ± {ratio[printed].std():.3f} | "
            f"{ratio[~printed].mean():.3f} ± {ratio[~printed].std():.3f} | "
            f"{torch.bincount(routed[printed], minlength=k).tolist()} | "
            f"{torch.bincount(routed[~printed], minlength=k).tolist()} |"), error_row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="router warm-up steps")
    p.add_argument("--codes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aptp-router-probe.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    handle = zoo.load("digits-t2i-printed")
    data = aptp.training_data(handle, load_dataset("digits-prompts/train"), 2000, args.seed)
    printed = data.prompt_labels >= digits.PRINTED
    lines = [f"# APTP router probe on digits-t2i-printed (seed {args.seed}, {int(printed.sum())} printed of "
             f"{len(printed)} training prompts)", "", "## The router's input: pooled MiniLM embeddings", "",
             *embedding_groups(data, printed), "",
             f"## The router after {args.steps} warm-up steps (router alone, UNet frozen)", "",
             "Each prompt's own architecture (deterministic gates); then routing to the code book initialised "
             "from it (k-means, as the pass does).", "",
             "| contrastive weight | MACs ratio, printed prompts | handwritten prompts | printed prompts per code | "
             "handwritten prompts per code |", "|---|---|---|---|---|"]
    error_rows = []
    for w in (100.0, 0.0):
        row, error_row = router_after_warmup(handle.module, data, printed, args.codes, args.steps, w, args.seed)
        lines.append(row)
        error_rows += [error_row] if error_row else []
    lines += ["", "## What pruning costs each kind of prompt, UNet frozen (contrastive-weight-100 router's "
              "architectures)", "", "| unpruned eps-MSE, printed | handwritten | pruned-to-unpruned MSE "
              "(distillation), printed | handwritten |", "|---|---|---|---|", *error_rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
