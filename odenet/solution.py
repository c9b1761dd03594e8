"""What a solve returns (:class:`Solution`) and raises (:class:`SolverError`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from torch import Tensor

from .solvers.integrate import StepInfo
from .solvers.stats import SolveStats
from .solvers.status import SolverError, Status

__all__ = ["Solution", "SolveStats", "SolverError", "Status", "StepInfo"]


@dataclass
class Solution:
    """The result of :func:`odenet.odeint`.

    **Fields:**

    - `ts`: the output times, as given (a tensor).
    - `ys`: the states at those times, shape `[len(ts), *y0.shape]`. After a failed solve
      (only returned with `throw=False`) the outputs that were not reached are NaN.
    - `stats`: a :class:`SolveStats` (function evaluations, accepted/rejected steps, final
      step size). Its backward counts fill in when gradients are computed.
    - `status`: a :class:`Status`; `Status.SUCCESS` unless the solver failed.
    - `message`: what happened and, on failure, what to try.
    - `steps`: every step attempted by the forward solve, as `StepInfo(t, h, accepted)`
      (start time, signed step size, accepted or rejected); empty for the torchdiffeq backend.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), torch.linspace(0, 1, 5), rtol=1e-5, atol=1e-7)
    assert sol.success and sol.ys.shape == (5, 2)
    sol.y_final, sol.stats.nfe_forward, len(sol.steps)
    ```
    """

    ts: Tensor
    ys: Tensor
    stats: SolveStats
    status: Status
    message: str
    steps: List[StepInfo] = field(default_factory=list)

    @property
    def success(self) -> bool:
        """`True` when the solve reached the last output time."""
        return self.status is Status.SUCCESS

    @property
    def y_final(self) -> Tensor:
        """The state at the last output time, `ys[-1]`."""
        return self.ys[-1]
