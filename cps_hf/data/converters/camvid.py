"""CamVid in the SegNet layout (11 classes) -> `DatasetDict`."""

from __future__ import annotations

from pathlib import Path

import datasets
from transformers.utils import logging

from .common import build_split, class_id_encoding, list_images, pair_by_stem, require_dir

logger = logging.get_logger(__name__)


CAMVID_CLASS_NAMES: tuple[str, ...] = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
"""The 11 CamVid classes of the SegNet split, indexed by class id."""

CAMVID_VOID_ID = 11
"""CamVid's "Unlabelled" id, mapped to `IGNORE_INDEX`."""


# Source split name -> split name in the DatasetDict (the project's evaluation split is called "validation").
_CAMVID_SPLITS: dict[str, str] = {"train": "train", "val": "validation", "test": "test"}


def _resolve_listed_path(source: Path, listed: str, list_file: Path, line_number: int) -> Path:
    # SegNet lists hold absolute paths like /SegNet/CamVid/train/x.png: keep the last two components.
    parts = Path(listed).parts
    if len(parts) < 2:
        raise ValueError(
            f"{str(list_file)!r} line {line_number}: expected `<folder>/<file>` paths, got {listed!r}."
        )
    path = source / parts[-2] / parts[-1]
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(list_file)!r} line {line_number}: {listed!r} resolves to missing {str(path)!r}."
        )
    return path


def _camvid_pairs_from_list(source: Path, list_file: Path) -> list[tuple[str, Path, Path]]:
    pairs = []
    for line_number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(
                f"{str(list_file)!r} line {line_number}: expected `image annotation`, got {line.strip()!r}."
            )
        image_path = _resolve_listed_path(source, fields[0], list_file, line_number)
        mask_path = _resolve_listed_path(source, fields[1], list_file, line_number)
        pairs.append((image_path.stem, image_path, mask_path))
    if not pairs:
        raise ValueError(f"{str(list_file)!r} lists no image/annotation pairs.")
    return pairs


def convert_camvid(source: Path) -> datasets.DatasetDict:
    """Converts CamVid in the SegNet layout to a `DatasetDict`.

    The layout is `<split>/` (RGB images), `<split>annot/` (single-channel PNG of class ids) and optionally
    `<split>.txt` (`image annotation` per line, paths resolved by their last two components) for `split` in
    train/val/test. Splits found: `train`, `validation` (from `val`) and `test`. Class ids 0-10 are kept, the void id
    11 becomes 255.

    Args:
        source (`Path`):
            The CamVid folder.

    Returns:
        `datasets.DatasetDict`: the splits found, with columns `id`, `image`, `label`.

    Raises:
        FileNotFoundError: if `source`, a folder or a listed file is missing.
        ValueError: if no split is found, images and masks do not pair up, or a mask holds values above 11.
    """
    source = require_dir(Path(source), "CamVid")
    encoding = class_id_encoding(len(CAMVID_CLASS_NAMES), void_id=CAMVID_VOID_ID)
    splits: dict[str, datasets.Dataset] = {}
    for source_split, split in _CAMVID_SPLITS.items():
        list_file = source / f"{source_split}.txt"
        if list_file.is_file():
            pairs = _camvid_pairs_from_list(source, list_file)
        elif (source / source_split).is_dir():
            images_dir = source / source_split
            masks_dir = require_dir(source / f"{source_split}annot", f"CamVid {source_split} annotation")
            pairs = pair_by_stem(list_images(images_dir), list_images(masks_dir), images_dir, masks_dir)
        else:
            continue
        logger.info(f"CamVid {source_split}: {len(pairs)} pairs -> split {split!r}.")
        samples = [(sample_id, image, mask, encoding) for sample_id, image, mask in pairs]
        splits[split] = build_split(samples, split, CAMVID_CLASS_NAMES, "CamVid (SegNet 11-class split)")
    if not splits:
        raise ValueError(
            f"No CamVid split in {str(source)!r}: expected some of {[f'{name}/' for name in _CAMVID_SPLITS]} "
            f"(with `<split>annot/`) or `<split>.txt` lists."
        )
    return datasets.DatasetDict(splits)
