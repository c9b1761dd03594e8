"""RNODE regularisation (Finlay et al., ICML 2020): kinetic energy and Jacobian norm, integrated by the solver.

The kinetic energy `E = ∫ ||f||² dt` makes trajectories straight and the Jacobian norm
`J = ∫ ||∂f/∂x||_F² dt` the flow smooth, so adaptive solvers take fewer steps. Both are extra
state of one augmented ODE (same solver, tolerances and gradient method as `x`). `J` uses
Hutchinson's estimate `||εᵀ ∂f/∂x||²`, `E[ε εᵀ] = I`, with one `ε` held fixed per solve.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .odeint import solve_with_options
from .options import SolveOptions
from .solution import Solution

__all__ = ["RNODE", "RegularizedSolution", "solve_regularized"]

NOISES = ("gaussian", "rademacher")


@dataclass(frozen=True)
class RNODE:
    """Weights of the RNODE term `λ_K · mean(E) + λ_J · mean(J)`, per-sample integrals averaged over the batch.

    **Arguments:**

    - `kinetic`, `jacobian`: `λ_K` and `λ_J`; a weight of 0 leaves its integral out of the solve.
    - `noise`: the Hutchinson vector's distribution, `"gaussian"` or `"rademacher"` (±1, lower
      variance).

    **Raises:** `TypeError`/`ValueError` for a negative or non-finite weight, both weights zero,
    or an unknown `noise`.

    **Example:**

    ```python
    f = odenet.MLPDynamics(dim=2, hidden=32)
    block = odenet.ODEBlock(f, regularization=odenet.RNODE(kinetic=0.01, jacobian=0.01))
    y = block(torch.randn(64, 2))                   # in training mode: also integrates E and J
    loss = y.pow(2).mean() + block.last_regularization
    loss.backward()
    ```
    """

    kinetic: float = 0.0
    jacobian: float = 0.0
    noise: str = "gaussian"

    def __post_init__(self):
        for name in ("kinetic", "jacobian"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"RNODE {name} weight must be a number >= 0, got {value!r}.")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"RNODE {name} weight must be a finite number >= 0, got {value!r}.")
            object.__setattr__(self, name, float(value))
        if self.kinetic == 0 and self.jacobian == 0:
            raise ValueError(
                "RNODE needs kinetic > 0 or jacobian > 0 (both are 0, so there is nothing to regularise); "
                "e.g. RNODE(kinetic=0.01, jacobian=0.01), or pass regularization=None."
            )
        if self.noise not in NOISES:
            raise ValueError(f"Unknown Hutchinson noise {self.noise!r}; choose one of {NOISES}.")

    def sample_noise(self, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """A Hutchinson vector `ε` (`E[ε εᵀ] = I`) shaped like `like`, drawn from `noise`."""
        eps = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
        if self.noise == "rademacher":
            eps = torch.where(eps >= 0, torch.ones_like(eps), -torch.ones_like(eps))
        return eps


class RegularizedSolution(NamedTuple):
    """What `solve_regularized` returns: the `solution` of `x` alone (stats and steps of the augmented
    solve), the differentiable `regularization` term, and the per-sample `kinetic` and `jacobian`
    integrals (`[B]`, `None` for a zero weight)."""

    solution: Solution
    regularization: Tensor
    kinetic: Optional[Tensor]
    jacobian: Optional[Tensor]


class _RegularizedDynamics(nn.Module):
    """The augmented ODE on `z = [x.flatten(1), E, J]`: `dx/dt = f`, `dE/dt = ||f||²`, `dJ/dt = ||εᵀ ∂f/∂x||²`.

    A module whose only parameters are `f`'s, so that the adjoint differentiates `f`'s."""

    def __init__(self, f: nn.Module, shape, kinetic: bool, eps: Optional[Tensor], sign: float):
        super().__init__()
        self.f = f
        self.shape = tuple(shape)
        self.n = math.prod(self.shape[1:])
        self.kinetic = kinetic
        self.eps = eps  # a plain attribute (no parameter, no buffer): fixed for the whole solve
        self.sign = sign  # integrals grow positive whichever way time runs

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        outer_grad = torch.is_grad_enabled()
        batch = z.shape[0]
        x = z[:, : self.n].reshape(self.shape)
        with torch.enable_grad():
            if self.eps is not None and not (outer_grad and x.requires_grad):
                # A fresh leaf to differentiate against: outside grad mode (the no-grad forward
                # solve of the adjoint and checkpoint methods) x is not part of any graph.
                x = x.detach().requires_grad_(True)
            fx = self.f(t, x)
            # reshape(batch, n), not (batch, -1): the latter is ambiguous for an empty batch.
            parts = [fx.reshape(batch, self.n)]
            if self.kinetic:
                parts.append(self.sign * fx.reshape(batch, self.n).pow(2).sum(1, keepdim=True))
            if self.eps is not None:
                vjp = None
                if fx.requires_grad:
                    (vjp,) = torch.autograd.grad(fx, x, self.eps, create_graph=outer_grad, allow_unused=True)
                if vjp is None:  # f does not depend on x: its Jacobian is zero
                    vjp = torch.zeros_like(x)
                parts.append(self.sign * vjp.reshape(batch, self.n).pow(2).sum(1, keepdim=True))
            out = torch.cat(parts, dim=1)
        return out if outer_grad else out.detach()


def solve_regularized(
    f: nn.Module,
    x: Tensor,
    t: Union[Tensor, Sequence[float]],
    options: SolveOptions,
    config: RNODE,
    *,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    adjoint_params: Optional[Sequence[Tensor]] = None,
) -> RegularizedSolution:
    """Solve `dx/dt = f(t, x)` for a batch `x` with the RNODE integrals as extra state, under a block's
    `options` (its solver, tolerances, error control and gradient); `noise` fixes `ε`."""
    _check_inputs(f, x, config)
    eps = _hutchinson_noise(config, x, noise, generator)
    dyn = _RegularizedDynamics(f, x.shape, config.kinetic > 0, eps, _direction(t))
    extra = int(config.kinetic > 0) + int(eps is not None)
    z0 = torch.cat([x.reshape(x.shape[0], dyn.n), x.new_zeros(x.shape[0], extra)], dim=1)
    sol = solve_with_options(dyn, z0, t, options, adjoint_params)
    return _split_state(sol, x, dyn.n, config, eps is not None)


def _check_inputs(f, x, config) -> None:
    """Raise for a non-`RNODE` config, a non-module `f` or an unbatched, non-float `x`."""
    if not isinstance(config, RNODE):
        raise TypeError(f"config must be an odenet.RNODE, got {type(config).__name__}.")
    if not isinstance(f, nn.Module):
        raise TypeError(f"f must be an nn.Module with forward(t, x), got {type(f).__name__}.")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}.")
    if x.dim() < 2:
        raise ValueError(
            f"RNODE needs a batched state [B, ...] (the integrals are per sample), got shape {tuple(x.shape)}. "
            "Add a batch axis with x.unsqueeze(0)."
        )


def _hutchinson_noise(config: RNODE, x: Tensor, noise, generator) -> Optional[Tensor]:
    """The `ε` of this solve: `noise` (checked) or a fresh draw; `None` without a Jacobian term."""
    if config.jacobian == 0:
        return None
    if noise is None:
        return config.sample_noise(x, generator)
    if not isinstance(noise, Tensor) or noise.shape != x.shape:
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor of the state's shape {tuple(x.shape)}, got {got}.")
    return noise.to(dtype=x.dtype, device=x.device)


def _direction(t) -> float:
    """-1.0 when `t` runs backwards, else 1.0, so that the integrals grow positive either way."""
    try:
        tt = t.detach().double().flatten() if isinstance(t, Tensor) else torch.as_tensor(list(t), dtype=torch.float64)
        return -1.0 if tt.numel() >= 2 and float(tt[-1]) < float(tt[0]) else 1.0
    except (TypeError, ValueError):
        return 1.0  # a malformed t is reported by solve_with_options


def _split_state(sol: Solution, x: Tensor, n: int, config: RNODE, has_jacobian: bool) -> RegularizedSolution:
    """The augmented solution split into `x`'s solution, the weighted term and the integrals."""
    ys = sol.ys[:, :, :n].reshape(sol.ys.shape[0], *x.shape)
    col = n
    kinetic = jacobian = None
    term = x.new_zeros(())
    if config.kinetic > 0:
        kinetic = sol.ys[-1, :, col]
        term = term + config.kinetic * kinetic.mean()
        col += 1
    if has_jacobian:
        jacobian = sol.ys[-1, :, col]
        term = term + config.jacobian * jacobian.mean()
    return RegularizedSolution(dataclasses.replace(sol, ys=ys), term, kinetic, jacobian)
