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
