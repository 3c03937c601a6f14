"""Runs `scripts/train_cps.py` (same arguments) with test instrumentation chosen by environment variables.

Only the tests and `tools/fault_injection.py` set these variables; the library never reads them.

- `CPS_PROBE_RECORD_DIR`: at exit, write `rank-<RANK>.json` there with every file-system write the process made
  (`writes`: `[event, path]`, from Python's audit hooks: opening a file for writing, mkdir, rename, remove), every
  training item it loaded (`items`: `[epoch, index]`) and every row of a streamed unlabelled pool it used
  (`stream_rows`: `[pass, id]`, when the stream is read in the training process).
- `CPS_PROBE_KILL_AT_STEP=N`: the process SIGKILLs itself at optimizer step N: when the step starts
  (`CPS_PROBE_KILL_DURING=step`, the default) or while saving checkpoint N, after its weights and before its
  optimizer state are written (`CPS_PROBE_KILL_DURING=save`).

    python tools/train_probe.py --output_dir runs/x ...   # any train_cps.py arguments
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train_cps.py"
_WRITE_MODE_CHARACTERS = set("wax+")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def _is_write(event: str, args: tuple) -> str | None:
    """The path an audit event writes to, or `None` when it does not write."""
    if event == "open":
        path, mode, flags = args
        if not isinstance(path, str | bytes | os.PathLike):
            return None
        writes = _WRITE_MODE_CHARACTERS & set(mode) if isinstance(mode, str) else flags & _WRITE_FLAGS
        return os.fsdecode(path) if writes else None
    if event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        return os.fsdecode(args[0])
    if event == "os.rename":
        return f"{os.fsdecode(args[0])} -> {os.fsdecode(args[1])}"
    return None


def install_recorder(record_dir: Path) -> None:
    from cps_hf.data import SemiSupervisedSegmentationDataset, UnlabeledImageStream

    writes: list[tuple[str, str]] = []
    items: list[tuple[int, int]] = []
    stream_rows: list[tuple[int, str]] = []

    def audit(event: str, args: tuple) -> None:
        path = _is_write(event, args)
        if path is not None:
            writes.append((event, os.path.abspath(path) if " -> " not in path else path))

    original_getitem = SemiSupervisedSegmentationDataset.__getitem__

    def recording_getitem(self, index):
        items.append((self.epoch, int(index)))
        return original_getitem(self, index)

    original_rows = UnlabeledImageStream.rows

    def recording_rows(self, start=None):
        for row, position in original_rows(self, start):
            stream_rows.append((position.epoch, row.get(self.id_column)))
            yield row, position

    def dump() -> None:
        record_dir.mkdir(parents=True, exist_ok=True)
        path = record_dir / f"rank-{os.environ.get('RANK', '0')}.json"
        path.write_text(json.dumps({"writes": writes, "items": items, "stream_rows": stream_rows}))

    SemiSupervisedSegmentationDataset.__getitem__ = recording_getitem
    UnlabeledImageStream.rows = recording_rows
    sys.addaudithook(audit)
    atexit.register(dump)


def install_kill(step: int, during: str) -> None:
    from cps_hf.trainer import CPSTrainer

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if during == "step":
        original_training_step = CPSTrainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step + 1 == step:
                kill()
            return original_training_step(self, *args, **kwargs)

        CPSTrainer.training_step = training_step
    elif during == "save":
        original_save = CPSTrainer._save_optimizer_and_scheduler

        def save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == step:
                kill()
            return original_save(self, output_dir)

        CPSTrainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    else:
        raise ValueError(f"CPS_PROBE_KILL_DURING must be 'step' or 'save', got {during!r}.")


def main() -> None:
    # One thread, as in the test process, so that runs compared with in-process ones take the same numeric path.
    torch.set_num_threads(1)
    if os.environ.get("CPS_PROBE_RECORD_DIR"):
        install_recorder(Path(os.environ["CPS_PROBE_RECORD_DIR"]))
    if os.environ.get("CPS_PROBE_KILL_AT_STEP"):
        install_kill(
            int(os.environ["CPS_PROBE_KILL_AT_STEP"]), os.environ.get("CPS_PROBE_KILL_DURING", "step")
        )
    sys.argv = [str(TRAIN_SCRIPT), *sys.argv[1:]]
    runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")


if __name__ == "__main__":
    main()
