"""NFE counting against a counting f, and activation memory of the three gradient methods."""

import pytest
import torch

import odenet
from odenet.measure import host_reads, saved_tensors

from conftest import CountingF


@pytest.mark.parametrize("solver", odenet.SOLVERS)
def test_forward_nfe_equals_calls(solver):
    f = CountingF()
    y0 = torch.randn(4, 3, dtype=torch.float64)
    kw = dict(rtol=1e-6, atol=1e-6) if odenet.solvers.SOLVERS[solver]().adaptive else dict(steps=7)
    sol = odenet.odeint(f, y0, torch.linspace(0, 1, 5, dtype=torch.float64), solver=solver, **kw)
    assert sol.stats.nfe_forward == f.calls > 0
    assert sol.stats.nfe_backward == 0
    assert sol.stats.n_accepted > 0 and sol.stats.n_rejected >= 0
    if not kw.get("rtol"):
        stages = odenet.solvers.SOLVERS[solver]().tableau.stages
        assert sol.stats.n_accepted == 7 and f.calls == 7 * stages


def test_fsal_reuses_last_stage():
    """dopri5 has 7 stages but costs 6 evaluations per step after the first (FSAL)."""
    f = CountingF()
    sol = odenet.odeint(f, torch.randn(2, 3, dtype=torch.float64), [0.0, 1.0], solver=odenet.solvers.Dopri5(adaptive=False), steps=5)
    assert sol.stats.nfe_forward == 1 + 5 * 6


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_backward_nfe_counted(gradient):
    f = CountingF()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    sol = odenet.odeint(f, y0, [0.0, 1.0], solver="dopri5", rtol=1e-6, atol=1e-6, gradient=gradient)
    forward_calls = f.calls
    assert sol.stats.nfe_forward == forward_calls
    sol.ys[-1].sum().backward()
    backward_calls = f.calls - forward_calls
    assert sol.stats.nfe_backward == backward_calls
    if gradient == "direct":
        assert backward_calls == 0
    else:
        assert backward_calls > 0
    if gradient == "checkpoint":  # every accepted step recomputed: 6 stages (FSAL f(t1, y1) not needed)
        assert backward_calls == 6 * sol.stats.n_accepted


def test_checkpoint_recomputes_last_stage_only_for_dense_output():
    f = CountingF()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    solver = odenet.solvers.Dopri5(adaptive=False)
    # 4 steps, outputs at 0.3 and 0.6 fall inside steps 2 and 3: those need all 7 stages for dense output.
    sol = odenet.odeint(f, y0, [0.0, 0.3, 0.6, 1.0], solver=solver, steps=4, gradient="checkpoint")
    calls = f.calls
    sol.ys.sum().backward()
    assert f.calls - calls == sol.stats.nfe_backward == 2 * 6 + 2 * 7


def _activation_bytes(gradient, steps, solver="rk4"):
    f = odenet.MLPDynamics(8, 32).double()
    x = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    with saved_tensors(exclude=f.parameters()) as saved:
        y = odenet.odeint(f, x, [0.0, 1.0], solver=solver, steps=steps, gradient=gradient).ys[-1]
    y.sum().backward()  # the graph must still work
    return saved.bytes


def test_adjoint_memory_flat_direct_linear():
    state = 64 * 8 * 8  # bytes of one state
    adj10, adj200 = _activation_bytes("adjoint", 10), _activation_bytes("adjoint", 200)
    dir10, dir200 = _activation_bytes("direct", 10), _activation_bytes("direct", 200)
    ck10, ck200 = _activation_bytes("checkpoint", 10), _activation_bytes("checkpoint", 200)
    assert adj10 == adj200 <= 2 * state  # just the outputs y(t0), y(t1)
    ratio = dir200 / dir10
    assert 19 < ratio < 21, f"direct should grow linearly in steps, got ratio {ratio:.2f}"
    assert dir10 > 10 * adj10
    # checkpoint: one state per step boundary, nothing else
    assert ck10 == 10 * state and ck200 == 200 * state


def test_saved_storage_freed_inside_the_block_is_still_counted():
    """A graph dropped inside the block frees what it saved; the allocator hands that address
    to the next tensor. Each of these five saved tensors is distinct and must count once."""
    a = torch.randn(1000, requires_grad=True)
    with saved_tensors(exclude=[a]) as saved:
        for _ in range(5):
            tmp = torch.randn(1000)
            out = a * tmp  # saves tmp for the gradient with respect to a
            del out, tmp  # the graph, and tmp's memory, are freed here
    assert saved.count == 5  # tmp, five times (a needs no saving: tmp needs no gradient)
    assert saved.bytes == 5 * 1000 * 4


def test_activation_count_is_deterministic_with_discarded_stages():
    """dopri5 under `direct` records a last FSAL stage that only the error estimate reads; its
    graph is dropped at the end of the solve. Counting must not depend on address reuse."""
    f = odenet.MLPDynamics(8, 32).double()
    x = torch.randn(32, 8, dtype=torch.float64, requires_grad=True)
    counts = set()
    for _ in range(3):
        with saved_tensors(exclude=f.parameters()) as saved:
            y = odenet.odeint(f, x, [0.0, 1.0], solver="dopri5", rtol=1e-4, atol=1e-4).ys[-1]
            z = torch.tanh(y * 2.0)  # more saved tensors after the solve, to reuse freed memory
        counts.add(saved.bytes)
        z.sum().backward()
    assert len(counts) == 1


def test_adjoint_memory_flat_adaptive():
    """Under an adaptive solver, more steps (tighter tolerance) do not cost the adjoint memory."""
    f = odenet.MLPDynamics(8, 32).double()
    x = torch.randn(32, 8, dtype=torch.float64, requires_grad=True)
    out = {}
    for tol in (1e-3, 1e-8):
        for gradient in ("adjoint", "direct"):
            with saved_tensors(exclude=f.parameters()) as saved:
                sol = odenet.odeint(f, x, [0.0, 1.0], solver="dopri5", rtol=tol, atol=tol, gradient=gradient)
            out[tol, gradient] = (saved.bytes, sol.stats.nfe_forward)
    assert out[1e-8, "adjoint"][1] > 2 * out[1e-3, "adjoint"][1]
    assert out[1e-8, "adjoint"][0] == out[1e-3, "adjoint"][0]
    assert out[1e-8, "direct"][0] > 2 * out[1e-3, "direct"][0]


def test_solution_records_steps():
    sol = odenet.odeint(
        lambda t, y: torch.cos(5 * t) * y, torch.ones(2, dtype=torch.float64), [0.0, 3.0], rtol=1e-6, atol=1e-6
    )
    accepted = [s for s in sol.steps if s.accepted]
    assert len(accepted) == sol.stats.n_accepted and len(sol.steps) == sol.stats.n_accepted + sol.stats.n_rejected
    for a, b in zip(accepted, accepted[1:]):  # accepted steps tile [0, 3]
        assert b.t == pytest.approx(a.t + a.h, abs=1e-12)
    assert accepted[0].t == 0.0 and accepted[-1].t + accepted[-1].h == pytest.approx(3.0)


def test_host_reads_counts_each_kind_of_read():
    x = torch.arange(4.0)
    with host_reads() as reads:
        float(x.sum()), bool(x[0] == 0), int(x[1]), x[2].item(), x.tolist(), x.nonzero(), x.numpy()
        x.to(torch.float64), x.cpu(), x + 1  # no reads: a dtype change, CPU to CPU, arithmetic
    assert reads.by_kind == {"__float__": 1, "__bool__": 1, "__int__": 1, "item": 1, "tolist": 1, "nonzero": 1,
                             "numpy": 1}
    assert reads.count == 7


def test_host_reads_counts_once_under_a_torch_function_mode():
    """`with torch.device(...)` (like `torch.set_default_device`) dispatches each read to the
    wrapped method a second time; it still counts once."""
    x = torch.arange(3.0)
    with torch.device("cpu"), host_reads() as reads:
        x.sum().item(), float(x[0]), x.tolist()
        odenet.odeint(lambda t, y: -y, x, [0.0, 1.0], solver="rk4", steps=4)
    assert reads.by_kind == {"item": 1, "__float__": 2, "tolist": 2}  # the solve: its times, its finiteness check


def test_host_reads_sees_backward_and_nests():
    class ReadInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            float(g.sum())
            return g * 2

    x = torch.ones(3, requires_grad=True)
    with host_reads() as outer:
        y = ReadInBackward.apply(x).sum()
        with host_reads() as inner:
            y.backward()
        x.tolist()
    assert (inner.count, outer.count) == (1, 2)


def test_host_reads_restores_tensor_methods():
    before = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "to", "__float__")}
    with pytest.raises(RuntimeError, match="boom"):
        with host_reads():
            raise RuntimeError("boom")
    assert {name: getattr(torch.Tensor, name) for name in before} == before
    with host_reads() as reads:
        pass
    torch.ones(1).item()
    assert reads.count == 0
