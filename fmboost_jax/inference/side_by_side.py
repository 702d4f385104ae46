"""A boost beside bicubic and the ground truth: what `upsample --compare/--ground_truth` writes
and prints, and what the page shows.

    truth, lowres = ground_truth(model, images)     # high-res photos -> crops and their inputs
    shown = panels(lowres, (H, W), out.images, truth)   # uint8 bicubic / CFM / ground truth
    picture = comparison({k: v[0] for k, v in shown.items()})
    scores = Scores(); scores.add(names, truth, CFM=..., bicubic=...)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from fmboost_jax.cfm.upsampling import resize
from fmboost_jax.data import images as images_lib
from fmboost_jax.errors import UserError


def ground_truth(model: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """High-res images (B, H, W, 3) in [-1, 1] -> (the centre crop of the largest size the model
    makes, its low-res input made as in training); UserError for images too small."""
    from fmboost_jax.inference.upsampler import largest_output
    h, w = largest_output(model, images.shape[1], images.shape[2])
    if not (h and w):
        raise UserError(f"a {images.shape[1]}x{images.shape[2]} image is too small for the "
                        f"model's smallest output")
    y, x = (images.shape[1] - h) // 2, (images.shape[2] - w) // 2
    truth = images[:, y:y + h, x:x + w]
    return truth, np.asarray(model.downsample(truth))


def panels(lowres: np.ndarray, size: tuple[int, int], boosted: Any, truth: Any = None
           ) -> dict[str, np.ndarray]:
    """The bicubic resize of `lowres` to `size`, the boost and (if given) the ground truth, as
    uint8 (B, H, W, 3) under the labels "bicubic", "CFM", "ground truth"."""
    shown = {"bicubic": resize(lowres, size, "bicubic"), "CFM": boosted, "ground truth": truth}
    return {k: images_lib.to_uint8(np.asarray(v).clip(-1, 1))
            for k, v in shown.items() if v is not None}


def comparison(shown: dict[str, np.ndarray]) -> np.ndarray:
    """Same-size uint8 (H, W, 3) images side by side, each labelled in its top-left corner."""
    row = Image.fromarray(np.concatenate(list(shown.values()), axis=1))
    draw = ImageDraw.Draw(row)
    for i, (label, img) in enumerate(shown.items()):
        x = i * img.shape[1]
        draw.rectangle((x, 0, x + 6 * len(label) + 6, 14), fill=(0, 0, 0))
        draw.text((x + 3, 2), label, fill=(255, 255, 255))
    return np.asarray(row)


class Scores:
    """Per-image PSNR and SSIM of several methods against the ground truth."""

    def __init__(self):
        self.rows: dict[str, dict[str, tuple[float, float]]] = {}   # name -> method -> scores

    def add(self, names: Sequence[str], truth: np.ndarray, **methods: np.ndarray) -> None:
        """Scores of each method's images (B, H, W, 3) in [-1, 1] against `truth`."""
        from fmboost_jax.evaluation import metrics
        for method, images in methods.items():
            psnr = np.asarray(metrics.psnr(images, truth))
            ssim = np.asarray(metrics.ssim(images, truth))
            for name, p, q in zip(names, psnr, ssim):
                self.rows.setdefault(name, {})[method] = (float(p), float(q))

    @staticmethod
    def line(scores: dict[str, tuple[float, float]]) -> str:
        return ", ".join(f"{m} {p:.2f} dB / SSIM {q:.3f}" for m, (p, q) in scores.items())

    def lines(self) -> list[str]:
        """One line per image, then the means."""
        means = {m: tuple(np.mean([r[m] for r in self.rows.values()], axis=0))
                 for m in next(iter(self.rows.values()), {})}
        return ([f"{name}: {self.line(scores)}" for name, scores in self.rows.items()]
                + [f"mean of {len(self.rows)} images against the ground truth: "
                   f"{self.line(means)}"])
