"""What a person sees: progress bars, the per-epoch log line, the banner and summary, the plots."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .files import save_figure
from .model import format_summary


def progress_bar(total, initial, desc, enabled=True):
    from tqdm.auto import tqdm

    # disable=None turns the bar off when stderr is not a terminal, so logs and CI output stay clean.
    return tqdm(
        total=total, initial=initial, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True
    )


# (metrics key, column title, format): one fixed-width line per epoch, airbench style.
EPOCH_COLUMNS = (
    ("epoch", "epoch", "{:>5d}"),
    ("train_loss", "train_loss", "{:>10.4f}"),
    ("train_acc", "train_acc", "{:>9.2f}"),
    ("test_loss", "test_loss", "{:>9.4f}"),
    ("test_acc", "test_acc", "{:>8.2f}"),
    ("lr", "lr_end", "{:>9.2e}"),
    ("epoch_time_s", "train_s", "{:>8.1f}"),
    ("img_per_s", "img/s", "{:>8.0f}"),
)


def print_epoch_line(row: dict, header: bool):
    from tqdm.auto import tqdm

    def cell(key, fmt):  # an epoch without evaluation (--eval-every) has NaN test figures: shown as '-'
        value = row[key]
        return "-".rjust(len(fmt.format(0))) if isinstance(value, float) and math.isnan(value) else fmt.format(value)

    if header:
        tqdm.write(" ".join(title.rjust(len(fmt.format(row[key]))) for key, title, fmt in EPOCH_COLUMNS))
    tqdm.write(" ".join(cell(key, fmt) for key, _, fmt in EPOCH_COLUMNS))


def print_banner(config: dict, out_dir: Path):
    args = config["args"]
    print(f"== mobilenetv4_{config['script']}.py ==")
    print("config: " + " ".join(f"{k}={v}" for k, v in args.items()))
    print(
        f"device: {config['device']} ({config['device_name']}) | amp: {config['amp']} | "
        f"channels_last: {config['channels_last']} | torch {config['versions']['torch']}"
    )
    print(f"model: {config['model']['variant']} | {format_summary(config['model_summary'])}")
    print(f"data: {config['train_images']} train / {config['test_images']} test images | output: {out_dir}")


def eval_model_label(summary: dict, test_only: bool) -> str:
    return f"{summary['checkpoint']} (epoch {summary['epochs_completed']})" if test_only else "final model"


def print_tta_table(tta: dict, headline: str, model: str):
    print(f"\nTest-time augmentation ({model}):")
    print(f"  {'tta':<11} {'views':>5} {'test acc':>9}")
    for name, row in tta.items():
        mark = "  <- --tta (the summary's TTA figure)" if name == headline else ""
        print(f"  {name:<11} {row['views']:>5d} {row['test_acc']:>8.2f}%{mark}")


def print_summary(summary: dict, out_dir: Path, test_only: bool):
    accuracy = f"test acc {summary['test_acc']:.2f}% | with TTA '{summary['tta']}' {summary['test_acc_tta']:.2f}%"
    peak = summary["peak_memory_mb"]
    memory = (
        f"peak memory {peak:.0f} MB ({summary['device']})"
        if peak is not None
        else f"peak memory not tracked on {summary['device']}"
    )
    if test_only:  # nothing trained: name what was evaluated, and the three files an evaluation writes
        print(f"\n{accuracy} | {eval_model_label(summary, True)} | {memory}")
        files = "test_config.json, summary.json, confusion.png"
    else:
        best = "n/a" if summary["best_acc"] is None else f"{summary['best_acc']:.2f}%"
        print(
            f"\nfinal {accuracy} | best epoch (chosen on the test set) {best} | epochs {summary['epochs_completed']} | "
            f"train time {summary['train_time_s']:.1f} s | {memory}"
        )
        files = "config.json, metrics.csv, summary.json, curves.png, confusion.png, last.pt, best.pt"
    print("per-class acc (no TTA): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["per_class_acc"].items()))
    print(f"files: {out_dir}/{{{files}}}")


# The public notebook's reported final test accuracy (%) after 20 epochs on all 50,000 training images.
NOTEBOOK_REPORTED = {"baseline": 70.09, "enhanced": 83.28}


def plot_curves(path: Path, history: list, title: str, notebook: float | None = None):
    """Loss and accuracy per epoch, train and test; `notebook`: the notebook's reported figure, where it compares."""
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4.3))
    ax_loss, ax_acc = fig.subplots(1, 2)
    panels = (
        (ax_loss, "loss", "loss (train: the training criterion; test: cross-entropy)"),
        (ax_acc, "acc", "accuracy (%)"),
    )
    for ax, key, label in panels:
        ax.plot(
            epochs, [r[f"train_{key}"] for r in history], "o-", ms=3, label="train (training mode, during the epoch)"
        )
        tested = [(r["epoch"], r[f"test_{key}"]) for r in history if not math.isnan(r[f"test_{key}"])]
        final = f"; last {tested[-1][1]:.2f}%" if tested and key == "acc" else ""  # in the legend: never on a curve
        ax.plot(*zip(*tested), "o-", ms=3, label=f"test (end of epoch, no TTA{final})") if tested else None
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.margins(y=0.08)
    if notebook is not None:
        ax_acc.axhline(notebook, color="grey", ls="--", lw=1, label=f"notebook, reported at epoch 20: {notebook:.2f}%")
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def confusion_matrix(labels, preds, num_classes: int) -> torch.Tensor:
    """Counts [true class, predicted class] (int64, CPU)."""
    k = num_classes
    return torch.bincount(labels.cpu() * k + preds.cpu(), minlength=k * k).view(k, k)


def plot_confusion(path: Path, matrix: torch.Tensor, classes, title: str):
    """`matrix`: `confusion_matrix`'s counts, drawn with each cell's count written in it."""
    from matplotlib.figure import Figure

    k = len(classes)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    im = ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                int(matrix[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
            )
    fig.colorbar(im, ax=ax, label="test images")
    save_figure(fig, path)
