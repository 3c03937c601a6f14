"""Streaming confusion-matrix metrics for semantic segmentation (mIoU, pixel and class accuracy).

The confusion matrix is accumulated batch by batch on the device of the predictions, so evaluation never has to
hold all full-resolution logits in memory, and it can be summed across processes before the metrics are read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import class_predictions

__all__ = [
    "StreamingSegmentationMetric",
    "class_iou_and_accuracy",
    "class_pixel_shares",
    "confusion_matrix",
    "make_compute_metrics",
    "metrics_from_confusion_matrix",
]


def confusion_matrix(predictions: Tensor, labels: Tensor, num_labels: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix of one batch of predicted label maps.

    Args:
        predictions (`torch.Tensor` of shape `(batch, height, width)`):
            Predicted class indices, which must lie in `[0, num_labels)` (not checked, to avoid a host sync).
        labels (`torch.Tensor` of shape `(batch, height, width)`):
            Ground-truth class indices. Pixels whose label is `ignore_index` or outside `[0, num_labels)`
            (e.g. the -100 padding of the Trainer) are dropped.
        num_labels (`int`):
            Number of classes `C`.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value of pixels that are not evaluated.

    Returns:
        `torch.LongTensor` of shape `(num_labels, num_labels)` on the device of the inputs: entry `[t, p]` counts
        the pixels of ground-truth class `t` predicted as class `p`.

    Raises:
        ValueError: if the shapes differ or `num_labels < 1`.
    """
    if num_labels < 1:
        raise ValueError(f"`num_labels` must be >= 1, got {num_labels}.")
    if predictions.shape != labels.shape:
        raise ValueError(
            f"`predictions` of shape {tuple(predictions.shape)} do not match `labels` of shape {tuple(labels.shape)}."
        )
    labels = labels.to(predictions.device).long().flatten()
    predictions = predictions.long().flatten()
    valid = (labels >= 0) & (labels < num_labels) & (labels != ignore_index)
    counts = torch.bincount(
        labels[valid] * num_labels + predictions[valid], minlength=num_labels * num_labels
    )
    if counts.numel() != num_labels * num_labels:
        raise ValueError(f"`predictions` contain class indices outside [0, {num_labels}).")
    return counts.view(num_labels, num_labels)


def class_iou_and_accuracy(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class IoU and accuracy of a confusion matrix (rows ground truth, columns prediction).

    The IoU of class `c` is `matrix[c, c]` over the pixels of row `c` and column `c` together; its accuracy is
    `matrix[c, c]` over row `c`. A class with union 0 has IoU NaN, a class without ground-truth pixels accuracy NaN.

    Args:
        matrix (`torch.Tensor` of shape `(num_labels, num_labels)`):
            Accumulated confusion matrix, e.g. from [`confusion_matrix`].

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: IoU and accuracy, each `float64` of shape `(num_labels,)` on CPU.

    Raises:
        ValueError: if `matrix` is not square.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"`matrix` must be square, got shape {tuple(matrix.shape)}.")
    counts = matrix.detach().to("cpu", torch.float64)
    true_positives = counts.diagonal()
    ground_truth_pixels = counts.sum(dim=1)
    union = ground_truth_pixels + counts.sum(dim=0) - true_positives
    nan = torch.tensor(math.nan, dtype=torch.float64)
    iou = torch.where(union > 0, true_positives / union.clamp_min(1), nan)
    accuracy = torch.where(ground_truth_pixels > 0, true_positives / ground_truth_pixels.clamp_min(1), nan)
    return iou, accuracy


def metrics_from_confusion_matrix(
    matrix: Tensor, id2label: Mapping[int, str] | None = None
) -> dict[str, float]:
    """Segmentation metrics from a confusion matrix (rows ground truth, columns prediction).

    Conventions: a class that appears neither in the ground truth nor in the predictions (union 0) has IoU NaN
    and is excluded from `mean_iou`; a class without ground-truth pixels is excluded from `mean_accuracy`. A
    class that is predicted but absent from the ground truth has IoU 0 and counts in `mean_iou`. Means over no
    class, and the pixel accuracy of an empty matrix, are NaN.

    Args:
        matrix (`torch.Tensor` of shape `(num_labels, num_labels)`):
            Accumulated confusion matrix, e.g. from [`confusion_matrix`].
        id2label (`Mapping[int, str]`, *optional*):
            Class names used in the per-class keys; classes missing from it are named by their index.

    Returns:
        `dict[str, float]`: `mean_iou`, `overall_accuracy` (pixel accuracy), `mean_accuracy` (mean class
        accuracy) and `iou_<class name>` for every class.
    """
    iou, class_accuracy = class_iou_and_accuracy(matrix)
    counts = matrix.detach().to("cpu", torch.float64)
    total_pixels = counts.sum()
    metrics = {
        "mean_iou": iou.nanmean().item(),
        "overall_accuracy": (counts.trace() / total_pixels).item() if total_pixels > 0 else math.nan,
        "mean_accuracy": class_accuracy.nanmean().item(),
    }
    for class_index, class_iou in enumerate(iou.tolist()):
        metrics[f"iou_{_class_name(id2label, class_index)}"] = class_iou
    return metrics


def _class_name(id2label: Mapping[int, str] | None, class_index: int) -> str:
    # id2label read back from JSON may have string keys.
    id2label = id2label or {}
    return id2label.get(class_index, id2label.get(str(class_index), str(class_index)))


def class_pixel_shares(matrix: Tensor, id2label: Mapping[int, str] | None = None) -> dict[str, float]:
    """How often each class is predicted and how often it is the label, as fractions of the scored pixels.

    Read from the same confusion matrix as the IoUs (ignored pixels excluded): a model that predicts a class much
    less often than it occurs is biased against it, which per-class IoU alone does not show.

    Args:
        matrix (`torch.Tensor` of shape `(num_labels, num_labels)`):
            Accumulated confusion matrix (rows ground truth, columns prediction).
        id2label (`Mapping[int, str]`, *optional*):
            Class names used in the keys; classes missing from it are named by their index.

    Returns:
        `dict[str, float]`: `predicted_share_<class>` and `label_share_<class>` for every class (NaN for an empty
        matrix).
    """
    counts = matrix.detach().to("cpu", torch.float64)
    total = counts.sum()
    predicted, labelled = counts.sum(dim=0), counts.sum(dim=1)
    shares = {}
    for class_index in range(counts.shape[0]):
        name = _class_name(id2label, class_index)
        shares[f"predicted_share_{name}"] = (predicted[class_index] / total).item() if total > 0 else math.nan
        shares[f"label_share_{name}"] = (labelled[class_index] / total).item() if total > 0 else math.nan
    return shares


class StreamingSegmentationMetric:
    """Running confusion matrix with mIoU / accuracy read-out.

    Feed it batch by batch with [`~StreamingSegmentationMetric.update`], read the metrics with
    [`~StreamingSegmentationMetric.compute`] and start over with [`~StreamingSegmentationMetric.reset`].
    Calling the instance as `metric(eval_pred, compute_result)` makes it a `compute_metrics` for the
    [`~transformers.Trainer`] with `batch_eval_metrics=True` (see [`make_compute_metrics`]).

    Args:
        num_labels (`int`):
            Number of classes.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value of pixels that are not evaluated; labels outside `[0, num_labels)` are dropped too.
        id2label (`Mapping[int, str]`, *optional*):
            Class names for the per-class keys.
        all_reduce (`Callable[[torch.Tensor], torch.Tensor]`, *optional*):
            Called in `compute` on a copy of the confusion matrix; it must return the matrix summed over all
            processes, e.g. `lambda matrix: accelerator.reduce(matrix, "sum")`. Leave it unset when each process
            already sees every prediction, as under the Trainer, whose evaluation loop gathers them.
        device (`torch.device` or `str`, *optional*):
            Device of the matrix before the first update (it then follows the predictions). Defaults to CPU.

    Example:

    >>> import torch
    >>> metric = StreamingSegmentationMetric(num_labels=2)
    >>> metric.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 1], [0, 255]]]))
    >>> round(metric.compute()["mean_iou"], 4)
    0.5
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = 255,
        id2label: Mapping[int, str] | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if num_labels < 1:
            raise ValueError(f"`num_labels` must be >= 1, got {num_labels}.")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.id2label = dict(id2label) if id2label is not None else None
        self.all_reduce = all_reduce
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.matrix: Tensor | None = None

    def reset(self) -> None:
        """Clears the accumulated confusion matrix."""
        self.matrix = None

    @torch.no_grad()
    def update(self, logits_or_predictions: Tensor, labels: Tensor) -> None:
        """Adds one batch to the confusion matrix.

        Args:
            logits_or_predictions (`torch.Tensor`):
                Either logits `(batch, num_labels, h, w)`, which are bilinearly upsampled
                (`align_corners=False`) to the label size when `(h, w)` differs and then argmaxed, or predicted
                class indices `(batch, height, width)`.
            labels (`torch.Tensor` of shape `(batch, height, width)`):
                Ground-truth class indices.
        """
        if labels.ndim != 3:
            raise ValueError(f"`labels` must have shape (batch, height, width), got {tuple(labels.shape)}.")
        if logits_or_predictions.ndim == 4:
            logits = logits_or_predictions
            if logits.shape[1] != self.num_labels:
                raise ValueError(
                    f"Expected logits with {self.num_labels} channels, got shape {tuple(logits.shape)}."
                )
            if logits.shape[2:] != labels.shape[1:]:
                logits = F.interpolate(
                    logits.float(), size=labels.shape[1:], mode="bilinear", align_corners=False
                )
            predictions = class_predictions(logits)
        elif logits_or_predictions.ndim == 3:
            predictions = logits_or_predictions
        else:
            raise ValueError(
                "Expected logits (batch, num_labels, height, width) or predictions (batch, height, width), got "
                f"shape {tuple(logits_or_predictions.shape)}."
            )
        batch_matrix = confusion_matrix(predictions, labels, self.num_labels, self.ignore_index)
        self.matrix = (
            batch_matrix if self.matrix is None else self.matrix + batch_matrix.to(self.matrix.device)
        )

    def compute(self) -> dict[str, float]:
        """Metrics of everything seen since the last reset (summed across processes if `all_reduce` is set).

        Returns:
            `dict[str, float]`: see [`metrics_from_confusion_matrix`].
        """
        matrix = self.matrix
        if matrix is None:
            matrix = torch.zeros(self.num_labels, self.num_labels, dtype=torch.long, device=self.device)
        if self.all_reduce is not None:
            matrix = self.all_reduce(matrix.clone())
        return metrics_from_confusion_matrix(matrix, self.id2label)

    def __call__(self, eval_pred: Any, compute_result: bool = True) -> dict[str, float] | None:
        """Trainer-style `compute_metrics` with `batch_eval_metrics=True`.

        Args:
            eval_pred ([`~transformers.EvalPrediction`]):
                `predictions` holds logits or class indices (or a tuple whose first element does), `label_ids` the
                label maps; tensors or NumPy arrays.
            compute_result (`bool`, *optional*, defaults to `True`):
                Whether this is the last batch. The Trainer passes `False` for every other batch.

        Returns:
            `dict[str, float] | None`: the metrics (and the state is reset) when `compute_result` is `True`,
            otherwise `None`.
        """
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        if isinstance(labels, (tuple, list)):
            labels = labels[0]
        self.update(_as_tensor(predictions), _as_tensor(labels))
        if not compute_result:
            return None
        metrics = self.compute()
        self.reset()
        return metrics


def _as_tensor(array: Tensor | np.ndarray) -> Tensor:
    return array if isinstance(array, Tensor) else torch.as_tensor(array)


def make_compute_metrics(
    num_labels: int,
    ignore_index: int = 255,
    id2label: Mapping[int, str] | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> StreamingSegmentationMetric:
    """Builds a `compute_metrics` for the [`~transformers.Trainer`] with `batch_eval_metrics=True`.

    The returned callable takes `(eval_pred, compute_result)`: it accumulates every batch, returns `None` while
    `compute_result` is `False`, and on the last batch returns the metrics and resets for the next evaluation.

    Args:
        num_labels (`int`):
            Number of classes.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value of pixels that are not evaluated.
        id2label (`Mapping[int, str]`, *optional*):
            Class names for the per-class keys.
        all_reduce (`Callable[[torch.Tensor], torch.Tensor]`, *optional*):
            See [`StreamingSegmentationMetric`]; not needed under the Trainer.

    Returns:
        [`StreamingSegmentationMetric`]: a callable instance.

    Example:

    >>> compute_metrics = make_compute_metrics(num_labels=21, id2label=model.config.id2label)  # doctest: +SKIP
    >>> args = TrainingArguments(..., batch_eval_metrics=True)  # doctest: +SKIP
    >>> trainer = Trainer(model, args, compute_metrics=compute_metrics)  # doctest: +SKIP
    """
    return StreamingSegmentationMetric(
        num_labels, ignore_index=ignore_index, id2label=id2label, all_reduce=all_reduce
    )
