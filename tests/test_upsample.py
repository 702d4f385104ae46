"""Tests of `python -m fmboost_jax.upsample` (fmboost_jax/upsample.py): a file with its
comparison, a folder with a corrupt file, resuming, and one-line errors."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image
from support import ROOT, decompression_bomb

from fmboost_jax import upsample
from fmboost_jax.data import images as images_lib
from fmboost_jax.evaluation import metrics


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small crops of real photos (one nested, one grayscale), a corrupt file and a text file."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "sub").mkdir()
    Image.fromarray(skimage.data.astronaut()[100:116, 180:196]).save(root / "astronaut.png")
    Image.fromarray(skimage.data.coffee()[50:56, 60:72]).save(root / "sub" / "coffee.jpg")
    Image.fromarray(skimage.data.camera()[:16, :16]).save(root / "camera.png")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_file_is_boosted_4x_with_a_labelled_comparison(tiny_workdir, inputs, tmp_path, capsys):
    out = tmp_path / "astronaut_4x.png"
    assert upsample.main(["--model", tiny_workdir, "--input", str(inputs / "astronaut.png"),
                          "--output", str(out), "--compare", "--num_steps", "2"]) == 0
    assert Image.open(out).size == (64, 64)
    compare = np.asarray(Image.open(tmp_path / "astronaut_4x_compare.png"))
    assert compare.shape == (64, 128, 3)
    assert "1 written, 0 already there, 0 skipped" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_ground_truth_is_down_sampled_boosted_compared_and_scored(tiny_workdir, tmp_path, capsys):
    truth = skimage.data.astronaut()[100:150, 180:215]                   # 50 x 35 px
    Image.fromarray(truth).save(tmp_path / "truth.png")
    assert upsample.main(["--model", tiny_workdir, "--input", str(tmp_path / "truth.png"),
                          "--output", str(tmp_path / "out.png"), "--ground_truth", "--compare",
                          "--num_steps", "1"]) == 0
    assert Image.open(tmp_path / "out.png").size == (32, 48)             # 4x of 12 x 8 px
    compare = np.asarray(Image.open(tmp_path / "out_compare.png"))
    assert compare.shape == (48, 96, 3)                                  # bicubic | CFM | truth
    np.testing.assert_array_equal(compare[16:, 64:], truth[1 + 16:49, 1:33])  # centre crop
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith(f"{tmp_path / 'truth.png'}: CFM ") and "bicubic" in lines[-2]
    # The scores are those of the images as written: the boost, and bicubic against the truth
    # (here below the panels' labels).
    out = images_lib.to_float(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")))
    truth_crop = images_lib.to_float(truth[1:49, 1:33])
    bicubic = images_lib.to_float(compare[:, :32])
    printed = [float(x) for x in re.findall(r"([0-9.]+) dB", lines[-2])]
    assert printed[0] == pytest.approx(float(metrics.psnr(out[None], truth_crop[None])[0]), abs=0.006)
    below = float(metrics.psnr(bicubic[None, 16:], truth_crop[None, 16:])[0])
    assert printed[1] == pytest.approx(below, abs=1.5)                  # the labels cover a corner
    assert lines[-1].startswith("mean of 1 images against the ground truth: CFM ")


def test_a_folder_skips_the_corrupt_file_counts_it_and_a_rerun_resumes(tiny_workdir, inputs,
                                                                         tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", tiny_workdir, "--input", str(inputs), "--output", str(out),
            "--num_steps", "1", "--batch_size", "2"]
    assert upsample.main(args) == 0
    printed = capsys.readouterr()
    assert "3 written, 0 already there, 1 skipped" in printed.out
    assert "broken.png" in printed.err
    assert Image.open(out / "sub" / "coffee.png").size == (48, 24)      # 12x6 -> 48x24
    assert Image.open(out / "sub" / "coffee.png").mode == "RGB"
    assert Image.open(out / "camera.png").mode == "L"                   # grayscale in and out
    os.remove(out / "camera.png")
    assert upsample.main(args) == 0
    assert "1 written, 2 already there, 1 skipped" in capsys.readouterr().out


def test_bad_arguments_end_in_one_line_with_status_2(tiny_workdir, inputs, tmp_path):
    cases = [
        (["--model", str(tmp_path / "none"), "--input", str(inputs / "camera.png")],
         "does not exist"),
        (["--model", tiny_workdir, "--input", str(tmp_path / "missing.png")],
         "--input '.*missing.png' does not exist"),
        (["--model", tiny_workdir, "--input", str(inputs / "broken.png")],
         "broken.png: not a readable image"),
        (["--model", tiny_workdir, "--input", str(tmp_path / "bomb.png")],
         r"bomb.png: 100000x100000 = 10,000,000,000 pixels is above the limit"),
        (["--model", tiny_workdir, "--input", str(inputs / "camera.png"), "--max_pixels", "255"],
         r"16x16 = 256 pixels is above the limit of 255 \(data.max_pixels / --max_pixels"),
    ]
    (tmp_path / "bomb.png").write_bytes(decompression_bomb(100_000, 100_000))
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "fmboost_jax.upsample", *args,
                               "--output", str(tmp_path / "x.png")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, proc.stderr
        import re
        assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "x.png").exists()


def test_converted_params_with_a_config_boost_and_unsuitable_sizes_are_named(
        smoke_params, inputs, tmp_path, capsys):
    # a tiny random VAE, 2x, output sizes in multiples of 8 px
    args = ["--model", smoke_params, "--config", "lhq:smoke", "--num_steps", "1"]
    assert upsample.main([*args, "--input", str(inputs / "astronaut.png"),   # 16 -> 32 px
                          "--output", str(tmp_path / "a.png")]) == 0
    assert Image.open(tmp_path / "a.png").size == (32, 32)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:                              # 12x6 -> 24x12
        upsample.main([*args, "--input", str(inputs / "sub" / "coffee.jpg"),
                       "--output", str(tmp_path / "c.png")])
    assert exit_info.value.code == 2
    assert "output size 12x24 px is not a multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_latents_of_a_diffusion_model_in_npy_and_a_cascade_of_two_models(smoke_params, tmp_path,
                                                                         capsys):
    z = np.random.default_rng(0).normal(size=(3, 4, 2, 2)).astype(np.float32)   # NCHW, 16² px
    np.save(tmp_path / "sd.npy", z)
    args = ["--model", smoke_params, "--config", "lhq:smoke", "--num_steps", "1",
            "--batch_size", "2"]
    assert upsample.main([*args, "--input", str(tmp_path / "sd.npy"),
                          "--output", str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["sd_0000.png", "sd_0001.png", "sd_0002.png"]
    assert Image.open(tmp_path / "out" / "sd_0000.png").size == (32, 32)     # 2x of 16 px
    assert "3 written" in capsys.readouterr().out
    np.save(tmp_path / "wrong.npy", np.zeros((1, 16, 2, 2), np.float32))
    with pytest.raises(SystemExit):
        upsample.main([*args, "--input", str(tmp_path / "wrong.npy"), "--output", str(tmp_path)])
    assert "do not have the 4 channels of the model's VAE" in capsys.readouterr().err
    image = tmp_path / "small.png"
    Image.fromarray(skimage.data.chelsea()[100:116, 100:116]).save(image)
    cascade = ["--model", smoke_params, "--model", smoke_params, "--config", "lhq:smoke",
               "--num_steps", "1"]
    assert upsample.main([*cascade, "--input", str(image), "--output", str(tmp_path / "big.png"),
                          "--compare"]) == 0
    assert Image.open(tmp_path / "big.png").size == (64, 64)                  # 2x, then 2x
    assert Image.open(tmp_path / "big_compare.png").size == (128, 64)


def test_latent_files_are_read_without_pickle(tmp_path):
    objects = np.array([{"latents": 1}, "z"], dtype=object)        # needs pickle to load
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy' is not a numeric .npy array"):
        upsample.read_latents(str(tmp_path / "objects.npy"), 4)
    z = np.zeros((2, 4, 8, 8), np.float32)                          # NCHW, as PyTorch gives it
    np.save(tmp_path / "z.npy", z)
    assert upsample.read_latents(str(tmp_path / "z.npy"), 4).shape == (2, 8, 8, 4)



def test_a_resumed_folder_writes_what_an_uninterrupted_run_writes(smoke_params, tmp_path):
    """A batch's noise comes from the index of its first file, not from its place among the
    files still to do: outputs deleted from the middle of batches come back byte for byte."""
    photos = tmp_path / "in"
    photos.mkdir()
    astronaut = skimage.data.astronaut()
    for i in range(5):
        Image.fromarray(astronaut[16 * i:16 * i + 16, 200:216]).save(photos / f"p{i}.png")
    out = tmp_path / "out"
    args = ["--model", smoke_params, "--config", "lhq:smoke", "--num_steps", "1",
            "--batch_size", "2", "--input", str(photos), "--output", str(out), "--seed", "3"]
    assert upsample.main(args) == 0
    first = {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}
    assert len(first) == 5 and len(set(first.values())) == 5
    for f in ("p1.png", "p3.png"):                  # the second image of two batches
        os.remove(out / f)
    assert upsample.main(args) == 0
    assert {f: (out / f).read_bytes() for f in sorted(os.listdir(out))} == first


@pytest.mark.parametrize("extra, message", [
    (["--compare"], "--compare: only for image inputs, and --input '.*z.npy' holds latents"),
    (["--ground_truth", "--max_pixels", "9"],
     "--ground_truth, --max_pixels: only for image inputs"),
    (["--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
    (["--num_steps", "0"], "--num_steps: must be >= 1, got 0"),
    (["--step", "1", "--model", "{model}"], "--step picks the checkpoint of one --model"),
    (["--frobnicate"], "unrecognized argument '--frobnicate'"),
])
def test_options_that_do_nothing_or_are_out_of_range_are_refused_before_any_work(
        smoke_params, tmp_path, monkeypatch, capsys, extra, message):
    import re
    np.save(tmp_path / "z.npy", np.zeros((1, 2, 2, 4), np.float32))
    monkeypatch.setattr(upsample, "load_model", lambda args: pytest.fail("a model was loaded"))
    extra = [a.format(model=smoke_params) for a in extra]
    with pytest.raises(SystemExit) as exit_:
        upsample.main(["--model", smoke_params, "--config", "lhq:smoke", "--input",
                       str(tmp_path / "z.npy"), "--output", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert re.match("error: " + message, err[0]), err[0]
    assert not (tmp_path / "out").exists()


def test_sampler_fields_are_set_by_name_and_a_bad_one_is_named(smoke_params, tmp_path, capsys):
    np.save(tmp_path / "z.npy", np.zeros((1, 2, 2, 4), np.float32))
    args = ["--model", smoke_params, "--config", "lhq:smoke", "--input", str(tmp_path / "z.npy"),
            "--output", str(tmp_path / "out"), "--num_steps", "1"]
    with pytest.raises(SystemExit) as exit_:
        upsample.main([*args, "--sampling.nfe=2"])
    assert exit_.value.code == 2
    assert "error: --sampling.nfe: config.sampling has no field 'nfe'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        upsample.main([*args, "--sampling.last_step_size=0.5", "--solver", "euler_maruyama",
                       "--sampling.diffusion_form=cubic"])
    assert "sampling.diffusion_form" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_bug_is_not_a_user_error_and_keeps_its_traceback(tiny_workdir, inputs, tmp_path,
                                                          monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not the user's input")
    monkeypatch.setattr(upsample, "_boost", broken)
    with pytest.raises(ValueError, match="a bug"):
        upsample.main(["--model", tiny_workdir, "--input", str(inputs / "astronaut.png"),
                       "--output", str(tmp_path / "a.png"), "--num_steps", "1"])
