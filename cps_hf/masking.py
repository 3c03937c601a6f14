"""CutMix box masks for CutMix-CPS.

A mask is built from `num_boxes` axis-aligned boxes. Per box an area fraction `p ~ U(area_range)` is drawn; the
box's height fraction is `p ** u` with `u ~ U(0, 1)` and its width fraction `p / height_fraction`, so its
relative area is `p` with a random aspect ratio. Both fractions are then scaled by `sqrt(1 / num_boxes)`, i.e.
each box covers `p / num_boxes` of the image (a third for the default three boxes), so that the boxes together
cover about `p` before overlaps. Sides are rounded to whole pixels, positions are uniform with the box fully
inside the image, and each box toggles the mask, so overlapping parts cancel. The mask is 1 inside the boxes.

Names, here and in the callers: `cutmix_masks` are the box masks (the batch key of the same name); `source` is the
unlabelled batch that is kept where the mask is 0 and `partner` the batch pasted where it is 1 (for images, the batch
keys `unlabeled_pixel_values` and `mix_unlabeled_pixel_values`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["generate_cutmix_mask", "generate_cutmix_masks", "mix_with_mask"]


def _check_mask_arguments(
    batch_size: int, height: int, width: int, num_boxes: int, area_range: tuple[float, float]
) -> None:
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if height < 1 or width < 1:
        raise ValueError(f"`height` and `width` must be >= 1, got height={height}, width={width}.")
    if num_boxes < 1:
        raise ValueError(f"`num_boxes` must be >= 1, got {num_boxes}.")
    if len(area_range) != 2:
        raise ValueError(f"`area_range` must be a pair (low, high), got {area_range}.")
    low, high = area_range
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"`area_range` must satisfy 0 < low <= high <= 1, got {area_range}.")


def _sample_boxes(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | None,
    num_boxes: int,
    area_range: tuple[float, float],
) -> Tensor:
    """Draws box corners `(top, left, bottom, right)`, bottom/right exclusive: int64 `(batch_size, num_boxes, 4)`.

    All draws happen on the generator's device (a CPU generator cannot fill a CUDA tensor).
    """
    draw_device = generator.device if generator is not None else torch.device("cpu")
    uniforms = torch.rand(batch_size, num_boxes, 4, generator=generator, device=draw_device)
    low, high = area_range
    area_fraction = low + (high - low) * uniforms[..., 0]
    height_fraction = area_fraction ** uniforms[..., 1]
    width_fraction = area_fraction / height_fraction
    side_scale = math.sqrt(1.0 / num_boxes)

    image_size = torch.tensor([height, width], dtype=uniforms.dtype, device=draw_device)
    # (batch_size, num_boxes, 2): box height and width in pixels
    box_size = torch.stack([height_fraction, width_fraction], dim=-1) * side_scale * image_size
    box_size = box_size.round().clamp(min=1.0).minimum(image_size)
    top_left = ((image_size - box_size) * uniforms[..., 2:]).round()
    return torch.cat([top_left, top_left + box_size], dim=-1).long()


def _render_toggled_boxes(
    boxes: Tensor, height: int, width: int, device: torch.device | str | None
) -> Tensor:
    """Rasterises `(batch, num_boxes, 4)` box corners into float32 `(batch, 1, height, width)` masks.

    Each box flips the pixels it covers, so a pixel inside an even number of boxes ends up 0.
    """
    boxes = boxes.to(device)
    rows = torch.arange(height, device=boxes.device).view(1, height, 1)
    columns = torch.arange(width, device=boxes.device).view(1, 1, width)
    cutmix_masks = torch.zeros(boxes.shape[0], height, width, dtype=torch.bool, device=boxes.device)
    # Loop over the few boxes, vectorised over the batch: avoids a (batch, num_boxes, height, width) temporary.
    for box_index in range(boxes.shape[1]):
        top, left, bottom, right = (boxes[:, box_index, k].view(-1, 1, 1) for k in range(4))
        inside_rows = (rows >= top) & (rows < bottom)
        inside_columns = (columns >= left) & (columns < right)
        cutmix_masks ^= inside_rows & inside_columns
    return cutmix_masks.unsqueeze(1).float()


def generate_cutmix_masks(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    num_boxes: int = 3,
    area_range: tuple[float, float] = (0.25, 0.5),
    device: torch.device | str | None = None,
) -> Tensor:
    """Generates a batch of CutMix box masks (see the module docstring for the box geometry).

    Args:
        batch_size (`int`):
            Number of masks.
        height (`int`):
            Mask height in pixels.
        width (`int`):
            Mask width in pixels.
        generator (`torch.Generator`, *optional*):
            Source of all randomness, so that masks are reproducible per seed. Defaults to torch's global RNG.
        num_boxes (`int`, *optional*, defaults to 3):
            Number of boxes toggled into each mask.
        area_range (`tuple[float, float]`, *optional*, defaults to `(0.25, 0.5)`):
            Range of the area fraction `p`; each box covers `p / num_boxes` of the image.
        device (`torch.device` or `str`, *optional*):
            Device of the returned masks. Defaults to CPU.

    Returns:
        `torch.FloatTensor` of shape `(batch_size, 1, height, width)` with values in {0, 1}; 1 marks the pixels
        taken from the second image in [`mix_with_mask`].

    Raises:
        ValueError: for non-positive sizes or box count, or an `area_range` outside `0 < low <= high <= 1`.
    """
    _check_mask_arguments(batch_size, height, width, num_boxes, area_range)
    boxes = _sample_boxes(batch_size, height, width, generator, num_boxes, area_range)
    return _render_toggled_boxes(boxes, height, width, device if device is not None else "cpu")


def generate_cutmix_mask(
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    num_boxes: int = 3,
    area_range: tuple[float, float] = (0.25, 0.5),
) -> Tensor:
    """Generates a single CutMix box mask, e.g. per sample inside a dataset transform.

    Args:
        height (`int`):
            Mask height in pixels.
        width (`int`):
            Mask width in pixels.
        generator (`torch.Generator`, *optional*):
            Source of all randomness. Defaults to torch's global RNG.
        num_boxes (`int`, *optional*, defaults to 3):
            Number of boxes toggled into the mask.
        area_range (`tuple[float, float]`, *optional*, defaults to `(0.25, 0.5)`):
            Range of the area fraction `p`; each box covers `p / num_boxes` of the image.

    Returns:
        `torch.FloatTensor` of shape `(1, height, width)` with values in {0, 1}, on CPU.
    """
    return generate_cutmix_masks(1, height, width, generator, num_boxes, area_range)[0]


def mix_with_mask(source: Tensor, partner: Tensor, cutmix_masks: Tensor) -> Tensor:
    """Mixes two batches with box masks: `source * (1 - m) + partner * m`.

    Floating-point inputs (images, logits) are blended with the formula above. Integer inputs (label maps) are
    selected with `torch.where(m != 0, partner, source)`, which preserves their dtype.

    Args:
        source (`torch.Tensor`):
            Batch kept where the mask is 0, e.g. images `(batch, channels, height, width)` or label maps
            `(batch, height, width)`.
        partner (`torch.Tensor`):
            Batch pasted where the mask is 1; same shape and dtype as `source`.
        cutmix_masks (`torch.Tensor`):
            Masks of shape `(batch, 1, height, width)` (broadcast over channels) or, for label maps,
            `(batch, height, width)`.

    Returns:
        `torch.Tensor`: the mixed batch, with the shape of `source`.

    Raises:
        ValueError: if `source` and `partner` differ in shape or dtype, or the masks cannot be broadcast.
    """
    if source.shape != partner.shape:
        raise ValueError(
            f"`source` and `partner` must have the same shape, got {tuple(source.shape)} and "
            f"{tuple(partner.shape)}."
        )
    if source.dtype != partner.dtype:
        raise ValueError(
            f"`source` and `partner` must have the same dtype, got {source.dtype} and {partner.dtype}."
        )
    masks = cutmix_masks
    # Label maps (batch, H, W) with image-style masks (batch, 1, H, W): drop the channel axis.
    if masks.ndim == source.ndim + 1 and masks.shape[1] == 1:
        masks = masks.squeeze(1)
    try:
        broadcast_shape = torch.broadcast_shapes(masks.shape, source.shape)
    except RuntimeError:
        broadcast_shape = None
    if broadcast_shape != source.shape:
        raise ValueError(
            f"`cutmix_masks` of shape {tuple(cutmix_masks.shape)} cannot be broadcast to {tuple(source.shape)}."
        )
    if source.is_floating_point() or source.is_complex():
        masks = masks.to(source.dtype)
        return source * (1 - masks) + partner * masks
    return torch.where(masks != 0, partner, source)
