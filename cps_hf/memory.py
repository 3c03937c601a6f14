"""Peak memory of one training step per device, predicted without an accelerator.

The estimate runs the training step itself on fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes,
dtypes and strides, no storage) under `torch.distributed._tools.mem_tracker.MemTracker`, which adds up the bytes of
every live tensor after each operation, by kind. Everything comes from the training code: the model built from the
arguments as training builds it, the optimizer [`~cps_hf.trainer.CPSTrainer`] creates, the loss it computes, the
forward wrapping accelerate applies for mixed precision (autocast, outputs upcast to fp32), the Trainer's activation
checkpointing call, gradient clipping, the optimizer step and `zero_grad`.

What it counts is the peak of live tensors, as `torch.cuda.max_memory_allocated` does. It leaves out what is not a
tensor of the step: the CUDA context, cuDNN/cuBLAS workspaces allocated inside kernels, and the memory the caching
allocator holds without a live tensor in it (its rounding, cached free blocks and fragmentation; what
`torch.cuda.memory_reserved` adds).
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import IntervalStrategy
from transformers.utils import logging

from .configuration_cps import CPSConfig
from .data import DataArguments
from .data.class_names import dataset_class_names
from .data.loading import get_split, load_segmentation_dataset
from .data.synthetic import SYNTHETIC_CLASS_NAMES, SYNTHETIC_DATASET_NAME
from .experiment import ModelArguments, build_model, parse_experiment_arguments
from .modeling_cps import CPSForSemanticSegmentation
from .trainer import CPSTrainer, CPSTrainingArguments

logger = logging.get_logger(__name__)

# MemTracker's kinds (`_MemRefType` values) under the names the estimate reports. The only tensors tracked from
# outside the step are the batches, so MemTracker's "Other" holds exactly them.
MEMORY_KINDS = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Optstate": "optimizer_state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "inputs",
}

# MemTracker's key of the sum over kinds in its snapshots.
TOTAL = "Total"

NOT_INCLUDED = (
    "the CUDA context (a few hundred MiB per process), cuDNN/cuBLAS workspaces allocated inside kernels, and memory "
    "the caching allocator holds without a live tensor in it (torch.cuda.memory_reserved minus "
    "torch.cuda.memory_allocated)"
)


ONE_IMAGE_NOTE = (
    "One image per device: training needs Sync-BN, i.e. several GPUs (train-mode BatchNorm refuses the single value "
    "per channel of the ASPP's image pooling); the estimate is the per-device memory of such a run."
)


@dataclass
class MemoryEstimate:
    """
    The predicted peak memory of one training step on one device.

    Args:
        peak_bytes (`int`):
            Peak of the bytes held by live tensors during the step (forward, backward, gradient clipping, optimizer
            step): what `torch.cuda.max_memory_allocated` measures, not counting what [`NOT_INCLUDED`] lists.
        breakdown (`dict[str, int]`):
            `peak_bytes` by kind at the moment of the peak: `parameters`, `buffers`, `gradients`,
            `optimizer_state` (also the optimizer step's temporaries), `activations` (tensors made in the forward
            passes, most of them kept for the backward), `temporaries` (made in the backward: activation gradients,
            recomputed activations) and `inputs` (the batches on the device).
        settings (`dict[str, Any]`):
            What was estimated: network, crop, batch, precision, checkpointing, step variant and how it was run.
    """

    peak_bytes: int
    breakdown: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_estimation_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, CPSTrainingArguments, Path | None]:
    """The arguments of the training run to estimate, parsed as `scripts/train_cps.py` parses them
    ([`~cps_hf.experiment.parse_experiment_arguments`]: `[CONFIG] [--field value ...]`, every training flag
    accepted), on the CPU of this machine: the arguments are not checked against an accelerator it may lack (e.g.
    `--bf16 true` without a GPU)."""
    argv = list(argv or [])
    return parse_experiment_arguments([*argv, "--use_cpu", "true"])


def estimation_class_names(data_args: DataArguments) -> list[str]:
    """The classes of the run without building its datasets: `--class_names`, `--num_labels`, the synthetic
    dataset's, or those a local dataset folder stores.

    Raises:
        ValueError: if none of these gives the classes.
    """
    if data_args.class_names:
        return list(data_args.class_names)
    if data_args.num_labels is not None:
        return [f"class_{index}" for index in range(data_args.num_labels)]
    if data_args.dataset_name in (None, SYNTHETIC_DATASET_NAME):
        return list(SYNTHETIC_CLASS_NAMES)
    if Path(data_args.dataset_name).expanduser().exists():
        split = get_split(
            load_segmentation_dataset(data_args.dataset_name, cache_dir=data_args.cache_dir),
            data_args.train_split,
            data_args.dataset_name,
        )
        names = dataset_class_names(split)
        if names:
            return names
    raise ValueError(
        f"The number of classes of dataset {data_args.dataset_name!r} is not known without reading it (it is not a "
        "local folder that names its classes): pass --num_labels N (or --class_names ...)."
    )


def estimate_training_memory(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: CPSTrainingArguments,
    *,
    class_names: list[str] | None = None,
    fake: bool = True,
) -> MemoryEstimate:
    """
    Predicts the peak memory of one training step per device by running the step on fake tensors.

    The step is the one `scripts/train_cps.py` runs with these arguments, in the steady state (from the second
    optimizer step on: the optimizer's state exists; with gradient accumulation, the gradients of the earlier
    micro-batches too): every forward pass of the CPS step (plain, CutMix or supervised-only, paper or fused),
    bf16 autocast with `--bf16 true`, activation checkpointing with `--gradient_checkpointing true`, the backward,
    gradient clipping, the optimizer step and `zero_grad`. The `gradient_accumulation_steps` batches the Trainer
    fetches for one optimizer step are on the device throughout. Backbone weights are drawn at random (their values
    do not change the memory; nothing is downloaded).

    Estimated as run eagerly and in the default memory layout: `--torch_compile true` (fuses operations, usually
    less memory) and `--channels_last true` (same tensor sizes) are not applied. Mixed precision follows the autocast
    rules of the device the arguments name (the CPU here; on CUDA a few operations, e.g. bilinear upsampling, run in
    fp32 instead, see `docs/memory/README.md`). One process: the activations of a DDP run are the same per device
    (DDP's gradient buckets are not counted).

    Args:
        model_args ([`~cps_hf.experiment.ModelArguments`]), data_args ([`~cps_hf.data.DataArguments`]),
        training_args ([`CPSTrainingArguments`]):
            The run, as [`parse_estimation_arguments`] returns it (or `scripts/train_cps.py` parses it). The crop
            is `data_args.crop_size`, the batch `training_args.per_device_train_batch_size`.
        class_names (`list[str]`, *optional*):
            The classes; by default [`estimation_class_names`].
        fake (`bool`, *optional*, defaults to `True`):
            `False` runs the same step on real tensors and really allocates the memory: for checking the estimate on
            small models.

    Returns:
        [`MemoryEstimate`]

    Raises:
        ValueError: for `--gradient_checkpointing true` with a model that does not support it, `--fp16 true`, or a
            dataset whose classes cannot be read.
    """
    class_names = class_names or estimation_class_names(data_args)
    with prepare_training_step(
        model_args, data_args, training_args, class_names=class_names, fake=fake
    ) as step:
        tracker = PeakMemoryTracker()
        tracker.track_external(step.model, step.optimizer, step.batches)
        with tracker:
            step.run()
        (peak,) = tracker.get_tracker_snapshot("peak").values()
        peak = {getattr(kind, "value", kind): size for kind, size in peak.items()}
        settings = _settings(step, data_args, training_args, len(class_names), fake)
    return MemoryEstimate(
        peak_bytes=peak[TOTAL],
        breakdown={name: peak.get(kind, 0) for kind, name in MEMORY_KINDS.items()},
        settings=settings,
    )


class PeakMemoryTracker(MemTracker):
    """`MemTracker` that keeps the device-wide peak only. MemTracker also records each module's own peak, walking
    every module it has seen after every operation (most of an estimate's time for ResNet-50), for numbers the
    estimate does not report."""

    def _update_peak_stats(self, peak_state: Any) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[TOTAL]:
                self._peak_mem[device] = snapshot[TOTAL]
                self._peak_mem_snap[device] = dict(snapshot)


@dataclass
class TrainingStep:
    """
    One training step of a run, ready to go: [`prepare_training_step`] builds it, [`TrainingStep.run`] runs it.

    Args:
        trainer ([`CPSTrainer`]): the run's trainer (its loss, accelerator and arguments).
        model (`nn.Module`): the model as the training loop calls it (forward wrapped for mixed precision).
        optimizer (`torch.optim.Optimizer`): the trainer's optimizer, its state created.
        batches (`list[dict[str, torch.Tensor]]`): the micro-batches of one optimizer step, on the device.
    """

    trainer: CPSTrainer
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, torch.Tensor]]

    def run(self) -> None:
        """The last micro-batch of one optimizer step, as the Trainer's loop runs it: loss, backward, gradient norm
        (clipped with `max_grad_norm`), optimizer step, `zero_grad`."""
        self.model.train()
        # Kept alive through the backward: MemTracker's backward hooks look the module up.
        step_loss = _TrainingStepLoss(self.trainer, self.model)
        loss = step_loss(self.batches[-1])
        self.trainer.accelerator.backward(loss)
        max_grad_norm = self.trainer.args.max_grad_norm
        # The Trainer computes the gradient norm every step (to log it), clipping or not.
        self.trainer.accelerator.clip_grad_norm_(
            self.model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf
        )
        self.optimizer.step()
        self.model.zero_grad()


@contextlib.contextmanager
def prepare_training_step(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: CPSTrainingArguments,
    *,
    class_names: list[str],
    fake: bool = True,
) -> Iterator[TrainingStep]:
    """
    Builds the model, trainer, optimizer (its state created) and batches of one steady-state training step (see
    [`estimate_training_memory`]); with `fake`, under a `FakeTensorMode` that stays active while the context is
    open, so that [`TrainingStep.run`] runs on fake tensors too.

    Raises:
        ValueError: for `--gradient_checkpointing true` with a model that does not support it, or `--fp16 true`.
    """
    if training_args.fp16:
        raise ValueError(
            "--fp16 true is not estimated (its autocast casts the same operations as bf16, to a type of the same "
            "size): estimate with --bf16 true."
        )
    tensor_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as output_dir:
        step_args = _single_step_arguments(training_args, output_dir)
        with tensor_mode:
            model = _build_randomly_initialised_model(model_args, class_names, data_args.dataset_name)
        trainer = _trainer_for(model, step_args)
        with tensor_mode:
            if step_args.activation_checkpointing:
                _enable_activation_checkpointing(model, step_args)
            # What the Trainer's training loop does before the first step: accelerate wraps the forward for mixed
            # precision (autocast, outputs upcast to fp32).
            model = trainer.accelerator.prepare_model(model, device_placement=False)
            optimizer = trainer.create_optimizer()
            _use_accelerator_optimizer_defaults(optimizer)
            _create_optimizer_state(model, optimizer)
            if step_args.gradient_accumulation_steps > 1:
                # The earlier micro-batches of the optimizer step left their gradients.
                for parameter in _trained_parameters(model):
                    parameter.grad = torch.zeros_like(parameter)
            batches = [
                training_batch(data_args, step_args, class_names)
                for _ in range(step_args.gradient_accumulation_steps)
            ]
            with (
                _single_value_batch_norm_on_running_statistics(model)
                if step_args.per_device_train_batch_size == 1
                else contextlib.nullcontext()
            ):
                yield TrainingStep(trainer=trainer, model=model, optimizer=optimizer, batches=batches)


def training_batch(
    data_args: DataArguments, training_args: CPSTrainingArguments, class_names: list[str]
) -> dict[str, torch.Tensor]:
    """One device's training batch as `collate_semi_supervised` delivers it, on `training_args.device`:
    `pixel_values` (float32), `labels` (int64), `unlabeled_pixel_values`, and for CutMix `mix_unlabeled_pixel_values`
    and `cutmix_masks` (float32 `(batch, 1, h, w)`), at `data_args.crop_size`."""
    batch_size = training_args.per_device_train_batch_size
    height, width = data_args.crop_size
    images = (batch_size, 3, height, width)
    device = training_args.device
    batch = {
        "pixel_values": torch.randn(images, device=device),
        "labels": torch.randint(len(class_names), (batch_size, height, width), device=device),
    }
    if not training_args.supervised_only:
        batch["unlabeled_pixel_values"] = torch.randn(images, device=device)
    if training_args.cutmix:
        batch["mix_unlabeled_pixel_values"] = torch.randn(images, device=device)
        batch["cutmix_masks"] = (torch.rand(batch_size, 1, height, width, device=device) < 0.5).float()
    return batch


def format_memory_estimate(estimate: MemoryEstimate) -> str:
    """The estimate as a few lines of text: the peak, then its breakdown, in GiB."""
    lines = [
        f"Peak memory of one training step per device: {estimate.peak_gib:.2f} GiB ({estimate.peak_bytes:,} B)"
    ]
    lines += [f"  {name:<16} {size / 2**30:8.2f} GiB" for name, size in estimate.breakdown.items()]
    lines.append(f"Live tensors only; not included: {NOT_INCLUDED}.")
    return "\n".join(lines)


@contextlib.contextmanager
def _single_value_batch_norm_on_running_statistics(model: nn.Module) -> Iterator[None]:
    """Runs, for the duration, every BatchNorm call that gets one value per channel on running statistics.

    With one image per device, the ASPP's image-pooling BatchNorm sees `(1, channels, 1, 1)`, which train-mode
    BatchNorm refuses: such a run trains only on several GPUs, where `CPSTrainer` uses Sync-BN (statistics over
    every process's images). The tensors of that one layer are a few KiB either way; every other layer keeps its
    training behaviour.
    """
    logger.warning(ONE_IMAGE_NOTE)

    switched: set[int] = set()

    def before(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if module.training and inputs[0].numel() == inputs[0].shape[1]:
            module.training = False
            switched.add(id(module))

    def after(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if id(module) in switched:
            module.training = True
            switched.discard(id(module))

    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    handles = [norm.register_forward_pre_hook(before) for norm in norms]
    handles += [norm.register_forward_hook(after) for norm in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _single_step_arguments(training_args: CPSTrainingArguments, output_dir: str) -> CPSTrainingArguments:
    """A copy of the arguments for a trainer that runs one step: no evaluation, saving, reporting or Hub push, and
    nothing written next to the run's real output folder."""
    step_args = copy.copy(training_args)
    step_args.output_dir = output_dir
    step_args.eval_strategy = IntervalStrategy.NO
    step_args.load_best_model_at_end = False
    step_args.push_to_hub = False
    step_args.report_to = []
    # Eager, in the default layout (see `estimate_training_memory`).
    step_args.torch_compile = False
    step_args.channels_last = False
    return step_args


def _build_randomly_initialised_model(
    model_args: ModelArguments, class_names: list[str], dataset_name: str | None
) -> CPSForSemanticSegmentation:
    if model_args.model_name_or_path is not None:
        # A saved model's architecture; its weights are not read.
        config = CPSConfig.from_pretrained(model_args.model_name_or_path)
        return CPSForSemanticSegmentation(config)
    random_init_args = copy.copy(model_args)
    random_init_args.pretrained_backbone = False
    random_init_args.pretrained_backbone_file = None
    return build_model(random_init_args, class_names, dataset_name)


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _trainer_for(model: CPSForSemanticSegmentation, step_args: CPSTrainingArguments) -> CPSTrainer:
    """The trainer of the run, around `model` where it is: a model with an `hf_device_map` is already placed, and the
    Trainer does not move it (fake tensors cannot be moved in place)."""
    model.hf_device_map = {"": str(step_args.device)}
    with _transformers_errors_only():
        return CPSTrainer(model=model, args=step_args)


def _enable_activation_checkpointing(model: CPSForSemanticSegmentation, args: CPSTrainingArguments) -> None:
    """What `Trainer.train` does for `--gradient_checkpointing true` (`--activation_checkpointing true`)."""
    if not model.supports_gradient_checkpointing:
        raise ValueError(
            f"--gradient_checkpointing true: {type(model).__name__} of this cps_hf version does not support "
            "gradient checkpointing (`supports_gradient_checkpointing` is False), so training would refuse it too."
        )
    kwargs = dict(args.activation_checkpointing_kwargs or {})
    every_n_layers = kwargs.pop("every_n_layers", 1)
    offload = kwargs.pop("offload", False)
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
    )


def _use_accelerator_optimizer_defaults(optimizer: torch.optim.Optimizer) -> None:
    # torch.optim's default implementation on CUDA is `foreach` (one kernel per parameter list, whose temporaries,
    # e.g. SGD's weight-decayed gradients, exist for every parameter at once); on CPU tensors it would pick the
    # per-parameter loop. An explicit user choice (`optim_args`) is kept.
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = True


def _trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def _create_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step on zero gradients: the state it keeps from the first step on (SGD's momentum buffers,
    Adam's moments) exists, as in every step after the first."""
    for parameter in _trained_parameters(model):
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _TrainingStepLoss(nn.Module):
    """The loss of one micro-batch as `Trainer.training_step` computes it, as one module call: MemTracker allows
    the model to be called several times per step (CutMix calls it four times) only below a module called once."""

    def __init__(self, trainer: CPSTrainer, model: nn.Module):
        super().__init__()
        self.model = model
        self.trainer = trainer

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.trainer.compute_loss_context_manager():
            loss = self.trainer.compute_loss(self.model, inputs)
        return loss / self.trainer.args.gradient_accumulation_steps


def _settings(
    step: TrainingStep,
    data_args: DataArguments,
    training_args: CPSTrainingArguments,
    num_labels: int,
    fake: bool,
) -> dict[str, Any]:
    config = step.model.config
    if training_args.supervised_only:
        variant = "supervised_only"
    else:
        variant = "cps_cutmix" if training_args.cutmix else "cps"
    return {
        "backbone": config.backbone,
        "num_branches": config.num_branches,
        "output_stride": config.output_stride,
        "num_labels": num_labels,
        "num_parameters": sum(parameter.numel() for parameter in step.model.parameters()),
        "crop_size": list(data_args.crop_size),
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "step": variant,
        "fused_forward": training_args.fused_forward,
        "supervised_loss": training_args.supervised_loss,
        "bf16": training_args.bf16,
        "gradient_checkpointing": bool(training_args.activation_checkpointing),
        "optim": getattr(training_args.optim, "value", training_args.optim),
        "optim_args": training_args.optim_args,
        "max_grad_norm": training_args.max_grad_norm,
        "channels_last": training_args.channels_last,
        "torch_compile": training_args.torch_compile,
        "estimated_as": f"one eager step in the default memory layout, {'fake' if fake else 'real'} "
        f"{step.trainer.args.device.type} tensors ({step.trainer.args.device.type} autocast rules)",
        "torch": torch.__version__,
        "not_included": NOT_INCLUDED,
        "notes": [ONE_IMAGE_NOTE] if training_args.per_device_train_batch_size == 1 else [],
    }


__all__ = [
    "MEMORY_KINDS",
    "NOT_INCLUDED",
    "MemoryEstimate",
    "PeakMemoryTracker",
    "TrainingStep",
    "estimate_training_memory",
    "estimation_class_names",
    "format_memory_estimate",
    "parse_estimation_arguments",
    "prepare_training_step",
    "training_batch",
]
