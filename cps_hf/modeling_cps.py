"""Cross Pseudo Supervision: several independent DeepLabv3+ branches on a timm backbone."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_cps import PAPER_MULTI_GRID, CPSConfig
from .losses import supervised_cross_entropy

logger = logging.get_logger(__name__)

LOW_LEVEL_REDUCTION = 4


@dataclass
class CPSSemanticSegmenterOutput(ModelOutput):
    r"""
    Output of [`CPSForSemanticSegmentation`], the same in training and evaluation.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Sum over the branches that ran of their supervised pixel cross-entropy (ignore index honoured).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`):
            What inference uses, at the input resolution: the logits of `config.inference_branch`, or for the
            ensemble the log of the branches' mean softmax probabilities (so `softmax(logits)` is that mean).
        branch_logits (`tuple(torch.FloatTensor)`, *optional*, returned when `output_branch_logits=True`):
            One `(batch_size, num_labels, height, width)` tensor per branch that ran.
        branch_losses (`tuple(torch.FloatTensor)`, *optional*, returned when `labels` is given):
            The supervised cross-entropy of each branch that ran.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    branch_logits: tuple[torch.FloatTensor, ...] | None = None
    branch_losses: tuple[torch.FloatTensor, ...] | None = None


def create_timm_backbone(
    config: CPSConfig, pretrained: bool = False, pretrained_file: str | None = None
) -> nn.Module:
    """Builds the `features_only` timm backbone described by `config`, dilated for its output stride."""
    kwargs = dict(config.backbone_kwargs or {})
    if config.output_stride is not None:
        kwargs["output_stride"] = config.output_stride
    if pretrained_file is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained_file}
    try:
        backbone = timm.create_model(config.backbone, pretrained=pretrained, features_only=True, **kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"`backbone={config.backbone!r}` is not a timm model name.") from error
        raise
    except (AssertionError, TypeError) as error:
        if config.output_stride is None:
            raise
        raise ValueError(
            f"timm backbone {config.backbone!r} cannot produce `output_stride={config.output_stride}` "
            f"({type(error).__name__}: {error}). Set `output_stride=None` (and `multi_grid=None`) to use its "
            "native strides."
        ) from error
    reductions = backbone.feature_info.reduction()
    if config.output_stride is not None and reductions[-1] != config.output_stride:
        raise ValueError(
            f"timm backbone {config.backbone!r} ignored `output_stride={config.output_stride}`: its deepest "
            f"feature map has stride {reductions[-1]}. Use `output_stride=None` for this backbone."
        )
    if LOW_LEVEL_REDUCTION not in reductions:
        raise ValueError(
            f"DeepLabv3+ needs a stride-4 feature map, but backbone {config.backbone!r} only offers strides {reductions}."
        )
    if config.multi_grid == "auto":
        # Resolved against the first backbone built and stored in the config: the other branches, the pretrained
        # copy and a saved model then use the same dilations.
        config.multi_grid = automatic_multi_grid(backbone, config)
    if config.multi_grid is not None:
        apply_multi_grid(backbone, config)
    use_integer_same_padding(backbone)
    return backbone


def _last_stage_blocks(backbone: nn.Module) -> list[nn.Module]:
    last_stage_name = backbone.feature_info.module_name()[-1].replace(".", "_")
    last_stage = dict(backbone.named_children()).get(last_stage_name)
    return list(last_stage.children()) if last_stage is not None else []


def _spatial_convs(block: nn.Module) -> list[nn.Conv2d]:
    """The plain stride-1 3x3 convolutions of a block, those multi-grid dilates."""
    return [
        module
        for module in block.modules()
        if type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
    ]


def automatic_multi_grid(backbone: nn.Module, config: CPSConfig) -> list[int] | None:
    """What `multi_grid="auto"` means for `backbone`: the paper's `[1, 2, 4]` for a dilated backbone whose last
    stage has three blocks with plain 3x3 convolutions (the ResNet-50/101 family), `None` (logged) otherwise."""
    blocks = _last_stage_blocks(backbone)
    if config.output_stride is None:
        reason = "it keeps its native strides (`output_stride=None`)"
    elif len(blocks) != len(PAPER_MULTI_GRID):
        reason = f"its last stage has {len(blocks)} block(s), not {len(PAPER_MULTI_GRID)}"
    elif not all(_spatial_convs(block) for block in blocks):
        reason = "its last-stage blocks have no plain 3x3 convolutions"
    else:
        return list(PAPER_MULTI_GRID)
    logger.info(
        f"`multi_grid='auto'`: no multi-grid for backbone {config.backbone!r} ({reason}); timm's dilations are kept. "
        f"The paper's {list(PAPER_MULTI_GRID)} applies to ResNets with three last-stage blocks (resnet50s, ...)."
    )
    return None


def apply_multi_grid(backbone: nn.Module, config: CPSConfig) -> None:
    """Gives block `i` of the last stage dilation `(32 // output_stride) * multi_grid[i]` on its 3x3 convolutions."""
    blocks = _last_stage_blocks(backbone)
    if len(blocks) != len(config.multi_grid):
        raise ValueError(
            f"`multi_grid={list(config.multi_grid)}` needs one rate per block of the last stage, but backbone "
            f"{config.backbone!r} has {len(blocks)} block(s) there. Set `multi_grid=None` for this backbone."
        )
    base_dilation = 32 // config.output_stride
    for block_index, (block, multiplier) in enumerate(zip(blocks, config.multi_grid)):
        spatial_convs = _spatial_convs(block)
        if not spatial_convs:
            raise ValueError(
                f"`multi_grid` supports backbones whose last-stage blocks use plain 3x3 convolutions (ResNet family); "
                f"block {block_index} of {config.backbone!r} has none. Set `multi_grid=None`."
            )
        dilation = base_dilation * multiplier
        for conv in spatial_convs:
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


def same_padding(
    size: int | torch.SymInt, kernel_size: int, stride: int, dilation: int
) -> int | torch.SymInt:
    """Total TensorFlow-style 'SAME' padding along one axis, in integer arithmetic."""
    # `-(-size // stride)` is `ceil(size / stride)` without a float: a traced graph keeps an integer expression,
    # which `torch.export.save` serialises, and which is a constant for stride 1.
    return torch.sym_max((-(-size // stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)


def pad_same(
    input: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    value: float,
) -> torch.Tensor:
    """Pads `input` for a 'SAME' pooling window, the extra pixel of an odd total at the bottom / right."""
    pad_height, pad_width = (
        same_padding(size, kernel, step, rate)
        for size, kernel, step, rate in zip(input.shape[-2:], kernel_size, stride, dilation)
    )
    padding = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
    return F.pad(input, padding, value=value)


class IntegerPaddingAvgPool2dSame(AvgPool2dSame):
    """timm's `AvgPool2dSame` (the stride-1 shortcut pooling of dilated `avg_down` ResNets) with its padding computed
    by [`same_padding`]; the outputs are the same."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padded = pad_same(input, self.kernel_size, self.stride, (1, 1), value=0.0)
        return F.avg_pool2d(
            padded, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad
        )


class IntegerPaddingMaxPool2dSame(MaxPool2dSame):
    """timm's `MaxPool2dSame` with its padding computed by [`same_padding`]; the outputs are the same."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padded = pad_same(input, self.kernel_size, self.stride, self.dilation, value=-float("inf"))
        return F.max_pool2d(
            padded, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode
        )


INTEGER_PADDING_POOLS: dict[type[nn.Module], type[nn.Module]] = {
    AvgPool2dSame: IntegerPaddingAvgPool2dSame,
    MaxPool2dSame: IntegerPaddingMaxPool2dSame,
}


def use_integer_same_padding(module: nn.Module) -> int:
    """Turns timm's 'SAME'-padded pooling layers inside `module` into their integer-padding versions (in place).

    Returns:
        `int`: how many layers were changed.
    """
    converted = 0
    for layer in module.modules():
        replacement = INTEGER_PADDING_POOLS.get(type(layer))
        if replacement is not None:
            layer.__class__ = replacement
            converted += 1
    return converted


class PaddingAwareConv2d(nn.Conv2d):
    """
    A zero-padded, stride-1 dilated `nn.Conv2d` that leaves out the kernel rows and columns whose every input lies in
    the padding: with dilation `d` and a map `size <= d` pixels high, the outer rows of a 3x3 kernel only ever see
    zeros. The remaining taps are applied with the matching smaller padding, so the output equals the full
    convolution's (up to summation order) and the skipped weights get the zero gradient they would get anyway.
    Parameters and state-dict keys are those of `nn.Conv2d`.

    Taps are skipped only when the map size is known to make them read padding alone: under tracing with dynamic
    shapes (`torch.export`, ONNX export, `torch.compile(dynamic=True)`) a symbolic size that does not prove it keeps
    every tap, so one traced graph is right for every input size.
    """

    def _kept_radius(self, axis: int, size: int | torch.SymInt) -> int:
        radius = self.kernel_size[axis] // 2
        # Tap `j` of the kernel (offset `j * dilation` from the centre) reads inside the map for some output iff
        # `|j| * dilation < size`. `statically_known_true` is the plain comparison for an int and never adds a
        # shape guard for a symbolic size.
        while radius > 0 and statically_known_true(radius * self.dilation[axis] >= size):
            radius -= 1
        return radius

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        height, width = input.shape[-2:]
        kept = (self._kept_radius(0, height), self._kept_radius(1, width))
        full = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        if kept == full:
            return super().forward(input)
        centre = full
        weight = self.weight[
            :,
            :,
            centre[0] - kept[0] : centre[0] + kept[0] + 1,
            centre[1] - kept[1] : centre[1] + kept[1] + 1,
        ]
        padding = (kept[0] * self.dilation[0], kept[1] * self.dilation[1])
        return F.conv2d(input, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def _can_skip_padding_taps(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.stride == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.groups == 1
        and all(size % 2 == 1 for size in conv.kernel_size)
        and max(conv.dilation) > 1
        and conv.padding == tuple(d * (k // 2) for d, k in zip(conv.dilation, conv.kernel_size))
    )


def use_padding_aware_convolutions(module: nn.Module) -> int:
    """Turns every dilated, zero-padded, stride-1 `nn.Conv2d` inside `module` into a [`PaddingAwareConv2d`].

    The class of each convolution is changed in place: its parameters stay the same objects (with the flags that
    keep `post_init` from re-initialising pretrained backbone weights), and state-dict keys do not change.

    Returns:
        `int`: how many convolutions were changed.
    """
    converted = 0
    for conv in module.modules():
        if _can_skip_padding_taps(conv):
            conv.__class__ = PaddingAwareConv2d
            converted += 1
    return converted


def conv_norm(
    in_channels: int, out_channels: int, kernel_size: int, config: CPSConfig, dilation: int = 1
) -> list[nn.Module]:
    padding = dilation * (kernel_size // 2)
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum),
    ]


class CPSAtrousSpatialPyramidPooling(nn.Module):
    """ASPP as in the CPS network: four parallel convolutions sharing one BatchNorm, plus an *added* image-pooling term."""

    def __init__(self, in_channels: int, config: CPSConfig):
        super().__init__()
        channels = config.aspp_channels
        self.branch_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, channels, 1, bias=False)]
            + [
                nn.Conv2d(in_channels, channels, 3, padding=rate, dilation=rate, bias=False)
                for rate in config.aspp_dilation_rates
            ]
        )
        self.branch_norm = nn.BatchNorm2d(
            4 * channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum
        )
        self.projection = nn.Conv2d(4 * channels, channels, 1, bias=False)
        self.pooling_conv = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.pooling_norm = nn.BatchNorm2d(
            channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum
        )
        self.pooling_projection = nn.Conv2d(channels, channels, 1, bias=False)
        self.output_norm = nn.BatchNorm2d(
            channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum
        )
        self.activation = nn.LeakyReLU(config.leaky_relu_slope)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        branches = torch.cat(
            [conv(features) for conv in self.branch_convs], dim=1
        )  # (batch, 4 * channels, h, w)
        output = self.projection(self.activation(self.branch_norm(branches)))
        pooled = features.mean(dim=(2, 3), keepdim=True)  # (batch, in_channels, 1, 1)
        pooled = self.pooling_projection(self.activation(self.pooling_norm(self.pooling_conv(pooled))))
        return self.activation(self.output_norm(output + pooled))


class CPSDecoder(nn.Module):
    """DeepLabv3+ decoder: fuse the upsampled ASPP output with projected stride-4 features."""

    def __init__(self, low_level_in_channels: int, config: CPSConfig):
        super().__init__()
        self.low_level_projection = nn.Sequential(
            *conv_norm(low_level_in_channels, config.low_level_channels, 1, config), nn.ReLU()
        )
        self.fusion = nn.Sequential(
            *conv_norm(config.aspp_channels + config.low_level_channels, config.decoder_channels, 3, config),
            nn.ReLU(),
            *conv_norm(config.decoder_channels, config.decoder_channels, 3, config),
            nn.ReLU(),
        )

    def forward(self, aspp_features: torch.Tensor, low_level_features: torch.Tensor) -> torch.Tensor:
        low_level = self.low_level_projection(low_level_features)  # (batch, low_level_channels, H/4, W/4)
        aspp_features = F.interpolate(
            aspp_features, size=low_level.shape[-2:], mode="bilinear", align_corners=True
        )
        return self.fusion(torch.cat([aspp_features, low_level], dim=1))


class CPSDeepLabV3PlusBranch(nn.Module):
    """One segmentation network of the CPS pair: timm backbone → ASPP → DeepLabv3+ decoder → classifier."""

    # Set by `CPSForSemanticSegmentation.gradient_checkpointing_enable()`: the head then runs through
    # `self._gradient_checkpointing_func` in training.
    gradient_checkpointing = False

    def __init__(self, config: CPSConfig):
        super().__init__()
        self.backbone = create_timm_backbone(config)
        channels = self.backbone.feature_info.channels()
        reductions = self.backbone.feature_info.reduction()
        self.low_level_index = reductions.index(LOW_LEVEL_REDUCTION)
        if config.fuse_feature_pyramid:
            self.high_level_indices = [i for i, r in enumerate(reductions) if r >= LOW_LEVEL_REDUCTION]
        else:
            self.high_level_indices = [len(reductions) - 1]
        self.aspp = CPSAtrousSpatialPyramidPooling(sum(channels[i] for i in self.high_level_indices), config)
        self.decoder = CPSDecoder(channels[self.low_level_index], config)
        self.classifier = nn.Conv2d(config.decoder_channels, config.num_labels, 1)
        if config.skip_padding_taps:
            use_padding_aware_convolutions(self)
        # Native-stride backbones (HRNet) fuse their resolutions by exact up/down-sampling and need inputs that
        # are a multiple of their deepest stride; dilated backbones take any size.
        self.input_multiple = max(reductions) if config.output_stride is None else 1

    def high_level_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(self.high_level_indices) == 1:
            return features[self.high_level_indices[0]]
        finest = features[self.high_level_indices[0]]
        return torch.cat(
            [finest]
            + [
                F.interpolate(features[i], size=finest.shape[-2:], mode="bilinear", align_corners=True)
                for i in self.high_level_indices[1:]
            ],
            dim=1,
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if self.input_multiple > 1:
            # Padding by zero pixels is a no-op, so no branch on the size: one traced graph serves every size.
            pad_bottom, pad_right = (-height) % self.input_multiple, (-width) % self.input_multiple
            pixel_values = F.pad(pixel_values, (0, pad_right, 0, pad_bottom))
        features = self.backbone(pixel_values)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            logits = self._gradient_checkpointing_func(self.head, *features)
        else:
            logits = self.head(*features)
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=True)
        return logits[..., :height, :width]

    def head(self, *features: torch.Tensor) -> torch.Tensor:
        """ASPP → decoder → classifier on the backbone's feature maps: logits `(batch, num_labels, H/4, W/4)`."""
        aspp_features = self.aspp(self.high_level_features(features))
        return self.classifier(self.decoder(aspp_features, features[self.low_level_index]))


class CPSPreTrainedModel(PreTrainedModel):
    config: CPSConfig
    config_class = CPSConfig
    base_model_prefix = "cps"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # The loss is a plain mean; the Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        # Backbone modules are flagged `_is_hf_initialized` at construction and never reach this method, so
        # their timm (or ImageNet) weights survive `post_init`.
        if isinstance(module, nn.Conv2d):
            scheme = self.config.head_init
            if scheme == "kaiming_normal":
                init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif scheme == "xavier_normal":
                init.xavier_normal_(module.weight)
            elif scheme == "normal":
                init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            else:
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class CPSForSemanticSegmentation(CPSPreTrainedModel):
    r"""
    Cross Pseudo Supervision model: `config.num_branches` independent DeepLabv3+ networks of identical structure.
    The heads are initialised independently; the backbones start from the same weights when they are pretrained
    (the paper) and from independent random draws otherwise (see `config.share_backbone_initialization`). The
    branches share no module. `forward` runs every branch (or one, with `branch_index`) and returns
    [`CPSSemanticSegmenterOutput`] whose `logits` come from `config.inference_branch` or the ensemble.

    Use [`~CPSForSemanticSegmentation.from_timm_pretrained`] to start from ImageNet backbone weights.

    `gradient_checkpointing_enable()` (the Trainer's `--gradient_checkpointing true`) makes training recompute each
    branch's backbone stages (timm's `set_grad_checkpointing`) and head in the backward pass instead of storing their
    activations: same losses and gradients, less memory, and BatchNorm still updates its running statistics once
    per forward call.

    Example:

    ```python
    >>> import torch
    >>> from cps_hf import CPSConfig, CPSForSemanticSegmentation

    >>> config = CPSConfig(backbone="test_resnet", num_labels=3, multi_grid=None)
    >>> model = CPSForSemanticSegmentation(config).eval()
    >>> outputs = model(torch.randn(1, 3, 64, 64), output_branch_logits=True)
    >>> outputs.logits.shape, len(outputs.branch_logits)
    (torch.Size([1, 3, 64, 64]), 2)
    ```"""

    def __init__(self, config: CPSConfig):
        super().__init__(config)
        if config.share_backbone_initialization is None:
            # A random backbone copied into every branch makes the branches start too alike: from scratch, each
            # branch keeps its own draw. (`from_timm_pretrained` decides `True` before building.)
            config.share_backbone_initialization = False
            logger.info(
                "`share_backbone_initialization=None` with a randomly initialised backbone: every branch keeps its "
                "own random backbone draw (set it to True for one shared draw)."
            )
        self.branches = nn.ModuleList([CPSDeepLabV3PlusBranch(config) for _ in range(config.num_branches)])
        self._recomputation_hooks: list[RemovableHandle] = []
        if config.share_backbone_initialization:
            self._share_backbone_initialisation()
        for branch in self.branches:
            mark_initialized(branch.backbone)
        self.post_init()

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ) -> None:
        # Reached through `gradient_checkpointing_enable()` / `_disable()` and the Trainer's `--gradient_checkpointing`:
        # each branch's head goes through `gradient_checkpointing_func` (the flag set by the parent class), its
        # backbone stages through timm's own checkpointing.
        if every_n_layers != 1:
            raise ValueError(
                f"`every_n_layers` selects transformer layers; CPS checkpoints every backbone stage and head. "
                f"Leave it at 1, got {every_n_layers}."
            )
        super()._set_gradient_checkpointing(
            enable=enable, gradient_checkpointing_func=gradient_checkpointing_func
        )
        for handle in self._recomputation_hooks:
            handle.remove()
        self._recomputation_hooks = skip_statistics_updates_in_recomputation(self) if enable else []
        backbones_checkpointed = [
            set_backbone_checkpointing(branch.backbone, enable) for branch in self.branches
        ]
        if enable and not all(backbones_checkpointed):
            logger.warning(
                f"timm backbone {self.config.backbone!r} has no gradient checkpointing: only the head (ASPP, "
                "decoder, classifier) of each branch is checkpointed."
            )

    def _share_backbone_initialisation(self) -> None:
        reference_state = self.branches[0].backbone.state_dict()
        for branch in self.branches[1:]:
            branch.backbone.load_state_dict(reference_state)

    @classmethod
    def from_timm_pretrained(
        cls, config: CPSConfig, pretrained_file: str | None = None
    ) -> CPSForSemanticSegmentation:
        """
        Builds a new model whose every branch starts from the timm backbone's ImageNet weights (heads still
        initialised independently per branch). `config.share_backbone_initialization=None` becomes `True`.

        Args:
            config (`CPSConfig`):
                The model configuration.
            pretrained_file (`str`, *optional*):
                A local weights file for the backbone (anything timm's `pretrained_cfg_overlay=dict(file=...)`
                loads). Without it the weights are downloaded through timm from the Hugging Face Hub.
        """
        if config.share_backbone_initialization is None:
            config.share_backbone_initialization = True
        model = cls(config)
        pretrained_state = load_pretrained_backbone_state(config, pretrained_file)
        for branch in model.branches:
            branch.backbone.load_state_dict(pretrained_state)
        return model

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        branch_index: int | None = None,
        output_branch_logits: bool | None = None,
        return_dict: bool | None = None,
    ) -> CPSSemanticSegmenterOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Normalised images.
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                Class ids; `config.semantic_loss_ignore_index` marks pixels without a label.
            branch_index (`int`, *optional*):
                Run only this branch; `logits` (and `loss`) are then that branch's.
            output_branch_logits (`bool`, *optional*, defaults to `False`):
                Also return the logits of every branch that ran.
            return_dict (`bool`, *optional*):
                Return a [`CPSSemanticSegmenterOutput`] (default) instead of a tuple.
        """
        if branch_index is not None:
            if not 0 <= branch_index < len(self.branches):
                raise ValueError(f"`branch_index` must be in [0, {len(self.branches)}), got {branch_index}.")
            branch_logits = (self.branches[branch_index](pixel_values),)
            logits = branch_logits[0]
        else:
            branch_logits = tuple(branch(pixel_values) for branch in self.branches)
            logits = self.combine_branch_logits(branch_logits)

        loss = branch_losses = None
        if labels is not None:
            branch_losses = tuple(
                supervised_cross_entropy(branch_output, labels, self.config.semantic_loss_ignore_index)
                for branch_output in branch_logits
            )
            loss = torch.stack(branch_losses).sum()

        output = CPSSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            branch_logits=branch_logits if output_branch_logits else None,
            branch_losses=branch_losses,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def combine_branch_logits(self, branch_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The inference logits: the configured branch's, or the log of the mean softmax over all branches."""
        if self.config.inference_branch == "ensemble":
            return ensemble_logits(branch_logits)
        return branch_logits[self.config.inference_branch]


def ensemble_logits(branch_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The ensemble's logits: the log of the branches' mean softmax probabilities (float32)."""
    probabilities = torch.stack([logits.float().softmax(dim=1) for logits in branch_logits]).mean(dim=0)
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


def set_backbone_checkpointing(backbone: nn.Module, enable: bool) -> bool:
    """Turns timm's activation checkpointing of the backbone's stages on or off; `False` if the backbone has none."""
    if not hasattr(backbone, "set_grad_checkpointing"):
        return False
    try:
        backbone.set_grad_checkpointing(enable)
    except AssertionError:  # timm's answer for models without it (HRNet, Inception, VGG, ...)
        return False
    return True


def _save_statistics_in_recomputation(norm: nn.Module, args: tuple) -> None:
    # A forward run inside a backward pass is a checkpoint recomputation; torch has no public flag for it
    # (pytorch/pytorch#96136). Compiled graphs recompute inside autograd and never re-run the update.
    if norm.training and not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
        norm._statistics_before_recomputation = [buffer.clone() for buffer in norm.buffers(recurse=False)]


def _restore_statistics_after_recomputation(
    norm: nn.Module, args: tuple, output: torch.Tensor | None
) -> None:
    saved = getattr(norm, "_statistics_before_recomputation", None)
    if saved is not None:
        del norm._statistics_before_recomputation
        with torch.no_grad():
            for buffer, value in zip(norm.buffers(recurse=False), saved):
                buffer.copy_(value)


def skip_statistics_updates_in_recomputation(module: nn.Module) -> list[RemovableHandle]:
    """Hooks every BatchNorm layer below `module` so that activation-checkpoint recomputation leaves its running
    statistics and batch count as the forward pass left them (one update per forward, as without checkpointing).
    Returns the hook handles."""
    handles = []
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            handles.append(norm.register_forward_pre_hook(_save_statistics_in_recomputation))
            # `always_call`: recomputation stops early by raising once it has what the backward pass needs.
            handles.append(
                norm.register_forward_hook(_restore_statistics_after_recomputation, always_call=True)
            )
    return handles


def mark_initialized(module: nn.Module) -> None:
    """Flags every submodule, parameter and buffer so transformers' `post_init` leaves them untouched."""
    for submodule in module.modules():
        submodule._is_hf_initialized = True
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor._is_hf_initialized = True


def load_pretrained_backbone_state(
    config: CPSConfig, pretrained_file: str | None = None
) -> dict[str, torch.Tensor]:
    """ImageNet weights of the configured timm backbone, as a `features_only` state dict."""
    try:
        backbone = create_timm_backbone(config, pretrained=True, pretrained_file=pretrained_file)
    except (OSError, RuntimeError, ValueError) as error:
        if pretrained_file is not None:
            raise OSError(
                f"Could not load backbone weights for {config.backbone!r} from {pretrained_file!r}: {error}"
            ) from error
        raise OSError(
            f"Could not download ImageNet weights for timm backbone {config.backbone!r} from the Hugging Face Hub "
            f"({type(error).__name__}: {error}). Check the network (or HF_ENDPOINT), or pass `pretrained_file=` "
            "a local weights file; train from scratch with `pretrained_backbone=False`."
        ) from error
    return backbone.state_dict()


__all__ = [
    "CPSDeepLabV3PlusBranch",
    "CPSForSemanticSegmentation",
    "CPSPreTrainedModel",
    "CPSSemanticSegmenterOutput",
    "PaddingAwareConv2d",
    "ensemble_logits",
    "use_padding_aware_convolutions",
]
