"""A PyTorch oracle of the FID Inception-v3: pytorch-fid's `fid_inception_v3()` (torchvision's
`Inception3` with 1008 classes, no AuxLogits, and the FID blocks) and the input handling of
`InceptionV3([3], resize_input=True, normalize_input=True)`, written out here because neither
torchvision nor pytorch-fid can be imported in the tests. Module names, hence state-dict keys,
are theirs. `randomized_inception` gives it random weights under which activations stay O(1)
through all 94 conv + BN layers."""

from __future__ import annotations

import numpy as np
import skimage.data
import skimage.transform
import torch
import torch.nn.functional as F
from torch import nn


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    """The FID blocks' pool branch: padded zeros do not count in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7, row, col = channels_7x7, dict(kernel_size=(1, 7), padding=(0, 3)), \
            dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """FIDInceptionE_1 with `max_pool=False` (Mixed_7b), FIDInceptionE_2 with True (Mixed_7c)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else _tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInception3(nn.Module):
    """`fid_inception_v3()`'s modules; `forward` is `InceptionV3([3])`'s: images (B, 3, H, W) in
    [0, 1] -> pool3 features (B, 2048)."""

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, num_classes)

    def network(self, x):
        """Network input (B, 3, H, W) in [-1, 1] -> (B, 2048)."""
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
                     "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(self, name)(x)
        return torch.flatten(x, 1)

    def forward(self, images):
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.network(2 * x - 1)


def conv_bn_layers(model: nn.Module) -> list[BasicConv2d]:
    return [m for m in model.modules() if isinstance(m, BasicConv2d)]


@torch.no_grad()
def randomized_inception(seed: int = 0) -> FIDInception3:
    """The oracle in eval mode with random weights that keep activations O(1).

    Convs get He-normal weights, BatchNorms affine params near identity; the running statistics
    are measured on two other photos (a train-mode pass with cumulative averaging), so BN outputs
    on photos are about unit scale, then perturbed so that none is exactly the measured one.
    """
    g = torch.Generator().manual_seed(seed)
    model = FIDInception3()
    for layer in conv_bn_layers(model):
        w = layer.conv.weight
        w.copy_(torch.randn(w.shape, generator=g) * (2.0 / w[0].numel()) ** 0.5)
        c = w.shape[0]
        layer.bn.weight.copy_(1.0 + 0.2 * (torch.rand(c, generator=g) - 0.5))
        layer.bn.bias.copy_(0.1 * torch.randn(c, generator=g))
        layer.bn.reset_running_stats()
        layer.bn.momentum = None                # running stats = the batch's, after one pass
    model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=g) / 2048 ** 0.5)
    model.fc.bias.copy_(0.1 * torch.randn(model.fc.bias.shape, generator=g))
    model.train()
    model(torch.from_numpy(calibration_photos().transpose(0, 3, 1, 2).copy()))
    model.eval()
    for layer in conv_bn_layers(model):
        bn, c = layer.bn, layer.bn.num_features
        bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn(c, generator=g))
        bn.running_var.mul_(1.0 + 0.2 * (torch.rand(c, generator=g) - 0.5))
        bn.momentum = 0.1
    return model


def torch_features(model: FIDInception3, images: np.ndarray) -> np.ndarray:
    """Images (B, H, W, 3) in [0, 1] -> the oracle's pool3 features (B, 2048)."""
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def calibration_photos() -> np.ndarray:
    """(2, 299, 299, 3) in [0, 1]: the cat and the rocket, which the parity tests do not use."""
    out = [skimage.transform.resize(im, (299, 299), anti_aliasing=True)
           for im in (skimage.data.chelsea(), skimage.data.rocket())]
    return np.stack(out).astype(np.float32)


def photos(size: tuple[int, int]) -> np.ndarray:
    """(2, H, W, 3) float32 in [0, 1]: the astronaut and the coffee cup, resized (antialiased)."""
    out = [skimage.transform.resize(im, size, anti_aliasing=True)
           for im in (skimage.data.astronaut(), skimage.data.coffee())]
    return np.stack(out).astype(np.float32)
