"""Tests of fmboost_jax/evaluation/fid.py: FID, KID, patch-FID and their streaming statistics,
with a small fixed feature function in place of Inception."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from fmboost_jax.evaluation import fid

D = 64


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def scipy_fid(mu1, s1, mu2, s2):
    """FID from the symmetric form tr(sqrtm(sqrtm(s1) s2 sqrtm(s1))), both roots by scipy."""
    r = linalg.sqrtm(s1).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(
        linalg.sqrtm(r @ s2 @ r).real)


def toy_features(images) -> np.ndarray:
    """(B, H, W, 3) -> (B, 24): means of a 2 x 2 grid of cells per channel and their squares
    (any image size with even H, W)."""
    x = np.asarray(images, np.float64)
    b, h, w, c = x.shape
    cells = x.reshape(b, 2, h // 2, 2, w // 2, c)
    return np.concatenate([cells.mean(axis=(2, 4)).reshape(b, -1),
                           (cells ** 2).mean(axis=(2, 4)).reshape(b, -1)], axis=1)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_scipy_on_random_gaussians(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    s1, s2 = random_spd(rng, D), random_spd(rng, D)
    expected = scipy_fid(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected,
                                                                                   rel=1e-6)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_of_commuting_covariances_is_closed_form(method):
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, D), rng.uniform(0.1, 3.0, D)
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    q = np.linalg.qr(rng.normal(size=(D, D)))[0]           # a shared eigenbasis
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected,
                                                                                   rel=1e-8)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == \
        pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rejects_a_large_imaginary_part_and_mismatched_shapes():
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_a_non_finite_root_is_retried_with_eps_added_to_the_diagonals(monkeypatch):
    rng = np.random.default_rng(12)
    s1, s2 = random_spd(rng, 8), random_spd(rng, 8)
    sqrtm, calls = linalg.sqrtm, []
    fake_sqrtm = lambda a: calls.append(a) or (np.full_like(a, np.nan) if len(calls) == 1
                                               else sqrtm(a))
    monkeypatch.setattr(fid.linalg, "sqrtm", fake_sqrtm)
    got = fid.frechet_distance(np.zeros(8), s1, np.zeros(8), s2, eps=1e-2)
    np.testing.assert_allclose(calls[1], (s1 + 1e-2 * np.eye(8)) @ (s2 + 1e-2 * np.eye(8)))
    assert got == pytest.approx(np.trace(s1 + s2) - 2 * np.trace(sqrtm(calls[1]).real))


def test_rank_deficient_covariances_give_a_finite_distance_that_agrees_across_methods():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 16)), rng.normal(size=(10, 16)) + 0.5    # N < D: singular
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    a, b = fid.frechet_distance(*args), fid.frechet_distance(*args, method="eigh")
    assert np.isfinite(a) and a == pytest.approx(b, rel=1e-3)


def test_streamed_stats_in_uneven_batches_equal_numpy_and_fid_against_itself_is_zero():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1000, 16)) * rng.uniform(0.5, 2, 16) + 1e3     # a large common offset
    stats, halves = fid.FeatureStats(), [fid.FeatureStats(), fid.FeatureStats()]
    for i, (lo, hi) in enumerate([(0, 1), (1, 8), (8, 8), (8, 333), (333, 1000)]):
        stats.update(x[lo:hi])
        halves[i % 2].update(x[lo:hi])
    halves[0].merge(halves[1])
    for s in (stats, halves[0]):
        assert s.count == 1000
        np.testing.assert_allclose(s.mean, x.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    assert abs(fid.fid_from_stats(stats, stats)) < 1e-6 * np.trace(stats.cov)
    with pytest.raises(ValueError, match="at least 2"):
        one = fid.FeatureStats()
        one.update(x[:1])
        one.cov  # noqa: B018


def test_npz_round_trip_is_atomic_and_reads_pytorch_fid_files(tmp_path):
    rng = np.random.default_rng(4)
    stats = fid.FeatureStats()
    stats.update(rng.normal(size=(50, 8)))
    path = tmp_path / "stats.npz"
    path.write_bytes(b"an older file")                  # replaced, not appended to
    stats.save_npz(path)
    loaded = fid.load_npz(path)
    np.testing.assert_array_equal(loaded.mu, stats.mean)
    np.testing.assert_array_equal(loaded.sigma, stats.cov)
    assert loaded.num_samples == 50 and os.listdir(tmp_path) == ["stats.npz"]
    with np.load(path) as f:                            # what pytorch-fid reads
        np.testing.assert_array_equal(f["mu"], stats.mean)
    torch_style = tmp_path / "pytorch_fid.npz"
    np.savez(torch_style, mu=stats.mean.astype(np.float32), sigma=stats.cov.astype(np.float32))
    g = fid.GaussianStats.load_npz(torch_style)
    assert g.num_samples is None and g.sigma.shape == (8, 8) and g.mu.dtype == np.float64


def test_bad_stats_files_raise_value_errors_naming_file_and_key(tmp_path):
    missing = tmp_path / "missing.npz"
    np.savez(missing, mu=np.zeros(4))
    with pytest.raises(ValueError, match="missing.npz.*'sigma'"):
        fid.load_npz(missing)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ValueError, match="wrong.npz.*'sigma'"):
        fid.load_npz(wrong)
    flat = tmp_path / "flat.npz"
    np.savez(flat, mu=np.zeros((2, 2)), sigma=np.eye(2))
    with pytest.raises(ValueError, match="flat.npz.*'mu'"):
        fid.load_npz(flat)
    array = tmp_path / "array.npy"
    np.save(array, np.zeros(3))
    with pytest.raises(ValueError, match="array.npy: not an .npz"):
        fid.load_npz(array)


def brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    k = lambda a, b: (a @ b / x.shape[1] + 1) ** 3
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_polynomial_mmd_matches_a_brute_force_sum_and_kid_uses_whole_small_sets():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) + 0.3
    kernel = fid.polynomial_kernel
    got = fid.mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y))
    assert got == pytest.approx(brute_force_mmd2(x, y), rel=1e-12)
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(got, rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    kw = dict(num_subsets=20, subset_size=100)
    same_mean, same_std = fid.kernel_inception_distance(real, fake, **kw)
    assert abs(same_mean) < 1e-3 or abs(same_mean) < 2 * same_std
    small, _ = fid.kernel_inception_distance(real, fake + 0.3, **kw)
    large, _ = fid.kernel_inception_distance(real, fake + 1.0, **kw)
    assert 0 < small < large and small > 5 * same_std
    assert fid.kernel_inception_distance(real, fake, **kw) == (same_mean, same_std)  # seeded


def test_feature_bank_keeps_the_first_max_samples():
    bank = fid.FeatureBank(max_samples=10)
    x = np.arange(60.0).reshape(15, 4)
    for lo, hi in [(0, 3), (3, 8), (8, 15)]:
        bank.update(x[lo:hi])
    assert bank.seen == 15
    np.testing.assert_array_equal(bank.features, x[:10])


def test_crop_positions_are_in_bounds_deterministic_and_reject_a_crop_larger_than_the_image():
    pos = fid.crop_positions(0, (20, 12), 500, 8)
    assert pos.shape == (500, 2) and pos.min() == 0
    assert pos[:, 0].max() == 12 and pos[:, 1].max() == 4          # top <= H - S, left <= W - S
    np.testing.assert_array_equal(pos, fid.crop_positions(0, (20, 12), 500, 8))
    key_pos = jax.jit(fid.crop_positions, static_argnums=(1, 2, 3))(
        jax.random.PRNGKey(0), (20, 12), 500, 8)
    assert int(key_pos[:, 0].max()) <= 12 and int(key_pos[:, 1].max()) <= 4
    assert int(key_pos.min()) >= 0
    with pytest.raises(ValueError, match="13x13.*20x12"):
        fid.crop_positions(0, (20, 12), 4, 13)


def test_extract_crops_equals_manual_slicing_in_numpy_and_under_jit():
    rng = np.random.default_rng(7)
    images = rng.uniform(size=(3, 10, 9, 3)).astype(np.float32)
    pos = fid.crop_positions(rng, (10, 9), 3 * 4, 5).reshape(3, 4, 2)
    manual = np.stack([images[b, t:t + 5, s:s + 5] for b in range(3) for t, s in pos[b]])
    np.testing.assert_array_equal(fid.extract_crops(images, pos, 5), manual)
    jitted = jax.jit(fid.extract_crops, static_argnums=2)(jnp.asarray(images), pos, 5)
    np.testing.assert_array_equal(np.asarray(jitted), manual)


def test_accumulator_scores_a_set_against_itself_zero_and_a_shifted_set_higher():
    rng = np.random.default_rng(8)
    real = rng.uniform(size=(96, 16, 16, 3)).astype(np.float32)
    fake = np.clip(real + 0.2, 0, 1)
    same = fid.FIDAccumulator(toy_features, kid_max_samples=64, kid_subsets=10,
                              kid_subset_size=32, num_crops=3, crop_size=8)
    other = fid.FIDAccumulator(toy_features, kid_max_samples=64, kid_subsets=10,
                               kid_subset_size=32, num_crops=3, crop_size=8)
    for lo in range(0, 96, 40):                           # batches of 40, 40, 16
        same.update(real[lo:lo + 40], real=real[lo:lo + 40])
        other.update(fake[lo:lo + 40], real=real[lo:lo + 40])
    a, b = same.results(), other.results()
    assert set(a) == {"fid", "kid_mean", "kid_std", "pfid"}
    assert same.patch[0].count == 96 * 3 and same.kid[0].features.shape == (64, 24)
    assert abs(a["fid"]) < 1e-9 and abs(a["pfid"]) < 1e-9
    assert abs(a["kid_mean"]) < 3 * a["kid_std"]     # subsets of real and fake drawn apart
    assert b["fid"] > 1e-3 and b["pfid"] > 1e-3 and b["kid_mean"] > 1e-4


def test_p_fid_crops_the_real_and_the_fake_image_at_the_same_positions():
    seen = []
    record = lambda images: seen.append(np.asarray(images)) or toy_features(images)
    acc = fid.FIDAccumulator(record, num_crops=2, crop_size=4, quantize=False)
    real = np.random.default_rng(9).uniform(size=(5, 12, 8, 3)).astype(np.float32)
    acc.update(jnp.asarray(real), real=real.copy())            # cropped by jax and by numpy
    _, _, real_crops, fake_crops = seen                        # fake, real, then their crops
    assert real_crops.shape == (10, 4, 4, 3)
    np.testing.assert_array_equal(real_crops, fake_crops)


def test_reference_statistics_from_a_file_serve_fid_and_kid_or_p_fid_need_real_images(tmp_path):
    rng = np.random.default_rng(10)
    real = rng.uniform(size=(64, 8, 8, 3))
    fake = rng.uniform(size=(64, 8, 8, 3))
    stats = fid.FeatureStats()
    stats.update(toy_features(fid.quantize_uint8(real)))
    stats.save_npz(tmp_path / "real.npz")
    from_file = fid.FIDAccumulator(toy_features, reference=tmp_path / "real.npz")
    streamed = fid.FIDAccumulator(toy_features)
    from_file.update(fake)
    streamed.update(fake, real=real)
    assert from_file.results()["fid"] == pytest.approx(streamed.results()["fid"], rel=1e-9)
    with pytest.raises(ValueError, match="real images"):
        streamed.update(fake)
    with_kid = fid.FIDAccumulator(toy_features, reference=tmp_path / "real.npz",
                                  kid_max_samples=8)
    with pytest.raises(ValueError, match="KID need the real images"):
        with_kid.update(fake)


def test_quantize_matches_the_reference_uint8_conversion_and_is_idempotent():
    x = np.random.default_rng(11).uniform(-1, 1, size=1000)
    reference = np.clip(x * 127.5 + 127.5, 0, 255).astype(np.uint8)   # its un_normalize_ims
    q = fid.quantize_uint8(x * 0.5 + 0.5)
    near_level = np.abs(x * 127.5 + 127.5 - np.round(x * 127.5 + 127.5)) < 1e-3
    np.testing.assert_array_equal(np.round(q * 255)[~near_level], reference[~near_level])
    np.testing.assert_array_equal(fid.quantize_uint8(q), q)
