"""How a solve is set up: solver, step control, gradient method, backend, as one checked object.

:class:`SolveOptions` holds the typed objects and checks that they fit together;
:func:`options_from` turns the flat keyword shorthand (`rtol=`, `steps=`, `gradient="adjoint"`,
...) into exactly those objects.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Mapping, Tuple, Union

from .gradients import GRADIENTS, Adjoint, Checkpoint, Direct, GradientMethod
from .solvers.control import Adaptive, Fixed
from .solvers.rk import SOLVERS, ExplicitRK, get_solver

__all__ = ["SolveOptions", "options_from", "BACKENDS", "SHORTHAND"]

BACKENDS = ("odenet", "torchdiffeq")

#: Defaults of `odeint` for adaptive solvers, the same as torchdiffeq's so that swapping is painless.
DEFAULT_TOL = (1e-7, 1e-9)

#: The flat keywords that build a step control (`Fixed` or `Adaptive`) and an `Adjoint`.
CONTROL_KEYS = (
    "rtol", "atol", "steps", "step_size", "first_step", "min_step", "max_steps", "controller", "norm", "per_sample",
)
ADJOINT_KEYS = ("adjoint_rtol", "adjoint_atol", "adjoint_seminorm")
SHORTHAND = CONTROL_KEYS + ADJOINT_KEYS
_CONTROL_SET, _ADJOINT_SET = frozenset(CONTROL_KEYS), frozenset(ADJOINT_KEYS)

_FIXED_KEYS = ("steps", "step_size")
_FIXED_SOLVERS = ", ".join(repr(n) for n in SOLVERS if not SOLVERS[n]().adaptive)
_ADAPTIVE_SOLVERS = ", ".join(repr(n) for n in SOLVERS if SOLVERS[n]().adaptive)

# odenet names that torchdiffeq spells differently.
_TORCHDIFFEQ_NAMES = {"heun": "heun2"}


@dataclass(frozen=True)
class SolveOptions:
    """A solver with its step control and gradient method, checked to fit together.

    Built by `odenet.odeint` and `odenet.ODEBlock` from their arguments (a block keeps it as
    `block.options`). `solver` is a solver object (or, with `backend="torchdiffeq"`, a method
    name); `control` is `Fixed` for fixed-step solvers and `Adaptive` for adaptive ones.
    """

    solver: Union[ExplicitRK, str]
    control: Union[Fixed, Adaptive]
    gradient: GradientMethod = Direct()
    backend: str = "odenet"
    throw: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown backend {self.backend!r}; choose one of {BACKENDS}.")
        if self.backend == "odenet":
            object.__setattr__(self, "solver", get_solver(self.solver))
        if not isinstance(self.gradient, (Direct, Adjoint, Checkpoint)):
            raise TypeError(
                f"gradient must be odenet.Direct(), odenet.Adjoint(...), odenet.Checkpoint() or one of "
                f"{tuple(GRADIENTS)}, got {self.gradient!r}."
            )
        if not isinstance(self.throw, bool):
            raise TypeError(f"throw must be True or False, got {self.throw!r}.")
        self._check_control()
        if self.backend == "torchdiffeq":
            self._check_torchdiffeq()

    @property
    def solver_name(self) -> str:
        """The solver's name, e.g. `"dopri5"`."""
        return self.solver if isinstance(self.solver, str) else self.solver.name

    @property
    def adaptive(self) -> bool:
        """Whether steps are chosen by error control."""
        return isinstance(self.control, Adaptive)

    def _check_control(self) -> None:
        adaptive = _is_adaptive(self.solver)
        name = self.solver_name
        if not isinstance(self.control, (Fixed, Adaptive)):
            raise TypeError(f"control must be odenet.Fixed(...) or odenet.Adaptive(...), got {self.control!r}.")
        if adaptive and isinstance(self.control, Fixed):
            raise ValueError(
                f"control={self.control!r} was given, but solver {name!r} is adaptive and chooses its own "
                f"steps. Use control=odenet.Adaptive(rtol, atol), or a fixed-step solver ({_FIXED_SOLVERS})."
            )
        if not adaptive and isinstance(self.control, Adaptive):
            raise ValueError(
                f"control={self.control!r} was given, but solver {name!r} takes fixed steps. Use "
                f"control=odenet.Fixed(steps=...), or an adaptive solver ({_ADAPTIVE_SOLVERS})."
            )
        if not adaptive and isinstance(self.gradient, Adjoint) and (self.gradient.rtol or self.gradient.atol):
            raise ValueError(
                "adjoint_rtol/adjoint_atol need an adaptive solver; with a fixed-step solver the adjoint runs "
                f"backward on the same grid (got gradient={self.gradient!r} with solver {name!r})."
            )

    def _check_torchdiffeq(self) -> None:
        if isinstance(self.gradient, Checkpoint):
            raise ValueError("gradient='checkpoint' is odenet's own; use backend='odenet' or gradient='direct'/'adjoint'.")
        if isinstance(self.control, Adaptive) and (self.control.controller or self.control.min_step):
            raise ValueError("controller= and min_step= need backend='odenet' (torchdiffeq has no equivalent).")


def _is_adaptive(solver: Union[ExplicitRK, str]) -> bool:
    if isinstance(solver, ExplicitRK):
        return solver.adaptive
    from torchdiffeq._impl.odeint import SOLVERS as TD_SOLVERS
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

    if solver not in TD_SOLVERS:
        raise ValueError(
            f"Unknown torchdiffeq method {solver!r}. With backend='torchdiffeq' choose one of {sorted(TD_SOLVERS)}."
        )
    cls = TD_SOLVERS[solver]
    return isinstance(cls, type) and issubclass(cls, RKAdaptiveStepsizeODESolver) or solver == "scipy_solver"


def _solver_for(solver, backend: str) -> Union[ExplicitRK, str]:
    if backend != "torchdiffeq":
        return get_solver(solver)
    if not isinstance(solver, str):
        raise TypeError(
            f"backend='torchdiffeq' takes a method name (a string), not {type(solver).__name__}."
        )
    return _TORCHDIFFEQ_NAMES.get(solver, solver)


def check_keywords(owner: str, given, allowed) -> None:
    """An unknown keyword names `owner` and the closest allowed one."""
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{owner} got an unexpected keyword argument {key!r}.{hint} It takes: {', '.join(sorted(allowed))}."
            )


def options_from(
    solver: Union[str, ExplicitRK] = "dopri5",
    control: Union[Fixed, Adaptive, None] = None,
    gradient: Union[str, GradientMethod] = "direct",
    backend: str = "odenet",
    throw: bool = True,
    *,
    default_tol: Tuple[float, float] = DEFAULT_TOL,
    **shorthand,
) -> SolveOptions:
    """Build `SolveOptions` from typed objects or the flat shorthand (keywords from `SHORTHAND`);
    `default_tol` is the `(rtol, atol)` an adaptive solver gets unless given."""
    flat_control, flat_adjoint = _split(shorthand)
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKENDS}.")
    solver = _solver_for(solver, backend)
    if control is None:
        control = _control_from(solver, flat_control, default_tol)
    elif flat_control:
        raise TypeError(
            f"control={control!r} was given together with {_listed(flat_control)}; give the step settings in "
            "one place: inside control=, or as flat keywords without control=."
        )
    return SolveOptions(solver, control, _gradient_from(gradient, flat_adjoint), backend, throw)


def _split(shorthand: dict) -> Tuple[dict, dict]:
    """The flat keywords that were set (not `None`/`False`), as those of the control and of the adjoint."""
    control, adjoint = {}, {}
    for key, value in shorthand.items():
        if key in _CONTROL_SET:
            if value is not None:
                control[key] = value
        elif key in _ADJOINT_SET:
            if value is not None and value is not False:
                adjoint[key] = value
        else:
            check_keywords("options_from", shorthand, SHORTHAND)
    return control, adjoint


def _listed(flat: Mapping) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in flat.items())


def _control_from(solver, flat: dict, default_tol: Tuple[float, float]) -> Union[Fixed, Adaptive]:
    name = solver if isinstance(solver, str) else solver.name
    if _is_adaptive(solver):
        wrong = [k for k in _FIXED_KEYS if k in flat]
        if wrong:
            raise ValueError(
                f"{wrong[0]}= was given, but solver {name!r} is adaptive and chooses its own steps. Use a "
                f"fixed-step solver ({_FIXED_SOLVERS}) for a fixed number of steps, or set rtol/atol (and "
                "first_step/max_steps) instead."
            )
        flat = {"rtol": default_tol[0], "atol": default_tol[1], **flat}
        return Adaptive(**flat)
    wrong = [k for k in flat if k not in _FIXED_KEYS]
    if wrong:
        raise ValueError(
            f"{wrong[0]}= was given, but solver {name!r} takes fixed steps, so error control settings have "
            f"no effect. Give steps= or step_size= for a fixed-step solver, or choose an adaptive solver "
            f"({_ADAPTIVE_SOLVERS}) to use tolerances."
        )
    return Fixed(**flat)


def _gradient_from(gradient, flat: dict) -> GradientMethod:
    if isinstance(gradient, str):
        if gradient not in GRADIENTS:
            raise ValueError(f"Unknown gradient method {gradient!r}; choose one of {tuple(GRADIENTS)}.")
        if flat and gradient != "adjoint":
            raise ValueError(
                f"adjoint_rtol/adjoint_atol/adjoint_seminorm only apply with gradient='adjoint', got "
                f"gradient={gradient!r}."
            )
        if gradient != "adjoint":
            return GRADIENTS[gradient]()
        return Adjoint(flat.get("adjoint_rtol"), flat.get("adjoint_atol"), flat.get("adjoint_seminorm", False))
    if flat:
        raise TypeError(
            f"gradient={gradient!r} was given together with {_listed(flat)}; give the adjoint's settings in "
            "one place: odenet.Adjoint(rtol=..., atol=..., seminorm=...)."
        )
    return gradient
