"""Tests of fmboost_jax/convert/inception.py and the `convert inception` command: the key layout,
and state dicts with missing, unexpected or mis-shaped keys refused with every key named."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from inception_oracle import FIDInception3  # noqa: E402

from fmboost_jax.convert import CheckpointMismatchError, inception_params_from_torch  # noqa: E402
from fmboost_jax.convert import __main__ as convert_cli  # noqa: E402

MISSING = "Mixed_6e.branch7x7dbl_3.bn.running_var"
EXTRA = "AuxLogits.fc.weight"
MISSHAPED = "fc.weight"


@pytest.fixture(scope="module")
def state_dict() -> dict:
    """pytorch-fid's keys, default torch init (the values do not matter here)."""
    torch.manual_seed(0)
    return dict(FIDInception3().state_dict())


def broken(state_dict: dict) -> dict:
    """One key missing, one unexpected (torchvision's ImageNet model has AuxLogits), one of the
    wrong shape (1000 classes)."""
    out = {k: v for k, v in state_dict.items() if k != MISSING}
    out[EXTRA] = torch.zeros(1000, 768)
    out[MISSHAPED] = torch.zeros(1000, 2048)
    return out


def test_torch_layouts_become_flax_layouts_and_counters_are_dropped(state_dict):
    without_counters = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert len(without_counters) < len(state_dict)
    for sd in (state_dict, without_counters):
        v = inception_params_from_torch(sd)
        conv = v["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
        assert conv.shape == (1, 7, 128, 128) and conv.dtype == np.float32
        np.testing.assert_array_equal(
            conv, state_dict["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0))
        bn = v["params"]["Conv2d_1a_3x3"]["bn"]
        np.testing.assert_array_equal(bn["scale"], state_dict["Conv2d_1a_3x3.bn.weight"].numpy())
        stats = v["batch_stats"]["Mixed_7b"]["branch3x3dbl_3a"]["bn"]
        np.testing.assert_array_equal(stats["mean"],
                                      state_dict["Mixed_7b.branch3x3dbl_3a.bn.running_mean"].numpy())
        np.testing.assert_array_equal(v["params"]["fc"]["kernel"], state_dict["fc.weight"].numpy().T)


def test_missing_unexpected_and_misshaped_keys_are_all_named(state_dict):
    with pytest.raises(CheckpointMismatchError) as err:
        inception_params_from_torch(broken(state_dict))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert f"missing keys (1):\n    {MISSING}" in msg
    assert f"unexpected keys (1):\n    {EXTRA}" in msg
    assert f"wrong shapes (1):\n    {MISSHAPED}: checkpoint (1000, 2048), expected (1008, 2048)" in msg


@pytest.mark.parametrize("change", ["missing", "extra", "misshaped"])
def test_each_kind_of_mismatch_alone_is_refused(state_dict, change):
    sd = dict(state_dict)
    if change == "missing":
        del sd[MISSING]
    elif change == "extra":
        sd[EXTRA] = torch.zeros(3)
    else:
        sd["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(CheckpointMismatchError, match=r"\((1)\):"):
        inception_params_from_torch(sd)


def test_the_cli_refuses_a_mismatched_file_with_status_2_and_writes_nothing(state_dict, tmp_path,
                                                                           capsys):
    src, dst = tmp_path / "inception_v3_imagenet.pth", tmp_path / "out"
    torch.save(broken(state_dict), src)
    with pytest.raises(SystemExit) as exit_:
        convert_cli.main(["inception", "--src", str(src), "--dst", str(dst)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "error: checkpoint does not match the network (prefix ''):"
    assert MISSING in err and EXTRA in err and MISSHAPED in err and "Traceback" not in err
    assert not dst.exists()


def test_the_cli_calls_a_non_checkpoint_file_so_in_one_line(tmp_path, capsys):
    src = tmp_path / "pt_inception.pth"
    src.write_bytes(b"\x00not a checkpoint" * 64)
    with pytest.raises(SystemExit) as exit_:
        convert_cli.main(["inception", "--src", str(src), "--dst", str(tmp_path / "out")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pt_inception.pth is not a readable PyTorch checkpoint" in lines[0]
    assert not (tmp_path / "out").exists()
