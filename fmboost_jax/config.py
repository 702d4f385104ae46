"""The config: its schema, every default in one place, and the one loader of config files.

`base_config()` *is* the paper's released setup (`flow400_64-128/unet-base_psu.yaml` of the
reference): the SD VAE, 512 -> 1024 px (64² -> 128² latents), PSU with the source noised at step
400 and the clean PSU latent as context, the 306M-parameter UNet, Adam 3e-5 with 1000 warm-up
steps, EMA 0.999, rk4 over 40 time points, bfloat16 on accelerators. Files in `configs/` start
from it and change what differs; field names are the reference's (`noising_step`,
`upsampling_mode`, `concat_context`, `channel_mult`, ...).

`load_config("configs/lhq.py:smoke")` (or `"lhq:smoke"`) is the one loader of config files, for
the command lines, the tests and notebooks. This module sits at the bottom of the package with
`errors`: it imports no component. The components read their defaults from it (the sampler's
`SolverOptions`, `NUM_TIMESTEPS`, `MAX_PIXELS`, ...) and own the rules of their fields
(`check_config(config)` in their module, raising `errors.ConfigError`); whoever runs a config
checks the components it uses (`train.setup.validate` checks them all), after `check_fields`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from fmboost_jax.errors import ConfigError, parse_names

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_NAMES = ("auto", *DTYPES)   # "auto": bfloat16 on GPUs and TPUs, float32 on CPUs

NUM_TIMESTEPS = 1000      # the reference's discrete diffusion steps (the noising schedule)
MAX_PIXELS = 1 << 27      # 134M pixels (11585²): `data.max_pixels`, `--max_pixels`
NUM_CROPS, CROP_SIZE = 4, 512   # the reference's p-FID: 4 crops of 512² per image
GUIDANCE_SCALE = 1.0      # classifier-free guidance w; 1: the conditional velocity


class SolverOptions(NamedTuple):
    """The one table of ODE sampler defaults (`config.sampling` is made from it, `cfm.ode` reads
    it): the reference's validation sampler, torchdiffeq's rk4 over 40 time points, and its
    dopri5 tolerances."""
    solver: str = "rk4"
    num_steps: int = 39
    num_points: int = 0                # > 0: the reference's time points, num_steps = N - 1
    rtol: float = 1e-3
    atol: float = 1e-6
    dt0: float = 0.01
    max_steps: int = 4096


class SDEOptions(NamedTuple):
    """The SDE samplers' defaults (the reference's `FlowSDE.sample`); `config.sampling` holds
    them beside `SolverOptions`, `cfm.sde` reads them."""
    diffusion_form: str = "sigma"
    diffusion_norm: float = 1.0
    last_step: str = "Mean"
    last_step_size: float = 0.04


def dtype(name: str) -> Any:
    """The jnp dtype of a config dtype name; "auto" follows the default backend."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return DTYPES[name]


def _data() -> ml_collections.ConfigDict:
    """`config.data`: LHQ as a prepared TFDS dataset, and how it is read."""
    return ml_collections.ConfigDict(dict(
        name="tfds",                   # tfds | folder | latents | skimage_photos
        path="~/tensorflow_datasets",  # TFDS data_dir, image folder or latent records dir
        tfds_name="lhq",               # TFDS dataset name ("lhq", "faceshq", ...)
        train_split="train", eval_split="validation",   # TFDS splits
        eval_path="",                  # folder of held-out images ("" : from the source)
        flip=True,                     # random horizontal flips
        crop="resize",                 # "resize": shorter side to high_res_size, random crop;
                                       # "native": random crop at the file's resolution
        min_size=-1,                   # skip images whose shorter side is below (-1: high-res size)
        max_pixels=MAX_PIXELS,         # skip images with more pixels (checked before decoding)
        latent_sample="mode",          # latent records: posterior "mode" or a "sample"
        worker_count=0,                # decoding processes (0: threads of this process)
        read_threads=8, prefetch=64,   # grain read threads and prefetched examples
        train_photos=(), eval_photos=(),   # skimage_photos: scikit-image photo names
        num_eval_images=64,
        eval_crop_size=0,              # 0 = high_res_size
    ))


def _first_stage() -> ml_collections.ConfigDict:
    """The space of the flow: "identity" (pixels) or a VAE preset whose params `checkpoint` holds
    (an Orbax directory written by `convert vae`; "random": random weights, for smoke runs)."""
    return ml_collections.ConfigDict(dict(
        name="sd_vae", checkpoint="~/fmboost/vae/sd", dtype="auto",
        tile_size=0, tile_overlap=64,  # encode/decode in blended tiles of this many pixels
        tile_shared_stats=True,        # tiles normalise with the image's estimated statistics
        micro_batch=0,                 # code at most this many images at once (0: the batch)
    ))


def base_config() -> ml_collections.ConfigDict:
    """The paper's released setup, field by field (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "auto"                   # UNet compute dtype: auto | float32 | bfloat16

    # Sizes in pixels: the low-res image is the high-res one down-sampled (the reference:
    # bilinear, no anti-aliasing). The model up-samples by high_res_size // low_res_size and is
    # fully convolutional: at sampling time the output size follows the input's.
    c.low_res_size = 512
    c.high_res_size = 1024
    c.lowres_downsampling = "bilinear"
    c.lowres_antialias = False

    c.first_stage = _first_stage()
    c.coupling = ml_collections.ConfigDict(dict(
        upsampling_mode="psu",
        upsampling_mode_context="",    # '' = same as upsampling_mode
        start_from_noise=False,
        noising_step=400,              # forward-diffusion step of the source; <= 0 disables
        concat_context=True,
        context_dropout=0.0,           # P(zero context) in training, for classifier-free guidance
        num_timesteps=NUM_TIMESTEPS,   # discrete steps of the noising schedule
    ))
    c.flow = ml_collections.ConfigDict(dict(schedule="linear", sigma_min=0.0))
    # "cfm", or "regression": the paper's baseline, the same UNet predicting x1 in one pass
    # from the clean up-sampled latent (`configs/*.py:regression`).
    c.objective = "cfm"

    c.unet = ml_collections.ConfigDict(dict(
        in_channels=8, model_channels=128, out_channels=4, num_res_blocks=3,
        attention_resolutions=(8, 16), dropout=0.0, channel_mult=(1, 2, 4, 8),
        conv_resample=True, dim_head=64, num_heads=4, use_linear_attn=False,
        use_scale_shift_norm=True, pool_factor=-1,
        attention="einsum",            # softmax attention: einsum | xla | cudnn (GPUs, bf16)
        remat=False,                   # recompute block activations for the backward pass
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-5, warmup_steps=1000, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
        grad_clip_norm=0.0,            # 0 disables clipping
        warmup_from_zero=False,        # False: update n gets lr * (n + 1) / warmup (reference)
    ))
    c.ema = ml_collections.ConfigDict(dict(
        rate=0.999, update_every=1, update_after_step=1000, power=0.75, use_for_sampling=True,
        before_update=True,            # average the params before each step's update (reference)
    ))

    c.data = _data()
    c.batch_size = 64                  # global, over all devices (not published by the authors)
    c.total_steps = 300_000
    # A training workdir whose latest checkpoint's params and EMA params start a new run (the
    # reference's --load_weights): arrays of the same name and shape are taken, the others keep
    # their initial values, the optimizer starts afresh. Only at a fresh start; "" = none.
    c.init_from = ""

    # The sampler: its defaults are the tables `SolverOptions` (torchdiffeq's rk4 over 40 time
    # points, the reference's validation sampler; dopri5 tolerances) and `SDEOptions` (the
    # reference's SDE sampler), and the guidance scale.
    c.sampling = ml_collections.ConfigDict(dict(
        **SolverOptions()._asdict(), **SDEOptions()._asdict(), guidance_scale=GUIDANCE_SCALE))

    # Devices: the batch is split over all of them; arrays of at least `fsdp_min_size`
    # elements (params, EMA, Adam moments) are sharded over the 'fsdp' axis, others replicated.
    c.mesh = (("data", -1), ("fsdp", 1))
    c.fsdp_min_size = 2**18

    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3             # the latest N checkpoints ...
    c.keep_every = 50_000              # ... plus every step divisible by this (0: none)
    c.eval_batch_size = 16             # 0 = batch_size
    c.num_grid_images = 8
    c.eval, c.wandb = _eval(), _wandb()
    return c


def _eval() -> ml_collections.ConfigDict:
    """`config.eval`: what the held-out evaluation scores (`evaluation.benchmark`): psnr, ssim,
    mse and, with converted Inception weights in `inception` ("": skipped), fid, kid and pfid
    (`num_crops` crops of `crop_size`² per image, the reference's 4 and 512), of CFM and the
    `baselines`."""
    return ml_collections.ConfigDict(dict(
        metrics=("psnr", "ssim"), inception="", num_crops=NUM_CROPS, crop_size=CROP_SIZE,
        baselines=("bilinear", "bicubic")))


def _wandb() -> ml_collections.ConfigDict:
    """`config.wandb`: Weights & Biases, beside metrics.jsonl and TensorBoard
    (`train/wandb_logging.py`)."""
    return ml_collections.ConfigDict(dict(
        project="",                    # W&B project; "" = no W&B (wandb is never imported)
        entity="",                     # team or user ("" : your default entity)
        name="",                       # run name ("" : the workdir's basename)
        mode="online",                 # "online" | "offline" (files only; `wandb sync`) | "disabled"
        tags=(),                       # tags of the run, strings
    ))


# ------------------------------------------------------------------------ variants

def variants(arg: str | None, known: tuple[str, ...]) -> set[str]:
    """The comma-separated variants of a config file's argument (`lhq:smoke,regression`);
    UserError naming an unknown one."""
    return set(parse_names(arg or "", known, "config variant"))


def as_regression(c: ml_collections.ConfigDict) -> None:
    """The paper's regression baseline of a setup: the same UNet (the same parameter count) on
    the clean up-sampled latent and its context, predicting x1 in one pass."""
    c.objective = "regression"
    c.coupling.update(noising_step=-1, start_from_noise=False, context_dropout=0.0)


# ------------------------------------------------------------------------ loading

def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` or a module of `configs/` by name (`lhq:smoke`) -> its
    `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        module = importlib.import_module(f"configs.{path}")
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        module_spec = importlib.util.spec_from_file_location(
            f"_fmboost_config_{os.path.splitext(os.path.basename(path))[0]}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with every field it lacks taken from `base_config()` (a run's `config.json`
    written before a field existed reads as if the field had its default)."""
    def fill(cfg: Any, ref: Any) -> None:
        for key, value in ref.items():
            if key not in cfg:
                cfg[key] = value
            elif isinstance(value, ml_collections.ConfigDict) and isinstance(
                    cfg[key], ml_collections.ConfigDict):
                fill(cfg[key], value)
    config = ml_collections.ConfigDict(config.to_dict())
    fill(config, base_config())
    return config


# ------------------------------------------------------------------------ checks
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


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the fields of `config` that the schema does not have (a typo
    in a config file or a `--config.a.b=` override)."""
    unknown = _unknown_fields(config, base_config())
    if unknown:
        raise ConfigError(unknown[0], "is not a field of the config (unknown: "
                          f"{', '.join('config.' + u for u in unknown)})")


def differences(old: Any, new: Any) -> list[str]:
    """The dotted fields whose values differ between two configs (ConfigDicts, or the dict of a
    run's config.json), each as `config.FIELD: OLD -> NEW` (`-`: the config has no such field)."""
    a, b = _flat(_as_json(old)), _flat(_as_json(new))
    return [f"config.{k}: {a.get(k, '-')!r} -> {b.get(k, '-')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "-") != b.get(k, "-")]


def _as_json(config: Any) -> dict:
    """A config as the JSON it is written to config.json as (tuples become lists)."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
