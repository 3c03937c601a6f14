"""Fault injection: short CPS trainings on a tiny saved dataset, each with one fault, and what became of them.

    PYTHONPATH=. python tools/fault_injection.py [--workdir DIR]   # prints a markdown table: fault -> outcome

`tests/test_reliability.py` runs the same scenarios and asserts their outcomes. Faults in the data hit a run that
resumes from a checkpoint written by an earlier, clean run of two steps (`checkpoint-2`), so each outcome also says
whether what was already saved survived.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import datasets
import numpy as np
import torch
import yaml
from PIL import Image as PILImage
from safetensors.torch import load_file

from cps_hf.data import select_labeled_indices
from cps_hf.data.synthetic import make_synthetic_segmentation_dataset
from cps_hf.experiment import parse_experiment_arguments, run_experiment

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "train_probe.py"
SECRET_TOKEN = "hf_faultInjectionSecretToken0123456789"
BASE_CONFIG = {
    "backbone": "test_resnet",
    "pretrained_backbone": False,
    "multi_grid": None,
    "aspp_channels": 16,
    "decoder_channels": 16,
    "low_level_channels": 8,
    "crop_size": 24,
    "scales": [1.0, 1.25],
    "per_device_train_batch_size": 2,
    "learning_rate": 0.05,
    "logging_steps": 1,
    "save_strategy": "steps",
    "eval_split": None,
    "report_to": "none",
    "disable_tqdm": True,
    "use_cpu": True,
    "dataloader_num_workers": 0,
    "seed": 0,
}
# The runs that get interrupted: 8 steps, a checkpoint every 2.
INTERRUPTED_RUN = ("--max_steps", "8", "--save_steps", "2")


@dataclass
class FaultOutcome:
    """What a scenario ended with: `error` is the exception a training raised (`None` if it finished), `outcome`
    the line for the table, `details` what the tests check."""

    fault: str
    outcome: str
    error: BaseException | None = None
    details: dict = field(default_factory=dict)


def png_bytes(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def loss_history(output_dir: Path) -> list[dict[str, float]]:
    """The logged training losses (total and per term) by step, from `trainer_state.json`."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [
        {key: value for key, value in entry.items() if key == "step" or key.startswith("loss")}
        for entry in history
        if "loss" in entry
    ]


def same_weights(first: Path, second: Path) -> bool:
    first_weights, second_weights = (
        load_file(first / "model.safetensors"),
        load_file(second / "model.safetensors"),
    )
    return first_weights.keys() == second_weights.keys() and all(
        torch.equal(first_weights[name], second_weights[name]) for name in first_weights
    )


@contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Collects the warnings the library logs (`cps_hf.*` loggers)."""
    messages: list[str] = []

    class Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collector(level=logging.WARNING)
    library_logger = logging.getLogger("cps_hf")
    library_logger.addHandler(handler)
    try:
        yield messages
    finally:
        library_logger.removeHandler(handler)


class FaultLab:
    """A work folder with a tiny clean dataset, the runs the scenarios compare against, and training helpers."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._killed_runs: dict[tuple[str, int], Path] = {}

    # ----- data -------------------------------------------------------------------------------------------------

    @cached_property
    def clean_dataset(self) -> Path:
        """16 training and 4 validation images of 32x32 from the synthetic generator, as a save_to_disk folder."""
        splits = make_synthetic_segmentation_dataset(
            num_train=16, num_val=4, image_size=32, seed=0, cache_dir=str(self.workdir / "synthetic-cache")
        )
        path = self.workdir / "clean"
        splits.save_to_disk(str(path))
        return path

    def dataset_with(self, name: str, change_row: Callable[[int, dict], dict], split: str = "train") -> Path:
        """A copy of the clean dataset whose `split` rows (raw `{"bytes", "path"}` image values) went through
        `change_row(row_index, row)`."""
        dataset_dict = datasets.load_from_disk(str(self.clean_dataset))
        original = dataset_dict[split]
        raw = original.cast_column("image", datasets.Image(decode=False)).cast_column(
            "label", datasets.Image(decode=False)
        )
        rows = [change_row(index, dict(row)) for index, row in enumerate(raw)]
        changed = datasets.Dataset.from_list(rows, features=raw.features)
        changed = changed.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())
        changed.info.description = original.info.description  # where the class names are stored
        dataset_dict[split] = changed
        path = self.workdir / name
        dataset_dict.save_to_disk(str(path))
        return path

    # ----- training ---------------------------------------------------------------------------------------------

    @cached_property
    def config_file(self) -> Path:
        """The base experiment of every scenario (flags add the labelled subset, the steps and the fault)."""
        path = self.workdir / "fault-injection.yaml"
        path.write_text(yaml.safe_dump(BASE_CONFIG))
        return path

    def argv(
        self,
        output_dir: Path,
        dataset: Path,
        *extra: str,
        labeled: tuple[str, str] = ("--labeled_fraction", "0.25"),
    ) -> list[str]:
        return [
            str(self.config_file),
            "--output_dir",
            str(output_dir),
            "--dataset_name",
            str(dataset),
            *labeled,
            *extra,
        ]

    def train(self, argv: list[str]) -> dict:
        return run_experiment(*parse_experiment_arguments(argv)[:3])

    def train_in_subprocess(self, argv: list[str], **probe_environment: str) -> subprocess.CompletedProcess:
        environment = {
            **os.environ,
            **probe_environment,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        return subprocess.run(
            [sys.executable, str(PROBE), *argv],
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=self.workdir,
        )

    @cached_property
    def saved_two_steps(self) -> Path:
        """A clean run of two steps that saved `checkpoint-2`, its final model and results."""
        output_dir = self.workdir / "saved-two-steps"
        self.train(self.argv(output_dir, self.clean_dataset, "--max_steps", "2", "--save_steps", "2"))
        return output_dir

    def continue_saved_run(
        self, name: str, dataset: Path, *extra: str, labeled: tuple[str, str] = ("--labeled_fraction", "0.25")
    ) -> FaultOutcome:
        """Copies the two-step run and continues it to step 6 (a checkpoint every step) on `dataset`; reports the
        error and whether the copied files are untouched."""
        output_dir = self.workdir / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        shutil.copytree(self.saved_two_steps, output_dir)
        before = snapshot(output_dir)
        error = None
        try:
            self.train(
                self.argv(
                    output_dir,
                    dataset,
                    "--max_steps",
                    "6",
                    "--save_steps",
                    "1",
                    # Continuing a finished run is asked for explicitly (a plain restart refuses to train into it).
                    "--resume_from_checkpoint",
                    str(output_dir / "checkpoint-2"),
                    *extra,
                    labeled=labeled,
                )
            )
        except Exception as raised:  # the outcome under test
            error = raised
        untouched = snapshot(output_dir) == before
        if error is None:
            outcome = "NOT DETECTED: training finished"
        else:
            outcome = describe_error(error) + (
                " — output_dir untouched (checkpoint-2 kept, no later checkpoint)"
                if untouched
                else " — output_dir CHANGED"
            )
        return FaultOutcome(name, outcome, error, {"output_dir": output_dir, "untouched": untouched})

    @cached_property
    def uninterrupted_run(self) -> Path:
        output_dir = self.workdir / "uninterrupted"
        self.train(self.argv(output_dir, self.clean_dataset, *INTERRUPTED_RUN))
        return output_dir

    def killed_run(self, during: str, step: int) -> Path:
        """The interrupted run, SIGKILLed at `step` (see `tools/train_probe.py`) in its own process: its folder and
        the process's exit code (run once per `(during, step)`)."""
        key = (during, step)
        if key not in self._killed_runs:
            output_dir = self.workdir / f"killed-during-{during}-{step}"
            completed = self.train_in_subprocess(
                self.argv(output_dir, self.clean_dataset, *INTERRUPTED_RUN),
                CPS_PROBE_KILL_AT_STEP=str(step),
                CPS_PROBE_KILL_DURING=during,
            )
            if completed.returncode != -signal.SIGKILL:
                raise RuntimeError(
                    f"The probe was not killed (exit code {completed.returncode}):\n{completed.stderr[-3000:]}"
                )
            self._killed_runs[key] = output_dir
        return self._killed_runs[key]

    def resume(self, killed: Path, name: str, *extra: str) -> tuple[Path, list[str]]:
        """Restarts a copy of an interrupted run's folder; returns it and the warnings logged."""
        output_dir = self.workdir / name
        shutil.copytree(killed, output_dir)
        extra = tuple(argument.replace(str(killed), str(output_dir)) for argument in extra)
        with captured_warnings() as warnings:
            self.train(self.argv(output_dir, self.clean_dataset, *INTERRUPTED_RUN, *extra))
        return output_dir, warnings

    def matches_uninterrupted(self, output_dir: Path) -> bool:
        return same_weights(output_dir, self.uninterrupted_run) and loss_history(output_dir) == loss_history(
            self.uninterrupted_run
        )


# ---------------------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------------------


def _mask_with_bad_value(index: int, row: dict) -> dict:
    mask = np.array(PILImage.open(io.BytesIO(row["label"]["bytes"])))
    mask[0, 0] = 7
    return {
        **row,
        "label": {"bytes": png_bytes(PILImage.fromarray(mask.astype(np.uint8), "L")), "path": None},
    }


def bad_mask_value(lab: FaultLab) -> FaultOutcome:
    return lab.continue_saved_run(
        "mask value 7 with 5 classes", lab.dataset_with("bad-mask", _mask_with_bad_value)
    )


def _narrower_mask(index: int, row: dict) -> dict:
    mask = np.array(PILImage.open(io.BytesIO(row["label"]["bytes"])))[:, :-1]
    return {
        **row,
        "label": {"bytes": png_bytes(PILImage.fromarray(mask.astype(np.uint8), "L")), "path": None},
    }


def size_mismatch(lab: FaultLab) -> FaultOutcome:
    return lab.continue_saved_run(
        "mask 1 px narrower than image", lab.dataset_with("size-mismatch", _narrower_mask)
    )


def _undecodable_image(index: int, row: dict) -> dict:
    return {**row, "image": {"bytes": b"\x89PNG this is not an image", "path": None}}


def undecodable_image(lab: FaultLab) -> FaultOutcome:
    return lab.continue_saved_run(
        "undecodable image bytes", lab.dataset_with("undecodable", _undecodable_image)
    )


def missing_column(lab: FaultLab) -> FaultOutcome:
    return lab.continue_saved_run(
        "missing label column", lab.clean_dataset, "--label_column", "segmentation_mask"
    )


def unknown_ids(lab: FaultLab) -> FaultOutcome:
    ids_file = lab.workdir / "unknown-ids.txt"
    ids_file.write_text("train_00001\n2007_000032\n2007_000039\n2007_000063\n")
    return lab.continue_saved_run(
        "labelled-id file with unknown ids", lab.clean_dataset, labeled=("--labeled_ids_file", str(ids_file))
    )


def empty_labeled_set(lab: FaultLab) -> FaultOutcome:
    ids_file = lab.workdir / "no-ids.txt"
    ids_file.write_text("\n")
    return lab.continue_saved_run(
        "empty labelled set (empty id file)", lab.clean_dataset, labeled=("--labeled_ids_file", str(ids_file))
    )


def empty_unlabeled_set(lab: FaultLab) -> FaultOutcome:
    return lab.continue_saved_run(
        "empty unlabelled set (every row labelled)", lab.clean_dataset, labeled=("--labeled_fraction", "1.0")
    )


def num_labels_mismatch(lab: FaultLab) -> FaultOutcome:
    return lab.continue_saved_run(
        "--num_labels 3 on a 5-class dataset", lab.clean_dataset, "--num_labels", "3"
    )


_IMAGE_MODES = ("L", "RGBA", "P", "I;16", "LA")


def _non_rgb_image(index: int, row: dict) -> dict:
    rgb = PILImage.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
    mode = _IMAGE_MODES[index % len(_IMAGE_MODES)]
    if mode == "P":
        converted = rgb.convert("P", palette=PILImage.Palette.ADAPTIVE)
    elif mode == "I;16":
        converted = PILImage.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    else:
        converted = rgb.convert(mode)
    return {**row, "image": {"bytes": png_bytes(converted), "path": None}}


def non_rgb_images(lab: FaultLab) -> FaultOutcome:
    dataset = lab.dataset_with("non-rgb", _non_rgb_image)
    raw = datasets.load_from_disk(str(dataset))["train"].cast_column("image", datasets.Image(decode=False))
    modes = sorted({PILImage.open(io.BytesIO(value["bytes"])).mode for value in raw["image"]})
    output_dir = lab.workdir / "non-rgb-run"
    try:
        lab.train(lab.argv(output_dir, dataset, "--max_steps", "6", "--save_steps", "6"))
    except Exception as error:  # the outcome under test
        return FaultOutcome("non-RGB images", describe_error(error), error, {"modes": modes})
    steps = json.loads((output_dir / "trainer_state.json").read_text())["global_step"]
    return FaultOutcome(
        "non-RGB images",
        f"recovered: images stored as {', '.join(modes)} converted to RGB; trained {steps} steps",
        details={"modes": modes, "steps": steps},
    )


def nonfinite_loss(lab: FaultLab) -> FaultOutcome:
    output_dir = lab.workdir / "diverging"
    error = None
    try:
        lab.train(
            lab.argv(
                output_dir,
                lab.clean_dataset,
                "--max_steps",
                "6",
                "--save_steps",
                "1",
                "--learning_rate",
                "1e30",
            )
        )
    except Exception as raised:  # the outcome under test
        error = raised
    checkpoints = sorted(path.name for path in output_dir.glob("checkpoint-*"))
    outcome = "NOT DETECTED: training finished" if error is None else describe_error(error)
    return FaultOutcome(
        "learning rate 1e30 (loss becomes NaN/inf)",
        f"{outcome} — checkpoints on disk: {checkpoints}",
        error,
        {"checkpoints": checkpoints, "final_model": (output_dir / "model.safetensors").exists()},
    )


def _undecodable_rows(rows: set[int]) -> Callable[[int, dict], dict]:
    def change(index: int, row: dict) -> dict:
        return _undecodable_image(index, row) if index in rows else row

    return change


def skip_undecodable(lab: FaultLab) -> FaultOutcome:
    # One labelled and one unlabelled row (the labelled rows of `--labeled_fraction 0.25`, split seed 0).
    clean_train = datasets.load_from_disk(str(lab.clean_dataset))["train"]
    labeled_rows = select_labeled_indices(clean_train, labeled_fraction=0.25)
    unlabeled_row = min(set(range(len(clean_train))) - set(labeled_rows))
    dataset = lab.dataset_with("two-undecodable", _undecodable_rows({labeled_rows[0], unlabeled_row}))
    output_dir = lab.workdir / "skipping"
    try:
        with captured_warnings() as warnings:
            results = lab.train(
                lab.argv(
                    output_dir,
                    dataset,
                    "--max_steps",
                    "4",
                    "--save_steps",
                    "4",
                    "--skip_undecodable_samples",
                    "true",
                )
            )
    except Exception as error:  # the outcome under test
        return FaultOutcome(
            "2 undecodable images, --skip_undecodable_samples true", describe_error(error), error
        )
    recipe = json.loads((output_dir / "cps_recipe.json").read_text())
    all_results = json.loads((output_dir / "all_results.json").read_text())
    steps = json.loads((output_dir / "trainer_state.json").read_text())["global_step"]
    return FaultOutcome(
        "2 undecodable images, --skip_undecodable_samples true",
        f"recovered: trained {steps} steps; all_results.json skipped_undecodable_samples = "
        f"{all_results.get('skipped_undecodable_samples')}; final warning: {warnings[-1] if warnings else 'none'}",
        details={"results": results, "all_results": all_results, "recipe": recipe, "warnings": warnings},
    )


def _sigkill(lab: FaultLab, during: str, step: int, fault: str) -> FaultOutcome:
    killed = lab.killed_run(during, step)
    after_kill = sorted(path.name for path in killed.glob("checkpoint-*"))
    staged = sorted(path.name for path in (killed / ".incomplete").glob("*"))
    latest, warnings = lab.resume(killed, f"{killed.name}-resumed-latest")
    explicit, _ = lab.resume(
        killed, f"{killed.name}-resumed-explicit", "--resume_from_checkpoint", str(killed / "checkpoint-4")
    )
    details = {
        "checkpoints_after_kill": after_kill,
        "staged_after_kill": staged,
        "final_model_after_kill": (killed / "model.safetensors").exists(),
        "warnings": warnings,
        "latest_matches": lab.matches_uninterrupted(latest),
        "explicit_matches": lab.matches_uninterrupted(explicit),
    }
    resumed_from = next(
        (message for message in warnings if message.startswith("Resuming")), "no resume message"
    )
    skipped = [message for message in warnings if message.startswith("Skipping")]
    same = details["latest_matches"] and details["explicit_matches"]
    outcome = (
        f"{'recovered' if same else 'NOT RECOVERED'}: killed with checkpoints {after_kill} on disk"
        + (f" and {staged} half-written in .incomplete/" if staged else "")
        + f"; {resumed_from.rstrip('.')}"
        + (f" ({skipped[0]})" if skipped else "")
        + f"; final weights and logged losses {'equal' if same else 'DIFFER from'} an uninterrupted run's "
        "(plain restart and --resume_from_checkpoint checkpoint-4)"
    )
    return FaultOutcome(fault, outcome, details=details)


def sigkill_between_checkpoints(lab: FaultLab) -> FaultOutcome:
    return _sigkill(lab, "step", 5, "SIGKILL at step 5 of 8")


def sigkill_while_saving(lab: FaultLab) -> FaultOutcome:
    return _sigkill(lab, "save", 6, "SIGKILL while writing checkpoint-6")


def truncated_checkpoint(lab: FaultLab) -> FaultOutcome:
    """checkpoint-4 of a run killed at step 5 gets a truncated weights file (as a non-atomic writer would leave)."""
    killed = lab.killed_run("step", 5)
    damaged = lab.workdir / "truncated-checkpoint"
    shutil.copytree(killed, damaged)
    weights = damaged / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resumed, warnings = lab.resume(damaged, "truncated-checkpoint-resumed")
    matches = lab.matches_uninterrupted(resumed)
    skipped = next((message for message in warnings if message.startswith("Skipping")), "no warning")
    resumed_from = next(
        (message for message in warnings if message.startswith("Resuming")), "no resume message"
    )
    return FaultOutcome(
        "truncated model.safetensors in the latest checkpoint",
        f"{'recovered' if matches else 'NOT RECOVERED'}: {skipped} {resumed_from} Final weights and losses "
        f"{'equal' if matches else 'DIFFER from'} an uninterrupted run's",
        details={"warnings": warnings, "matches": matches},
    )


def explicit_incomplete_checkpoint(lab: FaultLab) -> FaultOutcome:
    killed = lab.killed_run("save", 6)
    output_dir = lab.workdir / "explicit-incomplete"
    shutil.copytree(killed, output_dir)
    before = snapshot(output_dir)
    try:
        lab.train(
            lab.argv(
                output_dir,
                lab.clean_dataset,
                *INTERRUPTED_RUN,
                "--resume_from_checkpoint",
                str(output_dir / ".incomplete" / "checkpoint-6"),
            )
        )
    except Exception as error:  # the outcome under test
        untouched = snapshot(output_dir) == before
        return FaultOutcome(
            "--resume_from_checkpoint of a half-written checkpoint",
            describe_error(error) + (" — output_dir untouched" if untouched else " — output_dir CHANGED"),
            error,
            {"untouched": untouched},
        )
    return FaultOutcome(
        "--resume_from_checkpoint of a half-written checkpoint", "NOT DETECTED: training finished"
    )


def token_in_arguments(lab: FaultLab) -> FaultOutcome:
    output_dir = lab.workdir / "with-token"
    lab.train(
        lab.argv(
            output_dir,
            lab.clean_dataset,
            "--max_steps",
            "2",
            "--save_steps",
            "1",
            "--hub_token",
            SECRET_TOKEN,
        )
    )
    files = [path for path in output_dir.rglob("*") if path.is_file()]
    leaking = [
        str(path.relative_to(output_dir)) for path in files if SECRET_TOKEN.encode() in path.read_bytes()
    ]
    outcome = (
        f"token written to {leaking}"
        if leaking
        else f"recovered: the token is in none of the {len(files)} files written"
    )
    return FaultOutcome(
        "--hub_token given to a training run", outcome, details={"leaking": leaking, "files": len(files)}
    )


SCENARIOS: dict[str, Callable[[FaultLab], FaultOutcome]] = {
    "bad_mask_value": bad_mask_value,
    "size_mismatch": size_mismatch,
    "undecodable_image": undecodable_image,
    "missing_column": missing_column,
    "unknown_ids": unknown_ids,
    "empty_labeled_set": empty_labeled_set,
    "empty_unlabeled_set": empty_unlabeled_set,
    "num_labels_mismatch": num_labels_mismatch,
    "non_rgb_images": non_rgb_images,
    "nonfinite_loss": nonfinite_loss,
    "skip_undecodable": skip_undecodable,
    "sigkill_between_checkpoints": sigkill_between_checkpoints,
    "sigkill_while_saving": sigkill_while_saving,
    "truncated_checkpoint": truncated_checkpoint,
    "explicit_incomplete_checkpoint": explicit_incomplete_checkpoint,
    "token_in_arguments": token_in_arguments,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="Work folder (default: a temporary folder, deleted at the end).")
    parser.add_argument(
        "scenarios", nargs="*", choices=[[], *SCENARIOS], help="Scenarios to run (default: all)."
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as temporary:
        lab = FaultLab(Path(args.workdir or temporary))
        start = time.perf_counter()
        rows = []
        for name in args.scenarios or SCENARIOS:
            outcome = SCENARIOS[name](lab)
            text = outcome.outcome.replace(str(lab.workdir), "$WORK").replace("|", "/")
            rows.append(f"| {outcome.fault} | {text} |")
        print("| fault | outcome |\n|---|---|\n" + "\n".join(rows))
        print(f"\n{len(rows)} scenarios in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
