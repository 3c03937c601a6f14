"""Speed of the training data pipeline alone (decode, augment, CutMix masks, collate), built from a training config
exactly as `scripts/train_cps.py` builds it:

    python scripts/benchmark_data.py scripts/configs/camvid.yaml --cutmix true --num_samples 200
"""

import sys
from pathlib import Path

# The benchmarks live in benchmarks/ next to scripts/ (tooling, not part of the installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.data_pipeline import benchmark_data_pipeline  # noqa: E402
from cps_hf.experiment import build_data, parse_experiment_arguments


def main() -> None:
    argv = sys.argv[1:]
    num_samples = 200
    if "--num_samples" in argv:
        position = argv.index("--num_samples")
        num_samples = int(argv[position + 1])
        del argv[position : position + 2]
    model_args, data_args, training_args, _ = parse_experiment_arguments(argv)
    data = build_data(data_args, training_args, model_args.backbone)
    report = benchmark_data_pipeline(data.train_dataset, num_samples)
    print(
        f"{report['num_samples']} training samples in {report['seconds']:.2f} s: "
        f"{report['samples_per_second']:.1f} samples/s in one process ({report['num_threads']} torch threads); "
        f"crop {data_args.crop_size}, cutmix={training_args.cutmix}"
    )


if __name__ == "__main__":
    main()
