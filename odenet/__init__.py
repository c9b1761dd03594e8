"""odenet: continuous-depth neural networks. One dynamics module `f`, run as a ResNet or as an ODE."""

from importlib.metadata import PackageNotFoundError, version as _version

from . import measure, plotting, solvers
from .augment import Augment
from .regularization import RNODE
from .blocks import ODEBlock, ResBlock
from .swap import swap_blocks, swap_report
from .gradients import Adjoint, Checkpoint, Direct
from .solvers.control import Adaptive, Fixed
from .dynamics import ConvDynamics, MLPDynamics, PreActBasicDynamics, PreActBottleneckDynamics
from .odeint import odeint
from .transformer import TransformerDynamics
from .solution import Solution, SolveStats, SolverError, Status
from .citation import citation
from . import compat, events

try:
    __version__ = _version("odenet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

#: Names accepted as ``solver=`` (fixed-step: euler, midpoint, heun, rk4; adaptive: bosh3, dopri5, tsit5, dopri8).
SOLVERS = tuple(solvers.SOLVERS)

__all__ = [
    "__version__",
    "SOLVERS",
    "odeint",
    "Fixed",
    "Adaptive",
    "Direct",
    "Adjoint",
    "Checkpoint",
    "Solution",
    "SolveStats",
    "SolverError",
    "Status",
    "ResBlock",
    "ODEBlock",
    "swap_blocks",
    "swap_report",
    "MLPDynamics",
    "ConvDynamics",
    "PreActBasicDynamics",
    "PreActBottleneckDynamics",
    "TransformerDynamics",
    "solvers",
    "Augment",
    "RNODE",
    "plotting",
    "measure",
    "citation",
    "compat",
    "events",
]
