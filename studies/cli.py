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
same settings in every study (the reference runs are trained once for all).

Studies (--study):
  cumulative     the notebook README's order: baseline, + SE, + stochastic depth, + SiLU, + width 1.2,
                 + MLP head (mobilenetv4_baseline.py, model flags added one by one), + training
                 optimizations (mobilenetv4_enhanced.py --recipe notebook), + TTA (flip, read from the previous
                 row's run: no extra training). Gain = row minus the previous row.
  leave-one-out  v3, the enhanced default until width 1.6 (Conv-S at width 1.2), its settings spelled as flags
                 so the row keeps its meaning when the default moves; then each ingredient switched off alone: SE,
                 stochastic depth, SiLU (ReLU6), width 1.2 (1.0), MLP head (linear), augmentation, flip,
                 translation, label smoothing, gradient clipping, weight decay, one-cycle (constant lr); then
                 TTA none and flip against v3's flip_shift, read from the reference runs' TTA table.
                 Gain = row minus v3 (negative: the ingredient helps).
  architecture   the same reference runs, then one change of architecture each: Conv-S with an 8x8 final map,
                 Conv-M at width 1.0, MobileNetV2 (4x4 and 8x8 final maps).
Finished studies of the enhanced default's earlier versions (v1: the notebook's recipe without decay on norm /
bias; v2: v1 with SGD + one-cycle and flip + crop + translate only), their runs committed in
results/ablation-proxy-5k (--report-only rewrites their tables; a row given to --configs trains again):
  candidates        changes to v1 one at a time, and the two that helped stacked (v2)
  leave-one-out-v1  each ingredient of v1 switched off alone, and its TTA views
  tuning            changes to v2: EMA, label smoothing 0.2, no stochastic depth, no random crop (v3)
  tuning-2          v3's peak lr (0.2, 0.05) and batch 128

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
import sys
import time
from pathlib import Path

import common

from .catalog import DEFAULT_SEEDS, PRESETS, STUDIES, select_configs
from .plan import check_passthrough, check_report_target, plan, shared_path, split_passthrough
from .report import markdown, write_report
from .results import results
from .runner import Stopped, Supervisor, fmt_duration, progress, run_all
from .stats import print_simulation, simulate, study_layout


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
