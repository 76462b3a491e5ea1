"""Pictures people look at: sample tensors in [0, 1] to PIL images and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8 on the CPU."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(images: torch.Tensor, nrow: int | None = None, scale: int = 1, padding: int = 1):
    """Tile (B, C, H, W) images in [0, 1] into one PIL image, ``nrow`` per row, upscaled ``scale``×."""
    from PIL import Image

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    nrow = nrow or math.ceil(math.sqrt(batch))
    rows = math.ceil(batch / nrow)
    pixels = to_uint8(images)
    cell_h, cell_w = height + padding, width + padding
    grid = torch.full((rows * cell_h + padding, nrow * cell_w + padding, channels), 255, dtype=torch.uint8)
    for i in range(batch):
        top, left = padding + (i // nrow) * cell_h, padding + (i % nrow) * cell_w
        grid[top:top + height, left:left + width] = pixels[i]
    picture = Image.fromarray(grid.squeeze(-1).numpy() if channels == 1 else grid.numpy())
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write ``image_grid(images, nrow, scale)`` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=nrow, scale=scale).save(path)
    return path
