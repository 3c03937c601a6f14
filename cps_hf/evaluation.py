"""Evaluation of a segmentation model on a labelled split: every branch and the ensemble in one pass, one
streaming confusion matrix per entry, summed across processes under `accelerate`."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm
from transformers.utils import logging

from .data import collate_semi_supervised
from .inference import (
    BranchSelection,
    InferenceProtocol,
    _model_device,
    _requested_branches,
    branch_result_name,
    predict_branch_probabilities,
)
from .metrics import StreamingSegmentationMetric, class_pixel_shares, metrics_from_confusion_matrix

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.get_logger(__name__)

__all__ = ["evaluate_model", "format_results_table"]


def _evaluation_loader(
    data: Dataset | DataLoader,
    batch_size: int,
    num_workers: int,
    accelerator: Accelerator | None,
    pin_memory: bool,
) -> DataLoader:
    if type(data).__module__.startswith("datasets."):
        raise TypeError(
            f"`data` must yield normalised `pixel_values` and `labels`; got a raw {type(data).__name__}. Wrap the "
            "split in `cps_hf.data.SupervisedSegmentationDataset`."
        )
    num_processes = accelerator.num_processes if accelerator is not None else 1
    if isinstance(data, DataLoader):
        if num_processes == 1:
            return data
        # Rebuilt on this process's shard of the dataset (same batching and collation).
        dataset, batch_size = data.dataset, data.batch_size or 1
        collate_fn, num_workers = data.collate_fn, data.num_workers
    else:
        dataset, collate_fn = data, collate_semi_supervised
    if num_processes > 1:
        # Every sample on exactly one process (no padding duplicates), so the summed confusion matrices are exact.
        dataset = Subset(dataset, range(accelerator.process_index, len(dataset), num_processes))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def evaluate_model(
    model: nn.Module,
    data: Dataset | DataLoader,
    protocol: InferenceProtocol | None = None,
    *,
    branches: Sequence[BranchSelection] | None = None,
    ignore_index: int | None = None,
    batch_size: int = 1,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluates every requested branch and the ensemble in one pass over the data.

    For each batch, each branch's probabilities are computed once (under the protocol of
    [`~cps_hf.inference.predict_probabilities`]), the ensemble is derived from them, and one confusion matrix per
    entry is updated. Labels may be smaller or larger than the images: probabilities are then resized bilinearly to
    the labels. The number of classes and their names come from `model.config` (`num_labels`, `id2label`).

    Distributed: with an `accelerate.Accelerator` running several processes, each process evaluates a disjoint
    shard of the dataset (no sample is duplicated), and the confusion matrices of all entries are summed across
    processes in a single all-reduce at the end; every process returns the same metrics. The model must already be
    on `accelerator.device` (it is not wrapped in DDP: evaluation needs no gradient synchronisation).

    Args:
        model (`nn.Module`):
            A [`~cps_hf.CPSForSemanticSegmentation`] (or a plain segmentation model, evaluated as `"model"`).
        data (`torch.utils.data.Dataset` or `torch.utils.data.DataLoader`):
            Yields `{"pixel_values": (3, H, W), "labels": (H, W)}` items (e.g.
            [`~cps_hf.data.SupervisedSegmentationDataset`]) or batches of them.
        protocol ([`~cps_hf.inference.InferenceProtocol`], *optional*):
            How to predict; defaults to `InferenceProtocol()` (whole image, single scale, no flip).
        branches (`Sequence[int | "ensemble"]`, *optional*):
            What to evaluate; defaults to every branch and the ensemble.
        ignore_index (`int`, *optional*):
            Label of pixels that are not evaluated; defaults to `model.config.semantic_loss_ignore_index` (255).
            Labels outside `[0, num_labels)` are not evaluated either.
        batch_size (`int`, *optional*, defaults to 1):
            Images per batch when `data` is a dataset. Images of different sizes need 1, or a dataset resizing to
            a fixed `eval_size`.
        num_workers (`int`, *optional*, defaults to 0):
            Data-loading worker processes when `data` is a dataset.
        accelerator (`accelerate.Accelerator`, *optional*):
            Shards the data and reduces the metrics across its processes.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar (on the local main process).

    Returns:
        `dict[str, dict[str, float]]`: for each entry (`"branch_0"`, `"branch_1"`, ..., `"ensemble"`) the metrics
        of [`~cps_hf.metrics.metrics_from_confusion_matrix`]: `mean_iou`, `overall_accuracy`, `mean_accuracy` and
        `iou_<class name>`, plus the `predicted_share_<class name>` and `label_share_<class name>` of
        [`~cps_hf.metrics.class_pixel_shares`].
    """
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if num_labels is None:
        raise ValueError(
            f"{type(model).__name__} has no `config.num_labels`: the number of classes is unknown."
        )
    if ignore_index is None:
        ignore_index = getattr(config, "semantic_loss_ignore_index", 255)
    id2label = getattr(config, "id2label", None)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    protocol = protocol if protocol is not None else InferenceProtocol()
    entries = _requested_branches(model, branches)

    device = _model_device(model)
    loader = _evaluation_loader(data, batch_size, num_workers, accelerator, pin_memory=device.type == "cuda")
    metrics = {
        entry: StreamingSegmentationMetric(num_labels, ignore_index=ignore_index, device=device)
        for entry in entries
    }
    is_main = accelerator is None or accelerator.is_local_main_process
    start = time.perf_counter()
    num_images = 0
    for batch in tqdm(loader, desc="Evaluating", unit="batch", disable=not (progress and is_main)):
        if not isinstance(batch, Mapping) or "pixel_values" not in batch or "labels" not in batch:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"Evaluation batches must hold `pixel_values` and `labels`, got {found}.")
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        probabilities = predict_branch_probabilities(model, pixel_values, entries, protocol=protocol)
        for entry, metric in metrics.items():
            metric.update(probabilities[entry], labels)
        num_images += pixel_values.shape[0]
    elapsed = time.perf_counter() - start
    logger.info(
        f"Evaluated {num_images} images in {elapsed:.1f}s ({num_images / max(elapsed, 1e-9):.2f} images/s)."
    )

    matrices = torch.stack(
        [
            metric.matrix
            if metric.matrix is not None
            else torch.zeros(num_labels, num_labels, dtype=torch.long, device=device)
            for metric in metrics.values()
        ]
    )  # (num_entries, num_labels, num_labels)
    if accelerator is not None and accelerator.num_processes > 1:
        matrices = accelerator.reduce(matrices, reduction="sum")
    return {
        branch_result_name(entry): {
            **metrics_from_confusion_matrix(matrix, id2label),
            **class_pixel_shares(matrix, id2label),
        }
        for entry, matrix in zip(entries, matrices)
    }


def format_results_table(
    results: Mapping[str, Mapping[str, float]], id2label: Mapping[int, str] | None = None
) -> str:
    """A text table of [`evaluate_model`] results in percent: one row per class IoU, then mIoU, pixel accuracy and
    mean class accuracy; one column per branch / the ensemble. NaN (a class absent from predictions and labels)
    shows as `-`.

    Args:
        results (`Mapping[str, Mapping[str, float]]`):
            As returned by [`evaluate_model`].
        id2label (`Mapping[int, str]`, *optional*):
            Class names in id order; by default the `iou_<name>` keys of the results, in their order.

    Returns:
        `str`: the table, without a trailing newline.
    """
    columns = list(results)
    if not columns:
        return ""
    first = results[columns[0]]
    if id2label:
        class_names = [str(id2label[key]) for key in sorted(id2label, key=int)]
    else:
        class_names = [key.removeprefix("iou_") for key in first if key.startswith("iou_")]
    rows = [(name, f"iou_{name}") for name in class_names]
    rows += [("mIoU", "mean_iou"), ("pixel acc", "overall_accuracy"), ("mean acc", "mean_accuracy")]
    corner = "IoU (%)"
    label_width = max(len(corner), *(len(label) for label, _ in rows))
    column_width = max(9, *(len(column) for column in columns))

    def format_value(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"

    lines = [f"{corner:<{label_width}}" + "".join(f"  {column:>{column_width}}" for column in columns)]
    for position, (label, key) in enumerate(rows):
        if position == len(class_names):
            lines.append("-" * len(lines[0]))
        values = "".join(f"  {format_value(results[column].get(key)):>{column_width}}" for column in columns)
        lines.append(f"{label:<{label_width}}{values}")
    return "\n".join(lines)
