"""Tests of cps_hf.converters and scripts/prepare_dataset.py on tiny layouts built in `tmp_path`."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image as PILImage

from cps_hf.converters import CAMVID_CLASS_NAMES, convert_camvid, convert_folder, save_dataset
from cps_hf.data import load_segmentation_dataset
from cps_hf.experiment import DataArguments, resolve_class_names

REPO_ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 4, 6


def _write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    PILImage.fromarray(pixels, mode="RGB").save(path)


def _write_mask(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(values.astype(np.uint8), mode="L").save(path)


def _mask(first_value: int = 0) -> np.ndarray:
    values = (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) % 11).astype(np.uint8)
    values[0, 0] = first_value
    return values


def _decode(entry: dict) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(entry["bytes"])))


@pytest.fixture
def camvid_source(tmp_path: Path) -> Path:
    source = tmp_path / "CamVid"
    names = {"train": ["0001TP_006690", "0001TP_006720"], "val": ["0016E5_07959"]}
    for split, stems in names.items():
        lines = []
        for index, stem in enumerate(stems):
            _write_image(source / split / f"{stem}.png", seed=index)
            # The first training mask holds a void pixel (11).
            _write_mask(source / f"{split}annot" / f"{stem}.png", _mask(11 if index == 0 else 3))
            lines.append(f"/SegNet/CamVid/{split}/{stem}.png /SegNet/CamVid/{split}annot/{stem}.png")
        (source / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return source


@pytest.fixture
def folder_source(tmp_path: Path) -> tuple[Path, Path]:
    images_dir, masks_dir = tmp_path / "images", tmp_path / "masks"
    for index, stem in enumerate(["a", "b", "c"]):
        _write_image(images_dir / f"{stem}.jpg" if index == 0 else images_dir / f"{stem}.png", seed=index)
        values = np.full((HEIGHT, WIDTH), index, dtype=np.uint8)
        values[0, 0] = 255
        _write_mask(masks_dir / f"{stem}.png", values)
    return images_dir, masks_dir


def test_convert_camvid_from_lists(camvid_source: Path):
    dataset_dict = convert_camvid(camvid_source)
    assert sorted(dataset_dict) == ["train", "validation"]
    assert dataset_dict["train"].num_rows == 2 and dataset_dict["validation"].num_rows == 1
    train = dataset_dict["train"].with_format(None).cast_column("label", datasets.Image(decode=False))
    train = train.cast_column("image", datasets.Image(decode=False))
    assert train["id"] == ["0001TP_006690", "0001TP_006720"]
    # Images keep their original bytes; the void pixel becomes 255, the other ids are unchanged.
    assert train[0]["image"]["bytes"] == (camvid_source / "train" / "0001TP_006690.png").read_bytes()
    label = _decode(train[0]["label"])
    assert label.shape == (HEIGHT, WIDTH) and label[0, 0] == 255
    np.testing.assert_array_equal(label.ravel()[1:], _mask().ravel()[1:])
    # A mask without void pixels keeps its bytes.
    assert train[1]["label"]["bytes"] == (camvid_source / "trainannot" / "0001TP_006720.png").read_bytes()


def test_convert_camvid_pairs_folders_without_lists(camvid_source: Path):
    for list_file in camvid_source.glob("*.txt"):
        list_file.unlink()
    dataset_dict = convert_camvid(camvid_source)
    assert {split: len(dataset) for split, dataset in dataset_dict.items()} == {"train": 2, "validation": 1}


def test_convert_camvid_rejects_values_above_void(camvid_source: Path):
    _write_mask(camvid_source / "valannot" / "0016E5_07959.png", _mask(12))
    with pytest.raises(ValueError, match=r"0016E5_07959\.png.*\[12\]"):
        convert_camvid(camvid_source)


def test_convert_camvid_missing_source_and_listed_file(tmp_path: Path, camvid_source: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_camvid(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="No CamVid split"):
        convert_camvid(_empty_dir(tmp_path))
    (camvid_source / "trainannot" / "0001TP_006720.png").unlink()
    with pytest.raises(FileNotFoundError, match="0001TP_006720"):
        convert_camvid(camvid_source)


def _empty_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_convert_folder(folder_source: tuple[Path, Path]):
    images_dir, masks_dir = folder_source
    dataset = convert_folder(images_dir, masks_dir, ["bg", "cat", "dog"], split="validation")["validation"]
    assert dataset["id"] == ["a", "b", "c"]
    row = dataset[2]
    assert np.asarray(row["label"]).tolist()[0][:2] == [255, 2]
    assert row["image"].size == (WIDTH, HEIGHT)
    raw = dataset.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert raw == (images_dir / "a.jpg").read_bytes()
    # Without names, the classes come from the largest id in the masks (255 excluded).
    inferred = convert_folder(images_dir, masks_dir, None)["train"]
    assert resolve_class_names(DataArguments(dataset_name="x", labeled_fraction=0.5), inferred) == [
        "class_0",
        "class_1",
        "class_2",
    ]


def test_convert_folder_errors(tmp_path: Path, folder_source: tuple[Path, Path]):
    images_dir, masks_dir = folder_source
    with pytest.raises(ValueError, match=r"outside the class ids 0\.\.1.*c\.png|c\.png.*\[2\]"):
        convert_folder(images_dir, masks_dir, ["bg", "cat"])
    with pytest.raises(FileNotFoundError, match="Masks folder"):
        convert_folder(images_dir, tmp_path / "missing", ["bg"])
    _write_image(images_dir / "d.png", seed=9)
    _write_mask(masks_dir / "e.png", np.zeros((HEIGHT, WIDTH)))
    with pytest.raises(ValueError, match=r"without a mask.*\['d'\].*without an image.*\['e'\]"):
        convert_folder(images_dir, masks_dir, ["bg", "cat", "dog"])


def test_saved_dataset_loads_with_class_names(tmp_path: Path, camvid_source: Path):
    output = tmp_path / "camvid_hf"
    save_dataset(convert_camvid(camvid_source), output, parquet=True)
    loaded = load_segmentation_dataset(str(output))
    assert sorted(loaded) == ["train", "validation"]
    data_args = DataArguments(dataset_name=str(output), labeled_fraction=0.5)
    assert resolve_class_names(data_args, loaded["train"]) == list(CAMVID_CLASS_NAMES)
    assert np.asarray(loaded["train"][0]["label"])[0, 0] == 255

    # The parquet copy holds the bytes themselves (not paths) and reloads on its own.
    parquet = load_segmentation_dataset(str(output / "parquet"))
    assert {split: len(dataset) for split, dataset in parquet.items()} == {"train": 2, "validation": 1}
    raw = parquet["train"].cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] == (camvid_source / "train" / "0001TP_006690.png").read_bytes()
    assert np.asarray(parquet["validation"][0]["label"]).shape == (HEIGHT, WIDTH)


def test_prepare_dataset_script(tmp_path: Path, folder_source: tuple[Path, Path]):
    images_dir, masks_dir = folder_source
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "prepare_dataset.py"), "folder", "--source"]
    command += [str(images_dir), "--masks", str(masks_dir), "--class_names", "bg", "cat", "dog"]
    command += ["--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "train: 3 rows" in result.stdout
    assert load_segmentation_dataset(str(output))["train"].num_rows == 3
