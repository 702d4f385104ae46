"""The small reference UNet's random weights and param shapes, shared by the converter tests."""

from typing import Any

import numpy as np
import pytest

from fmboost_jax import convert
from fmboost_jax.models.unet import EfficientUNet


@pytest.fixture(scope="module")
def base_state_dict() -> dict[str, np.ndarray]:
    from torch_unet_oracle import SMALL, numpy_state_dict, randomized_torch_unet
    return numpy_state_dict(randomized_torch_unet(SMALL))


@pytest.fixture(scope="module")
def base_shapes() -> dict[str, Any]:
    """The small UNet's param shapes, traced once for the tests of key handling."""
    from torch_unet_oracle import SMALL
    return convert.unet_param_shapes(EfficientUNet(**SMALL))
