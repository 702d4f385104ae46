"""The CPU speed switch (`fmboost_jax.xla_cpu`): which flags it adds, and that the UNet computes
the same outputs and gradients with and without them."""

import os
import subprocess
import sys

import numpy as np
from conftest import TEST_XLA_FLAGS

from fmboost_jax import xla_cpu

# Run in a fresh process (XLA reads $XLA_FLAGS once): a UNet with every kind of layer, outputs
# and parameter gradients saved to argv[1], and the XLA_FLAGS the process ran with.
CHILD = r"""
import sys
import fmboost_jax, jax, jax.numpy as jnp, numpy as np, os
from fmboost_jax.models.unet import EfficientUNet
model = EfficientUNet(in_channels=8, model_channels=32, out_channels=4, num_res_blocks=1,
                      attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 2),
                      conv_resample=True, dim_head=16, num_heads=2, use_linear_attn=False,
                      use_scale_shift_norm=True, pool_factor=-1)
k = jax.random.split(jax.random.PRNGKey(0), 3)
x, c = jax.random.normal(k[0], (2, 16, 16, 4)), jax.random.normal(k[1], (2, 16, 16, 4))
t = jnp.array([0.3, 0.8])
# Random weights for every parameter (the zero-initialised layers included, so that every
# layer reaches the output), without tracing the initialisers.
shapes, tree = jax.tree_util.tree_flatten(jax.eval_shape(model.init, k[2], x, t, c))
rng = np.random.default_rng(0)
leaves = [rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) > 1 else 20.0)
          for s in shapes]
params = jax.tree_util.tree_unflatten(tree, [jnp.asarray(p, jnp.float32) for p in leaves])
loss = lambda p: jnp.mean(jnp.square(model.apply(p, x, t, c)))
out = jax.jit(model.apply)(params, x, t, c)
grads = jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(params))
np.savez(sys.argv[1], out=np.asarray(out), *[np.asarray(g) for g in grads])
print(os.environ.get("XLA_FLAGS", ""))
"""


def _child_env() -> dict[str, str]:
    """This environment without the switch, with the tests' own flag alone in XLA_FLAGS (LLVM
    at -O0: it compiles faster and leaves the flags' choice of kernels as it is)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.ENV_VAR)}
    return env | {"XLA_FLAGS": TEST_XLA_FLAGS}


def _run(tmp_path, name, **env):
    path = str(tmp_path / f"{name}.npz")
    env = _child_env() | env
    proc = subprocess.run([sys.executable, "-c", CHILD, path], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(path), proc.stdout.strip()


def test_flags_follow_the_switch_the_jaxlib_and_the_users_flags():
    new = (0, 10)
    assert xla_cpu.flags_to_add({}, new) == list(xla_cpu.FLAGS)
    for off in ("off", "0", "False", " none "):
        assert xla_cpu.flags_to_add({xla_cpu.ENV_VAR: off}, new) == []
    assert xla_cpu.flags_to_add({}, (0, 8)) == []            # the flag would abort that XLA
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    assert xla_cpu.flags_to_add({"XLA_FLAGS": mine}, new) == []
    other = "--xla_force_host_platform_device_count=8"
    assert xla_cpu.flags_to_add({"XLA_FLAGS": other}, new) == list(xla_cpu.FLAGS)
    # A GPU/TPU host keeps its XLA_FLAGS, unless it asks for the CPU platform.
    assert xla_cpu.flags_to_add({}, new, accelerator=True) == []
    assert xla_cpu.flags_to_add({"JAX_PLATFORMS": "cpu"}, new, accelerator=True) == list(xla_cpu.FLAGS)


def test_unet_outputs_and_gradients_agree_with_and_without_the_flags(tmp_path):
    tuned, tuned_flags = _run(tmp_path, "tuned")
    plain, plain_flags = _run(tmp_path, "plain", FMBOOST_XLA_CPU="off")
    if xla_cpu.flags_to_add(_child_env(), xla_cpu._jaxlib_version(),
                            xla_cpu._accelerator_installed()):
        assert xla_cpu.FLAGS[0] in tuned_flags
    else:
        assert tuned_flags == TEST_XLA_FLAGS
    assert plain_flags == TEST_XLA_FLAGS
    assert tuned.files == plain.files and len(tuned.files) > 40
    for name in tuned.files:
        a, b = tuned[name], plain[name]
        scale = max(float(np.max(np.abs(b))), 1e-12)
        assert np.max(np.abs(a - b)) <= 1e-5 * scale + 1e-8, name
