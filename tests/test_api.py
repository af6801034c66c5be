"""The Python API (modelpress.compress / evaluate / export / load): the same artifact as the recipe runner,
the one-copy rule for passes, and one-line errors for bad arguments."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import modelpress
from modelpress.errors import UserError
from modelpress.model import load_checkpoint
from modelpress.pipeline import run_recipe

DARE = {"type": "dare", "p": 0.5, "embeddings": "keep"}


def _logits(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_api_and_recipe_give_the_same_artifact_and_numbers(user_task: dict[str, Path], tmp_path: Path) -> None:
    calibration = {"dataset": str(user_task["train"]), "samples": 16}
    result = modelpress.compress(str(user_task["ft"]), [DARE], base=str(user_task["base"]),
                                 calibration=calibration, seed=3)
    saved = result.save(tmp_path / "api")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {user_task['ft']}\nbase: {user_task['base']}\nseed: 3\n"
                      f"calibration: {{dataset: {user_task['train']}, samples: 16}}\n"
                      f"passes: [{{type: dare, p: 0.5, embeddings: keep}}]\n"
                      f"evaluate: [{{metric: accuracy, dataset: {user_task['test']}}}]\noutput: {tmp_path / 'cli'}\n")
    out = run_recipe(recipe, export=False, show_progress=False)
    # same seed, same bytes: the recipe runner is the API
    assert (saved / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    ids = torch.randint(4, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    loaded = modelpress.load(saved)
    assert torch.equal(_logits(loaded, ids), _logits(result.model, ids))
    scores = modelpress.evaluate(result, [{"metric": "accuracy", "dataset": str(user_task["test"])}])
    report = json.loads((out / "report.json").read_text())["metrics"]["accuracy"]
    assert scores["accuracy"]["compressed"] == report["compressed"]
    assert scores["accuracy"]["reference"] == report["reference"]
    # an artifact directory is evaluated against the model its manifest names
    again = modelpress.evaluate(saved, [{"metric": "accuracy", "dataset": str(user_task["test"])}])
    assert again["accuracy"] == scores["accuracy"]


def test_passes_change_the_model_in_place_and_the_reference_is_the_one_copy(user_task: dict[str, Path]) -> None:
    handle = load_checkpoint(user_task["ft"])
    before = copy.deepcopy(handle.module.state_dict())
    result = modelpress.compress(handle, [DARE], base=str(user_task["base"]), calibration="random")
    assert result.model is handle.module  # changed in place, not copied per pass
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items() if k in before)
    ref = result.reference.module.state_dict()
    assert result.reference.module is not handle.module and all(torch.equal(before[k], ref[k]) for k in before)
    assert result.inputs["calibration"] == {"dataset": "random", "random": True}


def test_compress_a_torch_module_and_export_it(user_task: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    module = transformers.AutoModelForSequenceClassification.from_pretrained(str(user_task["ft"]))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(user_task["base"]))
    result = modelpress.compress(module, [DARE], base=base, calibration="random")
    assert result.handle.kind == "classifier" and result.handle.extras["tokenizer_dir"] == str(user_task["ft"])
    [onnx] = modelpress.export(result, ["onnx"], tmp_path / "exports")
    assert onnx.suffix == ".onnx" and onnx.stat().st_size > 0
    from modelpress.exporters import load_exported

    ids = torch.randint(4, 60, (2, 10), generator=torch.Generator().manual_seed(1))
    runtime = load_exported(onnx, result.handle)
    torch.testing.assert_close(runtime(ids, torch.ones_like(ids)), _logits(result.model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("passes, message", [
    ([{"type": "dare", "p": 1.5}], "passes[0].p: must be"),
    ([{"type": "nope"}], "passes[0].type: unknown pass type 'nope'"),
    (["dare"], "passes[0]: must be a mapping with a 'type' key"),
    ([{"type": "dare"}], "passes[0]: pass 'dare' compresses a fine-tune against its base: give base="),
])
def test_bad_arguments_are_one_line_errors(user_task: dict[str, Path], passes: list, message: str) -> None:
    with pytest.raises(UserError) as err:
        modelpress.compress(str(user_task["ft"]), passes)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="must be a zoo name, a checkpoint path"):
        modelpress.compress(3.5, [])


def test_the_entry_points_stay_functions_after_every_package_is_imported() -> None:
    """Subpackages named like an entry point would replace it on first import (hence codecs/, metrics/,
    exporters/)."""
    from modelpress.exporters import EXPORTERS
    from modelpress.metrics import metric_registry
    from modelpress.passes import pass_registry

    pass_registry(), metric_registry(), EXPORTERS.all()
    for name in ("compress", "evaluate", "export", "load", "run_recipe"):
        assert callable(getattr(modelpress, name)) and getattr(modelpress, name).__module__ == "modelpress"
