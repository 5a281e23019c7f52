"""Evaluation: softmax probabilities, TTA averaging, accuracy; sharded across processes under torchrun."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .augment import TTA_VIEWS, _identity
from .data import normalize
from .device import precision_context
from .distributed import Distributed


@torch.no_grad()
def predict_probs(model, images, view=_identity, *, batch_size=500, autocast=None, channels_last=False):
    """Softmax probabilities [N, classes] of `model` on view(images), batched on the images' device."""
    model.eval()
    probs = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(view(images[start : start + batch_size]))
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with precision_context(images.device, autocast):
            probs.append(model(x).float().softmax(1))
    return torch.cat(probs) if probs else images.new_zeros(0, 10, dtype=torch.float32)


def score(probs, labels, dist: Distributed | None = None):
    """Loss, accuracy (%) and predictions of this rank's `probs` against all `labels` (see `evaluate`)."""
    n = labels.numel()
    local_labels = labels[dist.shard(n)] if dist else labels
    # float32: the reduction sums pairwise, good to about 1e-6 of the total, far below the four digits reported.
    loss_sum = F.nll_loss(probs.clamp_min(1e-12).log(), local_labels, reduction="sum")
    preds = probs.argmax(1)
    if dist:
        loss_sum, preds = dist.all_sum(loss_sum), dist.gather_shards(preds, n)
    return loss_sum.item() / max(1, n), (preds == labels).sum().item() * 100.0 / max(1, n), preds


def evaluate(
    model,
    images,
    labels,
    *,
    batch_size=500,
    views=TTA_VIEWS["none"],
    autocast=None,
    channels_last=False,
    dist: Distributed | None = None,
):
    """Loss, accuracy (%) and predictions over all `images`, averaging softmax over the TTA views.

    Under torchrun each rank evaluates one contiguous shard (uneven shards, no padding in the counts) and the
    sums are all-reduced, so every test image counts exactly once."""
    images = images[dist.shard(labels.numel())] if dist else images
    probs = sum(
        predict_probs(model, images, view, batch_size=batch_size, autocast=autocast, channels_last=channels_last)
        for view in views
    ) / len(views)  # [N_local, classes]
    return score(probs, labels, dist)


def tta_table(model, images, labels, *, modes=TTA_VIEWS, known=None, dist=None, **predict_kwargs) -> dict:
    """{mode: (loss, accuracy, predictions)} for the given TTA modes, each distinct view evaluated once;
    `known` maps views to probabilities already computed for this model (this rank's shard)."""
    images = images[dist.shard(labels.numel())] if dist else images
    probs = dict(known or {})
    for view in {view for mode in modes.values() for view in mode} - probs.keys():
        probs[view] = predict_probs(model, images, view, **predict_kwargs)
    return {name: score(sum(probs[v] for v in mode) / len(mode), labels, dist) for name, mode in modes.items()}


def per_class_accuracy(labels, preds, classes) -> dict:
    counts = torch.bincount(labels, minlength=len(classes)).clamp_min(1)
    hits = torch.bincount(labels[preds == labels], minlength=len(classes))
    return {name: float(h) * 100 / float(c) for name, h, c in zip(classes, hits.tolist(), counts.tolist())}


class Evaluator:
    """Evaluates a run's model on the test set: after each epoch (keeping the probabilities, which the final TTA
    table reuses) and at the end with every TTA mode. The weights evaluated are the EMA's when the run keeps one."""

    def __init__(self, data, dist: Distributed, batch_size: int, autocast, channels_last: bool):
        self.data, self.dist = data, dist
        self.predict_kwargs = {"batch_size": batch_size, "autocast": autocast, "channels_last": channels_last}
        self.model = self.ema = None
        self.identity_probs = None  # this rank's probabilities from the last evaluation, without TTA

    def use(self, model: nn.Module, ema=None):
        self.model, self.ema = model, ema

    def eval_model(self) -> nn.Module:
        """The model evaluated, reported and used for TTA: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def epoch(self) -> tuple[float, float]:
        """(test loss, test accuracy %), without TTA."""
        test_images = self.data.test_images[self.dist.shard(self.data.test_labels.numel())]
        self.identity_probs = predict_probs(self.eval_model(), test_images, **self.predict_kwargs)
        test_loss, test_acc, _ = score(self.identity_probs, self.data.test_labels, self.dist)
        return test_loss, test_acc

    def tta(self, modes: dict) -> dict:
        """{mode: (loss, accuracy, predictions)}, reusing the last epoch's evaluation for the identity view."""
        known = {_identity: self.identity_probs} if self.identity_probs is not None else None
        return tta_table(
            self.eval_model(),
            self.data.test_images,
            self.data.test_labels,
            modes=modes,
            known=known,
            dist=self.dist,
            **self.predict_kwargs,
        )
