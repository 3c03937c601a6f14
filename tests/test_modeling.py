import contextlib
import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import timm
import torch
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForSemanticSegmentation, pipeline
from transformers.utils import logging as transformers_logging

from cps_hf import CPSConfig, CPSForSemanticSegmentation, create_image_processor


def state_dicts_equal(first: nn.Module, second: nn.Module) -> bool:
    first_state, second_state = first.state_dict(), second.state_dict()
    return first_state.keys() == second_state.keys() and all(
        torch.equal(first_state[key], second_state[key]) for key in first_state
    )


@pytest.mark.parametrize(
    ("backbone", "output_stride", "extra"),
    [
        ("test_resnet", 16, {}),
        ("test_resnet", 8, {"aspp_dilation_rates": [12, 24, 36]}),
        ("resnet18", 16, {"multi_grid": [1, 2]}),
        ("efficientnet_b0", 16, {"multi_grid": None}),
        ("convnext_atto", 16, {"multi_grid": None}),
        (
            "hrnet_w18_small",
            None,
            {"multi_grid": None, "backbone_kwargs": {"feature_location": ""}, "fuse_feature_pyramid": True},
        ),
    ],
)
def test_output_shapes_across_backbones(backbone, output_stride, extra):
    config = CPSConfig(
        backbone=backbone,
        output_stride=output_stride,
        num_labels=4,
        aspp_channels=16,
        low_level_channels=8,
        decoder_channels=16,
        **{"multi_grid": None, **extra},
    )
    model = CPSForSemanticSegmentation(config).eval()
    reductions = model.branches[0].backbone.feature_info.reduction()
    if output_stride is not None:
        assert reductions[-1] == output_stride
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 50, 66), output_branch_logits=True)
    assert outputs.logits.shape == (2, 4, 50, 66)
    assert len(outputs.branch_logits) == 2
    assert all(logits.shape == (2, 4, 50, 66) for logits in outputs.branch_logits)


def official_resnet_conv_signature(depths: tuple[int, ...]) -> Counter:
    """(in, out, kernel, stride, dilation) of every conv of the official deep-stem ResNet + DeepLabv3+ branch,
    written from the paper's description (not from timm)."""
    convs = [(3, 64, 3, 2, 1), (64, 64, 3, 1, 1), (64, 128, 3, 1, 1)]
    in_channels = 128
    stage_strides = (1, 2, 2, 1)
    for stage, (depth, stride) in enumerate(zip(depths, stage_strides)):
        width = 64 * 2**stage
        for block in range(depth):
            dilation = (2, 4, 8)[block] if stage == 3 else 1
            block_stride = stride if block == 0 else 1
            convs += [
                (in_channels, width, 1, 1, 1),
                (width, width, 3, block_stride, dilation),
                (width, 4 * width, 1, 1, 1),
            ]
            if block == 0:
                convs.append((in_channels, 4 * width, 1, stride, 1))
            in_channels = 4 * width
    convs += [(2048, 256, 1, 1, 1)] + [(2048, 256, 3, 1, rate) for rate in (6, 12, 18)]
    convs += [(1024, 256, 1, 1, 1), (2048, 256, 1, 1, 1), (256, 256, 1, 1, 1)]  # ASPP projection + pooling
    convs += [(256, 48, 1, 1, 1), (304, 256, 3, 1, 1), (256, 256, 3, 1, 1), (256, 21, 1, 1, 1)]  # decoder
    return Counter(convs)


def conv_signature(module: nn.Module) -> Counter:
    return Counter(
        (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        for conv in module.modules()
        if isinstance(conv, nn.Conv2d)
    )


@pytest.mark.parametrize(("backbone", "depths"), [("resnet50s", (3, 4, 6, 3)), ("resnet101s", (3, 4, 23, 3))])
def test_faithful_branch_matches_official_layers(backbone, depths):
    model = CPSForSemanticSegmentation(CPSConfig(backbone=backbone, num_labels=21))
    assert model.config.multi_grid == [1, 2, 4]  # "auto": the paper's rates for a three-block last stage
    branch = model.branches[0]
    assert conv_signature(branch) == official_resnet_conv_signature(depths)
    for conv in branch.modules():
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
            assert conv.padding[0] == conv.dilation[0], "3x3 convolutions must keep the spatial size"
    norms = [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(norm.eps == 1e-5 and norm.momentum == 0.1 for norm in norms)
    head_norm_channels = Counter(
        norm.num_features for norm in branch.aspp.modules() if isinstance(norm, nn.BatchNorm2d)
    )
    assert head_norm_channels == Counter({1024: 1, 256: 2}), (
        "ASPP: one shared BN over the concat + pooling + output"
    )
    activations = [m for m in branch.aspp.modules() if isinstance(m, nn.LeakyReLU)]
    assert activations and activations[0].negative_slope == 0.01
    assert branch.classifier.bias is not None
    if backbone == "resnet50s":
        assert sum(parameter.numel() for parameter in branch.parameters()) == 40_475_957


def test_image_pooling_is_added_not_concatenated(tiny_config):
    aspp = CPSForSemanticSegmentation(tiny_config).branches[0].aspp.eval()
    features = torch.randn(1, aspp.pooling_conv.in_channels, 5, 5)
    with torch.no_grad():
        output = aspp(features)
        constant_shift = aspp.pooling_projection(
            aspp.activation(aspp.pooling_norm(aspp.pooling_conv(features.mean((2, 3), keepdim=True))))
        )
        without_pooling = aspp.projection(
            aspp.activation(aspp.branch_norm(torch.cat([conv(features) for conv in aspp.branch_convs], 1)))
        )
    assert output.shape[1] == tiny_config.aspp_channels
    torch.testing.assert_close(output, aspp.activation(aspp.output_norm(without_pooling + constant_shift)))


def test_random_backbones_are_independent_by_default(tiny_config, caplog):
    assert tiny_config.share_backbone_initialization is None
    with caplog.at_level(logging.INFO, logger="cps_hf"):
        model = CPSForSemanticSegmentation(tiny_config)
    # From scratch one copied draw would make the branches start too alike: each keeps its own; the choice is
    # logged and stored, so a saved model records it.
    assert model.config.share_backbone_initialization is False
    assert "every branch keeps its own random backbone draw" in caplog.text
    first, second = model.branches
    assert not torch.equal(first.backbone.conv1[0].weight, second.backbone.conv1[0].weight)
    assert not torch.equal(first.classifier.weight, second.classifier.weight)
    first_ids = {id(parameter) for parameter in first.parameters()}
    assert first_ids.isdisjoint(id(parameter) for parameter in second.parameters()), (
        "branches must share no module"
    )


def test_shared_backbone_initialization_option(tiny_config):
    tiny_config.share_backbone_initialization = True
    first, second = CPSForSemanticSegmentation(tiny_config).branches
    assert state_dicts_equal(first.backbone, second.backbone)
    assert not torch.equal(first.classifier.weight, second.classifier.weight)
    assert not torch.equal(first.aspp.projection.weight, second.aspp.projection.weight)


def test_multi_grid_auto_applies_the_papers_rates_only_to_three_block_last_stages(caplog):
    heads = dict(num_labels=3, aspp_channels=8, low_level_channels=4, decoder_channels=8)
    with caplog.at_level(logging.INFO, logger="cps_hf"):
        model = CPSForSemanticSegmentation(CPSConfig(backbone="resnet18", **heads))
    assert model.config.multi_grid is None
    assert "no multi-grid for backbone 'resnet18' (its last stage has 2 block(s), not 3)" in caplog.text
    last_stage_dilations = {
        conv.dilation for conv in model.branches[0].backbone.layer4.modules() if isinstance(conv, nn.Conv2d)
    }
    assert last_stage_dilations == {(1, 1), (2, 2)}  # timm's output-stride-16 dilation, no multi-grid
    # A last stage of three blocks gets the paper's rates (resnet50s: test_faithful_branch_matches_official_layers).
    three_blocks = CPSConfig(backbone="test_resnet", backbone_kwargs={"layers": [1, 1, 1, 3]}, **heads)
    last_stage = CPSForSemanticSegmentation(three_blocks).branches[1].backbone.layer4
    assert three_blocks.multi_grid == [1, 2, 4]
    assert [block.conv2.dilation for block in last_stage] == [(2, 2), (4, 4), (8, 8)]
    assert CPSForSemanticSegmentation(CPSConfig(backbone="test_resnet", **heads)).config.multi_grid is None


def test_head_init_is_kaiming_normal_fan_in():
    config = CPSConfig(backbone="test_resnet", num_labels=3, multi_grid=None)
    conv = CPSForSemanticSegmentation(config).branches[0].aspp.branch_convs[1]  # 3x3, fan_in = 96 * 9
    expected_std = (2.0 / (conv.in_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.05
    normal = CPSForSemanticSegmentation(
        CPSConfig(backbone="test_resnet", num_labels=3, multi_grid=None, head_init="normal")
    )
    assert abs(normal.branches[0].aspp.branch_convs[1].weight.std().item() - 0.02) < 0.002


def test_post_init_does_not_clobber_backbone(tiny_config):
    torch.manual_seed(0)
    reference = timm.create_model("test_resnet", features_only=True, output_stride=16)
    torch.manual_seed(0)
    model = CPSForSemanticSegmentation(tiny_config)
    assert state_dicts_equal(reference, model.branches[0].backbone)
    # timm zero-initialises each block's last BN; transformers' default init would set it to one.
    zero_init_norms = [
        m
        for m in model.branches[0].backbone.modules()
        if isinstance(m, nn.BatchNorm2d) and torch.all(m.weight == 0)
    ]
    assert len(zero_init_norms) >= 3


def test_supervised_loss_ignores_ignore_index(tiny_config):
    model = CPSForSemanticSegmentation(tiny_config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 3, (2, 32, 32))
    labels[:, :10] = 255
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels, output_branch_logits=True)
    valid = labels != 255
    expected = sum(
        F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid]) for logits in outputs.branch_logits
    )
    torch.testing.assert_close(outputs.loss, expected)
    changed = labels.clone()
    changed[:, :10] = 0
    with torch.no_grad():
        assert not torch.allclose(model(pixel_values, labels=changed).loss, outputs.loss)


def test_single_branch_and_ensemble(tiny_config):
    model = CPSForSemanticSegmentation(tiny_config).eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outputs = model(pixel_values, output_branch_logits=True)
        second = model(pixel_values, branch_index=1)
        torch.testing.assert_close(second.logits, outputs.branch_logits[1])
        torch.testing.assert_close(outputs.logits, outputs.branch_logits[0])
        model.config.inference_branch = "ensemble"
        ensemble = model(pixel_values).logits
    expected = torch.stack([logits.softmax(1) for logits in outputs.branch_logits]).mean(0)
    torch.testing.assert_close(ensemble.softmax(1), expected)
    torch.testing.assert_close(ensemble.exp().sum(1), torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="branch_index"):
        model(pixel_values, branch_index=2)


def test_same_output_type_in_train_and_eval(tiny_config):
    model = CPSForSemanticSegmentation(tiny_config)
    labels = torch.randint(0, 3, (2, 32, 32))
    train_outputs = model.train()(torch.randn(2, 3, 32, 32), labels=labels)
    with torch.no_grad():
        eval_outputs = model.eval()(torch.randn(2, 3, 32, 32), labels=labels)
    assert type(train_outputs) is type(eval_outputs)
    assert train_outputs.loss.requires_grad and eval_outputs.loss is not None
    assert len(train_outputs.branch_losses) == 2


def test_save_and_load_round_trip_is_exact(tiny_config, tmp_path):
    model = CPSForSemanticSegmentation(tiny_config)
    model.train()
    model(torch.randn(2, 3, 32, 32))  # move BN running statistics away from their initial values
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = CPSForSemanticSegmentation.from_pretrained(tmp_path)
    assert state_dicts_equal(model, loaded)
    assert loaded.config.id2label == tiny_config.id2label
    loaded.save_pretrained(tmp_path / "saved_again")
    assert (tmp_path / "saved_again" / "model.safetensors").read_bytes() == (
        tmp_path / "model.safetensors"
    ).read_bytes()
    # The loaded configuration describes the same network: with the loaded weights in freshly allocated memory it
    # computes bit-identical logits.
    rebuilt = CPSForSemanticSegmentation(loaded.config)
    rebuilt.load_state_dict(loaded.state_dict())
    model.eval(), loaded.eval(), rebuilt.eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).logits
        torch.testing.assert_close(rebuilt(pixel_values).logits, expected, rtol=0, atol=0)
        # `from_pretrained` leaves the weights where the safetensors file puts them, not 64-byte aligned, and oneDNN
        # may then take other convolution kernels: float reassociation, a few units in the last place per layer
        # (measured 1.7e-7 on logits of scale ~0.5). 1e-5 of the logits' scale is ~100 such units.
        torch.testing.assert_close(
            loaded(pixel_values).logits, expected, rtol=0, atol=1e-5 * float(expected.abs().max())
        )


def test_auto_classes(tiny_config, tmp_path):
    CPSForSemanticSegmentation(tiny_config).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CPSConfig)
    assert isinstance(AutoModelForSemanticSegmentation.from_pretrained(tmp_path), CPSForSemanticSegmentation)
    assert isinstance(AutoModelForSemanticSegmentation.from_config(tiny_config), CPSForSemanticSegmentation)


def test_remote_code_load_without_cps_hf(tiny_config, tmp_path):
    CPSForSemanticSegmentation(tiny_config).save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert (
        config_json["auto_map"]["AutoModelForSemanticSegmentation"]
        == "modeling_cps.CPSForSemanticSegmentation"
    )
    pixel_values = torch.randn(1, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "input.pt")
    # Loaded from the same file, the weights sit at the same addresses modulo any alignment, so both processes take
    # the same kernels (on one thread each): the remote-code class must compute bit-identical logits.
    model = CPSForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.save(model(pixel_values).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForSemanticSegmentation
        torch.set_num_threads(1)
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert not any(name == "cps_hf" or name.startswith("cps_hf.") for name in sys.modules), "cps_hf was imported"
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "input.pt")!r})).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=0)
        print("REMOTE_OK", type(model).__module__)
        """
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK transformers_modules" in result.stdout


@contextlib.contextmanager
def transformers_log_records() -> Iterator[list[logging.LogRecord]]:
    """Every record of level info and above that transformers logs inside the block (its loggers do not propagate
    to pytest's `caplog`)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    library_logger = transformers_logging.get_logger()
    verbosity = transformers_logging.get_verbosity()
    library_logger.addHandler(handler)
    transformers_logging.set_verbosity_info()
    try:
        yield records
    finally:
        transformers_logging.set_verbosity(verbosity)
        library_logger.removeHandler(handler)


def test_pipeline_returns_named_masks(tiny_config, tmp_path):
    model = CPSForSemanticSegmentation(tiny_config)
    model.save_pretrained(tmp_path)
    create_image_processor(tiny_config).save_pretrained(tmp_path)
    processor_config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor_config["image_mean"] == pytest.approx(
        list(timm.models.get_pretrained_cfg("test_resnet").mean)
    )
    assert processor_config["do_resize"] is False
    with transformers_log_records() as records:
        segmenter = pipeline("image-segmentation", model=str(tmp_path))
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 45, 3), dtype=np.uint8))
        results = segmenter(image)
    errors = [record.getMessage() for record in records if record.levelno >= logging.ERROR]
    assert not errors, errors
    assert results, "the pipeline returned no mask"
    assert {result["label"] for result in results} <= set(tiny_config.id2label.values())
    for result in results:
        assert result["mask"].size == (45, 37)
    # The masks partition the image, as the argmax of the model's logits does.
    coverage = sum(np.array(result["mask"], dtype=np.int64) // 255 for result in results)
    assert np.all(coverage == 1)


def test_from_timm_pretrained_offline_fails_clearly(tiny_config):
    with pytest.raises(OSError, match="Could not download ImageNet weights for timm backbone 'test_resnet'"):
        CPSForSemanticSegmentation.from_timm_pretrained(tiny_config)


def test_from_timm_pretrained_local_file_loads_into_every_branch(tiny_config, tmp_path):
    torch.manual_seed(123)
    imagenet_like = timm.create_model("test_resnet", num_classes=10)
    weights_file = tmp_path / "backbone.pth"
    torch.save(imagenet_like.state_dict(), weights_file)
    model = CPSForSemanticSegmentation.from_timm_pretrained(tiny_config, pretrained_file=str(weights_file))
    assert (
        model.config.share_backbone_initialization is True
    )  # "auto" with pretrained weights: the paper's choice
    for branch in model.branches:
        torch.testing.assert_close(
            branch.backbone.conv1[0].weight, imagenet_like.conv1[0].weight, rtol=0, atol=0
        )
    assert not torch.equal(model.branches[0].classifier.weight, model.branches[1].classifier.weight)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"output_stride": 32}, "output_stride"),
        ({"num_branches": 1}, "at least 2 branches"),
        ({"inference_branch": 2}, "inference_branch"),
        ({"head_init": "zeros"}, "head_init"),
        ({"aspp_dilation_rates": [6, 12]}, "aspp_dilation_rates"),
        ({"multi_grid": [1, 0, 2]}, "multi_grid"),
        ({"output_stride": None, "multi_grid": [1, 2, 4]}, "multi_grid"),
        ({"num_labels": 1}, "num_labels"),
        ({"num_labels": 300}, "semantic_loss_ignore_index"),
    ],
)
def test_bad_config_values_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        CPSConfig(backbone="test_resnet", **{"num_labels": 3, **overrides})


def test_bad_config_types_raise():
    with pytest.raises(StrictDataclassError, match="output_stride"):
        CPSConfig(output_stride="sixteen")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backbone": "not_a_timm_model"}, "not a timm model"),
        (
            {"backbone": "hrnet_w18_small", "output_stride": 16, "multi_grid": None},
            "cannot produce `output_stride=16`",
        ),
        ({"backbone": "test_resnet", "multi_grid": [1, 2, 4]}, "one rate per block"),
        ({"backbone": "convnext_atto", "multi_grid": [1, 2]}, "3x3 convolutions"),
    ],
)
def test_bad_backbone_choices_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        CPSForSemanticSegmentation(CPSConfig(num_labels=3, **overrides))


@pytest.mark.parametrize("size", [(3, 3), (6, 14), (8, 8), (13, 40), (40, 40)])
@pytest.mark.parametrize("dilation", [2, 6, 12])
def test_padding_aware_convolution_equals_the_full_dilated_convolution(size, dilation):
    from cps_hf.modeling_cps import PaddingAwareConv2d, use_padding_aware_convolutions

    torch.manual_seed(0)
    full = nn.Conv2d(5, 4, 3, padding=dilation, dilation=dilation, bias=True).double()
    pruned = copy.deepcopy(full)
    assert use_padding_aware_convolutions(pruned) == 1 and isinstance(pruned, PaddingAwareConv2d)
    inputs = torch.randn(2, 5, *size, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 4, *size, dtype=torch.float64)
    outputs = [conv(inputs) for conv in (full, pruned)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    gradients = [
        torch.autograd.grad(output, (inputs, conv.weight, conv.bias), upstream)
        for output, conv in zip(outputs, (full, pruned))
    ]
    for pruned_gradient, full_gradient in zip(gradients[1], gradients[0]):
        torch.testing.assert_close(pruned_gradient, full_gradient, rtol=1e-12, atol=1e-12)


def test_skip_padding_taps_changes_no_weight_key_or_output(tiny_config):
    from cps_hf.modeling_cps import PaddingAwareConv2d

    torch.manual_seed(0)
    skipping = CPSForSemanticSegmentation(tiny_config).eval()
    computing = CPSForSemanticSegmentation(
        CPSConfig(**{**tiny_config.to_dict(), "skip_padding_taps": False})
    ).eval()
    computing.load_state_dict(skipping.state_dict())
    assert skipping.state_dict().keys() == computing.state_dict().keys()
    aspp_convs = list(skipping.branches[0].aspp.branch_convs)[1:]
    assert all(isinstance(conv, PaddingAwareConv2d) for conv in aspp_convs)
    assert not any(isinstance(module, PaddingAwareConv2d) for module in computing.modules())
    pixel_values = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            skipping(pixel_values).logits, computing(pixel_values).logits, rtol=1e-5, atol=1e-5
        )
