"""Tests of fmboost_jax/data/pipeline.py: the grain pipeline on real photos mixed with corrupt
ones, determinism and resumption, per-process shards, workers, start-up checks."""

import json

import jax
import numpy as np
import pytest
from photo_folder import config_for

from fmboost_jax.data import pipeline, sources


def test_the_folder_pipeline_skips_bad_files_and_gives_batches_of_crops(photo_folder, caplog):
    files = sources.list_images(photo_folder)
    assert len(files) == 13 and not any(f.endswith(".txt") for f in files)
    config = config_for(photo_folder)
    pipeline.check_data(config)
    it = pipeline.create_train_iterator(config)
    batches = [next(it) for _ in range(6)]           # > 2 epochs of the 11 training files
    for b in batches:
        assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.uint8
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
    with pytest.raises(ValueError, match="config.first_stage.name: is 'identity'.*needs a VAE"):
        precompute(config_for(photo_folder), str(tmp_path / "out"))


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

