"""Building blocks shared by the test modules: a tiny CPS model on the synthetic classes, the script runner and
the launcher command that starts two real CPU (gloo) processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from cps_hf import CPSConfig, CPSForSemanticSegmentation, create_image_processor
from cps_hf.data.synthetic import SYNTHETIC_CLASS_NAMES

# `accelerate launch --cpu --num_processes 2` starts one process; these flags (with ACCELERATE_USE_CPU=1) start two.
TWO_CPU_PROCESSES_LAUNCH = (
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
)


REPO_ROOT = Path(__file__).resolve().parents[1]
# One thread per script process: the models are tiny, and the machine may be busy.
SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_tiny_config(**overrides) -> CPSConfig:
    """A CPS config on timm's `test_resnet` with slim heads and the synthetic dataset's class names (the
    `tiny_config` fixture); `overrides` replace any field."""
    values = dict(
        backbone="test_resnet",
        num_labels=len(SYNTHETIC_CLASS_NAMES),
        multi_grid=None,
        aspp_channels=16,
        low_level_channels=8,
        decoder_channels=16,
        id2label=dict(enumerate(SYNTHETIC_CLASS_NAMES)),
        label2id={name: index for index, name in enumerate(SYNTHETIC_CLASS_NAMES)},
    )
    values.update(overrides)
    return CPSConfig(**values)


def save_tiny_model(model_dir: Path, seed: int = 0) -> Path:
    """Saves a freshly initialised tiny model and its image processor, as a training run would."""
    config = make_tiny_config()
    torch.manual_seed(seed)
    CPSForSemanticSegmentation(config).save_pretrained(model_dir)
    create_image_processor(config).save_pretrained(model_dir)
    return model_dir


def run_script(
    name: str,
    *arguments: str,
    launcher: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
    returncode: int = 0,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Runs `scripts/<name>.py` as a user does, in a fresh interpreter (behind `launcher`, e.g. `-m accelerate
    ...`), and asserts its exit status: `returncode` 0 by default; 1 for an uncaught exception or
    `SystemExit("message")`, 2 for an argparse error. Returns the finished process (text `stdout`, `stderr`)."""
    command = [sys.executable, *launcher, str(REPO_ROOT / "scripts" / f"{name}.py"), *arguments]
    result = subprocess.run(
        command, env={**SCRIPT_ENV, **(extra_env or {})}, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == returncode, result.stderr[-4000:]
    return result


def save_tiny_run(
    model_dir: Path,
    data_overrides: dict | None = None,
    model_overrides: dict | None = None,
    training_overrides: dict | None = None,
) -> Path:
    """A training run's output folder as `run_experiment` leaves it: the tiny model, `cps_recipe.json`, the
    Trainer's `eval_results.json` and `all_results.json`, plus a sliding-window report of `scripts/evaluate_cps.py`
    (`eval_slide.json`). The metric values are arbitrary and distinct, for tests of what reads them."""
    from dataclasses import asdict

    from cps_hf.experiment import DataArguments, ModelArguments

    save_tiny_model(model_dir)
    model_args = ModelArguments(
        **{"backbone": "test_resnet", "pretrained_backbone": False, **(model_overrides or {})}
    )
    data_args = DataArguments(**{"labeled_fraction": 0.25, "crop_size": 24, **(data_overrides or {})})
    training = dict(
        cps_weight=1.5,
        cutmix=False,
        supervised_only=False,
        supervised_loss="ce",
        pseudo_label_mode="train",
        learning_rate=0.01,
        weight_decay=0.0001,
        max_steps=4,
        num_train_epochs=3.0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        seed=0,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="polynomial",
        lr_scheduler_kwargs={"power": 0.9, "lr_end": 0.0},
        max_grad_norm=0.0,
    )
    training.update(training_overrides or {})
    recipe = dict(
        model=asdict(model_args),
        data=asdict(data_args),
        num_labeled=4,
        num_unlabeled=12,
        split_fingerprint="0123456789abcdef",
        training=training,
        world_size=1,
    )
    (model_dir / "cps_recipe.json").write_text(json.dumps(recipe, indent=2))
    class_ious = [0.91, 0.42, float("nan"), 0.33, 0.27]
    trainer_results = {
        "eval_mean_iou": 0.4825,
        "eval_overall_accuracy": 0.875,
        "eval_mean_accuracy": 0.5625,
        "eval_loss": 0.7,
        **{f"eval_iou_{name}": value for name, value in zip(SYNTHETIC_CLASS_NAMES, class_ious)},
    }
    (model_dir / "eval_results.json").write_text(json.dumps(trainer_results))
    (model_dir / "all_results.json").write_text(json.dumps({**trainer_results, "train_loss": 1.2}))
    branch_results = {
        branch: {
            "mean_iou": mean_iou,
            "overall_accuracy": 0.8,
            "mean_accuracy": 0.5,
            **{f"iou_{name}": mean_iou + 0.1 * offset for offset, name in enumerate(SYNTHETIC_CLASS_NAMES)},
        }
        for branch, mean_iou in (("branch_0", 0.4125), ("branch_1", 0.4036), ("ensemble", 0.4217))
    }
    report = {
        "model": str(model_dir),
        "dataset": "synthetic",
        "split": "validation",
        "num_images": 4,
        "protocol": {
            "mode": "slide",
            "crop_size": [16, 16],
            "stride": [11, 11],
            "scales": [1.0],
            "flip": True,
        },
        "results": branch_results,
    }
    (model_dir / "eval_slide.json").write_text(json.dumps(report))
    return model_dir


def write_parquet_image_pool(
    folder: Path, num_rows: int, num_files: int, image_size: int = 32, image_column: str = "image"
) -> Path:
    """An image-only pool of `num_rows` random PNGs with ids `pool_000`, ... split over `num_files` parquet files
    named like the Hub's (`train-00000-of-00003.parquet`), as the streamed unlabelled set of the tests."""
    import io

    import datasets
    import numpy as np
    from PIL import Image as PILImage

    features = datasets.Features({"id": datasets.Value("string"), image_column: datasets.Image()})
    folder.mkdir(parents=True, exist_ok=True)
    rows_per_file = -(-num_rows // num_files)
    for file_index in range(num_files):
        rows = []
        for row in range(file_index * rows_per_file, min(num_rows, (file_index + 1) * rows_per_file)):
            pixels = np.random.default_rng(row).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            encoded = io.BytesIO()
            PILImage.fromarray(pixels).save(encoded, format="PNG")
            rows.append({"id": f"pool_{row:03d}", image_column: {"bytes": encoded.getvalue(), "path": None}})
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(folder / f"train-{file_index:05d}-of-{num_files:05d}.parquet")
        )
    return folder
