"""Streaming FID, KID and patch-FID (p-FID) on features of a generic feature function.

* `FeatureStats` streams features (N, D) batch by batch into a float64 mean and covariance
  (Chan's parallel update of centred moments); `GaussianStats` is the resulting (mu, sigma),
  saved and loaded as `.npz` files with pytorch-fid's keys `mu` and `sigma`.
* `frechet_distance` is pytorch-fid's `calculate_frechet_distance` (scipy's `sqrtm` of
  sigma1 @ sigma2, retried with eps * I when that fails); `method="eigh"` gives the same trace
  from the eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1); `frechet_distance_to_samples` the
  same from N < D features of the second set, with an (N, N) decomposition instead.
* `kernel_inception_distance` is torch-fidelity's / torchmetrics' KID: the unbiased MMD^2 with the
  kernel (x.y / D + 1)^3 over random subsets, mean and (ddof=0) standard deviation. KID needs
  the features themselves: `FeatureBank` keeps the first `max_samples` of a stream.
* Patch-FID as the reference's `ImageMetricTracker` defines it: `num_crops` random
  `crop_size` x `crop_size` crops per image, at the same positions in the real and the generated
  image (`crop_positions`, `extract_crops`), scored with FID.
* `FIDAccumulator` drives them from batches of real and generated images in [0, 1].
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from fmboost_jax import paths
from fmboost_jax.errors import UserError

FeatureFn = Callable[[Any], Any]   # images (B, H, W, 3) in [0, 1] -> features (B, D)


def _as_features(features: Any) -> np.ndarray:
    x = np.asarray(jax.device_get(features), dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {x.shape}")
    return x


# ------------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class GaussianStats:
    """The mean mu (D,) and covariance sigma (D, D) of a set of features (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int | None = None

    def save_npz(self, path: str | os.PathLike) -> None:
        """Writes `mu`, `sigma` (and `num_samples`) atomically, readable by pytorch-fid."""
        save_npz(path, self.mu, self.sigma, self.num_samples)

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> GaussianStats:
        """Reads a `.npz` file with `mu` (D,) and `sigma` (D, D), e.g. pytorch-fid's."""
        return load_npz(path)


def save_npz(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray,
             num_samples: int | None = None) -> None:
    """Writes statistics to `path` atomically (`paths.atomic_write`). Keys `mu`, `sigma`
    (pytorch-fid's) and, if given, `num_samples`."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if num_samples is not None:
        arrays["num_samples"] = np.asarray(num_samples, np.int64)
    with paths.atomic_write(path) as f:
        np.savez(f, **arrays)


def load_npz(path: str | os.PathLike) -> GaussianStats:
    """Reads `mu` (D,) and `sigma` (D, D) from a `.npz` file; ValueError naming the file and the
    key when one is missing or has the wrong shape."""
    path = os.fspath(path)
    f = np.load(paths.local_copy(path), allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: not an .npz archive with keys 'mu' and 'sigma'")
    with f:
        for key in ("mu", "sigma"):
            if key not in f.files:
                raise UserError(f"{path}: missing key {key!r} (has {sorted(f.files)})")
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
        n = int(f["num_samples"]) if "num_samples" in f.files else None
    if mu.ndim != 1:
        raise UserError(f"{path}: key 'mu' must have shape (D,), got {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path}: key 'sigma' must have shape {(mu.shape[0],) * 2} to match "
                         f"'mu' {mu.shape}, got {sigma.shape}")
    return GaussianStats(mu, sigma, n)


class FeatureStats:
    """Streaming mean and unbiased covariance (ddof=1, as np.cov(rowvar=False)) of features.

    Holds the count, the mean (D,) and the centred sum of outer products M2 (D, D) in float64;
    each batch is centred on its own mean and merged with Chan et al.'s parallel update, so no
    large uncentred sums are subtracted.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def update(self, features: Any) -> None:
        """Adds a batch of features (B, D)."""
        x = _as_features(features)
        if x.shape[0] == 0:
            return
        mean = x.mean(axis=0)
        centred = x - mean
        self._merge(x.shape[0], mean, centred.T @ centred)

    def merge(self, other: FeatureStats) -> None:
        """Adds the features streamed into `other` (e.g. another process's)."""
        if other.count:
            self._merge(other.count, other._mean, other._m2)

    def _merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if self._mean is None:
            self.count, self._mean, self._m2 = n, mean.copy(), m2.copy()
            return
        if mean.shape != self._mean.shape:
            raise ValueError(f"feature dimension {mean.shape[0]} != {self._mean.shape[0]}")
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * n / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        """The mean (D,)."""
        if self._mean is None:
            raise ValueError("FeatureStats: no features yet")
        return self._mean

    @property
    def cov(self) -> np.ndarray:
        """The unbiased covariance (D, D); needs at least 2 features."""
        if self.count < 2:
            raise ValueError(f"FeatureStats: a covariance needs at least 2 features, "
                             f"have {self.count}")
        return self._m2 / (self.count - 1)

    def gaussian(self) -> GaussianStats:
        """(mu, sigma, count) as a GaussianStats."""
        return GaussianStats(self.mean, self.cov, self.count)

    def save_npz(self, path: str | os.PathLike) -> None:
        """Writes `mu`, `sigma` and `num_samples` atomically (pytorch-fid reads the file)."""
        self.gaussian().save_npz(path)


# ------------------------------------------------------------------------------------- FID


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) as pytorch-fid computes it."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary "
                             f"component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) = sum of sqrt(eigenvalues of sqrt(s1) s2 sqrt(s1)), which
    is symmetric positive semi-definite (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)) of means (D,) and
    covariances (D, D), in float64.

    `method="sqrtm"` follows pytorch-fid (scipy's sqrtm, eps * I added to both covariances when
    the product's root is not finite, small imaginary parts dropped, ValueError on large ones);
    `"eigh"` uses symmetric eigen-decompositions instead (no retry needed).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: means of different shapes {mu1.shape}, {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: covariances {sigma1.shape}, {sigma2.shape} do not "
                         f"match the means {mu1.shape}")
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"frechet_distance: unknown method {method!r} (sqrtm or eigh)")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_to_samples(mu1: np.ndarray, sigma1: np.ndarray, features2: Any) -> float:
    """The Frechet distance of (mu1 (D,), sigma1 (D, D)) and the Gaussian fitted to features
    (N, D) (mean and unbiased covariance), without a D x D decomposition: with C the centred
    features / sqrt(N - 1), sigma2 = C^T C, and sigma1 sigma2 has the non-zero eigenvalues of
    the symmetric (N, N) matrix C sigma1 C^T, so tr(sqrtm(sigma1 sigma2)) is the sum of the
    square roots of its eigenvalues (clipped at 0). Exact; O(N D^2), the fast path for N < D."""
    x = _as_features(features2)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 features, got {x.shape[0]}")
    mu1, sigma1 = np.asarray(mu1, np.float64), np.asarray(sigma1, np.float64)
    mu2 = x.mean(axis=0)
    c = (x - mu2) / np.sqrt(x.shape[0] - 1)
    m = c @ sigma1 @ c.T
    tr_covmean = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.sum(c * c) - 2 * tr_covmean)


def fid_from_stats(a: GaussianStats | FeatureStats, b: GaussianStats | FeatureStats,
                   **kwargs: Any) -> float:
    """The Frechet distance of two sets of statistics (kwargs: `eps`, `method`)."""
    a = a.gaussian() if isinstance(a, FeatureStats) else a
    b = b.gaussian() if isinstance(b, FeatureStats) else b
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, **kwargs)


# ------------------------------------------------------------------------------------- KID


class FeatureBank:
    """Keeps the first `max_samples` features (N, D) of a stream, for KID; later ones are
    counted (`seen`) but dropped. Memory: max_samples * D values of the features' dtype."""

    def __init__(self, max_samples: int) -> None:
        if max_samples < 1:
            raise ValueError(f"FeatureBank: max_samples must be positive, got {max_samples}")
        self.max_samples, self.seen = max_samples, 0
        self._chunks: list[np.ndarray] = []
        self._kept = 0

    def update(self, features: Any) -> None:
        """Adds a batch (B, D), keeping what fits under max_samples."""
        x = np.asarray(jax.device_get(features))
        if x.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {x.shape}")
        self.seen += x.shape[0]
        room = self.max_samples - self._kept
        if room > 0 and x.shape[0]:
            self._chunks.append(np.array(x[:room]))
            self._kept += min(room, x.shape[0])

    @property
    def features(self) -> np.ndarray:
        """The kept features (min(seen, max_samples), D)."""
        if not self._chunks:
            raise ValueError("FeatureBank: no features yet")
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0]


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """(x @ y.T * gamma + coef0) ** degree of (N, D) and (M, D) -> (N, M); gamma 1 / D."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """The unbiased MMD^2 estimate from (m, m) kernel matrices: the XX and YY means without
    their diagonals, minus twice the XY mean (diagonal included), as torch-fidelity."""
    m = k_xx.shape[0]
    xx = k_xx.sum() - np.trace(k_xx)
    yy = k_yy.sum() - np.trace(k_yy)
    return float((xx + yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(feats_real: Any, feats_fake: Any, num_subsets: int = 100,
                              subset_size: int = 1000, degree: int = 3,
                              gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets) of features (N, D) and (M, D).

    Each of `num_subsets` subsets draws `subset_size` real and fake features without replacement
    (np.random.RandomState(seed), as torch-fidelity); subset_size is capped at min(N, M). The
    standard deviation has ddof=0 (torch-fidelity's np.std, torchmetrics' unbiased=False).
    """
    real, fake = _as_features(feats_real), _as_features(feats_fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"KID: feature dimensions differ ({real.shape[1]} != {fake.shape[1]})")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 real and 2 fake features, got {real.shape[0]} "
                         f"and {fake.shape[0]}")
    rng = np.random.RandomState(seed)
    kernel = lambda a, b: polynomial_kernel(a, b, degree, gamma, coef0)
    mmds = np.zeros(num_subsets)
    for i in range(num_subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        mmds[i] = mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y))
    return float(np.mean(mmds)), float(np.std(mmds))


# ------------------------------------------------------------------------------- patch FID


def crop_positions(rng: int | np.random.Generator | jax.Array, image_shape: tuple[int, int],
                   num_crops: int, crop_size: int) -> np.ndarray | jax.Array:
    """(num_crops, 2) int (top, left) corners of uniform random crop_size x crop_size crops of
    an (H, W) image, as torchvision's RandomCrop.get_params: top in [0, H - crop_size].

    `rng`: a seed or numpy Generator (numpy result) or a jax PRNG key (jax result, jit-able).
    For a batch of B images draw B * num_crops and reshape to (B, num_crops, 2), image-major
    as the reference does; use the same positions for the real and the generated images.
    """
    h, w = image_shape
    if crop_size < 1 or crop_size > h or crop_size > w:
        raise ValueError(f"crop size {crop_size}x{crop_size} does not fit the image size {h}x{w}")
    high = np.array([h - crop_size + 1, w - crop_size + 1])
    if isinstance(rng, jax.Array):
        return jax.random.randint(rng, (num_crops, 2), 0, jnp.asarray(high))
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    return rng.integers(0, high, size=(num_crops, 2))


def extract_crops(images: Any, positions: Any, crop_size: int) -> Any:
    """Crops (B, H, W, C) images at (B, K, 2) (top, left) positions -> (B * K, S, S, C), image-
    major (image b's crops are rows b * K ... b * K + K - 1).

    numpy inputs are cropped with numpy; otherwise jax (vmapped dynamic_slice, jit-able).
    """
    if isinstance(images, np.ndarray) and isinstance(positions, np.ndarray):
        return _extract_crops_numpy(images, positions, crop_size)
    return _extract_crops_jax(jnp.asarray(images), jnp.asarray(positions), crop_size)


def _extract_crops_numpy(images: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
    b, k = positions.shape[:2]
    pos = positions.reshape(b * k, 2)
    rows = pos[:, 0, None] + np.arange(size)             # (B*K, S)
    cols = pos[:, 1, None] + np.arange(size)
    index = np.repeat(np.arange(b), k)[:, None, None]
    return images[index, rows[:, :, None], cols[:, None, :]]


def _extract_crops_jax(images: jax.Array, positions: jax.Array, size: int) -> jax.Array:
    channels = images.shape[-1]
    crop = lambda image, p: jax.lax.dynamic_slice(image, (p[0], p[1], 0), (size, size, channels))
    crops = jax.vmap(jax.vmap(crop, in_axes=(None, 0)))(images, positions)   # (B, K, S, S, C)
    return crops.reshape((-1, size, size, channels))


# ---------------------------------------------------------------------------------- driver


def quantize_uint8(images: Any) -> Any:
    """Images in [0, 1] to the uint8 levels the reference scores (its `un_normalize_ims`
    truncates x * 127.5 + 127.5 on [-1, 1]), back in [0, 1]; idempotent on exact levels."""
    xp = np if isinstance(images, np.ndarray) else jnp
    return xp.floor(xp.clip(images * 255.0, 0.0, 255.0) + 1e-3) / 255.0


class FIDAccumulator:
    """FID, KID and p-FID of generated images against real ones, batch by batch.

    `feature_fn(images (B, H, W, 3) in [0, 1]) -> (B, D)` (e.g. Inception pool features).
    Only statistics are kept, plus at most `kid_max_samples` features per set for KID (0: no
    KID). With `num_crops > 0`, p-FID scores `num_crops` random `crop_size` crops per image, at
    the same positions in the real and the generated image (drawn from `crop_seed`).
    `reference`: real-set statistics (GaussianStats or an `.npz` path) for FID, so the real
    images are needed only for KID and p-FID. `quantize`: score the reference's uint8 levels.
    """

    def __init__(self, feature_fn: FeatureFn, *, reference: GaussianStats | str | os.PathLike
                 | None = None, kid_max_samples: int = 0, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, num_crops: int = 0, crop_size: int = 0,
                 crop_seed: int = 0, quantize: bool = True) -> None:
        self.feature_fn, self.quantize = feature_fn, quantize
        if reference is not None and not isinstance(reference, GaussianStats):
            reference = load_npz(reference)
        self.reference = reference
        self.real, self.fake = FeatureStats(), FeatureStats()
        self.kid = (FeatureBank(kid_max_samples), FeatureBank(kid_max_samples)) \
            if kid_max_samples else None
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.num_crops, self.crop_size = num_crops, crop_size
        self.patch = (FeatureStats(), FeatureStats()) if num_crops else None
        self._crop_rng = np.random.default_rng(crop_seed)

    @property
    def needs_real(self) -> bool:
        """Whether update() needs the real images (no reference statistics, KID or p-FID)."""
        return self.reference is None or self.kid is not None or self.patch is not None

    def _features(self, images: Any) -> np.ndarray:
        images = quantize_uint8(images) if self.quantize else images
        return _as_features(self.feature_fn(images))

    def update(self, fake: Any, real: Any | None = None) -> None:
        """Adds generated images (B, H, W, 3) in [0, 1] and, when needed, the real ones."""
        if real is None and self.needs_real:
            what = [n for n, on in (("FID without reference statistics", self.reference is None),
                                    ("KID", self.kid is not None),
                                    ("p-FID", self.patch is not None)) if on]
            raise ValueError(f"FIDAccumulator: {', '.join(what)} need the real images; "
                             "reference statistics from a file serve FID only")
        fake_feats = self._features(fake)
        self.fake.update(fake_feats)
        if self.reference is None or self.kid is not None:
            real_feats = self._features(real)
        if self.reference is None:
            self.real.update(real_feats)
        if self.kid is not None:
            self.kid[0].update(real_feats.astype(np.float32))
            self.kid[1].update(fake_feats.astype(np.float32))
        if self.patch is not None:
            self._update_patches(real, fake)

    def _update_patches(self, real: Any, fake: Any) -> None:
        if real.shape != fake.shape:
            raise ValueError(f"p-FID: real {real.shape} and fake {fake.shape} images differ")
        b, h, w = real.shape[:3]
        pos = crop_positions(self._crop_rng, (h, w), b * self.num_crops, self.crop_size)
        pos = pos.reshape(b, self.num_crops, 2)
        for stats, images in zip(self.patch, (real, fake)):
            stats.update(self._features(extract_crops(images, pos, self.crop_size)))

    def results(self) -> dict[str, float]:
        """{"fid", "kid_mean", "kid_std", "pfid"}: those enabled."""
        real = self.real if self.reference is None else self.reference
        out = {"fid": fid_from_stats(real, self.fake)}
        if self.kid is not None:
            out["kid_mean"], out["kid_std"] = kernel_inception_distance(
                self.kid[0].features, self.kid[1].features, self.kid_subsets,
                self.kid_subset_size)
        if self.patch is not None:
            out["pfid"] = fid_from_stats(*self.patch)
        return out
