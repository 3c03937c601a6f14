"""Joint image/mask augmentation and resizing, on `torchvision.transforms.v2` kernels, with explicit randomness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .decoding import IGNORE_INDEX, check_same_size, decode_image, decode_mask

PAPER_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
"""Random-scale factors of the CPS recipe, chosen uniformly."""

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PAPER_SCALES", "SegmentationTransform", "size_pair"]


def size_pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """`(height, width)` from one size (an int or a one-element sequence: a square) or a `(height, width)` pair.

    Raises:
        ValueError: naming `name`, for anything else or a side below 1.
    """
    sides = [size] if isinstance(size, int) else [int(side) for side in size]
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) < 1:
        raise ValueError(f"`{name}` must be a positive int or a (height, width) pair, got {size!r}.")
    return sides[0], sides[1]


def _random_int(low: int, high: int, generator: torch.Generator | None) -> int:
    """A uniform integer in `[low, high]` (inclusive) from the generator."""
    if high <= low:
        return low
    return int(torch.randint(low, high + 1, (), generator=generator))


class SegmentationTransform:
    """Joint image/mask augmentation for semantic segmentation, with explicit randomness.

    Training (`train=True`), following the CPS recipe: horizontal flip with probability `flip_probability` →
    random scale (a factor chosen uniformly from `scales`, or drawn uniformly from `scale_range`; image bilinear,
    mask nearest) → random crop of `crop_size` → optional colour jitter of the image (`color_jitter`, not in the
    paper's recipe) → normalisation with `mean`/`std`. Where the scaled image is smaller
    than the crop, it is placed at a random (or, with `pad_position="center"`, central) offset and padded with 0
    (after normalisation, i.e. the mean colour) and the mask with `ignore_index`.

    Evaluation (`train=False`): no random operation; optional resize (`eval_short_side` scales the short side to
    that length keeping the aspect ratio; `eval_size` resizes to a fixed size, so that images of different sizes
    can be batched), then normalisation. The mask is resized with nearest neighbour when the image is.

    The operations are `torchvision.transforms.v2` kernels applied to a `tv_tensors.Image` and a `tv_tensors.Mask`
    (which selects nearest-neighbour resizing and the mask's own padding value). Their random parameters are drawn
    from the `torch.Generator` passed to each call, so the caller (the dataset) controls determinism; torch's global
    RNG, which the random v2 transforms draw from, is never touched.

    Args:
        train (`bool`):
            Training (random) or evaluation (deterministic) pipeline.
        crop_size (`int` or `tuple[int, int]`, *optional*):
            Output `(height, width)` of training samples; required when `train=True`.
        scales (`Sequence[float]`, *optional*):
            Scale factors chosen uniformly. Defaults to [`PAPER_SCALES`] unless `scale_range` is given.
        scale_range (`tuple[float, float]`, *optional*):
            `(min, max)` of a uniformly drawn scale factor; exclusive with `scales`. Pass `scales=(1.0,)` for no
            scaling.
        flip_probability (`float`, *optional*, defaults to 0.5):
            Probability of a horizontal flip.
        mean (`Sequence[float]`, *optional*, defaults to ImageNet's `(0.485, 0.456, 0.406)`):
            Per-channel mean of the normalisation (read it from the backbone's pretrained config).
        std (`Sequence[float]`, *optional*, defaults to ImageNet's `(0.229, 0.224, 0.225)`):
            Per-channel standard deviation of the normalisation.
        ignore_index (`int`, *optional*, defaults to 255):
            Mask value of padded pixels.
        eval_short_side (`int`, *optional*):
            Evaluation only: resize so that the short side has this length.
        eval_size (`int` or `tuple[int, int]`, *optional*):
            Evaluation only: resize to this `(height, width)`; exclusive with `eval_short_side`.
        antialias (`bool`, *optional*, defaults to `False`):
            Antialias bilinear downscaling. The reference implementation does not (OpenCV `INTER_LINEAR`).
        pad_position (`str`, *optional*, defaults to `"random"`):
            Where an image smaller than the crop sits inside the padded crop: at a random offset (like
            torchvision's `RandomCrop(pad_if_needed=True)`), or `"center"` (the reference implementation).
        color_jitter (`tuple[float, float, float, float]`, *optional*):
            `(brightness, contrast, saturation, hue)` strengths, as torchvision's `ColorJitter`: factors drawn
            uniformly from `[max(0, 1 - s), 1 + s]` (hue: a shift in `[-s, s]`, `s <= 0.5`), applied in that
            fixed order to the cropped image in `[0, 1]`; a strength of 0 leaves that property alone. `None`
            (default): no colour change, as the paper.

    Example:

    ```python
    >>> transform = SegmentationTransform(train=True, crop_size=32)
    >>> image, mask = torch.rand(3, 40, 50), torch.zeros(40, 50, dtype=torch.long)
    >>> pixel_values, labels = transform(image, mask, generator=torch.Generator().manual_seed(0))
    >>> pixel_values.shape, labels.shape
    (torch.Size([3, 32, 32]), torch.Size([32, 32]))
    ```
    """

    def __init__(
        self,
        train: bool,
        crop_size: int | tuple[int, int] | None = None,
        scales: Sequence[float] | None = None,
        scale_range: tuple[float, float] | None = None,
        flip_probability: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = IGNORE_INDEX,
        eval_short_side: int | None = None,
        eval_size: int | tuple[int, int] | None = None,
        antialias: bool = False,
        pad_position: Literal["random", "center"] = "random",
        color_jitter: Sequence[float] | None = None,
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"`mean` and `std` must have 3 values (RGB), got mean={mean}, std={std}.")
        if min(std) <= 0:
            raise ValueError(f"`std` must be positive, got {std}.")
        if scales is not None and scale_range is not None:
            raise ValueError(
                f"Pass either `scales` or `scale_range`, not both (got {scales} and {scale_range})."
            )
        if scale_range is not None:
            if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
                raise ValueError(f"`scale_range` must be (min, max) with 0 < min <= max, got {scale_range}.")
            scale_range = (float(scale_range[0]), float(scale_range[1]))
        elif scales is None:
            scales = PAPER_SCALES
        if scales is not None:
            scales = tuple(float(scale) for scale in scales)
            if not scales or min(scales) <= 0:
                raise ValueError(f"`scales` must be a non-empty list of positive factors, got {scales}.")
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"`flip_probability` must be in [0, 1], got {flip_probability}.")
        if train and crop_size is None:
            raise ValueError(
                "`crop_size` is required for a training transform (batched samples need one size)."
            )
        if eval_short_side is not None and eval_size is not None:
            raise ValueError("Pass either `eval_short_side` or `eval_size`, not both.")
        if pad_position not in ("random", "center"):
            raise ValueError(f"`pad_position` must be 'random' or 'center', got {pad_position!r}.")
        if eval_short_side is not None and eval_short_side < 1:
            raise ValueError(f"`eval_short_side` must be >= 1, got {eval_short_side}.")
        if color_jitter is not None:
            color_jitter = tuple(float(strength) for strength in color_jitter)
            if len(color_jitter) != 4 or min(color_jitter) < 0 or color_jitter[3] > 0.5:
                raise ValueError(
                    "`color_jitter` must be 4 strengths (brightness, contrast, saturation, hue), each >= 0 and "
                    f"hue <= 0.5, got {color_jitter}."
                )
            if max(color_jitter) == 0:
                color_jitter = None

        self.train = train
        self.crop_size = size_pair(crop_size, "crop_size") if crop_size is not None else None
        self.scales = scales
        self.scale_range = scale_range
        self.flip_probability = float(flip_probability)
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.ignore_index = int(ignore_index)
        self.eval_short_side = eval_short_side
        self.eval_size = size_pair(eval_size, "eval_size") if eval_size is not None else None
        self.antialias = antialias
        self.pad_position = pad_position
        self.color_jitter = color_jitter

    def __repr__(self) -> str:
        if self.train:
            scaling = (
                f"scales={self.scales}" if self.scales is not None else f"scale_range={self.scale_range}"
            )
            details = f"crop_size={self.crop_size}, {scaling}, flip_probability={self.flip_probability}"
            if self.color_jitter is not None:
                details += f", color_jitter={self.color_jitter}"
        else:
            details = f"eval_short_side={self.eval_short_side}, eval_size={self.eval_size}"
        return f"{type(self).__name__}(train={self.train}, {details}, mean={self.mean}, std={self.std})"

    def __call__(
        self,
        image: Any,
        mask: Any | None = None,
        *,
        generator: torch.Generator | None = None,
        sample_name: str = "sample",
    ) -> tuple[Tensor, Tensor | None]:
        """Transforms one image and its (optional) mask.

        Args:
            image (`torch.Tensor`, `PIL.Image.Image`, `np.ndarray` or `datasets.Image` value):
                A float `(3, H, W)` tensor in `[0, 1]` (as from [`decode_image`]) or anything [`decode_image`]
                accepts.
            mask (`torch.Tensor`, `PIL.Image.Image`, `np.ndarray` or `datasets.Image` value, *optional*):
                An integer `(H, W)` tensor of class ids or anything [`decode_mask`] accepts; `None` for unlabelled
                images.
            generator (`torch.Generator`, *optional*):
                Source of every random choice. Defaults to torch's global RNG (not reproducible per item).
            sample_name (`str`, *optional*):
                Identifies the sample in error messages.

        Returns:
            `tuple[torch.Tensor, torch.Tensor | None]`: float32 `(3, h, w)` normalised pixel values and int64
            `(h, w)` labels (or `None` without a mask).

        Raises:
            ValueError: if the image and the mask differ in size, naming the sample.
        """
        if not (isinstance(image, Tensor) and image.is_floating_point() and image.ndim == 3):
            image = decode_image(image, sample_name)
        if mask is not None and not (isinstance(mask, Tensor) and mask.dtype == torch.int64):
            mask = decode_mask(mask, sample_name)
        if image.shape[0] != 3:
            raise ValueError(f"Image of {sample_name} must have 3 channels, got shape {tuple(image.shape)}.")
        if mask is not None:
            check_same_size(image, mask, sample_name)
        image = tv_tensors.Image(image)
        mask = tv_tensors.Mask(mask) if mask is not None else None
        if self.train:
            image, mask = self._train_transform(image, mask, generator)
        else:
            image, mask = self._eval_transform(image, mask)
        pixel_values = image.as_subclass(Tensor).contiguous()
        return pixel_values, mask.as_subclass(Tensor).contiguous() if mask is not None else None

    def _draw_scale(self, generator: torch.Generator | None) -> float:
        if self.scale_range is not None:
            low, high = self.scale_range
            return low + (high - low) * float(torch.rand((), generator=generator))
        return self.scales[_random_int(0, len(self.scales) - 1, generator)]

    def _resize(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask | None, size: tuple[int, int]
    ) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
        if tuple(image.shape[-2:]) == size:
            return image, mask
        downscaling = size[0] < image.shape[-2] or size[1] < image.shape[-1]
        image = TF.resize(
            image,
            list(size),
            interpolation=InterpolationMode.BILINEAR,
            antialias=self.antialias and downscaling,
        )
        if mask is not None:
            # Pixel-centre nearest neighbour ("nearest-exact"), not the legacy "nearest" that shifts by half a pixel.
            mask = TF.resize(mask, list(size), interpolation=InterpolationMode.NEAREST_EXACT)
        return image, mask

    def _train_transform(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask | None, generator: torch.Generator | None
    ) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
        # The draws keep their order (flip, scale, crop offset, pad offset, colour factors): items stay reproducible
        # across versions.
        if float(torch.rand((), generator=generator)) < self.flip_probability:
            image = TF.horizontal_flip(image)
            mask = TF.horizontal_flip(mask) if mask is not None else None
        scale = self._draw_scale(generator)
        height, width = image.shape[-2:]
        scaled_size = (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
        image, mask = self._resize(image, mask, scaled_size)

        crop_height, crop_width = self.crop_size
        height, width = scaled_size
        # Crop window inside the (scaled) image where it is larger than the crop...
        top = _random_int(0, height - crop_height, generator)
        left = _random_int(0, width - crop_width, generator)
        window = (top, left, min(crop_height, height), min(crop_width, width))
        # ...and placement of the image inside the crop where it is smaller (padding around it).
        pad_height, pad_width = crop_height - window[2], crop_width - window[3]
        padding = None
        if pad_height > 0 or pad_width > 0:
            if self.pad_position == "random":
                pad_top = _random_int(0, pad_height, generator)
                pad_left = _random_int(0, pad_width, generator)
            else:
                pad_top, pad_left = pad_height // 2, pad_width // 2
            padding = [
                pad_left,
                pad_top,
                pad_width - pad_left,
                pad_height - pad_top,
            ]  # left, top, right, bottom
        image = TF.crop(image, *window)
        mask = TF.crop(mask, *window) if mask is not None else None
        if self.color_jitter is not None:
            image = self._jitter_colors(image, generator)
        image = TF.normalize(image, self.mean, self.std)
        if padding is not None:
            image = TF.pad(image, padding, fill=0.0)
            mask = TF.pad(mask, padding, fill=self.ignore_index) if mask is not None else None
        return image, mask

    def _jitter_colors(self, image: tv_tensors.Image, generator: torch.Generator | None) -> tv_tensors.Image:
        """Brightness, contrast, saturation, then hue, each by a factor drawn from the generator."""
        brightness, contrast, saturation, hue = self.color_jitter
        adjustments = (
            (brightness, TF.adjust_brightness),
            (contrast, TF.adjust_contrast),
            (saturation, TF.adjust_saturation),
        )
        for strength, adjust in adjustments:
            if strength > 0:
                low, high = max(0.0, 1.0 - strength), 1.0 + strength
                image = adjust(image, low + (high - low) * float(torch.rand((), generator=generator)))
        if hue > 0:
            image = TF.adjust_hue(image, hue * (2 * float(torch.rand((), generator=generator)) - 1))
        return image

    def _eval_transform(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask | None
    ) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
        height, width = image.shape[-2:]
        if self.eval_size is not None:
            image, mask = self._resize(image, mask, self.eval_size)
        elif self.eval_short_side is not None:
            ratio = self.eval_short_side / min(height, width)
            image, mask = self._resize(
                image, mask, (max(1, int(round(height * ratio))), max(1, int(round(width * ratio))))
            )
        return TF.normalize(image, self.mean, self.std), mask
