"""Precompute the VAE latents of a dataset, so that training reads latents instead of encoding.

    python -m fmboost_jax.precompute_latents --config=configs/lhq.py --workdir=~/data/lhq_latents
    # then train on them:
    python -m fmboost_jax.train --config=configs/lhq.py --workdir=runs/lhq \\
        --config.data.name=latents --config.data.path=~/data/lhq_latents

For every image of the config's source (`data.name` folder or tfds, split `--split`), center
cropped to `high_res_size`, it stores the VAE posterior of the image (`mean`, `logvar`) and of
its PSU input (`mean_lowres`, `logvar_lowres`: the low-res image down-sampled as
`config.lowres_downsampling` says, bilinearly up-sampled back to the high-res size in pixel
space, then encoded), unscaled, (h, w, C) float32 each, and the file's `name`; with
`--store_images` also the uint8 image. Training takes the posterior mode or a sample
(`data.latent_sample`). Files that cannot be used are skipped and logged with their path.
With `--split=train`, process 0 also writes the source's held-out images (center crops,
`eval_images.npy`), on which training from the records evaluates.

The work is batched and sharded across all devices of all processes (run it like training on
every host, with `workdir` on a file system they share): each process decodes its own shard
of the images in `data.read_threads` threads ahead of the encoder, the batch is split over all
devices with the VAE replicated, and each process writes its own files,
`latents-pPPPPP-of-NNNNNN-cCCCCC.array_record`, one per chunk of `--chunk_batches` batches, each
written under a temporary name and renamed when complete. Rerunning the command skips complete
chunks, so an interrupted run resumes where it stopped; a rerun with another layout (batch
size, chunk size, process count, source, sizes or VAE) is refused, since it would mix shards.
`latents_info.json` records the layout, and `done-pPPPPPP-of-NNNNNN.json` each process's counts
when it finished. A progress bar shows images/s; the log line at the end gives the totals.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fmboost_jax import config as config_lib
from fmboost_jax import first_stage, paths
from fmboost_jax.cfm import model as cfm_model
from fmboost_jax.cfm.model import CFM
from fmboost_jax.cfm.upsampling import resize
from fmboost_jax.data import images as images_lib
from fmboost_jax.data import pipeline as data_pipeline
from fmboost_jax.data import sources
from fmboost_jax.data.sources import encode_latent_record
from fmboost_jax.errors import ConfigError, UserError
from fmboost_jax.parallel import sharding as sharding_lib


def chunk_path(workdir: str, process: int, count: int, chunk: int) -> str:
    return paths.join(workdir, f"latents-p{process:06d}-of-{count:06d}-c{chunk:05d}.array_record")


def done_path(workdir: str, process: int, count: int) -> str:
    return paths.join(workdir, f"done-p{process:06d}-of-{count:06d}.json")


INFO_FILE, EVAL_FILE = sources.LATENT_INFO_FILE, sources.LATENT_EVAL_FILE
# Fields that fix which images land in which chunk: a resumed run must share them.
LAYOUT_FIELDS = ("num_images", "processes", "images_per_chunk", "split", "source",
                 "high_res_size", "low_res_size", "first_stage", "first_stage_checkpoint")


def make_encode_fn(cfm: CFM, mesh):
    """Jitted (fs_params, uint8 images (B, H, W, 3)) -> the four unscaled moments, the batch
    split over the mesh's devices and the VAE params replicated."""
    fs = cfm.first_stage

    def encode(fs_params, images_u8):
        images = images_lib.to_float(images_u8)
        mean, logvar = fs.moments(fs_params, images)
        psu = resize(cfm.lowres_images(images), images.shape[1:3], "bilinear")   # pixel space
        mean_lr, logvar_lr = fs.moments(fs_params, psu)
        return {"mean": mean, "logvar": logvar, "mean_lowres": mean_lr, "logvar_lowres": logvar_lr}

    split = sharding_lib.batch_sharding(mesh)
    return jax.jit(encode, in_shardings=(sharding_lib.replicated(mesh), split), out_shardings=split)


@dataclasses.dataclass
class LoadCenterCrop(grain.transforms.Map):
    """{"bytes", "path"} -> {"image": uint8 (S, S, 3), "name", "ok"}; a bad file gives ok=False
    (logged with its path) and a black image that is not written."""
    size: int
    max_pixels: int = images_lib.MAX_PIXELS

    def map(self, ex: dict[str, Any]) -> dict[str, Any]:
        try:
            img = images_lib.decode_rgb(ex["bytes"], ex["path"], self.max_pixels)
            crop = images_lib.center_crop(img, self.size, ex["path"], min_size=self.size)
            return {"image": images_lib.to_uint8(crop),
                    "name": ex["path"], "ok": True}
        except images_lib.BadImage as err:
            logging.warning("Skipping %s", err)
            return {"image": np.zeros((self.size, self.size, 3), np.uint8), "name": ex["path"],
                    "ok": False}


def _local(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _check_layout(workdir: str, info: dict[str, Any]) -> None:
    """Refuses to resume into records written with another layout (they would mix shards)."""
    old = sources.latent_records_info(workdir)
    if old is None:
        return
    changed = [k for k in LAYOUT_FIELDS if old.get(k) != info[k]]
    if changed and paths.glob(workdir, sources.LATENT_GLOB):
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {info[k]!r}" for k in changed)
        raise UserError(f"--workdir {workdir!r} holds latent records written with another "
                         f"layout ({diff}); rerun with the same settings to resume, or write to a "
                         "new --workdir")


def write_eval_images(config, workdir: str) -> None:
    """The held-out images (the source's eval part, center crops at the high-res size) as
    uint8 (N, S, S, 3) `eval_images.npy`, so that training on the records evaluates on them."""
    cfg = config.copy_and_resolve_references()
    cfg.data.eval_crop_size = 0
    try:
        images = data_pipeline.eval_images(cfg)
    except (ValueError, FileNotFoundError) as err:
        logging.warning("No held-out images written: %s", err)
        return
    buffer = io.BytesIO()
    np.save(buffer, images_lib.to_uint8(images))
    with paths.atomic_write(paths.join(workdir, EVAL_FILE)) as f:
        f.write(buffer.getvalue())


@dataclasses.dataclass
class Shard:
    """This process's part of the work: its images, in batches of `per_process`, in chunks of
    `per_chunk` images; every process runs the longest shard's number of steps."""
    images: grain.MapDataset           # decoded center crops ({"image", "name", "ok"})
    per_process: int
    per_chunk: int
    longest: int
    read: grain.ReadOptions
    size: int

    @property
    def num_chunks(self) -> int:
        return -(-self.longest // self.per_chunk)

    def batches(self, chunk: int, chunk_batches: int) -> Iterator[tuple[np.ndarray, list, int]]:
        """The chunk's (uint8 images (per_process, S, S, 3), [(row, name) usable], count read),
        padded with black images at the end of the shard."""
        lo = chunk * self.per_chunk
        steps = min(chunk_batches, -(-(self.longest - lo) // self.per_process))
        part = self.images[lo:lo + steps * self.per_process]
        it = iter(part.to_iter_dataset(self.read)) if lo < len(self.images) else iter(())
        for _ in range(steps):
            exs = [ex for _, ex in zip(range(self.per_process), it)]
            images = np.zeros((self.per_process, self.size, self.size, 3), np.uint8)
            for j, ex in enumerate(exs):
                images[j] = ex["image"]
            yield images, [(j, ex["name"]) for j, ex in enumerate(exs) if ex["ok"]], len(exs)


def _layout(config, src, split: str, nproc: int, per_chunk: int, store_images: bool) -> dict:
    return {"num_images": len(src), "processes": nproc, "images_per_chunk": per_chunk,
            "split": split, "source": getattr(src, "description", config.data.path),
            "high_res_size": config.high_res_size, "low_res_size": config.low_res_size,
            "first_stage": config.first_stage.name,
            "first_stage_checkpoint": config.first_stage.checkpoint,
            "store_images": store_images}


def _check(config, batch_size: int, mesh) -> None:
    """Config errors of precomputing, named before any work."""
    config_lib.check_fields(config)
    for check in (first_stage.check_config, cfm_model.check_config, data_pipeline.check_config,
                  sharding_lib.check_config, first_stage.check_checkpoint,
                  sharding_lib.check_devices):
        check(config)
    if config.data.name not in ("folder", "tfds"):
        raise ConfigError("data.name", f"is {config.data.name!r}: precomputing reads images "
                          "from a 'folder' or 'tfds' source")
    if config.first_stage.name == "identity":
        raise ConfigError("first_stage.name", "is 'identity': precomputing latents needs a VAE "
                          "first stage (e.g. 'sd_vae')")
    if batch_size % mesh.size or batch_size % jax.process_count():
        raise ConfigError("batch_size", f"{batch_size} (--batch_size) must be divisible by the "
                          f"{mesh.size} devices and {jax.process_count()} processes")


def _write_chunk(path: str, shard: Shard, chunk: int, chunk_batches: int, encode, fs_params,
                 mesh, store_images: bool, bar) -> tuple[int, int]:
    """Encodes one chunk into `path` (a local file, renamed or uploaded when complete:
    `paths.atomic_file`); returns (written, skipped)."""
    with paths.atomic_file(path) as tmp:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        try:
            return _encode_chunk(writer, shard, chunk, chunk_batches, encode, fs_params, mesh,
                                 store_images, bar)
        finally:
            writer.close()


def _encode_chunk(writer, shard: Shard, chunk: int, chunk_batches: int, encode, fs_params,
                  mesh, store_images: bool, bar) -> tuple[int, int]:
    written = skipped = 0
    pending = None        # (device outputs, rows, images): written while the next batch encodes

    def flush(pending) -> int:
        out, rows, images = pending
        local = {k: _local(v) for k, v in out.items()}
        for j, name in rows:
            record = {k: v[j] for k, v in local.items()}
            record["name"] = name
            if store_images:
                record["image"] = images[j]
            writer.write(encode_latent_record(record))
        return len(rows)

    for images, rows, n in shard.batches(chunk, chunk_batches):
        out = encode(fs_params, sharding_lib.global_batch({"x": images}, mesh)["x"])
        if pending is not None:
            written += flush(pending)
        pending = (out, rows, images)
        skipped += n - len(rows)
        bar.update(n)
        bar.set_postfix(skipped=skipped)
    if pending is not None:
        written += flush(pending)
    return written, skipped


CHUNK_BATCHES = 64     # batches per output file, the command's default


def precompute(config, workdir: str, split: str = "train", batch_size: int = 0,
               chunk_batches: int = CHUNK_BATCHES, store_images: bool = False) -> dict:
    """Writes this process's latent records into `workdir`; returns counts and throughput."""
    mesh = sharding_lib.make_mesh(config.mesh)
    batch_size = batch_size or config.batch_size
    _check(config, batch_size, mesh)
    pid, nproc = jax.process_index(), jax.process_count()
    cfm = CFM.from_config(config)
    src = data_pipeline.image_source(config, train=split == "train")
    per_process = batch_size // nproc
    info = _layout(config, src, split, nproc, per_process * chunk_batches, store_images)
    paths.makedirs(workdir)
    _check_layout(workdir, info)
    if pid == 0:
        paths.write_text(paths.join(workdir, INFO_FILE), json.dumps(info, indent=2))
        if split == "train" and not paths.exists(paths.join(workdir, EVAL_FILE)):
            write_eval_images(config, workdir)
    fs_params = sharding_lib.put_replicated(cfm.first_stage.init_params(jax.random.PRNGKey(0)),
                                            mesh)
    encode = make_encode_fn(cfm, mesh)
    size = config.high_res_size
    # This process's shard, decoded by threads ahead of the encoder.
    mine = grain.MapDataset.source(src)[pid::nproc].map(LoadCenterCrop(size, config.data.max_pixels))
    read = grain.ReadOptions(num_threads=max(1, config.data.read_threads),
                             prefetch_buffer_size=max(config.data.prefetch, 2 * per_process))
    shard = Shard(mine, per_process, info["images_per_chunk"], -(-len(src) // nproc), read, size)
    written = skipped = 0
    start = time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"encode {split}", unit="img", disable=pid != 0,
               dynamic_ncols=True)
    for chunk in range(shard.num_chunks):
        path = chunk_path(workdir, pid, nproc, chunk)
        # The encoding steps are collective: skip a chunk only when every process has it.
        have = np.array(paths.exists(path))
        if (multihost_utils.process_allgather(have).all() if nproc > 1 else bool(have)):
            bar.update(max(0, min(shard.per_chunk, len(mine) - chunk * shard.per_chunk)))
            continue
        w, k = _write_chunk(path, shard, chunk, chunk_batches, encode, fs_params, mesh,
                            store_images, bar)
        written, skipped = written + w, skipped + k
    bar.close()
    seconds = time.perf_counter() - start
    result = {"process": pid, "devices": mesh.size, "written": written, "skipped": skipped,
              "seconds": seconds, "images_per_sec": written / max(seconds, 1e-9)}
    paths.write_text(done_path(workdir, pid, nproc), json.dumps(result))
    logging.info("precompute: %s", json.dumps(result))
    return result
