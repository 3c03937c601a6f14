"""Unlabelled images streamed from a `datasets.IterableDataset`: a pool of any size (a Hub dataset, a folder of
parquet files) read as it goes, split across training processes, never running dry, and resumable exactly.

How the stream of one process is made:

1. **Split across processes** with `datasets.distributed.split_dataset_by_node(dataset, rank, world_size)`: when the
   number of shards (files) is a multiple of the number of processes, each process reads its own shards; otherwise
   every process reads every shard and keeps one row in `world_size`.
2. **Passes.** The stream restarts when its rows are exhausted, pass after pass; pass `e` is read after
   `set_epoch(e)`, with which `datasets` reorders the shards (the first pass reads them in the dataset's order).
3. **Shuffle blocks.** Rows are read in blocks of `shuffle_buffer_size` and each block is yielded in a random order
   drawn from `(seed, process, pass, block)`. A block is held in memory as encoded images.
4. **Items.** Each item takes the next row (plain CPS) or the next two rows (CutMix: the second row is the mixing
   partner), decodes them and augments them with the training transform, drawing every random choice (crop, flip,
   scale, CutMix boxes) from a generator seeded by `(seed, process, item number)`.

Exact resume: the position after an item (pass, block, the `datasets` state where the block starts, the rows of the
block already used, the item count) is all a restarted stream needs to yield exactly the items that would have come
next. Unlike `IterableDataset.shuffle`, whose shuffle buffer is lost on resume (its documented behaviour), a block is
re-read from its start (at most `shuffle_buffer_size` rows, not decoded) and reshuffled identically. The trainer
saves each process's position into every checkpoint ([`write_stream_position`]).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torch import Tensor
from transformers.utils import logging

from ..masking import generate_cutmix_mask
from .collation import collate_semi_supervised
from .decoding import UndecodableSampleError, decode_image
from .loading import check_columns
from .segmentation_dataset import SplitName
from .transforms import SegmentationTransform

logger = logging.get_logger(__name__)

STREAM_POSITION_FILE = "unlabeled_stream_{process_index}.json"
"""File of a checkpoint folder holding one process's [`StreamPosition`] (`{process_index}` is filled in)."""


def stream_seed(kind: str, *parts: int) -> int:
    """A seed in `[0, 2**63)` for one random draw of the stream: a fixed hash of `kind` and `parts`, identical across
    processes and runs."""
    text = ":".join(["cps_hf-stream", kind, *(str(part) for part in parts)])
    return int.from_bytes(hashlib.sha256(text.encode("ascii")).digest()[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class StreamPosition:
    """Where one process's unlabelled stream stands, after its last item.

    Args:
        epoch (`int`, *optional*, defaults to 0):
            The pass over the process's rows (`datasets`' `set_epoch`).
        block (`int`, *optional*, defaults to 0):
            The shuffle block of the pass.
        block_start (`dict`, *optional*):
            `IterableDataset.state_dict()` where the block starts; `None` at the start of a pass.
        offset (`int`, *optional*, defaults to 0):
            Rows of the block already used.
        items (`int`, *optional*, defaults to 0):
            Items made so far (the next item's augmentation seed).
    """

    epoch: int = 0
    block: int = 0
    block_start: dict | None = None
    offset: int = 0
    items: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StreamPosition:
        return cls(**values)


class UnlabeledImageStream(torch.utils.data.IterableDataset):
    """An endless stream of augmented unlabelled images from a `datasets.IterableDataset`, for one training process.

    Items are `(item, position)` pairs: `item` holds `unlabeled_pixel_values` (float32 `(3, h, w)`) and, with
    `cutmix=True`, `mix_unlabeled_pixel_values` (the next row of the stream, the mixing partner) and `cutmix_masks`
    (float32 `(1, h, w)` from [`~cps_hf.masking.generate_cutmix_mask`]), the keys of
    [`SemiSupervisedSegmentationDataset`] items; `position` is the [`StreamPosition`] after the item. The module
    docstring describes the order of the rows and why resuming from a position is exact.

    Args:
        dataset (`datasets.IterableDataset`):
            The unlabelled split (e.g. `load_segmentation_dataset(name, streaming=True)["train"]`), not yet split
            across processes.
        transform ([`SegmentationTransform`]):
            The training transform (the labelled images' one).
        image_column (`str`, *optional*, defaults to `"image"`):
            Image column; the other columns are dropped.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column that names samples in error messages, if present.
        cutmix (`bool`, *optional*, defaults to `False`):
            Items also hold a mixing partner and a CutMix mask.
        cutmix_num_boxes (`int`, *optional*, defaults to 3):
            Boxes per CutMix mask.
        cutmix_area_range (`tuple[float, float]`, *optional*, defaults to `(0.25, 0.5)`):
            Range of the CutMix area fraction.
        shuffle_buffer_size (`int`, *optional*, defaults to 1000):
            Rows per shuffle block; 1 keeps the order in which the rows are read.
        seed (`int`, *optional*, defaults to 0):
            Base seed of the block orders and the augmentation.
        process_index (`int`, *optional*, defaults to 0):
            This process's rank.
        num_processes (`int`, *optional*, defaults to 1):
            Number of training processes; the dataset is split with `split_dataset_by_node`.
        split_name ([`SplitName`], *optional*):
            Names the dataset and split in error messages.
        skip_undecodable (`bool`, *optional*, defaults to `False`):
            Leave out, with a warning, rows whose image cannot be decoded, instead of raising an
            [`UndecodableSampleError`].

    Raises:
        ValueError: if the image column is missing (naming the dataset, split and available columns) or a setting is
            out of range; while streaming, if a whole pass of this process's rows is empty.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        *,
        transform: SegmentationTransform,
        image_column: str = "image",
        id_column: str = "id",
        cutmix: bool = False,
        cutmix_num_boxes: int = 3,
        cutmix_area_range: tuple[float, float] = (0.25, 0.5),
        shuffle_buffer_size: int = 1000,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        split_name: SplitName | None = None,
        skip_undecodable: bool = False,
    ) -> None:
        if not isinstance(dataset, datasets.IterableDataset):
            raise TypeError(
                f"The unlabelled stream needs a `datasets.IterableDataset` (one split loaded with "
                f"streaming=True), got {type(dataset).__name__}."
            )
        if not isinstance(transform, SegmentationTransform) or not transform.train:
            raise ValueError("`transform` must be a training `SegmentationTransform` (train=True).")
        if shuffle_buffer_size < 1:
            raise ValueError(f"`shuffle_buffer_size` must be >= 1, got {shuffle_buffer_size}.")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"`process_index` {process_index} is not in [0, {num_processes}).")
        split_name = split_name or SplitName()
        if dataset.column_names is not None:
            check_columns(dataset, image_column, None, split_name.split, split_name.dataset)
            columns = [image_column]
            if id_column in dataset.column_names and id_column != image_column:
                columns.append(id_column)
            dataset = dataset.select_columns(columns)
            # Decode ourselves, as for map-style datasets: undecodable bytes then name the sample.
            if isinstance(dataset.features[image_column], datasets.Image):
                dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        if num_processes > 1:
            dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
        self.dataset = dataset
        self.transform = transform
        self.image_column = image_column
        self.id_column = id_column
        self.cutmix = cutmix
        self.cutmix_num_boxes = cutmix_num_boxes
        self.cutmix_area_range = tuple(cutmix_area_range)
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.split_name = split_name
        self.skip_undecodable = skip_undecodable
        self.start = StreamPosition()
        """Where iteration starts (set it, or pass a position to [`UnlabeledBatches`], to resume)."""

    def settings(self) -> dict[str, Any]:
        """What a saved position depends on: a position is only valid for a stream with the same settings."""
        return {
            "dataset": self.split_name.dataset,
            "split": self.split_name.split,
            "image_column": self.image_column,
            "cutmix": self.cutmix,
            "shuffle_buffer_size": self.shuffle_buffer_size,
            "seed": self.seed,
            "process_index": self.process_index,
            "num_processes": self.num_processes,
        }

    def rows(self, start: StreamPosition | None = None) -> Iterator[tuple[dict[str, Any], StreamPosition]]:
        """This process's rows, pass after pass, each with the position after it (its `items` is `start`'s).

        Raises:
            ValueError: if a pass read from its start holds no row for this process.
        """
        start = start or StreamPosition()
        epoch, block, block_start, offset = start.epoch, start.block, start.block_start, start.offset
        while True:
            self.dataset.set_epoch(epoch)
            # `None` starts the pass from its beginning.
            self.dataset.load_state_dict(block_start)
            from_pass_start = block_start is None
            rows_read = 0
            iterator = iter(self.dataset)
            while block_rows := list(islice(iterator, self.shuffle_buffer_size)):
                rows_read += len(block_rows)
                next_block_start = self.dataset.state_dict()
                order = np.arange(len(block_rows))
                if self.shuffle_buffer_size > 1:
                    order = np.random.default_rng(
                        stream_seed("block", self.seed, self.process_index, epoch, block)
                    ).permutation(len(block_rows))
                for used in range(offset, len(block_rows)):
                    position = StreamPosition(epoch, block, block_start, used + 1, start.items)
                    yield block_rows[order[used]], position
                block, block_start, offset = block + 1, next_block_start, 0
            if from_pass_start and rows_read == 0:
                raise ValueError(
                    f"The unlabelled stream{self.split_name.of_dataset} holds no row for process "
                    f"{self.process_index} of {self.num_processes} (pass {epoch}). Processes get whole shards when "
                    f"the number of shards ({self.dataset.num_shards} for this process) divides evenly, otherwise "
                    "every n-th row: give the pool more rows or files, or train on fewer processes."
                )
            epoch, block, block_start, offset = epoch + 1, 0, None, 0

    def describe(self, row: Mapping[str, Any], position: StreamPosition) -> str:
        """E.g. `unlabelled sample (dataset 'pool', split 'train', id 'u00017')`, or without an id column the
        process, pass, block and row of the block."""
        where = f"{self.split_name}, " if str(self.split_name) else ""
        if row.get(self.id_column) is not None:
            return f"unlabelled sample ({where}id {row[self.id_column]!r})"
        return (
            f"unlabelled sample ({where}process {self.process_index}, pass {position.epoch}, block "
            f"{position.block}, row {position.offset - 1} of the block)"
        )

    def _next_image(
        self, rows: Iterator[tuple[dict[str, Any], StreamPosition]], generator: torch.Generator
    ) -> tuple[Tensor, StreamPosition]:
        """Decodes and augments the next decodable row; returns its pixel values and the position after it."""
        first_skipped_epoch = None
        while True:
            row, position = next(rows)
            sample_name = self.describe(row, position)
            if self.image_column not in row:
                raise ValueError(
                    f"Column {self.image_column!r} not found in the {sample_name}; available columns: "
                    f"{sorted(row)}. Set --unlabeled_image_column accordingly."
                )
            try:
                image = decode_image(_with_remote_bytes(row[self.image_column]), sample_name)
            except UndecodableSampleError as error:
                if not self.skip_undecodable:
                    raise
                if first_skipped_epoch is None:
                    first_skipped_epoch = position.epoch
                elif position.epoch > first_skipped_epoch + 1:
                    raise ValueError(
                        f"No image of the unlabelled stream could be decoded in a whole pass of process "
                        f"{self.process_index}'s rows{self.split_name.of_dataset}; last error: {error}"
                    ) from error
                logger.warning(f"Skipping an undecodable unlabelled image: {error}")
                continue
            pixel_values, _ = self.transform(image, generator=generator, sample_name=sample_name)
            return pixel_values, position

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], StreamPosition]]:
        rows = self.rows(self.start)
        items = self.start.items
        while True:
            generator = torch.Generator().manual_seed(
                stream_seed("item", self.seed, self.process_index, items)
            )
            pixel_values, position = self._next_image(rows, generator)
            item = {"unlabeled_pixel_values": pixel_values}
            if self.cutmix:
                item["mix_unlabeled_pixel_values"], position = self._next_image(rows, generator)
                height, width = pixel_values.shape[-2:]
                item["cutmix_masks"] = generate_cutmix_mask(
                    height,
                    width,
                    generator=generator,
                    num_boxes=self.cutmix_num_boxes,
                    area_range=self.cutmix_area_range,
                )
            items += 1
            yield item, replace(position, items=items)


def _with_remote_bytes(value: Any) -> Any:
    """A `datasets.Image` value that only names a remote file (streamed image folders on the Hub) with its bytes."""
    if not isinstance(value, Mapping) or value.get("bytes") is not None or not value.get("path"):
        return value
    from datasets.utils.file_utils import is_local_path, xopen

    if is_local_path(value["path"]):
        return value
    with xopen(value["path"], "rb", download_config=datasets.DownloadConfig()) as file:
        return {"bytes": file.read(), "path": value["path"]}


def _collate_stream_items(
    samples: list[tuple[dict[str, Tensor], StreamPosition]],
) -> tuple[dict[str, Tensor], StreamPosition]:
    items, positions = zip(*samples)
    return collate_semi_supervised(list(items)), positions[-1]


class UnlabeledBatches:
    """The batches of unlabelled images one training process consumes, and the stream position after the last one.

    The stream is read by one `DataLoader` worker process when `num_workers > 0` (one, whatever the number asked
    for: a single reader keeps the order of the rows, and so the position, exact), in the training process
    otherwise. The loader prefetches; `position` counts only the batches handed out.

    Args:
        stream ([`UnlabeledImageStream`]):
            The stream.
        batch_size (`int`):
            Items per batch.
        num_workers (`int`, *optional*, defaults to 0):
            0: read in this process; more: in one worker process.
        pin_memory (`bool`, *optional*, defaults to `False`):
            Pin the batches' memory (for a CUDA device).
        prefetch_factor (`int`, *optional*):
            Batches the worker reads ahead (the `DataLoader` default when `None`).
        start (`StreamPosition`, *optional*):
            Where to start (the stream's `start` when `None`).
    """

    def __init__(
        self,
        stream: UnlabeledImageStream,
        batch_size: int,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        start: StreamPosition | None = None,
    ) -> None:
        if start is not None:
            stream.start = start
        self.stream = stream
        self.position = stream.start
        num_workers = min(num_workers, 1)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate_stream_items,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers else None,
        )
        self._iterator: Iterator | None = iter(loader)

    def __iter__(self) -> UnlabeledBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self._iterator is None:
            raise RuntimeError("The unlabelled batches were closed.")
        batch, self.position = next(self._iterator)
        return batch

    def close(self) -> None:
        """Stops the worker process (if any)."""
        self._iterator = None


def write_stream_position(
    directory: str | os.PathLike, stream: UnlabeledImageStream, position: StreamPosition
) -> Path:
    """Writes one process's stream position (and the stream's settings) into a checkpoint folder.

    Returns:
        `Path`: the file written, `directory/unlabeled_stream_<process_index>.json`.
    """
    path = Path(directory) / STREAM_POSITION_FILE.format(process_index=stream.process_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": stream.settings(), "position": position.to_dict()}))
    return path


def read_stream_position(directory: str | os.PathLike, stream: UnlabeledImageStream) -> StreamPosition:
    """The position this process's stream had when the checkpoint in `directory` was saved.

    Raises:
        ValueError: if the checkpoint holds no position for this process, or was saved by a stream with other
            settings (another pool, shuffle block size, seed, CutMix setting or number of processes): its position
            would not mean the same rows.
    """
    path = Path(directory) / STREAM_POSITION_FILE.format(process_index=stream.process_index)
    if not path.is_file():
        raise ValueError(
            f"{directory} holds no unlabelled-stream position for process {stream.process_index} ({path.name}): "
            "it was not saved by a run streaming this pool on as many processes. Pass --ignore_data_skip true to "
            "resume the model and optimizer and restart the data from the beginning."
        )
    saved = json.loads(path.read_text())
    differences = {
        key: (saved["settings"].get(key), value)
        for key, value in stream.settings().items()
        if saved["settings"].get(key) != value
    }
    if differences:
        described = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in differences.items())
        raise ValueError(
            f"The unlabelled stream saved in {path} had other settings ({described}); its position does not "
            "apply. Resume with the saved settings, or pass --ignore_data_skip true to restart the data from the "
            "beginning."
        )
    return StreamPosition.from_dict(saved["position"])


__all__ = [
    "STREAM_POSITION_FILE",
    "StreamPosition",
    "UnlabeledBatches",
    "UnlabeledImageStream",
    "read_stream_position",
    "stream_seed",
    "write_stream_position",
]
