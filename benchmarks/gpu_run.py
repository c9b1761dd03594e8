#!/usr/bin/env python
"""Every GPU number the docs promise, in one command: run it once on a CUDA machine (within 10 minutes).

    python benchmarks/gpu_run.py --device cuda --out benchmarks/results/gpu_h100
    python benchmarks/gpu_run.py --device cpu --out /tmp/gpu_run_cpu      # the same pieces, tiny, on the CPU

Each piece runs as a subprocess with its share of the time budget (`--budget`); a piece that
fails or runs out of time is recorded and the next one runs. The pieces, in order:

- ``cuda-tests``: ``pytest tests/test_cuda.py tests/test_blocks.py -k cuda`` (CUDA only: skipped
  on the CPU, with the reason recorded);
- ``bench-<size>``: ``benchmarks/bench_solvers.py`` per size (small, medium, large, conv; tiny
  sizes with ``--scale tiny``), whose tables get the CUDA peak memory columns and the CUDA-graph
  row of the fixed-step mode on CUDA; ``bench-memory``: activation and peak memory against steps;
- ``compare-solvers``: ``experiments/compare_solvers.py --quick`` (tiny settings with ``--scale tiny``).

``OUT/manifest.json`` names the device (`torch.cuda.get_device_name` or the CPU model), the
versions, the commit, and per piece the command, status (passed, failed, timeout, skipped,
interrupted), time and outputs; it is rewritten after every piece, so that an interruption
keeps what was written. ``OUT/summary.md`` is the same as a table; ``OUT/logs/`` holds each
piece's output. ``--only NAMES`` reruns some pieces into the same folder and keeps the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

if str(Path(__file__).resolve().parent) not in sys.path:  # the solverbench package lives next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from solverbench.config import REPO_ROOT  # noqa: E402  (torch-free: this process imports no torch)
from solverbench.machine import cpu_model, git_commit  # noqa: E402

SCHEMA_VERSION = 1
DEFAULT_BUDGET_S = 540  # the whole run, under 10 minutes with start-up
MIN_SHARE_S = 5.0  # a piece whose share of the budget is smaller is skipped
TRAIN_MODES = "train-direct,train-adjoint,train-checkpoint"
CUDA_ONLY_REASON = ("CUDA only: tests/test_cuda.py needs a CUDA device (on the CPU, tests/test_host_sync.py "
                    "counts the same host reads in the ordinary test run)")


@dataclass
class Piece:
    """One step of the run: a command, its share of the budget, and what it must leave behind."""

    name: str  # short name, also the log's file name
    argv: List[str]  # the command, relative to the repository root ("python" is this interpreter)
    weight: float = 1.0  # share of the remaining budget
    skip: Optional[str] = None  # a reason not to run it (CUDA-only piece on the CPU)
    check: Optional[Callable[[Path, str], Dict[str, Any]]] = None  # (out dir, device) -> facts; raises on a bad output
    notes: List[str] = field(default_factory=list)  # what the reader of the manifest should know
    stale: List[str] = field(default_factory=list)  # its own output files (relative to OUT), removed before it runs


# ---------------------------------------------------------------------------- the pieces


def pieces_for(device: str, scale: str, out: Path) -> List[Piece]:
    """The run's pieces in order, at `scale` ("reduced": the docs' tables; "tiny": a smoke run)."""
    out = _shown(out)
    py = "python"
    no_peak = [] if device == "cuda" else ["CPU: no CUDA peak memory (CUDA only)"]
    no_graph = [] if device == "cuda" else ["CPU: no CUDA peak memory and no CUDA-graph row (CUDA only)"]
    tests = Piece("cuda-tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_cuda.py",
                                 "tests/test_blocks.py", "-k", "cuda", "--junitxml", str(out / "cuda_tests.xml")],
                  weight=1.5, skip=None if device == "cuda" else CUDA_ONLY_REASON, check=check_tests,
                  stale=["cuda_tests.xml"])
    bench = [py, "benchmarks/bench_solvers.py", "--device", device]
    main_modes = f"forward,{TRAIN_MODES},fixed,seminorm"
    if scale == "tiny":
        tiny = [*bench, "--quick", "--repeats", "1", "--f-time", "0.01"]
        sizes = [("tiny", [*tiny, "--modes", main_modes]),
                 ("conv-tiny", [*tiny, "--sizes", "conv-tiny", "--modes", f"forward,{TRAIN_MODES},fixed",
                                "--fixed-solvers", "euler"])]
        memory = [*tiny, "--modes", "memory"]
    else:
        reduced = [*bench, "--repeats", "5", "--f-time", "0.5"]
        sizes = [(s, [*reduced, "--sizes", s, "--modes", main_modes]) for s in ("small", "medium", "large")]
        sizes.append(("conv", [*bench, "--sizes", "conv", "--modes", f"forward,{TRAIN_MODES},fixed",
                               "--fixed-solvers", "euler", "--repeats", "3", "--f-time", "0.5"]))
        memory = [*bench, "--modes", "memory", "--memory-sizes", "medium", "--repeats", "2", "--f-time", "0.2"]
    sizes.append(("memory", memory))
    benches = [Piece(f"bench-{s}", [*argv, "--out", str(out / "bench" / s)], check=partial(check_bench, name=s),
                     notes=no_peak if s == "memory" else no_graph, stale=[f"bench/{s}.json", f"bench/{s}.md"])
               for s, argv in sizes]
    return [tests, *benches, _compare_piece(device, scale, out)]


def _shown(out: Path) -> Path:
    """`out` relative to the repository root when it lies inside (the pieces run there), else as given."""
    try:
        return out.resolve().relative_to(REPO_ROOT)
    except ValueError:
        return out


def _compare_piece(device: str, scale: str, out: Path) -> Piece:
    """`experiments/compare_solvers.py` through its command line: `--quick`, or tiny settings."""
    argv = ["python", "experiments/compare_solvers.py", "--device", device, "--out", str(out / "compare_solvers")]
    if scale == "tiny":
        argv += ["--dataset", "spheres", "--runs", "resnet,ode-net", "--seeds", "0", "--epochs", "1",
                 "--limit-train", "200", "--limit-test", "100", "--batch-size", "50", "--euler-steps", "1,6",
                 "--rk4-steps", "1", "--dopri5-tols", "1e-2"]
    else:
        argv += ["--quick"]
    return Piece("compare-solvers", argv, weight=2.0, check=check_compare)


# ---------------------------------------------------------------------------- output checks


def check_tests(out: Path, device: str) -> Dict[str, Any]:
    """Counts from pytest's JUnit XML; every test skipped on CUDA means torch saw no GPU."""
    suite = ET.parse(out / "cuda_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    facts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    if facts["tests"] and facts["skipped"] == facts["tests"]:
        raise RuntimeError("every CUDA test was skipped: torch sees no CUDA device")
    return facts


def check_bench(out: Path, device: str, name: str) -> Dict[str, Any]:
    """Rows, failed rows and (CUDA) the CUDA-graph rows and peak memory of `out/bench/NAME.json`."""
    prefix = out / "bench" / name
    data = json.loads(prefix.with_suffix(".json").read_text())
    rows = data["results"]
    facts = dict(files=[str(prefix.with_suffix(e).relative_to(out)) for e in (".json", ".md")], rows=len(rows),
                 rows_with_error=sum(r["error"] is not None for r in rows),
                 cuda_graph_rows=sum(r["library"] == "odenet+cudagraph" for r in rows),
                 cuda_peak_rows=sum(r.get("cuda_peak_bytes") is not None for r in rows), gpu=data["environment"]["gpu"])
    bad = [f"{r['mode']} {r['solver']} {r['gradient']}: {r['error']}" for r in rows if r["library"] == "odenet" and r["error"]]
    if not rows or bad:
        raise RuntimeError(f"odenet failed {len(bad)} case(s): {bad[:3]}" if bad else "no rows")
    if device == "cuda" and any(r["mode"] == "fixed" for r in rows) and not facts["cuda_graph_rows"]:
        raise RuntimeError("no CUDA-graph row in the fixed-step mode")
    if device == "cuda" and any(r["train"] for r in rows) and not facts["cuda_peak_rows"]:
        raise RuntimeError("no CUDA peak memory in the training rows")
    return facts


def check_compare(out: Path, device: str) -> Dict[str, Any]:
    """Finished runs in compare_solvers' results.jsonl and its table."""
    folder = out / "compare_solvers"
    lines = [ln for ln in (folder / "results.jsonl").read_text().splitlines() if ln.strip()]
    if not lines or not (folder / "results.md").exists():
        raise RuntimeError("compare_solvers wrote no results")
    files = [p for p in sorted(folder.iterdir()) if p.suffix in (".md", ".jsonl", ".csv")]
    return dict(files=[str(p.relative_to(out)) for p in files], runs=len(lines))


# ---------------------------------------------------------------------------- running


class Interrupted(Exception):
    """SIGTERM or Ctrl-C while a piece runs."""


def _on_sigterm(signum, frame):
    """SIGTERM ends the run the way Ctrl-C does: the running piece is stopped and recorded."""
    raise Interrupted(f"signal {signum}")


def child_env() -> Dict[str, str]:
    """The environment of every piece: this checkout importable (after any PYTHONPATH given), output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO_ROOT)) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Stop a piece and whatever it started (its own process group): TERM, then KILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_piece(piece: Piece, out: Path, device: str, timeout: float) -> Dict[str, Any]:
    """Run one piece with its output in `out/logs/NAME.log`; the record of how it went."""
    log = out / "logs" / f"{piece.name}.log"
    argv = [sys.executable if a == "python" else a for a in piece.argv]
    rec = dict(status="running", started=_now(), timeout_s=round(timeout, 1), log=str(log.relative_to(out)))
    for name in piece.stale:  # an earlier run's output must not pass this run's check
        (out / name).unlink(missing_ok=True)
    start = time.monotonic()
    with open(log, "w") as fh:
        fh.write(f"$ {shlex.join(piece.argv)}\n")
        fh.flush()
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=child_env(), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rec["returncode"] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            rec.update(status="timeout", reason=f"still running after {timeout:.0f} s: stopped")
        except BaseException:  # Ctrl-C or SIGTERM: stop the piece, let run_pieces record it
            _stop(proc)
            raise
    rec["wall_s"] = round(time.monotonic() - start, 1)
    if rec["status"] == "running":
        rec.update(_judge(piece, out, device, rec["returncode"]))
    return rec


def _judge(piece: Piece, out: Path, device: str, returncode: int) -> Dict[str, Any]:
    """passed, or failed with the reason (a non-zero exit, or an output its check rejects); the check's facts."""
    rec: Dict[str, Any] = dict(status="passed")
    if piece.check is not None:
        try:
            rec["results"] = piece.check(out, device)
        except Exception as err:
            rec.update(status="failed", reason=f"output check: {type(err).__name__}: {err}"[:500])
    if returncode != 0:
        rec.update(status="failed", reason=f"exit code {returncode} (see the log)")
    return rec


def run_pieces(pieces: Sequence[Piece], manifest: Dict[str, Any], out: Path, budget_s: float) -> Dict[str, Any]:
    """Run the pieces in order, each with its share of what is left of `budget_s`, the manifest written after each."""
    deadline = time.monotonic() + budget_s
    todo = [p for p in pieces if p.skip is None]
    for piece in pieces:
        entry = manifest["pieces"][piece.name]
        if piece.skip is not None:
            entry.update(status="skipped", reason=piece.skip)
            continue
        left = deadline - time.monotonic()
        share = left * piece.weight / sum(p.weight for p in todo)
        todo.remove(piece)
        if share < MIN_SHARE_S:
            entry.update(status="skipped", reason=f"out of time: {max(left, 0):.0f} s of the {budget_s:.0f} s budget left")
            continue
        entry.update(status="running", started=_now())
        write_manifest(manifest, out)
        try:
            entry.update(run_piece(piece, out, manifest["device"], share))
        except (KeyboardInterrupt, Interrupted):
            entry.update(status="interrupted", reason="the run was interrupted")
            for rest in todo:
                manifest["pieces"][rest.name].update(status="not run", reason="the run was interrupted before it")
            manifest["interrupted"] = True
            break
        finally:
            write_manifest(manifest, out)
    return manifest


# ---------------------------------------------------------------------------- manifest


PROBE = r"""
import json, platform, sys
from importlib.metadata import version, PackageNotFoundError
info = dict(python=platform.python_version(), python_executable=sys.executable)
for name in ("torch", "odenet", "torchdiffeq", "torchode", "numpy"):
    try:
        info[name] = version(name)
    except PackageNotFoundError:
        info[name] = None
import torch, odenet
info.update(torch=torch.__version__, odenet_path=odenet.__file__, cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(), cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                gpu_capability=list(torch.cuda.get_device_capability(0)), gpu_memory_bytes=p.total_memory)
print(json.dumps(info))
"""


def probe_versions() -> Dict[str, Any]:
    """Versions and the GPU as the pieces will see them (a subprocess: this one stays free of torch and CUDA)."""
    # run outside the checkout: `python -c` puts its working directory first on sys.path, ahead of PYTHONPATH
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tempfile.gettempdir(), env=child_env(), capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0:
        return dict(error=(r.stderr.strip().splitlines() or ["no output"])[-1][:500])
    return json.loads(r.stdout.strip().splitlines()[-1])


def nvidia_smi() -> Optional[str]:
    """`nvidia-smi`'s name, driver and memory of each GPU (None without it)."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def new_manifest(args: argparse.Namespace, argv: Sequence[str], versions: Dict[str, Any],
                 pieces: Sequence[Piece]) -> Dict[str, Any]:
    """The manifest before any piece ran: device, machine, versions, and every piece pending."""
    name = versions.get("gpu") if args.device == "cuda" else cpu_model()
    return dict(
        schema_version=SCHEMA_VERSION, device=args.device, device_name=name, scale=args.scale,
        command=shlex.join(["python", "benchmarks/gpu_run.py", *argv]), started=_now(), finished=None,
        budget_s=args.budget, git_commit=git_commit(), cpu_model=cpu_model(), cpu_count=os.cpu_count(),
        nvidia_smi=nvidia_smi() if args.device == "cuda" else None, versions=versions, interrupted=False,
        pieces={p.name: dict(command=shlex.join(p.argv), status="pending", notes=p.notes) for p in pieces},
    )


def merge_earlier(manifest: Dict[str, Any], out: Path, only: Sequence[str]) -> None:
    """With `--only`: keep the earlier records of the pieces not rerun (same device and scale required)."""
    path = out / "manifest.json"
    if not only or not path.exists():
        return
    old = json.loads(path.read_text())
    if (old.get("device"), old.get("scale")) != (manifest["device"], manifest["scale"]):
        raise SystemExit(f"{out} holds a run on {old.get('device')} at scale {old.get('scale')}; use another --out")
    for name, entry in old.get("pieces", {}).items():
        if name in manifest["pieces"] and name not in only:
            manifest["pieces"][name] = entry


def write_manifest(manifest: Dict[str, Any], out: Path) -> None:
    """`manifest.json` and `summary.md`, each replaced in one step (a reader never sees half a file)."""
    for name, text in (("manifest.json", json.dumps(manifest, indent=1) + "\n"), ("summary.md", render_summary(manifest))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def render_summary(m: Dict[str, Any]) -> str:
    """The manifest as Markdown: device, versions, then one line per piece."""
    v = m["versions"]
    lines = [f"# GPU run: {m['device_name']} ({m['device']}, scale {m['scale']})", "",
             f"- command: `{m['command']}`",
             f"- started {m['started']}, finished {m['finished'] or '—'}, git commit `{m['git_commit']}`",
             f"- CPU: {m['cpu_model']} ({m['cpu_count']} cores)" + (f"; nvidia-smi: {m['nvidia_smi']}" if m["nvidia_smi"] else ""),
             f"- versions: python {v.get('python')}, torch {v.get('torch')} (CUDA {v.get('cuda_runtime')}), "
             f"odenet {v.get('odenet')}, torchdiffeq {v.get('torchdiffeq')}, torchode {v.get('torchode')}",
             "", "| piece | status | wall s | limit s | outputs | why / notes |", "|---|---|---|---|---|---|"]
    for name, e in m["pieces"].items():
        files = (e.get("results") or {}).get("files", [])
        outs = ", ".join(f"[{Path(f).name}]({f})" for f in files) or (f"[log]({e['log']})" if e.get("log") else "—")
        why = "; ".join([*([e["reason"]] if e.get("reason") else []), *e.get("notes", [])]) or "—"
        lines.append(f"| {name} | {e['status']} | {e.get('wall_s', '—')} | {e.get('timeout_s', '—')} | {outs} | {why} |")
    return "\n".join(lines) + "\n"


def _now() -> str:
    """UTC now, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of `gpu_run.py`."""
    p = argparse.ArgumentParser(prog="gpu_run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", required=True, choices=("cuda", "cpu"),
                   help="cuda (the GPU numbers; pick the GPU with CUDA_VISIBLE_DEVICES) or cpu (the same pieces, CI)")
    p.add_argument("--out", default=None,
                   help="results folder (default: benchmarks/results/gpu_run_<device name>)")
    p.add_argument("--scale", choices=("reduced", "tiny"), default=None,
                   help="reduced: the docs' tables at fewer repeats (default on cuda); tiny: a smoke run (default on cpu)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for all pieces together; each gets its share of what is left (default {DEFAULT_BUDGET_S})")
    p.add_argument("--only", default=None,
                   help="comma-separated pieces to (re)run into --out, keeping the others' earlier records")
    p.add_argument("--dry-run", action="store_true", help="print the pieces and their commands, run nothing")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run every piece (or `--only` some) and write the manifest; 0 when none failed or timed out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    args.scale = args.scale or ("reduced" if args.device == "cuda" else "tiny")
    if args.budget <= 0:
        p.error(f"--budget must be positive, got {args.budget}")
    names = [pc.name for pc in pieces_for(args.device, args.scale, Path("OUT"))]
    only = [s.strip() for s in (args.only or "").split(",") if s.strip()]
    if set(only) - set(names):
        p.error(f"--only: unknown piece(s) {sorted(set(only) - set(names))}; the pieces are {', '.join(names)}")
    if args.dry_run:
        for pc in pieces_for(args.device, args.scale, Path(args.out or "OUT")):
            print(f"{pc.name:<16} {'skipped: ' + pc.skip if pc.skip else shlex.join(pc.argv)}")
        return 0
    versions = probe_versions()
    if args.device == "cuda" and not versions.get("cuda_available"):
        p.error(f"--device cuda, but torch sees no CUDA device ({versions.get('error') or 'cuda_available: False'})")
    out = Path(args.out).resolve() if args.out else default_out(args.device, versions)
    return run_all(args, argv, out, versions, only)


def default_out(device: str, versions: Dict[str, Any]) -> Path:
    """`benchmarks/results/gpu_run_<device name>`, e.g. `gpu_run_nvidia-h100-80gb-hbm3` or `gpu_run_cpu`."""
    name = (versions.get("gpu") or "gpu") if device == "cuda" else "cpu"
    return REPO_ROOT / "benchmarks" / "results" / f"gpu_run_{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"


def run_all(args: argparse.Namespace, argv: List[str], out: Path, versions: Dict[str, Any], only: List[str]) -> int:
    """Write the manifest, run the selected pieces, finish the manifest; the exit code."""
    pieces = pieces_for(args.device, args.scale, out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(args, argv, versions, pieces)
    merge_earlier(manifest, out, only)
    signal.signal(signal.SIGTERM, _on_sigterm)
    run_pieces([pc for pc in pieces if not only or pc.name in only], manifest, out, args.budget)
    manifest["finished"] = _now()
    write_manifest(manifest, out)
    print(render_summary(manifest))
    print(f"wrote {out / 'manifest.json'} and {out / 'summary.md'}")
    if manifest["interrupted"]:
        return 130
    return 1 if any(e["status"] in ("failed", "timeout") for e in manifest["pieces"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
