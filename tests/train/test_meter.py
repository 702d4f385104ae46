"""Tests of fmboost_jax/train/meter.py: throughput, ETA, FLOPs and device peaks."""

import jax
import jax.numpy as jnp
import pytest

from fmboost_jax.train.meter import Meter, flops_of, peak_tflops


def test_the_meter_reports_rates_eta_and_fraction_of_peak(monkeypatch):
    clock = iter([100.0, 102.0, 102.0])                    # 4 steps in 2 s
    monkeypatch.setattr("fmboost_jax.train.meter.time.perf_counter", lambda: next(clock))
    meter = Meter(batch_size=8, num_devices=2, total_steps=20, step_flops=5e12, peak=100.0)
    for _ in range(4):
        meter.tick()
    m = meter.read(step=10)
    assert m["steps_per_sec"] == pytest.approx(2.0) and m["images_per_sec"] == pytest.approx(16)
    assert m["images_per_sec_per_device"] == pytest.approx(8) and m["examples_seen"] == 80
    assert m["eta_seconds"] == pytest.approx(5.0)          # 10 steps left at 2 steps/s
    assert m["tflops_per_device"] == pytest.approx(10.0)
    assert m["fraction_of_peak"] == pytest.approx(0.1)
    line = meter.line(10, {**m, "loss": 0.5})
    assert line.startswith("step 10/20 loss 0.50000 | 16.0 img/s (8.00 per device)")
    assert "(10.0% of peak)" in line and line.endswith("ETA 00:00:05")


def test_peaks_are_known_for_accelerators_and_not_for_cpus():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert peak_tflops("TPU v4", "float32") == pytest.approx(137.5)
    assert peak_tflops("cpu", "float32") is None


def test_flops_come_from_xlas_cost_analysis():
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.zeros((8, 16)), jnp.zeros((16, 4))).compile()
    assert flops_of(compiled) == pytest.approx(2 * 8 * 16 * 4, rel=0.1)
