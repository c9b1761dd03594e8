"""Training and evaluation loops that record what continuous depth costs (DDP-aware under torchrun):
`train`, `evaluate`, `activation_bytes`, `cross_evaluate` and the process setup around them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from odenet import SolverError, measure

from .models import ContinuousDepthNet, residual_stats

__all__ = [
    "DistInfo",
    "setup_distributed",
    "cleanup_distributed",
    "resolve_device",
    "EpochRecord",
    "TrainResult",
    "train",
    "evaluate",
    "activation_bytes",
    "inference_time",
    "training_step_peak_cuda",
    "activation_sweep",
    "EvalConfig",
    "default_cross_eval_configs",
    "cross_evaluate",
]


# ---------------------------------------------------------------------------- devices and processes


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: `rank` of `world_size` processes (1 without torchrun), `local_rank`, `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part (`world_size > 1`)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that logs and writes results."""
        return self.rank == 0


def resolve_device(device: str) -> torch.device:
    """`"auto"` (CUDA when available, else CPU), `"cpu"` or `"cuda"`/`"cuda:N"` as a `torch.device`."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string ('auto', 'cpu' or 'cuda'), got {type(device).__name__}.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for, but CUDA is not available here; use 'cpu' or 'auto'.")
        return torch.device(device)
    raise ValueError(f"Unknown device {device!r}; choose 'auto', 'cpu' or 'cuda'.")


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise `torch.distributed` from torchrun's environment when it is set (nccl on CUDA,
    gloo on CPU; GPU `LOCAL_RANK`), else run as one process.
    """
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Tear down the process group if one was initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- training


@dataclass
class EpochRecord:
    """What one training epoch cost: loss, accuracy, NFE and steps per batch (forward and backward), seconds."""

    epoch: int
    loss: float
    train_accuracy: float
    nfe_forward: float
    nfe_backward: float
    n_accepted: float
    n_rejected: float
    n_accepted_backward: float
    n_rejected_backward: float
    seconds: float


@dataclass
class TrainResult:
    """History of a training run: one `EpochRecord` per epoch."""

    history: List[EpochRecord] = field(default_factory=list)

    @property
    def last(self) -> EpochRecord:
        """The last epoch's `EpochRecord` (`IndexError` when there is none)."""
        return self.history[-1]

    @property
    def seconds_per_epoch(self) -> float:
        """Mean wall time of an epoch in seconds (0 for an empty history)."""
        return sum(r.seconds for r in self.history) / max(1, len(self.history))


def _all_reduce(t: Tensor, info: DistInfo, op=None) -> Tensor:
    """All-reduce a small CPU tensor (through the device for nccl, which reduces CUDA tensors only)."""
    op = dist.ReduceOp.SUM if op is None else op
    if info.device.type == "cuda":
        moved = t.to(info.device)
        dist.all_reduce(moved, op=op)
        return moved.cpu()
    dist.all_reduce(t, op=op)
    return t


def _batches(indices: Tensor, batch_size: int) -> List[Tensor]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


class _IndexSet(torch.utils.data.Dataset):
    """A stand-in data set of length `n` for `DistributedSampler` (which only needs the length)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def train(
    model: ContinuousDepthNet,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    info: DistInfo = DistInfo(),
    progress: Optional[Callable[[EpochRecord], None]] = None,
    batch_progress: Optional[Callable[[], None]] = None,
) -> TrainResult:
    """Train `model` on `(x, y)` with AdamW and a one-cycle schedule; under torchrun with
    `DistributedDataParallel`, the global batch staying `batch_size`.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    if batch_size < info.world_size:
        raise ValueError(f"batch_size={batch_size} is smaller than the {info.world_size} processes; raise it.")
    device = info.device
    model.to(device)
    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    local_batch = batch_size // info.world_size
    sampler = torch.utils.data.DistributedSampler(
        _IndexSet(len(y)), num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed, drop_last=False
    )
    steps_per_epoch = math.ceil(sampler.num_samples / local_batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    result = TrainResult()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(iter(sampler)), dtype=torch.long)
        model.train()
        # per-epoch sums: batches, loss*n, correct, n, nfe fwd, nfe bwd, accepted, rejected, accepted bwd, rejected bwd
        sums = torch.zeros(10, dtype=torch.float64)
        measure.synchronize(device)
        t0 = time.perf_counter()
        for batch in _batches(idx, local_batch):
            xb, yb = x[batch].to(device, non_blocking=True), y[batch].to(device, non_blocking=True)
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            s = model.solve_stats()  # read after backward, so the backward counts are filled in
            sums += torch.tensor(
                [
                    1.0, loss.item() * len(yb), (logits.argmax(1) == yb).sum().item(), len(yb),
                    s.nfe_forward, s.nfe_backward, s.n_accepted, s.n_rejected,
                    s.n_accepted_backward, s.n_rejected_backward,
                ],
                dtype=torch.float64,
            )
            if batch_progress is not None:
                batch_progress()
        measure.synchronize(device)
        seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if info.distributed:
            sums = _all_reduce(sums, info)
            seconds = _all_reduce(seconds, info, dist.ReduceOp.MAX)
        b = max(1.0, float(sums[0]))
        record = EpochRecord(
            epoch=epoch,
            loss=float(sums[1] / sums[3]),
            train_accuracy=float(sums[2] / sums[3]),
            nfe_forward=float(sums[4]) / b,
            nfe_backward=float(sums[5]) / b,
            n_accepted=float(sums[6]) / b,
            n_rejected=float(sums[7]) / b,
            n_accepted_backward=float(sums[8]) / b,
            n_rejected_backward=float(sums[9]) / b,
            seconds=float(seconds[0]),
        )
        result.history.append(record)
        if progress is not None:
            progress(record)
    return result


# ---------------------------------------------------------------------------- evaluation and measurement


def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000, device=None) -> Dict[str, Any]:
    """Accuracy of `model` on `(x, y)` (eval mode, no gradients) and the mean cost of its solves per batch;
    `ok=False` with a `message` when a solve failed.
    """
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    nfe = acc = rej = 0.0
    batches = 0
    try:
        with torch.no_grad():
            for i in range(0, len(y), batch_size):
                xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
                correct += int((model(xb).argmax(1) == yb).sum())
                s = residual_stats(model.residual if isinstance(model, ContinuousDepthNet) else model)
                nfe += s.nfe_forward
                acc += s.n_accepted
                rej += s.n_rejected
                batches += 1
    except SolverError as err:
        return dict(accuracy=float("nan"), nfe_forward=float("nan"), n_accepted=float("nan"), n_rejected=float("nan"),
                    ok=False, message=str(err).splitlines()[0])
    finally:
        model.train(was_training)
    b = max(1, batches)
    return dict(accuracy=correct / max(1, len(y)), nfe_forward=nfe / b, n_accepted=acc / b, n_rejected=rej / b,
                ok=True, message="")


def activation_bytes(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, float]:
    """Bytes autograd saves for backward in one training forward pass on `(x, y)` (parameters
    excluded, `odenet.measure.saved_tensors`), and that pass's forward NFE.
    """
    was_training = model.training
    model.train()
    # The input is made a leaf that requires grad so that the graph can be released by a
    # backward pass into it alone (parameters' .grad untouched): a graph recorded under an
    # identity pack hook holds reference cycles (an op's output saved by the op itself) that
    # are freed only when backward runs through them, not when the graph is dropped.
    xr = x.detach().requires_grad_(True)
    try:
        with measure.saved_tensors(exclude=model.parameters()) as saved:
            loss = F.cross_entropy(model(xr), y)
        stats = residual_stats(model.residual if isinstance(model, ContinuousDepthNet) else model)
        torch.autograd.backward(loss, inputs=[xr])
        del loss
    finally:
        model.train(was_training)
    return dict(bytes=int(saved.bytes), nfe_forward=int(stats.nfe_forward))


def activation_sweep(model: ContinuousDepthNet, x: Tensor, y: Tensor, settings: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """`activation_bytes` of `model.with_solver(**s)` for each setting `s` (`ok=False` when a solve fails)."""
    out = []
    for setting in settings:
        kw = dict(setting)
        solver = kw.pop("solver")
        row = dict(setting)
        try:
            row.update(activation_bytes(model.with_solver(solver, **kw), x, y), ok=True, message="")
        except SolverError as err:
            row.update(bytes=None, nfe_forward=None, ok=False, message=str(err).splitlines()[0])
        out.append(row)
    return out


def inference_time(model: nn.Module, x: Tensor, *, repeats: int = 5, device=None) -> float:
    """Median wall time in seconds of one forward pass on `x` (eval mode, no gradients, CUDA synchronised)."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def run():
        with torch.no_grad():
            model(x)

    try:
        return measure.median_time(run, repeats=repeats, warmup=1, device=device)
    finally:
        model.train(was_training)


def training_step_peak_cuda(model: nn.Module, x: Tensor, y: Tensor) -> Optional[int]:
    """Peak CUDA bytes of one forward and backward pass on `(x, y)`; `None` off CUDA."""
    device = next(model.parameters()).device

    def step():
        F.cross_entropy(model(x), y).backward()

    try:
        return measure.cuda_peak_memory(step, device=device)
    finally:
        model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- cross-evaluation


@dataclass(frozen=True)
class EvalConfig:
    """A solver setting to re-evaluate a trained `f` under: `steps` (fixed-step) or `rtol`/`atol` (adaptive)."""

    solver: str
    steps: Optional[int] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None

    @property
    def label(self) -> str:
        """A short name for tables and plots, e.g. `euler x4` or `dopri5 tol=0.001`."""
        if self.steps is not None:
            return f"{self.solver} x{self.steps}"
        return f"{self.solver} tol={self.rtol:g}"

    def block_kwargs(self) -> Dict[str, Any]:
        """`ODEBlock` keywords: `steps`, or `rtol`, `atol` and `max_steps=1000`."""
        kw: Dict[str, Any] = {}
        if self.steps is not None:
            kw["steps"] = self.steps
        if self.rtol is not None:
            kw.update(rtol=self.rtol, atol=self.atol if self.atol is not None else self.rtol, max_steps=1000)
        return kw


def default_cross_eval_configs(
    euler_steps: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
    rk4_steps: Sequence[int] = (1, 2, 4, 8),
    dopri5_tols: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5),
) -> List[EvalConfig]:
    """Euler and RK4 at several step counts, then dopri5 at several tolerances (`rtol = atol`)."""
    configs = [EvalConfig("euler", steps=n) for n in euler_steps]
    configs += [EvalConfig("rk4", steps=n) for n in rk4_steps]
    configs += [EvalConfig("dopri5", rtol=tol, atol=tol) for tol in dopri5_tols]
    return configs


def cross_evaluate(
    model: ContinuousDepthNet, x: Tensor, y: Tensor, configs: Sequence[EvalConfig], *, batch_size: int = 1000
) -> List[Dict[str, Any]]:
    """Re-evaluate a trained model's `f` under each config (`model.with_solver`, same parameters):
    one row per config with its label and the `evaluate` fields.
    """
    rows = []
    for cfg in configs:
        if not isinstance(cfg, EvalConfig):
            raise TypeError(f"configs must hold EvalConfig objects, got {type(cfg).__name__}.")
        variant = model.with_solver(cfg.solver, **cfg.block_kwargs())
        row = dict(solver=cfg.solver, steps=cfg.steps, rtol=cfg.rtol, atol=cfg.atol, label=cfg.label)
        row.update(evaluate(variant, x, y, batch_size=batch_size))
        rows.append(row)
    return rows
