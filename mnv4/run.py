"""The run around a script's own training loop: it composes the parts (device, data, the epoch loop, checkpoints,
the stop signal, evaluation, the report) behind the few calls the two loops make. Use it as a context manager:

    with Run(args, "enhanced", must_match=("lr", "wd")) as run:
        model = run.prepare(mobilenetv4(...))               # device, layout, DDP, compile; prints the banner
        start_epoch = run.resume(optimizer, scheduler, ema)  # from --resume's checkpoint, else 0
        for epoch in range(start_epoch, args.epochs):
            for images, labels in run.batches(epoch):       # augmented, normalised, on the device
                ... forward, backward, step ...
                run.step_done(loss, logits, labels)
            run.end_epoch(epoch)                            # evaluate, log, checkpoint
        return run.finish()                                 # TTA table, summary, plots"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

from .augment import TTA_VIEWS, augment_config
from .batches import load_run_data
from .checkpoint import CheckpointKeeper, check_resumable, eval_weights, load_checkpoint, prepare_output_dir
from .cli import resume_command
from .device import (
    check_exact_resume,
    device_name,
    device_warnings,
    peak_memory_mb,
    precision_context,
    run_device,
    seed_everything,
    set_rng_state,
)
from .distributed import Distributed
from .epochs import EpochLoop
from .evaluation import Evaluator, per_class_accuracy
from .files import write_json, write_metrics_csv
from .model import model_summary
from .provenance import git_commit, versions
from .report import (
    NOTEBOOK_REPORTED,
    confusion_matrix,
    eval_model_label,
    plot_confusion,
    plot_curves,
    print_banner,
    print_epoch_line,
    print_summary,
    print_tta_table,
)
from .stop import StopSignal


class Run:
    """The plumbing around a training loop (module docstring). `must_match`: the settings a resume must keep (the
    saved optimizer and scheduler states hold them). Under torchrun every rank runs this; rank 0 writes files."""

    def __init__(self, args, script: str, must_match: tuple = ()):
        self.args, self.script, self.must_match = args, script, tuple(must_match)
        self.dist = Distributed()
        seed_everything(args.seed, args.deterministic)
        self.device, self.amp_dtype, self.channels_last = run_device(args, self.dist)
        # Loss scaling for fp16 only (bf16 and fp32 need none): a pass-through otherwise, kept so that checkpoints
        # hold its adapted scale.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.checkpoint = load_checkpoint(args.resume) if args.resume else None
        if self.checkpoint is not None and self.checkpoint.get("step") and not args.test_only:
            check_exact_resume(self.device)
        self.out_dir = self.dist.broadcast(prepare_output_dir(args, script) if self.dist.is_main else None)
        self.data = load_run_data(args, self.dist, self.device)
        self.loop = EpochLoop(
            args, self.data, self.device, self.dist, augment_config(args) if args.augment else None, self.channels_last
        )
        self.keeper = CheckpointKeeper(self.out_dir, script, args, self.dist)
        self.stop = StopSignal(self.dist, self.device, self.out_dir)
        self.evaluator = Evaluator(self.data, self.dist, args.eval_batch_size, self.amp_dtype, self.channels_last)
        self.model, self.model_summary, self.config = None, None, None
        self.eval_weights = "model"  # which weights are evaluated and reported: "model" or "ema"
        self.history, self.best_acc = [], -1.0

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model to the device and layout, print the banner and save config.json. Returns the module
        to train (DDP-wrapped under torchrun, compiled with --compile); checkpoints hold the plain module."""
        if self.dist and self.args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.model_summary = model, model_summary(model)
        if self.checkpoint is not None:
            check_resumable(
                self.checkpoint, self.args, self.script, model.config, self.dist.world_size, self.must_match
            )
        self.config = run_config(self)
        if self.dist.is_main:
            announce(self)
        if self.dist:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return torch.compile(model) if self.args.compile else model

    def resume(self, optimizer, scheduler, ema=None) -> int:
        """Name what checkpoints hold; restore it from --resume's checkpoint if given (--test-only: only the
        weights that run evaluated); install the signal handlers. Returns the epoch to start from."""
        self.evaluator.use(self.model, ema)
        self.eval_weights = "ema" if ema is not None else "model"
        self.keeper.track(self.model, optimizer, scheduler, ema, self.grad_scaler, self.config["segments"])
        ckpt = self.checkpoint
        if ckpt is not None and self.args.test_only:
            # What the training run evaluated (its EMA when it kept one), whatever --model-ema says now.
            weights, self.eval_weights = eval_weights(ckpt)
            self.model.load_state_dict(weights)
            self.evaluator.use(self.model)
        elif ckpt is not None:
            self.keeper.restore(ckpt)
            if ckpt["step"]:  # mid-epoch (same world size, checked): this rank's own random stream
                set_rng_state(ckpt["rng"][self.dist.rank], self.device)
            self.history, self.best_acc = list(ckpt["history"]), ckpt["best_acc"]
            self.loop.resume_at(ckpt["epoch"], ckpt["step"], ckpt["partial"])
            if self.dist.is_main:
                print(f"resumed from {self.args.resume}: epoch {ckpt['epoch'] + 1}, step {ckpt['step']}")
        self.stop.install()
        return self.loop.resume_epoch

    def batches(self, epoch: int):
        return self.loop.batches(epoch)

    def progress(self) -> float:
        return self.loop.progress()

    def autocast(self):
        return precision_context(self.device, self.amp_dtype)

    def should_skip(self, loss) -> bool:
        return self.loop.should_skip(loss)

    def step_done(self, loss, logits, labels):
        """Account one optimizer step; on SIGINT/SIGTERM save last.pt and stop."""
        refresh = self.loop.count_step(loss, logits, labels, self.keeper.optimizer.param_groups[0]["lr"])
        # One process checks its flag every step; ranks agree at refresh points (a collective), so all stop together.
        signum = self.stop.agreed() if refresh or not self.dist else None
        if signum is not None:
            done = self.loop.step + 1
            self.loop.check_finite(self.out_dir / "last.pt")
            self.loop.bar.close()
            # No buffer averaging here (unlike end_epoch): DDP broadcasts rank 0's buffers at every forward, so
            # rank 0's BN statistics are the run's mid-epoch state; averaging would change what the next step sees.
            self.keeper.save_mid_epoch(
                self.loop.epoch, done, self.loop.partial_state(done), self.history, self.best_acc, self.device
            )
            self._stopped(signum, f"after epoch {self.loop.epoch + 1} step {done}")

    def end_epoch(self, epoch: int):
        """Evaluate, print the epoch's log line, write metrics and plots, save last.pt (and best.pt)."""
        train_time = self.loop.elapsed()
        self.loop.check_finite(self.out_dir / "last.pt")
        self.dist.average_buffers(self.model, self.evaluator.ema)
        evaluates = (epoch + 1) % self.args.eval_every == 0 or epoch + 1 == self.args.epochs
        test_loss, test_acc = self.evaluator.epoch() if evaluates else (math.nan, math.nan)
        row = self.loop.epoch_row(epoch, test_loss, test_acc, self.keeper.optimizer.param_groups[0]["lr"], train_time)
        self.history.append(row)
        is_best = test_acc > self.best_acc  # False for a skipped evaluation (NaN)
        self.best_acc = max(self.best_acc, test_acc)
        if self.dist.is_main:
            print_epoch_line(row, header=len(self.history) == 1 or epoch == self.loop.resume_epoch)
            # Checkpoints before the logs: a crash in between must not leave metrics.csv claiming an epoch that
            # no checkpoint holds; best.pt before last.pt, so last.pt never claims a missing best.pt.
            state = self.keeper.state(epoch + 1, 0, None, self.history, self.best_acc)
            if is_best:
                self.keeper.save("best.pt", state)
            self.keeper.save("last.pt", state)
            write_metrics_csv(self.out_dir / "metrics.csv", self.history)
            plot_curves(self.out_dir / "curves.png", self.history, *curves_labels(self))
        signum = self.stop.agreed()  # a signal during evaluation or saving: the epoch is saved, so stop here
        if signum is not None:
            self._stopped(signum, f"after epoch {epoch + 1}")

    def _stopped(self, signum, where):
        path = self.out_dir / "last.pt"
        self.stop.stopped(
            signum, f"stopped {where}; saved {path}\nresume with: {resume_command(self.script, self.args.argv, path)}"
        )

    def finish(self) -> dict:
        """TTA table, per-class accuracy, summary.json, plots; returns the summary (on every rank)."""
        self.stop.finishing = True  # from here a signal stops at once
        args = self.args
        modes = TTA_VIEWS if args.tta_table else {m: TTA_VIEWS[m] for m in dict.fromkeys(("none", args.tta))}
        table = self.evaluator.tta(modes)
        summary = final_summary(self, table)
        if self.dist.is_main:
            write_final_report(self, summary)
        return summary

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.loop.bar is not None:
            self.loop.bar.close()
        self.stop.restore()
        self.dist.close()
        return False


# ---- What a run records and reports: functions of a Run, kept beside it --------------------------------------
def announce(run: Run):
    """Print the banner and any device warning; write config.json (test_config.json for --test-only)."""
    print_banner(run.config, run.out_dir)
    for line in device_warnings(run.device, run.args):
        print(f"warning: {line}", file=sys.stderr)
    write_json(run.out_dir / ("config.json" if not run.args.test_only else "test_config.json"), run.config)


def run_config(run: Run) -> dict:
    """config.json: the flags, the device, the model and the data, and every process that trained the run."""
    config = {
        "script": run.script,
        "args": vars(run.args),
        "device": str(run.device),
        "device_name": device_name(run.device),
        "amp": str(run.amp_dtype),
        "channels_last": run.channels_last,
        "world_size": run.dist.world_size,
        "model": run.model.config,
        "model_summary": run.model_summary,
        "train_images": run.data.train_images.shape[0],
        "test_images": run.data.test_images.shape[0],
        "versions": versions(),
        "git_commit": git_commit(),
    }
    # Every process that trained this run, oldest first: where it started, its command line and commit. The
    # top-level args and git_commit are this process's; a resumed run's earlier epochs came from the others.
    ckpt, args = run.checkpoint, run.args
    this = {
        "from_epoch": 0,
        "from_step": 0,
        "argv": args.argv,
        "git_commit": config["git_commit"],
        "device_name": config["device_name"],
        "world_size": run.dist.world_size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if ckpt is None or args.test_only:
        config["segments"] = [this]
    else:  # checkpoints from before segments were recorded: the first process's command line is all they hold
        earlier = ckpt.get("segments") or [
            {"from_epoch": 0, "from_step": 0, "argv": ckpt["config"].get("argv"), "git_commit": None}
        ]
        config["segments"] = [*earlier, {**this, "from_epoch": ckpt["epoch"], "from_step": ckpt["step"]}]
    return config


def curves_labels(run: Run) -> tuple[str, float | None]:
    """curves.png's title, and the notebook's figure where the run compares with it (all 50,000 images)."""
    model, n = run.config["model"], run.data.train_images.shape[0]
    title = (
        f"mobilenetv4_{run.script}.py: {model['variant']}, width {model['width_mult']}, {n:,} training images, "
        f"seed {run.args.seed}"
    )
    return title, NOTEBOOK_REPORTED.get(run.script) if n == 50_000 else None


def final_summary(run: Run, table: dict) -> dict:
    """summary.json: the headline accuracies, the TTA table, per-class accuracy and the confusion matrix (both of
    the headline's predictions: the final model without TTA), time, size and memory."""
    args, labels = run.args, run.data.test_labels
    headline_preds = table["none"][2]
    tta = {name: {"test_acc": acc, "views": len(TTA_VIEWS[name])} for name, (_, acc, _) in table.items()}
    tested = [r["test_acc"] for r in run.history if not math.isnan(r["test_acc"])]
    return {
        "script": run.script,
        "test_acc": tta["none"]["test_acc"],
        "test_acc_tta": tta[args.tta]["test_acc"],
        "tta": args.tta,
        "tta_table": tta,
        "best_acc": max(tested, default=None),
        "epochs_completed": len(run.history) if not args.test_only else (run.checkpoint or {}).get("epoch"),
        "train_time_s": sum(r["epoch_time_s"] for r in run.history),
        "params": run.model_summary["params"],
        "macs": run.model_summary["macs"],
        "device": str(run.device),
        "device_name": device_name(run.device),
        "world_size": run.dist.world_size,
        "peak_memory_mb": peak_memory_mb(run.device),
        "per_class_acc": per_class_accuracy(labels, headline_preds, run.data.classes),
        "confusion": confusion_matrix(labels, headline_preds, len(run.data.classes)).tolist(),
        "test_images": labels.numel(),
        "evaluated": run.eval_weights,
        "checkpoint": args.resume if args.test_only else str(run.out_dir / "last.pt"),
        "config": run.config,
    }


def write_final_report(run: Run, summary: dict):
    """Print the TTA table and the summary; write summary.json, confusion.png and curves.png."""
    args, labels = run.args, run.data.test_labels
    label = eval_model_label(summary, args.test_only)
    print_tta_table(summary["tta_table"], args.tta, label)
    print_summary(summary, run.out_dir, args.test_only)
    write_json(run.out_dir / "summary.json", summary)
    plot_confusion(
        run.out_dir / "confusion.png",
        torch.tensor(summary["confusion"]),
        run.data.classes,
        f"{run.config['model']['variant']}, {label}, no TTA: {summary['test_acc']:.2f}% of "
        f"{labels.numel():,} test images",
    )
    if run.history:
        plot_curves(run.out_dir / "curves.png", run.history, *curves_labels(run))
