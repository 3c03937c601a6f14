"""Class names stored with a dataset: in each split's `info.description`, and in `id2label.json` files."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

CLASS_NAMES_FILE = "id2label.json"
"""Names the classes next to parquet files and in a Hub dataset repo, as `{"0": "background", ...}` (the file the
transformers semantic-segmentation example reads)."""


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


def attach_class_names_file(dataset_dict: datasets.DatasetDict, path: Path | None) -> None:
    """Stores the class names of an `id2label.json` in the splits that do not name their classes yet."""
    if path is None or not path.is_file():
        return
    class_names = read_id2label(path)
    for dataset in dataset_dict.values():
        if dataset_class_names(dataset) is None:
            set_dataset_class_names(dataset, class_names)
