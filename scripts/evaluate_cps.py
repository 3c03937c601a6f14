"""Evaluate a saved CPS model: every branch and the ensemble in one pass, printed as a table and written as JSON.

    python scripts/evaluate_cps.py --model runs/demo --dataset_name synthetic
    python scripts/evaluate_cps.py --model runs/voc --dataset_name data/voc --mode slide --crop_size 512 \\
        --output_json runs/voc/eval_slide.json
    accelerate launch --num_processes 4 scripts/evaluate_cps.py --model runs/voc --dataset_name data/voc ...

Under `accelerate launch` each process evaluates a shard of the split; the confusion matrices are summed once and
the main process prints and writes the results.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from transformers import HfArgumentParser

from cps_hf import CPSForSemanticSegmentation
from cps_hf.data import (
    SegmentationTransform,
    SplitName,
    SupervisedSegmentationDataset,
    check_columns,
    get_split,
    load_segmentation_dataset,
)
from cps_hf.evaluation import evaluate_model, format_results_table
from cps_hf.inference import InferenceProtocolArguments, load_image_normalization, parse_branch_selection
from cps_hf.modelcard import weights_sha256


@dataclass
class EvaluationArguments:
    """What to evaluate, on which data, under which inference protocol."""

    model: str = field(metadata={"help": "Saved CPS model: a local folder or a Hub id."})
    dataset_name: str = field(
        metadata={"help": "'synthetic', a save_to_disk/parquet/imagefolder folder, or a Hub dataset id."}
    )
    split: str = field(default="validation", metadata={"help": "Split to evaluate."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "Mask column (class ids)."})
    id_column: str = field(default="id", metadata={"help": "Sample id column (error messages)."})
    branches: list[str] | None = field(
        default=None,
        metadata={"help": "Branch indices and/or 'ensemble' (default: every branch + ensemble)."},
    )
    batch_size: int = field(
        default=1, metadata={"help": "Images per batch (>1 needs equal sizes or --eval_size)."}
    )
    eval_size: int | None = field(
        default=None, metadata={"help": "Resize images and labels to this square size."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate the first N rows only."})
    num_workers: int = field(default=0, metadata={"help": "Data-loading worker processes."})
    cpu: bool = field(default=False, metadata={"help": "Run on the CPU even if a GPU is available."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for datasets."})
    output_json: str | None = field(default=None, metadata={"help": "Write the results to this JSON file."})


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    return value


def main() -> None:
    args, protocol_args = HfArgumentParser(
        (EvaluationArguments, InferenceProtocolArguments)
    ).parse_args_into_dataclasses()
    protocol = protocol_args.to_protocol()
    branches = parse_branch_selection(args.branches) if args.branches else None
    accelerator = Accelerator(cpu=args.cpu)
    model = CPSForSemanticSegmentation.from_pretrained(args.model).to(accelerator.device)
    config = model.config
    mean, std = load_image_normalization(args.model, config.backbone)

    dataset_dict = load_segmentation_dataset(args.dataset_name, cache_dir=args.cache_dir)
    split = get_split(dataset_dict, args.split, args.dataset_name)
    check_columns(split, args.image_column, args.label_column, args.split)
    indices = None if args.max_samples is None else range(min(args.max_samples, len(split)))
    transform = SegmentationTransform(
        train=False,
        mean=mean,
        std=std,
        eval_size=args.eval_size,
        ignore_index=config.semantic_loss_ignore_index,
    )
    dataset = SupervisedSegmentationDataset(
        split,
        indices,
        num_labels=config.num_labels,
        transform=transform,
        image_column=args.image_column,
        label_column=args.label_column,
        id_column=args.id_column,
        split_name=SplitName(args.split, args.dataset_name),
    )

    start = time.perf_counter()
    results = evaluate_model(
        model,
        dataset,
        protocol,
        branches=branches,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        accelerator=accelerator,
    )
    images_per_second = len(dataset) / (time.perf_counter() - start)

    if accelerator.is_main_process:
        print(format_results_table(results, config.id2label))
        print(
            f"{len(dataset)} images, {images_per_second:.2f} images/s on {accelerator.num_processes} process(es)"
        )
        if args.output_json:
            report = {
                "model": args.model,
                "dataset": args.dataset_name,
                "split": args.split,
                "num_images": len(dataset),
                "protocol": protocol.to_json_dict(),
                "eval_size": args.eval_size,
                "max_samples": args.max_samples,
                "weights_sha256": weights_sha256(args.model),
                "bf16": protocol_args.bf16,
                "num_processes": accelerator.num_processes,
                "images_per_second": images_per_second,
                "results": results,
            }
            output_path = Path(args.output_json)
            output_path.parent.mkdir(parents=True, exist_ok=True)
            output_path.write_text(json.dumps(_json_ready(report), indent=2))
            print(f"Results written to {output_path}")
    # As in train_cps.py: a process group left to interpreter exit can abort a finished process under gloo.
    accelerator.end_training()


if __name__ == "__main__":
    main()
