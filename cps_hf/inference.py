"""Inference protocols: whole image or sliding window, multi-scale and flip test-time augmentation, any branch or
the ensemble, described by one [`InferenceProtocol`]; and loading a saved model with its image normalisation.

Every prediction is a map of class *probabilities*: test-time augmentation, overlapping windows and the ensemble all
average softmax probabilities, so the pieces compose (the ensemble of flip-averaged branches is the flip-average of
the ensemble). The protocol of the CPS paper (Chen et al., 2021) is `mode="slide"` with `crop_size=512` (VOC) or 800
(Cityscapes), the default stride `ceil(2/3 * crop_size)`, a single scale and no flip. [`~cps_hf.evaluation`] scores
a labelled split under a protocol.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub import constants
from PIL import Image as PILImage
from torch import Tensor, nn
from transformers.utils import logging

from .data import decode_image, size_pair
from .image_processing import backbone_normalization
from .losses import class_predictions
from .modeling_cps import CPSForSemanticSegmentation

logger = logging.get_logger(__name__)

__all__ = [
    "ENSEMBLE",
    "InferenceProtocol",
    "InferenceProtocolArguments",
    "branch_result_name",
    "is_local_path",
    "load_image_normalization",
    "load_model",
    "parse_branch_selection",
    "predict_branch_probabilities",
    "predict_logits",
    "predict_probabilities",
    "predict_segmentation",
]

ENSEMBLE = "ensemble"
BranchSelection = int | Literal["ensemble"]
InferenceMode = Literal["whole", "slide"]


# --------------------------------------------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceProtocol:
    """How a model predicts a whole image: the protocol that evaluation, prediction, figures and model cards share.

    Sizes are validated and resolved on construction: `crop_size` and `stride` become `(height, width)` pairs and the
    sliding-window stride defaults to the paper's `ceil(2/3 * crop_size)`.

    Args:
        mode (`str`, *optional*, defaults to `"whole"`):
            `"whole"` (one forward pass on the full image) or `"slide"` (sliding window).
        crop_size (`int` or `tuple[int, int]`, *optional*):
            Window `(height, width)` (one int: a square); required for `mode="slide"`, not allowed otherwise.
        stride (`int` or `tuple[int, int]`, *optional*):
            Window step; defaults to `ceil(2/3 * crop_size)`.
        scales (`Sequence[float]`, *optional*, defaults to `(1.0,)`):
            Test-time scale factors.
        flip (`bool`, *optional*, defaults to `False`):
            Also average the prediction of the horizontally flipped image.
        window_batch_size (`int`, *optional*, defaults to 8):
            Number of windows (over the whole batch) per forward pass in `"slide"` mode; does not change the result.
        autocast_dtype (`torch.dtype`, *optional*):
            Run the model under `torch.autocast` with this dtype (e.g. `torch.bfloat16` on CUDA); off by default.
            Probabilities are always computed and averaged in float32.

    Raises:
        ValueError: for an unknown mode, a missing or misplaced crop size, a stride larger than the crop, no or
            non-positive scales, a window batch size below 1 or a non-floating autocast dtype.

    Example:

    ```python
    >>> InferenceProtocol(mode="slide", crop_size=512).stride  # the paper's VOC protocol
    (342, 342)
    ```
    """

    mode: InferenceMode = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window_batch_size: int = 8
    autocast_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"`mode` must be 'whole' or 'slide', got {self.mode!r}.")
        if self.mode == "whole" and (self.crop_size is not None or self.stride is not None):
            raise ValueError(
                f"`crop_size` ({self.crop_size!r}) and `stride` ({self.stride!r}) only apply to mode='slide'; got "
                "mode='whole'."
            )
        if self.mode == "slide":
            if self.crop_size is None:
                raise ValueError("mode='slide' needs a `crop_size` (e.g. 512 for VOC, 800 for Cityscapes).")
            crop_size = size_pair(self.crop_size, "crop_size")
            if self.stride is None:
                # The paper's stride: ceil(2/3 * crop), i.e. windows overlap by about a third.
                stride = (-(-2 * crop_size[0] // 3), -(-2 * crop_size[1] // 3))
            else:
                stride = size_pair(self.stride, "stride")
            if stride[0] > crop_size[0] or stride[1] > crop_size[1]:
                raise ValueError(
                    f"`stride` {stride} must not exceed `crop_size` {crop_size}: the windows would leave gaps."
                )
            # Frozen: the resolved values are set once, here.
            object.__setattr__(self, "crop_size", crop_size)
            object.__setattr__(self, "stride", stride)
        scales = tuple(float(scale) for scale in self.scales)
        if not scales or min(scales) <= 0:
            raise ValueError(f"`scales` must be a non-empty list of positive factors, got {list(scales)}.")
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "flip", bool(self.flip))
        if self.window_batch_size < 1:
            raise ValueError(f"`window_batch_size` must be >= 1, got {self.window_batch_size}.")
        if self.autocast_dtype is not None and not (
            isinstance(self.autocast_dtype, torch.dtype) and self.autocast_dtype.is_floating_point
        ):
            raise ValueError(
                f"`autocast_dtype` must be a floating torch dtype or None, got {self.autocast_dtype!r}."
            )

    def to_json_dict(self) -> dict[str, Any]:
        """What defines the measured numbers, as JSON-ready values (the `protocol` of evaluation reports):
        `mode`, `crop_size` and `stride` (`[height, width]` or `None`), `scales`, `flip`.
        `InferenceProtocol(**protocol.to_json_dict())` predicts the same (window batch size and autocast at their
        defaults)."""
        return {
            "mode": self.mode,
            "crop_size": list(self.crop_size) if self.crop_size is not None else None,
            "stride": list(self.stride) if self.stride is not None else None,
            "scales": list(self.scales),
            "flip": self.flip,
        }


@dataclass
class InferenceProtocolArguments:
    """The inference-protocol flags of `scripts/evaluate_cps.py`, `scripts/predict.py` and `scripts/visualize.py`
    (parse them with `HfArgumentParser` next to the script's own arguments); see [`InferenceProtocol`]."""

    mode: str = field(
        default=InferenceProtocol.mode, metadata={"help": "'whole' image or 'slide' (sliding window)."}
    )
    crop_size: list[int] | None = field(
        default=None, metadata={"help": "Sliding-window size: one value or height width."}
    )
    stride: list[int] | None = field(
        default=None, metadata={"help": "Sliding-window step (default: ceil(2/3 crop_size))."}
    )
    scales: list[float] = field(
        default_factory=lambda: list(InferenceProtocol.scales), metadata={"help": "Test-time scales."}
    )
    flip: bool = field(
        default=InferenceProtocol.flip, metadata={"help": "Average with the horizontally flipped image."}
    )
    window_batch_size: int = field(
        default=InferenceProtocol.window_batch_size, metadata={"help": "Sliding windows per forward pass."}
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast (CUDA)."})

    def to_protocol(self) -> InferenceProtocol:
        """The validated protocol (raises `ValueError`)."""
        return InferenceProtocol(
            mode=self.mode,
            crop_size=self.crop_size,
            stride=self.stride,
            scales=self.scales,
            flip=self.flip,
            window_batch_size=self.window_batch_size,
            autocast_dtype=torch.bfloat16 if self.bf16 else None,
        )


# --------------------------------------------------------------------------------------------------------------
# Models and branches
# --------------------------------------------------------------------------------------------------------------


def _num_branches(model: nn.Module) -> int | None:
    """Number of branches of a CPS-like model (`branches` + `forward(..., branch_index=)`), `None` for a plain
    model."""
    if hasattr(model, "branches") and "branch_index" in inspect.signature(model.forward).parameters:
        return len(model.branches)
    return None


def _check_branch(model: nn.Module, branch: Any) -> BranchSelection | None:
    num_branches = _num_branches(model)
    if num_branches is None:
        if branch is not None:
            raise ValueError(
                f"`branch={branch!r}` needs a multi-branch model (with `branches` and `forward(..., branch_index=)`); "
                f"{type(model).__name__} has none: pass branch=None."
            )
        return None
    if branch is None:
        branch = getattr(model.config, "inference_branch", 0)
    if branch == ENSEMBLE:
        return ENSEMBLE
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < num_branches:
        raise ValueError(
            f"`branch` must be a branch index in [0, {num_branches}) or 'ensemble', got {branch!r}."
        )
    return branch


def _requested_branches(
    model: nn.Module, branches: Sequence[BranchSelection] | None
) -> list[BranchSelection | None]:
    """The validated, distinct `branches` to predict; by default every branch and the ensemble (`[None]` for a plain
    model)."""
    if branches is None:
        num_branches = _num_branches(model)
        return [None] if num_branches is None else [*range(num_branches), ENSEMBLE]
    requested = list(dict.fromkeys(_check_branch(model, branch) for branch in branches))
    if not requested:
        raise ValueError("`branches` must name at least one branch or 'ensemble'.")
    return requested


def branch_result_name(branch: BranchSelection | None) -> str:
    """Key of a branch's results: `"branch_<i>"`, `"ensemble"`, or `"model"` for a single-branch model."""
    if branch is None:
        return "model"
    return ENSEMBLE if branch == ENSEMBLE else f"branch_{branch}"


def parse_branch_selection(values: Sequence[str | int]) -> list[BranchSelection]:
    """Parses command-line branch choices: `["0", "1", "ensemble"]` -> `[0, 1, "ensemble"]`.

    Raises:
        ValueError: for a value that is neither an integer nor `"ensemble"`.
    """
    selection: list[BranchSelection] = []
    for value in values:
        if isinstance(value, int) or str(value).strip().lstrip("-").isdigit():
            selection.append(int(value))
        elif str(value).strip().lower() == ENSEMBLE:
            selection.append(ENSEMBLE)
        else:
            raise ValueError(f"A branch must be an integer index or 'ensemble', got {value!r}.")
    return selection


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Puts every submodule in eval mode and restores each one's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _forward_branches(
    model: nn.Module, pixel_values: Tensor, branch_indices: Sequence[int | None], protocol: InferenceProtocol
) -> list[Tensor]:
    """Softmax probabilities `(batch, num_labels, h, w)` of each requested branch (`None`: the plain model)."""
    if protocol.autocast_dtype is not None:
        autocast = torch.autocast(device_type=pixel_values.device.type, dtype=protocol.autocast_dtype)
    else:
        autocast = nullcontext()
    with autocast:
        branch_logits = []
        for branch_index in branch_indices:
            if branch_index is None:
                output = model(pixel_values=pixel_values)
                branch_logits.append(output.logits if hasattr(output, "logits") else output[0])
            else:
                branch_logits.append(model(pixel_values, branch_index=branch_index).logits)
    probabilities = []
    for logits in branch_logits:
        if logits.shape[-2:] != pixel_values.shape[-2:]:
            # Models that predict at a lower resolution (e.g. SegFormer's stride 4).
            logits = F.interpolate(
                logits.float(), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False
            )
        probabilities.append(logits.float().softmax(dim=1))
    return probabilities


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    # As in the reference evaluator: windows every `stride` pixels, the last one moved back to end at the border.
    num_windows = math.ceil((length - crop) / stride) + 1
    return [min(index * stride, length - crop) for index in range(num_windows)]


def _slide(
    model: nn.Module, pixel_values: Tensor, branch_indices: Sequence[int | None], protocol: InferenceProtocol
) -> list[Tensor]:
    """Sliding-window probabilities of each branch, averaged over the windows covering each pixel."""
    batch_size, _, height, width = pixel_values.shape
    crop_height, crop_width = protocol.crop_size
    stride_height, stride_width = protocol.stride
    # Images smaller than the window are padded around (as in the reference evaluator) with 0, i.e. the mean colour
    # in normalised space, and the prediction is cropped back.
    padded_height, padded_width = max(height, crop_height), max(width, crop_width)
    pad_top, pad_left = (padded_height - height) // 2, (padded_width - width) // 2
    padding = (pad_left, padded_width - width - pad_left, pad_top, padded_height - height - pad_top)
    padded = F.pad(pixel_values, padding) if any(padding) else pixel_values

    positions = [
        (top, left)
        for top in _window_starts(padded_height, crop_height, stride_height)
        for left in _window_starts(padded_width, crop_width, stride_width)
    ]
    coverage = torch.zeros(1, 1, padded_height, padded_width, device=pixel_values.device)
    sums: list[Tensor] | None = None
    positions_per_chunk = max(1, protocol.window_batch_size // batch_size)
    for chunk_start in range(0, len(positions), positions_per_chunk):
        chunk = positions[chunk_start : chunk_start + positions_per_chunk]
        windows = torch.cat(
            [padded[:, :, top : top + crop_height, left : left + crop_width] for top, left in chunk]
        )  # (len(chunk) * batch, 3, crop_height, crop_width)
        window_probabilities = _forward_branches(model, windows, branch_indices, protocol)
        if sums is None:
            num_labels = window_probabilities[0].shape[1]
            sums = [
                padded.new_zeros(batch_size, num_labels, padded_height, padded_width) for _ in branch_indices
            ]
        for position, (top, left) in enumerate(chunk):
            coverage[..., top : top + crop_height, left : left + crop_width] += 1
            for branch_sum, probabilities in zip(sums, window_probabilities):
                branch_sum[..., top : top + crop_height, left : left + crop_width] += probabilities[
                    position * batch_size : (position + 1) * batch_size
                ]
    return [
        (branch_sum / coverage)[..., pad_top : pad_top + height, pad_left : pad_left + width]
        for branch_sum in sums
    ]


def _predict_view(
    model: nn.Module, pixel_values: Tensor, branch_indices: Sequence[int | None], protocol: InferenceProtocol
) -> list[Tensor]:
    if protocol.mode == "slide":
        return _slide(model, pixel_values, branch_indices, protocol)
    return _forward_branches(model, pixel_values, branch_indices, protocol)


def _predict_branches(
    model: nn.Module, pixel_values: Tensor, branch_indices: Sequence[int | None], protocol: InferenceProtocol
) -> list[Tensor]:
    """Probabilities of each branch at the input size, averaged over scales and flips."""
    height, width = pixel_values.shape[-2:]
    sums: list[Tensor] | None = None
    num_views = 0
    for scale in protocol.scales:
        scaled_size = (max(1, round(height * scale)), max(1, round(width * scale)))
        if scaled_size == (height, width):
            scaled = pixel_values
        else:
            scaled = F.interpolate(pixel_values, size=scaled_size, mode="bilinear", align_corners=False)
        views = [(scaled, False)] + ([(scaled.flip(-1), True)] if protocol.flip else [])
        for view, flipped in views:
            view_probabilities = _predict_view(model, view, branch_indices, protocol)
            for index, probabilities in enumerate(view_probabilities):
                if flipped:
                    probabilities = probabilities.flip(-1)
                if probabilities.shape[-2:] != (height, width):
                    probabilities = F.interpolate(
                        probabilities, size=(height, width), mode="bilinear", align_corners=False
                    )
                view_probabilities[index] = probabilities
            if sums is None:
                sums = view_probabilities
            else:
                sums = [total + probabilities for total, probabilities in zip(sums, view_probabilities)]
            num_views += 1
    return [total / num_views for total in sums]


# --------------------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def predict_branch_probabilities(
    model: nn.Module,
    pixel_values: Tensor,
    branches: Sequence[BranchSelection] | None = None,
    *,
    protocol: InferenceProtocol | None = None,
) -> dict[BranchSelection | None, Tensor]:
    """Class probabilities of several branches (and the ensemble) from one run of each branch.

    Each branch runs once per view (scale, flip) and window; the ensemble is the mean of all branches'
    probabilities, derived from them at no extra cost. See [`predict_probabilities`] for the protocol.

    Args:
        model (`nn.Module`):
            A [`~cps_hf.CPSForSemanticSegmentation`] (or any model with `branches` and `forward(...,
            branch_index=)`), or a plain segmentation model whose output has `logits` (then `branches` must be
            `None`).
        pixel_values (`torch.Tensor` of shape `(batch, 3, height, width)`):
            Normalised images.
        branches (`Sequence[int | "ensemble"]`, *optional*):
            What to predict. Defaults to every branch and the ensemble (`[None]` for a plain model).
        protocol ([`InferenceProtocol`], *optional*):
            How to predict; defaults to `InferenceProtocol()` (whole image, single scale, no flip).

    Returns:
        `dict`: for each requested branch (key: its index, `"ensemble"`, or `None` for a plain model) a float32
        `(batch, num_labels, height, width)` tensor of probabilities on the model's device.
    """
    protocol = protocol if protocol is not None else InferenceProtocol()
    num_branches = _num_branches(model)
    branches = _requested_branches(model, branches)
    if ENSEMBLE in branches:
        branch_indices = list(range(num_branches))
    else:
        branch_indices = list(dict.fromkeys(branches))
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(
            f"`pixel_values` must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}."
        )
    pixel_values = pixel_values.to(_model_device(model), torch.float32)
    with _evaluation_mode(model):
        probabilities = dict(
            zip(branch_indices, _predict_branches(model, pixel_values, branch_indices, protocol))
        )
    results = {}
    for branch in branches:
        if branch == ENSEMBLE:
            results[ENSEMBLE] = torch.stack([probabilities[index] for index in range(num_branches)]).mean(
                dim=0
            )
        else:
            results[branch] = probabilities[branch]
    return results


def predict_probabilities(
    model: nn.Module,
    pixel_values: Tensor,
    *,
    protocol: InferenceProtocol | None = None,
    branch: BranchSelection | None = None,
) -> Tensor:
    """Class probabilities of a model under an inference protocol, at the input resolution.

    - `mode="whole"`: one forward pass on the full image.
    - `mode="slide"`: windows of `crop_size` every `stride` pixels (the last window of a row or column is moved
      back to end at the border); an image smaller than the window is padded around with 0 (the mean colour of the
      normalised image) and the prediction cropped back. The windows' probabilities are summed and divided by the
      number of windows covering each pixel. (The reference evaluator sums window *logits*; averaging
      probabilities can change the argmax only where windows overlap and disagree.)
    - `scales`: the image is resized by each factor (bilinear, `align_corners=False`), predicted, and the
      probabilities resized back to the input size; `flip` also predicts the horizontally flipped image and flips
      the result back. All views are averaged with equal weight.
    - The ensemble is the mean of the branches' probabilities, as in the model's own `"ensemble"` logits.

    The model is run under `torch.inference_mode()` in eval mode (each submodule's mode is restored afterwards).

    Args:
        model (`nn.Module`):
            A [`~cps_hf.CPSForSemanticSegmentation`] or a plain segmentation model whose output has `logits` (lower
            resolution logits are upsampled bilinearly).
        pixel_values (`torch.Tensor` of shape `(batch, 3, height, width)`):
            Normalised images; moved to the model's device.
        protocol ([`InferenceProtocol`], *optional*):
            How to predict; defaults to `InferenceProtocol()` (whole image, single scale, no flip).
        branch (`int` or `"ensemble"`, *optional*):
            Which branch of a CPS model predicts; defaults to `model.config.inference_branch`. Must be `None` for a
            plain model.

    Returns:
        `torch.Tensor`: float32 `(batch, num_labels, height, width)` probabilities (summing to 1 over classes) on
        the model's device.

    Raises:
        ValueError: for an invalid branch.

    Example:

    ```python
    >>> protocol = InferenceProtocol(mode="slide", crop_size=512)
    >>> probabilities = predict_probabilities(model, pixel_values, protocol=protocol)  # doctest: +SKIP
    >>> predictions = probabilities.argmax(dim=1)  # doctest: +SKIP
    ```
    """
    branch = _check_branch(model, branch)
    return predict_branch_probabilities(
        model, pixel_values, None if branch is None else [branch], protocol=protocol
    )[branch]


def predict_logits(
    model: nn.Module,
    pixel_values: Tensor,
    *,
    protocol: InferenceProtocol | None = None,
    branch: BranchSelection | None = None,
) -> Tensor:
    """Log-probabilities under an inference protocol: `log(predict_probabilities(model, pixel_values, ...))`.

    They are logits in the sense of the model's own `"ensemble"` output: `softmax` of them gives the averaged
    probabilities back, and their argmax is the prediction. Takes the arguments of [`predict_probabilities`].

    Returns:
        `torch.Tensor`: float32 `(batch, num_labels, height, width)`.
    """
    probabilities = predict_probabilities(model, pixel_values, protocol=protocol, branch=branch)
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


def predict_segmentation(
    model: nn.Module,
    image: PILImage.Image | Tensor | Any,
    *,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    protocol: InferenceProtocol | None = None,
    branch: BranchSelection | None = None,
) -> Tensor:
    """Label map of one image of any size.

    Args:
        model (`nn.Module`):
            The segmentation model.
        image (`PIL.Image.Image`, `torch.Tensor`, `np.ndarray`, path, ...):
            Anything [`~cps_hf.data.decode_image`] accepts (converted to RGB in `[0, 1]`).
        image_mean (`Sequence[float]`):
            Normalisation mean for images in `[0, 1]` (see [`load_image_normalization`]).
        image_std (`Sequence[float]`):
            Normalisation standard deviation for images in `[0, 1]`.
        protocol ([`InferenceProtocol`], *optional*):
            How to predict; defaults to `InferenceProtocol()`.
        branch (`int` or `"ensemble"`, *optional*):
            Which branch predicts; defaults to `model.config.inference_branch`.

    Returns:
        `torch.LongTensor`: `(height, width)` class ids, on the CPU.
    """
    pixels = decode_image(image)
    mean = torch.tensor(list(image_mean), dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(list(image_std), dtype=torch.float32).view(3, 1, 1)
    probabilities = predict_probabilities(
        model, ((pixels - mean) / std).unsqueeze(0), protocol=protocol, branch=branch
    )
    return class_predictions(probabilities)[0].cpu()


def is_local_path(name: str) -> bool:
    """Whether a model or dataset name is a local path rather than a Hub id (which has at most one `/`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def load_model(model_name_or_path: str) -> CPSForSemanticSegmentation:
    """A saved CPS model from a local folder or a Hub id, in eval mode on the CPU.

    Args:
        model_name_or_path (`str`):
            A folder written by `save_pretrained` (a training run's `output_dir`) or a Hub id.

    Returns:
        [`~cps_hf.CPSForSemanticSegmentation`]: the model.

    Raises:
        FileNotFoundError: if `model_name_or_path` is a local path without a saved model in it.
        OSError: if it names no local folder and cannot be loaded from the Hub (offline, unknown id).
    """
    path = Path(model_name_or_path).expanduser()
    if path.is_dir() or is_local_path(model_name_or_path):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{model_name_or_path!r} is not a saved model folder: {path / 'config.json'} does not exist."
            )
        return CPSForSemanticSegmentation.from_pretrained(path).eval()
    try:
        return CPSForSemanticSegmentation.from_pretrained(model_name_or_path).eval()
    except OSError as error:
        raise OSError(
            f"{model_name_or_path!r} is no local folder, and loading it as a Hub id failed "
            f"(HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}): {error}"
        ) from error


def load_image_normalization(
    model_name_or_path: str, backbone: str | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std that normalise `[0, 1]` images for a saved model, read from its image processor.

    The `preprocessor_config.json` saved next to a CPS model is the reference (its rescale factor is folded in, so
    the values apply to images in `[0, 1]`). Without one, the timm `backbone`'s pretraining normalisation is used.

    Args:
        model_name_or_path (`str`):
            Folder or Hub id of the model.
        backbone (`str`, *optional*):
            timm backbone name, the fallback (ImageNet's statistics if it is `None` or unknown to timm).

    Returns:
        `tuple[tuple[float, ...], tuple[float, ...]]`: `(mean, std)`, three values each.
    """
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        logger.warning(
            f"No image processor found for {model_name_or_path!r} ({type(error).__name__}); normalising with the "
            f"statistics of backbone {backbone!r}."
        )
        return backbone_normalization(backbone or "")
    if getattr(processor, "do_resize", False):
        logger.warning(
            f"The image processor of {model_name_or_path!r} resizes inputs; this protocol predicts at the native "
            "resolution (use `scales` to change it)."
        )
    # The processor computes (pixel * rescale - mean) / std on 0-255 pixels; for x = pixel / 255 in [0, 1] this is
    # (x - mean / k) / (std / k) with k = 255 * rescale.
    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    unit = 255.0 * rescale
    if getattr(processor, "do_normalize", True):
        mean, std = processor.image_mean, processor.image_std
        if isinstance(mean, int | float):
            mean = [mean] * 3
        if isinstance(std, int | float):
            std = [std] * 3
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return tuple(float(value) / unit for value in mean), tuple(float(value) / unit for value in std)
