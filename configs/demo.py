"""The embedded demo: pixel-space 4x CFM on real photos, ~10 minutes on 2 CPU cores.

    python -m fmboost_jax.train --config=configs/demo.py --workdir=runs/demo

Trains on random crops of seven photos that ship with scikit-image and evaluates on
fixed crops of a held-out photo (`stereo_motorcycle`), comparing CFM against
bilinear and bicubic up-sampling with PSNR and SSIM (written to `runs/demo/eval.json`,
grids to `runs/demo/samples/`). `--config=configs/demo.py:smoke` shrinks it to a few
steps (used by the tests).

Differences from the paper's latent-space setup, because this is pixel space on a CPU:
a small UNet (1.2M parameters), 8x8 -> 32x32 crops, a higher learning rate (1e-3) with a
faster EMA, no forward noising of the source (noising step 400 is tuned for SD latents;
here x0 is the bilinear image itself), and 4 Euler steps for sampling.
"""

from fmboost_jax.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.low_res_size, c.high_res_size = 8, 32
    c.lowres_downsampling, c.lowres_antialias = "bilinear", True
    c.first_stage.name, c.scale_factor = "identity", 1.0

    c.coupling.upsampling_mode = "psu"      # in pixel space: bilinear up-sampling
    c.coupling.noising_step = -1
    c.coupling.concat_context = True

    c.unet.update(in_channels=6, model_channels=32, out_channels=3, num_res_blocks=1,
                  channel_mult=(1, 2, 2), attention_resolutions=(), dim_head=32, num_heads=4)

    c.optim.update(lr=1e-3, warmup_steps=100)
    c.ema.update(rate=0.995, update_after_step=100)

    c.data.train_photos = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                           "immunohistochemistry", "retina")
    c.data.eval_photos = ("stereo_motorcycle",)
    c.data.num_eval_images = 64
    c.batch_size = 16
    c.total_steps = 800
    # Without noising, the context pins x0, so the learned flow is nearly straight and a few
    # Euler steps suffice; more steps mostly integrate the young network's errors.
    c.sampling.update(solver="euler", num_steps=4)

    c.log_every = 25
    c.eval_every = 400
    c.checkpoint_every = 200
    c.keep_checkpoints = 2

    if arg == "smoke":  # a few steps through every code path, for tests
        c.total_steps, c.batch_size = 4, 4
        c.log_every, c.eval_every, c.checkpoint_every = 2, 4, 2
        c.data.num_eval_images = 4
        c.num_grid_images = 2
        c.optim.warmup_steps = 2
        c.ema.update_after_step = 1
        c.sampling.num_steps = 2
    return c
