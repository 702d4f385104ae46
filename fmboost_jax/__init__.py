"""fmboost_jax: Boosting Latent Diffusion with Flow Matching (CFM upsampler) in JAX/Flax."""
