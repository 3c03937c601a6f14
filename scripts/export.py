"""Export a trained CPS model to ONNX or `torch.export` with dynamic batch size, height and width.

    python scripts/export.py --model outputs/cps-demo --format onnx --output exported/cps-demo.onnx
    python scripts/export.py --model outputs/cps-demo --format torch_export --output exported/cps-demo.pt2 --branch ensemble
    python scripts/export.py --model my-org/cps-demo --format onnx --output cps-demo.onnx --opset 20

The exported graph maps normalised `pixel_values` (batch, 3, height, width) to `logits` (batch, num_labels, height,
width); normalise with the mean and std of the model's `preprocessor_config.json`.
"""

from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

from cps_hf.export import export_model
from cps_hf.inference import load_model, parse_branch_selection


@dataclass
class ExportArguments:
    """Which model, to which format, where."""

    model: str = field(metadata={"help": "Saved CPS model: a local folder or a Hub id."})
    format: Literal["onnx", "torch_export"] = field(metadata={"help": "onnx or torch_export."})
    output: str = field(metadata={"help": "File to write: *.onnx for onnx, *.pt2 for torch_export."})
    branch: str | None = field(
        default=None, metadata={"help": "Branch index or 'ensemble' (default: the model's inference_branch)."}
    )
    opset: int | None = field(default=None, metadata={"help": "ONNX opset (default 18)."})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv)
    branch = parse_branch_selection([args.branch])[0] if args.branch is not None else None
    model = load_model(args.model)
    path = export_model(model, args.output, args.format, branch=branch, opset=args.opset)
    print(f"Exported {args.model} ({args.format}) to {path}")


if __name__ == "__main__":
    main()
