"""torchdiffeq's `odeint` and `odeint_adjoint`, with their signatures and results, on odenet's engine.

`from odenet.compat import odeint` in place of `from torchdiffeq import odeint`: the same call
returns the same tensor (a tuple for a tuple state), solved by odenet's loop, which counts what
it did (:func:`last_solution`) and fails with a message saying what to try.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .events import solve_event
from .gradients import Adjoint, Direct
from .odeint import solve_with_options
from .options import SolveOptions
from .solution import Solution
from .solvers.control import Adaptive, Fixed
from .solvers.controller import PIController
from .solvers.rk import ExplicitRK, get_solver
from .solvers.status import SolverError, Status
from .solvers.tableau import HEUN, MIDPOINT, ButcherTableau
from .tree import TreeSpec, split_tolerances

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "last_solution", "METHODS"]

#: torchdiffeq's `rk4`: Kutta's 3/8 rule (odenet's `solver="rk4"` is the classical method).
RK4_38 = ButcherTableau(
    name="rk4_38",
    c=(0, 1 / 3, 2 / 3, 1),
    a=((), (1 / 3,), (-1 / 3, 1), (1, -1, 1)),
    b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
    order=4,
    reference="W. Kutta, Beitrag zur näherungsweisen Integration totaler Differentialgleichungen, "
    "Z. Math. Phys. 46, 1901 (the 3/8 rule)",
)


def _linear(tableau: ButcherTableau) -> ExplicitRK:
    """A fixed-step method that interpolates linearly between steps, as torchdiffeq's do."""
    return ExplicitRK(dataclasses.replace(tableau, dense=None))


#: The `method=` names run on odenet's engine, each the method torchdiffeq means by it (fixed
#: steps interpolate linearly); `tsit5` is odenet's own, and `dopri8` is odenet's DOP853.
METHODS = {
    "euler": get_solver("euler"),
    "midpoint": _linear(MIDPOINT),
    "heun2": _linear(HEUN),
    "rk4": ExplicitRK(RK4_38),
    "bosh3": get_solver("bosh3"),
    "dopri5": get_solver("dopri5"),
    "dopri8": get_solver("dopri8"),
    "tsit5": get_solver("tsit5"),
}

_ADAPTIVE_OPTIONS = ("first_step", "max_num_steps", "norm", "safety", "ifactor", "dfactor", "dtype")
_FIXED_OPTIONS = ("step_size", "grid_constructor", "norm", "perturb")
# torchdiffeq's options that odenet's engine cannot honour: the value that leaves each off, and why.
_UNSUPPORTED = {
    "min_step": (0, "torchdiffeq accepts any step at min_step whatever its error; odenet never does"),
    "max_step": (math.inf, "odenet's controller has no largest step"),
    "step_t": (None, "odenet's loop has no prescribed step ends"),
    "jump_t": (None, "odenet's loop has no prescribed discontinuities"),
    "interp": ("linear", "odenet's fixed-step methods here interpolate linearly, torchdiffeq's default"),
}

_LAST = threading.local()


def last_solution() -> Optional[Solution]:
    """The `odenet.Solution` of the last `odeint`/`odeint_adjoint` call in this thread on odenet's
    engine (`None` before one, and after a call with `backend="torchdiffeq"`): its `stats`
    (backward counts arrive with `loss.backward()`), `status`, `steps` and `ys` (the returned outputs)."""
    return getattr(_LAST, "solution", None)


@dataclass(frozen=True, repr=False)
class _Grid(Fixed):
    """Fixed steps on given points: torchdiffeq's `step_size` grid, or its `grid_constructor`'s."""

    points: Tuple[float, ...] = ()

    def grid(self, ts) -> Tuple[float, ...]:
        """The points, whatever the output times."""
        return self.points


def _method(method: Optional[str]) -> ExplicitRK:
    name = "dopri5" if method is None else method
    if name not in METHODS:
        raise ValueError(
            f"Invalid method {name!r} for odenet's engine, which runs {sorted(METHODS)}. For torchdiffeq's other "
            "methods pass backend='torchdiffeq', which hands this call to torchdiffeq."
        )
    return METHODS[name]


def _check_options(options: dict, solver: ExplicitRK, method: str) -> None:
    if options.get("perturb") and solver.adaptive:
        raise ValueError(
            f"options={{'perturb': True}} applies to the fixed-grid methods (euler, midpoint, heun2, rk4), not "
            f"{method!r}; leave it out, or pass backend='torchdiffeq'."
        )
    for key, value in options.items():
        off, why = _UNSUPPORTED.get(key, (None, None))
        if why is not None and not (value is off or value == off):
            raise ValueError(
                f"options={{{key!r}: {value!r}}} cannot be honoured by odenet's engine: {why}. Leave it out, or pass "
                "backend='torchdiffeq' to run this call with torchdiffeq."
            )
    known = set(_ADAPTIVE_OPTIONS if solver.adaptive else _FIXED_OPTIONS) | set(_UNSUPPORTED)
    unknown = {k: v for k, v in options.items() if k not in known}
    if unknown:  # torchdiffeq warns about these, and ignores them
        warnings.warn(f"method {method!r}: unexpected options {unknown}, ignored (as torchdiffeq does).")
    if options.get("dtype", torch.float64) != torch.float64:
        raise ValueError(f"options={{'dtype': {options['dtype']}}}: odenet keeps times as Python floats (float64).")


def _adaptive(options: dict, rtol, atol, y0, n_times: int):
    """The `Adaptive` control (torchdiffeq's integral controller) and per-leaf tolerances."""
    if isinstance(y0, Tensor):
        rtol, atol, tol = _scalar("rtol", rtol), _scalar("atol", atol), None
    else:
        rtol, atol, tol = split_tolerances(y0, rtol, atol)
        rtol, atol = _scalar("rtol", rtol), _scalar("atol", atol)
    gains = {k: float(options[k]) for k in ("safety", "ifactor", "dfactor") if k in options}
    limit = options.get("max_num_steps")  # torchdiffeq's bounds each output interval
    first = options.get("first_step")
    control = Adaptive(
        rtol, atol, first_step=None if first is None else float(first),
        max_steps=2**31 - 1 if limit is None else int(limit) * max(n_times - 1, 1),
        controller=PIController(pcoeff=0.0, icoeff=1.0, **gains), norm=options.get("norm", "rms"),
    )
    return control, tol


def _scalar(name: str, tol) -> float:
    if isinstance(tol, Tensor):
        if tol.numel() != 1:
            raise ValueError(
                f"{name} is a tensor of {tol.numel()} elements; odenet's engine takes one number (or one per leaf "
                "of a tuple state). Pass backend='torchdiffeq' for per-element tolerances."
            )
        return tol.item()
    return tol


def _fixed(options: dict, func, y0, t) -> Fixed:
    step_size, constructor = options.get("step_size"), options.get("grid_constructor")
    if step_size is not None and constructor is not None:
        raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
    flat = y0 if isinstance(y0, Tensor) else TreeSpec.of(y0).flatten(y0)
    t = t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=flat.dtype)
    if step_size is not None:
        grid = _step_grid(t, float(step_size))
    elif constructor is not None:
        grid = torch.as_tensor(constructor(func, flat, t))
    else:
        return Fixed()
    return _Grid(points=tuple(grid.tolist()))


def _step_grid(t: Tensor, step_size: float) -> Tensor:
    """Steps of `step_size` from `t[0]`, the last one cut at `t[-1]` (torchdiffeq's grid)."""
    sign = 1.0 if len(t) < 2 or t[-1] > t[0] else -1.0
    n = int(math.ceil(float((t[-1] - t[0]) * sign / step_size + 1)))
    grid = torch.arange(n, dtype=t.dtype, device=t.device) * (sign * step_size) + t[0]
    grid[-1] = t[-1]
    return grid


def _options(func, y0, t, rtol, atol, method, options, gradient):
    """odenet's `SolveOptions` for a torchdiffeq call, and per-leaf tolerances (or `None`)."""
    solver, options = _method(method), dict(options or {})
    _check_options(options, solver, "dopri5" if method is None else method)
    tol = None
    if solver.adaptive:
        control, tol = _adaptive(options, rtol, atol, y0, len(t))
    else:
        control = _fixed(options, func, y0, t)
        gradient = dataclasses.replace(gradient, rtol=None, atol=None) if isinstance(gradient, Adjoint) else gradient
    return SolveOptions(solver, control, gradient), tol, options


class _Perturbed(nn.Module):
    """torchdiffeq's `perturb=True` on a fixed grid: a stage at its step's start sees its time one
    ulp into the step, a stage at the step's end one ulp back (the one-sided limits, for an `f`
    that jumps at grid points). The stages come in order, `len(c)` per step, so the call count
    says which stage this is."""

    def __init__(self, func, c: Tuple[float, ...], direction: float):
        super().__init__()
        self.func, self.c, self.direction, self.calls = func, c, direction, 0
        object.__setattr__(self, "__wrapped__", func)  # messages name, and check the signature of, the user's func

    def forward(self, t: Tensor, y):
        c = self.c[self.calls % len(self.c)]
        self.calls += 1
        if c == 0.0:
            t = torch.nextafter(t, t + self.direction)
        elif c == 1.0:
            t = torch.nextafter(t, t - self.direction)
        return self.func(t, y)


def _perturbed(func, opts: SolveOptions, options: dict, t):
    """`func`, wrapped for `perturb=True` (fixed-grid methods, backpropagated gradients only)."""
    if not options.get("perturb"):
        return func
    if not isinstance(opts.gradient, Direct):
        raise ValueError(
            "options={'perturb': True} with odeint_adjoint: odenet's backward solve does not replay the one-sided "
            "times; use odeint (backpropagation), or backend='torchdiffeq'."
        )
    direction = -1.0 if len(t) > 1 and float(t[-1]) < float(t[0]) else 1.0
    return _Perturbed(func, tuple(float(c) for c in opts.solver.tableau.c), direction)


def _solve(func, y0, t, rtol, atol, method, options, gradient, adjoint_params, event_fn=None):
    opts, tol, options = _options(func, y0, t, rtol, atol, method, options, gradient)
    func = _perturbed(func, opts, options, t)
    _LAST.solution = None
    if event_fn is not None:
        return _solve_event(func, y0, t, opts, tol, event_fn, adjoint_params)
    try:
        sol = solve_with_options(func, y0, t, opts, adjoint_params, tol=tol)
    except SolverError as err:
        _LAST.solution = err.solution
        limit = options.get("max_num_steps")
        if err.status is not Status.MAX_STEPS or limit is None:
            raise
        n = len(t) - 1
        note = f" (odenet.compat: options max_num_steps={limit} allows {limit} × {n} steps, for {n} output intervals.)"
        raise SolverError(str(err) + note, err.status, err.stats, err.solution) from None
    _LAST.solution = sol
    return sol.ys


def _solve_event(func, y0, t, opts: SolveOptions, tol, event_fn, adjoint_params):
    """torchdiffeq's `odeint(..., event_fn=...)`: from `t[0]` until `event_fn` changes sign (the
    direction of `t[:2]`); returns `(event_t, ys)` with `ys` the states at `t[0]` and the event
    (for a tuple state, a tuple of them)."""
    reverse = len(t) > 1 and bool(t[1] < t[0])
    event_t, sol = solve_event(func, y0, t[0], event_fn, opts, reverse_time=reverse, adjoint_params=adjoint_params,
                               tol=tol)
    _LAST.solution = sol
    return event_t, sol.ys


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=None, **kwargs):
    """torchdiffeq's `odeint_event`: solve from `t0` until `event_fn(t, y)` changes sign.

    **Arguments:** as `torchdiffeq.odeint_event`: `event_fn`, `reverse_time`, `odeint_interface`
    (this module's `odeint` (default) or `odeint_adjoint`), and that function's keywords.

    **Returns:** `(event_t, solution)`: the event time (differentiable, by the implicit function
    theorem) and the states at `t0` and at the event, `[2, *y0.shape]`.

    **Raises:** as `odeint`; `odenet.events.NoEventError` when the step limit comes first.

    **Example:**

    ```python
    from odenet.compat import odeint_event

    g = torch.tensor(9.81)
    t, ys = odeint_event(lambda t, y: torch.stack([y[1], -g]), torch.tensor([1.0, 0.0]), torch.tensor(0.0),
                         event_fn=lambda t, y: y[0])
    assert abs(t.item() - (2 / 9.81) ** 0.5) < 1e-6
    ```
    """
    t0 = torch.as_tensor(t0).reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return (odeint_interface or odeint)(func, y0, t, event_fn=event_fn, **kwargs)


def _check_backend(backend: str, event_fn) -> bool:
    """Whether to hand the call to torchdiffeq."""
    if backend not in ("odenet", "torchdiffeq"):
        raise ValueError(f"Unknown backend {backend!r}; choose 'odenet' or 'torchdiffeq'.")
    if backend == "torchdiffeq":
        _LAST.solution = None
    return backend == "torchdiffeq"


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None, backend="odenet"):
    """torchdiffeq's `odeint` on odenet's engine: solve `dy/dt = func(t, y)` from `y(t[0]) = y0`.

    The same call as `torchdiffeq.odeint` gives the same result, to the solver's tolerance
    (odenet's loop picks its own steps: its first step and its last, which ends on `t[-1]`
    where torchdiffeq steps past it and interpolates). Step counts: `last_solution().stats`.

    **Arguments:**

    - `func`: `func(t, y) -> dy/dt`, as for torchdiffeq (a tuple state: tuple in, tuple out).
    - `y0`: a floating-point tensor, or a tuple of them (one dtype and device).
    - `t`: the output times, increasing or decreasing; one time alone returns `y0`.
    - `rtol`, `atol`: tolerances (torchdiffeq's defaults `1e-7`, `1e-9`), numbers or, for a
      tuple state, one number per leaf; the error norm of a tuple state is the largest RMS norm
      over its leaves, as torchdiffeq's.
    - `method`: `"dopri5"` (default), `"bosh3"`, `"dopri8"`, `"tsit5"` (adaptive); `"euler"`,
      `"midpoint"`, `"heun2"`, `"rk4"` (fixed steps; `rk4` is torchdiffeq's 3/8 rule). `dopri8`
      here is DOP853, another 8th-order pair than torchdiffeq's `dopri8`.
    - `options`: adaptive methods: `first_step`, `max_num_steps` (torchdiffeq's bound per
      output interval bounds the whole solve at `max_num_steps × (len(t) − 1)` steps; default
      none), `norm`, `safety`, `ifactor`, `dfactor`. Fixed steps: `step_size`,
      `grid_constructor`, `perturb` (not with `odeint_adjoint`). An option odenet cannot honour
      (`min_step`, `max_step`, `step_t`, `jump_t`, `interp="cubic"`) raises; unknown ones warn,
      as in torchdiffeq.
    - `event_fn`: solve from `t[0]` until `event_fn(t, y)` changes sign (see `odeint_event`);
      returns `(event_t, solution)` as torchdiffeq does (tensor, tuple or dict states).
    - `backend`: `"odenet"`, or `"torchdiffeq"` to hand the call to torchdiffeq unchanged.

    **Returns:** a tensor `[len(t), *y0.shape]`, or a tuple of them for a tuple state.

    **Raises:** `ValueError` for a method or option odenet's engine does not have (naming it
    and `backend="torchdiffeq"`); `odenet.SolverError` where torchdiffeq raises an
    `AssertionError` (`max_num_steps` exceeded, step underflow), and for a non-finite state.

    **Example:**

    ```python
    from odenet.compat import odeint, last_solution

    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    ys = odeint(lambda t, y: y @ A, torch.tensor([[2.0, 0.0]]), torch.linspace(0, 5, 20), method="dopri5")
    assert ys.shape == (20, 1, 2) and last_solution().stats.nfe_forward > 0
    ```
    """
    if _check_backend(backend, event_fn):
        import torchdiffeq

        return torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn)
    return _solve(func, y0, t, rtol, atol, method, options, Direct(), None, event_fn)


def _adjoint_seminorm(method, options, adjoint_method, adjoint_options) -> bool:
    """Whether torchdiffeq's adjoint settings ask for the seminorm; raise for those odenet cannot honour."""
    if adjoint_method is not None and adjoint_method != (method or "dopri5"):
        raise ValueError(
            f"adjoint_method={adjoint_method!r} differs from method={method or 'dopri5'!r}: odenet's adjoint solves "
            "backward with the forward's method. Leave it out, or pass backend='torchdiffeq'."
        )
    adjoint = dict(adjoint_options or {})
    norm = adjoint.pop("norm", None)
    if norm is not None and norm != "seminorm":
        raise ValueError(
            "adjoint_options={'norm': ...}: odenet's adjoint measures its error by the largest RMS norm of its parts "
            "(or the seminorm, adjoint_options={'norm': 'seminorm'}), not a given function. Leave it out, or pass "
            "backend='torchdiffeq'."
        )
    forward = options or {}
    for key, value in adjoint.items():
        if key not in forward or not (forward[key] is value or (not isinstance(value, Tensor) and forward[key] == value)):
            raise ValueError(
                f"adjoint_options[{key!r}]={value!r} differs from options: odenet's adjoint solves backward with the "
                "forward's step settings (and adjoint_rtol/adjoint_atol). Leave it out, or pass backend='torchdiffeq'."
            )
    return norm == "seminorm"


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None, backend="odenet"):
    """torchdiffeq's `odeint_adjoint` on odenet's engine: `odeint` with gradients by the continuous
    adjoint, O(1) activation memory in the number of steps. The backward solve measures its error
    as odenet's adjoint does (the largest RMS norm of its state, adjoint and parameter parts, where
    torchdiffeq takes each parameter apart), so gradients agree to the backward tolerances.

    **Arguments:**

    - `func`, `y0`, `t`, `rtol`, `atol`, `method`, `options`, `event_fn`, `backend`: as for
      [`odenet.compat.odeint`][odenet.compat.odeint].
    - `adjoint_rtol`, `adjoint_atol`: the backward solve's tolerances (default: `rtol`, `atol`;
      numbers; unused by fixed-step methods, whose backward solve runs on the forward's grid).
    - `adjoint_method`: must be `method` (odenet's backward solve uses the forward's method).
    - `adjoint_options`: `{"norm": "seminorm"}` (Kidger et al., 2021), or the forward's options.
    - `adjoint_params`: the tensors to differentiate (default: `func.parameters()`).

    **Returns:** as `odeint`: a tensor `[len(t), *y0.shape]`, or a tuple of them.

    **Raises:** as `odeint`; `ValueError` when `func` is not an `nn.Module` and `adjoint_params`
    is not given (as torchdiffeq), and for adjoint settings odenet cannot honour; on
    `backward()`, `odenet.SolverError` when the backward solve fails, and a `RuntimeError` when
    `func` uses a tensor that requires grad outside `adjoint_params` (it would get no gradient).

    **Example:**

    ```python
    from odenet.compat import odeint_adjoint, last_solution

    func = odenet.MLPDynamics(dim=2, hidden=16)
    ys = odeint_adjoint(func, torch.randn(8, 2), torch.tensor([0.0, 1.0]), rtol=1e-5, atol=1e-7,
                        adjoint_options=dict(norm="seminorm"))
    ys[-1].pow(2).sum().backward()
    assert last_solution().stats.nfe_backward > 0
    ```
    """
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError(
            "func must be an nn.Module for odeint_adjoint to find the parameters to differentiate; or pass them as "
            "adjoint_params= (adjoint_params=() when there are none)."
        )
    if _check_backend(backend, event_fn):
        import torchdiffeq

        return torchdiffeq.odeint_adjoint(
            func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
            adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, adjoint_method=adjoint_method,
            adjoint_options=adjoint_options, adjoint_params=adjoint_params,
        )
    seminorm = _adjoint_seminorm(method, options, adjoint_method, adjoint_options)
    gradient = Adjoint(_scalar("adjoint_rtol", adjoint_rtol), _scalar("adjoint_atol", adjoint_atol), seminorm)
    return _solve(func, y0, t, rtol, atol, method, options, gradient, adjoint_params, event_fn)
