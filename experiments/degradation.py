"""Degradation with depth on MNIST-1D: plain stacks against residual stacks and ODE blocks.

He et al. (2016) start from the observation that a deeper *plain* network (`x = f(x)`, no
skip) trains to a *higher* training loss than a shallower one, although it could copy the
shallow net and set its extra layers to the identity. This script measures that with odenet
on MNIST-1D (4000 training / 1000 test signals of length 40). Every model is

    logits = head(stack(stem(flatten(x))))      stem: Linear(40, W), head: Linear(W, 10)

and the stacks differ only in how the same layer type `f(x) = Linear(relu(x))` (width W,
He-normal weights, zero biases) is composed `depth` times:

- plain:    `x = f_i(x)`, i = 1..depth, untied weights (a plain ReLU MLP);
- residual: `x = x + h f_i(x)` with `h = 1/depth` (default), `odenet.ResBlock(f_i, h, t=i/depth)`,
  untied weights. With `h = 1/depth` the stack is exactly the Euler discretisation of the ODE
  whose field is `f_i` on the i-th slice of [0, 1]. (`--residual-step one` gives the
  textbook `h = 1`; with He-initialised `f_i` its forward variance doubles per block, so it
  overflows at depth 64 — that is why `1/depth` is the default.)
- ODE:      one `odenet.ODEBlock(f, solver="euler", steps=depth)` over [0, 1] with a single
  time-dependent `f(t, x) = Linear([relu(x), t])`, i.e. `depth` weight-tied residual
  blocks with `h = 1/depth`. Depth here is the number of solver steps: the parameter count
  does not change with depth, so whatever changes is the discretisation alone.

Each model is trained with Adam for the same number of epochs at every depth. The gradient
norm "reaching the first layer" is `||dL/dW_stem||` for one batch at initialisation (no
training), averaged over seeds; the stem is the same layer in all three families.

    python experiments/degradation.py            # full run (depths 2..64, 3 families, 2 seeds, a few minutes on 2 CPU cores)
    python experiments/degradation.py --quick    # smoke test (seconds)
    python experiments/degradation.py --help     # every setting
    python experiments/degradation.py --gallery docs/img/gallery   # also refresh the docs gallery's copies

Writes to `--out` (default `results/degradation/`): `degradation.png` (final training loss,
test accuracy and initial gradient norm against depth), `training.png` (training loss per
epoch, one panel per family) and `results.json` (command, environment, settings, per-run
metrics, histories). Each family, depth and seed is a line of `results.jsonl` as it finishes: a
rerun with the same settings resumes (and adding a depth or a seed trains only what is new);
`--fresh` starts over.
"""

from __future__ import annotations

import dataclasses
import math
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
from kit.data import mnist1d_arrays
from kit.skeleton import (ResultLog, build_parser, command_line, digest, environment, key_fields, opt,
                          parse_config, save_figure, script_main, write_json)

PROG = "degradation.py"
FAMILIES = ("plain", "residual", "ode")
COLOURS = {"plain": "#d62728", "residual": "#1f77b4", "ode": "#2ca02c"}


@dataclass
class DegradationConfig:
    depths: Tuple[int, ...] = opt((2, 4, 8, 16, 32, 64), "comma-separated depths (layers / residual blocks / Euler steps)",
                                  key=False, minimum=1, metavar="D,D,...")
    families: Tuple[str, ...] = opt(FAMILIES, "comma-separated model families: plain, residual, ode", key=False,
                                   metavar="F,F,...")
    width: int = opt(64, "width W of every layer", minimum=1)
    residual_step: str = opt("1/depth", "step h of the residual stack: '1/depth' or 'one' (h = 1)", choices=["1/depth", "one"])
    epochs: int = opt(30, "training epochs per model", minimum=1)
    batch_size: int = opt(128, "training batch size", minimum=1)
    lr: float = opt(1e-3, "Adam learning rate", positive=True)
    seeds: int = opt(2, "number of seeds (0, 1, ...) for initialisation and batch order", key=False, minimum=1)
    grad_batch: int = opt(256, "training examples in the batch for the gradient norm at initialisation", minimum=1)
    n_train: int = opt(0, "use only the first N training examples (0: all 4000)", minimum=0)
    threads: int = opt(1, "torch CPU threads (the networks are small: one is fastest)", key=False, minimum=1)
    dpi: int = opt(90, "resolution of the PNG figures", key=False, minimum=1)
    out: str = opt(os.path.join("results", "degradation"), "output directory", key=False)
    gallery: str = opt("", "also write small copies of the figures here (docs: docs/img/gallery)", key=False)
    fresh: bool = opt(False, "start over instead of reusing the runs finished in OUT/results.jsonl", key=False)


QUICK = dict(depths=(2, 8), epochs=1, seeds=1, n_train=512, width=32)


def parse_args(argv=None) -> DegradationConfig:
    parser = build_parser(DegradationConfig, prog=PROG, description=__doc__.split("\n\n")[0], quick=QUICK)
    return parse_config(DegradationConfig, argv, parser=parser, quick=QUICK, check=check)


def check(config: DegradationConfig) -> None:
    bad = [f for f in config.families if f not in FAMILIES]
    if bad or len(set(config.families)) != len(config.families):
        raise ValueError(f"--families must be a comma-separated subset of {','.join(FAMILIES)}, "
                         f"got {','.join(config.families)!r}.")


class Layer(nn.Module):
    """`f(t, x) = Linear(relu(x))` (with `t` as an extra input when `time_dependent`), He-normal weights."""

    def __init__(self, width: int, time_dependent: bool = False):
        super().__init__()
        self.time_dependent = time_dependent
        self.linear = nn.Linear(width + (1 if time_dependent else 0), width)
        nn.init.normal_(self.linear.weight, std=math.sqrt(2.0 / width))
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        h = torch.relu(x)
        if self.time_dependent:
            h = torch.cat([h, t.to(x.dtype).expand(x.shape[0], 1)], dim=1)
        return self.linear(h)


class Plain(nn.Module):
    def __init__(self, layers: List[Layer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.zeros((), dtype=x.dtype)
        for layer in self.layers:
            x = layer(t, x)
        return x


def make_stack(family: str, depth: int, config: DegradationConfig) -> nn.Module:
    w = config.width
    if family == "plain":
        return Plain([Layer(w) for _ in range(depth)])
    if family == "residual":
        h = 1.0 / depth if config.residual_step == "1/depth" else 1.0
        return nn.Sequential(*[odenet.ResBlock(Layer(w), h=h, t=i * h) for i in range(depth)])
    return odenet.ODEBlock(Layer(w, time_dependent=True), solver="euler", steps=depth)


class Net(nn.Module):
    def __init__(self, family: str, depth: int, config: DegradationConfig):
        super().__init__()
        self.stem = nn.Linear(40, config.width)
        self.stack = make_stack(family, depth, config)
        self.head = nn.Linear(config.width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stack(self.stem(x.flatten(1))))


def evaluate(model: Net, x: Tensor, y: Tensor):
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, acc


def run_one(family: str, depth: int, seed: int, config: DegradationConfig, data) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(100 * seed + depth)
    model = Net(family, depth, config)
    # gradient norm reaching the first layer at initialisation: one batch, no training
    xb, yb = x_train[: config.grad_batch], y_train[: config.grad_batch]
    model.zero_grad()
    nn.functional.cross_entropy(model(xb), yb).backward()
    grad_first = model.stem.weight.grad.norm().item()
    model.zero_grad()
    init_loss, _ = evaluate(model, x_train, y_train)

    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(x_train)
    history = []
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, config.batch_size):
            idx = perm[i:i + config.batch_size]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimiser.step()
        train_loss, train_acc = evaluate(model, x_train, y_train)
        history.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc})
    seconds = time.perf_counter() - start
    test_loss, test_acc = evaluate(model, x_test, y_test)
    train_loss = history[-1]["train_loss"]
    return {
        "family": family, "depth": depth, "seed": seed,
        "grad_norm_first_layer_init": grad_first,
        "initial_train_loss": init_loss,
        "train_loss": train_loss if math.isfinite(train_loss) else float("nan"),
        "train_accuracy": history[-1]["train_accuracy"],
        "test_loss": test_loss, "test_accuracy": test_acc,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": seconds, "history": history,
    }


def summarise(rows: List[dict], config: DegradationConfig) -> Dict[str, Dict[str, dict]]:
    out: Dict[str, Dict[str, dict]] = {}
    for fam in config.families:
        out[fam] = {}
        for d in config.depths:
            mine = [r for r in rows if r["family"] == fam and r["depth"] == d]
            entry = {}
            for key in ("train_loss", "test_accuracy", "grad_norm_first_layer_init", "train_seconds"):
                vals = np.array([r[key] for r in mine], dtype=float)
                entry[key] = float(np.mean(vals))
                entry[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
            entry["parameters"] = mine[0]["parameters"]
            out[fam][str(d)] = entry
    return out


def _style(ax) -> None:
    ax.grid(True, color="0.9", lw=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def degradation_figure(summary, config: DegradationConfig) -> Figure:
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    panels = [("train_loss", "final training loss (cross-entropy)", True),
              ("test_accuracy", "test accuracy", False),
              ("grad_norm_first_layer_init", "||dL/dW|| of the first layer at init", True)]
    depths = config.depths
    labels = {"plain": "plain  x = f(x)",
              "residual": f"residual  x = x + h f(x), h = {'1/depth' if config.residual_step == '1/depth' else '1'}",
              "ode": "ODE block (Euler, steps = depth, tied)"}
    for k, (key, title, logy) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        for fam, per_depth in summary.items():
            m = np.array([per_depth[str(d)][key] for d in depths])
            s = np.array([per_depth[str(d)][key + "_std"] for d in depths])
            ax.errorbar(depths, m, yerr=s, color=COLOURS[fam], marker="o", ms=4, lw=1.6, capsize=3, label=labels[fam])
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths)
        ax.set_xticklabels([str(d) for d in depths])
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("depth")
        ax.set_title(title, fontsize=10)
        _style(ax)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(f"MNIST-1D, width {config.width}, {config.epochs} epochs of Adam; mean ± std over {config.seeds} seed(s)",
                 fontsize=10)
    return fig


def training_figure(rows: List[dict], config: DegradationConfig) -> Figure:
    fams = config.families
    fig = Figure(figsize=(4.6 * len(fams), 3.8), layout="constrained")
    depths = config.depths
    cmap = __import__("matplotlib").colormaps["viridis"]
    axes = []
    for k, fam in enumerate(fams):
        ax = fig.add_subplot(1, len(fams), k + 1, sharey=axes[0] if axes else None)
        axes.append(ax)
        for j, d in enumerate(depths):
            runs = [r for r in rows if r["family"] == fam and r["depth"] == d]
            curve = np.mean([[h["train_loss"] for h in r["history"]] for r in runs], axis=0)
            ax.plot(np.arange(1, len(curve) + 1), curve, color=cmap(j / max(1, len(depths) - 1)), lw=1.5,
                    label=f"depth {d}")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(fam, fontsize=10)
        _style(ax)
    axes[0].set_ylabel("training loss (whole training set)")
    axes[-1].legend(fontsize=7)
    return fig


def save(fig: Figure, name: str, config: DegradationConfig) -> None:
    """Write `fig` to the output directory and, with --gallery, a small copy."""
    save_figure(fig, name, out=config.out, dpi=config.dpi, gallery=config.gallery, prefix="degradation_")


def main(argv=None) -> int:
    return script_main(PROG, parse_args, run, argv)


def run(config: DegradationConfig, argv=None) -> dict:
    torch.set_num_threads(config.threads)
    log = ResultLog(config.out, fresh=config.fresh)  # one line per family, depth and seed; a rerun reuses them
    settings = key_fields(config)
    data = mnist1d_arrays(config.n_train)
    rows = []
    start = time.perf_counter()
    for seed in range(config.seeds):
        for fam in config.families:
            for d in config.depths:
                key = digest(dict(settings, family=fam, depth=d, seed=seed))
                resumed = key in log.done
                r = log.done[key] if resumed else log.add(key, run_one(fam, d, seed, config, data))
                rows.append(r)
                print(f"seed {seed} {fam:8s} depth {d:3d}  grad@init {r['grad_norm_first_layer_init']:9.3g}  "
                      f"train loss {r['initial_train_loss']:.3f} -> {r['train_loss']:.4f}  "
                      f"test acc {r['test_accuracy']:.3f}  ({r['train_seconds']:.1f}s)"
                      + (" (from results.jsonl)" if resumed else ""), flush=True)
    summary = summarise(rows, config)
    save(degradation_figure(summary, config), "degradation.png", config)
    save(training_figure(rows, config), "training.png", config)
    result = {
        "experiment": "degradation",
        "command": command_line(PROG, argv),
        "environment": environment(),
        "config": dataclasses.asdict(config),
        "summary": summary,
        "runs": rows,
        "total_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(os.path.join(config.out, "results.json"), result)
    print(f"\nmean over {config.seeds} seed(s), {config.epochs} epochs, width {config.width}:")
    print(f"{'family':9s} {'depth':>5s} {'train loss':>11s} {'test acc':>9s} {'grad@init':>10s} {'params':>7s}")
    for fam, per_depth in summary.items():
        for d, s in per_depth.items():
            print(f"{fam:9s} {d:>5s} {s['train_loss']:11.4f} {s['test_accuracy']:9.3f} "
                  f"{s['grad_norm_first_layer_init']:10.3g} {s['parameters']:7d}")
    print(f"figures and results.json written to {os.path.join(os.path.abspath(config.out), '')}")
    return result


if __name__ == "__main__":
    sys.exit(main())
