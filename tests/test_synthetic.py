"""Tests of cps_hf.data.synthetic: the embedded generated dataset and its cache."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image as PILImage

import cps_hf.data.synthetic as synthetic
from cps_hf.data.synthetic import (
    SYNTHETIC_CLASS_NAMES,
    make_synthetic_segmentation_dataset,
    synthetic_id2label,
    synthetic_label2id,
)


def raw_bytes(dataset: datasets.Dataset, column: str) -> list[bytes]:
    return [value["bytes"] for value in dataset.cast_column(column, datasets.Image(decode=False))[column]]


def label_arrays(dataset: datasets.Dataset) -> np.ndarray:
    return np.stack([np.asarray(PILImage.open(io.BytesIO(data))) for data in raw_bytes(dataset, "label")])


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = make_synthetic_segmentation_dataset(num_train=6, num_val=3, seed=5, cache_dir=str(tmp_path / "a"))
    second = make_synthetic_segmentation_dataset(
        num_train=6, num_val=3, seed=5, cache_dir=str(tmp_path / "b")
    )
    other_seed = make_synthetic_segmentation_dataset(
        num_train=6, num_val=3, seed=6, cache_dir=str(tmp_path / "a")
    )
    for split in ("train", "validation"):
        for column in ("image", "label"):
            assert raw_bytes(first[split], column) == raw_bytes(second[split], column)
    assert raw_bytes(first["train"], "image") != raw_bytes(other_seed["train"], "image")
    # Sample i depends only on (seed, split, i): a longer dataset starts with the same samples.
    longer = make_synthetic_segmentation_dataset(
        num_train=8, num_val=3, seed=5, cache_dir=str(tmp_path / "c")
    )
    assert raw_bytes(longer["train"], "image")[:6] == raw_bytes(first["train"], "image")
    assert first["train"]["id"][:] == [f"train_{index:05d}" for index in range(6)]


def test_cache_is_reused_and_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_synthetic_segmentation_dataset(num_train=4, num_val=2, cache_dir=str(tmp_path))
    cached_folders = [path for path in tmp_path.iterdir()]
    assert len(cached_folders) == 1 and (cached_folders[0] / "dataset_dict.json").is_file()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached dataset should have been loaded instead of generated")

    monkeypatch.setattr(synthetic, "_generate_split", fail)
    second = make_synthetic_segmentation_dataset(num_train=4, num_val=2, cache_dir=str(tmp_path))
    assert raw_bytes(second["train"], "image") == raw_bytes(first["train"], "image")
    monkeypatch.undo()

    # A run killed while writing leaves no cache folder behind (only complete folders are published).
    def crash(self: datasets.DatasetDict, path: str, **kwargs: object) -> None:
        Path(path, "partial-file").write_text("half written")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", crash)
    uncached = make_synthetic_segmentation_dataset(num_train=3, num_val=2, cache_dir=str(tmp_path))
    assert len(uncached["train"]) == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == [cached_folders[0].name]


def test_labels_cover_every_class_and_stay_in_range(tmp_path: Path) -> None:
    dataset = make_synthetic_segmentation_dataset(
        num_train=48, num_val=8, image_size=48, cache_dir=str(tmp_path)
    )
    assert dataset["train"].column_names == ["id", "image", "label"]
    labels = label_arrays(dataset["train"])
    assert labels.shape == (48, 48, 48)
    assert set(np.unique(labels).tolist()) == set(range(len(SYNTHETIC_CLASS_NAMES)))
    # Objects are a sizeable share of the pixels but background dominates, as in real scenes.
    foreground_share = float((labels > 0).mean())
    assert 0.05 < foreground_share < 0.4
    sample = dataset["validation"][0]
    assert sample["image"].mode == "RGB" and sample["image"].size == (48, 48)
    assert sample["label"].mode == "P"  # palette PNG: indices are class ids
    description = json.loads(dataset["train"].info.description)
    assert description["class_names"] == list(SYNTHETIC_CLASS_NAMES)


def test_class_names_give_id2label() -> None:
    assert SYNTHETIC_CLASS_NAMES[0] == "background" and len(SYNTHETIC_CLASS_NAMES) == 5
    assert synthetic_id2label() == dict(enumerate(SYNTHETIC_CLASS_NAMES))
    assert synthetic_label2id() == {name: index for index, name in synthetic_id2label().items()}


def test_default_size_generates_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    dataset = make_synthetic_segmentation_dataset(cache_dir=str(tmp_path))
    elapsed = time.perf_counter() - start
    assert {split: len(dataset[split]) for split in dataset} == {"train": 512, "validation": 128}
    # A few seconds on an idle 2-core machine; the bound leaves room for a loaded CI machine.
    assert elapsed < 30.0
    start = time.perf_counter()
    make_synthetic_segmentation_dataset(cache_dir=str(tmp_path))
    assert time.perf_counter() - start < elapsed


def test_invalid_parameters_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_train"):
        make_synthetic_segmentation_dataset(num_train=0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_segmentation_dataset(image_size=8, cache_dir=str(tmp_path))
