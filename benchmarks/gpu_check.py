"""The GPU check: every device-specific path of both training scripts, run for real, and the default recipes
measured at full budget, in one command that writes everything to one folder.

    python benchmarks/gpu_check.py --data-dir data --output-dir results/gpu-check       # a CUDA machine, < 8 min
    python benchmarks/gpu_check.py --device cpu --tiny --data-dir data --output-dir /tmp/gpu-check   # any machine

Phase 1, correctness (a few at a time; a check passes when its command exits 0 and its run wrote summary.json):
  <script>-amp-{bf16,fp16,off}, <script>-channels-last-{on,off}, <script>-compile, <script>-deterministic
                       both scripts, one short epoch each
  torchrun             the enhanced script under torchrun, one process (nccl on CUDA, gloo on the CPU)
  resume, resume-on-cpu
                       the amp-off run's last.pt continued for a second epoch on the device and on the CPU
  predict, export      predict.py and export.py (onnxruntime comparison included) from that checkpoint
Phase 2, speed (one at a time, nothing else running): benchmarks/model_step.py and benchmarks/throughput.py.
Phase 3, accuracy at full budget: each script's default recipe for 20 epochs, one process per (script, seed), all
  at once on the one device (--architectures adds the enhanced recipe on Conv-S 8x8, Conv-M and MobileNetV2);
  whatever has not finished at the deadline is stopped with SIGTERM, which saves a resumable last.pt.

Writes <output-dir>/report.md and report.json (each command, status, wall time, figures), and every run's folder.
--tiny shrinks every run (64 training images, width 0.25, 2 epochs for phase 3) so the same code runs in the
tests on a CPU.
"""

import argparse
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

SCRIPTS = ("baseline", "enhanced")
ARCHITECTURES = {
    "conv_s_8x8": ["--output-stride", "4"],
    "conv_m_w1.0": ["--variant", "conv_medium", "--width-mult", "1.0"],
    "mobilenetv2": ["--variant", "mobilenetv2"],
}


@dataclass
class Check:
    """One command line and what became of it."""

    name: str
    argv: list
    phase: str
    run_dir: str | None = None  # a training run's folder: its summary.json and metrics.csv give the figures
    status: str = "pending"  # pending | ok | failed | timeout | stopped (phase 3's deadline) | skipped
    returncode: int | None = None
    wall_s: float | None = None
    figures: dict = field(default_factory=dict)
    log: str | None = None

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def python(script: str, *argv) -> list:
    return [sys.executable, str(ROOT / script), *map(str, argv)]


def plan(args) -> list[Check]:
    out, data = Path(args.output_dir), ["--data-dir", args.data_dir, "--no-download"]
    size = (
        ["--max-train-samples", "64", "--max-test-samples", "32", "--width-mult", "0.25", "-b", "16"]
        if args.tiny
        else ["--max-train-samples", "10000", "--max-test-samples", "2000"]
    )

    def short(device=args.device, epochs=1):
        return [*data, *size, "--device", device, "--epochs", epochs, "--no-tta-table"]

    variants = {
        "amp-bf16": ["--amp", "bf16"],
        "amp-fp16": ["--amp", "fp16"],
        "amp-off": ["--amp", "off"],
        "channels-last-on": ["--channels-last"],
        "channels-last-off": ["--no-channels-last"],
        "compile": ["--compile"],
        "deterministic": ["--deterministic"],
    }
    checks = []
    for script in SCRIPTS:
        for name, flags in variants.items():
            run_dir = out / f"{script}-{name}"
            checks.append(
                Check(
                    f"{script}-{name}",
                    python(f"mobilenetv4_{script}.py", *short(), *flags, "--output-dir", run_dir),
                    "correctness",
                    str(run_dir),
                )
            )
    torchrun_dir = out / "torchrun"
    checks.append(
        Check(
            "torchrun",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "1",
                str(ROOT / "mobilenetv4_enhanced.py"),
                *map(str, short()),
                "--output-dir",
                str(torchrun_dir),
            ],
            "correctness",
            str(torchrun_dir),
        )
    )
    trained = out / "enhanced-amp-off" / "last.pt"
    for name, device in (("resume", args.device), ("resume-on-cpu", "cpu")):
        run_dir = out / name
        checks.append(
            Check(
                name,
                python(
                    "mobilenetv4_enhanced.py",
                    *short(device, epochs=2),
                    "--amp",
                    "off",
                    "--resume",
                    trained,
                    "--output-dir",
                    run_dir,
                ),
                "after-training",
                str(run_dir),
            )
        )
    checks.append(
        Check(
            "predict",
            python("predict.py", "--checkpoint", trained, "--device", args.device, "--tta", "flip", out / "images"),
            "after-training",
        )
    )
    checks.append(
        Check(
            "export",
            python(
                "export.py",
                "--checkpoint",
                trained,
                "--output",
                out / "model.onnx",
                "--data-dir",
                args.data_dir,
                "--num-images",
                "64",
            ),
            "after-training",
        )
    )
    quick = ["--quick"] if args.tiny else []
    checks.append(
        Check(
            "model-step",
            python(
                "benchmarks/model_step.py",
                "--device",
                args.device,
                *(["--steps", "2", "-b", "16"] if args.tiny else []),
                "--json",
                out / "model-step.json",
            ),
            "speed",
        )
    )
    checks.append(
        Check(
            "throughput",
            python(
                "benchmarks/throughput.py",
                *quick,
                "--device",
                args.device,
                "--data-dir",
                args.data_dir,
                "--json",
                out / "throughput.json",
            ),
            "speed",
        )
    )
    full = [*data, "--device", args.device, *(size + ["--epochs", "2"] if args.tiny else [])]
    configs = [(script, []) for script in SCRIPTS]
    configs += [(f"enhanced-{name}", flags) for name, flags in ARCHITECTURES.items()] if args.architectures else []
    for config, flags in configs:
        script = config.split("-")[0]
        for seed in args.seeds:
            run_dir = out / f"full-{config}-seed{seed}"
            checks.append(
                Check(
                    f"full-{config}-seed{seed}",
                    python(f"mobilenetv4_{script}.py", *full, *flags, "--seed", seed, "--output-dir", run_dir),
                    "accuracy",
                    str(run_dir),
                )
            )
    return [c for c in checks if not any(c.name == s or c.name.endswith(f"-{s}") for s in args.skip)]


def write_test_images(data_dir: str, folder: Path, n: int = 8):
    """The first n CIFAR-10 test images as PNG files, for predict.py."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    data = common.load_cifar10(data_dir, download=False)
    for i, (image, label) in enumerate(zip(data.test_images[:n], data.test_labels[:n].tolist())):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}-{common.CIFAR10_CLASSES[label]}.png")


def read_figures(check: Check) -> dict:
    """Final accuracy, TTA accuracy, epochs and images/s from a run's own files."""
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
    rows = metrics_rows(run_dir / "metrics.csv")
    if rows:
        speeds = sorted(float(r["img_per_s"]) for r in rows[1:] or rows)  # epoch 1 holds warm-up and compilation
        figures.update(
            epochs_done=len(rows), img_per_s=round(speeds[len(speeds) // 2], 1), last_test_acc=rows[-1]["test_acc"]
        )
    return figures


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def metrics_rows(path: Path) -> list:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def start(check: Check, logs: Path) -> subprocess.Popen:
    check.log = str(logs / f"{check.name}.log")
    log = open(check.log, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    check.wall_s = time.perf_counter()
    return subprocess.Popen(check.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(check: Check, proc: subprocess.Popen, stopped: bool = False):
    check.returncode = proc.returncode
    check.wall_s = round(time.perf_counter() - check.wall_s, 1)
    ran = proc.returncode == 0 and (check.run_dir is None or (Path(check.run_dir) / "summary.json").is_file())
    check.status = "ok" if ran else "stopped" if stopped else "failed"
    check.figures = read_figures(check)


def run_one(check: Check, logs: Path, timeout: float):
    proc = start(check, logs)
    try:
        proc.wait(timeout=timeout)
        finish(check, proc)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finish(check, proc)
        check.status = "timeout"


def run_until(checks: list, logs: Path, deadline_s: float):
    """Start every check at once; at the deadline send SIGTERM (the scripts save last.pt) and wait for them."""
    procs = [(check, start(check, logs)) for check in checks]
    end = time.monotonic() + deadline_s
    for _, proc in procs:
        try:
            proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    stopped = [proc for _, proc in procs if proc.poll() is None]
    for proc in stopped:
        os.killpg(proc.pid, signal.SIGTERM)
    for check, proc in procs:
        proc.wait()
        finish(check, proc, stopped=proc in stopped)


def report(checks: list, args, out: Path, provenance: dict):
    lines = [
        f"# GPU check on {args.device}{' (tiny)' if args.tiny else ''}",
        "",
        "| check | phase | status | wall s | figures | command |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        figures = ", ".join(f"{k} {v}" for k, v in c.figures.items())
        lines.append(f"| {c.name} | {c.phase} | {c.status} | {c.wall_s} | {figures} | `{c.command}` |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(
        json.dumps(
            {"provenance": provenance, "args": vars(args), "checks": [asdict(c) for c in checks]}, indent=2, default=str
        )
    )
    print("\n".join(lines))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=common.DEVICES)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny runs: the same code paths in seconds, on any device")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="phase 3's seeds")
    parser.add_argument(
        "--architectures",
        action="store_true",
        help="phase 3 also trains the enhanced recipe on Conv-S 8x8, Conv-M and MobileNetV2",
    )
    parser.add_argument("--jobs", type=int, default=4, help="phase 1 checks run at a time")
    parser.add_argument("--check-timeout-s", type=float, default=300, help="limit for each phase 1 and 2 command")
    parser.add_argument("--full-budget-s", type=float, default=270, help="phase 3's deadline")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="NAME",
        help="checks to leave out, by name or suffix (e.g. compile, throughput)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    checks = plan(args)
    # Read when the checks start: the code checked is what was loaded then, whatever changes meanwhile.
    provenance = common.provenance(common.select_device(args.device))
    write_test_images(args.data_dir, out / "images")
    by_phase = {
        phase: [c for c in checks if c.phase == phase]
        for phase in ("correctness", "after-training", "speed", "accuracy")
    }
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda c: run_one(c, logs, args.check_timeout_s), by_phase["correctness"]))
        list(pool.map(lambda c: run_one(c, logs, args.check_timeout_s), by_phase["after-training"]))
    for check in by_phase["speed"]:
        run_one(check, logs, args.check_timeout_s)
    run_until(by_phase["accuracy"], logs, args.full_budget_s)
    report(checks, args, out, provenance)
    failed = [c.name for c in checks if c.status in ("failed", "timeout")]
    if failed:
        print(f"failed: {' '.join(failed)} (logs in {logs})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
