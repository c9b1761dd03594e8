"""Floor 1: Butcher tableaus, the explicit Runge–Kutta step, step-size control and the integrate loop."""

from .control import Adaptive, Fixed
from .controller import PIController
from .integrate import integrate
from .rk import RK4, SOLVERS, Bosh3, Dopri5, Dopri8, Euler, ExplicitRK, Heun, Midpoint, Tsit5, get_solver
from .stats import SolveStats
from .status import SolverError, Status
from .tableau import ButcherTableau

__all__ = [
    "ButcherTableau",
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
    "PIController",
    "Fixed",
    "Adaptive",
    "integrate",
    "SolveStats",
    "Status",
    "SolverError",
]
