"""The prepared GPU check (benchmarks/gpu_check.py): its plan covers every device path the devices issue names,
and the whole check runs on the CPU at a tiny budget, so it is known to work before GPU time is spent on it."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:CIFAR-10 files")


def names(checks):
    return [c.name for c in checks]


def plan_for(*argv):
    return gpu_check.plan(gpu_check.build_parser().parse_args(["--output-dir", "out", *argv]))


def test_plan_covers_every_device_path():
    checks = plan_for("--seeds", "0", "1", "2", "--architectures")
    for script in ("baseline", "enhanced"):
        for variant in ("amp-bf16", "amp-fp16", "amp-off", "channels-last-on", "channels-last-off", "compile",
                        "deterministic"):
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


def test_the_check_runs_on_the_cpu_at_a_tiny_budget(tiny_cifar, tmp_path):
    """Every check but compilation and the two speed benchmarks (covered by tests/test_benchmarks.py): real
    commands, real runs, a report."""
    out = tmp_path / "check"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--data-dir", str(tiny_cifar), "--output-dir", str(out),
                           "--seeds", "0", "--jobs", "2", "--skip", "compile", "model-step", "throughput"])
    report = json.loads((out / "report.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert code == 0, statuses
    assert set(statuses.values()) == {"ok"} and len(statuses) == 12 + 5 + 2
    figures = {c["name"]: c["figures"] for c in report["checks"]}
    assert figures["resume-on-cpu"]["epochs"] == 2 and figures["full-enhanced-seed0"]["epochs"] == 2
    assert figures["enhanced-amp-bf16"]["amp"] == "torch.bfloat16"
    assert figures["baseline-channels-last-off"]["channels_last"] is False
    assert (out / "model.onnx").is_file() and "| predict |" in (out / "report.md").read_text()
