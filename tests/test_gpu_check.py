"""The prepared GPU check (benchmarks/gpu_check.py): its plan covers every device path the devices issue names,
and the whole check runs on the CPU at a tiny budget, so it is known to work before GPU time is spent on it."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

import mobilenetv4_baseline  # noqa: E402
import mobilenetv4_enhanced  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:CIFAR-10 files")


def names(checks):
    return [c.name for c in checks]


def plan_for(*argv):
    return gpu_check.plan(gpu_check.build_parser().parse_args(["--output-dir", "out", *argv]))


def test_plan_covers_every_device_path():
    checks = plan_for("--seeds", "0", "1", "2", "--architectures")
    for script in ("baseline", "enhanced"):
        for variant in (
            "amp-bf16",
            "amp-fp16",
            "amp-off",
            "channels-last-on",
            "channels-last-off",
            "compile",
            "deterministic",
        ):
            assert f"{script}-{variant}" in names(checks)
    for name in ("torchrun", "resume", "resume-on-cpu", "predict", "export", "model-step", "throughput"):
        assert name in names(checks)
    full = [c for c in checks if c.phase == "accuracy"]
    assert len(full) == (2 + 3) * 3  # both defaults and three architectures, three seeds each
    by_name = {c.name: c for c in checks}
    assert "--compile" in by_name["enhanced-compile"].argv and "--amp" in by_name["baseline-amp-fp16"].argv
    assert by_name["resume-on-cpu"].argv[by_name["resume-on-cpu"].argv.index("--device") + 1] == "cpu"
    assert "torch.distributed.run" in by_name["torchrun"].command and "--nproc-per-node" in by_name["torchrun"].argv
    assert "--epochs" not in by_name["full-enhanced-seed2"].argv  # the recipe's own 20 epochs
    assert "--output-stride" in by_name["full-enhanced-conv_s_8x8-seed0"].argv


def test_skip_leaves_checks_out():
    kept = names(plan_for("--skip", "compile", "throughput"))
    assert "enhanced-compile" not in kept and "baseline-compile" not in kept and "throughput" not in kept
    assert "enhanced-amp-off" in kept


# Every check of a tiny CPU plan but compilation and the two speed benchmarks (covered by tests/test_benchmarks.py).
TINY_CPU = ["--device", "cpu", "--tiny", "--seeds", "0", "--jobs", "2"]
SKIP = ["compile", "model-step", "throughput"]
# The checks run for real below: those whose figures the test reads, what they depend on, predict and export;
# the others (the same scripts with other flags) are checked for flags their script accepts, and run by the stub.
REAL = {
    "enhanced-amp-bf16",
    "enhanced-amp-off",
    "baseline-channels-last-off",
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


def test_main_runs_every_phase_of_the_plan_and_reports_each_check(tiny_cifar, tmp_path, monkeypatch):
    """main() with a stub for the processes: every planned check runs in its phase, passes, and is reported with
    the figures read from its run's files."""
    fake = SimpleNamespace(Popen=fake_popen, STDOUT=subprocess.STDOUT, TimeoutExpired=subprocess.TimeoutExpired)
    monkeypatch.setattr(gpu_check, "subprocess", fake)
    out = tmp_path / "check"
    code = gpu_check.main([*TINY_CPU, "--data-dir", str(tiny_cifar), "--output-dir", str(out), "--skip", *SKIP])
    report = json.loads((out / "report.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert code == 0, statuses
    assert set(statuses.values()) == {"ok"} and len(statuses) == 12 + 5 + 2
    assert [c["name"] for c in report["checks"]] == names(plan_for(*TINY_CPU, "--skip", *SKIP))
    figures = {c["name"]: c["figures"] for c in report["checks"]}
    assert figures["resume-on-cpu"]["epochs"] == 2 and figures["full-enhanced-seed0"]["epochs"] == 2
    assert figures["baseline-amp-fp16"]["amp"] == "torch.float16"
    text = (out / "report.md").read_text()
    assert all(f"| {name} |" in text for name in statuses)
    assert len(list((out / "images").glob("*.png"))) == 8  # predict's input, real CIFAR-10 test images


def test_every_training_command_of_the_plan_is_one_its_script_accepts():
    """The checks the test below leaves to the stub: their flags parse (a typo would fail on the GPU machine)."""
    scripts = {"mobilenetv4_baseline.py": mobilenetv4_baseline, "mobilenetv4_enhanced.py": mobilenetv4_enhanced}
    parsed = 0
    for check in plan_for(*TINY_CPU, "--architectures"):
        script = next((i for i, a in enumerate(map(str, check.argv)) if Path(a).name in scripts), None)
        if script is not None:
            args = scripts[Path(str(check.argv[script])).name].parse_args([str(a) for a in check.argv[script + 1 :]])
            assert args.device == "cpu" and args.max_train_samples == 64, check.name
            parsed += 1
    assert parsed == 14 + 1 + 2 + 5  # both scripts' variants, torchrun, the two resumes, phase 3


def test_the_check_runs_on_the_cpu_at_a_tiny_budget(tiny_cifar, tmp_path):
    """The checks whose figures matter, run for real: real commands, real runs, a report (the others are the same
    scripts with other flags: see the two tests above)."""
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
    assert figures["enhanced-amp-bf16"]["amp"] == "torch.bfloat16"
    assert figures["baseline-channels-last-off"]["channels_last"] is False
    assert (out / "model.onnx").is_file() and "| predict |" in (out / "report.md").read_text()
