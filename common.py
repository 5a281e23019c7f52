"""MobileNetV4 for CIFAR-10: the model, the data pipeline and the plumbing both training scripts share.

Sections, in order:
  1. Model      block specs per variant (the paper's tables), the blocks, one builder, a summary
  2. Data       CIFAR-10 pickles -> uint8 tensors on the device, batched on-device augmentation, TTA views
  3. Device     device and precision choice, in one place
  4. Training   command line, checkpoints, signals, the per-epoch run bookkeeping
  5. Reporting  log lines, metrics files, plots, the final summary

Importing this module has no side effects of its own: it downloads nothing and sets no environment variable
(torch and torchvision themselves may set a cache variable when imported).
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import pickle
import platform
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation, StochasticDepth


# =====================================================================================================
# 1. Model
# =====================================================================================================

def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never dropping more than 10% (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class BlockSpec:
    """One row of a MobileNetV4 table. `kind` is conv | fused_ib | uib | mqa; unused fields stay 0."""
    kind: str
    out: int                 # output channels before the width multiplier
    stride: int = 1
    kernel: int = 0          # conv / fused_ib kernel
    start_dw: int = 0        # UIB start depthwise kernel (0 = absent)
    middle_dw: int = 0       # UIB middle depthwise kernel (0 = absent)
    expand: float = 0.0      # UIB / FusedIB expansion ratio
    heads: int = 0           # MQA query heads
    key_dim: int = 0         # MQA key / value width per head
    kv_stride: int = 1       # MQA key / value down-sampling


# Short constructors so each table row reads like the paper's notation.
def conv(k, s, c):
    return BlockSpec("conv", c, stride=s, kernel=k)


def fused_ib(k, s, e, c):
    return BlockSpec("fused_ib", c, stride=s, kernel=k, expand=e)


def uib(a, m, s, e, c):
    """Universal Inverted Bottleneck (start DW a, middle DW m, stride s, expansion e, out c)."""
    return BlockSpec("uib", c, stride=s, start_dw=a, middle_dw=m, expand=e)


def mqa(heads, key_dim, kv_stride, c):
    return BlockSpec("mqa", c, heads=heads, key_dim=key_dim, kv_stride=kv_stride)


# The paper's block tables (MNV4_SPEC.md section 4). Stage 4 is the 1x1 conv to 960 channels; `head_width` is the
# 1x1 conv after the global pool (MobileNetV4 only). Strides are the ImageNet ones: see `output_stride`.
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
VARIANTS = tuple(BLOCK_TABLES)
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}
HEADS = ("linear", "mlp")
SE_REDUCTION = 16


def conv_bn(c_in, c_out, kernel, stride=1, groups=1, act=None):
    """k x k conv (no bias) -> BN -> optional activation; padding k // 2 at every stride."""
    return Conv2dNormActivation(c_in, c_out, kernel, stride, groups=groups, activation_layer=act,
                                inplace=None)


class LayerScale2d(nn.Module):
    """Learnable per-channel scale on a residual branch (CaiT-style), used by the hybrid models."""

    def __init__(self, channels: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), init))

    def forward(self, x):
        return x * self.gamma


class Residual(nn.Module):
    """out = x + DropPath(LayerScale(branch(x))) when shapes allow, else branch(x)."""

    def __init__(self, branch, use_residual, channels, layer_scale, drop_path):
        super().__init__()
        self.branch = branch
        self.use_residual = use_residual
        self.layer_scale = LayerScale2d(channels) if layer_scale else nn.Identity()
        self.drop_path = StochasticDepth(drop_path, "row") if use_residual and drop_path > 0 else nn.Identity()

    def forward(self, x):
        out = self.layer_scale(self.branch(x))
        return x + self.drop_path(out) if self.use_residual else out


def se_layer(channels, act):
    return SqueezeExcitation(channels, make_divisible(channels / SE_REDUCTION, 8), activation=act)


def uib_branch(c_in, c_out, spec: BlockSpec, act, se: bool):
    """The UIB's branch; absent parts are nn.Identity so one class covers ExtraDW, IB, ConvNext and FFN."""
    expanded = make_divisible(c_in * spec.expand, 8)
    start_stride = 1 if spec.middle_dw else spec.stride
    return nn.Sequential(
        conv_bn(c_in, c_in, spec.start_dw, start_stride, groups=c_in) if spec.start_dw else nn.Identity(),
        # MobileNetV2's ratio-1 block has no expansion conv (MobileNetV4's tables never use ratio 1).
        conv_bn(c_in, expanded, 1, act=act) if spec.expand != 1 else nn.Identity(),
        conv_bn(expanded, expanded, spec.middle_dw, spec.stride, groups=expanded, act=act)
        if spec.middle_dw else nn.Identity(),
        # SE on the expanded channels of every UIB: after the middle DW, else right after the expansion (timm).
        se_layer(expanded, act) if se else nn.Identity(),
        conv_bn(expanded, c_out, 1),
    )


def fused_ib_branch(c_in, c_out, spec: BlockSpec, act):
    expanded = make_divisible(c_in * spec.expand, 8)
    return nn.Sequential(conv_bn(c_in, expanded, spec.kernel, spec.stride, act=act), conv_bn(expanded, c_out, 1))


class MobileMQA(nn.Module):
    """Mobile multi-query attention: h query heads share one key and one value head (optionally strided)."""

    def __init__(self, channels: int, heads: int, key_dim: int, kv_stride: int):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.norm = nn.BatchNorm2d(channels)
        self.query = nn.Conv2d(channels, heads * key_dim, 1, bias=False)
        self.key = self._kv_proj(channels, key_dim, kv_stride)
        self.value = self._kv_proj(channels, key_dim, kv_stride)
        self.out = nn.Conv2d(heads * key_dim, channels, 1, bias=False)

    @staticmethod
    def _kv_proj(channels, key_dim, kv_stride):
        down = conv_bn(channels, channels, 3, kv_stride, groups=channels) if kv_stride > 1 else nn.Identity()
        return nn.Sequential(down, nn.Conv2d(channels, key_dim, 1, bias=False))

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.norm(x)
        # One shared key/value head: fold the query heads into the sequence axis and run one attention.
        q = self.query(x).reshape(b, self.heads, self.key_dim, h * w)        # [B, heads, d, HW]
        q = q.transpose(2, 3).reshape(b, 1, self.heads * h * w, self.key_dim)  # [B, 1, heads*HW, d]
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)               # [B, 1, HW_kv, d]
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)             # [B, 1, HW_kv, d]
        o = F.scaled_dot_product_attention(q, k, v)                           # [B, 1, heads*HW, d]
        o = o.reshape(b, self.heads, h * w, self.key_dim).transpose(2, 3)     # [B, heads, d, HW]
        return self.out(o.reshape(b, self.heads * self.key_dim, h, w))       # [B, C, H, W]


def build_block(c_in, spec: BlockSpec, width_mult, act, se, layer_scale, drop_path):
    """Decode one table row into a module. Returns (module, output channels)."""
    c_out = make_divisible(spec.out * width_mult, 8)
    if spec.kind == "conv":
        return conv_bn(c_in, c_out, spec.kernel, spec.stride, act=act), c_out
    if spec.kind == "fused_ib":
        return fused_ib_branch(c_in, c_out, spec, act), c_out
    residual = spec.stride == 1 and c_in == c_out
    if spec.kind == "uib":
        branch = uib_branch(c_in, c_out, spec, act, se)
    elif spec.kind == "mqa":
        c_out = c_in  # attention keeps the width; the table's `out` documents it
        branch = MobileMQA(c_in, spec.heads, spec.key_dim, spec.kv_stride)
    else:
        raise ValueError(f"unknown block kind {spec.kind!r}")
    return Residual(branch, residual, c_out, layer_scale, drop_path), c_out


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
    return stem_stride, [[BlockSpec(**{**spec.__dict__, "stride": 1}) if (i, j) in unstrided else spec
                          for j, spec in enumerate(stage)] for i, stage in enumerate(stages)]


class MobileNetV4(nn.Module):
    """The network a block table describes: stem, stages of table rows, pool, optional 1x1 head conv, classifier."""

    def __init__(self, variant="conv_small", num_classes=10, *, width_mult=1.0, output_stride=8, act="relu",
                 se=False, drop_path_rate=0.0, head="linear", dropout=0.2):
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
                block, c = build_block(c, block_spec, width_mult, act_layer, se, spec["layer_scale"],
                                       drop_path_rate * index / n_blocks)
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
        self.config = dict(variant=variant, num_classes=num_classes, width_mult=width_mult,
                           output_stride=output_stride, act=act, se=se, drop_path_rate=drop_path_rate, head=head,
                           dropout=dropout)
        self.apply(init_weights)

    def forward_features(self, x):
        return self.stages(self.stem(x))   # [B, 3, H, W] -> [B, C, H / output_stride, W / output_stride]

    def forward(self, x):
        return self.head(self.forward_features(x))  # [B, classes]


def classifier(head, width, num_classes, dropout, act_layer):
    if head == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
    if head == "mlp":  # the enhanced head: `dropout` before the hidden layer, half of it after (0.3 / 0.15)
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, 512), act_layer(), nn.Dropout(dropout / 2),
                             nn.Linear(512, num_classes))
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


def mobilenetv4(variant="conv_small", num_classes=10, *, width_mult=1.0, output_stride=8, act="relu", se=False,
                drop_path_rate=0.0, head="linear", dropout=0.2) -> MobileNetV4:
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
    return MobileNetV4(variant, num_classes, width_mult=width_mult, output_stride=output_stride, act=act, se=se,
                       drop_path_rate=drop_path_rate, head=head, dropout=dropout)


def model_from_args(args) -> MobileNetV4:
    """The model the command-line flags describe (10 classes)."""
    return mobilenetv4(args.variant, 10, width_mult=args.width_mult, output_stride=args.output_stride, act=args.act,
                       se=args.se, drop_path_rate=args.drop_path, head=args.head, dropout=args.dropout)


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
    return {"params": count_params(model), "macs": count_macs(model, (1, 3, image_size, image_size)),
            "feature_maps": shapes}


def format_summary(summary: dict) -> str:
    maps = ", ".join(f"{k} {c}x{h}x{w}" for k, (c, h, w) in summary["feature_maps"].items())
    return f"params {summary['params']:,} | MACs {summary['macs'] / 1e6:.2f} M/image | maps: {maps}"


# =====================================================================================================
# 2. Data
# =====================================================================================================

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, ...): reported as one line, exit code 2."""


@dataclass
class Cifar10:
    """CIFAR-10 as uint8 tensors: images [N, 3, 32, 32], labels [N] (int64)."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple = CIFAR10_CLASSES

    def to(self, device):
        return Cifar10(*(t.to(device) for t in (self.train_images, self.train_labels, self.test_images,
                                                 self.test_labels)), self.classes)

    def subset(self, max_train=None, max_test=None):
        """The first N samples of each split: deterministic, and near class-balanced (the files are shuffled)."""
        return Cifar10(self.train_images[:max_train], self.train_labels[:max_train],
                       self.test_images[:max_test], self.test_labels[:max_test], self.classes)


def _cifar_release():
    """Official file names, md5 sums and URL, taken from torchvision rather than copied here."""
    from torchvision.datasets import CIFAR10
    return CIFAR10


def load_cifar10(data_dir, download=True) -> Cifar10:
    """Read `data_dir/cifar-10-batches-py` (downloading the official archive if allowed and missing)."""
    release = _cifar_release()
    root = Path(data_dir).expanduser()
    folder = root / release.base_folder
    if not folder.is_dir():
        _fetch_cifar10(root, release, download)
    files = release.train_list + release.test_list
    mismatched = [name for name, md5 in files if (folder / name).is_file() and not _md5_ok(folder / name, md5)]
    if mismatched:
        warnings.warn(f"CIFAR-10 files in {folder} differ from the official release (md5 mismatch: "
                      f"{', '.join(mismatched)}); continuing, but accuracies are not comparable with "
                      "published numbers", stacklevel=2)
    train = [_read_batch(folder / name) for name, _ in release.train_list]
    test_images, test_labels = _read_batch(folder / release.test_list[0][0])
    return Cifar10(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_images, test_labels)


def _md5_ok(path, md5):
    from torchvision.datasets.utils import check_md5
    return check_md5(str(path), md5)


def _fetch_cifar10(root: Path, release, download: bool):
    archive = root / release.filename
    where = (f"put {release.filename} (from {release.url}) or its extracted {release.base_folder}/ folder "
             f"in {root}")
    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist: create it, or point --data-dir at the folder "
                        f"holding {release.base_folder}/")
    from torchvision.datasets.utils import download_url, extract_archive
    if not archive.is_file():
        if not download:
            raise UserError(f"CIFAR-10 not found in {root}: {where}")
        if not os.access(root, os.W_OK):
            raise UserError(f"data directory {root} is not writable, so CIFAR-10 cannot be downloaded there: "
                            f"{where}, or choose a writable --data-dir")
        try:
            download_url(release.url, str(root), release.filename, release.tgz_md5)
        except Exception as exc:  # network errors come in many types (URLError, HTTPError, OSError, ...)
            raise UserError(f"could not download CIFAR-10 ({type(exc).__name__}: {exc}); offline? {where}") from None
    if not _md5_ok(archive, release.tgz_md5):
        warnings.warn(f"{archive} differs from the official archive (md5 mismatch); extracting anyway", stacklevel=3)
    try:
        extract_archive(str(archive), str(root))
    except Exception as exc:
        raise UserError(f"could not extract {archive} ({type(exc).__name__}: {exc}): delete it and "
                        f"{where}") from None
    if not (root / release.base_folder).is_dir():
        raise UserError(f"{archive} did not contain {release.base_folder}/: delete it and {where}")


def _read_batch(path: Path):
    """One CIFAR-10 pickle -> (uint8 [N, 3, 32, 32], int64 [N]), refusing anything that is not one."""
    fix = "re-download CIFAR-10 or regenerate it (see README, 'Data')"
    if not path.is_file():
        raise UserError(f"CIFAR-10 file missing: {path}; {fix}")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:  # truncated or foreign files raise anything from EOFError to UnpicklingError
        raise UserError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}); {fix}") from None
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get("labels") if isinstance(entry, dict) else None
    if (getattr(data, "dtype", None) != "uint8" or getattr(data, "ndim", 0) != 2 or data.shape[1] != 3072
            or labels is None or len(labels) != data.shape[0]):
        raise UserError(f"{path} is not a CIFAR-10 batch (expected 'data' uint8 N x 3072 and N 'labels'); {fix}")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise UserError(f"{path} has labels outside 0..9; {fix}")
    return torch.from_numpy(data).reshape(-1, 3, 32, 32), labels


def batch_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """A distinct RNG seed per (run seed, epoch, step, rank): batches can be replayed exactly after a resume."""
    key = f"{seed}/{epoch}/{step}/{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def epoch_order(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(batch_seed(seed, epoch, -1))
    return torch.randperm(n, generator=gen).to(device)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalised float32, on the images' device."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    if images.dtype == torch.uint8:
        return images.float().mul_(1 / 255).sub_(mean).div_(std)
    return (images - mean) / std


# ---- Batched augmentation on the device ----------------------------------------------------------
# Written by hand because torchvision.transforms.v2 draws one set of random parameters per call, i.e. per
# batch, while the enhanced recipe needs per-sample parameters (as the per-image PIL pipeline gives). Running
# the per-sample torchvision transforms in a Python loop would be the slow pipeline we are replacing.

@dataclass(frozen=True)
class AugmentConfig:
    """The enhanced recipe's torchvision list: RandomCrop(32, 4), RandomHorizontalFlip, RandomRotation(15),
    ColorJitter(0.2, 0.2, 0.2, 0.1), RandomAffine(0, translate=(0.1, 0.1)); fills are black (zero)."""
    crop_padding: int = 4
    flip_prob: float = 0.5
    rotation: float = 15.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1
    translate: float = 0.1
    cutout: int = 0          # side of a square filled with the mean after everything else (0: off)


def sample_augment_params(n: int, size: int, cfg: AugmentConfig, gen: torch.Generator, device) -> dict:
    """Per-sample parameters, drawn as torchvision draws them for one image."""
    def uniform(lo, hi):
        return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo

    max_shift = cfg.translate * size  # RandomAffine: round(U(-0.1 W, 0.1 W)) pixels
    return {
        "crop": torch.randint(0, 2 * cfg.crop_padding + 1, (n, 2), generator=gen, device=device) - cfg.crop_padding,
        "flip": torch.rand(n, generator=gen, device=device) < cfg.flip_prob,
        "angle": uniform(-cfg.rotation, cfg.rotation),
        "jitter": torch.stack([uniform(1 - cfg.brightness, 1 + cfg.brightness),
                               uniform(1 - cfg.contrast, 1 + cfg.contrast),
                               uniform(1 - cfg.saturation, 1 + cfg.saturation),
                               uniform(-cfg.hue, cfg.hue)], 1),                 # [n, 4]
        "jitter_order": torch.rand(n, 4, generator=gen, device=device).argsort(1),  # ColorJitter's random order
        "shift": torch.stack([uniform(-max_shift, max_shift), uniform(-max_shift, max_shift)], 1).round(),
    }


def geometric_transform(images: torch.Tensor, params: dict):
    """Crop-with-padding, flip, rotation and translation as ONE gather per image.

    Every step maps integer pixels to integer pixels (nearest interpolation, as torchvision's defaults), so we
    follow each output pixel back through translate -> rotate -> flip -> crop and read the source pixel once.
    A pixel that leaves the frame at any intermediate step is fill (black), exactly as in the sequential
    pipeline. Returns the transformed images and a mask of pixels inside the translated view.
    """
    b, c, h, w = images.shape
    dev = images.device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    x = xs.expand(b, h, w) - params["shift"][:, 0, None, None]   # [B, H, W] undo the translation
    y = ys.expand(b, h, w) - params["shift"][:, 1, None, None]
    translated_in = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    theta = torch.deg2rad(params["angle"])[:, None, None]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    cos, sin = torch.cos(theta), torch.sin(theta)
    x, y = (cos * (x - cx) - sin * (y - cy) + cx).round(), (sin * (x - cx) + cos * (y - cy) + cy).round()
    in_view = translated_in & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)  # rotation's source in the crop
    x = torch.where(params["flip"][:, None, None], w - 1 - x, x)
    x = x + params["crop"][:, 1, None, None]                      # crop offsets in [-pad, pad]
    y = y + params["crop"][:, 0, None, None]
    valid = in_view & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    index = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).long().view(b, 1, h * w).expand(b, c, h * w)
    out = images.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)  # [B, C, H, W]
    return out * valid.unsqueeze(1), translated_in.unsqueeze(1)


def _grayscale(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # [B, 1, H, W]


def _adjust_hue(x, shift):
    """Rotate hue in HSV space by `shift` (fraction of a turn, per sample), as torchvision does.

    Written without the S and V planes: V = max and S * V = max - min, so HSV -> RGB is
    max - (max - min) * clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)                                     # [B, H, W]
    delta = maxc - minc
    # Hue in sixths of a turn, up to a multiple of 6 (the mod below absorbs it); 0 for grey pixels (num = 0).
    num = torch.where(r == maxc, g - b, torch.where(g == maxc, b - r + 2 * delta, r - g + 4 * delta))
    hue6 = num / delta.clamp_min(1e-12) + (6 * shift).view(-1, 1, 1)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue6.unsqueeze(1), 6)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's op indices


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, hue: bool = True) -> torch.Tensor:
    """Brightness, contrast, saturation and hue on [0, 1] images, in a per-sample random order.

    Brightness, contrast and saturation are all blends x' = m + f (x - m) with m = 0, the image's mean grey
    or the pixel's grey, so one fused lerp per position serves every sample (f = 1 leaves a sample alone).
    Hue is computed for every sample and kept where it is the sample's turn: indexing the chosen samples would
    need their count on the host, a wait for the GPU at every position. `hue=False` skips it (a zero hue range).
    """
    for position in range(4):
        op = order[:, position]
        f = torch.where(op == HUE, 1.0, factors.gather(1, op.view(-1, 1)).squeeze(1)).view(-1, 1, 1, 1)
        grey = _grayscale(x)                                              # [B, 1, H, W]
        is_contrast = (op == CONTRAST).view(-1, 1, 1, 1)
        is_saturation = (op == SATURATION).view(-1, 1, 1, 1)
        target = grey * is_saturation + grey.mean((2, 3), keepdim=True) * is_contrast  # 0 for brightness
        x = torch.lerp(target, x, f).clamp_(0, 1)
        if hue:
            x = torch.where((op == HUE).view(-1, 1, 1, 1), _adjust_hue(x, factors[:, HUE]).clamp_(0, 1), x)
    return x


def augment(images: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> augmented float [B, 3, H, W] in [0, 1], per-sample random parameters.

    Colour jitter runs after all geometry; in torchvision it runs before the translation. So the translated-in
    border is re-blackened after jitter (as torchvision leaves it), and contrast's mean grey is taken over the
    translated frame, border included, rather than the frame before translation: a difference of at most about
    0.02 on the [0, 1] scale, on translated samples only.
    """
    params = sample_augment_params(images.shape[0], images.shape[-1], cfg, gen, images.device)
    x, in_view = geometric_transform(images.float().mul_(1 / 255), params)
    if any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):  # with all four at 0 it is the identity
        x = color_jitter(x, params["jitter"], params["jitter_order"], hue=cfg.hue > 0) * in_view
    return cutout(x, cfg.cutout, gen) if cfg.cutout else x


def cutout(x: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017): per image a side x side square, centre uniform over the image and clipped
    at the border, set to the dataset mean (zero after normalisation, as the paper's normalised-input version).
    Written here because torchvision's RandomErasing draws one box per call, i.e. per batch, on a tensor."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1, 1), generator=gen, device=x.device)
    cx = torch.randint(0, w, (b, 1, 1), generator=gen, device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    low, high = side // 2, side - side // 2                                   # [c - low, c + high)
    inside = (ys >= cy - low) & (ys < cy + high) & (xs >= cx - low) & (xs < cx + high)   # [B, H, W]
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
    return torch.where(inside.unsqueeze(1), mean, x)


AUGMENT_OPS = ("crop_padding", "hflip", "rotation", "color_jitter", "translate", "cutout")  # their flags


def augment_config(args) -> AugmentConfig:
    """The augmentation the command-line flags describe (used when --augment is on)."""
    brightness, contrast, saturation, hue = args.color_jitter
    return AugmentConfig(crop_padding=args.crop_padding, flip_prob=args.hflip, rotation=args.rotation,
                         brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                         translate=args.translate, cutout=args.cutout)


# ---- Test-time augmentation views ------------------------------------------------------------------
# Each view maps uint8 [B, 3, H, W] -> [B, 3, H, W]. Modes share view objects, so a TTA table computes each
# distinct view once (12 forward passes for the 17 views of the four modes).

def _identity(x):
    return x


def _hflip(x):
    return x.flip(3)


def _rotate(x, quarter_turns):
    return x.rot90(quarter_turns, (2, 3))


def _shift(x, dx, dy, flip=False):
    """Translate by whole pixels with black (zero) fill, optionally after a horizontal flip."""
    x = x.flip(3) if flip else x
    h, w = x.shape[-2:]
    mask = torch.zeros(1, 1, h, w, device=x.device, dtype=x.dtype)
    mask[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = 1
    return torch.roll(x, (dy, dx), (2, 3)) * mask


_SHIFTS = tuple(partial(_shift, dx=dx, dy=dy, flip=f) for f in (False, True)
                for dx, dy in ((2, 0), (-2, 0), (0, 2), (0, -2)))
TTA_VIEWS = {
    "none": (_identity,),
    "flip": (_identity, _hflip),
    "flip_rot90": (_identity, _hflip, partial(_rotate, quarter_turns=1), partial(_rotate, quarter_turns=-1)),
    "flip_shift": (_identity, _hflip, *_SHIFTS),
}


def train_batches_for_epoch(data: Cifar10, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                            augment_cfg: AugmentConfig | None = None, chunk_images: int = 1024,
                            rank: int = 0, world_size: int = 1):
    """Yield (normalised images, labels) for one epoch, on the data's device, from `start_step` on.

    The order and every augmentation draw depend only on (seed, epoch, chunk, rank), so a resumed epoch replays
    the exact batches it would have seen. With several processes all ranks draw the same permutation; global
    step s covers images [s*B*W, (s+1)*B*W) of it and rank r takes the r-th B of those (disjoint shards).
    Augmentation runs on chunks of several batches: per-op overhead dominates small batches on CPU. The last
    partial global batch is dropped (BatchNorm on the 1x1 head needs > 1 sample).
    """
    global_batch = batch_size * world_size
    steps = data.train_images.shape[0] // global_batch
    device = data.train_images.device
    order = epoch_order(data.train_images.shape[0], seed, epoch, device)[:steps * global_batch]
    order = order.view(steps, world_size, batch_size)[:, rank]                 # [steps, B]: this rank's shard
    per_chunk = max(1, chunk_images // batch_size)
    gen = torch.Generator(device=device)
    for chunk_start in range(start_step - start_step % per_chunk, steps, per_chunk):
        idx = order[chunk_start:chunk_start + per_chunk].reshape(-1)
        images = data.train_images[idx]
        if augment_cfg is not None:
            gen.manual_seed(batch_seed(seed, epoch, chunk_start, rank))
            images = augment(images, gen, augment_cfg)
        images, labels = normalize(images), data.train_labels[idx]
        for step in range(max(chunk_start, start_step), min(chunk_start + per_chunk, steps)):
            rows = slice((step - chunk_start) * batch_size, (step - chunk_start + 1) * batch_size)
            yield images[rows], labels[rows]


# =====================================================================================================
# 3. Device and precision (chosen here and nowhere else)
# =====================================================================================================

DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "bf16", "fp16", "off")


def select_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """auto: MPS, then CUDA, then CPU (CUDA, then CPU under torchrun: MPS has no distributed backend).
    An explicit device that is not available is a user error. Under torchrun each process takes cuda:LOCAL_RANK."""
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if local_rank is not None and name == "mps":
        raise UserError("--device mps cannot run under torchrun: PyTorch's distributed backends (gloo, nccl) do not "
                        "take MPS tensors; run the script without torchrun")
    if local_rank is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise UserError(f"torchrun started a process of local rank {local_rank} but this node has {gpus} GPU(s): "
                            f"use --nproc-per-node {gpus} or fewer (one process per GPU)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "auto":
        return torch.device("mps" if mps_ok and local_rank is None else "cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to PyTorch; use --device cpu (or auto)")
    if name == "mps" and not mps_ok:
        raise UserError("--device mps: the Apple MPS backend is not available here; use --device cpu (or auto)")
    if name not in DEVICES:
        raise UserError(f"unknown --device {name!r}; choose from {', '.join(DEVICES)}")
    return torch.device(name)


class Distributed:
    """What torchrun tells a process (RANK, WORLD_SIZE, LOCAL_RANK) and the few collectives a run needs.
    With no torchrun launch it is a world of one and every method is a no-op."""

    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        self.world_size = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0

    def __bool__(self):
        return self.world_size > 1

    def init(self, device: torch.device):
        """nccl on CUDA, told its device up front (it then binds the communicator to it at once rather than
        guessing at the first collective); gloo on CPU. Rendezvous from torchrun's MASTER_ADDR / MASTER_PORT."""
        if self and not torch.distributed.is_initialized():
            if device.type == "cuda":
                torch.distributed.init_process_group("nccl", device_id=device)
            else:
                torch.distributed.init_process_group("gloo")

    def close(self):
        if self and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n items; the last shards may be shorter (no item twice)."""
        per = -(-n // self.world_size)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
        return tensor

    def all_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def gather_shards(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every rank's shard (see `shard`) back into the n items, in order."""
        if not self:
            return local
        per = -(-n // self.world_size)
        padded = local.new_zeros(per)
        padded[:local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat(parts)[:n]

    def average_buffers(self, *modules):
        """Average BatchNorm running statistics over ranks. DDP keeps parameters identical but each rank's
        running stats follow its own batches; averaging makes evaluation and checkpoints agree on every rank."""
        for module in modules:
            if self and module is not None:
                for buffer in module.buffers():
                    if buffer.is_floating_point():
                        torch.distributed.all_reduce(buffer)
                        buffer.div_(self.world_size)

    def barrier(self):
        if self:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """Every rank's value of a picklable object, in rank order, on every rank."""
        if not self:
            return [obj]
        box = [None] * self.world_size
        torch.distributed.all_gather_object(box, obj)
        return box

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def autocast_dtype(device: torch.device, amp: str):
    """Mixed-precision dtype for autocast, or None for fp32. auto: bf16 on GPUs that have it natively (compute
    capability 8.0 and up), fp16 on older ones, fp32 off CUDA: on the CPU autocast measured slower than fp32
    (docs/PERFORMANCE.md), and MPS autocast is unmeasured here. torch.cuda.is_bf16_supported() alone counts
    emulation, which a T4 or V100 offers but runs far slower than fp16 (cuDNN has no bf16 convolutions there)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        if amp == "bf16":
            raise UserError("--amp bf16: this GPU has no native bfloat16 (compute capability below 8.0); use "
                            "--amp fp16 or --amp auto")
        return torch.float16
    return torch.bfloat16


def device_warnings(device: torch.device, args) -> list[str]:
    """One line for each option the user forced that PyTorch documents as risky on this device."""
    warnings_ = []
    if device.type == "mps" and args.compile:
        warnings_.append("--compile on MPS is a prototype in PyTorch, with known failures in backward: drop "
                         "--compile if training fails or its losses look wrong")
    if device.type == "mps" and args.channels_last:
        warnings_.append("--channels-last on MPS makes convolution backward much slower in PyTorch's MPS backend "
                         "(hence off by default there): drop it unless you measured otherwise")
    return warnings_


def default_channels_last(device: torch.device) -> bool:
    """channels_last: measured 1.38x faster for a Conv-S training step on a 2-core CPU (oneDNN), and the layout
    cuDNN prefers for depthwise and 1x1 convs; off on MPS, where PyTorch's convolution backward is much slower with
    it (docs/PERFORMANCE.md)."""
    return device.type in ("cuda", "cpu")


def synchronize(device: torch.device):
    """Wait for queued kernels, so wall-clock timings measure work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device):
    """Start a run's peak from here: ablation.py trains many runs in one process, each reports its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        try:  # Linux: writing 5 resets the process's peak resident set (VmHWM in /proc/self/status)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # elsewhere the CPU figure stays the process's lifetime peak


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory of the run in MiB: CUDA's allocator peak, the CPU process's peak resident set; None on MPS,
    where PyTorch keeps no peak (its current allocation would understate it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return None
    try:  # CPU: the peak resident set since reset_peak_memory (Linux)
        status = Path("/proc/self/status").read_text()
        return next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        import resource  # the process's lifetime peak: KiB on Linux, bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


# =====================================================================================================
# 4. Training plumbing: command line, checkpoints, signals, the run around each script's loop
# =====================================================================================================

CHECKPOINT_VERSION = 2  # 2: SE on every UIB's expanded channels (new module layout), per-rank RNG states
MODEL_KEYS = ("variant", "width_mult", "act", "se", "head", "output_stride", "num_classes")


def saved_model_config(state: dict) -> dict:
    """A checkpoint's model configuration in today's terms: checkpoints that predate `output_stride` recorded
    `cifar_stem` (True: the CIFAR port, output stride 8; False: the ImageNet strides, 32)."""
    cfg = dict(state.get("model_config") or {})
    if "output_stride" not in cfg and "cifar_stem" in cfg:
        cfg["output_stride"] = 8 if cfg.pop("cifar_stem") else 32
    return cfg


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived: the run saved last.pt and stops."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the usage block: the message already names the flag
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag shows its default once: argparse appends '(default: X)' unless the help text already says
    what the default is (flags whose default None means something: all images, ./data, ...), the flag is
    required, or it has no default at all (None, and its help says nothing of one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default is None:
            return text
        return super()._get_help_string(action)


def chosen_recipe(recipes: dict, argv) -> str:
    """The recipe --recipe names in argv, else the one a --config file recorded, else the first of `recipes`. Read
    before the parser is built, because the recipe supplies every other flag's default: a flag given beside it
    still wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recorded = replayed_flags(argv).get("recipe")
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=tuple(recipes),
                     default=recorded if recorded in recipes else next(iter(recipes)))
    return pre.parse_known_args(argv)[0].recipe


# What --config does not replay: where the run's files went and how it was started, not what it trained.
NOT_REPLAYED = ("argv", "config", "output_dir", "resume", "overwrite", "test_only")


def replayed_flags(argv) -> dict:
    """The flags of the run whose config.json `--config PATH` names (timm's -c/--config, for a run's own record),
    as flag defaults; {} without --config. Only what decides the training: output, resume and the command line
    itself are the new run's."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(list(argv))[0].config
    if path is None:
        return {}
    try:
        recorded = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as exc:
        pre.error(f"--config {path}: cannot read it as a run's config.json ({getattr(exc, 'strerror', None) or exc})")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("args"), dict):
        pre.error(f"--config {path} is not a config.json written by these scripts (no 'args'); pass a run's "
                  "config.json")
    return {k: v for k, v in recorded["args"].items() if k not in NOT_REPLAYED}


def build_parser(recipes: dict, name: str, description: str) -> argparse.ArgumentParser:
    """The flags both scripts share, with recipe `name` of the script's `recipes` as defaults (names follow
    torchvision / timm)."""
    recipe = recipes[name]
    p = ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--recipe", choices=tuple(recipes), default=name,
                   help="named settings for every flag below (flags given beside it win): project is this "
                        "project's recipe, project-v1 and project-v2 its earlier ones (where the script has them, "
                        "docs/RESULTS.md), notebook the public notebook's exact recipe")
    bool_flag = argparse.BooleanOptionalAction
    m = p.add_argument_group("model")
    m.add_argument("--variant", default=recipe["variant"], choices=VARIANTS,
                   help="block table: a MobileNetV4, or mobilenetv2 (the peer, for comparison)")
    m.add_argument("--width-mult", type=float, default=recipe["width_mult"], help="channel width multiplier")
    m.add_argument("--output-stride", type=int, default=recipe.get("output_stride", 8), choices=OUTPUT_STRIDES,
                   help="total down-sampling: 8 gives a 4x4 final map at 32x32 (stem and first strided stage at "
                        "stride 1), 4 an 8x8 map (the next stage too, about 2.6x the MACs), 32 the ImageNet strides")
    m.add_argument("--act", default=recipe["act"], choices=tuple(ACTIVATIONS), help="activation function")
    m.add_argument("--se", action=bool_flag, default=recipe["se"], help="squeeze-and-excitation in every UIB")
    m.add_argument("--drop-path", type=float, default=recipe["drop_path"], help="stochastic depth rate (max)")
    m.add_argument("--head", default=recipe["head"], choices=HEADS, help="classifier after the 1280-wide 1x1 conv")
    m.add_argument("--dropout", type=float, default=recipe["dropout"],
                   help="dropout before the classifier (mlp head: before its hidden layer, half of it after)")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default=None,
                   help="folder holding (or receiving) cifar-10-batches-py/ (default: ./data, created if missing)")
    d.add_argument("--download", action=bool_flag, default=True, help="download CIFAR-10 if missing")
    d.add_argument("--max-train-samples", type=int, default=None,
                   help="train on the first N images (default: all 50,000)")
    d.add_argument("--max-test-samples", type=int, default=None,
                   help="evaluate on the first N images (default: all 10,000)")
    d.add_argument("--augment", action=bool_flag, default=recipe["augment"],
                   help="crop, flip, rotation, colour jitter, translation (batched on the device)")
    a = p.add_argument_group("augmentation (with --augment; defaults: the recipe's ops, else the notebook's "
                             "enhanced list)")
    aug = AugmentConfig()
    a.add_argument("--crop-padding", type=int, default=aug.crop_padding, help="RandomCrop(32, padding)")
    a.add_argument("--hflip", type=float, default=aug.flip_prob, help="horizontal flip probability")
    a.add_argument("--rotation", type=float, default=aug.rotation, help="RandomRotation degrees (0: off)")
    a.add_argument("--color-jitter", type=float, nargs=4, metavar=("B", "C", "S", "H"),
                   default=(aug.brightness, aug.contrast, aug.saturation, aug.hue),
                   help="ColorJitter brightness contrast saturation hue, each in [0, 0.5] (0 0 0 0: off)")
    a.add_argument("--translate", type=float, default=aug.translate, help="RandomAffine translate fraction")
    a.add_argument("--cutout", type=int, default=aug.cutout, help="cutout square side in pixels (0: off)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=recipe["epochs"], help="training epochs")
    t.add_argument("-b", "--batch-size", type=int, default=recipe["batch_size"],
                   help="images per step per process (under torchrun the global batch is this x WORLD_SIZE; "
                        "--lr is not rescaled)")
    t.add_argument("--lr", type=float, default=recipe["lr"], help="peak learning rate")
    t.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=recipe["wd"],
                   help="weight decay of conv and linear weights")
    t.add_argument("--norm-weight-decay", type=float, default=recipe["norm_weight_decay"],
                   help="weight decay of norm weights/biases, all biases and layer-scale gammas (set it equal "
                        "to --wd to decay everything, as the notebook did)")
    t.add_argument("--label-smoothing", type=float, default=recipe["label_smoothing"],
                   help="cross-entropy label smoothing")
    t.add_argument("--clip-grad-norm", type=float, default=recipe["clip_grad_norm"],
                   help="clip the gradient's global L2 norm to this (0 disables)")
    t.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order, augmentation, dropout")
    t.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    t.add_argument("--skip-nonfinite", action="store_true",
                   help="skip steps whose loss is NaN/inf instead of stopping (checks every step: a sync)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", choices=DEVICES, help="auto: mps, then cuda, then cpu")
    r.add_argument("--amp", default="auto", choices=AMP_MODES, help="auto: bf16 on CUDA, fp32 elsewhere")
    r.add_argument("--channels-last", action=bool_flag, default=None,
                   help="channels_last memory layout (default: on for CUDA and CPU, off for MPS)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--sync-bn", action="store_true", help="under torchrun: SyncBatchNorm across processes")
    r.add_argument("--eval-batch-size", type=int, default=500, help="images per evaluation batch")
    r.add_argument("--eval-every", type=int, default=1,
                   help="evaluate on the test set every N epochs and after the last one (best.pt: the best "
                        "evaluated epoch); the others log no test figures")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default=None,
                   help="where files go (default: runs/<script>-<timestamp>; with --resume, the checkpoint's "
                        "folder)")
    o.add_argument("--overwrite", action="store_true", help="allow an output dir that holds another run")
    o.add_argument("--config", default=None, metavar="CONFIG.json",
                   help="replay a run: the flags its config.json recorded are used unless given here; where "
                        "files go and --resume stay this command's (default: none)")
    o.add_argument("--resume", default=None, metavar="PATH",
                   help="continue (or --test-only) from a checkpoint (default: none, start from scratch)")
    o.add_argument("--test-only", action="store_true", help="evaluate --resume PATH (with TTA), no training")
    o.add_argument("--tta", default=recipe["tta"], choices=tuple(TTA_VIEWS), help="headline TTA")
    o.add_argument("--tta-table", action=bool_flag, default=True,
                   help="evaluate every TTA mode at the end (off: only none and --tta)")
    p.set_defaults(**{k: v for k, v in recipe.items() if k in AUGMENT_OPS})  # a recipe may choose its ops
    return p


# (flag, lowest allowed, highest allowed, inclusive low?) for the numeric flags.
NUMERIC_LIMITS = [("epochs", 1, 100_000, True), ("batch_size", 2, 65_536, True), ("lr", 0, 10, False),
                  ("wd", 0, 10, True), ("norm_weight_decay", 0, 10, True), ("label_smoothing", 0, 0.99, True),
                  ("clip_grad_norm", 0, 1e6, True),
                  ("drop_path", 0, 0.99, True), ("dropout", 0, 0.99, True), ("width_mult", 0, 8, False),
                  ("max_train_samples", 1, 10**9, True), ("max_test_samples", 1, 10**9, True),
                  ("eval_batch_size", 1, 65_536, True), ("eval_every", 1, 100_000, True),
                  ("seed", 0, 2**63 - 1, True),
                  ("crop_padding", 0, 16, True), ("hflip", 0, 1, True), ("rotation", 0, 180, True),
                  ("translate", 0, 0.5, True), ("cutout", 0, 32, True), ("color_jitter", 0, 0.5, True)]


def parse_args(parser: argparse.ArgumentParser, argv=None, limits=()) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    replayed = replayed_flags(argv)
    known = vars(parser.parse_known_args([])[0])
    unknown = sorted(k for k in replayed if k not in known)
    if unknown:
        parser.error(f"--config: the run it records has flags this script lacks ({', '.join(unknown)}): replay it "
                     f"with the script that wrote it (config.json's 'script')")
    parser.set_defaults(**replayed)
    args = parser.parse_args(argv)
    for name, low, high, low_ok in [*NUMERIC_LIMITS, *limits]:
        values = getattr(args, name, None)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None and (not math.isfinite(value) or value > high or value < low
                                      or (value == low and not low_ok)):
                bound = f"{'>=' if low_ok else '>'} {low} and <= {high}"
                parser.error(f"--{name.replace('_', '-')} {value} is out of range: use values {bound}")
    defaults = argparse.Namespace(**{k: parser.get_default(k) for k in AUGMENT_OPS})
    if not args.augment and augment_config(args) != augment_config(defaults):
        parser.error("augmentation flags (--crop-padding, --hflip, --rotation, --color-jitter, --translate, "
                     "--cutout) only act with --augment: add --augment")
    args.argv = argv  # the command line as given: saved in config.json, repeated in the resume hint
    if args.test_only and not args.resume:
        parser.error("--test-only needs a checkpoint: add --resume PATH")
    return args


def command_line(main):
    """Run a script's main(): user mistakes end as one line on stderr and exit 2, never a traceback."""
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except NonFiniteLoss as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(3) from None
        except Interrupted as exc:
            raise SystemExit(128 + exc.signum) from None
    wrapper.__doc__, wrapper.__name__ = main.__doc__, main.__name__
    return wrapper


def atomic_write(path: Path, write):
    """Write via a temporary file in the same folder, then rename: readers see the old or the new file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({exc.strerror or exc}): free space or choose a writable "
                        f"--output-dir; files already there are intact") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def save_checkpoint(path: Path, state: dict):
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path) -> dict:
    """Load with weights_only=True (no arbitrary unpickling); anything else than our checkpoint is refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass the path of a last.pt or best.pt")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, unsafe object: all equally unusable
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}); use another last.pt "
                        f"or best.pt") from None
    if isinstance(state, dict) and state.get("version") == 1:
        raise UserError(f"{path} was written by an older version of these scripts (checkpoint format 1, before SE "
                        f"moved to every UIB's expanded channels): its weights do not fit this model; retrain")
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "model" not in state:
        raise UserError(f"{path} is not a checkpoint of these scripts (version {CHECKPOINT_VERSION})")
    return state


def evaluated_weights(state: dict) -> tuple[dict, str]:
    """The weights a checkpoint's run evaluated and reported, and which they are: the EMA when the run kept
    one (its ModelEma state, `module.` prefix and `n_averaged` stripped), else the raw model."""
    ema = state.get("ema")
    if ema is None:
        return state["model"], "model"
    prefix = "module."
    return {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)}, "ema"


def model_from_checkpoint(state: dict) -> tuple[MobileNetV4, str]:
    """Rebuild the model a checkpoint describes from its own saved configuration and load the evaluated weights
    (see `evaluated_weights`). Returns (model on CPU in eval mode, "ema" | "model")."""
    cfg = saved_model_config(state)
    try:
        model = mobilenetv4(cfg["variant"], cfg["num_classes"], width_mult=cfg["width_mult"],
                            output_stride=cfg["output_stride"], act=cfg["act"], se=cfg["se"],
                            drop_path_rate=cfg.get("drop_path_rate", 0.0), head=cfg["head"],
                            dropout=cfg.get("dropout", 0.2))
        weights, which = evaluated_weights(state)
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # missing keys, shape mismatch, bad config
        raise UserError(f"checkpoint does not describe a model these scripts build ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from None
    return model.eval(), which


# Parameters that timm's optimizer factory and torchvision's references leave out of weight decay, chosen by the
# owning module's kind and the parameter's name, not by ndim: a layer-scale gamma is (C, 1, 1). Written here
# because torchvision's helper (ops._utils.split_normalization_params) is private and ignores biases.
NO_DECAY_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, LayerScale2d)


def weight_decay_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: `weight_decay` for conv and linear weights, `norm_weight_decay` for norm
    weights and biases, every bias and layer-scale gammas (the notebook decayed everything alike)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            exempt = isinstance(module, NO_DECAY_MODULES) or name == "bias"
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": norm_weight_decay}]


def rng_state(device: torch.device) -> dict:
    """This process's random state: the CPU generator and the training device's own (dropout and drop-path masks
    are drawn there; not every visible GPU's, so a checkpoint resumes on a machine with fewer GPUs, or on another
    device type)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device):
    """Restore `rng_state`'s result; a device state from another device type is not applicable and is skipped."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


class ModelEma(nn.Module):
    """An exponential moving average of a model's weights and buffers (BatchNorm statistics too), with timm
    ModelEmaV3's warm-up: update t uses decay min(decay, (1 + t) / (10 + t)), so the average follows the
    fast-moving early weights instead of staying near the initial ones for ~1/(1 - decay) steps.

    It computes what torch.optim.swa_utils.AveragedModel does with that decay (a test holds the two equal) and
    keeps its state layout ('module.*', 'n_averaged'). Written here because AveragedModel tests and copies its
    update count, a tensor, at every update, which on a GPU makes the host wait each step; this one counts on
    the host."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))  # on the CPU, like AveragedModel's
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module):
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.updates == 0:
            for average, value in zip(averaged, current, strict=True):
                average.copy_(value)
        else:
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            floats = [(a, v) for a, v in zip(averaged, current, strict=True) if a.is_floating_point()]
            torch._foreach_lerp_([a for a, _ in floats], [v for _, v in floats], 1 - decay)
            for average, value in zip(averaged, current):
                if not average.is_floating_point():  # BatchNorm's batch counter, averaged as AveragedModel does
                    average.copy_(average * decay + value * (1 - decay))
        self.updates += 1
        self.n_averaged.fill_(self.updates)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.updates = int(self.n_averaged)
        return result


def seed_everything(seed: int, deterministic: bool):
    torch.manual_seed(seed)  # seeds CPU, CUDA and MPS generators (model init, dropout, stochastic depth)
    # cuDNN's autotuner picks the fastest convolution for each shape; CIFAR's shapes never change, so it pays for
    # its first-step search at once (torchvision's references do the same). It is not deterministic.
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS needs this for deterministic matmuls; the user's own setting wins.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def git_commit(repo: Path = Path(__file__).parent):
    """HEAD's hash, '<hash>-dirty' when tracked Python files differ from it (the code that ran is not that
    commit), or None outside a git checkout. Other files do not count, tracked or not: a study's log or a
    README edited while a run starts says nothing about the code."""
    def git(*argv):
        return subprocess.run(["git", *argv], cwd=repo, capture_output=True, text=True, timeout=5)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode or not head.stdout.strip():
            return None
        # ':/*.py': every .py file from the top of the work tree, whichever folder `repo` is ('*' spans '/')
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/*.py").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@cache
def code_commit() -> str | None:
    """git_commit() of this project as the process first asks, then the same answer for the process's life: the
    code it loaded does not change when HEAD does, and one process may train many runs for hours (ablation.py).
    Asked at the first run's start, not at import (importing stays free of side effects)."""
    return git_commit()


def versions() -> dict:
    import numpy
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "platform": platform.platform()}


@torch.no_grad()
def predict(model, images, view=_identity, *, batch_size=500, autocast=None, channels_last=False):
    """Softmax probabilities [N, classes] of `model` on view(images), batched on the images' device."""
    model.eval()
    probs = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(view(images[start:start + batch_size]))
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.autocast(images.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            probs.append(model(x).float().softmax(1))
    return torch.cat(probs) if probs else images.new_zeros(0, 10, dtype=torch.float32)


def score(probs, labels, dist: "Distributed | None" = None):
    """Loss, accuracy (%) and predictions of this rank's `probs` against all `labels` (see `evaluate`)."""
    n = labels.numel()
    local_labels = labels[dist.shard(n)] if dist else labels
    # float32: the reduction sums pairwise, good to about 1e-6 of the total, far below the four digits reported.
    loss_sum = F.nll_loss(probs.clamp_min(1e-12).log(), local_labels, reduction="sum")
    preds = probs.argmax(1)
    if dist:
        loss_sum, preds = dist.all_sum(loss_sum), dist.gather_shards(preds, n)
    return loss_sum.item() / max(1, n), (preds == labels).sum().item() * 100.0 / max(1, n), preds


def evaluate(model, images, labels, *, batch_size=500, views=TTA_VIEWS["none"], autocast=None,
             channels_last=False, dist: "Distributed | None" = None):
    """Loss, accuracy (%) and predictions over all `images`, averaging softmax over the TTA views.

    Under torchrun each rank evaluates one contiguous shard (uneven shards, no padding in the counts) and the
    sums are all-reduced, so every test image counts exactly once."""
    images = images[dist.shard(labels.numel())] if dist else images
    probs = sum(predict(model, images, view, batch_size=batch_size, autocast=autocast, channels_last=channels_last)
                for view in views) / len(views)                             # [N_local, classes]
    return score(probs, labels, dist)


def tta_table(model, images, labels, *, modes=TTA_VIEWS, known=None, dist=None, **predict_kwargs) -> dict:
    """{mode: (loss, accuracy, predictions)} for the given TTA modes, each distinct view evaluated once;
    `known` maps views to probabilities already computed for this model (this rank's shard)."""
    images = images[dist.shard(labels.numel())] if dist else images
    probs = dict(known or {})
    for view in {view for mode in modes.values() for view in mode} - probs.keys():
        probs[view] = predict(model, images, view, **predict_kwargs)
    return {name: score(sum(probs[v] for v in mode) / len(mode), labels, dist) for name, mode in modes.items()}


def changed_setting(keys, saved: dict, mine: dict):
    """The first of `keys` whose value differs between a checkpoint's config and this run's, or None. Keys that
    either side lacks (another script's flags, an older checkpoint) are skipped; lists and tuples compare alike
    (--betas parses to a list, a recipe's default is a tuple)."""
    def comparable(value):
        return list(value) if isinstance(value, (list, tuple)) else value
    return next((k for k in keys if k in saved and k in mine and comparable(saved[k]) != comparable(mine[k])), None)


class EpochMeter:
    """One epoch's training loss and accuracy, kept on the device and read only at the loop's refresh points (a
    read makes the host wait for a GPU), in dtypes every backend has (MPS has no float64): each step's mean loss
    in a float32 slot, correct predictions in an int64 count, samples counted on the host. Totals are summed on
    the host in double precision from the per-step values (math.fsum, exact for any grouping), so float32 costs
    nothing beyond each loss's own rounding, and an epoch resumed mid-way reports what an uninterrupted one does
    to the last bit. Also holds the epoch's first non-finite step, checked at the same points."""

    def __init__(self, steps: int, batch_size: int, device: torch.device, dist: Distributed, start: int = 0,
                 partial: dict | None = None):
        carried = partial or {}
        self.batch_size, self.dist, self.start = batch_size, dist, start
        self.step_losses = torch.zeros(steps, device=device)              # this process's mean loss per step
        self.correct = torch.zeros((), dtype=torch.int64, device=device)  # this process's, since `start`
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.recorded = 0                                                 # steps counted since `start`
        # Before `start` (a mid-epoch checkpoint): per-step losses summed over processes, or one loss sum in
        # checkpoints that predate per-step losses.
        self.carried_losses = [float(v) for v in carried.get("step_losses", ())]
        self.carried_loss_sum = float(carried.get("loss_sum", 0.0))
        self.carried_correct, self.carried_seen = int(carried.get("correct", 0)), int(carried.get("seen", 0))
        self.skipped = int(carried.get("skipped", 0))

    def update(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
        self.step_losses[step] = loss.detach()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.recorded += 1

    def note_if_bad(self, step: int, loss: torch.Tensor):
        """Remember the first step whose loss is NaN/inf, on the device (no read)."""
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)

    def first_bad(self) -> int:
        """The first non-finite step on any process, or -1 (a read: call at refresh points)."""
        return int(self.dist.all_max(self.first_bad_step).item())

    def totals(self, done: int) -> dict:
        """Over every process, steps [0, done): per-step losses, loss sum, correct predictions and samples."""
        step_losses = self.carried_losses + self.dist.all_sum(self.step_losses[self.start:done]).tolist()
        seen = self.carried_seen + self.recorded * self.batch_size * self.dist.world_size
        correct = self.carried_correct + int(self.dist.all_sum(self.correct).item())
        loss_sum = self.carried_loss_sum + math.fsum(v * self.batch_size for v in step_losses)
        return {"step_losses": step_losses, "loss_sum": loss_sum, "correct": correct, "seen": seen,
                "skipped": self.skipped}


class Run:
    """The plumbing around a script's own loop: setup and banner, batches, per-step bookkeeping, evaluation,
    checkpoints and signals, the final report. Use as a context manager:

        with Run(args, "enhanced") as run:
            model = run.prepare(mobilenetv4(...))          # device, layout, DDP, compile; prints the banner
            start_epoch = run.start(optimizer, scheduler)  # resumes from --resume if given
            for epoch in range(start_epoch, args.epochs):
                for images, labels in run.batches(epoch):  # augmented, normalised, on the device
                    ... forward, backward, step ...
                    run.step_done(loss, logits, labels)
                run.end_epoch(epoch)                       # evaluate, log, checkpoint
            return run.finish()                            # TTA table, summary, plots

    Under torchrun every rank runs this; only rank 0 prints and writes files.
    """
    REFRESH_EVERY = 25  # steps between progress-bar updates and NaN / stop checks (each is a device sync)

    def __init__(self, args, script: str):
        self.args, self.script = args, script
        self.augment_cfg = augment_config(args) if args.augment else None
        self.bar, self._old_handlers = None, {}
        self.dist = Distributed()
        seed_everything(args.seed, args.deterministic)
        self.device = select_device(args.device, self.dist.local_rank if self.dist else None)
        if args.sync_bn and self.device.type != "cuda":
            raise UserError(f"--sync-bn needs CUDA (SyncBatchNorm runs on CUDA devices only), not "
                            f"{self.device.type}: drop --sync-bn")
        self.dist.init(self.device)
        reset_peak_memory(self.device)
        self.amp_dtype = autocast_dtype(self.device, args.amp)
        self.channels_last = default_channels_last(self.device) if args.channels_last is None else args.channels_last
        self.checkpoint = load_checkpoint(args.resume) if args.resume else None
        self.out_dir = self.dist.broadcast(self._output_dir() if self.dist.is_main else None)
        self.data = self._load_data()
        self.history, self.best_acc, self.stop_signum = [], -1.0, None
        self.resume_epoch, self.resume_step, self.partial, self.step = 0, 0, None, None
        self.model = self.optimizer = self.scheduler = self.ema = self.scaler = None
        self.identity_probs = None  # the last evaluation's probabilities, reused by the TTA table
        self.finishing = False

    # ---- setup -------------------------------------------------------------------------------------
    def _output_dir(self) -> Path:
        args, ckpt = self.args, Path(self.args.resume).expanduser() if self.args.resume else None
        if args.output_dir:
            out = Path(args.output_dir).expanduser()
        elif ckpt is not None:
            out = ckpt.parent / f"eval-{ckpt.stem}" if args.test_only else ckpt.parent
        else:
            out = Path("runs") / f"{self.script}-{time.strftime('%Y%m%d-%H%M%S')}"
        continuing = ckpt is not None and not args.test_only and out.resolve() == ckpt.parent.resolve()
        held = [n for n in ("last.pt", "best.pt") if (out / n).exists()]
        if held and not continuing and not args.overwrite:
            raise UserError(f"output dir {out} already holds a run ({held[0]}): continue it with --resume "
                            f"{out / held[0]}, replace it with --overwrite, or choose another --output-dir")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output dir {out} ({exc.strerror}): choose a writable --output-dir") from None
        if not os.access(out, os.W_OK):
            raise UserError(f"output dir {out} is not writable: choose a writable --output-dir")
        for stale in out.glob(".*.tmp"):  # left by a run killed mid-save (kill -9): never a complete file
            stale.unlink(missing_ok=True)
        return out

    def _load_data(self) -> Cifar10:
        args = self.args
        data_dir = Path(args.data_dir or "./data")
        if args.data_dir is None:
            data_dir.mkdir(exist_ok=True)  # the default location is ours to create
        if not self.dist.is_main:  # rank 0 downloads (if needed) first; the others then read what it wrote
            self.dist.broadcast(None)
        with warnings.catch_warnings():
            if not self.dist.is_main:
                warnings.simplefilter("ignore")  # rank 0 already warned
            data = load_cifar10(data_dir, args.download)
        if self.dist.is_main:
            self.dist.broadcast(None)
        data = data.subset(args.max_train_samples, args.max_test_samples)
        needed = args.batch_size * self.dist.world_size
        if not args.test_only and data.train_images.shape[0] < needed:
            raise UserError(f"--batch-size {args.batch_size} x {self.dist.world_size} process(es) is more than the "
                            f"{data.train_images.shape[0]} training images: lower it or raise --max-train-samples")
        return data.to(self.device)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model to the device and layout, print the banner and save config.json. Returns the module
        to train (DDP-wrapped under torchrun, compiled with --compile); checkpoints hold the plain module."""
        if self.dist and getattr(self.args, "sync_bn", False):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.summary = model, model_summary(model)
        if self.checkpoint is not None:
            self._check_compatible(self.checkpoint)
        self.config = {"script": self.script, "args": vars(self.args), "device": str(self.device),
                       "device_name": device_name(self.device), "amp": str(self.amp_dtype),
                       "channels_last": self.channels_last, "world_size": self.dist.world_size,
                       "model": model.config, "model_summary": self.summary,
                       "train_images": self.data.train_images.shape[0], "test_images": self.data.test_images.shape[0],
                       "versions": versions(), "git_commit": code_commit()}
        self.config["segments"] = self._segments()
        if self.dist.is_main:
            print_banner(self.config, self.out_dir)
            for line in device_warnings(self.device, self.args):
                print(f"warning: {line}", file=sys.stderr)
            write_json(self.out_dir / ("config.json" if not self.args.test_only else "test_config.json"), self.config)
        if self.dist:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return torch.compile(model) if self.args.compile else model

    def _segments(self) -> list[dict]:
        """Every process that trained this run, oldest first: where it started, its command line and commit. The
        top-level args and git_commit are this process's; a resumed run's earlier epochs came from the others."""
        ckpt, args = self.checkpoint, self.args
        this = {"from_epoch": 0, "from_step": 0, "argv": args.argv, "git_commit": self.config["git_commit"],
                "device_name": self.config["device_name"], "world_size": self.dist.world_size,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if ckpt is None or args.test_only:
            return [this]
        # Checkpoints from before segments were recorded: the first process's command line is all they hold.
        earlier = ckpt.get("segments") or [{"from_epoch": 0, "from_step": 0, "argv": ckpt["config"].get("argv"),
                                            "git_commit": None}]
        return [*earlier, {**this, "from_epoch": ckpt["epoch"], "from_step": ckpt["step"]}]

    def _check_compatible(self, ckpt):
        mine, theirs = self.model.config, saved_model_config(ckpt)
        diff = [f"{k}={theirs.get(k)!r} (this run: {mine[k]!r})" for k in MODEL_KEYS if theirs.get(k) != mine[k]]
        if diff:
            raise UserError(f"checkpoint {self.args.resume} is for another model: {', '.join(diff)}; pass the "
                            "matching flags or another checkpoint")
        if ckpt.get("script") != self.script and not self.args.test_only:  # optimizer/schedule states differ
            raise UserError(f"checkpoint {self.args.resume} was written by mobilenetv4_{ckpt.get('script')}.py: "
                            f"resume it with that script (--test-only evaluates it with either)")
        if self.args.test_only:
            return
        saved = {**ckpt["config"], "world_size": ckpt.get("world_size", 1)}
        mine = {**vars(self.args), "world_size": self.dist.world_size}
        # The optimizer's and scheduler's saved states bring back their lr, weight decay, momentum or betas and
        # StepLR's period and factor: another value would silently lose to the saved one while config.json
        # recorded it. (The schedule's shape, --epochs and --min-lr come from the flags: they re-plan the rest.)
        carried = ("opt", "lr", "wd", "norm_weight_decay", "lr_step_size", "lr_gamma",
                   "momentum" if mine.get("opt") == "sgd" else "betas")
        key = changed_setting(carried, saved, mine)
        if key:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"checkpoint {self.args.resume} trained with {flag} {saved[key]} (this run: "
                            f"{mine[key]}); its optimizer state would keep the old value: resume with the same flag, "
                            "or start a new run")
        # A mid-epoch resume replays that epoch's batch order.
        key = ckpt["step"] and changed_setting(("batch_size", "max_train_samples", "seed", "world_size"), saved, mine)
        if key:
            raise UserError(f"checkpoint {self.args.resume} stopped mid-epoch with {key.replace('_', '-')} "
                            f"{saved[key]}; resume with the same value (or from an epoch-end checkpoint)")

    def start(self, optimizer, scheduler, ema=None) -> int:
        """Register what checkpoints hold, restore it from --resume, install signal handlers; returns the
        epoch to start from."""
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self.evaluated = "ema" if ema is not None else "model"
        ckpt = self.checkpoint
        if ckpt is not None and self.args.test_only:
            # What the training run evaluated (its EMA when it kept one), whatever --model-ema says now.
            weights, self.evaluated = evaluated_weights(ckpt)
            self.model.load_state_dict(weights)
            self.ema = None
        elif ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            if ema is not None and ckpt.get("ema") is not None:
                ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            if ckpt["step"]:  # mid-epoch (same world size, checked): this rank's own random stream
                set_rng_state(ckpt["rng"][self.dist.rank], self.device)
            self.history, self.best_acc = list(ckpt["history"]), ckpt["best_acc"]
            self.resume_epoch, self.resume_step, self.partial = ckpt["epoch"], ckpt["step"], ckpt["partial"]
            self.print(f"resumed from {self.args.resume}: epoch {ckpt['epoch'] + 1}, step {ckpt['step']}")
        self._install_signal_handlers()
        return self.resume_epoch

    def print(self, *args, **kwargs):
        if self.dist.is_main:
            print(*args, **kwargs)

    # ---- the epoch ---------------------------------------------------------------------------------
    def batches(self, epoch: int):
        """This rank's training batches of the epoch, with a progress bar; resumes mid-epoch where a checkpoint
        stopped."""
        args, dist = self.args, self.dist
        self.epoch = epoch
        steps = self.steps_per_epoch()
        start = self.resume_step if epoch == self.resume_epoch else 0
        partial = self.partial if start else None
        self.meter = EpochMeter(steps, args.batch_size, self.device, dist, start, partial)
        self.time_before = partial["time"] if partial else 0.0
        if not start:
            # Dropout and stochastic-depth masks: one stream per (seed, epoch, rank), so ranks draw different masks
            # and an epoch-boundary resume needs no saved random state, whatever the new world size.
            torch.manual_seed(batch_seed(args.seed, epoch, -2, dist.rank))
        self.bar = progress_bar(steps, start, f"epoch {epoch + 1}/{args.epochs}", enabled=dist.is_main)
        synchronize(self.device)
        self.t0 = time.perf_counter()
        for self.step, (images, labels) in enumerate(train_batches_for_epoch(
                self.data, args.batch_size, args.seed, epoch, start, self.augment_cfg,
                rank=dist.rank, world_size=dist.world_size), start):
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels
        self.bar.close()

    def progress(self) -> float:
        """Epochs of training done, counting the steps done in the current epoch as a fraction of it. Schedules
        read this rather than a step counter, so a resume with another batch size, --max-train-samples or
        world size continues the same learning-rate curve."""
        if self.step is None:
            return self.resume_epoch + self.resume_step / self.steps_per_epoch()
        return self.epoch + (self.step + 1) / self.steps_per_epoch()

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the global batch is --batch-size x processes, the last partial one dropped."""
        return self.data.train_images.shape[0] // (self.args.batch_size * self.dist.world_size)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def grad_scaler(self):
        """Loss scaling for fp16 only (bf16 and fp32 need none): a pass-through when disabled. Kept, so that
        checkpoints hold its adapted scale and a resume continues with it."""
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        return self.scaler

    def should_skip(self, loss) -> bool:
        """With --skip-nonfinite: True for a NaN/inf loss on any rank (every rank skips the step). Otherwise the
        bad step is recorded on the device and the run stops at the next check, before anything is saved."""
        if self.args.skip_nonfinite:
            if self.dist.all_max((~torch.isfinite(loss.detach())).to(torch.int64)).item():
                self.meter.skipped += 1
                return True
            return False
        self.meter.note_if_bad(self.step, loss)
        return False

    def step_done(self, loss, logits, labels):
        """Account one optimizer step; refresh the bar; on SIGINT/SIGTERM save last.pt and stop."""
        self.meter.update(self.step, loss, logits, labels)
        done = self.step + 1
        refresh = done % self.REFRESH_EVERY == 0 or done == self.bar.total
        if refresh:
            self._check_finite()
            totals = self.meter.totals(done)
            loss_sum, correct, seen = totals["loss_sum"], totals["correct"], max(1, totals["seen"])
            self.bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct * 100 / seen:.1f}",
                                 lr=f"{self.optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        self.bar.update(1)
        # One process checks its flag every step; ranks agree at refresh points (a collective), so all stop together.
        stop = self._agreed_stop_signal() if refresh or not self.dist else None
        if stop is not None:
            self._save_and_stop(done, stop)

    def _check_finite(self):
        bad = self.meter.first_bad()
        if bad >= 0:
            self.bar.close()
            raise NonFiniteLoss(
                f"loss became NaN/inf at epoch {self.epoch + 1}, step {bad + 1}; stopped. The last good checkpoint "
                f"({self.out_dir / 'last.pt'}, if any epoch finished) is kept. Try a lower --lr, --clip-grad-norm "
                "1.0, --amp off, or --skip-nonfinite to skip such steps")

    def _partial_state(self, done: int) -> dict:
        """What a mid-epoch checkpoint carries of the epoch so far (every process's, summed)."""
        synchronize(self.device)
        totals = self.meter.totals(done)
        return {"step_losses": totals["step_losses"], "correct": totals["correct"], "seen": totals["seen"],
                "skipped": totals["skipped"], "time": self.time_before + time.perf_counter() - self.t0}

    def _save_and_stop(self, done, signum):
        self._check_finite()
        self.bar.close()
        # No buffer averaging here (unlike end_epoch): DDP broadcasts rank 0's buffers at every forward, so rank 0's
        # BN statistics are the run's mid-epoch state, and averaging them would change what the next step sees.
        path = self.out_dir / "last.pt"
        state = self._state(self.epoch, done, self._partial_state(done), rng=self.dist.gather(rng_state(self.device)))
        if self.dist.is_main:
            save_checkpoint(path, state)
        self.dist.barrier()  # no rank exits (and has torchrun tear the others down) before last.pt is in place
        self._stop(signum, f"after epoch {self.epoch + 1} step {done}")

    def _agreed_stop_signal(self):
        """The signal to stop for, or None. Under torchrun a collective: every rank stops if any rank was told."""
        if not self.dist:
            return self.stop_signum
        return int(self.dist.all_max(torch.tensor(self.stop_signum or 0, device=self.device)).item()) or None

    def _stop(self, signum, where):
        path = self.out_dir / "last.pt"
        if self.dist.is_main:
            print(f"\n{signal.Signals(signum).name}: stopped {where}; saved {path}\n"
                  f"resume with: {self.resume_command(path)}", file=sys.stderr)
        raise Interrupted(signum)

    def resume_command(self, path) -> str:
        """The command that continues this run: its own flags, with --resume pointing at `path`."""
        import shlex
        argv, kept, skip = self.args.argv, [], False
        for token in argv:
            if skip:
                skip = False
            elif token == "--resume":
                skip = True
            elif not token.startswith("--resume=") and token != "--overwrite":
                kept.append(token)
        return shlex.join(["python", f"mobilenetv4_{self.script}.py", *kept, "--resume", str(path)])

    def end_epoch(self, epoch: int):
        """Evaluate, print the epoch's log line, write metrics and plots, save last.pt (and best.pt)."""
        synchronize(self.device)
        train_time = self.time_before + time.perf_counter() - self.t0
        self._check_finite()
        self.dist.average_buffers(self.model, self.ema)
        test_loss, test_acc = self._evaluate() if self._evaluates(epoch) else (math.nan, math.nan)
        totals = self.meter.totals(self.steps_per_epoch())
        loss_sum, correct, seen = totals["loss_sum"], totals["correct"], max(1, totals["seen"])
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct * 100 / seen,
               "test_loss": test_loss, "test_acc": test_acc, "lr": self.optimizer.param_groups[0]["lr"],
               "epoch_time_s": train_time, "img_per_s": seen / max(train_time, 1e-9),
               "skipped_steps": totals["skipped"]}
        self.history.append(row)
        is_best = test_acc > self.best_acc  # False for a skipped evaluation (NaN)
        self.best_acc = max(self.best_acc, test_acc)
        if self.dist.is_main:
            print_epoch_line(row, header=len(self.history) == 1 or epoch == self.resume_epoch)
            # Checkpoints before the logs: a crash in between must not leave metrics.csv claiming an epoch that
            # no checkpoint holds; best.pt before last.pt, so last.pt never claims a missing best.pt.
            state = self._state(epoch + 1, 0, None)
            if is_best:
                save_checkpoint(self.out_dir / "best.pt", state)
            save_checkpoint(self.out_dir / "last.pt", state)
            write_metrics_csv(self.out_dir / "metrics.csv", self.history)
            plot_curves(self.out_dir / "curves.png", self.history, *self._curves_labels())
        self._stop_if_signalled(epoch + 1)

    def _curves_labels(self) -> tuple[str, float | None]:
        """curves.png's title, and the notebook's figure where the run compares with it (all 50,000 images)."""
        model = self.config["model"]
        title = (f"mobilenetv4_{self.script}.py: {model['variant']}, width {model['width_mult']}, "
                 f"{self.data.train_images.shape[0]:,} training images, seed {self.args.seed}")
        full_data = self.data.train_images.shape[0] == 50_000
        return title, NOTEBOOK_REPORTED.get(self.script) if full_data else None

    def _evaluates(self, epoch: int) -> bool:
        return (epoch + 1) % self.args.eval_every == 0 or epoch + 1 == self.args.epochs

    def _evaluate(self) -> tuple[float, float]:
        """(test loss, test accuracy) of the delivered model; keeps the probabilities for the final TTA."""
        test_images = self.data.test_images[self.dist.shard(self.data.test_labels.numel())]
        self.identity_probs = predict(self.delivered_model(), test_images, batch_size=self.args.eval_batch_size,
                                      autocast=self.amp_dtype, channels_last=self.channels_last)
        test_loss, test_acc, _ = score(self.identity_probs, self.data.test_labels, self.dist)
        return test_loss, test_acc

    def _stop_if_signalled(self, epoch):
        """A signal that arrived during evaluation or saving: the epoch is saved, so stop here."""
        signum = self._agreed_stop_signal()
        if signum is not None:
            self._stop(signum, f"after epoch {epoch}")

    def delivered_model(self):
        """The model evaluated, reported and used for TTA: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _state(self, epoch, step, partial, rng=None) -> dict:
        """A checkpoint. `rng` (every rank's random state) only mid-epoch: epochs start from a fixed seed."""
        return {"version": CHECKPOINT_VERSION, "script": self.script, "epoch": epoch, "step": step, "partial": partial,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else None,
                "rng": rng, "config": vars(self.args), "model_config": self.model.config,
                "world_size": self.dist.world_size, "history": self.history, "best_acc": self.best_acc,
                "segments": self.config["segments"]}

    # ---- the end -----------------------------------------------------------------------------------
    def finish(self) -> dict:
        """TTA table, per-class accuracy, summary.json, plots; returns the summary (on every rank)."""
        self.finishing = True  # from here a signal stops at once (see _on_signal)
        modes = TTA_VIEWS if self.args.tta_table else {m: TTA_VIEWS[m] for m in dict.fromkeys(("none", self.args.tta))}
        known = {_identity: self.identity_probs} if self.identity_probs is not None else None  # last epoch's eval
        table = tta_table(self.delivered_model(), self.data.test_images, self.data.test_labels, modes=modes,
                          known=known, dist=self.dist, batch_size=self.args.eval_batch_size, autocast=self.amp_dtype,
                          channels_last=self.channels_last)
        tta = {name: {"test_acc": acc, "views": len(TTA_VIEWS[name])} for name, (_, acc, _) in table.items()}
        headline_preds = table[self.args.tta][2]
        labels = self.data.test_labels
        ckpt = self.checkpoint or {}
        summary = {
            "script": self.script, "test_acc": tta["none"]["test_acc"], "test_acc_tta": tta[self.args.tta]["test_acc"],
            "tta": self.args.tta, "tta_table": tta,
            "best_acc": max([r["test_acc"] for r in self.history if not math.isnan(r["test_acc"])], default=None),
            "epochs_completed": len(self.history) if not self.args.test_only else ckpt.get("epoch"),
            "train_time_s": sum(r["epoch_time_s"] for r in self.history),
            "params": self.summary["params"], "macs": self.summary["macs"], "device": str(self.device),
            "device_name": device_name(self.device), "world_size": self.dist.world_size,
            "peak_memory_mb": peak_memory_mb(self.device),
            "per_class_acc": per_class_accuracy(labels, headline_preds, self.data.classes),
            "test_images": labels.numel(), "evaluated": self.evaluated,
            "checkpoint": self.args.resume if self.args.test_only else str(self.out_dir / "last.pt"),
            "config": self.config,
        }
        if self.dist.is_main:
            print_tta_table(tta, self.args.tta, evaluated_model(summary, self.args.test_only))
            print_summary(summary, self.out_dir, self.args.test_only)
            write_json(self.out_dir / "summary.json", summary)
            accuracy = tta[self.args.tta]["test_acc"]
            plot_confusion(self.out_dir / "confusion.png", labels, headline_preds, self.data.classes,
                           f"{self.config['model']['variant']}, {evaluated_model(summary, self.args.test_only)}, "
                           f"TTA {self.args.tta}: {accuracy:.2f}% of {labels.numel():,} test images")
            if self.history:
                plot_curves(self.out_dir / "curves.png", self.history, *self._curves_labels())
        return summary

    # ---- signals -----------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        if threading_main():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.stop_signum is not None:  # second signal: leave now; checkpoints are only ever renamed into place
            os._exit(128 + signum)
        self.stop_signum = signum
        if self.finishing:  # training is over and saved: nothing to finish, stop the final evaluation now
            print(f"\n{signal.Signals(signum).name} received during the final evaluation: stopping; "
                  f"{self.out_dir / 'last.pt'} holds the trained model", file=sys.stderr)
            raise Interrupted(signum)
        if self.dist.is_main:
            print(f"\n{signal.Signals(signum).name} received: finishing this step and saving last.pt "
                  "(press Ctrl-C again to quit at once)", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self.dist.close()
        return False


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def device_name(device: torch.device) -> str:
    """What a run's figures were measured on: the GPU's name, the Mac's chip (MPS), the CPU's architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"{cpu_model()} (MPS)"
    return platform.processor() or platform.machine()


def _sysctl(key: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's marketing name: Linux's /proc/cpuinfo, macOS's sysctl ("Apple M4"); platform.processor() gives
    only the architecture on both."""
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string") or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device) -> dict:
    """What measured a benchmark's figures, in one shape for every benchmark: the code's commit, the library
    versions and the machine (a training run records the same in its config.json)."""
    return {"git_commit": git_commit(), "versions": versions(),
            "machine": {"device": str(device), "device_name": device_name(device), "cpu": cpu_model(),
                        "cpu_count": os.cpu_count()}}


def progress_bar(total, initial, desc, enabled=True):
    from tqdm.auto import tqdm
    # disable=None turns the bar off when stderr is not a terminal, so logs and CI output stay clean.
    return tqdm(total=total, initial=initial, desc=desc, disable=None if enabled else True, leave=False,
                dynamic_ncols=True)


# =====================================================================================================
# 5. Reporting
# =====================================================================================================

# (metrics key, column title, format): one fixed-width line per epoch, airbench style.
EPOCH_COLUMNS = (("epoch", "epoch", "{:>5d}"), ("train_loss", "train_loss", "{:>10.4f}"),
                 ("train_acc", "train_acc", "{:>9.2f}"), ("test_loss", "test_loss", "{:>9.4f}"),
                 ("test_acc", "test_acc", "{:>8.2f}"), ("lr", "lr_end", "{:>9.2e}"),
                 ("epoch_time_s", "train_s", "{:>8.1f}"), ("img_per_s", "img/s", "{:>8.0f}"))


def print_epoch_line(row: dict, header: bool):
    from tqdm.auto import tqdm

    def cell(key, fmt):  # an epoch without evaluation (--eval-every) has NaN test figures: shown as '-'
        value = row[key]
        return "-".rjust(len(fmt.format(0))) if isinstance(value, float) and math.isnan(value) else fmt.format(value)

    if header:
        tqdm.write(" ".join(title.rjust(len(fmt.format(row[key]))) for key, title, fmt in EPOCH_COLUMNS))
    tqdm.write(" ".join(cell(key, fmt) for key, _, fmt in EPOCH_COLUMNS))


def print_banner(config: dict, out_dir: Path):
    args = config["args"]
    print(f"== mobilenetv4_{config['script']}.py ==")
    print("config: " + " ".join(f"{k}={v}" for k, v in args.items()))
    print(f"device: {config['device']} ({config['device_name']}) | amp: {config['amp']} | "
          f"channels_last: {config['channels_last']} | torch {config['versions']['torch']}")
    print(f"model: {config['model']['variant']} | {format_summary(config['model_summary'])}")
    print(f"data: {config['train_images']} train / {config['test_images']} test images | output: {out_dir}")


def evaluated_model(summary: dict, test_only: bool) -> str:
    return f"{summary['checkpoint']} (epoch {summary['epochs_completed']})" if test_only else "final model"


def print_tta_table(tta: dict, headline: str, model: str):
    print(f"\nTest-time augmentation ({model}):")
    print(f"  {'tta':<11} {'views':>5} {'test acc':>9}")
    for name, row in tta.items():
        mark = "  <- headline (--tta)" if name == headline else ""
        print(f"  {name:<11} {row['views']:>5d} {row['test_acc']:>8.2f}%{mark}")


def print_summary(summary: dict, out_dir: Path, test_only: bool):
    accuracy = f"test acc {summary['test_acc']:.2f}% | with TTA '{summary['tta']}' {summary['test_acc_tta']:.2f}%"
    peak = summary["peak_memory_mb"]
    memory = f"peak memory {peak:.0f} MB ({summary['device']})" if peak is not None else \
        f"peak memory not tracked on {summary['device']}"
    if test_only:  # nothing trained: name what was evaluated, and the three files an evaluation writes
        print(f"\n{accuracy} | {evaluated_model(summary, True)} | {memory}")
        files = "test_config.json, summary.json, confusion.png"
    else:
        best = "n/a" if summary["best_acc"] is None else f"{summary['best_acc']:.2f}%"
        print(f"\nfinal {accuracy} | best epoch (chosen on the test set) {best} | epochs {summary['epochs_completed']} | "
              f"train time {summary['train_time_s']:.1f} s | {memory}")
        files = "config.json, metrics.csv, summary.json, curves.png, confusion.png, last.pt, best.pt"
    print("per-class acc: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["per_class_acc"].items()))
    print(f"files: {out_dir}/{{{files}}}")


def per_class_accuracy(labels, preds, classes) -> dict:
    counts = torch.bincount(labels, minlength=len(classes)).clamp_min(1)
    hits = torch.bincount(labels[preds == labels], minlength=len(classes))
    return {name: float(h) * 100 / float(c) for name, h, c in zip(classes, hits.tolist(), counts.tolist())}


def write_json(path: Path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def write_metrics_csv(path: Path, history: list):
    def write(f):
        import io
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        f.write(text.getvalue().encode())
    atomic_write(path, write)


def _save_figure(fig, path: Path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


# The public notebook's reported final test accuracy (%) after 20 epochs on all 50,000 training images.
NOTEBOOK_REPORTED = {"baseline": 70.09, "enhanced": 83.28}


def plot_curves(path: Path, history: list, title: str, notebook: float | None = None):
    """Loss and accuracy per epoch, train and test; `notebook`: the notebook's reported figure, where it compares."""
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4.3))
    ax_loss, ax_acc = fig.subplots(1, 2)
    panels = ((ax_loss, "loss", "cross-entropy loss (train: with label smoothing)"), (ax_acc, "acc", "accuracy (%)"))
    for ax, key, label in panels:
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", ms=3, label="train (augmented, during the epoch)")
        tested = [(r["epoch"], r[f"test_{key}"]) for r in history if not math.isnan(r[f"test_{key}"])]
        ax.plot(*zip(*tested), "o-", ms=3, label="test (end of epoch, no TTA)") if tested else None
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if notebook is not None:
        ax_acc.axhline(notebook, color="grey", ls="--", lw=1, label=f"notebook, reported at epoch 20: {notebook:.2f}%")
    last = history[-1]
    if not math.isnan(last["test_acc"]):
        ax_acc.annotate(f"{last['test_acc']:.2f}%", (last["epoch"], last["test_acc"]), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=9)
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    _save_figure(fig, path)


def plot_confusion(path: Path, labels, preds, classes, title: str):
    from matplotlib.figure import Figure
    k = len(classes)
    matrix = torch.bincount(labels.cpu() * k + preds.cpu(), minlength=k * k).view(k, k)  # [true, predicted]
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    im = ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    _save_figure(fig, path)
