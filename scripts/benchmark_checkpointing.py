"""Peak memory and time of one CutMix CPS training step without and with gradient checkpointing: the same fast step
(the trainer's forward passes) from the same weights on the same batches, each setting in its own fresh process,
their steps alternating. Prints a table; `--output_json` writes the full report. Takes the options of
`scripts/benchmark.py` (its `--gradient_checkpointing` is ignored: both settings run).

    python scripts/benchmark_checkpointing.py --backbone resnet50s --crop_size 256 --batch_size 2 --steps 3 \\
        --warmup 1 --device cpu --dtype fp32 --output_json runs/checkpointing_cpu.json
"""

import sys
from pathlib import Path

from transformers import HfArgumentParser

# The benchmarks live in benchmarks/ next to scripts/ (tooling, not part of the installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import write_report  # noqa: E402
from benchmarks.checkpointing import format_checkpointing_table, run_checkpointing_benchmark  # noqa: E402
from benchmarks.step import BenchmarkArguments  # noqa: E402


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    report = run_checkpointing_benchmark(args)
    print(format_checkpointing_table(report))
    output_path = write_report(report, args.output_json)
    if output_path is not None:
        print(f"Report written to {output_path}")


if __name__ == "__main__":
    main()
