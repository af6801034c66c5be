"""Every registered pass on a tiny model of every kind, with every export format and every metric that applies
(issue 21): each cell either runs end to end (compress, save, load, export, run the export, report) or is refused
when the recipe is read (:func:`modelpress.recipe.parse_recipe`) with one line naming the field and why.

The passes come from the registry (a new pass joins the matrix by itself; :data:`SMALL` gives each the smallest
settings that exercise it), the metrics from the metric registry (those whose kinds include the model's), the
formats from :data:`FORMATS`. One run per (kind, pass) shares the compressed artifact across its export cells.
The counts of working and refused cells are printed at the end of the module (``-s`` shows them).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from modelpress.artifact import load_artifact
from modelpress.errors import UserError
from modelpress.metrics import metric_registry
from modelpress.model import KINDS, ModelHandle, describe_architecture, save_checkpoint
from modelpress.passes import get_pass, pass_registry
from modelpress.pipeline import run
from modelpress.recipe import parse_recipe

from conftest import _examples, _tokenizer, write_jsonl
from test_causal_lm import _config, _corpus, _word_tokenizer

torch.set_num_threads(1)

#: each export cell: a recipe ``export:`` entry
FORMATS: dict[str, dict[str, Any]] = {"onnx": {"format": "onnx"}, "onnx-int8": {"format": "onnx", "quantize": "int8",
                                                                                  "calibration_batches": 1},
                                      "ort": {"format": "ort"}, "pte": {"format": "pte"}}

#: the smallest settings that exercise each pass (a pass not named here runs with its defaults)
SMALL: dict[str, dict[str, Any]] = {
    "cast": {},
    "bnb": {"mode": "int8"},
    "dfloat11": {"min_elements": 256, "block_size": 1024},
    "bitdelta": {"steps": 2, "batch_size": 2, "seq_len": 8, "samples": 4},
    "dare": {"p": 0.5},
    "darex": {"p": 0.5, "grid": 2, "samples": 4, "batch_size": 4, "seq_len": 8},
    "delta_come": {"samples": 4, "batch_size": 4, "seq_len": 8, "group_size": 16},
    "gptq": {"samples": 4, "batch_size": 4, "seq_len": 8, "group_size": 16},
    "evopress": {"family": "bits", "method": "rtn", "levels": [4, 6, 8], "budget": 6, "generations": 1,
                 "offspring": 2, "survivors": [1], "stage_samples": [2], "calibration_samples": 4,
                 "baseline_samples": 2, "hessian_samples": 2, "batch_size": 2, "max_length": 8, "group_size": 16},
    "ptq": {"samples": 8, "steps": 2, "interval": 1, "batch_size": 8, "w_bits": 8, "a_bits": 8},
    "ptq4dm": {"samples": 8, "steps": 2, "batch_size": 8, "recon_iters": 2, "recon_batch": 4},
    "tfmq": {"samples": 8, "steps": 2, "interval": 1, "batch_size": 8, "recon_iters": 2, "recon_batch": 4},
    "aptp": {"codes": 2, "router_steps": 2, "finetune_steps": 1, "batch_size": 4, "prompt_pool": 16, "threads": 1},
    "static_prune": {"router_steps": 2, "finetune_steps": 1, "batch_size": 4, "prompt_pool": 16, "threads": 1},
}

#: the metrics' smallest settings (samples, options) per metric; a metric not named here runs with defaults
METRIC_SETTINGS: dict[str, dict[str, Any]] = {
    "fd": {"samples": 4, "options": {"steps": 2}},
    "psnr": {"samples": 2, "options": {"steps": 2}}, "ssim": {"samples": 2, "options": {"steps": 2}},
    "frechet": {"samples": 4, "options": {"steps": 2, "features": "digits-classifier"}},
    "feature_distance": {"samples": 2, "options": {"steps": 2, "features": "digits-classifier"}},
    "prompt_agreement": {"samples": 4, "options": {"steps": 2}},
    "latency": {"options": {"batch": 2, "repeats": 2}},
    "accuracy": {"samples": 8}, "logit_kl": {"samples": 8}, "embedding_cosine": {"samples": 8},
    "perplexity": {"samples": 64, "options": {"window": 16}}, "token_kl": {"samples": 64, "options": {"window": 16}},
    "top1_agreement": {"samples": 64, "options": {"window": 16}},
    "choice_accuracy": {"samples": 4},
}

UNET = dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            norm_num_groups=4)


def _perturbed(module: torch.nn.Module, seed: int) -> None:
    """A "fine-tune" of ``module`` in place: every float weight moved by small seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _bert(kind: str):
    import transformers

    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2,
                                  id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    cls = transformers.BertForSequenceClassification if kind == "classifier" else transformers.BertModel
    return cls(cfg).eval()


def _unet(kind: str):
    import diffusers

    if kind == "unet":
        return diffusers.UNet2DModel(**UNET, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()
    return diffusers.UNet2DConditionModel(**UNET, cross_attention_dim=384, attention_head_dim=2,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()


def _llama(tok_dir: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_config(
        _config("llama", len(transformers.AutoTokenizer.from_pretrained(str(tok_dir))))).eval()


def _write(module: torch.nn.Module, kind: str, out: Path, tok_dir: Path | None) -> Path:
    if hasattr(module, "save_pretrained") and kind in ("encoder", "classifier", "causal-lm"):
        module.save_pretrained(str(out))  # safetensors; a tied lm_head.weight is not saved
    else:
        save_checkpoint(ModelHandle(module, kind, out.name, describe_architecture(module)), out)
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per kind: a tiny random base checkpoint, its "fine-tune" (the model every cell compresses), the
    calibration dataset and each metric's dataset."""
    root = tmp_path_factory.mktemp("matrix-models")
    bert_tok, llama_tok = root / "tok-bert", root / "tok-llama"
    _tokenizer(bert_tok)
    _word_tokenizer(llama_tok)
    labelled = write_jsonl(root / "labelled.jsonl", _examples(24, seed=0))
    (root / "texts.txt").write_text("\n".join(r["text"] for r in _examples(24, seed=1)) + "\n")
    (root / "corpus.txt").write_text("\n".join(_corpus(24, 0)) + "\n")
    write_jsonl(root / "choices.jsonl", [{"context": "the cat sees the", "choices": ["dog", "park"], "answer": 0}] * 4)
    build = {"encoder": (lambda: _bert("encoder"), bert_tok), "classifier": (lambda: _bert("classifier"), bert_tok),
             "causal-lm": (lambda: _llama(llama_tok), llama_tok), "unet": (lambda: _unet("unet"), None),
             "unet-cond": (lambda: _unet("unet-cond"), None)}
    text_data = {"encoder": root / "texts.txt", "classifier": labelled, "causal-lm": root / "corpus.txt"}
    out: dict[str, dict[str, Any]] = {}
    for i, kind in enumerate(KINDS):
        make, tok = build[kind]
        torch.manual_seed(i)
        module = make()
        base = _write(module, kind, root / f"{kind}-base", tok)
        _perturbed(module, seed=100 + i)
        model = _write(module, kind, root / f"{kind}-ft", tok)
        calibration = {"unet": "digits/train", "unet-cond": "digits-prompts/train"}.get(kind, str(text_data.get(kind)))
        metric_data = {"choice_accuracy": str(root / "choices.jsonl"),
                       "frechet": {"unet": "digits/heldout", "unet-cond": "digits-prompts/eval"}.get(kind)}
        if kind == "unet-cond":  # a text-to-image model's fidelity metrics sample from prompts
            metric_data.update(psnr="digits-prompts/eval", ssim="digits-prompts/eval",
                               feature_distance="digits-prompts/eval")
        if kind in text_data:
            metric_data.update({name: str(text_data[kind]) for name in metric_registry() if name != "choice_accuracy"})
        out[kind] = {"model": str(model), "base": str(base), "calibration": calibration, "metric_data": metric_data}
    return out


def _metrics(kind: str, data: dict[str, str]) -> list[dict[str, Any]]:
    """Every registered metric that applies to ``kind`` (and ``size``), at its smallest settings."""
    out: list[dict[str, Any]] = [{"metric": "size"}]
    for name, metric in sorted(metric_registry().items()):
        if metric.kinds and kind not in metric.kinds:
            continue
        entry = {"metric": name, **METRIC_SETTINGS.get(name, {})}
        if name in data:
            entry["dataset"] = data[name]
        out.append(entry)
    return out


def _recipe(zoo: dict[str, dict[str, Any]], kind: str, pass_name: str, exports: list[dict[str, Any]],
            output: Path) -> dict[str, Any]:
    z = zoo[kind]
    model: dict[str, Any] = {"source": z["model"]}
    if kind == "unet-cond":
        model["prompt_encoder"] = "minilm-tokens"
    recipe = {"model": model, "seed": 0, "calibration": {"dataset": z["calibration"]},
              "passes": [{"type": pass_name, **SMALL.get(pass_name, {})}], "export": exports,
              "evaluate": _metrics(kind, z["metric_data"]), "output": str(output)}
    if get_pass(pass_name).needs_base:
        recipe["base"] = z["base"]
    return recipe


FIELD = re.compile(r"^matrix: (model\.kind|passes\[\d+\]|export\[\d+\]|evaluate\[\d+\])[.\w]*: \S.*$")

#: (kind, pass, format) -> "works" or the one-line refusal
CELLS: dict[tuple[str, str, str], str] = {}
#: (kind, pass) -> seconds of its runs (compress, save, load, exports, report)
SECONDS: dict[tuple[str, str], float] = {}


def _refusal(recipe: dict[str, Any]) -> str | None:
    """``None`` when the recipe is accepted, else its one-line refusal (checked to name the field)."""
    try:
        parse_recipe(recipe, "matrix")
    except UserError as exc:
        line = str(exc)
        assert "\n" not in line and FIELD.match(line), f"a refusal must be one line naming the field: {line!r}"
        return line
    return None


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Any:
    yield
    if not CELLS:
        return
    works = sum(v == "works" for v in CELLS.values())
    if os.environ.get("MODELPRESS_MATRIX_JSON"):  # benchmarks/matrix.py reads it
        Path(os.environ["MODELPRESS_MATRIX_JSON"]).write_text(json.dumps(
            {"cells": [{"kind": k, "pass": p, "format": f, "result": v} for (k, p, f), v in sorted(CELLS.items())],
             "seconds": [{"kind": k, "pass": p, "seconds": round(t, 1)} for (k, p), t in sorted(SECONDS.items())]},
            indent=1))
    print(f"\nmatrix: {len(CELLS)} cells checked, {works} work end to end, {len(CELLS) - works} refused when the "
          "recipe is read (a failed test is a cell that crashed)")
    for (kind, name, fmt), v in sorted(CELLS.items()):
        if v != "works":
            print(f"  refused {kind} x {name} x {fmt}: {v}")


#: modelpress's own passes (a test module may register passes of its own, such as test_framework's failing one)
OWN_PASSES = sorted(n for n, cls in pass_registry().items() if cls.__module__.startswith("modelpress."))
PAIRS = [(kind, name) for kind in KINDS for name in OWN_PASSES]
IDS = [f"{k}-{p}" for k, p in PAIRS]
#: the export cells CI runs on every (kind, pass); the others cost 10-25 s of torch.export / lowering each
FAST_FORMATS = ("onnx",)


def _check_cells(zoo: dict[str, dict[str, Any]], kind: str, pass_name: str, formats: list[str], out: Path) -> None:
    """The cells (kind, pass, each of ``formats``): refused when read (one line naming the field), or run end to
    end in one run that shares the compressed artifact: compress, save, load, export, run each export, report."""
    refused = _refusal(_recipe(zoo, kind, pass_name, [], out))
    if refused is not None:
        assert "is required" not in refused, f"give {pass_name!r} its smallest settings in SMALL: {refused}"
        CELLS.update({(kind, pass_name, fmt): refused for fmt in formats})
        assert not out.exists()
        return
    accepted = {}
    for fmt in formats:
        why = _refusal(_recipe(zoo, kind, pass_name, [FORMATS[fmt]], out))
        if why is None:
            accepted[fmt] = FORMATS[fmt]
        else:
            CELLS[(kind, pass_name, fmt)] = why
    loaded = parse_recipe(_recipe(zoo, kind, pass_name, list(accepted.values()), out), "matrix")
    t0 = time.perf_counter()
    run(loaded, show_progress=False)
    SECONDS[(kind, pass_name)] = SECONDS.get((kind, pass_name), 0.0) + time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    load_artifact(out)
    expected = sorted(m["metric"] for m in loaded.raw["evaluate"] if m["metric"] != "size")
    assert sorted(report["metrics"]) == expected
    assert all(math.isfinite(m["compressed"]) for m in report["metrics"].values())
    assert len(report["exports"]) == len(accepted)
    for (fmt, entry), got in zip(accepted.items(), report["exports"].values()):
        assert got["spec"]["format"] == entry["format"] and (out / got["path"]).is_file()
        assert math.isfinite(got["max_abs_err"]) and sorted(got["metrics"]) == expected
        CELLS[(kind, pass_name, fmt)] = "works"


@pytest.mark.parametrize("kind,pass_name", PAIRS, ids=IDS)
def test_cell_runs_end_to_end_or_is_refused_when_read(zoo: dict[str, dict[str, Any]], kind: str, pass_name: str,
                                                      tmp_path: Path) -> None:
    """CI's cells: every (kind, pass) with the :data:`FAST_FORMATS` exports and every metric that applies; the
    other formats' refusals are checked here too (reading a recipe costs nothing)."""
    for fmt in FORMATS:
        if fmt not in FAST_FORMATS:
            why = _refusal(_recipe(zoo, kind, pass_name, [FORMATS[fmt]], tmp_path / "unused"))
            if why is not None:
                CELLS[(kind, pass_name, fmt)] = why
    _check_cells(zoo, kind, pass_name, list(FAST_FORMATS), tmp_path / "artifact")


@pytest.mark.slow
@pytest.mark.parametrize("kind,pass_name", PAIRS, ids=IDS)
def test_slow_export_cells(zoo: dict[str, dict[str, Any]], kind: str, pass_name: str, tmp_path: Path) -> None:
    """The other export formats (int8 ONNX, .ort, .pte) of every (kind, pass), sharing one compressed artifact:
    slow because each export runs torch.export (and quantization / lowering) for 10-25 s on 2 shared cores,
    whatever the model's size; CI's matrix covers each (kind, pass) with its ONNX export."""
    _check_cells(zoo, kind, pass_name, [f for f in FORMATS if f not in FAST_FORMATS], tmp_path / "artifact")
