"""Reading a segmentation dataset from disk or the Hub as a `datasets.DatasetDict`, with clear errors."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import datasets
from transformers.utils import logging

from .class_names import CLASS_NAMES_FILE, attach_class_names_file

logger = logging.get_logger(__name__)


def _parquet_split_name(file_path: Path) -> str:
    """`train-00000-of-00002.parquet` / `train.parquet` / `validation-abc.parquet` -> the part before the first `-`."""
    return file_path.name.removesuffix(".parquet").split("-")[0]


def load_segmentation_dataset(
    dataset_name: str | None, cache_dir: str | None = None, streaming: bool = False, **kwargs: Any
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Loads a segmentation dataset as a `datasets.DatasetDict` (or, streaming, a `datasets.IterableDatasetDict`).

    `dataset_name` may be:

    - `None` or `"synthetic"`: the embedded generated dataset
      ([`~cps_hf.data.synthetic.make_synthetic_segmentation_dataset`]; `kwargs` go to it, `cache_dir` is its cache
      root);
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
    [`dataset_class_names`]), as the converters of `cps_hf.data.converters` do for `save_to_disk` folders.

    Args:
        dataset_name (`str`, *optional*):
            What to load, see above.
        cache_dir (`str`, *optional*):
            Cache folder for `datasets.load_dataset` (or the synthetic dataset's cache root).
        streaming (`bool`, *optional*, defaults to `False`):
            Return `datasets.IterableDataset` splits that read the rows as they are iterated: parquet files, image
            folders and Hub datasets are streamed by `datasets.load_dataset(..., streaming=True)`; `save_to_disk`
            folders and the synthetic dataset are read with `Dataset.to_iterable_dataset`, one shard per Arrow
            file.
        kwargs:
            Passed to `datasets.load_dataset` (e.g. `revision`, `name`) or to the synthetic generator.

    Returns:
        `datasets.DatasetDict` or `datasets.IterableDatasetDict`: the splits of the dataset.

    Raises:
        ConnectionError: if a Hub id cannot be loaded because the Hub is unreachable or offline mode is on.
        FileNotFoundError: if `dataset_name` looks like a local path (starts with `.`, `/` or `~`) but does not
            exist.
    """
    if dataset_name is None or dataset_name == "synthetic":
        from .synthetic import make_synthetic_segmentation_dataset

        loaded = make_synthetic_segmentation_dataset(cache_dir=cache_dir, **kwargs)
        return _as_iterable(loaded) if streaming else loaded

    local_path = Path(dataset_name).expanduser()
    if local_path.is_dir():
        if (local_path / "dataset_dict.json").is_file() or (local_path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(local_path), **kwargs)
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({"train": loaded})
            return _as_iterable(loaded) if streaming else loaded
        parquet_files = sorted(local_path.rglob("*.parquet"))
        if parquet_files:
            data_files: dict[str, list[str]] = defaultdict(list)
            for file_path in parquet_files:
                data_files[_parquet_split_name(file_path)].append(str(file_path))
            logger.info(f"Loading parquet files from {local_path} as splits {sorted(data_files)}.")
            loaded = datasets.load_dataset(
                "parquet", data_files=dict(data_files), cache_dir=cache_dir, streaming=streaming, **kwargs
            )
            attach_class_names_file(loaded, local_path / CLASS_NAMES_FILE)
            return loaded
        return datasets.load_dataset(
            "imagefolder", data_dir=str(local_path), cache_dir=cache_dir, streaming=streaming, **kwargs
        )
    if local_path.is_file() and local_path.suffix == ".parquet":
        loaded = datasets.load_dataset(
            "parquet",
            data_files={"train": str(local_path)},
            cache_dir=cache_dir,
            streaming=streaming,
            **kwargs,
        )
        attach_class_names_file(loaded, local_path.parent / CLASS_NAMES_FILE)
        return loaded
    if dataset_name.startswith((".", "/", "~")) or local_path.is_file():
        raise FileNotFoundError(
            f"Dataset path {dataset_name!r} is not a folder (expected a save_to_disk folder, a folder of parquet "
            "files or an imagefolder)."
        )

    try:
        loaded = datasets.load_dataset(dataset_name, cache_dir=cache_dir, streaming=streaming, **kwargs)
    except ConnectionError as error:
        raise ConnectionError(
            f"Could not load dataset {dataset_name!r}: the Hugging Face Hub could not be reached ({error}). "
            "Check your connection and HF_HUB_OFFLINE, or pass a local path instead: a `save_to_disk` folder, a "
            "folder of parquet files or an imagefolder (or 'synthetic' for the built-in dataset)."
        ) from error
    expected = datasets.IterableDatasetDict if streaming else datasets.DatasetDict
    if not isinstance(loaded, expected):
        raise TypeError(
            f"Expected a {expected.__name__} for {dataset_name!r}, got {type(loaded).__name__}; do not pass "
            "`split` (or pass `streaming` as this function's argument)."
        )
    attach_class_names_file(loaded, _download_hub_class_names_file(dataset_name, kwargs.get("revision")))
    return loaded


def _as_iterable(dataset_dict: datasets.DatasetDict) -> datasets.IterableDatasetDict:
    """Every split as an `IterableDataset` with one shard per Arrow file (shards are what processes split)."""
    return datasets.IterableDatasetDict(
        {
            name: split.to_iterable_dataset(num_shards=max(1, len(split.cache_files)))
            for name, split in dataset_dict.items()
        }
    )


def _download_hub_class_names_file(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, CLASS_NAMES_FILE, repo_type="dataset", revision=revision))
    except (EntryNotFoundError, OSError) as error:
        logger.info(f"No {CLASS_NAMES_FILE} in the Hub dataset {repo_id!r} ({type(error).__name__}).")
        return None


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
