"""Optional Weights & Biases logging (`config.wandb`), beside `metrics.jsonl` and TensorBoard.

Off unless `config.wandb.project` is set; the `wandb` package is optional and imported only then.
Process 0 opens one W&B run per workdir: its id is kept in `workdir/wandb_id.txt`, so a run
resumed after a preemption continues the same W&B run (write another run's id there to continue
that one). Run files go to `workdir/wandb/` (offline runs too: upload them with `wandb sync`);
for a workdir on a bucket, to `$WANDB_DIR/wandb/` or `./wandb/`.
"""

from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from fmboost_jax import paths
from fmboost_jax.errors import ConfigError, check_one_of

MODES = ("online", "offline", "disabled")   # wandb.init(mode=...)
ID_FILE = "wandb_id.txt"
MAX_TAG_LENGTH = 64                          # W&B's limit


def enabled(config: ml_collections.ConfigDict | None) -> bool:
    """Whether `config` asks for W&B logging (`config.wandb.project` set)."""
    wandb_config = None if config is None else config.get("wandb")
    return bool(wandb_config is not None and wandb_config.get("project"))


def check_config(config: Any) -> None:
    """The rules of `config.wandb` (pure: whether wandb is installed is `check_installed`)."""
    if config.get("wandb") is None:
        return
    check_one_of(config, "wandb.mode", MODES)
    for field in ("project", "entity", "name"):
        if not isinstance(config.wandb[field], str):
            raise ConfigError(f"wandb.{field}", f"must be a string, got {config.wandb[field]!r}")
    tags = config.wandb.tags
    if isinstance(tags, str) or not all(
            isinstance(t, str) and 0 < len(t) <= MAX_TAG_LENGTH for t in tags):
        raise ConfigError("wandb.tags", f"must be a tuple of strings of 1 to {MAX_TAG_LENGTH} "
                          f"characters, got {tags!r}")


def missing_package_error() -> ConfigError:
    """The one-line error of a config that asks for W&B where wandb is not installed."""
    return ConfigError("wandb.project", "is set but the wandb package is not installed: "
                       "`pip install wandb`, or set config.wandb.project=\"\" to train without W&B")


def check_installed(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError when `config` asks for W&B and wandb cannot be imported; never imports
    it (every process checks, before any work is done)."""
    if not enabled(config):
        return
    try:
        found = importlib.util.find_spec("wandb") is not None
    except ValueError:       # a module object without a spec stands in for it: it is there
        found = True
    if not found:
        raise missing_package_error()


def run_id(workdir: str) -> str:
    """The W&B run id of `workdir`: read from `workdir/wandb_id.txt`, or made and written there
    (atomically: a temporary file renamed onto it)."""
    path = epath.Path(workdir) / ID_FILE
    if path.exists():
        text = path.read_text().strip()
        if text:
            return text
    new = secrets.token_hex(8)   # 16 of [0-9a-f]: a valid W&B id
    tmp = path.parent / f".{ID_FILE}.{new}.tmp"
    tmp.write_text(new + "\n")
    tmp.replace(path)
    return new


def _basename(workdir: str) -> str:
    return workdir.rstrip("/").rsplit("/", 1)[-1] or workdir


class WandbLogger:
    """The W&B run of `workdir` for `config` (created on process 0 only, by MetricWriter)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        try:
            import wandb
        except ImportError:
            raise missing_package_error() from None
        self._wandb = wandb
        c = config.wandb
        try:
            self.run = wandb.init(
                project=c.project, entity=c.entity or None, name=c.name or _basename(workdir),
                mode=c.mode, dir=None if paths.is_remote(workdir) else workdir,
                config=config.to_dict(), tags=list(c.tags) or None, resume="allow",
                id=run_id(workdir))
        except wandb.errors.Error as err:     # no login, no network, a bad entity
            raise ConfigError("wandb", f"wandb.init failed: {' '.join(str(err).split())} "
                              "(`wandb login`, or config.wandb.mode=\"offline\")") from None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars at `step` (W&B drops steps below those it has: a resumed run's repeats)."""
        self.run.log(dict(metrics), step=int(step))

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image at `step`."""
        self.run.log({name: self._wandb.Image(image)}, step=int(step))

    def close(self) -> None:
        self.run.finish()
