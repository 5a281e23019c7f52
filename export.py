"""Export a trained model to ONNX and check the file against PyTorch with onnxruntime, in one command; or write
a run's checkpoint as the shipped weights file.

    python export.py --output model.onnx [--checkpoint runs/X/best.pt] [--opset N] [--data-dir data]
    python export.py --checkpoint runs/X/last.pt --weights [OUT.pt] [--run-name NAME]

ONNX: exports the weights the run evaluated (the EMA when the checkpoint has one; without --checkpoint, the shipped
weights) with a dynamic batch axis, runs the onnx checker, then compares onnxruntime's logits with PyTorch's at
two batch sizes on CIFAR-10 test images (--data-dir) or, without data, on random images. The file appears only if
max |diff| <= 1e-4; otherwise the command exits 1 and leaves no file. Run the result with
`python predict.py --onnx model.onnx IMAGE ...`. Needs the export extras: pip install -r requirements-export.txt

--weights: writes the evaluated weights in fp32 with the model settings, the run's name, its final test accuracy
(no TTA) and the commit that trained it, atomically, to OUT.pt (default: the shipped file,
weights/mobilenetv4_conv_small_enhanced_cifar10.pt); it loads with torch.load(weights_only=True), and predict.py,
export.py and --test-only --resume read it like a checkpoint. Needs no export extras.
"""

import os
import sys
import tempfile
from pathlib import Path

import torch

import common
import predict
from mnv4.checkpoint import SHIPPED_WEIGHTS, shipped_state

TOLERANCE = 1e-4  # max |logit difference| accepted between onnxruntime and PyTorch
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1, so the traced example batch must be larger
SINGLE_CHECKS = 8  # images also compared one at a time (batch 1): proves the batch axis is really dynamic


class CheckFailed(Exception):
    """The exported file is wrong (checker error or outputs too far from PyTorch's): exit 1, no file."""


def export_onnx(model, path, opset=None):
    """Write `model` (eval mode, CPU, fp32) to `path`: input "images" [batch, 3, 32, 32], output "logits".

    The dynamo exporter (torch.export + onnxscript), not the TorchScript one: it is torch.onnx.export's default
    since torch 2.9 and the way this torch's documentation recommends; the TorchScript exporter is deprecated
    (it warns) and gets no new operator support. It traces F.scaled_dot_product_attention (hybrid_medium's
    attention) into plain ONNX ops."""
    example = torch.zeros(EXAMPLE_BATCH, 3, predict.IMAGE_SIZE, predict.IMAGE_SIZE)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=opset,
        external_data=False,
        verbose=False,
    )
    # What a deployment needs to feed the model, stored in the file itself (ONNX metadata_props).
    program.model.metadata_props.update(
        {
            "classes": ",".join(common.CIFAR10_CLASSES),
            "mean": ",".join(map(str, common.CIFAR10_MEAN)),
            "std": ",".join(map(str, common.CIFAR10_STD)),
            "input": "RGB in [0, 1], minus mean, divided by std, NCHW",
        }
    )
    program.save(str(path), external_data=False)  # one self-contained file (these models are a few MB)


def comparison_images(data_dir, n: int) -> tuple[torch.Tensor, str]:
    """uint8 [n, 3, 32, 32]: the first n CIFAR-10 test images, or seeded random pixels without --data-dir."""
    if data_dir is not None:
        images = common.load_cifar10(data_dir, download=False).test_images[:n]
        return images, f"{images.shape[0]} CIFAR-10 test images"
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8), f"{n} random images"


@torch.no_grad()
def max_diff(model, session, images: torch.Tensor) -> float:
    """Largest |logit difference| between onnxruntime and PyTorch on one batch of uint8 images."""
    x = common.normalize(images)
    try:
        logits = predict.onnx_logits(session, x)
    except Exception as exc:  # e.g. a batch size the exported graph does not accept
        raise CheckFailed(f"onnxruntime fails on a batch of {x.shape[0]}: {predict.first_line(exc)}") from None
    return (logits - model(x)).abs().max().item()


def check_onnx(path, model, images) -> dict:
    """onnx checker, then {batch size: max |diff|} at the whole batch and at batch 1; CheckFailed if wrong."""
    onnx = predict.import_export_package("onnx")
    try:
        onnx.checker.check_model(str(path), full_check=True)  # full_check: shape inference too
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CheckFailed(f"the onnx checker rejects the export: {predict.first_line(exc)}") from None
    try:
        session = predict.onnx_session(path)
    except common.UserError as exc:  # here not the user's file but ours: a failed export
        raise CheckFailed(str(exc)) from None
    diffs = {
        images.shape[0]: max_diff(model, session, images),
        1: max(max_diff(model, session, images[i : i + 1]) for i in range(min(SINGLE_CHECKS, images.shape[0]))),
    }
    worst, tolerance = max(diffs.values()), TOLERANCE
    if not worst <= tolerance:  # `not <=` so that a NaN difference fails too
        shown = ", ".join(f"{d:.2e} at batch {b}" for b, d in diffs.items())
        raise CheckFailed(
            f"onnxruntime's logits differ from PyTorch's by up to {worst:.2e} ({shown}), more than "
            f"the tolerance {tolerance:g}"
        )
    return diffs


def export_checked(model, output: Path, images, opset=None) -> dict:
    """Export to a temporary file beside `output`, check it, and only then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            export_onnx(model, tmp, opset)
        except Exception as exc:  # exporter failures come as torch.onnx, torch.export or onnxscript errors
            raise CheckFailed(f"export failed ({type(exc).__name__}: {predict.first_line(exc)})") from None
        diffs = check_onnx(tmp, model, images)
        os.chmod(tmp, 0o666 & ~common.current_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, output)
        return diffs
    finally:
        tmp.unlink(missing_ok=True)


def build_parser():
    p = common.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=common.HelpFormatter)
    p.add_argument(
        "--checkpoint",
        metavar="PT",
        help="a last.pt / best.pt of the training scripts, or a weights file (default: the shipped weights, "
        f"{SHIPPED_WEIGHTS.parent.name}/{SHIPPED_WEIGHTS.name}; --weights needs a run's checkpoint)",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--output", metavar="MODEL.onnx", help="the ONNX file to write (this or --weights)")
    what.add_argument(
        "--weights",
        metavar="OUT.pt",
        nargs="?",
        const=SHIPPED_WEIGHTS,
        help="instead of ONNX, write --checkpoint as a weights file: fp32 evaluated weights, model settings, "
        f"run name, final accuracy, commit (no OUT.pt: the shipped {SHIPPED_WEIGHTS.parent.name}/"
        f"{SHIPPED_WEIGHTS.name})",
    )
    p.add_argument(
        "--run-name",
        default=None,
        help="with --weights: the run recorded in the file (default: the checkpoint's folder name)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset, 18 or newer (default: the exporter's own choice, 20 with torch 2.14)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding cifar-10-batches-py/: compare on its test images (default: random images)",
    )
    p.add_argument("--num-images", type=int, default=256, help="images compared between onnxruntime and PyTorch")
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.opset is not None and not 18 <= args.opset <= 99:
        parser.error(f"--opset {args.opset} is out of range: the dynamo exporter writes opset 18 or newer")
    if not 1 <= args.num_images <= 10_000:
        parser.error(f"--num-images {args.num_images} is out of range: use 1 to 10000")
    if args.weights is not None and args.checkpoint is None:
        parser.error("--weights writes a run's checkpoint as a weights file: add --checkpoint RUN/last.pt")
    if args.run_name is not None and args.weights is None:
        parser.error("--run-name is recorded only in a weights file: add --weights, or drop --run-name")
    return args


def writable_file(flag: str, path: Path, kind: str) -> Path:
    """`path` expanded, or a UserError if its folder is missing or unwritable or it names a folder."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise common.UserError(f"{flag} {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise common.UserError(f"{flag} {path} is a folder: name the {kind} file to write")
    if not os.access(path.parent, os.W_OK):
        raise common.UserError(f"{flag} {path}: folder {path.parent} is not writable")
    return path


def write_weights(args) -> dict:
    """--weights: the checkpoint as a weights file (mnv4.checkpoint.shipped_state), written atomically, read back
    and rebuilt before the command reports success."""
    if Path(args.weights).expanduser().resolve() == SHIPPED_WEIGHTS:
        SHIPPED_WEIGHTS.parent.mkdir(exist_ok=True)
    output = writable_file("--weights", args.weights, ".pt")
    checkpoint = Path(args.checkpoint).expanduser()
    state = common.load_checkpoint(checkpoint)
    if output.resolve() == SHIPPED_WEIGHTS and state.get("script") != "enhanced":
        raise common.UserError(
            f"{checkpoint} is a {state.get('script')} run's: the shipped file holds the enhanced model; "
            "name another OUT.pt after --weights"
        )
    state = shipped_state(state, args.run_name or checkpoint.resolve().parent.name)
    common.save_checkpoint(output, state)
    model, _ = common.model_from_checkpoint(common.load_checkpoint(output))  # what readers will do, checked now
    shipped, cfg = state["shipped"], model.config
    print(
        f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB): {cfg['variant']} width {cfg['width_mult']}, "
        f"run {shipped['run']}, epoch {shipped['epoch']}, test acc {shipped['test_acc']:.2f}% without TTA "
        f"({shipped['evaluated']} weights, commit {shipped['git_commit']})"
    )
    return {"output": str(output), "shipped": shipped}


@common.command_line
def main(argv=None):
    """ONNX: returns {"output", "which", "diffs": {batch size: max |diff|}, "compared": what the inputs were};
    --weights: {"output", "shipped": what the file records}."""
    args = parse_args(argv)
    if args.weights is not None:
        return write_weights(args)
    for package in ("onnx", "onnxscript", "onnxruntime"):
        predict.import_export_package(package)
    output = writable_file("--output", args.output, ".onnx")
    checkpoint = args.checkpoint or predict.shipped_weights()
    model, which = common.model_from_checkpoint(common.load_checkpoint(checkpoint))
    images, compared = comparison_images(args.data_dir, args.num_images)
    cfg = model.config
    print(f"exporting {cfg['variant']} width {cfg['width_mult']} ({which} weights) from {checkpoint}")
    try:
        diffs = export_checked(model, output, images, args.opset)
    except CheckFailed as exc:
        print(f"error: {exc}; {output} not written", file=sys.stderr)
        raise SystemExit(1) from None
    shown = ", ".join(f"{d:.2e} at batch {b}" for b, d in diffs.items())
    print(f"onnx checker: ok; max |logit diff| onnxruntime vs PyTorch on {compared}: {shown} (tolerance {TOLERANCE:g})")
    print(
        f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB; input 'images' [batch, 3, 32, 32] normalised "
        f"as in training, output 'logits' [batch, 10])"
    )
    return {"output": str(output), "which": which, "diffs": diffs, "compared": compared}


if __name__ == "__main__":
    main()
