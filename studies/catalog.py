"""The study catalogue: every study by name, its notes, the named budgets, and which of a study's rows a command
selects."""

from __future__ import annotations

import common

from . import finished
from .rows import NOTES, architecture, cumulative, leave_one_out

DEFAULT_SEEDS = (0, 1, 2)
STUDIES = {
    "cumulative": cumulative(),
    "leave-one-out": leave_one_out(),
    "architecture": architecture(),
    # Finished: their runs are committed (results/ablation-proxy-5k), their tables rewritten by --report-only.
    "candidates": finished.candidates(),
    "leave-one-out-v1": finished.leave_one_out_v1(),
    "tuning": finished.tuning(),
    "tuning-2": finished.tuning_2(),
}
STUDY_NOTES = {**NOTES, **finished.NOTES}
# Named budgets (--preset). proxy-5k / proxy-10k: 20 epochs on the first 5,000 / 10,000 training images (a tenth /
# a fifth of a full run's training), the full test set; docs/ABLATION.md checks their ranking against full runs.
# Proxy budgets evaluate once, after the last epoch (the table reads the final accuracy): at 5,000 training
# images, evaluating all 10,000 test images every epoch would add ~40% to each run on a CPU.
PRESETS = {
    "full": dict(epochs=20, max_train_samples=None, max_test_samples=None, eval_every=None),
    "proxy-10k": dict(epochs=20, max_train_samples=10_000, max_test_samples=None, eval_every=20),
    "proxy-5k": dict(epochs=20, max_train_samples=5_000, max_test_samples=None, eval_every=20),
}


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


def tta_modes_read(study, key) -> frozenset:
    """The TTA modes (of summary["tta_table"]) that the study's rows read from the runs of row `key`."""
    rows = STUDIES[study]
    return frozenset(
        {"none"}
        | {c.tta for c in rows if c.source == key and c.tta}
        | {c.reference_tta for c in rows if c.reference == key and c.reference_tta}
    )
