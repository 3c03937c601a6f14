"""The labelled/unlabelled split of a training set: official split files, seeded draws, and their fingerprints."""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .decoding import IMAGE_SUFFIXES


def split_line_id(line: str) -> str:
    """The sample id named by one line of a split file.

    - `2007_000032` (the VOC lists): the line itself;
    - `/images/train/jena_000078_000019.png<TAB>/segmentation/train/jena_000078_000019_gtFine.png` (the Cityscapes
      lists), `image annotation` (SegNet lists) or a single path such as `JPEGImages/2007_000032.jpg`: the file
      stem of the first field, without Cityscapes' `_leftImg8bit` suffix (`jena_000078_000019`), which is the `id`
      the converters of `cps_hf.data.converters` give that image.

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
