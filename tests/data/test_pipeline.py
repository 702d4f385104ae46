"""Tests of fmboost_jax/data/: decoding odd files, the grain pipeline on real photos mixed with
corrupt ones, determinism and resumption, per-process shards, the TFDS builder, start-up checks,
and precomputed latents feeding the trainer."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image

import tiny_config
from fmboost_jax.data import images as images_lib
from fmboost_jax.data import pipeline, sources

from support import ROOT
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def _png(array, mode=None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Six real photos in nested folders, plus odd-but-usable and unusable files."""
    root = tmp_path_factory.mktemp("photos")
    (root / "a" / "b").mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        img = getattr(skimage.data, name)()
        ext = (".jpg", ".png", ".webp")[i % 3]
        Image.fromarray(img[..., :3]).save(root / ("a" if i % 2 else "a/b") / f"{name}{ext}")
    Image.fromarray(skimage.data.camera()).save(root / "gray.png")                 # grayscale
    Image.fromarray(skimage.data.coins()).convert("CMYK").save(root / "cmyk.jpg")   # CMYK
    (root / "sixteen.png").write_bytes(_png((skimage.data.moon().astype(np.uint16) * 257)))
    rgba = np.dstack([skimage.data.astronaut(), np.full((512, 512), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")                          # alpha
    (root / "notes.txt").write_text("not an image, not listed")
    (root / "fake.jpg").write_bytes(b"this is not a jpeg")                           # non-image
    full = (root / "a" / "astronaut.png").read_bytes() if (root / "a" / "astronaut.png").exists() \
        else _png(skimage.data.astronaut())
    (root / "truncated.png").write_bytes(full[: len(full) // 3])                     # truncated
    Image.fromarray(skimage.data.astronaut()[:40, :40]).save(root / "tiny.png")     # too small
    return root


def config_for(path, **data):
    c = tiny_config.get_config()
    c.data.update(**{"name": "folder", "path": str(path), "num_eval_images": 2, **data})
    c.high_res_size, c.low_res_size, c.batch_size = 64, 16, 4
    return c


def test_odd_images_are_converted_and_bad_ones_rejected_with_their_path(photo_folder):
    read = lambda name: images_lib.decode_rgb((photo_folder / name).read_bytes(), name)
    for name in ("gray.png", "cmyk.jpg", "sixteen.png", "alpha.png"):
        img = read(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
    assert abs(int(read("sixteen.png").astype(int).max()) - int(skimage.data.moon().max())) <= 1
    alpha = read("alpha.png").astype(int)      # composited on white at 50% opacity
    expected = (skimage.data.astronaut().astype(int) * 128 + 255 * 127) // 255
    assert np.abs(alpha - expected).max() <= 2
    for name in ("fake.jpg", "truncated.png"):
        with pytest.raises(images_lib.BadImage, match=name):
            read(name)
    with pytest.raises(images_lib.BadImage, match="tiny.png: 40x40 is smaller than"):
        images_lib.center_crop(read("tiny.png"), 64, "tiny.png", min_size=64)


def test_native_crops_are_exact_windows_and_resized_crops_see_the_whole_photo():
    yy, xx = np.mgrid[:300, :700]
    img = np.stack([yy % 256, xx % 256, (yy // 256) * 16 + xx // 256], -1).astype(np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(5):
        crop = np.round((images_lib.random_crop(img, 64, rng, False, resize=False) + 1) * 127.5)
        r, g, b = crop[0, 0].astype(int)
        y, x = (b // 16) * 256 + r, (b % 16) * 256 + g
        np.testing.assert_array_equal(crop, img[y:y + 64, x:x + 64])
    # "resize": the shorter side (300) becomes 64, so a crop spans all rows of the photo.
    ramp = np.repeat((yy * 255 // 299).astype(np.uint8)[..., None], 3, -1)
    crop = np.round((images_lib.random_crop(ramp, 64, rng, False) + 1) * 127.5)
    assert crop[0, 0, 0] < 5 and crop[-1, 0, 0] > 250
    small = images_lib.random_crop(img[:40, :50], 64, rng, True, resize=False)   # up-sized
    assert small.shape == (64, 64, 3)
    with pytest.raises(images_lib.BadImage, match="smaller than the minimum side 100"):
        images_lib.random_crop(img[:90], 64, rng, True, "x.png", min_size=100, resize=False)


def test_the_folder_pipeline_skips_bad_files_and_gives_batches_of_crops(photo_folder, caplog):
    files = sources.list_images(photo_folder)
    assert len(files) == 13 and not any(f.endswith(".txt") for f in files)
    config = config_for(photo_folder)
    pipeline.check_data(config)
    it = pipeline.create_train_iterator(config)
    batches = [next(it) for _ in range(6)]           # > 2 epochs of the 11 training files
    for b in batches:
        assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "fake.jpg" in skipped or "truncated.png" in skipped or "tiny.png" in skipped
    evals = pipeline.eval_images(config)     # 2 files held out; a bad one is skipped
    assert 1 <= evals.shape[0] <= 2 and evals.shape[1:] == (64, 64, 3)


def test_same_seed_same_batches_and_a_restored_state_continues_exactly(photo_folder):
    config = config_for(photo_folder)
    a, b = pipeline.create_train_iterator(config), pipeline.create_train_iterator(config)
    for _ in range(3):
        np.testing.assert_array_equal(next(a)["image"], next(b)["image"])
    state = json.loads(json.dumps(a.get_state()))       # as the checkpoint stores it
    expected = [next(a)["image"] for _ in range(3)]
    resumed = pipeline.create_train_iterator(config)
    resumed.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(resumed)["image"], e)
    config.seed = 1
    other = pipeline.create_train_iterator(config)
    assert not np.array_equal(next(other)["image"], next(pipeline.create_train_iterator(
        config_for(photo_folder)))["image"])


def test_process_shards_are_disjoint_and_cover_the_data(photo_folder):
    import grain
    src = sources.FolderSource(sources.list_images(photo_folder))
    ds = grain.MapDataset.source(src)
    shards = [[ex["path"] for ex in pipeline.process_shard(ds, i, 3)] for i in range(3)]
    flat = [p for s in shards for p in s]
    assert len(flat) == len(set(flat)) == len(src)
    assert sorted(flat) == sorted(src.files)
    config = config_for(photo_folder)
    parts = [next(pipeline.create_train_iterator(config, i, 2))["image"] for i in range(2)]
    assert parts[0].shape == (2, 64, 64, 3) and not np.array_equal(parts[0], parts[1])


def test_the_faceshq_builder_reads_celebahq_arrays_and_ffhq_images_losslessly(tmp_path):
    from fmboost_jax.data.prepare import prepare
    manual = tmp_path / "faceshq"
    (manual / "celebahq").mkdir(parents=True)
    (manual / "ffhq").mkdir()
    photos = {n: getattr(skimage.data, n)()[..., :3] for n in ("astronaut", "coffee", "rocket")}
    for i, (name, img) in enumerate(photos.items()):     # PGGAN's (1, 3, H, W) uint8 arrays
        np.save(manual / "celebahq" / f"imgHQ{i:05d}.npy", img.transpose(2, 0, 1)[None])
        Image.fromarray(img).save(manual / "ffhq" / f"{i:05d}.png")
    np.save(manual / "celebahq" / "imgHQ99999.npy", np.zeros((3, 8), np.float32))   # not an image
    prepare("faceshq", str(manual), str(tmp_path / "tfds"))
    train = sources.TfdsSource("faceshq", str(tmp_path / "tfds"), "train")
    val = sources.TfdsSource("faceshq", str(tmp_path / "tfds"), "validation")
    assert (len(train), len(val)) == (4, 2)        # the last file of each part validates
    originals = {f"{d}/{f}": photos[n] for i, n in enumerate(photos)
                 for d, f in (("celebahq", f"imgHQ{i:05d}.npy"), ("ffhq", f"{i:05d}.png"))}
    for src in (train, val):
        for i in range(len(src)):
            ex = src[i]
            name = ex["path"].split(":", 1)[1]
            np.testing.assert_array_equal(images_lib.decode_rgb(ex["bytes"]), originals[name])
    for f in (manual / "ffhq").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="--manual_dir: no image files .* under .*ffhq"):
        prepare("faceshq", str(manual), str(tmp_path / "tfds2"))
    (manual / "ffhq").rmdir()
    with pytest.raises(FileNotFoundError, match="--manual_dir: FacesHQ needs .*ffhq"):
        prepare("faceshq", str(manual), str(tmp_path / "tfds2"))


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_states_as_one_process(photo_folder, caplog):
    plain = pipeline.create_train_iterator(config_for(photo_folder, read_threads=2))
    next(plain)
    workers = pipeline.create_train_iterator(config_for(photo_folder, worker_count=2))
    workers.set_state(json.loads(json.dumps(plain.get_state())))
    try:
        for _ in range(4):     # past two epochs: skipped files and reshuffles included
            np.testing.assert_array_equal(next(workers)["image"], next(plain)["image"])
        assert workers.get_state() == plain.get_state()
    finally:
        workers.close()
    assert "fake.jpg" in caplog.text     # skips are logged by the main process


def test_bad_paths_and_unusable_folders_fail_at_start_up_naming_the_path(photo_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.check_data(config_for(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        pipeline.check_data(config_for(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(100):    # (grain's shuffle is slow on very small datasets)
        (bad / f"x{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"none of the first 32 images of .*bad is usable"):
        pipeline.check_data(config_for(bad))
    # Past the start-up check, a shard with nothing usable raises instead of spinning forever.
    with pytest.raises(ValueError, match=r"1000 of the last 1000 examples of folder .*bad.* were unusable"):
        next(pipeline.create_train_iterator(config_for(bad, read_threads=0, prefetch=0)))
    with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset"):
        pipeline.check_data(config_for(tmp_path, name="tfds", tfds_name="lhq"))
    with pytest.raises(FileNotFoundError, match="no latent records"):
        pipeline.check_data(config_for(tmp_path, name="latents"))
    from fmboost_jax.data.precompute import precompute
    with pytest.raises(ValueError, match="first_stage.name='identity'.*needs a VAE"):
        precompute(config_for(photo_folder), str(tmp_path / "out"))


def test_the_tfds_builder_writes_the_usable_photos_and_the_pipeline_reads_them(photo_folder, tmp_path):
    from fmboost_jax.data.prepare import prepare
    out = prepare("image_folder", str(photo_folder), str(tmp_path / "tfds"), name="test_photos")
    assert os.path.isdir(out)
    train = sources.TfdsSource("test_photos", str(tmp_path / "tfds"), "train")
    val = sources.TfdsSource("test_photos", str(tmp_path / "tfds"), "validation")
    # 13 files, 1 for validation; fake, truncated and tiny (< 256 px) are left out.
    assert len(train) + len(val) == 10 and len(val) == 1
    names = {train[i]["path"].split(":", 1)[1] for i in range(len(train))}
    assert "fake.jpg" not in names and "tiny.png" not in names and "cmyk.jpg" in names
    config = config_for(tmp_path / "tfds", name="tfds", tfds_name="test_photos")
    pipeline.check_data(config)
    assert next(pipeline.create_train_iterator(config))["image"].shape == (4, 64, 64, 3)
    assert pipeline.eval_images(config).shape == (1, 64, 64, 3)


def lhq_smoke_config(photo_folder):
    import importlib.util
    spec = importlib.util.spec_from_file_location("lhq", os.path.join(ROOT, "configs", "lhq.py"))
    lhq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lhq)
    config = lhq.get_config("smoke")
    config.data.update(name="folder", path=str(photo_folder), num_eval_images=2)
    return config


# Run on 2 devices: precompute, then delete the second chunk and its done marker and run again.
PRECOMPUTE_TWICE = """
import json, os, sys
from absl import flags
flags.FLAGS.mark_as_parsed()
sys.path.insert(0, "tests")
import test_data
from fmboost_jax.data.precompute import precompute
config, out = test_data.lhq_smoke_config(sys.argv[1]), sys.argv[2]
first = precompute(config, out, batch_size=2, chunk_batches=2)
os.remove(os.path.join(out, "latents-p000000-of-000001-c00001.array_record"))
os.remove(os.path.join(out, "done-p000000-of-000001.json"))
second = precompute(config, out, batch_size=2, chunk_batches=2)
print(json.dumps([first, second]))
"""


@pytest.mark.slow
def test_latents_precomputed_on_two_devices_match_the_vae_resume_and_train_a_few_steps(
        photo_folder, tmp_path, caplog):
    import subprocess
    import sys
    from fmboost_jax.cfm.model import CFM
    from fmboost_jax.cfm.upsampling import resize
    from fmboost_jax.data.precompute import precompute
    from fmboost_jax.train.loop import train_and_evaluate
    out = tmp_path / "latents"
    proc = subprocess.run(
        [sys.executable, "-c", PRECOMPUTE_TWICE, str(photo_folder), str(out)], cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    # 11 training files (astronaut and truncated are held out): fake and tiny are skipped and
    # logged with their paths, and so is the truncated one among the held-out images.
    assert first["devices"] == 2 and (first["written"], first["skipped"]) == (9, 2)
    for name in ("fake.jpg", "truncated.png", "tiny.png"):
        assert name in proc.stderr
    assert second["written"] + second["skipped"] == 4      # only the deleted chunk again
    assert len([f for f in os.listdir(out) if f.endswith(".array_record")]) == 3

    # The records hold the VAE moments of the image and of its PSU input, computed unsharded.
    config = lhq_smoke_config(photo_folder)
    recs = sources.LatentRecordSource(str(out))
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
        precompute(config, str(out), batch_size=4, chunk_batches=2)

    # Training evaluates on the held-out images written next to the records.
    latents = config.copy_and_resolve_references()
    latents.data.update(name="latents", path=str(out))
    np.testing.assert_array_equal(pipeline.eval_images(latents), pipeline.eval_images(config))
    os.remove(out / "done-p000000-of-000001.json")
    pipeline.check_data(latents)
    other = latents.copy_and_resolve_references()
    other.low_res_size = 16                    # the PSU latents depend on it
    with pytest.raises(ValueError, match="made with low_res_size=32, but config.low_res_size is 16"):
        pipeline.check_data(other)
    assert "incomplete (0 of 1 processes finished)" in caplog.text
    batch = next(pipeline.create_train_iterator(latents))
    assert batch["latent"].shape == batch["latent_lowres"].shape == (4, 8, 8, 4)
    final = train_and_evaluate(latents, str(tmp_path / "run"))
    assert final["step"] == 3 and np.isfinite(final["cfm/psnr"])


@pytest.mark.slow
def test_a_resumed_run_on_folder_data_matches_an_uninterrupted_one(photo_folder, tmp_path):
    """The grain iterator's state travels in the checkpoint: the resumed run reads the same
    batches, so its parameters equal those of a run without interruption."""
    import orbax.checkpoint as ocp
    from fmboost_jax.train.loop import train_and_evaluate
    config = config_for(photo_folder)
    config.unet.update(channel_mult=(1,), attention_resolutions=())
    config.high_res_size, config.low_res_size = 32, 8
    config.total_steps, config.checkpoint_every, config.eval_every = 4, 2, 4
    train_and_evaluate(config, str(tmp_path / "full"))
    short = config.copy_and_resolve_references()
    short.total_steps = 2
    train_and_evaluate(short, str(tmp_path / "part"))
    train_and_evaluate(config, str(tmp_path / "part"))

    def params(workdir):
        mngr = ocp.CheckpointManager(str(workdir / "checkpoints"),
                                     item_handlers={"state": ocp.StandardCheckpointHandler()})
        state = mngr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        mngr.close()
        return state["params"]

    for a, b in zip(jax.tree.leaves(params(tmp_path / "full")), jax.tree.leaves(params(tmp_path / "part"))):
        np.testing.assert_array_equal(a, b)
