"""Gradient checkpointing of the CPS branches: the same step (losses, gradients, BatchNorm running statistics) with
fewer stored activations, and the switch back."""

import copy
import logging
from collections import Counter

import pytest
import torch
from helpers import make_tiny_config
from torch import nn

from benchmarks.step import make_cutmix_batch
from cps_hf import CPSForSemanticSegmentation
from cps_hf.losses import cross_pseudo_supervision_loss, pseudo_labels_from_logits, supervised_cross_entropy
from cps_hf.trainer import cutmix_forward, in_memory_format, plain_cps_forward

# `gradient_checkpointing_enable` is the name every transformers 5.x has (newer ones: `activation_checkpointing_enable`).
pytestmark = pytest.mark.filterwarnings("ignore:`(gradient|is_gradient)_checkpointing:FutureWarning")

# Modules whose calls are counted: a stage timm checkpoints, the first stage (which timm never checkpoints: it needs
# a gradient at its input) and the head's ASPP.
COUNTED_MODULES = ("backbone.layer2", "backbone.conv1", "aspp")


def cps_step(model: nn.Module, batch: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    """Forward passes of the trainer's step (`variant`: plain, cutmix, cutmix_fused, cutmix_channels_last), the
    supervised and CPS losses, backward; returns the loss."""
    if variant == "cutmix_channels_last":
        batch = in_memory_format(batch, torch.channels_last)
    labels = batch["labels"]
    if variant == "plain":
        labeled_logits, joint_logits = plain_cps_forward(model, batch)
        pseudo_labels = [pseudo_labels_from_logits(logits) for logits in joint_logits]
        cps_loss = cross_pseudo_supervision_loss(joint_logits, pseudo_labels)
    else:
        forward = cutmix_forward(model, batch, fused_forward=variant == "cutmix_fused")
        labeled_logits = forward.labeled_logits
        cps_loss = cross_pseudo_supervision_loss(forward.student_logits, forward.pseudo_labels)
    supervised = sum(supervised_cross_entropy(logits, labels, 255) for logits in labeled_logits)
    loss = supervised + 1.5 * cps_loss
    loss.backward()
    return loss.detach()


def count_calls(model: CPSForSemanticSegmentation) -> Counter:
    calls = Counter()
    for name in COUNTED_MODULES:
        model.branches[0].get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: calls.update([name])
        )
    return calls


def tiny_model_pair(
    channels_last: bool = False,
) -> tuple[CPSForSemanticSegmentation, CPSForSemanticSegmentation]:
    torch.manual_seed(0)
    plain = CPSForSemanticSegmentation(make_tiny_config()).train()
    if channels_last:
        plain.to(memory_format=torch.channels_last)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    return plain, checkpointed


def assert_same_step(
    plain: nn.Module,
    checkpointed: nn.Module,
    plain_loss: torch.Tensor,
    checkpointed_loss: torch.Tensor,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> None:
    # Checkpointing reruns the same kernels on the same inputs: only the order in which autograd adds up a
    # parameter's gradient contributions (one per model call) may change, float reassociation of a few terms.
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=rtol, atol=atol)
    for (name, parameter), checkpointed_parameter in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(
            checkpointed_parameter.grad, parameter.grad, rtol=rtol, atol=atol, msg=name
        )
    # The forward passes are unchanged, so BatchNorm's running statistics must be too: one update per call (a
    # recomputation updating them again would move them by about momentum x their change, far above this).
    for (name, buffer), checkpointed_buffer in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(checkpointed_buffer, buffer, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("variant", ["plain", "cutmix", "cutmix_fused", "cutmix_channels_last"])
def test_checkpointing_keeps_losses_gradients_and_running_statistics(variant):
    plain, checkpointed = tiny_model_pair(channels_last=variant == "cutmix_channels_last")
    plain_calls, checkpointed_calls = count_calls(plain), count_calls(checkpointed)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second step starts from running statistics the first one left
        batch = make_cutmix_batch(2, 32, plain.config.num_labels, generator=generator)
        assert_same_step(
            plain, checkpointed, cps_step(plain, batch, variant), cps_step(checkpointed, batch, variant)
        )
    # Every model call with gradients runs the checkpointed stage and the head once more, in the backward pass.
    calls_with_gradients = {"plain": 2, "cutmix": 2, "cutmix_fused": 1, "cutmix_channels_last": 2}[
        variant
    ] * 2
    for name in ("backbone.layer2", "aspp"):
        assert checkpointed_calls[name] == plain_calls[name] + calls_with_gradients, name
    assert checkpointed_calls["backbone.conv1"] == plain_calls["backbone.conv1"]
    num_batches_tracked = checkpointed.branches[0].aspp.branch_norm.num_batches_tracked
    assert num_batches_tracked == plain.branches[0].aspp.branch_norm.num_batches_tracked > 0


def test_disabling_restores_the_plain_path():
    plain, checkpointed = tiny_model_pair()
    assert all(
        branch.gradient_checkpointing and branch.backbone.grad_checkpointing
        for branch in checkpointed.branches
    )
    checkpointed.gradient_checkpointing_disable()
    assert not any(
        branch.gradient_checkpointing or branch.backbone.grad_checkpointing
        for branch in checkpointed.branches
    )
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in checkpointed.modules())
    plain_calls, checkpointed_calls = count_calls(plain), count_calls(checkpointed)
    batch = make_cutmix_batch(2, 32, plain.config.num_labels, generator=torch.Generator().manual_seed(0))
    assert_same_step(
        plain, checkpointed, cps_step(plain, batch, "cutmix"), cps_step(checkpointed, batch, "cutmix")
    )
    assert checkpointed_calls == plain_calls


def test_backbone_without_timm_checkpointing_is_named_and_its_head_still_checkpointed(caplog):
    plain, checkpointed = tiny_model_pair()
    checkpointed.gradient_checkpointing_disable()

    def refuse(enable: bool = True) -> None:
        assert not enable, "gradient checkpointing not supported"  # what timm's HRNet, VGG, ... do

    for branch in checkpointed.branches:
        branch.backbone.set_grad_checkpointing = refuse
    with caplog.at_level(logging.WARNING):
        checkpointed.gradient_checkpointing_enable()
    assert "timm backbone 'test_resnet' has no gradient checkpointing" in caplog.text
    plain_calls, checkpointed_calls = count_calls(plain), count_calls(checkpointed)
    batch = make_cutmix_batch(2, 32, plain.config.num_labels, generator=torch.Generator().manual_seed(0))
    assert_same_step(
        plain, checkpointed, cps_step(plain, batch, "cutmix"), cps_step(checkpointed, batch, "cutmix")
    )
    assert checkpointed_calls["backbone.layer2"] == plain_calls["backbone.layer2"]
    assert checkpointed_calls["aspp"] == plain_calls["aspp"] + 2


def test_checkpointing_only_in_training_with_gradients():
    _, checkpointed = tiny_model_pair()
    calls = count_calls(checkpointed)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        checkpointed(images)
    checkpointed.eval()
    checkpointed(images).logits.sum().backward()
    assert calls["aspp"] == 2  # two passes, no recomputation


def test_every_n_layers_is_refused():
    model = CPSForSemanticSegmentation(make_tiny_config())
    with pytest.raises(ValueError, match="every_n_layers"):
        model.gradient_checkpointing_enable(every_n_layers=2)


@pytest.mark.slow
def test_compiled_fused_step_with_checkpointing_keeps_the_step():
    plain, checkpointed = tiny_model_pair()
    for branch in checkpointed.branches:
        # aot_eager: AOTAutograd's own recomputation, without code generation.
        branch.compile(backend="aot_eager")
    batch = make_cutmix_batch(2, 32, plain.config.num_labels, generator=torch.Generator().manual_seed(0))
    plain_loss = cps_step(plain, batch, "cutmix_fused")
    checkpointed_loss = cps_step(checkpointed, batch, "cutmix_fused")
    # AOTAutograd decomposes BatchNorm into separate reductions, summed in another order over whole feature maps
    # (measured: gradients within 1e-6 of eager).
    assert_same_step(plain, checkpointed, plain_loss, checkpointed_loss, rtol=1e-4, atol=1e-5)
