import math

import numpy as np
import pytest
import torch

from cps_hf.masking import (
    _render_toggled_boxes,
    _sample_boxes,
    generate_cutmix_mask,
    generate_cutmix_masks,
    mix_with_mask,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rounding_tolerance(height: int, width: int) -> float:
    """Largest change of a box's area fraction caused by rounding both sides to whole pixels.

    |round(a) * round(b) - a * b| <= (a + b) / 2 + 1/4 with a <= height and b <= width.
    """
    return ((height + width) / 2 + 0.25) / (height * width)


def numpy_toggle_render(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    masks = np.zeros((boxes.shape[0], height, width), dtype=np.int64)
    for sample, sample_boxes in enumerate(boxes):
        for top, left, bottom, right in sample_boxes:
            masks[sample, top:bottom, left:right] = 1 - masks[sample, top:bottom, left:right]
    return masks


def test_masks_shape_dtype_and_binary_values():
    masks = generate_cutmix_masks(4, 32, 48, generator=seeded(0))
    assert masks.shape == (4, 1, 32, 48)
    assert masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks.sum() > 0


def test_masks_are_deterministic_per_seed():
    first = generate_cutmix_masks(4, 32, 32, generator=seeded(7))
    assert torch.equal(first, generate_cutmix_masks(4, 32, 32, generator=seeded(7)))
    assert not torch.equal(first, generate_cutmix_masks(4, 32, 32, generator=seeded(8)))


def test_single_box_is_an_inside_rectangle_with_expected_area():
    # num_boxes=1: the side scale is sqrt(1/1) = 1, so the box area fraction is p ~ U(0.25, 0.5) up to rounding.
    height, width = 40, 64
    masks = generate_cutmix_masks(300, height, width, generator=seeded(1), num_boxes=1)[:, 0]
    tolerance = rounding_tolerance(height, width)
    area_fractions = []
    for mask in masks:
        rows = mask.any(dim=1).nonzero().flatten()
        columns = mask.any(dim=0).nonzero().flatten()
        top, bottom = rows.min().item(), rows.max().item() + 1
        left, right = columns.min().item(), columns.max().item() + 1
        # A box wrapping around an edge would leave holes in its bounding box.
        assert mask[top:bottom, left:right].all()
        assert mask.sum().item() == (bottom - top) * (right - left)
        area_fractions.append(mask.mean().item())
    area_fractions = np.array(area_fractions)
    assert area_fractions.min() >= 0.25 - tolerance
    assert area_fractions.max() <= 0.5 + tolerance
    # p is uniform: mean 0.375, standard error of 300 draws about 0.004.
    assert abs(area_fractions.mean() - 0.375) < 0.02


def test_three_box_geometry_follows_reference():
    # Per box: area fraction p ~ U(0.25, 0.5); height fraction p**u in [p, 1], width fraction p / that;
    # both times sqrt(1/3). So each box covers p/3 in [0.0833, 0.1667] of the image, each side is at most
    # sqrt(1/3) = 0.577 of the image side and at least 0.25 * 0.577 = 0.144 of it.
    height, width = 48, 80
    boxes = _sample_boxes(500, height, width, seeded(2), num_boxes=3, area_range=(0.25, 0.5))
    assert boxes.shape == (500, 3, 4)
    top, left, bottom, right = boxes.unbind(-1)
    box_heights, box_widths = (bottom - top).double(), (right - left).double()
    assert (top >= 0).all() and (left >= 0).all() and (bottom <= height).all() and (right <= width).all()
    side_scale = math.sqrt(1 / 3)
    assert box_heights.max() <= round(side_scale * height) and box_widths.max() <= round(side_scale * width)
    assert box_heights.min() >= round(0.25 * side_scale * height)
    assert box_widths.min() >= round(0.25 * side_scale * width)
    area_fractions = box_heights * box_widths / (height * width)
    # Same rounding bound as rounding_tolerance, with sides at most side_scale * height and side_scale * width.
    tolerance = (side_scale * (height + width) / 2 + 0.25) / (height * width)
    assert area_fractions.min() >= 0.25 / 3 - tolerance
    assert area_fractions.max() <= 0.5 / 3 + tolerance
    # The random aspect ratio produces both tall and wide boxes.
    aspect = (box_heights / height) / (box_widths / width)
    assert (aspect > 1.5).any() and (aspect < 1 / 1.5).any()
    # Positions are uniform over the free range: box tops spread over the whole range of valid values.
    relative_top = top.double() / (height - box_heights).clamp(min=1)
    assert relative_top.min() < 0.1 and relative_top.max() > 0.9


def test_masks_toggle_overlapping_boxes():
    # area_range=(1, 1) with two boxes: each box is round(sqrt(1/2) * 10) = 7 px square in a 10 x 10 image,
    # so the two boxes always overlap and the overlap must be cleared.
    height = width = 10
    masks = generate_cutmix_masks(50, height, width, generator=seeded(3), num_boxes=2, area_range=(1.0, 1.0))
    boxes = _sample_boxes(50, height, width, seeded(3), num_boxes=2, area_range=(1.0, 1.0))
    assert ((boxes[..., 2:] - boxes[..., :2]) == 7).all()
    expected = numpy_toggle_render(boxes.numpy(), height, width)
    np.testing.assert_array_equal(masks[:, 0].numpy(), expected)
    assert (masks.sum(dim=(1, 2, 3)) < 2 * 49).all()


def test_render_toggled_boxes_by_hand():
    boxes = torch.tensor([[[0, 0, 3, 3], [1, 1, 4, 4], [0, 3, 1, 4]]])
    expected = torch.tensor(
        [
            [1, 1, 1, 1],
            [1, 0, 0, 1],
            [1, 0, 0, 1],
            [0, 1, 1, 1],
        ],
        dtype=torch.float32,
    )
    masks = _render_toggled_boxes(boxes, 4, 4, "cpu")
    assert masks.shape == (1, 1, 4, 4)
    assert torch.equal(masks[0, 0], expected)


def test_single_mask_helper_matches_batched_generator():
    mask = generate_cutmix_mask(16, 24, generator=seeded(5))
    assert mask.shape == (1, 16, 24)
    assert torch.equal(mask, generate_cutmix_masks(1, 16, 24, generator=seeded(5))[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"height": 0},
        {"width": -1},
        {"num_boxes": 0},
        {"area_range": (0.0, 0.5)},
        {"area_range": (0.6, 0.5)},
        {"area_range": (0.5, 1.5)},
    ],
)
def test_generate_cutmix_masks_rejects_bad_arguments(kwargs):
    arguments = {"batch_size": 2, "height": 8, "width": 8, **kwargs}
    with pytest.raises(ValueError):
        generate_cutmix_masks(**arguments)


def test_mix_with_mask_on_images():
    generator = seeded(6)
    images_0 = torch.randn(2, 3, 4, 4, generator=generator)
    images_1 = torch.randn(2, 3, 4, 4, generator=generator)
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, :2] = 1
    masks[1, 0, :, 1] = 1
    mixed = mix_with_mask(images_0, images_1, masks)
    assert mixed.shape == images_0.shape
    for sample in range(2):
        for row in range(4):
            for column in range(4):
                source = images_1 if masks[sample, 0, row, column] == 1 else images_0
                assert torch.equal(mixed[sample, :, row, column], source[sample, :, row, column])


def test_mix_with_mask_on_label_maps_preserves_dtype():
    labels_0 = torch.zeros(2, 3, 3, dtype=torch.long)
    labels_1 = torch.full((2, 3, 3), 7, dtype=torch.long)
    masks = torch.zeros(2, 1, 3, 3)
    masks[0, 0, 1, :] = 1
    masks[1, 0, :, 2] = 1
    expected = torch.zeros(2, 3, 3, dtype=torch.long)
    expected[0, 1, :] = 7
    expected[1, :, 2] = 7
    for label_masks in (masks, masks[:, 0]):
        mixed = mix_with_mask(labels_0, labels_1, label_masks)
        assert mixed.dtype == torch.long
        assert torch.equal(mixed, expected)


def test_mix_with_mask_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same shape"):
        mix_with_mask(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="broadcast"):
        mix_with_mask(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 5, 5))
