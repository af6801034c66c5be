"""APTP: prompt-routed structured pruning of a text-to-image UNet.

Ganjdanesh, Shirkavand, Gao & Huang, 2025, "Not All Prompts Are Made Equal: Prompt-based Pruning of
Text-to-Image Diffusion Models" (ICLR 2025). A *prompt router* maps each prompt to one of ``K`` learned
*architecture codes*; each code is a sub-network of the UNet (ResNet channels in GroupNorm groups, attention
heads, feed-forward groups: :mod:`modelpress.prune.gates`). Every code is then materialised as a physically
smaller UNet (:mod:`modelpress.prune.slicing`) and fine-tuned; at inference a batch is bucketed by code.

Router (Sec. 3.2): a frozen sentence encoder (here MiniLM, mean-pooled over the prompt's tokens, i.e. the
all-MiniLM-L6-v2 sentence embedding) plus a trainable head produce architecture logits ``z``; binary gates are
drawn with the Gumbel-sigmoid ``sigmoid((z + l + b) / tau)``, ``l ~ Logistic(0, 1)`` (the difference of two
Gumbels), made hard with a straight-through 0.5 threshold. A code book of ``K`` logit vectors is learned
alongside; a prompt's vector is snapped to the code of highest cosine similarity (after the width
normalisation ``1/sqrt(#groups)`` per unit).

Losses while the router trains (UNet frozen; Sec. 3.3):

* contrastive (eq. 4): ``BCE(softmax(cos(a_i, a_j) / t), softmax(cos(e_i, e_j) / t))`` between the router's
  architecture vectors ``a`` and the prompt embeddings ``e``, ``t = 0.03``: similar prompts get similar
  architectures;
* optimal-transport balancing (eq. 5): during training a batch is assigned to codes by Sinkhorn-Knopp on the
  cosine scores (``eps = 0.05``, 3 iterations), so every code receives an equal share of prompts;
* resource (eq. 6): ``|log(MACs ratio / target)|`` of the batch's mean MACs ratio;
* diffusion (eps-MSE) and distillation (MSE to the unpruned UNet's eps) of the gated UNet;
* commitment: ``beta (1 - cos(a, code))`` pulls a prompt's vector toward its assigned code so that the cosine
  snapping used at inference reproduces the balanced training assignment (the VQ commitment term of the
  reference implementation's quantizer, ``beta = 0.25``).

As in the reference implementation, the router first trains alone for a warm-up (its own vectors gate the
UNet); the code book is then initialised from k-means of router logits over a prompt pool (our choice: the
reference starts it orthogonal) and trained with the Sinkhorn assignment.

``static_prune`` is the paper's static baseline: the same machinery with a single code (every prompt gets the
same architecture), tuned to the same average MACs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data import Dataset
from ..data.inputs import encode_prompts, fit_images
from ..errors import UserError
from ..model import ModelHandle
from ..modules import register_module
from ..passes import Context, Pass, PassConfig, register_pass
from ..sampling import alphas_cumprod, scheduler_config
from .gates import UNIT_KINDS, GatedUNet, GateUnit, units_from_dicts, width_template
from .slicing import kept_groups, slice_unet


# ---------------------------------------------------------------------------------------------------
# The router and its pieces

def pool_prompt_embedding(encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding tokens (rows not all zero) of ``[B, L, D]`` token embeddings: the sentence
    embedding of all-MiniLM-L6-v2 (mean pooling) when the tokens are MiniLM's."""
    mask = (encoder_hidden_states.abs().sum(-1) > 0).to(encoder_hidden_states.dtype).unsqueeze(-1)
    return (encoder_hidden_states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class PromptRouter(nn.Module):
    """Trainable head on the frozen prompt embedding -> architecture logits (one per gate)."""

    def __init__(self, embed_dim: int, n_gates: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_gates))
        nn.init.zeros_(self.net[-1].bias)
        nn.init.normal_(self.net[-1].weight, std=0.01)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


def gumbel_sigmoid(logits: torch.Tensor, tau: float, offset: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Relaxed Bernoulli gates ``sigmoid((z + l + offset) / tau)``, ``l ~ Logistic(0, 1)``; no noise when
    ``generator`` is None (deterministic gates for inference)."""
    if generator is None:
        return torch.sigmoid((logits + offset) / tau)
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u) + offset) / tau)


def hard_gates(soft: torch.Tensor, units: Sequence[GateUnit]) -> torch.Tensor:
    """Straight-through 0/1 gates (forward: ``soft >= 0.5``; backward: identity), keeping at least the
    highest gate of every unit on so that no unit loses all its channels."""
    hard = (soft >= 0.5).to(soft.dtype)
    start = 0
    fix = torch.zeros_like(hard)
    for u in units:
        sl = slice(start, start + u.n_groups)
        if u.kind == "block":  # a whole block may go
            start += u.n_groups
            continue
        empty = hard[..., sl].sum(-1, keepdim=True) == 0
        top = F.one_hot(soft[..., sl].argmax(-1), u.n_groups).to(soft.dtype)
        fix[..., sl] = top * empty
        start += u.n_groups
    hard = hard + fix
    return hard.detach() + soft - soft.detach()


def contrastive_loss(prompt_emb: torch.Tensor, arch: torch.Tensor, temperature: float = 0.03) -> torch.Tensor:
    """APTP eq. 4: binary cross-entropy between the row-softmaxed cosine-similarity matrices of the
    architecture vectors (prediction) and of the prompt embeddings (target)."""
    a = F.normalize(arch, dim=-1)
    e = F.normalize(prompt_emb, dim=-1)
    p_arch = torch.softmax(a @ a.T / temperature, dim=-1)
    p_text = torch.softmax(e @ e.T / temperature, dim=-1)
    return F.binary_cross_entropy(p_arch.clamp(1e-7, 1 - 1e-7), p_text)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp (Cuturi, 2013) on ``scores [B, K]``: ``Q = exp(scores / eps)`` scaled alternately so that
    every code (column) gets mass ``1/K`` and every sample (row) ``1/B``; returns ``B * Q`` (rows sum to 1), an
    equipartitioned soft assignment (APTP eq. 5, as in SwAV)."""
    q = torch.exp((scores - scores.max()) / eps).T.double()  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T.to(scores.dtype)


def resource_loss(macs_ratio: torch.Tensor, target: float) -> torch.Tensor:
    """APTP eq. 6: ``|log(MACs ratio / target)|``."""
    return torch.log(macs_ratio.clamp_min(1e-6) / target).abs()


def snap_route(logits: torch.Tensor, code_gates: torch.Tensor, units: Sequence[GateUnit], template: torch.Tensor,
               tau: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference-time routing of router logits: deterministic 0/1 gates (no noise) snapped to the code of highest
    cosine similarity. Returns ``(code index [B], the 0/1 gates [B, n_gates])``."""
    gates = hard_gates(gumbel_sigmoid(logits, tau, offset), units)
    return snap_to_codes(gates, code_gates, template).argmax(-1), gates


def snap_to_codes(arch: torch.Tensor, codes: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[B, K]`` of width-normalised architecture vectors and codes."""
    a = F.normalize(arch * template, dim=-1)
    c = F.normalize(codes * template, dim=-1)
    return a @ c.T


# ---------------------------------------------------------------------------------------------------
# Training data: images, their prompts' token embeddings and pooled embeddings

@dataclass
class PromptImageData:
    """A pool of prompts (token embeddings ``ehs [P, L, D]``, labels ``[P]``) and images ``[N, C, H, W]`` with
    labels ``[N]``; a prompt is paired with a random image of its label. ``empty`` is the unconditional
    embedding ``[1, L, D]``; ``alphas_cumprod`` the DDPM schedule."""

    images: torch.Tensor
    image_labels: torch.Tensor
    ehs: torch.Tensor
    prompt_labels: torch.Tensor
    empty: torch.Tensor
    alphas_cumprod: torch.Tensor
    prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.pooled = pool_prompt_embedding(self.ehs)
        self._by_label = {int(c): torch.nonzero(self.image_labels == c).flatten()
                          for c in self.image_labels.unique()}

    def batch(self, n: int, g: torch.Generator, subset: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0, ehs, pooled)`` of ``n`` random prompts (from ``subset`` of prompt indices if given)."""
        pool = subset if subset is not None else torch.arange(len(self.ehs))
        pick = pool[torch.randint(0, len(pool), (n,), generator=g)]
        return self.images_for(pick, g), self.ehs[pick], self.pooled[pick]

    def images_for(self, prompts: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A random image of each prompt's label, for the prompt indices ``prompts`` in order."""
        imgs = []
        for lab in self.prompt_labels[prompts].tolist():
            cands = self._by_label[int(lab)]
            imgs.append(cands[int(torch.randint(0, len(cands), (1,), generator=g))])
        return self.images[torch.stack(imgs)]

    def noised(self, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DDPM forward process: ``(x_t, t, eps)``."""
        t = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps

    def drop_prompts(self, ehs: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
        """Replace conditions by the empty prompt with probability ``p`` (classifier-free guidance training)."""
        if p <= 0:
            return ehs
        drop = torch.rand(ehs.shape[0], generator=g) < p
        return torch.where(drop.view(-1, 1, 1), self.empty.expand_as(ehs), ehs)


def training_data(handle: ModelHandle, dataset: Dataset, n_prompts: int, seed: int) -> PromptImageData:
    """The prompt-image training pool of APTP from a calibration dataset with prompts and images.

    A dataset that supplies a labelled pool (``extras["prompt_image_pool"](n, seed, handle)``: the zoo's
    digits prompts, each paired with any training image of its digit) gives ``n_prompts`` prompts and every
    image; otherwise ``n_prompts`` rows (at most the dataset's size) are drawn with ``seed`` and each prompt is
    paired with its own image. Prompts are encoded by the model's prompt encoder."""
    dataset.require("prompt", "aptp (prompt-routed pruning)")
    dataset.require("image", "aptp (prompt-image pairs for the denoising loss)")
    pool = dataset.extras.get("prompt_image_pool")
    if pool is not None:
        images, labels, prompts, plabels = pool(n_prompts, seed, handle)
    else:
        ex = dataset.draw(min(n_prompts, dataset.size or n_prompts), seed)
        images, prompts = ex.images, ex.prompts
        labels = plabels = torch.arange(len(prompts))
    ehs = encode_prompts(handle, list(prompts))
    return PromptImageData(fit_images(handle, images, dataset.name), labels, ehs, plabels,
                           encode_prompts(handle, [""]), alphas_cumprod(scheduler_config(handle)).float(),
                           tuple(prompts))


# ---------------------------------------------------------------------------------------------------
# The compressed artifact: router + K sliced UNets

def _unet_from_config(cls_name: str, config: dict[str, Any]) -> nn.Module:
    from ..model import build_architecture

    return build_architecture({"library": "diffusers", "class": cls_name, "config": config})


@register_module
class APTPModel(nn.Module):
    """The router and the ``K`` per-code UNets (APTP Sec. 3.4), with the unet-cond canonical call.

    ``forward(sample, timestep, encoder_hidden_states, codes=None)`` routes each row by its own conditioning:
    the router reads the mean-pooled token embedding, the code is the nearest (cosine) architecture code, and
    the batch is bucketed by code, each bucket running through its own physically smaller UNet. Pass
    ``codes`` (``[B]`` int) to force codes. Classifier-free guidance: rows whose conditioning is the empty
    prompt (the stored ``uncond_pooled``) in a batch laid out ``[uncond; cond]`` (as
    :func:`modelpress.sampling.ddim_sample` does) take the code of their conditional partner, so both guidance
    branches of a prompt run on the same sub-network; a lone unconditional row is routed like any prompt.
    """

    def __init__(self, unet_class: str, unet_config: dict[str, Any], units: list[dict[str, Any]],
                 keep: list[list[list[int]]], embed_dim: int, router_hidden: int = 256,
                 gate_offset: float = 3.0, experts: list[nn.Module] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.unet_class, self.unet_config = unet_class, dict(unet_config)
        self.units = units_from_dicts(units)
        self.keep = [[list(k) for k in code] for code in keep]
        self.embed_dim, self.router_hidden, self.gate_offset = embed_dim, router_hidden, gate_offset
        self.info = dict(info or {})
        n_gates = sum(u.n_groups for u in self.units)
        self.router = PromptRouter(embed_dim, n_gates, router_hidden)
        code_gates = torch.zeros(len(keep), n_gates)
        offsets = [0] + torch.tensor([u.n_groups for u in self.units]).cumsum(0).tolist()
        for c, code in enumerate(self.keep):
            for i, k in enumerate(code):
                code_gates[c, [offsets[i] + j for j in k]] = 1.0
        self.register_buffer("code_gates", code_gates)
        self.register_buffer("template", width_template(self.units))
        self.register_buffer("uncond_pooled", torch.zeros(embed_dim))
        if experts is None:
            base = _unet_from_config(unet_class, unet_config)
            experts = [slice_unet(base, self.units, code) for code in self.keep]
        self.experts = nn.ModuleList(experts)

    # -- registry contract -------------------------------------------------------------------------
    def module_config(self) -> dict[str, Any]:
        return {"unet_class": self.unet_class, "unet_config": self.unet_config,
                "units": [u.to_dict() for u in self.units], "keep": self.keep, "embed_dim": self.embed_dim,
                "router_hidden": self.router_hidden, "gate_offset": self.gate_offset, "info": self.info}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "APTPModel":
        return cls(**cfg)

    # -- routing ------------------------------------------------------------------------------------
    @property
    def n_codes(self) -> int:
        return len(self.experts)

    @torch.no_grad()
    def route_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Code index ``[B]`` for pooled prompt embeddings ``[B, D]`` (deterministic gates, cosine snapping)."""
        if self.n_codes == 1:
            return torch.zeros(pooled.shape[0], dtype=torch.long, device=pooled.device)
        return snap_route(self.router(pooled), self.code_gates, self.units, self.template, 0.4, self.gate_offset)[0]

    @torch.no_grad()
    def route(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Code index ``[B]`` of each row, with unconditional rows of a ``[uncond; cond]`` batch following their
        conditional partner (see the class docstring)."""
        pooled = pool_prompt_embedding(encoder_hidden_states.float())
        codes = self.route_pooled(pooled)
        b = pooled.shape[0]
        if b % 2 == 0 and self.uncond_pooled.abs().sum() > 0:
            is_uncond = F.cosine_similarity(pooled, self.uncond_pooled.unsqueeze(0), dim=-1) > 0.9999
            half = b // 2
            if bool(is_uncond[:half].all()) and not bool(is_uncond[half:].all()):
                codes[:half] = codes[half:]
        return codes

    def routing_mix(self, encoder_hidden_states: torch.Tensor) -> dict[str, Any]:
        """Where prompts ``[B, L, D]`` are routed (APTP Sec. 3.4): prompts per code and the mean MACs ratio of their
        sub-networks against the unpruned UNet (what the pruning saves on these prompts)."""
        codes = self.route(encoder_hidden_states)
        counts = torch.bincount(codes, minlength=self.n_codes).tolist()
        ratios = self.info.get("code_macs_ratio")
        mix: dict[str, Any] = {"prompts_per_code": counts}
        if ratios:
            mix["macs_ratio"] = round(sum(n * r for n, r in zip(counts, ratios)) / max(sum(counts), 1), 5)
        return mix

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor,
                codes: torch.Tensor | None = None, return_dict: bool = True) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(b) if t.ndim == 0 else t
        if codes is None:
            codes = self.route(encoder_hidden_states)
        if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            outs = torch.stack([e(sample, t, encoder_hidden_states=encoder_hidden_states).sample
                                for e in self.experts])
            out = outs[codes, torch.arange(b, device=sample.device)]
        else:
            out = None
            for k in codes.unique().tolist():
                idx = torch.nonzero(codes == k).flatten()
                y = self.experts[k](sample[idx], t[idx], encoder_hidden_states=encoder_hidden_states[idx]).sample
                if out is None:
                    out = y.new_empty((b, *y.shape[1:]))
                out[idx] = y
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


# ---------------------------------------------------------------------------------------------------
# Training

class _Settings(PassConfig):
    """Options shared by ``aptp`` and ``static_prune``."""

    target_macs: float = Field(0.6, gt=0.05, le=1.0, description="target average MACs ratio vs the full UNet")
    router_steps: int = Field(300, ge=1, le=100_000, description="router training steps (UNet frozen)")
    warmup_fraction: float = Field(0.3, ge=0.0, lt=1.0,
                                   description="share of router steps before the code book is used")
    finetune_steps: int = Field(150, ge=0, le=100_000, description="fine-tuning steps per code")
    batch_size: int = Field(48, ge=2, le=4096)
    router_lr: float = Field(5e-3, gt=0, le=1.0)
    finetune_lr: float = Field(5e-4, gt=0, le=1.0)
    gumbel_temperature: float = Field(0.4, gt=0, le=10.0)
    gate_offset: float = Field(3.0, ge=-10.0, le=10.0, description="bias b of the Gumbel-sigmoid (gates start on)")
    contrastive_temperature: float = Field(0.03, gt=0, le=10.0)
    sinkhorn_eps: float = Field(0.05, gt=0, le=10.0)
    sinkhorn_iterations: int = Field(3, ge=1, le=100)
    w_diffusion: float = Field(1.0, ge=0)
    w_distill: float = Field(1.0, ge=0)
    w_resource: float = Field(2.0, ge=0)
    w_contrastive: float = Field(100.0, ge=0)
    w_commitment: float = Field(2.0, ge=0)
    min_code_share: float = Field(0.25, ge=0, le=1.0,
                                  description="a code routed fewer than this share of an even split (1/K) of "
                                  "the prompt pool during router training is re-seeded by splitting the most "
                                  "used code (0: never)")
    prompt_dropout: float = Field(0.1, ge=0, lt=1.0, description="empty-prompt rate (guidance) while training")
    units: list[Literal["resnet", "heads", "ff", "block"]] = Field(
        default_factory=lambda: list(UNIT_KINDS), description="what may be pruned; add 'block' for whole "
        "transformer blocks")
    ff_groups: int = Field(8, ge=1, le=1024)
    router_hidden: int = Field(256, ge=8, le=8192)
    prompt_pool: int = Field(2000, ge=16, le=100_000, description="training prompts drawn from the calibration "
                             "dataset (prompts with images)")
    threads: int = Field(2, ge=1, le=256, description="torch CPU threads while training")


@contextmanager
def _threads(n: int) -> Iterator[None]:
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    flags = [p.requires_grad for p in module.parameters()]
    mode = module.training
    module.requires_grad_(False).eval()
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)
        module.train(mode)


def _kmeans_init(router_logits: torch.Tensor, k: int, template: torch.Tensor, g: torch.Generator,
                 iterations: int = 10) -> torch.Tensor:
    """Initial code book: mean router logits of ``k`` cosine k-means clusters of the router's vectors."""
    x = F.normalize(router_logits * template, dim=-1)
    # farthest-point seeding (k-means++ without sampling): distinct prompts give distinct initial codes
    first = int(torch.randint(0, len(x), (1,), generator=g))
    centers = [x[first]]
    for _ in range(1, k):
        sim = torch.stack([x @ c for c in centers], 1).max(1).values
        centers.append(x[int(sim.argmin())])
    centers_t = torch.stack(centers).clone()
    assign = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iterations):
        assign = (x @ centers_t.T).argmax(-1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centers_t[c] = F.normalize(members.mean(0), dim=0)
            else:  # re-seed an empty cluster at the point farthest from every center
                centers_t[c] = x[int((x @ centers_t.T).max(1).values.argmin())]
    out = torch.stack([router_logits[assign == c].mean(0) if (assign == c).any() else router_logits.mean(0)
                       for c in range(k)])
    return out


def train_router(gated: GatedUNet, data: PromptImageData, n_codes: int, cfg: _Settings, ctx: Context,
                 use_contrastive: bool = True) -> tuple[PromptRouter, torch.Tensor, dict[str, Any]]:
    """Train the router and the code book with the UNet frozen (APTP Sec. 3.3). Returns the router, the
    code-book logits ``[K, n_gates]`` and a log."""
    g = ctx.generator(801)
    units, template = gated.units, gated.template()
    with torch.random.fork_rng():
        torch.manual_seed(ctx.seed * 1_000_003 + 800)
        router = PromptRouter(data.pooled.shape[-1], gated.n_gates, cfg.router_hidden)
    codes = nn.Parameter(torch.zeros(n_codes, gated.n_gates))
    opt = torch.optim.Adam(list(router.parameters()) + [codes], lr=cfg.router_lr)
    warmup = int(cfg.router_steps * cfg.warmup_fraction)
    history: list[dict[str, float]] = []
    t0 = time.time()
    revive_every = max(1, (cfg.router_steps - warmup) // 8)
    usage: list[dict[str, Any]] = []
    bar = ctx.progress(range(cfg.router_steps), desc=f"aptp router (K={n_codes})")
    for step in bar:
        if step == warmup:
            with torch.no_grad():
                codes.data = _kmeans_init(router(data.pooled), n_codes, template, g)
            opt = torch.optim.Adam(list(router.parameters()) + [codes], lr=cfg.router_lr)
        elif step > warmup and n_codes > 1 and (step - warmup) % revive_every == 0:
            usage.append(_check_code_usage(router, codes, data.pooled, units, cfg, opt, step))
        x0, ehs, pooled = data.batch(cfg.batch_size, g)
        xt, t, eps = data.noised(x0, g)
        cond = data.drop_prompts(ehs, cfg.prompt_dropout, g)
        with torch.no_grad():
            teacher = gated(xt, t, cond)
        r_gates = hard_gates(gumbel_sigmoid(router(pooled), cfg.gumbel_temperature, cfg.gate_offset, g), units)
        loss_c = contrastive_loss(pooled, r_gates * template, cfg.contrastive_temperature) \
            if use_contrastive and n_codes > 1 else torch.zeros(())
        loss_commit = torch.zeros(())
        if step < warmup:
            gates = r_gates
        else:
            c_gates = hard_gates(gumbel_sigmoid(codes, cfg.gumbel_temperature, cfg.gate_offset, g), units)
            scores = snap_to_codes(r_gates, c_gates, template)
            assign = sinkhorn(scores.detach(), cfg.sinkhorn_eps, cfg.sinkhorn_iterations).argmax(-1)
            gates = c_gates[assign]
            if n_codes > 1:
                loss_commit = (1 - scores.gather(1, assign.unsqueeze(1))).mean()
        pred = gated(xt, t, cond, gates=gates)
        loss_d = F.mse_loss(pred, eps)
        loss_kd = F.mse_loss(pred, teacher)
        ratio = gated.macs_ratio(gates).mean()
        loss_r = resource_loss(ratio, cfg.target_macs)
        loss = (cfg.w_diffusion * loss_d + cfg.w_distill * loss_kd + cfg.w_resource * loss_r
                + cfg.w_contrastive * loss_c + cfg.w_commitment * loss_commit)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec = {"step": step, "loss": loss.item(), "diffusion": loss_d.item(), "distill": loss_kd.item(),
               "resource": loss_r.item(), "contrastive": loss_c.item(), "commitment": loss_commit.item(),
               "macs_ratio": ratio.item()}
        history.append(rec)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(macs=f"{rec['macs_ratio']:.3f}", d=f"{rec['diffusion']:.3f}")
    if n_codes > 1 and cfg.router_steps > warmup:
        usage.append(_check_code_usage(router, codes, data.pooled, units, cfg, opt, cfg.router_steps))
    log = {"steps": cfg.router_steps, "warmup_steps": warmup, "seconds": round(time.time() - t0, 1),
           "first": history[0], "last": _mean_tail(history),
           "history": history[::max(1, cfg.router_steps // 25)], "code_usage": usage}
    return router, codes.detach(), log


@torch.no_grad()
def route_by_codes(router: PromptRouter, codes: torch.Tensor, pooled: torch.Tensor, units: Sequence[GateUnit],
                   cfg: _Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`snap_route` of the prompts ``pooled`` with the code book ``codes`` (logits) during training, as
    :meth:`APTPModel.route_pooled` will route them: ``(code index [P], the router's 0/1 gates [P, n_gates])``."""
    return snap_route(router(pooled), code_gate_vectors(codes, units, cfg), units, width_template(units),
                      cfg.gumbel_temperature, cfg.gate_offset)


@torch.no_grad()
def _check_code_usage(router: PromptRouter, codes: nn.Parameter, pooled: torch.Tensor, units: Sequence[GateUnit],
                      cfg: _Settings, opt: torch.optim.Optimizer, step: int, rounds: int = 3) -> dict[str, Any]:
    """Route the prompt pool as inference will and re-seed every code that gets fewer than
    ``min_code_share * P / K`` prompts (up to ``rounds`` times, re-routing in between).

    Sinkhorn balances only the training assignment; the inference-time snapping can leave a code without
    prompts (two codes with the same 0/1 gates, or a code the router vectors drifted away from). This is the
    dead-code reset of vector quantisers (e.g. Dhariwal et al. 2020, Jukebox, Sec. 2.3), ours, not the paper's:
    the most used code's prompts are split in two by 2-means of their 0/1 gate vectors and each half's mean
    router logits become the two codes (their Adam moments reset)."""
    k = codes.shape[0]
    floor = cfg.min_code_share * len(pooled) / k
    template = width_template(units)
    logits = router(pooled)
    state = opt.state.get(codes, {})
    assign, r_gates = route_by_codes(router, codes.data, pooled, units, cfg)
    record: dict[str, Any] = {"step": step, "counts": torch.bincount(assign, minlength=k).tolist(), "revived": []}
    for _ in range(rounds if cfg.min_code_share > 0 else 0):
        counts = torch.bincount(assign, minlength=k)
        if bool((counts >= floor).all()):
            break
        for dead in torch.nonzero(counts < floor).flatten().tolist():
            for big in counts.argsort(descending=True).tolist():
                members = torch.nonzero(assign == big).flatten()
                halves = _split_in_two(F.normalize(r_gates[members] * template, dim=-1))
                if halves is None:
                    continue
                for code, half in ((big, members[halves[0]]), (dead, members[halves[1]])):
                    codes.data[code] = logits[half].mean(0)
                    assign[half] = code
                    for moment in ("exp_avg", "exp_avg_sq"):
                        if moment in state:
                            state[moment][code] = 0.0
                counts = torch.bincount(assign, minlength=k)
                record["revived"].append(dead)
                break
        assign = route_by_codes(router, codes.data, pooled, units, cfg)[0]
    if record["revived"]:
        record["counts_after"] = torch.bincount(assign, minlength=k).tolist()
    return record


def _split_in_two(x: torch.Tensor, iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor] | None:
    """2-means (cosine) of unit rows ``x``, seeded at two far-apart rows; ``None`` when the rows are all alike."""
    if len(x) < 2:
        return None
    a = x[int((x @ x.mean(0)).argmin())]
    b = x[int((x @ a).argmin())]
    if float(a @ b) > 1 - 1e-6:
        return None
    for _ in range(iterations):
        to_b = (x @ b) > (x @ a)
        if bool(to_b.all()) or not bool(to_b.any()):
            return None
        a, b = F.normalize(x[~to_b].mean(0), dim=0), F.normalize(x[to_b].mean(0), dim=0)
    return torch.nonzero(~to_b).flatten(), torch.nonzero(to_b).flatten()


def _mean_tail(history: list[dict[str, float]], n: int = 20) -> dict[str, float]:
    tail = history[-n:]
    return {k: round(sum(h[k] for h in tail) / len(tail), 5) for k in tail[0] if k != "step"}


def code_gate_vectors(codes: torch.Tensor, units: Sequence[GateUnit], cfg: _Settings) -> torch.Tensor:
    """Deterministic 0/1 gates of the code book (no Gumbel noise; at least one group per unit)."""
    return hard_gates(gumbel_sigmoid(codes, cfg.gumbel_temperature, cfg.gate_offset), units).detach()


def finetune_expert(expert: nn.Module, teacher: nn.Module, data: PromptImageData, subset: torch.Tensor,
                    cfg: _Settings, ctx: Context, offset: int, steps: int, desc: str) -> dict[str, Any]:
    """Fine-tune a sliced UNet on the prompts routed to it: eps-MSE + MSE to the unpruned teacher
    (APTP Sec. 3.4)."""
    if steps == 0 or len(subset) == 0:
        return {"steps": 0}
    g = ctx.generator(offset)
    expert.train().requires_grad_(True)
    opt = torch.optim.AdamW(expert.parameters(), lr=cfg.finetune_lr, weight_decay=0.0)
    losses = []
    t0 = time.time()
    for _ in ctx.progress(range(steps), desc=desc):
        x0, ehs, _ = data.batch(cfg.batch_size, g, subset)
        xt, t, eps = data.noised(x0, g)
        cond = data.drop_prompts(ehs, cfg.prompt_dropout, g)
        with torch.no_grad():
            target = teacher(xt, t, encoder_hidden_states=cond).sample
        pred = expert(xt, t, encoder_hidden_states=cond).sample
        loss = cfg.w_diffusion * F.mse_loss(pred, eps) + cfg.w_distill * F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(expert.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    expert.eval().requires_grad_(False)
    tail = losses[-20:]
    return {"steps": steps, "first_loss": round(losses[0], 5), "last_loss": round(sum(tail) / len(tail), 5),
            "seconds": round(time.time() - t0, 1)}


def build_aptp(unet: nn.Module, data: PromptImageData, n_codes: int, cfg: _Settings, ctx: Context,
               finetune_steps: int | None = None, use_contrastive: bool = True) -> tuple[APTPModel, dict[str, Any]]:
    """The whole APTP procedure on ``unet`` (left unchanged): router training, code materialisation,
    per-code fine-tuning. Returns the :class:`APTPModel` and a log for the manifest."""
    if type(unet).__name__ != "UNet2DConditionModel":
        raise UserError(f"aptp prunes diffusers UNet2DConditionModel models, not {type(unet).__name__}")
    size = unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    example = (torch.zeros(1, unet.config.in_channels, *size), torch.zeros(1, dtype=torch.long),
               data.ehs[:1])
    with _frozen(unet):
        gated = GatedUNet(unet, example, cfg.units, cfg.ff_groups)
        try:
            router, code_logits, router_log = train_router(gated, data, n_codes, cfg, ctx, use_contrastive)
        finally:
            gated.remove_hooks()
        units = gated.units
        c_gates = code_gate_vectors(code_logits, units, cfg)
        keep = [kept_groups(c, units) for c in c_gates]
        model = APTPModel(type(unet).__name__, dict(unet.config), [u.to_dict() for u in units], keep,
                          data.pooled.shape[-1], cfg.router_hidden, cfg.gate_offset,
                          experts=[slice_unet(unet, units, k) for k in keep])
        model.router.load_state_dict(router.state_dict())
        model.uncond_pooled.copy_(pool_prompt_embedding(data.empty.float())[0])
        with torch.no_grad():
            routed = model.route_pooled(data.pooled)
        ratios = [float(gated.macs_ratio(model.code_gates[c])) for c in range(n_codes)]
        counts = torch.bincount(routed, minlength=n_codes).tolist()
        for c in (c for c in range(n_codes) if counts[c] == 0):
            ctx.warn("aptp", f"code {c} receives none of the {len(routed)} training prompts: its sub-network is "
                     "not fine-tuned and only prompts unlike the training pool will reach it")
        steps = cfg.finetune_steps if finetune_steps is None else finetune_steps
        ft_logs = []
        for c in range(n_codes):
            subset = torch.nonzero(routed == c).flatten()
            ft_logs.append(finetune_expert(model.experts[c], unet, data, subset, cfg, ctx, 900 + c, steps,
                                           f"aptp fine-tune code {c + 1}/{n_codes}"))
    avg = sum(r * n for r, n in zip(ratios, counts)) / max(1, sum(counts))
    model.info = {"code_macs_ratio": [round(r, 5) for r in ratios], "train_prompt_counts": counts,
                  "average_macs_ratio": round(avg, 5), "total_macs": gated.total_macs}
    log = {"codes": n_codes, "units": len(units), "gates": gated.n_gates, "total_macs": gated.total_macs,
           "code_macs_ratio": model.info["code_macs_ratio"], "train_prompt_counts": counts,
           "average_macs_ratio": model.info["average_macs_ratio"], "router": router_log, "finetune": ft_logs,
           "kept_groups": keep}
    return model.eval(), log


def _check_handle(handle: ModelHandle, name: str) -> None:
    if handle.kind != "unet-cond" or type(handle.module).__name__ != "UNet2DConditionModel":
        raise UserError(f"{name} needs a unet-cond model (diffusers UNet2DConditionModel); got a "
                        f"{handle.kind} {type(handle.module).__name__}", f"passes.{name}")


#: the router picks a sub-network per prompt, and which rows of a classifier-free-guidance batch follow their
#: conditional partner is decided on the data: torch.export cannot trace that branch (measured: "Could not
#: guard on data-dependent expression" for every format), so exports are refused when the recipe is read
NO_EXPORT = {fmt: "a prompt-routed model's routing depends on the data (torch.export cannot trace it); run the "
                  "torch artifact (modelpress.load)" for fmt in ("onnx", "ort", "pte")}


@register_pass
class APTPPass(Pass):
    """``type: aptp``: prompt-routed pruning into ``codes`` sub-networks at an average MACs budget."""

    name = "aptp"
    kinds = ("unet-cond",)
    refuses_export = NO_EXPORT

    class Config(_Settings):
        codes: int = Field(4, ge=1, le=64, description="number K of architecture codes (experts)")

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        _check_handle(model, self.name)
        cfg = self.config
        with _threads(cfg.threads):
            data = training_data(model, ctx.calibration_data(self.name, model), cfg.prompt_pool, ctx.seed)
            pruned, log = build_aptp(model.module, data, cfg.codes, cfg, ctx)
        ctx.record(self.name, **log)
        return model.replace_module(pruned)


@register_pass
class StaticPrunePass(Pass):
    """``type: static_prune``: the static baseline of APTP, one architecture for every prompt at the MACs
    budget (the same router/resource machinery with a single code, fine-tuned on all prompts)."""

    name = "static_prune"
    kinds = ("unet-cond",)
    refuses_export = NO_EXPORT

    class Config(_Settings):
        pass

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        _check_handle(model, self.name)
        cfg = self.config
        with _threads(cfg.threads):
            data = training_data(model, ctx.calibration_data(self.name, model), cfg.prompt_pool, ctx.seed)
            pruned, log = build_aptp(model.module, data, 1, cfg, ctx, use_contrastive=False)
        ctx.record(self.name, **log)
        return model.replace_module(pruned)


# ---------------------------------------------------------------------------------------------------
# Generation: route prompts, bucket by code, sample

class _FixedRoute(nn.Module):
    """Canonical callable that runs every row on the code chosen for its prompt (CFG halves included)."""

    def __init__(self, model: APTPModel, codes: torch.Tensor) -> None:
        super().__init__()
        self.model, self.codes = model, codes

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
        codes = self.codes.repeat(sample.shape[0] // self.codes.shape[0])
        return self.model(sample, timestep, ehs, codes=codes).sample


@torch.no_grad()
def generate(model: APTPModel, prompts: Sequence[str] | torch.Tensor, scheduler_config: dict[str, Any],
             steps: int = 50, seed: int = 0, guidance_scale: float = 3.0,
             uncond: torch.Tensor | None = None, prompt_encoder: str = "minilm-tokens"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``prompts`` (strings, encoded by the registered ``prompt_encoder``, or their token embeddings
    ``[n, L, D]``), then sample them all at once with DDIM; at every step the batch is bucketed by code and
    each bucket runs on its own UNet, the guidance's unconditional branch on the prompt's code. Returns
    ``(images [n, C, H, W] in [-1, 1], codes [n])``."""
    from ..data import prompt_encoder as encoder_named
    from ..sampling import ddim_sample

    encode = encoder_named(prompt_encoder)
    if isinstance(prompts, torch.Tensor):
        cond = prompts
    else:
        cond = torch.cat([encode(list(prompts[i:i + 256])) for i in range(0, len(prompts), 256)])
    if uncond is None:
        uncond = encode([""])
    codes = model.route(cond)
    cfg = model.experts[0].config
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
    images = ddim_sample(_FixedRoute(model, codes), scheduler_config, len(cond), steps, seed, cond=cond,
                         uncond=uncond, guidance_scale=guidance_scale,
                         sample_shape=(cfg.in_channels, *size), batch_size=len(cond))
    return images, codes
