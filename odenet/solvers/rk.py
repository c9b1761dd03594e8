"""One generic explicit Runge–Kutta step for any `ButcherTableau`, and the built-in solvers."""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .tableau import BOSH3, DOPRI5, DOPRI8, EULER, HEUN, MIDPOINT, TSIT5, ButcherTableau
from .tableau import RK4 as _RK4_TABLEAU

__all__ = [
    "ExplicitRK",
    "Euler",
    "Midpoint",
    "Heun",
    "RK4",
    "Bosh3",
    "Dopri5",
    "Tsit5",
    "Dopri8",
    "SOLVERS",
    "get_solver",
]

# f(t, y) where t is a Python float; the integrate loop turns it into a tensor.
Func = Callable[[float, Tensor], Tensor]


def _combine(y: Tensor, h: float, coefs: Tuple[Tuple[int, float], ...], ks: List[Tensor]) -> Tensor:
    """y + h Σ_j coef_j k_j in one new tensor (in-place `add_` on it is autograd-safe: it saves no output)."""
    if not coefs:
        return y
    j, a = coefs[0]
    out = torch.add(y, ks[j], alpha=h * a)
    for j, a in coefs[1:]:
        out.add_(ks[j], alpha=h * a)
    return out


def _lincomb(h: float, coefs: Tuple[Tuple[int, float], ...], ks: List[Tensor]) -> Tensor:
    """h Σ_j coef_j k_j (the error estimate), one allocation."""
    j, a = coefs[0]
    out = torch.mul(ks[j], h * a)
    for j, a in coefs[1:]:
        out.add_(ks[j], alpha=h * a)
    return out


def without_grad(fn, *args):
    """`fn(*args)` with autograd off, skipping the context switch when it already is (called every step)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    with torch.no_grad():
        return fn(*args)


def _nonzero(row) -> Tuple[Tuple[int, float], ...]:
    return tuple((j, float(x)) for j, x in enumerate(row) if x != 0.0)


class StepResult(NamedTuple):
    """One step's result: new state, error estimate (or `None`), stages `ks` (for dense output),
    and `f(t1, y1)` for FSAL methods (else `None`)."""

    y1: Tensor
    error: Optional[Tensor]
    ks: List[Tensor]
    k_next: Optional[Tensor]
    error_low: Optional[Tensor] = None  # a second, lower-order estimate (`tableau.b_err_low`), or None


class ExplicitRK:
    """An explicit Runge–Kutta solver for any `ButcherTableau`; the base of the built-in solvers.

    The built-in classes (`Euler`, `Midpoint`, `Heun`, `RK4`, `Bosh3`, `Dopri5`, `Tsit5`, `Dopri8`)
    fix the tableau and take only `adaptive`; each names its reference (in full: `TABLEAU.reference`).
    Solvers hold no parameters and no per-solve state.

    **Arguments:**

    - `tableau`: the method.
    - `adaptive`: control the step size with the embedded error estimate (`tableau.b_err`);
      default: exactly when there is one. `adaptive=False` runs an embedded pair on a fixed grid.

    **Raises:** `TypeError` if `tableau` is not a `ButcherTableau`; `ValueError` for
    `adaptive=True` without an error estimate.

    **Example:**

    ```python
    solver = odenet.solvers.Dopri5(adaptive=False)  # an adaptive pair on a fixed grid
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver=solver, steps=10)
    assert solver.order == 5 and sol.stats.n_accepted == 10
    ```
    """

    def __init__(self, tableau: ButcherTableau, adaptive: Optional[bool] = None):
        if not isinstance(tableau, ButcherTableau):
            raise TypeError(f"ExplicitRK needs a ButcherTableau, got {type(tableau).__name__}.")
        if adaptive is None:
            adaptive = tableau.adaptive
        if adaptive and not tableau.adaptive:
            raise ValueError(
                f"Tableau {tableau.name!r} has no embedded error estimate (b_err), so it cannot "
                "run adaptively; use adaptive=False with steps= or step_size=."
            )
        self.tableau = tableau
        self.adaptive = bool(adaptive)
        self._rows = tuple(_nonzero(r) for r in tableau.a)
        self._b = _nonzero(tableau.b)
        self._err = _nonzero(tableau.b_err) if tableau.b_err is not None else ()
        self._err_low = _nonzero(tableau.b_err_low) if tableau.b_err_low is not None else ()
        self._dense = tableau.dense
        # One stage and no error estimate: the residual update `y + h·b₀·f(t, y)` (Euler), which
        # the fixed-step loop writes out.
        self._single = tableau.stages == 1 and not self._err

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """The tableau's name, e.g. `"dopri5"`."""
        return self.tableau.name

    @property
    def order(self) -> int:
        """The order of the method's solution (the higher of an embedded pair)."""
        return self.tableau.order

    def __repr__(self) -> str:
        kind = "adaptive" if self.adaptive else "fixed"
        return f"{type(self).__name__}({self.tableau.name}, {kind})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.tableau == self.tableau and other.adaptive == self.adaptive

    def __hash__(self) -> int:
        return hash((type(self), self.tableau, self.adaptive))

    # ------------------------------------------------------------------ the step
    def step(
        self,
        f: Func,
        t: float,
        y: Tensor,
        h: float,
        k1: Optional[Tensor] = None,
        with_error: bool = True,
        last_stage: bool = True,
        times: Optional[Sequence] = None,
    ) -> StepResult:
        """One step of size `h` (negative: backwards) from `(t, y)`, as a `StepResult`.

        `k1 = f(t, y)` may be handed in (FSAL). `with_error=False` skips the error estimate and, with
        `last_stage=False`, an FSAL method's last evaluation (`ks` then lacks it). `times[i]`, if
        given, is stage `i`'s time argument instead of `t + c_i h`.
        """
        if k1 is None:
            k1 = f(t if times is None else times[0], y)
        tab = self.tableau
        ks = [k1]
        c = tab.c
        yi = y
        stages = tab.stages
        skip_last = tab.fsal and not (last_stage or with_error)
        for i in range(1, stages):
            yi = _combine(y, h, self._rows[i], ks)
            if skip_last and i == stages - 1:
                break
            ks.append(f(t + c[i] * h if times is None else times[i], yi))
        if tab.fsal:
            # The last stage's input is y1 itself: reuse the tensor (and f(t1, y1) if evaluated).
            y1 = yi
            k_next = None if skip_last else ks[-1]
        else:
            y1 = _combine(y, h, self._b, ks)
            k_next = None
        error = None
        if with_error and self.adaptive and self._err:
            # Only step-size control reads it; never differentiated.
            error = without_grad(_lincomb, h, self._err, ks)
            if self._err_low:
                return StepResult(y1, error, ks, k_next, without_grad(_lincomb, h, self._err_low, ks))
        return StepResult(y1, error, ks, k_next)

    def interpolate(self, y0: Tensor, h: float, ks: List[Tensor], theta: float) -> Tensor:
        """Dense output at `t0 + theta h` from the stages `ks` of the step that started at `(t0, y0)`."""
        weights = tuple(
            (i, sum(coef * theta ** (j + 1) for j, coef in enumerate(row))) for i, row in enumerate(self._dense)
        )
        weights = tuple((i, w) for i, w in weights if w != 0.0)
        return _combine(y0, h, weights, ks)


class _NamedRK(ExplicitRK):
    """A built-in method: `ExplicitRK(TABLEAU, adaptive)` with the tableau as a class attribute."""

    TABLEAU: ButcherTableau

    def __init__(self, adaptive: Optional[bool] = None):
        super().__init__(self.TABLEAU, adaptive)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(adaptive={self.adaptive})"


class Euler(_NamedRK):
    """Explicit Euler, order 1, one residual update `y + h f(t, y)` per step (Euler 1768)."""

    TABLEAU = EULER


class Midpoint(_NamedRK):
    """Explicit midpoint rule, order 2 (Runge 1895)."""

    TABLEAU = MIDPOINT


class Heun(_NamedRK):
    """Heun's method (explicit trapezoidal rule), order 2 (Heun 1900)."""

    TABLEAU = HEUN


class RK4(_NamedRK):
    """The classical Runge–Kutta method, order 4 (Kutta 1901)."""

    TABLEAU = _RK4_TABLEAU


class Bosh3(_NamedRK):
    """Bogacki–Shampine 3(2), adaptive, FSAL (Bogacki & Shampine 1989)."""

    TABLEAU = BOSH3


class Dopri5(_NamedRK):
    """Dormand–Prince 5(4), adaptive, FSAL (Dormand & Prince 1980; dense output: Shampine 1986)."""

    TABLEAU = DOPRI5


class Tsit5(_NamedRK):
    """Tsitouras 5(4), adaptive, FSAL (Tsitouras 2011)."""

    TABLEAU = TSIT5


class Dopri8(_NamedRK):
    """Dormand–Prince 8(5,3) (DOP853), adaptive, FSAL; steps controlled by its 5th-order estimate,
    6th-order dense output on its own stages (Hairer, Nørsett & Wanner 1993)."""

    TABLEAU = DOPRI8


#: Solver names accepted as ``solver=``, mapped to their classes.
SOLVERS = {
    "euler": Euler,
    "midpoint": Midpoint,
    "heun": Heun,
    "rk4": RK4,
    "bosh3": Bosh3,
    "dopri5": Dopri5,
    "tsit5": Tsit5,
    "dopri8": Dopri8,
}


_DEFAULT_INSTANCES: dict = {}


def get_solver(solver) -> ExplicitRK:
    """The solver for a name in `SOLVERS` (case-insensitive; one shared instance, solvers being
    stateless), or an `ExplicitRK` as it is."""
    if isinstance(solver, ExplicitRK):
        return solver
    if isinstance(solver, str):
        try:
            cls = SOLVERS[solver.lower()]
        except KeyError:
            raise ValueError(
                f"Unknown solver {solver!r}. Choose one of {sorted(SOLVERS)} "
                "(odenet.SOLVERS), or pass a solver object such as odenet.solvers.Dopri5()."
            ) from None
        # Solvers are stateless, so one instance per name serves every solve.
        if cls not in _DEFAULT_INSTANCES:
            _DEFAULT_INSTANCES[cls] = cls()
        return _DEFAULT_INSTANCES[cls]
    raise TypeError(
        f"solver must be a name from odenet.SOLVERS or an odenet.solvers.ExplicitRK instance, "
        f"got {type(solver).__name__}."
    )
