"""MobileNetV4 on CIFAR-10, baseline recipe: the public notebook's plain training, on the real architecture.

Conv-S with the CIFAR stem, ReLU6, linear head, no augmentation, cross-entropy, Adam + StepLR.
"""

import torch
from torch import nn

import common

# ---- The recipe (every entry is a flag) -------------------------------------------------------------
# fmt: off
RECIPE = dict(
    variant="conv_small", width_mult=1.0, act="relu6", se=False, drop_path=0.0, head="linear", dropout=0.2,
    augment=False, epochs=20, batch_size=128,
    lr=1e-3, wd=1e-4,                    # Adam, L2 weight decay as in the notebook ...
    norm_weight_decay=0.0,               # ... but not on norm / bias / layer-scale parameters (timm, torchvision)
    lr_step_size=30, lr_gamma=0.1,       # StepLR in epochs (never fires within 20 epochs, as in the notebook)
    label_smoothing=0.0, clip_grad_norm=0.0, tta="flip",
)
# fmt: on
# The public notebook's exact recipe (--recipe notebook): it decayed every parameter alike.
RECIPES = {"project": RECIPE, "notebook": {**RECIPE, "norm_weight_decay": RECIPE["wd"]}}


def build_parser(recipe_name="project"):
    parser = common.build_parser(RECIPES, recipe_name, __doc__)
    recipe = RECIPES[recipe_name]
    group = parser.add_argument_group("schedule")
    group.add_argument("--lr-step-size", type=int, default=recipe["lr_step_size"], help="StepLR period (epochs)")
    group.add_argument("--lr-gamma", type=float, default=recipe["lr_gamma"], help="StepLR decay factor")
    return parser


def parse_args(argv=None):
    return common.parse_args(
        build_parser(common.chosen_recipe(RECIPES, argv)),
        argv,
        limits=[("lr_step_size", 1, 10**6, True), ("lr_gamma", 0, 1, False)],
    )


@common.command_line
def main(argv=None):
    args = parse_args(argv)
    # What a resume must keep: the optimizer's and StepLR's saved states hold these and would win over a new value.
    must_match = ("lr", "wd", "norm_weight_decay", "lr_step_size", "lr_gamma")
    with common.Run(args, "baseline", must_match) as run:
        model = run.prepare(common.model_from_args(args))
        params = common.weight_decay_groups(run.model, args.wd, args.norm_weight_decay)
        optimizer = torch.optim.Adam(params, lr=args.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
        criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        scaler = run.grad_scaler
        start_epoch = run.resume(optimizer, scheduler)
        if args.test_only:
            return run.finish()

        for epoch in range(start_epoch, args.epochs):
            model.train()
            for images, labels in run.batches(epoch):
                with run.autocast():
                    logits = model(images)
                    loss = criterion(logits, labels)
                if run.should_skip(loss):
                    continue
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if args.clip_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                run.step_done(loss, logits, labels)
            scheduler.step()
            run.end_epoch(epoch)
        return run.finish()


if __name__ == "__main__":
    main()
