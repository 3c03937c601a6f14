"""Checks the memory estimator against the same training step run for real, on small cases this CPU can run.

    PYTHONPATH=. .venv/bin/python tools/memory_validation.py [--output_json docs/memory/validation.json]
    PYTHONPATH=. .venv/bin/python tools/memory_validation.py --autocast_rules [--output_json ...]

For each case: the estimate on fake tensors (`estimate_training_memory`), the same tracker on real tensors
(`fake=False`), and the step's resident-memory peak in a fresh process (Linux `VmHWM` after resetting it through
`/proc/self/clear_refs`) minus the resident memory just before the step. The first two count tensors; the third
measures what the process took from the system, so it also holds what no tensor accounts for (oneDNN scratch memory,
the C allocator's free lists). The tracker numbers are compared as "step increase": the peak minus what was live
before the step (parameters, buffers, optimizer state, batches). The measuring process runs with glibc's mmap
threshold fixed at 64 KiB, so that freed tensors leave the resident set.

`--autocast_rules` compares the casting rules of CPU autocast (which the estimate follows on a machine without a
GPU) with CUDA's on one bf16 forward pass.
"""

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.utils import convert_to_fp32
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from cps_hf.experiment import build_model
from cps_hf.memory import (
    estimate_training_memory,
    estimation_class_names,
    parse_estimation_arguments,
    prepare_training_step,
)

RESNET18 = ["scripts/configs/camvid.yaml", "--num_labels", "11", "--per_device_train_batch_size", "2"]
CASES = {
    "demo config (test_resnet, 64 px, batch 8, CPS + CutMix)": [],
    # Small enough that the optimizer step (weights, gradients, momentum, decayed gradients) is the peak.
    "resnet18, 128 px, batch 2, CPS + CutMix, fp32": [*RESNET18, "--crop_size", "128", "--cutmix", "true"],
    "resnet18, 256 px, batch 2, CPS + CutMix, fp32": [*RESNET18, "--crop_size", "256", "--cutmix", "true"],
    "resnet18, 256 px, batch 2, CPS + CutMix, bf16": [
        *RESNET18,
        "--crop_size",
        "256",
        "--cutmix",
        "true",
        "--bf16",
        "true",
    ],
    "resnet18, 256 px, batch 2, CPS + CutMix, gradient checkpointing": [
        *RESNET18,
        "--crop_size",
        "256",
        "--cutmix",
        "true",
        "--gradient_checkpointing",
        "true",
    ],
    "resnet18, 256 px, batch 2, CPS, 2 accumulation steps": [
        *RESNET18,
        "--crop_size",
        "256",
        "--gradient_accumulation_steps",
        "2",
    ],
    "resnet50s, 128 px, batch 2, CPS, OHEM": [
        "scripts/configs/cityscapes/r50_1-8_cps.yaml",
        "--crop_size",
        "128",
        "--per_device_train_batch_size",
        "2",
        "--ohem_min_kept",
        "10000",
    ],
}


# glibc returns every block of 64 KiB or more to the system when it is freed (a fixed mmap threshold turns its
# dynamic one off), so the resident size follows the live tensors instead of keeping a freed peak in the heap.
RETURN_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_resident_increase(argv: list[str]) -> int:
    """Bytes by which the resident set of this process peaks above its size just before the real step."""
    model_args, data_args, training_args, _ = parse_estimation_arguments(argv)
    class_names = estimation_class_names(data_args)
    with prepare_training_step(
        model_args, data_args, training_args, class_names=class_names, fake=False
    ) as step:
        step.run()  # a first step, so that lazily created buffers (oneDNN's, the allocator's) exist before measuring
        gc.collect()
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        step.run()
        peak = _status_kib("VmHWM")
    return (peak - before) * 1024


def tracked_increase(argv: list[str], fake: bool) -> dict[str, int]:
    """The estimate's peak, and the peak minus what was live before the step, on fake or real tensors."""
    model_args, data_args, training_args, _ = parse_estimation_arguments(argv)
    estimate = estimate_training_memory(model_args, data_args, training_args, fake=fake)
    class_names = estimation_class_names(data_args)
    with prepare_training_step(
        model_args, data_args, training_args, class_names=class_names, fake=True
    ) as step:
        tracker = MemTracker()
        tracker.track_external(step.model, step.optimizer, step.batches)
        before = tracker.get_tracker_snapshot("current")
    (before_step,) = [snapshot["Total"] for snapshot in before.values()]
    return {"peak_bytes": estimate.peak_bytes, "step_increase_bytes": estimate.peak_bytes - before_step}


@contextlib.contextmanager
def autocast_rules(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """`torch.autocast(device_type, dtype)` without its check for a real device: fake CUDA tensors then follow
    CUDA's casting rules on a machine without a GPU."""
    previous = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, previous[0])
        torch.set_autocast_dtype(device_type, previous[1])


def bf16_forward_peak(argv: list[str], device_type: str) -> dict[str, int]:
    """Peak and end-of-forward bytes of one bf16 training forward of the model (every branch, labelled batch, outputs
    upcast to fp32 as accelerate does) on fake tensors of `device_type`. Fake CUDA tensors run forward passes on a machine without a GPU, not backward
    passes (the autograd engine asks the CUDA driver for a context), so this compares the two devices' autocast
    rules on the forward only."""
    model_args, data_args, training_args, _ = parse_estimation_arguments(argv)
    model_args.pretrained_backbone = False
    class_names = estimation_class_names(data_args)
    with FakeTensorMode(), torch.device(device_type):
        model = build_model(model_args, class_names).train()
        pixel_values = torch.randn(training_args.per_device_train_batch_size, 3, *data_args.crop_size)
        tracker = MemTracker()
        tracker.track_external(model, pixel_values)
        with tracker:
            # As accelerate wraps the forward for bf16: autocast inside, outputs upcast to fp32 outside.
            with autocast_rules(device_type, torch.bfloat16):
                outputs = model(pixel_values, output_branch_logits=True)
            logits = convert_to_fp32(outputs.branch_logits)
            (after_forward,) = [
                snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("current").values()
            ]
            del outputs, logits
        (peak,) = [snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values()]
    return {"peak_bytes": peak, "after_forward_bytes": after_forward}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_json", type=Path)
    parser.add_argument("--resident_case", help=argparse.SUPPRESS)
    parser.add_argument(
        "--autocast_rules",
        action="store_true",
        help="Instead: compare CPU and CUDA autocast rules on the bf16 forward of ResNet-50 at 512 px, batch 2.",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.resident_case is not None:
        print(measure_resident_increase(CASES[args.resident_case]))
        return
    if args.autocast_rules:
        argv = ["scripts/configs/voc/r50_1-8_cps_cutmix.yaml", "--per_device_train_batch_size", "2"]
        rules = {device_type: bf16_forward_peak(argv, device_type) for device_type in ("cpu", "cuda")}
        print(json.dumps(rules))
        if args.output_json is not None:
            args.output_json.write_text(json.dumps({"argv": argv, **rules}, indent=2) + "\n")
        return
    rows = []
    for name, argv in CASES.items():
        start = time.perf_counter()
        fake = tracked_increase(argv, fake=True)
        fake_seconds = time.perf_counter() - start
        real = tracked_increase(argv, fake=False)
        resident = subprocess.run(
            [sys.executable, __file__, "--resident_case", name],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **RETURN_FREED_MEMORY},
        )
        resident_increase = int(resident.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "case": name,
                "argv": argv,
                "fake_peak_bytes": fake["peak_bytes"],
                "real_peak_bytes": real["peak_bytes"],
                "fake_step_increase_bytes": fake["step_increase_bytes"],
                "real_step_increase_bytes": real["step_increase_bytes"],
                "resident_step_increase_bytes": resident_increase,
                "fake_estimate_seconds": round(fake_seconds, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        "| case | estimate (fake) MiB | same tracker, real tensors MiB | step increase: estimate / resident MiB |"
    )
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['case']} | {row['fake_peak_bytes'] / 2**20:.1f} | {row['real_peak_bytes'] / 2**20:.1f} | "
            f"{row['fake_step_increase_bytes'] / 2**20:.1f} / {row['resident_step_increase_bytes'] / 2**20:.1f} |"
        )
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
