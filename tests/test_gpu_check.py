"""The prepared GPU check (benchmarks/gpu_check.py): its plan covers every device path the devices issues name and
fits its six minutes by its own budgets, each phase keeps to its budget, a kill leaves the report so far, and the
whole check runs on the CPU at a tiny budget, so it is known to work before GPU time is spent on it."""

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_plan  # noqa: E402

import mobilenetv4_baseline  # noqa: E402
import mobilenetv4_enhanced  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:CIFAR-10 files")


def names(checks):
    return [c.name for c in checks]


def parse(*argv):
    return gpu_check.build_parser().parse_args(["--output-dir", "out", *argv])


def plan_for(*argv):
    return gpu_plan.plan(parse(*argv))


def test_plan_covers_every_device_path():
    checks = plan_for("--seeds", "0", "1", "--architectures", "--throughput")
    for name in (
        "baseline-default",
        "enhanced-default",
        "baseline-amp-fp16",
        "enhanced-amp-fp16",
        "enhanced-amp-off",
        "enhanced-contiguous",
        "enhanced-deterministic",
        "enhanced-compile",
        "enhanced-jitter-cutout",
        "enhanced-notebook-ema",
        "sync-debug",
        "torchrun-gloo",
        "resume",
        "resume-on-cpu",
        "predict",
        "export",
        "model-step",
        "throughput",
    ):
        assert name in names(checks)
    by_name = {c.name: c for c in checks}
    assert "--compile" in by_name["enhanced-compile"].argv and "--amp" in by_name["baseline-amp-fp16"].argv
    jitter = by_name["enhanced-jitter-cutout"].argv
    assert jitter[jitter.index("--color-jitter") + 4] == "0.1" and "--cutout" in jitter
    assert {"--model-ema", "notebook"} <= set(by_name["enhanced-notebook-ema"].argv)
    assert by_name["resume-on-cpu"].argv[by_name["resume-on-cpu"].argv.index("--device") + 1] == "cpu"
    torchrun = by_name["torchrun-gloo"].argv
    assert "torch.distributed.run" in torchrun and torchrun[torchrun.index("--nproc-per-node") + 1] == "2"
    assert torchrun[torchrun.index("--device") + 1] == "cpu"  # gloo: a real process group of two ranks
    assert "count-syncs" in by_name["sync-debug"].argv
    full = [c for c in checks if c.phase == "accuracy"]
    assert len(full) == (2 + 3) * 2  # both defaults and three architectures, two seeds each
    assert "--epochs" not in by_name["full-enhanced-seed1"].argv  # the recipe's own 20 epochs
    assert "--output-stride" in by_name["full-enhanced-conv_s_8x8-seed0"].argv
    assert by_name["full-enhanced-conv_s_8x8-seed0"].speed_from in by_name  # its speed is measured first


def test_default_plan_fits_six_minutes_and_architectures_nine():
    """The budgets are the plan's wall time on a GPU: what runs over its phase's budget is stopped."""
    assert sum(gpu_plan.budgets(parse()).values()) <= 6 * 60
    assert sum(gpu_plan.budgets(parse("--architectures")).values()) <= 9 * 60
    assert [c.name for c in plan_for() if c.phase == "accuracy"] == ["full-baseline-seed0", "full-enhanced-seed0"]
    assert gpu_plan.budgets(parse("--budget", "speed=5"))["speed"] == 5


def test_skip_leaves_checks_out():
    kept = names(plan_for("--skip", "compile", "model-step"))
    assert "enhanced-compile" not in kept and "model-step" not in kept
    assert "enhanced-amp-off" in kept


def short_run(name, img_per_s):
    check = gpu_plan.Check(name, [], "correctness", status="ok")
    check.figures["img_per_s"] = img_per_s
    return check


def test_the_accuracy_phase_starts_only_what_can_finish():
    """Runs share the device, so their estimated times add up; a run that would not finish is skipped, with why."""
    checks = plan_for("--seeds", "0", "1")
    checks += [short_run("baseline-default", 25_000.0), short_run("enhanced-default", 25_000.0)]
    runs = [c for c in checks if c.phase == "accuracy"]
    one = gpu_plan.estimate_s(runs[0], checks)
    assert one == pytest.approx(gpu_plan.STARTUP_S + 1.2 * 20 * 50_000 / 25_000)
    gpu_plan.choose_runs(runs, checks, budget_s=one + 2 * (one - gpu_plan.STARTUP_S) + 1)
    assert [c.status for c in runs] == ["pending", "pending", "pending", "skipped"]
    assert "estimated" in runs[3].figures["reason"]
    unmeasured = plan_for("--architectures")
    run = next(c for c in unmeasured if c.name == "full-enhanced-mobilenetv2-seed0")
    gpu_plan.choose_runs([run], unmeasured, budget_s=1e9)
    assert run.status == "skipped" and "no speed" in run.figures["reason"]


# Every check of a tiny CPU plan but compilation (covered by tests/test_benchmarks.py's own runs).
TINY_CPU = ["--device", "cpu", "--tiny", "--jobs", "2"]
SKIP = ["compile"]
# The checks run for real below: those whose figures the test reads, what they depend on, predict and export;
# the others (the same scripts with other flags) are checked for flags their script accepts, and run by the stub.
REAL = {
    "enhanced-default",
    "enhanced-amp-off",
    "enhanced-contiguous",
    "sync-debug",
    "resume-on-cpu",
    "predict",
    "export",
    "full-enhanced-seed0",
}


def fake_popen(argv, **kwargs):
    """Stands for a check's process: a training command's folder gets the summary.json and metrics.csv a run of
    its flags writes (the figures the report reads), export's --output a file; then a process that exits 0."""
    argv = [str(a) for a in argv]
    value = lambda flag, default=None: argv[argv.index(flag) + 1] if flag in argv else default
    if "--output-dir" in argv and "--checkpoint" not in argv:
        run_dir = Path(value("--output-dir"))
        run_dir.mkdir(parents=True, exist_ok=True)
        epochs = int(value("--epochs", 20))
        amp = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(value("--amp"), "None")
        config = {"amp": amp, "channels_last": "--no-channels-last" not in argv}
        summary = {
            "test_acc": 10.0,
            "test_acc_tta": 11.0,
            "tta": "flip",
            "epochs_completed": epochs,
            "train_time_s": 1.0,
            "config": config,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
        rows = "".join(f"{e},10.0,100.0\n" for e in range(1, epochs + 1))
        (run_dir / "metrics.csv").write_text("epoch,test_acc,img_per_s\n" + rows)
    if "--output" in argv:
        Path(value("--output")).write_bytes(b"onnx")
    return subprocess.Popen([sys.executable, "-c", ""], **kwargs)


def stubbed(monkeypatch, popen):
    fake = SimpleNamespace(
        Popen=popen,
        STDOUT=subprocess.STDOUT,
        TimeoutExpired=subprocess.TimeoutExpired,
        SubprocessError=subprocess.SubprocessError,
    )
    monkeypatch.setattr(gpu_check, "subprocess", fake)


def test_main_runs_every_phase_of_the_plan_and_reports_each_check(tiny_cifar, tmp_path, monkeypatch):
    """main() with a stub for the processes: every planned check runs in its phase, passes, and is reported with
    the figures read from its run's files."""
    stubbed(monkeypatch, fake_popen)
    out = tmp_path / "check"
    code = gpu_check.main([*TINY_CPU, "--data-dir", str(tiny_cifar), "--output-dir", str(out), "--skip", *SKIP])
    report = json.loads((out / "report.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert code == 0, statuses
    assert set(statuses.values()) == {"ok"} and len(statuses) == 11 + 4 + 1 + 2
    assert [c["name"] for c in report["checks"]] == names(plan_for(*TINY_CPU, "--skip", *SKIP))
    assert [p["status"] for p in report["phases"]] == ["done"] * 5
    figures = {c["name"]: c["figures"] for c in report["checks"]}
    assert figures["resume-on-cpu"]["epochs"] == 2 and figures["full-enhanced-seed0"]["epochs"] == 2
    assert figures["baseline-amp-fp16"]["amp"] == "torch.float16"
    assert "estimate_s" in figures["full-baseline-seed0"]
    text = (out / "report.md").read_text()
    assert all(f"| {name} |" in text for name in statuses) and "nccl is not exercised" in text
    assert len(list((out / "images").glob("*.png"))) == 8  # predict's input, real CIFAR-10 test images


def test_each_phase_keeps_to_its_budget(tiny_cifar, tmp_path, monkeypatch):
    """Checks that would run for a minute are stopped when their phase's second is spent; the accuracy phase then
    starts nothing, since no short run measured a speed."""
    sleeper = lambda argv, **kwargs: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)
    stubbed(monkeypatch, sleeper)
    out = tmp_path / "check"
    budget = ["--budget", "correctness=1", "after-training=1", "speed=1", "accuracy=1"]
    started = time.monotonic()
    code = gpu_check.main([*TINY_CPU, "--data-dir", str(tiny_cifar), "--output-dir", str(out), *budget])
    assert code == 1 and time.monotonic() - started < 20
    report = json.loads((out / "report.json").read_text())
    phases = {p["name"]: p for p in report["phases"]}
    assert all(phases[name]["wall_s"] < 5 for name in ("correctness", "after-training", "speed", "accuracy"))
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert set(statuses.values()) <= {"timeout", "skipped"} and statuses["baseline-default"] == "timeout"
    assert statuses["full-enhanced-seed0"] == "skipped"


def test_every_training_command_of_the_plan_is_one_its_script_accepts():
    """The checks the test below leaves to the stub: their flags parse (a typo would fail on the GPU machine)."""
    scripts = {"mobilenetv4_baseline.py": mobilenetv4_baseline, "mobilenetv4_enhanced.py": mobilenetv4_enhanced}
    parsed = 0
    for check in plan_for(*TINY_CPU, "--architectures"):
        argv = [str(a) for a in check.argv]
        if "count-syncs" in argv:  # count-syncs JSON SCRIPT ARGS...
            at = argv.index("count-syncs") + 2
            module, rest = scripts[f"mobilenetv4_{argv[at]}.py"], argv[at + 1 :]
        else:
            at = next((i for i, a in enumerate(argv) if Path(a).name in scripts), None)
            if at is None:
                continue
            module, rest = scripts[Path(argv[at]).name], argv[at + 1 :]
        args = module.parse_args(rest)
        assert args.device == "cpu" and args.max_train_samples == (512 if "torchrun" in check.name else 64)
        parsed += 1
    assert parsed == 10 + 3 + 1 + 1 + 2 + 5  # short runs, architectures, sync-debug, torchrun, resumes, accuracy


def test_the_check_runs_on_the_cpu_at_a_tiny_budget(tiny_cifar, tmp_path):
    """The checks whose figures matter, run for real: real commands, real runs, a report (the others are the same
    scripts with other flags: see the tests above)."""
    out = tmp_path / "check"
    every = names(plan_for(*TINY_CPU, "--skip", *SKIP))
    skip = [*SKIP, *(name for name in every if name not in REAL)]
    code = gpu_check.main([*TINY_CPU, "--data-dir", str(tiny_cifar), "--output-dir", str(out), "--skip", *skip])
    report = json.loads((out / "report.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert code == 0, statuses
    assert set(statuses.values()) == {"ok"} and set(statuses) == REAL
    figures = {c["name"]: c["figures"] for c in report["checks"]}
    assert figures["resume-on-cpu"]["epochs"] == 2 and figures["full-enhanced-seed0"]["epochs"] == 2
    assert figures["enhanced-default"]["amp"] == "None" and figures["enhanced-contiguous"]["channels_last"] is False
    assert figures["sync-debug"]["syncs"] == "n/a (CUDA only)" and figures["sync-debug"]["epochs"] == 1
    assert (out / "model.onnx").is_file() and "| predict |" in (out / "report.md").read_text()


def test_a_killed_check_leaves_the_report_of_the_phases_before(tiny_cifar, tmp_path):
    """The report is rewritten after every phase: read after the correctness phase, then the check is killed in
    the next one; both reports hold the finished phases' results."""
    out = tmp_path / "check"
    keep = {"enhanced-amp-off", "resume-on-cpu", "full-enhanced-seed0"}
    skip = [name for name in names(plan_for(*TINY_CPU)) if name not in keep]
    argv = [*TINY_CPU, "--data-dir", str(tiny_cifar), "--output-dir", str(out), "--skip", *skip]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    before, deadline = None, time.monotonic() + 240
    while before is None and time.monotonic() < deadline and proc.poll() is None:
        report = gpu_plan.read_json(out / "report.json") or {"phases": []}
        phases = {p["name"]: p["status"] for p in report["phases"]}
        before = report if phases.get("correctness") == "done" else None
        time.sleep(0.1)
    assert before is not None and proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    after = json.loads((out / "report.json").read_text())
    for report in (before, after):
        statuses = {c["name"]: c["status"] for c in report["checks"]}
        assert statuses["enhanced-amp-off"] == "ok"
        assert statuses["full-enhanced-seed0"] == "pending"
    phases = {p["name"]: p["status"] for p in after["phases"]}
    assert phases["correctness"] == "done" and phases["after-training"] == "interrupted"
    assert phases["accuracy"] == "pending"
    assert "| enhanced-amp-off | correctness | ok |" in (out / "report.md").read_text()


def test_data_is_prepared_from_the_archive_or_the_builder(tiny_cifar, tmp_path):
    """From a fresh tree: the official archive's layout extracted, or a builder script run, into OUTPUT/data."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_cifar / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    builder = tmp_path / "make_cifar10.py"
    builder.write_text(
        f"import shutil, sys\nshutil.copytree({str(tiny_cifar / 'cifar-10-batches-py')!r}, "
        "sys.argv[1] + '/cifar-10-batches-py')\n"
    )
    for flag, source in (("--cifar-archive", archive), ("--cifar-builder", builder)):
        out = tmp_path / flag.strip("-")
        args = parse("--data-dir", str(tmp_path / "none"), flag, str(source))
        args.output_dir = str(out)
        figures = gpu_check.prepare_data(args, timeout_s=60)
        assert figures == {"data": str(out / "data"), "from": str(source)}
        assert (out / "data" / "cifar-10-batches-py" / "test_batch").is_file()
        assert len(list((out / "images").glob("*.png"))) == 8
        assert gpu_plan.data_folder(args) == out / "data"
    args = parse("--data-dir", str(tmp_path / "none"), "--cifar-builder", str(tmp_path / "missing.py"))
    args.output_dir = str(tmp_path / "nothing")
    with pytest.raises(RuntimeError, match="no CIFAR-10"):
        gpu_check.prepare_data(args, timeout_s=60)
    shutil.rmtree(tmp_path / "nothing", ignore_errors=True)
