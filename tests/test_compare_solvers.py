"""experiments/compare_solvers.py and the kit behind it (experiments/kit: models, training):
outputs, resume, the distributed path, cross-evaluation and one-line errors.

Tiny settings throughout (a few hundred examples, one epoch); nothing here checks a
time or an accuracy target, only what the code must do on any machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from odenet import Adjoint, ODEBlock, ResBlock

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "compare_solvers.py"
sys.path.insert(0, str(ROOT / "experiments"))  # the scripts' kit: experiments/kit

from kit.models import PRESETS, ResidualSpec, StackedDynamics, build_model, count_parameters  # noqa: E402
from kit.training import (EvalConfig, activation_bytes, cross_evaluate, default_cross_eval_configs,  # noqa: E402
                          evaluate, train)
PLOTS = ("pareto.png", "memory.png", "nfe_training.png", "cross_eval.png")


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_solvers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compare_solvers"] = mod
    spec.loader.exec_module(mod)
    return mod


cs = _load_script()


def tiny_args(out, *extra, runs="resnet,ode-net"):
    return [
        "--dataset", "spheres", "--runs", runs, "--seeds", "0", "--epochs", "1", "--limit-train", "200",
        "--limit-test", "100", "--batch-size", "50", "--euler-steps", "1,6", "--rk4-steps", "1",
        "--dopri5-tols", "1e-2", "--device", "cpu", "--out", str(out), *extra,
    ]


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


# ---------------------------------------------------------------------------- models


def test_presets_parameter_ratio_and_blocks():
    shape, classes = (1, 40), 10
    resnet = build_model(shape, classes, PRESETS["resnet"])
    ode = build_model(shape, classes, PRESETS["ode-net"])
    tied = build_model(shape, classes, PRESETS["resnet-tied"])
    assert count_parameters(ode) <= count_parameters(resnet) / 3
    assert count_parameters(tied) == count_parameters(ode)
    assert len(resnet.residual) == 6 and all(isinstance(b, ResBlock) for b in resnet.residual)
    assert len({id(b.f) for b in resnet.residual}) == 6
    assert len({id(b.f) for b in tied.residual}) == 1
    assert isinstance(ode.residual, ODEBlock) and ode.residual.gradient == Adjoint()


@pytest.mark.parametrize("shape", [(3,), (1, 40), (1, 8, 8), (1, 28, 28)])
def test_build_model_shapes(shape):
    torch.manual_seed(0)
    for name in ("resnet", "rk-net"):
        model = build_model(shape, 10, PRESETS[name], width=8)
        assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_residual_spec_validation():
    with pytest.raises(ValueError, match="tied=False .* needs solver='euler'"):
        ResidualSpec("rk4", steps=2, tied=False)
    with pytest.raises(ValueError, match="steps= was given, but solver 'dopri5' is adaptive"):
        ResidualSpec("dopri5", steps=3)
    with pytest.raises(ValueError, match="needs steps=N"):
        ResidualSpec("rk4")
    with pytest.raises(ValueError, match="Unknown gradient method"):
        ResidualSpec("dopri5", gradient="magic")


def test_tied_resblocks_equal_euler_odeblock():
    torch.manual_seed(0)
    model = build_model((1, 40), 10, PRESETS["resnet-tied"], width=8)
    x = torch.randn(4, 1, 40)
    as_ode = model.with_solver("euler", steps=6)
    assert torch.equal(model(x), as_ode(x))


# ---------------------------------------------------------------------------- cross-evaluation


def test_stacked_dynamics_slices():
    fs = [torch.nn.Identity() for _ in range(6)]
    sd = StackedDynamics(fs)
    assert [sd.index(i / 6) for i in range(6)] == list(range(6))
    assert sd.index(torch.tensor(5 / 6, dtype=torch.float32).item()) == 5  # float32 grid time
    assert sd.index(0.99) == 5 and sd.index(1.0) == 5 and sd.index(0.1) == 0
    with pytest.raises(ValueError, match="at least one"):
        StackedDynamics([])


def test_cross_evaluation_reproduces_the_untied_resnet_and_counts():
    torch.manual_seed(0)
    model = build_model((1, 40), 10, PRESETS["resnet"], width=8)
    # distinct blocks, so the check sees which f runs where
    with torch.no_grad():
        for i, block in enumerate(model.residual):
            block.f.conv2.conv.weight.mul_(1 + i)
    x, y = torch.randn(64, 1, 40), torch.randint(0, 10, (64,))
    assert torch.equal(model(x), model.with_solver("euler", steps=6)(x))
    assert not torch.equal(model(x), model.with_solver("euler", steps=3)(x))
    base = evaluate(model, x, y)
    configs = [EvalConfig("euler", steps=6), EvalConfig("euler", steps=2), EvalConfig("rk4", steps=3),
               EvalConfig("dopri5", rtol=1e-3, atol=1e-3)]
    rows = cross_evaluate(model, x, y, configs, batch_size=32)
    assert [r["label"] for r in rows] == ["euler x6", "euler x2", "rk4 x3", "dopri5 tol=0.001"]
    assert rows[0]["accuracy"] == base["accuracy"] and base["nfe_forward"] == 6
    assert rows[0]["nfe_forward"] == 6 and rows[1]["nfe_forward"] == 2 and rows[2]["nfe_forward"] == 12
    assert rows[3]["ok"] and rows[3]["nfe_forward"] > 6 and rows[3]["n_accepted"] >= 1
    # the cross-evaluated variants share the trained parameters (nothing copied)
    variant = model.with_solver("rk4", steps=2)
    assert {id(p) for p in variant.parameters()} == {id(p) for p in model.parameters()}


def test_cross_evaluation_reports_a_failed_solve():
    torch.manual_seed(0)
    model = build_model((3,), 2, PRESETS["ode-net"], width=8)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    res = evaluate(model.with_solver("dopri5", rtol=1e-12, atol=1e-12, max_steps=1), x, y)
    assert res["ok"] is False and res["accuracy"] != res["accuracy"] and "maximum number" in res["message"].lower()


def test_default_cross_eval_configs():
    labels = [c.label for c in default_cross_eval_configs()]
    assert labels[0] == "euler x1" and "rk4 x4" in labels and "dopri5 tol=1e-05" in labels


def test_activation_memory_adjoint_flat_direct_grows():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 40), torch.randint(0, 10, (32,))
    out = {}
    for grad in ("adjoint", "direct"):
        model = build_model((1, 40), 10, ResidualSpec("rk4", steps=1, gradient=grad), width=8)
        out[grad] = [activation_bytes(model.with_solver("rk4", steps=n, gradient=grad), x, y) for n in (1, 4)]
    assert [m["nfe_forward"] for m in out["adjoint"]] == [4, 16]
    assert out["adjoint"][0]["bytes"] == out["adjoint"][1]["bytes"]
    assert out["direct"][1]["bytes"] > 2 * out["direct"][0]["bytes"] > 2 * out["adjoint"][0]["bytes"]


def test_activation_bytes_releases_the_graph():
    # Regression: a graph recorded under an identity pack hook and then dropped without
    # backward keeps its saved outputs alive (reference cycles); measuring must not leak.
    import gc
    import weakref

    torch.manual_seed(0)
    model = build_model((1, 40), 10, PRESETS["resnet-tied"], width=8)
    refs = []
    model.residual[0].f.act.register_forward_hook(lambda mod, inp, out: refs.append(weakref.ref(out)))
    activation_bytes(model, torch.randn(4, 1, 40), torch.randint(0, 10, (4,)))
    gc.collect()
    assert refs and all(r() is None for r in refs)
    assert all(p.grad is None for p in model.parameters())  # the user's gradients are left alone


# ---------------------------------------------------------------------------- command line


def test_parse_run_syntax():
    name, spec = cs.parse_run("ode-net:tol=1e-4,gradient=checkpoint", PRESETS)
    assert name == "ode-net" and spec["rtol"] == spec["atol"] == 1e-4 and spec["gradient"] == "checkpoint"
    name, spec = cs.parse_run("rk-net:solver=dopri5", PRESETS)  # fixed -> adaptive drops steps
    assert spec["steps"] is None and spec["solver"] == "dopri5" and ResidualSpec(**spec).adaptive
    name, spec = cs.parse_run("ode-net:solver=euler,steps=12", PRESETS)
    assert spec["rtol"] is None and ResidualSpec(**spec).describe() == "euler x12, adjoint"
    name, spec = cs.parse_run("mine:solver=tsit5,seminorm=true,gradient=adjoint", PRESETS)
    assert name == "mine" and spec["adjoint_seminorm"] is True and spec["rtol"] == 1e-3
    with pytest.raises(cs.UsageError, match="not KEY=VALUE"):
        cs.parse_run("ode-net:colour=red", PRESETS)
    with pytest.raises(cs.UsageError, match="is not a number"):
        cs.parse_run("ode-net:rtol=small", PRESETS)


def test_runs_selection():
    s = cs.parse_settings([])
    assert s.runs == tuple(PRESETS) and s.seeds == (0, 1, 2)
    s = cs.parse_settings(["--run", "x:solver=rk4,steps=3"])
    assert s.runs == ("x",)
    s = cs.parse_settings(["--runs", "resnet,x", "--run", "x:solver=rk4,steps=3"])
    assert s.runs == ("resnet", "x") and s.specs["x"]["steps"] == 3
    s = cs.parse_settings(["--quick", "--epochs", "2"])
    assert s.epochs == 2 and s.seeds == (0,)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--runs", "resnet,nope"], "unknown run 'nope'"),
        (["--seeds", "a,b"], "--seeds 'a,b': expected comma-separated integers"),
        (["--run", "bad:solver=rk4"], "run bad: Fixed-step solver 'rk4' needs steps=N"),
        (["--run", "bad:solver=dopri5,tied=false"], "run bad: tied=False"),
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
        (["--dataset", "mnist"], "give --data-dir"),
        (["--data-dir", "/tmp"], "--data-dir is read by --dataset mnist only"),
    ],
)
def test_bad_flags_are_one_line_exit_2(argv, match, capsys):
    assert cs.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare_solvers.py: error: ") and "\n" not in err
    assert match in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_cuda_asked_for_without_cuda(capsys):
    assert cs.main(["--device", "cuda", "--dataset", "spheres"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "CUDA is not available" in err


def test_missing_mnist_files_one_line_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dataset", "mnist", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "train-images-idx3-ubyte" in lines[0] and "t10k-labels-idx1-ubyte" in lines[0]


def test_help_documents_every_flag():
    text = cs.build_parser().format_help()
    for action in cs.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    for flag in ("--quick", "--runs", "--run", "--seeds", "--device", "--out", "--fresh", "--data-dir"):
        assert flag in text
    for name in PRESETS:
        assert name in text


# ---------------------------------------------------------------------------- end to end, resume


def test_end_to_end_outputs_and_resume(tmp_path, capsys):
    out = tmp_path / "res"
    assert cs.main(tiny_args(out)) == 0
    for name in ("results.jsonl", "results.csv", "results.md", *PLOTS):
        assert (out / name).is_file(), name
    rows = read_jsonl(out / "results.jsonl")
    assert [r["run"] for r in rows] == ["resnet", "ode-net"]
    for r in rows:
        assert 0 <= r["test_accuracy"] <= 1 and r["params"] > 0 and r["activation_bytes"] > 0
        assert r["world_size"] == 1 and len(r["history"]) == 1
        assert [c["label"] for c in r["cross_eval"]] == ["euler x1", "euler x6", "rk4 x1", "dopri5 tol=0.01"]
    ode = rows[1]
    assert ode["nfe_backward"] > 0 and ode["n_accepted"] >= 1 and ode["cuda_peak_bytes"] is None
    assert rows[0]["nfe_forward"] == 6 and rows[0]["nfe_backward"] == 0
    md = (out / "results.md").read_text()
    assert "Command: `python experiments/compare_solvers.py --dataset spheres" in md
    assert "| resnet |" in md and "| ode-net |" in md and "torch " in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run,") and len(csv_lines) == 3

    # a rerun trains nothing and leaves the finished lines as they were
    capsys.readouterr()
    assert cs.main(tiny_args(out)) == 0
    assert "2 of 2 already in" in capsys.readouterr().out
    assert read_jsonl(out / "results.jsonl") == rows

    # interrupted mid-write: the second line is cut; the rerun keeps line 1 and redoes ode-net
    text = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(text[0] + "\n" + text[1][: len(text[1]) // 2])
    assert cs.main(tiny_args(out)) == 0
    assert "1 of 2 already in" in capsys.readouterr().out
    after = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.startswith("{") and line.endswith("}")]
    assert after[0] == rows[0] and [r["run"] for r in after] == ["resnet", "ode-net"]

    # other settings are other results: nothing reused
    assert cs.main(tiny_args(out, "--lr", "0.005")) == 0
    assert "0 of 2 already in" in capsys.readouterr().out

    # --fresh starts over
    assert cs.main(tiny_args(out, "--fresh")) == 0
    fresh = read_jsonl(out / "results.jsonl")
    assert len(fresh) == 2 and fresh[0]["finished"] >= rows[0]["finished"]


def test_mnist_through_the_script(tmp_path):
    from test_data import write_mnist

    (tmp_path / "mnist").mkdir()
    write_mnist(tmp_path / "mnist", n_train=40, n_test=20)
    out = tmp_path / "res"
    argv = ["--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"), "--runs", "rk-net", "--seeds", "0", "--epochs",
            "1", "--batch-size", "20", "--no-cross-eval", "--device", "cpu", "--out", str(out)]
    assert cs.main(argv) == 0
    (row,) = read_jsonl(out / "results.jsonl")
    assert row["dataset"] == "mnist" and row["cross_eval"] == [] and row["nfe_forward"] == 8


# ---------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from kit.training import cleanup_distributed, setup_distributed

    info = setup_distributed("cpu")
    torch.manual_seed(rank)  # different initial weights per process: DDP must broadcast rank 0's
    model = build_model((3,), 2, PRESETS["ode-net"], width=8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randint(0, 2, (64,), generator=g)
    res = train(model, x, y, epochs=2, batch_size=16, seed=0, info=info)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.save(dict(rank=info.rank, world=info.world_size, params=flat, history=res.history), f"{path}.{rank}")
    # Both ranks done before either tears down gloo: a fresh-clone CI run once saw rank 0 abort
    # ("terminate called without an active exception") in teardown without this.
    torch.distributed.barrier()
    cleanup_distributed()


def test_ddp_training_keeps_processes_in_step(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "out")), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "out.0", weights_only=False), torch.load(tmp_path / "out.1", weights_only=False)
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert torch.equal(r0["params"], r1["params"])  # each saw a different shard; DDP averaged the gradients
    torch.manual_seed(0)
    init = torch.cat([p.detach().reshape(-1) for p in build_model((3,), 2, PRESETS["ode-net"], width=8).parameters()])
    assert not torch.equal(init, r0["params"])  # trained
    assert r0["history"][-1].nfe_backward > 0 and r0["history"][-1].nfe_forward == r1["history"][-1].nfe_forward


def test_torchrun_two_processes_write_once(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           str(SCRIPT), *tiny_args(out, runs="resnet-tied,ode-net")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(out / "results.jsonl")
    assert [r["run"] for r in rows] == ["resnet-tied", "ode-net"]  # one line each: rank 0 writes
    assert all(r["world_size"] == 2 for r in rows)
    md = (out / "results.md").read_text()
    assert "torchrun --nproc_per_node=2 experiments/compare_solvers.py" in md
    assert all((out / p).is_file() for p in PLOTS)
