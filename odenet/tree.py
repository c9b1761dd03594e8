"""Tuple and dict states: one flat vector inside the solve, the user's structure at its edges.

A state `y0` that is a tuple, list or dict of tensors (one level, as torchdiffeq's tuples) is
flattened into one vector by :class:`TreeSpec`; :class:`TreeFunc` hands `f` the structure and
flattens what it returns. Each step's error is measured as torchdiffeq measures a tuple state:
the largest RMS norm over the leaves (:func:`mixed_norm`), with tolerances per leaf
(:class:`LeafTolerances`).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .solvers.control import NORMS, positive, rms_norm
from .solvers.rk import ExplicitRK, StepResult, without_grad

__all__ = ["TreeSpec", "TreeFunc", "LeafTolerances", "NormedRK", "mixed_norm", "structured_norm",
           "leaf_tolerances", "split_tolerances", "structured_options"]

Tree = Union[tuple, list, dict]


def _leaves(tree) -> list:
    return list(tree.values()) if isinstance(tree, dict) else list(tree)


@dataclass(frozen=True)
class TreeSpec:
    """The structure of a tuple, list or dict state: its type, keys, and each leaf's shape."""

    kind: type
    keys: tuple
    shapes: Tuple[torch.Size, ...]

    @classmethod
    def of(cls, y0: Tree) -> "TreeSpec":
        """The structure of `y0`, checked: floating-point tensors of one dtype and one device."""
        keys = tuple(y0.keys()) if isinstance(y0, dict) else tuple(range(len(y0)))
        if not keys:
            raise ValueError(f"y0 is an empty {type(y0).__name__}; give at least one tensor.")
        spec = cls(type(y0), keys, ())
        leaves = _leaves(y0)
        for key, leaf in zip(keys, leaves):
            spec._check_leaf(key, leaf, leaves[0])
        object.__setattr__(spec, "shapes", tuple(leaf.shape for leaf in leaves))
        return spec

    def _check_leaf(self, key, leaf, first) -> None:
        name = self.label(key)
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{name} must be a tensor, got {type(leaf).__name__}: a state is a tensor or one tuple, list or "
                "dict of tensors (not nested); flatten nested parts into one level."
            )
        if not leaf.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {leaf.dtype}; use .float() or .double().")
        if leaf.dtype != first.dtype:
            raise TypeError(
                f"The leaves of y0 must share one dtype, but {self.label(self.keys[0])} is {first.dtype} and {name} "
                f"is {leaf.dtype}. Cast them to one: .to({first.dtype})."
            )
        if leaf.device != first.device:
            raise ValueError(
                f"The leaves of y0 must be on one device, but {self.label(self.keys[0])} is on {first.device} and "
                f"{name} on {leaf.device}. Move them to one: .to({str(first.device)!r})."
            )

    def label(self, key, name: str = "y0") -> str:
        """How messages name a leaf: `y0[1]`, `y0['v']`."""
        return f"{name}[{key!r}]"

    @property
    def is_dict(self) -> bool:
        """Whether the state is a dict (else a tuple or list)."""
        return issubclass(self.kind, dict)

    @property
    def numel(self) -> int:
        """Elements in the flat state."""
        return sum(s.numel() for s in self.shapes)

    def build(self, leaves) -> Tree:
        """The structure with `leaves` in order."""
        if self.is_dict:
            return self.kind(zip(self.keys, leaves))
        if hasattr(self.kind, "_make"):  # a NamedTuple
            return self.kind._make(leaves)
        return self.kind(leaves)

    def flatten(self, tree: Tree) -> Tensor:
        """One vector of the leaves, in order."""
        return torch.cat([leaf.reshape(-1) for leaf in _leaves(tree)])

    def unflatten(self, flat: Tensor, lead: tuple = ()) -> Tree:
        """The structure of views into `flat` (with leading dimensions `lead`)."""
        out, start = [], 0
        for shape in self.shapes:
            n = shape.numel()
            out.append(flat[..., start : start + n].view((*lead, *shape)))  # a tuple: () for a scalar
            start += n
        return self.build(out)

    def check_output(self, out, name: str) -> None:
        """`f`'s output has the state's structure, and each leaf its shape (the dtype is checked flat)."""
        same = isinstance(out, dict) if self.is_dict else isinstance(out, (tuple, list))
        keys = tuple(out.keys()) if isinstance(out, dict) else tuple(range(len(out))) if same else None
        if not same or keys != self.keys:
            raise TypeError(
                f"f must return dy/dt with the state's structure, a {self.kind.__name__} with keys {list(self.keys)}, "
                f"but {name} returned {type(out).__name__}"
                + (f" with keys {list(keys)}." if keys is not None else ".")
            )
        for key, leaf, shape in zip(self.keys, _leaves(out), self.shapes):
            if not isinstance(leaf, Tensor) or leaf.shape != shape:
                got = f"shape {tuple(leaf.shape)}" if isinstance(leaf, Tensor) else type(leaf).__name__
                raise ValueError(
                    f"f must return {self.label(key, 'dy')} with shape {tuple(shape)}, but {name} returned {got}."
                )


class TreeFunc(nn.Module):
    """`f` on a structured state as a function of the flat vector: `f(t, y)` gets the structure
    (views of the flat state) and its output is flattened; its first output is checked."""

    def __init__(self, f: Callable, spec: TreeSpec):
        super().__init__()
        self.f = f  # registered as a submodule when it is one: parameters() are f's
        self.spec = spec
        self.training = bool(getattr(f, "training", False))
        self._checked = False
        # The user's f, which messages name and whose signature is checked (not a second submodule).
        object.__setattr__(self, "__wrapped__", f)

    def forward(self, t: Tensor, y: Tensor, **context) -> Tensor:
        out = self.f(t, self.spec.unflatten(y), **context)
        if not self._checked:
            name = getattr(self.f, "__qualname__", None) or type(self.f).__name__
            self.spec.check_output(out, name)
            self._checked = True
        return self.spec.flatten(out)


def mixed_norm(tree) -> Tensor:
    """torchdiffeq's norm of a tuple state: the largest RMS norm over its leaves."""
    return torch.stack([rms_norm(leaf) for leaf in _leaves(tree)]).max()


def structured_norm(norm, spec: TreeSpec) -> Callable[[Tensor], Tensor]:
    """`Adaptive.norm` for the flat vector of a structured state: `"rms"` is torchdiffeq's
    :func:`mixed_norm` over the leaves, `"max"` the largest magnitude, a callable gets the structure."""
    if norm == "max":
        return NORMS["max"]
    tree_norm = mixed_norm if norm == "rms" else norm
    return lambda flat: tree_norm(spec.unflatten(flat))


def _number(name: str, tol) -> float:
    if isinstance(tol, Tensor) and tol.numel() == 1:
        tol = tol.item()
    return positive(name, tol, allow_none=False)


def leaf_tolerances(name: str, tol, spec: TreeSpec) -> Tuple[float, ...]:
    """`tol` (a number, or one per leaf in the state's structure) as one float per leaf."""
    if isinstance(tol, numbers.Real) or isinstance(tol, Tensor) and tol.numel() == 1:
        return (_number(name, tol),) * len(spec.keys)
    keys = None
    if isinstance(tol, dict) if spec.is_dict else isinstance(tol, (tuple, list)):
        keys = tuple(tol.keys()) if spec.is_dict else tuple(range(len(tol)))
    if keys != spec.keys:
        raise TypeError(
            f"{name} must be a number or one number per leaf of y0 (a {spec.kind.__name__} with keys "
            f"{list(spec.keys)}), got {tol!r}."
        )
    return tuple(_number(f"{name} of {spec.label(k)}", v) for k, v in zip(keys, _leaves(tol)))


def split_tolerances(y0: Tree, rtol, atol) -> Tuple[float, float, Optional["LeafTolerances"]]:
    """`rtol`, `atol` for a structured `y0`, each a number or one per leaf: the control's (the
    smallest per-leaf value) and the per-leaf ones (`None` when both are numbers)."""
    per_leaf = [isinstance(tol, (tuple, list, dict)) for tol in (rtol, atol)]
    if not any(per_leaf):
        return rtol, atol, None
    spec = TreeSpec.of(y0)
    r, a = (leaf_tolerances(n, tol, spec) if p else None for n, tol, p in zip(("rtol", "atol"), (rtol, atol), per_leaf))
    return min(r) if r else rtol, min(a) if a else atol, LeafTolerances(r, a)


@dataclass(frozen=True)
class LeafTolerances:
    """Tolerances per leaf of a structured state, one float each (`None`: the control's)."""

    rtol: Optional[Tuple[float, ...]] = None
    atol: Optional[Tuple[float, ...]] = None

    def vectors(self, spec: TreeSpec, y0: Tensor, rtol: float, atol: float):
        """`(rtol, atol)`, each the control's float, or a vector over the flat state."""
        return _per_element(self.rtol, rtol, spec, y0), _per_element(self.atol, atol, spec, y0)


def _per_element(own, default: float, spec: TreeSpec, y0: Tensor):
    if own is None:
        return default
    return torch.cat([torch.full((s.numel(),), v, dtype=y0.dtype, device=y0.device) for v, s in zip(own, spec.shapes)])


def structured_options(opts, spec: TreeSpec, y0: Tensor, tol: Optional[LeafTolerances]):
    """`opts` (a `SolveOptions`) for the flat vector of an adaptive solve of a structured state:
    its norm over the structure and, with `tol`, per-leaf tolerances (a :class:`NormedRK`)."""
    control, solver = opts.control, opts.solver
    norm = structured_norm(control.norm, spec)
    if tol is None:
        return dataclasses.replace(opts, control=dataclasses.replace(control, norm=norm))
    rtol, atol = tol.vectors(spec, y0, control.rtol, control.atol)
    solver = NormedRK(solver, norm, rtol, atol, (control.rtol, control.atol), y0.numel())
    return dataclasses.replace(opts, solver=solver, control=dataclasses.replace(control, norm="rms"))


class NormedRK(ExplicitRK):
    """`solver` with each step's error measured by `norm` (of the error scaled by `rtol`, `atol`,
    floats or per-element vectors). The loop reads the RMS norm of the error scaled by its own
    tolerances `loop_tol`, so the error is handed on as that scale times the measured norm,
    which the loop reads back exactly. A state of another size (the adjoint's) is left to the loop."""

    def __init__(self, solver: ExplicitRK, norm: Callable, rtol, atol, loop_tol: Tuple[float, float], numel: int):
        super().__init__(solver.tableau, solver.adaptive)
        self.solver, self.norm, self.rtol, self.atol = solver, norm, rtol, atol
        self.loop_tol, self.numel = loop_tol, numel

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"NormedRK({self.solver!r})"

    def step(self, f, t, y, h, k1=None, with_error=True, last_stage=True, times=None) -> StepResult:
        """The wrapped solver's step, its error rescaled as above."""
        res = self.solver.step(f, t, y, h, k1, with_error, last_stage, times)
        if res.error is None or y.numel() != self.numel:
            return res
        return res._replace(error=without_grad(self._rescaled, y, res))

    def _rescaled(self, y: Tensor, res: StepResult) -> Tensor:
        big = torch.maximum(y.abs(), res.y1.abs())
        ratio = self.norm(res.error / (big * self.rtol + self.atol))
        return big.mul_(self.loop_tol[0]).add_(self.loop_tol[1]).mul_(ratio)

    def interpolate(self, y0: Tensor, h: float, ks, theta: float) -> Tensor:
        """The wrapped solver's dense output."""
        return self.solver.interpolate(y0, h, ks, theta)
