"""pytorch-fid's Inception state dict (`pt_inception-2015-12-05-6726825d.pth`) -> the variables of
`models/inception.py`.

Keys are torchvision's: `Mixed_5b.branch1x1.conv.weight` (O, I, kh, kw) -> params
`Mixed_5b/branch1x1/conv/kernel` (kh, kw, I, O); `.bn.weight`/`.bn.bias` -> params `bn/scale`,
`bn/bias`; `.bn.running_mean`/`.bn.running_var` -> batch_stats `bn/mean`, `bn/var`. The fc layer
(`fc.weight` (1008, 2048), `fc.bias`) is mapped too, so the converted file is the whole network
(FID uses only the pool3 features; the logits serve e.g. the Inception Score) and the converter
checks every key of the file. BatchNorm `num_batches_tracked` counters are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fmboost_jax.convert.torch_io import params_from_torch
from fmboost_jax.models import inception
from fmboost_jax.models.inception import BATCH_STATS, PARAMS

# Flax leaf -> torch leaf, per collection.
_LEAVES = {PARAMS: {"kernel": "weight", "scale": "weight", "bias": "bias"},
           BATCH_STATS: {"mean": "running_mean", "var": "running_var"}}


def inception_layout(path: tuple[str, ...], flax_shape: tuple[int, ...]
                     ) -> tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]:
    """`("params", "Mixed_5b", "branch1x1", "conv", "kernel")` -> (torch key, torch shape,
    torch-to-flax transform)."""
    collection, *modules, leaf = path
    key, s = ".".join([*modules, _LEAVES[collection][leaf]]), flax_shape
    if leaf != "kernel":
        return key, s, lambda w: w
    if len(s) == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
        return key, (s[3], s[2], s[0], s[1]), lambda w: w.transpose(2, 3, 1, 0)
    return key, (s[1], s[0]), lambda w: w.T  # Linear (O, I) -> (I, O)


def _is_bn_counter(key: str) -> bool:
    return key.endswith(".num_batches_tracked")


def inception_params_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """pytorch-fid's FID Inception state dict -> `{"params", "batch_stats"}` (float32 numpy).

    Raises CheckpointMismatchError (a ValueError) listing every missing, unexpected and
    mis-shaped key, e.g. for torchvision's ImageNet `inception_v3` (1000 classes, AuxLogits).
    """
    return params_from_torch(state_dict, inception.variable_shapes(), inception_layout,
                             ignore=_is_bn_counter)
