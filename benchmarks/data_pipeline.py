"""Speed of the training data pipeline on its own (benchmark tooling, not installed)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor


def benchmark_data_pipeline(dataset: torch.utils.data.Dataset, num_samples: int) -> dict[str, Any]:
    """
    Times the training data pipeline on its own, in this process: decoding, augmentation (scale, crop, flip,
    normalisation), CutMix masks and collation of `num_samples` training items (each one labelled and one
    unlabelled image, plus the mixing partner with CutMix), in batches as the Trainer's collator sees them.

    Returns:
        `dict`: `samples_per_second` (one process; a DataLoader with `n` workers scales it by up to `n`), `seconds`,
        `num_samples` and `num_threads`.
    """
    from cps_hf.data import collate_semi_supervised

    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    count = min(num_samples, len(dataset))
    start = time.perf_counter()
    batch: list[dict[str, Tensor]] = []
    for index in range(count):
        batch.append(dataset[index])
        if len(batch) == 8 or index == count - 1:
            collate_semi_supervised(batch)
            batch = []
    seconds = time.perf_counter() - start
    return {
        "samples_per_second": count / seconds,
        "seconds": seconds,
        "num_samples": count,
        "num_threads": torch.get_num_threads(),
    }
