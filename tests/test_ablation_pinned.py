"""The committed studies' tables, pinned: `python ablation.py ... --report-only` over the committed per-seed numbers
(each run folder's summary.json and config.json) writes, byte for byte, the table recorded in tests/fixtures/ablation.
Nothing trains: a report-only command reads finished runs. The runs' files are copied to a temporary tree of the
same layout, so the command, spelled exactly as the docs quote it, writes there and not into results/."""

import shutil
from pathlib import Path

import pytest

import ablation
from helpers import ROOT

FINISHED = ("candidates", "leave-one-out-v1", "tuning", "tuning-2")  # studies whose every run is committed
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ablation"
PROXY = "results/ablation-proxy-5k"
BUDGET = ["--preset", "proxy-5k", "--seeds", "0", "1", "--data-dir", "data", "--output-dir", PROXY, "--report-only"]
# fixture name: (the study's folder, its report-only command's flags)
PINNED = {
    "proxy-5k-cumulative": (PROXY, ["--study", "cumulative", "--configs", "baseline", *BUDGET]),
    "proxy-5k-architecture": (
        PROXY,
        ["--study", "architecture", "--preset", "proxy-5k", "--configs", "conv_s_8x8", "conv_m_w1.0", "mobilenetv2"]
        + ["--seeds", "0", "1", "--data-dir", "data", "--output-dir", PROXY, "--report-only"],
    ),
    **{f"proxy-5k-{study}": (PROXY, ["--study", study, *BUDGET]) for study in FINISHED},
}


def copy_numbers(folder: str, dest: Path):
    """The study folder's JSON files (its tables' .json, every run's summary.json and config.json) under dest."""
    for path in (ROOT / folder).rglob("*.json"):
        target = dest / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_report_only_rewrites_the_pinned_table(name, tmp_path, monkeypatch):
    folder, argv = PINNED[name]
    study = argv[argv.index("--study") + 1]
    copy_numbers(folder, tmp_path)
    monkeypatch.chdir(tmp_path)
    ablation.main(argv)
    written = (tmp_path / folder / f"{study}.md").read_text()
    assert written == (FIXTURES / f"{name}.md").read_text()
    assert written == (ROOT / folder / f"{study}.md").read_text()  # the committed table is today's
    assert (tmp_path / folder / f"{study}.png").stat().st_size > 0
