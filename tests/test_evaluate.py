"""Tests of `python -m fmboost_jax.evaluate` (fmboost_jax/evaluate.py) and its core
(fmboost_jax/evaluation/benchmark.py) on the tiny pixel model: the pixel metrics without
Inception weights, every metric with a random-weight Inception (checked against `metrics` and
`FIDAccumulator` by hand), the training evaluator's FID family, and one-line errors."""

import contextlib
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image

from fmboost_jax import evaluate
from fmboost_jax.cfm.upsampling import resize
from fmboost_jax.data import pipeline
from fmboost_jax.evaluation import benchmark, fid, metrics
from fmboost_jax.inference.upsampler import load_upsampler
from fmboost_jax.models import inception

PIXEL = {"psnr", "ssim", "mse"}
FID_FAMILY = {"fid", "kid_mean", "kid_std", "pfid"}
CROPS = ["--num_crops", "2", "--crop_size", "8"]   # p-FID on the 16² images of the tiny model


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
    """pytorch-fid's network with random weights, saved as its `.pth` and converted by the CLI."""
    torch = pytest.importorskip("torch")
    from inception_oracle import randomized_inception

    from fmboost_jax.convert import __main__ as convert_cli
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("inception")
    torch.save(randomized_inception().state_dict(), tmp / "pt_inception.pth")
    with contextlib.redirect_stdout(io.StringIO()):
        assert convert_cli.main(["inception", "--src", str(tmp / "pt_inception.pth"),
                                 "--dst", str(tmp / "flax")]) == 0
    return str(tmp / "flax")


@pytest.fixture(scope="module")
def upsampler(tiny_workdir):
    return load_upsampler(tiny_workdir)


@pytest.fixture(scope="module")
def outputs(upsampler):
    """The tiny model's held-out ground truth (4 crops of 16²), its low-res input, the boost
    (seed 0, one batch) and bicubic, as the command scores them."""
    truth = pipeline.eval_images(upsampler.config)
    lowres = upsampler.downsample(truth)
    out = upsampler(lowres, jax.random.fold_in(jax.random.PRNGKey(0), 0))
    clip = lambda x: jnp.clip(x, -1.0, 1.0)
    return truth, {"cfm": clip(out.images), "bicubic": clip(resize(lowres, (16, 16), "bicubic"))}


@pytest.fixture(scope="module")
def fid_report(tiny_workdir, inception_dir, tmp_path_factory):
    """The command's report with every metric on 2 images (CFM and bicubic, 4 Inception
    inputs per call: Inception at 299² is slow on a CPU)."""
    out = tmp_path_factory.mktemp("fid") / "results.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert evaluate.main(["--model", tiny_workdir, "--inception", inception_dir, *CROPS,
                              "--num_images", "2", "--baselines", "bicubic",
                              "--inception_batch", "4", "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_without_inception_weights_the_fid_family_is_skipped_in_one_line(tiny_workdir, outputs,
                                                                         tmp_path, capsys):
    out = tmp_path / "sub" / "results.json"
    assert evaluate.main(["--model", tiny_workdir, "--inception", str(tmp_path / "none"),
                          "--output", str(out)]) == 0
    printed = capsys.readouterr()
    said = [line for line in printed.err.splitlines() if "Inception" in line]
    assert len(said) == 1 and said[0].startswith("skipping fid, pfid, kid: no Inception weights")
    assert ("python -m fmboost_jax.convert inception --src pt_inception-2015-12-05-6726825d.pth"
            f" --dst {tmp_path / 'none'}") in said[0]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"cfm", "bilinear", "bicubic"}
    for scores in report["results"].values():
        assert set(scores) == PIXEL and all(math.isfinite(v) for v in scores.values())
    assert set(report["skipped"]) == {"fid", "pfid", "kid"} and report["inception"] is None
    assert (report["num_images"], report["image_size"], report["step"]) == (4, [16, 16], 2)
    assert report["sampler"]["solver"] == "euler" and report["nfe"] == 2
    assert "cfm " in printed.out and not list(tmp_path.glob("sub/*.tmp*"))
    truth, preds = outputs          # the figures are those of `metrics` on the same outputs
    for method, pred in preds.items():
        for name, fn in (("psnr", metrics.psnr), ("ssim", metrics.ssim), ("mse", metrics.mse)):
            np.testing.assert_allclose(report["results"][method][name],
                                       float(np.mean(fn(pred, truth))), rtol=1e-5)


def test_with_inception_weights_every_metric_is_reported_and_finite(fid_report, inception_dir):
    assert set(fid_report["results"]) == {"cfm", "bicubic"} and fid_report["skipped"] == {}
    for scores in fid_report["results"].values():
        assert set(scores) == PIXEL | FID_FAMILY
        assert all(math.isfinite(v) for v in scores.values()), scores
    assert fid_report["results"]["cfm"]["fid"] > 0
    assert fid_report["pfid"] == {"num_crops": 2, "crop_size": 8, "crop_seed": 0}
    assert fid_report["num_images"] == 2 and fid_report["kid"]["subset_size"] == 2
    assert fid_report["inception"] == inception_dir


def test_fid_kid_and_pfid_equal_a_hand_computation_with_fid_accumulator(fid_report, outputs,
                                                                        inception_dir):
    truth, preds = outputs[0][:2], {m: p[:2] for m, p in outputs[1].items()}
    features = benchmark.InceptionFeatures(inception.load_inception(inception_dir), 4)
    seen = []                      # fake whole, real whole, real crops, fake crops

    def feature_fn(images):
        seen.append(features(images))
        return seen[-1]
    unit = lambda x: np.asarray(metrics.to_unit(x))
    acc = fid.FIDAccumulator(feature_fn, kid_max_samples=100, num_crops=2, crop_size=8,
                             crop_seed=0)
    acc.update(unit(preds["cfm"]), unit(truth))
    got = fid_report["results"]["cfm"]
    # 2 images, 4 crops: fewer than the 2048 dimensions, so the Frechet distance is taken from
    # the fake features (the identity is checked against `frechet_distance` below).
    for name, real, fake in (("fid", acc.real, seen[0]), ("pfid", acc.patch[0], seen[3])):
        g = real.gaussian()
        np.testing.assert_allclose(got[name], fid.frechet_distance_to_samples(g.mu, g.sigma, fake),
                                   rtol=1e-4)
    kid = fid.kernel_inception_distance(acc.kid[0].features, acc.kid[1].features)
    np.testing.assert_allclose([got["kid_mean"], got["kid_std"]], kid, rtol=1e-3, atol=1e-7)


def toy_features(images):
    """(B, H, W, 3) in [0, 1] -> (B, 48): the 4 x 4 average-pooled colours."""
    x = np.asarray(images, np.float64)
    b, h, w, _ = x.shape
    return x.reshape(b, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4)).reshape(b, 48)


@pytest.mark.parametrize("num_images", [6, 64])       # fewer, and more, than 48 dimensions
def test_the_core_equals_fid_accumulator_for_few_and_many_images(num_images):
    rng = np.random.default_rng(0)
    truth = rng.uniform(-1, 1, (num_images, 16, 16, 3)).astype(np.float32)
    preds = {m: np.clip(truth + rng.normal(0, s, truth.shape), -1, 1).astype(np.float32)
             for m, s in (("a", 0.1), ("b", 0.5))}
    bench = benchmark.Benchmark(("a", "b"), features=toy_features, num_crops=3, crop_size=8,
                                crop_seed=5, kid_max_samples=100)
    accs = {m: fid.FIDAccumulator(toy_features, kid_max_samples=100,
                                  num_crops=3, crop_size=8, crop_seed=5) for m in preds}
    for lo in range(0, num_images, 4):              # batches of 4, the last one smaller
        bench.update(truth[lo:lo + 4], {m: p[lo:lo + 4] for m, p in preds.items()})
        for m, acc in accs.items():
            acc.update((preds[m][lo:lo + 4] + 1) / 2, (truth[lo:lo + 4] + 1) / 2)
    results = bench.results()
    for m, acc in accs.items():
        want = acc.results()
        for name in ("fid", "pfid", "kid_mean", "kid_std"):   # FID: sqrtm there, eigh here
            np.testing.assert_allclose(results[m][name], want[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(results[m]["psnr"], float(np.mean(metrics.psnr(
            jnp.asarray(preds[m]), jnp.asarray(truth)))), rtol=1e-6)
        assert set(results[m]) == PIXEL | FID_FAMILY
    assert results["a"]["fid"] < results["b"]["fid"] and results["a"]["pfid"] < results["b"]["pfid"]


def test_the_frechet_distance_to_few_samples_is_the_full_one():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(40, 32)), rng.normal(1.0, 2.0, size=(5, 32))
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    want = fid.frechet_distance(mu, sigma, fake.mean(0), np.cov(fake, rowvar=False), method="eigh")
    np.testing.assert_allclose(fid.frechet_distance_to_samples(mu, sigma, fake), want, rtol=1e-7)


def test_the_training_evaluator_scores_the_fid_family_as_the_command(fid_report, upsampler,
                                                                     inception_dir, monkeypatch):
    from fmboost_jax.evaluation.evaluator import Evaluator
    from fmboost_jax.parallel import sharding
    monkeypatch.setattr(benchmark, "INCEPTION_BATCH", 4)
    config = upsampler.config.copy_and_resolve_references()
    config.eval.update(metrics=("psnr", "fid", "kid"), inception=inception_dir,
                       baselines=("bicubic",))
    config.data.num_eval_images = 2
    benchmark.check_config(config)
    evaluator = Evaluator(upsampler.cfm, config, pipeline.eval_images(config),
                          sharding.make_mesh(config.mesh))
    params, fs_params = jax.device_get((upsampler.params, upsampler.fs_params))
    results, _ = evaluator.run(params, fs_params, jax.random.PRNGKey(0))
    for method in ("cfm", "bicubic"):
        for name in ("psnr", "fid", "kid_mean", "kid_std"):
            np.testing.assert_allclose(results[f"{method}/{name}"],
                                       fid_report["results"][method][name], rtol=1e-4,
                                       atol=1e-7)
    assert not {"bilinear/psnr", "cfm/ssim", "cfm/pfid"} & set(results)


def test_config_eval_is_checked_before_training_starts(tmp_path):
    import support

    from fmboost_jax.errors import ConfigError
    from fmboost_jax.train.setup import validate
    c = support.tiny_pixel_config()
    c.eval.metrics = ("psnr,fid",)            # as --config.eval.metrics=psnr,fid gives it
    validate(c)
    assert benchmark.eval_names(c, "metrics") == ("psnr", "fid")
    benchmark.check_resources(c)              # no inception set: skipped with a warning
    c.eval.inception = str(tmp_path / "none")
    with pytest.raises(ConfigError, match="config.eval.inception: '.*none' does not exist"):
        benchmark.check_resources(c)
    c.eval.metrics = ("psnr", "fidd")
    with pytest.raises(ConfigError, match="config.eval.metrics: unknown 'fidd'"):
        validate(c)
    c.eval.metrics = ("pfid",)                # 512² crops of the 16² held-out images
    with pytest.raises(ConfigError, match="config.eval.crop_size: crop size 512 does not fit"):
        validate(c)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An empty folder and one with two photos of 20 x 24 px."""
    root = tmp_path_factory.mktemp("folders")
    (root / "empty").mkdir()
    (root / "photos").mkdir()
    Image.fromarray(skimage.data.astronaut()[100:120, 180:204]).save(root / "photos" / "a.png")
    Image.fromarray(skimage.data.coffee()[50:70, 60:84]).save(root / "photos" / "b.png")
    return root


def test_a_folder_of_images_is_scored_at_the_size_asked(tiny_workdir, folders, tmp_path):
    out = tmp_path / "r.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert evaluate.main(["--model", tiny_workdir, "--images", str(folders / "photos"),
                              "--image_size", "8", "--metrics", "psnr", "--baselines", "",
                              "--num_steps", "1", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["num_images"], report["image_size"], report["data"]["name"]) == \
        (2, [8, 8], "folder")
    assert set(report["results"]) == {"cfm"} and report["sampler"]["num_steps"] == 1


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/none"], "--model '.*none' does not exist"),
    (["--metrics", "psnr,fidd"], "--metrics: unknown 'fidd' \\(known: fid, pfid, kid, psnr"),
    (["--baselines", "cubic"], "--baselines: unknown 'cubic'"),
    (["--crop_size", "64"], "--crop_size 64 does not fit the 16x16 images"),
    (["--images", "{folders}/empty"], "--images: no image files .* under '.*empty'"),
    (["--data.eval_photo", "coffee"], "--data.eval_photo: config.data has no field"),
    (["--data.num_eval_images=many"], "--data.num_eval_images='many' is not an integer"),
    (["--sampling.nfe=3"], "--sampling.nfe: config.sampling has no field"),
    (["--frobnicate"], "unrecognized argument '--frobnicate'"),
    (["--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
    (["--num_points", "1"], "--num_points: must be >= 2, got 1"),
    (["--compare_model", "regression"], "--compare_model 'regression': give NAME=WORKDIR"),
    (["--compare_model", "bicubic={tmp}"],
     "--compare_model 'bicubic=.*': the name 'bicubic' is taken"),
])
def test_bad_input_is_one_line_naming_it_with_status_2(tiny_workdir, folders, tmp_path, capsys,
                                                       args, message):
    import re
    args = [a.format(tmp=tmp_path, folders=folders) for a in args]
    if "--model" not in args:
        args = ["--model", tiny_workdir, *args]
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([*args, "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert re.match("error: " + message, err[0]), err[0]
    assert not (tmp_path / "r.json").exists()


def test_another_model_is_scored_on_the_same_inputs_with_its_own_sampler(tiny_workdir, tmp_path):
    """`--compare_model NAME=WORKDIR` (e.g. the regression baseline): the same model under another
    name scores exactly as `cfm` (the same low-res inputs and noise)."""
    out = tmp_path / "r.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert evaluate.main(["--model", tiny_workdir, "--compare_model", f"again={tiny_workdir}",
                              "--metrics", "psnr,ssim", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["cfm", "again", "bilinear", "bicubic"]
    assert report["results"]["again"] == report["results"]["cfm"]
    assert report["compared"]["again"]["sampler"]["solver"] == "euler"
