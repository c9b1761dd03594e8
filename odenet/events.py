"""Stopping a solve at an event: the first root of `event_fn(t, y)` after `t0`.

:func:`odeint_event` integrates until `event_fn(t, y)` changes sign, locates the root inside
the accepted step on the solver's dense output, and returns the event time and the state there,
both differentiable. The event time's gradient comes from the implicit function theorem: with
`g(t*, y(t*)) = 0`, `dt*/dθ = -(∂g/∂θ) / (dg/dt)` where `dg/dt = ∂g/∂t + ∂g/∂y · f(t*, y*)`, for
`θ` anything the solve or `event_fn` depends on (`y0`, `t0`, `f`'s and `event_fn`'s parameters).
The state at the event is the solution at the fixed time `t*`, differentiated by the chosen
gradient method (`Direct`, `Adjoint`, `Checkpoint`), plus `f(t*, y*)·dt*`.

Semantics follow torchdiffeq's `odeint_event`: `event_fn` may return a tensor of any shape, and
the event is the first time any element changes sign from its sign at `t0`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .gradients import Direct, GradientMethod, _first_order_only, _keeps_rng, _StartTime, run_solve
from .options import SHORTHAND, SolveOptions, check_keywords, options_from
from .solution import Solution
from .solvers.control import Adaptive, Fixed
from .solvers.integrate import CountedFunc, autocast_dtype
from .solvers.rk import ExplicitRK
from .solvers.stats import SolveStats
from .solvers.status import SolverError, Status
from .tree import LeafTolerances, TreeFunc, TreeSpec, split_tolerances, structured_options

__all__ = ["odeint_event", "solve_event", "NoEventError"]

#: With a fixed-step solver, `Fixed(step_size=h)` and no `t_max`, the search gives up after this many steps.
FIXED_STEP_LIMIT = 10_000


class NoEventError(SolverError):
    """The solve reached `t_max` without `event_fn` changing sign. A `SolverError` whose `status` is
    `Status.SUCCESS` (the solve itself succeeded) and whose `solution` ends at `t_max`."""


class _EventSearch:
    """What the integrate loop calls after every accepted step (see `integrate`'s `event`).

    Watches `c(t, y) = min(sign(g(t0, y0)) · g(t, y))`, positive at `t0` and non-positive once any
    element of `g` has changed sign: one evaluation of `event_fn` and one host read per step. In
    the step where `c` first turns non-positive, the root is bracketed on the dense output by
    the Illinois method (regula falsi), safeguarded by bisection, to the resolution of the
    state's dtype; the step's `θ` returned is the bracket's end *before* the crossing, so a
    solve restarted from the event state does not fire again at once.
    """

    def __init__(self, event_fn: Callable[[Tensor, Tensor], Tensor], t0: float, y0: Tensor):
        self.event_fn = event_fn
        with torch.no_grad():
            g0 = event_fn(torch.scalar_tensor(t0, dtype=y0.dtype, device=y0.device), y0)
        name = getattr(event_fn, "__qualname__", None) or type(event_fn).__name__
        if not isinstance(g0, Tensor) or not g0.is_floating_point() or g0.numel() == 0:
            raise TypeError(
                f"event_fn(t, y) must return a non-empty floating-point tensor (the event is where an element "
                f"changes sign), but {name} returned {g0!r:.80}."
            )
        g0 = g0.detach()
        if not bool(torch.isfinite(g0).all()) or bool((g0 == 0).any()):
            raise ValueError(
                f"event_fn(t0, y0) must be finite and non-zero in every element (the event is the first change of "
                f"sign after t0), but {name} gave {g0.tolist() if g0.numel() <= 8 else g0}. If the state starts on "
                "the event surface, start just off it (torchdiffeq's bouncing ball adds 1e-7 to the height); a "
                "state returned by odeint_event is already on the side it came from."
            )
        self.sign = torch.sign(g0)
        self.last = float((g0 * self.sign).min())  # c at the start of the next step (the secant's first end)
        self.eps = torch.finfo(y0.dtype).eps

    def value(self, t: Union[float, Tensor], y: Tensor) -> Tensor:
        """`c(t, y)`, a 0-dim tensor (differentiable where `t`, `y` or `event_fn`'s tensors are)."""
        if not isinstance(t, Tensor):
            t = torch.scalar_tensor(t, dtype=y.dtype, device=y.device)
        return (self.event_fn(t, y) * self.sign).min()

    def __call__(self, solver: ExplicitRK, t: float, h: float, y: Tensor, y1: Tensor, ks) -> Optional[float]:
        with torch.no_grad():
            c1 = float(self.value(t + h, y1))  # the one host read per step
            if not c1 <= 0.0:  # no crossing (a NaN does not count as one)
                if math.isfinite(c1):
                    self.last = c1
                return None
            return self._root(solver, t, h, y, ks, self.last, c1)

    def _root(self, solver: ExplicitRK, t: float, h: float, y: Tensor, ks, ca: float, cb: float) -> float:
        """θ in [0, 1) with c > 0 at θ and c <= 0 within the time resolution after it."""
        a, b = 0.0, 1.0
        tol = 4.0 * self.eps * max(abs(t), abs(t + h)) / abs(h)  # in θ: a few ulps of the time
        side, ref, stall = 0, 1.0, 0  # stall: tries since the bracket last halved (from `ref`)
        for _ in range(400):  # bisection every fifth try at worst: ~270 reach any tolerance; the bound ends it anyway
            if b - a <= tol:
                break
            theta = a - ca * (b - a) / (cb - ca) if math.isfinite(ca) and cb != ca else 0.5 * (a + b)
            if stall >= 4 or not a <= theta <= b:  # also for a NaN
                theta = 0.5 * (a + b)
            # At least half the tolerance inside: a root met from one side closes the bracket on the next try.
            theta = min(max(theta, a + 0.5 * tol), b - 0.5 * tol)
            c = float(self.value(t + theta * h, solver.interpolate(y, h, ks, theta)))
            if c > 0.0:
                a, ca = theta, c
                if side > 0:  # a moved twice in a row: Illinois halves the kept end's value
                    cb *= 0.5
                side = 1
            else:  # crossed (or NaN, treated as crossed so that the bracket shrinks)
                b, cb = theta, (c if math.isfinite(c) else cb)
                if side < 0:
                    ca *= 0.5
                side = -1
            ref, stall = (b - a, 0) if b - a <= 0.5 * ref else (ref, stall + 1)
        return a


class _EventTime(torch.autograd.Function):
    """The event time `t*` and the state there from `c(t*, y*)` (`value`) and `y*` at the fixed time `t*`.

    Backward, with `G = ∂L/∂t* + ∂L/∂y*·f(t*, y*)` (the loss's total derivative along the
    trajectory), sends `-G / (dc/dt)` into `value`, whose graph carries it on to `y*` (as
    `∂c/∂y`), to `event_fn`'s tensors and through the solve; `∂L/∂y*` itself passes through.
    """

    @staticmethod
    def forward(ctx, value: Tensor, y: Tensor, search: _EventSearch, fc: CountedFunc, t_event: float):
        ctx.save_for_backward(y)
        ctx.search, ctx.fc, ctx.t_event = search, fc, t_event
        return torch.scalar_tensor(t_event, dtype=y.dtype, device=y.device), y.clone()

    @staticmethod
    @_keeps_rng
    def backward(ctx, grad_t: Tensor, grad_y: Tensor):
        (y,) = ctx.saved_tensors
        with torch.enable_grad():
            tt = torch.scalar_tensor(ctx.t_event, dtype=y.dtype, device=y.device).requires_grad_(True)
            yy = y.detach().requires_grad_(True)
            dc_dt, dc_dy = torch.autograd.grad(ctx.search.value(tt, yy), (tt, yy), allow_unused=True)
        with torch.no_grad():
            fy = ctx.fc(ctx.t_event, y)
            rate = (dc_dy * fy).sum() if dc_dy is not None else torch.zeros((), dtype=y.dtype, device=y.device)
            if dc_dt is not None:
                rate = rate + dc_dt
            # A tangential crossing (rate 0) has no differentiable event time: the result is inf/NaN.
            grad_value = -(grad_t + (grad_y * fy).sum()) / rate
        return (*_first_order_only((grad_value,), (y,), _SECOND_ORDER_EVENT), grad_y, None, None, None)


_SECOND_ORDER_EVENT = (
    b"odenet: the event time's gradient (implicit function theorem) is first order, and this differentiates it "
    b"again (create_graph=True). Higher-order gradients reach y0 and the parameters of f through odenet.odeint "
    b"with gradient='direct' at a fixed end time."
)


def _params(f, adjoint_params) -> Tuple[Tensor, ...]:
    """What `Adjoint`/`Checkpoint` differentiate: `adjoint_params`, or `f`'s parameters (those that require grad)."""
    if adjoint_params is None:
        params = tuple(f.parameters()) if isinstance(f, nn.Module) else ()
    else:
        params = tuple(adjoint_params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"adjoint_params must be tensors, got {type(p).__name__}.")
    return tuple(p for p in params if p.requires_grad)


def _start(f, y0, t0, event_fn) -> Tuple[Optional[Tensor], float]:
    """Checks `f`, `y0`, `t0`, `event_fn`; returns `t0` as a tensor (or None) and as a float."""
    if not callable(f):
        raise TypeError(f"f must be callable as f(t, y), got {type(f).__name__}.")
    if not callable(event_fn):
        raise TypeError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}.")
    if not isinstance(y0, Tensor) or not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point torch.Tensor, got {getattr(y0, 'dtype', type(y0).__name__)}.")
    if isinstance(t0, Tensor):
        if t0.numel() != 1:
            raise ValueError(f"t0 must be one time (a number or a one-element tensor), got shape {tuple(t0.shape)}.")
        t0_tensor, start = t0, float(t0.detach().reshape(()))
    else:
        try:
            t0_tensor, start = None, float(t0)
        except (TypeError, ValueError):
            raise TypeError(f"t0 must be a number or a one-element tensor, got {t0!r}.") from None
    if not math.isfinite(start):
        raise ValueError(f"t0 must be finite, got {start}.")
    return t0_tensor, start


def _end(opts: SolveOptions, start: float, t_max, reverse_time: bool) -> float:
    """The time at which the search gives up: `t_max`, or unbounded (adaptive) / the step limit (fixed)."""
    sign = -1.0 if reverse_time else 1.0
    if t_max is not None:
        end = float(t_max.detach().reshape(())) if isinstance(t_max, Tensor) else float(t_max)
        if math.isnan(end) or sign * (end - start) <= 0:
            raise ValueError(
                f"t_max={end} must lie {'before' if reverse_time else 'after'} t0={start}"
                f"{' (reverse_time=True)' if reverse_time else ''}; for a search backwards in time pass "
                "reverse_time=True and an earlier t_max."
            )
        if math.isfinite(end) or opts.adaptive:
            return end
    elif opts.adaptive:
        return sign * math.inf
    if opts.control.step_size is None:
        raise ValueError(
            f"A fixed-step solver ({opts.solver_name}) needs a finite t_max, or step_size= (then the search "
            f"gives up after {FIXED_STEP_LIMIT} steps), to lay out its grid; got t_max={t_max}, "
            f"control={opts.control!r}."
        )
    return start + sign * FIXED_STEP_LIMIT * opts.control.step_size


def solve_event(
    f: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t0: Union[float, Tensor],
    event_fn: Callable[[Tensor, Tensor], Tensor],
    opts: SolveOptions,
    *,
    t_max: Union[float, Tensor, None] = None,
    reverse_time: bool = False,
    adjoint_params: Optional[Sequence[Tensor]] = None,
    tol: Optional[LeafTolerances] = None,
) -> Tuple[Tensor, Solution]:
    """:func:`odeint_event` with already built :class:`odenet.options.SolveOptions` (the hook for
    `odenet.odeint` and `odenet.compat`); the same arguments and results. A tuple, list or dict
    `y0` (with `tol`, its per-leaf tolerances) is solved as one flat vector, as `odenet.odeint`
    solves it: `f` and `event_fn` see the structure, and `sol.ys` has it."""
    if not isinstance(y0, (tuple, list, dict)):
        return _solve_event(f, y0, t0, event_fn, opts, t_max, reverse_time, adjoint_params)
    spec = TreeSpec.of(y0)
    flat = spec.flatten(y0)
    if opts.adaptive:
        opts = structured_options(opts, spec, flat, tol)
    event_t, sol = _solve_event(TreeFunc(f, spec), flat, t0, lambda t, y: event_fn(t, spec.unflatten(y)), opts,
                                t_max, reverse_time, adjoint_params)
    return event_t, dataclasses.replace(sol, ys=spec.unflatten(sol.ys, (len(sol.ts),)))


def _solve_event(f, y0: Tensor, t0, event_fn, opts: SolveOptions, t_max, reverse_time: bool,
                 adjoint_params) -> Tuple[Tensor, Solution]:
    """`solve_event` for a tensor state."""
    if opts.backend != "odenet":
        raise ValueError("Events need backend='odenet' (use torchdiffeq.odeint_event directly for torchdiffeq's).")
    t0_tensor, start = _start(f, y0, t0, event_fn)
    end = _end(opts, start, t_max, reverse_time)
    fc = CountedFunc(f, SolveStats(), autocast_dtype(y0.device.type))
    search = _EventSearch(event_fn, start, y0)
    params = () if isinstance(opts.gradient, Direct) else _params(f, adjoint_params)
    y_start = y0
    if t0_tensor is not None and t0_tensor.requires_grad and torch.is_grad_enabled():
        y_start = _StartTime.apply(y0, t0_tensor.reshape(1), fc, start)  # dL/dt0 = -a(t0)·f(t0, y0)
    try:
        ys, res = run_solve(fc, y_start, [start, end], opts.solver, opts.control, opts.gradient, params,
                            adjoint_params is None, event=search)
    finally:
        fc.backward = True  # any later call of f is part of the backward pass
    y_end, status, t_event = ys[-1], res.status, res.event_t
    if status is not Status.SUCCESS:
        message = "The solve failed before an event was found. " + res.message(opts.control)
        t_event = math.nan
    elif t_event is None:
        message = (
            f"No event: event_fn(t, y) kept its sign from t0={start:.6g} to t_max={end:.6g} (checked at every "
            "accepted step's end, so a pair of roots inside one step is missed). Raise t_max, tighten the "
            "tolerances or shorten the steps, or check event_fn."
        )
        t_event = math.nan
    else:
        message = f"The solve succeeded; the event happened at t={t_event:.6g}."
    if math.isnan(t_event):
        event_t = torch.scalar_tensor(math.nan, dtype=y0.dtype, device=y0.device)
    else:
        event_t = torch.scalar_tensor(t_event, dtype=y0.dtype, device=y0.device)
        if torch.is_grad_enabled():
            with torch.enable_grad():
                value = search.value(t_event, y_end)
            if value.requires_grad or y_end.requires_grad:
                event_t, y_end = _EventTime.apply(value, y_end, search, fc, t_event)
    ys = torch.stack([y0, y_end])  # the output at t0 is y0 itself (not routed through t0's gradient)
    ts = torch.tensor([start, end if math.isnan(t_event) and status is Status.SUCCESS else t_event],
                      dtype=y0.dtype, device=y0.device)
    sol = Solution(ts=ts, ys=ys, stats=fc.stats, status=status, message=message, steps=list(res.steps))
    if opts.throw and status is not Status.SUCCESS:
        raise SolverError(message, status, fc.stats, sol)
    if opts.throw and res.event_t is None and status is Status.SUCCESS:
        raise NoEventError(message, status, fc.stats, sol)
    return event_t, sol


def odeint_event(
    f: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t0: Union[float, Tensor],
    event_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    t_max: Union[float, Tensor, None] = None,
    reverse_time: bool = False,
    solver: Union[str, ExplicitRK] = "dopri5",
    control: Union[Fixed, Adaptive, None] = None,
    gradient: Union[str, GradientMethod] = "direct",
    adjoint_params: Optional[Sequence[Tensor]] = None,
    throw: bool = True,
    **shorthand,
) -> Tuple[Tensor, Solution]:
    """Solve `dy/dt = f(t, y)` from `y(t0) = y0` until the first root of `event_fn(t, y)`.

    The event is the first time after `t0` at which any element of `event_fn(t, y)` has changed
    sign from its sign at `t0` (as torchdiffeq's `odeint_event`; for a batch whose samples each
    have an element, the first sample to cross ends the solve for all). It is tested at the end of
    every accepted step (one evaluation of `event_fn`, one host read), and located inside the
    step on the solver's dense output (no further evaluations of `f`; every built-in method has
    one, linear for Euler) to a few ulps of the time; the time returned is on the side of the
    root the solve came from, so a restart from the event state does not fire at once. Two
    roots inside one step are missed: bound the step size (`max_steps` is a step count; use
    tighter tolerances, or a fixed-step solver's `step_size`).

    **Arguments:**

    - `f`, `y0`, `solver`, `control`, `gradient`, `adjoint_params`, `throw`, `**shorthand`: as
      for `odenet.odeint` (`t0` takes the place of `t`); `y0` may be a tuple, list or dict of
      tensors, with `rtol`/`atol` per leaf, and `event_fn` then sees that structure.
    - `t0`: the start time, a number or a one-element tensor (gradients flow to it).
    - `event_fn`: `event_fn(t, y) -> Tensor` of any shape, not zero at `(t0, y0)`; `t` is a
      0-dim tensor of `y0`'s dtype. Its tensors (an `nn.Module`'s parameters, a closure's)
      get gradients by ordinary autograd, under every gradient method.
    - `t_max`: give up at this time (default: never, for an adaptive solver, which then stops
      at the step limit, `max_steps` or 10,000; a fixed-step solver needs `t_max` or `step_size`,
      then giving up after 10,000 steps).
    - `reverse_time`: search backwards in time from `t0` (then `t_max < t0`).

    **Returns:** `(event_t, solution)`: the event time, a 0-dim tensor of `y0`'s dtype, and an
    `odenet.Solution` with `ts = [t0, event_t]` and `ys = [y0, y(event_t)]` (in `y0`'s structure). Both are
    differentiable (first order for the event time's part) under `Direct`, `Adjoint` and
    `Checkpoint`, by the implicit function theorem: `dt*/dθ = -(∂g/∂θ)/(∂g/∂t + ∂g/∂y·f)`.

    **Raises:** `ValueError`/`TypeError` for bad input, including an `event_fn` that is zero or
    non-finite at `(t0, y0)`; `odenet.events.NoEventError` (a `SolverError`) when `t_max` comes
    first, and `odenet.SolverError` when the solve fails, both with `throw=True`. With
    `throw=False` these return `event_t = NaN` and the solution's `message` says why (its
    `status` is `SUCCESS` when `t_max` came first, `ys[-1]` the state there).

    **Example:**

    ```python
    import torch
    from odenet.events import odeint_event

    g = torch.tensor(9.81, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([10.0, 0.0], dtype=torch.float64)  # height, velocity
    fall = lambda t, y: torch.stack([y[1], -g])
    t_hit, sol = odeint_event(fall, y0, 0.0, lambda t, y: y[0], rtol=1e-10, atol=1e-12)
    t_hit.backward()  # t_hit = sqrt(2·10/g), so dt/dg = -t_hit/(2g)
    ```
    """
    tol = None
    if shorthand:
        check_keywords("odeint_event", shorthand, SHORTHAND)
        if isinstance(y0, (tuple, list, dict)):  # rtol/atol may give one number per leaf
            rtol, atol, tol = split_tolerances(y0, shorthand.get("rtol"), shorthand.get("atol"))
            shorthand.update(rtol=rtol, atol=atol)
    opts = options_from(solver, control, gradient, "odenet", throw, **shorthand)
    return solve_event(f, y0, t0, event_fn, opts, t_max=t_max, reverse_time=reverse_time,
                       adjoint_params=adjoint_params, tol=tol)
