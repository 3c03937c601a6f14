"""A procedurally generated segmentation dataset that ships with the package (no download).

Every image shows 1-4 objects of four classes on a cluttered background. A class is defined by its shape *and*
its texture:

| id | name               | shape                       | texture                          |
|----|--------------------|-----------------------------|----------------------------------|
| 0  | `background`       | everything else             | gradient, smooth noise, clutter  |
| 1  | `striped_disc`     | disc                        | parallel stripes                 |
| 2  | `checkered_square` | square                      | checkerboard                     |
| 3  | `dotted_triangle`  | equilateral triangle        | lattice of dots                  |
| 4  | `noisy_ring`       | annulus                     | per-pixel binary noise           |

Colours never give the class away: each object (and the background) draws its two colours from one shared
distribution. The background holds distractors that belong to class 0: thin strokes and elongated ellipses
textured like the objects (stripes, checkerboard, dots or noise), so texture alone is not enough and the model
has to use shape as well. Objects are drawn in random order at random positions, sizes and orientations and may
occlude one another; each pixel's label is the class of the topmost object covering it (labels are 0-4, no ignore
border).

Generation is deterministic per `(seed, split, index)` — sample `i` does not depend on how many samples are
requested — and takes well under a second for the default 640 images of 64x64. The result is cached as a
`DatasetDict.save_to_disk` folder and written atomically, so a killed run never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
from PIL import Image as PILImage
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "SYNTHETIC_CLASS_NAMES",
    "SYNTHETIC_PALETTE",
    "default_synthetic_cache_dir",
    "make_synthetic_segmentation_dataset",
    "render_synthetic_sample",
    "synthetic_id2label",
    "synthetic_label2id",
    "synthetic_sample",
]

# The `dataset_name` of the built-in generated dataset.
SYNTHETIC_DATASET_NAME = "synthetic"
SYNTHETIC_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "striped_disc",
    "checkered_square",
    "dotted_triangle",
    "noisy_ring",
)
"""Class names of the synthetic dataset, indexed by class id."""

SYNTHETIC_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (128, 0, 0),
    (0, 128, 0),
    (128, 128, 0),
    (0, 0, 128),
)
"""Display colours of the label PNGs (palette mode; the palette index is the class id)."""

# Bump whenever the generated pixels change, so that stale caches are not reused.
_GENERATOR_VERSION = 2
_SPLIT_CODES = {"train": 0, "validation": 1}

ShapeFunction = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
TextureFunction = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def synthetic_id2label() -> dict[int, str]:
    """Returns the `id2label` mapping of the synthetic dataset (for a model config)."""
    return dict(enumerate(SYNTHETIC_CLASS_NAMES))


def synthetic_label2id() -> dict[str, int]:
    """Returns the `label2id` mapping of the synthetic dataset (for a model config)."""
    return {name: class_id for class_id, name in enumerate(SYNTHETIC_CLASS_NAMES)}


def default_synthetic_cache_dir() -> Path:
    """Root folder of the synthetic dataset cache: `~/.cache/cps_hf/synthetic`."""
    return Path.home() / ".cache" / "cps_hf" / "synthetic"


# Shapes take object-centred, rotated coordinates `(u, v)` in pixels and a size in pixels; they return a bool mask.


def _disc(u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    return u * u + v * v <= size * size


def _square(u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    # Half side 0.88 * size: about the area of the disc of radius `size`.
    half_side = 0.88 * size
    return (np.abs(u) <= half_side) & (np.abs(v) <= half_side)


def _triangle(u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    # Equilateral triangle with circumradius 1.35 * size (inradius half of that): three half-planes.
    inradius = 0.5 * 1.35 * size
    inside = np.ones(u.shape, dtype=bool)
    for corner in range(3):
        angle = 2.0 * math.pi * corner / 3.0
        inside &= u * math.cos(angle) + v * math.sin(angle) <= inradius
    return inside


def _ring(u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    squared_radius = u * u + v * v
    outer = 1.15 * size
    inner = 0.55 * size
    return (squared_radius <= outer * outer) & (squared_radius >= inner * inner)


# Textures return a bool map choosing between an object's two colours.


def _stripes(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(3.5, 6.0)
    return np.mod(u / period + rng.uniform(), 1.0) < 0.5


def _checkerboard(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cell = rng.uniform(2.0, 3.5)
    offset_u, offset_v = rng.uniform(0.0, cell, size=2)
    return (np.floor((u + offset_u) / cell) + np.floor((v + offset_v) / cell)) % 2 == 0


def _dots(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    spacing = rng.uniform(4.0, 6.5)
    offset_u, offset_v = rng.uniform(0.0, 1.0, size=2)
    # Distance to the nearest lattice point, in units of the spacing.
    fraction_u = np.mod(u / spacing + offset_u, 1.0) - 0.5
    fraction_v = np.mod(v / spacing + offset_v, 1.0) - 0.5
    return fraction_u * fraction_u + fraction_v * fraction_v < 0.3**2


def _binary_noise(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.random(u.shape) < 0.5


_OBJECT_CLASSES: tuple[tuple[ShapeFunction, TextureFunction], ...] = (
    (_disc, _stripes),  # 1: striped_disc
    (_square, _checkerboard),  # 2: checkered_square
    (_triangle, _dots),  # 3: dotted_triangle
    (_ring, _binary_noise),  # 4: noisy_ring
)
_TEXTURES: tuple[TextureFunction, ...] = tuple(texture for _, texture in _OBJECT_CLASSES)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two contrasting RGB colours in [0, 1] from the distribution shared by all classes and the background."""
    first = rng.uniform(0.0, 1.0, size=3)
    # Move the second colour away from the first, towards the far end of the brightness range.
    direction = 1.0 if first.mean() < 0.5 else -1.0
    second = np.clip(first + direction * rng.uniform(0.25, 0.55) + rng.normal(0.0, 0.1, size=3), 0.0, 1.0)
    if rng.random() < 0.5:
        first, second = second, first
    return first, second


def _rotated_coordinates(
    rows: np.ndarray, columns: np.ndarray, centre: np.ndarray, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    cosine, sine = math.cos(angle), math.sin(angle)
    delta_rows = rows - centre[0]
    delta_columns = columns - centre[1]
    return delta_columns * cosine + delta_rows * sine, -delta_columns * sine + delta_rows * cosine


def _smooth_noise(rng: np.random.Generator, image_size: int, grid_size: int, scale: float) -> np.ndarray:
    """Low-frequency RGB noise: a coarse random grid upsampled bilinearly, `(image_size, image_size, 3)`."""
    coarse = rng.normal(0.0, scale, size=(grid_size, grid_size, 3))
    positions = np.linspace(0.0, grid_size - 1.0, image_size)
    lower = np.floor(positions).astype(np.int64).clip(0, grid_size - 2)
    weight = positions - lower
    # (image_size, grid_size) linear-interpolation matrix, applied along both axes.
    interpolation = np.zeros((image_size, grid_size))
    interpolation[np.arange(image_size), lower] = 1.0 - weight
    interpolation[np.arange(image_size), lower + 1] = weight
    return np.einsum("ig,ghc,jh->ijc", interpolation, coarse, interpolation)


def _paint_background(
    rng: np.random.Generator, rows: np.ndarray, columns: np.ndarray, image_size: int
) -> np.ndarray:
    start_colour, end_colour = _colour_pair(rng)
    direction = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (columns * math.cos(direction) + rows * math.sin(direction)) / image_size
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    image = start_colour + (end_colour - start_colour) * (rng.uniform(0.2, 0.8) * ramp)[..., None]
    return image + _smooth_noise(rng, image_size, grid_size=4, scale=0.08)


def _paint_distractors(
    rng: np.random.Generator, image: np.ndarray, rows: np.ndarray, columns: np.ndarray, image_size: int
) -> None:
    """Draws background-class clutter in place: thin strokes and elongated textured ellipses."""
    for _ in range(int(rng.integers(1, 4))):
        start = rng.uniform(0.0, image_size, size=2)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        length = rng.uniform(0.3, 0.8) * image_size
        half_width = rng.uniform(0.5, 1.3)
        along, across = _rotated_coordinates(rows, columns, start, angle)
        stroke = (along >= 0.0) & (along <= length) & (np.abs(across) <= half_width)
        image[stroke] = rng.uniform(0.0, 1.0, size=3)
    for _ in range(int(rng.integers(1, 3))):
        centre = rng.uniform(0.1, 0.9, size=2) * image_size
        angle = rng.uniform(0.0, 2.0 * math.pi)
        semi_major = rng.uniform(0.12, 0.25) * image_size
        semi_minor = semi_major / rng.uniform(2.5, 4.0)
        along, across = _rotated_coordinates(rows, columns, centre, angle)
        ellipse = (along / semi_major) ** 2 + (across / semi_minor) ** 2 <= 1.0
        texture = _TEXTURES[int(rng.integers(len(_TEXTURES)))](along, across, rng)
        first, second = _colour_pair(rng)
        image[ellipse] = np.where(texture[..., None], first, second)[ellipse]


def render_synthetic_sample(rng: np.random.Generator, image_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Renders one synthetic image and its label map.

    Args:
        rng (`np.random.Generator`):
            Source of all randomness.
        image_size (`int`, *optional*, defaults to 64):
            Height and width in pixels.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: the image, uint8 `(image_size, image_size, 3)`, and the label map, uint8
        `(image_size, image_size)` with class ids in `[0, len(SYNTHETIC_CLASS_NAMES))`.
    """
    # Pixel-centre coordinates, (image_size, image_size) each.
    rows, columns = np.meshgrid(
        np.arange(image_size, dtype=np.float64) + 0.5,
        np.arange(image_size, dtype=np.float64) + 0.5,
        indexing="ij",
    )
    image = _paint_background(rng, rows, columns, image_size)
    _paint_distractors(rng, image, rows, columns, image_size)
    label = np.zeros((image_size, image_size), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        class_id = int(rng.integers(1, len(SYNTHETIC_CLASS_NAMES)))
        shape, texture = _OBJECT_CLASSES[class_id - 1]
        centre = rng.uniform(0.12, 0.88, size=2) * image_size
        size = rng.uniform(0.09, 0.19) * image_size
        u, v = _rotated_coordinates(rows, columns, centre, rng.uniform(0.0, 2.0 * math.pi))
        inside = shape(u, v, size)
        first, second = _colour_pair(rng)
        image[inside] = np.where(texture(u, v, rng)[..., None], first, second)[inside]
        label[inside] = class_id
    image += rng.normal(0.0, 0.03, size=image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), label


def synthetic_sample(split: str, index: int, image_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of a split of the synthetic dataset generated with `seed` (see [`render_synthetic_sample`])."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"The synthetic dataset has the splits {sorted(_SPLIT_CODES)}, got {split!r}.")
    return render_synthetic_sample(np.random.default_rng([seed, _SPLIT_CODES[split], index]), image_size)


def _encode_png(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    image = PILImage.fromarray(array)
    if palette is not None:
        image = image.convert("P")  # from mode L: keeps the values as palette indices
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _generate_split(split: str, num_samples: int, image_size: int, seed: int) -> datasets.Dataset:
    palette = [channel for colour in SYNTHETIC_PALETTE for channel in colour]
    ids, images, labels = [], [], []
    for index in range(num_samples):
        image, label = synthetic_sample(split, index, image_size, seed)
        ids.append(f"{split}_{index:05d}")
        images.append({"bytes": _encode_png(image), "path": None})
        labels.append({"bytes": _encode_png(label, palette), "path": None})
    features = datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Image()}
    )
    # JSON, so that the class names survive `save_to_disk`/`to_parquet` copies of the dataset.
    description = {
        "dataset": "cps_hf synthetic segmentation (shape + texture classes on cluttered backgrounds)",
        "class_names": list(SYNTHETIC_CLASS_NAMES),
    }
    info = datasets.DatasetInfo(description=json.dumps(description), features=features)
    return datasets.Dataset.from_dict(
        {"id": ids, "image": images, "label": labels}, features=features, info=info, split=split
    )


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    was_enabled = datasets.utils.is_progress_bar_enabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.enable_progress_bars()


def make_synthetic_segmentation_dataset(
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 96,
    seed: int = 0,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Generates (or loads from the cache) the synthetic shape-and-texture segmentation dataset.

    Args:
        num_train (`int`, *optional*, defaults to 512):
            Number of training samples (split `"train"`).
        num_val (`int`, *optional*, defaults to 128):
            Number of validation samples (split `"validation"`).
        image_size (`int`, *optional*, defaults to 96):
            Height and width of every image; all samples have the same size.
        seed (`int`, *optional*, defaults to 0):
            Generation seed. Sample `i` of a split depends only on `(seed, split, i)`.
        cache_dir (`str`, *optional*):
            Root of the cache; the dataset is stored in `<cache_dir>/<params-hash>` as a `save_to_disk` folder and
            reloaded from there on the next call. Defaults to `~/.cache/cps_hf/synthetic`. If the folder cannot be
            written, a warning is logged and the in-memory dataset is returned.

    Returns:
        `datasets.DatasetDict` with splits `"train"` and `"validation"` and columns `id` (`str`), `image`
        (`datasets.Image`, RGB PNG) and `label` (`datasets.Image`, palette PNG whose indices are the class ids in
        `[0, 5)`). Class names: [`SYNTHETIC_CLASS_NAMES`] / [`synthetic_id2label`], also stored as JSON
        `{"class_names": [...]}` in each split's `info.description`.

    Raises:
        ValueError: for a non-positive sample count or an image size below 16.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(
            f"`num_train` and `num_val` must be >= 1, got num_train={num_train}, num_val={num_val}."
        )
    if image_size < 16:
        raise ValueError(f"`image_size` must be >= 16, got {image_size}.")
    parameters = {
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "version": _GENERATOR_VERSION,
    }
    parameters_hash = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:16]
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_synthetic_cache_dir()
    cached_path = cache_root / parameters_hash

    with _quiet_progress_bars():
        if (cached_path / "dataset_dict.json").is_file():
            try:
                logger.info(f"Loading the synthetic dataset from the cache at {cached_path}.")
                return datasets.load_from_disk(str(cached_path))
            except Exception as error:  # a damaged cache is regenerated rather than fatal
                logger.warning(f"Discarding the unreadable synthetic dataset cache at {cached_path}: {error}")
                shutil.rmtree(cached_path, ignore_errors=True)

        logger.info(f"Generating the synthetic dataset ({num_train} train + {num_val} validation images).")
        dataset_dict = datasets.DatasetDict(
            {
                "train": _generate_split("train", num_train, image_size, seed),
                "validation": _generate_split("validation", num_val, image_size, seed),
            }
        )
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
            temporary_path = Path(tempfile.mkdtemp(prefix=f".{parameters_hash}-tmp-", dir=cache_root))
        except OSError as error:
            logger.warning(
                f"Could not create the synthetic dataset cache in {cache_root} ({error}); not caching."
            )
            return dataset_dict
        try:
            dataset_dict.save_to_disk(str(temporary_path))
            # Atomic publish: the cache folder either does not exist or is complete.
            os.replace(temporary_path, cached_path)
        except OSError as error:
            shutil.rmtree(temporary_path, ignore_errors=True)
            if not (cached_path / "dataset_dict.json").is_file():
                logger.warning(f"Could not write the synthetic dataset cache at {cached_path} ({error}).")
                return dataset_dict
            # Another process published the same cache first: use that copy.
        return datasets.load_from_disk(str(cached_path))
