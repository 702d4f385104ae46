"""Throughput for the training log and the benchmarks: FLOPs, device peaks, a meter with ETA."""

from __future__ import annotations

import time
from typing import Any

# Dense peak TFLOP/s per chip (bf16, fp32) by device_kind substring; fp32 is the non-tensor-core
# figure on GPUs (TF32 tensor cores are higher). Used only to print the fraction of peak.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H100": (989.0, 67.0),
    "H200": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "TPU v4": (275.0, 275.0 / 2),
    "TPU v5 lite": (197.0, 197.0 / 2),
    "TPU v5e": (197.0, 197.0 / 2),
    "TPU v5p": (459.0, 459.0 / 2),
    "TPU v5": (459.0, 459.0 / 2),
    "TPU v6 lite": (918.0, 918.0 / 2),
    "TPU v6e": (918.0, 918.0 / 2),
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Peak dense TFLOP/s of one device for the compute dtype, or None if unknown (e.g. CPUs)."""
    for key, (bf16, fp32) in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def flops_of(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled (per-device, when partitioned) XLA program, if known.
    XLA counts a loop body once."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:  # cost analysis is best effort and backend dependent
        return None


class Meter:
    """Throughput and ETA between log steps: `tick()` every step, `read(step)` at a log step,
    `reset_clock()` after work that must not count (evaluation)."""

    def __init__(self, batch_size: int, num_devices: int, total_steps: int,
                 step_flops: float | None, peak: float | None):
        self.batch_size, self.num_devices, self.total = batch_size, num_devices, total_steps
        self.step_flops, self.peak = step_flops, peak
        self.reset_clock()

    def reset_clock(self) -> None:
        self._start, self._steps = time.perf_counter(), 0

    def tick(self) -> None:
        self._steps += 1

    def read(self, step: int) -> dict[str, float]:
        """Rates since the last read, examples seen, ETA; restarts the clock."""
        sps = self._steps / max(time.perf_counter() - self._start, 1e-9)
        self.reset_clock()
        m = {"steps_per_sec": sps, "images_per_sec": sps * self.batch_size,
             "images_per_sec_per_device": sps * self.batch_size / self.num_devices,
             "examples_seen": step * self.batch_size,
             "eta_seconds": (self.total - step) / max(sps, 1e-9)}
        if self.step_flops:
            m["tflops_per_device"] = self.step_flops * sps / 1e12
            if self.peak:
                m["fraction_of_peak"] = m["tflops_per_device"] / self.peak
        return m

    def line(self, step: int, m: dict[str, float]) -> str:
        """One log line: step, loss, throughput, TFLOP/s (and fraction of peak), ETA."""
        flops = ""
        if "tflops_per_device" in m:
            flops = f"{m['tflops_per_device']:.3g} TFLOP/s per device"
            if "fraction_of_peak" in m:
                flops += f" ({100 * m['fraction_of_peak']:.1f}% of peak)"
            flops += " | "
        eta = time.strftime("%H:%M:%S", time.gmtime(m["eta_seconds"]))
        return (f"step {step}/{self.total} loss {float(m['loss']):.5f} | "
                f"{m['images_per_sec']:.1f} img/s ({m['images_per_sec_per_device']:.2f} per "
                f"device) | {flops}ETA {eta}")
