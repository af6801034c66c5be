"""The framework: recipes and their errors, atomic artifacts, round trips, the CLI's exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import Field

from modelpress.artifact import load_artifact, read_manifest
from modelpress.cli import main
from modelpress.errors import UserError
from modelpress.passes import Context, Pass, PassConfig, register_pass
from modelpress.pipeline import run_recipe
from modelpress.recipe import load_recipe


@register_pass
class _Boom(Pass):
    """A pass that fails halfway, to check that nothing is left behind."""

    name = "test-boom"

    class Config(PassConfig):
        weight_bits: int = Field(4, ge=2, le=8)

    def apply(self, model, ctx: Context):  # noqa: ANN001, ANN201
        raise RuntimeError("boom")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("body, message", [
    ("model: {m}\npasses:\n  - type: cast\n  - type: test-boom\n    weight_bits: 12\n",
     "x.yaml: passes[1].weight_bits: must be between 2 and 8, got 12"),
    ("model: {m}\npasses:\n  - type: cast\n    dtype: int3\n",
     "x.yaml: passes[0].dtype: must be one of 'bfloat16', 'float16' or 'float32', got 'int3'"),
    ("model: {m}\npasses:\n  - type: cast\n    dtyp: float16\n", "x.yaml: passes[0].dtyp: unknown key"),
    ("model: {m}\npasses:\n  - type: nosuchpass\n", "x.yaml: passes[0].type: unknown pass type 'nosuchpass'"),
    ("model: {m}\nsed: 3\n", "x.yaml: sed: unknown key"),
    ("model: {m}\nseed: many\n", "x.yaml: seed: must be a valid integer, unable to parse string as an integer, got 'many'"),
    ("model: {m}\nseed: -1\n", "x.yaml: seed: must be between 0 and 2147483647, got -1"),
    ("model: does/not/exist\n", "x.yaml: model: no zoo model or file named 'does/not/exist'"),
    ("passes: []\n", "x.yaml: model: is required"),
    ("model: {m}\nevaluate: [nosuchmetric]\n", "x.yaml: evaluate[0].metric: unknown metric 'nosuchmetric'"),
    ("model: {m}\npasses: [\n", "x.yaml: line"),
    ("- just\n- a list\n", "x.yaml: a recipe must be a mapping"),
])
def test_bad_recipes_give_one_line_errors(in_tmp: Path, tiny_classifier_dir: Path, body: str, message: str) -> None:
    write(in_tmp / "x.yaml", body.format(m=tiny_classifier_dir))
    with pytest.raises(UserError) as info:
        load_recipe("x.yaml")
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_missing_recipe_file(in_tmp: Path) -> None:
    with pytest.raises(UserError, match="nope.yaml: no such recipe file"):
        load_recipe(in_tmp / "nope.yaml")


def test_round_trip_gives_identical_outputs(in_tmp: Path, tiny_classifier_dir: Path) -> None:
    recipe = write(in_tmp / "r.yaml", f"model: {tiny_classifier_dir}\nseed: 3\npasses:\n  - type: cast\n"
                                      f"    dtype: bfloat16\noutput: out/a\n")
    out = run_recipe(recipe, show_progress=False)
    manifest = read_manifest(out)
    assert manifest["passes"]["cast"]["dtype"] == "bfloat16"
    assert manifest["inputs"]["model"]["sha256"]
    assert {t["codec"] for t in manifest["tensors"].values()} == {"raw-bfloat16"}
    handle = load_artifact(out)
    from modelpress.model import example_inputs, load_checkpoint

    original = load_checkpoint(tiny_classifier_dir)
    original.module.to(torch.bfloat16)
    inputs = example_inputs(handle, seq_len=8)
    assert torch.equal(handle.canonical()(*inputs), original.canonical()(*inputs))
    assert next(handle.module.parameters()).dtype == torch.bfloat16
    # no pickle anywhere in the artifact
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))


def test_failed_pass_leaves_nothing_and_keeps_earlier_artifact(in_tmp: Path, tiny_classifier_dir: Path) -> None:
    good = write(in_tmp / "good.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: cast}}]\noutput: out/x\n")
    out = run_recipe(good, show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = write(in_tmp / "bad.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: test-boom}}]\noutput: out/x\n")
    with pytest.raises(RuntimeError, match="boom"):
        run_recipe(bad, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (in_tmp / "out").iterdir()) == ["x"]  # no staging leftovers

    fresh = write(in_tmp / "fresh.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: test-boom}}]\noutput: out/y\n")
    with pytest.raises(RuntimeError):
        run_recipe(fresh, show_progress=False)
    assert not (in_tmp / "out" / "y").exists()


def test_same_seed_same_artifact(in_tmp: Path, tiny_classifier_dir: Path) -> None:
    a = run_recipe(write(in_tmp / "a.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: cast}}]\noutput: a\n"),
                   show_progress=False)
    b = run_recipe(write(in_tmp / "b.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: cast}}]\noutput: b\n"),
                   show_progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_checkpoint_errors(in_tmp: Path, tiny_classifier_dir: Path) -> None:
    from modelpress.model import load_checkpoint

    corrupt = in_tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_classifier_dir / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes((tiny_classifier_dir / "model.safetensors").read_bytes()[:500])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_checkpoint(corrupt)

    mismatched = in_tmp / "mismatched"
    mismatched.mkdir()
    cfg = json.loads((tiny_classifier_dir / "config.json").read_text())
    cfg["hidden_size"] = 48
    (mismatched / "config.json").write_text(json.dumps(cfg))
    (mismatched / "model.safetensors").write_bytes((tiny_classifier_dir / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="weights do not match the config"):
        load_checkpoint(mismatched)

    single = load_checkpoint(tiny_classifier_dir / "model.safetensors")  # config.json beside it
    assert single.kind == "classifier"


def test_cli_exit_codes(in_tmp: Path, tiny_classifier_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(in_tmp / "bad.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: cast, dtype: fp8}}]\n")
    assert main(["run", str(bad), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modelpress: error: ") and "passes[0].dtype" in err and "\n" not in err
    assert not (in_tmp / "runs").exists()

    good = write(in_tmp / "good.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: cast}}]\nevaluate: [size]\n")
    assert main(["run", str(good), "-q"]) == 0
    assert (in_tmp / "runs" / "good" / "report.json").exists()
    assert main(["inspect", "runs/good"]) == 0
    assert "raw-bfloat16" in capsys.readouterr().out
    assert main(["inspect", "nothing/here"]) == 2
    assert main(["evaluate", "nothing/here"]) == 2


def test_cli_help_runs_without_a_traceback() -> None:
    res = subprocess.run([sys.executable, "-m", "modelpress.cli", "run", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "recipe" in res.stdout
    res = subprocess.run([sys.executable, "-m", "modelpress.cli", "run", "missing.yaml", "-q"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "missing.yaml: no such recipe file" in res.stderr


def test_multi_recipe_file_validates_everything_first(in_tmp: Path, tiny_classifier_dir: Path) -> None:
    from modelpress.recipe import load_recipes

    write(in_tmp / "multi.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: cast}}]\n---\n"
                                 f"model: {tiny_classifier_dir}\npasses: [{{type: cast, dtype: float16}}]\n")
    recipes = load_recipes("multi.yaml")
    assert [str(r.output) for r in recipes] == ["runs/multi-1", "runs/multi-2"]
    write(in_tmp / "multi.yaml", f"model: {tiny_classifier_dir}\n---\nmodel: {tiny_classifier_dir}\nseed: x\n")
    with pytest.raises(UserError, match=r"^multi.yaml \(document 2\): seed: must be a valid integer"):
        load_recipes("multi.yaml")
    assert main(["run", "multi.yaml", "-q"]) == 2
    assert not (in_tmp / "runs").exists()


def test_loads_the_packaged_minilm_checkpoint_by_path() -> None:
    """A real transformers directory (with a legacy non-persistent position_ids buffer) loads by path."""
    from modelpress.model import load_checkpoint
    from modelpress.zoo.text import minilm_dir

    handle = load_checkpoint(minilm_dir())
    assert handle.kind == "encoder" and handle.architecture["class"] == "BertModel"
    assert handle.extras["tokenizer_dir"] == str(minilm_dir())


#: what modelpress itself prints on stderr: its progress lines, warnings, errors
OUR_STDERR = ("passes", "evaluate", "DDIM", "warning: ", "modelpress: ", "[")


def test_console_shows_only_our_lines_and_the_log_keeps_the_rest(in_tmp: Path, tiny_classifier_dir: Path) -> None:
    """A run that exports to ONNX and ExecuTorch (which pull in torchao, executorch and optimum, the noisy
    ones) prints nothing on the terminal that is not ours; other libraries' output goes to log.txt; the run
    ends with a summary of sizes and metrics."""
    recipe = write(in_tmp / "r.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: cast, dtype: float16}}]\n"
                                      "export: [onnx, pte]\nevaluate: [latency, size]\n")
    res = subprocess.run([sys.executable, "-m", "modelpress.cli", "run", str(recipe)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    foreign = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith(OUR_STDERR)]
    assert not foreign, foreign
    out = res.stdout.splitlines()
    assert out[0] == "artifact: runs/r" and out[-1] == "  report: runs/r/report.md"
    assert any(line.startswith("  size: ") and line.endswith("x smaller)") for line in out), out
    assert any(line.startswith("  latency: ") and "onnx: " in line and "pte: " in line for line in out), out
    assert (in_tmp / "runs" / "r" / "log.txt").exists()
    assert "log.txt" in (in_tmp / "runs" / "r" / "report.md").read_text()


def test_a_bug_keeps_its_traceback_and_its_log(in_tmp: Path, tiny_classifier_dir: Path) -> None:
    recipe = write(in_tmp / "b.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: test-boom}}]\n")
    code = "import sys, tests.test_framework; from modelpress.cli import main; sys.exit(main(['run', sys.argv[1]]))"
    res = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=600,
                         cwd=in_tmp, env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "RuntimeError: boom" in res.stderr
    log = res.stderr.strip().splitlines()[-1].split(" is in ")[-1]
    assert "RuntimeError: boom" in Path(log).read_text()
    assert not (in_tmp / "runs").exists() or not any((in_tmp / "runs").iterdir())  # no artifact, no staging left


def test_report_measures_against_the_input_checkpoint_and_splits_cast_from_coding(in_tmp: Path,
                                                                                tiny_classifier_dir: Path) -> None:
    """fp32 checkpoint + dfloat11 (bf16): the size reference is the checkpoint's bytes on disk, and the
    report shows the lossy cast and the lossless coding apart, the coded model bit-identical to the cast one."""
    recipe = write(in_tmp / "l.yaml", f"model: {tiny_classifier_dir}\npasses: [{{type: dfloat11, min_elements: 1024}}]\n"
                                      "export: [onnx]\nevaluate: [size]\n")
    out = run_recipe(recipe, show_progress=False)
    report = json.loads((out / "report.json").read_text())
    on_disk = sum(f.stat().st_size for f in tiny_classifier_dir.glob("*.safetensors"))
    assert report["size_bytes"]["reference"] == on_disk
    assert report["size_bytes"]["reference_label"] == "input checkpoint (float32, on disk)"
    cast = report["cast"]
    assert (cast["from"], cast["to"]) == ("float32", "bfloat16") and cast["coded_max_abs_err_vs_cast"] == 0.0
    # every tensor decodes bit for bit to the cast's, so the cast's metrics are the coded model's (not rerun)
    from modelpress.model import load_checkpoint
    assert cast["decoded_tensors_identical"] == len(load_checkpoint(tiny_classifier_dir).module.state_dict())
    assert cast["metrics"] == {n: m["compressed"] for n, m in report["metrics"].items()}
    assert report["size_bytes"]["compressed"] < cast["bytes"] < on_disk
    md = (out / "report.md").read_text()
    assert "1. cast float32 -> bfloat16 (lossy)" in md and "bit-identical to step 1" in md
    assert "step 1's metrics are the compressed model's" in md
    assert "no entropy codec" in md  # the ONNX export cannot carry the coding, and the report says so
