"""Bad input to the training scripts: exit status 2 and one `error:` line naming the problem, no traceback,
nothing written."""

import errno
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import MD5_WARNING, TINY, assert_one_error_line, load, run_cli, run_main

pytestmark = pytest.mark.filterwarnings(f"ignore:{MD5_WARNING}")


BAD_FLAGS = [
    (["--epochs", "0"], "--epochs"),
    (["-b", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--variant", "foo"], "--variant"),
    (["--tta", "foo"], "--tta"),
    (["--test-only"], "--resume"),
    (["--max-train-samples", "8"], "--batch-size"),  # -b 16 > 8 training images
    (["--data-dir", "/nonexistent"], "/nonexistent"),
]


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
@pytest.mark.parametrize("flags,names", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags(script, flags, names, tiny_cifar, tmp_path):
    out = tmp_path / "run"
    res = run_main(script, [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 1, *flags])
    assert res.code == 2
    assert_one_error_line(res.err, names)
    assert not (out / "last.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_gpu(tiny_cifar, tmp_path):
    res = run_main(
        "baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", "--epochs", 1, "--device", "cuda"]
    )
    assert res.code == 2
    assert_one_error_line(res.err, "cuda")


def test_truncated_batch_file(tiny_cifar, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_cifar, data)
    batch = data / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    res = run_main("baseline", [*TINY, "--data-dir", data, "--output-dir", tmp_path / "o", "--epochs", 1])
    assert res.code == 2
    assert_one_error_line(res.err, "data_batch_3")


def test_output_dir_of_another_run(base1, tiny_cifar, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(base1[0] / "last.pt", out / "last.pt")
    before = (out / "last.pt").read_bytes()
    res = run_main("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 1])
    assert res.code == 2
    assert_one_error_line(res.err, "last.pt", "--overwrite", "--resume")
    assert (out / "last.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]  # nothing written beside it
    # --overwrite replaces it
    res = run_main("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 1, "--overwrite"])
    assert res.code == 0, res.err
    assert load(out / "last.pt")["config"]["overwrite"] is True


@pytest.fixture
def bad_checkpoints(base1, tmp_path):
    """name -> path of an unusable checkpoint."""
    real = (base1[0] / "last.pt").read_bytes()
    paths = {
        "missing": tmp_path / "missing.pt",
        "garbage": tmp_path / "garbage.pt",
        "truncated": tmp_path / "truncated.pt",
        "foreign": tmp_path / "foreign.pt",
    }
    paths["garbage"].write_bytes(os.urandom(4096))
    paths["truncated"].write_bytes(real[: len(real) // 2])
    torch.save({"model": {"w": torch.zeros(3)}}, paths["foreign"])  # a torch file, not one of ours
    paths["pickle"] = tmp_path / "data_batch_1"  # a plain pickle (protocol 4: torch.load warns about it)
    paths["pickle"].write_bytes(pickle.dumps({"data": [1, 2, 3]}, protocol=4))
    return paths


@pytest.mark.parametrize(
    "kind,names",
    [
        ("missing", "missing.pt"),
        ("garbage", "garbage.pt"),
        ("truncated", "truncated.pt"),
        ("foreign", "foreign.pt"),
        ("pickle", "data_batch_1"),
    ],
)
def test_resume_unusable_checkpoint(kind, names, bad_checkpoints, tiny_cifar, tmp_path):
    res = run_main(
        "baseline",
        [
            *TINY,
            "--data-dir",
            tiny_cifar,
            "--output-dir",
            tmp_path / "o",
            "--epochs",
            2,
            "--resume",
            bad_checkpoints[kind],
        ],
    )
    assert res.code == 2
    assert_one_error_line(res.err, names)


@pytest.mark.parametrize("flags,names", [(["--width-mult", "0.5"], "width_mult"), (["--head", "mlp"], "head")])
@pytest.mark.parametrize("test_only", [False, True], ids=["resume", "test-only"])
def test_resume_checkpoint_of_another_model(flags, names, test_only, base1, tiny_cifar, tmp_path):
    ckpt = base1[0] / "last.pt"
    before = ckpt.read_bytes()
    res = run_main(
        "baseline",
        [
            *TINY,
            "--data-dir",
            tiny_cifar,
            "--output-dir",
            tmp_path / "o",
            "--epochs",
            2,
            "--resume",
            ckpt,
            *flags,
            *(["--test-only"] if test_only else []),
        ],
    )
    assert res.code == 2
    assert_one_error_line(res.err, names)
    assert ckpt.read_bytes() == before


def test_resume_checkpoint_of_the_other_script(base1, tiny_cifar, tmp_path):
    """Same model flags, other script: the optimizer/scheduler state does not fit; refuse in one line."""
    res = run_main(
        "enhanced",
        [
            *TINY,
            "--data-dir",
            tiny_cifar,
            "--output-dir",
            tmp_path / "o",
            "--epochs",
            2,
            "--act",
            "relu6",
            "--no-se",
            "--head",
            "linear",
            "--drop-path",
            "0",
            "--resume",
            base1[0] / "last.pt",
        ],
    )
    assert res.code == 2
    assert_one_error_line(res.err, "last.pt")


@pytest.mark.parametrize("betas", [["1.5", "0.999"], ["nan", "0.999"]])
def test_bad_betas(betas, tiny_cifar, tmp_path):
    res = run_main(
        "enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", "--epochs", 1, "--betas", *betas]
    )
    assert res.code == 2
    assert_one_error_line(res.err, "--betas")


def test_read_only_output_dir(tiny_cifar, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (see the simulated test)")
        res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 1])
    finally:
        out.chmod(0o700)
    assert res.code == 2
    assert_one_error_line(res.err, str(out), "writable")


def test_read_only_output_dir_simulated(tiny_cifar, tmp_path, monkeypatch):
    """As a non-root user would see a 0500 folder: os.access says no, and creating files there fails."""
    out = tmp_path / "ro"
    out.mkdir()
    real_access, real_mkstemp = os.access, tempfile.mkstemp

    def access(path, mode, *args, **kwargs):
        if Path(path).resolve() == out.resolve() and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == out.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 1])
    monkeypatch.undo()
    assert res.code == 2
    assert_one_error_line(res.err, str(out), "writable")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "flags,names",
    [
        (["--epochs", "0"], "--epochs"),
        (["--resume", "garbage.pt"], "garbage.pt"),
        (["--resume", "data_batch_1"], "data_batch_1"),
    ],
    ids=["argparse", "user-error", "pickle-checkpoint"],
)
def test_bad_input_as_a_process(flags, names, tiny_cifar, tmp_path):
    """The real command line: exit status 2, one line on stderr, no traceback (nor torch's warning about a
    foreign pickle's protocol)."""
    if "garbage.pt" in flags:
        (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
        flags = ["--resume", tmp_path / "garbage.pt"]
    if "data_batch_1" in flags:
        (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": [1, 2, 3]}, protocol=4))
        flags = ["--resume", tmp_path / "data_batch_1"]
    proc = run_cli("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", *flags], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, names)


def test_eval_every_zero_is_refused(tiny_cifar, tmp_path):
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path, "--eval-every", 0])
    assert res.code == 2
    assert_one_error_line(res.err, "--eval-every 0", "out of range")  # the range check, not an unknown flag


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_unknown_recipe_is_one_error_line(script, tiny_cifar, tmp_path):
    res = run_main(script, [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path, "--recipe", "fast"])
    assert res.code == 2
    assert_one_error_line(res.err, "--recipe", "fast", "notebook")


def test_augmentation_flags_without_augment_are_refused(tiny_cifar, tmp_path):
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", "--cutout", "8"])
    assert res.code == 2
    assert_one_error_line(res.err, "--augment")
