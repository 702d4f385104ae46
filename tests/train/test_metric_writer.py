"""Tests of fmboost_jax/train/metric_writer.py: JSON lines, TensorBoard events and the optional
Weights & Biases run (fmboost_jax/train/wandb_logging.py), offline: no network, no home dir."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fmboost_jax import config as config_lib
from fmboost_jax.errors import ConfigError
from fmboost_jax.train import wandb_logging
from fmboost_jax.train.metric_writer import MetricWriter
from fmboost_jax.train.setup import validate


def test_metrics_are_appended_as_json_lines_and_tensorboard_events(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(1, {"loss": np.float32(0.5), "lr": 1e-4})
    writer.write(2, {"loss": 0.25})
    writer.write_image(2, "grid", np.zeros((4, 4, 3), np.uint8))
    writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-4}, {"step": 2, "loss": 0.25}]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


def test_the_tensorboard_writer_starts_without_importing_pytorch():
    """PyTorch (installed here) stays out of a training process, and importable after."""
    child = ("import sys; from fmboost_jax.train.metric_writer import summary_writer_class; "
             "summary_writer_class(); assert 'torch' not in sys.modules, 'torch imported'; "
             "import torch, tensorboardX; print(torch.__name__)")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "torch", proc.stderr[-2000:]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B kept offline, silent and out of the home directory."""
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        path = tmp_path / name.lower()
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    for name, value in (("WANDB_SILENT", "true"), ("WANDB_MODE", "offline"),
                        ("WANDB_CONSOLE", "off"), ("WANDB_DISABLE_GIT", "true")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    import wandb
    wandb.teardown()                             # stops W&B's service process


def _wandb_config(**fields):
    config = config_lib.base_config()
    config.wandb.update({"project": "fmboost-test", "mode": "offline", **fields})
    return config


def _history(run_dir: str) -> dict[int, dict]:
    """`{step: {key: value}}` of an offline run, read by W&B's own reader of its transaction log
    (`wandb leet inspect --json`, one JSON record a line). `--follow` reads on until the run's
    exit record, which W&B's service may still be writing when `finish` returns (for at most 15 s
    without a write)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", "--follow",
                           "--idle-timeout", "15s", run_dir], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert records and records[-1]["type"] == "exit", (proc.stderr[-2000:], records[-1:])
    rows = {}
    for record in records:
        if record["type"] == "history":
            row = record["history"]["item"]
            assert record["history"]["step"]["num"] == row["_step"]
            rows[row["_step"]] = row
    return rows


def test_offline_wandb_run_holds_the_metrics_and_resumes_under_the_same_id(tmp_path,
                                                                          offline_wandb):
    workdir = str(tmp_path / "run")
    writer = MetricWriter(workdir, _wandb_config(tags=("test",)))
    writer.write(1, {"loss": np.float32(0.5), "lr": 1e-4})
    writer.write_image(1, "eval/samples", np.zeros((4, 4, 3), np.uint8))
    writer.close()
    run_id = open(os.path.join(workdir, wandb_logging.ID_FILE)).read().strip()
    runs = glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}*"))
    assert len(runs) == 1
    rows = _history(runs[0])
    assert sorted(rows) == [1]
    row = rows[1]
    assert row["loss"] == 0.5 and row["lr"] == 1e-4
    assert row["eval/samples._type"] == "image-file"
    assert os.path.isfile(os.path.join(runs[0], "files", row["eval/samples.path"]))
    assert json.loads(open(os.path.join(workdir, "metrics.jsonl")).read())["loss"] == 0.5

    writer = MetricWriter(workdir, _wandb_config())      # the run resumed after a preemption
    writer.write(2, {"loss": 0.25})
    writer.close()
    assert open(os.path.join(workdir, wandb_logging.ID_FILE)).read().strip() == run_id
    runs = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
    assert len(runs) == 2 and all(f"-{run_id}" in os.path.basename(r) for r in runs)
    rows = _history(runs[1])
    assert sorted(rows) == [2] and rows[2]["loss"] == 0.25
    assert not [f for f in os.listdir(workdir) if f.endswith(".tmp")]


def test_missing_wandb_is_one_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)      # `import wandb` raises ImportError
    config = _wandb_config()
    validate(config)                          # the config itself is fine
    for attempt in (lambda: wandb_logging.check_installed(config),
                    lambda: MetricWriter(str(tmp_path), config)):
        with pytest.raises(ConfigError) as err:
            attempt()
        message = str(err.value)
        assert message.startswith("config.wandb.project:") and "pip install wandb" in message
        assert "\n" not in message
    assert not os.path.exists(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("field,value", [("mode", "online2"), ("tags", ("", "x")),
                                         ("tags", ("x" * 65,))])
def test_bad_wandb_fields_are_config_errors(field, value):
    config = _wandb_config(**{field: value})
    with pytest.raises(ConfigError, match=f"config.wandb.{field}"):
        validate(config)


def test_the_default_config_never_imports_wandb(tmp_path):
    code = """if True:
        import sys
        import numpy as np
        from fmboost_jax import config as config_lib
        from fmboost_jax.train import loop, setup, wandb_logging
        config = config_lib.base_config()
        setup.validate(config)
        wandb_logging.check_installed(config)
        writer = loop.MetricWriter(sys.argv[1], config)
        writer.write(1, {"loss": 0.5})
        writer.write_image(1, "grid", np.zeros((4, 4, 3), np.uint8))
        writer.close()
        assert not [m for m in sys.modules if m.split(".")[0] == "wandb"], "wandb imported"
        """
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "wandb") and not os.path.exists(tmp_path / "wandb_id.txt")
