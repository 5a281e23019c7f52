"""predict.py against the training script's own evaluation, through PyTorch and through onnxruntime; image
modes and formats; the JSON output; every bad input.

One tiny baseline checkpoint (trained once per module by the script's main(), its evaluation recorded) and its
ONNX export serve every test. The tiny CIFAR test images are written as PNG files: PNG is lossless, so
predict.py sees exactly the pixels the training run evaluated.
"""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import common
import export
import mobilenetv4_enhanced
import predict
from helpers import shipped_weights_state
from inference_support import (
    MD5_WARNING,
    call,
    error_line,
    onnx_for_other_input,
    random_images,
    run_script,
    train,
    write_pngs,
)
from mnv4.checkpoint import MODEL_KEYS, SHIPPED_WEIGHTS, saved_model_config

pytestmark = pytest.mark.filterwarnings(f"ignore:{MD5_WARNING}")


@pytest.fixture(scope="module")
def trained(tiny_cifar, tmp_path_factory):
    """(checkpoint, the run's own top-1 per test image, the test images as PNG files, the exported ONNX file)."""
    root = tmp_path_factory.mktemp("predict")
    # 75 steps (200 images, batches of 8, 3 epochs): a model that learned, so predictions are compared for real
    checkpoint, run_top1 = train(
        tiny_cifar, root / "run", "baseline", "--max-train-samples", "200", "-b", "8", "--epochs", "3"
    )
    outcome = call(export.main, ["--checkpoint", checkpoint, "--output", root / "model.onnx", "--num-images", 8])
    assert outcome.code == 0, outcome.err
    pngs = write_pngs(common.load_cifar10(tiny_cifar, download=False).test_images, root / "test_images")
    return checkpoint, run_top1, pngs, root / "model.onnx"


def classify(*argv):
    return call(predict.main, argv)


def top1(results) -> torch.Tensor:
    return torch.tensor([r["top"][0]["index"] for r in results])


def top_probs(result) -> dict:
    """{class index: probability} of one image's printed top-k."""
    return {t["index"]: t["prob"] for t in result["top"]}


def assert_probs(results, expected: torch.Tensor):
    """Each image's top-10 probabilities equal its row of `expected` ([N, 10] softmax)."""
    for result, row in zip(results, expected):
        assert top_probs(result) == pytest.approx(dict(enumerate(row.tolist())), abs=1e-5)


# ---- The shipped weights ---------------------------------------------------------------------------------------
def test_the_shipped_weights_rebuild_the_enhanced_default_and_classify(tmp_path):
    """The weights file in the repository loads with weights_only=True, rebuilds the enhanced default's model (so
    `--test-only --resume` with the default flags evaluates it), and predict.py without a model flag classifies
    with it: each image's probabilities are the rebuilt model's."""
    state = shipped_weights_state()
    shipped = state["shipped"]
    assert state["script"] == "enhanced" and shipped["run"] and 0 < shipped["test_acc"] <= 100
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    model, _ = common.model_from_checkpoint(common.load_checkpoint(SHIPPED_WEIGHTS))
    default = common.model_from_args(mobilenetv4_enhanced.parse_args([])).config
    assert {k: model.config[k] for k in MODEL_KEYS} == {k: default[k] for k in MODEL_KEYS}
    images = torch.from_numpy(random_images(4)).permute(0, 3, 1, 2).contiguous()
    pngs = write_pngs(images, tmp_path / "images")
    outcome = classify("--device", "cpu", "--top-k", 10, *pngs)
    assert outcome.code == 0, outcome.err
    assert str(SHIPPED_WEIGHTS) in outcome.err and f"test acc {shipped['test_acc']:.2f}%" in outcome.err
    assert_probs(outcome.value, common.predict_probs(model, images))


def test_missing_shipped_weights_is_one_error_line(trained, monkeypatch, tmp_path):
    monkeypatch.setattr(predict, "SHIPPED_WEIGHTS", tmp_path / "gone.pt")
    outcome = classify(trained[2][0])
    assert outcome.code == 2
    line = error_line(outcome.err)
    assert "gone.pt" in line and "--checkpoint" in line


# ---- Against the training script's own evaluation --------------------------------------------------------------
def test_top1_equals_the_training_runs_evaluation_image_by_image(trained, tiny_cifar):
    checkpoint, run_top1, pngs, _ = trained
    outcome = classify("--checkpoint", checkpoint, "--device", "cpu", pngs[0].parent)
    assert outcome.code == 0, outcome.err
    assert [r["path"] for r in outcome.value] == [str(p) for p in pngs]
    labels = common.load_cifar10(tiny_cifar, download=False).test_labels
    assert (run_top1 == labels).float().mean() >= 0.3, "a model at chance would prove little"
    assert torch.equal(top1(outcome.value), run_top1)
    # ... and common.evaluate of the checkpoint's evaluated weights agrees
    model, _ = common.model_from_checkpoint(common.load_checkpoint(checkpoint))
    data = common.load_cifar10(tiny_cifar, download=False)
    _, _, preds = common.evaluate(model, data.test_images, data.test_labels)
    assert torch.equal(preds, run_top1)


def test_onnx_gives_the_same_top1_and_probabilities(trained):
    checkpoint, run_top1, pngs, onnx_file = trained
    via_onnx = classify("--onnx", onnx_file, "--top-k", 10, *pngs)
    via_torch = classify("--checkpoint", checkpoint, "--device", "cpu", "--top-k", 10, *pngs)
    assert via_onnx.code == 0 and via_torch.code == 0, via_onnx.err + via_torch.err
    assert torch.equal(top1(via_onnx.value), run_top1)
    for a, b in zip(via_onnx.value, via_torch.value):
        assert top_probs(a) == pytest.approx(top_probs(b), abs=1e-5)
    assert via_onnx.out.splitlines()[0].split(":")[0] == via_torch.out.splitlines()[0].split(":")[0]


@pytest.mark.parametrize("model_flag", ["--checkpoint", "--onnx"])
def test_tta_averages_the_softmax_over_the_views(trained, tiny_cifar, model_flag):
    checkpoint, _, pngs, onnx_file = trained
    model_file = checkpoint if model_flag == "--checkpoint" else onnx_file
    outcome = classify(model_flag, model_file, "--tta", "flip", "--top-k", 10, "--device", "cpu", *pngs[:8])
    assert outcome.code == 0, outcome.err
    model, _ = common.model_from_checkpoint(common.load_checkpoint(checkpoint))
    images = common.load_cifar10(tiny_cifar, download=False).test_images[:8]

    def softmax(x):  # the model's probabilities, normalised with torchvision and CIFAR-10's statistics
        x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
        with torch.no_grad():
            return model.eval()(x).softmax(1)

    expected = (softmax(images) + softmax(TF.horizontal_flip(images))) / 2
    assert_probs(outcome.value, expected)


@pytest.mark.parametrize("variant", ["conv_small", "mobilenetv2"])
def test_predict_and_export_rebuild_the_final_map_the_run_trained(variant, tiny_cifar, tmp_path):
    """--output-stride changes no weight's shape, so a checkpoint rebuilt at the default stride would load without
    complaint and predict something else. predict.py and export.py must rebuild the variant and the 8x8 final map
    that the run trained."""
    # 75 steps, as the module's checkpoint: an untrained model's outputs are too flat to tell two strides apart
    learn = ["--max-train-samples", "200", "-b", "8", "--epochs", "3"]
    checkpoint, run_top1 = train(
        tiny_cifar, tmp_path / "run", "enhanced", "--variant", variant, "--output-stride", "4", *learn
    )
    state = common.load_checkpoint(checkpoint)
    model, _ = common.model_from_checkpoint(state)
    assert common.model_summary(model)["feature_maps"]["stage4"][1:] == [8, 8]
    images = common.load_cifar10(tiny_cifar, download=False).test_images
    at_default_stride = common.mobilenetv4(**{**saved_model_config(state), "output_stride": 8})
    at_default_stride.load_state_dict(model.state_dict())  # loads: the shapes do not tell the strides apart
    rebuilt_probs = common.predict_probs(model, images)
    assert (rebuilt_probs - common.predict_probs(at_default_stride.eval(), images)).abs().max() > 0.05
    assert torch.equal(rebuilt_probs.argmax(1), run_top1)

    pngs = write_pngs(images, tmp_path / "pngs")
    outcome = classify("--checkpoint", checkpoint, "--device", "cpu", "--top-k", 10, *pngs)
    assert outcome.code == 0, outcome.err
    assert_probs(outcome.value, rebuilt_probs)
    onnx_file = tmp_path / "model.onnx"
    outcome = call(export.main, ["--checkpoint", checkpoint, "--output", onnx_file, "--num-images", 8])
    assert outcome.code == 0, outcome.err
    via_onnx = classify("--onnx", onnx_file, "--top-k", 10, *pngs)
    assert via_onnx.code == 0, via_onnx.err
    assert_probs(via_onnx.value, rebuilt_probs)


# ---- Output -------------------------------------------------------------------------------------------------
def test_json_output_schema_and_printed_lines(trained, tmp_path):
    checkpoint, _, pngs, _ = trained
    out = tmp_path / "predictions.json"
    outcome = classify("--checkpoint", checkpoint, "--device", "cpu", "--top-k", 3, "--json", out, *pngs[:5])
    assert outcome.code == 0, outcome.err
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(outcome.value))
    assert [r["path"] for r in saved] == [str(p) for p in pngs[:5]]
    lines = outcome.out.splitlines()
    assert len(lines) == 5
    for result, line in zip(saved, lines):
        assert set(result) == {"path", "top"} and len(result["top"]) == 3
        for entry in result["top"]:
            assert set(entry) == {"class", "index", "prob"}
            assert entry["class"] == common.CIFAR10_CLASSES[entry["index"]] and 0 <= entry["prob"] <= 1
        probs = [t["prob"] for t in result["top"]]
        assert probs == sorted(probs, reverse=True)
        assert line == predict.format_line(result["path"], result["top"])
        assert line.startswith(f"{result['path']}: {result['top'][0]['class']} ")


def test_help_shows_every_default():
    for parser in (predict.build_parser(), export.build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                text = formatter._expand_help(action)
                # export.py's --output and --weights: one of the two is required, so neither has a default
                expected = 0 if action.required or action.dest in ("output", "weights") else 1
                assert text.count("default") == expected, (action.option_strings, text)


# ---- Image modes and formats --------------------------------------------------------------------------------
def write_every_mode(folder):
    """The same picture as L, P, RGBA, 16-bit greyscale, RGB 64x48, JPEG, BMP and WebP."""
    folder.mkdir()
    rgb = Image.fromarray(random_images(1)[0])
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("RGBA").save(folder / "alpha.png")
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(folder / "grey16.png")
    rgb.resize((64, 48)).save(folder / "wide.png")
    rgb.save(folder / "photo.jpg")
    rgb.save(folder / "bitmap.bmp")
    rgb.save(folder / "web.webp")
    (folder / "notes.txt").write_text("not an image: folders are searched by suffix")
    return rgb


def test_every_mode_and_format_is_classified(trained, tmp_path):
    checkpoint, _, _, onnx_file = trained
    write_every_mode(tmp_path / "modes")
    assert Image.open(tmp_path / "modes" / "grey16.png").mode == "I;16"
    for model_flag, model_file in (("--checkpoint", checkpoint), ("--onnx", onnx_file)):
        outcome = classify(model_flag, model_file, "--device", "cpu", tmp_path / "modes")
        assert outcome.code == 0, outcome.err
        assert sorted(r["path"].rsplit("/", 1)[1] for r in outcome.value) == sorted(
            ["grey.png", "palette.png", "alpha.png", "grey16.png", "wide.png", "photo.jpg", "bitmap.bmp", "web.webp"]
        )


def test_modes_convert_to_the_expected_rgb(tmp_path):
    rgb = write_every_mode(tmp_path / "modes")
    pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    grey = torch.from_numpy(np.array(rgb.convert("L")))
    assert torch.equal(predict.read_image(tmp_path / "modes" / "grey.png"), grey.expand(3, -1, -1))
    assert torch.equal(predict.read_image(tmp_path / "modes" / "grey16.png"), grey.expand(3, -1, -1))  # scaled
    assert torch.equal(predict.read_image(tmp_path / "modes" / "alpha.png"), pixels)  # opaque: unchanged
    assert torch.equal(predict.read_image(tmp_path / "modes" / "bitmap.bmp"), pixels)
    wide = torch.from_numpy(np.array(Image.open(tmp_path / "modes" / "wide.png"))).permute(2, 0, 1)
    assert torch.equal(predict.read_image(tmp_path / "modes" / "wide.png"), TF.resize(wide, [32, 32], antialias=True))
    see_through = np.zeros((32, 32, 4), dtype=np.uint8)
    see_through[:16, :, 3] = 255  # top half opaque black, bottom half fully transparent
    Image.fromarray(see_through, "RGBA").save(tmp_path / "see_through.png")
    read = predict.read_image(tmp_path / "see_through.png")
    assert read[:, :16].eq(0).all() and read[:, 16:].eq(255).all()  # transparent -> the white background


# ---- Bad input ----------------------------------------------------------------------------------------------
def bad_inputs(trained, root):
    """{case: (argv, words the error line must contain)}: each a user mistake, exit 2."""
    checkpoint, _, pngs, _ = trained
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    (root / "text.png").write_text("this is not an image")
    (root / "truncated.png").write_bytes(pngs[0].read_bytes()[:200])
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    (root / "model.onnx").write_bytes(b"not an onnx file")
    onnx_for_other_input(root / "size64.onnx")
    ckpt = ["--checkpoint", checkpoint, "--device", "cpu"]
    return {
        "missing path": ([*ckpt, root / "nope.png"], ["nope.png", "does not exist"]),
        "folder without images": ([*ckpt, root / "empty"], ["empty", "no image"]),
        "not an image": ([*ckpt, root / "text.png"], ["text.png", "not a PNG"]),
        "truncated image": ([*ckpt, root / "truncated.png"], ["truncated.png", "truncated"]),
        "foreign checkpoint": (["--checkpoint", root / "foreign.pt", pngs[0]], ["foreign.pt", "not a checkpoint"]),
        "missing checkpoint": (["--checkpoint", root / "none.pt", pngs[0]], ["none.pt", "does not exist"]),
        "not an ONNX file": (["--onnx", root / "model.onnx", pngs[0]], ["model.onnx", "not an ONNX model"]),
        "ONNX for another input size": (
            ["--onnx", root / "size64.onnx", pngs[0]],
            ["size64.onnx", "input", "64", "[N, 3, 32, 32]"],
        ),
        "top-k out of range": ([*ckpt, "--top-k", 11, pngs[0]], ["--top-k"]),
        "both model flags": ([*ckpt, "--onnx", root / "size64.onnx", pngs[0]], ["not allowed with"]),
        "JSON into a missing folder": ([*ckpt, "--json", root / "no" / "out.json", pngs[0]], ["--json"]),
    }


CASES = [
    "missing path",
    "folder without images",
    "not an image",
    "truncated image",
    "foreign checkpoint",
    "missing checkpoint",
    "not an ONNX file",
    "ONNX for another input size",
    "top-k out of range",
    "both model flags",
    "JSON into a missing folder",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_exit_2(trained, tmp_path, case):
    argv, words = bad_inputs(trained, tmp_path)[case]
    outcome = classify(*argv)
    assert outcome.code == 2, (outcome.code, outcome.err)
    line = error_line(outcome.err)
    assert all(word in line for word in words), line
    assert outcome.out == ""


def test_bad_input_in_a_real_process_has_no_traceback(trained, tmp_path):
    argv, words = bad_inputs(trained, tmp_path)["ONNX for another input size"]
    proc = run_script("predict", argv)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert all(word in line for word in words), line


def test_a_batch_with_one_truncated_image_classifies_the_rest_and_exits_1(trained, tmp_path):
    checkpoint, run_top1, pngs, _ = trained
    broken = tmp_path / "broken.png"
    broken.write_bytes(pngs[1].read_bytes()[:300])
    paths = [pngs[0], broken, *pngs[2:6]]
    outcome = classify("--checkpoint", checkpoint, "--device", "cpu", "--json", tmp_path / "out.json", *paths)
    assert outcome.code == 1
    errors = [line for line in outcome.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0] and "Traceback" not in outcome.err
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [r["path"] for r in saved] == [str(p) for p in paths if p != broken]
    assert len(outcome.out.splitlines()) == 5
    assert top1(saved).tolist() == [run_top1[0].item(), *run_top1[2:6].tolist()]


def test_missing_onnxruntime_names_the_install_command(trained, monkeypatch):
    _, _, pngs, onnx_file = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    outcome = classify("--onnx", onnx_file, pngs[0])
    assert outcome.code == 2
    assert "pip install -r requirements-export.txt" in error_line(outcome.err)
