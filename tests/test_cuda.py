"""Checks that need a GPU; skipped where CUDA is not available (CI has none).

On a GPU machine: `python -m pytest -q tests/test_cuda.py tests/test_blocks.py -k cuda`.

- Synchronisation, with CUDA's own detector (`torch.cuda.set_sync_debug_mode`): the fixed-step
  path synchronises once per solve whatever the number of steps (none while a CUDA graph is
  captured), the adaptive path once per attempted step. `tests/test_host_sync.py` counts the
  same host reads on the CPU.
- The fixed-step solve captured in a CUDA graph replays to the eager result.
- Solutions and gradients on the GPU agree with the CPU's, in float64.
- `torch.compile(f)` inside the loop, and the CUDA peak-memory measurement.
"""

import warnings

import pytest
import torch

import odenet
from odenet.solvers import SOLVERS, SolveStats, integrate

from conftest import A_LINEAR

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = "cuda"


class Syncs:
    """Counts host-device synchronisations that CUDA's sync debug mode reports (it warns once
    per synchronising call; warnings from backward are replayed on the calling thread)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        torch.cuda.synchronize()
        self._mode = torch.cuda.get_sync_debug_mode()
        self._warnings = warnings.catch_warnings(record=True)
        self._log = self._warnings.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self._mode)
        self._warnings.__exit__(*exc)
        self.count = sum("synchronizing CUDA operation" in str(w.message) for w in self._log)
        return False


def _block(solver, gradient, **kw):
    torch.manual_seed(0)
    return odenet.ODEBlock(odenet.MLPDynamics(3, 16), solver=solver, gradient=gradient, **kw).to(CUDA)


# ---------------------------------------------------------------------------- synchronisation


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_fixed_step_training_step_syncs_do_not_grow_with_steps(solver, gradient):
    """Forward: one synchronisation (the finiteness check at the end); backward: none, or the
    adjoint's own end-of-solve check. The same for 4 steps as for 32."""

    def syncs(steps):
        block = _block(solver, gradient, steps=steps)
        x = torch.randn(64, 3, device=CUDA, requires_grad=True)
        block(x).square().sum().backward()  # warm-up (cuBLAS and the caching allocator set up)
        with Syncs() as s:
            block(x).square().sum().backward()
        return s.count

    expected = 1 + (gradient == "adjoint")
    assert [syncs(4), syncs(32)] == [expected, expected]


@pytest.mark.parametrize("name", ["bosh3", "dopri5", "tsit5"])
def test_adaptive_solve_syncs_once_per_attempted_step(name):
    """One synchronisation per attempted step (reading the error ratio) plus two for the initial
    step size."""
    A = torch.tensor([[-0.1, 3.0], [-3.0, -0.1]], device=CUDA)
    y0 = torch.randn(32, 2, device=CUDA)
    integrate(lambda t, y: y @ A.T, y0, [0.0, 1.0], SOLVERS[name](), odenet.Adaptive(1e-3, 1e-3), stats=SolveStats())
    for tol in (1e-3, 1e-6):
        stats = SolveStats()
        with Syncs() as s:
            res = integrate(lambda t, y: y @ A.T, y0, [0.0, 0.5, 2.0], SOLVERS[name](), odenet.Adaptive(tol, tol), stats=stats)
        assert res.status is odenet.Status.SUCCESS and len(res.steps) > 3
        assert s.count == len(res.steps) + 2, (tol, s.count, len(res.steps))


# ---------------------------------------------------------------------------- CUDA graphs


def _capture(fn):
    """Capture `fn()` in a CUDA graph after two warm-up calls on a side stream (PyTorch's recipe)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# dopri5 on a fixed grid is the fixed loop's FSAL path.
@pytest.mark.parametrize("solver", ["euler", "rk4", "dopri5-fixed"])
def test_fixed_step_solve_replays_in_a_cuda_graph(solver):
    torch.manual_seed(0)
    f = odenet.MLPDynamics(3, 16).to(CUDA)
    method = SOLVERS["dopri5"](adaptive=False) if solver == "dopri5-fixed" else solver
    static = torch.zeros(64, 3, device=CUDA)

    def solve(x):
        return odenet.odeint(f, x, [0.0, 0.5, 1.0], solver=method, steps=10).ys

    with torch.no_grad():
        graph, out = _capture(lambda: solve(static))
        for seed in (1, 2):
            x = torch.randn(64, 3, device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(seed))
            static.copy_(x)
            graph.replay()
            torch.testing.assert_close(out, solve(x), rtol=1e-6, atol=1e-6)


def test_ode_block_forward_replays_in_a_cuda_graph():
    block = _block("rk4", "direct", steps=8).eval()
    static = torch.zeros(64, 3, device=CUDA)
    with torch.no_grad():
        graph, out = _capture(lambda: block(static))
        assert block.last_stats.nfe_forward == 32  # counted while capturing
        x = torch.randn(64, 3, device=CUDA)
        static.copy_(x)
        graph.replay()
        torch.testing.assert_close(out, block(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- agreement with the CPU


def _linear(device):
    A = torch.tensor(A_LINEAR, dtype=torch.float64, device=device)
    return lambda t, y: y @ A.T


@pytest.mark.parametrize("name", list(odenet.SOLVERS))
def test_solutions_on_cuda_agree_with_cpu(name):
    kw = dict(rtol=1e-9, atol=1e-11) if SOLVERS[name]().adaptive else dict(steps=50)
    y0 = torch.randn(16, 3, dtype=torch.float64)
    ts = [0.0, 0.3, 1.0]
    cpu = odenet.odeint(_linear("cpu"), y0, ts, solver=name, **kw)
    gpu = odenet.odeint(_linear(CUDA), y0.to(CUDA), ts, solver=name, **kw)
    assert gpu.ys.device.type == "cuda"
    torch.testing.assert_close(gpu.ys.cpu(), cpu.ys, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_gradients_on_cuda_agree_with_cpu(solver, gradient):
    kw = dict(rtol=1e-9, atol=1e-9) if solver == "dopri5" else dict(steps=16)

    def grads(device):
        torch.manual_seed(0)
        block = odenet.ODEBlock(odenet.MLPDynamics(3, 16), solver=solver, gradient=gradient, **kw)
        block = block.to(device=device, dtype=torch.float64)
        x = torch.linspace(-1, 1, 24, dtype=torch.float64, device=device).reshape(8, 3).requires_grad_(True)
        block(x).square().sum().backward()
        return [t.detach().cpu() for t in (x.grad, *(p.grad for p in block.parameters()))]

    for g_gpu, g_cpu in zip(grads(CUDA), grads("cpu")):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------- compile, memory


def test_compiled_f_inside_the_loop_on_cuda():
    torch._dynamo.reset()
    torch.manual_seed(0)
    f = odenet.MLPDynamics(3, 16).to(CUDA)
    x = torch.randn(64, 3, device=CUDA)
    for kw in (dict(solver="rk4", steps=8), dict(solver="dopri5", rtol=1e-6, atol=1e-6)):
        eager = odenet.odeint(f, x, [0.0, 1.0], **kw).ys[-1]
        compiled = odenet.odeint(torch.compile(f), x, [0.0, 1.0], **kw).ys[-1]
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_cuda_peak_memory_sees_an_allocation():
    n = 1 << 22  # 16 MiB of float32
    peak = odenet.measure.cuda_peak_memory(lambda: torch.ones(n, device=CUDA))
    assert 4 * n <= peak < 8 * n


def test_host_reads_counts_copies_to_the_cpu():
    x = torch.arange(4.0, device=CUDA)
    with odenet.measure.host_reads() as reads:
        x.cpu(), x.to("cpu"), x.to(torch.float64), x.to(CUDA)  # two copies to the CPU, two on the GPU
        float(x[0])
    assert reads.by_kind == {"cpu": 1, "to": 1, "__float__": 1}
    with Syncs() as s:
        x.cpu()
    assert s.count == 1  # what host_reads stands for: a copy to the CPU synchronises
