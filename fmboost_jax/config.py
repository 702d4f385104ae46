"""Shared config defaults and the checks every config passes before training.

Config files in `configs/` start from `base_config()` and change what differs; the
field names follow the reference (`noising_step`, `upsampling_mode`, `concat_context`,
`scale_factor`, `channel_mult`, ...). `validate(config)` rejects unknown fields and
inconsistent settings with a message naming the field, before any work is done.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from etils import epath

from fmboost_jax import first_stage, sharding
from fmboost_jax.data import pipeline as data_pipeline

from fmboost_jax.coupling import UPSAMPLING_MODES
from fmboost_jax.flow import PATHS

SOLVERS = ("dopri5", "euler", "heun", "midpoint", "rk4")


def base_config() -> ml_collections.ConfigDict:
    """The released setup's defaults (REFERENCE.md); data and sizes are set per config."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"                # compute dtype of the UNet: float32 | bfloat16

    # Sizes in pixels. The low-res image is the high-res one down-sampled.
    c.low_res_size = 512
    c.high_res_size = 1024
    c.lowres_downsampling = "bilinear"
    c.lowres_antialias = True

    # The space of the flow: "identity" (pixels) or a VAE ("sd_vae", "sdxl_vae", "sd3_vae",
    # "flux_vae") whose params `checkpoint` holds (an Orbax dir written by `convert vae`).
    c.first_stage = ml_collections.ConfigDict(dict(
        name="identity", checkpoint="", channels=3,
        random_init=False,             # VAE with random weights instead of a checkpoint (tests)
        dtype="float32",               # VAE compute dtype
        ch=0, ch_mult=(), num_res_blocks=0,  # 0/() = the preset's; narrower VAEs for tests
        tile_size=0, tile_overlap=64,  # encode/decode in blended tiles of this many pixels
        tile_shared_stats=True,        # tiles normalise with the image's estimated statistics
    ))
    c.scale_factor = 1.0               # latents = (z - shift_factor) * scale_factor
    c.shift_factor = 0.0

    c.coupling = ml_collections.ConfigDict(dict(
        upsampling_mode="psu",
        upsampling_mode_context="",    # '' = same as upsampling_mode
        start_from_noise=False,
        noising_step=400,              # forward-diffusion step of the source; <= 0 disables
        concat_context=True,
        num_timesteps=1000,
    ))
    c.flow = ml_collections.ConfigDict(dict(schedule="linear", sigma_min=0.0))

    c.unet = ml_collections.ConfigDict(dict(
        in_channels=8, model_channels=128, out_channels=4, num_res_blocks=3,
        attention_resolutions=(8, 16), dropout=0.0, channel_mult=(1, 2, 4, 8),
        conv_resample=True, dim_head=64, num_heads=4, use_linear_attn=False,
        use_scale_shift_norm=True, pool_factor=-1,
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-5, warmup_steps=1000, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
        grad_clip_norm=0.0,            # 0 disables clipping
    ))
    c.ema = ml_collections.ConfigDict(dict(
        rate=0.999, update_every=1, update_after_step=1000, power=0.75, use_for_sampling=True,
    ))

    c.data = ml_collections.ConfigDict(dict(
        name="skimage_photos",
        path="",                       # image folder, TFDS data_dir or latent records dir
        tfds_name="",                  # TFDS dataset name (e.g. "lhq", "faceshq")
        train_split="train", eval_split="validation",   # TFDS splits
        eval_path="",                  # folder of held-out images ("" : from the source)
        flip=True,                     # random horizontal flips
        crop="resize",                 # "resize": shorter side to high_res_size, random crop;
                                       # "native": random crop at the file's resolution
        min_size=-1,                   # skip images whose shorter side is below (-1: high-res size)
        latent_sample="mode",          # latent records: posterior "mode" or a "sample"
        worker_count=0,                # decoding processes (0: threads of this process)
        read_threads=8, prefetch=64,   # grain read threads and prefetched examples
        train_photos=(), eval_photos=(),
        num_eval_images=64,
        eval_crop_size=0,              # 0 = high_res_size
    ))
    c.batch_size = 16
    c.total_steps = 100_000

    c.sampling = ml_collections.ConfigDict(dict(
        solver="rk4", num_steps=39,    # 39 rk4 steps = the reference's 40 time points
        rtol=1e-3, atol=1e-6, max_steps=4096,
    ))

    # Devices: the batch is split over all of them; arrays of at least `fsdp_min_size`
    # elements (params, EMA, Adam moments) are sharded over the 'fsdp' axis, others replicated.
    c.mesh = (("data", -1), ("fsdp", 1))
    c.fsdp_min_size = 2**18

    c.log_every = 50
    c.eval_every = 5000
    c.checkpoint_every = 10_000
    c.keep_checkpoints = 3             # the latest N checkpoints ...
    c.keep_every = 0                   # ... plus every step divisible by this (0: none)
    c.eval_batch_size = 0              # 0 = batch_size
    c.num_grid_images = 8
    return c


def _unknown_fields(cfg: Any, ref: Any, prefix: str = "") -> list[str]:
    out = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if key not in ref:
            out.append(name)
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(
                ref[key], ml_collections.ConfigDict):
            out += _unknown_fields(value, ref[key], name + ".")
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first offending field of an invalid config."""
    unknown = _unknown_fields(config, base_config())
    if unknown:
        raise ValueError(f"Unknown config field(s): {', '.join('config.' + u for u in unknown)}")

    def fail(field: str, msg: str):
        raise ValueError(f"config.{field}: {msg}")

    if config.dtype not in ("float32", "bfloat16"):
        fail("dtype", f"must be 'float32' or 'bfloat16', got {config.dtype!r}")
    lo, hi = config.low_res_size, config.high_res_size
    if lo <= 0 or hi <= 0:
        fail("low_res_size", f"sizes must be positive (low {lo}, high {hi})")
    if hi % lo:
        fail("low_res_size", f"{lo} does not divide high_res_size {hi}")
    fs = config.first_stage
    name = fs.name
    if name not in ("identity", *first_stage.VAE_PRESETS):
        fail("first_stage.name", f"unknown first stage {name!r}; known: 'identity', "
             f"{', '.join(map(repr, first_stage.VAE_PRESETS))}")
    if fs.dtype not in ("float32", "bfloat16"):
        fail("first_stage.dtype", f"must be 'float32' or 'bfloat16', got {fs.dtype!r}")
    if name == "identity":
        factor, channels, scale, shift = 1, fs.channels, 1.0, 0.0
    else:
        vae = first_stage.autoencoder_config(fs)
        factor, channels = vae.downsample_factor, vae.z_channels
        scale, shift = vae.scale_factor, vae.shift_factor
        if any((vae.ch * m) % 32 for m in vae.ch_mult):
            fail("first_stage.ch", f"{vae.ch} x ch_mult {vae.ch_mult} must be multiples of 32 "
                 "(the VAE's GroupNorms use 32 groups)")
        if fs.tile_size and (fs.tile_size % factor or not 0 <= fs.tile_overlap < fs.tile_size):
            fail("first_stage.tile_size", f"{fs.tile_size} must be a multiple of {factor} and "
                 f"larger than first_stage.tile_overlap={fs.tile_overlap}")
    for field, want in (("scale_factor", scale), ("shift_factor", shift)):
        if abs(config[field] - want) > 1e-9:
            fail(field, f"is {config[field]}, but the first stage {name!r} uses {want}")
    if hi % factor:
        fail("high_res_size", f"{hi} is not divisible by the first stage's factor {factor}")
    cp, u = config.coupling, config.unet
    for field in ("upsampling_mode", "upsampling_mode_context"):
        mode = cp[field]
        if mode and mode not in UPSAMPLING_MODES:
            fail(f"coupling.{field}", f"must be one of {UPSAMPLING_MODES}, got {mode!r}")
    if cp.start_from_noise and cp.noising_step > 0:
        fail("coupling.noising_step", "must be <= 0 when coupling.start_from_noise is set")
    if cp.noising_step >= cp.num_timesteps:
        fail("coupling.noising_step", f"must be < coupling.num_timesteps={cp.num_timesteps}")
    if config.flow.schedule not in PATHS:
        fail("flow.schedule", f"must be one of {PATHS}, got {config.flow.schedule!r}")
    if config.flow.schedule == "gvp" and config.flow.sigma_min > 0:
        fail("flow.sigma_min", "must be 0 with the gvp schedule")
    uses_context = cp.concat_context or cp.start_from_noise
    want_in = channels * (2 if uses_context else 1)
    if u.in_channels != want_in:
        fail("unet.in_channels", f"is {u.in_channels}, but the first stage gives {channels} "
             f"channels{' plus as many of context' if uses_context else ''} = {want_in}")
    if u.out_channels != channels:
        fail("unet.out_channels", f"is {u.out_channels}, but the first stage has {channels} channels")
    for m in u.channel_mult:
        if (m * u.model_channels) % 32:
            fail("unet.model_channels", f"{u.model_channels} x channel_mult {m} is not a multiple "
                 "of 32 (GroupNorm uses 32 groups)")
    down = 2 ** (len(u.channel_mult) - 1) * max(u.pool_factor, 1)
    if (hi // factor) % down:
        fail("unet.channel_mult", f"latent size {hi // factor} is not divisible by the UNet's "
             f"total down-sampling {down}")
    if config.sampling.solver not in SOLVERS:
        fail("sampling.solver", f"must be one of {SOLVERS}, got {config.sampling.solver!r}")
    if config.sampling.num_steps < 1:
        fail("sampling.num_steps", "must be >= 1")
    for field in ("batch_size", "total_steps", "log_every", "eval_every", "checkpoint_every"):
        if config[field] <= 0:
            fail(field, f"must be positive, got {config[field]}")
    try:
        sharding.mesh_shape(config.mesh, jax.device_count())
    except ValueError as e:
        fail("mesh", str(e).removeprefix("config.mesh: "))
    for field in ("keep_checkpoints", "fsdp_min_size"):
        if config[field] < 1:
            fail(field, f"must be >= 1, got {config[field]}")
    for field in ("keep_every", "eval_batch_size"):
        if config[field] < 0:
            fail(field, f"must be >= 0, got {config[field]}")
    if name != "identity" and not fs.random_init:
        if not fs.checkpoint:
            fail("first_stage.checkpoint", first_stage.missing_checkpoint_message("")
                 .removeprefix("config.first_stage.checkpoint "))
        if not epath.Path(os.path.expanduser(fs.checkpoint)).exists():
            fail("first_stage.checkpoint", first_stage.missing_checkpoint_message(fs.checkpoint)
                 .removeprefix("config.first_stage.checkpoint "))
    d = config.data
    if d.name not in data_pipeline.NAMES:
        fail("data.name", f"unknown source {d.name!r}; known: {data_pipeline.NAMES}")
    if d.name == "tfds" and not d.tfds_name:
        fail("data.tfds_name", "is empty; name the prepared dataset (e.g. 'lhq')")
    if d.crop not in ("resize", "native"):
        fail("data.crop", f"must be 'resize' or 'native', got {d.crop!r}")
    if d.latent_sample not in ("mode", "sample"):
        fail("data.latent_sample", f"must be 'mode' or 'sample', got {d.latent_sample!r}")
    for field in ("worker_count", "read_threads", "prefetch", "num_eval_images"):
        if d[field] < 0:
            fail(f"data.{field}", f"must be >= 0, got {d[field]}")
    if config.batch_size % jax.device_count():
        fail("batch_size", f"{config.batch_size} is not divisible by the {jax.device_count()} "
             f"devices ({jax.process_count()} processes) it is split over")
    if not 0.0 <= config.ema.rate < 1.0:
        fail("ema.rate", f"must lie in [0, 1), got {config.ema.rate}")
