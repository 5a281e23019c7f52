"""The committed studies' tables, pinned: `python ablation.py ... --report-only` over the committed per-seed numbers
(each run folder's summary.json and config.json) writes, byte for byte, the table recorded in tests/fixtures/ablation.
Nothing trains: a report-only command reads finished runs. The runs' files are copied to a temporary tree of the
same layout, so the command, spelled exactly as the docs quote it, writes there and not into results/. And every
command docs/ABLATION.md quotes runs today."""

import contextlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

import ablation
from helpers import ROOT, SCRIPTS
from studies import cli, plan

FINISHED = ("candidates", "leave-one-out-v1", "tuning", "tuning-2")  # studies whose every run is committed
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ablation"
DOC = ROOT / "docs" / "ABLATION.md"
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


def quoted_commands(text: str) -> list:
    """Every command a document quotes: the lines of its bash blocks that start with `python ` (continuation lines
    joined), and its inline code spans that do."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("python ")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    commands += re.findall(r"`(python [^`]+)`", prose)
    return [shlex.split(command)[1:] for command in commands]


def test_every_command_in_the_ablation_report_runs(tmp_path, monkeypatch, capsys):
    """docs/ABLATION.md's commands run today: each --report-only one is pinned above (its table rewritten byte for
    byte), each other ablation.py command plans its runs (a dry run, on a copy of the committed runs), and each
    training-script command parses, a --config replay to the very settings its run recorded."""
    commands = quoted_commands(DOC.read_text())
    pinned = [argv for _, argv in PINNED.values()]
    copy_numbers(PROXY, tmp_path)
    monkeypatch.chdir(tmp_path)
    kinds = []
    for script, *flags in commands:
        if script == "ablation.py" and "--report-only" in flags:
            assert flags in pinned, shlex.join(flags)
            kinds.append("report")
        elif script == "ablation.py" and ("--simulate-null" in flags or "--help" in flags):
            with pytest.raises(SystemExit) if "--help" in flags else contextlib.nullcontext():
                cli.build_parser().parse_args(flags)  # the simulation itself: tests/test_ablation.py
            kinds.append("parse")
        elif script == "ablation.py":
            ablation.main([*flags, "--dry-run"])
            kinds.append("plan")
        else:
            args = SCRIPTS[script.removeprefix("mobilenetv4_").removesuffix(".py")].parse_args(flags)
            if "--config" in flags:
                saved = json.loads((ROOT / flags[flags.index("--config") + 1]).read_text())["args"]
                assert plan.settings_diff(saved, args) == []
                kinds.append("replay")
    capsys.readouterr()
    assert sorted(set(kinds)) == ["parse", "plan", "replay", "report"]
    assert kinds.count("report") == len(PINNED)  # every pinned table is one the document quotes
