"""Exceptions the scripts turn into one line on stderr and an exit code (see cli.command_line)."""

from __future__ import annotations

import signal


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, ...): reported as one line, exit code 2."""


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived: the run saved last.pt and stops."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
