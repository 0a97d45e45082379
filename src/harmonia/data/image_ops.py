"""Image degradations that make the visual modality of AV-Digits weaker on purpose."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from harmonia.extras import require


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [N, H, W] images to [N, size, size]."""
    t = torch.from_numpy(images.astype(np.float32))[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool by ``factor`` then upsample back (nearest): a loss of resolution, same shape."""
    if factor <= 1:
        return images
    t = torch.from_numpy(images)[:, None]
    small = F.avg_pool2d(t, factor, ceil_mode=True)
    return F.interpolate(small, size=images.shape[-2:], mode="nearest")[:, 0].numpy()


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return images
    gaussian_filter = require("scipy.ndimage", "blurring images").gaussian_filter
    return np.stack([gaussian_filter(img, sigma=sigma, mode="constant") for img in images]).astype(np.float32)


def occlude(images: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Black out a square of side ``fraction``·H at a uniformly random position in each image."""
    if fraction <= 0:
        return images
    out = images.copy()
    n, h, w = images.shape
    side = max(1, int(round(fraction * h)))
    tops = rng.integers(0, h - side + 1, size=n)
    lefts = rng.integers(0, w - side + 1, size=n)
    for i in range(n):
        out[i, tops[i] : tops[i] + side, lefts[i] : lefts[i] + side] = 0.0
    return out


def add_pixel_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    if std <= 0:
        return images
    return (images + rng.normal(0.0, std, size=images.shape)).astype(np.float32)
