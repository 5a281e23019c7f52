"""Shared test fixtures: the project root on sys.path, tiny CIFAR-10 files in the real pickle layout, one thread
for the session, and the reference training runs several test modules compare against (helpers.py holds the
flags and functions)."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import helpers  # noqa: E402 (pytest puts tests/ on sys.path; helpers imports the project)

BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_tiny_cifar(root: Path, per_train_batch=40, test=40, seed=0) -> Path:
    """Write `root/cifar-10-batches-py` with the official file names and pickle layout, tiny and learnable:
    each class has its own mean colour, so a few steps of training beat chance."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    palette = rng.integers(30, 225, size=(10, 3))
    for name in BATCH_FILES:
        n = test if name == "test_batch" else per_train_batch
        labels = rng.integers(0, 10, size=n)
        images = palette[labels][:, :, None, None] + rng.normal(0, 25, size=(n, 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    "batch_label": name,
                    "labels": labels.tolist(),
                    "data": data,
                    "filenames": [f"{i}.png" for i in range(n)],
                },
                f,
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {
                "label_names": [
                    "airplane",
                    "automobile",
                    "bird",
                    "cat",
                    "deer",
                    "dog",
                    "frog",
                    "horse",
                    "ship",
                    "truck",
                ],
                "num_cases_per_batch": per_train_batch,
            },
            f,
        )
    return root


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A data dir with 200 training and 40 test images (read-only by convention: copy before damaging)."""
    return write_tiny_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole session: two shared cores, and bit-identity between runs (in this
    process, in subprocesses, before and after a resume) needs the same thread count everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic_flag_restored():
    """--deterministic switches a process-wide flag: each test leaves it as it found it."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="session")
def wrapper(tmp_path_factory) -> Path:
    """helpers.WRAPPER as a file: a training script run as a process with test hooks (see helpers.py)."""
    path = tmp_path_factory.mktemp("wrapper") / "hooked_run.py"
    path.write_text(helpers.WRAPPER)
    return path


# Reference runs shared by several test modules (read-only by convention: copy a folder before changing it).
@pytest.fixture(scope="session")
def base3(tiny_cifar, tmp_path_factory):
    """Baseline, 3 epochs straight, --deterministic."""
    out = tmp_path_factory.mktemp("base3") / "run"
    return out, helpers.train("baseline", tiny_cifar, out, 3)


@pytest.fixture(scope="session")
def base1(tiny_cifar, tmp_path_factory):
    """Baseline, --epochs 1 (same seed and flags as base3)."""
    out = tmp_path_factory.mktemp("base1") / "run"
    return out, helpers.train("baseline", tiny_cifar, out, 1)


@pytest.fixture(scope="session")
def enh2(tiny_cifar, tmp_path_factory):
    """Enhanced, 2 epochs straight, --deterministic with helpers.ENH_EXTRA (the notebook recipe, EMA)."""
    out = tmp_path_factory.mktemp("enh2") / "run"
    return out, helpers.train("enhanced", tiny_cifar, out, 2, *helpers.ENH_EXTRA)


@pytest.fixture(scope="session")
def learned(tiny_cifar, tmp_path_factory):
    """Baseline, 3 epochs on all 200 training images, batches of 8, --deterministic (helpers.LEARN)."""
    return helpers.learning_run("baseline", helpers.LEARN, 3, tiny_cifar, tmp_path_factory)


@pytest.fixture(scope="session")
def enh_learned(tiny_cifar, tmp_path_factory):
    """Enhanced, 4 epochs on all 200 training images, batches of 8, --lr 3e-3, --model-ema, --deterministic
    (helpers.ENH_LEARN)."""
    return helpers.learning_run("enhanced", helpers.ENH_LEARN, 4, tiny_cifar, tmp_path_factory)
