"""The plan: each (row, seed) run's command line, and whether it starts fresh, resumes from its last.pt or is
already done (read from its summary.json). A folder holding a run with other settings is refused."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import common
import mobilenetv4_baseline
import mobilenetv4_enhanced

from .catalog import STUDIES, tta_modes_read
from .rows import Config

ROOT = Path(__file__).resolve().parents[1]  # where every run starts (cwd of its process)
# The plan parses each run's flags in this process (bad flags stop before any training, and finished runs are
# recognised by their settings); the runs themselves are processes of their own (SCRIPT_PATHS, relative to ROOT).
SCRIPTS = {"baseline": mobilenetv4_baseline, "enhanced": mobilenetv4_enhanced}
SCRIPT_PATHS = {name: Path(f"mobilenetv4_{name}.py") for name in SCRIPTS}
LOG_NAME = "train.log"  # a run's stdout and stderr, in its folder; appended to by every attempt
# Set by the plan for every run; a pass-through copy would break the one-folder-per-run layout.
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


def shared_path(path) -> str:
    """`path` as this process and the runs (started in ROOT) both read it: as given when this process runs in
    ROOT too (the usual case, and how the committed commands spell it), else absolute."""
    path = os.path.expanduser(str(path))
    return path if Path.cwd().resolve() == ROOT else os.path.abspath(path)


def tta_table_flags(expected, modes):
    """--no-tta-table when no mode beyond none and the run's own --tta is read: the full table costs about 13
    more passes over the test set, most of a short run's time on a CPU. (Skipped if the script lacks the flag.)"""
    return ["--no-tta-table"] if hasattr(expected, "tta_table") and modes <= {"none", expected.tta} else []


def run_argv(cfg, args, extra, seed, run_dir, tta_flags=()):
    """The configuration's flags, the budget, the pass-through flags, then what the plan owns (last wins)."""
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
