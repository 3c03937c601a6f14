import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import make_tiny_config
from safetensors.torch import load_file
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import SyncBatchNormAct
from torch import nn
from transformers import HfArgumentParser

from cps_hf import CPSConfig, CPSForSemanticSegmentation
from cps_hf.data import SegmentationTransform, SemiSupervisedSegmentationDataset, collate_semi_supervised
from cps_hf.data.synthetic import SYNTHETIC_CLASS_NAMES, make_synthetic_segmentation_dataset
from cps_hf.experiment import MODEL_CONFIG_FIELDS, ModelArguments, parse_experiment_arguments, run_experiment
from cps_hf.losses import (
    cross_pseudo_supervision_loss,
    kept_pseudo_label_fraction,
    median_frequency_class_weights,
    pseudo_labels_from_logits,
    supervised_cross_entropy,
)
from cps_hf.masking import mix_with_mask
from cps_hf.trainer import CPSTrainer, CPSTrainingArguments, use_sync_batchnorm

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_LABELS = len(SYNTHETIC_CLASS_NAMES)


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("synthetic_cache")
    make_synthetic_segmentation_dataset(
        num_train=16, num_val=4, image_size=32, seed=0, cache_dir=str(cache_dir)
    )
    return cache_dir


@pytest.fixture(scope="module")
def synthetic_splits(synthetic_cache):
    return make_synthetic_segmentation_dataset(
        num_train=16, num_val=4, image_size=32, seed=0, cache_dir=str(synthetic_cache)
    )


def small_model() -> CPSForSemanticSegmentation:
    return CPSForSemanticSegmentation(make_tiny_config())


def paired_dataset(splits, cutmix: bool = False) -> SemiSupervisedSegmentationDataset:
    transform = SegmentationTransform(train=True, crop_size=24, scales=(1.0, 1.25))
    return SemiSupervisedSegmentationDataset(
        splits["train"], [0, 1, 2, 3], transform=transform, num_labels=NUM_LABELS, cutmix=cutmix
    )


def training_arguments(output_dir: Path, **overrides) -> CPSTrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return CPSTrainingArguments(**values)


def test_defaults_make_cps_work_out_of_the_box(tmp_path):
    args = CPSTrainingArguments(output_dir=str(tmp_path))
    assert args.remove_unused_columns is False
    assert args.optim == "sgd" and "momentum=0.9" in args.optim_args
    assert args.lr_scheduler_type == "polynomial"
    assert args.lr_scheduler_kwargs == {"power": 0.9, "lr_end": 0.0}
    assert args.ddp_find_unused_parameters is False
    assert args.batch_eval_metrics is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"supervised_loss": "focal"}, "supervised_loss"),
        ({"pseudo_label_mode": "ema"}, "pseudo_label_mode"),
        ({"cps_weight": -1.0}, "cps_weight"),
        ({"cps_confidence_threshold": 1.0}, "cps_confidence_threshold"),
        ({"supervised_only": True, "cutmix": True}, "exclude each other"),
        ({"torch_compile": True, "gradient_checkpointing": True}, "fused_forward"),
        ({"class_weighting": "inverse"}, "class_weighting"),
        ({"class_weighting": "median_frequency", "supervised_loss": "ohem"}, "cannot be combined"),
        ({"cps_class_weighting": True}, "set both"),
    ],
)
def test_bad_training_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        CPSTrainingArguments(output_dir=str(tmp_path), **overrides)


def test_no_weight_decay_on_biases_and_norms(tmp_path, synthetic_splits):
    model = small_model()
    trainer = CPSTrainer(
        model=model, args=training_arguments(tmp_path), train_dataset=paired_dataset(synthetic_splits)
    )
    decayed = set(trainer.get_decay_parameter_names(model))
    for name, _ in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        is_conv_weight = isinstance(module, nn.Conv2d) and name.endswith("weight")
        assert (name in decayed) == is_conv_weight, name
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9


def test_plain_cps_loss_matches_hand_computation(tmp_path, synthetic_splits):
    model = small_model().train()
    trainer = CPSTrainer(
        model=model, args=training_arguments(tmp_path), train_dataset=paired_dataset(synthetic_splits)
    )
    batch = collate_semi_supervised([trainer.train_dataset[i] for i in range(2)])
    torch.manual_seed(0)
    loss, terms, _ = trainer.cps_step_loss(model, batch)
    labeled = [model(batch["pixel_values"], branch_index=i).logits for i in range(2)]
    unlabeled = [model(batch["unlabeled_pixel_values"], branch_index=i).logits for i in range(2)]
    supervised = sum(supervised_cross_entropy(logits, batch["labels"]) for logits in labeled)
    cps = cross_pseudo_supervision_loss([torch.cat(pair) for pair in zip(labeled, unlabeled)])
    torch.testing.assert_close(loss, supervised + 1.5 * cps)
    torch.testing.assert_close(terms["loss_cps"], cps.detach())


def test_cps_confidence_threshold_ignores_unconfident_pseudo_labels(tmp_path, synthetic_splits):
    model = small_model().train()
    batch = collate_semi_supervised([paired_dataset(synthetic_splits)[i] for i in range(2)])
    with torch.no_grad():
        joint = [
            torch.cat(
                [
                    model(batch[key], branch_index=i).logits
                    for key in ("pixel_values", "unlabeled_pixel_values")
                ]
            )
            for i in range(2)
        ]
    # τ at the median teacher confidence: about half the pixels are kept.
    threshold = torch.cat([logits.softmax(1).amax(1).flatten() for logits in joint]).median().item()
    args = training_arguments(tmp_path, cps_confidence_threshold=threshold)
    trainer = CPSTrainer(model=model, args=args, train_dataset=paired_dataset(synthetic_splits))
    _, terms, _ = trainer.cps_step_loss(model, batch)
    pseudo_labels = [pseudo_labels_from_logits(logits, threshold) for logits in joint]
    torch.testing.assert_close(terms["loss_cps"], cross_pseudo_supervision_loss(joint, pseudo_labels))
    torch.testing.assert_close(terms["cps_pixels_kept"], kept_pseudo_label_fraction(pseudo_labels))
    assert 0.3 < terms["cps_pixels_kept"].item() < 0.7
    assert not torch.allclose(terms["loss_cps"], cross_pseudo_supervision_loss(joint))

    paper_trainer = CPSTrainer(
        model=model, args=training_arguments(tmp_path), train_dataset=paired_dataset(synthetic_splits)
    )
    _, paper_terms, _ = paper_trainer.cps_step_loss(model, batch)
    assert paper_terms["cps_pixels_kept"].item() == 1.0


@pytest.mark.parametrize("cps_class_weighting", [False, True])
def test_median_frequency_class_weighting(tmp_path, synthetic_splits, cps_class_weighting):
    model = small_model().train()
    dataset = paired_dataset(synthetic_splits)
    args = training_arguments(
        tmp_path, class_weighting="median_frequency", cps_class_weighting=cps_class_weighting
    )
    trainer = CPSTrainer(model=model, args=args, train_dataset=dataset)
    labeled_masks = [torch.as_tensor(np.array(synthetic_splits["train"][row]["label"])) for row in range(4)]
    weights = median_frequency_class_weights(labeled_masks, NUM_LABELS)
    assert not torch.allclose(weights, torch.ones_like(weights))
    torch.testing.assert_close(trainer.class_weights, weights)

    batch = collate_semi_supervised([dataset[i] for i in range(2)])
    loss, terms, _ = trainer.cps_step_loss(model, batch)
    labeled = [model(batch["pixel_values"], branch_index=i).logits for i in range(2)]
    unlabeled = [model(batch["unlabeled_pixel_values"], branch_index=i).logits for i in range(2)]
    supervised = sum(
        supervised_cross_entropy(logits, batch["labels"], class_weights=weights) for logits in labeled
    )
    cps = cross_pseudo_supervision_loss(
        [torch.cat(pair) for pair in zip(labeled, unlabeled)],
        class_weights=weights if cps_class_weighting else None,
    )
    torch.testing.assert_close(loss, supervised + 1.5 * cps)
    torch.testing.assert_close(terms["loss_cps"], cps.detach())
    paper = CPSTrainer(model=model, args=training_arguments(tmp_path), train_dataset=dataset)
    assert paper.class_weights is None and paper.cps_class_weights is None


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"cutmix": True},
        {"cutmix": True, "pseudo_label_mode": "eval", "cps_confidence_threshold": 0.5},
        {"supervised_only": True},
        {"class_weighting": "median_frequency", "gradient_accumulation_steps": 2},
        {"class_weighting": "median_frequency", "cps_class_weighting": True, "cutmix": True},
    ],
    ids=[
        "plain",
        "cutmix",
        "cutmix-eval-threshold",
        "supervised",
        "weighted-accumulation",
        "cutmix-cps-weighted",
    ],
)
def test_parallel_branches_step_computes_the_papers_step(tmp_path, synthetic_splits, overrides):
    cutmix = overrides.get("cutmix", False)
    batch = collate_semi_supervised([paired_dataset(synthetic_splits, cutmix=cutmix)[i] for i in range(2)])
    steps = {}
    for parallel in (False, True):
        torch.manual_seed(0)
        model = small_model().train()
        args = training_arguments(tmp_path / str(parallel), parallel_branches=parallel, **overrides)
        trainer = CPSTrainer(
            model=model, args=args, train_dataset=paired_dataset(synthetic_splits, cutmix=cutmix)
        )
        trainer.current_gradient_accumulation_steps = (
            args.gradient_accumulation_steps
        )  # set by the training loop
        loss = trainer.training_step(model, dict(batch))
        terms = {name: value / trainer._loss_term_count for name, value in trainer._loss_term_sums.items()}
        steps[parallel] = (loss, terms, model)
    (serial_loss, serial_terms, serial_model), (loss, terms, model) = steps[False], steps[True]
    # The same operations per branch; only the summation of the branches' gradients into one loss differs.
    torch.testing.assert_close(loss, serial_loss)
    assert terms.keys() == serial_terms.keys()
    for name in terms:
        torch.testing.assert_close(terms[name], serial_terms[name])
    for (name, parameter), serial_parameter in zip(model.named_parameters(), serial_model.parameters()):
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, serial_parameter.grad, msg=name)
    for (name, buffer), serial_buffer in zip(model.named_buffers(), serial_model.buffers()):
        torch.testing.assert_close(buffer, serial_buffer, msg=name)


@pytest.mark.parametrize("conflict", ["fused_forward", "gradient_checkpointing"])
def test_parallel_branches_falls_back_to_the_usual_step_where_it_does_not_apply(
    tmp_path, synthetic_splits, conflict
):
    dataset = paired_dataset(synthetic_splits)
    args = training_arguments(tmp_path, parallel_branches=True)
    assert CPSTrainer(model=small_model(), args=args, train_dataset=dataset).parallel_branches is True
    args = training_arguments(tmp_path, parallel_branches=True, **{conflict: True})
    assert CPSTrainer(model=small_model(), args=args, train_dataset=dataset).parallel_branches is False


def test_n_cps_with_three_branches(tmp_path, synthetic_splits):
    config = small_model().config
    config.num_branches = 3
    model = CPSForSemanticSegmentation(config).train()
    trainer = CPSTrainer(
        model=model, args=training_arguments(tmp_path), train_dataset=paired_dataset(synthetic_splits)
    )
    batch = collate_semi_supervised([trainer.train_dataset[i] for i in range(2)])
    loss, terms, _ = trainer.cps_step_loss(model, batch)
    labeled = [model(batch["pixel_values"], branch_index=i).logits for i in range(3)]
    unlabeled = [model(batch["unlabeled_pixel_values"], branch_index=i).logits for i in range(3)]
    joint = [torch.cat(pair) for pair in zip(labeled, unlabeled)]
    # Every branch learns from both others' argmax maps; the sum over ordered pairs is divided by n - 1 = 2.
    expected_cps = (
        sum(
            torch.nn.functional.cross_entropy(joint[i], joint[j].argmax(1))
            for i in range(3)
            for j in range(3)
            if i != j
        )
        / 2
    )
    torch.testing.assert_close(terms["loss_cps"], expected_cps.detach())
    assert {"loss_supervised_branch_2"} <= terms.keys()
    supervised = sum(supervised_cross_entropy(logits, batch["labels"]) for logits in labeled)
    torch.testing.assert_close(loss, supervised + 1.5 * expected_cps)


@pytest.mark.parametrize("pseudo_label_mode", ["train", "eval"])
def test_cutmix_pseudo_labels_are_mixed_teacher_predictions(tmp_path, synthetic_splits, pseudo_label_mode):
    model = small_model().train()
    model(torch.randn(4, 3, 24, 24))  # non-trivial running statistics for the eval-mode teachers
    args = training_arguments(tmp_path, cutmix=True, cps_weight=1.0, pseudo_label_mode=pseudo_label_mode)
    trainer = CPSTrainer(model=model, args=args, train_dataset=paired_dataset(synthetic_splits, cutmix=True))
    batch = collate_semi_supervised([trainer.train_dataset[i] for i in range(2)])
    assert not torch.equal(batch["unlabeled_pixel_values"], batch["mix_unlabeled_pixel_values"])
    cutmix_masks = batch["cutmix_masks"]
    # Teachers first: in eval mode they read the running statistics the step's student passes then update.
    model.train(pseudo_label_mode == "train")
    with torch.no_grad():
        pseudo_labels = [
            mix_with_mask(
                model(batch["unlabeled_pixel_values"], branch_index=i).logits,
                model(batch["mix_unlabeled_pixel_values"], branch_index=i).logits,
                cutmix_masks,
            ).argmax(1)
            for i in range(2)
        ]
    model.train()
    loss, terms, _ = trainer.cps_step_loss(model, batch)
    assert model.training
    mixed = mix_with_mask(batch["unlabeled_pixel_values"], batch["mix_unlabeled_pixel_values"], cutmix_masks)
    students = [model(mixed, branch_index=i).logits for i in range(2)]
    expected_cps = cross_pseudo_supervision_loss(students, pseudo_labels)
    torch.testing.assert_close(terms["loss_cps"], expected_cps.detach())
    labeled = [model(batch["pixel_values"], branch_index=i).logits for i in range(2)]
    expected = sum(supervised_cross_entropy(logits, batch["labels"]) for logits in labeled) + expected_cps
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("cutmix", [False, True])
def test_fused_step_computes_the_paper_step_losses_with_eval_mode_batchnorm(
    tmp_path, synthetic_splits, cutmix
):
    model = small_model().train()
    with torch.no_grad():
        model(torch.randn(4, 3, 24, 24))  # non-trivial running statistics
    model.eval()
    dataset = paired_dataset(synthetic_splits, cutmix=cutmix)
    batch = collate_semi_supervised([dataset[i] for i in range(2)])
    calls: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(len(kwargs["pixel_values"])), with_kwargs=True
    )
    step_losses = {}
    for fused_forward in (False, True):
        args = training_arguments(tmp_path, cutmix=cutmix, fused_forward=fused_forward)
        trainer = CPSTrainer(model=model, args=args, train_dataset=dataset)
        calls.clear()
        step_losses[fused_forward] = trainer.cps_step_loss(model, batch)[:2]
        # One call per image batch (labelled, unlabelled; CutMix: u0, u1, mixed, labelled), or one call on
        # [labelled ; unlabelled] (CutMix: [u0 ; u1], then [labelled ; mixed]).
        expected_calls = {
            (False, False): [2, 2],
            (False, True): [2, 2, 2, 2],
            (True, False): [4],
            (True, True): [4, 4],
        }
        assert calls == expected_calls[fused_forward, cutmix]
    (paper_loss, paper_terms), (fused_loss, fused_terms) = step_losses[False], step_losses[True]
    # Eval-mode BatchNorm normalises every image on its own: only the summation order of the means can differ.
    torch.testing.assert_close(fused_loss, paper_loss, rtol=1e-5, atol=0)
    assert fused_terms.keys() == paper_terms.keys()
    for name, value in paper_terms.items():
        torch.testing.assert_close(fused_terms[name], value, rtol=1e-5, atol=0, msg=name)


def test_fused_step_normalises_over_the_concatenated_batches_in_train_mode(tmp_path, synthetic_splits):
    model = small_model().train()
    dataset = paired_dataset(synthetic_splits, cutmix=True)
    batch = collate_semi_supervised([dataset[i] for i in range(2)])
    supervised = {}
    for fused_forward in (False, True):
        args = training_arguments(tmp_path, cutmix=True, fused_forward=fused_forward)
        trainer = CPSTrainer(model=copy.deepcopy(model), args=args, train_dataset=dataset)
        _, terms, _ = trainer.cps_step_loss(trainer.model, batch)
        supervised[fused_forward] = terms["loss_supervised_branch_0"]
    assert torch.isfinite(supervised[True])
    assert not torch.allclose(supervised[True], supervised[False], rtol=1e-3)


def test_training_uses_labelled_and_unlabelled_images_and_moves_every_branch(tmp_path, synthetic_splits):
    model = small_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    seen_batches: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen_batches.append(kwargs["pixel_values"]), with_kwargs=True
    )
    trainer = CPSTrainer(
        model=model, args=training_arguments(tmp_path), train_dataset=paired_dataset(synthetic_splits)
    )
    batches = []
    original = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        batches.append({key: value.clone() for key, value in inputs.items()})
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    assert len(batches) == 2
    for batch in batches:
        fed = [images for images in seen_batches if images.shape == batch["pixel_values"].shape]
        assert any(torch.equal(images, batch["pixel_values"]) for images in fed), (
            "labelled images never reached the model"
        )
        assert any(torch.equal(images, batch["unlabeled_pixel_values"]) for images in fed), (
            "unlabelled images never reached the model"
        )
    for branch_index in range(2):
        prefix = f"branches.{branch_index}."
        for part in ("backbone", "aspp", "decoder", "classifier"):
            names = [name for name in before if name.startswith(prefix + part) and name.endswith("weight")]
            assert any(not torch.equal(before[name], model.state_dict()[name]) for name in names), (
                branch_index,
                part,
            )
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and {"loss_cps", "loss_supervised_branch_0", "loss_supervised_branch_1"} <= logged[0].keys()
    # Throughput counts every image of the step: 2 labelled + 2 unlabelled per step here.
    assert all(entry["images_per_second"] > 0 for entry in logged)


def first_step_losses(tmp_path: Path, splits, **overrides) -> tuple[list[float], CPSTrainer]:
    """Trains two steps from the same initial weights; returns the logged losses and the trainer."""
    torch.manual_seed(0)
    model = small_model()
    args = training_arguments(tmp_path / "run", cutmix=True, **overrides)
    trainer = CPSTrainer(model=model, args=args, train_dataset=paired_dataset(splits, cutmix=True))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], trainer


def test_channels_last_training_computes_the_same_step_and_saves_loadable_weights(tmp_path, synthetic_splits):
    (first_default, _), _ = first_step_losses(tmp_path / "nchw", synthetic_splits)
    (first_channels_last, _), trainer = first_step_losses(
        tmp_path / "nhwc", synthetic_splits, channels_last=True
    )
    convolution = next(
        weight for weight in trainer.model.parameters() if weight.dim() == 4 and weight.shape[-1] > 1
    )
    assert convolution.is_contiguous(memory_format=torch.channels_last) and not convolution.is_contiguous()
    # Same values in another layout: other convolution kernels, float reassociation only (measured <= 1e-6).
    assert first_channels_last == pytest.approx(first_default, rel=1e-5)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = CPSForSemanticSegmentation.from_pretrained(tmp_path / "saved")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trainer.model.state_dict()[name]), name


def test_bf16_training_runs_the_forward_in_bfloat16_and_the_losses_in_fp32(tmp_path, synthetic_splits):
    forward_dtypes = []
    (first_fp32, _), _ = first_step_losses(tmp_path / "fp32", synthetic_splits)
    torch.manual_seed(0)
    model = small_model()
    model.branches[0].classifier.register_forward_hook(
        lambda module, args, output: forward_dtypes.append(output.dtype)
    )
    args = training_arguments(tmp_path / "bf16", cutmix=True, bf16=True)
    trainer = CPSTrainer(model=model, args=args, train_dataset=paired_dataset(synthetic_splits, cutmix=True))
    trainer.train()
    first_bf16 = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][0]
    assert set(forward_dtypes) == {torch.bfloat16}
    # bf16 keeps 8 significant bits: over the tiny model's layers the loss moves by about a percent.
    assert first_bf16 == pytest.approx(first_fp32, rel=0.05) and first_bf16 != first_fp32


def test_torch_compile_compiles_each_branch_and_keeps_the_step(tmp_path, synthetic_splits):
    (first_eager, _), eager_trainer = first_step_losses(tmp_path / "eager", synthetic_splits)
    # aot_eager traces and runs the same ATen kernels without code generation: the compile path, fast.
    (first_compiled, _), trainer = first_step_losses(
        tmp_path / "compiled", synthetic_splits, torch_compile=True, torch_compile_backend="aot_eager"
    )
    assert all(branch._compiled_call_impl is not None for branch in trainer.model.branches)
    assert trainer.model_wrapped is trainer.model or not hasattr(trainer.model_wrapped, "_orig_mod")
    assert trainer.model.state_dict().keys() == eager_trainer.model.state_dict().keys()
    assert first_compiled == pytest.approx(first_eager, rel=1e-5)


def test_supervised_only_uses_no_unlabelled_images(tmp_path, synthetic_splits):
    model = small_model()
    args = training_arguments(tmp_path, supervised_only=True)
    trainer = CPSTrainer(model=model, args=args, train_dataset=paired_dataset(synthetic_splits))
    batch = collate_semi_supervised([trainer.train_dataset[i] for i in range(2)])
    loss, terms, _ = trainer.cps_step_loss(model.train(), batch)
    assert "loss_cps" not in terms
    changed = dict(batch, unlabeled_pixel_values=torch.randn_like(batch["unlabeled_pixel_values"]))
    torch.manual_seed(0)
    torch.testing.assert_close(trainer.cps_step_loss(model, changed)[0], loss)


def test_gradient_accumulation_averages_micro_batches(tmp_path, synthetic_splits):
    model = small_model()
    args = training_arguments(tmp_path, gradient_accumulation_steps=2)
    trainer = CPSTrainer(model=model, args=args, train_dataset=paired_dataset(synthetic_splits))
    trainer.current_gradient_accumulation_steps = 2
    micro_batches = [
        collate_semi_supervised([trainer.train_dataset[i] for i in pair]) for pair in ((0, 1), (2, 3))
    ]
    expected_grads = {}
    losses = []
    for batch in micro_batches:
        model.zero_grad()
        loss, _, _ = trainer.cps_step_loss(model.train(), batch)
        loss.backward()
        losses.append(loss.detach())
        for name, parameter in model.named_parameters():
            expected_grads[name] = expected_grads.get(name, 0) + parameter.grad / 2
    model.zero_grad()
    reported = [trainer.training_step(model, batch) for batch in micro_batches]
    torch.testing.assert_close(sum(reported), sum(losses) / 2)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-4, atol=1e-6)


def test_evaluation_reports_streaming_miou(tmp_path, synthetic_splits):
    from cps_hf.data import SupervisedSegmentationDataset

    model = small_model()
    eval_dataset = SupervisedSegmentationDataset(synthetic_splits["validation"], num_labels=NUM_LABELS)
    trainer = CPSTrainer(
        model=model,
        args=training_arguments(tmp_path, per_device_eval_batch_size=2),
        train_dataset=paired_dataset(synthetic_splits),
        eval_dataset=eval_dataset,
        data_collator=collate_semi_supervised,
    )
    trainer._last_log_time = clock_start = time.perf_counter()
    before = time.perf_counter()
    metrics = trainer.evaluate()
    evaluation_seconds = time.perf_counter() - before
    assert 0.0 <= metrics["eval_mean_iou"] <= 1.0
    assert "eval_iou_background" in metrics and metrics["eval_loss"] > 0
    # The throughput clock pauses during evaluation: its start moves forward by (at most) the evaluation's time.
    assert 0 < trainer._last_log_time - clock_start <= evaluation_seconds


def experiment_argv(output_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "--output_dir",
        str(output_dir),
        "--cache_dir",
        str(cache_dir),
        "--synthetic_num_train",
        "16",
        "--synthetic_num_val",
        "4",
        "--synthetic_image_size",
        "32",
        "--labeled_fraction",
        "0.25",
        "--backbone",
        "test_resnet",
        "--multi_grid",
        "null",
        "--aspp_channels",
        "16",
        "--decoder_channels",
        "16",
        "--low_level_channels",
        "8",
        "--crop_size",
        "24",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "4",
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--use_cpu",
        "true",
        *extra,
    ]


def test_experiment_saves_loadable_model_results_and_card(tmp_path, synthetic_cache):
    output_dir = tmp_path / "run"
    # Not the demo config (the base without a config file, which pins a shared init): the library defaults.
    config = tmp_path / "defaults.yaml"
    config.write_text("pretrained_backbone: false\nshare_backbone_initialization: null\n")
    model_args, data_args, training_args, _ = parse_experiment_arguments(
        [str(config), *experiment_argv(output_dir, synthetic_cache)]
    )
    assert model_args.multi_grid is None
    results = run_experiment(model_args, data_args, training_args)
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "all_results.json",
        "eval_results.json",
        "README.md",
        "cps_recipe.json",
    ):
        assert (output_dir / name).exists(), name
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert eval_results["eval_mean_iou"] == pytest.approx(results["eval_mean_iou"])
    card = (output_dir / "README.md").read_text()
    assert f"{100 * results['eval_mean_iou']:.2f}" in card
    loaded = CPSForSemanticSegmentation.from_pretrained(output_dir)
    assert loaded.config.id2label[1] == SYNTHETIC_CLASS_NAMES[1]
    recipe = json.loads((output_dir / "cps_recipe.json").read_text())
    assert recipe["num_labeled"] == 4 and recipe["num_unlabeled"] == 12
    split = recipe["split"]
    assert (split["method"], split["split_seed"], split["num_labeled"]) == ("fraction", 0, 4)
    assert split["fingerprint"] == recipe["split_fingerprint"]
    assert "random fraction 0.25 of the split, seed 0" in card and f"`{split['fingerprint']}`" in card
    # Trained from scratch: independent backbone draws per branch, resolved, recorded and stated in the card.
    assert loaded.config.share_backbone_initialization is False
    assert recipe["model"]["share_backbone_initialization"] is False
    assert "| backbone initialisation | an independent random draw per branch |" in card


def test_config_file_with_cli_overrides(tmp_path, synthetic_cache):
    config = tmp_path / "experiment.yaml"
    config.write_text(
        "backbone: test_resnet\ncps_weight: 6.0\ncutmix: true\nlabeled_fraction: 0.5\noutput_dir: x\n"
    )
    model_args, data_args, training_args, path = parse_experiment_arguments(
        [str(config), "--cps_weight", "5"]
    )
    assert path == config
    assert model_args.backbone == "test_resnet" and training_args.cutmix is True
    assert training_args.cps_weight == 5.0 and data_args.labeled_fraction == 0.5
    config.write_text("backbone: test_resnet\nnot_an_argument: 1\n")
    with pytest.raises(ValueError, match="not_an_argument"):
        parse_experiment_arguments([str(config)])


def test_gradient_checkpointing_flag_reaches_the_model_through_the_trainer(
    tmp_path, synthetic_cache, monkeypatch
):
    config = tmp_path / "experiment.yaml"
    config.write_text("labeled_fraction: 0.25\ngradient_checkpointing: true\n")
    _, _, training_args, _ = parse_experiment_arguments([str(config), "--output_dir", str(tmp_path / "x")])
    assert training_args.gradient_checkpointing is True

    # The Trainer turns it on in `train()`; count the head calls that go through the checkpoint function it passes.
    checkpointed_heads = []
    set_checkpointing = CPSForSemanticSegmentation._set_gradient_checkpointing

    def spy(model, enable=True, gradient_checkpointing_func=None, every_n_layers=1):
        def counted(*args, **kwargs):
            checkpointed_heads.append(model)
            return gradient_checkpointing_func(*args, **kwargs)

        set_checkpointing(model, enable, counted, every_n_layers)

    monkeypatch.setattr(CPSForSemanticSegmentation, "_set_gradient_checkpointing", spy)
    argv = experiment_argv(tmp_path / "run", synthetic_cache, "--cutmix", "true", "--max_steps", "2")
    run_experiment(*parse_experiment_arguments([*argv, "--gradient_checkpointing", "true"])[:3])
    (model,) = set(checkpointed_heads)
    assert all(
        branch.gradient_checkpointing and branch.backbone.grad_checkpointing for branch in model.branches
    )
    # Two steps, two calls with gradients per CutMix step (students, labelled), two branches per call.
    assert len(checkpointed_heads) == 2 * 2 * 2


def test_crop_size_is_one_size_or_a_height_width_pair(tmp_path, synthetic_cache):
    config = tmp_path / "experiment.yaml"
    for yaml_value, expected in (("24", [24, 24]), ("[24, 32]", [24, 32])):
        config.write_text(f"labeled_fraction: 0.5\ncrop_size: {yaml_value}\n")
        assert parse_experiment_arguments([str(config)])[1].crop_size == expected
    assert parse_experiment_arguments([str(config), "--crop_size", "16", "40"])[1].crop_size == [16, 40]
    for bad in (["--crop_size", "0"], ["--crop_size", "8", "8", "8"]):
        with pytest.raises(ValueError, match="crop_size"):
            parse_experiment_arguments([str(config), *bad])

    # Whole non-square frames: the synthetic 32x32 images trained as 24x32 crops (height x width).
    output_dir = tmp_path / "run"
    argv = experiment_argv(output_dir, synthetic_cache, "--crop_size", "24", "32", "--max_steps", "1")
    run_experiment(*parse_experiment_arguments(argv)[:3])
    assert json.loads((output_dir / "cps_recipe.json").read_text())["data"]["crop_size"] == [24, 32]
    assert "24×32" in (output_dir / "README.md").read_text()


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def test_exact_resume_from_checkpoint(tmp_path, synthetic_cache):
    def run(output_dir: Path, *extra: str):
        argv = experiment_argv(
            output_dir,
            synthetic_cache,
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--eval_split",
            "null",
            *extra,
        )
        run_experiment(*parse_experiment_arguments(argv)[:3])

    run(tmp_path / "straight")
    # Another run that only has the step-2 checkpoint of the first continues from it to the same weights.
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run(tmp_path / "resumed")
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    straight_log = json.loads((tmp_path / "straight" / "trainer_state.json").read_text())["log_history"]
    resumed_log = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["log_history"]
    assert [entry.get("loss") for entry in resumed_log] == [entry.get("loss") for entry in straight_log]


def test_nonfinite_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path, synthetic_splits):
    model = small_model()
    args = training_arguments(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, logging_steps=5)
    trainer = CPSTrainer(model=model, args=args, train_dataset=paired_dataset(synthetic_splits))
    original = trainer.compute_loss

    def loss_that_explodes_at_step_3(model, inputs, *args, **kwargs):
        loss = original(model, inputs, *args, **kwargs)
        return loss * float("nan") if trainer.state.global_step == 2 else loss

    trainer.compute_loss = loss_that_explodes_at_step_3
    with pytest.raises(FloatingPointError, match=r"at step 3;.*Last good checkpoint: .*checkpoint-2"):
        trainer.train()
    assert (tmp_path / "checkpoint-2").is_dir()
    assert not (tmp_path / "checkpoint-4").exists()


def test_gradient_clipping_is_off_by_default_as_in_the_paper(tmp_path):
    assert CPSTrainingArguments(output_dir=str(tmp_path)).max_grad_norm == 0.0


def test_training_drops_the_last_partial_batch_and_evaluation_keeps_every_image(tmp_path, synthetic_splits):
    from cps_hf.data import SupervisedSegmentationDataset

    # 12 unlabelled images in batches of 11: without dropping, every second batch holds one image, which
    # train-mode BatchNorm of the ASPP pooling branch rejects.
    trainer = CPSTrainer(
        model=small_model(),
        args=training_arguments(
            tmp_path, per_device_train_batch_size=11, per_device_eval_batch_size=3, dataloader_drop_last=True
        ),
        train_dataset=paired_dataset(synthetic_splits),
        eval_dataset=SupervisedSegmentationDataset(synthetic_splits["validation"], num_labels=NUM_LABELS),
        data_collator=collate_semi_supervised,
    )
    assert len(trainer.get_train_dataloader()) == 1
    default_trainer = CPSTrainer(
        model=small_model(),
        args=training_arguments(tmp_path, per_device_train_batch_size=11),
        train_dataset=paired_dataset(synthetic_splits),
        data_collator=collate_semi_supervised,
    )
    assert len(default_trainer.get_train_dataloader()) == 1
    assert sum(len(batch["labels"]) for batch in trainer.get_eval_dataloader()) == 4
    trainer.train()
    assert trainer.state.global_step == 2

    too_large = CPSTrainer(
        model=small_model(),
        args=training_arguments(tmp_path, per_device_train_batch_size=13),
        train_dataset=paired_dataset(synthetic_splits),
        data_collator=collate_semi_supervised,
    )
    with pytest.raises(ValueError, match="smaller than one batch of 13"):
        too_large.get_train_dataloader()


def test_cps_weight_warmup_ramps_lambda_linearly(tmp_path, synthetic_splits):
    trainer = CPSTrainer(
        model=small_model(),
        args=training_arguments(tmp_path, cps_weight=1.5, cps_weight_warmup_steps=4),
        train_dataset=paired_dataset(synthetic_splits),
        data_collator=collate_semi_supervised,
    )
    weights = []
    for step in (0, 1, 2, 4, 9):
        trainer.state.global_step = step
        weights.append(trainer.current_cps_weight())
    assert weights == pytest.approx([0.0, 0.375, 0.75, 1.5, 1.5])

    # At the first step the CPS term is weighted 0: the loss is the supervised terms alone.
    trainer.state.global_step = 0
    batch = collate_semi_supervised([trainer.train_dataset[index] for index in range(2)])
    loss, terms, _ = trainer.cps_step_loss(trainer.model.train(), batch)
    assert terms["loss_cps"] > 0
    torch.testing.assert_close(loss, terms["loss_supervised_branch_0"] + terms["loss_supervised_branch_1"])
    with pytest.raises(ValueError, match="cps_weight_warmup_steps"):
        training_arguments(tmp_path, cps_weight_warmup_steps=-1)


def test_sync_batchnorm_keeps_the_activation_of_timm_norm_act_layers():
    torch.manual_seed(0)
    model = CPSForSemanticSegmentation(make_tiny_config(backbone="test_efficientnet")).train()
    norm_act_count = sum(isinstance(module, BatchNormAct2d) for module in model.modules())
    assert norm_act_count > 0
    model(torch.randn(2, 3, 32, 32))  # running statistics away from their initial values
    model.eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).logits
    plain_conversion = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()

    use_sync_batchnorm(model)

    assert sum(isinstance(module, SyncBatchNormAct) for module in model.modules()) == norm_act_count
    assert not any(type(module) in (nn.BatchNorm2d, BatchNormAct2d) for module in model.modules())
    with torch.no_grad():
        # In evaluation a synchronised BatchNorm is the same normalisation with the same statistics.
        torch.testing.assert_close(model(pixel_values).logits, expected, rtol=0, atol=0)
        # What this guards against: torch's own conversion drops the activations of the norm + act layers.
        assert not torch.allclose(plain_conversion(pixel_values).logits, expected, atol=1e-3)


# One non-default value per CPSConfig field; a new field must be added here (the test checks the list is complete).
NON_DEFAULT_MODEL_CONFIG = {
    "backbone": "test_resnet",
    "backbone_kwargs": {"layers": [1, 1, 1, 2]},
    "output_stride": 8,
    "multi_grid": [1, 2],
    "aspp_dilation_rates": [3, 6, 9],
    "aspp_channels": 12,
    "low_level_channels": 6,
    "decoder_channels": 10,
    "fuse_feature_pyramid": True,
    "leaky_relu_slope": 0.2,
    "batch_norm_eps": 1e-3,
    "batch_norm_momentum": 0.05,
    "num_branches": 3,
    "inference_branch": "ensemble",
    "share_backbone_initialization": True,
    "head_init": "normal",
    "skip_padding_taps": False,
    "initializer_range": 0.05,
    "semantic_loss_ignore_index": 254,
}


def command_line_words(value) -> list[str]:
    if isinstance(value, list):
        return [str(item) for item in value]
    if isinstance(value, dict):
        return [json.dumps(value)]
    return [str(value).lower() if isinstance(value, bool) else str(value)]


@pytest.mark.parametrize("source", ["command line", "config file"])
def test_every_model_config_field_is_an_argument(tmp_path, source):
    assert set(NON_DEFAULT_MODEL_CONFIG) == set(MODEL_CONFIG_FIELDS) == set(CPSConfig.__annotations__)
    defaults = CPSConfig(num_labels=3)
    assert all(getattr(defaults, name) != value for name, value in NON_DEFAULT_MODEL_CONFIG.items())
    argv = ["--labeled_fraction", "0.5"]
    if source == "command line":
        for name, value in NON_DEFAULT_MODEL_CONFIG.items():
            argv += [f"--{name}", *command_line_words(value)]
    else:
        config_file = tmp_path / "experiment.yaml"
        config_file.write_text(yaml.safe_dump(NON_DEFAULT_MODEL_CONFIG))
        argv = [str(config_file), *argv]
    model_args = parse_experiment_arguments(argv)[0]
    config = CPSConfig(**model_args.config_values(), num_labels=3)
    for name, value in NON_DEFAULT_MODEL_CONFIG.items():
        assert getattr(config, name) == value, name
    # Every argument says what it does: the config's own documentation of the field.
    parser_help = {action.dest: action.help for action in HfArgumentParser(ModelArguments)._actions}
    assert parser_help["head_init"].startswith("Initialisation of the head and classifier convolutions")
    assert all(parser_help[name] for name in MODEL_CONFIG_FIELDS)


def test_model_config_arguments_default_to_the_config_defaults():
    model_args = ModelArguments()
    defaults = CPSConfig(num_labels=3)
    for name in MODEL_CONFIG_FIELDS:
        default = getattr(defaults, name)
        assert getattr(model_args, name) == (list(default) if isinstance(default, tuple) else default), name
    assert (
        parse_experiment_arguments(["--labeled_fraction", "0.5", "--multi_grid", "null"])[0].multi_grid
        is None
    )
