"""Write the paper's experiment configs, one YAML file per cell of the CPS paper's tables.

    python scripts/configs/generate_paper_configs.py                 # rewrites scripts/configs/{voc,cityscapes}/
    python scripts/configs/generate_paper_configs.py --readme_table  # prints the README's "Paper recipes" tables

The committed files are this script's output (`tests/test_paper_configs.py` regenerates them and compares): change
a recipe here, never in a generated file, so no two cells can drift apart. See `docs/recipes.md` for where each
number comes from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIG_ROOT = Path(__file__).resolve().parent
SPLITS = ("1-16", "1-8", "1-4", "1-2")
BACKBONES = {"r50": "resnet50s", "r101": "resnet101s"}
VARIANTS = ("cps", "cps_cutmix", "supervised")
GLOBAL_BATCH_SIZE = 8
# The official weight decay, applied inside SGD at the official (nominal) learning rate.
OFFICIAL_WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class DatasetRecipe:
    """The paper's recipe for one dataset (see docs/recipes.md)."""

    name: str
    title: str
    num_labels: int
    num_train: int
    labeled_counts: dict[str, int]
    epochs: dict[str, int]
    crop_size: int
    cps_weight: float
    cutmix_cps_weight: float
    supervised_loss: str
    # Official learning rate and number of GPUs; their ratio is the step size the official code really took.
    nominal_learning_rate: float
    official_world_size: int
    # Official OHEM keeps at least this many pixels per GPU, which held one labelled image.
    ohem_min_kept_per_image: int = 50_000
    ohem_threshold: float = 0.7

    def max_steps(self, split: str) -> int:
        """Epochs × iterations per epoch, an epoch being max(#labelled, #unlabelled) // global batch."""
        num_labeled = self.labeled_counts[split]
        iterations_per_epoch = max(num_labeled, self.num_train - num_labeled) // GLOBAL_BATCH_SIZE
        return self.epochs[split] * iterations_per_epoch

    @property
    def learning_rate(self) -> float:
        return self.nominal_learning_rate / self.official_world_size

    @property
    def weight_decay(self) -> float:
        return OFFICIAL_WEIGHT_DECAY * self.official_world_size


DATASETS = {
    "voc": DatasetRecipe(
        name="voc",
        title="PASCAL VOC 2012 (train_aug)",
        num_labels=21,
        num_train=10_582,
        labeled_counts={"1-16": 662, "1-8": 1323, "1-4": 2646, "1-2": 5291},
        epochs={"1-16": 32, "1-8": 34, "1-4": 40, "1-2": 60},
        crop_size=512,
        cps_weight=1.5,
        cutmix_cps_weight=1.0,
        supervised_loss="ce",
        nominal_learning_rate=0.01,
        official_world_size=4,
    ),
    "cityscapes": DatasetRecipe(
        name="cityscapes",
        title="Cityscapes (fine train)",
        num_labels=19,
        num_train=2975,
        labeled_counts={"1-16": 186, "1-8": 372, "1-4": 744, "1-2": 1488},
        epochs={"1-16": 128, "1-8": 137, "1-4": 160, "1-2": 240},
        crop_size=800,
        cps_weight=6.0,
        cutmix_cps_weight=5.0,
        supervised_loss="ohem",
        nominal_learning_rate=0.02,
        official_world_size=8,
    ),
}

# Val mIoU (%) reported by the paper, as strings: `?` marks a number nobody here could confirm, a lone `?` a cell
# whose number is unknown, `None` a cell for which the project's notes on the paper hold no number.
PAPER_MIOU: dict[tuple[str, str, str], tuple[str | None, str | None, str | None, str | None]] = {
    ("voc", "r50", "cps"): ("68.21", "73.20", "74.24?", "75.91?"),
    ("voc", "r50", "cps_cutmix"): ("71.98?", "73.67", "74.90?", "76.15?"),
    ("voc", "r50", "supervised"): ("?", "69.43", "?", "?"),
    ("voc", "r101", "cps"): ("72.18", "75.83?", "77.55?", "78.64?"),
    ("voc", "r101", "cps_cutmix"): ("74.48?", "76.44?", "77.68?", "78.64?"),
    ("voc", "r101", "supervised"): ("?", "72.21", "?", "?"),
    ("cityscapes", "r50", "cps"): ("69.79?", "74.39", "76.85?", "78.64?"),
    ("cityscapes", "r50", "cps_cutmix"): ("74.47?", "76.61?", "77.83?", "78.77"),
    ("cityscapes", "r50", "supervised"): (None, None, None, None),
    ("cityscapes", "r101", "cps"): (None, None, None, None),
    ("cityscapes", "r101", "cps_cutmix"): ("74.72", "77.62", "79.21", "80.21"),
    ("cityscapes", "r101", "supervised"): (None, None, None, None),
}

VARIANT_TITLES = {"cps": "CPS", "cps_cutmix": "CPS + CutMix", "supervised": "supervised only"}


def cell_name(backbone: str, split: str, variant: str) -> str:
    return f"{backbone}_{split}_{variant}"


def paper_miou(dataset: str, backbone: str, split: str, variant: str) -> str | None:
    return PAPER_MIOU[(dataset, backbone, variant)][SPLITS.index(split)]


def describe_paper_miou(paper: str | None) -> str:
    if paper is None:
        return "none on record for this cell."
    if paper == "?":
        return "? (unknown)."
    return f"{paper} (`?`: unconfirmed)." if paper.endswith("?") else f"{paper}."


def cell_values(
    dataset: str, backbone: str, split: str, variant: str
) -> list[tuple[list[str], dict[str, Any]]]:
    """The arguments of one cell, in commented groups: `[(comment_lines, {argument: value}), ...]`."""
    recipe = DATASETS[dataset]
    supervised_only = variant == "supervised"
    cutmix = variant == "cps_cutmix"
    if supervised_only:
        cps_weight = 0.0
    else:
        cps_weight = recipe.cutmix_cps_weight if cutmix else recipe.cps_weight
    ohem = recipe.supervised_loss == "ohem"
    batch_description = "8 labelled" if supervised_only else "8 labelled + 8 unlabelled"
    supervised_loss: dict[str, Any] = {"supervised_loss": recipe.supervised_loss}
    if ohem:
        supervised_loss.update(
            ohem_threshold=recipe.ohem_threshold,
            ohem_min_kept=recipe.ohem_min_kept_per_image * GLOBAL_BATCH_SIZE,
        )
    return [
        (
            [
                "Data: the output of `scripts/prepare_dataset.py` and the official labelled list (not bundled:",
                "see docs/recipes.md).",
            ],
            {
                "dataset_name": f"data/{dataset}",
                "train_split": "train",
                "eval_split": "validation",
                "labeled_ids_file": f"data/splits/{dataset}/train_aug_labeled_{split}.txt",
                "num_labels": recipe.num_labels,
                "crop_size": recipe.crop_size,
                "scales": [0.5, 0.75, 1.0, 1.5, 1.75, 2.0],
            },
        ),
        (
            [
                "Network: DeepLabv3+ on a deep-stem ResNet, output stride 16 (layer-4 dilations 2/4/8), ImageNet weights."
            ],
            {
                "backbone": BACKBONES[backbone],
                "pretrained_backbone": True,
                "output_stride": 16,
                "multi_grid": [1, 2, 4],
                "aspp_dilation_rates": [6, 12, 18],
                "aspp_channels": 256,
                "low_level_channels": 48,
                "decoder_channels": 256,
                "num_branches": 2,
                "inference_branch": "0",
                "share_backbone_initialization": True,
            },
        ),
        (
            [
                f"Method: λ {recipe.cps_weight:g} (plain) / {recipe.cutmix_cps_weight:g} (CutMix); CutMix pseudo-labels "
                "from train-mode BatchNorm, as the official code."
            ],
            {
                "supervised_only": supervised_only,
                "cutmix": cutmix,
                "cps_weight": cps_weight,
                **supervised_loss,
                "pseudo_label_mode": "train",
            },
        ),
        (
            [
                f"Optimisation: global batch {batch_description}, on one GPU. With N GPUs set",
                "per_device_train_batch_size to 8 / N"
                + (
                    " and ohem_min_kept to 50000 x 8 / N (official: 50000 per GPU holding one image)."
                    if ohem
                    else "."
                ),
                f"lr {recipe.nominal_learning_rate} / {recipe.official_world_size} and weight decay "
                f"{OFFICIAL_WEIGHT_DECAY} x {recipe.official_world_size}: the official step under mean-loss DDP.",
            ],
            {
                "per_device_train_batch_size": GLOBAL_BATCH_SIZE,
                "gradient_accumulation_steps": 1,
                "dataloader_drop_last": True,
                "max_steps": recipe.max_steps(split),
                "learning_rate": recipe.learning_rate,
                "weight_decay": recipe.weight_decay,
                "optim": "sgd",
                "optim_args": "momentum=0.9",
                "lr_scheduler_type": "polynomial",
                "lr_scheduler_kwargs": {"power": 0.9, "lr_end": 0.0},
                "warmup_steps": 0,
                "max_grad_norm": 0.0,
                "seed": 0,
            },
        ),
        (
            [
                "Bookkeeping. In-training evaluation is whole-image; the paper's protocol is the command at the top."
            ],
            {
                "output_dir": f"outputs/{dataset}/{cell_name(backbone, split, variant)}",
                "eval_strategy": "steps",
                "eval_steps": 4000,
                "per_device_eval_batch_size": 1,
                "save_strategy": "steps",
                "save_steps": 4000,
                "save_total_limit": 2,
                "logging_steps": 50,
                "dataloader_num_workers": 8,
                "report_to": "none",
            },
        ),
    ]


def render_cell(dataset: str, backbone: str, split: str, variant: str) -> str:
    """The YAML text of one cell's config file."""
    recipe = DATASETS[dataset]
    name = cell_name(backbone, split, variant)
    relative_path = f"scripts/configs/{dataset}/{name}.yaml"
    num_labeled = recipe.labeled_counts[split]
    paper = paper_miou(dataset, backbone, split, variant)
    lines = [
        "# Generated by scripts/configs/generate_paper_configs.py: edit the generator, not this file.",
        f"# CPS paper cell: {recipe.title}, {BACKBONES[backbone]}, {split.replace('-', '/')} labelled "
        f"({num_labeled} of {recipe.num_train}), {VARIANT_TITLES[variant]}.",
        f"# Paper val mIoU: {describe_paper_miou(paper)}",
        "# Train (one GPU; for N GPUs see the optimisation comment below):",
        f"#   accelerate launch scripts/train_cps.py {relative_path}",
        "# Paper evaluation protocol (branch 0, sliding window, single scale):",
        f"#   python scripts/evaluate_cps.py --model outputs/{dataset}/{name} --dataset_name data/{dataset} "
        f"--mode slide --crop_size {recipe.crop_size} --branches 0",
    ]
    for comment_lines, values in cell_values(dataset, backbone, split, variant):
        lines.append("")
        lines.extend(f"# {line}" for line in comment_lines)
        lines.extend(f"{key}: {_yaml_value(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    # One line per argument: lists and mappings in flow style, scalars without YAML's document-end marker.
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def all_cells() -> list[tuple[str, str, str, str]]:
    return [
        (dataset, backbone, split, variant)
        for dataset in DATASETS
        for backbone in BACKBONES
        for split in SPLITS
        for variant in VARIANTS
    ]


def write_configs(output_root: Path) -> list[Path]:
    """Writes every cell's config under `output_root/<dataset>/`; returns the written paths."""
    written = []
    for dataset, backbone, split, variant in all_cells():
        path = output_root / dataset / f"{cell_name(backbone, split, variant)}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_cell(dataset, backbone, split, variant), encoding="utf-8")
        written.append(path)
    return written


def readme_tables() -> str:
    """The README's per-dataset tables: config file, paper mIoU, mIoU measured here."""
    blocks = []
    for dataset, recipe in DATASETS.items():
        rows = [
            f"**{recipe.title}** (val mIoU %)",
            "",
            "| cell | config | paper | measured here |",
            "|---|---|---|---|",
        ]
        for backbone in BACKBONES:
            for variant in VARIANTS:
                for split in SPLITS:
                    name = cell_name(backbone, split, variant)
                    paper = paper_miou(dataset, backbone, split, variant)
                    cell = f"{BACKBONES[backbone]} {split.replace('-', '/')} {VARIANT_TITLES[variant]}"
                    config = f"[`{dataset}/{name}.yaml`](scripts/configs/{dataset}/{name}.yaml)"
                    rows.append(f"| {cell} | {config} | {paper if paper is not None else 'not listed'} | — |")
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output_root", type=Path, default=CONFIG_ROOT, help="Folder that receives voc/ and cityscapes/."
    )
    parser.add_argument("--readme_table", action="store_true", help="Print the README tables instead.")
    args = parser.parse_args(argv)
    if args.readme_table:
        print(readme_tables(), end="")
        return
    written = write_configs(args.output_root)
    print(f"Wrote {len(written)} configs under {args.output_root}")


if __name__ == "__main__":
    main()
