"""Lesion study: delete blocks from trained networks, the ensemble view of residual nets measured.

Veit et al. (2016) deleted single blocks from trained residual networks and found that the
test error barely moves, while deleting a layer of a plain (VGG-style) network collapses it;
error grows smoothly with the number of blocks deleted. They read a residual net as an
ensemble of many shallow paths. This script repeats the measurement with odenet on MNIST-1D
(4000 training / 1000 test signals of length 40), for models the script trains itself:

    logits = head(body(stem(x)))    stem: Conv1d(1, W, 5, stride 2) -> [B, W, 20]

- `resnet`: untied residual blocks `x = x + f_i(x)`, `odenet.ResBlock(f_i, h=1, t=i)`, with the
  pre-activation branch `f_i = conv(relu(norm(conv(relu(norm(x))))))` (BatchNorm by default);
- `plain`: the same branches without the skip, `x = f_i(x)`;
- `ode-euler`: one time-dependent `f(t, x)` (GroupNorm; `t` enters both convolutions as a
  channel), `odenet.ODEBlock(f, solver="euler", t0=0, t1=N, steps=N)`: N weight-tied residual
  blocks, block i owning the depth interval `[i, i + 1]`;
- `ode-dopri5`: the same kind of `f`, trained under dopri5 (adaptive steps) over `[0, N]`;
- `transformer`: the untied Pre-LN causal transformer of `experiments/transformer.py` (its run
  `untied`: `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))` per layer, N unit Euler steps of a field
  piecewise in depth), trained by that script's `train_variant` on its synthetic language;
  layers are deleted whole and the validation loss (nats per token) is reported;
- `transformer-tied`: its run `tied`, one time-dependent block `f` for all N layers.

Deleting block i means: the block is replaced by the identity (`nn.Identity`) in the untied
models; in the ODE models the interval `[i, i + 1]` is skipped (the state at `t = i` is
carried unchanged to `t = i + 1`, the rest solved as before by `ODEBlock`s over the kept
intervals). For the tied models the same count of deletions is also read as re-solving
the whole interval `[0, N]` with N - k Euler steps ("re-solve"). Measured on the test set:
accuracy and loss after deleting each single block, and after deleting k blocks at random
(`--draws` subsets per k, the same subsets for every model of the same depth).

    python experiments/lesion.py            # full run (about 5 minutes of CPU time)
    python experiments/lesion.py --quick    # smoke test (seconds of CPU)
    python experiments/lesion.py --help     # every setting

Writes to `--out` (default `results/lesion/`): `single.png` (each single block deleted),
`random.png` (k blocks deleted at random), `ode.png` (the tied models: skipping intervals
against re-solving with fewer steps), `results.json` (command, environment, settings, every
number) and `results.jsonl`: one line per trained model and per lesion study as it finishes,
with the trained weights in `OUT/checkpoints/` and `OUT/transformer/models/`; a rerun with the same settings resumes,
`--fresh` starts over.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn

import odenet
from kit.data import mnist1d_arrays
from kit.skeleton import (ResultLog, build_parser, command_line, digest, environment, key_fields,
                          load_checkpoint, opt, parse_config, save_checkpoint, save_figure, script_main, write_json)

PROG = "lesion.py"
CONV_MODELS = ("resnet", "plain", "ode-euler", "ode-dopri5")
TX_MODELS = {"transformer": "untied", "transformer-tied": "tied"}  # name here -> run of experiments/transformer.py
MODELS = CONV_MODELS + tuple(TX_MODELS)
DEFAULT_MODELS = ("resnet", "plain", "ode-euler", "transformer", "transformer-tied")
COLOURS = {"resnet": "#1f77b4", "plain": "#d62728", "ode-euler": "#2ca02c", "ode-dopri5": "#9467bd",
           "transformer": "#ff7f0e", "transformer-tied": "#8c564b"}


@dataclass
class LesionConfig:
    models: Tuple[str, ...] = opt(DEFAULT_MODELS, f"comma-separated models of {', '.join(MODELS)} (ode-dopri5, "
                                  "left out by default, costs about as much as the others together)", key=False,
                                  metavar="M,M,...")
    depth: int = opt(16, "blocks N of every MNIST-1D model (Euler steps of ode-euler)", minimum=1)
    width: int = opt(32, "channels W of the residual state", minimum=1)
    norm: str = opt("batch", "normalisation in the resnet and plain branches (the ODE models use GroupNorm)",
                    choices=["batch", "group"])
    epochs: int = opt(12, "training epochs per MNIST-1D model", minimum=1)
    batch_size: int = opt(128, "training batch size", minimum=1)
    lr: float = opt(1e-3, "Adam learning rate at the start (cosine decay to 0)", positive=True)
    rtol: float = opt(1e-3, "relative tolerance of ode-dopri5 (training and lesions; atol the same)", positive=True)
    n_train: int = opt(0, "use only the first N training examples (0: all 4000)", minimum=0)
    tx_layers: int = opt(6, "transformer: layers N (unit Euler steps of transformer-tied)", minimum=1)
    tx_dim: int = opt(64, "transformer: embedding width (4 heads)", minimum=4)
    tx_steps: int = opt(1500, "transformer: training steps (batches of 32 sequences of 64 tokens)", minimum=1)
    tx_eval: int = opt(256, "transformer: validation sequences the lesions are measured on", minimum=1)
    seed: int = opt(0, "seed of initialisation, batch order and the random lesions", minimum=0)
    draws: int = opt(12, "random subsets per k (all of them when there are fewer)", minimum=1)
    ks: Tuple[int, ...] = opt((), "comma-separated counts k of deleted blocks", minimum=1,
                              default_text="1..N")
    device: str = opt("cpu", "device to train and evaluate on (cpu, cuda, cuda:1, ...)", key=False)
    threads: int = opt(1, "torch CPU threads (the networks are small: one is fastest)", key=False, minimum=1)
    dpi: int = opt(90, "resolution of the PNG figures", key=False, minimum=1)
    out: str = opt(os.path.join("results", "lesion"), "output directory", key=False)
    gallery: str = opt("", "also write small copies of the figures here (docs: docs/img/lesion)", key=False)
    fresh: bool = opt(False, "start over instead of reusing the units finished in OUT/results.jsonl", key=False)


QUICK = dict(depth=4, width=8, epochs=1, n_train=512, draws=3, tx_layers=2, tx_dim=16, tx_steps=30, tx_eval=64)
# Fields the lesion studies depend on but training does not.
LESION_FIELDS = ("draws", "ks", "tx_eval")


def parse_args(argv=None) -> LesionConfig:
    parser = build_parser(LesionConfig, prog=PROG, description=__doc__.split("\n\n")[0], quick=QUICK)
    return parse_config(LesionConfig, argv, parser=parser, quick=QUICK, check=check)


def check(config: LesionConfig) -> None:
    bad = [m for m in config.models if m not in MODELS]
    if bad or len(set(config.models)) != len(config.models):
        raise ValueError(f"--models must be a comma-separated subset of {','.join(MODELS)}, "
                         f"got {','.join(config.models)!r}.")
    deepest = max(config.depth, config.tx_layers)
    if any(k > deepest for k in config.ks):
        raise ValueError(f"--ks must lie in 1..{deepest} (the deepest model's blocks), "
                         f"got {','.join(map(str, config.ks))}.")
    if config.tx_dim % 4:
        raise ValueError(f"--tx-dim must be divisible by the 4 attention heads, got {config.tx_dim}.")
    try:
        torch.device(config.device)
    except RuntimeError:
        raise ValueError(f"--device {config.device!r} is not a device; use cpu, cuda or cuda:N.") from None
    if torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: CUDA is not available here; use --device cpu.")


def counts(config: LesionConfig, depth: int) -> Tuple[int, ...]:
    """The k of the random lesions for a model of `depth` blocks (`--ks`, cut to the depth)."""
    return tuple(k for k in config.ks if k <= depth) if config.ks else tuple(range(1, depth + 1))


# ---------------------------------------------------------------------------- models


def _norm(kind: str, width: int) -> nn.Module:
    return nn.BatchNorm1d(width) if kind == "batch" else nn.GroupNorm(math.gcd(8, width), width)


class Branch(nn.Module):
    """`f(t, x) = conv(relu(norm(conv(relu(norm(x))))))` on `[B, W, L]`; with `time_scale`, `t * time_scale`
    enters both convolutions as an extra constant channel."""

    def __init__(self, width: int, norm: str, time_scale: Optional[float] = None):
        super().__init__()
        extra = 0 if time_scale is None else 1
        self.time_scale = time_scale
        self.norm1, self.norm2 = _norm(norm, width), _norm(norm, width)
        self.conv1 = nn.Conv1d(width + extra, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width + extra, width, 3, padding=1)

    def _cat(self, t: Tensor, h: Tensor) -> Tensor:
        if self.time_scale is None:
            return h
        return torch.cat([h, (t * self.time_scale).to(h.dtype).expand(h.shape[0], 1, h.shape[2])], dim=1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        h = self.conv1(self._cat(t, torch.relu(self.norm1(x))))
        return self.conv2(self._cat(t, torch.relu(self.norm2(h))))


class Plain(nn.Module):
    """A plain layer `x = f(0, x)`: the branch without the skip."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x: Tensor) -> Tensor:
        return self.f(torch.zeros((), dtype=x.dtype, device=x.device), x)


def make_body(kind: str, config: LesionConfig) -> nn.Module:
    """The residual part of model `kind`: an `nn.Sequential` of N blocks, or one `ODEBlock` over `[0, N]`."""
    n, w = config.depth, config.width
    if kind == "resnet":
        return nn.Sequential(*[odenet.ResBlock(Branch(w, config.norm), h=1.0, t=float(i)) for i in range(n)])
    if kind == "plain":
        return nn.Sequential(*[Plain(Branch(w, config.norm)) for _ in range(n)])
    f = Branch(w, "group", time_scale=1.0 / n)
    if kind == "ode-euler":
        return odenet.ODEBlock(f, solver="euler", t0=0.0, t1=float(n), steps=n)
    if kind == "ode-dopri5":
        return odenet.ODEBlock(f, solver="dopri5", t0=0.0, t1=float(n), rtol=config.rtol, atol=config.rtol)
    raise ValueError(f"Unknown model {kind!r}; choose one of {', '.join(CONV_MODELS)}.")


class Net(nn.Module):
    """`head(body(stem(x)))` for `[B, 1, 40]` signals; `body` is swapped out to lesion the model."""

    def __init__(self, kind: str, config: LesionConfig):
        super().__init__()
        w = config.width
        norm = "group" if kind.startswith("ode") else config.norm
        self.stem = nn.Conv1d(1, w, 5, stride=2, padding=2)
        self.body = make_body(kind, config)
        self.head = nn.Sequential(_norm(norm, w), nn.ReLU(), nn.Flatten(), nn.Linear(w * 20, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.stem(x)))


# ---------------------------------------------------------------------------- lesions


def _check_deleted(deleted, n: int) -> FrozenSet[int]:
    deleted = frozenset(deleted)
    bad = sorted(i for i in deleted if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n)
    if bad:
        raise ValueError(f"Deleted blocks must be indices in 0..{n - 1}, got {bad}.")
    return deleted


def delete_blocks(body: nn.Module, deleted, slices: Optional[int] = None) -> nn.Module:
    """`body` with the blocks in `deleted` removed, sharing its parameters.

    An `nn.Sequential` (or `nn.ModuleList`) gets `nn.Identity()` in place of each deleted block.
    An `ODEBlock` is cut into `slices` equal intervals of depth (default: its Euler steps); each
    deleted interval is skipped (the state carried unchanged across it) and each run of kept
    intervals is solved as before, by an `ODEBlock` with the same `f`, solver and gradient method
    (fixed steps: the block's steps per interval).

    **Raises:** `ValueError` for an index outside the blocks or steps that do not divide into the
    slices; `TypeError` for a body that is neither.
    """
    if isinstance(body, (nn.Sequential, nn.ModuleList)):
        deleted = _check_deleted(deleted, len(body))
        return nn.Sequential(*[nn.Identity() if i in deleted else block for i, block in enumerate(body)])
    if isinstance(body, odenet.ODEBlock):
        return _skip_intervals(body, deleted, slices)
    raise TypeError(f"delete_blocks needs an nn.Sequential/nn.ModuleList of blocks or an odenet.ODEBlock, "
                    f"got {type(body).__name__}.")


def _skip_intervals(block: odenet.ODEBlock, deleted, slices: Optional[int]) -> nn.Module:
    control = block.control
    fixed = isinstance(control, odenet.Fixed)
    if slices is None:
        if not fixed or control.steps is None:
            raise ValueError("An ODEBlock without Fixed(steps=N) has no steps to delete: pass slices=N, "
                             "the number of equal intervals of depth.")
        slices = control.steps
    if fixed and (control.steps is None or control.steps % slices):
        raise ValueError(f"The block's Fixed(steps={control.steps}) must divide into slices={slices} intervals.")
    deleted = _check_deleted(deleted, slices)
    t0, t1 = block.interval
    edge = lambda i: t0 + (t1 - t0) * i / slices  # noqa: E731
    runs = []
    for kept, group in itertools.groupby(range(slices), key=lambda i: i not in deleted):
        if kept:
            idx = list(group)
            c = odenet.Fixed(steps=control.steps // slices * len(idx)) if fixed else control
            runs.append(odenet.ODEBlock(block.f, block.solver, t0=edge(idx[0]), t1=edge(idx[-1] + 1), control=c,
                                        gradient=block.gradient))
    return nn.Sequential(*runs)


def resolve(block: odenet.ODEBlock, steps: int) -> nn.Module:
    """The same `f` solved over the block's whole interval with `steps` Euler steps (0: the identity)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}.")
    if steps == 0:
        return nn.Identity()
    t0, t1 = block.interval
    return odenet.ODEBlock(block.f, "euler", t0=t0, t1=t1, steps=steps)


def random_subsets(n: int, k: int, draws: int, rng: np.random.Generator) -> List[Tuple[int, ...]]:
    """`draws` distinct k-subsets of `range(n)`, drawn uniformly (all of them, in order, when there are fewer)."""
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in 0..{n}, got {k}.")
    if math.comb(n, k) <= draws:
        return list(itertools.combinations(range(n), k))
    seen: Dict[Tuple[int, ...], None] = {}
    while len(seen) < draws:
        seen.setdefault(tuple(sorted(rng.choice(n, size=k, replace=False).tolist())), None)
    return list(seen)


def draw_subsets(n: int, ks: Sequence[int], draws: int, seed: int) -> Dict[int, List[Tuple[int, ...]]]:
    """The random lesions for `n` blocks: `draws` subsets per k, one generator seeded by `(seed, n)`."""
    rng = np.random.default_rng([seed, n])
    return {k: random_subsets(n, k, draws, rng) for k in ks}


# ---------------------------------------------------------------------------- training and evaluation


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> Dict[str, float]:
    """Test loss and accuracy of `model` in eval mode."""
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        loss += nn.functional.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    return {"loss": loss / len(x), "accuracy": correct / len(x)}


def train(model: Net, data, config: LesionConfig, seed: int) -> Dict[str, Any]:
    """Adam on cross-entropy for `config.epochs`, the learning rate decayed to 0 on a cosine; the test
    metrics after each epoch."""
    x_train, y_train, x_test, y_test = data
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    batches = config.epochs * math.ceil(len(x_train) / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=batches)
    gen = torch.Generator().manual_seed(seed)
    history = []
    start, cpu = time.perf_counter(), time.process_time()
    for epoch in range(1, config.epochs + 1):
        model.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(config.batch_size):
            idx = idx.to(x_train.device)
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimiser.step()
            schedule.step()
        history.append(dict(epoch=epoch, **evaluate(model, x_test, y_test)))
    return {"history": history, "train_seconds": time.perf_counter() - start,
            "train_cpu_seconds": time.process_time() - cpu}


Metrics = Dict[str, float]


def lesion_studies(n: int, subsets: Dict[int, list], deleted_metrics: Callable[[FrozenSet[int]], Metrics],
                   resolved_metrics: Optional[Callable[[int], Metrics]] = None) -> Dict[str, Any]:
    """The metrics of a model of `n` blocks intact, with each single block deleted, with each subset of
    `subsets` deleted and (given `resolved_metrics(steps)`) re-solved with N - k steps."""
    deleted_metrics = functools.lru_cache(maxsize=None)(deleted_metrics)  # k = 1 repeats the single deletions
    out: Dict[str, Any] = {"intact": deleted_metrics(frozenset())}
    out["single"] = [deleted_metrics(frozenset({i})) for i in range(n)]
    out["random"] = {str(k): [dict(deleted=list(s), **deleted_metrics(frozenset(s))) for s in subs]
                     for k, subs in subsets.items()}
    if resolved_metrics is not None:  # k = 1 always: the counterpart of the single deletions
        out["resolve"] = {str(k): resolved_metrics(n - k) for k in sorted({1, *subsets})}
    return out


def body_metrics(model: Net, x: Tensor, y: Tensor) -> Tuple[Callable, Optional[Callable]]:
    """`deleted_metrics(deleted)` and, for an ODE model, `resolved_metrics(steps)` of `model` on `(x, y)`."""
    body, ode = model.body, isinstance(model.body, odenet.ODEBlock)
    slices = _depth_of(body) if ode else None

    def with_body(new_body: nn.Module) -> Metrics:
        model.body = new_body
        try:
            return evaluate(model, x, y)
        finally:
            model.body = body

    deleted = lambda d: with_body(delete_blocks(body, d, slices))  # noqa: E731
    return deleted, (lambda steps: with_body(resolve(body, steps))) if ode else None


def _depth_of(body: nn.Module) -> int:
    """Blocks of a body: its length, or one unit of depth per block of an `ODEBlock` over `[0, N]`."""
    if isinstance(body, odenet.ODEBlock):
        t0, t1 = body.interval
        return int(round(t1 - t0))
    return len(body)


# ---------------------------------------------------------------------------- units of work (resumable)


def train_key(config: LesionConfig, kind: str) -> str:
    """What training MNIST-1D model `kind` depends on (not the lesion or transformer settings)."""
    settings = {k: v for k, v in key_fields(config).items() if k not in LESION_FIELDS and not k.startswith("tx_")}
    return digest(dict(settings, model=kind, unit="train"))


def conv_unit(kind: str, config: LesionConfig, data, log: ResultLog) -> Dict[str, Any]:
    """Train (or reload) MNIST-1D model `kind` and lesion it; each step a line of `results.jsonl`."""
    tkey = train_key(config, kind)
    lkey = digest(dict(tkey=tkey, draws=config.draws, ks=counts(config, config.depth), unit="lesion"))
    if tkey in log.done and lkey in log.done:
        return dict(trained=log.done[tkey], lesion=log.done[lkey], resumed=True)
    ckpt = os.path.join(config.out, "checkpoints", f"{kind}.pt")
    torch.manual_seed(config.seed * 1000 + CONV_MODELS.index(kind))
    model = Net(kind, config).to(config.device)
    state = load_checkpoint(ckpt, tkey) if tkey in log.done else None
    if state is None:
        result = train(model, data, config, seed=config.seed)
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        save_checkpoint(ckpt, {"key": tkey, "model": {k: v.cpu() for k, v in model.state_dict().items()}})
        log.add(tkey, dict(model=kind, parameters=sum(p.numel() for p in model.parameters()), **result))
    else:
        model.load_state_dict(state["model"])
    subsets = draw_subsets(config.depth, counts(config, config.depth), config.draws, config.seed)
    start, cpu = time.perf_counter(), time.process_time()
    studies = lesion_studies(config.depth, subsets, *body_metrics(model, data[2], data[3]))
    row = log.add(lkey, dict(model=kind, metric="accuracy", depth=config.depth, seconds=time.perf_counter() - start,
                             cpu_seconds=time.process_time() - cpu, **studies))
    return dict(trained=log.done[tkey], lesion=row, resumed=False)


# ---------------------------------------------------------------------------- summary, table, figures


def summarise(lesion: Dict[str, Any], metric: str) -> Dict[str, Any]:
    """Per model: intact value, single deletions (mean, min, max), and per k mean/std/min/max (and re-solve)."""
    vals = lambda rows: np.array([r[metric] for r in rows], dtype=float)  # noqa: E731
    single = vals(lesion["single"])
    out = {"metric": metric, "intact": lesion["intact"][metric],
           "single": dict(mean=single.mean(), min=single.min(), max=single.max(), values=single.tolist()),
           "random": {}}
    for k, rows in lesion["random"].items():
        v = vals(rows)
        out["random"][k] = dict(mean=v.mean(), std=v.std(), min=v.min(), max=v.max(), draws=len(v))
    if "resolve" in lesion:
        out["resolve"] = {k: r[metric] for k, r in lesion["resolve"].items()}
    return out


def table(summary: Dict[str, Dict[str, Any]]) -> str:
    """A markdown table: intact, single deletions, and random deletions at a few k."""
    lines = ["| model | metric | intact | one block deleted: mean (min, max) | k deleted at random: mean [min, max] |",
             "|---|---|---:|---:|---|"]
    for name, s in summary.items():
        ks = list(s["random"])
        shown = [k for k in ks if int(k) in _few(len(ks), [int(k) for k in ks])]
        rnd = "; ".join(f"k={k}: {r['mean']:.3f} [{r['min']:.3f}, {r['max']:.3f}]"
                        for k, r in ((k, s["random"][k]) for k in shown))
        one = s["single"]
        split = "validation" if name in TX_MODELS else "test"
        lines.append(f"| {name} | {split} {s['metric']} | {s['intact']:.3f} | {one['mean']:.3f} ({one['min']:.3f}, "
                     f"{one['max']:.3f}) | {rnd} |")
        if "resolve" in s:
            rs = "; ".join(f"k={k}: {s['resolve'][k]:.3f}" for k in shown)
            lines.append(f"| {name}, re-solved N-k Euler steps | {split} {s['metric']} | {s['intact']:.3f} | "
                         f"{s['resolve']['1']:.3f} (k=1) | {rs} |")
    return "\n".join(lines)


def _few(count: int, ks: List[int]) -> List[int]:
    """About five of the k, spread out."""
    return [ks[i] for i in sorted({round(j * (count - 1) / 4) for j in range(5)})] if count else []


def _style(ax) -> None:
    ax.grid(True, color="0.9", lw=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _panels(names: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Models grouped by metric: MNIST-1D accuracy, transformer loss."""
    groups = [("test accuracy (MNIST-1D)", [n for n in names if n not in TX_MODELS]),
              ("validation loss, nats/token (transformer)", [n for n in names if n in TX_MODELS])]
    return [g for g in groups if g[1]]


def single_figure(summary: Dict[str, Dict[str, Any]]) -> Figure:
    panels = _panels(list(summary))
    fig = Figure(figsize=(6.2 * len(panels), 4.2), layout="constrained")
    for j, (title, names) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for name in names:
            s = summary[name]
            v = s["single"]["values"]
            ax.plot(range(len(v)), v, marker="o", ms=4, color=COLOURS[name], label=f"{name}: block i deleted")
            ax.axhline(s["intact"], color=COLOURS[name], ls="--", lw=1, label=f"{name}: intact")
            if "resolve" in s:
                ax.axhline(s["resolve"]["1"], color=COLOURS[name], ls=":", lw=1.5,
                           label=f"{name}: re-solved with N-1 steps")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("deleted block i (ODE models: interval [i, i+1] skipped)")
        ax.set_ylabel(title)
        ax.legend(fontsize=7)
        _style(ax)
    return fig


def random_figure(summary: Dict[str, Dict[str, Any]], names: Optional[Sequence[str]] = None) -> Figure:
    panels = _panels(list(names or summary))
    fig = Figure(figsize=(6.2 * len(panels), 4.2), layout="constrained")
    for j, (title, group) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for name in group:
            s = summary[name]
            ks = np.array([0] + [int(k) for k in s["random"]])
            r = [s["random"][str(k)] for k in ks[1:]]
            mean = np.array([s["intact"]] + [x["mean"] for x in r])
            lo = np.array([s["intact"]] + [x["min"] for x in r])
            hi = np.array([s["intact"]] + [x["max"] for x in r])
            skip = " (intervals skipped)" if "resolve" in s else ""
            ax.plot(ks, mean, marker="o", ms=3, color=COLOURS[name], label=f"{name}{skip}: mean, min-max band")
            ax.fill_between(ks, lo, hi, color=COLOURS[name], alpha=0.15, lw=0)
            if "resolve" in s:
                res = [s["intact"]] + [s["resolve"][str(k)] for k in ks[1:]]
                ax.plot(ks, res, marker="s", ms=3, ls=":", color=COLOURS[name],
                        label=f"{name}: re-solved, N-k Euler steps")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("k blocks deleted")
        ax.set_ylabel(title)
        ax.legend(fontsize=7)
        _style(ax)
    return fig


def save(fig: Figure, name: str, config: LesionConfig) -> None:
    save_figure(fig, name, out=config.out, dpi=config.dpi, gallery=config.gallery, prefix="lesion_")


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    return script_main(PROG, parse_args, run, argv)


def run(config: LesionConfig, argv=None) -> dict:
    torch.set_num_threads(config.threads)
    log = ResultLog(config.out, fresh=config.fresh)
    start = time.perf_counter()
    data = tuple(t.to(config.device) for t in _mnist1d(config.n_train))
    units: Dict[str, Dict[str, Any]] = {}
    for kind in config.models:
        if kind in TX_MODELS:
            units[kind] = transformer_unit(kind, config, log)
        else:
            units[kind] = conv_unit(kind, config, data, log)
        u = units[kind]
        intact = u["lesion"]["intact"]
        split = "validation" if kind in TX_MODELS else "test"
        print(f"{kind:16s} intact {split} loss {intact['loss']:.4f}"
              + (f"  accuracy {intact['accuracy']:.3f}" if "accuracy" in intact else "")
              + (" (from results.jsonl)" if u["resumed"] else ""), flush=True)
    summary = {k: summarise(u["lesion"], u["lesion"]["metric"]) for k, u in units.items()}
    save(single_figure(summary), "single.png", config)
    save(random_figure(summary), "random.png", config)
    odes = [k for k in summary if "resolve" in summary[k]]
    if odes:
        save(random_figure(summary, odes), "ode.png", config)
    result = {
        "experiment": "lesion",
        "command": command_line(PROG, argv),
        "environment": environment(config.device),
        "config": dataclasses.asdict(config),
        "summary": summary,
        "table": table(summary),
        "trained": {k: {f: v for f, v in u["trained"].items() if f != "key"} for k, u in units.items()},
        "lesions": {k: u["lesion"] for k, u in units.items()},
        "total_seconds": time.perf_counter() - start,
    }
    write_json(os.path.join(config.out, "results.json"), result)
    print("\n" + result["table"])
    print(f"figures and results.json written to {os.path.join(os.path.abspath(config.out), '')}")
    return result


@functools.lru_cache(maxsize=2)
def _mnist1d(n_train: int) -> Tuple[Tensor, ...]:
    """MNIST-1D (generated in a few seconds), kept for a second run in the same process."""
    return mnist1d_arrays(n_train)


# ---------------------------------------------------------------------------- the transformers


def tx_config(config: LesionConfig):
    """The `experiments/transformer.py` settings of the lesioned transformers: its defaults but for depth,
    width, training steps, seed and device."""
    import transformer as tx  # experiments/transformer.py, imported only when a transformer is asked for

    device = "cuda" if torch.device(config.device).type == "cuda" else "cpu"
    return tx, tx.TransformerConfig(layers=config.tx_layers, dim=config.tx_dim, steps=config.tx_steps, seed=config.seed,
                                    device=device, threads=config.threads, runs=tuple(TX_MODELS.values()))


def transformer_unit(name: str, config: LesionConfig, log: ResultLog) -> Dict[str, Any]:
    """Train (or reload) a transformer of `experiments/transformer.py` and lesion its layers (validation loss)."""
    tx, tc = tx_config(config)
    run_name, n = TX_MODELS[name], tc.layers
    tkey = digest(dict(run=tx.run_key(tc, run_name), unit="train"))
    lkey = digest(dict(tkey=tkey, draws=config.draws, ks=counts(config, n), eval=config.tx_eval, unit="lesion"))
    if tkey in log.done and lkey in log.done:
        return dict(trained=log.done[tkey], lesion=log.done[lkey], resumed=True)
    data = _tx_data(tc)
    start, cpu = time.perf_counter(), time.process_time()
    model = tx.load_or_train(run_name, tc, data, out=os.path.join(config.out, "transformer"))
    if tkey not in log.done:
        log.add(tkey, dict(model=name, run=run_name, parameters=sum(p.numel() for p in model.parameters()),
                           history=model.history, seconds_per_step=model.seconds_per_step,
                           train_seconds=time.perf_counter() - start, train_cpu_seconds=time.process_time() - cpu,
                           settings=dataclasses.asdict(tc), source_sha256=_sha256(tx.__file__)))
    keep = ("loss", "accuracy", "gap", "induction_loss", "induction_accuracy")

    def metrics(m, skip=()) -> Metrics:
        return {k: v for k, v in tx.evaluate(m, data, skip=skip, limit=config.tx_eval).items() if k in keep}

    def deleted(d: FrozenSet[int]) -> Metrics:
        return metrics(model, d)

    def resolved(steps: int) -> Metrics:  # Euler steps over [0, N]; 0 steps: every layer left out
        return metrics(model.with_solver("euler", steps=steps)) if steps else deleted(frozenset(range(n)))

    start, cpu = time.perf_counter(), time.process_time()
    subsets = draw_subsets(n, counts(config, n), config.draws, config.seed)
    studies = lesion_studies(n, subsets, deleted, resolved if run_name == "tied" else None)
    row = log.add(lkey, dict(model=name, metric="loss", depth=n, seconds=time.perf_counter() - start,
                             cpu_seconds=time.process_time() - cpu, **studies))
    return dict(trained=log.done[tkey], lesion=row, resumed=False)


def _sha256(path: str) -> str:
    """The SHA-256 of a file: which version of `experiments/transformer.py` trained the transformers."""
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


_TX_DATA: Dict[str, Any] = {}


def _tx_data(tc):
    """The transformer's language (`tx.build_data`), kept for a second run in the same process."""
    import transformer as tx

    key = repr(tc)
    if key not in _TX_DATA:
        _TX_DATA.clear()
        _TX_DATA[key] = tx.build_data(tc)
    return _TX_DATA[key]


if __name__ == "__main__":
    sys.exit(main())
