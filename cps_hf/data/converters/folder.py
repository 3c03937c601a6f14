"""A folder of images and a folder of masks, paired by file stem -> one-split `DatasetDict`."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np

from ..decoding import IGNORE_INDEX
from .common import build_split, class_id_encoding, list_images, pair_by_stem, read_mask, require_dir


def convert_folder(
    images_dir: Path, masks_dir: Path, class_names: list[str] | None, split: str = "train"
) -> datasets.DatasetDict:
    """Converts a folder of images and a folder of masks, paired by file stem, to a one-split `DatasetDict`.

    Args:
        images_dir (`Path`):
            Folder of image files.
        masks_dir (`Path`):
            Folder of single-channel masks of class ids (255 = ignore), one per image with the same stem.
        class_names (`list[str]`, *optional*):
            Class names in id order. When `None`, the classes are `class_0` .. `class_{max id}` from the masks.
        split (`str`, *optional*, defaults to `"train"`):
            Name of the split.

    Returns:
        `datasets.DatasetDict`: `{split: dataset}` with columns `id`, `image`, `label`.

    Raises:
        FileNotFoundError: if a folder is missing.
        ValueError: if images and masks do not pair up or a mask holds values outside `[0, len(class_names))` and
            other than 255.
    """
    images_dir = require_dir(Path(images_dir), "Images")
    masks_dir = require_dir(Path(masks_dir), "Masks")
    pairs = pair_by_stem(list_images(images_dir), list_images(masks_dir), images_dir, masks_dir)
    if class_names is None:
        # Ids present in the masks, ignoring 255; ignore-only masks still give one class.
        largest = 0
        for _, _, mask_path in pairs:
            values = read_mask(mask_path)
            largest = max(largest, int(np.where(values == IGNORE_INDEX, 0, values).max(initial=0)))
        class_names = [f"class_{index}" for index in range(largest + 1)]
    if not class_names:
        raise ValueError("class_names is empty; pass at least one class name (or None to infer them).")
    encoding = class_id_encoding(len(class_names))
    samples = [(sample_id, image, mask, encoding) for sample_id, image, mask in pairs]
    dataset = build_split(samples, split, class_names, f"folder {images_dir.name} + {masks_dir.name}")
    return datasets.DatasetDict({split: dataset})
