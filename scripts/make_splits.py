"""Write seeded labelled/unlabelled split files (one id per line, the official VOC format) for any dataset.

    python scripts/make_splits.py --dataset data/camvid --split train --fractions 1/16 1/8 1/4 1/2 --seed 0 \\
        --output splits/camvid

writes `labeled_1-16.txt` / `unlabeled_1-16.txt` ... and `splits.json` (seed, counts, SHA-256 of each labelled
file). Train with `--labeled_ids_file splits/camvid/labeled_1-8.txt`: the rows are the same as with
`--labeled_fraction 0.125 --split_seed 0`. Partitions of different fractions are drawn independently (not nested).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cps_hf.data import (
    get_split,
    load_segmentation_dataset,
    make_labeled_partitions,
    parse_fraction,
    write_labeled_partitions,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset", required=True, help="A save_to_disk/parquet/imagefolder folder or Hub id."
    )
    parser.add_argument("--split", default="train", help="The split to partition.")
    parser.add_argument(
        "--fractions",
        nargs="+",
        type=parse_fraction,
        default=[parse_fraction(f"1/{d}") for d in (16, 8, 4, 2)],
        help="Labelled fractions, e.g. 1/16 1/8 or 0.05 (default: 1/16 1/8 1/4 1/2).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the draws (the training --split_seed).")
    parser.add_argument("--id_column", default="id", help="Column of sample ids (default: 'id').")
    parser.add_argument("--output", type=Path, required=True, help="Folder for the split files.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dataset = get_split(load_segmentation_dataset(args.dataset), args.split, args.dataset)
    partitions = make_labeled_partitions(
        dataset, args.fractions, split_seed=args.seed, id_column=args.id_column
    )
    files = write_labeled_partitions(partitions, args.output)
    manifest = {
        "dataset": args.dataset,
        "split": args.split,
        "id_column": args.id_column,
        "num_rows": len(dataset),
        "seed": args.seed,
        "partitions": files,
    }
    (args.output / "splits.json").write_text(json.dumps(manifest, indent=2))
    for tag, entry in files.items():
        print(
            f"{tag}: {entry['num_labeled']} labelled / {entry['num_unlabeled']} unlabelled -> {entry['labeled_file']}"
        )


if __name__ == "__main__":
    main()
