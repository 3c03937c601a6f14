"""Benchmarks of cps_hf (not part of the installed package): the CPS training step (`step`), the streaming mIoU
(`metric`) and the training data pipeline (`data_pipeline`). Run through `scripts/benchmark*.py`."""

import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], output_json: str | None) -> Path | None:
    """Writes a benchmark's report as indented JSON to `output_json` (creating its folder); `None`: nothing."""
    if not output_json:
        return None
    output_path = Path(output_json)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text(json.dumps(report, indent=2))
    return output_path
