"""Inference and evaluation protocols: whole image or sliding window, multi-scale and flip test-time augmentation,
any branch or the ensemble, and a one-pass evaluation of every branch with a distributed confusion matrix.

Every prediction is a map of class *probabilities*: test-time augmentation, overlapping windows and the ensemble all
average softmax probabilities, so the pieces compose (the ensemble of flip-averaged branches is the flip-average of
the ensemble). The protocol of the CPS paper (Chen et al., 2021) is `mode="slide"` with `crop_size=512` (VOC) or 800
(Cityscapes), the default stride `ceil(2/3 * crop_size)`, a single scale and no flip.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub import constants
from PIL import Image as PILImage
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm
from transformers.utils import logging

from .data import collate_semi_supervised, decode_image, size_pair
from .image_processing import backbone_normalization
from .metrics import StreamingSegmentationMetric, class_pixel_shares, metrics_from_confusion_matrix
from .modelcard import is_local_path
from .modeling_cps import CPSForSemanticSegmentation

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.get_logger(__name__)

__all__ = [
    "ENSEMBLE",
    "branch_result_name",
    "describe_protocol",
    "evaluate_model",
    "format_results_table",
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
class _Protocol:
    """A validated inference protocol."""

    mode: InferenceMode
    crop_size: tuple[int, int] | None
    stride: tuple[int, int] | None
    scales: tuple[float, ...]
    flip: bool
    window_batch_size: int
    autocast_dtype: torch.dtype | None

    @classmethod
    def create(
        cls,
        mode: str = "whole",
        crop_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        window_batch_size: int = 8,
        autocast_dtype: torch.dtype | None = None,
    ) -> _Protocol:
        if mode not in ("whole", "slide"):
            raise ValueError(f"`mode` must be 'whole' or 'slide', got {mode!r}.")
        if mode == "whole" and (crop_size is not None or stride is not None):
            raise ValueError(
                f"`crop_size` ({crop_size!r}) and `stride` ({stride!r}) only apply to mode='slide'; got mode='whole'."
            )
        crop_pair = stride_pair = None
        if mode == "slide":
            if crop_size is None:
                raise ValueError("mode='slide' needs a `crop_size` (e.g. 512 for VOC, 800 for Cityscapes).")
            crop_pair = size_pair(crop_size, "crop_size")
            if stride is None:
                # The paper's stride: ceil(2/3 * crop), i.e. windows overlap by about a third.
                stride_pair = tuple(-(-2 * side // 3) for side in crop_pair)
            else:
                stride_pair = size_pair(stride, "stride")
            if stride_pair[0] > crop_pair[0] or stride_pair[1] > crop_pair[1]:
                raise ValueError(
                    f"`stride` {stride_pair} must not exceed `crop_size` {crop_pair}: the windows would leave gaps."
                )
        scales = tuple(float(scale) for scale in scales)
        if not scales or min(scales) <= 0:
            raise ValueError(f"`scales` must be a non-empty list of positive factors, got {list(scales)}.")
        if window_batch_size < 1:
            raise ValueError(f"`window_batch_size` must be >= 1, got {window_batch_size}.")
        if autocast_dtype is not None and not (
            isinstance(autocast_dtype, torch.dtype) and autocast_dtype.is_floating_point
        ):
            raise ValueError(
                f"`autocast_dtype` must be a floating torch dtype or None, got {autocast_dtype!r}."
            )
        return cls(mode, crop_pair, stride_pair, scales, bool(flip), int(window_batch_size), autocast_dtype)

    def describe(self) -> dict[str, Any]:
        """The protocol as JSON-ready values (for result files)."""
        return {
            "mode": self.mode,
            "crop_size": list(self.crop_size) if self.crop_size is not None else None,
            "stride": list(self.stride) if self.stride is not None else None,
            "scales": list(self.scales),
            "flip": self.flip,
        }


def describe_protocol(
    mode: InferenceMode = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> dict[str, Any]:
    """Validates an inference protocol and returns it with its defaults resolved, as JSON-ready values.

    Returns:
        `dict[str, Any]`: `mode`, `crop_size` and `stride` (`[height, width]` or `None`), `scales`, `flip`.

    Raises:
        ValueError: as [`predict_probabilities`] for an invalid protocol.
    """
    return _Protocol.create(mode, crop_size, stride, scales, flip).describe()


@dataclass
class InferenceProtocolArguments:
    """The inference-protocol flags shared by `scripts/evaluate_cps.py`, `scripts/predict.py` and
    `scripts/visualize.py` (parse them with `HfArgumentParser` next to the script's own arguments)."""

    mode: str = field(default="whole", metadata={"help": "'whole' image or 'slide' (sliding window)."})
    crop_size: list[int] | None = field(
        default=None, metadata={"help": "Sliding-window size: one value or height width."}
    )
    stride: list[int] | None = field(
        default=None, metadata={"help": "Sliding-window step (default: ceil(2/3 crop_size))."}
    )
    scales: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "Test-time scales."})
    flip: bool = field(default=False, metadata={"help": "Average with the horizontally flipped image."})

    def protocol(self) -> dict[str, Any]:
        """Keyword arguments for [`predict_probabilities`] and friends, validated (raises `ValueError`)."""
        protocol = dict(
            mode=self.mode,
            crop_size=_single_or_pair(self.crop_size),
            stride=_single_or_pair(self.stride),
            scales=self.scales,
            flip=self.flip,
        )
        describe_protocol(**protocol)
        return protocol


def _single_or_pair(values: list[int] | None) -> int | list[int] | None:
    return values[0] if values and len(values) == 1 else values


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
    model: nn.Module, pixel_values: Tensor, branch_indices: Sequence[int | None], protocol: _Protocol
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
    model: nn.Module, pixel_values: Tensor, branch_indices: Sequence[int | None], protocol: _Protocol
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
    model: nn.Module, pixel_values: Tensor, branch_indices: Sequence[int | None], protocol: _Protocol
) -> list[Tensor]:
    if protocol.mode == "slide":
        return _slide(model, pixel_values, branch_indices, protocol)
    return _forward_branches(model, pixel_values, branch_indices, protocol)


def _predict_branches(
    model: nn.Module, pixel_values: Tensor, branch_indices: Sequence[int | None], protocol: _Protocol
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
    mode: InferenceMode = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> dict[BranchSelection | None, Tensor]:
    """Class probabilities of several branches (and the ensemble) from one run of each branch.

    Each branch runs once per view (scale, flip) and window; the ensemble is the mean of all branches'
    probabilities, derived from them at no extra cost. See [`predict_probabilities`] for the protocol arguments.

    Args:
        model (`nn.Module`):
            A [`~cps_hf.CPSForSemanticSegmentation`] (or any model with `branches` and `forward(...,
            branch_index=)`), or a plain segmentation model whose output has `logits` (then `branches` must be
            `None`).
        pixel_values (`torch.Tensor` of shape `(batch, 3, height, width)`):
            Normalised images.
        branches (`Sequence[int | "ensemble"]`, *optional*):
            What to predict. Defaults to every branch and the ensemble (`[None]` for a plain model).

    Returns:
        `dict`: for each requested branch (key: its index, `"ensemble"`, or `None` for a plain model) a float32
        `(batch, num_labels, height, width)` tensor of probabilities on the model's device.
    """
    protocol = _Protocol.create(mode, crop_size, stride, scales, flip, window_batch_size, autocast_dtype)
    num_branches = _num_branches(model)
    if branches is None:
        branches = [None] if num_branches is None else [*range(num_branches), ENSEMBLE]
    else:
        branches = [_check_branch(model, branch) for branch in branches]
        if not branches:
            raise ValueError("`branches` must name at least one branch or 'ensemble'.")
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
    mode: InferenceMode = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    branch: BranchSelection | None = None,
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
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
        mode (`str`, *optional*, defaults to `"whole"`):
            `"whole"` or `"slide"`.
        crop_size (`int` or `tuple[int, int]`, *optional*):
            Window `(height, width)`; required for `mode="slide"`.
        stride (`int` or `tuple[int, int]`, *optional*):
            Window step; defaults to `ceil(2/3 * crop_size)`, the paper's.
        scales (`Sequence[float]`, *optional*, defaults to `(1.0,)`):
            Test-time scale factors.
        flip (`bool`, *optional*, defaults to `False`):
            Also average the prediction of the horizontally flipped image.
        branch (`int` or `"ensemble"`, *optional*):
            Which branch of a CPS model predicts; defaults to `model.config.inference_branch`. Must be `None` for a
            plain model.
        window_batch_size (`int`, *optional*, defaults to 8):
            Number of windows (over the whole batch) per forward pass in `"slide"` mode.
        autocast_dtype (`torch.dtype`, *optional*):
            Run the model under `torch.autocast` with this dtype (e.g. `torch.bfloat16` on CUDA); off by default.
            Probabilities are always computed and averaged in float32.

    Returns:
        `torch.Tensor`: float32 `(batch, num_labels, height, width)` probabilities (summing to 1 over classes) on
        the model's device.

    Raises:
        ValueError: for an invalid protocol (unknown mode, missing crop size, stride larger than the crop,
            non-positive scales) or branch.

    Example:

    ```python
    >>> probabilities = predict_probabilities(model, pixel_values, mode="slide", crop_size=512)  # doctest: +SKIP
    >>> predictions = probabilities.argmax(dim=1)  # doctest: +SKIP
    ```
    """
    branch = _check_branch(model, branch)
    return predict_branch_probabilities(
        model,
        pixel_values,
        None if branch is None else [branch],
        mode=mode,
        crop_size=crop_size,
        stride=stride,
        scales=scales,
        flip=flip,
        window_batch_size=window_batch_size,
        autocast_dtype=autocast_dtype,
    )[branch]


def predict_logits(model: nn.Module, pixel_values: Tensor, **protocol: Any) -> Tensor:
    """Log-probabilities under an inference protocol: `log(predict_probabilities(model, pixel_values, ...))`.

    They are logits in the sense of the model's own `"ensemble"` output: `softmax` of them gives the averaged
    probabilities back, and their argmax is the prediction. Takes the keyword arguments of
    [`predict_probabilities`].

    Returns:
        `torch.Tensor`: float32 `(batch, num_labels, height, width)`.
    """
    probabilities = predict_probabilities(model, pixel_values, **protocol)
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


def predict_segmentation(
    model: nn.Module,
    image: PILImage.Image | Tensor | Any,
    *,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    **protocol: Any,
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
        protocol:
            Keyword arguments of [`predict_probabilities`].

    Returns:
        `torch.LongTensor`: `(height, width)` class ids, on the CPU.
    """
    pixels = decode_image(image)
    mean = torch.tensor(list(image_mean), dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(list(image_std), dtype=torch.float32).view(3, 1, 1)
    probabilities = predict_probabilities(model, ((pixels - mean) / std).unsqueeze(0), **protocol)
    return probabilities[0].argmax(dim=0).cpu()


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


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def _evaluation_loader(
    data: Dataset | DataLoader,
    batch_size: int,
    num_workers: int,
    accelerator: Accelerator | None,
    pin_memory: bool,
) -> DataLoader:
    if type(data).__module__.startswith("datasets."):
        raise TypeError(
            f"`data` must yield normalised `pixel_values` and `labels`; got a raw {type(data).__name__}. Wrap the "
            "split in `cps_hf.data.SupervisedSegmentationDataset`."
        )
    num_processes = accelerator.num_processes if accelerator is not None else 1
    if isinstance(data, DataLoader):
        if num_processes == 1:
            return data
        # Rebuilt on this process's shard of the dataset (same batching and collation).
        dataset, batch_size = data.dataset, data.batch_size or 1
        collate_fn, num_workers = data.collate_fn, data.num_workers
    else:
        dataset, collate_fn = data, collate_semi_supervised
    if num_processes > 1:
        # Every sample on exactly one process (no padding duplicates), so the summed confusion matrices are exact.
        dataset = Subset(dataset, range(accelerator.process_index, len(dataset), num_processes))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def evaluate_model(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    num_labels: int | None = None,
    ignore_index: int | None = None,
    id2label: Mapping[int, str] | None = None,
    branches: Sequence[BranchSelection] | None = None,
    mode: InferenceMode = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = 1,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluates every requested branch and the ensemble in one pass over the data.

    For each batch, each branch's probabilities are computed once (under the protocol of
    [`predict_probabilities`]), the ensemble is derived from them, and one confusion matrix per entry is updated.
    Labels may be smaller or larger than the images: probabilities are then resized bilinearly to the labels.

    Distributed: with an `accelerate.Accelerator` running several processes, each process evaluates a disjoint
    shard of the dataset (no sample is duplicated), and the confusion matrices of all entries are summed across
    processes in a single all-reduce at the end; every process returns the same metrics. The model must already be
    on `accelerator.device` (it is not wrapped in DDP: evaluation needs no gradient synchronisation).

    Args:
        model (`nn.Module`):
            A [`~cps_hf.CPSForSemanticSegmentation`] (or a plain segmentation model, evaluated as `"model"`).
        data (`torch.utils.data.Dataset` or `torch.utils.data.DataLoader`):
            Yields `{"pixel_values": (3, H, W), "labels": (H, W)}` items (e.g.
            [`~cps_hf.data.SupervisedSegmentationDataset`]) or batches of them.
        num_labels (`int`, *optional*):
            Number of classes; defaults to `model.config.num_labels`.
        ignore_index (`int`, *optional*):
            Label of pixels that are not evaluated; defaults to `model.config.semantic_loss_ignore_index` (255).
            Labels outside `[0, num_labels)` are not evaluated either.
        id2label (`Mapping[int, str]`, *optional*):
            Class names for the per-class keys; defaults to `model.config.id2label`.
        branches (`Sequence[int | "ensemble"]`, *optional*):
            What to evaluate; defaults to every branch and the ensemble.
        mode, crop_size, stride, scales, flip, window_batch_size, autocast_dtype:
            The inference protocol, see [`predict_probabilities`].
        batch_size (`int`, *optional*, defaults to 1):
            Images per batch when `data` is a dataset. Images of different sizes need 1, or a dataset resizing to
            a fixed `eval_size`.
        num_workers (`int`, *optional*, defaults to 0):
            Data-loading worker processes when `data` is a dataset.
        accelerator (`accelerate.Accelerator`, *optional*):
            Shards the data and reduces the metrics across its processes.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar (on the local main process).

    Returns:
        `dict[str, dict[str, float]]`: for each entry (`"branch_0"`, `"branch_1"`, ..., `"ensemble"`) the metrics
        of [`~cps_hf.metrics.metrics_from_confusion_matrix`]: `mean_iou`, `overall_accuracy`, `mean_accuracy` and
        `iou_<class name>`, plus the `predicted_share_<class name>` and `label_share_<class name>` of
        [`~cps_hf.metrics.class_pixel_shares`].
    """
    config = getattr(model, "config", None)
    num_labels = num_labels if num_labels is not None else getattr(config, "num_labels", None)
    if num_labels is None:
        raise ValueError("`num_labels` is required for a model without `config.num_labels`.")
    if ignore_index is None:
        ignore_index = getattr(config, "semantic_loss_ignore_index", 255)
    if id2label is None:
        id2label = getattr(config, "id2label", None)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    protocol_kwargs = dict(
        mode=mode,
        crop_size=crop_size,
        stride=stride,
        scales=scales,
        flip=flip,
        window_batch_size=window_batch_size,
        autocast_dtype=autocast_dtype,
    )
    _Protocol.create(**protocol_kwargs)  # fail before loading any data
    num_branches = _num_branches(model)
    if branches is None:
        entries = [None] if num_branches is None else [*range(num_branches), ENSEMBLE]
    else:
        entries = list(dict.fromkeys(_check_branch(model, branch) for branch in branches))
        if not entries:
            raise ValueError("`branches` must name at least one branch or 'ensemble'.")

    device = _model_device(model)
    loader = _evaluation_loader(data, batch_size, num_workers, accelerator, pin_memory=device.type == "cuda")
    metrics = {
        entry: StreamingSegmentationMetric(num_labels, ignore_index=ignore_index, device=device)
        for entry in entries
    }
    is_main = accelerator is None or accelerator.is_local_main_process
    start = time.perf_counter()
    num_images = 0
    for batch in tqdm(loader, desc="Evaluating", unit="batch", disable=not (progress and is_main)):
        if not isinstance(batch, Mapping) or "pixel_values" not in batch or "labels" not in batch:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"Evaluation batches must hold `pixel_values` and `labels`, got {found}.")
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        probabilities = predict_branch_probabilities(model, pixel_values, entries, **protocol_kwargs)
        for entry, metric in metrics.items():
            metric.update(probabilities[entry], labels)
        num_images += pixel_values.shape[0]
    elapsed = time.perf_counter() - start
    logger.info(
        f"Evaluated {num_images} images in {elapsed:.1f}s ({num_images / max(elapsed, 1e-9):.2f} images/s)."
    )

    matrices = torch.stack(
        [
            metric.matrix
            if metric.matrix is not None
            else torch.zeros(num_labels, num_labels, dtype=torch.long, device=device)
            for metric in metrics.values()
        ]
    )  # (num_entries, num_labels, num_labels)
    if accelerator is not None and accelerator.num_processes > 1:
        matrices = accelerator.reduce(matrices, reduction="sum")
    return {
        branch_result_name(entry): {
            **metrics_from_confusion_matrix(matrix, id2label),
            **class_pixel_shares(matrix, id2label),
        }
        for entry, matrix in zip(entries, matrices)
    }


def format_results_table(
    results: Mapping[str, Mapping[str, float]], id2label: Mapping[int, str] | None = None
) -> str:
    """A text table of [`evaluate_model`] results in percent: one row per class IoU, then mIoU, pixel accuracy and
    mean class accuracy; one column per branch / the ensemble. NaN (a class absent from predictions and labels)
    shows as `-`.

    Args:
        results (`Mapping[str, Mapping[str, float]]`):
            As returned by [`evaluate_model`].
        id2label (`Mapping[int, str]`, *optional*):
            Class names in id order; by default the `iou_<name>` keys of the results, in their order.

    Returns:
        `str`: the table, without a trailing newline.
    """
    columns = list(results)
    if not columns:
        return ""
    first = results[columns[0]]
    if id2label:
        class_names = [str(id2label[key]) for key in sorted(id2label, key=int)]
    else:
        class_names = [key.removeprefix("iou_") for key in first if key.startswith("iou_")]
    rows = [(name, f"iou_{name}") for name in class_names]
    rows += [("mIoU", "mean_iou"), ("pixel acc", "overall_accuracy"), ("mean acc", "mean_accuracy")]
    corner = "IoU (%)"
    label_width = max(len(corner), *(len(label) for label, _ in rows))
    column_width = max(9, *(len(column) for column in columns))

    def format_value(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"

    lines = [f"{corner:<{label_width}}" + "".join(f"  {column:>{column_width}}" for column in columns)]
    for position, (label, key) in enumerate(rows):
        if position == len(class_names):
            lines.append("-" * len(lines[0]))
        values = "".join(f"  {format_value(results[column].get(key)):>{column_width}}" for column in columns)
        lines.append(f"{label:<{label_width}}{values}")
    return "\n".join(lines)
