"""The memory estimator: the fake-tensor estimate against the same step on real tensors, its accounting, the CLI."""

import json

import pytest
from helpers import REPO_ROOT, run_script

from cps_hf import CPSForSemanticSegmentation
from cps_hf.memory import (
    MEMORY_KINDS,
    estimate_training_memory,
    estimation_class_names,
    parse_estimation_arguments,
)

# The demo config (test_resnet, synthetic classes), shrunk: crop 32, batch 2.
TINY_STEP = ["--crop_size", "32", "--per_device_train_batch_size", "2"]
CHECKPOINTING = pytest.mark.skipif(
    not CPSForSemanticSegmentation.supports_gradient_checkpointing,
    reason="this version of the model does not support gradient checkpointing",
)


def estimate(*flags: str, fake: bool = True):
    model_args, data_args, training_args, _ = parse_estimation_arguments([*TINY_STEP, *flags])
    return estimate_training_memory(model_args, data_args, training_args, fake=fake)


@pytest.mark.parametrize(
    "flags",
    [
        ("--cutmix", "true"),
        ("--cutmix", "true", "--bf16", "true"),
        ("--gradient_accumulation_steps", "2"),
        pytest.param(("--cutmix", "true", "--gradient_checkpointing", "true"), marks=CHECKPOINTING),
    ],
    ids=["cutmix", "cutmix-bf16", "cps-accumulation", "cutmix-checkpointing"],
)
def test_fake_estimate_equals_the_tracked_real_step(flags):
    fake = estimate(*flags)
    real = estimate(*flags, fake=False)
    # Same operations on same shapes: the tensors differ only where a CPU kernel's output layout differs from its
    # shape function's, which this model does not hit; 1 % leaves room for such a kernel.
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=0.01)
    assert fake.breakdown == pytest.approx(real.breakdown, rel=0.01, abs=4096)


def test_breakdown_accounts_for_the_state_and_the_batch():
    result = estimate("--cutmix", "true")
    assert set(result.breakdown) == set(MEMORY_KINDS.values())
    assert sum(result.breakdown.values()) == result.peak_bytes
    # fp32 weights and one SGD momentum buffer per weight.
    assert result.breakdown["parameters"] == 4 * result.settings["num_parameters"]
    assert result.breakdown["optimizer_state"] >= 4 * result.settings["num_parameters"]
    # Labelled images (float32), labels (int64), two unlabelled batches (float32), CutMix masks (float32).
    pixels = 2 * 32 * 32
    assert result.breakdown["inputs"] == pixels * (3 * 4 + 8 + 2 * 3 * 4 + 4)
    assert result.breakdown["activations"] > 0


def test_estimate_follows_batch_precision_and_accumulation():
    fp32 = estimate("--cutmix", "true")
    assert estimate("--cutmix", "true", "--per_device_train_batch_size", "4").peak_bytes > fp32.peak_bytes
    # At 32 px the optimizer step is the peak; at 64 px and batch 8 the activations are.
    larger = ("--cutmix", "true", "--crop_size", "64", "--per_device_train_batch_size", "8")
    assert estimate(*larger, "--bf16", "true").peak_bytes < estimate(*larger).peak_bytes
    plain, supervised = estimate(), estimate("--supervised_only", "true")
    assert supervised.breakdown["inputs"] < plain.breakdown["inputs"] < fp32.breakdown["inputs"]
    accumulated = estimate("--gradient_accumulation_steps", "2")
    # Both micro-batches of an optimizer step are on the device, and the gradients of the first one persist.
    assert accumulated.breakdown["inputs"] == 2 * plain.breakdown["inputs"]
    assert accumulated.peak_bytes > plain.peak_bytes
    assert accumulated.settings["gradient_accumulation_steps"] == 2


def test_one_image_per_device_is_estimated_as_under_sync_batch_norm():
    # Train-mode BatchNorm refuses the (1, channels, 1, 1) of the ASPP's image pooling; several GPUs with Sync-BN
    # train such a batch, and the estimate is their per-device memory.
    one_image, two_images = estimate("--per_device_train_batch_size", "1"), estimate()
    assert one_image.settings["notes"] and not two_images.settings["notes"]
    assert one_image.breakdown["inputs"] * 2 == two_images.breakdown["inputs"]
    assert one_image.peak_bytes == pytest.approx(
        estimate("--per_device_train_batch_size", "1", fake=False).peak_bytes
    )


@CHECKPOINTING
def test_gradient_checkpointing_lowers_the_estimate():
    plain = estimate("--cutmix", "true", "--crop_size", "64")
    checkpointed = estimate("--cutmix", "true", "--crop_size", "64", "--gradient_checkpointing", "true")
    assert checkpointed.settings["gradient_checkpointing"] is True
    assert checkpointed.peak_bytes < plain.peak_bytes


def test_gradient_checkpointing_without_model_support_is_refused(monkeypatch):
    monkeypatch.setattr(CPSForSemanticSegmentation, "supports_gradient_checkpointing", False)
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        estimate("--gradient_checkpointing", "true")


def test_fp16_is_refused_with_a_pointer_to_bf16():
    with pytest.raises(ValueError, match="--bf16 true"):
        estimate("--fp16", "true")


def test_class_count_comes_from_arguments_or_a_clear_error():
    _, data_args, _, _ = parse_estimation_arguments(
        ["--dataset_name", "org/remote-data", "--labeled_fraction", "0.5"]
    )
    with pytest.raises(ValueError, match="--num_labels"):
        estimation_class_names(data_args)
    _, data_args, _, _ = parse_estimation_arguments(
        ["--dataset_name", "org/remote-data", "--labeled_fraction", "0.5", "--num_labels", "5"]
    )
    assert len(estimation_class_names(data_args)) == 5


def test_script_writes_the_json(tmp_path):
    output = tmp_path / "memory.json"
    result = run_script("estimate_memory", *TINY_STEP, "--cutmix", "true", "--output_json", str(output))
    written = json.loads(output.read_text())
    assert {"peak_bytes", "breakdown", "settings"} <= set(written)
    assert written["breakdown"].keys() == set(MEMORY_KINDS.values())
    assert written["settings"]["crop_size"] == [32, 32]
    assert written["settings"]["step"] == "cps_cutmix"
    assert f"{written['peak_bytes']:,} B" in result.stdout


def test_script_runs_on_a_paper_config(tmp_path):
    # About 10 s on an idle 2-core machine: ResNet-50 on fake tensors.
    output = tmp_path / "memory.json"
    run_script(
        "estimate_memory",
        str(REPO_ROOT / "scripts/configs/voc/r50_1-8_cps_cutmix.yaml"),
        "--per_device_train_batch_size",
        "2",
        "--output_json",
        str(output),
        timeout=1200,
    )
    written = json.loads(output.read_text())
    assert written["settings"]["backbone"] == "resnet50s"
    assert written["settings"]["crop_size"] == [512, 512]
    # Two DeepLabv3+ ResNet-50 branches: about 81 M fp32 parameters, and more than a GiB of activations.
    assert written["breakdown"]["parameters"] == 4 * written["settings"]["num_parameters"]
    assert written["breakdown"]["activations"] > 2**30


def test_documented_table_is_in_the_readme_and_matches_the_estimator():
    table = (REPO_ROOT / "docs/memory/paper_configs.md").read_text()
    assert table.split("\n\nStep variants")[0].strip() in (REPO_ROOT / "README.md").read_text()
    grid = json.loads((REPO_ROOT / "docs/memory/paper_configs.json").read_text())["grid"]
    documented = next(
        row
        for row in grid
        if row["settings"]["backbone"] == "resnet50s"
        and row["settings"]["crop_size"] == [512, 512]
        and row["settings"]["per_device_train_batch_size"] == 2
        and not row["settings"]["bf16"]
        and not row["settings"]["gradient_checkpointing"]
    )
    argv = [str(REPO_ROOT / documented["argv"][0]), *documented["argv"][1:]]
    model_args, data_args, training_args, _ = parse_estimation_arguments(argv)
    # Another torch version may allocate a little differently; the table says which one it was made with.
    assert estimate_training_memory(model_args, data_args, training_args).peak_bytes == pytest.approx(
        documented["peak_bytes"], rel=0.02
    )
