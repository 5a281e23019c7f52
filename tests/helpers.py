"""What the test modules share: the tiny run's flags, in-process and subprocess runs of the training scripts
(a subprocess's hooks go through WRAPPER, written to a temporary folder by the `wrapper` fixture of conftest.py:
it imports the script module and patches `common.Run.step_done`; the scripts themselves run unchanged), and
checks on what a run leaves behind. Fixtures live in conftest.py."""

import contextlib
import csv
import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import common
import mobilenetv4_baseline
import mobilenetv4_enhanced
from mnv4.checkpoint import SHIPPED_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


def shipped_weights_state() -> dict:
    """The shipped weights file as `torch.load(weights_only=True)` reads it; a missing file fails naming the fix."""
    assert SHIPPED_WEIGHTS.is_file(), (
        f"{SHIPPED_WEIGHTS} is missing: python export.py --checkpoint RUN/last.pt --weights"
    )
    return torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)


SCRIPTS = {"baseline": mobilenetv4_baseline, "enhanced": mobilenetv4_enhanced}


# The tiny run: width 0.25 on 64 training images of the conftest's tiny CIFAR-10, batches of 16 (4 optimizer
# steps per epoch), evaluated on 32 test images. TINY_TRAIN leaves the test set whole (tests/inference_support.py).
STEPS_PER_EPOCH = 4
TINY_TRAIN = [
    "--width-mult",
    "0.25",
    "-b",
    "16",
    "--max-train-samples",
    "64",
    "--device",
    "cpu",
    "--no-download",
    "--seed",
    "0",
]
TINY = [*TINY_TRAIN, "--max-test-samples", "32"]


OUTPUT_FILES = ("config.json", "metrics.csv", "summary.json", "curves.png", "confusion.png", "last.pt", "best.pt")


SUMMARY_KEYS = {
    "test_acc",
    "test_acc_tta",
    "tta",
    "tta_table",
    "params",
    "macs",
    "epochs_completed",
    "train_time_s",
    "device",
    "per_class_acc",
    "best_acc",
}


METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
    "epoch_time_s",
    "img_per_s",
    "skipped_steps",
]


CHECKPOINT_KEYS = {
    "model",
    "optimizer",
    "scheduler",
    "epoch",
    "step",
    "rng",
    "config",
    "model_config",
    "history",
    "best_acc",
}


TIMING = {"epoch_time_s", "img_per_s", "time", "train_time_s", "peak_memory_mb"}  # wall-clock: never compared


ERROR_LINE = re.compile(r"^(\S+: )?error: \S")


MD5_WARNING = "CIFAR-10 files"  # the tiny data set differs from the official release: an expected warning


LEARN = [
    "--width-mult",
    "0.25",
    "-b",
    "8",
    "--max-train-samples",
    "200",
    "--max-test-samples",
    "40",
    "--device",
    "cpu",
    "--no-download",
    "--seed",
    "0",
]


# The notebook's recipe: its augmentation list has every op (rotation and colour jitter too, which the default
# leaves out), so the learning runs exercise all of them; with drop path 0.1, dropout 0.3, cosine per step; no
# decay on norm and bias parameters, as the default.
ENH_EXTRA = ["--recipe", "notebook", "--norm-weight-decay", "0", "--model-ema"]


ENH_LEARN = [*LEARN, "--lr", "3e-3", *ENH_EXTRA]


@dataclass
class Result:
    code: int
    summary: dict | None
    out: str
    err: str


def run_main(script, argv) -> Result:
    """Call a script's main(argv) in this process, capturing stdout/stderr (not a TTY: no progress bars)."""
    out, err = io.StringIO(), io.StringIO()
    summary, code = None, 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            summary = SCRIPTS[script].main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return Result(code, summary, out.getvalue(), err.getvalue())


def train(script, data, out, epochs, *extra) -> Result:
    """A tiny deterministic run that must succeed."""
    res = run_main(
        script, [*TINY, "--data-dir", data, "--output-dir", out, "--epochs", epochs, "--deterministic", *extra]
    )
    assert res.code == 0, res.err
    return res


def learning_run(script, flags, epochs, data, tmp_path_factory):
    """A --deterministic run with `flags` (LEARN-sized) in a fresh folder: (folder, Result)."""
    out = tmp_path_factory.mktemp(f"{script}_learned") / "run"
    res = run_main(script, [*flags, "--data-dir", data, "--output-dir", out, "--epochs", epochs, "--deterministic"])
    assert res.code == 0, res.err
    return out, res


WRAPPER = '''\
"""Run a training script's main() with test hooks chosen by environment variables (tests/helpers.py)."""
import importlib, os, signal, sys, time
sys.path.insert(0, os.environ["MNV4_ROOT"])
import common

script = sys.argv[1]
module = importlib.import_module(script)
signal_at = int(os.environ.get("MNV4_SIGNAL_AT", "0"))        # global optimizer step (1-based) ...
signum = getattr(signal, os.environ.get("MNV4_SIGNAL", "SIGINT"))
count = int(os.environ.get("MNV4_SIGNAL_COUNT", "1"))           # ... and how many signals to send there
sleep_from = int(os.environ.get("MNV4_SLEEP_FROM_EPOCH", "-1"))  # 0-based epoch from which steps are slow
sleep_s = float(os.environ.get("MNV4_SLEEP_S", "0"))
original, steps = common.Run.step_done, [0]


def step_done(self, loss, logits, labels):
    steps[0] += 1
    if steps[0] == signal_at:  # before the original: the run must stop right after this step
        for _ in range(count):
            os.kill(os.getpid(), signum)
            time.sleep(0.05)
    if 0 <= sleep_from <= self.loop.epoch:
        time.sleep(sleep_s)
    return original(self, loss, logits, labels)


common.Run.step_done = step_done
sys.argv = [script + ".py", *sys.argv[2:]]
module.main(sys.argv[1:])
'''


def cli_env(**hooks):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MNV4_ROOT=str(ROOT),
        PYTHONWARNINGS=f"ignore:{MD5_WARNING}",
    )
    env.pop("PYTHONSTARTUP", None)
    env.update({k: str(v) for k, v in hooks.items()})
    return env


def cli_command(script, argv, wrapper=None):
    argv = [str(a) for a in argv]
    if wrapper is not None:
        return [sys.executable, str(wrapper), f"mobilenetv4_{script}", *argv]
    return [sys.executable, f"mobilenetv4_{script}.py", *argv]


def run_cli(script, argv, *, wrapper=None, timeout=120, **hooks) -> subprocess.CompletedProcess:
    """Run a script as a real process from the project root, stdout and stderr piped (not a TTY)."""
    return subprocess.run(
        cli_command(script, argv, wrapper),
        cwd=ROOT,
        env=cli_env(**hooks),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same(a, b, where="checkpoint"):
    """Recursive bit-for-bit equality of checkpoint contents, skipping wall-clock fields."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            if key not in TIMING:
                assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(dir_a: Path, dir_b: Path, summary_a=None, summary_b=None):
    """Two runs ended in the same state: last.pt and best.pt (all but the provenance: config and segments),
    metrics.csv (all but the timings), and the summaries' accuracies."""
    provenance = ("config", "segments")
    for name in ("last.pt", "best.pt"):
        a, b = load(dir_a / name), load(dir_b / name)
        assert_same(
            {k: v for k, v in a.items() if k not in provenance},
            {k: v for k, v in b.items() if k not in provenance},
            name,
        )
    rows_a, rows_b = read_metrics(dir_a / "metrics.csv"), read_metrics(dir_b / "metrics.csv")
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows_a] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in rows_b
    ]
    if summary_a is not None:
        for key in ("test_acc", "test_acc_tta", "tta_table", "per_class_acc", "best_acc", "epochs_completed"):
            assert summary_a[key] == summary_b[key], key


def assert_one_error_line(err: str, *fragments):
    """A user error: exactly one line on stderr, `error: ...` (argparse prefixes the program name), no traceback,
    and the line names what went wrong."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert ERROR_LINE.match(lines[0]), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def wait_for(path: Path, proc: subprocess.Popen, timeout=90):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {path} appeared:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def no_temp_files(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


class _Crash(Exception):
    """Stands for the process dying right after a checkpoint."""


def crash_after_epoch(monkeypatch, crash_epoch: int):
    """Make the run die (raise _Crash) right after epoch `crash_epoch` (1-based) is saved."""
    end_epoch = common.Run.end_epoch

    def end_epoch_then_crash(self, epoch):
        end_epoch(self, epoch)
        if epoch + 1 == crash_epoch:
            raise _Crash

    monkeypatch.setattr(common.Run, "end_epoch", end_epoch_then_crash)


def nan_criterion_at(call):
    """nn.CrossEntropyLoss whose `call`-th forward (1-based, counted over the run: one per step) returns NaN."""

    class NaNAt(nn.CrossEntropyLoss):
        calls = 0

        def forward(self, logits, target):
            loss = super().forward(logits, target)
            NaNAt.calls += 1
            return loss * float("nan") if NaNAt.calls == call else loss

    return NaNAt


# test loss and accuracy read '-' in an epoch without evaluation (--eval-every)
EPOCH_ROW = re.compile(
    r"^\s*\d+\s+\d+\.\d{4}\s+\d+\.\d{2}\s+(\d+\.\d{4}|-)\s+(\d+\.\d{2}|-)\s+\d\.\d{2}e[+-]\d{2}"
    r"\s+\d+\.\d\s+\d+$"
)


def epoch_log(text):
    """(header line, epoch rows) of a run's stdout."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if line.split()[:2] == ["epoch", "train_loss"]]
    assert len(headers) == 1, text
    rows = [line for line in lines if EPOCH_ROW.match(line)]
    start = headers[0] + 1
    assert lines[start : start + len(rows)] == rows, text  # the rows sit right under the header
    return lines[headers[0]], rows


def field_ends(line):
    return [m.end() for m in re.finditer(r"\S+", line)]


def listed_files(stdout: str) -> list[str]:
    """The names on the report's last line, 'files: <folder>/{a, b, ...}'."""
    line = next(line for line in stdout.splitlines() if line.startswith("files: "))
    return sorted(line.split("/{", 1)[1].rstrip("}").split(", "))
