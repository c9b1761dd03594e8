"""The command line of `bench_solvers.py`: flags into a `Config`, then the run over sizes and modes, written
as `<out>.json` and `<out>.md`."""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .config import (ADAPTIVE, DEFAULT_OUT, FIXED, LIBRARIES, MODES, SIZE_PRESETS, Config, Size, asdict_shallow,
                     parse_size)
from .environment import environment, keep_freed_memory
from .modes import mode_fixed, mode_forward, mode_memory, mode_seminorm, mode_train
from .problems import FProbe, Problem, make_problem
from .report import _fmt_time, log_rows, render_markdown, summarize


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None/False or the help text already names it."""

    def _get_help_string(self, action):
        """The help text, with "(default: X)" added where it says nothing of the default."""
        h = action.help or ""
        if action.default in (None, False) or "default" in h:
            return h
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `bench_solvers.py`."""
    p = argparse.ArgumentParser(
        prog="bench_solvers.py",
        description="Benchmark odenet against torchdiffeq and torchode on the same f, tolerances and device "
        "(interleaved repeats, medians). Writes <out>.json and <out>.md.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--sizes", default=None,
                   help="comma-separated problem sizes: presets " + ", ".join(f"{k}={v.label}" for k, v in SIZE_PRESETS.items())
                   + ", or mlp:BATCHxDIMxHIDDEN / conv:BATCHxCxHxW[xHIDDEN] (default: small,medium,large,conv; --quick: tiny)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated modes out of {', '.join(MODES)}")
    p.add_argument("--solvers", default=None,
                   help=f"adaptive solvers for forward/train/seminorm, out of {', '.join(ADAPTIVE)} (default: all; --quick: dopri5)")
    p.add_argument("--fixed-solvers", default="euler,rk4", help=f"fixed-step solvers for --modes fixed, out of {', '.join(FIXED)}")
    p.add_argument("--libraries", default=",".join(LIBRARIES), help="libraries to compare (odenet is the reference)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case; the median is reported (default 7; --quick: 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case before timing")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (intra-op threads)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="dtype of state and weights")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of adaptive solvers (all libraries)")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance of adaptive solvers (all libraries)")
    p.add_argument("--t-end", type=float, default=1.0, help="integrate over [0, T]")
    p.add_argument("--fixed-steps", type=int, default=None, help="N steps of the fixed mode (default 20; --quick: 4)")
    p.add_argument("--memory-steps", default=None, help="comma-separated step counts of the memory mode (default 10,100,1000; --quick: 4,8)")
    p.add_argument("--memory-sizes", default=None, help="sizes of the memory mode (default medium; --quick: tiny)")
    p.add_argument("--memory-solver", default="rk4", help="fixed-step solver of the memory mode")
    p.add_argument("--seminorm-t-ends", default=None,
                   help="comma-separated horizons T of the seminorm mode, each solved over [0, T] "
                   "(default: --t-end and 10x it; --quick: --t-end)")
    p.add_argument("--f-time", type=float, default=None, help="seconds spent timing one f call per size (default 1.0; --quick: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and initial state, and of the order of the timed runs")
    p.add_argument("--malloc-keep", action="store_true",
                   help="glibc only: mallopt(M_TRIM_THRESHOLD, M_MMAP_THRESHOLD) so freed memory is kept and reused; "
                   "without it, large states can page-fault on every allocation (erratic timings at the large sizes). "
                   "Applies to all libraries alike; recorded in the output")
    p.add_argument("--loss-scale", type=float, default=1.0,
                   help="multiply the training loss y(T).square().mean() by this factor (how large the gradients are "
                   "against atol decides whether the seminorm saves backward steps; see docs/benchmarks.md)")
    p.add_argument("--compile", action="store_true", help="run every library on torch.compile(f) (same compiled module for all)")
    p.add_argument("--out", default=None,
                   help="output prefix: writes OUT.json and OUT.md (default: benchmarks/results/bench_solvers)")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    p.add_argument("--quick", action="store_true", help="smoke configuration: tiny sizes, dopri5, few repeats and steps (seconds)")
    return p


def _out_paths(out: str) -> Tuple[Path, Path]:
    """`OUT.json` and `OUT.md` for the prefix `OUT` (dots in it are kept: `loss0.01` stays whole; a
    trailing `.json` or `.md` is dropped)."""
    for ext in (".json", ".md"):
        if out.endswith(ext):
            out = out[: -len(ext)]
    return Path(out + ".json"), Path(out + ".md")




def _split(s: str) -> List[str]:
    """The items of a comma-separated list, stripped, empty ones dropped."""
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[Config, List[str]]:
    """Parse the command line into a :class:`Config` (and the argv it came from)."""
    p = build_parser()
    a = p.parse_args(argv)
    q = a.quick
    try:
        sizes = [parse_size(s) for s in _split(a.sizes or ("tiny" if q else "small,medium,large,conv"))]
        memory_sizes = [parse_size(s) for s in _split(a.memory_sizes or ("tiny" if q else "medium"))]
    except ValueError as err:
        p.error(str(err))
    solvers = _split(a.solvers or ("dopri5" if q else ",".join(ADAPTIVE)))
    repeats = a.repeats if a.repeats is not None else (2 if q else 7)
    _validate(p, a, solvers, repeats)
    cfg = Config(
        sizes=sizes, modes=_split(a.modes), solvers=solvers, fixed_solvers=_split(a.fixed_solvers),
        libraries=_split(a.libraries), repeats=repeats, warmup=a.warmup, threads=a.threads, device=a.device,
        dtype=a.dtype, rtol=a.rtol, atol=a.atol, t_end=a.t_end,
        fixed_steps=a.fixed_steps if a.fixed_steps is not None else (4 if q else 20),
        memory_steps=[int(x) for x in _split(a.memory_steps or ("4,8" if q else "10,100,1000"))],
        memory_sizes=memory_sizes,
        memory_solver=a.memory_solver,
        seminorm_t_ends=[float(x) for x in _split(a.seminorm_t_ends)] if a.seminorm_t_ends
        else ([a.t_end] if q else [a.t_end, 10 * a.t_end]), f_time_s=a.f_time if a.f_time is not None else (0.05 if q else 1.0),
        seed=a.seed, compile=a.compile, malloc_keep=a.malloc_keep, loss_scale=a.loss_scale,
        out=None if a.no_write else (a.out or str(DEFAULT_OUT)), quick=q,
    )
    return cfg, list(argv if argv is not None else sys.argv[1:])


def _validate(p: argparse.ArgumentParser, a: argparse.Namespace, solvers: List[str], repeats: int) -> None:
    """Exit through `p.error` on the first flag that is out of range or unknown."""
    modes = _split(a.modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if any(s not in ADAPTIVE for s in solvers):
        p.error(f"--solvers takes adaptive solvers ({', '.join(ADAPTIVE)}), got {solvers}")
    fixed = _split(a.fixed_solvers)
    if any(s not in FIXED for s in fixed):
        p.error(f"--fixed-solvers takes fixed-step solvers ({', '.join(FIXED)}), got {fixed}")
    libs = _split(a.libraries)
    if any(x not in LIBRARIES for x in libs):
        p.error(f"--libraries takes {', '.join(LIBRARIES)}, got {libs}")
    if "odenet" not in libs:
        p.error("--libraries must include odenet (the reference)")
    if a.memory_solver not in FIXED:
        p.error(f"--memory-solver takes a fixed-step solver ({', '.join(FIXED)}), got {a.memory_solver!r}")
    if not (math.isfinite(a.loss_scale) and a.loss_scale > 0):
        p.error(f"--loss-scale must be a positive finite number, got {a.loss_scale}")
    if repeats < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device takes cpu or cuda[:N], got {a.device!r}")


def run(cfg: Config, argv: Sequence[str] = (), verbose: bool = True) -> Dict[str, Any]:
    """Run the benchmark described by `cfg`; returns (and writes) the result dict."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    if cfg.malloc_keep and not keep_freed_memory():
        print("warning: --malloc-keep had no effect (not glibc?)", file=sys.stderr)
    try:
        env = environment(cfg, argv)
        rows, sizes_info = _measure(cfg, verbose)
        cfg_dict = asdict_shallow(cfg)
        cfg_dict["sizes"] = [s.name for s in cfg.sizes]
        cfg_dict["memory_sizes"] = [s.name for s in cfg.memory_sizes]
        result = dict(environment=env, config=cfg_dict, sizes=sizes_info, results=rows, summary=summarize(rows, cfg))
        md = render_markdown(result)
        if cfg.out:
            json_path, md_path = _out_paths(cfg.out)
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=1, default=_json_default))
            md_path.write_text(md)
            result["files"] = [str(json_path), str(md_path)]
        if verbose:
            print()
            print(md)
            if cfg.out:
                print(f"wrote {json_path} and {md_path}")
        return result
    finally:
        torch.set_num_threads(old_threads)


def _measure(cfg: Config, verbose: bool) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """Every row of every mode, size by size (the memory mode last, over its own sizes), and `t_f` per size."""
    log = log_rows if verbose else (lambda rows: None)
    rows: List[Dict[str, Any]] = []
    sizes_info: Dict[str, Dict[str, Any]] = {}
    main_modes = [m for m in cfg.modes if m not in ("memory",)]
    if main_modes:
        for size in cfg.sizes:
            prob = _problem(size, cfg, sizes_info, verbose)
            for mode in main_modes:
                rows += _run_mode(mode, prob, cfg, log)
            del prob
            gc.collect()
    if "memory" in cfg.modes:
        for size in cfg.memory_sizes:
            prob = _problem(size, cfg, sizes_info, verbose) if size.name not in sizes_info else _reuse(size, cfg, sizes_info)
            rows += mode_memory(prob, cfg, log)
    return rows, sizes_info


def _run_mode(mode: str, prob: Problem, cfg: Config, log) -> List[Dict[str, Any]]:
    """The rows of one mode other than memory on one problem."""
    if mode == "forward":
        return mode_forward(prob, cfg, log)
    if mode.startswith("train-"):
        return mode_train(prob, cfg, mode[len("train-"):], log)
    if mode == "fixed":
        return mode_fixed(prob, cfg, log)
    if mode == "seminorm":
        return mode_seminorm(prob, cfg, log)
    return []


def _problem(size: Size, cfg: Config, sizes_info: Dict[str, Dict[str, Any]], verbose: bool) -> Problem:
    """The problem of `size` with its probe, `t_f` and `t_fb` timed for `--f-time` (recorded in `sizes_info`)."""
    prob = make_problem(size, cfg)
    prob.probe = FProbe(prob, cfg.device)
    whole = prob.probe.fresh()
    whole.sample_for(cfg.f_time_s)
    prob.t_f, prob.t_fb = whole.median("f"), whole.median("fb")
    sizes_info[size.name] = dict(kind=size.kind, shape=list(size.shape), hidden=size.hidden, label=size.label,
                                 t_f_s=prob.t_f, t_fb_s=prob.t_fb)
    if verbose:
        print(f"[{size.name}] {size.label}: t_f={_fmt_time(prob.t_f)} t_fb={_fmt_time(prob.t_fb)}", flush=True)
    return prob


def _reuse(size: Size, cfg: Config, info: Dict[str, Dict[str, Any]]) -> Problem:
    """The problem of a size measured before, with its `t_f` and `t_fb` from then."""
    prob = make_problem(size, cfg)
    prob.probe = FProbe(prob, cfg.device)
    prob.t_f, prob.t_fb = info[size.name]["t_f_s"], info[size.name]["t_fb_s"]
    return prob


def _json_default(o):
    """JSON for what `json` cannot write itself: sizes by name, tensors as lists, anything else as text."""
    if isinstance(o, Size):
        return o.name
    if isinstance(o, Tensor):
        return o.tolist()
    return str(o)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse the command line and run."""
    cfg, args = parse_args(argv)
    return run(cfg, args)
