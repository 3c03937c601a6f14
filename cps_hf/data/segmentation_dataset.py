"""Torch datasets over `datasets.Dataset` splits: labelled/unlabelled pairs for CPS training, and labelled samples
for evaluation or supervised-only training."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor
from transformers.utils import logging

from ..masking import generate_cutmix_mask
from .decoding import (
    UndecodableSampleError,
    check_mask_values,
    check_same_size,
    decode_image,
    decode_mask,
    open_image_value,
)
from .loading import check_columns
from .splits import complement_indices
from .transforms import IMAGENET_MEAN, IMAGENET_STD, SegmentationTransform

logger = logging.get_logger(__name__)


def item_seed(base_seed: int, epoch: int, index: int) -> int:
    """The seed of one item's augmentation: a fixed hash of `(base_seed, epoch, index)` in `[0, 2**63)`.

    Unlike Python's `hash`, it is identical across processes and runs.
    """
    digest = hashlib.sha256(f"cps_hf:{base_seed}:{epoch}:{index}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class SplitName:
    """How error messages name the split a sample comes from, e.g. `dataset 'camvid', split 'train'`.

    Args:
        split (`str`, *optional*):
            Name of the split.
        dataset (`str`, *optional*):
            Name of the dataset.
    """

    split: str | None = None
    dataset: str | None = None

    def __str__(self) -> str:
        parts = [f"dataset {self.dataset!r}"] if self.dataset else []
        parts += [f"split {self.split!r}"] if self.split else []
        return ", ".join(parts)

    @property
    def of_dataset(self) -> str:
        """`" of dataset 'name'"`, or `""` without a dataset name (to follow "the labelled set")."""
        return f" of dataset {self.dataset!r}" if self.dataset else ""


class _SegmentationRows:
    """Rows of a `datasets.Dataset` (a subset given by indices) with lazy, validated image/mask decoding."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        indices: Sequence[int] | None,
        *,
        role: str,
        image_column: str,
        label_column: str | None,
        id_column: str,
        split_name: SplitName,
        skip_undecodable: bool = False,
    ) -> None:
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(
                f"The {role} dataset must be a `datasets.Dataset` (one split), got {type(dataset).__name__}."
            )
        check_columns(dataset, image_column, label_column, split_name.split, split_name.dataset)
        num_rows = len(dataset)
        if indices is None:
            indices = range(num_rows)
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            raise ValueError(f"The {role} set{split_name.of_dataset} is empty: no rows were selected.")
        out_of_range = rows[(rows < 0) | (rows >= num_rows)]
        if out_of_range.size:
            raise ValueError(
                f"The {role} indices {out_of_range[:5].tolist()} are out of range for a dataset of {num_rows} rows."
            )
        columns = [image_column] + ([label_column] if label_column is not None else [])
        self.has_ids = id_column in dataset.column_names and id_column not in columns
        if self.has_ids:
            columns.append(id_column)
        dataset = dataset.select_columns(columns)
        # Decode ourselves: undecodable bytes then name the row, and masks keep their raw palette indices.
        for column in (image_column, label_column):
            if column is not None and isinstance(dataset.features[column], datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset
        self.rows = rows
        self.role = role
        self.image_column = image_column
        self.label_column = label_column
        self.id_column = id_column
        self.split_name = split_name
        self.skipped_samples: list[str] = []
        if skip_undecodable:
            self._drop_undecodable_rows()
            if not len(self):
                raise ValueError(
                    f"The {role} set{split_name.of_dataset} is empty: none of its samples can be decoded."
                )

    def __len__(self) -> int:
        return int(self.rows.size)

    def _drop_undecodable_rows(self) -> None:
        """Decodes every selected row once and drops those whose image or mask bytes cannot be decoded."""
        kept = []
        for row in self.rows.tolist():
            record = self.dataset[row]
            sample_name = self.describe(row, record)
            try:
                open_image_value(record[self.image_column], sample_name, "image")
                if self.label_column is not None:
                    open_image_value(record[self.label_column], sample_name, "label mask")
            except UndecodableSampleError as error:
                self.skipped_samples.append(str(error))
            else:
                kept.append(row)
        self.rows = np.asarray(kept, dtype=np.int64)
        if self.skipped_samples:
            logger.warning(
                f"Skipping {len(self.skipped_samples)} undecodable {self.role} sample(s): "
                + " | ".join(self.skipped_samples[:5])
            )

    def describe(self, row: int, record: Mapping[str, Any] | None = None) -> str:
        """E.g. `labelled sample (dataset 'camvid', split 'train' row 3, id '0001TP_006690')`."""
        where = f"{self.split_name} " if str(self.split_name) else ""
        description = f"{self.role} sample ({where}row {row}"
        if self.has_ids and record is not None:
            description += f", id {record[self.id_column]!r}"
        return description + ")"

    def label_maps(self, num_labels: int, ignore_index: int) -> Iterator[Tensor]:
        """The masks of the selected rows as stored (no transform), checked like training items."""
        for row in self.rows.tolist():
            record = self.dataset[row]
            sample_name = self.describe(row, record)
            mask = decode_mask(record[self.label_column], sample_name)
            check_mask_values(mask, num_labels, ignore_index, sample_name)
            yield mask

    def load(self, position: int, with_label: bool) -> tuple[Tensor, Tensor | None, str]:
        """Decodes the image (and mask) of the `position`-th selected row; returns them and a description."""
        row = int(self.rows[position])
        record = self.dataset[row]
        sample_name = self.describe(row, record)
        image = decode_image(record[self.image_column], sample_name)
        mask = None
        if with_label:
            mask = decode_mask(record[self.label_column], sample_name)
            check_same_size(image, mask, sample_name)
        return image, mask, sample_name


class SemiSupervisedSegmentationDataset(torch.utils.data.Dataset):
    """Pairs every unlabelled sample with a labelled one: one map-style dataset for CPS training.

    `len(dataset)` is the number of unlabelled samples (one epoch visits each once, as in the paper), or the number
    of labelled samples if that is larger. Item `i` holds labelled sample `i % num_labeled` and unlabelled sample
    `i % num_unlabeled`, both augmented with `transform`, as `pixel_values` (float32 `(3, h, w)`), `labels` (int64
    `(h, w)`, the transform's `ignore_index` where padded) and `unlabeled_pixel_values`. With `cutmix=True` it also
    holds `mix_unlabeled_pixel_values`, a second unlabelled sample (the *mixing partner*: the successor along a
    per-epoch random cyclic permutation, so never the sample itself), and `cutmix_masks`, float32 `(1, h, w)` in
    {0, 1} from [`~cps_hf.masking.generate_cutmix_mask`].

    Determinism: item `i` of epoch `e` draws all its randomness from a generator seeded with
    [`item_seed`]`(seed, e, i)`, and the mixing permutation of epoch `e` from one seeded with `(seed, e)`; items are
    therefore the same whatever the number of data-loader workers or ranks, and when a run resumes. Call
    [`~SemiSupervisedSegmentationDataset.set_epoch`] before each epoch (the Trainer does it through accelerate in
    single-process runs; a multi-process loop should also call it, e.g. from a callback) and leave
    `persistent_workers` off, whose workers would not see it.

    Args:
        labeled_dataset (`datasets.Dataset`):
            The training split holding the labelled rows.
        labeled_indices (`Sequence[int]`, *optional*):
            Labelled rows of `labeled_dataset` (see [`select_labeled_indices`]); all rows when `None`.
        transform ([`SegmentationTransform`]):
            Training augmentation of every image; its `ignore_index` is the mask value that is not a class.
        num_labels (`int`):
            Number of classes; labelled masks must hold values in `[0, num_labels)` or the ignore index.
        unlabeled_dataset (`datasets.Dataset`, *optional*):
            A separate image-only (or labelled, labels unused) dataset. Defaults to `labeled_dataset`.
        unlabeled_indices (`Sequence[int]`, *optional*):
            Unlabelled rows; defaults to the rows not in `labeled_indices` (same dataset) or all rows (separate
            dataset).
        image_column (`str`, *optional*, defaults to `"image"`):
            Image column of the labelled dataset.
        label_column (`str`, *optional*, defaults to `"label"`):
            Mask column of the labelled dataset.
        unlabeled_image_column (`str`, *optional*):
            Image column of the unlabelled dataset; defaults to `image_column`.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column that names samples in error messages, if present.
        cutmix (`bool`, *optional*, defaults to `False`):
            Also return a mixing partner and a CutMix mask.
        cutmix_num_boxes (`int`, *optional*, defaults to 3):
            Boxes per CutMix mask.
        cutmix_area_range (`tuple[float, float]`, *optional*, defaults to `(0.25, 0.5)`):
            Range of the CutMix area fraction.
        seed (`int`, *optional*, defaults to 0):
            Base seed of the augmentation.
        split_name ([`SplitName`], *optional*, defaults to split `"train"`):
            Names the labelled dataset's split in error messages.
        unlabeled_split_name ([`SplitName`], *optional*):
            Names the unlabelled dataset's split; defaults to `split_name` (same dataset) or no name.
        skip_undecodable (`bool`, *optional*, defaults to `False`):
            Decode every selected row once at construction and leave out, with a warning, those that cannot be
            decoded (listed in `skipped_samples`); by default such a sample raises an [`UndecodableSampleError`]
            when an item loads it.

    Raises:
        ValueError: if a set is empty, a column is missing or indices are out of range; when loading an item, if a
            mask holds invalid values or differs in size from its image, or an image cannot be decoded (naming the
            dataset, split, row and id).
    """

    def __init__(
        self,
        labeled_dataset: datasets.Dataset,
        labeled_indices: Sequence[int] | None = None,
        *,
        transform: SegmentationTransform,
        num_labels: int,
        unlabeled_dataset: datasets.Dataset | None = None,
        unlabeled_indices: Sequence[int] | None = None,
        image_column: str = "image",
        label_column: str = "label",
        unlabeled_image_column: str | None = None,
        id_column: str = "id",
        cutmix: bool = False,
        cutmix_num_boxes: int = 3,
        cutmix_area_range: tuple[float, float] = (0.25, 0.5),
        seed: int = 0,
        split_name: SplitName | None = None,
        unlabeled_split_name: SplitName | None = None,
        skip_undecodable: bool = False,
    ) -> None:
        if num_labels < 1:
            raise ValueError(f"`num_labels` must be >= 1, got {num_labels}.")
        split_name = split_name or SplitName("train")
        if labeled_indices is not None and len(labeled_indices) == 0:
            raise ValueError(
                f"The labelled set{split_name.of_dataset} is empty: `labeled_indices` selects no rows."
            )
        if unlabeled_dataset is None:
            unlabeled_dataset = labeled_dataset
            if unlabeled_indices is None:
                unlabeled_indices = (
                    complement_indices(len(labeled_dataset), labeled_indices)
                    if labeled_indices is not None
                    else []
                )
            unlabeled_split_name = unlabeled_split_name or split_name
        if unlabeled_indices is not None and len(unlabeled_indices) == 0:
            raise ValueError(
                f"The unlabelled set{split_name.of_dataset} is empty: every training row is labelled (or "
                "`unlabeled_indices` is empty). Label fewer rows or pass an `unlabeled_dataset`."
            )
        if not isinstance(transform, SegmentationTransform) or not transform.train:
            raise ValueError("`transform` must be a training `SegmentationTransform` (train=True).")
        self.labeled = _SegmentationRows(
            labeled_dataset,
            labeled_indices,
            role="labelled",
            image_column=image_column,
            label_column=label_column,
            id_column=id_column,
            split_name=split_name,
            skip_undecodable=skip_undecodable,
        )
        self.unlabeled = _SegmentationRows(
            unlabeled_dataset,
            unlabeled_indices,
            role="unlabelled",
            image_column=unlabeled_image_column or image_column,
            label_column=None,
            id_column=id_column,
            split_name=unlabeled_split_name or SplitName(),
            skip_undecodable=skip_undecodable,
        )
        self.transform = transform
        self.num_labels = num_labels
        self.cutmix = cutmix
        self.cutmix_num_boxes = cutmix_num_boxes
        self.cutmix_area_range = tuple(cutmix_area_range)
        self.seed = seed
        self.epoch = 0
        self._mix_partners: tuple[int, np.ndarray] | None = None
        if cutmix and len(self.unlabeled) == 1:
            logger.warning("Only one unlabelled sample: CutMix will mix it with itself.")

    @property
    def num_labeled(self) -> int:
        """Number of labelled samples."""
        return len(self.labeled)

    @property
    def num_unlabeled(self) -> int:
        """Number of unlabelled samples."""
        return len(self.unlabeled)

    @property
    def skipped_samples(self) -> list[str]:
        """Why each sample left out by `skip_undecodable=True` could not be decoded (empty otherwise)."""
        return self.labeled.skipped_samples + self.unlabeled.skipped_samples

    def __len__(self) -> int:
        return max(self.num_labeled, self.num_unlabeled)

    def label_maps(self) -> Iterator[Tensor]:
        """The labelled masks as stored, untransformed (e.g. for class frequencies)."""
        return self.labeled.label_maps(self.num_labels, self.transform.ignore_index)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch whose augmentation and mixing partners the items use."""
        self.epoch = int(epoch)

    def mix_partner(self, unlabeled_position: int) -> int:
        """Position (in the unlabelled set) of the CutMix partner of unlabelled sample `unlabeled_position`.

        The partner is the next element along a random permutation of the unlabelled set, drawn once per epoch;
        this cyclic successor is never the sample itself when there are at least two unlabelled samples.
        """
        if self._mix_partners is None or self._mix_partners[0] != self.epoch:
            # A negative index cannot collide with the seeds of items, whose indices are >= 0.
            rng = np.random.default_rng(item_seed(self.seed, self.epoch, -1))
            order = rng.permutation(self.num_unlabeled)
            partners = np.empty(self.num_unlabeled, dtype=np.int64)
            partners[order] = np.roll(order, -1)
            self._mix_partners = (self.epoch, partners)
        return int(self._mix_partners[1][unlabeled_position])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"Index {index} out of range for a dataset of {len(self)} items.")
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))

        image, mask, sample_name = self.labeled.load(index % self.num_labeled, with_label=True)
        check_mask_values(mask, self.num_labels, self.transform.ignore_index, sample_name)
        pixel_values, labels = self.transform(image, mask, generator=generator, sample_name=sample_name)

        unlabeled_position = index % self.num_unlabeled
        image, _, sample_name = self.unlabeled.load(unlabeled_position, with_label=False)
        unlabeled_pixel_values, _ = self.transform(image, generator=generator, sample_name=sample_name)
        item = {
            "pixel_values": pixel_values,
            "labels": labels,
            "unlabeled_pixel_values": unlabeled_pixel_values,
        }

        if self.cutmix:
            image, _, sample_name = self.unlabeled.load(
                self.mix_partner(unlabeled_position), with_label=False
            )
            item["mix_unlabeled_pixel_values"], _ = self.transform(
                image, generator=generator, sample_name=sample_name
            )
            height, width = unlabeled_pixel_values.shape[-2:]
            item["cutmix_masks"] = generate_cutmix_mask(
                height,
                width,
                generator=generator,
                num_boxes=self.cutmix_num_boxes,
                area_range=self.cutmix_area_range,
            )
        return item


class SupervisedSegmentationDataset(torch.utils.data.Dataset):
    """A labelled split as a torch dataset: evaluation (default transform) or supervised-only training.

    Items are dicts with `pixel_values` (float32 `(3, h, w)`) and `labels` (int64 `(h, w)`). Masks are validated
    like in [`SemiSupervisedSegmentationDataset`]. With a training transform, item `i` of epoch `e` is augmented
    with a generator seeded by [`item_seed`]`(seed, e, i)`; call `set_epoch` before each epoch.

    Evaluation images are not resized by default, so batching needs equal sizes: the synthetic dataset has a fixed
    size; for other data use a batch size of 1 or give the transform an `eval_size`.

    Args:
        dataset (`datasets.Dataset`):
            The split.
        indices (`Sequence[int]`, *optional*):
            Rows to use; all rows when `None`.
        num_labels (`int`):
            Number of classes.
        transform ([`SegmentationTransform`], *optional*):
            Defaults to an evaluation transform with the given `mean`/`std`; its `ignore_index` is the mask value
            that is not a class.
        mean (`Sequence[float]`, *optional*, defaults to ImageNet's mean):
            Normalisation mean of the default transform.
        std (`Sequence[float]`, *optional*, defaults to ImageNet's standard deviation):
            Normalisation standard deviation of the default transform.
        image_column (`str`, *optional*, defaults to `"image"`):
            Image column.
        label_column (`str`, *optional*, defaults to `"label"`):
            Mask column.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column used to name samples in error messages, if present.
        seed (`int`, *optional*, defaults to 0):
            Base seed of a training transform.
        split_name ([`SplitName`], *optional*, defaults to split `"validation"`):
            Names the split in error messages.
        skip_undecodable (`bool`, *optional*, defaults to `False`):
            Leave out, with a warning, the rows whose image or mask cannot be decoded (listed in
            `skipped_samples`), as in [`SemiSupervisedSegmentationDataset`].
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        indices: Sequence[int] | None = None,
        *,
        num_labels: int,
        transform: SegmentationTransform | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        image_column: str = "image",
        label_column: str = "label",
        id_column: str = "id",
        seed: int = 0,
        split_name: SplitName | None = None,
        skip_undecodable: bool = False,
    ) -> None:
        if num_labels < 1:
            raise ValueError(f"`num_labels` must be >= 1, got {num_labels}.")
        split_name = split_name or SplitName("validation")
        if indices is not None and len(indices) == 0:
            raise ValueError(
                f"The {split_name.split!r} set{split_name.of_dataset} is empty: `indices` selects no rows."
            )
        self.rows = _SegmentationRows(
            dataset,
            indices,
            role="labelled",
            image_column=image_column,
            label_column=label_column,
            id_column=id_column,
            split_name=split_name,
            skip_undecodable=skip_undecodable,
        )
        self.transform = transform or SegmentationTransform(train=False, mean=mean, std=std)
        self.num_labels = num_labels
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def label_maps(self) -> Iterator[Tensor]:
        """The masks as stored, untransformed (e.g. for class frequencies)."""
        return self.rows.label_maps(self.num_labels, self.transform.ignore_index)

    @property
    def skipped_samples(self) -> list[str]:
        """Why each sample left out by `skip_undecodable=True` could not be decoded (empty otherwise)."""
        return self.rows.skipped_samples

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch (only matters with a training transform)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"Index {index} out of range for a dataset of {len(self)} items.")
        image, mask, sample_name = self.rows.load(index, with_label=True)
        check_mask_values(mask, self.num_labels, self.transform.ignore_index, sample_name)
        generator = None
        if self.transform.train:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        pixel_values, labels = self.transform(image, mask, generator=generator, sample_name=sample_name)
        return {"pixel_values": pixel_values, "labels": labels}
