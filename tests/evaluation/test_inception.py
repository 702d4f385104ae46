"""Tests of fmboost_jax/models/inception.py: the FID Inception-v3 against a PyTorch oracle of
pytorch-fid's network (random weights saved as a `.pth`, converted by the CLI, loaded back), and
the bilinear resize against torch's `F.interpolate`."""

import contextlib
import io

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from inception_oracle import photos, randomized_inception, torch_features  # noqa: E402

from fmboost_jax.convert import __main__ as convert_cli  # noqa: E402
from fmboost_jax.convert import inception_params_from_torch  # noqa: E402
from fmboost_jax.models import inception  # noqa: E402


@pytest.fixture(scope="module")
def oracle():
    torch.set_num_threads(2)
    return randomized_inception()


@pytest.fixture(scope="module")
def converted(oracle, tmp_path_factory):
    """(variables loaded back from the CLI's output, the CLI's stdout). The `.pth` is written in
    torch's legacy (non-zip) format, as pytorch-fid's released weights are."""
    tmp = tmp_path_factory.mktemp("inception")
    src, dst = tmp / "pt_inception-random.pth", tmp / "inception_flax"
    torch.save(oracle.state_dict(), src, _use_new_zipfile_serialization=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = convert_cli.main(["inception", "--src", str(src), "--dst", str(dst)])
    assert status == 0
    return inception.load_inception(str(dst)), out.getvalue()


@pytest.fixture(scope="module")
def features():
    return jax.jit(inception.pool_features)


def test_the_cli_reports_the_size_of_the_fid_network(converted):
    variables, out = converted
    assert set(variables) == {"params", "batch_stats"}
    assert "wrote 23,850,960 FID Inception-v3 parameters and 34,432 BatchNorm statistics" in out


def test_loaded_variables_are_the_converted_state_dict(oracle, converted):
    direct = inception_params_from_torch(oracle.state_dict())
    loaded = converted[0]
    assert jax.tree.structure(direct) == jax.tree.structure(loaded)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), b)
    bn = oracle.Mixed_7c.branch_pool.bn
    np.testing.assert_array_equal(loaded["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                  bn.running_var.numpy())


@pytest.mark.parametrize("size", [(256, 256), (180, 320)])
def test_pool_features_match_pytorch_fid_on_photos(oracle, converted, features, size):
    """Square shrinking, and non-square with one side enlarged and the other shrunk."""
    x = photos(size)
    theirs = torch_features(oracle, x)
    ours = np.asarray(features(converted[0], x))
    assert ours.shape == theirs.shape == (2, 2048) and ours.dtype == np.float32
    scale = np.abs(theirs).max()
    # The random network is not degenerate: O(1)-O(100) features that tell the photos apart.
    assert 1.0 < scale < 1e3 and np.abs(theirs[0] - theirs[1]).mean() > 0.1 * np.abs(theirs).mean()
    rel = np.abs(ours - theirs).max() / scale
    assert rel <= 1e-4, rel


def test_fc_logits_match_the_torch_fc(oracle, converted):
    feats = np.random.default_rng(0).normal(size=(2, 2048)).astype(np.float32)
    fc = nn.Dense(inception.NUM_CLASSES)
    ours = fc.apply({"params": converted[0]["params"]["fc"]}, feats)
    with torch.no_grad():
        theirs = oracle.fc(torch.from_numpy(feats)).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


@pytest.mark.parametrize("shape, size", [((2, 512, 512, 3), (299, 299)), ((1, 37, 600, 3), (299, 299)),
                                         ((1, 299, 299, 2), (299, 299)), ((1, 1, 5, 1), (4, 11)),
                                         ((1, 300, 298, 3), (299, 299))])
def test_resize_is_torch_bilinear_without_antialiasing(shape, size):
    x = np.random.default_rng(1).uniform(size=shape).astype(np.float32)
    ours = np.asarray(inception.resize_bilinear(x, size))
    with torch.no_grad():
        theirs = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                                 size=size, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, theirs.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
    assert ours.shape == (shape[0], *size, shape[3])


@pytest.mark.parametrize("n, m", [(512, 299), (600, 299), (37, 299), (298, 299), (300, 299),
                                  (299, 299), (4096, 299), (1, 4), (7, 3)])
def test_resize_weights_are_torchs_bit_for_bit(n, m):
    """Torch's weights read off by resizing one-hot columns (n, 1) -> (m, 1)."""
    one_hots = torch.eye(n).reshape(n, 1, n, 1)
    with torch.no_grad():
        theirs = torch.nn.functional.interpolate(one_hots, size=(m, 1), mode="bilinear",
                                                 align_corners=False)[:, 0, :, 0].T.numpy()
    np.testing.assert_array_equal(inception.bilinear_matrix(n, m), theirs)


def test_preprocess_maps_unit_images_to_the_networks_range():
    x = np.full((1, 64, 48, 3), 0.25, np.float32)
    out = np.asarray(inception.preprocess(x))
    assert out.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(out, -0.5, atol=1e-6)


def test_a_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert inception --src"):
        inception.load_inception(str(tmp_path / "absent"))
