"""Model cards for CPS checkpoints, rendered from the Jinja template `cps_hf/templates/model_card.md` and filled
only from a run's own files: `config.json`, `cps_recipe.json`, the Trainer's `eval_results.json` and the reports of
`scripts/evaluate_cps.py`. This module computes the values (metadata, tables, recipe fields); the wording is the
template's."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import timm
from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants
from transformers.utils import logging

from .configuration_cps import CPSConfig
from .data import size_pair
from .data.synthetic import SYNTHETIC_DATASET_NAME
from .inference import InferenceProtocol, branch_result_name, is_local_path

logger = logging.get_logger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"
RECIPE_FILE_NAME = "cps_recipe.json"
# The Trainer writes the final evaluation to both; `eval_results.json` is read first.
TRAINER_RESULTS_FILE_NAMES = ("eval_results.json", "all_results.json")
# Hub task id, so the results attach to the pipeline tag's task; the name says which sub-task.
TASK_TYPE, TASK_NAME = "image-segmentation", "Semantic Segmentation"
CARD_TAGS = (
    "cps_hf",
    "semantic-segmentation",
    "semi-supervised",
    "cross-pseudo-supervision",
    "deeplabv3plus",
    "timm",
)
SUMMARY_METRICS = ("mean_iou", "overall_accuracy", "mean_accuracy")
# Recipe keys holding one of these words (between underscores) identify the labelled split, e.g. `split_fingerprint`.
SPLIT_IDENTITY_WORDS = {"sha256", "sha1", "md5", "hash", "digest", "fingerprint"}
SYNTHETIC_DATASET_DISPLAY_NAME = "cps_hf synthetic shapes"


@dataclass
class MeasuredEvaluation:
    """
    One measured evaluation: one branch (or the ensemble) of the model on one dataset split under one inference
    protocol, as read from a results file.

    Args:
        dataset (`str`): the dataset as the run named it (`"synthetic"`, a local folder or a Hub id).
        split (`str`, *optional*): the evaluated split.
        branch (`str`): `"branch_<i>"` or `"ensemble"`.
        protocol ([`~cps_hf.inference.InferenceProtocol`]): how the model predicted.
        eval_size (`tuple[int, int]`, *optional*): the `(height, width)` images and labels were resized to.
        max_samples (`int`, *optional*): only the first `max_samples` images were scored.
        metrics (`dict`): `mean_iou`, `overall_accuracy`, `mean_accuracy` and `iou_<class name>`, as fractions
            (`None` for a class absent from predictions and labels).
        num_images (`int`, *optional*): how many images were scored, when the results file says.
        source (`str`): the name of the results file.
    """

    dataset: str
    split: str | None
    branch: str
    protocol: InferenceProtocol
    eval_size: tuple[int, int] | None
    max_samples: int | None
    metrics: dict[str, float | None]
    num_images: int | None
    source: str

    def identity(self) -> tuple:
        """What makes two evaluations the same measurement (the same numbers read from two files)."""
        return (
            self.dataset,
            self.split,
            self.branch,
            self.protocol,
            self.eval_size,
            self.max_samples,
            self.metrics.get("mean_iou"),
        )


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def read_recipe(model_dir: str | Path) -> dict[str, Any] | None:
    """The run's `cps_recipe.json`, or `None` when the folder has none."""
    path = Path(model_dir) / RECIPE_FILE_NAME
    return read_json(path) if path.is_file() else None


def is_evaluation_report(data: Any) -> bool:
    """Whether `data` is a report written by `scripts/evaluate_cps.py --output_json`."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("results"), dict)
        and isinstance(data.get("protocol"), dict)
    )


def read_trainer_evaluation(
    model_dir: str | Path, config: CPSConfig, recipe: Mapping[str, Any] | None
) -> MeasuredEvaluation | None:
    """
    The evaluation the Trainer ran at the end of training (`eval_results.json`): `config.inference_branch`, whole
    images at a single scale. `None` when there is none, or when no recipe says which data it was measured on.
    """
    model_dir = Path(model_dir)
    for file_name in TRAINER_RESULTS_FILE_NAMES:
        path = model_dir / file_name
        if path.is_file():
            results = read_json(path)
            break
    else:
        return None
    if "eval_mean_iou" not in results:
        return None
    if recipe is None:
        logger.warning(
            f"{path} holds an evaluation but {model_dir} has no {RECIPE_FILE_NAME} naming its dataset: "
            "it is left out of the card."
        )
        return None
    data = recipe.get("data", {})
    if data.get("eval_split") is None:
        logger.warning(
            f"{path} holds an evaluation, but the run recorded in {RECIPE_FILE_NAME} did not evaluate (eval_split is "
            "null): it is left over from an earlier run and left out of the card."
        )
        return None
    metrics = {
        key.removeprefix("eval_"): value
        for key, value in results.items()
        if key.removeprefix("eval_") in SUMMARY_METRICS or key.startswith("eval_iou_")
    }
    eval_size = data.get("eval_size")
    return MeasuredEvaluation(
        dataset=str(data.get("dataset_name") or SYNTHETIC_DATASET_NAME),
        split=data.get("eval_split"),
        branch=branch_result_name(config.inference_branch),
        protocol=InferenceProtocol(),
        eval_size=size_pair(eval_size, "eval_size") if eval_size else None,
        max_samples=data.get("max_eval_samples"),
        metrics=metrics,
        num_images=None,
        source=path.name,
    )


def _recorded_protocol(recorded: Mapping[str, Any]) -> InferenceProtocol:
    """The inference protocol a results file records (`InferenceProtocol.to_json_dict()`), read as the card describes
    it: the window sizes count only in mode `"slide"`, missing scales mean a single scale."""
    slide = recorded.get("mode") == "slide"
    return InferenceProtocol(
        mode="slide" if slide else "whole",
        crop_size=recorded.get("crop_size") if slide else None,
        stride=recorded.get("stride") if slide else None,
        scales=recorded.get("scales") or (1.0,),
        flip=bool(recorded.get("flip")),
    )


def read_evaluation_report(path: str | Path) -> list[MeasuredEvaluation]:
    """
    The evaluations in a report of `scripts/evaluate_cps.py --output_json`: one per evaluated branch / the
    ensemble.

    Raises:
        ValueError: if the file is not such a report.
    """
    path = Path(path)
    report = read_json(path)
    if not is_evaluation_report(report):
        raise ValueError(
            f"{path} is not an evaluation report of scripts/evaluate_cps.py (expected 'results' and 'protocol' "
            f"keys, got {sorted(report) if isinstance(report, dict) else type(report).__name__})."
        )
    protocol = _recorded_protocol(report["protocol"])
    eval_size = report.get("eval_size")
    return [
        MeasuredEvaluation(
            dataset=str(report.get("dataset")),
            split=report.get("split"),
            branch=branch,
            protocol=protocol,
            eval_size=size_pair(eval_size, "eval_size") if eval_size else None,
            max_samples=report.get("max_samples"),
            metrics=dict(metrics),
            num_images=report.get("num_images"),
            source=path.name,
        )
        for branch, metrics in report["results"].items()
    ]


def weights_sha256(model_dir: str | Path) -> str | None:
    """SHA-256 of a saved model's safetensors weights (all shards, in name order); `None` if there are none, e.g.
    for a Hub id."""
    paths = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def find_evaluation_reports(model_dir: str | Path) -> list[Path]:
    """The `scripts/evaluate_cps.py` reports saved in the model folder (top level, any `*.json` name)."""
    return [path for path in sorted(Path(model_dir).glob("*.json")) if is_evaluation_report(read_json(path))]


def collect_evaluations(
    model_dir: str | Path,
    config: CPSConfig,
    recipe: Mapping[str, Any] | None,
    results_files: Sequence[str | Path] = (),
) -> list[MeasuredEvaluation]:
    """
    Every measured evaluation of the checkpoint: the Trainer's final evaluation, every evaluation report in the
    folder, then those of `results_files`. The same measurement found in two files is kept once.
    """
    evaluations = []
    trainer_evaluation = read_trainer_evaluation(model_dir, config, recipe)
    if trainer_evaluation is not None:
        evaluations.append(trainer_evaluation)
    in_folder = find_evaluation_reports(model_dir)
    given = [
        Path(path) for path in results_files if Path(path).resolve() not in {p.resolve() for p in in_folder}
    ]
    weights_digest = None
    for path in [*in_folder, *given]:
        recorded = read_json(path).get("weights_sha256")
        if recorded is not None:
            weights_digest = weights_digest or weights_sha256(model_dir)
            if recorded != weights_digest:
                message = f"{path} evaluated other weights than those in {model_dir} (weights_sha256 differs)"
                if path in given:
                    raise ValueError(message + ".")
                logger.warning(message + ": left out of the card.")
                continue
        evaluations.extend(read_evaluation_report(path))
    unique: dict[tuple, MeasuredEvaluation] = {}
    for evaluation in evaluations:
        known = unique.setdefault(evaluation.identity(), evaluation)
        if known is not evaluation:
            known.source = f"{known.source}, {evaluation.source}"
            if known.num_images is None:
                known.num_images = evaluation.num_images
    return list(unique.values())


def dataset_hub_id(dataset_name: str, dataset_ids: Mapping[str, str]) -> str | None:
    """The Hub id of a dataset, or `None` for the synthetic data and local folders not mapped to one."""
    if dataset_name in dataset_ids:
        return dataset_ids[dataset_name]
    if dataset_name == SYNTHETIC_DATASET_NAME or is_local_path(dataset_name):
        return None
    return dataset_name


def dataset_short_name(dataset_name: str, dataset_ids: Mapping[str, str]) -> str:
    """The Hub id, or `synthetic`, or a local folder's name (its path says nothing to a reader of the card)."""
    hub_id = dataset_hub_id(dataset_name, dataset_ids)
    if hub_id is not None or dataset_name == SYNTHETIC_DATASET_NAME:
        return hub_id or dataset_name
    return Path(dataset_name).expanduser().name


def dataset_display_name(dataset_name: str, dataset_ids: Mapping[str, str]) -> str:
    if dataset_name == SYNTHETIC_DATASET_NAME and dataset_name not in dataset_ids:
        return SYNTHETIC_DATASET_DISPLAY_NAME
    return dataset_short_name(dataset_name, dataset_ids)


def percent(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.2f}"


def base_model_id(recipe: Mapping[str, Any] | None, backbone: str) -> str | None:
    """The Hub id of the weights training started from: a saved model's Hub id, or the timm backbone's ImageNet
    weights; `None` when the backbone was trained from scratch or the recipe is unknown."""
    if recipe is None:
        return None
    model_recipe = recipe.get("model", {})
    start = model_recipe.get("model_name_or_path")
    if start:
        return None if is_local_path(start) else start
    if not (model_recipe.get("pretrained_backbone") or model_recipe.get("pretrained_backbone_file")):
        return None
    try:
        return timm.models.get_pretrained_cfg(backbone).hf_hub_id
    except (AttributeError, RuntimeError):
        return None


def _split_fields(recipe: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Every recorded field that identifies the labelled split (hashes and fingerprints, wherever they are)."""
    sections = [recipe, recipe.get("data", {}), recipe.get("split", {})]
    fields: dict[str, str] = {}  # value -> first key: the same hash recorded twice is shown once
    for section in sections:
        if not isinstance(section, Mapping):
            continue
        for key, value in section.items():
            if SPLIT_IDENTITY_WORDS & set(key.lower().split("_")) and value not in (None, ""):
                fields.setdefault(value, key)
    return [(key, value) for value, key in fields.items()]


def widget_examples(repo_id: str | None, example_images: Sequence[str]) -> list[dict[str, str]]:
    """The card's `widget` entries: the URL of each example image in the model repository (the widget needs URLs)."""
    if example_images and repo_id is None:
        raise ValueError("Example images for the widget need the `repo_id` whose files they are.")
    return [
        {
            "src": f"{constants.ENDPOINT}/{repo_id}/resolve/main/{name}",
            "example_title": Path(name).stem.replace("_", " "),
        }
        for name in example_images
    ]


def _evaluation_values(evaluation: MeasuredEvaluation, dataset_ids: Mapping[str, str]) -> dict[str, Any]:
    """What the template shows of one evaluation: its protocol, dataset, counts and metrics in percent."""
    return {
        "branch": evaluation.branch,
        "protocol": evaluation.protocol,
        "eval_size": evaluation.eval_size,
        "max_samples": evaluation.max_samples,
        "dataset": dataset_display_name(evaluation.dataset, dataset_ids),
        "split": evaluation.split,
        "num_images": evaluation.num_images,
        "source": evaluation.source,
        **{name: percent(evaluation.metrics.get(name)) for name in SUMMARY_METRICS},
    }


def _recipe_values(recipe: Mapping[str, Any] | None, dataset_ids: Mapping[str, str]) -> dict[str, Any]:
    """The recipe's sections and what the template derives from them: dataset names, file names, batch sizes."""
    if recipe is None:
        return {"recipe": None, "model": {}, "data": {}, "training": {}}
    model_recipe, data, training = recipe.get("model", {}), recipe.get("data", {}), recipe.get("training", {})
    world_size = recipe.get("world_size", 1)
    accumulation = training.get("gradient_accumulation_steps", 1)
    backbone_file = model_recipe.get("pretrained_backbone_file")
    labeled_ids_file = data.get("labeled_ids_file")
    unlabeled_dataset = data.get("unlabeled_dataset_name")
    if unlabeled_dataset:
        unlabeled_dataset = dataset_display_name(unlabeled_dataset, dataset_ids)
    return {
        "recipe": recipe,
        "model": model_recipe,
        "data": data,
        "training": training,
        "backbone_weights_file": Path(backbone_file).name if backbone_file else None,
        "labeled_ids_file": Path(labeled_ids_file).name if labeled_ids_file else None,
        "unlabeled_dataset": unlabeled_dataset,
        "split_fields": _split_fields(recipe),
        "world_size": world_size,
        "gradient_accumulation_steps": accumulation,
        "total_batch_size": training.get("per_device_train_batch_size", 0) * world_size * accumulation,
        "crop_size": size_pair(data["crop_size"], "crop_size") if "crop_size" in data else None,
        "lr_scheduler_kwargs_json": json.dumps(training.get("lr_scheduler_kwargs")),
    }


def render_model_card(
    model_dir: str | Path,
    repo_id: str | None = None,
    results_files: Sequence[str | Path] = (),
    dataset_id: str | None = None,
    config: CPSConfig | None = None,
    template_path: str | Path | None = None,
    example_images: Sequence[str] = (),
) -> ModelCard:
    """
    Renders the card of a saved CPS model from the files of its run.

    Args:
        model_dir (`str` or `Path`):
            The saved model: `config.json` (unless `config` is given) and, when present, `cps_recipe.json`,
            `eval_results.json` and evaluation reports of `scripts/evaluate_cps.py` (any `*.json`).
        repo_id (`str`, *optional*):
            The Hub id the card is for; names the model and its usage example (default: the folder).
        results_files (`Sequence`, *optional*):
            More evaluation reports of `scripts/evaluate_cps.py` (kept outside the folder).
        dataset_id (`str`, *optional*):
            The Hub id of the training dataset when the run read a local copy of it (the metadata's `datasets` and
            `model-index` then name it).
        config (`CPSConfig`, *optional*):
            The model's configuration (default: read from `model_dir`).
        template_path (`str` or `Path`, *optional*):
            A Jinja template (default: `cps_hf/templates/model_card.md`); besides the card it defines the macro
            `protocol_description(evaluation)` that names each evaluation in the metadata.
        example_images (`Sequence[str]`, *optional*):
            Names of example images uploaded with the model: the `widget` metadata shows them on the model page
            (needs `repo_id`).

    Returns:
        `ModelCard`: the card; `card.data` holds the metadata, including one `model-index` entry per measured mIoU.
    """
    model_dir = Path(model_dir)
    config = config if config is not None else CPSConfig.from_pretrained(model_dir)
    recipe = read_recipe(model_dir)
    training_dataset = str((recipe or {}).get("data", {}).get("dataset_name") or SYNTHETIC_DATASET_NAME)
    dataset_ids = {training_dataset: dataset_id} if dataset_id else {}
    evaluations = collect_evaluations(model_dir, config, recipe, results_files)
    model_name = repo_id.split("/")[-1] if repo_id else model_dir.resolve().name
    training = (recipe or {}).get("training", {})
    supervised_only = bool(training.get("supervised_only"))
    base_model = base_model_id(recipe, config.backbone)
    class_names = [str(config.id2label[index]) for index in sorted(config.id2label, key=int)]
    evaluation_values = [_evaluation_values(evaluation, dataset_ids) for evaluation in evaluations]
    values = {
        **_recipe_values(recipe, dataset_ids),
        "base_model": base_model,
        "model_name": model_name,
        "repo_id": repo_id or str(model_dir),
        "dataset": dataset_display_name(training_dataset, dataset_ids),
        "trained_on_synthetic": training_dataset == SYNTHETIC_DATASET_NAME,
        "supervised_only": supervised_only,
        "num_branches": config.num_branches,
        "share_backbone_initialization": config.share_backbone_initialization,
        "backbone": config.backbone,
        "output_stride": config.output_stride,
        "num_labels": config.num_labels,
        "ignore_index": config.semantic_loss_ignore_index,
        "class_names": class_names,
        "inference_branch": config.inference_branch,
        "recipe_file_name": RECIPE_FILE_NAME,
        "evaluations": evaluation_values,
        "per_class_rows": [
            (name, [percent(evaluation.metrics.get(f"iou_{name}")) for evaluation in evaluations])
            for name in class_names
        ],
    }
    template = jinja2.Template(Path(template_path or MODEL_CARD_TEMPLATE).read_text(encoding="utf-8"))
    template_macros = template.make_module(values)  # to name the evaluations in the metadata

    tags = [*CARD_TAGS, config.backbone]
    if supervised_only:
        tags[tags.index("cross-pseudo-supervision")] = "supervised-baseline"
    if training.get("cutmix"):
        tags.append("cutmix")
    eval_results = []
    for evaluation, shown in zip(evaluations, evaluation_values):
        if evaluation.metrics.get("mean_iou") is None:
            continue
        protocol_text = str(template_macros.protocol_description(shown))
        eval_results.append(
            EvalResult(
                task_type=TASK_TYPE,
                task_name=TASK_NAME,
                dataset_type=dataset_short_name(evaluation.dataset, dataset_ids),
                dataset_name=dataset_display_name(evaluation.dataset, dataset_ids),
                dataset_split=evaluation.split,
                metric_type="mean_iou",
                metric_name=f"mIoU (%), {protocol_text}",
                metric_value=round(100 * evaluation.metrics["mean_iou"], 2),
                metric_config=protocol_text,
            )
        )
    hub_datasets = sorted(
        {
            hub_id
            for name in {training_dataset} | {e.dataset for e in evaluations}
            if (hub_id := dataset_hub_id(name, dataset_ids))
        }
    )
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license="apache-2.0",
        tags=tags,
        datasets=hub_datasets or None,
        base_model=base_model,
        metrics=["mean_iou"],
        eval_results=eval_results or None,
        widget=widget_examples(repo_id, example_images) or None,
    )
    return ModelCard(template.render(card_data=card_data.to_yaml(), **values))


def write_model_card(output_dir: str | Path, config: CPSConfig | None = None, **card_kwargs: Any) -> Path:
    """Renders the card of the model saved in `output_dir` ([`render_model_card`]) and writes it to
    `output_dir/README.md`."""
    path = Path(output_dir) / "README.md"
    render_model_card(output_dir, config=config, **card_kwargs).save(path)
    return path


__all__ = [
    "MODEL_CARD_TEMPLATE",
    "MeasuredEvaluation",
    "collect_evaluations",
    "read_evaluation_report",
    "render_model_card",
    "write_model_card",
]
