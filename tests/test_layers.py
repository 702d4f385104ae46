"""The package's layers and style, checked by the test command itself: `lint-imports` keeps the
layer contract of pyproject.toml (no import from a lower layer to a higher one, `inference` and
`train` apart), and ruff keeps the style."""

import os
import shutil
import subprocess
import sys

from support import ROOT


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_import_layers_of_pyproject_are_kept():
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or "lint-imports"
    out = _run(lint, "--no-cache")
    assert out.returncode == 0 and "1 kept, 0 broken" in out.stdout, out.stdout[-4000:]


def test_config_imports_nothing_of_the_package_but_errors():
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "fmboost_jax", "config.py")).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("fmboost_jax")} == {"fmboost_jax.errors"}


def test_ruff_finds_nothing():
    out = _run(sys.executable, "-m", "ruff", "check", ".")
    assert out.returncode == 0, out.stdout[-4000:]
