"""Smoke tests for the benchmark scripts: they run end to end on tiny inputs and report sane numbers.
(Timing targets live in the benchmarks' printed figures, not here.)"""

import contextlib
import dataclasses
import inspect
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import inference  # noqa: E402
import model_step  # noqa: E402
import throughput  # noqa: E402

import common  # noqa: E402
import mnv4.batches  # noqa: E402
import mnv4.device  # noqa: E402
import mnv4.provenance  # noqa: E402
import mobilenetv4_enhanced  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:CIFAR-10 files")


def shrink_throughput(monkeypatch):
    """benchmarks/throughput.py on tiny sizes (each recipe's model at width 0.25, batches of 16, one step per
    measurement, no bf16 row: its first steps on a CPU take tens of seconds; a stub inference timing)."""
    real_recipe_args, real_options = throughput.recipe_args, throughput.training_options

    def tiny_recipe_args(name):
        args = real_recipe_args(name)
        args.width_mult, args.batch_size = 0.25, 16
        return args

    monkeypatch.setattr(throughput, "recipe_args", tiny_recipe_args)
    monkeypatch.setattr(
        throughput,
        "training_options",
        lambda device, quick: [
            (name, kwargs) for name, kwargs in real_options(device, quick) if kwargs.get("autocast_dtype") is None
        ],
    )
    monkeypatch.setattr(
        throughput, "bench_inference", lambda device, repeats, channels_last: {"latency ms (batch 1)": 1.0}
    )
    monkeypatch.setattr(throughput, "sizes", lambda quick, device: (32, 1, 1))


@pytest.fixture
def tiny_throughput(monkeypatch):
    shrink_throughput(monkeypatch)
    return throughput


def script_augmentation(recipe):
    """The augmentation mobilenetv4_enhanced.py trains with under `--recipe RECIPE` and no other flag."""
    return common.augment_config(mobilenetv4_enhanced.build_parser(recipe).parse_args([]))


@pytest.fixture
def tiny_inference(monkeypatch):
    """benchmarks/inference.py on one tiny model and batch 8; restores the thread count its main() sets."""
    torch.manual_seed(0)
    tiny = common.mobilenetv4("conv_small", 10, width_mult=0.25).eval()
    monkeypatch.setattr(inference, "default_models", lambda: {"baseline": tiny})
    monkeypatch.setattr(inference, "BIG_BATCH", 8)
    threads = torch.get_num_threads()
    yield inference
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def throughput_run(tiny_cifar, tmp_path_factory):
    """One tiny throughput.main() run that the tests below read: (report, saved JSON, stdout, the augmentations each
    (recipe, pipeline) was given, the commit the run started from). The load average reads 0.9 before and 1.4
    after; the tracked code is edited (its commit changes) while the training rows are measured."""
    running, used = [], {}  # the recipe being measured; (recipe, pipeline) -> the augmentations it was given
    loads = iter([(0.9, 0.6, 0.3), (1.4, 0.8, 0.4)])
    head = [mnv4.provenance.git_commit()]
    start_commit = head[0]

    def during_recipe(bench):
        def wrapped(*args, **kwargs):
            running.append(inspect.signature(bench).bind(*args, **kwargs).arguments["recipe"].recipe)
            try:
                return bench(*args, **kwargs)
            finally:
                running.pop()

        return wrapped

    real_augment, real_git_commit = common.augment, mnv4.provenance.git_commit

    def recording_augment(images, gen, cfg, *flips):
        used.setdefault((running[-1], "ours"), set()).add(cfg)
        return real_augment(images, gen, cfg, *flips)

    class RecordingPilCifar(throughput.PilCifar):
        def __init__(self, images, labels, cfg):
            used.setdefault((running[-1], "torchvision"), set()).add(cfg)
            super().__init__(images, labels, cfg)

    def then_edit(bench):
        def bench_training_then_edit(*args, **kwargs):
            head[0] = "b" * 40 + "-dirty"  # someone edits the tracked code while the benchmark measures
            return bench(*args, **kwargs)

        return bench_training_then_edit

    out, path = io.StringIO(), tmp_path_factory.mktemp("throughput") / "t.json"
    with pytest.MonkeyPatch.context() as patch:
        shrink_throughput(patch)
        patch.setattr(os, "getloadavg", lambda: next(loads))
        patch.setattr(mnv4.provenance, "git_commit", lambda *repo: head[0] if not repo else real_git_commit(*repo))
        patch.setattr(mnv4.batches, "augment", recording_augment)  # where the training batches call it
        patch.setattr(throughput, "PilCifar", RecordingPilCifar)
        for name in ("bench_augmentation", "bench_training"):
            patch.setattr(throughput, name, during_recipe(getattr(throughput, name)))
        patch.setattr(throughput, "bench_training", then_edit(throughput.bench_training))
        with contextlib.redirect_stdout(out):
            report = throughput.main(["--quick", "--device", "cpu", "--data-dir", str(tiny_cifar), "--json", str(path)])
    assert head[0] != start_commit  # the edit happened during the run
    return SimpleNamespace(
        report=report, saved=json.loads(path.read_text()), out=out.getvalue(), used=used, start_commit=start_commit
    )


def test_throughput_main_measures_both_recipes_and_the_machine_load(throughput_run):
    """The whole report on tiny sizes, for the notebook's recipe and the script's default: every figure positive,
    speedups are ratios of the measured figures, each recipe's rows augment (on the device and in the PIL
    loop) with that recipe's ops as the script's parser gives them, and the load average before and after the
    run is saved, with a warning printed when the machine was not idle."""
    report, out, used = throughput_run.report, throughput_run.out, throughput_run.used
    saved = throughput_run.saved
    assert saved == json.loads(json.dumps(report))
    assert set(saved["recipes"]) == {"notebook", "project"} and throughput.DEFAULT_RECIPE == "project"
    for name, recipe in saved["recipes"].items():
        aug, train = recipe["results"]["augmentation img/s"], recipe["results"]["training img/s"]
        assert aug and train and all(v > 0 for v in (*aug.values(), *train.values()))
        # the saved ratios are those of the saved figures (their arithmetic: test_speedups_are_the_ratios_...)
        assert {k: recipe[k] for k in throughput.speedups(recipe["results"])} == throughput.speedups(recipe["results"])
        cfg = script_augmentation(name)
        assert recipe["settings"]["augmentation"] == json.loads(json.dumps(dataclasses.asdict(cfg)))
        assert used[name, "ours"] == used[name, "torchvision"] == {cfg}, name
    notebook_aug = saved["recipes"]["notebook"]["settings"]["augmentation"]
    project_aug = saved["recipes"]["project"]["settings"]["augmentation"]
    assert notebook_aug["rotation"] == 15 and notebook_aug["crop_padding"] == 4 and notebook_aug["hue"] == 0.1
    assert project_aug["rotation"] == 0 and project_aug["crop_padding"] == 0 and project_aug["hue"] == 0
    assert project_aug["flip_prob"] == 0.5 and project_aug["translate"] == 0.1
    assert saved["recipes"]["notebook"]["settings"]["opt"] == "adamw"
    assert saved["recipes"]["project"]["settings"]["opt"] == "sgd"
    assert "ours + channels_last" in saved["recipes"]["project"]["results"]["training img/s"]
    assert report["train_defaults"]["channels_last"] == "True"  # the CPU default
    assert saved["load_average_before"] == [0.9, 0.6, 0.3] and saved["load_average_after"] == [1.4, 0.8, 0.4]
    assert saved["cpu_count"] == os.cpu_count()
    assert throughput.busy_warning(0.9) in out.splitlines() and "1.40" in out


def test_throughput_warns_only_above_the_idle_load():
    assert throughput.busy_warning(0.5) is None and throughput.busy_warning(0.2) is None
    warning = throughput.busy_warning(0.51)
    assert warning.startswith("warning: ") and "0.51" in warning


def test_pil_transforms_run_each_recipes_ops_as_torchvision_transforms():
    """The notebook-style loop augments with the same ops as ours, as the notebook wrote them."""
    from torchvision import transforms as T

    notebook = throughput.pil_transforms(script_augmentation("notebook")).transforms
    assert [type(t) for t in notebook] == [
        T.RandomCrop,
        T.RandomHorizontalFlip,
        T.RandomRotation,
        T.ColorJitter,
        T.RandomAffine,
        T.ToTensor,
        T.Normalize,
    ]
    crop, flip, rotation, jitter, affine = notebook[:5]
    assert crop.padding == 4 and flip.p == 0.5 and list(rotation.degrees) == [-15, 15]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.8, 1.2),
        (0.8, 1.2),
        (0.8, 1.2),
        (-0.1, 0.1),
    )
    assert affine.translate == (0.1, 0.1) and list(affine.degrees) == [0, 0]
    project = throughput.pil_transforms(script_augmentation("project")).transforms
    assert [type(t) for t in project] == [T.RandomHorizontalFlip, T.RandomAffine, T.ToTensor, T.Normalize]
    assert [type(t) for t in throughput.pil_transforms(None).transforms] == [T.ToTensor, T.Normalize]
    with pytest.raises(ValueError, match="cutout"):
        throughput.pil_transforms(common.AugmentConfig(cutout=8))


def test_pil_dataset_matches_the_notebook_transform_shapes(tiny_cifar):
    data = common.load_cifar10(tiny_cifar)
    dataset = throughput.PilCifar(data.train_images[:4], data.train_labels[:4], script_augmentation("notebook"))
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == int(data.train_labels[0])


def tiny_models(monkeypatch, *names):
    """benchmarks/model_step.py on width-0.25 models (ReLU6 for the baseline, SiLU for the enhanced)."""
    acts = {"baseline": "relu6", "enhanced": "silu"}
    monkeypatch.setattr(
        model_step,
        "default_models",
        lambda *flags: {n: common.mobilenetv4(flags[-1], 10, width_mult=0.25, act=acts[n]) for n in names},
    )


def test_model_step_times_a_step(monkeypatch):
    """A step's time is the median of the timed steps' (end - start), the two warm-up steps left out: a clock whose
    readings make the timed steps take 3, 1 and 2 s (the warm-ups' 100 and 50 s would move any mean or max)."""
    readings = iter([0.0, 100.0, 150.0, 153.0, 160.0, 161.0, 168.0, 170.0])  # warm-up starts; (start, end) x 3
    monkeypatch.setattr(model_step, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    model = common.mobilenetv4("conv_small", 10, width_mult=0.25)
    seconds = model_step.step_time(model, 4, 3, torch.device("cpu"), True, None)
    assert seconds == 2.0
    assert next(readings, None) is None  # the clock was read at each step, no more


def test_model_step_times_each_option_from_the_same_model():
    """Each option trains a copy: the model handed in keeps its weights and its layout, so the option timed next
    starts from the same model in the layout its label names, not from the previous option's."""
    torch.manual_seed(0)
    model = common.mobilenetv4("conv_small", 10, width_mult=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_step.step_time(model, 4, 1, torch.device("cpu"), True, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters()), (
        "the caller's model was converted to channels_last"
    )


def test_model_step_main_saves_every_option_with_its_provenance(tmp_path, monkeypatch):
    """The JSON holds every model x option row the table printed, img/s = batch / step time, and the machine and
    commit that measured them (the README quotes this file)."""
    tiny_models(monkeypatch, "baseline", "enhanced")
    model_step.main(["-b", "4", "--steps", "1", "--device", "cpu", "--json", str(tmp_path / "step.json")])
    saved = json.loads((tmp_path / "step.json").read_text())
    assert saved["models"]["enhanced"] == {**saved["models"]["enhanced"], "width_mult": 0.25, "act": "silu"}
    rows = saved["results"]
    assert {(r["model"], r["option"]) for r in rows} == {
        (m, o)
        for m in ("baseline", "enhanced")
        for o in ("fp32", "fp32 channels_last", "bf16 autocast", "bf16 channels_last")
    }
    assert all(r["img_per_s"] == pytest.approx(4 / (r["ms_per_step"] / 1e3)) for r in rows)
    assert saved["batch_size"] == 4 and saved["steps"] == 1 and saved["provenance"]["machine"]["device"] == "cpu"


def test_model_step_fp32_only_times_the_layouts_alone(tmp_path, monkeypatch):
    """On a CPU without native bf16 (AVX2 only) each bf16 step takes many times an fp32 one: --fp32-only compares
    the layouts without waiting for rows known to lose, and the JSON says the rows were left out."""
    tiny_models(monkeypatch, "baseline")
    model_step.main(["-b", "2", "--steps", "1", "--device", "cpu", "--fp32-only", "--json", str(tmp_path / "s.json")])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert {r["option"] for r in saved["results"]} == {"fp32", "fp32 channels_last"} and saved["fp32_only"] is True


def test_inference_benchmark_reports_both_runtimes(tmp_path, tiny_inference):
    """benchmarks/inference.py on one tiny model: every figure positive, speedups are ratios of the figures, and
    the exported model agrees with PyTorch."""
    report = inference.main(["--quick", "--threads", "1", "--json", str(tmp_path / "inference.json")])
    saved = json.loads((tmp_path / "inference.json").read_text())
    assert saved == json.loads(json.dumps(report))
    runtimes = saved["results"]["baseline"]["runtimes"]
    assert set(runtimes) == {"pytorch (channels_last)", "pytorch (contiguous)", "onnxruntime"}
    assert all(v > 0 for row in runtimes.values() for v in row.values())
    assert saved["onnxruntime_speedup"]["baseline"] == inference.speedup(runtimes)  # by hand: test_speedups_...
    assert saved["results"]["baseline"]["max_abs_diff"] <= 1e-4
    assert saved["threads"] == 1 and saved["onnxruntime"]


def test_inference_benchmark_times_each_pytorch_row_in_its_own_memory_format(tmp_path, tiny_inference, monkeypatch):
    """While a PyTorch row is timed, its conv weights are in the layout its label names. Both runners are built
    before either is timed, so a runner that converted a shared model in place would time the other's layout."""
    model = inference.default_models()["baseline"]
    seen = []  # per conv call: is its weight channels_last? (only weights whose two layouts differ in memory)

    def record(conv, _inputs):
        weight = conv.weight
        if not weight.contiguous().is_contiguous(memory_format=torch.channels_last):
            seen.append(weight.is_contiguous(memory_format=torch.channels_last))

    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_pre_hook(record)  # a copy of the model keeps its hooks

    layouts = {}
    labels = {}
    real_runner = inference.torch_runner

    def labelled_runner(model, channels_last):
        run = real_runner(model, channels_last)
        labels[run] = "channels_last" if channels_last else "contiguous"
        return run

    def one_call(run, runs, big_runs):  # instead of timing: one forward, recording the layouts it met
        seen.clear()
        run(torch.randn(2, 3, 32, 32))
        if run in labels:
            layouts[labels[run]] = list(seen)
        return {"latency_ms_batch1": 1.0, "img_per_s_batch8": 1.0}

    monkeypatch.setattr(inference, "torch_runner", labelled_runner)
    monkeypatch.setattr(inference, "measure", one_call)
    inference.bench_model(model, 1, 1, 1, tmp_path)
    assert set(layouts) == {"channels_last", "contiguous"}
    assert layouts["channels_last"] and all(layouts["channels_last"])
    assert layouts["contiguous"] and not any(layouts["contiguous"])


@pytest.mark.parametrize(
    "default_models",
    [inference.default_models, lambda: model_step.default_models("--variant", "conv_small")],
    ids=["inference", "model_step"],
)
def test_benchmark_models_are_the_scripts_defaults(default_models):
    """Both speed benchmarks time the models the scripts train given no flags, whatever their defaults become."""
    models = default_models()
    assert models["baseline"].config == {
        **models["baseline"].config,
        "variant": "conv_small",
        "width_mult": 1.0,
        "act": "relu6",
        "se": False,
        "head": "linear",
    }
    assert models["enhanced"].config == {
        **models["enhanced"].config,
        "variant": "conv_small",
        "width_mult": 1.6,
        "act": "silu",
        "se": True,
        "head": "mlp",
        "drop_path_rate": 0.1,
    }


def test_inference_benchmark_times_eval_mode_and_model_step_the_variant_asked_for():
    assert not any(m.training for model in inference.default_models().values() for m in model.modules())
    assert {m.config["variant"] for m in model_step.default_models("--variant", "mobilenetv2").values()} == {
        "mobilenetv2"
    }


def test_provenance_names_the_code_the_libraries_and_the_machine():
    """Each field against its own source: git, the imported libraries, the platform and /proc/cpuinfo."""
    import platform

    import numpy
    import torchvision

    record = common.provenance(torch.device("cpu"))
    root = Path(__file__).resolve().parents[1]
    git = lambda *argv: subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py")
    assert record["git_commit"] == git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    assert record["versions"] == {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    machine = record["machine"]
    assert machine["device"] == "cpu" and machine["cpu_count"] == os.cpu_count()
    assert machine["device_name"] == common.device_name(torch.device("cpu"))
    names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    assert machine["cpu"] == (names[0] if names else platform.processor() or platform.machine())


def test_speedups_are_the_ratios_of_the_figures():
    """By hand: ours 300 img/s against PIL's 100 (0 workers) and 150 (the best loader); training 200 with the
    script defaults and 240 at best against the notebook loop's best 80; onnxruntime 2 ms against PyTorch's 5,
    400 img/s against 100."""
    results = {
        "augmentation img/s": {
            "ours (batched, on device)": 300.0,
            "torchvision PIL, 0 workers": 100.0,
            "torchvision PIL, 2 workers": 150.0,
        },
        "training img/s": {
            "notebook (PIL, 0 workers)": 50.0,
            "notebook (PIL, 2 workers)": 80.0,
            throughput.DEFAULTS_NAME: 200.0,
            "ours + channels_last": 240.0,
        },
    }
    assert throughput.speedups(results) == pytest.approx(
        {"aug_speedup": 3.0, "aug_speedup_vs_best_loader": 2.0, "train_speedup": 2.5, "train_speedup_best_option": 3.0}
    )
    big = f"img_per_s_batch{inference.BIG_BATCH}"
    runtimes = {
        "pytorch (channels_last)": {"latency_ms_batch1": 5.0, big: 100.0},
        "pytorch (contiguous)": {"latency_ms_batch1": 9.0, big: 50.0},
        "onnxruntime": {"latency_ms_batch1": 2.0, big: 400.0},
    }
    assert inference.speedup(runtimes) == pytest.approx({"latency": 2.5, "throughput": 4.0})


def test_every_benchmark_saves_the_same_provenance_record(
    tiny_cifar, tmp_path, monkeypatch, tiny_throughput, tiny_inference, throughput_run
):
    """The README quotes these files: each one names the commit, library versions and machine that measured it,
    in one shape, so a figure can be traced the same way whichever benchmark wrote it. (pipeline_accuracy reads
    its recipe through throughput.recipe_args: tiny here too.)"""
    import pipeline_accuracy

    tiny_models(monkeypatch, "baseline")
    model_step.main(["-b", "4", "--steps", "1", "--device", "cpu", "--json", str(tmp_path / "m.json")])
    inference.main(["--quick", "--threads", "1", "--json", str(tmp_path / "i.json")])
    pipeline_accuracy.main(
        [
            "--epochs",
            "1",
            "--max-train-samples",
            "64",
            "--max-test-samples",
            "32",
            "--data-dir",
            str(tiny_cifar),
            "--json",
            str(tmp_path / "p.json"),
        ]
    )
    expected = json.loads(json.dumps(common.provenance(torch.device("cpu"))))
    assert throughput_run.saved["provenance"] == expected, "t"  # the module's one throughput run
    for name in ("m", "i", "p"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["provenance"] == expected, name


def test_pipeline_accuracy_names_a_missing_data_folder_in_one_line(tmp_path, capsys):
    import pipeline_accuracy

    with pytest.raises(SystemExit) as exit_info:
        pipeline_accuracy.main(["--data-dir", str(tmp_path / "nowhere")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: ") and "nowhere" in error
    assert error.count("\n") == 1 and "Traceback" not in error


def test_throughput_records_the_commit_it_started_from(throughput_run):
    """The code a benchmark measures is the code it loaded at its start: a commit (or an edit) made while it runs,
    which can take most of an hour, must not be what its JSON names."""
    assert throughput_run.saved["provenance"]["git_commit"] == throughput_run.start_commit


def fake_device_torch(monkeypatch, version, native_bf16=True):
    """An MPS that torch `version` drives, and a CUDA GPU whose bf16 is native or only emulated (a T4, a V100);
    autocast is taken as working wherever the project's own checks allow it (no GPU here to try it on)."""
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    bf16 = lambda including_emulation=True: native_bf16 or including_emulation  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
    monkeypatch.setattr(mnv4.device, "check_precision", lambda device, dtype: None)


@pytest.mark.parametrize(
    "device, version, native_bf16, amp",
    [
        ("cpu", "2.4.1", True, "bf16"),
        ("cuda", "2.4.1", True, "bf16"),
        ("cuda", "2.4.1", False, "fp16"),  # emulated bf16 runs far slower than fp16: the row a training run gets
        ("mps", "2.6.0", True, "bf16"),
        ("mps", "2.5.1", True, None),  # torch turns bf16 autocast off on MPS before 2.6: the row would time fp32
        ("mps", "2.4.1", True, None),  # no MPS autocast at all: the row failed
    ],
)
def test_benchmark_precision_rows_time_the_precision_they_name(device, version, native_bf16, amp, monkeypatch):
    """The reduced-precision rows of both training benchmarks: bf16 where it runs natively, fp16 on a GPU whose
    bf16 is emulated, and no row (with the reason printed) where torch would run fp32 under the label or fail."""
    fake_device_torch(monkeypatch, version, native_bf16)
    device = torch.device(device)
    throughput_rows = {name for name, kwargs in throughput.training_options(device, True) if "autocast" in name}
    step_rows = {name for name, (_, dtype) in model_step.step_options(device).items() if dtype is not None}
    if amp is None:
        assert throughput_rows == step_rows == set()
        assert "needs torch 2.6" in common.reduced_precision(device)[1]
        return
    assert throughput_rows == {f"ours + {amp} autocast"}
    assert step_rows == {f"{amp} autocast"} | ({f"{amp} channels_last"} if device.type != "mps" else set())


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_benchmarks_time_channels_last_only_where_training_allows_it(device, monkeypatch):
    """Training refuses --channels-last on MPS (wrong results there, mnv4.device.run_device): a benchmark row with
    it would time a configuration nobody can train."""
    fake_device_torch(monkeypatch, "2.14.1")
    device = torch.device(device)
    layouts = {kwargs.get("channels_last", False) for _, kwargs in throughput.training_options(device, False)}
    layouts |= {channels_last for channels_last, _ in model_step.step_options(device).values()}
    assert layouts == ({False} if device.type == "mps" else {False, True})


def test_the_reduced_precision_rows_are_dropped_where_autocast_stays_off(monkeypatch):
    """torch turns an autocast it cannot run off with a warning (mnv4.device.check_precision): the row would time
    fp32 under a bf16 label."""

    def autocast_stays_off(device, dtype):
        raise common.UserError("--amp bf16: autocast stayed off")

    monkeypatch.setattr(mnv4.device, "check_precision", autocast_stays_off)
    assert common.reduced_precision(torch.device("cpu")) == (None, "--amp bf16: autocast stayed off")


def test_benchmarks_run_cudnn_autotuned_as_training_does(tmp_path, monkeypatch):
    """Every training run seeds through mnv4.device.seed_everything, which turns cuDNN's autotuner on: a benchmark
    that skipped it would time cuDNN's default algorithms on CUDA, not what training runs."""
    calls = []
    monkeypatch.setattr(common, "seed_everything", lambda seed, deterministic: calls.append(deterministic))
    tiny_models(monkeypatch, "baseline")
    model_step.main(["-b", "2", "--steps", "1", "--device", "cpu"])
    with pytest.raises(SystemExit):  # a missing data folder: it has set up the device by then
        throughput.main(["--quick", "--device", "cpu", "--data-dir", str(tmp_path / "missing")])
    assert calls == [False, False]


def test_pil_loader_keeps_its_workers_between_passes(tiny_cifar):
    """A loader that starts its workers again for each timed pass would time, on macOS (spawn), a fresh torch
    import per worker per pass as data loading."""
    data = common.load_cifar10(tiny_cifar, download=False).subset(8)
    dataset = throughput.PilCifar(data.train_images, data.train_labels, script_augmentation("project"))
    assert throughput.pil_loader(dataset, 4, 2).persistent_workers is True
    assert throughput.pil_loader(dataset, 4, 0).persistent_workers is False
