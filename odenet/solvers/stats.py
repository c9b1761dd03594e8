"""Solve statistics, counted by odenet around ``f``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

__all__ = ["SolveStats"]


@dataclass
class SolveStats:
    """What a solve cost. Filled in by odenet, never by the user's `f`.

    **Fields:**

    - `nfe_forward`: evaluations of `f` during the forward solve (including the one
      used to pick the first step of an adaptive solver).
    - `nfe_backward`: evaluations of `f` during the backward pass: the adjoint's
      augmented dynamics (each one evaluation plus one vector–Jacobian product of `f`),
      the checkpoint method's recomputation, and `f(t_i, y_i)` at output times when
      gradients flow to `t`. It is 0 for `gradient="direct"`, whose backward replays the
      recorded graph (one vector–Jacobian product per forward evaluation) without
      calling `f`. Updated in place when `loss.backward()` runs.
    - `n_accepted`, `n_rejected`: accepted and rejected steps (all steps are accepted
      for fixed-step solvers). `None` where the backend does not report them.
    - `n_accepted_backward`, `n_rejected_backward`: the same for the adjoint's backward
      solve.
    - `final_step`: the step size proposed after the last accepted step (adaptive) or
      the last step taken (fixed), signed by the direction of integration.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver="rk4", steps=5)
    assert sol.stats.nfe_forward == 20 and sol.stats.n_accepted == 5
    sol.stats.as_dict()
    ```
    """

    nfe_forward: int = 0
    nfe_backward: int = 0
    n_accepted: Optional[int] = 0
    n_rejected: Optional[int] = 0
    n_accepted_backward: int = 0
    n_rejected_backward: int = 0
    final_step: Optional[float] = None

    @property
    def nfe(self) -> int:
        """Total evaluations, forward plus backward."""
        return self.nfe_forward + self.nfe_backward

    def as_dict(self) -> dict:
        """The fields (and `nfe`) as a plain dict, e.g. for a JSON line.

        **Returns:** a `dict` from field name to value, plus `"nfe"`.
        """
        d = asdict(self)
        d["nfe"] = self.nfe
        return d
