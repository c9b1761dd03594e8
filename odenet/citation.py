"""BibTeX for odenet and for the methods a block, model or solver uses."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from torch import nn

from .blocks import ODEBlock, ResBlock
from .gradients import Adjoint, Checkpoint, Direct
from .options import SolveOptions
from .residual import ResidualRun
from .solvers.control import Adaptive, Fixed
from .solvers.controller import PIController
from .solvers.rk import SOLVERS, ExplicitRK
from .solvers.tableau import ButcherTableau

__all__ = ["citation"]


def _odenet_entry() -> str:
    from . import __version__

    return (
        "@software{odenet,\n"
        "  title   = {odenet: continuous-depth neural networks in {PyTorch}},\n"
        "  author  = {{The odenet developers}},\n"
        f"  version = {{{__version__}}},\n"
        "  year    = {2026},\n"
        "  note    = {One dynamics module, run as a ResNet or as an ODE, with measurement built in}\n"
        "}"
    )


# key -> (what it is cited for, BibTeX entry)
_ENTRIES: Dict[str, Tuple[str, str]] = {
    "euler1768": (
        "Euler's method",
        "@book{euler1768,\n"
        "  author    = {Euler, Leonhard},\n"
        "  title     = {Institutionum calculi integralis},\n"
        "  publisher = {Impensis Academiae Imperialis Scientiarum},\n"
        "  address   = {St. Petersburg},\n"
        "  year      = {1768}\n"
        "}",
    ),
    "runge1895": (
        "the explicit midpoint method (Runge 1895)",
        "@article{runge1895,\n"
        "  author  = {Runge, Carl},\n"
        "  title   = {{\\\"U}ber die numerische {A}ufl{\\\"o}sung von {D}ifferentialgleichungen},\n"
        "  journal = {Mathematische Annalen},\n"
        "  volume  = {46},\n"
        "  number  = {2},\n"
        "  pages   = {167--178},\n"
        "  year    = {1895},\n"
        "  doi     = {10.1007/BF01446807}\n"
        "}",
    ),
    "heun1900": (
        "Heun's method (Heun 1900)",
        "@article{heun1900,\n"
        "  author  = {Heun, Karl},\n"
        "  title   = {Neue {M}ethode zur approximativen {I}ntegration der {D}ifferentialgleichungen "
        "einer unabh{\\\"a}ngigen {V}er{\\\"a}nderlichen},\n"
        "  journal = {Zeitschrift f{\\\"u}r Mathematik und Physik},\n"
        "  volume  = {45},\n"
        "  pages   = {23--38},\n"
        "  year    = {1900}\n"
        "}",
    ),
    "kutta1901": (
        "the classical Runge–Kutta method RK4 (Kutta 1901)",
        "@article{kutta1901,\n"
        "  author  = {Kutta, Wilhelm},\n"
        "  title   = {Beitrag zur n{\\\"a}herungsweisen {I}ntegration totaler {D}ifferentialgleichungen},\n"
        "  journal = {Zeitschrift f{\\\"u}r Mathematik und Physik},\n"
        "  volume  = {46},\n"
        "  pages   = {435--453},\n"
        "  year    = {1901}\n"
        "}",
    ),
    "bogacki1989": (
        "the Bogacki–Shampine 3(2) pair (bosh3)",
        "@article{bogacki1989,\n"
        "  author  = {Bogacki, Przemys{\\l}aw and Shampine, Lawrence F.},\n"
        "  title   = {A 3(2) pair of {R}unge--{K}utta formulas},\n"
        "  journal = {Applied Mathematics Letters},\n"
        "  volume  = {2},\n"
        "  number  = {4},\n"
        "  pages   = {321--325},\n"
        "  year    = {1989},\n"
        "  doi     = {10.1016/0893-9659(89)90079-7}\n"
        "}",
    ),
    "dormand1980": (
        "the Dormand–Prince 5(4) pair (dopri5)",
        "@article{dormand1980,\n"
        "  author  = {Dormand, John R. and Prince, Peter J.},\n"
        "  title   = {A family of embedded {R}unge--{K}utta formulae},\n"
        "  journal = {Journal of Computational and Applied Mathematics},\n"
        "  volume  = {6},\n"
        "  number  = {1},\n"
        "  pages   = {19--26},\n"
        "  year    = {1980},\n"
        "  doi     = {10.1016/0771-050X(80)90013-3}\n"
        "}",
    ),
    "shampine1986": (
        "the dense output of dopri5 (Shampine 1986)",
        "@article{shampine1986,\n"
        "  author  = {Shampine, Lawrence F.},\n"
        "  title   = {Some practical {R}unge--{K}utta formulas},\n"
        "  journal = {Mathematics of Computation},\n"
        "  volume  = {46},\n"
        "  number  = {173},\n"
        "  pages   = {135--150},\n"
        "  year    = {1986},\n"
        "  doi     = {10.1090/S0025-5718-1986-0815836-3}\n"
        "}",
    ),
    "tsitouras2011": (
        "the Tsitouras 5(4) pair (tsit5)",
        "@article{tsitouras2011,\n"
        "  author  = {Tsitouras, Charalampos},\n"
        "  title   = {{R}unge--{K}utta pairs of order 5(4) satisfying only the first column simplifying assumption},\n"
        "  journal = {Computers \\& Mathematics with Applications},\n"
        "  volume  = {62},\n"
        "  number  = {2},\n"
        "  pages   = {770--775},\n"
        "  year    = {2011},\n"
        "  doi     = {10.1016/j.camwa.2011.06.002}\n"
        "}",
    ),
    "hairer1993": (
        "the Dormand–Prince 8(5,3) method DOP853 (dopri8)",
        "@book{hairer1993,\n"
        "  author    = {Hairer, Ernst and N{\\o}rsett, Syvert P. and Wanner, Gerhard},\n"
        "  title     = {Solving Ordinary Differential Equations {I}: Nonstiff Problems},\n"
        "  edition   = {2},\n"
        "  series    = {Springer Series in Computational Mathematics},\n"
        "  volume    = {8},\n"
        "  publisher = {Springer},\n"
        "  address   = {Berlin},\n"
        "  year      = {1993},\n"
        "  doi       = {10.1007/978-3-540-78862-1}\n"
        "}",
    ),
    "gustafsson1991": (
        "the PI step-size controller (Gustafsson 1991)",
        "@article{gustafsson1991,\n"
        "  author  = {Gustafsson, Kjell},\n"
        "  title   = {Control theoretic techniques for stepsize selection in explicit {R}unge--{K}utta methods},\n"
        "  journal = {ACM Transactions on Mathematical Software},\n"
        "  volume  = {17},\n"
        "  number  = {4},\n"
        "  pages   = {533--554},\n"
        "  year    = {1991},\n"
        "  doi     = {10.1145/210232.210242}\n"
        "}",
    ),
    "he2016": (
        "residual networks (He et al. 2016)",
        "@inproceedings{he2016,\n"
        "  author    = {He, Kaiming and Zhang, Xiangyu and Ren, Shaoqing and Sun, Jian},\n"
        "  title     = {Deep residual learning for image recognition},\n"
        "  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},\n"
        "  pages     = {770--778},\n"
        "  year      = {2016},\n"
        "  doi       = {10.1109/CVPR.2016.90}\n"
        "}",
    ),
    "chen2018": (
        "neural ODEs and the continuous adjoint (Chen et al. 2018)",
        "@inproceedings{chen2018,\n"
        "  author    = {Chen, Ricky T. Q. and Rubanova, Yulia and Bettencourt, Jesse and Duvenaud, David},\n"
        "  title     = {Neural ordinary differential equations},\n"
        "  booktitle = {Advances in Neural Information Processing Systems},\n"
        "  volume    = {31},\n"
        "  year      = {2018}\n"
        "}",
    ),
    "kidger2021": (
        "seminorms for the adjoint (Kidger et al. 2021)",
        "@inproceedings{kidger2021,\n"
        "  author    = {Kidger, Patrick and Chen, Ricky T. Q. and Lyons, Terry J.},\n"
        "  title     = {``{H}ey, that's not an {ODE}'': Faster {ODE} adjoints via seminorms},\n"
        "  booktitle = {Proceedings of the 38th International Conference on Machine Learning},\n"
        "  series    = {Proceedings of Machine Learning Research},\n"
        "  volume    = {139},\n"
        "  pages     = {5443--5452},\n"
        "  year      = {2021}\n"
        "}",
    ),
    "gholami2019": (
        "checkpointed (discretise-then-optimise) gradients (Gholami et al. 2019)",
        "@inproceedings{gholami2019,\n"
        "  author    = {Gholami, Amir and Keutzer, Kurt and Biros, George},\n"
        "  title     = {{ANODE}: Unconditionally accurate memory-efficient gradients for neural {ODE}s},\n"
        "  booktitle = {Proceedings of the 28th International Joint Conference on Artificial Intelligence (IJCAI)},\n"
        "  pages     = {730--736},\n"
        "  year      = {2019},\n"
        "  doi       = {10.24963/ijcai.2019/103}\n"
        "}",
    ),
    "dupont2019": (
        "augmented neural ODEs, odenet.Augment (Dupont et al. 2019)",
        "@inproceedings{dupont2019,\n"
        "  author    = {Dupont, Emilien and Doucet, Arnaud and Teh, Yee Whye},\n"
        "  title     = {Augmented neural {ODE}s},\n"
        "  booktitle = {Advances in Neural Information Processing Systems},\n"
        "  volume    = {32},\n"
        "  year      = {2019}\n"
        "}",
    ),
    "finlay2020": (
        "kinetic and Jacobian regularisation, odenet.RNODE (Finlay et al. 2020)",
        "@inproceedings{finlay2020,\n"
        "  author    = {Finlay, Chris and Jacobsen, J{\\\"o}rn-Henrik and Nurbekyan, Levon and Oberman, Adam M.},\n"
        "  title     = {How to train your neural {ODE}: the world of {J}acobian and kinetic regularization},\n"
        "  booktitle = {Proceedings of the 37th International Conference on Machine Learning},\n"
        "  series    = {Proceedings of Machine Learning Research},\n"
        "  volume    = {119},\n"
        "  pages     = {3154--3164},\n"
        "  year      = {2020}\n"
        "}",
    ),
}

# Built-in tableau name -> the entries that describe it.
_TABLEAU_KEYS: Dict[str, Tuple[str, ...]] = {
    "euler": ("euler1768",),
    "midpoint": ("runge1895",),
    "heun": ("heun1900",),
    "rk4": ("kutta1901",),
    "bosh3": ("bogacki1989",),
    "dopri5": ("dormand1980", "shampine1986"),
    "tsit5": ("tsitouras2011",),
    "dopri8": ("hairer1993",),
}

# Method names accepted by the torchdiffeq backend that map onto a built-in tableau.
_TORCHDIFFEQ_ALIASES = {"heun2": "heun", "heun3": None, "explicit_adams": None, "implicit_adams": None}


class _Collector:
    """Entries in the order they are first needed, each once, with the reasons it is cited."""

    def __init__(self):
        self.keys: List[str] = []
        self.reasons: Dict[str, List[str]] = {}
        self.notes: List[str] = []

    def add(self, key: str, reason: str) -> None:
        if key not in self.reasons:
            self.keys.append(key)
            self.reasons[key] = []
        if reason not in self.reasons[key]:
            self.reasons[key].append(reason)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def _add_tableau(
    c: _Collector, tableau: ButcherTableau, adaptive: bool, where: str, controller: Optional[PIController] = None
) -> None:
    keys = _TABLEAU_KEYS.get(tableau.name)
    builtin = SOLVERS.get(tableau.name)
    if keys is not None and builtin is not None and builtin.TABLEAU == tableau:
        for key in keys:
            c.add(key, f"solver={tableau.name!r}{where}")
    else:
        ref = tableau.reference or "no reference given in its ButcherTableau"
        c.note(f"custom tableau {tableau.name!r}{where}: {ref}")
    if adaptive and (controller is None or controller.pcoeff != 0):
        # The default controller is a PI one; a pure integral controller (pcoeff=0) is not cited.
        c.add("gustafsson1991", f"adaptive solver={tableau.name!r}{where}")


def _add_solver_name(
    c: _Collector, name: str, where: str = "", backend: str = "odenet", controller: Optional[PIController] = None
) -> None:
    key = name.lower()
    if backend == "torchdiffeq":
        key = _TORCHDIFFEQ_ALIASES.get(key, key) or ""
        c.add("chen2018", f"backend='torchdiffeq'{where}")
    if key in SOLVERS:
        solver = SOLVERS[key]()
        _add_tableau(c, solver.tableau, solver.adaptive and backend == "odenet", where, controller)
    elif backend == "torchdiffeq":
        c.note(f"torchdiffeq method {name!r}{where}: see torchdiffeq's documentation for its reference")
    else:
        raise ValueError(
            f"citation() does not know the solver name {name!r}; give one of {sorted(SOLVERS)} "
            "(odenet.SOLVERS), a block, a model, or a solver object."
        )


def _add_options(c: _Collector, opts: SolveOptions, where: str = "") -> None:
    controller = opts.control.controller if isinstance(opts.control, Adaptive) else None
    if isinstance(opts.solver, ExplicitRK):
        _add_tableau(c, opts.solver.tableau, opts.solver.adaptive, where, controller)
    else:
        _add_solver_name(c, opts.solver, where, backend=opts.backend, controller=controller)
    _add_gradient(c, opts.gradient, where)


def _add_gradient(c: _Collector, gradient, where: str) -> None:
    if isinstance(gradient, Adjoint):
        c.add("chen2018", f"gradient='adjoint'{where}")
        if gradient.seminorm:
            c.add("kidger2021", f"adjoint_seminorm=True{where}")
    elif isinstance(gradient, Checkpoint):
        c.add("gholami2019", f"gradient='checkpoint'{where}")


def _is_named(obj, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(obj).__mro__)


def _add_rnode(c: _Collector, reg, where: str) -> None:
    if reg is not None and _is_named(reg, "RNODE"):
        c.add("finlay2020", f"regularization=RNODE(...){where}")


def _walk(c: _Collector, obj, where: str = "") -> None:
    if obj is None:
        return
    if isinstance(obj, str):
        _add_solver_name(c, obj, where)
    elif isinstance(obj, ButcherTableau):
        _add_tableau(c, obj, obj.adaptive, where)
    elif isinstance(obj, ExplicitRK):
        _add_tableau(c, obj.tableau, obj.adaptive, where)
    elif isinstance(obj, SolveOptions):
        _add_options(c, obj, where)
    elif isinstance(obj, PIController):
        if obj.pcoeff != 0:
            c.add("gustafsson1991", f"PIController{where}")
    elif isinstance(obj, (Direct, Adjoint, Checkpoint)):
        _add_gradient(c, obj, where)
    elif isinstance(obj, Adaptive):
        if obj.controller is None or obj.controller.pcoeff != 0:
            c.add("gustafsson1991", f"Adaptive (PI step-size control){where}")
    elif isinstance(obj, Fixed):
        return  # a grid: nothing to cite
    elif _is_named(obj, "RNODE"):
        _add_rnode(c, obj, where)
    elif isinstance(obj, nn.Module):
        for name, module in obj.named_modules():
            here = f" (module {name!r})" if name else where
            if isinstance(module, (ODEBlock, ResidualRun)):
                _add_options(c, module.options, here)
                _add_rnode(c, getattr(module, "regularization", None), here)
            elif isinstance(module, ResBlock):
                c.add("he2016", f"ResBlock{here}")
                c.add("euler1768", f"ResBlock{here} (one Euler step)")
            elif _is_named(module, "Augment"):
                c.add("dupont2019", f"Augment{here}")
            else:
                # Anything else carrying an RNODE setting (e.g. a model holding the weights).
                for attr in ("regularization", "rnode"):
                    _add_rnode(c, getattr(module, attr, None), here)
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            _walk(c, item, where)
    else:
        raise TypeError(
            "citation() takes a block or model (an nn.Module), a solver name, an odenet.solvers.ExplicitRK, "
            f"a ButcherTableau, a PIController, an RNODE, or a list of these; got {type(obj).__name__}."
        )


def citation(obj=None, *, file=None) -> str:
    """Print and return BibTeX for odenet and for the methods `obj` uses, each after a `%` comment
    saying why: the solvers' Runge–Kutta papers, the PI controller, adjoint, seminorm and
    checkpoint gradients, `ResBlock`, `Augment` and `RNODE`; a custom tableau with its `reference`.

    **Arguments:**

    - `obj`: a block or a model (its modules are walked), a solver name, an `ExplicitRK`, a
      `ButcherTableau`, a `PIController`, a typed option (`Adaptive`, `Adjoint`, ...), an
      `RNODE`, a list of these, or `None` (odenet alone).
    - `file`: where to print (default `sys.stdout`).

    **Returns:** the BibTeX text.

    **Raises:** `ValueError` for an unknown solver name; `TypeError` for an object it cannot inspect.

    **Example:**

    ```python
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2), solver="dopri5", gradient="adjoint")
    bibtex = odenet.citation(block)   # odenet, Dormand–Prince, Shampine, Gustafsson, Chen et al.
    ```
    """
    c = _Collector()
    _walk(c, obj)
    from . import __version__

    parts = [f"% odenet {__version__}: please cite odenet and the methods you use.", _odenet_entry()]
    for key in c.keys:
        what, entry = _ENTRIES[key]
        parts.append(f"% {what}; used by: {', '.join(c.reasons[key])}\n{entry}")
    for text in c.notes:
        parts.append(f"% {text}")
    out = "\n\n".join(parts) + "\n"
    print(out, end="", file=file)
    return out


def _keys_for(obj) -> List[str]:
    """The citation keys `citation(obj)` would print after odenet's (for tests)."""
    c = _Collector()
    _walk(c, obj)
    return list(c.keys)

