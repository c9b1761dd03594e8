"""A small causal transformer whose layers are one `odenet.TransformerDynamics`, run as a GPT, as
weight-tied Euler steps, as an ODE, and under the three block compositions.

The data is a synthetic language whose optimal loss is known exactly for every token
(Bietti et al. 2023, "Birth of a Transformer: A Memory Viewpoint"): sequences from a random
bigram chain over `vocab` tokens, except that after each of `triggers` fixed trigger tokens
comes that sequence's own output token for it (drawn per sequence, uniformly among the
non-trigger tokens). The first output after a trigger cannot be predicted (`log(vocab -
triggers)` nats); every later one can, by looking back to the trigger's previous occurrence and
copying the token after it (an induction head: two attention steps). The Bayes-optimal
predictive distribution is therefore known token by token, and so is the floor of the loss.

Every model is `embedding + positions -> residual part over the depth [0, N] -> LayerNorm ->
head`, the residual part being one `odenet.ODEBlock` over `[0, N]` (N = `--layers`):

    untied    N separate sequential (GPT-2) blocks: the field is layer k's f on [k, k + 1), Euler, N steps
    tied      one sequential f, Euler, N unit steps (N weight-tied GPT blocks)
    ode       the same one sequential f, dopri5 (--tol), adjoint gradients (seminorm)
    parallel  one parallel f (A + M), Euler, N unit steps
    strang    one Macaron/Strang f (M/2, A, M/2), Euler, N unit steps

    python experiments/transformer.py            # the default table (2 CPU cores: about 10 min, 9 of CPU)
    python experiments/transformer.py --quick    # the same outputs at small scale (about 1 min)
    python experiments/transformer.py --runs tied,ode --steps 3000

Writes to `--out` (default `results/transformer/`): `results.jsonl` (one line per trained run,
plus the splitting measurement; a rerun skips what is there, the weights are kept in
`OUT/models/`), `results.json`, `results.md` and the figures.

**Importable API** (for `experiments/lesion.py`; `sys.path` must hold `experiments/`):

    import transformer as tx
    config = tx.TransformerConfig(steps=300)          # or tx.parse_args(["--quick"])
    data = tx.build_data(config)                      # tx.LanguageData: train/val tokens, exact floors
    model = tx.train_variant("untied", config, data)  # a trained tx.TinyGPT (.history, .seconds_per_step)
    tx.evaluate(model, data)                          # {"loss", "bits", "accuracy", "gap", "induction_accuracy", ...}
    layers = model.layers()                           # the N residual layers, each covering [k, k + 1]
    tx.evaluate(model, data, skip={1})                # the model with layer 1 left out (the state passes unchanged)
    model(idx, skip={0, 3})                           # logits with layers 0 and 3 left out

    model.with_solver("dopri5", rtol=1e-4, atol=1e-4)  # the same weights under another solver

`tx.VARIANTS` names the runs; `tx.load_or_train(name, config, data, out)` reuses the weights a
run of this script saved under `out/models/` (and saves them there); `tx.run_key(config, name)`
is a run's resume key; `tx.split_solve(model.field, x, t0, t1, steps, "lie" | "strang")` runs a
splitting method of `A + M`. The results page is docs/experiments/transformer.md.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import odenet
from odenet import ODEBlock, ResBlock, SolverError, measure
from odenet.transformer import TransformerDynamics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the kit, also when imported from elsewhere
from kit.skeleton import (ResultLog, build_parser, command_line, digest, environment, key_fields, opt,  # noqa: E402
                          parse_config, save_figure, script_main, write_json)

__all__ = ["TransformerConfig", "Variant", "VARIANTS", "LanguageData", "build_data", "TinyGPT", "build_model",
           "train_variant", "load_or_train", "evaluate", "split_solve", "parse_args", "main"]

PROG = "transformer.py"


# ---------------------------------------------------------------------------- settings


@dataclass
class TransformerConfig:
    """Everything a run depends on (the fields not declared `key=False` make its resume key)."""

    vocab: int = opt(24, "tokens in the language, trigger tokens included", minimum=4)
    triggers: int = opt(3, "trigger tokens, each followed by its sequence's own output token", minimum=1)
    alpha: float = opt(0.3, "Dirichlet concentration of the bigram rows (smaller: a more predictable chain)", positive=True)
    trigger_mass: float = opt(0.4, "probability of moving to a trigger token (uniformly) from any other token", minimum=0)
    seq_len: int = opt(32, "tokens per sequence (the context length)", minimum=2)
    n_train: int = opt(4096, "training sequences", minimum=1)
    n_val: int = opt(512, "validation sequences", minimum=1)
    data_seed: int = opt(0, "seed of the language (bigram chain, triggers) and of the sequences", minimum=0)
    dim: int = opt(48, "embedding width", minimum=1)
    heads: int = opt(4, "attention heads", minimum=1)
    layers: int = opt(4, "N: layers of the untied model, unit Euler steps of the tied ones, depth [0, N] of the ODE",
                      minimum=1)
    time_dependent: bool = opt(True, "weight-tied fields see the depth t (adaLN-style LayerNorm shift and scale)")
    dropout: float = opt(0.0, "dropout inside the blocks", minimum=0)
    steps: int = opt(1000, "training steps (batches) per run", minimum=1)
    batch_size: int = opt(32, "sequences per batch", minimum=1)
    lr: float = opt(1e-2, "peak AdamW learning rate (linear warm-up, cosine decay to a tenth)", positive=True)
    warmup: int = opt(100, "warm-up steps", minimum=0)
    weight_decay: float = opt(0.01, "AdamW weight decay", minimum=0)
    seed: int = opt(0, "seed of the initialisation and the batch order", minimum=0)
    tol: float = opt(1e-2, "ode run: dopri5 rtol = atol (forward and adjoint)", positive=True)
    seminorm: bool = opt(True, "ode run: the adjoint's error control leaves the parameter gradients out (Kidger et al. 2021)")
    max_steps: int = opt(500, "ode run: dopri5 step limit per solve", minimum=1)
    runs: Tuple[str, ...] = opt(("untied", "tied", "ode", "parallel", "strang"), "comma-separated runs (see the "
                                "module docstring; also untied-parallel, untied-strang)", key=False, metavar="NAMES")
    cross_eval: bool = opt(True, "re-evaluate each trained model under other solvers and step counts")
    cross_eval_limit: int = opt(256, "cross-evaluation: validation sequences used (the first N)", minimum=1)
    split_steps: Tuple[int, ...] = opt((1, 2, 4, 8, 16, 32, 64), "splitting order: steps per unit depth", minimum=1,
                                       metavar="N,N,...")
    split_batch: int = opt(4, "splitting order: validation sequences in the measured batch", minimum=1)
    device: str = opt("auto", "auto = CUDA when available", key=False, choices=["auto", "cpu", "cuda"])
    threads: int = opt(1, "torch CPU threads (1: fastest for this small model, and robust when other jobs share the CPU; 0: torch's default)", key=False, minimum=0)
    dpi: int = opt(110, "resolution of the figures", key=False, minimum=1)
    out: str = opt(os.path.join("results", "transformer"), "output folder", key=False, metavar="DIR")
    gallery: str = opt("", "also write small copies of the figures here (docs: docs/img/transformer)", key=False)
    fresh: bool = opt(False, "delete earlier results in --out and start over (otherwise: resume)", key=False)


QUICK = dict(n_train=512, n_val=128, dim=32, layers=2, steps=150, warmup=20, split_steps=(1, 2, 4, 8, 16),
             split_batch=2, cross_eval_limit=64)


@dataclass(frozen=True)
class Variant:
    """A run: the block composition, one f or one per layer, and how the depth is solved."""

    composition: str = "sequential"
    tied: bool = True
    solver: str = "euler"  # euler: N unit steps; dopri5: adaptive at --tol
    gradient: str = "direct"

    def describe(self) -> str:
        how = "Euler, N unit steps" if self.solver == "euler" else f"{self.solver}, {self.gradient}"
        return f"{self.composition}, {'one f' if self.tied else 'N layers'}, {how}"


VARIANTS: Dict[str, Variant] = {
    "untied": Variant("sequential", tied=False),
    "tied": Variant("sequential"),
    "ode": Variant("sequential", solver="dopri5", gradient="adjoint"),
    "parallel": Variant("parallel"),
    "strang": Variant("strang"),
    "untied-parallel": Variant("parallel", tied=False),
    "untied-strang": Variant("strang", tied=False),
}


def check(c: TransformerConfig) -> None:
    if c.dim % c.heads:
        raise ValueError(f"--dim {c.dim} must be divisible by --heads {c.heads}")
    if c.triggers > c.vocab - 2:
        raise ValueError(f"--triggers {c.triggers} leaves fewer than two non-trigger tokens of --vocab {c.vocab}")
    if not c.trigger_mass < 1:
        raise ValueError(f"--trigger-mass must be < 1, got {c.trigger_mass}")
    if not c.dropout < 1:
        raise ValueError(f"--dropout must be < 1, got {c.dropout}")
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available here; use --device cpu or auto")
    bad = [r for r in c.runs if r not in VARIANTS]
    if bad or len(set(c.runs)) != len(c.runs):
        raise ValueError(f"--runs: choose distinct names from {', '.join(VARIANTS)}, got {','.join(c.runs)}")


def parse_args(argv: Optional[Sequence[str]] = None) -> TransformerConfig:
    """Command line -> `TransformerConfig` (raises `kit.skeleton.UsageError`)."""
    parser = build_parser(TransformerConfig, prog=PROG, description=__doc__.split("\n\n")[0], quick=QUICK)
    return parse_config(TransformerConfig, argv, parser=parser, quick=QUICK, check=check)


# ---------------------------------------------------------------------------- the language


@dataclass
class LanguageData:
    """Token sequences `[n, seq_len]` (int64) and, for every validation token `t >= 1`, the Bayes-optimal
    loss `-log p*(x_t | x_<t)`, `p*`'s largest probability and the token's kind (0: bigram, 1: first
    output after a trigger, 2: repeated output, predictable by induction)."""

    train: Tensor
    val: Tensor
    val_optimal_loss: Tensor  # [n_val, seq_len - 1], nats
    val_optimal_top: Tensor  # [n_val, seq_len - 1]
    val_kind: Tensor  # [n_val, seq_len - 1]
    bigram: np.ndarray
    triggers: np.ndarray
    description: str = ""

    def floors(self) -> Dict[str, float]:
        """The exact optimum on the validation set: loss (nats and bits per token) and expected accuracy of
        the optimal predictor; also the optimum of a model that cannot look back (no induction)."""
        opt_loss = self.val_optimal_loss
        no_induction = torch.where(self.val_kind == 2, math.log(len(self.bigram) - len(self.triggers)), opt_loss)
        out = dict(loss=float(opt_loss.mean()), bits=float(opt_loss.mean()) / math.log(2),
                   accuracy=float(self.val_optimal_top.mean()), no_induction_loss=float(no_induction.mean()))
        for i, k in enumerate(("bigram", "first", "induction")):
            m = self.val_kind == i
            out[f"fraction_{k}"] = float(m.double().mean())
            out[f"{k}_loss"] = float(opt_loss[m].mean()) if m.any() else float("nan")
        return out


def _sample(rng: np.random.Generator, P: np.ndarray, triggers: np.ndarray, n: int, T: int) -> np.ndarray:
    V, K = len(P), len(triggers)
    others = np.setdiff1d(np.arange(V), triggers)
    outputs = others[rng.integers(0, len(others), size=(n, K))]  # each sequence's output per trigger
    slot = np.full(V, -1)
    slot[triggers] = np.arange(K)
    cum = np.cumsum(P, axis=1)
    x = np.empty((n, T), dtype=np.int64)
    x[:, 0] = rng.integers(0, V, size=n)
    rows = np.arange(n)
    for t in range(1, T):
        prev = x[:, t - 1]
        nxt = np.minimum((cum[prev] < rng.random(n)[:, None]).sum(1), V - 1)
        k = slot[prev]
        x[:, t] = np.where(k >= 0, outputs[rows, np.maximum(k, 0)], nxt)
    return x


def _optimal(x: np.ndarray, P: np.ndarray, triggers: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Bayes-optimal loss, top probability and kind of every token `t >= 1` of `x`."""
    n, T = x.shape
    V, K = len(P), len(triggers)
    slot = np.full(V, -1)
    slot[triggers] = np.arange(K)
    loss, top, kind = np.zeros((n, T - 1)), np.zeros((n, T - 1)), np.zeros((n, T - 1), dtype=np.int64)
    seen = np.zeros((n, K), dtype=bool)
    rows = np.arange(n)
    for t in range(1, T):
        prev, cur = x[:, t - 1], x[:, t]
        k = slot[prev]
        trig = k >= 0
        known = trig & seen[rows, np.maximum(k, 0)]
        first = trig & ~known
        loss[:, t - 1] = np.where(trig, np.where(known, 0.0, math.log(V - K)), -np.log(P[prev, cur]))
        top[:, t - 1] = np.where(trig, np.where(known, 1.0, 1.0 / (V - K)), P[prev].max(1))
        kind[:, t - 1] = np.where(known, 2, np.where(first, 1, 0))
        seen[rows[trig], k[trig]] = True
    return loss, top, kind


def build_data(config: TransformerConfig) -> LanguageData:
    """The language (from `config.data_seed`) and its training and validation sequences, with the exact floors."""
    rng = np.random.default_rng(config.data_seed)
    V, K = config.vocab, config.triggers
    triggers = np.sort(rng.choice(V, size=K, replace=False))
    P = np.maximum(rng.dirichlet(np.full(V, config.alpha), size=V), 1e-12)
    P /= P.sum(1, keepdims=True)
    P = (1 - config.trigger_mass) * P
    P[:, triggers] += config.trigger_mass / K
    train = _sample(rng, P, triggers, config.n_train, config.seq_len)
    val = _sample(rng, P, triggers, config.n_val, config.seq_len)
    loss, top, kind = _optimal(val, P, triggers)
    desc = (f"bigram chain over {V} tokens (Dirichlet({config.alpha:g}) rows) with {K} trigger tokens followed by "
            f"per-sequence outputs; {config.n_train} train / {config.n_val} validation sequences of {config.seq_len} "
            f"tokens, seed {config.data_seed}")
    return LanguageData(torch.from_numpy(train), torch.from_numpy(val), torch.from_numpy(loss), torch.from_numpy(top),
                        torch.from_numpy(kind), P, triggers, desc)


# ---------------------------------------------------------------------------- the model


class Layers(nn.Module):
    """The field of an untied stack: layer `k`'s `f` on `[k, k + 1)` (also its sub-fields)."""

    def __init__(self, fs: Sequence[TransformerDynamics]):
        super().__init__()
        self.fs = nn.ModuleList(fs)

    def layer(self, t: Tensor) -> TransformerDynamics:
        return self.fs[min(len(self.fs) - 1, max(0, math.floor(float(t) + 1e-6)))]

    def attention(self, t: Tensor, x: Tensor) -> Tensor:
        return self.layer(t).attention(t, x)

    def feedforward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.layer(t).feedforward(t, x)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.layer(t)(t, x)


def _solver_kwargs(solve: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in solve.items() if k != "solver"}


class TinyGPT(nn.Module):
    """`lm_head(ln_f(block(wte(idx) + wpe(pos))))`, `block` an `ODEBlock` over the depth `[0, N]`."""

    def __init__(self, config: TransformerConfig, variant: Variant):
        super().__init__()
        self.variant, self.depth = variant, config.layers
        d = config.dim
        self.wte = nn.Embedding(config.vocab, d)
        self.wpe = nn.Embedding(config.seq_len, d)
        make = lambda td: TransformerDynamics(d, config.heads, composition=variant.composition, causal=True,  # noqa: E731
                                              time_dependent=td, dropout=config.dropout)
        self.field: nn.Module = make(config.time_dependent) if variant.tied else Layers([make(False) for _ in range(self.depth)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, config.vocab, bias=False)
        self.apply(self._init)
        if variant.solver == "euler":
            self.solve = dict(solver="euler", steps=self.depth)
        else:
            self.solve = dict(solver=variant.solver, rtol=config.tol, atol=config.tol, max_steps=config.max_steps,
                              gradient=variant.gradient)
            if variant.gradient == "adjoint":
                self.solve["adjoint_seminorm"] = config.seminorm
        self.block = ODEBlock(self.field, self.solve["solver"], t1=float(self.depth), **_solver_kwargs(self.solve))

    @staticmethod
    def _init(m: nn.Module) -> None:  # GPT-2's
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] != 1:
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def embed(self, idx: Tensor) -> Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))

    def forward(self, idx: Tensor, skip: Iterable[int] = ()) -> Tensor:
        """Logits `[batch, tokens, vocab]`; with `skip`, the layers (`layers()`) run one by one, those in `skip` left out."""
        x = self.embed(idx)
        skip = set(skip)
        if skip:
            for k, layer in enumerate(self.layers()):
                if k not in skip:
                    x = layer(x)
        else:
            x = self.block(x)
        return self.lm_head(self.ln_f(x))

    def layers(self) -> List[nn.Module]:
        """The residual layers: layer `k` covers the depth `[k, k + 1]` under this model's solver (a
        `ResBlock(f, h=1, t=k)` for N unit Euler steps: exactly the model's own step k)."""
        kw = _solver_kwargs(self.solve)
        if self.solve["solver"] == "euler" and kw.get("steps") == self.depth:
            return [ResBlock(self.field, h=1.0, t=float(k)) for k in range(self.depth)]
        if "steps" in kw:
            kw["steps"] = max(1, kw["steps"] // self.depth)
        return [ODEBlock(self.field, self.solve["solver"], t0=float(k), t1=float(k + 1), **kw) for k in range(self.depth)]

    def with_solver(self, solver: str, **kw) -> "TinyGPT":
        """The same parameters with the depth solved by `solver` (`steps=` or `rtol=`/`atol=`, ...)."""
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.solve = dict(solver=solver, **kw)
        new.block = ODEBlock(self.field, solver, t1=float(self.depth), **kw)
        return new

    def stats(self) -> odenet.SolveStats:
        """The last solve's `SolveStats`."""
        return self.block.last_stats


def build_model(name: str, config: TransformerConfig) -> TinyGPT:
    """The untrained model of run `name` (initialised from `config.seed`)."""
    torch.manual_seed(config.seed)
    return TinyGPT(config, VARIANTS[name])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- training and evaluation


def _lm_loss(logits: Tensor, idx: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def _device(config: TransformerConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available here; use cpu or auto")
    return torch.device(config.device)


def train_variant(name: str, config: TransformerConfig, data: LanguageData, progress=None) -> TinyGPT:
    """Train run `name` on `data.train`: AdamW, warm-up and cosine decay, gradient clipping at 1.
    Returns the model (eval mode, on `config.device`) with `model.history` (every tenth step: loss,
    NFE forward/backward) and `model.seconds_per_step` (median)."""
    device = _device(config)
    model = build_model(name, config).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("time.weight")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("time.weight"))]
    opt_ = torch.optim.AdamW([dict(params=decay, weight_decay=config.weight_decay), dict(params=rest, weight_decay=0.0)],
                             lr=config.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        u = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, u))))

    gen = torch.Generator().manual_seed(config.seed)
    train = data.train
    model.train()
    history, times = [], []
    for step in range(config.steps):
        for g in opt_.param_groups:
            g["lr"] = lr_at(step)
        idx = train[torch.randint(0, len(train), (config.batch_size,), generator=gen)].to(device)
        measure.synchronize(device)
        t0 = time.perf_counter()
        loss = _lm_loss(model(idx), idx)
        opt_.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_.step()
        measure.synchronize(device)
        times.append(time.perf_counter() - t0)
        if step % 10 == 0 or step == config.steps - 1:
            s = model.stats()
            history.append(dict(step=step, loss=loss.item(), nfe_forward=s.nfe_forward, nfe_backward=s.nfe_backward or 0))
            if progress is not None:
                progress(history[-1])
    model.eval()
    model.history = history
    model.seconds_per_step = statistics.median(times[min(5, len(times) - 1):])
    return model


@torch.no_grad()
def evaluate(model: TinyGPT, data: LanguageData, skip: Iterable[int] = (), batch_size: int = 256,
             limit: Optional[int] = None) -> Dict[str, Any]:
    """Validation loss (nats and bits per token), accuracy, the gap to the exact optimum, loss and accuracy
    on each kind of token, and the mean forward NFE per batch; `skip` leaves those layers out.
    `ok=False` with a `message` when a solve fails."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    val = data.val if limit is None else data.val[:limit]
    losses, hits, nfe, batches = [], [], 0.0, 0
    try:
        for i in range(0, len(val), batch_size):
            idx = val[i : i + batch_size].to(device)
            logits = model(idx, skip=skip)[:, :-1]
            target = idx[:, 1:]
            losses.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none").double().cpu())
            hits.append((logits.argmax(-1) == target).double().cpu())
            if not set(skip):
                nfe += model.stats().nfe_forward
            batches += 1
    except SolverError as err:
        return dict(ok=False, message=str(err).splitlines()[0], loss=float("nan"), bits=float("nan"),
                    accuracy=float("nan"), nfe_forward=float("nan"))
    finally:
        model.train(was)
    loss, hit = torch.cat(losses), torch.cat(hits)
    kind = data.val_kind[: len(val)]
    floor = float(data.val_optimal_loss[: len(val)].mean())
    row = dict(ok=True, message="", loss=float(loss.mean()), bits=float(loss.mean()) / math.log(2),
               accuracy=float(hit.mean()), optimal_loss=floor, gap=float(loss.mean()) - floor,
               nfe_forward=nfe / max(1, batches) if not set(skip) else None)
    for i, k in enumerate(("bigram", "first", "induction")):
        m = kind == i
        row[f"{k}_loss"] = float(loss[m].mean()) if m.any() else float("nan")
        row[f"{k}_accuracy"] = float(hit[m].mean()) if m.any() else float("nan")
    return row


def run_key(config: TransformerConfig, name: str) -> str:
    """A digest of everything run `name` depends on."""
    fields = key_fields(config)
    if VARIANTS[name].solver == "euler":  # the ode run's settings change nothing here
        for k in ("tol", "max_steps", "seminorm"):
            fields.pop(k)
    return digest(dict(fields, run=name, variant=asdict(VARIANTS[name])))


def load_or_train(name: str, config: TransformerConfig, data: LanguageData, out: Optional[str] = None,
                  progress=None) -> TinyGPT:
    """Run `name` trained under `config`: loaded from `out/models/` when this script saved it there
    for the same settings, else trained (and saved there when `out` is given)."""
    key = run_key(config, name)
    path = os.path.join(out, "models", f"{name}-{key}.pt") if out else None
    if path and os.path.exists(path):
        state = torch.load(path, weights_only=False)
        model = build_model(name, config).to(_device(config))
        model.load_state_dict(state["model"])
        model.history, model.seconds_per_step = state["history"], state["seconds_per_step"]
        return model.eval()
    model = train_variant(name, config, data, progress)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(dict(model=model.state_dict(), history=model.history, seconds_per_step=model.seconds_per_step),
                   path + ".tmp")
        os.replace(path + ".tmp", path)
    return model


# ---------------------------------------------------------------------------- splitting


def _rk4(g, t: float, x: Tensor, h: float, frozen: bool) -> Tensor:
    """One classical RK4 step of `dx/dt = g(t, x)` (with `frozen`, `t` is held at its start)."""
    tt = lambda s: torch.tensor(t if frozen else t + s, dtype=x.dtype, device=x.device)  # noqa: E731
    k1 = g(tt(0.0), x)
    k2 = g(tt(h / 2), x + (h / 2) * k1)
    k3 = g(tt(h / 2), x + (h / 2) * k2)
    k4 = g(tt(h), x + h * k3)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def split_step(field, t: float, x: Tensor, h: float, scheme: str, sub: str) -> Tensor:
    """One splitting step of `dx/dt = A + M` (`field.attention`, `field.feedforward`) from `(t, x)`.

    `scheme`: `"lie"` (A then M: the sequential block at h = 1), `"strang"` (M/2, A, M/2: the Macaron
    block at h = 1). `sub`: `"euler"` sub-steps, every sub-field read at `t` as in a transformer block;
    `"rk4"`: each sub-flow by one RK4 step, time carried by the M flow (A frozen at `t`, Strang: at `t + h/2`).
    """
    A, M = field.attention, field.feedforward
    if sub == "euler":
        tt = torch.tensor(t, dtype=x.dtype, device=x.device)
        if scheme == "lie":
            x = x + h * A(tt, x)
            return x + h * M(tt, x)
        x = x + (h / 2) * M(tt, x)
        x = x + h * A(tt, x)
        return x + (h / 2) * M(tt, x)
    if scheme == "lie":
        x = _rk4(A, t, x, h, frozen=True)
        return _rk4(M, t, x, h, frozen=False)
    x = _rk4(M, t, x, h / 2, frozen=False)
    x = _rk4(A, t + h / 2, x, h, frozen=True)
    return _rk4(M, t + h / 2, x, h / 2, frozen=False)


def split_solve(field, x: Tensor, t0: float, t1: float, steps: int, scheme: str, sub: str = "euler") -> Tensor:
    """`steps` equal splitting steps (`split_step`) from `x` at `t0` to `t1`; `scheme="euler"`/`"rk4"` are
    those methods on the unsplit field `A + M` instead."""
    h = (t1 - t0) / steps
    unsplit = lambda t, y: field.attention(t, y) + field.feedforward(t, y)  # noqa: E731
    for i in range(steps):
        t = t0 + i * h
        if scheme in ("euler", "rk4"):
            x = _rk4(unsplit, t, x, h, frozen=False) if scheme == "rk4" else \
                x + h * unsplit(torch.tensor(t, dtype=x.dtype, device=x.device), x)
        else:
            x = split_step(field, t, x, h, scheme, sub)
    return x


SPLIT_METHODS = (("lie", "euler"), ("strang", "euler"), ("lie", "rk4"), ("strang", "rk4"), ("euler", None), ("rk4", None))


class SplitBlock(nn.Module):
    """The depth `[0, depth]` by `split_solve` (same parameters), with `last_stats` counting an
    evaluation of `A` or of `M` as half an evaluation of `f`."""

    def __init__(self, field: nn.Module, depth: int, steps: int, scheme: str, sub: str = "euler"):
        super().__init__()
        self.field, self.depth, self.steps, self.scheme, self.sub = field, depth, steps, scheme, sub
        self.last_stats: Optional[odenet.SolveStats] = None

    def forward(self, x: Tensor) -> Tensor:
        per_step = {"lie": 1.0, "strang": 1.5, "euler": 1.0, "rk4": 4.0}[self.scheme] * (4 if self.sub == "rk4" else 1)
        self.last_stats = odenet.SolveStats(nfe_forward=self.steps * per_step, nfe_backward=0, n_accepted=self.steps,
                                            n_rejected=0)
        return split_solve(self.field, x, 0.0, float(self.depth), self.steps, self.scheme, self.sub)


def _with_block(model: TinyGPT, block: nn.Module) -> TinyGPT:
    new = copy.copy(model)
    new._modules = dict(model._modules)
    new.block = block
    return new


# ---------------------------------------------------------------------------- one run


def cross_eval_configs(config: TransformerConfig) -> List[Dict[str, Any]]:
    """The settings each trained model is re-evaluated under: its field `f` under other solvers and step
    counts, and the splitting methods of the unsplit field `A + M` (its limit: dopri5 on `A + M`)."""
    N = config.layers
    rows: List[Dict[str, Any]] = []
    for n in sorted({max(1, N // 2), N, 2 * N, 4 * N}):
        rows.append(dict(label=f"f: euler x{n}", kind="field", solver="euler", steps=n))
    rows.append(dict(label=f"f: rk4 x{N}", kind="field", solver="rk4", steps=N))
    for tol in (1e-2, 1e-4):
        rows.append(dict(label=f"f: dopri5 tol={tol:g}", kind="field", solver="dopri5", rtol=tol, atol=tol, max_steps=2000))
    for scheme in ("lie", "strang"):
        for n in (N, 4 * N):
            rows.append(dict(label=f"A+M: {scheme} x{n}", kind="split", scheme=scheme, steps=n))
    rows.append(dict(label="A+M: dopri5 tol=1e-4", kind="unsplit", rtol=1e-4, atol=1e-4))
    return rows


class _Unsplit(nn.Module):
    """The field `A + M` of a model's sub-fields."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.field.attention(t, x) + self.field.feedforward(t, x)


def cross_evaluate(model: TinyGPT, data: LanguageData, config: TransformerConfig) -> List[Dict[str, Any]]:
    """`evaluate` of `model` under each of `cross_eval_configs(config)`."""
    out = []
    for cfg in cross_eval_configs(config):
        if cfg["kind"] == "field":
            kw = {k: v for k, v in cfg.items() if k not in ("label", "kind", "solver")}
            variant = model.with_solver(cfg["solver"], **kw)
        elif cfg["kind"] == "split":
            variant = _with_block(model, SplitBlock(model.field, model.depth, cfg["steps"], cfg["scheme"]))
        else:
            variant = _with_block(model, ODEBlock(_Unsplit(model.field), "dopri5", t1=float(model.depth), rtol=cfg["rtol"],
                                                  atol=cfg["atol"], max_steps=2000))
        r = evaluate(variant, data, limit=config.cross_eval_limit)
        out.append(dict(label=cfg["label"], kind=cfg["kind"], **{k: r[k] for k in ("ok", "message", "loss", "bits",
                                                                                    "accuracy", "nfe_forward")},
                        gap=r.get("gap"), induction_accuracy=r.get("induction_accuracy")))
    return out


def activation_bytes(model: TinyGPT, idx: Tensor) -> int:
    """Bytes saved for backward by one training forward pass on `idx` (parameters excluded)."""
    model.train()
    try:
        with measure.saved_tensors(exclude=model.parameters()) as saved:
            loss = _lm_loss(model(idx), idx)
        emb = [model.wte.weight, model.wpe.weight]
        torch.autograd.backward(loss, inputs=emb)  # releases the graph; parameters' .grad of the rest untouched
        for p in emb:
            p.grad = None
    finally:
        model.eval()
    return int(saved.bytes)


def run_one(name: str, config: TransformerConfig, data: LanguageData, out: Optional[str]) -> Dict[str, Any]:
    """Train (or load) run `name`, then measure it: one results row."""
    t0 = time.perf_counter()
    model = load_or_train(name, config, data, out,
                          progress=lambda h: print(f"  {name} step {h['step']}: loss {h['loss']:.3f}, "
                                                   f"NFE {h['nfe_forward']}/{h['nfe_backward']}", flush=True)
                          if h["step"] % max(10, config.steps // 5 // 10 * 10) == 0 else None)
    train_wall = time.perf_counter() - t0
    device = next(model.parameters()).device
    ev = evaluate(model, data)
    tail = model.history[-max(1, len(model.history) // 10):]
    idx = data.train[: config.batch_size].to(device)
    row = dict(run=name, variant=asdict(model.variant), residual=model.variant.describe(), params=count_parameters(model),
               params_residual=count_parameters(model.field), evaluation=ev,
               nfe_forward_train=statistics.fmean(h["nfe_forward"] for h in tail),
               nfe_backward_train=statistics.fmean(h["nfe_backward"] for h in tail),
               seconds_per_step=model.seconds_per_step, activation_bytes=activation_bytes(model, idx),
               history=model.history, train_wall_seconds=train_wall)
    row["cross_eval"] = cross_evaluate(model, data, config) if config.cross_eval else []
    return row


# ---------------------------------------------------------------------------- splitting order


def _fit_order(hs: Sequence[float], errs: Sequence[float]) -> Tuple[float, float]:
    """Least-squares slope of log(error) on log(h) over all points, and over the three finest."""
    pts = [(math.log(h), math.log(e)) for h, e in zip(hs, errs) if e > 0 and math.isfinite(e)]

    def slope(p):
        if len(p) < 2:
            return float("nan")
        xs, ys = zip(*p)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        return sum((x - mx) * (y - my) for x, y in p) / sum((x - mx) ** 2 for x in xs)

    return slope(pts), slope(sorted(pts)[:3])


def splitting_order(field: nn.Module, x0: Tensor, depth: int, steps_per_unit: Sequence[int]) -> Dict[str, Any]:
    """Errors of the splitting methods (and Euler, RK4 on `A + M`) at `x(depth)` against dopri5 at
    1e-12 on `A + M`, in float64, as the steps per unit depth double; fitted orders."""
    field = copy.deepcopy(field).double().eval()
    x0 = x0.double()
    unsplit = _Unsplit(field)
    with torch.no_grad():
        ref = odenet.odeint(unsplit, x0, [0.0, float(depth)], solver="dopri5", rtol=1e-12, atol=1e-12,
                            max_steps=100000).ys[-1]
        check_ = odenet.odeint(unsplit, x0, [0.0, float(depth)], solver="dopri8", rtol=1e-12, atol=1e-12,
                               max_steps=100000).ys[-1]
        scale = ref.norm().item()
        methods = {}
        for scheme, sub in SPLIT_METHODS:
            label = f"{scheme} ({sub} sub-steps)" if sub else f"{scheme} on A+M"
            errs = []
            for n in steps_per_unit:
                x = split_solve(field, x0, 0.0, float(depth), n * depth, scheme, sub or "euler")
                errs.append((x - ref).norm().item() / scale)
            hs = [1.0 / n for n in steps_per_unit]
            order_all, order_fine = _fit_order(hs, errs)
            methods[label] = dict(scheme=scheme, sub=sub, h=hs, error=errs, order=order_all, order_fine=order_fine)
    return dict(reference_error=(check_ - ref).norm().item() / scale, methods=methods)


# ---------------------------------------------------------------------------- outputs


def _f(x, spec=".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def write_markdown(path: str, config: TransformerConfig, data: LanguageData, rows, split, env, command: str,
                   wall: Optional[Tuple[float, float]]) -> None:
    fl = data.floors()
    L = ["# transformer: a causal transformer's depth as an ODE\n",
         f"- Command: `{command}`",
         f"- Date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
         f"- Device: {env['device']} ({env['cpu']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads"
         + (f"; GPU {env['gpu']}" if env.get("gpu") else "") + ")",
         f"- Commit: `{env.get('commit')}`",
         f"- Versions: python {env['python']}, torch {env['torch']}, odenet {env['odenet']}, numpy {env['numpy']}",
         f"- Data: {data.description}",
         f"- Model: width {config.dim}, {config.heads} heads, depth N = {config.layers}, causal, "
         f"time-dependent tied fields: {config.time_dependent}, dropout {config.dropout:g}",
         f"- Training: {config.steps} steps of {config.batch_size} sequences, AdamW lr {config.lr:g} "
         f"(warm-up {config.warmup}, cosine to a tenth), weight decay {config.weight_decay:g}, seed {config.seed}; "
         f"ode run: dopri5 rtol = atol = {config.tol:g}, adjoint" + (" with seminorm" if config.seminorm else ""),
         ]
    if wall is not None:
        L.append(f"- Time of this invocation: {wall[0] / 60:.1f} min wall, {wall[1] / 60:.1f} min CPU (runs resumed from "
                 "results.jsonl are not retrained)")
    L += ["", f"Exact optimum on the validation set (Bayes-optimal predictor): **{fl['loss']:.4f} nats = {fl['bits']:.4f} "
          f"bits per token**, expected accuracy {100 * fl['accuracy']:.1f}%. Without induction (outputs after a "
          f"repeated trigger guessed uniformly): {fl['no_induction_loss']:.4f} nats. Tokens: "
          f"{100 * fl['fraction_bigram']:.1f}% bigram, {100 * fl['fraction_first']:.1f}% first output after a trigger, "
          f"{100 * fl['fraction_induction']:.1f}% repeated output (predictable by induction); their optimal losses "
          f"{fl['bigram_loss']:.3f}, {fl['first_loss']:.3f} and {fl['induction_loss']:.3f} nats.", "",
          "| run | residual part | params (residual) | val loss nats | bits/token | gap to optimum | acc. % "
          "| induction acc. % | loss bigram / first / induction | NFE fwd/bwd (train) | act. memory MiB | ms/step |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        e = r["evaluation"]
        L.append(f"| {r['run']} | {r['residual']} | {r['params']:,} ({r['params_residual']:,}) | {_f(e['loss'], '.4f')} "
                 f"| {_f(e['bits'], '.4f')} | {_f(e['gap'], '.4f')} | {100 * e['accuracy']:.1f} "
                 f"| {100 * e['induction_accuracy']:.1f} | {e['bigram_loss']:.3f} / {e['first_loss']:.3f} / "
                 f"{e['induction_loss']:.3f} | {r['nfe_forward_train']:.1f}/{r['nfe_backward_train']:.1f} "
                 f"| {r['activation_bytes'] / 2**20:.2f} | {1000 * r['seconds_per_step']:.0f} |")
    L += ["", "NFE: evaluations of the field per training batch (mean over the last tenth of training; a unit Euler "
          "step is one, the untied model's layer is one; direct backpropagation replays the graph: 0 backward). "
          "Activation memory: bytes saved for backward by one training forward pass of one batch, parameters "
          "excluded (`odenet.measure.saved_tensors`). ms/step: median wall time of a training step.", ""]
    labels = [c["label"] for c in rows[0]["cross_eval"]] if rows and rows[0]["cross_eval"] else []
    if labels:
        L += [f"## Cross-evaluation: each trained model under other solvers (val loss nats on the first "
              f"{min(config.cross_eval_limit, config.n_val)} validation sequences, NFE per forward)\n",
              "`f: ...` runs the model's own field `f` (its composition) under another solver; `A+M: ...` runs the "
              "splitting methods of the unsplit field `A + M` of its sub-fields (Lie–Trotter = sequential "
              "sub-steps, Strang = half/full/half, Euler sub-steps), and `A+M: dopri5` their common limit.\n",
              "| evaluated as | " + " | ".join(r["run"] for r in rows) + " |", "|---|" + "---:|" * len(rows)]
        for lab in labels:
            cells = []
            for r in rows:
                c = next((c for c in r["cross_eval"] if c["label"] == lab), None)
                cells.append("–" if c is None else ("failed" if not c["ok"] else f"{c['loss']:.4f} ({_f(c['nfe_forward'], '.0f')})"))
            L.append(f"| {lab} | " + " | ".join(cells) + " |")
        L.append("")
    if split:
        L += ["## Splitting order: error at depth N against dopri5 (1e-12) on A + M, float64\n"]
        for which, res in split.items():
            hs = next(iter(res["methods"].values()))["h"]
            L += [f"**{which}** (reference checked against dopri8: {res['reference_error']:.1e} relative)\n",
                  "| method | " + " | ".join(f"h = 1/{round(1 / h)}" for h in hs) + " | order (all) | order (3 finest) |",
                  "|---|" + "---:|" * (len(hs) + 2)]
            for lab, m in res["methods"].items():
                L.append(f"| {lab} | " + " | ".join(f"{e:.2e}" for e in m["error"]) + f" | {m['order']:.2f} | {m['order_fine']:.2f} |")
            L.append("")
    L.append("Figures: `training.png` (loss over training, floor dashed), `cross_eval.png` (val loss against NFE under "
             "other solvers), `splitting.png` (splitting error against the step).")
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")


def write_plots(out: str, config: TransformerConfig, data: LanguageData, rows, split) -> List[str]:
    from matplotlib.figure import Figure

    fl, written = data.floors(), []

    def save(fig, name):
        save_figure(fig, name, out=out, dpi=config.dpi, gallery=config.gallery or None)
        written.append(name)

    colours = {r["run"]: f"C{i % 10}" for i, r in enumerate(rows)}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    for r in rows:
        h = r["history"]
        a1.plot([p["step"] for p in h], [p["loss"] for p in h], color=colours[r["run"]], lw=0.9, label=r["run"])
        a2.plot([p["step"] for p in h], [p["nfe_forward"] + p["nfe_backward"] for p in h], color=colours[r["run"]], lw=0.9)
    a1.axhline(fl["loss"], color="k", ls="--", lw=0.8, label="optimum (entropy)")
    a1.axhline(fl["no_induction_loss"], color="gray", ls=":", lw=0.8, label="optimum without induction")
    a1.set(xlabel="training step", ylabel="training loss (nats/token)", title="training loss")
    a1.legend(fontsize=7)
    a2.set(xlabel="training step", ylabel="NFE forward + backward", yscale="log", title="field evaluations per training step")
    save(fig, "training.png")

    if rows and rows[0]["cross_eval"]:
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        for ax, kinds, title in ((axes[0], ("field",), "its own field f under other solvers"),
                                 (axes[1], ("split", "unsplit"), "splitting methods of A + M")):
            for r in rows:
                pts = [(c["nfe_forward"], c["loss"], c["label"]) for c in r["cross_eval"] if c["kind"] in kinds and c["ok"]]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=4, color=colours[r["run"]], label=r["run"])
                ax.plot([r["nfe_forward_train"]], [r["evaluation"]["loss"]], "*", ms=11, color=colours[r["run"]])
            ax.axhline(fl["loss"], color="k", ls="--", lw=0.8)
            ax.set(xscale="log", xlabel="NFE per forward pass", title=title)
        axes[0].set_ylabel("validation loss (nats/token); star: as trained")
        axes[0].legend(fontsize=7)
        save(fig, "cross_eval.png")

    if split:
        cols = min(3, len(split))
        nrows = math.ceil(len(split) / cols)
        fig = Figure(figsize=(5.2 * cols, 4.0 * nrows), layout="constrained")
        axes = list(fig.subplots(nrows, cols, squeeze=False).flat)
        for ax in axes[len(split):]:
            ax.axis("off")
        for ax, (which, res) in zip(axes, split.items()):
            for i, (lab, m) in enumerate(res["methods"].items()):
                ax.loglog(m["h"], m["error"], "o-", ms=3, color=f"C{i}", label=f"{lab}: {m['order_fine']:.2f}")
            ax.set(xlabel="step h (unit depth = one block)", ylabel="relative error at depth N", title=which)
            ax.legend(fontsize=7, title="order (3 finest)", title_fontsize=7)
        save(fig, "splitting.png")
    return written


# ---------------------------------------------------------------------------- main


def run(config: TransformerConfig, argv) -> None:
    """Every run of `config.runs`, the splitting measurement and the outputs (see the module docstring)."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = _device(config)
    data = build_data(config)
    log = ResultLog(config.out, fresh=config.fresh)
    if config.fresh:
        import shutil

        shutil.rmtree(os.path.join(config.out, "models"), ignore_errors=True)
    env = environment(device)
    fl = data.floors()
    print(f"{PROG}: {data.description}; optimum {fl['loss']:.4f} nats/token; runs {','.join(config.runs)}; device {device}",
          flush=True)
    rows, trained = [], False
    for name in config.runs:
        key = run_key(config, name)
        if key in log.done:
            rows.append(log.done[key])
            continue
        trained = True
        row = log.add(key, run_one(name, config, data, config.out))
        rows.append(row)
        e = row["evaluation"]
        print(f"{name}: val loss {e['loss']:.4f} (gap {e['gap']:.4f}), induction acc {100 * e['induction_accuracy']:.1f}%, "
              f"NFE {row['nfe_forward_train']:.1f}/{row['nfe_backward_train']:.1f}, {1000 * row['seconds_per_step']:.0f} ms/step",
              flush=True)
    split_key = digest(dict(key_fields(config), part="splitting", runs=[r for r in config.runs if VARIANTS[r].tied]))
    if split_key in log.done:
        split = log.done[split_key]["splitting"]
    else:
        trained = True
        split = {}
        x0 = build_model("tied", config).to(device).embed(data.val[: config.split_batch].to(device)).detach()
        split["random initialisation"] = splitting_order(build_model("tied", config).to(device).field, x0, config.layers,
                                                         config.split_steps)
        for name in config.runs:
            if VARIANTS[name].tied:
                model = load_or_train(name, config, data, config.out)
                with torch.no_grad():
                    x0 = model.embed(data.val[: config.split_batch].to(device))
                split[f"trained {name}"] = splitting_order(model.field, x0, config.layers, config.split_steps)
        log.add(split_key, dict(part="splitting", splitting=split))
    command = command_line(PROG, argv)
    wall = (time.perf_counter() - t_wall, time.process_time() - t_cpu) if trained else None
    write_json(os.path.join(config.out, "results.json"),
               dict(experiment="transformer", command=command, environment=env, config=asdict(config), floors=fl,
                    runs=rows, splitting=split, wall_seconds=wall and wall[0], cpu_seconds=wall and wall[1]))
    write_markdown(os.path.join(config.out, "results.md"), config, data, rows, split, env, command, wall)
    write_plots(config.out, config, data, rows, split)
    print(f"{PROG}: wrote {os.path.join(config.out, 'results.md')} ({time.perf_counter() - t_wall:.0f} s)", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (`--help` lists every setting)."""
    return script_main(PROG, parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
