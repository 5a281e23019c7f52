"""Tests for ablation.py: the plan (fresh / resume / skip), the table and chart, failures and interruptions.

Most tests replace the scripts' main() by a stub that writes a summary.json with made-up accuracies (fast, and
the expected gains are known exactly); one test trains for real on the tiny CIFAR fixture, with a tiny model.
"""
import json
from pathlib import Path

import pytest
import torch

import ablation
import common
import mobilenetv4_baseline
import mobilenetv4_enhanced

SCRIPTS = {"baseline": mobilenetv4_baseline, "enhanced": mobilenetv4_enhanced}
# What a stub run scores: each ingredient adds its own amount, so every row's expected gain is known.
BASE_ACC = 40.0
SEED_OFFSET = 0.5  # per seed, the same on every row: paired gains have std 0
TTA_ACC = {"none": 0.0, "flip": 1.5, "flip_rot90": 0.75, "flip_shift": 2.25}
NOTEBOOK_CLAIMS = {"+ SE": "+3-4%", "+ stochastic depth": "+2-3%", "+ SiLU": "+1-2%", "+ width 1.2": "+2-3%",
                   "+ MLP head": "+1-2%", "+ training optimizations": "+3-4%", "+ TTA (flip)": "+1-2%"}
TINY = ["--epochs", "1", "--max-train-samples", "32", "--max-test-samples", "16", "--seeds", "0"]
TINY_MODEL = ["--", "--width-mult", "0.25", "-b", "16"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: robust when the two cores are shared (see test_model.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stub_accuracy(script, args):
    """Made-up final accuracy: + SE 3, + drop path 2, SiLU 1, width 1.2 2, MLP head 1, the enhanced training
    recipe 4, EMA 0.5, warm-up -0.25; a seed shifts every row alike."""
    acc = BASE_ACC + SEED_OFFSET * args.seed + 3 * args.se + 2 * (args.drop_path > 0) + (args.act == "silu")
    acc += 2 * (args.width_mult > 1) + (args.head == "mlp")
    if script == "enhanced":
        acc += 4 - 0.5 * (not args.augment) - 0.25 * (args.label_smoothing == 0) - 0.125 * (args.opt == "adam")
        acc += 0.5 * args.model_ema - 0.25 * (args.warmup_epochs > 0) - 0.0625 * (args.sched == "constant")
    return acc


def make_stub(script, calls, fail=None, accuracy=None):
    """A stand-in for SCRIPTS[script].main: parses the real flags, writes config.json and summary.json as the
    script would, and records its argv. `fail(args)` may return an exit code to raise instead; `accuracy(script,
    args)` replaces stub_accuracy."""
    def main(argv=None):
        calls.append((script, list(argv)))
        args = SCRIPTS[script].parse_args(argv)
        code = fail(args) if fail else None
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = {"script": script, "args": vars(args)}
        common.write_json(out / "config.json", config)
        if code:
            (out / "last.pt").write_bytes(b"stub")  # what an interrupted run leaves behind
            raise SystemExit(code)
        acc = (accuracy or stub_accuracy)(script, args)
        modes = TTA_ACC if getattr(args, "tta_table", True) else ("none", args.tta)  # as Run.finish() does
        summary = {"script": script, "test_acc": acc, "epochs_completed": args.epochs, "config": config,
                   "tta_table": {k: {"test_acc": acc + TTA_ACC[k]} for k in modes}}
        common.write_json(out / "summary.json", summary)
        return summary
    return main


@pytest.fixture
def stubs(monkeypatch):
    """Replace both scripts' main() by stubs; returns the list of calls they receive."""
    monkeypatch.setattr(ablation, "release_memory", lambda: None)  # gc.collect: ~0.4 s a run with torch loaded
    calls = []
    for name, module in SCRIPTS.items():
        monkeypatch.setattr(module, "main", make_stub(name, calls))
    return calls


def table_rows(md_path: Path) -> dict:
    """{configuration: {column: cell}} from the markdown table."""
    lines = [l for l in md_path.read_text().splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
    return {r[0]: dict(zip(head, r)) for r in rows}


def run_ablation(*argv):
    return ablation.main(list(argv))


# ---------------------------------------------------------------------------------------------------
# The table and the chart
# ---------------------------------------------------------------------------------------------------
def test_cumulative_table_claims_and_gains(tmp_path, stubs):
    out = tmp_path / "cum"
    res = run_ablation("--study", "cumulative", "--seeds", "0", "1", "--epochs", "1", "--output-dir", str(out))
    assert (out / "cumulative.md").is_file() and (out / "cumulative.png").stat().st_size > 1000
    rows = table_rows(out / "cumulative.md")
    assert list(rows) == [c.label for c in ablation.STUDIES["cumulative"]]
    assert {"claimed gain", "measured gain (% points)", "test acc (%)"} <= set(rows["baseline"])
    for label, claim in NOTEBOOK_CLAIMS.items():
        assert rows[label]["claimed gain"] == claim
    expected_gain = {"+ SE": 3, "+ stochastic depth": 2, "+ SiLU": 1, "+ width 1.2": 2, "+ MLP head": 1,
                     "+ training optimizations": 4, "+ TTA (flip)": TTA_ACC["flip"]}
    for label, gain in expected_gain.items():
        assert rows[label]["measured gain (% points)"] == f"{gain:+.2f} ± 0.00", label
    assert rows["baseline"]["test acc (%)"] == f"{BASE_ACC + SEED_OFFSET / 2:.2f} ± 0.35"  # seeds 0, 1
    # The baseline script keeps batch 128, the enhanced one 64 (their recipes), and the table says so.
    assert "batch 128" in rows["+ SE"]["run"] and "batch 64" in rows["+ training optimizations"]["run"]
    # Six baseline runs with cumulative model flags, one enhanced run, no run for the TTA row; x 2 seeds.
    assert [s for s, _ in stubs].count("baseline") == 12 and [s for s, _ in stubs].count("enhanced") == 2
    mlp_head_argv = next(a for s, a in stubs if "--head" in a)
    assert mlp_head_argv[:9] == ["--se", "--drop-path", "0.1", "--act", "silu", "--width-mult", "1.2", "--head", "mlp"]
    # No run needs the full TTA table here: + TTA reads flip, the enhanced script's own --tta.
    assert all("--no-tta-table" in a and "--tta" not in a for _, a in stubs)
    saved = json.loads((out / "cumulative.json").read_text())
    assert len(saved["runs"]) == 14 and all(r["argv"] and r["test_acc"] is not None for r in saved["runs"])
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))


def test_gains_are_judged_by_a_paired_t_test_on_pooled_noise():
    """A training row's paired gains vary from seed to seed; their variances pool over the rows with two or more
    seeds (df = sum of n - 1), and a mean gain over n seeds is beyond noise past t(0.975, df) * sigma / sqrt(n).
    TTA rows compare views of the same weights, far less noisy: they pool apart. Before this rule the multiplier
    was 2 whatever df (t(0.975, 1) is 12.7), and 'a' and 'tta_a' below were called beyond noise."""
    def row(gain, std, n, script="enhanced"):
        return {"gain": gain, "gain_std": std, "gain_seeds": n, "script": script}
    rows = {"reference": row(None, None, 0), "a": row(3.0, 1.0, 2), "b": row(0.5, 2.0, 3), "c": row(-6.0, None, 1),
            "tta_a": row(0.5, 0.1, 2, None), "tta_b": row(-1.0, 0.3, 2, None)}
    noise = ablation.seed_noise(rows)
    train, tta = noise["training"], noise["tta"]
    sigma = ((1 * 1.0 ** 2 + 2 * 2.0 ** 2) / 3) ** 0.5  # 1.732, df 1 + 2
    assert (train["df"], train["rows"]) == (3, 2) and train["sigma"] == pytest.approx(sigma)
    assert train["t"] == pytest.approx(3.182446, abs=1e-5)  # t(0.975, 3), from tables
    assert train["threshold"] == pytest.approx({"1": 3.182446 * sigma, "2": 3.182446 * sigma / 2 ** 0.5,
                                                "3": 3.182446 * sigma / 3 ** 0.5}, abs=1e-4)
    tta_sigma = ((0.1 ** 2 + 0.3 ** 2) / 2) ** 0.5
    assert (tta["df"], tta["t"]) == (2, pytest.approx(4.302653, abs=1e-5))  # t(0.975, 2)
    assert tta["threshold"] == pytest.approx({"2": 4.302653 * tta_sigma / 2 ** 0.5}, abs=1e-4)  # 0.68
    ablation.judge_gains(rows, noise)
    verdict = {k: r["beyond_noise"] for k, r in rows.items()}
    assert verdict == {"reference": None, "a": False, "b": False, "c": True, "tta_a": False, "tta_b": True}
    # Nothing to pool yet (every row one seed): no verdict rather than a guess.
    lone = {"reference": row(None, None, 0), "a": row(3.0, None, 1)}
    noise = ablation.seed_noise(lone)
    assert noise["training"] is None and noise["tta"] is None
    ablation.judge_gains(lone, noise)
    assert lone["a"]["beyond_noise"] is None


def test_the_table_states_its_noise_and_verdicts(tmp_path, monkeypatch, stubs):
    """End to end: EMA's stub gain is +0.75 on seed 0 and +0.25 on seed 1; every other row gains the same on both
    seeds. The pooled paired sigma, df and t reach the table's notes and each row's verdict."""
    from scipy import stats

    def noisy(script, args):
        return stub_accuracy(script, args) + 0.25 * args.model_ema * (1 - 2 * args.seed)
    monkeypatch.setattr(mobilenetv4_enhanced, "main", make_stub("enhanced", stubs, accuracy=noisy))
    out = tmp_path / "cand"
    res = run_ablation("--study", "candidates", "--seeds", "0", "1", "--epochs", "1", "--output-dir", str(out))
    paired = [c for c in ablation.STUDIES["candidates"] if c.script and c.key != "full"]
    df = len(paired)
    sigma = (0.125 / df) ** 0.5  # EMA's paired std is 0.35 (variance 0.125), every other row's 0
    train = res["noise"]["training"]
    assert (train["df"], train["sigma"]) == (df, pytest.approx(sigma))
    threshold = stats.t.ppf(0.975, df) * sigma / 2 ** 0.5
    assert train["threshold"]["2"] == pytest.approx(threshold)
    rows = table_rows(out / "candidates.md")
    verdict = {label: r["beyond noise"] for label, r in rows.items()}
    assert verdict["full recipe"] == "-"
    assert threshold < 0.25  # so the stub's smallest gains (warm-up -0.25, EMA +0.5) count
    assert verdict["+ EMA of weights (warm-up)"] == "yes" and verdict["+ warm-up (1 epoch)"] == "yes"
    assert verdict["TTA flip_shift"] == "yes"  # the only TTA row, its own pool: df 1, paired std 0
    notes = (out / "candidates.md").read_text().split("Notes:")[1]
    assert f"{sigma:.2f}" in notes and f"{df} degree(s) of freedom" in notes
    # One seed: nothing to judge by.
    one = run_ablation("--study", "candidates", "--configs", "ema", "--seeds", "0", "--epochs", "1",
                       "--output-dir", str(out))
    assert one["noise"]["training"] is None
    assert table_rows(out / "candidates.md")["+ EMA of weights (warm-up)"]["beyond noise"] == "-"


def test_leave_one_out_table(tmp_path, stubs):
    out = tmp_path / "loo"
    run_ablation("--study", "leave-one-out", "--seeds", "0", "--epochs", "1", "--output-dir", str(out))
    rows = table_rows(out / "leave-one-out.md")
    assert list(rows) == [c.label for c in ablation.STUDIES["leave-one-out"]]
    assert all(r["claimed gain"] == "-" for r in rows.values())
    gain = {label: r["measured gain (% points)"] for label, r in rows.items()}
    assert gain["full recipe"] == "(reference)"
    assert gain["no SE"] == "-3.00" and gain["width 1.0"] == "-2.00" and gain["no augmentation"] == "-0.50"
    assert gain["Adam instead of AdamW"] == "-0.12" and gain["+ EMA of weights"] == "+0.50"
    # TTA rows compare the full run's TTA accuracies with its default flip TTA.
    assert gain["no TTA"] == f"{-TTA_ACC['flip']:+.2f}" and gain["TTA flip_shift"] == "+0.75"
    adam_argv = next(a for _, a in stubs if "--opt" in a)
    assert adam_argv[:6] == [*ablation.STUDY_RECIPE, "--opt", "adam", "--wd", "1e-4"]
    # The TTA rows read every mode of the full run: only it keeps the full TTA table.
    assert [("--no-tta-table" in a) for _, a in stubs if "full/seed0" in a[a.index("--output-dir") + 1]] == [False]
    assert sum("--no-tta-table" in a for _, a in stubs) == len(stubs) - 1


@pytest.mark.parametrize("study,recipe,expected", [
    ("tuning", "project-v2", {"v2_ema": {"model_ema"}, "v2_label_smoothing_0.2": {"label_smoothing"},
                              "v2_no_drop_path": {"drop_path"}, "v2_no_crop": {"crop_padding"}}),
    ("tuning-2", "project", {"nocrop_lr_0.2": {"lr"}, "nocrop_lr_0.05": {"lr"},
                             "nocrop_batch128": {"batch_size", "lr"}})])
def test_tuning_rows_change_their_recipe_one_setting_each(study, recipe, expected):
    """Each tuning round measures changes to the default it tuned (tuning: project-v2; tuning-2: project, v2
    without the crop): its reference row must train exactly what mobilenetv4_enhanced.py --recipe <that recipe>
    trains (a recipe edited under a study would leave its rows measuring something else), and every other row
    must change the setting its label names, nothing more."""
    def settings(flags):  # as config.json holds them, run-time keys left out
        args = ablation.as_saved(mobilenetv4_enhanced.parse_args(list(flags)))
        return {k: v for k, v in args.items() if k not in ablation.RUNTIME_KEYS}
    ref, *others = ablation.STUDIES[study]
    rows = {c.key: c for c in others}
    assert settings(ref.flags) == settings(["--recipe", recipe])
    ref_args = settings(ref.flags)
    assert set(rows) == set(expected)
    for key, changed in expected.items():
        args = settings(rows[key].flags)
        assert rows[key].reference == ref.key
        assert {k for k, v in args.items() if v != ref_args[k]} == changed, key


def test_second_tuning_round_starts_from_the_first_rounds_winner():
    """tuning-2's reference is tuning's no-crop row, the same key and flags: its two runs (the ones that moved the
    default) are reused, not trained again under another name."""
    first = {c.key: c for c in ablation.STUDIES["tuning"]}
    ref = ablation.STUDIES["tuning-2"][0]
    assert ref.key == "v2_no_crop" and ref.flags == first["v2_no_crop"].flags


def test_tuning_table_measures_against_the_default_and_shares_its_runs(tmp_path, stubs):
    """The tuning study's reference is the candidates study's stacked row (not a row keyed 'full'): its gains are
    measured against that run, which a folder holding the candidates study already has."""
    run_ablation("--study", "candidates", "--configs", "sgd_onecycle_flip_translate", "--seeds", "0",
                 "--output-dir", str(tmp_path))
    assert len(stubs) == 2  # the stacked row and its reference, the full recipe
    run_ablation("--study", "tuning", "--configs", "v2_ema", "v2_no_drop_path", "--seeds", "0",
                 "--output-dir", str(tmp_path))
    assert len(stubs) == 4  # the default's run was reused
    gain = {label: r["measured gain (% points)"] for label, r in table_rows(tmp_path / "tuning.md").items()}
    assert gain == {"project-v2 (default until no crop)": "(reference)", "+ EMA of weights (warm-up)": "+0.50",
                    "no stochastic depth": "-2.00"}
    run_ablation("--study", "tuning", "--configs", "v2_no_crop", "--seeds", "0", "--output-dir", str(tmp_path))
    assert len(stubs) == 5
    run_ablation("--study", "tuning-2", "--configs", "nocrop_lr_0.05", "--seeds", "0", "--output-dir", str(tmp_path))
    assert len(stubs) == 6  # the no-crop run was reused as the second round's reference
    gain = {label: r["measured gain (% points)"] for label, r in table_rows(tmp_path / "tuning-2.md").items()}
    assert gain == {"project (default)": "(reference)", "peak lr 0.05": "+0.00"}


def test_configs_filter_brings_in_references_and_sources(tmp_path, stubs):
    out = tmp_path / "sub"
    run_ablation("--study", "leave-one-out", "--configs", "no_se", "no_tta", "--seeds", "0", "--output-dir", str(out))
    rows = table_rows(out / "leave-one-out.md")
    assert list(rows) == ["full recipe", "no SE", "no TTA"]
    assert len(stubs) == 2  # full and no SE; the TTA row reads the full run
    assert [c.key for c in ablation.select_configs("cumulative", ["silu", "tta"])] == [
        "drop_path", "silu", "train_opts", "tta"]  # + SiLU is measured against + stochastic depth


# ---------------------------------------------------------------------------------------------------
# Resuming: finished runs are read, interrupted ones continue from last.pt
# ---------------------------------------------------------------------------------------------------
def test_second_invocation_runs_nothing(tmp_path, stubs):
    argv = ["--study", "cumulative", "--seeds", "0", "--epochs", "1", "--output-dir", str(tmp_path)]
    first = run_ablation(*argv)
    n = len(stubs)
    second = run_ablation(*argv)
    assert len(stubs) == n
    assert [r["mean"] for r in second["rows"]] == [r["mean"] for r in first["rows"]]
    assert all(r["action"] == "done" for r in second["runs"])


def test_a_summary_without_a_needed_tta_mode_is_evaluated_again(tmp_path, stubs):
    argv = ["--study", "leave-one-out", "--configs", "tta_flip_shift", "--seeds", "0", "--output-dir", str(tmp_path)]
    run_ablation(*argv)
    path = tmp_path / "full" / "seed0" / "summary.json"
    summary = json.loads(path.read_text())
    del summary["tta_table"]["flip_shift"]  # e.g. a run made with --no-tta-table
    path.write_text(json.dumps(summary))
    (tmp_path / "full" / "seed0" / "last.pt").write_bytes(b"stub")
    res = run_ablation(*argv)
    assert res["runs"][0]["action"] == "resume" and stubs[-1][1][-2] == "--resume"


def test_interruption_stops_the_ablation_and_the_next_invocation_resumes(tmp_path, monkeypatch, stubs, capsys):
    argv = ["--study", "cumulative", "--configs", "se", "drop_path", "--seeds", "0", "--epochs", "1",
            "--output-dir", str(tmp_path)]
    interrupted = []
    monkeypatch.setattr(mobilenetv4_baseline, "main", make_stub(
        "baseline", interrupted, fail=lambda args: 130 if args.se and args.drop_path == 0 else None))
    with pytest.raises(SystemExit) as exc:
        run_ablation(*argv)
    assert exc.value.code == 130
    assert len(interrupted) == 2  # baseline ran, + SE was interrupted, + stochastic depth never started
    assert "rerun the same command" in capsys.readouterr().err
    assert table_rows(tmp_path / "cumulative.md")["+ stochastic depth"]["test acc (%)"] == "pending"

    resumed = []
    monkeypatch.setattr(mobilenetv4_baseline, "main", make_stub("baseline", resumed))
    run_ablation(*argv)
    se_dir = tmp_path / "se" / "seed0"
    (_, se_argv), (_, drop_path_argv) = resumed
    assert se_argv[-2:] == ["--resume", str(se_dir / "last.pt")] and "--overwrite" not in se_argv
    assert drop_path_argv[-1] == "--overwrite"


def test_keyboard_interrupt_outside_a_run_stops_with_130(tmp_path, monkeypatch, stubs):
    def ctrl_c(argv=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(mobilenetv4_enhanced, "main", ctrl_c)
    with pytest.raises(SystemExit) as exc:
        run_ablation("--study", "leave-one-out", "--configs", "full", "no_se", "--seeds", "0",
                     "--output-dir", str(tmp_path))
    assert exc.value.code == 130 and (tmp_path / "leave-one-out.md").is_file()


def test_failed_runs_are_reported_and_the_rest_goes_on(tmp_path, monkeypatch, stubs):
    calls = []
    monkeypatch.setattr(mobilenetv4_enhanced, "main", make_stub(
        "enhanced", calls, fail=lambda args: 2 if args.opt == "adam" else None))
    res = run_ablation("--study", "leave-one-out", "--configs", "adam", "ema", "--seeds", "0", "1",
                       "--output-dir", str(tmp_path))
    assert len(calls) == 6  # full (their reference), adam, ema x 2 seeds: failures did not stop the ablation
    rows = table_rows(tmp_path / "leave-one-out.md")
    assert rows["Adam instead of AdamW"]["test acc (%)"] == "failed"
    assert "2 failed" in rows["Adam instead of AdamW"]["seeds"] and "exit 2" in rows["Adam instead of AdamW"]["seeds"]
    assert rows["+ EMA of weights"]["measured gain (% points)"] == "+0.50 ± 0.00"
    assert sum(r["status"] == "failed" for r in res["runs"]) == 2


# ---------------------------------------------------------------------------------------------------
# Refusals before any training
# ---------------------------------------------------------------------------------------------------
def test_a_folder_with_other_settings_is_refused(tmp_path, stubs, capsys):
    run_ablation("--configs", "baseline", "--seeds", "0", "--epochs", "1", "--output-dir", str(tmp_path))
    n = len(stubs)
    with pytest.raises(SystemExit) as exc:
        run_ablation("--configs", "baseline", "--seeds", "0", "--epochs", "2", "--output-dir", str(tmp_path))
    assert exc.value.code == 2 and len(stubs) == n
    assert "--epochs 1 (now 2)" in capsys.readouterr().err


def test_settings_are_compared_by_value_not_by_recipe_name(tmp_path, stubs, capsys):
    """--recipe only names a set of defaults: a folder trained under one name is the same run under another
    name with equal values (a default moved into a new recipe keeps its old runs), and other values refuse."""
    argv = ["--study", "candidates", "--configs", "full", "--seeds", "0", "--epochs", "1", "--output-dir",
            str(tmp_path)]
    run_ablation(*argv)
    n = len(stubs)
    run_ablation(*argv, "--", "--recipe", "notebook", "--norm-weight-decay", "0")  # the project's values
    assert len(stubs) == n
    with pytest.raises(SystemExit):
        run_ablation(*argv, "--", "--recipe", "notebook")
    assert "--norm-weight-decay 0.0 (now 0.05)" in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_settings_check_ignores_what_changes_per_invocation(script):
    """A resumed or overwritten run saves other --resume/--overwrite/argv values than the plan expects: none of
    that may count as other settings (a new per-invocation key in the scripts' args belongs in RUNTIME_KEYS)."""
    parser = SCRIPTS[script].build_parser
    planned = ["--epochs", "1", "--seed", "0", "--output-dir", "a/b"]
    expected = common.parse_args(parser(), planned)
    for ran in (planned + ["--overwrite"], planned + ["--resume", "a/b/last.pt"],
                ["--epochs", "1", "--seed", "0", "--output-dir", "elsewhere", "--device", "cpu", "--data-dir", "d"],
                planned + ["--eval-every", "20"]):  # evaluating less often trains the same weights (test_scripts)
        saved = json.loads(json.dumps(vars(common.parse_args(parser(), ran)), default=str))
        assert ablation.settings_diff(saved, expected) == []
    saved = json.loads(json.dumps(vars(common.parse_args(parser(), planned + ["--lr", "0.5"])), default=str))
    assert ablation.settings_diff(saved, expected) == [f"--lr 0.5 (now {expected.lr})"]


@pytest.mark.parametrize("extra", [["--seed", "3"], ["--output-dir=x"], ["--no-such-flag"], ["--epochs", "0"]])
def test_bad_passthrough_flags_stop_before_training(tmp_path, stubs, extra):
    with pytest.raises(SystemExit) as exc:
        run_ablation("--seeds", "0", "--output-dir", str(tmp_path), "--", *extra)
    assert exc.value.code == 2 and stubs == []


def test_a_key_names_one_configuration_in_every_study():
    """Studies sharing an --output-dir share the runs of equal keys: a key must mean the same run everywhere."""
    seen = {}
    for study, rows in ablation.STUDIES.items():
        for c in rows:
            what = (c.script, c.flags, c.source, c.tta)
            assert seen.setdefault(c.key, (study, what))[1] == what, (c.key, study, seen[c.key][0])


def test_studies_in_one_folder_share_their_common_runs(tmp_path, stubs):
    run_ablation("--study", "candidates", "--configs", "ema", "--seeds", "0", "--output-dir", str(tmp_path))
    assert len(stubs) == 2  # full (the reference) and ema
    run_ablation("--study", "leave-one-out", "--configs", "ema", "no_se", "--seeds", "0", "--output-dir", str(tmp_path))
    assert len(stubs) == 3  # only no_se is new
    assert {"candidates.md", "leave-one-out.md", "candidates.json", "leave-one-out.json"} <= \
        {p.name for p in tmp_path.iterdir()}
    assert table_rows(tmp_path / "leave-one-out.md")["+ EMA of weights"]["test acc (%)"] == \
        table_rows(tmp_path / "candidates.md")["+ EMA of weights (warm-up)"]["test acc (%)"]


def test_report_only_tabulates_finished_runs_and_trains_nothing(tmp_path, stubs):
    """--report-only rewrites a study's files from the runs finished so far (say, while another invocation
    trains a subset of its rows), so a subset run never leaves a partial table as the study's last word."""
    run_ablation("--study", "candidates", "--configs", "ema", "--seeds", "0", "--output-dir", str(tmp_path))
    n = len(stubs)
    res = run_ablation("--study", "candidates", "--seeds", "0", "1", "--report-only", "--output-dir", str(tmp_path))
    assert len(stubs) == n
    rows = table_rows(tmp_path / "candidates.md")
    assert list(rows) == [c.label for c in ablation.STUDIES["candidates"]]
    assert rows["+ EMA of weights (warm-up)"]["seeds"] == "1/2"
    assert rows["+ EMA of weights (warm-up)"]["measured gain (% points)"] == "+0.50"
    assert rows["+ cutout 16 px"]["test acc (%)"] == "pending"
    assert sum(r["status"] == "pending" for r in res["runs"]) == len(res["runs"]) - 2
    assert (tmp_path / "candidates.png").is_file()


def test_unknown_config_key(tmp_path, stubs, capsys):
    with pytest.raises(SystemExit) as exc:
        run_ablation("--study", "leave-one-out", "--configs", "se", "--output-dir", str(tmp_path))
    assert exc.value.code == 2 and "no_se" in capsys.readouterr().err


def test_run_argv_order():
    job_argv = ablation.run_argv(ablation.STUDIES["cumulative"][1], ablation.build_parser().parse_args(
        ["--epochs", "3", "--data-dir", "d"]), ["--width-mult", "0.5"], 2, Path("o/se/seed2"))
    # The row's flags, the budget, the pass-through flags (they win over the row's), then what ablation owns.
    assert job_argv == ["--se", "--epochs", "3", "--data-dir", "d", "--width-mult", "0.5",
                        "--seed", "2", "--output-dir", "o/se/seed2"]


def test_cumulative_training_row_is_the_notebooks_recipe():
    """'+ training optimizations' reproduces the notebook README's row: the notebook's enhanced recipe, whatever
    the project's defaults become (a default changed by the study must not move this row)."""
    row = {c.key: c for c in ablation.STUDIES["cumulative"]}["train_opts"]
    args = vars(mobilenetv4_enhanced.parse_args(list(row.flags)))
    notebook = mobilenetv4_enhanced.RECIPES["notebook"]
    assert {k: args[k] for k in notebook} == notebook
    assert args["recipe"] == "notebook"


@pytest.mark.parametrize("study", list(ablation.STUDIES))
def test_every_row_is_a_valid_command_line(study):
    """Each training row's flags parse with its script and really change a setting of the row it is compared
    with (a row that changes nothing, say 'no rotation' on a recipe without rotation, would measure noise)."""
    rows = {c.key: c for c in ablation.STUDIES[study]}
    for cfg in rows.values():
        if cfg.script is None:
            continue
        args = vars(SCRIPTS[cfg.script].parse_args(list(cfg.flags)))
        ref = rows.get(cfg.reference)
        if ref is None or ref.script != cfg.script:  # a study's root, or another script (its own recipe)
            continue
        ref_args = vars(SCRIPTS[ref.script].parse_args(list(ref.flags)))
        changed = {k for k, v in args.items() if k not in ablation.RUNTIME_KEYS and v != ref_args[k]}
        assert changed, cfg.key


def test_preset_fills_the_budget_and_explicit_flags_win():
    parse = ablation.build_parser().parse_args
    args = ablation.apply_preset(parse(["--preset", "proxy-10k"]))
    assert (args.epochs, args.max_train_samples, args.max_test_samples) == (20, 10_000, None)
    args = ablation.apply_preset(parse(["--preset", "proxy-5k"]))
    assert (args.epochs, args.max_train_samples, args.max_test_samples, args.eval_every) == (20, 5_000, None, 20)
    job_argv = ablation.run_argv(ablation.STUDIES["candidates"][0], args, [], 0, Path("o"))
    assert job_argv[:8] == [*ablation.STUDY_RECIPE, "--epochs", "20", "--max-train-samples", "5000", "--eval-every",
                            "20"]
    args = ablation.apply_preset(parse(["--preset", "proxy-10k", "--epochs", "5", "--max-train-samples", "500"]))
    assert (args.epochs, args.max_train_samples) == (5, 500)
    job_argv = ablation.run_argv(ablation.STUDIES["candidates"][0], args, [], 0, Path("o"))
    assert job_argv[:6] == [*ablation.STUDY_RECIPE, "--epochs", "5", "--max-train-samples", "500"]


# ---------------------------------------------------------------------------------------------------
# The real scripts, on the tiny CIFAR files with a tiny model
# ---------------------------------------------------------------------------------------------------
def test_real_runs_on_tiny_cifar(tmp_path, tiny_cifar, monkeypatch):
    data = ["--data-dir", str(tiny_cifar)]
    cum, loo = tmp_path / "cum", tmp_path / "loo"
    res = run_ablation("--study", "cumulative", "--configs", "se", "tta", *TINY, *data,
                       "--output-dir", str(cum), *TINY_MODEL)
    rows = table_rows(cum / "cumulative.md")
    assert list(rows) == ["baseline", "+ SE", "+ training optimizations", "+ TTA (flip)"]
    assert (cum / "cumulative.png").is_file() and all(r["status"] == "ok" for r in res["runs"])
    assert rows["+ SE"]["claimed gain"] == "+3-4%" and rows["+ SE"]["measured gain (% points)"] != "n/a"
    for row in res["rows"]:
        assert 0 <= row["mean"] <= 100

    res = run_ablation("--study", "leave-one-out", "--configs", "full", "no_se", "no_tta", *TINY, *data,
                       "--output-dir", str(loo), *TINY_MODEL)
    assert list(table_rows(loo / "leave-one-out.md")) == ["full recipe", "no SE", "no TTA"]
    summary = json.loads((loo / "full" / "seed0" / "summary.json").read_text())
    no_tta = next(r for r in res["rows"] if r["key"] == "no_tta")
    assert no_tta["gain"] == pytest.approx(summary["tta_table"]["none"]["test_acc"]
                                           - summary["tta_table"]["flip"]["test_acc"])

    # An interrupted run (last.pt, no summary.json) continues with --resume; the finished one is only read.
    run_dir = loo / "no_se" / "seed0"
    (run_dir / "summary.json").unlink()
    calls, real_main = [], mobilenetv4_enhanced.main
    monkeypatch.setattr(mobilenetv4_enhanced, "main", lambda argv=None: calls.append(argv) or real_main(argv))
    res = run_ablation("--study", "leave-one-out", "--configs", "full", "no_se", "no_tta", *TINY, *data,
                       "--output-dir", str(loo), *TINY_MODEL)
    assert len(calls) == 1 and calls[0][-2:] == ["--resume", str(run_dir / "last.pt")]
    assert (run_dir / "summary.json").is_file()
    assert [r["action"] for r in res["runs"]] == ["done", "resume"]
