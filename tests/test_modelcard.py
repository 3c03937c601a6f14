"""Model cards: metadata, model-index against the results files, recipe rows, cards without recipe or results."""

import json
import re

import pytest
import yaml
from helpers import save_tiny_model, save_tiny_run
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import load_file, save_file

from cps_hf.data.synthetic import SYNTHETIC_CLASS_NAMES
from cps_hf.modelcard import render_model_card, weights_sha256


def card_metadata(card: ModelCard) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


def test_card_metadata_is_valid_and_round_trips(tmp_path):
    run = save_tiny_run(tmp_path / "run")
    card = render_model_card(run, repo_id="my-org/tiny-cps")
    metadata = card_metadata(card)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-segmentation"
    assert metadata["license"] == "apache-2.0"
    assert {"semantic-segmentation", "semi-supervised", "cross-pseudo-supervision", "test_resnet"} <= set(
        metadata["tags"]
    )
    # Trained from scratch on the built-in data: no base model, no Hub dataset to link.
    assert "base_model" not in metadata and "datasets" not in metadata
    assert metadata["model-index"][0]["name"] == "tiny-cps"
    # Strict parsing (errors are not ignored) of what the Hub would read back.
    ModelCardData(**metadata, ignore_metadata_errors=False)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()
    assert str(loaded) == str(card)
    assert len(loaded.data.eval_results) == 4


def test_model_index_holds_every_measured_miou_with_its_protocol(tmp_path):
    run = save_tiny_run(tmp_path / "run")
    card = render_model_card(run, repo_id="my-org/tiny-cps")
    trainer_results = json.loads((run / "eval_results.json").read_text())
    report = json.loads((run / "eval_slide.json").read_text())
    expected = [
        (round(100 * trainer_results["eval_mean_iou"], 2), "branch 0, whole image, single scale, no flip")
    ]
    expected += [
        (round(100 * report["results"][branch]["mean_iou"], 2), protocol)
        for branch, protocol in (
            ("branch_0", "branch 0, sliding window 16×16, stride 11×11, single scale, horizontal flip"),
            ("branch_1", "branch 1, sliding window 16×16, stride 11×11, single scale, horizontal flip"),
            (
                "ensemble",
                "ensemble (mean softmax of the 2 branches), sliding window 16×16, stride 11×11, single scale, horizontal flip",
            ),
        )
    ]
    results = card.data.eval_results
    assert [(result.metric_value, result.metric_config) for result in results] == expected
    for result in results:
        assert result.task_type == "image-segmentation" and result.metric_type == "mean_iou"
        assert result.dataset_type == "synthetic" and result.dataset_split == "validation"
    # The body's tables show the same numbers, per class too ("–" for a class absent from prediction and truth).
    text = card.text
    assert "**48.25**" in text and "**42.17**" in text
    background_row = next(line for line in text.splitlines() if line.startswith("| background |"))
    assert background_row == "| background | 91.00 | 41.25 | 40.36 | 42.17 |"
    square_row = next(
        line for line in text.splitlines() if line.startswith(f"| {SYNTHETIC_CLASS_NAMES[2]} |")
    )
    assert square_row.split(" | ")[1] == "–"


def test_same_measurement_in_two_files_is_reported_once(tmp_path):
    run = save_tiny_run(tmp_path / "run")
    trainer_results = json.loads((run / "eval_results.json").read_text())
    whole = {
        "model": str(run),
        "dataset": "synthetic",
        "split": "validation",
        "num_images": 4,
        "protocol": {"mode": "whole", "crop_size": None, "stride": None, "scales": [1.0], "flip": False},
        "results": {"branch_0": {key.removeprefix("eval_"): value for key, value in trainer_results.items()}},
    }
    extra = tmp_path / "whole.json"
    extra.write_text(json.dumps(whole))
    card = render_model_card(run, results_files=[extra])
    assert len(card.data.eval_results) == 4
    assert "| 4 | **48.25** |" in card.text and "eval_results.json, whole.json" in card.text


def test_recipe_rows_come_from_the_recipe(tmp_path):
    run = save_tiny_run(
        tmp_path / "run",
        data_overrides={"labeled_fraction": None, "labeled_ids_file": "/data/splits/labeled_1-8.txt"},
        training_overrides={"cutmix": True, "cps_weight": 5.0, "max_steps": 44600},
    )
    recipe = json.loads((run / "cps_recipe.json").read_text())
    recipe["data"]["labeled_ids_sha256"] = "f" * 64
    (run / "cps_recipe.json").write_text(json.dumps(recipe))
    text = render_model_card(run).text
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", text, flags=re.MULTILINE))
    assert rows["variant"] == "CPS + CutMix"
    assert rows["CPS weight λ"] == "5" and rows["CutMix"] == "yes" and rows["iterations"] == "44600"
    assert rows["labelled subset"] == "ids file `labeled_1-8.txt`"
    assert rows["labeled ids sha256"] == f"`{'f' * 64}`"
    assert rows["split fingerprint"].startswith("`0123456789abcdef`")
    assert rows["images"] == "4 labelled / 12 unlabelled"
    assert rows["batch"].endswith("= 2 labelled + 2 unlabelled per iteration")
    assert rows["crop"].startswith("24×24") and "colour jitter" not in rows["crop"]
    assert rows["learning rate"].startswith("0.01, schedule `polynomial`")
    assert rows["backbone weights"] == "none: trained from scratch"


def test_colour_jitter_is_listed_with_the_augmentation(tmp_path):
    run = save_tiny_run(tmp_path / "run", data_overrides={"color_jitter": [0.4, 0.4, 0.4, 0.1]})
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", render_model_card(run).text, flags=re.MULTILINE))
    assert rows["crop"].endswith(
        "horizontal flip, colour jitter (brightness, contrast, saturation, hue) 0.4, 0.4, 0.4, 0.1"
    )


def test_a_streamed_unlabelled_pool_is_named_without_a_count(tmp_path):
    run = save_tiny_run(
        tmp_path / "run",
        data_overrides={
            "unlabeled_dataset_name": "my-org/street-scenes",
            "unlabeled_streaming": True,
            "unlabeled_shuffle_buffer_size": 1000,
        },
    )
    recipe = json.loads((run / "cps_recipe.json").read_text())
    recipe["num_unlabeled"] = None  # the pool's size is not recorded by the dataset
    (run / "cps_recipe.json").write_text(json.dumps(recipe))
    text = render_model_card(run).text
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", text, flags=re.MULTILINE))
    assert rows["images"] == "4 labelled / a stream of unlabelled"
    assert rows["unlabelled data"].endswith("split `train`, streamed (shuffled in blocks of 1000 rows)")
    assert (
        "a streamed pool of unlabelled images (my-org/street-scenes)" in text
        and "None unlabelled" not in text
    )


def test_pretrained_backbone_and_hub_dataset_metadata(tmp_path):
    run = save_tiny_run(
        tmp_path / "run",
        data_overrides={"dataset_name": "my-org/street-scenes"},
        model_overrides={"pretrained_backbone": True},
    )
    metadata = card_metadata(render_model_card(run))
    assert metadata["base_model"] == "timm/test_resnet.r160_in1k"
    # The trainer's evaluation is on the Hub dataset; the report was made on the synthetic data.
    assert metadata["datasets"] == ["my-org/street-scenes"]
    datasets = {result["dataset"]["type"] for result in metadata["model-index"][0]["results"]}
    assert datasets == {"my-org/street-scenes", "synthetic"}


def test_local_dataset_folder_is_named_not_linked(tmp_path):
    local = tmp_path / "data" / "camvid"
    local.mkdir(parents=True)
    run = save_tiny_run(tmp_path / "run", data_overrides={"dataset_name": str(local)})
    card = render_model_card(run, repo_id="my-org/tiny-cps")
    metadata = card_metadata(card)
    assert "datasets" not in metadata
    assert metadata["model-index"][0]["results"][0]["dataset"]["name"] == "camvid"
    assert str(local) not in str(card)
    linked = card_metadata(render_model_card(run, dataset_id="my-org/camvid"))
    assert linked["datasets"] == ["my-org/camvid"]


def test_card_without_recipe_or_results(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    card = render_model_card(model_dir, repo_id="my-org/untrained")
    assert "model-index" not in card_metadata(card)
    assert "The training recipe was not recorded" in card.text
    assert "No evaluation results were recorded" in card.text
    assert "| None |" not in card.text and "{{" not in card.text


def test_leftover_trainer_results_are_not_reported(tmp_path):
    run = save_tiny_run(tmp_path / "run", data_overrides={"eval_split": None})
    results = render_model_card(run).data.eval_results
    assert [result.metric_config.split(",")[1].strip() for result in results] == ["sliding window 16×16"] * 3


def test_report_of_other_weights_is_refused(tmp_path):
    run = save_tiny_run(tmp_path / "run")
    report = json.loads((run / "eval_slide.json").read_text())
    report["weights_sha256"] = weights_sha256(run)
    (run / "eval_slide.json").write_text(json.dumps(report))
    assert len(render_model_card(run).data.eval_results) == 4
    external = tmp_path / "elsewhere.json"
    external.write_text(json.dumps(report))
    weights = load_file(run / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save_file(weights, run / "model.safetensors", metadata={"format": "pt"})
    # In the folder: left out with a warning; given explicitly: an error.
    assert len(render_model_card(run).data.eval_results) == 1
    with pytest.raises(ValueError, match="evaluated other weights"):
        render_model_card(run, results_files=[external])
