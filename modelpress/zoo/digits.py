"""Digits models of the zoo: real handwriting, a feature classifier, an unconditional and a text-to-image DDPM.

* Data: scikit-learn's bundled ``load_digits()`` (1,797 real 8x8 handwritten digits, UCI optdigits test
  set), upsampled bilinearly to 16x16 and scaled to [-1, 1]; a fixed seeded split of 1,497 train and 300
  held-out images (:func:`digits_data`).
* ``digits-classifier``: a small CNN trained on the train split. Its penultimate-layer features (128-d)
  are the feature space of the Fréchet distance (Heusel et al., 2017, "GANs trained by a two time-scale
  update rule converge to a local Nash equilibrium", eq. for FID) and its argmax defines prompt agreement.
* ``digits-ddpm`` (kind ``unet``): a diffusers ``UNet2DModel`` trained with the DDPM epsilon objective
  (Ho et al., 2020, "Denoising Diffusion Probabilistic Models", Algorithm 1, eq. 14) on a linear-beta
  1000-step schedule; sampled with DDIM (Song et al., 2021) in 50 steps by default.
* ``digits-t2i`` (kind ``unet-cond``): a diffusers ``UNet2DConditionModel`` with cross-attention on frozen
  MiniLM token embeddings (:func:`modelpress.zoo.text.encode_prompts`) of natural-language prompts about
  digits, trained with 10% prompt dropout for classifier-free guidance (Ho & Salimans, 2022).
* ``digits-t2i-printed``: ``digits-t2i`` fine-tuned so that 30% of its prompts ask for a *printed* digit
  (label ``PRINTED + d``), whose image is one fixed glyph per digit (:func:`printed_glyphs`), while the
  handwritten prompts keep the whole handwriting distribution: prompts of two difficulties, the setting of
  prompt-routed pruning (APTP).

The weights are committed (fp16 safetensors under ``zoo/weights/``); ``modelpress zoo build NAME`` re-runs
the exact seeded training into the cache directory (``$MODELPRESS_CACHE``). See docs/zoo-digits.md.
"""
from __future__ import annotations

import json
import math
import random
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Examples, finite, generated, register_dataset
from ..errors import UserError
from ..model import ModelHandle, describe_architecture
from . import WEIGHTS_DIR, ZooEntry, cache_dir, register

IMAGE_SIZE = 16
N_HELDOUT = 300
SPLIT_SEED = 0
TRAIN_THREADS = 1
EMA_DECAY = 0.995
PROMPT_POOL = 2000

#: the DDPM noise schedule both UNets are trained on (a dict for ``DDPMScheduler.from_config``)
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "variance_type": "fixed_small",
}


# ---------------------------------------------------------------------------------------------------
# Data

@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    return x, torch.from_numpy(d.target.astype(np.int64))


def digits_data(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N,1,16,16] float32 in [-1,1], labels [N] int64)`` of ``split``: ``"train"`` (1,497 images),
    ``"heldout"`` (300 images, never trained on) or ``"all"``. The split is fixed (seeded permutation)."""
    x, y = _all_digits()
    if split == "all":
        return x.clone(), y.clone()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    if split == "heldout":
        idx = perm[:N_HELDOUT]
    elif split == "train":
        idx = perm[N_HELDOUT:]
    else:
        raise UserError(f"unknown digits split {split!r}; choose train, heldout or all")
    return x[idx].clone(), y[idx].clone()


# ---------------------------------------------------------------------------------------------------
# Prompts for digits-t2i

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_ADJECTIVES = ("thick", "thin", "bold", "small", "large", "tiny", "big", "neat", "sloppy", "messy", "careful",
               "slanted", "wobbly", "faint", "dark", "quick", "tidy", "narrow", "wide", "curly", "")
_NOUNS_TRAIN = ("digit {w}", "number {w}", "handwritten {w}", "a {a} handwritten {w}", "the number {n}",
                "a {a} {w}", "digit {n}", "the digit {w}", "a picture of the number {w}",
                "an image of a {a} {n}", "{w}", "{n}", "a {a} digit {n}", "someone wrote a {w}",
                "a {w}, written by hand", "the number {n}, drawn {a}", "a {a} sketch of the digit {w}",
                "handwriting of the number {n}")
_NOUNS_EVAL = ("a drawing of a {a} {w}", "the numeral {n}", "write the number {w}", "a {a} {n} on paper",
               "scribbled digit {w}", "the handwritten numeral {w}, {a}", "please draw {w}",
               "a photo of the digit {n}")
_STYLES = ("", "", "", ", black and white", ", in pencil", ", on a white background", ", low resolution",
           ", scanned", ", written quickly")


#: label offset of a prompt that asks for a printed digit: ``PRINTED + d`` (``digits-t2i-printed``)
PRINTED = 10
_PRINTED_TRAIN = ("the printed digit {w}", "a typed {n}", "the digit {n} in a font", "a typeset {w}",
                  "the standard glyph for {w}", "a printed number {n}", "the computer font digit {w}",
                  "a {n} printed by a machine", "the typewritten numeral {w}", "a stamped {n}")
_PRINTED_EVAL = ("the typeset numeral {w}", "a {n} in print", "the font character {n}",
                 "printed text showing the digit {w}")


def _prompt(rng: random.Random, digit: int, templates: tuple[str, ...]) -> str:
    adjective = rng.choice(_ADJECTIVES) or rng.choice(_ADJECTIVES[:-1])
    text = rng.choice(templates).format(w=NUMBER_WORDS[digit % PRINTED], n=str(digit % PRINTED), a=adjective)
    text = text.replace("a a", "an a").replace("a e", "an e").replace("a o", "an o")
    return text + rng.choice(_STYLES)


def digit_prompts(n: int, seed: int = 0, split: str = "train", printed_fraction: float = 0.0
                  ) -> tuple[list[str], torch.Tensor]:
    """``n`` natural-language prompts about digits and their labels ``[n]``.

    ``split="train"`` draws from the training templates, ``split="eval"`` from a disjoint set of templates
    never seen in training (same vocabulary of digits, adjectives and styles). Digits cycle 0..9 so that
    every class is equally represented; the order is shuffled with ``seed``. With ``printed_fraction``,
    ``round(n * printed_fraction)`` of the prompts ask for a printed digit ``d`` (label ``PRINTED + d``, its
    own templates); the digit asked for is always ``label % PRINTED``. Without it the prompts are exactly
    those of ``digits-t2i``.
    """
    if split not in ("train", "eval"):
        raise UserError(f"unknown prompt split {split!r}; choose train or eval")
    templates = _NOUNS_TRAIN if split == "train" else _NOUNS_EVAL
    printed = _PRINTED_TRAIN if split == "train" else _PRINTED_EVAL
    rng = random.Random(f"{split}-{seed}")
    n_printed = round(n * printed_fraction)
    labels = [PRINTED + i % 10 for i in range(n_printed)] + [i % 10 for i in range(n - n_printed)]
    rng.shuffle(labels)
    prompts = [_prompt(rng, d, printed if d >= PRINTED else templates) for d in labels]
    return prompts, torch.tensor(labels, dtype=torch.long)


def printed_fraction(handle: ModelHandle) -> float:
    """Share of printed-digit prompts a digits model was trained with (``digits-t2i-printed``: 0.3, else 0):
    its training data for compression passes and its eval prompts keep that share."""
    return float(handle.extras.get("training", {}).get("printed_fraction", 0.0))


@lru_cache(maxsize=1)
def printed_glyphs() -> torch.Tensor:
    """The image of a printed-digit prompt, one per digit ``[10, 1, 16, 16]``: the train-split image nearest
    (L2) to its class mean, a clean and typical real digit that the classifier recognises."""
    x, y = digits_data("train")
    glyphs = []
    for d in range(10):
        members = x[y == d]
        glyphs.append(members[int(((members - members.mean(0)) ** 2).flatten(1).sum(1).argmin())])
    return torch.stack(glyphs)


@lru_cache(maxsize=4)
def _encoded_prompt_pool(n: int, seed: int, split: str, printed_fraction: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Embeddings of a pool of prompts, encoded once (the MiniLM encoder is frozen), for training."""
    from .text import encode_prompts

    prompts, labels = digit_prompts(n, seed, split, printed_fraction)
    chunks = [encode_prompts(prompts[i:i + 256]) for i in range(0, n, 256)]
    return torch.cat(chunks), labels, tuple(prompts)


@lru_cache(maxsize=1)
def empty_prompt_embedding() -> torch.Tensor:
    """The embedding of the empty prompt ``[1, 16, 384]``: the unconditional input of classifier-free guidance."""
    from .text import encode_prompts

    return encode_prompts([""])


# ---------------------------------------------------------------------------------------------------
# The digits classifier (feature space of the Fréchet distance, judge of prompt agreement)

class DigitsClassifier(nn.Module):
    """A small CNN on 16x16 digits: two conv stages, then a 128-d feature layer and the class layer."""

    FEATURE_DIM = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, self.FEATURE_DIM), nn.GELU(),
        )
        self.head = nn.Linear(self.FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _train_classifier(seed: int = 0, epochs: int = 12, log: Callable[[str], None] = print) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    x, y = digits_data("train")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    t0 = time.time()
    loss = torch.tensor(0.0)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            xb = _augment_shift(x[idx], g)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 3 == 2:
            log(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    model.eval()
    xh, yh = digits_data("heldout")
    with torch.no_grad():
        acc = (model(xh).argmax(1) == yh).float().mean().item()
    return model, {"heldout_accuracy": acc, "final_loss": loss.item(), "train_seconds": time.time() - t0,
                   "epochs": epochs, "seed": seed}


def _augment_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translations by up to ``max_shift`` pixels (background -1 padding)."""
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=g).tolist()
    return pad[:, :, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE]


# ---------------------------------------------------------------------------------------------------
# The diffusion UNets

def ddpm_unet_config() -> dict[str, Any]:
    """``digits-ddpm``: a small diffusers ``UNet2DModel`` (one self-attention stage at 4x4)."""
    return {
        "sample_size": IMAGE_SIZE, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
        "block_out_channels": [16, 32, 64], "norm_num_groups": 8, "attention_head_dim": 16,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    }


def t2i_unet_config() -> dict[str, Any]:
    """``digits-t2i``: a small diffusers ``UNet2DConditionModel``; transformer blocks (self-attention,
    cross-attention with 4 heads of 16 on MiniLM token embeddings, GEGLU feed-forward) at the 4x4 stage of
    the down and up paths and in the mid block."""
    return {
        "sample_size": IMAGE_SIZE, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
        "block_out_channels": [16, 32, 64], "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": 384, "attention_head_dim": 4,  # diffusers' legacy name: the number of heads
    }


def _new_unet(kind: str) -> nn.Module:
    import diffusers
    if kind == "unet":
        return diffusers.UNet2DModel.from_config(ddpm_unet_config())
    return diffusers.UNet2DConditionModel.from_config(t2i_unet_config())


def _alphas_cumprod() -> torch.Tensor:
    c = SCHEDULER_CONFIG
    betas = torch.linspace(c["beta_start"], c["beta_end"], c["num_train_timesteps"], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


class _EMA:
    """Exponential moving average of the weights (kept for sampling, as in Ho et al., 2020, Sec. 4)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


def _train_unet(kind: str, steps: int, batch: int, lr: float, seed: int, log: Callable[[str], None],
                prompt_dropout: float = 0.1, init: str | None = None, printed_fraction: float = 0.0
                ) -> tuple[nn.Module, dict]:
    """DDPM training (Ho et al., 2020, Algorithm 1): ``x_t = sqrt(ab_t) x_0 + sqrt(1-ab_t) eps`` with
    ``t ~ U{0..T-1}``, minimise ``||eps - eps_theta(x_t, t[, c])||^2``. For ``unet-cond`` the condition is a
    random training prompt of the image's digit, replaced by the empty prompt with probability
    ``prompt_dropout`` (classifier-free guidance, Ho & Salimans 2022). ``init`` starts from another zoo
    model's weights; with ``printed_fraction``, that share of the batch is the digit's printed glyph with a
    printed-digit prompt."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x0_all, y_all = digits_data("train")
    model = _new_unet(kind).train()
    if init is not None:
        model.load_state_dict(_load_state(init)[0])
    ema = _EMA(model, EMA_DECAY)
    ab = _alphas_cumprod()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 40)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    if kind == "unet-cond":
        pool, pool_labels, _ = _encoded_prompt_pool(PROMPT_POOL, seed, "train", printed_fraction)
        by_digit = [torch.nonzero(pool_labels == d).flatten() for d in range(PRINTED + 10)]
        empty = empty_prompt_embedding()
    t0 = time.time()
    running = None
    for step in range(steps):
        idx = torch.randint(0, len(x0_all), (batch,), generator=g)
        x0 = _augment_shift(x0_all[idx], g)
        labels = y_all[idx]
        if printed_fraction > 0:
            is_printed = torch.rand(batch, generator=g) < printed_fraction
            x0 = torch.where(is_printed.view(-1, 1, 1, 1), printed_glyphs()[labels], x0)
            labels = torch.where(is_printed, PRINTED + labels, labels)
        t = torch.randint(0, len(ab), (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        if kind == "unet":
            pred = model(xt, t).sample
        else:
            pick = torch.stack([by_digit[int(d)][torch.randint(0, len(by_digit[int(d)]), (1,), generator=g)]
                                for d in labels]).flatten()
            cond = pool[pick]
            drop = torch.rand(batch, generator=g) < prompt_dropout
            cond = torch.where(drop.view(-1, 1, 1), empty.expand_as(cond), cond)
            pred = model(xt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model, step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"{kind} step {step}/{steps} loss {loss.item():.4f} ema-loss {running:.4f} "
                f"{el:.0f}s elapsed, {el / (step + 1):.2f}s/step")
    model.load_state_dict(ema.shadow)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    return model, {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "ema_decay": EMA_DECAY,
                   "final_loss_ema": running, "train_seconds": time.time() - t0, "parameters": n_params,
                   "threads": torch.get_num_threads(),
                   **({"prompt_dropout": prompt_dropout} if kind == "unet-cond" else {}),
                   **({"init": init} if init else {}),
                   **({"printed_fraction": printed_fraction} if printed_fraction else {})}


# ---------------------------------------------------------------------------------------------------
# Building, saving and loading

TRAINING = {
    "digits-classifier": {"seed": 0, "epochs": 12},
    "digits-ddpm": {"kind": "unet", "steps": 1000, "batch": 64, "lr": 2e-3, "seed": 0},
    "digits-t2i": {"kind": "unet-cond", "steps": 1000, "batch": 64, "lr": 2e-3, "seed": 0},
    "digits-t2i-printed": {"kind": "unet-cond", "steps": 1500, "batch": 64, "lr": 1e-3, "seed": 0,
                           "init": "digits-t2i", "printed_fraction": 0.3},
}


def _paths(name: str, directory: Path) -> tuple[Path, Path]:
    return directory / f"{name}.safetensors", directory / f"{name}.json"


def _save(name: str, model: nn.Module, meta: dict, directory: Path) -> Path:
    """Write ``name.safetensors`` (fp16 weights) and ``name.json`` (config + training record), atomically."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    w, j = _paths(name, directory)
    state = {k: (v.half() if v.dtype.is_floating_point else v).contiguous() for k, v in model.state_dict().items()}
    tmp_w, tmp_j = w.with_suffix(".safetensors.tmp"), j.with_suffix(".json.tmp")
    save_file(state, str(tmp_w))
    tmp_j.write_text(json.dumps(meta, indent=2, default=str))
    tmp_w.replace(w)
    tmp_j.replace(j)
    return w


def _find(name: str) -> tuple[Path, Path] | None:
    for d in (WEIGHTS_DIR, cache_dir() / "digits"):
        w, j = _paths(name, d)
        if w.exists() and j.exists():
            return w, j
    return None


def build(name: str, force: bool = False, directory: Path | None = None,
          log: Callable[[str], None] = print) -> Path:
    """Train zoo entry ``name`` with its fixed seed into ``directory`` (default: the cache) and return the
    weights file. Without ``force``, an existing build is kept."""
    directory = directory or cache_dir() / "digits"
    w, _ = _paths(name, directory)
    if w.exists() and not force:
        return w
    prev = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        spec = dict(TRAINING[name])
        if name == "digits-classifier":
            model, record = _train_classifier(spec["seed"], spec["epochs"], log)
            meta = {"class": "DigitsClassifier", "training": record}
        else:
            kind = spec.pop("kind")
            model, record = _train_unet(kind, log=log, **spec)
            meta = {"architecture": describe_architecture(model), "kind": kind,
                    "scheduler": SCHEDULER_CONFIG, "training": record}
    finally:
        torch.set_num_threads(prev)
    log(f"{name}: {json.dumps(record)}")
    return _save(name, model, meta, directory)


def _load_state(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's weights (as fp32) and its metadata; ``meta["checkpoint"]`` records the file on disk."""
    from ..model import checkpoint_record, load_state_dict_file

    found = _find(name)
    if found is None:
        build(name)
        found = _find(name)
        assert found is not None
    w, j = found
    stored = load_state_dict_file(w)
    state = {k: v.float() if v.dtype.is_floating_point else v for k, v in stored.items()}
    return state, {**json.loads(j.read_text()), "checkpoint": checkpoint_record([w], stored)}


@lru_cache(maxsize=1)
def classifier() -> DigitsClassifier:
    """The trained digits classifier (eval mode, cached)."""
    state, _ = _load_state("digits-classifier")
    model = DigitsClassifier()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def classifier_features(images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Penultimate-layer features ``[N, 128]`` of ``images`` ``[N,1,16,16]`` in [-1, 1]."""
    clf = classifier()
    return torch.cat([clf.features(images[i:i + batch].float()) for i in range(0, len(images), batch)])


@torch.no_grad()
def classify(images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The classifier's digit ``[N]`` for ``images`` in [-1, 1]."""
    clf = classifier()
    return torch.cat([clf(images[i:i + batch].float()).argmax(1) for i in range(0, len(images), batch)])


def _load_unet(name: str) -> ModelHandle:
    from ..model import build_architecture, load_weights_into

    state, meta = _load_state(name)
    module = build_architecture(meta["architecture"])
    load_weights_into(module, state, name)
    extras: dict[str, Any] = {"scheduler": dict(meta["scheduler"]), "zoo": name, "training": meta["training"],
                              "checkpoint": meta["checkpoint"]}
    if meta["kind"] == "unet-cond":
        extras["prompt_encoder"] = "minilm-tokens"  # registered by modelpress.zoo.text
    return ModelHandle(module.eval(), meta["kind"], f"zoo:{name}", describe_architecture(module), extras)


def _entry(name: str, kind: str, description: str, load: Callable[[], Any],
           datasets: dict[str, str] | None = None) -> ZooEntry:
    return register(ZooEntry(name, kind, description, load, lambda force: build(name, force), datasets or {}))


# ---------------------------------------------------------------------------------------------------
# The zoo's data, as named datasets of the data layer

def _images_dataset(split: str):  # noqa: ANN202 - a Dataset loader
    def load():  # noqa: ANN202
        x, y = digits_data(split)
        return finite(f"digits/{split}", {"image", "label"}, images=x, labels=y.tolist())
    return load


@lru_cache(maxsize=4)
def prompt_image_pool(n: int, seed: int, printed: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], torch.Tensor]:
    """APTP's training pool: every training image (plus the printed glyphs when ``printed`` > 0) with its
    label, and ``n`` training prompts (:func:`digit_prompts`, seed ``seed``) with theirs; a prompt goes with any
    image of its label."""
    images, labels = digits_data("train")
    if printed > 0:
        images = torch.cat([images, printed_glyphs()])
        labels = torch.cat([labels, PRINTED + torch.arange(10)])
    prompts, plabels = digit_prompts(n, seed, "train", printed)
    return images, labels, tuple(prompts), plabels


def _prompts_dataset(split: str):  # noqa: ANN202 - a Dataset loader
    """Templated prompts (:func:`digit_prompts`, ``split`` train or eval), each paired with a training image
    of its digit drawn with the same seed (prompt-image pairs for calibrating a text-to-image UNet on noised
    images)."""
    def draw(n: int, seed: int) -> Examples:
        prompts, labels = digit_prompts(n, seed, split)
        x, y = digits_data("train")
        g = torch.Generator().manual_seed(seed)
        pick = [int(c[torch.randint(len(c), (1,), generator=g)]) for c in
                (torch.nonzero(y == int(d)).flatten() for d in labels)]
        return Examples(ids=list(range(n)), prompts=prompts, labels=labels.tolist(), images=x[pick])

    def load():  # noqa: ANN202
        data = generated(f"digits-prompts/{split}", {"prompt", "label", "image"}, draw)
        if split == "train":  # APTP's pool (prune/aptp.py): prompts with every image of their digit
            data.extras["prompt_image_pool"] = lambda n, seed, handle: prompt_image_pool(n, seed, printed_fraction(handle))
        return data

    return load


for _split in ("train", "heldout"):
    register_dataset(f"digits/{_split}", _images_dataset(_split))
for _split in ("train", "eval"):
    register_dataset(f"digits-prompts/{_split}", _prompts_dataset(_split))
_DDPM_DATA = {"calibration": "digits/train", "evaluation": "digits/heldout"}
_T2I_DATA = {"calibration": "digits-prompts/train", "evaluation": "digits-prompts/eval"}


_entry("digits-ddpm", "unet", "diffusers UNet2DModel DDPM on 16x16 sklearn digits (DDIM sampling)",
       lambda: _load_unet("digits-ddpm"), _DDPM_DATA)
_entry("digits-t2i", "unet-cond", "diffusers UNet2DConditionModel on 16x16 digits, MiniLM prompt cross-attention",
       lambda: _load_unet("digits-t2i"), _T2I_DATA)
_entry("digits-t2i-printed", "unet-cond", "digits-t2i fine-tuned so that 30% of the prompts ask for a printed "
       "digit (one fixed glyph each): prompts of two difficulties, for APTP", lambda: _load_unet("digits-t2i-printed"),
       _T2I_DATA)



def _classifier_handle() -> ModelHandle:
    """The digits classifier as a handle (kind ``image-classifier``: images [B,1,16,16] in [-1,1] -> logits).
    It is a judge for the metrics, not a model for the compression passes."""
    _, meta = _load_state("digits-classifier")
    return ModelHandle(classifier(), "image-classifier", "zoo:digits-classifier",
                       {"library": "modelpress", "class": "DigitsClassifier", "config": {}},
                       {"zoo": "digits-classifier", "training": meta["training"]})


_entry("digits-classifier", "image-classifier", "small CNN on 16x16 digits: Fréchet-distance features and "
       "prompt-agreement judge", _classifier_handle)
