"""Model training-step speed: forward + backward + optimizer step of MobileNetV4 on synthetic batches.

Times the model each training script builds with no flags (the baseline's and the enhanced script's defaults,
read from their own parsers, so the figures follow them; `--variant` swaps the block table of both) in fp32 and
with each layout / precision option (median of several steps after warm-up, synchronised), so the defaults can be
chosen by measurement. The JSON records each model's configuration beside its figures.

    python benchmarks/model_step.py [--batch-size 128] [--steps 8] [--device auto] [--variant conv_small]
        [--fp32-only] [--json PATH]
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inference import default_models  # noqa: E402  (the same models; step_time trains a copy in train mode)

import common  # noqa: E402


def step_time(model, batch_size, steps, device, channels_last, amp_dtype):
    """Median seconds per training step of a copy of `model` (each option starts from the same weights)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(model).to(device).train().to(memory_format=fmt)
    images = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        common.synchronize(device)
        start = time.perf_counter()
        with common.precision_context(device, amp_dtype):
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        common.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_options(device, reduced_precision: bool = True) -> dict:
    """{label: (channels_last, autocast dtype)}: fp32, then the reduced precision training can run here (bf16, or
    fp16 on a GPU without native bf16; none where torch would run it as fp32 or fail), each contiguous and in
    channels_last where training allows that layout (not on MPS)."""
    dtype, why = common.reduced_precision(device) if reduced_precision else (None, "--fp32-only")
    if dtype is None:
        print(f"no reduced-precision rows: {why}")
    channels_last_ok = common.channels_last_allowed(device)
    if not channels_last_ok:
        print(f"no channels_last rows: {common.MPS_CHANNELS_LAST}")
    precisions = {"fp32": None} if dtype is None else {"fp32": None, common.AMP_NAMES[dtype]: dtype}
    options = {}
    for name, amp_dtype in precisions.items():
        options[name if amp_dtype is None else f"{name} autocast"] = (False, amp_dtype)
        if channels_last_ok:
            options[f"{name} channels_last"] = (True, amp_dtype)
    return options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=common.DEVICES)
    parser.add_argument("--variant", default="conv_small", choices=common.VARIANTS)
    parser.add_argument(
        "--fp32-only",
        action="store_true",
        help="leave out the reduced-precision rows (on a CPU without native bf16 they run many times slower)",
    )
    parser.add_argument("--json", default=None, help="also write the table, machine and commit to this JSON file")
    args = parser.parse_args(argv)
    device = common.select_device(args.device)
    common.seed_everything(0, deterministic=False)  # cuDNN autotuned, as in every training run
    # Read when the measurement starts: the code measured is what the process loaded then, whatever changes meanwhile.
    provenance = common.provenance(device)
    options = step_options(device, reduced_precision=not args.fp32_only)
    print(
        f"{args.variant}, CIFAR stem, batch {args.batch_size}, {device} ({common.device_name(device)}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.steps} steps"
    )
    print("| config | option | ms/step | img/s |\n|---|---|---|---|")
    rows = []
    models = default_models("--variant", args.variant)
    for name, model in models.items():
        for option, (channels_last, amp_dtype) in options.items():
            t = step_time(model, args.batch_size, args.steps, device, channels_last, amp_dtype)
            rows.append({"model": name, "option": option, "ms_per_step": t * 1e3, "img_per_s": args.batch_size / t})
            print(f"| {name} | {option} | {t * 1e3:.0f} | {args.batch_size / t:.0f} |", flush=True)
    if args.json:
        report = {
            "provenance": provenance,
            "variant": args.variant,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "threads": torch.get_num_threads(),
            "fp32_only": args.fp32_only,
            "models": {name: model.config for name, model in models.items()},
            "results": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
