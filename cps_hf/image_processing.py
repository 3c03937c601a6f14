"""The image processor saved next to every CPS model (normalisation of its timm backbone)."""

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers import SegformerImageProcessor

from .configuration_cps import CPSConfig


def backbone_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the timm backbone was pretrained with (ImageNet's when timm has no pretrained config)."""
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError:
        pretrained_cfg = None
    if pretrained_cfg is None:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)


def create_image_processor(config: CPSConfig, size: dict[str, int] | None = None) -> SegformerImageProcessor:
    """
    A `SegformerImageProcessor` that rescales to [0, 1] and normalises like the backbone's pretraining, so that
    `pipeline("image-segmentation", model=folder)` feeds the model what it was trained on.

    Args:
        config (`CPSConfig`):
            The model configuration (its `backbone` decides mean and std).
        size (`dict[str, int]`, *optional*):
            `{"height": h, "width": w}` to resize inputs to; by default images keep their size (the model is
            fully convolutional and the pipeline resizes predictions back to the input size anyway).
    """
    mean, std = backbone_normalization(config.backbone)
    return SegformerImageProcessor(
        do_resize=size is not None,
        size=size or {"height": 512, "width": 512},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_reduce_labels=False,
    )
