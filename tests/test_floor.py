"""What must work on the lowest torch / torchvision that requirements.txt allows. CI runs this file (and the
precision-context tests of tests/test_devices.py, see the Makefile's `test-floor`) a second time in an
environment holding exactly those releases; in the main environment it runs with the rest of the suite.

Import, every model variant, one tiny epoch of each script, a mid-epoch stop resumed to the bit, a run replayed
from its config.json, and predict.py classifying the test images as the run's own evaluation did."""

import json
from pathlib import Path

import pytest
import torch
import torchvision

import common
import predict
from helpers import TINY, run_main
from inference_support import write_pngs

pytestmark = pytest.mark.filterwarnings("ignore:CIFAR-10 files")

TWO_EPOCHS = [*TINY, "--epochs", "2", "--deterministic", "--no-tta-table"]


def test_the_floor_is_what_requirements_allow():
    """The version this environment holds satisfies requirements.txt's lower bounds (the floor run pins them)."""
    bounds = {}
    for line in (Path(__file__).resolve().parents[1] / "requirements.txt").read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition(">=")
        if name in ("torch", "torchvision"):
            bounds[name] = tuple(int(p) for p in version.split("."))
    for module in (torch, torchvision):
        release = tuple(int(p) for p in module.__version__.split("+")[0].split(".")[:3])
        assert release >= bounds[module.__name__], (module.__name__, module.__version__, bounds)


@pytest.mark.parametrize("variant", common.VARIANTS)
def test_every_variant_builds_and_trains_a_step(variant):
    torch.manual_seed(0)
    model = common.mobilenetv4(variant, width_mult=0.25, num_classes=10)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def uninterrupted(tiny_cifar, tmp_path_factory):
    """The enhanced script's tiny run, two epochs, not stopped: (folder, summary)."""
    out = tmp_path_factory.mktemp("floor") / "uninterrupted"
    res = run_main("enhanced", [*TWO_EPOCHS, "--data-dir", tiny_cifar, "--output-dir", out])
    assert res.code == 0, res.err
    return out, res.summary


def test_one_tiny_epoch_of_the_baseline_script(tiny_cifar, tmp_path):
    res = run_main("baseline", [*TINY, "--epochs", "1", "--data-dir", tiny_cifar, "--output-dir", tmp_path / "b"])
    assert res.code == 0, res.err
    assert res.summary["epochs_completed"] == 1 and 0 <= res.summary["test_acc"] <= 100
    assert (tmp_path / "b" / "last.pt").is_file() and (tmp_path / "b" / "summary.json").is_file()


def test_a_mid_epoch_stop_resumes_to_the_bit(uninterrupted, tiny_cifar, tmp_path, monkeypatch):
    """Stopped after step 2 of epoch 2 (as Ctrl-C does), then resumed: the same weights as the run never stopped."""
    out, summary = uninterrupted
    original, steps = common.Run.step_done, [0]

    def stop_mid_epoch_2(self, loss, logits, labels):
        steps[0] += 1
        if steps[0] == 6:
            self.stop.signum = 2  # SIGINT
        return original(self, loss, logits, labels)

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(common.Run, "step_done", stop_mid_epoch_2)
        res = run_main("enhanced", [*TWO_EPOCHS, "--data-dir", tiny_cifar, "--output-dir", stopped])
    assert res.code == 128 + 2, res.err
    res = run_main("enhanced", [*TWO_EPOCHS, "--data-dir", tiny_cifar, "--resume", stopped / "last.pt"])
    assert res.code == 0, res.err
    resumed = torch.load(stopped / "last.pt", weights_only=True)["model"]
    reference = torch.load(out / "last.pt", weights_only=True)["model"]
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert res.summary["test_acc"] == summary["test_acc"]


def test_config_replays_the_run(uninterrupted, tmp_path):
    out, summary = uninterrupted
    res = run_main("enhanced", ["--config", out / "config.json", "--output-dir", tmp_path / "replay"])
    assert res.code == 0, res.err
    assert res.summary["test_acc"] == summary["test_acc"] and res.summary["epochs_completed"] == 2
    assert json.loads((tmp_path / "replay" / "config.json").read_text())["args"]["seed"] == 0


def test_predict_classifies_as_the_run_evaluated(uninterrupted, tiny_cifar, tmp_path):
    """The run's 32 test images as PNG files (lossless): predict.py's top-1 scores the run's test accuracy."""
    out, summary = uninterrupted
    data = common.load_cifar10(tiny_cifar, download=False).subset(max_test=32)
    write_pngs(data.test_images, tmp_path / "images")
    results = predict.main(["--checkpoint", str(out / "last.pt"), "--device", "cpu", str(tmp_path / "images")])
    assert len(results) == 32
    top1 = torch.tensor([r["top"][0]["index"] for r in sorted(results, key=lambda r: r["path"])])
    accuracy = (top1 == data.test_labels).sum().item() * 100.0 / 32
    assert accuracy == summary["test_acc"]
