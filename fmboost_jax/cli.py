"""The command-line layer: how every command reads its options and reports a user's mistake.

- `user_errors_in_one_line()`: a `ConfigError`, `UserError` or missing file (the user's input,
  never a bug) ends the command with `error: ...` on stderr and status 2; `FMBOOST_DEBUG=1` shows
  the traceback instead. Other exceptions are bugs and keep their traceback.
- `run_app(main)`: `absl.app.run` for the commands with an ml_collections `--config` flag
  (`train`, `precompute_latents`, `data.prepare`); `--config` takes a file or a name of
  `configs/` (`--config=lhq:smoke`), and a config whose own code fails is one line.
- The argument groups that several argparse commands share (`upsample`, `evaluate`, `app`):
  the model (`--model`, `--config`, `--step`, `--vae`, `--dtype`), the sampler (`--solver`,
  `--num_steps`, `--num_points`, `--guidance_scale`, `--seed`, `--sampling.FIELD=VALUE`) and the
  compile cache, each declared once here. Counts are checked while the options are parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections

from fmboost_jax import compile_cache
from fmboost_jax.config import DTYPE_NAMES, SDEOptions, SolverOptions
from fmboost_jax.errors import ConfigError, UserError

DEBUG_VARIABLE = "FMBOOST_DEBUG"   # set to 1: user errors raise with their traceback
USER_ERRORS = (ConfigError, UserError, FileNotFoundError)
SAMPLER_FLAGS = ("solver", "num_steps", "num_points", "guidance_scale")


def debug() -> bool:
    """Whether `FMBOOST_DEBUG` asks for tracebacks."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


@contextlib.contextmanager
def user_errors_in_one_line(*more: type[Exception]) -> Iterator[None]:
    """A user's mistake (`USER_ERRORS` and `more`) raised inside ends the command with one line
    on stderr and status 2 instead of a traceback (`FMBOOST_DEBUG=1` shows the traceback)."""
    try:
        yield
    except (*USER_ERRORS, *more) as err:
        if debug():
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------------ absl commands
def config_file(spec: str) -> str:
    """A `--config` value as a file: `lhq:smoke` -> `/.../configs/lhq.py:smoke`; a `.py` path is
    kept as it is."""
    name, colon, arg = spec.partition(":")
    if name.endswith(".py") or not name.isidentifier():
        return spec
    found = importlib.util.find_spec("configs")
    path = os.path.join(os.path.dirname(found.origin), f"{name}.py") if found else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config={spec}: no config named {name!r} in configs/ (give a "
                                "file, e.g. --config=configs/lhq.py:smoke)")
    return path + colon + arg


def _with_config_files(argv: Sequence[str]) -> list[str]:
    """`argv` with every `--config=NAME[:arg]` / `--config NAME` given as its file."""
    out, args = [], list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--config="):
            arg = "--config=" + config_file(arg.removeprefix("--config="))
        elif arg == "--config" and args:
            out.append(arg)
            arg = config_file(args.pop(0))
        out.append(arg)
    return out


def run_app(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """`absl.app.run(main)`: `--config` takes a file or a name; a config file whose code fails
    while the flags are parsed (a syntax error, an exception in `get_config`) ends with one line
    naming the file and line, status 2; errors once `main` runs are left alone."""
    from absl import app
    started = []

    def started_main(argv):
        started.append(True)
        return main(argv)

    try:
        with user_errors_in_one_line():
            argv = _with_config_files(sys.argv if argv is None else argv)
        app.run(started_main, argv=argv)
    except Exception as err:
        if started or debug():
            raise
        frame = (traceback.extract_tb(err.__traceback__) or [None])[-1]
        where = (f"{err.filename}, line {err.lineno}" if isinstance(err, SyntaxError) else
                 f"{frame.filename}, line {frame.lineno}" if frame else "")
        print(f"error: the config could not be loaded ({where}): {type(err).__name__}: "
              f"{' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


def config_from_flag(holder: Any) -> ml_collections.ConfigDict:
    """The value of an ml_collections `--config` flag; a file that does not load is a
    FileNotFoundError or ConfigError naming it, in one line."""
    from absl import flags
    from ml_collections import config_flags
    try:
        config = holder.value
        config.keys()       # a config that failed to load raises on first use
        return config
    except OSError as err:
        name = config_flags.get_config_filename(flags.FLAGS[holder.name])
        detail = (str(err).strip().splitlines() or [""])[-1].strip()
        raise FileNotFoundError(f"--config={name} cannot be loaded: {detail}") from None
    except Exception as err:    # the config file's own code failed
        name = config_flags.get_config_filename(flags.FLAGS[holder.name])
        raise ConfigError("file", f"--config={name} failed: {type(err).__name__}: "
                          f"{' '.join(str(err).split())}") from None


# ------------------------------------------------------------------------ argparse commands
class Parser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported as every user error is: one line,
    status 2."""

    def error(self, message: str):
        print(f"error: {message.removeprefix('argument ')} (see --help)", file=sys.stderr)
        sys.exit(2)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argparse parser for `python -m PROG` with the module docstring as its description."""
    return Parser(prog=f"python -m {prog}", description=doc, allow_abbrev=False,
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`, refused while the options are parsed."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def add_model_arguments(p: argparse.ArgumentParser, cascade: bool = False) -> None:
    """--model, --config, --step, --vae, --dtype; `cascade`: --model (and --config) repeat."""
    many = dict(action="append") if cascade else {}
    p.add_argument("--model", required=True, **many,
                   help="training workdir (local or gs://), or converted params (+ --config)"
                        + ("; repeat for a cascade" if cascade else ""))
    p.add_argument("--config", default=None, **many,
                   help="config of converted params: a file (file.py[:arg]) or a name (lhq:smoke)"
                        + (", one per --model or one for all" if cascade else ""))
    p.add_argument("--step", type=at_least(0), default=None,
                   help="checkpoint step of a workdir (default: the latest)")
    p.add_argument("--vae", default=None, help="converted VAE directory (default: the config's)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="compute dtype (default: the model's config)")


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """--solver, --num_steps, --num_points, --guidance_scale, --seed; any other field of
    `config.sampling` as --sampling.FIELD=VALUE (`parse_args`)."""
    p.add_argument("--solver", default=None,
                   help="sampler: dopri5, euler, heun, midpoint, rk4, rk4_classic (ODE), "
                        "euler_maruyama, sde_heun (SDE; models with a noised source) "
                        "(default: the model's config)")
    p.add_argument("--num_steps", type=at_least(1), default=None,
                   help="steps of a fixed-step solver")
    p.add_argument("--num_points", type=at_least(2), default=None,
                   help="time points of a fixed-step solver (the reference's; num_steps = N - 1)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance w (models trained with context dropout)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random draws (the sampler's noise; evaluate's p-FID crops)")
    fields = sorted(set(SolverOptions._fields + SDEOptions._fields) - set(SAMPLER_FLAGS))
    p.epilog = ((p.epilog or "") + "Other sampler fields: --sampling.FIELD=VALUE, FIELD one of "
                + ", ".join(fields) + ".")


def add_compile_cache_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no_compile_cache", action="store_true", help=compile_cache.FLAG_HELP)


def parse_args(p: argparse.ArgumentParser, argv: Sequence[str] | None,
               blocks: Sequence[str] = ("sampling",)
               ) -> tuple[argparse.Namespace, dict[str, dict[str, str]]]:
    """The named options and the `--BLOCK.FIELD=VALUE` overrides of the config blocks `blocks`
    ({block: {field: text}}); anything else ends the command as argparse does (status 2)."""
    args, rest = p.parse_known_args(argv)
    out: dict[str, dict[str, str]] = {b: {} for b in blocks}
    while rest:
        arg = rest.pop(0)
        block, dot, field = arg.removeprefix("--").partition(".")
        if not arg.startswith("--") or not dot or block not in out:
            p.error(f"unrecognized argument {arg!r}")
        field, eq, value = field.partition("=")
        if not eq:
            if not rest:
                p.error(f"{arg} needs a value")
            value = rest.pop(0)
        out[block][field] = value
    return args, out


def typed(block: ml_collections.ConfigDict, name: str, field: str, text: str) -> Any:
    """`text` as the type of `block[field]` (bool, int, float, comma-separated tuple, str);
    UserError naming `--name.field` when the field does not exist or the value does not parse."""
    if field not in block:
        raise UserError(f"--{name}.{field}: config.{name} has no field {field!r} (fields: "
                        f"{', '.join(sorted(block))})")
    current = block[field]
    try:
        if isinstance(current, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if isinstance(current, (int, float)):
            return type(current)(text)
    except ValueError:
        kind = {bool: "a boolean", int: "an integer", float: "a number"}[type(current)]
        raise UserError(f"--{name}.{field}={text!r} is not {kind}") from None
    if isinstance(current, (tuple, list)):
        return tuple(x.strip() for x in text.split(",") if x.strip())
    return text


def sampler_options(args: argparse.Namespace, sampling: ml_collections.ConfigDict,
                    extra: dict[str, str]) -> dict[str, Any]:
    """The sampler options given on the command line: the named flags and --sampling.FIELD."""
    named = {k: getattr(args, k) for k in SAMPLER_FLAGS}
    return {**{k: v for k, v in named.items() if v is not None},
            **{k: typed(sampling, "sampling", k, v) for k, v in extra.items()}}


def console(main: Callable[[Sequence[str] | None], int]) -> None:
    """A console script's entry: `sys.exit(main())`."""
    sys.exit(main(None))
