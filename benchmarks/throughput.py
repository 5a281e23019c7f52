"""Throughput benchmark: our on-device pipeline against the notebook's torchvision/DataLoader pipeline.

Measures, in one run on one machine:
  1. augmentation images/s: torchvision per-sample PIL transforms (DataLoader, 0 and N workers) vs ours;
  2. end-to-end training images/s for the enhanced model on the notebook's recipe (AdamW, all five augmentation
     ops, as `--recipe notebook`): notebook-style loop (DataLoader + PIL transforms +
     eager fp32) vs ours, and ours with each option (channels_last, bf16 autocast, torch.compile);
  3. inference images/s at batch 256 and latency at batch 1 for the enhanced model.
Prints a markdown table and writes JSON (`--json PATH`) with `aug_speedup` and `train_speedup`.

    python benchmarks/throughput.py [--quick] [--device auto] [--data-dir data] [--json PATH]
"""
import argparse
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

ENHANCED = dict(variant="conv_small", width_mult=1.2, act="silu", se=True, drop_path_rate=0.1, head="mlp")
BATCH = 64  # the enhanced recipe's batch size


def notebook_transforms():
    """The enhanced recipe's augmentation as the notebook wrote it: per-sample PIL transforms."""
    from torchvision import transforms as T
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.RandomRotation(15),
                      T.ColorJitter(0.2, 0.2, 0.2, 0.1), T.RandomAffine(0, translate=(0.1, 0.1)),
                      T.ToTensor(), T.Normalize(common.CIFAR10_MEAN, common.CIFAR10_STD)])


class PilCifar(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's access pattern: uint8 HWC array -> PIL image -> transforms."""

    def __init__(self, images, labels):
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()   # [N, 32, 32, 3]
        self.labels = labels.tolist()
        self.transform = notebook_transforms()

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


def loader_images(dataset, workers, n_images):
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=False)
    def run():
        seen = 0
        for images, _ in loader:
            seen += images.shape[0]
            if seen >= n_images:
                break
    return run


def bench_augmentation(data, device, n_images, repeats):
    subset = data.subset(n_images)
    dataset = PilCifar(subset.train_images, subset.train_labels)
    results = {}
    for workers in sorted({0, os.cpu_count() or 1}):
        t = timed(loader_images(dataset, workers, n_images), repeats, device)
        results[f"torchvision PIL, {workers} workers"] = n_images / t
    on_device = subset.to(device)
    t = timed(lambda: [b for b in common.train_batches_for_epoch(on_device, BATCH, 0, 0, 0, common.AugmentConfig())],
              repeats, device)
    results["ours (batched, on device)"] = (n_images // BATCH * BATCH) / t
    return results


def train_step_fn(model, optimizer, criterion, autocast_dtype, device):
    def step(images, labels):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


def make_trainer(device, channels_last=False, autocast_dtype=None, compile_model=False):
    torch.manual_seed(0)
    model = common.mobilenetv4(**ENHANCED).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    step = train_step_fn(torch.compile(model) if compile_model else model, optimizer,
                         nn.CrossEntropyLoss(label_smoothing=0.1), autocast_dtype, device)
    return step


def bench_training(data, device, steps, repeats, options):
    """Images/s over `steps` optimizer steps: notebook-style loop, then ours with each option."""
    n_images = steps * BATCH
    subset = data.subset(n_images)
    dataset = PilCifar(subset.train_images, subset.train_labels)
    results = {}
    step = make_trainer(device)
    for workers in sorted({0, os.cpu_count() or 1}):
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                             drop_last=True)
        def notebook_epoch():
            for images, labels in loader:
                step(images.to(device), labels.to(device))
        results[f"notebook loop (DataLoader {workers} workers, PIL, fp32)"] = n_images / timed(notebook_epoch, repeats, device)
    on_device = subset.to(device)
    for name, kwargs in options:
        try:
            step = make_trainer(device, **kwargs)
        except Exception as exc:  # e.g. compile without a working compiler: report, keep going
            results[name] = f"failed: {type(exc).__name__}"
            continue
        def ours_epoch():
            for images, labels in common.train_batches_for_epoch(on_device, BATCH, 0, 0, 0, common.AugmentConfig()):
                if kwargs.get("channels_last"):
                    images = images.contiguous(memory_format=torch.channels_last)
                step(images, labels)
        try:
            results[name] = n_images / timed(ours_epoch, repeats, device)
        except Exception as exc:
            results[name] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
    return results


@torch.no_grad()
def bench_inference(device, repeats, channels_last):
    torch.manual_seed(0)
    model = common.mobilenetv4(**ENHANCED).to(device).eval()
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
    defaults = {"channels_last": common.default_channels_last(device),
                "autocast_dtype": common.autocast_dtype(device, "auto")}
    options = [(DEFAULTS_NAME, defaults), ("ours fp32, contiguous", {}),
               ("ours + channels_last", {"channels_last": True})]
    if device.type in ("cpu", "mps") or torch.cuda.is_bf16_supported():
        options.append(("ours + bf16 autocast", {"autocast_dtype": torch.bfloat16}))
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        options.append(("ours + fp16 autocast", {"autocast_dtype": torch.float16}))
    if not quick:
        options.append(("ours + channels_last + torch.compile", {"channels_last": True, "compile_model": True}))
    return options


def sizes(quick, device):
    """(images for the augmentation test, training steps, repeats): --quick stays under two minutes on 2 cores."""
    aug_images, steps, repeats = (1024, 4, 3) if quick else (4096, 24, 3)
    scale = 4 if device.type == "cuda" else 1
    return aug_images * scale, steps * scale, repeats


def markdown(results: dict) -> str:
    lines = ["| measurement | value |", "|---|---|"]
    for section, rows in results.items():
        if isinstance(rows, dict):
            for name, value in rows.items():
                shown = f"{value:,.1f}" if isinstance(value, float) else str(value)
                lines.append(f"| {section}: {name} | {shown} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no compile: under two minutes on 2 cores")
    parser.add_argument("--device", default="auto", choices=common.DEVICES)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--json", default="benchmarks/throughput.json", help="where the JSON results go")
    args = parser.parse_args(argv)
    try:
        device = common.select_device(args.device)
        data = common.load_cifar10(args.data_dir, download=False)
    except common.UserError as exc:
        parser.exit(2, f"error: {exc}\n")
    aug_images, steps, repeats = sizes(args.quick, device)
    results = {"augmentation img/s": bench_augmentation(data, device, aug_images, repeats),
               "training img/s": bench_training(data, device, steps, repeats, training_options(device, args.quick)),
               "inference": bench_inference(device, repeats, common.default_channels_last(device))}
    aug, train = results["augmentation img/s"], results["training img/s"]
    tv_aug = max(v for k, v in aug.items() if k.startswith("torchvision"))
    tv_aug_single = aug["torchvision PIL, 0 workers"]
    notebook = max(v for k, v in train.items() if k.startswith("notebook"))
    ours_best = max(v for k, v in train.items() if k.startswith("ours") and isinstance(v, float))
    report = {
        "provenance": common.provenance(device), "quick": args.quick,
        "results": results,
        "aug_speedup": aug["ours (batched, on device)"] / tv_aug_single,
        "aug_speedup_vs_best_loader": aug["ours (batched, on device)"] / tv_aug,
        "train_defaults": {k: str(v) for k, v in dict(training_options(device, True))[DEFAULTS_NAME].items()},
        "train_speedup": train[DEFAULTS_NAME] / notebook,
        "train_speedup_best_option": ours_best / notebook,
    }
    print(f"\n## Throughput on {common.device_name(device)} ({device}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__})\n")
    print(markdown(results))
    print(f"\naug_speedup (ours / torchvision 1 process) = {report['aug_speedup']:.1f}x; "
          f"vs best DataLoader = {report['aug_speedup_vs_best_loader']:.1f}x")
    print(f"train_speedup (ours with the script defaults / best notebook loop) = {report['train_speedup']:.2f}x; "
          f"best option = {report['train_speedup_best_option']:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
