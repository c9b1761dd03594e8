"""NFE against tolerance, forward against backward NFE, and NFE over training (Chen et al. 2018, Fig. 3).

Chen et al. (2018) trained an ODE-Net on MNIST with the adjoint method and showed (Fig. 3):
(a) the numerical error falls as the forward NFE grows, (b) time grows with NFE, (c) the
backward (adjoint) solve costs about half the forward NFE or more and tracks it, and (d) the
forward NFE grows during training. This script measures the same with odenet on MNIST-1D
(4000 training / 1000 test signals of length 40), plus two things that came after the paper:
the seminorm of Kidger et al. (2021) for the adjoint's error control (`adjoint_seminorm=True`)
and RNODE regularisation (Finlay et al. 2020, `odenet.RNODE`), trained side by side with
an unregularised model. The model is

    logits = Linear(W, 10)(ODEBlock(MLPDynamics(W), dopri5, gradient="adjoint")(Linear(40, W)(x)))

trained with Adam at `rtol = atol = --train-tol`. After training, each model is re-solved
(same `f`, `odenet.ODEBlock(model.block.f, ...)`) at every tolerance of `--tols`: forward NFE
and test accuracy of a test-set solve, the error of the final state against a float64
reference (dopri5 at 1e-10), and the backward NFE of one training batch with the plain
adjoint and with the seminorm.

    python experiments/nfe_tolerance.py            # full run (2 models, about 1-2 minutes on 2 CPU cores)
    python experiments/nfe_tolerance.py --quick    # smoke test (seconds)
    python experiments/nfe_tolerance.py --help     # every setting
    python experiments/nfe_tolerance.py --gallery docs/img/gallery   # also refresh the docs gallery's copies

Writes to `--out` (default `results/nfe_tolerance/`): `nfe_tolerance.png` (the four panels:
NFE against tolerance, error against NFE, backward against forward NFE, NFE over
training), `pareto.png` (test accuracy against forward NFE over the tolerance sweep, both
models) and `results.json` (command, environment, settings, the sweep, training histories, the
RNODE saving). Each model (trained and swept) is a line of `results.jsonl` as it finishes: a rerun
with the same settings resumes, `--fresh` starts over.
"""

from __future__ import annotations

import copy
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
from kit.data import mnist1d_arrays
from kit.models import check_solver_settings
from kit.skeleton import (ResultLog, build_parser, command_line, digest, environment, key_fields, opt,
                          parse_config, save_figure, script_main, write_json)
from odenet import plotting

PROG = "nfe_tolerance.py"


@dataclass
class NFEToleranceConfig:
    width: int = opt(32, "state width W of the ODE block", minimum=1)
    hidden: int = opt(64, "hidden width of the dynamics MLP", minimum=1)
    layers: int = opt(2, "hidden layers of the dynamics MLP", minimum=1)
    activation: str = opt("tanh", "activation of the dynamics MLP")
    epochs: int = opt(25, "training epochs per model", minimum=1)
    batch_size: int = opt(128, "training batch size", minimum=1)
    lr: float = opt(3e-3, "Adam learning rate", positive=True)
    train_tol: float = opt(1e-3, "rtol = atol of dopri5 in training (Chen et al.: 1e-3)")
    train_seminorm: bool = opt(False, "use the adjoint seminorm during training (Chen et al.: no)")
    tols: Tuple[float, ...] = opt((1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6),
                                  "comma-separated tolerances of the sweep", metavar="TOL,...")
    kinetic: float = opt(0.01, "RNODE kinetic-energy weight of the regularised model", minimum=0)
    jacobian: float = opt(0.01, "RNODE Jacobian-norm weight of the regularised model", minimum=0)
    error_target: float = opt(1e-5, "relative error of x(1) at which the NFE of the two models is compared", positive=True)
    n_train: int = opt(0, "use only the first N training examples (0: all 4000)", minimum=0)
    seed: int = opt(0, "random seed (initialisation and batch order; both models share it)", minimum=0)
    threads: int = opt(1, "torch CPU threads (the networks are small: one is fastest)", key=False, minimum=1)
    dpi: int = opt(90, "resolution of the PNG figures", key=False, minimum=1)
    out: str = opt(os.path.join("results", "nfe_tolerance"), "output directory", key=False)
    gallery: str = opt("", "also write small copies of the figures here (docs: docs/img/gallery)", key=False)
    fresh: bool = opt(False, "start over instead of reusing the models finished in OUT/results.jsonl", key=False)


QUICK = dict(epochs=1, n_train=384, tols=(1e-1, 1e-3))
MODELS = ("none", "RNODE")
COLOURS = {"none": "#1f77b4", "RNODE": "#ff7f0e"}


def parse_args(argv=None) -> NFEToleranceConfig:
    parser = build_parser(NFEToleranceConfig, prog=PROG, description=__doc__.split("\n\n")[0], quick=QUICK)
    return parse_config(NFEToleranceConfig, argv, parser=parser, quick=QUICK, check=check)


def check(config: NFEToleranceConfig) -> None:
    if config.kinetic + config.jacobian == 0:
        raise ValueError(f"--kinetic and --jacobian must not both be 0, got {config.kinetic}, {config.jacobian}.")
    check_solver_settings("dopri5", rtol=config.train_tol, atol=config.train_tol, gradient="adjoint")
    odenet.MLPDynamics(dim=config.width, hidden=config.hidden, layers=config.layers, activation=config.activation)


class Classifier(nn.Module):
    def __init__(self, config: NFEToleranceConfig, regularised: bool):
        super().__init__()
        self.stem = nn.Linear(40, config.width)
        f = odenet.MLPDynamics(dim=config.width, hidden=config.hidden, layers=config.layers, activation=config.activation)
        reg = odenet.RNODE(kinetic=config.kinetic, jacobian=config.jacobian) if regularised else None
        self.block = odenet.ODEBlock(f, solver="dopri5", rtol=config.train_tol, atol=config.train_tol, gradient="adjoint",
                                     adjoint_seminorm=config.train_seminorm, regularization=reg)
        self.head = nn.Linear(config.width, 10)

    def forward(self, x: Tensor, block: nn.Module = None) -> Tensor:
        return self.head((block or self.block)(self.stem(x.flatten(1))))


def train(kind: str, config: NFEToleranceConfig, data) -> (Classifier, List[dict], float):
    x_train, y_train = data[0], data[1]
    torch.manual_seed(config.seed)
    model = Classifier(config, regularised=kind == "RNODE")
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    it = 0
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), config.batch_size):
            idx = perm[i:i + config.batch_size]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            reg = model.block.last_regularization
            (loss + reg if reg is not None else loss).backward()
            optimiser.step()
            it += 1
            s = model.block.last_stats
            history.append({"iteration": it, "epoch": epoch, "loss": loss.item(), "nfe_forward": s.nfe_forward,
                            "nfe_backward": s.nfe_backward,
                            **({"regularization": reg.item()} if reg is not None else {})})
        last = history[-(len(x_train) + config.batch_size - 1) // config.batch_size:]
        print(f"  {kind:5s} epoch {epoch:3d}  loss {np.mean([h['loss'] for h in last]):.4f}  "
              f"NFE fwd {np.mean([h['nfe_forward'] for h in last]):5.1f}  bwd {np.mean([h['nfe_backward'] for h in last]):5.1f}",
              flush=True)
    return model, history, time.perf_counter() - start


def sweep(model: Classifier, config: NFEToleranceConfig, data) -> List[dict]:
    """Re-solve the trained model's ODE at every tolerance (eval mode, so no regularisation term)."""
    x_train, y_train, x_test, y_test = data
    model.eval()
    f = model.block.f
    with torch.no_grad():
        z_test = model.stem(x_test.flatten(1))
        f64 = copy.deepcopy(f).double()
        ref = odenet.odeint(f64, z_test.double(), [0.0, 1.0], rtol=1e-10, atol=1e-10).ys[-1]
    xb, yb = x_train[: config.batch_size], y_train[: config.batch_size]
    rows = []
    for tol in config.tols:
        block = odenet.ODEBlock(f, solver="dopri5", rtol=tol, atol=tol, gradient="adjoint")
        with torch.no_grad():
            t0 = time.perf_counter()
            z1 = block(z_test)
            seconds = time.perf_counter() - t0
            nfe_fwd = block.last_stats.nfe_forward
            acc = (model.head(z1).argmax(1) == y_test).float().mean().item()
            err = ((z1.double() - ref).norm(dim=1) / ref.norm(dim=1)).mean().item()
        row = {"tol": tol, "nfe_forward": nfe_fwd, "test_accuracy": acc, "relative_error": err,
               "forward_seconds": seconds}
        for seminorm in (False, True):
            b = odenet.ODEBlock(f, solver="dopri5", rtol=tol, atol=tol, gradient="adjoint", adjoint_seminorm=seminorm)
            model.zero_grad()
            nn.functional.cross_entropy(model(xb, b), yb).backward()
            key = "seminorm" if seminorm else "adjoint"
            row[f"batch_nfe_forward_{key}"] = b.last_stats.nfe_forward
            row[f"nfe_backward_{key}"] = b.last_stats.nfe_backward
        model.zero_grad()
        rows.append(row)
    model.train()
    return rows


def rnode_saving(sweeps: Dict[str, List[dict]], config: NFEToleranceConfig) -> dict:
    """What RNODE saves, three ways: (1) at the training tolerance (both models as trained);
    (2) at equal accuracy: the least sweep NFE at which each model reaches the lower of the two
    models' best sweep accuracies, less 0.5 points; (3) at equal numerical error: the least
    sweep NFE at which each model's relative error of x(1) is at most `--error-target`."""
    at_train = {}
    for kind, rows in sweeps.items():
        row = min(rows, key=lambda r: abs(np.log(r["tol"] / config.train_tol)))
        at_train[kind] = {k: row[k] for k in ("tol", "nfe_forward", "test_accuracy", "relative_error")}
    at_train["nfe_saving"] = 1 - at_train["RNODE"]["nfe_forward"] / at_train["none"]["nfe_forward"]
    target = min(max(r["test_accuracy"] for r in rows) for rows in sweeps.values()) - 0.005
    equal = {"target_accuracy": target}
    for kind, rows in sweeps.items():
        best = min((r for r in rows if r["test_accuracy"] >= target), key=lambda r: r["nfe_forward"])
        equal[kind] = {k: best[k] for k in ("tol", "nfe_forward", "test_accuracy", "relative_error")}
    equal["nfe_saving"] = 1 - equal["RNODE"]["nfe_forward"] / equal["none"]["nfe_forward"]
    error = {"target_relative_error": config.error_target}
    for kind, rows in sweeps.items():
        ok = [r for r in rows if r["relative_error"] <= config.error_target]
        best = min(ok, key=lambda r: r["nfe_forward"]) if ok else None
        error[kind] = {k: best[k] for k in ("tol", "nfe_forward", "test_accuracy", "relative_error")} if best else None
    error["nfe_saving"] = (1 - error["RNODE"]["nfe_forward"] / error["none"]["nfe_forward"]
                           if error["RNODE"] and error["none"] else None)
    return {"at_train_tol": at_train, "at_equal_accuracy": equal, "at_equal_error": error}


def _style(ax) -> None:
    ax.grid(True, color="0.9", lw=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def main_figure(sweeps, histories, config: NFEToleranceConfig) -> Figure:
    fig = Figure(figsize=(12, 8.4), layout="constrained")
    ax_a, ax_b, ax_c, ax_d = (fig.add_subplot(2, 2, k) for k in (1, 2, 3, 4))
    for kind, rows in sweeps.items():
        c = COLOURS[kind]
        tols = [r["tol"] for r in rows]
        ax_a.plot(tols, [r["nfe_forward"] for r in rows], color=c, marker="o", ms=4, lw=1.5, label=f"{kind}: forward")
        ax_a.plot(tols, [r["nfe_backward_adjoint"] for r in rows], color=c, marker="s", ms=4, lw=1.2, ls="--",
                  label=f"{kind}: backward (adjoint)")
        ax_a.plot(tols, [r["nfe_backward_seminorm"] for r in rows], color=c, marker="^", ms=4, lw=1.2, ls=":",
                  label=f"{kind}: backward (seminorm)")
        ax_b.plot([r["nfe_forward"] for r in rows], [max(r["relative_error"], 1e-12) for r in rows], color=c,
                  marker="o", ms=4, lw=1.5, label=kind)
        fwd = [r["batch_nfe_forward_adjoint"] for r in rows]
        ax_c.scatter(fwd, [r["nfe_backward_adjoint"] for r in rows], color=c, marker="s", s=22,
                     label=f"{kind}: adjoint (sweep)")
        ax_c.scatter(fwd, [r["nfe_backward_seminorm"] for r in rows], color=c, marker="^", s=22, facecolors="none",
                     label=f"{kind}: seminorm (sweep)")
        hist = histories[kind]
        ax_c.scatter([h["nfe_forward"] for h in hist], [h["nfe_backward"] for h in hist], color=c, s=3, alpha=0.15,
                     label=f"{kind}: training iterations")
        window = max(1, len(hist) // 40)
        plotting.plot_nfe_over_training(hist, keys=["nfe_forward", "nfe_backward"], label=kind, color=c,
                                        smooth=window, ax=ax_d)
    ax_a.set_xscale("log")
    ax_a.invert_xaxis()
    ax_a.set_xlabel("rtol = atol (tighter to the right)")
    ax_a.set_ylabel("NFE")
    ax_a.set_title("(a) NFE against tolerance (test-set / one-batch solves)", fontsize=10)
    ax_a.legend(fontsize=7, ncol=2)
    ax_b.set_yscale("log")
    ax_b.set_xlabel("forward NFE")
    ax_b.set_ylabel("relative error of x(1) vs float64 reference")
    ax_b.set_title("(b) numerical error against forward NFE", fontsize=10)
    ax_b.legend(fontsize=8)
    lim = max(ax_c.get_xlim()[1], ax_c.get_ylim()[1])
    ax_c.plot([0, lim], [0, lim], color="0.6", lw=0.8, ls="--", label="backward = forward")
    ax_c.set_xlabel("forward NFE")
    ax_c.set_ylabel("backward NFE")
    ax_c.set_title("(c) backward against forward NFE", fontsize=10)
    ax_c.legend(fontsize=7)
    ax_d.set_title(f"(d) NFE over training (dopri5 at {config.train_tol:g}, adjoint)", fontsize=10)
    for ax in (ax_a, ax_b, ax_c):
        _style(ax)
    return fig


def pareto_figure(sweeps, config: NFEToleranceConfig) -> Figure:
    points = [{"label": kind, "nfe": r["nfe_forward"], "accuracy": r["test_accuracy"], "tol": f"{r['tol']:g}"}
              for kind, rows in sweeps.items() for r in rows]
    fig = plotting.plot_pareto(points, x="nfe", y="accuracy", logx=True, annotate="tol")
    ax = fig.axes[0]
    ax.set_xlabel("forward NFE of the test-set solve")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy against cost over the tolerance sweep (better: up and to the left)", fontsize=10)
    return fig


def save(fig: Figure, name: str, config: NFEToleranceConfig) -> None:
    """Write `fig` to the output directory and, with --gallery, a small copy."""
    save_figure(fig, name, out=config.out, dpi=config.dpi, gallery=config.gallery, prefix="nfe_tolerance_")


def main(argv=None) -> int:
    return script_main(PROG, parse_args, run, argv)


def run(config: NFEToleranceConfig, argv=None) -> dict:
    torch.set_num_threads(config.threads)
    log = ResultLog(config.out, fresh=config.fresh)  # one line per model; a rerun reuses them
    data = mnist1d_arrays(config.n_train)
    start = time.perf_counter()
    histories, sweeps, train_seconds = {}, {}, {}
    for kind in MODELS:
        key = digest(dict(key_fields(config), model=kind))
        if key in log.done:
            row = log.done[key]
            print(f"{kind}: trained in {row['train_seconds']:.0f}s (from results.jsonl)", flush=True)
        else:
            model, history, seconds = train(kind, config, data)
            row = log.add(key, dict(model=kind, history=history, sweep=sweep(model, config, data), train_seconds=seconds))
            print(f"{kind}: trained in {seconds:.0f}s", flush=True)
        histories[kind], sweeps[kind], train_seconds[kind] = row["history"], row["sweep"], row["train_seconds"]
    saving = rnode_saving(sweeps, config)
    save(main_figure(sweeps, histories, config), "nfe_tolerance.png", config)
    save(pareto_figure(sweeps, config), "pareto.png", config)
    n_last = max(1, len(histories["none"]) // 10)
    training = {kind: {"nfe_forward_first10pct": float(np.mean([h["nfe_forward"] for h in hist[:n_last]])),
                       "nfe_forward_last10pct": float(np.mean([h["nfe_forward"] for h in hist[-n_last:]])),
                       "nfe_backward_last10pct": float(np.mean([h["nfe_backward"] for h in hist[-n_last:]])),
                       "train_seconds": train_seconds[kind]}
                for kind, hist in histories.items()}
    result = {
        "experiment": "nfe_tolerance",
        "command": command_line(PROG, argv),
        "environment": environment(),
        "config": dataclasses.asdict(config),
        "sweep": sweeps,
        "training": training,
        "rnode_saving": saving,
        "total_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "histories": histories,
    }
    write_json(os.path.join(config.out, "results.json"), result)
    for kind, rows in sweeps.items():
        print(f"\n{kind}: {'tol':>7s} {'NFE fwd':>8s} {'test acc':>9s} {'rel err':>9s} {'bwd adj':>8s} {'bwd semi':>9s}")
        for r in rows:
            print(f"{'':{len(kind) + 1}s} {r['tol']:7.0e} {r['nfe_forward']:8d} {r['test_accuracy']:9.3f} "
                  f"{r['relative_error']:9.2e} {r['nfe_backward_adjoint']:8d} {r['nfe_backward_seminorm']:9d}")
    for kind, t in training.items():
        print(f"{kind}: forward NFE over training {t['nfe_forward_first10pct']:.1f} (first 10%) -> "
              f"{t['nfe_forward_last10pct']:.1f} (last 10%), backward {t['nfe_backward_last10pct']:.1f} (last 10%)")
    tr, eq, er = saving["at_train_tol"], saving["at_equal_accuracy"], saving["at_equal_error"]
    print(f"at the training tolerance {config.train_tol:g}: none {tr['none']['nfe_forward']} NFE "
          f"(acc {tr['none']['test_accuracy']:.3f}), RNODE {tr['RNODE']['nfe_forward']} NFE "
          f"(acc {tr['RNODE']['test_accuracy']:.3f}): {100 * tr['nfe_saving']:.0f}% fewer")
    print(f"at equal accuracy (>= {eq['target_accuracy']:.3f}): none {eq['none']['nfe_forward']} NFE (tol "
          f"{eq['none']['tol']:g}), RNODE {eq['RNODE']['nfe_forward']} NFE (tol {eq['RNODE']['tol']:g}): "
          f"{100 * eq['nfe_saving']:.0f}% fewer")
    if er["nfe_saving"] is not None:
        print(f"at equal error (<= {config.error_target:g}): none {er['none']['nfe_forward']} NFE (tol "
              f"{er['none']['tol']:g}), RNODE {er['RNODE']['nfe_forward']} NFE (tol {er['RNODE']['tol']:g}): "
              f"{100 * er['nfe_saving']:.0f}% fewer")
    else:
        print(f"at equal error (<= {config.error_target:g}): not reached by both models in the sweep")
    print(f"figures and results.json written to {os.path.join(os.path.abspath(config.out), '')}")
    return result


if __name__ == "__main__":
    sys.exit(main())
