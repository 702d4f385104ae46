"""Fit plan: does a config train (and boost) on a TPU slice? Compiled ahead of time, on any host.

    python -m fmboost_jax.plan --config=configs/lhq.py --topology=v5e-16

Compiles the real training step (VAE encoding, PSU, UNet, loss, Adam, EMA) on the config's mesh
and batch, and the boost (the config's sampler on one low-res image per chip), for the chips of
the slice with libtpu's compile-only TPU client (`pip install "jax[tpu]"`; no TPU needed), and
prints per chip: the peak HBM (arguments + temporaries + outputs - donated), the chip's HBM,
FLOPs per step, and the largest per-chip batch that fits (a second compile at twice the batch
gives the memory each example adds). The last line is the verdict:

    plan: configs/lhq.py on v5e-16: peak 7.71 GiB of 16.00 GiB per chip at per-chip batch 4, fits

"auto" dtypes are the accelerators' bfloat16; the VAE weights are random of the real shapes
(nothing is read). Results are kept in `$XDG_CACHE_HOME/fmboost_jax/plans`, keyed by the
lowered program, the slice and the JAX and libtpu versions: a second plan of the same program
takes seconds. Status 0 when it fits, 1 when it does not, 2 on a bad config or topology.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

# The plan runs nothing on this host's devices: keep JAX off a TPU it may sit on (libtpu's
# compile-only client needs none), and quiet about the one it does not find.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fmboost_jax import paths
from fmboost_jax.cfm import sampling
from fmboost_jax.cfm.model import CFM
from fmboost_jax.cli import config_from_flag, run_app, user_errors_in_one_line
from fmboost_jax.data import pipeline
from fmboost_jax.parallel import sharding, tpu
from fmboost_jax.train import setup
from fmboost_jax.train.state import create_train_state, make_optimizer

GiB = 2**30
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config: a file (configs/lhq.py[:arg]) or a name of configs/ (lhq:smoke).",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, f"TPU slice: {tpu.EXAMPLES}.")
_BOOST = flags.DEFINE_bool("boost", True, "Also plan the boost (the config's sampler).")
_LARGEST = flags.DEFINE_bool("largest", True, "Also find the largest per-chip batch that fits "
                             "(a second compile of each program).")
_CACHE = flags.DEFINE_string("cache_dir", None, "Where results are kept (default: "
                             "$XDG_CACHE_HOME/fmboost_jax/plans; 'off': not kept).")
flags.mark_flags_as_required(["config", "topology"])


@dataclasses.dataclass(frozen=True)
class Usage:
    """Per-chip bytes and FLOPs of one compiled program."""
    arguments: int
    temporaries: int
    outputs: int
    donated: int
    code: int
    flops: float

    @property
    def peak(self) -> int:
        return self.arguments + self.temporaries + self.outputs - self.donated + self.code


def planned_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` as it runs on TPUs, reading no files: "auto" dtypes bfloat16, random VAE weights
    (the same shapes), nothing to evaluate."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.dtype = "bfloat16" if c.dtype == "auto" else c.dtype
        if "first_stage" in c:
            fs = c.first_stage
            fs.dtype = "bfloat16" if fs.dtype == "auto" else fs.dtype
            fs.checkpoint = "random"
    return c


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def train_step(config: ml_collections.ConfigDict, devices: list[Any], per_chip: int
               ) -> tuple[Any, tuple[Any, Any, Any]]:
    """The jitted training step of `config` for `devices`, and its abstract arguments (state,
    first stage params, batch) at `per_chip` examples per device."""
    mesh = sharding.make_mesh(config.mesh, devices)
    cfm, tx = CFM.from_config(config), make_optimizer(config.optim)
    keys = (jax.random.PRNGKey(0), jax.random.PRNGKey(1))
    state = jax.eval_shape(lambda a, b: create_train_state(cfm.init_params(a), tx, b), *keys)
    shardings = sharding.state_shardings(state, mesh, config.fsdp_min_size)
    fs_params = jax.eval_shape(cfm.first_stage.init_params, keys[0])
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))
             for k, (shape, dtype) in pipeline.batch_spec(config, per_chip * len(devices)).items()}
    step = setup.jit_train_step(cfm, tx, config, mesh, shardings)
    replicated = jax.tree.map(lambda _: sharding.replicated(mesh), fs_params)
    return step, (_abstract(state, shardings), _abstract(fs_params, replicated), batch)


def lower_boost(config: ml_collections.ConfigDict, devices: list[Any], per_chip: int) -> Any:
    """The config's sampler (images in, images out) lowered for `devices` at `per_chip`
    low-res images of `config.low_res_size`² per device, the params replicated."""
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    cfm = CFM.from_config(config)
    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(cfm.init_params, key)
    fs_params = jax.eval_shape(cfm.first_stage.init_params, key)
    rep = lambda tree: _abstract(tree, jax.tree.map(lambda _: replicated, tree))
    s = config.low_res_size
    images = jax.ShapeDtypeStruct((per_chip * len(devices), s, s, 3), np.float32, sharding=split)
    fn = sampling.make_sample_fn(cfm, **sampling.solver_options(config.sampling))
    return fn.lower(rep(params), rep(fs_params), images, jax.ShapeDtypeStruct(
        key.shape, key.dtype, sharding=replicated))


def _versions() -> str:
    found = []
    for package in ("jax", "jaxlib", "libtpu"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def cache_dir(value: str | None) -> str | None:
    """Where plans are kept: `value`, else `$XDG_CACHE_HOME/fmboost_jax/plans`; None: 'off'."""
    if value and value.lower() in ("off", "none", "0", "false", "no"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return paths.resolve(value) if value else os.path.join(base, "fmboost_jax", "plans")


class Planner:
    """Compiles programs for one slice and remembers their usage (in `cache`, when given)."""

    def __init__(self, s: tpu.TpuSlice, cache: str | None, say: Callable[[str], None]):
        self.slice, self.cache, self.say = s, cache, say
        self.devices = tpu.devices(s)

    def usage(self, what: str, lowered: Any) -> Usage | None:
        """`lowered`'s per-chip usage; None when libtpu refuses it for want of HBM."""
        key = hashlib.sha256(f"{self.slice.topology}|{_versions()}|{lowered.as_text()}".encode())
        file = self.cache and paths.join(self.cache, f"{key.hexdigest()[:32]}.json")
        if file and paths.exists(file):
            found = json.loads(paths.read_text(file))
            self.say(f"{what}: from the plan cache")
            return None if found is None else Usage(**found)
        self.say(f"{what}: compiling for {self.slice.topology} ...")
        start = time.perf_counter()
        try:
            compiled = lowered.compile()
            m = compiled.memory_analysis()
            result = Usage(m.argument_size_in_bytes, m.temp_size_in_bytes, m.output_size_in_bytes,
                           m.alias_size_in_bytes, m.generated_code_size_in_bytes,
                           float(_flops(compiled)))
        except Exception as err:
            sizes = tpu.out_of_memory(err)
            if not sizes:
                raise
            result, need = None, sizes[0]
        self.say(f"{what}: compiled in {time.perf_counter() - start:.0f} s" + (
            "" if result else f"; refused: its temporaries alone need {need / GiB:.2f} GiB"))
        if file:
            paths.makedirs(self.cache)
            paths.write_text(file, json.dumps(None if result is None else
                                              dataclasses.asdict(result)))
        return result


def _flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", 0.0))


@dataclasses.dataclass(frozen=True)
class Fit:
    """A program at `batch` examples per chip, and the largest per-chip batch that fits."""
    batch: int
    usage: Usage | None         # None: libtpu refused it for want of HBM
    largest: int                # 0: not even one example
    refused: int = 0            # > 0: `largest` fits and this does not, nothing measured between

    def line(self, capacity: int, unit: str = "examples", flops: bool = True) -> str:
        """The usage and the largest batch in words; `flops`: XLA's count too (not for loops,
        whose body XLA counts once)."""
        head = f"{self.batch} {unit} per chip"
        largest = (f"at least {self.largest} and fewer than {self.refused} {unit} per chip fit"
                   if self.refused else
                   f"at most {self.largest} {unit} per chip fit" if self.largest else "")
        if self.usage is None:
            return f"{head}: more than {capacity / GiB:.2f} GiB" + (largest and f"; {largest}")
        u = self.usage
        parts = [f"{head}: peak {u.peak / GiB:.2f} GiB of {capacity / GiB:.2f} GiB (arguments "
                 f"{u.arguments / GiB:.2f}, temporaries {u.temporaries / GiB:.2f})"]
        parts += [f"{u.flops:.3g} FLOPs per chip"] if flops else []
        return "; ".join(parts + ([largest] if largest else []))


def fit(usage_at: Callable[[int], Usage | None], batch: int, capacity: int,
        largest: bool = True) -> Fit:
    """The usage at `batch`, and (with `largest`) the largest batch that fits `capacity`: memory
    grows linearly with the batch, its slope read off a second compile at twice (or, when `batch`
    does not fit, half) the batch. Without `largest`, `Fit.largest` is 0."""
    u = usage_at(batch)
    if not largest:
        return Fit(batch, u, 0)
    other = 2 * batch if u is not None else batch // 2
    v = usage_at(other) if other >= 1 else None
    if u is None and v is None:
        return Fit(batch, None, 0)
    if u is None or v is None:           # one side fits, the other does not
        return Fit(batch, u, *((batch, other) if u is not None else (other, batch)))
    slope = (v.peak - u.peak) / (other - batch)
    fixed = u.peak - slope * batch
    largest = int((capacity - fixed) // slope) if slope > 0 else batch
    return Fit(batch, u, max(largest, 0))


def train_usage(config: ml_collections.ConfigDict, planner: Planner, per_chip: int
                ) -> Usage | None:
    """The training step's usage at `per_chip` examples per chip."""
    step, args = train_step(config, planner.devices, per_chip)
    return planner.usage(f"training step at per-chip batch {per_chip}", step.lower(*args))


def counted_in_full(config: ml_collections.ConfigDict, devices: list[Any], fit: Fit) -> Fit:
    """`fit` with its FLOPs counted in full where XLA counts a loop once (the VAE in
    micro-batches: `setup.train_step_flops`)."""
    if fit.usage is None:
        return fit
    _, args = train_step(config, devices, fit.batch)
    flops = setup.train_step_flops(config, len(devices), fit.usage.flops, *args)
    return dataclasses.replace(fit, usage=dataclasses.replace(fit.usage, flops=flops or 0.0))


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plan(config: ml_collections.ConfigDict, name: str, s: tpu.TpuSlice, boost: bool = True,
         largest: bool = True, cache: str | None = None, say: Callable[[str], None] = _say
         ) -> bool:
    """Prints the plan of `config` (called `name`) on slice `s`; True when its training step
    fits the chips' HBM at the config's batch."""
    config = planned_config(config)
    setup.validate(config)
    sharding.check_devices(config, s.chips)
    planner = Planner(s, cache, say)
    capacity = tpu.usable_hbm(s, planner.devices[0])
    per_chip = config.batch_size // s.chips
    mesh = dict(zip((a for a, _ in config.mesh), sharding.mesh_shape(config.mesh, s.chips)))
    print(f"{name} on {s.name}: {s.chips} chips ({s.topology}), {capacity / GiB:.2f} GiB of HBM "
          f"per chip for programs; mesh {mesh}, batch {config.batch_size} ({per_chip} per chip), "
          f"{config.high_res_size}² px, dtype {config.dtype}", flush=True)
    train = counted_in_full(config, planner.devices, fit(
        lambda b: train_usage(config, planner, b), per_chip, capacity, largest))
    print(f"training step: {train.line(capacity)}", flush=True)
    if boost:
        up = fit(lambda b: planner.usage(f"boost of {b} image(s) per chip",
                                         lower_boost(config, planner.devices, b)), 1, capacity,
                 largest)
        print(f"boost ({config.sampling.solver}, {config.low_res_size}² -> "
              f"{config.high_res_size}² px): {up.line(capacity, 'images', flops=False)}",
              flush=True)
    fits = train.usage is not None and train.usage.peak <= capacity
    peak = (f"peak {train.usage.peak / GiB:.2f} GiB of" if train.usage is not None else
            "peak more than")
    print(f"plan: {name} on {s.name}: {peak} {capacity / GiB:.2f} GiB per chip at per-chip "
          f"batch {per_chip}, {'fits' if fits else 'does not fit'}", flush=True)
    return fits


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with user_errors_in_one_line():
        s = tpu.tpu_slice(_TOPOLOGY.value)
        config = config_from_flag(_CONFIG)
        name = os.path.relpath(config_flags.get_config_filename(flags.FLAGS["config"]))
        return 0 if plan(config, name, s, _BOOST.value, _LARGEST.value,
                         cache_dir(_CACHE.value)) else 1


def run() -> None:
    """Console script `fmboost-plan`."""
    run_app(main)


if __name__ == "__main__":
    run()
