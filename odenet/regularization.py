"""RNODE regularisation (Finlay et al. 2020): kinetic energy and Jacobian norm integrated by the solver.

Finlay, Jacobsen, Nurbekyan & Oberman, *How to train your neural ODE: the world of Jacobian
and kinetic regularization*, ICML 2020. Penalising

- the kinetic energy `E = ∫ ||f(t, x(t))||² dt` makes trajectories straight and slow, and
- the Jacobian Frobenius norm `J = ∫ ||∂f/∂x (t, x(t))||_F² dt` makes the flow smooth,

so that adaptive solvers need fewer steps. Both integrals are solved together with the state,
as extra state dimensions of one augmented ODE, so they come from the same solver and
tolerances as `x` and work with every gradient method. The Frobenius norm is estimated with
Hutchinson's trick: `||∂f/∂x||_F² = E_ε ||εᵀ ∂f/∂x||²` for noise `ε` with `E[ε εᵀ] = I`; one `ε`
is drawn per solve and held fixed along the trajectory, and `εᵀ ∂f/∂x` is one
vector–Jacobian product per evaluation.
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
    """Weights of the RNODE regularisation term `λ_K · mean(E) + λ_J · mean(J)` (Finlay et al. 2020).

    `E` and `J` are per-sample integrals over the block's interval (see
    `odenet.regularization`); the mean is over the batch. A weight of `0` leaves that
    integral out of the solve altogether.

    **Arguments:**

    - `kinetic`: `λ_K`, weight of the kinetic energy `∫ ||f||² dt` (default 0).
    - `jacobian`: `λ_J`, weight of the Jacobian Frobenius norm `∫ ||∂f/∂x||_F² dt`, estimated
      with Hutchinson's trick (default 0).
    - `noise`: distribution of the Hutchinson vector `ε`: `"gaussian"` (default) or
      `"rademacher"` (±1 entries, lower variance).

    **Raises:** `TypeError`/`ValueError` for a negative or non-finite weight, both weights
    zero, or an unknown `noise`.

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
        """A Hutchinson vector `ε` with `like`'s shape, dtype and device (`E[ε εᵀ] = I`).

        **Arguments:**

        - `like`: a tensor whose shape, dtype and device to use.
        - `generator`: an optional `torch.Generator` (default: the global one).

        **Returns:** Gaussian or Rademacher noise (by `noise`), a tensor like `like`.
        """
        eps = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
        if self.noise == "rademacher":
            eps = torch.where(eps >= 0, torch.ones_like(eps), -torch.ones_like(eps))
        return eps


class RegularizedSolution(NamedTuple):
    """What :func:`solve_regularized` returns.

    **Fields:**

    - `solution`: the `odenet.Solution` of the state `x` alone (`ys` of shape
      `[len(t), *x.shape]`); its `stats` and `steps` are those of the augmented solve.
    - `regularization`: the scalar `λ_K · mean(E) + λ_J · mean(J)`, differentiable: add it to the loss.
    - `kinetic`: per-sample `E = ∫ ||f||² dt`, shape `[B]`, or `None` when `λ_K = 0`.
    - `jacobian`: per-sample Hutchinson estimate of `J = ∫ ||∂f/∂x||_F² dt`, shape `[B]`, or
      `None` when `λ_J = 0`.

    **Example:**

    ```python
    from odenet.options import SolveOptions

    f = odenet.MLPDynamics(dim=2, hidden=8)
    options = SolveOptions("rk4", odenet.Fixed(steps=2))
    res = odenet.regularization.solve_regularized(f, torch.randn(4, 2), (0.0, 1.0), options,
                                                  odenet.RNODE(kinetic=0.1))
    res.regularization.backward()
    assert res.kinetic.shape == (4,) and res.jacobian is None
    ```
    """

    solution: Solution
    regularization: Tensor
    kinetic: Optional[Tensor]
    jacobian: Optional[Tensor]


class _RegularizedDynamics(nn.Module):
    """The augmented ODE on `z = [x.flatten(1), E, J]`: `dx/dt = f`, `dE/dt = ||f||²`, `dJ/dt = ||εᵀ ∂f/∂x||²`.

    An `nn.Module` whose only parameters are `f`'s, so that the adjoint (which differentiates
    the parameters of the module it solves) gives `f`'s gradients.
    """

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
    """Solve `dx/dt = f(t, x)` together with the RNODE integrals, as one augmented state.

    The augmented state `[x.flatten(1), E, J]` (only the integrals with a non-zero weight) is
    solved by `odenet.odeint.solve_with_options` with `options`, so the solver, tolerances and
    gradient method (`"direct"`, `"adjoint"` or `"checkpoint"`) are the block's. The integrals
    are part of the error control, as in Finlay et al.'s implementation.

    **Arguments:**

    - `f`: the dynamics, an `nn.Module` with `forward(t, x)` that acts on each sample of the
      batch separately (the per-sample Jacobian is what is estimated).
    - `x`: batched initial state `[B, ...]`.
    - `t`: output times (at least two; the integrals run from `t[0]` to `t[-1]`).
    - `options`: an `odenet.options.SolveOptions` (e.g. `block.options`).
    - `config`: an :class:`RNODE` with the weights.
    - `noise`: the Hutchinson vector `ε` (shape of `x`); default: drawn from `config.noise`.
    - `generator`: a `torch.Generator` for drawing `ε` (default: the global one).
    - `adjoint_params`: as in `odenet.odeint` (default: `f`'s parameters).

    **Returns:** a :class:`RegularizedSolution` `(solution, regularization, kinetic, jacobian)`.

    **Raises:** `TypeError`/`ValueError` for a non-`RNODE` config, an unbatched `x` or a
    `noise` of the wrong shape; `odenet.SolverError` as `odeint` does.

    **Example:**

    ```python
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2), rtol=1e-4, atol=1e-4)
    res = odenet.regularization.solve_regularized(
        block.f, torch.randn(32, 2), (0.0, 1.0), block.options, odenet.RNODE(kinetic=1.0, jacobian=1.0)
    )
    res.solution.ys[-1].shape, res.regularization, res.kinetic.shape   # [32, 2], scalar, [32]
    ```
    """
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
    eps = None
    if config.jacobian > 0:
        if noise is None:
            eps = config.sample_noise(x, generator)
        else:
            if not isinstance(noise, Tensor) or noise.shape != x.shape:
                got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
                raise ValueError(f"noise must be a tensor of the state's shape {tuple(x.shape)}, got {got}.")
            eps = noise.to(dtype=x.dtype, device=x.device)

    try:
        tt = t.detach().double().flatten() if isinstance(t, Tensor) else torch.as_tensor(list(t), dtype=torch.float64)
        sign = -1.0 if tt.numel() >= 2 and float(tt[-1]) < float(tt[0]) else 1.0
    except (TypeError, ValueError):
        sign = 1.0  # a malformed t is reported by solve_with_options below
    use_k = config.kinetic > 0
    dyn = _RegularizedDynamics(f, x.shape, use_k, eps, sign)
    batch, n = x.shape[0], dyn.n
    extra = int(use_k) + int(eps is not None)
    z0 = torch.cat([x.reshape(batch, n), x.new_zeros(batch, extra)], dim=1)
    sol = solve_with_options(dyn, z0, t, options, adjoint_params)

    ys = sol.ys[:, :, :n].reshape(sol.ys.shape[0], *x.shape)
    col = n
    kinetic = jacobian = None
    term = x.new_zeros(())
    if use_k:
        kinetic = sol.ys[-1, :, col]
        term = term + config.kinetic * kinetic.mean()
        col += 1
    if eps is not None:
        jacobian = sol.ys[-1, :, col]
        term = term + config.jacobian * jacobian.mean()
    return RegularizedSolution(dataclasses.replace(sol, ys=ys), term, kinetic, jacobian)
