"""Building blocks shared by the test modules: a tiny CPS model on the synthetic classes and the launcher
command that starts two real CPU (gloo) processes."""

import runpy
import sys
from pathlib import Path

import torch

from cps_hf import CPSConfig, CPSForSemanticSegmentation, create_image_processor
from cps_hf.synthetic import SYNTHETIC_CLASS_NAMES

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


def tiny_synthetic_config(**overrides) -> CPSConfig:
    """A CPS config on timm's `test_resnet` with slim heads and the synthetic dataset's class names."""
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
    config = tiny_synthetic_config()
    torch.manual_seed(seed)
    CPSForSemanticSegmentation(config).save_pretrained(model_dir)
    create_image_processor(config).save_pretrained(model_dir)
    return model_dir


def run_script(name: str, argv: list[str]) -> None:
    """Runs `scripts/<name>.py`'s `main(argv)` in this process (no interpreter start-up, unlike a subprocess)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    runpy.run_path(str(script), run_name=f"scripts.{name}")["main"](argv)
