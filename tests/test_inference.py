import dataclasses
import io
import math
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import nn

from cps_hf import CPSForSemanticSegmentation
from cps_hf.data.synthetic import SYNTHETIC_CLASS_NAMES, SYNTHETIC_PALETTE
from cps_hf.evaluation import evaluate_model, format_results_table
from cps_hf.inference import (
    InferenceProtocol,
    _window_starts,
    parse_branch_selection,
    predict_branch_probabilities,
    predict_logits,
    predict_probabilities,
)
from cps_hf.metrics import confusion_matrix, metrics_from_confusion_matrix
from cps_hf.visualization import IGNORE_COLOR, colorize_mask, overlay, segmentation_palette

NUM_LABELS = len(SYNTHETIC_CLASS_NAMES)


class ToyBranchModel(nn.Module):
    """A CPS-like model made of arbitrary per-branch modules (same `branches` / `forward(..., branch_index=)`
    interface)."""

    def __init__(self, branches: list[nn.Module], inference_branch: int | str = 0):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.config = SimpleNamespace(
            inference_branch=inference_branch,
            num_labels=NUM_LABELS,
            semantic_loss_ignore_index=255,
            id2label=dict(enumerate(SYNTHETIC_CLASS_NAMES)),
        )

    def forward(self, pixel_values: torch.Tensor, branch_index: int) -> SimpleNamespace:
        return SimpleNamespace(logits=self.branches[branch_index](pixel_values))


def pointwise_model(seed: int = 0, num_branches: int = 2) -> ToyBranchModel:
    """Logits are a 1x1 convolution of the pixels: equivariant to translations and flips."""
    torch.manual_seed(seed)
    return ToyBranchModel([nn.Conv2d(3, NUM_LABELS, 1) for _ in range(num_branches)])


def horizontal_model(seed: int = 0) -> ToyBranchModel:
    """An asymmetric 1x3 kernel: not flip-equivariant."""
    torch.manual_seed(seed)
    return ToyBranchModel([nn.Conv2d(3, NUM_LABELS, (1, 3), padding=(0, 1)) for _ in range(2)])


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return CPSForSemanticSegmentation(tiny_config).eval()


def random_images(batch: int = 2, height: int = 37, width: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# Sliding window
# ----------------------------------------------------------------------------------------------------------------


def test_window_starts_follow_the_reference_grid():
    # ceil((37 - 16) / 11) + 1 = 3 windows, the last one moved back to end at the border.
    assert _window_starts(37, 16, 11) == [0, 11, 21]
    assert _window_starts(16, 16, 11) == [0]
    assert InferenceProtocol(mode="slide", crop_size=512).to_json_dict()["stride"] == [
        342,
        342,
    ]  # ceil(2/3 * 512)


def test_single_window_slide_equals_whole_image(tiny_model):
    pixel_values = random_images(height=40, width=52)
    whole = predict_probabilities(tiny_model, pixel_values)
    slide = predict_probabilities(
        tiny_model, pixel_values, protocol=InferenceProtocol(mode="slide", crop_size=(40, 52))
    )
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(whole, tiny_model(pixel_values).logits.softmax(dim=1))


@pytest.mark.parametrize(
    ("crop_size", "stride"),
    [(16, None), (16, 5), ((20, 12), (7, 3)), ((48, 20), None), (64, None)],
)
def test_overlapping_windows_equal_whole_image_for_a_pointwise_model(crop_size, stride):
    # Windows overlap (and, for crops taller than the image, the image is padded): a translation-equivariant model
    # gives every window the same per-pixel values, so their coverage-weighted mean is the whole-image prediction.
    model = pointwise_model()
    pixel_values = random_images()
    whole = predict_probabilities(model, pixel_values)
    slide = predict_probabilities(
        model, pixel_values, protocol=InferenceProtocol(mode="slide", crop_size=crop_size, stride=stride)
    )
    assert slide.shape == whole.shape
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)


def test_window_batching_and_image_batching_do_not_change_the_result(tiny_model):
    pixel_values = random_images(batch=2, height=30, width=41)
    protocol = InferenceProtocol(mode="slide", crop_size=16, stride=9)
    one_at_a_time = predict_probabilities(
        tiny_model, pixel_values, protocol=dataclasses.replace(protocol, window_batch_size=1)
    )
    all_at_once = predict_probabilities(
        tiny_model, pixel_values, protocol=dataclasses.replace(protocol, window_batch_size=64)
    )
    torch.testing.assert_close(all_at_once, one_at_a_time, rtol=0, atol=1e-5)
    per_image = torch.cat(
        [predict_probabilities(tiny_model, image[None], protocol=protocol) for image in pixel_values]
    )
    torch.testing.assert_close(per_image, one_at_a_time, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Test-time augmentation
# ----------------------------------------------------------------------------------------------------------------


def test_flip_of_a_flip_equivariant_model_changes_nothing():
    model = pointwise_model()
    pixel_values = random_images()
    torch.testing.assert_close(
        predict_probabilities(model, pixel_values, protocol=InferenceProtocol(flip=True)),
        predict_probabilities(model, pixel_values),
    )


def test_flip_averages_with_the_flipped_prediction():
    model = horizontal_model()
    pixel_values = random_images()
    with torch.no_grad():
        plain = model(pixel_values, branch_index=0).logits.softmax(dim=1)
        flipped = model(pixel_values.flip(-1), branch_index=0).logits.softmax(dim=1).flip(-1)
    assert not torch.allclose(plain, flipped)
    torch.testing.assert_close(
        predict_probabilities(model, pixel_values, protocol=InferenceProtocol(flip=True)),
        (plain + flipped) / 2,
    )


def test_single_unit_scale_equals_whole_image(tiny_model):
    pixel_values = random_images()
    torch.testing.assert_close(
        predict_probabilities(tiny_model, pixel_values, protocol=InferenceProtocol(scales=(1.0,))),
        predict_probabilities(tiny_model, pixel_values),
        rtol=0,
        atol=0,
    )


def test_multi_scale_averages_the_resized_predictions():
    model = horizontal_model()
    pixel_values = random_images(height=20, width=30)
    expected = []
    with torch.no_grad():
        for scale in (0.5, 1.5):
            scaled = F.interpolate(
                pixel_values,
                size=(round(20 * scale), round(30 * scale)),
                mode="bilinear",
                align_corners=False,
            )
            probabilities = model(scaled, branch_index=0).logits.softmax(dim=1)
            expected.append(F.interpolate(probabilities, size=(20, 30), mode="bilinear", align_corners=False))
    result = predict_probabilities(model, pixel_values, protocol=InferenceProtocol(scales=(0.5, 1.5)))
    torch.testing.assert_close(result, (expected[0] + expected[1]) / 2)


# ----------------------------------------------------------------------------------------------------------------
# Branches
# ----------------------------------------------------------------------------------------------------------------


def test_ensemble_is_the_mean_of_branch_probabilities(tiny_model):
    pixel_values = random_images()
    branch_0 = predict_probabilities(tiny_model, pixel_values, branch=0)
    branch_1 = predict_probabilities(tiny_model, pixel_values, branch=1)
    ensemble = predict_probabilities(tiny_model, pixel_values, branch="ensemble")
    assert not torch.allclose(branch_0, branch_1)
    torch.testing.assert_close(ensemble, (branch_0 + branch_1) / 2)
    # ... the model's own ensemble, and what the one-pass helper derives.
    tiny_model.config.inference_branch = "ensemble"
    with torch.no_grad():
        torch.testing.assert_close(ensemble, tiny_model(pixel_values).logits.softmax(dim=1))
    all_branches = predict_branch_probabilities(
        tiny_model, pixel_values, protocol=InferenceProtocol(mode="slide", crop_size=24)
    )
    assert list(all_branches) == [0, 1, "ensemble"]
    torch.testing.assert_close(all_branches["ensemble"], (all_branches[0] + all_branches[1]) / 2)


def test_default_branch_is_the_configured_inference_branch(tiny_model):
    pixel_values = random_images()
    tiny_model.config.inference_branch = 1
    torch.testing.assert_close(
        predict_probabilities(tiny_model, pixel_values),
        predict_probabilities(tiny_model, pixel_values, branch=1),
    )


def test_logits_are_log_probabilities(tiny_model):
    pixel_values = random_images()
    flip = InferenceProtocol(flip=True)
    logits = predict_logits(tiny_model, pixel_values, protocol=flip, branch="ensemble")
    torch.testing.assert_close(
        logits.softmax(dim=1),
        predict_probabilities(tiny_model, pixel_values, protocol=flip, branch="ensemble"),
    )


def test_model_modes_are_restored(tiny_model):
    tiny_model.train()
    tiny_model.branches[1].backbone.eval()
    predict_probabilities(tiny_model, random_images())
    assert tiny_model.training and tiny_model.branches[0].backbone.training
    assert not tiny_model.branches[1].backbone.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "tiles"}, "mode"),
        ({"mode": "slide"}, "crop_size"),
        ({"mode": "slide", "crop_size": 8, "stride": 9}, "stride"),
        ({"crop_size": 8}, "only apply to mode='slide'"),
        ({"scales": ()}, "scales"),
        ({"window_batch_size": 0}, "window_batch_size"),
    ],
)
def test_invalid_protocols_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InferenceProtocol(**kwargs)


def test_invalid_branch_is_rejected():
    with pytest.raises(ValueError, match="branch"):
        predict_probabilities(pointwise_model(), random_images(), branch=2)


class HalfResolutionModel(nn.Module):
    """A plain (single-branch) model whose output has `logits` at half the input resolution, like SegFormer's."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Conv2d(3, NUM_LABELS, 2, stride=2)
        self.config = SimpleNamespace(num_labels=NUM_LABELS)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.classifier(pixel_values))


def test_plain_models_are_upsampled_and_evaluated_as_one_entry():
    torch.manual_seed(0)
    model = HalfResolutionModel()
    pixel_values = random_images(height=20, width=30)
    probabilities = predict_probabilities(model, pixel_values)
    with torch.no_grad():
        expected = F.interpolate(
            model(pixel_values).logits, size=(20, 30), mode="bilinear", align_corners=False
        )
    torch.testing.assert_close(probabilities, expected.softmax(dim=1))
    results = evaluate_model(model, labelled_items(count=2), progress=False)
    assert list(results) == ["model"] and 0.0 <= results["model"]["mean_iou"] <= 1.0
    with pytest.raises(ValueError, match="multi-branch"):
        predict_probabilities(model, pixel_values, branch=0)


def test_parse_branch_selection():
    assert parse_branch_selection(["0", "1", "ensemble"]) == [0, 1, "ensemble"]
    with pytest.raises(ValueError, match="'both'"):
        parse_branch_selection(["both"])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def labelled_items(count: int = 3, height: int = 20, width: int = 26) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    items = []
    for _ in range(count):
        labels = torch.randint(0, NUM_LABELS, (height, width), generator=generator)
        labels[torch.rand(height, width, generator=generator) < 0.2] = 255
        items.append({"pixel_values": torch.randn(3, height, width, generator=generator), "labels": labels})
    return items


def hand_metrics(
    predictions: list[np.ndarray], labels: list[np.ndarray], ignore_index: int
) -> dict[str, float]:
    """mIoU, pixel accuracy and mean class accuracy from per-class pixel counts."""
    intersection = np.zeros(NUM_LABELS)
    predicted = np.zeros(NUM_LABELS)
    ground_truth = np.zeros(NUM_LABELS)
    for prediction, label in zip(predictions, labels):
        evaluated = (label != ignore_index) & (label >= 0) & (label < NUM_LABELS)
        prediction, label = prediction[evaluated], label[evaluated]
        for class_id in range(NUM_LABELS):
            intersection[class_id] += np.sum((prediction == class_id) & (label == class_id))
            predicted[class_id] += np.sum(prediction == class_id)
            ground_truth[class_id] += np.sum(label == class_id)
    union = predicted + ground_truth - intersection
    iou = [intersection[c] / union[c] for c in range(NUM_LABELS) if union[c] > 0]
    accuracy = [intersection[c] / ground_truth[c] for c in range(NUM_LABELS) if ground_truth[c] > 0]
    return {
        "mean_iou": float(np.mean(iou)),
        "overall_accuracy": float(intersection.sum() / ground_truth.sum()),
        "mean_accuracy": float(np.mean(accuracy)),
    }


@pytest.mark.parametrize("ignore_index", [255, 0])
def test_evaluate_model_matches_metrics_computed_by_hand(tiny_model, ignore_index):
    items = labelled_items()
    protocol = InferenceProtocol(mode="slide", crop_size=16, flip=True)
    results = evaluate_model(
        tiny_model, items, protocol, ignore_index=ignore_index, batch_size=2, progress=False
    )
    assert list(results) == ["branch_0", "branch_1", "ensemble"]
    for name, branch in (("branch_0", 0), ("branch_1", 1), ("ensemble", "ensemble")):
        predictions = [
            predict_probabilities(tiny_model, item["pixel_values"][None], protocol=protocol, branch=branch)[0]
            .argmax(dim=0)
            .numpy()
            for item in items
        ]
        expected = hand_metrics(predictions, [item["labels"].numpy() for item in items], ignore_index)
        for key, value in expected.items():
            assert results[name][key] == pytest.approx(value, abs=1e-12), (name, key)
        assert {f"iou_{label}" for label in tiny_model.config.id2label.values()} <= set(results[name])


def test_evaluate_model_takes_a_loader_and_a_branch_subset(tiny_model):
    items = labelled_items()
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=3,
        collate_fn=lambda batch: {key: torch.stack([b[key] for b in batch]) for key in batch[0]},
    )
    from_loader = evaluate_model(tiny_model, loader, branches=[1], progress=False)
    from_dataset = evaluate_model(tiny_model, items, progress=False)
    assert list(from_loader) == ["branch_1"]
    assert from_loader["branch_1"] == from_dataset["branch_1"]
    table = format_results_table(from_dataset, tiny_model.config.id2label)
    assert "checkered_square" in table and "mIoU" in table and "ensemble" in table


def test_evaluate_model_rejects_a_raw_hf_dataset(tiny_model):
    raw = datasets.Dataset.from_dict({"image": [[0]], "label": [[0]]})
    with pytest.raises(TypeError, match="SupervisedSegmentationDataset"):
        evaluate_model(tiny_model, raw, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# The `evaluate` metric module
# ----------------------------------------------------------------------------------------------------------------


def reference_mean_iou(
    predictions, references, num_labels, ignore_index, label_map=None, reduce_labels=False
):
    """The algorithm of evaluate's Hub `mean_iou` metric, re-implemented from its documented semantics."""
    total_intersect = np.zeros(num_labels)
    total_union = np.zeros(num_labels)
    total_label = np.zeros(num_labels)
    for prediction, label in zip(predictions, references):
        prediction, label = np.array(prediction), np.array(label)
        if label_map is not None:
            original = label.copy()
            for old_id, new_id in label_map.items():
                label[original == old_id] = new_id
        if reduce_labels:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = label != ignore_index
        prediction, label = prediction[mask], label[mask]
        intersect = prediction[prediction == label]
        histogram = dict(bins=num_labels, range=(0, num_labels - 1))
        area_intersect = np.histogram(intersect, **histogram)[0]
        area_prediction = np.histogram(prediction, **histogram)[0]
        area_label = np.histogram(label, **histogram)[0]
        total_intersect += area_intersect
        total_union += area_prediction + area_label - area_intersect
        total_label += area_label
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = total_intersect / total_union
        accuracy = total_intersect / total_label
        return {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(accuracy),
            "overall_accuracy": total_intersect.sum() / total_label.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }


def assert_same_results(results, expected):
    assert set(results) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(results[key], value, rtol=1e-12, atol=0, equal_nan=True, err_msg=key)


def random_label_maps(seed: int, num_labels: int, out_of_range: bool = False):
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for height, width in [(7, 9), (12, 5), (6, 6)]:
        # Class num_labels - 1 never appears anywhere: its IoU is NaN and leaves the mean.
        prediction = rng.integers(0, num_labels - 1, (height, width))
        reference = rng.integers(0, num_labels - 1, (height, width))
        reference[rng.random((height, width)) < 0.25] = 255
        if out_of_range:
            reference[0, 0] = num_labels + 3
            prediction[1, 1] = num_labels + 5
        predictions.append(prediction.astype(np.uint8))
        references.append(reference.astype(np.uint8))
    return predictions, references


@pytest.fixture(scope="module")
def mean_iou_metric():
    import evaluate

    import cps_hf.mean_iou_metric

    return evaluate.load(cps_hf.mean_iou_metric.__file__)


def test_evaluate_metric_loads_offline_and_matches_the_reference_algorithm(mean_iou_metric):
    predictions, references = random_label_maps(seed=0, num_labels=6)
    results = mean_iou_metric.compute(
        predictions=predictions, references=references, num_labels=6, ignore_index=255
    )
    expected = reference_mean_iou(predictions, references, num_labels=6, ignore_index=255)
    assert math.isnan(expected["per_category_iou"][5])
    assert_same_results(results, expected)


@pytest.mark.parametrize(
    "options",
    [
        {"reduce_labels": True},
        {"label_map": {1: 2, 2: 1}},
        {"out_of_range": True},
    ],
)
def test_metric_options_match_the_reference_algorithm(options):
    from cps_hf.mean_iou_metric import compute_mean_iou

    options = dict(options)
    predictions, references = random_label_maps(
        seed=1, num_labels=5, out_of_range=options.pop("out_of_range", False)
    )
    results = compute_mean_iou(predictions, references, num_labels=5, ignore_index=255, **options)
    assert_same_results(results, reference_mean_iou(predictions, references, 5, 255, **options))
    nan_free = compute_mean_iou(
        predictions, references, num_labels=5, ignore_index=255, nan_to_num=-1, **options
    )
    assert not np.isnan(nan_free["per_category_iou"]).any()


def test_metric_agrees_with_the_streaming_confusion_matrix():
    from cps_hf.mean_iou_metric import compute_mean_iou

    predictions, references = random_label_maps(seed=2, num_labels=6)
    results = compute_mean_iou(predictions, references, num_labels=6, ignore_index=255)
    matrix = sum(
        confusion_matrix(torch.from_numpy(p.astype(np.int64)), torch.from_numpy(r.astype(np.int64)), 6)
        for p, r in zip(predictions, references)
    )
    streaming = metrics_from_confusion_matrix(matrix)
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert results[key] == pytest.approx(streaming[key], rel=1e-12)
    np.testing.assert_allclose(
        results["per_category_iou"], [streaming[f"iou_{c}"] for c in range(6)], equal_nan=True
    )


# ----------------------------------------------------------------------------------------------------------------
# Visualisation helpers
# ----------------------------------------------------------------------------------------------------------------


def test_palette_matches_the_dataset_colours_and_marks_the_ignore_index():
    palette = segmentation_palette(5)
    assert len(palette) == 768
    assert [tuple(palette[3 * c : 3 * c + 3]) for c in range(5)] == list(SYNTHETIC_PALETTE)
    assert tuple(palette[3 * 255 :]) == IGNORE_COLOR
    assert len({tuple(palette[3 * c : 3 * c + 3]) for c in range(21)}) == 21
    with pytest.raises(ValueError, match="257"):
        segmentation_palette(257)


def test_colorized_mask_round_trips_through_png():
    mask = torch.tensor([[0, 1, 2], [4, 255, 0]])
    buffer = io.BytesIO()
    colorize_mask(mask, segmentation_palette(5)).save(buffer, format="PNG")
    image = PILImage.open(io.BytesIO(buffer.getvalue()))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), mask.numpy())
    with pytest.raises(ValueError, match="256"):
        colorize_mask(torch.tensor([[300]]), segmentation_palette(5))


def test_overlay_blends_half_and_half():
    image = torch.ones(3, 2, 3)  # white
    blended = np.asarray(overlay(image, torch.ones(2, 3, dtype=torch.long), segmentation_palette(3)))
    # (255 + class-1 maroon (128, 0, 0)) / 2
    np.testing.assert_allclose(blended[0, 0], [191, 127, 127], atol=1)
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, torch.ones(3, 3, dtype=torch.long), segmentation_palette(3))
