"""Command line: `python -m fmboost_jax.train --config=configs/X.py --workdir=DIR`.

Fields of the config can be overridden with `--config.a.b=value`; rerunning with the
same workdir resumes from its latest checkpoint.
"""

import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

from fmboost_jax.trainer import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Drops the INFO chatter of orbax (one line per checkpoint file operation)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
