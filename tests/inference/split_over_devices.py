"""Boosts a batch of 3 with the batch split over 8 fake CPU devices and on one device; prints the
largest difference; then the same for an SDE sampler of the noised coupling, on the padded batch,
for the FID Inception's features (a random-weight network), and for the training evaluator on a
held-out set the devices do not divide.
Run by tests/inference/test_upsampler.py in a fresh process:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/inference/split_over_devices.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from support import tiny_pixel_config

from fmboost_jax.cfm.model import CFM
from fmboost_jax.cfm.sampling import make_sample_fn
from fmboost_jax.evaluation.benchmark import InceptionFeatures, _network, _preprocess
from fmboost_jax.evaluation.evaluator import Evaluator
from fmboost_jax.inference.upsampler import Upsampler, _split_over_local_devices
from fmboost_jax.models import inception
from fmboost_jax.parallel import sharding

config = tiny_pixel_config()
cfm = CFM.from_config(config)
params = jax.tree.map(lambda p: p + 0.01, cfm.init_params(jax.random.PRNGKey(0)))   # v != 0
lowres = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
up = Upsampler(cfm, params, {}, config)
out = up(lowres, jax.random.PRNGKey(1), solver="heun", num_steps=2)
one = make_sample_fn(cfm, solver="heun", num_steps=2)(params, {}, lowres, jax.random.PRNGKey(1))
assert out.images.shape == (3, 16, 16, 3), out.images.shape
split = _split_over_local_devices(lowres)               # padded to 8, one row per device
print("RESULT", jax.local_device_count(), len(split.sharding.device_set), split.shape[0],
      float(np.abs(np.asarray(out.images) - np.asarray(one.images)).max()),
      int(one.stats["nfe"]), float(np.abs(np.asarray(one.images)).max()))

config.coupling.noising_step = 400                       # the paper's coupling: SDEs apply
cfm = CFM.from_config(config)
sde_fn = make_sample_fn(cfm, solver="sde_heun", num_steps=2)
sharded = sde_fn(params, {}, split, jax.random.PRNGKey(1))
single = sde_fn(params, {}, np.asarray(split), jax.random.PRNGKey(1))
print("SDE", len(sharded.images.sharding.device_set),
      float(np.abs(np.asarray(sharded.images) - np.asarray(single.images)).max()),
      int(single.stats["nfe"]), float(np.abs(np.asarray(single.images)).max()))

variables = inception.init_variables(jax.random.PRNGKey(2))
images = np.random.default_rng(1).uniform(0, 1, (5, 40, 40, 3)).astype(np.float32)
features = InceptionFeatures(variables, batch=3)          # rounded up to 8: one padded chunk
split = features(images)
alone = np.asarray(jax.jit(_network)(variables, _preprocess(images)))
print("INCEPTION", features.batch, len(features.split.device_set),
      float(np.abs(split - alone).max() / np.abs(alone).max()))

# The training evaluator on 5 held-out images, which 8 devices do not divide: padded to 8, one
# row per device, and the same scores as on one device.
config = tiny_pixel_config()
config.eval_batch_size = 16
cfm = CFM.from_config(config)
held_out = np.random.default_rng(2).uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
results = {}
for name, devices in (("split", jax.devices()), ("one", jax.devices()[:1])):
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)), devices)
    evaluator = Evaluator(cfm, config, held_out, mesh)
    (chunk, valid), = evaluator.chunks
    rows = chunk.sharding.shard_shape(chunk.shape)[0]
    results[name] = (rows, valid, evaluator.run(params, {}, jax.random.PRNGKey(4))[0])
print("EVALUATOR", results["split"][0], results["split"][1], results["one"][0],
      max(abs(results["split"][2][k] - results["one"][2][k]) for k in results["one"][2]))
