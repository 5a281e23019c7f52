"""The report of a study: <study>.md (the table and its notes), <study>.png (one bar per row) and <study>.json."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import common

from .plan import LOG_NAME


def fmt_stat(mean, std, signed=False) -> str:
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if std is not None else "")


def md_cell(text: str) -> str:
    """An error message may hold a newline or a pipe; either would break the table row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def row_cells(row: dict, res: dict, labels: dict) -> list:
    n_seeds = len(res["seeds"])
    if row["mean"] is None:
        acc = "failed" if row["failed"] else "pending"
    else:
        acc = fmt_stat(row["mean"], row["std"])
    if row["reference"] is None:
        gain = "(reference)"
    elif row["gain"] is None:
        gain = "n/a" if row["mean"] is not None else "-"
    else:
        gain = fmt_stat(row["gain"], row["gain_std"], signed=True)
    seeds = f"{len(row['values'])}/{n_seeds}"
    if row["failed"]:
        seeds += f" ({len(row['failed'])} failed: {'; '.join(sorted(set(row['failed'].values())))})"
    if row["script"] is None:
        run = f"TTA '{row['tta']}' of row '{labels[row['source']]}'"
    else:
        run = f"{row['script']}.py, batch {'/'.join(map(str, row['batch_sizes'])) or '?'}" + (
            f": `{' '.join(row['flags'])}`" if row["flags"] else ""
        )
    beyond = "-" if row["beyond_noise"] is None else "yes" if row["beyond_noise"] else "no"
    return [row["label"], row["claimed"], gain, beyond, acc, seeds, run]


def test_note(test: dict) -> str:
    def family_text(family, what):
        if family is None:
            return f"{what}: none measured yet"
        if family["critical_t"] is None:
            return f"{what}: not judged until some have two seeds ({family['runs']} run(s), no residual df)"
        return (
            f"{what}: sigma = {family['sigma']:.2f} points ({family['runs']} runs, {family['df']} residual "
            f"df), {family['rows']} row(s) tested, |t| > {family['critical_t']:.2f}"
        )

    return (
        f"- Beyond noise: {test['name']}. Each run's accuracy = row effect + seed effect + noise (runs of one "
        "seed share initial weights and batch order, and every gain shares its reference's runs), fitted by "
        "least squares; a row's gain (difference of two row effects) divided by its standard error from the "
        "fit's residual sigma is beyond noise past the critical |t| of the maximum over the family's rows, "
        f"so a study with no real effect calls any row in {test['alpha']:.0%} of cases. Training rows and TTA "
        "rows (views of the same weights) are two families. "
        + family_text(test.get("training"), "Training rows")
        + "; "
        + family_text(test.get("tta"), "TTA rows")
        + ". Per-row thresholds and adjusted p-values: the .json."
    )


def markdown(res: dict) -> str:
    labels = {r["key"]: r["label"] for r in res["rows"]}
    b = res["budget"]
    budget = (
        f"{b['epochs']} epoch(s), {b['max_train_samples'] or 'all'} training / "
        f"{b['max_test_samples'] or 'all'} test images, seeds {' '.join(map(str, res['seeds']))}"
    )
    head = ["configuration", "claimed gain", "measured gain (% points)", "beyond noise", "test acc (%)", "seeds", "run"]
    lines = [
        f"# Ablation: {res['study']}",
        "",
        f"Budget: {budget}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(md_cell(c) for c in row_cells(r, res, labels)) + " |" for r in res["rows"]]
    lines += [
        "",
        "Notes:",
        f"- {res['notes']}",
        "- Test accuracy: the final epoch's, without TTA (summary `test_acc`), except TTA rows (summary "
        "`tta_table`). Mean ± sample std over seeds (std only with more than one seed); gains are paired "
        "by seed. Claimed gains: the notebook README's; '-' where it claims none.",
        test_note(res["test"]),
        "- Flags passed to every run (after each row's own flags, so they win): "
        + (f"`{shlex.join(res['passthrough'])}`." if res["passthrough"] else "none."),
        f"- Command: `python ablation.py {shlex.join(res['argv'])}`; every run's command and per-seed "
        f"numbers are in {res['study']}.json, its outputs in <config>/seed<k>/ (console output: {LOG_NAME}).",
    ]
    failed = [r for r in res["runs"] if r["status"] == "failed"]
    if failed:
        lines += ["- Failed runs: " + "; ".join(f"{r['config']} seed {r['seed']} ({r['error']})" for r in failed)]
    noted = [r for r in res["runs"] if r.get("note")]
    if noted:
        lines += [
            "- Runs kept as they are: " + "; ".join(f"{r['config']} seed {r['seed']}: {r['note']}" for r in noted)
        ]
    return "\n".join(lines) + "\n"


def plot(path: Path, res: dict):
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no GUI backend

    rows = res["rows"]
    fig = Figure(figsize=(9, 1.2 + 0.42 * len(rows)))
    ax = fig.subplots()
    y = range(len(rows))
    means = [r["mean"] or 0.0 for r in rows]
    colors = ["0.55" if r["reference"] is None else "tab:orange" if r["script"] is None else "tab:blue" for r in rows]
    errors = [r["std"] if r["std"] is not None else math.nan for r in rows]  # NaN: no error bar drawn
    ax.barh(y, means, xerr=errors, color=colors, capsize=3, error_kw={"elinewidth": 1})
    top = max(means + [1.0])
    for i, r in enumerate(rows):
        text = fmt_stat(r["mean"], r["std"]) if r["mean"] is not None else ("failed" if r["failed"] else "pending")
        ax.text((r["mean"] or 0.0) + (r["std"] or 0.0) + top * 0.01, i, text, va="center", fontsize=8)
    ax.set_yticks(list(y), [r["label"] for r in rows])
    ax.invert_yaxis()  # study order, top to bottom
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel("test accuracy (%)")
    b, seeds = res["budget"], res["seeds"]
    spread = f"mean ± std over seeds {' '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    ax.set_title(
        f"{res['study']} ablation: test accuracy, {spread} ({b['epochs']} epoch(s), "
        f"{b['max_train_samples'] or 'all'} train / {b['max_test_samples'] or 'all'} test images)",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    common.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def write_report(study_dir: Path, res: dict, chart: bool):
    common.write_json(study_dir / f"{res['study']}.json", res)
    text = markdown(res)
    common.atomic_write(study_dir / f"{res['study']}.md", lambda f: f.write(text.encode()))
    if chart:  # a second or so per chart: drawn at the end (or on a stop), not after every run
        plot(study_dir / f"{res['study']}.png", res)
