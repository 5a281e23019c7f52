"""Checkpoints: atomic save, a safe load, the weights a run evaluates, the shipped weights file, and the resume
compatibility check."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import torch

from .device import rng_state
from .errors import UserError
from .files import atomic_write
from .model import MobileNetV4, mobilenetv4

CHECKPOINT_VERSION = 2  # 2: SE on every UIB's expanded channels (new module layout), per-rank RNG states

# The enhanced default's trained weights, in the repository: what predict.py and export.py use when no checkpoint
# is named. Written by `python export.py --checkpoint RUN/last.pt --weights` (see `shipped_state`).
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "mobilenetv4_conv_small_enhanced_cifar10.pt"


MODEL_KEYS = ("variant", "width_mult", "act", "se", "head", "output_stride", "num_classes")


def saved_model_config(state: dict) -> dict:
    """A checkpoint's model configuration in today's terms: checkpoints that predate `output_stride` recorded
    `cifar_stem` (True: the CIFAR port, output stride 8; False: the ImageNet strides, 32)."""
    cfg = dict(state.get("model_config") or {})
    if "output_stride" not in cfg and "cifar_stem" in cfg:
        cfg["output_stride"] = 8 if cfg.pop("cifar_stem") else 32
    return cfg


def save_checkpoint(path: Path, state: dict):
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path) -> dict:
    """Load with weights_only=True (no arbitrary unpickling); anything else than our checkpoint is refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass the path of a last.pt or best.pt")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, unsafe object: all equally unusable
        raise UserError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}); use another last.pt or best.pt"
        ) from None
    if isinstance(state, dict) and state.get("version") == 1:
        raise UserError(
            f"{path} was written by an older version of these scripts (checkpoint format 1, before SE "
            f"moved to every UIB's expanded channels): its weights do not fit this model; retrain"
        )
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "model" not in state:
        raise UserError(f"{path} is not a checkpoint of these scripts (version {CHECKPOINT_VERSION})")
    return state


def eval_weights(state: dict) -> tuple[dict, str]:
    """The weights a checkpoint's run evaluated and reported, and which they are: the EMA when the run kept
    one (its ModelEma state, `module.` prefix and `n_averaged` stripped), else the raw model. A weights file
    keeps the evaluated weights under "model" and says in `shipped` which they are."""
    ema = state.get("ema")
    if ema is None:
        return state["model"], (state.get("shipped") or {}).get("evaluated", "model")
    prefix = "module."
    return {k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)}, "ema"


def model_from_checkpoint(state: dict) -> tuple[MobileNetV4, str]:
    """Rebuild the model a checkpoint describes from its own saved configuration and load the evaluated weights
    (see `eval_weights`). Returns (model on CPU in eval mode, "ema" | "model")."""
    cfg = saved_model_config(state)
    try:
        model = mobilenetv4(
            cfg["variant"],
            cfg["num_classes"],
            width_mult=cfg["width_mult"],
            output_stride=cfg["output_stride"],
            act=cfg["act"],
            se=cfg["se"],
            drop_path_rate=cfg.get("drop_path_rate", 0.0),
            head=cfg["head"],
            dropout=cfg.get("dropout", 0.2),
        )
        weights, which = eval_weights(state)
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # missing keys, shape mismatch, bad config
        raise UserError(
            f"checkpoint does not describe a model these scripts build ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from None
    return model.eval(), which


def shipped_state(state: dict, run: str) -> dict:
    """A run's checkpoint reduced to what ships: the weights its run evaluated (the EMA when it kept one) in fp32,
    the model settings, the run's flags, and `shipped` (the run's name, its final test accuracy without TTA,
    that epoch, which weights and the commit that trained it). It stays a checkpoint: `load_checkpoint`,
    `model_from_checkpoint` and `--test-only --resume` read it, with torch.load(weights_only=True)."""
    history = state.get("history") or []
    if state.get("step") or not history or math.isnan(history[-1]["test_acc"]):
        raise UserError(
            "the checkpoint is not an evaluated epoch end (stopped mid-epoch, or its last epoch was not "
            "evaluated): pass a finished run's last.pt or best.pt"
        )
    weights, which = eval_weights(state)
    segments = state.get("segments") or [{}]
    return {
        "version": CHECKPOINT_VERSION,
        "script": state.get("script"),
        "epoch": state["epoch"],
        "step": 0,
        "model": {k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
        "ema": None,
        "model_config": saved_model_config(state),
        "config": state.get("config") or {},
        "shipped": {
            "run": run,
            "test_acc": history[-1]["test_acc"],
            "epoch": history[-1]["epoch"],
            "evaluated": which,
            "git_commit": segments[-1].get("git_commit"),
        },
    }


def changed_setting(keys, saved: dict, mine: dict):
    """The first of `keys` whose value differs between a checkpoint's config and this run's, or None. Keys that
    either side lacks (another script's flags, an older checkpoint) are skipped; lists and tuples compare alike
    (--betas parses to a list, a recipe's default is a tuple)."""

    def comparable(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    return next((k for k in keys if k in saved and k in mine and comparable(saved[k]) != comparable(mine[k])), None)


def prepare_output_dir(args, script: str) -> Path:
    """The run's output folder, created and writable: --output-dir, else the resumed checkpoint's folder (an
    `eval-<name>` folder beside it for --test-only), else runs/<script>-<timestamp>. A folder that holds another
    run is refused unless --overwrite."""
    ckpt = Path(args.resume).expanduser() if args.resume else None
    if args.output_dir:
        out = Path(args.output_dir).expanduser()
    elif ckpt is not None:
        out = ckpt.parent / f"eval-{ckpt.stem}" if args.test_only else ckpt.parent
    else:
        out = Path("runs") / f"{script}-{time.strftime('%Y%m%d-%H%M%S')}"
    continuing = ckpt is not None and not args.test_only and out.resolve() == ckpt.parent.resolve()
    held = [n for n in ("last.pt", "best.pt") if (out / n).exists()]
    if held and not continuing and not args.overwrite:
        raise UserError(
            f"output dir {out} already holds a run ({held[0]}): continue it with --resume "
            f"{out / held[0]}, replace it with --overwrite, or choose another --output-dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output dir {out} ({exc.strerror}): choose a writable --output-dir") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"output dir {out} is not writable: choose a writable --output-dir")
    for stale in out.glob(".*.tmp"):  # left by a run killed mid-save (kill -9): never a complete file
        stale.unlink(missing_ok=True)
    return out


def check_resumable(ckpt: dict, args, script: str, model_config: dict, world_size: int, must_match: tuple = ()):
    """Refuse (UserError) a checkpoint this run cannot continue: another model; another script's (its optimizer
    and schedule states differ); a setting in `must_match` changed (the settings whose saved optimizer or
    scheduler state would silently win over the flag: the script names them); a weight EMA added or dropped
    (the reported average would cover part of the run, or best.pt would mix two kinds of weights); or, mid-epoch,
    anything that decides that epoch's batch order. --test-only needs only the model to match. `args`: this run's
    flags."""
    path, test_only = args.resume, args.test_only
    theirs = saved_model_config(ckpt)
    diff = [
        f"{k}={theirs.get(k)!r} (this run: {model_config[k]!r})" for k in MODEL_KEYS if theirs.get(k) != model_config[k]
    ]
    if diff:
        raise UserError(
            f"checkpoint {path} is for another model: {', '.join(diff)}; pass the matching flags or another checkpoint"
        )
    if test_only:
        return
    if ckpt.get("script") != script:
        raise UserError(
            f"checkpoint {path} was written by mobilenetv4_{ckpt.get('script')}.py: resume it with that "
            f"script (--test-only evaluates it with either)"
        )
    saved_ema, ema = ckpt.get("ema") is not None, bool(getattr(args, "model_ema", False))
    if saved_ema != ema:
        raise UserError(
            f"checkpoint {path} trained {'with' if saved_ema else 'without'} a weight EMA (this run: "
            f"{'with' if ema else 'without'}); the average must cover the whole run: resume "
            f"{'with' if saved_ema else 'without'} --model-ema, or start a new run"
        )
    saved = {**ckpt["config"], "world_size": ckpt.get("world_size", 1)}
    mine = {**vars(args), "world_size": world_size}
    key = changed_setting(must_match, saved, mine)
    if key:
        flag = "--" + key.replace("_", "-")
        raise UserError(
            f"checkpoint {path} trained with {flag} {saved[key]} (this run: {mine[key]}); its optimizer "
            "state would keep the old value: resume with the same flag, or start a new run"
        )
    key = ckpt["step"] and changed_setting(("batch_size", "max_train_samples", "seed", "world_size"), saved, mine)
    if key:
        raise UserError(
            f"checkpoint {path} stopped mid-epoch with {key.replace('_', '-')} {saved[key]}; resume with "
            "the same value (or from an epoch-end checkpoint)"
        )


class CheckpointKeeper:
    """What a checkpoint holds, and where it goes: the state of the objects a run trains (model, optimizer,
    scheduler, EMA, loss scaler) with the run's record, saved atomically by rank 0 and restored on resume."""

    def __init__(self, out_dir: Path, script: str, args, dist):
        self.out_dir, self.script, self.args, self.dist = out_dir, script, args, dist
        self.model = self.optimizer = self.scheduler = self.ema = self.grad_scaler = None
        self.segments = []

    def track(self, model, optimizer, scheduler, ema, grad_scaler, segments: list):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.ema, self.grad_scaler, self.segments = ema, grad_scaler, segments

    def state(self, epoch: int, step: int, partial, history: list, best_acc: float, rng=None) -> dict:
        """A checkpoint. `rng` (every rank's random state) only mid-epoch: epochs start from a fixed seed."""
        scaler = self.grad_scaler
        return {
            "version": CHECKPOINT_VERSION,
            "script": self.script,
            "epoch": epoch,
            "step": step,
            "partial": partial,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "rng": rng,
            "config": vars(self.args),
            "model_config": self.model.config,
            "world_size": self.dist.world_size,
            "history": history,
            "best_acc": best_acc,
            "segments": self.segments,
        }

    def save(self, name: str, state: dict) -> Path:
        path = self.out_dir / name
        if self.dist.is_main:
            save_checkpoint(path, state)
        return path

    def save_mid_epoch(self, epoch: int, done: int, partial: dict, history: list, best_acc: float, device):
        """last.pt after step `done` of `epoch`, with every rank's random state; every rank waits until it is in
        place, so none exits (and has torchrun tear the others down) before."""
        state = self.state(epoch, done, partial, history, best_acc, rng=self.dist.gather(rng_state(device)))
        self.save("last.pt", state)
        self.dist.barrier()

    def restore(self, ckpt: dict):
        """Load a checkpoint's training state into the tracked objects (the caller restores history and RNG)."""
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.grad_scaler is not None and ckpt.get("scaler"):
            self.grad_scaler.load_state_dict(ckpt["scaler"])
