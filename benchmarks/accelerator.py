"""The released setup's costs on one accelerator (H100/H200, or a TPU host), in < 8 minutes.

    python benchmarks/accelerator.py              # on the accelerator
    python benchmarks/accelerator.py --smoke      # the same code paths on a CPU, tiny sizes (< 60 s)
    python benchmarks/accelerator.py --parts train,torch --train-batches 8,16,32

Random weights throughout (the costs do not depend on the values). The released config
(`base_config()`: 512² -> 1024² px, the SD VAE, 64² -> 128² latents, the 306M-parameter UNet), in
bfloat16; each part runs in a process of its own, so that its peak memory is its own:

  train   the UNet's training step (forward, backward, Adam; the state donated) at the training
          latent size (128²), batch 8 and 32: median ms, img/s and MFU (XLA's FLOPs of the compiled
          step / step time / the chip's bfloat16 peak, `train.meter.peak_tflops`);
  step    the whole training step as `train` runs it (`train.setup.jit_train_step`: the SD VAE
          encodes the 1024² images and their PSU, noising, the UNet's forward and backward, Adam,
          EMA) on uint8 images, batch 2 and 8: what the UNet-only `train` figure leaves out;
  torch   the PyTorch reference network (`tests/torch_unet_oracle.py`) on the same GPU, bfloat16
          autocast, the same batches, and the ratio fmboost_jax / PyTorch (skipped, in one line,
          without torch or CUDA);
  sample  the flow's ODE solve, 40 Euler NFE at 128² latents, batch 16, per image (the paper: 0.62
          s/img for SD1.5 + CFM 256² -> 1024² with 40 Euler NFE);
  vae     the SD VAE's decode of one 1024² image (128² latents);
  boost   the whole 1024² boost of one 512² image (`Upsampler`: PSU encode, 40 Euler, decode).

Peak memory: `memory_stats()["peak_bytes_in_use"]` of the part's process (the max RSS on CPUs);
the train and torch parts run their batch sizes in increasing order in one process, so each peak
is that batch's (JAX cannot reset the peak; torch's is reset). `program` is XLA's own figure for
the compiled program (arguments + temporaries + outputs - donated). The UNet's attention uses
`jax.nn.dot_product_attention` with cuDNN's fused kernel on GPUs (`--attention`; einsum elsewhere),
falling back to einsum with one line if cuDNN cannot compile it. Random params are made on the
host (no init program to compile); the steps and the VAE go through the persistent compilation
cache (`fmboost_jax.compile_cache`), so a rerun skips their compiles (the sampler's programs hold
host callbacks and are compiled anew; see `compile_time.py`). `--budget` (480 s) stops a part
still running then and skips the rest; an out-of-memory batch size is reported and the larger
ones skipped. MFU of the ODE solve: NFE x XLA's count of its loop body (one Euler step). `--smoke`
runs every part in this one process (`--one-process`), PyTorch on the CPU in float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import machine  # noqa: E402  (benchmarks/ is on sys.path: this file's folder)
from arguments import joined, names, numbers  # noqa: E402
from bench_unet_step import (  # noqa: E402
    make_batch,
    make_ode_sample,
    make_unet_step,
    peak_memory_mb,
    time_calls,
    torch_unet_calls,
)

PARTS = ("train", "step", "torch", "sample", "vae", "boost")
RESULT, MACHINE = "RESULT ", "MACHINE "


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes and iteration counts of a run."""
    unet: dict[str, Any]                # changes to the released UNet
    latent: int                         # side of the high-res latent (the UNet's input)
    train_batches: tuple[int, ...]
    step_batches: tuple[int, ...]       # of the whole training step (images)
    sample_batch: int
    boost_batch: int
    nfe: int                            # Euler steps of the sample and the boost
    vae: str                            # config.first_stage.name
    steps: int                          # timed calls of a training step
    warmup: int


FULL = Setup(unet={}, latent=128, train_batches=(8, 32), step_batches=(2, 8), sample_batch=16,
             boost_batch=1, nfe=40, vae="sd_vae", steps=10, warmup=2)
SMOKE = Setup(unet=dict(model_channels=32, num_res_blocks=1, channel_mult=(1,),
                        attention_resolutions=(1,), dim_head=8, num_heads=2),
              latent=8, train_batches=(1, 2), step_batches=(1,), sample_batch=2, boost_batch=1, nfe=2,
              vae="tiny_vae", steps=1, warmup=1)


# ------------------------------------------------------------------------ set-up
def setup_of(args: argparse.Namespace) -> Setup:
    """The smoke or the full setup with the command line's changes."""
    s = SMOKE if args.smoke else FULL
    changes: dict[str, Any] = {}
    for field in ("train_batches", "step_batches"):
        if getattr(args, field):
            changes[field] = getattr(args, field)
    for field in ("latent", "nfe", "steps", "sample_batch", "boost_batch"):
        if getattr(args, field):
            changes[field] = getattr(args, field)
    return dataclasses.replace(s, **changes)


def make_config(s: Setup, dtype: str) -> Any:
    """The released config at `s`'s sizes: random VAE weights, Euler with `s.nfe` steps."""
    from fmboost_jax import first_stage
    from fmboost_jax.config import base_config
    c = base_config()
    c.first_stage.update(name=s.vae, checkpoint="random", dtype=dtype)
    c.high_res_size = s.latent * first_stage.downsample_factor(c)
    c.low_res_size = c.high_res_size // 2
    c.dtype = dtype
    c.unet.update(**s.unet, attention=ATTENTION["unet"])
    c.sampling.update(solver="euler", num_steps=s.nfe)
    return c


def attention_for(choice: str, platform_name: str, dtype: str) -> str:
    """`--attention auto`: cuDNN's fused attention on GPUs in bfloat16, einsum elsewhere."""
    if choice != "auto":
        return choice
    return "cudnn" if platform_name in ("gpu", "cuda") and dtype == "bfloat16" else "einsum"


def random_params(init: Callable[..., Any], *init_args: Any) -> Any:
    """Random params shaped as `init(*init_args)` returns them, made on the host (no init program
    to compile): N(0, 1/fan_in) matrices and kernels, ones for vectors."""
    import jax
    rng = np.random.default_rng(0)

    def leaf(shape: Any) -> np.ndarray:
        if len(shape.shape) < 2:
            return np.ones(shape.shape, shape.dtype)
        fan_in = int(np.prod(shape.shape[:-1]))
        return (rng.standard_normal(shape.shape, np.float32) / np.sqrt(fan_in)).astype(shape.dtype)

    return jax.device_put(jax.tree.map(leaf, jax.eval_shape(init, *init_args)))


# The UNet's attention implementation for this process's parts (`--attention`, set by
# `start_jax`): a field of every config the parts build; einsum after cuDNN has failed once.
ATTENTION = {"unet": "einsum"}


class CudnnFailed(Exception):
    """cuDNN attention failed to compile or run: the part is measured again with einsum."""


def _drop_cudnn(err: Exception, what: str) -> None:
    """Re-raises `err` unless cuDNN attention was in use; then switches to einsum, says so in
    one line and raises CudnnFailed."""
    if ATTENTION["unet"] != "cudnn":
        raise err
    ATTENTION["unet"] = "einsum"
    print(f"cuDNN attention failed {what} ({type(err).__name__}: "
          f"{' '.join(str(err).split())[:200]}); using einsum attention")
    raise CudnnFailed from err


def compile_with_fallback(lower: Callable[[], Any]) -> tuple[Any, float]:
    """`lower().compile()` and its seconds; CudnnFailed (the part is measured again with einsum
    attention) when cuDNN attention does not compile."""
    t0 = time.perf_counter()
    try:
        return lower().compile(), time.perf_counter() - t0
    except Exception as err:           # cuDNN rejects a shape or is missing
        _drop_cudnn(err, "to compile")


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocator's out-of-memory error (XLA's or torch's)."""
    text = f"{type(err).__name__} {err}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "outofmemory" in text


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def program_mib(compiled: Any) -> float | None:
    """XLA's memory of a compiled program: arguments + temporaries + outputs - aliased."""
    try:
        m = compiled.memory_analysis()
        return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                - m.alias_size_in_bytes) / 2**20
    except Exception:                  # best effort, backend dependent
        return None


def figure(part: str, label: str, times_ms: list[float], images: int, **extra: Any) -> dict:
    """One measured figure: the median call, per image, images/s, and `extra` fields."""
    med = statistics.median(times_ms)
    return dict(part=part, label=label, ms=med, per_image_ms=med / images,
                img_s=images / med * 1e3, **extra)


def mfu_fields(flops: float | None, ms: float, peak: float | None) -> dict[str, float | None]:
    """TFLOP/s and the fraction of the chip's peak for `flops` per call of `ms`."""
    tflops = flops / (ms * 1e-3) / 1e12 if flops else None
    return dict(flops=flops, tflops=tflops, peak_tflops=peak,
                mfu=tflops / peak if tflops and peak else None)


# ------------------------------------------------------------------------ the parts
def time_train_step(step_fn: Any, state: Any, batch: dict, s: Setup
                    ) -> tuple[Any, Any, float, list[float]]:
    """Compiles `step_fn` (state donated) for `batch` and times `s.steps` calls; returns the
    updated state, the compiled step, its compile seconds and the times in ms."""
    compiled, compile_s = compile_with_fallback(lambda: step_fn.lower(state, batch))
    box = [state]

    def run() -> None:
        box[0], loss = compiled(box[0], batch)
        loss.block_until_ready()

    times = time_calls(run, s.steps, s.warmup)
    return box[0], compiled, compile_s, times


def part_train(s: Setup, dtype: str) -> list[dict]:
    """The UNet's training step at each batch size, the smallest first."""
    import jax
    import optax

    from fmboost_jax.models.unet import EfficientUNet
    from fmboost_jax.train.meter import flops_of, peak_tflops
    cfg = make_config(s, dtype).unet.to_dict()
    model = EfficientUNet.from_config(cfg, jax.numpy.dtype(dtype))
    tx = optax.adam(1e-4)
    device = jax.devices()[0]
    small = make_batch(jax.random.PRNGKey(1), 1, s.latent, jax.numpy.float32)
    params = random_params(model.init, jax.random.PRNGKey(0), small["x_t"], small["t"],
                           small["context"])
    state = (params, tx.init(params))
    step_fn = jax.jit(make_unet_step(model, tx), donate_argnums=0)
    out = []
    for b in sorted(s.train_batches):
        batch = make_batch(jax.random.PRNGKey(1), b, s.latent, jax.numpy.float32)
        try:
            state, compiled, compile_s, times = time_train_step(step_fn, state, batch, s)
        except Exception as err:
            if not out_of_memory(err):
                raise
            print(f"train step, batch {b}: out of memory ({first_line(err)}); larger batches skipped")
            break
        fig = figure("train", f"train step, batch {b}, {s.latent}² latents", times, b,
                     batch=b, compile_s=compile_s, peak_mib=peak_memory_mb(device),
                     program_mib=program_mib(compiled))
        fig.update(mfu_fields(flops_of(compiled), fig["ms"], peak_tflops(device.device_kind, dtype)))
        out.append(fig)
        print(line(fig), flush=True)
    return out


def part_step(s: Setup, dtype: str) -> list[dict]:
    """The whole training step (VAE encoding, PSU, UNet, Adam, EMA) at each batch size."""
    import jax

    from fmboost_jax.cfm.model import CFM
    from fmboost_jax.data import pipeline
    from fmboost_jax.parallel import sharding
    from fmboost_jax.train import setup
    from fmboost_jax.train.meter import flops_of, peak_tflops
    from fmboost_jax.train.state import create_train_state, make_optimizer
    c = make_config(s, dtype)
    device = jax.devices()[0]
    mesh = sharding.make_mesh(c.mesh, [device])
    cfm, tx = CFM.from_config(c), make_optimizer(c.optim)
    params = random_params(cfm.init_params, jax.random.PRNGKey(0))
    fs_params = random_params(cfm.first_stage.init_params, jax.random.PRNGKey(1))
    state = create_train_state(params, tx, jax.random.PRNGKey(2))
    jitted = setup.jit_train_step(cfm, tx, c, mesh, sharding.state_shardings(state, mesh, 0))
    step_fn = StepWithVae(jitted, fs_params)
    rng, out = np.random.default_rng(0), []
    for b in sorted(s.step_batches):
        (shape, dtype_of), = pipeline.batch_spec(c, b).values()
        batch = jax.device_put({"image": rng.integers(0, 256, shape).astype(dtype_of)},
                               sharding.batch_sharding(mesh))      # on the device, as in training
        try:
            state, compiled, compile_s, times = time_train_step(step_fn, state, batch, s)
        except Exception as err:
            if not out_of_memory(err):
                raise
            print(f"training step, batch {b}: out of memory ({first_line(err)}); larger "
                  "batches skipped")
            break
        px = c.high_res_size
        fig = figure("step", f"training step, batch {b}, {px}² px images", times, b, batch=b,
                     compile_s=compile_s, peak_mib=peak_memory_mb(device),
                     program_mib=program_mib(compiled.compiled))
        fig.update(mfu_fields(flops_of(compiled.compiled), fig["ms"],
                              peak_tflops(device.device_kind, dtype)))
        out.append(fig)
        print(line(fig), flush=True)
    return out


@dataclasses.dataclass
class StepWithVae:
    """`step(state, fs_params, batch)` as `time_train_step` calls it: (state, batch) ->
    (state, loss), lowered and compiled with the VAE's params bound."""
    step: Any
    fs_params: Any
    compiled: Any = None

    def lower(self, state: Any, batch: dict) -> StepWithVae:
        return dataclasses.replace(self, compiled=self.step.lower(state, self.fs_params, batch))

    def compile(self) -> StepWithVae:
        return dataclasses.replace(self, compiled=self.compiled.compile())

    def __call__(self, state: Any, batch: dict) -> tuple[Any, Any]:
        state, metrics = self.compiled(state, self.fs_params, batch)
        return state, metrics["loss"]


def part_torch(s: Setup, dtype: str, smoke: bool) -> list[dict]:
    """The PyTorch reference's training step at each batch size (CUDA; the CPU in a smoke run)."""
    try:
        import torch
    except ImportError as err:
        print(f"torch: skipped ({err})")
        return []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not smoke:
        print("torch: skipped (no CUDA device)")
        return []
    import jax
    cfg = make_config(s, dtype).unet.to_dict()
    autocast = dtype if dtype != "float32" and device == "cuda" else None   # slow on CPUs
    if device == "cpu":
        torch.set_num_threads(1)       # a smoke run: threads beside JAX's only contend
    out = []
    for b in sorted(s.train_batches):
        batch = jax.device_get(make_batch(jax.random.PRNGKey(1), b, s.latent, jax.numpy.float32))
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step, _ = torch_unet_calls(cfg, batch, device, autocast)
            times = time_calls(step, s.steps, s.warmup)
        except Exception as err:
            if not out_of_memory(err):
                raise
            print(f"PyTorch step, batch {b}: out of memory ({first_line(err)}); larger batches "
                  "skipped")
            break
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                else peak_memory_mb(jax.devices("cpu")[0]))
        how = f"{autocast} autocast" if autocast else "float32"
        fig = figure("torch", f"PyTorch step, batch {b}, {how} ({device})", times, b, batch=b, peak_mib=peak,
                     torch=torch.__version__, device=torch.cuda.get_device_name()
                     if device == "cuda" else "cpu")
        out.append(fig)
        print(line(fig), flush=True)
        del step
    return out


def part_sample(s: Setup, dtype: str) -> list[dict]:
    """The flow's ODE solve: `s.nfe` Euler steps of the UNet at the high-res latent size."""
    import jax

    from fmboost_jax.models.unet import EfficientUNet
    from fmboost_jax.train.meter import flops_of, peak_tflops
    model = EfficientUNet.from_config(make_config(s, dtype).unet.to_dict(), jax.numpy.dtype(dtype))
    batch = make_batch(jax.random.PRNGKey(1), s.sample_batch, s.latent, jax.numpy.float32)
    x0, ctx = batch["x_t"], batch["context"]
    params = random_params(model.init, jax.random.PRNGKey(0), x0[:1], batch["t"][:1], ctx[:1])
    sample = jax.jit(make_ode_sample(model, "euler", s.nfe))
    compiled, compile_s = compile_with_fallback(lambda: sample.lower(params, x0, ctx))
    nfe = int(compiled(params, x0, ctx).stats["nfe"])
    times = time_calls(lambda: compiled(params, x0, ctx).x1.block_until_ready(), 3 if s.steps > 1
                       else 1, 1)
    device = jax.devices()[0]
    fig = figure("sample", f"sample: {nfe} Euler NFE, batch {s.sample_batch}, {s.latent}² latents",
                 times, s.sample_batch, batch=s.sample_batch, nfe=nfe, compile_s=compile_s,
                 peak_mib=peak_memory_mb(device), program_mib=program_mib(compiled))
    # XLA counts the loop body (one Euler step) once: the solve is about NFE of it.
    body = flops_of(compiled)
    fig.update(mfu_fields(body and nfe * body, fig["ms"], peak_tflops(device.device_kind, dtype)))
    print(line(fig), flush=True)
    return [fig]


def part_vae(s: Setup, dtype: str) -> list[dict]:
    """The first stage's decode of one image from high-res latents."""
    import jax

    from fmboost_jax.first_stage import first_stage_from_config
    from fmboost_jax.train.meter import flops_of, peak_tflops
    fs = first_stage_from_config(make_config(s, dtype))
    params = random_params(fs.init_params, jax.random.PRNGKey(0))
    z = jax.random.normal(jax.random.PRNGKey(1), (1, s.latent, s.latent, fs.latent_channels))
    compiled, compile_s = compile_with_fallback(lambda: jax.jit(fs.decode).lower(params, z))
    times = time_calls(lambda: compiled(params, z).block_until_ready(), 5 if s.steps > 1 else 1, 1)
    device = jax.devices()[0]
    px = s.latent * fs.downsample_factor
    fig = figure("vae", f"VAE decode, one {px}² image ({s.latent}² latents)", times, 1, batch=1,
                 compile_s=compile_s, peak_mib=peak_memory_mb(device),
                 program_mib=program_mib(compiled))
    fig.update(mfu_fields(flops_of(compiled), fig["ms"], peak_tflops(device.device_kind, dtype)))
    print(line(fig), flush=True)
    return [fig]


def part_boost(s: Setup, dtype: str) -> list[dict]:
    """The whole boost of `s.boost_batch` low-res images through an `Upsampler`."""
    import jax

    from fmboost_jax.cfm.model import CFM
    from fmboost_jax.inference.upsampler import Upsampler
    c = make_config(s, dtype)
    cfm = CFM.from_config(c)
    params = random_params(cfm.init_params, jax.random.PRNGKey(0))
    fs_params = random_params(cfm.first_stage.init_params, jax.random.PRNGKey(1))
    up = Upsampler(cfm, params, fs_params, c)
    lowres = np.random.default_rng(0).uniform(-1, 1, (s.boost_batch, c.low_res_size,
                                                       c.low_res_size, 3)).astype(np.float32)
    call = lambda: jax.block_until_ready(up(lowres, solver="euler", num_steps=s.nfe).images)
    t0 = time.perf_counter()
    try:
        call()
    except Exception as err:
        _drop_cudnn(err, "in the boost")
    first_s = time.perf_counter() - t0
    times = time_calls(call, 3 if s.steps > 1 else 1, 1)
    fig = figure("boost", f"boost {c.low_res_size}² -> {c.high_res_size}² px, {s.nfe} Euler "
                 f"NFE, batch {s.boost_batch}", times, s.boost_batch, batch=s.boost_batch,
                 compile_s=first_s, peak_mib=peak_memory_mb(jax.devices()[0]))
    print(line(fig), flush=True)
    return [fig]


# ------------------------------------------------------------------------ output
def gflop_text(gflop: float) -> str:
    """GFLOP with three significant digits below 100 (the smoke sizes), whole ones above."""
    return f"{gflop:.0f}" if gflop >= 100 else f"{gflop:.3g}"


def line(fig: dict) -> str:
    """One figure in one line."""
    text = (f"{fig['label']}: {fig['ms']:.1f} ms per call, {fig['per_image_ms']:.1f} ms/img, "
            f"{fig['img_s']:.2f} img/s")
    if fig.get("tflops"):
        per_image = fig["flops"] / fig.get("batch", 1) / 1e9
        text += f", {gflop_text(per_image)} GFLOP/img, {fig['tflops']:.1f} TFLOP/s"
        if fig.get("mfu"):
            text += f" = {100 * fig['mfu']:.1f}% MFU"
    if fig.get("peak_mib") is not None:
        text += f", peak {fig['peak_mib']:.0f} MiB"
    if fig.get("program_mib") is not None:
        text += f" (program {fig['program_mib']:.0f} MiB)"
    if fig.get("compile_s") is not None:
        text += f", compile {fig['compile_s']:.1f} s"
    return text


def ratio_lines(figs: list[dict]) -> list[str]:
    """fmboost_jax / PyTorch per training batch size, and the PyTorch step's MFU at JAX's FLOPs."""
    ours = {f["batch"]: f for f in figs if f["part"] == "train"}
    out = []
    for f in figs:
        if f["part"] == "torch" and f["batch"] in ours:
            j = ours[f["batch"]]
            r = j["ms"] / f["ms"]
            speed = f"{1 / r:.2f}x faster" if r < 1 else f"{r:.2f}x slower"
            f.update(mfu_fields(j.get("flops"), f["ms"], j.get("peak_tflops")))
            out.append(f"ratio fmboost_jax / PyTorch, batch {f['batch']}: {j['ms']:.1f} / "
                       f"{f['ms']:.1f} ms = {r:.3f} (fmboost_jax {speed})")
    return out


def table(figs: list[dict]) -> list[str]:
    """The compact summary: one row per figure."""
    head = f"{'part':7s} {'batch':>5s} {'ms/call':>9s} {'ms/img':>9s} {'img/s':>8s} " \
           f"{'MFU':>6s} {'peak MiB':>9s}  what"
    rows = [head, "-" * len(head)]
    for f in figs:
        mfu = f"{100 * f['mfu']:.1f}%" if f.get("mfu") else "-"
        peak = f"{f['peak_mib']:.0f}" if f.get("peak_mib") is not None else "-"
        rows.append(f"{f['part']:7s} {f.get('batch', 1):5d} {f['ms']:9.1f} "
                    f"{f['per_image_ms']:9.1f} {f['img_s']:8.2f} {mfu:>6s} {peak:>9s}  "
                    f"{f['label']}")
    return rows


# ------------------------------------------------------------------------ processes
def start_jax(args: argparse.Namespace) -> dict[str, Any]:
    """The compilation cache and the UNet's attention set up; the machine, as a dict."""
    from fmboost_jax import compile_cache
    compile_cache.enable()
    import jax

    ATTENTION["unet"] = attention_for(args.attention, jax.devices()[0].platform, args.dtype)
    return {**machine.info(), "attention": ATTENTION["unet"]}


def measure(args: argparse.Namespace, part: str) -> list[dict]:
    """Runs one part in this process; its figures."""
    s = setup_of(args)
    if part == "torch":
        return part_torch(s, args.dtype, args.smoke)
    run = {"train": part_train, "step": part_step, "sample": part_sample, "vae": part_vae,
           "boost": part_boost}[part]
    try:
        return run(s, args.dtype)
    except CudnnFailed:                    # once: ATTENTION is einsum now
        return run(s, args.dtype)


def run_part(args: argparse.Namespace) -> None:
    """This process is one part: its machine line, human lines and RESULT lines on stdout."""
    if args.part != "torch":
        print(MACHINE + json.dumps(start_jax(args)), flush=True)
    else:                                  # JAX runs on the host only: the GPU as torch sees it
        print(MACHINE + json.dumps({**machine.torch_info(), "attention": "(PyTorch part)"}),
              flush=True)
    for fig in measure(args, args.part):
        print(RESULT + json.dumps(fig), flush=True)


def run_in_process(args: argparse.Namespace, parts: list[str]) -> list[dict]:
    """Every part in this process (peaks are then the process's so far)."""
    print(machine_line(start_jax(args)), flush=True)
    figs = []
    for part in parts:
        t0 = time.perf_counter()
        figs += measure(args, part)
        print(f"[{part}: {time.perf_counter() - t0:.0f} s]", flush=True)
    return figs


def machine_line(m: dict[str, Any]) -> str:
    """The machine (`benchmarks/machine.py`) and the UNet's attention."""
    return machine.line(m, f"UNet attention: {m['attention']}")


def child_argv(args: argparse.Namespace, part: str) -> list[str]:
    """This script's command line for one part."""
    argv = [sys.executable, __file__, f"--part={part}", f"--dtype={args.dtype}",
            f"--attention={args.attention}"]
    for field in ("train_batches", "step_batches", "latent", "nfe", "steps", "sample_batch", "boost_batch"):
        value = getattr(args, field)
        if value:
            value = joined(value) if isinstance(value, tuple) else value
            argv.append(f"--{field.replace('_', '-')}={value}")
    return argv + (["--smoke"] if args.smoke else [])


def spawn(args: argparse.Namespace, part: str, printed_machine: bool, timeout: float
          ) -> tuple[list[dict], bool]:
    """Runs one part in a fresh process (stopped after `timeout` s), relays its lines, returns
    its figures."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")   # JAX's pool: 90% (default 75%)
    if part == "torch":                # its inputs on the host: JAX must not take the GPU's memory
        env["JAX_PLATFORMS"] = "cpu"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(child_argv(args, part), env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        proc = subprocess.CompletedProcess(err.cmd, 0, out, "")
        print(f"{part}: stopped at the time budget, after {timeout:.0f} s (--budget)")
    figs = []
    for row in proc.stdout.splitlines():
        if row.startswith(MACHINE):
            if not printed_machine:
                print(machine_line(json.loads(row[len(MACHINE):])), flush=True)
                printed_machine = True
        elif row.startswith(RESULT):
            figs.append(json.loads(row[len(RESULT):]))
        else:
            print(row, flush=True)
    if proc.returncode:
        print(f"{part}: failed (status {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
    print(f"[{part}: {time.perf_counter() - t0:.0f} s]", flush=True)
    return figs, printed_machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (tests)")
    ap.add_argument("--parts", type=names(PARTS), default=joined(PARTS),
                    help=f"comma-separated, some of {joined(PARTS)}")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--attention", choices=("auto", "einsum", "xla", "cudnn"), default="auto",
                    help="the UNet's softmax attention (auto: cudnn on GPUs in bfloat16)")
    ap.add_argument("--train-batches", type=numbers(int), default=(),
                    help="comma-separated (default 8,32)")
    ap.add_argument("--step-batches", type=numbers(int), default=(),
                    help="of the whole training step, comma-separated (default 2,8)")
    ap.add_argument("--latent", type=int, default=0, help="high-res latent side (default 128)")
    ap.add_argument("--nfe", type=int, default=0, help="Euler steps (default 40)")
    ap.add_argument("--steps", type=int, default=0, help="timed training steps (default 10)")
    ap.add_argument("--sample-batch", type=int, default=0, help="default 16")
    ap.add_argument("--boost-batch", type=int, default=0, help="default 1")
    ap.add_argument("--budget", type=float, default=480.0,
                    help="seconds for the whole run: a part still running then is stopped and "
                         "the parts after it skipped (default 480)")
    ap.add_argument("--one-process", action=argparse.BooleanOptionalAction, default=None,
                    help="every part in this process (default with --smoke; otherwise a process "
                         "per part, so that each peak memory is the part's own)")
    ap.add_argument("--part", choices=PARTS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        return run_part(args)
    parts = args.parts
    start = time.perf_counter()
    print(f"accelerator benchmark ({'smoke' if args.smoke else 'released config'}, random "
          f"weights, {args.dtype}): {setup_of(args)}", flush=True)
    if args.smoke if args.one_process is None else args.one_process:
        figs = run_in_process(args, parts)
    else:
        figs, printed = [], False
        for part in parts:
            left = args.budget - (time.perf_counter() - start)
            if left < 20:
                print(f"{part}: skipped (the {args.budget:.0f} s budget is spent)")
                continue
            new, printed = spawn(args, part, printed, left)
            figs += new
    for row in ratio_lines(figs) + [""] + table(figs):
        print(row)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
