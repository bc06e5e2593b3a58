"""Pixel conventions: models see float images in [-1, 1], (C, H, W); files hold uint8 RGB, fitted to the
dataset's size once, by one filter."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows the image: EXIF rotation applied, 16-bit grey scaled (not clipped) to
    8 bits, transparency composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, "white")
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def fit(image: Image.Image, size: int) -> Image.Image:
    """8-bit RGB, centre-cropped to a square, resized to size × size with PIL bicubic."""
    image = to_rgb(image)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1]; other modes than RGB through to_rgb (RGB as stored in
    shards is taken as it is: reading them for training skips the EXIF look-up)."""
    array = np.asarray(image if image.mode == "RGB" else to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [-1, 1] -> (B, H, W, 3) uint8, clipped."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()
