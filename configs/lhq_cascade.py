"""The second stage of a 2-stage cascade to 2048² px: 1024² -> 2048² (SD latents 128² -> 256², 2x).

    python -m fmboost_jax.train --config=configs/lhq.py --workdir=runs/lhq                # stage 1
    python -m fmboost_jax.train --config=configs/lhq_cascade.py --workdir=runs/lhq_stage2  # stage 2
    python -m fmboost_jax.upsample --model runs/lhq --model runs/lhq_stage2 --input x.png --output y.png

Stage 1 is the released setup (512² -> 1024², `configs/lhq.py`); this stage takes its output
size as input and doubles it again, in the same SD latent space, so `fmboost_jax.Cascade` (or
several `--model`s) runs them back to back: 512² -> 1024² -> 2048² px, or from a diffusion
model's 64² latents to 256² ones. At 2048² the VAE codes in 1024-px tiles. `:smoke` runs the
same code path on a CPU (32² -> 64² px, a tiny random VAE).
"""

from configs import lhq


def get_config(arg: str | None = None):
    return lhq.at_2k(1024, arg, smoke_low_res=32)
