"""Ablation studies of the MobileNetV4 CIFAR-10 recipes: how much accuracy each ingredient buys.

Runs a named set of configurations, each run in its own process (`python mobilenetv4_<script>.py FLAGS`, started
from the repository root), for a chosen budget and seeds, and writes into --output-dir (default runs/ablation):
  <study>.md          the table: the notebook README's claimed gain beside the measured one (mean ± std over
                      seeds), and whether it is beyond seed noise (the test is named in the notes)
  <study>.png         one bar per configuration: mean test accuracy, error bar = std over seeds
  <study>.json        every per-seed number, the test's details and the exact command of every run
  <config>/seed<k>/   each run's own output, its console output in train.log; a rerun skips finished runs and
                      resumes interrupted ones
Studies given the same --output-dir (and budget) share their common rows' runs: a configuration key names the
same settings in every study (the default's reference runs are trained once for all).

Studies (--study):
  cumulative     the notebook README's order: baseline, + SE, + stochastic depth, + SiLU, + width 1.2,
                 + MLP head (mobilenetv4_baseline.py, model flags added one by one), + training
                 optimizations (mobilenetv4_enhanced.py --recipe notebook), + TTA (flip, read from the previous
                 row's run: no extra training). Gain = row minus the previous row.
  leave-one-out  the enhanced default (mobilenetv4_enhanced.py without flags), its settings spelled as flags so
                 the row keeps its meaning when the default moves; then each ingredient switched off alone: SE,
                 stochastic depth, SiLU (ReLU6), width 1.2 (1.0), MLP head (linear), augmentation, flip,
                 translation, label smoothing, gradient clipping, weight decay, one-cycle (constant lr); then
                 TTA none and flip against the default's flip_shift, read from the reference runs' TTA table.
                 Gain = row minus the default (negative: the ingredient helps).
  architecture   the same reference runs, then one change of architecture each: Conv-S with an 8x8 final map,
                 Conv-M at width 1.0, MobileNetV2 (4x4 and 8x8 final maps).
The finished candidates, tuning and tuning-2 studies ran with an earlier ablation.py (docs/ABLATION.md).

Beyond noise: a row's gain is tested on a rows x seeds additive model (row effect + seed effect + noise), with
one family-wise 5% level over the study's rows (Dunnett's many-to-one test, generalised to any reference),
so that a study with no real effect calls some row in 5% of cases. --simulate-null N measures that on N
simulated studies of the chosen study's shape (no training), beside the per-row rule it replaced.

Examples:
  python ablation.py --study cumulative --epochs 1 --max-train-samples 2000 --seeds 0 --data-dir data
  python ablation.py --study leave-one-out --configs nocrop_no_se nocrop_relu6 --seeds 0 1 2 -- --amp off
  python ablation.py --study architecture --preset proxy-5k --configs mobilenetv2 --seeds 0 --data-dir data \\
      --output-dir results/ablation-proxy-5k --dry-run
  python ablation.py --study leave-one-out --seeds 0 1 --simulate-null 20000
Flags after `--` go to every run, after the configuration's own flags, and argparse lets the later flag win:
`-- --width-mult 0.5` also overrides the width rows (fine for a smoke test, meaningless for the table). Paths
among them are read from the repository root, where the runs start.
Runs whose TTA table no row reads get --no-tta-table (the final evaluation then costs 1-2 test passes, not ~14).
A folder holding a run with other settings (budget, recipe) is refused rather than mixed into the table.
Ctrl-C or SIGTERM goes to the run in progress, which saves last.pt and exits; the ablation then stops (exit 130
or 143), and the same command resumes it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import optimize, stats

import common
import mobilenetv4_baseline
import mobilenetv4_enhanced

# ---- Settings -----------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent  # where every run starts (cwd of its process)
DEFAULT_SEEDS = (0, 1, 2)
# The plan parses each run's flags in this process (bad flags stop before any training, and finished runs are
# recognised by their settings); the runs themselves are processes of their own (SCRIPT_PATHS, relative to ROOT).
SCRIPTS = {"baseline": mobilenetv4_baseline, "enhanced": mobilenetv4_enhanced}
SCRIPT_PATHS = {name: Path(f"mobilenetv4_{name}.py") for name in SCRIPTS}
LOG_NAME = "train.log"  # a run's stdout and stderr, in its folder; appended to by every attempt
# Set by this script for every run; a pass-through copy would break the one-folder-per-run layout.
RESERVED_FLAGS = ("--output-dir", "--resume", "--overwrite", "--test-only", "--seed")
# Saved run settings that may change between invocations without making a finished run stale.
# (--tta and --tta-table only choose what the final evaluation reports: the plan checks the TTA modes it reads.)
# recipe: a name for a set of defaults; the settings themselves are compared one by one.
RUNTIME_KEYS = {
    "recipe",
    "argv",
    "output_dir",
    "resume",
    "overwrite",
    "test_only",
    "data_dir",
    "download",
    "device",
    "amp",
    "channels_last",
    "compile",
    "eval_batch_size",
    "eval_every",
    "skip_nonfinite",
    "deterministic",
    "tta",
    "tta_table",
    "config",
}
STOP_CODES = (130, 143)  # a run's exit on SIGINT / SIGTERM: it saved last.pt, and the whole ablation stops
ALPHA = 0.05  # family-wise: the chance that a study with no real effect calls any of its rows beyond noise
TEST_NAME = "Dunnett-type many-to-one test (single-step max-|t|, family-wise 5%) on a rows x seeds additive model"


@dataclass(frozen=True)
class Config:
    """One table row: a training run of `script` with `flags`, or (script None) a TTA accuracy read from
    the runs of row `source`. The gain is measured against row `reference` (its `reference_tta` accuracy
    when set, else its own headline)."""

    key: str  # folder name and --configs name
    label: str
    claimed: str = "-"  # the notebook README's claimed gain
    script: str | None = None
    flags: tuple = ()
    source: str | None = None
    tta: str | None = None  # None: summary["test_acc"] (final epoch, no TTA)
    reference: str | None = None
    reference_tta: str | None = None


def _cumulative():
    """The notebook README's order; the model flags accumulate on the baseline script."""
    steps = [
        ("se", "+ SE", "+3-4%", ("--se",)),
        ("drop_path", "+ stochastic depth", "+2-3%", ("--drop-path", "0.1")),
        ("silu", "+ SiLU", "+1-2%", ("--act", "silu")),
        ("width", "+ width 1.2", "+2-3%", ("--width-mult", "1.2")),
        ("mlp_head", "+ MLP head", "+1-2%", ("--head", "mlp", "--dropout", "0.3")),
    ]  # the enhanced head
    rows, flags = [Config("baseline", "baseline", script="baseline")], ()
    for key, label, claimed, new in steps:
        flags += new
        rows.append(Config(key, label, claimed, "baseline", flags, reference=rows[-1].key))
    # The same model plus the notebook's training recipe (and its own batch size 64): --recipe notebook, so the
    # row stays the notebook's whatever the project's defaults become. Its --tta flip only sets the script's
    # printed headline (the row reads test_acc, without TTA) and keeps flip in a short TTA table
    # (--no-tta-table) for the + TTA row.
    rows.append(
        Config(
            "train_opts",
            "+ training optimizations",
            "+3-4%",
            "enhanced",
            ("--recipe", "notebook"),
            reference="mlp_head",
        )
    )
    rows.append(Config("tta", "+ TTA (flip)", "+1-2%", source="train_opts", tta="flip", reference="train_opts"))
    return tuple(rows)


# The enhanced default spelled as flags on the notebook's recipe, which never moves: the rows built on it keep
# their meaning (and their runs) when the project's default changes. The notebook decays norm / bias weights;
# the default does not. SGD couples --wd as L2: 5e-4 is the usual CIFAR value (AdamW's 0.05 would be far too strong).
NOTEBOOK_BASE = ("--recipe", "notebook", "--norm-weight-decay", "0")
SGD_ONECYCLE = ("--opt", "sgd", "--sched", "onecycle", "--lr", "0.1", "--wd", "5e-4")
FLIP_TRANSLATE = ("--rotation", "0", "--color-jitter", "0", "0", "0", "0", "--crop-padding", "0")


def _default():
    """The reference of the leave-one-out and architecture studies. Its key names the run folders that already
    hold its runs (keys are folder names), so it stays whatever the label says; a test checks that its flags
    still equal the default and the settings those runs recorded."""
    return Config(
        "v2_no_crop", "project (default)", script="enhanced", flags=NOTEBOOK_BASE + SGD_ONECYCLE + FLIP_TRANSLATE
    )


def _leave_one_out():
    """Each ingredient of the default switched off alone. Keys carry the prefix of the reference's other rows, so
    they never name a folder of an earlier study's rows (other settings, which the plan would refuse)."""
    ref = _default()

    def off(key, label, *flags, base=ref.flags):
        return Config(key, label, script="enhanced", flags=base + flags, reference=ref.key)

    def tta(key, label, views):  # the reference runs' own TTA table, against the default's view set
        return Config(key, label, source=ref.key, tta=views, reference=ref.key, reference_tta="flip_shift")

    return (
        ref,
        off("nocrop_no_se", "no SE", "--no-se"),
        off("nocrop_no_drop_path", "no stochastic depth", "--drop-path", "0"),
        off("nocrop_relu6", "ReLU6 instead of SiLU", "--act", "relu6"),
        off("nocrop_width_1.0", "width 1.0", "--width-mult", "1.0"),
        off("nocrop_linear_head", "linear head", "--head", "linear", "--dropout", "0.2"),  # the baseline's head
        # The scripts reject augmentation ops beside --no-augment (they would do nothing): the row leaves them out.
        off("nocrop_no_augment", "no augmentation", "--no-augment", base=NOTEBOOK_BASE + SGD_ONECYCLE),
        off("nocrop_no_flip", "no horizontal flip (translate only)", "--hflip", "0"),
        off("nocrop_no_translate", "no translation (flip only)", "--translate", "0"),
        off("nocrop_no_label_smoothing", "no label smoothing", "--label-smoothing", "0"),
        off("nocrop_no_clip", "no gradient clipping", "--clip-grad-norm", "0"),
        off("nocrop_no_weight_decay", "no weight decay", "--wd", "0"),
        off("nocrop_constant_lr", "constant lr 0.1 instead of one-cycle", "--sched", "constant"),
        tta("nocrop_no_tta", "no TTA (against flip_shift)", "none"),
        tta("nocrop_tta_flip", "TTA flip (against flip_shift)", "flip"),
    )


def _architecture():
    """Where the compute goes and how much of it, under the enhanced default recipe: the final map (resolution),
    a larger MobileNetV4 at similar MACs (capacity), and the MobileNetV2 peer the notebook trained."""
    default = _default()

    def change(key, label, *flags):
        return Config(key, label, script="enhanced", flags=default.flags + flags, reference=default.key)

    return (
        default,
        change("conv_s_8x8", "Conv-S, 8x8 final map (--output-stride 4)", "--output-stride", "4"),
        change("conv_m_w1.0", "Conv-M, width 1.0 (4x4 map)", "--variant", "conv_medium", "--width-mult", "1.0"),
        change("mobilenetv2", "MobileNetV2 (4x4 map)", "--variant", "mobilenetv2"),
        change("mobilenetv2_8x8", "MobileNetV2, 8x8 final map", "--variant", "mobilenetv2", "--output-stride", "4"),
    )


STUDIES = {"cumulative": _cumulative(), "leave-one-out": _leave_one_out(), "architecture": _architecture()}
# Named budgets (--preset). proxy-5k / proxy-10k: 20 epochs on the first 5,000 / 10,000 training images (a tenth /
# a fifth of a full run's training), the full test set; docs/ABLATION.md checks their ranking against full runs.
# Proxy budgets evaluate once, after the last epoch (the table reads the final accuracy): at 5,000 training
# images, evaluating all 10,000 test images every epoch would add ~40% to each run on a CPU.
PRESETS = {
    "full": dict(epochs=20, max_train_samples=None, max_test_samples=None, eval_every=None),
    "proxy-10k": dict(epochs=20, max_train_samples=10_000, max_test_samples=None, eval_every=20),
    "proxy-5k": dict(epochs=20, max_train_samples=5_000, max_test_samples=None, eval_every=20),
}

STUDY_NOTES = {
    "cumulative": "Gain = this row minus the previous row. Rows up to '+ MLP head' run mobilenetv4_baseline.py "
    "(Adam + StepLR, no augmentation); '+ training optimizations' runs mobilenetv4_enhanced.py with "
    "the notebook's recipe (--recipe notebook: augmentation, label smoothing 0.1, AdamW with decay on "
    "every parameter, cosine, clipping 1.0) on the same model. "
    "Each script keeps its own default batch size (column 'run'), as it is part of its recipe: the "
    "'+ training optimizations' gain includes the change from batch 128 to 64. "
    "'+ TTA' is the flip TTA accuracy of the previous row's run, against that run's plain accuracy.",
    "leave-one-out": "Gain = this row minus project, the enhanced default (negative: the ingredient helps). Every "
    "row runs mobilenetv4_enhanced.py with the default's settings spelled as flags (the notebook's "
    "recipe plus the default's changes, so the rows keep their meaning when the default moves) "
    "and one ingredient switched off. TTA rows read the reference runs' TTA table and compare "
    "with its flip_shift TTA (the default's).",
    "architecture": "Gain = this row minus project, the enhanced default (Conv-S, width 1.2, 4x4 final map; positive: "
    "the architecture does better). Every row runs mobilenetv4_enhanced.py with the default's "
    "settings spelled as flags (the leave-one-out study's reference, whose runs it shares) and one "
    "change of architecture; the recipe (SE, SiLU, MLP head, width 1.2 where not stated, SGD + "
    "one-cycle, flip + translate) stays.",
}


@dataclass
class Job:
    """One (configuration, seed) training run and what became of it."""

    config: Config
    seed: int
    run_dir: Path
    argv: list
    epochs: int
    batch_size: int
    tta_modes: frozenset = frozenset({"none"})  # the TTA modes the study's rows read from this run
    action: str = "fresh"  # fresh | resume | done (finished before this invocation)
    status: str = "pending"  # pending | ok | failed
    summary: dict | None = None
    error: str | None = None
    note: str | None = None  # what the plan wants a person to know about this run
    wall_s: float | None = None
    extra_argv: list = field(default_factory=list)  # --resume or --overwrite, decided by the plan

    def command(self):
        return f"python mobilenetv4_{self.config.script}.py {shlex.join(self.argv + self.extra_argv)}"

    def process_argv(self):
        return [sys.executable, str(SCRIPT_PATHS[self.config.script]), *self.argv, *self.extra_argv]

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_NAME


# ---- Command line -------------------------------------------------------------------------------------


def build_parser():
    p = common.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] [-- FLAGS FOR EVERY RUN]",
    )
    p.add_argument("--study", default="cumulative", choices=tuple(STUDIES))
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="KEY",
        help="only these rows (keys: --list), plus the row each one's gain is measured against "
        "and the run a TTA row reads",
    )
    p.add_argument("--list", action="store_true", help="print the study's rows and their flags, then exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (each run's state: fresh, resume or done, and its command), train nothing",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write <study>.md/.png/.json from the runs finished so far, train nothing (the others show as pending)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="a named budget (epochs, training and test images); --epochs and the sample flags "
        "given beside it win. proxy-10k / proxy-5k: 20 epochs on the first 10,000 / 5,000 "
        "training images, all 10,000 test images, evaluated after the last epoch only",
    )
    p.add_argument("--epochs", type=int, default=None, help="default: the scripts' own (20)")
    p.add_argument("--max-train-samples", type=int, default=None, help="default: all 50000")
    p.add_argument("--max-test-samples", type=int, default=None, help="default: all 10000")
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="the scripts' --eval-every (default: theirs, every epoch); training is the same",
    )
    p.add_argument("--data-dir", default=None, help="default: the scripts' own (./data)")
    p.add_argument("--device", default=None, choices=common.DEVICES, help="default: the scripts' own (auto)")
    p.add_argument("--output-dir", default=None, help="default: runs/ablation (shared by the studies)")
    p.add_argument(
        "--simulate-null",
        type=int,
        default=None,
        metavar="N",
        help="train nothing: simulate N studies of this study's shape (its training rows, len(--seeds) "
        "seeds) with no real effect, and print how often the beyond-noise test, and the per-row "
        "rule it replaced, call a row",
    )
    p.add_argument("--simulation-seed", type=int, default=0, help="random seed of --simulate-null")
    return p


def apply_preset(args):
    """Fill the budget flags the command line left unset from --preset."""
    for key, value in PRESETS.get(args.preset, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def split_passthrough(argv):
    """(own flags, flags after the first `--` for every run)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def check_passthrough(extra):
    for token in extra:
        name = token.split("=", 1)[0]
        if name in RESERVED_FLAGS:
            raise common.UserError(
                f"{name} is set by ablation.py for every run (one folder per run and seed); "
                "drop it from the flags after --"
            )


def select_configs(study, keys):
    """The study's rows, or the chosen ones in study order, each with the row its gain is measured against
    and the run a TTA row reads (so every chosen row gets its gain, at the cost of one more row at most)."""
    rows = STUDIES[study]
    if not keys:
        return rows
    known = {c.key for c in rows}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise common.UserError(
            f"unknown --configs {' '.join(unknown)} for study {study}; choose from {' '.join(c.key for c in rows)}"
        )
    by_key = {c.key: c for c in rows}
    wanted = set(keys) | {k for c in rows if c.key in keys for k in (c.source, c.reference) if k}
    wanted |= {by_key[k].source for k in list(wanted) if by_key[k].source}
    return tuple(c for c in rows if c.key in wanted)


def shared_path(path) -> str:
    """`path` as this process and the runs (started in ROOT) both read it: as given when this process runs in
    ROOT too (the usual case, and how the committed commands spell it), else absolute."""
    path = os.path.expanduser(str(path))
    return path if Path.cwd().resolve() == ROOT else os.path.abspath(path)


# ---- The plan: which runs to start, resume or just read -----------------------------------------------


def tta_modes_read(study, key) -> frozenset:
    """The TTA modes (of summary["tta_table"]) that the study's rows read from the runs of row `key`."""
    rows = STUDIES[study]
    return frozenset(
        {"none"}
        | {c.tta for c in rows if c.source == key and c.tta}
        | {c.reference_tta for c in rows if c.reference == key and c.reference_tta}
    )


def tta_table_flags(expected, modes):
    """--no-tta-table when no mode beyond none and the run's own --tta is read: the full table costs about 13
    more passes over the test set, most of a short run's time on a CPU. (Skipped if the script lacks the flag.)"""
    return ["--no-tta-table"] if hasattr(expected, "tta_table") and modes <= {"none", expected.tta} else []


def run_argv(cfg, args, extra, seed, run_dir, tta_flags=()):
    """The configuration's flags, the budget, the pass-through flags, then what this script owns (last wins)."""
    budget = []
    for flag, value in (
        ("--epochs", args.epochs),
        ("--max-train-samples", args.max_train_samples),
        ("--max-test-samples", args.max_test_samples),
        ("--eval-every", args.eval_every),
        ("--data-dir", args.data_dir),
        ("--device", args.device),
    ):
        if value is not None:
            budget += [flag, str(value)]
    return [*cfg.flags, *tta_flags, *budget, *extra, "--seed", str(seed), "--output-dir", str(run_dir)]


def parse_run(cfg, argv):
    """The run's settings as its script will see them; bad pass-through flags stop here, before any training."""
    try:
        return SCRIPTS[cfg.script].parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None):  # e.g. -- --help: the script printed its help
            raise
        raise common.UserError(
            f"mobilenetv4_{cfg.script}.py rejected the flags of row {cfg.key!r} "
            f"({shlex.join(argv)}): see the message above"
        ) from None


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def as_saved(args: argparse.Namespace) -> dict:
    """A script's parsed flags as its config.json holds them (tuples become lists)."""
    return json.loads(json.dumps(vars(args), default=str))


def settings_diff(saved: dict, expected: argparse.Namespace):
    """Differences between a run folder's saved settings and this invocation's, budget and recipe only."""
    mine = as_saved(expected)
    return [
        f"--{k.replace('_', '-')} {saved[k]} (now {mine[k]})"
        for k in sorted(mine)
        if k in saved and k not in RUNTIME_KEYS and saved[k] != mine[k]
    ]


def classify(job: Job, expected):
    """done (a complete summary.json with these settings), resume (last.pt, no complete summary) or fresh. A
    folder holding a run with other settings is refused: mixing budgets in one table would be silent and wrong.
    A finished run lacking a TTA mode a row reads is evaluated again from its last.pt; without one it is kept as
    it is (training it again would replace a finished run) and those rows show the mode as missing."""
    summary = read_json(job.run_dir / "summary.json")
    saved = (summary or {}).get("config", {}).get("args") or (read_json(job.run_dir / "config.json") or {}).get("args")
    has_last = (job.run_dir / "last.pt").is_file()
    if (summary or has_last) and saved:
        diff = settings_diff(saved, expected)
        if diff:
            raise common.UserError(
                f"{job.run_dir} holds a run with other settings: {', '.join(diff)}; choose "
                "another --output-dir or delete that folder"
            )
    finished = bool(summary) and summary.get("epochs_completed") == expected.epochs and "test_acc" in summary
    missing = sorted(job.tta_modes - set((summary or {}).get("tta_table") or ())) if finished else []
    if finished and (not missing or not has_last):
        job.action, job.status, job.summary = "done", "ok", summary
        if missing:
            job.note = (
                f"its summary lacks TTA {', '.join(missing)} and the folder keeps no last.pt to evaluate "
                f"it: the rows reading it show it missing (delete {job.run_dir} to train it again)"
            )
    elif has_last:
        job.action, job.extra_argv = "resume", ["--resume", str(job.run_dir / "last.pt")]
    else:  # nothing to continue; --overwrite replaces a stray best.pt or partial files
        job.action, job.extra_argv = "fresh", ["--overwrite"]


def plan(configs, args, extra, study_dir: Path):
    jobs = []
    for cfg in configs:
        if cfg.script is None:
            continue
        modes = tta_modes_read(args.study, cfg.key)
        for seed in args.seeds:
            run_dir = study_dir / cfg.key / f"seed{seed}"
            expected = parse_run(cfg, run_argv(cfg, args, extra, seed, run_dir))  # its --tta, after `--` flags
            argv = run_argv(cfg, args, extra, seed, run_dir, tta_table_flags(expected, modes))
            expected = parse_run(cfg, argv)
            job = Job(cfg, seed, run_dir, argv, expected.epochs, expected.batch_size, tta_modes=modes)
            classify(job, expected)
            jobs.append(job)
    return jobs


def check_report_target(study_dir: Path, study: str):
    """A <study>.json here with rows this study does not have was written by an earlier definition of the study
    (a committed table, say): refuse rather than replace it."""
    path = study_dir / f"{study}.json"
    saved = read_json(path)
    if not isinstance(saved, dict):
        return
    foreign = sorted(
        {r.get("key") for r in saved.get("rows") or [] if isinstance(r, dict)}
        - {c.key for c in STUDIES[study]}
        - {None}
    )
    if foreign:
        raise common.UserError(
            f"{path} is the table of another definition of the {study} study (rows "
            f"{', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}): move its .md, .png "
            "and .json elsewhere first, or choose another --output-dir"
        )


# ---- Running: one process per run ----------------------------------------------------------------------


class Stopped(Exception):
    """The ablation stops (a signal, or a run that stopped on one); `code` is its exit status."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class Supervisor:
    """Runs one child process at a time. SIGINT / SIGTERM received meanwhile go to the child, which saves
    last.pt and exits 130 / 143 (a second one makes it quit at once, as in a terminal); the ablation stops after
    it. The child has its own process group, so a terminal's Ctrl-C reaches it once, through here, not twice.
    A signal between runs stops the ablation at once. Use as a context manager (installs the handlers)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.child, self.starting, self.forwarded, self.signum = None, False, False, None
        self._old = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self._old[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        return False

    def _on_signal(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
            if not self.forwarded:
                print(
                    f"\n{signal.Signals(signum).name}: passed to the run, which saves last.pt and stops; the "
                    "ablation stops after it",
                    file=sys.stderr,
                    flush=True,
                )
            self.forwarded = True
        elif not self.starting:  # no run in progress (or it is just ending): stop now
            raise Stopped(128 + signum)

    def run(self, argv, log, cwd) -> int:
        """Run argv to its end, its output into the open file `log`; returns its exit status (128 + N for a
        process ended by signal N)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log follows the run, line by line
        self.starting, self.forwarded = True, False
        try:
            self.child = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=os.name == "posix",
            )
        finally:
            self.starting = False
        try:
            if self.signum is not None and not self.forwarded:  # it arrived while the process was starting
                self.child.send_signal(self.signum)
                self.forwarded = True
            code = self.child.wait()
        finally:
            self.child = None
        return 128 - code if code < 0 else code


def last_error_line(path: Path, offset: int) -> str:
    """The last line of a run's log (from `offset`: this attempt's part) that names an error, else its last line:
    the one-line reason a failed run gets in the table."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "no log"
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    for line in reversed(lines):
        if re.search(r"error|exception|killed", line, re.IGNORECASE):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def execute(job: Job, supervisor: Supervisor) -> int:
    """Run one job as a process of its own; read its result from its summary.json. A failure is recorded and
    the ablation goes on; a run stopped by SIGINT / SIGTERM (it saved last.pt) stays pending and stops it."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    argv = job.process_argv()
    t0 = time.perf_counter()
    with open(job.log_path, "ab") as log:
        offset = log.tell()
        log.write(f"\n==> {time.strftime('%Y-%m-%dT%H:%M:%S%z')} (cwd {ROOT}): {shlex.join(argv)}\n".encode())
        log.flush()
        code = supervisor.run(argv, log, ROOT)
    job.wall_s = time.perf_counter() - t0
    if code == 0:
        summary = read_json(job.run_dir / "summary.json")
        if isinstance(summary, dict) and "test_acc" in summary and summary.get("epochs_completed") == job.epochs:
            job.status, job.summary = "ok", summary
        else:
            job.status, job.error = "failed", "exit 0 without a complete summary.json"
    elif code in STOP_CODES:
        job.error = f"stopped ({signal.Signals(code - 128).name}); resumes from its last.pt"
    else:
        job.status, job.error = "failed", f"exit {code}: {last_error_line(job.log_path, offset)}"
    return code


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def eta_text(jobs, index) -> str:
    """Mean wall time of the runs executed so far (finished-before runs excluded) times the runs still to go."""
    timed = [j.wall_s for j in jobs[:index] if j.action != "done" and j.wall_s is not None]
    to_go = sum(j.action != "done" for j in jobs[index:])
    if not timed:
        return "ETA: after the first run"
    mean = sum(timed) / len(timed)
    return f"ETA {fmt_duration(mean * to_go)} ({to_go} to go, {fmt_duration(mean)} per run)"


def progress(job: Job, index: int, total: int, text: str):
    print(f"[ablation {index + 1}/{total}] {job.config.label} | seed {job.seed} | {text}", flush=True)


def run_all(jobs, write, supervisor: Supervisor):
    """Run the plan in order, reporting after every run so the table is never older than the last run."""
    total = len(jobs)
    for i, job in enumerate(jobs):
        if job.action == "done":
            note = f"; {job.note}" if job.note else ""
            progress(job, i, total, f"finished before: {job.summary['test_acc']:.2f}% (read summary.json){note}")
            continue
        progress(job, i, total, f"{job.action} | {eta_text(jobs, i)}\n  {job.command()}\n  log: {job.log_path}")
        code = execute(job, supervisor)
        result = (
            f"{job.summary['test_acc']:.2f}%"
            if job.status == "ok"
            else f"FAILED ({job.error})"
            if job.status == "failed"
            else job.error
        )
        progress(job, i, total, f"{result} in {fmt_duration(job.wall_s)}")
        write()
        if code in STOP_CODES:
            raise Stopped(code)
        if supervisor.signum is not None:  # the run ended anyway (finished, or failed) after a signal
            raise Stopped(128 + supervisor.signum)


# ---- Results: per-row statistics -------------------------------------------------------------------------


def metric(summary: dict, tta: str | None):
    """The row's accuracy from a run's summary; None if the summary lacks it (a script without that TTA)."""
    try:
        return summary["test_acc"] if tta is None else summary["tta_table"][tta]["test_acc"]
    except (KeyError, TypeError):
        return None


def mean_std(values):
    """Mean and sample std (n - 1); std None for a single value."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def seed_values(jobs_by_key, key, tta):
    """{seed: accuracy} of a row's finished runs (the runs of its source for a TTA row)."""
    values = {j.seed: metric(j.summary, tta) for j in jobs_by_key.get(key, []) if j.status == "ok"}
    return {seed: v for seed, v in values.items() if v is not None}


def series_of(cfg: Config, by_key: dict) -> tuple:
    """(run key, TTA mode) of the numbers a row reads; and of those its gain is measured against."""
    mine = (cfg.source or cfg.key, cfg.tta)
    if cfg.reference is None:
        return mine, None
    ref = by_key[cfg.reference]
    return mine, (ref.source or ref.key, cfg.reference_tta or ref.tta)


def row_result(cfg: Config, by_key: dict, jobs_by_key: dict) -> dict:
    run_key = cfg.source or cfg.key
    jobs = jobs_by_key.get(run_key, [])
    values = seed_values(jobs_by_key, run_key, cfg.tta)
    mean, std = mean_std(list(values.values()))
    row = {
        "key": cfg.key,
        "label": cfg.label,
        "claimed": cfg.claimed,
        "values": values,
        "mean": mean,
        "std": std,
        "failed": {
            j.seed: j.error if j.status == "failed" else f"no {cfg.tta or 'test_acc'} in summary"
            for j in jobs
            if j.status == "failed" or (j.status == "ok" and j.seed not in values)
        },
        "pending": [j.seed for j in jobs if j.status == "pending"],
        "gain": None,
        "gain_std": None,
        "gain_seeds": 0,
        "script": cfg.script,
        "flags": list(cfg.flags),
        "source": cfg.source,
        "tta": cfg.tta,
        "reference": cfg.reference,
        "reference_tta": cfg.reference_tta,
        "batch_sizes": sorted({j.batch_size for j in jobs}),
        "beyond_noise": None,
        "t": None,
        "gain_se": None,
        "threshold": None,
        "p_adjusted": None,
    }
    _, ref_series = series_of(cfg, by_key)
    if ref_series is not None:
        ref_values = seed_values(jobs_by_key, *ref_series)
        # Paired by seed: the same seeds on both sides, so a failed seed does not shift the comparison.
        diffs = [values[s] - ref_values[s] for s in values if s in ref_values]
        row["gain"], row["gain_std"] = mean_std(diffs)
        row["gain_seeds"] = len(diffs)
    return row


# ---- The beyond-noise test -------------------------------------------------------------------------------
# Runs of one seed share their initial weights and batch order, and every row of a study is compared with the
# same reference runs: the gains of a study's rows are correlated, not independent tests. The model is
#   accuracy(row r, seed s) = row effect r + seed effect s + noise (independent, one variance),
# fitted by least squares over the runs a study has (any seeds missing). A row's gain is the difference of two
# row effects; its standard error comes from the fit's residual variance (df = runs - row effects - seed effects
# + 1), and the gains of one family are tested together: |t| beyond the 95% quantile of max |T| over the family,
# T multivariate t with the gains' own correlations (Dunnett's many-to-one test when every row has the same
# reference and all seeds). With no real effect, the chance that any row of the family is called is 5%.


def additive_fit(cells, n_series: int, n_seeds: int, contrasts, values) -> dict:
    """Least squares of values = series effect + seed effect + noise, and the contrasts' t statistics.

    cells: (N, 2) ints, each observation's (series, seed); contrasts: (R, 2) ints, (series, reference series);
    values: (B, N), B data sets of the same layout (one study; or many, for the simulation).
    Returns est, se, t: (B, R) (NaN where a contrast cannot be estimated or there is no residual df); df;
    sigma: (B,); estimable: (R,) bools; corr: the estimable contrasts' correlation matrix."""
    cells, contrasts = np.asarray(cells, dtype=int), np.asarray(contrasts, dtype=int).reshape(-1, 2)
    values = np.atleast_2d(np.asarray(values, dtype=float))
    n = len(cells)
    x = np.zeros((n, n_series + n_seeds - 1))
    x[np.arange(n), cells[:, 0]] = 1.0
    later = cells[:, 1] > 0  # seed 0's effect is folded into the series effects
    x[np.flatnonzero(later), n_series + cells[later, 1] - 1] = 1.0
    gram_inv = np.linalg.pinv(x.T @ x)
    rank = int(np.linalg.matrix_rank(x))
    df = n - rank
    lmat = np.zeros((len(contrasts), x.shape[1]))
    lmat[np.arange(len(contrasts)), contrasts[:, 0]] += 1.0
    lmat[np.arange(len(contrasts)), contrasts[:, 1]] -= 1.0
    # A contrast is estimable when it lies in the row space of x (e.g. not a row whose only seed the reference lacks
    # while no other row links the two seeds).
    cov = lmat @ gram_inv @ lmat.T  # the contrasts' covariance, in units of sigma^2
    estimable = np.all(np.abs(lmat @ gram_inv @ (x.T @ x) - lmat) < 1e-8, axis=1) & (np.diag(cov) > 1e-12)
    beta = values @ x @ gram_inv  # (B, p): pinv(x) applied to each data set
    resid = values - beta @ x.T
    sigma2 = (resid**2).sum(axis=1) / df if df > 0 else np.full(len(values), np.nan)
    var = np.where(estimable, np.diag(cov), np.nan)
    est = np.where(estimable, beta @ lmat.T, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(sigma2[:, None] * var[None, :])
        t = est / se
        sub = cov[np.ix_(estimable, estimable)]
        corr = sub / np.sqrt(np.outer(np.diag(sub), np.diag(sub)))
    return {
        "est": est,
        "se": se,
        "t": t,
        "df": df,
        "sigma": np.sqrt(sigma2),
        "estimable": estimable,
        "corr": corr,
        "runs": n,
    }


def max_abs_t_cdf(c: float, corr, df: int) -> float:
    """P(max_i |T_i| <= c) for T multivariate t with correlation `corr` and df degrees of freedom (scipy's
    randomised quasi-Monte Carlo integration, as scipy.stats.dunnett uses, with a fixed seed: the same answer
    every time)."""
    corr = np.atleast_2d(corr)
    k = len(corr)
    if k == 1:
        return float(2 * stats.t.cdf(c, df) - 1)
    upper = np.full(k, float(c))
    dist = stats.multivariate_t(shape=corr, df=df, allow_singular=True, seed=np.random.default_rng(0))
    return float(dist.cdf(upper, lower_limit=-upper))  # scipy's default: 1,000 points a dimension, error ~1e-4


def max_abs_t_quantile(corr, df: int, alpha: float = ALPHA) -> float:
    """c with P(max |T| > c) = alpha: the family-wise critical value of |t|."""
    k = len(np.atleast_2d(corr))
    low, high = stats.t.ppf(1 - alpha / 2, df), stats.t.ppf(1 - alpha / (2 * k), df)  # one test; Bonferroni
    if k == 1 or high - low < 1e-9:
        return float(low)
    f = lambda c: max_abs_t_cdf(c, corr, df) - (1 - alpha)
    if f(low) >= 0:
        return float(low)
    if f(high) <= 0:
        return float(high)
    return float(optimize.brentq(f, low, high, xtol=1e-4))


def family_test(contrasts: dict, series_values: dict, alpha: float = ALPHA):
    """Test one family of rows. contrasts: {row key: (series, reference series)}; series_values: {series:
    {seed: accuracy}}. Returns (family summary or None, {row key: verdict dict}) where a verdict holds t, se,
    the |gain| threshold, the adjusted p-value and beyond_noise (None where it cannot be judged)."""
    usable = {k: c for k, c in contrasts.items() if series_values.get(c[0]) and series_values.get(c[1])}
    if not usable:
        return None, {}
    series = list(dict.fromkeys(s for c in usable.values() for s in c))
    seeds = sorted({seed for s in series for seed in series_values[s]})
    cells = [(i, seeds.index(seed)) for i, s in enumerate(series) for seed in sorted(series_values[s])]
    values = [series_values[s][seed] for s in series for seed in sorted(series_values[s])]
    pairs = [(series.index(a), series.index(b)) for a, b in usable.values()]
    fit = additive_fit(cells, len(series), len(seeds), pairs, [values])
    family = {
        "rows": int(fit["estimable"].sum()),
        "runs": fit["runs"],
        "series": len(series),
        "seeds": seeds,
        "df": fit["df"],
        "sigma": None,
        "critical_t": None,
        "alpha": alpha,
    }
    verdicts = {
        k: {"beyond_noise": None, "t": None, "gain_se": None, "threshold": None, "p_adjusted": None} for k in usable
    }
    if fit["df"] <= 0 or not fit["estimable"].any():  # one seed each: nothing measures the noise yet
        return family, verdicts
    corr, df = fit["corr"], fit["df"]
    crit = max_abs_t_quantile(corr, df, alpha)
    family.update(sigma=float(fit["sigma"][0]), critical_t=crit)
    for j, key in enumerate(usable):
        if not fit["estimable"][j]:
            continue
        t, se = float(fit["t"][0, j]), float(fit["se"][0, j])
        p = None if math.isnan(t) else min(1.0, max(0.0, 1 - max_abs_t_cdf(abs(t), corr, df)))
        verdicts[key] = {
            "beyond_noise": bool(abs(t) > crit),
            "t": t if math.isfinite(t) else None,  # JSON
            "gain_se": se,
            "threshold": crit * se,
            "p_adjusted": p,
        }
    return family, verdicts


def judge(configs, rows: dict, jobs_by_key: dict) -> dict:
    """Each row's verdict, in two families tested apart: training rows, and TTA rows (views of the same weights:
    their differences vary far less than two trainings do)."""
    by_key = {c.key: c for c in configs}
    test = {"name": TEST_NAME, "alpha": ALPHA}
    for kind in ("training", "tta"):
        members = [c for c in configs if c.reference and (c.script is None) == (kind == "tta")]
        contrasts = {c.key: series_of(c, by_key) for c in members}
        series_values = {s: seed_values(jobs_by_key, *s) for pair in contrasts.values() for s in pair}
        family, verdicts = family_test(contrasts, series_values)
        test[kind] = family
        for key, verdict in verdicts.items():
            rows[key].update(verdict)
    return test


def results(study, configs, jobs, args, extra, study_dir, argv):
    jobs_by_key = {}
    for j in jobs:
        jobs_by_key.setdefault(j.config.key, []).append(j)
    by_key = {c.key: c for c in configs}
    rows = {cfg.key: row_result(cfg, by_key, jobs_by_key) for cfg in configs}
    test = judge(configs, rows, jobs_by_key)
    runs = [
        {
            "config": j.config.key,
            "seed": j.seed,
            "run_dir": str(j.run_dir),
            "script": j.config.script,
            "argv": j.argv + j.extra_argv,
            "command": j.command(),
            "log": str(j.log_path),
            "action": j.action,
            "status": j.status,
            "error": j.error,
            "note": j.note,
            "wall_s": j.wall_s,
            "batch_size": j.batch_size,
            **{
                k: (j.summary or {}).get(k)
                for k in (
                    "test_acc",
                    "tta_table",
                    "best_acc",
                    "epochs_completed",
                    "train_time_s",
                    "params",
                    "macs",
                    "device",
                )
            },
        }
        for j in jobs
    ]
    return {
        "study": study,
        "output_dir": str(study_dir),
        "argv": argv,
        "passthrough": extra,
        "seeds": args.seeds,
        "budget": {
            "epochs": jobs[0].epochs if jobs else args.epochs,
            "max_train_samples": args.max_train_samples,
            "max_test_samples": args.max_test_samples,
            "eval_every": args.eval_every,
        },
        "notes": STUDY_NOTES[study],
        "test": test,
        "rows": list(rows.values()),
        "runs": runs,
    }


# ---- The test's calibration: studies simulated with no real effect -----------------------------------------


def study_layout(configs):
    """(number of series, contrasts as (series, reference) index pairs) of a study's training rows."""
    by_key = {c.key: c for c in configs}
    pairs = [series_of(c, by_key) for c in configs if c.script and c.reference]
    series = list(dict.fromkeys(s for pair in pairs for s in pair))
    return len(series), [(series.index(a), series.index(b)) for a, b in pairs]


def simulate(
    n_series: int, contrasts, n_seeds: int, studies: int, seed: int = 0, effects=None, alpha: float = ALPHA
) -> dict:
    """Draw `studies` complete studies (every series, every seed) of accuracy = effect + seed effect + noise,
    noise and seed effect both standard normal (the tests do not depend on either scale: the seed effect cancels
    in every gain), and count how often each rule calls each contrast beyond noise:
      per-row t (paired)   the rule this test replaced: each row's paired gains' variance, pooled over the rows
                           into one sigma (df = rows x (seeds - 1)), |mean gain| > t(1 - alpha/2, df) sigma /
                           sqrt(seeds), each row on its own
      per-row t (additive) the additive model's residual sigma, each row on its own at alpha
      max-|t| (additive)   the additive model, family-wise: the test the reports use
    `effects`: the series' true effects (default 0: no real effect). Returns rates per rule: per contrast, their
    mean (per-row) and the fraction of studies calling any contrast (any-row)."""
    rng = np.random.default_rng(seed)
    contrasts = np.asarray(contrasts, dtype=int).reshape(-1, 2)
    effects = np.zeros(n_series) if effects is None else np.asarray(effects, dtype=float)
    y = (
        effects[None, :, None]
        + rng.standard_normal((studies, 1, n_seeds))
        + rng.standard_normal((studies, n_series, n_seeds))
    )
    cells = [(i, s) for i in range(n_series) for s in range(n_seeds)]
    fit = additive_fit(cells, n_series, n_seeds, contrasts, y.reshape(studies, -1))
    df, crit = fit["df"], max_abs_t_quantile(fit["corr"], fit["df"], alpha)
    gains = y[:, contrasts[:, 0], :] - y[:, contrasts[:, 1], :]  # (studies, rows, seeds), paired by seed
    old_df = len(contrasts) * (n_seeds - 1)
    old_sigma = np.sqrt(gains.var(axis=2, ddof=1).mean(axis=1))
    old_threshold = stats.t.ppf(1 - alpha / 2, old_df) * old_sigma / math.sqrt(n_seeds)
    calls = {
        "per-row t (paired)": np.abs(gains.mean(axis=2)) > old_threshold[:, None],
        "per-row t (additive)": np.abs(fit["t"]) > stats.t.ppf(1 - alpha / 2, df),
        "max-|t| (additive)": np.abs(fit["t"]) > crit,
    }
    return {
        "studies": studies,
        "seed": seed,
        "rows": len(contrasts),
        "seeds": n_seeds,
        "df": df,
        "critical_t": crit,
        "alpha": alpha,
        "rules": {
            name: {
                "per_contrast": c.mean(axis=0).tolist(),
                "per_row": float(c.mean()),
                "any_row": float(c.any(axis=1).mean()),
            }
            for name, c in calls.items()
        },
    }


def print_simulation(study: str, sim: dict):
    n = sim["studies"]
    print(
        f"{n} simulated {study} studies with no real effect (simulation seed {sim['seed']}): {sim['rows']} "
        f"training rows against their references, {sim['seeds']} seeds, seed effect shared by every row; "
        f"additive model df {sim['df']}, family-wise critical |t| {sim['critical_t']:.3f}"
    )
    print(f"{'rule':<24} {'per-row rate':>14} {'any-row rate':>14}   (nominal {sim['alpha']:.0%})")
    for name, r in sim["rules"].items():
        err = math.sqrt(r["any_row"] * (1 - r["any_row"]) / n)  # binomial standard error of a fraction
        print(f"{name:<24} {r['per_row']:>14.4f} {r['any_row']:>8.4f} ± {err:.4f}")


# ---- Reporting: <study>.md, <study>.png, <study>.json ----------------------------------------------------


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


# ---- Main ------------------------------------------------------------------------------------------------


def print_rows(configs):
    for c in configs:
        what = f"mobilenetv4_{c.script}.py {' '.join(c.flags)}" if c.script else f"TTA '{c.tta}' of the {c.source} run"
        print(f"  {c.key:<26} {c.label:<38} claimed {c.claimed:<6} {what}".rstrip())


@common.command_line
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = split_passthrough(argv)
    args = apply_preset(build_parser().parse_args(own))
    args.seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would be the same run twice
    check_passthrough(extra)
    configs = select_configs(args.study, args.configs)
    if args.list:
        print_rows(configs)
        return None
    if args.simulate_null is not None:
        n_series, contrasts = study_layout(configs)
        if args.simulate_null < 1 or not contrasts or len(args.seeds) < 2:
            raise common.UserError(
                "--simulate-null needs N >= 1, two or more --seeds and a training row with a reference"
            )
        sim = simulate(n_series, contrasts, len(args.seeds), args.simulate_null, args.simulation_seed)
        print_simulation(args.study, sim)
        return sim
    study_dir = Path(shared_path(args.output_dir or "runs/ablation"))
    if args.data_dir is not None:
        args.data_dir = shared_path(args.data_dir)
    jobs = plan(configs, args, extra, study_dir)
    check_report_target(study_dir, args.study)
    if args.dry_run:
        for i, job in enumerate(jobs):
            progress(job, i, len(jobs), f"{job.action}{f' ({job.note})' if job.note else ''}\n  {job.command()}")
        return None
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise common.UserError(f"cannot create {study_dir} ({exc.strerror}): choose a writable --output-dir") from None

    def write(chart=False):
        res = results(args.study, configs, jobs, args, extra, study_dir, argv)
        write_report(study_dir, res, chart)
        return res

    if args.report_only:
        return write(chart=True)
    t0 = time.perf_counter()
    try:
        with Supervisor() as supervisor:
            run_all(jobs, write, supervisor)
    except Stopped as stop:
        write(chart=True)
        print(
            f"\nablation stopped (exit {stop.code}); rerun the same command to resume: finished runs are kept, "
            "an interrupted one continues from its last.pt",
            file=sys.stderr,
        )
        raise SystemExit(stop.code) from None
    res = write(chart=True)
    print("\n" + markdown(res))
    failed = sum(j.status == "failed" for j in jobs)
    print(
        f"ablation {args.study}: {len(jobs)} runs ({failed} failed) in {fmt_duration(time.perf_counter() - t0)}; "
        f"wrote {study_dir}/{args.study}.md, .png and .json"
    )
    return res


if __name__ == "__main__":
    main()
