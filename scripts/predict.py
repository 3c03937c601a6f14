"""Segment images with a saved CPS model: writes `<stem>_mask.png` (palette PNG whose pixel values are the class ids)
and `<stem>_overlay.png` (class colours over the image) for every input image.

    python scripts/predict.py --model runs/demo --output_dir predictions image1.png photos/
    python scripts/predict.py --model runs/voc --output_dir out --mode slide --crop_size 512 --branch ensemble img.jpg

Inputs are image files or folders (every image directly inside). The image processor saved with the model gives the
normalisation; the protocol flags are those of `scripts/evaluate_cps.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image as PILImage
from transformers import HfArgumentParser

from cps_hf import CPSForSemanticSegmentation
from cps_hf.inference import (
    InferenceProtocolArguments,
    load_image_normalization,
    parse_branch_selection,
    predict_segmentation,
)
from cps_hf.visualization import colorize_mask, overlay, segmentation_palette

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class PredictionArguments:
    """Which model, where to write, and the inference protocol."""

    model: str = field(metadata={"help": "Saved CPS model: a local folder or a Hub id."})
    output_dir: str = field(metadata={"help": "Folder for the <stem>_mask.png and <stem>_overlay.png files."})
    branch: str | None = field(
        default=None, metadata={"help": "Branch index or 'ensemble' (default: the model's inference_branch)."}
    )
    alpha: float = field(default=0.5, metadata={"help": "Opacity of the class colours in the overlay."})
    device: str | None = field(
        default=None, metadata={"help": "Device (default: cuda if available, else cpu)."}
    )


def list_images(inputs: list[str]) -> list[Path]:
    """The image files among `inputs`, folders expanded to the images they hold (sorted)."""
    paths = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            paths.extend(sorted(item for item in path.iterdir() if item.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"Input {name!r} is neither an image file nor a folder.")
    stems = [path.stem for path in paths]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        raise ValueError(
            f"Several inputs share the file stem(s) {duplicates}: their outputs would overwrite."
        )
    return paths


def main() -> None:
    parser = HfArgumentParser((PredictionArguments, InferenceProtocolArguments))
    parser.add_argument("inputs", nargs="+", help="Image files or folders of images.")
    args, protocol_args, extra = parser.parse_args_into_dataclasses()
    protocol = protocol_args.to_protocol()
    image_paths = list_images(extra.inputs)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = CPSForSemanticSegmentation.from_pretrained(args.model).to(device)
    mean, std = load_image_normalization(args.model, model.config.backbone)
    palette = segmentation_palette(model.config.num_labels)
    branch = parse_branch_selection([args.branch])[0] if args.branch is not None else None

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for image_path in image_paths:
        image = PILImage.open(image_path).convert("RGB")
        mask = predict_segmentation(
            model,
            image,
            image_mean=mean,
            image_std=std,
            protocol=protocol,
            branch=branch,
        )
        colorize_mask(mask, palette).save(output_dir / f"{image_path.stem}_mask.png")
        overlay(image, mask, palette, alpha=args.alpha).save(output_dir / f"{image_path.stem}_overlay.png")
        print(f"{image_path} -> {output_dir / image_path.stem}_{{mask,overlay}}.png")


if __name__ == "__main__":
    main()
