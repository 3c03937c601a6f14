"""Speed of cps_hf's streaming confusion-matrix mIoU against the `evaluate`-style per-image histogram algorithm, on
the same random predictions and labels (default: CamVid validation size, 101 images of 360x480, 11 classes).

    python scripts/benchmark_metric.py --output_json runs/benchmark_metric.json
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

# The benchmarks live in benchmarks/ next to scripts/ (tooling, not part of the installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import write_report  # noqa: E402
from benchmarks.metric import benchmark_metric  # noqa: E402


@dataclass
class MetricBenchmarkArguments:
    num_images: int = field(default=101, metadata={"help": "Images."})
    height: int = field(default=360, metadata={"help": "Image height."})
    width: int = field(default=480, metadata={"help": "Image width."})
    num_labels: int = field(default=11, metadata={"help": "Classes."})
    batch_size: int = field(default=16, metadata={"help": "Images per streaming update."})
    repeats: int = field(default=3, metadata={"help": "Repeats (best time is reported)."})
    output_json: str | None = field(default=None, metadata={"help": "Write the report to this JSON file."})


def main() -> None:
    (args,) = HfArgumentParser(MetricBenchmarkArguments).parse_args_into_dataclasses()
    settings = {key: value for key, value in vars(args).items() if key != "output_json"}
    report = benchmark_metric(**settings)
    print(
        f"streaming confusion matrix: {report['streaming_seconds']:.3f} s "
        f"({report['streaming_images_per_second']:.0f} images/s) | evaluate-style histograms: "
        f"{report['histogram_seconds']:.3f} s ({report['histogram_images_per_second']:.0f} images/s) | "
        f"speedup {report['speedup']:.1f}x | mIoU {100 * report['mean_iou']:.2f} | "
        f"max per-class IoU difference {report['max_per_class_iou_difference']:.2e}"
    )
    write_report(report, args.output_json)


if __name__ == "__main__":
    main()
