"""The argparse types the benchmark scripts share: comma-separated names and numbers.

    ap.add_argument("--parts", type=names(PARTS), default="train,torch")   # -> ("train", "torch")
    ap.add_argument("--sizes", type=numbers(int), default="1024,2048")     # -> (1024, 2048)

Names go through the package's one parser (`fmboost_jax.errors.parse_names`: the given order,
no repeats, an unknown name refused while the options are parsed); argparse applies a type to a
string default too, so the value is always a tuple.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

from fmboost_jax.errors import UserError, parse_names


def names(known: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: "a,b" -> ("a", "b"), each one of `known`."""
    known = tuple(known)

    def parse(text: str) -> tuple[str, ...]:
        try:
            return parse_names(text, known, "names")
        except UserError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("names: ")) from None

    parse.__name__ = "names"
    return parse


def numbers(kind: type = int) -> Callable[[str], tuple]:
    """An argparse type: "256,512" -> (256, 512) of `kind` ("" -> ())."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}s") from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def joined(values: Iterable) -> str:
    """A tuple of names or numbers back as the command line's text ("a,b"), for a child process."""
    return ",".join(map(str, values))
