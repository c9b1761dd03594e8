"""The report: the Markdown tables of a result, the summary of the issue's targets, and the progress log."""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional

from .config import GRADIENTS, Config

LIBS = ["odenet", "torchdiffeq", "torchode"]  # the ratio columns, in this order

# Issue 4 targets for the forward overhead of odenet (CPU, 1 thread).
OVERHEAD_TARGETS = {"small": 1.5, "medium": 1.25, "large": 1.1}
FIXED_TARGET = 1.1  # fixed-step euler within 1.1x of the hand-written residual loop


def _fmt_time(s: Optional[float]) -> str:
    """Seconds as µs, ms or s (— when missing)."""
    if s is None or not math.isfinite(s):
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt(x: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    """`x` formatted with `spec` and `suffix` (— when missing or not finite)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec) + suffix


def _mb(b: Optional[int]) -> str:
    """Bytes in MB (2**20), with enough digits for small values."""
    if b is None:
        return "—"
    mb = b / 2**20
    return f"{mb:.2f}" if mb >= 1 else f"{mb:.3g}"


def _steps(r: Dict[str, Any], backward: bool = False) -> str:
    """Accepted/rejected steps of the forward (or backward) solve."""
    a, j = (r.get("n_accepted_backward"), r.get("n_rejected_backward")) if backward else (r.get("n_accepted"), r.get("n_rejected"))
    return "—" if a is None else f"{a}/{j if j is not None else '—'}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    """A Markdown table's lines."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _ratio_cell(r: Dict[str, Any], lib: str) -> str:
    """This row's time over `lib`'s time in the same group (— for the row's own library)."""
    if r["library"] == lib:
        return "—"
    return _fmt(r.get("ratio_to", {}).get(lib), ".2f", "x")


def _lib_label(r: Dict[str, Any]) -> str:
    """The library, with the gradient method it ran where that differs from the mode, and ⚠ on failure."""
    lib = r["library"]
    if r.get("train") and r.get("mode", "").startswith("train-") and r.get("gradient") and r["mode"] != f"train-{r['gradient']}":
        lib += f" ({r['gradient']})"
    if r.get("error"):
        lib += " ⚠"
    return lib


def render_markdown(result: Dict[str, Any]) -> str:
    """The whole report: header, time of f, then one section per mode present, then the targets."""
    rows, cfg = result["results"], result["config"]
    L = _header(result) + _f_times(result["sizes"])
    L += _forward_section([r for r in rows if r["mode"] == "forward"])
    L += _train_section([r for r in rows if r["mode"].startswith("train-")])
    L += _fixed_section([r for r in rows if r["mode"] == "fixed"], cfg)
    L += _memory_section([r for r in rows if r["mode"] == "memory"], cfg)
    L += _seminorm_section([r for r in rows if r["mode"] == "seminorm"], result["summary"])
    L += _targets_section(result["summary"])
    L.append("")
    return "\n".join(L)


def _header(result: Dict[str, Any]) -> List[str]:
    """The title, the command, machine, versions and settings, and the definitions."""
    env, cfg = result["environment"], result["config"]
    return [
        "# odenet solver benchmark",
        "",
        f"- command: `{env['command']}`",
        f"- date: {env['date']}, git commit `{env.get('git_commit')}`",
        f"- CPU: {env['cpu_model']} ({env['cpu_count']} cores visible), torch threads: {env['threads']}",
        f"- device: {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else ""),
        f"- versions: torch {env['torch']}, odenet {env['odenet']}, torchdiffeq {env['torchdiffeq']}, torchode {env['torchode']}",
        f"- tolerance rtol={cfg['rtol']}, atol={cfg['atol']}, t in [0, {cfg['t_end']}], "
        f"dtype {cfg['dtype']}, repeats {cfg['repeats']} (median), compile={cfg['compile']}, "
        f"malloc-keep={cfg['malloc_keep']}" + (f", env {env['malloc_env']}" if env.get("malloc_env") else "")
        + (f", loss scale {cfg['loss_scale']:g}" if cfg.get("loss_scale", 1.0) != 1.0 else ""),
        "",
        "Overhead = median time / floor; forward floor = NFE x t_f, training floor = evals without graph x t_f "
        "+ evals backpropagated x t_fb. `xLIB` = this row's time / LIB's time in the same group (< 1: faster). "
        "⚠ = the case failed (see the JSON `error`).",
        "",
    ]


def _f_times(sizes: Dict[str, Dict[str, Any]]) -> List[str]:
    """The table of `t_f` and `t_fb` per size."""
    return ["## Time of one f", ""] + _table(
        ["size", "shape", "t_f (no grad)", "t_fb (f + VJP)"],
        [[n, s["label"], _fmt_time(s.get("t_f_s")), _fmt_time(s.get("t_fb_s"))] for n, s in sizes.items()],
    )


def _forward_section(fwd: List[Dict[str, Any]]) -> List[str]:
    """Forward solves: NFE, steps, time, overhead, host reads, ratios, difference to odenet."""
    if not fwd:
        return []
    L = ["", "## Forward solve (no grad)", "",
         "t_f: one f call timed interleaved with these solves. Host reads: values read from tensors into "
         "Python in one solve (each a host-device sync on CUDA); per step: the slope between solves over "
         "[0, T] and [0, 2T].", ""]
    return L + _table(
        ["size", "solver", "library", "NFE", "acc/rej", "time", "t_f", "overhead", "host reads (per step)",
         *[f"x{l}" for l in LIBS], "Δy vs odenet"],
        [
            [r["size"], r["solver"], _lib_label(r), _fmt(r["nfe_forward"], "d"), _steps(r), _fmt_time(r["time_s"]),
             _fmt_time(r["t_f_s"]), _fmt(r["overhead"], ".2f", "x"),
             f"{_fmt(r['host_reads'], 'd')} ({_fmt(r['host_reads_per_step'], '.2f')})", *[_ratio_cell(r, l) for l in LIBS],
             _fmt(r["y_rel_diff_vs_ref"], ".1e")]
            for r in fwd
        ],
    )


def _train_section(tr: List[Dict[str, Any]]) -> List[str]:
    """Training steps: NFE and steps both ways, time, overhead, saved and CUDA peak memory, ratios."""
    if not tr:
        return []
    L = ["", "## Training step (solve + backward)", "",
         "Peers without checkpointing run backprop through the solver in the train-checkpoint rows.", ""]
    return L + _table(
        ["mode", "size", "solver", "library", "NFE fwd/bwd", "acc/rej fwd", "acc/rej bwd", "time", "overhead",
         "saved MB", "CUDA peak MB", *[f"x{l}" for l in LIBS], "Δgrad vs odenet"],
        [
            [r["mode"], r["size"], r["solver"], _lib_label(r), f"{_fmt(r['nfe_forward'], 'd')}/{_fmt(r['nfe_backward'], 'd')}",
             _steps(r), _steps(r, True), _fmt_time(r["time_s"]), _fmt(r["overhead"], ".2f", "x"), _mb(r["saved_bytes"]),
             _mb(r["cuda_peak_bytes"]), *[_ratio_cell(r, l) for l in LIBS], _fmt(r["grad_rel_diff_vs_ref"], ".1e")]
            for r in tr
        ],
    )


def _fixed_section(fx: List[Dict[str, Any]], cfg: Dict[str, Any]) -> List[str]:
    """Fixed steps against the hand-written loop (and, on CUDA, the CUDA-graph replay)."""
    if not fx:
        return []
    L = ["", f"## Fixed step ({cfg['fixed_steps']} steps) against a hand-written residual loop", "",
         "`xhand` = time / hand-written loop's time. Host reads per step: slope between N and 2N steps "
         "(each is a host-device sync on CUDA).", ""]
    return L + _table(
        ["size", "solver", "phase", "library", "NFE", "time", "overhead", "xhand", *[f"x{l}" for l in LIBS],
         "host reads/step", "saved MB"],
        [
            [r["size"], r["solver"], "train" if r["train"] else "forward", _lib_label(r), _fmt(r["nfe_forward"], "d"),
             _fmt_time(r["time_s"]), _fmt(r["overhead"], ".2f", "x"), _ratio_cell(r, "hand"),
             *[_ratio_cell(r, l) for l in LIBS], _fmt(r["host_reads_per_step"], ".2f"), _mb(r["saved_bytes"])]
            for r in fx
        ],
    )


def _memory_section(mem: List[Dict[str, Any]], cfg: Dict[str, Any]) -> List[str]:
    """Saved bytes, CUDA peak and time against the number of steps, one line per library and gradient."""
    if not mem:
        return []
    L = ["", f"## Activation memory against steps ({cfg['memory_solver']}, fixed steps)", "",
         "Bytes saved for backward during the forward solve (saved_tensors_hooks, parameters excluded); "
         "CUDA peak = max allocated during one training step above the baseline.", ""]
    keys = sorted({(r["size"], r["library"], r["gradient"]) for r in mem},
                  key=lambda k: (k[0], LIBS.index(k[1]) if k[1] in LIBS else 9, GRADIENTS.index(k[2])))
    steps = sorted({r["steps"] for r in mem})
    cell = {(r["size"], r["library"], r["gradient"], r["steps"]): r for r in mem}
    body = []
    for key in keys:
        got = [cell.get((*key, s)) for s in steps]
        body.append([*key]
                    + ["—" if r is None else (("⚠ " if r["error"] else "") + _mb(r["saved_bytes"])) for r in got]
                    + ["—" if r is None else _mb(r["cuda_peak_bytes"]) for r in got]
                    + ["—" if r is None else _fmt_time(r["time_s"]) for r in got])
    return L + _table(["size", "library", "gradient", *[f"saved MB @{s}" for s in steps],
                       *[f"peak MB @{s}" for s in steps], *[f"time @{s}" for s in steps]], body)


def _seminorm_section(sn: List[Dict[str, Any]], summary: Dict[str, Any]) -> List[str]:
    """Adjoint backward NFE with and without the seminorm, and the median reduction per library."""
    if not sn:
        return []
    L = ["", "## Seminorm adjoint: backward evaluations", ""]
    L += _table(
        ["size", "T", "solver", "library", "seminorm", "NFE fwd/bwd", "acc/rej bwd", "time", "bwd NFE reduction", "time vs full norm"],
        [
            [r["size"], _fmt(r["t_end"], "g"), r["solver"], _lib_label(r), "yes" if r["seminorm"] else "no",
             f"{_fmt(r['nfe_forward'], 'd')}/{_fmt(r['nfe_backward'], 'd')}", _steps(r, True), _fmt_time(r["time_s"]),
             _fmt(100 * r["nfe_backward_reduction"] if r.get("nfe_backward_reduction") is not None else None, ".0f", "%"),
             _fmt(r.get("time_ratio_vs_full_norm"), ".2f", "x")]
            for r in sn
        ],
    )
    red = summary.get("seminorm_median_reduction", {})
    if red:
        L += ["", "Median backward-NFE reduction: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in red.items())
              + " (Kidger et al. 2021 report a median of 40%)."]
    return L


def _targets_section(summary: Dict[str, Any]) -> List[str]:
    """The issue's targets, each met or not."""
    tg = summary.get("targets", [])
    if not tg:
        return []
    return ["", "## Issue 4 targets", ""] + _table(
        ["target", "measured", "met"], [[t["target"], t["measured"], "yes" if t["met"] else "**no**"] for t in tg])


def summarize(rows: List[Dict[str, Any]], cfg: Config) -> Dict[str, Any]:
    """The issue's targets, met or not, and the median seminorm reduction per library."""
    targets = [t for r in rows for t in _targets_of(r, rows)]
    red: Dict[str, float] = {}
    for lib in ("odenet", "torchdiffeq"):
        vals = [r["nfe_backward_reduction"] for r in rows if r["mode"] == "seminorm" and r["library"] == lib
                and r.get("nfe_backward_reduction") is not None]
        if vals:
            red[lib] = statistics.median(vals)
    return dict(targets=targets, seminorm_median_reduction=red)


def _targets_of(r: Dict[str, Any], rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The targets that row `r` decides (odenet's rows only)."""
    if r["library"] != "odenet":
        return []
    if r["mode"] == "forward":
        return _forward_targets(r, rows)
    if r["mode"] in ("train-direct", "train-adjoint") and "torchdiffeq" in r["ratio_to"]:
        x = r["ratio_to"]["torchdiffeq"]
        return [dict(target=f"{r['mode']} {r['size']} {r['solver']} faster than torchdiffeq",
                     measured=f"{x:.2f}x torchdiffeq's time", met=x < 1.0)]
    if r["mode"] == "fixed":
        return _fixed_targets(r)
    return []


def _forward_targets(r: Dict[str, Any], rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Overhead under the size's limit and below each peer's; at most one host sync per step."""
    out = []
    if r["overhead"] is not None:
        lim = OVERHEAD_TARGETS.get(r["size"])
        if lim is not None:
            out.append(dict(target=f"forward overhead {r['size']} {r['solver']} <= {lim}x",
                            measured=f"{r['overhead']:.2f}x", met=r["overhead"] <= lim))
        peers = [p for p in rows if p["mode"] == "forward" and p["size"] == r["size"] and p["solver"] == r["solver"]
                 and p["library"] in ("torchdiffeq", "torchode") and p["overhead"] is not None]
        for p in peers:
            out.append(dict(target=f"forward overhead {r['size']} {r['solver']} below {p['library']}",
                            measured=f"{r['overhead']:.2f}x vs {p['overhead']:.2f}x", met=r["overhead"] < p["overhead"]))
    if r["host_reads_per_step"] is not None:
        out.append(dict(target=f"adaptive {r['solver']} {r['size']}: at most one host sync per step",
                        measured=f"{r['host_reads_per_step']:.2f} reads/step", met=r["host_reads_per_step"] <= 1.0))
    return out


def _fixed_targets(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Euler within `FIXED_TARGET` of the hand-written loop; no host sync per step."""
    out = []
    phase = "train" if r["train"] else "forward"
    if r["solver"] == "euler" and "hand" in r["ratio_to"]:
        x = r["ratio_to"]["hand"]
        out.append(dict(target=f"fixed euler {r['size']} {phase} within {FIXED_TARGET}x of the hand loop",
                        measured=f"{x:.2f}x", met=x <= FIXED_TARGET))
    if r["host_reads_per_step"] is not None:
        out.append(dict(target=f"fixed {r['solver']} {r['size']} {phase}: no host sync per step",
                        measured=f"{r['host_reads_per_step']:.2f} reads/step", met=r["host_reads_per_step"] == 0))
    return out


def log_rows(rows: List[Dict[str, Any]]) -> None:
    """Print one progress line per row (flushed, for long runs)."""
    for r in rows:
        parts = [f"{r['mode']:<16}", f"{r['size']:<9}", f"{r['solver']:<7}", f"{_lib_label(r):<26}",
                 f"nfe={r['nfe_forward']}/{r['nfe_backward']}", f"t={_fmt_time(r['time_s'])}",
                 f"ovh={_fmt(r['overhead'], '.2f')}"]
        if r.get("steps"):
            parts.append(f"steps={r['steps']}")
        if r.get("saved_bytes") is not None:
            parts.append(f"saved={_mb(r['saved_bytes'])}MB")
        if r["error"]:
            parts.append(f"ERROR {r['error'][:120]}")
        print("  " + " ".join(parts), flush=True)
