"""The README's headline: this project's full training runs against the public notebook's reported results.

Reads run folders written by the training scripts (finished or still training) and writes into --output-dir:
  headline.md    one row per run: final and best test accuracy, each with and without TTA, training time,
                 machine, the commits and the command that trained it
  headline.png   test accuracy per epoch of every run, with the notebook's reported 20-epoch accuracies
  accuracy-vs-macs.png
                 each finished run's final accuracy (and with TTA) against its MACs per image, beside the
                 notebook's reported accuracies at the MACs of its model

"best + TTA" needs the best checkpoint evaluated with TTA, which training does not do (TTA runs once, on the
final weights). Write it with `python mobilenetv4_<script>.py --test-only --resume <run>/best.pt`: its default
output folder, <run>/eval-best/, is where this script looks.

The notebook published final accuracies only, so its curve cannot be drawn: its results are marked at epoch 20.
It published no MACs either: its model (a MobileNetV2 layer table with ImageNet strides, so a 1x1 final map at
32x32) is rebuilt here as `--variant mobilenetv2 --output-stride 32` under each script's model flags, and counted.

Example:
  python headline.py results/baseline-20ep-seed0 results/enhanced-20ep-seed0 --output-dir results
"""

import argparse
import csv
import json
import math
import shlex
import statistics
from pathlib import Path

import common

# The notebook's reported 20-epoch test accuracies (%), on the official CIFAR-10 files.
NOTEBOOK = common.NOTEBOOK_REPORTED
# The notebook's model in this project's builder: its MobileNetV2 table at ImageNet strides (stride-2 stem).
NOTEBOOK_MODEL_FLAGS = ("--variant", "mobilenetv2", "--output-stride", "32")
# "best" is the epoch with the highest test accuracy: chosen on the test set (there is no validation split), so
# an optimistic figure; the headline is the final epoch.
COLUMNS = [
    "run",
    "notebook (reported)",
    "epochs",
    "params",
    "MACs",
    "final",
    "final + TTA",
    "best on test set (epoch)",
    "best on test set + TTA",
    "training time",
    "img/s (median epoch)",
    "machine",
    "commits",
    "replay",
]


def read_run(folder: Path) -> dict:
    """What the headline needs from one run folder; UserError when it holds no run."""
    if not (folder / "config.json").is_file() or not (folder / "metrics.csv").is_file():
        raise common.UserError(
            f"{folder} holds no training run (config.json and metrics.csv are missing): pass "
            "the --output-dir of a mobilenetv4_baseline.py or mobilenetv4_enhanced.py run"
        )
    config = json.loads((folder / "config.json").read_text())
    with open(folder / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows:
        raise common.UserError(f"{folder}/metrics.csv has no epoch yet: wait for the run's first epoch")

    def summary(path):
        return json.loads(path.read_text()) if path.is_file() else None

    return {
        "folder": folder,
        "config": config,
        "rows": rows,
        "summary": summary(folder / "summary.json"),
        "best_eval": summary(folder / "eval-best" / "summary.json"),
    }


def model_size(run: dict) -> dict | None:
    """Parameters and MACs per image: summary.json's, else the model summary config.json recorded at the start."""
    return run["summary"] or run["config"].get("model_summary")


def acc(value) -> str:
    return f"{value:.2f}" if value is not None else "-"


def hours(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def short_commit(commit) -> str:
    """'abc1234', or 'abc1234-dirty' for a run started from uncommitted edits (common.git_commit)."""
    if not commit:
        return "unknown"
    sha, dirty, _ = commit.partition("-dirty")
    return sha[:7] + dirty


def row_cells(run: dict) -> list[str]:
    config, rows, summary, best_eval = run["config"], run["rows"], run["summary"], run["best_eval"]
    script, planned = config["script"], config["args"]["epochs"]
    evaluated = [r for r in rows if not math.isnan(r["test_acc"])]  # --eval-every leaves NaN in skipped epochs
    best = max(evaluated, key=lambda r: r["test_acc"])  # the first of equals, as best.pt keeps it
    tta = config["args"]["tta"]
    final_tta = f"{acc(summary['test_acc_tta'])} ({tta})" if summary else "in progress"
    best_tta = f"{acc(best_eval['test_acc_tta'])} ({best_eval['tta']})" if best_eval else "-"
    segments = config.get("segments") or [{"argv": config["args"]["argv"], "git_commit": config["git_commit"]}]
    commits = ", ".join(dict.fromkeys(short_commit(s["git_commit"]) for s in segments))
    command = shlex.join(["python", f"mobilenetv4_{script}.py", "--config", str(run["folder"] / "config.json")])
    machine = f"{config['device']} ({config['device_name']})" + (
        f" x{config['world_size']}" if config.get("world_size", 1) > 1 else ""
    )
    size = model_size(run)
    return [
        run["folder"].name,
        acc(NOTEBOOK.get(script)),
        f"{len(rows)} / {planned}",
        f"{size['params'] / 1e6:.2f} M" if size else "-",
        f"{size['macs'] / 1e6:.1f} M" if size else "-",
        acc(evaluated[-1]["test_acc"]),
        final_tta,
        f"{acc(best['test_acc'])} ({int(best['epoch'])})",
        best_tta,
        hours(sum(r["epoch_time_s"] for r in rows)),
        f"{statistics.median(r['img_per_s'] for r in rows):.0f}",
        machine,
        commits,
        f"`{command}`",
    ]


def markdown(runs: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(run)) + " |" for run in runs]
    return "\n".join(lines) + "\n"


def mark_notebook(ax, x_of: dict, first_color: int, where: str):
    """The notebook's reported accuracies as crosses at x_of[script], in colours after the runs' own."""
    for j, (script, value) in enumerate(NOTEBOOK.items()):
        ax.plot(
            [x_of[script]],
            [value],
            marker="x",
            ms=10,
            mew=2,
            ls="none",
            color=f"C{first_color + j}",
            label=f"notebook {script}: {value:.2f}% reported {where}",
        )


def plot(path: Path, runs: list[dict]):
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.8))
    ax = fig.subplots()
    for i, run in enumerate(runs):
        rows = [r for r in run["rows"] if not math.isnan(r["test_acc"])]
        ax.plot(
            [r["epoch"] for r in rows],
            [r["test_acc"] for r in rows],
            "o-",
            ms=3,
            color=f"C{i}",
            label=f"{run['folder'].name} (this project)",
        )
    mark_notebook(ax, {script: 20 for script in NOTEBOOK}, len(runs), "at epoch 20 (no curve published)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), no TTA")
    ax.set_title("CIFAR-10 test accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    common.save_figure(fig, path)


def notebook_macs() -> dict:
    """MACs per 32x32 image of the notebook's model for each script, under that script's default model flags."""
    import mobilenetv4_baseline
    import mobilenetv4_enhanced

    macs = {}
    for script, module in (("baseline", mobilenetv4_baseline), ("enhanced", mobilenetv4_enhanced)):
        args = module.build_parser().parse_args(list(NOTEBOOK_MODEL_FLAGS))
        macs[script] = common.count_macs(common.model_from_args(args))
    return macs


def plot_macs(path: Path, runs: list[dict], notebook: dict):
    """Final accuracy against MACs per image (log scale): a filled marker without TTA and a hollow one with it,
    joined by a line, for each finished run; the notebook's reported figures as crosses."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(8, 6))
    ax = fig.subplots()
    finished = [run for run in runs if run["summary"]]
    for i, run in enumerate(finished):
        summary, color = run["summary"], f"C{i}"
        macs = summary["macs"] / 1e6
        ax.plot([macs], [summary["test_acc"]], "o", color=color, label=f"{run['folder'].name}")
        if summary.get("test_acc_tta") is not None:
            ax.plot([macs, macs], [summary["test_acc"], summary["test_acc_tta"]], "-", color=color, lw=1)
            ax.plot([macs], [summary["test_acc_tta"]], "o", mfc="none", color=color)
    notebook_mmacs = {script: value / 1e6 for script, value in notebook.items()}
    mark_notebook(ax, notebook_mmacs, len(finished), "(MACs of its model rebuilt here)")
    ax.set_xscale("log")
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("MACs per 32x32 image (millions, log scale)")
    ax.set_ylabel("test accuracy after the last epoch (%)")
    ax.set_title("CIFAR-10 accuracy against compute (filled: no TTA; hollow: with the run's TTA)")
    ax.grid(alpha=0.3, which="both")
    # below the axes: the runs cluster at a few MACs values, and a legend inside would cover some of them
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    common.save_figure(fig, path)


def build_parser():
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (the scripts' --output-dir)")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("results"),
        help="where headline.md, headline.png and accuracy-vs-macs.png go",
    )
    return p


@common.command_line
def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = [read_run(folder) for folder in args.runs]
    text = markdown(runs)
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise common.UserError(
            f"cannot create {args.output_dir} ({exc.strerror}): choose a writable --output-dir"
        ) from None
    common.atomic_write(args.output_dir / "headline.md", lambda f: f.write(text.encode()))
    plot(args.output_dir / "headline.png", runs)
    plot_macs(args.output_dir / "accuracy-vs-macs.png", runs, notebook_macs())
    written = ", ".join(str(args.output_dir / name) for name in ("headline.md", "headline.png", "accuracy-vs-macs.png"))
    print(text + f"\nwrote {written}")
    return text


if __name__ == "__main__":
    main()
