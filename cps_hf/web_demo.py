"""The web demo of a trained CPS model (a Gradio app, as in a Hugging Face Space): upload or pick an image, choose a
branch or the ensemble, and see the segmentation overlay, a legend of the class colours with each class's share of
the pixels, and the headline numbers of the model card.

Needs `gradio` (`pip install cps_hf[deploy]`), imported only when the app is built.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from huggingface_hub import ModelCard
from PIL import Image as PILImage
from transformers.utils import logging

from .hub import EXAMPLE_IMAGE_PATTERN
from .inference import (
    ENSEMBLE,
    load_image_normalization,
    load_model,
    parse_branch_selection,
    predict_segmentation,
)
from .modeling_cps import CPSForSemanticSegmentation
from .visualization import overlay, segmentation_palette

if TYPE_CHECKING:
    import gradio

logger = logging.get_logger(__name__)

# The input and the overlay are shown this many pixels high: small images are scaled up, pixels kept sharp.
IMAGE_HEIGHT = 320
DEMO_CSS = (
    f"#cps-input img, #cps-overlay img {{ height: {IMAGE_HEIGHT}px; width: auto; max-width: 100%; "
    "object-fit: contain; image-rendering: pixelated; }"
)
"""Pass to `launch(css=DEMO_CSS)` (Gradio 6 takes the page's CSS at launch)."""

__all__ = [
    "DEMO_CSS",
    "SegmentationDemo",
    "build_demo",
    "class_legend_html",
    "headline_numbers_markdown",
    "pixel_shares",
]


def pixel_shares(mask: torch.Tensor, num_labels: int) -> list[float]:
    """Fraction of the pixels of `mask` (class ids, any shape) given to each class."""
    counts = torch.bincount(mask.flatten().long(), minlength=num_labels).double()
    return (counts / max(mask.numel(), 1)).tolist()


def class_legend_html(class_names: Sequence[str], palette: Sequence[int], shares: Sequence[float]) -> str:
    """An HTML table: colour swatch, class name and share of the pixels (%), classes in id order."""
    rows = []
    for index, (name, share) in enumerate(zip(class_names, shares)):
        red, green, blue = palette[3 * index : 3 * index + 3]
        rows.append(
            f'<tr class="cps-legend-row"><td><span class="cps-swatch" style="display:inline-block;width:1.2em;'
            f'height:1.2em;border:1px solid #888;background:rgb({red},{green},{blue})"></span></td>'
            f'<td class="cps-class-name">{html.escape(name)}</td><td style="text-align:right">{100 * share:.1f} %</td></tr>'
        )
    return (
        '<table class="cps-legend"><thead><tr><th></th><th>class</th><th>pixels</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def headline_numbers_markdown(model_name_or_path: str) -> str:
    """
    The measured mIoUs of the model card (`README.md` of a model folder, or of a Hub repository): one line per
    `model-index` entry. Says so when there is no card or it records no evaluation.
    """
    path = Path(model_name_or_path).expanduser()
    source = path / "README.md" if path.is_dir() else model_name_or_path
    if path.is_dir() and not source.is_file():
        return "No model card (README.md) in the model folder: no measured numbers to show."
    try:
        card = ModelCard.load(source)
    except Exception as error:  # noqa: BLE001 - any failure to read the card only drops the numbers
        logger.warning(f"Could not read the model card of {model_name_or_path!r}: {error}")
        return "The model card could not be read: no measured numbers to show."
    results = card.data.eval_results or []
    if not results:
        return "The model card records no evaluation."
    lines = ["| evaluation | dataset (split) | mIoU (%) |", "|---|---|---|"]
    for result in results:
        label = (result.metric_config or result.metric_name or result.metric_type).replace("|", "/")
        split = f" ({result.dataset_split})" if result.dataset_split else ""
        lines.append(f"| {label} | {result.dataset_name}{split} | **{result.metric_value}** |")
    return "\n".join(lines)


def find_example_images(model_name_or_path: str) -> list[Path]:
    """The `example_*.png` images shipped in a local model folder (none for a Hub id)."""
    path = Path(model_name_or_path).expanduser()
    return sorted(path.glob(EXAMPLE_IMAGE_PATTERN)) if path.is_dir() else []


@dataclass
class SegmentationDemo:
    """
    What the app computes, independent of Gradio: the model with its normalisation and palette.

    Args:
        model ([`~cps_hf.CPSForSemanticSegmentation`]): the model, in eval mode.
        image_mean (`tuple[float, ...]`): normalisation mean for images in `[0, 1]`.
        image_std (`tuple[float, ...]`): normalisation standard deviation for images in `[0, 1]`.
    """

    model: CPSForSemanticSegmentation
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @classmethod
    def from_pretrained(cls, model_name_or_path: str) -> SegmentationDemo:
        model = load_model(model_name_or_path)
        mean, std = load_image_normalization(model_name_or_path, model.config.backbone)
        return cls(model, mean, std)

    @property
    def class_names(self) -> list[str]:
        id2label = self.model.config.id2label
        return [str(id2label[index]) for index in sorted(id2label, key=int)]

    @property
    def branch_choices(self) -> list[str]:
        return [f"branch {index}" for index in range(len(self.model.branches))] + [ENSEMBLE]

    def default_branch_choice(self) -> str:
        branch = self.model.config.inference_branch
        return ENSEMBLE if branch == ENSEMBLE else f"branch {branch}"

    def segment(self, image: PILImage.Image | np.ndarray, branch_choice: str) -> tuple[PILImage.Image, str]:
        """
        Segments one image with the chosen branch (`"branch <i>"`) or `"ensemble"`.

        Returns:
            `tuple[PIL.Image.Image, str]`: the overlay (class colours at half opacity over the image) and the
            legend's HTML with each class's pixel share.
        """
        if image is None:
            raise ValueError("Upload an image or pick an example first.")
        image = PILImage.fromarray(image) if isinstance(image, np.ndarray) else image
        image = image.convert("RGB")
        branch = parse_branch_selection([branch_choice.removeprefix("branch ").strip()])[0]
        mask = predict_segmentation(
            self.model, image, image_mean=self.image_mean, image_std=self.image_std, branch=branch
        )
        palette = segmentation_palette(self.model.config.num_labels)
        shares = pixel_shares(mask, self.model.config.num_labels)
        return overlay(image, mask, palette), class_legend_html(self.class_names, palette, shares)


def build_demo(
    model_name_or_path: str, examples: Sequence[str | Path] | None = None, title: str | None = None
) -> gradio.Blocks:
    """
    The Gradio app of a saved model.

    Args:
        model_name_or_path (`str`):
            A saved CPS model: a local folder or a Hub id.
        examples (`Sequence`, *optional*):
            Example image files to pick from; defaults to the `example_*.png` files of a local model folder.
        title (`str`, *optional*):
            Page title; defaults to the model's name.

    Returns:
        `gradio.Blocks`: call `.launch(css=DEMO_CSS)` on it.
    """
    import gradio as gr

    demo_model = SegmentationDemo.from_pretrained(model_name_or_path)
    examples = [
        str(path) for path in (examples if examples is not None else find_example_images(model_name_or_path))
    ]
    title = title or Path(str(model_name_or_path).rstrip("/")).name
    config = demo_model.model.config

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {html.escape(title)}\n"
            f"Semantic segmentation with Cross Pseudo Supervision (CPS): DeepLabv3+ on `{config.backbone}`, "
            f"{len(demo_model.model.branches)} branches, {config.num_labels} classes."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="pil", label="Image", elem_id="cps-input", sources=["upload", "clipboard"]
                )
                branch = gr.Radio(
                    demo_model.branch_choices,
                    value=demo_model.default_branch_choice(),
                    label="Branch",
                    elem_id="cps-branch",
                )
                button = gr.Button("Segment", variant="primary", elem_id="cps-segment")
                if examples:
                    gr.Examples(examples=examples, inputs=image, label="Examples")
            with gr.Column():
                result = gr.Image(
                    type="pil", label="Segmentation overlay", elem_id="cps-overlay", interactive=False
                )
                legend = gr.HTML(label="Legend", elem_id="cps-legend")
        gr.Markdown("## Measured on the model card\n" + headline_numbers_markdown(model_name_or_path))
        button.click(demo_model.segment, inputs=[image, branch], outputs=[result, legend])
        image.upload(demo_model.segment, inputs=[image, branch], outputs=[result, legend])
        branch.change(_segment_if_image(demo_model), inputs=[image, branch], outputs=[result, legend])
    return demo


def _segment_if_image(demo_model: SegmentationDemo) -> Any:
    """Re-segments on a branch change once an image is there; leaves the outputs alone before."""
    import gradio as gr

    def run(image: PILImage.Image | None, branch_choice: str) -> tuple[Any, Any]:
        if image is None:
            return gr.skip(), gr.skip()
        return demo_model.segment(image, branch_choice)

    return run
