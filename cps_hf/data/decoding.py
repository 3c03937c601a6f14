"""Decoding and validation of stored images and label masks.

Images are decoded to RGB whatever their mode (greyscale, palette, RGBA, 16-bit); masks are decoded to int64 class
ids *without* palette remapping (a palette PNG's indices are the class ids, as in Pascal VOC).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor

IGNORE_INDEX = 255
"""Label value of pixels that losses and metrics ignore (unlabelled, object borders, padding)."""
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes read as images (by the converters, and to recognise file names in split lists)."""
MASK_MODES: tuple[str, ...] = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")
"""The single-channel PIL modes read as masks of class ids: palette (its indices), 8-bit, 1-bit, 32-bit and
16-bit integers."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UndecodableSampleError(ValueError):
    """An image or mask whose stored bytes (or file) cannot be decoded; the message names the sample."""


def open_image_value(value: Any, sample_name: str, what: str) -> PILImage.Image | np.ndarray:
    """A loaded PIL image (or an array as given) for a `datasets.Image` value, a path, encoded bytes or a PIL image.

    Raises:
        UndecodableSampleError: naming `what` (`"image"`, `"label mask"`) of `sample_name`, if it cannot be decoded.
    """
    if isinstance(value, PILImage.Image | np.ndarray):
        return value
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, list):  # e.g. an `Array2D`/`Sequence` column
        return np.asarray(value)
    try:
        if isinstance(value, Mapping):
            if value.get("bytes") is not None:
                image = PILImage.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = PILImage.open(value["path"])
            else:
                raise ValueError("neither bytes nor path")
        elif isinstance(value, str | os.PathLike):
            image = PILImage.open(value)
        elif isinstance(value, bytes):
            image = PILImage.open(io.BytesIO(value))
        else:
            raise TypeError(f"unsupported value of type {type(value).__name__}")
        image.load()
    except Exception as error:
        reason = str(error)
        if isinstance(error, PILImage.UnidentifiedImageError) and "BytesIO" in reason:
            # PIL names the in-memory buffer object, which says nothing; show what the bytes start with instead.
            encoded = value["bytes"] if isinstance(value, Mapping) else value
            reason = f"not a known image format ({len(encoded)} bytes starting with {encoded[:12]!r})"
        raise UndecodableSampleError(f"Could not decode the {what} of {sample_name}: {reason}") from error
    return image


def _scale_to_unit_range(pixels: Tensor, sample_name: str) -> Tensor:
    """uint8 / uint16 pixels to float32 in [0, 1]; floating-point pixels are taken to be in [0, 1] already."""
    if pixels.dtype == torch.uint8:
        return pixels.float() / 255.0
    if pixels.dtype == torch.uint16:
        return pixels.float() / 65535.0
    if pixels.is_floating_point():
        return pixels.float()
    raise ValueError(
        f"Image of {sample_name} has unsupported dtype {pixels.dtype}; expected uint8, uint16 or float."
    )


def decode_image(value: Any, sample_name: str = "sample") -> Tensor:
    """Decodes an image to a float32 `(3, height, width)` tensor in `[0, 1]`.

    Any PIL mode is accepted: greyscale, palette, RGBA (alpha dropped), CMYK... are converted to RGB; 16-bit
    greyscale (`I;16`, `I`) is scaled from `[0, 65535]`; float (`F`) is clipped to `[0, 1]`.

    Args:
        value (`dict`, `PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` or `bytes`):
            A `datasets.Image` value (`{"bytes": ..., "path": ...}`), a decoded PIL image, a channels-last
            `(H, W[, C])` array or channels-first `(C, H, W)` tensor (uint8, uint16, or float in `[0, 1]`), a path or
            encoded bytes.
        sample_name (`str`, *optional*):
            Identifies the sample in error messages.

    Returns:
        `torch.Tensor`: float32 `(3, height, width)`.

    Raises:
        ValueError: if the value cannot be decoded, naming the sample.
    """
    if isinstance(value, Tensor):
        # Tensors are channels-first, like torchvision images: (C, H, W) or (H, W).
        pixels = value.detach().cpu()
        if pixels.ndim == 2:
            pixels = pixels.unsqueeze(0)
        if pixels.ndim != 3 or pixels.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"Image tensor of {sample_name} has shape {tuple(pixels.shape)}; expected (H, W) or (1|3|4, H, W)."
            )
        return _scale_to_unit_range(pixels[:3].expand(3, -1, -1).contiguous(), sample_name)
    image = open_image_value(value, sample_name, "image")
    if isinstance(image, np.ndarray):
        # Arrays are channels-last, like PIL images: (H, W, C) or (H, W).
        array = image[..., None] if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"Image array of {sample_name} has shape {array.shape}; expected (H, W) or (H, W, 1|3|4)."
            )
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        return _scale_to_unit_range(pixels[:3].expand(3, -1, -1).contiguous(), sample_name)
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = torch.from_numpy(np.asarray(image, dtype=np.float32)) / 65535.0
        return grey.clamp(0.0, 1.0).unsqueeze(0).expand(3, -1, -1).contiguous()
    if image.mode == "F":
        grey = torch.from_numpy(np.asarray(image, dtype=np.float32))
        return grey.clamp(0.0, 1.0).unsqueeze(0).expand(3, -1, -1).contiguous()
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def mask_class_ids(mask: PILImage.Image, sample_name: str) -> np.ndarray:
    """The class ids of a single-channel mask image as an integer `(height, width)` array (a palette image's
    indices, not its colours).

    Raises:
        ValueError: naming `sample_name`, if the mode is not one of [`MASK_MODES`] (e.g. a colour-coded RGB mask).
    """
    if mask.mode not in MASK_MODES:
        raise ValueError(
            f"Label mask of {sample_name} has PIL mode {mask.mode!r}; expected a single-channel mask of class "
            f"ids (one of {list(MASK_MODES)}). Convert colour-coded masks to class ids first."
        )
    array = np.asarray(mask)
    return array.astype(np.uint8) if array.dtype == np.bool_ else array


def decode_mask(value: Any, sample_name: str = "sample") -> Tensor:
    """Decodes a label mask to an int64 `(height, width)` tensor of class ids.

    Palette (`P`) masks keep their raw palette indices, which are the class ids (VOC convention); `L`, `1` and
    16-bit masks keep their values. Colour (RGB) masks are rejected: convert them to class ids first.

    Args:
        value (`dict`, `PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` or `bytes`):
            A `datasets.Image` value, a decoded image, an `(H, W)` integer array, a path or encoded bytes.
        sample_name (`str`, *optional*):
            Identifies the sample in error messages.

    Returns:
        `torch.Tensor`: int64 `(height, width)`.

    Raises:
        ValueError: if the mask cannot be decoded or is not single-channel, naming the sample.
    """
    mask = open_image_value(value, sample_name, "label mask")
    if isinstance(mask, PILImage.Image):
        array = mask_class_ids(mask, sample_name)
    else:
        array = np.asarray(mask)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2 or array.dtype.kind not in "iub":
            raise ValueError(
                f"Label mask of {sample_name} has shape {array.shape} and dtype {array.dtype}; expected an (H, W) "
                "integer array of class ids."
            )
    return torch.from_numpy(array.astype(np.int64))


def check_mask_values(mask: Tensor, num_labels: int, ignore_index: int, sample_name: str) -> None:
    """Raises a `ValueError` naming `sample_name` if the mask holds values outside `[0, num_labels)` other than
    `ignore_index`."""
    invalid = (mask < 0) | (mask >= num_labels)
    invalid &= mask != ignore_index
    if bool(invalid.any()):
        bad_values = [int(value) for value in torch.unique(mask[invalid])]
        raise ValueError(
            f"Label mask of {sample_name} holds values {bad_values[:10]} outside [0, {num_labels}) that are not "
            f"the ignore index {ignore_index}; check `num_labels` and the label encoding."
        )


def check_same_size(image: Tensor, mask: Tensor, sample_name: str) -> None:
    """Raises a `ValueError` naming `sample_name` if a `(3, H, W)` image and an `(H, W)` mask differ in size."""
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(
            f"Image and label mask of {sample_name} differ in size: image (height, width) = "
            f"{tuple(image.shape[-2:])}, mask = {tuple(mask.shape)}."
        )
