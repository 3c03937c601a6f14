"""Memory and time of one CutMix CPS training step with and without gradient checkpointing (benchmark tooling, not
part of the installed package).

Both set-ups are the fast step of [`benchmarks.step`] (the trainer's forward passes, [`~cps_hf.trainer.cutmix_forward`])
from the same weights on the same batches; they differ only in `gradient_checkpointing`. Their steps alternate, each
set-up in its own fresh process, so a process's peak resident set size describes one set-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

from .step import BenchmarkArguments, describe_machine, interleave_steps

SETUPS = ("plain", "checkpointed")


def run_checkpointing_benchmark(args: BenchmarkArguments) -> dict[str, Any]:
    """
    Runs the fast step of `args` without (`plain`) and with (`checkpointed`) gradient checkpointing
    (`args.gradient_checkpointing` is ignored), alternating their steps (see [`~benchmarks.step.interleave_steps`]).

    Memory: the peak of each set-up's process (CPU: peak resident set size; CUDA: `max_memory_allocated`). On CPU
    `step_memory_bytes` is that peak minus the resident size just before the first step (model, optimizer and batch
    already built): what the steps themselves added (activations, gradients, optimizer state, temporaries).

    Returns:
        `dict`, JSON-ready: per set-up step time, peak memory, step memory, GFLOP and final loss; the saving, the
        slowdown, `settings`, `machine` and the full results under `plain` and `checkpointed`.
    """
    runs = {name: (replace(args, gradient_checkpointing=name == "checkpointed"), "fast") for name in SETUPS}
    results = interleave_steps(runs, args.steps, args.warmup, args.isolate_processes)
    for result in results.values():
        before = result.get("rss_before_steps_bytes")
        result["step_memory_bytes"] = result["peak_memory_bytes"] - before if before is not None else None
    plain, checkpointed = results["plain"], results["checkpointed"]
    machine = describe_machine()
    machine.update(device_name=plain["device_name"], num_threads=plain["num_threads"])
    report: dict[str, Any] = {
        "peak_memory_kind": plain["peak_memory_kind"],
        "memory_isolated": args.isolate_processes or plain["peak_memory_kind"] != "process_peak_rss",
        "peak_memory_saving_bytes": plain["peak_memory_bytes"] - checkpointed["peak_memory_bytes"],
        "slowdown": checkpointed["step_seconds_median"] / plain["step_seconds_median"],
        "extra_gflop": checkpointed["step_gflop"] - plain["step_gflop"],
        "same_initial_weights": plain["initial_weights_checksum"] == checkpointed["initial_weights_checksum"],
    }
    if plain["step_memory_bytes"] is not None:
        report["step_memory_ratio"] = checkpointed["step_memory_bytes"] / plain["step_memory_bytes"]
    for name, result in results.items():
        for key in (
            "step_seconds_median",
            "peak_memory_bytes",
            "step_memory_bytes",
            "step_gflop",
            "final_loss",
        ):
            report[f"{name}_{key}"] = result[key]
    return {**report, "settings": asdict(args), "machine": machine, **results}


def format_checkpointing_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of a [`run_checkpointing_benchmark`] report."""
    mib = 2**20
    rows = [("gradient checkpointing", "median s", "peak MiB", "step MiB", "GFLOP", "final loss")]
    for name in SETUPS:
        step_memory = report[f"{name}_step_memory_bytes"]
        rows.append(
            (
                "on" if name == "checkpointed" else "off",
                f"{report[f'{name}_step_seconds_median']:.3f}",
                f"{report[f'{name}_peak_memory_bytes'] / mib:.0f}",
                "-" if step_memory is None else f"{step_memory / mib:.0f}",
                f"{report[f'{name}_step_gflop']:.1f}",
                f"{report[f'{name}_final_loss']:.4f}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    settings, machine = report["settings"], report["machine"]
    lines.append(
        f"peak saving {report['peak_memory_saving_bytes'] / mib:.0f} MiB, step {report['slowdown']:.2f}x slower | "
        f"{settings['backbone']} crop {settings['crop_size']} batch {settings['batch_size']}+"
        f"{settings['batch_size']} {settings['dtype']} fused_forward={settings['fused_forward']} | "
        f"{machine['device_name'] or machine['cpu_model']}, {machine['num_threads']} threads | "
        f"memory: {report['peak_memory_kind']}"
    )
    return "\n".join(lines)
