"""The benchmark's modes: forward, train-*, fixed, memory and seminorm, each a list of case groups."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional

import torch

from odenet import measure

from .adapters import BUILDERS, gradient_for, supports
from .config import GRADIENTS, Config, asdict_shallow
from .problems import Problem, with_t_end
from .timing import Case, build_case, err_text, finish_cases, time_cases, zero_grads


def _libs_for(cfg: Config, solver: str) -> List[str]:
    """The configured libraries that have `solver`."""
    return [lib for lib in cfg.libraries if supports(lib, solver)]


def run_group(cases: List[Case], prob: Problem, cfg: Config, reference: str = "odenet") -> List[Dict[str, Any]]:
    """Build, time (with a fresh probe of f) and record one group of cases compared with each other."""
    for c in cases:
        build_case(c, prob, cfg)
    probe = prob.probe.fresh() if prob.probe is not None else None
    time_cases(cases, cfg, probe)
    finish_cases(cases, prob, cfg, reference, probe)
    return [c.record for c in cases]


def mode_forward(prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    """Adaptive solves without grad, one group per solver, with host reads per step."""
    rows = []
    for solver in cfg.solvers:
        cases = [Case("forward", prob.size, solver, lib, None) for lib in _libs_for(cfg, solver)]
        rows += run_group(cases, prob, cfg)
        for c in cases:
            if c.error is None:
                try:
                    c.record["host_reads_per_step"] = _reads_slope(c, prob, cfg)
                except Exception as err:  # counting is a diagnostic; keep the timings
                    c.record["host_reads_per_step"] = None
                    c.record["note"] = f"host-read slope failed: {err_text(err)}"
        log(rows[-len(cases):])
    return rows


def mode_train(prob: Problem, cfg: Config, gradient: str, log) -> List[Dict[str, Any]]:
    """One training step with `gradient` (peers without checkpointing run direct), one group per solver."""
    rows = []
    for solver in cfg.solvers:
        cases = [
            Case(f"train-{gradient}", prob.size, solver, lib, gradient_for(lib, gradient), train=True)
            for lib in _libs_for(cfg, solver)
        ]
        rows += run_group(cases, prob, cfg)
        log(rows[-len(cases):])
    return rows


def mode_fixed(prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    """Fixed-step solvers against the hand-written loop, forward and training (CUDA: plus a CUDA graph)."""
    rows = []
    n = cfg.fixed_steps
    cuda = torch.device(cfg.device).type == "cuda"
    for solver in cfg.fixed_solvers:
        libs = _libs_for(cfg, solver) + (["hand"] if supports("hand", solver) else [])
        for train in (False, True):
            cases = [Case("fixed", prob.size, solver, lib, "direct" if train else None, steps=n, train=train) for lib in libs]
            if cuda and not train and "odenet" in libs:
                cases.append(Case("fixed", prob.size, solver, "odenet+cudagraph", None, steps=n))
            ref = "hand" if "hand" in libs else "odenet"
            group = run_group(cases, prob, cfg, reference=ref)
            # host reads per step from the slope between N and 2N steps (constant per-solve reads drop out)
            for c in cases:
                if c.error is None and c.library in BUILDERS:
                    try:
                        c.record["host_reads_per_step"] = _reads_slope(c, prob, cfg)
                    except Exception as err:
                        c.record["host_reads_per_step"] = None
                        c.record["note"] = f"host-read slope failed: {err_text(err)}"
            rows += group
            log(group)
    return rows


def _reads_slope(case: Case, prob: Problem, cfg: Config) -> Optional[float]:
    """Host reads per step: the slope between two solves that differ only in their number of steps (N and 2N
    fixed steps, or adaptive over [0, T] and [0, 2T]), so reads made once per solve drop out."""
    if cfg.compile:
        return None
    points = []
    for k in (1, 2):
        if case.steps is not None:
            p, steps = prob, k * case.steps
        else:
            ts = [prob.ts[0], prob.ts[-1] * k]
            p, steps = replace(prob, ts=ts, t=torch.tensor(ts, dtype=prob.y0.dtype, device=prob.y0.device)), None
        solve = BUILDERS[case.library](p, case.solver, case.gradient or "direct", steps, cfg, instrumented=True)
        y0 = p.train_y0() if case.train else p.y0
        with torch.set_grad_enabled(case.train), measure.host_reads() as reads:
            y, counts = solve(y0)
            if case.train:
                p.loss(y).backward()
        zero_grads(prob.params)
        c = counts()
        points.append((reads.count, (c.n_accepted or 0) + (c.n_rejected or 0)))
    (r1, s1), (r2, s2) = points
    return (r2 - r1) / (s2 - s1) if s2 != s1 else None


def mode_memory(prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    """Saved bytes (and CUDA peak) against the number of fixed steps; one timed train step each."""
    rows = []
    solver = cfg.memory_solver
    for steps in cfg.memory_steps:
        cases = []
        for lib in ("odenet", "torchdiffeq"):
            if lib not in cfg.libraries or not supports(lib, solver):
                continue
            for gradient in GRADIENTS:
                if gradient == "checkpoint" and lib != "odenet":
                    continue
                cases.append(Case("memory", prob.size, solver, lib, gradient, steps=steps, train=True))
        for c in cases:
            build_case(c, prob, cfg)
        sub = Config(**{**asdict_shallow(cfg), "repeats": min(cfg.repeats, 3)})
        time_cases(cases, sub)
        for c in cases:  # no cross-library ratios here: rows differ by gradient method
            finish_cases([c], prob, cfg, reference=c.library)
        group = [c.record for c in cases]
        rows += group
        log(group)
    return rows


def mode_seminorm(prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    """Adjoint backward NFE with and without the seminorm, at each configured horizon."""
    rows = []
    for t_end in cfg.seminorm_t_ends:
        rows += _seminorm_at(with_t_end(prob, t_end) if t_end != prob.ts[-1] else prob, cfg, log)
    return rows


def _seminorm_at(prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    """The seminorm groups of one horizon: full norm and seminorm per library and solver."""
    rows = []
    for solver in cfg.solvers:
        cases = []
        for lib in ("odenet", "torchdiffeq"):
            if lib in cfg.libraries and supports(lib, solver):
                for semi in (False, True):
                    cases.append(Case("seminorm", prob.size, solver, lib, "adjoint", seminorm=semi, train=True))
        for c in cases:
            build_case(c, prob, cfg)
        probe = prob.probe.fresh() if prob.probe is not None else None
        # backward NFE is the point here; a few repeats give the time ratio
        time_cases(cases, Config(**{**asdict_shallow(cfg), "repeats": min(cfg.repeats, 3)}), probe)
        for lib in ("odenet", "torchdiffeq"):
            pair = [c for c in cases if c.library == lib]
            if not pair:
                continue
            finish_cases(pair, prob, cfg, reference=lib, probe=probe)
            full, semi = pair[0].record, pair[1].record
            for r in (full, semi):
                r["ratio_to"] = {}
            if full.get("nfe_backward") and semi.get("nfe_backward") is not None:
                semi["nfe_backward_reduction"] = 1.0 - semi["nfe_backward"] / full["nfe_backward"]
                if full.get("time_s") and semi.get("time_s"):
                    semi["time_ratio_vs_full_norm"] = semi["time_s"] / full["time_s"]
        group = [c.record for c in cases]
        rows += group
        log(group)
    return rows
