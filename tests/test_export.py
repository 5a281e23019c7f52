"""export.py: all four variants export, pass the onnx checker and match PyTorch within 1e-4 at two batch sizes;
the evaluated (EMA) weights are the ones exported; a failed check leaves no file; missing packages and bad input
are one line; --weights writes a weights file that --test-only and predict.py read as the run's checkpoint.

Checkpoints come from the enhanced script's main() (width 0.25, 4 steps, --model-ema with decay 0.5 so the EMA
is far from the raw weights). hybrid_medium's layer scales are set to 1 before export (see
`attention_switched_on`): at their 1e-5 init the attention branches barely reach the logits, and a wrong
attention export would pass unseen.
"""

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

import common
import export
import mobilenetv4_enhanced
import predict
from inference_support import MD5_WARNING, call, error_line, onnx_for_other_input, run_script, train
from mnv4.checkpoint import SHIPPED_WEIGHTS

pytestmark = pytest.mark.filterwarnings(f"ignore:{MD5_WARNING}")
INSTALL = "pip install -r requirements-export.txt"


@pytest.fixture(scope="module")
def checkpoint_of(tiny_cifar, tmp_path_factory):
    """variant -> a tiny enhanced checkpoint (trained on first use); with an EMA except for hybrid_medium."""
    root, made = tmp_path_factory.mktemp("export"), {}

    def make(variant):
        if variant not in made:
            # A recipe spelled in full pins the weights the thresholds below were set on (the default may move)
            path, _ = train(
                tiny_cifar,
                root / variant,
                "enhanced",
                "--recipe",
                "notebook",
                "--norm-weight-decay",
                "0",
                "--variant",
                variant,
                "--model-ema",
                "--model-ema-decay",
                "0.5",
            )
            if variant == "hybrid_medium":
                attention_switched_on(path, common.load_cifar10(tiny_cifar, download=False).train_images)
            made[variant] = path
        return made[variant]

    return make


@torch.no_grad()
def attention_switched_on(path, images):
    """Layer scales 1 instead of 1e-5, so the attention branches count, and BatchNorm statistics re-estimated
    on `images` (one train-mode pass, cumulative average) so the logits stay O(1); the raw weights, no EMA."""
    state = common.load_checkpoint(path)
    model, _ = common.model_from_checkpoint({**state, "ema": None})
    for name, param in model.named_parameters():
        if name.endswith("layer_scale.gamma"):
            param.fill_(1.0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()(common.normalize(images))
    torch.save({**state, "model": model.state_dict(), "ema": None}, path)


def attention_effect(model, x) -> float:
    """How far the logits move when every attention output is zeroed."""
    silenced = copy.deepcopy(model)
    for module in silenced.modules():
        if isinstance(module, common.MobileMQA):
            module.out.weight.zero_()
    return (silenced(x) - model(x)).abs().max().item()


def export_cli(*argv):
    return call(export.main, argv)


@pytest.mark.parametrize(
    "variant,with_data", [("conv_small", True), ("conv_medium", False), ("conv_large", False), ("hybrid_medium", True)]
)
def test_every_variant_exports_and_matches_pytorch(checkpoint_of, tiny_cifar, tmp_path, variant, with_data):
    checkpoint = checkpoint_of(variant)
    output = tmp_path / "out" / f"{variant}.onnx"
    output.parent.mkdir()
    data = ["--data-dir", tiny_cifar] if with_data else ["--num-images", 32]
    outcome = export_cli("--checkpoint", checkpoint, "--output", output, *data)
    assert outcome.code == 0, outcome.err
    assert sorted(output.parent.iterdir()) == [output]  # no temporary file left beside it
    report, has_ema = outcome.value, variant != "hybrid_medium"
    assert report["which"] == ("ema" if has_ema else "model")
    assert report["compared"] == ("40 CIFAR-10 test images" if with_data else "32 random images")
    assert set(report["diffs"]) == {40 if with_data else 32, 1}
    assert all(0 <= d <= export.TOLERANCE for d in report["diffs"].values()), report["diffs"]
    assert "max |logit diff|" in outcome.out

    import onnx

    onnx.checker.check_model(str(output), full_check=True)
    graph_input = onnx.load(str(output)).graph.input[0]
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim][1:] == [3, 32, 32]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis

    # A third batch size, on the written file: onnxruntime == the checkpoint's evaluated weights, != the raw ones.
    state = common.load_checkpoint(checkpoint)
    evaluated, _ = common.model_from_checkpoint(state)
    raw, _ = common.model_from_checkpoint({**state, "ema": None})
    x = common.normalize(common.load_cifar10(tiny_cifar, download=False).test_images[:5])
    with torch.no_grad():
        logits = predict.onnx_logits(predict.onnx_session(output), x)
        assert (logits - evaluated(x)).abs().max() <= export.TOLERANCE
        if has_ema:
            assert (logits - raw(x)).abs().max() > 10 * export.TOLERANCE
        else:
            assert attention_effect(evaluated, x) > 0.1  # the attention export is really being checked


@pytest.mark.parametrize("failure", ["another model's file", "diff just above the tolerance", "checker rejects"])
def test_a_failed_check_exits_1_and_leaves_no_file(checkpoint_of, tmp_path, monkeypatch, failure):
    """The exporter is replaced by one writing a wrong file: a valid [N, 3, 32, 32] -> [N, 10] classifier that is
    not this model, or garbage; the real checks must refuse it."""

    def wrong_export(model, path, opset=None):
        onnx_for_other_input(path, size=32)

    def garbage_export(model, path, opset=None):
        path.write_bytes(b"garbage")

    monkeypatch.setattr(export, "export_onnx", garbage_export if failure == "checker rejects" else wrong_export)
    words = {
        "another model's file": ["differ from PyTorch's", "tolerance"],
        "diff just above the tolerance": ["1.01e-04", "tolerance"],
        "checker rejects": ["onnx checker"],
    }[failure]
    if failure == "diff just above the tolerance":
        monkeypatch.setattr(export, "max_diff", lambda model, session, images: 1.01 * export.TOLERANCE)
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    outcome = export_cli("--checkpoint", checkpoint_of("conv_small"), "--output", output, "--num-images", 4)
    assert outcome.code == 1
    line = error_line(outcome.err)
    assert all(word in line for word in words) and "not written" in line, line
    assert list(output.parent.iterdir()) == []


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_a_missing_package_names_the_install_command(checkpoint_of, tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    outcome = export_cli("--checkpoint", checkpoint_of("conv_small"), "--output", tmp_path / "m.onnx")
    assert outcome.code == 2
    line = error_line(outcome.err)
    assert package in line and INSTALL in line, line
    assert not (tmp_path / "m.onnx").exists()


def test_bad_input_is_one_error_line_and_exit_2(checkpoint_of, tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    cases = [
        (["--checkpoint", tmp_path / "foreign.pt", "--output", tmp_path / "m.onnx"], "not a checkpoint"),
        (["--checkpoint", tmp_path / "none.pt", "--output", tmp_path / "m.onnx"], "does not exist"),
        (["--checkpoint", checkpoint_of("conv_small"), "--output", tmp_path / "no" / "m.onnx"], "does not exist"),
        (["--checkpoint", checkpoint_of("conv_small"), "--output", tmp_path], "is a folder"),
        (["--checkpoint", checkpoint_of("conv_small"), "--output", tmp_path / "m.onnx", "--opset", 17], "--opset"),
        (
            [
                "--checkpoint",
                checkpoint_of("conv_small"),
                "--output",
                tmp_path / "m.onnx",
                "--data-dir",
                tmp_path / "nodata",
            ],
            "does not exist",
        ),
    ]
    for argv, words in cases:
        outcome = export_cli(*argv)
        assert outcome.code == 2, (argv, outcome.err)
        assert words in error_line(outcome.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt"]


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    proc = run_script("export", ["--checkpoint", tmp_path / "garbage.pt", "--output", tmp_path / "m.onnx"])
    assert proc.returncode == 2
    assert "garbage.pt" in error_line(proc.stderr)


def test_weights_file_holds_the_evaluated_weights_and_reproduces_the_runs_accuracy(checkpoint_of, tiny_cifar, tmp_path):
    """--weights keeps the weights the run evaluated (here its EMA) in fp32 with the run's record, loads with
    weights_only=True, and --test-only on it scores exactly what the run logged for its last epoch, reporting the
    weights as the EMA they are, not as 'model' (the raw weights)."""
    checkpoint = checkpoint_of("conv_small")
    outcome = export_cli("--checkpoint", checkpoint, "--weights", tmp_path / "w.pt", "--run-name", "tiny")
    assert outcome.code == 0, outcome.err
    run = common.load_checkpoint(checkpoint)
    state = torch.load(tmp_path / "w.pt", map_location="cpu", weights_only=True)
    ema, _ = common.eval_weights(run)
    assert state["model"].keys() == ema.keys()
    assert all(torch.equal(state["model"][k], ema[k]) for k in ema)
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    assert state["ema"] is None and "optimizer" not in state
    shipped = state["shipped"]
    assert shipped["run"] == "tiny" and shipped["evaluated"] == "ema" and shipped["epoch"] == run["epoch"]
    assert shipped["test_acc"] == run["history"][-1]["test_acc"]
    assert shipped["git_commit"] == run["segments"][-1]["git_commit"]
    assert f"test acc {shipped['test_acc']:.2f}%" in outcome.out

    flags = ["--recipe", "notebook", "--norm-weight-decay", "0", "--width-mult", "0.25", "--device", "cpu"]
    evaluated = call(
        mobilenetv4_enhanced.main,
        [*flags, "--no-download", "--data-dir", tiny_cifar, "--test-only", "--resume", tmp_path / "w.pt"]
        + ["--tta", "none", "--no-tta-table", "--output-dir", tmp_path / "eval"],
    )
    assert evaluated.code == 0, evaluated.err
    assert evaluated.value["test_acc"] == shipped["test_acc"]
    # The file holds the run's average under "model": it is still reported as the EMA it is.
    assert evaluated.value["evaluated"] == "ema"
    assert common.eval_weights(state)[1] == "ema"


def test_weights_bad_input_is_one_error_line(checkpoint_of, tmp_path):
    checkpoint = checkpoint_of("conv_small")
    mid_epoch = tmp_path / "mid.pt"
    torch.save({**common.load_checkpoint(checkpoint), "step": 2}, mid_epoch)
    cases = [
        (["--weights", tmp_path / "w.pt"], "add --checkpoint"),
        (["--checkpoint", checkpoint, "--output", tmp_path / "m.onnx", "--run-name", "x"], "--run-name"),
        (["--checkpoint", checkpoint, "--output", tmp_path / "m.onnx", "--weights", tmp_path / "w.pt"], "not allowed"),
        (["--checkpoint", mid_epoch, "--weights", tmp_path / "w.pt"], "mid-epoch"),
        (["--checkpoint", checkpoint, "--weights", tmp_path / "no" / "w.pt"], "does not exist"),
    ]
    for argv, words in cases:
        outcome = export_cli(*argv)
        assert outcome.code == 2, (argv, outcome.err)
        assert words in error_line(outcome.err), (argv, outcome.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid.pt"]


def test_onnx_export_without_checkpoint_exports_the_shipped_weights(tmp_path):
    """No --checkpoint: the shipped weights file is exported (and checked) without any training."""
    outcome = export_cli("--output", tmp_path / "m.onnx", "--num-images", 4)
    assert outcome.code == 0, outcome.err
    assert str(SHIPPED_WEIGHTS) in outcome.out and (tmp_path / "m.onnx").is_file()


def test_onnx_export_without_checkpoint_and_without_the_shipped_file_is_one_error_line(monkeypatch, tmp_path):
    monkeypatch.setattr(predict, "SHIPPED_WEIGHTS", tmp_path / "gone.pt")
    missing = export_cli("--output", tmp_path / "n.onnx", "--num-images", 4)
    assert missing.code == 2 and "gone.pt" in error_line(missing.err)
    assert not (tmp_path / "n.onnx").exists()
