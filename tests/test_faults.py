"""Signals and faults: SIGINT / SIGTERM mid-epoch and during evaluation, a second signal, kill -9, a crash
between checkpoint writes, failed saves, a full disk, a NaN loss; each run resumes where it stopped."""

import errno
import io
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import common
import mnv4.checkpoint
import mnv4.evaluation
import mnv4.provenance
import mnv4.run
from helpers import (
    ENH_EXTRA,
    MD5_WARNING,
    ROOT,
    STEPS_PER_EPOCH,
    TINY,
    _Crash,
    assert_one_error_line,
    assert_same_run,
    cli_command,
    cli_env,
    load,
    nan_criterion_at,
    no_temp_files,
    read_metrics,
    run_cli,
    run_main,
    wait_for,
)

pytestmark = pytest.mark.filterwarnings(f"ignore:{MD5_WARNING}")


def test_sigint_mid_epoch_then_resume(wrapper, tiny_cifar, enh2, tmp_path):
    out = tmp_path / "run"
    k = STEPS_PER_EPOCH + 2  # epoch 2, after its 2nd step
    proc = run_cli(
        "enhanced",
        [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2, "--deterministic", *ENH_EXTRA],
        wrapper=wrapper,
        MNV4_SIGNAL_AT=k,
    )
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "stopped after epoch 2 step 2" in proc.stderr and str(out / "last.pt") in proc.stderr
    assert f"--resume {out / 'last.pt'}" in proc.stderr
    ckpt = load(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2) and ckpt["partial"]["seen"] == 2 * 16
    assert len(ckpt["history"]) == 1
    assert not no_temp_files(out)

    res = run_main(
        "enhanced",
        [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--deterministic", *ENH_EXTRA, "--resume", out / "last.pt"],
    )
    assert res.code == 0, res.err
    assert f"resumed from {out / 'last.pt'}: epoch 2, step 2" in res.out
    assert_same_run(out, enh2[0], res.summary, enh2[1].summary)


def test_external_sigterm_mid_epoch_then_resume(wrapper, tiny_cifar, enh2, tmp_path):
    """A scheduler's SIGTERM from outside, at whatever point of epoch 2 it lands: exit 143, resumable."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli_command(
            "enhanced",
            [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2, "--deterministic", *ENH_EXTRA],
            wrapper,
        ),
        cwd=ROOT,
        env=cli_env(MNV4_SLEEP_FROM_EPOCH=1, MNV4_SLEEP_S=0.3),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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

    res = run_main(
        "enhanced",
        [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--deterministic", *ENH_EXTRA, "--resume", out / "last.pt"],
    )
    assert res.code == 0, res.err
    assert f"epoch 2, step {ckpt['step']}" in res.out
    assert_same_run(out, enh2[0], res.summary, enh2[1].summary)


def test_second_signal_exits_at_once(wrapper, tiny_cifar, tmp_path):
    """Two Ctrl-C: leave immediately (130) without saving; the previous epoch's last.pt stays valid."""
    out = tmp_path / "run"
    proc = run_cli(
        "baseline",
        [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2],
        wrapper=wrapper,
        MNV4_SIGNAL_AT=STEPS_PER_EPOCH + 2,
        MNV4_SIGNAL_COUNT=2,
    )
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "saved" not in proc.stderr
    ckpt = load(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)


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


def test_kill9_then_resume(wrapper, tiny_cifar, base3, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli_command(
            "baseline",
            [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 3, "--deterministic"],
            wrapper,
        ),
        cwd=ROOT,
        env=cli_env(MNV4_SLEEP_FROM_EPOCH=1, MNV4_SLEEP_S=0.3),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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

    res = run_main(
        "baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 3, "--deterministic", "--resume", out / "last.pt"]
    )
    assert res.code == 0, res.err
    assert f"resumed from {out / 'last.pt'}: epoch {done + 1}, step 0" in res.out
    assert res.summary["epochs_completed"] == 3
    assert len(load(out / "last.pt")["history"]) == 3 and len(read_metrics(out / "metrics.csv")) == 3
    assert_same_run(out, base3[0], res.summary, base3[1].summary)


@pytest.mark.parametrize("dies_after", [1, 2, 3])
def test_crash_between_checkpoint_writes(dies_after, base3, tiny_cifar, tmp_path, monkeypatch):
    """Die right after the n-th checkpoint file of a 3-epoch run is in place (epoch 1 writes best.pt, then last.pt;
    epoch 2 starts with whichever it writes first): what is on disk is consistent (a last.pt recording a best
    accuracy comes with a best.pt at least that good), and a resume from last.pt ends where 3 epochs straight do."""
    out = tmp_path / "run"
    save, written = common.save_checkpoint, []

    def save_then_die(path, state):
        save(path, state)
        written.append(Path(path).name)
        if len(written) == dies_after:
            raise _Crash

    monkeypatch.setattr(mnv4.checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(_Crash):
        run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 3, "--deterministic"])
    monkeypatch.undo()
    assert written[:2] == ["best.pt", "last.pt"][:dies_after]
    if dies_after == 1:
        assert not (out / "last.pt").exists()  # nothing to resume: the run starts again
        return
    last = load(out / "last.pt")
    assert last["epoch"] == written.count("last.pt"), written
    assert max(r["test_acc"] for r in load(out / "best.pt")["history"]) >= last["best_acc"]
    res = run_main(
        "baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 3, "--deterministic", "--resume", out / "last.pt"]
    )
    assert res.code == 0, res.err
    assert "resumed from" in res.out
    assert_same_run(out, base3[0], res.summary, base3[1].summary)


def test_failed_save_keeps_previous_checkpoint(base1, tiny_cifar, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(base1[0], out)
    before = (out / "last.pt").read_bytes()
    real_save = torch.save

    def half_then_enospc(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", half_then_enospc)
    res = run_main(
        "baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--deterministic", "--resume", out / "last.pt"]
    )
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


def test_nan_loss_at_an_epochs_first_step_stops_too(tiny_cifar, tmp_path, monkeypatch):
    """Step 1 of epoch 2 is the meter's slot 0: a NaN there stops the run as one anywhere else does."""
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", nan_criterion_at(STEPS_PER_EPOCH + 1))
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "run", "--epochs", 2])
    monkeypatch.undo()
    assert res.code == 3, res.err
    assert_one_error_line(res.err, "epoch 2, step 1")


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_skip_nonfinite_completes(script, tiny_cifar, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", nan_criterion_at(STEPS_PER_EPOCH + 3))
    steps = []  # every optimizer step taken: all but the NaN one
    hook = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        res = run_main(
            script, [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2, "--skip-nonfinite"]
        )
    finally:
        hook.remove()
    monkeypatch.undo()
    assert res.code == 0, res.err
    assert res.summary["epochs_completed"] == 2 and len(steps) == 2 * STEPS_PER_EPOCH - 1
    assert [int(r["skipped_steps"]) for r in read_metrics(out / "metrics.csv")] == [0, 1]
    ckpt = load(out / "last.pt")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_kill_between_checkpoint_and_log_never_leaves_a_logged_epoch_without_checkpoint(
    tiny_cifar, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    save = common.save_checkpoint

    def die_at_epoch_2(path, state):
        if state["epoch"] == 2:
            raise _Crash  # the process dies while saving epoch 2
        save(path, state)

    monkeypatch.setattr(mnv4.checkpoint, "save_checkpoint", die_at_epoch_2)
    with pytest.raises(_Crash):
        run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 3])
    assert load(out / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == ["1"]
