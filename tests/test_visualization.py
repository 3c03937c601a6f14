import json
import math
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import run_script, save_tiny_model
from PIL import Image as PILImage

from cps_hf import CPSForSemanticSegmentation
from cps_hf.data import decode_mask, load_segmentation_dataset
from cps_hf.data.synthetic import SYNTHETIC_CLASS_NAMES, make_synthetic_segmentation_dataset
from cps_hf.inference import load_image_normalization, predict_segmentation
from cps_hf.visualization import IGNORE_COLOR, segmentation_palette
from tools.figures import (
    _RUN_COLORS,
    GridLayout,
    load_iou_results,
    load_log_history,
    parse_named_paths,
    per_class_iou_chart,
    qualitative_grid,
    read_class_names,
    select_sample_indices,
    training_curves,
)

pytest.importorskip("matplotlib")

NUM_LABELS = len(SYNTHETIC_CLASS_NAMES)
PALETTE = segmentation_palette(NUM_LABELS)

# Images of (height, width) = (20, 30) in cells of height 40: scaled exactly 2x into 60 x 40 cells.
LAYOUT = GridLayout(cell_height=40, margin=5, gap=3, title_height=20)
CELL_WIDTH = 60


def palette_color(class_id: int) -> tuple[int, int, int]:
    return tuple(PALETTE[3 * class_id : 3 * class_id + 3])


def hex_color(color: str) -> tuple[int, int, int]:
    return tuple(int(color[index : index + 2], 16) for index in (1, 3, 5))


def distinct_colors(image: PILImage.Image) -> set[tuple[int, int, int]]:
    return {tuple(color) for color in np.asarray(image).reshape(-1, 3).tolist()}


def grid_inputs(num_samples: int, num_models: int):
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[...] = (10, 200, 30)
    ground_truth = np.ones((20, 30), dtype=np.int64)
    ground_truth[:, 15:] = 2
    ground_truth[:4] = 255
    prediction = np.full((20, 30), 3, dtype=np.int64)
    images = [image] * num_samples
    ground_truths = [ground_truth] * num_samples
    predictions = {f"model {index}": [prediction] * num_samples for index in range(num_models)}
    return images, ground_truths, predictions


# --------------------------------------------------------------------------------------------------------------
# Qualitative grid
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples, num_models", [(1, 1), (2, 1), (3, 2), (2, 0)])
def test_grid_size_follows_the_layout(num_samples, num_models):
    grid = qualitative_grid(*grid_inputs(num_samples, num_models), PALETTE, legend="none", layout=LAYOUT)
    num_columns = num_models + 2
    assert grid.mode == "RGB"
    assert grid.size == (
        2 * 5 + num_columns * CELL_WIDTH + (num_columns - 1) * 3,
        2 * 5 + 20 + num_samples * 40 + (num_samples - 1) * 3,
    )
    with_titles = qualitative_grid(
        *grid_inputs(num_samples, num_models),
        PALETTE,
        row_titles=[f"id {index}" for index in range(num_samples)],
        legend="none",
        layout=LAYOUT,
    )
    assert with_titles.size == (grid.width + LAYOUT.row_title_width, grid.height)


def test_grid_legend_adds_whole_rows_below_the_cells():
    without_legend = qualitative_grid(
        *grid_inputs(2, 2), PALETTE, SYNTHETIC_CLASS_NAMES, legend="none", layout=LAYOUT
    )
    two_rows = qualitative_grid(
        *grid_inputs(2, 2), PALETTE, SYNTHETIC_CLASS_NAMES, legend="all", layout=LAYOUT
    )
    three_rows = qualitative_grid(
        *grid_inputs(3, 2), PALETTE, SYNTHETIC_CLASS_NAMES, legend="all", layout=LAYOUT
    )
    assert three_rows.size == (two_rows.width, two_rows.height + 40 + 3)
    assert two_rows.width == without_legend.width
    legend_height = two_rows.height - without_legend.height - LAYOUT.legend_gap
    assert legend_height > 0 and legend_height % LAYOUT.legend_row_height == 0
    # Without class names "all" means ids 0..3 (the largest present) and "ignored", not 256 entries.
    ids_legend = qualitative_grid(*grid_inputs(2, 2), PALETTE, legend="all", layout=LAYOUT)
    assert ids_legend.height <= without_legend.height + LAYOUT.legend_gap + 2 * LAYOUT.legend_row_height


def test_grid_cells_show_the_image_and_the_palette_colours_of_the_masks():
    grid = np.asarray(
        qualitative_grid(*grid_inputs(2, 1), PALETTE, SYNTHETIC_CLASS_NAMES, legend="present", layout=LAYOUT)
    )
    column_lefts = [5 + column * (CELL_WIDTH + 3) for column in range(3)]
    for row in range(2):
        top = 5 + 20 + row * (40 + 3)
        image_left, truth_left, prediction_left = column_lefts
        assert tuple(grid[top + 20, image_left + 30]) == (10, 200, 30)
        assert tuple(grid[top + 20, truth_left + 10]) == palette_color(1)
        assert tuple(grid[top + 20, truth_left + 50]) == palette_color(2)
        assert tuple(grid[top + 2, truth_left + 30]) == IGNORE_COLOR  # label 255
        assert tuple(grid[top + 20, prediction_left + 30]) == palette_color(3)
    # The legend (below the cells) shows the classes present, "ignored", and no absent class.
    legend_colors = {tuple(color) for color in grid[5 + 20 + 2 * 40 + 3 :].reshape(-1, 3).tolist()}
    assert {palette_color(1), palette_color(2), palette_color(3), IGNORE_COLOR} <= legend_colors
    assert palette_color(4) not in legend_colors


def test_grid_accepts_tensors_and_pil_images():
    images, ground_truths, predictions = grid_inputs(1, 1)
    from_tensors = qualitative_grid(
        [torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255.0],
        [torch.from_numpy(ground_truths[0])],
        {"model 0": [PILImage.fromarray(predictions["model 0"][0].astype(np.uint8))]},
        PALETTE,
        legend="none",
        layout=LAYOUT,
    )
    from_arrays = qualitative_grid(images, ground_truths, predictions, PALETTE, legend="none", layout=LAYOUT)
    np.testing.assert_array_equal(np.asarray(from_tensors), np.asarray(from_arrays))


def test_grid_rejects_inconsistent_inputs():
    images, ground_truths, predictions = grid_inputs(2, 2)
    with pytest.raises(ValueError, match="ground_truths"):
        qualitative_grid(images, ground_truths[:1], predictions, PALETTE)
    with pytest.raises(ValueError, match="model 1"):
        qualitative_grid(
            images, ground_truths, {**predictions, "model 1": predictions["model 1"][:1]}, PALETTE
        )
    with pytest.raises(ValueError, match="row_titles"):
        qualitative_grid(images, ground_truths, predictions, PALETTE, row_titles=["only one"])
    with pytest.raises(ValueError, match="empty"):
        qualitative_grid([], [], {}, PALETTE)
    with pytest.raises(ValueError, match=r"\(10, 30\)"):
        qualitative_grid(images, [mask[:10] for mask in ground_truths], predictions, PALETTE)
    with pytest.raises(ValueError, match=r"class ids \[3\]"):  # predictions hold class 3 of 3 classes
        qualitative_grid(images, ground_truths, predictions, PALETTE, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="legend"):
        qualitative_grid(images, ground_truths, predictions, PALETTE, legend="some")


def test_figures_need_matplotlib(monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install cps_hf\[plots\]"):
        qualitative_grid(*grid_inputs(1, 1), PALETTE)


# --------------------------------------------------------------------------------------------------------------
# Per-class IoU chart
# --------------------------------------------------------------------------------------------------------------

CLASS_NAMES = ["background", "disc", "square"]


def test_iou_chart_draws_one_colour_per_model():
    results = {
        "supervised-only": {"background": 0.9, "disc": 0.4, "square": 0.3},
        "CPS": {"background": 0.92, "disc": 0.55, "square": None},  # None: class absent, no bar
    }
    chart = per_class_iou_chart(results, CLASS_NAMES, title="Demo")
    assert chart.mode == "RGB" and chart.width >= 600 and chart.height >= 400
    colors = distinct_colors(chart)
    assert len(colors) > 20
    assert {hex_color(_RUN_COLORS[0]), hex_color(_RUN_COLORS[1])} <= colors
    wider = per_class_iou_chart(
        {name: {f"class {index}": 0.5 for index in range(30)} for name in results},
        [f"class {index}" for index in range(30)],
    )
    assert wider.width > chart.width


def test_iou_chart_rejects_unknown_classes_and_percentages():
    with pytest.raises(ValueError, match="'squares'"):
        per_class_iou_chart({"CPS": {"background": 0.9, "squares": 0.2}}, CLASS_NAMES)
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\], got 55.0"):
        per_class_iou_chart({"CPS": {"disc": 55.0}}, CLASS_NAMES)
    with pytest.raises(ValueError, match="empty"):
        per_class_iou_chart({}, CLASS_NAMES)
    with pytest.raises(ValueError, match="duplicates"):
        per_class_iou_chart({"CPS": {"disc": 0.5}}, ["disc", "disc"])


def write_trainer_results(folder: Path, class_ious: dict[str, float]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {f"eval_iou_{name}": value for name, value in sorted(class_ious.items())}
    metrics.update(eval_mean_iou=float(np.mean(list(class_ious.values()))), eval_loss=0.5, epoch=3.0)
    (folder / "eval_results.json").write_text(json.dumps(metrics))
    return folder / "eval_results.json"


def write_evaluate_results(path: Path) -> Path:
    branch = {
        "mean_iou": 0.5,
        "overall_accuracy": 0.9,
        "iou_background": 0.9,
        "iou_disc": 0.6,
        "iou_square": None,
    }
    report = {"model": "m", "results": {"branch_0": branch, "branch_1": branch, "ensemble": branch}}
    path.write_text(json.dumps(report))
    return path


def test_load_iou_results_reads_trainer_and_evaluate_files(tmp_path):
    trainer_file = write_trainer_results(tmp_path / "run", {"background": 0.9, "disc": 0.5, "square": 0.25})
    assert load_iou_results(trainer_file.parent, "sup") == {
        "sup": {"background": 0.9, "disc": 0.5, "square": 0.25}
    }
    evaluate_file = write_evaluate_results(tmp_path / "eval.json")
    series = load_iou_results(evaluate_file, "CPS")
    assert list(series) == ["CPS (branch_0)", "CPS (branch_1)", "CPS (ensemble)"]
    assert math.isnan(series["CPS (ensemble)"]["square"])
    assert list(load_iou_results(evaluate_file, "CPS", ["ensemble"])) == ["CPS"]
    with pytest.raises(ValueError, match="branch_2"):
        load_iou_results(evaluate_file, "CPS", ["branch_2"])
    (tmp_path / "empty.json").write_text(json.dumps({"eval_loss": 1.0}))
    with pytest.raises(ValueError, match="no per-class IoU"):
        load_iou_results(tmp_path / "empty.json", "x")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"id2label": {"1": "disc", "0": "background"}}))
    assert read_class_names(trainer_file) == ["background", "disc"]
    assert read_class_names(tmp_path) is None


# --------------------------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------------------------


def log_history(num_steps: int, with_cps: bool, with_eval: bool) -> list[dict]:
    entries = []
    for step in range(10, num_steps + 1, 10):
        supervised = 1.0 / (1 + step / 50)
        entry = {
            "step": step,
            "epoch": step / 100,
            "learning_rate": 0.01 * (1 - step / num_steps) ** 0.9,
            "loss_supervised_branch_0": supervised,
            "loss_supervised_branch_1": supervised * 1.05,
        }
        if with_cps:
            entry["loss_cps"] = 0.3 - step / (10 * num_steps)
        entry["loss"] = supervised * 2.05 + 1.5 * entry.get("loss_cps", 0.0)
        entries.append(entry)
        if with_eval and step % 50 == 0:
            entries.append({"step": step, "eval_mean_iou": 0.2 + 0.5 * step / num_steps, "eval_loss": 0.8})
    entries.append({"step": num_steps, "train_loss": 0.7, "train_runtime": 12.0})
    return entries


def write_trainer_state(folder: Path, entries: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": entries[-1]["step"], "log_history": entries})
    )
    return folder


def test_training_curves_overlay_runs_in_one_panel_per_term(tmp_path):
    runs = {
        "supervised-only": write_trainer_state(
            tmp_path / "sup", log_history(200, with_cps=False, with_eval=True)
        ),
        "CPS": log_history(200, with_cps=True, with_eval=True),
    }
    curves = training_curves(runs, smoothing=0.6, dpi=100)
    # 6 panels (total, 2 supervised, CPS, learning rate, mIoU) in 2 rows of 3 panels of 4.2 x 3.0 inches.
    assert curves.size == (1260, 650)
    colors = distinct_colors(curves)
    assert len(colors) > 20
    assert {hex_color(_RUN_COLORS[0]), hex_color(_RUN_COLORS[1])} <= colors
    single = training_curves(
        [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], dpi=100
    )  # one run, one panel
    assert single.size == (420, 350)


def test_training_curves_reject_bad_runs(tmp_path):
    with pytest.raises(ValueError, match="'empty run'"):
        training_curves({"empty run": [{"step": 5, "train_runtime": 1.0}]})
    with pytest.raises(ValueError, match="smoothing"):
        training_curves([{"step": 1, "loss": 1.0}], smoothing=1.0)
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        training_curves({"missing": tmp_path})
    with pytest.raises(ValueError, match="log_history"):
        load_log_history({"global_step": 3})


# --------------------------------------------------------------------------------------------------------------
# Inputs of the figures
# --------------------------------------------------------------------------------------------------------------


def test_parse_named_paths():
    assert parse_named_paths(["supervised-only=outputs/sup", "CPS=outputs/cps=1", "outputs/demo/"]) == {
        "supervised-only": "outputs/sup",
        "CPS": "outputs/cps=1",
        "demo": "outputs/demo/",
    }
    with pytest.raises(ValueError, match="'CPS' twice"):
        parse_named_paths(["CPS=a", "CPS=b"])
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_named_paths(["=outputs/sup"])
    with pytest.raises(ValueError, match="--runs"):
        parse_named_paths([], "--runs")


def test_select_sample_indices():
    split = datasets.Dataset.from_dict(
        {"id": [f"img_{index}" for index in range(10)], "value": list(range(10))}
    )
    drawn = select_sample_indices(split, 4, seed=3)
    assert (
        len(drawn) == 4 and drawn == sorted(set(drawn)) and drawn == select_sample_indices(split, 4, seed=3)
    )
    assert (
        select_sample_indices(split, 4, seed=4) != drawn or select_sample_indices(split, 4, seed=5) != drawn
    )
    assert select_sample_indices(split, 20) == list(range(10))
    assert select_sample_indices(split, sample_ids=["img_7", "img_2"]) == [7, 2]
    assert select_sample_indices(split.remove_columns("id"), sample_ids=["5"]) == [5]
    with pytest.raises(ValueError, match="img_99"):
        select_sample_indices(split, sample_ids=["img_99"])
    with pytest.raises(ValueError, match="num_samples"):
        select_sample_indices(split, 0)


# --------------------------------------------------------------------------------------------------------------
# scripts/visualize.py, end to end
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory) -> Path:
    dataset_dir = tmp_path_factory.mktemp("dataset") / "synthetic"
    splits = make_synthetic_segmentation_dataset(
        num_train=2, num_val=4, image_size=32, cache_dir=str(tmp_path_factory.mktemp("synthetic_cache"))
    )
    splits.save_to_disk(str(dataset_dir))
    return dataset_dir


def test_visualize_script_grid(tmp_path, saved_model, saved_dataset):
    output = tmp_path / "figures" / "grid.png"
    stdout = run_script(
        "visualize",
        "--figure", "grid",
        "--models", f"first={saved_model}", f"second={saved_model}",
        "--dataset_name", str(saved_dataset),
        "--num_samples", "3",
        "--seed", "1",
        "--cell_height", "48",
        "--output", str(output),
    ).stdout  # fmt: skip
    grid = np.asarray(PILImage.open(output).convert("RGB"))
    layout = GridLayout(cell_height=48)
    # 3 rows of 32 x 32 images in 48 x 48 cells, 4 columns, row titles (the sample ids), and a legend.
    cells_height = layout.margin + layout.title_height + 3 * 48 + 2 * layout.gap
    assert grid.shape[1] == 2 * layout.margin + layout.row_title_width + 4 * 48 + 3 * layout.gap
    assert grid.shape[0] >= cells_height + layout.margin + layout.legend_gap + layout.legend_row_height

    split = load_segmentation_dataset(str(saved_dataset))["validation"]
    indices = select_sample_indices(split, 3, seed=1)
    assert f"Samples of 'validation': {', '.join(split[index]['id'] for index in indices)}" in stdout
    model = CPSForSemanticSegmentation.from_pretrained(saved_model)
    mean, std = load_image_normalization(str(saved_model), model.config.backbone)
    color_table = np.asarray(PALETTE, dtype=np.uint8).reshape(-1, 3)
    for row, index in enumerate(indices):
        top = layout.margin + layout.title_height + row * (48 + layout.gap)
        left = layout.margin + layout.row_title_width
        cells = [grid[top : top + 48, left + column * (48 + layout.gap) :][:, :48] for column in range(4)]
        truth = decode_mask(split[index]["label"]).numpy()
        prediction = predict_segmentation(
            model, split[index]["image"], image_mean=mean, image_std=std
        ).numpy()
        # Upscaled with nearest neighbours: each mask cell holds exactly the colours of the mask's classes.
        for cell, mask in [(cells[1], truth), (cells[2], prediction), (cells[3], prediction)]:
            assert distinct_colors(PILImage.fromarray(cell)) == {
                tuple(color_table[c]) for c in np.unique(mask)
            }
        np.testing.assert_array_equal(cells[2], cells[3])  # the same model in both columns


def test_visualize_script_iou(tmp_path):
    sup_file = write_trainer_results(tmp_path / "sup", {"background": 0.9, "disc": 0.4, "square": 0.3})
    (tmp_path / "sup" / "config.json").write_text(json.dumps({"id2label": dict(enumerate(CLASS_NAMES))}))
    cps_file = write_evaluate_results(tmp_path / "cps_eval.json")
    iou_png = tmp_path / "iou.png"
    stdout = run_script(
        "visualize",
        "--figure", "iou",
        "--results", f"supervised-only={sup_file}", f"CPS={cps_file}",
        "--entries", "ensemble",
        "--output", str(iou_png),
    ).stdout  # fmt: skip
    assert "iou figure" in stdout
    chart = PILImage.open(iou_png).convert("RGB")
    assert chart.width >= 600 and len(distinct_colors(chart)) > 20
    assert {hex_color(_RUN_COLORS[0]), hex_color(_RUN_COLORS[1])} <= distinct_colors(chart)


def test_visualize_script_curves(tmp_path):
    write_trainer_state(tmp_path / "sup", log_history(100, with_cps=False, with_eval=True))
    write_trainer_state(tmp_path / "cps", log_history(100, with_cps=True, with_eval=True))
    curves_png = tmp_path / "curves.png"
    run_script(
        "visualize",
        "--figure", "curves",
        "--runs", f"supervised-only={tmp_path / 'sup'}", f"CPS={tmp_path / 'cps'}",
        "--smoothing", "0.5",
        "--output", str(curves_png),
    )  # fmt: skip
    curves = PILImage.open(curves_png).convert("RGB")
    assert curves.size == (1260, 650) and len(distinct_colors(curves)) > 20
