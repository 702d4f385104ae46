"""Reading pickled PyTorch checkpoints without running any code they name.

A PyTorch Lightning `.ckpt` holds, besides its tensors, hyper-parameters (OmegaConf objects,
`argparse.Namespace`s), callback and loop states: Python objects that `torch.load(weights_only=
True)` refuses, while `weights_only=False` imports and calls whatever the file names, which runs
any code a hostile file carries. This module is a pickle module for `torch.load(...,
pickle_module=safe_unpickle)`: the globals PyTorch's own weights-only loader allows (tensor and
storage rebuilders, dtypes, plain containers) are resolved; every other global becomes an `Inert`
placeholder class that records its name and arguments and runs nothing, so the tensors and the
dicts around them load and the rest stays data.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any


class Inert:
    """Stands in for an object a checkpoint names but that is not loaded (name in `_name`)."""
    _name = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        """A call of a placeholder (e.g. of `getattr(cls, name)`) is recorded, not made."""
        return _inert(f"{self._name}(...)")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<not loaded: {self._name}>"


@functools.cache
def _inert(name: str) -> type[Inert]:
    return type(f"Inert[{name}]", (Inert,), {"_name": name})


@functools.cache
def _allowed() -> dict[str, Any]:
    """{"module.name": object} of the globals PyTorch's weights-only unpickler allows."""
    from torch import _weights_only_unpickler
    return dict(_weights_only_unpickler._get_allowed_globals())


class Unpickler(pickle.Unpickler):
    """A pickle.Unpickler whose globals are PyTorch's safe ones or inert placeholders."""

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        allowed = _allowed()
        return allowed[full] if full in allowed else _inert(full)


def load(file: Any, **kwargs: Any) -> Any:
    """pickle.load with the restricted globals (`torch.load` reads legacy headers with it)."""
    return Unpickler(file, **kwargs).load()
