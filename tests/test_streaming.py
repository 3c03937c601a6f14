"""Streamed unlabelled pools (`--unlabeled_streaming`): a local parquet folder read as a `datasets.IterableDataset`,
split across processes, endless, resumed exactly from any position, and a training run killed and resumed."""

import json
from collections import Counter
from dataclasses import replace
from functools import cache
from pathlib import Path

import datasets
import pytest
import torch
from helpers import write_parquet_image_pool

from cps_hf.data import (
    DataArguments,
    SegmentationTransform,
    SplitName,
    StreamPosition,
    SupervisedSegmentationDataset,
    UndecodableSampleError,
    UnlabeledBatches,
    UnlabeledImageStream,
    build_training_data,
    load_segmentation_dataset,
    read_stream_position,
    write_stream_position,
)
from tools.fault_injection import FaultLab, loss_history, same_weights

NUM_ROWS = 22
ALL_IDS = {f"pool_{row:03d}" for row in range(NUM_ROWS)}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """22 images of 16x16 in 3 parquet files (8, 8, 6 rows)."""
    return write_parquet_image_pool(tmp_path_factory.mktemp("pool"), NUM_ROWS, num_files=3, image_size=16)


@cache
def streamed_split(pool: Path) -> datasets.IterableDataset:
    # Streams iterate their own `select_columns` copy of the split (its features are known), so tests can share it.
    return load_segmentation_dataset(str(pool), streaming=True)["train"]


def make_stream(pool: Path, **overrides) -> UnlabeledImageStream:
    split = streamed_split(pool)
    settings = dict(
        transform=SegmentationTransform(train=True, crop_size=12, scales=[1.0, 1.5]),
        shuffle_buffer_size=5,
        seed=0,
    )
    settings.update(overrides)
    return UnlabeledImageStream(split, **settings)


def row_ids(stream: UnlabeledImageStream, count: int, start: StreamPosition | None = None) -> list[tuple]:
    """The first `count` rows from `start`, as `(pass, id, position)`."""
    rows = stream.rows(start)
    return [(position.epoch, row["id"], position) for (row, position), _ in zip(rows, range(count))]


def test_a_local_parquet_folder_streams_every_row_once_per_pass_in_shuffled_blocks(pool):
    loaded = load_segmentation_dataset(str(pool), streaming=True)
    assert isinstance(loaded, datasets.IterableDatasetDict) and loaded["train"].num_shards == 3
    stream = make_stream(pool)
    rows = row_ids(stream, 3 * NUM_ROWS + 4)
    passes = [[row_id for epoch, row_id, _ in rows if epoch == e] for e in range(3)]
    # Endless: a fourth pass follows the third; each pass reads every row once.
    assert [epoch for epoch, _, _ in rows[-4:]] == [3] * 4
    assert all(sorted(ids) == sorted(ALL_IDS) for ids in passes)
    file_order = sorted(ALL_IDS)
    # Pass 0 reads the files in order, shuffled within blocks of 5 rows; every pass is shuffled differently.
    assert passes[0] != file_order
    assert all(set(passes[0][i : i + 5]) == set(file_order[i : i + 5]) for i in range(0, NUM_ROWS, 5))
    assert len({tuple(ids) for ids in passes}) == 3
    # Same seed, same stream; another seed shuffles the blocks differently.
    assert [row[1] for row in row_ids(make_stream(pool), NUM_ROWS)] == passes[0]
    assert [row[1] for row in row_ids(make_stream(pool, seed=1), NUM_ROWS)] != passes[0]
    # A buffer of one row keeps the order in which they are read.
    assert [row[1] for row in row_ids(make_stream(pool, shuffle_buffer_size=1), NUM_ROWS)] == file_order


def test_resuming_from_any_position_continues_with_the_same_rows(pool):
    stream = make_stream(pool)
    count = 2 * NUM_ROWS + 3
    rows = row_ids(stream, count + 1)
    # Every third row, and the ends of blocks (5 rows) and of the first pass (22 rows).
    for index in sorted(set(range(0, count, 3)) | {4, 5, 20, 21, 22}):
        position = rows[index][2]
        # The position survives a JSON round trip, as in a checkpoint.
        position = StreamPosition.from_dict(json.loads(json.dumps(position.to_dict())))
        resumed = row_ids(make_stream(pool), count - index, start=position)
        assert [row[:2] for row in resumed] == [row[:2] for row in rows[index + 1 : count + 1]], index


@pytest.mark.parametrize("cutmix", [False, True])
def test_batches_resume_exactly_in_a_worker_process_or_not(pool, cutmix):
    def batches(num_workers: int, count: int, start: StreamPosition | None = None) -> list:
        reader = UnlabeledBatches(
            make_stream(pool, cutmix=cutmix), batch_size=3, num_workers=num_workers, start=start
        )
        produced = [(next(reader), reader.position) for _ in range(count)]
        reader.close()
        return produced

    uninterrupted = batches(0, 5)
    keys = {"unlabeled_pixel_values"} | ({"mix_unlabeled_pixel_values", "cutmix_masks"} if cutmix else set())
    assert set(uninterrupted[0][0]) == keys
    assert uninterrupted[0][0]["unlabeled_pixel_values"].shape == (3, 3, 12, 12)
    # 5 batches of 3 items of 1 or 2 rows: 15 or 30 rows, across the end of the first pass with CutMix.
    assert uninterrupted[-1][1].items == 15
    assert uninterrupted[-1][1].epoch == (1 if cutmix else 0)
    # Restarted after batch 2 in a worker process: the next batches are the same tensors.
    resumed = batches(1, 3, start=uninterrupted[1][1])
    for (expected, expected_position), (batch, position) in zip(uninterrupted[2:], resumed):
        # The same place (the `datasets` state of a block start may be written differently in a worker).
        assert replace(position, block_start=None) == replace(expected_position, block_start=None)
        for key in keys:
            assert torch.equal(batch[key], expected[key]), key
    assert not torch.equal(
        uninterrupted[0][0]["unlabeled_pixel_values"], uninterrupted[1][0]["unlabeled_pixel_values"]
    )


@pytest.mark.parametrize(("num_files", "strategy"), [(4, "shards"), (3, "examples")])
def test_processes_read_disjoint_parts_of_each_pass(tmp_path, num_files, strategy):
    # 4 files over 2 processes: 2 files each; 3 files: every process reads all of them and keeps every second row.
    folder = write_parquet_image_pool(tmp_path / "pool", NUM_ROWS, num_files=num_files, image_size=16)
    parts = {}
    for rank in (0, 1):
        stream = make_stream(folder, process_index=rank, num_processes=2)
        parts[rank] = Counter(row_id for epoch, row_id, _ in row_ids(stream, 40) if epoch == 0)
    assert all(max(part.values()) == 1 for part in parts.values())
    assert not set(parts[0]) & set(parts[1])
    assert set(parts[0]) | set(parts[1]) == ALL_IDS
    assert sorted(len(part) for part in parts.values()) == ([10, 12] if strategy == "shards" else [11, 11])


def test_stream_errors_name_the_dataset_column_and_sample(pool, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"\['pixels'\] not found in the dataset '.*' \(split 'train'\); available columns: \['id', 'image'\]",
    ):
        make_stream(pool, image_column="pixels", split_name=SplitName("train", str(pool)))
    # Undecodable bytes raise naming the sample, or are skipped with --skip_undecodable_samples.
    broken = tmp_path / "broken"
    broken.mkdir()
    rows = [
        {"id": f"bad_{row}", "image": {"bytes": b"\x89PNG not an image", "path": None}} for row in range(2)
    ]
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(broken / "train.parquet"))
    stream = make_stream(broken, split_name=SplitName("train", "broken-pool"))
    with pytest.raises(
        UndecodableSampleError,
        match=r"unlabelled sample \(dataset 'broken-pool', split 'train', id 'bad_\d'\)",
    ):
        next(iter(stream))
    # Skipped instead, when asked; a pool none of whose images decodes is an error, not an endless loop.
    skipping = make_stream(broken, skip_undecodable=True)
    with pytest.raises(
        ValueError, match=r"No image of the unlabelled stream could be decoded in a whole pass"
    ):
        next(iter(skipping))


def test_positions_are_saved_per_process_and_checked_against_the_stream(pool, tmp_path):
    stream = make_stream(pool, cutmix=True, process_index=1, num_processes=2)
    position = StreamPosition(
        epoch=2, block=1, block_start={"epoch": 2, "examples_iterable": {}}, offset=3, items=9
    )
    path = write_stream_position(tmp_path, stream, position)
    assert path.name == "unlabeled_stream_1.json"
    assert read_stream_position(tmp_path, stream) == position
    with pytest.raises(ValueError, match=r"other settings \(shuffle_buffer_size 5 -> 7\)"):
        read_stream_position(
            tmp_path, make_stream(pool, cutmix=True, process_index=1, num_processes=2, shuffle_buffer_size=7)
        )
    with pytest.raises(
        ValueError, match=r"no unlabelled-stream position for process 0 .*--ignore_data_skip true"
    ):
        read_stream_position(tmp_path, make_stream(pool, cutmix=True, num_processes=2))


# ---------------------------------------------------------------------------------------------------------------
# Data arguments and the assembled training data
# ---------------------------------------------------------------------------------------------------------------


def test_data_arguments_reject_streaming_settings_that_cannot_apply():
    with pytest.raises(ValueError, match="name the unlabelled pool"):
        DataArguments(labeled_fraction=0.5, unlabeled_streaming=True)
    with pytest.raises(ValueError, match="--unlabeled_ids_file selects rows of a dataset that is loaded"):
        DataArguments(
            labeled_fraction=0.5,
            unlabeled_dataset_name="pool",
            unlabeled_streaming=True,
            unlabeled_ids_file="x",
        )
    with pytest.raises(ValueError, match="--unlabeled_shuffle_buffer_size must be >= 1, got 0"):
        DataArguments(labeled_fraction=0.5, unlabeled_shuffle_buffer_size=0)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> FaultLab:
    return FaultLab(tmp_path_factory.mktemp("streaming"))


def test_training_data_with_a_streamed_pool_labels_the_chosen_rows_of_the_train_split(lab, pool):
    def build(**overrides):
        arguments = DataArguments(
            dataset_name=str(lab.clean_dataset),
            unlabeled_dataset_name=str(pool),
            unlabeled_streaming=True,
            crop_size=[16],
            **overrides,
        )
        return build_training_data(
            arguments, seed=0, cutmix=True, mean=(0.5,) * 3, std=(0.5,) * 3, process_index=1, num_processes=2
        )

    data = build(labeled_fraction=0.25)
    assert isinstance(data.train_dataset, SupervisedSegmentationDataset)
    assert data.num_labeled == 4 and len(data.train_dataset) == 4
    assert data.split["num_train_rows"] == 16 and data.split["num_labeled"] == 4
    stream = data.unlabeled_stream
    assert (stream.process_index, stream.num_processes, stream.cutmix) == (1, 2, True)
    assert stream.shuffle_buffer_size == 1000 and stream.dataset.num_shards == 3
    # The other training rows are not unlabelled data when a pool is given: `--labeled_fraction 1.0` labels them all.
    assert build(labeled_fraction=1.0).num_labeled == 16
    supervised = build_training_data(
        DataArguments(
            dataset_name=str(lab.clean_dataset),
            unlabeled_dataset_name=str(pool),
            unlabeled_streaming=True,
            labeled_fraction=0.25,
            crop_size=[16],
        ),
        seed=0,
        cutmix=False,
        supervised_only=True,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )
    assert supervised.unlabeled_stream is None


def test_a_loaded_pool_reads_the_unlabeled_image_column(lab, tmp_path):
    pool = write_parquet_image_pool(
        tmp_path / "pixels-pool", 6, num_files=1, image_size=16, image_column="pixels"
    )
    arguments = DataArguments(
        dataset_name=str(lab.clean_dataset),
        unlabeled_dataset_name=str(pool),
        unlabeled_image_column="pixels",
        labeled_fraction=0.25,
        crop_size=[16],
    )
    data = build_training_data(arguments, seed=0, cutmix=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert data.num_unlabeled == 6
    assert data.train_dataset[0]["unlabeled_pixel_values"].shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------------------------
# Training: the stream is consumed by the trainer, saved in checkpoints and resumed exactly
# ---------------------------------------------------------------------------------------------------------------

STREAMED = ("--cutmix", "true", "--unlabeled_streaming", "true", "--unlabeled_shuffle_buffer_size", "5")
INTERRUPTED = ("--max_steps", "6", "--save_steps", "2")


@pytest.mark.slow
def test_a_streaming_run_killed_and_resumed_ends_like_an_uninterrupted_one(lab, pool):
    def argv(output_dir: Path, *extra: str) -> list[str]:
        return lab.argv(
            output_dir,
            lab.clean_dataset,
            "--unlabeled_dataset_name",
            str(pool),
            *STREAMED,
            *INTERRUPTED,
            *extra,
        )

    uninterrupted = lab.workdir / "streamed-uninterrupted"
    lab.train(argv(uninterrupted))
    # 6 steps x 2 items x 2 rows = 24 rows: the pool of 22 runs out during step 6 and the stream starts pass 1.
    final = read_stream_position(uninterrupted / "checkpoint-6", _stream_of(lab, pool))
    assert (final.items, final.epoch) == (12, 1)
    # Killed at step 5 (after checkpoint-4) while reading the stream in a worker process, restarted in-process.
    killed = lab.workdir / "streamed-killed"
    completed = lab.train_in_subprocess(
        argv(killed, "--dataloader_num_workers", "1"), CPS_PROBE_KILL_AT_STEP="5"
    )
    assert completed.returncode == -9, completed.stderr[-3000:]
    assert sorted(path.name for path in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert read_stream_position(killed / "checkpoint-4", _stream_of(lab, pool)).items == 8
    lab.train(argv(killed))
    assert same_weights(killed, uninterrupted)
    assert loss_history(killed) == loss_history(uninterrupted)


def _stream_of(lab: FaultLab, pool: Path) -> UnlabeledImageStream:
    """A stream with the settings of the training runs above (what their saved positions are checked against)."""
    return make_stream(pool, cutmix=True, split_name=SplitName("train", str(pool)))


def test_the_trainer_refuses_a_stream_built_for_another_run(pool, tiny_config, tmp_path):
    from cps_hf import CPSForSemanticSegmentation
    from cps_hf.trainer import CPSTrainer, CPSTrainingArguments

    def trainer(stream: UnlabeledImageStream, **arguments) -> CPSTrainer:
        args = CPSTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **arguments)
        return CPSTrainer(model=CPSForSemanticSegmentation(tiny_config), args=args, unlabeled_stream=stream)

    assert trainer(make_stream(pool, cutmix=True), cutmix=True).unlabeled_stream is not None
    with pytest.raises(ValueError, match=r"built with cutmix=True, the training arguments have cutmix=False"):
        trainer(make_stream(pool, cutmix=True))
    with pytest.raises(ValueError, match=r"split for process 1 of 2; this is process 0 of 1"):
        trainer(make_stream(pool, process_index=1, num_processes=2))
    with pytest.raises(ValueError, match=r"`supervised_only` trains without unlabelled images"):
        trainer(make_stream(pool), supervised_only=True)
