"""A user's mistakes, interrupts and kills in ``modelpress run`` (issue 21), through the command line in
subprocesses: a kind, pass, export or metric that does not fit is one line and exit 2 with nothing written;
Ctrl-C is one line, exit 130 and no staging directory; a SIGKILL during the passes, the artifact write or an
export leaves the previous artifact intact and loadable (the next run clears what the killed one left); two
runs writing one output directory at once end with one whole artifact of one of them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from modelpress import artifact
from modelpress.artifact import atomic_directory, load_artifact
from modelpress.pipeline import run_recipe

from test_causal_lm import _config

#: runs ``modelpress run RECIPE -q`` after making the step named by argv[2] write argv[1] and wait to be killed
DRIVER = r"""
import sys, time
from pathlib import Path

marker, point, recipe = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def pause_after(owner, name):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        marker.write_text(point)
        time.sleep(120)
        return out
    setattr(owner, name, wrapped)

if point == "passes":
    from modelpress.builtin.cast import Cast
    pause_after(Cast, "apply")
elif point == "write":
    import modelpress.artifact
    pause_after(modelpress.artifact, "save_file")  # the weights are written, the manifest not yet
elif point == "export":
    import modelpress.exporters.onnx
    pause_after(modelpress.exporters.onnx, "write_info")  # the ONNX file is written
from modelpress.cli import main
sys.exit(main(["run", recipe, "-q"]))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelpress.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM checkpoint (no tokenizer: these recipes are refused before any data)."""
    import transformers

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(_config("llama", 40)).save_pretrained(str(out))
    return out


MISTAKES = {
    "encoder kind on a causal LM": ("model: {{source: {llm}, kind: encoder}}\npasses: [{{type: cast}}]\n",
                                    "model.kind: .*LlamaForCausalLM is not an encoder model"),
    "unet kind on a text model": ("model: {{source: {cls}, kind: unet}}\npasses: [{{type: cast}}]\n",
                                  "model.kind: .*BertForSequenceClassification is not a unet model"),
    "pass that does not fit the kind": ("model: {cls}\npasses: [{{type: ptq}}]\n",
                                        r"passes\[0\]: pass 'ptq' works on unet, unet-cond models, not classifier"),
    "delta pass without a base": ("model: {llm}\npasses: [{{type: bitdelta}}]\n", r"passes\[0\]: .*bitdelta.*base"),
    "export that cannot carry the pass": ("model: digits-ddpm\npasses: [{{type: ptq}}]\nexport: [pte]\n",
                                          r"export\[0\]: a model from pass 'ptq' cannot be exported to pte"),
    "metric that does not fit the kind": ("model: {cls}\nevaluate: [fd]\n",
                                          r"evaluate\[0\]\.metric: metric 'fd' applies to unet, unet-cond models"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_users_mistake_is_one_line_exit_2_and_nothing_written(mistake: str, tiny_llama: Path,
                                                                tiny_classifier_dir: Path, tmp_path: Path) -> None:
    import re

    body, message = MISTAKES[mistake]
    (tmp_path / "r.yaml").write_text(body.format(llm=tiny_llama, cls=tiny_classifier_dir) + "output: out\n")
    got = _cli("run", "r.yaml", cwd=tmp_path)
    assert got.returncode == 2, got.stderr
    lines = [ln for ln in (got.stderr + got.stdout).splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in got.stderr, lines
    assert re.search(f"^modelpress: error: r.yaml: {message}", lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def _recipe(tmp_path: Path, model: Path, name: str, dtype: str, export: bool = False) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"model: {model}\npasses: [{{type: cast, dtype: {dtype}}}]\n"
                    + ("export: [onnx]\n" if export else "")
                    + "output: out\n")
    return path


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture()
def previous(tmp_path: Path, tiny_classifier_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """An earlier artifact at ``tmp_path/out`` (a float16 cast), as bytes per file."""
    monkeypatch.chdir(tmp_path)
    run_recipe(_recipe(tmp_path, tiny_classifier_dir, "earlier", "float16"), show_progress=False)
    return _snapshot(tmp_path / "out")


def _start_and_stop_at(point: str, recipe: Path, tmp_path: Path) -> subprocess.Popen[str]:
    marker = tmp_path / "reached"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(marker), point, recipe.name], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 500
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached " + point
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("point", ["passes", "write", "export"])
def test_sigkill_leaves_the_previous_artifact_intact(point: str, previous: dict[str, bytes], tmp_path: Path,
                                                      tiny_classifier_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_classifier_dir, "killed", "bfloat16", export=point == "export")
    proc = _start_and_stop_at(point, recipe, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    out = tmp_path / "out"
    assert _snapshot(out) == previous
    assert load_artifact(out).module.classifier.weight.dtype == torch.float16
    assert _leftovers(tmp_path), "the killed run's staging directory is still there"
    # the next run on the same output removes what the killed run left
    run_recipe(_recipe(tmp_path, tiny_classifier_dir, "next", "bfloat16"), show_progress=False)
    assert _leftovers(tmp_path) == []
    assert load_artifact(out).module.classifier.weight.dtype == torch.bfloat16


def test_ctrl_c_is_one_line_and_leaves_no_staging_directory(previous: dict[str, bytes], tmp_path: Path,
                                                             tiny_classifier_dir: Path) -> None:
    proc = _start_and_stop_at("passes", _recipe(tmp_path, tiny_classifier_dir, "interrupted", "bfloat16"), tmp_path)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = [ln for ln in (stderr + stdout).splitlines() if ln.strip()]
    assert lines == ["modelpress: interrupted; nothing was written"], lines
    assert _leftovers(tmp_path) == []
    assert _snapshot(tmp_path / "out") == previous


def test_two_runs_writing_one_output_end_with_one_whole_artifact(tmp_path: Path, tiny_classifier_dir: Path) -> None:
    recipes = {"float16": _recipe(tmp_path, tiny_classifier_dir, "a", "float16", export=True),
               "bfloat16": _recipe(tmp_path, tiny_classifier_dir, "b", "bfloat16")}
    procs = [subprocess.Popen([sys.executable, "-m", "modelpress.cli", "run", r.name, "-q"],
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in recipes.values()]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.communicate()
    out = tmp_path / "out"
    manifest = json.loads((out / "modelpress.json").read_text())
    dtype = manifest["recipe"]["passes"][0]["dtype"]
    assert (out / "recipe.yaml").read_text() == recipes[dtype].read_text()
    assert load_artifact(out).module.classifier.weight.dtype == getattr(torch, dtype)
    # no file of the other run: both write a report, only the float16 recipe exports
    report = json.loads((out / "report.json").read_text())
    assert (out / "exports").exists() == bool(report["exports"]) == (dtype == "float16")
    assert _leftovers(tmp_path) == []


def _commit(stack: ExitStack, out: Path, text: str) -> Path:
    staging = stack.enter_context(atomic_directory(out))
    (staging / "which.txt").write_text(text)
    (staging / f"only-{text}.txt").write_text(text)
    return staging


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_interleaved_commits_keep_the_last_whole_artifact(tmp_path: Path, exchange: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if not exchange:
        monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with atomic_directory(out) as staging:
        (staging / "which.txt").write_text("first")
    first, second = ExitStack(), ExitStack()
    _commit(first, out, "a")
    _commit(second, out, "b")
    first.close()
    assert sorted(p.name for p in out.iterdir()) == ["only-a.txt", "which.txt"]
    second.close()
    assert sorted(p.name for p in out.iterdir()) == ["only-b.txt", "which.txt"]
    assert _leftovers(tmp_path) == [] and (out / "which.txt").read_text() == "b"


def test_an_artifact_left_aside_by_a_killed_swap_is_put_back(tmp_path: Path) -> None:
    """A process killed between the two renames of the fallback swap left ``output`` renamed aside."""
    out = tmp_path / "out"
    aside = tmp_path / ".out.old-999999999-deadbeef"
    aside.mkdir()
    (aside / "which.txt").write_text("earlier")
    stale = tmp_path / ".out.partial-999999999-deadbeef"
    stale.mkdir()
    with pytest.raises(RuntimeError):
        with atomic_directory(out):
            assert (out / "which.txt").read_text() == "earlier"
            raise RuntimeError("a failing run")
    assert (out / "which.txt").read_text() == "earlier" and _leftovers(tmp_path) == []
