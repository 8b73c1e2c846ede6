"""Batched image ops on uint8/float tensors of shape (N, C, H, W).

They run after the batch has been moved to its device (see
`TensorImageDataModule.on_after_batch_transfer`), so on a GPU the augmentation costs
almost nothing and on a CPU it is still far cheaper than PIL image by image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_flip_lr(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a random half of the images left-right (each image with probability 0.5)."""
    flip = torch.rand(images.shape[0], generator=generator, device="cpu") < 0.5
    flip = flip.to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def batch_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of the original size from each image zero-padded by `padding` pixels.

    Same distribution as torchvision's `RandomCrop(size, padding=padding)`: every offset
    in [0, 2 * padding] is equally likely, independently along each axis.
    """
    if padding <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device="cpu").to(images.device)
    # Two gathers (rows, then columns) are about 2x faster than one 3-D advanced index.
    rows = shifts[0].view(n, 1, 1, 1) + torch.arange(h, device=images.device).view(1, 1, h, 1)
    window_rows = padded.gather(2, rows.expand(n, c, h, padded.shape[-1]))
    cols = shifts[1].view(n, 1, 1, 1) + torch.arange(w, device=images.device).view(1, 1, 1, w)
    return window_rows.gather(3, cols.expand(n, c, h, w))


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [0, 255] (or float [0, 1]) images -> float32 standardized per channel."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    if images.dtype == torch.uint8:
        # Fold the /255 into the constants: one pass over the data instead of two.
        return (images.float() - mean_t * 255.0) / (std_t * 255.0)
    return (images - mean_t) / std_t


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float images to size x size (no-op when already that size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    # CPU bilinear upsampling is about 2x faster in channels-last layout; convolutions take
    # either layout, so the result stays channels-last (values are the same).
    images = images.contiguous(memory_format=torch.channels_last)
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def eval_transform(images: torch.Tensor, mean, std, size: int) -> torch.Tensor:
    """What an image goes through at evaluation (no augmentation): normalize, then resize to `size`.

    The one definition for validation/test batches and for a trained model's new images
    (`transferlab.models.trained.Preprocess`: prediction and exported models).
    """
    return resize(normalize(images, mean, std), size)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of a uint8 image tensor (N, C, H, W)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())
