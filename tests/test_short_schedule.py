"""The short-schedule levers, each a flag off by default: --zero-init-last (every residual block starts as the
identity) and --hflip-mode alternate (each image flipped in every other epoch)."""

import json

import pytest
import torch

import common
from helpers import SCRIPTS, TINY, assert_one_error_line, run_main, train
from mnv4.augment import alternating_flips
from mnv4.blocks import Residual
from mnv4.model import zero_init_last_norms


def enhanced_model(*flags):
    return common.model_from_args(SCRIPTS["enhanced"].build_parser().parse_args([*flags]))


def residual_blocks(model):
    return [m for m in model.modules() if isinstance(m, Residual) and m.use_residual]


# ---- --zero-init-last -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["conv_small", "mobilenetv2"])
def test_zero_init_last_makes_every_residual_block_the_identity(variant):
    torch.manual_seed(0)
    model = enhanced_model("--variant", variant, "--width-mult", "0.5", "--zero-init-last").eval()
    blocks = residual_blocks(model)
    assert blocks, "the table has residual blocks"
    with torch.no_grad():
        for block in blocks:
            channels = block.branch[-1][0].out_channels
            x = torch.randn(2, channels, 8, 8)
            torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_without_the_flag_no_block_is_the_identity():
    torch.manual_seed(0)
    model = enhanced_model("--width-mult", "0.5").eval()
    with torch.no_grad():
        for block in residual_blocks(model):
            x = torch.randn(2, block.branch[-1][0].out_channels, 8, 8)
            assert (block(x) - x).abs().max() > 1e-3


def test_zero_init_last_touches_only_the_residual_branches_last_norm():
    torch.manual_seed(0)
    plain = enhanced_model("--width-mult", "0.5").state_dict()
    torch.manual_seed(0)
    zeroed = enhanced_model("--width-mult", "0.5", "--zero-init-last").state_dict()
    changed = sorted(k for k in plain if not torch.equal(plain[k], zeroed[k]))
    # Conv-S at 4x4: every UIB after the strided first row of stages 2 and 3 is residual (5 each); each zeroes the
    # BN weight of its projection.
    expected = sorted(
        f"stages.{i}.{j}.branch.4.1.weight" for i, j in [*((2, j) for j in range(1, 6)), *((3, j) for j in range(1, 6))]
    )
    assert changed == expected
    assert all(not zeroed[k].any() for k in changed)


def test_zeroed_scales_still_learn():
    torch.manual_seed(0)
    model = enhanced_model("--width-mult", "0.5", "--zero-init-last", "--drop-path", "0").train()
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    for block in residual_blocks(model):
        assert block.branch[-1][1].weight.grad.abs().sum() > 0


def test_zero_init_last_counts_what_it_zeroes():
    model = common.mobilenetv4("conv_small", width_mult=0.5, se=True)
    assert zero_init_last_norms(model) == len(residual_blocks(model)) == 10


def test_zero_init_last_trains_and_is_recorded(tiny_cifar, tmp_path):
    res = train("enhanced", tiny_cifar, tmp_path / "run", 1, "--zero-init-last", "--hflip-mode", "alternate")
    args = json.loads((tmp_path / "run" / "config.json").read_text())["args"]
    assert args["zero_init_last"] is True and args["hflip_mode"] == "alternate"
    assert res.summary["epochs_completed"] == 1


# ---- --hflip-mode alternate -------------------------------------------------------------------------------------


def test_alternating_flips_by_hand():
    coins = torch.tensor([True, False, False, True])
    indices = torch.tensor([3, 0, 1])
    assert alternating_flips(coins, indices, 0).tolist() == [True, True, False]
    assert alternating_flips(coins, indices, 1).tolist() == [False, False, True]
    assert alternating_flips(coins, indices, 4).tolist() == [True, True, False]


def asymmetric_data(n=64):
    """Images whose left and right halves differ, each with its index written in its first row's left pixels."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    images[:, :, :, :16] //= 2  # never mirror-symmetric
    return common.Cifar10(images, torch.arange(n) % 10, images[:10], torch.arange(10))


def flip_states(data, epoch, mode):
    """{image index: flipped?} over one epoch of batches with flip as the only augmentation."""
    cfg = common.AugmentConfig(crop_padding=0, rotation=0, brightness=0, contrast=0, saturation=0, hue=0,
                               translate=0, flip_mode=mode)  # fmt: skip
    source = common.normalize(data.train_images)
    states = {}
    for images, _ in common.train_batches_for_epoch(data, 16, 7, epoch, augment_cfg=cfg, chunk_images=32):
        for image in images:
            same = (source - image).abs().flatten(1).amax(1) < 1e-5
            flipped = (source.flip(3) - image).abs().flatten(1).amax(1) < 1e-5
            assert same.sum() + flipped.sum() == 1
            states[int((same | flipped).nonzero())] = bool(flipped.any())
    return states


def test_alternate_mode_flips_each_image_in_every_other_epoch():
    data = asymmetric_data()
    epochs = [flip_states(data, e, "alternate") for e in range(3)]
    assert set(epochs[0]) == set(epochs[1]) == set(range(64))
    assert all(epochs[0][i] != epochs[1][i] for i in range(64))
    assert epochs[0] == epochs[2]
    assert 16 < sum(epochs[0].values()) < 48  # a random half first


def test_random_mode_is_not_alternating():
    data = asymmetric_data()
    first, second = flip_states(data, 0, "random"), flip_states(data, 1, "random")
    assert 10 < sum(first[i] == second[i] for i in range(64)) < 54


def test_alternate_mode_resumes_mid_epoch_on_the_same_batches():
    data = asymmetric_data()
    cfg = common.AugmentConfig(flip_mode="alternate")
    whole = list(common.train_batches_for_epoch(data, 16, 7, 1, augment_cfg=cfg, chunk_images=32))
    tail = list(common.train_batches_for_epoch(data, 16, 7, 1, start_step=3, augment_cfg=cfg, chunk_images=32))
    assert len(tail) == 1
    torch.testing.assert_close(tail[0][0], whole[3][0], rtol=0, atol=0)


def test_alternate_mode_refuses_another_flip_probability(tiny_cifar, tmp_path):
    res = run_main("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path, "--hflip-mode",
                                "alternate", "--hflip", "0.3"])  # fmt: skip
    assert res.code == 2
    assert_one_error_line(res.err, "--hflip-mode alternate", "--hflip 0.3")
