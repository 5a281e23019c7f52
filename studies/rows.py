"""The studies' rows as data: each row a training run of one script with its flags (or a TTA view of another
row's runs), and the row its gain is measured against. The settings the rows build on are spelled as flags on the
notebook's recipe, which never moves, so a row keeps its meaning (and its committed runs) when the project's
default changes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """One table row: a training run of `script` with `flags`, or (script None) a TTA accuracy read from
    the runs of row `source`. The gain is measured against row `reference` (its `reference_tta` accuracy
    when set, else its own headline)."""

    key: str  # folder name and --configs name
    label: str
    claimed: str = "-"  # the notebook README's claimed gain
    script: str | None = None
    flags: tuple = ()
    source: str | None = None
    tta: str | None = None  # None: summary["test_acc"] (final epoch, no TTA)
    reference: str | None = None
    reference_tta: str | None = None


def cumulative():
    """The notebook README's order; the model flags accumulate on the baseline script."""
    steps = [
        ("se", "+ SE", "+3-4%", ("--se",)),
        ("drop_path", "+ stochastic depth", "+2-3%", ("--drop-path", "0.1")),
        ("silu", "+ SiLU", "+1-2%", ("--act", "silu")),
        ("width", "+ width 1.2", "+2-3%", ("--width-mult", "1.2")),
        ("mlp_head", "+ MLP head", "+1-2%", ("--head", "mlp", "--dropout", "0.3")),
    ]  # the enhanced head
    rows, flags = [Config("baseline", "baseline", script="baseline")], ()
    for key, label, claimed, new in steps:
        flags += new
        rows.append(Config(key, label, claimed, "baseline", flags, reference=rows[-1].key))
    # The same model plus the notebook's training recipe (and its own batch size 64): --recipe notebook, so the
    # row stays the notebook's whatever the project's defaults become. Its --tta flip only sets the script's
    # printed headline (the row reads test_acc, without TTA) and keeps flip in a short TTA table
    # (--no-tta-table) for the + TTA row.
    rows.append(
        Config(
            "train_opts",
            "+ training optimizations",
            "+3-4%",
            "enhanced",
            ("--recipe", "notebook"),
            reference="mlp_head",
        )
    )
    rows.append(Config("tta", "+ TTA (flip)", "+1-2%", source="train_opts", tta="flip", reference="train_opts"))
    return tuple(rows)


# v3, the enhanced default before width 1.6, spelled as flags on the notebook's recipe, which never moves: the rows
# built on it keep their meaning (and their runs) when the project's default changes. The notebook decays norm /
# bias weights; v3 does not. SGD couples --wd as L2: 5e-4 is the usual CIFAR value (AdamW's 0.05 would be far
# too strong).
NOTEBOOK_BASE = ("--recipe", "notebook", "--norm-weight-decay", "0")
SGD_ONECYCLE = ("--opt", "sgd", "--sched", "onecycle", "--lr", "0.1", "--wd", "5e-4")
FLIP_TRANSLATE = ("--rotation", "0", "--color-jitter", "0", "0", "0", "0", "--crop-padding", "0")


def v3_row():
    """v3, the enhanced default until its width became 1.6 (Conv-S at the notebook's width 1.2): the reference of
    the leave-one-out and architecture studies. Its key names the run folders that already hold its runs (keys
    are folder names), so it stays whatever the label says; a test checks that its flags still give the settings
    those runs recorded."""
    return Config(
        "v2_no_crop",
        "v3 (default until width 1.6)",
        script="enhanced",
        flags=NOTEBOOK_BASE + SGD_ONECYCLE + FLIP_TRANSLATE,
    )


def leave_one_out():
    """Each ingredient of v3 switched off alone. Keys carry the prefix of the reference's other rows, so
    they never name a folder of an earlier study's rows (other settings, which the plan would refuse)."""
    ref = v3_row()

    def off(key, label, *flags, base=ref.flags):
        return Config(key, label, script="enhanced", flags=base + flags, reference=ref.key)

    def tta(key, label, views):  # the reference runs' own TTA table, against v3's view set
        return Config(key, label, source=ref.key, tta=views, reference=ref.key, reference_tta="flip_shift")

    return (
        ref,
        off("nocrop_no_se", "no SE", "--no-se"),
        off("nocrop_no_drop_path", "no stochastic depth", "--drop-path", "0"),
        off("nocrop_relu6", "ReLU6 instead of SiLU", "--act", "relu6"),
        off("nocrop_width_1.0", "width 1.0", "--width-mult", "1.0"),
        off("nocrop_linear_head", "linear head", "--head", "linear", "--dropout", "0.2"),  # the baseline's head
        # The scripts reject augmentation ops beside --no-augment (they would do nothing): the row leaves them out.
        off("nocrop_no_augment", "no augmentation", "--no-augment", base=NOTEBOOK_BASE + SGD_ONECYCLE),
        off("nocrop_no_flip", "no horizontal flip (translate only)", "--hflip", "0"),
        off("nocrop_no_translate", "no translation (flip only)", "--translate", "0"),
        off("nocrop_no_label_smoothing", "no label smoothing", "--label-smoothing", "0"),
        off("nocrop_no_clip", "no gradient clipping", "--clip-grad-norm", "0"),
        off("nocrop_no_weight_decay", "no weight decay", "--wd", "0"),
        off("nocrop_constant_lr", "constant lr 0.1 instead of one-cycle", "--sched", "constant"),
        tta("nocrop_no_tta", "no TTA (against flip_shift)", "none"),
        tta("nocrop_tta_flip", "TTA flip (against flip_shift)", "flip"),
    )


def architecture():
    """Where the compute goes and how much of it, under v3's recipe: the final map (resolution),
    a larger MobileNetV4 at similar MACs (capacity), and the MobileNetV2 peer the notebook trained."""
    ref = v3_row()

    def change(key, label, *flags):
        return Config(key, label, script="enhanced", flags=ref.flags + flags, reference=ref.key)

    return (
        ref,
        change("conv_s_8x8", "Conv-S, 8x8 final map (--output-stride 4)", "--output-stride", "4"),
        change("conv_m_w1.0", "Conv-M, width 1.0 (4x4 map)", "--variant", "conv_medium", "--width-mult", "1.0"),
        change("mobilenetv2", "MobileNetV2 (4x4 map)", "--variant", "mobilenetv2"),
        change("mobilenetv2_8x8", "MobileNetV2, 8x8 final map", "--variant", "mobilenetv2", "--output-stride", "4"),
    )


def series_of(cfg: Config, by_key: dict) -> tuple:
    """(run key, TTA mode) of the numbers a row reads; and of those its gain is measured against."""
    mine = (cfg.source or cfg.key, cfg.tta)
    if cfg.reference is None:
        return mine, None
    ref = by_key[cfg.reference]
    return mine, (ref.source or ref.key, cfg.reference_tta or ref.tta)


NOTES = {
    "cumulative": "Gain = this row minus the previous row. Rows up to '+ MLP head' run mobilenetv4_baseline.py "
    "(Adam + StepLR, no augmentation); '+ training optimizations' runs mobilenetv4_enhanced.py with "
    "the notebook's recipe (--recipe notebook: augmentation, label smoothing 0.1, AdamW with decay on "
    "every parameter, cosine, clipping 1.0) on the same model. "
    "Each script keeps its own default batch size (column 'run'), as it is part of its recipe: the "
    "'+ training optimizations' gain includes the change from batch 128 to 64. "
    "'+ TTA' is the flip TTA accuracy of the previous row's run, against that run's plain accuracy.",
    "leave-one-out": "Gain = this row minus v3, the enhanced default until width 1.6 (negative: the ingredient "
    "helps). Every row runs mobilenetv4_enhanced.py with v3's settings spelled as flags (the notebook's "
    "recipe plus v3's changes, so the rows keep their meaning when the default moves) "
    "and one ingredient switched off. TTA rows read the reference runs' TTA table and compare "
    "with its flip_shift TTA (v3's).",
    "architecture": "Gain = this row minus v3, the enhanced default until width 1.6 (Conv-S, width 1.2, 4x4 final "
    "map; positive: the architecture does better). Every row runs mobilenetv4_enhanced.py with v3's "
    "settings spelled as flags (the leave-one-out study's reference, whose runs it shares) and one "
    "change of architecture; the recipe (SE, SiLU, MLP head, width 1.2 where not stated, SGD + "
    "one-cycle, flip + translate) stays.",
}
