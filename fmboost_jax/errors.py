"""The user's mistakes, named: `ConfigError` and the checks of one field, for every layer.

This is the bottom of the package: it imports nothing of fmboost_jax, so every module may raise
`ConfigError` naming the field at fault, and the command-line layer (`cli.py`) turns it into one
line and status 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A config field holds a value that is not allowed; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config.{field}: {message}")
        self.field = field


class UserError(ValueError):
    """A command-line value that is not allowed (an option, an input file's content); the
    message names the option or the file and what to do. Commands end with it in one line."""


def field_value(config: Any, field: str) -> Any:
    """The value of a dotted `field` ("sampling.solver") of `config`."""
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def check_one_of(config: Any, field: str, allowed: tuple[Any, ...]) -> None:
    """Raises ConfigError unless the (dotted) `field` of `config` is one of `allowed`."""
    value = field_value(config, field)
    if value not in allowed:
        raise ConfigError(field, f"must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_range(config: Any, field: str, low: float, high: float | None = None) -> None:
    """Raises ConfigError unless `low <= config.field` (`< high` when given)."""
    value = field_value(config, field)
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ConfigError(field, f"must be {bound}, got {value}")


def parse_names(spec: str | Iterable[str], known: Iterable[str], what: str) -> tuple[str, ...]:
    """"a,b", ("a", "b") or ("a,b",) (an absl flag's tuple) -> ("a", "b"), in the given order
    without repeats; UserError naming `what` (the option or field) for an unknown name."""
    known = tuple(known)
    items = [spec] if isinstance(spec, str) else list(spec)
    names = tuple(dict.fromkeys(n.strip() for item in items for n in item.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"{what}: unknown {', '.join(map(repr, unknown))} (known: "
                        f"{', '.join(known)})")
    return names
