"""Speed of one CutMix CPS training step (benchmark tooling, not part of the installed package): the paper's step structure against cps_hf's optimised step.

[`reference_cutmix_step`] reproduces the official step (TorchSemiSeg) call for call: fp32, eight separate forward
calls through the individual branches (two no-grad teacher passes per branch, one student pass per branch on the
mixed image, one supervised pass per branch). [`fast_cutmix_step`] learns the same thing with fewer, larger calls
(every branch per model call, as [`~cps_hf.trainer.CPSTrainer`] does), optional bfloat16 autocast, channels-last
memory layout and no host synchronisation. [`benchmark_steps`] times any step function; [`run_benchmark`] runs both
steps from the same initial weights on the same batches, each in its own process, and returns a JSON-ready report.
"""

from __future__ import annotations

import copy
import functools
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.utils import logging

from cps_hf.configuration_cps import CPSConfig
from cps_hf.losses import class_predictions, cross_pseudo_supervision_loss, supervised_cross_entropy
from cps_hf.masking import generate_cutmix_masks, mix_with_mask
from cps_hf.modeling_cps import CPSForSemanticSegmentation
from cps_hf.trainer import check_cutmix_inputs, cutmix_forward, in_memory_format

logger = logging.get_logger(__name__)

STEP_MODES = ("reference", "fast")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CUTMIX_BATCH_KEYS = (
    "pixel_values",
    "labels",
    "unlabeled_pixel_values",
    "mix_unlabeled_pixel_values",
    "cutmix_masks",
)


@dataclass
class CutMixStepOutput:
    """
    Detached loss terms of one CutMix CPS training step (tensors on the model's device: reading them is the
    caller's choice of host synchronisation).

    Args:
        loss (`torch.Tensor`): `supervised_loss + cps_weight * cps_loss`.
        supervised_loss (`torch.Tensor`): supervised cross-entropy summed over the branches.
        cps_loss (`torch.Tensor`): cross pseudo supervision loss on the mixed unlabelled images.
    """

    loss: Tensor
    supervised_loss: Tensor
    cps_loss: Tensor


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPES.values():
        raise ValueError(
            f"`dtype` must be torch.float32 or torch.bfloat16, got {dtype} (float16 would need a gradient scaler)."
        )


def _step_losses(
    model: nn.Module,
    labeled_logits: list[Tensor],
    labels: Tensor,
    student_logits: list[Tensor],
    pseudo_labels: list[Tensor],
    cps_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    ignore_index = model.config.semantic_loss_ignore_index
    supervised = torch.stack(
        [supervised_cross_entropy(logits, labels, ignore_index) for logits in labeled_logits]
    ).sum()
    cps = cross_pseudo_supervision_loss(student_logits, pseudo_labels)
    return supervised + cps_weight * cps, supervised, cps


def reference_cutmix_step(
    model: CPSForSemanticSegmentation,
    batch: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    cps_weight: float,
) -> CutMixStepOutput:
    """
    One CutMix CPS training step with the official step structure: fp32, eight separate forward calls for two
    branches. For each branch, no-grad teacher passes on `u0` and then on `u1` (train-mode BatchNorm, as the
    official code); their logits are mixed with the box masks and argmaxed into that branch's pseudo-labels. Then
    each branch predicts the mixed image `u0 * (1 - m) + u1 * m`, then each branch predicts the labelled batch.
    `loss = Σ_branches CE(labelled) + cps_weight * CPS`; backward; optimizer step; `zero_grad` keeping zeroed
    gradient tensors, as PyTorch 1.x did.

    Args:
        model (`CPSForSemanticSegmentation`):
            The model, in training mode.
        batch (`Mapping[str, torch.Tensor]`):
            `pixel_values`, `labels`, `unlabeled_pixel_values` (`u0`), `mix_unlabeled_pixel_values` (`u1`) and
            `cutmix_masks` `(batch, 1, height, width)` in {0, 1}, on the model's device.
        optimizer (`torch.optim.Optimizer`):
            Optimizer over the model's parameters.
        cps_weight (`float`):
            λ, the weight of the CPS loss.

    Returns:
        [`CutMixStepOutput`]: the detached loss terms.
    """
    check_cutmix_inputs(batch)
    source_images, partner_images = batch["unlabeled_pixel_values"], batch["mix_unlabeled_pixel_values"]
    masks = batch["cutmix_masks"]
    num_branches = len(model.branches)
    pseudo_labels = []
    with torch.no_grad():
        for branch_index in range(num_branches):
            source_logits = model(source_images, branch_index=branch_index).logits
            partner_logits = model(partner_images, branch_index=branch_index).logits
            pseudo_labels.append(class_predictions(mix_with_mask(source_logits, partner_logits, masks)))
    mixed_images = mix_with_mask(source_images, partner_images, masks)
    student_logits = [model(mixed_images, branch_index=index).logits for index in range(num_branches)]
    labeled_logits = [
        model(batch["pixel_values"], branch_index=index).logits for index in range(num_branches)
    ]
    loss, supervised, cps = _step_losses(
        model, labeled_logits, batch["labels"], student_logits, pseudo_labels, cps_weight
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return CutMixStepOutput(loss=loss.detach(), supervised_loss=supervised.detach(), cps_loss=cps.detach())


def prepare_model_for_fast_step(
    model: CPSForSemanticSegmentation,
    *,
    channels_last: bool = True,
    compile: bool = False,
    gradient_checkpointing: bool = False,
) -> CPSForSemanticSegmentation:
    """
    One-off preparation for [`fast_cutmix_step`], before the optimizer is built: channels-last parameters (the
    layout fast convolution kernels use, so no per-call transposes), optionally `torch.compile` of every branch in
    place (module and parameter identities and state-dict keys unchanged) and gradient checkpointing.

    Args:
        model (`CPSForSemanticSegmentation`):
            The model to prepare (modified in place).
        channels_last (`bool`, *optional*, defaults to `True`):
            Convert 4-D parameters and buffers to `torch.channels_last`.
        compile (`bool`, *optional*, defaults to `False`):
            Compile each branch with `torch.compile` (the first steps then include compilation time; merged teacher
            batches have another batch size and compile a second graph).
        gradient_checkpointing (`bool`, *optional*, defaults to `False`):
            `model.gradient_checkpointing_enable()`, as training's `--gradient_checkpointing true`.

    Returns:
        `CPSForSemanticSegmentation`: the same model.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if compile:
        for branch in model.branches:
            branch.compile()
    return model


def fast_cutmix_step(
    model: CPSForSemanticSegmentation,
    batch: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    cps_weight: float,
    *,
    dtype: torch.dtype,
    fused_forward: bool = False,
    channels_last: bool = False,
) -> CutMixStepOutput:
    """
    One CutMix CPS training step that learns what [`reference_cutmix_step`] learns, with fewer and cheaper calls:
    the forward passes of [`~cps_hf.trainer.CPSTrainer`] ([`~cps_hf.trainer.cutmix_forward`]: every model call runs
    all branches, two no-grad teacher calls, one student call, one labelled call, so each branch's BatchNorm sees
    exactly the batches of the official step, in the same order), optional bfloat16 autocast, channels-last inputs, losses in fp32, no host synchronisation and
    `zero_grad(set_to_none=True)`. In fp32 without `fused_forward` the loss and the updated weights equal
    the reference step's up to floating-point reassociation.

    Args:
        model (`CPSForSemanticSegmentation`):
            The model, in training mode; call [`prepare_model_for_fast_step`] first when `channels_last=True`.
        batch (`Mapping[str, torch.Tensor]`):
            As for [`reference_cutmix_step`].
        optimizer (`torch.optim.Optimizer`):
            Optimizer over the model's parameters.
        cps_weight (`float`):
            λ, the weight of the CPS loss.
        dtype (`torch.dtype`):
            `torch.float32`, or `torch.bfloat16` for bfloat16 autocast (CPU and CUDA) of the forward passes.
        fused_forward (`bool`, *optional*, defaults to `False`):
            The fused step (two model calls: teachers on `[u0 ; u1]`, students on `[labelled ; mixed]`; see
            [`~cps_hf.trainer.cutmix_forward`]). Not the paper's step in train mode: BatchNorm then normalises over
            the concatenations. With BatchNorm in eval mode it computes the reference step's losses.
        channels_last (`bool`, *optional*, defaults to `False`):
            Feed all images in `torch.channels_last` layout (layout only, same values).

    Returns:
        [`CutMixStepOutput`]: the detached loss terms (not read back to the host).
    """
    _check_dtype(dtype)
    autocast = torch.autocast(
        device_type=batch["pixel_values"].device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16
    )
    with autocast:
        images = in_memory_format(batch, torch.channels_last) if channels_last else batch
        forward = cutmix_forward(model, images, fused_forward=fused_forward)
    # Losses in fp32 whatever the forward dtype: log-softmax over bf16 logits loses the small probabilities.
    loss, supervised, cps = _step_losses(
        model,
        [logits.float() for logits in forward.labeled_logits],
        batch["labels"],
        [logits.float() for logits in forward.student_logits],
        forward.pseudo_labels,
        cps_weight,
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return CutMixStepOutput(loss=loss.detach(), supervised_loss=supervised.detach(), cps_loss=cps.detach())


def make_cutmix_batch(
    batch_size: int,
    crop_size: int,
    num_labels: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    ignore_index: int = 255,
) -> dict[str, Tensor]:
    """
    A random CutMix CPS batch shaped like the training collator's: `batch_size` labelled and `batch_size`
    unlabelled images (plus their mixing partners and box masks) of `crop_size × crop_size`; about 5% of the label
    pixels are `ignore_index`.

    Args:
        batch_size (`int`): images per stream.
        crop_size (`int`): height and width.
        num_labels (`int`): number of classes.
        generator (`torch.Generator`, *optional*): CPU generator of all the randomness.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`): device of the returned tensors.
        ignore_index (`int`, *optional*, defaults to 255): label value of unlabelled pixels.

    Returns:
        `dict[str, torch.Tensor]` with the keys of `CUTMIX_BATCH_KEYS`.
    """
    shape = (batch_size, 3, crop_size, crop_size)
    labels = torch.randint(num_labels, (batch_size, crop_size, crop_size), generator=generator)
    ignored = torch.rand(labels.shape, generator=generator) < 0.05
    batch = {
        "pixel_values": torch.randn(shape, generator=generator),
        "labels": torch.where(ignored, torch.full_like(labels, ignore_index), labels),
        "unlabeled_pixel_values": torch.randn(shape, generator=generator),
        "mix_unlabeled_pixel_values": torch.randn(shape, generator=generator),
        "cutmix_masks": generate_cutmix_masks(batch_size, crop_size, crop_size, generator),
    }
    return {key: value.to(device) for key, value in batch.items()}


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        torch.accelerator.synchronize(device)


@dataclass(frozen=True)
class ConvolutionCall:
    """One convolution call of a step: the layer, its input shape and layout, and whether it ran with gradients."""

    layer: nn.Conv2d
    input_shape: tuple[int, ...]
    channels_last: bool
    with_grad: bool

    @property
    def key(self) -> tuple[Any, ...]:
        layer = self.layer
        return (
            tuple(layer.weight.shape),
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            self.input_shape,
            self.channels_last,
            self.with_grad,
        )


def counted_step(step: Callable[[], Any], model: nn.Module) -> tuple[float, list[ConvolutionCall]]:
    """Runs `step` once, counting its FLOPs (`torch.utils.flop_counter`, forward and backward) and recording every
    `nn.Conv2d` call of `model`. Returns the GFLOP and the calls."""
    calls: list[ConvolutionCall] = []

    def record(layer: nn.Conv2d, args: tuple[Tensor, ...]) -> None:
        images = args[0]
        channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
        calls.append(
            ConvolutionCall(
                layer,
                tuple(images.shape),
                channels_last and not images.is_contiguous(),
                torch.is_grad_enabled(),
            )
        )

    handles = [
        layer.register_forward_pre_hook(record) for layer in model.modules() if isinstance(layer, nn.Conv2d)
    ]
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops() / 1e9, calls


def _run_convolution(layer: nn.Conv2d, images: Tensor, with_grad: bool, autocast: torch.autocast) -> None:
    with torch.set_grad_enabled(with_grad), autocast:
        output = layer(images)
    if with_grad:
        output.float().sum().backward()


def convolution_peak_gflops(
    calls: list[ConvolutionCall], dtype: torch.dtype, device: torch.device, repeats: int = 3
) -> float:
    """
    The machine's rate on the step's own convolutions: each distinct call (same weights shape, stride, padding,
    dilation, groups, input shape and layout) run alone, forward — and backward for the inputs and weights when the
    step ran it with gradients — at the step's dtype and thread count, best of `repeats`; FLOPs counted as for the
    step. Returns GFLOP/s over all calls, each weighted by how often the step makes it.
    """
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    total_gflop = total_seconds = 0.0
    for key, count in Counter(call.key for call in calls).items():
        call = next(call for call in calls if call.key == key)
        layer = copy.deepcopy(call.layer)
        images = torch.randn(call.input_shape, device=device)
        if call.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images.requires_grad_(call.with_grad)

        run = functools.partial(_run_convolution, layer, images, call.with_grad, autocast)
        run()
        with FlopCounterMode(display=False) as counter:
            run()
        seconds = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
        total_gflop += count * counter.get_total_flops() / 1e9
        total_seconds += count * min(seconds)
    return total_gflop / total_seconds


class _StepTimer:
    """Times single steps of one step function; summarises them with the memory figures of this process."""

    def __init__(
        self,
        step_fn: Callable[[Mapping[str, Tensor]], Any],
        make_batch: Callable[[], Mapping[str, Tensor]],
        model: nn.Module | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.step_fn, self.make_batch, self.model, self.dtype = step_fn, make_batch, model, dtype
        self.device = self.images_per_step = self.rss_before = None

    def step(self) -> float:
        batch = self.make_batch()
        if self.device is None:
            self.device = batch["pixel_values"].device
            self.images_per_step = batch["pixel_values"].shape[0] + batch["unlabeled_pixel_values"].shape[0]
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                self.rss_before = _current_rss_bytes()
        _synchronize(self.device)
        start = time.perf_counter()
        self.step_fn(batch)
        _synchronize(self.device)
        return time.perf_counter() - start

    def run(self, steps: int, warmup: int) -> list[float]:
        """Runs `warmup` untimed and `steps` timed steps; returns the timed steps' seconds."""
        _check_step_counts(steps, warmup)
        return [self.step() for _ in range(warmup + steps)][warmup:]

    def efficiency(self, step_seconds: float) -> dict[str, float]:
        """FLOPs of one more step, the rate they were done at in `step_seconds`, the machine's rate on the same
        convolutions alone ([`convolution_peak_gflops`]) and their ratio."""
        batch = self.make_batch()
        step_gflop, calls = counted_step(lambda: self.step_fn(batch), self.model)
        peak_gflops = convolution_peak_gflops(calls, self.dtype, self.device)
        achieved_gflops = step_gflop / step_seconds
        return {
            "step_gflop": step_gflop,
            "achieved_gflops": achieved_gflops,
            "convolution_peak_gflops": peak_gflops,
            "efficiency": achieved_gflops / peak_gflops,
        }

    def summary(self, timings: list[float]) -> dict[str, Any]:
        median = statistics.median(timings)
        result: dict[str, Any] = {
            "step_seconds_median": median,
            "step_seconds_min": min(timings),
            "step_seconds_max": max(timings),
            "step_seconds": timings,
            "images_per_step": self.images_per_step,
            "images_per_second": self.images_per_step / median,
        }
        if self.device.type == "cuda":
            result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
            result["peak_memory_kind"] = "cuda_max_memory_allocated"
        else:
            result["peak_memory_bytes"] = _peak_rss_bytes()
            result["peak_memory_kind"] = "process_peak_rss"
            result["rss_before_steps_bytes"] = self.rss_before
        return result


def _check_step_counts(steps: int, warmup: int) -> None:
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    if warmup < 0:
        raise ValueError(f"`warmup` must be >= 0, got {warmup}.")


def benchmark_steps(
    step_fn: Callable[[Mapping[str, Tensor]], Any],
    make_batch: Callable[[], Mapping[str, Tensor]],
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """
    Times `step_fn` on `warmup + steps` batches from `make_batch` (made outside the timed region) and summarises
    the last `steps`. The device is synchronised before and after each timed step, so step times are wall-clock
    times of finished work.

    Memory: on CUDA, `torch.cuda.max_memory_allocated` over all the steps (warm-up included; the peak counter is
    reset first, so model, optimizer state, activations and the batch are all counted). Elsewhere, the peak
    resident set size of the process (`getrusage`), which never decreases over a process's life: it only
    describes one step function when that function runs in a process of its own, as [`run_benchmark`] does;
    `rss_before_steps_bytes` gives the resident size before the first step for a growth figure.

    Args:
        step_fn (`Callable`): runs one training step on a batch.
        make_batch (`Callable`): returns the next batch (tensors on the target device).
        steps (`int`): timed steps (>= 1).
        warmup (`int`): untimed steps first (>= 0).

    Returns:
        `dict` with `step_seconds_median`, `step_seconds_min`, `step_seconds_max`, `step_seconds` (every timed
        step), `images_per_step` (labelled + unlabelled images; the CutMix partner images are not counted),
        `images_per_second` (per median step), `peak_memory_bytes`, `peak_memory_kind` and, off CUDA,
        `rss_before_steps_bytes`.
    """
    timer = _StepTimer(step_fn, make_batch)
    return timer.summary(timer.run(steps, warmup))


@dataclass
class BenchmarkArguments:
    """What to benchmark: the network, the batch, the fast step's options and the measurement."""

    backbone: str = field(default="resnet50s", metadata={"help": "timm backbone of each branch."})
    multi_grid: list[int] = field(
        default_factory=lambda: [1, 2, 4],
        metadata={"help": "Last-stage dilation multipliers (paper: 1 2 4); `0`: timm's (e.g. test_resnet)."},
    )
    num_labels: int = field(default=21, metadata={"help": "Number of classes (VOC: 21)."})
    crop_size: int = field(default=512, metadata={"help": "Square crop size in pixels."})
    batch_size: int = field(
        default=8, metadata={"help": "Labelled images per step, and as many unlabelled ones (>= 2)."}
    )
    steps: int = field(default=10, metadata={"help": "Timed steps per mode."})
    warmup: int = field(default=3, metadata={"help": "Untimed steps first (use more with --compile)."})
    device: str | None = field(
        default=None, metadata={"help": "'cpu', 'cuda', 'cuda:1'... (default: cuda if available)."}
    )
    dtype: str = field(
        default="fp32", metadata={"help": "Forward dtype of the fast step: 'fp32' or 'bf16' (autocast)."}
    )
    cps_weight: float = field(default=1.0, metadata={"help": "λ (CutMix VOC: 1.0)."})
    learning_rate: float = field(default=0.0025, metadata={"help": "SGD learning rate (momentum 0.9)."})
    fused_forward: bool = field(
        default=False,
        metadata={
            "help": "Fast step fused: teachers on [u0 ; u1], students on [labelled ; mixed] (BN over both)."
        },
    )
    channels_last: bool = field(
        default=False, metadata={"help": "Fast step: channels-last layout of the whole model."}
    )
    skip_padding_taps: bool = field(
        default=True,
        metadata={"help": "Fast step: dilated convolutions skip taps that only read zero padding (exact)."},
    )
    compile: bool = field(default=False, metadata={"help": "Fast step: torch.compile each branch."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Fast step: gradient checkpointing (recompute activations in the backward pass)."},
    )
    fused_optimizer: bool = field(
        default=True, metadata={"help": "Fast step: fused SGD kernel (same update, fewer kernel launches)."}
    )
    cudnn_benchmark: bool = field(
        default=True, metadata={"help": "cuDNN autotuning, for both steps (the official code enables it)."}
    )
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads (default: torch's)."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights and of the batches."})
    isolate_processes: bool = field(
        default=True,
        metadata={"help": "Run each step in its own fresh process (honest CPU peak RSS, clean allocator)."},
    )
    output_json: str | None = field(default=None, metadata={"help": "Write the report to this JSON file."})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.batch_size < 2:
            raise ValueError(
                f"`batch_size` must be >= 2 (train-mode BatchNorm of the ASPP pooling branch needs it), "
                f"got {self.batch_size}."
            )
        if self.crop_size < 1 or self.steps < 1 or self.warmup < 0:
            raise ValueError(
                f"Need crop_size >= 1, steps >= 1, warmup >= 0; got {self.crop_size}, {self.steps}, {self.warmup}."
            )
        if self.compile and self.gradient_checkpointing and not self.fused_forward:
            raise ValueError(
                "`compile` with `gradient_checkpointing` needs `fused_forward` (see CPSTrainingArguments)."
            )
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.device(self.device)  # fails fast on a malformed device string


def build_benchmark_model(args: BenchmarkArguments, mode: str = "fast") -> CPSForSemanticSegmentation:
    """The benchmarked network (random weights drawn from `args.seed`), in training mode on CPU. The reference
    step's network computes every convolution tap, as the official implementation does."""
    multi_grid = args.multi_grid if args.multi_grid and 0 not in args.multi_grid else None
    config = CPSConfig(
        backbone=args.backbone,
        multi_grid=multi_grid,
        num_labels=args.num_labels,
        skip_padding_taps=args.skip_padding_taps and mode == "fast",
    )
    torch.manual_seed(args.seed)
    return CPSForSemanticSegmentation(config).train()


def _state_checksum(model: nn.Module) -> float:
    """A fingerprint of the weights: the sum of every parameter and buffer, in float64."""
    with torch.no_grad():
        return float(sum(tensor.double().sum() for tensor in model.state_dict().values()))


def _build_step(
    args: BenchmarkArguments, mode: str
) -> tuple[_StepTimer, dict[str, Any], list[CutMixStepOutput]]:
    """The model (from `args.seed`), SGD optimizer (momentum 0.9), batch stream (from `args.seed`) and step function
    of one mode, wrapped in a timer; plus facts about the setup and the list the step outputs are appended to."""
    if mode not in STEP_MODES:
        raise ValueError(f"`mode` must be one of {STEP_MODES}, got {mode!r}.")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    model = build_benchmark_model(args, mode)
    checksum = _state_checksum(model)
    fast = mode == "fast"
    model.to(device)
    if fast:
        prepare_model_for_fast_step(
            model,
            channels_last=args.channels_last,
            compile=args.compile,
            gradient_checkpointing=args.gradient_checkpointing,
        )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=args.learning_rate,
        momentum=0.9,
        weight_decay=1e-4,
        fused=True if fast and args.fused_optimizer else None,
    )
    generator = torch.Generator().manual_seed(args.seed)

    def make_batch() -> dict[str, Tensor]:
        return make_cutmix_batch(
            args.batch_size, args.crop_size, args.num_labels, generator=generator, device=device
        )

    outputs: list[CutMixStepOutput] = []

    def step_fn(batch: Mapping[str, Tensor]) -> None:
        if fast:
            output = fast_cutmix_step(
                model,
                batch,
                optimizer,
                args.cps_weight,
                dtype=DTYPES[args.dtype],
                fused_forward=args.fused_forward,
                channels_last=args.channels_last,
            )
        else:
            output = reference_cutmix_step(model, batch, optimizer, args.cps_weight)
        outputs.append(output)

    facts = {
        "initial_weights_checksum": checksum,
        "num_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    dtype = DTYPES[args.dtype] if fast else torch.float32
    return _StepTimer(step_fn, make_batch, model, dtype), facts, outputs


def _finish(timer: _StepTimer, facts: dict[str, Any], outputs: list[CutMixStepOutput], timings: list[float]):
    summary = timer.summary(timings)
    final_loss = outputs[-1].loss.item()
    # After the timed steps and the memory figures: counting runs one more step and the convolutions alone.
    return {**summary, **facts, "final_loss": final_loss, **timer.efficiency(summary["step_seconds_median"])}


def run_step_benchmark(args: BenchmarkArguments, mode: str) -> dict[str, Any]:
    """
    Benchmarks one step (`"reference"` or `"fast"`) on its own in this process: `args.warmup` untimed and
    `args.steps` timed steps (see [`benchmark_steps`]).

    Returns:
        `dict`: [`benchmark_steps`]'s result plus `initial_weights_checksum`, `final_loss`, `num_threads` and
        `device_name`.
    """
    timer, facts, outputs = _build_step(args, mode)
    return _finish(timer, facts, outputs, timer.run(args.steps, args.warmup))


def _step_worker(connection: Any, args: BenchmarkArguments, mode: str) -> None:
    # Runs in a spawned process: answers "step" with one step's seconds, a list of timings with the summary.
    timer, facts, outputs = _build_step(args, mode)
    connection.send("ready")
    while True:
        command = connection.recv()
        if command == "step":
            connection.send(timer.step())
        else:
            connection.send(_finish(timer, facts, outputs, command))
            return


class _ProcessStepper:
    """One mode's steps in a fresh spawned process (clean interpreter: its own RSS high-water mark, thread pools
    and CUDA context), driven one step at a time."""

    def __init__(self, args: BenchmarkArguments, mode: str):
        context = multiprocessing.get_context("spawn")
        self.connection, child_connection = context.Pipe()
        self.process = context.Process(target=_step_worker, args=(child_connection, args, mode), daemon=True)
        self.process.start()

    def _receive(self) -> Any:
        while not self.connection.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"The benchmark process stopped (exit code {self.process.exitcode}).")
        return self.connection.recv()

    def wait_ready(self) -> None:
        self._receive()

    def step(self) -> float:
        self.connection.send("step")
        return self._receive()

    def finish(self, timings: list[float]) -> dict[str, Any]:
        self.connection.send(timings)
        result = self._receive()
        self.process.join()
        return result


class _LocalStepper:
    def __init__(self, args: BenchmarkArguments, mode: str):
        self.timer, self.facts, self.outputs = _build_step(args, mode)

    def wait_ready(self) -> None:
        pass

    def step(self) -> float:
        return self.timer.step()

    def finish(self, timings: list[float]) -> dict[str, Any]:
        return _finish(self.timer, self.facts, self.outputs, timings)


def interleave_steps(
    runs: Mapping[str, tuple[BenchmarkArguments, str]],
    steps: int,
    warmup: int,
    isolate_processes: bool = True,
) -> dict[str, dict[str, Any]]:
    """
    Times several step set-ups alternately, one step each in turn (and the order reversed every round), so that a
    slow spell of the machine hits all alike. Each set-up runs in its own fresh process when `isolate_processes`
    (memory figures per set-up), otherwise all in this process.

    Args:
        runs (`Mapping[str, tuple[BenchmarkArguments, str]]`): name → (arguments, step mode) of each set-up.
        steps (`int`): timed steps per set-up.
        warmup (`int`): untimed rounds first.
        isolate_processes (`bool`, *optional*, defaults to `True`): one fresh process per set-up.

    Returns:
        `dict[str, dict]`: name → [`run_step_benchmark`]-style result.
    """
    _check_step_counts(steps, warmup)
    stepper_class = _ProcessStepper if isolate_processes else _LocalStepper
    steppers = {name: stepper_class(args, mode) for name, (args, mode) in runs.items()}
    for stepper in steppers.values():
        stepper.wait_ready()
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(warmup + steps):
        order = list(runs) if round_index % 2 == 0 else list(runs)[::-1]
        for name in order:
            seconds = steppers[name].step()
            if round_index >= warmup:
                timings[name].append(seconds)
    return {name: steppers[name].finish(timings[name]) for name in runs}


def run_interleaved(args: BenchmarkArguments) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    The reference and the fast step of `args`, timed alternately (see [`interleave_steps`]).

    Returns:
        `tuple[dict, dict]`: the reference's and the fast step's [`run_step_benchmark`]-style results.
    """
    results = interleave_steps(
        {mode: (args, mode) for mode in STEP_MODES}, args.steps, args.warmup, args.isolate_processes
    )
    return results["reference"], results["fast"]


def describe_machine() -> dict[str, Any]:
    """CPU model and count, platform, Python and torch versions (the device name comes from the benchmark)."""
    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                cpu_model,
            )
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def run_benchmark(args: BenchmarkArguments) -> dict[str, Any]:
    """
    Benchmarks the reference step (always fp32, NCHW, every convolution tap, plain SGD) and the fast step (options
    from `args`) from the same initial weights on the same batch stream, alternating their steps (see
    [`run_interleaved`]), each in a fresh process when `args.isolate_processes` (otherwise both in this process:
    CPU peak RSS then covers both and is reported as such).

    Returns:
        `dict`, JSON-ready: `reference_step_seconds`, `step_seconds` (medians), `speedup`, images/s and peak memory
        of both, `same_initial_weights`, `settings`, `machine`, and the full per-mode results under `reference`
        and `fast`.
    """
    reference, fast = run_interleaved(args)
    same_weights = reference["initial_weights_checksum"] == fast["initial_weights_checksum"]
    if not same_weights:
        logger.warning("The two steps started from different weights: the comparison is not like for like.")
    machine = describe_machine()
    machine.update(device_name=fast["device_name"], num_threads=fast["num_threads"])
    return {
        "reference_step_seconds": reference["step_seconds_median"],
        "step_seconds": fast["step_seconds_median"],
        "speedup": reference["step_seconds_median"] / fast["step_seconds_median"],
        "reference_images_per_second": reference["images_per_second"],
        "images_per_second": fast["images_per_second"],
        "reference_peak_memory_bytes": reference["peak_memory_bytes"],
        "peak_memory_bytes": fast["peak_memory_bytes"],
        "peak_memory_kind": fast["peak_memory_kind"],
        "memory_isolated": args.isolate_processes or fast["peak_memory_kind"] != "process_peak_rss",
        "step_gflop": fast["step_gflop"],
        "achieved_gflops": fast["achieved_gflops"],
        "efficiency": fast["efficiency"],
        "reference_step_gflop": reference["step_gflop"],
        "reference_achieved_gflops": reference["achieved_gflops"],
        "reference_efficiency": reference["efficiency"],
        "same_initial_weights": same_weights,
        "settings": asdict(args),
        "machine": machine,
        "reference": reference,
        "fast": fast,
    }


def format_benchmark_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of a [`run_benchmark`] report."""
    settings = report["settings"]
    rows = [
        (
            "step",
            "dtype",
            "median s",
            "min s",
            "max s",
            "images/s",
            "peak MiB",
            "final loss",
            "GFLOP",
            "GFLOP/s",
            "of peak",
        ),
    ]
    for name, dtype in (("reference", "fp32"), ("fast", settings["dtype"])):
        result = report[name]
        rows.append(
            (
                name,
                dtype,
                f"{result['step_seconds_median']:.4f}",
                f"{result['step_seconds_min']:.4f}",
                f"{result['step_seconds_max']:.4f}",
                f"{result['images_per_second']:.2f}",
                f"{result['peak_memory_bytes'] / 2**20:.0f}",
                f"{result['final_loss']:.4f}",
                f"{result['step_gflop']:.1f}",
                f"{result['achieved_gflops']:.1f}",
                f"{100 * result['efficiency']:.0f}%",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    machine = report["machine"]
    lines.append(
        f"speedup {report['speedup']:.2f}x | {settings['backbone']} crop {settings['crop_size']} batch "
        f"{settings['batch_size']}+{settings['batch_size']} | fused_forward={settings['fused_forward']} "
        f"channels_last={settings['channels_last']} compile={settings['compile']} "
        f"gradient_checkpointing={settings['gradient_checkpointing']} | "
        f"{machine['device_name'] or machine['cpu_model']}, {machine['num_threads']} threads | "
        f"memory: {report['peak_memory_kind']}"
    )
    return "\n".join(lines)
