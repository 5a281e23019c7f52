"""Training and resume: learning, schedules, recipes and flags, EMA, weight-decay groups, resume equals an
uninterrupted run, --eval-every, --test-only, and --config replay."""

import json
import math
import shutil

import pytest
import torch
from torch import nn

import common
import mnv4.checkpoint
import mnv4.evaluation
import mnv4.provenance
import mnv4.run
import mobilenetv4_enhanced
from helpers import (
    ENH_LEARN,
    LEARN,
    MD5_WARNING,
    ROOT,
    SCRIPTS,
    STEPS_PER_EPOCH,
    TINY,
    _Crash,
    assert_one_error_line,
    assert_same,
    assert_same_run,
    crash_after_epoch,
    epoch_log,
    field_ends,
    load,
    nan_criterion_at,
    read_metrics,
    run_main,
    train,
)
from studies import plan as study_plan

pytestmark = pytest.mark.filterwarnings(f"ignore:{MD5_WARNING}")


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_learns_above_chance(script, learned, enh_learned):
    out, res = learned if script == "baseline" else enh_learned
    rows = read_metrics(out / "metrics.csv")
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.3
    assert res.summary["test_acc"] >= 30.0, rows  # three times chance on 40 images


def test_baseline_resume_equals_uninterrupted(base1, base3, tiny_cifar, tmp_path):
    """1 epoch, then --resume last.pt --epochs 3 == 3 epochs straight, bit for bit."""
    out = tmp_path / "run"
    shutil.copytree(base1[0], out)
    res = run_main(
        "baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 3, "--deterministic", "--resume", out / "last.pt"]
    )
    assert res.code == 0, res.err
    assert f"resumed from {out / 'last.pt'}: epoch 2, step 0" in res.out
    assert res.summary["epochs_completed"] == 3
    assert_same_run(out, base3[0], res.summary, base3[1].summary)


def test_resume_keeps_the_provenance_of_every_segment(base1, tiny_cifar, tmp_path, monkeypatch):
    """config.json of a resumed run still names the command and commit that trained its first epochs, and adds
    the resume's own: a results folder must say which code made every epoch it reports."""
    out = tmp_path / "run"
    shutil.copytree(base1[0], out)
    first = json.loads((out / "config.json").read_text())
    monkeypatch.setattr(mnv4.run, "git_commit", lambda: "f" * 40)  # the resume runs on a later commit
    res = run_main(
        "baseline", [*TINY, "--data-dir", tiny_cifar, "--epochs", 3, "--deterministic", "--resume", out / "last.pt"]
    )
    assert res.code == 0, res.err
    segments = json.loads((out / "config.json").read_text())["segments"]
    assert [(s["from_epoch"], s["from_step"]) for s in segments] == [(0, 0), (1, 0)]
    assert segments[0]["argv"] == first["args"]["argv"] and segments[0]["git_commit"] == first["git_commit"]
    assert "--resume" in segments[1]["argv"] and segments[1]["git_commit"] == "f" * 40
    assert torch.load(out / "last.pt", weights_only=False)["segments"] == segments
    # --test-only trains nothing: the run's own config.json keeps its segments
    run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--test-only", "--resume", out / "last.pt"])
    assert json.loads((out / "config.json").read_text())["segments"] == segments


def test_enhanced_resume_equals_uninterrupted(enh_learned, tiny_cifar, tmp_path, monkeypatch):
    """Enhanced (augmentation, drop path, dropout, per-step cosine, EMA), a run that learns: stop after epoch 2 of
    an --epochs 4 run, resume, compare with 4 epochs straight. (Not `--epochs 2` then `--epochs 4`: the cosine
    schedule is planned over --epochs, so extending a finished run re-plans the learning rate by design.)"""
    out = tmp_path / "run"
    crash_after_epoch(monkeypatch, 2)
    with pytest.raises(_Crash):
        run_main(
            "enhanced", [*ENH_LEARN, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 4, "--deterministic"]
        )
    monkeypatch.undo()
    assert load(out / "last.pt")["epoch"] == 2
    res = run_main(
        "enhanced",
        [*ENH_LEARN, "--data-dir", tiny_cifar, "--epochs", 4, "--deterministic", "--resume", out / "last.pt"],
    )
    assert res.code == 0, res.err
    assert "resumed from" in res.out and res.summary["epochs_completed"] == 4
    assert res.summary["test_acc"] >= 30.0  # real predictions are compared, not chance-level noise
    assert_same_run(out, enh_learned[0], res.summary, enh_learned[1].summary)


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_test_only_reproduces_best_epoch(script, learned, enh_learned, tiny_cifar):
    """(Both runs learned: their accuracy is far from what an unloaded, untrained model scores.)"""
    run_dir, run = learned if script == "baseline" else enh_learned
    flags = LEARN if script == "baseline" else ENH_LEARN
    best = run_dir / "best.pt"
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.csv")}
    ckpt = load(best)
    rows = read_metrics(run_dir / "metrics.csv")
    best_row = rows[ckpt["epoch"] - 1]
    assert float(best_row["test_acc"]) == max(float(r["test_acc"]) for r in rows)
    assert float(best_row["test_acc"]) >= 30.0  # three times chance: the comparison below means something
    res = run_main(script, [*flags, "--data-dir", tiny_cifar, "--test-only", "--resume", best])
    assert res.code == 0, res.err
    assert res.summary["test_acc"] == float(best_row["test_acc"])
    assert res.summary["epochs_completed"] == ckpt["epoch"]
    summary = json.loads((run_dir / "eval-best" / "summary.json").read_text())
    assert summary["test_acc"] == float(best_row["test_acc"])
    assert {name: (run_dir / name).read_bytes() for name in before} == before  # evaluation changes nothing

    # last.pt holds the final model: evaluating it reproduces the training run's final report.
    res = run_main(script, [*flags, "--data-dir", tiny_cifar, "--test-only", "--resume", run_dir / "last.pt"])
    assert res.code == 0, res.err
    for key in ("test_acc", "test_acc_tta", "tta_table", "per_class_acc"):
        assert res.summary[key] == run.summary[key], key
    assert (run_dir / "eval-last" / "summary.json").is_file()


def test_eval_every_skips_evaluations_without_changing_training(base3, tiny_cifar, tmp_path, monkeypatch):
    """--eval-every 2 of 3 epochs evaluates after epochs 2 and 3 only (the last is always evaluated): the skipped
    epoch logs no test figures, best.pt is the best evaluated epoch, and the weights equal those of a run that
    evaluated every epoch."""
    evaluated = []
    predict = mnv4.evaluation.predict_probs

    def counting_predict(model, images, *args, **kwargs):
        evaluated.append(images.shape[0])
        return predict(model, images, *args, **kwargs)

    monkeypatch.setattr(mnv4.evaluation, "predict_probs", counting_predict)
    out = tmp_path / "run"
    res = train("baseline", tiny_cifar, out, 3, "--eval-every", 2, "--no-tta-table")
    assert len(evaluated) == 2 + 1  # epochs 2 and 3, then the final TTA's flipped view (epoch 3's is reused)
    rows, reference = read_metrics(out / "metrics.csv"), read_metrics(base3[0] / "metrics.csv")
    assert rows[0]["test_acc"] == "nan" and rows[0]["test_loss"] == "nan"
    assert [r["test_acc"] for r in rows[1:]] == [r["test_acc"] for r in reference[1:]]
    header, lines = epoch_log(res.out)
    assert lines[0].split()[3:5] == ["-", "-"] and field_ends(lines[0]) == field_ends(header)
    assert res.summary["best_acc"] == max(float(r["test_acc"]) for r in rows[1:])
    best = load(out / "best.pt")
    assert best["epoch"] in (2, 3) and best["best_acc"] == res.summary["best_acc"]
    assert_same(load(out / "last.pt")["model"], load(base3[0] / "last.pt")["model"], "model")


@pytest.fixture(scope="module")
def onecycle4(tiny_cifar, tmp_path_factory):
    """Enhanced (its default one-cycle schedule), 4 epochs of 4 steps (-b 16), uninterrupted: the reference
    learning-rate curve."""
    out = tmp_path_factory.mktemp("onecycle4") / "run"
    train("enhanced", tiny_cifar, out, 4)
    return out


@pytest.mark.parametrize("new_batch", [8, 32])
def test_onecycle_resumed_with_another_batch_size_continues_the_curve(
    new_batch, onecycle4, tiny_cifar, tmp_path, monkeypatch
):
    """An epoch-end checkpoint resumed with another -b (the README allows it) must continue the schedule at the
    same progress: before the fix the step counter was reinterpreted, so -b 32 dropped the lr to the floor for the
    rest of the run and -b 8 jumped it back up."""
    out = tmp_path / "run"
    crash_after_epoch(monkeypatch, 2)
    with pytest.raises(_Crash):
        run_main("enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 4, "--deterministic"])
    monkeypatch.undo()
    res = run_main(
        "enhanced",
        [
            *TINY,
            "--data-dir",
            tiny_cifar,
            "--epochs",
            4,
            "--deterministic",
            "-b",
            new_batch,
            "--resume",
            out / "last.pt",
        ],
    )
    assert res.code == 0, res.err
    resumed, straight = read_metrics(out / "metrics.csv"), read_metrics(onecycle4 / "metrics.csv")
    lr = [float(r["lr"]) for r in straight]
    assert lr[0] > lr[1] > lr[2] > lr[3]  # one-cycle at each epoch's end: 0.94, 0.81, 0.28, 0 of --lr
    for epoch in (3, 4):  # lr after the epoch's last step = lr(epochs done), whatever the steps per epoch
        assert float(resumed[epoch - 1]["lr"]) == pytest.approx(lr[epoch - 1], rel=1e-9), epoch


def test_lr_factor_is_a_function_of_progress():
    args = mobilenetv4_enhanced.build_parser().parse_args(
        ["--epochs", "10", "--warmup-epochs", "2", "--sched", "cosine"]
    )
    floor = args.min_lr / args.lr
    assert mobilenetv4_enhanced.lr_factor(args, 0.0) == pytest.approx(floor)
    assert mobilenetv4_enhanced.lr_factor(args, 1.0) == pytest.approx((1 + floor) / 2)
    assert mobilenetv4_enhanced.lr_factor(args, 2.0) == pytest.approx(1.0)
    assert mobilenetv4_enhanced.lr_factor(args, 6.0) == pytest.approx((1 + floor) / 2)
    assert mobilenetv4_enhanced.lr_factor(args, 10.0) == pytest.approx(floor)


def test_onecycle_schedule_shape():
    args = mobilenetv4_enhanced.build_parser().parse_args(["--sched", "onecycle", "--epochs", "10"])
    factor = [mobilenetv4_enhanced.lr_factor(args, e / 4) for e in range(41)]
    peak = factor.index(max(factor))
    assert factor[0] == pytest.approx(1 / 25) and factor[peak] == pytest.approx(1.0) and peak == 12  # 30% of 10
    assert all(a < b for a, b in zip(factor[:peak], factor[1 : peak + 1]))  # rises ...
    assert all(a > b for a, b in zip(factor[peak:], factor[peak + 1 :]))  # ... then falls
    assert factor[-1] == pytest.approx(args.min_lr / args.lr)


def test_sgd_onecycle_run(tiny_cifar, tmp_path):
    train("enhanced", tiny_cifar, tmp_path / "r", 2, "--opt", "sgd", "--sched", "onecycle", "--lr", "0.05")
    groups = load(tmp_path / "r" / "last.pt")["optimizer"]["param_groups"]
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in groups)
    lrs = [float(r["lr"]) for r in read_metrics(tmp_path / "r" / "metrics.csv")]
    down = 0.5 * (1 + math.cos(math.pi * 0.2 / 0.7))  # after 1 of 2 epochs: 0.2 / 0.7 of the way down
    assert lrs[0] == pytest.approx(0.05 * down + 1e-6 * (1 - down), rel=1e-6)
    assert lrs[1] == pytest.approx(1e-6, rel=1e-6)
    res = run_main(
        "enhanced",
        [
            *TINY,
            "--data-dir",
            tiny_cifar,
            "--output-dir",
            tmp_path / "bad",
            "--sched",
            "onecycle",
            "--warmup-epochs",
            "1",
        ],
    )
    assert res.code == 2
    assert_one_error_line(res.err, "--warmup-epochs")


def test_a_skipped_step_leaves_the_learning_rate_on_its_curve(tiny_cifar, tmp_path, monkeypatch):
    """--skip-nonfinite: the enhanced rate is a function of progress, skipped steps included. Before the fix a
    skipped step also skipped scheduler.step(), so the next step trained at the rate meant for the skipped one,
    and a skip on an epoch's last step left lr_end one step behind (the run's last: not --min-lr)."""
    used = []  # (progress before the step, rate it trains with): should_skip runs before each optimizer step
    should_skip = common.Run.should_skip

    def recording(self, loss):
        used.append(
            (
                self.loop.epoch + self.loop.step / self.loop.steps_per_epoch(),
                self.keeper.optimizer.param_groups[0]["lr"],
            )
        )
        return should_skip(self, loss)

    monkeypatch.setattr(common.Run, "should_skip", recording)
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", nan_criterion_at(STEPS_PER_EPOCH + 2))  # epoch 2, step 2
    out = tmp_path / "run"
    res = run_main(
        "enhanced",
        [
            *TINY,
            "--data-dir",
            tiny_cifar,
            "--output-dir",
            out,
            "--epochs",
            2,
            "--skip-nonfinite",
            "--sched",
            "cosine",
            "--lr",
            "0.1",
        ],
    )
    assert res.code == 0, res.err
    args = mobilenetv4_enhanced.parse_args(["--sched", "cosine", "--lr", "0.1", "--epochs", "2"])
    assert len(used) == 2 * STEPS_PER_EPOCH
    for progress, lr in used:
        assert lr == pytest.approx(0.1 * mobilenetv4_enhanced.lr_factor(args, progress), rel=1e-9), progress
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", nan_criterion_at(2 * STEPS_PER_EPOCH))  # the last step
    out = tmp_path / "last"
    res = run_main(
        "enhanced", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2, "--skip-nonfinite"]
    )
    assert res.code == 0, res.err
    rows = read_metrics(out / "metrics.csv")
    assert rows[-1]["skipped_steps"] == "1" and float(rows[-1]["lr"]) == pytest.approx(1e-6, rel=1e-9)


def test_test_only_of_an_ema_checkpoint_scores_the_ema_without_the_flag(enh_learned, tiny_cifar):
    run_dir, _ = enh_learned
    logged = read_metrics(run_dir / "metrics.csv")[-1]
    flags = [f for f in ENH_LEARN if f != "--model-ema"]
    res = run_main("enhanced", [*flags, "--data-dir", tiny_cifar, "--test-only", "--resume", run_dir / "last.pt"])
    assert res.code == 0, res.err
    assert res.summary["evaluated"] == "ema"
    assert res.summary["test_acc"] == float(logged["test_acc"])


def test_test_only_with_model_ema_on_a_checkpoint_without_ema_scores_its_weights(learned, tiny_cifar):
    """The baseline checkpoint evaluated by the enhanced script (same model flags) with --model-ema: before the
    fix it scored the untrained copy AveragedModel made at start."""
    run_dir, _ = learned
    logged = float(read_metrics(run_dir / "metrics.csv")[-1]["test_acc"])
    assert logged >= 30.0  # far from what untrained weights score
    same_model = ["--act", "relu6", "--no-se", "--head", "linear", "--dropout", "0.2", "--drop-path", "0"]
    res = run_main(
        "enhanced",
        [*LEARN, *same_model, "--data-dir", tiny_cifar, "--model-ema", "--test-only", "--resume", run_dir / "last.pt"],
    )
    assert res.code == 0, res.err
    assert res.summary["evaluated"] == "model"
    assert res.summary["test_acc"] == logged


def test_ema_warm_up_follows_the_trained_weights():
    """Fixed decay 0.999 keeps ~98% of the initial weights after 20 updates; the warm-up (timm ModelEmaV3's
    min(decay, (1 + t) / (10 + t))) has the average follow what training moved to."""
    model = nn.Linear(4, 4)
    nn.init.zeros_(model.weight)
    ema = common.ModelEma(model, 0.999)
    nn.init.ones_(model.weight)
    for _ in range(20):
        ema.update_parameters(model)
    assert ema.module.weight.mean().item() > 0.85
    for _ in range(10_000):  # after the warm-up (t > 8,990) the configured decay rules
        ema.update_parameters(model)
    nn.init.zeros_(model.weight)
    ema.update_parameters(model)
    assert ema.module.weight.mean().item() == pytest.approx(0.999, abs=1e-4)


def test_ema_equals_averaged_model_with_the_warm_up_and_keeps_its_checkpoint_layout():
    """The EMA computes exactly what torch's AveragedModel does with the same warm-up (its reference), weights and
    BatchNorm buffers alike, and its state has AveragedModel's layout, so checkpoints of either load in both."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))

    def warmed_up(ema_params, params, num_averaged):
        t = int(num_averaged)
        get_ema_multi_avg_fn(min(0.99, (1 + t) / (10 + t)))(ema_params, params, num_averaged)

    reference = AveragedModel(model, multi_avg_fn=warmed_up, use_buffers=True)
    ema = common.ModelEma(model, 0.99)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(30):
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(model)
        reference.update_parameters(model)
        assert ema.state_dict().keys() == reference.state_dict().keys()
        for key, value in reference.state_dict().items():  # after every update, the first (a copy) included
            assert torch.equal(ema.state_dict()[key], value), (step, key)
        if step == 14:  # resume half-way from a checkpoint of each kind
            ema = common.ModelEma(model, 0.99)
            ema.load_state_dict({k: v.clone() for k, v in reference.state_dict().items()})
    partial = {k: v for k, v in reference.state_dict().items() if k != "n_averaged"}
    with pytest.raises(RuntimeError, match="n_averaged"):  # a state missing a key is refused, not half-loaded
        common.ModelEma(model, 0.99).load_state_dict(partial)


def test_ema_of_a_short_run_scores_like_the_raw_weights(enh_learned, tiny_cifar):
    """100 steps with --model-ema: the EMA (what is reported) must have learned too; without warm-up it stayed
    near the initial weights (chance) while the raw weights learned."""
    run_dir, run = enh_learned
    ckpt = load(run_dir / "last.pt")
    raw, _ = common.model_from_checkpoint({**ckpt, "ema": None})
    data = common.load_cifar10(tiny_cifar, download=False).subset(None, 40)
    _, raw_acc, _ = common.evaluate(raw, data.test_images, data.test_labels)
    assert raw_acc >= 30.0
    assert run.summary["evaluated"] == "ema"
    assert run.summary["test_acc"] >= raw_acc - 15.0, (run.summary["test_acc"], raw_acc)


def test_weight_decay_groups_by_kind():
    model = common.mobilenetv4("hybrid_medium", width_mult=0.25, se=True, head="mlp")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = common.weight_decay_groups(model, 0.05, 0.0)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    decay_names = [names[id(p)] for p in decay["params"]]
    assert len(no_decay_names) + len(decay_names) == len(names)  # every parameter exactly once
    assert any(n.endswith("gamma") for n in no_decay_names)  # layer scale: (C, 1, 1), caught by kind
    bn = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert set(no_decay_names) == bn | {n for n in names.values() if n.endswith((".bias", ".gamma"))}
    assert all(p.ndim in (2, 4) for p in decay["params"])  # conv and linear weights only


@pytest.mark.parametrize("script,wd", [("baseline", 1e-4), ("enhanced", 5e-4)])
def test_scripts_leave_norm_and_bias_out_of_weight_decay(script, wd, tiny_cifar, tmp_path):
    res = train(script, tiny_cifar, tmp_path / "default", 1)
    groups = load(tmp_path / "default" / "last.pt")["optimizer"]["param_groups"]
    model = common.model_from_args(SCRIPTS[script].build_parser().parse_args(TINY))
    exempt = [
        p
        for m in model.modules()
        for n, p in m.named_parameters(recurse=False)
        if isinstance(m, nn.BatchNorm2d) or n == "bias"
    ]
    assert [g["weight_decay"] for g in groups] == [wd, 0.0]
    assert len(groups[1]["params"]) == len(exempt)
    assert res.summary["config"]["args"]["norm_weight_decay"] == 0.0
    # The notebook's behaviour, one flag away, recorded in config.json
    train(script, tiny_cifar, tmp_path / "all", 1, "--norm-weight-decay", wd)
    groups = load(tmp_path / "all" / "last.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [wd, wd]
    assert json.loads((tmp_path / "all" / "config.json").read_text())["args"]["norm_weight_decay"] == wd


@pytest.mark.parametrize("script,wd", [("baseline", 1e-4), ("enhanced", 0.05)])
def test_recipe_notebook_is_the_notebooks_recipe_one_flag_away(script, wd, tiny_cifar, tmp_path):
    """--recipe notebook: the public notebook's exact recipe (weight decay on every parameter); flags given beside
    it still win; config.json records the recipe."""
    module = SCRIPTS[script]
    default, notebook = module.parse_args([]), module.parse_args(["--recipe", "notebook"])
    assert (default.recipe, default.norm_weight_decay) == ("project", 0.0)
    assert (notebook.recipe, notebook.norm_weight_decay, notebook.wd) == ("notebook", wd, wd)
    assert {k: getattr(notebook, k) for k in module.RECIPES["notebook"]} == module.RECIPES["notebook"]
    assert common.augment_config(notebook) == common.AugmentConfig()  # the notebook's torchvision list
    assert module.parse_args(["--recipe", "notebook", "--norm-weight-decay", "0"]).norm_weight_decay == 0.0
    train(script, tiny_cifar, tmp_path / "nb", 1, "--recipe", "notebook")
    assert [g["weight_decay"] for g in load(tmp_path / "nb" / "last.pt")["optimizer"]["param_groups"]] == [wd, wd]
    assert json.loads((tmp_path / "nb" / "config.json").read_text())["args"]["recipe"] == "notebook"


@pytest.mark.parametrize(
    "recipe,run", [("project", "enhanced-w1.6-20ep-seed0"), ("project", "enhanced-w1.6-20ep-seed1")]
)
def test_recipes_are_what_their_committed_runs_trained(recipe, run):
    """The default recipe equals the recorded settings (config.json under results/) of the runs that measured it,
    the README headline's full runs, so a default moved without the runs that measured it fails here. (Earlier
    recipes' runs replay through --config: the replay tests below.)"""
    saved = json.loads((ROOT / "results" / run / "config.json").read_text())["args"]
    budget = ["--max-train-samples", str(saved["max_train_samples"])] if saved["max_train_samples"] else []
    seed = ["--seed", str(saved["seed"])]  # a run's seed is its own, not its recipe's
    args = mobilenetv4_enhanced.parse_args(["--recipe", recipe, *budget, *seed])
    assert study_plan.settings_diff(saved, args) == []
    # A study reads every TTA from one table; a full run's headline TTA is its recipe's
    if not budget:
        assert saved["tta"] == args.tta


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
def test_help_shows_every_default_once(script):
    parser = SCRIPTS[script].build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert text.count("default") == 1, f"{action.option_strings[-1]}: {text!r}"
        if action.default is not None and "(default: " in text and not isinstance(action.default, bool):
            shown = text.rsplit("(default: ", 1)[1][:-1]
            assert shown == str(action.default), (action.option_strings, shown)
    recipe = SCRIPTS[script].RECIPE
    help_text = " ".join(parser.format_help().split())  # unwrapped
    for flag, key in (
        ("--epochs", "epochs"),
        ("--lr", "lr"),
        ("--variant", "variant"),
        ("--act", "act"),
        ("--head", "head"),
        ("--width-mult", "width_mult"),
    ):
        assert f"(default: {recipe[key]})" in help_text, flag


def test_resume_of_a_checkpoint_holding_other_gpus_rng_state(tiny_cifar, tmp_path):
    """A mid-epoch checkpoint written on a CUDA machine, resumed on CPU: its CUDA states are not applicable."""
    out = tmp_path / "run"
    train("baseline", tiny_cifar, out, 1)
    ckpt = load(out / "last.pt")
    ckpt["step"], ckpt["partial"] = 1, {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "skipped": 0, "time": 0.0}
    ckpt["rng"] = [{"cpu": torch.get_rng_state(), "cuda": torch.zeros(16, dtype=torch.uint8)}]
    torch.save(ckpt, out / "mid.pt")
    res = run_main(
        "baseline", [*TINY, "--data-dir", tiny_cifar, "--output-dir", out, "--epochs", 2, "--resume", out / "mid.pt"]
    )
    assert res.code == 0, res.err
    assert "epoch 2, step 1" in res.out


def test_restoring_rng_where_fewer_gpus_are_visible(monkeypatch):
    """Restoring the state of 8 GPUs where one is visible raised IndexError (simulated: torch.cuda patched just
    for the restore). Only the training device's state is saved and restored: on the CPU the CPU generator comes
    back and no CUDA state is touched; on GPU 0 its one saved state goes to that GPU."""
    eight_gpus = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = []

    def one_visible_gpu(states):
        if len(states) > 1:
            raise IndexError("list index out of range")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", one_visible_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.append((state, device)))
    saved = torch.get_rng_state()
    expected = torch.rand(3)
    common.set_rng_state({"cpu": saved, "cuda": eight_gpus}, torch.device("cpu"))  # a CUDA checkpoint on CPU
    assert torch.equal(torch.rand(3), expected) and restored == []
    gpu0 = torch.device("cuda", 0)
    common.set_rng_state({"cpu": saved, "cuda": eight_gpus[3]}, gpu0)  # one GPU's state, resumed on GPU 0
    assert torch.equal(torch.rand(3), expected)
    assert len(restored) == 1 and torch.equal(restored[0][0], eight_gpus[3]) and restored[0][1] == gpu0


def test_rng_state_holds_only_the_training_device():
    state = common.rng_state(torch.device("cpu"))
    assert set(state) == {"cpu"}
    before = torch.rand(3)
    common.set_rng_state(state, torch.device("cpu"))
    common.set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)}, torch.device("cpu"))  # skipped
    assert torch.equal(torch.rand(3), before)


@pytest.fixture(scope="module")
def one_epoch_of_two(tiny_cifar, tmp_path_factory):
    """{script: run folder} after epoch 1 of --epochs 2: a checkpoint to resume."""
    runs = {}
    for script in ("baseline", "enhanced"):
        runs[script] = tmp_path_factory.mktemp(f"half-{script}") / "run"
        train(script, tiny_cifar, runs[script], 1)
    return runs


@pytest.mark.parametrize(
    "script,flag,value",
    [
        ("enhanced", "--lr", "0.05"),
        ("enhanced", "--wd", "1e-3"),
        ("enhanced", "--momentum", "0.8"),
        ("enhanced", "--opt", "adamw"),
        ("baseline", "--lr", "5e-4"),
        ("baseline", "--lr-step-size", "3"),
    ],
)
def test_resume_refuses_optimizer_settings_the_checkpoint_overrides(script, flag, value, one_epoch_of_two, tiny_cifar):
    """The optimizer's and scheduler's saved states carry lr, weight decay, momentum, betas and StepLR's period:
    loading them silently replaced the new flag (a resume with --lr 0.05 trained at the old 0.1, ended at neither
    floor, and config.json said 0.05). Refused now, in one line naming the flag; the checkpoint is untouched."""
    ckpt = one_epoch_of_two[script] / "last.pt"
    before = ckpt.read_bytes()
    res = run_main(
        script, [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--deterministic", flag, value, "--resume", ckpt]
    )
    assert res.code == 2, res.err
    assert_one_error_line(res.err, flag)
    assert ckpt.read_bytes() == before
    # The same flags as the checkpoint's still resume (--epochs may change: it re-plans the schedule).
    res = run_main(
        script,
        [
            *TINY,
            "--data-dir",
            tiny_cifar,
            "--epochs",
            2,
            "--deterministic",
            "--resume",
            ckpt,
            "--output-dir",
            one_epoch_of_two[script].parent / f"again-{flag}",
        ],
    )
    assert res.code == 0, res.err


def test_resume_refuses_adding_or_dropping_the_weight_ema(one_epoch_of_two, tiny_cifar, tmp_path):
    """A resume without --model-ema dropped the checkpoint's average: the raw weights were evaluated from then on,
    best.pt compared their accuracy with the average's best_acc, and summary.json said 'model'. Adding it part-way
    started an average of the last epochs only, reported as the run's EMA. Both are refused in one line naming
    the flag; the checkpoint is untouched."""
    with_ema = tmp_path / "ema"
    train("enhanced", tiny_cifar, with_ema, 1, "--model-ema", "--no-tta-table")
    assert load(with_ema / "last.pt")["ema"] is not None
    for ckpt, flags in ((with_ema / "last.pt", []), (one_epoch_of_two["enhanced"] / "last.pt", ["--model-ema"])):
        before = ckpt.read_bytes()
        args = [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--deterministic", *flags, "--resume", ckpt]
        res = run_main("enhanced", args)
        assert res.code == 2, res.err
        assert_one_error_line(res.err, "--model-ema")
        assert ckpt.read_bytes() == before
    # The checkpoint's own setting resumes, and the average goes on from the saved one.
    again = tmp_path / "again"
    train("enhanced", tiny_cifar, again, 2, "--model-ema", "--no-tta-table", "--resume", with_ema / "last.pt")
    assert load(again / "last.pt")["ema"]["n_averaged"] > load(with_ema / "last.pt")["ema"]["n_averaged"]


def test_fp16_loss_scale_survives_a_resume(tiny_cifar, tmp_path):
    """--amp fp16 keeps a GradScaler whose scale adapts over the run; a checkpoint without it restarted the scale
    at 2**16 on resume, so the next steps overflowed and were skipped: not the run that was interrupted."""
    out = tmp_path / "run"
    train("enhanced", tiny_cifar, out, 1, "--amp", "fp16", "--no-tta-table")  # epoch 1 of 2; epoch 2 after resume
    ckpt = load(out / "last.pt")
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    ckpt["scaler"]["scale"] = 1024.0  # as if overflows had lowered it
    torch.save(ckpt, out / "last.pt")
    res = run_main(
        "enhanced",
        [
            *TINY,
            "--data-dir",
            tiny_cifar,
            "--epochs",
            2,
            "--deterministic",
            "--amp",
            "fp16",
            "--no-tta-table",
            "--resume",
            out / "last.pt",
        ],
    )
    assert res.code == 0, res.err
    resumed = load(out / "last.pt")
    assert resumed["epoch"] == 2  # the resumed scale was used for an epoch of fp16 steps
    assert resumed["scaler"]["scale"] in (1024.0, 512.0, 256.0)  # restored (maybe lowered), not 2**16


@pytest.mark.parametrize(
    "flag,value,named",
    [("-b", "8", "batch-size 16"), ("--seed", "1", "seed 0"), ("--max-train-samples", "48", "max-train-samples 64")],
)
def test_mid_epoch_resume_refuses_another_batch_order(flag, value, named, one_epoch_of_two, tiny_cifar, tmp_path):
    """A mid-epoch checkpoint replays the rest of its epoch's batch order, which batch size, seed and sample count
    fix: another value is refused (an epoch-end checkpoint accepts them)."""
    ckpt = load(one_epoch_of_two["enhanced"] / "last.pt")
    ckpt["step"] = 2  # as if stopped after 2 of the epoch's 4 steps
    torch.save(ckpt, tmp_path / "mid.pt")
    res = run_main(
        "enhanced",
        [
            *TINY,
            "--data-dir",
            tiny_cifar,
            "--epochs",
            2,
            flag,
            value,
            "--resume",
            tmp_path / "mid.pt",
            "--output-dir",
            tmp_path / "out",
        ],
    )
    assert res.code == 2, res.err
    assert_one_error_line(res.err, f"stopped mid-epoch with {named}")


NOT_REPLAYED = {"argv", "config", "output_dir", "resume", "overwrite", "test_only"}


COMMITTED = sorted(
    p for p in (ROOT / "results").rglob("config.json") if json.loads(p.read_text()).get("script") in SCRIPTS
)


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
    assert {k: resolved[k] for k in set(resolved) - set(expected)} == {
        k: defaults[k] for k in set(resolved) - set(expected)
    }


def replayed_main(script, argv):
    """(exit code, summary, stderr) of main(argv)."""
    res = run_main(script, argv)
    return res.code, res.summary, res.err


def test_a_replayed_run_trains_what_it_recorded_and_flags_beside_it_win(tiny_cifar, tmp_path):
    first = tmp_path / "first"
    flags = [
        "--width-mult",
        "0.25",
        "-b",
        "16",
        "--max-train-samples",
        "64",
        "--max-test-samples",
        "32",
        "--device",
        "cpu",
        "--no-download",
        "--data-dir",
        tiny_cifar,
        "--epochs",
        1,
        "--no-tta-table",
        "--recipe",
        "notebook",
        "--lr",
        "3e-3",
        "--seed",
        "4",
    ]
    code, summary, err = replayed_main("enhanced", [*flags, "--output-dir", first])
    assert code == 0, err
    config = first / "config.json"
    code, replay, err = replayed_main("enhanced", ["--config", config, "--output-dir", tmp_path / "replay"])
    assert code == 0, err
    assert (
        replay["test_acc"] == summary["test_acc"]
        and replay["config"]["model_summary"] == summary["config"]["model_summary"]
    )
    replayed = json.loads((tmp_path / "replay" / "config.json").read_text())["args"]
    assert comparable(replayed) == comparable(json.loads(config.read_text())["args"])
    assert replayed["recipe"] == "notebook" and replayed["lr"] == 3e-3 and replayed["seed"] == 4
    code, _, err = replayed_main("enhanced", ["--config", config, "--seed", 5, "--output-dir", tmp_path / "other"])
    assert code == 0, err
    assert json.loads((tmp_path / "other" / "config.json").read_text())["args"]["seed"] == 5


@pytest.mark.parametrize(
    "content, words", [(None, "cannot read"), ("[1, 2]", "not a config.json"), ("{broken", "cannot read")]
)
def test_a_bad_config_is_one_error_line(content, words, tmp_path):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    code, _, err = replayed_main("baseline", ["--config", path])
    assert code == 2 and err.count("\n") == 1 and "--config" in err and words in err, err


def test_a_config_of_the_other_script_is_refused(tmp_path):
    enhanced = next(p for p in COMMITTED if json.loads(p.read_text())["script"] == "enhanced")
    code, _, err = replayed_main("baseline", ["--config", enhanced])
    assert code == 2 and err.count("\n") == 1 and "lacks" in err and "betas" in err, err


def test_best_pt_keeps_the_first_of_equally_accurate_epochs(tiny_cifar, tmp_path, monkeypatch):
    """The README's 'best (epoch)' and headline.py's 'best + TTA' name the first epoch that reached the best
    accuracy; with ties (a small test set makes them common), best.pt must hold that epoch, not a later one."""
    monkeypatch.setattr(mnv4.evaluation.Evaluator, "epoch", lambda self: (1.0, 50.0))
    train("enhanced", tiny_cifar, tmp_path / "run", 3, "--no-tta-table")
    assert load(tmp_path / "run" / "best.pt")["epoch"] == 1 and load(tmp_path / "run" / "last.pt")["epoch"] == 3
