"""Discrete against continuous depth, measured: the Chen et al. 2018 Table 1 comparison.

Trains one architecture (stem -> residual part -> head) with the residual part run as a
ResNet, a weight-tied ResNet, an RK-Net and ODE-Nets (three gradient methods), and writes
a table of test accuracy, parameters, function evaluations, steps, activation memory and
time, plus a cross-evaluation of every trained `f` under other solvers.

    python experiments/compare_solvers.py                  # the default table (MNIST-1D, CPU < 15 min)
    python experiments/compare_solvers.py --quick          # the same outputs at small scale (< 2 min)
    python experiments/compare_solvers.py --runs resnet,ode-net --seeds 0,1
    python experiments/compare_solvers.py --run ode-net:rtol=1e-4,atol=1e-4 --run my-net:solver=tsit5,gradient=checkpoint
    torchrun --nproc_per_node=2 experiments/compare_solvers.py --quick   # DistributedDataParallel

Results go to `--out` (default `results/compare_solvers/<dataset>/`): `results.jsonl` (one
line per finished run and seed, appended as it finishes; a rerun skips what is there),
`results.csv`, `results.md` and plots. See `--help` for every flag.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

PROG = "compare_solvers.py"


class UsageError(Exception):
    """A problem with the command line or the data: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Everything a comparison depends on. Fields marked (key) enter the resume key: a
    finished run is reused only when they all match."""

    dataset: str = "mnist1d"  # (key) data set: mnist1d | digits | spheres | mnist
    data_dir: Optional[str] = None  # folder with the four MNIST IDX files (dataset mnist only)
    spheres_dim: int = 2  # (key) dimension of the concentric-spheres points (dataset spheres only)
    runs: Tuple[str, ...] = ()  # names of the runs, in order (presets and --run definitions)
    specs: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # (key) run name -> ResidualSpec fields
    seeds: Tuple[int, ...] = (0, 1, 2)  # (key) one training per run and seed; accuracy is mean ± std over them
    epochs: int = 15  # (key) training epochs per run
    batch_size: int = 100  # (key) global batch size (split across processes under torchrun)
    lr: float = 1e-2  # (key) peak learning rate of AdamW's one-cycle schedule
    weight_decay: float = 1e-4  # (key) AdamW weight decay
    width: Optional[int] = None  # (key) channels/features of the residual state (None: the model's default, 32)
    limit_train: Optional[int] = None  # (key) use only the first N training examples (smoke tests)
    limit_test: Optional[int] = None  # (key) use only the first N test examples (smoke tests)
    cross_eval: bool = True  # (key) re-evaluate each trained f under the solvers below
    euler_steps: Tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # (key) cross-evaluation: Euler step counts
    rk4_steps: Tuple[int, ...] = (1, 2, 4, 8)  # (key) cross-evaluation: RK4 step counts
    dopri5_tols: Tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # (key) cross-evaluation: dopri5 rtol = atol
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 1  # torch CPU threads per process (1 is fastest for these small models on a shared CPU)
    out: Optional[str] = None  # output folder (None: results/compare_solvers/<dataset>/)
    fresh: bool = False  # delete earlier results in --out and start over
    quick: bool = False  # small-scale settings (fewer epochs, one seed) for a check in under 2 minutes

    @property
    def out_dir(self) -> str:
        return self.out or os.path.join("results", "compare_solvers", self.dataset)

    def key_fields(self) -> Dict[str, Any]:
        """The settings (besides run and seed) a result depends on."""
        keep = ("dataset", "epochs", "batch_size", "lr", "weight_decay", "width", "limit_train", "limit_test",
                "euler_steps", "rk4_steps", "dopri5_tols", "cross_eval")
        d = {k: getattr(self, k) for k in keep}
        if self.dataset == "spheres":
            d["spheres_dim"] = self.spheres_dim
        return d


QUICK = dict(epochs=3, seeds=(0,), euler_steps=(1, 2, 4, 6, 12, 24), rk4_steps=(1, 2, 4), dopri5_tols=(1e-1, 1e-3, 1e-5))

SPEC_KEYS = {
    "solver": "solver name (euler, midpoint, heun, rk4, bosh3, dopri5, tsit5)",
    "steps": "fixed-step solvers: number of steps",
    "rtol": "adaptive solvers: relative tolerance",
    "atol": "adaptive solvers: absolute tolerance",
    "tol": "adaptive solvers: rtol = atol = tol",
    "gradient": "direct | adjoint | checkpoint",
    "tied": "true (one shared f) | false (one f per step: euler only)",
    "adjoint_rtol": "adjoint backward solve: relative tolerance",
    "adjoint_atol": "adjoint backward solve: absolute tolerance",
    "seminorm": "adjoint: leave parameter gradients out of error control (true/false)",
    "max_steps": "adaptive solvers: step limit",
}


def _parse_bool(key: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"--run: {key}={text!r} is not true/false")


def parse_run(text: str, presets: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """`NAME[:KEY=VALUE,...]` -> (name, ResidualSpec fields). A preset name starts from the
    preset; a new name starts from dopri5 (rtol = atol = 1e-3, direct gradient)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or any(c in name for c in ",= \t/"):
        raise UsageError(f"--run {text!r}: expected NAME or NAME:KEY=VALUE,... with a plain NAME (no ',', '=', '/' or spaces)")
    base = dict(presets[name].as_dict()) if name in presets else dict(solver="dopri5", rtol=1e-3, atol=1e-3, gradient="direct")
    given: Dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in SPEC_KEYS:
            raise UsageError(f"--run {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(SPEC_KEYS)}")
        value = value.strip()
        try:
            if key in ("steps", "max_steps"):
                given[key] = int(value)
            elif key in ("rtol", "atol", "adjoint_rtol", "adjoint_atol"):
                given[key] = float(value)
            elif key == "tol":
                given["rtol"] = given["atol"] = float(value)
            elif key in ("tied", "seminorm"):
                given["tied" if key == "tied" else "adjoint_seminorm"] = _parse_bool(key, value)
            else:
                given[key] = value
        except ValueError:
            raise UsageError(f"--run {text!r}: {key}={value!r} is not a number") from None
    if "solver" in given and given["solver"] != base.get("solver"):
        # Switching between fixed-step and adaptive drops the settings the other kind rejects.
        from odenet.solvers import SOLVERS

        if given["solver"] in SOLVERS:
            adaptive = SOLVERS[given["solver"]]().adaptive
            drop = ("steps",) if adaptive else ("rtol", "atol", "max_steps", "adjoint_rtol", "adjoint_atol")
            for k in drop:
                if k not in given:
                    base[k] = None
            if adaptive and "rtol" not in given and base.get("rtol") is None:
                base["rtol"] = base["atol"] = 1e-3
    base.update(given)
    return name, base


def _int_list(flag: str, text: str, minimum: int = 0) -> Tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not values or any(v < minimum for v in values):
        raise UsageError(f"{flag} {text!r}: expected at least one integer, each >= {minimum}")
    if len(set(values)) != len(values):
        raise UsageError(f"{flag} {text!r}: values repeat")
    return values


def _float_list(flag: str, text: str) -> Tuple[float, ...]:
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 1e-2,1e-3") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise UsageError(f"{flag} {text!r}: expected at least one positive number")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    from odenet.models import PRESETS

    preset_lines = "\n".join(f"  {name:<20} {spec.describe()}" for name, spec in PRESETS.items())
    key_lines = "\n".join(f"  {k:<13} {v}" for k, v in SPEC_KEYS.items())
    p = _Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and evaluate discrete and continuous-depth versions of one model and write the\n"
        "Chen et al. 2018 Table 1 comparison (test error, parameters, memory, steps), measured.\n"
        "Finished runs are kept in OUT/results.jsonl; a rerun resumes (--fresh starts over).",
        epilog=f"runs (presets):\n{preset_lines}\n\n--run keys:\n{key_lines}\n\n"
        "Examples:\n"
        "  python experiments/compare_solvers.py --quick\n"
        "  python experiments/compare_solvers.py --runs resnet,ode-net --seeds 0,1,2,3\n"
        "  python experiments/compare_solvers.py --run ode-net:tol=1e-5 --run rk8:solver=rk4,steps=8\n"
        "  torchrun --nproc_per_node=2 experiments/compare_solvers.py --quick --device cpu",
    )
    d = Settings()
    p.add_argument("--dataset", default=d.dataset, choices=["mnist1d", "digits", "spheres", "mnist"],
                   help="data set (default %(default)s); all offline: mnist reads IDX files from --data-dir")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                   "t10k-labels-idx1-ubyte (raw or .gz); --dataset mnist only")
    p.add_argument("--spheres-dim", type=int, default=d.spheres_dim, metavar="D",
                   help="dimension of the concentric-spheres points (default %(default)s)")
    p.add_argument("--runs", default=None, metavar="NAMES",
                   help="comma-separated runs to train, in order: presets below or names defined with --run "
                   "(default: every preset, or only the --run runs when --run is given; 'all' = every preset)")
    p.add_argument("--run", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="define a run or change a preset, e.g. ode-net:tol=1e-4 or my-net:solver=tsit5,gradient=adjoint "
                   "(repeatable; keys below)")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help=f"comma-separated seeds, one training per run and seed (default {','.join(map(str, d.seeds))}; --quick: 0)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs per run (default {d.epochs}; --quick: {QUICK['epochs']})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, AdamW one-cycle (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
    p.add_argument("--width", type=int, default=None, help="channels/features of the residual state (default 32)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="use only the first N training examples")
    p.add_argument("--limit-test", type=int, default=None, metavar="N", help="use only the first N test examples")
    p.add_argument("--no-cross-eval", action="store_true", help="skip re-evaluating each trained f under other solvers")
    p.add_argument("--euler-steps", default=None, metavar="N,N,...",
                   help="cross-evaluation: Euler step counts (default " + ",".join(map(str, d.euler_steps)) + ")")
    p.add_argument("--rk4-steps", default=None, metavar="N,N,...",
                   help="cross-evaluation: RK4 step counts (default " + ",".join(map(str, d.rk4_steps)) + ")")
    p.add_argument("--dopri5-tols", default=None, metavar="TOL,...",
                   help="cross-evaluation: dopri5 tolerances, rtol = atol (default " + ",".join(f"{t:g}" for t in d.dopri5_tols) + ")")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA when available (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads per process (default %(default)s: fastest for these small models, and "
                   "robust when other jobs share the CPU; 0 = torch's default)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default results/compare_solvers/<dataset>/)")
    p.add_argument("--fresh", action="store_true", help="delete earlier results in --out and start over (default: resume)")
    p.add_argument("--quick", action="store_true",
                   help=f"small scale: {QUICK['epochs']} epochs, seed 0, fewer cross-evaluation settings (explicit flags win)")
    return p


def parse_settings(argv: Sequence[str]) -> Settings:
    """Command line -> validated `Settings`. Raises `UsageError` with a one-line message."""
    from odenet.models import PRESETS, ResidualSpec

    a = build_parser().parse_args(list(argv))
    s = Settings(dataset=a.dataset, data_dir=a.data_dir, spheres_dim=a.spheres_dim, batch_size=a.batch_size, lr=a.lr,
                 weight_decay=a.weight_decay, width=a.width, limit_train=a.limit_train, limit_test=a.limit_test,
                 cross_eval=not a.no_cross_eval, device=a.device, threads=a.threads, out=a.out, fresh=a.fresh,
                 quick=a.quick)
    if a.quick:
        for k, v in QUICK.items():
            setattr(s, k, v)
    if a.epochs is not None:
        s.epochs = a.epochs
    if a.seeds is not None:
        s.seeds = _int_list("--seeds", a.seeds)
    if a.euler_steps is not None:
        s.euler_steps = _int_list("--euler-steps", a.euler_steps, 1)
    if a.rk4_steps is not None:
        s.rk4_steps = _int_list("--rk4-steps", a.rk4_steps, 1)
    if a.dopri5_tols is not None:
        s.dopri5_tols = _float_list("--dopri5-tols", a.dopri5_tols)
    for flag, value, minimum in (("--epochs", s.epochs, 1), ("--batch-size", s.batch_size, 1), ("--threads", s.threads, 0),
                                 ("--spheres-dim", s.spheres_dim, 1), ("--width", s.width, 1),
                                 ("--limit-train", s.limit_train, 1), ("--limit-test", s.limit_test, 1)):
        if value is not None and value < minimum:
            raise UsageError(f"{flag} must be >= {minimum}, got {value}")
    for flag, value in (("--lr", s.lr), ("--weight-decay", s.weight_decay)):
        if not (math.isfinite(value) and value >= 0) or (flag == "--lr" and value == 0):
            raise UsageError(f"{flag} must be a {'positive' if flag == '--lr' else 'non-negative'} number, got {value}")
    if s.data_dir is not None and s.dataset != "mnist":
        raise UsageError(f"--data-dir is read by --dataset mnist only; {s.dataset} is built in (leave --data-dir out)")
    if s.dataset == "mnist" and s.data_dir is None:
        raise UsageError("--dataset mnist reads the four MNIST IDX files from --data-dir DIR; give --data-dir")

    defined: Dict[str, Dict[str, Any]] = {}
    for text in a.run:
        name, spec = parse_run(text, PRESETS)
        if name in defined:
            raise UsageError(f"--run {name} is given twice")
        defined[name] = spec
    if a.runs is None:
        names = list(defined) if defined else list(PRESETS)
    else:
        names = []
        for n in (x.strip() for x in a.runs.split(",")):
            if not n:
                continue
            names.extend(PRESETS if n == "all" else [n])
        names.extend(n for n in defined if n not in names)
    if not names:
        raise UsageError("--runs names no run")
    if len(set(names)) != len(names):
        raise UsageError(f"--runs repeats a name: {','.join(names)}")
    specs = {}
    for n in names:
        if n in defined:
            fields_ = defined[n]
        elif n in PRESETS:
            fields_ = PRESETS[n].as_dict()
        else:
            raise UsageError(f"unknown run {n!r}: choose from {', '.join(PRESETS)} or define it with --run {n}:KEY=VALUE,...")
        try:
            specs[n] = ResidualSpec(**fields_).as_dict()
        except (ValueError, TypeError) as err:
            raise UsageError(f"run {n}: {err}") from None
    s.runs, s.specs = tuple(names), specs
    return s


# ---------------------------------------------------------------------------- results file


def result_key(settings: Settings, run: str, seed: int) -> str:
    """A digest of everything a (run, seed) result depends on."""
    payload = dict(settings.key_fields(), run=run, spec=settings.specs[run], seed=seed)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_results(path: str) -> List[Dict[str, Any]]:
    """The JSON lines of `path` (none if it does not exist); an unreadable line (e.g. cut by
    an interruption mid-write) is skipped with a note."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"note: skipping unreadable line {i} of {path}", file=sys.stderr)
    return rows


def append_result(path: str, row: Dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk, so an interruption loses at most the run in progress."""
    # A line cut by an interruption has no newline: start on a fresh line so this one stays readable.
    cut = False
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            cut = fh.read(1) != b"\n"
    with open(path, "a") as fh:
        fh.write(("\n" if cut else "") + json.dumps(row, default=_json_default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------- one run


def environment(info, settings: Settings) -> Dict[str, Any]:
    """Versions and hardware, for the table's header."""
    import importlib.metadata as md

    import numpy
    import torch

    import odenet

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = dict(
        python=platform.python_version(), torch=torch.__version__, odenet=odenet.__version__, numpy=numpy.__version__,
        mnist1d=version("mnist1d"), scikit_learn=version("scikit-learn"), platform=platform.platform(),
        cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=str(info.device),
        world_size=info.world_size, gpu=torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None,
    )
    return env


def run_one(settings: Settings, data, name: str, seed: int, info, env: Dict[str, Any], bars) -> Optional[Dict[str, Any]]:
    """Train and measure one (run, seed). Every process trains; rank 0 measures and returns the row."""
    import torch
    import torch.distributed as dist

    from odenet.models import ResidualSpec, build_model, count_parameters
    from odenet.training import (activation_bytes, activation_sweep, cross_evaluate, default_cross_eval_configs,
                                 evaluate, inference_time, train, training_step_peak_cuda)

    spec = ResidualSpec(**settings.specs[name])
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    model = build_model(data.input_shape, data.num_classes, spec, width=settings.width).to(info.device)
    epoch_bar = bars.epochs(f"{name} seed {seed}", settings.epochs)

    def on_epoch(rec):
        epoch_bar.update(1)
        epoch_bar.set_postfix(loss=f"{rec.loss:.3f}", nfe=f"{rec.nfe_forward:.0f}/{rec.nfe_backward:.0f}", refresh=False)

    t_start = time.perf_counter()
    result = train(model, data.x_train, data.y_train, epochs=settings.epochs, batch_size=settings.batch_size,
                   lr=settings.lr, weight_decay=settings.weight_decay, seed=seed, info=info, progress=on_epoch)
    epoch_bar.close()
    train_seconds = time.perf_counter() - t_start
    row = None
    if info.is_main:
        dev = info.device
        test = evaluate(model, data.x_test, data.y_test, batch_size=1000, device=dev)
        bs = min(settings.batch_size, data.num_train)
        xb, yb = data.x_train[:bs].to(dev), data.y_train[:bs].to(dev)
        act = activation_bytes(model, xb, yb)
        peak = training_step_peak_cuda(model, xb, yb) if dev.type == "cuda" else None
        xt = data.x_test[: min(settings.batch_size, data.num_test)].to(dev)
        infer = inference_time(model, xt, repeats=10, device=dev)
        cross = []
        if settings.cross_eval:
            configs = default_cross_eval_configs(settings.euler_steps, settings.rk4_steps, settings.dopri5_tols)
            cross = cross_evaluate(model, data.x_test, data.y_test, configs)
        sweep = activation_sweep(model, xb, yb, memory_settings(spec, settings))
        last = result.last
        row = dict(
            key=result_key(settings, name, seed), run=name, seed=seed, spec=settings.specs[name],
            residual=spec.describe(), dataset=settings.dataset, settings=settings.key_fields(),
            test_accuracy=test["accuracy"], test_nfe_forward=test["nfe_forward"], params=count_parameters(model),
            nfe_forward=last.nfe_forward, nfe_backward=last.nfe_backward,
            n_accepted=last.n_accepted, n_rejected=last.n_rejected,
            n_accepted_backward=last.n_accepted_backward, n_rejected_backward=last.n_rejected_backward,
            activation_bytes=act["bytes"], cuda_peak_bytes=peak,
            train_seconds_per_epoch=result.seconds_per_epoch, train_seconds=train_seconds,
            inference_seconds_per_batch=infer, inference_batch=int(xt.shape[0]),
            history=[asdict(r) for r in result.history], cross_eval=cross, memory_sweep=sweep,
            device=str(dev), world_size=info.world_size, torch_threads=env["torch_threads"],
            finished=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        )
    if info.distributed:
        dist.barrier()
    return row


def memory_settings(spec, settings: Settings) -> List[Dict[str, Any]]:
    """Block settings for the activation-memory sweep of a run: its own solver and gradient
    method at several tolerances (adaptive) or step counts (fixed-step)."""
    if spec.adaptive:
        return [dict(solver=spec.solver, gradient=spec.gradient, rtol=t, atol=t, max_steps=1000) for t in settings.dopri5_tols]
    return [dict(solver=spec.solver, gradient=spec.gradient, steps=n) for n in (1, 2, 4, 8, 16)]


# ---------------------------------------------------------------------------- progress bars


class Bars:
    """tqdm bars on rank 0 (silent when stderr is not a terminal); no-ops elsewhere."""

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            pass

    def __init__(self, enabled: bool):
        self.enabled = enabled
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: no bars without it
            tqdm = None
        self._tqdm = tqdm

    def _make(self, **kw):
        if not self.enabled or self._tqdm is None:
            return Bars._Null()
        return self._tqdm(disable=None, dynamic_ncols=True, **kw)  # disable=None: quiet when not a TTY

    def runs(self, total: int):
        return self._make(total=total, desc="runs", unit="run", position=0)

    def epochs(self, desc: str, total: int):
        return self._make(total=total, desc=desc, unit="epoch", position=1, leave=False)


# ---------------------------------------------------------------------------- tables and plots


def _mean_std(values: List[float]) -> Tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(settings: Settings, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One summary per run (in run order): means over seeds."""
    out = []
    for name in settings.runs:
        mine = sorted((r for r in rows if r["run"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        acc_m, acc_s = _mean_std([r["test_accuracy"] for r in mine])
        mean = lambda k: _mean_std([r[k] for r in mine])[0]  # noqa: E731
        peaks = [r["cuda_peak_bytes"] for r in mine if r.get("cuda_peak_bytes") is not None]
        out.append(dict(
            run=name, residual=mine[0]["residual"], solver=mine[0]["spec"]["solver"], gradient=mine[0]["spec"]["gradient"],
            seeds=len(mine), accuracy_mean=acc_m, accuracy_std=acc_s,
            accuracies=[r["test_accuracy"] for r in mine], params=mine[0]["params"],
            nfe_forward=mean("nfe_forward"), nfe_backward=mean("nfe_backward"),
            n_accepted=mean("n_accepted"), n_rejected=mean("n_rejected"),
            n_accepted_backward=mean("n_accepted_backward"), n_rejected_backward=mean("n_rejected_backward"),
            activation_mib=mean("activation_bytes") / 2**20,
            cuda_peak_mib=(statistics.fmean(peaks) / 2**20) if peaks else None,
            train_seconds_per_epoch=mean("train_seconds_per_epoch"),
            inference_ms_per_batch=1000 * mean("inference_seconds_per_batch"),
        ))
    return out


CSV_COLUMNS = ["run", "residual", "solver", "gradient", "seeds", "accuracy_mean", "accuracy_std", "accuracies", "params",
               "nfe_forward", "nfe_backward", "n_accepted", "n_rejected", "n_accepted_backward", "n_rejected_backward",
               "activation_mib", "cuda_peak_mib", "train_seconds_per_epoch", "inference_ms_per_batch"]


def write_csv(path: str, summary: List[Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for s in summary:
            w.writerow({k: (";".join(f"{a:.4f}" for a in s[k]) if k == "accuracies" else s[k]) for k in CSV_COLUMNS})


def _fmt(x, spec=".1f", none="–"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def cross_eval_table(settings: Settings, rows: List[Dict[str, Any]]) -> Tuple[List[str], Dict[str, Dict[str, Tuple[float, float]]]]:
    """Labels in order and, per run, label -> (mean accuracy, mean NFE) over seeds."""
    labels: List[str] = []
    table: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for name in settings.runs:
        acc: Dict[str, List[float]] = {}
        nfe: Dict[str, List[float]] = {}
        for r in rows:
            if r["run"] != name:
                continue
            for c in r.get("cross_eval") or []:
                if c["label"] not in labels:
                    labels.append(c["label"])
                acc.setdefault(c["label"], []).append(c["accuracy"] if c["ok"] else float("nan"))
                nfe.setdefault(c["label"], []).append(c["nfe_forward"] if c["ok"] else float("nan"))
        if acc:
            table[name] = {k: (_mean_std(acc[k])[0], _mean_std(nfe[k])[0]) for k in acc}
    return labels, table


def targets(settings: Settings, summary: List[Dict[str, Any]], rows: List[Dict[str, Any]]) -> List[str]:
    """The issue's targets, checked against the numbers in this table (only those that apply)."""
    lines = []
    by = {s["run"]: s for s in summary}
    if settings.dataset == "mnist1d":
        below = [f"{s['run']} {100 * s['accuracy_mean']:.1f}%" for s in summary if not s["accuracy_mean"] >= 0.94]
        lines.append("Every run at or above the published CNN baseline (94%): "
                     + ("yes" if not below else "no: " + ", ".join(below)) + ".")
    if "ode-net" in by and "resnet" in by:
        ratio = by["ode-net"]["params"] / by["resnet"]["params"]
        lines.append(f"ode-net parameters / resnet parameters: {by['ode-net']['params']:,} / {by['resnet']['params']:,} "
                     f"= {ratio:.2f} ({'at most' if ratio <= 1 / 3 else 'more than'} a third).")
    adj = [s for s in summary if s["gradient"] == "adjoint"]
    dirs = [s for s in summary if s["gradient"] == "direct" and s["solver"] == (adj[0]["solver"] if adj else None)]
    if adj and dirs:
        a, d = adj[0], dirs[0]
        lines.append(f"Activation memory per training step: {a['run']} {a['activation_mib']:.2f} MiB vs {d['run']} "
                     f"{d['activation_mib']:.2f} MiB ({d['activation_mib'] / max(a['activation_mib'], 1e-12):.1f}x).")
        for s in (a, d):
            pts = [(m["nfe_forward"], m["bytes"]) for r in rows if r["run"] == s["run"] and r["seed"] == min(settings.seeds)
                   for m in r.get("memory_sweep") or [] if m.get("ok")]
            if len(pts) > 1:
                pts.sort()
                lines.append(f"{s['run']}: activation memory from {pts[0][1] / 2**20:.2f} MiB at NFE {pts[0][0]} to "
                             f"{pts[-1][1] / 2**20:.2f} MiB at NFE {pts[-1][0]} (memory sweep over tolerances).")
    return lines


def command_line(argv: Sequence[str], info) -> str:
    prefix = f"torchrun --nproc_per_node={info.world_size} " if info.world_size > 1 else "python "
    return prefix + "experiments/compare_solvers.py" + ("" if not argv else " " + shlex.join(argv))


def write_markdown(path: str, settings: Settings, summary, rows, env, command: str, wall: Optional[float]) -> None:
    L = []
    L.append(f"# compare_solvers: {settings.dataset}\n")
    L.append(f"- Command: `{command}`")
    L.append(f"- Date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    hw = f"{env['cpu']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads per process"
    if env.get("gpu"):
        hw += f"; GPU {env['gpu']}"
    L.append(f"- Device: {env['device']} ({hw}); processes: {env['world_size']}")
    L.append(f"- Versions: python {env['python']}, torch {env['torch']}, odenet {env['odenet']}, numpy {env['numpy']}"
             + (f", mnist1d {env['mnist1d']}" if settings.dataset == "mnist1d" and env.get("mnist1d") else "")
             + (f", scikit-learn {env['scikit_learn']}" if settings.dataset == "digits" and env.get("scikit_learn") else ""))
    L.append(f"- Data: {rows[0].get('data_description', settings.dataset) if rows else settings.dataset}")
    L.append(f"- Training: {settings.epochs} epochs, batch {settings.batch_size}, AdamW lr {settings.lr:g} (one-cycle), "
             f"weight decay {settings.weight_decay:g}, seeds {','.join(map(str, settings.seeds))}")
    if wall is not None:
        L.append(f"- Wall time of this invocation: {wall / 60:.1f} min (runs resumed from results.jsonl are not retrained)")
    L.append("")
    L.append("| run | residual part | test acc. % (mean ± std) | params | NFE fwd | NFE bwd | steps acc./rej. (fwd) "
             "| act. memory MiB/step | peak CUDA MiB | train s/epoch | infer ms/batch |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        steps = f"{s['n_accepted']:.1f}/{s['n_rejected']:.1f}"
        if s["n_accepted_backward"]:
            steps += f" (bwd {s['n_accepted_backward']:.1f}/{s['n_rejected_backward']:.1f})"
        acc = f"{100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_std']:.2f}" if s["seeds"] > 1 else f"{100 * s['accuracy_mean']:.2f}"
        L.append(f"| {s['run']} | {s['residual']} | {acc} (n={s['seeds']}) "
                 f"| {s['params']:,} | {s['nfe_forward']:.1f} | {s['nfe_backward']:.1f} | {steps} | {s['activation_mib']:.2f} "
                 f"| {_fmt(s['cuda_peak_mib'])} | {s['train_seconds_per_epoch']:.2f} | {s['inference_ms_per_batch']:.1f} |")
    L.append("")
    L.append("NFE: evaluations of f per training batch, forward and backward, mean over the last epoch (a ResNet block "
             "is one evaluation; direct backpropagation replays the graph, 0 backward evaluations). Activation memory: "
             "bytes saved for backward by one training forward pass (parameters excluded), "
             "`odenet.measure.saved_tensors`. Inference: median time of one test batch of "
             f"{rows[0]['inference_batch'] if rows else settings.batch_size} examples.")
    L.append("")
    tl = targets(settings, summary, rows)
    if tl:
        L.append("## Targets\n")
        L.extend(f"- {t}" for t in tl)
        L.append("")
    labels, table = cross_eval_table(settings, rows)
    if table:
        L.append("## Cross-evaluation: each trained f under other solvers (test accuracy %, NFE per forward)\n")
        L.append("| solver | " + " | ".join(table) + " |")
        L.append("|---|" + "---:|" * len(table))
        for lab in labels:
            cells = []
            for name in table:
                acc, nfe = table[name].get(lab, (float("nan"), float("nan")))
                cells.append("failed" if not math.isfinite(acc) else f"{100 * acc:.1f} ({nfe:.0f})")
            L.append(f"| {lab} | " + " | ".join(cells) + " |")
        L.append("")
        L.append("The untied `resnet` is re-read as an ODE whose field is its i-th block's f on the i-th sixth of "
                 "[0, 1]; `euler x6` reproduces it exactly.")
        L.append("")
    L.append("Plots: `pareto.png` (accuracy vs NFE), `memory.png` (activation memory per method, and against NFE), "
             "`nfe_training.png` (NFE over training), `cross_eval.png` (cross-evaluation curves).")
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")


def write_plots(out: str, settings: Settings, summary, rows) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {s["run"]: f"C{i % 10}" for i, s in enumerate(summary)}
    labels, table = cross_eval_table(settings, rows)

    # accuracy vs NFE (Pareto): trained settings large, cross-evaluations small
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        c = colors[s["run"]]
        test_nfe = _mean_std([r["test_nfe_forward"] for r in rows if r["run"] == s["run"]])[0]
        ax.errorbar([test_nfe], [100 * s["accuracy_mean"]], yerr=[100 * s["accuracy_std"]], fmt="o", ms=8, color=c, label=s["run"])
        if s["run"] in table:
            pts = [(n, 100 * a) for a, n in table[s["run"]].values() if math.isfinite(a)]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=c, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xlabel("function evaluations per forward pass")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{settings.dataset}: accuracy vs NFE (large: as trained; small: cross-evaluated)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pareto.png"), dpi=120)
    plt.close(fig)
    written.append("pareto.png")

    # activation memory per method, and against NFE
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.bar(range(len(summary)), [s["activation_mib"] for s in summary], color=[colors[s["run"]] for s in summary])
    a1.set_xticks(range(len(summary)))
    a1.set_xticklabels([s["run"] for s in summary], rotation=30, ha="right", fontsize=8)
    a1.set_ylabel("activation memory per training step (MiB)")
    a1.set_title("saved for backward, as trained")
    seed0 = min(settings.seeds)
    for s in summary:
        pts = sorted((m["nfe_forward"], m["bytes"] / 2**20) for r in rows if r["run"] == s["run"] and r["seed"] == seed0
                     for m in r.get("memory_sweep") or [] if m.get("ok"))
        if pts:
            a2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[s["run"]], label=s["run"])
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("function evaluations per forward pass")
    a2.set_ylabel("MiB saved for backward")
    a2.set_title("against NFE (own gradient method; other tolerances or steps)", fontsize=10)
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "memory.png"), dpi=120)
    plt.close(fig)
    written.append("memory.png")

    # NFE over training (mean over seeds)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in summary:
        hist = [r["history"] for r in rows if r["run"] == s["run"]]
        n = min(len(h) for h in hist)
        ep = list(range(1, n + 1))
        fwd = [statistics.fmean(h[i]["nfe_forward"] for h in hist) for i in range(n)]
        bwd = [statistics.fmean(h[i]["nfe_backward"] for h in hist) for i in range(n)]
        ax.plot(ep, fwd, "-", color=colors[s["run"]], label=f"{s['run']} fwd")
        if any(bwd):
            ax.plot(ep, bwd, "--", color=colors[s["run"]], label=f"{s['run']} bwd")
    ax.set_xlabel("epoch")
    ax.set_ylabel("NFE per batch (mean over the epoch)")
    ax.set_title("function evaluations over training")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "nfe_training.png"), dpi=120)
    plt.close(fig)
    written.append("nfe_training.png")

    # cross-evaluation curves
    if table:
        names = list(table)
        cols = min(3, len(names))
        nrows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
        for ax, name in zip(axes.flat, names):
            for solver, style in (("euler", "o-"), ("rk4", "s-"), ("dopri5", "^-")):
                pts = sorted((n, 100 * a) for lab, (a, n) in table[name].items() if lab.startswith(solver + " ") and math.isfinite(a))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=solver)
            s = next(x for x in summary if x["run"] == name)
            ax.axhline(100 * s["accuracy_mean"], color="gray", lw=0.8, ls=":", label="as trained")
            ax.set_xscale("log")
            ax.set_title(f"{name} ({s['residual']})", fontsize=8)
            ax.set_xlabel("NFE per forward")
            ax.grid(alpha=0.3)
        for ax in axes[:, 0]:
            ax.set_ylabel("test accuracy %")
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{settings.dataset}: trained f re-evaluated under other solvers")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "cross_eval.png"), dpi=120)
        plt.close(fig)
        written.append("cross_eval.png")
    return written


def write_outputs(settings: Settings, rows, env, argv, info, wall) -> None:
    out = settings.out_dir
    summary = summarise(settings, rows)
    if not summary:
        return
    write_csv(os.path.join(out, "results.csv"), summary)
    write_markdown(os.path.join(out, "results.md"), settings, summary, rows, env, command_line(argv, info), wall)
    write_plots(out, settings, summary, rows)


# ---------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    t_wall = time.perf_counter()
    # Setup: any problem with the flags, the device or the data is one line on stderr, exit 2.
    info = None
    try:
        settings = parse_settings(argv)
        import torch

        from odenet.data import load_dataset
        from odenet.training import setup_distributed

        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        info = setup_distributed(settings.device)
        opts = {"dim": settings.spheres_dim} if settings.dataset == "spheres" else {}
        try:
            data = load_dataset(settings.dataset, data_dir=settings.data_dir, **opts)
        except ImportError as err:  # an optional data package is missing: say which
            raise UsageError(str(err)) from None
    except (UsageError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    try:
        return _run(settings, data, info, argv, t_wall)
    finally:
        from odenet.training import cleanup_distributed

        cleanup_distributed()


def _run(settings: Settings, data, info, argv, t_wall) -> int:
    import torch.distributed as dist

    if settings.limit_train:
        data.x_train, data.y_train = data.x_train[: settings.limit_train], data.y_train[: settings.limit_train]
    if settings.limit_test:
        data.x_test, data.y_test = data.x_test[: settings.limit_test], data.y_test[: settings.limit_test]
    out = settings.out_dir
    path = os.path.join(out, "results.jsonl")
    env = None
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        if settings.fresh:
            for name in ("results.jsonl", "results.csv", "results.md", "pareto.png", "memory.png", "nfe_training.png", "cross_eval.png"):
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
        earlier = read_results(path)
    # rank 0 decides what is done; everyone follows
    wanted = [(run, seed) for run in settings.runs for seed in settings.seeds]
    keys = {result_key(settings, r, s): (r, s) for r, s in wanted}
    done_keys: List[str] = []
    if info.is_main:
        done_keys = [row["key"] for row in earlier if row.get("key") in keys]
    if info.distributed:
        box = [done_keys]
        dist.broadcast_object_list(box, src=0)
        done_keys = box[0]
    done = set(done_keys)
    todo = [(r, s) for r, s in wanted if result_key(settings, r, s) not in done]
    env = environment(info, settings)
    if info.is_main:
        other = sum(1 for row in earlier if row.get("key") not in keys)
        print(f"{PROG}: {data.name} ({data.num_train} train / {data.num_test} test), runs {','.join(settings.runs)}, "
              f"seeds {','.join(map(str, settings.seeds))}, {settings.epochs} epochs, device {info.device}"
              f"{f' x{info.world_size} processes' if info.distributed else ''}; "
              f"{len(wanted) - len(todo)} of {len(wanted)} already in {path}"
              + (f" ({other} earlier lines for other settings are kept but left out)" if other else ""), flush=True)
    bars = Bars(info.is_main)
    run_bar = bars.runs(len(todo))
    for i, (name, seed) in enumerate(todo, 1):
        row = run_one(settings, data, name, seed, info, env, bars)
        if info.is_main:
            row["data_description"] = data.description
            append_result(path, row)
            run_bar.update(1)
            print(f"[{i}/{len(todo)}] {name} seed {seed}: test acc {100 * row['test_accuracy']:.2f}%, "
                  f"NFE {row['nfe_forward']:.1f}/{row['nfe_backward']:.1f}, {row['train_seconds_per_epoch']:.2f} s/epoch, "
                  f"activation {row['activation_bytes'] / 2**20:.2f} MiB", flush=True)
    run_bar.close()
    if info.is_main:
        latest = {row["key"]: row for row in read_results(path) if row.get("key") in keys}  # last line wins
        rows = [latest[k] for k in keys if k in latest]
        write_outputs(settings, rows, env, argv, info, time.perf_counter() - t_wall if todo else None)
        print(f"{PROG}: wrote {os.path.join(out, 'results.md')} ({time.perf_counter() - t_wall:.0f} s)", flush=True)
        with open(os.path.join(out, "results.md")) as fh:
            table = [l for l in fh.read().splitlines() if l.startswith("|")]
        print("\n".join(table[: 2 + len(settings.runs)]))
    if info.distributed:
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
