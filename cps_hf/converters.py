"""Converters from common on-disk segmentation layouts to the `datasets.DatasetDict` the project trains on.

Every converter returns splits with the columns `id` (`str`), `image` (`datasets.Image`) and `label`
(`datasets.Image`: single-channel PNG of class ids, 255 = ignore), and the class names as JSON
`{"class_names": [...]}` in each split's `info.description` (the convention of [`make_synthetic_segmentation_dataset`],
read back by `cps_hf.experiment.resolve_class_names`). Image files are stored as their original bytes; a mask is
re-encoded only when its values are remapped (e.g. CamVid's void id 11 becomes 255).

    >>> from pathlib import Path
    >>> from cps_hf.converters import convert_camvid, save_dataset
    >>> dataset_dict = convert_camvid(Path("CamVid"))  # doctest: +SKIP
    >>> save_dataset(dataset_dict, Path("data/camvid"), parquet=True)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
from datasets.table import embed_table_storage
from PIL import Image as PILImage
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "CAMVID_CLASS_NAMES",
    "CAMVID_VOID_ID",
    "IGNORE_INDEX",
    "convert_camvid",
    "convert_folder",
    "downscale_dataset",
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

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Source split name -> split name in the DatasetDict (the project's evaluation split is called "validation").
_CAMVID_SPLITS: dict[str, str] = {"train": "train", "val": "validation", "test": "test"}
_MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
_MAX_LISTED = 5


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


def _mask_entry(path: Path, num_classes: int, void_id: int | None) -> dict[str, bytes | str | None]:
    """Reads, checks and (if needed) remaps one mask; returns an `Image` feature entry."""
    values = _read_mask(path)
    allowed = set(range(num_classes)) | {IGNORE_INDEX}
    if void_id is not None:
        allowed.add(void_id)
    present = np.unique(values)
    bad = [int(value) for value in present if int(value) not in allowed]
    if bad:
        raise ValueError(
            f"Mask {str(path)!r} holds values {bad[: _MAX_LISTED * 2]} outside the class ids 0..{num_classes - 1}"
            f"{f', void {void_id}' if void_id is not None else ''} and the ignore index {IGNORE_INDEX}."
        )
    needs_remap = void_id is not None and void_id in present
    # Original bytes only when they already decode to the stored ids as 8-bit single-channel PNG.
    with PILImage.open(path) as mask:
        keep_bytes = mask.format == "PNG" and mask.mode in ("L", "P")
    if needs_remap:
        values = np.where(values == void_id, IGNORE_INDEX, values)
    if needs_remap or not keep_bytes:
        return {"bytes": _encode_mask(values), "path": None}
    return {"bytes": path.read_bytes(), "path": None}


def _build_split(
    pairs: Sequence[tuple[str, Path, Path]],
    split: str,
    class_names: Sequence[str],
    source_description: str,
    void_id: int | None = None,
) -> datasets.Dataset:
    ids, images, labels = [], [], []
    for sample_id, image_path, mask_path in pairs:
        ids.append(sample_id)
        images.append({"bytes": image_path.read_bytes(), "path": None})
        labels.append(_mask_entry(mask_path, len(class_names), void_id))
    # JSON, so that the class names survive copies of the dataset (see `cps_hf.synthetic`).
    description = {"dataset": source_description, "class_names": list(class_names)}
    info = datasets.DatasetInfo(description=json.dumps(description), features=_features())
    return datasets.Dataset.from_dict(
        {"id": ids, "image": images, "label": labels}, features=_features(), info=info, split=split
    )


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
        splits[split] = _build_split(
            pairs, split, CAMVID_CLASS_NAMES, "CamVid (SegNet 11-class split)", void_id=CAMVID_VOID_ID
        )
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
    dataset = _build_split(pairs, split, class_names, f"folder {images_dir.name} + {masks_dir.name}")
    return datasets.DatasetDict({split: dataset})


def save_dataset(dataset_dict: datasets.DatasetDict, output: Path, parquet: bool = False) -> None:
    """Saves converted splits with `save_to_disk` (and optionally as parquet files).

    Args:
        dataset_dict (`datasets.DatasetDict`):
            The converted splits.
        output (`Path`):
            Target folder; load it back with `cps_hf.data.load_segmentation_dataset(str(output))`.
        parquet (`bool`, *optional*, defaults to `False`):
            Also write `output/parquet/<split>.parquet` with the image bytes embedded (a folder that
            `load_segmentation_dataset` also reads, e.g. for uploading to the Hub); the parquet files do not keep
            `info.description`, so training from them needs `--class_names`).
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
