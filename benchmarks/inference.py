"""Inference speed on the CPU: PyTorch eager against onnxruntime, for the two scripts' default models.

For the model each training script builds with no flags (baseline: Conv-S, ReLU6, linear head; enhanced: Conv-S
width 1.6, SiLU, SE, MLP head), in eval mode with random weights (speed does not depend on their values):
batch-1 latency (median of --runs calls after warm-up) and batch-256 throughput, fp32, for PyTorch (channels_last,
the scripts' CPU layout, and contiguous) and for the same model exported by export.py and run by onnxruntime,
all on the same number of threads. Prints a markdown table; writes JSON with the machine, versions, thread
count and git commit.

    python benchmarks/inference.py [--quick] [--threads N] [--json results/inference-cpu.json]
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import export  # noqa: E402
import mobilenetv4_baseline  # noqa: E402
import mobilenetv4_enhanced  # noqa: E402
import predict  # noqa: E402

BIG_BATCH = 256


def default_models(*flags: str) -> dict:
    """{name: the model the script builds when given no flags but `flags`}, in eval mode, seeded random weights."""
    models = {}
    for name, script in (("baseline", mobilenetv4_baseline), ("enhanced", mobilenetv4_enhanced)):
        torch.manual_seed(0)
        models[name] = common.model_from_args(script.build_parser().parse_args(list(flags))).eval()
    return models


def median_seconds(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):  # first calls build oneDNN primitives / onnxruntime kernels
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_runner(model, channels_last: bool):
    """model(x) in the given memory format, on a copy of the model: Module.to(memory_format=...) converts in place,
    so runners sharing one model would all run in the layout of whichever was built last."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(model).to(memory_format=fmt)

    def run(x):
        with torch.inference_mode():
            return model(x.contiguous(memory_format=fmt))

    return run


def onnx_runner(session):
    return lambda x: predict.onnx_logits(session, x)


def measure(run, runs: int, big_runs: int) -> dict:
    one = torch.randn(1, 3, 32, 32)
    big = torch.randn(BIG_BATCH, 3, 32, 32)
    latency = median_seconds(lambda: run(one), runs, warmup=max(5, runs // 10))
    batch = median_seconds(lambda: run(big), big_runs, warmup=1)
    return {"latency_ms_batch1": latency * 1e3, f"img_per_s_batch{BIG_BATCH}": BIG_BATCH / batch}


def bench_model(model, threads: int, runs: int, big_runs: int, folder: Path) -> dict:
    """{runtime: figures} for one model, plus the max |logit diff| of onnxruntime against PyTorch."""
    path = folder / "model.onnx"
    export.export_onnx(model, path)
    session = predict.onnx_session(path, threads=threads)
    x = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        diff = (predict.onnx_logits(session, x) - model(x)).abs().max().item()
    runners = {
        "pytorch (channels_last)": torch_runner(model, True),
        "pytorch (contiguous)": torch_runner(model, False),
        "onnxruntime": onnx_runner(session),
    }
    return {"runtimes": {name: measure(run, runs, big_runs) for name, run in runners.items()}, "max_abs_diff": diff}


def speedup(runtimes: dict) -> dict:
    """onnxruntime over PyTorch with the scripts' CPU layout (channels_last): >1 means onnxruntime is faster."""
    ours, ort = runtimes["pytorch (channels_last)"], runtimes["onnxruntime"]
    big = f"img_per_s_batch{BIG_BATCH}"
    return {"latency": ours["latency_ms_batch1"] / ort["latency_ms_batch1"], "throughput": ort[big] / ours[big]}


def markdown(results: dict) -> str:
    lines = ["| model | runtime | latency, batch 1 (ms) | throughput, batch 256 (img/s) |", "|---|---|---|---|"]
    for model, report in results.items():
        for runtime, row in report["runtimes"].items():
            lines.append(
                f"| {model} | {runtime} | {row['latency_ms_batch1']:.2f} | {row[f'img_per_s_batch{BIG_BATCH}']:,.0f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few runs (a smoke test, not a measurement)")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="intra-op threads for both PyTorch and onnxruntime"
    )
    parser.add_argument("--runs", type=int, default=200, help="batch-1 calls timed (median); --quick: 5")
    parser.add_argument("--big-runs", type=int, default=10, help="batch-256 calls timed (median); --quick: 1")
    parser.add_argument("--json", default=str(ROOT / "results" / "inference-cpu.json"), help="where the JSON goes")
    args = parser.parse_args(argv)
    # Read when the measurement starts: the code measured is what the process loaded then, whatever changes meanwhile.
    provenance = common.provenance(torch.device("cpu"))
    try:
        for package in ("onnx", "onnxscript", "onnxruntime"):
            predict.import_export_package(package)
    except common.UserError as exc:
        parser.exit(2, f"error: {exc}\n")
    runs, big_runs = (5, 1) if args.quick else (args.runs, args.big_runs)
    torch.set_num_threads(args.threads)
    import onnxruntime

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        results = {
            name: bench_model(model, args.threads, runs, big_runs, Path(folder))
            for name, model in default_models().items()
        }
    report = {
        "provenance": provenance,
        "onnxruntime": onnxruntime.__version__,
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "threads": args.threads,
        "quick": args.quick,
        "runs_batch1": runs,
        f"runs_batch{BIG_BATCH}": big_runs,
        "results": results,
        "onnxruntime_speedup": {name: speedup(figures["runtimes"]) for name, figures in results.items()},
    }
    print(
        f"\n## Inference on {common.cpu_model()} ({args.threads} threads, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, fp32)\n"
    )
    print(markdown(results))
    for name, ratio in report["onnxruntime_speedup"].items():
        print(
            f"{name}: onnxruntime vs PyTorch channels_last: latency {ratio['latency']:.2f}x, throughput "
            f"{ratio['throughput']:.2f}x; max |logit diff| {results[name]['max_abs_diff']:.1e}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
