"""Classify images with a trained MobileNetV4: the shipped weights, a checkpoint, or an exported ONNX model.

    python predict.py [--top-k 3] [--tta flip] [--json OUT] PATH [PATH ...]   # the shipped enhanced model
    python predict.py --checkpoint runs/X/best.pt PATH [PATH ...]               # a run's own checkpoint
    python predict.py --onnx model.onnx PATH [PATH ...]          # same output, no PyTorch model code involved

A PATH is an image (PNG, JPEG, BMP, WebP) or a folder searched recursively for them. Every image is converted
to RGB, resized to 32x32 and normalised exactly as in training; one line per image gives its top-k classes.
Without --checkpoint or --onnx the model is weights/mobilenetv4_conv_small_enhanced_cifar10.pt, the enhanced
default's trained weights. The model is rebuilt from the file's own saved configuration: no model flags to repeat.
Also the shared helpers of export.py: image reading and the onnxruntime session.
"""

import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

import common
from mnv4.checkpoint import SHIPPED_WEIGHTS

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # PIL format names; anything else is "not an image" here
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGE_SIZE = 32
EXPORT_INSTALL = "pip install -r requirements-export.txt"
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as image viewers show them


# ---- Images --------------------------------------------------------------------------------------------------
def find_images(paths) -> list[Path]:
    """Files as given (their content decides whether they are images); folders searched recursively, sorted."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images:
                raise common.UserError(f"folder {path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise common.UserError(f"{path} does not exist: pass image files or folders of images")
    return found


def to_rgb(image):
    """Any PIL mode -> 8-bit RGB. 16- and 32-bit integer greyscale are scaled from 0..65535 (PIL's own
    convert would clip them at 255); alpha is composited on ALPHA_BACKGROUND; palette, greyscale, CMYK, ...
    go through PIL's convert."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255)), rgba)
    return image.convert("RGB")


def read_image(path) -> torch.Tensor:
    """One image file -> uint8 [3, 32, 32]. Raises ValueError with a short reason for anything unreadable.

    PIL rather than torchvision.io: torchvision.io reads no BMP, and PIL decodes palette, 16-bit and alpha
    images into modes that one function (`to_rgb`) turns into RGB."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            image = ImageOps.exif_transpose(image)  # phone JPEGs store their rotation in EXIF
            rgb = to_rgb(image)  # decodes the pixels: a truncated file fails here
    except Image.UnidentifiedImageError:
        raise ValueError("not a PNG, JPEG, BMP or WebP image") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"too large to decode safely ({exc})") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ValueError(f"cannot be read: {reason}") from None
    except Exception as exc:  # decoders raise SyntaxError, ValueError, struct.error, ... on corrupt data
        raise ValueError(f"corrupt image ({type(exc).__name__}: {exc})") from None
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W]
    if pixels.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):  # the whole picture, stretched to a square: no crop
        pixels = TF.resize(pixels, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
    return pixels


def read_images(paths) -> tuple[list[Path], torch.Tensor, list[tuple[Path, str]]]:
    """(paths read, uint8 [N, 3, 32, 32], [(path, reason)] of those that could not be read)."""
    read, pixels, failed = [], [], []
    for path in paths:
        try:
            pixels.append(read_image(path))
            read.append(path)
        except ValueError as exc:
            failed.append((path, str(exc)))
    images = torch.stack(pixels) if pixels else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    return read, images, failed


# ---- onnxruntime (also used by export.py) -------------------------------------------------------------------
def first_line(exc: Exception, limit=300) -> str:
    """An exception's message cut to one line: library errors can run to pages."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def import_export_package(name: str):
    """onnx, onnxscript or onnxruntime, or a one-line UserError naming the install command (training needs
    none of them, so they are not in requirements.txt)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise common.UserError(f"{name} is not installed; install the export extras with: {EXPORT_INSTALL}") from None


def onnx_session(path, threads: int | None = None):
    """An onnxruntime CPU session for a model taking [N, 3, 32, 32] images and returning [N, 10] logits;
    anything else is a UserError."""
    ort = import_export_package("onnxruntime")
    path = Path(path).expanduser()
    if not path.is_file():
        raise common.UserError(f"ONNX model {path} does not exist: create one with export.py")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
        raise common.UserError(f"{path} is not an ONNX model onnxruntime can load ({first_line(exc)})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected = f"[N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}]"
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or list(inputs[0].shape[1:]) != [3, IMAGE_SIZE, IMAGE_SIZE]:
        shapes = ", ".join(str(i.shape) for i in inputs)
        raise common.UserError(
            f"{path} takes input {shapes}, not {expected} images: it is not a model for this "
            f"project's CIFAR-10 input size"
        )
    if len(outputs) != 1 or outputs[0].shape[-1] != len(common.CIFAR10_CLASSES):
        raise common.UserError(
            f"{path} returns {[o.shape for o in outputs]}, not [N, {len(common.CIFAR10_CLASSES)}] CIFAR-10 logits"
        )
    return session


def onnx_logits(session, normalized: torch.Tensor) -> torch.Tensor:
    """Run a session on normalised float images [B, 3, 32, 32]; logits [B, classes] as a CPU tensor."""
    feed = {session.get_inputs()[0].name: normalized.detach().cpu().float().contiguous().numpy()}
    return torch.from_numpy(session.run(None, feed)[0])


# ---- Classifiers: (uint8 images, view) -> softmax probabilities -------------------------------------------------
def shipped_weights() -> Path:
    """The shipped weights file, or a UserError naming what to do if it is not there."""
    if not SHIPPED_WEIGHTS.is_file():
        raise common.UserError(
            f"the shipped weights {SHIPPED_WEIGHTS} are missing (restore them with git checkout -- weights/); "
            "or name a model with --checkpoint PT or --onnx MODEL.onnx"
        )
    return SHIPPED_WEIGHTS


def checkpoint_classifier(path, device_name: str, batch_size: int):
    state = common.load_checkpoint(path)
    model, which = common.model_from_checkpoint(state)
    device = common.select_device(device_name)
    channels_last = common.default_channels_last(device)  # the training scripts' evaluation layout
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    cfg = model.config

    def classify(images, view):  # fp32 (no autocast): the probabilities do not depend on the device's AMP
        return common.predict_probs(
            model, images.to(device), view, batch_size=batch_size, channels_last=channels_last
        ).cpu()

    shipped = state.get("shipped")
    source = f"run {shipped['run']}, test acc {shipped['test_acc']:.2f}%, " if shipped else ""
    return classify, f"{cfg['variant']} width {cfg['width_mult']} ({source}{which} weights) from {path} on {device}"


def onnx_classifier(path, batch_size: int):
    session = onnx_session(path)

    def classify(images, view):
        logits = [
            onnx_logits(session, common.normalize(view(images[i : i + batch_size])))
            for i in range(0, images.shape[0], batch_size)
        ]
        return torch.cat(logits).softmax(1)

    return classify, f"{path} on onnxruntime (CPU)"


def top_k(probs: torch.Tensor, k: int) -> list[list[dict]]:
    values, indices = probs.topk(k, dim=1)
    return [
        [{"class": common.CIFAR10_CLASSES[i], "index": i, "prob": p} for p, i in zip(ps, idx)]
        for ps, idx in zip(values.tolist(), indices.tolist())
    ]


def format_line(path, top: list[dict]) -> str:
    return f"{path}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in top)


# ---- Command line ----------------------------------------------------------------------------------------------
def build_parser():
    p = common.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=common.HelpFormatter)
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--checkpoint",
        metavar="PT",
        help="a last.pt / best.pt of the training scripts, or a weights file written by export.py --weights "
        f"(default: the shipped weights, {SHIPPED_WEIGHTS.parent.name}/{SHIPPED_WEIGHTS.name})",
    )
    model.add_argument(
        "--onnx", metavar="MODEL.onnx", help="a model written by export.py, run with onnxruntime (default: none)"
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders of images")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image")
    p.add_argument(
        "--tta",
        default="none",
        choices=tuple(common.TTA_VIEWS),
        help="test-time augmentation: average the softmax over these views (as training's TTA table)",
    )
    p.add_argument(
        "--json", metavar="OUT", default=None, help="also write the results as JSON to this file (default: print only)"
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=common.DEVICES,
        help="for --checkpoint (auto: mps, then cuda, then cpu); --onnx runs on onnxruntime's CPU",
    )
    p.add_argument("-b", "--batch-size", type=int, default=500, help="images per forward pass")
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.top_k <= len(common.CIFAR10_CLASSES):
        parser.error(f"--top-k {args.top_k} is out of range: use 1 to {len(common.CIFAR10_CLASSES)}")
    if not 1 <= args.batch_size <= 65_536:
        parser.error(f"--batch-size {args.batch_size} is out of range: use 1 to 65536")
    if args.onnx and args.device not in ("auto", "cpu"):
        parser.error(f"--device {args.device} does not apply to --onnx, which runs on onnxruntime's CPU provider")
    if args.json and not Path(args.json).expanduser().parent.is_dir():
        parser.error(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    return args


@common.command_line
def main(argv=None):
    """Returns the results ([{"path", "top"}]); exits 1 after classifying the rest if an image was unreadable."""
    args = parse_args(argv)
    paths = find_images(args.paths)
    if args.onnx:
        classify, described = onnx_classifier(args.onnx, args.batch_size)
    else:
        checkpoint = args.checkpoint or shipped_weights()
        classify, described = checkpoint_classifier(checkpoint, args.device, args.batch_size)
    read, images, failed = read_images(paths)
    if failed and len(paths) == 1:  # a single unreadable image is a plain user error
        raise common.UserError(f"{failed[0][0]}: {failed[0][1]}")
    print(f"model: {described}", file=sys.stderr)  # only now: a user error stays the one line on stderr
    for path, reason in failed:  # in a batch: one line each, the rest is still classified
        print(f"error: {path}: {reason}", file=sys.stderr)

    views = common.TTA_VIEWS[args.tta]
    results = []
    if read:
        with torch.inference_mode():
            probs = sum(classify(images, view) for view in views) / len(views)
        results = [{"path": str(path), "top": top} for path, top in zip(read, top_k(probs, args.top_k))]
    for result in results:
        print(format_line(result["path"], result["top"]))
    if args.json:
        common.write_json(Path(args.json).expanduser(), results)  # atomic; a one-line error if it fails
    if failed:
        print(f"{len(failed)} of {len(paths)} images could not be read", file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
