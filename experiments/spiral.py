"""Learn the dynamics of a 2-D spiral from one observed trajectory (the torchdiffeq demo setting).

The true system is `dy/dt = A y³` (cube taken elementwise), `A = [[-0.1, 2.0], [-2.0, -0.1]]`,
`y(0) = [2, 0]`, observed at 1000 times in `[0, 25]`. A small MLP `f(y)` (fed `y³`, as in
torchdiffeq's `examples/ode_demo.py`) is trained on random windows of 10 consecutive
observations, with the loss `mean |ŷ - y|` of an odenet dopri5 solve. At snapshots the learned
model is solved over the whole interval from `y(0)` and compared with the truth.

    python experiments/spiral.py            # full run (2000 iterations, under a minute on 2 CPU cores)
    python experiments/spiral.py --quick    # smoke test (seconds)
    python experiments/spiral.py --help     # every setting
    python experiments/spiral.py --gallery docs/img/gallery   # also refresh the docs gallery's copies

Writes to `--out` (default `results/spiral/`): `spiral.png` (true vs learned trajectories and
the learned vector field at the end), `vector_field_training.png` (the learned field at the
snapshots), `snapshot_iterNNNN.png`, `training.png` (loss and NFE per iteration),
`step_sizes.png` (the steps of the final solve), `results.json` (command, environment, settings,
errors, timings) and `checkpoint.pt` (the training state at the last snapshot: a rerun with the
same settings resumes from it, `--fresh` starts over).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

import odenet
from kit.models import check_solver_settings
from kit.skeleton import (build_parser, command_line, digest, environment, key_fields, load_checkpoint, opt,
                          parse_config, save_checkpoint, save_figure, script_main, write_json)
from odenet import plotting

PROG = "spiral.py"


@dataclass
class SpiralConfig:
    iterations: int = opt(2000, "training iterations (the torchdiffeq demo's 2000)", minimum=1)
    batch_time: int = opt(10, "consecutive observations per training window", minimum=2)
    batch_size: int = opt(20, "training windows per iteration", minimum=1)
    data_size: int = opt(1000, "observations of the true trajectory over [0, t_end]", minimum=1)
    t_end: float = opt(25.0, "end of the observed interval", positive=True)
    hidden: int = opt(50, "width of the MLP's hidden layer", minimum=1)
    cube_features: bool = opt(True, "feed y**3 to the MLP, as the torchdiffeq demo does")
    lr: float = opt(1e-3, "RMSprop learning rate", positive=True)
    solver: str = opt("dopri5", "odenet solver for training and evaluation")
    rtol: float = opt(1e-7, "relative tolerance (torchdiffeq's default, as in the demo)")
    atol: float = opt(1e-9, "absolute tolerance (torchdiffeq's default, as in the demo)")
    gradient: str = opt("direct", "gradient method: direct, adjoint or checkpoint")
    snapshot_every: int = opt(250, "iterations between evaluations/snapshot figures (and checkpoints)", minimum=1)
    seed: int = opt(0, "random seed (initialisation and batches)", minimum=0)
    threads: int = opt(1, "torch CPU threads (the networks are tiny: one is fastest)", key=False, minimum=1)
    dpi: int = opt(90, "resolution of the PNG figures", key=False, minimum=1)
    out: str = opt(os.path.join("results", "spiral"), "output directory", key=False)
    gallery: str = opt("", "also write small copies of the main figures here (docs: docs/img/gallery)", key=False)
    fresh: bool = opt(False, "start over instead of resuming from OUT/checkpoint.pt", key=False)


QUICK = dict(iterations=200, snapshot_every=100)

A_TRUE = [[-0.1, 2.0], [-2.0, -0.1]]


def parse_args(argv=None) -> SpiralConfig:
    parser = build_parser(SpiralConfig, prog=PROG, description=__doc__.split("\n\n")[0], quick=QUICK)
    return parse_config(SpiralConfig, argv, parser=parser, quick=QUICK, check=check)


class SpiralDynamics(nn.Module):
    """The demo's ODEFunc: `f(t, y) = W2 tanh(W1 y³ + b1) + b2` (weights N(0, 0.1²), zero biases)."""

    def __init__(self, hidden: int, cube: bool):
        super().__init__()
        self.cube = cube
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, t, y):
        return self.net(y**3 if self.cube else y)


class TrueDynamics(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("A", torch.tensor(A_TRUE))

    def forward(self, t, y):
        return (y**3) @ self.A.T


def check(config: SpiralConfig) -> None:
    if config.batch_time >= config.data_size:
        raise ValueError(f"--batch-time must be in [2, data_size), got {config.batch_time}.")
    if config.batch_size > config.data_size - config.batch_time:
        raise ValueError(
            f"--batch-size {config.batch_size} exceeds the {config.data_size - config.batch_time} possible windows; lower it."
        )
    check_solver_settings(config.solver, gradient=config.gradient)  # names a bad --solver or --gradient


def save(fig: Figure, name: str, config: SpiralConfig, gallery: bool = False) -> None:
    """Write `fig` to the output directory and, for gallery figures with --gallery, a small copy."""
    save_figure(fig, name, out=config.out, dpi=config.dpi, gallery=config.gallery if gallery else None, prefix="spiral_")


def snapshot_figure(true_y, pred_y, t, f, it: int, loss: float) -> Figure:
    """The demo's three panels: x/y against t, phase portrait, learned vector field."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    ax_t, ax_p, ax_v = fig.add_subplot(1, 3, 1), fig.add_subplot(1, 3, 2), fig.add_subplot(1, 3, 3)
    tt, ty, py = t.numpy(), true_y[:, 0].numpy(), pred_y[:, 0].numpy()
    ax_t.plot(tt, ty[:, 0], color="0.2", lw=1.4, label="true $y_1$")
    ax_t.plot(tt, ty[:, 1], color="0.55", lw=1.4, label="true $y_2$")
    ax_t.plot(tt, py[:, 0], color="#1f77b4", lw=1.2, ls="--", label="learned $y_1$")
    ax_t.plot(tt, py[:, 1], color="#ff7f0e", lw=1.2, ls="--", label="learned $y_2$")
    ax_t.set_xlabel("$t$")
    ax_t.set_ylabel("$y$")
    ax_t.set_title("trajectories", fontsize=10)
    ax_t.legend(fontsize=7, ncol=2, loc="lower right")
    ax_p.plot(ty[:, 0], ty[:, 1], color="0.2", lw=1.4, label="true")
    ax_p.plot(py[:, 0], py[:, 1], color="#d62728", lw=1.2, ls="--", label="learned")
    ax_p.set_xlim(-2.1, 2.1)
    ax_p.set_ylim(-2.1, 2.1)
    ax_p.set_aspect("equal")
    ax_p.set_xlabel("$y_1$")
    ax_p.set_ylabel("$y_2$")
    ax_p.set_title("phase portrait", fontsize=10)
    ax_p.legend(fontsize=7)
    for a in (ax_t, ax_p):
        a.grid(True, color="0.9", lw=0.6)
        for side in ("top", "right"):
            a.spines[side].set_visible(False)
    plotting.plot_vector_field(f, xlim=(-2, 2), ylim=(-2, 2), n=21, ax=ax_v, title="learned field")
    fig.suptitle(f"iteration {it}: mean |ŷ - y| over t in [0, {tt[-1]:g}] = {loss:.4f}", fontsize=11)
    return fig


def main(argv=None) -> int:
    return script_main(PROG, parse_args, run, argv)


def run(config: SpiralConfig, argv=None) -> dict:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    os.makedirs(config.out, exist_ok=True)
    solve_kw = dict(solver=config.solver, gradient=config.gradient)
    if check_solver_settings(config.solver, gradient=config.gradient):  # adaptive
        solve_kw.update(rtol=config.rtol, atol=config.atol)
    eval_kw = {k: v for k, v in solve_kw.items() if k != "gradient"}

    t = torch.linspace(0.0, config.t_end, config.data_size)
    y0 = torch.tensor([[2.0, 0.0]])
    with torch.no_grad():
        true_y = odenet.odeint(TrueDynamics(), y0, t, solver="dopri5").ys  # [data_size, 1, 2]

    f = SpiralDynamics(config.hidden, config.cube_features)
    optimiser = torch.optim.RMSprop(f.parameters(), lr=config.lr)
    history: List[dict] = []
    evaluations: List[dict] = []
    snapshots = []  # (iteration, state_dict)
    start = time.perf_counter()

    def evaluate(it: int) -> dict:
        with torch.no_grad():
            sol = odenet.odeint(f, y0, t, **eval_kw)
        pred = sol.ys
        err = (pred - true_y)[:, 0]
        row = {
            "iteration": it,
            "mean_abs_error": float(err.abs().mean()),  # the demo's "Total Loss"
            "mean_l2_error": float(err.norm(dim=-1).mean()),
            "max_l2_error": float(err.norm(dim=-1).max()),
            "final_l2_error": float(err[-1].norm()),
            "nfe": sol.stats.nfe_forward,
            "n_accepted": sol.stats.n_accepted,
            "n_rejected": sol.stats.n_rejected,
        }
        save(snapshot_figure(true_y, pred, t, f, it, row["mean_abs_error"]), f"snapshot_iter{it:04d}.png", config)
        snapshots.append((it, {k: v.clone() for k, v in f.state_dict().items()}))
        print(f"iter {it:5d}  mean |ŷ-y| {row['mean_abs_error']:.4f}  mean ||ŷ-y|| {row['mean_l2_error']:.4f}  "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
        return row

    # Resume: the training state at the last snapshot, saved for these settings.
    key = digest(key_fields(config))
    checkpoint = os.path.join(config.out, "checkpoint.pt")
    state = None if config.fresh else load_checkpoint(checkpoint, key)
    first, seconds_before = 1, 0.0
    if state is not None:
        f.load_state_dict(state["f"])
        optimiser.load_state_dict(state["optimiser"])
        np.random.set_state(state["numpy_random"])
        history, evaluations, snapshots = state["history"], state["evaluations"], state["snapshots"]
        first, seconds_before = state["iteration"] + 1, state["train_seconds"]
        print(f"resuming after iteration {state['iteration']} from {checkpoint}", flush=True)
    else:
        evaluations.append(evaluate(0))
    for it in range(first, config.iterations + 1):
        s = torch.from_numpy(np.random.choice(config.data_size - config.batch_time, config.batch_size, replace=False))
        batch_y0 = true_y[s, 0]  # [B, 2]
        batch_t = t[: config.batch_time]
        batch_y = torch.stack([true_y[s + i, 0] for i in range(config.batch_time)])  # [T, B, 2]
        optimiser.zero_grad()
        sol = odenet.odeint(f, batch_y0, batch_t, **solve_kw)
        loss = (sol.ys - batch_y).abs().mean()
        loss.backward()
        optimiser.step()
        history.append({"iteration": it, "loss": loss.item(), **sol.stats.as_dict()})
        if it % config.snapshot_every == 0 or it == config.iterations:
            evaluations.append(evaluate(it))
            save_checkpoint(checkpoint, dict(
                key=key, iteration=it, f=f.state_dict(), optimiser=optimiser.state_dict(),
                numpy_random=np.random.get_state(), history=history, evaluations=evaluations, snapshots=snapshots,
                train_seconds=seconds_before + time.perf_counter() - start))
    train_seconds = seconds_before + time.perf_counter() - start
    with torch.no_grad():
        final_sol = odenet.odeint(f, y0, t, **eval_kw)  # the final evaluation's solve, again (deterministic)
    final_pred = final_sol.ys

    # Figures: final comparison, the field during training, loss/NFE, step sizes of the final solve.
    save(snapshot_figure(true_y, final_pred, t, f, config.iterations, evaluations[-1]["mean_abs_error"]),
         "spiral.png", config, gallery=True)
    shown = snapshots if len(snapshots) <= 5 else [snapshots[i] for i in np.linspace(0, len(snapshots) - 1, 5).round().astype(int)]
    fig = Figure(figsize=(3.3 * len(shown) + 0.8, 3.6), layout="constrained")
    axes = [fig.add_subplot(1, len(shown), i + 1) for i in range(len(shown))]
    g = SpiralDynamics(config.hidden, config.cube_features)
    for ax, (it, state) in zip(axes, shown):
        g.load_state_dict(state)
        with torch.no_grad():
            traj = odenet.odeint(g, y0, t, solver="dopri5", rtol=1e-5, atol=1e-7).ys
        plotting.plot_vector_field(g, n=17, ax=ax, trajectories=traj[:, 0], colorbar=False, title=f"iteration {it}")
        ax.plot(true_y[:, 0, 0].numpy(), true_y[:, 0, 1].numpy(), color="0.1", lw=0.8, ls=":", zorder=6)
    fig.suptitle("learned vector field and its trajectory from $y_0$ (red) during training; true trajectory dotted", fontsize=10)
    save(fig, "vector_field_training.png", config, gallery=True)

    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax_l, ax_n = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    its = [h["iteration"] for h in history]
    ax_l.semilogy(its, [h["loss"] for h in history], color="0.6", lw=0.6, label="training window loss")
    ax_l.semilogy([e["iteration"] for e in evaluations], [e["mean_abs_error"] for e in evaluations], "o-",
                  color="#d62728", ms=4, label="full trajectory mean |ŷ - y|")
    ax_l.set_xlabel("iteration")
    ax_l.set_ylabel("error")
    ax_l.legend(fontsize=8)
    ax_l.grid(True, color="0.9", lw=0.6)
    plotting.plot_nfe_over_training(history, smooth=max(1, config.iterations // 40), ax=ax_n)
    save(fig, "training.png", config, gallery=True)
    fig = plotting.plot_step_sizes(final_sol, title=f"steps of the final {config.solver} solve over [0, {config.t_end:g}] "
                                   f"(rtol={config.rtol:g}, atol={config.atol:g})")
    save(fig, "step_sizes.png", config, gallery=True)

    final = evaluations[-1]
    result = {
        "experiment": "spiral",
        "command": command_line(PROG, argv),
        "environment": environment(),
        "config": dataclasses.asdict(config),
        "final": final,
        "evaluations": evaluations,
        "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }
    write_json(os.path.join(config.out, "results.json"), result)
    print(f"final trajectory error after {config.iterations} iterations: mean |ŷ-y| = {final['mean_abs_error']:.4f}, "
          f"mean ||ŷ-y|| = {final['mean_l2_error']:.4f}, max ||ŷ-y|| = {final['max_l2_error']:.4f} "
          f"(training {train_seconds:.0f}s)")
    print(f"figures and results.json written to {os.path.join(os.path.abspath(config.out), '')}")
    return result


if __name__ == "__main__":
    sys.exit(main())
