"""A person's own diffusers pipeline (issue 19): loaded by path with its scheduler, guidance, latent shape and
text encoder; sampled exactly as diffusers samples it; every diffusion PTQ pass runs from a recipe on it and its
artifact loads and samples; image-fidelity metrics; bad pipelines are one-line errors that write nothing.

The pipelines are small random Stable-Diffusion-shaped ones made here (:mod:`tiny_sd`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from modelpress.artifact import MANIFEST, load_artifact
from modelpress.cli import main
from modelpress.data.inputs import encode_prompts
from modelpress.errors import UserError
from modelpress.metrics.fidelity import PSNR_CAP, psnr, ssim
from modelpress.model import sample_shape
from modelpress.sampling import model_timesteps, sample, sampler_of, scheduler_config, to_unit_range
from modelpress.sources import load_model
from tiny_sd import make_pipeline, write_prompt_images

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat on a mat", "the blue house of an inner city", "a green tree", "seven small boats"]
#: a pass's settings small enough for a test: 4 scheduler steps, 8 calibration samples, 2 AdaRound iterations
FAST = {"steps": 4, "samples": 8, "batch_size": 8, "recon_batch": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models run many small ops: one torch thread is faster on a shared 2-core machine (two threads
    contend with other processes and run ~50x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pipeline(tmp_path_factory.mktemp("pipes") / "sd")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def _diffusers(sd: Path, scheduler=None):
    import diffusers

    extra = {"scheduler": scheduler} if scheduler is not None else {}
    return diffusers.StableDiffusionPipeline.from_pretrained(str(sd), safety_checker=None, local_files_only=True,
                                                             **extra)


def test_pipeline_supplies_scheduler_guidance_latent_shape_and_text_encoder(sd: Path) -> None:
    h = load_model(str(sd))
    pipe = _diffusers(sd)
    assert h.kind == "unet-cond" and sampler_of(h) == "pipeline" and h.source == str(sd)
    sched = scheduler_config(h)
    assert sched["_class_name"] == "DDIMScheduler" and sched["beta_schedule"] == "scaled_linear"
    assert sched["clip_sample"] is False and sched["steps_offset"] == 1 and sched["beta_start"] == 0.00085
    assert h.extras["guidance_scale"] == 7.5
    assert sample_shape(h) == (4, 8, 8)
    assert model_timesteps(sched, 4, "pipeline") == [751, 501, 251, 1]  # leading spacing + steps_offset 1
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(encode_prompts(h, PROMPTS), ref, rtol=0, atol=0)


def test_sampling_equals_the_diffusers_pipeline(sd: Path) -> None:
    """Same x_T, prompts, scheduler and guidance: our sampler + VAE decode give diffusers' own images."""
    h = load_model(str(sd))
    pipe = _diffusers(sd)
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = pipe(PROMPTS[:2], num_inference_steps=3, guidance_scale=7.5, latents=x_T.clone(), height=16,
                    width=16, output_type="pt").images
    from modelpress.diffusers_pipeline import decode_latents

    cond, uncond = encode_prompts(h, PROMPTS[:2]), encode_prompts(h, [""])
    g = torch.Generator().manual_seed(3)  # sample() draws x_T from its seed exactly as above
    assert torch.equal(torch.randn((2, 4, 8, 8), generator=g), x_T)
    got = sample(h.canonical(), scheduler_config(h), 2, sampler="pipeline", steps=3, seed=3, cond=cond,
                 uncond=uncond, guidance_scale=7.5, sample_shape=sample_shape(h), batch_size=1)
    torch.testing.assert_close(to_unit_range(decode_latents(h, got)), want, rtol=1e-4, atol=1e-4)


def _recipe(tmp: Path, sd: Path, prompts: Path, passes: list[dict], evaluate: list | None = None,
            model: dict | None = None) -> Path:
    body = {"model": {"source": str(sd), **(model or {})}, "seed": 0,
            "calibration": {"dataset": str(prompts)}, "passes": passes, "evaluate": evaluate or [],
            "output": str(tmp / "out")}
    r = tmp / "recipe.yaml"
    r.write_text(yaml.safe_dump(body))
    return r


@pytest.mark.parametrize("pass_cfg", [
    {"type": "ptq", **FAST},
    {"type": "ptq4dm", **FAST, "recon_iters": 2},
    {"type": "tfmq", **FAST, "recon_iters": 2, "w_bits": 4},
], ids=["ptq", "ptq4dm", "tfmq"])
def test_every_diffusion_pass_runs_from_a_recipe_and_the_artifact_samples(sd: Path, prompts_file: Path,
                                                                          tmp_path: Path, pass_cfg: dict) -> None:
    from modelpress.pipeline import run_recipe

    out = run_recipe(_recipe(tmp_path, sd, prompts_file, [pass_cfg]), show_progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    log = manifest["passes"][pass_cfg["type"]]
    # calibrated on the pipeline's own DDIM timesteps (leading spacing, offset 1), guided, latent-shaped
    assert set(log["calibration"]["timesteps"]) <= {751, 501, 251, 1}
    assert manifest["extras"]["scheduler"]["_class_name"] == "DDIMScheduler"
    assert manifest["extras"]["scheduler"]["beta_schedule"] == "scaled_linear"
    assert manifest["extras"]["pipeline"]["vae"]["sha256"]
    assert log["quantized_layers"] > 10 and log["quantized_attention"]
    assert manifest["source"] == str(sd)
    art = load_artifact(out)
    assert art.extras["guidance_scale"] == 7.5 and sample_shape(art) == (4, 8, 8)
    cond = encode_prompts(art, PROMPTS[:2])
    x = sample(art.canonical(), scheduler_config(art), 2, sampler=sampler_of(art), steps=4, seed=0, cond=cond,
               uncond=encode_prompts(art, [""]), guidance_scale=7.5, sample_shape=sample_shape(art))
    ref = load_model(str(sd))
    y = sample(ref.canonical(), scheduler_config(ref), 2, sampler="pipeline", steps=4, seed=0, cond=cond,
               uncond=encode_prompts(ref, [""]), guidance_scale=7.5, sample_shape=sample_shape(ref))
    assert torch.isfinite(x).all() and not torch.equal(x, y)
    assert float((x - y).norm() / y.norm()) < 0.5  # quantized, yet the same images (random weights: loose)
    if pass_cfg["type"] == "tfmq":
        assert log["tib_outputs"] and log["maintenance"]
    if pass_cfg["type"] == "ptq":  # the compressed UNet inside diffusers' own pipeline
        from modelpress.diffusers_pipeline import to_diffusers

        pipe = to_diffusers(art)
        assert pipe.unet is art.module and type(pipe.scheduler).__name__ == "DDIMScheduler"
        with torch.no_grad():
            img = pipe(PROMPTS[:1], num_inference_steps=2, height=16, width=16, output_type="pt").images
        assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()


def test_bare_unet_with_a_scheduler_config(tmp_path: Path) -> None:
    """An unconditional UNet2DModel directory with scheduler_config.json beside it: sampled with that
    scheduler, quantized from a recipe without data (trajectories need none), scored by psnr / ssim."""
    import diffusers

    from modelpress.pipeline import run_recipe
    from tiny_sd import SD_SCHEDULER

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDIMScheduler.from_config({**SD_SCHEDULER, "beta_schedule": "linear", "beta_start": 1e-4,
                                         "beta_end": 0.02}).save_pretrained(tmp_path / "unet")
    h = load_model(str(tmp_path / "unet"))
    assert h.kind == "unet" and scheduler_config(h)["_class_name"] == "DDIMScheduler" and "guidance_scale" not in h.extras
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": str(tmp_path / "unet"), "passes": [{"type": "ptq", **FAST}],
                                 "evaluate": [{"metric": "psnr", "samples": 4, "options": {"steps": 4}}],
                                 "output": str(tmp_path / "out")}))
    out = run_recipe(r, show_progress=False)
    report = json.loads((out / "report.json").read_text())
    assert 10 < report["metrics"]["psnr"]["compressed"] < PSNR_CAP
    assert not report["metrics"]["psnr"]["details"]["decoded_by_vae"]
    assert load_artifact(out).extras["scheduler"]["beta_schedule"] == "linear"


def test_evopress_searches_a_pipeline_on_its_own_trajectories(sd: Path, prompts_file: Path, tmp_path: Path) -> None:
    """EvoPress fitness on a pipeline with a prompts file: the pool is states of the pipeline's guided DDIM
    trajectories (no images to noise), the search runs from a recipe and the artifact samples."""
    from modelpress.pipeline import run_recipe

    evo = {"type": "evopress", "family": "sparsity", "method": "magnitude", "budget": 0.5, "grouping": "none",
           "generations": 2, "offspring": 2, "survivors": [1], "stage_samples": [4], "calibration_samples": 4,
           "hessian_samples": 4, "baseline_samples": 4, "batch_size": 4, "database": str(tmp_path / "db")}
    out = run_recipe(_recipe(tmp_path, sd, prompts_file, [evo]), show_progress=False)
    log = json.loads((out / MANIFEST).read_text())["passes"]["evopress"]
    assert "DDIMScheduler trajectories" in log["calibration_source"] and log["fitness"] == "mse"
    assert log["achieved_budget"] >= 0.5 - 1e-9
    art = load_artifact(out)
    x = sample(art.canonical(), scheduler_config(art), 1, sampler="pipeline", steps=2, seed=0,
               cond=encode_prompts(art, PROMPTS[:1]), uncond=encode_prompts(art, [""]), guidance_scale=7.5,
               sample_shape=sample_shape(art))
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("kind", ["aptp", "static_prune"])
def test_aptp_on_a_latent_pipeline(sd: Path, tmp_path: Path, kind: str) -> None:
    """APTP and its static baseline on a pipeline: prompt-image pairs from the data layer, images encoded to
    latents by the pipeline's VAE, the router reading the pipeline's CLIP embeddings; the artifact samples
    with the pipeline's scheduler."""
    from modelpress.data import open_dataset
    from modelpress.data.inputs import fit_images
    from modelpress.diffusers_pipeline import encode_images
    from modelpress.pipeline import run_recipe

    pairs = write_prompt_images(tmp_path)
    h = load_model(str(sd))
    imgs = open_dataset(str(pairs)).all().images
    lat = fit_images(h, imgs, "pairs")
    assert lat.shape == (8, 4, 8, 8)  # 24 px resized to the VAE's 16 px, encoded to 8x8 latents
    torch.testing.assert_close(lat[:2], encode_images(h, torch.nn.functional.interpolate(
        imgs[:2], size=(16, 16), mode="bilinear", antialias=True, align_corners=False)))
    cfg = {"type": kind, "router_steps": 8, "warmup_fraction": 0.25, "finetune_steps": 1, "batch_size": 8,
           "prompt_pool": 16, "threads": 1, "target_macs": 0.5, "router_lr": 0.05,
           **({"codes": 2} if kind == "aptp" else {})}
    out = run_recipe(_recipe(tmp_path, sd, pairs, [cfg]), show_progress=False)
    log = json.loads((out / MANIFEST).read_text())["passes"][kind]
    assert log["codes"] == (2 if kind == "aptp" else 1)
    assert log["router"]["first"]["macs_ratio"] > log["router"]["last"]["macs_ratio"]  # the budget bites
    art = load_artifact(out)
    assert type(art.module).__name__ == "APTPModel" and art.module.embed_dim == 32  # CLIP width, not MiniLM's
    x = sample(art.canonical(), scheduler_config(art), 2, sampler="pipeline", steps=2, seed=0,
               cond=encode_prompts(art, PROMPTS[:2]), uncond=encode_prompts(art, [""]), guidance_scale=7.5,
               sample_shape=sample_shape(art))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


#: the preprocessor config of the tests' feature network
VIT_MEAN, VIT_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _save_vit(directory: Path) -> Path:
    """A small random ViT checkpoint (16 px images, 16 features) with a preprocessor config, as a user's."""
    import transformers

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32, image_size=16, patch_size=8))
    vit.eval().save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": VIT_MEAN, "image_std": VIT_STD, "size": {"height": 16, "width": 16}}))
    return directory


def test_feature_distance_compares_paired_samples_in_a_named_feature_network(sd: Path, prompts_file: Path,
                                                                            tmp_path: Path) -> None:
    """``feature_distance``: the model's and the reference's samples from the same seed and prompts, each pair's
    features in the user's network, ``1 - cos``, averaged; checked against the ViT called directly."""
    import transformers

    import modelpress
    from modelpress.data import open_dataset
    from modelpress.metrics import EvalContext
    from modelpress.metrics.fidelity import eval_prompts, images

    vit_dir = _save_vit(tmp_path / "vit")
    other = make_pipeline(tmp_path / "other", seed=1)  # a different UNet stands in for a compressed one
    spec = {"metric": "feature_distance", "dataset": str(prompts_file), "samples": 3,
            "options": {"features": str(vit_dir), "steps": 2}}
    got = modelpress.evaluate(str(other), [spec], reference=str(sd))["feature_distance"]

    h, ref = load_model(str(other)), load_model(str(sd))
    ctx = EvalContext(seed=0, samples=3, options={"steps": 2}, show_progress=False,
                      dataset=open_dataset(str(prompts_file)))
    prompts = eval_prompts(h, ctx, 3)
    x, y = images(h.canonical(), h, ctx, prompts), images(ref.canonical(), h, ctx, prompts)
    vit = transformers.ViTModel.from_pretrained(str(vit_dir)).eval()
    mean, std = torch.tensor(VIT_MEAN).view(1, 3, 1, 1), torch.tensor(VIT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        fx, fy = (vit(pixel_values=(im - mean) / std).pooler_output.double() for im in (x, y))
    want = float((1 - torch.nn.functional.cosine_similarity(fx, fy, dim=1)).mean())
    assert x.shape == (3, 3, 16, 16) and not torch.equal(x, y)
    assert got["compressed"] == pytest.approx(want, rel=1e-5) and want > 1e-4
    assert got["reference"] == pytest.approx(0.0, abs=1e-6) and not got["higher_is_better"]
    want_rel = float(((fx - fy).norm(dim=1) / fy.norm(dim=1)).mean())
    assert got["details"]["relative_l2"] == pytest.approx(want_rel, rel=1e-5) and got["details"]["n"] == 3
    with pytest.raises(UserError, match="feature_distance needs options.features"):
        modelpress.evaluate(str(other), [{**spec, "options": {}}], reference=str(sd))


def test_frechet_distance_in_a_named_feature_network(sd: Path, tmp_path: Path) -> None:
    """``frechet`` with a user's vision checkpoint (a small random ViT saved here, with a preprocessor config):
    the generated images' and the dataset's real images' features, Fréchet distance between their Gaussians."""
    import modelpress
    from modelpress.data import open_dataset
    from modelpress.metrics import EvalContext
    from modelpress.metrics.diffusion import feature_stats, frechet_distance
    from modelpress.metrics.fidelity import images
    from modelpress.metrics.frechet import network_features

    _save_vit(tmp_path / "vit")
    pairs = write_prompt_images(tmp_path)
    spec = {"metric": "frechet", "dataset": str(pairs), "samples": 6, "options": {"features": str(tmp_path / "vit"),
                                                                                 "steps": 2}}
    got = modelpress.evaluate(str(sd), [spec])["frechet"]
    h, data = load_model(str(sd)), open_dataset(str(pairs))
    gen = images(h.canonical(), h, EvalContext(seed=0, options={"steps": 2}, show_progress=False),
                 data.first(6).prompts)
    real = (data.all().images + 1) / 2
    feats = network_features(str(tmp_path / "vit"), gen)
    assert feats.shape == (6, 16)
    want = frechet_distance(*feature_stats(feats), *feature_stats(network_features(str(tmp_path / "vit"), real)))
    assert got["compressed"] == pytest.approx(want) and want > 0
    assert got["details"]["n"] == 6 and got["details"]["real_n"] == 8 and not got["higher_is_better"]
    with pytest.raises(UserError, match="needs options.features"):
        modelpress.evaluate(str(sd), [{**spec, "options": {}}])


def test_sampled_inputs_are_trajectory_states(sd: Path, prompts_file: Path) -> None:
    from modelpress.data import open_dataset
    from modelpress.data.inputs import model_inputs

    h = load_model(str(sd))
    (x, t, c), ex = model_inputs(h, open_dataset(str(prompts_file)), 4, 0)
    visited = model_timesteps(scheduler_config(h), 25, "pipeline")
    assert x.shape == (4, 4, 8, 8) and set(t.tolist()) <= set(visited)
    torch.testing.assert_close(c[0], encode_prompts(h, [ex.prompts[0]])[0])
    torch.testing.assert_close(c[1], encode_prompts(h, [""])[0])
    (x2, t2, _), _ = model_inputs(h, open_dataset(str(prompts_file)), 4, 0)
    assert torch.equal(x, x2) and torch.equal(t, t2)


def test_pndm_scheduler_override_calibrates_on_its_timesteps(sd: Path, prompts_file: Path, tmp_path: Path) -> None:
    """model.scheduler swaps the sampler on the pipeline's betas; TFMQ's FSC table follows its timesteps (PNDM
    calls the UNet twice at one of them)."""
    from modelpress.pipeline import run_recipe

    r = _recipe(tmp_path, sd, prompts_file, [{"type": "tfmq", **FAST, "recon_iters": 0, "sampler": "every_k",
                                              "interval": 1, "maintenance": "tib"}],
                model={"scheduler": "PNDMScheduler", "guidance_scale": 3.0})
    out = run_recipe(r, show_progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    import diffusers

    used = manifest["extras"]["scheduler"]
    assert used["_class_name"] == "PNDMScheduler" and used["beta_schedule"] == "scaled_linear"
    pndm = diffusers.PNDMScheduler.from_config(json.loads((sd / "scheduler" / "scheduler_config.json").read_text()))
    pndm.set_timesteps(4)
    visited = model_timesteps(used, 4, "pipeline")
    assert visited == pndm.timesteps.tolist() and len(set(visited)) < len(visited)  # PRK + PLMS steps repeat t
    assert set(manifest["passes"]["tfmq"]["calibration"]["timesteps"]) <= set(visited)
    tables = [m["config"]["act_timesteps"] for m in manifest["compressed_modules"]
              if m["config"].get("act_timesteps")]
    assert tables and set(tables) == {len(set(visited))}  # FSC: one range per distinct timestep
    assert manifest["extras"]["guidance_scale"] == 3.0
    import modelpress  # re-evaluating the artifact: the reference is reloaded with the recipe's overrides

    got = modelpress.evaluate(out, [{"metric": "psnr", "samples": 2, "dataset": str(prompts_file),
                                     "options": {"steps": 4}}])["psnr"]
    assert got["details"]["sampler"] == "PNDMScheduler" and got["details"]["guidance_scale"] == 3.0
    assert got["reference"] == PSNR_CAP and got["compressed"] < PSNR_CAP
    with pytest.raises(UserError, match="PNDMScheduler cannot sample in 3 steps"):
        modelpress.evaluate(out, [{"metric": "psnr", "samples": 2, "dataset": str(prompts_file),
                                   "options": {"steps": 3}}])


@pytest.mark.parametrize("as_shipped", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["cut", "as-shipped"])
def test_shipped_recipe_runs_on_a_tiny_pipeline(sd: Path, tmp_path: Path, as_shipped: bool) -> None:
    """recipes/diffusers_ptq.yaml with its path filled in (``cut``: and its sample counts, steps and iterations
    cut to a test's size; ``as-shipped``, slow: nothing else changed); its prompts file is the one beside it."""
    data = yaml.safe_load((REPO / "recipes" / "diffusers_ptq.yaml").read_text())
    assert data["model"]["source"] == "path/to/your/pipeline"
    data["model"]["source"] = str(sd)
    if not as_shipped:
        data["calibration"].update(samples=8, batch_size=8)
        data["passes"][0].update(steps=4, recon_iters=2, recon_batch=4)
        for m in data["evaluate"]:
            m.update(samples=2, options={"steps": 4})
    data["output"] = str(tmp_path / "out")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.txt").write_text((REPO / "recipes" / "data" / "prompts.txt").read_text())
    recipe = tmp_path / "diffusers_ptq.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(recipe), "-q"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    psnr_m, ssim_m = report["metrics"]["psnr"], report["metrics"]["ssim"]
    assert psnr_m["reference"] == PSNR_CAP and ssim_m["reference"] == pytest.approx(1.0)
    assert 10 < psnr_m["compressed"] < PSNR_CAP and 0 < ssim_m["compressed"] < 1
    assert psnr_m["details"]["decoded_by_vae"] and psnr_m["details"]["image_shape"] == [3, 16, 16]
    assert psnr_m["details"]["sampler"] == "DDIMScheduler"


def test_psnr_and_ssim_follow_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 16, 16, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    mse = (a - b).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(a, b), 10 * torch.log10(1 / mse))
    assert torch.equal(psnr(a, a), torch.full((3,), PSNR_CAP))
    torch.testing.assert_close(ssim(a, a), torch.ones(3))
    # constant images: SSIM reduces to the luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    x, y = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6)
    c1 = 0.01 ** 2
    torch.testing.assert_close(ssim(x, y), torch.tensor([(2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1)]))
    assert float(ssim(a, b).mean()) < float(ssim(a, (a + 0.01 * torch.randn(a.shape, generator=g)).clamp(0, 1)).mean())


def test_fidelity_metrics_work_on_the_digits_zoo() -> None:
    """psnr / ssim are for any image model: on digits-t2i they sample its own eval prompts with its DDIM."""
    import modelpress

    specs = [{"metric": m, "samples": 4, "options": {"steps": 3}} for m in ("psnr", "ssim")]
    got = modelpress.evaluate("digits-t2i", specs, reference="digits-t2i")
    assert got["psnr"]["compressed"] == got["psnr"]["reference"] == PSNR_CAP
    assert got["ssim"]["compressed"] == pytest.approx(1.0)
    assert got["psnr"]["details"]["sampler"] == "ddim" and len(got["psnr"]["details"]["prompts"]) == 4


def _broken(tmp: Path, what: str) -> Path:
    if what == "no scheduler":
        return make_pipeline(tmp / "p", with_scheduler=False)
    if what == "no text encoder":
        return make_pipeline(tmp / "p", text_encoder=False)
    return make_pipeline(tmp / "p", cross_width=24)


@pytest.mark.parametrize("what,message", [
    ("no scheduler", "the pipeline has no scheduler"),
    ("no text encoder", "the UNet is text-conditioned but the pipeline has no text_encoder"),
    ("cross width", "the UNet's cross-attention takes 24-wide embeddings, the text encoder gives 32"),
    ("empty prompts", "the file is empty"),
])
def test_bad_pipelines_and_prompts_exit_2_with_one_line_and_write_nothing(
        sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, message: str) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n" if what == "empty prompts" else "a cat\n")
    pipe = sd if what == "empty prompts" else _broken(tmp_path, what)
    recipe = _recipe(tmp_path, pipe, prompts, [{"type": "ptq", **FAST}])
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_overrides_are_strict(sd: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="only for a diffusers pipeline directory"):
        load_model(type("S", (), {"source": "digits-t2i", "kind": None, "config": None, "prompt_encoder": None,
                                  "scheduler": None, "guidance_scale": 2.0, "sample_size": None})())
    with pytest.raises(UserError, match="unknown scheduler class 'NoSuchScheduler'"):
        load_model(type("S", (), {"source": str(sd), "kind": None, "config": None, "prompt_encoder": None,
                                  "scheduler": "NoSuchScheduler", "guidance_scale": None, "sample_size": None})())
    euler = tmp_path / "scheduler_config.json"
    euler.write_text(json.dumps({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                                 "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "linspace"}))
    with pytest.raises(UserError, match="fractional timesteps"):
        load_model(type("S", (), {"source": str(sd), "kind": None, "config": None, "prompt_encoder": None,
                                  "scheduler": str(euler), "guidance_scale": None, "sample_size": None})())
    from modelpress.recipe import parse_recipe

    with pytest.raises(UserError, match="model.sample_size"):
        parse_recipe({"model": {"source": str(sd), "sample_size": [1, 2, 3]}})
    with pytest.raises(UserError, match="model.guidance: unknown key"):
        parse_recipe({"model": {"source": str(sd), "guidance": 2}})
