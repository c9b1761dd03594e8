"""The functional entry point :func:`odeint`, and the torchdiffeq backend."""

from __future__ import annotations

import math
import re
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .gradients import Adjoint, Checkpoint, Direct, GradientMethod, attach_time_gradients, run_solve
from .options import SHORTHAND, SolveOptions, check_keywords, options_from
from .solution import Solution
from .solvers.control import Adaptive, Fixed
from .solvers.integrate import CountedFunc, autocast_dtype, is_vmapped
from .solvers.rk import ExplicitRK
from .solvers.stats import SolveStats
from .solvers.status import SolverError, Status
from .tree import LeafTolerances, TreeFunc, TreeSpec, split_tolerances, structured_norm, structured_options

__all__ = ["odeint", "solve_with_options"]

# torchdiffeq's keywords that `odeint` spells differently, with what to write instead.
_TORCHDIFFEQ_KEYWORDS = {
    "method": "solver=",
    "options": "control=odenet.Fixed(...)/odenet.Adaptive(...) or the flat step_size=, first_step=, max_steps=",
    "tol": "rtol= and atol=",
    "adjoint_method": "solver= (the adjoint's backward solve uses the forward's solver)",
    "adjoint_options": "gradient=odenet.Adjoint(rtol=..., atol=..., seminorm=...)",
}


def _check_inputs(f, y0, t) -> Tuple[Tensor, List[float]]:
    if not callable(f):
        raise TypeError(f"f must be callable as f(t, y), got {type(f).__name__}.")
    if not isinstance(y0, Tensor):
        raise TypeError(f"y0 must be a torch.Tensor, or a tuple, list or dict of them, got {type(y0).__name__}.")
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
    if not ts:
        raise ValueError("t needs at least one time (the start; one time alone returns y0), got none.")
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


def _inputs(f, adjoint_params, context: Optional[dict]) -> Tuple[Tensor, ...]:
    """What `Adjoint`/`Checkpoint` differentiate: `f`'s parameters (or `adjoint_params`) and the
    context tensors that require grad, each once."""
    params = _module_params(f, adjoint_params)
    for v in (context or {}).values():
        if isinstance(v, Tensor) and v.requires_grad and not any(v is p for p in params):
            params += (v,)
    return params


def _check_vmap(y0: Tensor, opts: SolveOptions) -> None:
    """Inside `torch.func.vmap` only fixed steps run: every batch element takes the same grid."""
    if is_vmapped(y0) and (opts.adaptive or opts.backend != "odenet"):
        raise ValueError(
            f"torch.func.vmap over odenet.odeint needs a fixed-step solver on odenet's backend (got "
            f"solver={opts.solver_name!r}, backend={opts.backend!r}): an adaptive solver reads its error on the "
            "host at every step, which vmap cannot do. Use a fixed-step solver (euler, midpoint, heun, rk4) with "
            "Fixed(steps=...), or solve the whole batch in one call without vmap (the batch shares its steps)."
        )


def _check_resolution(y0: Tensor, opts: SolveOptions, tol: Optional[LeafTolerances]) -> None:
    """A half-precision state cannot meet a relative tolerance below its resolution: say so before solving."""
    if y0.dtype not in (torch.float16, torch.bfloat16) or not opts.adaptive:
        return
    eps = torch.finfo(y0.dtype).eps
    rtols = [("rtol", opts.control.rtol), *(("rtol", r) for r in (tol.rtol if tol and tol.rtol else ()))]
    if isinstance(opts.gradient, Adjoint) and opts.gradient.rtol is not None:
        rtols.append(("adjoint_rtol", opts.gradient.rtol))
    for name, value in rtols:
        if value < eps:
            raise ValueError(
                f"{name}={value:g} is below the resolution of the {y0.dtype} state (its epsilon is {eps:g}): no step "
                f"can meet it, and the solve would end in ever smaller steps. Use {name} >= {eps:g}, or solve in "
                "float32 (y0.float(), f.float()); under torch.autocast f still computes in half precision."
            )


def _check_per_sample(opts: SolveOptions, structured: bool) -> None:
    """`Adaptive(per_sample=True)` needs one batch axis and a gradient method that can step each sample alone
    (the loop refuses the rest)."""
    if not (opts.adaptive and opts.control.per_sample):
        return
    why = None
    if opts.backend != "odenet":
        why = f"backend={opts.backend!r} has no per-sample error control; use backend='odenet'"
    elif isinstance(opts.gradient, Checkpoint):
        why = "gradient='checkpoint' replays steps of one shared size; use gradient='direct' or 'adjoint'"
    elif structured:
        why = "a tuple, list or dict state has no single batch axis; concatenate the leaves along dim 1"
    if why:
        raise ValueError(
            f"Adaptive(per_sample=True) treats y0's leading axis as a batch, but {why} (or per_sample=False)."
        )


def _finish(
    opts: SolveOptions, t_tensor: Tensor, ys, stats: SolveStats, status: Status, message: str, steps=()
) -> Solution:
    sol = Solution(ts=t_tensor, ys=ys, stats=stats, status=status, message=message, steps=list(steps))
    if status is not Status.SUCCESS and opts.throw:
        raise SolverError(message, status, stats, sol)
    return sol


def _solve_odenet(f, y0: Tensor, t_tensor: Tensor, ts: List[float], opts: SolveOptions, adjoint_params,
                  context: Optional[dict]) -> tuple:
    fc = CountedFunc(f, SolveStats(), autocast_dtype(y0.device.type), context)
    params = () if isinstance(opts.gradient, Direct) else _inputs(f, adjoint_params, context)

    def solve(start: Tensor):
        return run_solve(fc, start, ts, opts.solver, opts.control, opts.gradient, params, adjoint_params is None)

    try:
        if t_tensor.requires_grad and torch.is_grad_enabled():
            ys, res = attach_time_gradients(solve, fc, y0, t_tensor, ts)
        else:
            ys, res = solve(y0)
    finally:
        fc.backward = True  # any later call of f is part of the backward pass
    return ys, fc.stats, res.status, res.message(opts.control), res.steps


def _torchdiffeq_keywords(ts: List[float], opts: SolveOptions, f, adjoint_params, context: Optional[dict],
                          y0: Tensor, spec: Optional[TreeSpec], tol: Optional[LeafTolerances]) -> dict:
    """`odeint`'s or `odeint_adjoint`'s keywords in torchdiffeq for `opts` (and a state's structure)."""
    control, gradient = opts.control, opts.gradient
    kw = dict(method=opts.solver, options={})
    if isinstance(control, Adaptive):
        kw.update(rtol=control.rtol, atol=control.atol)
        if spec is not None:
            kw["options"]["norm"] = structured_norm(control.norm, spec)
            kw["rtol"], kw["atol"] = (tol or LeafTolerances()).vectors(spec, y0, control.rtol, control.atol)
        elif control.norm != "rms":
            kw["options"]["norm"] = control.error_norm()
        kw["options"]["max_num_steps"] = _torchdiffeq_step_limit(control, ts)
        if control.first_step is not None:
            kw["options"]["first_step"] = control.first_step
    elif control.steps is not None or control.step_size is not None:
        grid = control.grid(ts)
        kw["options"]["grid_constructor"] = lambda func, y, t: torch.tensor(grid, dtype=t.dtype, device=t.device)
    if isinstance(gradient, Adjoint):
        kw["adjoint_params"] = _inputs(f, adjoint_params, context)
        if isinstance(control, Adaptive):
            kw.update(adjoint_rtol=gradient.rtol or control.rtol, adjoint_atol=gradient.atol or control.atol)
        if gradient.seminorm:
            kw["adjoint_options"] = dict(norm="seminorm")
    return kw


def _torchdiffeq_step_limit(control: Adaptive, ts: List[float]) -> int:
    """torchdiffeq's `max_num_steps` (per output interval): the one given, or odenet's default limit
    for the whole span with the lowest error order among its adaptive methods (2: the largest)."""
    return control.step_limit(ts[-1] - ts[0], error_order=2)


def _torchdiffeq_status(text: str) -> Optional[Status]:
    """The status of torchdiffeq's failure `text`, or None. A non-finite error ratio makes
    torchdiffeq replace the step by `min_step` (0 here) and fail as "underflow in dt 0.0"."""
    if "max_num_steps" in text:
        return Status.MAX_STEPS
    dt = re.search(r"underflow in dt (\S+)", text)
    if "non-finite" in text or (dt and not _positive_number(dt.group(1))):
        return Status.NONFINITE
    return Status.STEP_UNDERFLOW if dt else None


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _solve_torchdiffeq(f, y0: Tensor, t_tensor: Tensor, ts: List[float], opts: SolveOptions, adjoint_params,
                      context: Optional[dict], spec: Optional[TreeSpec], tol: Optional[LeafTolerances]) -> tuple:
    import torchdiffeq

    stats = SolveStats(n_accepted=None, n_rejected=None)
    fc = CountedFunc(f, stats, autocast_dtype(y0.device.type), context)
    t_in = t_tensor.to(device=y0.device, dtype=y0.dtype)
    kw = _torchdiffeq_keywords(ts, opts, f, adjoint_params, context, y0, spec, tol)
    solve = torchdiffeq.odeint_adjoint if isinstance(opts.gradient, Adjoint) else torchdiffeq.odeint
    try:
        ys = solve(fc, y0, t_in, **kw)
        status, message = Status.SUCCESS, Status.SUCCESS.message()
        if not bool(torch.isfinite(ys[-1]).all()):  # a fixed-step solve does not check
            status, message = Status.NONFINITE, Status.NONFINITE.message(fixed=not opts.adaptive)
    except AssertionError as err:
        text = str(err)
        status = _torchdiffeq_status(text)
        if status is None:
            raise
        max_steps = _torchdiffeq_step_limit(opts.control, ts) if opts.adaptive else 0
        message = f"torchdiffeq: {text}. " + status.message(max_steps=max_steps)
        ys = torch.full((len(ts), *y0.shape), float("nan"), dtype=y0.dtype, device=y0.device)
    finally:
        fc.backward = True
    return ys, stats, status, message, ()


def solve_with_options(f, y0, t, opts: SolveOptions, adjoint_params=None, context: Optional[dict] = None,
                       tol: Optional[LeafTolerances] = None) -> Solution:
    """Run a solve with already built :class:`SolveOptions` (what blocks call). With `context`, a
    dict, `f` is called as `f(t, y, **context)`; with `Adjoint`/`Checkpoint`, its tensors that
    require grad are differentiated along with `f`'s parameters. `y0` may be a tuple, list or
    dict of tensors (`tol`: its per-leaf tolerances, `odenet.tree.LeafTolerances`)."""
    spec = None
    if isinstance(y0, (tuple, list, dict)):
        spec = TreeSpec.of(y0)
        f = TreeFunc(f, spec) if callable(f) else f
        y0 = spec.flatten(y0)
    t_tensor, ts = _check_inputs(f, y0, t)
    _check_resolution(y0, opts, tol)
    _check_vmap(y0, opts)
    _check_per_sample(opts, spec is not None)
    if len(ts) == 1:  # the output is y0 itself, as in torchdiffeq
        ys, stats, status, message, steps = torch.stack([y0]), SolveStats(), Status.SUCCESS, Status.SUCCESS.message(), ()
    elif opts.backend == "torchdiffeq":
        ys, stats, status, message, steps = _solve_torchdiffeq(f, y0, t_tensor, ts, opts, adjoint_params, context,
                                                               spec, tol)
    else:
        if opts.adaptive and spec is not None:
            opts = structured_options(opts, spec, y0, tol)
        ys, stats, status, message, steps = _solve_odenet(f, y0, t_tensor, ts, opts, adjoint_params, context)
    if spec is not None:
        ys = spec.unflatten(ys, (len(ts),))
    return _finish(opts, t_tensor, ys, stats, status, message, steps)


def odeint(
    f: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t: Union[Tensor, Sequence[float]],
    *,
    solver: Union[str, ExplicitRK] = "dopri5",
    control: Union[Fixed, Adaptive, None] = None,
    gradient: Union[str, GradientMethod] = "direct",
    adjoint_params: Optional[Sequence[Tensor]] = None,
    backend: str = "odenet",
    throw: bool = True,
    **shorthand,
) -> Solution:
    """Solve `dy/dt = f(t, y)` from `y(t[0]) = y0` and return the states at every time in `t`.

    **Arguments:**

    - `f`: any callable `f(t, y) -> dy/dt` (typically an `nn.Module`); `t` arrives as a 0-dim
      tensor of `y`'s dtype and device, and the output must have `y`'s shape and dtype.
    - `y0`: initial state, a floating-point tensor of any shape (CPU or CUDA), or a tuple, list
      or dict of them (one dtype and device; `f` then takes and returns that structure, and an
      adaptive step's error is the largest RMS norm over the leaves, as in torchdiffeq).
    - `t`: output times, strictly increasing or strictly decreasing; a 1-D tensor or a sequence
      of numbers. One time alone returns `y0` (no evaluation). Gradients flow to `t` if it is a
      tensor that requires grad.
    - `solver`: a name from `odenet.SOLVERS` (`euler`, `midpoint`, `heun`, `rk4` take fixed steps;
      `bosh3`, `dopri5`, `tsit5`, `dopri8` are adaptive) or a solver object such as `odenet.solvers.Dopri5()`.
    - `control`: `odenet.Fixed(steps=..., step_size=...)` for a fixed-step solver (default: one
      step per interval of `t`), `odenet.Adaptive(rtol, atol, ...)` for an adaptive one
      (default: `rtol=1e-7, atol=1e-9`, as in torchdiffeq).
    - `gradient`: `odenet.Direct()` (backprop through the solver), `odenet.Adjoint(...)`
      (continuous adjoint, O(1) activation memory) or `odenet.Checkpoint()` (recompute each
      step in backward; the same gradient as direct), or their names `"direct"`, `"adjoint"`,
      `"checkpoint"`. `Adjoint` and `Checkpoint` give first-order gradients only; use
      `Direct` for higher orders.
    - `adjoint_params`: tensors to differentiate with `Adjoint`/`Checkpoint` (default: the
      parameters of `f` when it is an `nn.Module`). With the default, `backward()` raises if
      `f` uses another tensor that requires grad, which those two methods could not give a
      gradient, as far as one evaluation of `f` at the last output time shows.
    - `backend`: `"odenet"` or `"torchdiffeq"` (runs the same call through torchdiffeq, which
      also accepts its other method names).
    - `throw`: raise `odenet.SolverError` on solver failure (default); with `False` return the
      `Solution` with its `status` and `message`.
    - `**shorthand`: flat keywords that build `control` and `gradient` instead: `rtol`, `atol`,
      `first_step`, `min_step`, `max_steps`, `controller`, `norm`, `per_sample` (an `Adaptive`), `steps`,
      `step_size` (a `Fixed`), `adjoint_rtol`, `adjoint_atol`, `adjoint_seminorm` (an
      `Adjoint`, with `gradient="adjoint"`). Not together with `control=` or a gradient object.
      For a structured `y0`, `rtol`/`atol` may give one number per leaf, in its structure.

    **Returns:** an `odenet.Solution` with `ys` of shape `[len(t), *y0.shape]` (for a
    structured `y0`, that structure of such tensors), `ts`, `stats` (`odenet.SolveStats`),
    `status`, `message` and `steps`.

    **Raises:** `ValueError`/`TypeError` for bad input (naming the value received and the fix;
    torchdiffeq's `method=`/`options=` name odenet's keywords and `odenet.compat`);
    `odenet.SolverError` when the solver fails and `throw=True`.

    **Example:**

    ```python
    import torch, odenet
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    sol = odenet.odeint(lambda t, y: y @ A.T, y0, torch.linspace(0, 5, 50), solver="dopri5",
                        control=odenet.Adaptive(rtol=1e-8, atol=1e-10))
    same = odenet.odeint(lambda t, y: y @ A.T, y0, torch.linspace(0, 5, 50), rtol=1e-8, atol=1e-10)
    sol.ys.shape, sol.stats.nfe_forward
    ```
    """
    tol = _check_shorthand(y0, shorthand) if shorthand else None
    opts = options_from(solver, control, gradient, backend, throw, **shorthand)
    return solve_with_options(f, y0, t, opts, adjoint_params, tol=tol)


def _check_shorthand(y0, shorthand: dict) -> Optional[LeafTolerances]:
    """Refuse torchdiffeq's and unknown keywords; split per-leaf tolerances of a structured `y0`
    (updating `shorthand` to the numbers the loop uses, and returning the leaves' own)."""
    for key in shorthand:
        if key in _TORCHDIFFEQ_KEYWORDS:
            raise TypeError(
                f"odenet.odeint got {key}=, torchdiffeq's keyword; odenet's is {_TORCHDIFFEQ_KEYWORDS[key]}. To keep "
                "torchdiffeq's signature (method=, rtol=, options=, returning the tensor), call "
                "odenet.compat.odeint instead."
            )
    check_keywords("odeint", shorthand, SHORTHAND)
    if isinstance(y0, (tuple, list, dict)) and ("rtol" in shorthand or "atol" in shorthand):
        rtol, atol, tol = split_tolerances(y0, shorthand.get("rtol"), shorthand.get("atol"))
        shorthand.update(rtol=rtol, atol=atol)
        return tol
    return None
