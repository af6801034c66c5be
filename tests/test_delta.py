"""Delta compression: BitDelta, Delta-CoMe, DARE / DAREx-q, packed-sign kernel, multi-tenant serving."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from modelpress.data import random_dataset
from modelpress.codecs.bitdelta import BitDeltaLinear, BitDeltaPass
from modelpress.codecs.dare import DareLinear, DarePass, DarexPass, analytic_q, random_keep_mask
from modelpress.codecs.delta import (DeltaLinear, delta_size_report, find_linear_layers, match_linear_layers,
                                       quantize_base)
from modelpress.codecs.delta_come import DeltaCoMeLinear, DeltaCoMePass, allocate_ranks, DEFAULT_GROUPS
from modelpress.codecs.serving import MultiTenantModel
from modelpress.errors import UserError
from modelpress.kernels.sign_gemv import sign_matmul, sign_matmul_reference
from modelpress.model import ModelHandle, describe_architecture, example_inputs
from modelpress.modules import compressed_modules, module_class
from modelpress.passes import Context, get_pass
from modelpress.quant.primitives import pack_codes, pack_signs, unpack_codes, unpack_signs

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------
# tiny stand-ins: a BERT base (BertModel) and a classifier fine-tune of it; a GPT-2 (Conv1D) pair


def _bert_pair(seed: int = 0, scale: float = 0.3, exact_sign: float | None = None, hidden: int = 64):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=hidden * 4, max_position_embeddings=64, num_labels=3)
    base = BertModel(cfg).eval()
    ft = BertForSequenceClassification(cfg).eval()
    ft.bert.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ft.bert.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if exact_sign is not None and p.dim() == 2 and "embeddings" not in name:
                p.add_(exact_sign * torch.sign(noise))  # a delta BitDelta represents exactly
            elif exact_sign is None:
                p.add_(scale * p.abs().mean() * noise)
    return (ModelHandle(base, "encoder", "tiny-base", describe_architecture(base)),
            ModelHandle(ft, "classifier", "tiny-ft", describe_architecture(ft)))


def _gpt2_pair():
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    base = GPT2Model(cfg).eval()
    ft = GPT2LMHeadModel(cfg).eval()
    ft.transformer.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.transformer.parameters():
            if p.dim() == 2:
                p.add_(0.01 * torch.sign(torch.randn_like(p)))
    return base, ft


def _ctx(base: ModelHandle, seed: int = 0) -> Context:
    return Context(seed=seed, base=base, data=random_dataset(), show_progress=False)


def _out(handle: ModelHandle, x):
    with torch.no_grad():
        return handle.canonical()(*x)


def _roundtrip(module: torch.nn.Module) -> torch.nn.Module:
    """What the artifact does: state_dict through safetensors, rebuild compressed modules from config."""
    blob = save({k: v.contiguous() for k, v in module.state_dict().items()})
    configs = [(path, type(m).__name__, m.module_config()) for path, m in compressed_modules(module)]
    fresh = copy.deepcopy(module)
    from modelpress.modules import set_submodule

    for path, cls, cfg in configs:
        set_submodule(fresh, path, module_class(cls).from_module_config(cfg))
    fresh.load_state_dict(load(blob), strict=True)
    return fresh


# ---------------------------------------------------------------------------------------------------
# packing and the kernel


@pytest.mark.parametrize("cols", [1, 31, 32, 70])
def test_sign_packing_roundtrip(cols):
    g = torch.Generator().manual_seed(cols)
    pos = torch.rand(5, cols, generator=g) > 0.5
    packed = pack_signs(pos)
    assert packed.dtype == torch.int32 and packed.shape == (5, (cols + 31) // 32)
    torch.testing.assert_close(unpack_signs(packed, cols), pos.float() * 2 - 1)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_code_packing_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_sign_kernel_matches_numpy_reference(n):
    rng = np.random.default_rng(n)
    cols = 70
    signs = rng.random((13, cols)) > 0.5
    packed = pack_signs(torch.from_numpy(signs)).numpy()
    x = rng.standard_normal((n, cols)).astype(np.float32)
    dense = x @ (signs.astype(np.float32) * 2 - 1).T
    np.testing.assert_allclose(sign_matmul_reference(x, packed, cols), dense, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sign_matmul(x, packed, cols), dense, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# generic layer discovery


def test_finds_conv1d_and_bitdelta_is_exact_on_sign_deltas():
    base, ft = _gpt2_pair()
    layers = match_linear_layers(ft, base)
    names = {l.name for l in layers}
    assert "transformer.h.0.attn.c_attn" in names and all(l.transposed for l in layers)
    assert "lm_head" not in names  # tied to the embeddings, no base linear counterpart
    bh = ModelHandle(base, "encoder", "b", describe_architecture(base))
    fh = ModelHandle(ft, "encoder", "f", describe_architecture(ft))
    out = BitDeltaPass(BitDeltaPass.Config(steps=0, embeddings="keep")).apply(fh.copy(), _ctx(bh))
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        ref, got = ft(ids).logits, out.module(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_bitdelta_exact_on_bert_and_weight_is_the_base():
    bh, fh = _bert_pair(exact_sign=0.02)
    out = BitDeltaPass(BitDeltaPass.Config(steps=0)).apply(fh.copy(), _ctx(bh))
    x = example_inputs(fh, batch=3, seq_len=12)
    torch.testing.assert_close(_out(out, x), _out(fh, x), rtol=1e-4, atol=1e-5)
    q = out.module.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, BitDeltaLinear)
    assert torch.equal(q.weight, bh.module.encoder.layer[0].attention.self.query.weight)
    assert abs(q.alpha.item() - 0.02) < 1e-6


def test_bitdelta_distillation_trains_only_alphas():
    bh, fh = _bert_pair(scale=0.5)
    ctx = _ctx(bh)
    probe = example_inputs(fh, batch=16, seq_len=16, seed=123)  # inputs the distillation never saw
    target = _out(fh, probe)
    init = BitDeltaPass(BitDeltaPass.Config(steps=0)).apply(fh.copy(), _ctx(bh))
    out = BitDeltaPass(BitDeltaPass.Config(steps=30, lr=3e-3, batch_size=4, seq_len=16)).apply(fh.copy(), ctx)
    log = ctx.log["bitdelta"]
    # the trained scales fit the fine-tune's outputs better than the initial ones (mean |delta|), on new inputs
    assert F.mse_loss(_out(out, probe), target) < 0.8 * F.mse_loss(_out(init, probe), target)
    assert any(abs(log["alpha"][k] - log["alpha_init"][k]) > 1e-6 for k in log["alpha"])
    # everything else still equals the input fine-tune (norms kept) or the base (embeddings reverted)
    ft_state, st = fh.module.state_dict(), out.module.state_dict()
    assert torch.equal(st["bert.encoder.layer.0.output.LayerNorm.weight"],
                       ft_state["bert.encoder.layer.0.output.LayerNorm.weight"])
    assert torch.equal(st["bert.embeddings.word_embeddings.weight"],
                       bh.module.state_dict()["embeddings.word_embeddings.weight"])
    assert torch.equal(st["classifier.weight"], ft_state["classifier.weight"])
    # the distillation is deterministic given the seed
    out2 = BitDeltaPass(BitDeltaPass.Config(steps=30, lr=3e-3, batch_size=4, seq_len=16)).apply(fh.copy(), _ctx(bh))
    assert ctx.log["bitdelta"]["alpha"] == {k: m.alpha.item() for k, m in out2.module.named_modules()
                                            if isinstance(m, BitDeltaLinear)}


def test_bitdelta_size_is_over_10x_smaller_than_fp16():
    bh, fh = _bert_pair(hidden=128)
    out = BitDeltaPass(BitDeltaPass.Config(steps=0)).apply(fh.copy(), _ctx(bh))
    rep = delta_size_report(out.module, bh.module)
    assert rep["linear_ratio"] > 15  # 1 bit + one fp32 alpha per matrix vs 16 bits
    assert rep["total_ratio"] > 10


# ---------------------------------------------------------------------------------------------------
# Delta-CoMe


def test_delta_come_allocation_respects_budget():
    for out_f, in_f in [(384, 384), (1536, 384)]:
        alloc = allocate_ranks(DEFAULT_GROUPS, out_f, in_f, 1.0, 128, False)
        assert alloc[0] == (8, 2) and alloc[1] == (3, 4) and alloc[2][1] > 40
        mod = DeltaCoMeLinear(in_f, out_f, True, False, alloc, 128, False)
        stored = sum(t.numel() * t.element_size() for t in mod.compressed_tensors().values())
        assert 0.9 <= 8 * stored / (out_f * in_f) <= 1.0


def test_delta_come_low_rank_delta_is_nearly_exact_and_gptq_beats_rtn():
    bh, fh = _bert_pair(scale=0.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in match_linear_layers(fh.module, bh.module):
            u = torch.randn(layer.out_features, 8, generator=g)
            v = torch.randn(8, layer.in_features, generator=g)
            s = torch.tensor([4.0, 2.0, 1.0, 0.8, 0.6, 0.5, 0.4, 0.3])[None, :]
            layer.module.weight.add_(0.01 * (u * s) @ v / layer.in_features**0.5)
    x = example_inputs(fh, batch=4, seq_len=16, seed=9)
    ref = _out(fh, x)
    errs = {}
    for quantizer in ("gptq", "rtn"):
        cfg = DeltaCoMePass.Config(budget_bits=4.0, quantizer=quantizer, samples=8, batch_size=4, seq_len=16,
                                   groups=[{"bits": 8, "count": 2}, {"bits": 4, "count": -1}])
        out = DeltaCoMePass(cfg).apply(fh.copy(), _ctx(bh))
        errs[quantizer] = float((_out(out, x) - ref).pow(2).mean())
    delta_effect = float((_out(fh.replace_module(_revert_to_base(fh.module, bh.module)), x) - ref).pow(2).mean())
    assert errs["gptq"] < 0.01 * delta_effect
    assert errs["gptq"] <= errs["rtn"] * 1.05


def _revert_to_base(ft: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(ft)
    with torch.no_grad():
        for layer in match_linear_layers(m, base):
            layer.module.weight.copy_(layer.base_weight)
    return m


# ---------------------------------------------------------------------------------------------------
# DARE / DAREx


def test_dare_mask_from_seed_and_storage():
    bh, fh = _bert_pair()
    out = DarePass(DarePass.Config(p=0.9)).apply(fh.copy(), _ctx(bh))
    mods = [m for m in out.module.modules() if isinstance(m, DareLinear)]
    for m in mods:
        assert m.mask_mode == "seed"
        assert abs(m.n_kept / (m.in_features * m.out_features) - 0.1) < 0.03
        assert m.values.dtype == torch.float16 and float(m.rescale) == pytest.approx(10.0)
        assert torch.equal(random_keep_mask(int(m.seed), m.in_features * m.out_features, 0.9).sum(), torch.tensor(m.n_kept))
    rep = delta_size_report(out.module, bh.module)
    assert 8 < rep["linear_ratio"] < 12


def test_dare_p0_is_exact():
    bh, fh = _bert_pair(scale=0.1)
    out = DarePass(DarePass.Config(p=0.0, embeddings="keep")).apply(fh.copy(), _ctx(bh))
    x = example_inputs(fh, batch=2, seq_len=12)
    torch.testing.assert_close(_out(out, x), _out(fh, x), rtol=1e-3, atol=1e-4)  # fp16 values


def test_darex_beats_dare_at_p099_on_a_synthetic_dense_delta():
    """On a tiny random BERT whose delta is dense Gaussian noise (half the weights' mean magnitude), both
    DAREx-q modes halve DARE's output error at p = 0.99, scored on inputs the passes did not calibrate on.
    This is a property of that synthetic delta only: on the zoo's fine-tunes the analytic per-layer q is
    *worse* than DARE at every p and the unlabelled q is worse on the small delta (docs/delta.md)."""
    bh, fh = _bert_pair(scale=0.5)
    x = example_inputs(fh, batch=8, seq_len=16, seed=42)  # held out: the passes calibrate on other seeded draws
    ref = _out(fh, x)
    err = lambda h: float((_out(h, x) - ref).pow(2).mean())  # noqa: E731
    dare = err(DarePass(DarePass.Config(p=0.99)).apply(fh.copy(), _ctx(bh)))
    for mode in ("unlabelled", "analytic"):
        ctx = _ctx(bh)
        darex = DarexPass(DarexPass.Config(p=0.99, q_mode=mode, grid=8, samples=8, batch_size=4, seq_len=16)).apply(fh.copy(), ctx)
        assert err(darex) < 0.5 * dare, mode
    fixed = DarexPass(DarexPass.Config(p=0.99, q_mode="fixed", q=0.5, samples=4, batch_size=4, seq_len=16)).apply(fh.copy(), _ctx(bh))
    assert all(float(m.rescale) == 2.0 for m in fixed.module.modules() if isinstance(m, DareLinear))


def test_analytic_q_minimises_monte_carlo_output_change():
    g = torch.Generator().manual_seed(0)
    delta = 0.01 + 0.02 * torch.randn(16, 40, generator=g)  # non-zero mean: where DARE's 1/(1-p) overshoots
    X = torch.randn(64, 40, generator=g) + 0.5
    H = X.T.double() @ X.double() / 64
    p = 0.9
    q_star = analytic_q(delta, H, p)
    qs = np.linspace(1 - p, 1.0, 19)
    mse = np.zeros_like(qs)
    for s in range(200):
        keep = random_keep_mask(s, delta.numel(), p).reshape(delta.shape).float()
        for i, q in enumerate(qs):
            mse[i] += float(((X @ (keep * delta / q - delta).T) ** 2).mean())
    assert abs(qs[int(np.argmin(mse))] - q_star) <= 0.1


def test_importance_and_magnitude_pruning():
    bh, fh = _bert_pair(scale=0.5)
    for prune in ("magnitude", "importance"):
        out = DarexPass(DarexPass.Config(p=0.95, prune=prune, q_mode="fixed", q=1.0, samples=4, batch_size=4,
                                         seq_len=16)).apply(fh.copy(), _ctx(bh))
        for m in out.module.modules():
            if isinstance(m, DareLinear):
                assert m.mask_mode in ("indices", "bitmask")
                kept = m.sparse_delta()
                assert (kept != 0).sum() <= m.n_kept
        if prune == "magnitude":
            layer = match_linear_layers(fh.module, bh.module)[0]
            m = out.module.get_submodule(layer.name)
            thresh = layer.delta.abs().flatten().topk(m.n_kept).values.min()
            assert float(m.sparse_delta().abs().max()) >= float(thresh)
            assert int((m.sparse_delta().abs() >= thresh * 0.999).sum()) == m.n_kept


def test_labelled_mode_without_labels_is_a_user_error():
    bh, fh = _bert_pair()
    with pytest.raises(UserError):
        DarexPass(DarexPass.Config(p=0.9, q_mode="labelled", samples=4, batch_size=4, seq_len=16)).apply(fh.copy(), _ctx(bh))


# ---------------------------------------------------------------------------------------------------
# save / load, registry, errors


@pytest.mark.parametrize("name,cfg", [("bitdelta", {"steps": 0}), ("delta_come", {"samples": 4, "batch_size": 4, "seq_len": 16}),
                                      ("dare", {"p": 0.9}),
                                      ("darex", {"p": 0.95, "prune": "importance", "q_mode": "analytic", "samples": 4,
                                                 "batch_size": 4, "seq_len": 16})])
def test_save_load_roundtrip_and_base_refill(name, cfg):
    bh, fh = _bert_pair()
    cls = get_pass(name)
    assert cls.needs_base
    out = cls(cls.Config(**cfg)).apply(fh.copy(), _ctx(bh))
    x = example_inputs(fh, batch=2, seq_len=12)
    loaded = _roundtrip(out.module)
    torch.testing.assert_close(_out(out.replace_module(loaded), x), _out(out, x))
    # every DeltaLinear's `weight` is exactly the base's tensor (so the artifact can drop and refill it)
    base_state = bh.module.state_dict()
    for path, m in compressed_modules(out.module):
        assert torch.equal(m.weight, base_state[path.removeprefix("bert.") + ".weight"])


def test_missing_or_wrong_base_is_a_user_error():
    bh, fh = _bert_pair()
    with pytest.raises(UserError, match="base"):
        BitDeltaPass(BitDeltaPass.Config(steps=0)).apply(fh.copy(), Context(show_progress=False))
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    with pytest.raises(UserError, match="base"):
        BitDeltaPass(BitDeltaPass.Config(steps=0)).apply(fh.copy(), _ctx(ModelHandle(other, "encoder", "o", describe_architecture(other))))


# ---------------------------------------------------------------------------------------------------
# serving and the quantized base


@pytest.mark.parametrize("use_kernel", [True, False])
def test_multi_tenant_batch_matches_each_fine_tune(use_kernel):
    bh, _ = _bert_pair(seed=0)
    tenants = []
    for s in range(3):
        _, fh = _bert_pair(seed=0, scale=0.3)
        g = torch.Generator().manual_seed(100 + s)
        with torch.no_grad():  # three different fine-tunes of the same base
            for p in fh.module.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
        tenants.append(BitDeltaPass(BitDeltaPass.Config(steps=0)).apply(fh.copy(), _ctx(bh)))
    server = MultiTenantModel([t.module for t in tenants], use_kernel=use_kernel)
    ids, mask = example_inputs(tenants[0], batch=6, seq_len=10, seed=1)
    mask[1, 7:] = 0
    tenant_ids = torch.tensor([2, 0, 1, 0, 2, 2])
    with torch.no_grad():
        got = server(tenant_ids, input_ids=ids, attention_mask=mask).logits
        for b in range(6):
            ref = tenants[int(tenant_ids[b])].module(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
            torch.testing.assert_close(got[b:b + 1], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_base_on_cpu(mode):
    bh, fh = _bert_pair(exact_sign=0.02)
    out = BitDeltaPass(BitDeltaPass.Config(steps=0)).apply(fh.copy(), _ctx(bh))
    x = example_inputs(fh, batch=2, seq_len=12)
    ref = _out(out, x)
    m = copy.deepcopy(out.module)
    assert quantize_base(m, mode) == len(find_linear_layers(bh.module))
    got = _out(out.replace_module(m), x)
    assert 0 < float((got - ref).abs().max()) < 0.1 * float(ref.abs().max()) + 1e-3


# ---------------------------------------------------------------------------------------------------
# end to end: recipe -> artifact with only the delta -> load with the base (and the wrong base)


@pytest.mark.parametrize("pass_yaml", ["{type: bitdelta, steps: 2, batch_size: 2, seq_len: 8}",
                                       "{type: darex, p: 0.9, q_mode: analytic, samples: 4, batch_size: 2, seq_len: 8}"])
def test_recipe_artifact_stores_only_the_delta(tmp_path, pass_yaml):
    from modelpress.artifact import WEIGHTS, load_artifact, read_manifest
    from modelpress.model import save_checkpoint
    from modelpress.pipeline import run_recipe

    bh, fh = _bert_pair()
    save_checkpoint(bh, tmp_path / "base")
    save_checkpoint(fh, tmp_path / "ft")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tmp_path / 'ft'}\nbase: {tmp_path / 'base'}\ncalibration: {{dataset: random}}\n"
                      f"passes:\n  - {pass_yaml}\noutput: {tmp_path / 'out'}\n")
    out = run_recipe(recipe, export=False, evaluate=False, show_progress=False)
    manifest = read_manifest(out)
    (tmp_path / "out-eval").mkdir()
    report_out = run_recipe(recipe, evaluate=True, show_progress=False, output=tmp_path / "out-eval" / "r")
    delta = json.loads((report_out / "report.json").read_text())["delta"]  # the delta against the fp16 delta
    assert delta["total_bytes"] < delta["total_fp16_bytes"] and delta["linear_ratio"] > 8
    assert "fp16 delta of the same tensors" in (report_out / "report.md").read_text()
    # random calibration data is never silent: recorded in the manifest and warned about in the report
    assert manifest["inputs"]["calibration"] == {"dataset": "random", "random": True}
    assert "calibrated on random inputs" in (report_out / "report.md").read_text()
    assert "bert.encoder.layer.0.attention.self.query.weight" in manifest["from_base"]
    stored = manifest["tensors"]
    assert not any(k.endswith("query.weight") for k in stored)
    linear_fp32 = sum(4 * l.in_features * l.out_features for l in match_linear_layers(fh.module, bh.module))
    assert sum(v["bytes"] for k, v in stored.items() if ".encoder." in k and "LayerNorm" not in k
               and not k.endswith("bias")) < linear_fp32 / 8
    loaded = load_artifact(out, base=str(tmp_path / "base"))
    assert (out / WEIGHTS).exists()
    # the loaded artifact equals the pass's in-memory result (recomputed: passes are deterministic)
    import yaml

    cfg = yaml.safe_load(pass_yaml)
    cls = get_pass(cfg.pop("type"))
    in_memory = cls(cls.Config(**cfg)).apply(fh.copy(), _ctx(bh, seed=0))
    x = example_inputs(fh, batch=2, seq_len=8)
    torch.testing.assert_close(_out(loaded, x), _out(in_memory, x), rtol=1e-4, atol=1e-5)
    # wrong base: a different model of the same shape
    other, _ = _bert_pair(seed=5)
    save_checkpoint(other, tmp_path / "other")
    with pytest.raises(UserError, match="wrong base"):
        load_artifact(out, base=str(tmp_path / "other"))


def test_materialized_delta_model_computes_the_same_function():
    """Exporters get the rebuilt fine-tune: plain nn.Linear layers with weight W_base + delta."""
    from modelpress.modules import materialize

    bh, fh = _bert_pair(exact_sign=0.02)
    out = BitDeltaPass(BitDeltaPass.Config(steps=0)).apply(fh.copy(), _ctx(bh))
    plain = materialize(out.module)
    assert not any(isinstance(m, DeltaLinear) for m in plain.modules())
    x = example_inputs(fh, batch=2, seq_len=10)
    torch.testing.assert_close(_out(out.replace_module(plain), x), _out(out, x), rtol=1e-5, atol=1e-5)
