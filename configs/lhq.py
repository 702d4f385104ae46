"""LHQ, 512² -> 1024² px (SD latents 64² -> 128²): the paper's released setup.

    python -m fmboost_jax.train --config=configs/lhq.py --workdir=runs/lhq

Expects
- the SD VAE converted to Flax (`config.first_stage.checkpoint`, default `~/fmboost/vae/sd`):
      python -m fmboost_jax.convert vae --src sd_ae.ckpt --dst ~/fmboost/vae/sd
  (`sd_ae.ckpt` of latent diffusion, or diffusers' `vae/diffusion_pytorch_model.safetensors`);
- LHQ (90k landscape photos at 1024²) as a TFDS dataset in `config.data.path` (see README,
  "Data"), or precomputed latent records (`--config.data.name=latents`).

The UNet is the released one (306M parameters: 128 channels, mult (1, 2, 4, 8), 3 ResBlocks,
attention at ds 8 and 16, 4 heads of 64), trained on x1 = the high-res latent, x0 = the PSU latent
(the low-res image bilinearly up-sampled in pixel space, then encoded) noised at step 400, with
the clean PSU latent concatenated as context; Adam 3e-5 with 1000 warm-up steps, EMA 0.999,
bfloat16 compute. The batch size and number of steps were not published; set them for your
hardware (`--config.batch_size=...`).

`--config=configs/lhq.py:smoke` is the same code path (latent space, PSU, noising step 400,
concat context) shrunk to run a few steps on a CPU with a narrow, randomly initialised VAE on
photos that ship with scikit-image.
"""

from fmboost_jax.config import base_config

LOW_RES, HIGH_RES = 512, 1024


def get_config(arg: str | None = None):
    c = base_config()
    c.low_res_size, c.high_res_size = LOW_RES, HIGH_RES
    c.dtype = "bfloat16"

    c.first_stage.update(name="sd_vae", checkpoint="~/fmboost/vae/sd", dtype="bfloat16")
    c.scale_factor, c.shift_factor = 0.18215, 0.0

    c.coupling.update(upsampling_mode="psu", noising_step=400, concat_context=True,
                      start_from_noise=False)
    c.flow.update(schedule="linear", sigma_min=0.0)
    c.unet.update(in_channels=8, model_channels=128, out_channels=4, num_res_blocks=3,
                  channel_mult=(1, 2, 4, 8), attention_resolutions=(8, 16), dim_head=64,
                  num_heads=4, use_scale_shift_norm=True, dropout=0.0)
    c.optim.update(lr=3e-5, warmup_steps=1000)
    c.ema.update(rate=0.999, update_after_step=1000)

    c.data.update(name="tfds", tfds_name="lhq", path="~/tensorflow_datasets",
                  num_eval_images=64, worker_count=8)
    c.batch_size = 64
    c.total_steps = 300_000
    c.sampling.update(solver="rk4", num_steps=39)     # the reference's validation sampler
    c.eval_batch_size = 16
    c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 2_000
    c.keep_checkpoints, c.keep_every = 3, 50_000

    if arg == "smoke":
        smoke(c, low_res=32, high_res=64)
    return c


def smoke(c, low_res: int, high_res: int) -> None:
    """Shrinks a latent-space config to a few CPU steps on the same code path."""
    c.low_res_size, c.high_res_size = low_res, high_res
    c.dtype = "float32"
    c.first_stage.update(checkpoint="", random_init=True, dtype="float32", ch=32,
                         num_res_blocks=1)
    c.unet.update(model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                  attention_resolutions=(2,), dim_head=8, num_heads=2)
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
