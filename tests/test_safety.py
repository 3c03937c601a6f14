"""Safe loading: weights only through safetensors, no pickle loads, no trust_remote_code on the user's behalf. Safe
defaults: a run on the user's data never inherits the demo's settings nor overwrites a finished run."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cps_hf.checkpointing import checkpoint_problems
from cps_hf.experiment import (
    DEFAULT_CONFIG,
    parse_experiment_arguments,
    resolve_resume_checkpoint,
    run_experiment,
)
from cps_hf.trainer import CPSTrainingArguments

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_FILES = sorted([*(REPO_ROOT / "cps_hf").rglob("*.py"), *(REPO_ROOT / "scripts").glob("*.py")])


def calls_in(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]


def call_name(call: ast.Call) -> str:
    return ast.unparse(call.func)


def test_sources_are_found():
    assert len(SOURCE_FILES) > 10


@pytest.mark.parametrize("path", SOURCE_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_no_unsafe_deserialisation(path):
    for call in calls_in(path):
        name = call_name(call)
        if name.endswith("torch.load") or name == "load" and "torch" in path.read_text():
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            assert weights_only and ast.unparse(weights_only[0].value) == "True", (
                f"{path}:{call.lineno} {name}"
            )
        assert not name.startswith("pickle."), f"{path}:{call.lineno} uses {name}"


@pytest.mark.parametrize("path", SOURCE_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_library_never_sets_trust_remote_code(path):
    for call in calls_in(path):
        for keyword in call.keywords:
            if keyword.arg == "trust_remote_code":
                assert ast.unparse(keyword.value) != "True", (
                    f"{path}:{call.lineno} sets trust_remote_code=True"
                )


def test_existing_trained_model_is_not_overwritten(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_bytes(b"the user's trained weights")
    argv = [
        "--output_dir",
        str(output_dir),
        "--overwrite_output_dir",
        "false",
        "--backbone",
        "test_resnet",
        "--max_steps",
        "1",
    ]
    with pytest.raises(ValueError, match="already holds a trained model"):
        run_experiment(*parse_experiment_arguments(argv)[:3])
    assert (output_dir / "model.safetensors").read_bytes() == b"the user's trained weights"


def library_default(arguments_class: type, name: str):
    return arguments_class.__dataclass_fields__[name].default


def test_a_run_on_user_data_gets_library_defaults_not_the_demo():
    model_args, data_args, training_args, base = parse_experiment_arguments(
        ["--dataset_name", "data/my_data", "--labeled_fraction", "0.125", "--output_dir", "runs/mine"]
    )
    assert base is None
    # The paper's optimiser and schedule, the Trainer's checkpointing, no overwriting.
    for name in (
        "learning_rate",
        "optim",
        "lr_scheduler_type",
        "max_grad_norm",
        "weight_decay",
        "save_strategy",
    ):
        assert getattr(training_args, name) == library_default(CPSTrainingArguments, name), name
    assert training_args.save_strategy == "steps" and training_args.save_steps == 500
    assert training_args.overwrite_output_dir is False
    assert model_args.backbone == "resnet50s" and model_args.pretrained_backbone is True
    assert model_args.multi_grid == "auto" and model_args.share_backbone_initialization is None
    assert data_args.crop_size == [512, 512]


@pytest.mark.parametrize("argv", [[], ["--dataset_name", "synthetic"], ["--max_steps", "10"]])
def test_the_demo_config_is_the_base_of_the_demo_only(argv):
    model_args, _, training_args, base = parse_experiment_arguments(argv)
    assert base == DEFAULT_CONFIG
    assert model_args.backbone == "test_resnet" and training_args.overwrite_output_dir is True


def write_complete_checkpoint(checkpoint: Path, step: int) -> None:
    """A checkpoint folder that `checkpoint_problems` finds complete (its files' contents are irrelevant here)."""
    checkpoint.mkdir(parents=True)
    save_file({"weight": torch.zeros(1)}, checkpoint / "model.safetensors")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, checkpoint / name)


def test_a_run_with_checkpoints_resumes_and_a_finished_model_alone_is_not_overwritten(tmp_path):
    output_dir = tmp_path / "run"
    write_complete_checkpoint(output_dir / "checkpoint-4", step=4)
    assert checkpoint_problems(output_dir / "checkpoint-4") == []
    argv = ["--dataset_name", "data/my_data", "--labeled_fraction", "0.5", "--output_dir", str(output_dir)]
    # Checkpoints (an interrupted run, or one continued to more steps): resumes from the latest complete one.
    assert resolve_resume_checkpoint(parse_experiment_arguments(argv)[2]) == str(output_dir / "checkpoint-4")
    # A final model and nothing to resume from: refused, naming the way out, since user data gets no overwriting.
    shutil.rmtree(output_dir / "checkpoint-4")
    save_file({"weight": torch.zeros(1)}, output_dir / "model.safetensors")
    with pytest.raises(ValueError, match="already holds a trained model; pass --overwrite_output_dir true"):
        resolve_resume_checkpoint(parse_experiment_arguments(argv)[2])
    overwrite = parse_experiment_arguments([*argv, "--overwrite_output_dir", "true"])[2]
    assert resolve_resume_checkpoint(overwrite) is None
