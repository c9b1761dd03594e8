"""A 2-D continuous normalizing flow (Chen et al. 2018; FFJORD's toy setting) on a tuple state.

The state is `(z, logp)`: `dz/dt = g(t, z)` with a small time-conditioned MLP `g`, and
`dlogp/dt = -tr(dg/dz)`, exact in 2-D (one autograd call per dimension). Data `x` sits at
`t = 1` and the base `N(0, I)` at `t = 0`; solving from 1 to 0 with `logp(1) = 0` gives
`z0` and `dlogp = logp(0) = int_0^1 tr(dg/dz) dt`, so `log p(x) = log N(z0; 0, I) - dlogp`.
Trained by maximum likelihood on two moons (a closed-form sampler, no extra dependency),
dopri5 with the adjoint gradient.

    python examples/cnf.py                  # about a minute on 2 CPU cores; writes cnf_density.png
    python examples/cnf.py --quick --out /tmp/cnf
"""
from __future__ import annotations

import argparse
import math
import pathlib
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import odenet


@dataclass
class Config:
    iters: int = 600  # Adam iterations
    batch: int = 256  # fresh samples from the data density per iteration
    hidden: int = 64  # width of g's two hidden layers
    lr: float = 5e-3  # Adam learning rate
    tol: float = 1e-3  # rtol = atol of the training solves (dopri5, adjoint gradient)
    eval_tol: float = 1e-5  # rtol = atol of the held-out, grid and sampling solves
    n_test: int = 2000  # held-out samples for the reported log-likelihood
    grid: int = 80  # density grid is grid x grid over [-LIM, LIM]^2
    seed: int = 0  # seeds data, initialisation and sampling
    threads: int = 1  # torch threads: one is fastest for a model this small
    out: str = "."  # folder for cnf_density.png


LIM = 3.2  # half-width of the plotted square


def two_moons(n: int, generator: torch.Generator, noise: float = 0.05) -> Tensor:
    """`sklearn.datasets.make_moons` in closed form, centred and scaled by 2: `[n, 2]`."""
    theta = math.pi * torch.rand(n, generator=generator)
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) + noise * torch.randn(n, 2, generator=generator)
    return 2 * pts


class CNF(nn.Module):
    """`f(t, (z, logp)) = (g(t, z), -tr(dg/dz))` with `g` an MLP on `[z, t]`, trace exact."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.g = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                               nn.Linear(hidden, 2))

    def forward(self, t: Tensor, state):
        z, _ = state
        graph = torch.is_grad_enabled()  # a graph through the trace is needed only when differentiating
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_()
            dz = self.g(torch.cat([z, t.expand(z.shape[0], 1)], dim=1))
            trace = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=graph, retain_graph=True)[0][:, i]
                        for i in range(2))
        if not graph:
            dz, trace = dz.detach(), trace.detach()
        return dz, -trace


def log_normal(z: Tensor) -> Tensor:
    """`log N(z; 0, I)` per row."""
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def log_prob(f, x: Tensor, tol: float, gradient: str = "adjoint"):
    """`(log p(x), solution)`: solve `(x, 0)` from `t = 1` to `t = 0` and change variables."""
    sol = odenet.odeint(f, (x, x.new_zeros(x.shape[0])), [1.0, 0.0], solver="dopri5", rtol=tol, atol=tol,
                        gradient=gradient)
    z0, dlogp = sol.ys[0][-1], sol.ys[1][-1]
    return log_normal(z0) - dlogp, sol


@torch.no_grad()
def sample(f, n: int, tol: float, generator: torch.Generator) -> Tensor:
    """Draws from the model: base samples pushed from `t = 0` to `t = 1`."""
    z0 = torch.randn(n, 2, generator=generator)
    sol = odenet.odeint(f, (z0, z0.new_zeros(n)), [0.0, 1.0], solver="dopri5", rtol=tol, atol=tol)
    return sol.ys[0][-1]


def plot(data: Tensor, f, cfg: Config, generator: torch.Generator, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = torch.linspace(-LIM, LIM, cfg.grid)
    xx, yy = torch.meshgrid(side, side, indexing="xy")
    with torch.no_grad():
        logp, _ = log_prob(f, torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1), cfg.eval_tol)
    samples, data = sample(f, 2000, cfg.eval_tol, generator).numpy(), data.numpy()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].scatter(data[:, 0], data[:, 1], s=1, alpha=0.5)
    axes[0].set_title("data samples", fontsize=10)
    density = logp.exp().view(cfg.grid, cfg.grid).numpy()
    axes[1].imshow(density, origin="lower", extent=(-LIM, LIM, -LIM, LIM), cmap="viridis")
    axes[1].set_title("learned density", fontsize=10)
    axes[2].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5, color="C1")
    axes[2].set_title("model samples (base pushed 0 → 1)", fontsize=10)
    for ax in axes:
        ax.set_xlim(-LIM, LIM), ax.set_ylim(-LIM, LIM), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def parse(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=Config.iters)
    p.add_argument("--out", default=Config.out)
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--threads", type=int, default=Config.threads)
    p.add_argument("--quick", action="store_true", help="a few small iterations (for the tests)")
    a = p.parse_args(argv)
    cfg = Config(iters=a.iters, out=str(a.out), seed=a.seed, threads=a.threads)
    if a.quick:
        cfg = Config(iters=min(a.iters, 15), batch=128, hidden=32, n_test=500, grid=30, eval_tol=1e-4,
                     out=str(a.out), seed=a.seed, threads=a.threads)
    return cfg


def main(argv=None) -> dict:
    cfg = parse(argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    f = CNF(cfg.hidden)
    opt = torch.optim.Adam(f.parameters(), lr=cfg.lr)
    test = two_moons(cfg.n_test, gen)

    def held_out() -> float:
        with torch.no_grad():
            return log_prob(f, test, cfg.eval_tol)[0].mean().item()

    ll0 = held_out()
    print(f"iter 0: held-out mean log-likelihood {ll0:.3f}")
    nfe_f, nfe_b, start = [], [], time.perf_counter()
    for it in range(1, cfg.iters + 1):
        opt.zero_grad()
        logp, sol = log_prob(f, two_moons(cfg.batch, gen), cfg.tol)
        loss = -logp.mean()
        loss.backward()
        opt.step()
        nfe_f.append(sol.stats.nfe_forward), nfe_b.append(sol.stats.nfe_backward)
        if it % max(1, cfg.iters // 6) == 0 or it == cfg.iters:
            print(f"iter {it}: train NLL {loss.item():.3f}, NFE forward {nfe_f[-1]}, backward {nfe_b[-1]}")
    train_s = time.perf_counter() - start
    ll = held_out()
    last = max(1, len(nfe_f) // 10)
    mean_f, mean_b = sum(nfe_f[-last:]) / last, sum(nfe_b[-last:]) / last
    print(f"trained {cfg.iters} iterations in {train_s:.1f} s; held-out mean log-likelihood {ll:.3f} "
          f"(iter 0: {ll0:.3f}); NFE per iteration (last {last}): forward {mean_f:.1f}, backward {mean_b:.1f}")
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(two_moons(2000, gen), f, cfg, gen, out / "cnf_density.png")
    print(f"wrote {out / 'cnf_density.png'}")
    return dict(loglik_initial=ll0, loglik=ll, train_seconds=train_s, nfe_forward=mean_f, nfe_backward=mean_b,
                figure=str(out / "cnf_density.png"))


if __name__ == "__main__":
    main()
