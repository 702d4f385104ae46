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
from fmboost_jax.convert import safe_unpickle  # noqa: E402
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


class RunsCodeWhenLoaded:
    """Unpickling calls `Path(marker).touch()`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class HyperParameters:
    """Like OmegaConf's DictConfig: a class of the training code, pickled by state."""

    def __init__(self, **values):
        self.__dict__.update(values)


def lightning_checkpoint(path: Path, marker: Path, state: dict[str, Any]) -> None:
    """A file laid out as PyTorch Lightning saves the reference's training runs."""
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.1.0",
                "state_dict": state,
                "hyper_parameters": HyperParameters(lr=1e-4, net={"model_channels": 128}),
                "hparams_namespace": argparse.Namespace(batch_size=8),
                "callbacks": {"ModelCheckpoint": {"best_model_path": Path("/ckpt/best.ckpt")}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
                "loops": RunsCodeWhenLoaded(marker)}, path)


def test_lightning_checkpoints_load_their_tensors_without_running_the_pickled_code(
        tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    state = {"model.net.w": torch.arange(6.0).reshape(2, 3),
             "ema_model.net.w": torch.ones(2, 3, dtype=torch.float16)}
    lightning_checkpoint(tmp_path / "last.ckpt", marker, state)
    with pytest.raises(Exception):  # noqa: B017 - torch's own weights-only loader refuses it
        torch.load(tmp_path / "last.ckpt", weights_only=True)

    loaded = convert.load_torch_state_dict(tmp_path / "last.ckpt")
    assert not marker.exists()                              # nothing in the file ran
    np.testing.assert_array_equal(loaded["state_dict"]["model.net.w"].numpy(),
                                  np.arange(6.0).reshape(2, 3))
    assert loaded["state_dict"]["ema_model.net.w"].dtype == torch.float16
    assert loaded["global_step"] == 1200 and loaded["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-4
    hp = loaded["hyper_parameters"]                          # inert: its name and state, as data
    assert "HyperParameters" in repr(hp) and hp.state == {"lr": 1e-4, "net": {"model_channels": 128}}
    assert isinstance(loaded["loops"], safe_unpickle.Inert)  # the call to Path.touch, recorded

    # Plain pickle runs it: the last resort is named for what it is.
    convert.load_torch_state_dict(tmp_path / "last.ckpt", allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"PK\x03\x04 torn zip", bytes(range(256)) * 8])
def test_a_file_that_is_not_a_checkpoint_is_called_that_and_not_advised_to_be_unpickled(
        tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "random.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="random.ckpt is not a readable PyTorch checkpoint") as err:
        convert.load_torch_state_dict(path)
    assert "allow" not in str(err.value)                     # no advice to unpickle it


def test_a_pickled_model_instead_of_its_state_dict_is_named(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"not loaded: torch\.nn\..*Linear.*not a state dict"):
        convert.load_torch_state_dict(tmp_path / "model.pt")

