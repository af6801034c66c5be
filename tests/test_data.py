"""The data layer: a person's own classifier and labelled files through the delta methods and EvoPress, the
file readers, the one Hessian collector, and one-line errors for bad data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modelpress.artifact import read_manifest
from modelpress.cli import main
from modelpress.data import Dataset, finite, open_dataset
from modelpress.data.capture import HessianAccumulator, collect_hessians, model_hessians
from modelpress.data.inputs import model_inputs
from modelpress.errors import UserError
from modelpress.model import ModelHandle, load_checkpoint
from modelpress.pipeline import run_recipe

from conftest import write_jsonl

PASSES = {
    "bitdelta": "{type: bitdelta, steps: 20, batch_size: 8, seq_len: 16, embeddings: keep}",
    "dare": "{type: dare, p: 0.5, embeddings: keep}",
    "evopress": "{type: evopress, family: bits, method: rtn, levels: [4, 6, 8], budget: 6, generations: 2, "
                "offspring: 3, survivors: [1], stage_samples: [16], calibration_samples: 32, max_length: 16}",
}


@pytest.mark.parametrize("method", sorted(PASSES))
def test_users_own_classifier_and_files(user_task: dict[str, Path], method: str, tmp_path: Path) -> None:
    """A transformers classifier directory + train.jsonl calibration + accuracy on test.jsonl, from a recipe."""
    base = f"base: {user_task['base']}\n" if method != "evopress" else ""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {user_task['ft']}\n{base}"
                      f"calibration: {{dataset: {user_task['train']}, samples: 32}}\n"
                      f"passes:\n  - {PASSES[method]}\n"
                      f"evaluate:\n  - {{metric: accuracy, dataset: {user_task['test']}}}\n"
                      f"output: {tmp_path / 'out'}\n")
    out = run_recipe(recipe, export=False, show_progress=False)
    report = json.loads((out / "report.json").read_text())
    acc = report["metrics"]["accuracy"]
    assert acc["reference"] >= 0.9, "the fine-tune learned the task"
    assert acc["compressed"] >= acc["reference"] - 0.1
    assert acc["details"]["dataset"] == str(user_task["test"]) and acc["details"]["examples"] == 60
    manifest = read_manifest(out)
    assert manifest["inputs"]["calibration"] == {"dataset": str(user_task["train"]), "random": False}
    log = manifest["passes"][method]
    if method == "bitdelta":  # what the passes drew is recorded (dare draws no data: a random drop)
        assert log["calibration"]["dataset"] == str(user_task["train"]) and len(log["calibration"]["ids"]) >= 32
    if method == "evopress":
        assert log["calibration_source"] == str(user_task["train"]) and len(log["calibration_ids"]) >= 32


def test_text_batches_use_the_models_tokenizer_and_the_seeded_draw(user_task: dict[str, Path]) -> None:
    handle = load_checkpoint(user_task["ft"])
    data = open_dataset(str(user_task["train"]))
    (ids, mask), ex = model_inputs(handle, data, 8, 5, seq_len=12)
    assert ids.shape == (8, 12) and ex.ids == torch.randperm(160, generator=torch.Generator().manual_seed(5))[:8].tolist()
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(str(user_task["ft"]))(ex.texts, padding="max_length", max_length=12,
                                                                truncation=True, return_tensors="pt")
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    again, _ = model_inputs(handle, data, 8, 5, seq_len=12)
    assert torch.equal(again[0], ids)


def test_file_readers(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second document\n")
    (tmp_path / "docs" / "a.txt").write_text("first document\nstill the first\n")
    folder = open_dataset(str(tmp_path / "docs"))
    assert folder.all().texts == ["first document\nstill the first", "second document"]
    (tmp_path / "lines.txt").write_text("one\n\n two \nthree\n")
    lines = open_dataset(str(tmp_path / "lines.txt"))
    assert lines.all().texts == ["one", "two", "three"] and lines.all().prompts == lines.all().texts
    from PIL import Image

    for label, value in (("dark", 0), ("light", 255)):
        (tmp_path / "img" / label).mkdir(parents=True)
        Image.fromarray(np.full((4, 6), value, dtype=np.uint8)).save(tmp_path / "img" / label / "x.png")
    images = open_dataset(str(tmp_path / "img"))
    ex = images.all()
    assert ex.images.shape == (2, 1, 4, 6) and ex.labels == ["dark", "light"]
    assert ex.images[0].max() == -1.0 and ex.images[1].min() == 1.0
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle"}, {"prompt": "a blue square"}])
    assert open_dataset(str(prompts)).fields == frozenset({"prompt"})
    # a draw larger than the dataset cycles through seeded permutations
    assert sorted(lines.draw(6, 0).texts) == sorted(["one", "two", "three"] * 2)


@pytest.mark.parametrize("files, ref, message", [
    ({}, "missing.jsonl", "missing.jsonl: no dataset file or folder"),
    ({"empty.jsonl": ""}, "empty.jsonl", "empty.jsonl: the file is empty"),
    ({"empty.txt": "\n \n"}, "empty.txt", "empty.txt: the file is empty"),
    ({"bad.jsonl": '{"text": "a", "label": 0}\n{"label": 1}\n'}, "bad.jsonl", "bad.jsonl: line 2: no 'text' field"),
    ({"bad.jsonl": '{"text": "a"}\nnot json\n'}, "bad.jsonl", "bad.jsonl: line 2: not valid JSON"),
    ({"bad.jsonl": '{"label": 1}\n'}, "bad.jsonl", "bad.jsonl: line 1: no 'text', 'prompt' or 'image' field"),
    ({"imgs/readme.md": "no images here"}, "imgs", "imgs: no images"),
    ({"data.csv": "text,label\n"}, "data.csv", "data.csv: unsupported data file"),
])
def test_bad_data_files_are_one_line_errors(tmp_path: Path, files: dict, ref: str, message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as err:
        open_dataset(str(tmp_path / ref))
    assert str(err.value).startswith(str(tmp_path / message.split(":")[0])) and message.split(": ", 1)[1] in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_bad_data_exits_2_and_writes_nothing(user_task: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "my pet barks", "label": "dog"},
                                                    {"text": "my pet moos", "label": "cow"}])
    noline = tmp_path / "noline.jsonl"
    noline.write_text('{"text": "my pet barks", "label": "dog"}\n{"text": "my pet purrs"}\n')
    cases = [(f"calibration: {{dataset: {noline}}}\npasses: [{{type: dare, p: 0.5}}]\n", "line 2: no 'label' field"),
             (f"passes: [{{type: dare, p: 0.5}}]\nevaluate: [{{metric: accuracy, dataset: {wrong}}}]\n",
              "example 2: label 'cow' is not a class of the model"),
             (f"passes: [{{type: dare, p: 0.5}}]\nevaluate: [{{metric: accuracy, dataset: {tmp_path / 'nope.jsonl'}}}]\n",
              "no dataset file or folder")]
    for body, message in cases:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"model: {user_task['ft']}\nbase: {user_task['base']}\n{body}output: {tmp_path / 'out'}\n")
        assert main(["run", str(recipe)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_one_hessian_collector_for_all_methods() -> None:
    """H = scale/n * sum x x^T over every row, padding tokens left out; convolutions unfolded."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    H = collect_hessians(torch.nn.Sequential(lin), ["0"], lambda: lin(x))["0"]
    rows = x.reshape(-1, 5).double()
    assert torch.allclose(H, 2 * rows.T @ rows / 8)
    acc = HessianAccumulator(5, scale=1.0)
    acc.add(x[0, :2])
    acc.add(x[1, :3])
    want = torch.cat([x[0, :2], x[1, :3]]).double()
    assert torch.allclose(acc.H, want.T @ want / 5)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201 - a text model's call
            return type("Out", (), {"logits": self.lin(input_ids)})

    h = ModelHandle(Wrap(), "classifier", "t", {"library": "x", "class": "x", "config": {}})
    Hm = model_hessians(h, ["lin"], [(x, mask)], scale=1.0)["lin"]
    real = x[mask.bool()].double()
    assert torch.allclose(Hm, real.T @ real / 5)


def test_finite_dataset_rejects_mismatched_fields() -> None:
    with pytest.raises(ValueError):
        finite("x", {"text", "label"}, texts=["a", "b"], labels=[0])
    assert isinstance(finite("x", {"text"}, texts=["a"]), Dataset)


def test_the_own_data_recipe_validates_and_reads_its_files_beside_it() -> None:
    """recipes/own_data.yaml names its JSON Lines files relative to itself; they are read and checked at load."""
    from modelpress.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    loaded = load_recipe(root / "own_data.yaml")
    assert loaded.recipe.calibration.dataset == str(root / "data" / "docs_train.jsonl")
    assert [m.dataset for m in loaded.recipe.evaluate] == [str(root / "data" / "docs_test.jsonl")] * 2
    data = open_dataset(loaded.recipe.evaluate[0].dataset)
    assert data.size == 200 and data.fields == frozenset({"text", "label"})
