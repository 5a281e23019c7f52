"""Throughput benchmark: our on-device pipeline against the notebook's torchvision/DataLoader pipeline.

Measures, in one run on one machine, the enhanced script's model under two of its recipes, each read from
mobilenetv4_enhanced.py's own parser (so the figures follow its defaults): the notebook's (`--recipe notebook`:
AdamW; crop, flip, rotation, colour jitter, translate) and the script's default (no flags: Nesterov SGD; flip,
translate). For each recipe:
  1. augmentation images/s of the recipe's ops: torchvision per-sample PIL transforms (DataLoader, 0 and N
     workers) vs ours;
  2. end-to-end training images/s (forward, loss, backward, gradient clipping, the recipe's optimizer step):
     notebook-style loop (DataLoader + PIL transforms + eager fp32) vs ours with the script defaults, and, for
     the default recipe, ours with each option (channels_last, bf16 autocast, torch.compile);
then 3. inference images/s at batch 256 and latency at batch 1 for the default recipe's model.
Records the load average before and after the measurements (a warning when the machine was not idle). Prints a
markdown table and writes JSON (`--json PATH`) with each recipe's `aug_speedup` and `train_speedup`.

    python benchmarks/throughput.py [--quick] [--device auto] [--data-dir data] [--json PATH]
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import mobilenetv4_enhanced  # noqa: E402

DEFAULT_RECIPE = common.chosen_recipe(mobilenetv4_enhanced.RECIPES, [])  # what the script runs given no flags
RECIPE_NAMES = ("notebook", DEFAULT_RECIPE)
BUSY_LOAD = 0.5  # a 1-minute load average above this: other work shared the CPUs during the measurement
SETTINGS = (
    "variant",
    "width_mult",
    "output_stride",
    "act",
    "se",
    "drop_path",
    "head",
    "dropout",
    "batch_size",
    "opt",
    "lr",
    "wd",
    "norm_weight_decay",
    "betas",
    "momentum",
    "label_smoothing",
    "clip_grad_norm",
)


def recipe_args(name):
    """The flags mobilenetv4_enhanced.py runs with under `--recipe NAME` and no other flag."""
    return mobilenetv4_enhanced.build_parser(name).parse_args([])


def recipe_augment(recipe):
    """The recipe's augmentation ops (None: no augmentation), as the training script derives them."""
    return common.augment_config(recipe) if recipe.augment else None


def pil_transforms(cfg):
    """`cfg`'s ops as the notebook wrote its augmentation: per-sample torchvision PIL transforms, in our order."""
    from torchvision import transforms as T

    ops = []
    if cfg is not None:
        if cfg.cutout:  # ours fills with the mean after normalising: no torchvision transform does the same work
            raise ValueError("cutout has no counterpart in the notebook's torchvision pipeline")
        if cfg.crop_padding:
            ops.append(T.RandomCrop(32, padding=cfg.crop_padding))
        if cfg.flip_prob:
            ops.append(T.RandomHorizontalFlip(cfg.flip_prob))
        if cfg.rotation:
            ops.append(T.RandomRotation(cfg.rotation))
        jitter = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        if any(jitter):
            ops.append(T.ColorJitter(*jitter))
        if cfg.translate:
            ops.append(T.RandomAffine(0, translate=(cfg.translate, cfg.translate)))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(common.CIFAR10_MEAN, common.CIFAR10_STD)])


class PilCifar(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's access pattern: uint8 HWC array -> PIL image -> transforms of `cfg`."""

    def __init__(self, images, labels, cfg):
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, 32, 32, 3]
        self.labels = labels.tolist()
        self.transform = pil_transforms(cfg)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def timed(fn, repeats, device):
    """Median wall time of `fn` over `repeats` runs after one warm-up; device-synchronised."""
    fn()
    times = []
    for _ in range(repeats):
        common.synchronize(device)
        start = time.perf_counter()
        fn()
        common.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pil_loader(dataset, batch_size, workers):
    """The notebook-style DataLoader over full batches (the last partial one is dropped, as ours drops it). Its
    workers persist between timed passes: restarting them each pass (a fresh torch import per worker on macOS's
    spawn) would be timed as data loading."""
    return torch.utils.data.DataLoader(
        dataset, batch_size, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )


def loader_images(dataset, batch_size, workers):
    """One pass over the dataset's full batches."""
    loader = pil_loader(dataset, batch_size, workers)

    def run():
        for _ in loader:
            pass

    return run


def bench_augmentation(data, device, n_images, repeats, recipe):
    """Images/s of the recipe's augmentation, batched and normalised: torchvision PIL DataLoader vs ours."""
    cfg, batch = recipe_augment(recipe), recipe.batch_size
    subset = data.subset(n_images)
    done = n_images // batch * batch  # images each pass yields: full batches only
    dataset = PilCifar(subset.train_images, subset.train_labels, cfg)
    results = {}
    for workers in sorted({0, os.cpu_count() or 1}):
        t = timed(loader_images(dataset, batch, workers), repeats, device)
        results[f"torchvision PIL, {workers} workers"] = done / t
    on_device = subset.to(device)
    t = timed(lambda: [b for b in common.train_batches_for_epoch(on_device, batch, 0, 0, 0, cfg)], repeats, device)
    results["ours (batched, on device)"] = done / t
    return results


def train_step_fn(model, optimizer, criterion, clip_grad_norm, autocast_dtype, device):
    def step(images, labels):
        with common.precision_context(device, autocast_dtype):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()

    return step


def make_trainer(device, recipe, channels_last=False, autocast_dtype=None, compile_model=False):
    """One training step as mobilenetv4_enhanced.py takes it under `recipe`: its model, loss, gradient clipping
    and optimizer (with its weight-decay groups). The learning rate stays at --lr: a schedule changes the values
    a step computes, not its cost."""
    torch.manual_seed(0)
    model = common.model_from_args(recipe).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = mobilenetv4_enhanced.make_optimizer(
        recipe, common.weight_decay_groups(model, recipe.wd, recipe.norm_weight_decay)
    )
    step = train_step_fn(
        torch.compile(model) if compile_model else model,
        optimizer,
        nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
        recipe.clip_grad_norm,
        autocast_dtype,
        device,
    )
    return step


def bench_training(data, device, steps, repeats, options, recipe):
    """Images/s over `steps` optimizer steps of the recipe: notebook-style loop, then ours with each option."""
    batch, cfg = recipe.batch_size, recipe_augment(recipe)
    n_images = steps * batch
    subset = data.subset(n_images)
    dataset = PilCifar(subset.train_images, subset.train_labels, cfg)
    results = {}
    step = make_trainer(device, recipe)
    for workers in sorted({0, os.cpu_count() or 1}):
        loader = pil_loader(dataset, batch, workers)

        def notebook_epoch():
            for images, labels in loader:  # noqa: B023 (called in this iteration, with its own loader)
                step(images.to(device), labels.to(device))

        seconds = timed(notebook_epoch, repeats, device)
        results[f"notebook loop (DataLoader {workers} workers, PIL, fp32)"] = n_images / seconds
    on_device = subset.to(device)
    for name, kwargs in options:
        try:
            step = make_trainer(device, recipe, **kwargs)
        except Exception as exc:  # e.g. compile without a working compiler: report, keep going
            results[name] = f"failed: {type(exc).__name__}"
            continue

        def ours_epoch():
            for images, labels in common.train_batches_for_epoch(on_device, batch, 0, 0, 0, cfg):
                if kwargs.get("channels_last"):  # noqa: B023 (called in this iteration)
                    images = images.contiguous(memory_format=torch.channels_last)
                step(images, labels)  # noqa: B023 (called in this iteration)

        try:
            results[name] = n_images / timed(ours_epoch, repeats, device)
        except Exception as exc:
            results[name] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
    return results


@torch.no_grad()
def bench_inference(device, repeats, channels_last):
    """Eval-mode forward of the default recipe's model: batch-256 images/s and batch-1 latency."""
    torch.manual_seed(0)
    model = common.model_from_args(recipe_args(DEFAULT_RECIPE)).to(device).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    big = torch.randn(256, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    one = torch.randn(1, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    t_big = timed(lambda: model(big), repeats, device)
    t_one = timed(lambda: model(one), max(repeats, 20), device)
    return {"inference img/s (batch 256)": 256 / t_big, "latency ms (batch 1)": t_one * 1e3}


DEFAULTS_NAME = "ours (script defaults)"


def training_options(device, quick):
    """The scripts' defaults on this device first, then each option alone on top of plain fp32."""
    defaults = {
        "channels_last": common.default_channels_last(device),
        "autocast_dtype": common.autocast_dtype(device, "auto"),
    }
    options = [(DEFAULTS_NAME, defaults), ("ours fp32, contiguous", {})]
    channels_last_ok = common.channels_last_allowed(device)
    if channels_last_ok:
        options.append(("ours + channels_last", {"channels_last": True}))
    elif not quick:
        print(f"no channels_last rows: {common.MPS_CHANNELS_LAST}")
    dtype, why = common.reduced_precision(device)  # bf16 where native, else fp16 on a GPU; none where torch can't
    if dtype is not None:
        options.append((f"ours + {common.AMP_NAMES[dtype]} autocast", {"autocast_dtype": dtype}))
    elif not quick:
        print(f"no reduced-precision row: {why}")
    if not quick:
        compiled = "ours + channels_last + torch.compile" if channels_last_ok else "ours + torch.compile"
        options.append((compiled, {"channels_last": channels_last_ok, "compile_model": True}))
    return options


def sizes(quick, device):
    """(images for each augmentation test, training steps per row, repeats): --quick is a smoke test's sizes."""
    aug_images, steps, repeats = (1024, 4, 3) if quick else (4096, 24, 3)
    scale = 4 if device.type == "cuda" else 1
    return aug_images * scale, steps * scale, repeats


def markdown(sections: dict) -> str:
    lines = ["| measurement | value |", "|---|---|"]
    for section, rows in sections.items():
        for name, value in rows.items():
            shown = f"{value:,.1f}" if isinstance(value, float) else str(value)
            lines.append(f"| {section}: {name} | {shown} |")
    return "\n".join(lines)


def busy_warning(load_1min: float):
    """The line to print when the machine was not idle before the run, else None."""
    if load_1min > BUSY_LOAD:
        return (
            f"warning: 1-minute load average {load_1min:.2f} before the run (above {BUSY_LOAD}): other work "
            f"shared the CPUs, so these are not an idle machine's figures"
        )
    return None


def speedups(results: dict) -> dict:
    """Ours over the torchvision pipeline, from one recipe's figures: > 1 means ours is faster."""
    aug, train = results["augmentation img/s"], results["training img/s"]
    notebook = max(v for k, v in train.items() if k.startswith("notebook"))
    ours_best = max(v for k, v in train.items() if k.startswith("ours") and isinstance(v, float))
    return {
        "aug_speedup": aug["ours (batched, on device)"] / aug["torchvision PIL, 0 workers"],
        "aug_speedup_vs_best_loader": aug["ours (batched, on device)"]
        / max(v for k, v in aug.items() if k.startswith("torchvision")),
        "train_speedup": train[DEFAULTS_NAME] / notebook,
        "train_speedup_best_option": ours_best / notebook,
    }


def recipe_settings(recipe) -> dict:
    cfg = recipe_augment(recipe)
    return {
        **{key: getattr(recipe, key) for key in SETTINGS},
        "augmentation": None if cfg is None else dataclasses.asdict(cfg),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no compile: a smoke test, not a measurement")
    parser.add_argument("--device", default="auto", choices=common.DEVICES)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--json", default="benchmarks/throughput.json", help="where the JSON results go")
    args = parser.parse_args(argv)
    try:
        device = common.select_device(args.device)
        common.seed_everything(0, deterministic=False)  # cuDNN autotuned, as in every training run
        data = common.load_cifar10(args.data_dir, download=False)
    except common.UserError as exc:
        parser.exit(2, f"error: {exc}\n")
    # Read when the measurement starts: the code measured is what the process loaded then, whatever changes meanwhile.
    provenance = common.provenance(device)
    aug_images, steps, repeats = sizes(args.quick, device)
    recipes = {name: recipe_args(name) for name in RECIPE_NAMES}
    options = training_options(device, args.quick)
    load_before = os.getloadavg()
    results = {}
    for name, recipe in recipes.items():
        # The options change how the model runs, not the recipe: measured once, on the default recipe.
        results[name] = {
            "augmentation img/s": bench_augmentation(data, device, aug_images, repeats, recipe),
            "training img/s": bench_training(
                data, device, steps, repeats, options if name == DEFAULT_RECIPE else options[:1], recipe
            ),
        }
    inference = bench_inference(device, repeats, common.default_channels_last(device))
    load_after = os.getloadavg()
    report = {
        "provenance": provenance,
        "quick": args.quick,
        "cpu_count": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "recipes": {
            name: {"settings": recipe_settings(recipe), "results": results[name], **speedups(results[name])}
            for name, recipe in recipes.items()
        },
        "inference": inference,
        "inference_recipe": DEFAULT_RECIPE,
        "train_defaults": {k: str(v) for k, v in dict(training_options(device, True))[DEFAULTS_NAME].items()},
    }
    print(
        f"\n## Throughput on {common.device_name(device)} ({device}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__})\n"
    )
    print(
        "load average (1, 5, 15 min): before "
        + " ".join(f"{x:.2f}" for x in load_before)
        + ", after "
        + " ".join(f"{x:.2f}" for x in load_after)
        + f"; {os.cpu_count()} CPUs"
    )
    warning = busy_warning(load_before[0])
    if warning:
        print(warning)
    sections = {f"{name} recipe, {section}": rows for name in recipes for section, rows in results[name].items()}
    print("\n" + markdown({**sections, f"inference ({DEFAULT_RECIPE} recipe's model)": inference}))
    for name, recipe in report["recipes"].items():
        print(
            f"\n{name} recipe: aug_speedup (ours / torchvision 1 process) = {recipe['aug_speedup']:.1f}x; "
            f"vs best DataLoader = {recipe['aug_speedup_vs_best_loader']:.1f}x"
        )
        print(
            f"{name} recipe: train_speedup (ours with the script defaults / best notebook loop) = "
            f"{recipe['train_speedup']:.2f}x; best option = {recipe['train_speedup_best_option']:.2f}x"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
