"""Two real CPU processes (gloo) through `accelerate launch`, checked against one process with the same global
batch: disjoint data shards, identical training, metrics reduced and logged once, only the main process writes.
Then a streamed unlabelled pool in two processes: disjoint parts of the stream, and an exact resume."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TWO_CPU_PROCESSES_LAUNCH, write_parquet_image_pool
from safetensors.torch import load_file

from cps_hf.data.synthetic import make_synthetic_segmentation_dataset
from tools.fault_injection import PROBE, REPO_ROOT, FaultLab, loss_history, same_weights

NUM_TRAIN, NUM_VAL, MAX_STEPS = 16, 5, 3
# 16 rows, 4 labelled: 12 items per epoch; 3 steps of 2 processes x 2 items visit each exactly once.
ITEMS_PER_EPOCH = 12


def launch_environment() -> dict[str, str]:
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("distributed")
    lab = FaultLab(workdir)
    cache_dir = workdir / "cache"
    make_synthetic_segmentation_dataset(
        num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=32, seed=0, cache_dir=str(cache_dir)
    )

    def argv(output_dir: Path, *extra: str) -> list[str]:
        return [
            str(lab.config_file),
            "--output_dir",
            str(output_dir),
            "--dataset_name",
            "synthetic",
            "--cache_dir",
            str(cache_dir),
            "--synthetic_num_train",
            str(NUM_TRAIN),
            "--synthetic_num_val",
            str(NUM_VAL),
            "--synthetic_image_size",
            "32",
            "--labeled_fraction",
            "0.25",
            "--eval_split",
            "validation",
            "--per_device_eval_batch_size",
            "2",
            "--max_steps",
            str(MAX_STEPS),
            "--save_steps",
            "2",
            *extra,
        ]

    environment = {**launch_environment(), "CPS_PROBE_RECORD_DIR": str(workdir / "records")}
    two_processes = workdir / "two-processes"
    launched = subprocess.run(
        [*TWO_CPU_PROCESSES_LAUNCH, str(PROBE), *argv(two_processes)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=workdir,
    )
    assert launched.returncode == 0, launched.stderr[-4000:]
    # The same global batch of 4 in one process: 2 accumulated micro-batches of 2, as each process's batch of 2.
    one_process = workdir / "one-process"
    lab.train(argv(one_process, "--gradient_accumulation_steps", "2"))
    # The two-process model evaluated by one process.
    evaluated = workdir / "evaluated-by-one-process"
    lab.train(argv(evaluated, "--model_name_or_path", str(two_processes), "--do_train", "false"))
    records = {rank: json.loads((workdir / "records" / f"rank-{rank}.json").read_text()) for rank in (0, 1)}
    return {
        "stdout": launched.stdout,
        "two_processes": two_processes,
        "one_process": one_process,
        "evaluated": evaluated,
        "records": records,
    }


def test_two_processes_train_exactly_like_one_process_with_the_same_global_batch(runs):
    two, one = (
        load_file(runs["two_processes"] / "model.safetensors"),
        load_file(runs["one_process"] / "model.safetensors"),
    )
    parameters = [name for name in two if "running_" not in name and "num_batches_tracked" not in name]
    assert len(parameters) > 100
    # Gradients averaged over 2 processes = over 2 accumulated micro-batches: identical on this machine (the
    # tolerance covers a different all-reduce summation order elsewhere).
    for name in parameters:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [entry["loss"] for entry in loss_history(runs["two_processes"])] == pytest.approx(
        [entry["loss"] for entry in loss_history(runs["one_process"])], rel=1e-5
    )
    recipe = json.loads((runs["two_processes"] / "cps_recipe.json").read_text())
    assert recipe["world_size"] == 2


def test_data_shards_do_not_overlap_and_cover_the_epoch(runs):
    items = {rank: runs["records"][rank]["items"] for rank in (0, 1)}
    assert all(len(rank_items) == MAX_STEPS * 2 for rank_items in items.values())
    indices = {rank: {index for _, index in rank_items} for rank, rank_items in items.items()}
    assert not indices[0] & indices[1]
    assert indices[0] | indices[1] == set(range(ITEMS_PER_EPOCH))


def test_metrics_are_reduced_once_and_logged_once(runs):
    stdout = runs["stdout"]
    assert len(re.findall(r"\{'loss': ", stdout)) == MAX_STEPS
    assert stdout.count("***** train metrics *****") == 1
    assert stdout.count("***** eval metrics *****") == 1
    assert stdout.count("val mIoU") == 1
    # 5 validation images over 2 processes (one padded batch): the gathered confusion matrix counts each image
    # once, so the metrics equal those of one process evaluating the same weights.
    two = json.loads((runs["two_processes"] / "eval_results.json").read_text())
    one = json.loads((runs["evaluated"] / "eval_results.json").read_text())
    matrix_metrics = [key for key in one if key.startswith(("eval_iou_", "eval_mean_", "eval_overall_"))]
    assert len(matrix_metrics) > 5
    for key in matrix_metrics:
        assert two[key] == pytest.approx(one[key], rel=1e-6, nan_ok=True), key


def test_only_the_main_process_writes_checkpoints_cards_and_results(runs):
    output_dir = str(runs["two_processes"])

    def writes(rank: int) -> list[tuple[str, str]]:
        return [(event, path) for event, path in runs["records"][rank]["writes"] if output_dir in path]

    main_paths = {path for _, path in writes(0)}
    for name in (
        "README.md",
        "all_results.json",
        "eval_results.json",
        "cps_recipe.json",
        "trainer_state.json",
    ):
        assert f"{output_dir}/{name}" in main_paths, name
    assert f"{output_dir}/.incomplete/checkpoint-2 -> {output_dir}/checkpoint-2" in main_paths
    # The other process only creates the staging folder its own RNG state goes to (written by torch, below
    # Python's audit hooks); it opens no file for writing, renames and removes nothing.
    other = writes(1)
    assert other and all(
        event == "os.mkdir" and re.fullmatch(re.escape(output_dir) + r"/\.incomplete(/checkpoint-\d+)?", path)
        for event, path in other
    ), other
    for step in (2, 3):
        checkpoint = runs["two_processes"] / f"checkpoint-{step}"
        assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert not (runs["two_processes"] / ".incomplete").exists()


# ---------------------------------------------------------------------------------------------------------------
# A streamed unlabelled pool in two processes
# ---------------------------------------------------------------------------------------------------------------

POOL_ROWS, POOL_FILES, STREAM_STEPS = 20, 4, 4
# Per process and step: 2 CutMix items of 2 rows. 4 files over 2 processes: 2 files (10 rows) each.
ROWS_PER_STEP = 4


@pytest.fixture(scope="module")
def streaming_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("distributed-streaming")
    lab = FaultLab(workdir)
    pool = write_parquet_image_pool(workdir / "pool", POOL_ROWS, num_files=POOL_FILES)

    def launch(output_dir: Path, records: str) -> None:
        argv = lab.argv(
            output_dir,
            lab.clean_dataset,
            "--unlabeled_dataset_name",
            str(pool),
            "--unlabeled_streaming",
            "true",
            "--unlabeled_shuffle_buffer_size",
            "4",
            "--cutmix",
            "true",
            "--max_steps",
            str(STREAM_STEPS),
            "--save_steps",
            "2",
        )
        launched = subprocess.run(
            [*TWO_CPU_PROCESSES_LAUNCH, str(PROBE), *argv],
            env={**launch_environment(), "CPS_PROBE_RECORD_DIR": str(workdir / records)},
            capture_output=True,
            text=True,
            timeout=600,
            cwd=workdir,
        )
        assert launched.returncode == 0, launched.stderr[-4000:]

    uninterrupted = workdir / "two-processes"
    launch(uninterrupted, "records")
    # A run whose folder holds only checkpoint-2 of the first one resumes from it, in two processes.
    resumed = workdir / "resumed"
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    launch(resumed, "records-resumed")

    def stream_rows(records: str) -> dict[int, list]:
        return {
            rank: [
                tuple(row)
                for row in json.loads((workdir / records / f"rank-{rank}.json").read_text())["stream_rows"]
            ]
            for rank in (0, 1)
        }

    return {
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "rows": stream_rows("records"),
        "resumed_rows": stream_rows("records-resumed"),
    }


@pytest.mark.slow
def test_each_process_streams_its_own_part_of_the_pool(streaming_runs):
    rows = streaming_runs["rows"]
    assert all(len(rank_rows) == STREAM_STEPS * ROWS_PER_STEP for rank_rows in rows.values())
    first_pass = {
        rank: [row_id for epoch, row_id in rank_rows if epoch == 0] for rank, rank_rows in rows.items()
    }
    # Each process read its 10 rows once in its first pass, then started its second pass.
    assert all(len(ids) == len(set(ids)) == POOL_ROWS // 2 for ids in first_pass.values())
    assert not set(first_pass[0]) & set(first_pass[1])
    assert set(first_pass[0]) | set(first_pass[1]) == {f"pool_{row:03d}" for row in range(POOL_ROWS)}
    for step in (2, 4):
        checkpoint = streaming_runs["uninterrupted"] / f"checkpoint-{step}"
        positions = [
            json.loads((checkpoint / f"unlabeled_stream_{rank}.json").read_text()) for rank in (0, 1)
        ]
        assert [position["position"]["items"] for position in positions] == [step * 2, step * 2]
        assert [position["settings"]["process_index"] for position in positions] == [0, 1]


@pytest.mark.slow
def test_two_processes_resume_the_stream_exactly(streaming_runs):
    # After checkpoint-2, each process reads exactly the rows it read in the uninterrupted run after step 2.
    for rank in (0, 1):
        assert streaming_runs["resumed_rows"][rank] == streaming_runs["rows"][rank][2 * ROWS_PER_STEP :], rank
    assert same_weights(streaming_runs["resumed"], streaming_runs["uninterrupted"])
    assert loss_history(streaming_runs["resumed"]) == loss_history(streaming_runs["uninterrupted"])
