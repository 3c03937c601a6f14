"""Model cards for CPS checkpoints, rendered with `huggingface_hub.ModelCard.from_template` from the template
`cps_hf/templates/model_card.md` and filled only from a run's own files: `config.json`, `cps_recipe.json`, the
Trainer's `eval_results.json` and the reports of `scripts/evaluate_cps.py`."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants
from transformers.utils import logging

from .configuration_cps import CPSConfig
from .data.synthetic import SYNTHETIC_DATASET_NAME

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

CPS_CITATION = """@inproceedings{chen2021semi,
  title     = {Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision},
  author    = {Chen, Xiaokang and Yuan, Yuhui and Zeng, Gang and Wang, Jingdong},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2021}
}"""


@dataclass
class MeasuredEvaluation:
    """
    One measured evaluation: one branch (or the ensemble) of the model on one dataset split under one inference
    protocol, as read from a results file.

    Args:
        dataset (`str`): the dataset as the run named it (`"synthetic"`, a local folder or a Hub id).
        split (`str`, *optional*): the evaluated split.
        branch (`str`): `"branch_<i>"` or `"ensemble"`.
        protocol (`dict`): `mode`, `crop_size`, `stride`, `scales`, `flip`, and when known `eval_size` and
            `max_samples`.
        metrics (`dict`): `mean_iou`, `overall_accuracy`, `mean_accuracy` and `iou_<class name>`, as fractions
            (`None` for a class absent from predictions and labels).
        num_images (`int`, *optional*): how many images were scored, when the results file says.
        source (`str`): the name of the results file.
    """

    dataset: str
    split: str | None
    branch: str
    protocol: dict[str, Any]
    metrics: dict[str, float | None]
    num_images: int | None
    source: str

    def identity(self) -> tuple:
        """What makes two evaluations the same measurement (the same numbers read from two files)."""
        return (
            self.dataset,
            self.split,
            self.branch,
            json.dumps(self.protocol, sort_keys=True),
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


def branch_name(inference_branch: int | str) -> str:
    return "ensemble" if inference_branch == "ensemble" else f"branch_{int(inference_branch)}"


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
    protocol = {
        "mode": "whole",
        "crop_size": None,
        "stride": None,
        "scales": [1.0],
        "flip": False,
        "eval_size": data.get("eval_size"),
        "max_samples": data.get("max_eval_samples"),
    }
    return MeasuredEvaluation(
        dataset=str(data.get("dataset_name") or SYNTHETIC_DATASET_NAME),
        split=data.get("eval_split"),
        branch=branch_name(config.inference_branch),
        protocol=protocol,
        metrics=metrics,
        num_images=None,
        source=path.name,
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
    protocol = dict(report["protocol"])
    protocol.setdefault("eval_size", report.get("eval_size"))
    protocol.setdefault("max_samples", report.get("max_samples"))
    return [
        MeasuredEvaluation(
            dataset=str(report.get("dataset")),
            split=report.get("split"),
            branch=branch,
            protocol=protocol,
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


def is_local_path(name: str) -> bool:
    """Whether a dataset or model name is a local path rather than a Hub id (which has at most one `/`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


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
        return "cps_hf synthetic shapes"
    return dataset_short_name(dataset_name, dataset_ids)


def percent(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.2f}"


def _size_text(size: Any) -> str:
    height, width = (size, size) if isinstance(size, int) else size
    return f"{height}×{width}"


def describe_evaluation(evaluation: MeasuredEvaluation, num_branches: int) -> tuple[str, str]:
    """A short column label (`"branch 0"`, `"ensemble, slide 512×512, flip"`) and a full description of the
    inference protocol."""
    protocol = evaluation.protocol
    scales = list(protocol.get("scales") or [1.0])
    if evaluation.branch == "ensemble":
        label, description = "ensemble", [f"ensemble (mean softmax of the {num_branches} branches)"]
    else:
        label = evaluation.branch.replace("_", " ")
        description = [label]
    short = []
    if protocol.get("mode") == "slide":
        short.append(f"slide {_size_text(protocol['crop_size'])}")
        description.append(
            f"sliding window {_size_text(protocol['crop_size'])}, stride {_size_text(protocol['stride'])}"
        )
    else:
        description.append("whole image")
    if scales == [1.0]:
        description.append("single scale")
    else:
        short.append("multi-scale")
        description.append("scales " + ", ".join(f"{scale:g}" for scale in scales))
    if protocol.get("flip"):
        short.append("flip")
        description.append("horizontal flip")
    else:
        description.append("no flip")
    if protocol.get("eval_size"):
        short.append(f"resized {_size_text(protocol['eval_size'])}")
        description.append(f"images resized to {_size_text(protocol['eval_size'])}")
    if protocol.get("max_samples"):
        description.append(f"first {protocol['max_samples']} images")
    return ", ".join([label, *short]), ", ".join(description)


def eval_results_for_card(
    evaluations: Sequence[MeasuredEvaluation], num_branches: int, dataset_ids: Mapping[str, str]
) -> list[EvalResult]:
    """The `model-index` entries: one mIoU (%) per measured evaluation, with its protocol."""
    results = []
    for evaluation in evaluations:
        if evaluation.metrics.get("mean_iou") is None:
            continue
        _, protocol_text = describe_evaluation(evaluation, num_branches)
        results.append(
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
    return results


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


def backbone_initialization_text(recipe: Mapping[str, Any], config: CPSConfig) -> str:
    """How the branches' backbones started: the same weights in each (shared) or one random draw per branch."""
    model_recipe = recipe.get("model", {})
    if model_recipe.get("pretrained_backbone") or model_recipe.get("pretrained_backbone_file"):
        return "the same ImageNet weights in every branch"
    if config.share_backbone_initialization:
        return "one random draw, copied into every branch (`share_backbone_initialization`)"
    return "an independent random draw per branch"


def variant_name(recipe: Mapping[str, Any] | None, num_branches: int) -> str:
    training = (recipe or {}).get("training", {})
    if training.get("supervised_only"):
        return "supervised-only baseline"
    name = "CPS" if num_branches == 2 else f"n-CPS ({num_branches} branches)"
    return f"{name} + CutMix" if training.get("cutmix") else name


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


def recipe_rows(
    recipe: Mapping[str, Any], config: CPSConfig, dataset_ids: Mapping[str, str]
) -> list[tuple[str, str]]:
    """The recipe table: what the run recorded, row by row; rows whose values were not recorded are left out."""
    model_recipe, data, training = recipe.get("model", {}), recipe.get("data", {}), recipe.get("training", {})
    supervised_only = bool(training.get("supervised_only"))
    rows: list[tuple[str, str]] = [("variant", variant_name(recipe, config.num_branches))]

    if model_recipe.get("model_name_or_path"):
        rows.append(("initialised from", f"`{model_recipe['model_name_or_path']}`"))
    elif model_recipe.get("pretrained_backbone_file"):
        rows.append(
            (
                "backbone weights",
                f"ImageNet, local file `{Path(model_recipe['pretrained_backbone_file']).name}`",
            )
        )
    elif model_recipe.get("pretrained_backbone"):
        rows.append(("backbone weights", f"ImageNet (`{base_model_id(recipe, config.backbone)}`)"))
    else:
        rows.append(("backbone weights", "none: trained from scratch"))
    if not model_recipe.get("model_name_or_path") and config.share_backbone_initialization is not None:
        rows.append(("backbone initialisation", backbone_initialization_text(recipe, config)))

    dataset_name = str(data.get("dataset_name") or SYNTHETIC_DATASET_NAME)
    dataset_text = f"{dataset_display_name(dataset_name, dataset_ids)}, split `{data.get('train_split')}`"
    if dataset_name == SYNTHETIC_DATASET_NAME and "synthetic_image_size" in data:
        size = data["synthetic_image_size"]
        dataset_text += (
            f" ({data.get('synthetic_num_train')} training and {data.get('synthetic_num_val')} validation images "
            f"of {size}×{size})"
        )
    rows.append(("training data", dataset_text))
    if data.get("unlabeled_dataset_name"):
        rows.append(
            (
                "unlabelled data",
                f"{dataset_display_name(data['unlabeled_dataset_name'], dataset_ids)}, "
                f"split `{data.get('unlabeled_split')}`",
            )
        )
    if "num_labeled" in recipe:
        counts = f"{recipe['num_labeled']} labelled"
        if not supervised_only:
            counts += f" / {recipe.get('num_unlabeled')} unlabelled"
        rows.append(("images", counts))
    if data.get("labeled_ids_file"):
        split_text = f"ids file `{Path(data['labeled_ids_file']).name}`"
    elif data.get("labeled_fraction") is not None:
        split_text = f"random fraction {data['labeled_fraction']} of the split, seed {data.get('split_seed')}"
    elif data.get("labeled_count") is not None:
        split_text = f"random {data['labeled_count']} rows of the split, seed {data.get('split_seed')}"
    else:
        split_text = "not recorded"
    rows.append(("labelled subset", split_text))
    for key, value in _split_fields(recipe):
        text = f"`{value}`"
        if key == "split_fingerprint":
            text += " (SHA-256 of the sorted labelled row indices, first 16 hex digits)"
        rows.append((key.replace("_", " "), text))

    if not supervised_only and "cps_weight" in training:
        weight_text = f"{training['cps_weight']:g}"
        if training.get("cps_weight_warmup_steps"):
            weight_text += (
                f" (ramped up linearly from 0 over the first {training['cps_weight_warmup_steps']} steps)"
            )
        rows.append(("CPS weight λ", weight_text))
    if not supervised_only:
        rows.append(("CutMix", "yes" if training.get("cutmix") else "no"))
        if training.get("cutmix") and training.get("pseudo_label_mode"):
            rows.append(("BatchNorm mode of the pseudo-label passes", training["pseudo_label_mode"]))
    if training.get("supervised_loss"):
        loss = training["supervised_loss"]
        if loss == "ohem" and "ohem_threshold" in training:
            loss += f" (threshold {training['ohem_threshold']}, at least {training.get('ohem_min_kept')} pixels kept)"
        rows.append(("supervised loss", loss))

    max_steps = training.get("max_steps")
    if max_steps and max_steps > 0:
        rows.append(("iterations", str(max_steps)))
    elif "num_train_epochs" in training:
        rows.append(("epochs", f"{training['num_train_epochs']:g}"))
    if "per_device_train_batch_size" in training:
        per_device = training["per_device_train_batch_size"]
        world_size = recipe.get("world_size", 1)
        accumulation = training.get("gradient_accumulation_steps", 1)
        total = per_device * world_size * accumulation
        batch = f"{per_device} labelled" + ("" if supervised_only else f" + {per_device} unlabelled")
        total_text = f"{total} labelled" + ("" if supervised_only else f" + {total} unlabelled")
        rows.append(
            (
                "batch",
                f"{batch} per device × {world_size} process(es) × {accumulation} accumulation step(s) "
                f"= {total_text} per iteration",
            )
        )
    if "crop_size" in data:
        scales = ", ".join(f"{scale:g}" for scale in data.get("scales", []))
        rows.append(("crop", f"{_size_text(data['crop_size'])}, random scales {scales}, horizontal flip"))
    if "learning_rate" in training:
        schedule = training.get("lr_scheduler_type")
        kwargs = training.get("lr_scheduler_kwargs")
        text = f"{training['learning_rate']:g}"
        if schedule:
            text += f", schedule `{schedule}`" + (f" {json.dumps(kwargs)}" if kwargs else "")
        rows.append(("learning rate", text))
    if "optim" not in training:
        rows.append(
            ("optimiser, schedule, gradient clipping", f"not recorded in this run's {RECIPE_FILE_NAME}")
        )
    if training.get("optim"):
        rows.append(
            (
                "optimiser",
                f"`{training['optim']}`"
                + (f" ({training['optim_args']})" if training.get("optim_args") else ""),
            )
        )
    if "weight_decay" in training:
        rows.append(("weight decay", f"{training['weight_decay']:g} (convolution and linear weights only)"))
    if "max_grad_norm" in training:
        norm = training["max_grad_norm"]
        rows.append(("gradient clipping", f"norm {norm:g}" if norm else "none"))
    if "seed" in training:
        rows.append(("seed", str(training["seed"])))
    return rows


def summary_text(recipe: Mapping[str, Any] | None, config: CPSConfig, dataset_ids: Mapping[str, str]) -> str:
    if recipe is None:
        return "A DeepLabv3+ semantic segmentation model trained with `cps_hf`."
    data = recipe.get("data", {})
    dataset = dataset_display_name(str(data.get("dataset_name") or SYNTHETIC_DATASET_NAME), dataset_ids)
    variant = variant_name(recipe, config.num_branches)
    if variant == "supervised-only baseline":
        return (
            f"The supervised-only baseline of a Cross Pseudo Supervision experiment: DeepLabv3+ trained on the "
            f"{recipe.get('num_labeled')} labelled images of {dataset} alone, through the same code path as CPS "
            "with the CPS term switched off. Compare it with the CPS model trained on the same split."
        )
    return (
        f"A DeepLabv3+ semantic segmentation model trained with Cross Pseudo Supervision ({variant}) on "
        f"{recipe.get('num_labeled')} labelled and {recipe.get('num_unlabeled')} unlabelled images of {dataset}."
    )


def limitations(
    recipe: Mapping[str, Any] | None, config: CPSConfig, dataset_ids: Mapping[str, str]
) -> list[str]:
    data = (recipe or {}).get("data", {})
    dataset_name = str(data.get("dataset_name") or "")
    lines = [
        "Research on semi-supervised semantic segmentation. The numbers above hold for the recorded data, split and "
        "inference protocol only; they were measured on the checkpoint in this repository.",
        f"The model predicts exactly these {config.num_labels} classes: every pixel is assigned one of them, "
        "there is no 'unknown' class.",
    ]
    if dataset_name == SYNTHETIC_DATASET_NAME:
        lines.append(
            "Trained on cps_hf's generated toy dataset (textured shapes on cluttered backgrounds) to demonstrate CPS "
            "on a CPU: it is not meant for real photographs."
        )
    elif dataset_name:
        lines.append(
            f"Trained on {dataset_display_name(dataset_name, dataset_ids)}: expect lower accuracy on images from other "
            "cameras, places or class definitions."
        )
    if recipe is not None and base_model_id(recipe, config.backbone) is None:
        lines.append("The backbone was trained from scratch (no ImageNet weights), which limits accuracy.")
    lines.append(
        "Pseudo-labels come from the model's own predictions: where the initial supervised model is biased, CPS can "
        "reinforce the bias (confirmation bias)."
    )
    return lines


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
            A Jinja template (default: `cps_hf/templates/model_card.md`).
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
    tags = [*CARD_TAGS, config.backbone]
    if supervised_only:
        tags[tags.index("cross-pseudo-supervision")] = "supervised-baseline"
    if training.get("cutmix"):
        tags.append("cutmix")
    eval_results = eval_results_for_card(evaluations, config.num_branches, dataset_ids)
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
        base_model=base_model_id(recipe, config.backbone),
        metrics=["mean_iou"],
        eval_results=eval_results or None,
        widget=widget_examples(repo_id, example_images) or None,
    )

    class_names = [str(config.id2label[index]) for index in sorted(config.id2label, key=int)]
    evaluation_rows = []
    for evaluation in evaluations:
        label, protocol_text = describe_evaluation(evaluation, config.num_branches)
        evaluation_rows.append(
            {
                "label": label,
                "dataset": dataset_display_name(evaluation.dataset, dataset_ids),
                "split": evaluation.split,
                "protocol": protocol_text,
                "num_images": evaluation.num_images if evaluation.num_images is not None else "–",
                "source": evaluation.source,
                **{name: percent(evaluation.metrics.get(name)) for name in SUMMARY_METRICS},
            }
        )
    per_class_rows = [
        (name, [percent(evaluation.metrics.get(f"iou_{name}")) for evaluation in evaluations])
        for name in class_names
    ]
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or MODEL_CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id or str(model_dir),
        summary=summary_text(recipe, config, dataset_ids),
        num_branches=config.num_branches,
        supervised_only=supervised_only,
        backbone=config.backbone,
        output_stride=config.output_stride or "native",
        num_labels=config.num_labels,
        ignore_index=config.semantic_loss_ignore_index,
        class_names=class_names,
        inference_branch=(
            "the ensemble of the branches"
            if config.inference_branch == "ensemble"
            else f"branch {config.inference_branch}"
        ),
        recipe_rows=recipe_rows(recipe, config, dataset_ids) if recipe is not None else [],
        evaluations=evaluation_rows,
        per_class_rows=per_class_rows,
        limitations=limitations(recipe, config, dataset_ids),
        citation=CPS_CITATION,
    )


def write_model_card(output_dir: str | Path, config: CPSConfig | None = None, **card_kwargs: Any) -> Path:
    """Renders the card of the model saved in `output_dir` ([`render_model_card`]) and writes it to
    `output_dir/README.md`."""
    path = Path(output_dir) / "README.md"
    render_model_card(output_dir, config=config, **card_kwargs).save(path)
    return path


__all__ = [
    "CPS_CITATION",
    "MODEL_CARD_TEMPLATE",
    "MeasuredEvaluation",
    "collect_evaluations",
    "read_evaluation_report",
    "render_model_card",
    "write_model_card",
]
