"""Cityscapes (fine annotations, 19 evaluated classes) -> `DatasetDict`."""

from __future__ import annotations

from pathlib import Path

import datasets
from transformers.utils import logging

from ..decoding import IGNORE_INDEX
from .common import (
    LabelEncoding,
    Sample,
    build_split,
    class_id_encoding,
    label_encoding,
    pair_by_stem,
    require_dir,
)

logger = logging.get_logger(__name__)


CITYSCAPES_CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
"""The 19 evaluated Cityscapes classes, indexed by trainId."""

CITYSCAPES_LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
"""Cityscapes labelId -> trainId of the 19 evaluated classes (the official `labels.py` table). The other labelIds
0-33 (unlabeled, ego vehicle, ..., parking, guard rail, caravan, trailer) and the license plate (-1, stored as 255)
become `IGNORE_INDEX`."""
_CITYSCAPES_NUM_LABEL_IDS = 34

# Cityscapes' test labels are not public (every pixel is "unlabeled"), so its test split is not converted.
_CITYSCAPES_SPLITS: dict[str, str] = {"train": "train", "val": "validation"}


def _cityscapes_label_id_encoding() -> LabelEncoding:
    mapping = {
        label_id: CITYSCAPES_LABEL_ID_TO_TRAIN_ID.get(label_id, IGNORE_INDEX)
        for label_id in range(_CITYSCAPES_NUM_LABEL_IDS)
    }
    return label_encoding(
        mapping,
        f"the Cityscapes labelIds 0..{_CITYSCAPES_NUM_LABEL_IDS - 1} and {IGNORE_INDEX} (license plate)",
    )


def _files_by_id(folder: Path, suffix: str) -> dict[str, Path]:
    """Maps `<id>` -> path for the files `<id><suffix>` under `folder` (any depth, e.g. one folder per city)."""
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob(f"*{suffix}")):
        sample_id = path.name.removesuffix(suffix)
        if sample_id in files:
            raise ValueError(
                f"Two files share the id {sample_id!r} under {str(folder)!r}: {files[sample_id]}, {path}."
            )
        files[sample_id] = path
    return files


def _cityscapes_pairs(source: Path, source_split: str) -> tuple[list[Sample], str] | None:
    """The samples of one split, in the official layout or the CPS one; `None` if the split is absent."""
    label_ids, train_ids = _cityscapes_label_id_encoding(), class_id_encoding(len(CITYSCAPES_CLASS_NAMES))
    if (source / "leftImg8bit").is_dir():
        images_dir = source / "leftImg8bit" / source_split
        if not images_dir.is_dir():
            return None
        masks_dir = require_dir(source / "gtFine" / source_split, f"Cityscapes {source_split} annotation")
        images = _files_by_id(images_dir, "_leftImg8bit.png")
        # labelIds are the original annotation; already-converted labelTrainIds serve where they are missing.
        masks = {
            **_files_by_id(masks_dir, "_gtFine_labelTrainIds.png"),
            **_files_by_id(masks_dir, "_gtFine_labelIds.png"),
        }
        layout = "leftImg8bit + gtFine"
    else:
        images_dir = source / "images" / source_split
        if not images_dir.is_dir():
            return None
        masks_dir = require_dir(
            source / "segmentation" / source_split, f"Cityscapes {source_split} segmentation"
        )
        images = _files_by_id(images_dir, ".png")
        masks = _files_by_id(masks_dir, "_gtFine.png")  # already trainIds in this layout
        layout = "images + segmentation (trainIds)"
    pairs = pair_by_stem(images, masks, images_dir, masks_dir)
    samples = [
        (sample_id, image, mask, label_ids if mask.name.endswith("_gtFine_labelIds.png") else train_ids)
        for sample_id, image, mask in pairs
    ]
    return samples, layout


def convert_cityscapes(source: Path) -> datasets.DatasetDict:
    """Converts Cityscapes (fine annotations) to a `DatasetDict` with the 19 evaluated classes.

    Two layouts are read:

    - the official one: `leftImg8bit/<split>/<city>/<id>_leftImg8bit.png` and
      `gtFine/<split>/<city>/<id>_gtFine_labelIds.png`; the labelIds are mapped to the 19 trainIds with
      [`CITYSCAPES_LABEL_ID_TO_TRAIN_ID`] (every other labelId, and 255, becomes 255). Where a `labelIds` file is
      missing, an already-converted `<id>_gtFine_labelTrainIds.png` is used as it is;
    - the one of the CPS code's data release: `images/<split>/<id>.png` and `segmentation/<split>/<id>_gtFine.png`
      (trainIds).

    Splits: `train` (2,975 images) and `validation` (from `val`, 500 images). The test split is not converted: its
    public labels are all "unlabeled". Ids are `<city>_<seq>_<frame>` (e.g. `jena_000078_000019`), the ids of the
    official CPS split lists.

    Args:
        source (`Path`):
            The Cityscapes folder.

    Returns:
        `datasets.DatasetDict`: `train` and/or `validation`, with columns `id`, `image`, `label`.

    Raises:
        FileNotFoundError: if `source` or the annotation folder of a split is missing, or neither layout is found.
        ValueError: if images and masks do not pair up, or a labelIds mask holds a value in 34..254 (a trainIds mask:
            in 19..254).
    """
    source = require_dir(Path(source), "Cityscapes")
    if not ((source / "leftImg8bit").is_dir() or (source / "images").is_dir()):
        raise FileNotFoundError(
            f"No Cityscapes layout in {str(source)!r}: expected `leftImg8bit/` + `gtFine/`, or `images/` + "
            "`segmentation/`."
        )
    splits: dict[str, datasets.Dataset] = {}
    for source_split, split in _CITYSCAPES_SPLITS.items():
        found = _cityscapes_pairs(source, source_split)
        if found is None:
            continue
        samples, layout = found
        logger.info(f"Cityscapes {source_split} ({layout}): {len(samples)} pairs -> split {split!r}.")
        splits[split] = build_split(samples, split, CITYSCAPES_CLASS_NAMES, f"Cityscapes fine ({layout})")
    if (source / "leftImg8bit" / "test").is_dir() or (source / "images" / "test").is_dir():
        logger.info("Cityscapes test split skipped: its public labels are all 'unlabeled'.")
    if not splits:
        raise ValueError(f"No Cityscapes train or val split in {str(source)!r}.")
    return datasets.DatasetDict(splits)
