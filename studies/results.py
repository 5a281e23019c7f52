"""A study's results: each row's per-seed accuracies, mean, paired gain and verdict, and the record its .json
keeps (every run's command and numbers)."""

from __future__ import annotations

import math

from .catalog import STUDY_NOTES
from .rows import Config, series_of
from .stats import ALPHA, TEST_NAME, family_test


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
