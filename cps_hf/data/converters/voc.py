"""PASCAL VOC 2012 (optionally with the SBD-augmented masks) -> `DatasetDict`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import datasets
from transformers.utils import logging

from ..splits import read_split_ids
from .common import MAX_LISTED, LabelEncoding, Sample, build_split, class_id_encoding, require_dir

logger = logging.get_logger(__name__)


VOC_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""The 21 PASCAL VOC 2012 classes, indexed by class id (the mask value; 255 marks object borders, ignored)."""


def _existing_dirs(candidates: Sequence[Path]) -> list[Path]:
    """The candidates that are folders, each once, in order."""
    found: list[Path] = []
    for candidate in candidates:
        if candidate.is_dir() and all(candidate.resolve() != folder.resolve() for folder in found):
            found.append(candidate)
    return found


def _find_list(folders: Sequence[Path], name: str) -> Path | None:
    return next((folder / name for folder in folders if (folder / name).is_file()), None)


def _read_id_list(list_file: Path) -> list[str]:
    ids = read_split_ids(list_file)
    duplicates = sorted(sample_id for sample_id, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(
            f"{str(list_file)!r} lists {len(duplicates)} id(s) more than once, e.g. {duplicates[:MAX_LISTED]}."
        )
    if not ids:
        raise ValueError(f"{str(list_file)!r} lists no ids.")
    return ids


def _voc_train_ids(
    list_dirs: Sequence[Path], mask_dirs: Sequence[Path], val_ids: list[str] | None
) -> tuple[list[str] | None, str]:
    """The training ids and where they come from: `train_aug.txt`, else the SBD-augmented masks not in val, else
    `train.txt` (the 1,464 VOC-only images)."""
    train_aug_list = _find_list(list_dirs, "train_aug.txt")
    if train_aug_list is not None:
        return _read_id_list(train_aug_list), str(train_aug_list)
    aug_dir = next((folder for folder in mask_dirs if folder.name == "SegmentationClassAug"), None)
    if aug_dir is not None:
        if val_ids is None:
            raise FileNotFoundError(
                f"Found {str(aug_dir)!r} but neither `train_aug.txt` nor `val.txt` in {[str(d) for d in list_dirs]}: "
                "the train_aug set (SegmentationClassAug masks not in val) cannot be told apart from val."
            )
        excluded = set(val_ids)
        ids = sorted(path.stem for path in aug_dir.glob("*.png") if path.stem not in excluded)
        return ids, f"the masks of {str(aug_dir)!r} not in val.txt"
    train_list = _find_list(list_dirs, "train.txt")
    if train_list is not None:
        return _read_id_list(train_list), str(train_list)
    return None, ""


def _voc_samples(
    ids: Sequence[str], origin: str, images_dir: Path, mask_dirs: Sequence[Path], encoding: LabelEncoding
) -> list[Sample]:
    samples: list[Sample] = []
    missing_images, missing_masks = [], []
    for sample_id in ids:
        image_path = images_dir / f"{sample_id}.jpg"
        mask_path = next(
            (folder / f"{sample_id}.png" for folder in mask_dirs if (folder / f"{sample_id}.png").is_file()),
            None,
        )
        if not image_path.is_file():
            missing_images.append(sample_id)
        if mask_path is None:
            missing_masks.append(sample_id)
        if image_path.is_file() and mask_path is not None:
            samples.append((sample_id, image_path, mask_path, encoding))
    problems = []
    if missing_images:
        problems.append(
            f"{len(missing_images)} without `<id>.jpg` in {str(images_dir)!r} (first: {missing_images[:MAX_LISTED]})"
        )
    if missing_masks:
        problems.append(
            f"{len(missing_masks)} without `<id>.png` in any of {[str(folder) for folder in mask_dirs]} "
            f"(first: {missing_masks[:MAX_LISTED]})"
        )
    if problems:
        raise FileNotFoundError(f"Of the {len(ids)} ids of {origin}: " + "; ".join(problems) + ".")
    return samples


def convert_voc(source: Path) -> datasets.DatasetDict:
    """Converts PASCAL VOC 2012 (optionally with the SBD-augmented `SegmentationClassAug` masks) to a `DatasetDict`.

    `source` is a VOCdevkit folder holding `VOC2012/`, or the `VOC2012` folder itself, with:

    - `JPEGImages/<id>.jpg`;
    - masks `<id>.png`, looked up in this order: `SegmentationClassAug/` (SBD-augmented, greyscale; next to
      `VOC2012/` or inside it), then `VOC2012/SegmentationClass/` (palette PNGs: their indices are the class ids
      and are kept as they are);
    - lists in `VOC2012/ImageSets/Segmentation/` (or `ImageSets/Segmentation/` or directly in `source`): `val.txt`,
      and `train_aug.txt` or `train.txt`, one id per line (or `image mask` path pairs, see
      [`~cps_hf.data.read_split_ids`]).

    Splits: `train` is the 10,582-image train_aug set when there is a `train_aug.txt` or, failing that, every
    `SegmentationClassAug` mask not listed in `val.txt`; without `SegmentationClassAug` it is the 1,464 images of
    `train.txt`. `validation` is `val.txt` (1,449 images). Ids are the image stems (e.g. `2007_000032`), as in the
    official CPS split lists. Mask values 0-20 are the 21 classes of [`VOC_CLASS_NAMES`]; 255 stays ignore.

    Args:
        source (`Path`):
            The VOCdevkit (or VOC2012) folder.

    Returns:
        `datasets.DatasetDict`: `train` and/or `validation`, with columns `id`, `image`, `label`.

    Raises:
        FileNotFoundError: if `JPEGImages/`, every mask folder, or the image or mask of a listed id is missing
            (the number of such ids and the first few are shown).
        ValueError: if no split list is found, a list repeats an id, or a mask holds a value in 21..254.
    """
    source = require_dir(Path(source), "VOC")
    voc_root = source / "VOC2012" if (source / "VOC2012").is_dir() else source
    images_dir = require_dir(voc_root / "JPEGImages", "VOC images (JPEGImages)")
    mask_dirs = _existing_dirs(
        [source / "SegmentationClassAug", voc_root / "SegmentationClassAug", voc_root / "SegmentationClass"]
    )
    if not mask_dirs:
        raise FileNotFoundError(
            f"No VOC mask folder: expected `SegmentationClassAug/` in {str(source)!r} or {str(voc_root)!r}, or "
            f"`SegmentationClass/` in {str(voc_root)!r}."
        )
    list_dirs = _existing_dirs(
        [voc_root / "ImageSets" / "Segmentation", source / "ImageSets" / "Segmentation", source]
    )
    val_list = _find_list(list_dirs, "val.txt")
    val_ids = _read_id_list(val_list) if val_list is not None else None
    train_ids, train_origin = _voc_train_ids(list_dirs, mask_dirs, val_ids)
    if train_ids is None and val_ids is None:
        raise ValueError(
            f"No VOC split list (train_aug.txt, train.txt, val.txt) in {[str(folder) for folder in list_dirs]}."
        )
    if train_ids is not None and val_ids is not None:
        overlap = sorted(set(train_ids) & set(val_ids))
        if overlap:
            logger.warning(
                f"{len(overlap)} training ids of {train_origin} are also validation ids, e.g. {overlap[:MAX_LISTED]}."
            )
    encoding = class_id_encoding(len(VOC_CLASS_NAMES))
    splits: dict[str, datasets.Dataset] = {}
    for split, ids, origin in (("train", train_ids, train_origin), ("validation", val_ids, str(val_list))):
        if ids is None:
            logger.warning(f"No VOC {split} list found: the DatasetDict has no {split!r} split.")
            continue
        samples = _voc_samples(ids, origin, images_dir, mask_dirs, encoding)
        logger.info(f"VOC {split}: {len(samples)} images from {origin}.")
        splits[split] = build_split(samples, split, VOC_CLASS_NAMES, f"PASCAL VOC 2012 ({origin})")
    return datasets.DatasetDict(splits)
