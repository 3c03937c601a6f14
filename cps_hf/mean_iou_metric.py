"""Mean IoU as an `evaluate` metric module that works offline, backed by cps_hf's bincount confusion matrix.

Load it with `evaluate.load(cps_hf.mean_iou_metric.__file__)` (or [`load_mean_iou_metric`]): it takes the arguments
and returns the outputs of the Hub's `mean_iou` metric, with the same numbers.

`evaluate.load` copies this file into its modules cache and imports it from there, so it must only use absolute
imports (cps_hf is installed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import datasets
import evaluate
import numpy as np
import torch

import cps_hf.metrics

_DESCRIPTION = """
Mean Intersection-over-Union of semantic segmentation maps, the drop-in offline twin of the Hub's `mean_iou` metric
(same arguments, same outputs), computed from a confusion matrix built with `torch.bincount`
(`cps_hf.metrics.confusion_matrix`), several times faster than the Hub metric's per-image histograms.

Intersections, predicted areas and ground-truth areas are summed over all images before dividing. Pixels whose
(mapped) label is `ignore_index` are not evaluated. Conventions, identical to the Hub metric: a class absent from
both the predictions and the ground truth (union 0) has IoU NaN and is excluded from `mean_iou`; a class absent from
the ground truth has accuracy NaN and is excluded from `mean_accuracy`; a class that is predicted but absent from the
ground truth has IoU 0 and counts. Label values outside `[0, num_labels)` that are not `ignore_index` still count
their pixel's prediction in the predicted area (and prediction values outside that range count their pixel in the
ground-truth area), as the Hub metric's histograms do.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `np.ndarray` or `PIL.Image.Image`):
        Predicted label maps, each of shape (height, width); sizes may differ between images.
    references (`list` of `np.ndarray` or `PIL.Image.Image`):
        Ground-truth label maps, each of the size of its prediction.
    num_labels (`int`):
        Number of classes.
    ignore_index (`int`):
        Label value of pixels that are not evaluated (e.g. 255).
    nan_to_num (`int`, *optional*):
        If given, NaN values in the outputs are replaced by this number.
    label_map (`dict[int, int]`, *optional*):
        Maps old label ids to new ones (every mapping reads the original labels).
    reduce_labels (`bool`, *optional*, defaults to `False`):
        Subtract 1 from every label and turn label 0 into 255 (for datasets whose 0 is an unlabelled background,
        e.g. ADE20k).

Returns:
    `dict`: `mean_iou` (`float`), `mean_accuracy` (`float`), `overall_accuracy` (`float`), `per_category_iou`
    (`np.ndarray` of shape `(num_labels,)`), `per_category_accuracy` (`np.ndarray` of shape `(num_labels,)`).

Examples:

    >>> import numpy as np
    >>> metric = evaluate.load("path/to/cps_hf/mean_iou_metric.py")
    >>> predictions = [np.array([[1, 2], [3, 4], [5, 255]])]
    >>> references = [np.array([[0, 3], [5, 4], [6, 255]])]
    >>> results = metric.compute(predictions=predictions, references=references, num_labels=10, ignore_index=255)
"""

_CITATION = """\
@inproceedings{chen2021cps,
  title={Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision},
  author={Chen, Xiaokang and Yuan, Yuhui and Zeng, Gang and Wang, Jingdong},
  booktitle={CVPR},
  year={2021}
}
"""


def _as_label_tensor(value: Any) -> torch.Tensor:
    # A copy: label maps are edited in place below and must not alias the caller's arrays.
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.int64, copy=True)
    return torch.from_numpy(np.array(value, dtype=np.int64))


def _confusion_with_overflow(
    prediction: torch.Tensor,
    label: torch.Tensor,
    num_labels: int,
    ignore_index: int,
    label_map: Mapping[int, int] | None,
    reduce_labels: bool,
) -> torch.Tensor:
    """`(num_labels + 1)^2` confusion matrix of one image whose last row/column collects out-of-range values."""
    if prediction.shape != label.shape:
        raise ValueError(
            f"A prediction of shape {tuple(prediction.shape)} does not match its reference of shape "
            f"{tuple(label.shape)}."
        )
    if label_map is not None:
        original_label = label.clone()
        for old_id, new_id in label_map.items():
            label[original_label == int(old_id)] = int(new_id)
    if reduce_labels:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    evaluated = label != ignore_index
    overflow = num_labels
    label = torch.where((label >= 0) & (label < num_labels), label, overflow)
    prediction = torch.where((prediction >= 0) & (prediction < num_labels), prediction, overflow)
    # -1 marks the pixels that are not evaluated (confusion_matrix drops negative labels).
    label = torch.where(evaluated, label, -1)
    return cps_hf.metrics.confusion_matrix(prediction, label, num_labels + 1, ignore_index=-1)


def compute_mean_iou(
    predictions: Iterable[Any],
    references: Iterable[Any],
    num_labels: int,
    ignore_index: int,
    nan_to_num: int | None = None,
    label_map: Mapping[int, int] | None = None,
    reduce_labels: bool = False,
) -> dict[str, float | np.ndarray]:
    """The Hub `mean_iou` metric's outputs, from one confusion matrix accumulated over all images.

    Args:
        predictions (`Iterable`):
            Predicted label maps (arrays, tensors or PIL images), each `(height, width)`.
        references (`Iterable`):
            Ground-truth label maps, each of the size of its prediction.
        num_labels (`int`):
            Number of classes.
        ignore_index (`int`):
            Label value of pixels that are not evaluated.
        nan_to_num (`int`, *optional*):
            Replacement of NaN outputs.
        label_map (`Mapping[int, int]`, *optional*):
            Old label id -> new label id, applied to the original labels.
        reduce_labels (`bool`, *optional*, defaults to `False`):
            Subtract 1 from labels, turning 0 into 255.

    Returns:
        `dict[str, float | np.ndarray]`: `mean_iou`, `mean_accuracy`, `overall_accuracy`, `per_category_iou`,
        `per_category_accuracy`.

    Raises:
        ValueError: if `num_labels < 1`, the numbers of predictions and references differ, or a pair differs in
            shape.
    """
    if num_labels < 1:
        raise ValueError(f"`num_labels` must be >= 1, got {num_labels}.")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    matrix = torch.zeros(num_labels + 1, num_labels + 1, dtype=torch.long)
    for prediction, reference in zip(predictions, references):
        matrix += _confusion_with_overflow(
            _as_label_tensor(prediction),
            _as_label_tensor(reference),
            num_labels,
            ignore_index,
            label_map,
            reduce_labels,
        )
    # Row / column `c` of the overflow matrix also hold the out-of-range predictions / labels of class `c`'s
    # pixels, so class `c`'s IoU and accuracy count them in its ground-truth / predicted area, as the Hub metric does.
    iou, accuracy = (scores[:num_labels].numpy() for scores in cps_hf.metrics.class_iou_and_accuracy(matrix))
    counts = matrix.to(torch.float64).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        overall_accuracy = np.trace(counts[:num_labels, :num_labels]) / counts[:num_labels].sum()
        metrics: dict[str, float | np.ndarray] = {
            "mean_iou": float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
            "mean_accuracy": float(np.nanmean(accuracy)) if not np.isnan(accuracy).all() else float("nan"),
            "overall_accuracy": float(overall_accuracy),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
    if nan_to_num is not None:
        metrics = {
            name: np.nan_to_num(value, nan=nan_to_num)
            if isinstance(value, np.ndarray)
            else float(np.nan_to_num(value, nan=nan_to_num))
            for name, value in metrics.items()
        }
    return metrics


class MeanIoU(evaluate.Metric):
    """Mean IoU with the interface of the Hub's `mean_iou` metric, computed with cps_hf's bincount confusion matrix."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/mean_iou"],
        )

    def _compute(
        self,
        predictions: list[Any],
        references: list[Any],
        num_labels: int,
        ignore_index: int,
        nan_to_num: int | None = None,
        label_map: dict[int, int] | None = None,
        reduce_labels: bool = False,
    ) -> dict[str, float | np.ndarray]:
        return compute_mean_iou(
            predictions,
            references,
            num_labels=num_labels,
            ignore_index=ignore_index,
            nan_to_num=nan_to_num,
            label_map=label_map,
            reduce_labels=reduce_labels,
        )


def load_mean_iou_metric(**kwargs: Any) -> evaluate.Metric:
    """`evaluate.load` of this module (offline), e.g. `load_mean_iou_metric().compute(predictions=..., ...)`."""
    return evaluate.load(__file__, **kwargs)
