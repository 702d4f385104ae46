"""FacesHQ (CelebA-HQ + FFHQ), 256² -> 1024² px (SD latents 32² -> 128², 4x).

    python -m fmboost_jax.train --config=configs/faceshq.py --workdir=runs/faceshq

The released setup (`configs/lhq.py`) at a 4x factor on FacesHQ: expects the SD VAE converted to
Flax in `config.first_stage.checkpoint` and FacesHQ as a TFDS dataset in `config.data.path` (see
README, "Data"), or precomputed latent records. `--config=configs/faceshq.py:smoke` runs a few
CPU steps on the same code path. `:regression` is the paper's FacesHQ baseline: "a regression
model trained in latent space with the same number of parameters" (the same UNet, one pass).
"""

from configs import lhq
from fmboost_jax.config import as_regression, variants


def get_config(arg: str | None = None):
    chosen = variants(arg, ("smoke", "regression"))
    c = lhq.get_config()
    c.low_res_size, c.high_res_size = 256, 1024
    c.data.tfds_name = "faceshq"
    if "smoke" in chosen:
        lhq.smoke(c, low_res=16, high_res=64)
    if "regression" in chosen:
        as_regression(c)
    return c
