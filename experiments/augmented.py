"""Concentric spheres (Dupont, Doucet & Teh 2019): neural ODE vs augmented neural ODE vs ResNet.

Points of class 0 lie in the ball `||x|| <= 0.5`, points of class 1 in the shell
`1.0 <= ||x|| <= 1.5`. A model `linear(block(x))` classifies them after the block moves each
point along its trajectory. The flow of an ODE block is a homeomorphism of the input space, so
the shell still surrounds the ball afterwards and no line separates them; the ODE can only
squeeze points through gaps between samples, with long, stiff trajectories (high NFE).
Three models share the same dynamics architecture (`odenet.MLPDynamics`) and readout:

- NODE: `ODEBlock(f, dopri5)` on the input space;
- ANODE: `odenet.Augment(dims=k)` then `ODEBlock(f, dopri5)` on `dim + k` dimensions;
- ResNet: `ODEBlock(f, euler, steps=N)`, i.e. N weight-tied residual blocks with the same `f`
  (discrete steps can jump across each other).

    python experiments/augmented.py            # full run (3 seeds x 3 models, about 2 minutes on 2 CPU cores)
    python experiments/augmented.py --quick    # smoke test
    python experiments/augmented.py --help     # every setting
    python experiments/augmented.py --gallery docs/img/gallery   # also refresh the docs gallery's copies

Writes to `--out` (default `results/augmented/`): `trajectories.png` (hidden-state
trajectories of the three models on test points, seed 0), `training.png` (training loss and
NFE per iteration), `summary.png` (final training loss against NFE per model and seed) and
`results.json` (command, environment, settings, per-seed and mean metrics, histories). Accuracy
is on a fresh test set drawn from the same distribution; the NFE is that of one forward solve of
the test set. Each model and seed is a line of `results.jsonl` as it finishes (the seed-0 weights,
which the trajectory figure draws, in `model-*-seed0.pt`): a rerun with the same settings
resumes, `--fresh` starts over.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

import odenet
from kit.models import check_solver_settings
from kit.skeleton import (ResultLog, build_parser, command_line, digest, environment, key_fields,
                          load_checkpoint, opt, parse_config, save_checkpoint, save_figure, script_main, write_json)
from odenet import plotting

PROG = "augmented.py"


@dataclass
class AugmentedConfig:
    dim: int = opt(2, "input dimension of the spheres", minimum=1)
    n_train: int = opt(1000, "training points per class", minimum=1)
    n_test: int = opt(500, "test points per class", minimum=1)
    inner_radius: float = opt(0.5, "class 0: ||x|| <= inner_radius")
    outer_min: float = opt(1.0, "class 1: outer_min <= ||x|| <= outer_max")
    outer_max: float = opt(1.5, "class 1: outer_min <= ||x|| <= outer_max")
    augment: int = opt(1, "extra zero dimensions of ANODE", minimum=1)
    hidden: int = opt(32, "width of the dynamics MLP's hidden layers", minimum=1)
    layers: int = opt(2, "hidden layers of the dynamics MLP", minimum=1)
    activation: str = opt("relu", "activation of the dynamics MLP (relu as in Dupont et al.; tanh, softplus, elu, silu)")
    resnet_steps: int = opt(4, "Euler steps (weight-tied residual blocks) of the ResNet", minimum=1)
    rtol: float = opt(1e-3, "relative tolerance of dopri5 (NODE, ANODE)")
    atol: float = opt(1e-3, "absolute tolerance of dopri5 (NODE, ANODE)")
    gradient: str = opt("direct", "gradient method of the ODE blocks: direct, adjoint or checkpoint")
    kinetic: float = opt(0.0, "RNODE kinetic-energy weight for NODE/ANODE (0: off)", minimum=0)
    jacobian: float = opt(0.0, "RNODE Jacobian-norm weight for NODE/ANODE (0: off)", minimum=0)
    loss: str = opt("mse", "loss: mse (of the output against targets -1/+1, as Dupont et al.) or bce (logistic)",
                    choices=["mse", "bce"])
    iterations: int = opt(2000, "training iterations per model and seed", minimum=1)
    batch_size: int = opt(128, "training batch size", minimum=1)
    lr: float = opt(1e-3, "Adam learning rate", positive=True)
    seeds: int = opt(3, "number of seeds (0, 1, ...); each draws new data and initialisation", minimum=1)
    plot_points: int = opt(120, "test points drawn in the trajectory figure", key=False, minimum=1)
    threads: int = opt(1, "torch CPU threads (the networks are tiny: one is fastest)", key=False, minimum=1)
    dpi: int = opt(90, "resolution of the PNG figures", key=False, minimum=1)
    out: str = opt(os.path.join("results", "augmented"), "output directory", key=False)
    gallery: str = opt("", "also write small copies of the figures here (docs: docs/img/gallery)", key=False)
    fresh: bool = opt(False, "start over instead of reusing the models finished in OUT/results.jsonl", key=False)


QUICK = dict(iterations=60, seeds=1, n_train=256, n_test=128, plot_points=60)
MODELS = ("NODE", "ANODE", "ResNet")


def parse_args(argv=None) -> AugmentedConfig:
    parser = build_parser(AugmentedConfig, prog=PROG, description=__doc__.split("\n\n")[0], quick=QUICK)
    return parse_config(AugmentedConfig, argv, parser=parser, quick=QUICK, check=check)


def check(config: AugmentedConfig) -> None:
    if not 0 < config.inner_radius < config.outer_min < config.outer_max:
        raise ValueError(
            "Need 0 < inner_radius < outer_min < outer_max, got "
            f"{config.inner_radius}, {config.outer_min}, {config.outer_max}."
        )
    # the library names a bad --gradient, --rtol/--atol or --activation
    check_solver_settings("dopri5", rtol=config.rtol, atol=config.atol, gradient=config.gradient)
    odenet.MLPDynamics(dim=config.dim, hidden=config.hidden, layers=config.layers, activation=config.activation)


def sample_shell(n: int, dim: int, r_min: float, r_max: float, gen: torch.Generator) -> Tensor:
    """`n` points uniform in the volume of the shell `r_min <= ||x|| <= r_max` in `dim` dimensions."""
    direction = torch.randn(n, dim, generator=gen)
    direction = direction / direction.norm(dim=1, keepdim=True)
    u = torch.rand(n, 1, generator=gen)
    r = (r_min**dim + u * (r_max**dim - r_min**dim)) ** (1.0 / dim)
    return direction * r


def make_spheres(n_per_class: int, config: AugmentedConfig, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    inner = sample_shell(n_per_class, config.dim, 0.0, config.inner_radius, gen)
    outer = sample_shell(n_per_class, config.dim, config.outer_min, config.outer_max, gen)
    x = torch.cat([inner, outer])
    y = torch.cat([torch.zeros(n_per_class), torch.ones(n_per_class)])
    perm = torch.randperm(len(x), generator=gen)
    return x[perm], y[perm]


class Classifier(nn.Module):
    """`readout(block(augment(x)))` with a linear readout to one output (positive: class 1)."""

    def __init__(self, kind: str, config: AugmentedConfig):
        super().__init__()
        extra = config.augment if kind == "ANODE" else 0
        width = config.dim + extra
        self.augment = odenet.Augment(dims=extra) if extra else nn.Identity()
        f = odenet.MLPDynamics(dim=width, hidden=config.hidden, layers=config.layers, activation=config.activation)
        if kind == "ResNet":
            self.block = odenet.ODEBlock(f, solver="euler", steps=config.resnet_steps, gradient=config.gradient)
        else:
            reg = None
            if config.kinetic > 0 or config.jacobian > 0:
                reg = odenet.RNODE(kinetic=config.kinetic, jacobian=config.jacobian)
            self.block = odenet.ODEBlock(f, solver="dopri5", rtol=config.rtol, atol=config.atol,
                                         gradient=config.gradient, regularization=reg)
        self.readout = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.block(self.augment(x))).squeeze(-1)


def train_one(kind: str, seed: int, config: AugmentedConfig, data) -> Tuple[Classifier, Dict, List[dict]]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(1000 + seed)
    model = Classifier(kind, config)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.loss == "bce":
        loss_fn = nn.BCEWithLogitsLoss()
    else:  # regression of the targets -1 (class 0) and +1 (class 1)
        mse = nn.MSELoss()
        loss_fn = lambda out, y: mse(out, 2 * y - 1)  # noqa: E731
    gen = torch.Generator().manual_seed(2000 + seed)
    history = []
    start = time.perf_counter()
    n = len(x_train)
    for it in range(1, config.iterations + 1):
        idx = torch.randint(0, n, (config.batch_size,), generator=gen)
        optimiser.zero_grad()
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        reg = model.block.last_regularization
        total = loss + reg if reg is not None else loss
        total.backward()
        optimiser.step()
        stats = model.block.last_stats
        history.append({"iteration": it, "loss": loss.item(), "nfe_forward": stats.nfe_forward,
                        "nfe_backward": stats.nfe_backward,
                        **({"regularization": reg.item()} if reg is not None else {})})
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        train_loss = loss_fn(model(x_train), y_train).item()
        logits = model(x_test)
        test_nfe = model.block.last_stats.nfe_forward
        accuracy = ((logits > 0).float() == y_test).float().mean().item()
    last = history[-max(1, config.iterations // 10):]
    metrics = {
        "model": kind,
        "seed": seed,
        "test_accuracy": accuracy,
        "train_loss": train_loss,  # the training loss on the whole training set after training
        "test_nfe_forward": test_nfe,  # one solve of the whole test set
        "train_nfe_forward_last10pct": float(np.mean([h["nfe_forward"] for h in last])),
        "train_nfe_backward_last10pct": float(np.mean([h["nfe_backward"] for h in last])),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": seconds,
    }
    return model, metrics, history


def summarise(rows: List[dict]) -> Dict[str, dict]:
    out = {}
    for kind in MODELS:
        mine = [r for r in rows if r["model"] == kind]
        entry = {}
        for key in ("test_accuracy", "train_loss", "test_nfe_forward", "train_nfe_forward_last10pct", "train_seconds"):
            vals = np.array([r[key] for r in mine], dtype=float)
            entry[key] = float(vals.mean())
            entry[key + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        entry["seeds"] = len(mine)
        entry["parameters"] = mine[0]["parameters"]
        out[kind] = entry
    return out


def save(fig: Figure, name: str, config: AugmentedConfig) -> None:
    """Write `fig` to the output directory and, with --gallery, a small copy."""
    save_figure(fig, name, out=config.out, dpi=config.dpi, gallery=config.gallery, prefix="augmented_")


def trajectory_figure(models: Dict[str, Classifier], x: Tensor, y: Tensor, config: AugmentedConfig) -> Figure:
    fig = Figure(figsize=(17, 5.4), layout="constrained")
    names = ["inner ball", "outer shell"]
    for i, kind in enumerate(MODELS):
        model = models[kind]
        z = model.augment(x)
        state_dim = z.shape[1]
        three_d = state_dim >= 3
        ax = fig.add_subplot(1, 3, i + 1, projection="3d" if three_d else None)
        if kind == "NODE":
            title = "NODE: no crossing, so the ball squeezes\nthrough a gap between shell samples"
        elif kind == "ANODE":
            title = f"ANODE (+{config.augment} zero dim.): the extra\ndimension lifts the ball out of the shell"
        else:
            title = f"ResNet ({config.resnet_steps} weight-tied Euler steps):\nits states against the ODE of its own $f$"
        plotting.plot_trajectories(model.block, z, labels=y, class_names=names, ax=ax, title=title,
                                   dims=3 if state_dim > 3 else None, n_points=60)
        ax.title.set_fontsize(9)
    return fig


def training_figure(histories: Dict[str, List[List[dict]]], config: AugmentedConfig) -> Figure:
    fig = Figure(figsize=(12, 4), layout="constrained")
    ax_l, ax_n = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = {"NODE": "#1f77b4", "ANODE": "#ff7f0e", "ResNet": "#2ca02c"}
    window = max(1, config.iterations // 30)
    for kind in MODELS:
        runs = histories[kind]
        its = np.array([h["iteration"] for h in runs[0]])
        losses = np.array([[h["loss"] for h in run] for run in runs])
        smooth = np.array([np.convolve(l, np.ones(window) / window, mode="valid") for l in losses])
        xs = its[window - 1:]
        ax_l.plot(xs, smooth.mean(0), color=colours[kind], lw=1.6, label=f"{kind} (mean of {len(runs)} seeds)")
        if len(runs) > 1:
            ax_l.fill_between(xs, smooth.min(0), smooth.max(0), color=colours[kind], alpha=0.2, lw=0)
        mean_nfe = [{"iteration": int(i), "nfe_forward": float(v)}
                    for i, v in zip(its, np.mean([[h["nfe_forward"] for h in run] for run in runs], 0))]
        plotting.plot_nfe_over_training(mean_nfe, label=kind, color=colours[kind], smooth=window, ax=ax_n)
    ax_l.set_yscale("log")
    ax_l.set_xlabel("iteration")
    ax_l.set_ylabel(f"training loss ({config.loss.upper()}, moving average)")
    ax_l.set_title("training loss (band: min–max over seeds)", fontsize=10)
    ax_l.grid(True, color="0.9", lw=0.6)
    for side in ("top", "right"):
        ax_l.spines[side].set_visible(False)
    ax_l.legend(fontsize=8)
    ax_n.set_title("forward NFE per iteration (mean over seeds)", fontsize=10)
    return fig


def summary_figure(rows: List[dict], config: AugmentedConfig) -> Figure:
    """Training loss against test NFE, one point per model and seed, with the Pareto front."""
    points = [{"label": r["model"], "nfe": r["test_nfe_forward"], "train_loss": max(r["train_loss"], 1e-12),
               "seed": f"s{r['seed']}"} for r in rows]
    fig = plotting.plot_pareto(points, x="nfe", y="train_loss", y_higher_is_better=False, logy=True, connect=False,
                               annotate="seed" if config.seeds > 1 else None)
    ax = fig.axes[0]
    ax.set_ylabel(f"final training loss ({config.loss.upper()})")
    ax.set_xlabel("forward NFE of one test-set solve")
    ax.set_title("cost against fit, one point per seed (better: down and to the left)", fontsize=10)
    return fig


def main(argv=None) -> int:
    return script_main(PROG, parse_args, run, argv)


def run(config: AugmentedConfig, argv=None) -> dict:
    torch.set_num_threads(config.threads)
    log = ResultLog(config.out, fresh=config.fresh)  # one line per model and seed; a rerun reuses them
    settings = key_fields(config)
    rows, histories, first_models = [], {k: [] for k in MODELS}, {}
    plot_data = None
    start = time.perf_counter()
    for seed in range(config.seeds):
        gen = torch.Generator().manual_seed(seed)
        x_train, y_train = make_spheres(config.n_train, config, gen)
        x_test, y_test = make_spheres(config.n_test, config, gen)
        data = (x_train, y_train, x_test, y_test)
        for kind in MODELS:
            key = digest(dict(settings, model=kind, seed=seed))
            weights = os.path.join(config.out, f"model-{kind}-seed0.pt") if seed == 0 else None  # for the figure
            saved = load_checkpoint(weights, key) if weights else None
            if key in log.done and (weights is None or saved is not None):
                row, note = log.done[key], " (from results.jsonl)"
                if saved is not None:
                    first_models[kind] = model = Classifier(kind, config)
                    model.load_state_dict(saved["state"])
                    model.eval()
            else:
                model, metrics, history = train_one(kind, seed, config, data)
                row, note = log.add(key, dict(metrics=metrics, history=history)), ""
                if weights:
                    save_checkpoint(weights, dict(key=key, state=model.state_dict()))
                    first_models[kind] = model
            metrics = row["metrics"]
            rows.append(metrics)
            histories[kind].append(row["history"])
            print(f"seed {seed} {kind:6s} test accuracy {metrics['test_accuracy']:.3f}  train loss "
                  f"{metrics['train_loss']:.4f}  test NFE {metrics['test_nfe_forward']:4d}  "
                  f"train NFE (last 10%) {metrics['train_nfe_forward_last10pct']:.0f}  ({metrics['train_seconds']:.0f}s)"
                  + note, flush=True)
        if seed == 0:
            k = min(config.plot_points, len(x_test))
            plot_data = (x_test[:k], y_test[:k].long())

    summary = summarise(rows)
    save(trajectory_figure(first_models, *plot_data, config), "trajectories.png", config)
    save(training_figure(histories, config), "training.png", config)
    save(summary_figure(rows, config), "summary.png", config)
    result = {
        "experiment": "augmented",
        "command": command_line(PROG, argv),
        "environment": environment(),
        "config": dataclasses.asdict(config),
        "summary": summary,
        "runs": rows,
        "total_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "histories": histories,
    }
    write_json(os.path.join(config.out, "results.json"), result)
    print(f"\nmean ± std over {config.seeds} seed(s) ({config.dim}-D spheres, {config.iterations} iterations):")
    print(f"{'model':8s} {'test accuracy':>16s} {'train loss':>18s} {'test NFE':>14s} {'params':>7s}")
    for kind, s in summary.items():
        print(f"{kind:8s} {s['test_accuracy']:8.3f} ± {s['test_accuracy_std']:.3f} {s['train_loss']:9.4f} ± "
              f"{s['train_loss_std']:.4f} {s['test_nfe_forward']:7.1f} ± {s['test_nfe_forward_std']:4.1f} {s['parameters']:7d}")
    print(f"figures and results.json written to {os.path.join(os.path.abspath(config.out), '')}")
    return result


if __name__ == "__main__":
    sys.exit(main())
