"""Host reads of the solver loops: values read from tensors into Python (`float()`, `.item()`,
`.tolist()`, ...). On a GPU each one is a host-device synchronisation, so these counts are the
"no synchronisation per step" promise of the fixed-step path and the "one per attempted step"
of the adaptive path.

Counted here on the CPU with `odenet.measure.host_reads`, so they run on every machine;
`tests/test_cuda.py` checks the same promises on a GPU with CUDA's own sync detector.
"""

import sys

import pytest
import torch

import odenet
from odenet.measure import host_reads
from odenet.solvers import SOLVERS, SolveStats, integrate
from odenet.solvers.integrate import CountedFunc

integrate_module = sys.modules["odenet.solvers.integrate"]  # the name `integrate` is the function


def _decay(t, y):
    return -y


def _fixed_reads(solver, n_steps, wrap):
    y0 = torch.ones(4, 3)
    grid = [i / n_steps for i in range(n_steps)] + [1.0]
    stats = SolveStats()
    f = CountedFunc(_decay, stats) if wrap else _decay
    with host_reads() as reads:
        res = integrate(f, y0, [0.0, 1.0], solver, stats=stats, grid=grid)
    assert res.status is odenet.Status.SUCCESS
    torch.testing.assert_close(res.ys[-1], y0 * torch.exp(torch.tensor(-1.0)), rtol=0.3, atol=0)
    return reads.count


# dopri5 on a fixed grid is the FSAL path of the fixed loop (`step` with the last stage handed on).
FIXED_CASES = ["euler", "midpoint", "rk4", "dopri5"]


@pytest.mark.parametrize("wrap", [False, True], ids=["plain-f", "counted-f"])
@pytest.mark.parametrize("name", FIXED_CASES)
def test_fixed_loop_reads_once_per_solve(name, wrap):
    """One read per solve (the finiteness check at the end), whatever the number of steps."""
    solver = SOLVERS[name](adaptive=False)
    assert [_fixed_reads(solver, n, wrap) for n in (3, 30)] == [1, 1]


@pytest.mark.parametrize("name", FIXED_CASES)
def test_fixed_loop_reads_nothing_while_capturing(monkeypatch, name):
    """During CUDA-graph capture (simulated: the loop is told it is capturing) no value is read,
    which is what lets the fixed-step path be captured at all."""
    monkeypatch.setattr(integrate_module, "_capturing", lambda y: True)
    solver = SOLVERS[name](adaptive=False)
    assert [_fixed_reads(solver, n, True) for n in (3, 30)] == [0, 0]


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_fixed_step_training_step_reads_do_not_grow_with_steps(gradient, solver):
    """A training step (forward and backward) through a fixed-step block reads as many values
    for 4 steps as for 32: nothing per step, in either direction. Forward: `odeint` turning its
    output times into floats (a CPU tensor made from the block's floats: no synchronisation on a
    GPU) and the finiteness check; the adjoint's backward solve makes its own finiteness check."""

    def reads(steps):
        torch.manual_seed(0)
        block = odenet.ODEBlock(odenet.MLPDynamics(3, 8), solver=solver, steps=steps, gradient=gradient)
        x = torch.randn(5, 3, requires_grad=True)
        with host_reads() as r:
            block(x).square().sum().backward()
        assert x.grad is not None and all(p.grad is not None for p in block.parameters())
        return r.count

    expected = 2 + (gradient == "adjoint")
    assert [reads(4), reads(32)] == [expected, expected]


@pytest.mark.parametrize("first_step", [None, 0.05])
@pytest.mark.parametrize("name", ["bosh3", "dopri5", "tsit5"])
def test_adaptive_loop_reads_once_per_attempted_step(name, first_step):
    """One read per attempted step (the error ratio that decides acceptance), plus two at the
    start (the initial step size, or the finiteness of the given first step's inputs)."""
    A = torch.tensor([[-0.1, 3.0], [-3.0, -0.1]])
    y0 = torch.tensor([[1.0, 0.0], [0.3, -0.5]])
    for tol in (1e-3, 1e-6):
        stats = SolveStats()
        with host_reads() as reads:
            res = integrate(lambda t, y: y @ A.T, y0, [0.0, 0.5, 2.0], SOLVERS[name](),
                            odenet.Adaptive(tol, tol, first_step=first_step), stats=stats)
        assert res.status is odenet.Status.SUCCESS
        assert len(res.steps) == stats.n_accepted + stats.n_rejected > 3
        assert reads.count == len(res.steps) + 2, (tol, reads.count, len(res.steps))


def test_adjoint_backward_reads_once_per_attempted_step():
    """The adaptive adjoint's backward solve reads like the forward one: one value per attempted
    step plus two at its start. (The forward's one more read is `odeint` turning its output times
    into floats: a CPU tensor made from the block's floats, so no synchronisation on a GPU.)"""
    torch.manual_seed(0)
    block = odenet.ODEBlock(odenet.MLPDynamics(3, 8), solver="dopri5", rtol=1e-5, atol=1e-5, gradient="adjoint")
    x = torch.randn(5, 3)
    with host_reads() as fwd:
        y = block(x)
    s = block.last_stats
    assert fwd.count == s.n_accepted + s.n_rejected + 2 + 1
    with host_reads() as bwd:
        y.square().sum().backward()
    assert s.nfe_backward > 0
    assert bwd.count == s.n_accepted_backward + s.n_rejected_backward + 2
