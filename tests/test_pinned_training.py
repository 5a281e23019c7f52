"""Both scripts' default training, pinned: the weights after 40 optimizer steps and the printed epoch row.

A refactor of the code under the scripts must leave these figures unchanged. Each script runs its default recipe
(no recipe flag; the enhanced model at width 1.2, see PINNED_WIDTH) for one epoch of 40 steps on a fixed tiny data
set, on the CPU with one thread.
The pins were recorded with the code as it stood before the library was split into modules; a change here means
the training itself changed (initialisation, data order, augmentation, the optimizer or the schedule), which a
refactor must not do. The float kernels differ between CPU instruction sets, so the pins are kept per
`torch.backends.cpu.get_cpu_capability()` (AVX2, AVX512); on a CPU with none recorded the test skips. Record new
values only for a deliberate change of recipe, and say so in the commit:

    MNV4_RECORD_PINS=1 python -m pytest -q tests/test_pinned_training.py -s
"""

import contextlib
import io
import os
import re

import pytest
import torch

import mobilenetv4_baseline
import mobilenetv4_enhanced
from conftest import write_tiny_cifar

SCRIPTS = {"baseline": mobilenetv4_baseline, "enhanced": mobilenetv4_enhanced}
FLAGS = [
    "--epochs",
    "1",
    "-b",
    "8",
    "--max-train-samples",
    "320",
    "--max-test-samples",
    "40",
    "--device",
    "cpu",
    "--no-download",
    "--no-tta-table",
    "--seed",
    "0",
]
# The enhanced pins were recorded at width 1.2, the default's width then; they pin the training code, which the
# width does not change, and the AVX2 set cannot be recorded again on an AVX-512 machine, so the width stays.
PINNED_WIDTH = {"baseline": [], "enhanced": ["--width-mult", "1.2"]}
EPOCH_ROW = re.compile(r"^\s+1\s+\S+")  # the epoch log line starts with its right-aligned epoch number

# Recorded with MNV4_RECORD_PINS=1 (see the module docstring): per script, the epoch row without its two timing
# columns, and a fingerprint of last.pt's model weights. Per CPU capability (torch.backends.cpu.get_cpu_capability):
# the float kernels differ between instruction sets, and 40 steps amplify the rounding into another run. Both sets
# were recorded with the code as it stood before the split, each on a machine of its kind.
PINNED = {
    "AVX2": {
        "baseline": {
            "row": "1 1.5435 41.88 1.1093 60.00 1.00e-03",
            "weights": {
                "tensors": 232,
                "sum": 28611.741021511625,
                "l2": 303.4434896955408,
                "first_conv_sum": 0.498517571038974,
            },
        },
        "enhanced": {
            "row": "1 2.0633 21.56 2.2236 45.00 1.00e-06",
            "weights": {
                "tensors": 282,
                "sum": 30300.11897780866,
                "l2": 323.41983205116753,
                "first_conv_sum": 4.327814591350034,
            },
        },
    },
    "AVX512": {
        "baseline": {
            "row": "1 1.5495 41.25 0.8187 67.50 1.00e-03",
            "weights": {
                "tensors": 232,
                "sum": 28795.352152801926,
                "l2": 307.5022256772496,
                "first_conv_sum": 0.4884059785763384,
            },
        },
        "enhanced": {
            "row": "1 2.0539 23.12 2.1759 37.50 1.00e-06",
            "weights": {
                "tensors": 282,
                "sum": 30265.984490335228,
                "l2": 322.7764485936227,
                "first_conv_sum": 4.765816980023374,
            },
        },
    },
}
SCHEDULER_STEPS = {"baseline": 1, "enhanced": 40}  # StepLR steps per epoch; the enhanced rate per optimizer step


def fingerprint(state_dict) -> dict:
    """Sum and L2 norm of every floating-point tensor, in float64: any changed weight moves one of them."""
    floats = [t.double() for t in state_dict.values() if t.is_floating_point()]
    return {
        "tensors": len(floats),
        "sum": sum(float(t.sum()) for t in floats),
        "l2": sum(float(t.pow(2).sum()) for t in floats) ** 0.5,
        "first_conv_sum": float(next(iter(state_dict.values())).double().sum()),
    }


@pytest.fixture(scope="module")
def pin_data(tmp_path_factory):
    return write_tiny_cifar(tmp_path_factory.mktemp("pin-cifar"), per_train_batch=64, test=40, seed=7)


@pytest.mark.filterwarnings("ignore:CIFAR-10 files")
@pytest.mark.parametrize("script", SCRIPTS)
def test_default_training_is_pinned(script, pin_data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            SCRIPTS[script].main(
                [*FLAGS, *PINNED_WIDTH[script], "--data-dir", str(pin_data), "--output-dir", str(tmp_path)]
            )
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in out.getvalue().splitlines() if EPOCH_ROW.match(line)]
    assert len(rows) == 1, out.getvalue()
    row = " ".join(rows[0].split()[:-2])  # without train_s and img/s, which are wall-clock
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["scheduler"]["last_epoch"] == SCHEDULER_STEPS[script]
    got = {"row": row, "weights": fingerprint(state["model"])}
    if os.environ.get("MNV4_RECORD_PINS"):
        print(f"\n{torch.backends.cpu.get_cpu_capability()} {script!r}: {got!r},")
        return
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in PINNED:
        pytest.skip(f"no pins recorded on a {capability} CPU (pins exist for {', '.join(PINNED)})")
    pinned = PINNED[capability][script]
    assert got["row"] == pinned["row"]
    assert got["weights"]["tensors"] == pinned["weights"]["tensors"]
    for key in ("sum", "l2", "first_conv_sum"):
        assert got["weights"][key] == pytest.approx(pinned["weights"][key], rel=1e-5, abs=1e-6), key
