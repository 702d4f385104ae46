"""FacesHQ (CelebA-HQ + FFHQ), 256² -> 1024² px (SD latents 32² -> 128², 4x).

    python -m fmboost_jax.train --config=configs/faceshq.py --workdir=runs/faceshq

The released setup (`configs/lhq.py`) at a 4x factor on FacesHQ: expects the SD VAE converted to
Flax in `config.first_stage.checkpoint` and FacesHQ as a TFDS dataset in `config.data.path` (see
README, "Data"), or precomputed latent records. `--config=configs/faceshq.py:smoke` runs a few
CPU steps on the same code path.
"""

from configs import lhq


def get_config(arg: str | None = None):
    c = lhq.get_config()
    c.low_res_size, c.high_res_size = 256, 1024
    c.data.tfds_name = "faceshq"
    if arg == "smoke":
        lhq.smoke(c, low_res=16, high_res=64)
    return c
