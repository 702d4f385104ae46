"""Metric logging: one JSON object per line in `workdir/metrics.jsonl` plus TensorBoard
event files (tensorboardX, no TensorFlow needed). Only process 0 writes. `workdir` may be a
local path or a bucket (`gs://...`, through etils.epath)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath


class MetricWriter:
    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.active:
            path = epath.Path(workdir)
            path.mkdir(parents=True, exist_ok=True)
            self._jsonl = (path / "metrics.jsonl").open("a")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends `{"step": step, **metrics}` as a JSON line and as TensorBoard scalars."""
        if not self.active:
            return
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, global_step=int(step))

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image to TensorBoard."""
        if self.active:
            self._tb.add_image(name, image, global_step=int(step), dataformats="HWC")

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()
