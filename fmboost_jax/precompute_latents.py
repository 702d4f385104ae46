"""Command line of `fmboost_jax.data.precompute`: the VAE latents of a dataset.

    python -m fmboost_jax.precompute_latents --config=configs/lhq.py --workdir=~/data/lhq_latents

See `fmboost_jax/data/precompute.py` for what is written and how a run resumes.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from fmboost_jax import compile_cache, paths
from fmboost_jax.cli import config_from_flag, run_app, user_errors_in_one_line
from fmboost_jax.data.precompute import CHUNK_BATCHES
from fmboost_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config: a file (configs/lhq.py[:arg]) or a name of configs/ (lhq:smoke).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for the latent records.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Which part of the source.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Images per step over all devices "
                              "(default: config.batch_size).", lower_bound=0)
_CHUNK = flags.DEFINE_integer("chunk_batches", CHUNK_BATCHES, "Batches per output file.",
                              lower_bound=1)
_STORE_IMAGES = flags.DEFINE_bool("store_images", False, "Also store the uint8 images.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "Join a multi-process run (see fmboost_jax.train).")
_NO_COMPILE_CACHE = flags.DEFINE_bool("no_compile_cache", False, compile_cache.FLAG_HELP)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    compile_cache.enable(off=_NO_COMPILE_CACHE.value)
    distributed.initialize(_DISTRIBUTED.value)
    from fmboost_jax.data.precompute import precompute  # after the processes are connected
    with user_errors_in_one_line():
        precompute(config_from_flag(_CONFIG), paths.resolve(_WORKDIR.value), _SPLIT.value,
                   _BATCH.value, _CHUNK.value, _STORE_IMAGES.value)


def run() -> None:
    """Console script `fmboost-precompute`."""
    run_app(main)


if __name__ == "__main__":
    run()
