"""End-to-end tests of the two training scripts (mobilenetv4_baseline.py, mobilenetv4_enhanced.py).

Everything runs on CPU at width 0.25 on 64 training / 32 test images of the conftest's tiny CIFAR-10, with
batches of 16 (4 steps per epoch). Most runs call the scripts' main() in-process (a subprocess costs seconds of
imports); signals, kill -9, exit codes and log formatting are checked in real subprocesses. Subprocess hooks
(a signal at step k, slow steps) go through a small wrapper written to a temporary folder, which imports the
script module and patches `common.Run.step_done`: no sitecustomize, the scripts themselves run unchanged.
"""
import contextlib
import csv
import errno
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import common
import mnv4.checkpoint
import mnv4.run
import mnv4.evaluation
import mobilenetv4_baseline
import mobilenetv4_enhanced

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"baseline": mobilenetv4_baseline, "enhanced": mobilenetv4_enhanced}

# 64 images / batch 16 = 4 optimizer steps per epoch.
STEPS_PER_EPOCH = 4
TINY = ["--width-mult", "0.25", "-b", "16", "--max-train-samples", "64", "--max-test-samples", "32",
        "--device", "cpu", "--no-download", "--seed", "0"]
OUTPUT_FILES = ("config.json", "metrics.csv", "summary.json", "curves.png", "confusion.png", "last.pt", "best.pt")
SUMMARY_KEYS = {"test_acc", "test_acc_tta", "tta", "tta_table", "params", "macs", "epochs_completed",
                "train_time_s", "device", "per_class_acc", "best_acc"}
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s", "img_per_s",
                  "skipped_steps"]
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "step", "rng", "config", "model_config", "history",
                   "best_acc"}
TIMING = {"epoch_time_s", "img_per_s", "time", "train_time_s", "peak_memory_mb"}  # wall-clock: never compared
ERROR_LINE = re.compile(r"^(\S+: )?error: \S")
MD5_WARNING = "CIFAR-10 files"  # the tiny data set differs from the official release: an expected warning

pytestmark = pytest.mark.filterwarnings(f"ignore:{MD5_WARNING}")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread (two shared cores; and bit-identity across processes needs the same thread count);
    --deterministic switches a process-wide flag, restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


# ---------------------------------------------------------------------------------------------------
# Helpers: in-process and subprocess runs
# ---------------------------------------------------------------------------------------------------
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
    res = run_main(script, [*TINY, "--data-dir", data, "--output-dir", out, "--epochs", epochs, "--deterministic",
                            *extra])
    assert res.code == 0, res.err
    return res


WRAPPER = '''\
"""Run a training script's main() with test hooks chosen by environment variables (tests/test_scripts.py)."""
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


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wrapper") / "hooked_run.py"
    path.write_text(WRAPPER)
    return path


def cli_env(**hooks):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MNV4_ROOT=str(ROOT),
               PYTHONWARNINGS=f"ignore:{MD5_WARNING}")
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
    return subprocess.run(cli_command(script, argv, wrapper), cwd=ROOT, env=cli_env(**hooks), capture_output=True,
                          text=True, timeout=timeout)


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
        assert_same({k: v for k, v in a.items() if k not in provenance},
                    {k: v for k, v in b.items() if k not in provenance}, name)
    rows_a, rows_b = read_metrics(dir_a / "metrics.csv"), read_metrics(dir_b / "metrics.csv")
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows_a] == \
           [{k: v for k, v in r.items() if k not in TIMING} for r in rows_b]
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


# ---------------------------------------------------------------------------------------------------
# Reference runs shared by several tests (read-only by convention: copy a folder before changing it)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base3(tiny_cifar, tmp_path_factory):
    """Baseline, 3 epochs straight, --deterministic."""
    out = tmp_path_factory.mktemp("base3") / "run"
    return out, train("baseline", tiny_cifar, out, 3)


@pytest.fixture(scope="module")
def base1(tiny_cifar, tmp_path_factory):
    """Baseline, --epochs 1 (same seed and flags as base3)."""
    out = tmp_path_factory.mktemp("base1") / "run"
    return out, train("baseline", tiny_cifar, out, 1)


# Enough steps (75) for eval-mode BatchNorm statistics to settle: test accuracy 27-70 % over seeds 0-4 (chance
# 10 %), while the 12 steps of TINY leave it at 0-28 %.
LEARN = ["--width-mult", "0.25", "-b", "8", "--max-train-samples", "200", "--max-test-samples", "40",
         "--device", "cpu", "--no-download", "--seed", "0"]


@pytest.fixture(scope="session")  # shared with tests/test_correctness.py
def learned(tiny_cifar, tmp_path_factory):
    """Baseline, 3 epochs on all 200 training images, batches of 8, --deterministic."""
    return learning_run("baseline", LEARN, 3, tiny_cifar, tmp_path_factory)


def learning_run(script, flags, epochs, data, tmp_path_factory):
    """A --deterministic run with `flags` (LEARN-sized) in a fresh folder: (folder, Result)."""
    out = tmp_path_factory.mktemp(f"{script}_learned") / "run"
    res = run_main(script, [*flags, "--data-dir", data, "--output-dir", out, "--epochs", epochs, "--deterministic"])
    assert res.code == 0, res.err
    return out, res


# The notebook's recipe: its augmentation list has every op (rotation and colour jitter too, which the default
# leaves out), so the learning runs exercise all of them; with drop path 0.1, dropout 0.3, cosine per step; no
# decay on norm and bias parameters, as the default.
ENH_EXTRA = ["--recipe", "notebook", "--norm-weight-decay", "0", "--model-ema"]
# The enhanced recipe needs a higher peak lr to learn in 100 steps: test accuracy 47-60 % over seeds 0-2 (chance
# 10 %), where --lr 1e-3 for 75 steps left it at 5-22 %.
ENH_LEARN = [*LEARN, "--lr", "3e-3", *ENH_EXTRA]


@pytest.fixture(scope="module")
def enh2(tiny_cifar, tmp_path_factory):
    """Enhanced, 2 epochs straight, --deterministic --model-ema."""
    out = tmp_path_factory.mktemp("enh2") / "run"
    return out, train("enhanced", tiny_cifar, out, 2, *ENH_EXTRA)


@pytest.fixture(scope="session")  # shared with tests/test_correctness.py
def enh_learned(tiny_cifar, tmp_path_factory):
    """Enhanced, 4 epochs on all 200 training images, batches of 8, --lr 3e-3, --model-ema, --deterministic."""
    return learning_run("enhanced", ENH_LEARN, 4, tiny_cifar, tmp_path_factory)


# ---------------------------------------------------------------------------------------------------
# 1. End to end: every file, summary keys, metrics rows, checkpoint format, learning
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_end_to_end_outputs(script, base3, enh2):
    out, res = base3 if script == "baseline" else enh2
    epochs = 3 if script == "baseline" else 2
    for name in OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not no_temp_files(out)
    for name in ("curves.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["epochs_completed"] == epochs and summary["device"] == "cpu"
    assert summary["params"] > 0 and summary["macs"] > 0
    assert set(summary["tta_table"]) == {"none", "flip", "flip_rot90", "flip_shift"}
    assert summary["tta"] == "flip" and summary["test_acc_tta"] == summary["tta_table"]["flip"]["test_acc"]
    assert summary["test_acc"] == summary["tta_table"]["none"]["test_acc"]
    assert set(summary["per_class_acc"]) == set(common.CIFAR10_CLASSES)
    assert res.summary["test_acc"] == summary["test_acc"]  # main() returns what it wrote
    json.loads((out / "config.json").read_text())

    rows = read_metrics(out / "metrics.csv")
    assert list(rows[0]) == METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    for row in rows:
        assert all(math.isfinite(float(row[k])) for k in METRIC_COLUMNS), row
        assert int(row["skipped_steps"]) == 0
    assert summary["best_acc"] == max(float(r["test_acc"]) for r in rows)
    assert math.isclose(summary["train_time_s"], sum(float(r["epoch_time_s"]) for r in rows), rel_tol=1e-6)

    ckpt = load(out / "last.pt")  # weights_only=True: no arbitrary unpickling needed
    assert CHECKPOINT_KEYS <= set(ckpt), CHECKPOINT_KEYS - set(ckpt)
    assert ckpt["epoch"] == epochs and ckpt["step"] == 0 and len(ckpt["history"]) == epochs
    assert ckpt["best_acc"] == summary["best_acc"]
    assert ckpt["model_config"]["width_mult"] == 0.25
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    best = load(out / "best.pt")
    assert best["history"][-1]["test_acc"] == summary["best_acc"]
    if script == "enhanced":
        assert ckpt["ema"] is not None and summary["evaluated"] == "ema"
    else:
        # Test accuracy on 32 images after 12 steps is not reliably above chance (eval-mode BatchNorm statistics
        # are still far off; measured 0-28 % over seeds), so learning is checked on the training loss.
        losses = [float(r["train_loss"]) for r in rows]
        assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_learns_above_chance(script, learned, enh_learned):
    out, res = learned if script == "baseline" else enh_learned
    rows = read_metrics(out / "metrics.csv")
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.3
    assert res.summary["test_acc"] >= 30.0, rows  # three times chance on 40 images
    assert res.summary["best_acc"] >= res.summary["test_acc"]


def test_outputs_get_umask_permissions(base3):
    out, _ = base3
    umask = os.umask(0)
    os.umask(umask)
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------------------------------------------
# 2. Resume equals uninterrupted
# ---------------------------------------------------------------------------------------------------
def test_baseline_resume_equals_uninterrupted(base1, base3, tiny_cifar, tmp_path):
    """1 epoch, then --resume last.pt --epochs 3 == 3 epochs straight, bit for bit."""
    out = tmp_path / "run"
    shutil.copytree(base1[0], out)
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 3, "--deterministic", "--resume", out / "last.pt"])
    assert res.code == 0, res.err
    assert f"resumed from {out / 'last.pt'}: epoch 2, step 0" in res.out
    assert res.summary["epochs_completed"] == 3
    assert_same_run(out, base3[0], res.summary, base3[1].summary)


def test_resume_keeps_the_provenance_of_every_segment(base1, tiny_cifar, tmp_path, monkeypatch):
    """config.json of a resumed run still names the command and commit that trained its first epochs, and adds
    the resume's own: a results folder must say which code made every epoch it reports."""
    out = tmp_path / "run"
    shutil.copytree(base1[0], out)
    first = json.loads((out / "config.json").read_text())
    monkeypatch.setattr(mnv4.run, "git_commit", lambda: "f" * 40)  # the resume runs on a later commit
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 3, "--deterministic",
                                "--resume", out / "last.pt"])
    assert res.code == 0, res.err
    segments = json.loads((out / "config.json").read_text())["segments"]
    assert [(s["from_epoch"], s["from_step"]) for s in segments] == [(0, 0), (1, 0)]
    assert segments[0]["argv"] == first["args"]["argv"] and segments[0]["git_commit"] == first["git_commit"]
    assert "--resume" in segments[1]["argv"] and segments[1]["git_commit"] == "f" * 40
    assert torch.load(out / "last.pt", weights_only=False)["segments"] == segments
    # --test-only trains nothing: the run's own config.json keeps its segments
    run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--test-only", "--resume", out / "last.pt"])
    assert json.loads((out / "config.json").read_text())["segments"] == segments


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


def test_enhanced_resume_equals_uninterrupted(enh_learned, tiny_cifar, tmp_path, monkeypatch):
    """Enhanced (augmentation, drop path, dropout, per-step cosine, EMA), a run that learns: stop after epoch 2 of
    an --epochs 4 run, resume, compare with 4 epochs straight. (Not `--epochs 2` then `--epochs 4`: the cosine
    schedule is planned over --epochs, so extending a finished run re-plans the learning rate by design.)"""
    out = tmp_path / "run"
    crash_after_epoch(monkeypatch, 2)
    with pytest.raises(_Crash):
        run_main("enhanced", [*ENH_LEARN, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 4,
                              "--deterministic"])
    monkeypatch.undo()
    assert load(out / "last.pt")["epoch"] == 2
    res = run_main("enhanced", [*ENH_LEARN, "--data-dir", tiny_cifar, "--epochs", 4, "--deterministic",
                                "--resume", out / "last.pt"])
    assert res.code == 0, res.err
    assert "resumed from" in res.out and res.summary["epochs_completed"] == 4
    assert res.summary["test_acc"] >= 30.0  # real predictions are compared, not chance-level noise
    assert_same_run(out, enh_learned[0], res.summary, enh_learned[1].summary)


# ---------------------------------------------------------------------------------------------------
# 3. Mid-epoch stop on SIGINT / SIGTERM, then resume
# ---------------------------------------------------------------------------------------------------
def test_sigint_mid_epoch_then_resume(wrapper, tiny_cifar, enh2, tmp_path):
    out = tmp_path / "run"
    k = STEPS_PER_EPOCH + 2  # epoch 2, after its 2nd step
    proc = run_cli("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2,
                                "--deterministic", *ENH_EXTRA], wrapper=wrapper, MNV4_SIGNAL_AT=k)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "stopped after epoch 2 step 2" in proc.stderr and str(out / "last.pt") in proc.stderr
    assert f"--resume {out / 'last.pt'}" in proc.stderr
    ckpt = load(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2) and ckpt["partial"]["seen"] == 2 * 16
    assert len(ckpt["history"]) == 1
    assert not no_temp_files(out)

    res = run_main("enhanced", [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--deterministic", *ENH_EXTRA,
                                "--resume", out / "last.pt"])
    assert res.code == 0, res.err
    assert f"resumed from {out / 'last.pt'}: epoch 2, step 2" in res.out
    assert_same_run(out, enh2[0], res.summary, enh2[1].summary)


def test_external_sigterm_mid_epoch_then_resume(wrapper, tiny_cifar, enh2, tmp_path):
    """A scheduler's SIGTERM from outside, at whatever point of epoch 2 it lands: exit 143, resumable."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli_command("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2,
                                 "--deterministic", *ENH_EXTRA], wrapper),
        cwd=ROOT, env=cli_env(MNV4_SLEEP_FROM_EPOCH=1, MNV4_SLEEP_S=0.3), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out / "curves.png", proc)  # the epoch's last file: epoch 2 is training
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM" in err and "--resume" in err
    ckpt = load(out / "last.pt")
    assert ckpt["epoch"] == 1 and 1 <= ckpt["step"] <= STEPS_PER_EPOCH, (ckpt["epoch"], ckpt["step"])

    res = run_main("enhanced", [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--deterministic", *ENH_EXTRA,
                                "--resume", out / "last.pt"])
    assert res.code == 0, res.err
    assert f"epoch 2, step {ckpt['step']}" in res.out
    assert_same_run(out, enh2[0], res.summary, enh2[1].summary)


def test_second_signal_exits_at_once(wrapper, tiny_cifar, tmp_path):
    """Two Ctrl-C: leave immediately (130) without saving; the previous epoch's last.pt stays valid."""
    out = tmp_path / "run"
    proc = run_cli("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2],
                   wrapper=wrapper, MNV4_SIGNAL_AT=STEPS_PER_EPOCH + 2, MNV4_SIGNAL_COUNT=2)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "saved" not in proc.stderr
    ckpt = load(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)


# ---------------------------------------------------------------------------------------------------
# 4. kill -9 during training, then --resume
# ---------------------------------------------------------------------------------------------------
def test_kill9_then_resume(wrapper, tiny_cifar, base3, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli_command("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 3,
                                 "--deterministic"], wrapper),
        cwd=ROOT, env=cli_env(MNV4_SLEEP_FROM_EPOCH=1, MNV4_SLEEP_S=0.3), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        wait_for(out / "last.pt", proc)  # written after best.pt: both of epoch 1 are in place
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpt = load(out / "last.pt")  # renamed into place whole: never a torn file
    done = ckpt["epoch"]
    assert done in (1, 2) and ckpt["step"] == 0 and len(ckpt["history"]) == done

    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 3, "--deterministic",
                                "--resume", out / "last.pt"])
    assert res.code == 0, res.err
    assert f"resumed from {out / 'last.pt'}: epoch {done + 1}, step 0" in res.out
    assert res.summary["epochs_completed"] == 3
    assert len(load(out / "last.pt")["history"]) == 3 and len(read_metrics(out / "metrics.csv")) == 3
    assert_same_run(out, base3[0], res.summary, base3[1].summary)


def test_crash_between_checkpoint_writes(tiny_cifar, tmp_path, monkeypatch):
    """Die right after the first checkpoint file of epoch 1 is in place: whatever is on disk must be consistent
    (a last.pt recording a best accuracy comes with the best.pt holding it), and resuming ends with a best.pt."""
    out = tmp_path / "run"
    save, written = common.save_checkpoint, []

    def save_then_die(path, state):
        save(path, state)
        written.append(Path(path).name)
        raise _Crash

    monkeypatch.setattr(mnv4.checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(_Crash):
        run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2])
    monkeypatch.undo()
    if (out / "last.pt").exists():
        last = load(out / "last.pt")
        assert (out / "best.pt").exists(), f"only {written} written: last.pt records best_acc {last['best_acc']}"
        assert load(out / "best.pt")["history"][-1]["test_acc"] == last["best_acc"]
        res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--resume", out / "last.pt"])
        assert res.code == 0, res.err
        assert (out / "best.pt").exists()


# ---------------------------------------------------------------------------------------------------
# 5. A checkpoint write that fails half-way leaves the previous one intact
# ---------------------------------------------------------------------------------------------------
def test_failed_save_keeps_previous_checkpoint(base1, tiny_cifar, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(base1[0], out)
    before = (out / "last.pt").read_bytes()
    real_save = torch.save

    def half_then_enospc(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", half_then_enospc)
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--deterministic",
                                "--resume", out / "last.pt"])
    monkeypatch.undo()
    assert res.code == 2
    assert_one_error_line(res.err, "last.pt", os.strerror(errno.ENOSPC))
    assert (out / "last.pt").read_bytes() == before
    assert load(out / "last.pt")["epoch"] == 1
    assert not no_temp_files(out), no_temp_files(out)


def test_output_dir_unwritable_mid_run(base1, tiny_cifar, tmp_path, monkeypatch):
    """The file system turns read-only during the run (or refuses creation despite os.access): exit 2, one line,
    previous checkpoint intact."""
    out = tmp_path / "run"
    shutil.copytree(base1[0], out)
    before = (out / "last.pt").read_bytes()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(".last.pt"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    try:
        res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--resume", out / "last.pt"])
    finally:
        monkeypatch.undo()
    assert res.code == 2
    assert_one_error_line(res.err, "last.pt")
    assert (out / "last.pt").read_bytes() == before


# ---------------------------------------------------------------------------------------------------
# 6. NaN loss: exit 3 naming epoch and step, last good checkpoint kept; --skip-nonfinite completes
# ---------------------------------------------------------------------------------------------------
def nan_criterion_at(call):
    """nn.CrossEntropyLoss whose `call`-th forward (1-based, counted over the run: one per step) returns NaN."""
    class NaNAt(nn.CrossEntropyLoss):
        calls = 0

        def forward(self, logits, target):
            loss = super().forward(logits, target)
            NaNAt.calls += 1
            return loss * float("nan") if NaNAt.calls == call else loss
    return NaNAt


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_nan_loss_stops_with_exit_3(script, tiny_cifar, tmp_path, monkeypatch):
    out = tmp_path / "run"
    saved = []
    save = common.save_checkpoint

    def recording_save(path, state):
        save(path, state)
        saved.append((Path(path).name, state["epoch"], Path(path).read_bytes()))

    monkeypatch.setattr(mnv4.checkpoint, "save_checkpoint", recording_save)
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", nan_criterion_at(STEPS_PER_EPOCH + 3))  # epoch 2, step 3
    res = run_main(script, [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 3])
    monkeypatch.undo()
    assert res.code == 3, res.err
    assert_one_error_line(res.err, "epoch 2, step 3")
    assert [(name, epoch) for name, epoch, _ in saved] == [("best.pt", 1), ("last.pt", 1)]  # nothing after NaN
    assert (out / "last.pt").read_bytes() == saved[1][2]
    ckpt = load(out / "last.pt")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert len(read_metrics(out / "metrics.csv")) == 1


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_skip_nonfinite_completes(script, tiny_cifar, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", nan_criterion_at(STEPS_PER_EPOCH + 3))
    res = run_main(script, [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2,
                            "--skip-nonfinite"])
    monkeypatch.undo()
    assert res.code == 0, res.err
    assert res.summary["epochs_completed"] == 2
    assert [int(r["skipped_steps"]) for r in read_metrics(out / "metrics.csv")] == [0, 1]
    ckpt = load(out / "last.pt")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


# ---------------------------------------------------------------------------------------------------
# 7. Bad input: exit 2, one `error:` line naming the problem, no traceback
# ---------------------------------------------------------------------------------------------------
BAD_FLAGS = [
    (["--epochs", "0"], "--epochs"),
    (["-b", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--variant", "foo"], "--variant"),
    (["--tta", "foo"], "--tta"),
    (["--test-only"], "--resume"),
    (["--max-train-samples", "8"], "--batch-size"),  # -b 16 > 8 training images
    (["--data-dir", "/nonexistent"], "/nonexistent"),
]


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
@pytest.mark.parametrize("flags,names", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags(script, flags, names, tiny_cifar, tmp_path):
    out = tmp_path / "run"
    res = run_main(script, [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 1, *flags])
    assert res.code == 2
    assert_one_error_line(res.err, names)
    assert not (out / "last.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_gpu(tiny_cifar, tmp_path):
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", "--epochs", 1,
                                "--device", "cuda"])
    assert res.code == 2
    assert_one_error_line(res.err, "cuda")


def test_truncated_batch_file(tiny_cifar, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_cifar, data)
    batch = data / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    res = run_main("baseline", [*TINY, "--data-dir", data, "--output-dir", tmp_path / "o", "--epochs", 1])
    assert res.code == 2
    assert_one_error_line(res.err, "data_batch_3")


def test_output_dir_of_another_run(base1, tiny_cifar, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(base1[0] / "last.pt", out / "last.pt")
    before = (out / "last.pt").read_bytes()
    res = run_main("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 1])
    assert res.code == 2
    assert_one_error_line(res.err, "last.pt", "--overwrite", "--resume")
    assert (out / "last.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]  # nothing written beside it
    # --overwrite replaces it
    res = run_main("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 1, "--overwrite"])
    assert res.code == 0, res.err
    assert load(out / "last.pt")["config"]["overwrite"] is True


@pytest.fixture
def bad_checkpoints(base1, tmp_path):
    """name -> path of an unusable checkpoint."""
    real = (base1[0] / "last.pt").read_bytes()
    paths = {"missing": tmp_path / "missing.pt", "garbage": tmp_path / "garbage.pt",
             "truncated": tmp_path / "truncated.pt", "foreign": tmp_path / "foreign.pt"}
    paths["garbage"].write_bytes(os.urandom(4096))
    paths["truncated"].write_bytes(real[:len(real) // 2])
    torch.save({"model": {"w": torch.zeros(3)}}, paths["foreign"])  # a torch file, not one of ours
    paths["pickle"] = tmp_path / "data_batch_1"  # a plain pickle (protocol 4: torch.load warns about it)
    paths["pickle"].write_bytes(pickle.dumps({"data": [1, 2, 3]}, protocol=4))
    return paths


@pytest.mark.parametrize("kind,names", [("missing", "missing.pt"), ("garbage", "garbage.pt"),
                                        ("truncated", "truncated.pt"), ("foreign", "foreign.pt"),
                                        ("pickle", "data_batch_1")])
def test_resume_unusable_checkpoint(kind, names, bad_checkpoints, tiny_cifar, tmp_path):
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", "--epochs", 2,
                                "--resume", bad_checkpoints[kind]])
    assert res.code == 2
    assert_one_error_line(res.err, names)


@pytest.mark.parametrize("flags,names", [(["--width-mult", "0.5"], "width_mult"), (["--head", "mlp"], "head")])
@pytest.mark.parametrize("test_only", [False, True], ids=["resume", "test-only"])
def test_resume_checkpoint_of_another_model(flags, names, test_only, base1, tiny_cifar, tmp_path):
    ckpt = base1[0] / "last.pt"
    before = ckpt.read_bytes()
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", "--epochs", 2,
                                "--resume", ckpt, *flags, *(["--test-only"] if test_only else [])])
    assert res.code == 2
    assert_one_error_line(res.err, names)
    assert ckpt.read_bytes() == before


def test_resume_checkpoint_of_the_other_script(base1, tiny_cifar, tmp_path):
    """Same model flags, other script: the optimizer/scheduler state does not fit; refuse in one line."""
    res = run_main("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", "--epochs", 2,
                                "--act", "relu6", "--no-se", "--head", "linear", "--drop-path", "0",
                                "--resume", base1[0] / "last.pt"])
    assert res.code == 2
    assert_one_error_line(res.err, "last.pt")


@pytest.mark.parametrize("betas", [["1.5", "0.999"], ["nan", "0.999"]])
def test_bad_betas(betas, tiny_cifar, tmp_path):
    res = run_main("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", "--epochs", 1,
                                "--betas", *betas])
    assert res.code == 2
    assert_one_error_line(res.err, "--betas")


def test_read_only_output_dir(tiny_cifar, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (see the simulated test)")
        res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 1])
    finally:
        out.chmod(0o700)
    assert res.code == 2
    assert_one_error_line(res.err, str(out), "writable")


def test_read_only_output_dir_simulated(tiny_cifar, tmp_path, monkeypatch):
    """As a non-root user would see a 0500 folder: os.access says no, and creating files there fails."""
    out = tmp_path / "ro"
    out.mkdir()
    real_access, real_mkstemp = os.access, tempfile.mkstemp

    def access(path, mode, *args, **kwargs):
        if Path(path).resolve() == out.resolve() and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == out.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 1])
    monkeypatch.undo()
    assert res.code == 2
    assert_one_error_line(res.err, str(out), "writable")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("flags,names", [(["--epochs", "0"], "--epochs"), (["--resume", "garbage.pt"], "garbage.pt"),
                                         (["--resume", "data_batch_1"], "data_batch_1")],
                         ids=["argparse", "user-error", "pickle-checkpoint"])
def test_bad_input_as_a_process(flags, names, tiny_cifar, tmp_path):
    """The real command line: exit status 2, one line on stderr, no traceback (nor torch's warning about a
    foreign pickle's protocol)."""
    if "garbage.pt" in flags:
        (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
        flags = ["--resume", tmp_path / "garbage.pt"]
    if "data_batch_1" in flags:
        (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": [1, 2, 3]}, protocol=4))
        flags = ["--resume", tmp_path / "data_batch_1"]
    proc = run_cli("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", *flags],
                   timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, names)


# ---------------------------------------------------------------------------------------------------
# 8. --test-only --resume best.pt reproduces the recorded accuracy
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_test_only_reproduces_best_epoch(script, learned, enh_learned, tiny_cifar):
    """(Both runs learned: their accuracy is far from what an unloaded, untrained model scores.)"""
    run_dir, run = learned if script == "baseline" else enh_learned
    flags = LEARN if script == "baseline" else ENH_LEARN
    best = run_dir / "best.pt"
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.csv")}
    ckpt = load(best)
    rows = read_metrics(run_dir / "metrics.csv")
    best_row = rows[ckpt["epoch"] - 1]
    assert float(best_row["test_acc"]) == max(float(r["test_acc"]) for r in rows)
    assert float(best_row["test_acc"]) >= 30.0  # three times chance: the comparison below means something
    res = run_main(script, [*flags, "--data-dir", tiny_cifar, "--test-only", "--resume", best])
    assert res.code == 0, res.err
    assert res.summary["test_acc"] == float(best_row["test_acc"])
    assert res.summary["epochs_completed"] == ckpt["epoch"]
    summary = json.loads((run_dir / "eval-best" / "summary.json").read_text())
    assert summary["test_acc"] == float(best_row["test_acc"])
    assert {name: (run_dir / name).read_bytes() for name in before} == before  # evaluation changes nothing

    # last.pt holds the final model: evaluating it reproduces the training run's final report.
    res = run_main(script, [*flags, "--data-dir", tiny_cifar, "--test-only", "--resume", run_dir / "last.pt"])
    assert res.code == 0, res.err
    for key in ("test_acc", "test_acc_tta", "tta_table", "per_class_acc"):
        assert res.summary[key] == run.summary[key], key
    assert (run_dir / "eval-last" / "summary.json").is_file()


def listed_files(stdout: str) -> list[str]:
    """The names on the report's last line, 'files: <folder>/{a, b, ...}'."""
    line = next(line for line in stdout.splitlines() if line.startswith("files: "))
    return sorted(line.split("/{", 1)[1].rstrip("}").split(", "))


def test_test_only_report_names_the_checkpoint_and_the_files_it_wrote(learned, tiny_cifar):
    """--test-only trains nothing: its report names the checkpoint and epoch it evaluated (not a training time of
    0 s, nor "the final model"), and its files line lists what it wrote (eval-best/ holds no checkpoint, metrics
    or curves); a training run's files line lists its folder."""
    run_dir, run = learned
    assert listed_files(run.out) == sorted(p.name for p in run_dir.iterdir() if p.is_file())
    epoch = load(run_dir / "best.pt")["epoch"]
    res = run_main("baseline", [*LEARN, "--data-dir", tiny_cifar, "--test-only", "--resume", run_dir / "best.pt"])
    assert res.code == 0, res.err
    assert listed_files(res.out) == sorted(p.name for p in (run_dir / "eval-best").iterdir())
    assert f"{run_dir / 'best.pt'} (epoch {epoch})" in res.out
    assert "train time" not in res.out and "(final model)" not in res.out


# ---------------------------------------------------------------------------------------------------
# 9. Logs without a terminal: no progress bars, one fixed-column line per epoch
# ---------------------------------------------------------------------------------------------------
# test loss and accuracy read '-' in an epoch without evaluation (--eval-every)
EPOCH_ROW = re.compile(r"^\s*\d+\s+\d+\.\d{4}\s+\d+\.\d{2}\s+(\d+\.\d{4}|-)\s+(\d+\.\d{2}|-)\s+\d\.\d{2}e[+-]\d{2}"
                       r"\s+\d+\.\d\s+\d+$")


def epoch_log(text):
    """(header line, epoch rows) of a run's stdout."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if line.split()[:2] == ["epoch", "train_loss"]]
    assert len(headers) == 1, text
    rows = [line for line in lines if EPOCH_ROW.match(line)]
    start = headers[0] + 1
    assert lines[start:start + len(rows)] == rows, text  # the rows sit right under the header
    return lines[headers[0]], rows


def field_ends(line):
    return [m.end() for m in re.finditer(r"\S+", line)]


def test_logs_when_not_a_tty(tiny_cifar, tmp_path):
    proc = run_cli("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", "--epochs", 3])
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    assert "it/s" not in proc.stderr and "%|" not in proc.stderr  # no tqdm bar
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # (the expected md5 warning of the tiny data is filtered)
    header, rows = epoch_log(proc.stdout)
    assert [int(r.split()[0]) for r in rows] == [1, 2, 3]  # once per epoch
    assert len(header.split()) == 8
    assert len({tuple(field_ends(r)) for r in rows}) == 1, rows  # fixed columns from row to row


def test_epoch_log_columns_align_with_header(base3):
    header, rows = epoch_log(base3[1].out)
    assert len(rows) == 3
    for row in rows:
        assert field_ends(row) == field_ends(header), f"\n{header}\n{row}"


def test_eval_every_skips_evaluations_without_changing_training(base3, tiny_cifar, tmp_path, monkeypatch):
    """--eval-every 2 of 3 epochs evaluates after epochs 2 and 3 only (the last is always evaluated): the skipped
    epoch logs no test figures, best.pt is the best evaluated epoch, and the weights equal those of a run that
    evaluated every epoch."""
    evaluated = []
    predict = mnv4.evaluation.predict_probs

    def counting_predict(model, images, *args, **kwargs):
        evaluated.append(images.shape[0])
        return predict(model, images, *args, **kwargs)

    monkeypatch.setattr(mnv4.evaluation, "predict_probs", counting_predict)
    out = tmp_path / "run"
    res = train("baseline", tiny_cifar, out, 3, "--eval-every", 2, "--no-tta-table")
    assert len(evaluated) == 2 + 1  # epochs 2 and 3, then the final TTA's flipped view (epoch 3's is reused)
    rows, reference = read_metrics(out / "metrics.csv"), read_metrics(base3[0] / "metrics.csv")
    assert rows[0]["test_acc"] == "nan" and rows[0]["test_loss"] == "nan"
    assert [r["test_acc"] for r in rows[1:]] == [r["test_acc"] for r in reference[1:]]
    header, lines = epoch_log(res.out)
    assert lines[0].split()[3:5] == ["-", "-"] and field_ends(lines[0]) == field_ends(header)
    assert res.summary["best_acc"] == max(float(r["test_acc"]) for r in rows[1:])
    best = load(out / "best.pt")
    assert best["epoch"] in (2, 3) and best["best_acc"] == res.summary["best_acc"]
    assert_same(load(out / "last.pt")["model"], load(base3[0] / "last.pt")["model"], "model")


def test_eval_every_zero_is_refused(tiny_cifar, tmp_path):
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path, "--eval-every", 0])
    assert res.code == 2
    assert_one_error_line(res.err, "--eval-every 0", "out of range")  # the range check, not an unknown flag


def test_tta_table_off_reports_only_none_and_headline(tiny_cifar, tmp_path, base3):
    """--no-tta-table evaluates just 'none' and the --tta mode, and their figures equal the full table's."""
    res = train("baseline", tiny_cifar, tmp_path / "t", 3, "--no-tta-table", "--tta", "flip_rot90")
    assert set(res.summary["tta_table"]) == {"none", "flip_rot90"}
    full = base3[1].summary["tta_table"]  # same seed and flags, full table
    for mode in ("none", "flip_rot90"):
        assert res.summary["tta_table"][mode]["test_acc"] == pytest.approx(full[mode]["test_acc"])
    assert res.summary["test_acc_tta"] == res.summary["tta_table"]["flip_rot90"]["test_acc"]


def test_signal_during_epoch_evaluation_stops_after_saving_that_epoch(tiny_cifar, tmp_path, monkeypatch):
    """SIGTERM while the epoch is being evaluated: the epoch is still saved, then the run stops with 143."""
    predict, sent = mnv4.evaluation.predict_probs, []

    def predict_and_signal(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return predict(*args, **kwargs)

    monkeypatch.setattr(mnv4.evaluation, "predict_probs", predict_and_signal)
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "r", "--epochs", 3])
    assert res.code == 143, res.err
    assert "stopped after epoch 1" in res.err and "--resume" in res.err
    ckpt = load(tmp_path / "r" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 0


def test_signal_during_final_tta_stops_at_once(tiny_cifar, tmp_path, monkeypatch):
    """Training is over and saved: a signal during the TTA table ends the run with 143, last.pt untouched."""
    tta_table = mnv4.evaluation.tta_table

    def signal_then_table(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return tta_table(*args, **kwargs)

    monkeypatch.setattr(mnv4.evaluation, "tta_table", signal_then_table)
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "r", "--epochs", 1])
    assert res.code == 130, res.err
    assert "final evaluation" in res.err
    assert load(tmp_path / "r" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "r" / "summary.json").exists()
