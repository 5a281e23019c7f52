"""What the documentation and --help say, checked against the code and the committed files: the recipes the docs
quote exist, the README's headline rows are committed results and the shipped weights' own figure, the verify
command parses, ABLATION.md's TTA rows span every committed run's TTA table, the declared Python version is the one
the code needs, and --help files each flag where it acts."""

import ast
import json
import re
import shlex

import pytest

import mobilenetv4_baseline
import mobilenetv4_enhanced
from helpers import ROOT, shipped_weights_state
from mnv4.checkpoint import SHIPPED_WEIGHTS

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {"baseline": mobilenetv4_baseline, "enhanced": mobilenetv4_enhanced}
RECIPE_PLACEHOLDER = "NAME"  # `--recipe NAME`: the README's way of naming the flag itself


def quoted_recipes(text: str) -> list[tuple[int, str]]:
    """(line number, recipe) of every `--recipe X` in a text."""
    return [
        (text.count("\n", 0, match.start()) + 1, match.group(1))
        for match in re.finditer(r"--recipe[ =]([A-Za-z0-9_.-]+)", text)
        if match.group(1) != RECIPE_PLACEHOLDER
    ]


def test_quoted_recipes_finds_what_a_doc_quotes():
    text = "use `--recipe notebook`\nor --recipe=project-v1, and `--recipe NAME` names the flag"
    assert quoted_recipes(text) == [(1, "notebook"), (2, "project-v1")]


def test_docs_quote_only_recipes_the_scripts_accept():
    accepted = set(mobilenetv4_baseline.RECIPES) | set(mobilenetv4_enhanced.RECIPES)
    wrong = [
        f"{doc.relative_to(ROOT)}:{line}: --recipe {name}"
        for doc in DOCS
        for line, name in quoted_recipes(doc.read_text())
        if name not in accepted
    ]
    assert not wrong, f"recipes the CLI rejects (it accepts {sorted(accepted)}):\n" + "\n".join(wrong)


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", [d.name for d in DOCS if d.parent.name == "docs"])
def test_each_docs_contents_list_every_section_with_its_anchor(doc):
    text = (ROOT / "docs" / doc).read_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    contents = re.findall(r"^- \[(.+)\]\(#([^)]+)\)$", text.split("\n## ", 1)[0], re.M)
    assert contents == [(h, github_anchor(h)) for h in headings]


# ---- The README's first screen ---------------------------------------------------------------------------------
def table_cells(doc) -> list[list[str]]:
    """Each line of a markdown file split at its `|` into stripped cells (a line without one is one cell)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in doc.read_text().splitlines()]


def committed_summaries() -> dict:
    """{run folder: summary.json} of every committed run."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((ROOT / "results").glob("*/summary.json"))}


def headline_rows() -> dict:
    """{script: (final %, TTA %)} of the README table's "this project" rows."""
    rows = {}
    for cells in table_cells(ROOT / "README.md"):
        if len(cells) >= 4 and cells[0] in SCRIPTS and cells[1] == "this project":
            rows[cells[0]] = tuple(float(re.match(r"([\d.]+)%", c).group(1)) for c in cells[2:4])
    return rows


def test_readme_headline_rows_are_committed_runs():
    """Each "this project" row's final and TTA figures are one committed run's summary.json (of that script)."""
    rows = headline_rows()
    assert set(rows) == set(SCRIPTS)
    runs = committed_summaries().values()
    for script, figures in rows.items():
        recorded = {(round(s["test_acc"], 2), round(s["test_acc_tta"], 2)) for s in runs if s["script"] == script}
        assert figures in recorded, (script, figures)


def test_readme_enhanced_row_is_the_shipped_weights_figure():
    """The verify command reproduces the enhanced row's final figure: the shipped file records the same one (so the
    file and the row change in the same commit)."""
    shipped = shipped_weights_state()["shipped"]
    assert headline_rows()["enhanced"][0] == round(shipped["test_acc"], 2), shipped


def test_readme_verify_command_parses_and_evaluates_the_shipped_file_without_tta():
    text = (ROOT / "README.md").read_text()
    match = re.search(r"python mobilenetv4_enhanced\.py (--test-only (?:[^\n]*\\\n)*[^\n]*)", text)
    assert match, "the README's verify command"
    argv = shlex.split(match.group(1).replace("\\\n", " "))
    args = mobilenetv4_enhanced.parse_args(argv)
    assert args.test_only and (ROOT / args.resume).resolve() == SHIPPED_WEIGHTS
    assert args.tta == "none" and not args.tta_table  # the headline is the no-TTA figure; one pass over the images
    assert args.device == "cpu"  # fp32, as the run evaluated: a GPU's --amp auto would not reproduce it exactly


def test_the_recorded_verify_run_evaluated_todays_shipped_file():
    """results/verify-shipped-weights (the README's timing of the verify command) is a run of that command on the
    shipped file as it is now: same file, the same accuracy, no TTA; a new shipped file needs a new verify run."""
    summary = json.loads((ROOT / "results" / "verify-shipped-weights" / "summary.json").read_text())
    shipped = shipped_weights_state()["shipped"]
    assert (ROOT / summary["checkpoint"]).resolve() == SHIPPED_WEIGHTS
    assert summary["test_acc"] == shipped["test_acc"] and summary["tta"] == "none" and summary["test_images"] == 10000


def committed_tta_tables() -> dict:
    """{run folder: {view set: test acc}} of every committed full run's final-weights TTA table."""
    tables = {}
    for run, summary in committed_summaries().items():
        table = summary.get("tta_table", {})
        if {"none", "flip", "flip_rot90", "flip_shift"} <= set(table):
            tables[run] = {view: row["test_acc"] for view, row in table.items()}
    return tables


def full_budget_cell(row_name: str) -> str:
    """The "full budget" cell of an ABLATION.md "What each ingredient buys" row."""
    for cells in table_cells(ROOT / "docs" / "ABLATION.md"):
        if cells[0] == row_name:
            return cells[-1]
    raise AssertionError(f"no row {row_name!r}")


@pytest.mark.parametrize(
    "row_name, view, against, enhanced_only",
    [
        ("TTA flip_rot90 instead of flip", "flip_rot90", "flip", True),
        ("TTA flip_shift instead of flip", "flip_shift", "flip", False),
        ("TTA flip instead of none", "flip", "none", False),
    ],
)
def test_ablation_tta_rows_span_every_committed_full_run(row_name, view, against, enhanced_only):
    """The TTA rows' full-budget ranges, run counts and positive counts are those of the committed TTA tables, so a
    new run that widens a range cannot leave the table quoting the old one."""
    tables = {k: t for k, t in committed_tta_tables().items() if not enhanced_only or k.startswith("enhanced")}
    gains = [round(t[view] - t[against], 2) for t in tables.values()]
    cell = full_budget_cell(row_name)
    pattern = r"([+-][\d.]+) to ([+-][\d.]+) on (all )?(\d+) (?:enhanced )?runs(?: \((\d+) positive\))?"
    match = re.fullmatch(pattern, cell)
    assert match, cell
    assert (float(match.group(1)), float(match.group(2))) == (min(gains), max(gains))
    assert int(match.group(4)) == len(tables) >= 10
    positive = sum(g > 0 for g in gains)
    assert int(match.group(5)) == positive if match.group(5) else positive in (0, len(gains))


# ---- Python version ---------------------------------------------------------------------------------------------
def test_declared_python_is_the_one_ruff_checks_and_the_code_parses_with():
    config = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+)
    assert re.search(r'^requires-python = ">=3.10"', config, re.M)
    assert re.search(r'^target-version = "py310"', config, re.M)
    sources = [p for p in ROOT.rglob("*.py") if not {".venv", "data", "runs"} & set(p.relative_to(ROOT).parts)]
    assert len(sources) > 20
    for path in sources:
        ast.parse(path.read_text(), str(path), feature_version=(3, 10))


# ---- --help -----------------------------------------------------------------------------------------------------
def groups(parser) -> dict:
    return {group.title: {a.dest for a in group._group_actions} for group in parser._action_groups}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_files_resume_and_evaluation_apart_from_output(script):
    parser = SCRIPTS[script].build_parser()
    titles = groups(parser)
    assert titles["output"] == {"output_dir", "overwrite"}
    assert {"resume", "test_only", "config"} <= titles["resume, replay and evaluation"]
    assert not parser.description.rstrip().endswith("for every flag."), parser.description


def test_baseline_help_does_not_present_augmentation_as_on():
    """The baseline trains without augmentation: its help says each op's value applies only with --augment."""
    parser = mobilenetv4_baseline.build_parser()
    help_text = " ".join(parser.format_help().split())
    assert "augmentation (off in this recipe: add --augment to apply these ops)" in help_text
    for flag, value in [("--crop-padding", "4"), ("--rotation", "15.0"), ("--color-jitter", "(0.2, 0.2, 0.2, 0.1)")]:
        off = "applies only with --augment, which this recipe leaves off"
        assert re.search(rf"{flag} [A-Z_ ]+ [^-]*; {off} \(default: {re.escape(value)}\)", help_text), flag
    enhanced = " ".join(mobilenetv4_enhanced.build_parser().format_help().split())
    assert "leaves off" not in enhanced  # the enhanced default augments: its values are what it applies


def test_amp_help_says_what_auto_picks():
    text = " ".join(mobilenetv4_enhanced.build_parser().format_help().split())
    assert "bf16 from compute capability 8.0, fp16 below it; fp32 on the CPU and MPS" in text


def test_pyproject_dependencies_are_requirements_txt():
    """pyproject.toml's dependencies repeat requirements.txt (whose torch bounds are the floor CI installs)."""
    required = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    block = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S).group(1)
    assert re.findall(r'"([^"]+)"', block) == [r for r in required if r]
