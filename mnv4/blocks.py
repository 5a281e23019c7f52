"""The building blocks: a block spec (one row of a table), and the modules each kind of row builds, with the
universal inverted bottleneck (UIB) as the one general block for every UIB row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation, StochasticDepth


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
    out: int  # output channels before the width multiplier
    stride: int = 1
    kernel: int = 0  # conv / fused_ib kernel
    start_dw: int = 0  # UIB start depthwise kernel (0 = absent)
    middle_dw: int = 0  # UIB middle depthwise kernel (0 = absent)
    expand: float = 0.0  # UIB / FusedIB expansion ratio
    heads: int = 0  # MQA query heads
    key_dim: int = 0  # MQA key / value width per head
    kv_stride: int = 1  # MQA key / value down-sampling


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


SE_REDUCTION = 16


def conv_bn(c_in, c_out, kernel, stride=1, groups=1, act=None):
    """k x k conv (no bias) -> BN -> optional activation; padding k // 2 at every stride."""
    return Conv2dNormActivation(c_in, c_out, kernel, stride, groups=groups, activation_layer=act, inplace=None)


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
        if spec.middle_dw
        else nn.Identity(),
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
        q = self.query(x).reshape(b, self.heads, self.key_dim, h * w)  # [B, heads, d, HW]
        q = q.transpose(2, 3).reshape(b, 1, self.heads * h * w, self.key_dim)  # [B, 1, heads*HW, d]
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, HW_kv, d]
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, HW_kv, d]
        o = F.scaled_dot_product_attention(q, k, v)  # [B, 1, heads*HW, d]
        o = o.reshape(b, self.heads, h * w, self.key_dim).transpose(2, 3)  # [B, heads, d, HW]
        return self.out(o.reshape(b, self.heads * self.key_dim, h, w))  # [B, C, H, W]


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
