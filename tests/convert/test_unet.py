"""Tests of fmboost_jax.convert against the PyTorch oracle of the reference UNet."""

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
from torch_unet_oracle import EfficientUNet as TorchUNet  # noqa: E402

from fmboost_jax import convert  # noqa: E402
from fmboost_jax.convert import __main__ as convert_cli  # noqa: E402
from fmboost_jax.convert import unet as convert_unet  # noqa: E402
from fmboost_jax.models.layers import count_params  # noqa: E402
from fmboost_jax.models.unet import EfficientUNet  # noqa: E402

BASE = dict(in_channels=8, model_channels=32, out_channels=4, num_res_blocks=1,
            attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 2, 2), conv_resample=True,
            dim_head=16, num_heads=2, use_linear_attn=False, use_scale_shift_norm=True,
            pool_factor=-1)
CONFIGS = {
    "softmax_scale_shift": BASE,
    "linear_additive_avgpool": {**BASE, "use_linear_attn": True, "use_scale_shift_norm": False,
                                "conv_resample": False},
    "pooled": {**BASE, "pool_factor": 2},
}


def randomized_torch_unet(config: dict[str, Any], seed: int = 0) -> TorchUNet:
    """The oracle with every parameter random (the zero-initialised convs included)."""
    torch.manual_seed(seed)
    model = TorchUNet(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_norm_scale = name.endswith("weight")
                p.copy_((1.0 if is_norm_scale else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def base_state_dict() -> dict[str, np.ndarray]:
    return numpy_state_dict(randomized_torch_unet(BASE))


@pytest.fixture(scope="module")
def base_shapes() -> dict[str, Any]:
    """The BASE UNet's param shapes, traced once for the tests of key handling."""
    return convert.unet_param_shapes(EfficientUNet(**BASE))


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


def leaf(params: Any, *path: str) -> np.ndarray:
    for key in path:
        params = params[key]
    return np.asarray(params)


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


def _training_checkpoint(online: dict[str, np.ndarray], ema: dict[str, np.ndarray]) -> dict:
    """A Lightning checkpoint of the reference trainer: online net, EMA copy, EMA buffers, AE."""
    state = {f"model.net.{k}": v for k, v in online.items()}
    state |= {f"ema_model.ema_model.net.{k}": v for k, v in ema.items()}
    state |= {"ema_model.initted": np.array(True), "ema_model.step": np.array(7),
              "first_stage.encoder.conv_in.weight": np.zeros((128, 3, 3, 3), np.float32)}
    return {"state_dict": state, "global_step": 7}


def test_training_checkpoints_load_the_ema_or_the_online_copy(
        base_state_dict: dict[str, np.ndarray], base_shapes: dict[str, Any]) -> None:
    online = base_state_dict
    ema = {k: v + 1.0 for k, v in base_state_dict.items()}
    ckpt = _training_checkpoint(online, ema)
    path = ("input_blocks_1_0", "in_layers_2", "kernel")
    expect_online = online["input_blocks.1.0.in_layers.2.weight"].transpose(2, 3, 1, 0)

    for which, expected in ((None, expect_online + 1), ("ema", expect_online + 1),
                            ("model", expect_online)):
        params = convert.params_from_torch(ckpt, base_shapes, convert.unet_layout, which=which)
        np.testing.assert_array_equal(leaf(params, *path), expected)

    online_only = {f"model.net.{k}": v for k, v in online.items()}
    params = convert.unet_params_from_torch(online_only, EfficientUNet(**BASE))
    np.testing.assert_array_equal(leaf(params, *path), expect_online)
    with pytest.raises(ValueError, match="no EMA copy"):
        convert.params_from_torch(online_only, base_shapes, convert.unet_layout, which="ema")


def test_bare_torch_tensors_in_bfloat16_are_converted_to_float32(
        base_shapes: dict[str, Any]) -> None:
    state = randomized_torch_unet(BASE).to(torch.bfloat16).state_dict()
    params = convert.params_from_torch(state, base_shapes, convert.unet_layout)
    kernel = leaf(params, "time_embed_0", "kernel")
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, state["time_embed.0.weight"].float().numpy().T)


def test_missing_unexpected_and_misshaped_keys_are_all_named(
        base_state_dict: dict[str, np.ndarray], base_shapes: dict[str, Any]) -> None:
    missing, extra, wrong = "middle_block.1.qkv.bias", "output_blocks.9.0.weight", "out.2.weight"

    def broken(*changes: str) -> dict[str, np.ndarray]:
        state = dict(base_state_dict)
        if "missing" in changes:
            del state[missing]
        if "extra" in changes:
            state[extra] = np.zeros(3, np.float32)
        if "wrong" in changes:
            state[wrong] = np.zeros((4, 32, 1, 1), np.float32)
        return state

    for change, key in (("missing", missing), ("extra", extra), ("wrong", wrong)):
        with pytest.raises(convert.CheckpointMismatchError, match=key.replace(".", r"\.")):
            convert.params_from_torch(broken(change), base_shapes, convert.unet_layout)
    with pytest.raises(ValueError) as info:
        convert.params_from_torch(broken("missing", "extra", "wrong"), base_shapes,
                                  convert.unet_layout)
    message = str(info.value)
    assert all(key in message for key in (missing, extra, wrong))
    assert "(4, 32, 1, 1)" in message and "(4, 32, 3, 3)" in message


def test_a_prefixed_mismatch_names_the_full_checkpoint_key(
        base_state_dict: dict[str, np.ndarray], base_shapes: dict[str, Any]) -> None:
    state = {f"model.net.{k}": v for k, v in base_state_dict.items() if k != "out.2.bias"}
    with pytest.raises(ValueError, match=r"model\.net\.out\.2\.bias"):
        convert.params_from_torch(state, base_shapes, convert.unet_layout)


def test_torch_checkpoint_files_are_read_and_other_files_are_refused(tmp_path: Path) -> None:
    state = {"a.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save({"state_dict": state}, tmp_path / "ckpt.pt")
    loaded = convert.load_torch_state_dict(tmp_path / "ckpt.pt")
    np.testing.assert_array_equal(loaded["state_dict"]["a.weight"].numpy(), state["a.weight"].numpy())

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="notes.ckpt"):
        convert.load_torch_state_dict(text)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        convert.load_torch_state_dict(tmp_path / "absent.pt")


def test_checkpoints_with_pickled_objects_need_allow_pickle(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": argparse.Namespace(lr=1e-4)},
               tmp_path / "lightning.ckpt")
    with pytest.raises(ValueError, match="lightning.ckpt.*allow-pickle"):
        convert.load_torch_state_dict(tmp_path / "lightning.ckpt")
    loaded = convert.load_torch_state_dict(tmp_path / "lightning.ckpt", allow_pickle=True)
    assert loaded["hparams"].lr == 1e-4


CONFIG_FILE = """
    import ml_collections

    def get_config():
        config = ml_collections.ConfigDict()
        config.unet = ml_collections.ConfigDict({unet!r})
        return config
"""


def test_the_cli_writes_an_orbax_checkpoint_of_the_converted_params(
        tmp_path: Path, base_state_dict: dict[str, np.ndarray], base_shapes: dict[str, Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    config_path = tmp_path / "tiny.py"
    config_path.write_text(textwrap.dedent(CONFIG_FILE.format(unet=dict(BASE))))
    ema = {k: v + 0.5 for k, v in base_state_dict.items()}
    ckpt = _training_checkpoint(base_state_dict, ema)
    ckpt["state_dict"] = {k: torch.from_numpy(np.asarray(v)) for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "last.ckpt")
    dst = tmp_path / "unet_params"

    code = convert_cli.main(["unet", "--src", str(tmp_path / "last.ckpt"), "--dst", str(dst),
                         "--config", str(config_path), "--which", "model"])

    assert code == 0
    expected = convert.params_from_torch(base_state_dict, base_shapes, convert.unet_layout)
    assert f"{count_params(expected):,}" in capsys.readouterr().out
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(dst))
    flat = traverse_util.flatten_dict
    assert flat(restored).keys() == flat(expected).keys()
    for path, value in flat(expected).items():
        np.testing.assert_array_equal(np.asarray(flat(restored)[path]), value)
