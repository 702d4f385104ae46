"""fmboost_jax: Boosting Latent Diffusion with Flow Matching (CFM upsampler) in JAX/Flax.

For notebooks: `fmboost_jax.load_upsampler(workdir)` gives an `Upsampler` to call on low-res
images; `fmboost_jax.load_config("lhq")` a config. Both are imported on first use.
Importing the package sets XLA's CPU flags (`fmboost_jax.xla_cpu`; `FMBOOST_XLA_CPU=off` keeps
`$XLA_FLAGS` as it is).
"""

from typing import Any

from fmboost_jax import xla_cpu

xla_cpu.configure()

_EXPORTS = {"load_upsampler": "fmboost_jax.inference.upsampler",
            "Upsampler": "fmboost_jax.inference.upsampler",
            "Cascade": "fmboost_jax.inference.upsampler",
            "load_config": "fmboost_jax.config"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fmboost_jax' has no attribute {name!r}")
