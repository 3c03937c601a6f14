"""Convert a segmentation dataset on disk to a `save_to_disk` folder that `scripts/train_cps.py` reads.

    python scripts/prepare_dataset.py voc --source VOCdevkit --output data/voc
    python scripts/prepare_dataset.py cityscapes --source cityscapes --output data/cityscapes
    python scripts/prepare_dataset.py camvid --source ../shared/datasets/camvid --output data/camvid
    python scripts/prepare_dataset.py camvid --source ../shared/datasets/camvid --output data/camvid-180x240 --downscale 2
    python scripts/prepare_dataset.py folder --source images/ --masks masks/ --class_names background cat dog \\
        --split train --output data/pets --parquet --push_to_hub me/pets --private

The class names are stored in each split's `info.description` (and in `id2label.json` next to the parquet files and
in a pushed Hub repo), so training needs no `--class_names`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cps_hf.data.converters import (
    convert_camvid,
    convert_cityscapes,
    convert_folder,
    convert_voc,
    downscale_dataset,
    push_dataset_to_hub,
    save_dataset,
)

CONVERTERS = {"voc": convert_voc, "cityscapes": convert_cityscapes, "camvid": convert_camvid}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("layout", choices=[*CONVERTERS, "folder"], help="Source layout.")
    parser.add_argument(
        "--source",
        type=Path,
        required=True,
        help="VOCdevkit, Cityscapes or CamVid folder, or the images folder.",
    )
    parser.add_argument("--output", type=Path, required=True, help="Output folder (save_to_disk).")
    parser.add_argument("--masks", type=Path, default=None, help="Masks folder (layout 'folder').")
    parser.add_argument(
        "--class_names",
        nargs="+",
        default=None,
        help="Class names in id order (layout 'folder'; default: inferred).",
    )
    parser.add_argument("--split", default="train", help="Split name (layout 'folder').")
    parser.add_argument("--parquet", action="store_true", help="Also write <output>/parquet/<split>.parquet.")
    parser.add_argument(
        "--downscale",
        type=int,
        default=1,
        help="Shrink images and masks by this integer factor (CPU-sized data).",
    )
    parser.add_argument(
        "--push_to_hub", metavar="REPO_ID", default=None, help="Also upload to this Hub dataset repo."
    )
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    args = parser.parse_args(argv)
    if args.layout == "folder" and args.masks is None:
        parser.error("layout 'folder' needs --masks.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.layout == "folder":
        dataset_dict = convert_folder(args.source, args.masks, args.class_names, split=args.split)
    else:
        dataset_dict = CONVERTERS[args.layout](args.source)
    dataset_dict = downscale_dataset(dataset_dict, args.downscale)
    save_dataset(dataset_dict, args.output, parquet=args.parquet)
    for split, dataset in dataset_dict.items():
        print(f"{split}: {len(dataset)} rows")
    print(f"Saved to {args.output} in {time.perf_counter() - start:.1f} s")
    if args.push_to_hub is not None:
        push_dataset_to_hub(dataset_dict, args.push_to_hub, private=args.private)
        print(f"Pushed to the Hub dataset {args.push_to_hub}")


if __name__ == "__main__":
    main()
