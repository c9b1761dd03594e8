"""Measuring what a block costs: activation memory (bytes saved for backward), time, peak CUDA
memory, and reads of tensor values into Python (host-device synchronisations)."""

from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch import Tensor

__all__ = ["SavedTensors", "saved_tensors", "HostReads", "host_reads", "median_time", "cuda_peak_memory", "synchronize"]


@dataclass
class SavedTensors:
    """The tally `saved_tensors` fills in: `bytes` of distinct storages saved for backward, `count` of saves."""

    bytes: int = 0  #: bytes of the distinct storages saved for backward (excluded tensors left out)
    count: int = 0  #: number of pack calls (tensors saved, with repeats)
    _seen: set = field(default_factory=set, repr=False)
    # The counted storages, held until the block ends: a storage freed inside the block (a
    # discarded graph, e.g. a rejected step or an FSAL stage that only fed the error estimate)
    # could otherwise hand its address to a later one, which would then go uncounted.
    _held: list = field(default_factory=list, repr=False)

    @property
    def megabytes(self) -> float:
        """`bytes` in MiB (2**20 bytes)."""
        return self.bytes / 2**20


def _storage(t: Tensor):
    """`(address, bytes, owner)` of `t`'s memory; holding `owner` keeps the address taken."""
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes(), st
    except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
        return id(t), t.numel() * t.element_size(), t


@contextmanager
def saved_tensors(exclude: Iterable[Tensor] = ()) -> Iterator[SavedTensors]:
    """Count the bytes autograd saves for backward inside the `with` block, each storage once.

    Storages of graphs dropped inside the block (a rejected step, say) count too, and are held
    until it ends so that a later tensor cannot reuse their memory and go uncounted.

    **Arguments:**

    - `exclude`: tensors not counted; `model.parameters()` counts activations only.

    **Returns:** a context manager yielding a `SavedTensors`, filled in as the block runs.

    **Example:**

    ```python
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2), solver="rk4", steps=8)
    with odenet.measure.saved_tensors(exclude=block.parameters()) as saved:
        loss = block(torch.randn(32, 2)).square().sum()
    saved.bytes, saved.megabytes  # 8 steps x 4 stages of activations
    ```
    """
    tally = SavedTensors()
    excluded = {_storage(p)[0] for p in exclude}

    def pack(t: Tensor):
        tally.count += 1
        ptr, nbytes, owner = _storage(t)
        if ptr not in excluded and ptr not in tally._seen:
            tally._seen.add(ptr)
            tally.bytes += nbytes
            tally._held.append(owner)
        # Detached: a packed tensor that keeps its grad_fn would form a reference cycle with
        # the node that saved it (an op saving its own output), leaking the graph when it is
        # dropped without backward. Same storage, so unpacking gives the same values.
        return t.detach()

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield tally
    finally:
        tally._held.clear()  # counting is done; let the storages go with their graphs


@dataclass(eq=False)
class HostReads:
    """The tally `host_reads` fills in: the `count` of reads, and `by_kind` per method name."""

    count: int = 0  #: reads of tensor values into Python (and copies to the CPU from another device)
    by_kind: Dict[str, int] = field(default_factory=dict)  #: the reads per method name


# The `torch.Tensor` methods that hand a tensor's values to Python, and the ones that copy them
# to the CPU (counted only when the source is on another device).
_READS = ("__bool__", "__float__", "__int__", "__index__", "__complex__", "item", "tolist", "nonzero", "numpy")
_COPIES = ("to", "cpu")
_counting: List[HostReads] = []  # the open blocks, innermost last
_originals: Dict[str, object] = {}  # what `torch.Tensor` itself defined under each name, if anything
_lock = threading.Lock()  # guards the two above and the counts
_inside = threading.local()  # `depth`: wrapped calls under way in this thread


def _counted(name: str, method: Callable, copy: bool) -> Callable:
    def wrapper(self, *args, **kwargs):
        # Only the outermost call counts: under a TorchFunctionMode (`with torch.device(...)`,
        # `torch.set_default_device`) or a tensor subclass, torch dispatches the same read to the
        # wrapped method once more.
        depth = getattr(_inside, "depth", 0)
        _inside.depth = depth + 1
        try:
            out = method(self, *args, **kwargs)
        finally:
            _inside.depth = depth
        if depth == 0 and (not copy or (self.device.type != "cpu" and isinstance(out, Tensor) and out.device.type == "cpu")):
            with _lock:
                for tally in _counting:
                    tally.count += 1
                    tally.by_kind[name] = tally.by_kind.get(name, 0) + 1
        return out

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = method.__doc__
    return wrapper


def _unwrap() -> None:
    for name, original in _originals.items():
        if original is None:
            if name in torch.Tensor.__dict__:  # (an interrupted `_wrap` may not have set it)
                delattr(torch.Tensor, name)  # inherited from torch's C base class
        else:
            setattr(torch.Tensor, name, original)
    _originals.clear()


def _wrap() -> None:
    try:
        for name in (n for n in _READS + _COPIES if hasattr(torch.Tensor, n)):
            _originals[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, _counted(name, getattr(torch.Tensor, name), name in _COPIES))
    except BaseException:
        _unwrap()
        raise


@contextmanager
def host_reads() -> Iterator[HostReads]:
    """Count the reads of tensor values into Python inside the `with` block: on a GPU, each one
    is a host-device synchronisation.

    Reads are `float()`, `bool()`, `int()`, `complex()`, `.item()`, `.tolist()`, `.nonzero()`,
    `.numpy()`, and copies to the CPU from another device, in every thread (backward included),
    so keep other threads quiet. Reads inside PyTorch's C++ code are not seen (on CUDA,
    `torch.cuda.set_sync_debug_mode` reports them). Blocks may nest.

    **Returns:** a context manager yielding a `HostReads`, filled in as the block runs.

    **Example:**

    ```python
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2), solver="rk4", steps=8)
    with odenet.measure.host_reads() as reads:
        block(torch.randn(32, 2)).sum().backward()
    reads.count, reads.by_kind  # 2 whatever the steps: the output times, one finiteness check
    ```
    """
    tally = HostReads()
    with _lock:
        if not _counting:
            _wrap()
        _counting.append(tally)
    try:
        yield tally
    finally:
        with _lock:
            del _counting[next(i for i, t in enumerate(_counting) if t is tally)]
            if not _counting:
                _unwrap()


def synchronize(device) -> None:
    """Wait for queued work on a CUDA device (no-op on CPU).

    **Arguments:**

    - `device`: a `torch.device` or its name.

    **Example:**

    ```python
    odenet.measure.synchronize("cpu")  # nothing to wait for
    ```
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device="cpu") -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs.

    **Arguments:**

    - `fn`: called with no arguments.
    - `repeats`, `warmup`: timed runs, and untimed runs before them.
    - `device`: synchronised before and after each run.

    **Returns:** the median, in seconds.

    **Raises:** `ValueError` if `repeats < 1`.

    **Example:**

    ```python
    a = torch.randn(64, 64)
    seconds = odenet.measure.median_time(lambda: a @ a, repeats=3)
    ```
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_peak_memory(fn: Callable[[], object], device="cuda") -> Optional[int]:
    """Peak bytes allocated on a CUDA `device` while `fn()` runs, above what was allocated before.

    **Arguments:**

    - `fn`: called once with no arguments.
    - `device`: the CUDA device.

    **Returns:** the peak in bytes, or `None` off CUDA.

    **Example:**

    ```python
    assert odenet.measure.cuda_peak_memory(lambda: None, device="cpu") is None
    ```
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
