import json
from pathlib import Path

import pytest
from helpers import run_script


def write_run(runs_dir: Path, name: str, miou: float, ensemble: float, pole_iou: float) -> None:
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    branch_0 = {"mean_iou": miou, "iou_Sky": 0.9, "iou_Pole": pole_iou, "iou_Never": None}
    evaluation = {
        "split": "validation",
        "num_images": 101,
        "protocol": {"mode": "whole"},
        "results": {"branch_0": branch_0, "ensemble": {"mean_iou": ensemble}},
    }
    (run_dir / "eval.json").write_text(json.dumps(evaluation))
    (run_dir / "all_results.json").write_text(json.dumps({"train_runtime": 61.25}))
    (run_dir / "trainer_state.json").write_text(json.dumps({"global_step": 1500}))


def test_results_summarise_every_variant_over_seeds(tmp_path):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "supervised-seed0", 0.30, 0.31, 0.0)
    write_run(runs_dir, "supervised-seed1", 0.32, 0.33, 0.1)
    write_run(runs_dir, "cps_cutmix-seed0", 0.35, 0.37, 0.2)
    (runs_dir / "cps-seed0").mkdir()  # unfinished: no eval.json, left out
    (runs_dir / "notes").mkdir()
    config = tmp_path / "camvid.yaml"
    config.write_text("dataset_name: data/camvid-90x120\nlabeled_fraction: 0.125\nsplit_seed: 0\n")
    output = tmp_path / "results.json"

    run_script(
        "camvid_results", "--runs_dir", str(runs_dir), "--config", str(config), "--output", str(output)
    )

    report = json.loads(output.read_text())
    assert [(run["variant"], run["seed"]) for run in report["runs"]] == [
        ("cps_cutmix", 0),
        ("supervised", 0),
        ("supervised", 1),
    ]
    assert report["runs"][1] | {"iou_branch0": None} == {
        "variant": "supervised",
        "seed": 0,
        "miou_branch0": 30.0,
        "miou_ensemble": 31.0,
        "steps": 1500,
        "seconds": 61.2,
        "iou_branch0": None,
    }
    supervised = report["summary"]["supervised"]
    assert (supervised["mean"], supervised["n"]) == (31.0, 2)
    assert supervised["std"] == pytest.approx(1.41, abs=0.01)  # sample std of 30 and 32
    assert supervised["ensemble"]["mean"] == 32.0
    assert supervised["iou_branch0"]["Pole"]["mean"] == 5.0 and "Never" not in supervised["iou_branch0"]
    assert report["summary"]["cps_cutmix"] | {"iou_branch0": None, "ensemble": None} == {
        "mean": 35.0,
        "std": 0.0,
        "n": 1,
        "iou_branch0": None,
        "ensemble": None,
    }
    assert report["protocol"]["evaluated_on"].startswith("validation split (101 frames)")


def test_results_without_finished_runs_fail_clearly(tmp_path):
    (tmp_path / "runs").mkdir()
    result = run_script(
        "camvid_results",
        "--runs_dir",
        str(tmp_path / "runs"),
        "--output",
        str(tmp_path / "r.json"),
        returncode=1,
    )
    assert "No finished run" in result.stderr


def test_sequence_report_splits_frames_by_part_and_sequence(tmp_path):
    import datasets
    import numpy as np
    from helpers import save_tiny_run

    from cps_hf.data.synthetic import SYNTHETIC_CLASS_NAMES

    run = save_tiny_run(tmp_path / "run")  # its recipe labels a quarter of the training rows
    rng = np.random.default_rng(0)

    def split(ids: list[str]) -> datasets.Dataset:
        images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in ids]
        masks = [rng.integers(0, len(SYNTHETIC_CLASS_NAMES), (16, 16), dtype=np.uint8) for _ in ids]
        masks[0][:4] = 255  # void pixels count nowhere
        features = datasets.Features(
            {"id": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Image()}
        )
        return datasets.Dataset.from_dict({"id": ids, "image": images, "label": masks}, features=features)

    train_ids = [f"{sequence}_{index:03d}" for sequence in ("AAA", "BBB") for index in range(4)]
    dataset = datasets.DatasetDict({"train": split(train_ids), "validation": split(["CCC_000", "CCC_001"])})
    dataset.save_to_disk(tmp_path / "data")
    class_name = SYNTHETIC_CLASS_NAMES[1]
    output = tmp_path / "sequences.json"

    run_script(
        "camvid_sequences",
        "--runs",
        str(run),
        "--dataset_name",
        str(tmp_path / "data"),
        "--class_name",
        class_name,
        "--output",
        str(output),
    )

    groups = json.loads(output.read_text())["runs"]["run"]
    parts = {"train-labelled", "train-unlabelled", "validation"}
    assert parts <= groups.keys() and "validation/CCC" in groups
    for part in parts:  # a part's pixels are its sequences' pixels
        assert groups[part]["pixels"] == sum(
            report["pixels"] for name, report in groups.items() if name.startswith(f"{part}/")
        )
    assert groups["train-labelled"]["pixels"] + groups["train-unlabelled"]["pixels"] == 8 * 256 - 64
    assert groups["validation"]["pixels"] == 2 * 256 - 64
    labels = np.stack([np.asarray(image) for image in dataset["validation"]["label"]])
    true_share = 100 * (labels == 1).sum() / (labels != 255).sum()
    assert groups["validation"]["class_true_share"] == pytest.approx(true_share, abs=0.01)
    assert 0 <= groups["validation"]["miou"] <= 100
