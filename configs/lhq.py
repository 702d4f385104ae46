"""LHQ, 512² -> 1024² px (SD latents 64² -> 128²): the paper's released setup.

    python -m fmboost_jax.train --config=configs/lhq.py --workdir=runs/lhq

`base_config()` is this setup (SD VAE, PSU noised at step 400 with the clean PSU latent as
context, the 306M-parameter UNet, Adam 3e-5, EMA 0.999, rk4 over 40 time points); this file adds
only LHQ's data and the run's length. It expects
- the SD VAE converted to Flax (`config.first_stage.checkpoint`, default `~/fmboost/vae/sd`):
      python -m fmboost_jax.convert vae --src sd_ae.ckpt --dst ~/fmboost/vae/sd
  (`sd_ae.ckpt` of latent diffusion, or diffusers' `vae/diffusion_pytorch_model.safetensors`);
- LHQ (90k landscape photos at 1024²) as a TFDS dataset in `config.data.path` (see README,
  "Data"), or precomputed latent records (`--config.data.name=latents`).
The batch size and number of steps were not published; set them for your hardware
(`--config.batch_size=...`; `python -m fmboost_jax.plan` says what fits a TPU slice).

`--config=configs/lhq.py:smoke` is the same code path (latent space, PSU, noising step 400,
concat context) shrunk to run a few steps on a CPU with a narrow, randomly initialised VAE on
photos that ship with scikit-image. `:regression` (also `:smoke,regression`) is the paper's
regression baseline: the same UNet predicting the high-res latent in one pass.
"""

from fmboost_jax.config import as_regression, base_config, variants


def get_config(arg: str | None = None):
    chosen = variants(arg, ("smoke", "regression"))
    c = base_config()
    c.data.update(name="tfds", tfds_name="lhq", path="~/tensorflow_datasets", worker_count=8)
    # Params, EMA and Adam moments sharded over every device (FSDP), and the VAE coding one
    # image at a time inside the step: 4 images per chip fit the 16 GiB of a v5e chip
    # (`python -m fmboost_jax.plan --config=configs/lhq.py --topology=v5e-16`).
    c.mesh = (("data", 1), ("fsdp", -1))
    c.first_stage.micro_batch = 1
    if "smoke" in chosen:
        smoke(c, low_res=32, high_res=64)
    if "regression" in chosen:
        as_regression(c)
    return c


def at_2k(low_res: int, arg: str | None, smoke_low_res: int):
    """The released setup with 2048² outputs from `low_res` inputs, the VAE in 1024-px tiles;
    `arg="smoke"`: the same path on a CPU (`smoke_low_res` -> 64 px, no tiles)."""
    c = get_config()
    c.low_res_size, c.high_res_size = low_res, 2048
    c.first_stage.tile_size = 1024
    if arg == "smoke":
        smoke(c, low_res=smoke_low_res, high_res=64)
        c.first_stage.tile_size = 0
    return c


def smoke(c, low_res: int, high_res: int) -> None:
    """Shrinks a latent-space config to a few CPU steps on the same code path."""
    c.low_res_size, c.high_res_size = low_res, high_res
    c.dtype = "float32"
    c.first_stage.update(name="tiny_vae", checkpoint="random", dtype="float32")
    # One UNet level with self-attention at it (the UNet's own tests cover its depth): the
    # end-to-end tests compile it several times over.
    c.unet.update(model_channels=32, num_res_blocks=1, channel_mult=(1,),
                  attention_resolutions=(1,), dim_head=8, num_heads=2)
    c.optim.update(lr=1e-3, warmup_steps=2)
    c.ema.update(update_after_step=1)
    c.data.update(name="skimage_photos", train_photos=("astronaut", "coffee"),
                  eval_photos=("chelsea",), num_eval_images=4, worker_count=0)
    c.batch_size, c.total_steps = 4, 3
    c.sampling.update(solver="euler", num_steps=2)
    c.eval_batch_size = 0
    c.log_every, c.eval_every, c.checkpoint_every = 1, 3, 3
    c.keep_checkpoints, c.keep_every = 1, 0
    c.num_grid_images = 2
