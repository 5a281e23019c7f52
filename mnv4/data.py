"""CIFAR-10: the pickles as uint8 tensors on the device, normalisation, and each epoch's training batches."""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)


# The widely used CIFAR-10 constants: the mean per image of each channel's standard deviation, not the spread over
# all pixels (about 0.245, 0.243, 0.261), so normalised inputs have a spread of 1.2-1.3. Kept: every trained model
# and the shipped weights expect them.
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class Cifar10:
    """CIFAR-10 as uint8 tensors: images [N, 3, 32, 32], labels [N] (int64)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple = CIFAR10_CLASSES

    def to(self, device):
        return Cifar10(
            *(t.to(device) for t in (self.train_images, self.train_labels, self.test_images, self.test_labels)),
            self.classes,
        )

    def subset(self, max_train=None, max_test=None):
        """The first N samples of each split: deterministic, and near class-balanced (the files are shuffled)."""
        return Cifar10(
            self.train_images[:max_train],
            self.train_labels[:max_train],
            self.test_images[:max_test],
            self.test_labels[:max_test],
            self.classes,
        )


def _cifar_release():
    """Official file names, md5 sums and URL, taken from torchvision rather than copied here."""
    from torchvision.datasets import CIFAR10

    return CIFAR10


def load_cifar10(data_dir, download=True) -> Cifar10:
    """Read `data_dir/cifar-10-batches-py` (downloading the official archive if allowed and missing)."""
    release = _cifar_release()
    root = Path(data_dir).expanduser()
    folder = root / release.base_folder
    if not folder.is_dir():
        _fetch_cifar10(root, release, download)
    files = release.train_list + release.test_list
    mismatched = [name for name, md5 in files if (folder / name).is_file() and not _md5_ok(folder / name, md5)]
    if mismatched:
        warnings.warn(
            f"CIFAR-10 files in {folder} differ from the official release (md5 mismatch: "
            f"{', '.join(mismatched)}); continuing, but accuracies are not comparable with "
            "published numbers",
            stacklevel=2,
        )
    train = [_read_batch(folder / name) for name, _ in release.train_list]
    test_images, test_labels = _read_batch(folder / release.test_list[0][0])
    return Cifar10(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_images, test_labels)


def _md5_ok(path, md5):
    from torchvision.datasets.utils import check_md5

    return check_md5(str(path), md5)


def _fetch_cifar10(root: Path, release, download: bool):
    archive = root / release.filename
    where = f"put {release.filename} (from {release.url}) or its extracted {release.base_folder}/ folder in {root}"
    if not root.is_dir():
        raise UserError(
            f"data directory {root} does not exist: create it, or point --data-dir at the folder "
            f"holding {release.base_folder}/"
        )
    from torchvision.datasets.utils import download_url, extract_archive

    if not archive.is_file():
        if not download:
            raise UserError(f"CIFAR-10 not found in {root}: {where}")
        if not os.access(root, os.W_OK):
            raise UserError(
                f"data directory {root} is not writable, so CIFAR-10 cannot be downloaded there: "
                f"{where}, or choose a writable --data-dir"
            )
        try:
            download_url(release.url, str(root), release.filename, release.tgz_md5)
        except Exception as exc:  # network errors come in many types (URLError, HTTPError, OSError, ...)
            raise UserError(f"could not download CIFAR-10 ({type(exc).__name__}: {exc}); offline? {where}") from None
    if not _md5_ok(archive, release.tgz_md5):
        warnings.warn(f"{archive} differs from the official archive (md5 mismatch); extracting anyway", stacklevel=3)
    try:
        extract_archive(str(archive), str(root))
    except Exception as exc:
        raise UserError(f"could not extract {archive} ({type(exc).__name__}: {exc}): delete it and {where}") from None
    if not (root / release.base_folder).is_dir():
        raise UserError(f"{archive} did not contain {release.base_folder}/: delete it and {where}")


def _read_batch(path: Path):
    """One CIFAR-10 pickle -> (uint8 [N, 3, 32, 32], int64 [N]), refusing anything that is not one."""
    fix = "re-download CIFAR-10 or regenerate it (see README, 'Data')"
    if not path.is_file():
        raise UserError(f"CIFAR-10 file missing: {path}; {fix}")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:  # truncated or foreign files raise anything from EOFError to UnpicklingError
        raise UserError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}); {fix}") from None
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get("labels") if isinstance(entry, dict) else None
    if (
        getattr(data, "dtype", None) != "uint8"
        or getattr(data, "ndim", 0) != 2
        or data.shape[1] != 3072
        or labels is None
        or len(labels) != data.shape[0]
    ):
        raise UserError(f"{path} is not a CIFAR-10 batch (expected 'data' uint8 N x 3072 and N 'labels'); {fix}")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise UserError(f"{path} has labels outside 0..9; {fix}")
    return torch.from_numpy(data).reshape(-1, 3, 32, 32), labels


def batch_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """A distinct RNG seed per (run seed, epoch, step, rank): batches can be replayed exactly after a resume."""
    key = f"{seed}/{epoch}/{step}/{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def epoch_order(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(batch_seed(seed, epoch, -1))
    return torch.randperm(n, generator=gen).to(device)


_ON_DEVICE: dict = {}


def device_constant(values: tuple, device) -> torch.Tensor:
    """`values` as a float32 [1, C, 1, 1] tensor on `device`, made once per (values, device) and then reused: on a
    GPU each tensor made from Python numbers is a blocking host-to-device copy, a wait for the queued work."""
    key = (tuple(values), torch.device(device))
    constant = _ON_DEVICE.get(key)
    if constant is None:
        constant = torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        if type(constant) is torch.Tensor:  # a tensor subclass (a FakeTensor) belongs to the mode that made it
            _ON_DEVICE[key] = constant
    return constant


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalised float32, on the images' device."""
    mean, std = device_constant(CIFAR10_MEAN, images.device), device_constant(CIFAR10_STD, images.device)
    if images.dtype == torch.uint8:
        return images.float().mul_(1 / 255).sub_(mean).div_(std)
    return (images - mean) / std
