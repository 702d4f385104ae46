"""Training: the loop (`loop.train_and_evaluate`), its set-up, the update step, the state and
optimizer, checkpoints, preemption, metric logging and throughput. `python -m fmboost_jax.train`
is the command line."""
