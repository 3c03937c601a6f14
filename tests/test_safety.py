"""Safe loading: weights only through safetensors, no pickle loads, no trust_remote_code on the user's behalf."""

import ast
from pathlib import Path

import pytest

from cps_hf.experiment import parse_experiment_arguments, run_experiment

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
