"""Does the on-device augmentation train as well as the torchvision PIL pipeline it replaces?

Trains the enhanced model on the notebook's recipe (`--recipe notebook`: AdamW, cosine, all five augmentation ops,
label smoothing 0.1, clipping 1.0, batch 64; model, augmentation and batch size read from mobilenetv4_enhanced.py's
parser) twice per seed on the same images, once fed by torchvision's
per-sample PIL transforms in a DataLoader (the notebook's pipeline) and once by `common.train_batches_for_epoch`,
and prints test accuracy (no TTA) for each.

    python benchmarks/pipeline_accuracy.py --epochs 2 --max-train-samples 5000 --max-test-samples 2000 --seeds 0 1
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import throughput  # noqa: E402

import common  # noqa: E402


def train(pipeline, data, epochs, seed, device):
    recipe = throughput.recipe_args("notebook")
    batch, cfg = recipe.batch_size, throughput.recipe_augment(recipe)
    torch.manual_seed(seed)
    model = common.model_from_args(recipe).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * (data.train_images.shape[0] // batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    if pipeline == "torchvision":
        generator = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            throughput.PilCifar(data.train_images, data.train_labels, cfg),
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            generator=generator,
        )
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        batches = (
            loader if pipeline == "torchvision" else common.train_batches_for_epoch(data, batch, seed, epoch, 0, cfg)
        )
        for images, labels in batches:
            loss = criterion(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    elapsed = time.perf_counter() - start
    _, acc, _ = common.evaluate(model, data.test_images, data.test_labels)
    return acc, elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-train-samples", type=int, default=5000)
    parser.add_argument("--max-test-samples", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu")  # the PIL pipeline is CPU-bound; compare both on the same device
    # Read when the measurement starts: the code measured is what the process loaded then, whatever changes meanwhile.
    provenance = common.provenance(device)
    try:
        data = common.load_cifar10(args.data_dir, download=False)
    except common.UserError as exc:
        parser.exit(2, f"error: {exc}\n")
    data = data.subset(args.max_train_samples, args.max_test_samples)
    results = {"torchvision": [], "ours": []}
    for seed in args.seeds:
        for pipeline in results:
            acc, elapsed = train(pipeline, data, args.epochs, seed, device)
            results[pipeline].append(acc)
            print(f"seed {seed} {pipeline:>11}: test acc {acc:.2f}% ({elapsed:.0f} s)", flush=True)
    for pipeline, accs in results.items():
        spread = f" +- {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        print(f"{pipeline:>11}: {statistics.mean(accs):.2f}%{spread} over seeds {args.seeds}")
    if args.json:
        report = {"provenance": provenance, "args": vars(args), "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return results


if __name__ == "__main__":
    main()
