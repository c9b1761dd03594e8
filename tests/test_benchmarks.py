"""Smoke test of benchmarks/bench_solvers.py: its smallest configuration runs in seconds and
writes JSON and markdown with the fields the docs and the lead's tables rely on. Also
benchmarks/loop_overhead.py, and benchmarks/gpu_run.py with `--device cpu` (the GPU command's pieces, tiny).

Timings are not checked (this is not a timed test); counts, structure and the memory
behaviour that does not depend on the machine are.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import odenet

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_solvers.py"

RECORD_FIELDS = {
    "mode", "size", "size_label", "solver", "library", "gradient", "steps", "seminorm", "train", "t_end",
    "nfe_forward", "nfe_forward_graph", "nfe_backward", "n_accepted", "n_rejected", "n_accepted_backward", "n_rejected_backward",
    "time_s", "times_s", "t_f_s", "t_fb_s", "floor_s", "overhead", "ratio_to", "host_reads", "host_reads_per_step",
    "saved_bytes", "cuda_peak_bytes", "y_rel_diff_vs_ref", "grad_rel_diff_vs_ref", "error",
}
ENV_FIELDS = {"command", "cpu_model", "threads", "device", "torch", "odenet", "torchdiffeq", "torchode", "date"}
MODES = ("forward", "train-direct", "train-adjoint", "train-checkpoint", "fixed", "memory", "seminorm")


def _load():
    spec = importlib.util.spec_from_file_location("bench_solvers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_solvers"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick"
    argv = ["--quick", "--out", str(out), "--repeats", "1", "--f-time", "0.01"]
    result = bench.main(argv)
    data = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    return result, data, md


def check_output(data: dict) -> None:
    """Everything the smoke test requires of the JSON; raises AssertionError otherwise."""
    assert {"environment", "config", "sizes", "results", "summary"} <= set(data), sorted(data)
    assert ENV_FIELDS <= set(data["environment"]), ENV_FIELDS - set(data["environment"])
    assert data["environment"]["threads"] == 1
    for name, size in data["sizes"].items():
        assert size["t_f_s"] > 0 and size["t_fb_s"] > 0, (name, size)
    rows = data["results"]
    assert rows, "no results"
    for r in rows:
        missing = RECORD_FIELDS - set(r)
        assert not missing, (r.get("mode"), r.get("library"), missing)
    modes = {r["mode"] for r in rows}
    assert set(MODES) <= modes, set(MODES) - modes

    for r in rows:
        if r["library"] == "odenet":  # odenet must run every case
            assert r["error"] is None, (r["mode"], r["solver"], r["gradient"], r["error"])
        if r["error"] is None:
            assert r["time_s"] is not None and r["time_s"] > 0, r
            assert r["nfe_forward"] and r["nfe_forward"] > 0, r
            assert r["n_accepted"] and r["n_accepted"] > 0, r

    fwd = [r for r in rows if r["mode"] == "forward"]
    assert {r["library"] for r in fwd} == {"odenet", "torchdiffeq", "torchode"}
    for r in fwd:
        assert r["error"] is None, (r["library"], r["error"])
        assert math.isclose(r["overhead"], r["time_s"] / (r["nfe_forward"] * r["t_f_s"]), rel_tol=1e-9)
        assert r["host_reads"] is not None
        if r["library"] != "odenet":  # same problem: states agree to the tolerance
            assert r["y_rel_diff_vs_ref"] < 1e-2, r
            assert set(r["ratio_to"]) == {"odenet", "torchdiffeq", "torchode"} - {r["library"]}

    for mode in ("train-direct", "train-adjoint", "train-checkpoint"):
        ode = [r for r in rows if r["mode"] == mode and r["library"] == "odenet"]
        assert ode and all(r["saved_bytes"] is not None and r["overhead"] > 0 for r in ode), mode
    adj = [r for r in rows if r["mode"] == "train-adjoint" and r["library"] == "odenet"]
    assert all(r["nfe_backward"] > 0 for r in adj)
    for r in rows:  # which forward evaluations were recorded for backprop (the training floor uses it)
        if r["mode"].startswith("train-") and r["library"] == "odenet":
            expect_graph = r["gradient"] == "direct"
            assert (r["nfe_forward_graph"] > 0) == expect_graph, (r["mode"], r["nfe_forward_graph"])
    for r in rows:
        if r["mode"].startswith("train-") and r["library"] != "odenet" and r["error"] is None:
            assert r["grad_rel_diff_vs_ref"] < 1e-2, (r["mode"], r["library"], r["grad_rel_diff_vs_ref"])

    fixed = [r for r in rows if r["mode"] == "fixed"]
    libs = {r["library"] for r in fixed}
    assert {"odenet", "hand"} <= libs, libs
    for r in fixed:
        if r["library"] == "odenet":
            assert "hand" in r["ratio_to"], r
            assert r["nfe_forward"] == r["steps"] * (1 if r["solver"] == "euler" else 4), r
            assert r["host_reads_per_step"] is not None

    mem = [r for r in rows if r["mode"] == "memory" and r["library"] == "odenet"]
    steps = sorted({r["steps"] for r in mem})
    assert len(steps) >= 2
    by = {(r["gradient"], r["steps"]): r["saved_bytes"] for r in mem}
    lo, hi = steps[0], steps[-1]
    assert by[("adjoint", lo)] == by[("adjoint", hi)], "adjoint activation memory must not grow with steps"
    assert by[("direct", hi)] > by[("direct", lo)], "direct activation memory must grow with steps"
    assert 0 < by[("checkpoint", hi)] - by[("checkpoint", lo)] < by[("direct", hi)] - by[("direct", lo)]

    semi = [r for r in rows if r["mode"] == "seminorm"]
    assert {(r["library"], r["seminorm"]) for r in semi} >= {("odenet", False), ("odenet", True)}
    assert all(r["nfe_backward"] > 0 for r in semi if r["error"] is None)
    assert "targets" in data["summary"] and "seminorm_median_reduction" in data["summary"]


def test_quick_run_writes_complete_json(quick):
    result, data, _ = quick
    check_output(data)
    assert len(result["results"]) == len(data["results"])


def test_quick_run_writes_markdown_tables(quick):
    _, data, md = quick
    for heading in ("## Forward solve", "## Training step", "## Fixed step", "## Activation memory",
                    "## Seminorm adjoint", "## Time of one f"):
        assert heading in md, heading
    assert data["environment"]["command"] in md
    assert "| odenet |" in md


def test_check_output_rejects_broken_results(quick):
    """The checker above must be able to fail: it rejects a missing field, a failed odenet
    case and an adjoint whose memory grows."""
    _, data, _ = quick
    broken = copy.deepcopy(data)
    del broken["results"][0]["overhead"]
    with pytest.raises(AssertionError):
        check_output(broken)
    broken = copy.deepcopy(data)
    next(r for r in broken["results"] if r["library"] == "odenet")["error"] = "RuntimeError: boom"
    with pytest.raises(AssertionError):
        check_output(broken)
    broken = copy.deepcopy(data)
    rows = [r for r in broken["results"] if r["mode"] == "memory" and r["library"] == "odenet" and r["gradient"] == "adjoint"]
    rows[-1]["saved_bytes"] += 1
    with pytest.raises(AssertionError):
        check_output(broken)


def test_every_flag_has_help(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--sizes", "--modes", "--solvers", "--repeats", "--threads", "--device", "--out", "--quick",
                 "--fixed-steps", "--memory-steps", "--compile", "--libraries"):
        assert flag in text, flag
    parser_actions = [a for a in bench.build_parser()._actions if a.option_strings]
    assert all(a.help for a in parser_actions), [a.option_strings for a in parser_actions if not a.help]


@pytest.mark.parametrize("argv", [["--sizes", "huge"], ["--modes", "forward,bogus"], ["--solvers", "euler"],
                                  ["--repeats", "0"], ["--libraries", "torchdiffeq"], ["--loss-scale", "0"],
                                  ["--loss-scale", "nan"]])
def test_bad_arguments_are_rejected(bench, argv):
    with pytest.raises((SystemExit, ValueError)):
        bench.parse_args(argv + ["--no-write"])


def test_size_specs(bench):
    s = bench.parse_size("mlp:8x3x5")
    assert (s.kind, s.shape, s.hidden) == ("mlp", (8, 3), 5)
    s = bench.parse_size("conv:2x4x6x6")
    assert (s.kind, s.shape, s.hidden) == ("conv", (2, 4, 6, 6), 4)
    assert bench.parse_size("medium").shape == (256, 64)


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_loop_overhead_runs(solver, capsys):
    """benchmarks/loop_overhead.py: checks its two loops agree, then prints one row per phase."""
    path = SCRIPT.parent / "loop_overhead.py"
    spec = importlib.util.spec_from_file_location("loop_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--solver", solver, "--steps", "3", "--repeats", "1", "--inner", "1", "--shape", "4x3"])
    assert set(out) == {"forward", "train"}
    assert all(v["odenet_s"] > 0 and v["hand_s"] > 0 for v in out.values())
    text = capsys.readouterr().out
    assert f"`python benchmarks/loop_overhead.py --solver {solver} --steps 3" in text
    assert text.count("| forward |") == 1 and text.count("| train |") == 1
    with pytest.raises(SystemExit):
        mod.main(["--shape", "4by3"])


def _loop_overhead():
    spec = importlib.util.spec_from_file_location("loop_overhead", SCRIPT.parent / "loop_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loop_overhead_ablate_prints_each_special_path(capsys):
    out = _loop_overhead().main(["--ablate", "--steps", "3", "--repeats", "2", "--inner", "1", "--shape", "4x3"])
    assert set(out) == {"forward", "train"} and len(out["forward"]) == 3
    text = capsys.readouterr().out
    assert all(f"| {name} |" in text for name in out["forward"])


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4", "dopri5-fixed", "bosh3-fixed"])
@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
def test_the_loops_special_paths_change_nothing_but_time(solver, gradient):
    """Each path `--ablate` switches off is an optimisation only: with it off, the same solution,
    gradient and counts (forward and backward; FSAL methods hand a stage on, which the loop's own
    count of direct calls must see); switching it back restores it."""
    integrate = importlib.import_module("odenet.solvers.integrate")
    name, _, fixed = solver.partition("-")
    solver = odenet.solvers.SOLVERS[name](**({"adaptive": False} if fixed else {}))
    before = (integrate._stage_times, integrate.CountedFunc.bare, solver._single)
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    y0 = torch.randn(4, 3, dtype=torch.float64)
    f.double()

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = f

        def forward(self, t, y):
            return self.f(y) * torch.cos(t)

    def run():
        sol = odenet.odeint(F(), y0, [0.0, 0.5, 1.0], solver=solver, steps=6, gradient=gradient)
        grad = torch.autograd.grad(sol.ys[-1].sum(), f[0].weight)[0]
        s = sol.stats
        return sol.ys, grad, (s.nfe_forward, s.nfe_backward, s.n_accepted)

    ref = run()
    for path, switch_off in _loop_overhead()._ablations(solver).items():
        undo = switch_off()
        got = run()
        undo()
        assert torch.equal(got[0], ref[0]), path
        torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=0, msg=path)
        assert got[2] == ref[2], path
    assert ref[2][0] >= 6 and ref[2][2] == 6
    assert (integrate._stage_times, integrate.CountedFunc.bare, solver._single) == before


def test_torchdiffeq_switch_runs_every_way_on_the_same_task(capsys):
    """benchmarks/torchdiffeq_switch.py: every way trains the same f on the same batches, so the
    losses agree (to the solvers' tolerance); the table has a row per way."""
    spec = importlib.util.spec_from_file_location("torchdiffeq_switch", SCRIPT.parent / "torchdiffeq_switch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--rounds", "1", "--iters", "2"])
    assert set(out) == set(mod.WAYS)
    losses = [r["loss"] for r in out.values()]
    assert max(losses) - min(losses) < 1e-4 and all(r["nfe"] > 0 and r["seconds"] > 0 for r in out.values())
    text = capsys.readouterr().out
    assert "`python benchmarks/torchdiffeq_switch.py --rounds 1 --iters 2`" in text
    assert all(f"| `{name}` |" in text for name in mod.WAYS)


def test_loss_scale_multiplies_the_training_gradients(bench):
    """`--loss-scale` scales the loss, so every gradient of a training step scales with it
    (backprop through the solver: the adjoint's steps could change with the gradients' size)."""
    grads = []
    for scale in ("1", "100"):
        cfg, _ = bench.parse_args(["--quick", "--no-write", "--loss-scale", scale])
        prob = bench.make_problem(bench.parse_size("tiny"), cfg)
        solve = bench.build_odenet(prob, "dopri5", "direct", None, cfg)
        bench.make_unit(solve, prob, train=True)()
        grads.append(torch.cat([p.grad.reshape(-1) for p in prob.params]))
    torch.testing.assert_close(grads[1], 100 * grads[0], rtol=1e-4, atol=1e-7)


def test_output_prefix_keeps_its_dots(bench):
    assert bench._out_paths("results/run_loss0.01") == (Path("results/run_loss0.01.json"), Path("results/run_loss0.01.md"))
    assert bench._out_paths("results/run.json") == (Path("results/run.json"), Path("results/run.md"))


# ---------------------------------------------------------------------------- benchmarks/gpu_run.py

GPU_RUN = SCRIPT.parent / "gpu_run.py"


@pytest.fixture(scope="module")
def gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", GPU_RUN)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_run"] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def test_gpu_run_on_cpu_fills_every_piece(tmp_path):
    """`gpu_run.py --device cpu` (tiny) runs every piece but the CUDA tests, which it skips with the reason,
    and writes a manifest naming the device, the versions and each piece's command and outcome."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(GPU_RUN), "--device", "cpu", "--out", str(out), "--budget", "300"],
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert (m["device"], m["scale"], m["interrupted"]) == ("cpu", "tiny", False)
    assert m["device_name"] and m["device_name"] == m["cpu_model"] and m["finished"]
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["odenet"] and m["versions"]["torchdiffeq"]
    pieces = m["pieces"]
    assert list(pieces) == ["cuda-tests", "bench-tiny", "bench-conv-tiny", "bench-memory", "compare-solvers"]
    assert pieces["cuda-tests"]["status"] == "skipped" and "CUDA" in pieces["cuda-tests"]["reason"]
    for name, e in pieces.items():
        assert e["command"].startswith("python "), e
        if name != "cuda-tests":
            assert e["status"] == "passed", (name, e)
            assert (out / e["log"]).read_text().startswith("$ python "), name
            assert all((out / f).exists() for f in e["results"]["files"]), e
    assert "--device cpu" in pieces["compare-solvers"]["command"]
    assert pieces["compare-solvers"]["results"]["runs"] == 2  # resnet and ode-net, one seed

    # the three bench pieces together hold every mode, as one --quick run does
    parts = [json.loads((out / "bench" / f"{s}.json").read_text()) for s in ("tiny", "conv-tiny", "memory")]
    merged = dict(parts[0], results=[r for p in parts for r in p["results"]])
    check_output(merged)
    assert {r["size"] for r in parts[1]["results"]} == {"conv-tiny"}
    assert all(r["cuda_peak_bytes"] is None and r["library"] != "odenet+cudagraph" for r in merged["results"])
    summary = (out / "summary.md").read_text()
    assert m["device_name"] in summary and all(f"| {name} |" in summary for name in pieces)


def _pieces(gpu_run, tmp_path, *specs):
    """Pieces running `python -c CODE`, each named."""
    return [gpu_run.Piece(name, ["python", "-c", code]) for name, code in specs]


def _manifest(gpu_run, pieces, budget):
    import argparse

    args = argparse.Namespace(device="cpu", scale="tiny", budget=budget)
    return gpu_run.new_manifest(args, [], {}, pieces)


def test_gpu_run_piece_failures_and_timeouts_do_not_stop_the_run(gpu_run, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_run, "MIN_SHARE_S", 0.5)
    pieces = _pieces(gpu_run, tmp_path, ("fails", "raise SystemExit(3)"), ("ok", "print('hello')"),
                     ("hangs", "import time; time.sleep(60)"))
    (tmp_path / "logs").mkdir()
    m = gpu_run.run_pieces(pieces, _manifest(gpu_run, pieces, 6), tmp_path, 6)
    status = {k: (e["status"], e.get("returncode")) for k, e in m["pieces"].items()}
    assert status["fails"] == ("failed", 3) and status["ok"] == ("passed", 0) and status["hangs"][0] == "timeout"
    assert "hello" in (tmp_path / "logs" / "ok.log").read_text()
    assert json.loads((tmp_path / "manifest.json").read_text())["pieces"] == json.loads(json.dumps(m["pieces"]))


def test_gpu_run_keeps_what_was_written_when_interrupted(gpu_run, tmp_path):
    """SIGTERM while a piece runs: that piece is stopped and marked interrupted, the ones before keep their
    records, the ones after are marked not run."""
    code = f"""
import sys, signal, importlib.util
spec = importlib.util.spec_from_file_location("gpu_run", {str(GPU_RUN)!r})
g = sys.modules["gpu_run"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
import argparse, pathlib
out = pathlib.Path({str(tmp_path)!r}); (out / "logs").mkdir()
pieces = [g.Piece("first", ["python", "-c", "print(1)"]),
          g.Piece("sleeper", ["python", "-c", "import os, time; open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); time.sleep(60)"]),
          g.Piece("last", ["python", "-c", "print(2)"])]
m = g.new_manifest(argparse.Namespace(device="cpu", scale="tiny", budget=300), [], {{}}, pieces)
signal.signal(signal.SIGTERM, g._on_sigterm)
g.run_pieces(pieces, m, out, 300)
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    pid_file = tmp_path / "pid"
    for _ in range(600):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert [m["pieces"][k]["status"] for k in ("first", "sleeper", "last")] == ["passed", "interrupted", "not run"]
    assert m["interrupted"]
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_gpu_run_only_keeps_the_other_pieces_records(gpu_run, tmp_path):
    pieces = gpu_run.pieces_for("cpu", "tiny", tmp_path)
    earlier = _manifest(gpu_run, pieces, 60)
    earlier["pieces"]["bench-tiny"].update(status="passed", started="earlier")
    earlier["pieces"]["bench-memory"].update(status="timeout", started="earlier")
    gpu_run.write_manifest(earlier, tmp_path)
    now = _manifest(gpu_run, pieces, 60)
    gpu_run.merge_earlier(now, tmp_path, ["bench-memory"])
    assert now["pieces"]["bench-tiny"]["started"] == "earlier"
    assert now["pieces"]["bench-memory"]["status"] == "pending"
    other = dict(now, device="cuda")
    with pytest.raises(SystemExit):
        gpu_run.merge_earlier(other, tmp_path, ["bench-memory"])


def test_gpu_run_cuda_plan(gpu_run, capsys):
    """What a GPU machine runs: the CUDA tests, bench_solvers per size on cuda, compare_solvers --quick."""
    assert gpu_run.main(["--device", "cuda", "--dry-run", "--out", "OUT"]) == 0
    text = capsys.readouterr().out
    names = [line.split()[0] for line in text.splitlines()]
    assert names == ["cuda-tests", "bench-small", "bench-medium", "bench-large", "bench-conv", "bench-memory",
                     "compare-solvers"]
    assert "tests/test_cuda.py" in text and "compare_solvers.py --device cuda" in text and "--quick" in text
    assert text.count("bench_solvers.py --device cuda") == 5
    with pytest.raises(SystemExit):
        gpu_run.main(["--device", "cpu", "--only", "bogus", "--dry-run"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_gpu_run_refuses_cuda_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(GPU_RUN), "--device", "cuda", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "torch sees no CUDA device" in proc.stderr
    assert not (tmp_path / "x").exists()
