"""The FID Inception-v3 (pytorch-fid's `fid_inception_v3()`) as a Flax linen module, NHWC.

The network is torchvision's `Inception3` (1008 classes, no auxiliary classifier) with the blocks
pytorch-fid patches to reproduce TensorFlow's FID graph (`inception-2015-12-05`):

    stem:   Conv2d_1a_3x3 (stride 2), Conv2d_2a_3x3, Conv2d_2b_3x3 (pad 1), max-pool 3/2,
            Conv2d_3b_1x1, Conv2d_4a_3x3, max-pool 3/2                     (B, 35, 35, 192)
    35x35:  Mixed_5b, Mixed_5c, Mixed_5d (InceptionA; the pool branch averages without the
            padded zeros), Mixed_6a (InceptionB, stride 2)                  (B, 17, 17, 768)
    17x17:  Mixed_6b..Mixed_6e (InceptionC, same pool branch), Mixed_7a (InceptionD)
    8x8:    Mixed_7b (InceptionE, average pool without padded zeros), Mixed_7c (InceptionE with a
            3x3 max-pool in the pool branch), global average pool          (B, 2048) "pool3"
    fc:     Dense 2048 -> 1008 (the logits; not used by FID)

Every convolution is a `BasicConv2d`: conv without bias, BatchNorm (eps 1e-3, running
statistics only) and ReLU. Module names are torchvision's (`Mixed_5b/branch5x5_2/conv/kernel`
for `Mixed_5b.branch5x5_2.conv.weight`), which `fmboost_jax.convert.inception` relies on.

Variables are `{"params": ..., "batch_stats": ...}` (BatchNorm `mean`/`var` live in
"batch_stats"). `pool_features(variables, images)` takes images (B, H, W, 3) in [0, 1] as
pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)` does: a bilinear resize to
299x299 exactly as `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing), then
`2x - 1`. Images in [-1, 1] go in as `(x + 1) / 2`. Everything is float32; convolutions run at
`Precision.HIGHEST` by default so that GPUs and TPUs do not fall back to TF32 / bfloat16 passes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmboost_jax import paths
from fmboost_jax.errors import UserError

Array = jax.Array
Variables = dict[str, Any]          # {"params": ..., "batch_stats": ...}
Pair = int | tuple[int, int]

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURES = 2048
BN_EPS = 1e-3
PARAMS, BATCH_STATS = "params", "batch_stats"
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU, torchvision's padding."""
    features: int
    kernel_size: Pair
    strides: int = 1
    padding: Pair = 0
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=(self.strides, self.strides),
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def max_pool_3x3(x: Array, strides: int = 2, padding: int = 0) -> Array:
    """3x3 max-pool (B, H, W, C); padding counts as -inf as in torch."""
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=pad)


def avg_pool_3x3(x: Array) -> Array:
    """3x3 stride-1 average pool, zero padding 1 left out of the mean (count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class _Block(nn.Module):
    """A mixed block: `conv(name, features, kernel, ...)` builds its named BasicConv2d layers."""
    precision: Any = DEFAULT_PRECISION

    def conv(self, name: str, features: int, kernel: Pair, strides: int = 1,
             padding: Pair = 0) -> BasicConv2d:
        return BasicConv2d(features, kernel, strides, padding, self.precision, name=name)

    def chain(self, x: Array, *layers: tuple) -> Array:
        """Applies `conv(*layer)` for each layer in order."""
        for layer in layers:
            x = self.conv(*layer)(x)
        return x


class InceptionA(_Block):
    """35x35 block (FIDInceptionA): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features."""
    pool_features: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.chain(x, ("branch5x5_1", 48, 1), ("branch5x5_2", 64, 5, 1, 2))
        b3 = self.chain(x, ("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, 3, 1, 1),
                        ("branch3x3dbl_3", 96, 3, 1, 1))
        bp = self.conv("branch_pool", self.pool_features, 1)(avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """35x35 -> 17x17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + C channels."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = self.conv("branch3x3", 384, 3, 2)(x)
        bd = self.chain(x, ("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, 3, 1, 1),
                        ("branch3x3dbl_3", 96, 3, 2))
        return jnp.concatenate([b3, bd, max_pool_3x3(x)], axis=-1)


class InceptionC(_Block):
    """17x17 block (FIDInceptionC): 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | avgpool-1x1 -> 768."""
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))   # (kernel, padding) of the factorised 7x7
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.chain(x, ("branch7x7_1", c7, 1), ("branch7x7_2", c7, row[0], 1, row[1]),
                        ("branch7x7_3", 192, col[0], 1, col[1]))
        bd = self.chain(x, ("branch7x7dbl_1", c7, 1), ("branch7x7dbl_2", c7, col[0], 1, col[1]),
                        ("branch7x7dbl_3", c7, row[0], 1, row[1]),
                        ("branch7x7dbl_4", c7, col[0], 1, col[1]),
                        ("branch7x7dbl_5", 192, row[0], 1, row[1]))
        bp = self.conv("branch_pool", 192, 1)(avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """17x17 -> 8x8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + C channels."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = self.chain(x, ("branch3x3_1", 192, 1), ("branch3x3_2", 320, 3, 2))
        b7 = self.chain(x, ("branch7x7x3_1", 192, 1), ("branch7x7x3_2", 192, (1, 7), 1, (0, 3)),
                        ("branch7x7x3_3", 192, (7, 1), 1, (3, 0)), ("branch7x7x3_4", 192, 3, 2))
        return jnp.concatenate([b3, b7, max_pool_3x3(x)], axis=-1)


class InceptionE(_Block):
    """8x8 block -> 2048: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    `pool="avg"` is FIDInceptionE_1 (Mixed_7b, average without padded zeros), `pool="max"`
    FIDInceptionE_2 (Mixed_7c, 3x3 stride-1 max-pool).
    """
    pool: str = "avg"

    def split(self, x: Array, name: str) -> Array:
        """The (1, 3) and (3, 1) convs `{name}a`, `{name}b` on `x`, concatenated -> 768."""
        a = self.conv(name + "a", 384, (1, 3), 1, (0, 1))(x)
        b = self.conv(name + "b", 384, (3, 1), 1, (1, 0))(x)
        return jnp.concatenate([a, b], axis=-1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.split(self.conv("branch3x3_1", 384, 1)(x), "branch3x3_2")
        bd = self.chain(x, ("branch3x3dbl_1", 448, 1), ("branch3x3dbl_2", 384, 3, 1, 1))
        bd = self.split(bd, "branch3x3dbl_3")
        pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool_3x3(x, strides=1, padding=1)
        bp = self.conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 on network inputs (B, H, W, 3) in [-1, 1] (299x299 for FID).

    `__call__(x)` -> pool3 features (B, 2048); `__call__(x, logits=True)` -> the 1008 logits
    (B, 1008) of the fc layer (initialise with `logits=True` to create every parameter).
    """
    num_classes: int = NUM_CLASSES
    precision: Any = DEFAULT_PRECISION

    def stem(self, x: Array) -> Array:
        """(B, 299, 299, 3) -> (B, 35, 35, 192)."""
        conv = lambda name, c, k, s=1, p=0: BasicConv2d(c, k, s, p, self.precision, name=name)
        x = conv("Conv2d_2b_3x3", 64, 3, 1, 1)(conv("Conv2d_2a_3x3", 32, 3)(
            conv("Conv2d_1a_3x3", 32, 3, 2)(x)))
        x = max_pool_3x3(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(conv("Conv2d_3b_1x1", 80, 1)(x))
        return max_pool_3x3(x)

    def mixed(self, x: Array) -> Array:
        """(B, 35, 35, 192) -> (B, 8, 8, 2048) through Mixed_5b .. Mixed_7c."""
        p = self.precision
        blocks = [InceptionA(p, 32, name="Mixed_5b"), InceptionA(p, 64, name="Mixed_5c"),
                  InceptionA(p, 64, name="Mixed_5d"), InceptionB(p, name="Mixed_6a"),
                  InceptionC(p, 128, name="Mixed_6b"), InceptionC(p, 160, name="Mixed_6c"),
                  InceptionC(p, 160, name="Mixed_6d"), InceptionC(p, 192, name="Mixed_6e"),
                  InceptionD(p, name="Mixed_7a"), InceptionE(p, "avg", name="Mixed_7b"),
                  InceptionE(p, "max", name="Mixed_7c")]
        for block in blocks:
            x = block(x)
        return x

    @nn.compact
    def __call__(self, x: Array, logits: bool = False) -> Array:
        features = jnp.mean(self.mixed(self.stem(x.astype(jnp.float32))), axis=(1, 2))
        if not logits:
            return features
        return nn.Dense(self.num_classes, precision=self.precision, name="fc")(features)


# ------------------------------------------------------------------------ input handling
@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's 1-D bilinear resize, align_corners=False.

    Output pixel o samples the input at `(o + 0.5) * in/out - 0.5`, clamped below at 0, between
    its floor and the next pixel (the last pixel repeats); no antialiasing when shrinking. The
    arithmetic is torch's: a float32 scale and a fused multiply-add rounded once to float32
    (the exact product is formed in float64), so the weights equal torch's bit for bit.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = np.minimum(i0 + 1, in_size - 1)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, i0), np.float32(1.0) - lam)
    np.add.at(weights, (rows, i1), lam)
    weights.setflags(write=False)       # shared by the cache
    return weights


def resize_bilinear(images: Array, size: Sequence[int] = (INPUT_SIZE, INPUT_SIZE)) -> Array:
    """(B, H, W, C) -> (B, size[0], size[1], C) float32, as torch's `F.interpolate(x, size,
    mode="bilinear", align_corners=False)` (separable; the weight matrices are static)."""
    x = jnp.asarray(images, jnp.float32)
    rows = jnp.asarray(bilinear_matrix(x.shape[1], size[0]))
    cols = jnp.asarray(bilinear_matrix(x.shape[2], size[1]))
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=jax.lax.Precision.HIGHEST)


def preprocess(images: Array) -> Array:
    """Images (B, H, W, 3) in [0, 1] -> network input (B, 299, 299, 3) in [-1, 1]."""
    return 2.0 * resize_bilinear(images) - 1.0


def pool_features(variables: Variables, images: Array,
                  model: InceptionV3 | None = None) -> Array:
    """FID features: images (B, H, W, 3) in [0, 1] (any size) -> pool3 (B, 2048) float32.

    `variables` is `{"params", "batch_stats"}` from `load_inception` (or `init_variables`).
    Pure and jit-friendly: `jax.jit(pool_features)(variables, images)` (one program per input
    shape). Images in [-1, 1] go in as `(images + 1) / 2`.
    """
    model = model or InceptionV3()
    return model.apply(variables, preprocess(images))


def logits(variables: Variables, images: Array, model: InceptionV3 | None = None) -> Array:
    """Images (B, H, W, 3) in [0, 1] -> the 1008 class logits (B, 1008) float32."""
    model = model or InceptionV3()
    return model.apply(variables, preprocess(images), logits=True)


# ------------------------------------------------------------------------ variables
def variable_shapes(model: InceptionV3 | None = None) -> Variables:
    """`{"params", "batch_stats"}` as trees of `jax.ShapeDtypeStruct` (nothing is computed)."""
    model = model or InceptionV3()
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return dict(jax.eval_shape(functools.partial(model.init, logits=True), jax.random.key(0), x))


def init_variables(rng: jax.Array, model: InceptionV3 | None = None) -> Variables:
    """Random `{"params", "batch_stats"}` for runs without the real weights: kernels normal with
    variance 1 / fan-in (the scale of Flax's default LeCun init), zero biases, unit BatchNorm
    scales and identity statistics. Drawn with NumPy from `rng`'s bits, off the shapes alone:
    `model.init` would compile the whole network (9 s on a CPU) to make them."""
    draw = np.random.default_rng(np.asarray(jax.random.bits(rng, (4,), jnp.uint32)))

    def leaf(path: tuple[Any, ...], s: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return jnp.asarray(draw.standard_normal(s.shape, np.float32) / np.sqrt(fan_in))
        return jnp.ones(s.shape, s.dtype) if name in ("scale", "var") else jnp.zeros(s.shape, s.dtype)
    return dict(jax.tree_util.tree_map_with_path(leaf, variable_shapes(model)))


def missing_checkpoint_message(path: str) -> str:
    """Why the Inception checkpoint `path` cannot be used and how to make one."""
    where = f"{path!r} does not exist" if path else "is empty"
    return (f"{where}: FID needs the Inception-v3 weights. Convert pytorch-fid's "
            "`pt_inception-2015-12-05-6726825d.pth` with\n"
            "    python -m fmboost_jax.convert inception --src FILE --dst DIR")


def load_inception(path: str) -> Variables:
    """`{"params", "batch_stats"}` from an Orbax directory written by `convert inception`."""
    import orbax.checkpoint as ocp
    if not path or not paths.exists(path):
        raise FileNotFoundError("Inception checkpoint " + missing_checkpoint_message(path))
    try:
        return dict(ocp.StandardCheckpointer().restore(paths.resolve(path), variable_shapes()))
    except Exception as err:
        raise UserError(f"{path!r} does not hold the FID Inception-v3 variables: "
                         f"{type(err).__name__}: {str(err).strip()[:500]}") from err
