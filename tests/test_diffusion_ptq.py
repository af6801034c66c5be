"""Diffusion PTQ passes (ptq, ptq4dm, tfmq) and the bitsandbytes backend on tiny random UNets.

The tiny UNets have the structure of the zoo models (down / attention / up blocks with concatenated skips,
a time-embedding MLP, one time projection per residual block), so discovery, calibration, reconstruction,
storage and reload are exercised for real; image quality is measured in benchmarks/diffusion_ptq.py.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from modelpress.artifact import load_artifact, write_artifact
from modelpress.data import finite, register_prompt_encoder
from modelpress.model import ModelHandle, describe_architecture
from modelpress.passes import Context, get_pass
from modelpress.quant import surgery
from modelpress.quant.layers import QuantLinear
from modelpress.quant.timesteps import set_current_timesteps
from modelpress.quant.calibration import build_calibration_set, snap_to_schedule
from modelpress.sampling import ddim_sample, ddim_timesteps, scheduler_config

torch.set_num_threads(1)
STEPS = 8


def tiny_unet(seed: int = 0) -> ModelHandle:
    import diffusers as d
    torch.manual_seed(seed)
    m = d.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                      norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()
    return ModelHandle(m, "unet", "tiny", describe_architecture(m), {})


def tiny_cond_unet(seed: int = 0) -> ModelHandle:
    import diffusers as d
    torch.manual_seed(seed)
    m = d.UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                               block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                               attention_head_dim=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
    return ModelHandle(m, "unet-cond", "tiny-cond", describe_architecture(m), {"prompt_encoder": "tiny-test"})


def tiny_prompt_encoder(prompts: list[str]) -> torch.Tensor:
    """Embeddings [B, 3, 12] fixed by each prompt's text; the empty prompt is zeros."""
    out = []
    for p in prompts:
        g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
        out.append(torch.randn(3, 12, generator=g) if p else torch.zeros(3, 12))
    return torch.stack(out)


register_prompt_encoder("tiny-test", tiny_prompt_encoder)
TINY_PROMPTS = finite("tiny-prompts", {"prompt"}, prompts=[f"prompt number {i}" for i in range(8)])


def run_pass(name: str, handle: ModelHandle, seed: int = 0, **cfg) -> tuple[ModelHandle, dict]:
    P = get_pass(name)
    ctx = Context(seed=seed, data=TINY_PROMPTS, show_progress=False)
    opts = dict(samples=16, steps=STEPS, batch_size=16, recon_batch=8)
    opts.update(cfg)
    out = P(P.Config(**opts)).apply(handle.copy(), ctx)
    return out, ctx.log[name]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


PROBE_X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
PROBE_T = torch.tensor([ddim_timesteps({}, STEPS)[i] for i in (0, 2, 5, 7)])


def test_ndtc_calibration_maps_timesteps_onto_the_sampler_trajectory() -> None:
    h = tiny_unet()
    visited = ddim_timesteps({}, STEPS)  # 875, 750, ..., 0
    assert snap_to_schedule(torch.tensor([880.0, 10.0, 370.0]), visited).tolist() == [0, 7, 4]
    ctx = Context(seed=3, show_progress=False)
    cs = build_calibration_set(h, ctx, "test", "ndtc", 24, STEPS)
    assert set(cs.t.tolist()) <= set(visited)
    assert len({(i, s) for i, s in cs.ids}) == 24
    # x_t is the full-precision sampler's state when it calls the model at t (not forward-noised data)
    _, traj = ddim_sample(h.canonical(), scheduler_config(h), 24, steps=STEPS, seed=cs.seed, return_trajectory=True,
                          sample_shape=(1, 8, 8))
    for row, (i, s) in enumerate(cs.ids):
        assert traj[s][0] == int(cs.t[row])
        assert torch.equal(traj[s][1][i], cs.x[row])
    # NDTC centres t at 0.4 T: the mean is well below the uniform mean of the visited set
    many = build_calibration_set(h, ctx, "test", "ndtc", 120, STEPS)
    assert abs(many.t.float().mean().item() - 400) < 90
    rec = cs.record()
    assert rec["seed"] == cs.seed and len(rec["sample_ids"]) == 24 and rec["sampler"] == "ndtc"
    ek = build_calibration_set(h, ctx, "test", "every_k", 16, STEPS, interval=2)
    assert set(ek.t.tolist()) == {visited[s] for s in range(0, STEPS, 2)}
    st = build_calibration_set(h, ctx, "test", "single_t", 8, STEPS, single_t=0.5)
    assert set(st.t.tolist()) == {500}


def test_discovery_by_structure() -> None:
    from modelpress.quant.ptq import _probe_pair

    h = tiny_unet()
    cs = build_calibration_set(h, Context(seed=0, show_progress=False), "test", "uniform", 8, STEPS)
    fn = h.canonical()
    layers = surgery.quantizable_layers(h.module)
    tib = surgery.temporal_layers(h.module, lambda w: fn(*_probe_pair(cs, w)), layers)
    # the TIB is the time-embedding MLP and every residual block's time projection (names only checked here)
    expected = {n for n, _ in layers if n.startswith("time_embedding.") or n.endswith("time_emb_proj")}
    assert set(tib) == expected and len(expected) == 2 + 8
    splits = surgery.skip_concat_splits(h.module, lambda: fn(*_probe_pair(cs, 0)))
    assert splits == {"up_blocks.0.resnets.0": 16, "up_blocks.0.resnets.1": 16,
                      "up_blocks.1.resnets.0": 16, "up_blocks.1.resnets.1": 8}


@pytest.fixture(scope="module")
def w8a8() -> dict[str, tuple[ModelHandle, dict]]:
    h = tiny_unet()
    return {"ref": (h, {}), "ptq": run_pass("ptq", h), "ptq4dm": run_pass("ptq4dm", h, recon_iters=2)}


def test_w8a8_is_close_to_full_precision_and_deterministic(w8a8) -> None:
    h = w8a8["ref"][0]
    with torch.no_grad():
        ref = h.module(PROBE_X, PROBE_T).sample
        for name in ("ptq", "ptq4dm"):
            q = w8a8[name][0].module
            out = q(PROBE_X, PROBE_T).sample
            assert rel_err(out, ref) < 0.08, name
            assert torch.equal(out, q(PROBE_X, PROBE_T).sample)
    again, _ = run_pass("ptq4dm", h, recon_iters=2)
    with torch.no_grad():
        assert torch.equal(again.module(PROBE_X, PROBE_T).sample, w8a8["ptq4dm"][0].module(PROBE_X, PROBE_T).sample)
    log = w8a8["ptq4dm"][1]
    assert log["calibration"]["sampler"] == "ndtc" and len(log["calibration"]["sample_ids"]) == 16
    assert set(log["skip_splits"].values()) == {16, 8}
    # the min-max baseline gets the same 8-bit first and last layers as the methods it is compared with
    assert log["eight_bit_layers"] == w8a8["ptq"][1]["eight_bit_layers"] == ["conv_in", "conv_out"]
    assert len(log["quantized_attention"]) == 4


def test_qdrop_reconstruction_is_deterministic_and_off_at_inference(w8a8) -> None:
    h = w8a8["ref"][0]
    a, _ = run_pass("ptq4dm", h, recon_iters=4, recon_qdrop=0.5)
    b, _ = run_pass("ptq4dm", h, recon_iters=4, recon_qdrop=0.5)
    assert all(q._drop is None for q in surgery.act_quantizers(a.module))  # inference quantizes every value
    with torch.no_grad():
        out = a.module(PROBE_X, PROBE_T).sample
        assert torch.equal(out, b.module(PROBE_X, PROBE_T).sample)
        assert rel_err(out, h.module(PROBE_X, PROBE_T).sample) < 0.08


def test_seed_moves_the_whole_pipeline(w8a8) -> None:
    """A seed covers the calibration draw and the method's randomness, not only evaluation sampling."""
    h = w8a8["ref"][0]
    other, log = run_pass("ptq4dm", h, seed=1, recon_iters=2)
    assert log["calibration"]["sample_ids"] != w8a8["ptq4dm"][1]["calibration"]["sample_ids"]
    with torch.no_grad():
        assert not torch.equal(other.module(PROBE_X, PROBE_T).sample, w8a8["ptq4dm"][0].module(PROBE_X, PROBE_T).sample)


def test_ptq_models_are_refused_by_pte_with_a_clear_error(w8a8, tmp_path: Path) -> None:
    from modelpress.errors import UserError
    from modelpress.exporters import ExportSpec, export_model
    from modelpress.recipe import load_recipe

    with pytest.raises(UserError, match="XNNPACK's int8 kernels need symmetric weights") as err:
        export_model(w8a8["ptq"][0], ExportSpec(format="pte"), tmp_path)
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: digits-ddpm\npasses: [{type: ptq4dm}]\nexport: [onnx, pte]\n")
    with pytest.raises(UserError, match=r"export\[1\]: a model from pass 'ptq4dm' cannot be exported to pte"):
        load_recipe(recipe)


def test_artifact_roundtrip_is_exact_and_w4_is_small(tmp_path: Path) -> None:
    h = tiny_unet()
    q, log = run_pass("tfmq", h, w_bits=4, a_bits=8, recon_iters=3, maintenance="select")
    kinds = {type(m).__name__ for _, m in __import__("modelpress.modules", fromlist=["x"]).compressed_modules(q.module)}
    assert {"QuantConv2d", "QuantLinear", "QuantAttnProcessor", "TimestepTap"} <= kinds
    write_artifact(tmp_path / "a", q, pass_log={"tfmq": log})
    loaded = load_artifact(tmp_path / "a")
    with torch.no_grad():
        a = q.module(PROBE_X, PROBE_T).sample
        b = loaded.module(PROBE_X, PROBE_T).sample
    assert torch.equal(a, b)
    fp_bytes = 2 * sum(p.numel() for p in h.module.parameters())
    stored = sum(t.numel() * t.element_size() for t in loaded.module.state_dict().values())
    assert stored < 0.4 * fp_bytes  # 4-bit codes + scales (+ fp32 norms), well under fp16 even on a tiny model
    assert (tmp_path / "a" / "model.safetensors").stat().st_size < 2 * fp_bytes  # incl. the safetensors header
    conv = q.module.down_blocks[0].resnets[0].conv1
    assert conv.qweight.dtype == torch.uint8 and conv.qweight.numel() == conv.weight_codes().numel() // 2
    ex = conv.export_qparams()
    assert ex["weight_bits"] == 4 and ex["has_act_quant"] and ex["act_scale"].shape == (1, 1)
    shortcut = q.module.up_blocks[0].resnets[0].conv_shortcut
    assert shortcut.export_qparams()["act_split"] == 16


def test_tfmq_tiar_fsc_cache_and_selection() -> None:
    h = tiny_unet()
    q, log = run_pass("tfmq", h, w_bits=4, a_bits=8, recon_iters=4, maintenance="tib")
    assert log["tiar"]["iters"] == 4
    proj = q.module.down_blocks[0].resnets[0].time_emb_proj
    assert isinstance(proj, QuantLinear) and proj.act.n_timesteps == STEPS  # FSC: one range per t
    assert sorted(proj.act.timesteps.tolist()) == sorted(ddim_timesteps({}, STEPS))
    assert all(v["kept"] == "tib" for v in log["maintenance"].values())
    qc, logc = run_pass("tfmq", h, w_bits=4, a_bits=8, recon_iters=0, maintenance="cache")
    from modelpress.quant.tfmq import CachedTemporalFeature

    cached = qc.module.down_blocks[0].resnets[0].time_emb_proj
    assert isinstance(cached, CachedTemporalFeature)
    for v in logc["maintenance"].values():  # the 8-bit cache beats the 4-bit TIB on temporal features
        assert v["cache_error"] < v["tib_error"]
    # the cache reproduces the full-precision temporal feature of a timestep of the set
    t = torch.tensor([ddim_timesteps({}, STEPS)[3]])
    set_current_timesteps(t)
    with torch.no_grad():
        fp_mod = h.module.down_blocks[0].resnets[0]
        emb = h.module.time_embedding(h.module.time_proj(t))
        want = fp_mod.time_emb_proj(fp_mod.nonlinearity(emb))
        assert rel_err(cached(torch.zeros(1, 32)), want) < 0.02
    set_current_timesteps(None)


def test_unet_cond_tfmq_runs_and_quantizes_cross_attention() -> None:
    h = tiny_cond_unet()
    q, log = run_pass("tfmq", h, w_bits=8, a_bits=8, recon_iters=2, samples=8)
    x, t = PROBE_X, PROBE_T
    c = tiny_prompt_encoder(TINY_PROMPTS.all().prompts[:4])
    with torch.no_grad():
        ref = h.module(x, t, encoder_hidden_states=c).sample
        out = q.module(x, t, encoder_hidden_states=c).sample
    assert rel_err(out, ref) < 0.1
    assert any(p.endswith("attn2.processor") for p in log["quantized_attention"])
    assert not any("attn2.to_k" in n for n in log["temporal_information_block"])  # prompts vary in the probe


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bitsandbytes_cpu_backend(mode: str, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    lin = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    if mode == "int8":
        mod = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=0.0)
        mod.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        mod = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32)
        mod.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    mod.bias = torch.nn.Parameter(lin.bias.data.clone())
    mod = mod.to("cpu")  # quantizes on the CPU backend
    assert mod.weight.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert rel_err(mod(x), lin(x)) < (0.02 if mode == "int8" else 0.15)  # bitsandbytes' own modules on CPU

    h = tiny_unet()
    with torch.no_grad():
        ref = h.module(PROBE_X, PROBE_T).sample
    q = get_pass("bnb")(get_pass("bnb").Config(mode=mode)).apply(tiny_unet(), Context(show_progress=False))
    with torch.no_grad():
        out = q.module(PROBE_X, PROBE_T).sample
    assert rel_err(out, ref) < (0.02 if mode == "int8" else 0.3)
    write_artifact(tmp_path / mode, q)
    with torch.no_grad():
        assert torch.equal(load_artifact(tmp_path / mode).module(PROBE_X, PROBE_T).sample, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_canonical_call_feeds_a_half_precision_model_in_its_own_dtype(dtype) -> None:
    """Metrics, samplers and exports call models with fp32 samples and prompt embeddings; a bf16 / fp16 model
    gets them in its own dtype (integer timesteps as given) and answers in it."""
    for h, extra in ((tiny_unet(), ()), (tiny_cond_unet(), (torch.randn(4, 3, 12),))):
        ref = h.canonical()(PROBE_X, PROBE_T, *extra)
        h.module.to(dtype)
        with torch.no_grad():
            out = h.canonical()(PROBE_X, PROBE_T, *extra)
        assert out.dtype == dtype and rel_err(out.float(), ref) < 0.05



def test_reconstruction_spooled_to_disk_is_bit_identical_to_memory(tmp_path: Path) -> None:
    """A block's captured inputs and targets spooled to files and read back by minibatch give the same model, bit
    for bit, as keeping them in memory (TFMQ on a text-conditioned UNet: keyword inputs, tuple outputs, per-timestep
    ranges, QDrop's random draws); the files are removed after each block."""
    outs, logs = {}, {}
    for storage in ("memory", "disk"):
        scratch = tmp_path / storage
        scratch.mkdir()
        P = get_pass("tfmq")
        ctx = Context(seed=0, data=TINY_PROMPTS, show_progress=False, scratch=scratch)
        cfg = P.Config(samples=8, steps=4, interval=1, batch_size=8, recon_batch=4, recon_iters=2, recon_qdrop=0.5,
                       w_bits=4, recon_storage=storage)
        outs[storage] = P(cfg).apply(tiny_cond_unet().copy(), ctx).module.state_dict()
        logs[storage] = ctx.log["tfmq"]["reconstruction"]["units"]
        assert {u["storage"] for u in logs[storage].values()} == {storage}
        assert not any(scratch.iterdir()), "spool files left behind"
    assert outs["disk"].keys() == outs["memory"].keys()
    assert all(torch.equal(outs["disk"][k], v) for k, v in outs["memory"].items())
    assert [u["rec_loss_last"] for u in logs["disk"].values()] == [u["rec_loss_last"] for u in logs["memory"].values()]


def test_spool_reads_back_rows_and_auto_spools_what_exceeds_its_budget(tmp_path: Path) -> None:
    from modelpress.quant.spool import DiskRows, Spool, take_rows

    g = torch.Generator().manual_seed(0)
    batches = [((torch.randn(n, 3, 2, generator=g).to(torch.bfloat16), torch.arange(n)),
                {"scale": 0.5, "table": torch.ones(7), "none": None}) for n in (4, 4, 3)]
    want = torch.cat([b[0][0] for b in batches])
    small = sum(b[0][0].numel() * 2 + b[0][1].numel() * 8 + 7 * 4 for b in batches)
    for budget, storage in ((10 ** 9, "memory"), (small // 2, "disk")):
        s = Spool("auto", 11, tmp_path, budget=budget)
        for b in batches:
            s.add(b, b[0][0].shape[0])
        assert s.storage == storage and s.bytes == small - 3 * 7 * 4  # the unbatched table is not counted
        got = s.result()
        assert isinstance(got[0][0], DiskRows) == (storage == "disk")
        idx = torch.tensor([10, 0, 5, 5, 8])
        rows = take_rows(got, idx, 11)
        assert torch.equal(rows[0][0], want[idx]) and rows[0][0].dtype == torch.bfloat16
        assert torch.equal(rows[0][1], torch.cat([torch.arange(4), torch.arange(4), torch.arange(3)])[idx])
        assert rows[1]["scale"] == 0.5 and rows[1]["none"] is None and torch.equal(rows[1]["table"], torch.ones(7))
        s.close()
    assert not any(tmp_path.iterdir())


def test_calibrating_layers_and_range_search_follow_the_device() -> None:
    """The engine moves the models to the run's device (``device: cuda``; no GPU here, so the meta device stands
    in): a calibrating layer's float weight and rounding variables (plain attributes) follow its buffers, the range
    search, the QDrop draw and a temporal-feature cache compute where their inputs are."""
    from modelpress.quant.ranges import search_qparams
    from modelpress.quant.tfmq import CachedTemporalFeature

    s, z = search_qparams(torch.randn(2, 10, device="meta"), 8, False, "lp")
    assert s.device.type == z.device.type == "meta"
    lin = QuantLinear.from_float(torch.nn.Linear(4, 3), w_bits=4, w_symmetric=False, act_bits=8)
    lin.init_weight_qparams("minmax")
    lin.round_logits = lin.init_adaround().detach()
    lin.act.drop_quantization(0.5, torch.Generator().manual_seed(0))
    lin.to("meta")
    assert lin.fp_weight.device.type == lin.round_logits.device.type == "meta"
    assert lin(torch.randn(2, 4, device="meta")).device.type == "meta"
    cache = CachedTemporalFeature.from_features(torch.tensor([1, 5]), torch.randn(2, 6), 8)
    assert cache.table().device.type == "cpu" and cache.to("meta").table().device.type == "meta"
