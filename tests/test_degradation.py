"""experiments/degradation.py: the per-layer gradients at initialisation against an independent
product of per-example Jacobians, the residual highway `I + h dF/dx`, the `ode` family's unrolled
steps, the learning-rate choice, resume, and one-line errors. Tiny settings, seconds on two cores."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))  # the scripts' kit: experiments/kit


def _load_script():
    spec = importlib.util.spec_from_file_location("degradation", ROOT / "experiments" / "degradation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["degradation"] = mod
    spec.loader.exec_module(mod)
    return mod


deg = _load_script()
WIDTH = 6


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the script runs: these networks are tiny, and more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _net(family, depth, norm="layer", seed=0):
    torch.manual_seed(seed)
    net = deg.Net(family, depth, WIDTH, norm).double()
    if family == "resnet-zero":  # give the zero-initialised branch ends weights, so the test is not of identities
        for m in net.units.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.5)
    return net


def _steps(net):
    """The stack as functions `x -> x`, written out here: each `ode` Euler step by hand."""
    if net.family != "ode":
        return list(net.units)
    block = net.units[0]
    n = block.options.control.steps
    f = block.f
    return [lambda x, k=k: x + (1.0 / n) * f(torch.tensor(k / n, dtype=x.dtype), x) for k in range(n)]


def _jacobian(fn, x):
    """`d fn(x) / dx` of one example `x` (shape `[W]`), as a `[W, W]` matrix."""
    return torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0)).squeeze(0), x)


def _reference(net, x, y):
    """`||dL/dx_k||` for every state of the stack and `||dL/dW||` of the stem, from per-example Jacobians:
    `g_n = (softmax - onehot) / B · W_head · J_final`, then `g_k = g_{k+1} J_k`, summed over the batch."""
    states = [net.stem(x)]
    for step in _steps(net):
        states.append(step(states[-1]))
    B = len(y)
    with torch.no_grad():
        p = torch.softmax(net.head(net.final(states[-1])), dim=1)
        dz = (p - nn.functional.one_hot(y, 10).double()) / B
    g = torch.stack([dz[i] @ net.head.weight @ _jacobian(net.final, states[-1][i].detach()) for i in range(B)])
    norms = [g.norm().item()]
    for k in reversed(range(len(states) - 1)):
        step = _steps(net)[k]
        g = torch.stack([g[i] @ _jacobian(step, states[k][i].detach()) for i in range(B)])
        norms.append(g.norm().item())
    return norms[::-1], (g.T @ x).norm().item()


@pytest.mark.parametrize("family,norm", [("plain", "layer"), ("plain-norm", "layer"), ("resnet-norm", "layer"),
                                         ("resnet-zero", "layer"), ("resnet-scaled", "layer"), ("ode", "layer")])
def test_init_gradients_match_jacobian_products(family, norm):
    net = _net(family, 6, norm)
    x = torch.randn(5, 40, dtype=torch.float64)
    y = torch.tensor([0, 3, 9, 3, 1])
    got = deg.init_gradients(net, x, y)
    want_x, want_stem = _reference(net, x, y)
    assert len(got["grad_x"]) == len(want_x) == (7 if family.startswith("plain") else 4)
    assert got["grad_x"] == pytest.approx(want_x, rel=1e-10)
    assert got["grad_w_stem"] == pytest.approx(want_stem, rel=1e-10)
    assert len(got["grad_w"]) == (2 if family == "ode" else 6) and all(v > 0 for v in got["grad_w"])


@pytest.mark.parametrize("family,h", [("resnet-scaled", 2 / 8), ("resnet-zero", 1.0), ("resnet-norm", 1.0)])
def test_residual_jacobian_is_identity_plus_h_branch(family, h):
    net = _net(family, 8)
    x = torch.randn(WIDTH, dtype=torch.float64)
    for block in net.units:
        assert block.h == h
        dF = _jacobian(lambda v: block.f(torch.zeros((), dtype=v.dtype), v), x)
        assert torch.allclose(_jacobian(block, x), torch.eye(WIDTH, dtype=torch.float64) + h * dF, atol=1e-12)


def test_zero_initialised_blocks_pass_the_gradient_unchanged_and_a_deep_plain_chain_does_not():
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    torch.manual_seed(0)
    zero = deg.init_gradients(deg.Net("resnet-zero", 32, 16, "batch"), x, y)["grad_x"]
    assert zero == pytest.approx([zero[0]] * 17, rel=1e-6)  # 16 blocks, each the identity at initialisation
    torch.manual_seed(0)
    plain = deg.init_gradients(deg.Net("plain", 32, 16, "batch"), x, y)["grad_x"]
    ratio = plain[0] / plain[-1]
    assert not 0.5 < ratio < 2  # 32 random layers of width 16 do not preserve the gradient's size


def test_init_gradients_leave_batchnorm_statistics_alone():
    torch.manual_seed(0)
    net = deg.Net("plain-norm", 4, WIDTH, "batch")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    deg.init_gradients(net, torch.randn(16, 40), torch.randint(0, 10, (16,)))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_ode_family_unrolled_is_the_ode_block():
    torch.manual_seed(0)
    net = deg.Net("ode", 8, WIDTH)
    assert net.units[0].options.control.steps == 4
    x = net.stem(torch.randn(7, 40))
    y = x
    for step in net.probe_units():
        y = step(y)
    assert torch.equal(y, net.units[0](x))  # Euler steps and ResBlocks: the same operations, bit for bit


def test_best_learning_rate_is_lowest_mean_training_loss_and_divergence_loses():
    config = deg.parse_args(["--families", "plain", "--depths", "2", "--lrs", "1e-3,3e-3,1e-2", "--seeds", "2"])
    losses = {1e-3: (0.5, 0.7), 3e-3: (0.2, 1.1), 1e-2: (0.01, float("nan"))}  # means 0.6, 0.65, diverged
    rows = [dict(family="plain", depth=2, lr=lr, seed=s, train_loss=v, batch_loss=v, test_accuracy=0.5 + s / 10,
                 train_accuracy=0.9, grad_w_stem=1.0, train_seconds=1.0, grad_x=[1.0, 2.0, 3.0], grad_w=[1.0, 1.0],
                 parameters=10)
            for lr, vs in losses.items() for s, v in enumerate(vs)]
    entry = deg.summarise(rows, config)["plain"]["2"]
    assert entry["lr"] == 1e-3
    assert entry["train_loss"] == pytest.approx(0.6) and entry["test_accuracy"] == pytest.approx(0.55)
    assert entry["train_loss_by_lr"]["0.01"] == float("inf")


def _tiny_data(n_train=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + 32, 1, 40, generator=g)
    y = torch.randint(0, 10, (n_train + 32,), generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def test_run_trains_writes_resumes_and_runs_in_two_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(deg, "mnist1d_arrays", lambda n: _tiny_data())
    out = tmp_path / "out"
    argv = ["--depths", "2,4", "--families", "plain,resnet-norm,ode", "--epochs", "3", "--lrs", "1e-2",
            "--width", "8", "--grad-batch", "16", "--batch-size", "16", "--seeds", "1", "--workers", "1", "--dpi", "20",
            "--out", str(out)]
    first = deg.run(deg.parse_args(argv), argv)
    assert sorted(p.name for p in out.glob("*.png")) == ["degradation.png", "gradients.png", "training.png"]
    for row in first["runs"]:
        assert row["train_loss"] < row["initial_loss"]  # three epochs fit 64 random labels a little
        assert len(row["history"]) == 3 and 0 <= row["test_accuracy"] <= 1
    assert json.loads((out / "results.json").read_text())["summary"]["ode"]["4"]["parameters"] > 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6
    # interrupted while writing the last unit: its line is cut; the rerun trains that one alone
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    capsys.readouterr()
    again = deg.run(deg.parse_args(argv), argv)
    assert capsys.readouterr().out.count("(from results.jsonl)") == 5
    drop = lambda rs: [{k: v for k, v in r.items() if k not in ("key", "train_seconds")} for r in rs]  # noqa: E731
    assert drop(again["runs"]) == drop(first["runs"])  # the retrained unit comes out the same
    parallel = deg.run(deg.parse_args(argv + ["--fresh", "--workers", "2"]), argv)  # two processes, same results
    assert "(from results.jsonl)" not in capsys.readouterr().out
    assert drop(parallel["runs"]) == drop(first["runs"])


@pytest.mark.parametrize("args,flag", [(["--depths", "2,3"], "--depths"),
                                       (["--families", "plain,resnet"], "--families"),
                                       (["--lrs", "1e-3,1e-3"], "--lrs"), (["--width", "0"], "--width"),
                                       (["--workers", "0"], "--workers")])
def test_bad_flags_are_one_line(args, flag, capsys):
    assert deg.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    assert deg.main(["--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err
