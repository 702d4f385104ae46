"""Metric logging: one JSON object per line in `workdir/metrics.jsonl` plus TensorBoard
event files (tensorboardX, no TensorFlow needed) and, when `config.wandb.project` is set, a
Weights & Biases run (`wandb_logging.py`). Only process 0 writes. `workdir` may be a local path
or a bucket (`gs://...`): a bucket has no append, so there `metrics.jsonl` is read at the start
and rewritten whole (one upload) at each write; a resumed run keeps the rows before it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from fmboost_jax import paths
from fmboost_jax.train import wandb_logging

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Writes to `workdir`; `config` (the run's) adds W&B when its `wandb.project` is set."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict | None = None):
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._rows: list[str] | None = None    # on a bucket: the whole file, rewritten per write
        self._tb = None
        self._wandb = None
        if self.active:
            paths.makedirs(workdir)
            if wandb_logging.enabled(config):      # first: its errors leave no file open
                self._wandb = wandb_logging.WandbLogger(config, workdir)
            self._path = paths.join(workdir, METRICS_FILE)
            if paths.is_remote(workdir):
                old = paths.read_text(self._path) if paths.exists(self._path) else ""
                self._rows = old.splitlines(keepends=True)
            else:
                self._jsonl = open(self._path, "a")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends `{"step": step, **metrics}` as a JSON line, TensorBoard and W&B scalars."""
        if not self.active:
            return
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in metrics.items()})
        if self._rows is None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        else:
            self._rows.append(json.dumps(row) + "\n")
            paths.write_text(self._path, "".join(self._rows))
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
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.close()
