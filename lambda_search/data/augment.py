"""Batched augmentation on the training device: whole batches, random numbers from one
``torch.Generator`` on that device, no per-sample Python and no host sync."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import ImageData

__all__ = ["random_crop_flip", "random_resized_crop", "center_crop", "normalize", "train_batch", "eval_batch"]


def random_crop_flip(x: Tensor, pad: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Zero-pad ``pad`` pixels, crop back to H x W at a random offset, flip half of the images."""
    n, c, h, w = x.shape
    device = x.device
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=device)
        rows = dy + torch.arange(h, device=device).view(1, h, 1)
        cols = dx + torch.arange(w, device=device).view(1, 1, w)
        batch = torch.arange(n, device=device).view(n, 1, 1)
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, 1, 1, 1, generator=generator, device=device) < 0.5
        x = torch.where(mask, x.flip(3), x)
    return x


def random_resized_crop(x: Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        flip: bool, generator: torch.Generator) -> Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize it
    (bilinear) to ``size`` x ``size``; flip half. Returns float values on the 0-255 scale.
    Where a drawn box does not fit, its sides are clipped to the image (torchvision retries)."""
    n, _, h, w = x.shape
    device = x.device
    u = torch.rand(n, 4, generator=generator, device=device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    bw = torch.sqrt(area * aspect).clamp(max=1.0)  # box size as a fraction of the width
    bh = torch.sqrt(area / aspect).clamp(max=1.0)
    left = (1 - bw) * u[:, 2]
    top = (1 - bh) * u[:, 3]
    sx = bw
    if flip:
        sign = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
        sx = bw * sign
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = 2 * left + bw - 1
    theta[:, 1, 1] = bh
    theta[:, 1, 2] = 2 * top + bh - 1
    grid = F.affine_grid(theta, (n, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def center_crop(x: Tensor, size: int) -> Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (or 0-255 float) -> float32 with zero mean and unit variance per channel."""
    # copied without waiting: a blocking copy to a GPU would stall the host every batch
    m = (torch.tensor(mean) * 255).view(1, -1, 1, 1).to(x.device, non_blocking=True)
    s = (torch.tensor(std) * 255).view(1, -1, 1, 1).to(x.device, non_blocking=True)
    return (x.float() - m) / s


def _gather(data: ImageData, index: Tensor, device: torch.device) -> Tensor:
    images = data.images
    if images.device != index.device:
        index = index.to(images.device)
    return images[index].to(device, non_blocking=True)


def train_batch(data: ImageData, index: Tensor, generator: torch.Generator, device: torch.device) -> Tensor:
    """The augmented, normalised training batch of ``index`` on ``device``."""
    x = _gather(data, index, device)
    aug = data.augmentation
    if aug.kind == "resized_crop":
        x = random_resized_crop(x, aug.size, aug.scale, aug.ratio, aug.flip, generator)
    else:
        x = random_crop_flip(x, aug.pad, aug.flip, generator)
    return normalize(x, data.mean, data.std)


def eval_batch(data: ImageData, index: Tensor, device: torch.device) -> Tensor:
    """The unaugmented, normalised batch (centre crop where the training crops resize)."""
    x = _gather(data, index, device)
    if data.augmentation.kind == "resized_crop":
        x = center_crop(x, data.augmentation.size)
    return normalize(x, data.mean, data.std)
