"""Export to ONNX and `torch.export` with dynamic batch size, height and width: parity with the PyTorch model at
several image sizes, the script's errors, and the traced padding-aware convolution."""

import copy
import json
import re

import pytest
import torch
from helpers import make_tiny_config, run_script, save_tiny_model
from torch import nn

from cps_hf import CPSConfig, CPSForSemanticSegmentation
from cps_hf.export import export_model, export_program, load_exported_model, read_export_metadata
from cps_hf.inference import predict_logits

# Two sizes that are not multiples of the output stride, plus a different batch size than the traced example.
PARITY_SHAPES = ((1, 3, 45, 71), (3, 3, 96, 62))


def demo_config() -> CPSConfig:
    """The demo model's architecture (`cps_hf/configs/demo.yaml`): `test_resnet`, output stride 16, slim heads."""
    return make_tiny_config(aspp_channels=64, low_level_channels=48, decoder_channels=64)


def reference_logits(model: CPSForSemanticSegmentation, pixel_values: torch.Tensor, branch) -> torch.Tensor:
    with torch.no_grad():
        if branch == "ensemble":
            return predict_logits(model, pixel_values, branch="ensemble")
        return model(pixel_values, branch_index=branch).logits


def assert_parity(model: CPSForSemanticSegmentation, path, branch) -> None:
    run = load_exported_model(path)
    generator = torch.Generator().manual_seed(0)
    for shape in PARITY_SHAPES:
        pixel_values = torch.randn(shape, generator=generator)
        expected = reference_logits(model, pixel_values, branch)
        actual = run(pixel_values)
        assert actual.shape == expected.shape == (shape[0], model.config.num_labels, *shape[2:])
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
        agreement = (actual.argmax(dim=1) == expected.argmax(dim=1)).float().mean().item()
        assert agreement >= 0.999, f"argmax agrees on {agreement:.4%} of the pixels at {shape}"


def skip_without_onnx_tools(export_format: str) -> None:
    """ONNX export needs onnxscript and the parity check onnxruntime (the `deploy` extra); torch.export needs neither."""
    if export_format == "onnx":
        pytest.importorskip(
            "onnxscript", reason="ONNX export needs onnxscript (pip install 'cps_hf[deploy]')"
        )
        pytest.importorskip(
            "onnxruntime", reason="ONNX parity needs onnxruntime (pip install 'cps_hf[deploy]')"
        )


@pytest.mark.parametrize(
    ("export_format", "suffix", "branch"),
    # The ensemble graph holds both branches; branch 1 checks that the chosen branch is the one exported.
    [("onnx", "onnx", "ensemble"), ("torch_export", "pt2", 1)],
)
def test_demo_model_export_matches_pytorch_at_two_sizes(tmp_path, export_format, suffix, branch):
    skip_without_onnx_tools(export_format)
    torch.manual_seed(0)
    model = CPSForSemanticSegmentation(demo_config()).eval()
    path = export_model(model, tmp_path / f"model.{suffix}", export_format, branch=branch)
    assert_parity(model, path, branch)
    metadata = read_export_metadata(path)
    assert metadata["branch"] == str(branch)
    assert json.loads(metadata["id2label"]) == {str(k): v for k, v in model.config.id2label.items()}


@pytest.mark.parametrize(("export_format", "suffix"), [("onnx", "onnx"), ("torch_export", "pt2")])
def test_resnet50s_branch_export_matches_pytorch_at_two_sizes(tmp_path, export_format, suffix):
    skip_without_onnx_tools(export_format)
    # The paper's branch (deep stem, output stride 16, multi-grid dilations 2/4/8, ASPP 6/12/18): at these sizes
    # the stride-16 maps are 3-6 pixels, so eager inference skips padding taps that the traced graph computes.
    torch.manual_seed(0)
    model = CPSForSemanticSegmentation(CPSConfig(backbone="resnet50s", num_labels=3)).eval()
    path = export_model(model, tmp_path / f"model.{suffix}", export_format, branch=0)
    assert_parity(model, path, 0)


def test_exported_program_keeps_every_padding_tap_for_any_size():
    from cps_hf.modeling_cps import use_padding_aware_convolutions

    torch.manual_seed(0)
    full = nn.Conv2d(5, 4, 3, padding=6, dilation=6).double()
    pruned = copy.deepcopy(full)
    use_padding_aware_convolutions(pruned)
    dynamic = {"input": {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    # Traced at a size where eager mode would skip the outer taps, then run at a size where it must not.
    program = torch.export.export(
        pruned, (torch.randn(2, 5, 4, 5, dtype=torch.float64),), dynamic_shapes=dynamic
    )
    for size in ((4, 5), (3, 40), (40, 40)):
        inputs = torch.randn(2, 5, *size, dtype=torch.float64)
        torch.testing.assert_close(program.module()(inputs), full(inputs), rtol=1e-12, atol=1e-12)


def test_exported_program_rejects_inputs_too_small_for_the_backbone():
    torch.manual_seed(0)
    program = export_program(CPSForSemanticSegmentation(make_tiny_config()).eval())
    with pytest.raises(AssertionError):
        program.module()(torch.randn(1, 3, 16, 16))


def test_export_script_writes_both_formats(tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install 'cps_hf[deploy]')")
    model_dir = save_tiny_model(tmp_path / "model")
    for export_format, name in (("onnx", "model.onnx"), ("torch_export", "model.pt2")):
        output = tmp_path / "exported" / name
        run_script("export", "--model", str(model_dir), "--format", export_format, "--output", str(output))
        assert output.is_file() and read_export_metadata(output)["branch"] == "0"


@pytest.mark.parametrize(
    ("arguments", "returncode", "error"),
    [
        (["--format", "tflite", "--output", "m.onnx"], 2, "invalid choice: 'tflite'"),
        (["--format", "onnx", "--output", "m.pt2"], 1, "ValueError: .*`.onnx` file"),
        (
            ["--format", "torch_export", "--output", "m.pt2", "--opset", "18"],
            1,
            "ValueError: .*ONNX export only",
        ),
        (["--format", "onnx", "--output", "m.onnx", "--opset", "13"], 1, "ValueError: .*18 or newer"),
        (
            ["--format", "onnx", "--output", "m.onnx", "--branch", "2"],
            1,
            "ValueError: .*branch index in \\[0, 2\\)",
        ),
    ],
)
def test_export_script_rejects_bad_arguments(tmp_path, arguments, returncode, error):
    model_dir = save_tiny_model(tmp_path / "model")
    result = run_script("export", "--model", str(model_dir), *arguments, returncode=returncode)
    assert re.search(error, result.stderr), result.stderr[-4000:]


def test_export_script_names_a_missing_model_folder_or_unreachable_hub_id(tmp_path):
    arguments = ["--format", "onnx", "--output", "m.onnx"]
    missing = run_script("export", "--model", str(tmp_path / "missing"), *arguments, returncode=1)
    assert re.search("FileNotFoundError: .*not a saved model folder", missing.stderr), missing.stderr[-4000:]
    # Scripts run with HF_HUB_OFFLINE=1 (helpers.SCRIPT_ENV), so a Hub id cannot be fetched.
    hub_id = run_script("export", "--model", "some-org/some-model", *arguments, returncode=1)
    assert re.search(r"OSError: .*no local folder.*HF_HUB_OFFLINE=1", hub_id.stderr), hub_id.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "overrides"),
    [
        ("efficientnet_b0", {}),
        ("mobilenetv3_large_100", {}),
        ("convnext_atto", {}),
        ("regnetx_002", {}),
        ("hrnet_w18_small", {"output_stride": None, "backbone_kwargs": {"feature_location": ""}}),
    ],
)
@pytest.mark.parametrize(("export_format", "suffix"), [("onnx", "onnx"), ("torch_export", "pt2")])
def test_other_backbone_families_export(tmp_path, backbone, overrides, export_format, suffix):
    """Which timm families export (README, Deployment): random init, slim heads, the parity check above."""
    skip_without_onnx_tools(export_format)
    torch.manual_seed(0)
    config = make_tiny_config(backbone=backbone, **overrides)
    model = CPSForSemanticSegmentation(config).eval()
    path = export_model(model, tmp_path / f"model.{suffix}", export_format, branch=0)
    assert_parity(model, path, 0)
