"""The integrate loop: steps, step-size control and output times.

`integrate` serves fixed-step and adaptive solvers, forward and backward in time,
with two loops that share the output handling. Both work on Python-float times,
so the fixed-step loop never synchronises with the device (it knows its whole
grid up front, so it also makes the time arguments of `f` in one go); the
adaptive loop synchronises once per step (to read the error ratio that decides
acceptance). Dense output is computed only for output times that fall strictly
inside a step.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import sys
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .control import Adaptive, Fixed
from .controller import PIController
from .field import FieldScope
from .rk import ExplicitRK, without_grad
from .stats import SolveStats
from .status import Status

__all__ = ["CountedFunc", "StepRecord", "StepInfo", "LoopResult", "integrate"]


# Immutable, so one instance of each serves every solve.
_DEFAULT_CONTROLLER = PIController()
_DEFAULT_ADAPTIVE = Adaptive(rtol=1e-7, atol=1e-9)
_DEFAULT_FIXED = Fixed()




def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cpu")  # torch >= 2.4
        return True
    except TypeError:  # older: no argument (CUDA), and is_autocast_cpu_enabled for the CPU
        return False


# Decided once, here: inside a torch.compile trace the wrong call would not raise a TypeError.
_AUTOCAST_TAKES_DEVICE = _autocast_takes_device()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The lower precision `torch.autocast` computes in for `device_type` here, or `None` if it
    is off (for torch 2.2 and later)."""
    if not _AUTOCAST_TAKES_DEVICE:  # torch < 2.4: one flag and dtype each for the CPU and CUDA
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return None  # meta, and devices autocast does not cover
    try:
        on = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # not an autocast device in this build
        return None
    return torch.get_autocast_dtype(device_type) if on else None


class CountedFunc:
    """Wraps the user's `f(t, y)` for one solve: turns the loop's float time into a 0-dim tensor
    of `y`'s dtype and device, counts every call into `stats` (forward, or backward once
    :attr:`backward` is set), runs each call in the solve's `FieldScope` (same random draws,
    running statistics updated once), and checks the first call (output type, shape and
    dtype; no write into `y`). With `autocast`, the dtype of the `torch.autocast` the solve
    started in, an output in that dtype is cast back to the state's dtype, as a residual
    update `y + h·f(t, y)` promotes to it. With a `context` (a dict, the keywords of
    `ODEBlock.forward`), every call is `f(t, y, **context)`."""

    __slots__ = ("f", "call", "stats", "backward", "autocast", "scope", "_checked")

    def __init__(self, f: Callable[[Tensor, Tensor], Tensor], stats: SolveStats,
                 autocast: Optional[torch.dtype] = None, context: Optional[dict] = None):
        self.f = f
        # Bound once, so that a call without context costs nothing more.
        self.call = functools.partial(f, **context) if context else f
        self.stats = stats
        self.backward = False
        self.autocast = autocast
        self.scope: Optional[FieldScope] = None
        self._checked = False

    def __call__(self, t, y: Tensor) -> Tensor:
        if not isinstance(t, Tensor):  # odenet's loop passes floats; torchdiffeq passes tensors
            t = torch.scalar_tensor(t, dtype=y.dtype, device=y.device)
        if not self._checked:
            return self._first_call(t, y)
        out = self.call(t, y) if self.scope is None else self._in_scope(t, y)
        if self.autocast is not None and isinstance(out, Tensor) and out.dtype == self.autocast != y.dtype:
            out = out.to(y.dtype)
        if self.backward:
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe_forward += 1
        return out

    def bare(self) -> Optional[Callable]:
        """The user's `f` (with its context) to call directly, once the first call was checked, when
        this wrapper has nothing else to do per call (no scope, no autocast); else `None`. The
        caller passes tensor times and counts its calls with `count`."""
        return self.call if self._checked and self.scope is None and self.autocast is None else None

    def count(self, n: int) -> None:
        """Count `n` calls made to `bare()`."""
        if self.backward:
            self.stats.nfe_backward += n
        else:
            self.stats.nfe_forward += n

    def backward_scope(self):
        """Around a backward pass that calls `f` again: leaves the caller's random-number state as it was."""
        return contextlib.nullcontext() if self.scope is None else self.scope.backward()

    def _in_scope(self, t: Tensor, y: Tensor):
        """One call of `f` in the solve's `FieldScope`."""
        with self.scope.evaluation():
            return self.call(t, y)

    def _first_call(self, t: Tensor, y: Tensor) -> Tensor:
        """The first evaluation: sets up the scope, then makes an ordinary call whose failure is
        explained where `f` is called the wrong way, and checks its output."""
        self.scope = FieldScope.of(self.f, y)
        version = None if y.is_inference() else y._version  # inference tensors have no counter
        self._checked = True  # so that the call below takes the ordinary path
        try:
            out = self(t, y)
        except (TypeError, RuntimeError) as err:
            better = _signature_error(self.f, t, y, self.call) or _dtype_error(self.f, y)
            if better is None:
                raise
            raise better from err
        self._check(out, y, version)
        return out

    def _check(self, out, y: Tensor, version: Optional[int]) -> None:
        name = _name(self.f)
        if version is not None and y._version != version:
            raise ValueError(
                f"f wrote into its input state in place ({name} changed y during f(t, y)): the solver reuses "
                "the state for later stages, so the solution would be wrong (and the caller's tensor changed). "
                "Make the layers that see the input out of place (e.g. nn.ReLU(inplace=False)), or start "
                "f.forward with x = x.clone()."
            )
        if not isinstance(out, Tensor):
            raise TypeError(f"f must return a Tensor (dy/dt), but {name} returned {type(out).__name__}.")
        if out.shape != y.shape:
            raise ValueError(
                f"f must return dy/dt with the state's shape {tuple(y.shape)}, but {name} returned shape "
                f"{tuple(out.shape)}. Check the output layer of f (it must map the state back to its own shape)."
            )
        if out.dtype != y.dtype:
            raise TypeError(
                f"f must return dy/dt with the state's dtype {y.dtype}, but {name} returned {out.dtype}. "
                "Cast f's parameters with f.to(dtype) or the state with y0.to(dtype). (When the solve "
                "itself starts inside torch.autocast, odenet casts f's output in the autocast dtype "
                "to the state's dtype.)"
            )


def _name(f) -> str:
    """How messages name `f` (through a wrapper's `__wrapped__`)."""
    f = getattr(f, "__wrapped__", f)
    return getattr(f, "__qualname__", None) or type(f).__name__


def _signature_error(f, t: Tensor, y: Tensor, call) -> Optional[TypeError]:
    """A `TypeError` saying that `f` must take `(t, x)`, when its signature cannot take the call."""
    inner = getattr(f, "__wrapped__", f)
    try:
        sig = inspect.signature(inner.forward if isinstance(inner, torch.nn.Module) else inner)
        sig.bind(t, y, **getattr(call, "keywords", {}))
        return None
    except TypeError:
        pass
    except ValueError:  # no signature to read (a builtin)
        return None
    return TypeError(
        f"f must take (t, x), the time (a 0-dim tensor, which f may ignore) and the state, but {_name(f)} has the "
        f"signature {sig}. Write forward(self, t, x), or wrap it: lambda t, x: f(x)."
    )


def _dtype_error(f, y: Tensor) -> Optional[TypeError]:
    """A `TypeError` naming the dtype of `f`'s parameters, when they differ from the state's."""
    if not isinstance(f, torch.nn.Module):
        return None
    tensors = itertools.chain(f.parameters(), f.buffers())
    p = next((p for p in tensors if p.is_floating_point() and p.dtype != y.dtype), None)
    if p is None:
        return None
    return TypeError(
        f"f's parameters are {p.dtype} but the state is {y.dtype}, and f failed on its first call. Cast one to the "
        f"other: f.to({y.dtype}), or y0.to({p.dtype})."
    )


class StepRecord(NamedTuple):
    """An accepted step, kept when the loop records (for checkpointed gradients)."""

    t: float
    h: float
    y: Tensor
    outputs: Tuple[Tuple[int, Optional[float]], ...]  # (output index, θ or None for the step's end)


class StepInfo(NamedTuple):
    """One attempted step: start time, signed step size, and whether it was accepted.

    **Fields:**

    - `t`: the time at the start of the step.
    - `h`: the step size, negative when integrating backwards.
    - `accepted`: whether the error control accepted the step.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], rtol=1e-5, atol=1e-7)
    rejected = [s for s in sol.steps if not s.accepted]
    first = sol.steps[0]  # StepInfo(t=0.0, h=..., accepted=True)
    ```
    """

    t: float
    h: float
    accepted: bool


class LoopResult(NamedTuple):
    """What `integrate` returns: outputs, status, where it stopped, step records and log."""

    ys: List[Tensor]
    status: Status
    t: float
    h: float
    records: Optional[List[StepRecord]]
    steps: List[StepInfo]
    max_steps: Optional[int] = None  # the step limit in force (adaptive solves)
    event_t: Optional[float] = None  # with an `event`: the time of the root that ended the solve (None: none found)

    def message(self, control: Union[Fixed, Adaptive]) -> str:
        """The status message, with the limits of `control` filled in."""
        if isinstance(control, Adaptive):
            return self.status.message(self.t, self.h, self.max_steps, control.min_step)
        return self.status.message(self.t, self.h, fixed=True)


def _compiling() -> bool:
    """True while torch.compile traces the solve (Dynamo folds this to a constant)."""
    check = getattr(torch.compiler, "is_compiling", None)
    if check is None:  # torch < 2.3
        check = getattr(sys.modules.get("torch._dynamo"), "is_compiling", None)
    return bool(check is not None and check())


def _capturing(y: Tensor) -> bool:
    """True where the state's values cannot be read on the host: while a CUDA graph is being
    captured, or inside `torch.func.vmap` (a batched tensor)."""
    return (y.is_cuda and torch.cuda.is_current_stream_capturing()) or is_vmapped(y)


def is_vmapped(y: Tensor) -> bool:
    """Whether `y` is batched by `torch.func.vmap`, at any level of torch.func's wrappers
    (`vmap(grad(...))` wraps a batched tensor in a gradient-tracking one)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(y):
        if functorch.is_batchedtensor(y):
            return True
        y = functorch.get_unwrapped(y)
    return False


def _initial_step(f, t0: float, y0: Tensor, k0: Tensor, direction: float, order: int, rtol, atol, norm,
                  span: float) -> Tuple[float, bool]:
    """Starting step size (Hairer, Nørsett & Wanner, Solving ODEs I, II.4); one evaluation of f.

    Returns `(h, finite)`: `finite` is False when `y0` or `f(t0, y0)` holds a NaN or inf (then
    `f` is not evaluated again and `h` is meaningless). The norms it reads anyway tell.
    """
    with torch.no_grad():
        scale = y0.abs().mul_(rtol).add_(atol)
        d0, d1 = torch.stack([norm(y0 / scale), norm(k0 / scale)]).tolist()  # one host read
        if not (math.isfinite(d0) and math.isfinite(d1)):
            # A NaN/inf in the state, or a norm that overflowed: the max-norm check settles it.
            if not (_is_finite(y0) and _is_finite(k0)):
                return span, False
        h0 = 0.01 * d0 / d1 if (d0 >= 1e-5 and d1 >= 1e-5) else 1e-6
        if not 0.0 < h0 < math.inf:  # d1 overflowed to inf (a huge f(t0, y0) over a tiny atol)
            h0 = 1e-6
        h0 = min(h0, span)
        y1 = torch.add(y0, k0, alpha=direction * h0)
        k1 = f(t0 + direction * h0, y1)
        d2 = float(norm((k1 - k0) / scale)) / h0
        if max(d1, d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    h = min(100 * h0, h1, span)
    return (h if math.isfinite(h) and h > 0 else span), True


def integrate(
    f: Callable[[float, Tensor], Tensor],
    y0: Tensor,
    ts: Sequence[float],
    solver: ExplicitRK,
    control: Union[Fixed, Adaptive, None] = None,
    *,
    stats: SolveStats,
    grid: Optional[Sequence[float]] = None,
    norm: Optional[Callable[[Tensor], Tensor]] = None,
    record: bool = False,
    event: Optional[Callable[..., Optional[float]]] = None,
) -> LoopResult:
    """Integrate `dy/dt = f(t, y)` from `ts[0]` and return the state at every time in `ts`.

    The engine under `odenet.odeint` (which validates inputs, counts evaluations and handles
    gradients). `ts` must be strictly monotone floats. A fixed-step solver steps along `grid`
    (default: `control.grid(ts)`, with `control` a `Fixed`); an adaptive one is controlled by
    `control`, an `Adaptive` (default: `rtol=1e-7, atol=1e-9`), measuring the scaled error
    with `norm` (default: `control.norm`). `record` keeps every accepted step's start state (for checkpointed
    gradients). Never raises on solver failure: the status says what happened, and outputs
    not reached are NaN. Returns a `LoopResult(ys, status, t, h, records, steps)`.

    With an `event` (see `odenet.events`), `ts` is `[t0, t_max]` (`t_max` may be infinite for
    an adaptive solver) and `event(solver, t, h, y, y1, ks)` is called after every accepted
    step from `(t, y)` to `(t + h, y1)` with stages `ks`: it returns `None`, or the `θ` in
    `[0, 1)` of the root it located in the step. The solve then ends there: the last output
    is the dense output at `t + θh`, and `LoopResult.event_t` that time. Reaching `t_max`
    first is a success with `event_t=None`. Without an event the loops do no extra work.

    With `Adaptive(per_sample=True)`, `odenet.solvers.per_sample.integrate_per_sample` runs the solve.
    """
    if getattr(control, "per_sample", False):
        from .per_sample import integrate_per_sample  # here: it builds on this module

        return integrate_per_sample(f, y0, ts, solver, control, stats=stats, norm=norm, record=record, event=event)
    limit, found = None, []
    emit = _emit if event is None else _event_emit(event, found)
    if solver.adaptive:
        control = control or _DEFAULT_ADAPTIVE
        span = ts[-1] - ts[0]  # infinite for an event search without t_max: the limit is then max_steps or its floor
        limit = control.step_limit(span if math.isfinite(span) else 0.0, solver.tableau.error_order)
        res = _adaptive_loop(f, y0, ts, solver, stats, control, limit, norm or control.error_norm(), record, emit)
    else:
        grid = tuple(grid if grid is not None else (control or _DEFAULT_FIXED).grid(ts))
        if len(grid) < 2 or grid[0] != ts[0] or grid[-1] != ts[-1]:
            raise ValueError(
                f"grid= must start at ts[0]={ts[0]} and end at ts[-1]={ts[-1]} (at least two points), got "
                f"{list(grid)}."
            )
        res = _fixed_loop(f, y0, ts, solver, stats, grid, record, emit)
    outputs, status, t, h, records, log = res
    stats.final_step = h
    if status is not Status.SUCCESS:
        nan = torch.full_like(y0, float("nan"))
        outputs = [o if o is not None else nan for o in outputs]
    return LoopResult(outputs, status, t, h, records, log, limit, found[0] if found else None)


def _event_emit(event, found: list):
    """The output step of an event search: called at every step end (`due`: `ts`, or a fixed
    loop's whole grid), it ends the solve at the root `event` locates (appending its time to
    `found`), or at `t_max`."""

    def emit(solver, outputs, due, nxt, direction, t, h, t_new, y, y1, ks):
        theta = event(solver, t, h, y, y1, ks)
        if theta is not None:  # the root, in this step: the last output
            found.append(t + theta * h)
            outputs[-1] = solver.interpolate(y, h, ks, theta)
            return len(due), ((len(outputs) - 1, theta),)
        if t_new == due[-1]:  # t_max, before any root
            outputs[-1] = y1
            return len(due), ((len(outputs) - 1, None),)
        return (nxt + 1 if t_new == due[nxt] else nxt), ()

    return emit


def _emit(solver: ExplicitRK, outputs: list, ts: Sequence[float], nxt: int, direction: float, t: float, h: float,
          t_new: float, y: Tensor, y1: Tensor, ks: List[Tensor]) -> Tuple[int, Tuple[Tuple[int, Optional[float]], ...]]:
    """Store every output time inside the accepted step `[t, t_new]`; return the next output
    index and what was produced, as `(output index, θ or None for the step's end)`."""
    produced = []
    n_out = len(ts)
    while nxt < n_out and direction * (ts[nxt] - t_new) <= 0.0:
        if ts[nxt] == t_new:
            outputs[nxt] = y1
            produced.append((nxt, None))
        else:
            theta = (ts[nxt] - t) / h
            outputs[nxt] = solver.interpolate(y, h, ks, theta)
            produced.append((nxt, theta))
        nxt += 1
    return nxt, tuple(produced)


def _is_finite(y: Tensor) -> bool:
    """One host read: the largest magnitude is finite (max propagates NaN). An empty state
    (a batch of size 0) is finite, and costs no read."""
    if y.numel() == 0:
        return True
    return math.isfinite(float(torch.linalg.vector_norm(y.detach(), ord=math.inf)))


class _GridPlan(NamedTuple):
    """What a fixed grid fixes before the first step: step sizes, each step's stage times, the step log."""

    hs: Tuple[float, ...]
    times: Tuple[Tuple[float, ...], ...]
    log: Tuple[StepInfo, ...]


@functools.lru_cache(maxsize=64)
def _plan(grid: Tuple[float, ...], c: Tuple[float, ...]) -> _GridPlan:
    """The plan of `grid` for nodes `c`: Python floats only (immutable, so it is cached per grid:
    training solves the same grid every step, and planning is a visible part of a small solve)."""
    hs = tuple(b - a for a, b in zip(grid, grid[1:]))
    times = tuple(tuple(t + ci * h for ci in c) for t, h in zip(grid, hs))
    return _GridPlan(hs, times, tuple(StepInfo(t, h, True) for t, h in zip(grid, hs)))


_CACHE_MAX_STAGES = 4096


@functools.lru_cache(maxsize=64)
def _cpu_times(grid: Tuple[float, ...], c: Tuple[float, ...], dtype: torch.dtype) -> Tuple[Tensor, tuple]:
    """`_plan(grid, c).times` as 0-dim CPU tensors of `dtype`, per step: views of one tensor (`base`)."""
    times = _plan(grid, c).times
    with torch.inference_mode(False):  # usable by solves with autograd, whatever mode made them
        base = torch.tensor([x for step in times for x in step], dtype=dtype, device="cpu")
    flat, s = base.unbind(0), len(c)
    return base, tuple(flat[i * s:(i + 1) * s] for i in range(len(times)))


def _stage_times(plan: _GridPlan, grid: Tuple[float, ...], c: Tuple[float, ...], y0: Tensor) -> tuple:
    """The time argument of every stage of `plan`: on the CPU, 0-dim tensors kept per grid (as the
    plan is), which saves making one per evaluation (about 2 µs each: 44 µs of a 20-step Euler
    solve, `benchmarks/loop_overhead.py --ablate`, 2-core AMD EPYC);
    elsewhere the plan's floats, which `CountedFunc` turns into tensors on the device (no copy
    from the host). Made again if `f` changed one in place or set its `requires_grad`, so that no
    solve sees another's change. Only grids of up to `_CACHE_MAX_STAGES` stage times: each is a
    tensor of its own (about 600 bytes), and a long grid amortises making them."""
    if y0.device.type != "cpu" or _compiling() or len(grid) * len(c) > _CACHE_MAX_STAGES:
        return plan.times
    base, steps = _cpu_times(grid, c, y0.dtype)
    if base._version or any(t.requires_grad for step in steps for t in step):
        _cpu_times.cache_clear()
        base, steps = _cpu_times(grid, c, y0.dtype)
    return steps


def _fixed_loop(f, y0: Tensor, ts: Sequence[float], solver: ExplicitRK, stats: SolveStats,
                grid: Tuple[float, ...], record: bool, emit=_emit):
    """Every step of a known grid, with nothing read back from the device until the end.

    With an event's `emit` (`_event_emit`), every step end is checked instead (the event's
    host read per step), and the loop stops at the step where it fires."""
    n_out = len(ts)
    outputs: List[Optional[Tensor]] = [None] * n_out
    outputs[0] = y0
    records: Optional[List[StepRecord]] = [] if record else None
    direction = 1.0 if ts[-1] > ts[0] else -1.0
    # Not the cache while torch.compile traces the solve (Dynamo traces past caches).
    plan = (_plan.__wrapped__ if _compiling() else _plan)(grid, solver.tableau.c)
    hs = list(plan.hs)
    # odenet's wrapper takes tensor times (a plain `f` gets the floats, as everywhere in the loop).
    times = _stage_times(plan, grid, solver.tableau.c, y0) if isinstance(f, CountedFunc) else plan.times
    # The times at which `emit` runs: the output times, or with an event every step end.
    due = ts if emit is _emit else grid
    n_due = len(due)
    y, k1, nxt = y0, None, 1
    # Euler, the residual update, is written out here (unless a subclass overrides `step`): it
    # skips `step`'s general stage loop, about 1.5 µs per step, more than the update itself when
    # f is cheap (`benchmarks/loop_overhead.py --ablate`).
    euler, w = solver._single and type(solver).step is ExplicitRK.step, solver.tableau.b[0]
    call, bare = f, 0
    try:
        for i, h in enumerate(hs):
            if euler:
                k = call(times[i][0], y)
                y1, ks = torch.add(y, k, alpha=h * w), [k]
            else:  # without an error estimate; an FSAL method hands its last stage on as the next k1
                res = solver.step(call, grid[i], y, h, k1, with_error=False, times=times[i])
                y1, ks = res.y1, res.ks
            if call is not f:
                bare += len(ks) - (k1 is not None)
            elif i == 0 and times is not plan.times:
                # Tensor times and a checked `f`: call it without its wrapper where the wrapper has
                # nothing else to do, counting here (about 0.5 µs per evaluation:
                # `benchmarks/loop_overhead.py --ablate`).
                direct = f.bare()
                call = f if direct is None else direct
            k1 = None if euler else res.k_next
            produced = ()
            if nxt < n_due and direction * (due[nxt] - grid[i + 1]) <= 0.0:
                nxt, produced = emit(solver, outputs, due, nxt, direction, grid[i], h, grid[i + 1], y, y1, ks)
                if nxt == n_due:  # nothing more is due (at the grid's end, or an event fired): this step is the last;
                    del hs[i + 1 :]  # shortening `hs` ends the loop, and the counts below see the steps taken
            if record:
                records.append(StepRecord(grid[i], h, y, produced))
            y = y1
    finally:
        if bare:
            f.count(bare)
    stats.n_accepted += len(hs)
    status = Status.SUCCESS
    # One read per solve (skipped while a CUDA graph is captured, where reads are not allowed).
    if not _capturing(y) and not _is_finite(y):
        status = Status.NONFINITE
    return outputs, status, grid[len(hs)], hs[-1], records, list(plan.log[: len(hs)])


def _adaptive_loop(f, y0: Tensor, ts: Sequence[float], solver: ExplicitRK, stats: SolveStats, control: Adaptive,
                   max_steps: int, norm: Callable[[Tensor], Tensor], record: bool, emit=_emit):
    """Steps chosen by the error estimate and the controller: one host read per attempted step.
    `emit` stores the outputs of each accepted step (an event's replaces it, see `integrate`)."""
    rtol, atol, min_step = control.rtol, control.atol, control.min_step
    controller = control.controller or _DEFAULT_CONTROLLER
    n_out = len(ts)
    outputs: List[Optional[Tensor]] = [None] * n_out
    outputs[0] = y0
    records: Optional[List[StepRecord]] = [] if record else None
    log: List[StepInfo] = []
    t_end = ts[-1]
    direction = 1.0 if t_end > ts[0] else -1.0
    tab = solver.tableau
    k_exp = controller.exponent_order(tab.error_order)
    per_unit = controller.error_per_unit_step
    status = Status.SUCCESS

    t = ts[0]
    y = y0
    nxt = 1
    h = 0.0
    k1 = f(t, y)
    if control.first_step is not None:
        h = direction * control.first_step
        finite = _is_finite(y) and _is_finite(k1)
    else:
        h0, finite = _initial_step(f, t, y, k1, direction, tab.order, rtol, atol, norm, abs(t_end - t))
        h = direction * h0
    if not finite:
        status = Status.NONFINITE
    prev_ratio = 1.0
    n_steps = 0

    while nxt < n_out and status is Status.SUCCESS:
        if n_steps >= max_steps:
            status = Status.MAX_STEPS
            break
        n_steps += 1
        if direction * (t + h - t_end) >= 0.0:
            h = t_end - t
            t_new = t_end
        else:
            t_new = t + h

        res = solver.step(f, t, y, h, k1)

        ratio = without_grad(_error_ratio, y, res, rtol, atol, norm)
        if per_unit:
            ratio /= abs(h)
        if not math.isfinite(ratio):
            accepted = False
            factor = controller.dfactor
        else:
            accepted = ratio <= 1.0
            factor = controller.factor(ratio, prev_ratio, accepted, k_exp)
        log.append(StepInfo(t, h, accepted))

        if accepted:
            nxt, produced = emit(solver, outputs, ts, nxt, direction, t, h, t_new, y, res.y1, res.ks)
            if record:
                records.append(StepRecord(t, h, y, produced))
            stats.n_accepted += 1
            t, y, k1 = t_new, res.y1, res.k_next
            prev_ratio = max(ratio, 1e-10)
        else:
            stats.n_rejected += 1

        h = h * factor
        # Fail rather than spin once the step shrinks below `min_step` or too small to move `t`:
        # after a rejection, or after an accepted step that shrank it (near a blow-up the
        # controller keeps accepting ever smaller steps). A step still growing from a small
        # first step (the initial-step heuristic can pick one far below `min_step`) goes on.
        if nxt < n_out and (not accepted or factor < 1.0) and (abs(h) < (min_step or 0.0) or t + h == t):
            status = Status.STEP_UNDERFLOW if math.isfinite(ratio) else Status.NONFINITE
    return outputs, status, t, h, records, log


def _error_ratio(y: Tensor, res, rtol: float, atol: float, norm) -> float:
    """The scaled error norm `‖err / (atol + rtol·max(|y0|, |y1|))‖` of a step: the one host read.

    Computed on the device in the state's dtype, exactly as before the loop was split, so that
    step-size decisions (and so published results) do not move by a rounding.
    """
    scale = torch.maximum(y.abs(), res.y1.abs()).mul_(rtol).add_(atol)
    if res.error_low is None:
        return float(norm(res.error.div_(scale)))
    # Two estimates (DOP853): blend the scaled norms, still one host read.
    a, b = torch.stack([norm(res.error.div_(scale)), norm(res.error_low.div_(scale))]).tolist()
    deno = a * a + 0.01 * b * b
    return a * a / math.sqrt(deno) if deno > 0.0 else 0.0
