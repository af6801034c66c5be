"""APTP prompt-routed pruning: gates, MACs, slicing, router losses, the APTPModel artifact and the pass.

Everything runs on a tiny randomly initialised UNet2DConditionModel (8x8, two stages) and synthetic
clustered "prompt embeddings", so the file takes seconds; the digits-t2i quality run is benchmarks/aptp.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.model import ModelHandle, canonical_module, describe_architecture
from modelpress.passes import Context, get_pass
from modelpress.prune import aptp
from modelpress.prune.gates import ALL_UNIT_KINDS, UNIT_KINDS, GatedUNet, count_macs, find_units
from modelpress.prune.slicing import SkippedBlock, kept_groups, slice_unet

TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=[16, 32],
            norm_num_groups=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=24, attention_head_dim=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # noqa: ANN202 - the machine is shared: one thread is faster than two contended ones
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_unet(seed: int = 0) -> nn.Module:
    import diffusers
    torch.manual_seed(seed)
    u = diffusers.UNet2DConditionModel.from_config(TINY).eval()
    with torch.no_grad():
        for p in u.parameters():  # random weights well away from zero-init so every path matters
            p.normal_(0, 0.15)
    return u


def example(b: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 1, 8, 8, generator=g), torch.tensor([10, 500, 900, 3, 77, 250][:b]), \
        torch.randn(b, 5, 24, generator=g)


def synthetic_data(n_prompts: int = 64) -> aptp.PromptImageData:
    """Four clusters of prompt embeddings (3 real tokens + 2 zero padding rows) and images per label."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 24, generator=g) * 2
    plab = torch.arange(n_prompts) % 4
    ehs = torch.zeros(n_prompts, 5, 24)
    ehs[:, :3] = centers[plab].unsqueeze(1) + 0.3 * torch.randn(n_prompts, 3, 24, generator=g)
    imgs = torch.randn(40, 1, 8, 8, generator=g).clamp(-1, 1)
    empty = torch.zeros(1, 5, 24)
    empty[0, :2] = torch.randn(2, 24, generator=g)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    return aptp.PromptImageData(imgs, torch.arange(40) % 4, ehs, plab, empty, ab)


def random_kept_gates(gated: GatedUNet, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = (torch.rand(gated.n_gates, generator=g) > 0.4).float()
    gates = torch.zeros_like(raw)
    for i, keep in enumerate(kept_groups(raw, gated.units)):
        gates[[gated.offsets[i] + k for k in keep]] = 1.0
    return gates


# ---------------------------------------------------------------------------------------------------
# Gates, MACs and slicing

def test_units_found_by_structure() -> None:
    units = find_units(tiny_unet())
    kinds = [u.kind for u in units]
    assert kinds.count("resnet") == 8 and kinds.count("heads") == 8 and kinds.count("ff") == 4
    res = [u for u in units if u.kind == "resnet"]
    assert all(u.n_groups == 4 for u in res)  # one gate per GroupNorm group of norm2
    heads = [u for u in units if u.kind == "heads"]
    assert all(u.n_groups == 4 and u.group_size == 8 for u in heads)


def test_count_macs_matches_hand_count() -> None:
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    macs = count_macs(m, torch.zeros(4, 3, 5, 5))
    assert macs == 8 * 25 * 3 * 9 + 200 * 10


@pytest.mark.parametrize("seed,kinds", [(0, UNIT_KINDS), (1, UNIT_KINDS), (2, ALL_UNIT_KINDS), (3, ALL_UNIT_KINDS)])
def test_sliced_unet_equals_gated_unet_and_macs_are_exact(seed: int, kinds: tuple[str, ...]) -> None:
    unet = tiny_unet()
    x, t, e = example()
    gated = GatedUNet(unet, (x, t, e), kinds)
    gates = random_kept_gates(gated, seed)
    blocks = [i for i, u in enumerate(gated.units) if u.kind == "block"]
    if blocks:  # remove one whole transformer block, keep another
        gates[gated.offsets[blocks[0]]], gates[gated.offsets[blocks[1]]] = 0.0, 1.0
    with torch.no_grad():
        y_gated = gated(x, t, e, gates=gates)
        y_full = unet(x, t, encoder_hidden_states=e).sample
        sliced = slice_unet(unet, gated.units, gates)
        y_sliced = sliced(x, t, encoder_hidden_states=e).sample
    assert (y_gated - y_full).abs().max() > 1e-2  # the gates do something
    torch.testing.assert_close(y_sliced, y_gated, atol=1e-5, rtol=1e-4)
    # the analytic MACs of the gate setting equal the counted MACs of the physically smaller UNet
    counted = count_macs(canonical_module(sliced, "unet-cond"), x, t, e)
    assert abs(counted - float(gated.macs(gates))) < 1e-6 * counted
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in unet.parameters())
    assert any(isinstance(m, SkippedBlock) for m in sliced.modules()) == bool(blocks)
    assert float(gated.macs(torch.ones(gated.n_gates))) == pytest.approx(gated.total_macs)


def test_per_sample_gates_apply_row_by_row() -> None:
    unet = tiny_unet()
    x, t, e = example()
    gated = GatedUNet(unet, (x, t, e))
    g = torch.stack([random_kept_gates(gated, s) for s in range(3)])
    with torch.no_grad():
        batched = gated(x, t, e, gates=g)
        for i in range(3):
            row = gated(x[i:i + 1], t[i:i + 1], e[i:i + 1], gates=g[i])
            torch.testing.assert_close(batched[i:i + 1], row, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gated(x, t, e), unet(x, t, encoder_hidden_states=e).sample)  # reset


# ---------------------------------------------------------------------------------------------------
# Router pieces against numpy references

def _np_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    q = np.exp(scores / eps).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(1, keepdims=True) / k
        q = q / q.sum(0, keepdims=True) / b
    return (q * b).T


def test_sinkhorn_matches_numpy_and_balances() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, (32, 4))
    scores[:, 0] += 1.5  # every sample prefers code 0
    q = aptp.sinkhorn(torch.tensor(scores, dtype=torch.float32), 0.05, 3)
    np.testing.assert_allclose(q.numpy(), _np_sinkhorn(scores, 0.05, 3), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(q.sum(1).numpy(), 1.0, rtol=1e-5)
    greedy = np.bincount(scores.argmax(1), minlength=4)
    balanced = np.bincount(q.argmax(1).numpy(), minlength=4)
    assert greedy[0] > 24 and balanced.max() <= 12 and (balanced > 0).all()


def test_contrastive_loss_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    e, a = rng.normal(size=(6, 10)), rng.normal(size=(6, 7))

    def softmax_cos(v: np.ndarray, tau: float) -> np.ndarray:
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        s = v @ v.T / tau
        s = np.exp(s - s.max(1, keepdims=True))
        return s / s.sum(1, keepdims=True)

    p, q = softmax_cos(a, 0.03), softmax_cos(e, 0.03)
    p = np.clip(p, 1e-7, 1 - 1e-7)
    ref = -(q * np.log(p) + (1 - q) * np.log(1 - p)).mean()
    got = aptp.contrastive_loss(torch.tensor(e, dtype=torch.float64), torch.tensor(a, dtype=torch.float64), 0.03)
    assert float(got) == pytest.approx(ref, rel=1e-6)
    # identical similarity structure gives a lower loss than a shuffled one
    same = aptp.contrastive_loss(torch.tensor(e), torch.tensor(e), 0.03)
    assert float(same) < float(got)


def test_gumbel_sigmoid_straight_through_and_nonempty_units() -> None:
    unet = tiny_unet()
    units = find_units(unet)
    n = sum(u.n_groups for u in units)
    logits = torch.full((2, n), -20.0, requires_grad=True)  # everything off
    hard = aptp.hard_gates(aptp.gumbel_sigmoid(logits, 0.4, 3.0, torch.Generator().manual_seed(0)), units)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    start = 0
    for u in units:
        assert (hard[:, start:start + u.n_groups].sum(-1) >= 1).all()
        start += u.n_groups
    hard.sum().backward()
    assert logits.grad is not None  # the straight-through path reaches the logits
    assert aptp.resource_loss(torch.tensor(0.3), 0.6) == pytest.approx(abs(np.log(0.5)))


def test_pool_prompt_embedding_ignores_padding() -> None:
    ehs = torch.zeros(1, 4, 3)
    ehs[0, 0] = torch.tensor([1.0, 2.0, 3.0])
    ehs[0, 1] = torch.tensor([3.0, 2.0, 1.0])
    torch.testing.assert_close(aptp.pool_prompt_embedding(ehs), torch.tensor([[2.0, 2.0, 2.0]]))


# ---------------------------------------------------------------------------------------------------
# The whole procedure, the APTPModel and its artifact

SMALL = dict(router_steps=8, warmup_fraction=0.25, finetune_steps=2, batch_size=8, target_macs=0.5,
             threads=1, router_lr=0.05)


@pytest.fixture(scope="module")
def built() -> tuple[aptp.APTPModel, dict, nn.Module, aptp.PromptImageData]:
    unet, data = tiny_unet(), synthetic_data()
    cfg = get_pass("aptp").Config(codes=3, units=list(ALL_UNIT_KINDS), **SMALL)
    model, log = aptp.build_aptp(unet, data, 3, cfg, Context(seed=0, show_progress=False))
    return model, log, unet, data


def test_build_aptp_log_and_structure(built) -> None:  # noqa: ANN001
    model, log, unet, data = built
    assert model.n_codes == 3 and len(log["code_macs_ratio"]) == 3
    assert sum(log["train_prompt_counts"]) == len(data.ehs)
    assert min(log["train_prompt_counts"]) >= 0.25 * len(data.ehs) / 3  # dead codes re-seeded (min_code_share)
    assert log["router"]["code_usage"][-1]["step"] == SMALL["router_steps"]
    assert log["router"]["first"]["macs_ratio"] > log["router"]["last"]["macs_ratio"]  # the budget bites
    for c, ratio in enumerate(log["code_macs_ratio"]):
        counted = count_macs(canonical_module(model.experts[c], "unet-cond"), *example())
        assert counted / log["total_macs"] == pytest.approx(ratio, rel=1e-4)
    assert all(p.requires_grad for p in unet.parameters())  # the input UNet's flags are restored


def test_aptp_forward_buckets_rows_by_code(built) -> None:  # noqa: ANN001
    model, _, _, data = built
    x, t, _ = example(6)
    e = data.ehs[:6]
    codes = torch.tensor([0, 2, 1, 0, 2, 1])
    with torch.no_grad():
        out = model(x, t, e, codes=codes).sample
        for i in range(6):
            y = model.experts[int(codes[i])](x[i:i + 1], t[i:i + 1], encoder_hidden_states=e[i:i + 1]).sample
            torch.testing.assert_close(out[i:i + 1], y, atol=1e-5, rtol=1e-4)
        routed = model(x, t, e).sample  # canonical call: routed by the conditioning itself
        torch.testing.assert_close(routed, model(x, t, e, codes=model.route(e)).sample)


def test_cfg_batch_runs_uncond_on_the_prompts_code(built) -> None:  # noqa: ANN001
    model, _, _, data = built
    cond = data.ehs[:4]
    uncond = data.empty.expand(4, -1, -1)
    codes = model.route(torch.cat([uncond, cond]))
    assert torch.equal(codes[:4], codes[4:]) and torch.equal(codes[4:], model.route(cond))


def test_module_config_roundtrip(built) -> None:  # noqa: ANN001
    model, _, _, data = built
    cfg = json.loads(json.dumps(model.module_config()))
    fresh = aptp.APTPModel.from_module_config(cfg)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict())
    x, t, _ = example(4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, data.ehs[:4]).sample, model(x, t, data.ehs[:4]).sample)


def test_artifact_roundtrip(built, tmp_path) -> None:  # noqa: ANN001
    from modelpress.artifact import load_artifact, write_artifact

    model, _, unet, data = built
    handle = ModelHandle(model, "unet-cond", "test", describe_architecture(unet))
    write_artifact(tmp_path / "a", handle)
    loaded = load_artifact(tmp_path / "a")
    assert type(loaded.module).__name__ == "APTPModel"
    x, t, _ = example(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.canonical()(x, t, data.ehs[:4]), model(x, t, data.ehs[:4]).sample)


def test_pass_rejects_bad_config_and_model() -> None:
    from pydantic import ValidationError

    from modelpress.errors import UserError

    cls = get_pass("aptp")
    with pytest.raises(ValidationError):
        cls.Config(target_macs=1.5)
    with pytest.raises(ValidationError):
        cls.Config(codes=0)
    with pytest.raises(ValidationError):
        cls.Config(unknown_field=1)
    handle = ModelHandle(nn.Linear(2, 2), "unet", "x", {"library": "torch", "class": "Linear", "config": {}})
    with pytest.raises(UserError):
        cls(cls.Config()).apply(handle, Context())
    assert get_pass("static_prune").Config().target_macs == 0.6


def test_split_in_two_separates_clusters_and_refuses_identical_rows() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([1.0, 0, 0]) + 0.1 * torch.rand(5, 3, generator=g),
                   torch.tensor([0, 1.0, 0]) + 0.1 * torch.rand(7, 3, generator=g)])
    halves = aptp._split_in_two(torch.nn.functional.normalize(x, dim=-1))
    assert halves is not None
    assert sorted(sorted(h.tolist()) for h in halves) == [list(range(5)), list(range(5, 12))]
    assert aptp._split_in_two(torch.ones(6, 3) / 3 ** 0.5) is None
    assert aptp._split_in_two(torch.ones(1, 3)) is None


def test_dead_code_is_reseeded_from_the_most_used_code(built) -> None:  # noqa: ANN001
    """Two codes with the same logits: the second never wins the cosine snapping (a dead code, as seen on
    digits-t2i); the usage check splits the most used code so that every code gets its share again."""
    model, _, unet, data = built
    units = model.units
    cfg = get_pass("aptp").Config(codes=3, min_code_share=0.25, **SMALL)
    logits = model.router(data.pooled).detach()
    codes = nn.Parameter(torch.stack([logits[:32].mean(0), logits[:32].mean(0), logits[32:].mean(0)]))
    before, _ = aptp.route_by_codes(model.router, codes.data, data.pooled, units, cfg)
    assert torch.bincount(before, minlength=3)[1] == 0
    opt = torch.optim.Adam([codes], lr=0.1)
    codes.sum().backward()
    opt.step()
    record = aptp._check_code_usage(model.router, codes, data.pooled, units, cfg, opt, step=5)
    assert record["counts"][1] == 0 and record["revived"]
    after, _ = aptp.route_by_codes(model.router, codes.data, data.pooled, units, cfg)
    assert record["counts_after"] == torch.bincount(after, minlength=3).tolist()
    assert min(record["counts_after"]) >= 0.25 * len(data.pooled) / 3
    for code in record["revived"]:
        assert float(opt.state[codes]["exp_avg"][code].abs().sum()) == 0.0
    off = get_pass("aptp").Config(codes=3, min_code_share=0.0, **SMALL)
    codes.data[1] = codes.data[0]
    assert not aptp._check_code_usage(model.router, codes, data.pooled, units, off, opt, step=5)["revived"]


def test_context_warning_reaches_manifest_and_report(capsys) -> None:  # noqa: ANN001
    from modelpress.metrics.report import _pass_warnings

    ctx = Context(show_progress=False)
    ctx.warn("aptp", "code 3 receives none of the training prompts")
    assert ctx.log["aptp"]["warnings"] == ["code 3 receives none of the training prompts"]
    assert "warning: aptp: code 3" in capsys.readouterr().err
    manifest = json.loads(json.dumps({"passes": ctx.log}))  # as written into and read from the artifact
    assert _pass_warnings(manifest) == ["aptp: code 3 receives none of the training prompts"]


def test_static_prune_is_one_code() -> None:
    unet, data = tiny_unet(), synthetic_data()
    cfg = get_pass("static_prune").Config(**{**SMALL, "router_steps": 4, "finetune_steps": 1})
    model, log = aptp.build_aptp(unet, data, 1, cfg, Context(seed=0, show_progress=False), use_contrastive=False)
    assert model.n_codes == 1 and log["train_prompt_counts"] == [len(data.ehs)]
    assert log["router"]["last"]["contrastive"] == 0.0


def test_deterministic_given_seed(built) -> None:  # noqa: ANN001
    a, la, unet, data = built
    cfg = get_pass("aptp").Config(codes=3, units=list(ALL_UNIT_KINDS), **SMALL)
    b, lb = aptp.build_aptp(unet, data, 3, cfg, Context(seed=0, show_progress=False))
    assert la["kept_groups"] == lb["kept_groups"]
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


def test_generate_routes_and_buckets(built) -> None:  # noqa: ANN001
    model, _, _, data = built
    sched = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    images, codes = aptp.generate(model, data.ehs[:6], sched, steps=2, seed=0, guidance_scale=2.0,
                                  uncond=data.empty)
    assert images.shape == (6, 1, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(codes, model.route(data.ehs[:6]))
    # the same prompts through the canonical call (routing by the conditioning, CFG-aware) give the same images
    from modelpress.sampling import ddim_sample

    canon = ddim_sample(canonical_module(model, "unet-cond"), sched, 6, 2, 0, cond=data.ehs[:6], uncond=data.empty,
                        guidance_scale=2.0, sample_shape=(1, 8, 8))
    torch.testing.assert_close(canon, images, atol=1e-5, rtol=1e-4)


def test_recipe_end_to_end_on_a_checkpoint(tmp_path) -> None:  # noqa: ANN001
    """The ``aptp`` pass through the pipeline on a small 16x16 UNet conditioned on MiniLM embeddings (real digits
    images and prompts): artifact written, loaded back as an APTPModel, canonical outputs identical."""
    from modelpress.artifact import load_artifact, read_manifest
    from modelpress.model import save_checkpoint
    from modelpress.pipeline import run
    from modelpress.recipe import parse_recipe

    import diffusers
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config({**TINY, "sample_size": 16, "cross_attention_dim": 384}).eval()
    save_checkpoint(ModelHandle(unet, "unet-cond", "tiny", describe_architecture(unet)), tmp_path / "ckpt")
    # the user's UNet names its prompt encoder; it trains on the zoo's prompt-image pairs
    raw = {"model": {"source": str(tmp_path / "ckpt"), "prompt_encoder": "minilm-tokens"}, "seed": 0,
           "calibration": {"dataset": "digits-prompts/train"}, "output": str(tmp_path / "out"),
           "passes": [{"type": "aptp", "codes": 2, "router_steps": 3, "finetune_steps": 1, "batch_size": 4,
                       "prompt_pool": 16, "threads": 1}]}
    out = run(parse_recipe(raw, "test"), export=False, evaluate=False, show_progress=False)
    manifest = read_manifest(out)
    assert manifest["compressed_modules"][0]["path"] == "" and manifest["compressed_modules"][0]["class"] == "APTPModel"
    assert manifest["passes"]["aptp"]["codes"] == 2
    loaded = load_artifact(out)
    assert type(loaded.module).__name__ == "APTPModel" and loaded.module.n_codes == 2
    g = torch.Generator().manual_seed(0)
    x, t, e = torch.randn(4, 1, 16, 16, generator=g), torch.tensor([1, 200, 400, 999]), torch.randn(4, 16, 384, generator=g)
    with torch.no_grad():
        y = loaded.canonical()(x, t, e)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_digits_training_data_pairs_printed_prompts_with_their_glyph() -> None:
    from modelpress import zoo
    from modelpress.sources import load_dataset
    from modelpress.zoo import digits

    printed, plain = zoo.load("digits-t2i-printed"), zoo.load("digits-t2i")
    prompts = load_dataset(None, printed, "calibration")
    data = aptp.training_data(printed, prompts, 40, 0)
    printed = torch.nonzero(data.prompt_labels >= digits.PRINTED).flatten()
    assert len(printed) == 12
    x0, _, _ = data.batch(8, torch.Generator().manual_seed(0), subset=printed)
    glyphs = digits.printed_glyphs()
    assert all(any(torch.equal(x, glyph) for glyph in glyphs) for x in x0)
    assert torch.equal(aptp.training_data(plain, prompts, 40, 0).prompt_labels, digits.digit_prompts(40, 0, "train")[1])


def test_routing_mix_counts_prompts_per_code_and_weights_their_macs(built) -> None:  # noqa: ANN001
    """The report's 'on the evaluation prompts' line: prompts per code and their mean MACs ratio."""
    from modelpress.metrics.report import _routing_on_evaluation

    model, log, _, data = built
    mix = model.routing_mix(data.ehs[:12])
    codes = model.route(data.ehs[:12])
    assert mix["prompts_per_code"] == torch.bincount(codes, minlength=3).tolist()
    expected = sum(log["code_macs_ratio"][int(c)] for c in codes) / 12
    assert mix["macs_ratio"] == pytest.approx(expected, abs=1e-5)
    report = {"metrics": {"prompt_agreement": {"details": {"routing": mix}}, "size": {"details": {}}}}
    (line,) = _routing_on_evaluation(report)
    assert f"{mix['macs_ratio']:.3f} of the unpruned UNet's MACs" in line and "12 prompts" in line
