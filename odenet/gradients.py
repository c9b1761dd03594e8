"""How gradients flow through a solve: the methods `Direct`, `Adjoint` and `Checkpoint` (data), and
:func:`run_solve`, which runs a solve under one of them.

Gradients with respect to the output times are attached by :func:`attach_time_gradients` for
all three (the solution's derivative with respect to `t_i` is `f(t_i, y_i)`). The adjoint's and
checkpoint's backward passes, and the time gradients, are first order: differentiating their
results again raises (`_first_order_only`) instead of silently giving zero; with `f`'s own
parameters as `params`, their backward also raises if `f` uses another tensor that requires
grad (`_untracked_inputs`), which would otherwise get no gradient.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .solvers.control import Adaptive, Fixed, Option, positive, rms_norm
from .solvers.integrate import CountedFunc, LoopResult, integrate
from .solvers.rk import ExplicitRK
from .solvers.stats import SolveStats
from .solvers.status import SolverError, Status

__all__ = ["Direct", "Adjoint", "Checkpoint", "GradientMethod", "GRADIENTS", "run_solve", "attach_time_gradients"]


@dataclass(frozen=True, repr=False)
class Direct(Option):
    """Backpropagate through every operation of the solve: the exact gradient of the discrete
    solution, to any order; activation memory grows with the number of steps.

    **Example:** `odenet.ODEBlock(f, gradient=odenet.Direct())` (shorthand `gradient="direct"`).
    """

    name = "direct"


@dataclass(frozen=True, repr=False)
class Adjoint(Option):
    """The continuous adjoint (Chen et al., 2018): O(1) activation memory in the number of
    steps; the gradient is accurate to the backward solve's tolerances. First order only.

    **Arguments:**

    - `rtol`, `atol`: tolerances of the backward solve (default: the forward ones). Adaptive
      solvers only: with fixed steps the backward solve runs on the forward grid.
    - `seminorm`: leave the parameter-gradient part of the adjoint state out of error control
      (Kidger et al., 2021), which usually saves backward evaluations.

    **Raises:** `TypeError`/`ValueError` for a non-positive tolerance or a non-bool `seminorm`.

    **Example:**

    ```python
    f = odenet.MLPDynamics(dim=2, hidden=8)
    block = odenet.ODEBlock(f, solver="dopri5", gradient=odenet.Adjoint(rtol=1e-4, atol=1e-6, seminorm=True))
    ```
    (shorthand: `gradient="adjoint", adjoint_rtol=1e-4, adjoint_atol=1e-6, adjoint_seminorm=True`)
    """

    rtol: Optional[float] = None
    atol: Optional[float] = None
    seminorm: bool = False
    name = "adjoint"

    def __post_init__(self):
        for name in ("rtol", "atol"):
            value = positive(f"adjoint {name}", getattr(self, name))
            if value is not getattr(self, name):
                object.__setattr__(self, name, value)
        if not isinstance(self.seminorm, bool):
            raise TypeError(f"adjoint seminorm must be True or False, got {self.seminorm!r}.")


@dataclass(frozen=True, repr=False)
class Checkpoint(Option):
    """Keep the state at each step boundary and recompute one step at a time in backward: the
    same gradient as `Direct` (first order), with memory of one state per step.

    **Example:** `odenet.ODEBlock(f, gradient=odenet.Checkpoint())` (shorthand `gradient="checkpoint"`).
    """

    name = "checkpoint"


GradientMethod = Union[Direct, Adjoint, Checkpoint]
GRADIENTS = {cls.name: cls for cls in (Direct, Adjoint, Checkpoint)}


def _keeps_rng(backward):
    """A backward pass that evaluates `f` again in the solve's scope (the solve's random draws),
    leaving the caller's random-number state as it was (`ctx.fc`: the solve's `CountedFunc`)."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        with ctx.fc.backward_scope():
            return backward(ctx, *grads)

    return wrapped


class _Box:
    """Non-tensor arguments handed through an autograd.Function (and its result back)."""

    def __init__(self, fc: CountedFunc, ts: List[float], solver: ExplicitRK, control: Union[Fixed, Adaptive],
                 gradient: GradientMethod, params: Optional[Tuple[Tensor, ...]], event=None):
        self.fc = fc
        self.event = event  # an event search (odenet.events), handed to the forward loop
        # With `params`, backward looks for tensors f uses other than the state and these (once).
        # The objects themselves: what ctx.saved_tensors unpacks need not be them under
        # saved-tensor hooks, and the graph's leaves are matched by identity.
        self.params = params
        self.ts = ts
        self.solver = solver
        self.control = control
        self.gradient = gradient
        # The autocast the forward ran in, (dtype, cache_enabled), or None: checkpoint's
        # backward recomputes f inside the same one, as torch.utils.checkpoint does.
        self.autocast = (fc.autocast, torch.is_autocast_cache_enabled()) if fc.autocast is not None else None
        self.result: Optional[LoopResult] = None


_SECOND_ORDER = (
    b"odenet: gradient='adjoint' and gradient='checkpoint' give first-order gradients only, and this "
    b"differentiates one of their gradients again (create_graph=True: a gradient penalty, a "
    b"Hessian-vector product). Use gradient='direct' for higher-order gradients."
)
_SECOND_ORDER_TIME = (
    b"odenet: gradients with respect to the output times t are first order under every gradient "
    b"method, and this differentiates one again (create_graph=True). Higher-order gradients reach "
    b"y0 and the parameters of f with gradient='direct'; for the end time T, solve "
    b"dy/ds = T * f(t0 + s * T, y) over s in [0, 1] with T a tensor that f uses, under gradient='direct'."
)


def _first_order_only(grads: tuple, anchors: Sequence[Tensor], message: bytes = _SECOND_ORDER) -> tuple:
    """Make differentiating `grads` again an error, when `backward` runs with `create_graph=True`.

    The backward passes below compute their results outside the graph being built (the
    adjoint's backward solve, the checkpoint's recomputed steps, the time gradients), so a
    second derivative through them would silently be zero or partial. As with
    `torch.autograd.function.once_differentiable`, each result is passed through a node that
    raises, here with a message naming the fix. That node also takes `anchors`, tensors that
    lead back to the forward's inputs (`y0`, the parameters, `t`): `torch.autograd.grad` with
    `inputs` (and `torch.autograd.functional.hessian`, `hvp`) runs only the nodes on a path to
    those inputs, and would otherwise skip it and return zeros.
    """
    if not torch.is_grad_enabled():  # the usual backward: nothing to mark
        return grads
    idx = [i for i, x in enumerate(grads) if isinstance(x, Tensor)]
    if not idx:
        return grads
    anchors = [a for a in anchors if isinstance(a, Tensor) and a.requires_grad]
    marked = torch._C._functions.DelayedError(message, len(idx) + len(anchors))(
        *(grads[i].detach().requires_grad_() for i in idx), *anchors
    )
    if isinstance(marked, Tensor):
        marked = (marked,)
    out = list(grads)
    for i, x in zip(idx, marked[: len(idx)]):
        out[i] = x
    return tuple(out)


def _untracked_inputs(out: Tensor, inputs: Sequence[Tensor], limit: int = 10_000) -> List[Tensor]:
    """The leaf tensors requiring grad that `out`'s graph reaches other than through `inputs`.

    The adjoint and checkpoint methods return gradients for their inputs only (the state and
    the parameters of `f`); anything else `f` uses that requires grad, such as a context
    computed outside `f` and stored on it, would silently get none. A breadth-first walk of
    the graph of one evaluation of `f`, stopping at `inputs` (and after `limit` nodes).
    """
    if out.grad_fn is None:
        return []
    leaves = {id(x) for x in inputs if x.grad_fn is None}
    stops = {id(x.grad_fn): x.grad_fn for x in inputs if x.grad_fn is not None}  # kept alive, as below
    # Visited nodes are kept (values of `seen`): a node's Python object can be freed once
    # dropped, and its id() reused by the next one.
    seen = {id(out.grad_fn): out.grad_fn}
    queue = collections.deque([out.grad_fn])
    found: List[Tensor] = []
    while queue and len(seen) < limit:
        node = queue.popleft()
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf that requires grad
        if variable is not None:
            if id(variable) not in leaves:
                found.append(variable)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen and id(nxt) not in stops:
                seen[id(nxt)] = nxt
                queue.append(nxt)
    return found


def _check_tracked(out: Tensor, inputs: Sequence[Tensor], method: str, again: Callable[[], Tensor]) -> None:
    """Raise if `f` (evaluated as `out`) uses a tensor that requires grad from outside `inputs`.

    A leaf that `f` makes afresh at every call (`x = y.detach().requires_grad_()` to take an
    energy's gradient) is `f`'s own; only a leaf found again in a second evaluation, `again()`
    (made only when the first walk finds something), is a tensor `f` uses from outside.
    """
    found = _untracked_inputs(out, inputs)
    if not found:
        return
    second = _untracked_inputs(again(), inputs)
    kept = [x for x in found if any(x is y for y in second)]
    if kept:
        raise RuntimeError(
            f"odenet: f's result depends on a tensor that requires grad but is neither the state nor a "
            f"parameter of f (a leaf of shape {list(kept[0].shape)} in its graph), and gradient={method!r} "
            "cannot give it a gradient: typically a context computed outside f and stored on it, or a "
            "tensor f closes over. Pass it to the block as a keyword instead, block(x, mask=m), which "
            "calls f(t, x, mask=m) and differentiates it; or use "
            "gradient='direct'; or make it part of the state (concatenate it to y0, with f returning "
            "zeros for it); or, with odenet.odeint, pass adjoint_params listing every tensor to "
            "differentiate (for a module f: (it, *f.parameters())); or .detach() it if it should "
            "get no gradient."
        )


# ---------------------------------------------------------------------------- adjoint


def _adjoint_norm(n: int, seminorm: bool, n_params: int) -> Callable[[Tensor], Tensor]:
    """Max of the RMS norms of the y, a and a_θ parts (a_θ left out for the seminorm)."""

    def norm(e: Tensor) -> Tensor:
        parts = [rms_norm(e[:n]), rms_norm(e[n : 2 * n])]
        if n_params and not seminorm:
            parts.append(rms_norm(e[2 * n :]))
        return torch.stack(parts).max()

    return norm


def _augmented_dynamics(box: _Box, shape: torch.Size, params: Sequence[Tensor]) -> Callable[[float, Tensor], Tensor]:
    """The adjoint system on the flat state `z = [y, a, a_θ]`: `dz/dt = [f, -a·∂f/∂y, -a·∂f/∂θ]`."""
    fc, n = box.fc, shape.numel()
    check = box.params is not None  # on the first evaluation only

    def f_aug(t: float, z: Tensor) -> Tensor:
        nonlocal check
        a = z[n : 2 * n].view(shape)
        with torch.enable_grad():
            y = z[:n].view(shape).detach().requires_grad_(True)
            if check:
                # The time tensor is made here so that the walk knows it: f may set
                # requires_grad on its t (FFJORD does), which makes t a leaf of the graph.
                tt = torch.scalar_tensor(t, dtype=y.dtype, device=y.device)
                fy = fc(tt, y)
                _check_tracked(fy, (y, tt, *box.params), "adjoint", lambda: fc(tt, y))
                check = False
            else:
                fy = fc(t, y)
            vjps = (None,) * (1 + len(params))
            if fy.requires_grad:
                vjps = torch.autograd.grad(fy, (y, *params), -a, allow_unused=True)
        parts = [fy.detach().reshape(-1)]
        for v, ref in zip(vjps, (y, *params)):
            parts.append(z.new_zeros(ref.numel()) if v is None else v.reshape(-1).to(z.dtype))
        return torch.cat(parts)

    return f_aug


def _backward_control(box: _Box, seg: List[float]) -> Tuple[Union[Fixed, Adaptive], Optional[List[float]]]:
    """Step control of the adjoint's solve over `seg` (backward in time): the forward one with
    the adjoint's tolerances, or the forward grid's points inside `seg`."""
    control, gradient = box.control, box.gradient
    if isinstance(control, Adaptive):
        rtol, atol = gradient.rtol or control.rtol, gradient.atol or control.atol
        # Jointly: the parameter part of the adjoint state sums over the samples.
        return dataclasses.replace(control, rtol=rtol, atol=atol, per_sample=False), None
    lo, hi = min(seg), max(seg)
    inner = [x for x in reversed(control.grid(box.ts)) if lo < x < hi]
    return control, [seg[0], *inner, seg[1]]


class _AdjointFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, box: _Box, y0: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            # A detached start: f may differentiate with respect to its input (RNODE, FFJORD),
            # which fails on a tensor that only looks like a graph leaf under no_grad.
            res = integrate(box.fc, y0.detach(), box.ts, box.solver, box.control, stats=box.fc.stats,
                            event=box.event)
        box.result = res
        ys = torch.stack(res.ys)
        ctx.box, ctx.fc = box, box.fc
        ctx.save_for_backward(ys, *params)
        return ys

    @staticmethod
    @_keeps_rng
    def backward(ctx, g: Tensor):
        box: _Box = ctx.box
        ys, *params = ctx.saved_tensors
        ts, shape, n = box.ts, ys.shape[1:], ys[0].numel()
        if box.result.event_t is not None:  # the output is the state at the event time, a fixed time here
            ts = [ts[0], box.result.event_t]
        f_aug = _augmented_dynamics(box, shape, params)
        norm = _adjoint_norm(n, box.gradient.seminorm, len(params))
        bstats = SolveStats()
        a, ap = g[-1], ys.new_zeros(sum(p.numel() for p in params))
        try:
            with torch.no_grad():
                for i in range(len(ts) - 1, 0, -1):
                    seg = [ts[i], ts[i - 1]]
                    control, grid = _backward_control(box, seg)
                    z0 = torch.cat([ys[i].reshape(-1), a.reshape(-1), ap])
                    res = integrate(f_aug, z0, seg, box.solver, control, stats=bstats, grid=grid, norm=norm)
                    if res.status is not Status.SUCCESS:
                        raise _adjoint_failure(res, control, seg, box.fc.stats)
                    a = res.ys[-1][n : 2 * n].view(shape) + g[i - 1]
                    ap = res.ys[-1][2 * n :]
        finally:
            box.fc.stats.n_accepted_backward += bstats.n_accepted
            box.fc.stats.n_rejected_backward += bstats.n_rejected
        grads_p, offset = [], 0
        for p in params:
            grads_p.append(ap[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return _first_order_only((None, a, *grads_p), (ys, *params))  # ys: its node leads to y0


def _adjoint_failure(res: LoopResult, control, seg: List[float], stats: SolveStats) -> SolverError:
    return SolverError(
        f"The adjoint (backward) solve from t={seg[0]:.6g} to t={seg[1]:.6g} failed. {res.message(control)} "
        "For the adjoint you can also set adjoint_rtol/adjoint_atol, or use gradient='checkpoint'.",
        res.status,
        stats,
    )


# ---------------------------------------------------------------------------- checkpoint


class _CheckpointFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, box: _Box, y0: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            res = integrate(box.fc, y0.detach(), box.ts, box.solver, box.control, stats=box.fc.stats, record=True,
                            event=box.event)
        box.result = res
        ctx.box, ctx.fc = box, box.fc
        ctx.n_params = len(params)
        # The step-boundary states go through save_for_backward so that they are visible
        # to saved-tensor hooks (and so to activation-memory measurements).
        # y0 itself too, an anchor for second-order errors (see _first_order_only): the first
        # state is y0.detach(), the same storage, so this keeps nothing more alive.
        ctx.save_for_backward(y0, *params, *(r.y for r in res.records))
        return torch.stack(res.ys)

    @staticmethod
    @_keeps_rng
    def backward(ctx, g: Tensor):
        box: _Box = ctx.box
        y0, *saved = ctx.saved_tensors
        params, states = saved[: ctx.n_params], saved[ctx.n_params :]
        solver, fc = box.solver, box.fc
        records = box.result.records
        a = torch.zeros_like(g[0])
        grads_p: List[Optional[Tensor]] = [None] * len(params)
        check = box.params is not None
        # Recompute f as the forward computed it: inside the autocast the solve started in.
        if box.autocast is None:
            recompute = contextlib.nullcontext()
        else:
            recompute = torch.autocast(g.device.type, dtype=box.autocast[0], cache_enabled=box.autocast[1])
        for rec, y_start in zip(reversed(records), reversed(states)):
            with torch.enable_grad(), recompute:
                yn = y_start.detach().requires_grad_(True)
                dense = any(theta is not None for _, theta in rec.outputs)
                k1 = None
                if check:  # the first stage evaluated here, with its time tensor known (as above)
                    t0 = torch.scalar_tensor(rec.t, dtype=yn.dtype, device=yn.device)
                    k1 = fc(t0, yn)
                    _check_tracked(k1, (yn, t0, *box.params), "checkpoint", lambda: fc(t0, yn))
                    check = False
                step = solver.step(fc, rec.t, yn, rec.h, k1, with_error=False, last_stage=dense)
                outs = [step.y1]
                g_end = a
                gouts = [None]
                for idx, theta in rec.outputs:
                    if theta is None:
                        g_end = g_end + g[idx]
                    else:
                        outs.append(solver.interpolate(yn, rec.h, step.ks, theta))
                        gouts.append(g[idx])
                gouts[0] = g_end
                grads = torch.autograd.grad(outs, (yn, *params), gouts, allow_unused=True)
            a = grads[0] if grads[0] is not None else torch.zeros_like(a)
            for j, gp in enumerate(grads[1:]):
                if gp is not None:
                    grads_p[j] = gp if grads_p[j] is None else grads_p[j] + gp
        return _first_order_only((None, a + g[0], *grads_p), (y0, *params))


# ---------------------------------------------------------------------------- entry


def run_solve(
    fc: CountedFunc,
    y0: Tensor,
    ts: List[float],
    solver: ExplicitRK,
    control: Union[Fixed, Adaptive],
    gradient: GradientMethod,
    params: Sequence[Tensor] = (),
    check_inputs: bool = True,
    event=None,
) -> Tuple[Tensor, LoopResult]:
    """Solve with the chosen gradient method; returns the stacked outputs `[len(ts), *y0.shape]`
    and the loop's result (status, final time and step). With `check_inputs`, the adjoint's and
    checkpoint's backward raise if `f` uses a tensor that requires grad other than the state
    and `params` (it would get no gradient); off where the caller chose `params` itself. With an
    `event` (see `integrate`), the last output is the state at the event time `res.event_t`,
    differentiated as the solution at that fixed time (`odenet.events` adds the time's gradient)."""
    if isinstance(gradient, Direct):
        res = integrate(fc, y0, ts, solver, control, stats=fc.stats, event=event)
        return torch.stack(res.ys), res
    params = tuple(params)
    box = _Box(fc, ts, solver, control, gradient, params if check_inputs else None, event)
    fn = _AdjointFn if isinstance(gradient, Adjoint) else _CheckpointFn
    return fn.apply(box, y0, *params), box.result


# ---------------------------------------------------------------------------- time gradients


class _StartTime(torch.autograd.Function):
    """Identity on y0; dL/dt0 = -a(t0) · f(t0, y0), with a(t0) the gradient reaching the solve's start."""

    @staticmethod
    def forward(ctx, y0: Tensor, t: Tensor, fc: CountedFunc, t0: float) -> Tensor:
        ctx.save_for_backward(y0, t)
        ctx.fc, ctx.t0, ctx.t_meta = fc, t0, (t.shape, t.dtype, t.device)
        return y0.clone()

    @staticmethod
    @_keeps_rng
    def backward(ctx, a: Tensor):
        y0, t = ctx.saved_tensors
        shape, dtype, device = ctx.t_meta
        grad_t = torch.zeros(shape, dtype=dtype, device=device)
        with torch.no_grad():
            grad_t[0] = -(a * ctx.fc(ctx.t0, y0)).sum().to(dtype)
        return (a, *_first_order_only((grad_t,), (y0, t), _SECOND_ORDER_TIME), None, None)  # `a` passes through


class _OutputTimes(torch.autograd.Function):
    """Identity on ys; dL/dt_i = g_i · f(t_i, y_i) for every output after the first."""

    @staticmethod
    def forward(ctx, ys: Tensor, t: Tensor, fc: CountedFunc, ts: List[float]) -> Tensor:
        ctx.save_for_backward(ys, t)
        ctx.fc, ctx.ts, ctx.t_meta = fc, ts, (t.shape, t.dtype, t.device)
        return ys.clone()

    @staticmethod
    @_keeps_rng
    def backward(ctx, g: Tensor):
        ys, t = ctx.saved_tensors
        shape, dtype, device = ctx.t_meta
        grad_t = torch.zeros(shape, dtype=dtype, device=device)
        with torch.no_grad():
            for i in range(1, len(ctx.ts)):
                grad_t[i] = (g[i] * ctx.fc(ctx.ts[i], ys[i])).sum().to(dtype)
        return (g, *_first_order_only((grad_t,), (ys, t), _SECOND_ORDER_TIME), None, None)  # `g` passes through


def attach_time_gradients(
    solve: Callable[[Tensor], Tuple[Tensor, LoopResult]], fc: CountedFunc, y0: Tensor, t: Tensor, ts: List[float]
) -> Tuple[Tensor, LoopResult]:
    """Run `solve(y0)` so that gradients also reach the time tensor `t`.

    The output at `t0` is `y0` itself; the start of the solve is routed through
    :class:`_StartTime` and the outputs through :class:`_OutputTimes`.
    """
    y_start = _StartTime.apply(y0, t, fc, ts[0])
    ys, res = solve(y_start)
    ys = torch.cat([y0.unsqueeze(0), ys[1:]])
    return _OutputTimes.apply(ys, t, fc, ts), res
