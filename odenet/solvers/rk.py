"""One generic explicit Runge–Kutta step for any :class:`ButcherTableau`.

Solvers hold no parameters and no per-solve state: :meth:`ExplicitRK.step` takes
the state and returns everything the integrate loop needs (the new state, the
error estimate, the stages for dense output, and the first stage of the next
step for FSAL methods).
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .tableau import BOSH3, DOPRI5, EULER, HEUN, MIDPOINT, TSIT5, ButcherTableau
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
    "SOLVERS",
    "get_solver",
]

# f(t, y) where t is a Python float; the integrate loop turns it into a tensor.
Func = Callable[[float, Tensor], Tensor]


def _combine(y: Tensor, h: float, coefs: Tuple[Tuple[int, float], ...], ks: List[Tensor]) -> Tensor:
    """y + h Σ_j coef_j k_j, allocating one new tensor and accumulating in place.

    Accumulating into the fresh tensor is autograd-safe: `add_` does not need its
    output for backward.
    """
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
    """`fn(*args)` with autograd off; no context switch when it already is (the loop calls
    this every step, and most solves without gradients run under `no_grad` already)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    with torch.no_grad():
        return fn(*args)


def _nonzero(row) -> Tuple[Tuple[int, float], ...]:
    return tuple((j, float(x)) for j, x in enumerate(row) if x != 0.0)


class StepResult(NamedTuple):
    """What one step returns: the new state, the local error estimate (``None`` for
    fixed-step methods), all stages ``ks`` (for dense output), and ``f(t1, y1)``
    when the method is FSAL (else ``None``)."""

    y1: Tensor
    error: Optional[Tensor]
    ks: List[Tensor]
    k_next: Optional[Tensor]


class ExplicitRK:
    """An explicit Runge–Kutta solver defined by a :class:`ButcherTableau`.

    **Arguments:**

    - `tableau`: the method's coefficients.
    - `adaptive`: run with error control and a step-size controller (needs
      `tableau.b_err`). Defaults to `True` exactly when the tableau has an embedded
      method. `adaptive=False` runs an embedded method on a fixed grid, which is how
      its convergence order is measured.

    **Raises:** `TypeError` if `tableau` is not a `ButcherTableau`; `ValueError` for
    `adaptive=True` with a tableau that has no embedded error estimate.

    **Example:**

    ```python
    import odenet
    from odenet.solvers import ButcherTableau, ExplicitRK

    ralston = ButcherTableau(name="ralston", c=(0, 2 / 3), a=((), (2 / 3,)),
                             b=(1 / 4, 3 / 4), order=2)
    sol = odenet.odeint(lambda t, y: -y, torch.ones(3), [0.0, 1.0],
                        solver=ExplicitRK(ralston), steps=10)
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
        self._dense = tableau.dense

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
        """Take one step of size `h` (negative to integrate backwards) from `(t, y)`.

        `k1 = f(t, y)` may be passed in (FSAL methods hand it over from the previous
        step); otherwise it is evaluated. `with_error=False` skips the error estimate
        (used when a step is recomputed for its gradient); with it, `last_stage=False` also
        skips an FSAL method's last evaluation `f(t1, y1)`, which only the error estimate,
        dense output and the next step need (`ks` then lacks that stage). `times[i]`, when
        given, is passed to `f` as stage `i`'s time instead of the float `t + c_i h` (the
        loop hands in pre-made time tensors on fixed grids).

        **Arguments:**

        - `f`: the dynamics `f(t, y)`.
        - `t`, `y`: time and state at the start of the step.
        - `h`: the step size.
        - `k1`: `f(t, y)` if already known (default: evaluated here).
        - `with_error`: compute the local error estimate (adaptive solvers only).
        - `last_stage`: evaluate an FSAL method's last stage even without the error estimate.
        - `times`: the time argument of `f` for each stage (default: `t + c_i h`).

        **Returns:** a `StepResult` named tuple `(y1, error, ks, k_next)`: the new state, the
        error estimate (`None` for fixed steps or `with_error=False`), the stages, and
        `f(t + h, y1)` for FSAL methods (else `None`).
        """
        tab = self.tableau
        if k1 is None:
            k1 = f(t if times is None else times[0], y)
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
        return StepResult(y1, error, ks, k_next)

    def interpolate(self, y0: Tensor, h: float, ks: List[Tensor], theta: float) -> Tensor:
        """Dense output at `t0 + θ h` from the stages of the step that started at `(t0, y0)`.

        **Arguments:**

        - `y0`: the state at the start of the step.
        - `h`: the step size.
        - `ks`: the stages `step` returned for that step.
        - `theta`: the fraction of the step, in `[0, 1]`.

        **Returns:** the interpolated state, a tensor of `y0`'s shape.
        """
        weights = tuple(
            (i, sum(coef * theta ** (j + 1) for j, coef in enumerate(row))) for i, row in enumerate(self._dense)
        )
        weights = tuple((i, w) for i, w in weights if w != 0.0)
        return _combine(y0, h, weights, ks)


class _NamedRK(ExplicitRK):
    """Base of the built-in methods: the tableau is a class attribute."""

    TABLEAU: ButcherTableau

    def __init__(self, adaptive: Optional[bool] = None):
        super().__init__(self.TABLEAU, adaptive)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(adaptive={self.adaptive})"


class Euler(_NamedRK):
    """Explicit Euler, order 1: one residual update `y + h f(t, y)` per step.

    Reference: L. Euler, Institutionum calculi integralis, 1768.

    **Arguments:**

    - `adaptive`: run with error control (default: `True` exactly when the method has an
      embedded error estimate).

    **Raises:** `ValueError` for `adaptive=True` on a method without an error estimate.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver=odenet.solvers.Euler(), steps=10)
    sol.ys[-1]  # (1 - 0.1) ** 10, close to exp(-1)
    ```
    """

    TABLEAU = EULER


class Midpoint(_NamedRK):
    """Explicit midpoint rule, order 2, second-order dense output.

    Reference: C. Runge, Math. Ann. 46, 1895.

    **Arguments:**

    - `adaptive`: run with error control (default: `True` exactly when the method has an
      embedded error estimate).

    **Raises:** `ValueError` for `adaptive=True` on a method without an error estimate.

    **Example:**

    ```python
    solver = odenet.solvers.Midpoint()
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver=solver, steps=10)
    ```
    """

    TABLEAU = MIDPOINT


class Heun(_NamedRK):
    """Heun's method (explicit trapezoidal rule), order 2, second-order dense output.

    Reference: K. Heun, Z. Math. Phys. 45, 1900.

    **Arguments:**

    - `adaptive`: run with error control (default: `True` exactly when the method has an
      embedded error estimate).

    **Raises:** `ValueError` for `adaptive=True` on a method without an error estimate.

    **Example:**

    ```python
    solver = odenet.solvers.Heun()
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver=solver, steps=10)
    ```
    """

    TABLEAU = HEUN


class RK4(_NamedRK):
    """The classical fourth-order Runge–Kutta method, third-order dense output.

    Reference: W. Kutta, Z. Math. Phys. 46, 1901.

    **Arguments:**

    - `adaptive`: run with error control (default: `True` exactly when the method has an
      embedded error estimate).

    **Raises:** `ValueError` for `adaptive=True` on a method without an error estimate.

    **Example:**

    ```python
    solver = odenet.solvers.RK4()
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver=solver, steps=4)
    assert solver.order == 4 and not solver.adaptive
    ```
    """

    TABLEAU = _RK4_TABLEAU


class Bosh3(_NamedRK):
    """Bogacki–Shampine 3(2): FSAL, adaptive, cubic Hermite dense output.

    Reference: P. Bogacki and L. F. Shampine, Appl. Math. Lett. 2(4), 1989.

    **Arguments:**

    - `adaptive`: run with error control (default: `True` exactly when the method has an
      embedded error estimate).

    **Raises:** `ValueError` for `adaptive=True` on a method without an error estimate.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver=odenet.solvers.Bosh3(),
                        rtol=1e-5, atol=1e-7)
    fixed = odenet.solvers.Bosh3(adaptive=False)  # the same method on a fixed grid
    ```
    """

    TABLEAU = BOSH3


class Dopri5(_NamedRK):
    """Dormand–Prince 5(4): FSAL, adaptive, Shampine's fourth-order dense output.

    Reference: J. R. Dormand and P. J. Prince, J. Comput. Appl. Math. 6(1), 1980;
    L. F. Shampine, Math. Comp. 46(173), 1986.

    **Arguments:**

    - `adaptive`: run with error control (default: `True` exactly when the method has an
      embedded error estimate).

    **Raises:** `ValueError` for `adaptive=True` on a method without an error estimate.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver=odenet.solvers.Dopri5(),
                        rtol=1e-6, atol=1e-8)
    sol.stats.nfe_forward
    ```
    """

    TABLEAU = DOPRI5


class Tsit5(_NamedRK):
    """Tsitouras 5(4): FSAL, adaptive, fourth-order dense output.

    Reference: Ch. Tsitouras, Comput. Math. Appl. 62(2), 2011.

    **Arguments:**

    - `adaptive`: run with error control (default: `True` exactly when the method has an
      embedded error estimate).

    **Raises:** `ValueError` for `adaptive=True` on a method without an error estimate.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver=odenet.solvers.Tsit5(),
                        rtol=1e-6, atol=1e-8)
    ```
    """

    TABLEAU = TSIT5


#: Solver names accepted as ``solver=``, mapped to their classes.
SOLVERS = {
    "euler": Euler,
    "midpoint": Midpoint,
    "heun": Heun,
    "rk4": RK4,
    "bosh3": Bosh3,
    "dopri5": Dopri5,
    "tsit5": Tsit5,
}


_DEFAULT_INSTANCES: dict = {}


def get_solver(solver) -> ExplicitRK:
    """Turn a name from `SOLVERS` or an `ExplicitRK` instance into a solver.

    **Arguments:**

    - `solver`: a name such as `"dopri5"` (case-insensitive) or an `ExplicitRK` instance.

    **Returns:** the solver object (the one shared default instance for a name; solvers
    are stateless).

    **Raises:** `ValueError` for an unknown name, `TypeError` for anything else.

    **Example:**

    ```python
    from odenet.solvers import get_solver
    solver = get_solver("tsit5")
    solver.order, solver.adaptive  # (5, True)
    ```
    """
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
