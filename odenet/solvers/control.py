"""Step control, as data: :class:`Fixed` steps on a grid, or :class:`Adaptive` steps under error control."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .controller import PIController

__all__ = ["Fixed", "Adaptive", "Option", "positive", "positive_int", "rms_norm", "max_norm", "NORMS"]


def rms_norm(x: Tensor) -> Tensor:
    """Root-mean-square over all elements (the batch is one state)."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def max_norm(x: Tensor) -> Tensor:
    """The largest magnitude over all elements (0 for an empty state)."""
    return torch.linalg.vector_norm(x, ord=math.inf) if x.numel() else x.new_zeros(())


#: The error norms `Adaptive(norm=...)` takes by name.
NORMS = {"rms": rms_norm, "max": max_norm}


class Option:
    """Base of the typed options: a repr that shows only the fields set away from their defaults."""

    def __repr__(self) -> str:
        shown = [
            f"{fl.name}={getattr(self, fl.name)!r}"
            for fl in dataclasses.fields(self)
            if fl.default is dataclasses.MISSING or getattr(self, fl.name) != fl.default
        ]
        return f"{type(self).__name__}({', '.join(shown)})"


def positive(name: str, value, allow_none: bool = True) -> Optional[float]:
    """`value` as a float, checked to be a positive finite number (or `None`, when allowed)."""
    if value is None and allow_none:
        return None
    if type(value) is not float:  # the common case skips the (slow) abstract-class check
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a positive number, got {value!r} ({type(value).__name__}).")
        value = float(value)
    if not 0.0 < value < math.inf:  # also False for NaN
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return value


def positive_int(name: str, value) -> Optional[int]:
    """`value` as an int, checked to be at least 1 (or `None`)."""
    if value is None:
        return None
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}).")
        value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}.")
    return value


def _required(name: str, value) -> float:
    return positive(name, value, allow_none=False)


def _normalise(obj, check, names) -> None:
    """Replace each field in `names` of the frozen `obj` by `check(name, value)` where that changes it."""
    for name in names:
        value = getattr(obj, name)
        new = check(name, value)
        if new is not value:
            object.__setattr__(obj, name, new)


@dataclass(frozen=True, repr=False)
class Fixed(Option):
    """Fixed steps, for the fixed-step solvers (`euler`, `midpoint`, `heun`, `rk4`).

    **Arguments:**

    - `steps`: the number of uniform steps over `[t[0], t[-1]]`.
    - `step_size`: the largest step; the grid is the uniform one with the fewest steps not
      longer than it.

    With neither, one step per interval of the output times. `steps=N` with `solver="euler"`
    is N weight-tied residual blocks.

    **Raises:** `TypeError`/`ValueError` for a non-positive or non-numeric value, or both given.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver="rk4", control=odenet.Fixed(steps=8))
    ```
    """

    steps: Optional[int] = None
    step_size: Optional[float] = None

    def __post_init__(self):
        _normalise(self, positive_int, ("steps",))
        _normalise(self, positive, ("step_size",))
        if self.steps is not None and self.step_size is not None:
            raise ValueError(f"Give steps= or step_size=, not both (got steps={self.steps}, step_size={self.step_size}).")

    def grid(self, ts: Sequence[float]) -> Tuple[float, ...]:
        """The step boundaries for output times `ts` (floats): a uniform grid over `[ts[0], ts[-1]]`, or `ts`."""
        if self.steps is None and self.step_size is None:
            return tuple(ts)
        t0, t1 = ts[0], ts[-1]
        steps = self.steps or max(1, math.ceil(abs(t1 - t0) / self.step_size - 1e-9))
        return (*(t0 + (t1 - t0) * i / steps for i in range(steps)), t1)


@dataclass(frozen=True, repr=False)
class Adaptive(Option):
    """Adaptive steps under error control, for the embedded solvers (`bosh3`, `dopri5`, `tsit5`, `dopri8`).

    A step is accepted when the RMS norm of its error estimate, scaled by
    `atol + rtol·max(|y0|, |y1|)`, is at most 1; `controller` then proposes the next step.

    **Arguments:**

    - `rtol`, `atol`: relative and absolute tolerance (`odeint`'s shorthand defaults are
      `1e-7`/`1e-9`, `ODEBlock`'s `1e-3`/`1e-3`).
    - `first_step`: the initial step size (default: chosen from `f` at `y0`, one extra evaluation).
    - `min_step`: the smallest step allowed: the solve fails with `STEP_UNDERFLOW` when a
      rejected step, or an accepted step after which the controller shrinks the step, leaves
      the next step below it. An automatic first step may start below it and grow.
    - `max_steps`: the most steps, accepted plus rejected, before failing with `MAX_STEPS`
      (with `backend="torchdiffeq"`, per output interval). Default: derived from the
      tolerance, the span and the method (`step_limit`), at least 10,000, so a solve that
      tight tolerances make long still ends, and one that never can stops.
    - `controller`: an `odenet.solvers.PIController` (default: `PIController()`).
    - `norm`: the norm of the scaled error, `"rms"` over all elements (default, as torchdiffeq),
      `"max"`, or a callable `norm(x) -> 0-dim tensor`. The batch shares its steps, so under
      any norm the hardest sample sets them, unless `per_sample`.
    - `per_sample`: the leading axis of the state is a batch of independent problems, each with
      its own time, step size, accept/reject decision and error norm (over its own elements; a
      callable `norm` is applied per sample by `torch.func.vmap`), so that one hard sample does
      not set the steps of all. `f` is still called on the whole batch, with `t` a tensor of
      shape `[B, 1, ..., 1]` (each sample's time; it broadcasts against the state as a scalar
      would). `SolveStats.n_accepted_per_sample`/`n_rejected_per_sample` give each sample's
      steps. Works with `Direct` and `Adjoint` (whose backward solve controls the batch jointly,
      with a 0-dim `t`, as do gradients to the output times), not with `Checkpoint`, events,
      tuple/dict states or the torchdiffeq backend.

    **Raises:** `TypeError`/`ValueError` for a non-positive or non-numeric value, a
    `controller` that is not a `PIController`, a non-bool `per_sample`, or `first_step < min_step`.

    **Example:**

    ```python
    control = odenet.Adaptive(rtol=1e-6, atol=1e-8, max_steps=500)
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver="dopri5", control=control)
    ```
    """

    rtol: float
    atol: float
    first_step: Optional[float] = None
    min_step: Optional[float] = None
    max_steps: Optional[int] = None
    controller: Optional[PIController] = None
    norm: Union[str, Callable[[Tensor], Tensor]] = "rms"
    per_sample: bool = False

    def __post_init__(self):
        if not isinstance(self.per_sample, bool):
            raise TypeError(f"per_sample must be True or False, got {self.per_sample!r}.")
        _normalise(self, _required, ("rtol", "atol"))
        _normalise(self, positive, ("first_step", "min_step"))
        _normalise(self, positive_int, ("max_steps",))
        if isinstance(self.norm, str) and self.norm not in NORMS:
            raise ValueError(f"norm must be one of {tuple(NORMS)} or a callable norm(x) -> 0-dim tensor, got {self.norm!r}.")
        if not (isinstance(self.norm, str) or callable(self.norm)):
            raise TypeError(f"norm must be one of {tuple(NORMS)} or a callable, got {type(self.norm).__name__}.")
        if self.controller is not None and not isinstance(self.controller, PIController):
            raise TypeError(f"controller must be an odenet.solvers.PIController, got {type(self.controller).__name__}.")
        if self.min_step is not None and self.first_step is not None and self.first_step < self.min_step:
            raise ValueError(
                f"first_step={self.first_step} is below min_step={self.min_step}; lower min_step or raise first_step."
            )

    def error_norm(self) -> Callable[[Tensor], Tensor]:
        """The norm as a function."""
        return NORMS[self.norm] if isinstance(self.norm, str) else self.norm

    def step_limit(self, span: float, error_order: int) -> int:
        """`max_steps`, or when it is `None` the default limit for a solve over `span` by a method
        whose error estimate has order `error_order`: `max(10_000, 100·|span|·tol^(-1/(q+1)))`
        with `tol = min(rtol, atol)`. For scale: bosh3 at 1e-10 over a 20-unit two-body orbit
        (eccentricity 0.5) takes 14,662 steps, and its limit is 4.3 million."""
        if self.max_steps is not None:
            return self.max_steps
        tol = min(self.rtol, self.atol)
        return max(10_000, math.ceil(100.0 * abs(span) * tol ** (-1.0 / (error_order + 1))))

