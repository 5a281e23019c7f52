"""What produced a result: the code's commit, the library versions, the machine."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from .device import cpu_model, device_name


def git_commit(repo: Path = Path(__file__).parent):
    """HEAD's hash, '<hash>-dirty' when tracked Python files differ from it (the code that ran is not that
    commit), or None outside a git checkout. Other files do not count, tracked or not: a study's log or a
    README edited while a run starts says nothing about the code."""

    def git(*argv):
        return subprocess.run(["git", *argv], cwd=repo, capture_output=True, text=True, timeout=5)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode or not head.stdout.strip():
            return None
        # ':/*.py': every .py file from the top of the work tree, whichever folder `repo` is ('*' spans '/')
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/*.py").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import numpy
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def provenance(device: torch.device) -> dict:
    """What measured a benchmark's figures, in one shape for every benchmark: the code's commit, the library
    versions and the machine (a training run records the same in its config.json)."""
    return {
        "git_commit": git_commit(),
        "versions": versions(),
        "machine": {
            "device": str(device),
            "device_name": device_name(device),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
        },
    }
