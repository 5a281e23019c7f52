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

--curves also redraws each run folder's curves.png from its metrics.csv with today's plotting code (the
training scripts draw it the same way at every epoch).

The notebook published final accuracies only, so its curve cannot be drawn: its results are marked at epoch 20.
It published no MACs either: its model (a MobileNetV2 layer table with ImageNet strides, so a 1x1 final map at
32x32) is rebuilt here as `--variant mobilenetv2 --output-stride 32` under each script's `--recipe notebook`, and
counted.

Example:
  python headline.py results/baseline-20ep-seed0 results/enhanced-20ep-seed0 --output-dir results
"""

import argparse
import csv
import importlib
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

import common
from mnv4.report import plot_curves

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

    def summary(path, row):
        """The file at `path` if it describes `row`'s epoch (same epoch count and test accuracy), else None: a run
        that went on after it (--resume with more --epochs) or was trained again into the folder (--overwrite)
        leaves the old file behind, and an evaluation on another device or precision can differ by a few images.
        A file left out is named on stderr, so a missing figure is not read as never measured."""
        if not path.is_file() or row is None:
            return None
        found = json.loads(path.read_text())
        if found["epochs_completed"] == row["epoch"] and found["test_acc"] == row["test_acc"]:
            return found
        print(
            f"note: {path} (epoch {found['epochs_completed']}, {found['test_acc']:.2f}%) is not quoted: it does not "
            f"describe epoch {int(row['epoch'])} of metrics.csv ({row['test_acc']:.2f}%)",
            file=sys.stderr,
        )
        return None

    evaluated = [r for r in rows if not math.isnan(r["test_acc"])]  # --eval-every leaves NaN in skipped epochs
    # The first of equals, as best.pt keeps it; None before the first evaluated epoch.
    best = max(evaluated, key=lambda r: r["test_acc"], default=None)
    return {
        "folder": folder,
        "config": config,
        "rows": rows,
        "final": evaluated[-1] if evaluated else None,
        "best": best,
        "summary": summary(folder / "summary.json", rows[-1]),
        "best_eval": summary(folder / "eval-best" / "summary.json", best),
    }


# Flags that say where and how a run went, not what it trained: left out when naming its recipe.
NOT_RECIPE = {
    "recipe", "argv", "config", "data_dir", "download", "output_dir", "overwrite", "resume", "test_only", "seed",
    "deterministic", "device", "amp", "channels_last", "compile", "sync_bn", "eval_batch_size", "eval_every",
    "tta_table", "max_test_samples", "skip_nonfinite",
}  # fmt: skip


def comparable(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def flag_text(key: str, value) -> str:
    """A setting as the command line spells it: `--lr 0.2`, `--crop-padding 4`; a switch as `--se` or `--no-se`."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


def recipe_label(config: dict) -> str:
    """A run named by what it trained: the script's recipe it equals (`project`, the default, or `notebook`), or the
    nearest one and the flags that differ from it today, then its seed. Flags the run predates are not compared:
    their defaults are what it trained (as --config replays it)."""
    script, args = config["script"], config["args"]
    module = importlib.import_module(f"mobilenetv4_{script}")
    candidates = []
    for name in module.RECIPES:
        defaults = vars(module.build_parser(name).parse_args([]))
        differ = [
            flag_text(k, v)
            for k, v in args.items()
            if k in defaults and k not in NOT_RECIPE and comparable(v) != comparable(defaults[k])
        ]
        candidates.append((len(differ), name, differ))
    _, name, differ = min(candidates, key=lambda c: c[0])  # the first recipe wins a tie: the default
    default = name == next(iter(module.RECIPES))
    label = f"{script} {name}" + (" (the default)" if default and not differ else "")
    return f"{label}{' + ' + ' '.join(differ) if differ else ''}, seed {args.get('seed', 0)}"


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
    final, best = run["final"], run["best"]
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
        acc(final["test_acc"] if final else None),
        final_tta,
        f"{acc(best['test_acc'])} ({int(best['epoch'])})" if best else "-",
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


# Matplotlib's colour cycle has ten colours: the runs after the tenth take them again with another marker.
MARKERS = ("o", "s", "^", "D", "v", "P")


def run_style(i: int) -> dict:
    """Colour and marker of the i-th run, unique for the first 60 runs (the notebook's crosses use "x")."""
    return {"color": f"C{i % 10}", "marker": MARKERS[i // 10 % len(MARKERS)]}


def mark_notebook(ax, x_of: dict, first_color: int, where: dict):
    """The notebook's reported accuracies as crosses at x_of[script], in colours after the runs' own; where[script]
    ends each legend entry."""
    for j, (script, value) in enumerate(NOTEBOOK.items()):
        ax.plot(
            [x_of[script]],
            [value],
            marker="x",
            ms=10,
            mew=2,
            ls="none",
            color=f"C{(first_color + j) % 10}",
            label=f"notebook {script}: {value:.2f}% reported {where[script]}",
        )


def plot(path: Path, runs: list[dict]):
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5.2))
    ax = fig.subplots()
    for i, run in enumerate(runs):
        rows = [r for r in run["rows"] if not math.isnan(r["test_acc"])]
        label = recipe_label(run["config"])
        ax.plot(
            [r["epoch"] for r in rows],
            [r["test_acc"] for r in rows],
            ls="-",
            ms=3,
            lw=2.2 if "(the default)" in label else 1.2,  # the default's runs stand out
            label=label,
            **run_style(i),
        )
    where = {script: "at epoch 20 (no curve published)" for script in NOTEBOOK}
    mark_notebook(ax, {script: 20 for script in NOTEBOOK}, len(runs), where)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), no TTA")
    ax.set_title("CIFAR-10 test accuracy per epoch, this project's full runs (thick: the default recipe)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    common.save_figure(fig, path)


def notebook_macs() -> dict:
    """MACs per 32x32 image of the notebook's model for each script, under that script's `--recipe notebook` (the
    notebook's model flags, which this project's defaults may leave, e.g. the enhanced width)."""
    import mobilenetv4_baseline
    import mobilenetv4_enhanced

    macs = {}
    for script, module in (("baseline", mobilenetv4_baseline), ("enhanced", mobilenetv4_enhanced)):
        args = module.build_parser("notebook").parse_args(list(NOTEBOOK_MODEL_FLAGS))
        macs[script] = common.count_macs(common.model_from_args(args))
    return macs


def spread(values: list[float], factor: float = 1.09) -> list[float]:
    """x positions on a log axis where no point hides another: neighbours (in the order of their values, ties in
    the given order) at least `factor` apart. Points that would come closer are pooled and laid out `factor` apart
    around the geometric mean of their values, pooling again until no two groups overlap; a point with room
    stays at its value."""
    gap = math.log(factor)
    groups: list[list[int]] = []  # runs of neighbours laid out together, in the order of their values

    def ends(group):
        centre, half = statistics.fmean(math.log(values[i]) for i in group), (len(group) - 1) / 2 * gap
        return centre - half, centre + half

    for i in sorted(range(len(values)), key=lambda i: (values[i], i)):
        groups.append([i])
        while len(groups) > 1 and ends(groups[-1])[0] - ends(groups[-2])[1] < gap - 1e-12:
            groups[-2:] = [groups[-2] + groups[-1]]
    x = list(values)
    for group in groups:
        first = ends(group)[0]
        for k, i in enumerate(group):
            x[i] = values[i] if len(group) == 1 else math.exp(first + k * gap)
    return x


def plot_macs(path: Path, runs: list[dict], notebook: dict):
    """Final accuracy against MACs per image (log scale): a filled marker without TTA and a hollow one with it,
    joined by a line, for each finished run; the notebook's reported figures as crosses. Runs of one model share
    its MACs, and models can cost almost the same: points are fanned out sideways (`spread`), and the legend gives
    each run's MACs."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    fig = Figure(figsize=(8, 6.4))
    ax = fig.subplots()
    finished = [run for run in runs if run["summary"]]
    xs = spread([run["summary"]["macs"] / 1e6 for run in finished])
    for i, (run, x) in enumerate(zip(finished, xs)):
        summary, style = run["summary"], run_style(i)
        label = f"{recipe_label(run['config'])}: {summary['macs'] / 1e6:.1f} M MACs"
        ax.plot([x], [summary["test_acc"]], ls="none", ms=7, label=label, **style)
        if summary.get("test_acc_tta") is not None:
            ax.plot([x, x], [summary["test_acc"], summary["test_acc_tta"]], "-", color=style["color"], lw=1)
            ax.plot([x], [summary["test_acc_tta"]], ls="none", ms=7, mfc="white", **style)
    notebook_mmacs = {script: value / 1e6 for script, value in notebook.items()}
    where = {script: f"(its model rebuilt here): {mmacs:.1f} M MACs" for script, mmacs in notebook_mmacs.items()}
    mark_notebook(ax, notebook_mmacs, len(finished), where)
    ax.set_xscale("log")
    # room on both sides for the widest fan of points, whatever the models cost
    low, high = min([*xs, *notebook_mmacs.values()]) / 1.5, max([*xs, *notebook_mmacs.values()]) * 1.3
    ax.set_xlim(low, high)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if low <= t <= high]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.margins(y=0.08)  # no marker clipped at the top or bottom
    ax.set_xlabel("MACs per 32x32 image (millions, log scale); points close in MACs are spread sideways")
    ax.set_ylabel("test accuracy after the last epoch (%)")
    ax.set_title("CIFAR-10 accuracy against compute (filled: no TTA; hollow: with the run's TTA)", fontsize=10)
    ax.grid(alpha=0.3)
    # below the axes: the runs cluster at a few MACs values, and a legend inside would cover some of them
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    common.save_figure(fig, path)


def redraw_curves(run: dict) -> Path:
    """The run's curves.png from its metrics.csv, titled as the training script titles it."""
    config, path = run["config"], run["folder"] / "curves.png"
    model, images = config["model"], config["train_images"]
    title = (
        f"mobilenetv4_{config['script']}.py: {model['variant']}, width {model['width_mult']}, {images:,} training "
        f"images, seed {config['args']['seed']}"
    )
    history = [{**row, "epoch": int(row["epoch"])} for row in run["rows"]]
    plot_curves(path, history, title, NOTEBOOK.get(config["script"]) if images == 50_000 else None)
    return path


def build_parser():
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (the scripts' --output-dir)")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("results"),
        help="where headline.md, headline.png and accuracy-vs-macs.png go",
    )
    p.add_argument("--curves", action="store_true", help="also redraw each run's curves.png from its metrics.csv")
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
    written = [str(args.output_dir / name) for name in ("headline.md", "headline.png", "accuracy-vs-macs.png")]
    written += [str(redraw_curves(run)) for run in runs] if args.curves else []
    written = ", ".join(written)
    print(text + f"\nwrote {written}")
    return text


if __name__ == "__main__":
    main()
