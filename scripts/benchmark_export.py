"""CPU inference speed of a CPS model: PyTorch (eager) against its ONNX export in onnxruntime and its
`torch.export` program, on the same random images, the three timed in turn so a slow spell hits all alike.

    python scripts/benchmark_export.py --model outputs/cps-demo --sizes 96 96 360 480 --output_json runs/export_cpu.json

Each measurement is the median over `--repeats` calls of one batch, after `--warmup` calls; `--threads` sets the
threads of torch and onnxruntime alike.
"""

import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from cps_hf.export import export_model, load_exported_model
from cps_hf.inference import load_model


@dataclass
class ExportBenchmarkArguments:
    model: str = field(metadata={"help": "Saved CPS model: a local folder or a Hub id."})
    sizes: list[int] = field(
        default_factory=lambda: [96, 96, 360, 480],
        metadata={"help": "Image sizes: height width [height width ...]."},
    )
    batch_size: int = field(default=1, metadata={"help": "Images per call."})
    branch: str = field(default="0", metadata={"help": "Branch index (one branch is what inference runs)."})
    threads: int = field(default=1, metadata={"help": "Threads of torch and onnxruntime."})
    warmup: int = field(default=3, metadata={"help": "Untimed calls first."})
    repeats: int = field(default=20, metadata={"help": "Timed calls per runtime and size."})
    output_json: str | None = field(default=None, metadata={"help": "Write the report to this JSON file."})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ExportBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if len(args.sizes) % 2:
        raise ValueError(f"`--sizes` takes height width pairs, got {args.sizes}.")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    branch = int(args.branch)
    with tempfile.TemporaryDirectory() as folder:
        runtimes = {
            "pytorch": lambda pixel_values: model(pixel_values, branch_index=branch).logits,
            "onnxruntime": load_exported_model(
                export_model(model, Path(folder) / "model.onnx", "onnx", branch=branch),
                num_threads=args.threads,
            ),
            "torch_export": load_exported_model(
                export_model(model, Path(folder) / "model.pt2", "torch_export", branch=branch)
            ),
        }
        results = []
        for height, width in zip(args.sizes[::2], args.sizes[1::2]):
            pixel_values = torch.randn(
                args.batch_size, 3, height, width, generator=torch.Generator().manual_seed(0)
            )
            seconds: dict[str, list[float]] = {name: [] for name in runtimes}
            with torch.inference_mode():
                for call in range(args.warmup + args.repeats):
                    for name, run in runtimes.items():
                        start = time.perf_counter()
                        run(pixel_values)
                        if call >= args.warmup:
                            seconds[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(values) for name, values in seconds.items()}
            results.append(
                {
                    "height": height,
                    "width": width,
                    "median_ms": {name: round(1000 * value, 2) for name, value in medians.items()},
                    "speedup_onnxruntime_vs_pytorch": round(medians["pytorch"] / medians["onnxruntime"], 2),
                }
            )
            print(
                f"{height}x{width}, batch {args.batch_size}: "
                + " | ".join(f"{name} {1000 * value:.1f} ms" for name, value in medians.items())
                + f" | onnxruntime {results[-1]['speedup_onnxruntime_vs_pytorch']:.2f}x PyTorch"
            )
    if args.output_json:
        report = {
            "model": args.model,
            "settings": {
                key: value for key, value in vars(args).items() if key not in ("model", "output_json")
            },
            "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
            "results": results,
        }
        output_path = Path(args.output_json)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
