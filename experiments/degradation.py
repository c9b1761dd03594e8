"""Degradation with depth (He et al. 2016): does a plain net's training loss rise past some depth
while a residual net's keeps falling?

Every model is `head(final(stack(stem(x))))` on MNIST-1D: `stem = Linear(40, W)`, `head =
Linear(W, 10)`, and a stack of `depth` layers `l(x) = Linear(relu(norm(x)))` (He-normal weights,
zero bias; `norm` is the identity, BatchNorm or LayerNorm), composed six ways:

- `plain`:         `x = l_i(x)`, no normalisation: a plain ReLU MLP;
- `plain-norm`:    `x = l_i(x)` with normalisation, as He et al.'s plain nets (which had BatchNorm);
- `resnet-norm`:   `x = x + l_2i(l_2i-1(x))`, `h = 1`, normalisation in the branch: the textbook
                   pre-activation ResNet block (He et al. 2016b), `depth/2` blocks;
- `resnet-zero`:   the same blocks with `h = 1`, no normalisation, the branch's last layer
                   zero-initialised (each block starts as the identity);
- `resnet-scaled`: the same blocks without normalisation, `h = 2/depth` (the total update over
                   the stack has a fixed size: an Euler discretisation of an ODE on [0, 1]);
- `ode`:           one `odenet.ODEBlock(f, solver="euler", steps=depth/2)` with one weight-tied
                   two-layer `f(t, x)` (`t` an extra input of both layers).

Every residual block is an `odenet.ResBlock(branch, h)`. The normalised families end with one more
`norm` before the head, as pre-activation ResNets do. All models are trained the same way (Adam,
cosine learning-rate decay, the same epochs and batches) at each learning rate of `--lrs`; for each
family and depth the learning rate with the lowest final training loss (mean over seeds) is the
one reported. At initialisation, before training, the script records on one batch the gradient
norm `||dL/dx_k||` of the state entering each unit of the stack (a layer, or a block: the `ode`
family is unrolled into its `depth/2` Euler steps, the same operations) and `||dL/dW||` of every
layer: the residual Jacobian `I + h dF/dx` against the plain chain's product of layer Jacobians.
Models train side by side in `--workers` processes (two, one torch thread each, by default).

    python experiments/degradation.py            # the full run (see docs/experiments/degradation.md)
    python experiments/degradation.py --quick    # smoke test (well under a minute)
    python experiments/degradation.py --help     # every setting
    python experiments/degradation.py --gallery docs/img/gallery   # also refresh the docs gallery's copies

Writes to `--out` (default `results/degradation/`): `degradation.png` (final training loss, test
accuracy and first-layer gradient at initialisation against depth), `gradients.png` (per-layer
gradient norms at initialisation for a few depths), `training.png` (training loss per epoch) and
`results.json` (command, environment, settings, summary, every run). Each family, depth, learning
rate and seed is a line of `results.jsonl` as it finishes: a rerun with the same settings resumes
(adding a depth, a seed or a learning rate trains only what is new); `--fresh` starts over.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from torch import Tensor, nn

import odenet
from kit.data import mnist1d_arrays
from kit.skeleton import (ResultLog, build_parser, command_line, digest, environment, key_fields, opt,
                          parse_config, save_figure, script_main, write_json)
from kit.training import resolve_device

PROG = "degradation.py"
FAMILIES = ("plain", "plain-norm", "resnet-norm", "resnet-zero", "resnet-scaled", "ode")
NORMED = ("plain-norm", "resnet-norm")
COLOURS = {"plain": "#d62728", "plain-norm": "#ff7f0e", "resnet-norm": "#1f77b4", "resnet-zero": "#17becf",
           "resnet-scaled": "#9467bd", "ode": "#2ca02c"}


@dataclass
class DegradationConfig:
    depths: Tuple[int, ...] = opt((2, 4, 8, 16, 32, 64), "comma-separated depths: layers in the stack (even: "
                                  "residual blocks hold two layers)", key=False, minimum=2, metavar="D,D,...")
    families: Tuple[str, ...] = opt(FAMILIES, "comma-separated model families: " + ", ".join(FAMILIES), key=False,
                                    metavar="F,F,...")
    norm: str = opt("batch", "normalisation of plain-norm and resnet-norm", choices=["batch", "layer"])
    width: int = opt(64, "width W of every layer", minimum=1)
    epochs: int = opt(20, "training epochs per model", minimum=1)
    batch_size: int = opt(128, "training batch size", minimum=1)
    lrs: Tuple[float, ...] = opt((1e-3, 3e-3, 1e-2), "comma-separated Adam learning rates (peak of the cosine decay); "
                                 "the best by training loss is reported", key=False, metavar="LR,LR,...")
    seeds: int = opt(2, "number of seeds (0, 1, ...) for initialisation and batch order", key=False, minimum=1)
    grad_batch: int = opt(256, "training examples in the batch for the gradient norms at initialisation", minimum=1)
    n_train: int = opt(0, "use only the first N training examples (0: all 4000)", minimum=0)
    device: str = opt("cpu", "cpu, cuda or auto (CUDA when available)", key=False, choices=["cpu", "cuda", "auto"])
    workers: int = opt(2, "processes training models side by side (CPU only; 1: in this process)", key=False,
                       minimum=1)
    threads: int = opt(1, "torch CPU threads per process (the networks are small: one is fastest)", key=False,
                       minimum=1)
    dpi: int = opt(90, "resolution of the PNG figures", key=False, minimum=1)
    out: str = opt(os.path.join("results", "degradation"), "output directory", key=False)
    gallery: str = opt("", "also write small copies of the figures here (docs: docs/img/gallery)", key=False)
    fresh: bool = opt(False, "start over instead of reusing the runs finished in OUT/results.jsonl", key=False)


QUICK = dict(depths=(2, 8), epochs=1, seeds=1, lrs=(3e-3,), n_train=512, width=16, grad_batch=64, workers=1)


def parse_args(argv=None) -> DegradationConfig:
    parser = build_parser(DegradationConfig, prog=PROG, description=__doc__.split("\n\n")[0], quick=QUICK)
    return parse_config(DegradationConfig, argv, parser=parser, quick=QUICK, check=check)


def check(config: DegradationConfig) -> None:
    bad = [f for f in config.families if f not in FAMILIES]
    if bad or len(set(config.families)) != len(config.families):
        raise ValueError(f"--families must be a comma-separated subset of {','.join(FAMILIES)}, "
                         f"got {','.join(config.families)!r}.")
    odd = [d for d in config.depths if d % 2]
    if odd:
        raise ValueError(f"--depths must be even (a residual block holds two layers), got {','.join(map(str, odd))}.")
    if len(set(config.lrs)) != len(config.lrs):
        raise ValueError(f"--lrs values repeat: {','.join(f'{lr:g}' for lr in config.lrs)}.")
    try:
        device = resolve_device(config.device)
    except ValueError as err:
        raise ValueError(f"--device {config.device}: {err}") from None
    if device.type != "cpu" and config.workers > 1:
        raise ValueError(f"--workers {config.workers} trains on the CPU only; with --device {config.device} "
                         "use --workers 1.")


# ---------------------------------------------------------------------------- models


def make_norm(kind: str, width: int) -> nn.Module:
    return {"none": nn.Identity, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[kind](width)


class Layer(nn.Module):
    """`Linear(relu(norm(x)))` (with `t` as an extra input when `time`); He-normal weights, or zeros when `zero`."""

    def __init__(self, width: int, norm: str = "none", zero: bool = False, time: bool = False):
        super().__init__()
        self.norm = make_norm(norm, width)
        self.time = time
        self.linear = nn.Linear(width + time, width)
        nn.init.zeros_(self.linear.weight) if zero else nn.init.normal_(self.linear.weight, std=math.sqrt(2.0 / width))
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, t: Optional[Tensor] = None) -> Tensor:
        h = torch.relu(self.norm(x))
        if self.time:
            h = torch.cat([h, t.to(x.dtype).expand(x.shape[0], 1)], dim=1)
        return self.linear(h)


class Branch(nn.Module):
    """A residual branch `f(t, x) = l2(l1(x))` of two `Layer`s."""

    def __init__(self, width: int, norm: str = "none", zero_end: bool = False, time: bool = False):
        super().__init__()
        self.l1 = Layer(width, norm, time=time)
        self.l2 = Layer(width, norm, zero=zero_end, time=time)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.l2(self.l1(x, t), t)


def make_units(family: str, depth: int, width: int, norm: str) -> List[nn.Module]:
    """The stack of `family` at `depth` layers, as a list of modules `x -> x` (one `ODEBlock` for `ode`)."""
    blocks = depth // 2
    if family in ("plain", "plain-norm"):
        return [Layer(width, norm if family == "plain-norm" else "none") for _ in range(depth)]
    if family == "ode":
        return [odenet.ODEBlock(Branch(width, time=True), solver="euler", steps=blocks)]
    h = 2.0 / depth if family == "resnet-scaled" else 1.0
    kw = dict(norm=norm) if family == "resnet-norm" else dict(zero_end=family == "resnet-zero")
    return [odenet.ResBlock(Branch(width, **kw), h=h, t=i * h) for i in range(blocks)]


class Net(nn.Module):
    def __init__(self, family: str, depth: int, width: int, norm: str = "batch"):
        super().__init__()
        self.family = family
        self.stem = nn.Linear(40, width)
        self.units = nn.ModuleList(make_units(family, depth, width, norm))
        self.final = make_norm(norm if family in NORMED else "none", width)
        self.head = nn.Linear(width, 10)

    def probe_units(self) -> List[nn.Module]:
        """The stack as the units whose input gradients are measured: the `ode` block as its Euler steps."""
        if self.family != "ode":
            return list(self.units)
        block = self.units[0]
        n = block.options.control.steps
        return [odenet.ResBlock(block.f, h=1.0 / n, t=i / n) for i in range(n)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x.flatten(1))
        for unit in self.units:
            x = unit(x)
        return self.head(self.final(x))


def stack_layers(model: Net) -> List[nn.Linear]:
    """The Linear layers of the stack in order of depth (the `ode` family's tied ones once)."""
    return [m for m in model.units.modules() if isinstance(m, nn.Linear)]


def init_gradients(model: Net, x: Tensor, y: Tensor) -> Dict[str, List[float]]:
    """At the current weights, on `(x, y)` in training mode: the loss `L` (mean cross-entropy) and
    `grad_x[k] = ||dL/dx_k||` for the state entering unit `k` of
    the stack (the last entry is the stack's output), `grad_w` the `||dL/dW||` of each stack layer and of
    the stem. The model's weights, buffers and `.grad` are left as they were."""
    buffers = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm's running statistics
    states = [model.stem(x.flatten(1))]
    for unit in model.probe_units():
        states.append(unit(states[-1]))
    loss = nn.functional.cross_entropy(model.head(model.final(states[-1])), y)
    weights = [model.stem.weight] + [m.weight for m in stack_layers(model)]
    grads = torch.autograd.grad(loss, states + weights)
    norms = [g.norm().item() for g in grads]
    model.load_state_dict(buffers)
    n = len(states)
    return dict(initial_loss=loss.item(), grad_x=norms[:n], grad_w_stem=norms[n], grad_w=norms[n + 1:])


# ---------------------------------------------------------------------------- training


def evaluate(model: Net, x: Tensor, y: Tensor) -> Tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, acc


def finite(v: float) -> float:
    return v if math.isfinite(v) else float("nan")


def run_one(family: str, depth: int, lr: float, seed: int, config: DegradationConfig, data, device) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(1000 * seed + depth)
    model = Net(family, depth, config.width, config.norm).to(device)
    probe = init_gradients(model, x_train[: config.grad_batch], y_train[: config.grad_batch])
    gen = torch.Generator().manual_seed(seed)
    n, b = len(x_train), config.batch_size
    steps = config.epochs * math.ceil(n / b)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    history = []
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        perm = torch.randperm(n, generator=gen).to(device)
        batch_losses = torch.zeros(math.ceil(n / b), device=device)
        for j, i in enumerate(range(0, n, b)):
            idx = perm[i:i + b]
            optimiser.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimiser.step()
            schedule.step()
            batch_losses[j] = loss.detach()
        train_loss, train_acc = evaluate(model, x_train, y_train)
        history.append(dict(epoch=epoch, train_loss=finite(train_loss), train_accuracy=train_acc,
                            batch_loss=finite(batch_losses.mean().item())))
        if not math.isfinite(train_loss):
            break  # diverged: the rest of the run would be NaN too
    seconds = time.perf_counter() - start
    test_loss, test_acc = evaluate(model, x_test, y_test)
    return dict(family=family, depth=depth, lr=lr, seed=seed,
                train_loss=history[-1]["train_loss"], train_accuracy=history[-1]["train_accuracy"],
                batch_loss=history[-1]["batch_loss"],
                test_loss=finite(test_loss), test_accuracy=test_acc,
                parameters=sum(p.numel() for p in model.parameters()), train_seconds=seconds,
                history=history, **probe)


# ---------------------------------------------------------------------------- summary


def _mean_std(values) -> Tuple[float, float]:
    v = np.array(values, dtype=float)
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarise(rows: List[dict], config: DegradationConfig) -> Dict[str, Dict[str, dict]]:
    """Per family and depth: the learning rate with the lowest mean final training loss (a diverged run
    counts as infinite) and its metrics as mean and std over seeds; every learning rate's mean loss."""
    out: Dict[str, Dict[str, dict]] = {}
    for fam in config.families:
        out[fam] = {}
        for d in config.depths:
            mine = [r for r in rows if r["family"] == fam and r["depth"] == d]
            by_lr = {lr: [r for r in mine if r["lr"] == lr] for lr in config.lrs}
            loss = {lr: float(np.mean([r["train_loss"] if math.isfinite(r["train_loss"]) else math.inf for r in rs]))
                    for lr, rs in by_lr.items()}
            best = min(config.lrs, key=lambda lr: loss[lr])
            entry: Dict[str, object] = dict(lr=best, train_loss_by_lr={f"{lr:g}": loss[lr] for lr in config.lrs})
            for key in ("train_loss", "batch_loss", "test_accuracy", "train_accuracy", "grad_w_stem", "train_seconds"):
                entry[key], entry[key + "_std"] = _mean_std([r[key] for r in by_lr[best]])
            first = by_lr[config.lrs[0]]  # the gradients at initialisation do not depend on the learning rate
            entry["grad_ratio"], entry["grad_ratio_std"] = _mean_std([r["grad_x"][0] / r["grad_x"][-1] for r in first])
            entry["grad_x"] = np.mean([r["grad_x"] for r in first], axis=0).tolist()
            entry["grad_w"] = np.mean([r["grad_w"] for r in first], axis=0).tolist()
            entry["parameters"] = mine[0]["parameters"]
            out[fam][str(d)] = entry
    return out


# ---------------------------------------------------------------------------- figures

LABELS = {"plain": "plain", "plain-norm": "plain + {norm}", "resnet-norm": "ResNet h=1 + {norm}",
          "resnet-zero": "ResNet h=1, zero-init branch end", "resnet-scaled": "ResNet h=2/depth",
          "ode": "ODE (Euler, steps=depth/2, tied)"}


def label(fam: str, config: DegradationConfig) -> str:
    return LABELS[fam].format(norm={"batch": "BatchNorm", "layer": "LayerNorm"}[config.norm])


def _style(ax) -> None:
    ax.grid(True, color="0.9", lw=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _log_y(ax) -> None:
    """Log scale with plain numbers; the 2s and 5s between powers of ten labelled when the axis spans few decades."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    few = high / low < 300
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if few and f"{v:.0e}"[0] in "25" else ""))


def _depth_axis(ax, depths) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths)
    ax.set_xticklabels([str(d) for d in depths])
    ax.set_xlabel("depth (layers in the stack)")


def degradation_figure(summary, config: DegradationConfig) -> Figure:
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    panels = [("train_loss", "final training loss (best lr)", True), ("test_accuracy", "test accuracy", False),
              ("grad_ratio", "at init: ||dL/dx|| at stack input / at stack output", True)]
    for k, (key, title, logy) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        for fam, per_depth in summary.items():
            m = np.array([per_depth[str(d)][key] for d in config.depths])
            s = np.array([per_depth[str(d)][key + "_std"] for d in config.depths])
            ax.errorbar(config.depths, m, yerr=s, color=COLOURS[fam], marker="o", ms=4, lw=1.6, capsize=3,
                        label=label(fam, config))
        _depth_axis(ax, config.depths)
        if logy:
            _log_y(ax)
        ax.set_title(title, fontsize=10)
        _style(ax)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(f"MNIST-1D, width {config.width}, {config.epochs} epochs of Adam (cosine), best of lr "
                 f"{','.join(f'{lr:g}' for lr in config.lrs)}; mean ± std over {config.seeds} seed(s)", fontsize=10)
    return fig


def gradients_figure(summary, config: DegradationConfig) -> Figure:
    """`||dL/dx||` of the state entering each unit against its depth in layers, one panel per depth shown."""
    shown = [d for d in config.depths if d >= 8][-3:] or list(config.depths[-3:])
    fig = Figure(figsize=(4.8 * len(shown), 4.0), layout="constrained")
    axes = []
    for k, d in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), k + 1, sharey=axes[0] if axes else None)
        axes.append(ax)
        for fam, per_depth in summary.items():
            g = per_depth[str(d)]["grad_x"]
            layer = np.linspace(0, d, len(g))  # units hold 1 (plain) or 2 (residual) layers
            ax.plot(layer, g, color=COLOURS[fam], marker="." if len(g) <= 33 else None, lw=1.4,
                    label=label(fam, config))
        _log_y(ax)
        ax.set_xlabel("layer (0: stack input)")
        ax.set_title(f"depth {d}", fontsize=10)
        _style(ax)
    axes[0].set_ylabel("||dL/dx|| at initialisation")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"gradient at each layer at init ({config.grad_batch} examples, {config.seeds} seed(s))",
                 fontsize=10)
    return fig


def training_figure(rows: List[dict], summary, config: DegradationConfig) -> Figure:
    fams = config.families
    cols = min(3, len(fams))
    nrows = math.ceil(len(fams) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * nrows), layout="constrained")
    cmap = __import__("matplotlib").colormaps["viridis"]
    axes = []
    for k, fam in enumerate(fams):
        ax = fig.add_subplot(nrows, cols, k + 1, sharey=axes[0] if axes else None)
        axes.append(ax)
        for j, d in enumerate(config.depths):
            lr = summary[fam][str(d)]["lr"]
            runs = [r for r in rows if r["family"] == fam and r["depth"] == d and r["lr"] == lr]
            n = min(len(r["history"]) for r in runs)
            curve = np.mean([[h["train_loss"] for h in r["history"][:n]] for r in runs], axis=0)
            ax.plot(np.arange(1, n + 1), curve, color=cmap(j / max(1, len(config.depths) - 1)), lw=1.4,
                    marker="o" if n < 4 else None, label=f"depth {d} (lr {lr:g})")
        _log_y(ax)
        ax.set_xlabel("epoch")
        ax.set_title(label(fam, config), fontsize=10)
        ax.legend(fontsize=6)
        _style(ax)
    axes[0].set_ylabel("training loss (whole training set)")
    return fig


def save(fig: Figure, name: str, config: DegradationConfig) -> None:
    """Write `fig` to the output directory and, with --gallery, a small copy."""
    save_figure(fig, name, out=config.out, dpi=config.dpi, gallery=config.gallery, prefix="degradation_")


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    return script_main(PROG, parse_args, run, argv)


def print_table(summary, config: DegradationConfig) -> None:
    print(f"\nbest lr per family and depth; mean over {config.seeds} seed(s), {config.epochs} epochs, "
          f"width {config.width}:")
    print(f"{'family':14s} {'depth':>5s} {'lr':>7s} {'train loss':>11s} {'test acc':>9s} {'stem grad':>10s} "
          f"{'dL/dx in/out':>12s} {'params':>7s}")
    for fam, per_depth in summary.items():
        for d, s in per_depth.items():
            ratio = s["grad_ratio"]
            print(f"{fam:14s} {d:>5s} {s['lr']:7.0e} {s['train_loss']:11.4f} {s['test_accuracy']:9.3f} "
                  f"{s['grad_w_stem']:10.3g} {ratio:12.3g} {s['parameters']:7d}")


def report(r: dict, note: str = "") -> None:
    print(f"seed {r['seed']} {r['family']:13s} depth {r['depth']:3d} lr {r['lr']:<6g} "
          f"stem grad {r['grad_w_stem']:9.3g}  "
          f"loss {r['initial_loss']:.3f} -> {r['train_loss']:.4f}  test acc {r['test_accuracy']:.3f}  "
          f"({r['train_seconds']:.1f}s)" + note, flush=True)


_WORKER: dict = {}


def _init_worker(config: DegradationConfig, arrays) -> None:
    torch.set_num_threads(config.threads)
    _WORKER.update(config=config, data=[torch.from_numpy(a) for a in arrays])


def _work(task) -> dict:
    return run_one(*task, _WORKER["config"], _WORKER["data"], torch.device("cpu"))


def train_all(todo, config: DegradationConfig, data, device) -> Iterator[Tuple[tuple, dict]]:
    """`(task, result)` of each `(family, depth, lr, seed)` as it finishes: here, or in `--workers` processes."""
    if config.workers == 1 or len(todo) <= 1:
        for task in todo:
            yield task, run_one(*task, config, data, device)
        return
    arrays = [t.numpy() for t in data]
    with ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(config, arrays)) as pool:
        futures = {pool.submit(_work, task): task for task in todo}
        for done in as_completed(futures):
            yield futures[done], done.result()


def run(config: DegradationConfig, argv=None) -> dict:
    device = resolve_device(config.device)
    torch.set_num_threads(config.threads)
    log = ResultLog(config.out, fresh=config.fresh)  # one line per family, depth, lr and seed; a rerun reuses them
    settings = key_fields(config)
    data = [t.to(device) for t in mnist1d_arrays(config.n_train)]
    tasks = [(fam, d, lr, seed) for seed in range(config.seeds) for fam in config.families
             for d in config.depths for lr in config.lrs]
    keys = {task: digest(dict(settings, family=task[0], depth=task[1], lr=task[2], seed=task[3])) for task in tasks}
    start = time.perf_counter()
    for task in tasks:
        if keys[task] in log.done:
            report(log.done[keys[task]], " (from results.jsonl)")
    todo = sorted((t for t in tasks if keys[t] not in log.done), key=lambda t: -t[1])  # deepest first: balanced workers
    for task, row in train_all(todo, config, data, device):
        report(log.add(keys[task], row))
    rows = [log.done[keys[task]] for task in tasks]
    summary = summarise(rows, config)
    save(degradation_figure(summary, config), "degradation.png", config)
    save(gradients_figure(summary, config), "gradients.png", config)
    save(training_figure(rows, summary, config), "training.png", config)
    result = dict(experiment="degradation", command=command_line(PROG, argv), environment=environment(device),
                  config=dataclasses.asdict(config), summary=summary, runs=rows,
                  total_seconds=time.perf_counter() - start)
    write_json(os.path.join(config.out, "results.json"), result)
    print_table(summary, config)
    print(f"figures and results.json written to {os.path.join(os.path.abspath(config.out), '')}")
    return result


if __name__ == "__main__":
    sys.exit(main())
