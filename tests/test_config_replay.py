"""--config PATH replays a run: the flags its config.json recorded become the defaults, flags given beside it win."""
import contextlib
import io
import json
from pathlib import Path

import pytest

import mobilenetv4_baseline
import mobilenetv4_enhanced

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"baseline": mobilenetv4_baseline, "enhanced": mobilenetv4_enhanced}
NOT_REPLAYED = {"argv", "config", "output_dir", "resume", "overwrite", "test_only"}
COMMITTED = sorted(p for p in (ROOT / "results").rglob("config.json")
                   if json.loads(p.read_text()).get("script") in SCRIPTS)
pytestmark = pytest.mark.filterwarnings("ignore:CIFAR-10 files")


def comparable(flags: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flags.items() if k not in NOT_REPLAYED}


def test_there_are_committed_runs_to_replay():
    assert len(COMMITTED) >= 50  # every full run and every study run under results/


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_every_committed_run_resolves_to_its_recorded_flags(path):
    recorded = json.loads(path.read_text())
    args = SCRIPTS[recorded["script"]].parse_args(["--config", str(path)])
    resolved = comparable(vars(args))
    expected = comparable(recorded["args"])
    # flags added since the run was recorded take their default, which is what the run did then
    assert {k: resolved[k] for k in expected} == expected
    defaults = comparable(vars(SCRIPTS[recorded["script"]].parse_args([])))
    assert {k: resolved[k] for k in set(resolved) - set(expected)} == \
        {k: defaults[k] for k in set(resolved) - set(expected)}


def run_main(script, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return 0, SCRIPTS[script].main([str(a) for a in argv]), err.getvalue()
        except SystemExit as exc:
            return exc.code, None, err.getvalue()


def test_a_replayed_run_trains_what_it_recorded_and_flags_beside_it_win(tiny_cifar, tmp_path):
    first = tmp_path / "first"
    flags = ["--width-mult", "0.25", "-b", "16", "--max-train-samples", "64", "--max-test-samples", "32",
             "--device", "cpu", "--no-download", "--data-dir", tiny_cifar, "--epochs", 1, "--no-tta-table",
             "--recipe", "notebook", "--lr", "3e-3", "--seed", "4"]
    code, summary, err = run_main("enhanced", [*flags, "--output-dir", first])
    assert code == 0, err
    config = first / "config.json"
    code, replay, err = run_main("enhanced", ["--config", config, "--output-dir", tmp_path / "replay"])
    assert code == 0, err
    assert replay["test_acc"] == summary["test_acc"] and replay["config"]["model_summary"] == \
        summary["config"]["model_summary"]
    replayed = json.loads((tmp_path / "replay" / "config.json").read_text())["args"]
    assert comparable(replayed) == comparable(json.loads(config.read_text())["args"])
    assert replayed["recipe"] == "notebook" and replayed["lr"] == 3e-3 and replayed["seed"] == 4
    code, _, err = run_main("enhanced", ["--config", config, "--seed", 5, "--output-dir", tmp_path / "other"])
    assert code == 0, err
    assert json.loads((tmp_path / "other" / "config.json").read_text())["args"]["seed"] == 5


@pytest.mark.parametrize("content, words", [(None, "cannot read"), ("[1, 2]", "not a config.json"),
                                            ("{broken", "cannot read")])
def test_a_bad_config_is_one_error_line(content, words, tmp_path):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    code, _, err = run_main("baseline", ["--config", path])
    assert code == 2 and err.count("\n") == 1 and "--config" in err and words in err, err


def test_a_config_of_the_other_script_is_refused(tmp_path):
    enhanced = next(p for p in COMMITTED if json.loads(p.read_text())["script"] == "enhanced")
    code, _, err = run_main("baseline", ["--config", enhanced])
    assert code == 2 and err.count("\n") == 1 and "lacks" in err and "betas" in err, err
