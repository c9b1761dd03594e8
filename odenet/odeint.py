"""The functional entry point :func:`odeint`, its option validation, and the torchdiffeq backend."""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .gradients import GRADIENTS, attach_time_gradients, run_solve
from .solution import Solution
from .solvers.controller import PIController
from .solvers.integrate import CountedFunc, autocast_dtype
from .solvers.rk import SOLVERS, ExplicitRK, get_solver
from .solvers.stats import SolveStats
from .solvers.status import SolverError, Status

__all__ = ["odeint", "SolveOptions", "make_options", "BACKENDS"]

BACKENDS = ("odenet", "torchdiffeq")

#: Defaults for adaptive solvers, the same as torchdiffeq's so that swapping is painless.
DEFAULT_RTOL = 1e-7
DEFAULT_ATOL = 1e-9
DEFAULT_MAX_STEPS = 10_000

# odenet names that torchdiffeq spells differently.
_TORCHDIFFEQ_NAMES = {"heun": "heun2"}


@dataclass(frozen=True)
class SolveOptions:
    """Validated solver settings (made by :func:`make_options`; see :func:`odeint` for the fields).

    **Fields:** `solver` (a solver object, or a name with the torchdiffeq backend), `adaptive`,
    `rtol`, `atol`, `steps`, `step_size`, `first_step`, `min_step`, `max_steps`, `controller`,
    `gradient`, `adjoint_rtol`, `adjoint_atol`, `adjoint_seminorm`, `backend`, `throw`:

    - each as the `odeint` argument of that name, after validation and defaults.

    **Example:**

    ```python
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2), solver="rk4", steps=4)
    assert block.options.solver_name == "rk4" and not block.options.adaptive
    ```
    """

    solver: Union[ExplicitRK, str]
    adaptive: bool
    rtol: Optional[float]
    atol: Optional[float]
    steps: Optional[int]
    step_size: Optional[float]
    first_step: Optional[float]
    min_step: Optional[float]
    max_steps: Optional[int]
    controller: Optional[PIController]
    gradient: str
    adjoint_rtol: Optional[float]
    adjoint_atol: Optional[float]
    adjoint_seminorm: bool
    backend: str
    throw: bool

    @property
    def solver_name(self) -> str:
        """The solver's name, e.g. `"dopri5"`."""
        return self.solver if isinstance(self.solver, str) else self.solver.name


def _positive(name: str, value, allow_none: bool = True) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return value


def _positive_int(name: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}).")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}.")
    return int(value)


def _torchdiffeq_is_adaptive(method: str) -> bool:
    from torchdiffeq._impl.odeint import SOLVERS as TD_SOLVERS
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

    if method not in TD_SOLVERS:
        raise ValueError(
            f"Unknown torchdiffeq method {method!r}. With backend='torchdiffeq' choose one of {sorted(TD_SOLVERS)}."
        )
    cls = TD_SOLVERS[method]
    return isinstance(cls, type) and issubclass(cls, RKAdaptiveStepsizeODESolver) or method in ("scipy_solver",)


def make_options(
    solver: Union[str, ExplicitRK] = "dopri5",
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    steps: Optional[int] = None,
    step_size: Optional[float] = None,
    first_step: Optional[float] = None,
    min_step: Optional[float] = None,
    max_steps: Optional[int] = None,
    controller: Optional[PIController] = None,
    gradient: str = "direct",
    adjoint_rtol: Optional[float] = None,
    adjoint_atol: Optional[float] = None,
    adjoint_seminorm: bool = False,
    backend: str = "odenet",
    throw: bool = True,
) -> SolveOptions:
    """Validate solver settings once, so that blocks fail at construction rather than in training.

    **Arguments:**

    - `solver`, `rtol`, `atol`, `steps`, `step_size`, `first_step`, `min_step`, `max_steps`,
      `controller`, `gradient`, `adjoint_rtol`, `adjoint_atol`, `adjoint_seminorm`, `backend`,
      `throw`: as in `odenet.odeint`.

    **Returns:** a frozen `SolveOptions` with the defaults filled in.

    **Raises:** `ValueError`/`TypeError` naming the offending value and the fix.

    **Example:**

    ```python
    from odenet.odeint import make_options

    options = make_options("dopri5", rtol=1e-5, atol=1e-7)
    assert options.adaptive and options.solver_name == "dopri5"
    try:
        make_options("rk4", rtol=1e-3)  # tolerances need an adaptive solver
    except ValueError as err:
        print(err)
    ```
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKENDS}.")
    if gradient not in GRADIENTS:
        raise ValueError(f"Unknown gradient method {gradient!r}; choose one of {GRADIENTS}.")

    if backend == "odenet":
        solver = get_solver(solver)
        adaptive = solver.adaptive
        name = solver.name
    else:
        if isinstance(solver, ExplicitRK):
            raise TypeError("backend='torchdiffeq' takes a method name (a string), not an odenet solver object.")
        if not isinstance(solver, str):
            raise TypeError(f"solver must be a string with backend='torchdiffeq', got {type(solver).__name__}.")
        solver = _TORCHDIFFEQ_NAMES.get(solver, solver)
        adaptive = _torchdiffeq_is_adaptive(solver)
        name = solver
        if gradient == "checkpoint":
            raise ValueError("gradient='checkpoint' is odenet's own; use backend='odenet' or gradient='direct'/'adjoint'.")
        if controller is not None or min_step is not None:
            raise ValueError("controller= and min_step= need backend='odenet' (torchdiffeq has no equivalent).")

    rtol = _positive("rtol", rtol)
    atol = _positive("atol", atol)
    step_size = _positive("step_size", step_size)
    first_step = _positive("first_step", first_step)
    min_step = _positive("min_step", min_step)
    steps = _positive_int("steps", steps)
    max_steps = _positive_int("max_steps", max_steps)
    if controller is not None and not isinstance(controller, PIController):
        raise TypeError(f"controller must be an odenet.solvers.PIController, got {type(controller).__name__}.")

    if adaptive:
        given = [k for k, v in (("steps", steps), ("step_size", step_size)) if v is not None]
        if given:
            raise ValueError(
                f"{given[0]}= was given, but solver {name!r} is adaptive and chooses its own steps. Use a "
                f"fixed-step solver ({', '.join(n for n in SOLVERS if not SOLVERS[n]().adaptive)}) for a fixed "
                "number of steps, or set rtol/atol (and first_step/max_steps) instead."
            )
        rtol = DEFAULT_RTOL if rtol is None else rtol
        atol = DEFAULT_ATOL if atol is None else atol
        max_steps = DEFAULT_MAX_STEPS if max_steps is None else max_steps
        if min_step is not None and first_step is not None and first_step < min_step:
            raise ValueError(f"first_step={first_step} is below min_step={min_step}; lower min_step or raise first_step.")
    else:
        given = [
            k
            for k, v in (
                ("rtol", rtol), ("atol", atol), ("first_step", first_step), ("min_step", min_step),
                ("max_steps", max_steps), ("controller", controller),
            )
            if v is not None
        ]
        if given:
            raise ValueError(
                f"{given[0]}= was given, but solver {name!r} takes fixed steps, so error control settings have "
                "no effect. Give steps= or step_size= for a fixed-step solver, or choose an adaptive solver "
                "('bosh3', 'dopri5', 'tsit5') to use tolerances."
            )
        if steps is not None and step_size is not None:
            raise ValueError(f"Give steps= or step_size=, not both (got steps={steps}, step_size={step_size}).")

    if gradient != "adjoint" and (adjoint_rtol is not None or adjoint_atol is not None or adjoint_seminorm):
        raise ValueError(
            f"adjoint_rtol/adjoint_atol/adjoint_seminorm only apply with gradient='adjoint', got gradient={gradient!r}."
        )
    adjoint_rtol = _positive("adjoint_rtol", adjoint_rtol)
    adjoint_atol = _positive("adjoint_atol", adjoint_atol)
    if gradient == "adjoint" and not adaptive:
        if adjoint_rtol is not None or adjoint_atol is not None:
            raise ValueError(
                "adjoint_rtol/adjoint_atol need an adaptive solver; with a fixed-step solver the adjoint runs "
                "backward on the same grid."
            )
    if not isinstance(adjoint_seminorm, bool):
        raise TypeError(f"adjoint_seminorm must be True or False, got {adjoint_seminorm!r}.")
    if not isinstance(throw, bool):
        raise TypeError(f"throw must be True or False, got {throw!r}.")
    return SolveOptions(
        solver=solver, adaptive=adaptive, rtol=rtol, atol=atol, steps=steps, step_size=step_size,
        first_step=first_step, min_step=min_step, max_steps=max_steps, controller=controller, gradient=gradient,
        adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, adjoint_seminorm=adjoint_seminorm, backend=backend,
        throw=throw,
    )


def _check_inputs(f, y0, t) -> Tuple[Tensor, List[float]]:
    if not callable(f):
        raise TypeError(f"f must be callable as f(t, y), got {type(f).__name__}.")
    if not isinstance(y0, Tensor):
        raise TypeError(f"y0 must be a torch.Tensor, got {type(y0).__name__}.")
    if not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor, got dtype {y0.dtype}; use y0.float() or y0.double().")
    if isinstance(t, Tensor):
        if t.dim() != 1:
            raise ValueError(f"t must be one-dimensional, got shape {tuple(t.shape)}.")
        if not t.is_floating_point():
            t = t.to(y0.dtype)
        t_tensor = t
    else:
        try:
            t_tensor = torch.as_tensor(list(t), dtype=y0.dtype)
        except (TypeError, ValueError):
            raise TypeError(f"t must be a 1-D tensor or a sequence of numbers, got {t!r}.") from None
        if t_tensor.dim() != 1:
            raise ValueError(f"t must be a flat sequence of times, got shape {tuple(t_tensor.shape)}.")
    ts = t_tensor.detach().tolist()  # Python floats (exact for every floating dtype); one host read
    if len(ts) < 2:
        raise ValueError(f"t needs at least two times (start and end), got {ts}.")
    if not all(math.isfinite(x) for x in ts):
        raise ValueError(f"t must be finite, got {ts}.")
    d = [b - a for a, b in zip(ts, ts[1:])]
    if not (all(x > 0 for x in d) or all(x < 0 for x in d)):
        i = next(i for i, x in enumerate(d) if x == 0 or (x > 0) != (d[0] > 0))
        raise ValueError(
            f"t must be strictly increasing or strictly decreasing, but t[{i}]={ts[i]} and t[{i + 1}]={ts[i + 1]}. "
            "Sort the times and remove duplicates."
        )
    return t_tensor, ts


def _fixed_grid(ts: List[float], steps: Optional[int], step_size: Optional[float]) -> Tuple[float, ...]:
    """`steps` uniform steps over `[ts[0], ts[-1]]`, or the fewest not longer than `step_size`,
    or `ts` itself."""
    if steps is None and step_size is None:
        return tuple(ts)
    t0, t1 = ts[0], ts[-1]
    if steps is None:
        steps = max(1, math.ceil(abs(t1 - t0) / step_size - 1e-9))
    return (*(t0 + (t1 - t0) * i / steps for i in range(steps)), t1)


def _module_params(f, adjoint_params) -> Tuple[Tensor, ...]:
    if adjoint_params is not None:
        params = tuple(adjoint_params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"adjoint_params must be tensors, got {type(p).__name__}.")
        return tuple(p for p in params if p.requires_grad)
    if isinstance(f, nn.Module):
        return tuple(p for p in f.parameters() if p.requires_grad)
    return ()


def _finish(
    opts: SolveOptions, t_tensor: Tensor, ys: Tensor, stats: SolveStats, status: Status, message: str, steps=()
) -> Solution:
    sol = Solution(ts=t_tensor, ys=ys, stats=stats, status=status, message=message, steps=list(steps))
    if status is not Status.SUCCESS and opts.throw:
        raise SolverError(message, status, stats, sol)
    return sol


def _solve_odenet(f, y0: Tensor, t_tensor: Tensor, ts: List[float], opts: SolveOptions, adjoint_params) -> Solution:
    stats = SolveStats()
    fc = CountedFunc(f, stats, autocast_dtype(y0.device.type))
    solver = opts.solver
    loop_kw = dict(
        stats=stats,
        grid=None if opts.adaptive else _fixed_grid(ts, opts.steps, opts.step_size),
        rtol=opts.rtol,
        atol=opts.atol,
        controller=opts.controller,
        first_step=opts.first_step,
        min_step=opts.min_step,
        max_steps=opts.max_steps or DEFAULT_MAX_STEPS,
    )
    params = _module_params(f, adjoint_params) if opts.gradient != "direct" else ()
    adjoint = dict(
        rtol=opts.adjoint_rtol or opts.rtol,
        atol=opts.adjoint_atol or opts.atol,
        seminorm=opts.adjoint_seminorm,
    )

    def solve(start: Tensor):
        return run_solve(fc, start, ts, solver, opts.gradient, loop_kw, params, adjoint, adjoint_params is None)

    try:
        if t_tensor.requires_grad and torch.is_grad_enabled():
            ys, res = attach_time_gradients(solve, fc, y0, t_tensor, ts)
        else:
            ys, res = solve(y0)
    finally:
        fc.backward = True  # any later call of f is part of the backward pass
    message = res.status.message(res.t, res.h, opts.max_steps or 0, opts.min_step, fixed=not opts.adaptive)
    return _finish(opts, t_tensor, ys, stats, res.status, message, res.steps)


def _solve_torchdiffeq(f, y0: Tensor, t_tensor: Tensor, ts: List[float], opts: SolveOptions, adjoint_params) -> Solution:
    import torchdiffeq

    stats = SolveStats(n_accepted=None, n_rejected=None)
    fc = CountedFunc(f, stats, autocast_dtype(y0.device.type))
    t_in = t_tensor.to(device=y0.device, dtype=y0.dtype)
    options = {}
    if opts.adaptive:
        if opts.first_step is not None:
            options["first_step"] = opts.first_step
        options["max_num_steps"] = opts.max_steps
    elif opts.steps is not None or opts.step_size is not None:
        grid = _fixed_grid(ts, opts.steps, opts.step_size)
        options["grid_constructor"] = lambda func, y, t: torch.tensor(grid, dtype=t.dtype, device=t.device)
    kw = dict(method=opts.solver, options=options)
    if opts.adaptive:
        kw.update(rtol=opts.rtol, atol=opts.atol)
    try:
        if opts.gradient == "adjoint":
            adj = dict(adjoint_params=_module_params(f, adjoint_params))
            if opts.adaptive:
                adj.update(adjoint_rtol=opts.adjoint_rtol or opts.rtol, adjoint_atol=opts.adjoint_atol or opts.atol)
            if opts.adjoint_seminorm:
                adj["adjoint_options"] = dict(norm="seminorm")
            ys = torchdiffeq.odeint_adjoint(fc, y0, t_in, **kw, **adj)
        else:
            ys = torchdiffeq.odeint(fc, y0, t_in, **kw)
        status, message = Status.SUCCESS, Status.SUCCESS.message()
    except AssertionError as err:
        text = str(err)
        if "max_num_steps" in text:
            status = Status.MAX_STEPS
        elif "underflow" in text:
            status = Status.STEP_UNDERFLOW
        else:
            raise
        message = f"torchdiffeq: {text}. " + status.message(float("nan"), float("nan"), opts.max_steps or 0)
        ys = torch.full((len(ts), *y0.shape), float("nan"), dtype=y0.dtype, device=y0.device)
    finally:
        fc.backward = True
    return _finish(opts, t_tensor, ys, stats, status, message)


def solve_with_options(f, y0, t, opts: SolveOptions, adjoint_params=None) -> Solution:
    """Run a solve with already validated :class:`SolveOptions` (what blocks call)."""
    t_tensor, ts = _check_inputs(f, y0, t)
    if opts.backend == "torchdiffeq":
        return _solve_torchdiffeq(f, y0, t_tensor, ts, opts, adjoint_params)
    return _solve_odenet(f, y0, t_tensor, ts, opts, adjoint_params)


def odeint(
    f: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t: Union[Tensor, Sequence[float]],
    *,
    solver: Union[str, ExplicitRK] = "dopri5",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    steps: Optional[int] = None,
    step_size: Optional[float] = None,
    first_step: Optional[float] = None,
    min_step: Optional[float] = None,
    max_steps: Optional[int] = None,
    controller: Optional[PIController] = None,
    gradient: str = "direct",
    adjoint_rtol: Optional[float] = None,
    adjoint_atol: Optional[float] = None,
    adjoint_seminorm: bool = False,
    adjoint_params: Optional[Sequence[Tensor]] = None,
    backend: str = "odenet",
    throw: bool = True,
) -> Solution:
    """Solve `dy/dt = f(t, y)` from `y(t[0]) = y0` and return the states at every time in `t`.

    **Arguments:**

    - `f`: any callable `f(t, y) -> dy/dt` (typically an `nn.Module`); `t` arrives as a 0-dim
      tensor of `y`'s dtype and device, and the output must have `y`'s shape and dtype.
    - `y0`: initial state, a floating-point tensor of any shape (float32 or float64, CPU or CUDA).
    - `t`: output times, strictly increasing or strictly decreasing, at least two; a 1-D tensor
      or a sequence of numbers. Gradients flow to `t` if it is a tensor that requires grad.
    - `solver`: a name from `odenet.SOLVERS` (`euler`, `midpoint`, `heun`, `rk4` take fixed steps;
      `bosh3`, `dopri5`, `tsit5` are adaptive) or a solver object such as `odenet.solvers.Dopri5()`.
    - `rtol`, `atol`: relative and absolute tolerance of adaptive solvers (default `1e-7`, `1e-9`,
      as in torchdiffeq). An error for fixed-step solvers.
    - `steps` / `step_size`: for fixed-step solvers, the number of uniform steps over
      `[t[0], t[-1]]`, or the largest step (the grid is the uniform one with the fewest steps not
      exceeding it). With neither, one step per interval of `t`. An error for adaptive solvers.
    - `first_step`: initial step size (default: chosen from `f` at `y0`, one extra evaluation).
    - `min_step`: smallest step size allowed: the solve fails with step size underflow when a
      rejected step, or an accepted step after which the controller shrinks the step, leaves
      the next step below it. An automatically chosen first step may start below `min_step`
      and grow (give `first_step` to start at or above it).
    - `max_steps`: most steps (accepted plus rejected) before failing (default 10,000). With
      `backend="torchdiffeq"` it is torchdiffeq's `max_num_steps`, which counts per output
      interval, so a solve with many output times can take many more steps in all.
    - `controller`: an `odenet.solvers.PIController` (default PI controller).
    - `gradient`: `"direct"` (backprop through the solver), `"adjoint"` (continuous adjoint,
      O(1) activation memory) or `"checkpoint"` (recompute each step in backward; same gradient
      as direct). `adjoint` and `checkpoint` give first-order gradients only: differentiating
      one again (`create_graph=True`) raises; use `direct` for higher orders (of `y0` and
      `f`'s parameters; time gradients are first order under every method).
    - `adjoint_rtol`, `adjoint_atol`: tolerances of the adjoint's backward solve (default: the
      forward ones). `adjoint_seminorm=True` leaves the parameter-gradient part of the adjoint out
      of error control, which usually saves backward evaluations.
    - `adjoint_params`: tensors to differentiate with `adjoint`/`checkpoint` (default: the
      parameters of `f` when it is an `nn.Module`). With the default, `backward()` raises if `f`
      uses another tensor that requires grad, which those two methods could not give a
      gradient (a context stored on `f`, a tensor it closes over), as far as one evaluation of
      `f` at the last output time shows; given explicitly, other tensors get no gradient,
      unchecked, as always with `backend="torchdiffeq"`.
    - `backend`: `"odenet"` or `"torchdiffeq"` (runs the same call through torchdiffeq, which also
      accepts its other method names).
    - `throw`: raise `odenet.SolverError` on solver failure (default); with `False` return the
      `Solution` with its `status` and `message`.

    **Returns:** an `odenet.Solution` with `ys` of shape `[len(t), *y0.shape]`, `ts`, `stats`
    (`odenet.SolveStats`) and `status`.

    **Raises:** `ValueError`/`TypeError` for bad input (naming the value received and the fix);
    `odenet.SolverError` when the solver fails and `throw=True`.

    **Example:**

    ```python
    import torch, odenet
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    sol = odenet.odeint(lambda t, y: y @ A.T, torch.tensor([2.0, 0.0], dtype=torch.float64),
                        torch.linspace(0, 5, 50), solver="dopri5", rtol=1e-8, atol=1e-10)
    sol.ys.shape, sol.stats.nfe_forward
    ```
    """
    args = (solver, rtol, atol, steps, step_size, first_step, min_step, max_steps, controller, gradient,
            adjoint_rtol, adjoint_atol, adjoint_seminorm, backend, throw)
    try:
        opts = _cached_options(*args)
    except TypeError as err:  # an unhashable argument: validate without the cache (and raise its error)
        if "unhashable" not in str(err):
            raise
        opts = _options_from_args(*args)
    return solve_with_options(f, y0, t, opts, adjoint_params)


def _options_from_args(solver, rtol, atol, steps, step_size, first_step, min_step, max_steps, controller, gradient,
                       adjoint_rtol, adjoint_atol, adjoint_seminorm, backend, throw) -> SolveOptions:
    return make_options(
        solver, rtol=rtol, atol=atol, steps=steps, step_size=step_size, first_step=first_step, min_step=min_step,
        max_steps=max_steps, controller=controller, gradient=gradient, adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol, adjoint_seminorm=adjoint_seminorm, backend=backend, throw=throw,
    )


# `odeint` is called in training loops with the same settings every time: validate each
# combination once. `typed=True` keeps 1, 1.0 and True apart, so a bool where a number belongs
# still fails validation; solvers and controllers are immutable and compare by value.
_cached_options = functools.lru_cache(maxsize=256, typed=True)(_options_from_args)
