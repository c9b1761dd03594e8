#!/usr/bin/env python
"""The fixed-step solver's own cost, with the network taken out: odenet against a hand-written loop.

`f(t, y) = y * w` (one elementwise multiply by a parameter), so a solve's time is almost all
loop: what odenet adds on top of the N residual updates a ResNet would run. Prints, forward
(no grad) and for a training step (solve, `y(T).square().mean()`, backward), the median time per
solve of `odenet.odeint(f, y0, [0, 1], solver=..., steps=N)` and of the hand-written loop
`y = y + h * f(t_i, y)` (classical RK4 for `--solver rk4`), and the difference in microseconds.

Both are `bench_solvers.py`'s own builders (`build_odenet`, `build_hand`, `make_unit`), timed by
its rounds (`timed_rounds`: shuffled order, one untimed run before each sample) with Python's
garbage collector off. The difference is what `bench_solvers.py --modes fixed` adds to
`N x t_f` at sizes where `f` is cheap.

    python benchmarks/loop_overhead.py                      # euler, 20 steps, [256, 2]
    python benchmarks/loop_overhead.py --solver rk4 --steps 10
    python benchmarks/loop_overhead.py --ablate             # what each of the loop's special paths saves

`--ablate` times odenet alone with each of the fixed-step loop's three special paths switched
off in turn (stage times kept as tensors per grid, the direct call of a checked `f`, the
written-out Euler step), interleaved with the loop as it is, and prints the median extra
time per solve and per step that switching each off costs (the paths' comments cite it).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Optional, Sequence

import torch
from torch import nn

import odenet

if str(Path(__file__).resolve().parent) not in sys.path:  # the solverbench package lives next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
# the same builders and timing as bench_solvers.py
from solverbench.adapters import BUILDERS  # noqa: E402
from solverbench.config import Size  # noqa: E402
from solverbench.problems import Problem  # noqa: E402
from solverbench.timing import Case, make_unit, timed_rounds  # noqa: E402


class Scale(nn.Module):
    """`f(t, y) = y * w`: as cheap as a field with a parameter gets."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim))

    def forward(self, t, y):
        return y * self.w


def timed(cases, repeats: int, inner: int) -> Dict[str, float]:
    """Median seconds per solve of each case, timed as `bench_solvers.py` times its cases but with a
    fixed number of back-to-back solves per sample."""
    for c in cases:
        c.inner = inner
        for _ in range(20):
            c.unit()
    gc.collect()
    timed_rounds(cases, SimpleNamespace(repeats=repeats, seed=0, device="cpu"), ("f",), None)
    for c in cases:
        if c.error is not None:
            raise RuntimeError(f"{c.library} failed: {c.error}")
    return {f"{c.library} {'train' if c.train else 'forward'}": statistics.median(c.times) for c in cases}


def _ablations(solver):
    """The loop's special paths, each as a function that switches it off and returns its undo."""
    integrate = importlib.import_module("odenet.solvers.integrate")  # the module (odenet.solvers.integrate is its function)

    def patch(obj, name, value):
        old = getattr(obj, name)
        setattr(obj, name, value)
        return lambda: setattr(obj, name, old)

    return {
        "stage times as tensors per grid": lambda: patch(integrate, "_stage_times", lambda plan, *_: plan.times),
        "direct call of a checked f": lambda: patch(integrate.CountedFunc, "bare", lambda self: None),
        "written-out Euler step": lambda: patch(solver, "_single", False),
    }


def ablate(module, y0, steps: int, repeats: int, inner: int) -> Dict[str, Dict[str, float]]:
    """Median extra µs per solve when each special path is off, forward and train (paired with
    the loop as it is, in interleaved rounds)."""
    solver = odenet.solvers.Euler()
    t = torch.tensor([0.0, 1.0])

    def solve(train: bool):
        if train:
            odenet.odeint(module, y0, t, solver=solver, steps=steps).ys[-1].square().mean().backward()
        else:
            with torch.no_grad():
                odenet.odeint(module, y0, t, solver=solver, steps=steps)

    out = {}
    for train in (False, True):
        diffs = {name: [] for name in _ablations(solver)}
        for r in range(repeats):
            for name, switch_off in _ablations(solver).items():
                seconds = {}
                for off in (False, True) if r % 2 else (True, False):  # either order, in turn
                    undo = switch_off() if off else (lambda: None)
                    for _ in range(3):
                        solve(train)
                    start = time.perf_counter()
                    for _ in range(inner):
                        solve(train)
                    seconds[off] = (time.perf_counter() - start) / inner
                    undo()
                diffs[name].append(seconds[True] - seconds[False])
        out["train" if train else "forward"] = {k: statistics.median(v) * 1e6 for k, v in diffs.items()}
    return out


def _commit() -> str:
    """The commit of the odenet that is imported (which may be another checkout than this script's)."""
    where = Path(odenet.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=where, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True,
                               cwd=where, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes" if dirty else "")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """Check that both loops agree, time them, print the table; returns the medians per phase."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--solver", choices=("euler", "rk4"), default="euler", help="fixed-step solver (default euler)")
    p.add_argument("--steps", type=int, default=20, help="N steps over [0, 1] (default 20)")
    p.add_argument("--shape", default="256x2", help="state shape, e.g. 256x2 (default)")
    p.add_argument("--repeats", type=int, default=30, help="timed samples per case; the median is reported (default 30)")
    p.add_argument("--inner", type=int, default=10, help="back-to-back solves per sample (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--ablate", action="store_true", help="time each special path of the loop switched off (euler only)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.repeats < 1 or a.inner < 1 or a.threads < 1:
        p.error("--steps, --repeats, --inner and --threads must be >= 1")
    try:
        shape = tuple(int(x) for x in a.shape.lower().split("x"))
    except ValueError:
        p.error(f"--shape takes sizes joined by 'x', such as 256x2; got {a.shape!r}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    module = Scale(shape[-1])
    y0 = torch.randn(shape)
    size = Size(a.shape, "mlp", shape, 0)
    if a.ablate:
        return _print_ablation(ablate(module, y0, a.steps, a.repeats, a.inner), a, argv, shape)
    prob = Problem(size, module, module, y0, [0.0, 1.0], torch.tensor([0.0, 1.0]))
    solves = {lib: BUILDERS[lib](prob, a.solver, "direct", a.steps, None) for lib in ("odenet", "hand")}
    with torch.no_grad():
        for name, solve in solves.items():  # the same arithmetic, so the same result
            torch.testing.assert_close(solve(y0)[0], solves["hand"](y0)[0], rtol=1e-5, atol=1e-6, msg=name)
    cases = [Case("fixed", size, a.solver, lib, "direct" if train else None, steps=a.steps, train=train,
                        unit=make_unit(solve, prob, train))
             for lib, solve in solves.items() for train in (False, True)]
    med = timed(cases, a.repeats, a.inner)
    args = list(argv if argv is not None else [])
    print(f"- command: `{' '.join(['python benchmarks/loop_overhead.py', *args])}`")
    print(f"- odenet at git commit {_commit()}, torch {torch.__version__}, threads {a.threads}, state {list(shape)}, "
          f"{a.solver} x {a.steps} steps, {a.repeats} samples of {a.inner} solves (median)")
    print()
    print("| phase | odenet | hand loop | odenet - hand | per step |")
    print("|---|---|---|---|---|")
    out = {}
    for phase in ("forward", "train"):
        o, h = med[f"odenet {phase}"], med[f"hand {phase}"]
        out[phase] = dict(odenet_s=o, hand_s=h)
        print(f"| {phase} | {o * 1e6:.1f} µs | {h * 1e6:.1f} µs | {(o - h) * 1e6:.1f} µs | {(o - h) * 1e6 / a.steps:.2f} µs |")
    return out


def _print_ablation(res, a, argv, shape):
    print(f"- command: `{' '.join(['python benchmarks/loop_overhead.py', *(argv or [])])}`")
    print(f"- odenet at git commit {_commit()}, torch {torch.__version__}, threads {a.threads}, state {list(shape)}, "
          f"euler x {a.steps} steps, {a.repeats} paired samples of {a.inner} solves (median of differences)")
    print()
    print("| special path switched off | forward: extra per solve | per step | train: extra per solve | per step |")
    print("|---|---|---|---|---|")
    for name in res["forward"]:
        fw, tr = res["forward"][name], res["train"][name]
        print(f"| {name} | {fw:.1f} µs | {fw / a.steps:.2f} µs | {tr:.1f} µs | {tr / a.steps:.2f} µs |")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
