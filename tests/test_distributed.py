"""torchrun with 2 CPU processes (gloo on loopback) on the tiny synthetic CIFAR files."""
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width-mult", "0.25", "-b", "16", "--device", "cpu", "--max-test-samples", "39"]  # 39: uneven shards

# Runs a script's main() and, on every rank, saves the trained weights so the test can compare ranks.
WRAPPER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import common, importlib
    script = importlib.import_module(sys.argv[1])
    finish = common.Run.finish
    def finish_and_dump(self):
        torch.save(self.model.state_dict(), os.path.join({dump!r}, f"rank{{self.dist.rank}}.pt"))
        return finish(self)
    common.Run.finish = finish_and_dump
    script.main(sys.argv[2:])
""")


def torchrun(tmp_path, script, *args, nproc=2):
    wrapper = tmp_path / "run_and_dump.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), dump=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(wrapper), script, *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def single(script, *args):
    out = subprocess.run([sys.executable, f"{script}.py", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ddp_run(tiny_cifar, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = torchrun(tmp, "mobilenetv4_baseline", "--data-dir", str(tiny_cifar), "--epochs", "1",
                   "--output-dir", str(tmp / "run"), *TINY)
    return tmp, out


def test_ranks_end_with_identical_weights(ddp_run):
    tmp, _ = ddp_run
    rank0, rank1 = torch.load(tmp / "rank0.pt"), torch.load(tmp / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_only_rank0_writes_and_logs(ddp_run):
    tmp, out = ddp_run
    assert out.stdout.count("Test-time augmentation") == 1
    assert len([line for line in out.stdout.splitlines() if line.strip().startswith("1 ")]) == 1
    config = json.loads((tmp / "run" / "config.json").read_text())
    assert config["world_size"] == 2
    ckpt = torch.load(tmp / "run" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model


def test_logged_accuracy_equals_single_process_evaluation(ddp_run, tiny_cifar):
    tmp, _ = ddp_run
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["test_images"] == 39
    logged = float(metrics(tmp / "run")[-1]["test_acc"])
    single("mobilenetv4_baseline", "--data-dir", str(tiny_cifar), "--test-only", "--resume",
           str(tmp / "run" / "last.pt"), "--output-dir", str(tmp / "eval"), *TINY)
    evaluated = json.loads((tmp / "eval" / "summary.json").read_text())
    assert evaluated["test_acc"] == pytest.approx(logged, abs=1e-9)
    assert evaluated["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)
    # Accuracy on 39 images is a multiple of 100/39: a double-counted or dropped image would break this.
    assert round(logged * 39 / 100, 6) == round(logged * 39 / 100)


def test_resume_under_two_processes_continues_at_the_right_epoch(ddp_run, tiny_cifar):
    tmp, _ = ddp_run
    out = torchrun(tmp, "mobilenetv4_baseline", "--data-dir", str(tiny_cifar), "--epochs", "2",
                   "--resume", str(tmp / "run" / "last.pt"), *TINY)
    assert "resumed from" in out.stdout and "epoch 2, step 0" in out.stdout
    rows = metrics(tmp / "run")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert json.loads((tmp / "run" / "summary.json").read_text())["epochs_completed"] == 2


def test_single_process_checkpoint_resumes_under_two_processes(tiny_cifar, tmp_path):
    single("mobilenetv4_baseline", "--data-dir", str(tiny_cifar), "--epochs", "1", "--output-dir",
           str(tmp_path / "run"), *TINY)
    out = torchrun(tmp_path, "mobilenetv4_baseline", "--data-dir", str(tiny_cifar), "--epochs", "2",
                   "--resume", str(tmp_path / "run" / "last.pt"), *TINY)
    assert "epoch 2, step 0" in out.stdout
    assert len(metrics(tmp_path / "run")) == 2


def test_enhanced_cosine_schedule_spans_the_sharded_epoch(tiny_cifar, tmp_path):
    """Under 2 processes an epoch has half the steps: the cosine must still reach --min-lr at the last one."""
    torchrun(tmp_path, "mobilenetv4_enhanced", "--data-dir", str(tiny_cifar), "--epochs", "1",
             "--output-dir", str(tmp_path / "run"), *TINY)
    assert float(metrics(tmp_path / "run")[-1]["lr"]) == pytest.approx(1e-6, rel=1e-3)
