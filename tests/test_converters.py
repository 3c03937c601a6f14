"""Tests of cps_hf.data.converters and scripts/prepare_dataset.py on tiny layouts built in `tmp_path`."""

from __future__ import annotations

import io
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import run_script
from PIL import Image as PILImage

from cps_hf.data import (
    DataArguments,
    dataset_class_names,
    load_segmentation_dataset,
    resolve_class_names,
    select_labeled_indices,
)
from cps_hf.data.converters import (
    CAMVID_CLASS_NAMES,
    CITYSCAPES_CLASS_NAMES,
    VOC_CLASS_NAMES,
    convert_camvid,
    convert_cityscapes,
    convert_folder,
    convert_voc,
    downscale_dataset,
    push_dataset_to_hub,
    save_dataset,
)

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


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Conversions write Arrow files to the `datasets` cache: keep them in the test's folder."""
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


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

    # The parquet copy holds the bytes themselves (not paths) and reloads on its own, class names included.
    parquet = load_segmentation_dataset(str(output / "parquet"))
    assert {split: len(dataset) for split, dataset in parquet.items()} == {"train": 2, "validation": 1}
    assert resolve_class_names(data_args, parquet["train"]) == list(CAMVID_CLASS_NAMES)
    single_file = load_segmentation_dataset(str(output / "parquet" / "validation.parquet"))
    assert dataset_class_names(single_file["train"]) == list(CAMVID_CLASS_NAMES)
    raw = parquet["train"].cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] == (camvid_source / "train" / "0001TP_006690.png").read_bytes()
    assert np.asarray(parquet["validation"][0]["label"]).shape == (HEIGHT, WIDTH)


def test_prepare_dataset_script(tmp_path: Path, folder_source: tuple[Path, Path], datasets_cache: Path):
    images_dir, masks_dir = folder_source
    output = tmp_path / "out"
    arguments = ["folder", "--source", str(images_dir), "--masks", str(masks_dir)]
    arguments += ["--class_names", "bg", "cat", "dog", "--output", str(output)]
    result = run_script(
        "prepare_dataset", *arguments, extra_env={"HF_DATASETS_CACHE": str(datasets_cache)}, timeout=60
    )
    assert "train: 3 rows" in result.stdout
    assert load_segmentation_dataset(str(output))["train"].num_rows == 3


def _undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.cast_column("image", datasets.Image(decode=False)).cast_column(
        "label", datasets.Image(decode=False)
    )


# ---------------------------------------------------------------------------------------------------------------
# PASCAL VOC
# ---------------------------------------------------------------------------------------------------------------

VOC_TRAIN_IDS = ["2007_000032", "2008_000123", "2011_003276"]
VOC_VAL_IDS = ["2010_000002", "2007_000033"]


def _write_palette_mask(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = PILImage.fromarray(values.astype(np.uint8), mode="P")
    mask.putpalette([channel for index in range(256) for channel in (index, 255 - index, 7 * index % 256)])
    mask.save(path)


def _voc_mask(seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, 21, size=(HEIGHT, WIDTH)).astype(np.uint8)
    values[0, 0], values[0, 1] = 20, 255
    return values


@pytest.fixture
def voc_source(tmp_path: Path) -> Path:
    """A VOCdevkit: SBD-augmented greyscale masks at the devkit root (train ids and one val id, as in the real
    folder), palette masks for val in VOC2012/SegmentationClass, and val.txt/train.txt lists (no train_aug.txt)."""
    devkit = tmp_path / "VOCdevkit"
    voc = devkit / "VOC2012"
    for index, sample_id in enumerate(VOC_TRAIN_IDS + VOC_VAL_IDS):
        _write_image(voc / "JPEGImages" / f"{sample_id}.jpg", seed=index)
    for index, sample_id in enumerate(VOC_TRAIN_IDS + VOC_VAL_IDS[:1]):
        _write_mask(devkit / "SegmentationClassAug" / f"{sample_id}.png", _voc_mask(index))
    for index, sample_id in enumerate(VOC_VAL_IDS):
        _write_palette_mask(voc / "SegmentationClass" / f"{sample_id}.png", _voc_mask(10 + index))
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("".join(f"{sample_id}\n" for sample_id in VOC_VAL_IDS))
    (lists / "train.txt").write_text(f"{VOC_TRAIN_IDS[0]}\n")
    return devkit


def test_convert_voc_derives_train_aug_and_keeps_palette_indices(voc_source: Path):
    dataset_dict = convert_voc(voc_source)
    assert sorted(dataset_dict) == ["train", "validation"]
    # train_aug = the augmented masks not in val.txt; validation in list order.
    assert dataset_dict["train"]["id"] == VOC_TRAIN_IDS
    assert dataset_dict["validation"]["id"] == VOC_VAL_IDS
    assert dataset_class_names(dataset_dict["train"]) == list(VOC_CLASS_NAMES) and len(VOC_CLASS_NAMES) == 21
    train = _undecoded(dataset_dict["train"])
    np.testing.assert_array_equal(_decode(train[1]["label"]), _voc_mask(1))
    # The val image with both masks takes the augmented (greyscale) one; the other keeps its palette PNG as is.
    np.testing.assert_array_equal(np.asarray(dataset_dict["validation"][0]["label"]), _voc_mask(3))
    validation = _undecoded(dataset_dict["validation"])
    palette_file = voc_source / "VOC2012" / "SegmentationClass" / f"{VOC_VAL_IDS[1]}.png"
    assert validation[1]["label"]["bytes"] == palette_file.read_bytes()
    np.testing.assert_array_equal(np.asarray(dataset_dict["validation"][1]["label"]), _voc_mask(11))
    assert (
        validation[0]["image"]["bytes"]
        == (voc_source / "VOC2012" / "JPEGImages" / "2010_000002.jpg").read_bytes()
    )


def test_convert_voc_reads_train_aug_list_inside_voc2012(voc_source: Path):
    voc = voc_source / "VOC2012"
    (voc_source / "SegmentationClassAug").rename(voc / "SegmentationClassAug")
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        f"{VOC_TRAIN_IDS[2]}\n{VOC_TRAIN_IDS[0]}\n"
    )
    dataset_dict = convert_voc(voc)
    assert dataset_dict["train"]["id"] == [VOC_TRAIN_IDS[2], VOC_TRAIN_IDS[0]]
    # Without augmented masks, train is train.txt with the palette masks.
    (voc / "SegmentationClass" / f"{VOC_TRAIN_IDS[0]}.png").write_bytes(
        (voc / "SegmentationClassAug" / f"{VOC_TRAIN_IDS[0]}.png").read_bytes()
    )
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    for mask in (voc / "SegmentationClassAug").iterdir():
        mask.unlink()
    (voc / "SegmentationClassAug").rmdir()
    assert convert_voc(voc_source)["train"]["id"] == [VOC_TRAIN_IDS[0]]


def test_convert_voc_errors_name_the_files(tmp_path: Path, voc_source: Path):
    lists = voc_source / "VOC2012" / "ImageSets" / "Segmentation"
    _write_mask(voc_source / "SegmentationClassAug" / "2008_000123.png", _mask(22))
    with pytest.raises(
        ValueError, match=r"2008_000123\.png' holds values \[22\] outside the class ids 0\.\.20"
    ):
        convert_voc(voc_source)
    _write_mask(voc_source / "SegmentationClassAug" / "2008_000123.png", _voc_mask(1))
    (voc_source / "VOC2012" / "JPEGImages" / "2011_003276.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 without `<id>\.jpg`.*\['2011_003276'\]"):
        convert_voc(voc_source)
    (lists / "val.txt").write_text("2010_000002\n2007_000033\n2010_000002\n")
    with pytest.raises(ValueError, match=r"val\.txt' lists 1 id\(s\) more than once.*2010_000002"):
        convert_voc(voc_source)
    (lists / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="cannot be told apart from val"):
        convert_voc(voc_source)
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        convert_voc(_empty_dir(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Cityscapes
# ---------------------------------------------------------------------------------------------------------------

# labelIds of one mask and the trainIds they must become (license plate -1 is stored as 255).
CITYSCAPES_LABEL_IDS = np.array(
    [[7, 8, 26, 0, 33, 255], [11, 12, 13, 17, 19, 20], [21, 22, 23, 24, 25, 27], [28, 31, 32, 6, 9, 14]]
)
CITYSCAPES_TRAIN_IDS = np.array(
    [[0, 1, 13, 255, 18, 255], [2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 14], [15, 16, 17, 255, 255, 255]]
)


@pytest.fixture
def cityscapes_source(tmp_path: Path) -> Path:
    source = tmp_path / "cityscapes"
    for index, (split, city, sample_id) in enumerate(
        [
            ("train", "jena", "jena_000078_000019"),
            ("train", "aachen", "aachen_000000_000019"),
            ("val", "frankfurt", "frankfurt_000001_066574"),
            ("test", "berlin", "berlin_000000_000019"),
        ]
    ):
        _write_image(source / "leftImg8bit" / split / city / f"{sample_id}_leftImg8bit.png", seed=index)
        masks = source / "gtFine" / split / city
        if split == "val":  # already converted: trainIds only
            _write_mask(masks / f"{sample_id}_gtFine_labelTrainIds.png", CITYSCAPES_TRAIN_IDS)
        else:
            _write_mask(masks / f"{sample_id}_gtFine_labelIds.png", CITYSCAPES_LABEL_IDS)
            _write_image(masks / f"{sample_id}_gtFine_color.png", seed=9)
    return source


def test_convert_cityscapes_maps_label_ids_to_train_ids(cityscapes_source: Path):
    dataset_dict = convert_cityscapes(cityscapes_source)
    assert sorted(dataset_dict) == ["train", "validation"]  # test labels are not public: not converted
    assert dataset_dict["train"]["id"] == ["aachen_000000_000019", "jena_000078_000019"]
    assert dataset_class_names(dataset_dict["validation"]) == list(CITYSCAPES_CLASS_NAMES)
    np.testing.assert_array_equal(np.asarray(dataset_dict["train"][0]["label"]), CITYSCAPES_TRAIN_IDS)
    validation = _undecoded(dataset_dict["validation"])[0]
    train_ids_file = "gtFine/val/frankfurt/frankfurt_000001_066574_gtFine_labelTrainIds.png"
    assert validation["label"]["bytes"] == (cityscapes_source / train_ids_file).read_bytes()


def test_convert_cityscapes_cps_layout_matches_the_official_list(tmp_path: Path):
    source = tmp_path / "city"
    _write_image(source / "images" / "train" / "jena_000078_000019.png", seed=0)
    _write_mask(source / "segmentation" / "train" / "jena_000078_000019_gtFine.png", CITYSCAPES_TRAIN_IDS)
    _write_image(source / "images" / "train" / "jena_000032_000019.png", seed=1)
    _write_mask(source / "segmentation" / "train" / "jena_000032_000019_gtFine.png", CITYSCAPES_TRAIN_IDS)
    train = convert_cityscapes(source)["train"]
    np.testing.assert_array_equal(np.asarray(train[1]["label"]), CITYSCAPES_TRAIN_IDS)
    split_file = tmp_path / "labeled.txt"
    split_file.write_text(
        "/images/train/jena_000078_000019.png\t/segmentation/train/jena_000078_000019_gtFine.png\n"
    )
    assert select_labeled_indices(train, labeled_ids_file=split_file) == [1]


def test_convert_cityscapes_errors_name_the_files(tmp_path: Path, cityscapes_source: Path):
    values = CITYSCAPES_LABEL_IDS.copy()
    values[2, 2] = 40
    label_ids = cityscapes_source / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    _write_mask(label_ids, values)
    with pytest.raises(
        ValueError, match=r"aachen_000000_000019_gtFine_labelIds\.png' holds values \[40\] outside"
    ):
        convert_cityscapes(cityscapes_source)
    label_ids.unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) .* without a mask .*\['aachen_000000_000019'\]"):
        convert_cityscapes(cityscapes_source)
    with pytest.raises(FileNotFoundError, match="No Cityscapes layout"):
        convert_cityscapes(_empty_dir(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------------------------------


def test_push_to_hub_offline_fails_clearly(monkeypatch: pytest.MonkeyPatch, camvid_source: Path):
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise AssertionError("push_to_hub must not be called offline")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", no_network)
    with pytest.raises(ConnectionError, match=r"'me/camvid'.*offline mode is on \(HF_HUB_OFFLINE=1\)"):
        push_dataset_to_hub(convert_camvid(camvid_source), "me/camvid")


def test_hub_round_trip_keeps_class_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, camvid_source: Path
):
    import huggingface_hub
    import huggingface_hub.constants

    hub: dict[str, object] = {}

    def fake_push(self, repo_id, private=False, token=None):
        hub["splits"], hub["private"] = self, private

    def fake_upload(self, path_or_fileobj, path_in_repo, repo_id, repo_type, commit_message):
        stored = tmp_path / "hub" / path_in_repo
        stored.parent.mkdir(exist_ok=True)
        stored.write_bytes(Path(path_or_fileobj).read_bytes())
        hub[path_in_repo] = stored

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", fake_upload)
    push_dataset_to_hub(convert_camvid(camvid_source), "me/camvid", private=True)
    assert hub["private"] is True and "id2label.json" in hub

    # Loading the repo back: the splits come without names, the id2label.json names them.
    def fake_load_dataset(name, cache_dir=None, **kwargs):
        splits = hub["splits"]
        return datasets.DatasetDict({split: datasets.Dataset(splits[split].data) for split in splits})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: str(hub["id2label.json"]))
    loaded = load_segmentation_dataset("me/camvid")
    assert dataset_class_names(loaded["train"]) == list(CAMVID_CLASS_NAMES)

    def fail_push(self, repo_id, private=False, token=None):
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fail_push)
    with pytest.raises(ConnectionError, match=r"'me/camvid' \(RuntimeError: 401 Unauthorized\)"):
        push_dataset_to_hub(loaded, "me/camvid")


def test_prepare_dataset_script_voc_then_push_offline(tmp_path: Path, voc_source: Path):
    output = tmp_path / "voc_hf"
    # The tests run with HF_HUB_OFFLINE=1: the push fails clearly, after the local copy is saved.
    arguments = ["voc", "--source", str(voc_source), "--output", str(output), "--push_to_hub", "me/voc"]
    result = run_script("prepare_dataset", *arguments, returncode=1)
    assert re.search("ConnectionError: .*offline mode", result.stderr), result.stderr[-4000:]
    loaded = load_segmentation_dataset(str(output))
    assert {split: len(dataset) for split, dataset in loaded.items()} == {"train": 3, "validation": 2}
    assert dataset_class_names(loaded["validation"]) == list(VOC_CLASS_NAMES)


def test_downscale_halves_images_and_keeps_mask_ids_and_class_names(camvid_source: Path):
    converted = convert_camvid(camvid_source)
    halved = downscale_dataset(converted, 2)
    row, original = halved["train"][0], converted["train"][0]
    assert row["image"].size == (WIDTH // 2, HEIGHT // 2) and row["image"].mode == "RGB"
    halved_mask, original_mask = np.asarray(row["label"]), np.asarray(original["label"])
    # Nearest neighbour: no new ids (an interpolated mask would invent values between neighbouring ids).
    assert set(np.unique(halved_mask)) <= set(np.unique(original_mask))
    assert halved_mask.shape == (HEIGHT // 2, WIDTH // 2)
    assert dataset_class_names(halved["validation"]) == list(CAMVID_CLASS_NAMES)
    assert downscale_dataset(converted, 1) is converted
    with pytest.raises(ValueError, match="integer >= 1"):
        downscale_dataset(converted, 0)
