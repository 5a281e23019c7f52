"""Tests for sections 2 (Data) and 3 (Device) of common.py.

Loader: the tiny CIFAR-10 files of conftest.py in the official pickle layout, then damaged copies of them.
Augmentation: parameter distributions, per-sample independence, and exact agreement with torchvision's
sequential per-image transforms (RandomCrop -> RandomHorizontalFlip -> RandomRotation -> ColorJitter ->
RandomAffine(translate)) for known parameters. Batching, TTA views, evaluate, device and precision choice.
Everything runs on CPU; the whole file is meant to finish in well under a minute on two cores.
"""

import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
import urllib.error
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import common
import mnv4.data
import mnv4.evaluation
import mobilenetv4_enhanced
from conftest import BATCH_FILES
from helpers import MD5_WARNING, SCRIPTS, load, train

TRAIN_FILES = BATCH_FILES[:5]
SIZE = 32


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def copy_data(tiny_cifar: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny data dir, safe to damage."""
    root = tmp_path / "data"
    shutil.copytree(tiny_cifar, root)
    return root


def read_raw(path: Path):
    """What conftest wrote, decoded independently of common.py: data [N, 3072] uint8 and labels list."""
    with open(path, "rb") as f:
        entry = pickle.load(f)
    return entry["data"], entry["labels"]


def chw_from_rows(data: np.ndarray) -> np.ndarray:
    """CIFAR rows (1024 R, 1024 G, 1024 B, each row-major 32 x 32) -> [N, 3, 32, 32], by explicit indexing."""
    n = data.shape[0]
    out = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for y in range(32):
            out[:, c, y, :] = data[:, c * 1024 + y * 32 : c * 1024 + y * 32 + 32]
    return out


def load_quietly(root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return common.load_cifar10(root, **kwargs)


def zero_params(n):
    """Identity geometric parameters for n images."""
    return {
        "crop": torch.zeros(n, 2, dtype=torch.long),
        "flip": torch.zeros(n, dtype=torch.bool),
        "angle": torch.zeros(n),
        "shift": torch.zeros(n, 2),
    }


def one(params, i):
    return {k: v[i] for k, v in params.items()}


JITTER_FNS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def tv_jitter(img, factors, order):
    """torchvision's ColorJitter for one image, with given factors and op order (0 b, 1 c, 2 s, 3 h)."""
    for op in order.tolist():
        img = JITTER_FNS[op](img, float(factors[op]))
    return img


def tv_sequential(img, p, pad=4, jitter=False):
    """The enhanced recipe's torchvision pipeline for one float [3, H, W] image with fixed parameters."""
    h, w = img.shape[-2:]
    dy, dx = int(p["crop"][0]), int(p["crop"][1])
    img = TF.crop(TF.pad(img, [pad]), top=pad + dy, left=pad + dx, height=h, width=w)  # RandomCrop(32, pad)
    if bool(p["flip"]):
        img = TF.horizontal_flip(img)
    img = TF.rotate(img, float(p["angle"]), interpolation=InterpolationMode.NEAREST)
    if jitter:
        img = tv_jitter(img, p["jitter"], p["jitter_order"])
    return TF.affine(
        img,
        angle=0.0,
        translate=[int(p["shift"][0]), int(p["shift"][1])],
        scale=1.0,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.NEAREST,
    )


def rand_float_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g)


def rand_uint8_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


def indexed_data(n=100, seed=0):
    """Cifar10 whose train labels are the sample indices (0..n-1), so batches reveal which samples they hold."""
    images = rand_uint8_images(n, seed)
    return common.Cifar10(images, torch.arange(n), images[:10], torch.arange(10) % 10)


def draw(n, seed=0, cfg=None):
    cfg = common.AugmentConfig() if cfg is None else cfg
    return common.sample_augment_params(n, SIZE, cfg, torch.Generator().manual_seed(seed), "cpu")


# ---------------------------------------------------------------------------------------------------
# 1. Loader
# ---------------------------------------------------------------------------------------------------


def test_load_good_files_values(tiny_cifar):
    data = load_quietly(tiny_cifar)
    folder = tiny_cifar / "cifar-10-batches-py"
    raw = [read_raw(folder / name) for name in TRAIN_FILES]
    expected_train = np.concatenate([chw_from_rows(d) for d, _ in raw])
    expected_labels = np.concatenate([np.asarray(y) for _, y in raw])
    test_data, test_labels = read_raw(folder / "test_batch")

    assert data.train_images.shape == (200, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.train_labels.shape == (200,) and data.train_labels.dtype == torch.int64
    assert data.test_images.shape == (40, 3, 32, 32) and data.test_images.dtype == torch.uint8
    assert data.test_labels.shape == (40,) and data.test_labels.dtype == torch.int64
    assert np.array_equal(data.train_images.numpy(), expected_train)
    assert np.array_equal(data.train_labels.numpy(), expected_labels)
    assert np.array_equal(data.test_images.numpy(), chw_from_rows(test_data))
    assert data.test_labels.tolist() == list(test_labels)
    assert data.classes == common.CIFAR10_CLASSES and len(data.classes) == 10
    # Channel-first layout spot check: the first 1024 bytes of a row are the red plane.
    assert data.train_images[0, 0, 0, 1].item() == raw[0][0][0, 1]
    assert data.train_images[0, 1, 0, 0].item() == raw[0][0][0, 1024]
    assert data.train_images[0, 2, 31, 31].item() == raw[0][0][0, 3071]


def test_load_download_false_with_data_present(tiny_cifar, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def no_download(*args, **kwargs):
        raise AssertionError("download attempted although the data is present")

    monkeypatch.setattr(tv_utils, "download_url", no_download)
    assert load_quietly(tiny_cifar, download=False).train_images.shape[0] == 200
    assert load_quietly(tiny_cifar, download=True).train_images.shape[0] == 200


def test_md5_mismatch_warns_exactly_once(tiny_cifar):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        common.load_cifar10(tiny_cifar)
    user = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(user) == 1, [str(w.message) for w in caught]
    message = str(user[0].message)
    assert "md5" in message
    for name in BATCH_FILES:
        assert name in message


def damage_missing(path):
    path.unlink()


def damage_truncated(path):
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def damage_empty(path):
    path.write_bytes(b"")


def damage_garbage(path):
    path.write_bytes(b"this is not a pickle at all \x00\xff" * 64)


def pickled(obj):
    def damage(path):
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    return damage


def relabel(fn):
    def damage(path):
        data, labels = read_raw(path)
        with open(path, "wb") as f:
            pickle.dump({"data": data, "labels": fn(list(labels))}, f)

    return damage


def redata(fn):
    def damage(path):
        data, labels = read_raw(path)
        with open(path, "wb") as f:
            pickle.dump({"data": fn(data), "labels": labels}, f)

    return damage


def _set(labels, i, v):
    labels[i] = v
    return labels


DAMAGES = {
    "missing": damage_missing,
    "truncated": damage_truncated,
    "empty": damage_empty,
    "garbage": damage_garbage,
    "wrong_dict": pickled({"batch_label": "x", "images": np.zeros((4, 3072), np.uint8), "targets": [0] * 4}),
    "not_a_dict": pickled([1, 2, 3]),
    "label_10": relabel(lambda y: _set(y, 3, 10)),
    "label_negative": relabel(lambda y: _set(y, 0, -1)),
    "label_count": relabel(lambda y: y[:-1]),
    "float_data": redata(lambda d: d.astype(np.float32)),
    "wrong_width": redata(lambda d: d[:, :3000]),
    "flat_data": redata(lambda d: d.reshape(-1)),
}


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_file_raises_user_error_naming_it(tiny_cifar, tmp_path, damage, name):
    root = copy_data(tiny_cifar, tmp_path)
    path = root / "cifar-10-batches-py" / name
    DAMAGES[damage](path)
    with pytest.raises(common.UserError) as info:
        load_quietly(root, download=False)
    assert str(path) in str(info.value)


def test_nonexistent_data_dir(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_cifar10(missing)
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_cifar10(missing, download=False)
    assert not missing.exists()  # nothing was created


def test_no_data_without_download_says_where_to_put_it(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def no_download(*args, **kwargs):
        raise AssertionError("download attempted with download=False")

    monkeypatch.setattr(tv_utils, "download_url", no_download)
    with pytest.raises(common.UserError) as info:
        common.load_cifar10(tmp_path, download=False)
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path) in message


def test_download_failure_is_user_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def offline(url, root, filename=None, md5=None, *args, **kwargs):
        calls.append((url, filename))
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(common.UserError) as info:
        common.load_cifar10(tmp_path, download=True)
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message
    assert "URLError" in message
    assert calls and calls[0][1] == "cifar-10-python.tar.gz"


def test_download_then_extract(tiny_cifar, tmp_path, monkeypatch):
    """A (fake) successful download is extracted and loaded; both md5 mismatches are warned about."""
    import torchvision.datasets.utils as tv_utils

    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        tar.add(tiny_cifar / "cifar-10-batches-py", arcname="cifar-10-batches-py")

    def fake_download(url, root, filename=None, md5=None, *args, **kwargs):
        Path(root, filename).write_bytes(blob.getvalue())

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    root = tmp_path / "fresh"
    root.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = common.load_cifar10(root)
    assert len([w for w in caught if "md5" in str(w.message)]) == 2
    assert torch.equal(data.train_images, load_quietly(tiny_cifar).train_images)


def test_corrupt_archive_is_user_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not an archive" * 10)
    with pytest.raises(common.UserError, match="cifar-10-python.tar.gz"):
        load_quietly(tmp_path, download=False)


def tar_gz(folder: Path, arcname: str) -> bytes:
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return blob.getvalue()


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def test_files_matching_the_release_md5_load_without_a_warning(tiny_cifar, tmp_path, monkeypatch):
    """With md5 sums that the tiny files match (hashlib's, as if they were the release), the download, the
    extraction and the load warn about nothing."""
    import torchvision.datasets.utils as tv_utils

    folder = tiny_cifar / "cifar-10-batches-py"
    blob = tar_gz(folder, "cifar-10-batches-py")
    official = mnv4.data._cifar_release()
    release = SimpleNamespace(
        base_folder=official.base_folder,
        filename=official.filename,
        url=official.url,
        tgz_md5=md5(blob),
        train_list=[[name, md5((folder / name).read_bytes())] for name, _ in official.train_list],
        test_list=[[name, md5((folder / name).read_bytes())] for name, _ in official.test_list],
    )
    monkeypatch.setattr(mnv4.data, "_cifar_release", lambda: release)
    monkeypatch.setattr(
        tv_utils, "download_url", lambda url, root, filename, md5: Path(root, filename).write_bytes(blob)
    )
    root = tmp_path / "fresh"
    root.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = common.load_cifar10(root)
    assert [str(w.message) for w in caught] == []
    assert torch.equal(data.test_images, load_quietly(tiny_cifar).test_images)


def test_a_data_dir_that_is_not_writable_is_refused_before_downloading(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else access(path, mode))
    monkeypatch.setattr(tv_utils, "download_url", lambda *a, **k: pytest.fail("download into a read-only folder"))
    with pytest.raises(common.UserError, match="not writable") as info:
        common.load_cifar10(tmp_path, download=True)
    assert "--data-dir" in str(info.value) and str(tmp_path) in str(info.value)


def test_an_archive_without_the_cifar_folder_is_refused(tiny_cifar, tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(tar_gz(tiny_cifar / "cifar-10-batches-py", "other"))
    with pytest.raises(common.UserError, match="did not contain cifar-10-batches-py/") as info:
        load_quietly(tmp_path, download=False)
    assert "delete it" in str(info.value)


def test_subset_is_first_n_and_deterministic(tiny_cifar):
    data = load_quietly(tiny_cifar)
    sub = data.subset(50, 7)
    assert torch.equal(sub.train_images, data.train_images[:50])
    assert torch.equal(sub.train_labels, data.train_labels[:50])
    assert torch.equal(sub.test_images, data.test_images[:7])
    assert torch.equal(sub.test_labels, data.test_labels[:7])
    assert sub.classes == data.classes
    again = load_quietly(tiny_cifar).subset(50, 7)
    assert torch.equal(again.train_images, sub.train_images) and torch.equal(again.test_labels, sub.test_labels)
    full = data.subset()
    assert full.train_images.shape[0] == 200 and full.test_images.shape[0] == 40
    moved = sub.to("cpu")
    assert torch.equal(moved.train_images, sub.train_images) and moved.classes == sub.classes


def test_normalize():
    x = rand_uint8_images(4)
    before = x.clone()
    out = common.normalize(x)
    assert out.dtype == torch.float32 and torch.equal(x, before)
    mean = torch.tensor(common.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.double() / 255 - mean.double()).div(std.double()).float(), atol=1e-5, rtol=1e-5)
    xf = x.float() / 255
    torch.testing.assert_close(common.normalize(xf), out, atol=1e-5, rtol=1e-5)
    assert torch.equal(xf, x.float() / 255)  # float input not modified in place


def test_batch_seed_distinct_and_stable():
    seeds = {common.batch_seed(s, e, k) for s in (0, 1) for e in (0, 1, 2) for k in (-1, 0, 1, 2)}
    assert len(seeds) == 24
    assert all(0 <= v < 2**63 for v in seeds)
    assert common.batch_seed(3, 4, 5) == common.batch_seed(3, 4, 5)


# ---------------------------------------------------------------------------------------------------
# 2. Augmentation parameter distributions
# ---------------------------------------------------------------------------------------------------

N_DIST = 20_000


@pytest.fixture(scope="module")
def params():
    return draw(N_DIST, seed=1234)


def assert_counts(values, probs, n=N_DIST, sigmas=5.0):
    """Each value's count within `sigmas` binomial standard deviations of n * p, and nothing else present."""
    uniq, counts = torch.unique(values, return_counts=True)
    assert sorted(uniq.tolist()) == sorted(probs), (uniq.tolist(), sorted(probs))
    for v, c in zip(uniq.tolist(), counts.tolist()):
        p = probs[v]
        assert abs(c - n * p) <= sigmas * (n * p * (1 - p)) ** 0.5, (v, c, n * p)


def test_param_shapes(params):
    n = N_DIST
    assert params["crop"].shape == (n, 2) and not params["crop"].dtype.is_floating_point
    assert params["flip"].shape == (n,) and params["flip"].dtype == torch.bool
    assert params["angle"].shape == (n,)
    assert params["jitter"].shape == (n, 4)
    assert params["jitter_order"].shape == (n, 4)
    assert params["shift"].shape == (n, 2)


def test_flip_rate(params):
    rate = params["flip"].float().mean().item()
    assert abs(rate - 0.5) <= 4 * (0.25 / N_DIST) ** 0.5
    never = draw(1000, cfg=common.AugmentConfig(flip_prob=0.0))["flip"]
    always = draw(1000, cfg=common.AugmentConfig(flip_prob=1.0))["flip"]
    assert not never.any() and always.all()


def test_crop_offsets_uniform_minus4_to_4(params):
    for axis in (0, 1):
        assert_counts(params["crop"][:, axis], {v: 1 / 9 for v in range(-4, 5)})
    assert not torch.equal(params["crop"][:, 0], params["crop"][:, 1])  # rows and cols drawn independently
    small = draw(2000, cfg=common.AugmentConfig(crop_padding=1))["crop"]
    assert sorted(torch.unique(small).tolist()) == [-1, 0, 1]


def test_shift_integers_minus3_to_3(params):
    shift = params["shift"]
    assert torch.equal(shift, shift.round())
    # round(U(-3.2, 3.2)): each inner integer owns a width-1 interval, +-3 only [2.5, 3.2].
    probs = {v: 1 / 6.4 for v in range(-2, 3)} | {-3: 0.7 / 6.4, 3: 0.7 / 6.4}
    for axis in (0, 1):
        assert_counts(shift[:, axis], probs)
    assert not torch.equal(shift[:, 0], shift[:, 1])
    assert not draw(100, cfg=common.AugmentConfig(translate=0.0))["shift"].any()


def test_angle_uniform_within_15(params):
    angle = params["angle"].double()
    assert angle.min() >= -15 and angle.max() <= 15
    assert angle.min() < -14.9 and angle.max() > 14.9
    sd = 15 / 3**0.5
    assert abs(angle.mean().item()) <= 5 * sd / N_DIST**0.5
    qs = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(angle, qs), -15 + 30 * qs, atol=0.4, rtol=0)
    assert abs(angle.std().item() - sd) < 0.1


def test_jitter_factor_ranges(params):
    jitter = params["jitter"].double()
    for col in range(3):  # brightness, contrast, saturation in [0.8, 1.2]
        f = jitter[:, col]
        assert f.min() >= 0.8 and f.max() <= 1.2
        assert f.min() < 0.805 and f.max() > 1.195
        assert abs(f.mean().item() - 1.0) < 0.005
    hue = jitter[:, 3]
    assert hue.min() >= -0.1 and hue.max() <= 0.1
    assert hue.min() < -0.099 and hue.max() > 0.099
    assert abs(hue.mean().item()) < 0.003
    # The four factors are drawn independently, not one draw reused.
    assert torch.corrcoef(jitter[:, :3].T).sub(torch.eye(3, dtype=torch.float64)).abs().max() < 0.05


def test_jitter_order_is_uniform_permutation(params):
    order = params["jitter_order"]
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(N_DIST, 4))
    rows, counts = torch.unique(order, dim=0, return_counts=True)
    assert rows.shape[0] == 24
    p = 1 / 24
    assert (counts.double() - N_DIST * p).abs().max() <= 5 * (N_DIST * p * (1 - p)) ** 0.5


def test_params_deterministic_per_generator():
    a, b, c = draw(64, seed=7), draw(64, seed=7), draw(64, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["angle"], c["angle"])


# ---------------------------------------------------------------------------------------------------
# 3. Per-sample parameters
# ---------------------------------------------------------------------------------------------------


def test_each_sample_gets_its_own_params():
    p = draw(64, seed=3)
    assert torch.unique(p["angle"]).numel() == 64
    assert torch.unique(p["jitter"], dim=0).shape[0] == 64
    assert torch.unique(p["crop"], dim=0).shape[0] > 20
    assert 0 < p["flip"].sum() < 64
    assert torch.unique(p["jitter_order"], dim=0).shape[0] > 10
    assert torch.unique(p["shift"], dim=0).shape[0] > 10


def test_identical_images_augment_differently():
    image = rand_uint8_images(1, seed=5)
    batch = image.expand(16, -1, -1, -1).contiguous()
    out = common.augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    flat = out.flatten(1)
    distinct = torch.cdist(flat, flat) + torch.eye(16) * 1e9
    assert distinct.min() > 1e-3  # every pair of outputs differs
    assert torch.equal(batch, image.expand(16, -1, -1, -1))  # input untouched


def test_augment_deterministic_per_generator():
    x = rand_uint8_images(8, seed=2)
    a = common.augment(x, torch.Generator().manual_seed(11))
    b = common.augment(x, torch.Generator().manual_seed(11))
    c = common.augment(x, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------
# 4. Exactness for known parameters
# ---------------------------------------------------------------------------------------------------


def test_pure_flip():
    x = rand_float_images(6)
    p = zero_params(6)
    p["flip"] = torch.tensor([True, False, True, True, False, False])
    out, in_view = common.geometric_transform(x, p)
    expected = torch.where(p["flip"].view(-1, 1, 1, 1), torch.flip(x, [3]), x)
    assert torch.equal(out, expected)
    assert in_view.all()


@pytest.mark.parametrize("dy,dx", [(4, -2), (-3, 1), (0, 4), (-4, -4), (2, 0)])
def test_pure_crop_matches_padded_slice(dy, dx):
    """RandomCrop(32, padding=4): top-left of the window in the padded image is (pad + row offset, pad + col)."""
    x = rand_float_images(2)
    p = zero_params(2)
    p["crop"] = torch.tensor([[dy, dx], [0, 0]])
    out, in_view = common.geometric_transform(x, p)
    padded = F.pad(x, (4, 4, 4, 4))
    assert torch.equal(out[0], padded[0, :, 4 + dy : 36 + dy, 4 + dx : 36 + dx])
    assert torch.equal(out[0], TF.crop(TF.pad(x[0], [4]), top=4 + dy, left=4 + dx, height=32, width=32))
    assert torch.equal(out[1], x[1])
    assert in_view.all()  # cropping is not translation: the in-view mask stays full


@pytest.mark.parametrize("dx,dy", [(3, -2), (-3, 3), (0, 1), (-1, 0), (2, 2)])
def test_pure_translation_matches_torchvision_affine(dx, dy):
    x = rand_float_images(1)
    p = zero_params(1)
    p["shift"] = torch.tensor([[float(dx), float(dy)]])
    out, in_view = common.geometric_transform(x, p)
    expected = TF.affine(
        x, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST
    )
    assert torch.equal(out, expected)
    visible = TF.affine(
        torch.ones(1, 1, 32, 32),
        angle=0.0,
        translate=[dx, dy],
        scale=1.0,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.NEAREST,
    ).bool()
    assert torch.equal(in_view, visible)


def test_pure_rotation_matches_torchvision_rotate():
    n = 48
    x = rand_float_images(n)
    p = zero_params(n)
    angles = torch.cat([torch.tensor([15.0, -15.0, 0.0, 7.5, -0.3, 45.0, 90.0, -90.0]), draw(n - 8)["angle"]])
    p["angle"] = angles
    out, in_view = common.geometric_transform(x, p)
    expected = torch.stack(
        [TF.rotate(x[i], float(angles[i]), interpolation=InterpolationMode.NEAREST) for i in range(n)]
    )
    mismatch = (out != expected).any(1).float().mean().item()
    assert mismatch <= 1e-3, mismatch  # nearest-neighbour ties may round differently on a few pixels
    assert torch.equal(out[2], x[2])
    assert in_view.all()


def sequential_reference(x, p, pad=4):
    return torch.stack([tv_sequential(x[i], one(p, i), pad) for i in range(x.shape[0])])


def test_geometry_without_crop_matches_sequential_pipeline():
    """Flip -> rotate -> translate composed in the right order (crop offsets zero)."""
    x = rand_float_images(64)
    p = draw(64, seed=21)
    p["crop"] = torch.zeros_like(p["crop"])
    out, _ = common.geometric_transform(x, p)
    assert (out != sequential_reference(x, p)).any(1).float().mean().item() <= 1e-3


def test_geometry_without_rotation_matches_sequential_pipeline():
    """Crop -> flip -> translate composed in the right order (no rotation)."""
    x = rand_float_images(64)
    p = draw(64, seed=22)
    p["angle"] = torch.zeros_like(p["angle"])
    out, _ = common.geometric_transform(x, p)
    assert torch.equal(out, sequential_reference(x, p))


def test_geometry_full_matches_sequential_pipeline():
    x = rand_float_images(64)
    p = draw(64, seed=23)
    out, _ = common.geometric_transform(x, p)
    assert (out != sequential_reference(x, p)).any(1).float().mean().item() <= 1e-3


def test_crop_then_rotation_corner_is_black():
    x = torch.ones(1, 3, 32, 32)
    p = zero_params(1)
    p["crop"] = torch.tensor([[0, 4]])  # window 4 columns right: the cropped image's last 4 columns are fill
    p["angle"] = torch.tensor([15.0])  # counter-clockwise: the bottom-left corner comes from left of the frame
    out, _ = common.geometric_transform(x, p)
    expected = TF.rotate(F.pad(x, (4, 4, 4, 4))[..., 4:36, 8:40], 15.0, interpolation=InterpolationMode.NEAREST)
    assert torch.equal(out, expected)


def test_color_jitter_matches_torchvision_random_orders():
    n = 64
    x = rand_float_images(n, seed=4)
    p = draw(n, seed=5)
    before = x.clone()
    out = common.color_jitter(x, p["jitter"], p["jitter_order"])
    assert torch.equal(x, before)  # input untouched
    expected = torch.stack([tv_jitter(x[i], p["jitter"][i], p["jitter_order"][i]) for i in range(n)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)])
def test_color_jitter_matches_torchvision_fixed_order(order):
    n = 8
    x = rand_float_images(n, seed=6)
    x[:, :, :4] = x[:, :1, :4]  # grey rows (hue undefined)
    x[:, :, 4:8] = (x[:, :, 4:8] > 0.5).float()  # saturated primaries, black and white
    factors = torch.tensor(
        [
            [1.2, 0.8, 1.15, 0.1],
            [0.8, 1.2, 0.85, -0.1],
            [1.0, 1.0, 1.0, 0.0],
            [0.9, 1.1, 0.8, 0.05],
            [1.1, 0.9, 1.2, -0.05],
            [1.19, 1.19, 1.19, 0.099],
            [0.81, 0.81, 0.81, -0.099],
            [1.05, 0.95, 1.0, 0.5],
        ]
    )
    orders = torch.tensor(order).expand(n, 4)
    out = common.color_jitter(x, factors, orders)
    expected = torch.stack([tv_jitter(x[i], factors[i], orders[i]) for i in range(n)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], x[2], atol=1e-6, rtol=0)  # identity factors leave the image alone


def test_augment_matches_torchvision_pipeline_without_crop_and_translate():
    """augment == crop/flip/rotate/jitter/translate of torchvision, parameters drawn from the same generator."""
    cfg = common.AugmentConfig(crop_padding=0, translate=0.0)
    x = rand_uint8_images(32, seed=8)
    out = common.augment(x, torch.Generator().manual_seed(9), cfg)
    p = common.sample_augment_params(32, SIZE, cfg, torch.Generator().manual_seed(9), "cpu")
    expected = torch.stack([tv_sequential(x[i].float() / 255, one(p, i), pad=0, jitter=True) for i in range(32)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_augment_translation_border_black_and_close_to_torchvision():
    """With translation, the translated-in border is exactly black; elsewhere the only documented deviation
    (contrast's mean taken after the translation) moves values by at most (1 - 0.8) * |mean change|."""
    cfg = common.AugmentConfig(crop_padding=0)
    x = rand_uint8_images(32, seed=10)
    out = common.augment(x, torch.Generator().manual_seed(11), cfg)
    p = common.sample_augment_params(32, SIZE, cfg, torch.Generator().manual_seed(11), "cpu")
    expected = torch.stack([tv_sequential(x[i].float() / 255, one(p, i), pad=0, jitter=True) for i in range(32)])
    _, in_view = common.geometric_transform(torch.zeros(32, 3, 32, 32), p)
    assert (~in_view).any()
    assert (out * ~in_view).abs().max() == 0
    assert (expected * ~in_view).abs().max() == 0
    assert (out - expected).abs().max() <= 0.05
    exact = (p["shift"] == 0).all(1)  # samples that are not translated match torchvision exactly
    assert exact.any()
    torch.testing.assert_close(out[exact], expected[exact], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# 5. train_batches_for_epoch
# ---------------------------------------------------------------------------------------------------


def batches(data, bs=16, seed=0, epoch=0, **kwargs):
    return list(common.train_batches_for_epoch(data, bs, seed, epoch, **kwargs))


def test_batches_without_augmentation_are_normalised_samples():
    data = indexed_data(100)
    out = batches(data, bs=16)
    assert len(out) == 6  # 100 // 16, the partial batch of 4 dropped
    for images, labels in out:
        assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32 and labels.shape == (16,)
        assert torch.equal(images, common.normalize(data.train_images[labels]))
    labels = torch.cat([y for _, y in out])
    assert labels.unique().numel() == 96  # no duplicates within an epoch
    assert torch.equal(labels, common.epoch_order(100, 0, 0, "cpu")[:96])


@pytest.mark.parametrize("aug", [None, common.AugmentConfig()], ids=["plain", "augment"])
def test_same_seed_epoch_identical_and_epochs_differ(aug):
    data = indexed_data(100)
    a = batches(data, seed=3, epoch=1, augment_cfg=aug)
    b = batches(data, seed=3, epoch=1, augment_cfg=aug)
    assert len(a) == len(b) == 6
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    for other in (batches(data, seed=3, epoch=2, augment_cfg=aug), batches(data, seed=4, epoch=1, augment_cfg=aug)):
        la, lo = torch.cat([y for _, y in a]), torch.cat([y for _, y in other])
        assert not torch.equal(la, lo)
        assert lo.unique().numel() == 96


@pytest.mark.parametrize("aug", [None, common.AugmentConfig()], ids=["plain", "augment"])
@pytest.mark.parametrize("chunk_images", [48, 80, 8, 1024], ids=["chunk3", "chunk5_uneven", "chunk_lt_bs", "big"])
def test_start_step_replays_tail_of_full_pass(aug, chunk_images):
    data = indexed_data(200)
    full = batches(data, bs=16, seed=1, epoch=2, augment_cfg=aug, chunk_images=chunk_images)
    assert len(full) == 12
    for k in (0, 1, 4, 5, 7, 11, 12):
        tail = batches(data, bs=16, seed=1, epoch=2, start_step=k, augment_cfg=aug, chunk_images=chunk_images)
        assert len(tail) == 12 - k
        for (x1, y1), (x2, y2) in zip(full[k:], tail):
            assert torch.equal(y1, y2) and torch.equal(x1, x2)


def test_augmented_batches_differ_from_plain_and_keep_label_set():
    data = indexed_data(100)
    plain = batches(data, bs=16, seed=2)
    aug = batches(data, bs=16, seed=2, augment_cfg=common.AugmentConfig())
    for (xp, yp), (xa, ya) in zip(plain, aug):
        assert torch.equal(yp, ya)  # same order: augmentation does not consume the order's randomness
        assert not torch.equal(xp, xa)
        assert xa.shape == xp.shape and xa.dtype == torch.float32
    # Normalised [0, 1] images stay within the normalised range of black..white.
    lo = common.normalize(torch.zeros(1, 3, 1, 1)).min()
    hi = common.normalize(torch.ones(1, 3, 1, 1)).max()
    allx = torch.cat([x for x, _ in aug])
    assert allx.min() >= lo - 1e-5 and allx.max() <= hi + 1e-5


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint_slices_of_the_global_batch(world_size):
    """Global step s covers order[s*B*W:(s+1)*B*W]; rank r takes its r-th B; partial global batch dropped."""
    data = indexed_data(100)
    bs = 8
    per_rank = [batches(data, bs=bs, seed=5, epoch=1, rank=r, world_size=world_size) for r in range(world_size)]
    steps = 100 // (bs * world_size)
    order = common.epoch_order(100, 5, 1, "cpu")
    assert all(len(b) == steps for b in per_rank)
    for s in range(steps):
        glob = torch.cat([per_rank[r][s][1] for r in range(world_size)])
        assert torch.equal(glob, order[s * bs * world_size : (s + 1) * bs * world_size])
    everything = torch.cat([y for b in per_rank for _, y in b])
    assert everything.unique().numel() == steps * bs * world_size  # disjoint shards, nothing twice


def test_rank_augmentation_and_resume():
    data = indexed_data(200)
    cfg = common.AugmentConfig()
    full = batches(data, bs=8, seed=1, epoch=0, augment_cfg=cfg, chunk_images=24, rank=1, world_size=2)
    assert len(full) == 12
    for k in (3, 5, 11):
        tail = batches(
            data, bs=8, seed=1, epoch=0, start_step=k, augment_cfg=cfg, chunk_images=24, rank=1, world_size=2
        )
        assert len(tail) == 12 - k
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[k:], tail))
    # The same images on two ranks would get different draws (the seed includes the rank).
    same = common.Cifar10(
        data.train_images[:1].expand(200, -1, -1, -1), torch.arange(200), data.test_images, data.test_labels
    )
    r0 = batches(same, bs=8, seed=1, epoch=0, augment_cfg=cfg, rank=0, world_size=2)[0][0]
    r1 = batches(same, bs=8, seed=1, epoch=0, augment_cfg=cfg, rank=1, world_size=2)[0][0]
    assert not torch.equal(r0, r1)


def test_batches_on_real_layout(tiny_cifar):
    data = load_quietly(tiny_cifar)
    out = batches(data, bs=32, seed=0, epoch=0)
    assert len(out) == 6  # 200 // 32, 8 dropped
    counts = torch.bincount(torch.cat([y for _, y in out]), minlength=10)
    assert (counts <= torch.bincount(data.train_labels, minlength=10)).all()
    assert counts.sum() == 192


# ---------------------------------------------------------------------------------------------------
# 6. TTA views and evaluate
# ---------------------------------------------------------------------------------------------------


def test_tta_views_shapes_and_counts():
    x = rand_uint8_images(3)
    assert {k: len(v) for k, v in common.TTA_VIEWS.items()} == {"none": 1, "flip": 2, "flip_rot90": 4, "flip_shift": 10}
    for name, views in common.TTA_VIEWS.items():
        for view in views:
            out = view(x)
            assert out.shape == x.shape and out.dtype == x.dtype, name
    assert torch.equal(common.TTA_VIEWS["none"][0](x), x)
    assert torch.equal(common.TTA_VIEWS["flip"][0](x), x)
    assert torch.equal(common.TTA_VIEWS["flip"][1](x), torch.flip(x, [3]))
    rot = [v(x) for v in common.TTA_VIEWS["flip_rot90"]]
    for ref in (x, torch.flip(x, [3]), torch.rot90(x, 1, (2, 3)), torch.rot90(x, -1, (2, 3))):
        assert any(torch.equal(r, ref) for r in rot)


def test_tta_shift_views_fill_with_zeros():
    """flip_shift is {identity, flip} x {no shift, +-2 px in x, +-2 px in y}, zero-filled, each view once."""
    x = torch.randint(1, 256, (2, 3, 32, 32), dtype=torch.uint8)  # no zero pixels of its own
    expected = {}
    for f in (False, True):
        for dx, dy in ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)):
            src = torch.flip(x, [3]) if f else x
            expected[(f, dx, dy)] = TF.affine(
                src, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST
            )
    seen = []
    for view in common.TTA_VIEWS["flip_shift"]:
        out = view(x)
        match = [key for key, ref in expected.items() if torch.equal(out, ref)]
        assert len(match) == 1, "a flip_shift view matches no expected zero-filled shift"
        f, dx, dy = match[0]
        assert (out == 0).all(1).sum().item() == 2 * 32 * (abs(dx) + abs(dy))
        seen.append(match[0])
    assert sorted(seen) == sorted(expected)


def test_tta_modes_share_view_objects():
    """The TTA table evaluates each distinct view once: identity and flip are the same objects in every mode."""
    views = common.TTA_VIEWS
    assert views["none"][0] is views["flip"][0] is views["flip_rot90"][0] is views["flip_shift"][0]
    assert views["flip"][1] is views["flip_rot90"][1] is views["flip_shift"][1]
    assert len({v for mode in views.values() for v in mode}) == 12


def test_tta_table_matches_evaluate_per_mode():
    torch.manual_seed(0)
    model = PixelLinear()
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (24,))
    table = common.tta_table(model, images, labels, batch_size=7)
    for name, views in common.TTA_VIEWS.items():
        loss, acc, preds = common.evaluate(model, images, labels, batch_size=7, views=views)
        assert table[name][1] == pytest.approx(acc)
        assert table[name][0] == pytest.approx(loss, rel=1e-5)
        assert torch.equal(table[name][2], preds)


class PixelLinear(nn.Module):
    """Not flip-invariant: a fixed random linear map of the whole image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 32 * 32, 10)
        nn.init.normal_(self.fc.weight, std=0.05)

    def forward(self, x):
        return self.fc(x.flatten(1))


def manual_eval(model, images, labels, views):
    with torch.no_grad():
        probs = sum(model(common.normalize(v(images))).softmax(1) for v in views) / len(views)
    preds = probs.argmax(1)
    loss = F.nll_loss(probs.log(), labels).item()
    return loss, (preds == labels).double().mean().item() * 100, preds


def test_score_of_one_and_of_no_image_by_hand():
    """One image, right with probability 0.8: loss -ln 0.8, accuracy 100%. A rank whose shard is empty predicts a
    [0, 10] block (nothing to add to the gathered predictions)."""
    probs = torch.full((1, 10), 0.2 / 9)
    probs[0, 3] = 0.8
    loss, accuracy, preds = mnv4.evaluation.score(probs, torch.tensor([3]))
    assert loss == pytest.approx(-math.log(0.8), rel=1e-6) and accuracy == 100.0 and preds.tolist() == [3]
    model = common.mobilenetv4("conv_small", 10, width_mult=0.25)
    assert common.predict_probs(model, torch.zeros(0, 3, 32, 32, dtype=torch.uint8)).shape == (0, 10)


@pytest.mark.parametrize("view_name", ["none", "flip", "flip_shift"])
def test_evaluate_matches_manual_computation(tiny_cifar, view_name):
    data = load_quietly(tiny_cifar)
    model = PixelLinear()
    views = common.TTA_VIEWS[view_name]
    loss, acc, preds = common.evaluate(model, data.test_images, data.test_labels, batch_size=16, views=views)
    m_loss, m_acc, m_preds = manual_eval(model, data.test_images, data.test_labels, views)
    assert torch.equal(preds, m_preds)
    assert acc == pytest.approx(m_acc, abs=1e-9)
    assert acc == pytest.approx((preds == data.test_labels).double().mean().item() * 100, abs=1e-9)
    assert loss == pytest.approx(m_loss, rel=1e-4)
    if view_name == "flip":  # the flip view matters for this model: averaging changes some probabilities
        none_loss, _, _ = common.evaluate(model, data.test_images, data.test_labels, views=common.TTA_VIEWS["none"])
        assert none_loss != pytest.approx(loss, rel=1e-6)


def test_evaluate_mobilenet_none_view(tiny_cifar):
    data = load_quietly(tiny_cifar)
    torch.manual_seed(0)
    model = common.mobilenetv4("conv_small", width_mult=0.25)
    model.train()
    loss, acc, preds = common.evaluate(model, data.test_images, data.test_labels, batch_size=16)
    assert not model.training  # evaluate switches to eval mode
    assert preds.shape == (40,) and preds.dtype == torch.int64
    assert acc == pytest.approx((preds == data.test_labels).double().mean().item() * 100, abs=1e-9)
    m_loss, _, m_preds = manual_eval(model, data.test_images, data.test_labels, common.TTA_VIEWS["none"])
    assert torch.equal(preds, m_preds)
    assert loss == pytest.approx(m_loss, rel=1e-4)


class FakeRankDist(common.Distributed):
    """One rank of a simulated world: collectives replaced so that summing the per-rank results of
    `evaluate` gives the whole-world result (all_sum -> identity, gather -> this rank's preds in place)."""

    def __init__(self, rank, world_size):
        super().__init__({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})

    def all_sum(self, tensor):
        return tensor

    def gather_shards(self, local, n):
        full = torch.full((n,), -1, dtype=local.dtype)
        full[self.shard(n)] = local
        return full


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluate_sharded_counts_each_image_once(tiny_cifar, world_size):
    data = load_quietly(tiny_cifar)
    images, labels = data.test_images[:37], data.test_labels[:37]  # uneven shards
    model = PixelLinear()
    loss, acc, preds = common.evaluate(model, images, labels, batch_size=8, views=common.TTA_VIEWS["flip"])
    parts = [
        common.evaluate(
            model, images, labels, batch_size=8, views=common.TTA_VIEWS["flip"], dist=FakeRankDist(r, world_size)
        )
        for r in range(world_size)
    ]
    assert sum(p[0] for p in parts) == pytest.approx(loss, rel=1e-6)
    assert sum(p[1] for p in parts) == pytest.approx(acc, abs=1e-9)
    merged = torch.stack([p[2] for p in parts]).amax(0)
    assert torch.equal(merged, preds)
    assert ((torch.stack([p[2] for p in parts]) >= 0).sum(0) == 1).all()  # each image on exactly one rank


@pytest.mark.filterwarnings(f"ignore:{MD5_WARNING}")
def test_baseline_augment_flag_augments(base1, tiny_cifar, tmp_path):
    plain = load(base1[0] / "last.pt")["model"]
    train("baseline", tiny_cifar, tmp_path / "aug", 1, "--augment")
    augmented = load(tmp_path / "aug" / "last.pt")["model"]
    assert not torch.equal(plain["stem.0.weight"], augmented["stem.0.weight"])  # other batches, other weights


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_augmentation_flags_build_the_config(script):
    parse = SCRIPTS[script].parse_args
    # The notebook's torchvision list (test_a_recipe_sets_the_augmentation_defaults: a recipe's own ops)
    assert common.augment_config(parse(["--recipe", "notebook"])) == common.AugmentConfig()
    cfg = common.augment_config(
        parse(
            [
                "--augment",
                "--rotation",
                "0",
                "--color-jitter",
                "0",
                "0",
                "0",
                "0",
                "--cutout",
                "8",
                "--crop-padding",
                "2",
                "--hflip",
                "0.25",
                "--translate",
                "0.05",
            ]
        )
    )
    assert cfg == common.AugmentConfig(
        crop_padding=2,
        flip_prob=0.25,
        rotation=0.0,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.0,
        translate=0.05,
        cutout=8,
    )


def test_a_recipe_sets_the_augmentation_defaults():
    """A recipe may choose its augmentation ops (the study can drop some): its entries become the flags'
    defaults, --help shows them, and --no-augment still works since the ops then equal the defaults."""
    recipes = {
        "lighter": {**mobilenetv4_enhanced.NOTEBOOK_RECIPE, "rotation": 0.0, "color_jitter": (0.0, 0.0, 0.0, 0.0)}
    }
    parser = common.build_parser(recipes, "lighter", "test")
    cfg = common.augment_config(common.parse_args(parser, []))
    assert cfg == common.AugmentConfig(rotation=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    assert common.parse_args(common.build_parser(recipes, "lighter", "test"), ["--no-augment"]).augment is False
    assert "RandomRotation degrees; 0: off (default: 0.0)" in " ".join(parser.format_help().split())


def test_cutout_fills_one_square_per_image_with_the_mean():
    """Cutout (DeVries & Taylor 2017): a side x side square, centre uniform over the image, clipped at the
    border, filled with the dataset mean (zero after normalisation, as in the paper)."""
    x = torch.full((256, 3, 32, 32), 255, dtype=torch.uint8)
    cfg = common.AugmentConfig(
        crop_padding=0,
        flip_prob=0.0,
        rotation=0.0,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.0,
        translate=0.0,
        cutout=8,
    )
    out = common.augment(x, torch.Generator().manual_seed(0), cfg)
    mean = torch.tensor(common.CIFAR10_MEAN).view(1, 3, 1, 1)
    filled = torch.isclose(out, mean.expand_as(out), atol=1e-6).all(1)  # [B, H, W]
    untouched = torch.isclose(out, torch.ones_like(out), atol=1e-6).all(1)
    assert (filled | untouched).all()
    area = filled.flatten(1).sum(1)
    assert area.max() == 64 and area.min() >= 16  # a full 8x8 square, or one clipped at a corner (>= 4x4)
    assert (area < 64).any()  # centres near the border do get clipped
    rows, cols = filled.any(2), filled.any(1)  # the filled pixels form one axis-aligned rectangle
    assert torch.equal(area, rows.sum(1) * cols.sum(1))
    normalised = common.normalize(out)
    assert normalised.masked_select(filled.unsqueeze(1).expand_as(out)).abs().max() < 1e-5
