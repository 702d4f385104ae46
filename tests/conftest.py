"""Shared test set-up: the repository and tests/ on sys.path, a persistent compilation cache, and
the tiny config fixture."""

import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS))
sys.path.insert(0, TESTS)

# The tests compile hundreds of small programs, most run once: XLA's CPU backend compiles them
# without LLVM's optimisation passes (about 40% less compile time; results agree to float32
# rounding). Set before JAX starts its backend, and inherited by the tests' subprocesses. Added
# once: the workers inherit the controller's variable, and JAX's compilation cache keys hold
# every flag, repeats included, so a repeat would split the cache between processes.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# The tests run on the CPU: libtpu (installed to compile TPU programs ahead of time in the plan's
# tests) would otherwise make JAX look for a TPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Identical programs compiled by different tests (each training run builds fresh closures)
# are read back from a persistent cache instead of being compiled again.
jax.config.update("jax_compilation_cache_dir", os.path.join(TESTS, ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The command lines the tests start in subprocesses cache there too (not in ~/.cache).
os.environ.setdefault("FMBOOST_COMPILE_CACHE", os.path.join(TESTS, ".jax_cache"))

import support  # noqa: E402
from training_runs import FINAL_ONLY, TOTAL, finish, start, steps  # noqa: E402

from fmboost_jax.checkpoints.store import restore_params  # noqa: E402


@pytest.fixture
def tiny_config():
    return support.tiny_pixel_config()


@pytest.fixture(scope="session")
def sd():
    """The SD-config PyTorch VAE (random weights), its outputs on a photo, and the converted
    params (the VAE's oracle; torch and diffusers are imported only by the tests that ask)."""
    from vae_oracle import photo, torch_outputs, torch_vae

    from fmboost_jax.convert import vae_params_from_torch
    from fmboost_jax.models import autoencoder as ae
    model = torch_vae()
    x = photo()
    params = vae_params_from_torch(model.state_dict(), ae.AutoencoderKL(ae.preset("sd")))
    return model, x, torch_outputs(model, x), params


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """A finished 2-step run of the tiny pixel config (4x; the zero-initialised output conv keeps
    the briefly trained model close to its bilinear source), made once for all workers."""
    def train(path):
        from fmboost_jax.train.loop import train_and_evaluate
        c = support.tiny_pixel_config()
        c.total_steps, c.eval_every, c.checkpoint_every = 2, 2, 2
        train_and_evaluate(c, path)
    return support.made_once(tmp_path_factory, "tiny_run", train)


@pytest.fixture(scope="session")
def smoke_params(tmp_path_factory):
    """Random UNet params of configs/lhq.py:smoke (2x, a tiny random-weight VAE), saved as
    converted params are: the model of `load_upsampler(smoke_params, config="lhq:smoke")`."""
    def save(path):
        import orbax.checkpoint as ocp

        from fmboost_jax.cfm.model import CFM
        from fmboost_jax.config import load_config
        cfm = CFM.from_config(load_config("lhq:smoke"))
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(path, "params"), cfm.init_params(jax.random.PRNGKey(0)))
        ckpt.wait_until_finished()
    return os.path.join(support.made_once(tmp_path_factory, "smoke", save), "params")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The workdir of an uninterrupted single-device run of `training_runs` (made once for all
    workers; tests change copies of it)."""
    def train(workdir):
        out = finish(start(workdir, FINAL_ONLY))
        assert steps(workdir)[-1] == TOTAL, out[-3000:]
    return support.made_once(tmp_path_factory, "reference", train)


@pytest.fixture(scope="session")
def reference(reference_run):
    """Final params and EMA params of `reference_run`, which the checkpoint and preemption tests
    compare with."""
    return restore_params(reference_run, use_ema=False), restore_params(reference_run)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A GCS server on loopback for this worker (`gcs_server.py`); this process and the commands
    the tests start reach `gs://` there, never a real bucket, and stage copies of remote files
    in a temporary folder."""
    import gcs_server
    server = gcs_server.start()
    os.environ.update(server.environ(), FMBOOST_STAGE_DIR=str(tmp_path_factory.mktemp("staged")))
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
    """`gs://NAME` of a new, empty bucket of the loopback server."""
    return f"gs://{gcs_server.new_bucket()}"

