"""One CPS experiment from its arguments: data, model, trainer, results and card. `scripts/train_cps.py` is a
thin wrapper around [`run_experiment`]."""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import datasets
import yaml
from transformers import HfArgumentParser, set_seed
from transformers.utils import logging

from .checkpointing import checkpoint_problems, last_complete_checkpoint
from .configuration_cps import CPSConfig
from .data import (
    SegmentationTransform,
    SemiSupervisedSegmentationDataset,
    SupervisedSegmentationDataset,
    check_columns,
    collate_semi_supervised,
    dataset_class_names,
    file_sha256,
    get_split,
    load_segmentation_dataset,
    select_indices_from_ids_file,
    select_labeled_indices,
    size_pair,
    split_fingerprint,
)
from .hub import take_over_hub_push
from .image_processing import backbone_normalization, create_image_processor
from .modelcard import write_model_card
from .modeling_cps import CPSForSemanticSegmentation
from .synthetic import SYNTHETIC_CLASS_NAMES, SYNTHETIC_DATASET_NAME
from .trainer import CPSTrainer, CPSTrainingArguments

logger = logging.get_logger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


@dataclass
class ModelSourceArguments:
    """Where the network's weights come from; the generated [`ModelArguments`] adds every [`CPSConfig`] field."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved CPS model (folder or Hub id) to start from instead of a new one."},
    )
    pretrained_backbone: bool = field(
        default=True,
        metadata={"help": "Start every branch from the backbone's ImageNet weights (downloads)."},
    )
    pretrained_backbone_file: str | None = field(
        default=None, metadata={"help": "Local file with the backbone's ImageNet weights (no download)."}
    )

    def __post_init__(self):
        for name in MODEL_CONFIG_FIELDS:
            if not _parsed_by_argparse(CPSConfig.__annotations__[name]):
                setattr(self, name, _read_command_line_value(getattr(self, name)))

    def config_values(self) -> dict[str, Any]:
        """The [`CPSConfig`] keyword arguments these arguments describe."""
        return {name: getattr(self, name) for name in MODEL_CONFIG_FIELDS}


# Every field CPSConfig adds to `PreTrainedConfig` is a training argument of the same name, default and help text.
MODEL_CONFIG_FIELDS = tuple(CPSConfig.__annotations__)
_ARGPARSE_SCALARS = (str, int, float, bool)


def _union_members(annotation: Any) -> tuple[Any, ...]:
    return (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )


def _parsed_by_argparse(annotation: Any) -> bool:
    """A scalar, or an optional scalar: `HfArgumentParser` reads those from the command line itself."""
    members = [member for member in _union_members(annotation) if member is not type(None)]
    return len(members) == 1 and members[0] in _ARGPARSE_SCALARS


def _read_command_line_value(value: Any) -> Any:
    """A non-scalar config field as typed on the command line, read as YAML: `--multi_grid 1 2 4` gives `[1, 2, 4]`,
    `--multi_grid null` `None`, `--inference_branch 1` `1`, `--backbone_kwargs '{"drop_rate": 0.1}'` a dict. Values
    from a config file are already typed and pass through."""
    if isinstance(value, str):
        return yaml.safe_load(value)
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        items = [yaml.safe_load(item) for item in value]
        # One word (`auto`, `null`) is the value itself, not a list of it.
        return items[0] if len(items) == 1 and not isinstance(items[0], int) else items
    return value


def config_field_docs(config_class: type) -> dict[str, str]:
    """Each field's description in a transformers-style docstring (``name (`type`, ...):`` then indented text)."""
    docs: dict[str, str] = {}
    name = None
    for line in inspect.cleandoc(config_class.__doc__ or "").splitlines():
        if match := re.fullmatch(r" {4}(\w+) \(.*\):", line):
            name = match.group(1)
            docs[name] = ""
        elif name is not None and (line.startswith(" " * 8) or not line.strip()):
            docs[name] = f"{docs[name]} {line.strip()}".strip()
        else:
            name = None
    return docs


def _model_config_argument(name: str, help_text: str) -> tuple[str, Any, Any]:
    """The `(name, type, field)` of the argument for one CPSConfig field: its own type when argparse reads it,
    otherwise words read as YAML by [`_read_command_line_value`]."""
    annotation = CPSConfig.__annotations__[name]
    default = CPSConfig.__dataclass_fields__[name].default
    metadata = {"help": help_text}
    if _parsed_by_argparse(annotation):
        return name, annotation, field(default=default, metadata=metadata)
    if any(typing.get_origin(member) in (list, tuple) for member in _union_members(annotation)):
        cli_type = list[str] | None  # `--multi_grid 1 2 4`, `--multi_grid auto`
    else:
        cli_type = str | None  # `--inference_branch ensemble`, `--backbone_kwargs '{"drop_rate": 0.1}'`
    default = list(default) if isinstance(default, (list, tuple)) else default
    # `HfArgumentParser` reads the defaults of list-typed arguments from factories only.
    return name, cli_type, field(default_factory=lambda: copy.copy(default), metadata=metadata)


def _make_model_arguments() -> type:
    docs = config_field_docs(CPSConfig)
    missing = [name for name in MODEL_CONFIG_FIELDS if not docs.get(name)]
    if missing:
        raise TypeError(f"CPSConfig's docstring does not describe {missing}: every field needs a help text.")
    arguments = make_dataclass(
        "ModelArguments",
        [_model_config_argument(name, docs[name]) for name in MODEL_CONFIG_FIELDS],
        bases=(ModelSourceArguments,),
    )
    arguments.__module__ = __name__
    arguments.__doc__ = (
        "Which network to build (or load): where its weights come from, and every [`CPSConfig`] field as an argument "
        "of the same name and default (command line or config file)."
    )
    return arguments


ModelArguments = _make_model_arguments()


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
        metadata={"help": "Separate image-only dataset for the unlabelled set (default: rest of train)."},
    )
    unlabeled_split: str = field(default="train", metadata={"help": "Split of --unlabeled_dataset_name."})
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
        default_factory=lambda: [0.5, 0.75, 1.0, 1.5, 1.75, 2.0], metadata={"help": "Random scale factors."}
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
        chosen = [self.labeled_ids_file, self.labeled_fraction, self.labeled_count]
        if sum(option is not None for option in chosen) != 1:
            raise ValueError(
                "Choose the labelled subset with exactly one of --labeled_ids_file, --labeled_fraction, "
                f"--labeled_count (got {chosen})."
            )


def parse_experiment_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, CPSTrainingArguments, Path | None]:
    """Parses `[CONFIG.yaml|CONFIG.json] [--field value ...]`: the config file's values are the defaults, command-line
    flags override them. Without a config file, the built-in demo config is the base of a run on the built-in
    synthetic data only; a run on any other `--dataset_name` starts from the library's defaults (the paper's
    network, optimiser and schedule, the Trainer's checkpointing, no overwriting).

    Returns:
        The model, data and training arguments, and the config file used as the base (`None`: library defaults).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if argv and not argv[0].startswith("-"):
        config_path = Path(argv.pop(0))
    elif names_synthetic_dataset(argv):
        config_path = DEFAULT_CONFIG
    parser = HfArgumentParser((ModelArguments, DataArguments, CPSTrainingArguments))
    if config_path is not None:
        config_values = load_config_file(config_path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config_values) - known)
        if unknown:
            raise ValueError(f"Unknown keys in {config_path}: {unknown}.")
        parser.set_defaults(**config_values)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args, config_path


def names_synthetic_dataset(argv: Sequence[str]) -> bool:
    """Whether command-line arguments leave `--dataset_name` at (or set it to) the built-in synthetic data."""
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--dataset_name", "--dataset-name", default=SYNTHETIC_DATASET_NAME)
    known, _ = peek.parse_known_args(argv)
    return known.dataset_name == SYNTHETIC_DATASET_NAME


def load_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values.")
    return values


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


def build_model(
    model_args: ModelArguments, class_names: list[str], dataset_name: str | None = None
) -> CPSForSemanticSegmentation:
    id2label = dict(enumerate(class_names))
    label2id = {name: index for index, name in id2label.items()}
    if model_args.model_name_or_path is not None:
        model = CPSForSemanticSegmentation.from_pretrained(model_args.model_name_or_path)
        if model.config.num_labels != len(class_names):
            raise ValueError(
                f"{model_args.model_name_or_path} predicts {model.config.num_labels} classes but dataset "
                f"{dataset_name!r} has {len(class_names)} ({class_names})."
            )
        return model
    config = CPSConfig(**model_args.config_values(), id2label=id2label, label2id=label2id)
    if model_args.pretrained_backbone or model_args.pretrained_backbone_file:
        return CPSForSemanticSegmentation.from_timm_pretrained(config, model_args.pretrained_backbone_file)
    return CPSForSemanticSegmentation(config)


@dataclass
class ExperimentData:
    train_dataset: SemiSupervisedSegmentationDataset | SupervisedSegmentationDataset
    eval_dataset: SupervisedSegmentationDataset | None
    class_names: list[str]
    num_labeled: int
    num_unlabeled: int
    split_fingerprint: str
    split: dict[str, Any]
    skipped_samples: list[str] = field(default_factory=list)


def build_data(
    data_args: DataArguments, training_args: CPSTrainingArguments, backbone: str
) -> ExperimentData:
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
    mean, std = backbone_normalization(backbone)
    train_transform = SegmentationTransform(
        train=True, crop_size=data_args.crop_size, scales=data_args.scales, mean=mean, std=std
    )
    common = dict(
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        id_column=data_args.id_column,
        skip_undecodable=data_args.skip_undecodable_samples,
    )
    if training_args.supervised_only:
        train_dataset = SupervisedSegmentationDataset(
            train_split,
            labeled_indices,
            num_labels=len(class_names),
            transform=train_transform,
            seed=training_args.seed,
            split_name=data_args.train_split,
            dataset_name=dataset_name,
            **common,
        )
        num_labeled, num_unlabeled = len(train_dataset), 0
    else:
        unlabeled_dataset = None
        if data_args.unlabeled_dataset_name is not None:
            unlabeled_dataset = get_split(
                load_segmentation_dataset(data_args.unlabeled_dataset_name, cache_dir=data_args.cache_dir),
                data_args.unlabeled_split,
                data_args.unlabeled_dataset_name,
            )
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
            cutmix=training_args.cutmix,
            seed=training_args.seed,
            labeled_split_name=data_args.train_split,
            unlabeled_split_name=data_args.unlabeled_split if unlabeled_dataset is not None else None,
            labeled_dataset_name=dataset_name,
            unlabeled_dataset_name=data_args.unlabeled_dataset_name,
            **common,
        )
        num_labeled, num_unlabeled = train_dataset.num_labeled, train_dataset.num_unlabeled

    eval_dataset = None
    if data_args.eval_split is not None:
        eval_split = get_split(dataset_dict, data_args.eval_split, dataset_name)
        eval_indices = None
        if data_args.max_eval_samples is not None:
            eval_indices = list(range(min(data_args.max_eval_samples, len(eval_split))))
        eval_transform = SegmentationTransform(train=False, mean=mean, std=std, eval_size=data_args.eval_size)
        eval_dataset = SupervisedSegmentationDataset(
            eval_split,
            eval_indices,
            num_labels=len(class_names),
            transform=eval_transform,
            split_name=data_args.eval_split,
            dataset_name=dataset_name,
            **common,
        )
    return ExperimentData(
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        class_names=class_names,
        num_labeled=num_labeled,
        num_unlabeled=num_unlabeled,
        split_fingerprint=split_fingerprint(labeled_indices),
        split=split_record(data_args, len(train_split), labeled_indices, num_unlabeled),
        skipped_samples=train_dataset.skipped_samples
        + (eval_dataset.skipped_samples if eval_dataset is not None else []),
    )


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
    data_args: DataArguments, num_train_rows: int, labeled_indices: list[int], num_unlabeled: int
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


def resolve_resume_checkpoint(training_args: CPSTrainingArguments) -> str | None:
    """The checkpoint a training run continues from, checked before anything is loaded or written.

    An explicit `--resume_from_checkpoint` must be complete (see [`~cps_hf.checkpointing.checkpoint_problems`]).
    Otherwise the latest complete checkpoint in `output_dir` is used, skipping incomplete ones with a warning. An
    `output_dir` holding a trained model or only incomplete checkpoints is never overwritten without
    `--overwrite_output_dir true`.

    Raises:
        ValueError: for an incomplete explicit checkpoint, or an `output_dir` that would be overwritten.
    """
    if not training_args.do_train:
        return None
    if training_args.resume_from_checkpoint is not None:
        problems = checkpoint_problems(training_args.resume_from_checkpoint)
        if problems:
            raise ValueError(
                f"Cannot resume from {training_args.resume_from_checkpoint}: {'; '.join(problems)}. Pass a complete "
                "checkpoint, or leave --resume_from_checkpoint out to continue from the latest complete one in "
                "--output_dir."
            )
        return training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir():
        return None
    last_checkpoint = last_complete_checkpoint(output_dir)
    if last_checkpoint is not None:
        logger.warning(f"Resuming from the latest complete checkpoint in {output_dir}: {last_checkpoint}.")
        return last_checkpoint
    if training_args.overwrite_output_dir:
        return None
    if any(path.is_dir() for path in output_dir.glob("checkpoint-*")):
        raise ValueError(
            f"{output_dir} holds checkpoints but none of them is complete (see the warnings above); pass "
            "--overwrite_output_dir true to start afresh (they are replaced as the new run saves its own) or "
            "another --output_dir."
        )
    if (output_dir / "model.safetensors").exists():
        raise ValueError(
            f"{output_dir} already holds a trained model; pass --overwrite_output_dir true or another --output_dir."
        )
    return None


def run_experiment(
    model_args: ModelArguments, data_args: DataArguments, training_args: CPSTrainingArguments
) -> dict[str, Any]:
    """Trains, evaluates and saves one CPS model; returns the final metrics."""
    set_seed(training_args.seed)
    # Published once at the end with this project's card, not by the Trainer (checkpoints, its own card).
    hub_request = take_over_hub_push(training_args)
    output_dir = Path(training_args.output_dir)
    resume_checkpoint = resolve_resume_checkpoint(training_args)

    data = build_data(data_args, training_args, model_args.backbone)
    model = build_model(model_args, data.class_names, data_args.dataset_name)
    image_processor = create_image_processor(model.config)
    trainer = CPSTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        data_collator=collate_semi_supervised,
        processing_class=image_processor,
    )
    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume_checkpoint)
        trainer.check_finite_loss()
        if data_args.skip_undecodable_samples:
            train_result.metrics["skipped_undecodable_samples"] = len(data.skipped_samples)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(
            {f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()}
        )
    if data.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)
    if trainer.is_world_process_zero():
        recipe = {
            # As run: the config fields hold the model's own values (what "auto" and `None` resolved to, or a
            # loaded model's configuration), not the requested ones.
            "model": {
                **asdict(model_args),
                **{name: getattr(model.config, name) for name in MODEL_CONFIG_FIELDS},
            },
            "data": asdict(data_args),
            "num_labeled": data.num_labeled,
            "num_unlabeled": data.num_unlabeled,
            "split_fingerprint": data.split_fingerprint,
            "split": data.split,
            "skipped_undecodable_samples": data.skipped_samples,
            "training": {
                key: getattr(training_args, key)
                for key in (
                    "cps_weight",
                    "cps_weight_warmup_steps",
                    "cps_confidence_threshold",
                    "cutmix",
                    "fused_forward",
                    "supervised_only",
                    "supervised_loss",
                    "pseudo_label_mode",
                    "learning_rate",
                    "weight_decay",
                    "max_steps",
                    "num_train_epochs",
                    "per_device_train_batch_size",
                    "gradient_accumulation_steps",
                    "seed",
                    "optim",
                    "optim_args",
                    "lr_scheduler_type",
                    "lr_scheduler_kwargs",
                    "max_grad_norm",
                    "ohem_threshold",
                    "ohem_min_kept",
                )
            },
            "world_size": training_args.world_size,
        }
        (output_dir / "cps_recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
        write_model_card(output_dir, model.config)
        if hub_request is not None:
            hub_request.publish(output_dir)
    if data.skipped_samples and trainer.is_world_process_zero():
        logger.warning(
            f"Skipped {len(data.skipped_samples)} undecodable sample(s) (listed in cps_recipe.json): "
            + " | ".join(data.skipped_samples)
        )
    return results


__all__ = [
    "MODEL_CONFIG_FIELDS",
    "DataArguments",
    "ModelArguments",
    "ModelSourceArguments",
    "build_data",
    "build_model",
    "names_synthetic_dataset",
    "parse_experiment_arguments",
    "resolve_resume_checkpoint",
    "run_experiment",
    "split_record",
]
