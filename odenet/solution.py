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
    """What `odenet.odeint` returns.

    **Fields:**

    - `ts`, `ys`: the output times, as given, and the states there (`[len(ts), *y0.shape]`; NaN
      where a failed solve, returned with `throw=False`, did not reach).
    - `stats`, `status`, `message`: what it cost (`SolveStats`), how it ended, what to try.
    - `steps`: every step the forward solve attempted, `StepInfo(t, h, accepted)`; empty for the
      torchdiffeq backend.

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
    def y_final(self):
        """The state at the last output time: `ys[-1]` (for a tuple or dict state, each leaf's)."""
        if isinstance(self.ys, Tensor):
            return self.ys[-1]
        if isinstance(self.ys, dict):
            return {k: v[-1] for k, v in self.ys.items()}
        leaves = [v[-1] for v in self.ys]
        return type(self.ys)(*leaves) if hasattr(self.ys, "_fields") else type(self.ys)(leaves)
