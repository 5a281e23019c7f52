"""What test_predict.py and test_export.py share: tiny checkpoints trained by the scripts themselves (with the
run's own evaluation recorded), image files, and in-process / subprocess runs of predict.py and export.py."""

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import mnv4.evaluation
import mobilenetv4_baseline
import mobilenetv4_enhanced
from helpers import ERROR_LINE, MD5_WARNING, ROOT, TINY_TRAIN

TRAINERS = {"baseline": mobilenetv4_baseline.main, "enhanced": mobilenetv4_enhanced.main}
# One epoch of 4 steps at width 0.25, evaluated on all 40 tiny test images; no TTA table (fewer forward passes).
ONE_EPOCH = [*TINY_TRAIN, "--epochs", "1", "--deterministic", "--tta", "none", "--no-tta-table"]


@dataclass
class Outcome:
    code: int
    value: object  # what main() returned
    out: str
    err: str


def call(main, argv) -> Outcome:
    """main(argv) in this process with stdout/stderr captured; SystemExit becomes the exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code, value = exit_code_and_value(main, [str(a) for a in argv])
    return Outcome(code, value, out.getvalue(), err.getvalue())


def exit_code_and_value(main, argv):
    try:
        return 0, main(argv)
    except SystemExit as exc:
        return exc.code, None


def run_script(name, argv) -> subprocess.CompletedProcess:
    """`python NAME.py ARGV` as a real process from the project root (proves: no traceback, real exit code)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS=f"ignore:{MD5_WARNING}")
    return subprocess.run(
        [sys.executable, f"{name}.py", *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def train(data, out, script="baseline", *extra) -> tuple[Path, torch.Tensor]:
    """Train a tiny run; returns last.pt and the run's own evaluation of it: the top-1 class of every test
    image, recorded from the `predict_probs` call the training loop makes after its last epoch."""
    probs = []

    def recording_predict(*args, **kwargs):
        probs.append(original(*args, **kwargs))
        return probs[-1]

    original = mnv4.evaluation.predict_probs
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mnv4.evaluation, "predict_probs", recording_predict)
        outcome = call(TRAINERS[script], [*ONE_EPOCH, "--data-dir", data, "--output-dir", out, *extra])
    assert outcome.code == 0, outcome.err
    assert probs, "expected one evaluation per epoch (no TTA table)"
    return Path(out) / "last.pt", probs[-1].argmax(1)  # the last epoch's: what last.pt holds


def write_pngs(images: torch.Tensor, folder: Path) -> list[Path]:
    """uint8 [N, 3, H, W] -> folder/000.png, 001.png, ... (lossless: the pixels read back are these)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:03d}.png" for i in range(images.shape[0])]
    for path, image in zip(paths, images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return paths


def error_line(err: str) -> str:
    """The one line a user error leaves on stderr (`error: ...`, no traceback); returned for the caller to read."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]) and "Traceback" not in err, f"stderr:\n{err}"
    return lines[0]


def onnx_for_other_input(path: Path, size=64) -> Path:
    """A valid ONNX classifier of [N, 3, size, size] images into [N, 10] logits (one conv, then flatten)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((10, 3, size, size), 1e-3, dtype=np.float32), "weight")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "weight"], ["features"]),
            helper.make_node("Flatten", ["features"], ["logits"]),
        ],
        "other_size",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
    return path


def random_images(n, height=32, width=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)
