"""Metric logging: one JSON object per line in `workdir/metrics.jsonl` plus TensorBoard
event files (tensorboardX, no TensorFlow needed) and, when `config.wandb.project` is set, a
Weights & Biases run (`wandb_logging.py`). Only process 0 writes. `workdir` may be a local path
or a bucket (`gs://...`, through etils.epath)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from fmboost_jax.train import wandb_logging


class MetricWriter:
    """Writes to `workdir`; `config` (the run's) adds W&B when its `wandb.project` is set."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict | None = None):
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if self.active:
            path = epath.Path(workdir)
            path.mkdir(parents=True, exist_ok=True)
            if wandb_logging.enabled(config):      # first: its errors leave no file open
                self._wandb = wandb_logging.WandbLogger(config, workdir)
            self._jsonl = (path / "metrics.jsonl").open("a")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends `{"step": step, **metrics}` as a JSON line, TensorBoard and W&B scalars."""
        if not self.active:
            return
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(step, {k: v for k, v in row.items() if k != "step"})

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image to TensorBoard (and W&B)."""
        if self.active:
            self._tb.add_image(name, image, global_step=int(step), dataformats="HWC")
            if self._wandb is not None:
                self._wandb.image(step, name, image)

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.close()
