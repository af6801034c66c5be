"""EvoPress: level database, SparseGPT, mutation, selection, baselines and the ``evopress`` pass."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modelpress.errors import UserError
from modelpress.model import ModelHandle, describe_architecture, example_inputs
from modelpress.passes import Context, get_pass
from modelpress.data import random_dataset
from modelpress.data.capture import collect_hessians
from modelpress.prune.sparsegpt import layer_output_error, magnitude_prune, sparsegpt_prune
from modelpress.search import baselines
from modelpress.search.evopress import EvoPressPass, evolve, load_level_map
from modelpress.search.space import SearchSpace, calibration_pool, target_size
from modelpress.search.levels import (DroppedBlock, LevelDatabase, LevelSpec, LevelSwitcher, build_database,
                                      find_layers, search_units)

torch.set_num_threads(1)


def tiny_classifier(layers: int = 3, seed: int = 0) -> ModelHandle:
    import transformers

    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, num_labels=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    m = transformers.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # peaked class distributions, so KLs are far from rounding noise
        m.classifier.weight.mul_(40)
    return ModelHandle(m, "classifier", "tiny", describe_architecture(m))


def tiny_unet() -> ModelHandle:
    import diffusers
    torch.manual_seed(0)
    m = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                              block_out_channels=(8, 16), norm_num_groups=4,
                              down_block_types=("DownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    return ModelHandle(m, "unet", "tiny-unet", describe_architecture(m))


def fast_config(**kw) -> EvoPressPass.Config:
    base = dict(generations=4, offspring=4, survivors=[2, 1], stage_samples=[8, 16], calibration_samples=32,
                hessian_samples=16, baseline_samples=8, batch_size=16)
    base.update(kw)
    return EvoPressPass.Config(**base)


# ---------------------------------------------------------------------------------------------------
# SparseGPT against a plain numpy reference


def numpy_sparsegpt(W: np.ndarray, H: np.ndarray, sparsity: float, percdamp: float = 0.01) -> np.ndarray:
    """Reference: one mask over the whole matrix (blocksize = cols), then the column-by-column OBS update
    with the explicit inverse Hessian of the remaining columns (no Cholesky trick)."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64) + percdamp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    Hinv_full = np.linalg.inv(H)
    U = np.linalg.cholesky(Hinv_full).T  # upper factor: U^T U = H^-1
    sal = W ** 2 / np.diag(U)[None, :] ** 2
    k = int(W.size * sparsity)
    prune = np.zeros(W.size, dtype=bool)
    prune[np.argsort(sal.ravel(), kind="stable")[:k]] = True
    prune = prune.reshape(W.shape)
    cols = W.shape[1]
    for j in range(cols):
        # inverse Hessian of the columns j.. after eliminating the earlier ones (OBS, eq. 3)
        Hj = np.linalg.inv(H[j:, j:])
        q = np.where(prune[:, j], 0.0, W[:, j])
        err = (W[:, j] - q) / Hj[0, 0]
        W[:, j:] -= np.outer(err, Hj[0, :])
        W[:, j] = q
    return W


def test_sparsegpt_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, generator=g)
    X = torch.randn(200, 10, generator=g) @ torch.randn(10, 10, generator=g)
    H = 2 * X.T.double() @ X.double() / 200
    ours = sparsegpt_prune(W, H, 0.5, blocksize=10)
    ref = numpy_sparsegpt(W.numpy(), H.numpy(), 0.5)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_sparsegpt_exact_sparsity_and_better_than_magnitude():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 64, generator=g)
    scales = torch.rand(64, generator=g) * 3 + 0.1  # uneven, correlated inputs
    X = (torch.randn(512, 64, generator=g) @ (torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g))) * scales
    H = 2 * X.T.double() @ X.double() / 512
    for s in (0.3, 0.5, 0.7):
        sg = sparsegpt_prune(W, H, s, blocksize=16)
        mag = magnitude_prune(W, s)
        assert int((sg == 0).sum()) == int((mag == 0).sum()) == int(W.numel() * s)
        assert layer_output_error(W, sg, H) < 0.8 * layer_output_error(W, mag, H)
    assert torch.equal(sparsegpt_prune(W, H, 0.0), W)


def test_hessians_of_linear_and_conv_layers():
    lin = torch.nn.Linear(5, 3)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    model = torch.nn.ModuleDict({"lin": lin, "conv": conv})
    x = torch.randn(7, 5)
    img = torch.randn(2, 2, 4, 4)
    H = collect_hessians(model, ["lin", "conv"], lambda: (lin(x[:3]), lin(x[3:]), conv(img)))
    torch.testing.assert_close(H["lin"], 2 * x.double().T @ x.double() / 7)
    cols = torch.nn.functional.unfold(img, 3, padding=1).transpose(1, 2).reshape(-1, 18).double()
    torch.testing.assert_close(H["conv"], 2 * cols.T @ cols / cols.shape[0])



def test_database_hessians_come_block_by_block_without_padding():
    """EvoPress' GPTQ / SparseGPT levels of a transformer take the dense model's input Hessians one block at a
    time (activations propagated through the blocks): each equals the whole model's forward with padding tokens
    left out (data.capture.model_hessians), bit for bit, and only one block's are held at once."""
    from modelpress.activations import hessians_block_by_block
    from modelpress.data.capture import model_hessians

    h = tiny_classifier(layers=2)
    units, _ = search_units(h.module, "bits")
    ids = torch.randint(5, 120, (6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, 7:] = 0
    batches = [(ids[:3], mask[:3]), (ids[3:], mask[3:])]
    groups = list(hessians_block_by_block(h, units, batches))
    assert [sorted(g) for g in groups] == [sorted(u for u in units if f".layer.{i}." in u) for i in range(2)]
    want = model_hessians(h, units, batches, scale=2.0)
    assert all(torch.equal(H, want[name]) for g in groups for name, H in g.items())
    with torch.no_grad():  # what the database took before: every row, the padding tokens' too
        counted = collect_hessians(h.module, units, lambda: [h.canonical()(*b) for b in batches])
    assert not torch.allclose(counted[units[0]], want[units[0]])


# ---------------------------------------------------------------------------------------------------
# Levels and the database


def test_level_spec_orders_and_validates():
    assert LevelSpec.make("bits").values == (2, 3, 4, 5, 6, 7, 8)
    sp = LevelSpec.make("sparsity", "magnitude", [0.5, 0.0, 0.25])
    assert sp.values == (0.5, 0.25, 0.0) and sp.sizes == (0.5, 0.75, 1.0) and sp.evenly_spaced
    assert LevelSpec.make("drop").sizes == (0.0, 1.0)
    assert not LevelSpec.make("bits", "rtn", [2, 3, 8]).evenly_spaced
    for bad in (dict(family="bits", method="sparsegpt"), dict(family="bits", levels=[2.5, 4]),
                dict(family="sparsity", levels=[0.5, 1.0]), dict(family="prune")):
        with pytest.raises(UserError):
            LevelSpec.make(**bad)


def test_units_of_bert_and_unet():
    h = tiny_classifier(layers=3)
    names, weights = search_units(h.module, "sparsity")
    assert len(names) == 18 and all(n.startswith("bert.encoder.layer.") for n in names)
    assert sorted(set(weights)) == [32 * 32, 32 * 64]
    assert search_units(h.module, "drop") == ([f"bert.encoder.layer.{i}" for i in range(3)], [1, 1, 1])
    u = tiny_unet()
    layers = find_layers(u.module)
    assert "conv_in" not in layers and "conv_out" not in layers and any("resnets" in n for n in layers)
    with pytest.raises(UserError):
        search_units(u.module, "drop")


def test_database_files_lazy_reads_and_minimal_swaps(tmp_path: Path):
    h = tiny_classifier(layers=2)
    spec = LevelSpec.make("bits", "rtn", [2, 3, 4])
    units, _ = search_units(h.module, "bits")
    db = build_database(tmp_path / "db", h.module, spec, units, None, {})
    files = sorted(p.relative_to(tmp_path / "db").as_posix() for p in (tmp_path / "db").rglob("*.safetensors"))
    assert len(files) == len(units) * 3 and f"{units[0]}/b3.safetensors" in files
    mtime = (tmp_path / "db" / "index.json").stat().st_mtime_ns
    db = build_database(tmp_path / "db", h.module, spec, units, None, {})  # reused, not rebuilt
    assert (tmp_path / "db" / "index.json").stat().st_mtime_ns == mtime
    assert LevelDatabase.open(tmp_path / "db").spec == spec

    original = h.module.get_submodule(units[0]).weight.detach().clone()
    sw = LevelSwitcher(h.module, spec, units, db)
    assert db.reads == 0  # nothing read before it is used
    assert sw.apply([1] * len(units)) == len(units)
    assert db.reads == len(units)
    w3 = h.module.get_submodule(units[0]).weight
    assert len(torch.unique(w3[0, :32])) <= 8  # a 3-bit grid per row group
    new = [1] * len(units)
    new[2], new[5] = 0, 2
    assert sw.apply(new) == 2 and db.reads == len(units) + 2
    assert sw.apply(new) == 0
    sw.apply([None] * len(units))
    torch.testing.assert_close(h.module.get_submodule(units[0]).weight, original)


def test_dropped_block_runs_and_restores():
    h = tiny_classifier(layers=3)
    units, _ = search_units(h.module, "drop")
    spec = LevelSpec.make("drop")
    x = example_inputs(h)
    dense = h.canonical()(*x)
    sw = LevelSwitcher(h.module, spec, units, None)
    sw.apply([1, 0, 1])  # drop block 1
    assert isinstance(h.module.bert.encoder.layer[1], DroppedBlock)
    assert not torch.allclose(h.canonical()(*x), dense)
    sw.apply([1, 1, 1])
    torch.testing.assert_close(h.canonical()(*x), dense)


# ---------------------------------------------------------------------------------------------------
# Search space, mutation and the baselines


def test_mutation_keeps_the_budget_exact():
    spec = LevelSpec.make("bits")
    weights = [100] * 6 + [400] * 3
    space = SearchSpace(spec, [f"u{i}" for i in range(9)], weights, target_size(spec, weights, 3.0))
    rng = np.random.default_rng(0)
    parent = space.uniform(3.0)
    seen = set()
    for _ in range(300):
        kid = space.mutate(parent, rng)
        if kid is None:
            continue
        assert space.cost(kid) == pytest.approx(space.target) and space.average(kid) == pytest.approx(3.0)
        assert 1 <= sum(a != b for a, b in zip(kid, parent)) <= 6
        seen.add(tuple(kid))
        parent = kid
    assert len(seen) > 50
    ungrouped = SearchSpace(spec, space.units, weights, space.target, grouping="none")
    for _ in range(100):
        kid = ungrouped.mutate(ungrouped.uniform(3.0), rng)
        assert kid is None or ungrouped.fits(kid)
    start = space.random_start(np.random.default_rng(1))
    assert space.fits(start)


def test_dp_matches_brute_force():
    spec = LevelSpec.make("bits", "rtn", [2, 3, 4])
    weights = [1, 1, 2, 2, 1]
    space = SearchSpace(spec, [f"u{i}" for i in range(5)], weights, target_size(spec, weights, 3.0))
    E = np.random.default_rng(0).random((5, 3)) * np.array([3.0, 1.0, 0.2])
    best = min((c for c in itertools.product(range(3), repeat=5) if space.fits(list(c))),
               key=lambda c: sum(E[i, l] for i, l in enumerate(c)))
    assert tuple(baselines.dp_levels(space, E)) == best


def test_evolution_improves_on_uniform_on_held_out_inputs_and_is_deterministic(tmp_path: Path):
    h = tiny_classifier(layers=3)
    spec = LevelSpec.make("bits", "rtn", [2, 3, 4, 5])
    units, weights = search_units(h.module, "bits")
    db = build_database(tmp_path / "db", h.module, spec, units, None, {})
    space = SearchSpace(spec, units, weights, target_size(spec, weights, 3.0))
    pool = calibration_pool(h, random_dataset(), 24, seed=0, batch_size=24)
    held_out = calibration_pool(h, random_dataset(), 64, seed=1, batch_size=64)  # never seen by the search
    canon = h.canonical()
    pool.set_targets(canon)
    held_out.set_targets(canon)
    sw = LevelSwitcher(h.module, spec, units, db)
    all_ids = np.arange(len(pool))
    sw.apply(space.uniform(3.0))
    uniform_fit, uniform_held = pool.fitness(canon, all_ids), held_out.fitness(canon, np.arange(len(held_out)))
    # every stage ranks on the whole pool: with elitism the parent's fitness can never get worse
    res = evolve(space, sw, canon, pool, 3.0, 12, 6, [2, 1], [24, 24], np.random.default_rng(0))
    assert all(b <= a + 1e-12 for a, b in zip(res.history, res.history[1:]))
    assert res.history[-1] < uniform_fit and space.cost(res.levels) == pytest.approx(space.target)
    sw.apply(res.levels)
    assert held_out.fitness(canon, np.arange(len(held_out))) < uniform_held
    assert len(res.stage_draws) == 12 and len(res.stage_draws[0][0]) == 24
    again = evolve(space, sw, canon, pool, 3.0, 12, 6, [2, 1], [24, 24], np.random.default_rng(0))
    assert again.levels == res.levels


def test_cosine_scores_rank_a_near_identity_block_lowest():
    h = tiny_classifier(layers=3)
    with torch.no_grad():  # block 2 barely changes its input
        for lin in (h.module.bert.encoder.layer[2].attention.output.dense, h.module.bert.encoder.layer[2].output.dense):
            lin.weight.mul_(1e-3)
            lin.bias.zero_()
    units, weights = search_units(h.module, "drop")
    spec = LevelSpec.make("drop")
    space = SearchSpace(spec, units, weights, target_size(spec, weights, 1))
    pool = calibration_pool(h, random_dataset(), 8, 0)
    scores = baselines.cosine_block_scores(h.module, h.canonical(), units, pool, np.arange(8))
    assert int(np.argmin(scores)) == 2
    assert baselines.drop_lowest(space, scores, 1) == [1, 1, 0]


# ---------------------------------------------------------------------------------------------------
# The pass


@pytest.mark.parametrize("family,method,budget,strategy", [
    ("bits", "gptq", 3.0, "evolution"), ("bits", "rtn", 3.5, "evolution"), ("sparsity", "sparsegpt", 0.5, "dp"),
    ("sparsity", "magnitude", 0.5, "uniform"), ("drop", "auto", 1, "evolution"), ("drop", "auto", 1, "cosine")])
def test_pass_meets_budget_and_records(tmp_path: Path, family, method, budget, strategy):
    h = tiny_classifier(layers=3)
    ctx = Context(seed=3, data=random_dataset(), show_progress=False)
    levels = [0.0, 0.25, 0.5, 0.75] if family == "sparsity" else None
    cfg = fast_config(family=family, method=method, budget=budget, strategy=strategy, levels=levels,
                      database=str(tmp_path / "db"))
    out = get_pass("evopress")(cfg).apply(h.copy(), ctx)
    log = ctx.log["evopress"]
    assert len(log["level_map"]) == (3 if family == "drop" else 18)
    if family == "sparsity":
        assert log["achieved_budget"] >= budget - 1e-9
    else:
        assert log["achieved_budget"] <= budget + 1e-9
    if strategy == "evolution":
        assert log["achieved_budget"] == pytest.approx(budget)
        assert len(log["fitness_history"]) == 4 and len(log["calibration_ids"]) == 32
        assert log["calibration_source"] == "random"
    if family == "sparsity":  # the built model has the mapped sparsity in every layer
        for name, s in log["level_map"].items():
            w = out.module.get_submodule(name).weight
            assert float((w == 0).float().mean()) == pytest.approx(s, abs=0.02)
    out.canonical()(*example_inputs(out))


def test_pass_is_deterministic_and_level_map_reusable(tmp_path: Path):
    h = tiny_classifier(layers=3)
    cfg = fast_config(family="bits", method="rtn", budget=3.0, database=str(tmp_path / "db"))
    logs, models = [], []
    for _ in range(2):
        ctx = Context(seed=5, data=random_dataset(), show_progress=False)
        models.append(get_pass("evopress")(cfg).apply(h.copy(), ctx))
        logs.append(ctx.log["evopress"])
    assert logs[0]["level_map"] == logs[1]["level_map"]
    assert logs[0]["selection_draws"] == logs[1]["selection_draws"]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"passes": {"evopress": logs[0]}}))
    assert load_level_map(str(path)) == logs[0]["level_map"]
    ctx = Context(seed=99, data=random_dataset(), show_progress=False)
    reused = get_pass("evopress")(fast_config(family="bits", method="rtn", budget=3.0, level_map=str(path),
                                              database=str(tmp_path / "db"))).apply(h.copy(), ctx)
    for a, b in zip(models[0].module.state_dict().values(), reused.module.state_dict().values()):
        assert torch.equal(a, b)
    assert "fitness_history" not in ctx.log["evopress"]


def test_pass_on_a_unet_with_ungrouped_mutation(tmp_path: Path):
    h = tiny_unet()
    ctx = Context(seed=0, data=random_dataset(), show_progress=False)
    cfg = fast_config(family="sparsity", method="magnitude", budget=0.5, grouping="none",
                      database=str(tmp_path / "db"))
    out = get_pass("evopress")(cfg).apply(h.copy(), ctx)
    log = ctx.log["evopress"]
    assert log["fitness"] == "mse" and log["achieved_budget"] >= 0.5 - 1e-9
    assert out.canonical()(*example_inputs(out)).shape == (2, 1, 8, 8)


def test_config_errors(tmp_path: Path):
    with pytest.raises(ValueError):
        EvoPressPass.Config(family="bits", budget=3, survivors=[2, 2], stage_samples=[4, 8])
    with pytest.raises(ValueError):
        EvoPressPass.Config(family="bits", budget=3, survivors=[2, 1], stage_samples=[4])
    h = tiny_classifier(layers=2)
    for kw in (dict(family="bits", budget=9), dict(family="drop", budget=2),
               dict(family="bits", method="rtn", budget=3.5, strategy="uniform"),
               dict(family="bits", method="rtn", budget=3, strategy="cosine"),
               dict(family="bits", method="rtn", levels=[2, 3, 8], budget=3)):
        with pytest.raises(UserError):
            get_pass("evopress")(fast_config(database=str(tmp_path / "db"), **kw)).apply(h.copy(), Context(data=random_dataset(), show_progress=False))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_level_map(str(bad))


def test_artifact_round_trip_with_dropped_blocks(tmp_path: Path):
    from modelpress.artifact import load_artifact, write_artifact

    h = tiny_classifier(layers=3)
    ctx = Context(seed=0, data=random_dataset(), show_progress=False)
    out = get_pass("evopress")(fast_config(family="drop", budget=1, strategy="cosine")).apply(h.copy(), ctx)
    write_artifact(tmp_path / "art", out, pass_log=ctx.log)
    loaded = load_artifact(tmp_path / "art")
    x = example_inputs(h)
    torch.testing.assert_close(loaded.canonical()(*x), out.canonical()(*x))
    manifest = json.loads((tmp_path / "art" / "modelpress.json").read_text())
    assert manifest["passes"]["evopress"]["level_map"] == ctx.log["evopress"]["level_map"]
    assert any(m["class"] == "DroppedBlock" for m in manifest["compressed_modules"])


def test_recipe_end_to_end_and_reuse_of_the_saved_map(tiny_classifier_dir: Path, in_tmp: Path):
    from modelpress.artifact import load_artifact
    from modelpress.pipeline import run
    from modelpress.recipe import parse_recipe

    search = {"type": "evopress", "family": "bits", "method": "rtn", "levels": [2, 3, 4], "budget": 3,
              "generations": 3, "offspring": 3, "survivors": [1], "stage_samples": [8], "calibration_samples": 16,
              "database": str(in_tmp / "db")}
    random = {"dataset": "random"}
    out = run(parse_recipe({"model": str(tiny_classifier_dir), "calibration": random, "passes": [search], "output": "a"}),
              export=False, evaluate=False, show_progress=False)
    manifest = json.loads((out / "modelpress.json").read_text())
    log = manifest["passes"]["evopress"]
    assert log["achieved_budget"] == pytest.approx(3.0) and len(log["level_map"]) == 12
    reuse = {k: v for k, v in search.items() if k not in ("generations",)}
    reuse["level_map"] = str(out / "modelpress.json")
    out2 = run(parse_recipe({"model": str(tiny_classifier_dir), "calibration": random, "passes": [reuse], "output": "b"}),
               export=False, evaluate=False, show_progress=False)
    a, b = load_artifact(out).module.state_dict(), load_artifact(out2).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sparsegpt_levels_equal_separate_calls():
    from modelpress.prune.sparsegpt import sparsegpt_prune_levels

    g = torch.Generator().manual_seed(2)
    W = torch.randn(8, 24, generator=g)
    X = torch.randn(100, 24, generator=g)
    H = 2 * X.T.double() @ X.double() / 100
    levels = [0.0, 0.3, 0.6]
    together = sparsegpt_prune_levels(W, H, levels, blocksize=8)
    for s, t in zip(levels, together):
        torch.testing.assert_close(t, sparsegpt_prune(W, H, s, blocksize=8), rtol=0, atol=0)


@pytest.mark.parametrize("family,method,budget,levels", [
    ("bits", "rtn", 3.0, [2, 3, 4, 5, 6, 7, 8]), ("bits", "gptq", 3.0, [2, 3, 4]),
    ("sparsity", "magnitude", 0.5, [0.0, 0.25, 0.5, 0.75])])
def test_artifact_stores_the_levels_compressed_and_loads_the_database_weights(tmp_path: Path, family, method,
                                                                             budget, levels):
    """The final model holds packed codes (bits) or fp16 values + a bitmask (sparsity); after save / load every
    searched layer computes with exactly the database weights the search scored, and the file is smaller than
    the same model stored with dense layers."""
    import copy

    from modelpress.artifact import WEIGHTS, load_artifact, write_artifact
    from modelpress.prune.sparse import SparseLinear
    from modelpress.quant.packed import PackedLinear

    h = tiny_classifier(layers=2)
    ctx = Context(seed=0, data=random_dataset(), show_progress=False)
    cfg = fast_config(family=family, method=method, budget=budget, levels=levels, database=str(tmp_path / "db"),
                      generations=2)
    out = get_pass("evopress")(cfg).apply(h.copy(), ctx)
    log = ctx.log["evopress"]
    write_artifact(tmp_path / "art", out, pass_log=ctx.log)
    loaded = load_artifact(tmp_path / "art").module

    spec = LevelSpec.make(family, method, levels, cfg.group_size, cfg.sym)
    db = LevelDatabase.open(tmp_path / "db")
    units = list(log["level_map"])
    idx = [spec.index_of(log["level_map"][u]) for u in units]
    dense = copy.deepcopy(h.module)  # what the search scored: the database's weights in the float layers
    LevelSwitcher(dense, spec, units, db).apply(idx)
    kind = PackedLinear if family == "bits" else SparseLinear
    for u, i in zip(units, idx):
        mod = loaded.get_submodule(u)
        assert isinstance(mod, kind)
        want = db.weight(u, i).float()
        if method == "gptq":  # dequantized from float32 scales: within one fp16 rounding step of the database
            torch.testing.assert_close(mod.weight.float(), want, rtol=2**-10, atol=1e-6)
        else:
            assert torch.equal(mod.weight.float(), want)
    x = example_inputs(h)
    if method != "gptq":
        torch.testing.assert_close(loaded(*x).logits, dense(*x).logits, rtol=0, atol=0)
    assert log["max_abs_diff_vs_database"] == 0.0 or method == "gptq"

    write_artifact(tmp_path / "dense", ModelHandle(dense, "classifier", "tiny", describe_architecture(dense)))
    size, dense_size = ((tmp_path / d / WEIGHTS).stat().st_size for d in ("art", "dense"))
    saved = 4 * log["searched_layers_fp16_bytes"] // 2 - log["searched_layers_bytes"]  # fp32 layers -> stored
    assert size < dense_size and abs((dense_size - size) - saved) < 4096
    limit = 0.30 if family == "bits" else 0.75  # includes the scales / zero points (one group per row here)
    assert log["searched_layers_bytes"] <= limit * log["searched_layers_fp16_bytes"]
