"""A pixel-space 4x config small enough to train a few steps in seconds (tests only).

    python -m fmboost_jax.train --config=tests/tiny_config.py --workdir=/tmp/tiny
"""

from fmboost_jax.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.low_res_size, c.high_res_size = 4, 16
    c.lowres_antialias = True
    c.dtype = "float32"
    c.first_stage.update(name="identity", checkpoint="")
    c.coupling.noising_step = -1
    c.unet.update(in_channels=6, model_channels=32, out_channels=3, num_res_blocks=1,
                  channel_mult=(1, 2), attention_resolutions=(2,), dim_head=8, num_heads=2)
    if arg == "flat":  # one level, no attention: compiles fastest
        c.unet.update(channel_mult=(1,), attention_resolutions=())
    c.optim.update(lr=1e-3, warmup_steps=2)
    c.ema.update(rate=0.9, update_after_step=1)
    c.data.update(name="skimage_photos", path="", tfds_name="", worker_count=0,
                  train_photos=("astronaut", "chelsea"), eval_photos=("coffee",),
                  num_eval_images=8)
    c.batch_size = 8
    c.total_steps = 6
    c.log_every, c.eval_every, c.checkpoint_every = 2, 6, 3
    c.keep_checkpoints, c.keep_every = 3, 0
    c.eval_batch_size = 0
    c.sampling.update(solver="euler", num_steps=2)
    c.num_grid_images = 2
    return c
