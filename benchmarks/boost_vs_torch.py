"""One whole boost in fmboost_jax and in the reference's PyTorch pipeline, same weights, part by part.

    python benchmarks/boost_vs_torch.py                        # 256² -> 512² and 512² -> 1024² px
    python benchmarks/boost_vs_torch.py --sizes 1024 --nfe 1,4 --repeats 5
    python benchmarks/boost_vs_torch.py --smoke                # tiny networks, seconds (the tests)
    python benchmarks/boost_vs_torch.py --config demo --sizes 128,256,512 --nfe 4

`--config demo` is the pixel-space demo UNet (configs/demo.py, 4x, random weights): no first
stage, so its PSU is bilinear up-sampling and it has no decode; the UNet is what is timed.

The released network (configs/lhq.py, float32): the SD VAE and the 306M-parameter UNet, with
random weights (the cost does not depend on their values; the UNet's zero-initialised layers are
filled so that the flow moves). PyTorch side: diffusers' `AutoencoderKL` for the PSU encode
(bilinear up-sampling in pixels, encode, posterior mean x scale) and the decode, the reference
`EfficientUNet` (`tests/torch_unet_oracle.py`) integrated by `torchdiffeq.odeint` with Euler
steps. fmboost_jax side: `Upsampler`, and its parts jitted alone. Both sides get the same
weights, the same photo and the same source noise (noising step 400).

Each side runs in its own warm process (the first repetition, which compiles or reads the programs
back from `fmboost_jax.compile_cache`, is not counted); the parent asks them in turn, A B A B ...,
for one repetition: the PSU encode, one network evaluation, the decode and the whole boost at each
`--nfe`. Prints per part the medians and the median and spread of the per-repetition ratios, the
largest difference between the two boosts' images, the machine, and last
`boost: fmboost_jax / PyTorch = X (spread a–b)` (the whole boost at the largest size and NFE).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from arguments import joined, numbers
from machine import describe

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
SIDES = ("fmboost_jax", "PyTorch")


def load(name: str, smoke: bool) -> Any:
    """The benchmarked config in float32: `lhq` (the released one, random VAE weights), `demo`
    (pixels, no VAE) or with `smoke` their tiny forms."""
    from fmboost_jax.config import load_config
    c = load_config(name + (":smoke" if smoke else ""))
    c.dtype = "float32"
    if not pixels(c):
        c.first_stage.dtype = "float32"
        c.first_stage.update(checkpoint="random", micro_batch=0)
    return c


def pixels(c: Any) -> bool:
    """Whether the config's flow runs on pixels (no VAE to encode or decode)."""
    return c.first_stage.name == "identity"


def upscale(c: Any) -> int:
    """Output pixels per input pixel along a side."""
    return c.high_res_size // c.low_res_size


def timed(times: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    times[name] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------- the weights, made once
def prepare(folder: Path, name: str, smoke: bool, sizes: tuple[int, ...], seed: int = 0) -> None:
    """Writes the weights of both sides, the low-res photo of each size and its source noise."""
    import flax.serialization
    import jax
    import torch
    from bench_unet_step import torch_state_dict_from_jax
    from skimage import data, transform
    from vae_oracle import torch_vae

    from fmboost_jax.cfm.model import CFM
    from fmboost_jax.convert import vae_params_from_torch
    from fmboost_jax.first_stage import autoencoder_config
    c = load(name, smoke)
    cfm = CFM.from_config(c)
    params = fill_zeros(cfm.init_params(jax.random.PRNGKey(seed)), seed)
    fs_params = {}
    if not pixels(c):
        vc = autoencoder_config(c)
        vae = torch_vae(tuple(vc.ch * m for m in vc.ch_mult), vc.z_channels,
                        layers=vc.num_res_blocks, seed=seed)
        torch.save(vae.state_dict(), folder / "vae.pt")
        fs_params = vae_params_from_torch(vae.state_dict(), cfm.first_stage.model)
    side = cfm.unet.downsampling
    np.savez(folder / "unet.npz", **torch_state_dict_from_jax(
        {"params": params}, cfm.unet, (1, side, side, cfm.unet.in_channels)))
    (folder / "params.msgpack").write_bytes(flax.serialization.msgpack_serialize(
        jax.device_get({"unet": params, "vae": fs_params})))
    for size in sizes:
        low = size // upscale(c)
        photo = transform.resize(data.astronaut(), (low, low), anti_aliasing=True)
        np.save(folder / f"lowres_{size}.npy", (photo[None] * 2 - 1).astype(np.float32))
        np.save(folder / f"noise_{size}.npy", source_noise(cfm, size, seed))


def fill_zeros(params: Any, seed: int) -> Any:
    """The UNet's all-zero leaves (its zero-initialised output layers, the biases) drawn from
    N(0, 0.02²), so that a random network's velocity is not zero (drawn by NumPy on the host:
    one jitted draw per leaf shape would compile dozens of programs)."""
    import jax
    rng = np.random.default_rng(seed + 1)
    fill = lambda p: (0.02 * rng.standard_normal(p.shape)).astype(p.dtype) if not p.any() else p
    return jax.tree.map(fill, jax.device_get(params))


def source_noise(cfm: Any, size: int, seed: int) -> np.ndarray:
    """The noise the Upsampler adds to the PSU latent with PRNGKey(seed) at output `size`: the
    draw of `sampling.integrate` -> `CFM.couple` -> `Coupling.__call__`, NCHW."""
    import jax
    h, w = cfm.latent_size((size, size))
    couple_rng = jax.random.split(jax.random.PRNGKey(seed))[0]
    noise_rng = jax.random.split(jax.random.split(couple_rng, 3)[2])[0]
    noise = jax.random.normal(noise_rng, (1, h, w, cfm.first_stage.latent_channels))
    return np.moveaxis(np.asarray(noise), -1, 1)


# ---------------------------------------------------------------- the two sides
def jax_side(folder: Path, name: str, smoke: bool, nfes: tuple[int, ...]
             ) -> Callable[[int], tuple]:
    """fmboost_jax: `rep(size) -> (seconds per part, images NCHW)`."""
    import flax.serialization
    import jax

    from fmboost_jax.cfm import upsampling
    from fmboost_jax.cfm.model import CFM
    from fmboost_jax.inference.upsampler import Upsampler
    c = load(name, smoke)
    cfm = CFM.from_config(c)
    weights = flax.serialization.msgpack_restore((folder / "params.msgpack").read_bytes())
    up = Upsampler(cfm, weights["unet"], weights["vae"], c)
    velocity, decode = jax.jit(cfm.velocity), jax.jit(cfm.first_stage.decode)

    def encode(fs_params, x):
        size = cfm.latent_size((x.shape[1] * cfm.upscale, x.shape[2] * cfm.upscale))
        return upsampling.psu(upsampling.LowRes(images=x), size, cfm.first_stage, fs_params)
    encode = jax.jit(encode)

    def rep(size: int) -> tuple[dict[str, float], np.ndarray]:
        x = jax.device_put(np.load(folder / f"lowres_{size}.npy"))
        ready, t = jax.block_until_ready, np.zeros((1,), np.float32)
        times: dict[str, float] = {}
        z = timed(times, "encode", lambda: ready(encode(up.fs_params, x)))
        timed(times, "one NFE", lambda: ready(velocity(up.params, z, t, z)))
        if not pixels(c):
            timed(times, "decode", lambda: ready(decode(up.fs_params, z)))
        for n in nfes:
            out = timed(times, f"boost, {n} NFE", lambda n=n: ready(
                up(x, jax.random.PRNGKey(0), solver="euler", num_steps=n).images))
        return times, np.moveaxis(np.asarray(out), -1, 1)
    return rep


def torch_side(folder: Path, name: str, smoke: bool, nfes: tuple[int, ...]
               ) -> Callable[[int], tuple]:
    """The reference's pipeline in PyTorch: `rep(size) -> (seconds per part, images NCHW)`."""
    import torch
    import torch.nn.functional as F
    import torchdiffeq
    from bench_unet_step import reference_args
    from torch_unet_oracle import EfficientUNet as TorchUNet
    from vae_oracle import torch_vae

    from fmboost_jax.cfm.noising import alpha_bar_at
    from fmboost_jax.first_stage import autoencoder_config
    c = load(name, smoke)
    if pixels(c):
        vae, scale = None, 1.0
    else:
        vc = autoencoder_config(c)
        vae = torch_vae(tuple(vc.ch * m for m in vc.ch_mult), vc.z_channels,
                        layers=vc.num_res_blocks)
        vae.load_state_dict(torch.load(folder / "vae.pt"))
        scale = vc.scale_factor
    net = TorchUNet(**reference_args(c.unet.to_dict())).eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(folder / "unet.npz").items()})
    a = alpha_bar_at(c.coupling.noising_step) if c.coupling.noising_step > 0 else 1.0
    torch.set_num_threads(os.cpu_count() or 1)

    def encode(x: torch.Tensor) -> torch.Tensor:       # PSU: pixels up, encode, scale
        up = F.interpolate(x, scale_factor=upscale(c), mode="bilinear", align_corners=False)
        return up if vae is None else vae.encode(up).latent_dist.mean * scale

    def decode(z: torch.Tensor) -> torch.Tensor:
        return z if vae is None else vae.decode(z / scale).sample

    def boost(x: torch.Tensor, noise: torch.Tensor, n: int) -> torch.Tensor:
        z = encode(x)
        x0 = a ** 0.5 * z + (1 - a) ** 0.5 * noise
        v = lambda t, xt: net(xt, t.reshape(1).expand(xt.shape[0]), z)
        x1 = torchdiffeq.odeint(v, x0, torch.linspace(0, 1, n + 1), method="euler")[-1]
        return decode(x1)

    @torch.no_grad()
    def rep(size: int) -> tuple[dict[str, float], np.ndarray]:
        x = torch.from_numpy(np.moveaxis(np.load(folder / f"lowres_{size}.npy"), -1, 1).copy())
        noise = torch.from_numpy(np.load(folder / f"noise_{size}.npy"))
        times: dict[str, float] = {}
        z = timed(times, "encode", lambda: encode(x))
        timed(times, "one NFE", lambda: net(z, torch.zeros(1), z))
        if vae is not None:
            timed(times, "decode", lambda: decode(z))
        for n in nfes:
            out = timed(times, f"boost, {n} NFE", lambda n=n: boost(x, noise, n))
        return times, out.numpy()
    return rep


def serve(side: str, folder: Path, name: str, smoke: bool, nfes: tuple[int, ...]) -> None:
    """A side's process: for each size read from stdin, one repetition; its times as one
    `RESULT` line, its images in `folder`."""
    rep = (jax_side if side == SIDES[0] else torch_side)(folder, name, smoke, nfes)
    print("READY", flush=True)
    for line in sys.stdin:
        size = int(line)
        times, images = rep(size)
        np.save(folder / f"{side}_{size}.npy", images)
        print("RESULT " + json.dumps(times), flush=True)


# ---------------------------------------------------------------- the parent
class Side:
    """A side's warm process, asked for one repetition at a time."""

    def __init__(self, side: str, folder: Path, args: argparse.Namespace):
        argv = [sys.executable, __file__, "--serve", side, "--folder", str(folder),
                "--config", args.config, "--nfe", joined(args.nfe)] + (
                    ["--smoke"] if args.smoke else [])
        self.name = side
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self._read("READY")

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"{self.name}'s process ended (status {self.proc.wait()})")

    def rep(self, size: int) -> dict[str, float]:
        self.proc.stdin.write(f"{size}\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (spread {min(values):.2f}–{max(values):.2f})"


def compare(sides: list[Side], size: int, low: int, repeats: int, folder: Path) -> list[float]:
    """Warms both sides at `size`, then `repeats` interleaved repetitions; prints the table and
    the images' difference; returns the whole boost's ratios at the largest NFE."""
    for s in sides:                                   # compiles; not counted
        s.rep(size)
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in sides}
    for _ in range(repeats):
        for s in sides:
            runs[s.name].append(s.rep(size))
    ours, theirs = (runs[name] for name in SIDES)
    print(f"\n{low}² -> {size}² px, {repeats} interleaved repetitions (seconds):")
    print(f"{'part':<18} {SIDES[0]:>12} {SIDES[1]:>10}   ratio, median (spread)")
    for part in ours[0]:
        ratios = [a[part] / b[part] for a, b in zip(ours, theirs)]
        print(f"{part:<18} {statistics.median(r[part] for r in ours):>12.4g} "
              f"{statistics.median(r[part] for r in theirs):>10.4g}   {spread(ratios)}")
    per_px = {name: statistics.median(r[part] for r in runs[name]) / size ** 2 * 1e6
              for name in SIDES}
    print(f"per output pixel, {part}: " + ", ".join(f"{n} {v:.3g} µs" for n, v in per_px.items()))
    a, b = (np.load(folder / f"{name}_{size}.npy") for name in SIDES)
    print(f"images: {a.shape[2]}x{a.shape[3]}, largest difference {np.abs(a - b).max():.2e} "
          f"(mean {np.abs(a - b).mean():.2e}) on [-1, 1]")
    return [x[part] / y[part] for x, y in zip(ours, theirs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("lhq", "demo"), default="lhq",
                    help="the released latent network (lhq) or the pixel-space demo UNet")
    ap.add_argument("--sizes", type=numbers(int), default="512,1024",
                    help="output sizes in pixels, comma-separated (inputs: / the upscale)")
    ap.add_argument("--nfe", type=numbers(int), default="1", help="Euler steps of the whole boost")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per side")
    ap.add_argument("--smoke", action="store_true",
                    help="the config's :smoke form (tiny networks) at 64² px (seconds)")
    ap.add_argument("--serve", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from fmboost_jax import compile_cache
    compile_cache.enable()                  # a rerun reads the programs back
    if args.serve:
        return serve(args.serve, args.folder, args.config, args.smoke, args.nfe)
    sizes = (64,) if args.smoke else args.sizes
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, args.config, args.smoke, sizes)
        low = upscale(load(args.config, args.smoke))
        sides = [Side(name, folder, args) for name in SIDES]
        try:
            ratios = [compare(sides, size, size // low, args.repeats, folder)
                      for size in sizes][-1]
        finally:
            for s in sides:
                s.close()
    print(describe(False, f"torch threads {os.cpu_count()}"))
    print(f"boost: fmboost_jax / PyTorch = {statistics.median(ratios):.2f} "
          f"(spread {min(ratios):.2f}–{max(ratios):.2f})")


if __name__ == "__main__":
    main()
