"""Batch preprocessing on the device: uint8 -> normalised float, with random crop and flip when training."""

from __future__ import annotations

import torch


class BatchTransform:
    """uint8 batch -> normalised float batch, with random crop (zero padding) and flips when training."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, crop_pad: int = 0, flip: bool = False):
        self.mean = mean.view(1, -1, 1, 1).float()
        self.std = std.view(1, -1, 1, 1).float()
        self.crop_pad, self.flip = int(crop_pad), bool(flip)

    @property
    def augments(self) -> bool:
        return self.crop_pad > 0 or self.flip

    def to(self, device: torch.device) -> BatchTransform:
        return BatchTransform(self.mean.to(device), self.std.to(device), self.crop_pad, self.flip)

    def __call__(
        self, images: torch.Tensor, train: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if train and self.augments:
            images = augment(images, self.crop_pad, self.flip, generator)
        return (images.float().div_(255) - self.mean) / self.std


def augment(images: torch.Tensor, crop_pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched random crop after zero padding by ``crop_pad`` and random horizontal flip, per sample."""
    n, _, h, w = images.shape
    dev = images.device
    if crop_pad > 0:
        padded = torch.nn.functional.pad(images, (crop_pad,) * 4)
        dy = torch.randint(0, 2 * crop_pad + 1, (n, 1), generator=generator).to(dev)
        dx = torch.randint(0, 2 * crop_pad + 1, (n, 1), generator=generator).to(dev)
        rows = (torch.arange(h, device=dev) + dy)[:, None, :, None].expand(n, images.shape[1], h, w + 2 * crop_pad)
        images = padded.gather(2, rows)
        cols = (torch.arange(w, device=dev) + dx)[:, None, None, :].expand(n, images.shape[1], h, w)
        images = images.gather(3, cols)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(dev)
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = images.float().div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(1), x.std(1).clamp_min(1e-3)
