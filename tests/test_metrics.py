import inspect
import math

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from cps_hf.losses import class_predictions
from cps_hf.metrics import (
    StreamingSegmentationMetric,
    confusion_matrix,
    make_compute_metrics,
    metrics_from_confusion_matrix,
)

NUM_LABELS = 5
IGNORE_INDEX = 255


def reference_metrics(
    predictions: np.ndarray, labels: np.ndarray, num_labels: int, ignore_index: int
) -> dict:
    """Per-class loops over pixels, independent of the confusion-matrix implementation."""
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_labels)
    ious, class_accuracies = [], []
    for class_index in range(num_labels):
        is_label = (labels == class_index) & valid
        is_prediction = (predictions == class_index) & valid
        intersection = np.sum(is_label & is_prediction)
        union = np.sum(is_label | is_prediction)
        ious.append(intersection / union if union > 0 else math.nan)
        if is_label.sum() > 0:
            class_accuracies.append(intersection / is_label.sum())
    present = [iou for iou in ious if not math.isnan(iou)]
    return {
        "mean_iou": sum(present) / len(present),
        "overall_accuracy": np.sum((predictions == labels) & valid) / valid.sum(),
        "mean_accuracy": sum(class_accuracies) / len(class_accuracies),
        "per_class_iou": ious,
    }


def assert_metrics_match_reference(metrics: dict, reference: dict, num_labels: int = NUM_LABELS) -> None:
    for key in ("mean_iou", "overall_accuracy", "mean_accuracy"):
        assert metrics[key] == pytest.approx(reference[key], rel=1e-12), key
    for class_index in range(num_labels):
        expected = reference["per_class_iou"][class_index]
        if math.isnan(expected):
            assert math.isnan(metrics[f"iou_{class_index}"])
        else:
            assert metrics[f"iou_{class_index}"] == pytest.approx(expected, rel=1e-12)


@pytest.fixture
def random_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches of (logits, labels): class 4 never occurs, class 3 is never labelled, some pixels ignored."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        logits = torch.randn(2, NUM_LABELS, 6, 7, generator=generator)
        logits[:, 4] = -100.0
        labels = torch.randint(0, 3, (2, 6, 7), generator=generator)
        labels[torch.rand(2, 6, 7, generator=generator) < 0.2] = IGNORE_INDEX
        labels[0, 0, :3] = -100
        batches.append((logits, labels))
    return batches


def test_confusion_matrix_counts_rows_ground_truth_columns_prediction():
    predictions = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    labels = torch.tensor([[[0, 1, 2], [2, 255, 7]]])
    matrix = confusion_matrix(predictions, labels, num_labels=3)
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    assert matrix.dtype == torch.int64
    assert torch.equal(matrix, expected)


def test_confusion_matrix_matches_pixel_loop(random_batches):
    logits, labels = random_batches[0]
    predictions = logits.argmax(1)
    matrix = confusion_matrix(predictions, labels, NUM_LABELS)
    expected = np.zeros((NUM_LABELS, NUM_LABELS), dtype=np.int64)
    for label, prediction in zip(labels.flatten().tolist(), predictions.flatten().tolist(), strict=True):
        if 0 <= label < NUM_LABELS:
            expected[label, prediction] += 1
    np.testing.assert_array_equal(matrix.numpy(), expected)


def test_metrics_from_hand_confusion_matrix():
    # Class 2 never occurs (union 0); class 3 is predicted once but never labelled.
    matrix = torch.tensor(
        [
            [3, 1, 0, 0],
            [0, 2, 0, 1],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    metrics = metrics_from_confusion_matrix(matrix, id2label={0: "road", 1: "car", 2: "sky", 3: "bus"})
    assert metrics["iou_road"] == pytest.approx(3 / 4)
    assert metrics["iou_car"] == pytest.approx(2 / 4)
    assert math.isnan(metrics["iou_sky"])
    assert metrics["iou_bus"] == 0.0
    assert metrics["mean_iou"] == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert metrics["overall_accuracy"] == pytest.approx(5 / 7)
    assert metrics["mean_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_metrics_name_missing_classes_by_index():
    metrics = metrics_from_confusion_matrix(torch.eye(2, dtype=torch.long), id2label={"0": "background"})
    assert set(metrics) == {"mean_iou", "overall_accuracy", "mean_accuracy", "iou_background", "iou_1"}


def test_metrics_of_empty_matrix_are_nan():
    metrics = metrics_from_confusion_matrix(torch.zeros(3, 3, dtype=torch.long))
    assert math.isnan(metrics["mean_iou"]) and math.isnan(metrics["overall_accuracy"])


def test_streaming_metric_matches_numpy_reference(random_batches):
    metric = StreamingSegmentationMetric(NUM_LABELS, ignore_index=IGNORE_INDEX)
    for logits, labels in random_batches:
        metric.update(logits, labels)
    all_predictions = torch.cat([logits.argmax(1) for logits, _ in random_batches]).numpy()
    all_labels = torch.cat([labels for _, labels in random_batches]).numpy()
    reference = reference_metrics(all_predictions, all_labels, NUM_LABELS, IGNORE_INDEX)
    assert math.isnan(reference["per_class_iou"][4])
    assert reference["per_class_iou"][3] == 0.0
    assert_metrics_match_reference(metric.compute(), reference)


def test_streaming_update_equals_one_shot(random_batches):
    streaming = StreamingSegmentationMetric(NUM_LABELS)
    for logits, labels in random_batches:
        streaming.update(logits, labels)
    one_shot = StreamingSegmentationMetric(NUM_LABELS)
    one_shot.update(
        torch.cat([logits.argmax(1) for logits, _ in random_batches]),
        torch.cat([labels for _, labels in random_batches]),
    )
    assert torch.equal(streaming.matrix, one_shot.matrix)


def test_reset_clears_the_matrix(random_batches):
    metric = StreamingSegmentationMetric(NUM_LABELS)
    logits, labels = random_batches[0]
    metric.update(logits, labels)
    metric.reset()
    metric.update(*random_batches[1])
    expected = confusion_matrix(random_batches[1][0].argmax(1), random_batches[1][1], NUM_LABELS)
    assert torch.equal(metric.matrix, expected)


@pytest.mark.parametrize(
    ("ambiguous_score", "expected_predictions"),
    [
        # Bilinear upsampling of [1, 0] to width 4 (align_corners=False) gives [1, .75, .25, 0] for class 0.
        (0.8, [0, 2, 2, 1]),  # rules out nearest upsampling, which would give [0, 0, 1, 1]
        (0.7, [0, 0, 1, 1]),  # rules out align_corners=True ([1, .67, .33, 0]), which would give [0, 2, 2, 1]
    ],
)
def test_low_resolution_logits_are_upsampled_bilinearly(ambiguous_score, expected_predictions):
    logits = torch.tensor(
        [[[[1.0, 0.0]], [[0.0, 1.0]], [[ambiguous_score, ambiguous_score]]]]
    )  # (1, 3, 1, 2)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    metric = StreamingSegmentationMetric(num_labels=3)
    metric.update(logits, labels)
    expected = confusion_matrix(torch.tensor([[expected_predictions]]), labels, num_labels=3)
    assert torch.equal(metric.matrix, expected)


def test_all_reduce_sums_matrices_across_processes(random_batches):
    other_process = StreamingSegmentationMetric(NUM_LABELS)
    other_process.update(*random_batches[1])
    this_process = StreamingSegmentationMetric(
        NUM_LABELS, all_reduce=lambda matrix: matrix + other_process.matrix
    )
    this_process.update(*random_batches[0])
    combined = StreamingSegmentationMetric(NUM_LABELS)
    combined.update(*random_batches[0])
    combined.update(*random_batches[1])
    assert this_process.compute() == pytest.approx(combined.compute(), nan_ok=True)
    # The local matrix is left untouched.
    assert torch.equal(
        this_process.matrix, confusion_matrix(random_batches[0][0].argmax(1), random_batches[0][1], 5)
    )


def test_trainer_compute_metrics_accumulates_until_last_batch(random_batches):
    compute_metrics = make_compute_metrics(NUM_LABELS, ignore_index=IGNORE_INDEX)
    assert "compute_result" in inspect.signature(compute_metrics).parameters

    reference_metric = StreamingSegmentationMetric(NUM_LABELS)
    for batch_index, (logits, labels) in enumerate(random_batches):
        reference_metric.update(logits, labels)
        is_last = batch_index == len(random_batches) - 1
        # Models with extra outputs hand the Trainer a tuple whose first element is the logits.
        predictions = (logits, torch.zeros(1)) if batch_index == 1 else logits
        result = compute_metrics(
            EvalPrediction(predictions=predictions, label_ids=labels), compute_result=is_last
        )
        if not is_last:
            assert result is None
    assert result == pytest.approx(reference_metric.compute(), nan_ok=True)

    # The state was reset: the next evaluation only sees its own batch.
    logits, labels = random_batches[0]
    result = compute_metrics(
        EvalPrediction(predictions=logits.numpy(), label_ids=labels.numpy()), compute_result=True
    )
    single_batch = StreamingSegmentationMetric(NUM_LABELS)
    single_batch.update(logits, labels)
    assert result == pytest.approx(single_batch.compute(), nan_ok=True)


def test_update_rejects_bad_shapes():
    metric = StreamingSegmentationMetric(num_labels=3)
    with pytest.raises(ValueError, match="channels"):
        metric.update(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        metric.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))


def test_class_pixel_shares_read_the_confusion_matrix():
    from cps_hf.metrics import class_pixel_shares

    # rows ground truth, columns prediction: class 1 occurs on 4 of 10 pixels but is predicted on 1.
    matrix = torch.tensor([[5, 1], [3, 1]])
    shares = class_pixel_shares(matrix, {0: "road", 1: "pole"})
    assert shares == pytest.approx(
        {
            "predicted_share_road": 0.8,
            "label_share_road": 0.6,
            "predicted_share_pole": 0.2,
            "label_share_pole": 0.4,
        }
    )
    empty = class_pixel_shares(torch.zeros(2, 2, dtype=torch.long))
    assert all(math.isnan(value) for value in empty.values()) and "predicted_share_1" in empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_class_predictions_are_argmax_with_first_maximum_on_ties(dtype, channels_last):
    generator = torch.Generator().manual_seed(0)
    # Integer scores in [-2, 2] make ties between classes common; NaN counts as the maximum, as in argmax.
    scores = torch.randint(-2, 3, (3, 7, 17, 23), generator=generator).to(dtype)
    scores[0, 4, 5, 6] = float("nan")
    scores[1, :, 2, 3] = float("nan")
    if channels_last:
        scores = scores.contiguous(memory_format=torch.channels_last)
    expected = scores.contiguous().argmax(dim=1)
    assert torch.equal(class_predictions(scores), expected)
    assert torch.equal(class_predictions(scores[:1].flatten(2)), expected[:1].flatten(1))
    assert expected[0, 5, 6] == 4 and expected[1, 2, 3] == 0
