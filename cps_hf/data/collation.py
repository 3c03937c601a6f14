"""Batching of dataset items."""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import default_collate


def collate_semi_supervised(features: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stacks a list of items into a batch, key by key (training and evaluation items alike).

    Args:
        features (`list[dict[str, torch.Tensor]]`):
            Items of [`SemiSupervisedSegmentationDataset`] or [`SupervisedSegmentationDataset`].

    Returns:
        `dict[str, torch.Tensor]`: every key stacked along a new batch dimension.

    Raises:
        ValueError: if the list is empty, items have different keys, or a key's tensors differ in shape (give the
            evaluation transform an `eval_size`, or use a batch size of 1).
    """
    if not features:
        raise ValueError("Cannot collate an empty list of items.")
    keys = set(features[0])
    for position, feature in enumerate(features[1:], start=1):
        if set(feature) != keys:
            raise ValueError(f"Item {position} has keys {sorted(feature)}, item 0 has {sorted(keys)}.")
    for key in keys:
        shapes = {tuple(feature[key].shape) for feature in features}
        if len(shapes) > 1:
            raise ValueError(
                f"Cannot stack {key!r}: items have shapes {sorted(shapes)}. Give the evaluation transform an "
                "`eval_size` or use a batch size of 1."
            )
    return default_collate(features)
