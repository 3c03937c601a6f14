"""Storing converted splits: `save_to_disk` (and parquet) folders, downscaled copies, Hub dataset repos."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import datasets
from datasets.table import embed_table_storage
from PIL import Image as PILImage
from transformers.utils import logging

from ..class_names import CLASS_NAMES_FILE, dataset_class_names, write_id2label

logger = logging.get_logger(__name__)


def _shared_class_names(dataset_dict: datasets.DatasetDict) -> list[str] | None:
    names = {split: dataset_class_names(dataset) for split, dataset in dataset_dict.items()}
    distinct = {tuple(split_names) for split_names in names.values() if split_names is not None}
    if len(distinct) > 1:
        raise ValueError(f"The splits name different classes: {names}.")
    return list(distinct.pop()) if distinct else None


def save_dataset(dataset_dict: datasets.DatasetDict, output: Path, parquet: bool = False) -> None:
    """Saves converted splits with `save_to_disk` (and optionally as parquet files).

    Args:
        dataset_dict (`datasets.DatasetDict`):
            The converted splits.
        output (`Path`):
            Target folder; load it back with `cps_hf.data.load_segmentation_dataset(str(output))`.
        parquet (`bool`, *optional*, defaults to `False`):
            Also write `output/parquet/<split>.parquet` with the image bytes embedded, and
            `output/parquet/id2label.json` naming the classes: a folder that `load_segmentation_dataset` also reads
            (class names included), e.g. to copy or upload elsewhere.
    """
    output = Path(output)
    dataset_dict.save_to_disk(str(output))
    if not parquet:
        return
    parquet_dir = output / "parquet"
    parquet_dir.mkdir(parents=True, exist_ok=True)
    for split, dataset in dataset_dict.items():
        # `to_parquet` keeps only paths of file-backed images; embedding first stores the bytes themselves.
        embedded = dataset.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
        embedded.to_parquet(str(parquet_dir / f"{split}.parquet"))
        logger.info(f"Wrote {parquet_dir / f'{split}.parquet'} ({len(dataset)} rows).")
    class_names = _shared_class_names(dataset_dict)
    if class_names is not None:
        write_id2label(parquet_dir / CLASS_NAMES_FILE, class_names)


def _downscaled_bytes(value: dict[str, bytes | str | None], factor: int, resample: int) -> bytes:
    with PILImage.open(io.BytesIO(value["bytes"])) as image:
        image.load()
        size = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
        resized = image.resize(size, resample=resample)
        buffer = io.BytesIO()
        resized.save(buffer, format="PNG")
    return buffer.getvalue()


def downscale_dataset(dataset_dict: datasets.DatasetDict, factor: int) -> datasets.DatasetDict:
    """Shrinks every image and mask by `factor` (images: antialiased bilinear, masks: nearest, so ids survive).

    For CPU-sized experiments on real data, e.g. CamVid's 360x480 frames at 180x240 with `factor=2`. Images are
    re-encoded as PNG (lossless); split info (class names) is kept.

    Args:
        dataset_dict (`datasets.DatasetDict`):
            Splits with `image` and `label` columns as written by the converters of this module.
        factor (`int`):
            Integer shrink factor (>= 1); each side becomes `round(side / factor)`.

    Returns:
        `datasets.DatasetDict`: the downscaled splits (the input when `factor == 1`).
    """
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"downscale factor must be an integer >= 1, got {factor!r}.")
    if factor == 1:
        return dataset_dict

    def shrink(batch: dict[str, list]) -> dict[str, list]:
        return {
            "image": [
                {"bytes": _downscaled_bytes(value, factor, PILImage.Resampling.BILINEAR), "path": None}
                for value in batch["image"]
            ],
            "label": [
                {"bytes": _downscaled_bytes(value, factor, PILImage.Resampling.NEAREST), "path": None}
                for value in batch["label"]
            ],
        }

    downscaled = {}
    for split, dataset in dataset_dict.items():
        undecoded = dataset.cast_column("image", datasets.Image(decode=False)).cast_column(
            "label", datasets.Image(decode=False)
        )
        shrunk = undecoded.map(shrink, batched=True, batch_size=64, desc=f"Downscaling {split} x1/{factor}")
        shrunk = shrunk.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())
        shrunk.info.description = dataset.info.description
        downscaled[split] = shrunk
    return datasets.DatasetDict(downscaled)


def push_dataset_to_hub(
    dataset_dict: datasets.DatasetDict, repo_id: str, *, private: bool = False, token: str | None = None
) -> None:
    """Uploads converted splits to a Hub dataset repo: parquet shards with embedded bytes
    (`DatasetDict.push_to_hub`) and an `id2label.json` naming the classes, which `load_segmentation_dataset(repo_id)`
    reads back.

    Args:
        dataset_dict (`datasets.DatasetDict`):
            The converted splits.
        repo_id (`str`):
            The dataset repo, e.g. `"me/voc-aug"` (created if needed).
        private (`bool`, *optional*, defaults to `False`):
            Create the repo as private.
        token (`str`, *optional*):
            Hub token; defaults to the stored login (`hf auth login`) or `HF_TOKEN`.

    Raises:
        ConnectionError: if offline mode is on (`HF_HUB_OFFLINE=1`) or the upload fails (the cause is chained).
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(
            f"Cannot push to the Hub dataset {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1). Unset it and log in "
            "(`hf auth login`), or share the saved folder instead."
        )
    class_names = _shared_class_names(dataset_dict)
    try:
        dataset_dict.push_to_hub(repo_id, private=private, token=token)
        if class_names is not None:
            with tempfile.TemporaryDirectory() as folder:
                HfApi(token=token).upload_file(
                    path_or_fileobj=write_id2label(Path(folder) / CLASS_NAMES_FILE, class_names),
                    path_in_repo=CLASS_NAMES_FILE,
                    repo_id=repo_id,
                    repo_type="dataset",
                    commit_message="Class names (id2label.json)",
                )
    # The Hub client's transport errors are not `OSError`s, so every failure is reported the same way.
    except Exception as error:
        raise ConnectionError(
            f"Could not push the dataset to the Hub repo {repo_id!r} ({type(error).__name__}: {error}). Check the "
            "connection and the token (`hf auth login` or HF_TOKEN)."
        ) from error
    logger.info(f"Pushed {dict(dataset_dict.num_rows)} rows to the Hub dataset {repo_id!r}.")
