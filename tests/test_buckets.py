"""Runs on gs:// against a real GCS server on loopback (fake-gcs-server, `gcs_server.py`), with
the public commands as a pod user types them: a run trains on a bucket (`python -m
fmboost_jax.train`), is killed and resumes bitwise; its model is loaded, boosts a folder of the
bucket into the bucket and is evaluated from there (`upsample` and `evaluate`, called
in-process). Precomputing latents to a bucket and training from them is
tests/data/test_precompute.py.
Nothing named `gs:` may appear on the local disk."""

import io
import json
import os
import signal
import time

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image
from support import ROOT
from training_runs import FINAL_ONLY, TOTAL, finish, max_diff, start

from fmboost_jax import evaluate, paths, upsample
from fmboost_jax.checkpoints.store import restore_params


def bucket_steps(workdir: str) -> list[int]:
    """Committed checkpoint steps of a run on a bucket (no rename there: Orbax writes a step in
    place and marks it complete with `commit_success.txt`)."""
    found = paths.glob(paths.join(workdir, "checkpoints"), "*/commit_success.txt")
    return sorted(int(p.split("/")[-2]) for p in found if p.split("/")[-2].isdigit())


@pytest.mark.slow
def test_a_run_on_a_bucket_is_killed_resumes_bitwise_and_its_model_boosts_and_scores_from_there(
        gcs_bucket, reference, capsys):
    workdir = f"{gcs_bucket}/runs/tiny"
    proc = start(workdir)
    while max(bucket_steps(workdir), default=0) < 3:
        assert proc.poll() is None, finish(proc)[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)                     # no clean-up: mid-step or mid-save
    finish(proc)
    killed_at = bucket_steps(workdir)[-1]
    assert killed_at < TOTAL
    out = finish(start(workdir, FINAL_ONLY))
    assert f"Restoring checkpoint of step {killed_at}" in out, out[-3000:]
    assert bucket_steps(workdir)[-1] == TOTAL
    params, ema = reference                                  # the same run, uninterrupted, on disk
    assert max_diff(restore_params(workdir, use_ema=False), params) == 0.0
    assert max_diff(restore_params(workdir), ema) == 0.0
    # No append on a bucket: metrics.jsonl is rewritten whole, keeping the first start's rows.
    rows = [json.loads(r) for r in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    logged = {r["step"] for r in rows if "loss" in r}
    assert set(range(1, TOTAL + 1)) <= logged, sorted(logged)
    assert paths.glob(f"{workdir}/tensorboard", "events*")
    assert json.loads(paths.read_text(f"{workdir}/eval.json"))["step"] == TOTAL

    # The model boosts a folder of the bucket into the bucket, and is scored from there.
    for name, image in (("a.png", skimage.data.astronaut()[100:116, 180:196]),
                        ("sub/b.png", skimage.data.coffee()[50:58, 60:72])):
        with paths.atomic_write(f"{gcs_bucket}/in/{name}") as f:
            Image.fromarray(image).save(f, format="PNG")
    assert upsample.main(["--model", workdir, "--input", f"{gcs_bucket}/in",
                          "--output", f"{gcs_bucket}/out", "--num_steps", "1"]) == 0
    assert "2 written, 0 already there, 0 skipped" in capsys.readouterr().out
    boosted = paths.read_bytes(f"{gcs_bucket}/out/sub/b.png")
    with Image.open(io.BytesIO(boosted)) as img:
        assert img.size == (48, 32)                                       # 12x8 -> 48x32
    assert evaluate.main(["--model", workdir, "--images", f"{gcs_bucket}/in", "--image_size", "8",
                          "--metrics", "psnr", "--baselines", "bicubic", "--num_steps", "1",
                          "--output", f"{gcs_bucket}/eval/r.json"]) == 0
    report = json.loads(paths.read_text(f"{gcs_bucket}/eval/r.json"))
    assert report["num_images"] == 2 and np.isfinite(report["results"]["cfm"]["psnr"])

    # In Python: the same model from the bucket boosts as the one of the local reference run.
    from fmboost_jax.inference.upsampler import load_upsampler
    up = load_upsampler(workdir)
    lowres = np.zeros((1, 4, 4, 3), np.float32)
    assert up(lowres, jax.random.PRNGKey(0), solver="euler", num_steps=1).images.shape == (1, 16, 16, 3)
    assert not os.path.exists(os.path.join(ROOT, "gs:")) and not os.path.exists("gs:")
