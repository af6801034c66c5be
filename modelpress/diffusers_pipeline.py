"""A person's own diffusers pipeline, loaded by path: the UNet to compress plus what samples with it.

Two layouts are read (safetensors only, nothing from a hub):

* a **pipeline directory** as ``DiffusionPipeline.save_pretrained`` writes it: ``model_index.json`` and one
  folder per component — ``unet`` (compressed), ``scheduler`` (required), ``text_encoder`` + ``tokenizer``
  (required for a text-conditioned UNet), ``vae`` (when present the UNet works in latent space);
* a **bare UNet directory** (``config.json`` + weights) with the scheduler's ``scheduler_config.json`` beside
  it; a text-conditioned one needs ``model.prompt_encoder`` (a registered encoder name).

The handle's ``extras`` say how the model samples, and go into the artifact's manifest:

``scheduler``       the scheduler config actually used (the pipeline's, or the recipe's override), as diffusers
                    fills it in (``_class_name`` included);
``sampler``         ``"pipeline"``: sampling, calibration trajectories and metrics step this scheduler class
                    (:func:`modelpress.sampling.sample`), not the zoo's fixed DDIM;
``guidance_scale``  classifier-free guidance weight (Ho & Salimans 2022, eq. 6), 7.5 by default as in diffusers'
                    ``StableDiffusionPipeline.__call__``;
``pipeline``        the directory and the other components (text encoder, tokenizer, VAE), with the sha256 of
                    their weight files: an artifact *references* them (they are not copied; a Stable Diffusion
                    text encoder and VAE are ~0.6 GB that compression does not change) and refuses to use them
                    when they changed.

Prompts are embedded as ``StableDiffusionPipeline.encode_prompt`` does (padded to the tokenizer's
``model_max_length``, the text encoder's last hidden state); latents are decoded as its ``decode_latents``
does (``vae.decode(z / scaling_factor + shift_factor)``).
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .model import ModelHandle, load_checkpoint

INDEX = "model_index.json"
SCHEDULER_FILE = "scheduler_config.json"
#: diffusers' StableDiffusionPipeline.__call__ default
DEFAULT_GUIDANCE = 7.5
SAMPLER = "pipeline"


def is_pipeline_dir(path: str | Path) -> bool:
    """A pipeline directory, or a bare UNet directory with a scheduler config beside it."""
    p = Path(path)
    return p.is_dir() and ((p / INDEX).exists() or (p / SCHEDULER_FILE).exists())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON ({exc.msg} at line {exc.lineno})", str(path)) from None
    if not isinstance(data, dict):
        raise UserError("expected a JSON object", str(path))
    return data


def _component(root: Path, index: dict[str, Any], name: str) -> tuple[Path, str] | None:
    """``(folder, class name)`` of a component named in ``model_index.json`` (``None`` when absent or null)."""
    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        return None
    folder = root / name
    if not folder.is_dir():
        raise UserError(f"model_index.json names a {name} ({entry[1]}) but there is no {name}/ folder", str(root))
    return folder, str(entry[1])


def scheduler_from_config(config: dict[str, Any], where: str) -> Any:
    """The diffusers scheduler a config describes (its ``_class_name``); a one-line error when diffusers has no
    such scheduler, or it calls the UNet at fractional timesteps (the canonical call takes int64 timesteps;
    checked here at 7, 25 and 50 steps and again at the steps a pass or metric samples with)."""
    import diffusers

    name = str(config.get("_class_name", ""))
    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if cls is None:
        raise UserError(f"unknown scheduler class {name!r} (a diffusers scheduler such as DDIMScheduler)", where)
    for steps in (7, 25, 50):  # step counts whose spacing is fractional for a fractional-timestep scheduler
        try:
            sched = cls.from_config({k: v for k, v in config.items() if k != "_class_name"})
            sched.set_timesteps(steps)
        except Exception as exc:  # diffusers raises ValueError / NotImplementedError for unsupported settings
            raise UserError(f"cannot build the {name} ({str(exc).splitlines()[0]})", where) from None
        if sched.timesteps.is_floating_point() and not torch.equal(sched.timesteps, sched.timesteps.round()):
            raise UserError(f"{name} calls the UNet at fractional timesteps; set model.scheduler to an "
                            "integer-timestep scheduler (DDIMScheduler, PNDMScheduler, DDPMScheduler, "
                            "DPMSolverMultistepScheduler)", where)
    return sched


def used_scheduler_config(config: dict[str, Any], override: str | None, where: str) -> dict[str, Any]:
    """The scheduler config sampling uses: the pipeline's, or ``override`` (a scheduler class name, built from
    the pipeline's config: same betas and offsets, another sampler; or a path to a ``scheduler_config.json``),
    completed with every default the class fills in."""
    if override:
        if override.endswith(".json") or Path(override).is_file():
            config = _read_json(Path(override))
        else:
            config = {**config, "_class_name": override}
    sched = scheduler_from_config(config, where)
    return {"_class_name": type(sched).__name__,
            **{k: v for k, v in dict(sched.config).items() if not k.startswith("_")}}


def files_sha256(folder: Path) -> str:
    """sha256 over a component's weight files (names and bytes, sorted)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _record(folder: Path, cls: str) -> dict[str, Any]:
    if not list(folder.glob("*.safetensors")):
        if list(folder.glob("*.bin")):
            raise UserError("only safetensors weights are loaded (pickle files are unsafe)", str(folder))
        if cls.endswith("Tokenizer") or cls.endswith("TokenizerFast"):
            return {"path": str(folder.resolve()), "class": cls}
        raise UserError("no .safetensors weights in this folder", str(folder))
    return {"path": str(folder.resolve()), "class": cls, "sha256": files_sha256(folder)}


def _embedding_width(record: dict[str, Any]) -> int | None:
    cfg = _read_json(Path(record["path"]) / "config.json")
    width = cfg.get("hidden_size") or cfg.get("d_model")
    return int(width) if width else None


def _cross_width(unet_config: dict[str, Any]) -> int | None:
    dim = unet_config.get("cross_attention_dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    return int(dim) if dim else None


#: the UNet classes a pipeline may hold, and their kinds
UNET_KINDS = {"UNet2DModel": "unet", "UNet2DConditionModel": "unet-cond"}


def load_pipeline(path: str | Path, *, scheduler: str | None = None, guidance_scale: float | None = None,
                  sample_size: int | list[int] | None = None, prompt_encoder: str | None = None) -> ModelHandle:
    """The UNet of the pipeline (or bare UNet) directory ``path`` as a handle whose extras say how it samples
    (see the module docstring); the keyword arguments are the recipe's ``model:`` overrides."""
    root = Path(path)
    where = str(root)
    components: dict[str, dict[str, Any]] = {}
    if (root / INDEX).exists():
        index = _read_json(root / INDEX)
        if "text_encoder_2" in index and index["text_encoder_2"] and index["text_encoder_2"][0]:
            raise UserError("pipelines with two text encoders (SDXL) are not supported", where)
        unet = _component(root, index, "unet")
        if unet is None:
            raise UserError("model_index.json names no unet", where)
        sched = _component(root, index, "scheduler")
        if sched is None or not (sched[0] / SCHEDULER_FILE).exists():
            raise UserError("the pipeline has no scheduler (scheduler/scheduler_config.json)", where)
        sched_config = _read_json(sched[0] / SCHEDULER_FILE)
        for name in ("text_encoder", "tokenizer", "vae"):
            found = _component(root, index, name)
            if found is not None:
                components[name] = _record(*found)
        unet_dir = unet[0]
        pipeline_class = str(index.get("_class_name", "DiffusionPipeline"))
    else:
        sched_config = _read_json(root / SCHEDULER_FILE)
        unet_dir, pipeline_class = root, None
    # everything checked before the UNet's weights are read
    unet_config = _read_json(unet_dir / "config.json") if (unet_dir / "config.json").exists() else {}
    kind = UNET_KINDS.get(str(unet_config.get("_class_name")))
    if kind is None:
        raise UserError(f"the pipeline's UNet is a {unet_config.get('_class_name', 'model without config.json')}, "
                        f"not one of {', '.join(UNET_KINDS)}", str(unet_dir))
    used = used_scheduler_config(sched_config, scheduler, where)
    if kind == "unet-cond":
        _check_text_encoder(unet_config, components, prompt_encoder, where)
    if guidance_scale is not None and kind != "unet-cond":
        raise UserError("model.guidance_scale: an unconditional UNet is not guided", where)
    handle = load_checkpoint(unet_dir)
    handle.source = str(root)  # what reloads the model with its scheduler and text encoder (manifests, evaluate)
    vae = components.get("vae")
    if vae is not None:
        vcfg = _read_json(Path(vae["path"]) / "config.json")
        vae.update(scaling_factor=float(vcfg.get("scaling_factor", 0.18215)),
                   shift_factor=float(vcfg.get("shift_factor") or 0.0),
                   downscale=2 ** (len(vcfg.get("block_out_channels", [0])) - 1))
    handle.extras.update({"scheduler": used, "sampler": SAMPLER,
                          "pipeline": {"path": str(root.resolve()), "class": pipeline_class, **components}})
    if kind == "unet-cond":
        handle.extras["guidance_scale"] = float(DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale)
    if prompt_encoder:
        handle.extras["prompt_encoder"] = prompt_encoder
    if sample_size is not None:
        handle.extras["sample_size"] = sample_size
    return handle


def _check_text_encoder(unet_config: dict[str, Any], components: dict[str, dict[str, Any]],
                        prompt_encoder: str | None, where: str) -> None:
    """A text-conditioned UNet needs a text encoder (the pipeline's, or a named one) whose embeddings are as
    wide as its cross-attention."""
    cross = _cross_width(unet_config)
    if prompt_encoder:  # a registered encoder: its name and width are checked where it is looked up
        return
    if "text_encoder" not in components or "tokenizer" not in components:
        missing = "text_encoder" if "text_encoder" not in components else "tokenizer"
        raise UserError(f"the UNet is text-conditioned but the pipeline has no {missing} (or set "
                        "model.prompt_encoder)", where)
    width = _embedding_width(components["text_encoder"])
    if cross is not None and width is not None and width != cross:
        raise UserError(f"the UNet's cross-attention takes {cross}-wide embeddings, the text encoder gives "
                        f"{width}", where)


# ---------------------------------------------------------------------------------------------------
# The other components, loaded when first needed (the artifact references them by path and sha256)

def _checked(record: dict[str, Any], name: str) -> Path:
    folder = Path(record["path"])
    if not folder.is_dir():
        raise UserError(f"the pipeline's {name} is gone (the artifact references it, it is not copied)", str(folder))
    if record.get("sha256") and files_sha256(folder) != record["sha256"]:
        raise UserError(f"the pipeline's {name} changed since this model was loaded (sha256 differs)", str(folder))
    return folder


@lru_cache(maxsize=4)
def _text_encoder(tok_dir: str, tok_cls: str, enc_dir: str, enc_cls: str) -> tuple[Any, Any]:
    import transformers

    try:
        tok = getattr(transformers, tok_cls, transformers.AutoTokenizer).from_pretrained(tok_dir, local_files_only=True)
        enc = getattr(transformers, enc_cls, transformers.AutoModel).from_pretrained(
            enc_dir, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot load the pipeline's text encoder ({str(exc).splitlines()[0]})", enc_dir) from None
    return tok, enc.eval()


def text_encoder_of(pipeline: dict[str, Any]) -> tuple[Any, Any]:
    """The pipeline's ``(tokenizer, text encoder)``."""
    tok, enc = pipeline["tokenizer"], pipeline["text_encoder"]
    return _text_encoder(str(_checked(tok, "tokenizer")), tok["class"], str(_checked(enc, "text_encoder")),
                         enc["class"])


@torch.no_grad()
def encode_prompts(pipeline: dict[str, Any], prompts: list[str]) -> torch.Tensor:
    """``encoder_hidden_states [N, L, D]`` (float32) of ``prompts``, as Stable Diffusion's ``encode_prompt``:
    padded to ``model_max_length`` tokens, the last hidden state (the attention mask only when the text
    encoder's config asks for it)."""
    tok, enc = text_encoder_of(pipeline)
    batch = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt")
    mask = batch.attention_mask if getattr(enc.config, "use_attention_mask", False) else None
    return enc(batch.input_ids, attention_mask=mask)[0].float()


@lru_cache(maxsize=2)
def _vae(path: str, cls: str) -> Any:
    import diffusers

    try:
        return getattr(diffusers, cls, diffusers.AutoencoderKL).from_pretrained(path, use_safetensors=True).eval()
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot load the pipeline's VAE ({str(exc).splitlines()[0]})", path) from None


def is_latent(handle: ModelHandle) -> bool:
    """Whether the UNet works on a VAE's latents."""
    return bool((handle.extras.get("pipeline") or {}).get("vae"))


@torch.no_grad()
def decode_latents(handle: ModelHandle, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in ``[-1, 1]`` of the pipeline's latents (the samples themselves when the UNet
    is not latent)."""
    record = (handle.extras.get("pipeline") or {}).get("vae")
    if not record:
        return latents
    vae = _vae(str(_checked(record, "vae")), record["class"])
    z = latents.float() / record["scaling_factor"] + record.get("shift_factor", 0.0)
    return torch.cat([vae.decode(z[i:i + batch_size]).sample.float().clamp(-1, 1)
                      for i in range(0, len(z), batch_size)])


@torch.no_grad()
def encode_images(handle: ModelHandle, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Latents ``[N, C, h, w]`` of images ``[N, 3, H, W]`` in ``[-1, 1]`` (already at the VAE's pixel size):
    the mean of the VAE posterior, ``(z - shift_factor) * scaling_factor`` (the scale the UNet was trained in,
    as diffusers' training scripts; the mean rather than a draw, so that the same images give the same
    latents)."""
    record = (handle.extras.get("pipeline") or {})["vae"]
    vae = _vae(str(_checked(record, "vae")), record["class"])
    z = torch.cat([vae.encode(images[i:i + batch_size].float()).latent_dist.mean
                   for i in range(0, len(images), batch_size)])
    return (z - record.get("shift_factor", 0.0)) * record["scaling_factor"]


def pixel_size(handle: ModelHandle, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The image size whose latents are ``latent_hw``."""
    f = int((handle.extras.get("pipeline") or {})["vae"].get("downscale", 8))
    return latent_hw[0] * f, latent_hw[1] * f


def to_diffusers(handle: ModelHandle) -> Any:
    """A diffusers pipeline of the original directory with this handle's (compressed) UNet and the scheduler
    it was calibrated for: ``to_diffusers(modelpress.load_artifact(dir))(prompt)``."""
    import diffusers

    record = handle.extras.get("pipeline") or {}
    if not record.get("class"):
        raise UserError("not a model loaded from a diffusers pipeline directory (model_index.json)", handle.source)
    root = Path(record["path"])
    for name in ("text_encoder", "tokenizer", "vae"):
        if name in record:
            _checked(record[name], name)
    sched = scheduler_from_config(handle.extras["scheduler"], str(root))
    try:
        return diffusers.DiffusionPipeline.from_pretrained(str(root), unet=handle.module, scheduler=sched,
                                                           use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot build the diffusers pipeline ({str(exc).splitlines()[0]})", str(root)) from None
