"""Checkpoints that are complete or absent: atomic publication, and detection of half-written ones.

The [`~transformers.Trainer`] writes `checkpoint-<step>` file by file, so a run killed while saving leaves a folder
that looks like a checkpoint but lacks the optimizer state or holds a truncated weights file; resuming from it
either crashes or silently continues with a fresh optimizer. [`~cps_hf.trainer.CPSTrainer`] therefore writes each
checkpoint into `<output_dir>/.incomplete/checkpoint-<step>` and renames it into place once every process has
written its part; [`last_complete_checkpoint`] skips, with a warning, any folder that is still incomplete (written
by another tool, truncated on disk, or left in `.incomplete/`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from safetensors import safe_open
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "STAGING_DIR_NAME",
    "checkpoint_problems",
    "last_complete_checkpoint",
    "publish_checkpoint",
]

STAGING_DIR_NAME = ".incomplete"
"""Folder of `output_dir` where checkpoints are written before being renamed into place."""

_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Files `Trainer._save_checkpoint` writes with `torch.save` (zip archives), without which resuming is not exact.
_TORCH_STATE_FILES = ("optimizer.pt", "scheduler.pt")


def _safetensors_problem(path: Path) -> str | None:
    try:
        # Opening parses the header and checks that the data it describes covers the file exactly.
        with safe_open(str(path), framework="pt"):
            return None
    except Exception as error:
        return f"{path.name} is unreadable ({error})"


def _weights_problems(checkpoint: Path) -> list[str]:
    index_path = checkpoint / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            return [f"{index_path.name} is unreadable ({error})"]
        paths = [checkpoint / shard for shard in shards]
    else:
        paths = [checkpoint / "model.safetensors"]
    problems = [f"{path.name} is missing" for path in paths if not path.is_file()]
    problems += [problem for path in paths if path.is_file() and (problem := _safetensors_problem(path))]
    return problems


def checkpoint_problems(checkpoint: str | os.PathLike) -> list[str]:
    """Lists what makes a checkpoint folder unusable for an exact resume; empty when it is complete.

    A complete checkpoint has readable safetensors weights (`model.safetensors`, or an index and all its shards), a
    `trainer_state.json` whose `global_step` matches the folder name, the optimizer and scheduler states and at
    least one RNG state file, each a readable archive.

    Args:
        checkpoint (`str` or `os.PathLike`):
            A `checkpoint-<step>` folder.

    Returns:
        `list[str]`: one human-readable line per problem.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return [f"{checkpoint} is not a folder"]
    problems = _weights_problems(checkpoint)
    state_path = checkpoint / "trainer_state.json"
    if not state_path.is_file():
        problems.append("trainer_state.json is missing")
    else:
        try:
            global_step = json.loads(state_path.read_text())["global_step"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            problems.append(f"trainer_state.json is unreadable ({error})")
        else:
            match = _CHECKPOINT_PATTERN.match(checkpoint.name)
            if match and int(match.group(1)) != global_step:
                problems.append(f"trainer_state.json is at step {global_step}, not {match.group(1)}")
    rng_files = sorted(checkpoint.glob("rng_state*.pth"))
    if not rng_files:
        problems.append("no rng_state*.pth file")
    for path in [checkpoint / name for name in _TORCH_STATE_FILES] + rng_files:
        if not path.is_file():
            problems.append(f"{path.name} is missing")
        elif not zipfile.is_zipfile(path):
            problems.append(f"{path.name} is truncated or not a torch archive")
    return problems


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete `checkpoint-<step>` folder of `output_dir` with the highest step, or `None`.

    Incomplete checkpoints (see [`checkpoint_problems`]) with a higher step, and leftovers of interrupted saves in
    `output_dir/.incomplete/`, are skipped with a warning naming the folder and what is wrong with it. Nothing is
    deleted.

    Args:
        output_dir (`str` or `os.PathLike`):
            The run's output folder.

    Returns:
        `str | None`: the path of the checkpoint to resume from.
    """
    output_dir = Path(output_dir)
    staging = output_dir / STAGING_DIR_NAME
    if staging.is_dir():
        for leftover in sorted(staging.iterdir()):
            logger.warning(
                f"Skipping the half-written checkpoint {leftover}: its save was interrupted (it was never renamed "
                "into place)."
            )
    steps_and_paths = [
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := _CHECKPOINT_PATTERN.match(path.name))
    ]
    for _, path in sorted(steps_and_paths, reverse=True):
        problems = checkpoint_problems(path)
        if not problems:
            return str(path)
        logger.warning(f"Skipping the incomplete checkpoint {path}: {'; '.join(problems)}.")
    return None


def publish_checkpoint(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Moves a fully written checkpoint folder into place with a rename, atomic on one filesystem.

    A folder already at `final` (a checkpoint of the same step from an earlier attempt) is moved aside first and
    deleted only once the new one is in place. The staging parent is removed when it is left empty.

    Args:
        staged (`str` or `os.PathLike`):
            The written checkpoint, inside `output_dir/.incomplete/`.
        final (`str` or `os.PathLike`):
            Its destination, `output_dir/checkpoint-<step>`.
    """
    staged, final = Path(staged), Path(final)
    replaced = None
    if final.exists():
        replaced = staged.with_name(f"{staged.name}.replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staged, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    try:
        staged.parent.rmdir()
    except OSError:  # other leftovers remain; they are reported when resuming
        pass
