"""Tests of fmboost_jax/convert/unet.py and `convert unet`: converted weights give the reference
UNet's velocity, every key maps to one param, the command writes an Orbax checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import traverse_util  # noqa: E402
from torch_unet_oracle import SMALL, randomized_torch_unet, training_checkpoint  # noqa: E402

from fmboost_jax import convert  # noqa: E402
from fmboost_jax.convert import __main__ as convert_cli  # noqa: E402
from fmboost_jax.convert import unet as convert_unet  # noqa: E402
from fmboost_jax.models.layers import count_params  # noqa: E402
from fmboost_jax.models.unet import EfficientUNet  # noqa: E402

torch = pytest.importorskip("torch")


CONFIGS = {
    "softmax_scale_shift": SMALL,
    "linear_additive_avgpool": {**SMALL, "use_linear_attn": True, "use_scale_shift_norm": False,
                                "conv_resample": False},
    "pooled": {**SMALL, "pool_factor": 2},
}


@contextlib.contextmanager
def torch_single_threaded() -> Iterator[None]:
    """Tiny torch forwards run ~50x faster on one thread when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compile_fast(fn: Any, *args: Any) -> Any:
    """`jax.jit(fn)` compiled for `args` with XLA's backend optimisations off (compiles ~2x faster)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_torch_weights_give_the_same_velocity(name: str) -> None:
    config = CONFIGS[name]
    model = randomized_torch_unet(config)
    unet = EfficientUNet(**config)
    params = convert.unet_params_from_torch(model.state_dict(), unet)

    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.rand(2, generator=gen)
    with torch.no_grad(), torch_single_threaded():
        expected = model(x, t, context).permute(0, 2, 3, 1).numpy()
    nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()
    inputs = ({"params": params}, nhwc(x), t.numpy(), nhwc(context))
    got = compile_fast(unet.apply, *inputs)(*inputs)

    assert got.shape == expected.shape == (2, 16, 16, 4)
    assert np.abs(expected).max() > 0.1  # not a trivially small output
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)
    assert count_params(params) == sum(p.numel() for p in model.parameters())


def test_every_reference_key_maps_to_one_flax_param(base_state_dict: dict[str, np.ndarray],
                                                    base_shapes: dict[str, Any]) -> None:
    layouts = [convert.unet_layout(path, tuple(s.shape))
               for path, s in traverse_util.flatten_dict(base_shapes).items()]
    assert {key: shape for key, shape, _ in layouts} == {
        k: v.shape for k, v in base_state_dict.items()}


def test_flax_module_names_become_torch_attribute_paths() -> None:
    assert convert_unet.torch_module_name("input_blocks_1_0") == "input_blocks.1.0"
    assert convert_unet.torch_module_name("in_layers_2") == "in_layers.2"
    assert convert_unet.torch_module_name("skip_connection") == "skip_connection"
    assert convert_unet.torch_module_name("pool") == "pool.down_conv"
    assert convert_unet.torch_module_name("un_pool") == "un_pool.up_conv"
    key, shape, _ = convert.unet_layout(("middle_block_1", "qkv", "kernel"), (64, 96))
    assert (key, shape) == ("middle_block.1.qkv.weight", (96, 64, 1))


CONFIG_FILE = """
    import ml_collections

    def get_config():
        config = ml_collections.ConfigDict()
        config.unet = ml_collections.ConfigDict({unet!r})
        return config
"""


class TouchesAFile:
    """Unpickling it would call `Path(marker).touch()`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_the_cli_converts_a_lightning_checkpoint_as_it_is_without_running_its_code(
        tmp_path: Path, base_state_dict: dict[str, np.ndarray], base_shapes: dict[str, Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    config_path = tmp_path / "tiny.py"
    config_path.write_text(textwrap.dedent(CONFIG_FILE.format(unet=dict(SMALL))))
    ema = {k: v + 0.5 for k, v in base_state_dict.items()}
    ckpt = training_checkpoint(base_state_dict, ema)
    ckpt["state_dict"] = {k: torch.from_numpy(np.asarray(v)) for k, v in ckpt["state_dict"].items()}
    # What Lightning adds: hyper-parameters as objects of the training code, callback states.
    ckpt |= {"hyper_parameters": argparse.Namespace(lr=1e-4, unet=dict(SMALL)),
             "callbacks": {"ModelCheckpoint": {"dirpath": Path("/ckpts")}},
             "loops": TouchesAFile(tmp_path / "code_ran")}
    torch.save(ckpt, tmp_path / "last.ckpt")
    dst = tmp_path / "unet_params"

    code = convert_cli.main(["unet", "--src", str(tmp_path / "last.ckpt"), "--dst", str(dst),
                         "--config", str(config_path), "--which", "model"])

    assert code == 0 and not (tmp_path / "code_ran").exists()
    expected = convert.params_from_torch(base_state_dict, base_shapes, convert.unet_layout)
    assert f"{count_params(expected):,}" in capsys.readouterr().out
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(dst))
    flat = traverse_util.flatten_dict
    assert flat(restored).keys() == flat(expected).keys()
    for path, value in flat(expected).items():
        np.testing.assert_array_equal(np.asarray(flat(restored)[path]), value)
