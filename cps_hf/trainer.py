"""CPS training on top of the 🤗 Trainer: the semi-supervised step, its arguments and its logging."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import TorchDynamoPlugin, broadcast
from timm.layers import convert_sync_batchnorm
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils import logging

from .checkpointing import STAGING_DIR_NAME, publish_checkpoint
from .data.streaming import (
    StreamPosition,
    UnlabeledBatches,
    UnlabeledImageStream,
    read_stream_position,
    write_stream_position,
)
from .losses import (
    branch_cross_pseudo_supervision_loss,
    class_predictions,
    cross_pseudo_supervision_loss,
    kept_pseudo_label_fraction,
    median_frequency_class_weights,
    ohem_cross_entropy,
    pseudo_labels_from_logits,
    supervised_cross_entropy,
)
from .masking import mix_with_mask
from .metrics import make_compute_metrics
from .modeling_cps import CPSSemanticSegmenterOutput

logger = logging.get_logger(__name__)

PSEUDO_LABEL_MODES = ("train", "eval")
SUPERVISED_LOSSES = ("ce", "ohem")
CLASS_WEIGHTINGS = ("none", "median_frequency")
PARALLEL_BRANCHES_EXCLUDES = ("fused_forward", "torch_compile", "gradient_checkpointing", "bf16", "fp16")
"""Training arguments with which `parallel_branches` falls back to the usual step."""


CUTMIX_INPUT_KEYS = ("pixel_values", "unlabeled_pixel_values", "mix_unlabeled_pixel_values", "cutmix_masks")


@dataclass
class CutMixForwardOutput:
    """
    The branch outputs of one CutMix CPS step, one tensor per branch in each list.

    Args:
        labeled_logits (`list[torch.Tensor]`): logits `(batch, num_labels, height, width)` of the labelled images.
        student_logits (`list[torch.Tensor]`): logits of the mixed unlabelled images.
        pseudo_labels (`list[torch.Tensor]`): argmax `(batch, height, width)` of each branch's box-mixed teacher
            logits (no gradient); pixels below the confidence threshold hold `PSEUDO_LABEL_IGNORE_INDEX`.
    """

    labeled_logits: list[torch.Tensor]
    student_logits: list[torch.Tensor]
    pseudo_labels: list[torch.Tensor]


def check_cutmix_inputs(inputs: Mapping[str, torch.Tensor]) -> None:
    """Raises `ValueError` naming the keys a CutMix CPS batch lacks."""
    missing = sorted(set(CUTMIX_INPUT_KEYS) - inputs.keys())
    if missing:
        raise ValueError(f"CutMix CPS batches need {missing}; build the dataset with `cutmix=True`.")


@contextlib.contextmanager
def teacher_mode(model: nn.Module, pseudo_label_mode: str) -> Iterator[None]:
    """BatchNorm mode of the no-grad teacher passes: unchanged (`"train"`) or running statistics (`"eval"`)."""
    if pseudo_label_mode == "train":
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


def branch_logits(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every branch's logits for one batch, from one (possibly DDP-wrapped) model call."""
    return model(pixel_values=pixel_values, output_branch_logits=True).branch_logits


def in_memory_format(
    inputs: Mapping[str, torch.Tensor], memory_format: torch.memory_format
) -> dict[str, torch.Tensor]:
    """The batch with its image tensors (4-D) in `memory_format`; same values."""
    return {
        key: value.contiguous(memory_format=memory_format) if value.dim() == 4 else value
        for key, value in inputs.items()
    }


def cutmix_forward(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    pseudo_label_mode: str = "train",
    confidence_threshold: float = 0.0,
    fused_forward: bool = False,
) -> CutMixForwardOutput:
    """
    The forward passes of one CutMix CPS step, each model call running every branch. The paper's step, in the
    official order: no-grad teacher passes on the two unlabelled batches `u0` and `u1`, pseudo-labels from the
    box-mixed teacher logits, then the students on the mixed images `u0 * (1 - m) + u1 * m`, then the labelled
    images. The fused step makes two calls instead of four: the teachers on `[u0 ; u1]`, the students on
    `[labelled ; mixed]`. Used by [`CPSTrainer`] and by the benchmark's fast step, so both run the same computation.

    Args:
        model (`nn.Module`):
            The (possibly DDP-wrapped) model, in training mode.
        inputs (`Mapping[str, torch.Tensor]`):
            `pixel_values`, `unlabeled_pixel_values`, `mix_unlabeled_pixel_values` and `cutmix_masks`.
        pseudo_label_mode (`str`, *optional*, defaults to `"train"`):
            BatchNorm mode of the teacher passes (see [`teacher_mode`]). With `"eval"` the running statistics
            normalise every image on its own, so `u0` and `u1` go through one call with the same outputs.
        confidence_threshold (`float`, *optional*, defaults to 0.0):
            Pseudo-label pixels whose mixed teacher confidence is below this are ignored (see
            [`~cps_hf.losses.pseudo_labels_from_logits`]); 0 is the paper.
        fused_forward (`bool`, *optional*, defaults to `False`):
            The fused step. Not the paper's step when BatchNorm is in train mode: it then normalises over the
            concatenated batches (teachers: `u0` and `u1` together; students: labelled and mixed images together)
            and updates its running statistics once per call. With BatchNorm in eval mode both steps compute the
            same logits.

    Returns:
        [`CutMixForwardOutput`]
    """
    check_cutmix_inputs(inputs)
    unlabeled_pixel_values = inputs["unlabeled_pixel_values"]
    mix_unlabeled_pixel_values = inputs["mix_unlabeled_pixel_values"]
    cutmix_masks = inputs["cutmix_masks"]
    with torch.no_grad(), teacher_mode(model, pseudo_label_mode):
        if fused_forward or pseudo_label_mode == "eval":
            both_batches = torch.cat([unlabeled_pixel_values, mix_unlabeled_pixel_values])
            teacher_pairs = [logits.chunk(2) for logits in branch_logits(model, both_batches)]
        else:
            # Train-mode BN normalises with batch statistics: keep the paper's two separate batches.
            teacher_pairs = list(
                zip(
                    branch_logits(model, unlabeled_pixel_values),
                    branch_logits(model, mix_unlabeled_pixel_values),
                )
            )
        pseudo_labels = [
            # Upcast first: under bf16 autocast, near-tie pixels would otherwise take bf16 rounding's argmax.
            pseudo_labels_from_logits(
                mix_with_mask(logits.float(), mix_logits.float(), cutmix_masks), confidence_threshold
            )
            for logits, mix_logits in teacher_pairs
        ]
    mixed_pixel_values = mix_with_mask(unlabeled_pixel_values, mix_unlabeled_pixel_values, cutmix_masks)
    labeled_pixel_values = inputs["pixel_values"]
    if fused_forward:
        sizes = [labeled_pixel_values.shape[0], mixed_pixel_values.shape[0]]
        joint = branch_logits(model, torch.cat([labeled_pixel_values, mixed_pixel_values]))
        labeled_logits, student_logits = zip(*(logits.split(sizes) for logits in joint))
    else:
        student_logits = branch_logits(model, mixed_pixel_values)
        labeled_logits = branch_logits(model, labeled_pixel_values)
    return CutMixForwardOutput(
        labeled_logits=list(labeled_logits), student_logits=list(student_logits), pseudo_labels=pseudo_labels
    )


def plain_cps_forward(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    fused_forward: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """
    The forward passes of one plain CPS step: every branch's logits of the labelled images, and of the labelled and
    unlabelled images concatenated (what the CPS term is computed on). The paper's step makes one call per batch;
    the fused step one call on `[labelled ; unlabelled]` (in train mode BatchNorm then normalises over both).
    """
    if "unlabeled_pixel_values" not in inputs:
        raise ValueError("CPS batches need `unlabeled_pixel_values`; check `remove_unused_columns=False`.")
    labeled_pixel_values, unlabeled_pixel_values = inputs["pixel_values"], inputs["unlabeled_pixel_values"]
    if fused_forward:
        joint_logits = list(branch_logits(model, torch.cat([labeled_pixel_values, unlabeled_pixel_values])))
        labeled_logits = [logits[: labeled_pixel_values.shape[0]] for logits in joint_logits]
    else:
        labeled_logits = list(branch_logits(model, labeled_pixel_values))
        joint_logits = [
            torch.cat([labeled, unlabeled])
            for labeled, unlabeled in zip(labeled_logits, branch_logits(model, unlabeled_pixel_values))
        ]
    return labeled_logits, joint_logits


@dataclass
class CPSTrainingArguments(TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] for Cross Pseudo Supervision, with defaults that make CPS work out of the
    box: SGD (momentum 0.9), poly learning-rate decay (power 0.9), no weight decay on biases and norm layers, no
    gradient clipping (the paper clips nothing; the Trainer's default would clip at norm 1),
    `remove_unused_columns=False` (the unlabelled images are not forward arguments and must not be dropped),
    streaming evaluation metrics and no unused-parameter search under DDP. Pickled copies (the `training_args.bin`
    the Trainer writes next to every checkpoint) carry no access token (`hub_token` is set to `None` in them).

    Args:
        cps_weight (`float`, *optional*, defaults to 1.5):
            λ, the weight of the CPS loss: `loss = L_sup + λ · L_cps` (paper: VOC 1.5 plain / 1.0 CutMix;
            Cityscapes 6 / 5).
        cutmix (`bool`, *optional*, defaults to `False`):
            CutMix variant: pseudo-labels made on two unlabelled images and mixed with a box mask, students see the
            mixed image. Otherwise the plain variant: CPS over labelled + unlabelled images.
        cps_weight_warmup_steps (`int`, *optional*, defaults to 0):
            Ramp λ linearly from 0 to `cps_weight` over this many optimizer steps (0: constant λ, as the paper).
            From a weak supervised start (training from scratch), early pseudo-labels are mostly wrong and CPS
            reinforces them; the warm-up lets the supervised term lead first.
        supervised_only (`bool`, *optional*, defaults to `False`):
            The paper's baseline through the same code path: labelled images only, no CPS term (λ = 0).
        supervised_loss (`str`, *optional*, defaults to `"ce"`):
            `"ce"` or `"ohem"` (online hard example mining, the Cityscapes recipe) for the supervised term.
        ohem_threshold (`float`, *optional*, defaults to 0.7):
            OHEM probability threshold.
        ohem_min_kept (`int`, *optional*, defaults to 50000):
            OHEM minimum number of kept pixels per device and step.
        class_weighting (`str`, *optional*, defaults to `"none"`):
            `"none"` (the paper) or `"median_frequency"`: per-class weights computed once from the labelled
            training masks ([`~cps_hf.losses.median_frequency_class_weights`], SegNet's CamVid recipe) weight the
            supervised cross-entropy by each pixel's true class, so that the supervised start (whose predictions
            become the pseudo-labels) does not leave out the rare classes. Needs `supervised_loss="ce"`.
        cps_class_weighting (`bool`, *optional*, defaults to `False`):
            Also weight the CPS cross-entropy by the class weight of each pixel's pseudo-label (needs
            `class_weighting`). On CamVid this made the branches over-predict the rare classes everywhere.
        pseudo_label_mode (`str`, *optional*, defaults to `"train"`):
            BatchNorm mode of the no-grad teacher passes that make CutMix pseudo-labels: `"train"` (official; batch
            statistics, running statistics updated) or `"eval"` (running statistics).
        cps_confidence_threshold (`float`, *optional*, defaults to 0.0):
            τ: pseudo-label pixels whose teacher confidence (highest softmax probability) is below τ are ignored in
            L_cps, which averages over the kept pixels; the kept fraction is logged as `cps_pixels_kept`. 0 keeps
            every pixel, as the paper (which has no threshold).
        fused_forward (`bool`, *optional*, defaults to `False`):
            The fused step: the students see `[labelled ; unlabelled]` (plain) or `[labelled ; mixed]` (CutMix) in
            one model call and the CutMix teachers `[u0 ; u1]` in one call, so train-mode BatchNorm normalises over
            the concatenation (the structure of most later semi-supervised segmentation code). Fewer, larger
            calls; with BatchNorm in eval mode the losses equal the paper step's. Off: the paper's step, one call
            per batch.
        parallel_branches (`bool`, *optional*, defaults to `False`):
            CPU, one process: run each branch's passes and its backward pass in a thread of its own. The CPS loss
            couples the branches only through detached pseudo-labels, so each branch's part of the loss (its
            supervised term and its CPS term) has gradients in that branch alone; the step computes what the
            paper's step computes, one branch per thread. Small models' operators use a second core poorly
            (the demo's step: 1.4x faster than two intra-op threads on a 2-core CPU). Where it does not apply
            (`fused_forward`, `torch_compile`, `gradient_checkpointing`, `bf16`/`fp16`, several processes, an
            accelerator) the usual step runs and the log says why.
        channels_last (`bool`, *optional*, defaults to `False`):
            Keep the weights and feed the images in `torch.channels_last` layout, the layout fast convolution kernels
            use on many CPUs and on GPUs (values and checkpoints unchanged).
        torch_compile (`bool`, *optional*, defaults to `False`):
            As in [`~transformers.TrainingArguments`], but each branch is compiled in place (`nn.Module.compile`),
            so parameter names, checkpoints and the CPS step around the branches stay as they are. With
            `gradient_checkpointing` it needs `fused_forward` (one model call with gradients per step).
        gradient_checkpointing (`bool`, *optional*, defaults to `False`):
            As in [`~transformers.TrainingArguments`] (newer transformers: `activation_checkpointing`): every
            branch's backbone stages and head are recomputed in the backward pass instead of keeping their
            activations (see [`~cps_hf.CPSForSemanticSegmentation`]); same losses and gradients, less memory, a
            slower step.
        bf16 (`bool`, *optional*, defaults to `False`):
            As in [`~transformers.TrainingArguments`]: bfloat16 autocast of the forward passes; losses and
            pseudo-labels are computed from the logits upcast to fp32.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Allow a new run to replace a final model already saved in `output_dir`, or to start afresh in an
            `output_dir` none of whose checkpoints is complete (complete checkpoints are resumed from, never
            discarded).
    """

    cps_weight: float = field(
        default=1.5, metadata={"help": "λ: weight of the CPS loss (loss = L_sup + λ·L_cps)."}
    )
    cps_weight_warmup_steps: int = field(
        default=0,
        metadata={"help": "Ramp λ linearly from 0 over this many steps (0: constant, as the paper)."},
    )
    cutmix: bool = field(default=False, metadata={"help": "Use the CutMix variant of CPS."})
    supervised_only: bool = field(
        default=False,
        metadata={"help": "Train the supervised-only baseline (labelled data only, no CPS term)."},
    )
    supervised_loss: str = field(default="ce", metadata={"help": "Supervised loss: 'ce' or 'ohem'."})
    ohem_threshold: float = field(default=0.7, metadata={"help": "OHEM probability threshold."})
    ohem_min_kept: int = field(
        default=50_000, metadata={"help": "OHEM minimum kept pixels per device and step."}
    )
    class_weighting: str = field(
        default="none",
        metadata={
            "help": "'none' (paper) or 'median_frequency': class weights from the labelled masks in the supervised loss."
        },
    )
    cps_class_weighting: bool = field(
        default=False,
        metadata={
            "help": "Also weight the CPS loss by the pseudo-label's class weight (needs class_weighting)."
        },
    )
    pseudo_label_mode: str = field(
        default="train", metadata={"help": "BatchNorm mode of the CutMix teacher passes: 'train' or 'eval'."}
    )
    cps_confidence_threshold: float = field(
        default=0.0,
        metadata={
            "help": "τ: ignore pseudo-label pixels whose teacher confidence is below τ (0: paper, none)."
        },
    )
    fused_forward: bool = field(
        default=False,
        metadata={
            "help": "Fused step: students on [labelled ; unlabelled or mixed] and CutMix teachers on [u0 ; u1], one "
            "call each (train-mode BatchNorm normalises over the concatenation; the paper's step: off)."
        },
    )
    parallel_branches: bool = field(
        default=False,
        metadata={"help": "CPU, one process: each branch's passes and backward in a thread of its own."},
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Train in the channels-last memory layout (weights and images; same values)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow replacing a trained model already saved in `output_dir`."}
    )

    # Defaults of the official recipe, and those without which CPS silently degrades.
    do_train: bool = field(default=True, metadata={"help": "Train (set false to only evaluate)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: CPS batches carry extra keys."}
    )
    optim: str = field(default="sgd", metadata={"help": "Optimizer (the paper: SGD with momentum 0.9)."})
    optim_args: str | None = field(default="momentum=0.9", metadata={"help": "Optimizer arguments."})
    learning_rate: float = field(default=0.0025, metadata={"help": "Initial learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay of conv/linear weights only."})
    lr_scheduler_type: str = field(default="polynomial", metadata={"help": "Learning-rate schedule."})
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"power": 0.9, "lr_end": 0.0},
        metadata={"help": "Learning-rate schedule arguments (poly decay, power 0.9, down to 0)."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every step uses every parameter: no unused-parameter search."}
    )
    batch_eval_metrics: bool = field(
        default=True, metadata={"help": "Streaming confusion-matrix evaluation."}
    )
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Gradient clipping norm; 0 disables it (the paper does not clip)."}
    )

    def __post_init__(self):
        if self.cps_weight_warmup_steps < 0:
            raise ValueError(f"`cps_weight_warmup_steps` must be >= 0, got {self.cps_weight_warmup_steps}.")
        if self.supervised_loss not in SUPERVISED_LOSSES:
            raise ValueError(
                f"`supervised_loss` must be one of {SUPERVISED_LOSSES}, got {self.supervised_loss!r}."
            )
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(
                f"`class_weighting` must be one of {CLASS_WEIGHTINGS}, got {self.class_weighting!r}."
            )
        if self.class_weighting != "none" and self.supervised_loss != "ce":
            raise ValueError(
                f"`class_weighting={self.class_weighting!r}` weights the 'ce' supervised loss; it cannot be combined "
                f"with `supervised_loss={self.supervised_loss!r}`."
            )
        if self.cps_class_weighting and self.class_weighting == "none":
            raise ValueError(
                "`cps_class_weighting` weights the CPS loss with the weights of `class_weighting`: set both."
            )
        if self.pseudo_label_mode not in PSEUDO_LABEL_MODES:
            raise ValueError(
                f"`pseudo_label_mode` must be one of {PSEUDO_LABEL_MODES}, got {self.pseudo_label_mode!r}."
            )
        if not 0.0 <= self.cps_confidence_threshold < 1.0:
            raise ValueError(
                f"`cps_confidence_threshold` must lie in [0, 1), got {self.cps_confidence_threshold}."
            )
        if self.cps_weight < 0:
            raise ValueError(f"`cps_weight` must be >= 0, got {self.cps_weight}.")
        if self.supervised_only and self.cutmix:
            raise ValueError("`supervised_only` and `cutmix` exclude each other.")
        super().__post_init__()
        if (
            self.torch_compile
            and self.gradient_checkpointing
            and not (self.fused_forward or self.supervised_only)
        ):
            # torch.compile's checkpointed graphs keep BatchNorm's running statistics for the backward pass; a second
            # call with gradients updates them in place first ("modified by an inplace operation", torch 2.14).
            raise ValueError(
                "`torch_compile` with `gradient_checkpointing` needs one model call with gradients per step: set "
                "`fused_forward=True` (or `supervised_only=True`), or drop one of the two."
            )

    def __getstate__(self) -> dict[str, Any]:
        # The Trainer pickles its arguments into every checkpoint and output folder (`training_args.bin`), which
        # get shared: access tokens stay out of them.
        state = self.__dict__.copy()
        for name in state:
            if name.endswith("_token"):
                state[name] = None
        return state


class EpochForwardingCallback(TrainerCallback):
    """Tells the training dataset which epoch starts, so its per-item augmentation seeds follow the epoch.

    accelerate forwards `set_epoch` to the dataset only in some set-ups (not when the sampler has its own), so the
    trainer does it explicitly."""

    def __init__(self, trainer: CPSTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        dataset = self.trainer.train_dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(math.floor(state.epoch + 1e-6) if state.epoch else 0)


class CPSTrainer(Trainer):
    """
    [`~transformers.Trainer`] running the Cross Pseudo Supervision step.

    Training batches come from [`~cps_hf.data.SemiSupervisedSegmentationDataset`]: `pixel_values` and `labels`
    (labelled), `unlabeled_pixel_values` and, for CutMix, `mix_unlabeled_pixel_values` and `cutmix_masks`.
    Evaluation batches (`pixel_values`, `labels`) go through the same `compute_loss` and are scored with a
    streaming confusion matrix. Every loss term is logged: `loss_supervised_branch_<i>`, `loss_cps`, and
    `cps_pixels_kept` (the fraction of pseudo-label pixels at or above the confidence threshold).

    The model is always called through its (possibly DDP-wrapped) `forward`, once per image batch with every
    branch, so distributed gradient synchronisation sees every pass.

    Checkpoints are published atomically: each is written into `<output_dir>/.incomplete/` and renamed to
    `checkpoint-<step>` once complete (see [`~cps_hf.checkpointing.last_complete_checkpoint`] for resuming).

    With an `unlabeled_stream` ([`~cps_hf.data.UnlabeledImageStream`], a streamed unlabelled pool), the training
    dataset holds the labelled images only, and every labelled micro-batch is joined by the stream's next batch of
    as many unlabelled items; each process saves its stream position into every checkpoint and a resumed run
    continues the stream exactly where it was (with `ignore_data_skip`, from its beginning).
    """

    # `compute_loss` returns a per-batch mean; the Trainer divides it for gradient accumulation.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, unlabeled_stream: UnlabeledImageStream | None = None, **kwargs):
        training_args = kwargs.get("args")
        model = kwargs.get("model")
        if training_args is not None and not isinstance(training_args, CPSTrainingArguments):
            raise TypeError(f"CPSTrainer needs CPSTrainingArguments, got {type(training_args).__name__}.")
        if model is not None and kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = make_compute_metrics(
                num_labels=model.config.num_labels,
                ignore_index=model.config.semantic_loss_ignore_index,
                id2label=model.config.id2label,
            )
            kwargs.setdefault("preprocess_logits_for_metrics", predictions_from_logits)
        super().__init__(*args, **kwargs)
        self._loss_term_sums: dict[str, torch.Tensor] = {}
        self._loss_term_count = 0
        self._first_nonfinite_step: torch.Tensor | None = None
        self._checkpoint_staging_dir: str | None = None
        self._images_since_log = 0
        self._last_log_time: float | None = None
        if unlabeled_stream is not None:
            self._check_unlabeled_stream(unlabeled_stream)
        self.unlabeled_stream = unlabeled_stream
        self._unlabeled_batches: UnlabeledBatches | None = None
        self.add_callback(EpochForwardingCallback(self))
        self.class_weights = self._class_weights()
        self.cps_class_weights = self.class_weights if self.args.cps_class_weighting else None
        if self.args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.args.torch_compile:
            for branch in self.model.branches:
                branch.compile(backend=self.args.torch_compile_backend, mode=self.args.torch_compile_mode)
        self.parallel_branches = self._can_run_parallel_branches()
        if self.args.world_size > 1 and self.args.device.type == "cuda":
            # BatchNorm statistics over the global batch, as the paper's Sync-BN.
            use_sync_batchnorm(self.model)

    def _can_run_parallel_branches(self) -> bool:
        """Whether `parallel_branches` applies to this run; when it does not, says why and runs the usual step."""
        if not self.args.parallel_branches:
            return False
        args = self.args
        reasons = [f"`{name}`" for name in PARALLEL_BRANCHES_EXCLUDES if getattr(args, name)]
        if args.world_size > 1:
            reasons.append(f"{args.world_size} processes")
        if args.device.type != "cpu":
            reasons.append(f"device {args.device}")
        if reasons:
            logger.info(f"`parallel_branches` not used (the usual step runs) with {', '.join(reasons)}.")
            return False
        return True

    def _class_weights(self) -> torch.Tensor | None:
        """The per-class loss weights of `class_weighting`, from the training dataset's labelled masks."""
        if self.args.class_weighting == "none" or not self.args.do_train:
            return None
        if not hasattr(self.train_dataset, "label_maps"):
            raise ValueError(
                f"`class_weighting={self.args.class_weighting!r}` needs a training dataset with `label_maps()` "
                f"(cps_hf's segmentation datasets), got {type(self.train_dataset).__name__}."
            )
        weights = median_frequency_class_weights(
            self.train_dataset.label_maps(),
            self.model.config.num_labels,
            self.model.config.semantic_loss_ignore_index,
        )
        names = self.model.config.id2label
        logger.info(
            "Median-frequency class weights: "
            + ", ".join(
                f"{names.get(index, index)} {weight:.3f}" for index, weight in enumerate(weights.tolist())
            )
        )
        return weights.to(self.args.device)

    def _check_unlabeled_stream(self, stream: UnlabeledImageStream) -> None:
        if self.args.supervised_only:
            raise ValueError(
                "`supervised_only` trains without unlabelled images: pass no `unlabeled_stream`."
            )
        if stream.cutmix != self.args.cutmix:
            raise ValueError(
                f"The unlabelled stream was built with cutmix={stream.cutmix}, the training arguments have "
                f"cutmix={self.args.cutmix}."
            )
        if (stream.process_index, stream.num_processes) != (self.args.process_index, self.args.world_size):
            raise ValueError(
                f"The unlabelled stream was split for process {stream.process_index} of {stream.num_processes}; "
                f"this is process {self.args.process_index} of {self.args.world_size}."
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if self.unlabeled_stream is None:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        start = StreamPosition()
        if checkpoint and not self.args.ignore_data_skip:
            start = read_stream_position(checkpoint, self.unlabeled_stream)
        self._unlabeled_batches = UnlabeledBatches(
            self.unlabeled_stream,
            self._train_batch_size,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda",
            prefetch_factor=self.args.dataloader_prefetch_factor,
            start=start,
        )
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._unlabeled_batches.close()
            self._unlabeled_batches = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._unlabeled_batches is not None:
            # Plain CPS: `unlabeled_pixel_values`; CutMix: also the mixing partners and the box masks.
            batch_samples = [{**batch, **next(self._unlabeled_batches)} for batch in batch_samples]
        return batch_samples, num_items_in_batch

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if self.args.torch_compile:
            # The branches are compiled in place (see `__init__`); accelerate would compile the whole model again.
            accelerator_args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return accelerator_args

    def _get_dataloader(
        self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None
    ):
        # Training batches are always full (as in the paper; a last batch of one image would also break train-mode
        # BatchNorm), evaluation never drops images: `dataloader_drop_last` is set per loader, not globally.
        user_drop_last = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = is_training
        try:
            dataloader = super()._get_dataloader(
                dataset, description, batch_size, sampler_fn, is_training, dataloader_key
            )
        finally:
            self.args.dataloader_drop_last = user_drop_last
        if is_training and len(dataloader) == 0:
            raise ValueError(
                f"The training set ({len(dataset)} samples per epoch) is smaller than one batch of "
                f"{batch_size} per device x {self.args.world_size} processes; lower --per_device_train_batch_size."
            )
        return dataloader

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Only convolution and linear weights decay; biases and every norm layer's parameters do not."""
        decayed_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
        return [
            f"{module_name}.{parameter_name}" if module_name else parameter_name
            for module_name, module in model.named_modules()
            if isinstance(module, decayed_types)
            for parameter_name, _ in module.named_parameters(recurse=False)
            if parameter_name == "weight"
        ]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, CPSSemanticSegmenterOutput]:
        if not model.training:
            return self._evaluation_loss(model, inputs, return_outputs)
        loss, loss_terms, outputs = self.cps_step_loss(model, inputs)
        self._accumulate_loss_terms(loss_terms)
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch=None
    ) -> torch.Tensor:
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        self._images_since_log += sum(
            len(inputs[key])
            for key in ("pixel_values", "unlabeled_pixel_values", "mix_unlabeled_pixel_values")
            if key in inputs
        )
        if self.parallel_branches:
            loss = self._parallel_branches_training_step(model, inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        # Remember the first optimizer step whose loss is not finite without a host sync; it is checked when
        # logging, before saving a checkpoint and at the end of training.
        step = torch.tensor(self.state.global_step + 1, device=loss.device)
        if self._first_nonfinite_step is None:
            self._first_nonfinite_step = torch.tensor(-1, device=loss.device)
        self._first_nonfinite_step = torch.where(
            ~torch.isfinite(loss) & (self._first_nonfinite_step < 0), step, self._first_nonfinite_step
        )
        return loss

    def _parallel_branches_training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Forward and backward of one training step with each branch in a thread of its own (`parallel_branches`):
        the paper's passes in the paper's order within each branch; the pseudo-labels are exchanged between the
        teacher passes and the losses. Returns the step's loss (detached, scaled for gradient accumulation)."""
        model.train()
        if callable(
            getattr(self.optimizer, "train", None)
        ):  # as the Trainer's step (schedule-free optimizers)
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        if self.args.channels_last:
            inputs = in_memory_format(inputs, torch.channels_last)
        branches = self.accelerator.unwrap_model(model).branches
        labeled_pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        scale = 1.0 / self.current_gradient_accumulation_steps
        cps_weight = self.current_cps_weight()
        threshold = self.args.cps_confidence_threshold

        def pseudo_label_pass(index: int) -> tuple[torch.Tensor | None, torch.Tensor]:
            """Plain CPS: the branch's logits on [labelled ; unlabelled] (with gradients) and its pseudo-label.
            CutMix: no logits, and the pseudo-label from the mixed no-grad passes on the two unlabelled batches."""
            branch = branches[index]
            if not self.args.cutmix:
                logits = torch.cat(
                    [branch(labeled_pixel_values), branch(inputs["unlabeled_pixel_values"])]
                ).float()
                return logits, pseudo_labels_from_logits(logits, threshold)
            with torch.no_grad():
                if self.args.pseudo_label_mode == "eval":
                    both = torch.cat([inputs["unlabeled_pixel_values"], inputs["mix_unlabeled_pixel_values"]])
                    logits, mix_logits = branch(both).chunk(2)
                else:
                    logits = branch(inputs["unlabeled_pixel_values"])
                    mix_logits = branch(inputs["mix_unlabeled_pixel_values"])
                mixed = mix_with_mask(logits.float(), mix_logits.float(), inputs["cutmix_masks"])
                return None, pseudo_labels_from_logits(mixed, threshold)

        def student_pass(
            index: int, joint_logits: torch.Tensor | None, pseudo_labels: list[torch.Tensor] | None
        ):
            """The branch's loss terms, after its backward pass."""
            branch = branches[index]
            cps_term = None
            if self.args.supervised_only:
                labeled_logits = branch(labeled_pixel_values).float()
            elif self.args.cutmix:
                mixed_pixel_values = mix_with_mask(
                    inputs["unlabeled_pixel_values"],
                    inputs["mix_unlabeled_pixel_values"],
                    inputs["cutmix_masks"],
                )
                student_logits = branch(mixed_pixel_values).float()
                labeled_logits = branch(labeled_pixel_values).float()
                cps_term = branch_cross_pseudo_supervision_loss(
                    student_logits, pseudo_labels, index, self.cps_class_weights
                )
            else:
                labeled_logits = joint_logits[: labeled_pixel_values.shape[0]]
                cps_term = branch_cross_pseudo_supervision_loss(
                    joint_logits, pseudo_labels, index, self.cps_class_weights
                )
            supervised_term = self.supervised_loss(labeled_logits, labels)
            branch_loss = supervised_term if cps_term is None else supervised_term + cps_weight * cps_term
            (branch_loss * scale).backward()
            return branch_loss.detach(), supervised_term.detach(), cps_term

        indices = range(len(branches))
        with ThreadPoolExecutor(max_workers=len(branches), thread_name_prefix="cps-branch") as pool:
            joint_logits, pseudo_labels = [None] * len(branches), None
            if not self.args.supervised_only:
                with teacher_mode(model, self.args.pseudo_label_mode if self.args.cutmix else "train"):
                    joint_logits, pseudo_labels = (
                        list(values) for values in zip(*pool.map(pseudo_label_pass, indices))
                    )
            results = list(
                pool.map(lambda index: student_pass(index, joint_logits[index], pseudo_labels), indices)
            )
        loss_terms = {f"loss_supervised_branch_{index}": result[1] for index, result in enumerate(results)}
        if not self.args.supervised_only:
            loss_terms["loss_cps"] = torch.stack([result[2].detach() for result in results]).sum()
            loss_terms["cps_pixels_kept"] = kept_pseudo_label_fraction(pseudo_labels)
        self._accumulate_loss_terms(loss_terms)
        return torch.stack([result[0] for result in results]).sum() * scale

    def check_finite_loss(self) -> None:
        """Raises `FloatingPointError` naming the first step whose training loss was NaN or infinite."""
        if self._first_nonfinite_step is None:
            return
        first_step = int(self.accelerator.reduce(self._first_nonfinite_step.clone(), reduction="max"))
        if first_step >= 0:
            checkpoints = sorted(
                Path(self.args.output_dir).glob("checkpoint-*"), key=lambda path: path.stat().st_mtime
            )
            last_good = next(
                (str(path) for path in reversed(checkpoints) if _checkpoint_step(path) < first_step), None
            )
            raise FloatingPointError(
                f"The training loss became NaN or infinite at step {first_step}; training stopped and nothing after "
                f"it was saved. Last good checkpoint: {last_good or 'none'}. Lower the learning rate, enable gradient "
                "clipping (--max_grad_norm) or check the data of that step."
            )

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, the Trainer's save steps see the staging folder as the run folder.
        if self._checkpoint_staging_dir is not None:
            return self._checkpoint_staging_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Writes the checkpoint into `<run dir>/.incomplete/` and renames it into place once every process has
        written its part, so that `checkpoint-<step>` is either complete or absent (see [`~cps_hf.checkpointing`])."""
        self.check_finite_loss()
        run_dir = super()._get_output_dir(trial)
        checkpoint_name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_dir = os.path.join(run_dir, STAGING_DIR_NAME)
        if self.args.should_save:
            # A leftover of an interrupted save of this step is ours to replace.
            shutil.rmtree(os.path.join(staging_dir, checkpoint_name), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging_dir = staging_dir
        try:
            super()._save_checkpoint(model, trial)
            if self._unlabeled_batches is not None:
                # Every process saves where its part of the stream stands, as it saves its RNG state.
                write_stream_position(
                    os.path.join(staging_dir, checkpoint_name),
                    self.unlabeled_stream,
                    self._unlabeled_batches.position,
                )
        finally:
            self._checkpoint_staging_dir = None
        final_dir = os.path.join(run_dir, checkpoint_name)
        if self.state.best_global_step is not None:
            best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.isdir(best_dir):
                self.state.best_model_checkpoint = best_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            # The state was written with staging paths in it; write it again as it will be read.
            self.state.save_to_json(os.path.join(staging_dir, checkpoint_name, TRAINER_STATE_NAME))
            publish_checkpoint(os.path.join(staging_dir, checkpoint_name), final_dir)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        # Without Sync-BN, each process's last training forward updated its own BatchNorm running statistics (DDP
        # broadcasts them from the main process only at the start of a training forward): every process evaluates
        # with the main process's, the ones it saves, so the metrics describe the saved model.
        if self.args.world_size > 1:
            with torch.no_grad():
                broadcast(list(self.model.buffers()), from_process=0)
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            # The throughput clock counts training only: an evaluation between two logs is not training time.
            if self._last_log_time is not None:
                self._last_log_time += time.perf_counter() - start

    def _evaluation_loss(self, model, inputs, return_outputs):
        outputs = model(pixel_values=inputs["pixel_values"], labels=inputs.get("labels"))
        outputs = CPSSemanticSegmenterOutput(loss=outputs.loss, logits=outputs.logits)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ignore_index = self.model.config.semantic_loss_ignore_index
        if self.args.supervised_loss == "ohem":
            return ohem_cross_entropy(
                logits,
                labels,
                ignore_index,
                threshold=self.args.ohem_threshold,
                min_kept=self.args.ohem_min_kept,
            )
        return supervised_cross_entropy(logits, labels, ignore_index, self.class_weights)

    def cps_step_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], CPSSemanticSegmenterOutput]:
        """The loss of one training step, its named terms (detached) and the labelled-batch outputs."""
        labels = inputs["labels"]
        cps_loss = None
        if self.args.channels_last:
            # Mixed images and concatenations of channels-last tensors stay channels-last.
            inputs = in_memory_format(inputs, torch.channels_last)
        if self.args.supervised_only:
            labeled_logits = list(branch_logits(model, inputs["pixel_values"]))
        elif self.args.cutmix:
            forward = cutmix_forward(
                model,
                inputs,
                pseudo_label_mode=self.args.pseudo_label_mode,
                confidence_threshold=self.args.cps_confidence_threshold,
                fused_forward=self.args.fused_forward,
            )
            pseudo_labels = forward.pseudo_labels
            student_logits = [logits.float() for logits in forward.student_logits]
            cps_loss = cross_pseudo_supervision_loss(student_logits, pseudo_labels, self.cps_class_weights)
            labeled_logits = forward.labeled_logits
        else:
            labeled_logits, joint_logits = plain_cps_forward(
                model, inputs, fused_forward=self.args.fused_forward
            )
            joint_logits = [logits.float() for logits in joint_logits]
            pseudo_labels = [
                pseudo_labels_from_logits(logits, self.args.cps_confidence_threshold)
                for logits in joint_logits
            ]
            cps_loss = cross_pseudo_supervision_loss(joint_logits, pseudo_labels, self.cps_class_weights)
        # Losses in fp32 whatever the forward dtype (bf16 autocast): log-softmax in bf16 loses small probabilities.
        labeled_logits = [logits.float() for logits in labeled_logits]

        supervised_terms = [self.supervised_loss(logits, labels) for logits in labeled_logits]
        loss = torch.stack(supervised_terms).sum()
        loss_terms = {f"loss_supervised_branch_{i}": term.detach() for i, term in enumerate(supervised_terms)}
        if cps_loss is not None:
            loss = loss + self.current_cps_weight() * cps_loss
            loss_terms["loss_cps"] = cps_loss.detach()
            loss_terms["cps_pixels_kept"] = kept_pseudo_label_fraction(pseudo_labels)
        outputs = CPSSemanticSegmenterOutput(
            loss=loss, logits=labeled_logits[0], branch_logits=labeled_logits
        )
        return loss, loss_terms, outputs

    def current_cps_weight(self) -> float:
        """λ for the optimizer step in progress: `cps_weight`, ramped up linearly over `cps_weight_warmup_steps`."""
        warmup_steps = self.args.cps_weight_warmup_steps
        if warmup_steps == 0:
            return self.args.cps_weight
        return self.args.cps_weight * min(1.0, self.state.global_step / warmup_steps)

    def _accumulate_loss_terms(self, loss_terms: dict[str, torch.Tensor]) -> None:
        for name, value in loss_terms.items():
            self._loss_term_sums[name] = self._loss_term_sums.get(name, 0.0) + value.float()
        self._loss_term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry "loss"; add the mean of each term since the last log, reduced over processes
        # (every process reaches this call, so the reduction is collective).
        if "loss" in logs:
            self.check_finite_loss()
        if "loss" in logs and self._loss_term_count:
            names = sorted(self._loss_term_sums)
            means = torch.stack([self._loss_term_sums[name] for name in names]) / self._loss_term_count
            means = self.accelerator.reduce(means, reduction="mean").tolist()
            logs.update({name: round(value, 4) for name, value in zip(names, means)})
            self._loss_term_sums, self._loss_term_count = {}, 0
        if "loss" in logs and self._last_log_time is not None:
            # Every process runs equal batches (full batches only), so the global rate is the local one times
            # the number of processes.
            now = time.perf_counter()
            images = self._images_since_log * self.args.world_size
            logs["images_per_second"] = round(images / max(now - self._last_log_time, 1e-9), 2)
            self._images_since_log, self._last_log_time = 0, now
        super().log(logs, start_time)


def use_sync_batchnorm(model: nn.Module) -> None:
    """Replaces, in place, every BatchNorm layer below `model` by its synchronised version, keeping parameters and
    running statistics. timm's fused norm + activation layers (`BatchNormAct2d`, in EfficientNet, RegNet, ... backbones)
    become `SyncBatchNormAct` with their activation: `nn.SyncBatchNorm.convert_sync_batchnorm` would turn them into a
    plain `SyncBatchNorm` and silently drop the activation."""
    # Children are replaced in place; `model` itself (a model, never a norm layer) is returned unchanged.
    convert_sync_batchnorm(model)


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def predictions_from_logits(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """Argmax on the device before evaluation gathers anything: `num_labels` times less to move."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return class_predictions(logits)


__all__ = [
    "CPSTrainer",
    "CPSTrainingArguments",
    "CutMixForwardOutput",
    "check_cutmix_inputs",
    "cutmix_forward",
    "predictions_from_logits",
    "teacher_mode",
    "use_sync_batchnorm",
]
