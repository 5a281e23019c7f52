"""Each epoch's training batches: a seeded order, augmentation on the device, normalisation."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .augment import AugmentConfig, alternating_flips, augment
from .data import Cifar10, batch_seed, epoch_order, load_cifar10, normalize
from .errors import UserError


def train_batches_for_epoch(
    data: Cifar10,
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    augment_cfg: AugmentConfig | None = None,
    chunk_images: int = 1024,
    rank: int = 0,
    world_size: int = 1,
):
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
    order = epoch_order(data.train_images.shape[0], seed, epoch, device)[: steps * global_batch]
    order = order.view(steps, world_size, batch_size)[:, rank]  # [steps, B]: this rank's shard
    per_chunk = max(1, chunk_images // batch_size)
    gen = torch.Generator(device=device)
    first_epoch_flips = None
    if augment_cfg is not None and augment_cfg.flip_mode == "alternate":
        # One coin per image for the whole run (the same on every rank: indices are global).
        gen.manual_seed(batch_seed(seed, -1, -3))
        first_epoch_flips = torch.rand(data.train_images.shape[0], generator=gen, device=device) < 0.5
    for chunk_start in range(start_step - start_step % per_chunk, steps, per_chunk):
        idx = order[chunk_start : chunk_start + per_chunk].reshape(-1)
        images = data.train_images[idx]
        if augment_cfg is not None:
            gen.manual_seed(batch_seed(seed, epoch, chunk_start, rank))
            flips = None if first_epoch_flips is None else alternating_flips(first_epoch_flips, idx, epoch)
            images = augment(images, gen, augment_cfg, flips)
        images, labels = normalize(images), data.train_labels[idx]
        for step in range(max(chunk_start, start_step), min(chunk_start + per_chunk, steps)):
            rows = slice((step - chunk_start) * batch_size, (step - chunk_start + 1) * batch_size)
            yield images[rows], labels[rows]


def load_run_data(args, dist, device: torch.device) -> Cifar10:
    """The data set a run trains on, subset by --max-*-samples, on `device`. Under torchrun rank 0 reads (and
    downloads, if needed) first; the others then read what it wrote."""
    data_dir = Path(args.data_dir or "./data")
    if args.data_dir is None:
        data_dir.mkdir(exist_ok=True)  # the default location is ours to create
    if not dist.is_main:
        dist.broadcast(None)
    with warnings.catch_warnings():
        if not dist.is_main:
            warnings.simplefilter("ignore")  # rank 0 already warned
        data = load_cifar10(data_dir, args.download)
    if dist.is_main:
        dist.broadcast(None)
    data = data.subset(args.max_train_samples, args.max_test_samples)
    needed = args.batch_size * dist.world_size
    if not args.test_only and data.train_images.shape[0] < needed:
        raise UserError(
            f"--batch-size {args.batch_size} x {dist.world_size} process(es) is more than the "
            f"{data.train_images.shape[0]} training images: lower it or raise --max-train-samples"
        )
    return data.to(device)
