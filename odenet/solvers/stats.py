"""Solve statistics, counted by odenet around ``f``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional

__all__ = ["SolveStats"]


@dataclass
class SolveStats:
    """What a solve cost, counted by odenet around `f`.

    **Fields:**

    - `nfe_forward`: evaluations of `f` in the forward solve (with the one that picks an adaptive
      solver's first step).
    - `nfe_backward`: evaluations of `f` in the backward pass (adjoint, checkpoint recomputation,
      `f(t_i, y_i)` when gradients flow to `t`), filled in by `loss.backward()`; 0 for
      `gradient="direct"`, whose backward replays the recorded graph.
    - `n_accepted`, `n_rejected`: steps (all accepted on a fixed grid); `None` where the backend
      does not report them. `n_accepted_backward`, `n_rejected_backward`: the adjoint's.
    - `final_step`: the signed step size proposed after the last step (`None` for a per-sample solve).
    - `n_accepted_per_sample`, `n_rejected_per_sample`: with `Adaptive(per_sample=True)`, each
      sample's steps (lists; `n_accepted`/`n_rejected` are then their sums); else `None`.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver="rk4", steps=5)
    assert sol.stats.nfe_forward == 20 and sol.stats.as_dict()["n_accepted"] == 5
    ```
    """

    nfe_forward: int = 0
    nfe_backward: int = 0
    n_accepted: Optional[int] = 0
    n_rejected: Optional[int] = 0
    n_accepted_backward: int = 0
    n_rejected_backward: int = 0
    final_step: Optional[float] = None
    n_accepted_per_sample: Optional[List[int]] = None
    n_rejected_per_sample: Optional[List[int]] = None

    @property
    def nfe(self) -> int:
        """Total evaluations, forward plus backward."""
        return self.nfe_forward + self.nfe_backward

    def as_dict(self) -> dict:
        """The fields and `nfe` as a plain dict, e.g. for a JSON line."""
        d = asdict(self)
        d["nfe"] = self.nfe
        return d
