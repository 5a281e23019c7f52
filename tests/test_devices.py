"""Stand-ins for the devices this project's users have and its CI lacks: Apple's MPS backend and CUDA GPUs.

- MPS has no float64 (or complex128): a dispatch mode fails every op that produces one, while both scripts
  train, evaluate, run the TTA table, stop mid-epoch and resume, evaluate with --test-only, and predict.py
  classifies. On a Mac any such op on the training device is a TypeError at the first step.
- GPUs run asynchronously: every read of a device value on the host (`.item()`, `int(t)`, `nonzero()`) and every
  copy from host memory to the device (`torch.tensor(list, device=...)`, `.to(device)` of a CPU tensor) waits for
  the queue to drain. A dispatch mode counts them; an epoch of more steps and chunks must not make more.
- FakeTensorMode builds tensors on a "cuda" device without a GPU and refuses ops that mix devices.
- Monkeypatched capabilities check the choices made for hardware this machine does not have.
"""

import collections
import contextlib
import io
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.transforms.v2 import functional as TF

import common
import mnv4.data
import mnv4.device
import mnv4.evaluation
import mnv4.model
import mobilenetv4_baseline
import mobilenetv4_enhanced
import predict
from conftest import write_tiny_cifar
from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"baseline": mobilenetv4_baseline, "enhanced": mobilenetv4_enhanced}
MPS_MISSING = (torch.float64, torch.complex128)
pytestmark = pytest.mark.filterwarnings("ignore:CIFAR-10 files")


class DtypeRecorder(TorchDispatchMode):
    """Records every op whose output has a dtype the MPS backend lacks."""

    def __init__(self):
        super().__init__()
        self.offenders = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.dtype in MPS_MISSING:
                self.offenders.append(f"{func} -> {leaf.dtype}")
        return out


class SyncCounter(TorchDispatchMode):
    """Counts what makes the host wait for a GPU: reading a value (`.item()`, `int()`, `bool()`), an output whose
    size depends on the data, and a blocking copy from the host: a tensor made from Python data (`torch.tensor`,
    `torch.as_tensor`: aten.lift_fresh), a copy from a CPU tensor to another device, and `.to(device)` of a CPU
    tensor written in this project's code (a no-op on the CPU these tests run on, so `Tensor.to` is wrapped to see
    it; torch's own calls, such as clip_grad_norm_'s on tensors already on the device, are not counted). Not inside
    optimizer.step(): Adam(W) reads its step counters there, which torch keeps on the host (CPU tensors) unless
    `capturable`, so on a GPU they cost no wait."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten.lift_fresh")

    def __init__(self):
        super().__init__()
        self.count, self.in_optimizer_step = 0, False
        self.seen = collections.Counter()  # what was counted, by name
        self.hooks, self.patch = [], None

    def record(self, what: str):
        if not self.in_optimizer_step:
            self.count += 1
            self.seen[what] += 1

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.hooks = [
            register_optimizer_step_pre_hook(lambda *_: setattr(self, "in_optimizer_step", True)),
            register_optimizer_step_post_hook(lambda *_: setattr(self, "in_optimizer_step", False)),
        ]
        original, counter = torch.Tensor.to, self

        def to(tensor, *args, **kwargs):
            target = kwargs.get("device", next((a for a in args if isinstance(a, (torch.device, str))), None))
            caller = sys._getframe(1).f_code.co_filename
            ours = caller.startswith(str(ROOT)) and "site-packages" not in caller
            if target is not None and tensor.device.type == "cpu" and ours:
                counter.record(f"Tensor.to({target})")
            return original(tensor, *args, **kwargs)

        self.patch = mock.patch.object(torch.Tensor, "to", to)
        self.patch.start()
        return super().__enter__()

    def __exit__(self, *exc):
        self.patch.stop()
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith(self.SYNCING) or self.copies_from_host(name, args, kwargs):
            self.record(name)
        return func(*args, **kwargs)

    @staticmethod
    def copies_from_host(name, args, kwargs) -> bool:
        if name.startswith("aten._to_copy") and kwargs.get("device") is not None:
            return args[0].device.type == "cpu" and torch.device(kwargs["device"]).type != "cpu"
        if name.startswith("aten.copy_"):
            return args[1].device.type == "cpu" and args[0].device.type != "cpu"
        return False


def run_main(module, argv):
    """main(argv) in this process; (exit code, summary, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    summary, code = None, 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            summary = module.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, summary, out.getvalue(), err.getvalue()


def assert_no_mps_missing_dtype(recorder):
    assert not recorder.offenders, (
        f"{len(recorder.offenders)} ops make float64/complex128, e.g. {sorted(set(recorder.offenders))[:8]}"
    )


# ---------------------------------------------------------------------------------------------------
# 1. No dtype that MPS lacks, anywhere a user's command goes
# ---------------------------------------------------------------------------------------------------
RECIPES = {  # each script's default, and the enhanced paths the default leaves out (colour jitter, crop, EMA)
    "baseline": ("baseline", []),
    "enhanced": ("enhanced", []),
    "enhanced-notebook-ema": ("enhanced", ["--recipe", "notebook", "--model-ema"]),
}


@pytest.mark.parametrize("name", RECIPES)
def test_no_float64_when_training_stopping_resuming_and_evaluating(name, tiny_cifar, tmp_path, monkeypatch):
    script, flags = RECIPES[name]
    module = SCRIPTS[script]
    out = tmp_path / "run"
    argv = [*TINY, *flags, "--data-dir", tiny_cifar, "--epochs", 2]
    original, steps = common.Run.step_done, [0]

    def stop_mid_epoch_2(self, loss, logits, labels):  # as Ctrl-C after the 2nd step of epoch 2
        steps[0] += 1
        if steps[0] == 6:
            self.stop.signum = signal.SIGINT
        return original(self, loss, logits, labels)

    recorder = DtypeRecorder()
    with recorder:
        with monkeypatch.context() as patch:
            patch.setattr(common.Run, "step_done", stop_mid_epoch_2)
            code, _, _, err = run_main(module, [*argv, "--output-dir", out])
        assert code == 128 + signal.SIGINT, err
        code, summary, _, err = run_main(module, [*argv, "--resume", out / "last.pt"])  # + the TTA table
        assert code == 0, err
        code, tested, _, err = run_main(
            module,
            [
                *TINY,
                *flags,
                "--data-dir",
                tiny_cifar,
                "--test-only",
                "--resume",
                out / "best.pt",
                "--output-dir",
                tmp_path / "test",
            ],
        )
        assert code == 0, err
    assert summary["epochs_completed"] == 2 and len(summary["tta_table"]) == len(common.TTA_VIEWS)
    assert tested["test_acc"] == summary["best_acc"]
    assert_no_mps_missing_dtype(recorder)


def test_no_float64_in_predict(tiny_cifar, tmp_path):
    from PIL import Image

    code, _, _, err = run_main(
        mobilenetv4_enhanced,
        [*TINY, "--data-dir", tiny_cifar, "--epochs", 1, "--no-tta-table", "--output-dir", tmp_path / "run"],
    )
    assert code == 0, err
    (tmp_path / "images").mkdir()
    for i, mode in enumerate(("RGB", "L", "I;16", "RGBA")):  # 16-bit greyscale takes predict's widest path
        Image.new(mode, (40, 30), 120 * i).save(tmp_path / "images" / f"image{i}.png")
    recorder = DtypeRecorder()
    with recorder:
        code, results, out, err = run_main(
            predict,
            [
                "--checkpoint",
                tmp_path / "run" / "last.pt",
                "--device",
                "cpu",
                "--tta",
                "flip_shift",
                tmp_path / "images",
            ],
        )
    assert code == 0, err
    assert len(results) == 4 and out.count("\n") == 4
    assert_no_mps_missing_dtype(recorder)


def test_the_recorder_sees_float64():
    """The guard itself: each way the training path once made float64 is caught."""
    recorder = DtypeRecorder()
    with recorder:
        torch.zeros(3, dtype=torch.float64)
        torch.ones(2).double()
        torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert len(recorder.offenders) == 3


# ---------------------------------------------------------------------------------------------------
# 2. No per-step host-device synchronisation
# ---------------------------------------------------------------------------------------------------
# The enhanced default's path with cutout added; the notebook's adds colour jitter (hue included) and EMA.
SYNC_RECIPES = {
    "baseline": RECIPES["baseline"],
    "enhanced-cutout": ("enhanced", ["--cutout", "8"]),
    "enhanced-notebook-ema": RECIPES["enhanced-notebook-ema"],
}


@pytest.fixture(scope="module")
def cifar_of_3000(tmp_path_factory):
    """3,000 training images: epochs of several 1,024-image augmentation chunks."""
    return write_tiny_cifar(tmp_path_factory.mktemp("cifar3000"), per_train_batch=600)


@pytest.mark.parametrize("name", SYNC_RECIPES)
def test_an_epoch_syncs_a_fixed_number_of_times(name, cifar_of_3000, tmp_path):
    """More steps and more augmentation chunks (2 and 3 of 1,024 images, 8 and 11 steps of 256), same evaluation:
    a GPU run that reads a device value or copies from the host every step or chunk would count more."""
    script, flags = SYNC_RECIPES[name]
    counters = []
    for images in (2048, 2816):  # both below the progress bar's refresh interval
        mnv4.data._ON_DEVICE.clear()  # each run makes its device constants once
        counter = SyncCounter()
        with counter:
            code, _, _, err = run_main(
                SCRIPTS[script],
                [
                    *TINY,
                    *flags,
                    "--data-dir",
                    cifar_of_3000,
                    "--epochs",
                    1,
                    "-b",
                    256,
                    "--max-train-samples",
                    images,
                    "--no-tta-table",
                    "--output-dir",
                    tmp_path / str(images),
                ],
            )
        assert code == 0, err
        counters.append(counter)
    more = counters[1].seen - counters[0].seen
    assert counters[0].count == counters[1].count, (
        f"host syncs: {counters[0].count} for 2 chunks, {counters[1].count} for 3; the extra ones: {dict(more)}"
    )


def test_the_sync_counter_sees_reads_and_copies_from_the_host():
    counter = SyncCounter()
    with counter:
        x = torch.arange(4)
        x.sum().item()
        int(x[0])
        x.nonzero()
        torch.tensor([1.0, 2.0])  # on a GPU: a blocking copy from pageable host memory
        x.to("cpu")  # .to(device) of a CPU tensor (here a no-op)
        torch.zeros(2).to("meta")  # a copy from a CPU tensor to another device
        torch.empty(2, device="meta").copy_(torch.zeros(2))
        x.to(torch.float32)  # a dtype change is no copy from the host
    assert counter.count == 8, counter.seen


def test_device_constants_are_made_once_per_device():
    """normalize, hue and cutout reuse one tensor per device for their constants: no copy from the host per chunk or
    per evaluation batch."""
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    cfg = common.AugmentConfig(crop_padding=0, rotation=0, translate=0, cutout=4)
    common.normalize(common.augment(images, torch.Generator().manual_seed(0), cfg))  # makes them, once
    counter = SyncCounter()
    with counter:
        common.normalize(images)
        common.augment(images, torch.Generator().manual_seed(1), cfg)
    assert counter.count == 0, counter.seen
    assert mnv4.data.device_constant(common.CIFAR10_MEAN, "cpu") is mnv4.data.device_constant(
        common.CIFAR10_MEAN, torch.device("cpu")
    )


def test_colour_jitter_off_leaves_pixels_alone():
    """The default recipe has no colour jitter: augmentation must not push its images through an HSV round trip."""
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    cfg = common.AugmentConfig(
        crop_padding=0, flip_prob=0, rotation=0, brightness=0, contrast=0, saturation=0, hue=0, translate=0
    )
    out = common.augment(images, torch.Generator().manual_seed(0), cfg)
    assert torch.equal(out, images.float().mul(1 / 255))  # the pipeline's uint8 -> [0, 1] scaling, nothing more


def test_hue_without_indexing_matches_the_per_sample_result():
    """Hue runs on every sample and is kept where it is the sample's turn: the same pixels as adjusting the chosen
    samples alone, with no data-dependent indexing."""
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    factors = torch.stack([torch.ones(16), torch.ones(16), torch.ones(16), torch.rand(16) * 0.2 - 0.1], 1)
    order = torch.rand(16, 4).argsort(1)
    out = common.color_jitter(x.clone(), factors, order)
    expected = torch.stack([TF.adjust_hue(x[i], float(factors[i, common.HUE])) for i in range(16)])  # torchvision's
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# 3. Tensors on a (fake) CUDA device: nothing mixes devices
# ---------------------------------------------------------------------------------------------------
def test_forward_evaluation_and_tta_on_fake_cuda():
    """FakeTensorMode gives tensors a cuda device with no GPU and raises on any op that mixes devices: the model,
    normalisation, augmentation ops, every TTA view, prediction and scoring stay on the images' device."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # The shape environment lets score()'s .item() return a symbolic number instead of refusing to read a value.
    with FakeTensorMode(allow_non_fake_inputs=False, shape_env=ShapeEnv()):
        images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8, device="cuda")
        labels = torch.zeros(8, dtype=torch.int64, device="cuda")
        with torch.device("cuda"):
            model = common.mobilenetv4(
                "conv_small", width_mult=0.25, se=True, head="mlp", act="silu", drop_path_rate=0.1
            )
        model.train()
        logits = model(common.normalize(images))
        params = {
            "crop": torch.zeros(8, 2, dtype=torch.int64, device="cuda"),
            "flip": torch.zeros(8, dtype=torch.bool, device="cuda"),
            "angle": torch.zeros(8, device="cuda"),
            "shift": torch.zeros(8, 2, device="cuda"),
            "jitter": torch.ones(8, 4, device="cuda"),
            "jitter_order": torch.arange(4, device="cuda").repeat(8, 1),
        }
        x, in_view = common.geometric_transform(images.float(), params)
        x = common.color_jitter(x, params["jitter"], params["jitter_order"]) * in_view
        table = common.tta_table(model, images, labels, batch_size=4)  # every view predicted, every mode scored
        assert logits.device.type == x.device.type == "cuda"
        assert set(table) == set(common.TTA_VIEWS)
        assert all(preds.device.type == "cuda" and preds.shape == (8,) for _, _, preds in table.values())
        with pytest.raises(RuntimeError, match="devices"):  # the mode does refuse a mix
            mnv4.evaluation.score(torch.zeros(8, 10, device="cuda"), torch.zeros(8, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------
# 4. Capabilities this machine lacks, monkeypatched
# ---------------------------------------------------------------------------------------------------
def fake_gpu(monkeypatch, capability):
    """A CUDA device of the given compute capability, as torch.cuda reports it (bf16 only emulated below 8.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability[0] >= 8 or including_emulation
    )


@pytest.mark.parametrize(
    "capability, amp, expected",
    [
        ((7, 5), "auto", torch.float16),  # T4: bf16 only emulated, so fp16
        ((7, 0), "auto", torch.float16),  # V100
        ((8, 0), "auto", torch.bfloat16),  # A100
        ((9, 0), "auto", torch.bfloat16),  # H100
        ((7, 5), "fp16", torch.float16),
        ((8, 6), "off", None),
    ],
)
def test_autocast_dtype_on_gpus(capability, amp, expected, monkeypatch):
    fake_gpu(monkeypatch, capability)
    assert common.autocast_dtype(torch.device("cuda", 0), amp) == expected


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    with pytest.raises(common.UserError, match=r"--amp bf16.*--amp fp16"):
        common.autocast_dtype(torch.device("cuda", 0), "bf16")


@pytest.mark.parametrize(
    "device, amp, expected",
    [
        ("cpu", "auto", None),
        ("cpu", "off", None),
        ("cpu", "bf16", torch.bfloat16),
        ("cpu", "fp16", torch.float16),
        ("mps", "auto", None),
        ("mps", "fp16", torch.float16),
    ],
)
def test_autocast_dtype_off_cuda(device, amp, expected):
    assert common.autocast_dtype(torch.device(device), amp) is expected


def fake_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


def test_torchrun_with_mps_is_refused(monkeypatch):
    fake_mps(monkeypatch)
    for name in ("mps",):
        with pytest.raises(common.UserError, match=r"--device mps.*torchrun"):
            common.select_device(name, local_rank=0)
    # auto under torchrun never picks MPS: with no GPU it falls back to the CPU (gloo)
    assert common.select_device("auto", local_rank=0) == torch.device("cpu")


def test_more_processes_than_gpus_is_refused(monkeypatch):
    fake_gpu(monkeypatch, (8, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert common.select_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(common.UserError, match=r"local rank 2.*2 GPU.*--nproc-per-node"):
        common.select_device("auto", local_rank=2)


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_sync_bn_off_cuda_is_refused(device, tiny_cifar, tmp_path, monkeypatch):
    if device == "mps":
        fake_mps(monkeypatch)
        monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: None, raising=False)
        monkeypatch.setattr(common.Cifar10, "to", lambda self, d: self)  # the data stays put: no MPS here
    code, _, _, err = run_main(
        mobilenetv4_baseline,
        [
            *TINY[:-5],
            "--device",
            device,
            "--no-download",
            "--sync-bn",
            "--data-dir",
            tiny_cifar,
            "--output-dir",
            tmp_path / "r",
        ],
    )
    assert code == 2, err
    assert err.count("\n") == 1 and "--sync-bn" in err and "CUDA" in err


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_rng_state_round_trips_for_every_device_type(device, monkeypatch):
    """A mid-epoch checkpoint restores the training device's own generator (dropout and drop-path masks)."""
    store = {"cuda": torch.arange(8, dtype=torch.uint8), "mps": torch.arange(8, dtype=torch.uint8) + 1}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: store["cuda"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: store.__setitem__("cuda", state))
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": store["mps"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": store.__setitem__("mps", state))
    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    state = common.rng_state(dev)
    assert set(state) == {"cpu"} | ({device} - {"cpu"})
    saved = {k: v.clone() for k, v in state.items()}
    torch.rand(3)
    store.update(cuda=torch.zeros(8, dtype=torch.uint8), mps=torch.zeros(8, dtype=torch.uint8))
    common.set_rng_state(state, dev)
    assert torch.equal(torch.get_rng_state(), saved["cpu"])
    if device != "cpu":
        assert torch.equal(store[device], saved[device])
    # a checkpoint from another device type restores what applies (the CPU generator) and skips the rest
    torch.rand(3)
    store.update(cuda=torch.zeros(8, dtype=torch.uint8), mps=torch.zeros(8, dtype=torch.uint8))
    common.set_rng_state(saved, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), saved["cpu"])
    assert not store["cuda"].any() and not store["mps"].any()


def test_mac_chip_is_recorded(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(mnv4.device, "_sysctl", lambda key: "Apple M4" if key == "machdep.cpu.brand_string" else None)
    assert common.device_name(torch.device("mps")) == "Apple M4 (MPS)"


def test_a_cpu_run_records_the_cpu_its_vector_unit_and_threads(monkeypatch):
    """The same CPU name ("AMD EPYC") covers machines that train at different speeds, with AVX-512 or AVX2 only: a
    run's config.json (each resumed segment too) must tell them apart, and say how many threads it ran on."""
    monkeypatch.setattr(mnv4.device, "cpu_model", lambda: "AMD EPYC")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert common.device_name(torch.device("cpu")) == "AMD EPYC, AVX512, 7 threads"


def test_peak_memory_on_mps_is_not_invented():
    """PyTorch keeps no peak for MPS: report none rather than the current allocation under a peak's name."""
    assert common.peak_memory_mb(torch.device("mps")) is None


def test_risky_mps_options_warn(monkeypatch, capsys):
    args = mobilenetv4_enhanced.parse_args(["--compile"])
    warnings = common.device_warnings(torch.device("mps"), args)
    assert len(warnings) == 1 and "--compile" in warnings[0] and "prototype" in warnings[0]
    assert common.device_warnings(torch.device("cuda", 0), args) == []


def test_nccl_is_given_its_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    environ = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    common.Distributed(environ).init(torch.device("cuda", 1))
    common.Distributed(environ).init(torch.device("cpu"))
    assert calls == [("nccl", {"device_id": torch.device("cuda", 1)}), ("gloo", {})]


def accelerator_present():
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return torch.cuda.is_available() or mps


def test_select_device_cpu_and_auto():
    assert common.select_device("cpu") == torch.device("cpu")
    assert common.select_device("cpu", local_rank=1) == torch.device("cpu")
    if not accelerator_present():
        assert common.select_device("auto") == torch.device("cpu")
        assert common.select_device() == torch.device("cpu")
        assert common.select_device("auto", local_rank=0) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_select_device_cuda_unavailable():
    with pytest.raises(common.UserError, match="--device"):
        common.select_device("cuda")
    with pytest.raises(common.UserError, match="--device"):
        common.select_device("cuda", local_rank=0)


def test_select_device_unknown():
    with pytest.raises(common.UserError, match="--device"):
        common.select_device("tpu")


def test_default_channels_last_by_device():
    # Measured default (benchmarks/model_step.py): channels_last on CPU and CUDA, contiguous on MPS (unmeasured).
    assert common.default_channels_last(torch.device("cpu")) is True
    assert common.default_channels_last(torch.device("cuda")) is True
    assert common.default_channels_last(torch.device("mps")) is False


# ---------------------------------------------------------------------------------------------------
# 5. MPS: what the running torch can do, or one line naming the torch that can
# ---------------------------------------------------------------------------------------------------
def stand_in_run(device: str, amp_dtype):
    """What Run.autocast reads of a run: its device and autocast dtype."""
    return SimpleNamespace(
        device=torch.device(device, 0) if device == "cuda" else torch.device(device), amp_dtype=amp_dtype
    )


AMP_ON = {"cpu": "bf16", "cuda": "auto", "mps": "fp16"}  # the mode a user turns AMP on with, per device type


@pytest.mark.parametrize("amp", ["off", "on"])
@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_the_runs_precision_context_builds_for_every_device_type(device, amp, monkeypatch):
    """The context every training step (Run.autocast) and evaluation batch enter, with the running torch's own
    torch.autocast. AMP off builds none: before torch 2.5 `torch.autocast("mps", enabled=False)` raises in its
    constructor, so on the floor version (CI's second environment) this fails if one is built again. AMP on builds
    the autocast the device's dtype names, or refuses in one line naming the torch it needs (MPS fp16: 2.8)."""
    if device == "cuda":
        fake_gpu(monkeypatch, (9, 0))
    mode = AMP_ON[device] if amp == "on" else "off"
    dev = stand_in_run(device, None).device
    if device == "mps" and amp == "on" and mnv4.device.torch_release() < (2, 8):
        with pytest.raises(common.UserError, match=r"^--amp fp16 needs torch 2\.8 or later on MPS") as refused:
            common.autocast_dtype(dev, mode)
        assert "\n" not in str(refused.value)
        return
    dtype = common.autocast_dtype(dev, mode)
    assert (dtype is None) == (amp == "off")
    with common.Run.autocast(stand_in_run(device, dtype)), mnv4.device.precision_context(dev, dtype):
        if dtype is not None:  # (torch before 2.5 cannot even ask whether MPS autocasts)
            assert torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == dtype


def test_no_autocast_is_built_when_amp_is_off(monkeypatch):
    """Neither a training step nor evaluation constructs torch.autocast for fp32, whatever the device type."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.autocast{args} built for an fp32 run")

    model = common.mobilenetv4("conv_small", width_mult=0.25)
    monkeypatch.setattr(torch, "autocast", refuse)
    for device in ("cpu", "cuda", "mps"):
        with common.Run.autocast(stand_in_run(device, None)):
            pass
    probs = mnv4.evaluation.predict_probs(model, torch.zeros(4, 3, 32, 32, dtype=torch.uint8), autocast=None)
    assert probs.shape == (4, 10)


def with_torch(monkeypatch, version: str):
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)


@pytest.mark.parametrize(
    "version, amp, needs",
    [
        ("2.4.1", "fp16", "2.8"),
        ("2.7.1", "fp16", "2.8"),
        ("2.4.1", "bf16", "2.6"),
        ("2.5.1", "bf16", "2.6"),
        ("2.8.0", "fp16", None),
        ("2.6.0", "bf16", None),
        ("2.4.1", "auto", None),
    ],
)
def test_amp_on_mps_runs_what_it_records_or_names_the_torch_it_needs(version, amp, needs, monkeypatch):
    with_torch(monkeypatch, version)
    mps = torch.device("mps")
    if needs is None:
        expected = {"fp16": torch.float16, "bf16": torch.bfloat16, "auto": None}[amp]
        assert common.autocast_dtype(mps, amp) == expected
        return
    with pytest.raises(common.UserError) as refused:
        common.autocast_dtype(mps, amp)
    message = str(refused.value)
    assert "\n" not in message and f"--amp {amp} needs torch {needs}" in message and version in message
    assert "--amp off" in message


def test_bf16_on_mps_before_macos_14_is_refused(monkeypatch):
    with_torch(monkeypatch, "2.6.0")
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: major < 14)
    with pytest.raises(common.UserError, match=r"^--amp bf16 on MPS needs macOS 14"):
        common.autocast_dtype(torch.device("mps"), "bf16")


def test_an_autocast_torch_turns_off_is_refused_rather_than_recorded():
    """torch disables autocast with a warning where it cannot run it (here CUDA autocast with no GPU): the run would
    be fp32 while config.json says bf16, so it is refused in one line."""
    with pytest.raises(common.UserError) as refused:
        mnv4.device.check_precision(torch.device("cuda", 0), torch.bfloat16)
    assert "\n" not in str(refused.value) and "--amp bf16" in str(refused.value) and "--amp off" in str(refused.value)
    mnv4.device.check_precision(torch.device("cpu"), torch.bfloat16)  # one torch runs: no refusal
    mnv4.device.check_precision(torch.device("mps"), None)


@pytest.mark.parametrize("version, exact", [("2.4.1", False), ("2.5.0", True), ("2.10.0+cpu", True)])
def test_mid_epoch_resume_on_mps_is_exact_or_refused(version, exact, monkeypatch):
    with_torch(monkeypatch, version)
    mnv4.device.check_exact_resume(torch.device("cpu"))  # the CPU's generator always restores
    if exact:
        mnv4.device.check_exact_resume(torch.device("mps"))
        return
    with pytest.raises(common.UserError) as refused:
        mnv4.device.check_exact_resume(torch.device("mps"))
    assert "\n" not in str(refused.value) and "torch 2.5" in str(refused.value) and "Philox" in str(refused.value)


def test_a_mid_epoch_checkpoint_on_mps_before_torch_2_5_is_refused_in_one_line(tiny_cifar, tmp_path, monkeypatch):
    """Through the script: the refusal comes before any output is written (the run never starts)."""
    out = tmp_path / "run"
    original, steps = common.Run.step_done, [0]

    def stop_after_step_2(self, loss, logits, labels):
        steps[0] += 1
        if steps[0] == 2:
            self.stop.signum = signal.SIGINT
        return original(self, loss, logits, labels)

    with monkeypatch.context() as patch:
        patch.setattr(common.Run, "step_done", stop_after_step_2)
        code, _, _, err = run_main(mobilenetv4_baseline, [*TINY, "--data-dir", tiny_cifar, "--output-dir", out])
    assert code == 128 + signal.SIGINT, err
    fake_mps(monkeypatch)
    with_torch(monkeypatch, "2.4.1")
    resumed = tmp_path / "resumed"
    argv = [*TINY, "--device", "mps", "--data-dir", tiny_cifar, "--resume", out / "last.pt", "--output-dir", resumed]
    code, _, _, err = run_main(mobilenetv4_baseline, argv)
    assert code == 2 and err.count("\n") == 1 and "torch 2.5" in err and "mid-epoch" in err, err
    assert not resumed.exists()


def test_torch_release_reads_major_and_minor():
    assert mnv4.device.torch_release("2.4.1+cu121") == (2, 4)
    assert mnv4.device.torch_release("2.10.0a0+git1234") == (2, 10)
    assert mnv4.device.torch_release("2.5") == (2, 5)


@pytest.mark.parametrize("test_only", [False, True])
def test_channels_last_on_mps_is_refused(test_only, monkeypatch):
    """PyTorch's MPS BatchNorm backward gave wrong weight gradients for channels_last inputs (pytorch/pytorch#175189,
    silent on macOS 14), its convolution backward mishandled channels_last gradients (#142344), and its forward
    convolution read channel slices of channels_last tensors wrongly (#180984): evaluation is refused as well as
    training. The default layout there is contiguous."""
    fake_mps(monkeypatch)
    args = mobilenetv4_enhanced.parse_args(
        ["--device", "mps", "--channels-last", *(["--test-only", "--resume", "best.pt"] * test_only)]
    )
    with pytest.raises(common.UserError) as refused:
        mnv4.device.run_device(args, common.Distributed({}))
    assert "\n" not in str(refused.value) and "drop --channels-last" in str(refused.value)
    assert "#180984" in str(refused.value)
    cpu = mobilenetv4_enhanced.parse_args(["--device", "cpu", "--channels-last"])
    assert mnv4.device.run_device(cpu, common.Distributed({}))[2] is True


def test_evaluating_attention_on_mps_is_not_refused(monkeypatch):
    """The attention check is about gradients: --test-only of hybrid_medium on an MPS torch older than 2.6 runs."""
    fake_mps(monkeypatch)
    with_torch(monkeypatch, "2.5.1")
    evaluate = mobilenetv4_enhanced.parse_args(
        ["--device", "mps", "--variant", "hybrid_medium", "--test-only", "--resume", "b.pt"]
    )
    device, _, channels_last = mnv4.device.run_device(evaluate, common.Distributed({}))
    assert device.type == "mps" and channels_last is False
    train = mobilenetv4_enhanced.parse_args(["--device", "mps", "--variant", "hybrid_medium"])
    with pytest.raises(common.UserError, match="needs torch 2.6"):
        mnv4.device.run_device(train, common.Distributed({}))


@pytest.mark.parametrize("version, refused", [("2.4.1", True), ("2.5.1", True), ("2.6.0", False), ("2.14.1", False)])
def test_training_attention_on_mps_names_the_torch_it_needs(version, refused, monkeypatch):
    """The hybrid variants' key/value projections receive gradients transposed (channels_last strides) from the
    attention; torch 2.5's MPS convolution backward gave wrong input gradients for those on macOS 13-14 and failed
    on macOS 15 (pytorch/pytorch#142344, fixed for 2.6 by #143196); older releases are not verified."""
    with_torch(monkeypatch, version)
    mps, hybrid = torch.device("mps"), "hybrid_medium"
    assert mnv4.model.ATTENTION_VARIANTS == ("hybrid_medium",)
    mnv4.device.check_mps_training(mps, "conv_medium")
    mnv4.device.check_mps_training(torch.device("cpu"), hybrid)
    if not refused:
        mnv4.device.check_mps_training(mps, hybrid)
        return
    with pytest.raises(common.UserError) as error:
        mnv4.device.check_mps_training(mps, hybrid)
    message = str(error.value)
    assert "\n" not in message and "needs torch 2.6" in message and version in message


def test_the_script_checks_attention_on_mps_before_training(tiny_cifar, tmp_path, monkeypatch):
    fake_mps(monkeypatch)
    with_torch(monkeypatch, "2.5.1")
    argv = [*TINY, "--device", "mps", "--variant", "hybrid_medium", "--data-dir", tiny_cifar, "--output-dir", tmp_path]
    code, _, _, err = run_main(mobilenetv4_enhanced, argv)
    assert code == 2 and err.count("\n") == 1 and "torch 2.6" in err, err


def test_seeding_turns_deterministic_mode_off_again(monkeypatch):
    """Several main() calls share a process (tests, ablation.py): a --deterministic run left the next run in
    deterministic mode with cuDNN's autotuner off."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        mnv4.device.seed_everything(0, True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is False
        mnv4.device.seed_everything(0, False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is True
    finally:
        torch.use_deterministic_algorithms(before)
