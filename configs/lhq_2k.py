"""LHQ at 2k: 512² -> 2048² px in one 4x step (SD latents 64² -> 256²), the seed figure's 2k setup.

    python -m fmboost_jax.train --config=configs/lhq_2k.py --workdir=runs/lhq_2k

The released setup (`configs/lhq.py`) at a 4x factor and 2048² outputs. At 2048² the VAE codes in
1024-px tiles (`first_stage.tile_size`); precomputing the latents once
(`python -m fmboost_jax.precompute_latents --config=configs/lhq_2k.py ...`) saves the encoder
at every step. `:smoke` runs the same code path on a CPU (16² -> 64² px, a tiny random VAE).
"""

from configs import lhq


def get_config(arg: str | None = None):
    return lhq.at_2k(512, arg, smoke_low_res=16)
