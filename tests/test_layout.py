"""The library's layout: one concern per module, imports pointing one way, small classes whose attributes are all
set in __init__, and imports without side effects. Checked on the source (ast), so a change that breaks a rule
fails here rather than in review."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top: a module may import only modules listed before it.
LAYERS = [
    "errors",
    "blocks",
    "model",
    "data",
    "augment",
    "batches",
    "device",
    "distributed",
    "files",
    "checkpoint",
    "cli",
    "optim",
    "provenance",
    "evaluation",
    "meter",
    "report",
    "stop",
    "epochs",
    "run",
]
# The study tool behind ablation.py, in the same order: a module may import only modules listed before it.
STUDY_LAYERS = ["rows", "finished", "catalog", "stats", "plan", "runner", "results", "report", "cli"]
PACKAGES = {"mnv4": LAYERS, "studies": STUDY_LAYERS}
MODULES = [(package, name) for package, layers in PACKAGES.items() for name in layers]
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 150


def modules(package="mnv4") -> dict:
    folder = ROOT / package
    return {path.stem: ast.parse(path.read_text()) for path in sorted(folder.glob("*.py")) if path.stem != "__init__"}


def imported_siblings(tree, package="mnv4") -> set:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:  # from . import x
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{package}."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith(f"{package}."))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_has_a_layer(package):
    assert sorted(modules(package)) == sorted(PACKAGES[package])


@pytest.mark.parametrize("package, name", MODULES)
def test_imports_point_one_way(package, name):
    layers = PACKAGES[package]
    below = set(layers[: layers.index(name)])
    upward = imported_siblings(modules(package)[name], package) - below
    assert not upward, f"{package}/{name}.py imports {sorted(upward)}, which sit above it in {layers}"


@pytest.mark.parametrize("package, name", MODULES)
def test_modules_and_classes_stay_small(package, name):
    path = ROOT / package / f"{name}.py"
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(modules(package)[name]):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= MAX_CLASS_LINES, f"class {node.name} in {package}/{name}.py"


def test_the_entry_points_stay_under_the_module_limit():
    """The scripts and tools at the top (the entry points over the packages) and the benchmarks keep to the
    packages' limit too, so no concern grows back into one file."""
    paths = sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert {p.name: n for p in paths if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES} == {}


def assigned_self_attributes(function) -> set:
    names = set()
    for node in ast.walk(function):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.For)):
            targets = [node.target]
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                    names.add(leaf.attr)
    return names


@pytest.mark.parametrize("package, name", MODULES)
def test_every_attribute_is_set_in_init(package, name):
    for cls in [n for n in ast.walk(modules(package)[name]) if isinstance(n, ast.ClassDef)]:
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        class_level = {
            t.id
            for n in cls.body
            if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Name)
        }
        known = class_level | (assigned_self_attributes(methods["__init__"]) if "__init__" in methods else set())
        for method in methods.values():
            late = assigned_self_attributes(method) - known
            assert not late, f"{cls.name}.{method.name} sets {sorted(late)}, which {cls.name}.__init__ does not"


def test_the_rule_catches_a_late_attribute():
    tree = ast.parse(
        "class A:\n    def __init__(self):\n        self.a = 1\n    def f(self):\n"
        "        self.a, self.b = 2, 3\n        for self.c in range(2): pass\n"
    )
    methods = {f.name: f for f in tree.body[0].body}
    assert assigned_self_attributes(methods["f"]) - assigned_self_attributes(methods["__init__"]) == {"b", "c"}


def test_importing_has_no_side_effects(tmp_path):
    """Importing common and every mnv4 and studies module in a fresh process changes no environment variable, no random
    state and no torch setting, and writes no file in the working directory. The snapshot is taken after the
    third-party imports (with TORCHINDUCTOR_CACHE_DIR unset, `import torchvision` itself sets it, which no code of
    common's can avoid); the process starts without the variables a module might be tempted to setdefault (thread
    counts, torch / CUDA knobs, torchrun's), so that setting a default is noticed too."""
    probe = f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, torchvision, torchvision.ops  # common's third-party imports
env, rng = dict(os.environ), torch.get_rng_state()
flags = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
import importlib
for name in ["common", *{[f"{p}.{m}" for p, m in MODULES]!r}]:
    importlib.import_module(name)
after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
print(json.dumps({{"env": sorted(set(os.environ.items()) ^ set(env.items())),
                  "rng": bool(torch.equal(rng, torch.get_rng_state())), "flags": after == flags}}))
"""
    prefixes = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "PYTORCH_", "TORCH", "CUDA", "CUBLAS", "NCCL", "MASTER_")
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONPATH" and not k.startswith(prefixes) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"env": [], "rng": True, "flags": True}
    assert list(tmp_path.iterdir()) == []
