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

import yaml
from transformers import HfArgumentParser, set_seed
from transformers.utils import logging

from .checkpointing import checkpoint_problems, last_complete_checkpoint
from .configuration_cps import CPSConfig
from .data import DataArguments, TrainingData, build_training_data, collate_semi_supervised
from .data.synthetic import SYNTHETIC_DATASET_NAME
from .hub import take_over_hub_push
from .image_processing import backbone_normalization, create_image_processor
from .modelcard import write_model_card
from .modeling_cps import CPSForSemanticSegmentation
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


def build_data(data_args: DataArguments, training_args: CPSTrainingArguments, backbone: str) -> TrainingData:
    """The datasets of a run ([`~cps_hf.data.build_training_data`]), normalised like the backbone's pretraining."""
    mean, std = backbone_normalization(backbone)
    return build_training_data(
        data_args,
        seed=training_args.seed,
        cutmix=training_args.cutmix,
        supervised_only=training_args.supervised_only,
        mean=mean,
        std=std,
        process_index=training_args.process_index,
        num_processes=training_args.world_size,
    )


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
        unlabeled_stream=data.unlabeled_stream,
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
                    "class_weighting",
                    "cps_class_weighting",
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
            "class_weights": None if trainer.class_weights is None else trainer.class_weights.tolist(),
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
]
