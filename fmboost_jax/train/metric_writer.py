"""Metric logging: one JSON object per line in `workdir/metrics.jsonl` plus TensorBoard
event files (tensorboardX, no TensorFlow needed) and, when `config.wandb.project` is set, a
Weights & Biases run (`wandb_logging.py`). Only process 0 writes. `workdir` may be a local path
or a bucket (`gs://...`). A bucket has no append: there `metrics.jsonl` is read at the start and
uploaded whole at each write (a resumed run keeps the rows before it), and the TensorBoard event
files are written to a local folder and uploaded whole (a new file per start) at most every
`UPLOAD_SECONDS`, after each image (evaluations) and at the end."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from fmboost_jax import paths
from fmboost_jax.train import wandb_logging

METRICS_FILE = "metrics.jsonl"
UPLOAD_SECONDS = 60.0           # on a bucket: the longest the uploaded TensorBoard events lag


def summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports PyTorch when
    it is installed (1.5 s per start on a CPU) only to accept its tensors, and we log numbers."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None            # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Writes to `workdir`; `config` (the run's) adds W&B when its `wandb.project` is set."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict | None = None):
        self.active = jax.process_index() == 0
        self.remote = paths.is_remote(workdir)
        self._jsonl = self._tb = self._wandb = None
        self._rows: list[str] = []             # on a bucket: the whole file, uploaded whole
        self._uploaded = time.monotonic()
        if not self.active:
            return
        paths.makedirs(workdir)
        if wandb_logging.enabled(config):      # first: its errors leave no file open
            self._wandb = wandb_logging.WandbLogger(config, workdir)
        self._path = paths.join(workdir, METRICS_FILE)
        self._tb_dir = paths.join(workdir, "tensorboard")
        if self.remote:
            if paths.exists(self._path):
                self._rows = paths.read_text(self._path).splitlines(keepends=True)
            self._tb_local = tempfile.mkdtemp(prefix="fmboost-tensorboard-")
        else:
            self._jsonl = open(self._path, "a")
            self._tb_local = self._tb_dir
        self._tb = summary_writer_class()(self._tb_local)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends `{"step": step, **metrics}` as a JSON line, TensorBoard and W&B scalars."""
        if not self.active:
            return
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in metrics.items()})
        if self.remote:
            self._rows.append(json.dumps(row) + "\n")
        else:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(step, {k: v for k, v in row.items() if k != "step"})
        self._upload(events=time.monotonic() - self._uploaded >= UPLOAD_SECONDS)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image to TensorBoard (and W&B)."""
        if self.active:
            self._tb.add_image(name, image, global_step=int(step), dataformats="HWC")
            if self._wandb is not None:
                self._wandb.image(step, name, image)
            self._upload()

    def _upload(self, events: bool = True) -> None:
        """On a bucket: `metrics.jsonl` and (with `events`) the event files, uploaded whole."""
        if not self.remote:
            return
        paths.write_text(self._path, "".join(self._rows))
        if not events:
            return
        self._uploaded = time.monotonic()
        self._tb.flush()
        for name in os.listdir(self._tb_local):
            paths.upload(os.path.join(self._tb_local, name), paths.join(self._tb_dir, name))

    def close(self) -> None:
        if self.active:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()
            self._upload()
            if self.remote:
                shutil.rmtree(self._tb_local, ignore_errors=True)
            if self._wandb is not None:
                self._wandb.close()
