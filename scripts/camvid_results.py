"""Summarise the CamVid runs of `scripts/reproduce_camvid.sh` into one JSON file: the protocol, one row per run
(variant, seed, branch-0 and ensemble mIoU on the validation split, steps, training seconds) and per variant the
mean ± sample standard deviation of the branch-0 mIoU and of each class's IoU.

    python scripts/camvid_results.py --runs_dir runs/camvid --config scripts/configs/camvid.yaml \\
        --output docs/camvid/results.json

Run folders are named `<variant>-seed<seed>` and hold the model, `all_results.json`, `trainer_state.json` and the
`eval.json` of `scripts/evaluate_cps.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml

RUN_NAME = re.compile(r"^(?P<variant>[a-z0-9_]+)-seed(?P<seed>\d+)$")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def read_run(run_dir: Path) -> dict[str, Any]:
    match = RUN_NAME.match(run_dir.name)
    evaluation = json.loads((run_dir / "eval.json").read_text())
    training = json.loads((run_dir / "all_results.json").read_text())
    state = json.loads((run_dir / "trainer_state.json").read_text())
    branch_0, ensemble = evaluation["results"]["branch_0"], evaluation["results"]["ensemble"]
    return {
        "variant": match["variant"],
        "seed": int(match["seed"]),
        "miou_branch0": round(100 * branch_0["mean_iou"], 2),
        "miou_ensemble": round(100 * ensemble["mean_iou"], 2),
        "steps": state["global_step"],
        "seconds": round(training["train_runtime"], 1),
        "iou_branch0": {
            key.removeprefix("iou_"): round(100 * value, 2)
            for key, value in branch_0.items()
            if key.startswith("iou_") and value is not None
        },
    }


def mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 2),
        "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        variant_runs = [run for run in runs if run["variant"] == variant]
        summary[variant] = {
            **mean_std([run["miou_branch0"] for run in variant_runs]),
            "ensemble": mean_std([run["miou_ensemble"] for run in variant_runs]),
            "iou_branch0": {
                name: mean_std([run["iou_branch0"][name] for run in variant_runs])
                for name in variant_runs[0]["iou_branch0"]
            },
        }
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs_dir", type=Path, default=Path("runs/camvid"))
    parser.add_argument("--config", type=Path, default=Path("scripts/configs/camvid.yaml"))
    parser.add_argument("--output", type=Path, default=Path("docs/camvid/results.json"))
    args = parser.parse_args(argv)

    run_dirs = sorted(
        path
        for path in args.runs_dir.iterdir()
        if RUN_NAME.match(path.name) and (path / "eval.json").exists()
    )
    if not run_dirs:
        raise SystemExit(f"No finished run (<variant>-seed<n>/eval.json) in {args.runs_dir}.")
    runs = sorted((read_run(path) for path in run_dirs), key=lambda run: (run["variant"], run["seed"]))
    recipe = yaml.safe_load(args.config.read_text())
    evaluation = json.loads((run_dirs[0] / "eval.json").read_text())
    report = {
        "protocol": {
            "dataset": "CamVid (SegNet 11-class split)",
            "data": recipe["dataset_name"],
            "labeled_fraction": recipe.get("labeled_fraction"),
            "split_seed": recipe.get("split_seed"),
            "evaluated_on": f"{evaluation['split']} split ({evaluation['num_images']} frames); no test split is used",
            "inference": evaluation["protocol"],
            "metric": "mIoU in %, 11 classes, void ignored; `mean`/`std` over seeds of branch 0 (sample std)",
            "recipe": str(args.config),
            "recipe_values": recipe,
            "machine": f"{cpu_name()}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}",
        },
        "runs": runs,
        "summary": summarise(runs),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for variant, numbers in report["summary"].items():
        ensemble = numbers["ensemble"]
        print(
            f"{variant:24s} branch 0 {numbers['mean']:6.2f} ± {numbers['std']:.2f} (n={numbers['n']})   "
            f"ensemble {ensemble['mean']:6.2f} ± {ensemble['std']:.2f}"
        )
    print(f"Written to {args.output}")


if __name__ == "__main__":
    main()
