"""The code blocks of README.md and docs/*.md, executed, so that the documentation cannot drift
from the code.

Every ```bash, ```sh and ```python block is a test (id: file::heading::index of the block in its
section). It runs on the CPU in a working directory of its page where `configs/` is the
repository's and `runs/demo` holds the demo trained by the README's Quick start (trained once per
test session, as its smoke variant: see SUBSTITUTIONS), after the blocks before it in the same
section, as a reader would run them; it must exit 0 within its time limit. Python blocks run in a
fresh interpreter (`sys.executable`), shell blocks in bash with `python` being that interpreter.

A block that cannot run here (real weights, an accelerator, a cluster, minutes of work) carries
`<!-- not run: REASON -->` right before it and is reported as skipped with REASON. Output blocks
(```text, or no language) are not code. Anything else fails: a block in another language, or a
shell block using more than `python -m fmboost_jax...`, the `fmboost-*` scripts, `pip install`
and plain shell. `pip install` is never run: its files and packages are checked against the
project's requirement files instead.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
from support import ROOT, made_once

PAGES = ["README.md",
         *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SHELL, PYTHON, OUTPUT = ("bash", "sh"), "python", ("", "text")
MARKER = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>.+?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+)(?P<info>[^`]*)$")

# The only changes made to a block before it runs: (the text, what runs instead, why). Each
# entry must be used by some block (test_every_code_block_runs_or_is_marked).
SUBSTITUTIONS = [
    ("--config=configs/demo.py --workdir=runs/demo", "--config=configs/demo.py:smoke --workdir=runs/demo",
     "the Quick start's demo trains 800 steps (minutes); its smoke variant runs the same code in 4"),
    ("pip install -e . && python -m fmboost_jax.train", "python -m fmboost_jax.train",
     "the test line installed the package already; installing it again while other tests import "
     "it would only cost time"),
    ("skimage.data.coins())", "skimage.data.coins()[:96, :128])",
     "boosting the whole photo costs about 15 s of 2 CPU cores (the middle block's global "
     "attention over 7,200 positions); a 96 x 128 corner runs the same command"),
]
# The block that trains `runs/demo` for every other block (once per session, shared by workers).
DEMO_BLOCK = "README.md::quick-start::1"
# Packages a `pip install` line may name beyond the requirement files: optional tools the docs
# mention (the notebook's).
OPTIONAL_PACKAGES = {"jupyter", "papermill"}
PLAIN_SHELL = {"cd", "ls", "mkdir", "cp", "mv", "rm", "cat", "echo", "export", "test", "touch", "head",
               "tail", "diff", "find", "du", "true"}
TIME_LIMIT = 120            # seconds per block
DEMO_TIME_LIMIT = 300       # the demo's training (compiles from an empty cache on a new machine)


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    heading: str
    index: int              # 1-based, among the fenced blocks of its section
    line: int               # of the opening fence
    lang: str
    code: str
    reason: str | None      # the `not run` marker's reason

    @property
    def id(self) -> str:
        return f"{self.page}::{slug(self.heading)}::{self.index}"

    @property
    def section(self) -> tuple[str, str]:
        return self.page, self.heading


def slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "top"


def read_blocks(page: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a page (output blocks included) and the problems of its markers."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, problems = [], []
    heading, counts, marker, i = "", {}, None, 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].strip().startswith(fence["fence"]) and not lines[j].strip("` ")), None)
            if end is None:
                problems.append(f"{page}:{i + 1}: a code fence that is never closed")
                break
            counts[heading] = counts.get(heading, 0) + 1
            lang = (fence["info"].split() or [""])[0].lower()
            code = "\n".join(lines[i + 1:end]) + "\n"
            blocks.append(Block(page, heading, counts[heading], i + 1, lang, code, marker))
            marker, i = None, end + 1
            continue
        if marker is not None and line.strip():
            problems.append(f"{page}:{i}: `not run` marker not followed by a code block")
            marker = None
        if MARKER.match(line):
            marker = MARKER.match(line)["reason"]
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
        i += 1
    if marker is not None:
        problems.append(f"{page}: `not run` marker at the end of the page")
    return blocks, problems


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for page in PAGES:
        b, p = read_blocks(page)
        blocks += b
        problems += p
    return blocks, problems


BLOCKS, MARKER_PROBLEMS = all_blocks()
CODE = [b for b in BLOCKS if b.lang not in OUTPUT]


# ------------------------------------------------------------------------ shell commands
def logical_lines(code: str) -> list[str]:
    """Shell lines with backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ;, |), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    lexer.whitespace_split = True
    out, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            out.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*out, current] if c]


def without_assignments(cmd: list[str]) -> list[str]:
    """The command without leading VAR=value assignments."""
    i = 0
    while i < len(cmd) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[i]):
        i += 1
    return cmd[i:]


def declared_packages() -> set[str]:
    """Package names of requirements.txt and requirements-test.txt."""
    names = set()
    for name in ("requirements.txt", "requirements-test.txt"):
        with open(os.path.join(ROOT, name)) as f:
            for line in f:
                line = line.split("#")[0].strip()
                if line and not line.startswith("-"):
                    names.add(normalized(line))
    return names


def normalized(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def pip_problems(cmd: list[str]) -> list[str]:
    """What is wrong with a `pip install ...` command: files that do not exist, packages the
    project does not declare."""
    problems, args, known = [], cmd[2:], declared_packages() | OPTIONAL_PACKAGES
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-e", "--editable", "-r", "--requirement"):
            target = args[i + 1] if i + 1 < len(args) else ""
            path = os.path.join(ROOT, target)
            wanted = os.path.join(path, "pyproject.toml") if arg in ("-e", "--editable") else path
            if not os.path.exists(wanted):
                problems.append(f"`pip install {arg} {target}`: {os.path.relpath(wanted, ROOT)} "
                                "does not exist")
            i += 2
            continue
        if not arg.startswith("-") and normalized(arg) not in known:
            problems.append(f"`pip install {arg}`: not in the requirement files (nor an optional tool "
                            "of OPTIONAL_PACKAGES)")
        i += 1
    return problems


def shell_problems(block: Block) -> list[str]:
    """Commands of a shell block that the docs test does not run (with a marker they are fine,
    except a wrong `pip install`)."""
    problems = []
    for line in logical_lines(block.code):
        for cmd in commands(line):
            cmd = without_assignments(cmd)
            if not cmd:
                continue
            if cmd[:2] == ["pip", "install"]:
                problems += pip_problems(cmd)
            elif block.reason is None and not (
                    cmd[0] in PLAIN_SHELL or cmd[0].startswith("fmboost-")
                    or (cmd[0] == "python" and len(cmd) > 2 and cmd[1] == "-m"
                        and cmd[2].split(".")[0] == "fmboost_jax")):
                problems.append(f"`{' '.join(cmd)[:80]}` is not `python -m fmboost_jax...`, `fmboost-*`, "
                                "`pip install` or plain shell: mark the block `<!-- not run: REASON -->`")
    return problems


def block_problems(block: Block) -> list[str]:
    where = f"{block.page}:{block.line} ({block.id})"
    if block.lang in SHELL:
        return [f"{where}: {p}" for p in shell_problems(block)]
    if block.lang != PYTHON and block.reason is None:
        return [f"{where}: a ```{block.lang} block is neither runnable (bash, sh, python) nor output "
                "(text, none) nor marked `<!-- not run: REASON -->`"]
    return []


def runnable_source(block: Block) -> str:
    """What runs: the block with SUBSTITUTIONS applied and `pip install` commands left out."""
    code = block.code
    for old, new, _ in SUBSTITUTIONS:
        code = code.replace(old, new)
    if block.lang in SHELL:
        kept = []
        for line in logical_lines(code):
            parts = [p for p in re.split(r"\s*&&\s*", line) if not p.lstrip().startswith("pip install")]
            if parts:
                kept.append(" && ".join(parts))
        code = "set -euo pipefail\n" + "\n".join(kept) + "\n"
    return code


# ------------------------------------------------------------------------ running
@dataclasses.dataclass
class Result:
    returncode: int | None      # None: killed at the time limit
    seconds: float
    output: str

    def check(self, block: Block, limit: float) -> None:
        assert self.returncode == 0, (
            f"{block.id} ({block.page}:{block.line}) "
            + (f"ran past its limit of {limit:.0f} s" if self.returncode is None
               else f"exited with status {self.returncode}")
            + f" after {self.seconds:.0f} s; it ran\n{runnable_source(block)}\n--- output ---\n"
            + self.output[-4000:])


def environment(shims: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([shims, os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    return env


def run_block(block: Block, cwd: str, scratch: str, limit: float) -> Result:
    """Runs a block in `cwd`; its script goes to `scratch` (outside the working directory)."""
    os.makedirs(scratch, exist_ok=True)
    shims = os.path.join(scratch, "bin")
    os.makedirs(shims, exist_ok=True)
    shim = os.path.join(shims, "python")        # a script, not a link: a venv's python finds
    if not os.path.exists(shim):                  # its environment from its own path
        with open(shim, "w") as f:
            f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        os.chmod(shim, 0o755)
    script = os.path.join(scratch, re.sub(r"[^A-Za-z0-9]+", "_", block.id)
                          + (".py" if block.lang == PYTHON else ".sh"))
    with open(script, "w") as f:
        f.write(runnable_source(block))
    cmd = [sys.executable, script] if block.lang == PYTHON else ["bash", script]
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=cwd, env=environment(shims), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=limit)
        return Result(out.returncode, time.perf_counter() - start, out.stdout)
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        return Result(None, time.perf_counter() - start, output)


def by_id(block_id: str) -> Block:
    return next(b for b in CODE if b.id == block_id)


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> tuple[str, Result]:
    """The README's Quick start run once (SUBSTITUTIONS: the smoke variant) in a directory that
    every pytest worker shares: (the directory, its result)."""
    def train(root: str) -> None:
        os.symlink(os.path.join(ROOT, "configs"), os.path.join(root, "configs"))
        result = run_block(by_id(DEMO_BLOCK), root, os.path.join(root, "scripts"),
                           DEMO_TIME_LIMIT)
        with open(os.path.join(root, "result.json"), "w") as f:
            json.dump(dataclasses.asdict(result), f)

    root = made_once(tmp_path_factory, "docs-demo", train)
    with open(os.path.join(root, "result.json")) as f:
        return root, Result(**json.load(f))


class Pages:
    """Working directories of the pages, and the results of the blocks run in this process."""

    def __init__(self, base: str, demo_root: str):
        self.base, self.demo_root, self.results = base, demo_root, {}

    def cwd(self, page: str) -> str:
        path = os.path.join(self.base, slug(page))
        if not os.path.isdir(path):
            os.makedirs(os.path.join(path, "runs"))
            os.symlink(os.path.join(ROOT, "configs"), os.path.join(path, "configs"))
            os.symlink(os.path.join(self.demo_root, "runs", "demo"), os.path.join(path, "runs", "demo"))
        return path

    def run(self, block: Block) -> Result:
        if block.id not in self.results:
            scratch = os.path.join(self.base, "scripts")
            self.results[block.id] = run_block(block, self.cwd(block.page), scratch, TIME_LIMIT)
        return self.results[block.id]


@pytest.fixture(scope="session")
def pages(demo, tmp_path_factory) -> Pages:
    root, result = demo
    result.check(by_id(DEMO_BLOCK), DEMO_TIME_LIMIT)
    return Pages(str(tmp_path_factory.mktemp("docs")), root)


# ------------------------------------------------------------------------ the tests
def test_every_code_block_runs_or_is_marked():
    problems = list(MARKER_PROBLEMS)
    for block in BLOCKS:
        if block.lang in OUTPUT and block.reason is not None:
            problems.append(f"{block.page}:{block.line}: an output block needs no `not run` marker")
        elif block.lang not in OUTPUT:
            problems += block_problems(block)
    for old, _, _ in SUBSTITUTIONS:
        if not any(old in b.code for b in CODE if b.reason is None):
            problems.append(f"SUBSTITUTIONS: no runnable block contains {old!r} any more")
    assert DEMO_BLOCK in {b.id for b in CODE if b.reason is None}, f"{DEMO_BLOCK} is gone"
    assert len({b.id for b in CODE}) == len(CODE), "two blocks with the same id"
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("block", CODE, ids=[b.id for b in CODE])
def test_block(block: Block, request):
    if block.reason is not None:
        problems = block_problems(block)             # a marked shell block's pip lines
        assert not problems, "\n".join(problems)
        pytest.skip(f"not run: {block.reason}")
    problems = block_problems(block)
    assert not problems, "\n".join(problems)
    if block.id == DEMO_BLOCK:
        _, result = request.getfixturevalue("demo")
        result.check(block, DEMO_TIME_LIMIT)
        root, _ = request.getfixturevalue("demo")
        assert os.path.exists(os.path.join(root, "runs", "demo", "eval.json")), "the demo wrote no eval.json"
        return
    pages = request.getfixturevalue("pages")
    for earlier in CODE:                             # the section's blocks before this one
        if earlier is block:
            break
        if earlier.section == block.section and earlier.reason is None and earlier.id != DEMO_BLOCK:
            pages.run(earlier).check(earlier, TIME_LIMIT)
    pages.run(block).check(block, TIME_LIMIT)
