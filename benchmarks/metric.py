"""Speed of the streaming mIoU against the `evaluate` library's algorithm (benchmark tooling, not installed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.step import describe_machine


def histogram_mean_iou(
    predictions: list[np.ndarray], labels: list[np.ndarray], num_labels: int, ignore_index: int = 255
) -> dict[str, Any]:
    """
    mIoU computed the way the `evaluate` library's `mean_iou` metric does it (re-implemented here from its documented
    algorithm, since loading it needs the Hub): per image, drop the ignored pixels, then count the intersection,
    prediction and label areas of every class with `np.histogram`; sum the areas over images; IoU = intersection /
    union. Used only as the baseline of [`benchmark_metric`].

    Returns:
        `dict` with `mean_iou`, `overall_accuracy`, `mean_accuracy` and `per_class_iou` (`np.ndarray`).
    """
    totals = np.zeros((3, num_labels), dtype=np.float64)  # intersection, prediction, label areas
    for prediction, label in zip(predictions, labels):
        keep = label != ignore_index
        prediction, label = prediction[keep], label[keep]
        for row, values in enumerate((prediction[prediction == label], prediction, label)):
            totals[row] += np.histogram(values, bins=num_labels, range=(0, num_labels - 1))[0]
    intersection, predicted, labelled = totals
    union = predicted + labelled - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class_iou = intersection / union
        per_class_accuracy = intersection / labelled
    return {
        "mean_iou": float(np.nanmean(per_class_iou)),
        "overall_accuracy": float(intersection.sum() / labelled.sum()),
        "mean_accuracy": float(np.nanmean(per_class_accuracy)),
        "per_class_iou": per_class_iou,
    }


def benchmark_metric(
    num_images: int = 101,
    height: int = 360,
    width: int = 480,
    num_labels: int = 11,
    batch_size: int = 16,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """
    Times cps_hf's streaming confusion-matrix mIoU ([`~cps_hf.metrics.StreamingSegmentationMetric`], fed batch by
    batch as during evaluation) against the `evaluate`-style per-image histogram algorithm
    ([`histogram_mean_iou`]) on the same random predictions and labels (about 5% ignored pixels), and checks that
    both give the same per-class IoU. Defaults: the size of CamVid's validation split.

    Returns:
        `dict`, JSON-ready: best-of-`repeats` seconds of both, their ratio, images/s, the largest per-class IoU
        difference and the settings.
    """
    from cps_hf.metrics import StreamingSegmentationMetric

    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_labels, (num_images, height, width), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.05] = 255
    # Predictions agree with the labels on about 70% of pixels, so IoUs are far from 0 and 1.
    random_classes = torch.randint(num_labels, labels.shape, generator=generator)
    predictions = torch.where(
        torch.rand(labels.shape, generator=generator) < 0.7, labels % 255, random_classes
    )
    predictions = predictions.clamp_max(num_labels - 1)
    numpy_predictions = [image.numpy() for image in predictions]
    numpy_labels = [image.numpy() for image in labels]

    def run_streaming() -> dict[str, float]:
        metric = StreamingSegmentationMetric(num_labels)
        for start in range(0, num_images, batch_size):
            metric.update(predictions[start : start + batch_size], labels[start : start + batch_size])
        return metric.compute()

    def best_time(function: Callable[[], Any]) -> tuple[float, Any]:
        timings, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = function()
            timings.append(time.perf_counter() - start)
        return min(timings), result

    streaming_seconds, streaming = best_time(run_streaming)
    histogram_seconds, histogram = best_time(
        lambda: histogram_mean_iou(numpy_predictions, numpy_labels, num_labels)
    )
    streaming_iou = np.array([streaming[f"iou_{index}"] for index in range(num_labels)])
    return {
        "streaming_seconds": streaming_seconds,
        "histogram_seconds": histogram_seconds,
        "speedup": histogram_seconds / streaming_seconds,
        "streaming_images_per_second": num_images / streaming_seconds,
        "histogram_images_per_second": num_images / histogram_seconds,
        "mean_iou": streaming["mean_iou"],
        "max_per_class_iou_difference": float(np.nanmax(np.abs(streaming_iou - histogram["per_class_iou"]))),
        "settings": {
            "num_images": num_images,
            "height": height,
            "width": width,
            "num_labels": num_labels,
            "batch_size": batch_size,
            "repeats": repeats,
            "num_threads": torch.get_num_threads(),
        },
        "machine": describe_machine(),
    }
