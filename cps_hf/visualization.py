"""Pictures of segmentation masks: one fixed palette shared by prediction PNGs, overlays, the web demo and the
figures of `tools/figures.py`, mask-to-colour and the overlay of class colours on an image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor

__all__ = [
    "IGNORE_COLOR",
    "PALETTE_SIZE",
    "colorize_mask",
    "overlay",
    "palette_indices",
    "segmentation_palette",
]

PALETTE_SIZE = 256
"""Entries of a PNG/PIL palette: class ids of a palette mask must lie in `[0, 256)`."""

IGNORE_COLOR: tuple[int, int, int] = (224, 224, 192)
"""Colour of index 255, the usual ignore label (as in the Pascal VOC ground-truth PNGs)."""


def _pascal_voc_color(index: int) -> tuple[int, int, int]:
    # The VOC devkit colour map: the bits of the index are spread, three at a time, over the high bits of R, G, B,
    # so that consecutive ids get very different colours.
    red = green = blue = 0
    for bit in range(8):
        red |= ((index >> 0) & 1) << (7 - bit)
        green |= ((index >> 1) & 1) << (7 - bit)
        blue |= ((index >> 2) & 1) << (7 - bit)
        index >>= 3
    return red, green, blue


def segmentation_palette(num_labels: int) -> list[int]:
    """The palette of every mask the project draws: the Pascal VOC colour map.

    Class `c` gets the VOC colour of index `c` (black, maroon, green, olive, navy, ...), the same colours as the
    VOC and synthetic-dataset label PNGs, so predicted and ground-truth masks look alike. Index 255 gets
    [`IGNORE_COLOR`] unless it is a class (`num_labels == 256`).

    Args:
        num_labels (`int`):
            Number of classes, at most 256 (a palette PNG holds 256 colours).

    Returns:
        `list[int]`: 768 values `[r0, g0, b0, r1, g1, b1, ...]`, one RGB triple per palette index, ready for
        `PIL.Image.Image.putpalette`.

    Raises:
        ValueError: if `num_labels` is not in `[1, 256]`.
    """
    if not 1 <= num_labels <= PALETTE_SIZE:
        raise ValueError(
            f"`num_labels` must be between 1 and {PALETTE_SIZE} (the size of a PNG palette), got {num_labels}."
        )
    colors = [_pascal_voc_color(index) for index in range(PALETTE_SIZE)]
    if num_labels < PALETTE_SIZE:
        colors[PALETTE_SIZE - 1] = IGNORE_COLOR
    return [channel for color in colors for channel in color]


def palette_indices(mask: Tensor | np.ndarray) -> np.ndarray:
    """A label map as uint8 palette indices `(height, width)`, checked to hold integer class ids in `[0, 256)`."""
    array = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"`mask` must have shape (height, width), got {array.shape}.")
    if array.dtype.kind not in "iub":
        raise ValueError(f"`mask` must hold integer class ids, got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() >= PALETTE_SIZE):
        raise ValueError(
            f"`mask` values must lie in [0, {PALETTE_SIZE}) to be stored as palette indices, got values in "
            f"[{array.min()}, {array.max()}]."
        )
    return array.astype(np.uint8)


def colorize_mask(mask: Tensor | np.ndarray, palette: Sequence[int]) -> PILImage.Image:
    """A label map as a palette image: the pixel values are the class ids, the palette gives their colours.

    Saved as PNG it is a mask file in the VOC convention (reading it back with `np.asarray` gives the class ids).

    Args:
        mask (`torch.Tensor` or `np.ndarray` of shape `(height, width)`):
            Integer class ids in `[0, 256)`.
        palette (`Sequence[int]`):
            Flat RGB palette, e.g. [`segmentation_palette`]`(num_labels)`.

    Returns:
        `PIL.Image.Image`: mode `"P"`, of the mask's size.
    """
    image = PILImage.fromarray(palette_indices(mask)).convert("P")  # mode L: values kept as indices
    image.putpalette(list(palette))
    return image


def overlay(
    image: PILImage.Image | Tensor | np.ndarray,
    mask: Tensor | np.ndarray,
    palette: Sequence[int],
    alpha: float = 0.5,
) -> PILImage.Image:
    """Blends the class colours of `mask` over `image`: `(1 - alpha) * image + alpha * colour`.

    Args:
        image (`PIL.Image.Image`, `torch.Tensor` or `np.ndarray`):
            The picture: a PIL image (any mode), a float `(3, height, width)` tensor in `[0, 1]` (as from
            [`~cps_hf.data.decode_image`]) or a uint8 `(height, width, 3)` array.
        mask (`torch.Tensor` or `np.ndarray` of shape `(height, width)`):
            Class ids in `[0, 256)`, of the image's size.
        palette (`Sequence[int]`):
            Flat RGB palette, e.g. [`segmentation_palette`]`(num_labels)`.
        alpha (`float`, *optional*, defaults to 0.5):
            Opacity of the colours, in `[0, 1]`.

    Returns:
        `PIL.Image.Image`: mode `"RGB"`, of the image's size.

    Raises:
        ValueError: if `alpha` is outside `[0, 1]` or the mask and the image differ in size.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    if isinstance(image, Tensor):
        pixels = (image.detach().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        image = PILImage.fromarray(pixels.permute(1, 2, 0).numpy())
    elif isinstance(image, np.ndarray):
        image = PILImage.fromarray(image)
    colors = colorize_mask(mask, palette).convert("RGB")
    if colors.size != image.size:
        raise ValueError(
            f"`mask` of size (width, height) = {colors.size} does not match the image of size {image.size}."
        )
    return PILImage.blend(image.convert("RGB"), colors, alpha)
