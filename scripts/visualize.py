"""Figures of a CPS study, written as PNG: a qualitative grid of predictions, a per-class IoU chart, training curves.

    python scripts/visualize.py --figure grid --models supervised-only=outputs/supervised-demo CPS=outputs/cps-demo \\
        --dataset_name synthetic --num_samples 6 --output figures/qualitative.png
    python scripts/visualize.py --figure iou --results supervised-only=outputs/supervised-demo/eval_results.json \\
        CPS=outputs/cps-demo/eval_results.json --output figures/per_class_iou.png
    python scripts/visualize.py --figure curves --runs supervised-only=outputs/supervised-demo \\
        CPS=outputs/cps-demo --output figures/training_curves.png

`grid` predicts with each model under the protocol flags of `scripts/evaluate_cps.py`, normalising images with the
model's own saved image processor. `iou` reads the Trainer's `eval_results.json` or the JSON of
`scripts/evaluate_cps.py`. `curves` reads `<run>/trainer_state.json`. Needs matplotlib (`pip install cps_hf[plots]`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image as PILImage
from transformers import AutoConfig, HfArgumentParser

from cps_hf.data import check_columns, decode_mask, get_split, load_segmentation_dataset
from cps_hf.inference import InferenceProtocolArguments, parse_branch_selection

# The figure code lives in tools/ next to scripts/ (tooling, not part of the installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.figures import (  # noqa: E402
    GridLayout,
    load_iou_results,
    parse_named_paths,
    per_class_iou_chart,
    predict_masks_by_model,
    qualitative_grid,
    read_class_names,
    select_sample_indices,
    training_curves,
)


@dataclass
class FigureArguments:
    """Which figure, and where to write it."""

    figure: Literal["grid", "iou", "curves"] = field(
        metadata={"help": "'grid' (qualitative predictions), 'iou' (per-class IoU chart) or 'curves'."}
    )
    output: str = field(metadata={"help": "PNG file to write."})
    title: str | None = field(default=None, metadata={"help": "Title of the iou / curves figure."})


@dataclass
class GridArguments:
    """--figure grid: models, data, samples and the inference protocol."""

    models: list[str] | None = field(
        default=None, metadata={"help": "NAME=MODEL_DIR pairs, one column each (e.g. CPS=outputs/cps-demo)."}
    )
    dataset_name: str = field(
        default="synthetic",
        metadata={"help": "'synthetic', a save_to_disk/parquet/imagefolder folder, or a Hub dataset id."},
    )
    split: str = field(default="validation", metadata={"help": "Split to draw samples from."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "Mask column (class ids)."})
    id_column: str = field(default="id", metadata={"help": "Sample id column (row titles, --sample_ids)."})
    num_samples: int = field(default=6, metadata={"help": "Rows of the grid, drawn at random with --seed."})
    sample_ids: list[str] | None = field(
        default=None,
        metadata={"help": "Show these samples (values of --id_column) instead of a random draw."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random choice of samples."})
    branch: str | None = field(
        default=None,
        metadata={"help": "Branch index or 'ensemble' (default: each model's inference_branch)."},
    )
    legend: Literal["present", "all", "none"] = field(
        default="present", metadata={"help": "Legend of the classes 'present' in the grid, 'all' or 'none'."}
    )
    cell_height: int = field(default=160, metadata={"help": "Height of a grid cell in pixels."})
    device: str | None = field(
        default=None, metadata={"help": "Device (default: cuda if available, else cpu)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for datasets."})


@dataclass
class IoUChartArguments:
    """--figure iou: results files."""

    results: list[str] | None = field(
        default=None,
        metadata={"help": "NAME=RESULTS_JSON pairs (Trainer eval_results.json or evaluate_cps.py)."},
    )
    entries: list[str] | None = field(
        default=None, metadata={"help": "evaluate_cps.py entries to show, e.g. ensemble (default: all)."}
    )
    class_names_from: str | None = field(
        default=None,
        metadata={
            "help": "Model folder whose id2label orders the classes (default: next to the first results)."
        },
    )


@dataclass
class CurvesArguments:
    """--figure curves: training runs."""

    runs: list[str] | None = field(
        default=None, metadata={"help": "NAME=OUTPUT_DIR pairs (each holding trainer_state.json)."}
    )
    smoothing: float = field(default=0.0, metadata={"help": "EMA smoothing of the loss curves, in [0, 1)."})


def grid_figure(args: GridArguments, protocol_args: InferenceProtocolArguments) -> PILImage.Image:
    if not args.models:
        raise ValueError("--figure grid needs --models NAME=MODEL_DIR ...")
    model_paths = parse_named_paths(args.models, "--models")
    protocol = protocol_args.to_protocol()
    branch = parse_branch_selection([args.branch])[0] if args.branch is not None else None

    dataset_dict = load_segmentation_dataset(args.dataset_name, cache_dir=args.cache_dir)
    split = get_split(dataset_dict, args.split, args.dataset_name)
    check_columns(split, args.image_column, args.label_column, args.split)
    indices = select_sample_indices(
        split, args.num_samples, sample_ids=args.sample_ids, seed=args.seed, id_column=args.id_column
    )
    rows = [split[index] for index in indices]
    has_ids = args.id_column in split.column_names
    row_titles = [str(row[args.id_column]) if has_ids else f"#{index}" for row, index in zip(rows, indices)]
    images = [row[args.image_column] for row in rows]
    ground_truths = [decode_mask(row[args.label_column], title) for row, title in zip(rows, row_titles)]
    print(f"Samples of {args.split!r}: {', '.join(row_titles)}")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictions = predict_masks_by_model(model_paths, images, protocol=protocol, branch=branch, device=device)
    id2label = AutoConfig.from_pretrained(next(iter(model_paths.values()))).id2label
    class_names = [str(id2label[key]) for key in sorted(id2label, key=int)]
    return qualitative_grid(
        images,
        ground_truths,
        predictions,
        class_names=class_names,
        row_titles=row_titles,
        legend=args.legend,
        layout=GridLayout(cell_height=args.cell_height),
    )


def iou_figure(args: IoUChartArguments, title: str | None) -> PILImage.Image:
    if not args.results:
        raise ValueError("--figure iou needs --results NAME=RESULTS_JSON ...")
    result_paths = parse_named_paths(args.results, "--results")
    series = {}
    for name, path in result_paths.items():
        series.update(load_iou_results(path, name, args.entries))
    class_names = read_class_names(args.class_names_from or next(iter(result_paths.values())))
    if class_names is None:  # no config.json to give the id order: the order of the first file
        class_names = list(dict.fromkeys(name for class_ious in series.values() for name in class_ious))
    return per_class_iou_chart(series, class_names, title=title)


def main() -> None:
    parser = HfArgumentParser(
        (FigureArguments, GridArguments, InferenceProtocolArguments, IoUChartArguments, CurvesArguments)
    )
    figure_args, grid_args, protocol_args, iou_args, curves_args = parser.parse_args_into_dataclasses()
    if figure_args.figure == "grid":
        image = grid_figure(grid_args, protocol_args)
    elif figure_args.figure == "iou":
        image = iou_figure(iou_args, figure_args.title)
    else:
        if not curves_args.runs:
            raise ValueError("--figure curves needs --runs NAME=OUTPUT_DIR ...")
        runs = parse_named_paths(curves_args.runs, "--runs")
        image = training_curves(runs, smoothing=curves_args.smoothing, title=figure_args.title)
    output = Path(figure_args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    print(f"{figure_args.figure} figure ({image.width}x{image.height}) written to {output}")


if __name__ == "__main__":
    main()
