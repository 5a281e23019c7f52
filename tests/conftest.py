"""Shared test fixtures: the project root on sys.path and tiny CIFAR-10 files in the real pickle layout."""
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
            pickle.dump({"batch_label": name, "labels": labels.tolist(), "data": data,
                         "filenames": [f"{i}.png" for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_train_batch}, f)
    return root


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A data dir with 200 training and 40 test images (read-only by convention: copy before damaging)."""
    return write_tiny_cifar(tmp_path_factory.mktemp("cifar"))
