"""The paper's setups and the demo as Python configs: `fmboost_jax.config.load_config("lhq")`."""
