"""Files written atomically: a reader (or a crash) sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from .errors import UserError


def atomic_write(path: Path, write):
    """Write via a temporary file in the same folder, then rename: readers see the old or the new file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise UserError(
            f"could not write {path} ({exc.strerror or exc}): free space or choose a writable "
            f"--output-dir; files already there are intact"
        ) from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def write_json(path: Path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def write_metrics_csv(path: Path, history: list):
    def write(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        f.write(text.getvalue().encode())

    atomic_write(path, write)


def save_figure(fig, path: Path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
