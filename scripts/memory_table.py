"""The memory table of the paper's recipes: predicted peak memory per device of one CPS + CutMix training step.

    python scripts/memory_table.py [--output_dir docs/memory]

ResNet-50/101 (deep stem) × crop 512 (the VOC configs) / 800 (the Cityscapes configs) × batch per device 1, 2, 4, 8
× fp32 / bf16 × gradient checkpointing off / on (when the model supports it), each estimated by
`cps_hf.memory.estimate_training_memory` from the 1/8 CPS + CutMix config with the batch overridden (Cityscapes:
`--ohem_min_kept 50000 × batch`, as docs/recipes.md prescribes for fewer images per device); plus the step variants
at one setting. Writes `paper_configs.json` (every estimate) and `paper_configs.md` (the tables) to `--output_dir`.
"""

import argparse
import json
import time
from pathlib import Path

from cps_hf import CPSForSemanticSegmentation
from cps_hf.memory import estimate_training_memory, parse_estimation_arguments

CONFIGS = {
    ("resnet50s", 512): "scripts/configs/voc/r50_1-8_cps_cutmix.yaml",
    ("resnet50s", 800): "scripts/configs/cityscapes/r50_1-8_cps_cutmix.yaml",
    ("resnet101s", 512): "scripts/configs/voc/r101_1-8_cps_cutmix.yaml",
    ("resnet101s", 800): "scripts/configs/cityscapes/r101_1-8_cps_cutmix.yaml",
}
BATCH_SIZES = (1, 2, 4, 8)
PRECISIONS = ("fp32", "bf16")
# The step variants, compared at one setting: ResNet-101, crop 800, batch 2 per device, fp32.
VARIANT_SETTING = ("resnet101s", 800, 2)
VARIANTS = {
    "supervised only": ["--supervised_only", "true", "--cutmix", "false"],
    "CPS": ["--cutmix", "false"],
    "CPS + CutMix": [],
    "CPS + CutMix, fused step": ["--fused_forward", "true"],
}


def cell_arguments(
    backbone: str, crop: int, batch_size: int, precision: str, checkpointing: bool
) -> list[str]:
    argv = [
        CONFIGS[backbone, crop],
        "--per_device_train_batch_size",
        str(batch_size),
        "--bf16",
        str(precision == "bf16").lower(),
        "--gradient_checkpointing",
        str(checkpointing).lower(),
    ]
    if crop == 800:
        argv += ["--ohem_min_kept", str(50_000 * batch_size)]
    return argv


def estimate(argv: list[str]) -> dict:
    start = time.perf_counter()
    result = estimate_training_memory(*parse_estimation_arguments(argv)[:3]).to_dict()
    return {"argv": argv, **result, "estimate_seconds": round(time.perf_counter() - start, 1)}


def gib(estimate_row: dict) -> str:
    return f"{estimate_row['peak_bytes'] / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=Path("docs/memory"))
    args = parser.parse_args()
    checkpointing_options = (
        (False, True) if CPSForSemanticSegmentation.supports_gradient_checkpointing else (False,)
    )
    columns = [
        (precision, checkpointing) for checkpointing in checkpointing_options for precision in PRECISIONS
    ]
    grid, lines = [], []
    header = ["backbone", "crop (configs)", "images / device"] + [
        f"{precision}{' + checkpointing' if checkpointing else ''} (GiB)"
        for precision, checkpointing in columns
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for backbone, crop in CONFIGS:
        for batch_size in BATCH_SIZES:
            cells = []
            for precision, checkpointing in columns:
                row = estimate(cell_arguments(backbone, crop, batch_size, precision, checkpointing))
                print(
                    f"{backbone} {crop} batch {batch_size} {precision} checkpointing={checkpointing}: {gib(row)} GiB"
                )
                grid.append(row)
                cells.append(gib(row))
            dataset = "VOC" if crop == 512 else "Cityscapes"
            batch = "1 (Sync-BN)" if batch_size == 1 else str(batch_size)
            lines.append(f"| {backbone} | {crop} ({dataset}) | {batch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Sync-BN: one image per device trains only on several GPUs, where BatchNorm is synchronised (train-mode "
        "BatchNorm refuses the single value per channel of the ASPP's image pooling).",
    ]
    backbone, crop, batch_size = VARIANT_SETTING
    variants = []
    lines += ["", f"Step variants, {backbone}, crop {crop}, batch {batch_size} per device, fp32:", ""]
    lines += ["| step | GiB |", "|---|---|"]
    for name, flags in VARIANTS.items():
        row = estimate(cell_arguments(backbone, crop, batch_size, "fp32", False) + flags)
        variants.append({"variant": name, **row})
        lines.append(f"| {name} | {gib(row)} |")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "paper_configs.json").write_text(
        json.dumps({"grid": grid, "variants": variants}, indent=2) + "\n"
    )
    (args.output_dir / "paper_configs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
