"""Tests of fmboost_jax/data/precompute.py: latents precomputed on two devices into a bucket (a
GCS server on loopback), resumed, and read by the trainer from there."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from photo_folder import lhq_smoke_config
from support import ROOT, devices_env

from fmboost_jax import paths
from fmboost_jax.data import images as images_lib
from fmboost_jax.data import pipeline, sources

PRECOMPUTE_TWICE = """
import json, os, sys
from absl import flags
flags.FLAGS.mark_as_parsed()
sys.path.insert(0, "tests")
import photo_folder
from fmboost_jax import paths
from fmboost_jax.data.precompute import precompute
config, out = photo_folder.lhq_smoke_config(sys.argv[1]), sys.argv[2]
first = precompute(config, out, batch_size=2, chunk_batches=2)
for name in ("latents-p000000-of-000001-c00001.array_record", "done-p000000-of-000001.json"):
    paths.path(paths.join(out, name)).unlink()
second = precompute(config, out, batch_size=2, chunk_batches=2)
print(json.dumps([first, second]))
"""


@pytest.mark.slow
def test_latents_precomputed_on_two_devices_match_the_vae_resume_and_train_a_few_steps(
        photo_folder, gcs_bucket, tmp_path, caplog):
    import subprocess
    import sys

    from fmboost_jax.cfm.model import CFM
    from fmboost_jax.cfm.upsampling import resize
    from fmboost_jax.data.precompute import precompute
    from fmboost_jax.train.loop import train_and_evaluate
    out = f"{gcs_bucket}/latents"
    proc = subprocess.run(
        [sys.executable, "-c", PRECOMPUTE_TWICE, str(photo_folder), str(out)], cwd=ROOT,
        env=devices_env(2),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    # 11 training files (astronaut and truncated are held out): fake and tiny are skipped and
    # logged with their paths, and so is the truncated one among the held-out images.
    assert first["devices"] == 2 and (first["written"], first["skipped"]) == (9, 2)
    for name in ("fake.jpg", "truncated.png", "tiny.png"):
        assert name in proc.stderr
    assert second["written"] + second["skipped"] == 4      # only the deleted chunk again
    assert len(paths.glob(out, "*.array_record")) == 3 and not os.path.exists(ROOT + "/gs:")

    # The records hold the VAE moments of the image and of its PSU input, computed unsharded.
    config = lhq_smoke_config(photo_folder)
    recs = sources.LatentRecordSource(out)                 # staged on the local disk
    assert len(recs) == 9 and "image" not in recs[0]
    fs = CFM.from_config(config).first_stage
    params = fs.init_params(jax.random.PRNGKey(0))
    cfm = CFM.from_config(config)
    for i in (0, 5):
        rec = recs[i]
        img = images_lib.decode_rgb(open(rec["name"], "rb").read(), rec["name"])
        x = jnp.asarray(images_lib.center_crop(img, 64))[None]
        psu = resize(cfm.lowres_images(x), (64, 64), "bilinear")
        mean, logvar = fs.moments(params, jnp.concatenate([x, psu]))
        np.testing.assert_allclose(rec["mean"], mean[0], atol=1e-4)
        np.testing.assert_allclose(rec["logvar"], logvar[0], atol=1e-4)
        np.testing.assert_allclose(rec["mean_lowres"], mean[1], atol=1e-4)
        np.testing.assert_allclose(rec["logvar_lowres"], logvar[1], atol=1e-4)
        assert rec["mean"].shape == (8, 8, 4)

    # Resuming with another layout would mix shards: refused, naming what changed.
    with pytest.raises(ValueError, match="images_per_chunk: 4 -> 8"):
        precompute(config, out, batch_size=4, chunk_batches=2)

    # Training evaluates on the held-out images written next to the records.
    latents = config.copy_and_resolve_references()
    latents.data.update(name="latents", path=out)
    np.testing.assert_array_equal(pipeline.eval_images(latents), pipeline.eval_images(config))
    paths.path(f"{out}/done-p000000-of-000001.json").unlink()
    pipeline.check_data(latents)
    other = latents.copy_and_resolve_references()
    other.low_res_size = 16                    # the PSU latents depend on it
    with pytest.raises(ValueError, match="made with low_res_size=32, but config.low_res_size is 16"):
        pipeline.check_data(other)
    assert "incomplete (0 of 1 processes finished)" in caplog.text
    batch = next(pipeline.create_train_iterator(latents))
    assert batch["latent"].shape == batch["latent_lowres"].shape == (4, 8, 8, 4)
    final = train_and_evaluate(latents, f"{gcs_bucket}/run")
    assert final["step"] == 3 and np.isfinite(final["cfm/psnr"])
