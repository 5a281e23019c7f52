"""Mutation testing of the modules where a silent bug hurts most: each mutant is one small change to the code (an
operator, a constant, a deleted statement), run against a fast selection of the tests that cover its module; a
mutant the selection still passes is a survivor, written to the report (`make mutants`, results/mutants.md).

Written here rather than taken from mutmut: the suite's session fixtures train tiny runs, so a mutant is cheapest
in a fresh pytest process, and one forked from a parent that has already imported torch starts in well under a
second. Each worker mutates its own copy of the tracked files; bytecode is never written, so a mutant of the same
size and second as the original cannot be served a stale .pyc.

    python tools/mutants.py [--modules mnv4/meter.py ...] [--jobs 2] [--report results/mutants.md]
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.dont_write_bytecode = True
ROOT = Path(__file__).resolve().parents[1]

# module -> (sites: {function: words one of which a mutated line must hold (None: any line)}, or None for every
# line of the module; the test files, and a -k expression choosing the tests that cover it). Tests are chosen to
# run in seconds, in one pytest session per mutant (so the session fixtures' tiny runs are trained once): unit
# tests against independent references, and the few tiny runs that reach the module's behaviour. A file that
# does not exist in the revision tested is dropped.
HEAVY = {"mnv4/checkpoint.py", "mnv4/epochs.py", "mnv4/meter.py"}  # their selections train (and resume) tiny runs
SCHEDULES = {"cosine_between": None, "lr_factor": None, "make_optimizer": None}
TARGETS = {
    "mobilenetv4_enhanced.py": (
        {**SCHEDULES, "main": ("scheduler", "clip", "label_smoothing")},
        ["tests/test_schedules.py", "tests/test_training.py"],
        "onecycle_is or cosine_after or constant_schedule or opt_builds or (label_smoothing and enhanced) "
        "or lr_factor or onecycle_schedule_shape or sgd_onecycle_run or skipped_step",
    ),
    "mobilenetv4_baseline.py": (
        {"main": ("scheduler", "StepLR", "clip", "label_smoothing")},
        ["tests/test_schedules.py"],
        "baseline",
    ),
    "mnv4/optim.py": (
        None,
        ["tests/test_training.py", "tests/test_schedules.py"],
        "ema_warm_up or ema_equals or weight_decay_groups or opt_builds",
    ),
    "mnv4/evaluation.py": (
        None,
        ["tests/test_data.py", "tests/test_reporting.py", "tests/test_schedules.py"],
        "tta_table or evaluate or per_class_accuracy_by_hand or eval_batch_size or score_of_one",
    ),
    "mnv4/augment.py": (
        None,
        ["tests/test_data.py", "tests/test_devices.py"],
        "param or flip or crop or shift or angle or jitter or augment or geometry or translation or rotation "
        "or tta_views or cutout or hue",
    ),
    "mnv4/checkpoint.py": (
        None,
        ["tests/test_schedules.py", "tests/test_bad_input.py", "tests/test_training.py", "tests/test_faults.py"],
        "format_1 or cifar_stem or steplr or resume_unusable or checkpoint_of_another or checkpoint_of_the_other "
        "or baseline_resume_equals or crash_between or failed_save or output_dir_of_another",
    ),
    "mnv4/epochs.py": (
        None,
        ["tests/test_training.py", "tests/test_faults.py", "tests/test_schedules.py"],
        "baseline_resume_equals or skipped_step or sigint_mid_epoch or nan_loss or skip_nonfinite "
        "or (label_smoothing and baseline)",
    ),
    "mnv4/meter.py": (
        None,
        ["tests/test_faults.py", "tests/test_reporting.py", "tests/test_schedules.py"],
        "sigint_mid_epoch or nan_loss_stops or end_to_end or (label_smoothing and baseline)",
    ),
}


@dataclass
class Mutant:
    module: str
    line: int
    kind: str
    before: str
    after: str
    source: str  # the whole mutated module


SWAPS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip


def replacements(node: ast.AST):
    """(kind, replacement source) for each mutation of one node."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in SWAPS:
                new = copy.deepcopy(node)
                new.ops[i] = SWAPS[type(op)]()
                yield "comparison", f"({ast.unparse(new)})"
    elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
        new = copy.deepcopy(node)
        new.op = SWAPS[type(node.op)]()
        yield "operator", f"({ast.unparse(new)})"
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        yield "unary dropped", f"({ast.unparse(node.operand)})"
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        if isinstance(node.value, bool):
            yield "constant", repr(not node.value)
        elif isinstance(node.value, int):
            yield "constant", repr(node.value + 1)
        else:
            yield "constant", repr(node.value * 2 if node.value else 1.0)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
        new = copy.deepcopy(node)
        new.func.id = "max" if node.func.id == "min" else "min"
        yield "min/max", ast.unparse(new)
    elif isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant):
        yield "statement dropped", "pass"
    elif isinstance(node, ast.AugAssign) or (
        isinstance(node, ast.Assign) and all(isinstance(t, (ast.Attribute, ast.Subscript)) for t in node.targets)
    ):
        yield "statement dropped", "pass"


def skipped_nodes(tree: ast.AST) -> set[int]:
    """Nodes never mutated: f-strings (log and error text), docstrings, annotations and `raise` statements
    (what an error says is tested elsewhere, and every mutant of it is a message change)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) and ast.get_docstring(node) is not None:
            skip.add(id(node.body[0]))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            skip.update(id(n) for n in ast.walk(node.returns))
        if isinstance(node, ast.arg) and node.annotation is not None:
            skip.update(id(n) for n in ast.walk(node.annotation))
        if isinstance(node, ast.ClassDef):  # declared defaults (a dataclass's fields): the flags set the real ones
            skip.update(id(n) for field in node.body if isinstance(field, ast.AnnAssign) for n in ast.walk(field))
        if isinstance(node, (ast.JoinedStr, ast.Raise)):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def mutants(module: str, source: str) -> list[Mutant]:
    """Every mutant of `module` (its source text given) at the sites TARGETS allows."""
    sites = TARGETS[module][0]
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()))
    raw = source.encode()
    tree = ast.parse(source)
    skip = skipped_nodes(tree)
    scopes = (
        [(tree, None)]
        if sites is None
        else [(f, sites[f.name]) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in sites]
    )
    found, seen = [], set()
    for scope, words in scopes:
        for node in ast.walk(scope):
            if id(node) in skip or not hasattr(node, "lineno") or id(node) in seen:
                continue
            seen.add(id(node))
            text = lines[node.lineno - 1]
            if words is not None and not any(w in text for w in words):
                continue
            start = offsets[node.lineno - 1] + node.col_offset
            end = offsets[node.end_lineno - 1] + node.end_col_offset
            for kind, new in replacements(node):
                mutated = (raw[:start] + new.encode() + raw[end:]).decode()
                try:
                    compile(mutated, module, "exec")
                except SyntaxError:
                    continue
                before = raw[start:end].decode().splitlines()[0]
                found.append(Mutant(module, node.lineno, kind, before, new.splitlines()[0], mutated))
    return sorted(found, key=lambda m: (m.line, m.kind, m.after))


def invocations(module: str, root: Path) -> list[list[str]]:
    """The pytest argument list of a module's selection (files this revision lacks left out)."""
    _, files, expression = TARGETS[module]
    present = [f for f in files if (root / f).exists()]
    return [[*present, "-k", expression]] if present else []  # no test file: every mutant survives


def fork_pytest(workdir: Path, runs: list[list[str]]) -> int:
    """Start a child that runs each pytest argument list in `workdir` (-x, this process, no bytecode written) and
    exits 0 when all pass (or select nothing), 1 otherwise. Returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.chdir(workdir)
        sys.path[:0] = [str(workdir)]
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest

        flags = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-W", "ignore::UserWarning"]
        code = 0
        for argv in runs:
            if pytest.main([*argv, *flags]) not in (0, 5):  # 5: nothing selected
                code = 1
                break
    finally:
        os._exit(code)


def checkout(rev: str | None, into: Path) -> Path:
    """The files of `rev` (git archive), or of the working tree (tracked and untracked-but-not-ignored)."""
    into.mkdir(parents=True)
    if rev:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
        return into
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    ).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    return into


class Pool:
    """Runs mutants `jobs` at a time, each in its own copy of the checkout; a mutant that the selection still
    passes survives, one that fails it or runs past the timeout is killed."""

    def __init__(self, rev: str | None, jobs: int, scratch: Path):
        self.slots = [checkout(rev, scratch / f"w{i}") for i in range(jobs)]
        self.running = {}  # pid -> (slot, mutant, original source, deadline)

    def run(self, mutant: Mutant | None, module: str, runs: list[list[str]], timeout: float, on_done):
        while len(self.running) == len(self.slots):
            self._reap(on_done)
        slot = next(s for s in self.slots if s not in {r[0] for r in self.running.values()})
        path = slot / module
        original = path.read_text()
        if mutant is not None:
            path.write_text(mutant.source)
        pid = fork_pytest(slot, runs)
        self.running[pid] = (slot, mutant, path, original, time.monotonic() + timeout, time.monotonic())

    def drain(self, on_done):
        while self.running:
            self._reap(on_done)

    def _reap(self, on_done):
        time.sleep(0.05)
        for pid, (_, mutant, path, original, deadline, started) in list(self.running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            timed_out = not done and time.monotonic() > deadline
            if timed_out:
                os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
            if done:
                del self.running[pid]
                path.write_text(original)
                passed = not timed_out and os.waitstatus_to_exitcode(status) == 0
                on_done(mutant, passed, timed_out, time.monotonic() - started)


def report(results: dict, seconds: float, jobs: int, rev: str | None, argv: list[str]) -> str:
    lines = [
        "# Surviving mutants",
        "",
        f"`python tools/mutants.py {' '.join(argv)}`".replace("  ", " "),
        f"({'revision ' + rev if rev else 'the working tree'}; {jobs} worker(s); {seconds / 60:.1f} min). "
        "A mutant is one small change to a module (tools/mutants.py lists the kinds and the sites); it is "
        "killed when the module's test selection fails (or hangs), and survives when it passes. "
        "Why each survivor is harmless: docs/DESIGN.md, 'Mutation testing'.",
        "",
        "| module | killed / total | of the killed, by timeout | selection time (s) |",
        "|---|---|---|---|",
    ]
    for module, entry in results.items():
        killed = sum(1 for _, passed in entry["mutants"] if not passed)
        row = f"| {module} | {killed} / {len(entry['mutants'])} | {entry['timeouts']} | {entry['baseline_s']:.0f} |"
        lines.append(row)
    for module, entry in results.items():
        survivors = [m for m, passed in entry["mutants"] if passed]
        if survivors:
            lines += ["", f"## {module}", ""]
            lines += [f"- line {m.line}, {m.kind}: `{m.before}` -> `{m.after}`" for m in survivors]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (one per core)")
    parser.add_argument("--rev", help="mutate and test this git revision's files instead of the working tree")
    parser.add_argument("--report", help="write the survivors here (markdown)")
    parser.add_argument(
        "--sample", type=int, default=0, help="at most this many mutants per module, drawn with a fixed seed (0: all)"
    )
    parser.add_argument("--sample-heavy", type=int, default=0, help="--sample for the modules in HEAVY")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported once here, so every forked child starts warm)
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    start, results = time.monotonic(), {}
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        pool = Pool(args.rev, args.jobs, Path(scratch))
        source_root = pool.slots[0]
        for module in args.modules:
            runs = invocations(module, source_root)
            entry = results[module] = {"mutants": [], "baseline_s": 0.0, "timeouts": 0}

            def baseline_done(_, passed, timed_out, seconds, module=module, entry=entry):
                if not passed:
                    sys.exit(f"{module}: its test selection fails without any mutant; fix that first")
                entry["baseline_s"] = seconds

            pool.run(None, module, runs, 1800, baseline_done)
            pool.drain(baseline_done)
            found = mutants(module, (source_root / module).read_text())
            cap = args.sample_heavy if module in HEAVY and args.sample_heavy else args.sample
            if cap and len(found) > cap:
                found = sorted(random.Random(0).sample(found, cap), key=lambda m: (m.line, m.kind, m.after))
            print(f"{module}: {len(found)} mutants, selection {entry['baseline_s']:.0f} s", flush=True)

            def done(mutant, passed, timed_out, seconds, entry=entry):
                entry["mutants"].append((mutant, passed))
                entry["timeouts"] += timed_out
                verdict = "SURVIVED" if passed else ("killed (timeout)" if timed_out else "killed")
                print(
                    f"  {mutant.module}:{mutant.line} {mutant.kind}: {mutant.after[:60]} {verdict} {seconds:.0f}s",
                    flush=True,
                )

            for mutant in found:
                # A hang is the only thing the timeout is for: generous, so a busy machine never turns a slow
                # survivor into a kill.
                pool.run(mutant, module, runs, max(300.0, 10 * entry["baseline_s"]), done)
            pool.drain(done)
            entry["mutants"].sort(key=lambda item: (item[0].line, item[0].kind))
            text = report(
                results, time.monotonic() - start, args.jobs, args.rev, sys.argv[1:] if argv is None else argv
            )
            if args.report:  # after every module, so a run stopped early still reports the modules it finished
                Path(args.report).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
