"""The library adapters: odenet, torchdiffeq, torchode, a hand-written loop and (CUDA) odenet replayed
from a CUDA graph, each as a `solve(y0) -> (y_final, counts)` built outside the timing."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

import odenet

from .config import Config
from .problems import Problem

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

# Solver names per library (None: the library lacks it).
_TD_NAMES = {"dopri5": "dopri5", "bosh3": "bosh3", "euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4"}
_TO_NAMES = {"dopri5": "Dopri5", "tsit5": "Tsit5", "euler": "Euler"}


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
        """Count the call (forward with or without graph, or backward), then call `f`."""
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


# An adapter builds, once per case and outside the timing, a solve function
# `solve(y0) -> (y_final, counts)`, where `counts()` reads what the run cost (call it
# after backward). `instrumented=True` asks for exact counting even where it costs time.

SolveFn = Callable[[Tensor], Tuple[Tensor, Callable[[], Counts]]]


def supports(lib: str, solver: str) -> bool:
    """Whether `lib` (odenet, torchdiffeq, torchode, hand) has `solver` (and is installed)."""
    if lib == "odenet":
        return solver in odenet.SOLVERS
    if lib == "torchdiffeq":
        return torchdiffeq is not None and solver in _TD_NAMES
    if lib == "torchode":
        return torchode is not None and solver in _TO_NAMES
    if lib == "hand":
        return solver in ("euler", "rk4")
    return False


def gradient_for(lib: str, gradient: str) -> str:
    """The gradient method a library runs in place of `gradient` (peers lack checkpointing)."""
    if gradient == "checkpoint" and lib != "odenet":
        return "direct"
    return gradient


def build_odenet(prob: Problem, solver: str, gradient: str, steps: Optional[int], cfg: Config,
                 seminorm: bool = False, instrumented: bool = False) -> SolveFn:
    """odenet's `odeint` with `steps` fixed steps, or adaptive at the configured tolerances."""
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
    """torchdiffeq's `odeint` (or `odeint_adjoint`); counts only when `instrumented` (callbacks)."""
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
    """torchode on the state flattened to one problem ``[1, numel]``, `IntegralController`."""
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
    """A hand-written loop of `steps` residual updates (euler) or classical RK4 steps: what a ResNet
    with weight-tied blocks would run. Times are precomputed tensors."""
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
    """Evaluations of `f` per step of odenet's `solver`."""
    return odenet.solvers.get_solver(solver).tableau.stages
