"""FLOPs and peak figures for throughput reports (training log and benchmarks)."""

from __future__ import annotations

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
