import copy
import json

import pytest
import torch
from helpers import run_script
from torch import nn

from benchmarks.step import (
    BenchmarkArguments,
    benchmark_steps,
    convolution_peak_gflops,
    counted_step,
    fast_cutmix_step,
    make_cutmix_batch,
    prepare_model_for_fast_step,
    reference_cutmix_step,
    run_benchmark,
)
from cps_hf import CPSConfig, CPSForSemanticSegmentation

BATCH_SIZE, CROP_SIZE, NUM_LABELS, CPS_WEIGHT = 2, 32, 3, 1.0
REPORT_KEYS = {
    "step_gflop",
    "achieved_gflops",
    "efficiency",
    "reference_step_gflop",
    "reference_achieved_gflops",
    "reference_efficiency",
    "reference_step_seconds",
    "step_seconds",
    "speedup",
    "reference_images_per_second",
    "images_per_second",
    "reference_peak_memory_bytes",
    "peak_memory_bytes",
    "peak_memory_kind",
    "same_initial_weights",
    "settings",
    "machine",
    "reference",
    "fast",
}


@pytest.fixture
def initial_model(tiny_config):
    torch.manual_seed(0)
    return CPSForSemanticSegmentation(tiny_config).train()


def make_batches(num_steps: int, same_unlabeled_images: bool = False) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = [
        make_cutmix_batch(BATCH_SIZE, CROP_SIZE, NUM_LABELS, generator=generator) for _ in range(num_steps)
    ]
    if same_unlabeled_images:
        for batch in batches:
            batch["mix_unlabeled_pixel_values"] = batch["unlabeled_pixel_values"].clone()
    return batches


def official_network_copy(model: CPSForSemanticSegmentation) -> CPSForSemanticSegmentation:
    """The same weights in the official network, which computes every dilated-convolution tap, also those that
    only read zero padding."""
    reference = CPSForSemanticSegmentation(
        CPSConfig(**{**model.config.to_dict(), "skip_padding_taps": False})
    )
    reference.load_state_dict(model.state_dict())
    return reference.train()


def sgd(model: nn.Module, fused: bool) -> torch.optim.SGD:
    """The benchmark's optimizer."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=fused)


def train(model, batches, fast: bool, **fast_options):
    """Runs the steps from a copy of `model` (SGD as the benchmark); returns the step outputs and final state."""
    if fast:
        model = prepare_model_for_fast_step(
            copy.deepcopy(model), channels_last=fast_options.get("channels_last", True)
        )
    else:
        model = official_network_copy(model)
    optimizer = sgd(model, fused=fast)
    outputs = []
    for batch in batches:
        if fast:
            outputs.append(fast_cutmix_step(model, batch, optimizer, CPS_WEIGHT, **fast_options))
        else:
            outputs.append(reference_cutmix_step(model, batch, optimizer, CPS_WEIGHT))
    return outputs, model.state_dict()


def take_over_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    source: nn.Module,
    source_optimizer: torch.optim.Optimizer,
) -> None:
    """Gives `model` the weights, buffers and momentum of `source`, each in `model`'s own memory layout."""
    model.load_state_dict(source.state_dict())
    for parameter, source_parameter in zip(model.parameters(), source.parameters()):
        if source_parameter in source_optimizer.state:
            momentum = source_optimizer.state[source_parameter]["momentum_buffer"]
            optimizer.state[parameter]["momentum_buffer"] = torch.empty_like(parameter).copy_(momentum)


@pytest.mark.parametrize("channels_last", [False, True])
def test_default_fast_step_learns_what_the_reference_step_learns(initial_model, channels_last):
    reference = official_network_copy(initial_model)
    reference_optimizer = sgd(reference, fused=False)
    fast = prepare_model_for_fast_step(copy.deepcopy(initial_model), channels_last=channels_last)
    fast_optimizer = sgd(fast, fused=True)
    # Two steps, so the second also uses the momentum buffers and BatchNorm running statistics of step one. Both
    # steps start from the reference's state: compared over several free-running steps, rounding differences of
    # step one flip near-tie pseudo-labels and ReLU/max-pool decisions in step two (measured: CPS loss off by
    # 3e-4 on an AVX2 CPU, one bias update off by 5%), which says nothing about the step's computation.
    for batch in make_batches(2):
        take_over_state(fast, fast_optimizer, reference, reference_optimizer)
        before = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
        reference_output = reference_cutmix_step(reference, batch, reference_optimizer, CPS_WEIGHT)
        fast_output = fast_cutmix_step(
            fast, batch, fast_optimizer, CPS_WEIGHT, dtype=torch.float32, channels_last=channels_last
        )
        # Same computation from the same state, possibly other convolution kernels (channels-last): the losses
        # differ by float reassociation only, a few units in the last place per layer (measured <= 1e-6 relative).
        # The pseudo-labels are argmaxes and stay the same: a flip needs a tie to within that rounding.
        for name in ("loss", "supervised_loss", "cps_loss"):
            torch.testing.assert_close(
                getattr(fast_output, name), getattr(reference_output, name), rtol=1e-5, atol=0, msg=name
            )
        reference_state, fast_state = reference.state_dict(), fast.state_dict()
        assert fast_state.keys() == reference_state.keys()
        for name, reference_tensor in reference_state.items():
            reference_update = reference_tensor - before[name]
            fast_update = fast_state[name] - before[name]
            if not reference_tensor.is_floating_point():
                assert torch.equal(fast_update, reference_update), name
                continue
            # Each update (gradient step, BatchNorm statistics) sums over every pixel of the batch: in another order
            # a sum of n terms moves by up to ~n * 2^-24 of the sum of their magnitudes (n ~ 10^4 here), and
            # BatchNorm's backward subtracts means, so the result can be far smaller than those magnitudes. The
            # bound is therefore relative to the tensor's largest update: 1% of it (measured up to 0.2%).
            torch.testing.assert_close(
                fast_update,
                reference_update,
                rtol=0,
                atol=1e-2 * float(reference_update.abs().max()),
                msg=name,
            )
    assert not torch.equal(
        reference.branches[0].classifier.weight, initial_model.branches[0].classifier.weight
    )


def test_fused_step_with_running_batchnorm_statistics_is_the_reference_step(initial_model):
    (batch,) = make_batches(1)
    with torch.no_grad():
        initial_model(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    reference = official_network_copy(initial_model).eval()
    fused = copy.deepcopy(initial_model).eval()
    reference_output = reference_cutmix_step(reference, batch, sgd(reference, fused=False), CPS_WEIGHT)
    fused_output = fast_cutmix_step(
        fused, batch, sgd(fused, fused=True), CPS_WEIGHT, dtype=torch.float32, fused_forward=True
    )
    # BatchNorm in eval mode normalises every image on its own: concatenating batches changes only the summation
    # order of nothing but the loss means (the float-reassociation bound of the test above).
    for name in ("loss", "supervised_loss", "cps_loss"):
        torch.testing.assert_close(
            getattr(fused_output, name), getattr(reference_output, name), rtol=1e-5, atol=0, msg=name
        )


def test_fused_step_in_train_mode_normalises_over_the_concatenated_batches(initial_model):
    (batch,) = make_batches(1)
    ((reference,), reference_state) = train(initial_model, [batch], fast=False)
    ((fused,), fused_state) = train(
        initial_model, [batch], fast=True, dtype=torch.float32, fused_forward=True
    )
    assert torch.isfinite(fused.loss)
    # The labelled images are normalised together with the mixed ones: another supervised loss (measured 0.1 %
    # apart here, a hundred times the float-reassociation bound of the tests above), other statistics.
    assert not torch.allclose(fused.supervised_loss, reference.supervised_loss, rtol=1e-4, atol=0)
    assert not torch.allclose(
        fused_state["branches.0.aspp.output_norm.running_mean"],
        reference_state["branches.0.aspp.output_norm.running_mean"],
    )


def test_bf16_autocast_step_on_cpu_is_close_to_fp32(initial_model):
    batches = make_batches(1)
    ((fp32,), _) = train(initial_model, batches, fast=True, dtype=torch.float32)
    ((bf16,), bf16_state) = train(initial_model, batches, fast=True, dtype=torch.bfloat16)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per operation); over the ~15 layers of a branch the
    # logits drift by about a percent and a few near-tie pseudo-labels flip. Measured 0.1-0.4% here; allow 3%.
    assert fp32.loss.dtype == bf16.loss.dtype == torch.float32
    torch.testing.assert_close(bf16.loss, fp32.loss, rtol=0.03, atol=0.0)
    torch.testing.assert_close(bf16.supervised_loss, fp32.supervised_loss, rtol=0.03, atol=0.0)
    assert all(tensor.dtype == torch.float32 for tensor in bf16_state.values() if tensor.is_floating_point())


def test_fast_step_rejects_bad_inputs(initial_model):
    optimizer = torch.optim.SGD(initial_model.parameters(), lr=0.1)
    (batch,) = make_batches(1)
    with pytest.raises(ValueError, match="float16"):
        fast_cutmix_step(initial_model, batch, optimizer, CPS_WEIGHT, dtype=torch.float16)
    del batch["cutmix_masks"]
    with pytest.raises(ValueError, match="cutmix_masks"):
        fast_cutmix_step(initial_model, batch, optimizer, CPS_WEIGHT, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch_size"):
        BenchmarkArguments(batch_size=1)
    with pytest.raises(ValueError, match="fused_forward"):
        BenchmarkArguments(compile=True, gradient_checkpointing=True)


def test_step_flops_and_convolution_peak(initial_model):
    (batch,) = make_batches(1)
    reference = official_network_copy(initial_model)
    fast = copy.deepcopy(initial_model)
    counts = {}
    for name, model, step in (
        (
            "reference",
            reference,
            lambda: reference_cutmix_step(reference, batch, sgd(reference, False), CPS_WEIGHT),
        ),
        (
            "fast",
            fast,
            lambda: fast_cutmix_step(fast, batch, sgd(fast, True), CPS_WEIGHT, dtype=torch.float32),
        ),
    ):
        counts[name] = counted_step(step, model)
    (reference_gflop, reference_calls), (fast_gflop, fast_calls) = counts["reference"], counts["fast"]
    # Teacher passes run without gradients, students and labelled passes with them.
    assert {call.with_grad for call in fast_calls} == {True, False}
    # Every branch's convolutions run in both steps; the fast step skips only zero-padding taps.
    assert len(fast_calls) == len(reference_calls)
    assert 0 < fast_gflop <= reference_gflop
    # One layer's forward: 2 FLOPs (multiply, add) per weight and output pixel.
    layer = fast_calls[0].layer
    images = torch.randn(fast_calls[0].input_shape)
    output_pixels = layer(images).shape[-2:].numel() * images.shape[0]
    forward_flop = 2 * output_pixels * layer.weight.numel()
    assert counted_step(lambda: layer(images), layer)[0] * 1e9 == forward_flop
    assert convolution_peak_gflops(fast_calls, torch.float32, torch.device("cpu"), repeats=1) > 0


def test_benchmark_steps_times_only_the_requested_steps():
    calls = []
    result = benchmark_steps(
        step_fn=calls.append,
        make_batch=lambda: make_cutmix_batch(3, 8, NUM_LABELS),
        steps=4,
        warmup=2,
    )
    assert len(calls) == 6 and len(result["step_seconds"]) == 4
    assert result["step_seconds_min"] <= result["step_seconds_median"] <= result["step_seconds_max"]
    assert result["images_per_step"] == 6  # 3 labelled + 3 unlabelled
    assert result["images_per_second"] == pytest.approx(6 / result["step_seconds_median"])
    assert result["peak_memory_kind"] == "process_peak_rss" and result["peak_memory_bytes"] > 0


def test_benchmark_script_writes_the_report(tmp_path):
    output_json = tmp_path / "benchmark.json"
    # In-process: two spawned interpreters would double the run time; the isolated path is tested (slow) below.
    arguments = ["--backbone", "test_resnet", "--multi_grid", "0", "--num_labels", "3", "--crop_size", "32"]
    arguments += ["--batch_size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--dtype", "bf16"]
    arguments += ["--num_threads", "1", "--isolate_processes", "false", "--output_json", str(output_json)]
    completed = run_script("benchmark", *arguments, timeout=120)
    assert "speedup" in completed.stdout
    report = json.loads(output_json.read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["speedup"] == pytest.approx(report["reference_step_seconds"] / report["step_seconds"])
    assert report["same_initial_weights"] is True
    assert report["settings"]["dtype"] == "bf16" and report["machine"]["num_threads"] == 1
    assert report["machine"]["torch_version"] == torch.__version__
    assert report["memory_isolated"] is False
    for prefix in ("", "reference_"):
        assert report[f"{prefix}achieved_gflops"] == pytest.approx(
            report[f"{prefix}step_gflop"] / report[f"{prefix}step_seconds"]
        )
        assert report[f"{prefix}efficiency"] > 0


def tiny_benchmark_arguments(**overrides) -> BenchmarkArguments:
    """One timed step of the tiny model on 32-px crops, on one CPU thread."""
    values = dict(
        backbone="test_resnet",
        multi_grid=[0],
        num_labels=3,
        crop_size=32,
        batch_size=2,
        steps=1,
        warmup=0,
        device="cpu",
        num_threads=1,
    )
    return BenchmarkArguments(**{**values, **overrides})


@pytest.mark.slow
def test_isolated_benchmark_runs_each_step_in_its_own_process():
    args = tiny_benchmark_arguments()
    report = run_benchmark(args)
    assert report["memory_isolated"] is True and report["same_initial_weights"] is True
    assert report["reference"]["rss_before_steps_bytes"] < report["reference_peak_memory_bytes"]


def test_interleaved_benchmark_alternates_the_two_steps(monkeypatch):
    from benchmarks import step as benchmarking

    calls = []

    class RecordingStepper:
        def __init__(self, args, mode):
            self.mode = mode

        def wait_ready(self):
            pass

        def step(self):
            calls.append(self.mode)
            return float(len(calls))

        def finish(self, timings):
            return {"mode": self.mode, "timings": timings}

    monkeypatch.setattr(benchmarking, "_LocalStepper", RecordingStepper)
    args = BenchmarkArguments(device="cpu", steps=2, warmup=1, isolate_processes=False)
    reference, fast = benchmarking.run_interleaved(args)
    # Warm-up round, then the order swaps every round so neither step always runs first.
    assert calls == ["reference", "fast", "fast", "reference", "reference", "fast"]
    assert (reference["mode"], reference["timings"]) == ("reference", [4.0, 5.0])
    assert (fast["mode"], fast["timings"]) == ("fast", [3.0, 6.0])


def test_checkpointing_benchmark_compares_the_same_step_with_and_without_recomputation():
    from benchmarks.checkpointing import format_checkpointing_table, run_checkpointing_benchmark

    args = tiny_benchmark_arguments(isolate_processes=False)
    report = run_checkpointing_benchmark(args)
    assert report["checkpointed"]["step_memory_bytes"] is not None and report["memory_isolated"] is False
    assert report["same_initial_weights"] is True
    # Same weights, same batches, same computation: only the backward pass recomputes (more FLOPs).
    assert report["checkpointed_final_loss"] == pytest.approx(report["plain_final_loss"], rel=1e-6)
    assert report["extra_gflop"] > 0
    assert report["slowdown"] == pytest.approx(
        report["checkpointed_step_seconds_median"] / report["plain_step_seconds_median"]
    )
    assert "peak saving" in format_checkpointing_table(report)


def test_metric_benchmark_compares_equal_results():
    from benchmarks.metric import benchmark_metric

    report = benchmark_metric(num_images=5, height=12, width=10, num_labels=4, batch_size=2, repeats=1)
    assert report["max_per_class_iou_difference"] < 1e-12
    assert 0.0 < report["mean_iou"] < 1.0
    assert report["streaming_seconds"] > 0 and report["histogram_seconds"] > 0


def test_data_pipeline_benchmark_runs_the_training_dataset(tmp_path):
    from benchmarks.data_pipeline import benchmark_data_pipeline
    from cps_hf.data import SegmentationTransform, SemiSupervisedSegmentationDataset
    from cps_hf.data.synthetic import SYNTHETIC_CLASS_NAMES, make_synthetic_segmentation_dataset

    splits = make_synthetic_segmentation_dataset(
        num_train=6, num_val=1, image_size=32, seed=0, cache_dir=str(tmp_path)
    )
    dataset = SemiSupervisedSegmentationDataset(
        splits["train"],
        [0, 1],
        transform=SegmentationTransform(train=True, crop_size=24),
        num_labels=len(SYNTHETIC_CLASS_NAMES),
        cutmix=True,
    )
    report = benchmark_data_pipeline(dataset, num_samples=10)
    assert report["num_samples"] == len(dataset) == 4 and report["samples_per_second"] > 0
    with pytest.raises(ValueError, match="num_samples"):
        benchmark_data_pipeline(dataset, 0)
