"""The problems every library solves (fields `f`, initial state, output times) and `FProbe`, which times `f` alone."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from odenet import measure

from .config import Config, Size


class MLPField(nn.Module):
    """`f(t, y) = W2 tanh(W1 y + b1) + b2`: the Linear-Tanh-Linear field of the issue (ignores t)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.net(y)


class ConvField(nn.Module):
    """`f(t, y) = conv(tanh(conv(y)))`, 3x3 convolutions with padding 1 (ignores t)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.Tanh(), nn.Conv2d(hidden, channels, 3, padding=1)
        )

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.net(y)


@dataclass
class Problem:
    """One problem all libraries solve: `f`, its parameters, `y0` and the output times."""

    size: Size
    module: nn.Module  # owns the parameters
    f: Callable[[Tensor, Tensor], Tensor]  # what the solvers call (the module, or its compiled form)
    y0: Tensor
    ts: List[float]  # output times as floats
    t: Tensor  # output times as a tensor on the device
    t_f: float = float("nan")  # median time of one f call, no grad (s)
    t_fb: float = float("nan")  # median time of one f call with autograd + its VJP (s)
    probe: Optional["FProbe"] = None  # times f alone (see FProbe)
    loss_scale: float = 1.0  # the training loss is loss_scale * y(T).square().mean()

    @property
    def params(self) -> List[Tensor]:
        """The trainable parameters of `f` (what a training step differentiates)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def train_y0(self) -> Tensor:
        """A fresh copy of `y0` that requires grad (the input of a training step)."""
        return self.y0.detach().clone().requires_grad_(True)

    def loss(self, y: Tensor) -> Tensor:
        """The training loss of the final state: `y.square().mean()`, times `loss_scale`."""
        loss = y.square().mean()
        return loss if self.loss_scale == 1.0 else loss * self.loss_scale


def make_problem(size: Size, cfg: Config) -> Problem:
    """The problem of `size` on the configured device and dtype, seeded by `cfg.seed`."""
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if size.kind == "mlp":
        module = MLPField(size.shape[-1], size.hidden)
    else:
        module = ConvField(size.shape[1], size.hidden)
    module = module.to(device=device, dtype=dtype)
    y0 = torch.randn(size.shape, generator=gen, dtype=dtype).to(device)
    f = torch.compile(module) if cfg.compile else module
    ts = [0.0, float(cfg.t_end)]
    return Problem(size, module, f, y0, ts, torch.tensor(ts, dtype=dtype, device=device), loss_scale=cfg.loss_scale)


def sync(device) -> None:
    """Wait for the device (CUDA) so that a timer reads finished work."""
    measure.synchronize(device)


class FProbe:
    """Times `f` alone on the solve's input: `t_f` (no grad) and `t_fb` (autograd plus the VJP to state and
    parameters); one call per sample on CPU, a block between two syncs on CUDA (throughput, as in a solve)."""

    # `sample` runs once per repeat round, shuffled in with the solves, so that `t_f` sees the
    # same machine state as they do.

    def __init__(self, prob: Problem, device: str):
        self.prob, self.device = prob, device
        self.t0 = torch.zeros((), dtype=prob.y0.dtype, device=prob.y0.device)
        self.cot = torch.randn_like(prob.y0)
        self.cuda = torch.device(device).type == "cuda"
        self.samples: Dict[str, List[float]] = {"f": [], "fb": []}
        self._plan: Dict[str, Tuple[int, int]] = {}  # kind -> (calls per sample, samples per round)

    def _call(self, kind: str) -> None:
        """One call of `f` without grad ("f"), or with autograd and its VJP ("fb")."""
        prob = self.prob
        if kind == "f":
            with torch.no_grad():
                prob.f(self.t0, prob.y0)
        else:
            yy = prob.y0.detach().requires_grad_(True)
            out = prob.f(self.t0, yy)
            torch.autograd.grad(out, (yy, *prob.params), self.cot)

    def _plan_for(self, kind: str) -> Tuple[int, int]:
        """(calls per sample, samples per round) of `kind`, fixed by a first timed call."""
        if kind not in self._plan:
            for _ in range(3):
                self._call(kind)
            sync(self.device)
            s = time.perf_counter()
            self._call(kind)
            sync(self.device)
            one = max(time.perf_counter() - s, 1e-7)
            per = max(1, int(1e-3 / one)) if self.cuda else 1
            # about 50 ms of samples per round, at least 3
            self._plan[kind] = (per, int(min(max(0.05 / (one * per), 3), 200)))
        return self._plan[kind]

    def sample(self, kinds: Sequence[str] = ("f",), n: Optional[int] = None) -> None:
        """`n` samples (default: about 50 ms worth) of each kind, "f" and/or "fb"."""
        for kind in kinds:
            per, count = self._plan_for(kind)
            for _ in range(n or count):
                sync(self.device)
                s = time.perf_counter()
                for _ in range(per):
                    self._call(kind)
                sync(self.device)
                self.samples[kind].append((time.perf_counter() - s) / per)

    def sample_for(self, budget_s: float, kinds: Sequence[str] = ("f", "fb")) -> None:
        """Samples for about `budget_s` seconds in all (the per-size figure)."""
        for kind in kinds:
            per, count = self._plan_for(kind)
            s = time.perf_counter()
            self.sample((kind,), n=3)
            one = (time.perf_counter() - s) / 3
            self.sample((kind,), n=int(min(max(budget_s / len(kinds) / max(one, 1e-7), 5), 5000)))

    def median(self, kind: str) -> float:
        """Median seconds per call of `kind` (NaN without samples)."""
        v = self.samples[kind]
        return statistics.median(v) if v else float("nan")

    def fresh(self) -> "FProbe":
        """A probe with the same plan and no samples (one per group of cases)."""
        other = FProbe.__new__(FProbe)
        other.__dict__.update(self.__dict__)
        other.samples = {"f": [], "fb": []}
        return other


def with_t_end(prob: Problem, t_end: float) -> Problem:
    """The same problem (same f, y0, probe) integrated over [0, t_end]."""
    ts = [prob.ts[0], float(t_end)]
    return replace(prob, ts=ts, t=torch.tensor(ts, dtype=prob.y0.dtype, device=prob.y0.device))
