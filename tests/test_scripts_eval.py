import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TWO_CPU_PROCESSES_LAUNCH, run_script, save_tiny_model
from PIL import Image as PILImage
from transformers import AutoImageProcessor

from cps_hf import CPSForSemanticSegmentation
from cps_hf.data import SegmentationTransform, SupervisedSegmentationDataset, load_segmentation_dataset
from cps_hf.data.synthetic import SYNTHETIC_CLASS_NAMES, make_synthetic_segmentation_dataset
from cps_hf.evaluation import evaluate_model
from cps_hf.inference import InferenceProtocol, load_image_normalization

NUM_LABELS = len(SYNTHETIC_CLASS_NAMES)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("synthetic_cache")
    dataset_dir = tmp_path_factory.mktemp("dataset") / "synthetic"
    splits = make_synthetic_segmentation_dataset(
        num_train=4, num_val=4, image_size=32, cache_dir=str(cache_dir)
    )
    splits.save_to_disk(str(dataset_dir))
    return dataset_dir


def evaluation_arguments(saved_model: Path, saved_dataset: Path, output_json: Path) -> list[str]:
    return [
        "--model",
        str(saved_model),
        "--dataset_name",
        str(saved_dataset),
        "--mode",
        "slide",
        "--crop_size",
        "24",
        "--flip",
        "--output_json",
        str(output_json),
    ]


def test_evaluate_script_reports_every_branch_and_the_ensemble(tmp_path, saved_model, saved_dataset):
    output_json = tmp_path / "eval.json"
    result = run_script("evaluate_cps", *evaluation_arguments(saved_model, saved_dataset, output_json))
    report = json.loads(output_json.read_text())
    assert list(report["results"]) == ["branch_0", "branch_1", "ensemble"]
    assert report["num_images"] == 4 and report["images_per_second"] > 0
    assert report["protocol"] == {
        "mode": "slide",
        "crop_size": [24, 24],
        "stride": [16, 16],
        "scales": [1.0],
        "flip": True,
    }
    for line in ("striped_disc", "mIoU", "pixel acc", "ensemble", "images/s"):
        assert line in result.stdout

    # The same numbers as an in-process evaluation of the saved model.
    model = CPSForSemanticSegmentation.from_pretrained(saved_model)
    mean, std = load_image_normalization(str(saved_model), model.config.backbone)
    dataset = SupervisedSegmentationDataset(
        load_segmentation_dataset(str(saved_dataset))["validation"],
        num_labels=NUM_LABELS,
        transform=SegmentationTransform(train=False, mean=mean, std=std),
    )
    expected = evaluate_model(
        model, dataset, InferenceProtocol(mode="slide", crop_size=24, flip=True), progress=False
    )
    for name, metrics in expected.items():
        for key, value in metrics.items():
            reported = report["results"][name][key]
            assert (reported is None and np.isnan(value)) or reported == pytest.approx(value, abs=1e-12)


def test_predict_script_writes_palette_masks_and_overlays(tmp_path, saved_model):
    input_dir = tmp_path / "inputs"
    input_dir.mkdir()
    rng = np.random.default_rng(0)
    image_paths = [input_dir / "first.png", tmp_path / "second.png"]
    for path, size in zip(image_paths, [(23, 31), (40, 18)]):
        PILImage.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    output_dir = tmp_path / "predictions"
    run_script(
        "predict",
        "--model",
        str(saved_model),
        "--output_dir",
        str(output_dir),
        str(input_dir),
        str(image_paths[1]),
    )

    model = CPSForSemanticSegmentation.from_pretrained(saved_model).eval()
    processor = AutoImageProcessor.from_pretrained(saved_model)
    for path in image_paths:
        image = PILImage.open(path)
        mask_image = PILImage.open(output_dir / f"{path.stem}_mask.png")
        overlay_image = PILImage.open(output_dir / f"{path.stem}_overlay.png")
        assert mask_image.mode == "P" and mask_image.size == image.size
        assert overlay_image.mode == "RGB" and overlay_image.size == image.size
        mask = np.asarray(mask_image)
        assert mask.min() >= 0 and mask.max() < NUM_LABELS
        # The argmax of the model on the image, normalised by the saved image processor itself.
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = model(pixel_values).logits.argmax(dim=1)[0].numpy()
        np.testing.assert_array_equal(mask, expected)


@pytest.mark.slow
def test_evaluate_script_under_two_processes_matches_one(tmp_path, saved_model, saved_dataset):
    single_json, double_json = tmp_path / "single.json", tmp_path / "double.json"
    run_script("evaluate_cps", *evaluation_arguments(saved_model, saved_dataset, single_json))
    launcher = TWO_CPU_PROCESSES_LAUNCH[1:]
    result = run_script(
        "evaluate_cps",
        *evaluation_arguments(saved_model, saved_dataset, double_json),
        launcher=launcher,
        extra_env={"ACCELERATE_USE_CPU": "1"},
    )
    assert result.stdout.count("mIoU") == 1  # printed once, by the main process
    single, double = json.loads(single_json.read_text()), json.loads(double_json.read_text())
    assert double["num_processes"] == 2
    assert double["results"] == single["results"]
