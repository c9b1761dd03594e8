#!/usr/bin/env python
"""The spiral demo of `docs/tutorials/from-torchdiffeq.md`, timed: torchdiffeq against odenet.

Trains the page's `ODEFunc` (a 2-50-2 tanh MLP on `y**3`) on the page's task (batches of 20
spiral segments of 10 output times, RMSprop, lr 1e-3) with each way of calling the solver:

- `torchdiffeq.odeint` / `torchdiffeq.odeint_adjoint` (dopri5, rtol 1e-7, atol 1e-9: its defaults),
- `odenet.compat.odeint` / `odenet.compat.odeint_adjoint` (the same call, odenet's engine),
- `odenet.odeint(..., solver="dopri5", rtol=1e-7, atol=1e-9)` (direct and `gradient="adjoint"`).

Every way trains from the same initial weights on the same batches. In each round every way runs
`--iters` training iterations, in an order shuffled per round; the table gives the median time
per iteration over `--rounds` rounds, its ratio to torchdiffeq's, the evaluations of `f` per
iteration (forward and backward, counted inside `f`) and the final loss.

    python benchmarks/torchdiffeq_switch.py              # 7 rounds of 30 iterations (about a minute)
    python benchmarks/torchdiffeq_switch.py --rounds 1 --iters 3
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
import torchdiffeq
from torch import nn

import odenet
import odenet.compat

TRUE_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
TRUE_Y0 = torch.tensor([[2.0, 0.0]])
T = torch.linspace(0.0, 25.0, 1000)


class ODEFunc(nn.Module):
    """The page's field, counting its own evaluations (so every library is counted the same way)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.net(y**3)


def _odenet(gradient: str) -> Callable:
    def solve(func, y0, t):
        return odenet.odeint(func, y0, t, solver="dopri5", rtol=1e-7, atol=1e-9, gradient=gradient).ys
    return solve


WAYS: Dict[str, Callable] = {
    "torchdiffeq.odeint": torchdiffeq.odeint,
    "odenet.compat.odeint": odenet.compat.odeint,
    "odenet.odeint (direct)": _odenet("direct"),
    "torchdiffeq.odeint_adjoint": torchdiffeq.odeint_adjoint,
    "odenet.compat.odeint_adjoint": odenet.compat.odeint_adjoint,
    "odenet.odeint (adjoint)": _odenet("adjoint"),
}


def true_trajectory() -> torch.Tensor:
    """The data, made as the page makes it."""
    with torch.no_grad():
        return torchdiffeq.odeint(lambda t, y: torch.mm(y**3, TRUE_A), TRUE_Y0, T, method="dopri5")


def batches(true_y: torch.Tensor, n: int, seed: int, batch_size: int = 20, batch_time: int = 10):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        s = torch.randint(0, len(T) - batch_time, (batch_size,), generator=gen)
        out.append((true_y[s], T[:batch_time], torch.stack([true_y[s + i] for i in range(batch_time)], dim=0)))
    return out


def train(odeint: Callable, data, seed: int):
    """One run of `len(data)` iterations: seconds per iteration, evaluations per iteration, last loss."""
    torch.manual_seed(seed)
    func = ODEFunc()
    optimizer = torch.optim.RMSprop(func.parameters(), lr=1e-3)
    start = time.perf_counter()
    for batch_y0, batch_t, batch_y in data:
        optimizer.zero_grad()
        loss = torch.mean(torch.abs(odeint(func, batch_y0, batch_t) - batch_y))
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(data), func.nfe / len(data), loss.item()


def _machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} torch thread(s)"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Run the rounds and print the table; returns, per way, the medians and the last loss."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    p.add_argument("--iters", type=int, default=30, help="training iterations per run (default 30, as the page)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.iters < 1 or a.threads < 1:
        p.error("--rounds, --iters and --threads must be >= 1")
    torch.set_num_threads(a.threads)
    data = batches(true_trajectory(), a.iters, a.seed)
    runs: Dict[str, list] = {name: [] for name in WAYS}
    order = list(WAYS)
    for r in range(a.rounds):
        random.Random(r).shuffle(order)
        for name in order:
            runs[name].append(train(WAYS[name], data, a.seed))
    return _report(runs, a, argv)


def _report(runs: Dict[str, list], a, argv) -> Dict[str, dict]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    print(f"- command: `{' '.join(['python benchmarks/torchdiffeq_switch.py', *(argv or [])])}`")
    print(f"- machine: {_machine()}; torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, "
          f"odenet {odenet.__version__} at {commit}; {a.rounds} rounds of {a.iters} iterations")
    print()
    print("| way | ms / iteration | vs torchdiffeq | evaluations / iteration | final loss |")
    print("|---|---:|---:|---:|---:|")
    out = {}
    for name, rows in runs.items():
        out[name] = dict(seconds=statistics.median(r[0] for r in rows), nfe=rows[-1][1], loss=rows[-1][2])
    for name, res in out.items():
        ref = out["torchdiffeq.odeint_adjoint" if "adjoint" in name else "torchdiffeq.odeint"]["seconds"]
        print(f"| `{name}` | {res['seconds'] * 1e3:.2f} | {res['seconds'] / ref:.2f}x | {res['nfe']:.1f} | "
              f"{res['loss']:.4f} |")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
