"""Tests of fmboost_jax/train/metric_writer.py: JSON lines and TensorBoard events."""

import json
import os

import numpy as np

from fmboost_jax.train.metric_writer import MetricWriter


def test_metrics_are_appended_as_json_lines_and_tensorboard_events(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(1, {"loss": np.float32(0.5), "lr": 1e-4})
    writer.write(2, {"loss": 0.25})
    writer.write_image(2, "grid", np.zeros((4, 4, 3), np.uint8))
    writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-4}, {"step": 2, "loss": 0.25}]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
