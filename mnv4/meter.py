"""One epoch's training loss and accuracy, summed on the device."""

from __future__ import annotations

import math

import torch

from .distributed import Distributed


class EpochMeter:
    """One epoch's training loss and accuracy, kept on the device and read only at the loop's refresh points (a
    read makes the host wait for a GPU), in dtypes every backend has (MPS has no float64): each step's mean loss
    in a float32 slot, correct predictions in an int64 count, samples counted on the host. Totals are summed on
    the host in double precision from the per-step values (math.fsum, exact for any grouping), so float32 costs
    nothing beyond each loss's own rounding, and an epoch resumed mid-way reports what an uninterrupted one does
    to the last bit. Also holds the epoch's first non-finite step, checked at the same points."""

    def __init__(
        self,
        steps: int,
        batch_size: int,
        device: torch.device,
        dist: Distributed,
        start: int = 0,
        partial: dict | None = None,
    ):
        carried = partial or {}
        self.batch_size, self.dist, self.start = batch_size, dist, start
        self.step_losses = torch.zeros(steps, device=device)  # this process's mean loss per step
        self.correct = torch.zeros((), dtype=torch.int64, device=device)  # this process's, since `start`
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.recorded = 0  # steps counted since `start`
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
        step_losses = self.carried_losses + self.dist.all_sum(self.step_losses[self.start : done]).tolist()
        seen = self.carried_seen + self.recorded * self.batch_size * self.dist.world_size
        correct = self.carried_correct + int(self.dist.all_sum(self.correct).item())
        loss_sum = self.carried_loss_sum + math.fsum(v * self.batch_size for v in step_losses)
        return {
            "step_losses": step_losses,
            "loss_sum": loss_sum,
            "correct": correct,
            "seen": seen,
            "skipped": self.skipped,
        }
