"""The command line both scripts share: recipes as flag defaults, --config replay, range checks, one-line errors."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from .augment import AUGMENT_OPS, FLIP_MODES, TTA_VIEWS, AugmentConfig, augment_config
from .device import AMP_MODES, DEVICES
from .errors import Interrupted, NonFiniteLoss, UserError
from .model import ACTIVATIONS, HEADS, OUTPUT_STRIDES, VARIANTS


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the usage block: the message already names the flag
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag shows its default once: argparse appends '(default: X)' unless the help text already says
    what the default is (flags whose default None means something: all images, ./data, ...), the flag is
    required, or it has no default at all (None, and its help says nothing of one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default is None:
            return text
        return super()._get_help_string(action)


def chosen_recipe(recipes: dict, argv) -> str:
    """The recipe --recipe names in argv, else the one a --config file recorded, else the first of `recipes`. Read
    before the parser is built, because the recipe supplies every other flag's default: a flag given beside it
    still wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recorded = replayed_flags(argv).get("recipe")
    pre = ArgumentParser(add_help=False)
    pre.add_argument(
        "--recipe", choices=tuple(recipes), default=recorded if recorded in recipes else next(iter(recipes))
    )
    return pre.parse_known_args(argv)[0].recipe


# What --config does not replay: where the run's files went and how it was started, not what it trained.
NOT_REPLAYED = ("argv", "config", "output_dir", "resume", "overwrite", "test_only")


def replayed_flags(argv) -> dict:
    """The flags of the run whose config.json `--config PATH` names (timm's -c/--config, for a run's own record),
    as flag defaults; {} without --config. Only what decides the training: output, resume and the command line
    itself are the new run's."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(list(argv))[0].config
    if path is None:
        return {}
    try:
        recorded = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as exc:
        pre.error(f"--config {path}: cannot read it as a run's config.json ({getattr(exc, 'strerror', None) or exc})")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("args"), dict):
        pre.error(
            f"--config {path} is not a config.json written by these scripts (no 'args'); pass a run's config.json"
        )
    return {k: v for k, v in recorded["args"].items() if k not in NOT_REPLAYED}


def build_parser(recipes: dict, name: str, description: str) -> argparse.ArgumentParser:
    """The flags both scripts share, with recipe `name` of the script's `recipes` as defaults (names follow
    torchvision / timm)."""
    recipe = recipes[name]
    p = ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument(
        "--recipe",
        choices=tuple(recipes),
        default=name,
        help="named settings for every flag below (flags given beside it win): project is this "
        "project's recipe, notebook the public notebook's exact recipe",
    )
    bool_flag = argparse.BooleanOptionalAction
    m = p.add_argument_group("model")
    m.add_argument(
        "--variant",
        default=recipe["variant"],
        choices=VARIANTS,
        help="block table: a MobileNetV4, or mobilenetv2 (the peer, for comparison)",
    )
    m.add_argument("--width-mult", type=float, default=recipe["width_mult"], help="channel width multiplier")
    m.add_argument(
        "--output-stride",
        type=int,
        default=recipe.get("output_stride", 8),
        choices=OUTPUT_STRIDES,
        help="total down-sampling: 8 gives a 4x4 final map at 32x32 (stem and first strided stage at "
        "stride 1), 4 an 8x8 map (the next stage too, 2.6-2.8x the MACs), 32 the ImageNet strides",
    )
    m.add_argument("--act", default=recipe["act"], choices=tuple(ACTIVATIONS), help="activation function")
    m.add_argument("--se", action=bool_flag, default=recipe["se"], help="squeeze-and-excitation in every UIB")
    m.add_argument("--drop-path", type=float, default=recipe["drop_path"], help="stochastic depth rate (max)")
    m.add_argument(
        "--zero-init-last",
        action=bool_flag,
        default=recipe.get("zero_init_last", False),
        help="start every residual UIB's last BatchNorm scale at zero, so each block starts as the identity",
    )
    m.add_argument("--head", default=recipe["head"], choices=HEADS, help="classifier after the 1280-wide 1x1 conv")
    m.add_argument(
        "--dropout",
        type=float,
        default=recipe["dropout"],
        help="dropout before the classifier (mlp head: before its hidden layer, half of it after)",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data-dir",
        default=None,
        help="folder holding (or receiving) cifar-10-batches-py/ (default: ./data, created if missing)",
    )
    d.add_argument("--download", action=bool_flag, default=True, help="download CIFAR-10 if missing")
    d.add_argument(
        "--max-train-samples", type=int, default=None, help="train on the first N images (default: all 50,000)"
    )
    d.add_argument(
        "--max-test-samples", type=int, default=None, help="evaluate on the first N images (default: all 10,000)"
    )
    d.add_argument(
        "--augment",
        action=bool_flag,
        default=recipe["augment"],
        help="crop, flip, rotation, colour jitter, translation (batched on the device)",
    )
    aug = AugmentConfig()
    ops = {  # flag -> (type, default, help); a recipe may set its own op defaults (set_defaults below)
        "crop_padding": (int, aug.crop_padding, "RandomCrop(32, padding); 0: off"),
        "hflip": (float, aug.flip_prob, "horizontal flip probability; 0: off"),
        "rotation": (float, aug.rotation, "RandomRotation degrees; 0: off"),
        "translate": (float, aug.translate, "RandomAffine translate fraction; 0: off"),
        "cutout": (int, aug.cutout, "cutout square side in pixels; 0: off"),
    }
    ops = {k: (kind, recipe.get(k, value), text) for k, (kind, value, text) in ops.items()}
    jitter = tuple(recipe.get("color_jitter", (aug.brightness, aug.contrast, aug.saturation, aug.hue)))
    if recipe["augment"]:
        a = p.add_argument_group("augmentation (on in this recipe; the defaults are the ops it applies)")
        shown = {k: text for k, (_, _, text) in ops.items()}
        jitter_help = "ColorJitter brightness contrast saturation hue, each in [0, 0.5] (0 0 0 0: off)"
    else:  # the values only act with --augment: say so, rather than present them as if they were on
        a = p.add_argument_group("augmentation (off in this recipe: add --augment to apply these ops)")
        off = "applies only with --augment, which this recipe leaves off"
        shown = {k: f"{text}; {off} (default: {value})" for k, (_, value, text) in ops.items()}
        jitter_help = f"ColorJitter brightness contrast saturation hue, each in [0, 0.5]; {off} (default: {jitter})"
    a.add_argument("--crop-padding", type=int, default=aug.crop_padding, help=shown["crop_padding"])
    a.add_argument("--hflip", type=float, default=aug.flip_prob, help=shown["hflip"])
    a.add_argument(
        "--hflip-mode",
        default=recipe.get("hflip_mode", aug.flip_mode),
        choices=FLIP_MODES,
        help="random: each image flipped with probability --hflip in every epoch; alternate: each image flipped "
        "in every other epoch (a random half in the first), --hflip 0.5 only"
        + ("" if recipe["augment"] else f"; {off}"),
    )
    a.add_argument("--rotation", type=float, default=aug.rotation, help=shown["rotation"])
    a.add_argument(
        "--color-jitter",
        type=float,
        nargs=4,
        metavar=("B", "C", "S", "H"),
        default=(aug.brightness, aug.contrast, aug.saturation, aug.hue),
        help=jitter_help,
    )
    a.add_argument("--translate", type=float, default=aug.translate, help=shown["translate"])
    a.add_argument("--cutout", type=int, default=aug.cutout, help=shown["cutout"])
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=recipe["epochs"], help="training epochs")
    t.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=recipe["batch_size"],
        help="images per step per process (under torchrun the global batch is this x WORLD_SIZE; --lr is not rescaled)",
    )
    t.add_argument("--lr", type=float, default=recipe["lr"], help="peak learning rate")
    t.add_argument(
        "--wd",
        "--weight-decay",
        dest="wd",
        type=float,
        default=recipe["wd"],
        help="weight decay of conv and linear weights",
    )
    t.add_argument(
        "--norm-weight-decay",
        type=float,
        default=recipe["norm_weight_decay"],
        help="weight decay of norm weights/biases, all biases and layer-scale gammas (set it equal "
        "to --wd to decay everything, as the notebook did)",
    )
    t.add_argument(
        "--label-smoothing", type=float, default=recipe["label_smoothing"], help="cross-entropy label smoothing"
    )
    t.add_argument(
        "--clip-grad-norm",
        type=float,
        default=recipe["clip_grad_norm"],
        help="clip the gradient's global L2 norm to this (0 disables)",
    )
    t.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order, augmentation, dropout")
    t.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    t.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip steps whose loss is NaN/inf instead of stopping (checks every step: a sync)",
    )
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", choices=DEVICES, help="auto: mps, then cuda, then cpu")
    r.add_argument(
        "--amp",
        default="auto",
        choices=AMP_MODES,
        help="mixed precision; auto: on CUDA bf16 from compute capability 8.0, fp16 below it; fp32 on the CPU and MPS",
    )
    r.add_argument(
        "--channels-last",
        action=bool_flag,
        default=None,
        help="channels_last memory layout (default: on for CUDA and CPU, off for MPS)",
    )
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--sync-bn", action="store_true", help="under torchrun: SyncBatchNorm across processes")
    r.add_argument("--eval-batch-size", type=int, default=500, help="images per evaluation batch")
    r.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="evaluate on the test set every N epochs and after the last one (best.pt: the best "
        "evaluated epoch); the others log no test figures",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--output-dir",
        default=None,
        help="where files go (default: runs/<script>-<timestamp>; with --resume, the checkpoint's folder)",
    )
    o.add_argument("--overwrite", action="store_true", help="allow an output dir that holds another run")
    e = p.add_argument_group("resume, replay and evaluation")
    e.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="continue (or --test-only) from a checkpoint (default: none, start from scratch)",
    )
    e.add_argument(
        "--test-only", action="store_true", help="evaluate --resume PATH (a checkpoint or a weights file), no training"
    )
    e.add_argument(
        "--config",
        default=None,
        metavar="CONFIG.json",
        help="replay a run: the flags its config.json recorded are used unless given here; where "
        "files go and --resume stay this command's (default: none)",
    )
    e.add_argument(
        "--tta",
        default=recipe["tta"],
        choices=tuple(TTA_VIEWS),
        help="test-time augmentation of the TTA figure the summary reports (test_acc_tta)",
    )
    e.add_argument(
        "--tta-table",
        action=bool_flag,
        default=True,
        help="evaluate every TTA mode at the end (off: only none and --tta)",
    )
    p.set_defaults(**{k: v for k, v in recipe.items() if k in AUGMENT_OPS})  # a recipe may choose its ops
    return p


# (flag, lowest allowed, highest allowed, inclusive low?) for the numeric flags.
NUMERIC_LIMITS = [
    ("epochs", 1, 100_000, True),
    ("batch_size", 2, 65_536, True),
    ("lr", 0, 10, False),
    ("wd", 0, 10, True),
    ("norm_weight_decay", 0, 10, True),
    ("label_smoothing", 0, 0.99, True),
    ("clip_grad_norm", 0, 1e6, True),
    ("drop_path", 0, 0.99, True),
    ("dropout", 0, 0.99, True),
    ("width_mult", 0, 8, False),
    ("max_train_samples", 1, 10**9, True),
    ("max_test_samples", 1, 10**9, True),
    ("eval_batch_size", 1, 65_536, True),
    ("eval_every", 1, 100_000, True),
    ("seed", 0, 2**63 - 1, True),
    ("crop_padding", 0, 16, True),
    ("hflip", 0, 1, True),
    ("rotation", 0, 180, True),
    ("translate", 0, 0.5, True),
    ("cutout", 0, 32, True),
    ("color_jitter", 0, 0.5, True),
]


def parse_args(parser: argparse.ArgumentParser, argv=None, limits=()) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    replayed = replayed_flags(argv)
    known = vars(parser.parse_known_args([])[0])
    unknown = sorted(k for k in replayed if k not in known)
    if unknown:
        parser.error(
            f"--config: the run it records has flags this script lacks ({', '.join(unknown)}): replay it "
            f"with the script that wrote it (config.json's 'script')"
        )
    parser.set_defaults(**replayed)
    args = parser.parse_args(argv)
    for name, low, high, low_ok in [*NUMERIC_LIMITS, *limits]:
        values = getattr(args, name, None)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None and (
                not math.isfinite(value) or value > high or value < low or (value == low and not low_ok)
            ):
                bound = f"{'>=' if low_ok else '>'} {low} and <= {high}"
                parser.error(f"--{name.replace('_', '-')} {value} is out of range: use values {bound}")
    defaults = argparse.Namespace(**{k: parser.get_default(k) for k in AUGMENT_OPS})
    if not args.augment and augment_config(args) != augment_config(defaults):
        parser.error(
            "augmentation flags (--crop-padding, --hflip, --hflip-mode, --rotation, --color-jitter, --translate, "
            "--cutout) only act with --augment: add --augment"
        )
    if args.hflip_mode == "alternate" and args.hflip != 0.5:
        parser.error(
            f"--hflip-mode alternate flips each image in every other epoch, i.e. half the time; --hflip "
            f"{args.hflip} does not fit it: drop --hflip or use --hflip-mode random"
        )
    args.argv = argv  # the command line as given: saved in config.json, repeated in the resume hint
    if args.test_only and not args.resume:
        parser.error("--test-only needs a checkpoint: add --resume PATH")
    return args


def command_line(main):
    """Run a script's main(): user mistakes end as one line on stderr and exit 2, never a traceback."""

    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except NonFiniteLoss as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(3) from None
        except Interrupted as exc:
            raise SystemExit(128 + exc.signum) from None

    wrapper.__doc__, wrapper.__name__ = main.__doc__, main.__name__
    return wrapper


def resume_command(script: str, argv: list, path) -> str:
    """The command that continues a run: its own flags (`argv`), with --resume pointing at `path`."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume=") and token != "--overwrite":
            kept.append(token)
    return shlex.join(["python", f"mobilenetv4_{script}.py", *kept, "--resume", str(path)])
