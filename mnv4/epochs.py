"""Where training stands: the epoch and step, the epoch's batches and progress bar, its meter and its clock."""

from __future__ import annotations

import time

import torch

from .augment import AugmentConfig
from .batches import train_batches_for_epoch
from .data import Cifar10, batch_seed
from .device import synchronize
from .distributed import Distributed
from .errors import NonFiniteLoss
from .meter import EpochMeter
from .report import progress_bar


class EpochLoop:
    """This rank's batches epoch by epoch, resuming mid-epoch where a checkpoint stopped; counts each step into
    the epoch's meter and progress bar, and tells how far training has come (for the schedules)."""

    REFRESH_EVERY = 25  # steps between progress-bar updates and NaN / stop checks (each is a device sync)

    def __init__(
        self,
        args,
        data: Cifar10,
        device: torch.device,
        dist: Distributed,
        augment_cfg: AugmentConfig | None,
        channels_last: bool,
    ):
        self.args, self.data, self.device, self.dist = args, data, device, dist
        self.augment_cfg, self.channels_last = augment_cfg, channels_last
        self.resume_epoch, self.resume_step, self.partial = 0, 0, None  # where a checkpoint stopped
        self.epoch, self.step = 0, None  # the step being trained (None before the first batch)
        self.meter, self.bar = None, None
        self.t0, self.time_before = 0.0, 0.0  # this process's start of the epoch; the epoch's time before it

    def resume_at(self, epoch: int, step: int, partial: dict | None):
        self.resume_epoch, self.resume_step, self.partial = epoch, step, partial

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the global batch is --batch-size x processes, the last partial one dropped."""
        return self.data.train_images.shape[0] // (self.args.batch_size * self.dist.world_size)

    def progress(self) -> float:
        """Epochs of training done, counting the steps done in the current epoch as a fraction of it. Schedules
        read this rather than a step counter, so a resume with another batch size, --max-train-samples or
        world size continues the same learning-rate curve."""
        if self.step is None:
            return self.resume_epoch + self.resume_step / self.steps_per_epoch()
        return self.epoch + (self.step + 1) / self.steps_per_epoch()

    def batches(self, epoch: int):
        """This rank's training batches of the epoch, with a progress bar."""
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
        for step, (images, labels) in enumerate(
            train_batches_for_epoch(
                self.data,
                args.batch_size,
                args.seed,
                epoch,
                start,
                self.augment_cfg,
                rank=dist.rank,
                world_size=dist.world_size,
            ),
            start,
        ):
            self.step = step
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels
        self.bar.close()

    def count_step(self, loss, logits, labels, lr: float) -> bool:
        """Count the step into the meter and the bar; True at a refresh point (where the host reads the device:
        the non-finite check runs there)."""
        self.meter.update(self.step, loss, logits, labels)
        done = self.step + 1
        refresh = done % self.REFRESH_EVERY == 0 or done == self.bar.total
        if refresh:
            self.check_finite()
            totals = self.meter.totals(done)
            loss_sum, correct, seen = totals["loss_sum"], totals["correct"], max(1, totals["seen"])
            self.bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}", acc=f"{correct * 100 / seen:.1f}", lr=f"{lr:.2e}", refresh=False
            )
        self.bar.update(1)
        return refresh

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

    def epoch_row(self, epoch: int, test_loss: float, test_acc: float, lr: float, train_time: float) -> dict:
        """The epoch's line of metrics.csv (and of the log), over every process."""
        totals = self.meter.totals(self.steps_per_epoch())
        loss_sum, correct, seen = totals["loss_sum"], totals["correct"], max(1, totals["seen"])
        return {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct * 100 / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": lr,
            "epoch_time_s": train_time,
            "img_per_s": seen / max(train_time, 1e-9),
            "skipped_steps": totals["skipped"],
        }

    def check_finite(self, last_good: str = "last.pt"):
        bad = self.meter.first_bad()
        if bad >= 0:
            self.bar.close()
            raise NonFiniteLoss(
                f"loss became NaN/inf at epoch {self.epoch + 1}, step {bad + 1}; stopped. The last good checkpoint "
                f"({last_good}, if any epoch finished) is kept. Try a lower --lr, --clip-grad-norm 1.0, --amp off, "
                "or --skip-nonfinite to skip such steps"
            )

    def elapsed(self) -> float:
        """Seconds this epoch has trained, across resumes (the host waits for the device first)."""
        synchronize(self.device)
        return self.time_before + time.perf_counter() - self.t0

    def partial_state(self, done: int) -> dict:
        """What a mid-epoch checkpoint carries of the epoch so far (every process's, summed)."""
        elapsed = self.elapsed()
        totals = self.meter.totals(done)
        return {
            "step_losses": totals["step_losses"],
            "correct": totals["correct"],
            "seen": totals["seen"],
            "skipped": totals["skipped"],
            "time": elapsed,
        }
