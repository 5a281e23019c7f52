"""Augmentation batched on the device, and the test-time augmentation views."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .data import CIFAR10_MEAN, device_constant


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
    cutout: int = 0  # side of a square filled with the mean after everything else (0: off)
    flip_mode: str = "random"  # random: each draw independent; alternate: see `alternating_flips`


FLIP_MODES = ("random", "alternate")


def sample_augment_params(n: int, size: int, cfg: AugmentConfig, gen: torch.Generator, device) -> dict:
    """Per-sample parameters, drawn as torchvision draws them for one image."""

    def uniform(lo, hi):
        return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo

    max_shift = cfg.translate * size  # RandomAffine: round(U(-0.1 W, 0.1 W)) pixels
    return {
        "crop": torch.randint(0, 2 * cfg.crop_padding + 1, (n, 2), generator=gen, device=device) - cfg.crop_padding,
        "flip": torch.rand(n, generator=gen, device=device) < cfg.flip_prob,
        "angle": uniform(-cfg.rotation, cfg.rotation),
        "jitter": torch.stack(
            [
                uniform(1 - cfg.brightness, 1 + cfg.brightness),
                uniform(1 - cfg.contrast, 1 + cfg.contrast),
                uniform(1 - cfg.saturation, 1 + cfg.saturation),
                uniform(-cfg.hue, cfg.hue),
            ],
            1,
        ),  # [n, 4]
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
    ys, xs = torch.meshgrid(
        torch.arange(h, device=dev, dtype=torch.float32),
        torch.arange(w, device=dev, dtype=torch.float32),
        indexing="ij",
    )
    x = xs.expand(b, h, w) - params["shift"][:, 0, None, None]  # [B, H, W] undo the translation
    y = ys.expand(b, h, w) - params["shift"][:, 1, None, None]
    translated_in = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    theta = torch.deg2rad(params["angle"])[:, None, None]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    cos, sin = torch.cos(theta), torch.sin(theta)
    x, y = (cos * (x - cx) - sin * (y - cy) + cx).round(), (sin * (x - cx) + cos * (y - cy) + cy).round()
    in_view = translated_in & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)  # rotation's source in the crop
    x = torch.where(params["flip"][:, None, None], w - 1 - x, x)
    x = x + params["crop"][:, 1, None, None]  # crop offsets in [-pad, pad]
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
    maxc, minc = x.amax(1), x.amin(1)  # [B, H, W]
    delta = maxc - minc
    # Hue in sixths of a turn, up to a multiple of 6 (the mod below absorbs it); 0 for grey pixels (num = 0).
    num = torch.where(r == maxc, g - b, torch.where(g == maxc, b - r + 2 * delta, r - g + 4 * delta))
    hue6 = num / delta.clamp_min(1e-12) + (6 * shift).view(-1, 1, 1)
    k = torch.remainder(device_constant((5.0, 3.0, 1.0), x.device) + hue6.unsqueeze(1), 6)
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
        grey = _grayscale(x)  # [B, 1, H, W]
        is_contrast = (op == CONTRAST).view(-1, 1, 1, 1)
        is_saturation = (op == SATURATION).view(-1, 1, 1, 1)
        target = grey * is_saturation + grey.mean((2, 3), keepdim=True) * is_contrast  # 0 for brightness
        x = torch.lerp(target, x, f).clamp_(0, 1)
        if hue:
            x = torch.where((op == HUE).view(-1, 1, 1, 1), _adjust_hue(x, factors[:, HUE]).clamp_(0, 1), x)
    return x


def alternating_flips(first_epoch_flips: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """Alternating flip (Jordan 2024, airbench): image i is flipped in epoch e iff its first-epoch coin
    `first_epoch_flips[i]` differs from e's parity, so every image is seen flipped in every other epoch instead of
    at random. Over any two consecutive epochs each image shows both orientations once."""
    return first_epoch_flips[indices] ^ bool(epoch % 2)


def augment(
    images: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig(), flips: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> augmented float [B, 3, H, W] in [0, 1], per-sample random parameters.
    `flips` ([B] bool), when given, replaces the random flip draw (the draw is still made, so every other
    parameter is the same as without it).

    Colour jitter runs after all geometry; in torchvision it runs before the translation. So the translated-in
    border is re-blackened after jitter (as torchvision leaves it), and contrast's mean grey is taken over the
    translated frame, border included, rather than the frame before translation: a difference of at most about
    0.02 on the [0, 1] scale, on translated samples only.
    """
    params = sample_augment_params(images.shape[0], images.shape[-1], cfg, gen, images.device)
    if flips is not None:
        params["flip"] = flips
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
    low, high = side // 2, side - side // 2  # [c - low, c + high)
    inside = (ys >= cy - low) & (ys < cy + high) & (xs >= cx - low) & (xs < cx + high)  # [B, H, W]
    return torch.where(inside.unsqueeze(1), device_constant(CIFAR10_MEAN, x.device), x)


AUGMENT_OPS = ("crop_padding", "hflip", "hflip_mode", "rotation", "color_jitter", "translate", "cutout")  # their flags


def augment_config(args) -> AugmentConfig:
    """The augmentation the command-line flags describe (used when --augment is on)."""
    brightness, contrast, saturation, hue = args.color_jitter
    return AugmentConfig(
        crop_padding=args.crop_padding,
        flip_prob=args.hflip,
        rotation=args.rotation,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue,
        translate=args.translate,
        cutout=args.cutout,
        flip_mode=args.hflip_mode,
    )


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
    mask[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = 1
    return torch.roll(x, (dy, dx), (2, 3)) * mask


_SHIFTS = tuple(
    partial(_shift, dx=dx, dy=dy, flip=f) for f in (False, True) for dx, dy in ((2, 0), (-2, 0), (0, 2), (0, -2))
)


TTA_VIEWS = {
    "none": (_identity,),
    "flip": (_identity, _hflip),
    "flip_rot90": (_identity, _hflip, partial(_rotate, quarter_turns=1), partial(_rotate, quarter_turns=-1)),
    "flip_shift": (_identity, _hflip, *_SHIFTS),
}
