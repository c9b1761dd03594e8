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
`results.csv`, `results.md` and plots. See `--help` for every flag. The data sets, the model
presets and the training loops are in `experiments/kit/`, with the skeleton every experiment
script shares (settings -> command line, environment record, results files, resume).
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from kit.data import load_dataset
from kit.models import PRESETS, ResidualSpec, build_model, check_solver_settings, count_parameters
from kit.skeleton import (Bars, UsageError, append_jsonl, build_parser as _build_parser, command_line, digest, environment,
                          key_fields, opt, parse_config, read_jsonl, save_figure, usage_error)
from kit.training import (activation_bytes, activation_sweep, cleanup_distributed, cross_evaluate,
                          default_cross_eval_configs, evaluate, inference_time, setup_distributed, train,
                          training_step_peak_cuda)

PROG = "compare_solvers.py"

# ---------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Everything a comparison depends on. The fields not declared `key=False`, with the run's
    spec and the seed, make the resume key: a finished run is reused only when they all match."""

    dataset: str = opt("mnist1d", "data set; all offline: mnist reads IDX files from --data-dir",
                       choices=["mnist1d", "digits", "spheres", "mnist"])
    data_dir: Optional[str] = opt(None, "folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                                  "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (raw or .gz); --dataset mnist only",
                                  key=False, metavar="DIR", default_text="none")
    spheres_dim: int = opt(2, "dimension of the concentric-spheres points (--dataset spheres only)", minimum=1, metavar="D")
    runs: Tuple[str, ...] = opt((), "comma-separated runs to train, in order: presets below or names defined with --run",
                                key=False, metavar="NAMES",
                                default_text="every preset, or only the --run runs when --run is given; 'all' = every preset")
    run: Tuple[str, ...] = opt((), "define a run or change a preset, e.g. ode-net:tol=1e-4 or "
                               "my-net:solver=tsit5,gradient=adjoint (repeatable; keys below)",
                               key=False, action="append", metavar="NAME[:KEY=VALUE,...]", default_text="none")
    specs: Dict[str, Dict[str, Any]] = opt({}, "run name -> ResidualSpec fields (from --runs and --run)", key=False, cli=False)
    seeds: Tuple[int, ...] = opt((0, 1, 2), "comma-separated seeds, one training per run and seed; accuracy is mean ± std "
                                 "over them", key=False, metavar="S,S,...")
    epochs: int = opt(15, "training epochs per run", minimum=1)
    batch_size: int = opt(100, "global batch size (split across processes under torchrun)", minimum=1)
    lr: float = opt(1e-2, "peak learning rate of AdamW's one-cycle schedule", positive=True)
    weight_decay: float = opt(1e-4, "AdamW weight decay", minimum=0)
    width: Optional[int] = opt(None, "channels/features of the residual state", minimum=1, default_text="32")
    limit_train: Optional[int] = opt(None, "use only the first N training examples", minimum=1, metavar="N",
                                     default_text="all")
    limit_test: Optional[int] = opt(None, "use only the first N test examples", minimum=1, metavar="N", default_text="all")
    cross_eval: bool = opt(True, "re-evaluate each trained f under the solvers below (--no-cross-eval skips it)")
    euler_steps: Tuple[int, ...] = opt((1, 2, 3, 4, 6, 8, 12, 16, 24, 32), "cross-evaluation: Euler step counts",
                                       minimum=1, metavar="N,N,...")
    rk4_steps: Tuple[int, ...] = opt((1, 2, 4, 8), "cross-evaluation: RK4 step counts", minimum=1, metavar="N,N,...")
    dopri5_tols: Tuple[float, ...] = opt((1e-1, 1e-2, 1e-3, 1e-4, 1e-5), "cross-evaluation: dopri5 tolerances, rtol = atol",
                                         metavar="TOL,...")
    device: str = opt("auto", "auto = CUDA when available", key=False, choices=["auto", "cpu", "cuda"])
    threads: int = opt(1, "torch CPU threads per process (1: fastest for these small models, and robust when other "
                       "jobs share the CPU; 0 = torch's default)", key=False, minimum=0)
    out: Optional[str] = opt(None, "output folder", key=False, metavar="DIR", default_text="results/compare_solvers/<dataset>/")
    fresh: bool = opt(False, "delete earlier results in --out and start over (otherwise: resume)", key=False)

    @property
    def out_dir(self) -> str:
        return self.out or os.path.join("results", "compare_solvers", self.dataset)

    def key_fields(self) -> Dict[str, Any]:
        """The settings (besides run and seed) a result depends on."""
        d = key_fields(self)
        if self.dataset != "spheres":
            del d["spheres_dim"]
        return d


QUICK = dict(epochs=3, seeds=(0,), euler_steps=(1, 2, 4, 6, 12, 24), rk4_steps=(1, 2, 4), dopri5_tols=(1e-1, 1e-3, 1e-5))

SPEC_KEYS = {
    "solver": "solver name (euler, midpoint, heun, rk4, bosh3, dopri5, tsit5, dopri8)",
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
        try:
            adaptive = check_solver_settings(given["solver"])
        except (ValueError, TypeError):  # an unknown name: ResidualSpec names it below
            adaptive = None
        if adaptive is not None:
            drop = ("steps",) if adaptive else ("rtol", "atol", "max_steps", "adjoint_rtol", "adjoint_atol")
            for k in drop:
                if k not in given:
                    base[k] = None
            if adaptive and "rtol" not in given and base.get("rtol") is None:
                base["rtol"] = base["atol"] = 1e-3
    base.update(given)
    return name, base


def build_parser():
    preset_lines = "\n".join(f"  {name:<20} {spec.describe()}" for name, spec in PRESETS.items())
    key_lines = "\n".join(f"  {k:<13} {v}" for k, v in SPEC_KEYS.items())
    return _build_parser(
        Settings, prog=PROG, quick=QUICK,
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


def check(s: Settings) -> None:
    """Check the data flags and resolve `runs` and `--run` into `s.runs` and `s.specs`."""
    if s.data_dir is not None and s.dataset != "mnist":
        raise UsageError(f"--data-dir is read by --dataset mnist only; {s.dataset} is built in (leave --data-dir out)")
    if s.dataset == "mnist" and s.data_dir is None:
        raise UsageError("--dataset mnist reads the four MNIST IDX files from --data-dir DIR; give --data-dir")
    defined: Dict[str, Dict[str, Any]] = {}
    for text in s.run:
        name, spec = parse_run(text, PRESETS)
        if name in defined:
            raise UsageError(f"--run {name} is given twice")
        defined[name] = spec
    if not s.runs:
        names = list(defined) if defined else list(PRESETS)
    else:
        names = []
        for n in s.runs:
            names.extend(PRESETS if n == "all" else [n])
        names.extend(n for n in defined if n not in names)
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


def parse_settings(argv: Sequence[str]) -> Settings:
    """Command line -> validated `Settings`. Raises `UsageError` with a one-line message."""
    return parse_config(Settings, list(argv), parser=build_parser(), quick=QUICK, check=check)


# ---------------------------------------------------------------------------- one run


def result_key(settings: Settings, run: str, seed: int) -> str:
    """A digest of everything a (run, seed) result depends on."""
    return digest(dict(settings.key_fields(), run=run, spec=settings.specs[run], seed=seed))


def run_one(settings: Settings, data, name: str, seed: int, info, env: Dict[str, Any], bars) -> Optional[Dict[str, Any]]:
    """Train and measure one (run, seed). Every process trains; rank 0 measures and returns the row."""
    import torch
    import torch.distributed as dist

    spec = ResidualSpec(**settings.specs[name])
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    model = build_model(data.input_shape, data.num_classes, spec, width=settings.width).to(info.device)
    epoch_bar = bars.make(total=settings.epochs, desc=f"{name} seed {seed}", unit="epoch", position=1, leave=False)

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


def write_markdown(path: str, settings: Settings, summary, rows, env, command: str, wall: Optional[float]) -> None:
    L = []
    L.append(f"# compare_solvers: {settings.dataset}\n")
    L.append(f"- Command: `{command}`")
    L.append(f"- Date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    hw = f"{env['cpu']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads per process"
    if env.get("gpu"):
        hw += f"; GPU {env['gpu']}"
    L.append(f"- Device: {env['device']} ({hw}); processes: {env['world_size']}")
    if env.get("commit"):
        L.append(f"- Commit: `{env['commit']}`")
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
    """The four figures, drawn through `odenet.plotting` where it has the plot."""
    from matplotlib.figure import Figure

    from odenet import plotting

    written = []

    def save(fig, name):
        save_figure(fig, name, out=out, dpi=120)
        written.append(name)

    colors = {s["run"]: f"C{i % 10}" for i, s in enumerate(summary)}  # odenet.plotting's palette is tab10 too
    labels, table = cross_eval_table(settings, rows)

    # accuracy vs NFE (Pareto): trained settings large, cross-evaluations small
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    points = [dict(label=s["run"], nfe=_mean_std([r["test_nfe_forward"] for r in rows if r["run"] == s["run"]])[0],
                   accuracy=100 * s["accuracy_mean"], accuracy_std=100 * s["accuracy_std"]) for s in summary]
    plotting.plot_pareto(points, x="nfe", y="accuracy", logx=True, connect=False, ax=ax)
    for s in summary:
        if s["run"] in table:
            pts = [(n, 100 * a) for a, n in table[s["run"]].values() if math.isfinite(a)]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=colors[s["run"]], alpha=0.4)
    ax.set_xlabel("function evaluations per forward pass")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{settings.dataset}: accuracy vs NFE (large: as trained; small: cross-evaluated)", fontsize=10)
    save(fig, "pareto.png")

    # activation memory per method, and against NFE
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    a1.bar(range(len(summary)), [s["activation_mib"] for s in summary], color=[colors[s["run"]] for s in summary])
    a1.set_xticks(range(len(summary)))
    a1.set_xticklabels([s["run"] for s in summary], rotation=30, ha="right", fontsize=8)
    a1.set_ylabel("activation memory per training step (MiB)")
    a1.set_title("saved for backward, as trained")
    seed0 = min(settings.seeds)
    sweep = [dict(label=s["run"], nfe=m["nfe_forward"], mib=m["bytes"] / 2**20) for s in summary for r in rows
             if r["run"] == s["run"] and r["seed"] == seed0 for m in r.get("memory_sweep") or [] if m.get("ok")]
    if sweep:
        plotting.plot_pareto(sweep, x="nfe", y="mib", y_higher_is_better=False, logx=True, logy=True, front=False, ax=a2)
    a2.set_xlabel("function evaluations per forward pass")
    a2.set_ylabel("MiB saved for backward")
    a2.set_title("against NFE (own gradient method; other tolerances or steps)", fontsize=10)
    save(fig, "memory.png")

    # NFE over training (mean over seeds)
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for s in summary:
        hist = [r["history"] for r in rows if r["run"] == s["run"]]
        n = min(len(h) for h in hist)
        series = [dict(epoch=i + 1, nfe_forward=statistics.fmean(h[i]["nfe_forward"] for h in hist),
                       nfe_backward=statistics.fmean(h[i]["nfe_backward"] for h in hist)) for i in range(n)]
        plotting.plot_nfe_over_training(series, x="epoch", label=s["run"], color=colors[s["run"]], ax=ax)
    ax.set_ylabel("NFE per batch (mean over the epoch)")
    ax.set_title("function evaluations over training", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    save(fig, "nfe_training.png")

    # cross-evaluation curves
    if table:
        names = list(table)
        cols = min(3, len(names))
        nrows = math.ceil(len(names) / cols)
        fig = Figure(figsize=(4.2 * cols, 3.4 * nrows), layout="constrained")
        axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
        for k, (ax, name) in enumerate(zip(axes.flat, names)):
            pts = [dict(label=lab.split(" ")[0], nfe=n, accuracy=100 * a) for lab, (a, n) in table[name].items()
                   if math.isfinite(a)]
            if pts:
                plotting.plot_pareto(pts, x="nfe", y="accuracy", logx=True, front=False, ax=ax)
            s = next(x for x in summary if x["run"] == name)
            ax.axhline(100 * s["accuracy_mean"], color="gray", lw=0.8, ls=":", label="as trained")
            ax.set_title(f"{name} ({s['residual']})", fontsize=8)
            ax.set_xlabel("NFE per forward")
            ax.set_ylabel("test accuracy %" if k % cols == 0 else "")
            if k == 0:
                ax.legend(fontsize=7)
            elif ax.get_legend() is not None:
                ax.get_legend().remove()
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(f"{settings.dataset}: trained f re-evaluated under other solvers")
        save(fig, "cross_eval.png")
    return written


def write_outputs(settings: Settings, rows, env, argv, info, wall) -> None:
    out = settings.out_dir
    summary = summarise(settings, rows)
    if not summary:
        return
    write_csv(os.path.join(out, "results.csv"), summary)
    write_markdown(os.path.join(out, "results.md"), settings, summary, rows, env,
                   command_line(PROG, argv, info.world_size), wall)
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

        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        info = setup_distributed(settings.device)
        opts = {"dim": settings.spheres_dim} if settings.dataset == "spheres" else {}
        try:
            data = load_dataset(settings.dataset, data_dir=settings.data_dir, **opts)
        except ImportError as err:  # an optional data package is missing: say which
            raise UsageError(str(err)) from None
    except (UsageError, ValueError, TypeError, FileNotFoundError) as err:
        return usage_error(PROG, err)
    try:
        return _run(settings, data, info, argv, t_wall)
    finally:
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
        earlier = read_jsonl(path)
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
    env = environment(info.device, info.world_size)
    if info.is_main:
        other = sum(1 for row in earlier if row.get("key") not in keys)
        print(f"{PROG}: {data.name} ({data.num_train} train / {data.num_test} test), runs {','.join(settings.runs)}, "
              f"seeds {','.join(map(str, settings.seeds))}, {settings.epochs} epochs, device {info.device}"
              f"{f' x{info.world_size} processes' if info.distributed else ''}; "
              f"{len(wanted) - len(todo)} of {len(wanted)} already in {path}"
              + (f" ({other} earlier lines for other settings are kept but left out)" if other else ""), flush=True)
    bars = Bars(info.is_main)
    run_bar = bars.make(total=len(todo), desc="runs", unit="run", position=0)
    for i, (name, seed) in enumerate(todo, 1):
        row = run_one(settings, data, name, seed, info, env, bars)
        if info.is_main:
            row["data_description"] = data.description
            append_jsonl(path, row)
            run_bar.update(1)
            print(f"[{i}/{len(todo)}] {name} seed {seed}: test acc {100 * row['test_accuracy']:.2f}%, "
                  f"NFE {row['nfe_forward']:.1f}/{row['nfe_backward']:.1f}, {row['train_seconds_per_epoch']:.2f} s/epoch, "
                  f"activation {row['activation_bytes'] / 2**20:.2f} MiB", flush=True)
    run_bar.close()
    if info.is_main:
        latest = {row["key"]: row for row in read_jsonl(path) if row.get("key") in keys}  # last line wins
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
