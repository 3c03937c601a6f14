"""What every converter shares: how mask values become stored class ids, pairing images with masks, and the
streamed, cached construction of a split."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError
from PIL import Image as PILImage

from ..class_names import set_dataset_class_names
from ..decoding import IGNORE_INDEX, IMAGE_SUFFIXES, mask_class_ids

MAX_LISTED = 5
"""How many offending files or ids an error message lists."""
# Part of the cache key of a conversion: bump when the stored rows of a conversion change for the same sources.
_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class LabelEncoding:
    """How the values of a source mask become stored class ids."""

    lookup: np.ndarray
    """(256,) int16: the stored value of each source value, -1 where the source value is not allowed."""
    allowed: str
    """The allowed source values, in words, for error messages."""


def label_encoding(mapping: Mapping[int, int], allowed: str) -> LabelEncoding:
    lookup = np.full(256, -1, dtype=np.int16)
    for source_value, stored_value in mapping.items():
        lookup[source_value] = stored_value
    lookup[IGNORE_INDEX] = IGNORE_INDEX
    return LabelEncoding(lookup=lookup, allowed=allowed)


def class_id_encoding(num_classes: int, void_id: int | None = None) -> LabelEncoding:
    """Class ids `0 .. num_classes - 1` and 255 are kept; `void_id` (if any) becomes 255."""
    if not 1 <= num_classes < IGNORE_INDEX:
        raise ValueError(
            f"Masks are stored as 8-bit class ids with {IGNORE_INDEX} = ignore: between 1 and {IGNORE_INDEX - 1} "
            f"classes are supported, got {num_classes}."
        )
    mapping = {class_id: class_id for class_id in range(num_classes)}
    void = ""
    if void_id is not None:
        mapping[void_id] = IGNORE_INDEX
        void = f", void {void_id}"
    return label_encoding(
        mapping, f"the class ids 0..{num_classes - 1}{void} and the ignore index {IGNORE_INDEX}"
    )


# One sample: (id, image file, mask file, how the mask's values are stored).
Sample = tuple[str, Path, Path, LabelEncoding]


def _features() -> datasets.Features:
    return datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Image()}
    )


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {str(path)!r} does not exist or is not a folder.")
    return path


def list_images(folder: Path) -> dict[str, Path]:
    """Maps file stem -> path for the image files directly inside `folder`."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in files:
                raise ValueError(
                    f"Two files share the stem {path.stem!r} in {str(folder)!r}: {files[path.stem].name}, {path.name}."
                )
            files[path.stem] = path
    return files


def pair_by_stem(
    images: dict[str, Path], masks: dict[str, Path], images_dir: Path, masks_dir: Path
) -> list[tuple[str, Path, Path]]:
    unmatched_images = sorted(set(images) - set(masks))
    unmatched_masks = sorted(set(masks) - set(images))
    if unmatched_images or unmatched_masks:
        parts = []
        if unmatched_images:
            parts.append(
                f"{len(unmatched_images)} image(s) in {str(images_dir)!r} without a mask in {str(masks_dir)!r} "
                f"(first: {unmatched_images[:MAX_LISTED]})"
            )
        if unmatched_masks:
            parts.append(
                f"{len(unmatched_masks)} mask(s) in {str(masks_dir)!r} without an image "
                f"(first: {unmatched_masks[:MAX_LISTED]})"
            )
        raise ValueError("Images and masks do not pair up by file stem: " + "; ".join(parts) + ".")
    if not images:
        raise ValueError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) found in {str(images_dir)!r}.")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def read_mask(path: Path) -> np.ndarray:
    """The class ids of a mask file, in any of the single-channel modes of [`~cps_hf.data.MASK_MODES`]."""
    with PILImage.open(path) as mask:
        return mask_class_ids(mask, repr(str(path)))


def _encode_mask(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(values.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _mask_entry(path: Path, encoding: LabelEncoding) -> dict[str, bytes | str | None]:
    """Reads, checks and (if needed) remaps one mask; returns an `Image` feature entry."""
    values = read_mask(path)
    present = np.unique(values)
    bad = [int(value) for value in present if not 0 <= value <= 255 or encoding.lookup[value] < 0]
    if bad:
        raise ValueError(
            f"Mask {str(path)!r} holds values {bad[: MAX_LISTED * 2]} outside {encoding.allowed}."
        )
    # Palette PNGs (VOC) keep their bytes: their indices are the class ids, which is what the loaders decode.
    with PILImage.open(path) as mask:
        keep_bytes = mask.format == "PNG" and mask.mode in ("L", "P")
    if keep_bytes and np.array_equal(encoding.lookup[present], present):
        return {"bytes": path.read_bytes(), "path": None}
    return {"bytes": _encode_mask(encoding.lookup[values]), "path": None}


def _generate_rows(samples: Sequence[Sample]) -> Iterator[dict[str, object]]:
    for sample_id, image_path, mask_path, encoding in samples:
        yield {
            "id": sample_id,
            "image": {"bytes": image_path.read_bytes(), "path": None},
            "label": _mask_entry(mask_path, encoding),
        }


def _conversion_fingerprint(samples: Sequence[Sample], split: str, class_names: Sequence[str]) -> str:
    """Cache key of a conversion: the sources' paths, sizes and modification times, and how masks are stored."""
    digest = hashlib.sha256(
        f"cps_hf.converters:{_CONVERSION_VERSION}:{split}:{json.dumps(list(class_names))}".encode()
    )
    for sample_id, image_path, mask_path, encoding in samples:
        digest.update(sample_id.encode() + encoding.lookup.tobytes())
        for path in (image_path, mask_path):
            stat = path.stat()
            digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def build_split(
    samples: Sequence[Sample], split: str, class_names: Sequence[str], source_description: str
) -> datasets.Dataset:
    try:
        dataset = datasets.Dataset.from_generator(
            _generate_rows,
            features=_features(),
            gen_kwargs={"samples": list(samples)},
            split=split,
            fingerprint=_conversion_fingerprint(samples, split, class_names),
        )
    except DatasetGenerationError as error:
        # `datasets` wraps the generator's errors; the original names the offending file.
        if isinstance(error.__cause__, ValueError | OSError):
            raise error.__cause__ from None
        raise
    # JSON, so that the class names survive copies of the dataset (see `cps_hf.data.synthetic`).
    set_dataset_class_names(dataset, class_names, {"dataset": source_description})
    return dataset
