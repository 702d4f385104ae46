"""notebooks/boost.ipynb runs top to bottom (nbclient), with tiny parameters: it trains a tiny
config in the kernel, boosts held-out photos, sweeps two solvers and draws the path."""

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient
from support import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "boost.ipynb")


def with_parameters(nb: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """`nb` with a cell setting `values` after its `parameters` cell (papermill's convention)."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", ()))
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    """All text the cells printed, and the number of images they displayed."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", ()):
            text.append(out.get("text", ""))
            images += "image/png" in out.get("data", {})
    return "".join(text), images


@pytest.mark.slow
def test_notebook_runs_with_tiny_parameters(tmp_path, monkeypatch):
    with open(NOTEBOOK) as f:
        nb = nbformat.read(f, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    # The tests' tiny pixel config (6 steps; its programs are in the compilation cache).
    nb = with_parameters(nb, DEMO_CONFIG="tests/tiny_config.py:flat",
                         DEMO_WORKDIR=str(tmp_path / "demo"), HELD_OUT=("camera", "coins"),
                         CROP=32, NUM_STEPS=(1,), PATH_STATES=1, LATENT_SIZE=4)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, "tests", ".jax_cache"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}})
    client.execute()                                  # a failing cell raises CellExecutionError
    text, images = outputs(nb)
    assert "(2, 8, 8, 3) -> (2, 32, 32, 3)" in text
    for solver, nfe in (("euler", 1), ("heun", 2)):
        assert f"{solver:>8}   1 steps: NFE {nfe:3d}" in text
    assert images == 3                                 # photos, the NFE plot, the path
    # The jitted sample function: compile and run timed apart; a latent model's from_latents.
    assert re.search(r"sample\(2, 8, 8, 3\) -> \(2, 32, 32, 3\): compile [0-9.]+ s, run [0-9.]+ ms", text)
    assert "latents (1, 4, 4, 4) -> (1, 8, 8, 4) -> images (1, 64, 64, 3)" in text
    assert os.path.isdir(tmp_path / "demo" / "checkpoints")


def test_the_set_up_cell_finds_tpu_runtimes_and_keeps_a_fitting_jax(monkeypatch):
    """The set-up cell's checks, run on their own (fmboost_jax is installed, so it installs
    nothing): TPU runtimes by their variables or devices, and the runtime's JAX kept when it
    satisfies the requirements."""
    with open(NOTEBOOK) as f:
        nb = nbformat.read(f, as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "def on_tpu" in c.source)
    namespace = {}
    exec(compile(cell, "setup-cell", "exec"), namespace)
    on_tpu, jax_fits = namespace["on_tpu"], namespace["jax_fits"]
    for name in ("COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "TPU_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(namespace["glob"], "glob", lambda pattern: [])
    assert not on_tpu()                                              # this machine: no TPU
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")            # v2-8 (TPU node)
    assert on_tpu()
    monkeypatch.delenv("COLAB_TPU_ADDR")
    monkeypatch.setattr(namespace["glob"], "glob", lambda p: ["/dev/vfio/0"] if "vfio" in p else [])
    assert on_tpu()                                                  # v5e / v6e TPU VM
    assert jax_fits()                                                # the installed JAX fits
    monkeypatch.setattr(namespace["importlib"].metadata, "version", lambda name: "0.4.35")
    assert not jax_fits()                                            # too old: replaced

