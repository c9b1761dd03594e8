"""Per-sample error control: the leading axis of the state is a batch of independent problems.

Each sample has its own time, step size, error norm and accept/reject decision, so one hard
sample does not set the steps of the others. All samples advance together: every evaluation
calls `f` on the whole batch with a time tensor of shape `[B, 1, ..., 1]` (each sample's own
time), a sample that rejects its step or has finished keeps its state (`torch.where`), and a
finished one stops moving (`h = 0`). Times and step sizes are float64 tensors on the state's
device (float32 on MPS); the decisions mirror `_adaptive_loop`'s, so a sample takes the steps
it would take solved alone. One host read per iteration: whether any sample still runs, how
many outputs the step produced, and whether a trial step was not finite (under autograd such a
step is taken again without that sample, see `_redo`).
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .control import Adaptive, max_norm, rms_norm
from .controller import PIController
from .rk import ExplicitRK
from .stats import SolveStats
from .status import Status
from .integrate import LoopResult

__all__ = ["integrate_per_sample", "sample_norm", "BatchResult"]

_DEFAULT_CONTROLLER = PIController()
# A sample's state: running, finished, or failed with one of these statuses (index = code).
_RUNNING, _DONE = 0, 1
_FAILURES = (None, None, Status.MAX_STEPS, Status.STEP_UNDERFLOW, Status.NONFINITE)
_MAX, _UNDERFLOW, _NONFINITE = 2, 3, 4


def sample_norm(norm) -> Callable[[Tensor], Tensor]:
    """The error norm of each sample, `[B, ...] -> [B]`: `"rms"`/`"max"` over the sample's
    elements, or a callable `norm(x) -> 0-dim tensor` applied to each sample by `torch.func.vmap`."""
    if norm in ("rms", rms_norm):
        return lambda x: torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1) / math.sqrt(max(x[0].numel(), 1))
    if norm in ("max", max_norm):
        return lambda x: x.reshape(x.shape[0], -1).abs().amax(1) if x[0].numel() else x.new_zeros(x.shape[0])
    return torch.func.vmap(norm)


class BatchResult(LoopResult):
    """The `LoopResult` of a per-sample solve; `failed` (set after construction) lists the
    samples that failed, `(sample, Status)`, and the message names them."""

    def message(self, control: Adaptive) -> str:
        text = super().message(control)
        failed = getattr(self, "failed", ())
        if not failed:
            return text
        shown = ", ".join(f"{i} ({s.value})" for i, s in failed[:10]) + (" ..." if len(failed) > 10 else "")
        return (f"Per-sample solve: {len(failed)} sample(s) of the batch failed: {shown}; the others finished "
                f"(their outputs are in the solution). Sample {failed[0][0]}: {text}")


class _Tab(NamedTuple):
    """A tableau's nonzero coefficients, each as `(stage, column)` into one vector `coefs`
    (so that `h·coef` for every sample is one product per step)."""

    coefs: Tuple[float, ...]
    rows: Tuple[Tuple[Tuple[int, int], ...], ...]
    b: Tuple[Tuple[int, int], ...]
    err: Tuple[Tuple[int, int], ...]
    err_low: Tuple[Tuple[int, int], ...]


def _tab(solver: ExplicitRK) -> _Tab:
    coefs: List[float] = []

    def nonzero(row):
        out = []
        for j, x in enumerate(row or ()):
            if x != 0.0:
                out.append((j, len(coefs)))
                coefs.append(float(x))
        return tuple(out)

    tab = solver.tableau
    rows, b, err, low = tuple(nonzero(r) for r in tab.a), nonzero(tab.b), nonzero(tab.b_err), nonzero(tab.b_err_low)
    return _Tab(tuple(coefs), rows, b, err, low)


def _combine(y: Tensor, hc: Tensor, terms, ks: List[Tensor]) -> Tensor:
    """`y + Σ (h·coef)_j k_j` with one `h·coef` per sample (`hc[column]`, shaped to broadcast)."""
    if not terms:
        return y
    (j, c), rest = terms[0], terms[1:]
    out = torch.addcmul(y, ks[j], hc[c])
    for j, c in rest:
        out.addcmul_(ks[j], hc[c])
    return out


def _lincomb(hc: Tensor, terms, ks: List[Tensor]) -> Tensor:
    """`Σ (h·coef)_j k_j` (an error estimate), without autograd."""
    with torch.no_grad():
        (j, c), rest = terms[0], terms[1:]
        out = ks[j] * hc[c]
        for j, c in rest:
            out.addcmul_(ks[j], hc[c])
        return out


class _Batch:
    """What the loop fixes once: sizes, the time dtype, the tableau, and `col` (a `[B]` tensor
    viewed as `[B, 1, ..., 1]` in the state's dtype, to broadcast against the state)."""

    def __init__(self, solver: ExplicitRK, y0: Tensor, ts: Sequence[float]):
        self.solver, self.tab = solver, _tab(solver)
        self.dtype, self.device = y0.dtype, y0.device
        self.shape = (y0.shape[0],) + (1,) * (y0.dim() - 1)
        self.tdtype = torch.float32 if y0.device.type == "mps" else torch.float64
        # As columns, so that `coefs * h` is `[n, B]`, viewed as n tensors that broadcast against the state.
        self.coefs = torch.tensor(self.tab.coefs, dtype=self.tdtype, device=y0.device).unsqueeze(1)
        self.c = torch.tensor(solver.tableau.c, dtype=self.tdtype, device=y0.device).unsqueeze(1)
        self.direction = 1.0 if ts[-1] > ts[0] else -1.0
        self.ts = torch.tensor(ts, dtype=self.tdtype, device=y0.device)
        self.keys = self.ts * self.direction  # increasing: searchsorted finds the outputs a step reached
        self.t_end = float(ts[-1])

    def col(self, x: Tensor) -> Tensor:
        return x.to(self.dtype).view(self.shape)

    def step(self, f, t: Tensor, h: Tensor, y: Tensor, k1):
        """One step of every sample from `(t, y)` by `h` (float64 `[B]`; 0: stays): `(y1, ks, error, error_low)`."""
        tab, rows = self.solver.tableau, self.tab.rows
        hc = (self.coefs * h).to(self.dtype).view(-1, *self.shape).unbind(0)  # one view per coefficient
        times = (t + self.c * h).to(self.dtype).view(-1, *self.shape).unbind(0)
        ks = [k1 if k1 is not None else f(times[0], y)]
        yi = y
        for i in range(1, tab.stages):
            yi = _combine(y, hc, rows[i], ks)
            ks.append(f(times[i], yi))
        y1 = yi if tab.fsal else _combine(y, hc, self.tab.b, ks)
        error = _lincomb(hc, self.tab.err, ks)
        low = _lincomb(hc, self.tab.err_low, ks) if self.tab.err_low else None
        return y1, ks, error, low

    def dense(self, y: Tensor, h: Tensor, ks: List[Tensor], theta: Tensor) -> Tensor:
        """The dense output at `t + θh` of each sample's step (`θ`, `h`: float64 `[B]`)."""
        out = y
        for i, row in enumerate(self.solver.tableau.dense):
            if any(row):
                w = sum(coef * theta.pow(j + 1) for j, coef in enumerate(row))
                out = torch.addcmul(out, ks[i], self.col(h * w))
        return out


def _ratios(y: Tensor, y1: Tensor, error: Tensor, low, rtol: float, atol: float, norm) -> Tensor:
    """Each sample's scaled error norm (float64 `[B]`), as `_error_ratio` computes one."""
    with torch.no_grad():
        scale = torch.maximum(y.abs(), y1.abs()).mul_(rtol).add_(atol)
        a = norm(error.div_(scale)).double()
        if low is None:
            return a
        b = norm(low.div_(scale)).double()
        deno = a * a + 0.01 * b * b
        return torch.where(deno > 0, a * a / deno.sqrt(), 0.0)


def _first_steps(bt: _Batch, f, t0: float, y0: Tensor, k0: Tensor, control: Adaptive, norm, span: float):
    """Each sample's first step size (`_initial_step`, vectorised; one evaluation of `f`, none
    with `first_step`) and whether its `y0` and `f(t0, y0)` are finite."""
    n = y0.shape[0]
    finite = torch.isfinite(y0).reshape(n, -1).all(1) & torch.isfinite(k0).reshape(n, -1).all(1)
    if control.first_step is not None:
        return torch.full((y0.shape[0],), control.first_step, dtype=bt.tdtype, device=bt.device), finite
    order, rtol, atol = bt.solver.tableau.order, control.rtol, control.atol
    with torch.no_grad():
        scale = y0.abs().mul_(rtol).add_(atol)
        d0, d1 = norm(y0 / scale).double(), norm(k0 / scale).double()
        h0 = torch.where((d0 >= 1e-5) & (d1 >= 1e-5), 0.01 * d0 / d1, 1e-6)
        h0 = torch.where((h0 > 0) & (h0 < math.inf), h0, 1e-6).clamp(max=span)
        y1 = torch.addcmul(y0, k0, bt.col(bt.direction * h0))
        k1 = f((t0 + bt.direction * h0).to(bt.dtype).view(bt.shape), y1)
        d2 = norm((k1 - k0) / scale).double() / h0
        dm = torch.maximum(d1, d2)
        h1 = torch.where(dm <= 1e-15, (h0 * 1e-3).clamp(min=1e-6), (0.01 / dm).pow(1.0 / (order + 1)))
        h = torch.minimum(100 * h0, h1).clamp(max=span)
    return torch.where(torch.isfinite(h) & (h > 0), h, span), finite


class _Step(NamedTuple):
    """One attempted step of the batch: from `(t, y)` with first stage `k1` by `h` to `(t_new, y1)`;
    each sample's next output index before it (`nxt`), the outputs it reached (`count`), and
    whether it was accepted and its error finite."""

    y: Tensor
    t: Tensor
    h: Tensor
    k1: Optional[Tensor]
    ks: List[Tensor]
    y1: Tensor
    t_new: Tensor
    nxt: Tensor
    count: Tensor
    accepted: Tensor
    finite: Tensor


class _State:
    """The per-sample state of the loop (`[B]` tensors besides `y` and `k1`)."""

    def __init__(self, bt: _Batch, t0: float, y0: Tensor, k1: Tensor, h: Tensor, finite: Tensor):
        n = y0.shape[0]
        self.y, self.k1 = y0, k1
        self.t = torch.full((n,), t0, dtype=bt.tdtype, device=bt.device)
        self.h = bt.direction * h
        self.prev = torch.ones_like(self.t)  # the last accepted step's error ratio
        zeros = torch.zeros(n, dtype=torch.long, device=bt.device)
        self.nxt, self.steps, self.accepted, self.rejected = zeros + 1, zeros, zeros, zeros
        self.code = torch.where(finite, _RUNNING, _NONFINITE).to(torch.long)


def _advance(bt: _Batch, s: _State, f, control: Adaptive, norm, limit: int, n_out: int) -> _Step:
    """One attempted step of every running sample; updates `s` and returns the step."""
    ctrl = control.controller or _DEFAULT_CONTROLLER
    running = s.code == _RUNNING
    over = (s.t + s.h - bt.t_end) * bt.direction >= 0
    h = torch.where(over, bt.t_end - s.t, s.h).mul_(running)  # a sample that does not run stays (h = 0)
    t_new = torch.where(over, bt.t_end, s.t + h)
    y1, ks, error, low = bt.step(f, s.t, h, s.y, s.k1)
    ratio = _ratios(s.y, y1, error, low, control.rtol, control.atol, norm)
    if ctrl.error_per_unit_step:
        ratio = ratio / torch.where(running, h.abs(), 1.0)
    finite = torch.isfinite(ratio)
    accepted = (ratio <= 1.0) & running
    k = ctrl.exponent_order(bt.solver.tableau.error_order)
    factor = torch.where(finite, ctrl.factors(torch.where(finite, ratio, 1.0), s.prev, accepted, k), ctrl.dfactor)
    count = torch.where(accepted, torch.searchsorted(bt.keys, t_new * bt.direction, right=True) - s.nxt, 0)
    out = _Step(s.y, s.t, h, s.k1, ks, y1, t_new, s.nxt, count, accepted, finite)
    keep = accepted.view(bt.shape)
    s.y = torch.where(keep, y1, s.y)
    # An FSAL method's last stage is f at the new state; others evaluate it afresh every step.
    s.k1 = torch.where(keep, ks[-1], s.k1) if bt.solver.tableau.fsal else None
    s.t = torch.where(accepted, t_new, s.t)
    s.prev = torch.where(accepted, ratio.clamp(min=1e-10), s.prev)
    s.nxt, s.h = s.nxt + count, h * factor
    s.steps, s.accepted, s.rejected = s.steps + running, s.accepted + accepted, s.rejected + (running ^ accepted)
    # As `_adaptive_loop`: fail rather than spin once a shrinking step falls below `min_step` or too small to move t.
    small = s.t + s.h == s.t
    if control.min_step:
        small |= s.h.abs() < control.min_step
    done = s.nxt == n_out
    under = small & (factor < 1.0).logical_or_(~accepted) & running & ~done
    code = torch.where(under, torch.where(finite, _UNDERFLOW, _NONFINITE), s.code).masked_fill_(running & done, _DONE)
    s.code = code.masked_fill_((code == _RUNNING) & (s.steps >= limit), _MAX)
    return out


def _redo(bt: _Batch, s: _State, f, st: _Step) -> _Step:
    """The step again with `h = 0` for the samples whose error was not finite: their NaN or inf
    stages would make the gradients NaN (0·inf) through the masks, though they were rejected.
    The other samples get the same values; only under autograd, after a non-finite trial."""
    h = torch.where(st.finite, st.h, 0.0)
    y1, ks, _, _ = bt.step(f, st.t, h, st.y, st.k1)
    keep = st.accepted.view(bt.shape)
    s.y = torch.where(keep, y1, st.y)
    s.k1 = torch.where(keep, ks[-1], st.k1) if bt.solver.tableau.fsal else None
    return st._replace(h=h, ks=ks, y1=y1)


def _emit(bt: _Batch, values: List[Tensor], src: Tensor, step: _Step, n: int, dense: bool) -> None:
    """Store the outputs each sample reached in its step: the `n` slots after its next output
    index `nxt`; an output at the step's end is its end state, others the dense output."""
    if not n:
        return
    y, t, h, ks, y1, t_new, nxt, count = step.y, step.t, step.h, step.ks, step.y1, step.t_new, step.nxt, step.count
    n_out = bt.ts.shape[0]
    h_safe = torch.where(h == 0, 1.0, h)
    for k in range(n):
        valid = count > k
        idx = (nxt + k).clamp(max=n_out - 1)
        tj = bt.ts[idx]
        end = tj == t_new
        value = y1
        if dense:
            theta = torch.where(valid & ~end, (tj - t) / h_safe, 1.0)
            value = torch.where(end.view(bt.shape), y1, bt.dense(y, h, ks, theta))
        row = idx.unsqueeze(0)  # gather and scatter: no host synchronisation on any device
        src.scatter_(0, row, torch.where(valid, len(values), src.gather(0, row).squeeze(0)).unsqueeze(0))
        values.append(value)


def _refuse(solver: ExplicitRK, y0: Tensor, record: bool, event) -> None:
    """What per-sample control cannot run, with what to use instead."""
    why = None
    if not solver.adaptive or type(solver).step is not ExplicitRK.step:
        why = f"needs an adaptive solver that takes odenet's generic step, got {solver!r}"
    elif record:
        why = "cannot record shared steps for gradient='checkpoint'; use gradient='direct' or 'adjoint'"
    elif event is not None:
        why = "cannot search for events (a shared stopping time); solve the samples one by one"
    elif y0.dim() == 0:
        why = "needs a state with a leading batch axis, got a 0-dim one"
    if why:
        raise ValueError(f"Adaptive(per_sample=True) {why} (or per_sample=False).")


def integrate_per_sample(f, y0: Tensor, ts: Sequence[float], solver: ExplicitRK, control: Adaptive, *,
                         stats: SolveStats, norm=None, record: bool = False, event=None) -> BatchResult:
    """`integrate` with per-sample error control (`Adaptive(per_sample=True)`): the leading axis
    of `y0` is a batch of independent problems, each stepped under its own error control (see
    the module). `norm`: the norm of one sample's scaled error (default: `control.norm`).
    `stats` gets the batch's evaluations and each sample's accepted and rejected steps. Raises
    `ValueError` for `record`, an `event`, a fixed-step solver or a 0-dim state."""
    _refuse(solver, y0, record, event)
    bt = _Batch(solver, y0, ts)
    n_out, n = len(ts), y0.shape[0]
    if n == 0:
        stats.n_accepted_per_sample, stats.n_rejected_per_sample = [], []
        return BatchResult([y0] * n_out, Status.SUCCESS, ts[-1], 0.0, None, [])
    norm = sample_norm(norm or control.norm)
    span = abs(ts[-1] - ts[0])
    limit = control.step_limit(span, solver.tableau.error_order)
    t0 = bt.col(torch.full((n,), ts[0], dtype=bt.tdtype, device=bt.device))
    k1 = f(t0, y0)
    h, finite = _first_steps(bt, f, ts[0], y0, k1, control, norm, span)
    s = _State(bt, ts[0], y0, k1, h, finite)
    values, src = [y0], torch.full((n_out, n), -1, dtype=torch.long, device=bt.device)
    src[0] = 0
    running, all_finite = torch.stack([(s.code == _RUNNING).any(), finite.all()]).tolist()
    grad = torch.is_grad_enabled()
    if grad and not all_finite:
        # A sample that starts non-finite stays where it is, but through the masks its NaN would
        # reach the others' gradients (0·NaN): the loop starts it from zeros instead.
        s.y = torch.where(finite.view(bt.shape), y0, 0.0)
        s.k1 = f(t0, s.y)
    while running:
        st = _advance(bt, s, f, control, norm, limit, n_out)
        # Dense output is needed when a sample's first output in the step lies strictly inside it.
        interior = (st.count > 0) & (bt.ts[st.nxt.clamp(max=n_out - 1)] != st.t_new)
        read = [(s.code == _RUNNING).any(), st.count.max(), interior.any(), (~st.finite & (st.h != 0)).any()]
        running, most, dense, bad = torch.stack(read).tolist()  # the one host read of an iteration
        if bad and grad:
            st = _redo(bt, s, f, st)
        _emit(bt, values, src, st, most, bool(dense))
    return _finish(bt, s, values, src, stats, limit)


def _finish(bt: _Batch, s: _State, values: List[Tensor], src: Tensor, stats: SolveStats, limit: int) -> BatchResult:
    """The outputs (NaN where a failed sample did not reach), the statistics and the status."""
    codes, accepted, rejected = torch.stack([s.code, s.accepted, s.rejected]).tolist()
    failed = [(i, _FAILURES[c]) for i, c in enumerate(codes) if c != _DONE]
    if failed:
        values.append(torch.full_like(values[0], float("nan")))
        src = torch.where(src < 0, len(values) - 1, src)
    ys = torch.stack(values)[src, torch.arange(src.shape[1], device=src.device)]  # output i of sample b: src[i, b]
    stats.n_accepted += sum(accepted)
    stats.n_rejected += sum(rejected)
    stats.n_accepted_per_sample, stats.n_rejected_per_sample = accepted, rejected
    status, t, h = Status.SUCCESS, float(bt.ts[-1]), float("nan")
    if failed:
        i = failed[0][0]
        status, t, h = failed[0][1], float(s.t[i]), float(s.h[i])
    res = BatchResult(list(ys.unbind(0)), status, t, h, None, [], limit)
    res.failed = failed
    return res
