"""Converters from common on-disk segmentation layouts to the `datasets.DatasetDict` the project trains on.

Every converter returns splits with the columns `id` (`str`), `image` (`datasets.Image`) and `label`
(`datasets.Image`: single-channel PNG of class ids, 255 = ignore), and the class names as JSON
`{"class_names": [...]}` in each split's `info.description` (the convention of [`make_synthetic_segmentation_dataset`],
read back by `cps_hf.data.dataset_class_names`). Image files are stored as their original bytes; a mask is
re-encoded only when its values are remapped (e.g. CamVid's void id 11 becomes 255, Cityscapes labelIds become
trainIds).

Conversion streams: rows are written one by one to Arrow files in the `datasets` cache (`HF_DATASETS_CACHE`), so
memory does not grow with the dataset; a conversion of unchanged source files (same paths, sizes and modification
times) reuses them.

    >>> from pathlib import Path
    >>> from cps_hf.converters import convert_voc, save_dataset
    >>> dataset_dict = convert_voc(Path("VOCdevkit"))  # doctest: +SKIP
    >>> save_dataset(dataset_dict, Path("data/voc"), parquet=True)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError
from datasets.table import embed_table_storage
from PIL import Image as PILImage
from transformers.utils import logging

from .data import (
    CLASS_NAMES_FILE,
    IMAGE_SUFFIXES,
    dataset_class_names,
    read_split_ids,
    set_dataset_class_names,
    write_id2label,
)

logger = logging.get_logger(__name__)

__all__ = [
    "CAMVID_CLASS_NAMES",
    "CAMVID_VOID_ID",
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_LABEL_ID_TO_TRAIN_ID",
    "IGNORE_INDEX",
    "VOC_CLASS_NAMES",
    "convert_camvid",
    "convert_cityscapes",
    "convert_folder",
    "convert_voc",
    "downscale_dataset",
    "push_dataset_to_hub",
    "save_dataset",
]

IGNORE_INDEX = 255
"""Label value ignored by losses and metrics."""

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

# Source split name -> split name in the DatasetDict (the project's evaluation split is called "validation").
_CAMVID_SPLITS: dict[str, str] = {"train": "train", "val": "validation", "test": "test"}
# Cityscapes' test labels are not public (every pixel is "unlabeled"), so its test split is not converted.
_CITYSCAPES_SPLITS: dict[str, str] = {"train": "train", "val": "validation"}
_MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
_MAX_LISTED = 5
# Part of the cache key of a conversion: bump when the stored rows of a conversion change for the same sources.
_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class _LabelEncoding:
    """How the values of a source mask become stored class ids."""

    lookup: np.ndarray
    """(256,) int16: the stored value of each source value, -1 where the source value is not allowed."""
    allowed: str
    """The allowed source values, in words, for error messages."""


def _label_encoding(mapping: Mapping[int, int], allowed: str) -> _LabelEncoding:
    lookup = np.full(256, -1, dtype=np.int16)
    for source_value, stored_value in mapping.items():
        lookup[source_value] = stored_value
    lookup[IGNORE_INDEX] = IGNORE_INDEX
    return _LabelEncoding(lookup=lookup, allowed=allowed)


def _class_id_encoding(num_classes: int, void_id: int | None = None) -> _LabelEncoding:
    """Class ids `0 .. num_classes - 1` and 255 are kept; `void_id` (if any) becomes 255."""
    if not 1 <= num_classes < IGNORE_INDEX:
        raise ValueError(
            f"Masks are stored as 8-bit class ids with {IGNORE_INDEX} = ignore: between 1 and {IGNORE_INDEX - 1} "
            f"classes are supported, got {num_classes}."
        )
    mapping = {class_id: class_id for class_id in range(num_classes)}
    void = ""
    if void_id is not None:
        mapping[void_id] = IGNORE_INDEX
        void = f", void {void_id}"
    return _label_encoding(
        mapping, f"the class ids 0..{num_classes - 1}{void} and the ignore index {IGNORE_INDEX}"
    )


def _cityscapes_label_id_encoding() -> _LabelEncoding:
    mapping = {
        label_id: CITYSCAPES_LABEL_ID_TO_TRAIN_ID.get(label_id, IGNORE_INDEX)
        for label_id in range(_CITYSCAPES_NUM_LABEL_IDS)
    }
    return _label_encoding(
        mapping,
        f"the Cityscapes labelIds 0..{_CITYSCAPES_NUM_LABEL_IDS - 1} and {IGNORE_INDEX} (license plate)",
    )


# One sample: (id, image file, mask file, how the mask's values are stored).
_Sample = tuple[str, Path, Path, _LabelEncoding]


def _features() -> datasets.Features:
    return datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Image()}
    )


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {str(path)!r} does not exist or is not a folder.")
    return path


def _list_images(folder: Path) -> dict[str, Path]:
    """Maps file stem -> path for the image files directly inside `folder`."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in files:
                raise ValueError(
                    f"Two files share the stem {path.stem!r} in {str(folder)!r}: {files[path.stem].name}, {path.name}."
                )
            files[path.stem] = path
    return files


def _pair_by_stem(
    images: dict[str, Path], masks: dict[str, Path], images_dir: Path, masks_dir: Path
) -> list[tuple[str, Path, Path]]:
    unmatched_images = sorted(set(images) - set(masks))
    unmatched_masks = sorted(set(masks) - set(images))
    if unmatched_images or unmatched_masks:
        parts = []
        if unmatched_images:
            parts.append(
                f"{len(unmatched_images)} image(s) in {str(images_dir)!r} without a mask in {str(masks_dir)!r} "
                f"(first: {unmatched_images[:_MAX_LISTED]})"
            )
        if unmatched_masks:
            parts.append(
                f"{len(unmatched_masks)} mask(s) in {str(masks_dir)!r} without an image "
                f"(first: {unmatched_masks[:_MAX_LISTED]})"
            )
        raise ValueError("Images and masks do not pair up by file stem: " + "; ".join(parts) + ".")
    if not images:
        raise ValueError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) found in {str(images_dir)!r}.")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def _read_mask(path: Path) -> np.ndarray:
    with PILImage.open(path) as mask:
        if mask.mode not in _MASK_MODES:
            raise ValueError(
                f"Mask {str(path)!r} has mode {mask.mode!r}; expected a single-channel mask of class ids "
                f"(one of {_MASK_MODES})."
            )
        return np.asarray(mask)


def _encode_mask(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(values.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _mask_entry(path: Path, encoding: _LabelEncoding) -> dict[str, bytes | str | None]:
    """Reads, checks and (if needed) remaps one mask; returns an `Image` feature entry."""
    values = _read_mask(path)
    present = np.unique(values)
    bad = [int(value) for value in present if not 0 <= value <= 255 or encoding.lookup[value] < 0]
    if bad:
        raise ValueError(
            f"Mask {str(path)!r} holds values {bad[: _MAX_LISTED * 2]} outside {encoding.allowed}."
        )
    # Palette PNGs (VOC) keep their bytes: their indices are the class ids, which is what the loaders decode.
    with PILImage.open(path) as mask:
        keep_bytes = mask.format == "PNG" and mask.mode in ("L", "P")
    if keep_bytes and np.array_equal(encoding.lookup[present], present):
        return {"bytes": path.read_bytes(), "path": None}
    return {"bytes": _encode_mask(encoding.lookup[values]), "path": None}


def _generate_rows(samples: Sequence[_Sample]) -> Iterator[dict[str, object]]:
    for sample_id, image_path, mask_path, encoding in samples:
        yield {
            "id": sample_id,
            "image": {"bytes": image_path.read_bytes(), "path": None},
            "label": _mask_entry(mask_path, encoding),
        }


def _conversion_fingerprint(samples: Sequence[_Sample], split: str, class_names: Sequence[str]) -> str:
    """Cache key of a conversion: the sources' paths, sizes and modification times, and how masks are stored."""
    digest = hashlib.sha256(
        f"cps_hf.converters:{_CONVERSION_VERSION}:{split}:{json.dumps(list(class_names))}".encode()
    )
    for sample_id, image_path, mask_path, encoding in samples:
        digest.update(sample_id.encode() + encoding.lookup.tobytes())
        for path in (image_path, mask_path):
            stat = path.stat()
            digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _build_split(
    samples: Sequence[_Sample], split: str, class_names: Sequence[str], source_description: str
) -> datasets.Dataset:
    try:
        dataset = datasets.Dataset.from_generator(
            _generate_rows,
            features=_features(),
            gen_kwargs={"samples": list(samples)},
            split=split,
            fingerprint=_conversion_fingerprint(samples, split, class_names),
        )
    except DatasetGenerationError as error:
        # `datasets` wraps the generator's errors; the original names the offending file.
        if isinstance(error.__cause__, ValueError | OSError):
            raise error.__cause__ from None
        raise
    # JSON, so that the class names survive copies of the dataset (see `cps_hf.synthetic`).
    set_dataset_class_names(dataset, class_names, {"dataset": source_description})
    return dataset


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
    source = _require_dir(Path(source), "CamVid")
    encoding = _class_id_encoding(len(CAMVID_CLASS_NAMES), void_id=CAMVID_VOID_ID)
    splits: dict[str, datasets.Dataset] = {}
    for source_split, split in _CAMVID_SPLITS.items():
        list_file = source / f"{source_split}.txt"
        if list_file.is_file():
            pairs = _camvid_pairs_from_list(source, list_file)
        elif (source / source_split).is_dir():
            images_dir = source / source_split
            masks_dir = _require_dir(source / f"{source_split}annot", f"CamVid {source_split} annotation")
            pairs = _pair_by_stem(_list_images(images_dir), _list_images(masks_dir), images_dir, masks_dir)
        else:
            continue
        logger.info(f"CamVid {source_split}: {len(pairs)} pairs -> split {split!r}.")
        samples = [(sample_id, image, mask, encoding) for sample_id, image, mask in pairs]
        splits[split] = _build_split(samples, split, CAMVID_CLASS_NAMES, "CamVid (SegNet 11-class split)")
    if not splits:
        raise ValueError(
            f"No CamVid split in {str(source)!r}: expected some of {[f'{name}/' for name in _CAMVID_SPLITS]} "
            f"(with `<split>annot/`) or `<split>.txt` lists."
        )
    return datasets.DatasetDict(splits)


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
    images_dir = _require_dir(Path(images_dir), "Images")
    masks_dir = _require_dir(Path(masks_dir), "Masks")
    pairs = _pair_by_stem(_list_images(images_dir), _list_images(masks_dir), images_dir, masks_dir)
    if class_names is None:
        # Ids present in the masks, ignoring 255; ignore-only masks still give one class.
        largest = 0
        for _, _, mask_path in pairs:
            values = _read_mask(mask_path)
            largest = max(largest, int(np.where(values == IGNORE_INDEX, 0, values).max(initial=0)))
        class_names = [f"class_{index}" for index in range(largest + 1)]
    if not class_names:
        raise ValueError("class_names is empty; pass at least one class name (or None to infer them).")
    encoding = _class_id_encoding(len(class_names))
    samples = [(sample_id, image, mask, encoding) for sample_id, image, mask in pairs]
    dataset = _build_split(samples, split, class_names, f"folder {images_dir.name} + {masks_dir.name}")
    return datasets.DatasetDict({split: dataset})


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
            f"{str(list_file)!r} lists {len(duplicates)} id(s) more than once, e.g. {duplicates[:_MAX_LISTED]}."
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
    ids: Sequence[str], origin: str, images_dir: Path, mask_dirs: Sequence[Path], encoding: _LabelEncoding
) -> list[_Sample]:
    samples: list[_Sample] = []
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
            f"{len(missing_images)} without `<id>.jpg` in {str(images_dir)!r} (first: {missing_images[:_MAX_LISTED]})"
        )
    if missing_masks:
        problems.append(
            f"{len(missing_masks)} without `<id>.png` in any of {[str(folder) for folder in mask_dirs]} "
            f"(first: {missing_masks[:_MAX_LISTED]})"
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
    source = _require_dir(Path(source), "VOC")
    voc_root = source / "VOC2012" if (source / "VOC2012").is_dir() else source
    images_dir = _require_dir(voc_root / "JPEGImages", "VOC images (JPEGImages)")
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
                f"{len(overlap)} training ids of {train_origin} are also validation ids, e.g. {overlap[:_MAX_LISTED]}."
            )
    encoding = _class_id_encoding(len(VOC_CLASS_NAMES))
    splits: dict[str, datasets.Dataset] = {}
    for split, ids, origin in (("train", train_ids, train_origin), ("validation", val_ids, str(val_list))):
        if ids is None:
            logger.warning(f"No VOC {split} list found: the DatasetDict has no {split!r} split.")
            continue
        samples = _voc_samples(ids, origin, images_dir, mask_dirs, encoding)
        logger.info(f"VOC {split}: {len(samples)} images from {origin}.")
        splits[split] = _build_split(samples, split, VOC_CLASS_NAMES, f"PASCAL VOC 2012 ({origin})")
    return datasets.DatasetDict(splits)


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


def _cityscapes_pairs(source: Path, source_split: str) -> tuple[list[_Sample], str] | None:
    """The samples of one split, in the official layout or the CPS one; `None` if the split is absent."""
    label_ids, train_ids = _cityscapes_label_id_encoding(), _class_id_encoding(len(CITYSCAPES_CLASS_NAMES))
    if (source / "leftImg8bit").is_dir():
        images_dir = source / "leftImg8bit" / source_split
        if not images_dir.is_dir():
            return None
        masks_dir = _require_dir(source / "gtFine" / source_split, f"Cityscapes {source_split} annotation")
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
        masks_dir = _require_dir(
            source / "segmentation" / source_split, f"Cityscapes {source_split} segmentation"
        )
        images = _files_by_id(images_dir, ".png")
        masks = _files_by_id(masks_dir, "_gtFine.png")  # already trainIds in this layout
        layout = "images + segmentation (trainIds)"
    pairs = _pair_by_stem(images, masks, images_dir, masks_dir)
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
    source = _require_dir(Path(source), "Cityscapes")
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
        splits[split] = _build_split(samples, split, CITYSCAPES_CLASS_NAMES, f"Cityscapes fine ({layout})")
    if (source / "leftImg8bit" / "test").is_dir() or (source / "images" / "test").is_dir():
        logger.info("Cityscapes test split skipped: its public labels are all 'unlabeled'.")
    if not splits:
        raise ValueError(f"No Cityscapes train or val split in {str(source)!r}.")
    return datasets.DatasetDict(splits)


def _shared_class_names(dataset_dict: datasets.DatasetDict) -> list[str] | None:
    names = {split: dataset_class_names(dataset) for split, dataset in dataset_dict.items()}
    distinct = {tuple(split_names) for split_names in names.values() if split_names is not None}
    if len(distinct) > 1:
        raise ValueError(f"The splits name different classes: {names}.")
    return list(distinct.pop()) if distinct else None


def save_dataset(dataset_dict: datasets.DatasetDict, output: Path, parquet: bool = False) -> None:
    """Saves converted splits with `save_to_disk` (and optionally as parquet files).

    Args:
        dataset_dict (`datasets.DatasetDict`):
            The converted splits.
        output (`Path`):
            Target folder; load it back with `cps_hf.data.load_segmentation_dataset(str(output))`.
        parquet (`bool`, *optional*, defaults to `False`):
            Also write `output/parquet/<split>.parquet` with the image bytes embedded, and
            `output/parquet/id2label.json` naming the classes: a folder that `load_segmentation_dataset` also reads
            (class names included), e.g. to copy or upload elsewhere.
    """
    output = Path(output)
    dataset_dict.save_to_disk(str(output))
    if not parquet:
        return
    parquet_dir = output / "parquet"
    parquet_dir.mkdir(parents=True, exist_ok=True)
    for split, dataset in dataset_dict.items():
        # `to_parquet` keeps only paths of file-backed images; embedding first stores the bytes themselves.
        embedded = dataset.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
        embedded.to_parquet(str(parquet_dir / f"{split}.parquet"))
        logger.info(f"Wrote {parquet_dir / f'{split}.parquet'} ({len(dataset)} rows).")
    class_names = _shared_class_names(dataset_dict)
    if class_names is not None:
        write_id2label(parquet_dir / CLASS_NAMES_FILE, class_names)


def _downscaled_bytes(value: dict[str, bytes | str | None], factor: int, resample: int) -> bytes:
    with PILImage.open(io.BytesIO(value["bytes"])) as image:
        image.load()
        size = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
        resized = image.resize(size, resample=resample)
        buffer = io.BytesIO()
        resized.save(buffer, format="PNG")
    return buffer.getvalue()


def downscale_dataset(dataset_dict: datasets.DatasetDict, factor: int) -> datasets.DatasetDict:
    """Shrinks every image and mask by `factor` (images: antialiased bilinear, masks: nearest, so ids survive).

    For CPU-sized experiments on real data, e.g. CamVid's 360x480 frames at 180x240 with `factor=2`. Images are
    re-encoded as PNG (lossless); split info (class names) is kept.

    Args:
        dataset_dict (`datasets.DatasetDict`):
            Splits with `image` and `label` columns as written by the converters of this module.
        factor (`int`):
            Integer shrink factor (>= 1); each side becomes `round(side / factor)`.

    Returns:
        `datasets.DatasetDict`: the downscaled splits (the input when `factor == 1`).
    """
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"downscale factor must be an integer >= 1, got {factor!r}.")
    if factor == 1:
        return dataset_dict

    def shrink(batch: dict[str, list]) -> dict[str, list]:
        return {
            "image": [
                {"bytes": _downscaled_bytes(value, factor, PILImage.Resampling.BILINEAR), "path": None}
                for value in batch["image"]
            ],
            "label": [
                {"bytes": _downscaled_bytes(value, factor, PILImage.Resampling.NEAREST), "path": None}
                for value in batch["label"]
            ],
        }

    downscaled = {}
    for split, dataset in dataset_dict.items():
        undecoded = dataset.cast_column("image", datasets.Image(decode=False)).cast_column(
            "label", datasets.Image(decode=False)
        )
        shrunk = undecoded.map(shrink, batched=True, batch_size=64, desc=f"Downscaling {split} x1/{factor}")
        shrunk = shrunk.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())
        shrunk.info.description = dataset.info.description
        downscaled[split] = shrunk
    return datasets.DatasetDict(downscaled)


def push_dataset_to_hub(
    dataset_dict: datasets.DatasetDict, repo_id: str, *, private: bool = False, token: str | None = None
) -> None:
    """Uploads converted splits to a Hub dataset repo: parquet shards with embedded bytes
    (`DatasetDict.push_to_hub`) and an `id2label.json` naming the classes, which `load_segmentation_dataset(repo_id)`
    reads back.

    Args:
        dataset_dict (`datasets.DatasetDict`):
            The converted splits.
        repo_id (`str`):
            The dataset repo, e.g. `"me/voc-aug"` (created if needed).
        private (`bool`, *optional*, defaults to `False`):
            Create the repo as private.
        token (`str`, *optional*):
            Hub token; defaults to the stored login (`hf auth login`) or `HF_TOKEN`.

    Raises:
        ConnectionError: if offline mode is on (`HF_HUB_OFFLINE=1`) or the upload fails (the cause is chained).
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(
            f"Cannot push to the Hub dataset {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1). Unset it and log in "
            "(`hf auth login`), or share the saved folder instead."
        )
    class_names = _shared_class_names(dataset_dict)
    try:
        dataset_dict.push_to_hub(repo_id, private=private, token=token)
        if class_names is not None:
            with tempfile.TemporaryDirectory() as folder:
                HfApi(token=token).upload_file(
                    path_or_fileobj=write_id2label(Path(folder) / CLASS_NAMES_FILE, class_names),
                    path_in_repo=CLASS_NAMES_FILE,
                    repo_id=repo_id,
                    repo_type="dataset",
                    commit_message="Class names (id2label.json)",
                )
    # The Hub client's transport errors are not `OSError`s, so every failure is reported the same way.
    except Exception as error:
        raise ConnectionError(
            f"Could not push the dataset to the Hub repo {repo_id!r} ({type(error).__name__}: {error}). Check the "
            "connection and the token (`hf auth login` or HF_TOKEN)."
        ) from error
    logger.info(f"Pushed {dict(dataset_dict.num_rows)} rows to the Hub dataset {repo_id!r}.")
