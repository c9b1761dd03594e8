"""Step-size controllers for adaptive solvers."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PIController"]


@dataclass(frozen=True)
class PIController:
    """Proportional–integral step-size controller.

    After a step with scaled error norm `r_n` (accept when `r_n <= 1`) the next step is

        h_{n+1} = h_n · clip(safety · r_n^(-(icoeff + pcoeff)/k) · r_{n-1}^(pcoeff/k), dfactor, ifactor)

    where `k = q + 1` for a method whose error estimate is of order `q`, and `r_{n-1}` is
    the error of the last accepted step. `pcoeff=0, icoeff=1` is the classical integral
    (I) controller of torchdiffeq; the default `pcoeff=0.2, icoeff=0.65` is Hairer's
    PI setting for DOPRI5 (β = 0.04), which damps step-size oscillation. After a
    rejected step the factor is capped at 1.

    **Arguments:**

    - `pcoeff`, `icoeff`: proportional and integral gains (`icoeff > 0`).
    - `safety`: factor below 1 applied to every proposal.
    - `ifactor`: largest growth factor per step; `dfactor`: smallest shrink factor.
    - `error_per_unit_step`: control the error per unit step `r_n / |h_n|` instead of the
      error per step (`k` is then `q`). This gives tolerance proportionality (global
      error ∝ tolerance) at the price of more steps on short intervals.

    **Reference:** E. Hairer, G. Wanner, *Solving ODEs II*, IV.2; K. Gustafsson,
    *Control theoretic techniques for stepsize selection in explicit Runge–Kutta
    methods*, ACM TOMS 17(4), 1991.

    **Raises:** `ValueError` for a non-positive or non-finite gain or factor, `safety >= 1`,
    or factors that do not satisfy `dfactor < 1 < ifactor`.

    **Example:**

    ```python
    from odenet.solvers import PIController

    integral = PIController(pcoeff=0.0, icoeff=1.0)  # torchdiffeq's controller
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver="dopri5",
                        rtol=1e-6, atol=1e-8, controller=integral)
    ```
    """

    pcoeff: float = 0.2
    icoeff: float = 0.65
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    error_per_unit_step: bool = False

    def __post_init__(self):
        for name in ("safety", "ifactor", "dfactor", "icoeff"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"PIController.{name} must be a positive number, got {v!r}.")
        if not (isinstance(self.pcoeff, (int, float)) and math.isfinite(self.pcoeff) and self.pcoeff >= 0):
            raise ValueError(f"PIController.pcoeff must be a number >= 0, got {self.pcoeff!r}.")
        if not self.safety < 1:
            raise ValueError(f"PIController.safety must be below 1, got {self.safety}.")
        if not (self.dfactor < 1 < self.ifactor):
            raise ValueError(
                f"PIController needs dfactor < 1 < ifactor, got dfactor={self.dfactor}, ifactor={self.ifactor}."
            )

    def exponent_order(self, error_order: int) -> int:
        """`k` in the formula above for a method whose error estimate has order `error_order`.

        **Arguments:**

        - `error_order`: the order `q` of the method's error estimate.

        **Returns:** `q` with `error_per_unit_step=True`, else `q + 1`.
        """
        return error_order if self.error_per_unit_step else error_order + 1

    def factor(self, ratio: float, prev_ratio: float, accepted: bool, k: int) -> float:
        """Multiplier for the step size given the current and previous error ratios.

        **Arguments:**

        - `ratio`: the scaled error norm `r_n` of the step just taken.
        - `prev_ratio`: `r_{n-1}`, that of the last accepted step.
        - `accepted`: whether the step was accepted (a rejected step never grows `h`).
        - `k`: the exponent order (`exponent_order`).

        **Returns:** the factor `h_{n+1} / h_n`, within `[dfactor, ifactor]`.
        """
        if ratio == 0.0:
            f = self.ifactor
        else:
            f = self.safety * ratio ** (-(self.icoeff + self.pcoeff) / k)
            if self.pcoeff:
                f *= prev_ratio ** (self.pcoeff / k)
        f = min(self.ifactor, max(self.dfactor, f))
        if not accepted:
            f = min(f, 1.0)
        return f
