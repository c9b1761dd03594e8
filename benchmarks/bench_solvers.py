#!/usr/bin/env python
"""Benchmark odenet's solvers against torchdiffeq and torchode (issue 4).

All libraries solve the *same* problem in one process: the same `f` module (same
weights), the same initial state, the same output times, tolerances, device and dtype.
Inside every repeat the libraries run one after the other (interleaved, in an order
shuffled every repeat), so that drift of a shared machine hits them alike; the reported time is the
median over the repeats, CUDA-synchronised.

Modes (``--modes``):

- ``forward``: a solve without gradients (adaptive solvers). Reports NFE,
  accepted/rejected steps, median time, the solver overhead
  ``time / (NFE x time of one f call)`` (1.0: the solver costs nothing beyond f) and
  the time ratio to each peer.
- ``train-direct``, ``train-adjoint``, ``train-checkpoint``: one training step (solve,
  ``loss = y(t1).square().mean()``, times ``--loss-scale``, ``loss.backward()``) with that
  gradient method.
  Peers without checkpointing run their backprop-through-the-solver instead. Also
  reports the activation bytes saved for backward during the forward solve and, on
  CUDA, peak allocated memory. The overhead of a training step is its time over the
  floor ``(evals without graph) x t_f + (evals backpropagated) x t_fb``, where ``t_fb``
  is one `f` call with autograd plus its vector-Jacobian product.
- ``fixed``: fixed-step solvers (``--fixed-solvers``, ``--fixed-steps`` N) against a
  hand-written loop of N residual updates (the floor for a ResNet), forward and
  training step. Also counts host reads of device values per step (syncs on CUDA),
  and on CUDA replays odenet's fixed-step solve from a CUDA graph.
- ``memory``: activation bytes saved for backward (and CUDA peak memory) against the
  number of fixed steps (``--memory-steps``) for direct, checkpoint and adjoint.
- ``seminorm``: backward NFE of the adjoint with and without the seminorm
  (Kidger et al. 2021), for odenet and torchdiffeq.

Results go to ``<out>.json`` and ``<out>.md`` and the markdown is printed. Run
``python benchmarks/bench_solvers.py --help`` for every flag; ``--quick`` is a
seconds-long smoke configuration (used by ``tests/test_benchmarks.py``).

Notes on fairness:

- `f` is autonomous (it ignores `t`), so every library sees exactly the same vector field.
- torchode solves a batch of independent problems with one step size each; to solve
  the same problem as odenet and torchdiffeq (one step size for the whole state), the
  state is handed to torchode flattened as one problem of shape ``[1, numel]``. torchode
  runs with ``IntegralController`` (torchdiffeq's controller), odenet with its default
  controller; NFE can therefore differ, which is why the overhead divides by NFE.
- torchdiffeq's ``rk4`` is the 3/8 rule (four stages, like classical RK4).
- Timed runs call `f` unwrapped for torchdiffeq; NFE and step counts come from a
  separate instrumented run (odenet and torchode count internally in every run, as
  their users get them).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import odenet
from odenet import measure

try:  # peers are optional: a missing one is reported, not fatal
    import torchdiffeq
except ImportError:  # pragma: no cover
    torchdiffeq = None
try:
    import torchode
except ImportError:  # pragma: no cover
    torchode = None

# torchdiffeq warns that fixed-grid solvers ignore the step callbacks of the counting wrapper
warnings.filterwarnings("ignore", message=r"Solver '.*' does not support callbacks")

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "bench_solvers"

LIBRARIES = ("odenet", "torchdiffeq", "torchode")
MODES = ("forward", "train-direct", "train-adjoint", "train-checkpoint", "fixed", "memory", "seminorm")
GRADIENTS = ("direct", "adjoint", "checkpoint")
ADAPTIVE = ("dopri5", "bosh3", "tsit5")
FIXED = ("euler", "midpoint", "heun", "rk4")

# Solver names per library (None: the library lacks it).
_TD_NAMES = {"dopri5": "dopri5", "bosh3": "bosh3", "euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4"}
_TO_NAMES = {"dopri5": "Dopri5", "tsit5": "Tsit5", "euler": "Euler"}


# ============================================================================ configuration


@dataclass(frozen=True)
class Size:
    """One problem size: an MLP state ``[batch, dim]`` or a conv state ``[batch, C, H, W]``."""

    name: str  # preset name or the spec it was parsed from
    kind: str  # "mlp" (Linear-Tanh-Linear) or "conv" (Conv3x3-Tanh-Conv3x3)
    shape: Tuple[int, ...]  # the state's shape
    hidden: int  # hidden width (mlp) or hidden channels (conv)

    @property
    def label(self) -> str:
        if self.kind == "mlp":
            b, d = self.shape
            return f"mlp {b}x{d} h{self.hidden}"
        return "conv " + "x".join(map(str, self.shape)) + f" h{self.hidden}"


SIZE_PRESETS: Dict[str, Size] = {
    "tiny": Size("tiny", "mlp", (32, 2), 16),  # smoke tests
    "small": Size("small", "mlp", (256, 2), 64),
    "medium": Size("medium", "mlp", (256, 64), 256),
    "large": Size("large", "mlp", (1024, 128), 512),
    "conv": Size("conv", "conv", (128, 64, 28, 28), 64),
    "conv-tiny": Size("conv-tiny", "conv", (4, 8, 8, 8), 8),  # smoke tests
}

# Issue 4 targets for the forward overhead of odenet (CPU, 1 thread).
OVERHEAD_TARGETS = {"small": 1.5, "medium": 1.25, "large": 1.1}
FIXED_TARGET = 1.1  # fixed-step euler within 1.1x of the hand-written residual loop


def parse_size(spec: str) -> Size:
    """A preset name (``small``) or ``mlp:BATCHxDIMxHIDDEN`` / ``conv:BATCHxCxHxW[xHIDDEN]``."""
    spec = spec.strip()
    if spec in SIZE_PRESETS:
        return SIZE_PRESETS[spec]
    kind, _, rest = spec.partition(":")
    try:
        nums = [int(x) for x in rest.split("x")] if rest else []
    except ValueError:
        nums = []
    if kind == "mlp" and len(nums) == 3 and min(nums) > 0:
        return Size(spec, "mlp", (nums[0], nums[1]), nums[2])
    if kind == "conv" and len(nums) in (4, 5) and min(nums) > 0:
        return Size(spec, "conv", tuple(nums[:4]), nums[4] if len(nums) == 5 else nums[1])
    raise ValueError(
        f"Unknown size {spec!r}: use a preset ({', '.join(SIZE_PRESETS)}) or mlp:BATCHxDIMxHIDDEN or "
        "conv:BATCHxCxHxW[xHIDDEN] (e.g. mlp:256x64x256, conv:32x64x28x28)."
    )


@dataclass
class Config:
    """Everything a run depends on (written into the JSON)."""

    sizes: List[Size]  # problem sizes
    modes: List[str]  # what to measure (see MODES)
    solvers: List[str]  # adaptive solvers for forward / train / seminorm
    fixed_solvers: List[str]  # fixed-step solvers for the fixed mode
    libraries: List[str]  # which libraries to run
    repeats: int  # timed repeats per case (median reported)
    warmup: int  # untimed runs per case before timing
    threads: int  # torch.set_num_threads
    device: str  # cpu or cuda
    dtype: str  # float32 or float64
    rtol: float  # relative tolerance (adaptive)
    atol: float  # absolute tolerance (adaptive)
    t_end: float  # integrate over [0, t_end]
    fixed_steps: int  # N of the fixed mode
    memory_steps: List[int]  # step counts of the memory mode
    memory_sizes: List[Size]  # sizes of the memory mode
    memory_solver: str  # fixed-step solver of the memory mode
    seminorm_t_ends: List[float]  # integration horizons of the seminorm mode
    f_time_s: float  # seconds spent timing one f call (per size)
    seed: int  # weights and initial state
    compile: bool  # torch.compile the f module (all libraries get the compiled f)
    malloc_keep: bool  # glibc mallopt: keep freed memory (see --malloc-keep)
    loss_scale: float  # the training loss is loss_scale * y(T).square().mean()
    out: Optional[str]  # output prefix (.json, .md); None: do not write
    quick: bool  # smoke configuration


# ============================================================================ problems


class MLPField(nn.Module):
    """`f(t, y) = W2 tanh(W1 y + b1) + b2`: the Linear-Tanh-Linear field of the issue (ignores t)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.net(y)


class ConvField(nn.Module):
    """`f(t, y) = conv(tanh(conv(y)))`, 3x3 convolutions with padding 1 (ignores t)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.Tanh(), nn.Conv2d(hidden, channels, 3, padding=1)
        )

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.net(y)


@dataclass
class Problem:
    size: Size
    module: nn.Module  # owns the parameters
    f: Callable[[Tensor, Tensor], Tensor]  # what the solvers call (the module, or its compiled form)
    y0: Tensor
    ts: List[float]  # output times as floats
    t: Tensor  # output times as a tensor on the device
    t_f: float = float("nan")  # median time of one f call, no grad (s)
    t_fb: float = float("nan")  # median time of one f call with autograd + its VJP (s)
    probe: Optional["FProbe"] = None  # times f alone (see FProbe)
    loss_scale: float = 1.0  # the training loss is loss_scale * y(T).square().mean()

    @property
    def params(self) -> List[Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def train_y0(self) -> Tensor:
        return self.y0.detach().clone().requires_grad_(True)

    def loss(self, y: Tensor) -> Tensor:
        """The training loss of the final state: `y.square().mean()`, times `loss_scale`."""
        loss = y.square().mean()
        return loss if self.loss_scale == 1.0 else loss * self.loss_scale


def make_problem(size: Size, cfg: Config) -> Problem:
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if size.kind == "mlp":
        module = MLPField(size.shape[-1], size.hidden)
    else:
        module = ConvField(size.shape[1], size.hidden)
    module = module.to(device=device, dtype=dtype)
    y0 = torch.randn(size.shape, generator=gen, dtype=dtype).to(device)
    f = torch.compile(module) if cfg.compile else module
    ts = [0.0, float(cfg.t_end)]
    return Problem(size, module, f, y0, ts, torch.tensor(ts, dtype=dtype, device=device), loss_scale=cfg.loss_scale)


def _sync(device) -> None:
    measure.synchronize(device)


class FProbe:
    """Times `f` alone on the solve's input: one call without grad (`t_f`) and one call with
    autograd plus its vector-Jacobian product with respect to the state and the parameters
    (`t_fb`). On CPU each sample is a single call (the median of single calls); on CUDA a
    block of calls between two synchronisations (throughput, as inside a solver).

    :meth:`sample` takes a few samples; the benchmark calls it once per repeat round,
    interleaved with the solves, so that `t_f` sees the same machine state as they do.
    """

    def __init__(self, prob: Problem, device: str):
        self.prob, self.device = prob, device
        self.t0 = torch.zeros((), dtype=prob.y0.dtype, device=prob.y0.device)
        self.cot = torch.randn_like(prob.y0)
        self.cuda = torch.device(device).type == "cuda"
        self.samples: Dict[str, List[float]] = {"f": [], "fb": []}
        self._plan: Dict[str, Tuple[int, int]] = {}  # kind -> (calls per sample, samples per round)

    def _call(self, kind: str) -> None:
        prob = self.prob
        if kind == "f":
            with torch.no_grad():
                prob.f(self.t0, prob.y0)
        else:
            yy = prob.y0.detach().requires_grad_(True)
            out = prob.f(self.t0, yy)
            torch.autograd.grad(out, (yy, *prob.params), self.cot)

    def _plan_for(self, kind: str) -> Tuple[int, int]:
        if kind not in self._plan:
            for _ in range(3):
                self._call(kind)
            _sync(self.device)
            s = time.perf_counter()
            self._call(kind)
            _sync(self.device)
            one = max(time.perf_counter() - s, 1e-7)
            per = max(1, int(1e-3 / one)) if self.cuda else 1
            # about 50 ms of samples per round, at least 3
            self._plan[kind] = (per, int(min(max(0.05 / (one * per), 3), 200)))
        return self._plan[kind]

    def sample(self, kinds: Sequence[str] = ("f",), n: Optional[int] = None) -> None:
        for kind in kinds:
            per, count = self._plan_for(kind)
            for _ in range(n or count):
                _sync(self.device)
                s = time.perf_counter()
                for _ in range(per):
                    self._call(kind)
                _sync(self.device)
                self.samples[kind].append((time.perf_counter() - s) / per)

    def sample_for(self, budget_s: float, kinds: Sequence[str] = ("f", "fb")) -> None:
        """Samples for about `budget_s` seconds in all (the per-size figure)."""
        for kind in kinds:
            per, count = self._plan_for(kind)
            s = time.perf_counter()
            self.sample((kind,), n=3)
            one = (time.perf_counter() - s) / 3
            self.sample((kind,), n=int(min(max(budget_s / len(kinds) / max(one, 1e-7), 5), 5000)))

    def median(self, kind: str) -> float:
        v = self.samples[kind]
        return statistics.median(v) if v else float("nan")

    def fresh(self) -> "FProbe":
        """A probe with the same plan and no samples (one per group of cases)."""
        other = FProbe.__new__(FProbe)
        other.__dict__.update(self.__dict__)
        other.samples = {"f": [], "fb": []}
        return other


# ============================================================================ instrumentation


@dataclass
class Counts:
    """What an instrumented run measured."""

    nfe_forward: Optional[int] = None
    nfe_backward: Optional[int] = None
    n_accepted: Optional[int] = None
    n_rejected: Optional[int] = None
    n_accepted_backward: Optional[int] = None
    n_rejected_backward: Optional[int] = None
    nfe_forward_graph: Optional[int] = None  # forward evals recorded for backprop (direct)


class Counter(nn.Module):
    """Counts calls of `f` (forward / backward phase) and torchdiffeq's step callbacks."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.backward = False
        self.c = Counts(0, 0, 0, 0, 0, 0, 0)

    def forward(self, t, y):
        if self.backward:
            self.c.nfe_backward += 1
        else:
            self.c.nfe_forward += 1
            if torch.is_grad_enabled():
                self.c.nfe_forward_graph += 1
        return self.f(t, y)

    # torchdiffeq callbacks (forward solve, then the adjoint's backward solve)
    def callback_accept_step(self, t0, y0, dt):
        self.c.n_accepted += 1

    def callback_reject_step(self, t0, y0, dt):
        self.c.n_rejected += 1

    def callback_accept_step_adjoint(self, t0, y0, dt):
        self.c.n_accepted_backward += 1

    def callback_reject_step_adjoint(self, t0, y0, dt):
        self.c.n_rejected_backward += 1


# ============================================================================ library adapters
#
# An adapter builds, once per case and outside the timing, a solve function
# `solve(y0) -> (y_final, counts)`, where `counts()` reads what the run cost (call it
# after backward). `instrumented=True` asks for exact counting even where it costs time.

SolveFn = Callable[[Tensor], Tuple[Tensor, Callable[[], Counts]]]


def _supports(lib: str, solver: str) -> bool:
    if lib == "odenet":
        return solver in odenet.SOLVERS
    if lib == "torchdiffeq":
        return torchdiffeq is not None and solver in _TD_NAMES
    if lib == "torchode":
        return torchode is not None and solver in _TO_NAMES
    if lib == "hand":
        return solver in ("euler", "rk4")
    return False


def _gradient_for(lib: str, gradient: str) -> str:
    """The gradient method a library runs in place of `gradient` (peers lack checkpointing)."""
    if gradient == "checkpoint" and lib != "odenet":
        return "direct"
    return gradient


def build_odenet(prob: Problem, solver: str, gradient: str, steps: Optional[int], cfg: Config,
                 seminorm: bool = False, instrumented: bool = False) -> SolveFn:
    kw: Dict[str, Any] = dict(solver=solver, gradient=gradient)
    if steps is None:
        kw.update(rtol=cfg.rtol, atol=cfg.atol)
    else:
        kw.update(steps=steps)
    if gradient == "adjoint":
        kw.update(adjoint_seminorm=seminorm)
    if gradient != "direct":
        kw.update(adjoint_params=prob.params)
    t = prob.t  # the same time tensor the peers get

    def solve(y0):
        # instrumented: a Counter around f tells which forward calls recorded a graph
        counter = Counter(prob.f) if instrumented else None
        sol = odenet.odeint(counter if instrumented else prob.f, y0, t, **kw)
        if counter is not None:
            counter.backward = True  # later calls belong to the backward pass
        st = sol.stats

        def counts():
            graph = counter.c.nfe_forward_graph if counter is not None else (st.nfe_forward if gradient == "direct" else 0)
            return Counts(st.nfe_forward, st.nfe_backward, st.n_accepted, st.n_rejected,
                          st.n_accepted_backward, st.n_rejected_backward, graph)

        return sol.ys[-1], counts

    return solve


def build_torchdiffeq(prob: Problem, solver: str, gradient: str, steps: Optional[int], cfg: Config,
                      seminorm: bool = False, instrumented: bool = False) -> SolveFn:
    method = _TD_NAMES[solver]
    kw: Dict[str, Any] = dict(method=method)
    if steps is None:
        kw.update(rtol=cfg.rtol, atol=cfg.atol)
    else:
        # N uniform steps between the ends of the `t` torchdiffeq passes (reversed and negated
        # for the adjoint's backward solve)
        def grid(func, y, t):
            g = torch.linspace(0, 1, steps + 1, dtype=t.dtype, device=t.device) * (t[-1] - t[0]) + t[0]
            return torch.cat([t[:1], g[1:-1], t[-1:]])  # ends exactly t[0], t[-1] (torchdiffeq asserts it)

        kw.update(options=dict(grid_constructor=grid))
    params = prob.params
    t = prob.t

    def solve(y0):
        counter = Counter(prob.f) if instrumented else None
        func = counter if instrumented else prob.f
        if gradient == "adjoint":
            adj: Dict[str, Any] = dict(adjoint_params=params)
            if steps is None:
                adj.update(adjoint_rtol=cfg.rtol, adjoint_atol=cfg.atol)
            if seminorm:
                adj["adjoint_options"] = dict(norm="seminorm")
            ys = torchdiffeq.odeint_adjoint(func, y0, t, **kw, **adj)
        else:
            ys = torchdiffeq.odeint(func, y0, t, **kw)
        if counter is not None:
            counter.backward = True

        def counts():
            if counter is None:
                return Counts()
            c = Counts(**asdict(counter.c))
            if steps is not None:  # fixed grid: every step accepted (no callbacks fire)
                c.n_accepted, c.n_rejected = steps, 0
            return c

        return ys[-1], counts

    return solve


class _Flat(nn.Module):
    """Presents `f` to torchode as one problem: state ``[1, numel]`` <-> the real shape."""

    def __init__(self, f, shape):
        super().__init__()
        self.f = f
        self.shape = tuple(shape)

    def forward(self, t, y):
        return self.f(t, y.view(self.shape)).reshape(y.shape)


def build_torchode(prob: Problem, solver: str, gradient: str, steps: Optional[int], cfg: Config,
                   seminorm: bool = False, instrumented: bool = False) -> SolveFn:
    to = torchode
    counter = Counter(prob.f) if instrumented else None
    term = to.ODETerm(_Flat(counter if instrumented else prob.f, prob.y0.shape))
    method = getattr(to, _TO_NAMES[solver])(term=term)
    dtype, device = prob.y0.dtype, prob.y0.device
    dt0 = None
    if steps is None:
        ctrl = to.IntegralController(atol=cfg.atol, rtol=cfg.rtol, term=term)
    else:
        ctrl = to.FixedStepController()
        dt0 = torch.full((1,), (prob.ts[-1] - prob.ts[0]) / steps, dtype=dtype, device=device)
    if gradient == "adjoint":
        adjoint = to.BacksolveAdjoint(term, method, ctrl)
    else:
        adjoint = to.AutoDiffAdjoint(method, ctrl)
    adjoint = adjoint.to(device)
    t_eval = prob.t.reshape(1, -1)
    shape = prob.y0.shape

    def solve(y0):
        if counter is not None:
            counter.c = Counts(0, 0, 0, 0, 0, 0, 0)
            counter.backward = False
        problem = to.InitialValueProblem(y0.reshape(1, -1), t_eval=t_eval)
        if gradient == "adjoint":
            sol = adjoint.solve(problem, dt0=dt0)
        else:
            sol = adjoint.solve(problem, term, dt0=dt0)
        if counter is not None:
            counter.backward = True
        stats = sol.stats

        def counts():
            n_steps = int(stats["n_steps"].sum())
            n_acc = int(stats["n_accepted"].sum())
            c = Counts(int(stats["n_f_evals"].sum()), 0, n_acc, n_steps - n_acc, 0, 0, 0)
            if gradient == "direct":
                c.nfe_forward_graph = c.nfe_forward
            if counter is not None:  # torchode's backsolve does not count the augmented term's evaluations
                c.nfe_backward = counter.c.nfe_backward
            for b in stats.get("backsolve", []):
                bs, ba = int(b["n_steps"].sum()), int(b["n_accepted"].sum())
                c.n_accepted_backward += ba
                c.n_rejected_backward += bs - ba
            return c

        return sol.ys[0, -1].view(shape), counts

    return solve


def build_hand(prob: Problem, solver: str, gradient: str, steps: Optional[int], cfg: Config,
               seminorm: bool = False, instrumented: bool = False) -> SolveFn:
    """A hand-written loop of `steps` residual updates (euler) or classical RK4 steps:
    what a ResNet with weight-tied blocks would run. Times are precomputed tensors."""
    if steps is None:
        raise ValueError("the hand-written loop needs a fixed number of steps")
    t0, t1 = prob.ts[0], prob.ts[-1]
    h = (t1 - t0) / steps
    dtype, device = prob.y0.dtype, prob.y0.device
    tt = [torch.tensor(t0 + i * h, dtype=dtype, device=device) for i in range(steps)]
    th = [torch.tensor(t0 + (i + 0.5) * h, dtype=dtype, device=device) for i in range(steps)]
    te = [torch.tensor(t0 + (i + 1) * h, dtype=dtype, device=device) for i in range(steps)]
    f = Counter(prob.f) if instrumented else prob.f

    if solver == "euler":
        def loop(y):
            for i in range(steps):
                y = torch.add(y, f(tt[i], y), alpha=h)
            return y
    elif solver == "rk4":
        def loop(y):
            for i in range(steps):
                k1 = f(tt[i], y)
                k2 = f(th[i], y + (h / 2) * k1)
                k3 = f(th[i], y + (h / 2) * k2)
                k4 = f(te[i], y + h * k3)
                y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
            return y
    else:
        raise ValueError(f"no hand-written loop for {solver!r}")

    def solve(y0):
        y = loop(y0)
        if isinstance(f, Counter):
            f.backward = True

        def counts():
            if not isinstance(f, Counter):
                return Counts()
            return Counts(f.c.nfe_forward, 0, steps, 0, 0, 0, f.c.nfe_forward_graph)

        return y, counts

    return solve


BUILDERS = {"odenet": build_odenet, "torchdiffeq": build_torchdiffeq, "torchode": build_torchode, "hand": build_hand}


def build_cuda_graph(prob: Problem, solver: str, steps: int, cfg: Config) -> SolveFn:
    """odenet's fixed-step forward solve captured once in a CUDA graph and replayed."""
    static_y0 = prob.y0.clone()
    f, ts = prob.f, prob.ts

    def solve_once():
        return odenet.odeint(f, static_y0, ts, solver=solver, steps=steps).ys[-1]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            solve_once()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = solve_once()

    def solve(y0):
        static_y0.copy_(y0)
        graph.replay()
        return out, lambda: Counts(steps * _stages(solver), 0, steps, 0, 0, 0, 0)

    return solve


def _stages(solver: str) -> int:
    return odenet.solvers.get_solver(solver).tableau.stages


# ============================================================================ cases and timing


@dataclass
class Case:
    """One row of a table: a library running one solver with one gradient method."""

    mode: str
    size: Size
    solver: str
    library: str  # odenet, torchdiffeq, torchode, hand, odenet+cudagraph
    gradient: Optional[str]  # None: forward without grad
    steps: Optional[int] = None  # fixed steps (None: adaptive)
    seminorm: bool = False
    train: bool = False
    unit: Optional[Callable[[], Any]] = None  # the timed unit of work
    instrumented: Optional[SolveFn] = None  # a solve with exact counting
    times: List[float] = field(default_factory=list)  # per-run time of each timed sample
    inner: int = 1  # back-to-back runs per timed sample (see time_cases)
    error: Optional[str] = None
    record: Dict[str, Any] = field(default_factory=dict)


def _zero_grads(tensors: Sequence[Tensor]) -> None:
    for p in tensors:
        p.grad = None


def make_unit(solve: SolveFn, prob: Problem, train: bool) -> Callable[[], Any]:
    params = prob.params
    if not train:
        y0 = prob.y0

        def unit():
            with torch.no_grad():
                return solve(y0)[0]

        return unit
    y0t = prob.train_y0()

    def unit():
        _zero_grads(params)
        y0t.grad = None
        y, _ = solve(y0t)
        prob.loss(y).backward()
        return y

    return unit


def build_case(case: Case, prob: Problem, cfg: Config) -> None:
    try:
        if case.library == "odenet+cudagraph":
            solve = build_cuda_graph(prob, case.solver, case.steps, cfg)
            case.instrumented = solve
        else:
            builder = BUILDERS[case.library]
            grad = case.gradient or "direct"
            solve = builder(prob, case.solver, grad, case.steps, cfg, seminorm=case.seminorm)
            case.instrumented = builder(prob, case.solver, grad, case.steps, cfg, seminorm=case.seminorm, instrumented=True)
        case.unit = make_unit(solve, prob, case.train)
    except Exception as err:  # a library that cannot run this case is reported, not fatal
        case.error = _err(err)


def _err(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()[:500]


def time_cases(cases: List[Case], cfg: Config, probe: Optional[FProbe] = None) -> None:
    """Warm up every case, then run `repeats` rounds, each case once per round in an order
    shuffled every round (seeded by `--seed`); `probe` (if given) times f alone once per
    round, shuffled in with the cases.

    A timed sample of a case is one untimed run, then `inner` back-to-back runs (as many as
    fill about 5 ms, at most 50), recorded as the time per run. Like the probe's samples of
    f, it so measures a warm solve: a run right after another library's work or the probe
    starts cold, by an amount that depends on what ran before (`docs/benchmarks.md` tells
    how a fixed rotation once charged odenet for the probe). The shuffle spreads what is
    left over every case. Python's garbage collector is off during the timed rounds.
    """
    kinds = ("f", "fb") if any(c.train for c in cases) else ("f",)
    live = [c for c in cases if c.error is None]
    # As timeit does: collect before the warm-up, then no garbage collection while timing. A
    # full collection clears CPython's free lists (floats, tuples, frames), and the solves right
    # after it pay for refilling them: up to 0.6 ms on the first small odenet solve and 0.2 ms
    # on the hand-written loop. A collection per round (as this script used to do) so charged
    # each library by how many Python objects it makes, not by its steady-state cost.
    gc.collect()
    for c in live:
        try:
            for _ in range(cfg.warmup):
                c.unit()
            _sync(cfg.device)
            s = time.perf_counter()
            c.unit()
            _sync(cfg.device)
            c.inner = int(min(max(math.ceil(0.005 / max(time.perf_counter() - s, 1e-7)), 1), 50))
        except Exception as err:
            c.error = _err(err)
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
    _timed_rounds([c for c in live if c.error is None], cfg, kinds, probe)


def _timed_rounds(live: List[Case], cfg: Config, kinds: Sequence[str], probe: Optional[FProbe]) -> None:
    """`cfg.repeats` shuffled rounds of timed samples, with the garbage collector off (collect
    before calling, as `time_cases` does before its warm-up)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _rounds(live, cfg, kinds, probe)
    finally:
        if gc_was_enabled:
            gc.enable()


def _rounds(live: List[Case], cfg: Config, kinds: Sequence[str], probe: Optional[FProbe]) -> None:
    order = random.Random(cfg.seed)
    for _ in range(cfg.repeats):
        items: List[Any] = list(live) + ([probe] if probe is not None else [])
        order.shuffle(items)
        for c in items:
            if c is probe:
                probe.sample(kinds)
                continue
            if c.error is not None:
                continue
            try:
                c.unit()  # untimed: the timed runs follow this case, not whatever ran before
                _sync(cfg.device)
                s = time.perf_counter()
                for _ in range(c.inner):
                    c.unit()
                _sync(cfg.device)
                c.times.append((time.perf_counter() - s) / c.inner)
            except Exception as err:
                c.error = _err(err)


def instrumented_run(case: Case, prob: Problem, cfg: Config) -> Dict[str, Any]:
    """One run with exact counting: NFE, steps, host reads, saved bytes, CUDA peak, final state, gradients."""
    out: Dict[str, Any] = {}
    solve = case.instrumented
    params = prob.params
    # Host reads of the whole run, backward included; not with --compile, like the per-step
    # slopes (`_reads_slope`): the counts were checked with eager `f` only.
    counting = measure.host_reads if not cfg.compile else contextlib.nullcontext
    if not case.train:
        with torch.no_grad(), counting() as reads:
            y, counts = solve(prob.y0)
        _sync(cfg.device)
        out["host_reads"] = reads.count if reads is not None else None
        out["counts"] = counts()
        out["y"] = y.detach()
        return out
    y0t = prob.train_y0()
    _zero_grads(params)
    with counting() as reads:
        with measure.saved_tensors(exclude=params) as saved:
            y, counts = solve(y0t)
        prob.loss(y).backward()  # outside the saved-tensor count: an adjoint's backward saves too
    _sync(cfg.device)
    out["host_reads"] = reads.count if reads is not None else None
    out["saved_bytes"] = saved.bytes
    out["counts"] = counts()
    out["y"] = y.detach()
    out["grad"] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).detach()
    _zero_grads(params)
    if torch.device(cfg.device).type == "cuda":
        out["cuda_peak_bytes"] = measure.cuda_peak_memory(case.unit, device=cfg.device)
    return out


def _rel(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[float]:
    if a is None or b is None or a.shape != b.shape:
        return None
    denom = float(b.double().norm())
    return float((a.double() - b.double()).norm()) / (denom if denom > 0 else 1.0)


def finish_cases(cases: List[Case], prob: Problem, cfg: Config, reference: str = "odenet",
                 probe: Optional[FProbe] = None) -> None:
    """Instrumented runs, then the record of every case with overheads and ratios. `t_f`
    and `t_fb` come from `probe` (timed interleaved with these cases) when it has samples,
    else from the per-size figures."""
    t_f, t_fb = prob.t_f, prob.t_fb
    if probe is not None and probe.samples["f"]:
        t_f = probe.median("f")
    if probe is not None and probe.samples["fb"]:
        t_fb = probe.median("fb")
    extras: Dict[int, Dict[str, Any]] = {}
    for c in cases:
        if c.error is None:
            try:
                extras[id(c)] = instrumented_run(c, prob, cfg)
            except Exception as err:
                c.error = _err(err)
    ref = next((c for c in cases if c.library == reference and id(c) in extras), None)
    ref_x = extras.get(id(ref), {}) if ref is not None else {}
    medians = {c.library: statistics.median(c.times) for c in cases if c.times and c.error is None}
    for c in cases:
        x = extras.get(id(c), {})
        cnt: Counts = x.get("counts", Counts())
        med = statistics.median(c.times) if c.times and c.error is None else None
        rec: Dict[str, Any] = dict(
            mode=c.mode, size=c.size.name, size_label=c.size.label, solver=c.solver, library=c.library,
            gradient=c.gradient, steps=c.steps, seminorm=c.seminorm, train=c.train, t_end=prob.ts[-1],
            **{k: v for k, v in asdict(cnt).items()},
            time_s=med, times_s=list(c.times), t_f_s=t_f, t_fb_s=t_fb,
            floor_s=None, overhead=None, ratio_to={}, host_reads=x.get("host_reads"),
            host_reads_per_step=None, saved_bytes=x.get("saved_bytes"), cuda_peak_bytes=x.get("cuda_peak_bytes"),
            y_rel_diff_vs_ref=None, grad_rel_diff_vs_ref=None, reference=reference, error=c.error,
        )
        if med is not None and cnt.nfe_forward is not None:
            if c.train:
                graph = cnt.nfe_forward_graph or 0
                floor = (cnt.nfe_forward - graph) * t_f + (graph + (cnt.nfe_backward or 0)) * t_fb
            else:
                floor = cnt.nfe_forward * t_f
            if floor > 0:
                rec["floor_s"] = floor
                rec["overhead"] = med / floor
        if med is not None:
            rec["ratio_to"] = {lib: med / m for lib, m in medians.items() if lib != c.library and m > 0}
        steps_total = (cnt.n_accepted or 0) + (cnt.n_rejected or 0)
        if rec["host_reads"] is not None and steps_total:
            rec["host_reads_per_step"] = rec["host_reads"] / steps_total
        if c is not ref and ref is not None and x:
            rec["y_rel_diff_vs_ref"] = _rel(x.get("y"), ref_x.get("y"))
            rec["grad_rel_diff_vs_ref"] = _rel(x.get("grad"), ref_x.get("grad"))
        c.record = rec


# ============================================================================ modes


def _libs_for(cfg: Config, solver: str) -> List[str]:
    return [lib for lib in cfg.libraries if _supports(lib, solver)]


def run_group(cases: List[Case], prob: Problem, cfg: Config, reference: str = "odenet") -> List[Dict[str, Any]]:
    for c in cases:
        build_case(c, prob, cfg)
    probe = prob.probe.fresh() if prob.probe is not None else None
    time_cases(cases, cfg, probe)
    finish_cases(cases, prob, cfg, reference, probe)
    return [c.record for c in cases]


def mode_forward(prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    rows = []
    for solver in cfg.solvers:
        cases = [Case("forward", prob.size, solver, lib, None) for lib in _libs_for(cfg, solver)]
        rows += run_group(cases, prob, cfg)
        for c in cases:
            if c.error is None:
                try:
                    c.record["host_reads_per_step"] = _reads_slope(c, prob, cfg)
                except Exception as err:  # counting is a diagnostic; keep the timings
                    c.record["host_reads_per_step"] = None
                    c.record["note"] = f"host-read slope failed: {_err(err)}"
        log(rows[-len(cases):])
    return rows


def mode_train(prob: Problem, cfg: Config, gradient: str, log) -> List[Dict[str, Any]]:
    rows = []
    for solver in cfg.solvers:
        cases = [
            Case(f"train-{gradient}", prob.size, solver, lib, _gradient_for(lib, gradient), train=True)
            for lib in _libs_for(cfg, solver)
        ]
        rows += run_group(cases, prob, cfg)
        log(rows[-len(cases):])
    return rows


def mode_fixed(prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    rows = []
    n = cfg.fixed_steps
    cuda = torch.device(cfg.device).type == "cuda"
    for solver in cfg.fixed_solvers:
        libs = _libs_for(cfg, solver) + (["hand"] if _supports("hand", solver) else [])
        for train in (False, True):
            cases = [Case("fixed", prob.size, solver, lib, "direct" if train else None, steps=n, train=train) for lib in libs]
            if cuda and not train and "odenet" in libs:
                cases.append(Case("fixed", prob.size, solver, "odenet+cudagraph", None, steps=n))
            ref = "hand" if "hand" in libs else "odenet"
            group = run_group(cases, prob, cfg, reference=ref)
            # host reads per step from the slope between N and 2N steps (constant per-solve reads drop out)
            for c in cases:
                if c.error is None and c.library in BUILDERS:
                    try:
                        c.record["host_reads_per_step"] = _reads_slope(c, prob, cfg)
                    except Exception as err:
                        c.record["host_reads_per_step"] = None
                        c.record["note"] = f"host-read slope failed: {_err(err)}"
            rows += group
            log(group)
    return rows


def _reads_slope(case: Case, prob: Problem, cfg: Config) -> Optional[float]:
    """Host reads per step of one solve, as the slope between two solves that differ only in
    their number of steps: N and 2N fixed steps, or (adaptive) [0, T] and [0, 2T]. Reads
    made once per solve (parsing `t`, choosing the first step) drop out."""
    if cfg.compile:
        return None
    points = []
    for k in (1, 2):
        if case.steps is not None:
            p, steps = prob, k * case.steps
        else:
            ts = [prob.ts[0], prob.ts[-1] * k]
            p, steps = replace(prob, ts=ts, t=torch.tensor(ts, dtype=prob.y0.dtype, device=prob.y0.device)), None
        solve = BUILDERS[case.library](p, case.solver, case.gradient or "direct", steps, cfg, instrumented=True)
        y0 = p.train_y0() if case.train else p.y0
        with torch.set_grad_enabled(case.train), measure.host_reads() as reads:
            y, counts = solve(y0)
            if case.train:
                p.loss(y).backward()
        _zero_grads(prob.params)
        c = counts()
        points.append((reads.count, (c.n_accepted or 0) + (c.n_rejected or 0)))
    (r1, s1), (r2, s2) = points
    return (r2 - r1) / (s2 - s1) if s2 != s1 else None


def mode_memory(prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    """Saved bytes (and CUDA peak) against the number of fixed steps; one timed train step each."""
    rows = []
    solver = cfg.memory_solver
    for steps in cfg.memory_steps:
        cases = []
        for lib in ("odenet", "torchdiffeq"):
            if lib not in cfg.libraries or not _supports(lib, solver):
                continue
            for gradient in GRADIENTS:
                if gradient == "checkpoint" and lib != "odenet":
                    continue
                cases.append(Case("memory", prob.size, solver, lib, gradient, steps=steps, train=True))
        for c in cases:
            build_case(c, prob, cfg)
        sub = Config(**{**asdict_shallow(cfg), "repeats": min(cfg.repeats, 3)})
        time_cases(cases, sub)
        for c in cases:  # no cross-library ratios here: rows differ by gradient method
            finish_cases([c], prob, cfg, reference=c.library)
        group = [c.record for c in cases]
        rows += group
        log(group)
    return rows


def with_t_end(prob: Problem, t_end: float) -> Problem:
    """The same problem (same f, y0, probe) integrated over [0, t_end]."""
    ts = [prob.ts[0], float(t_end)]
    return replace(prob, ts=ts, t=torch.tensor(ts, dtype=prob.y0.dtype, device=prob.y0.device))


def mode_seminorm(prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    rows = []
    for t_end in cfg.seminorm_t_ends:
        rows += _seminorm_at(with_t_end(prob, t_end) if t_end != prob.ts[-1] else prob, cfg, log)
    return rows


def _seminorm_at(prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    rows = []
    for solver in cfg.solvers:
        cases = []
        for lib in ("odenet", "torchdiffeq"):
            if lib in cfg.libraries and _supports(lib, solver):
                for semi in (False, True):
                    cases.append(Case("seminorm", prob.size, solver, lib, "adjoint", seminorm=semi, train=True))
        for c in cases:
            build_case(c, prob, cfg)
        probe = prob.probe.fresh() if prob.probe is not None else None
        # backward NFE is the point here; a few repeats give the time ratio
        time_cases(cases, Config(**{**asdict_shallow(cfg), "repeats": min(cfg.repeats, 3)}), probe)
        for lib in ("odenet", "torchdiffeq"):
            pair = [c for c in cases if c.library == lib]
            if not pair:
                continue
            finish_cases(pair, prob, cfg, reference=lib, probe=probe)
            full, semi = pair[0].record, pair[1].record
            for r in (full, semi):
                r["ratio_to"] = {}
            if full.get("nfe_backward") and semi.get("nfe_backward") is not None:
                semi["nfe_backward_reduction"] = 1.0 - semi["nfe_backward"] / full["nfe_backward"]
                if full.get("time_s") and semi.get("time_s"):
                    semi["time_ratio_vs_full_norm"] = semi["time_s"] / full["time_s"]
        group = [c.record for c in cases]
        rows += group
        log(group)
    return rows


def asdict_shallow(cfg: Config) -> Dict[str, Any]:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


# ============================================================================ environment


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory (no trimming, no mmap for large blocks up to 32 MiB),
    so that tensors of a few MiB are reused instead of being page-faulted in on every
    allocation. Returns whether it took effect (False off glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1
        ok &= libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1
        return bool(ok)
    except Exception:
        return False


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> Optional[str]:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except Exception:
        return None


def _version(mod) -> Optional[str]:
    if mod is None:
        return None
    try:
        from importlib.metadata import version

        return version(mod.__name__)
    except Exception:
        return getattr(mod, "__version__", None)


def environment(cfg: Config, argv: Sequence[str]) -> Dict[str, Any]:
    env = dict(
        command="python benchmarks/bench_solvers.py " + " ".join(shlex.quote(a) for a in argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(),
        platform=platform.platform(),
        python=platform.python_version(),
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        device=cfg.device,
        gpu=torch.cuda.get_device_name(torch.device(cfg.device)) if torch.device(cfg.device).type == "cuda" else None,
        torch=torch.__version__,
        odenet=odenet.__version__,
        torchdiffeq=_version(torchdiffeq),
        torchode=_version(torchode),
        git_commit=_git_commit(),
        malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or None,
        malloc_keep=cfg.malloc_keep,
        schema_version=SCHEMA_VERSION,
    )
    return env


# ============================================================================ report


def _fmt_time(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt(x: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec) + suffix


def _mb(b: Optional[int]) -> str:
    """Bytes in MB (2**20), with enough digits for small values."""
    if b is None:
        return "—"
    mb = b / 2**20
    return f"{mb:.2f}" if mb >= 1 else f"{mb:.3g}"


def _steps(r: Dict[str, Any], backward: bool = False) -> str:
    a, j = (r.get("n_accepted_backward"), r.get("n_rejected_backward")) if backward else (r.get("n_accepted"), r.get("n_rejected"))
    return "—" if a is None else f"{a}/{j if j is not None else '—'}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _ratio_cell(r: Dict[str, Any], lib: str) -> str:
    if r["library"] == lib:
        return "—"
    return _fmt(r.get("ratio_to", {}).get(lib), ".2f", "x")


def _lib_label(r: Dict[str, Any]) -> str:
    lib = r["library"]
    if r.get("train") and r.get("mode", "").startswith("train-") and r.get("gradient") and r["mode"] != f"train-{r['gradient']}":
        lib += f" ({r['gradient']})"
    if r.get("error"):
        lib += " ⚠"
    return lib


def render_markdown(result: Dict[str, Any]) -> str:
    env, rows = result["environment"], result["results"]
    sizes = result["sizes"]
    L: List[str] = ["# odenet solver benchmark", ""]
    L += [
        f"- command: `{env['command']}`",
        f"- date: {env['date']}, git commit `{env.get('git_commit')}`",
        f"- CPU: {env['cpu_model']} ({env['cpu_count']} cores visible), torch threads: {env['threads']}",
        f"- device: {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else ""),
        f"- versions: torch {env['torch']}, odenet {env['odenet']}, torchdiffeq {env['torchdiffeq']}, torchode {env['torchode']}",
        f"- tolerance rtol={result['config']['rtol']}, atol={result['config']['atol']}, t in [0, {result['config']['t_end']}], "
        f"dtype {result['config']['dtype']}, repeats {result['config']['repeats']} (median), compile={result['config']['compile']}, "
        f"malloc-keep={result['config']['malloc_keep']}" + (f", env {env['malloc_env']}" if env.get("malloc_env") else "")
        + (f", loss scale {result['config']['loss_scale']:g}" if result["config"].get("loss_scale", 1.0) != 1.0 else ""),
        "",
        "Overhead = median time / floor; forward floor = NFE x t_f, training floor = evals without graph x t_f "
        "+ evals backpropagated x t_fb. `xLIB` = this row's time / LIB's time in the same group (< 1: faster). "
        "⚠ = the case failed (see the JSON `error`).",
        "",
        "## Time of one f",
        "",
    ]
    L += _table(
        ["size", "shape", "t_f (no grad)", "t_fb (f + VJP)"],
        [[n, s["label"], _fmt_time(s.get("t_f_s")), _fmt_time(s.get("t_fb_s"))] for n, s in sizes.items()],
    )
    libs = ["odenet", "torchdiffeq", "torchode"]

    fwd = [r for r in rows if r["mode"] == "forward"]
    if fwd:
        L += ["", "## Forward solve (no grad)", "",
              "t_f: one f call timed interleaved with these solves. Host reads: values read from tensors into "
              "Python in one solve (each a host-device sync on CUDA); per step: the slope between solves over "
              "[0, T] and [0, 2T].", ""]
        L += _table(
            ["size", "solver", "library", "NFE", "acc/rej", "time", "t_f", "overhead", "host reads (per step)",
             *[f"x{l}" for l in libs], "Δy vs odenet"],
            [
                [r["size"], r["solver"], _lib_label(r), _fmt(r["nfe_forward"], "d"), _steps(r), _fmt_time(r["time_s"]),
                 _fmt_time(r["t_f_s"]), _fmt(r["overhead"], ".2f", "x"),
                 f"{_fmt(r['host_reads'], 'd')} ({_fmt(r['host_reads_per_step'], '.2f')})", *[_ratio_cell(r, l) for l in libs],
                 _fmt(r["y_rel_diff_vs_ref"], ".1e")]
                for r in fwd
            ],
        )
    tr = [r for r in rows if r["mode"].startswith("train-")]
    if tr:
        L += ["", "## Training step (solve + backward)", "",
              "Peers without checkpointing run backprop through the solver in the train-checkpoint rows.", ""]
        L += _table(
            ["mode", "size", "solver", "library", "NFE fwd/bwd", "acc/rej fwd", "acc/rej bwd", "time", "overhead",
             "saved MB", "CUDA peak MB", *[f"x{l}" for l in libs], "Δgrad vs odenet"],
            [
                [r["mode"], r["size"], r["solver"], _lib_label(r), f"{_fmt(r['nfe_forward'], 'd')}/{_fmt(r['nfe_backward'], 'd')}",
                 _steps(r), _steps(r, True), _fmt_time(r["time_s"]), _fmt(r["overhead"], ".2f", "x"), _mb(r["saved_bytes"]),
                 _mb(r["cuda_peak_bytes"]), *[_ratio_cell(r, l) for l in libs], _fmt(r["grad_rel_diff_vs_ref"], ".1e")]
                for r in tr
            ],
        )
    fx = [r for r in rows if r["mode"] == "fixed"]
    if fx:
        L += ["", f"## Fixed step ({result['config']['fixed_steps']} steps) against a hand-written residual loop", "",
              "`xhand` = time / hand-written loop's time. Host reads per step: slope between N and 2N steps "
              "(each is a host-device sync on CUDA).", ""]
        L += _table(
            ["size", "solver", "phase", "library", "NFE", "time", "overhead", "xhand", *[f"x{l}" for l in libs],
             "host reads/step", "saved MB"],
            [
                [r["size"], r["solver"], "train" if r["train"] else "forward", _lib_label(r), _fmt(r["nfe_forward"], "d"),
                 _fmt_time(r["time_s"]), _fmt(r["overhead"], ".2f", "x"), _ratio_cell(r, "hand"),
                 *[_ratio_cell(r, l) for l in libs], _fmt(r["host_reads_per_step"], ".2f"), _mb(r["saved_bytes"])]
                for r in fx
            ],
        )
    mem = [r for r in rows if r["mode"] == "memory"]
    if mem:
        L += ["", f"## Activation memory against steps ({result['config']['memory_solver']}, fixed steps)", "",
              "Bytes saved for backward during the forward solve (saved_tensors_hooks, parameters excluded); "
              "CUDA peak = max allocated during one training step above the baseline.", ""]
        keys = sorted({(r["size"], r["library"], r["gradient"]) for r in mem}, key=lambda k: (k[0], libs.index(k[1]) if k[1] in libs else 9, GRADIENTS.index(k[2])))
        steps = sorted({r["steps"] for r in mem})
        cell = {(r["size"], r["library"], r["gradient"], r["steps"]): r for r in mem}
        body = []
        for size, lib, grad in keys:
            line = [size, lib, grad]
            for s in steps:
                r = cell.get((size, lib, grad, s))
                line.append("—" if r is None else (("⚠ " if r["error"] else "") + _mb(r["saved_bytes"])))
            for s in steps:
                r = cell.get((size, lib, grad, s))
                line.append("—" if r is None else _mb(r["cuda_peak_bytes"]))
            for s in steps:
                r = cell.get((size, lib, grad, s))
                line.append("—" if r is None else _fmt_time(r["time_s"]))
            body.append(line)
        L += _table(["size", "library", "gradient", *[f"saved MB @{s}" for s in steps], *[f"peak MB @{s}" for s in steps],
                     *[f"time @{s}" for s in steps]], body)
    sn = [r for r in rows if r["mode"] == "seminorm"]
    if sn:
        L += ["", "## Seminorm adjoint: backward evaluations", ""]
        L += _table(
            ["size", "T", "solver", "library", "seminorm", "NFE fwd/bwd", "acc/rej bwd", "time", "bwd NFE reduction", "time vs full norm"],
            [
                [r["size"], _fmt(r["t_end"], "g"), r["solver"], _lib_label(r), "yes" if r["seminorm"] else "no",
                 f"{_fmt(r['nfe_forward'], 'd')}/{_fmt(r['nfe_backward'], 'd')}", _steps(r, True), _fmt_time(r["time_s"]),
                 _fmt(100 * r["nfe_backward_reduction"] if r.get("nfe_backward_reduction") is not None else None, ".0f", "%"),
                 _fmt(r.get("time_ratio_vs_full_norm"), ".2f", "x")]
                for r in sn
            ],
        )
        red = result["summary"].get("seminorm_median_reduction", {})
        if red:
            L += ["", "Median backward-NFE reduction: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in red.items())
                  + " (Kidger et al. 2021 report a median of 40%)."]
    tg = result["summary"].get("targets", [])
    if tg:
        L += ["", "## Issue 4 targets", ""]
        L += _table(["target", "measured", "met"], [[t["target"], t["measured"], "yes" if t["met"] else "**no**"] for t in tg])
    L.append("")
    return "\n".join(L)


def summarize(rows: List[Dict[str, Any]], cfg: Config) -> Dict[str, Any]:
    targets = []
    for r in rows:
        if r["mode"] == "forward" and r["library"] == "odenet" and r["overhead"] is not None:
            lim = OVERHEAD_TARGETS.get(r["size"])
            if lim is not None:
                targets.append(dict(target=f"forward overhead {r['size']} {r['solver']} <= {lim}x",
                                    measured=f"{r['overhead']:.2f}x", met=r["overhead"] <= lim))
            peers = [p for p in rows if p["mode"] == "forward" and p["size"] == r["size"] and p["solver"] == r["solver"]
                     and p["library"] in ("torchdiffeq", "torchode") and p["overhead"] is not None]
            for p in peers:
                targets.append(dict(target=f"forward overhead {r['size']} {r['solver']} below {p['library']}",
                                    measured=f"{r['overhead']:.2f}x vs {p['overhead']:.2f}x", met=r["overhead"] < p["overhead"]))
        if r["mode"] in ("train-direct", "train-adjoint") and r["library"] == "odenet" and "torchdiffeq" in r["ratio_to"]:
            x = r["ratio_to"]["torchdiffeq"]
            targets.append(dict(target=f"{r['mode']} {r['size']} {r['solver']} faster than torchdiffeq",
                                measured=f"{x:.2f}x torchdiffeq's time", met=x < 1.0))
        if r["mode"] == "fixed" and r["library"] == "odenet" and r["solver"] == "euler" and "hand" in r["ratio_to"]:
            x = r["ratio_to"]["hand"]
            phase = "train" if r["train"] else "forward"
            targets.append(dict(target=f"fixed euler {r['size']} {phase} within {FIXED_TARGET}x of the hand loop",
                                measured=f"{x:.2f}x", met=x <= FIXED_TARGET))
        if r["mode"] == "fixed" and r["library"] == "odenet" and r["host_reads_per_step"] is not None:
            phase = "train" if r["train"] else "forward"
            targets.append(dict(target=f"fixed {r['solver']} {r['size']} {phase}: no host sync per step",
                                measured=f"{r['host_reads_per_step']:.2f} reads/step", met=r["host_reads_per_step"] == 0))
        if r["mode"] == "forward" and r["library"] == "odenet" and r["host_reads_per_step"] is not None:
            targets.append(dict(target=f"adaptive {r['solver']} {r['size']}: at most one host sync per step",
                                measured=f"{r['host_reads_per_step']:.2f} reads/step", met=r["host_reads_per_step"] <= 1.0))
    red: Dict[str, float] = {}
    for lib in ("odenet", "torchdiffeq"):
        vals = [r["nfe_backward_reduction"] for r in rows if r["mode"] == "seminorm" and r["library"] == lib
                and r.get("nfe_backward_reduction") is not None]
        if vals:
            red[lib] = statistics.median(vals)
    return dict(targets=targets, seminorm_median_reduction=red)


# ============================================================================ main


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None/False or the help text already names it."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default in (None, False) or "default" in h:
            return h
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_solvers.py",
        description="Benchmark odenet against torchdiffeq and torchode on the same f, tolerances and device "
        "(interleaved repeats, medians). Writes <out>.json and <out>.md.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--sizes", default=None,
                   help="comma-separated problem sizes: presets " + ", ".join(f"{k}={v.label}" for k, v in SIZE_PRESETS.items())
                   + ", or mlp:BATCHxDIMxHIDDEN / conv:BATCHxCxHxW[xHIDDEN] (default: small,medium,large,conv; --quick: tiny)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated modes out of {', '.join(MODES)}")
    p.add_argument("--solvers", default=None,
                   help=f"adaptive solvers for forward/train/seminorm, out of {', '.join(ADAPTIVE)} (default: all; --quick: dopri5)")
    p.add_argument("--fixed-solvers", default="euler,rk4", help=f"fixed-step solvers for --modes fixed, out of {', '.join(FIXED)}")
    p.add_argument("--libraries", default=",".join(LIBRARIES), help="libraries to compare (odenet is the reference)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case; the median is reported (default 7; --quick: 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case before timing")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (intra-op threads)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="dtype of state and weights")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of adaptive solvers (all libraries)")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance of adaptive solvers (all libraries)")
    p.add_argument("--t-end", type=float, default=1.0, help="integrate over [0, T]")
    p.add_argument("--fixed-steps", type=int, default=None, help="N steps of the fixed mode (default 20; --quick: 4)")
    p.add_argument("--memory-steps", default=None, help="comma-separated step counts of the memory mode (default 10,100,1000; --quick: 4,8)")
    p.add_argument("--memory-sizes", default=None, help="sizes of the memory mode (default medium; --quick: tiny)")
    p.add_argument("--memory-solver", default="rk4", help="fixed-step solver of the memory mode")
    p.add_argument("--seminorm-t-ends", default=None,
                   help="comma-separated horizons T of the seminorm mode, each solved over [0, T] "
                   "(default: --t-end and 10x it; --quick: --t-end)")
    p.add_argument("--f-time", type=float, default=None, help="seconds spent timing one f call per size (default 1.0; --quick: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and initial state, and of the order of the timed runs")
    p.add_argument("--malloc-keep", action="store_true",
                   help="glibc only: mallopt(M_TRIM_THRESHOLD, M_MMAP_THRESHOLD) so freed memory is kept and reused; "
                   "without it, large states can page-fault on every allocation (erratic timings at the large sizes). "
                   "Applies to all libraries alike; recorded in the output")
    p.add_argument("--loss-scale", type=float, default=1.0,
                   help="multiply the training loss y(T).square().mean() by this factor (how large the gradients are "
                   "against atol decides whether the seminorm saves backward steps; see docs/benchmarks.md)")
    p.add_argument("--compile", action="store_true", help="run every library on torch.compile(f) (same compiled module for all)")
    p.add_argument("--out", default=None,
                   help="output prefix: writes OUT.json and OUT.md (default: benchmarks/results/bench_solvers)")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    p.add_argument("--quick", action="store_true", help="smoke configuration: tiny sizes, dopri5, few repeats and steps (seconds)")
    return p


def _out_paths(out: str) -> Tuple[Path, Path]:
    """`OUT.json` and `OUT.md` for the prefix `OUT` (dots in it are kept: `loss0.01` stays whole;
    a trailing `.json` or `.md` is dropped)."""
    for ext in (".json", ".md"):
        if out.endswith(ext):
            out = out[: -len(ext)]
    return Path(out + ".json"), Path(out + ".md")


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[Config, List[str]]:
    """Parse the command line into a :class:`Config` (and the argv it came from)."""
    p = build_parser()
    a = p.parse_args(argv)

    def split(s: str) -> List[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    q = a.quick
    try:
        sizes = [parse_size(s) for s in split(a.sizes or ("tiny" if q else "small,medium,large,conv"))]
        memory_sizes = [parse_size(s) for s in split(a.memory_sizes or ("tiny" if q else "medium"))]
    except ValueError as err:
        p.error(str(err))
    modes = split(a.modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    solvers = split(a.solvers or ("dopri5" if q else ",".join(ADAPTIVE)))
    if any(s not in ADAPTIVE for s in solvers):
        p.error(f"--solvers takes adaptive solvers ({', '.join(ADAPTIVE)}), got {solvers}")
    fixed = split(a.fixed_solvers)
    if any(s not in FIXED for s in fixed):
        p.error(f"--fixed-solvers takes fixed-step solvers ({', '.join(FIXED)}), got {fixed}")
    libs = split(a.libraries)
    if any(x not in LIBRARIES for x in libs):
        p.error(f"--libraries takes {', '.join(LIBRARIES)}, got {libs}")
    if "odenet" not in libs:
        p.error("--libraries must include odenet (the reference)")
    if a.memory_solver not in FIXED:
        p.error(f"--memory-solver takes a fixed-step solver ({', '.join(FIXED)}), got {a.memory_solver!r}")
    repeats = a.repeats if a.repeats is not None else (2 if q else 7)
    if not (math.isfinite(a.loss_scale) and a.loss_scale > 0):
        p.error(f"--loss-scale must be a positive finite number, got {a.loss_scale}")
    if repeats < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device takes cpu or cuda[:N], got {a.device!r}")
    cfg = Config(
        sizes=sizes, modes=modes, solvers=solvers, fixed_solvers=fixed, libraries=libs, repeats=repeats,
        warmup=a.warmup, threads=a.threads, device=a.device, dtype=a.dtype, rtol=a.rtol, atol=a.atol, t_end=a.t_end,
        fixed_steps=a.fixed_steps if a.fixed_steps is not None else (4 if q else 20),
        memory_steps=[int(x) for x in split(a.memory_steps or ("4,8" if q else "10,100,1000"))],
        memory_sizes=memory_sizes,
        memory_solver=a.memory_solver,
        seminorm_t_ends=[float(x) for x in split(a.seminorm_t_ends)] if a.seminorm_t_ends
        else ([a.t_end] if q else [a.t_end, 10 * a.t_end]), f_time_s=a.f_time if a.f_time is not None else (0.05 if q else 1.0),
        seed=a.seed, compile=a.compile, malloc_keep=a.malloc_keep, loss_scale=a.loss_scale, out=None if a.no_write else (a.out or str(DEFAULT_OUT)), quick=q,
    )
    return cfg, list(argv if argv is not None else sys.argv[1:])


def _log_rows(rows: List[Dict[str, Any]]) -> None:
    for r in rows:
        parts = [f"{r['mode']:<16}", f"{r['size']:<9}", f"{r['solver']:<7}", f"{_lib_label(r):<26}",
                 f"nfe={r['nfe_forward']}/{r['nfe_backward']}", f"t={_fmt_time(r['time_s'])}",
                 f"ovh={_fmt(r['overhead'], '.2f')}"]
        if r.get("steps"):
            parts.append(f"steps={r['steps']}")
        if r.get("saved_bytes") is not None:
            parts.append(f"saved={_mb(r['saved_bytes'])}MB")
        if r["error"]:
            parts.append(f"ERROR {r['error'][:120]}")
        print("  " + " ".join(parts), flush=True)


def run(cfg: Config, argv: Sequence[str] = (), verbose: bool = True) -> Dict[str, Any]:
    """Run the benchmark described by `cfg`; returns (and writes) the result dict."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    if cfg.malloc_keep and not keep_freed_memory():
        print("warning: --malloc-keep had no effect (not glibc?)", file=sys.stderr)
    log = _log_rows if verbose else (lambda rows: None)
    try:
        rows: List[Dict[str, Any]] = []
        sizes_info: Dict[str, Dict[str, Any]] = {}
        env = environment(cfg, argv)

        def problem(size: Size) -> Problem:
            prob = make_problem(size, cfg)
            prob.probe = FProbe(prob, cfg.device)
            whole = prob.probe.fresh()
            whole.sample_for(cfg.f_time_s)
            prob.t_f, prob.t_fb = whole.median("f"), whole.median("fb")
            sizes_info[size.name] = dict(kind=size.kind, shape=list(size.shape), hidden=size.hidden, label=size.label,
                                         t_f_s=prob.t_f, t_fb_s=prob.t_fb)
            if verbose:
                print(f"[{size.name}] {size.label}: t_f={_fmt_time(prob.t_f)} t_fb={_fmt_time(prob.t_fb)}", flush=True)
            return prob

        main_modes = [m for m in cfg.modes if m not in ("memory",)]
        if main_modes:
            for size in cfg.sizes:
                prob = problem(size)
                for mode in main_modes:
                    if mode == "forward":
                        rows += mode_forward(prob, cfg, log)
                    elif mode.startswith("train-"):
                        rows += mode_train(prob, cfg, mode[len("train-"):], log)
                    elif mode == "fixed":
                        rows += mode_fixed(prob, cfg, log)
                    elif mode == "seminorm":
                        rows += mode_seminorm(prob, cfg, log)
                del prob
                gc.collect()
        if "memory" in cfg.modes:
            for size in cfg.memory_sizes:
                prob = problem(size) if size.name not in sizes_info else _reuse(size, cfg, sizes_info)
                rows += mode_memory(prob, cfg, log)
        cfg_dict = asdict_shallow(cfg)
        cfg_dict["sizes"] = [s.name for s in cfg.sizes]
        cfg_dict["memory_sizes"] = [s.name for s in cfg.memory_sizes]
        result = dict(environment=env, config=cfg_dict, sizes=sizes_info, results=rows, summary=summarize(rows, cfg))
        md = render_markdown(result)
        if cfg.out:
            json_path, md_path = _out_paths(cfg.out)
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=1, default=_json_default))
            md_path.write_text(md)
            result["files"] = [str(json_path), str(md_path)]
        if verbose:
            print()
            print(md)
            if cfg.out:
                print(f"wrote {json_path} and {md_path}")
        return result
    finally:
        torch.set_num_threads(old_threads)


def _reuse(size: Size, cfg: Config, info: Dict[str, Dict[str, Any]]) -> Problem:
    prob = make_problem(size, cfg)
    prob.probe = FProbe(prob, cfg.device)
    prob.t_f, prob.t_fb = info[size.name]["t_f_s"], info[size.name]["t_fb_s"]
    return prob


def _json_default(o):
    if isinstance(o, Size):
        return o.name
    if isinstance(o, Tensor):
        return o.tolist()
    return str(o)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg, args = parse_args(argv)
    return run(cfg, args)


if __name__ == "__main__":
    main()
