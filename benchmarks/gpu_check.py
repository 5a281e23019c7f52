"""The GPU check: every device-specific path of both training scripts, run for real, and the default recipes at
full budget, in one command that prepares its own data and writes everything under one folder.

    python benchmarks/gpu_check.py --output-dir results/gpu-check                     # one CUDA GPU, <= 6 min
    python benchmarks/gpu_check.py --cifar-archive cifar-10-python.tar.gz --output-dir results/gpu-check
    python benchmarks/gpu_check.py --device cpu --tiny --data-dir data --output-dir /tmp/gpu-check   # any machine

Phases, in order; each has a budget (seconds, --budget PHASE=S), and what has not finished when its phase's budget
is spent is stopped. The default budgets add up to 360 s (540 s with --architectures; --tiny: 600 s a phase):
  data            CIFAR-10 from --data-dir if it holds cifar-10-batches-py, else built in <output-dir>/data from
                  --cifar-archive (the official cifar-10-python.tar.gz) or by --cifar-builder (a script that takes
                  the output folder); eight test images as PNG files for predict.py
  correctness     one short epoch each, --jobs at a time: both scripts' defaults (AMP auto, channels_last), fp16
                  (loss scaling) in both, fp32, contiguous layout, --deterministic, --compile, colour jitter with
                  cutout, --recipe notebook with --model-ema; one epoch under torch.cuda.set_sync_debug_mode("warn")
                  counting the synchronising calls; torchrun with two ranks over gloo on the CPU (a real process
                  group; nccl needs two GPUs and is not exercised)
  after-training  the fp32 run's last.pt resumed for a second epoch on the device and on the CPU; predict.py and
                  export.py (onnxruntime comparison included) from it
  speed           benchmarks/model_step.py (and benchmarks/throughput.py with --throughput, which adds its budget)
  accuracy        each default recipe for its 20 epochs, one process per (script, seed), all at once; only the runs
                  that the short runs' speed says can finish within the budget are started (the others are
                  reported as skipped, with the estimate)
report.md and report.json are rewritten after every check and every phase, so a check that is killed leaves the
report so far. --tiny shrinks every run (64 training images, width 0.25, 2 epochs for the accuracy phase) so the
same code runs in the tests on a CPU.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpu_plan import (  # noqa: E402
    ARCHITECTURES_S,
    THROUGHPUT_S,
    Check,
    Phase,
    budgets,
    choose_runs,
    data_folder,
    metrics_rows,
    plan,
    read_json,
)

import common  # noqa: E402

# Where a workspace keeps its offline CIFAR-10 builder: beside the work tree, or inside a copy of it.
BUILDERS = (ROOT.parent / "shared" / "data" / "make_cifar10.py", ROOT / "shared" / "data" / "make_cifar10.py")
NOTES = [
    "nccl is not exercised: the torchrun check runs two ranks over gloo on the CPU (a real process group); nccl "
    "needs two GPUs.",
    "sync-debug counts the calls torch.cuda.set_sync_debug_mode('warn') reports in one epoch and its evaluation.",
]


def prepare_data(args, timeout_s: float) -> dict:
    """Make data_folder(args) hold CIFAR-10 (see the module docstring); returns the figures of how."""
    folder = data_folder(args)
    if (folder / "cifar-10-batches-py").is_dir():
        source = str(folder)
    elif args.cifar_archive:
        from torchvision.datasets.utils import extract_archive

        folder.mkdir(parents=True, exist_ok=True)
        extract_archive(args.cifar_archive, str(folder))
        source = args.cifar_archive
    elif args.cifar_builder and Path(args.cifar_builder).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, args.cifar_builder, str(folder)], check=True, timeout=timeout_s)
        source = args.cifar_builder
    else:
        raise RuntimeError(
            f"no CIFAR-10: --data-dir {args.data_dir} has no cifar-10-batches-py/, and neither --cifar-archive "
            f"nor --cifar-builder ({args.cifar_builder}) was found"
        )
    write_test_images(str(folder), Path(args.output_dir) / "images")
    return {"data": str(folder), "from": source}


def write_test_images(data_dir: str, folder: Path, n: int = 8):
    """The first n CIFAR-10 test images as PNG files, for predict.py."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    data = common.load_cifar10(data_dir, download=False)
    for i, (image, label) in enumerate(zip(data.test_images[:n], data.test_labels[:n].tolist())):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}-{common.CIFAR10_CLASSES[label]}.png")


def read_figures(check: Check) -> dict:
    """Final accuracy, TTA accuracy, epochs, images/s and precision from a run's own files; the sync count."""
    if check.run_dir is None:
        return {}
    run_dir = Path(check.run_dir)
    figures = {}
    summary = read_json(run_dir / "summary.json")
    if summary:
        figures.update(
            test_acc=summary["test_acc"],
            test_acc_tta=summary["test_acc_tta"],
            tta=summary["tta"],
            epochs=summary["epochs_completed"],
            train_time_s=round(summary["train_time_s"], 1),
            amp=summary["config"]["amp"],
            channels_last=summary["config"]["channels_last"],
        )
        figures.update({"world_size": summary["world_size"]} if "world_size" in summary else {})
    rows = metrics_rows(run_dir / "metrics.csv")
    if rows:
        speeds = sorted(float(r["img_per_s"]) for r in rows[1:] or rows)  # epoch 1 holds warm-up and compilation
        figures.update(
            epochs_done=len(rows), img_per_s=round(speeds[len(speeds) // 2], 1), last_test_acc=rows[-1]["test_acc"]
        )
    figures.update(read_json(run_dir / "syncs.json") or {})
    return figures


class Checker:
    """Runs the plan phase by phase within their budgets, rewriting the report after every check."""

    def __init__(self, args, checks: list, phases: list, out: Path):
        self.args, self.checks, self.phases, self.out = args, checks, phases, out
        self.logs = out / "logs"
        self.provenance = None
        self.data = None  # where the data came from (or why there is none): the data phase's result
        self.running = {}  # check name -> its process
        self.lock = threading.RLock()  # the signal handler runs on the main thread, which may hold it
        self.interrupted = False

    def start(self, check: Check) -> subprocess.Popen:
        check.log = str(self.logs / f"{check.name}.log")
        log = open(check.log, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        check.wall_s, check.status = time.perf_counter(), "running"
        proc = subprocess.Popen(
            check.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        with self.lock:
            self.running[check.name] = proc
        return proc

    def finish(self, check: Check, proc: subprocess.Popen, cut: str | None = None):
        with self.lock:
            self.running.pop(check.name, None)
        check.returncode = proc.returncode
        check.wall_s = round(time.perf_counter() - check.wall_s, 1)
        ran = proc.returncode == 0 and (check.run_dir is None or (Path(check.run_dir) / "summary.json").is_file())
        check.status = "interrupted" if self.interrupted else "ok" if ran else cut or "failed"
        check.figures.update(read_figures(check))
        self.report()

    def run_one(self, check: Check, deadline: float):
        left = deadline - time.monotonic()
        if self.interrupted or left <= 0:
            check.status = "interrupted" if self.interrupted else "skipped"
            check.figures.setdefault("reason", "the phase's budget was spent before it started")
            return
        proc = self.start(check)
        try:
            proc.wait(timeout=left)
            self.finish(check, proc)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.finish(check, proc, cut="timeout")

    def run_together(self, checks: list, deadline: float):
        """Start every check at once; at the deadline SIGTERM (the scripts save a resumable last.pt)."""
        procs = [(check, self.start(check)) for check in checks]
        for _, proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        stopped = [proc for _, proc in procs if proc.poll() is None]
        for proc in stopped:
            os.killpg(proc.pid, signal.SIGTERM)
        for check, proc in procs:
            proc.wait()
            self.finish(check, proc, cut="stopped" if proc in stopped else None)

    def run_phase(self, phase: Phase):
        phase.status, started = "running", time.monotonic()
        self.report()
        deadline = started + phase.budget_s
        checks = [c for c in self.checks if c.phase == phase.name]
        if phase.name == "data":
            self.prepare(phase)
        elif phase.name == "accuracy":
            choose_runs(checks, self.checks, phase.budget_s)
            self.run_together([c for c in checks if c.status == "pending"], deadline)
        else:
            jobs = self.args.jobs if phase.name != "speed" else 1  # speed: nothing else running
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(lambda c: self.run_one(c, deadline), checks))
        phase.wall_s = round(time.monotonic() - started, 1)
        phase.status = "interrupted" if self.interrupted else "done"
        self.report()

    def prepare(self, phase: Phase):
        try:
            self.data = prepare_data(self.args, phase.budget_s)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.data = {"error": str(exc)}
            for check in self.checks:
                check.status, check.figures["reason"] = "skipped", "no data"

    def interrupt(self, signum, frame):
        """SIGINT / SIGTERM: stop every running check; the report keeps what finished."""
        self.interrupted = True
        with self.lock:
            for proc in self.running.values():
                os.killpg(proc.pid, signal.SIGKILL)

    def report(self):
        with self.lock:
            write_report(self)


def write_report(checker: Checker):
    args, out = checker.args, checker.out
    total = sum(p.budget_s for p in checker.phases)
    lines = [
        f"# GPU check on {args.device}{' (tiny)' if args.tiny else ''}",
        "",
        f"Budget: {total:.0f} s in all. {' '.join(NOTES)}",
        "",
        "| phase | budget s | status | wall s |",
        "|---|---|---|---|",
        *(f"| {p.name} | {p.budget_s:.0f} | {p.status} | {p.wall_s} |" for p in checker.phases),
        "",
        "| check | phase | status | wall s | figures | command |",
        "|---|---|---|---|---|---|",
    ]
    for c in checker.checks:
        figures = ", ".join(f"{k} {v}" for k, v in c.figures.items())
        lines.append(f"| {c.name} | {c.phase} | {c.status} | {c.wall_s} | {figures} | `{c.command}` |")
    report = {
        "provenance": checker.provenance,
        "args": vars(args),
        "budget_s": total,
        "notes": NOTES,
        "data": checker.data,
        "phases": [asdict(p) for p in checker.phases],
        "checks": [asdict(c) for c in checker.checks],
    }
    for name, text in (("report.md", "\n".join(lines) + "\n"), ("report.json", json.dumps(report, indent=2))):
        (out / f".{name}").write_text(text)
        os.replace(out / f".{name}", out / name)  # whole or not at all, whenever the check is killed


def count_syncs(argv) -> int:
    """`count-syncs JSON SCRIPT ARGS...`: one run of mobilenetv4_SCRIPT.py in this process; on CUDA under
    torch.cuda.set_sync_debug_mode("warn"), which warns at every synchronising call. Writes the count and the
    calls' most frequent places to JSON."""
    import collections
    import importlib
    import warnings

    import torch

    path, script, rest = Path(argv[0]), argv[1], argv[2:]
    module = importlib.import_module(f"mobilenetv4_{script}")
    device = rest[rest.index("--device") + 1] if "--device" in rest else "auto"
    on_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if on_cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            module.main(rest)
        finally:
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    places = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    path.parent.mkdir(parents=True, exist_ok=True)
    counted = {"syncs": len(syncs) if on_cuda else "n/a (CUDA only)", "sync_places": dict(places.most_common(5))}
    path.write_text(json.dumps(counted))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=common.DEVICES)
    parser.add_argument("--data-dir", default="data", help="a folder holding cifar-10-batches-py/, if prepared")
    parser.add_argument("--cifar-archive", help="the official cifar-10-python.tar.gz, extracted into OUTPUT/data")
    parser.add_argument(
        "--cifar-builder",
        default=str(next((p for p in BUILDERS if p.is_file()), BUILDERS[0])),
        help="a script that writes cifar-10-batches-py/ into the folder it is given (used when present)",
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny runs: the same code paths in seconds, on any device")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the accuracy phase's seeds")
    parser.add_argument(
        "--architectures",
        action="store_true",
        help=f"also Conv-S 8x8, Conv-M and MobileNetV2 (short runs and 20 epochs; {ARCHITECTURES_S} s more)",
    )
    parser.add_argument("--throughput", action="store_true", help=f"also benchmarks/throughput.py ({THROUGHPUT_S} s)")
    parser.add_argument("--jobs", type=int, default=4, help="correctness and after-training checks run at a time")
    parser.add_argument("--budget", nargs="*", default=[], metavar="PHASE=S", help="a phase's budget in seconds")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="NAME",
        help="checks to leave out, by name or suffix (e.g. compile, model-step)",
    )
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["count-syncs"]:
        return count_syncs(argv[1:])
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    phases = [Phase(name, seconds) for name, seconds in budgets(args).items()]
    checker = Checker(args, plan(args), phases, out)
    # Read when the checks start: the code checked is what was loaded then, whatever changes meanwhile.
    checker.provenance = common.provenance(common.select_device(args.device))
    previous = {s: signal.signal(s, checker.interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for phase in phases:
            if not checker.interrupted:
                checker.run_phase(phase)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    checker.report()
    print((out / "report.md").read_text())
    if checker.interrupted:
        return 128 + signal.SIGTERM
    failed = [c.name for c in checker.checks if c.status in ("failed", "timeout")]
    if "error" in (checker.data or {}):
        failed.insert(0, "data")
    if failed:
        print(f"failed: {' '.join(failed)} (logs in {out / 'logs'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
