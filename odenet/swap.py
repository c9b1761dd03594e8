"""Converting the residual blocks of a model: :func:`swap_blocks`."""

from __future__ import annotations

from typing import Union

from torch import nn

from .blocks import _BLOCK_KEYWORDS, ODEBlock, ResBlock, _check_keywords, block_options
from .solvers.control import Fixed
from .solvers.rk import ExplicitRK

__all__ = ["swap_blocks"]


def _interval(block: nn.Module):
    if isinstance(block, ResBlock):
        return block.t, block.t + block.h
    return block.t0, block.t1


def swap_blocks(model: nn.Module, solver: Union[str, ExplicitRK] = "dopri5", **kwargs) -> nn.Module:
    """Replace every `ResBlock` and `ODEBlock` in `model` by a block of the given kind, sharing its `f`.

    Each block keeps its interval (`ResBlock(f, h, t)` covers `[t, t + h]`). With
    `solver="euler", steps=1` (or `control=odenet.Fixed(steps=1)`, and nothing else) blocks become
    `ResBlock`s; anything else gives `ODEBlock(f, solver, t0=t0, t1=t1, **kwargs)`. The same `f` module (same parameters) is used, so
    the model trains and evaluates under either form. Each new block keeps the training/eval
    mode of the block it replaces (`f` keeps its own, submodules included). The model is
    modified in place and returned; if `model` itself is a block, the new block is returned.

    **Arguments:**

    - `model`: any `nn.Module` (searched recursively), or a single block.
    - `solver`: the new blocks' solver, as in `ODEBlock`.
    - `**kwargs`: the new blocks' settings (`control`, `gradient`, or the shorthand `steps`, `rtol`, ...), as in `ODEBlock`.

    **Returns:** `model` with its blocks replaced (or the new block).

    **Raises:** `ValueError`/`TypeError` for settings `ODEBlock` would reject, before anything
    is replaced; `TypeError` if `model` is not an `nn.Module`.

    **Example:**

    ```python
    model = nn.Sequential(nn.Linear(4, 2), odenet.ResBlock(odenet.MLPDynamics(2)), nn.Linear(2, 3))
    model = odenet.swap_blocks(model, solver="dopri5", control=odenet.Adaptive(rtol=1e-3, atol=1e-3))
    model = odenet.swap_blocks(model, solver="euler", steps=1)  # and back
    ```
    """
    if "t0" in kwargs or "t1" in kwargs:
        raise TypeError(
            "swap_blocks keeps each block's own interval ([t, t + h] of a ResBlock, [t0, t1] of an "
            "ODEBlock), so it takes no t0/t1; set them on the blocks after swapping."
        )
    _check_keywords("swap_blocks", kwargs, _BLOCK_KEYWORDS - {"t0", "t1"})
    # Checked before anything changes.
    opts = block_options(solver, kwargs.get("control"), kwargs.get("gradient", "direct"), kwargs)
    to_res = (isinstance(solver, str) and solver == "euler" and opts.control == Fixed(steps=1)
              and set(kwargs) <= {"steps", "control"})

    def convert(block: nn.Module) -> nn.Module:
        t0, t1 = _interval(block)
        if to_res:
            new = ResBlock(block.f, h=t1 - t0, t=t0)
        else:
            new = ODEBlock(block.f, solver, t0=t0, t1=t1, **kwargs)
        # A new module starts in training mode; keep the replaced block's mode (a model in
        # eval() stays in eval, and a regularised block does not start regularising). The
        # block's own flag only: train() would also reset f's submodules (a BatchNorm frozen in
        # eval inside a training model).
        new.training = block.training
        return new

    if isinstance(model, (ResBlock, ODEBlock)):
        return convert(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_blocks needs an nn.Module, got {type(model).__name__}.")
    for name, child in list(model.named_children()):
        if isinstance(child, (ResBlock, ODEBlock)):
            setattr(model, name, convert(child))
        else:
            swap_blocks(child, solver, **kwargs)
    return model
