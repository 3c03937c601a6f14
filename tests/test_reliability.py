"""Reliability: resuming after SIGKILL, atomic checkpoints, bad input, non-finite losses, determinism, tokens.

The training scenarios live in `tools/fault_injection.py` (also runnable as a script that prints the fault table);
these tests assert their outcomes.
"""

import io
import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import make_tiny_config
from PIL import Image as PILImage

from cps_hf import CPSForSemanticSegmentation
from cps_hf.checkpointing import checkpoint_problems, last_complete_checkpoint, publish_checkpoint
from cps_hf.data import (
    SegmentationTransform,
    SemiSupervisedSegmentationDataset,
    SplitName,
    UndecodableSampleError,
)
from cps_hf.experiment import parse_experiment_arguments, resolve_resume_checkpoint
from tools.fault_injection import SCENARIOS, FaultLab, same_weights


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> FaultLab:
    return FaultLab(tmp_path_factory.mktemp("faults"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before or at the first step that reads it, and nothing already saved is touched
# ---------------------------------------------------------------------------------------------------------------

BAD_INPUT_ERRORS = {
    "bad_mask_value": (
        ValueError,
        r"labelled sample \(dataset '.*bad-mask', split 'train' row \d+, id 'train_\d+'\) holds values \[7\] "
        r"outside \[0, 5\)",
    ),
    "size_mismatch": (
        ValueError,
        r"labelled sample \(dataset '.*size-mismatch', split 'train' row \d+, id 'train_\d+'\) differ in size: "
        r"image \(height, width\) = \(32, 32\), mask = \(32, 31\)",
    ),
    "undecodable_image": (
        UndecodableSampleError,
        r"Could not decode the image of \w+ sample \(dataset '.*undecodable', split 'train' row \d+, "
        r"id 'train_\d+'\): not a known image format",
    ),
    "missing_column": (
        ValueError,
        r"\['segmentation_mask'\] not found in the dataset '.*clean' \(split 'train'\); available columns: "
        r"\['id', 'image', 'label'\]",
    ),
    "unknown_ids": (
        ValueError,
        r"3 of the 4 ids in '.*unknown-ids.txt' are not in column 'id' of dataset '.*clean', "
        r"e\.g\. \['2007_000032', '2007_000039', '2007_000063'\]",
    ),
    "empty_labeled_set": (ValueError, r"lists no ids: the labelled set of dataset '.*clean' would be empty"),
    "empty_unlabeled_set": (ValueError, r"The unlabelled set of dataset '.*clean' is empty"),
    "num_labels_mismatch": (ValueError, r"--num_labels is 3 but dataset '.*clean' has 5 classes"),
    "explicit_incomplete_checkpoint": (
        ValueError,
        r"Cannot resume from .*checkpoint-6: trainer_state.json is missing; .*optimizer.pt is missing",
    ),
}


@pytest.mark.parametrize("scenario", sorted(BAD_INPUT_ERRORS))
def test_bad_input_stops_with_a_clear_error_and_keeps_what_was_saved(lab, scenario):
    outcome = SCENARIOS[scenario](lab)
    error_type, pattern = BAD_INPUT_ERRORS[scenario]
    assert isinstance(outcome.error, error_type), outcome.outcome
    assert re.search(pattern, str(outcome.error)), str(outcome.error)
    # Data errors surface at step 3, the first step of the continued run (every row is faulty): checkpoint-3
    # would exist (a checkpoint every step) had the step passed; the earlier run's files are byte-identical.
    assert outcome.details["untouched"]


def test_a_model_for_other_classes_is_rejected_before_training(lab, tmp_path):
    model_dir = tmp_path / "three-classes"
    CPSForSemanticSegmentation(
        make_tiny_config(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    ).save_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"predicts 3 classes but dataset '.*clean' has 5"):
        lab.train(
            lab.argv(
                tmp_path / "run",
                lab.clean_dataset,
                "--max_steps",
                "1",
                "--model_name_or_path",
                str(model_dir),
            )
        )
    assert not (tmp_path / "run").exists()


def test_non_rgb_images_are_converted(lab):
    outcome = SCENARIOS["non_rgb_images"](lab)
    assert outcome.error is None, outcome.outcome
    assert outcome.details == {"modes": ["I;16", "L", "LA", "P", "RGBA"], "steps": 6}


def test_nonfinite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(lab):
    outcome = SCENARIOS["nonfinite_loss"](lab)
    assert isinstance(outcome.error, FloatingPointError), outcome.outcome
    assert re.search(r"at step 2; .*Last good checkpoint: .*checkpoint-1\.", str(outcome.error))
    assert outcome.details == {"checkpoints": ["checkpoint-1"], "final_model": False}


# ---------------------------------------------------------------------------------------------------------------
# Opt-in: skip and count undecodable samples
# ---------------------------------------------------------------------------------------------------------------


def _dataset_with_undecodable_rows(num_rows: int, bad_rows: set[int]) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images, labels = [], []
    for row in range(num_rows):
        image = PILImage.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
        mask = PILImage.fromarray(rng.integers(0, 3, size=(8, 8), dtype=np.uint8), "L")
        image_value = {"bytes": b"truncated" if row in bad_rows else _png(image), "path": None}
        images.append(image_value)
        labels.append({"bytes": _png(mask), "path": None})
    return datasets.Dataset.from_dict(
        {"id": [f"img_{row}" for row in range(num_rows)], "image": images, "label": labels},
        features=datasets.Features(
            {"id": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Image()}
        ),
    )


def _png(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_skip_undecodable_leaves_out_and_lists_the_bad_rows():
    dataset = _dataset_with_undecodable_rows(8, bad_rows={1, 5})
    transform = SegmentationTransform(train=True, crop_size=8, scales=(1.0,))
    common = dict(transform=transform, num_labels=3, split_name=SplitName("train", "toy"))
    failing = SemiSupervisedSegmentationDataset(dataset, [0, 1], **common)
    with pytest.raises(UndecodableSampleError, match=r"dataset 'toy', split 'train' row 1, id 'img_1'"):
        [failing[index] for index in range(len(failing))]

    skipping = SemiSupervisedSegmentationDataset(dataset, [0, 1], skip_undecodable=True, **common)
    assert (skipping.num_labeled, skipping.num_unlabeled) == (1, 5)
    assert len(skipping.skipped_samples) == 2
    assert "labelled sample (dataset 'toy', split 'train' row 1, id 'img_1')" in skipping.skipped_samples[0]
    assert "unlabelled sample (dataset 'toy', split 'train' row 5, id 'img_5')" in skipping.skipped_samples[1]
    assert all(
        item["pixel_values"].shape == (3, 8, 8) for item in (skipping[i] for i in range(len(skipping)))
    )
    with pytest.raises(ValueError, match="labelled set of dataset 'toy' is empty: none of its samples"):
        SemiSupervisedSegmentationDataset(dataset, [1, 5], skip_undecodable=True, **common)


def test_skip_undecodable_samples_in_a_training_run_is_reported_at_the_end(lab):
    outcome = SCENARIOS["skip_undecodable"](lab)
    assert outcome.error is None, outcome.outcome
    assert outcome.details["all_results"]["skipped_undecodable_samples"] == 2
    assert outcome.details["results"]["train_skipped_undecodable_samples"] == 2
    skipped = outcome.details["recipe"]["skipped_undecodable_samples"]
    assert len(skipped) == 2 and all(re.search(r"row \d+, id 'train_\d+'", line) for line in skipped)
    assert outcome.details["warnings"][-1].startswith("Skipped 2 undecodable sample(s)")


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL, atomic checkpoints, resume
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "staged", "skip_warning"),
    [
        ("sigkill_between_checkpoints", [], None),
        (
            "sigkill_while_saving",
            ["checkpoint-6"],
            r"Skipping the half-written checkpoint .*\.incomplete/checkpoint-6",
        ),
    ],
)
def test_killed_run_resumes_exactly(lab, scenario, staged, skip_warning):
    outcome = SCENARIOS[scenario](lab)
    details = outcome.details
    assert details["checkpoints_after_kill"] == ["checkpoint-2", "checkpoint-4"], outcome.outcome
    assert details["staged_after_kill"] == staged
    assert not details["final_model_after_kill"]
    # Restarted plainly (latest complete checkpoint) and with --resume_from_checkpoint checkpoint-4: the final
    # weights and every logged loss equal those of a run that was never interrupted, bit for bit.
    assert details["latest_matches"] and details["explicit_matches"], outcome.outcome
    assert any(re.match(r"Resuming from .*checkpoint-4\.$", message) for message in details["warnings"])
    if skip_warning:
        assert any(re.match(skip_warning, message) for message in details["warnings"])


def test_truncated_checkpoint_is_skipped_for_the_previous_one(lab):
    outcome = SCENARIOS["truncated_checkpoint"](lab)
    assert outcome.details["matches"], outcome.outcome
    assert any(
        re.match(
            r"Skipping the incomplete checkpoint .*checkpoint-4: model.safetensors is unreadable", message
        )
        for message in outcome.details["warnings"]
    )


def test_checkpoint_problems_and_atomic_publication(lab, tmp_path):
    complete = lab.uninterrupted_run / "checkpoint-8"
    assert checkpoint_problems(complete) == []
    damaged = tmp_path / "checkpoint-8"
    shutil.copytree(complete, damaged)
    (damaged / "optimizer.pt").write_bytes((damaged / "optimizer.pt").read_bytes()[:100])
    (damaged / "scheduler.pt").unlink()
    state = json.loads((damaged / "trainer_state.json").read_text())
    (damaged / "trainer_state.json").write_text(json.dumps({**state, "global_step": 6}))
    assert checkpoint_problems(damaged) == [
        "trainer_state.json is at step 6, not 8",
        "optimizer.pt is truncated or not a torch archive",
        "scheduler.pt is missing",
    ]
    # Publishing replaces a folder of the same step only once the new one is complete, and cleans up.
    staged = tmp_path / ".incomplete" / "checkpoint-8"
    shutil.copytree(complete, staged)
    publish_checkpoint(staged, damaged)
    assert checkpoint_problems(damaged) == [] and not (tmp_path / ".incomplete").exists()


def test_output_dir_with_only_incomplete_checkpoints_is_not_overwritten(lab, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(lab.uninterrupted_run / "checkpoint-2", output_dir / "checkpoint-2")
    (output_dir / "checkpoint-2" / "optimizer.pt").unlink()
    argv = lab.argv(output_dir, lab.clean_dataset, "--max_steps", "4")
    with pytest.raises(ValueError, match="holds checkpoints but none of them is complete"):
        resolve_resume_checkpoint(parse_experiment_arguments(argv)[2])
    overwrite = parse_experiment_arguments([*argv, "--overwrite_output_dir", "true"])[2]
    assert resolve_resume_checkpoint(overwrite) is None
    assert last_complete_checkpoint(output_dir) is None


# ---------------------------------------------------------------------------------------------------------------
# Determinism and safety
# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_weights(lab):
    def train(name: str, seed: int) -> Path:
        output_dir = lab.workdir / name
        lab.train(
            lab.argv(
                output_dir, lab.clean_dataset, "--max_steps", "3", "--save_steps", "3", "--seed", str(seed)
            )
        )
        return output_dir

    first, second, other_seed = train("seed-0-a", 0), train("seed-0-b", 0), train("seed-1", 1)
    assert same_weights(first, second)
    assert not same_weights(first, other_seed)


def test_access_token_is_never_written_to_disk(lab):
    outcome = SCENARIOS["token_in_arguments"](lab)
    assert outcome.details["leaking"] == [] and outcome.details["files"] > 10


def test_every_fault_scenario_is_tested():
    tested = set(BAD_INPUT_ERRORS) | {
        "non_rgb_images",
        "nonfinite_loss",
        "skip_undecodable",
        "sigkill_between_checkpoints",
        "sigkill_while_saving",
        "truncated_checkpoint",
        "token_in_arguments",
    }
    assert tested == set(SCENARIOS)
