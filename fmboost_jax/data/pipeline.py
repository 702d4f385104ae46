"""The input pipeline: grain datasets from `config.data`, sharded by process, resumable.

    it = create_train_iterator(config, process_index=0, process_count=1)
    batch = next(it)          # this process's part of the global batch, numpy arrays
    state = it.get_state()    # JSON-serialisable; it.set_state(state) resumes exactly there

`config.data.name` picks the source: `folder` (images under `data.path`), `tfds` (a prepared
TFDS dataset `data.tfds_name` in the data_dir `data.path`), `latents` (records of
`precompute_latents` in `data.path`) or `skimage_photos` (the demo's photos). Images are decoded,
their shorter side resized to `high_res_size` (`data.crop="resize"`; "native" crops at the
file's resolution), randomly cropped and flipped, and scaled to [-1, 1]; files that cannot be
used are skipped, counted and logged with their path. Each process reads a disjoint shard
(`dataset[process_index::process_count]`), shuffled by `config.seed` with a new order every
epoch. `data.read_threads` threads, in `data.worker_count` processes when > 0, decode ahead
(`data.prefetch` examples); the batches depend on neither, so a run may resume with other
values. The state is the number of examples this process has consumed. The low-res input is
made on the device from the high-res image (`config.lowres_downsampling`, bilinear or bicubic,
anti-aliased), as the model does at sampling time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import logging

from fmboost_jax import first_stage, paths
from fmboost_jax.data import images as images_lib
from fmboost_jax.data import photos, sources
from fmboost_jax.errors import ConfigError, check_one_of, check_range

NAMES = ("skimage_photos", "folder", "tfds", "latents")
SKIP_WINDOW, MAX_SKIPPED_FRACTION = 1000, 0.99   # more skipped examples in a window: an error


# ------------------------------------------------------------------------ transforms
@dataclasses.dataclass
class DecodeRandomCrop(grain.transforms.RandomMap):
    """{"bytes", "path"} -> {"image": uint8 (S, S, 3)}, or {"skipped": reason} for a bad file
    (dropped, counted and logged by the iterator, so that worker processes keep the order)."""
    size: int
    flip: bool = True
    min_size: int = 0
    resize: bool = True        # shorter side to `size` first (False: native-resolution crops)
    max_pixels: int = images_lib.MAX_PIXELS

    def random_map(self, element: dict[str, Any], rng: np.random.Generator):
        path = element["path"]
        try:
            img = images_lib.decode_rgb(element["bytes"], path, self.max_pixels)
            return {"image": images_lib.random_crop_uint8(img, self.size, rng, self.flip, path,
                                                          self.min_size, self.resize)}
        except images_lib.BadImage as err:
            return {"skipped": str(err)}


@dataclasses.dataclass
class LatentsToBatch(grain.transforms.RandomMap):
    """A latent record -> {"latent", "latent_lowres"} (unscaled), the posterior's mode or a
    sample of it, plus the uint8 `image` when stored."""
    sample: bool = False

    def random_map(self, record: dict[str, np.ndarray], rng: np.random.Generator):
        def z(mean, logvar):
            if not self.sample:
                return mean.astype(np.float32)
            noise = rng.standard_normal(mean.shape).astype(np.float32)
            return (mean + np.exp(0.5 * logvar) * noise).astype(np.float32)
        out = {"latent": z(record["mean"], record["logvar"]),
               "latent_lowres": z(record["mean_lowres"], record["logvar_lowres"])}
        if "image" in record:
            out["image"] = record["image"]
        return out


_SKIPPED = [0]


def _skipped(message: str) -> None:
    _SKIPPED[0] += 1
    logging.warning("Skipping %s (%d skipped by this process so far)", message, _SKIPPED[0])


# ------------------------------------------------------------------------ sources
def _folder_split(config: Any) -> tuple[list[str], list[str]]:
    """(train files, eval files): `data.eval_path` if given, else every k-th file held out."""
    d = config.data
    files = sources.list_images(d.path)
    if d.eval_path:
        return files, sources.list_images(d.eval_path)
    n = min(d.num_eval_images, len(files) // 2)
    held = set(np.linspace(0, len(files) - 1, n).round().astype(int).tolist()) if n else set()
    return ([f for i, f in enumerate(files) if i not in held],
            [f for i, f in enumerate(files) if i in held])


def image_source(config: Any, train: bool):
    d = config.data
    if d.name == "folder":
        train_files, eval_files = _folder_split(config)
        return sources.FolderSource(train_files if train else eval_files)
    if d.name == "tfds":
        return sources.TfdsSource(d.tfds_name, d.path, d.train_split if train else d.eval_split)
    raise ValueError(f"config.data.name={d.name!r} has no image source")


def min_size(config: Any) -> int:
    return config.high_res_size if config.data.min_size < 0 else config.data.min_size


# ------------------------------------------------------------------------ the training iterator
class PhotoIterator:
    """The demo's photo crops: this process's part of each global batch. Batches are a pure
    function of (seed, step), so the state is the step."""

    def __init__(self, config: Any, process_index: int, process_count: int):
        d = config.data
        self.crops = photos.PhotoCrops(tuple(d.train_photos), config.high_res_size,
                                       config.batch_size, config.seed)
        n = config.batch_size // process_count
        self.part = slice(process_index * n, (process_index + 1) * n)
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.crops.batch(self.step)
        self.step += 1
        return {k: v[self.part] for k, v in batch.items()}

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        """Nothing to stop: the crops are made in this process."""


def process_shard(ds: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
    """Every `process_count`-th example from `process_index`: disjoint shards covering `ds`."""
    if len(ds) < process_count:
        raise ConfigError("data", f"{len(ds)} examples cannot be shared by {process_count} "
                         "processes")
    return ds[process_index::process_count]


def train_examples(config: Any, process_index: int = 0, process_count: int = 1,
                   seed_offset: int = 0) -> grain.MapDataset:
    """This process's examples, shuffled anew every epoch and transformed, as an infinite
    MapDataset: example `i` is a pure function of (config, shard, seed, i)."""
    d = config.data
    if d.name == "latents":
        ds = grain.MapDataset.source(sources.LatentRecordSource(d.path))
        transform: grain.transforms.RandomMap = LatentsToBatch(sample=d.latent_sample == "sample")
    else:
        ds = grain.MapDataset.source(image_source(config, train=True))
        transform = DecodeRandomCrop(config.high_res_size, d.flip, min_size(config),
                                     resize=d.crop == "resize", max_pixels=d.max_pixels)
    ds = process_shard(ds, process_index, process_count)
    return ds.seed(config.seed + seed_offset).shuffle().repeat(None).random_map(transform)


class TrainIterator:
    """Batches of `batch_size` usable examples of `examples`, in order.

    Examples are read by `read_threads` threads, in `worker_count` processes when > 0 (each
    takes every worker_count-th example and the results are interleaved back in order), so
    the batches do not depend on the number of threads or workers. Skipped files are dropped
    here, counted and logged with their reason. The state is the number of examples consumed,
    `{"position": n}`; `set_state` restarts the reading there.
    """

    def __init__(self, examples: grain.MapDataset, batch_size: int, read_threads: int,
                 prefetch: int, worker_count: int, description: str = ""):
        self.examples, self.batch_size = examples, batch_size
        self.read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self.worker_count, self.prefetch = worker_count, prefetch
        self.description = description
        self.position = 0
        self._it = None
        self._window = [0, 0]          # (examples, skipped) of the current window

    def _start(self):
        ds = self.examples[self.position:].to_iter_dataset(self.read)
        if self.worker_count > 0:
            from absl import flags
            if not flags.FLAGS.is_parsed():   # grain's workers read absl flags
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.worker_count,
                per_worker_buffer_size=max(1, self.prefetch // self.worker_count)))
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._start()
        parts = []
        while len(parts) < self.batch_size:
            ex = next(self._it)
            self.position += 1
            self._count(skipped="skipped" in ex)
            if "skipped" in ex:
                _skipped(ex["skipped"])
            else:
                parts.append(ex)
        # Images stay uint8 (a quarter of float32's bytes to the devices); the training step
        # converts them there (`train.step`, `images.to_float`).
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    def _count(self, skipped: bool) -> None:
        self._window[0] += 1
        self._window[1] += skipped
        if self._window[0] == SKIP_WINDOW:
            if self._window[1] >= MAX_SKIPPED_FRACTION * SKIP_WINDOW:
                raise ConfigError("data", f"{self._window[1]} of the last {SKIP_WINDOW} "
                                 f"examples of {self.description} were unusable (see the log)")
            self._window = [0, 0]

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: dict[str, int]) -> None:
        self.close()
        self.position = int(state["position"])

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


def create_train_iterator(config: Any, process_index: int = 0, process_count: int = 1,
                          start_step: int = 0):
    """An iterator over this process's part of every global batch, with get/set_state.

    `start_step` > 0 without a saved state (a checkpoint written by another number of
    processes) starts the demo's photos at that step and other sources on a fresh order.
    """
    if config.data.name == "skimage_photos":
        it = PhotoIterator(config, process_index, process_count)
        it.set_state({"step": start_step})
        return it
    d = config.data
    return TrainIterator(train_examples(config, process_index, process_count, start_step),
                         config.batch_size // process_count, d.read_threads, d.prefetch,
                         d.worker_count, description=f"{d.name} {d.tfds_name or d.path!r}")


def batch_spec(config: Any, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The (shape, dtype) of each array of a training batch of `batch_size` examples, as the
    iterator of `config.data` yields it (no data read): images uint8 (B, S, S, 3) (the demo's
    photos float32), latent records float32 (B, s, s, C) for `latent` and `latent_lowres`."""
    s = config.high_res_size
    if config.data.name == "latents":
        z = s // first_stage.downsample_factor(config)
        shape = (batch_size, z, z, first_stage.latent_channels(config))
        return {"latent": (shape, np.float32), "latent_lowres": (shape, np.float32)}
    dtype = np.float32 if config.data.name == "skimage_photos" else np.uint8
    return {"image": ((batch_size, s, s, 3), dtype)}


# ------------------------------------------------------------------------ evaluation and checks
class EvalImages:
    """The held-out images of `config.data`, streamed one at a time: center crops (S, S, 3)
    float32 in [-1, 1], S = `data.eval_crop_size` or the high-res size, at most
    `data.num_eval_images`, the same on every process. Bad files are skipped and logged, so
    `len()` (what the source holds, at most num_eval_images) is an upper bound."""

    def __init__(self, config: Any):
        d = config.data
        self.size, self.limit = d.eval_crop_size or config.high_res_size, d.num_eval_images
        self._min_size = min_size(config)
        self.num_items, self._item, self.description = self._source(config)

    def _source(self, config: Any) -> tuple[int, Any, str]:
        """(number of items, item(i) -> (S, S, 3) image, description)."""
        d = config.data
        if d.name == "skimage_photos":
            crops = photos.eval_crops(tuple(d.eval_photos), self.size, d.num_eval_images)
            return len(crops), crops.__getitem__, f"photos {tuple(d.eval_photos)}"
        if d.name == "latents" and not d.eval_path:
            return _latent_eval_items(d, self.size)
        if d.name == "latents":           # held-out images
            src = sources.FolderSource(sources.list_images(d.eval_path))
        else:
            src = image_source(config, train=False)

        def item(i: int) -> np.ndarray:
            ex = src[i]
            img = images_lib.decode_rgb(ex["bytes"], ex["path"], d.max_pixels)
            return images_lib.center_crop(img, self.size, ex["path"], self._min_size)
        return len(src), item, getattr(src, "description", d.eval_path or d.path)

    def __len__(self) -> int:
        return min(self.num_items, self.limit)

    def __iter__(self) -> Iterator[np.ndarray]:
        yielded = 0
        for i in range(self.num_items):
            if yielded == self.limit:
                return
            try:
                image = self._item(i)
            except images_lib.BadImage as err:
                _skipped(str(err))
                continue
            yielded += 1
            yield image


def eval_images(config: Any) -> np.ndarray:
    """The held-out images of `EvalImages(config)`, stacked (N, S, S, 3) float32 in [-1, 1];
    ConfigError when none is usable."""
    src = EvalImages(config)
    out = list(src)
    if not out:
        raise ConfigError("data", f"no usable held-out image in {src.description}")
    return np.stack(out)


def _latent_eval_items(d: Any, size: int) -> tuple[int, Any, str]:
    """Held-out images that precompute_latents stored next to the records, else (with a
    warning: they are training images) the images stored in the last records."""
    held_out = sources.latent_eval_file(d.path)
    if held_out is not None:
        stored = np.load(paths.local_copy(held_out), mmap_mode="r")
        return len(stored), lambda i: images_lib.center_crop(np.asarray(stored[i]), size), held_out
    recs = sources.LatentRecordSource(d.path)
    picked = min(len(recs), d.num_eval_images)
    if not all("image" in recs[len(recs) - 1 - i] for i in range(picked)):
        raise ConfigError("data.path", f"{d.path!r} holds neither held-out images "
                         f"({sources.LATENT_EVAL_FILE}) nor records with images to evaluate on; "
                         "set config.data.eval_path to a folder of held-out images")
    logging.warning("Evaluating on the images of the last %d latent records (training images): "
                    "set config.data.eval_path for held-out ones", picked)
    item = lambda i: images_lib.center_crop(recs[len(recs) - 1 - i]["image"], size)
    return picked, item, f"the last {picked} latent records in {d.path!r}"


def _check_latent_records(config: Any, rec: dict[str, np.ndarray]) -> None:
    """The records must come from this config's VAE, sizes and down-sampling."""
    from fmboost_jax.first_stage import first_stage_from_config
    d = config.data
    info = sources.latent_records_info(d.path)
    made = {"first_stage": config.first_stage.name, "high_res_size": config.high_res_size,
            "low_res_size": config.low_res_size}
    for key, want in made.items():
        if info is not None and key in info and info[key] != want:
            raise ConfigError("data.path", f"the latent records in {d.path!r} were made with "
                             f"{key}={info[key]!r}, but config.{key} is {want!r}; precompute "
                             "them again for this config")
    fs = first_stage_from_config(config)
    size = config.high_res_size // fs.downsample_factor
    want_shape = (size, size, fs.latent_channels)
    for key in ("mean", "mean_lowres"):
        if tuple(rec[key].shape) != want_shape:
            raise ConfigError("data.path", f"`{key}` of the latent records in {d.path!r} is "
                             f"{tuple(rec[key].shape)}, but config.high_res_size "
                             f"{config.high_res_size} and first_stage {config.first_stage.name!r}"
                             f" need {want_shape}")


def _check_context_source(config: Any, rec: dict[str, np.ndarray]) -> None:
    """Records without images hold only the PSU latent: other up-sampling modes need the image."""
    from fmboost_jax.cfm.coupling import Coupling
    modes = Coupling.from_config(config.coupling).context_modes
    if "image" not in rec and any(m != "psu" for m in modes):
        field = ("coupling.upsampling_mode" if modes[0] != "psu"
                 else "coupling.upsampling_mode_context")
        raise ConfigError(field, f"{modes} need the low-res image, but the latent records in "
                          f"{config.data.path!r} hold only the PSU latent; precompute them with "
                          "--store_images, or use 'psu'")


def check_config(config: Any) -> None:
    """The rules of `config.data` (pure: files are checked by `check_data` at start-up)."""
    d = config.data
    check_one_of(config, "data.name", NAMES)
    if d.name == "tfds" and not d.tfds_name:
        raise ConfigError("data.tfds_name", "is empty; name the prepared dataset (e.g. 'lhq')")
    if d.name == "skimage_photos" and not d.train_photos:
        raise ConfigError("data.train_photos", "is empty; name scikit-image photos, e.g. "
                          f"{photos.PHOTOS[:2]}")
    check_one_of(config, "data.crop", ("resize", "native"))
    check_one_of(config, "data.latent_sample", ("mode", "sample"))
    for field in ("worker_count", "read_threads", "prefetch", "num_eval_images", "eval_crop_size"):
        check_range(config, f"data.{field}", 0)
    check_range(config, "data.max_pixels", 1)


def check_data(config: Any, probe: int = 32) -> None:
    """Fails at start-up, naming the path, if the training data is missing, empty or unusable
    (none of its first `probe` examples decodes)."""
    d = config.data
    if d.name == "skimage_photos":
        for field in ("train_photos", "eval_photos"):
            unknown = [p for p in d[field] if p not in photos.PHOTOS]
            if unknown:
                raise ConfigError(f"data.{field}", f"unknown photos {unknown}; known: "
                                  f"{photos.PHOTOS}")
        photos.PhotoCrops(tuple(d.train_photos), config.high_res_size, 1, 0)
        return
    if not d.path:
        raise ConfigError("data.path", f"is empty: config.data.name={d.name!r} needs it")
    if d.name == "latents":
        src = sources.LatentRecordSource(d.path)
        if not len(src):
            raise ConfigError("data.path", f"the latent records in {d.path!r} are empty")
        rec = src[0]
        missing = {"mean", "logvar", "mean_lowres", "logvar_lowres"} - set(rec)
        if missing:
            raise ConfigError("data.path", f"records in {d.path!r} lack {sorted(missing)}")
        if not d.eval_path and "image" not in rec and sources.latent_eval_file(d.path) is None:
            raise ConfigError("data", f"{d.path!r} holds no images to evaluate on (neither "
                             f"{sources.LATENT_EVAL_FILE} nor images in the records); set "
                             "config.data.eval_path to a folder of held-out images, or "
                             "precompute again with --store_images")
        _check_context_source(config, rec)
        incomplete = sources.latent_records_incomplete(d.path)
        if incomplete:
            logging.warning("config.data.path: %s", incomplete)
        _check_latent_records(config, rec)
        return
    src = image_source(config, train=True)
    errors = []
    for i in range(min(probe, len(src))):
        ex = src[i]
        try:
            img = images_lib.decode_rgb(ex["bytes"], ex["path"], d.max_pixels)
            images_lib.center_crop(img, config.high_res_size, ex["path"], min_size(config))
            return
        except images_lib.BadImage as err:
            errors.append(str(err))
    where = getattr(src, "description", d.path)
    raise ConfigError("data", f"none of the first {len(errors)} images of {where} is usable:\n  "
                     + "\n  ".join(errors[:5]))
