"""Training and evaluation loops that record what continuous depth costs.

- `train`: AdamW with a one-cycle schedule, single process or DistributedDataParallel
  (when `torch.distributed` is initialised, e.g. by `setup_distributed` under torchrun),
  recording per epoch the loss, wall time and the function evaluations per batch
  forward and backward (from the blocks' `last_stats`).
- `evaluate`: test accuracy and the cost of the forward solves.
- `activation_bytes`: bytes saved for backward by one training step
  (`odenet.measure.saved_tensors`).
- `cross_evaluate`: a trained model's `f` re-run under other solvers and step counts.
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

from . import measure
from .models import ContinuousDepthNet, residual_stats
from .solution import SolverError

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
    """Where this process stands: `rank` of `world_size` processes (1 without torchrun), its `device`.

    **Fields:**

    - `rank`: this process's global rank (default 0).
    - `world_size`: number of processes (default 1).
    - `local_rank`: this process's rank on its node, the GPU index it uses (default 0).
    - `device`: the `torch.device` this process computes on (default CPU).

    **Example:**

    ```python
    info = odenet.training.DistInfo()
    assert info.is_main and not info.distributed
    assert odenet.training.DistInfo(rank=1, world_size=2).distributed
    ```
    """

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
    """`"auto"` (CUDA when available, else CPU), `"cpu"` or `"cuda"`/`"cuda:N"`.

    **Arguments:**

    - `device`: the name, `"auto"`, `"cpu"`, `"cuda"` or `"cuda:N"`.

    **Returns:** the `torch.device`.

    **Raises:** `TypeError` when `device` is not a string; `ValueError` for another name,
    or CUDA asked for where none is available.

    **Example:**

    ```python
    assert odenet.training.resolve_device("cpu") == torch.device("cpu")
    device = odenet.training.resolve_device("auto")  # cuda when available
    ```
    """
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
    """Initialise `torch.distributed` from torchrun's environment (`RANK`, `WORLD_SIZE`,
    `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) when it is set, else run as one process.

    The backend is `nccl` on CUDA and `gloo` on CPU; each process uses GPU `LOCAL_RANK`.

    **Arguments:**

    - `device`: `"auto"`, `"cpu"` or `"cuda"` (see `resolve_device`).

    **Returns:** a `DistInfo`.

    **Raises:** `TypeError`/`ValueError` for a bad `device` (see `resolve_device`).

    **Example:**

    ```python
    info = odenet.training.setup_distributed("cpu")  # without torchrun: one process
    assert info.world_size == 1 and info.is_main
    odenet.training.cleanup_distributed()
    ```
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
    """Tear down the process group if one was initialised (otherwise do nothing).

    **Example:**

    ```python
    info = odenet.training.setup_distributed("cpu")
    try:
        pass  # train and evaluate here
    finally:
        odenet.training.cleanup_distributed()
    ```
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- training


@dataclass
class EpochRecord:
    """What one training epoch cost (means over its batches, over all processes).

    **Fields:**

    - `epoch`: the epoch's index, from 0.
    - `loss`: mean cross-entropy loss over the epoch's examples.
    - `train_accuracy`: share of the epoch's examples classified correctly (in training mode).
    - `nfe_forward`, `nfe_backward`: function evaluations per batch, forward and backward.
    - `n_accepted`, `n_rejected`: accepted and rejected steps per batch, forward.
    - `n_accepted_backward`, `n_rejected_backward`: the same for the backward (adjoint) solve.
    - `seconds`: wall time of the epoch (the slowest process's).

    **Example:**

    ```python
    data = odenet.data.make_spheres(n_train=16, n_test=8)
    spec = odenet.models.ResidualSpec("euler", steps=2)
    model = odenet.models.build_model(data.input_shape, data.num_classes, spec, width=8)
    record = odenet.training.train(model, data.x_train, data.y_train, epochs=1, batch_size=8).last
    assert record.epoch == 0 and record.nfe_forward == 2  # two ResBlocks, one evaluation each
    ```
    """

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
    """History of a training run: one `EpochRecord` per epoch.

    **Fields:**

    - `history`: the `EpochRecord`s, in order (default empty).

    **Example:**

    ```python
    data = odenet.data.make_spheres(n_train=16, n_test=8)
    spec = odenet.models.ResidualSpec("euler", steps=2)
    model = odenet.models.build_model(data.input_shape, data.num_classes, spec, width=8)
    result = odenet.training.train(model, data.x_train, data.y_train, epochs=2, batch_size=8)
    assert len(result.history) == 2 and result.last is result.history[-1]
    result.seconds_per_epoch  # mean wall time of an epoch
    ```
    """

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
    """Train `model` on `(x, y)` with AdamW and a one-cycle learning-rate schedule.

    Under `torch.distributed` (`info.world_size > 1`) the model is wrapped in
    `DistributedDataParallel`, each process sees its `DistributedSampler` shard and uses
    `batch_size // world_size` examples per step, so the global batch stays `batch_size`.
    Function evaluations are read from the blocks after each backward and averaged over
    the epoch's batches and over the processes.

    **Arguments:**

    - `model`: a `ContinuousDepthNet` (its parameters are updated in place) on `info.device`.
    - `x`, `y`: training inputs and labels (on any device; batches are moved).
    - `epochs`, `batch_size`, `lr`, `weight_decay`: the optimisation settings.
    - `seed`: seeds the shuffling.
    - `info`: the process's `DistInfo` (default: one process on CPU).
    - `progress`: called with each finished `EpochRecord`.
    - `batch_progress`: called after each optimisation step.

    **Returns:** a `TrainResult`.

    **Raises:** `ValueError` for non-positive `epochs`/`batch_size`/`lr`, or a batch size
    smaller than the number of processes.

    **Example:**

    ```python
    data = odenet.data.make_spheres(n_train=16, n_test=8)
    spec = odenet.models.ResidualSpec("euler", steps=2)
    model = odenet.models.build_model(data.input_shape, data.num_classes, spec, width=8)
    result = odenet.training.train(model, data.x_train, data.y_train, epochs=1, batch_size=8, lr=1e-2)
    result.last.loss, result.last.nfe_forward
    ```
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
    """Accuracy of `model` on `(x, y)` in eval mode, without gradients, and the cost of its solves.

    **Arguments:**

    - `model`: a `ContinuousDepthNet`, or any module containing `ODEBlock`s/`ResBlock`s
      (e.g. from `ContinuousDepthNet.with_solver`).
    - `x`, `y`: inputs and labels.
    - `batch_size`: examples per forward pass.
    - `device`: where to run (default: where the model's parameters are).

    **Returns:** a dict with `accuracy`, and per batch means of `nfe_forward`, `n_accepted`,
    `n_rejected`; `ok` is `False` (and `accuracy` NaN, `message` set) when a solve failed.

    **Example:**

    ```python
    data = odenet.data.make_spheres(n_train=16, n_test=8)
    spec = odenet.models.ResidualSpec("euler", steps=2)
    model = odenet.models.build_model(data.input_shape, data.num_classes, spec, width=8)
    scores = odenet.training.evaluate(model, data.x_test, data.y_test, batch_size=4)
    assert scores["ok"] and 0 <= scores["accuracy"] <= 1 and scores["nfe_forward"] == 2
    ```
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
    """Bytes autograd saves for backward in one training step's forward pass on `(x, y)`
    (parameters excluded), counted with `odenet.measure.saved_tensors`, and the step's
    forward evaluations.

    **Arguments:**

    - `model`: a `ContinuousDepthNet`, or any module containing `ODEBlock`s/`ResBlock`s.
    - `x`, `y`: one training batch, inputs and labels (on the model's device).

    **Returns:** a dict with `bytes` and `nfe_forward`.

    **Example:**

    ```python
    data = odenet.data.make_spheres(n_train=16, n_test=8)
    spec = odenet.models.ResidualSpec("euler", steps=2)
    model = odenet.models.build_model(data.input_shape, data.num_classes, spec, width=8)
    cost = odenet.training.activation_bytes(model, data.x_train[:8], data.y_train[:8])
    assert cost["bytes"] > 0 and cost["nfe_forward"] == 2
    ```
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
    """`activation_bytes` of `model.with_solver(**s)` for each setting `s` (e.g. the same
    gradient method at several tolerances): activation memory against evaluations.

    **Arguments:**

    - `model`: the trained model.
    - `x`, `y`: one training batch.
    - `settings`: dicts of `ODEBlock` arguments, each with a `solver` key.

    **Returns:** one dict per setting: the setting's fields, `bytes`, `nfe_forward`, and
    `ok`/`message` (a failed solve gives `ok=False`).

    **Example:**

    ```python
    data = odenet.data.make_spheres(n_train=16, n_test=8)
    spec = odenet.models.ResidualSpec("euler", steps=2)
    model = odenet.models.build_model(data.input_shape, data.num_classes, spec, width=8)
    settings = [dict(solver="euler", steps=2), dict(solver="rk4", steps=2, gradient="checkpoint")]
    rows = odenet.training.activation_sweep(model, data.x_train[:8], data.y_train[:8], settings)
    assert [row["ok"] for row in rows] == [True, True]
    ```
    """
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
    """Median wall time in seconds of one forward pass on `x` in eval mode without gradients
    (`odenet.measure.median_time`, CUDA synchronised).

    **Arguments:**

    - `model`: the module to time.
    - `x`: the input batch (on the model's device).
    - `repeats`: number of timed passes (default 5), after one warm-up pass.
    - `device`: the device to synchronise (default: where the model's parameters are).

    **Returns:** the median time in seconds, a `float`.

    **Example:**

    ```python
    data = odenet.data.make_spheres(n_train=16, n_test=8)
    spec = odenet.models.ResidualSpec("euler", steps=2)
    model = odenet.models.build_model(data.input_shape, data.num_classes, spec, width=8)
    seconds = odenet.training.inference_time(model, data.x_test, repeats=3)
    assert seconds > 0
    ```
    """
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
    """Peak CUDA bytes of one forward and backward pass on `(x, y)` above what was allocated
    before (`odenet.measure.cuda_peak_memory`); `None` off CUDA. Gradients are cleared after.

    **Arguments:**

    - `model`: the module (its parameters' device decides where the step runs).
    - `x`, `y`: one training batch, inputs and labels (on the model's device).

    **Returns:** the peak in bytes (an `int`), or `None` when the model is not on CUDA.

    **Example:**

    ```python
    data = odenet.data.make_spheres(n_train=16, n_test=8)
    spec = odenet.models.ResidualSpec("euler", steps=2)
    model = odenet.models.build_model(data.input_shape, data.num_classes, spec, width=8)
    peak = odenet.training.training_step_peak_cuda(model, data.x_train[:8], data.y_train[:8])
    assert peak is None  # the model is on the CPU; on a GPU, the peak in bytes
    ```
    """
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
    """A solver setting to re-evaluate a trained `f` under: `steps` for fixed-step solvers,
    `rtol`/`atol` for adaptive ones.

    **Fields:**

    - `solver`: a name from `odenet.SOLVERS`.
    - `steps`: number of steps of a fixed-step solver.
    - `rtol`, `atol`: tolerances of an adaptive solver (`atol` defaults to `rtol`).

    **Example:**

    ```python
    cfg = odenet.training.EvalConfig("dopri5", rtol=1e-4)
    assert cfg.label == "dopri5 tol=0.0001"
    assert cfg.block_kwargs() == {"rtol": 1e-4, "atol": 1e-4, "max_steps": 1000}
    assert odenet.training.EvalConfig("rk4", steps=2).block_kwargs() == {"steps": 2}
    ```
    """

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
        """Keyword arguments for `ODEBlock` (and `ContinuousDepthNet.with_solver`).

        **Returns:** a dict with `steps` (when set), or `rtol`, `atol` and `max_steps=1000`
        (when `rtol` is set).
        """
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
    """Euler at several step counts, RK4 at several step counts, dopri5 at several tolerances (`rtol = atol`).

    **Arguments:**

    - `euler_steps`: step counts of the Euler settings.
    - `rk4_steps`: step counts of the RK4 settings.
    - `dopri5_tols`: tolerances of the dopri5 settings (each used as `rtol` and `atol`).

    **Returns:** a list of `EvalConfig`s: the Euler ones, then RK4, then dopri5.

    **Example:**

    ```python
    configs = odenet.training.default_cross_eval_configs(euler_steps=(2, 4), rk4_steps=(1,), dopri5_tols=(1e-3,))
    assert [c.label for c in configs] == ["euler x2", "euler x4", "rk4 x1", "dopri5 tol=0.001"]
    ```
    """
    configs = [EvalConfig("euler", steps=n) for n in euler_steps]
    configs += [EvalConfig("rk4", steps=n) for n in rk4_steps]
    configs += [EvalConfig("dopri5", rtol=tol, atol=tol) for tol in dopri5_tols]
    return configs


def cross_evaluate(
    model: ContinuousDepthNet, x: Tensor, y: Tensor, configs: Sequence[EvalConfig], *, batch_size: int = 1000
) -> List[Dict[str, Any]]:
    """Re-evaluate a trained model's dynamics under other solvers: accuracy against NFE.

    Each config runs `model.with_solver(config.solver, **config.block_kwargs())`, which
    shares the trained stem, `f` and head. For an untied ResNet the `f` is the
    piecewise-in-time `StackedDynamics` of its blocks, so `euler x6` reproduces the
    ResNet itself and the other settings show where it stops behaving like an ODE.

    **Arguments:**

    - `model`: the trained `ContinuousDepthNet`.
    - `x`, `y`: evaluation inputs and labels.
    - `configs`: the `EvalConfig`s (see `default_cross_eval_configs`).
    - `batch_size`: examples per forward pass.

    **Returns:** one dict per config: `solver`, `steps`, `rtol`, `atol`, `label`, and the
    `evaluate` fields (`accuracy`, `nfe_forward`, `n_accepted`, `n_rejected`, `ok`, `message`).

    **Raises:** `TypeError` when `configs` holds something other than `EvalConfig`s.

    **Example:**

    ```python
    data = odenet.data.make_spheres(n_train=16, n_test=8)
    spec = odenet.models.ResidualSpec("euler", steps=2)
    model = odenet.models.build_model(data.input_shape, data.num_classes, spec, width=8)
    configs = odenet.training.default_cross_eval_configs(euler_steps=(1, 4), rk4_steps=(1,), dopri5_tols=(1e-2,))
    rows = odenet.training.cross_evaluate(model, data.x_test, data.y_test, configs)
    [(row["label"], row["accuracy"], row["nfe_forward"]) for row in rows]
    ```
    """
    rows = []
    for cfg in configs:
        if not isinstance(cfg, EvalConfig):
            raise TypeError(f"configs must hold odenet.training.EvalConfig objects, got {type(cfg).__name__}.")
        variant = model.with_solver(cfg.solver, **cfg.block_kwargs())
        row = dict(solver=cfg.solver, steps=cfg.steps, rtol=cfg.rtol, atol=cfg.atol, label=cfg.label)
        row.update(evaluate(variant, x, y, batch_size=batch_size))
        rows.append(row)
    return rows
