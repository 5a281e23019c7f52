"""Running the plan: one process per run, its console output in the run's train.log; Ctrl-C or SIGTERM goes to
the run in progress, which saves last.pt, and the study stops after it (the same command resumes it)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .plan import ROOT, Job, read_json

STOP_CODES = (130, 143)  # a run's exit on SIGINT / SIGTERM: it saved last.pt, and the whole ablation stops


class Stopped(Exception):
    """The ablation stops (a signal, or a run that stopped on one); `code` is its exit status."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class Supervisor:
    """Runs one child process at a time. SIGINT / SIGTERM received meanwhile go to the child, which saves
    last.pt and exits 130 / 143 (a second one makes it quit at once, as in a terminal); the ablation stops after
    it. The child has its own process group, so a terminal's Ctrl-C reaches it once, through here, not twice.
    A signal between runs stops the ablation at once. Use as a context manager (installs the handlers)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.child, self.starting, self.forwarded, self.signum = None, False, False, None
        self._old = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self._old[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        return False

    def _on_signal(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
            if not self.forwarded:
                print(
                    f"\n{signal.Signals(signum).name}: passed to the run, which saves last.pt and stops; the "
                    "ablation stops after it",
                    file=sys.stderr,
                    flush=True,
                )
            self.forwarded = True
        elif not self.starting:  # no run in progress (or it is just ending): stop now
            raise Stopped(128 + signum)

    def run(self, argv, log, cwd) -> int:
        """Run argv to its end, its output into the open file `log`; returns its exit status (128 + N for a
        process ended by signal N)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log follows the run, line by line
        self.starting, self.forwarded = True, False
        try:
            self.child = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=os.name == "posix",
            )
        finally:
            self.starting = False
        try:
            if self.signum is not None and not self.forwarded:  # it arrived while the process was starting
                self.child.send_signal(self.signum)
                self.forwarded = True
            code = self.child.wait()
        finally:
            self.child = None
        return 128 - code if code < 0 else code


def last_error_line(path: Path, offset: int) -> str:
    """The last line of a run's log (from `offset`: this attempt's part) that names an error, else its last line:
    the one-line reason a failed run gets in the table."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "no log"
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    for line in reversed(lines):
        if re.search(r"error|exception|killed", line, re.IGNORECASE):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def execute(job: Job, supervisor: Supervisor) -> int:
    """Run one job as a process of its own; read its result from its summary.json. A failure is recorded and
    the ablation goes on; a run stopped by SIGINT / SIGTERM (it saved last.pt) stays pending and stops it."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    argv = job.process_argv()
    t0 = time.perf_counter()
    with open(job.log_path, "ab") as log:
        offset = log.tell()
        log.write(f"\n==> {time.strftime('%Y-%m-%dT%H:%M:%S%z')} (cwd {ROOT}): {shlex.join(argv)}\n".encode())
        log.flush()
        code = supervisor.run(argv, log, ROOT)
    job.wall_s = time.perf_counter() - t0
    if code == 0:
        summary = read_json(job.run_dir / "summary.json")
        if isinstance(summary, dict) and "test_acc" in summary and summary.get("epochs_completed") == job.epochs:
            job.status, job.summary = "ok", summary
        else:
            job.status, job.error = "failed", "exit 0 without a complete summary.json"
    elif code in STOP_CODES:
        job.error = f"stopped ({signal.Signals(code - 128).name}); resumes from its last.pt"
    else:
        job.status, job.error = "failed", f"exit {code}: {last_error_line(job.log_path, offset)}"
    return code


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def eta_text(jobs, index) -> str:
    """Mean wall time of the runs executed so far (finished-before runs excluded) times the runs still to go."""
    timed = [j.wall_s for j in jobs[:index] if j.action != "done" and j.wall_s is not None]
    to_go = sum(j.action != "done" for j in jobs[index:])
    if not timed:
        return "ETA: after the first run"
    mean = sum(timed) / len(timed)
    return f"ETA {fmt_duration(mean * to_go)} ({to_go} to go, {fmt_duration(mean)} per run)"


def progress(job: Job, index: int, total: int, text: str):
    print(f"[ablation {index + 1}/{total}] {job.config.label} | seed {job.seed} | {text}", flush=True)


def run_all(jobs, write, supervisor: Supervisor):
    """Run the plan in order, reporting after every run so the table is never older than the last run."""
    total = len(jobs)
    for i, job in enumerate(jobs):
        if job.action == "done":
            note = f"; {job.note}" if job.note else ""
            progress(job, i, total, f"finished before: {job.summary['test_acc']:.2f}% (read summary.json){note}")
            continue
        progress(job, i, total, f"{job.action} | {eta_text(jobs, i)}\n  {job.command()}\n  log: {job.log_path}")
        code = execute(job, supervisor)
        result = (
            f"{job.summary['test_acc']:.2f}%"
            if job.status == "ok"
            else f"FAILED ({job.error})"
            if job.status == "failed"
            else job.error
        )
        progress(job, i, total, f"{result} in {fmt_duration(job.wall_s)}")
        write()
        if code in STOP_CODES:
            raise Stopped(code)
        if supervisor.signum is not None:  # the run ended anyway (finished, or failed) after a signal
            raise Stopped(128 + supervisor.signum)
