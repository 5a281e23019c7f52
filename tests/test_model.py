"""Tests for section 1 (Model) of common.py: sizes, shapes, gradients, stochastic depth, options.

Reference numbers come from /work/shared/MNV4_SPEC.md. Everything runs on CPU with small batches;
the whole file is meant to finish in well under a minute on two cores.
"""

import math
import re

import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation, StochasticDepth

import common
from helpers import SCRIPTS

# ---------------------------------------------------------------------------------------------------
# Reference values (MNV4_SPEC.md sections 2 and 3)
# ---------------------------------------------------------------------------------------------------
IMAGENET_PARAMS = {  # variant: (1000 classes, 10 classes), output_stride 32, width 1, no SE, linear head
    "conv_small": (3_774_024, 2_505_834),
    "conv_medium": (9_715_512, 8_447_322),
    "conv_large": (32_590_864, 31_322_674),
    "hybrid_medium": (11_074_648, 9_806_458),
}
CIFAR_MACS = {  # MACs per 32x32 image, stem + stage 0 at stride 1 (4x4 final map), 10 classes
    "conv_small": 58.50e6,
    "conv_medium": 268.02e6,
    "conv_large": 707.44e6,
    "hybrid_medium": 307.89e6,
}
MNV4_VARIANTS = ("conv_small", "conv_medium", "conv_large", "hybrid_medium")
ALL_VARIANTS = (*MNV4_VARIANTS, "mobilenetv2")
# Conv-S (10 classes, width 1, no SE, linear head) at each output stride: MNV4_SPEC.md section 3.
CONV_S_MACS_BY_OUTPUT_STRIDE = {32: 4.99e6, 16: 16.22e6, 8: 58.50e6}


def spec_make_divisible(v, divisor=8):
    """The rule of MNV4_SPEC.md 1.4, written independently of common.make_divisible."""
    r = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return r + divisor if r < 0.9 * v else r


def build(variant="conv_small", seed=0, **kwargs):
    torch.manual_seed(seed)
    return common.mobilenetv4(variant, **kwargs)


# ---------------------------------------------------------------------------------------------------
# 0. The public constants agree with the spec
# ---------------------------------------------------------------------------------------------------
def test_public_constants():
    assert set(common.VARIANTS) == set(ALL_VARIANTS)
    assert set(common.BLOCK_TABLES) == set(ALL_VARIANTS)
    assert all(common.BLOCK_TABLES[v]["head_width"] == 1280 for v in MNV4_VARIANTS)
    assert common.SE_REDUCTION == 16


# ---------------------------------------------------------------------------------------------------
# 1. Exact parameter counts at the ImageNet configuration
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", MNV4_VARIANTS)
@pytest.mark.parametrize("num_classes", [1000, 10])
def test_imagenet_param_count(variant, num_classes):
    model = build(variant, num_classes=num_classes, output_stride=32, width_mult=1.0, se=False, head="linear")
    expected = IMAGENET_PARAMS[variant][0 if num_classes == 1000 else 1]
    assert common.count_params(model) == expected
    # count_params counts parameters only (no BN running statistics)
    assert common.count_params(model) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# 2. Feature-map geometry and MACs at 32x32
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", MNV4_VARIANTS)
def test_cifar_stem_geometry_and_macs(variant):
    model = build(variant, output_stride=8)
    summary = common.model_summary(model, 32)
    maps = summary["feature_maps"]
    assert maps["stem"][1:] == [32, 32]  # stem at stride 1
    assert maps["stage0"][1:] == [32, 32]  # first block of stage 0 at stride 1
    assert [m[1] for m in (maps["stage1"], maps["stage2"], maps["stage3"])] == [16, 8, 4]
    assert maps["stage4"] == [960, 4, 4]
    assert summary["params"] == common.count_params(model)
    assert summary["macs"] == pytest.approx(CIFAR_MACS[variant], rel=0.02)


def test_stock_stem_at_32_shrinks_to_1x1():
    model = build("conv_small", output_stride=32)
    summary = common.model_summary(model, 32)
    assert summary["feature_maps"]["stage4"] == [960, 1, 1]
    assert summary["macs"] == pytest.approx(4.99e6, rel=0.02)


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_output_stride_sets_the_final_map_and_macs(output_stride):
    """Each halving of the output stride moves one more stride-2 layer (stem, then stage 0) to stride 1."""
    summary = common.model_summary(build("conv_small", output_stride=output_stride), 32)
    side = 32 // output_stride
    assert summary["feature_maps"]["stage4"] == [960, side, side]
    assert summary["macs"] == pytest.approx(CONV_S_MACS_BY_OUTPUT_STRIDE[output_stride], rel=0.01)
    # the stride-1 layers are the earliest: the stem keeps full resolution whenever anything does
    assert summary["feature_maps"]["stem"][1] == (16 if output_stride == 32 else 32)


def test_output_stride_4_on_the_enhanced_model():
    """The enhanced Conv-S (width 1.2, SE, MLP head, SiLU): 84.33 M MACs at 4x4, 223.28 M at 8x8 (MNV4_SPEC.md)."""
    kwargs = dict(width_mult=1.2, se=True, act="silu", head="mlp", dropout=0.3)
    four = common.model_summary(build("conv_small", output_stride=8, **kwargs), 32)
    eight = common.model_summary(build("conv_small", output_stride=4, **kwargs), 32)
    assert four["macs"] == pytest.approx(84.33e6, rel=0.005)
    assert eight["macs"] == pytest.approx(223.28e6, rel=0.005)
    assert four["params"] == eight["params"]  # strides change no weight
    # the 8x8 map comes from the first UIB stage (stage 2) at stride 1; Conv-S's plain 3x3 conv of stage 1 stays
    assert [eight["feature_maps"][f"stage{i}"][1] for i in range(5)] == [32, 16, 16, 8, 8]


def test_output_stride_4_on_conv_medium():
    """Conv-M's first UIB stage is stage 1: 903.95 M MACs with it at stride 1 too (MNV4_SPEC.md section 3)."""
    summary = common.model_summary(build("conv_medium", output_stride=4), 32)
    assert summary["macs"] == pytest.approx(903.95e6, rel=0.005)
    assert summary["feature_maps"]["stage4"][1:] == [8, 8]


@pytest.mark.parametrize("output_stride", [2, 6, 64, 0])
def test_bad_output_stride(output_stride):
    with pytest.raises(ValueError, match=rf"output_stride {output_stride}\b.*32, 16, 8, 4"):
        common.mobilenetv4("conv_small", output_stride=output_stride)


# ---------------------------------------------------------------------------------------------------
# 2b. The MobileNetV2 peer: the same builder, torchvision's network at the ImageNet configuration
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes, expected", [(1000, 3_504_872), (10, 2_236_682)])
def test_mobilenetv2_matches_torchvision(num_classes, expected):
    from torchvision.models import mobilenet_v2

    model = build("mobilenetv2", num_classes=num_classes, output_stride=32, act="relu6", head="linear")
    reference = mobilenet_v2(num_classes=num_classes)
    assert common.count_params(model) == common.count_params(reference) == expected
    # layer for layer: the same parameter shapes in the same order
    assert [p.shape for p in model.parameters()] == [p.shape for p in reference.parameters()]
    # and the same number of multiply-accumulates at 224
    assert common.count_macs(model, (1, 3, 224, 224)) == common.count_macs(reference, (1, 3, 224, 224))


def test_mobilenetv2_cifar_port():
    """The usual CIFAR port (stem and 24-channel row at stride 1): maps 32-32-32-16-8-8-4-4, 87.98 M MACs."""
    model = build("mobilenetv2", output_stride=8, act="relu6", head="linear")
    summary = common.model_summary(model, 32)
    assert [m[1] for m in summary["feature_maps"].values()] == [32, 32, 32, 16, 8, 4]
    assert summary["feature_maps"]["stage4"] == [1280, 4, 4]
    assert summary["macs"] == pytest.approx(87.98e6, rel=0.005)
    # the ratio-1 block has no expansion conv: depthwise 3x3 then the projection, as in the paper
    first = model.stages[0][0]
    convs = [m for m in first.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.groups > 1) for c in convs] == [((3, 3), True), ((1, 1), False)]


def test_count_macs_is_per_image_and_restores_mode():
    model = build("conv_small")
    model.train()
    one = common.count_macs(model, (1, 3, 32, 32))
    three = common.count_macs(model, (3, 3, 32, 32))
    assert one == three
    assert model.training  # count_macs must hand the model back in the mode it got it


# ---------------------------------------------------------------------------------------------------
# 3. Output shapes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_output_shape(variant):
    model = build(variant, num_classes=10)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out_eval = model(x)
    model.train()
    with torch.no_grad():
        out_train = model(x)
    assert out_eval.shape == (2, 10)
    assert out_train.shape == (2, 10)
    assert torch.isfinite(out_eval).all() and torch.isfinite(out_train).all()


# ---------------------------------------------------------------------------------------------------
# 4. Every parameter gets a finite gradient
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["conv_small", "hybrid_medium"])
def test_all_parameters_receive_finite_gradients(variant):
    model = build(variant, se=True, head="mlp", drop_path_rate=0.0)
    model.train()
    torch.manual_seed(2)
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:10]}"
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"identically-zero gradients: {zero[:10]}"
    # SE layers are present and learn
    se_layers = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    assert se_layers and all(m.fc1.weight.grad is not None for m in se_layers)
    if variant == "hybrid_medium":
        gammas = [(n, p) for n, p in model.named_parameters() if n.endswith("layer_scale.gamma")]
        # layer scale on every UIB and MQA with a Residual wrapper: hybrid_medium has 2+12+16 = 30 such blocks
        assert len(gammas) == 30
        for n, p in gammas:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
            assert torch.allclose(p.detach(), torch.full_like(p, 1e-5))  # init 1e-5


# ---------------------------------------------------------------------------------------------------
# 5. Eval mode is deterministic
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_eval_is_deterministic(head):
    model = build("conv_small", drop_path_rate=0.5, dropout=0.5, head=head)
    torch.manual_seed(3)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(10)
        a = model(x)
        torch.manual_seed(11)
        b = model(x)
    assert torch.equal(a, b)
    # ... while the same model in train mode is stochastic (dropout / drop path really are configured)
    model.train()
    with torch.no_grad():
        torch.manual_seed(10)
        c = model(x)
        torch.manual_seed(11)
        d = model(x)
    assert not torch.equal(c, d)


# ---------------------------------------------------------------------------------------------------
# 6. Stochastic depth
# ---------------------------------------------------------------------------------------------------
def _blocks(model):
    return [block for stage in model.stages for block in stage]


@pytest.mark.parametrize("variant", ["conv_small", "hybrid_medium"])
def test_drop_path_schedule(variant):
    rate = 0.5
    model = build(variant, drop_path_rate=rate)
    spec_stages = common.BLOCK_TABLES[variant]["stages"]
    n = sum(len(stage) for stage in spec_stages)
    blocks = _blocks(model)
    assert len(blocks) == n
    specs = [s for stage in spec_stages for s in stage]
    n_residual = 0
    for i, (block, spec) in enumerate(zip(blocks, specs)):
        if isinstance(block, common.Residual) and block.use_residual:
            n_residual += 1
            assert spec.kind in ("uib", "mqa") and spec.stride == 1
            assert isinstance(block.drop_path, StochasticDepth), f"block {i}"
            assert block.drop_path.mode == "row"
            assert block.drop_path.p == pytest.approx(rate * i / n), f"block {i}"
        else:
            # non-residual blocks (convs, fused IBs, strided or width-changing UIBs) never drop
            assert not any(isinstance(m, StochasticDepth) for m in block.modules()), f"block {i}"
    n_sd = sum(isinstance(m, StochasticDepth) for m in model.modules())
    assert n_sd == n_residual > 0
    # the rates increase with depth and stay below the configured maximum
    ps = [b.drop_path.p for b in blocks if isinstance(b, common.Residual) and b.use_residual]
    assert ps == sorted(ps) and max(ps) < rate


def test_no_drop_path_when_rate_zero():
    model = build("conv_small", drop_path_rate=0.0)
    assert not any(isinstance(m, StochasticDepth) for m in model.modules())


def test_stochastic_depth_statistics():
    model = build("conv_small", drop_path_rate=0.5)
    sd = [b.drop_path for b in _blocks(model) if isinstance(b, common.Residual) and b.use_residual][-1]
    p = sd.p
    assert 0.3 < p < 0.5
    sd.train()
    n = 20_000
    torch.manual_seed(4)
    out = sd(torch.ones(n, 3, 2, 2))
    per_sample = out.reshape(n, -1)
    dropped = (per_sample == 0).all(1)
    kept = torch.isclose(per_sample, torch.full_like(per_sample, 1 / (1 - p))).all(1)
    # whole samples are dropped or kept (row mode), never partially
    assert bool((dropped | kept).all())
    frac = dropped.float().mean().item()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)
    # the expectation is preserved: values are 0 or 1/(1-p), variance p/(1-p)
    assert abs(out.mean().item() - 1.0) < 4 * math.sqrt(p / ((1 - p) * n))
    sd.eval()
    x = torch.randn(5, 3, 2, 2)
    assert torch.equal(sd(x), x)


@pytest.mark.parametrize("variant", ["conv_small", "hybrid_medium"])
def test_residual_forward(variant):
    model = build(variant, drop_path_rate=0.5)
    res = [b for b in _blocks(model) if isinstance(b, common.Residual) and b.use_residual][-1]
    c = res.branch[-1][0].out_channels if isinstance(res.branch, nn.Sequential) else res.branch.out.out_channels
    torch.manual_seed(5)
    x = torch.randn(64, c, 4, 4)
    scale = 1.0
    if variant == "hybrid_medium":
        assert isinstance(res.layer_scale, common.LayerScale2d)
        with torch.no_grad():  # 1e-5 would make "dropped" and "kept" indistinguishable below
            res.layer_scale.gamma.uniform_(0.5, 1.5)
        scale = res.layer_scale.gamma
    res.eval()
    with torch.no_grad():
        assert torch.equal(res(x), x + res.branch(x) * scale)
        # train mode: each sample is either x (branch dropped) or x + branch / keep_prob
        res.train()
        p = res.drop_path.p
        branch = res.branch(x) * scale  # BN uses batch statistics: deterministic given the batch
        torch.manual_seed(6)
        out = res(x)
    as_dropped = torch.isclose(out, x, atol=1e-6).flatten(1).all(1)
    as_kept = torch.isclose(out, x + branch / (1 - p), atol=1e-6).flatten(1).all(1)
    assert bool((as_dropped | as_kept).all())
    assert as_dropped.any() and as_kept.any()


# ---------------------------------------------------------------------------------------------------
# 7. Squeeze-and-Excitation parameter delta, computed from the spec rule
# ---------------------------------------------------------------------------------------------------
def _se_params(c):
    s = spec_make_divisible(c / 16)
    return 2 * c * s + c + s  # fc1 (C->S, bias) + fc2 (S->C, bias)


def _expected_se_delta(variant):
    spec = common.BLOCK_TABLES[variant]
    c = spec["stem"]
    delta = 0
    for stage in spec["stages"]:
        for block in stage:
            if block.kind == "uib":  # every UIB, FFN included, on its expanded width
                delta += _se_params(spec_make_divisible(c * block.expand))
            if block.kind != "mqa":
                c = spec_make_divisible(block.out)
    return delta


@pytest.mark.parametrize("variant", ["conv_small", "conv_medium"])
def test_se_param_delta(variant):
    plain = common.count_params(build(variant, se=False))
    with_se = common.count_params(build(variant, se=True))
    expected = _expected_se_delta(variant)
    assert expected > 0
    assert with_se - plain == expected


def test_se_placement_conv_small():
    # conv_small: UIBs are 1 ExtraDW + 4 IB (stage 2) + 1 ConvNext, 2 ExtraDW + 4 IB (stage 3) = 12 SE layers,
    # every one on the expanded width (the ConvNext block's too: 96 x 4 = 384).
    model = build("conv_small", se=True)
    se = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    widths = sorted(m.fc1.in_channels for m in se)
    assert widths == sorted([192, 192, 192, 192, 192, 384, 576, 512, 512, 384, 512, 512])
    assert all(m.fc1.out_channels == spec_make_divisible(m.fc1.in_channels / 16) for m in se)


def _uib_parts(branch):
    """The UIB branch's non-Identity modules as kinds, in forward order: dw / expand / se / project."""
    kinds = []
    for m in branch:
        if isinstance(m, SqueezeExcitation):
            kinds.append("se")
        elif not isinstance(m, nn.Identity):
            conv = m[0]
            kinds.append("dw" if conv.groups > 1 else "expand" if conv.out_channels > conv.in_channels else "project")
    return kinds


@pytest.mark.parametrize(
    "start, middle, expected",
    [
        (3, 3, ["dw", "expand", "dw", "se", "project"]),  # ExtraDW: after the middle DW
        (0, 3, ["expand", "dw", "se", "project"]),  # IB: after the middle DW
        (3, 0, ["dw", "expand", "se", "project"]),  # ConvNext: after the expansion, not on the input
        (0, 0, ["expand", "se", "project"]),  # FFN: after the expansion
    ],
)
def test_se_sits_on_the_expanded_channels_of_every_uib(start, middle, expected):
    branch = common.uib_branch(32, 32, common.uib(start, middle, 1, 4, 32), nn.ReLU, se=True)
    assert _uib_parts(branch) == expected
    se = next(m for m in branch if isinstance(m, SqueezeExcitation))
    assert se.fc1.in_channels == 128


def test_conv_init_uses_group_corrected_fan_out():
    # timm's MobileNet init: std = sqrt(2 / (k*k*out/groups)); a depthwise 3x3 gets sqrt(2/9) = 0.471 whatever
    # its width. torch's kaiming_normal_(mode="fan_out") ignores groups and would give sqrt(2/(9*608)) = 0.019.
    torch.manual_seed(0)
    depthwise = nn.Conv2d(608, 608, 3, groups=608, bias=False)
    pointwise = nn.Conv2d(608, 608, 1, bias=False)
    common.init_weights(depthwise)
    common.init_weights(pointwise)
    assert depthwise.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.05)
    assert pointwise.weight.std().item() == pytest.approx(math.sqrt(2 / 608), rel=0.05)
    model = build("conv_small")
    dws = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dws and all(m.weight.std().item() > 0.2 for m in dws)


# ---------------------------------------------------------------------------------------------------
# 8. MLP head
# ---------------------------------------------------------------------------------------------------
def test_mlp_head_param_delta():
    linear = common.count_params(build("conv_small", head="linear"))
    mlp = common.count_params(build("conv_small", head="mlp"))
    assert mlp - linear == (1280 * 512 + 512 + 512 * 10 + 10) - (1280 * 10 + 10)


# ---------------------------------------------------------------------------------------------------
# 9. Width multiplier and make_divisible
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, expected",
    [
        (38.4, 40),
        (1152, 1152),
        (115.2, 112),
        (1152.0, 1152),
        (32, 32),
        (3, 8),
        (11, 16),
        (12, 16),
        (19.9, 24),
        (17, 16),
        (18, 24),
        (20, 24),
        (28.8, 32),
        (57.6, 56),
        (76.8, 80),
        (153.6, 152),
    ],
)
def test_make_divisible(value, expected):
    assert spec_make_divisible(value) == expected  # the table itself follows the spec rule
    assert common.make_divisible(value) == expected
    assert common.make_divisible(value, 8) % 8 == 0


def _first_conv(module):
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def _head_conv(model):
    return next(m for m in model.head.modules() if isinstance(m, nn.Conv2d))


def _last_linear(model):
    return [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]


def test_width_1_2():
    model = build("conv_small", width_mult=1.2)
    assert _first_conv(model.stem).out_channels == 40
    assert _head_conv(model).in_channels == 1152
    assert _head_conv(model).out_channels == 1280  # head width is never scaled
    assert _last_linear(model).in_features == 1280
    with torch.no_grad():
        feats = model.eval().forward_features(torch.zeros(2, 3, 32, 32))
    assert feats.shape == (2, 1152, 4, 4)
    assert common.count_params(model) > common.count_params(build("conv_small"))


def test_the_enhanced_default_is_conv_s_at_width_1_6():
    """mobilenetv4_enhanced.py with no flags builds Conv-S at width 1.6 (SE, SiLU, MLP head, 4x4 map): the model of
    its committed full runs, 6,461,794 parameters and 142.61 M MACs, which the README's enhanced row states."""
    args = SCRIPTS["enhanced"].parse_args([])
    summary = common.model_summary(common.model_from_args(args), 32)
    assert (args.variant, args.width_mult, args.output_stride) == ("conv_small", 1.6, 8)
    assert summary["params"] == 6_461_794
    assert summary["macs"] == pytest.approx(142.61e6, rel=0.0005)
    assert summary["feature_maps"]["stem"] == [spec_make_divisible(32 * 1.6), 32, 32]
    assert summary["feature_maps"]["stage4"] == [spec_make_divisible(960 * 1.6), 4, 4]


def test_width_0_5_keeps_stem():
    model = build("conv_small", width_mult=0.5)
    assert _first_conv(model.stem).out_channels == 32  # stem unscaled for w < 1
    assert _head_conv(model).in_channels == 480
    assert _head_conv(model).out_channels == 1280
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


# ---------------------------------------------------------------------------------------------------
# 10. One-batch overfit
# ---------------------------------------------------------------------------------------------------
def test_overfit_one_batch():
    """16 random images with random labels must be memorised within 20 Adam steps."""
    model = build("conv_small", output_stride=8)
    torch.manual_seed(7)
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0], losses
    # the initial loss can sit far above chance (see the Linear init), so also demand a loss far below
    # chance level ln(10) = 2.30: the labels are random, only memorisation gets there
    assert losses[-1] < 0.3 * math.log(10), losses


# ---------------------------------------------------------------------------------------------------
# 11. Bad arguments
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, choices",
    [
        (dict(variant="conv_tiny"), ALL_VARIANTS),
        (dict(act="gelu_fancy"), ("relu", "relu6", "silu")),
        (dict(head="transformer"), ("linear", "mlp")),
    ],
)
def test_bad_arguments(kwargs, choices):
    with pytest.raises(ValueError) as err:
        common.mobilenetv4(**kwargs)
    message = str(err.value)
    bad_value = next(iter(kwargs.values()))
    assert bad_value in message
    for choice in choices:
        assert re.search(rf"\b{choice}\b", message), (choice, message)


def _dropouts(script, *flags):
    model = common.model_from_args(SCRIPTS[script].build_parser().parse_args(list(flags)))
    return [m.p for m in model.head.modules() if isinstance(m, nn.Dropout)]


def test_dropout_flag_sets_the_mlp_head_dropout():
    assert _dropouts("enhanced") == [0.3, 0.15]  # the enhanced head's design, unchanged by default
    assert _dropouts("enhanced", "--dropout", "0.5") == [0.5, 0.25]
    assert _dropouts("baseline") == [0.2]
    assert _dropouts("baseline", "--head", "mlp", "--dropout", "0.4") == [0.4, 0.2]
