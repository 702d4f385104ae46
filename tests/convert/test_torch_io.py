"""Tests of fmboost_jax/convert/torch_io.py: reading PyTorch files safely, finding the network in
training checkpoints, and naming every mismatched key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402
from torch_unet_oracle import SMALL, leaf, randomized_torch_unet, training_checkpoint  # noqa: E402

from fmboost_jax import convert  # noqa: E402
from fmboost_jax.models.unet import EfficientUNet  # noqa: E402


def test_training_checkpoints_load_the_ema_or_the_online_copy(
        base_state_dict: dict[str, np.ndarray], base_shapes: dict[str, Any]) -> None:
    online = base_state_dict
    ema = {k: v + 1.0 for k, v in base_state_dict.items()}
    ckpt = training_checkpoint(online, ema)
    path = ("input_blocks_1_0", "in_layers_2", "kernel")
    expect_online = online["input_blocks.1.0.in_layers.2.weight"].transpose(2, 3, 1, 0)

    for which, expected in ((None, expect_online + 1), ("ema", expect_online + 1),
                            ("model", expect_online)):
        params = convert.params_from_torch(ckpt, base_shapes, convert.unet_layout, which=which)
        np.testing.assert_array_equal(leaf(params, *path), expected)

    online_only = {f"model.net.{k}": v for k, v in online.items()}
    params = convert.unet_params_from_torch(online_only, EfficientUNet(**SMALL))
    np.testing.assert_array_equal(leaf(params, *path), expect_online)
    with pytest.raises(ValueError, match="no EMA copy"):
        convert.params_from_torch(online_only, base_shapes, convert.unet_layout, which="ema")


def test_bare_torch_tensors_in_bfloat16_are_converted_to_float32(
        base_shapes: dict[str, Any]) -> None:
    state = randomized_torch_unet(SMALL).to(torch.bfloat16).state_dict()
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
