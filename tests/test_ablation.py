"""Tests for ablation.py and its studies package: the studies' rows, the plan (fresh / resume / skip / refuse),
each run as a process of its own (log, failures, signals), the table and chart, and the beyond-noise test with its
null simulation.

Most tests point studies.plan.SCRIPT_PATHS at a stub script that writes config.json and summary.json with the
accuracy the test chose for its row and seed (a process that starts in tens of milliseconds, and gains known
exactly); one test trains for real, as the real scripts' processes, on the tiny CIFAR fixture with a tiny model.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import ablation
import mobilenetv4_enhanced
from helpers import ROOT, SCRIPTS
from studies import catalog, cli, plan
from studies import results as study_results
from studies import stats as study_stats

PROXY = ROOT / "results" / "ablation-proxy-5k"  # the committed proxy study (read only)
ABLATION_TINY = ["--epochs", "1", "--max-train-samples", "32", "--max-test-samples", "16", "--seeds", "0"]

# What a stub run scores: BASE_ACC + SEED_OFFSET * seed + its row's own amount (+ per-run noise, where a test sets
# it); every TTA mode adds its own amount on top.
BASE_ACC = 40.0
SEED_OFFSET = 0.5  # per seed, the same on every row: paired gains have std 0
TTA_ACC = {"none": 0.0, "flip": 1.5, "flip_rot90": 0.75, "flip_shift": 2.25}
CUMULATIVE_ACC = {"baseline": 0, "se": 3, "drop_path": 5, "silu": 6, "width": 8, "mlp_head": 9, "train_opts": 13}
NOTEBOOK_CLAIMS = {
    "+ SE": "+3-4%",
    "+ stochastic depth": "+2-3%",
    "+ SiLU": "+1-2%",
    "+ width 1.2": "+2-3%",
    "+ MLP head": "+1-2%",
    "+ training optimizations": "+3-4%",
    "+ TTA (flip)": "+1-2%",
}

STUB = r'''"""Stand-in for a training script: writes what ablation.py reads, as $ABLATION_STUB_SPEC says."""
import json, os, signal, sys, time
from pathlib import Path

argv = sys.argv[1:]
spec = json.loads(Path(os.environ["ABLATION_STUB_SPEC"]).read_text())


def flag(name, default=None):  # the last one wins, as with argparse
    hits = [i for i, token in enumerate(argv) if token == name]
    return argv[hits[-1] + 1] if hits else default


out = Path(flag("--output-dir"))
seed, epochs = int(flag("--seed")), int(flag("--epochs", 20))
key, script = out.parent.name, Path(sys.argv[0]).stem.replace("stub_", "")
with open(spec["calls"], "a") as f:
    f.write(json.dumps({"script": script, "key": key, "seed": seed, "argv": argv, "cwd": os.getcwd()}) + "\n")
out.mkdir(parents=True, exist_ok=True)
print(f"stub {script} {key} seed {seed}", flush=True)
budget = {k: int(flag(f"--{k.replace('_', '-')}")) if flag(f"--{k.replace('_', '-')}") else None
          for k in ("max_train_samples", "max_test_samples")}
config = {"script": script, "args": {"epochs": epochs, "seed": seed, **budget}}
(out / "config.json").write_text(json.dumps(config))
action = spec["actions"].get(f"{key}/{seed}", spec["actions"].get(key))


def stop(signum, frame):  # as a real run does: save last.pt, exit 128 + the signal
    (out / "last.pt").write_bytes(b"stub")
    with open(out / "signals", "a") as f:
        f.write(f"{signum}\n")
    sys.exit(128 + signum)


if action == "wait":  # until a signal comes
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    Path(spec["ready"]).write_text("ready")
    for _ in range(600):
        time.sleep(0.05)
    sys.exit(1)  # never signalled: the test fails rather than hangs
if action in (130, 143):
    (out / "last.pt").write_bytes(b"stub")
    sys.exit(action)
if action is not None:
    print("Traceback (most recent call last):\n  ...\nRuntimeError: stub failure", file=sys.stderr)
    print("a last line that names no failure", file=sys.stderr)
    sys.exit(action)
acc = (spec["base"] + spec["seed_offset"] * seed + spec["acc"].get(key, spec["acc_default"])
       + spec["noise"].get(f"{key}/{seed}", 0.0))
summary = {"script": script, "test_acc": acc, "epochs_completed": epochs, "config": config,
           "tta_table": {mode: {"test_acc": acc + d} for mode, d in spec["tta"].items()}}
(out / "summary.json").write_text(json.dumps(summary))
'''


class Stub:
    """The stub's spec (a JSON file its processes read) and the calls they logged."""

    def __init__(self, folder: Path):
        folder.mkdir()
        self.path, self.calls_path = folder / "spec.json", folder / "calls.jsonl"
        self.spec = {
            "calls": str(self.calls_path),
            "base": BASE_ACC,
            "seed_offset": SEED_OFFSET,
            "acc": dict(CUMULATIVE_ACC),
            "acc_default": 0.0,
            "noise": {},
            "tta": TTA_ACC,
            "actions": {},
            "ready": str(folder / "ready"),
        }
        self.save()

    def set(self, **changes):
        self.spec.update(changes)
        self.save()

    def save(self):
        self.path.write_text(json.dumps(self.spec))

    def calls(self) -> list:
        if not self.calls_path.exists():
            return []
        return [json.loads(line) for line in self.calls_path.read_text().splitlines()]


@pytest.fixture(scope="session")
def stub_scripts(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("stub-scripts")
    paths = {name: folder / f"stub_{name}.py" for name in SCRIPTS}
    for path in paths.values():
        path.write_text(STUB)
    return paths


@pytest.fixture
def stub(tmp_path, monkeypatch, stub_scripts) -> Stub:
    """Every run of ablation.main() in the test starts the stub script instead of a training script."""
    spec = Stub(tmp_path / "stub")
    monkeypatch.setattr(plan, "SCRIPT_PATHS", dict(stub_scripts))
    monkeypatch.setenv("ABLATION_STUB_SPEC", str(spec.path))
    return spec


def table_rows(md_path: Path) -> dict:
    """{configuration: {column: cell}} from the markdown table."""
    lines = [line for line in md_path.read_text().splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {r[0]: dict(zip(head, r)) for r in rows}


def run_ablation(*argv):
    return ablation.main(list(argv))


def settings(script, flags):
    """A row's settings as config.json holds them, run-time keys left out."""
    args = plan.as_saved(SCRIPTS[script].parse_args(list(flags)))
    return {k: v for k, v in args.items() if k not in plan.RUNTIME_KEYS}


# ---------------------------------------------------------------------------------------------------
# The studies' rows
# ---------------------------------------------------------------------------------------------------
def test_leave_one_out_switches_off_one_ingredient_of_the_default_each():
    """The reference is v3, the enhanced default until width 1.6 (the script with only `--width-mult 1.2`), spelled
    as flags on a recipe that never moves; every other row changes the settings its label names, nothing more."""
    ref, *others = catalog.STUDIES["leave-one-out"]
    assert settings("enhanced", ref.flags) == settings("enhanced", ["--width-mult", "1.2"])
    assert "project" not in " ".join(ref.flags)  # not a recipe name that moves with the default
    expected = {
        "nocrop_no_se": {"se"},
        "nocrop_no_drop_path": {"drop_path"},
        "nocrop_relu6": {"act"},
        "nocrop_width_1.0": {"width_mult"},
        "nocrop_linear_head": {"head", "dropout"},
        # Its op settings stay the notebook's, which do nothing without --augment.
        "nocrop_no_augment": {"augment", "crop_padding", "rotation", "color_jitter"},
        "nocrop_no_flip": {"hflip"},
        "nocrop_no_translate": {"translate"},
        "nocrop_no_label_smoothing": {"label_smoothing"},
        "nocrop_no_clip": {"clip_grad_norm"},
        "nocrop_no_weight_decay": {"wd"},
        "nocrop_constant_lr": {"sched"},
    }
    training = {c.key: c for c in others if c.script}
    assert set(training) == set(expected)
    ref_settings = settings("enhanced", ref.flags)
    for key, changed in expected.items():
        row = settings("enhanced", training[key].flags)
        assert training[key].reference == ref.key
        assert {k for k, v in row.items() if v != ref_settings[k]} == changed, key
    assert settings("enhanced", training["nocrop_no_augment"].flags)["augment"] is False
    # TTA rows read the reference runs' table, against the default's own TTA.
    tta = {c.key: c for c in others if c.script is None}
    assert {k: (c.source, c.tta, c.reference, c.reference_tta) for k, c in tta.items()} == {
        "nocrop_no_tta": (ref.key, "none", ref.key, "flip_shift"),
        "nocrop_tta_flip": (ref.key, "flip", ref.key, "flip_shift"),
    }
    assert mobilenetv4_enhanced.parse_args([]).tta == "flip_shift"


def test_the_architecture_screen_keeps_its_rows_and_shares_the_reference():
    """Runs of the architecture screen are in progress: its keys and reference stay, every row is the reference
    plus one change of architecture."""
    ref = catalog.STUDIES["leave-one-out"][0]
    rows = catalog.STUDIES["architecture"]
    assert ref.key == "v2_no_crop" and rows[0] == ref
    assert [c.key for c in rows] == ["v2_no_crop", "conv_s_8x8", "conv_m_w1.0", "mobilenetv2", "mobilenetv2_8x8"]
    changes = {c.key: c.flags[len(ref.flags) :] for c in rows[1:]}
    assert changes == {
        "conv_s_8x8": ("--output-stride", "4"),
        "conv_m_w1.0": ("--variant", "conv_medium", "--width-mult", "1.0"),
        "mobilenetv2": ("--variant", "mobilenetv2"),
        "mobilenetv2_8x8": ("--variant", "mobilenetv2", "--output-stride", "4"),
    }
    assert all(c.flags[: len(ref.flags)] == ref.flags and c.reference == ref.key for c in rows[1:])


@pytest.mark.parametrize("study", list(catalog.STUDIES))
def test_committed_runs_match_the_rows_that_name_their_folders(study):
    """A key is a folder name under results/ablation-proxy-5k: where one holds a run, the row's flags must still
    parse to the settings that run recorded, so the plan reuses it (and a new row never takes the folder of an
    earlier study's row with other settings, which the plan would refuse)."""
    checked = 0
    for cfg in catalog.STUDIES[study]:
        if cfg.script is None:
            continue
        for path in sorted((PROXY / cfg.key).glob("seed*/config.json")):
            saved = json.loads(path.read_text())["args"]
            budget = ["--epochs", str(saved["epochs"]), "--seed", str(saved["seed"])]
            if saved["max_train_samples"]:
                budget += ["--max-train-samples", str(saved["max_train_samples"])]
            expected = SCRIPTS[cfg.script].parse_args([*cfg.flags, *budget])
            assert plan.settings_diff(saved, expected) == [], path
            checked += 1
    if PROXY.is_dir():
        assert checked, f"no committed run of the {study} study found"


def test_cumulative_training_row_is_the_notebooks_recipe():
    """'+ training optimizations' reproduces the notebook README's row: the notebook's enhanced recipe, whatever
    the project's defaults become (a default changed by the study must not move this row)."""
    row = {c.key: c for c in catalog.STUDIES["cumulative"]}["train_opts"]
    args = vars(mobilenetv4_enhanced.parse_args(list(row.flags)))
    notebook = mobilenetv4_enhanced.RECIPES["notebook"]
    assert {k: args[k] for k in notebook} == notebook
    assert args["recipe"] == "notebook"


@pytest.mark.parametrize("study", list(catalog.STUDIES))
def test_every_row_is_a_valid_command_line(study):
    """Each training row's flags parse with its script and really change a setting of the row it is compared
    with (a row that changes nothing would measure noise)."""
    rows = {c.key: c for c in catalog.STUDIES[study]}
    for cfg in rows.values():
        if cfg.script is None:
            continue
        args = settings(cfg.script, cfg.flags)
        ref = rows.get(cfg.reference)
        if ref is None or ref.script != cfg.script:  # a study's root, or another script (its own recipe)
            continue
        assert args != settings(ref.script, ref.flags), cfg.key


def test_a_key_names_one_configuration_in_every_study():
    """Studies sharing an --output-dir share the runs of equal keys: a key must mean the same run everywhere."""
    seen = {}
    for study, rows in catalog.STUDIES.items():
        for c in rows:
            what = (c.script, c.flags, c.source, c.tta)
            assert seen.setdefault(c.key, (study, what))[1] == what, (c.key, study, seen[c.key][0])


# ---------------------------------------------------------------------------------------------------
# The beyond-noise test
# ---------------------------------------------------------------------------------------------------
def test_additive_fit_of_a_complete_layout_is_the_two_way_anova():
    """All rows and seeds: each gain is the difference of the two rows' means, sigma^2 the two-way ANOVA's
    residual mean square on (rows - 1)(seeds - 1) df, each gain's standard error sigma sqrt(2 / seeds), and two
    gains against one reference correlate 0.5."""
    rng = np.random.default_rng(1)
    rows, seeds = 5, 3
    y = 3 * rng.standard_normal((rows, seeds)) + np.arange(rows)[:, None] + 10 * rng.standard_normal(seeds)
    cells = [(i, s) for i in range(rows) for s in range(seeds)]
    fit = study_stats.additive_fit(cells, rows, seeds, [(i, 0) for i in range(1, rows)], y.reshape(1, -1))
    resid = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    df = (rows - 1) * (seeds - 1)
    assert fit["df"] == df and fit["estimable"].all()
    assert fit["sigma"][0] == pytest.approx(np.sqrt((resid**2).sum() / df))
    assert fit["est"][0] == pytest.approx(y[1:].mean(axis=1) - y[0].mean())
    assert fit["se"][0] == pytest.approx(np.full(rows - 1, fit["sigma"][0] * np.sqrt(2 / seeds)))
    assert fit["corr"] == pytest.approx(np.full((rows - 1, rows - 1), 0.5) + 0.5 * np.eye(rows - 1))


def test_family_wise_p_values_are_scipys_dunnett():
    """The max-|t| distribution is Dunnett's: for one-way groups, fed scipy.stats.dunnett's own statistics and df,
    the adjusted p-values agree with it (both integrate the same multivariate t numerically)."""
    rng = np.random.default_rng(2)
    n, k = 4, 5
    control = rng.normal(0, 1, n)
    samples = [rng.normal(shift, 1, n) for shift in (0.0, 0.5, 1.5, 2.5, 0.2)]
    res = stats.dunnett(*samples, control=control)  # its own random integration points: agreement within 2e-3
    corr = np.full((k, k), 0.5) + 0.5 * np.eye(k)
    df = (k + 1) * (n - 1)
    ours = [1 - study_stats.max_abs_t_cdf(abs(t), corr, df) for t in res.statistic]
    assert ours == pytest.approx(res.pvalue, abs=2e-3)
    crit = study_stats.max_abs_t_quantile(corr, df)
    assert 1 - study_stats.max_abs_t_cdf(crit, corr, df) == pytest.approx(0.05, abs=1e-3)
    assert stats.t.ppf(0.975, df) < crit < stats.t.ppf(1 - 0.025 / k, df)  # above one test's, below Bonferroni's


def test_family_test_with_missing_runs_and_single_seeds():
    """A row missing a seed is still judged (the seed effects come from the other rows); a row whose only seed
    nothing else shares cannot be, and adds no df; with one seed everywhere there is no noise estimate yet."""
    contrasts = {"a": ("A", "R"), "b": ("B", "R"), "c": ("C", "R"), "lone": ("L", "R")}
    values = {"R": {0: 60.0, 1: 58.0}, "A": {0: 65.0, 1: 63.2}, "B": {0: 60.5, 1: 57.9}, "C": {0: 61.0}, "L": {2: 70.0}}
    family, verdicts = study_stats.family_test(contrasts, values)
    table = np.array([[60.0, 58.0], [65.0, 63.2], [60.5, 57.9]])  # R, A, B: the complete part
    resid = table - table.mean(axis=1, keepdims=True) - table.mean(axis=0, keepdims=True) + table.mean()
    assert family["df"] == 2 and family["rows"] == 3  # (3 - 1)(2 - 1); C and L add none
    assert family["critical_t"] > stats.t.ppf(0.975, 2)  # three rows tested together: above one test's
    assert family["sigma"] == pytest.approx(np.sqrt((resid**2).sum() / 2))
    assert verdicts["lone"]["beyond_noise"] is None
    assert verdicts["a"]["beyond_noise"] is True and verdicts["b"]["beyond_noise"] is False
    assert verdicts["a"]["t"] == pytest.approx(5.1 / (family["sigma"] * np.sqrt(2 / 2)))
    # C has seed 0 only: its standard error is larger than a row's with both seeds.
    assert verdicts["c"]["gain_se"] > verdicts["b"]["gain_se"]
    assert verdicts["a"]["threshold"] == pytest.approx(family["critical_t"] * verdicts["a"]["gain_se"])
    assert 0 <= verdicts["a"]["p_adjusted"] < 0.05 < verdicts["b"]["p_adjusted"] <= 1
    family, verdicts = study_stats.family_test(contrasts, {k: {0: v[0]} for k, v in values.items() if 0 in v})
    assert family["df"] == 0 and family["critical_t"] is None
    assert all(v["beyond_noise"] is None for v in verdicts.values())


@pytest.mark.parametrize("study,seeds", [("leave-one-out", 2), ("leave-one-out", 3), ("cumulative", 2)])
def test_the_test_calls_some_row_of_a_null_study_in_five_percent_of_studies(study, seeds):
    """2,000 simulated studies of the study's shape with no real effect (a seed effect shared by every row):
    the new test calls any row in 5% of them (within 2 points: about 4 binomial standard errors), where the
    per-row rule it replaced called a row far more often, and each row more than its nominal 5% (the rows
    share their reference's runs)."""
    n_series, contrasts = study_stats.study_layout(catalog.STUDIES[study])
    sim = study_stats.simulate(n_series, contrasts, seeds, studies=2000, seed=0)
    assert sim["rows"] == len(contrasts) and sim["df"] == (n_series - 1) * (seeds - 1)
    new, old = sim["rules"]["max-|t| (additive)"], sim["rules"]["per-row t (paired)"]
    assert abs(new["any_row"] - 0.05) < 0.02
    assert abs(sim["rules"]["per-row t (additive)"]["per_row"] - 0.05) < 0.01  # one row alone: 5%
    if study == "leave-one-out":  # many rows on one reference: what the old rule got wrong
        assert old["any_row"] > 0.25 and old["per_row"] > 0.06


def test_the_test_still_detects_a_large_effect():
    """A row 6 noise standard deviations better than the reference is called in most simulated studies with two
    seeds, and the other rows, with no effect, stay within the family-wise rate."""
    n_series, contrasts = study_stats.study_layout(catalog.STUDIES["leave-one-out"])
    effects = np.zeros(n_series)
    effects[contrasts[0][0]] = 6.0
    sim = study_stats.simulate(n_series, contrasts, 2, studies=500, seed=1, effects=effects)
    per_row = sim["rules"]["max-|t| (additive)"]["per_contrast"]
    assert per_row[0] > 0.85
    assert np.mean(per_row[1:]) < 0.02


def test_simulate_null_prints_the_rates_and_trains_nothing(stub, capsys):
    sim = run_ablation("--study", "architecture", "--seeds", "0", "1", "--simulate-null", "300")
    out = capsys.readouterr().out
    assert sim["rows"] == 4 and sim["studies"] == 300 and stub.calls() == []
    assert "300 simulated architecture studies" in out and "max-|t| (additive)" in out
    with pytest.raises(SystemExit) as exc:
        run_ablation("--study", "architecture", "--seeds", "0", "--simulate-null", "300")
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------------
# The table and the chart
# ---------------------------------------------------------------------------------------------------
def test_cumulative_table_claims_and_gains(tmp_path, stub):
    out = tmp_path / "cum"
    res = run_ablation("--study", "cumulative", "--seeds", "0", "1", "--epochs", "1", "--output-dir", str(out))
    assert (out / "cumulative.md").is_file() and (out / "cumulative.png").stat().st_size > 1000
    rows = table_rows(out / "cumulative.md")
    assert list(rows) == [c.label for c in catalog.STUDIES["cumulative"]]
    assert {"claimed gain", "measured gain (% points)", "test acc (%)"} <= set(rows["baseline"])
    for label, claim in NOTEBOOK_CLAIMS.items():
        assert rows[label]["claimed gain"] == claim
    expected_gain = {
        "+ SE": 3,
        "+ stochastic depth": 2,
        "+ SiLU": 1,
        "+ width 1.2": 2,
        "+ MLP head": 1,
        "+ training optimizations": 4,
        "+ TTA (flip)": TTA_ACC["flip"],
    }
    for label, gain in expected_gain.items():
        assert rows[label]["measured gain (% points)"] == f"{gain:+.2f} ± 0.00", label
    assert rows["baseline"]["test acc (%)"] == f"{BASE_ACC + SEED_OFFSET / 2:.2f} ± 0.35"  # seeds 0, 1
    # The baseline script keeps batch 128, the enhanced one 64 (their recipes), and the table says so.
    assert "batch 128" in rows["+ SE"]["run"] and "batch 64" in rows["+ training optimizations"]["run"]
    # Six baseline runs with cumulative model flags, one enhanced run, no run for the TTA row; x 2 seeds; each a
    # process of its own, started in the repository root.
    calls = stub.calls()
    assert [c["script"] for c in calls].count("baseline") == 12 and [c["script"] for c in calls].count("enhanced") == 2
    assert {c["cwd"] for c in calls} == {str(plan.ROOT)}
    mlp_head_argv = next(c["argv"] for c in calls if c["key"] == "mlp_head")
    assert mlp_head_argv[:9] == ["--se", "--drop-path", "0.1", "--act", "silu", "--width-mult", "1.2", "--head", "mlp"]
    # No run needs the full TTA table here: + TTA reads flip, the enhanced script's own --tta under --recipe notebook.
    assert all("--no-tta-table" in c["argv"] and "--tta" not in c["argv"] for c in calls)
    saved = json.loads((out / "cumulative.json").read_text())
    assert len(saved["runs"]) == 14 and all(r["argv"] and r["test_acc"] is not None for r in saved["runs"])
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    # Each run's console output is in its folder, after a line naming the command.
    log = (out / "se" / "seed1" / "train.log").read_text()
    assert "==> " in log and "stub_baseline.py --se" in log and "stub baseline se seed 1" in log
    assert saved["runs"][2]["log"].endswith("train.log")


def test_the_table_names_the_test_and_judges_each_family(tmp_path, stub):
    """Three seeds of the reference and two leave-one-out rows: no augmentation loses 10 points, no SE nothing but
    noise. The training rows' sigma, df and critical |t| are the additive model's (two-way ANOVA residual of the
    complete 3 x 3 table); the TTA row is judged in its own family."""
    noise = {
        "nocrop_no_se/0": 0.3,
        "nocrop_no_se/1": -0.2,
        "nocrop_no_se/2": -0.4,
        "v2_no_crop/1": 0.1,
        "nocrop_no_augment/2": 0.2,
    }
    stub.set(acc={"nocrop_no_augment": -10.0}, noise=noise)
    out = tmp_path / "loo"
    res = run_ablation(
        "--study",
        "leave-one-out",
        "--configs",
        "nocrop_no_se",
        "nocrop_no_augment",
        "nocrop_no_tta",
        "--seeds",
        "0",
        "1",
        "2",
        "--epochs",
        "1",
        "--output-dir",
        str(out),
    )
    acc = {
        key: [SEED_OFFSET * s + {"nocrop_no_augment": -10.0}.get(key, 0) + noise.get(f"{key}/{s}", 0) for s in range(3)]
        for key in ("nocrop_no_se", "v2_no_crop", "nocrop_no_augment")
    }
    table = np.array(list(acc.values()))
    resid = table - table.mean(axis=1, keepdims=True) - table.mean(axis=0, keepdims=True) + table.mean()
    train = res["test"]["training"]
    assert (train["df"], train["rows"], train["runs"]) == (4, 2, 9)
    assert train["sigma"] == pytest.approx(np.sqrt((resid**2).sum() / 4))
    assert stats.t.ppf(0.975, 4) < train["critical_t"] < stats.t.ppf(1 - 0.025 / 2, 4)
    rows = table_rows(out / "leave-one-out.md")
    verdict = {label: r["beyond noise"] for label, r in rows.items()}
    assert verdict == {
        "v3 (default until width 1.6)": "-",
        "no SE": "no",
        "no augmentation": "yes",
        "no TTA (against flip_shift)": "yes",
    }
    assert rows["no TTA (against flip_shift)"]["measured gain (% points)"] == f"{-TTA_ACC['flip_shift']:+.2f} ± 0.00"
    notes = (out / "leave-one-out.md").read_text().split("Notes:")[1]
    assert study_stats.TEST_NAME in notes and f"sigma = {train['sigma']:.2f} points (9 runs, 4 residual df)" in notes
    assert res["test"]["tta"]["rows"] == 1
    no_se = next(r for r in res["rows"] if r["key"] == "nocrop_no_se")
    assert no_se["threshold"] == pytest.approx(train["critical_t"] * no_se["gain_se"])
    # The reference keeps the full TTA table (its TTA rows read it); the other runs do not.
    calls = stub.calls()
    assert {c["key"] for c in calls if "--no-tta-table" not in c["argv"]} == {"v2_no_crop"}
    # One seed: nothing measures the noise, no verdict.
    one = run_ablation(
        "--study",
        "leave-one-out",
        "--configs",
        "nocrop_no_se",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path / "one"),
    )
    assert one["test"]["training"]["critical_t"] is None
    assert table_rows(tmp_path / "one" / "leave-one-out.md")["no SE"]["beyond noise"] == "-"


def test_report_only_tabulates_finished_runs_and_trains_nothing(tmp_path, stub):
    """--report-only rewrites a study's files from the runs finished so far (say, while another invocation
    trains a subset of its rows), so a subset run never leaves a partial table as the study's last word."""
    run_ablation("--study", "architecture", "--configs", "mobilenetv2", "--seeds", "0", "--output-dir", str(tmp_path))
    n = len(stub.calls())
    res = run_ablation("--study", "architecture", "--seeds", "0", "1", "--report-only", "--output-dir", str(tmp_path))
    assert len(stub.calls()) == n == 2
    rows = table_rows(tmp_path / "architecture.md")
    assert list(rows) == [c.label for c in catalog.STUDIES["architecture"]]
    assert rows["MobileNetV2 (4x4 map)"]["seeds"] == "1/2"
    assert rows["MobileNetV2 (4x4 map)"]["measured gain (% points)"] == "+0.00"
    assert rows["Conv-M, width 1.0 (4x4 map)"]["test acc (%)"] == "pending"
    assert sum(r["status"] == "pending" for r in res["runs"]) == len(res["runs"]) - 2
    assert (tmp_path / "architecture.png").is_file()


# ---------------------------------------------------------------------------------------------------
# The plan: finished runs are read, interrupted ones continue from last.pt
# ---------------------------------------------------------------------------------------------------
def test_second_invocation_runs_nothing(tmp_path, stub):
    argv = ["--study", "cumulative", "--seeds", "0", "--epochs", "1", "--output-dir", str(tmp_path)]
    first = run_ablation(*argv)
    n = len(stub.calls())
    second = run_ablation(*argv)
    assert n == 7 and len(stub.calls()) == n
    assert [r["mean"] for r in second["rows"]] == [r["mean"] for r in first["rows"]]
    assert all(r["action"] == "done" for r in second["runs"])


def test_a_finished_run_lacking_a_tta_mode(tmp_path, stub, capsys):
    """A TTA row needs a mode its run's summary lacks: with a last.pt the run is evaluated again (--resume at its
    last epoch); without one it is kept as it is (training it again would replace a finished run), and the rows
    that need the mode say so."""
    argv = [
        "--study",
        "leave-one-out",
        "--configs",
        "nocrop_no_tta",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    run_ablation(*argv)
    path = tmp_path / "v2_no_crop" / "seed0" / "summary.json"
    summary = json.loads(path.read_text())
    del summary["tta_table"]["flip_shift"]  # e.g. a run made with --no-tta-table
    path.write_text(json.dumps(summary))
    res = run_ablation(*argv)  # no last.pt: kept
    assert len(stub.calls()) == 1 and res["runs"][0]["action"] == "done" and "flip_shift" in res["runs"][0]["note"]
    assert table_rows(tmp_path / "leave-one-out.md")["no TTA (against flip_shift)"]["measured gain (% points)"] == "n/a"
    assert "Runs kept as they are: v2_no_crop seed 0" in (tmp_path / "leave-one-out.md").read_text()
    (tmp_path / "v2_no_crop" / "seed0" / "last.pt").write_bytes(b"stub")
    res = run_ablation(*argv)
    assert res["runs"][0]["action"] == "resume" and stub.calls()[-1]["argv"][-2] == "--resume"


def test_interruption_stops_the_ablation_and_the_next_invocation_resumes(tmp_path, stub, capsys):
    argv = [
        "--study",
        "cumulative",
        "--configs",
        "se",
        "drop_path",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    stub.set(actions={"se": 130})  # the run was stopped by SIGINT and saved last.pt
    with pytest.raises(SystemExit) as exc:
        run_ablation(*argv)
    assert exc.value.code == 130
    assert [c["key"] for c in stub.calls()] == ["baseline", "se"]  # + stochastic depth never started
    assert "rerun the same command" in capsys.readouterr().err
    assert table_rows(tmp_path / "cumulative.md")["+ stochastic depth"]["test acc (%)"] == "pending"

    stub.set(actions={})
    run_ablation(*argv)
    se_dir = tmp_path / "se" / "seed0"
    se, drop_path = stub.calls()[2:]
    assert se["argv"][-2:] == ["--resume", str(se_dir / "last.pt")] and "--overwrite" not in se["argv"]
    assert drop_path["argv"][-1] == "--overwrite"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_goes_to_the_run_which_saves_last_pt_and_the_ablation_stops(tmp_path, stub, capsys, signum):
    """Ctrl-C or SIGTERM while a run trains: the run receives it once (it saves last.pt and exits 128 + N), the
    ablation writes its table, stops with the same code, and the next invocation resumes that run."""
    ready = Path(stub.spec["ready"])
    stub.set(actions={"se": "wait"})
    argv = [
        "--study",
        "cumulative",
        "--configs",
        "se",
        "drop_path",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path / "out"),
    ]

    def send():
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        # Only to the handler ablation.py installs: never to pytest's own (a stray signal would end the session).
        if ready.exists() and signal.getsignal(signum) not in (
            signal.SIG_DFL,
            signal.SIG_IGN,
            signal.default_int_handler,
        ):
            os.kill(os.getpid(), signum)

    handler_before = signal.getsignal(signum)
    thread = threading.Thread(target=send)
    thread.start()
    try:
        with pytest.raises(SystemExit) as exc:
            run_ablation(*argv)
    finally:
        thread.join()
    se_dir = tmp_path / "out" / "se" / "seed0"
    assert exc.value.code == 128 + signum
    assert (se_dir / "signals").read_text() == f"{int(signum)}\n" and (se_dir / "last.pt").is_file()
    assert [c["key"] for c in stub.calls()] == ["baseline", "se"]
    err = capsys.readouterr().err
    assert "passed to the run" in err and "rerun the same command" in err
    assert table_rows(tmp_path / "out" / "cumulative.md")["+ SE"]["test acc (%)"] == "pending"
    assert signal.getsignal(signum) == handler_before  # the ablation's handler is gone with it

    stub.set(actions={})
    run_ablation(*argv)
    resumed = stub.calls()[2]
    assert resumed["key"] == "se" and resumed["argv"][-2:] == ["--resume", str(se_dir / "last.pt")]


def test_failed_runs_are_reported_and_the_rest_goes_on(tmp_path, stub):
    stub.set(actions={"nocrop_relu6": 2, "nocrop_no_clip/1": 0})  # 0: exits without writing its summary
    res = run_ablation(
        "--study",
        "leave-one-out",
        "--configs",
        "nocrop_relu6",
        "nocrop_no_clip",
        "nocrop_no_se",
        "--seeds",
        "0",
        "1",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path),
    )
    assert len(stub.calls()) == 8  # the reference and three rows x 2 seeds: failures did not stop the ablation
    rows = table_rows(tmp_path / "leave-one-out.md")
    assert rows["ReLU6 instead of SiLU"]["test acc (%)"] == "failed"
    # The table names the log's last error line, not its last line.
    assert rows["ReLU6 instead of SiLU"]["seeds"] == "0/2 (2 failed: exit 2: RuntimeError: stub failure)"
    assert "exit 0 without a complete summary.json" in rows["no gradient clipping"]["seeds"]
    assert rows["no SE"]["measured gain (% points)"] == "+0.00 ± 0.00"
    assert sum(r["status"] == "failed" for r in res["runs"]) == 3
    assert "RuntimeError: stub failure" in (tmp_path / "nocrop_relu6" / "seed0" / "train.log").read_text()


# ---------------------------------------------------------------------------------------------------
# Refusals before any training
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, first, then", [("--epochs", 1, 2), ("--max-train-samples", 64, 32), ("--max-test-samples", 32, 16)]
)
def test_a_folder_with_other_settings_is_refused(flag, first, then, tmp_path, stub, capsys):
    """A run at another budget (epochs, training or test images) is another run: never counted as done."""
    common_flags = ["--configs", "baseline", "--seeds", "0", "--output-dir", str(tmp_path)]

    def budget(value):
        return [str(a) for pair in {"--epochs": 1, flag: value}.items() for a in pair]

    run_ablation(*common_flags, *budget(first))
    n = len(stub.calls())
    with pytest.raises(SystemExit) as exc:
        run_ablation(*common_flags, *budget(then))
    assert exc.value.code == 2 and len(stub.calls()) == n == 1
    assert f"{flag} {first} (now {then})" in capsys.readouterr().err


def test_settings_are_compared_by_value_not_by_recipe_name(tmp_path, stub, capsys):
    """--recipe only names a set of defaults: a run recorded under the project recipe's name with the reference
    row's values (v3: the default at width 1.2) is the same run as that row's spelled-out flags, and other values
    refuse."""
    run_dir = tmp_path / "v2_no_crop" / "seed0"
    run_dir.mkdir(parents=True)
    budget = ["--epochs", "1", "--seed", "0"]

    def finished(*flags):
        args = plan.as_saved(mobilenetv4_enhanced.parse_args([*flags, *budget]))
        assert args["recipe"] == "project"
        (run_dir / "summary.json").write_text(
            json.dumps({"test_acc": 50.0, "epochs_completed": 1, "config": {"args": args}, "tta_table": {"none": {}}})
        )

    argv = [
        "--study",
        "architecture",
        "--configs",
        "v2_no_crop",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path),
        "--dry-run",
    ]
    finished("--width-mult", "1.2")
    run_ablation(*argv)
    assert "| done" in capsys.readouterr().out
    finished("--width-mult", "1.2", "--lr", "0.2")
    with pytest.raises(SystemExit) as exc:
        run_ablation(*argv)
    assert exc.value.code == 2 and "--lr 0.2 (now 0.1)" in capsys.readouterr().err
    assert stub.calls() == []


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_settings_check_ignores_what_changes_per_invocation(script):
    """A resumed or overwritten run saves other --resume/--overwrite/argv values than the plan expects: none of
    that may count as other settings (a new per-invocation key in the scripts' args belongs in RUNTIME_KEYS)."""
    parse = SCRIPTS[script].parse_args
    planned = ["--epochs", "1", "--seed", "0", "--output-dir", "a/b"]
    expected = parse(planned)
    for ran in (
        planned + ["--overwrite"],
        planned + ["--resume", "a/b/last.pt"],
        ["--epochs", "1", "--seed", "0", "--output-dir", "elsewhere", "--device", "cpu", "--data-dir", "d"],
        planned + ["--eval-every", "20"],
    ):  # evaluating less often trains the same weights
        assert plan.settings_diff(plan.as_saved(parse(ran)), expected) == []
    saved = plan.as_saved(parse(planned + ["--lr", "0.5"]))
    assert plan.settings_diff(saved, expected) == [f"--lr 0.5 (now {expected.lr})"]


@pytest.mark.parametrize("extra", [["--seed", "3"], ["--output-dir=x"], ["--no-such-flag"], ["--epochs", "0"]])
def test_bad_passthrough_flags_stop_before_training(tmp_path, stub, extra):
    with pytest.raises(SystemExit) as exc:
        run_ablation("--seeds", "0", "--output-dir", str(tmp_path), "--", *extra)
    assert exc.value.code == 2 and stub.calls() == []


def test_an_earlier_definition_of_a_studys_table_is_not_replaced(tmp_path, stub, capsys):
    """A <study>.json whose rows this study lacks is the table of an earlier definition of the study: a run of
    today's study into that folder would replace it. Refused before any training, in a dry run too."""
    (tmp_path / "leave-one-out.json").write_text(
        json.dumps({"rows": [{"key": "v2_no_crop"}, {"key": "full"}, {"key": "no_se"}]})
    )
    for extra in ([], ["--dry-run"]):
        with pytest.raises(SystemExit) as exc:
            run_ablation(
                "--study",
                "leave-one-out",
                "--configs",
                "nocrop_no_se",
                "--seeds",
                "0",
                "--epochs",
                "1",
                "--output-dir",
                str(tmp_path),
                *extra,
            )
        assert (
            exc.value.code == 2
            and "another definition of the leave-one-out study (rows full, no_se)" in capsys.readouterr().err
        )
    assert stub.calls() == []
    # A table of a subset of today's rows is this study's own: written over.
    run_ablation(
        "--study",
        "architecture",
        "--configs",
        "mobilenetv2",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path),
    )
    run_ablation(
        "--study",
        "architecture",
        "--configs",
        "conv_s_8x8",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path),
    )
    assert len(stub.calls()) == 3


def test_unknown_config_key(tmp_path, stub, capsys):
    with pytest.raises(SystemExit) as exc:
        run_ablation("--study", "leave-one-out", "--configs", "no_se", "--output-dir", str(tmp_path))
    assert exc.value.code == 2 and "nocrop_no_se" in capsys.readouterr().err


def test_studies_in_one_folder_share_their_common_runs(tmp_path, stub):
    run_ablation("--study", "architecture", "--configs", "mobilenetv2", "--seeds", "0", "--output-dir", str(tmp_path))
    assert len(stub.calls()) == 2  # the reference and MobileNetV2
    run_ablation("--study", "leave-one-out", "--configs", "nocrop_no_se", "--seeds", "0", "--output-dir", str(tmp_path))
    assert [c["key"] for c in stub.calls()] == ["v2_no_crop", "mobilenetv2", "nocrop_no_se"]  # only no SE is new
    assert (
        table_rows(tmp_path / "leave-one-out.md")["v3 (default until width 1.6)"]["test acc (%)"]
        == table_rows(tmp_path / "architecture.md")["v3 (default until width 1.6)"]["test acc (%)"]
    )


def test_select_configs_adds_references_and_sources():
    assert [c.key for c in catalog.select_configs("leave-one-out", ["nocrop_tta_flip"])] == [
        "v2_no_crop",
        "nocrop_tta_flip",
    ]
    assert [c.key for c in catalog.select_configs("cumulative", ["silu", "tta"])] == [
        "drop_path",
        "silu",
        "train_opts",
        "tta",
    ]  # + SiLU is measured against + stochastic depth


def test_paths_mean_the_same_to_the_ablation_and_its_runs(tmp_path, monkeypatch):
    """Runs start in the repository root: from there a path is passed as given (as the committed commands spell
    it), from elsewhere as an absolute path, so both processes read the same folder."""
    monkeypatch.chdir(ROOT)
    assert plan.shared_path("results/x") == "results/x"
    monkeypatch.chdir(tmp_path)
    assert plan.shared_path("results/x") == str(tmp_path / "results" / "x")


def test_run_argv_order():
    job_argv = plan.run_argv(
        catalog.STUDIES["cumulative"][1],
        cli.build_parser().parse_args(["--epochs", "3", "--data-dir", "d"]),
        ["--width-mult", "0.5"],
        2,
        Path("o/se/seed2"),
    )
    # The row's flags, the budget, the pass-through flags (they win over the row's), then what ablation owns.
    assert job_argv == [
        "--se",
        "--epochs",
        "3",
        "--data-dir",
        "d",
        "--width-mult",
        "0.5",
        "--seed",
        "2",
        "--output-dir",
        "o/se/seed2",
    ]


def test_preset_fills_the_budget_and_explicit_flags_win():
    parse = cli.build_parser().parse_args
    ref = catalog.STUDIES["architecture"][0]
    args = cli.apply_preset(parse(["--preset", "proxy-10k"]))
    assert (args.epochs, args.max_train_samples, args.max_test_samples) == (20, 10_000, None)
    args = cli.apply_preset(parse(["--preset", "proxy-5k"]))
    assert (args.epochs, args.max_train_samples, args.max_test_samples, args.eval_every) == (20, 5_000, None, 20)
    job_argv = plan.run_argv(ref, args, [], 0, Path("o"))
    assert job_argv[len(ref.flags) : len(ref.flags) + 6] == [
        "--epochs",
        "20",
        "--max-train-samples",
        "5000",
        "--eval-every",
        "20",
    ]
    args = cli.apply_preset(parse(["--preset", "proxy-10k", "--epochs", "5", "--max-train-samples", "500"]))
    assert (args.epochs, args.max_train_samples) == (5, 500)
    assert plan.run_argv(ref, args, [], 0, Path("o"))[len(ref.flags) : len(ref.flags) + 4] == [
        "--epochs",
        "5",
        "--max-train-samples",
        "500",
    ]


def test_dry_run_on_the_committed_proxy_folder(monkeypatch, capsys):
    """The architecture screen's own command, as a dry run on the committed folder: the reference's runs are
    done (read, not trained), MobileNetV2's seed 0 is read if finished or resumes from its last.pt (where this
    checkout has it), and nothing under results/ changes."""
    if not (PROXY / "v2_no_crop" / "seed0" / "summary.json").is_file():
        pytest.skip("no committed proxy study in this checkout")
    monkeypatch.chdir(ROOT)
    touched = (
        [PROXY / f"architecture.{ext}" for ext in ("md", "json", "png")]
        + sorted((PROXY / "v2_no_crop").rglob("*"))
        + sorted((PROXY / "mobilenetv2").rglob("*"))
    )
    before = {p: p.stat().st_mtime_ns for p in touched if p.exists()}
    run_ablation(
        "--study",
        "architecture",
        "--preset",
        "proxy-5k",
        "--configs",
        "mobilenetv2",
        "--seeds",
        "0",
        "--data-dir",
        "data",
        "--output-dir",
        "results/ablation-proxy-5k",
        "--dry-run",
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[ablation 1/2] v3 (default until width 1.6) | seed 0 | done"
    mobilenetv2 = "results/ablation-proxy-5k/mobilenetv2/seed0"
    if (ROOT / mobilenetv2 / "summary.json").is_file():  # finished: read, not trained again (its last.pt may stay)
        assert lines[2] == "[ablation 2/2] MobileNetV2 (4x4 map) | seed 0 | done"
    elif (ROOT / mobilenetv2 / "last.pt").is_file():
        assert lines[2] == "[ablation 2/2] MobileNetV2 (4x4 map) | seed 0 | resume"
        assert lines[3].endswith(
            f"--variant mobilenetv2 --no-tta-table --epochs 20 --max-train-samples 5000 "
            f"--eval-every 20 --data-dir data --seed 0 --output-dir {mobilenetv2} "
            f"--resume {mobilenetv2}/last.pt"
        )
    else:
        assert lines[2].startswith("[ablation 2/2] MobileNetV2 (4x4 map) | seed 0 | ")
    assert {p: p.stat().st_mtime_ns for p in touched if p.exists()} == before


# ---------------------------------------------------------------------------------------------------
# The real scripts, each run a process, on the tiny CIFAR files with a tiny model
# ---------------------------------------------------------------------------------------------------
def test_real_run_on_tiny_cifar(tmp_path, tiny_cifar):
    """One real run, a process of mobilenetv4_enhanced.py with the reference's flags (~12 s here, most of it
    starting torch): its console output in train.log, its result read from its summary.json, whose TTA table
    holds what the TTA rows read (--no-tta-table: none and the run's own --tta)."""
    out = tmp_path / "arch"
    argv = [
        "--study",
        "architecture",
        "--configs",
        "v2_no_crop",
        *ABLATION_TINY,
        "--data-dir",
        str(tiny_cifar),
        "--output-dir",
        str(out),
        "--",
        "--width-mult",
        "0.25",
        "-b",
        "16",
    ]
    res = run_ablation(*argv)
    assert list(table_rows(out / "architecture.md")) == ["v3 (default until width 1.6)"]
    assert [r["status"] for r in res["runs"]] == ["ok"] and (out / "architecture.png").is_file()
    summary = json.loads((out / "v2_no_crop" / "seed0" / "summary.json").read_text())
    assert res["rows"][0]["values"] == {0: summary["test_acc"]} and 0 <= summary["test_acc"] <= 100
    assert "--no-tta-table" in res["runs"][0]["argv"] and set(summary["tta_table"]) == {"none", "flip"}
    assert study_results.metric(summary, "none") == summary["test_acc"]
    assert 0 <= study_results.metric(summary, "flip") <= 100
    log = (out / "v2_no_crop" / "seed0" / "train.log").read_text()
    assert log.count("==> ") == 1 and "mobilenetv4_enhanced.py --recipe notebook" in log
    assert len(log.split("==> ", 1)[1].splitlines()) > 5  # the script's own report, not on the ablation's console
    # A second invocation only reads the summary: no process started, nothing appended to the log.
    again = run_ablation(*argv)
    assert [r["action"] for r in again["runs"]] == ["done"]
    assert (out / "v2_no_crop" / "seed0" / "train.log").read_text() == log
