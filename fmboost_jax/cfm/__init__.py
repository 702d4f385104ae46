"""Coupling Flow Matching, pure JAX (no I/O): forward noising, the up-sampled latent, the
coupling, probability paths and the loss, the CFM model, ODE solvers and sampling."""
