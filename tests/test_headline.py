"""headline.py: the README's table of full runs, read from real run folders of the training scripts."""
import contextlib
import io
import json
import shutil

import pytest

import headline
from test_scripts import (LEARN, MD5_WARNING, assert_one_error_line, enh_learned, learned,  # noqa: F401
                          read_metrics, run_main)

pytestmark = pytest.mark.filterwarnings(f"ignore:{MD5_WARNING}")


def cells(text: str) -> list[dict]:
    """The markdown table as one dict per run row."""
    lines = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0]]
    return [dict(zip(head, (c.strip() for c in line))) for line in lines[1:]]


def call(argv):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            headline.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def test_rows_quote_the_runs_files(learned, enh_learned, tiny_cifar, tmp_path):
    base, enh = tmp_path / "base", tmp_path / "enh"
    shutil.copytree(learned[0], base)
    shutil.copytree(enh_learned[0], enh)
    # The baseline run started from uncommitted edits (common.git_commit), resumed on a clean commit.
    config = json.loads((base / "config.json").read_text())
    config["git_commit"] = "c" * 40
    config["segments"] = [{**config["segments"][0], "git_commit": "d" * 40 + "-dirty"}, {**config["segments"][0],
                          "git_commit": "c" * 40, "from_epoch": 1}]
    (base / "config.json").write_text(json.dumps(config))
    # best + TTA: the best checkpoint evaluated by --test-only into its default folder, <run>/eval-best/
    res = run_main("enhanced", [*LEARN, "--data-dir", tiny_cifar, "--test-only", "--resume", enh / "best.pt"])
    assert res.code == 0, res.err
    code, out, err = call([base, enh, "--output-dir", tmp_path / "report"])
    assert code == 0, err
    rows = cells((tmp_path / "report" / "headline.md").read_text())
    assert (tmp_path / "report" / "headline.png").read_bytes()[:4] == b"\x89PNG"
    for row, folder, notebook in ((rows[0], base, "70.09"), (rows[1], enh, "83.28")):
        summary = json.loads((folder / "summary.json").read_text())
        metrics = read_metrics(folder / "metrics.csv")
        best = max(metrics, key=lambda r: float(r["test_acc"]))
        assert row["run"] == folder.name and row["notebook (reported)"] == notebook
        assert row["final"] == f"{summary['test_acc']:.2f}"
        assert row["final + TTA"] == f"{summary['test_acc_tta']:.2f} ({summary['tta']})"
        assert row["best on test set (epoch)"] == f"{float(best['test_acc']):.2f} ({best['epoch']})"
        assert row["epochs"] == f"{len(metrics)} / {len(metrics)}"
        config = json.loads((folder / "config.json").read_text())
        # the command that replays the run, whatever the defaults have become since
        assert row["replay"] == f"`python mobilenetv4_{config['script']}.py --config {folder / 'config.json'}`"
    assert rows[0]["commits"] == "ddddddd-dirty, ccccccc"
    enh_commit = json.loads((enh / "config.json").read_text())["git_commit"] or "unknown"
    assert rows[1]["commits"] == enh_commit[:7] + ("-dirty" if enh_commit.endswith("-dirty") else "")
    best_eval = json.loads((enh / "eval-best" / "summary.json").read_text())
    assert rows[1]["best on test set + TTA"] == f"{best_eval['test_acc_tta']:.2f} ({best_eval['tta']})"
    assert rows[0]["best on test set + TTA"] == "-"  # never evaluated: not invented


def test_a_run_still_training_shows_its_last_epoch(learned, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(learned[0], run)
    (run / "summary.json").unlink()
    code, out, err = call([run, "--output-dir", tmp_path])
    assert code == 0, err
    row = cells(out)[0]
    assert row["final + TTA"] == "in progress"
    assert row["final"] == f"{float(read_metrics(run / 'metrics.csv')[-1]['test_acc']):.2f}"


def test_a_folder_without_a_run_is_one_error_line(tmp_path):
    code, _, err = call([tmp_path, "--output-dir", tmp_path / "report"])
    assert code == 2
    assert_one_error_line(err, str(tmp_path), "holds no training run")
    assert not (tmp_path / "report").exists()
