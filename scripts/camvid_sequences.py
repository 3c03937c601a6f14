"""Where a CamVid model wins and loses, frame group by frame group: for each trained run, branch 0's per-class IoU
and mIoU on the labelled and the unlabelled training frames and on the validation frames, each split by video
sequence (the part of a frame id before its first `_`, e.g. `0016E5`) and in total, and how one class's pixels are
predicted.

    python scripts/camvid_sequences.py --runs runs/camvid/supervised_mfb-seed0 runs/camvid/cps_cutmix_mfb-seed0 \\
        --dataset_name data/camvid-90x120 --class_name Tree --output docs/camvid/sequences.json

The labelled/unlabelled partition is the run's own (read back from its `cps_recipe.json`); every number is on
frames with ground truth, including the "unlabelled" ones, whose masks the runs never saw.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from datasets import load_from_disk

from cps_hf.data import decode_mask
from cps_hf.data.splits import select_labeled_indices
from cps_hf.inference import load_image_normalization, load_model, predict_segmentation
from cps_hf.metrics import class_iou_and_accuracy, confusion_matrix


def frame_groups(run_dir: Path, dataset) -> dict[str, list[tuple[str, int]]]:
    """`{"train-labelled/<seq>" | "train-unlabelled/<seq>" | "validation/<seq>": [(split, row), ...]}`."""
    recipe = json.loads((run_dir / "cps_recipe.json").read_text())["data"]
    labeled = set(
        select_labeled_indices(
            dataset["train"],
            labeled_fraction=recipe["labeled_fraction"],
            labeled_count=recipe["labeled_count"],
            labeled_ids_file=recipe["labeled_ids_file"],
            split_seed=recipe["split_seed"],
        )
    )
    groups = defaultdict(list)
    for split in ("train", "validation"):
        for row, frame_id in enumerate(dataset[split]["id"]):
            part = (
                split
                if split == "validation"
                else ("train-labelled" if row in labeled else "train-unlabelled")
            )
            groups[f"{part}/{frame_id.split('_')[0]}"].append((split, row))
    return dict(sorted(groups.items()))


def group_report(matrix: torch.Tensor, names: list[str], class_index: int) -> dict:
    iou, _ = class_iou_and_accuracy(matrix.double())
    row = matrix[class_index].double()
    shares = row / row.sum()
    confused = max(
        (index for index in range(len(names)) if index != class_index), key=lambda index: shares[index]
    )
    return {
        "pixels": int(matrix.sum()),
        "miou": round(100 * float(iou.nanmean()), 2),
        "iou": {name: round(100 * float(value), 2) for name, value in zip(names, iou) if not value.isnan()},
        "class_true_share": round(100 * float(row.sum() / matrix.sum()), 2),
        "class_predicted_share": round(100 * float(matrix[:, class_index].sum() / matrix.sum()), 2),
        "class_most_confused_with": names[confused],
        "class_share_predicted_as_it": round(100 * float(shares[confused]), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", required=True, help="Run folders (model + cps_recipe.json).")
    parser.add_argument("--dataset_name", required=True, help="The runs' save_to_disk dataset folder.")
    parser.add_argument("--class_name", default="Tree", help="The class whose confusions are reported.")
    parser.add_argument("--output", help="JSON file for the report (default: print only).")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    dataset = load_from_disk(args.dataset_name)
    report = {"dataset": args.dataset_name, "class_name": args.class_name, "runs": {}}
    for run in args.runs:
        run_dir = Path(run)
        model = load_model(run).eval()
        names = [model.config.id2label[index] for index in range(model.config.num_labels)]
        class_index = names.index(args.class_name)
        mean, std = load_image_normalization(run)
        num_labels = len(names)
        matrices = defaultdict(lambda: torch.zeros(num_labels, num_labels, dtype=torch.long))  # noqa: B023
        for group, rows in frame_groups(run_dir, dataset).items():
            for split, row in rows:
                item = dataset[split][row]
                prediction = predict_segmentation(model, item["image"], image_mean=mean, image_std=std)
                labels = decode_mask(item["label"], f"{split} row {row}")
                matrix = confusion_matrix(prediction[None], labels[None], len(names)).cpu()
                matrices[group] += matrix
                matrices[group.split("/")[0]] += matrix  # the part's total, all sequences
        report["runs"][run_dir.name] = groups = {}
        for group in sorted(matrices):
            groups[group] = group_report(matrices[group], names, class_index)
            print(
                f"{run_dir.name:28s} {group:26s} mIoU {groups[group]['miou']:5.2f}  {args.class_name} IoU "
                f"{groups[group]['iou'].get(args.class_name, float('nan')):5.2f}  true/predicted share "
                f"{groups[group]['class_true_share']:5.2f}/{groups[group]['class_predicted_share']:5.2f}  "
                f"→ {groups[group]['class_most_confused_with']} {groups[group]['class_share_predicted_as_it']:5.2f}"
            )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
