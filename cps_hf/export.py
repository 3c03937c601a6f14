"""Export of a CPS model for serving outside training code: an ONNX file (for onnxruntime and other ONNX runtimes)
or a `torch.export` program (`.pt2`), both taking any batch size, height and width.

The exported graph maps normalised images `pixel_values` `(batch, 3, height, width)` to `logits`
`(batch, num_labels, height, width)` of one branch, or of the ensemble (the log of the branches' mean softmax, as
[`~cps_hf.CPSForSemanticSegmentation`] computes it). Normalise with the mean and standard deviation of the
`preprocessor_config.json` saved next to the model ([`~cps_hf.inference.load_image_normalization`]).

ONNX export needs `onnx` and `onnxscript`, running it needs `onnxruntime` (`pip install cps_hf[deploy]`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from transformers.utils import logging

from .inference import ENSEMBLE, BranchSelection, _check_branch
from .modeling_cps import CPSForSemanticSegmentation, ensemble_logits

logger = logging.get_logger(__name__)

ExportFormat = Literal["onnx", "torch_export"]
EXPORT_FORMATS: dict[str, str] = {"onnx": ".onnx", "torch_export": ".pt2"}
"""Each export format and the file suffix its output must have."""

# The lowest opset torch's ONNX exporter implements; it converts to lower ones on a best-effort basis only.
DEFAULT_ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
# Batch 2, not 1: tracing specialises sizes 0 and 1 to constants.
EXAMPLE_INPUT_SHAPE = (2, 3, 64, 64)
METADATA_FILE_NAME = "cps_hf_export.json"


class SegmentationLogits(nn.Module):
    """
    The tensor-to-tensor module that is exported: normalised images to the logits of one branch or of the ensemble.

    Args:
        model ([`~cps_hf.CPSForSemanticSegmentation`]):
            The model; it is shared, not copied.
        branch (`int` or `"ensemble"`, *optional*):
            What predicts; defaults to `model.config.inference_branch`.
    """

    def __init__(self, model: CPSForSemanticSegmentation, branch: BranchSelection | None = None):
        super().__init__()
        self.model = model
        self.branch = _check_branch(model, branch)

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self.branch == ENSEMBLE:
            branch_logits = tuple(
                self.model(pixel_values, branch_index=index).logits
                for index in range(len(self.model.branches))
            )
            return ensemble_logits(branch_logits)  # (batch, num_labels, height, width)
        return self.model(pixel_values, branch_index=self.branch).logits


def export_metadata(module: SegmentationLogits) -> dict[str, str]:
    """What a consumer of the exported file needs besides the graph: class names, branch, input and output names."""
    config = module.model.config
    return {
        "id2label": json.dumps({str(index): name for index, name in config.id2label.items()}),
        "branch": str(module.branch),
        "backbone": config.backbone,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
    }


def _example_input(module: nn.Module) -> Tensor:
    parameter = next(module.parameters())
    return torch.randn(*EXAMPLE_INPUT_SHAPE, device=parameter.device, dtype=parameter.dtype)


def export_program(
    model: CPSForSemanticSegmentation, branch: BranchSelection | None = None
) -> torch.export.ExportedProgram:
    """
    Traces `model` (in eval mode) with `torch.export`, batch size, height and width dynamic.

    The program checks its input sizes at run time: backbones whose feature maps must keep more than one pixel
    (e.g. timm's `test_resnet` at output stride 16: more than 16 pixels per side) reject smaller images with an
    `AssertionError` naming the size.

    Args:
        model ([`~cps_hf.CPSForSemanticSegmentation`]):
            The model; it is put in eval mode.
        branch (`int` or `"ensemble"`, *optional*):
            What predicts; defaults to `model.config.inference_branch`.

    Returns:
        `torch.export.ExportedProgram`: call `program.module()(pixel_values)` for the logits.
    """
    module = SegmentationLogits(model, branch).eval()
    dynamic = {axis: torch.export.Dim.DYNAMIC for axis in DYNAMIC_AXES}
    return torch.export.export(module, (_example_input(module),), dynamic_shapes={INPUT_NAME: dynamic})


def _onnx_program(module: SegmentationLogits, opset: int) -> torch.onnx.ONNXProgram:
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "ONNX export needs `onnx` and `onnxscript`: pip install 'cps_hf[deploy]' (or onnx onnxscript)."
        ) from error
    return torch.onnx.export(
        module,
        (_example_input(module),),
        dynamic_shapes={INPUT_NAME: DYNAMIC_AXES},
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
    )


def export_model(
    model: CPSForSemanticSegmentation,
    output: str | Path,
    export_format: ExportFormat = "onnx",
    branch: BranchSelection | None = None,
    opset: int | None = None,
) -> Path:
    """
    Writes `model` as an ONNX file or a `torch.export` program with dynamic batch size, height and width.

    Args:
        model ([`~cps_hf.CPSForSemanticSegmentation`]):
            The model; it is put in eval mode.
        output (`str` or `Path`):
            The file to write: `*.onnx` for `"onnx"`, `*.pt2` for `"torch_export"`. Parent folders are created.
        export_format (`str`, *optional*, defaults to `"onnx"`):
            `"onnx"` or `"torch_export"`.
        branch (`int` or `"ensemble"`, *optional*):
            What predicts; defaults to `model.config.inference_branch`.
        opset (`int`, *optional*):
            ONNX opset (default 18, the lowest the exporter writes); only for `"onnx"`.

    Returns:
        `Path`: the written file. The class names, branch and tensor names are stored with it: as ONNX metadata
        properties, or as the extra file `cps_hf_export.json` of the `.pt2` archive.

    Raises:
        ValueError: for an unknown format, an output suffix that does not match it, an opset below 18 or given
            for `"torch_export"`, or an invalid branch.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"`export_format` must be one of {sorted(EXPORT_FORMATS)}, got {export_format!r}.")
    output = Path(output)
    suffix = EXPORT_FORMATS[export_format]
    if output.suffix != suffix:
        raise ValueError(f"A {export_format!r} export is written to a `{suffix}` file, got {str(output)!r}.")
    if opset is not None and export_format != "onnx":
        raise ValueError(f"`opset` applies to ONNX export only, got opset={opset} for {export_format!r}.")
    opset = DEFAULT_ONNX_OPSET if opset is None else opset
    if opset < DEFAULT_ONNX_OPSET:
        raise ValueError(
            f"`opset` must be {DEFAULT_ONNX_OPSET} or newer (torch's ONNX exporter implements no older one), got {opset}."
        )

    module = SegmentationLogits(model, branch).eval()
    metadata = export_metadata(module)
    output.parent.mkdir(parents=True, exist_ok=True)
    if export_format == "onnx":
        program = _onnx_program(module, opset)
        program.model.metadata_props.update(metadata)
        program.save(output, external_data=False)
    else:
        torch.export.save(
            export_program(model, module.branch),
            output,
            extra_files={METADATA_FILE_NAME: json.dumps(metadata)},
        )
    logger.info(
        f"Exported {metadata['backbone']} ({export_format}, branch {metadata['branch']}) to {output}."
    )
    return output


def load_exported_model(path: str | Path, num_threads: int | None = None) -> Callable[[Tensor], Tensor]:
    """
    Loads a file written by [`export_model`] for inference: onnxruntime (CPU) for `.onnx`, the exported program
    for `.pt2`.

    Args:
        path (`str` or `Path`):
            The exported file.
        num_threads (`int`, *optional*):
            onnxruntime's intra-op threads (default: its own choice); a `.pt2` program uses torch's threads.

    Returns:
        `Callable`: maps float32 `pixel_values` `(batch, 3, height, width)` to `logits` `(batch, num_labels,
        height, width)` (CPU tensors).

    Raises:
        ValueError: for a file that is neither `.onnx` nor `.pt2`.
    """
    path = Path(path)
    if path.suffix == EXPORT_FORMATS["onnx"]:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run_onnx(pixel_values: Tensor) -> Tensor:
            inputs = {INPUT_NAME: np.ascontiguousarray(pixel_values.detach().cpu().numpy(), dtype=np.float32)}
            return torch.from_numpy(session.run([OUTPUT_NAME], inputs)[0])

        return run_onnx
    if path.suffix == EXPORT_FORMATS["torch_export"]:
        program_module = torch.export.load(str(path)).module()

        def run_program(pixel_values: Tensor) -> Tensor:
            with torch.inference_mode():
                return program_module(pixel_values.float())

        return run_program
    raise ValueError(f"Expected an exported `.onnx` or `.pt2` file, got {str(path)!r}.")


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata [`export_model`] stored with an exported file (`id2label` is a JSON string)."""
    path = Path(path)
    if path.suffix == EXPORT_FORMATS["onnx"]:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return {entry.key: entry.value for entry in model.metadata_props}
    extra_files = {METADATA_FILE_NAME: ""}
    torch.export.load(str(path), extra_files=extra_files)
    return json.loads(extra_files[METADATA_FILE_NAME])


__all__ = [
    "DEFAULT_ONNX_OPSET",
    "EXPORT_FORMATS",
    "SegmentationLogits",
    "export_model",
    "export_program",
    "load_exported_model",
    "read_export_metadata",
]
