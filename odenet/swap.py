"""Converting the residual blocks of a model: :func:`swap_blocks` and :func:`swap_report`."""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple, Type, Union

from torch import nn

from .blocks import _BLOCK_KEYWORDS, ODEBlock, ResBlock, _check_keywords, block_options
from .gradients import Adjoint
from .options import ADJOINT_KEYS, CONTROL_KEYS, SolveOptions
from .residual import Branches, ResidualRun
from .solvers.control import Adaptive, Fixed
from .solvers.rk import ExplicitRK

__all__ = ["swap_blocks", "swap_report"]

Selector = Union[Type[nn.Module], Tuple[Type[nn.Module], ...], Callable[[str, nn.Module], bool]]


def _interval(block: nn.Module):
    if isinstance(block, ResBlock):
        return block.t, block.t + block.h
    return block.interval  # numbers: a learnable t1 at its current value


def swap_blocks(
    model: nn.Module,
    solver: Union[str, ExplicitRK] = "dopri5",
    *,
    select: Optional[Selector] = None,
    branches: Optional[Branches] = None,
    merge: bool = False,
    strict: bool = True,
    **kwargs,
) -> nn.Module:
    """Turn the residual blocks of `model` into ODE blocks of the given kind, and back, keeping their parameters.

    Without `select`, odenet's own blocks are converted: each `ResBlock`, `ODEBlock` and
    converted run keeps its interval (`ResBlock(f, h, t)` covers `[t, t + h]`) and its `f`;
    `solver="euler", steps=1` (and nothing else) gives `ResBlock`s, anything else `ODEBlock`s.
    An existing block keeps every setting the call does not pass (gradient method,
    tolerances, `max_steps`, regularization, ...; a step control of the other kind than the
    new solver's is replaced by that solver's default).

    With `select`, blocks of any model are converted without editing their classes: each
    selected block is read as `x + F_1(x)`, then `+ F_2(...)`, ... with its sub-layers
    `branches(block)`, one Lie–Trotter split Euler step of `dx/dt = F_1 + F_2 + ...` over one
    unit of depth (see `odenet.residual`). With `solver="euler"` and no `steps` the model
    computes what it computed before; other solvers integrate the unsplit field. Blocks that
    change the state's shape stay discrete; the first forward checks every other block
    against its residual form and raises a `ValueError` naming it where they differ.
    `odenet.swap_report(model)` says what was converted, merged and left discrete, and why.

    New blocks keep the training/eval mode of what they replace. The model is changed in place
    and returned (or the new block, if `model` is one of odenet's blocks).

    **Arguments:**

    - `model`: any `nn.Module` (searched recursively).
    - `solver`: the new blocks' solver, as in `ODEBlock`.
    - `select`: a block class, a tuple of classes, or a predicate `select(name, module)`.
    - `branches`: `branches(block)` returns the block's residual sub-layers `(F_1, F_2, ...)`,
      each a function of the state alone (needed with `select`).
    - `merge`: each run of consecutive selected blocks (in an `nn.Sequential` or
      `nn.ModuleList`) becomes one converted module; under an adaptive solver one solve then
      covers the run (block k owns the depth `[k, k + 1]`).
    - `strict`: with `False`, a block whose output differs from its residual form is
      converted by its branches anyway, which drops what lies outside them (e.g. the
      trailing ReLU of a post-activation block) and so changes the function.
    - `**kwargs`: the new blocks' settings (`control`, `gradient`, `backend`, `throw`,
      `regularization`, or the shorthand `steps`, `rtol`, ...), as in `ODEBlock`; for
      selected blocks, `steps` counts per block.

    **Returns:** `model` with its blocks replaced (or the new block).

    **Raises:** `ValueError`/`TypeError` for settings `ODEBlock` would reject, before anything
    is replaced; `ValueError` when `select` selects nothing; `TypeError` for `select` without
    `branches` (or the reverse), or a `model` that is not an `nn.Module`.

    **Example:**

    ```python
    model = nn.Sequential(nn.Linear(4, 2), odenet.ResBlock(odenet.MLPDynamics(2)), nn.Linear(2, 3))
    model = odenet.swap_blocks(model, solver="dopri5", control=odenet.Adaptive(rtol=1e-3, atol=1e-3))
    model = odenet.swap_blocks(model, solver="euler", steps=1)  # and back
    print(odenet.swap_report(model))
    ```
    The tutorial "Your ResNet or transformer as an ODE" converts the blocks of a GPT and of two ResNets.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_blocks needs an nn.Module, got {type(model).__name__}.")
    _check_swap_keywords(kwargs, select, branches, merge, strict)
    if select is None:
        return _swap_own(model, solver, kwargs)
    base = block_options(solver, kwargs.get("control"), kwargs.get("gradient", "direct"), kwargs)  # fails early
    matches = _selector(select)
    found = _swap_foreign(model, "", matches, branches, base, merge, strict)
    if not found:
        raise ValueError(
            f"swap_blocks(select={select!r}) selected no module of {type(model).__name__}: nothing was converted. "
            "Pass the class of the model's residual blocks (or a tuple of classes, or a predicate "
            "select(name, module) -> bool)."
        )
    return model


def _check_swap_keywords(kwargs: dict, select, branches, merge: bool, strict: bool) -> None:
    if "t0" in kwargs or "t1" in kwargs:
        raise TypeError(
            "swap_blocks keeps each block's own interval ([t, t + h] of a ResBlock, [t0, t1] of an "
            "ODEBlock), so it takes no t0/t1; set them on the blocks after swapping."
        )
    _check_keywords("swap_blocks", kwargs, _BLOCK_KEYWORDS - {"t0", "t1"})
    if (select is None) != (branches is None):
        raise TypeError(
            "swap_blocks needs select= and branches= together: select picks the blocks of your model, and "
            "branches(block) returns their residual sub-layers (F_1, F_2, ...), e.g. "
            "branches=lambda b: (lambda x: b.attn(b.ln_1(x)), lambda x: b.mlp(b.ln_2(x)))."
        )
    if select is not None and "regularization" in kwargs:
        raise TypeError("regularization= applies to odenet's own ODEBlocks, not to blocks converted with select=.")
    if select is None and (merge or not strict):
        raise TypeError(
            "merge= and strict= apply to blocks converted with select= and branches=; odenet's own blocks (and "
            "runs converted before) keep how they were made. Pass select= and branches= to convert other blocks."
        )


_OWN = (ResBlock, ODEBlock, ResidualRun)


def _swap_own(model: nn.Module, solver, kwargs: dict) -> nn.Module:
    """odenet's own blocks in `model`, each converted with the settings it keeps; every block's
    new options are checked before any block is replaced."""
    if isinstance(model, _OWN):
        return _convert_own(model, solver, _kept_options(getattr(model, "options", None), solver, kwargs), kwargs)
    targets = list(_own_blocks(model))
    options = [_kept_options(getattr(child, "options", None), solver, kwargs) for _, _, child in targets]
    for (parent, name, child), opts in zip(targets, options):
        setattr(parent, name, _convert_own(child, solver, opts, kwargs))
    return model


def _own_blocks(module: nn.Module):
    """`(parent, name, block)` for each of odenet's blocks below `module` (not looking inside them)."""
    for name, child in module.named_children():
        if isinstance(child, _OWN):
            yield module, name, child
        else:
            yield from _own_blocks(child)


def _convert_own(block: nn.Module, solver, opts: SolveOptions, kwargs: dict) -> nn.Module:
    if isinstance(block, ResidualRun):
        block.options = opts
        return block
    t0, t1 = _interval(block)
    if isinstance(solver, str) and solver == "euler" and opts.control == Fixed(steps=1) and set(kwargs) <= {"steps", "control"}:
        new = ResBlock(block.f, h=t1 - t0, t=t0)
    else:
        reg = kwargs.get("regularization", getattr(block, "regularization", None))
        new = ODEBlock(block.f, opts.solver, t0=t0, t1=t1, control=opts.control, gradient=opts.gradient,
                       backend=opts.backend, throw=opts.throw, regularization=reg)
    # A new module starts in training mode; keep the replaced block's own flag (not train(),
    # which would also reset f's submodules, e.g. a BatchNorm frozen in eval).
    new.training = block.training
    return new


def _kept_options(old: Optional[SolveOptions], solver, kwargs: dict) -> SolveOptions:
    """The options `kwargs` ask for, with every setting they do not pass taken from `old`."""
    if old is None:
        return block_options(solver, kwargs.get("control"), kwargs.get("gradient", "direct"), kwargs)
    settings = {"backend": old.backend, "throw": old.throw, **kwargs}
    gradient = settings.pop("gradient", None) or _kept_gradient(old.gradient, settings)
    control = settings.pop("control", None) or _kept_control(old.control, solver, settings)
    return block_options(solver, control, gradient, settings)


_ADJOINT_FIELDS = {"adjoint_rtol": "rtol", "adjoint_atol": "atol", "adjoint_seminorm": "seminorm"}


def _kept_gradient(old, settings: dict):
    """The old gradient method, with the `adjoint_*` settings of `settings` (taken out of it) applied."""
    flat = {k: settings.pop(k) for k in ADJOINT_KEYS if k in settings}
    if not flat:
        return old
    if not isinstance(old, Adjoint):
        raise ValueError(
            f"{', '.join(flat)} apply to the adjoint, but this block's gradient method is {old!r}; pass "
            "gradient='adjoint' (or odenet.Adjoint(...)) as well."
        )
    return dataclasses.replace(old, **{_ADJOINT_FIELDS[k]: v for k, v in flat.items()})


def _kept_control(old, solver, settings: dict):
    """The old step control with the flat settings applied, where it is of the new solver's kind
    (else `None`, and the flat settings stay in `settings` for the new solver's default)."""
    flat = {k: settings.pop(k) for k in CONTROL_KEYS if k in settings}
    adaptive = block_options(solver, None, "direct", {"backend": settings["backend"]}).adaptive
    if isinstance(old, Adaptive) == adaptive and set(flat) <= {f.name for f in dataclasses.fields(old)}:
        return dataclasses.replace(old, **flat)
    settings.update(flat)
    return None


def _selector(select) -> Callable[[str, nn.Module], bool]:
    if isinstance(select, type) or (isinstance(select, tuple) and all(isinstance(c, type) for c in select)):
        return lambda name, module: isinstance(module, select)
    if callable(select):
        return select
    raise TypeError(f"select must be a class, a tuple of classes or a predicate (name, module) -> bool, got {select!r}.")


def _swap_foreign(parent: nn.Module, prefix: str, matches, branches: Branches, opts: SolveOptions, merge: bool,
                  strict: bool) -> int:
    """Replace the selected children of `parent` (and below) by `ResidualRun`s; returns how many blocks."""
    children = list(parent.named_children())
    sequence = isinstance(parent, (nn.Sequential, nn.ModuleList))
    found, run = 0, []  # run: consecutive selected (name, module) of a sequence

    def flush():
        if run:
            _replace_run(parent, prefix, run, branches, opts, strict)
            run.clear()

    for name, child in children:
        full = f"{prefix}{name}"
        if matches(full, child):
            found += 1
            run.append((name, child))
            if not (merge and sequence):
                flush()
            continue
        flush()
        found += _swap_foreign(child, full + ".", matches, branches, opts, merge, strict)
    flush()
    return found


def _replace_run(parent: nn.Module, prefix: str, run: List[Tuple[str, nn.Module]], branches: Branches,
                 opts: SolveOptions, strict: bool) -> None:
    names = [f"{prefix}{name}" for name, _ in run]
    new = ResidualRun([m for _, m in run], names, branches, opts, strict)
    new.training = run[0][1].training
    if isinstance(parent, nn.ModuleList) and len(run) > 1:  # one entry in place of the run
        first = int(run[0][0])
        parent[first] = new
        del parent[first + 1 : first + len(run)]
    elif isinstance(parent, nn.Sequential) and len(run) > 1:
        first = run[0][0]
        for name, _ in run[1:]:
            delattr(parent, name)
        setattr(parent, first, new)
    else:
        setattr(parent, run[0][0], new)


def swap_report(model: nn.Module) -> str:
    """What `swap_blocks` made of `model`: one line per odenet block and per converted block,
    saying whether it runs as an ODE step, stays discrete and why, or waits for the first forward."""
    lines = []
    for name, module in model.named_modules():
        if isinstance(module, ResidualRun):
            o = module.options
            how = "split Euler steps (the original computation)" if module.split_euler else (
                f"{o.solver_name}, {o.control!r}, {o.gradient!r}")
            merged = f"{len(module.names)} blocks merged" if len(module.names) > 1 else "1 block"
            lines.append(f"{name or '(model)'}: ResidualRun, {merged}, {how}")
            kinds = module.kinds or ["not checked yet: decided at the first forward"] * len(module.names)
            for block_name, kind in zip(module.names, kinds):
                lines.append(f"  {block_name}: {'ODE step' if kind == 'ode' else kind}")
        elif isinstance(module, ODEBlock):
            o = module.options
            lines.append(f"{name or '(model)'}: ODEBlock, {o.solver_name}, {o.control!r}, {o.gradient!r}")
        elif isinstance(module, ResBlock):
            lines.append(f"{name or '(model)'}: ResBlock (one Euler step, h={module.h:g})")
    return "\n".join(lines) if lines else f"{type(model).__name__}: no odenet blocks."
