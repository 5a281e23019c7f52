"""Stopping on SIGINT / SIGTERM: the run finishes its step, saves last.pt and stops; every process stops together."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch

from .distributed import Distributed
from .errors import Interrupted


class StopSignal:
    """The first SIGINT / SIGTERM asks the run to stop at its next safe point (after the step, with last.pt saved);
    a second one quits at once (checkpoints are only ever renamed into place, so nothing is torn). Once training
    is over and saved (`finishing`), the first one stops the final evaluation at once."""

    def __init__(self, dist: Distributed, device: torch.device, out_dir: Path):
        self.dist, self.device, self.out_dir = dist, device, out_dir
        self.signum = None  # the signal received, if any
        self.finishing = False  # set when the final evaluation starts
        self.old_handlers = {}

    def install(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.old_handlers[signum] = signal.signal(signum, self._on_signal)

    def restore(self):
        for signum, handler in self.old_handlers.items():
            signal.signal(signum, handler)
        self.old_handlers = {}

    def agreed(self) -> int | None:
        """The signal to stop for, or None. Under torchrun a collective: every rank stops if any rank was told."""
        if not self.dist:
            return self.signum
        return int(self.dist.all_max(torch.tensor(self.signum or 0, device=self.device)).item()) or None

    def stopped(self, signum: int, message: str):
        """End the run for `signum` (its state is saved): rank 0 says so and how to resume."""
        if self.dist.is_main:
            print(f"\n{signal.Signals(signum).name}: {message}", file=sys.stderr)
        raise Interrupted(signum)

    def _on_signal(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        if self.finishing:  # training is over and saved: nothing to finish, stop the final evaluation now
            print(
                f"\n{signal.Signals(signum).name} received during the final evaluation: stopping; "
                f"{self.out_dir / 'last.pt'} holds the trained model",
                file=sys.stderr,
            )
            raise Interrupted(signum)
        if self.dist.is_main:
            print(
                f"\n{signal.Signals(signum).name} received: finishing this step and saving last.pt "
                "(press Ctrl-C again to quit at once)",
                file=sys.stderr,
            )
