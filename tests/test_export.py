"""Exporters (ONNX, ORT mobile, ExecuTorch) on tiny models, run in their own runtimes.

The zoo models are exported and measured in benchmarks/export.py; here tiny BERTs and UNets check that
every path writes a file its runtime runs, that integer graphs really hold integers, that the QDQ graph
of calibrated quantizers computes what the torch module computes, and that failures are one-line errors
that name the module and leave nothing behind.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.errors import UserError
from modelpress.exporters import ExportSpec, export_model, exported_info, load_exported
from modelpress.model import ModelHandle, describe_architecture, example_inputs

torch.set_num_threads(1)


def tiny_bert(kind: str = "classifier", layers: int = 1, seed: int = 0, hidden: int = 16) -> ModelHandle:
    import transformers

    cfg = transformers.BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(seed)
    cls = transformers.BertForSequenceClassification if kind == "classifier" else transformers.BertModel
    m = cls(cfg).eval()
    return ModelHandle(m, kind, "tiny", describe_architecture(m))


def tiny_unet(cond: bool = False) -> ModelHandle:
    import diffusers as d
    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                  norm_num_groups=4)
    if cond:
        m = d.UNet2DConditionModel(**common, cross_attention_dim=12, attention_head_dim=2,
                                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
        return ModelHandle(m, "unet-cond", "tiny", describe_architecture(m))
    m = d.UNet2DModel(**common, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()
    return ModelHandle(m, "unet", "tiny", describe_architecture(m))


def max_err(runtime: nn.Module, handle: ModelHandle, **shape) -> float:
    inputs = example_inputs(handle, seed=3, **shape)
    with torch.no_grad():
        return float((runtime(*inputs) - handle.canonical()(*inputs)).abs().max())


def onnx_initializer_dtypes(path: Path) -> dict[str, int]:
    import onnx

    out: dict[str, int] = {}
    for init in onnx.load(str(path)).graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type)
        out[name] = out.get(name, 0) + int(np.prod(init.dims))
    return out


@pytest.fixture(scope="module")
def classifier_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One tiny classifier exported as fp32 ONNX, int8 ONNX and fp32 .ort in one :func:`shared_exports` block (as
    a run's report exports them), shared by several tests; ``translations``: how many ONNX translations it took."""
    from modelpress.exporters import onnx as onnx_exporter
    from modelpress.exporters.common import shared_exports

    h = tiny_bert()
    d = tmp_path_factory.mktemp("exports")
    translations = []
    with pytest.MonkeyPatch.context() as mp, shared_exports():
        original = onnx_exporter.translate
        mp.setattr(onnx_exporter, "translate", lambda *a, **k: translations.append(1) or original(*a, **k))
        out = {"fp32": export_model(h, ExportSpec(format="onnx"), d),
               "int8": export_model(h, ExportSpec(format="onnx", quantize="int8"), d),
               "ort": export_model(h, ExportSpec(format="ort"), d)}
    return {"handle": h, "dir": d, "translations": len(translations), **out}


# ---------------------------------------------------------------------------------------------------
# The spec


def test_spec_is_strict_and_file_names_are_distinct() -> None:
    with pytest.raises(Exception, match="extra"):
        ExportSpec.model_validate({"format": "onnx", "quantise": "int8"})
    with pytest.raises(Exception, match="weight-only"):
        ExportSpec(format="pte", quantize="int4-weight")
    with pytest.raises(Exception, match="power of two"):
        ExportSpec(format="onnx", quantize="int4-weight", block_size=48)
    specs = [ExportSpec(format="onnx"), ExportSpec(format="onnx", quantize="int8"),
             ExportSpec(format="onnx", quantize="int8", activations="static"),
             ExportSpec(format="onnx", quantize="int4-weight"), ExportSpec(format="onnx", exporter="optimum"),
             ExportSpec(format="onnx", dynamic=False), ExportSpec(format="onnx", kv_cache=False)]
    assert len({s.file_stem() for s in specs}) == len(specs)
    assert ExportSpec(format="pte").file_stem() != ExportSpec(format="pte", kv_cache=True).file_stem()


def test_kv_cache_is_for_causal_lms_in_onnx_and_ort() -> None:
    with pytest.raises(Exception, match="float only"):
        ExportSpec(format="pte", kv_cache=True, quantize="int8")
    with pytest.raises(Exception, match="variable shapes"):
        ExportSpec(format="onnx", kv_cache=True, dynamic=False)
    assert ExportSpec(format="onnx", kv_cache=True).refusal("classifier") == \
        "kv_cache: true exports causal LMs, not a classifier model"
    assert ExportSpec(format="onnx").refusal("classifier") is None  # unset: the canonical graph
    uses = {(f, kv): ExportSpec(format=f, kv_cache=kv).uses_kv_cache("causal-lm")
            for f in ("onnx", "ort", "pte") for kv in (None, True, False)}
    assert uses == {("onnx", None): True, ("ort", None): True, ("pte", None): False,
                    ("onnx", True): True, ("ort", True): True, ("pte", True): True,
                    ("onnx", False): False, ("ort", False): False, ("pte", False): False}
    assert not ExportSpec(format="onnx").uses_kv_cache("encoder")
    assert not ExportSpec(format="onnx", dynamic=False).uses_kv_cache("causal-lm")


# ---------------------------------------------------------------------------------------------------
# ONNX / ORT


def test_onnx_fp32_matches_torch_at_other_batch_and_length(classifier_exports) -> None:
    h, path = classifier_exports["handle"], classifier_exports["fp32"]
    rt = load_exported(path, h)
    assert rt.names == ["input_ids", "attention_mask"] and rt.batch is None and rt.seq is None
    assert max_err(rt, h, batch=3, seq_len=20) < 1e-5
    assert max_err(rt, h, batch=1, seq_len=64) < 1e-5
    info = exported_info(path)
    assert info["kind"] == "classifier" and info["size_bytes"] == path.stat().st_size


def test_onnx_int8_is_an_integer_graph_no_larger_than_fp32(classifier_exports) -> None:
    h, fp32, int8 = classifier_exports["handle"], classifier_exports["fp32"], classifier_exports["int8"]
    ops = exported_info(int8)["op_counts"]
    assert ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0) > 0  # integer kernels, not fake quant
    assert onnx_initializer_dtypes(int8).get("INT8", 0) > onnx_initializer_dtypes(int8).get("FLOAT", 0)
    assert int8.stat().st_size <= fp32.stat().st_size
    rt, ref = load_exported(int8, h), load_exported(fp32, h)
    inputs = example_inputs(h, batch=4, seq_len=32, seed=1)
    scale = float(ref(*inputs).abs().max())
    assert float((rt(*inputs) - ref(*inputs)).abs().max()) < 0.25 * scale + 1e-3


def test_one_runs_formats_translate_the_model_once_and_write_what_separate_exports_write(classifier_exports,
                                                                                         tmp_path: Path) -> None:
    """onnx, int8 onnx and ort in one :func:`shared_exports` block share one float ONNX graph; the .ort (built from
    the kept graph) computes what an export on its own computes, with the same sidecar and operator list (its
    bytes, and so its size, differ between any two conversions, shared or not)."""
    assert classifier_exports["translations"] == 1
    h = classifier_exports["handle"]
    alone = export_model(h, ExportSpec(format="ort"), tmp_path)
    shared = classifier_exports["ort"]
    inputs = example_inputs(h, batch=3, seed=3)
    assert torch.equal(load_exported(alone, h)(*inputs), load_exported(shared, h)(*inputs))
    config = "model.required_operators.config"  # after its header, which names the converted file's path
    assert [ln for ln in (tmp_path / config).read_text().splitlines() if not ln.startswith("#")] == \
        [ln for ln in (classifier_exports["dir"] / config).read_text().splitlines() if not ln.startswith("#")]
    # the timing, and the .ort's size: two conversions of one graph differ by a few bytes (CI saw 56,616 vs 56,624)
    varies = {"export_seconds", "size_bytes"}
    assert ({k: v for k, v in exported_info(alone).items() if k not in varies}
            == {k: v for k, v in exported_info(shared).items() if k not in varies})


def test_ort_mobile_format_runs_and_lists_its_operators(classifier_exports) -> None:
    h, path = classifier_exports["handle"], classifier_exports["ort"]
    assert path.suffix == ".ort" and path.read_bytes()[4:8] == b"ORTM"  # the flatbuffer's file identifier
    assert (path.parent / "model.required_operators.config").read_text().strip()
    assert max_err(load_exported(path, h), h, batch=2, seq_len=16) < 1e-5


def test_optimum_exporter_for_transformers_models(tmp_path: Path) -> None:
    h = tiny_bert()
    path = export_model(h, ExportSpec(format="onnx", exporter="optimum"), tmp_path)
    assert path.name == "model-optimum.onnx"
    rt = load_exported(path, h)
    # optimum's extra input is filled with zeros
    assert "token_type_ids" in rt.feeds.all and rt.names == ["input_ids", "attention_mask"]
    assert max_err(rt, h, batch=3, seq_len=20) < 1e-5
    with pytest.raises(UserError, match="transformers text models"):
        export_model(tiny_unet(), ExportSpec(format="onnx", exporter="optimum"), tmp_path)


def test_fixed_shapes_are_padded_and_chunked(tmp_path: Path) -> None:
    h = tiny_bert("encoder")
    path = export_model(h, ExportSpec(format="onnx", dynamic=False), tmp_path)
    rt = load_exported(path, h)
    assert rt.batch == 2 and rt.seq == 64
    # 5 rows = chunks of 2 with the last padded; 20 tokens padded to 64 with masked positions, then sliced
    assert max_err(rt, h, batch=5, seq_len=20) < 1e-5
    with pytest.raises(UserError, match="at most 64 tokens"):
        rt(*example_inputs(h, batch=2, seq_len=70))


def test_weight_only_int4_uses_matmulnbits(tmp_path: Path) -> None:
    h = tiny_bert("encoder")
    fp32 = export_model(h, ExportSpec(format="onnx"), tmp_path)
    w4 = export_model(h, ExportSpec(format="onnx", quantize="int4-weight", block_size=16), tmp_path)
    assert exported_info(w4)["op_counts"].get("MatMulNBits", 0) >= 6  # q, k, v, out, up, down
    assert w4.stat().st_size < fp32.stat().st_size
    rt = load_exported(w4, h)
    inputs = example_inputs(h, batch=2, seq_len=16, seed=2)
    with torch.no_grad():
        ref = h.canonical()(*inputs)
    rel = float((rt(*inputs) - ref).norm() / ref.norm())
    assert rel < 0.1


# ---------------------------------------------------------------------------------------------------
# QDQ from calibrated quantizers


def calibrated_quant_bert(act_bits: int = 8, w_bits: int = 8) -> ModelHandle:
    """A tiny BERT whose Linear layers are the quant core's QuantLinear with min-max calibrated ranges."""
    from modelpress.modules import set_submodule
    from modelpress.quant.layers import QuantLinear

    h = tiny_bert("encoder")
    names = [n for n, m in h.module.named_modules() if isinstance(m, nn.Linear)]
    layers = {}
    for n in names:
        q = QuantLinear.from_float(h.module.get_submodule(n), w_bits=w_bits, w_symmetric=False, act_bits=act_bits,
                                   act_symmetric=False)
        q.init_weight_qparams("minmax")
        q.act.observing = True
        set_submodule(h.module, n, q)
        layers[n] = q
    with torch.no_grad():
        for seed in range(3):
            h.canonical()(*example_inputs(h, batch=4, seq_len=32, seed=seed))
    for q in layers.values():
        q.act.fit("minmax")
        q.freeze()
    return h


def test_qdq_activation_matches_numpy_reference() -> None:
    from modelpress.exporters.qdq import QDQAct
    from modelpress.quant.act import ActQuantizer

    for bits, symmetric in ((8, False), (8, True), (6, False)):
        act = ActQuantizer(bits, symmetric)
        act.scale.fill_(0.05)
        act.zero_point.fill_(0 if symmetric else -3)
        x = torch.linspace(-9, 9, 1001)
        got = QDQAct(act)(x).numpy()
        half = 2 ** (bits - 1)
        qmin, qmax = (-(half - 1), half - 1) if symmetric else (-half, half - 1)
        z = 0 if symmetric else -3
        want = (np.clip(np.round(x.numpy().astype(np.float64) / 0.05) + z, qmin, qmax) - z) * 0.05
        assert np.abs(got - want).max() < 1e-5
        assert torch.allclose(act(x), torch.from_numpy(got), atol=1e-5)  # the torch fake-quant agrees


def test_calibrated_quantizers_become_a_qdq_graph(tmp_path: Path) -> None:
    import onnxruntime as ort

    from modelpress.exporters.runtime import GraphFeeds, OnnxRuntimeModule

    h = calibrated_quant_bert()
    path = export_model(h, ExportSpec(format="onnx", quantize="int8"), tmp_path)
    info = exported_info(path)
    assert "calibrated" in info["quantization"]
    ops = info["op_counts"]
    # one Q/DQ per distinct quantized input (q, k, v share theirs: same input, same calibrated range, merged
    # by the exporter's optimizer), plus one DQ per weight: 6 layers, the unused pooler pruned
    assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] >= 4 + 6
    weights = sum(m.weight_codes().numel() for n, m in h.module.named_modules()
                  if hasattr(m, "weight_codes") and not n.startswith("pooler"))
    assert onnx_initializer_dtypes(path).get("INT8", 0) >= weights  # the codes, not float weights
    inputs = example_inputs(h, batch=2, seq_len=24, seed=9)
    with torch.no_grad():
        want = h.canonical()(*inputs)
    # the graph as written computes exactly the torch module's fake quantization ...
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, GraphFeeds([(i.name, i.shape) for i in sess.get_inputs()])(inputs))[0]
    assert np.abs(got - want.numpy()).max() < 1e-4
    # ... and ONNX Runtime's fused integer kernels stay within the quantization noise
    fused = OnnxRuntimeModule(path, h.kind)(*inputs)
    assert float((fused - want).abs().max()) < 0.1 * float(want.abs().max())


# ---------------------------------------------------------------------------------------------------
# Errors


class _NeedsCustomOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mp_test.mystery(x)


@torch.library.custom_op("mp_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_mystery.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_unsupported_operator_names_op_and_module_and_leaves_nothing(tmp_path: Path) -> None:
    h = tiny_bert("encoder")
    h.module.encoder.layer[0].intermediate.intermediate_act_fn = _NeedsCustomOp()
    with pytest.raises(UserError) as err:
        export_model(h, ExportSpec(format="onnx"), tmp_path)
    msg = str(err.value)
    assert "mp_test" in msg and "mystery" in msg
    assert "encoder.layer.0.intermediate" in msg
    assert list(tmp_path.iterdir()) == []


def test_load_exported_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        load_exported(bad, tiny_bert())
    with pytest.raises(UserError, match="no such exported file"):
        load_exported(tmp_path / "missing.pte", tiny_bert())


# ---------------------------------------------------------------------------------------------------
# ExecuTorch


def test_pte_int8_keeps_timestep_embedding_and_tiny_layers_in_float() -> None:
    from modelpress.exporters.common import traceable
    from modelpress.exporters.pte import float_modules, small_layers

    wrapper = traceable(tiny_unet())
    assert [n.split(".")[-1] for n in float_modules(wrapper)] == ["time_proj"]  # t * freq must not be int8
    small = small_layers(wrapper)
    assert small and all(wrapper.get_submodule(n).weight.numel() < 4096 for n in small)


def test_pte_runs_in_executorch_and_matches_torch(tmp_path: Path) -> None:
    h = tiny_bert("encoder")
    path = export_model(h, ExportSpec(format="pte"), tmp_path)
    info = exported_info(path)
    assert info["xnnpack_subgraphs"] >= 1
    rt = load_exported(path, h)
    assert max_err(rt, h, batch=3, seq_len=20) < 1e-4


@pytest.mark.slow
def test_pte_int8_xnnpack_quantizer(tmp_path: Path) -> None:
    h = tiny_bert("classifier", hidden=64)  # 64 x 64 attention weights: quantized; the 3 x 64 head: not
    fp32 = export_model(h, ExportSpec(format="pte"), tmp_path)
    int8 = export_model(h, ExportSpec(format="pte", quantize="int8"), tmp_path)
    info = exported_info(int8)
    assert "XNNPACK PT2E int8" in info["quantization"]
    assert info["float_layers"]["names"] == ["classifier"]
    assert int8.stat().st_size < 0.6 * fp32.stat().st_size
    rt = load_exported(int8, h)
    inputs = example_inputs(h, batch=2, seq_len=16, seed=4)
    with torch.no_grad():
        ref = h.canonical()(*inputs)
    assert float((rt(*inputs) - ref).abs().max()) < 0.25 * float(ref.abs().max()) + 1e-3


# ---------------------------------------------------------------------------------------------------
# UNets (timestep input, int64)


def test_a_guarded_unet_batch_is_narrowed_in_one_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' upsampler guards ``batch >= 64``: the dynamic export narrows the batch to what the program
    accepts in one ``torch.export`` trace (named dims failed on the guard and were traced twice)."""
    from modelpress.exporters.common import export_program, trace_inputs, traceable

    h = tiny_unet()
    traces = []
    original = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: traces.append(1) or original(*a, **k))
    with torch.no_grad():
        program, bounds = export_program(traceable(h), trace_inputs(h), h, True)
        assert traces == [1] and bounds == {"batch": (1, 63)}
        inputs = example_inputs(h, batch=5, seed=3)
        assert torch.equal(program.module()(*inputs), h.canonical()(*inputs))


@pytest.mark.slow
@pytest.mark.parametrize("cond", [False, True])
@pytest.mark.parametrize("fmt", ["onnx", "ort", "pte"])
def test_unets_export_with_their_timestep_input(fmt: str, cond: bool, tmp_path: Path) -> None:
    h = tiny_unet(cond)
    path = export_model(h, ExportSpec(format=fmt), tmp_path)
    rt = load_exported(path, h)
    assert max_err(rt, h, batch=3) < 1e-4
    if fmt == "onnx":
        q = export_model(h, ExportSpec(format=fmt, quantize="int8"), tmp_path)
        assert exported_info(q)["op_counts"].get("QuantizeLinear", 0) > 0
        assert q.stat().st_size <= path.stat().st_size


# ---------------------------------------------------------------------------------------------------
# The translation to ONNX


def test_onnx_translation_builds_the_torchlib_registry_once_and_writes_the_same_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``translate`` hands torch.onnx one torchlib registry per process through the private
    ``_core.export(registry=)``; this fails when the pinned torch drops that entry point (the exporter then falls
    back to ``torch.onnx.export``, which rebuilds the registry per call), and checks both write the same bytes."""
    from torch.onnx._internal.exporter import _registration

    from modelpress.exporters import onnx as onnx_exporter
    from modelpress.exporters.common import export_program, trace_inputs, traceable

    registry = onnx_exporter.torchlib_registry(18)
    assert registry is not None, "torch.onnx's _core.export(registry=) is gone: the registry is rebuilt per export"
    assert onnx_exporter.torchlib_registry(17) is registry  # torch.onnx builds opsets below torchlib's at torchlib's
    builds = []
    original = _registration.ONNXRegistry.__dict__["from_torchlib"].__func__
    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib",
                        classmethod(lambda cls, **kw: builds.append(kw) or original(cls, **kw)))
    h = tiny_bert()
    with torch.no_grad():
        program, _ = export_program(traceable(h), trace_inputs(h), h, True)
    names = (["input_ids", "attention_mask"], ["logits"])
    onnx_exporter.translate(program, trace_inputs(h), *names, tmp_path / "cached.onnx", 18)
    assert builds == []
    monkeypatch.setattr(onnx_exporter, "torchlib_registry", lambda opset: None)
    onnx_exporter.translate(program, trace_inputs(h), *names, tmp_path / "public.onnx", 18)
    assert builds == [{"opset_version": 18}]
    assert (tmp_path / "cached.onnx").read_bytes() == (tmp_path / "public.onnx").read_bytes()
