"""The finished studies of the enhanced recipe's earlier defaults, as data: their rows' runs are committed under
results/ablation-proxy-5k, so `--report-only` rewrites their tables from the saved per-seed numbers, and any row
trains again from the same flags. The defaults they studied are spelled as flags on the notebook's recipe (the
names those recipes once had are gone); a test checks that each row's flags still give the settings its
committed runs recorded.

  v1  the first enhanced default: the notebook's recipe without weight decay on norm / bias parameters
      (AdamW + cosine, all five augmentation ops)
  v2  v1 with Nesterov SGD + one-cycle and flip + crop + translate only (the candidates study's stacked row)
  v3  v2 without the random crop (rows.v3_row), the default until its width became 1.6
"""

from __future__ import annotations

from .rows import FLIP_TRANSLATE, NOTEBOOK_BASE, SGD_ONECYCLE, Config, v3_row

LIGHT_AUGMENT = FLIP_TRANSLATE[: FLIP_TRANSLATE.index("--crop-padding")]  # no rotation, no colour jitter
V1 = NOTEBOOK_BASE
V2 = V1 + SGD_ONECYCLE + LIGHT_AUGMENT
FULL = Config("full", "full recipe", script="enhanced", flags=V1)  # v1, the reference of the first two studies


def on(base: Config, key: str, label: str, *flags: str) -> Config:
    """A training row: `base`'s flags plus `flags`, its gain measured against `base`."""
    return Config(key, label, script="enhanced", flags=base.flags + flags, reference=base.key)


def tta(key: str, label: str, views: str) -> Config:
    """A TTA row: the full recipe's runs evaluated with `views`, against their flip TTA (v1's own)."""
    return Config(key, label, source=FULL.key, tta=views, reference=FULL.key, reference_tta="flip")


def candidates():
    """Changes to v1 one at a time, then the two that helped, stacked (which became v2)."""
    return (
        FULL,
        on(FULL, "ema", "+ EMA of weights (warm-up)", "--model-ema"),
        on(FULL, "flip_translate", "flip + crop + translate only", *LIGHT_AUGMENT),
        on(FULL, "cutout16", "+ cutout 16 px", "--cutout", "16"),
        on(FULL, "label_smoothing_0.2", "label smoothing 0.2", "--label-smoothing", "0.2"),
        on(FULL, "decay_norm_bias", "weight decay on norm / bias too", "--norm-weight-decay", "0.05"),
        on(FULL, "batch128", "batch 128, lr 2e-3 (linear scaling)", "-b", "128", "--lr", "2e-3"),
        on(FULL, "batch256", "batch 256, lr 4e-3 (linear scaling)", "-b", "256", "--lr", "4e-3"),
        on(FULL, "warmup", "+ warm-up (1 epoch)", "--warmup-epochs", "1"),
        on(FULL, "lr_2e-3", "peak lr 2e-3", "--lr", "2e-3"),
        on(FULL, "sgd_onecycle", "Nesterov SGD + one-cycle, lr 0.1", *SGD_ONECYCLE),
        Config(
            "sgd_onecycle_flip_translate",
            "SGD + one-cycle and flip + crop + translate only",
            script="enhanced",
            flags=V2,
            reference=FULL.key,
        ),
        tta("tta_flip_shift", "TTA flip_shift", "flip_shift"),
    )


def leave_one_out_v1():
    """Each ingredient of v1 switched off alone; its TTA rows read the full recipe's TTA table."""
    return (
        FULL,
        on(FULL, "no_se", "no SE", "--no-se"),
        on(FULL, "no_drop_path", "no stochastic depth", "--drop-path", "0"),
        on(FULL, "relu6", "ReLU6 instead of SiLU", "--act", "relu6"),
        on(FULL, "width_1.0", "width 1.0", "--width-mult", "1.0"),
        on(FULL, "linear_head", "linear head", "--head", "linear", "--dropout", "0.2"),
        on(FULL, "no_augment", "no augmentation", "--no-augment"),
        on(FULL, "no_crop", "no random crop", "--crop-padding", "0"),
        on(FULL, "no_flip", "no horizontal flip", "--hflip", "0"),
        on(FULL, "no_rotation", "no rotation", "--rotation", "0"),
        on(FULL, "no_jitter", "no colour jitter", "--color-jitter", "0", "0", "0", "0"),
        on(FULL, "no_translate", "no translation", "--translate", "0"),
        on(FULL, "no_label_smoothing", "no label smoothing", "--label-smoothing", "0"),
        on(FULL, "adam", "Adam instead of AdamW", "--opt", "adam", "--wd", "1e-4"),
        on(FULL, "constant_lr", "constant LR instead of cosine", "--sched", "constant"),
        on(FULL, "no_clip", "no gradient clipping", "--clip-grad-norm", "0"),
        tta("no_tta", "no TTA", "none"),
        on(FULL, "ema", "+ EMA of weights", "--model-ema"),
        on(FULL, "warmup", "+ warm-up (1 epoch)", "--warmup-epochs", "1"),
        tta("tta_flip_rot90", "TTA flip_rot90", "flip_rot90"),
        tta("tta_flip_shift", "TTA flip_shift", "flip_shift"),
    )


def tuning():
    """Changes to v2 (the candidates study's stacked row and its runs); its no-crop row became v3."""
    v2 = Config("sgd_onecycle_flip_translate", "v2 (default until no crop)", script="enhanced", flags=V2)
    no_crop = v3_row().flags[len(V2) :]
    return (
        v2,
        on(v2, "v2_ema", "+ EMA of weights (warm-up)", "--model-ema"),
        on(v2, "v2_label_smoothing_0.2", "label smoothing 0.2", "--label-smoothing", "0.2"),
        on(v2, "v2_no_drop_path", "no stochastic depth", "--drop-path", "0"),
        on(v2, v3_row().key, "no random crop (translate only)", *no_crop),
    )


def tuning_2():
    """The step size of v3 (the tuning study's no-crop row and its runs)."""
    ref = v3_row()
    return (
        ref,
        on(ref, "nocrop_lr_0.2", "peak lr 0.2", "--lr", "0.2"),
        on(ref, "nocrop_lr_0.05", "peak lr 0.05", "--lr", "0.05"),
        on(ref, "nocrop_batch128", "batch 128, lr 0.2 (linear scaling)", "-b", "128", "--lr", "0.2"),
    )


NOTES = {
    "candidates": "Gain = this row minus the full recipe, v1 (positive: the change helps). v1 is the project's first "
    "enhanced default: the notebook's recipe without weight decay on norm / bias parameters (AdamW + cosine, all "
    "five augmentation ops), spelled as flags; every row adds one change, the last training row the two that "
    "helped (v2). 'TTA flip_shift' reads the full recipe's TTA table against its flip TTA.",
    "leave-one-out-v1": "Gain = this row minus the full recipe, v1 (negative: the ingredient helped; rows marked "
    "'+' add an option to it). v1 is the notebook's recipe without weight decay on norm / bias parameters, spelled "
    "as flags; every row switches one ingredient off. TTA rows read the full recipe's TTA table against its flip "
    "TTA (v1's own), so 'no TTA' shows what flip TTA buys.",
    "tuning": "Gain = this row minus v2, the enhanced default this study tuned (positive: the change helps): v1 "
    "plus Nesterov SGD + one-cycle and flip + crop + translate only, spelled as flags (the candidates study's "
    "stacked row, whose runs it shares), with one change per row. Its no-crop row became the default (v3).",
    "tuning-2": "Gain = this row minus v3, the enhanced default until width 1.6 (positive: the change helps): v2 "
    "without the random crop, spelled as flags (the tuning study's no-crop row, whose runs it shares), with one "
    "change of step size or batch per row.",
}
