"""Semi-supervised segmentation data from Hugging Face `datasets`.

The pieces, in the order a training script uses them:

1. [`load_segmentation_dataset`] turns a name into a `datasets.DatasetDict` (a `save_to_disk` folder, a folder of
   parquet files, an `imagefolder` folder, a Hub id, or `"synthetic"` for the embedded generated dataset).
2. [`select_labeled_indices`] picks the labelled rows of the train split (an official split file of ids, a
   fraction or a count); [`split_fingerprint`] names that choice so a run can record it;
   [`make_labeled_partitions`] writes seeded 1/16 .. 1/2 split files for any dataset.
3. [`SemiSupervisedSegmentationDataset`] pairs every unlabelled sample with a labelled one (and, for CutMix, a
   second unlabelled sample and a box mask) and augments them with [`SegmentationTransform`];
   [`SupervisedSegmentationDataset`] serves an evaluation split (or a supervised-only training set).
4. [`collate_semi_supervised`] stacks items into a batch.

Images are decoded to RGB whatever their mode (greyscale, palette, RGBA, 16-bit); masks are decoded to int64 class
ids *without* palette remapping (a palette PNG's indices are the class ids, as in Pascal VOC).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import Tensor
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "CLASS_NAMES_FILE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "PAPER_SCALES",
    "SemiSupervisedSegmentationDataset",
    "SegmentationTransform",
    "SupervisedEvalDataset",
    "SupervisedSegmentationDataset",
    "UndecodableSampleError",
    "check_columns",
    "collate_semi_supervised",
    "complement_indices",
    "dataset_class_names",
    "decode_image",
    "decode_mask",
    "file_sha256",
    "fraction_tag",
    "item_seed",
    "load_segmentation_dataset",
    "make_labeled_partitions",
    "parse_fraction",
    "read_id2label",
    "read_split_ids",
    "select_indices_from_ids_file",
    "select_labeled_indices",
    "set_dataset_class_names",
    "size_pair",
    "split_fingerprint",
    "split_line_id",
    "write_id2label",
    "write_labeled_partitions",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PAPER_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
"""Random-scale factors of the CPS recipe, chosen uniformly."""
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes read as images (by the converters, and to recognise file names in split lists)."""
CLASS_NAMES_FILE = "id2label.json"
"""Names the classes next to parquet files and in a Hub dataset repo, as `{"0": "background", ...}` (the file the
transformers semantic-segmentation example reads)."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _parquet_split_name(file_path: Path) -> str:
    """`train-00000-of-00002.parquet` / `train.parquet` / `validation-abc.parquet` -> the part before the first `-`."""
    return file_path.name.removesuffix(".parquet").split("-")[0]


def load_segmentation_dataset(
    dataset_name: str | None, cache_dir: str | None = None, **kwargs: Any
) -> datasets.DatasetDict:
    """Loads a segmentation dataset as a `datasets.DatasetDict`.

    `dataset_name` may be:

    - `None` or `"synthetic"`: the embedded generated dataset ([`make_synthetic_segmentation_dataset`]; `kwargs`
      go to it, `cache_dir` is its cache root);
    - a folder written by `DatasetDict.save_to_disk` (has `dataset_dict.json`) or `Dataset.save_to_disk` (the
      single dataset becomes split `"train"`);
    - a folder holding `*.parquet` files (searched recursively); the split of a file is the part of its name before
      the first `-`, e.g. `train-00000-of-00002.parquet` and `train.parquet` both belong to `"train"`; an
      `id2label.json` ([`CLASS_NAMES_FILE`]) in the folder names the classes;
    - a single `.parquet` file (split `"train"`; class names from an `id2label.json` next to it);
    - any other folder, loaded as an `imagefolder` (a `metadata.csv` with `file_name,mask_file_name` per split
      folder gives the columns `image` and `mask`: pass `label_column="mask"` downstream);
    - otherwise a Hub dataset id, loaded with `datasets.load_dataset(dataset_name, **kwargs)`; an `id2label.json`
      in the dataset repo names the classes.

    Class names found in an `id2label.json` are stored in every split's `info.description` (see
    [`dataset_class_names`]), as the converters of `cps_hf.converters` do for `save_to_disk` folders.

    Args:
        dataset_name (`str`, *optional*):
            What to load, see above.
        cache_dir (`str`, *optional*):
            Cache folder for `datasets.load_dataset` (or the synthetic dataset's cache root).
        kwargs:
            Passed to `datasets.load_dataset` (e.g. `revision`, `name`) or to the synthetic generator.

    Returns:
        `datasets.DatasetDict`: the splits of the dataset.

    Raises:
        ConnectionError: if a Hub id cannot be loaded because the Hub is unreachable or offline mode is on.
        FileNotFoundError: if `dataset_name` looks like a local path (starts with `.`, `/` or `~`) but does not
            exist.
    """
    if dataset_name is None or dataset_name == "synthetic":
        from .synthetic import make_synthetic_segmentation_dataset

        return make_synthetic_segmentation_dataset(cache_dir=cache_dir, **kwargs)

    local_path = Path(dataset_name).expanduser()
    if local_path.is_dir():
        if (local_path / "dataset_dict.json").is_file() or (local_path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(local_path), **kwargs)
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({"train": loaded})
            return loaded
        parquet_files = sorted(local_path.rglob("*.parquet"))
        if parquet_files:
            data_files: dict[str, list[str]] = defaultdict(list)
            for file_path in parquet_files:
                data_files[_parquet_split_name(file_path)].append(str(file_path))
            logger.info(f"Loading parquet files from {local_path} as splits {sorted(data_files)}.")
            loaded = datasets.load_dataset(
                "parquet", data_files=dict(data_files), cache_dir=cache_dir, **kwargs
            )
            _attach_class_names_file(loaded, local_path / CLASS_NAMES_FILE)
            return loaded
        return datasets.load_dataset("imagefolder", data_dir=str(local_path), cache_dir=cache_dir, **kwargs)
    if local_path.is_file() and local_path.suffix == ".parquet":
        loaded = datasets.load_dataset(
            "parquet", data_files={"train": str(local_path)}, cache_dir=cache_dir, **kwargs
        )
        _attach_class_names_file(loaded, local_path.parent / CLASS_NAMES_FILE)
        return loaded
    if dataset_name.startswith((".", "/", "~")) or local_path.is_file():
        raise FileNotFoundError(
            f"Dataset path {dataset_name!r} is not a folder (expected a save_to_disk folder, a folder of parquet "
            "files or an imagefolder)."
        )

    try:
        loaded = datasets.load_dataset(dataset_name, cache_dir=cache_dir, **kwargs)
    except ConnectionError as error:
        raise ConnectionError(
            f"Could not load dataset {dataset_name!r}: the Hugging Face Hub could not be reached ({error}). "
            "Check your connection and HF_HUB_OFFLINE, or pass a local path instead: a `save_to_disk` folder, a "
            "folder of parquet files or an imagefolder (or 'synthetic' for the built-in dataset)."
        ) from error
    if not isinstance(loaded, datasets.DatasetDict):
        raise TypeError(
            f"Expected a DatasetDict for {dataset_name!r}, got {type(loaded).__name__}; do not pass `split` or "
            "`streaming=True`."
        )
    _attach_class_names_file(loaded, _download_hub_class_names_file(dataset_name, kwargs.get("revision")))
    return loaded


def _download_hub_class_names_file(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, CLASS_NAMES_FILE, repo_type="dataset", revision=revision))
    except (EntryNotFoundError, OSError) as error:
        logger.info(f"No {CLASS_NAMES_FILE} in the Hub dataset {repo_id!r} ({type(error).__name__}).")
        return None


def _attach_class_names_file(dataset_dict: datasets.DatasetDict, path: Path | None) -> None:
    """Stores the class names of an `id2label.json` in the splits that do not name their classes yet."""
    if path is None or not path.is_file():
        return
    class_names = read_id2label(path)
    for dataset in dataset_dict.values():
        if dataset_class_names(dataset) is None:
            set_dataset_class_names(dataset, class_names)


# --------------------------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------------------------


def dataset_class_names(dataset: datasets.Dataset) -> list[str] | None:
    """The class names a split stores in its `info.description` (JSON with a `"class_names"` list), or `None`."""
    try:
        names = json.loads(dataset.info.description or "").get("class_names")
    except (json.JSONDecodeError, AttributeError):
        return None
    return [str(name) for name in names] if names else None


def set_dataset_class_names(
    dataset: datasets.Dataset, class_names: Sequence[str], details: Mapping[str, Any] | None = None
) -> None:
    """Stores `class_names` (and JSON-serialisable `details`, e.g. `{"dataset": "CamVid"}`) in
    `dataset.info.description`.

    The description is JSON (`{"class_names": [...], ...}`) so that it survives `save_to_disk`, `select` and the
    other copies `datasets` makes; other keys of a JSON description are kept, a plain-text description is kept
    under `"description"`.
    """
    try:
        description = json.loads(dataset.info.description or "{}")
    except json.JSONDecodeError:
        description = None
    if not isinstance(description, dict):
        description = {"description": dataset.info.description}
    description.update(details or {})
    description["class_names"] = [str(name) for name in class_names]
    dataset.info.description = json.dumps(description)


def write_id2label(path: str | os.PathLike, class_names: Sequence[str]) -> Path:
    """Writes `{"0": name_0, "1": name_1, ...}` to `path` (see [`CLASS_NAMES_FILE`]) and returns the path."""
    path = Path(path)
    path.write_text(json.dumps({str(index): str(name) for index, name in enumerate(class_names)}, indent=2))
    return path


def read_id2label(path: str | os.PathLike) -> list[str]:
    """Reads an `id2label.json` (`{"0": name_0, ...}`) into the list of class names in id order.

    Raises:
        ValueError: if the file is not such a mapping or the ids are not `0 .. n-1`.
    """
    mapping = json.loads(Path(path).read_text())
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{str(path)!r} must hold a non-empty JSON object `{{'0': name, ...}}`.")
    try:
        names_by_id = {int(key): str(name) for key, name in mapping.items()}
    except ValueError:
        raise ValueError(f"{str(path)!r}: keys must be class ids, got {list(mapping)[:5]}.") from None
    if sorted(names_by_id) != list(range(len(names_by_id))):
        raise ValueError(
            f"{str(path)!r} must name the classes 0..{len(names_by_id) - 1} without gaps, got ids "
            f"{sorted(names_by_id)[:10]}."
        )
    return [names_by_id[index] for index in range(len(names_by_id))]


def get_split(dataset_dict: datasets.DatasetDict, split: str, dataset_name: str | None) -> datasets.Dataset:
    """The split `split` of `dataset_dict`, or a `ValueError` naming the dataset and the splits it has."""
    if split not in dataset_dict:
        raise ValueError(
            f"Dataset {dataset_name!r} has no split {split!r}; available: {sorted(dataset_dict)}."
        )
    return dataset_dict[split]


def check_columns(
    dataset: datasets.Dataset,
    image_column: str,
    label_column: str | None = None,
    split_name: str | None = None,
    dataset_name: str | None = None,
) -> None:
    """Checks that a dataset has the image (and label) columns.

    Args:
        dataset (`datasets.Dataset`):
            The dataset (one split).
        image_column (`str`):
            Name of the image column.
        label_column (`str`, *optional*):
            Name of the label-mask column; not checked when `None` (image-only datasets).
        split_name (`str`, *optional*):
            Split name, used in the error message.
        dataset_name (`str`, *optional*):
            Dataset name, used in the error message.

    Raises:
        ValueError: naming the missing columns and listing the available ones.
    """
    wanted = [image_column] + ([label_column] if label_column is not None else [])
    missing = [column for column in wanted if column not in dataset.column_names]
    if missing:
        where = f" {dataset_name!r}" if dataset_name else ""
        where += f" (split {split_name!r})" if split_name else ""
        raise ValueError(
            f"Column(s) {missing} not found in the dataset{where}; available columns: {dataset.column_names}. "
            "Set the image/label column names accordingly."
        )


# --------------------------------------------------------------------------------------------------------------
# Labelled split selection
# --------------------------------------------------------------------------------------------------------------


def split_line_id(line: str) -> str:
    """The sample id named by one line of a split file.

    - `2007_000032` (the VOC lists): the line itself;
    - `/images/train/jena_000078_000019.png<TAB>/segmentation/train/jena_000078_000019_gtFine.png` (the Cityscapes
      lists), `image annotation` (SegNet lists) or a single path such as `JPEGImages/2007_000032.jpg`: the file
      stem of the first field, without Cityscapes' `_leftImg8bit` suffix (`jena_000078_000019`), which is the `id`
      the converters of `cps_hf.converters` give that image.

    Args:
        line (`str`):
            One non-blank line, surrounding whitespace stripped.

    Returns:
        `str`: the sample id.
    """
    fields = line.split("\t") if "\t" in line else line.split()
    first = fields[0].strip()
    is_path = len(fields) > 1 or "/" in first or "\\" in first or Path(first).suffix.lower() in IMAGE_SUFFIXES
    return Path(first.replace("\\", "/")).stem.removesuffix("_leftImg8bit") if is_path else first


def read_split_ids(path: str | os.PathLike) -> list[str]:
    """Reads a split file in either official format: one sample id per line (VOC, e.g. `2007_000032`), or
    `image_path<TAB>label_path` lines (Cityscapes, e.g. `/images/train/jena_000078_000019.png<TAB>...`).

    Blank lines are ignored and surrounding whitespace (including Windows line ends) is stripped; the id of a
    line is given by [`split_line_id`].

    Args:
        path (`str` or `os.PathLike`):
            The split file.

    Returns:
        `list[str]`: the ids in file order (duplicates kept; [`select_indices_from_ids_file`] reports them).
    """
    with open(path, encoding="utf-8") as split_file:
        return [split_line_id(line.strip()) for line in split_file if line.strip()]


def _dataset_ids(dataset: datasets.Dataset, id_column: str) -> list[str]:
    if id_column in dataset.column_names:
        return [str(sample_id) for sample_id in dataset.data.column(id_column).to_pylist()]
    return [str(row) for row in range(len(dataset))]


def select_indices_from_ids_file(
    dataset: datasets.Dataset,
    ids_file: str | os.PathLike,
    *,
    id_column: str = "id",
    dataset_name: str | None = None,
    subset: str = "labelled",
) -> list[int]:
    """The rows of `dataset` whose ids a split file lists (see [`read_split_ids`]).

    Args:
        dataset (`datasets.Dataset`):
            The split the ids refer to.
        ids_file (`str` or `os.PathLike`):
            The split file.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column holding the sample ids; without it, the ids are row indices written as strings.
        dataset_name (`str`, *optional*):
            Name of the dataset, for error messages.
        subset (`str`, *optional*, defaults to `"labelled"`):
            What the file selects (`"labelled"` or `"unlabelled"`), for error messages.

    Returns:
        `list[int]`: the sorted row indices.

    Raises:
        ValueError: if the file lists no ids, an id more than once, or ids that are not in the dataset (their
            number, the first few and a few of the dataset's ids are shown).
    """
    source = f"dataset {dataset_name!r}" if dataset_name else "the dataset"
    wanted_ids = read_split_ids(ids_file)
    if not wanted_ids:
        raise ValueError(
            f"Split file {str(ids_file)!r} lists no ids: the {subset} set of {source} would be empty."
        )
    duplicates = sorted(sample_id for sample_id, count in Counter(wanted_ids).items() if count > 1)
    if duplicates:
        raise ValueError(
            f"Split file {str(ids_file)!r} lists {len(duplicates)} id(s) more than once, e.g. {duplicates[:5]}."
        )
    dataset_ids = _dataset_ids(dataset, id_column)
    row_by_id: dict[str, int] = {}
    for row, sample_id in enumerate(dataset_ids):
        row_by_id.setdefault(sample_id, row)
    unknown = [sample_id for sample_id in wanted_ids if sample_id not in row_by_id]
    if unknown:
        where = (
            f"column {id_column!r}" if id_column in dataset.column_names else "the row indices (no id column)"
        )
        raise ValueError(
            f"{len(unknown)} of the {len(wanted_ids)} ids in {str(ids_file)!r} are not in {where} of {source}, "
            f"e.g. {unknown[:5]} (the dataset's ids look like {dataset_ids[:3]})."
        )
    return sorted(row_by_id[sample_id] for sample_id in wanted_ids)


def _labeled_count(labeled_fraction: float | Fraction, num_rows: int) -> int:
    # Rounded up, as the official lists: 1/16 of VOC's 10,582 is 662, 1/8 of Cityscapes' 2,975 is 372. The
    # fraction is made exact first so that e.g. 0.1 * 30 gives 3, not 4.
    return max(1, math.ceil(Fraction(labeled_fraction).limit_denominator(10**9) * num_rows))


def select_labeled_indices(
    dataset: datasets.Dataset,
    *,
    labeled_ids_file: str | os.PathLike | None = None,
    labeled_fraction: float | Fraction | None = None,
    labeled_count: int | None = None,
    split_seed: int = 0,
    id_column: str = "id",
    dataset_name: str | None = None,
) -> list[int]:
    """Chooses the labelled rows of a training split.

    Exactly one of `labeled_ids_file`, `labeled_fraction` and `labeled_count` must be given. A random choice
    (fraction or count) is drawn with `numpy.random.Generator(PCG64(split_seed))` and depends only on the seed
    and the number of rows.

    Args:
        dataset (`datasets.Dataset`):
            The training split.
        labeled_ids_file (`str` or `os.PathLike`, *optional*):
            A split file (see [`read_split_ids`]); its ids are looked up in `id_column`, or, if the dataset has no
            such column, taken as row indices written as strings (see [`select_indices_from_ids_file`]).
        labeled_fraction (`float` or `fractions.Fraction`, *optional*):
            Fraction in `(0, 1]` of the rows to label; the count is rounded up, as in the official split lists
            (1/16, 1/8, 1/4, 1/2 of VOC's 10,582 images: 662, 1,323, 2,646, 5,291).
        labeled_count (`int`, *optional*):
            Number of rows to label.
        split_seed (`int`, *optional*, defaults to 0):
            Seed of the random choice.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column holding the sample ids.
        dataset_name (`str`, *optional*):
            Dataset name, used in error messages.

    Returns:
        `list[int]`: sorted row indices of the labelled samples.

    Raises:
        ValueError: if not exactly one option is given, the fraction or count is out of range, the file has
            duplicate ids or ids that are not in the dataset (their number and the first few are shown).
    """
    given = [
        name
        for name, value in (
            ("labeled_ids_file", labeled_ids_file),
            ("labeled_fraction", labeled_fraction),
            ("labeled_count", labeled_count),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(
            "Exactly one of `labeled_ids_file`, `labeled_fraction` and `labeled_count` must be given, got "
            f"{given or 'none'}."
        )
    num_rows = len(dataset)
    if labeled_ids_file is not None:
        return select_indices_from_ids_file(
            dataset, labeled_ids_file, id_column=id_column, dataset_name=dataset_name
        )

    if labeled_fraction is not None:
        if not 0.0 < labeled_fraction <= 1.0:
            raise ValueError(f"`labeled_fraction` must be in (0, 1], got {labeled_fraction}.")
        labeled_count = _labeled_count(labeled_fraction, num_rows)
    if not 1 <= labeled_count <= num_rows:
        raise ValueError(
            f"`labeled_count` must be between 1 and the number of rows ({num_rows}), got {labeled_count}."
        )
    rng = np.random.default_rng(split_seed)
    return sorted(int(row) for row in rng.choice(num_rows, size=labeled_count, replace=False))


def complement_indices(num_rows: int, indices: Sequence[int]) -> list[int]:
    """Returns the sorted rows of `range(num_rows)` that are not in `indices` (e.g. the unlabelled rows)."""
    excluded = set(int(index) for index in indices)
    return [row for row in range(num_rows) if row not in excluded]


def split_fingerprint(indices: Sequence[int]) -> str:
    """A short, order-independent fingerprint of a set of row indices (first 16 hex digits of a sha256)."""
    text = ",".join(str(index) for index in sorted(int(index) for index in indices))
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes (e.g. to record which split file a run used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_fraction(text: str) -> Fraction:
    """Parses a labelled fraction written as `"1/8"` or `"0.125"`.

    Raises:
        ValueError: if `text` is not a number or a ratio, or is not in `(0, 1]`.
    """
    try:
        fraction = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"Expected a fraction such as '1/8' or '0.125', got {text!r}.") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"A labelled fraction must be in (0, 1], got {text!r}.")
    return fraction


def fraction_tag(fraction: Fraction | float) -> str:
    """The file-name tag of a fraction, as in the official split files: 1/8 -> `"1-8"`, 0.3 -> `"3-10"`."""
    fraction = Fraction(fraction).limit_denominator(10**9)
    return f"{fraction.numerator}-{fraction.denominator}"


def make_labeled_partitions(
    dataset: datasets.Dataset,
    fractions: Sequence[Fraction | float],
    *,
    split_seed: int = 0,
    id_column: str = "id",
) -> dict[str, tuple[list[str], list[str]]]:
    """Seeded labelled/unlabelled partitions of a training split, one per fraction.

    The labelled rows of fraction `f` are exactly those that training with `--labeled_fraction f --split_seed
    split_seed` selects ([`select_labeled_indices`]: the count is rounded up), so training from the written files
    and training from the fraction use the same rows. Partitions of different fractions are drawn independently
    and are not guaranteed to be nested, unlike the official CPS lists (1/16 ⊂ 1/8 ⊂ 1/4 ⊂ 1/2).

    Args:
        dataset (`datasets.Dataset`):
            The training split.
        fractions (`Sequence[fractions.Fraction | float]`):
            Labelled fractions in `(0, 1]`, e.g. `[Fraction(1, 16), Fraction(1, 8)]`.
        split_seed (`int`, *optional*, defaults to 0):
            Seed of every draw.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column holding the sample ids; without it, the ids are row indices written as strings.

    Returns:
        `dict[str, tuple[list[str], list[str]]]`: per fraction tag ([`fraction_tag`], e.g. `"1-8"`), the labelled
        and the unlabelled ids, each in row order.

    Raises:
        ValueError: if the dataset's ids are not unique (a list of ids could not name the rows) or a fraction is not
            in `(0, 1]`.
    """
    ids = _dataset_ids(dataset, id_column)
    duplicates = sorted(sample_id for sample_id, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(
            f"Column {id_column!r} holds {len(duplicates)} id(s) more than once, e.g. {duplicates[:5]}; split files "
            "need unique ids."
        )
    partitions = {}
    for fraction in fractions:
        labeled = select_labeled_indices(
            dataset, labeled_fraction=fraction, split_seed=split_seed, id_column=id_column
        )
        unlabeled = complement_indices(len(ids), labeled)
        partitions[fraction_tag(fraction)] = ([ids[row] for row in labeled], [ids[row] for row in unlabeled])
    return partitions


def write_labeled_partitions(
    partitions: Mapping[str, tuple[Sequence[str], Sequence[str]]], output_dir: str | os.PathLike
) -> dict[str, dict[str, Any]]:
    """Writes `labeled_<tag>.txt` and `unlabeled_<tag>.txt` per partition: one id per line, the official VOC
    format, which `--labeled_ids_file` (and `--unlabeled_ids_file`) read.

    Args:
        partitions (`Mapping[str, tuple[Sequence[str], Sequence[str]]]`):
            Output of [`make_labeled_partitions`].
        output_dir (`str` or `os.PathLike`):
            Folder for the files (created if needed).

    Returns:
        `dict[str, dict[str, Any]]`: per tag, the file names, the counts and the labelled file's SHA-256 (the value
        a training run records as `labeled_ids_file_sha256`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for tag, (labeled_ids, unlabeled_ids) in partitions.items():
        labeled_file, unlabeled_file = output_dir / f"labeled_{tag}.txt", output_dir / f"unlabeled_{tag}.txt"
        labeled_file.write_text("".join(f"{sample_id}\n" for sample_id in labeled_ids), encoding="utf-8")
        unlabeled_file.write_text("".join(f"{sample_id}\n" for sample_id in unlabeled_ids), encoding="utf-8")
        summary[tag] = {
            "labeled_file": labeled_file.name,
            "unlabeled_file": unlabeled_file.name,
            "num_labeled": len(labeled_ids),
            "num_unlabeled": len(unlabeled_ids),
            "labeled_sha256": file_sha256(labeled_file),
        }
    return summary


def item_seed(base_seed: int, epoch: int, index: int) -> int:
    """The seed of one item's augmentation: a fixed hash of `(base_seed, epoch, index)` in `[0, 2**63)`.

    Unlike Python's `hash`, it is identical across processes and runs.
    """
    digest = hashlib.sha256(f"cps_hf:{base_seed}:{epoch}:{index}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


class UndecodableSampleError(ValueError):
    """An image or mask whose stored bytes (or file) cannot be decoded; the message names the sample."""


def _open_pil(value: Any, sample_name: str, what: str) -> PILImage.Image | np.ndarray:
    """Returns a PIL image (or an array as given) for a `datasets.Image` value, a path or a PIL image."""
    if isinstance(value, PILImage.Image | np.ndarray):
        return value
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, list):  # e.g. an `Array2D`/`Sequence` column
        return np.asarray(value)
    try:
        if isinstance(value, Mapping):
            if value.get("bytes") is not None:
                image = PILImage.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = PILImage.open(value["path"])
            else:
                raise ValueError("neither bytes nor path")
        elif isinstance(value, str | os.PathLike):
            image = PILImage.open(value)
        elif isinstance(value, bytes):
            image = PILImage.open(io.BytesIO(value))
        else:
            raise TypeError(f"unsupported value of type {type(value).__name__}")
        image.load()
    except Exception as error:
        reason = str(error)
        if isinstance(error, PILImage.UnidentifiedImageError) and "BytesIO" in reason:
            # PIL names the in-memory buffer object, which says nothing; show what the bytes start with instead.
            encoded = value["bytes"] if isinstance(value, Mapping) else value
            reason = f"not a known image format ({len(encoded)} bytes starting with {encoded[:12]!r})"
        raise UndecodableSampleError(f"Could not decode the {what} of {sample_name}: {reason}") from error
    return image


def _scale_to_unit_range(pixels: Tensor, sample_name: str) -> Tensor:
    """uint8 / uint16 pixels to float32 in [0, 1]; floating-point pixels are taken to be in [0, 1] already."""
    if pixels.dtype == torch.uint8:
        return pixels.float() / 255.0
    if pixels.dtype == torch.uint16:
        return pixels.float() / 65535.0
    if pixels.is_floating_point():
        return pixels.float()
    raise ValueError(
        f"Image of {sample_name} has unsupported dtype {pixels.dtype}; expected uint8, uint16 or float."
    )


def decode_image(value: Any, sample_name: str = "sample") -> Tensor:
    """Decodes an image to a float32 `(3, height, width)` tensor in `[0, 1]`.

    Any PIL mode is accepted: greyscale, palette, RGBA (alpha dropped), CMYK... are converted to RGB; 16-bit
    greyscale (`I;16`, `I`) is scaled from `[0, 65535]`; float (`F`) is clipped to `[0, 1]`.

    Args:
        value (`dict`, `PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` or `bytes`):
            A `datasets.Image` value (`{"bytes": ..., "path": ...}`), a decoded PIL image, a channels-last
            `(H, W[, C])` array or channels-first `(C, H, W)` tensor (uint8, uint16, or float in `[0, 1]`), a path or
            encoded bytes.
        sample_name (`str`, *optional*):
            Identifies the sample in error messages.

    Returns:
        `torch.Tensor`: float32 `(3, height, width)`.

    Raises:
        ValueError: if the value cannot be decoded, naming the sample.
    """
    if isinstance(value, Tensor):
        # Tensors are channels-first, like torchvision images: (C, H, W) or (H, W).
        pixels = value.detach().cpu()
        if pixels.ndim == 2:
            pixels = pixels.unsqueeze(0)
        if pixels.ndim != 3 or pixels.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"Image tensor of {sample_name} has shape {tuple(pixels.shape)}; expected (H, W) or (1|3|4, H, W)."
            )
        return _scale_to_unit_range(pixels[:3].expand(3, -1, -1).contiguous(), sample_name)
    image = _open_pil(value, sample_name, "image")
    if isinstance(image, np.ndarray):
        # Arrays are channels-last, like PIL images: (H, W, C) or (H, W).
        array = image[..., None] if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"Image array of {sample_name} has shape {array.shape}; expected (H, W) or (H, W, 1|3|4)."
            )
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        return _scale_to_unit_range(pixels[:3].expand(3, -1, -1).contiguous(), sample_name)
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = torch.from_numpy(np.asarray(image, dtype=np.float32)) / 65535.0
        return grey.clamp(0.0, 1.0).unsqueeze(0).expand(3, -1, -1).contiguous()
    if image.mode == "F":
        grey = torch.from_numpy(np.asarray(image, dtype=np.float32))
        return grey.clamp(0.0, 1.0).unsqueeze(0).expand(3, -1, -1).contiguous()
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def decode_mask(value: Any, sample_name: str = "sample") -> Tensor:
    """Decodes a label mask to an int64 `(height, width)` tensor of class ids.

    Palette (`P`) masks keep their raw palette indices, which are the class ids (VOC convention); `L`, `1` and
    16-bit masks keep their values. Colour (RGB) masks are rejected: convert them to class ids first.

    Args:
        value (`dict`, `PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` or `bytes`):
            A `datasets.Image` value, a decoded image, an `(H, W)` integer array, a path or encoded bytes.
        sample_name (`str`, *optional*):
            Identifies the sample in error messages.

    Returns:
        `torch.Tensor`: int64 `(height, width)`.

    Raises:
        ValueError: if the mask cannot be decoded or is not single-channel, naming the sample.
    """
    mask = _open_pil(value, sample_name, "label mask")
    if isinstance(mask, PILImage.Image):
        if mask.mode not in _MASK_MODES:
            raise ValueError(
                f"Label mask of {sample_name} has PIL mode {mask.mode!r}; expected a single-channel mask of class "
                f"ids (one of {list(_MASK_MODES)}). Convert colour-coded masks to class ids first."
            )
        # `np.asarray` of a P image gives the palette indices, not the colours.
        array = np.asarray(mask)
    else:
        array = np.asarray(mask)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2 or array.dtype.kind not in "iub":
            raise ValueError(
                f"Label mask of {sample_name} has shape {array.shape} and dtype {array.dtype}; expected an (H, W) "
                "integer array of class ids."
            )
    return torch.from_numpy(array.astype(np.int64))


def _check_mask_values(mask: Tensor, num_labels: int, ignore_index: int, sample_name: str) -> None:
    """Raises if the mask holds values outside `[0, num_labels)` other than `ignore_index`."""
    invalid = (mask < 0) | (mask >= num_labels)
    invalid &= mask != ignore_index
    if bool(invalid.any()):
        bad_values = [int(value) for value in torch.unique(mask[invalid])]
        raise ValueError(
            f"Label mask of {sample_name} holds values {bad_values[:10]} outside [0, {num_labels}) that are not "
            f"the ignore index {ignore_index}; check `num_labels` and the label encoding."
        )


# --------------------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------------------


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


def _resize_mask_nearest(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize by index gathering (pixel-centre convention, exact for any integer dtype)."""
    height, width = mask.shape
    new_height, new_width = size
    rows = (
        ((torch.arange(new_height, dtype=torch.float64) + 0.5) * (height / new_height))
        .long()
        .clamp(max=height - 1)
    )
    columns = (
        ((torch.arange(new_width, dtype=torch.float64) + 0.5) * (width / new_width))
        .long()
        .clamp(max=width - 1)
    )
    return mask[rows][:, columns]


class SegmentationTransform:
    """Joint image/mask augmentation for semantic segmentation, with explicit randomness.

    Training (`train=True`), following the CPS recipe: horizontal flip with probability `flip_probability` →
    random scale (a factor chosen uniformly from `scales`, or drawn uniformly from `scale_range`; image bilinear,
    mask nearest) → normalisation with `mean`/`std` → random crop of `crop_size`. Where the scaled image is smaller
    than the crop, it is placed at a random (or, with `pad_position="center"`, central) offset and padded with 0
    (after normalisation, i.e. the mean colour) and the mask with `ignore_index`.

    Evaluation (`train=False`): no random operation; optional resize (`eval_short_side` scales the short side to
    that length keeping the aspect ratio; `eval_size` resizes to a fixed size, so that images of different sizes
    can be batched), then normalisation. The mask is resized with nearest neighbour when the image is.

    Every random choice is drawn from the `torch.Generator` passed to each call, so the caller (the dataset)
    controls determinism; torch's global RNG is never touched.

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
        ignore_index: int = 255,
        eval_short_side: int | None = None,
        eval_size: int | tuple[int, int] | None = None,
        antialias: bool = False,
        pad_position: Literal["random", "center"] = "random",
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
        self._mean_tensor = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_tensor = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        if self.train:
            scaling = (
                f"scales={self.scales}" if self.scales is not None else f"scale_range={self.scale_range}"
            )
            details = f"crop_size={self.crop_size}, {scaling}, flip_probability={self.flip_probability}"
        else:
            details = f"eval_short_side={self.eval_short_side}, eval_size={self.eval_size}"
        return f"{type(self).__name__}(train={self.train}, {details}, mean={self.mean}, std={self.std})"

    def _draw_scale(self, generator: torch.Generator | None) -> float:
        if self.scale_range is not None:
            low, high = self.scale_range
            return low + (high - low) * float(torch.rand((), generator=generator))
        return self.scales[_random_int(0, len(self.scales) - 1, generator)]

    def _resize(
        self, image: Tensor, mask: Tensor | None, size: tuple[int, int]
    ) -> tuple[Tensor, Tensor | None]:
        if tuple(image.shape[-2:]) == size:
            return image, mask
        downscaling = size[0] < image.shape[-2] or size[1] < image.shape[-1]
        image = F.interpolate(
            image.unsqueeze(0),
            size=size,
            mode="bilinear",
            align_corners=False,
            antialias=self.antialias and downscaling,
        ).squeeze(0)
        if mask is not None:
            mask = _resize_mask_nearest(mask, size)
        return image, mask

    def _normalize(self, image: Tensor) -> Tensor:
        return (image - self._mean_tensor) / self._std_tensor

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
        if mask is not None and tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"Image and label mask of {sample_name} differ in size: image (height, width) = "
                f"{tuple(image.shape[-2:])}, mask = {tuple(mask.shape)}."
            )
        if self.train:
            return self._train_transform(image, mask, generator)
        return self._eval_transform(image, mask)

    def _train_transform(
        self, image: Tensor, mask: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        if float(torch.rand((), generator=generator)) < self.flip_probability:
            image = image.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        scale = self._draw_scale(generator)
        height, width = image.shape[-2:]
        scaled_size = (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
        image, mask = self._resize(image, mask, scaled_size)

        crop_height, crop_width = self.crop_size
        height, width = scaled_size
        # Crop window inside the (scaled) image where it is larger than the crop...
        top = _random_int(0, height - crop_height, generator)
        left = _random_int(0, width - crop_width, generator)
        image = image[:, top : top + crop_height, left : left + crop_width]
        image = self._normalize(image)
        if mask is not None:
            mask = mask[top : top + crop_height, left : left + crop_width]
        # ...and random placement of the image inside the crop where it is smaller (padding around it).
        pad_height = crop_height - image.shape[-2]
        pad_width = crop_width - image.shape[-1]
        if pad_height > 0 or pad_width > 0:
            if self.pad_position == "random":
                pad_top = _random_int(0, pad_height, generator)
                pad_left = _random_int(0, pad_width, generator)
            else:
                pad_top, pad_left = pad_height // 2, pad_width // 2
            padding = (pad_left, pad_width - pad_left, pad_top, pad_height - pad_top)
            image = F.pad(image, padding, value=0.0)
            if mask is not None:
                mask = F.pad(mask, padding, value=self.ignore_index)
        return image.contiguous(), mask.contiguous() if mask is not None else None

    def _eval_transform(self, image: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        height, width = image.shape[-2:]
        if self.eval_size is not None:
            image, mask = self._resize(image, mask, self.eval_size)
        elif self.eval_short_side is not None:
            ratio = self.eval_short_side / min(height, width)
            image, mask = self._resize(
                image, mask, (max(1, int(round(height * ratio))), max(1, int(round(width * ratio))))
            )
        return self._normalize(image).contiguous(), mask


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


class _SegmentationRows:
    """Rows of a `datasets.Dataset` (a subset given by indices) with lazy, validated image/mask decoding."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        indices: Sequence[int] | None,
        *,
        role: str,
        image_column: str,
        label_column: str | None,
        id_column: str,
        split_name: str | None,
        dataset_name: str | None = None,
        skip_undecodable: bool = False,
    ) -> None:
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(
                f"The {role} dataset must be a `datasets.Dataset` (one split), got {type(dataset).__name__}."
            )
        check_columns(dataset, image_column, label_column, split_name, dataset_name)
        num_rows = len(dataset)
        if indices is None:
            indices = range(num_rows)
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        source = f" of dataset {dataset_name!r}" if dataset_name else ""
        if rows.size == 0:
            raise ValueError(f"The {role} set{source} is empty: no rows were selected.")
        out_of_range = rows[(rows < 0) | (rows >= num_rows)]
        if out_of_range.size:
            raise ValueError(
                f"The {role} indices {out_of_range[:5].tolist()} are out of range for a dataset of {num_rows} rows."
            )
        columns = [image_column] + ([label_column] if label_column is not None else [])
        self.has_ids = id_column in dataset.column_names and id_column not in columns
        if self.has_ids:
            columns.append(id_column)
        dataset = dataset.select_columns(columns)
        # Decode ourselves: undecodable bytes then name the row, and masks keep their raw palette indices.
        for column in (image_column, label_column):
            if column is not None and isinstance(dataset.features[column], datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset
        self.rows = rows
        self.role = role
        self.image_column = image_column
        self.label_column = label_column
        self.id_column = id_column
        self.split_name = split_name
        self.dataset_name = dataset_name
        self.skipped_samples: list[str] = []
        if skip_undecodable:
            self._drop_undecodable_rows()
            if not len(self):
                raise ValueError(f"The {role} set{source} is empty: none of its samples can be decoded.")

    def __len__(self) -> int:
        return int(self.rows.size)

    def _drop_undecodable_rows(self) -> None:
        """Decodes every selected row once and drops those whose image or mask bytes cannot be decoded."""
        kept = []
        for row in self.rows.tolist():
            record = self.dataset[row]
            sample_name = self.describe(row, record)
            try:
                _open_pil(record[self.image_column], sample_name, "image")
                if self.label_column is not None:
                    _open_pil(record[self.label_column], sample_name, "label mask")
            except UndecodableSampleError as error:
                self.skipped_samples.append(str(error))
            else:
                kept.append(row)
        self.rows = np.asarray(kept, dtype=np.int64)
        if self.skipped_samples:
            logger.warning(
                f"Skipping {len(self.skipped_samples)} undecodable {self.role} sample(s): "
                + " | ".join(self.skipped_samples[:5])
            )

    def describe(self, row: int, record: Mapping[str, Any] | None = None) -> str:
        where = f"dataset {self.dataset_name!r}, " if self.dataset_name else ""
        where += f"split {self.split_name!r} " if self.split_name else ""
        description = f"{self.role} sample ({where}row {row}"
        if self.has_ids and record is not None:
            description += f", id {record[self.id_column]!r}"
        return description + ")"

    def load(self, position: int, with_label: bool) -> tuple[Tensor, Tensor | None, str]:
        """Decodes the image (and mask) of the `position`-th selected row; returns them and a description."""
        row = int(self.rows[position])
        record = self.dataset[row]
        sample_name = self.describe(row, record)
        image = decode_image(record[self.image_column], sample_name)
        mask = None
        if with_label:
            mask = decode_mask(record[self.label_column], sample_name)
            if tuple(mask.shape) != tuple(image.shape[-2:]):
                raise ValueError(
                    f"Image and label mask of {sample_name} differ in size: image (height, width) = "
                    f"{tuple(image.shape[-2:])}, mask = {tuple(mask.shape)}."
                )
        return image, mask, sample_name


class SemiSupervisedSegmentationDataset(torch.utils.data.Dataset):
    """Pairs every unlabelled sample with a labelled one: one map-style dataset for CPS training.

    `len(dataset)` is the number of unlabelled samples (one epoch visits each once, as in the paper), or the number
    of labelled samples if that is larger. Item `i` holds labelled sample `i % num_labeled` and unlabelled sample
    `i % num_unlabeled`, both augmented with `transform`; with `cutmix=True` it also holds a second unlabelled
    sample (the *mixing partner*) and a CutMix box mask. The partner comes from a per-epoch random cyclic
    permutation of the unlabelled set, so it is never the sample itself (when there are at least two unlabelled
    samples) and changes from epoch to epoch — the reference loader mostly mixed an image with itself.

    Determinism: item `i` of epoch `e` draws all its randomness (flips, scales, crops, CutMix boxes) from a
    `torch.Generator` seeded with [`item_seed`]`(seed, e, i)`, and the mixing permutation of epoch `e` from a
    generator seeded with `(seed, e)`. Items therefore differ across indices — hence across ranks and data-loader
    workers, which read different indices — and are exactly reproducible, whatever the number of workers, when a
    run resumes from a checkpoint. Call [`~SemiSupervisedSegmentationDataset.set_epoch`] before each epoch: the
    `transformers` Trainer does it through accelerate's `DataLoaderShard.set_epoch` in single-process runs, but
    (accelerate 1.15) that method skips the dataset when the batch sampler is sharded across processes, so a
    multi-process training loop should also call it, e.g. from a `TrainerCallback.on_epoch_begin`. With
    `persistent_workers=True` the workers keep their own copy of the dataset and do not see `set_epoch`; leave it
    off (the default).

    Items are dicts of tensors:

    - `pixel_values`: float32 `(3, h, w)`, the augmented labelled image;
    - `labels`: int64 `(h, w)`, its mask (`ignore_index` where padded);
    - `unlabeled_pixel_values`: float32 `(3, h, w)`, the augmented unlabelled image;
    - with `cutmix=True`, `mix_unlabeled_pixel_values`: float32 `(3, h, w)`, the augmented mixing partner, and
      `cutmix_masks`: float32 `(1, h, w)` in {0, 1} from [`~cps_hf.masking.generate_cutmix_mask`].

    Args:
        labeled_dataset (`datasets.Dataset`):
            The training split holding the labelled rows.
        labeled_indices (`Sequence[int]`, *optional*):
            Labelled rows of `labeled_dataset` (see [`select_labeled_indices`]); all rows when `None`.
        transform ([`SegmentationTransform`]):
            Training augmentation applied to every image (labelled, unlabelled and partner).
        num_labels (`int`):
            Number of classes; labelled masks must hold values in `[0, num_labels)` or `ignore_index`.
        unlabeled_dataset (`datasets.Dataset`, *optional*):
            A separate image-only (or labelled, labels unused) dataset. Defaults to `labeled_dataset`, in which
            case the unlabelled rows default to the rows not in `labeled_indices`.
        unlabeled_indices (`Sequence[int]`, *optional*):
            Unlabelled rows; defaults to the complement of `labeled_indices` (same dataset) or all rows (separate
            dataset).
        image_column (`str`, *optional*, defaults to `"image"`):
            Image column of the labelled dataset.
        label_column (`str`, *optional*, defaults to `"label"`):
            Mask column of the labelled dataset.
        unlabeled_image_column (`str`, *optional*):
            Image column of the unlabelled dataset; defaults to `image_column`.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column used to name samples in error messages, if present.
        cutmix (`bool`, *optional*, defaults to `False`):
            Also return a mixing partner and a CutMix mask.
        cutmix_num_boxes (`int`, *optional*, defaults to 3):
            Boxes per CutMix mask.
        cutmix_area_range (`tuple[float, float]`, *optional*, defaults to `(0.25, 0.5)`):
            Range of the CutMix area fraction.
        seed (`int`, *optional*, defaults to 0):
            Base seed of the augmentation.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by the losses.
        labeled_split_name (`str`, *optional*, defaults to `"train"`):
            Split name used in error messages.
        unlabeled_split_name (`str`, *optional*):
            Split name of the unlabelled dataset in error messages; defaults to `labeled_split_name` when the
            unlabelled rows come from the same dataset.
        labeled_dataset_name (`str`, *optional*):
            Name of the labelled dataset in error messages.
        unlabeled_dataset_name (`str`, *optional*):
            Name of the unlabelled dataset in error messages; defaults to `labeled_dataset_name` when the unlabelled
            rows come from the same dataset.
        skip_undecodable (`bool`, *optional*, defaults to `False`):
            Decode every selected row once when the dataset is built and leave out, with a warning, those whose
            image or mask cannot be decoded (listed in `skipped_samples`). By default such a sample raises an
            [`UndecodableSampleError`] when an item first loads it.

    Raises:
        ValueError: if the labelled or the unlabelled set is empty, a column is missing or indices are out of
            range; when loading an item, if a mask holds invalid values, has a different size from its image, or an
            image cannot be decoded (naming the dataset, split, row and id).
    """

    def __init__(
        self,
        labeled_dataset: datasets.Dataset,
        labeled_indices: Sequence[int] | None = None,
        *,
        transform: SegmentationTransform,
        num_labels: int,
        unlabeled_dataset: datasets.Dataset | None = None,
        unlabeled_indices: Sequence[int] | None = None,
        image_column: str = "image",
        label_column: str = "label",
        unlabeled_image_column: str | None = None,
        id_column: str = "id",
        cutmix: bool = False,
        cutmix_num_boxes: int = 3,
        cutmix_area_range: tuple[float, float] = (0.25, 0.5),
        seed: int = 0,
        ignore_index: int = 255,
        labeled_split_name: str = "train",
        unlabeled_split_name: str | None = None,
        labeled_dataset_name: str | None = None,
        unlabeled_dataset_name: str | None = None,
        skip_undecodable: bool = False,
    ) -> None:
        if num_labels < 1:
            raise ValueError(f"`num_labels` must be >= 1, got {num_labels}.")
        labeled_source = f" of dataset {labeled_dataset_name!r}" if labeled_dataset_name else ""
        if labeled_indices is not None and len(labeled_indices) == 0:
            raise ValueError(f"The labelled set{labeled_source} is empty: `labeled_indices` selects no rows.")
        if unlabeled_dataset is None:
            unlabeled_dataset = labeled_dataset
            if unlabeled_indices is None:
                unlabeled_indices = (
                    complement_indices(len(labeled_dataset), labeled_indices)
                    if labeled_indices is not None
                    else []
                )
            if unlabeled_split_name is None:
                unlabeled_split_name = labeled_split_name
            if unlabeled_dataset_name is None:
                unlabeled_dataset_name = labeled_dataset_name
        if unlabeled_indices is not None and len(unlabeled_indices) == 0:
            raise ValueError(
                f"The unlabelled set{labeled_source} is empty: every training row is labelled (or "
                "`unlabeled_indices` is empty). Label fewer rows or pass an `unlabeled_dataset`."
            )
        self.labeled = _SegmentationRows(
            labeled_dataset,
            labeled_indices,
            role="labelled",
            image_column=image_column,
            label_column=label_column,
            id_column=id_column,
            split_name=labeled_split_name,
            dataset_name=labeled_dataset_name,
            skip_undecodable=skip_undecodable,
        )
        self.unlabeled = _SegmentationRows(
            unlabeled_dataset,
            unlabeled_indices,
            role="unlabelled",
            image_column=unlabeled_image_column or image_column,
            label_column=None,
            id_column=id_column,
            split_name=unlabeled_split_name,
            dataset_name=unlabeled_dataset_name,
            skip_undecodable=skip_undecodable,
        )
        if not isinstance(transform, SegmentationTransform) or not transform.train:
            raise ValueError("`transform` must be a training `SegmentationTransform` (train=True).")
        self.transform = transform
        self.num_labels = num_labels
        self.cutmix = cutmix
        self.cutmix_num_boxes = cutmix_num_boxes
        self.cutmix_area_range = tuple(cutmix_area_range)
        self.seed = seed
        self.ignore_index = ignore_index
        self.epoch = 0
        self._mix_partners: tuple[int, np.ndarray] | None = None
        if cutmix and len(self.unlabeled) == 1:
            logger.warning("Only one unlabelled sample: CutMix will mix it with itself.")

    @property
    def num_labeled(self) -> int:
        """Number of labelled samples."""
        return len(self.labeled)

    @property
    def num_unlabeled(self) -> int:
        """Number of unlabelled samples."""
        return len(self.unlabeled)

    @property
    def skipped_samples(self) -> list[str]:
        """Why each sample left out by `skip_undecodable=True` could not be decoded (empty otherwise)."""
        return self.labeled.skipped_samples + self.unlabeled.skipped_samples

    def __len__(self) -> int:
        return max(self.num_labeled, self.num_unlabeled)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch whose augmentation and mixing partners the items use."""
        self.epoch = int(epoch)

    def mix_partner(self, unlabeled_position: int) -> int:
        """Position (in the unlabelled set) of the CutMix partner of unlabelled sample `unlabeled_position`.

        The partner is the next element along a random permutation of the unlabelled set, drawn once per epoch;
        this cyclic successor is never the sample itself when there are at least two unlabelled samples.
        """
        if self._mix_partners is None or self._mix_partners[0] != self.epoch:
            # A negative index cannot collide with the seeds of items, whose indices are >= 0.
            rng = np.random.default_rng(item_seed(self.seed, self.epoch, -1))
            order = rng.permutation(self.num_unlabeled)
            partners = np.empty(self.num_unlabeled, dtype=np.int64)
            partners[order] = np.roll(order, -1)
            self._mix_partners = (self.epoch, partners)
        return int(self._mix_partners[1][unlabeled_position])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"Index {index} out of range for a dataset of {len(self)} items.")
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))

        image, mask, sample_name = self.labeled.load(index % self.num_labeled, with_label=True)
        _check_mask_values(mask, self.num_labels, self.ignore_index, sample_name)
        pixel_values, labels = self.transform(image, mask, generator=generator, sample_name=sample_name)

        unlabeled_position = index % self.num_unlabeled
        image, _, sample_name = self.unlabeled.load(unlabeled_position, with_label=False)
        unlabeled_pixel_values, _ = self.transform(image, generator=generator, sample_name=sample_name)
        item = {
            "pixel_values": pixel_values,
            "labels": labels,
            "unlabeled_pixel_values": unlabeled_pixel_values,
        }

        if self.cutmix:
            from .masking import generate_cutmix_mask

            image, _, sample_name = self.unlabeled.load(
                self.mix_partner(unlabeled_position), with_label=False
            )
            item["mix_unlabeled_pixel_values"], _ = self.transform(
                image, generator=generator, sample_name=sample_name
            )
            height, width = unlabeled_pixel_values.shape[-2:]
            item["cutmix_masks"] = generate_cutmix_mask(
                height,
                width,
                generator=generator,
                num_boxes=self.cutmix_num_boxes,
                area_range=self.cutmix_area_range,
            )
        return item


class SupervisedSegmentationDataset(torch.utils.data.Dataset):
    """A labelled split as a torch dataset: evaluation (default transform) or supervised-only training.

    Items are dicts with `pixel_values` (float32 `(3, h, w)`) and `labels` (int64 `(h, w)`). Masks are validated
    like in [`SemiSupervisedSegmentationDataset`]. With a training transform, item `i` of epoch `e` is augmented
    with a generator seeded by [`item_seed`]`(seed, e, i)`; call `set_epoch` before each epoch.

    Evaluation images are not resized by default, so batching needs equal sizes: the synthetic dataset has a fixed
    size; for other data use a batch size of 1 or give the transform an `eval_size`.

    Args:
        dataset (`datasets.Dataset`):
            The split.
        indices (`Sequence[int]`, *optional*):
            Rows to use; all rows when `None`.
        num_labels (`int`):
            Number of classes.
        transform ([`SegmentationTransform`], *optional*):
            Defaults to an evaluation transform with the given `mean`/`std`.
        mean (`Sequence[float]`, *optional*, defaults to ImageNet's mean):
            Normalisation mean of the default transform.
        std (`Sequence[float]`, *optional*, defaults to ImageNet's standard deviation):
            Normalisation standard deviation of the default transform.
        image_column (`str`, *optional*, defaults to `"image"`):
            Image column.
        label_column (`str`, *optional*, defaults to `"label"`):
            Mask column.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column used to name samples in error messages, if present.
        seed (`int`, *optional*, defaults to 0):
            Base seed of a training transform.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by the losses and metrics.
        split_name (`str`, *optional*, defaults to `"validation"`):
            Split name used in error messages.
        dataset_name (`str`, *optional*):
            Dataset name used in error messages.
        skip_undecodable (`bool`, *optional*, defaults to `False`):
            Leave out, with a warning, the rows whose image or mask cannot be decoded (listed in
            `skipped_samples`), as in [`SemiSupervisedSegmentationDataset`].
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        indices: Sequence[int] | None = None,
        *,
        num_labels: int,
        transform: SegmentationTransform | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        image_column: str = "image",
        label_column: str = "label",
        id_column: str = "id",
        seed: int = 0,
        ignore_index: int = 255,
        split_name: str = "validation",
        dataset_name: str | None = None,
        skip_undecodable: bool = False,
    ) -> None:
        if num_labels < 1:
            raise ValueError(f"`num_labels` must be >= 1, got {num_labels}.")
        if indices is not None and len(indices) == 0:
            source = f" of dataset {dataset_name!r}" if dataset_name else ""
            raise ValueError(f"The {split_name!r} set{source} is empty: `indices` selects no rows.")
        self.rows = _SegmentationRows(
            dataset,
            indices,
            role="labelled",
            image_column=image_column,
            label_column=label_column,
            id_column=id_column,
            split_name=split_name,
            dataset_name=dataset_name,
            skip_undecodable=skip_undecodable,
        )
        self.transform = transform or SegmentationTransform(
            train=False, mean=mean, std=std, ignore_index=ignore_index
        )
        self.num_labels = num_labels
        self.seed = seed
        self.ignore_index = ignore_index
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def skipped_samples(self) -> list[str]:
        """Why each sample left out by `skip_undecodable=True` could not be decoded (empty otherwise)."""
        return self.rows.skipped_samples

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch (only matters with a training transform)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"Index {index} out of range for a dataset of {len(self)} items.")
        image, mask, sample_name = self.rows.load(index, with_label=True)
        _check_mask_values(mask, self.num_labels, self.ignore_index, sample_name)
        generator = None
        if self.transform.train:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        pixel_values, labels = self.transform(image, mask, generator=generator, sample_name=sample_name)
        return {"pixel_values": pixel_values, "labels": labels}


SupervisedEvalDataset = SupervisedSegmentationDataset
"""Alias of [`SupervisedSegmentationDataset`], whose default transform is the evaluation transform."""


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
    keys = list(features[0])
    for position, feature in enumerate(features[1:], start=1):
        if set(feature) != set(keys):
            raise ValueError(f"Item {position} has keys {sorted(feature)}, item 0 has {sorted(keys)}.")
    batch = {}
    for key in keys:
        shapes = {tuple(feature[key].shape) for feature in features}
        if len(shapes) > 1:
            raise ValueError(
                f"Cannot stack {key!r}: items have shapes {sorted(shapes)}. Give the evaluation transform an "
                "`eval_size` or use a batch size of 1."
            )
        batch[key] = torch.stack([feature[key] for feature in features])
    return batch
