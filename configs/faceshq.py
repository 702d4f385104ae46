"""FacesHQ (CelebA-HQ + FFHQ), 256² -> 1024² px (SD latents 32² -> 128², 4x).

    python -m fmboost_jax.train --config=configs/faceshq.py --workdir=runs/faceshq

Expects the SD VAE converted to Flax in `config.first_stage.checkpoint` (default
`~/fmboost/vae/sd`; `python -m fmboost_jax.convert vae --src sd_ae.ckpt --dst ~/fmboost/vae/sd`)
and FacesHQ as a TFDS dataset in `config.data.path` (see README, "Data"), or precomputed latent
records. Everything else is the released LHQ setup (`configs/lhq.py`) at a 4x factor.
`--config=configs/faceshq.py:smoke` runs a few CPU steps on the same code path.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "fmboost_configs_lhq", os.path.join(os.path.dirname(os.path.abspath(__file__)), "lhq.py"))
lhq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lhq)


def get_config(arg: str | None = None):
    c = lhq.get_config()
    c.low_res_size, c.high_res_size = 256, 1024
    c.data.tfds_name = "faceshq"
    if arg == "smoke":
        lhq.smoke(c, low_res=16, high_res=64)
    return c
