"""How a solve ended: a status with a message that says what to do."""

from __future__ import annotations

import enum
import math

__all__ = ["Status", "SolverError"]


class Status(enum.Enum):
    """How a solve ended: `SUCCESS`, `MAX_STEPS`, `STEP_UNDERFLOW` or `NONFINITE`; `message()` says what to try.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: y**2, torch.ones(1), [0.0, 2.0], min_step=1e-3, throw=False)
    sol.status is odenet.Status.STEP_UNDERFLOW, sol.message
    ```
    """

    SUCCESS = "success"
    MAX_STEPS = "max_steps_reached"
    STEP_UNDERFLOW = "step_size_underflow"
    NONFINITE = "nonfinite_state"

    def message(self, t: float = float("nan"), h: float = float("nan"), max_steps: int = 0, min_step=None,
                fixed: bool = False) -> str:
        """What happened and what to try, with the time `t`, step size `h` (left out when NaN) and
        limits filled in; `fixed`: a fixed-step solve, which checks finiteness only at its end."""
        if self is Status.SUCCESS:  # first: every successful solve asks
            return "The solve succeeded."
        at = f" at t={t:.6g}" if math.isfinite(t) else ""
        if self is Status.MAX_STEPS:
            size = f" with step size {h:.3g}" if math.isfinite(h) else ""
            return (
                f"The maximum number of solver steps (max_steps={max_steps}) was reached{at}{size}. "
                "Increase max_steps=, loosen rtol/atol, or check whether the "
                "dynamics have become stiff or fast (regularise f, e.g. with weight decay or a kinetic "
                "energy penalty)."
            )
        if self is Status.STEP_UNDERFLOW:
            limit = f"min_step={min_step:.3g}" if min_step else "the floating-point resolution of t"
            size = f" to {abs(h):.3g}" if math.isfinite(h) else ""  # a size: unsigned
            return (
                f"The step size fell{size}{at}, below {limit}. The problem is probably "
                "stiff or f blows up near this t: loosen rtol/atol, lower min_step, use float64, or "
                "check f for a singularity."
            )
        if self is Status.NONFINITE:
            if fixed:
                where = (f" by t={t:.6g} (a fixed-step solve checks once, at its end, so it may have "
                         "happened at any earlier step)") if math.isfinite(t) else ""
            else:
                where = f" near t={t:.6g}" if math.isfinite(t) else ""
            return (
                f"The state or f(t, y) became non-finite (NaN or inf){where}. Check y0 and f's "
                "parameters for NaN/inf, lower the learning rate or clip gradients, use a smaller "
                "first_step or tighter tolerances, or use float64."
            )
        raise AssertionError(self)  # pragma: no cover


class SolverError(RuntimeError):
    """The solver failed: maximum steps reached, step size underflow, or a non-finite state.

    The message says what to try; `throw=False` returns the partial `Solution` instead.

    **Arguments:**

    - `message`: the explanation (usually `status.message(...)`).
    - `status`, `stats`, `solution`: kept as attributes: the `Status`, the partial `SolveStats`
      and the partial `Solution` (`None` when the adjoint's backward pass failed).

    **Example:**

    ```python
    try:
        odenet.odeint(lambda t, y: y**2, torch.ones(1), [0.0, 2.0], max_steps=20)
    except odenet.SolverError as err:
        assert err.status is odenet.Status.MAX_STEPS and err.solution is not None
    ```
    """

    def __init__(self, message: str, status: Status, stats=None, solution=None):
        super().__init__(message)
        self.status = status
        self.stats = stats
        self.solution = solution
