"""Step-size controllers for adaptive solvers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PIController"]


@dataclass(frozen=True)
class PIController:
    """Proportional–integral step-size controller (Hairer & Wanner, *Solving ODEs II*, IV.2; Gustafsson 1991).

    After a step with scaled error norm `r_n` (accepted when `r_n <= 1`) the next step is
    `h_n · clip(safety · r_n^(-(icoeff + pcoeff)/k) · r_{n-1}^(pcoeff/k), dfactor, ifactor)`, with
    `k = q + 1` for an error estimate of order `q` and `r_{n-1}` the last accepted step's error;
    after a rejected step the factor is at most 1.

    **Arguments:**

    - `pcoeff`, `icoeff`: the gains; the default `0.2, 0.65` is Hairer's PI setting for DOPRI5,
      which damps step-size oscillation; `0, 1` is torchdiffeq's integral controller.
    - `safety`, `ifactor`, `dfactor`: the factor above (`safety < 1`), its largest growth
      and its smallest shrink per step.
    - `error_per_unit_step`: control `r_n / |h_n|` (`k = q`) for tolerance proportionality, at
      the price of more steps on short intervals.

    **Raises:** `ValueError` for a non-positive or non-finite gain or factor, `safety >= 1`, or
    not `dfactor < 1 < ifactor`.

    **Example:**

    ```python
    integral = odenet.solvers.PIController(pcoeff=0.0, icoeff=1.0)  # torchdiffeq's controller
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver="dopri5", controller=integral)
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
        """`k` in the formula above for an error estimate of order `error_order`."""
        return error_order if self.error_per_unit_step else error_order + 1

    def factor(self, ratio: float, prev_ratio: float, accepted: bool, k: int) -> float:
        """The factor `h_{n+1} / h_n` from this step's error `ratio` and the last accepted one's."""
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

    def factors(self, ratio: Tensor, prev_ratio: Tensor, accepted: Tensor, k: int) -> Tensor:
        """`factor` for tensors of finite ratios, one per sample (per-sample error control)."""
        f = self.safety * torch.where(ratio > 0, ratio, 1.0).pow(-(self.icoeff + self.pcoeff) / k)
        if self.pcoeff:
            f = f * prev_ratio.pow(self.pcoeff / k)
        f = torch.where(ratio == 0, self.ifactor, f).clamp(self.dfactor, self.ifactor)
        return torch.where(accepted, f, f.clamp(max=1.0))
