"""The model: MobileNetV4 (and the MobileNetV2 peer) as tables of block specs, one builder, a size summary.

Each variant is a table of rows (the paper's tables, adapted to 32x32 inputs by `with_output_stride`); one
general block, the universal inverted bottleneck, builds every UIB row.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import BlockSpec, Residual, build_block, conv, conv_bn, fused_ib, make_divisible, mqa, uib

# The paper's block tables (MNV4_SPEC.md section 4). Stage 4 is the 1x1 conv to 960 channels; `head_width` is the
# 1x1 conv after the global pool (MobileNetV4 only). Strides are the ImageNet ones: see `output_stride`.
# One row per stage, as the paper prints them: kept out of the formatter.
# fmt: off
BLOCK_TABLES = {
    "conv_small": dict(stem=32, head_width=1280, layer_scale=False, stages=[
        [conv(3, 2, 32), conv(1, 1, 32)],
        [conv(3, 2, 96), conv(1, 1, 64)],
        [uib(5, 5, 2, 3, 96), *[uib(0, 3, 1, 2, 96)] * 4, uib(3, 0, 1, 4, 96)],
        [uib(3, 3, 2, 6, 128), uib(5, 5, 1, 4, 128), uib(0, 5, 1, 4, 128), uib(0, 5, 1, 3, 128),
         *[uib(0, 3, 1, 4, 128)] * 2],
        [conv(1, 1, 960)],
    ]),
    "conv_medium": dict(stem=32, head_width=1280, layer_scale=False, stages=[
        [fused_ib(3, 2, 4, 48)],
        [uib(3, 5, 2, 4, 80), uib(3, 3, 1, 2, 80)],
        [uib(3, 5, 2, 6, 160), *[uib(3, 3, 1, 4, 160)] * 2, uib(3, 5, 1, 4, 160), uib(3, 3, 1, 4, 160),
         uib(3, 0, 1, 4, 160), uib(0, 0, 1, 2, 160), uib(3, 0, 1, 4, 160)],
        [uib(5, 5, 2, 6, 256), uib(5, 5, 1, 4, 256), *[uib(3, 5, 1, 4, 256)] * 2, uib(0, 0, 1, 4, 256),
         uib(3, 0, 1, 4, 256), uib(3, 5, 1, 2, 256), uib(5, 5, 1, 4, 256), *[uib(0, 0, 1, 4, 256)] * 2,
         uib(5, 0, 1, 2, 256)],
        [conv(1, 1, 960)],
    ]),
    "conv_large": dict(stem=24, head_width=1280, layer_scale=False, stages=[
        [fused_ib(3, 2, 4, 48)],
        [uib(3, 5, 2, 4, 96), uib(3, 3, 1, 4, 96)],
        [uib(3, 5, 2, 4, 192), *[uib(3, 3, 1, 4, 192)] * 3, uib(3, 5, 1, 4, 192),
         *[uib(5, 3, 1, 4, 192)] * 5, uib(3, 0, 1, 4, 192)],
        [uib(5, 5, 2, 4, 512), *[uib(5, 5, 1, 4, 512)] * 3, uib(5, 0, 1, 4, 512), uib(5, 3, 1, 4, 512),
         *[uib(5, 0, 1, 4, 512)] * 2, uib(5, 3, 1, 4, 512), uib(5, 5, 1, 4, 512), *[uib(5, 0, 1, 4, 512)] * 3],
        [conv(1, 1, 960)],
    ]),
    "hybrid_medium": dict(stem=32, head_width=1280, layer_scale=True, stages=[
        [fused_ib(3, 2, 4, 48)],
        [uib(3, 5, 2, 4, 80), uib(3, 3, 1, 2, 80)],
        [uib(3, 5, 2, 6, 160), uib(0, 0, 1, 2, 160), uib(3, 3, 1, 4, 160), uib(3, 5, 1, 4, 160),
         mqa(4, 64, 2, 160), uib(3, 3, 1, 4, 160), mqa(4, 64, 2, 160), uib(3, 0, 1, 4, 160),
         mqa(4, 64, 2, 160), uib(3, 3, 1, 4, 160), mqa(4, 64, 2, 160), uib(3, 0, 1, 4, 160)],
        [uib(5, 5, 2, 6, 256), uib(5, 5, 1, 4, 256), *[uib(3, 5, 1, 4, 256)] * 2, uib(0, 0, 1, 2, 256),
         uib(3, 5, 1, 2, 256), uib(0, 0, 1, 2, 256), uib(0, 0, 1, 4, 256), mqa(4, 64, 1, 256),
         uib(3, 0, 1, 4, 256), mqa(4, 64, 1, 256), uib(5, 5, 1, 4, 256), mqa(4, 64, 1, 256),
         uib(5, 0, 1, 4, 256), mqa(4, 64, 1, 256), uib(5, 0, 1, 4, 256)],
        [conv(1, 1, 960)],
    ]),
    # MobileNetV2 (Sandler et al., Table 2) in the same notation, as the peer to compare with: an inverted bottleneck
    # is a UIB with no start depthwise (and no expansion conv at ratio 1); the 1x1 conv to 1280 runs before the pool.
    "mobilenetv2": dict(stem=32, head_width=0, layer_scale=False, stages=[
        [uib(0, 3, 1, 1, 16)],
        [uib(0, 3, 2, 6, 24), uib(0, 3, 1, 6, 24)],
        [uib(0, 3, 2, 6, 32), *[uib(0, 3, 1, 6, 32)] * 2],
        [uib(0, 3, 2, 6, 64), *[uib(0, 3, 1, 6, 64)] * 3, uib(0, 3, 1, 6, 96), *[uib(0, 3, 1, 6, 96)] * 2],
        [uib(0, 3, 2, 6, 160), *[uib(0, 3, 1, 6, 160)] * 2, uib(0, 3, 1, 6, 320), conv(1, 1, 1280)],
    ]),
}
# fmt: on


VARIANTS = tuple(BLOCK_TABLES)
ATTENTION_VARIANTS = tuple(
    name for name, table in BLOCK_TABLES.items() if any(s.kind == "mqa" for stage in table["stages"] for s in stage)
)


ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}


HEADS = ("linear", "mlp")


OUTPUT_STRIDES = (32, 16, 8, 4)  # 32x32 input: 1x1, 2x2, 4x4 (the CIFAR default), 8x8 final map


def with_output_stride(stem_stride: int, stages: list, output_stride: int) -> tuple[int, list]:
    """The stem stride and block table with strided layers set to stride 1, as many as it takes for the network to
    down-sample by `output_stride` in all (32 in the tables). The first to go are the stem and stage 0 (8: the usual
    CIFAR port, 32x32 -> 4x4, MNV4_SPEC.md section 3), then the strided UIBs in order (4: an 8x8 map), so extra
    resolution goes where the inverted bottlenecks are rather than to Conv-S's plain 3x3 conv of stage 1. Kernels
    stay; only strides change (timm's `output_stride` dilates instead, keeping the receptive field)."""
    total = stem_stride * math.prod(spec.stride for stage in stages for spec in stage)
    if output_stride not in OUTPUT_STRIDES or output_stride > total:
        raise ValueError(f"unknown output_stride {output_stride!r}; choose from {', '.join(map(str, OUTPUT_STRIDES))}")
    strided = [(i, j) for i, stage in enumerate(stages) for j, spec in enumerate(stage) if spec.stride > 1]
    stage0 = [(i, j) for i, j in strided if i == 0][:1]
    bottlenecks = [(i, j) for i, j in strided if i > 0 and stages[i][j].kind in ("uib", "mqa")]
    order = [*stage0, *bottlenecks, *(p for p in strided if p not in stage0 and p not in bottlenecks)]
    to_drop = int(math.log2(total // output_stride))
    if to_drop and stem_stride > 1:
        stem_stride, to_drop = 1, to_drop - 1
    unstrided = set(order[:to_drop])
    return stem_stride, [
        [BlockSpec(**{**spec.__dict__, "stride": 1}) if (i, j) in unstrided else spec for j, spec in enumerate(stage)]
        for i, stage in enumerate(stages)
    ]


class MobileNetV4(nn.Module):
    """The network a block table describes: stem, stages of table rows, pool, optional 1x1 head conv, classifier."""

    def __init__(
        self,
        variant="conv_small",
        num_classes=10,
        *,
        width_mult=1.0,
        output_stride=8,
        act="relu",
        se=False,
        drop_path_rate=0.0,
        head="linear",
        dropout=0.2,
    ):
        super().__init__()
        spec = BLOCK_TABLES[variant]
        act_layer = ACTIVATIONS[act]
        stem_stride, table = with_output_stride(2, spec["stages"], output_stride)
        stem_width = make_divisible(spec["stem"] * width_mult, 8) if width_mult >= 1 else spec["stem"]
        self.stem = conv_bn(3, stem_width, 3, stem_stride, act=act_layer)
        n_blocks = sum(len(stage) for stage in table)
        stages, c, index = [], stem_width, 0
        for stage_spec in table:
            blocks = []
            for block_spec in stage_spec:
                block, c = build_block(
                    c, block_spec, width_mult, act_layer, se, spec["layer_scale"], drop_path_rate * index / n_blocks
                )
                blocks.append(block)
                index += 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        head_width = spec["head_width"] or c
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            conv_bn(c, head_width, 1, act=act_layer) if spec["head_width"] else nn.Identity(),
            nn.Flatten(1),
            classifier(head, head_width, num_classes, dropout, act_layer),
        )
        self.config = dict(
            variant=variant,
            num_classes=num_classes,
            width_mult=width_mult,
            output_stride=output_stride,
            act=act,
            se=se,
            drop_path_rate=drop_path_rate,
            head=head,
            dropout=dropout,
        )
        self.apply(init_weights)

    def forward_features(self, x):
        return self.stages(self.stem(x))  # [B, 3, H, W] -> [B, C, H / output_stride, W / output_stride]

    def forward(self, x):
        return self.head(self.forward_features(x))  # [B, classes]


def classifier(head, width, num_classes, dropout, act_layer):
    if head == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
    if head == "mlp":  # the enhanced head: `dropout` before the hidden layer, half of it after (0.3 / 0.15)
        return nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(width, 512),
            act_layer(),
            nn.Dropout(dropout / 2),
            nn.Linear(512, num_classes),
        )
    raise ValueError(f"unknown head {head!r}; choose from {HEADS}")


def init_weights(m):
    """timm's MobileNet init: conv N(0, sqrt(2 / fan_out)) with fan_out = k*k*out_channels / groups (so a
    depthwise 3x3 gets std sqrt(2/9), not sqrt(2/(9*C)) as torch's kaiming_normal_ computes for grouped convs),
    BN (1, 0); with one deliberate change: Linear layers get U(+-1/sqrt(in_features)). The reference's
    U(+-1/sqrt(out_features)) was sized for 1000 classes; with 10 it starts the logits ~10x too large (initial
    loss 5-9 instead of ln 10)."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        bound = 1.0 / math.sqrt(m.in_features)
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.zeros_(m.bias)


def zero_init_last_norms(model: nn.Module) -> int:
    """Zero the scale of the last BatchNorm in every residual UIB branch, so the block starts as the identity and
    the signal first flows through the shortcuts (Goyal et al. 2017; timm's `zero_init_last`). Attention blocks
    are left alone: the hybrid models already start them near zero through LayerScale. Returns how many."""
    zeroed = 0
    for module in model.modules():
        if isinstance(module, Residual) and module.use_residual and isinstance(module.branch, nn.Sequential):
            last_norm = module.branch[-1][1]  # the projection: Conv2dNormActivation(conv, BN)
            nn.init.zeros_(last_norm.weight)
            zeroed += 1
    return zeroed


def mobilenetv4(
    variant="conv_small",
    num_classes=10,
    *,
    width_mult=1.0,
    output_stride=8,
    act="relu",
    se=False,
    drop_path_rate=0.0,
    head="linear",
    dropout=0.2,
) -> MobileNetV4:
    """Build a MobileNetV4 (or the MobileNetV2 peer). `output_stride` is the total down-sampling: 8 (the default)
    keeps 32x32 inputs at full resolution through stage 0 (4x4 final map), 4 gives an 8x8 map, 32 is ImageNet's."""
    if variant not in BLOCK_TABLES:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose from {', '.join(ACTIVATIONS)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"unknown output_stride {output_stride!r}; choose from {', '.join(map(str, OUTPUT_STRIDES))}")
    return MobileNetV4(
        variant,
        num_classes,
        width_mult=width_mult,
        output_stride=output_stride,
        act=act,
        se=se,
        drop_path_rate=drop_path_rate,
        head=head,
        dropout=dropout,
    )


def model_from_args(args) -> MobileNetV4:
    """The model the command-line flags describe (10 classes), initialised as they say."""
    model = mobilenetv4(
        args.variant,
        10,
        width_mult=args.width_mult,
        output_stride=args.output_stride,
        act=args.act,
        se=args.se,
        drop_path_rate=args.drop_path,
        head=args.head,
        dropout=args.dropout,
    )
    if args.zero_init_last:
        zero_init_last_norms(model)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size=(1, 3, 32, 32)) -> int:
    """Multiply-accumulates per forward of `input_size`, from torch.utils.flop_counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(input_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2 // input_size[0]


def model_summary(model: MobileNetV4, image_size=32) -> dict:
    """Parameters, MACs per image and the feature-map size after the stem and each stage."""
    device = next(model.parameters()).device
    shapes = {}
    with torch.no_grad():
        was_training = model.training
        model.eval()
        x = model.stem(torch.zeros(2, 3, image_size, image_size, device=device))
        shapes["stem"] = list(x.shape[1:])
        for i, stage in enumerate(model.stages):
            x = stage(x)
            shapes[f"stage{i}"] = list(x.shape[1:])
        model.train(was_training)
    return {
        "params": count_params(model),
        "macs": count_macs(model, (1, 3, image_size, image_size)),
        "feature_maps": shapes,
    }


def format_summary(summary: dict) -> str:
    maps = ", ".join(f"{k} {c}x{h}x{w}" for k, (c, h, w) in summary["feature_maps"].items())
    return f"params {summary['params']:,} | MACs {summary['macs'] / 1e6:.2f} M/image | maps: {maps}"
