"""Configuration of the Cross Pseudo Supervision (CPS) segmentation model."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

HEAD_INIT_SCHEMES = ("kaiming_normal", "xavier_normal", "normal", "torch_default")
# The paper's per-block dilation multipliers of the last ResNet stage (see `multi_grid`).
PAPER_MULTI_GRID = (1, 2, 4)


@strict
class CPSConfig(PreTrainedConfig):
    r"""
    Configuration of [`CPSForSemanticSegmentation`]: several DeepLabv3+ branches of identical structure on a
    [timm](https://github.com/huggingface/pytorch-image-models) backbone, trained with Cross Pseudo Supervision
    (Chen et al., CVPR 2021). The defaults reproduce one branch of the paper's network (DeepLabv3+ on a deep-stem
    ResNet-50, output stride 16, multi-grid 1/2/4, ASPP rates 6/12/18).

    Training-only knobs (CPS weight, CutMix, OHEM) are training arguments, not part of this configuration.

    Args:
        backbone (`str`, *optional*, defaults to `"resnet50s"`):
            Name of a timm model that supports `features_only=True`. `resnet50s`/`resnet101s` are the paper's
            deep-stem ResNets.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (e.g. `{"feature_location": ""}` for HRNet).
        output_stride (`int`, *optional*, defaults to 16):
            Ratio of input size to the size of the deepest feature map: 8 or 16 (dilated backbone), or `None` to
            keep the backbone's native strides (needed for backbones such as HRNet that reject `output_stride`).
        multi_grid (`list[int]`, `"auto"` or `None`, *optional*, defaults to `"auto"`):
            Per-block dilation multipliers of the last backbone stage (ResNet-family backbones only): block `i` of
            the last stage gets dilation `(32 // output_stride) * multi_grid[i]`, i.e. 2/4/8 at output stride 16 as
            in the paper. `None` keeps timm's dilations. `"auto"` gives the paper's `[1, 2, 4]` to a dilated
            backbone whose last stage has three blocks of plain 3x3 convolutions (`resnet50s`, `resnet101s`, ...)
            and `None` to any other (logged); the model resolves it when it builds its backbones and stores the
            result here, so a saved model records the dilations it uses.
        aspp_dilation_rates (`list[int]`, *optional*, defaults to `[6, 12, 18]`):
            Dilation rates of the three 3x3 ASPP convolutions (use `[12, 24, 36]` at output stride 8).
        aspp_channels (`int`, *optional*, defaults to 256):
            Channels of every ASPP branch and of the ASPP output.
        low_level_channels (`int`, *optional*, defaults to 48):
            Channels of the decoder's 1x1 projection of the stride-4 backbone features.
        decoder_channels (`int`, *optional*, defaults to 256):
            Channels of the decoder's two 3x3 convolutions.
        fuse_feature_pyramid (`bool`, *optional*, defaults to `False`):
            Feed the ASPP with every backbone feature map of stride >= 4, upsampled to stride 4 and concatenated
            (HRNetV2-style representation) instead of the deepest feature map alone.
        leaky_relu_slope (`float`, *optional*, defaults to 0.01):
            Negative slope of the ASPP's LeakyReLU activations.
        batch_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the head's BatchNorm layers.
        batch_norm_momentum (`float`, *optional*, defaults to 0.1):
            Momentum of the head's BatchNorm layers.
        num_branches (`int`, *optional*, defaults to 2):
            Number of segmentation networks trained against each other (2 for CPS, more for n-CPS).
        inference_branch (`int` or `"ensemble"`, *optional*, defaults to 0):
            Which branch produces `logits` at inference: a branch index, or `"ensemble"` for the mean of all
            branches' softmax probabilities.
        share_backbone_initialization (`bool`, *optional*):
            `True`: every branch's backbone starts from the same weights, as in the paper (its backbones are the same
            ImageNet weights). `False`: each branch keeps its own random backbone draw, which is what keeps the
            branches different when training from scratch. `None` (default) decides where the model is built:
            shared for [`~CPSForSemanticSegmentation.from_timm_pretrained`], independent for a randomly initialised
            backbone; the decision is logged and stored here. Pretrained weights are always loaded into every branch.
        head_init (`str`, *optional*, defaults to `"kaiming_normal"`):
            Initialisation of the head and classifier convolutions: `"kaiming_normal"` (fan-in, ReLU gain, the
            paper's choice), `"xavier_normal"`, `"normal"` (std `initializer_range`) or `"torch_default"`.
            BatchNorm weights start at 1 and biases at 0 in every scheme. Backbones keep their timm (or
            pretrained) weights.
        skip_padding_taps (`bool`, *optional*, defaults to `True`):
            Let dilated convolutions skip the kernel rows and columns that only ever read zero padding (dilation at
            least the feature map's size, e.g. the ASPP's rates 12 and 18 on the 8x8 map of a 128-pixel crop). The
            skipped taps multiply zeros, so outputs and gradients are the same up to floating-point summation order;
            only time is saved. `False` computes every tap, as the official implementation does.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the `"normal"` head initialisation.
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by the losses and metrics.

    Example:

    ```python
    >>> from cps_hf import CPSConfig, CPSForSemanticSegmentation

    >>> config = CPSConfig(backbone="resnet50s", num_labels=21)
    >>> model = CPSForSemanticSegmentation(config)
    ```"""

    model_type = "cps"

    backbone: str = "resnet50s"
    backbone_kwargs: dict | None = None
    output_stride: int | None = 16
    multi_grid: list[int] | tuple[int, ...] | Literal["auto"] | None = "auto"
    aspp_dilation_rates: list[int] | tuple[int, ...] = (6, 12, 18)
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256
    fuse_feature_pyramid: bool = False
    leaky_relu_slope: float = 0.01
    batch_norm_eps: float = 1e-5
    batch_norm_momentum: float = 0.1
    num_branches: int = 2
    inference_branch: int | Literal["ensemble"] = 0
    share_backbone_initialization: bool | None = None
    head_init: str = "kaiming_normal"
    skip_padding_taps: bool = True
    initializer_range: float = 0.02
    semantic_loss_ignore_index: int = 255

    def __post_init__(self, **kwargs):
        if self.output_stride not in (8, 16, None):
            raise ValueError(
                f"`output_stride` must be 8, 16 or None (native backbone strides), got {self.output_stride!r}."
            )
        if self.multi_grid not in (None, "auto"):
            if self.output_stride is None:
                raise ValueError(
                    "`multi_grid` needs a dilated backbone: set `output_stride` to 8 or 16, or `multi_grid=None`."
                )
            if len(self.multi_grid) == 0 or any(rate < 1 for rate in self.multi_grid):
                raise ValueError(
                    f"`multi_grid` must hold positive dilation multipliers, got {list(self.multi_grid)}."
                )
        if len(self.aspp_dilation_rates) != 3 or any(rate < 1 for rate in self.aspp_dilation_rates):
            raise ValueError(
                f"`aspp_dilation_rates` must be three positive rates, got {list(self.aspp_dilation_rates)}."
            )
        for name in ("aspp_channels", "low_level_channels", "decoder_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if self.num_branches < 2:
            raise ValueError(f"CPS needs at least 2 branches, got `num_branches={self.num_branches}`.")
        if isinstance(self.inference_branch, int) and not 0 <= self.inference_branch < self.num_branches:
            raise ValueError(
                f"`inference_branch` must be 'ensemble' or a branch index in [0, {self.num_branches}), "
                f"got {self.inference_branch}."
            )
        if self.head_init not in HEAD_INIT_SCHEMES:
            raise ValueError(f"`head_init` must be one of {HEAD_INIT_SCHEMES}, got {self.head_init!r}.")
        if not 0 <= self.leaky_relu_slope < 1:
            raise ValueError(f"`leaky_relu_slope` must be in [0, 1), got {self.leaky_relu_slope}.")
        super().__post_init__(**kwargs)
        if self.num_labels < 2:
            raise ValueError(f"Semantic segmentation needs `num_labels >= 2`, got {self.num_labels}.")
        if 0 <= self.semantic_loss_ignore_index < self.num_labels:
            raise ValueError(
                f"`semantic_loss_ignore_index` ({self.semantic_loss_ignore_index}) collides with a class id "
                f"(num_labels={self.num_labels})."
            )


__all__ = ["PAPER_MULTI_GRID", "CPSConfig"]
