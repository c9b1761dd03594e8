#!/usr/bin/env python
"""The fixed-step solver's own cost, with the network taken out: odenet against a hand-written loop.

`f(t, y) = y * w` (one elementwise multiply by a parameter), so a solve's time is almost all
loop: what odenet adds on top of the N residual updates a ResNet would run. Prints, forward
(no grad) and for a training step (solve, `y(T).square().mean()`, backward), the median time per
solve of `odenet.odeint(f, y0, [0, 1], solver=..., steps=N)` and of the hand-written loop
`y = y + h * f(t_i, y)` (classical RK4 for `--solver rk4`), and the difference in microseconds.

Both run interleaved in one process, each sample after one untimed run of the same solve, with
Python's garbage collector off, as in `bench_solvers.py`. The difference is what
`bench_solvers.py --modes fixed` adds to `N x t_f` at sizes where `f` is cheap.

    python benchmarks/loop_overhead.py                      # euler, 20 steps, [256, 2]
    python benchmarks/loop_overhead.py --solver rk4 --steps 10
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

import odenet


def hand_loop(f, solver: str, steps: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """N residual updates (euler) or classical RK4 steps over [0, 1], times made in advance."""
    h = 1.0 / steps
    t = [torch.tensor(i * h) for i in range(steps + 1)]
    mid = [torch.tensor((i + 0.5) * h) for i in range(steps)]
    if solver == "euler":
        def loop(y):
            for i in range(steps):
                y = torch.add(y, f(t[i], y), alpha=h)
            return y
    else:
        def loop(y):
            for i in range(steps):
                k1 = f(t[i], y)
                k2 = f(mid[i], y + (h / 2) * k1)
                k3 = f(mid[i], y + (h / 2) * k2)
                k4 = f(t[i + 1], y + h * k3)
                y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
            return y
    return loop


def timed(units: Dict[str, Callable[[], object]], repeats: int, inner: int) -> Dict[str, float]:
    """Median seconds per call of each unit: rounds in shuffled order, one untimed call first."""
    order = random.Random(0)
    samples: Dict[str, List[float]] = {k: [] for k in units}
    for u in units.values():
        for _ in range(20):
            u()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            names = list(units)
            order.shuffle(names)
            for name in names:
                units[name]()
                s = time.perf_counter()
                for _ in range(inner):
                    units[name]()
                samples[name].append((time.perf_counter() - s) / inner)
    finally:
        gc.enable()
    return {k: statistics.median(v) for k, v in samples.items()}


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--solver", choices=("euler", "rk4"), default="euler", help="fixed-step solver (default euler)")
    p.add_argument("--steps", type=int, default=20, help="N steps over [0, 1] (default 20)")
    p.add_argument("--shape", default="256x2", help="state shape, e.g. 256x2 (default)")
    p.add_argument("--repeats", type=int, default=30, help="timed samples per case; the median is reported (default 30)")
    p.add_argument("--inner", type=int, default=10, help="back-to-back solves per sample (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.repeats < 1 or a.inner < 1 or a.threads < 1:
        p.error("--steps, --repeats, --inner and --threads must be >= 1")
    try:
        shape = tuple(int(x) for x in a.shape.lower().split("x"))
    except ValueError:
        p.error(f"--shape takes sizes joined by 'x', such as 256x2; got {a.shape!r}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    w = torch.randn(shape[-1], requires_grad=True)

    def f(t, y):
        return y * w

    y0 = torch.randn(shape)
    y0t = y0.clone().requires_grad_(True)
    solves = {
        "odenet": lambda y: odenet.odeint(f, y, [0.0, 1.0], solver=a.solver, steps=a.steps).ys[-1],
        "hand": hand_loop(f, a.solver, a.steps),
    }
    with torch.no_grad():
        for name, solve in solves.items():  # the same arithmetic, so the same result
            torch.testing.assert_close(solve(y0), solves["hand"](y0), rtol=1e-5, atol=1e-6, msg=name)

    def forward(solve):
        def unit():
            with torch.no_grad():
                return solve(y0)
        return unit

    def train(solve):
        def unit():
            w.grad = y0t.grad = None
            solve(y0t).square().mean().backward()
        return unit

    units = {f"{name} {phase}": make(solve) for name, solve in solves.items()
             for phase, make in (("forward", forward), ("train", train))}
    med = timed(units, a.repeats, a.inner)
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


if __name__ == "__main__":
    main(sys.argv[1:])
