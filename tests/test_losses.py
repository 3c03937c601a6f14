import math

import pytest
import torch
import torch.nn.functional as F

from cps_hf.losses import (
    PSEUDO_LABEL_IGNORE_INDEX,
    cross_pseudo_supervision_loss,
    kept_pseudo_label_fraction,
    median_frequency_class_weights,
    ohem_cross_entropy,
    pseudo_labels_from_logits,
    supervised_cross_entropy,
)


def two_class_logits(true_class_margins: list[list[float]]) -> torch.Tensor:
    """(batch, 2, 1, width) logits whose class-0 score exceeds class 1 by the given margin per pixel.

    With label 0 everywhere, the true-class probability of a pixel is sigmoid(margin) and its CE is
    log(1 + exp(-margin)).
    """
    margins = torch.tensor(true_class_margins, dtype=torch.float64)
    return torch.stack([margins, torch.zeros_like(margins)], dim=1).unsqueeze(2)


def ce_of_margin(margin: float) -> float:
    return math.log(1.0 + math.exp(-margin))


def prob_of_margin(margin: float) -> float:
    return 1.0 / (1.0 + math.exp(-margin))


def manual_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over the masked pixels written with log_softmax + gather, independent of F.cross_entropy."""
    log_probs = logits.log_softmax(dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    if mask is None:
        return -log_probs.mean()
    return -(log_probs * mask).sum() / mask.sum()


# --- supervised cross-entropy ---------------------------------------------------------------------------------


def test_supervised_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[[[2.0, 1.0]], [[0.0, 3.0]]]])  # (1, 2, 1, 2)
    labels = torch.tensor([[[0, 0]]])
    pixel_0 = -(2.0 - math.log(math.exp(2.0) + math.exp(0.0)))
    pixel_1 = -(1.0 - math.log(math.exp(1.0) + math.exp(3.0)))
    loss = supervised_cross_entropy(logits, labels)
    assert loss.item() == pytest.approx((pixel_0 + pixel_1) / 2, rel=1e-6)


def test_supervised_cross_entropy_ignores_ignored_pixels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (2, 4, 4), generator=generator)
    labels[0, :2] = 255
    loss = supervised_cross_entropy(logits, labels)

    changed_logits = logits.clone()
    changed_logits[0, :, :2] = torch.randn(3, 2, 4, generator=generator) * 10
    assert supervised_cross_entropy(changed_logits, labels).item() == pytest.approx(loss.item(), rel=1e-6)
    valid = labels != 255
    expected = manual_ce(logits, labels.clamp(max=2), valid.float())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_supervised_cross_entropy_all_ignored_is_zero_with_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), 255)
    loss = supervised_cross_entropy(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_supervised_cross_entropy_custom_ignore_index():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, -1]]])
    loss = supervised_cross_entropy(logits, labels, ignore_index=-1)
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    assert loss.item() == pytest.approx(manual_ce(logits, labels.clamp(min=0), mask).item(), rel=1e-6)


def test_supervised_cross_entropy_rejects_mismatched_resolution():
    with pytest.raises(ValueError, match="spatial size"):
        supervised_cross_entropy(torch.randn(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))


# --- OHEM ------------------------------------------------------------------------------------------------------


MARGINS = [[2.0, 0.0, -1.0, 1.0]]  # true-class probabilities 0.881, 0.5, 0.269, 0.731


def test_ohem_keeps_only_pixels_at_or_below_threshold():
    logits = two_class_logits(MARGINS)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    # The smallest probability (0.269) is below 0.7, so the threshold stays 0.7: pixels 1 and 2 are kept.
    loss = ohem_cross_entropy(logits, labels, threshold=0.7, min_kept=1)
    assert loss.item() == pytest.approx((ce_of_margin(0.0) + ce_of_margin(-1.0)) / 2, rel=1e-9)


def test_ohem_min_kept_raises_threshold():
    logits = two_class_logits(MARGINS)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    # The 3rd smallest probability is 0.731 > 0.7: it becomes the threshold and pixel 3 joins pixels 1 and 2.
    assert prob_of_margin(1.0) > 0.7
    loss = ohem_cross_entropy(logits, labels, threshold=0.7, min_kept=3)
    expected = (ce_of_margin(0.0) + ce_of_margin(-1.0) + ce_of_margin(1.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_ohem_fewer_valid_than_min_kept_keeps_all_and_equals_plain_ce():
    logits = two_class_logits([[2.0, 0.0, -1.0, 1.0, 5.0]])
    labels = torch.tensor([[[0, 0, 0, 0, 255]]])
    plain = supervised_cross_entropy(logits, labels)
    for min_kept in (5, 6, 100):  # 4 valid pixels; 5 total pixels
        assert ohem_cross_entropy(logits, labels, min_kept=min_kept).item() == pytest.approx(
            plain.item(), rel=1e-9
        )
    # Exactly as many valid pixels as min_kept: the threshold is the largest probability, all are kept.
    assert ohem_cross_entropy(logits, labels, min_kept=4).item() == pytest.approx(plain.item(), rel=1e-9)


def test_ohem_min_kept_counts_pixels_over_the_whole_batch():
    # All probabilities are above 0.7: 0.953, 0.881 (image 0) and 0.818, 0.982 (image 1).
    logits = two_class_logits([[3.0, 2.0], [1.5, 4.0]])
    labels = torch.zeros(2, 1, 2, dtype=torch.long)
    loss = ohem_cross_entropy(logits, labels, threshold=0.7, min_kept=3)
    expected = (ce_of_margin(1.5) + ce_of_margin(2.0) + ce_of_margin(3.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_ohem_without_min_kept_uses_threshold_only():
    logits = two_class_logits(MARGINS)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    loss = ohem_cross_entropy(logits, labels, threshold=0.6, min_kept=0)
    assert loss.item() == pytest.approx((ce_of_margin(0.0) + ce_of_margin(-1.0)) / 2, rel=1e-9)


def test_ohem_gradient_only_reaches_kept_pixels():
    logits = two_class_logits(MARGINS).requires_grad_(True)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    ohem_cross_entropy(logits, labels, min_kept=1).backward()
    pixel_has_grad = logits.grad.abs().sum(dim=(0, 1, 2)) > 0
    assert pixel_has_grad.tolist() == [False, True, True, False]


def test_ohem_with_ignored_pixels_and_no_kept_pixel():
    logits = two_class_logits([[5.0, 6.0]]).requires_grad_(True)
    labels = torch.tensor([[[0, 255]]])
    # The only valid pixel has probability 0.993 > 0.7 but min_kept=1 keeps it.
    assert ohem_cross_entropy(logits, labels, min_kept=1).item() == pytest.approx(ce_of_margin(5.0), rel=1e-9)
    loss = ohem_cross_entropy(logits, labels, min_kept=0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("kwargs", [{"threshold": 1.5}, {"threshold": -0.1}, {"min_kept": -1}])
def test_ohem_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ohem_cross_entropy(torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), **kwargs)


# --- pseudo-labels and CPS ------------------------------------------------------------------------------------


def test_pseudo_labels_are_detached_int64_argmax():
    logits = torch.tensor([[[[0.1, 2.0]], [[1.0, -1.0]], [[0.5, 0.0]]]], requires_grad=True)
    pseudo_labels = pseudo_labels_from_logits(logits)
    assert pseudo_labels.dtype == torch.int64
    assert not pseudo_labels.requires_grad
    assert pseudo_labels.tolist() == [[[1, 0]]]


def random_branch_logits(num_branches: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 3, 5, generator=generator, dtype=torch.float64) for _ in range(num_branches)]


def test_cps_two_branches_is_sum_of_both_directions():
    logits_1, logits_2 = random_branch_logits(2)
    loss = cross_pseudo_supervision_loss([logits_1, logits_2])
    expected = manual_ce(logits_1, logits_2.argmax(1)) + manual_ce(logits_2, logits_1.argmax(1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_cps_gradients_do_not_flow_into_pseudo_labels():
    logits_1, logits_2 = (logits.requires_grad_(True) for logits in random_branch_logits(2))
    cross_pseudo_supervision_loss([logits_1, logits_2]).backward()

    reference_1, reference_2 = (
        logits.detach().clone().requires_grad_(True) for logits in (logits_1, logits_2)
    )
    # Targets are fixed one-hot maps: each branch only gets the gradient of its own CE term.
    reference_loss = manual_ce(reference_1, logits_2.detach().argmax(1)) + manual_ce(
        reference_2, logits_1.detach().argmax(1)
    )
    reference_loss.backward()
    torch.testing.assert_close(logits_1.grad, reference_1.grad)
    torch.testing.assert_close(logits_2.grad, reference_2.grad)
    # The gradient of CE w.r.t. logits is softmax - one_hot: its channels sum to 0 at every pixel.
    torch.testing.assert_close(logits_1.grad.sum(dim=1), torch.zeros(2, 3, 5, dtype=torch.float64))


def test_cps_three_branches_normalised_by_n_minus_one():
    branch_logits = random_branch_logits(3, seed=1)
    loss = cross_pseudo_supervision_loss(branch_logits)
    pair_sum = sum(
        manual_ce(branch_logits[i], branch_logits[j].argmax(1)) for i in range(3) for j in range(3) if i != j
    )
    assert loss.item() == pytest.approx(pair_sum.item() / 2, rel=1e-12)


def test_cps_uses_precomputed_pseudo_labels():
    logits_1, logits_2 = random_branch_logits(2, seed=2)
    generator = torch.Generator().manual_seed(3)
    pseudo_1, pseudo_2 = (torch.randint(0, 4, (2, 3, 5), generator=generator) for _ in range(2))
    loss = cross_pseudo_supervision_loss([logits_1, logits_2], pseudo_labels=[pseudo_1, pseudo_2])
    # Branch 1 learns from branch 2's pseudo-labels and vice versa.
    expected = manual_ce(logits_1, pseudo_2) + manual_ce(logits_2, pseudo_1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert loss.item() != pytest.approx(cross_pseudo_supervision_loss([logits_1, logits_2]).item())


def test_confidence_threshold_zero_is_exactly_the_papers_loss():
    logits_1, logits_2 = (logits.float() for logits in random_branch_logits(2, seed=4))
    thresholded = [
        pseudo_labels_from_logits(logits, confidence_threshold=0.0) for logits in (logits_1, logits_2)
    ]
    loss = cross_pseudo_supervision_loss([logits_1, logits_2], thresholded)
    paper = F.cross_entropy(logits_1, logits_2.argmax(1)) + F.cross_entropy(logits_2, logits_1.argmax(1))
    assert torch.equal(loss, paper)
    assert torch.equal(cross_pseudo_supervision_loss([logits_1, logits_2]), paper)


def test_confidence_threshold_ignores_unconfident_pixels():
    # Two classes; pixel confidences 0.5, 0.73, 0.88, 0.95 (softmax of logit gaps 0, 1, 2, 3).
    gaps = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    teacher = torch.stack([gaps, torch.zeros(4, dtype=torch.float64)]).reshape(1, 2, 1, 4)
    pseudo_labels = pseudo_labels_from_logits(teacher, confidence_threshold=0.8)
    assert pseudo_labels.tolist() == [[[PSEUDO_LABEL_IGNORE_INDEX, PSEUDO_LABEL_IGNORE_INDEX, 0, 0]]]
    assert kept_pseudo_label_fraction([pseudo_labels]).item() == 0.5

    logits_1, logits_2 = (
        torch.randn(1, 2, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        for seed in (5, 6)
    )
    loss = cross_pseudo_supervision_loss([logits_1, logits_2], [pseudo_labels, pseudo_labels])
    kept = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]], dtype=torch.float64)
    zeros = torch.zeros(1, 1, 4, dtype=torch.long)
    # CE averaged over the kept pixels only; the ignored pixels' logits do not matter.
    expected = manual_ce(logits_1, zeros, kept) + manual_ce(logits_2, zeros, kept)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    changed_1 = logits_1.clone()
    changed_1[..., :2] = 50.0
    changed_loss = cross_pseudo_supervision_loss([changed_1, logits_2], [pseudo_labels, pseudo_labels])
    assert changed_loss.item() == pytest.approx(loss.item(), rel=1e-12)


def test_cps_with_every_pixel_ignored_is_zero_with_zero_gradient():
    branch_logits = [logits.requires_grad_(True) for logits in random_branch_logits(2)]
    ignored = torch.full((2, 3, 5), PSEUDO_LABEL_IGNORE_INDEX)
    loss = cross_pseudo_supervision_loss(branch_logits, [ignored, ignored])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(branch_logits[0].grad, torch.zeros_like(branch_logits[0]))


def test_confidence_threshold_must_be_a_probability():
    with pytest.raises(ValueError, match="confidence_threshold"):
        pseudo_labels_from_logits(torch.randn(1, 2, 2, 2), confidence_threshold=1.5)


def test_cps_rejects_bad_inputs():
    logits = torch.randn(2, 4, 3, 5)
    with pytest.raises(ValueError, match="at least 2"):
        cross_pseudo_supervision_loss([logits])
    with pytest.raises(ValueError, match="share one shape"):
        cross_pseudo_supervision_loss([logits, torch.randn(2, 4, 3, 6)])
    with pytest.raises(ValueError, match="pseudo-label maps"):
        cross_pseudo_supervision_loss([logits, logits], pseudo_labels=[logits.argmax(1)])
    with pytest.raises(ValueError, match="expected"):
        cross_pseudo_supervision_loss(
            [logits, logits], pseudo_labels=[logits.argmax(1), torch.zeros(2, 3, 4)]
        )


def test_median_frequency_weights_follow_the_definition():
    # Class 0: 6 of map A's 8 pixels and 2 of map B's 4 -> f = 8 / 12. Class 1: 2 of A's 8 -> f = 2 / 8.
    # Class 2: 2 of B's 4 -> f = 2 / 4. Class 3 absent -> weight 1. Ignored pixels (255) count nowhere.
    map_a = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [255, 255, 255, 255]])
    map_b = torch.tensor([[0, 2], [0, 2]])
    weights = median_frequency_class_weights([map_a, map_b], num_labels=4)
    frequencies = torch.tensor([8 / 12, 2 / 8, 2 / 4], dtype=torch.float64)
    expected = (frequencies.median() / frequencies).tolist() + [1.0]
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))
    assert weights[1] > weights[2] > weights[0]  # the rarer, the heavier


def test_median_frequency_weights_need_a_labelled_pixel():
    with pytest.raises(ValueError, match="No labelled pixel"):
        median_frequency_class_weights([torch.full((2, 2), 255)], num_labels=3)


def test_class_weighted_supervised_loss_is_the_weighted_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = 255
    weights = torch.tensor([0.5, 2.0, 1.0])
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    pixel_weights = weights.double()[labels.clamp_max(2)] * (labels != 255)
    expected = (per_pixel * pixel_weights).sum() / pixel_weights.sum()
    loss = supervised_cross_entropy(logits, labels, class_weights=weights)
    torch.testing.assert_close(loss, expected)
    # Equal weights are the plain mean, whatever their value.
    torch.testing.assert_close(
        supervised_cross_entropy(logits, labels, class_weights=torch.full((3,), 3.0)),
        supervised_cross_entropy(logits, labels),
    )
    all_ignored = supervised_cross_entropy(logits, torch.full_like(labels, 255), class_weights=weights)
    assert all_ignored.item() == 0.0


def test_class_weighted_cps_loss_weights_by_pseudo_label_class():
    torch.manual_seed(1)
    logits = [torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    pseudo = [pseudo_labels_from_logits(branch) for branch in logits]
    pseudo[1][0, 0, 0] = PSEUDO_LABEL_IGNORE_INDEX
    weights = torch.tensor([0.2, 1.0, 5.0])

    def weighted_mean_ce(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kept = target != PSEUDO_LABEL_IGNORE_INDEX
        per_pixel = F.cross_entropy(student, target.clamp_min(0), reduction="none")
        pixel_weights = weights.double()[target.clamp_min(0)] * kept
        return (per_pixel * pixel_weights).sum() / pixel_weights.sum()

    expected = weighted_mean_ce(logits[0], pseudo[1]) + weighted_mean_ce(logits[1], pseudo[0])
    loss = cross_pseudo_supervision_loss(logits, pseudo, class_weights=weights)
    torch.testing.assert_close(loss, expected)
    unweighted = cross_pseudo_supervision_loss(logits, pseudo)
    assert not torch.allclose(loss, unweighted)
    torch.testing.assert_close(
        cross_pseudo_supervision_loss(logits, pseudo, class_weights=torch.ones(3)), unweighted
    )


def test_class_weights_must_match_the_classes():
    logits = torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match="one weight per class"):
        supervised_cross_entropy(logits, torch.zeros(1, 2, 2, dtype=torch.long), class_weights=torch.ones(4))
    with pytest.raises(ValueError, match="one weight per class"):
        cross_pseudo_supervision_loss([logits, logits], class_weights=torch.ones(2))
