"""Residual blocks written for another library, read as ODE steps: :class:`ResidualRun`.

A block is read as `x -> x + F_1(x)`, then `+ F_2(...)`, ... (its sequential residual
sub-layers, `branches`). That is one Lie–Trotter split Euler step of `dx/dt = F_1 + F_2 + ...`
over one unit of depth. A run of N such blocks covers the depth `[0, N]`, block k owning
`[k, k + 1]`:

- under `solver="euler"` without `steps`, each block takes its split Euler step, sub-layers in
  order: exactly the original model;
- under any other solver, the unsplit field `F_1 + F_2 + ...` of each block is integrated over
  its unit interval: block by block for fixed steps (`steps` per block), and in one adaptive
  solve over a run of blocks (a field piecewise in time) for adaptive solvers.

Blocks that change the state's shape cannot be ODE steps and stay discrete. The first forward
checks each block against its declared residual form on that batch.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .odeint import solve_with_options
from .options import SolveOptions
from .solvers.control import Adaptive, Fixed
from .solvers.stats import SolveStats

__all__ = ["ResidualRun"]

Branches = Callable[[nn.Module], Sequence[Callable[[Tensor], Tensor]]]


class _Field(nn.Module):
    """The unsplit field of a run: `f(t, x) = Σ_j F_{k,j}(x)` for the block k that owns `t`
    (`active`, when a solve covers one block; else read from `t`)."""

    def __init__(self, blocks: Sequence[nn.Module], branches: Branches):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.branches = branches
        self.active: Optional[int] = None
        self.span: Tuple[int, int] = (0, len(blocks))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        k = self.active
        if k is None:  # a solve over several blocks: block k owns [k, k + 1) (one host read of t)
            lo, hi = self.span
            k = min(max(math.floor(float(t) + 1e-9), lo), hi - 1)
        parts = [F(x) for F in self.branches(self.blocks[k])]
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out


def _residual_form(block: nn.Module, branches: Branches, x: Tensor) -> Tensor:
    for F in branches(block):
        x = x + F(x)
    return x


class ResidualRun(nn.Module):
    """Consecutive residual blocks of a model (made by `odenet.swap_blocks(select=...)`) run as
    ODE steps of their own sub-layers; see the module docstring. `last_stats` sums the
    `SolveStats` of the last forward's solves (`None` in the split Euler form)."""

    def __init__(self, blocks: Sequence[nn.Module], names: Sequence[str], branches: Branches,
                 options: SolveOptions, strict: bool = True):
        super().__init__()
        self.field = _Field(blocks, branches)
        self.names = list(names)
        self.options = options
        self.strict = strict
        self.kinds: Optional[List[str]] = None  # per block, after the first forward: "ode" or why it is discrete
        self._solves: List[SolveStats] = []

    @property
    def blocks(self) -> nn.ModuleList:
        """The original blocks (the same modules and parameters)."""
        return self.field.blocks

    @property
    def last_stats(self) -> Optional[SolveStats]:
        """The summed `SolveStats` of the last forward's solves (backward counts fill in with `backward()`)."""
        if not self._solves:
            return None
        counts = ("nfe_forward", "nfe_backward", "n_accepted", "n_rejected", "n_accepted_backward", "n_rejected_backward")
        total = {c: sum(getattr(s, c) or 0 for s in self._solves) for c in counts}
        return SolveStats(**total, final_step=self._solves[-1].final_step)

    @property
    def split_euler(self) -> bool:
        """Whether blocks take their split Euler step (the original model's computation)."""
        return self.options.solver_name == "euler" and self.options.control == Fixed()

    def forward(self, x: Tensor) -> Tensor:
        if self.kinds is None:
            self.kinds = self._check(x)
        self._solves = []
        k = 0
        while k < len(self.kinds):
            if self.kinds[k] != "ode":
                x, k = self.blocks[k](x), k + 1
                continue
            end = k
            while end < len(self.kinds) and self.kinds[end] == "ode":
                end += 1
            x = self._ode(x, k, end)
            k = end
        return x

    def _ode(self, x: Tensor, start: int, end: int) -> Tensor:
        """Blocks `start..end-1`, all ODE steps, from state `x`."""
        if self.split_euler:
            for block in self.blocks[start:end]:
                x = _residual_form(block, self.field.branches, x)
            return x
        if isinstance(self.options.control, Adaptive):
            self.field.active, self.field.span = None, (start, end)
            return self._solve(x, start, end)
        for k in range(start, end):  # fixed steps: block by block, `steps` per block
            self.field.active = k
            x = self._solve(x, k, k + 1)
        return x

    def _solve(self, x: Tensor, t0: int, t1: int) -> Tensor:
        sol = solve_with_options(self.field, x, (float(t0), float(t1)), self.options)
        self._solves.append(sol.stats)
        return sol.ys[-1]

    @torch.no_grad()
    def _check(self, x: Tensor) -> List[str]:
        """Each block, in eval mode on this batch: discrete if it changes the shape; else its
        output must equal its residual form (unless `strict=False`)."""
        kinds = []
        modes = {m: m.training for m in self.modules()}
        try:
            self.eval()
            for name, block in zip(self.names, self.blocks):
                y = block(x)
                if y.shape != x.shape:
                    kinds.append(f"discrete: changes the state's shape {tuple(x.shape)} -> {tuple(y.shape)}")
                else:
                    self._check_form(name, block, x, y)
                    kinds.append("ode")
                x = y
        finally:
            for m, mode in modes.items():
                m.training = mode
        return kinds

    def _check_form(self, name: str, block: nn.Module, x: Tensor, y: Tensor) -> None:
        r = _residual_form(block, self.field.branches, x)
        gap = (y - r).abs().max().item() if y.numel() else 0.0
        scale = max(1.0, y.abs().max().item() if y.numel() else 0.0)
        if gap <= 1e3 * torch.finfo(y.dtype).eps * scale or not self.strict:
            return
        raise ValueError(
            f"Block {name!r} ({type(block).__name__}) is not its declared residual form x + F_1(x) + ...: "
            f"on this batch its output differs from it by {gap:.3g} (max abs; output scale {scale:.3g}). "
            "A post-activation block (relu(x + F(x)), as in the original ResNet) or a wrong branches= is "
            "not an ODE step. Use the block's pre-activation form, fix branches=, or pass strict=False to "
            "convert it by its branches anyway, which drops what lies outside them (e.g. the trailing "
            "activation) and so changes the function."
        )

    def extra_repr(self) -> str:
        o = self.options
        return (f"{len(self.names)} blocks, solver={o.solver_name!r}, control={o.control!r}, "
                f"gradient={o.gradient!r}")
