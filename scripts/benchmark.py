"""Time one CutMix CPS training step: the paper's step structure (eight fp32 forward calls, one per branch and
batch) against cps_hf's fast step (every branch per call, bf16 autocast, channels-last), from the same weights on
the same batches, each in its own process. Prints a table; `--output_json` writes the full report.

    python scripts/benchmark.py --backbone resnet50s --crop_size 128 --batch_size 2 --steps 5 --device cpu \\
        --dtype bf16 --output_json runs/benchmark_cpu.json
    python scripts/benchmark.py --crop_size 512 --batch_size 8 --dtype bf16 --output_json runs/benchmark_gpu.json
    python scripts/benchmark.py ... --fused_forward true   # fused step: two model calls, BN over the concatenations
"""

import sys
from pathlib import Path

from transformers import HfArgumentParser

# The benchmarks live in benchmarks/ next to scripts/ (tooling, not part of the installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import write_report  # noqa: E402
from benchmarks.step import BenchmarkArguments, format_benchmark_table, run_benchmark  # noqa: E402


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    report = run_benchmark(args)
    print(format_benchmark_table(report))
    output_path = write_report(report, args.output_json)
    if output_path is not None:
        print(f"Report written to {output_path}")


if __name__ == "__main__":
    main()
