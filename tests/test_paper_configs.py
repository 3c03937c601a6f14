"""Every cell of the CPS paper has a launchable config carrying the paper's recipe (parsing only, no model build)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cps_hf.data.synthetic import SYNTHETIC_CLASS_NAMES, make_synthetic_segmentation_dataset
from cps_hf.experiment import parse_experiment_arguments, run_experiment

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO_ROOT / "scripts" / "configs"
OFFICIAL_SPLITS = REPO_ROOT.parent / "shared" / "datasets" / "cps-splits"

SPLITS = ("1-16", "1-8", "1-4", "1-2")
BACKBONES = {"r50": "resnet50s", "r101": "resnet101s"}
VARIANTS = ("cps", "cps_cutmix", "supervised")
CELLS = [
    (dataset, backbone, split, variant)
    for dataset in ("voc", "cityscapes")
    for backbone in BACKBONES
    for split in SPLITS
    for variant in VARIANTS
]

# The iteration budget, recomputed here independently of the generator. The official code runs
# `epochs × (max(#labelled, #unlabelled) // 8)` iterations, the unlabelled set being the rest of the training set.
NUM_TRAIN = {"voc": 10_582, "cityscapes": 2975}
NUM_LABELED = {
    "voc": {"1-16": 662, "1-8": 1323, "1-4": 2646, "1-2": 5291},
    "cityscapes": {"1-16": 186, "1-8": 372, "1-4": 744, "1-2": 1488},
}
EPOCHS = {
    "voc": {"1-16": 32, "1-8": 34, "1-4": 40, "1-2": 60},
    "cityscapes": {"1-16": 128, "1-8": 137, "1-4": 160, "1-2": 240},
}
# VOC:        32 × (9920 // 8 = 1240), 34 × (9259 // 8 = 1157), 40 × (7936 // 8 = 992), 60 × (5291 // 8 = 661)
# Cityscapes: 128 × (2789 // 8 = 348), 137 × (2603 // 8 = 325), 160 × (2231 // 8 = 278), 240 × (1488 // 8 = 186)
EXPECTED_MAX_STEPS = {
    "voc": {"1-16": 39_680, "1-8": 39_338, "1-4": 39_680, "1-2": 39_660},
    "cityscapes": {"1-16": 44_544, "1-8": 44_525, "1-4": 44_480, "1-2": 44_640},
}

LAMBDA = {"voc": {"cps": 1.5, "cps_cutmix": 1.0}, "cityscapes": {"cps": 6.0, "cps_cutmix": 5.0}}
CROP_SIZE = {"voc": 512, "cityscapes": 800}
NUM_LABELS = {"voc": 21, "cityscapes": 19}
# lr_nominal / W and W × 1e-4 (tests/test_lr_equivalence.py checks that these reproduce the official steps).
WEIGHT_DECAY = {"voc": 4e-4, "cityscapes": 8e-4}


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "generate_paper_configs", CONFIG_ROOT / "generate_paper_configs.py"
    )
    module = importlib.util.module_from_spec(spec)
    # Registered first: its dataclasses look their module up while being created.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def config_path(dataset: str, backbone: str, split: str, variant: str) -> Path:
    return CONFIG_ROOT / dataset / f"{backbone}_{split}_{variant}.yaml"


def test_every_paper_cell_has_exactly_one_config():
    expected = {config_path(*cell) for cell in CELLS}
    committed = set(CONFIG_ROOT.glob("voc/*.yaml")) | set(CONFIG_ROOT.glob("cityscapes/*.yaml"))
    assert len(expected) == 48
    assert committed == expected


def test_committed_configs_are_the_generator_output(tmp_path):
    written = load_generator().write_configs(tmp_path)
    assert len(written) == 48
    for path in written:
        committed = CONFIG_ROOT / path.relative_to(tmp_path)
        assert committed.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"{committed} differs from the generator: run scripts/configs/generate_paper_configs.py"
        )


def test_max_steps_follow_the_official_epochs():
    for dataset, counts in NUM_LABELED.items():
        for split, num_labeled in counts.items():
            iterations_per_epoch = max(num_labeled, NUM_TRAIN[dataset] - num_labeled) // 8
            assert EPOCHS[dataset][split] * iterations_per_epoch == EXPECTED_MAX_STEPS[dataset][split]


def read_list_ids(path: Path) -> set[str]:
    return {line.split("\t")[0] for line in path.read_text().splitlines() if line.strip()}


@pytest.mark.skipif(not OFFICIAL_SPLITS.is_dir(), reason="official split lists not available on this machine")
def test_official_lists_split_the_training_set_as_counted():
    # The configs' unlabelled set is the rest of the training split: the official unlabelled lists are exactly that.
    for dataset, folder in (("voc", "voc"), ("cityscapes", "cityscapes/subset_train")):
        for split, num_labeled in NUM_LABELED[dataset].items():
            labeled = read_list_ids(OFFICIAL_SPLITS / folder / f"train_aug_labeled_{split}.txt")
            unlabeled = read_list_ids(OFFICIAL_SPLITS / folder / f"train_aug_unlabeled_{split}.txt")
            assert len(labeled) == num_labeled
            assert len(unlabeled) == NUM_TRAIN[dataset] - num_labeled
            assert not labeled & unlabeled


@pytest.mark.parametrize("dataset, backbone, split, variant", CELLS, ids=["/".join(cell) for cell in CELLS])
def test_paper_config_carries_the_recipe(dataset, backbone, split, variant):
    model_args, data_args, training_args, _ = parse_experiment_arguments(
        [str(config_path(dataset, backbone, split, variant))]
    )

    # The official network, whatever the built-in demo config (tiny backbone, slim heads) says.
    assert model_args.backbone == BACKBONES[backbone]
    assert model_args.pretrained_backbone is True
    assert model_args.model_name_or_path is None
    assert model_args.output_stride == 16
    assert model_args.multi_grid == [1, 2, 4]
    assert model_args.aspp_dilation_rates == [6, 12, 18]
    assert (model_args.aspp_channels, model_args.low_level_channels, model_args.decoder_channels) == (
        256,
        48,
        256,
    )
    assert model_args.num_branches == 2
    assert model_args.inference_branch == 0
    assert model_args.share_backbone_initialization is True

    assert data_args.dataset_name == f"data/{dataset}"
    assert (data_args.train_split, data_args.eval_split) == ("train", "validation")
    assert data_args.labeled_ids_file == f"data/splits/{dataset}/train_aug_labeled_{split}.txt"
    assert data_args.labeled_fraction is None and data_args.labeled_count is None
    assert data_args.num_labels == NUM_LABELS[dataset]
    assert data_args.crop_size == [CROP_SIZE[dataset]] * 2
    assert data_args.scales == [0.5, 0.75, 1.0, 1.5, 1.75, 2.0]

    assert training_args.supervised_only is (variant == "supervised")
    assert training_args.cutmix is (variant == "cps_cutmix")
    if variant != "supervised":
        assert training_args.cps_weight == LAMBDA[dataset][variant]
    assert training_args.pseudo_label_mode == "train"
    if dataset == "cityscapes":
        assert training_args.supervised_loss == "ohem"
        assert training_args.ohem_threshold == 0.7
        # 50,000 pixels per image: the official per-GPU minimum with one labelled image per GPU.
        assert training_args.ohem_min_kept == 50_000 * training_args.per_device_train_batch_size
    else:
        assert training_args.supervised_loss == "ce"

    # Global batch 8 (+ 8 unlabelled) on one process, every step a full batch.
    assert training_args.world_size == 1
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 8
    assert training_args.dataloader_drop_last is True
    assert training_args.max_steps == EXPECTED_MAX_STEPS[dataset][split]

    assert training_args.optim == "sgd"
    assert training_args.optim_args == "momentum=0.9"
    assert training_args.learning_rate == pytest.approx(0.0025)
    assert training_args.weight_decay == pytest.approx(WEIGHT_DECAY[dataset])
    assert training_args.lr_scheduler_type == "polynomial"
    assert training_args.lr_scheduler_kwargs == {"power": 0.9, "lr_end": 0.0}
    assert training_args.warmup_steps == 0
    assert training_args.max_grad_norm == 0.0
    assert training_args.bf16 is False and training_args.fp16 is False
    assert training_args.overwrite_output_dir is False
    assert training_args.output_dir == f"outputs/{dataset}/{backbone}_{split}_{variant}"


def test_readme_lists_every_config_with_its_paper_number():
    readme = (REPO_ROOT / "README.md").read_text()
    assert load_generator().readme_tables() in readme


@pytest.fixture(scope="module")
def stand_in_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dataset saved as `scripts/prepare_dataset.py` saves one, and a labelled list in the official format."""
    root = tmp_path_factory.mktemp("stand_in")
    splits = make_synthetic_segmentation_dataset(
        num_train=8, num_val=2, image_size=32, cache_dir=str(root / "cache")
    )
    splits.save_to_disk(str(root / "dataset"))
    labeled_list = root / "train_aug_labeled_1-8.txt"
    labeled_list.write_text("".join(f"{sample_id}\n" for sample_id in splits["train"]["id"][:2]))
    return root / "dataset", labeled_list


@pytest.mark.parametrize(
    "config", ["cityscapes/r50_1-8_cps_cutmix", "voc/r101_1-16_cps", "voc/r50_1-2_supervised"]
)
def test_paper_config_runs_end_to_end_on_a_stand_in(tmp_path, stand_in_dataset, config):
    """Every argument of a paper config works together (evaluation and saving every `eval_steps`, OHEM, CutMix,
    full batches only): only the data, the network's size and the budget are swapped for tiny ones."""
    dataset_dir, labeled_list = stand_in_dataset
    argv = [
        str(CONFIG_ROOT / f"{config}.yaml"),
        *("--dataset_name", str(dataset_dir), "--labeled_ids_file", str(labeled_list)),
        # The stand-in names its own classes; the config's 19/21 would (rightly) be refused as a mismatch.
        *("--num_labels", str(len(SYNTHETIC_CLASS_NAMES))),
        *("--backbone", "test_resnet", "--pretrained_backbone", "false", "--multi_grid", "null"),
        *("--crop_size", "32", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0"),
        *("--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1"),
        *("--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--disable_tqdm", "true"),
    ]
    model_args, data_args, training_args, _ = parse_experiment_arguments(argv)
    results = run_experiment(model_args, data_args, training_args)
    assert 0.0 <= results["eval_mean_iou"] <= 1.0
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").exists()
    recipe = json.loads((tmp_path / "run" / "cps_recipe.json").read_text())
    assert recipe["num_labeled"] == 2
    assert recipe["num_unlabeled"] == (0 if config.endswith("supervised") else 6)
    assert recipe["training"]["weight_decay"] == training_args.weight_decay
    log = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert ("loss_cps" in log[0]) is not config.endswith("supervised")
