"""launch/tpu_pod.sh: the runtime image per accelerator type (--dry-run), and a whole pod session
against a stub `gcloud` on PATH that records its calls and runs the worker commands on this
machine, each worker in its own home folder: setup's install lines make a fresh venv (uv, Python
>= 3.11) and install the package there; train's pre-flight refuses a run that cannot start
(nothing is started) and passes one that can, which then trains in the background; logs and
watch read the workers' status."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest
from support import ROOT

SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.sh")

STUB = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
homes = sorted(os.path.join(os.environ["STUB_WORKERS"], d) for d in os.listdir(os.environ["STUB_WORKERS"]))
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
if args[:2] == ["storage", "ls"]:
    sys.exit(0 if os.path.exists(args[2]) else 1)
verb = args[3]
if verb == "describe":
    print("READY")
elif verb == "scp":
    for home in homes:
        shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
elif verb == "ssh":
    chosen = homes if opts["worker"] == "all" else [homes[int(opts["worker"])]]
    codes = [subprocess.run(["bash", "-c", opts["command"]], cwd=home,
                            env=dict(os.environ, HOME=home)).returncode for home in chosen]
    sys.exit(max(codes))
"""


def pod(*args: str, env: dict | None = None, dry_run: bool = False, timeout: float = 600):
    cmd = ["bash", SCRIPT, *(["--dry-run"] if dry_run else []), *args]
    base = dict(os.environ, TPU_NAME="fmboost", ZONE="us-central2-b")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=base | (env or {}))


@pytest.mark.parametrize("accelerator, image", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_the_runtime_image_follows_the_accelerator_type(accelerator, image):
    proc = pod("create", env={"ACCELERATOR": accelerator, "SPOT": "1"}, dry_run=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "fmboost",
        f"--accelerator-type={accelerator}", f"--version={image}", "--spot",
        "--zone=us-central2-b"]


def test_an_unknown_accelerator_type_is_one_line_and_status_2():
    proc = pod("create", env={"ACCELERATOR": "v9-8"}, dry_run=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ACCELERATOR=v9-8 is not an accelerator type") \
        and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_pod_session_installs_checks_trains_and_watches_with_a_stub_gcloud(tmp_path):
    bin_dir, workers, log = tmp_path / "bin", tmp_path / "workers", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    (workers / "w0").mkdir(parents=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(STUB.format(python=sys.executable))
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_GCLOUD_LOG": str(log),
           "STUB_WORKERS": str(workers), "ACCELERATOR": "v5litepod-4",
           "PYTHON_VERSION": f"{sys.version_info.major}.{sys.version_info.minor}",
           "JAX_SPEC": "jax",        # jax[tpu]'s libtpu would look for a TPU on this machine
           "UV_CACHE_DIR": str(tmp_path / "uv-cache"), "DISTRIBUTED": "off", "WATCH_SECONDS": "2"}
    home = workers / "w0"

    proc = pod("setup", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    venv_python = home / "fmboost_venv" / "bin" / "python"
    version = subprocess.run([venv_python, "-c", "import sys, fmboost_jax; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout
    assert eval(version) >= (3, 11)                               # the venv, not the image's Python
    assert (home / "fmboost_jax" / "configs" / "demo.py").exists()

    # A run that cannot start is refused by the pre-flight on worker 0; nothing is started.
    calls = len(log.read_text().splitlines())
    proc = pod("train", "lhq", "gs://no-bucket/runs/lhq", env=env)
    assert proc.returncode == 2
    assert "error: config.first_stage.checkpoint" in proc.stderr
    assert "the run was not started" in proc.stderr
    new = [json.loads(line) for line in log.read_text().splitlines()[calls:]]
    assert len(new) == 1 and "--worker=0" in new[0]                     # the pre-flight alone
    assert any(a.startswith("--command=") and "--preflight_devices=4" in a for a in new[0])

    # One that can: the pre-flight passes, then every worker trains in the background.
    workdir, config = tmp_path / "run", ["tests/tiny_config.py:flat", "--config.total_steps=2",
                                         "--config.eval_every=2", "--config.checkpoint_every=2"]
    proc = pod("train", config[0], str(workdir), *config[1:], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pre-flight: config, VAE, data and evaluation reachable; mesh {'data': 4" in proc.stdout
    proc = pod("watch", config[0], str(workdir), *config[1:], env=env)   # until eval.json is written
    assert proc.returncode == 0 and "done:" in proc.stdout, proc.stderr[-3000:]
    deadline = time.time() + 120               # eval.json comes just before the process ends
    while not (home / "train.status").exists():
        assert time.time() < deadline, "the background run wrote no status"
        time.sleep(0.5)
    assert (home / "train.status").read_text().strip() == "0"
    assert json.loads((workdir / "eval.json").read_text())["step"] == 2
    proc = pod("logs", env=env)
    assert "status 0" in proc.stdout and "eval step 2" in proc.stdout

    # watch stops on a refusal (status 2) and gives up after MAX_RESTARTS restarts.
    (workdir / "eval.json").unlink()
    (home / "train.status").write_text("2\n")
    proc = pod("watch", *config[:1], str(workdir), env=env)
    assert proc.returncode == 2 and "not restarting" in proc.stderr
    (home / "train.status").write_text("1\n")
    proc = pod("watch", *config[:1], str(workdir), env=env | {"MAX_RESTARTS": "0"}, timeout=120)
    assert proc.returncode == 1 and "giving up" in proc.stderr
