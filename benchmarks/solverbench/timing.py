"""Cases (one table row each), their timed rounds, and the instrumented run that counts what a case costs."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from odenet import measure

from .adapters import BUILDERS, Counts, SolveFn, build_cuda_graph
from .config import Config, Size
from .problems import FProbe, Problem, sync


@dataclass
class Case:
    """One row of a table: a library running one solver with one gradient method."""

    mode: str
    size: Size
    solver: str
    library: str  # odenet, torchdiffeq, torchode, hand, odenet+cudagraph
    gradient: Optional[str]  # None: forward without grad
    steps: Optional[int] = None  # fixed steps (None: adaptive)
    seminorm: bool = False
    train: bool = False
    unit: Optional[Callable[[], Any]] = None  # the timed unit of work
    instrumented: Optional[SolveFn] = None  # a solve with exact counting
    times: List[float] = field(default_factory=list)  # per-run time of each timed sample
    inner: int = 1  # back-to-back runs per timed sample (see time_cases)
    error: Optional[str] = None
    record: Dict[str, Any] = field(default_factory=dict)


def zero_grads(tensors: Sequence[Tensor]) -> None:
    """Drop the `.grad` of each tensor."""
    for p in tensors:
        p.grad = None


def make_unit(solve: SolveFn, prob: Problem, train: bool) -> Callable[[], Any]:
    """The timed unit of work: a solve without grad, or a training step (solve, loss, backward)."""
    params = prob.params
    if not train:
        y0 = prob.y0

        def unit():
            with torch.no_grad():
                return solve(y0)[0]

        return unit
    y0t = prob.train_y0()

    def unit():
        zero_grads(params)
        y0t.grad = None
        y, _ = solve(y0t)
        prob.loss(y).backward()
        return y

    return unit


def build_case(case: Case, prob: Problem, cfg: Config) -> None:
    """Build the case's timed unit and instrumented solve; a failure is recorded in `case.error`."""
    try:
        if case.library == "odenet+cudagraph":
            solve = build_cuda_graph(prob, case.solver, case.steps, cfg)
            case.instrumented = solve
        else:
            builder = BUILDERS[case.library]
            grad = case.gradient or "direct"
            solve = builder(prob, case.solver, grad, case.steps, cfg, seminorm=case.seminorm)
            case.instrumented = builder(prob, case.solver, grad, case.steps, cfg, seminorm=case.seminorm, instrumented=True)
        case.unit = make_unit(solve, prob, case.train)
    except Exception as err:  # a library that cannot run this case is reported, not fatal
        case.error = err_text(err)


def err_text(err: BaseException) -> str:
    """One line (at most 500 characters) naming the exception."""
    return f"{type(err).__name__}: {err}".strip()[:500]


def time_cases(cases: List[Case], cfg: Config, probe: Optional[FProbe] = None) -> None:
    """Warm up every case, then `repeats` rounds, each case once per round in a seeded shuffled order,
    with `probe` (if given) timing f alone once per round, shuffled in with the cases."""
    # A timed sample of a case is one untimed run, then `inner` back-to-back runs (as many as
    # fill about 5 ms, at most 50), recorded as the time per run. Like the probe's samples of
    # f, it so measures a warm solve: a run right after another library's work or the probe
    # starts cold, by an amount that depends on what ran before (`docs/benchmarks.md` tells
    # how a fixed rotation once charged odenet for the probe). The shuffle spreads what is
    # left over every case. Python's garbage collector is off during the timed rounds.
    kinds = ("f", "fb") if any(c.train for c in cases) else ("f",)
    live = [c for c in cases if c.error is None]
    # As timeit does: collect before the warm-up, then no garbage collection while timing. A
    # full collection clears CPython's free lists (floats, tuples, frames), and the solves right
    # after it pay for refilling them: up to 0.6 ms on the first small odenet solve and 0.2 ms
    # on the hand-written loop. A collection per round (as this script used to do) so charged
    # each library by how many Python objects it makes, not by its steady-state cost.
    gc.collect()
    for c in live:
        try:
            for _ in range(cfg.warmup):
                c.unit()
            sync(cfg.device)
            s = time.perf_counter()
            c.unit()
            sync(cfg.device)
            c.inner = int(min(max(math.ceil(0.005 / max(time.perf_counter() - s, 1e-7)), 1), 50))
        except Exception as err:
            c.error = err_text(err)
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
    timed_rounds([c for c in live if c.error is None], cfg, kinds, probe)


def timed_rounds(live: List[Case], cfg: Config, kinds: Sequence[str], probe: Optional[FProbe]) -> None:
    """`cfg.repeats` shuffled rounds of timed samples, with the garbage collector off (collect
    before calling, as `time_cases` does before its warm-up)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _rounds(live, cfg, kinds, probe)
    finally:
        if gc_was_enabled:
            gc.enable()


def _rounds(live: List[Case], cfg: Config, kinds: Sequence[str], probe: Optional[FProbe]) -> None:
    """The rounds themselves: each case one untimed run, then `inner` timed ones; the probe samples f."""
    order = random.Random(cfg.seed)
    for _ in range(cfg.repeats):
        items: List[Any] = list(live) + ([probe] if probe is not None else [])
        order.shuffle(items)
        for c in items:
            if c is probe:
                probe.sample(kinds)
                continue
            if c.error is not None:
                continue
            try:
                c.unit()  # untimed: the timed runs follow this case, not whatever ran before
                sync(cfg.device)
                s = time.perf_counter()
                for _ in range(c.inner):
                    c.unit()
                sync(cfg.device)
                c.times.append((time.perf_counter() - s) / c.inner)
            except Exception as err:
                c.error = err_text(err)


def instrumented_run(case: Case, prob: Problem, cfg: Config) -> Dict[str, Any]:
    """One run with exact counting: NFE, steps, host reads, saved bytes, CUDA peak, final state, gradients."""
    out: Dict[str, Any] = {}
    solve = case.instrumented
    params = prob.params
    # Host reads of the whole run, backward included; not with --compile, like the per-step
    # slopes (`modes._reads_slope`): the counts were checked with eager `f` only.
    counting = measure.host_reads if not cfg.compile else contextlib.nullcontext
    if not case.train:
        with torch.no_grad(), counting() as reads:
            y, counts = solve(prob.y0)
        sync(cfg.device)
        out["host_reads"] = reads.count if reads is not None else None
        out["counts"] = counts()
        out["y"] = y.detach()
        return out
    y0t = prob.train_y0()
    zero_grads(params)
    with counting() as reads:
        with measure.saved_tensors(exclude=params) as saved:
            y, counts = solve(y0t)
        prob.loss(y).backward()  # outside the saved-tensor count: an adjoint's backward saves too
    sync(cfg.device)
    out["host_reads"] = reads.count if reads is not None else None
    out["saved_bytes"] = saved.bytes
    out["counts"] = counts()
    out["y"] = y.detach()
    out["grad"] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).detach()
    zero_grads(params)
    if torch.device(cfg.device).type == "cuda":
        out["cuda_peak_bytes"] = measure.cuda_peak_memory(case.unit, device=cfg.device)
    return out


def _rel(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[float]:
    """Relative difference ``|a - b| / |b|`` in float64 (None when either is missing or shapes differ)."""
    if a is None or b is None or a.shape != b.shape:
        return None
    denom = float(b.double().norm())
    return float((a.double() - b.double()).norm()) / (denom if denom > 0 else 1.0)


def finish_cases(cases: List[Case], prob: Problem, cfg: Config, reference: str = "odenet",
                 probe: Optional[FProbe] = None) -> None:
    """Instrumented runs, then the record of every case with overheads and ratios; `t_f` and `t_fb` come
    from `probe` (timed interleaved with these cases) when it has samples, else from the per-size figures."""
    t_f, t_fb = prob.t_f, prob.t_fb
    if probe is not None and probe.samples["f"]:
        t_f = probe.median("f")
    if probe is not None and probe.samples["fb"]:
        t_fb = probe.median("fb")
    extras: Dict[int, Dict[str, Any]] = {}
    for c in cases:
        if c.error is None:
            try:
                extras[id(c)] = instrumented_run(c, prob, cfg)
            except Exception as err:
                c.error = err_text(err)
    ref = next((c for c in cases if c.library == reference and id(c) in extras), None)
    ref_x = extras.get(id(ref), {}) if ref is not None else {}
    medians = {c.library: statistics.median(c.times) for c in cases if c.times and c.error is None}
    for c in cases:
        x = extras.get(id(c), {})
        cnt: Counts = x.get("counts", Counts())
        med = statistics.median(c.times) if c.times and c.error is None else None
        rec: Dict[str, Any] = dict(
            mode=c.mode, size=c.size.name, size_label=c.size.label, solver=c.solver, library=c.library,
            gradient=c.gradient, steps=c.steps, seminorm=c.seminorm, train=c.train, t_end=prob.ts[-1],
            **{k: v for k, v in asdict(cnt).items()},
            time_s=med, times_s=list(c.times), t_f_s=t_f, t_fb_s=t_fb,
            floor_s=None, overhead=None, ratio_to={}, host_reads=x.get("host_reads"),
            host_reads_per_step=None, saved_bytes=x.get("saved_bytes"), cuda_peak_bytes=x.get("cuda_peak_bytes"),
            y_rel_diff_vs_ref=None, grad_rel_diff_vs_ref=None, reference=reference, error=c.error,
        )
        if med is not None and cnt.nfe_forward is not None:
            if c.train:
                graph = cnt.nfe_forward_graph or 0
                floor = (cnt.nfe_forward - graph) * t_f + (graph + (cnt.nfe_backward or 0)) * t_fb
            else:
                floor = cnt.nfe_forward * t_f
            if floor > 0:
                rec["floor_s"] = floor
                rec["overhead"] = med / floor
        if med is not None:
            rec["ratio_to"] = {lib: med / m for lib, m in medians.items() if lib != c.library and m > 0}
        steps_total = (cnt.n_accepted or 0) + (cnt.n_rejected or 0)
        if rec["host_reads"] is not None and steps_total:
            rec["host_reads_per_step"] = rec["host_reads"] / steps_total
        if c is not ref and ref is not None and x:
            rec["y_rel_diff_vs_ref"] = _rel(x.get("y"), ref_x.get("y"))
            rec["grad_rel_diff_vs_ref"] = _rel(x.get("grad"), ref_x.get("grad"))
        c.record = rec
