"""Tests of cps_hf.data: loading, labelled-split selection, decoding, augmentation and the paired dataset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from fractions import Fraction
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import run_script
from PIL import Image as PILImage

from cps_hf.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataArguments,
    SegmentationTransform,
    SemiSupervisedSegmentationDataset,
    SupervisedSegmentationDataset,
    check_columns,
    collate_semi_supervised,
    complement_indices,
    decode_image,
    decode_mask,
    item_seed,
    load_segmentation_dataset,
    make_labeled_partitions,
    parse_fraction,
    read_split_ids,
    select_indices_from_ids_file,
    select_labeled_indices,
    split_fingerprint,
    split_line_id,
    split_record,
    write_labeled_partitions,
)

# The official CPS split lists: $CPS_SPLITS_DIR, or the shared datasets folder next to the repository. Tests that
# read them are skipped where they are absent (e.g. CI on a bare clone).
OFFICIAL_SPLITS_DIR = Path(
    os.environ.get(
        "CPS_SPLITS_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cps-splits"
    )
)
OFFICIAL_SPLIT_FILE = OFFICIAL_SPLITS_DIR / "voc" / "train_aug_labeled_1-8.txt"
needs_official_splits = pytest.mark.skipif(
    not OFFICIAL_SPLITS_DIR.is_dir(), reason=f"official CPS split lists not found at {OFFICIAL_SPLITS_DIR}"
)
NUM_LABELS = 5


def png_bytes(array: np.ndarray, mode: str | None = None, palette: list[int] | None = None) -> bytes:
    image = PILImage.fromarray(array, mode) if mode else PILImage.fromarray(array)
    if palette is not None:
        image = image.convert("P")
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def row_code_image(row: int, height: int, width: int) -> np.ndarray:
    """A constant image whose value identifies the row: stays exact under flip, scale and crop."""
    return np.full((height, width, 3), 10 + 5 * row, dtype=np.uint8)


def decode_row_code(pixel_values: torch.Tensor) -> int:
    """Inverse of `row_code_image` for a transform with mean 0 and std 1."""
    return int(round((float(pixel_values[0, 0, 0]) * 255 - 10) / 5))


def make_dataset(
    num_rows: int,
    height: int = 12,
    width: int = 16,
    with_ids: bool = True,
    with_labels: bool = True,
    constant_images: bool = True,
) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    columns: dict[str, list] = {"image": []}
    if with_ids:
        columns["id"] = [f"img_{row:03d}" for row in range(num_rows)]
    if with_labels:
        columns["label"] = []
    for row in range(num_rows):
        if constant_images:
            image = row_code_image(row, height, width)
        else:
            image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        columns["image"].append({"bytes": png_bytes(image), "path": None})
        if with_labels:
            mask = rng.integers(0, NUM_LABELS, size=(height, width), dtype=np.uint8)
            columns["label"].append({"bytes": png_bytes(mask, "L"), "path": None})
    features = {"image": datasets.Image()}
    if with_ids:
        features["id"] = datasets.Value("string")
    if with_labels:
        features["label"] = datasets.Image()
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def identity_transform(crop_size: tuple[int, int] = (12, 16)) -> SegmentationTransform:
    """Training transform without scaling or normalisation: constant images keep their row code."""
    return SegmentationTransform(
        train=True, crop_size=crop_size, scales=(1.0,), mean=(0, 0, 0), std=(1, 1, 1)
    )


# ---------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------


def test_train_transform_keeps_image_and_mask_aligned() -> None:
    rng = np.random.default_rng(0)
    # 8x8 blocks of random classes; the image's value encodes the class.
    blocks = rng.integers(0, NUM_LABELS, size=(5, 7))
    mask = torch.from_numpy(np.kron(blocks, np.ones((8, 8), dtype=np.int64)))  # (40, 56)
    image = (mask.float() / 10).unsqueeze(0).repeat(3, 1, 1)
    crop_size = (36, 48)
    transform = SegmentationTransform(train=True, crop_size=crop_size)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    padded_seeds = 0
    for seed in range(30):
        pixel_values, labels = transform(image, mask, generator=torch.Generator().manual_seed(seed))
        assert pixel_values.shape == (3, *crop_size) and pixel_values.dtype == torch.float32
        assert labels.shape == crop_size and labels.dtype == torch.int64
        padding = labels == 255
        # Padding: ignore index in the mask, 0 in the normalised image.
        assert torch.all(pixel_values[:, padding] == 0)
        padded_seeds += int(padding.any())
        # Away from block borders (where bilinear blends neighbours) the image value equals the class.
        unnormalised = pixel_values * std + mean
        neighbourhood = torch.nn.functional.pad(labels.float(), (1, 1, 1, 1), value=255.0)
        windows = neighbourhood.unfold(0, 3, 1).unfold(1, 3, 1)  # (h, w, 3, 3)
        interior = (windows.amax(dim=(-1, -2)) == windows.amin(dim=(-1, -2))) & ~padding
        assert interior.sum() > 50
        assert torch.allclose(
            unnormalised[:, interior] * 10, labels[interior].float().expand(3, -1), atol=1e-3
        )
    assert padded_seeds > 0  # scale 0.5 and 0.75 produce images smaller than the crop


def test_train_transform_flips_and_scales_with_the_generator() -> None:
    image = torch.linspace(0, 1, 16).view(1, 1, 16).expand(3, 8, 16).contiguous()
    mask = torch.arange(16).view(1, 16).expand(8, 16).contiguous()
    transform = SegmentationTransform(
        train=True, crop_size=(8, 16), scales=(1.0,), mean=(0, 0, 0), std=(1, 1, 1)
    )
    outcomes = set()
    for seed in range(20):
        pixel_values, labels = transform(image, mask, generator=torch.Generator().manual_seed(seed))
        flipped = bool(labels[0, 0] == 15)
        assert torch.equal(labels, mask.flip(-1) if flipped else mask)
        assert torch.allclose(pixel_values, image.flip(-1) if flipped else image)
        outcomes.add(flipped)
    assert outcomes == {True, False}
    # Same generator seed, same output; the global RNG plays no part.
    torch.manual_seed(123)
    first = transform(image, mask, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(456)
    second = transform(image, mask, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_scale_range_and_scales_are_exclusive() -> None:
    transform = SegmentationTransform(train=True, crop_size=8, scale_range=(0.5, 2.0))
    image = torch.rand(3, 10, 10)
    pixel_values, labels = transform(image, None, generator=torch.Generator().manual_seed(0))
    assert pixel_values.shape == (3, 8, 8) and labels is None
    with pytest.raises(ValueError, match="either `scales` or `scale_range`"):
        SegmentationTransform(train=True, crop_size=8, scales=(1.0,), scale_range=(0.5, 2.0))
    with pytest.raises(ValueError, match="crop_size"):
        SegmentationTransform(train=True)


def test_color_jitter_changes_the_image_by_drawn_factors_and_leaves_the_mask() -> None:
    image = torch.rand(3, 12, 16) * 0.4 + 0.2  # at most 0.9 after a brightness factor of 1.5: no clamping
    mask = torch.randint(0, NUM_LABELS, (12, 16))
    plain = identity_transform()

    def jitter(strengths: tuple[float, ...]) -> SegmentationTransform:
        return SegmentationTransform(
            train=True,
            crop_size=(12, 16),
            scales=(1.0,),
            mean=(0, 0, 0),
            std=(1, 1, 1),
            color_jitter=strengths,
        )

    # Brightness alone multiplies every value by one factor in [0.5, 1.5]; the colour draws come after the
    # geometric ones, so the flip (and the mask) are those of the transform without jitter.
    factors = set()
    for seed in range(10):
        reference, reference_labels = plain(image, mask, generator=torch.Generator().manual_seed(seed))
        jittered, labels = jitter((0.5, 0, 0, 0))(image, mask, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(labels, reference_labels)
        ratio = jittered / reference
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-5)
        assert 0.5 <= float(ratio.flatten()[0]) <= 1.5
        factors.add(round(float(ratio.flatten()[0]), 4))
    assert len(factors) == 10
    # All four: deterministic per generator, values kept in [0, 1].
    full = jitter((0.4, 0.4, 0.4, 0.1))
    first = full(image, mask, generator=torch.Generator().manual_seed(3))
    second = full(image, mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.allclose(first[0], plain(image, mask, generator=torch.Generator().manual_seed(3))[0])
    assert 0.0 <= float(first[0].min()) and float(first[0].max()) <= 1.0
    assert jitter((0, 0, 0, 0)).color_jitter is None  # zero strengths: no jitter
    for bad in [(0.4, 0.4, 0.4), (-0.1, 0, 0, 0), (0, 0, 0, 0.6)]:
        with pytest.raises(ValueError, match="color_jitter"):
            jitter(bad)


def test_eval_transform_normalises_and_optionally_resizes() -> None:
    image = torch.rand(3, 20, 30)
    mask = torch.randint(0, NUM_LABELS, (20, 30))
    pixel_values, labels = SegmentationTransform(train=False)(image, mask)
    expected = (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(pixel_values, expected) and torch.equal(labels, mask)
    pixel_values, labels = SegmentationTransform(train=False, eval_short_side=10)(image, mask)
    assert pixel_values.shape == (3, 10, 15) and labels.shape == (10, 15)
    pixel_values, labels = SegmentationTransform(train=False, eval_size=(16, 16))(image, mask)
    assert pixel_values.shape == (3, 16, 16) and labels.shape == (16, 16)
    assert set(labels.unique().tolist()) <= set(mask.unique().tolist())


def test_size_mismatch_names_the_sample() -> None:
    transform = SegmentationTransform(train=False)
    with pytest.raises(ValueError, match=r"img_042.*differ in size"):
        transform(torch.rand(3, 10, 12), torch.zeros(10, 11, dtype=torch.long), sample_name="img_042")


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------


def test_palette_mask_keeps_its_indices() -> None:
    indices = np.array([[0, 1, 2, 3], [4, 21, 255, 1]], dtype=np.uint8).repeat(2, axis=0)
    # A palette unrelated to the indices: converting to RGB or L would change the values.
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, size=256 * 3).tolist()
    palette[3 * 3 : 3 * 3 + 3] = [0, 0, 0]
    mask_png = png_bytes(indices, "L", palette=palette)
    assert PILImage.open(io.BytesIO(mask_png)).mode == "P"
    assert torch.equal(
        decode_mask({"bytes": mask_png, "path": None}), torch.from_numpy(indices.astype(np.int64))
    )

    image_png = png_bytes(np.zeros((4, 4, 3), dtype=np.uint8))
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": image_png, "path": None}], "label": [{"bytes": mask_png, "path": None}]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}),
    )
    item = SupervisedSegmentationDataset(dataset, num_labels=22)[0]
    assert torch.equal(item["labels"], torch.from_numpy(indices.astype(np.int64)))


@pytest.mark.parametrize(
    "mode, array",
    [
        ("L", np.full((5, 6), 128, dtype=np.uint8)),
        ("RGBA", np.full((5, 6, 4), 128, dtype=np.uint8)),
        ("LA", np.full((5, 6, 2), 128, dtype=np.uint8)),
        ("I;16", np.full((5, 6), 32896, dtype=np.uint16)),
    ],
)
def test_image_modes_are_converted_to_rgb(mode: str, array: np.ndarray) -> None:
    encoded = png_bytes(array, mode if mode != "I;16" else None)
    assert PILImage.open(io.BytesIO(encoded)).mode == mode
    pixels = decode_image({"bytes": encoded, "path": None})
    assert pixels.shape == (3, 5, 6) and pixels.dtype == torch.float32
    assert torch.allclose(pixels, torch.full_like(pixels, 128 / 255), atol=1e-3)


def test_palette_image_is_converted_to_its_colours() -> None:
    palette = [0, 0, 0, 255, 0, 0] + [0] * (254 * 3)
    encoded = png_bytes(np.array([[0, 1]], dtype=np.uint8), "L", palette=palette)
    pixels = decode_image(encoded)
    assert torch.equal(pixels[:, 0, 1], torch.tensor([1.0, 0.0, 0.0]))


def test_undecodable_image_names_the_row() -> None:
    dataset = make_dataset(4)
    corrupted = dataset.cast_column("image", datasets.Image(decode=False)).to_dict()
    corrupted["image"][2] = {"bytes": b"not a png", "path": None}
    dataset = datasets.Dataset.from_dict(corrupted, features=dataset.features)
    evaluation = SupervisedSegmentationDataset(dataset, num_labels=NUM_LABELS)
    with pytest.raises(ValueError, match=r"Could not decode the image of .*row 2, id 'img_002'"):
        evaluation[2]


# ---------------------------------------------------------------------------------------------------------------
# Paired dataset
# ---------------------------------------------------------------------------------------------------------------


def test_pairing_follows_the_unlabeled_set() -> None:
    dataset = make_dataset(10)
    labeled_rows = [1, 4, 8]
    unlabeled_rows = complement_indices(10, labeled_rows)
    paired = SemiSupervisedSegmentationDataset(
        dataset, labeled_rows, transform=identity_transform(), num_labels=NUM_LABELS, cutmix=True
    )
    assert len(paired) == len(unlabeled_rows) == 7
    assert (paired.num_labeled, paired.num_unlabeled) == (3, 7)
    for index in range(len(paired)):
        item = paired[index]
        assert decode_row_code(item["pixel_values"]) == labeled_rows[index % 3]
        unlabeled_row = decode_row_code(item["unlabeled_pixel_values"])
        assert unlabeled_row == unlabeled_rows[index % 7]
        partner_row = decode_row_code(item["mix_unlabeled_pixel_values"])
        assert partner_row in unlabeled_rows and partner_row != unlabeled_row
        assert item["cutmix_masks"].shape == (1, 12, 16) and item["cutmix_masks"].dtype == torch.float32
        assert set(item["cutmix_masks"].unique().tolist()) <= {0.0, 1.0}
        assert item["labels"].shape == (12, 16) and item["labels"].dtype == torch.int64


def test_mixing_partners_are_a_derangement_that_changes_per_epoch() -> None:
    paired = SemiSupervisedSegmentationDataset(
        make_dataset(12), [0, 1], transform=identity_transform(), num_labels=NUM_LABELS, cutmix=True
    )
    partners_per_epoch = []
    for epoch in range(3):
        paired.set_epoch(epoch)
        partners = [paired.mix_partner(position) for position in range(paired.num_unlabeled)]
        assert all(partner != position for position, partner in enumerate(partners))
        assert sorted(partners) == list(range(paired.num_unlabeled))  # a permutation: every image used once
        partners_per_epoch.append(partners)
    assert partners_per_epoch[0] != partners_per_epoch[1] != partners_per_epoch[2]


def test_more_labeled_than_unlabeled_uses_the_labeled_count() -> None:
    paired = SemiSupervisedSegmentationDataset(
        make_dataset(10), list(range(7)), transform=identity_transform(), num_labels=NUM_LABELS
    )
    assert len(paired) == 7
    unlabeled_rows = [decode_row_code(paired[index]["unlabeled_pixel_values"]) for index in range(7)]
    assert unlabeled_rows == [7, 8, 9, 7, 8, 9, 7]
    assert "mix_unlabeled_pixel_values" not in paired[0]


def test_items_are_reproducible_per_seed_epoch_and_index() -> None:
    dataset = make_dataset(8, height=16, width=16, constant_images=False)
    transform = SegmentationTransform(train=True, crop_size=12)

    def build(seed: int = 0) -> SemiSupervisedSegmentationDataset:
        return SemiSupervisedSegmentationDataset(
            dataset, [0, 1, 2], transform=transform, num_labels=NUM_LABELS, cutmix=True, seed=seed
        )

    def same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(first[key], second[key]) for key in first)

    first, second = build(), build()
    first.set_epoch(3)
    second.set_epoch(3)
    for index in range(len(first)):
        assert same(first[index], second[index])
    epoch_3 = [first[index] for index in range(len(first))]
    first.set_epoch(4)
    epoch_4 = [first[index] for index in range(len(first))]
    assert not all(same(a, b) for a, b in zip(epoch_3, epoch_4, strict=True))
    first.set_epoch(3)
    assert all(same(first[index], item) for index, item in enumerate(epoch_3))
    assert not all(
        same(a, b) for a, b in zip(epoch_3, [build(seed=1)[index] for index in range(5)], strict=False)
    )
    # Different indices showing the same labelled sample get different augmentations.
    assert not torch.equal(epoch_3[0]["labels"], epoch_3[3]["labels"]) or not torch.equal(
        epoch_3[0]["pixel_values"], epoch_3[3]["pixel_values"]
    )
    assert item_seed(0, 3, 1) == item_seed(0, 3, 1) != item_seed(0, 3, 2)


def test_batches_do_not_depend_on_the_number_of_workers() -> None:
    paired = SemiSupervisedSegmentationDataset(
        make_dataset(9, constant_images=False),
        [0, 1],
        transform=SegmentationTransform(train=True, crop_size=8),
        num_labels=NUM_LABELS,
        cutmix=True,
    )
    paired.set_epoch(2)
    batches = {}
    for num_workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            paired, batch_size=3, num_workers=num_workers, collate_fn=collate_semi_supervised
        )
        batches[num_workers] = list(loader)
    for batch_0, batch_2 in zip(batches[0], batches[2], strict=True):
        assert batch_0.keys() == batch_2.keys()
        assert all(torch.equal(batch_0[key], batch_2[key]) for key in batch_0)
    assert batches[0][0]["cutmix_masks"].shape == (3, 1, 8, 8)


def test_separate_unlabeled_dataset_without_labels() -> None:
    labeled = make_dataset(3)
    unlabeled = make_dataset(5, with_labels=False, with_ids=False).rename_column("image", "pixels")
    paired = SemiSupervisedSegmentationDataset(
        labeled,
        transform=identity_transform(),
        num_labels=NUM_LABELS,
        unlabeled_dataset=unlabeled,
        unlabeled_image_column="pixels",
    )
    assert len(paired) == 5 and paired.num_labeled == 3
    assert decode_row_code(paired[4]["unlabeled_pixel_values"]) == 4
    assert decode_row_code(paired[4]["pixel_values"]) == 1


def test_empty_sets_are_rejected() -> None:
    dataset = make_dataset(4)
    with pytest.raises(ValueError, match="labelled set is empty"):
        SemiSupervisedSegmentationDataset(dataset, [], transform=identity_transform(), num_labels=NUM_LABELS)
    with pytest.raises(ValueError, match="unlabelled set is empty"):
        SemiSupervisedSegmentationDataset(dataset, [0, 1, 2, 3], transform=identity_transform(), num_labels=5)
    with pytest.raises(ValueError, match="unlabelled set is empty"):
        SemiSupervisedSegmentationDataset(
            dataset,
            [0],
            transform=identity_transform(),
            num_labels=NUM_LABELS,
            unlabeled_dataset=dataset,
            unlabeled_indices=[],
        )


def test_bad_mask_values_name_the_row_and_id() -> None:
    dataset = make_dataset(4)
    columns = dataset.cast_column("label", datasets.Image(decode=False)).to_dict()
    bad_mask = np.zeros((12, 16), dtype=np.uint8)
    bad_mask[3, 4] = 7
    bad_mask[0, 0] = 255  # the ignore index is allowed
    columns["label"][2] = {"bytes": png_bytes(bad_mask, "L"), "path": None}
    dataset = datasets.Dataset.from_dict(columns, features=dataset.features)
    paired = SemiSupervisedSegmentationDataset(
        dataset, [0, 2], transform=identity_transform(), num_labels=NUM_LABELS
    )
    paired[0]
    with pytest.raises(ValueError, match=r"split 'train' row 2, id 'img_002'.*values \[7\]"):
        paired[1]
    with pytest.raises(ValueError, match=r"row 2.*values \[7\]"):
        SupervisedSegmentationDataset(dataset, num_labels=NUM_LABELS)[2]


def test_dataset_size_mismatch_names_the_sample() -> None:
    dataset = make_dataset(2)
    columns = dataset.cast_column("label", datasets.Image(decode=False)).to_dict()
    columns["label"][1] = {"bytes": png_bytes(np.zeros((12, 15), dtype=np.uint8), "L"), "path": None}
    dataset = datasets.Dataset.from_dict(columns, features=dataset.features)
    with pytest.raises(ValueError, match=r"id 'img_001'.*differ in size"):
        SupervisedSegmentationDataset(dataset, num_labels=NUM_LABELS)[1]


def test_missing_columns_list_the_available_ones() -> None:
    dataset = make_dataset(2)
    with pytest.raises(ValueError, match=r"\['mask'\] not found.*\['image', 'id', 'label'\]"):
        check_columns(dataset, "image", "mask")
    with pytest.raises(ValueError, match="available columns"):
        SemiSupervisedSegmentationDataset(
            dataset, [0], transform=identity_transform(), num_labels=NUM_LABELS, label_column="segmentation"
        )


def test_collate_stacks_every_key_and_reports_shape_mismatches() -> None:
    evaluation = SupervisedSegmentationDataset(make_dataset(3), num_labels=NUM_LABELS)
    batch = collate_semi_supervised([evaluation[index] for index in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 12, 16) and batch["labels"].shape == (3, 12, 16)
    with pytest.raises(ValueError, match="eval_size"):
        collate_semi_supervised([{"labels": torch.zeros(2, 2)}, {"labels": torch.zeros(2, 3)}])


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def test_load_save_to_disk_folder(tmp_path: Path) -> None:
    dataset_dict = datasets.DatasetDict({"train": make_dataset(3), "validation": make_dataset(2)})
    dataset_dict.save_to_disk(str(tmp_path / "saved"))
    loaded = load_segmentation_dataset(str(tmp_path / "saved"))
    assert set(loaded) == {"train", "validation"}
    assert loaded["train"]["id"][:] == ["img_000", "img_001", "img_002"]
    make_dataset(2).save_to_disk(str(tmp_path / "single"))
    assert list(load_segmentation_dataset(str(tmp_path / "single"))) == ["train"]


def test_load_parquet_folder(tmp_path: Path) -> None:
    folder = tmp_path / "parquet" / "data"
    folder.mkdir(parents=True)
    make_dataset(3).to_parquet(str(folder / "train-00000-of-00002.parquet"))
    make_dataset(2).to_parquet(str(folder / "train-00001-of-00002.parquet"))
    make_dataset(2).to_parquet(str(folder / "validation.parquet"))
    loaded = load_segmentation_dataset(str(tmp_path / "parquet"), cache_dir=str(tmp_path / "cache"))
    assert {split: len(loaded[split]) for split in loaded} == {"train": 5, "validation": 2}
    item = SupervisedSegmentationDataset(loaded["train"], num_labels=NUM_LABELS)[4]
    assert item["labels"].shape == (12, 16)


def test_load_imagefolder_with_mask_metadata(tmp_path: Path) -> None:
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    lines = ["file_name,mask_file_name"]
    for row in range(3):
        PILImage.fromarray(row_code_image(row, 6, 8)).save(folder / f"image_{row}.png")
        PILImage.fromarray(np.full((6, 8), row, dtype=np.uint8), "L").save(folder / f"mask_{row}.png")
        lines.append(f"image_{row}.png,mask_{row}.png")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    loaded = load_segmentation_dataset(str(tmp_path / "images"), cache_dir=str(tmp_path / "cache"))
    assert loaded["train"].column_names == ["image", "mask"]
    evaluation = SupervisedSegmentationDataset(loaded["train"], num_labels=NUM_LABELS, label_column="mask")
    assert sorted(int(evaluation[row]["labels"][0, 0]) for row in range(3)) == [0, 1, 2]


def test_hub_id_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    # The flag is read at import time, so patch the module constants as well as the environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match=r"Hub could not be reached.*local path"):
        load_segmentation_dataset("no-such-owner/no-such-dataset", cache_dir=str(tmp_path))


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_segmentation_dataset(str(tmp_path / "absent"))


def test_load_synthetic_by_name(tmp_path: Path) -> None:
    loaded = load_segmentation_dataset("synthetic", cache_dir=str(tmp_path), num_train=4, num_val=2)
    assert {split: len(loaded[split]) for split in loaded} == {"train": 4, "validation": 2}


# ---------------------------------------------------------------------------------------------------------------
# Labelled split selection
# ---------------------------------------------------------------------------------------------------------------


def test_select_by_ids_file(tmp_path: Path) -> None:
    dataset = make_dataset(10)
    split_file = tmp_path / "labeled.txt"
    split_file.write_text("img_007\n\nimg_002\n  img_005  \n")
    assert read_split_ids(split_file) == ["img_007", "img_002", "img_005"]
    assert select_labeled_indices(dataset, labeled_ids_file=str(split_file)) == [2, 5, 7]


def test_unknown_and_duplicate_ids_are_reported(tmp_path: Path) -> None:
    dataset = make_dataset(5)
    split_file = tmp_path / "labeled.txt"
    split_file.write_text("\n".join(["img_001"] + [f"2007_{number:06d}" for number in range(8)]))
    with pytest.raises(ValueError, match=r"8 of the 9 ids .* e\.g\. \['2007_000000', '2007_000001'"):
        select_labeled_indices(dataset, labeled_ids_file=split_file)
    split_file.write_text("img_001\nimg_001\n")
    with pytest.raises(ValueError, match="more than once"):
        select_labeled_indices(dataset, labeled_ids_file=split_file)


def test_ids_are_row_indices_without_an_id_column(tmp_path: Path) -> None:
    split_file = tmp_path / "labeled.txt"
    split_file.write_text("3\n0\n")
    assert select_labeled_indices(make_dataset(5, with_ids=False), labeled_ids_file=split_file) == [0, 3]


def test_select_by_fraction_or_count_is_seeded() -> None:
    dataset = make_dataset(40)
    by_fraction = select_labeled_indices(dataset, labeled_fraction=1 / 8, split_seed=3)
    assert len(by_fraction) == 5 and by_fraction == sorted(by_fraction)
    assert by_fraction == select_labeled_indices(dataset, labeled_fraction=0.125, split_seed=3)
    assert by_fraction != select_labeled_indices(dataset, labeled_fraction=0.125, split_seed=4)
    by_count = select_labeled_indices(dataset, labeled_count=7, split_seed=0)
    assert len(set(by_count)) == 7 and all(0 <= row < 40 for row in by_count)
    with pytest.raises(ValueError, match="Exactly one"):
        select_labeled_indices(dataset, labeled_fraction=0.5, labeled_count=3)
    with pytest.raises(ValueError, match="Exactly one"):
        select_labeled_indices(dataset)
    with pytest.raises(ValueError, match="labeled_count"):
        select_labeled_indices(dataset, labeled_count=41)


def test_split_fingerprint_is_stable_and_order_independent() -> None:
    fingerprint = split_fingerprint([5, 1, 3])
    assert fingerprint == split_fingerprint([1, 3, 5]) == split_fingerprint(np.array([3, 5, 1]))
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint)
    assert fingerprint != split_fingerprint([1, 3, 6])
    # A fixed formula: the same value in every process and version of Python.
    assert split_fingerprint([0, 1, 2]) == "c0be322c1ad6af50"


@needs_official_splits
def test_reads_the_official_voc_split_file() -> None:
    ids = read_split_ids(OFFICIAL_SPLIT_FILE)
    assert len(ids) == 1323 and len(set(ids)) == 1323
    assert ids[0] == "2007_000032" and all(re.fullmatch(r"\d{4}_\d{6}", sample_id) for sample_id in ids)
    # Look the ids up in a dataset holding them plus unlabelled extras (ids only: images are not decoded).
    extra_ids = [f"2099_{number:06d}" for number in range(50)]
    dataset = datasets.Dataset.from_dict({"id": extra_ids + ids[::-1]})
    rows = select_labeled_indices(dataset, labeled_ids_file=OFFICIAL_SPLIT_FILE)
    assert rows == list(range(50, 50 + 1323))


def test_split_lines_in_every_official_format(tmp_path: Path) -> None:
    assert split_line_id("2007_000032") == "2007_000032"
    cityscapes_line = (
        "/images/train/jena_000078_000019.png\t/segmentation/train/jena_000078_000019_gtFine.png"
    )
    assert split_line_id(cityscapes_line) == "jena_000078_000019"
    official_layout = "leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png\tgtFine/train/jena/x.png"
    assert split_line_id(official_layout) == "jena_000078_000019"
    segnet_line = "/SegNet/CamVid/train/0001TP_006690.png /SegNet/CamVid/trainannot/0001TP_006690.png"
    assert split_line_id(segnet_line) == "0001TP_006690"
    assert split_line_id("JPEGImages/2007_000032.jpg") == "2007_000032"
    assert split_line_id("frame.001") == "frame.001"
    split_file = tmp_path / "labeled.txt"
    split_file.write_bytes(
        b"2007_000032\r\n\r\n2007_000039\r\n"
    )  # Windows line ends, as in the PseudoSeg lists
    assert read_split_ids(split_file) == ["2007_000032", "2007_000039"]
    split_file.write_text(f"{cityscapes_line}\n")
    dataset = datasets.Dataset.from_dict({"id": ["jena_000032_000019", "jena_000078_000019"]})
    assert select_indices_from_ids_file(dataset, split_file) == [1]
    split_file.write_text("/images/train/jena_000099_000019.png\t/segmentation/train/x.png\n")
    with pytest.raises(
        ValueError, match=r"1 of the 1 ids .*\['jena_000099_000019'\] .*look like \['jena_000032"
    ):
        select_indices_from_ids_file(dataset, split_file)


@needs_official_splits
@pytest.mark.parametrize(
    "folder, num_rows, counts",
    [
        ("voc", 10582, {16: 662, 8: 1323, 4: 2646, 2: 5291}),
        ("cityscapes/subset_train", 2975, {16: 186, 8: 372, 4: 744, 2: 1488}),
    ],
)
def test_official_lists_partition_the_training_set(
    folder: str, num_rows: int, counts: dict[int, int]
) -> None:
    def ids(kind: str, denominator: int) -> list[str]:
        return read_split_ids(OFFICIAL_SPLITS_DIR / folder / f"train_aug_{kind}_1-{denominator}.txt")

    all_ids = set(ids("labeled", 2)) | set(ids("unlabeled", 2))
    assert len(all_ids) == num_rows
    training = datasets.Dataset.from_dict({"id": sorted(all_ids)})
    for denominator, count in counts.items():
        labeled, unlabeled = ids("labeled", denominator), ids("unlabeled", denominator)
        assert len(labeled) == count and not set(labeled) & set(unlabeled)
        assert set(labeled) | set(unlabeled) == all_ids
        labeled_file = OFFICIAL_SPLITS_DIR / folder / f"train_aug_labeled_1-{denominator}.txt"
        assert len(select_labeled_indices(training, labeled_ids_file=labeled_file)) == count
        # `--labeled_fraction 1/d` labels as many rows as the official list (rounded up).
        assert len(select_labeled_indices(training, labeled_fraction=1 / denominator)) == count


@needs_official_splits
def test_official_cityscapes_lists_name_the_converted_ids() -> None:
    train_ids = read_split_ids(OFFICIAL_SPLITS_DIR / "cityscapes" / "train.txt")
    val_ids = read_split_ids(OFFICIAL_SPLITS_DIR / "cityscapes" / "val.txt")
    assert (len(train_ids), len(val_ids)) == (2975, 500) and train_ids[0] == "jena_000078_000019"
    assert all(re.fullmatch(r"[a-z]+_\d{6}_\d{6}", sample_id) for sample_id in train_ids + val_ids)
    labeled = read_split_ids(
        OFFICIAL_SPLITS_DIR / "cityscapes" / "subset_train" / "train_aug_labeled_1-8.txt"
    )
    assert len(labeled) == 372 and set(labeled) <= set(train_ids)


def test_fraction_counts_round_up_exactly() -> None:
    dataset = datasets.Dataset.from_dict({"id": [str(row) for row in range(30)]})
    assert len(select_labeled_indices(dataset, labeled_fraction=0.1)) == 3  # 0.1 * 30 is 3.0000000000000004
    assert len(select_labeled_indices(dataset, labeled_fraction=1 / 16)) == 2  # 1.875 rounds up
    assert len(select_labeled_indices(dataset, labeled_fraction=Fraction(1, 4))) == 8  # 7.5 rounds up


def test_seeded_partitions_match_the_fraction_draw(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_dict({"id": [f"img_{row:03d}" for row in range(30)]})
    fractions = [parse_fraction(text) for text in ("1/16", "1/8", "0.25", "1/2")]
    partitions = make_labeled_partitions(dataset, fractions, split_seed=3)
    assert {tag: len(labeled) for tag, (labeled, _) in partitions.items()} == {
        "1-16": 2,
        "1-8": 4,
        "1-4": 8,
        "1-2": 15,
    }
    for labeled, unlabeled in partitions.values():
        assert labeled == sorted(labeled) and unlabeled == sorted(unlabeled)
        assert sorted(labeled + unlabeled) == dataset["id"]
    assert make_labeled_partitions(dataset, fractions, split_seed=3) == partitions
    assert make_labeled_partitions(dataset, fractions, split_seed=4) != partitions

    summary = write_labeled_partitions(partitions, tmp_path / "splits")
    labeled_file = tmp_path / "splits" / "labeled_1-8.txt"
    assert labeled_file.read_text() == "".join(f"{sample_id}\n" for sample_id in partitions["1-8"][0])
    assert read_split_ids(tmp_path / "splits" / "unlabeled_1-8.txt") == partitions["1-8"][1]
    assert summary["1-8"]["labeled_sha256"] == hashlib.sha256(labeled_file.read_bytes()).hexdigest()
    # Training from the file uses the rows that `--labeled_fraction 0.125 --split_seed 3` draws.
    assert select_labeled_indices(dataset, labeled_ids_file=labeled_file) == select_labeled_indices(
        dataset, labeled_fraction=0.125, split_seed=3
    )

    with pytest.raises(ValueError, match=r"'id' holds 1 id\(s\) more than once.*\['a'\]"):
        make_labeled_partitions(datasets.Dataset.from_dict({"id": ["a", "b", "a"]}), [Fraction(1, 2)])
    for text in ("0", "3/2", "one eighth"):
        with pytest.raises(ValueError, match=re.escape(repr(text))):
            parse_fraction(text)


def test_make_splits_script(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_dict({"id": [f"img_{row:03d}" for row in range(20)]})
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "data"))
    output = tmp_path / "splits"
    arguments = ["--dataset", str(tmp_path / "data"), "--fractions", "1/4", "1/2", "--seed", "1"]
    run_script("make_splits", *arguments, "--output", str(output))
    manifest = json.loads((output / "splits.json").read_text())
    assert manifest["seed"] == 1 and manifest["num_rows"] == 20
    assert {tag: entry["num_labeled"] for tag, entry in manifest["partitions"].items()} == {
        "1-4": 5,
        "1-2": 10,
    }
    assert (
        read_split_ids(output / "labeled_1-4.txt")
        == make_labeled_partitions(dataset, [Fraction(1, 4)], split_seed=1)["1-4"][0]
    )


def test_split_record_names_the_files_or_the_draw(tmp_path: Path) -> None:
    split_file = tmp_path / "labeled.txt"
    split_file.write_text("img_002\nimg_005\n")
    record = split_record(DataArguments(dataset_name="x", labeled_ids_file=str(split_file)), 10, [2, 5], 8)
    assert record == {
        "method": "ids_file",
        "train_split": "train",
        "num_train_rows": 10,
        "labeled_ids_file": str(split_file),
        "labeled_ids_file_sha256": hashlib.sha256(b"img_002\nimg_005\n").hexdigest(),
        "unlabeled_ids_file": None,
        "unlabeled_ids_file_sha256": None,
        "labeled_fraction": None,
        "labeled_count": None,
        "split_seed": None,
        "num_labeled": 2,
        "num_unlabeled": 8,
        "fingerprint": split_fingerprint([2, 5]),
    }
    drawn = split_record(DataArguments(dataset_name="x", labeled_fraction=0.5, split_seed=7), 4, [0, 3], 2)
    assert (drawn["method"], drawn["split_seed"], drawn["labeled_ids_file_sha256"]) == ("fraction", 7, None)


def test_unlabeled_ids_file_selects_the_unlabeled_rows(tmp_path: Path) -> None:
    from cps_hf.experiment import build_data
    from cps_hf.trainer import CPSTrainingArguments

    datasets.DatasetDict({"train": make_dataset(8)}).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "labeled.txt").write_text("img_001\nimg_004\n")
    # Overlapping lists (as PseudoSeg's) are accepted, with a warning.
    (tmp_path / "unlabeled.txt").write_text("img_004\nimg_006\nimg_007\n")
    data_args = DataArguments(
        dataset_name=str(tmp_path / "data"),
        eval_split=None,
        labeled_ids_file=str(tmp_path / "labeled.txt"),
        unlabeled_ids_file=str(tmp_path / "unlabeled.txt"),
        num_labels=NUM_LABELS,
        crop_size=8,
    )
    training_args = CPSTrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    data = build_data(data_args, training_args, backbone="test_resnet")
    assert (data.num_labeled, data.num_unlabeled) == (2, 3)
    assert (
        data.split["unlabeled_ids_file_sha256"] == hashlib.sha256(b"img_004\nimg_006\nimg_007\n").hexdigest()
    )
    assert list(data.train_dataset.labeled.rows) == [1, 4]
    assert list(data.train_dataset.unlabeled.rows) == [4, 6, 7]
