"""The data of one training run, assembled from its [`DataArguments`]: datasets, class names and split record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
from transformers.utils import logging

from .class_names import dataset_class_names
from .loading import check_columns, get_split, load_segmentation_dataset
from .segmentation_dataset import SemiSupervisedSegmentationDataset, SplitName, SupervisedSegmentationDataset
from .splits import file_sha256, select_indices_from_ids_file, select_labeled_indices, split_fingerprint
from .streaming import UnlabeledImageStream
from .synthetic import SYNTHETIC_CLASS_NAMES, SYNTHETIC_DATASET_NAME
from .transforms import PAPER_SCALES, SegmentationTransform, size_pair

logger = logging.get_logger(__name__)


@dataclass
class DataArguments:
    """Where the images and masks come from and how they are split and augmented."""

    dataset_name: str = field(
        default=SYNTHETIC_DATASET_NAME,
        metadata={"help": "'synthetic' (built in), a save_to_disk/parquet/imagefolder folder, or a Hub id."},
    )
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "Mask column (class ids, 255 = ignore)."})
    id_column: str = field(default="id", metadata={"help": "Sample id column (used by --labeled_ids_file)."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(
        default="validation", metadata={"help": "Evaluation split ('none' or null: no evaluation)."}
    )
    unlabeled_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Separate image-only dataset for the unlabelled set (default: rest of train): a local folder "
            "or a Hub id. The labelled rows still come from --dataset_name's train split."
        },
    )
    unlabeled_split: str = field(default="train", metadata={"help": "Split of --unlabeled_dataset_name."})
    unlabeled_image_column: str | None = field(
        default=None, metadata={"help": "Image column of --unlabeled_dataset_name (default: --image_column)."}
    )
    unlabeled_streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream --unlabeled_dataset_name (a datasets IterableDataset: any size, read as training goes, "
            "split across processes, exact resume) instead of loading it."
        },
    )
    unlabeled_shuffle_buffer_size: int = field(
        default=1000,
        metadata={
            "help": "Streaming: rows shuffled together, held in memory as encoded images in each process "
            "(1: the order in which they are read)."
        },
    )
    labeled_ids_file: str | None = field(
        default=None,
        metadata={
            "help": "Split file of labelled ids: one id per line, or Cityscapes `image<TAB>label` lines."
        },
    )
    unlabeled_ids_file: str | None = field(
        default=None,
        metadata={"help": "Split file of unlabelled ids (default: every training row that is not labelled)."},
    )
    labeled_fraction: float | None = field(
        default=None, metadata={"help": "Fraction of train that is labelled."}
    )
    labeled_count: int | None = field(default=None, metadata={"help": "Number of labelled training rows."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the labelled subset for fraction/count."})
    class_names: list[str] | None = field(
        default=None,
        metadata={"help": "Class names in id order (default: from the dataset or generic names)."},
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Number of classes when no names are given."}
    )
    crop_size: list[int] = field(
        default_factory=lambda: [512],
        metadata={
            "help": "Training crop: one value (square) or `height width` (e.g. whole non-square frames)."
        },
    )
    scales: list[float] = field(
        default_factory=lambda: list(PAPER_SCALES), metadata={"help": "Random scale factors."}
    )
    color_jitter: list[float] | None = field(
        default=None,
        metadata={
            "help": "Colour jitter of the training images (labelled and unlabelled): `brightness contrast "
            "saturation hue` strengths as torchvision's ColorJitter, e.g. `0.4 0.4 0.4 0.1` (default: none, "
            "as the paper)."
        },
    )
    eval_size: int | None = field(
        default=None, metadata={"help": "Resize evaluation images to this square size."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many rows."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Cache folder for datasets (and the synthetic data)."}
    )
    synthetic_num_train: int = field(default=512, metadata={"help": "Synthetic data: training images."})
    synthetic_num_val: int = field(default=128, metadata={"help": "Synthetic data: validation images."})
    synthetic_image_size: int = field(default=96, metadata={"help": "Synthetic data: image size."})
    skip_undecodable_samples: bool = field(
        default=False,
        metadata={
            "help": "Decode every sample once before training and leave out (and count) those that cannot be "
            "decoded, instead of stopping at the first one."
        },
    )

    def __post_init__(self):
        self.crop_size = list(size_pair(self.crop_size, "crop_size"))
        if self.eval_split is not None and self.eval_split.lower() in ("", "none", "null"):
            self.eval_split = None
        if self.unlabeled_streaming:
            if self.unlabeled_dataset_name is None:
                raise ValueError(
                    "--unlabeled_streaming streams --unlabeled_dataset_name: name the unlabelled pool."
                )
            if self.unlabeled_ids_file is not None:
                raise ValueError(
                    "--unlabeled_ids_file selects rows of a dataset that is loaded, not streamed: drop it, or "
                    "--unlabeled_streaming."
                )
        if self.unlabeled_shuffle_buffer_size < 1:
            raise ValueError(
                f"--unlabeled_shuffle_buffer_size must be >= 1, got {self.unlabeled_shuffle_buffer_size}."
            )
        chosen = [self.labeled_ids_file, self.labeled_fraction, self.labeled_count]
        if sum(option is not None for option in chosen) != 1:
            raise ValueError(
                "Choose the labelled subset with exactly one of --labeled_ids_file, --labeled_fraction, "
                f"--labeled_count (got {chosen})."
            )


@dataclass
class TrainingData:
    """What [`build_training_data`] assembles for one run."""

    train_dataset: SemiSupervisedSegmentationDataset | SupervisedSegmentationDataset
    """With a streamed unlabelled pool, the labelled rows alone ([`SupervisedSegmentationDataset`])."""
    eval_dataset: SupervisedSegmentationDataset | None
    class_names: list[str]
    num_labeled: int
    num_unlabeled: int | None
    """`None` for a stream whose size the dataset does not record."""
    split_fingerprint: str
    split: dict[str, Any]
    """The labelled/unlabelled split as [`split_record`] describes it."""
    skipped_samples: list[str] = field(default_factory=list)
    unlabeled_stream: UnlabeledImageStream | None = None
    """The streamed unlabelled pool (`--unlabeled_streaming`), for [`~cps_hf.trainer.CPSTrainer`]."""


def build_training_data(
    data_args: DataArguments,
    *,
    seed: int,
    cutmix: bool,
    supervised_only: bool = False,
    mean: Sequence[float],
    std: Sequence[float],
    process_index: int = 0,
    num_processes: int = 1,
) -> TrainingData:
    """Loads the dataset, chooses the labelled (and unlabelled) rows and builds the training and evaluation datasets.

    The labelled rows are always chosen from `--dataset_name`'s train split (`--labeled_ids_file`,
    `--labeled_fraction` or `--labeled_count`). The unlabelled set is the rest of that split, or, with
    `--unlabeled_dataset_name`, that dataset alone (then the train rows that are not labelled are not used:
    `--labeled_fraction 1.0` labels the whole split). With `--unlabeled_streaming` the pool is streamed: the training
    dataset holds the labelled rows and the trainer pairs each labelled batch with a batch of the
    [`UnlabeledImageStream`].

    Args:
        data_args ([`DataArguments`]):
            The data of the run.
        seed (`int`):
            Base seed of the per-item augmentation.
        cutmix (`bool`):
            Whether training items carry a CutMix partner and mask.
        supervised_only (`bool`, *optional*, defaults to `False`):
            Train on the labelled rows alone ([`SupervisedSegmentationDataset`]).
        mean (`Sequence[float]`):
            Normalisation mean (the backbone's pretraining statistics).
        std (`Sequence[float]`):
            Normalisation standard deviation.
        process_index (`int`, *optional*, defaults to 0):
            This process's rank (which part of a streamed pool it reads).
        num_processes (`int`, *optional*, defaults to 1):
            Number of training processes.

    Returns:
        [`TrainingData`]: the datasets, the class names and the record of the split.
    """
    synthetic_kwargs = {}
    if data_args.dataset_name in (None, SYNTHETIC_DATASET_NAME):
        synthetic_kwargs = dict(
            num_train=data_args.synthetic_num_train,
            num_val=data_args.synthetic_num_val,
            image_size=data_args.synthetic_image_size,
        )
    dataset_dict = load_segmentation_dataset(
        data_args.dataset_name, cache_dir=data_args.cache_dir, **synthetic_kwargs
    )
    dataset_name = data_args.dataset_name or SYNTHETIC_DATASET_NAME
    train_split = get_split(dataset_dict, data_args.train_split, dataset_name)
    check_columns(
        train_split, data_args.image_column, data_args.label_column, data_args.train_split, dataset_name
    )
    class_names = resolve_class_names(data_args, train_split)
    labeled_indices = select_labeled_indices(
        train_split,
        labeled_ids_file=data_args.labeled_ids_file,
        labeled_fraction=data_args.labeled_fraction,
        labeled_count=data_args.labeled_count,
        split_seed=data_args.split_seed,
        id_column=data_args.id_column,
        dataset_name=dataset_name,
    )
    train_transform = SegmentationTransform(
        train=True,
        crop_size=data_args.crop_size,
        scales=data_args.scales,
        mean=mean,
        std=std,
        color_jitter=data_args.color_jitter,
    )
    columns = dict(
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        id_column=data_args.id_column,
        skip_undecodable=data_args.skip_undecodable_samples,
    )
    train_split_name = SplitName(data_args.train_split, dataset_name)
    unlabeled_stream = None
    if data_args.unlabeled_streaming and not supervised_only:
        unlabeled_stream = build_unlabeled_stream(
            data_args,
            transform=train_transform,
            seed=seed,
            cutmix=cutmix,
            process_index=process_index,
            num_processes=num_processes,
        )
    if supervised_only or unlabeled_stream is not None:
        train_dataset = SupervisedSegmentationDataset(
            train_split,
            labeled_indices,
            num_labels=len(class_names),
            transform=train_transform,
            seed=seed,
            split_name=train_split_name,
            **columns,
        )
        num_labeled, num_unlabeled = len(train_dataset), 0
        if unlabeled_stream is not None:
            num_unlabeled = _recorded_num_rows(unlabeled_stream.dataset, data_args.unlabeled_split)
    else:
        unlabeled_dataset, unlabeled_split_name = None, None
        if data_args.unlabeled_dataset_name is not None:
            unlabeled_dataset = get_split(
                load_segmentation_dataset(data_args.unlabeled_dataset_name, cache_dir=data_args.cache_dir),
                data_args.unlabeled_split,
                data_args.unlabeled_dataset_name,
            )
            unlabeled_split_name = SplitName(data_args.unlabeled_split, data_args.unlabeled_dataset_name)
        unlabeled_indices = None
        if data_args.unlabeled_ids_file is not None:
            unlabeled_indices = _select_unlabeled_rows(
                unlabeled_dataset if unlabeled_dataset is not None else train_split,
                data_args,
                labeled_indices if unlabeled_dataset is None else None,
            )
        train_dataset = SemiSupervisedSegmentationDataset(
            train_split,
            labeled_indices,
            transform=train_transform,
            num_labels=len(class_names),
            unlabeled_dataset=unlabeled_dataset,
            unlabeled_indices=unlabeled_indices,
            cutmix=cutmix,
            seed=seed,
            split_name=train_split_name,
            unlabeled_split_name=unlabeled_split_name,
            unlabeled_image_column=data_args.unlabeled_image_column,
            **columns,
        )
        num_labeled, num_unlabeled = train_dataset.num_labeled, train_dataset.num_unlabeled

    eval_dataset = None
    if data_args.eval_split is not None:
        eval_split = get_split(dataset_dict, data_args.eval_split, dataset_name)
        eval_indices = None
        if data_args.max_eval_samples is not None:
            eval_indices = list(range(min(data_args.max_eval_samples, len(eval_split))))
        eval_dataset = SupervisedSegmentationDataset(
            eval_split,
            eval_indices,
            num_labels=len(class_names),
            transform=SegmentationTransform(train=False, mean=mean, std=std, eval_size=data_args.eval_size),
            split_name=SplitName(data_args.eval_split, dataset_name),
            **columns,
        )
    return TrainingData(
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        class_names=class_names,
        num_labeled=num_labeled,
        num_unlabeled=num_unlabeled,
        split_fingerprint=split_fingerprint(labeled_indices),
        split=split_record(data_args, len(train_split), labeled_indices, num_unlabeled),
        skipped_samples=train_dataset.skipped_samples
        + (eval_dataset.skipped_samples if eval_dataset is not None else []),
        unlabeled_stream=unlabeled_stream,
    )


def build_unlabeled_stream(
    data_args: DataArguments,
    *,
    transform: SegmentationTransform,
    seed: int,
    cutmix: bool,
    process_index: int = 0,
    num_processes: int = 1,
) -> UnlabeledImageStream:
    """The [`UnlabeledImageStream`] of `--unlabeled_dataset_name` (split `--unlabeled_split`) for one process."""
    name = data_args.unlabeled_dataset_name
    pool = get_split(
        load_segmentation_dataset(name, cache_dir=data_args.cache_dir, streaming=True),
        data_args.unlabeled_split,
        name,
    )
    return UnlabeledImageStream(
        pool,
        transform=transform,
        image_column=data_args.unlabeled_image_column or data_args.image_column,
        id_column=data_args.id_column,
        cutmix=cutmix,
        shuffle_buffer_size=data_args.unlabeled_shuffle_buffer_size,
        seed=seed,
        process_index=process_index,
        num_processes=num_processes,
        split_name=SplitName(data_args.unlabeled_split, name),
        skip_undecodable=data_args.skip_undecodable_samples,
    )


def _recorded_num_rows(dataset: datasets.IterableDataset, split: str) -> int | None:
    """The number of rows the dataset's metadata records for `split` (Hub datasets often do), else `None`."""
    recorded = dataset.info.splits.get(split) if dataset.info.splits else None
    return recorded.num_examples if recorded is not None and recorded.num_examples else None


def resolve_class_names(data_args: DataArguments, train_dataset: datasets.Dataset) -> list[str]:
    """The class names in id order: `--class_names`, the synthetic dataset's, those the dataset stores in its
    description (`{"class_names": [...]}`), or generic names for `--num_labels` classes.

    Raises:
        ValueError: if `--num_labels` disagrees with the number of names, or nothing gives the classes.
    """
    names = None
    if data_args.class_names:
        names = list(data_args.class_names)
    elif data_args.dataset_name in (None, SYNTHETIC_DATASET_NAME):
        names = list(SYNTHETIC_CLASS_NAMES)
    else:
        names = dataset_class_names(train_dataset)
    if names:
        if data_args.num_labels is not None and data_args.num_labels != len(names):
            raise ValueError(
                f"--num_labels is {data_args.num_labels} but dataset {data_args.dataset_name!r} has "
                f"{len(names)} classes ({names}); drop --num_labels or fix the class names."
            )
        return names
    if data_args.num_labels is None:
        raise ValueError(
            f"Dataset {data_args.dataset_name!r} does not name its classes: pass --class_names or --num_labels."
        )
    return [f"class_{index}" for index in range(data_args.num_labels)]


def _select_unlabeled_rows(
    dataset: datasets.Dataset, data_args: DataArguments, labeled_indices: list[int] | None
) -> list[int]:
    """The rows of `--unlabeled_ids_file`; with `labeled_indices` (same dataset), reports rows in both sets (the
    PseudoSeg lists overlap) and rows in neither."""
    unlabeled_indices = select_indices_from_ids_file(
        dataset,
        data_args.unlabeled_ids_file,
        id_column=data_args.id_column,
        dataset_name=data_args.unlabeled_dataset_name or data_args.dataset_name,
        subset="unlabelled",
    )
    if labeled_indices is not None:
        both = set(labeled_indices) & set(unlabeled_indices)
        if both:
            logger.warning(
                f"{len(both)} row(s) are in both {data_args.labeled_ids_file or 'the labelled set'} and "
                f"{data_args.unlabeled_ids_file}: they are used as labelled and as unlabelled samples."
            )
        neither = len(dataset) - len(set(labeled_indices) | set(unlabeled_indices))
        if neither:
            logger.info(f"{neither} training row(s) are neither labelled nor unlabelled: they are not used.")
    return unlabeled_indices


def split_record(
    data_args: DataArguments, num_train_rows: int, labeled_indices: list[int], num_unlabeled: int | None
) -> dict[str, Any]:
    """What identifies the labelled/unlabelled split of a run (the `split` entry of `cps_recipe.json`): the split
    files and their SHA-256, or the seed and fraction/count of a random draw, the counts and the fingerprint of
    the labelled rows."""
    method = (
        "ids_file"
        if data_args.labeled_ids_file is not None
        else ("fraction" if data_args.labeled_fraction is not None else "count")
    )
    record: dict[str, Any] = {
        "method": method,
        "train_split": data_args.train_split,
        "num_train_rows": num_train_rows,
    }
    for key in ("labeled_ids_file", "unlabeled_ids_file"):
        path = getattr(data_args, key)
        record[key] = path
        record[f"{key}_sha256"] = file_sha256(path) if path is not None else None
    record.update(
        labeled_fraction=data_args.labeled_fraction,
        labeled_count=data_args.labeled_count,
        split_seed=None if method == "ids_file" else data_args.split_seed,
        num_labeled=len(labeled_indices),
        num_unlabeled=num_unlabeled,
        fingerprint=split_fingerprint(labeled_indices),
    )
    return record
