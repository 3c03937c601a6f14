"""Figures of a CPS study, drawn for `scripts/visualize.py`: a qualitative grid of predictions, a per-class IoU
chart and training curves, with the readers of their inputs (results files, trainer logs, samples, predictions).

Not part of the installed package: figure layout is tooling around the method. The masks use the palette of
`cps_hf.visualization`. The figures need matplotlib (`pip install cps_hf[plots]`), imported only when a figure is
drawn; they are drawn off-screen with the Agg backend (no pyplot state) and returned as RGB `PIL.Image.Image`s,
ready to `.save("x.png")`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor

from cps_hf.data import decode_image
from cps_hf.inference import (
    BranchSelection,
    InferenceProtocol,
    load_image_normalization,
    predict_segmentation,
)
from cps_hf.modeling_cps import CPSForSemanticSegmentation
from cps_hf.visualization import IGNORE_COLOR, PALETTE_SIZE, palette_indices, segmentation_palette

if TYPE_CHECKING:
    import datasets
    from matplotlib.figure import Figure

# --------------------------------------------------------------------------------------------------------------
# Figures: shared helpers
# --------------------------------------------------------------------------------------------------------------

_RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
"""Colours of models / runs in charts (matplotlib's tab10, blue and red first for a two-model comparison)."""


_TITLE_FONT = {"title_fontproperties": {"size": 13, "weight": "bold"}}


def _figure_classes() -> tuple[type, type]:
    """Matplotlib's `Figure` and Agg canvas, imported on demand: matplotlib is an optional dependency."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Drawing figures needs matplotlib, an optional dependency: `pip install cps_hf[plots]`."
        ) from error
    return Figure, FigureCanvasAgg


def _new_figure(width_inches: float, height_inches: float, dpi: int, layout: str | None = None) -> Figure:
    figure_class, canvas_class = _figure_classes()
    figure = figure_class(figsize=(width_inches, height_inches), dpi=dpi, layout=layout)
    canvas_class(figure)  # attaches itself as `figure.canvas`
    return figure


def _render(figure: Figure) -> PILImage.Image:
    """The figure rasterised by Agg, as an RGB image of `figsize * dpi` pixels."""
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())  # (height, width, 4)
    return PILImage.fromarray(np.ascontiguousarray(rgba[..., :3]))


# --------------------------------------------------------------------------------------------------------------
# Qualitative grid
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridLayout:
    """Pixel layout of [`qualitative_grid`]; every length is in pixels of the output image.

    The grid is `margin | [row title] | cell | gap | cell | ... | margin` wide and `margin | title row | cell | gap |
    ... | cell | [legend] | margin` high. Each picture is resized, keeping its aspect ratio, to fit its cell and
    centred in it.

    Args:
        cell_height (`int`, *optional*, defaults to 160):
            Height of a cell.
        cell_width (`int`, *optional*):
            Width of a cell; defaults to `cell_height` times the largest width / height ratio of the images, so
            the widest image fills its cell.
        margin (`int`, *optional*, defaults to 10):
            Blank border around the figure.
        gap (`int`, *optional*, defaults to 4):
            Space between neighbouring cells.
        title_height (`int`, *optional*, defaults to 28):
            Height of the row of column titles.
        row_title_width (`int`, *optional*, defaults to 22):
            Width of the column of (vertical) row titles, when there are row titles.
        legend_gap (`int`, *optional*, defaults to 12):
            Space between the last row of cells and the legend.
        legend_row_height (`int`, *optional*, defaults to 22):
            Height of a row of the legend.
        swatch_size (`int`, *optional*, defaults to 14):
            Side of a legend colour square.
        font_size (`float`, *optional*, defaults to 11):
            Font size of the titles and legend, in points (`font_size * dpi / 72` pixels).
        dpi (`int`, *optional*, defaults to 100):
            Resolution used to turn points into pixels.
    """

    cell_height: int = 160
    cell_width: int | None = None
    margin: int = 10
    gap: int = 4
    title_height: int = 28
    row_title_width: int = 22
    legend_gap: int = 12
    legend_row_height: int = 22
    swatch_size: int = 14
    font_size: float = 11.0
    dpi: int = 100

    def __post_init__(self) -> None:
        for name in ("cell_height", "legend_row_height", "swatch_size", "dpi"):
            if getattr(self, name) < 1:
                raise ValueError(f"`GridLayout.{name}` must be >= 1, got {getattr(self, name)}.")
        if self.cell_width is not None and self.cell_width < 1:
            raise ValueError(f"`GridLayout.cell_width` must be >= 1 or None, got {self.cell_width}.")
        for name in ("margin", "gap", "title_height", "row_title_width", "legend_gap"):
            if getattr(self, name) < 0:
                raise ValueError(f"`GridLayout.{name}` must be >= 0, got {getattr(self, name)}.")
        if self.font_size <= 0:
            raise ValueError(f"`GridLayout.font_size` must be positive, got {self.font_size}.")


_SWATCH_TEXT_GAP = 6
"""Pixels between a legend colour square and its label."""
_LEGEND_ENTRY_SPACING = 20
"""Pixels between neighbouring legend entries on a line."""
_SWATCH_OUTLINE = (96, 96, 96)


def _image_pixels(image: Any, sample_name: str) -> np.ndarray:
    """Any image [`~cps_hf.data.decode_image`] accepts, as uint8 `(height, width, 3)`."""
    pixels = decode_image(image, sample_name)  # float32 (3, height, width) in [0, 1]
    return (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _grid_mask(mask: Any, what: str) -> np.ndarray:
    if isinstance(mask, PILImage.Image):
        mask = np.asarray(mask)  # palette images give their indices
    try:
        return palette_indices(mask)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from error


def _color_table(palette: Sequence[int], ignore_index: int) -> np.ndarray:
    """`(256, 3)` uint8 colour of every class id, `ignore_index` in [`IGNORE_COLOR`]."""
    values = list(palette)
    if len(values) % 3 or len(values) > 3 * PALETTE_SIZE:
        raise ValueError(
            f"`palette` must be a flat list of at most {PALETTE_SIZE} RGB triples, got {len(values)} values."
        )
    table = np.zeros((PALETTE_SIZE, 3), dtype=np.uint8)
    table[: len(values) // 3] = np.asarray(values, dtype=np.uint8).reshape(-1, 3)
    table[ignore_index] = IGNORE_COLOR
    return table


def _fit_in_cell(picture: PILImage.Image, cell_size: tuple[int, int], resample: int) -> PILImage.Image:
    cell_width, cell_height = cell_size
    scale = min(cell_width / picture.width, cell_height / picture.height)
    size = (
        max(1, min(cell_width, round(picture.width * scale))),
        max(1, min(cell_height, round(picture.height * scale))),
    )
    return picture if size == picture.size else picture.resize(size, resample)


def _text_width(texts: Sequence[str], font_size: float, dpi: int, weight: str = "normal") -> list[float]:
    """Rendered width in pixels of each text in matplotlib's default font."""
    from matplotlib.font_manager import FontProperties

    renderer = _new_figure(1.0, 1.0, dpi).canvas.get_renderer()
    font = FontProperties(size=font_size, weight=weight)
    return [renderer.get_text_width_height_descent(text, font, ismath=False)[0] for text in texts]


def qualitative_grid(
    images: Sequence[Any],
    ground_truths: Sequence[Any],
    predictions_by_model: Mapping[str, Sequence[Any]],
    palette: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    *,
    row_titles: Sequence[str] | None = None,
    legend: Literal["present", "all", "none"] = "present",
    ignore_index: int = 255,
    layout: GridLayout | None = None,
) -> PILImage.Image:
    """The qualitative figure of the CPS paper: one row per sample, columns image | ground truth | one per model.

    Masks are drawn in the colours of `palette` (pixels equal to `ignore_index` in [`IGNORE_COLOR`]), each column
    under its title, with a legend of the class colours and names below the grid. The pictures are resized to
    their cells (bicubic for images, nearest for masks) and the exact pixel layout is given by `layout`.

    Args:
        images (`Sequence`):
            One picture per sample: anything [`~cps_hf.data.decode_image`] accepts (PIL image, float `(3, H, W)`
            tensor in `[0, 1]`, uint8 `(H, W, 3)` array, `datasets.Image` value, ...).
        ground_truths (`Sequence`):
            One `(H, W)` mask of class ids per sample (tensor, array or palette PIL image), of its image's size.
        predictions_by_model (`Mapping[str, Sequence]`):
            Column title (e.g. `"supervised-only"`, `"CPS"`) -> one predicted mask per sample, in column order.
        palette (`Sequence[int]`, *optional*):
            Flat RGB palette; defaults to [`segmentation_palette`].
        class_names (`Sequence[str]`, *optional*):
            Name of each class id, for the legend; mask values must then be class ids or `ignore_index`. Without
            them the legend shows the ids.
        row_titles (`Sequence[str]`, *optional*):
            One title per sample (e.g. its id), written vertically left of its row.
        legend (`str`, *optional*, defaults to `"present"`):
            `"present"`: the classes that appear in the shown masks; `"all"`: every class; `"none"`: no legend.
            An "ignored" entry is added when a mask holds `ignore_index`.
        ignore_index (`int`, *optional*, defaults to 255):
            Label value of pixels without a class.
        layout (`GridLayout`, *optional*):
            Cell size, margins and fonts; defaults to `GridLayout()`.

    Returns:
        `PIL.Image.Image`: RGB. With `n` samples, `m` models and no legend it is
        `2 * margin + [row_title_width] + (m + 2) * cell_width + (m + 1) * gap` pixels wide and
        `2 * margin + title_height + n * cell_height + (n - 1) * gap` high; a legend of `r` rows adds
        `legend_gap + r * legend_row_height` (and may widen the figure to fit its widest entry).

    Raises:
        ValueError: if there are no images, a list's length differs from the number of images, a mask's size differs
            from its image's, a mask value is not a class of `class_names`, or `legend` is unknown.
        ImportError: if matplotlib is not installed.
    """
    layout = layout or GridLayout()
    num_samples = len(images)
    if num_samples == 0:
        raise ValueError("`images` is empty: the grid needs at least one sample.")
    lengths = {
        "ground_truths": len(ground_truths),
        "row_titles": None if row_titles is None else len(row_titles),
    }
    lengths.update(
        {f"predictions_by_model[{name!r}]": len(masks) for name, masks in predictions_by_model.items()}
    )
    for name, length in lengths.items():
        if length is not None and length != num_samples:
            raise ValueError(f"`{name}` has {length} entries but there are {num_samples} images.")
    if legend not in ("present", "all", "none"):
        raise ValueError(f"`legend` must be 'present', 'all' or 'none', got {legend!r}.")
    if not 0 <= ignore_index < PALETTE_SIZE:
        raise ValueError(f"`ignore_index` must be in [0, {PALETTE_SIZE}), got {ignore_index}.")
    num_classes = len(class_names) if class_names is not None else None
    if palette is None:
        palette = segmentation_palette(min(num_classes or PALETTE_SIZE - 1, PALETTE_SIZE))
    color_table = _color_table(palette, ignore_index)

    # Decode and check everything first: rows of (image, ground truth, *predictions), uint8 arrays.
    model_names = list(predictions_by_model)
    rows = []
    for index in range(num_samples):
        sample_name = row_titles[index] if row_titles is not None else f"sample {index}"
        pixels = _image_pixels(images[index], sample_name)
        masks = [_grid_mask(ground_truths[index], f"Ground truth of {sample_name}")]
        masks += [
            _grid_mask(predictions_by_model[name][index], f"Prediction of {name!r} for {sample_name}")
            for name in model_names
        ]
        for title, mask in zip(["ground truth", *model_names], masks):
            if mask.shape != pixels.shape[:2]:
                raise ValueError(
                    f"The {title} mask of {sample_name} has shape {mask.shape}, its image has (height, width) = "
                    f"{pixels.shape[:2]}."
                )
            if num_classes is not None:
                unknown = sorted(set(np.unique(mask).tolist()) - set(range(num_classes)) - {ignore_index})
                if unknown:
                    raise ValueError(
                        f"The {title} mask of {sample_name} holds class ids {unknown}, outside the "
                        f"{num_classes} classes of `class_names` (and not `ignore_index={ignore_index}`)."
                    )
        rows.append((pixels, masks))

    present = set().union(*(np.unique(mask).tolist() for _, masks in rows for mask in masks))
    has_ignored = ignore_index in present
    present_classes = sorted(present - {ignore_index})
    legend_ids: list[int] = []
    if legend == "all":
        num_legend_classes = num_classes if num_classes is not None else max([-1, *present_classes]) + 1
        legend_ids = [class_id for class_id in range(num_legend_classes) if class_id != ignore_index]
    elif legend == "present":
        legend_ids = present_classes
    legend_items = [
        (class_names[class_id] if class_names is not None else str(class_id), tuple(color_table[class_id]))
        for class_id in legend_ids
    ]
    if legend != "none" and has_ignored:
        legend_items.append(("ignored", IGNORE_COLOR))

    # Layout, in pixels from the top-left corner.
    if layout.cell_width is not None:
        cell_width = layout.cell_width
    else:
        cell_width = max(1, round(layout.cell_height * max(p.shape[1] / p.shape[0] for p, _ in rows)))
    cell_height, gap, margin = layout.cell_height, layout.gap, layout.margin
    num_columns = 2 + len(model_names)
    row_title_width = layout.row_title_width if row_titles is not None else 0
    grid_left = margin + row_title_width
    grid_width = num_columns * cell_width + (num_columns - 1) * gap
    grid_top = margin + layout.title_height
    grid_height = num_samples * cell_height + (num_samples - 1) * gap
    width = grid_left + grid_width + margin
    # The legend flows like text: entries of their own width, wrapped into centred lines.
    legend_lines: list[list[tuple[int, float]]] = []  # per line: (entry index, entry width)
    if legend_items:
        label_widths = _text_width([name for name, _ in legend_items], layout.font_size, layout.dpi)
        entry_widths = [layout.swatch_size + _SWATCH_TEXT_GAP + label_width for label_width in label_widths]
        width = max(width, math.ceil(2 * margin + max(entry_widths)))
        line_width = math.inf
        for entry, entry_width in enumerate(entry_widths):
            if line_width + _LEGEND_ENTRY_SPACING + entry_width > width - 2 * margin:
                legend_lines.append([])
                line_width = -_LEGEND_ENTRY_SPACING
            legend_lines[-1].append((entry, entry_width))
            line_width += _LEGEND_ENTRY_SPACING + entry_width
    legend_rows = len(legend_lines)
    legend_top = grid_top + grid_height + layout.legend_gap
    height = grid_top + grid_height + margin
    if legend_rows:
        height += layout.legend_gap + legend_rows * layout.legend_row_height

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    cell_lefts = [grid_left + column * (cell_width + gap) for column in range(num_columns)]
    for row, (pixels, masks) in enumerate(rows):
        cell_top = grid_top + row * (cell_height + gap)
        pictures = [
            _fit_in_cell(PILImage.fromarray(pixels), (cell_width, cell_height), PILImage.Resampling.BICUBIC)
        ]
        pictures += [
            _fit_in_cell(PILImage.fromarray(mask), (cell_width, cell_height), PILImage.Resampling.NEAREST)
            for mask in masks
        ]
        for column, picture in enumerate(pictures):
            array = np.asarray(picture)
            if column > 0:
                array = color_table[array]  # class ids -> (h, w, 3) colours
            top = cell_top + (cell_height - array.shape[0]) // 2
            left = cell_lefts[column] + (cell_width - array.shape[1]) // 2
            canvas[top : top + array.shape[0], left : left + array.shape[1]] = array

    swatch_size = layout.swatch_size
    label_positions = []
    for line_index, line in enumerate(legend_lines):
        line_width = sum(entry_width for _, entry_width in line) + _LEGEND_ENTRY_SPACING * (len(line) - 1)
        left = (width - line_width) / 2
        row_top = legend_top + line_index * layout.legend_row_height
        top = row_top + (layout.legend_row_height - swatch_size) // 2
        for entry, entry_width in line:
            swatch_left = round(left)
            # A grey outline keeps pale colours (and white) visible on the white background.
            canvas[top : top + swatch_size, swatch_left : swatch_left + swatch_size] = _SWATCH_OUTLINE
            canvas[top + 1 : top + swatch_size - 1, swatch_left + 1 : swatch_left + swatch_size - 1] = (
                legend_items[entry][1]
            )
            label_positions.append(
                (
                    legend_items[entry][0],
                    swatch_left + swatch_size + _SWATCH_TEXT_GAP,
                    row_top + layout.legend_row_height / 2,
                )
            )
            left += entry_width + _LEGEND_ENTRY_SPACING

    # Text on top of the pixels: matplotlib places it at pixel positions of a figure of exactly width x height.
    figure = _new_figure(width / layout.dpi, height / layout.dpi, layout.dpi)
    figure.figimage(canvas, xo=0, yo=0, origin="upper")

    def text(x: float, y: float, value: str, **kwargs: Any) -> None:
        figure.text(x / width, 1.0 - y / height, value, **{"fontsize": layout.font_size, **kwargs})

    def fitted_font_sizes(
        texts: list[str], font_size: float, room: float, weight: str = "normal"
    ) -> list[float]:
        # Long titles shrink to the room they have rather than run into their neighbours.
        text_widths = _text_width(texts, font_size, layout.dpi, weight)
        return [font_size * min(1.0, (room - 2) / max(text_width, 1.0)) for text_width in text_widths]

    titles = ["image", "ground truth", *model_names]
    for left, title, font_size in zip(
        cell_lefts, titles, fitted_font_sizes(titles, layout.font_size, cell_width, "bold")
    ):
        text(
            left + cell_width / 2,
            grid_top - layout.title_height / 2,
            title,
            ha="center",
            va="center",
            fontweight="bold",
            fontsize=font_size,
        )
    if row_titles is not None:
        row_titles = [str(title) for title in row_titles]
        row_font_sizes = fitted_font_sizes(row_titles, layout.font_size * 0.85, cell_height)
        for row, (title, font_size) in enumerate(zip(row_titles, row_font_sizes)):
            center = grid_top + row * (cell_height + gap) + cell_height / 2
            text(
                margin + row_title_width / 2,
                center,
                title,
                ha="center",
                va="center",
                rotation=90,
                fontsize=font_size,
                color="#444444",
            )
    for name, x, y in label_positions:
        text(x, y, name, ha="left", va="center_baseline")
    return _render(figure)


# --------------------------------------------------------------------------------------------------------------
# Per-class IoU chart
# --------------------------------------------------------------------------------------------------------------

_IOU_PREFIXES = ("eval_iou_", "test_iou_", "iou_")


def _class_ious_from_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """`{class name: IoU}` from a metrics dict whose per-class keys are `[eval_|test_]iou_<name>`."""
    class_ious = {}
    for key, value in metrics.items():
        prefix = next((prefix for prefix in _IOU_PREFIXES if key.startswith(prefix)), None)
        if prefix is not None:
            class_ious[key[len(prefix) :]] = math.nan if value is None else float(value)
    return class_ious


def load_iou_results(
    path: str | os.PathLike, name: str, entries: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """Per-class IoUs of a results file, as the series of [`per_class_iou_chart`].

    Two formats are read:

    - the Trainer's `eval_results.json` / `all_results.json` (keys `eval_iou_<class>`, `eval_mean_iou`, ...): one
      series, `name`;
    - the JSON of `scripts/evaluate_cps.py` (`{"results": {"branch_0": {"iou_<class>": ...}, ...}}`): one series
      per entry (`"<name> (branch_0)"`, `"<name> (ensemble)"`, ...), or just `name` when a single entry is kept.

    IoUs stored as `null` (a class absent from predictions and labels) become NaN.

    Args:
        path (`str` or `os.PathLike`):
            The JSON file, or a folder holding `eval_results.json`.
        name (`str`):
            Name of the model in the chart.
        entries (`Sequence[str]`, *optional*):
            Entries of an evaluate_cps.py file to keep (e.g. `["ensemble"]`); all by default.

    Returns:
        `dict[str, dict[str, float]]`: series name -> `{class name: IoU in [0, 1]}`, classes in file order.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file has no per-class IoU, or an entry of `entries` is not in it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "eval_results.json"
    if not path.is_file():
        raise FileNotFoundError(f"No results file at {str(path)!r}.")
    report = json.loads(path.read_text())
    if isinstance(report.get("results"), Mapping):
        available = list(report["results"])
        kept = available if entries is None else list(entries)
        missing = [entry for entry in kept if entry not in available]
        if missing:
            raise ValueError(f"Entries {missing} are not in {str(path)!r}; it has {available}.")
        series = {
            name if len(kept) == 1 else f"{name} ({entry})": _class_ious_from_metrics(
                report["results"][entry]
            )
            for entry in kept
        }
    else:
        series = {name: _class_ious_from_metrics(report)}
    for series_name, class_ious in series.items():
        if not class_ious:
            raise ValueError(
                f"{str(path)!r} holds no per-class IoU for {series_name!r}: expected keys like 'eval_iou_<class>' "
                f"(Trainer) or 'results' -> entry -> 'iou_<class>' (scripts/evaluate_cps.py)."
            )
    return series


def read_class_names(path: str | os.PathLike) -> list[str] | None:
    """Class names in class-id order from a model's `config.json` (`id2label`).

    Args:
        path (`str` or `os.PathLike`):
            A `config.json`, a model folder, or a file inside a model folder (e.g. its `eval_results.json`).

    Returns:
        `list[str]` or `None`: the names, or `None` if no `config.json` with an `id2label` is found there.
    """
    path = Path(path)
    config_path = (
        path if path.name == "config.json" else (path if path.is_dir() else path.parent) / "config.json"
    )
    if not config_path.is_file():
        return None
    id2label = json.loads(config_path.read_text()).get("id2label")
    if not id2label:
        return None
    return [str(id2label[key]) for key in sorted(id2label, key=int)]


def per_class_iou_chart(
    results: Mapping[str, Mapping[str, float | None]],
    class_names: Sequence[str],
    *,
    title: str | None = None,
    annotate: bool | None = None,
    dpi: int = 100,
) -> PILImage.Image:
    """Grouped bar chart of per-class IoU (%) of one or more models, with each model's mIoU in the legend.

    The mIoU of a model is the mean of its IoUs over `class_names`, NaN classes excluded (the convention of
    [`~cps_hf.metrics.metrics_from_confusion_matrix`]); a NaN or missing class has no bar.

    Args:
        results (`Mapping[str, Mapping[str, float]]`):
            Model name -> `{class name: IoU in [0, 1]}` (e.g. from [`load_iou_results`]); `None` counts as NaN.
        class_names (`Sequence[str]`):
            The classes to show, in order (e.g. `config.id2label` in id order).
        title (`str`, *optional*):
            Title above the chart.
        annotate (`bool`, *optional*):
            Write each IoU above its bar; by default only when there are at most 24 bars.
        dpi (`int`, *optional*, defaults to 100):
            Resolution of the image.

    Returns:
        `PIL.Image.Image`: RGB, wider with more classes.

    Raises:
        ValueError: if there are no models or classes, a model names a class not in `class_names`, or an IoU is
            outside `[0, 1]`.
        ImportError: if matplotlib is not installed.
    """
    if not results:
        raise ValueError("`results` is empty: give the per-class IoUs of at least one model.")
    class_names = [str(name) for name in class_names]
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"`class_names` must be non-empty and without duplicates, got {class_names}.")
    values = np.full((len(results), len(class_names)), math.nan)  # (models, classes), in percent
    for row, (model_name, class_ious) in enumerate(results.items()):
        unknown = [key for key in class_ious if key not in class_names]
        if unknown:
            raise ValueError(
                f"Results of {model_name!r} name classes {unknown} that are not in `class_names` {class_names}."
            )
        for key, value in class_ious.items():
            value = math.nan if value is None else float(value)
            if not math.isnan(value) and not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"IoU of class {key!r} for {model_name!r} must be a fraction in [0, 1], got {value}."
                )
            values[row, class_names.index(key)] = 100.0 * value

    num_models, num_classes = values.shape
    if annotate is None:
        annotate = values.size <= 24
    long_labels = num_classes > 6 or max(len(name) for name in class_names) > 12
    figure = _new_figure(
        max(6.0, 1.2 + num_classes * (0.3 * num_models + 0.3)),
        4.8 if long_labels else 4.2,
        dpi,
        "constrained",
    )
    axes = figure.add_subplot()
    group_positions = np.arange(num_classes)
    bar_width = 0.8 / num_models
    for row, model_name in enumerate(results):
        with np.errstate(invalid="ignore"):
            mean_iou = float(np.nanmean(values[row])) if not np.isnan(values[row]).all() else math.nan
        bars = axes.bar(
            group_positions + (row - (num_models - 1) / 2) * bar_width,
            np.nan_to_num(values[row], nan=0.0),
            bar_width,
            label=f"{model_name} (mIoU {mean_iou:.1f})",
            color=_RUN_COLORS[row % len(_RUN_COLORS)],
            edgecolor="white",
            linewidth=0.5,
        )
        if annotate:
            labels = ["n/a" if math.isnan(value) else f"{value:.1f}" for value in values[row]]
            axes.bar_label(bars, labels=labels, padding=2, fontsize=7)
    axes.set_xticks(group_positions, class_names)
    if long_labels:
        axes.tick_params(axis="x", labelrotation=40)
        for label in axes.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    axes.set_xlim(-0.6, num_classes - 0.4)
    axes.set_ylim(0, 105 if annotate else 100)
    axes.set_ylabel("IoU (%)")
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    axes.spines[["top", "right"]].set_visible(False)
    # The title heads the legend: a suptitle and an "outside" legend overlap under constrained layout.
    figure.legend(
        loc="outside upper center", ncols=min(num_models, 4), frameon=False, title=title, **_TITLE_FONT
    )
    return _render(figure)


# --------------------------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------------------------

LogSource = str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]]
"""A run's logs: a `trainer_state.json`, its folder, the loaded state, or its `log_history` list."""


def load_log_history(source: LogSource) -> list[dict[str, Any]]:
    """The `log_history` of a Trainer run.

    Args:
        source (`str`, `os.PathLike`, `Mapping` or `Sequence[Mapping]`):
            A `trainer_state.json`, an output or checkpoint folder holding one, the loaded state (a dict with
            `log_history`), or the `log_history` list itself.

    Returns:
        `list[dict[str, Any]]`: the log entries, in order.

    Raises:
        FileNotFoundError: if a path holds no `trainer_state.json`.
        ValueError: if a state has no `log_history`, or an entry is not a dict.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            path = path / "trainer_state.json"
        if not path.is_file():
            raise FileNotFoundError(f"No trainer_state.json at {str(path)!r}.")
        source = json.loads(path.read_text())
    if isinstance(source, Mapping):
        if "log_history" not in source:
            raise ValueError(f"The trainer state has no 'log_history'; its keys are {sorted(source)}.")
        source = source["log_history"]
    entries = list(source)
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise ValueError(f"A log_history entry must be a dict, got {entry!r}.")
    return [dict(entry) for entry in entries]


def _loss_sort_key(key: str) -> tuple[int, int, str]:
    if key == "loss":
        return 0, 0, key
    branch = key.removeprefix("loss_supervised_branch_")
    if branch != key and branch.isdigit():
        return 1, int(branch), key
    return 2, 0, key


def _panel_title(key: str) -> str:
    branch = key.removeprefix("loss_supervised_branch_")
    if branch != key:
        return f"supervised loss, branch {branch}"
    return {
        "loss": "total loss",
        "loss_cps": "CPS loss",
        "learning_rate": "learning rate",
        "eval_mean_iou": "validation mIoU (%)",
    }.get(key, key)


def _smoothed(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing)."""
    smoothed = np.empty_like(values)
    average, weight = 0.0, 0.0
    for index, value in enumerate(values):
        average = smoothing * average + (1.0 - smoothing) * value
        weight = smoothing * weight + (1.0 - smoothing)
        smoothed[index] = average / weight
    return smoothed


def training_curves(
    runs: Mapping[str, LogSource] | LogSource,
    *,
    smoothing: float = 0.0,
    title: str | None = None,
    dpi: int = 100,
) -> PILImage.Image:
    """Training curves of one or more runs, overlaid: one panel per loss term, the learning rate, validation mIoU.

    Panels, from the `log_history` of each run's `trainer_state.json`, against the step: the total `loss`, each
    `loss_supervised_branch_<i>`, `loss_cps` (and any other `loss_*` term), the `learning_rate`, and
    `eval_mean_iou` (in %) when a run was evaluated. A run has the same colour in every panel; a panel shows the
    runs that logged its key (a supervised-only run has no CPS loss).

    Args:
        runs (`Mapping[str, LogSource]` or `LogSource`):
            Run name (the legend label) -> its logs (a `trainer_state.json`, its folder, the state or its
            `log_history`), or a single run's logs.
        smoothing (`float`, *optional*, defaults to 0):
            Exponential-moving-average weight in `[0, 1)` applied to the loss curves (the raw curve stays, faint).
        title (`str`, *optional*):
            Title above the panels.
        dpi (`int`, *optional*, defaults to 100):
            Resolution of the image.

    Returns:
        `PIL.Image.Image`: RGB, panels in rows of three.

    Raises:
        ValueError: if there are no runs, a run logged nothing to plot, or `smoothing` is outside `[0, 1)`.
        FileNotFoundError: if a run's path holds no `trainer_state.json`.
        ImportError: if matplotlib is not installed.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing}.")
    if not isinstance(runs, Mapping) or "log_history" in runs:
        runs = {"run": runs}
    if not runs:
        raise ValueError("`runs` is empty: give at least one run.")

    # series[key][run name] = (steps, values)
    series: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for run_name, source in runs.items():
        entries = load_log_history(source)
        keys = {key for entry in entries for key in entry}
        plotted = [
            key
            for key in keys
            if key in ("loss", "learning_rate", "eval_mean_iou") or key.startswith("loss_")
        ]
        if not plotted:
            raise ValueError(
                f"Run {run_name!r} logged nothing to plot (loss, loss_*, learning_rate, eval_mean_iou); its log "
                f"keys are {sorted(keys)}."
            )
        for key in plotted:
            points = [
                (entry["step"], entry[key])
                for entry in entries
                if entry.get(key) is not None and entry.get("step") is not None
            ]
            if not points:
                continue
            steps, values = (np.asarray(column, dtype=float) for column in zip(*points))
            if key == "eval_mean_iou":
                values = 100.0 * values
            series.setdefault(key, {})[run_name] = (steps, values)

    loss_keys = sorted(
        (key for key in series if key == "loss" or key.startswith("loss_")), key=_loss_sort_key
    )
    panel_keys = loss_keys + [key for key in ("learning_rate", "eval_mean_iou") if key in series]
    num_columns = min(3, len(panel_keys))
    num_rows = math.ceil(len(panel_keys) / num_columns)
    figure = _new_figure(4.2 * num_columns, 3.0 * num_rows + 0.5, dpi, "constrained")
    panels = figure.subplots(num_rows, num_columns, squeeze=False).ravel()
    run_colors = {name: _RUN_COLORS[index % len(_RUN_COLORS)] for index, name in enumerate(runs)}
    for axes, key in zip(panels, panel_keys):
        for run_name, (steps, values) in series[key].items():
            color = run_colors[run_name]
            marker = "o" if len(steps) <= 30 else None
            if smoothing and key in loss_keys and len(values) > 1:
                axes.plot(steps, values, color=color, alpha=0.25, linewidth=1)
                values = _smoothed(values, smoothing)
            axes.plot(steps, values, color=color, marker=marker, markersize=3, linewidth=1.5, label=run_name)
        axes.set_title(_panel_title(key), fontsize=11)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.spines[["top", "right"]].set_visible(False)
        if key == "learning_rate":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for axes in panels[len(panel_keys) :]:
        axes.remove()
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=run_colors[name], linewidth=2, label=name) for name in runs]
    figure.legend(
        handles=handles,
        loc="outside upper center",
        ncols=min(len(runs), 5),
        frameon=False,
        title=title,
        **_TITLE_FONT,
    )
    return _render(figure)


# --------------------------------------------------------------------------------------------------------------
# Inputs of the figures: command-line pairs, sample choice, predictions
# --------------------------------------------------------------------------------------------------------------


def parse_named_paths(values: Sequence[str], argument: str = "--models") -> dict[str, str]:
    """Parses `NAME=PATH` command-line values (a bare `PATH` is named after its last component).

    Args:
        values (`Sequence[str]`):
            e.g. `["supervised-only=outputs/supervised-demo", "CPS=outputs/cps-demo"]`.
        argument (`str`, *optional*, defaults to `"--models"`):
            The flag, for error messages.

    Returns:
        `dict[str, str]`: name -> path, in the given order.

    Raises:
        ValueError: if a name or path is empty or a name is given twice.
    """
    if not values:
        raise ValueError(f"`{argument}` needs at least one NAME=PATH value.")
    named_paths: dict[str, str] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator:
            name, path = Path(value.rstrip("/")).name, value
        if not name or not path:
            raise ValueError(f"`{argument}` values must look like NAME=PATH, got {value!r}.")
        if name in named_paths:
            raise ValueError(f"`{argument}` names {name!r} twice ({named_paths[name]!r} and {path!r}).")
        named_paths[name] = path
    return named_paths


def select_sample_indices(
    dataset: datasets.Dataset,
    num_samples: int = 6,
    *,
    sample_ids: Sequence[str] | None = None,
    seed: int = 0,
    id_column: str = "id",
) -> list[int]:
    """Rows of a split to show: the given sample ids, or `num_samples` rows drawn at random.

    Args:
        dataset (`datasets.Dataset`):
            The split.
        num_samples (`int`, *optional*, defaults to 6):
            How many rows to draw (all of them if the split is smaller); ignored with `sample_ids`.
        sample_ids (`Sequence[str]`, *optional*):
            Ids to show, in this order: values of `id_column`, or row indices if the split has no such column.
        seed (`int`, *optional*, defaults to 0):
            Seed of the random draw (`numpy.random.default_rng(seed)`); the drawn rows are sorted.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column of sample ids.

    Returns:
        `list[int]`: row indices.

    Raises:
        ValueError: if `num_samples < 1` or a sample id is not in the split.
    """
    if sample_ids:
        if id_column in dataset.column_names:
            row_ids = [str(sample_id) for sample_id in dataset.data.column(id_column).to_pylist()]
        else:
            row_ids = [str(row) for row in range(len(dataset))]
        row_of_id = {sample_id: row for row, sample_id in enumerate(row_ids)}
        unknown = [sample_id for sample_id in sample_ids if str(sample_id) not in row_of_id]
        if unknown:
            raise ValueError(
                f"Sample ids {unknown} are not in the split (column {id_column!r}, e.g. {row_ids[:5]})."
            )
        return [row_of_id[str(sample_id)] for sample_id in sample_ids]
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    if num_samples >= len(dataset):
        return list(range(len(dataset)))
    return sorted(np.random.default_rng(seed).choice(len(dataset), num_samples, replace=False).tolist())


def predict_masks_by_model(
    model_paths: Mapping[str, str],
    images: Sequence[Any],
    *,
    protocol: InferenceProtocol | None = None,
    branch: BranchSelection | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, list[Tensor]]:
    """Label maps of the same images by several saved CPS models, for [`qualitative_grid`].

    Each model is loaded in turn (one in memory at a time), normalises images with its own saved image processor
    ([`~cps_hf.inference.load_image_normalization`]) and predicts with
    [`~cps_hf.inference.predict_segmentation`].

    Args:
        model_paths (`Mapping[str, str]`):
            Column name -> model folder or Hub id.
        images (`Sequence`):
            Anything [`~cps_hf.data.decode_image`] accepts.
        protocol ([`~cps_hf.inference.InferenceProtocol`], *optional*):
            How every model predicts; defaults to `InferenceProtocol()`.
        branch (`int` or `"ensemble"`, *optional*):
            Which branch predicts; defaults to each model's `config.inference_branch`.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the models run.

    Returns:
        `dict[str, list[torch.Tensor]]`: column name -> `(height, width)` int64 masks on the CPU.

    Raises:
        ValueError: if the models disagree on their classes (`id2label`).
    """
    masks_by_model: dict[str, list[Tensor]] = {}
    reference: tuple[str, dict[int, str]] | None = None
    for name, model_path in model_paths.items():
        model = CPSForSemanticSegmentation.from_pretrained(model_path).to(device)
        id2label = {int(key): str(value) for key, value in model.config.id2label.items()}
        if reference is None:
            reference = (name, id2label)
        elif id2label != reference[1]:
            raise ValueError(
                f"Model {name!r} has classes {id2label}, model {reference[0]!r} has {reference[1]}: a grid compares "
                "models of the same classes."
            )
        mean, std = load_image_normalization(model_path, model.config.backbone)
        masks_by_model[name] = [
            predict_segmentation(
                model, image, image_mean=mean, image_std=std, protocol=protocol, branch=branch
            )
            for image in images
        ]
        del model
    return masks_by_model
