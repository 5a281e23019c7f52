"""The two scripts' optimizers, learning-rate schedules and loss options against torch's own implementations:
one-cycle and cosine against torch.optim.lr_scheduler, --sched constant, --opt adam against torch.optim.Adam,
the baseline's StepLR decay (--lr-step-size, --lr-gamma) through a resume, label smoothing against
nn.CrossEntropyLoss and gradient clipping against the gradients' own norm, and --eval-batch-size."""

import shutil
import time

import pytest
import torch
from torch import nn

import common
import mnv4.checkpoint
import mobilenetv4_enhanced
from helpers import MD5_WARNING, STEPS_PER_EPOCH, TINY, load, read_metrics, run_main, train

pytestmark = pytest.mark.filterwarnings(f"ignore:{MD5_WARNING}")


def enhanced_args(*flags):
    return mobilenetv4_enhanced.parse_args([str(f) for f in flags])


def torch_lrs(scheduler, steps: int) -> list[float]:
    """The learning rate of each of `steps` optimizer steps and the one after the last, as torch schedules it."""
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def optimizer_at(lr):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_onecycle_is_torchs_onecycle_lr():
    """lr_factor(progress) after k of T steps is torch's OneCycleLR (cosine both ways, no momentum cycling) with
    its step counter re-based: torch reaches the peak at step pct_start * total_steps - 1 and the floor at step
    total_steps - 1, this schedule at 30% of T and at T. So total_steps = T + 1 and pct_start = (0.3 T + 1) / (T + 1)
    give the same curve, step for step (a linear warm-up instead of the cosine one is 0.28 where torch is 0.18 a
    quarter of the way up)."""
    epochs, steps_per_epoch, lr, min_lr = 10, 20, 0.1, 1e-6
    args = enhanced_args("--sched", "onecycle", "--epochs", epochs, "--lr", lr, "--min-lr", min_lr)
    total = epochs * steps_per_epoch
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer_at(lr),
        max_lr=lr,
        total_steps=total + 1,
        pct_start=(0.3 * total + 1) / (total + 1),
        anneal_strategy="cos",
        div_factor=25,
        final_div_factor=lr / 25 / min_lr,
        cycle_momentum=False,
    )
    expected = torch_lrs(reference, total)
    ours = [lr * mobilenetv4_enhanced.lr_factor(args, k / steps_per_epoch) for k in range(total + 1)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lr * mobilenetv4_enhanced.lr_factor(args, epochs * 1.5) == pytest.approx(min_lr)  # stays at the floor
    # a quarter of the way up, by hand: 1 - (1 - 1/25) (1 + cos(pi / 4)) / 2
    assert ours[15] / lr == pytest.approx(1 - 0.96 * (1 + 2**-0.5) / 2, rel=1e-12)


def test_cosine_after_warm_up_is_torchs_linear_then_cosine_annealing():
    """--sched cosine --warmup-epochs W: LinearLR from --min-lr to --lr over W epochs, then CosineAnnealingLR down
    to --min-lr at --epochs."""
    epochs, warmup, steps_per_epoch, lr, min_lr = 6, 2, 5, 0.2, 1e-3
    args = enhanced_args(
        "--sched", "cosine", "--epochs", epochs, "--warmup-epochs", warmup, "--lr", lr, "--min-lr", min_lr
    )
    rise = torch.optim.lr_scheduler.LinearLR(
        optimizer_at(lr), start_factor=min_lr / lr, end_factor=1.0, total_iters=warmup * steps_per_epoch
    )
    fall = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer_at(lr), T_max=(epochs - warmup) * steps_per_epoch, eta_min=min_lr
    )
    expected = torch_lrs(rise, warmup * steps_per_epoch)[:-1] + torch_lrs(fall, (epochs - warmup) * steps_per_epoch)
    ours = [lr * mobilenetv4_enhanced.lr_factor(args, k / steps_per_epoch) for k in range(epochs * steps_per_epoch + 1)]
    assert ours == pytest.approx(expected, rel=1e-9)
    assert lr * mobilenetv4_enhanced.lr_factor(args, epochs + 1.5) == pytest.approx(min_lr)  # stays at the floor


def test_constant_schedule_is_flat_after_its_warm_up():
    args = enhanced_args("--sched", "constant", "--epochs", 4, "--warmup-epochs", 1, "--lr", 0.1, "--min-lr", 0.01)
    factors = [mobilenetv4_enhanced.lr_factor(args, k / 4) for k in range(17)]
    assert factors[:5] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0])  # linear from 0.01 / 0.1 up to 1
    assert factors[4:] == [1.0] * 13


def adam_step_params(optimizer_factory, steps=3):
    """The weights of a small model after `steps` steps of the optimizer the factory builds from its parameter
    groups (weight decay on conv/linear weights only, as the scripts group them), with fixed gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(2, 3, 5, 5))
    optimizer = optimizer_factory(common.weight_decay_groups(model, 0.1, 0.0))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_opt_builds_torchs_optimizer(name):
    """--opt adam is torch's Adam (L2 weight decay coupled into the gradient), adamw AdamW (decoupled), sgd
    Nesterov SGD with --momentum: the same weights after three steps as the torch optimizer built directly."""
    args = enhanced_args("--opt", name, "--lr", 0.01, "--betas", 0.8, 0.9, "--momentum", 0.7)
    reference = {
        "adam": lambda groups: torch.optim.Adam(groups, lr=0.01, betas=(0.8, 0.9)),
        "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01, betas=(0.8, 0.9)),
        "sgd": lambda groups: torch.optim.SGD(groups, lr=0.01, momentum=0.7, nesterov=True),
    }
    ours = adam_step_params(lambda groups: mobilenetv4_enhanced.make_optimizer(args, groups))
    for name_other, factory in reference.items():
        same = all(torch.equal(a, b) for a, b in zip(ours, adam_step_params(factory)))
        assert same == (name_other == name), name_other


def test_constant_schedule_with_adam_trains_at_lr(tiny_cifar, tmp_path):
    """A run with --opt adam --sched constant: every step trains at --lr, and the checkpoint holds Adam's state."""
    used = []
    step_done = common.Run.step_done

    def recording(self, loss, logits, labels):
        used.append(self.keeper.optimizer.param_groups[0]["lr"])
        return step_done(self, loss, logits, labels)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common.Run, "step_done", recording)
        train("enhanced", tiny_cifar, tmp_path / "r", 1, "--opt", "adam", "--sched", "constant", "--lr", "2e-3")
    assert used == [2e-3] * STEPS_PER_EPOCH
    optimizer = load(tmp_path / "r" / "last.pt")["optimizer"]
    assert all(g["betas"] == (0.9, 0.999) and "nesterov" not in g for g in optimizer["param_groups"])
    assert all(int(s["step"]) == STEPS_PER_EPOCH for s in optimizer["state"].values())


def steplr_per_epoch(lr, step_size, gamma, epochs):
    """(the rate each epoch trains at, the rate logged after it) as torch's StepLR steps it once per epoch."""
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer_at(lr), step_size=step_size, gamma=gamma)
    lrs = torch_lrs(scheduler, epochs)
    return lrs[:-1], lrs[1:]


STEP_FLAGS = ["--lr-step-size", "2", "--lr-gamma", "0.25", "--lr", "4e-3"]


def test_baseline_steplr_decays_as_torchs_through_a_resume(tiny_cifar, tmp_path):
    """Epoch 1, then --resume to 3 epochs, recording the rate of every step: each epoch trains at the rate torch's
    StepLR gives it (4e-3, 4e-3, then x 0.25 after epoch 2), and metrics.csv logs the rate after each epoch. StepLR's
    epoch count comes back with the checkpoint: the decay falls after epoch 2 of the run, not of the process."""
    used = []
    step_done = common.Run.step_done

    def recording(self, loss, logits, labels):
        used.append(self.keeper.optimizer.param_groups[0]["lr"])
        return step_done(self, loss, logits, labels)

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common.Run, "step_done", recording)
        train("baseline", tiny_cifar, out, 1, *STEP_FLAGS)
        res = run_main(
            "baseline",
            [
                *TINY,
                "--data-dir",
                tiny_cifar,
                "--epochs",
                3,
                "--deterministic",
                *STEP_FLAGS,
                "--resume",
                out / "last.pt",
            ],
        )
    assert res.code == 0, res.err
    trained_at, logged = steplr_per_epoch(4e-3, 2, 0.25, 3)
    assert trained_at == pytest.approx([4e-3, 4e-3, 1e-3], rel=1e-12)  # by hand
    assert used == [lr for lr in trained_at for _ in range(STEPS_PER_EPOCH)]
    assert [float(r["lr"]) for r in read_metrics(out / "metrics.csv")] == pytest.approx(logged, rel=1e-12)


def record_steps(patch):
    """Per optimizer step: (loss the loop computed, logits, labels, L2 norm of the gradients it stepped with)."""
    steps = []
    step_done = common.Run.step_done

    def recording(self, loss, logits, labels):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
        steps.append((loss.detach().clone(), logits.detach().clone(), labels.clone(), norm))
        return step_done(self, loss, logits, labels)

    patch.setattr(common.Run, "step_done", recording)
    return steps


@pytest.mark.parametrize("script", ["baseline", "enhanced"])
@pytest.mark.parametrize("smoothing, clip", [(0.2, 1e-3), (0.0, 0.0)])
def test_label_smoothing_and_gradient_clipping_in_the_loop(script, smoothing, clip, tiny_cifar, tmp_path):
    """The loss each step trains on is nn.CrossEntropyLoss(label_smoothing=...) of its logits, and the gradients
    the optimizer steps with have norm --clip-grad-norm (far below their own: clipped) or, with 0, are left alone."""
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        steps = record_steps(patch)
        train(
            script,
            tiny_cifar,
            tmp_path / "r",
            1,
            "--label-smoothing",
            smoothing,
            "--clip-grad-norm",
            clip,
            "--no-tta-table",
        )
    assert len(steps) == STEPS_PER_EPOCH
    # metrics.csv's training figures are those of the steps (equal batches: the mean loss, correct over seen)
    row = read_metrics(tmp_path / "r" / "metrics.csv")[0]
    correct = sum(int((logits.argmax(1) == labels).sum()) for _, logits, labels, _ in steps)
    assert float(row["train_acc"]) == pytest.approx(100 * correct / (16 * STEPS_PER_EPOCH))
    assert float(row["train_loss"]) == pytest.approx(sum(float(loss) for loss, *_ in steps) / STEPS_PER_EPOCH)
    assert 0 < float(row["epoch_time_s"]) < time.perf_counter() - started  # the epoch's share of the run
    assert float(row["img_per_s"]) == pytest.approx(16 * STEPS_PER_EPOCH / float(row["epoch_time_s"]), rel=1e-3)
    for loss, logits, labels, norm in steps:
        torch.testing.assert_close(loss, nn.CrossEntropyLoss(label_smoothing=smoothing)(logits, labels))
        if smoothing:
            assert (loss - nn.functional.cross_entropy(logits, labels)).abs() > 1e-3
        if clip:
            assert norm == pytest.approx(clip, rel=1e-4)
        else:
            assert norm > 10 * 1e-3  # untouched: far above what clipping at 1e-3 would leave


def test_eval_batch_size_batches_evaluation_and_changes_no_result(base1, tiny_cifar, tmp_path):
    """--eval-batch-size 7 on 32 test images: the model sees batches of 7, 7, 7, 7, 4 per view, and every figure
    equals the default (500) run's."""
    seen = []
    build = common.model_from_args

    def model_recording_eval_batches(args):
        model = build(args)
        model.register_forward_pre_hook(lambda m, inputs: None if m.training else seen.append(inputs[0].shape[0]))
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "model_from_args", model_recording_eval_batches)
        res = train("baseline", tiny_cifar, tmp_path / "r", 1, "--eval-batch-size", 7)
    views = 1 + 11  # the epoch's evaluation, then the 11 TTA views besides the identity (reused)
    assert seen[0] == 1  # the model summary's one-image pass, counting MACs
    assert seen[1:] == [7, 7, 7, 7, 4] * views
    reference = base1[1].summary
    assert res.summary["test_acc"] == reference["test_acc"]
    for mode, row in reference["tta_table"].items():
        assert res.summary["tta_table"][mode]["test_acc"] == pytest.approx(row["test_acc"]), mode


def test_a_format_1_checkpoint_is_refused_with_retrain(base1, tiny_cifar, tmp_path):
    """Checkpoints of the old module layout (format 1) do not fit the model: refused in one line, whether resumed
    or evaluated."""
    ckpt = load(base1[0] / "last.pt")
    ckpt["version"] = 1
    torch.save(ckpt, tmp_path / "old.pt")
    for extra in ([], ["--test-only"]):
        res = run_main(
            "baseline",
            [*TINY, "--data-dir", tiny_cifar, "--output-dir", tmp_path / "o", *extra, "--resume", tmp_path / "old.pt"],
        )
        assert res.code == 2, res.err
        assert "older version" in res.err and "retrain" in res.err and res.err.count("\n") == 1, res.err
    with pytest.raises(common.UserError, match="older version"):
        common.load_checkpoint(tmp_path / "old.pt")


@pytest.mark.parametrize("cifar_stem, output_stride", [(True, 8), (False, 32)])
def test_a_checkpoint_recording_cifar_stem_reads_as_its_output_stride(cifar_stem, output_stride):
    """Before `output_stride`, checkpoints recorded `cifar_stem`: True was the CIFAR port (down-sampling by 8),
    False the ImageNet strides (32, the paper's)."""
    old = {"model_config": {"variant": "conv_small", "width_mult": 0.25, "cifar_stem": cifar_stem}}
    assert mnv4.checkpoint.saved_model_config(old) == {
        "variant": "conv_small",
        "width_mult": 0.25,
        "output_stride": output_stride,
    }
    assert mnv4.checkpoint.saved_model_config({"model_config": {"output_stride": 16}}) == {"output_stride": 16}


def test_a_cifar_stem_checkpoint_evaluates_and_resumes_as_the_run_it_was(base1, tiny_cifar, tmp_path):
    """base1's checkpoint rewritten as an older run recorded it (cifar_stem True for output stride 8): --test-only
    scores what the run scored, and a resume continues it; recorded as cifar_stem False it is another model."""
    for name in ("last.pt", "best.pt", "metrics.csv", "config.json"):
        shutil.copy(base1[0] / name, tmp_path / name)
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["model_config"].pop("output_stride") == 8
    ckpt["model_config"]["cifar_stem"] = True
    torch.save(ckpt, tmp_path / "last.pt")
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--test-only", "--resume", tmp_path / "last.pt"])
    assert res.code == 0, res.err
    assert res.summary["test_acc"] == base1[1].summary["test_acc"]
    model, _ = common.model_from_checkpoint(ckpt)  # what predict.py and export.py rebuild
    assert model.config["output_stride"] == 8
    res = run_main(
        "baseline",
        [*TINY, "--data-dir", tiny_cifar, "--epochs", 2, "--deterministic", "--resume", tmp_path / "last.pt"],
    )
    assert res.code == 0, res.err
    assert "epoch 2, step 0" in res.out
    ckpt["model_config"]["cifar_stem"] = False
    torch.save(ckpt, tmp_path / "strided.pt")
    res = run_main("baseline", [*TINY, "--data-dir", tiny_cifar, "--test-only", "--resume", tmp_path / "strided.pt"])
    assert res.code == 2 and "output_stride=32" in res.err, res.err
