"""torchrun with 2 CPU processes (gloo on loopback) on the tiny synthetic CIFAR files."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import common
from helpers import MD5_WARNING, ROOT, run_main

pytestmark = pytest.mark.filterwarnings(f"ignore:{MD5_WARNING}")
# All 200 training images (12 steps per epoch, 6 per rank under 2 processes); 39 test images: uneven shards.
SHARDED = ["--width-mult", "0.25", "-b", "16", "--device", "cpu", "--max-test-samples", "39"]

# Runs a script's main() and, on every rank, saves the trained weights and the random state at the end so the test
# can compare ranks. Hooks by environment variable: MNV4_SIGTERM_RANK / MNV4_SIGTERM_AT send a real SIGTERM to
# that rank's own process after its global step AT; MNV4_EXIT_AFTER_EPOCH ends the run (exit 99) once that epoch
# is saved; MNV4_REFRESH_EVERY sets the steps between stop checks. Each rank's exit code goes to exit<rank>.
WRAPPER = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    import common, importlib
    script = importlib.import_module(sys.argv[1])
    dump, env = {dump!r}, os.environ
    rank = int(env.get("RANK", "0"))
    finish, step_done, end_epoch, steps = common.Run.finish, common.Run.step_done, common.Run.end_epoch, [0]
    import mnv4.epochs
    mnv4.epochs.EpochLoop.REFRESH_EVERY = int(env.get("MNV4_REFRESH_EVERY", mnv4.epochs.EpochLoop.REFRESH_EVERY))
    def finish_and_dump(self):
        state = {{"model": self.model.state_dict(), "rng": torch.get_rng_state()}}
        torch.save(state, os.path.join(dump, f"rank{{rank}}.pt"))
        return finish(self)
    def step_done_and_signal(self, *args):
        steps[0] += 1
        if rank == int(env.get("MNV4_SIGTERM_RANK", "-1")) and steps[0] == int(env["MNV4_SIGTERM_AT"]):
            os.kill(os.getpid(), signal.SIGTERM)
        return step_done(self, *args)
    def end_epoch_and_exit(self, epoch):
        end_epoch(self, epoch)
        if epoch + 1 == int(env.get("MNV4_EXIT_AFTER_EPOCH", "0")):
            raise SystemExit(99)
    common.Run.finish, common.Run.step_done = finish_and_dump, step_done_and_signal
    common.Run.end_epoch = end_epoch_and_exit
    code = 0
    try:
        script.main(sys.argv[2:])
    except SystemExit as exc:
        code = exc.code
    with open(os.path.join(dump, f"exit{{rank}}"), "w") as f:
        f.write(str(code))
    sys.exit(code)
""")


def torchrun(tmp_path, script, *args, nproc=2, expect_ok=True, **hooks):
    wrapper = tmp_path / "run_and_dump.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), dump=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in hooks.items()}}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(wrapper),
        script,
        *args,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def single(script, *args):
    """One process, this one: main() of mobilenetv4_<script>.py (one thread, as the ranks)."""
    res = run_main(script.removeprefix("mobilenetv4_"), args)
    assert res.code == 0, res.err[-3000:]
    return res


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ddp_run(tiny_cifar, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = torchrun(
        tmp,
        "mobilenetv4_baseline",
        "--data-dir",
        str(tiny_cifar),
        "--epochs",
        "1",
        "--output-dir",
        str(tmp / "run"),
        *SHARDED,
    )
    return tmp, out


def test_ranks_end_with_identical_weights(ddp_run):
    tmp, _ = ddp_run
    rank0, rank1 = torch.load(tmp / "rank0.pt")["model"], torch.load(tmp / "rank1.pt")["model"]
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
    single(
        "mobilenetv4_baseline",
        "--data-dir",
        str(tiny_cifar),
        "--test-only",
        "--resume",
        str(tmp / "run" / "last.pt"),
        "--output-dir",
        str(tmp / "eval"),
        *SHARDED,
    )
    evaluated = json.loads((tmp / "eval" / "summary.json").read_text())
    assert evaluated["test_acc"] == pytest.approx(logged, abs=1e-9)
    assert evaluated["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)
    # Accuracy on 39 images is a multiple of 100/39: a double-counted or dropped image would break this.
    assert round(logged * 39 / 100, 6) == round(logged * 39 / 100)


def test_resume_under_two_processes_continues_at_the_right_epoch(ddp_run, tiny_cifar, tmp_path):
    """(On a copy of the module's run: the other tests read its folder and its ranks' weights as they were.)"""
    shutil.copytree(ddp_run[0] / "run", tmp_path / "run")
    out = torchrun(
        tmp_path,
        "mobilenetv4_baseline",
        "--data-dir",
        str(tiny_cifar),
        "--epochs",
        "2",
        "--resume",
        str(tmp_path / "run" / "last.pt"),
        *SHARDED,
    )
    assert "resumed from" in out.stdout and "epoch 2, step 0" in out.stdout
    rows = metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_completed"] == 2


def test_single_process_checkpoint_resumes_under_two_processes(tiny_cifar, tmp_path):
    single(
        "mobilenetv4_baseline",
        "--data-dir",
        str(tiny_cifar),
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path / "run"),
        *SHARDED,
    )
    single_history = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["history"]
    out = torchrun(
        tmp_path,
        "mobilenetv4_baseline",
        "--data-dir",
        str(tiny_cifar),
        "--epochs",
        "2",
        "--resume",
        str(tmp_path / "run" / "last.pt"),
        *SHARDED,
    )
    assert "epoch 2, step 0" in out.stdout
    first = metrics(tmp_path / "run")
    assert len(first) == 2
    # The resume continued the single process's run: its epoch is kept as logged, Adam's state carries on from its
    # 12 steps (plus 6 global steps of 32 images under 2 processes), and the record names both processes.
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["history"][0] == single_history[0]
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {12 + 6}
    assert [s["world_size"] for s in ckpt["segments"]] == [1, 2] and ckpt["world_size"] == 2
    rank0, rank1 = torch.load(tmp_path / "rank0.pt")["model"], torch.load(tmp_path / "rank1.pt")["model"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert all(torch.equal(rank0[k], ckpt["model"][k]) for k in rank0)  # the weights it saved are the ranks'


def exit_codes(tmp_path, nproc=2):
    return [int((tmp_path / f"exit{rank}").read_text()) for rank in range(nproc)]


def test_onecycle_resumed_under_another_world_size_continues_the_curve(tiny_cifar, tmp_path):
    """An epoch-end checkpoint of a 1-process run (12 steps per epoch) resumed under 2 processes (6 global steps
    per epoch) continues the same one-cycle schedule (the default): before the fix the step counter was
    reinterpreted and the lr dropped to the floor for the rest of the run."""
    flags = ["--data-dir", str(tiny_cifar), "--epochs", "4", *SHARDED]
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    single("mobilenetv4_enhanced", *flags, "--output-dir", str(straight / "run"))
    out = torchrun(
        split,
        "mobilenetv4_enhanced",
        *flags,
        "--output-dir",
        str(split / "run"),
        nproc=1,
        expect_ok=False,
        MNV4_EXIT_AFTER_EPOCH=2,
    )
    assert exit_codes(split, 1) == [99], out.stderr[-2000:]
    torchrun(split, "mobilenetv4_enhanced", *flags, "--resume", str(split / "run" / "last.pt"))
    lr_straight = [float(r["lr"]) for r in metrics(straight / "run")]
    lr_split = [float(r["lr"]) for r in metrics(split / "run")]
    assert lr_straight[1] > lr_straight[2] > lr_straight[3]
    assert lr_split == pytest.approx(lr_straight, rel=1e-9)


@pytest.fixture(scope="module")
def ddp_enhanced(tiny_cifar, tmp_path_factory):
    """Enhanced (dropout, drop path, augmentation), 2 processes, 2 epochs straight, --deterministic."""
    tmp = tmp_path_factory.mktemp("ddp_enh")
    torchrun(
        tmp,
        "mobilenetv4_enhanced",
        "--data-dir",
        str(tiny_cifar),
        "--epochs",
        "2",
        "--deterministic",
        "--output-dir",
        str(tmp / "run"),
        *SHARDED,
    )
    return tmp


def test_ranks_draw_their_own_dropout_and_drop_path_masks(ddp_enhanced):
    """Every rank seeded alike drew the same masks on its shard: B masks per global batch instead of B x world.
    The weights still agree (DDP broadcasts them at wrap time)."""
    rank0, rank1 = torch.load(ddp_enhanced / "rank0.pt"), torch.load(ddp_enhanced / "rank1.pt")
    assert not torch.equal(rank0["rng"], rank1["rng"])
    for key in rank0["model"]:
        assert torch.equal(rank0["model"][key], rank1["model"][key]), key


def test_enhanced_onecycle_schedule_spans_the_sharded_epoch(ddp_enhanced):
    """Under 2 processes an epoch has half the steps: the one-cycle schedule must still reach --min-lr at the last
    one."""
    assert float(metrics(ddp_enhanced / "run")[-1]["lr"]) == pytest.approx(1e-6, rel=1e-3)


def test_sigterm_to_one_rank_stops_every_rank_then_resumes_exactly(ddp_enhanced, tiny_cifar, tmp_path):
    """A real SIGTERM to rank 1 only, mid-epoch 2: every rank stops at the next agreed check with exit 143, rank 0
    writes one last.pt holding every rank's random state, and a resume under 2 processes ends with the weights of
    the uninterrupted run, bit for bit."""
    flags = ["--data-dir", str(tiny_cifar), "--epochs", "2", "--deterministic", *SHARDED]
    run = tmp_path / "run"
    out = torchrun(
        tmp_path,
        "mobilenetv4_enhanced",
        *flags,
        "--output-dir",
        str(run),
        expect_ok=False,
        MNV4_SIGTERM_RANK=1,
        MNV4_SIGTERM_AT=8,
        MNV4_REFRESH_EVERY=2,
    )  # 6 steps per epoch
    assert exit_codes(tmp_path) == [143, 143], out.stderr[-3000:]
    # torchrun itself exits 1 with its ChildFailedError report (its own traceback); the ranks print none
    assert not [
        line
        for line in out.stderr.splitlines()
        if "File " in line and ".venv" not in line and "site-packages" not in line and "<frozen" not in line
    ], out.stderr[-3000:]
    assert out.stderr.count("SIGTERM: stopped after epoch 2 step 2") == 1  # rank 0 alone reports
    assert sorted(p.name for p in run.iterdir() if p.suffix in (".pt", ".tmp")) == ["best.pt", "last.pt"]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["world_size"]) == (1, 2, 2) and len(ckpt["rng"]) == 2

    torchrun(tmp_path, "mobilenetv4_enhanced", *flags, "--resume", str(run / "last.pt"))
    resumed, straight = torch.load(tmp_path / "rank0.pt"), torch.load(ddp_enhanced / "rank0.pt")
    for key in straight["model"]:
        assert torch.equal(resumed["model"][key], straight["model"][key]), key
    assert torch.equal(resumed["rng"], straight["rng"])
    assert [r["epoch"] for r in metrics(run)] == ["1", "2"]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 5, 7, 40, 10_000])
def test_distributed_shard_and_gather(world_size, n, monkeypatch):
    ranks = [common.Distributed({"WORLD_SIZE": str(world_size), "RANK": str(r)}) for r in range(world_size)]
    slices = [d.shard(n) for d in ranks]
    covered = torch.cat([torch.arange(n)[s] for s in slices])
    assert torch.equal(covered, torch.arange(n))  # contiguous, in order, nothing twice, nothing left out
    values = torch.arange(n) * 10 + 3
    locals_ = [values[s] for s in slices]

    def fake_all_gather(parts, padded):
        per = padded.numel()
        for part, local in zip(parts, locals_):
            part.zero_()
            part[: local.numel()] = local
            assert local.numel() <= per

    monkeypatch.setattr(torch.distributed, "all_gather", fake_all_gather)
    for d, local in zip(ranks, locals_):
        assert torch.equal(d.gather_shards(local, n), values)


def test_distributed_world_of_one_is_a_no_op():
    d = common.Distributed({})
    assert not d and d.world_size == 1 and d.rank == 0 and d.is_main
    t = torch.arange(5.0)
    assert d.all_sum(t) is t and d.all_max(t) is t and d.gather_shards(t, 5) is t
    assert d.broadcast({"a": 1}) == {"a": 1}
    assert d.shard(7) == slice(0, 7)
    d.init(torch.device("cpu"))
    assert not torch.distributed.is_initialized()
