"""Predict the peak accelerator memory of one training step per device, without an accelerator.

    python scripts/estimate_memory.py scripts/configs/cityscapes/r101_1-8_cps_cutmix.yaml
    python scripts/estimate_memory.py CONFIG --per_device_train_batch_size 2 --bf16 true --output_json memory.json

Takes the arguments of `scripts/train_cps.py` (a config file, then any training flag overriding it) plus
`--output_json`, and runs that training step on fake tensors (no memory, no download). The estimate is the peak of
live tensors (what `torch.cuda.max_memory_allocated` reports); the CUDA context and the caching allocator's slack come
on top. How it is computed and how it compares with measurements: docs/memory/README.md.
"""

import argparse
import json
import sys
from pathlib import Path

from cps_hf.memory import estimate_training_memory, format_memory_estimate, parse_estimation_arguments


def main(argv: list[str] | None = None) -> None:
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--output_json", type=Path, help="Also write the estimate to this JSON file.")
    known, training_argv = peek.parse_known_args(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args, config_path = parse_estimation_arguments(training_argv)
    estimate = estimate_training_memory(model_args, data_args, training_args)
    estimate.settings = {"config": str(config_path) if config_path else None, **estimate.settings}
    print(format_memory_estimate(estimate))
    if known.output_json is not None:
        known.output_json.parent.mkdir(parents=True, exist_ok=True)
        known.output_json.write_text(json.dumps(estimate.to_dict(), indent=2) + "\n")
        print(f"Written to {known.output_json}")


if __name__ == "__main__":
    main()
