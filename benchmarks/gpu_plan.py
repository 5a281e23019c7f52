"""The GPU check's plan: its checks and phases with their budgets, where it reads the data, and which 20-epoch runs
can finish in the accuracy phase's budget (benchmarks/gpu_check.py runs the plan and writes the report)."""

import csv
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = ("baseline", "enhanced")
PHASES = ("data", "correctness", "after-training", "speed", "accuracy")
BUDGETS_S = {"data": 40, "correctness": 110, "after-training": 40, "speed": 20, "accuracy": 150}
ARCHITECTURES_S = 180  # --architectures: three more 20-epoch runs (and their short runs) in the accuracy phase
THROUGHPUT_S = 300  # --throughput: benchmarks/throughput.py in the speed phase
TINY_S = 600  # --tiny: each phase's budget (a CPU runs the same paths, tiny, far slower than a GPU runs the plan)
ARCHITECTURES = {
    "conv_s_8x8": ["--output-stride", "4"],
    "conv_m_w1.0": ["--variant", "conv_medium", "--width-mult", "1.0"],
    "mobilenetv2": ["--variant", "mobilenetv2"],
}
STARTUP_S = 20  # a training process's start on a GPU machine: imports, CUDA context, data, cuDNN's autotuning


@dataclass
class Check:
    """One command line and what became of it."""

    name: str
    argv: list
    phase: str
    run_dir: str | None = None  # a training run's folder: its summary.json and metrics.csv give the figures
    status: str = "pending"  # pending | ok | failed | timeout | stopped | skipped | interrupted
    returncode: int | None = None
    wall_s: float | None = None
    figures: dict = field(default_factory=dict)
    log: str | None = None
    speed_from: str | None = None  # accuracy runs: the short run whose images/s estimates this run's time
    images: int = 0  # accuracy runs: training images per epoch, times epochs
    epochs: int = 0

    @property
    def command(self) -> str:
        return shlex.join(map(str, self.argv))


@dataclass
class Phase:
    name: str
    budget_s: float
    status: str = "pending"  # pending | running | done | interrupted
    wall_s: float | None = None


def python(script: str, *argv) -> list:
    return [sys.executable, str(ROOT / script), *map(str, argv)]


def budgets(args) -> dict:
    """Each phase's budget: the defaults, the optional parts' additions, then --budget's overrides."""
    result = {name: TINY_S if args.tiny else seconds for name, seconds in BUDGETS_S.items()}
    result["accuracy"] += ARCHITECTURES_S if args.architectures else 0
    result["speed"] += THROUGHPUT_S if args.throughput else 0
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in result:
            raise SystemExit(f"--budget {item}: the phases are {', '.join(PHASES)}")
        result[name] = float(seconds)
    return result


def plan(args) -> list[Check]:
    out, data_dir = Path(args.output_dir), str(data_folder(args))
    data = ["--data-dir", data_dir, "--no-download"]
    train_images, test_images = (64, 32) if args.tiny else (5000, 1000)
    size = ["--max-train-samples", train_images, "--max-test-samples", test_images]
    size += ["--width-mult", "0.25", "-b", "16"] if args.tiny else []

    def short(device=args.device, epochs=1):
        return [*data, *size, "--device", device, "--epochs", epochs, "--no-tta-table"]

    def training(name, script, *flags, phase="correctness", device=args.device, epochs=1):
        run_dir = out / name
        argv = python(f"mobilenetv4_{script}.py", *short(device, epochs), *flags, "--output-dir", run_dir)
        return Check(name, argv, phase, str(run_dir))

    checks = [
        training("baseline-default", "baseline"),
        training("enhanced-default", "enhanced"),
        training("baseline-amp-fp16", "baseline", "--amp", "fp16"),
        training("enhanced-amp-fp16", "enhanced", "--amp", "fp16"),
        training("enhanced-amp-off", "enhanced", "--amp", "off"),
        training("enhanced-contiguous", "enhanced", "--no-channels-last"),
        training("enhanced-deterministic", "enhanced", "--deterministic"),
        training("enhanced-compile", "enhanced", "--compile"),
        training("enhanced-jitter-cutout", "enhanced", "--color-jitter", "0.2", "0.2", "0.2", "0.1", "--cutout", "8"),
        training("enhanced-notebook-ema", "enhanced", "--recipe", "notebook", "--model-ema"),
    ]
    if args.architectures:
        checks += [training(f"enhanced-{name}", "enhanced", *flags) for name, flags in ARCHITECTURES.items()]
    sync_dir = out / "sync-debug"
    checks.append(
        Check(
            "sync-debug",
            python("benchmarks/gpu_check.py", "count-syncs", sync_dir / "syncs.json", "enhanced", *short())
            + ["--output-dir", str(sync_dir)],
            "correctness",
            str(sync_dir),
        )
    )
    torchrun_dir = out / "torchrun-gloo"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cpu_size = ["--max-train-samples", "512", "--max-test-samples", "256", "--width-mult", "0.5", "-b", "32"]
    checks.append(
        Check(
            "torchrun-gloo",
            [*torchrun, str(ROOT / "mobilenetv4_enhanced.py"), *map(str, [*data, *cpu_size, "--device", "cpu"])]
            + ["--epochs", "1", "--no-tta-table", "--output-dir", str(torchrun_dir)],
            "correctness",
            str(torchrun_dir),
        )
    )
    trained = out / "enhanced-amp-off" / "last.pt"
    for name, device in (("resume", args.device), ("resume-on-cpu", "cpu")):
        resume = ["--amp", "off", "--resume", trained]
        checks.append(training(name, "enhanced", *resume, phase="after-training", device=device, epochs=2))
    checks.append(
        Check(
            "predict",
            python("predict.py", "--checkpoint", trained, "--device", args.device, "--tta", "flip", out / "images"),
            "after-training",
        )
    )
    export = ["--checkpoint", trained, "--output", out / "model.onnx", "--data-dir", data_dir, "--num-images", 64]
    checks.append(Check("export", python("export.py", *export), "after-training"))
    step = ["--steps", "2", "-b", "16"] if args.tiny else []
    checks.append(
        Check(
            "model-step",
            python("benchmarks/model_step.py", "--device", args.device, *step, "--json", out / "model-step.json"),
            "speed",
        )
    )
    if args.throughput:
        quick = ["--quick"] if args.tiny else []
        throughput = ["--device", args.device, "--data-dir", data_dir, "--json", out / "throughput.json"]
        checks.append(Check("throughput", python("benchmarks/throughput.py", *quick, *throughput), "speed"))
    full = [*data, "--device", args.device, *([*size, "--epochs", "2"] if args.tiny else [])]
    configs = [(script, script, f"{script}-default", []) for script in SCRIPTS]
    if args.architectures:
        configs += [
            (f"enhanced-{name}", "enhanced", f"enhanced-{name}", flags) for name, flags in ARCHITECTURES.items()
        ]
    for config, script, speed_from, flags in configs:
        for seed in args.seeds:
            run_dir = out / f"full-{config}-seed{seed}"
            argv = python(f"mobilenetv4_{script}.py", *full, *flags, "--seed", seed, "--output-dir", run_dir)
            check = Check(f"full-{config}-seed{seed}", argv, "accuracy", str(run_dir), speed_from=speed_from)
            check.epochs, check.images = (2, train_images) if args.tiny else (20, 50_000)
            checks.append(check)
    return [c for c in checks if not any(c.name == s or c.name.endswith(f"-{s}") for s in args.skip)]


def data_folder(args) -> Path:
    """Where the checks read CIFAR-10: --data-dir when it holds the pickles, else <output-dir>/data (prepared)."""
    given = Path(args.data_dir)
    return given if (given / "cifar-10-batches-py").is_dir() else Path(args.output_dir) / "data"


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


def estimate_s(check: Check, checks: list) -> float | None:
    """An accuracy run's wall time on a device it shares with no one: its images at the speed its short run
    measured (epoch 1 of a short run, warm-up included: an underestimate of the speed), plus start-up and
    evaluation. None without that measurement."""
    short = next((c for c in checks if c.name == check.speed_from and c.status == "ok"), None)
    speed = short and short.figures.get("img_per_s")
    if not speed:
        return None
    return STARTUP_S + 1.2 * check.epochs * check.images / speed


def choose_runs(runs: list, checks: list, budget_s: float):
    """Start only what can finish: the accuracy runs share the device, so their estimated times add up. Runs are
    taken in plan order (the defaults first) while the sum fits; the others are marked skipped with the reason."""
    total = STARTUP_S
    for check in runs:
        estimate = estimate_s(check, checks)
        if estimate is not None and total + estimate - STARTUP_S <= budget_s:
            total += estimate - STARTUP_S
            check.figures["estimate_s"] = round(estimate)
            continue
        check.status = "skipped"
        check.figures["reason"] = (
            f"{check.speed_from} measured no speed"
            if estimate is None
            else f"estimated {estimate:.0f} s, {budget_s - total + STARTUP_S:.0f} s of the budget left"
        )
