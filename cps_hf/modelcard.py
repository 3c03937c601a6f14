"""Model cards for CPS checkpoints, filled only from a run's own recipe and results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_cps import CPSConfig

CPS_CITATION = """@inproceedings{chen2021semi,
  title     = {Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision},
  author    = {Chen, Xiaokang and Yuan, Yuhui and Zeng, Gang and Wang, Jingdong},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2021}
}"""


def _format_iou(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}"


def _describe_split(recipe: dict[str, Any]) -> str:
    """The labelled split in words: its files and their SHA-256, or its random draw; and its fingerprint."""
    # Recipes written before the `split` entry existed hold the same keys (less the hashes) under `data`.
    split = recipe.get("split") or {**recipe["data"], "fingerprint": recipe["split_fingerprint"]}
    if split.get("labeled_ids_file"):
        text = f"ids file `{split['labeled_ids_file']}` (SHA-256 `{split.get('labeled_ids_file_sha256')}`)"
    elif split.get("labeled_fraction") is not None:
        text = f"random fraction {split['labeled_fraction']}, seed {split['split_seed']}"
    else:
        text = f"random count {split.get('labeled_count')}, seed {split['split_seed']}"
    if split.get("unlabeled_ids_file"):
        text += (
            f"; unlabelled ids file `{split['unlabeled_ids_file']}` "
            f"(SHA-256 `{split.get('unlabeled_ids_file_sha256')}`)"
        )
    return f"{text}; fingerprint `{split['fingerprint']}`"


def render_model_card(
    config: CPSConfig, recipe: dict[str, Any], results: dict[str, Any], model_name: str
) -> ModelCard:
    """
    Renders the card of a trained model.

    Args:
        config (`CPSConfig`): the model's configuration.
        recipe (`dict`): what the run did (the `cps_recipe.json` written next to the model).
        results (`dict`): the run's metrics (`eval_mean_iou`, `eval_iou_<class>`, ...), as measured.
        model_name (`str`): the name the card gives the model.
    """
    data, training = recipe["data"], recipe["training"]
    dataset_name = data["dataset_name"]
    eval_split = data.get("eval_split")
    variant = (
        "supervised-only baseline"
        if training["supervised_only"]
        else ("CPS + CutMix" if training["cutmix"] else "CPS")
    )
    branch = config.inference_branch
    protocol = "whole image, single scale, no flip, " + (
        "ensemble of all branches" if branch == "ensemble" else f"branch {branch}"
    )
    eval_results = []
    if "eval_mean_iou" in results:
        eval_results.append(
            EvalResult(
                task_type="image-segmentation",
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split=eval_split,
                metric_type="mean_iou",
                metric_name="mIoU",
                metric_value=round(100 * results["eval_mean_iou"], 2),
                metric_config=protocol,
            )
        )
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license="apache-2.0",
        tags=[
            "cps_hf",
            "semantic-segmentation",
            "semi-supervised",
            "cross-pseudo-supervision",
            "deeplabv3plus",
        ],
        datasets=[dataset_name] if dataset_name else None,
        base_model=f"timm/{config.backbone}" if recipe["model"].get("pretrained_backbone") else None,
        metrics=["mean_iou"],
        eval_results=eval_results or None,
    )
    per_class = "\n".join(
        f"| {name} | {_format_iou(results.get(f'eval_iou_{name}'))} |" for name in config.id2label.values()
    )
    summary_rows = "\n".join(
        f"| {label} | {value} |"
        for label, value in (
            ("mIoU (%)", _format_iou(results.get("eval_mean_iou"))),
            ("pixel accuracy (%)", _format_iou(results.get("eval_overall_accuracy"))),
            ("mean class accuracy (%)", _format_iou(results.get("eval_mean_accuracy"))),
        )
    )
    content = f"""---
{card_data.to_yaml()}
---

# {model_name}

A semantic segmentation model trained with **Cross Pseudo Supervision** ({variant}) with
`cps_hf`. CPS trains {config.num_branches} DeepLabv3+ networks of identical structure
from different head initialisations; each network learns from the ground truth on labelled images and from
the other network's one-hot (argmax) predictions on unlabelled images.

## Recipe (from the run's own `cps_recipe.json`)

| item | value |
|---|---|
| backbone | `{config.backbone}` (output stride {config.output_stride}), ImageNet-pretrained: {recipe["model"].get("pretrained_backbone")} |
| dataset | `{dataset_name}`, train split `{data["train_split"]}` |
| labelled / unlabelled images | {recipe["num_labeled"]} / {recipe["num_unlabeled"]} |
| labelled split | {_describe_split(recipe)} |
| variant | {variant} |
| CPS weight λ | {0 if training["supervised_only"] else training["cps_weight"]} |
| supervised loss | {training["supervised_loss"]} |
| iterations | {training["max_steps"] if training["max_steps"] and training["max_steps"] > 0 else f"{training['num_train_epochs']} epochs"} |
| batch per device (labelled + unlabelled) | {training["per_device_train_batch_size"]} + {0 if training["supervised_only"] else training["per_device_train_batch_size"]}, {recipe["world_size"]} process(es), gradient accumulation {training["gradient_accumulation_steps"]} |
| crop | {data["crop_size"]}, scales {data["scales"]} |
| optimiser | SGD momentum 0.9, lr {training["learning_rate"]} with poly decay (power 0.9), weight decay {training["weight_decay"]} on conv weights |
| seed | {training["seed"]} |

## Evaluation

Split `{eval_split}`, protocol: {protocol}. Classes absent from both prediction and ground truth are left
out of the mean.

| metric | value |
|---|---|
{summary_rows}

| class | IoU (%) |
|---|---|
{per_class}

## How to use

```python
import cps_hf  # registers the model with the Auto classes
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="path/or/hub-id")
masks = segmenter("image.png")  # one mask per predicted class, with class names
```

Without installing `cps_hf`: `AutoModelForSemanticSegmentation.from_pretrained(path, trust_remote_code=True)`.

## Intended use and limitations

Research on semi-supervised semantic segmentation. The numbers above hold for this dataset, split and protocol
only; they were measured by the training run that produced these weights.

## Citation

```bibtex
{CPS_CITATION}
```
"""
    return ModelCard(content)


def write_model_card(
    output_dir: str | Path, config: CPSConfig, recipe: dict[str, Any], results: dict[str, Any]
) -> Path:
    """Renders the card and writes it to `output_dir/README.md`."""
    output_dir = Path(output_dir)
    card = render_model_card(config, recipe, results, model_name=output_dir.name)
    path = output_dir / "README.md"
    card.save(path)
    return path


__all__ = ["CPS_CITATION", "render_model_card", "write_model_card"]
