"""The `nn.Module` front: :class:`ResBlock` (one Euler step) and :class:`ODEBlock` (a whole solve)."""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .gradients import GradientMethod
from .odeint import solve_with_options
from .options import SHORTHAND, SolveOptions, check_keywords, options_from
from .regularization import RNODE, solve_regularized
from .solution import Solution, StepInfo
from .solvers.control import Adaptive, Fixed
from .solvers.rk import ExplicitRK
from .solvers.stats import SolveStats

__all__ = ["ResBlock", "ODEBlock", "block_options"]


def _check_dynamics(f) -> None:
    if not isinstance(f, nn.Module):
        raise TypeError(
            f"f must be an nn.Module with forward(t, x) (so its parameters are registered), got {type(f).__name__}. "
            "Wrap a plain function in a module, or use odenet.odeint for functions."
        )


def _check_time(name: str, value) -> float:
    # numbers.Real takes NumPy scalars (np.float32 is not a float) as odeint's settings do.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def _check_end_time(value) -> Union[float, nn.Parameter]:
    """`t1` as a float, or as it is when it is a learnable end time: a 0-dim floating `nn.Parameter`."""
    if not isinstance(value, Tensor):
        return _check_time("t1", value)
    if value.dim() != 0:
        raise ValueError(f"t1 must be a number or a 0-dim tensor, got a tensor of shape {tuple(value.shape)}; "
                         "a learnable end time is nn.Parameter(torch.tensor(1.0)).")
    if not value.is_floating_point():
        raise TypeError(f"t1 must be a floating-point tensor, got dtype {value.dtype}; "
                        "e.g. nn.Parameter(torch.tensor(1.0)).")
    _check_time("t1", value.item())  # finite (item(): float() warns on a tensor that requires grad)
    if isinstance(value, nn.Parameter):
        return value
    if value.requires_grad:
        raise TypeError("A t1 that requires grad must be an nn.Parameter, which the block owns (optimizers and "
                        "state_dict see it): pass nn.Parameter(t1), or float(t1) for a fixed end time.")
    return value.item()


class _Bound(nn.Module):
    """`f` with one call's context bound, `f(t, x, **context)`, for `solve_regularized` (which calls `f(t, x)`)."""

    def __init__(self, f: nn.Module, context: dict):
        super().__init__()
        self.f, self.context = f, context

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.f(t, x, **self.context)


#: ODEBlock's default tolerances for adaptive solvers: a training setting (as in Chen et al. 2018).
BLOCK_TOL = (1e-3, 1e-3)

# What a block's keywords may be, besides t0/t1, solver, control and gradient.
_BLOCK_KEYWORDS = frozenset((*SHORTHAND, "t0", "t1", "control", "gradient", "backend", "throw", "regularization"))


def _check_keywords(owner: str, given, allowed) -> None:
    if "adjoint_params" in given:
        raise TypeError(
            f"{owner} takes no adjoint_params: blocks differentiate the parameters of f. For "
            "other tensors f uses, make them parameters of f, use gradient='direct', or call "
            "odenet.odeint(f, x, t, gradient=..., adjoint_params=...) yourself."
        )
    check_keywords(owner, given, allowed)


def block_options(solver, control, gradient, settings: dict) -> SolveOptions:
    """A block's `SolveOptions` from its arguments (`settings`: backend, throw and the shorthand)."""
    shorthand = {k: v for k, v in settings.items() if k in SHORTHAND}
    return options_from(solver, control, gradient, settings.get("backend", "odenet"), settings.get("throw", True),
                        default_tol=BLOCK_TOL, **shorthand)


class ResBlock(nn.Module):
    """One residual block `x + h · f(t, x)`: a single explicit Euler step of `dx/dt = f(t, x)`.

    **Arguments:**

    - `f`: the dynamics, an `nn.Module` with `forward(t, x)` returning a tensor of `x`'s shape.
    - `h`: step size (the residual branch's scale), default 1.
    - `t`: the time at which `f` is evaluated, default 0.

    `N` blocks `ResBlock(f, h=1/N, t=i/N)`, `i = 0..N-1`, compute what
    `ODEBlock(f, solver="euler", steps=N)` computes: the same operations, bit for bit in
    float32. In float64 the ODE block's step sizes are differences of its grid points,
    `(i+1)/N - i/N`, which can differ from `1/N` in the last bit unless `N` is a power of two,
    so the two agree to about `1e-16` relative.

    **Raises:** `TypeError` if `f` is not an `nn.Module` or `h`/`t` are not numbers;
    `ValueError` for a non-finite `h` or `t`, or `h = 0`.

    **Example:**

    ```python
    f = odenet.MLPDynamics(dim=2, hidden=16)
    block = odenet.ResBlock(f, h=0.5)
    y = block(torch.randn(8, 2))
    ```
    """

    def __init__(self, f: nn.Module, h: float = 1.0, t: float = 0.0):
        super().__init__()
        _check_dynamics(f)
        self.f = f
        self.h = _check_time("h", h)
        if self.h == 0.0:
            raise ValueError("h must be non-zero (h = 0 makes the block the identity).")
        self.t = _check_time("t", t)

    def forward(self, x: Tensor) -> Tensor:
        """One Euler step from `x`: `x + h · f(t, x)`."""
        # The same op as an Euler step of odenet's solver (torch.add with alpha), so that a
        # stack of ResBlocks equals ODEBlock(solver="euler") exactly.
        k = self.f(torch.full((), self.t, dtype=x.dtype, device=x.device), x)
        return torch.add(x, k, alpha=self.h)

    def extra_repr(self) -> str:
        return f"h={self.h:g}, t={self.t:g}"


class ODEBlock(nn.Module):
    """A continuous-depth block: integrates `dx/dt = f(t, x)` from `t0` to `t1` and returns `x(t1)`.

    **Arguments:**

    - `f`: the dynamics, an `nn.Module` with `forward(t, x)` (or `forward(t, x, **context)`:
      keywords given to the block's `forward`, `solve` or `trajectory`, such as a mask or a
      label, reach `f` at every evaluation; context tensors that require grad get gradients
      under every gradient method).
    - `solver`: a name from `odenet.SOLVERS` or a solver object (default `"dopri5"`).
    - `t0`, `t1`: integration interval (default 0 to 1). `t1` may be a 0-dim
      `nn.Parameter`, a learnable depth: it is registered on the block and gets its gradient
      `dL/dt1 = g·f(t1, x(t1))` under every gradient method (`interval` reads both as numbers).
    - `control`: `odenet.Fixed(...)` or `odenet.Adaptive(...)`, as in `odenet.odeint`. Blocks'
      default for adaptive solvers is `Adaptive(rtol=1e-3, atol=1e-3)` (a training setting, as
      in Chen et al. 2018), unlike `odeint`'s `1e-7`/`1e-9`. `Fixed(steps=N)` with
      `solver="euler"` is N weight-tied ResBlocks with `h = (t1 - t0)/N`.
    - `gradient`: `odenet.Direct()`, `odenet.Adjoint(...)`, `odenet.Checkpoint()`, or their
      names (see `odenet.odeint`).
    - `regularization`: an `odenet.RNODE` (default `None`). In training mode `forward` then
      also integrates the kinetic energy / Jacobian norm along the trajectory and stores the
      weighted term, a differentiable scalar, in `last_regularization` (add it to the loss).
      In eval mode, and in `solve`/`trajectory`, the plain ODE is solved.
    - `**settings`: `backend`, `throw`, and the flat shorthand of `odenet.odeint` (`rtol`,
      `atol`, `steps`, `step_size`, `first_step`, `min_step`, `max_steps`, `controller`, `norm`,
      `per_sample`, `adjoint_rtol`, `adjoint_atol`, `adjoint_seminorm`).

    Settings are checked here, so a bad combination fails at construction; the block keeps
    them as `options` (also readable as `solver`, `control`, `gradient`). After each call,
    `last_stats` holds the `odenet.SolveStats` of that solve (its backward counts fill in
    when `backward()` runs) and `last_steps` its steps, `StepInfo(t, h, accepted)` (for
    `odenet.plotting.plot_step_sizes(block)`).

    **Raises:** `ValueError`/`TypeError` for a bad setting or combination (naming the value and
    the fix), `t0 == t1`, a tensor `t1` that is not 0-dim and floating, an `f` that is not an
    `nn.Module`, or a `regularization` that is not an `odenet.RNODE`.

    **Example:**

    ```python
    f = odenet.MLPDynamics(dim=2, hidden=32)
    block = odenet.ODEBlock(f, solver="dopri5", control=odenet.Adaptive(rtol=1e-3, atol=1e-3),
                            gradient=odenet.Adjoint())
    same = odenet.ODEBlock(f, solver="dopri5", rtol=1e-3, atol=1e-3, gradient="adjoint")
    y = block(torch.randn(16, 2))
    block.last_stats.nfe_forward
    ys = block.trajectory(torch.randn(16, 2), torch.linspace(0, 1, 20))  # [20, 16, 2]
    ```
    """

    def __init__(
        self,
        f: nn.Module,
        solver: Union[str, ExplicitRK] = "dopri5",
        *,
        t0: float = 0.0,
        t1: Union[float, nn.Parameter] = 1.0,
        control: Union[Fixed, Adaptive, None] = None,
        gradient: Union[str, GradientMethod] = "direct",
        regularization: Optional[RNODE] = None,
        **settings,
    ):
        super().__init__()
        _check_dynamics(f)
        if regularization is not None and not isinstance(regularization, RNODE):
            raise TypeError(
                f"regularization must be an odenet.RNODE or None, got {type(regularization).__name__}; "
                "e.g. regularization=odenet.RNODE(kinetic=0.01, jacobian=0.01)."
            )
        _check_keywords("ODEBlock", settings, _BLOCK_KEYWORDS)
        self.regularization = regularization
        self.last_regularization: Optional[Tensor] = None
        self.f = f
        self.t0 = _check_time("t0", t0)
        self.t1 = _check_end_time(t1)
        if self.t0 == self.interval[1]:
            raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {self.t0}.")
        self.options: SolveOptions = block_options(solver, control, gradient, settings)
        self.last_stats: Optional[SolveStats] = None
        self.last_steps: Optional[List[StepInfo]] = None

    @property
    def solver(self):
        """The solver object (an `odenet.solvers.ExplicitRK`), or its name with the torchdiffeq backend."""
        return self.options.solver

    @property
    def control(self) -> Union[Fixed, Adaptive]:
        """The step control: `odenet.Fixed` or `odenet.Adaptive`."""
        return self.options.control

    @property
    def gradient(self) -> GradientMethod:
        """The gradient method: `odenet.Direct()`, `odenet.Adjoint(...)` or `odenet.Checkpoint()`."""
        return self.options.gradient

    @property
    def interval(self) -> Tuple[float, float]:
        """`(t0, t1)` as numbers (a learnable `t1` at its current value)."""
        return self.t0, self.t1.item() if isinstance(self.t1, Tensor) else self.t1

    def _span(self) -> Union[Tensor, Tuple[float, float]]:
        """`(t0, t1)`; a tensor when `t1` is learnable, so that odeint's time gradients reach it."""
        if isinstance(self.t1, Tensor):
            return torch.stack([torch.full_like(self.t1, self.t0), self.t1])
        return self.t0, self.t1

    def _solve(self, x: Tensor, t, context: dict) -> Solution:
        sol = solve_with_options(self.f, x, self._span() if t is None else t, self.options, context=context)
        self.last_stats, self.last_steps = sol.stats, sol.steps
        return sol

    def solve(self, x: Tensor, t: Optional[Union[Tensor, Sequence[float]]] = None, **context) -> Solution:
        """The full `odenet.Solution` from `x` at `t[0]` over the times `t` (default `(t0, t1)`);
        `f` is called as `f(t, x, **context)`; sets `last_stats`."""
        return self._solve(x, t, context)

    def forward(self, x: Tensor, **context) -> Tensor:
        """`x(t1)` from `x` at `t0`, calling `f(t, x, **context)` (in training with `regularization`,
        also sets `last_regularization`)."""
        if self.regularization is not None and self.training:
            return self._forward_regularized(x, context)
        self.last_regularization = None
        return self._solve(x, None, context).ys[-1]

    def _forward_regularized(self, x: Tensor, context: dict) -> Tensor:
        f, inputs = self.f, None
        if context:  # solve_regularized calls f(t, x): bind the context, and differentiate its tensors too
            f = _Bound(self.f, context)
            inputs = [*self.f.parameters(), *(v for v in context.values() if isinstance(v, Tensor))]
        res = solve_regularized(f, x, self._span(), self.options, self.regularization, adjoint_params=inputs)
        self.last_stats, self.last_steps = res.solution.stats, res.solution.steps
        self.last_regularization = res.regularization
        return res.solution.ys[-1]

    def trajectory(self, x: Tensor, t: Union[Tensor, Sequence[float]], **context) -> Tensor:
        """States at the times `t` (starting from `x` at `t[0]`), shape `[len(t), *x.shape]`."""
        return self._solve(x, t, context).ys

    def __getstate__(self):
        # The last regularisation term is a non-leaf tensor of the last training step's graph:
        # not part of the module's state, and deepcopy refuses to copy it.
        state = self.__dict__.copy()
        state["last_regularization"] = None
        return state

    def extra_repr(self) -> str:
        o = self.options
        t1 = f"{self.interval[1]:g}" + (" (learnable)" if isinstance(self.t1, Tensor) else "")
        parts = [f"solver={o.solver_name!r}", f"t0={self.t0:g}", f"t1={t1}", f"control={o.control!r}",
                 f"gradient={o.gradient!r}"]
        if o.backend != "odenet":
            parts.append(f"backend={o.backend!r}")
        return ", ".join(parts)
