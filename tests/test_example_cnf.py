"""examples/cnf.py: its quick run trains and draws, and its log-density change is exact for a
linear field, where the answer is known in closed form."""

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

import odenet

ROOT = pathlib.Path(__file__).resolve().parents[1]
D = torch.float64
A = torch.tensor([[-0.3, 1.2], [-0.4, 0.5]], dtype=D)


@pytest.fixture(scope="module")
def cnf():
    spec = importlib.util.spec_from_file_location("example_cnf", ROOT / "examples" / "cnf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


class LinearField(torch.nn.Module):
    """`g(t, z) = A z`, taking the example's MLP input `[z, t]`."""

    def forward(self, zt):
        return zt[:, :2] @ A.T


def linear(cnf):
    """The example's CNF, its MLP swapped for the linear field."""
    f = cnf.CNF(hidden=4).to(D)
    f.g = LinearField()
    return f


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_linear_field_log_density_change(cnf, gradient):
    """`dz/dt = A z` over `[0, T]`: `dlogp = -tr(A) T` exactly, and `log p(x)` from `t = 1` to `0`
    is the density of `x = e^A z0`, `N(0, e^A e^A^T)`."""
    f = linear(cnf)
    z0 = torch.randn(5, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    T = 1.7
    sol = odenet.odeint(f, (z0, z0.new_zeros(5)), [0.0, T], rtol=1e-10, atol=1e-12, gradient=gradient)
    torch.testing.assert_close(sol.ys[0][-1], z0 @ torch.linalg.matrix_exp(A * T).T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sol.ys[1][-1], torch.full((5,), -A.trace().item() * T, dtype=D), rtol=0, atol=1e-9)

    x = z0 @ torch.linalg.matrix_exp(A).T
    logp, _ = cnf.log_prob(f, x, tol=1e-10, gradient=gradient)
    M = torch.linalg.matrix_exp(A)
    exact = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=D), M @ M.T).log_prob(x)
    torch.testing.assert_close(logp, exact, rtol=0, atol=1e-8)


def test_trace_gradient_reaches_parameters(cnf):
    """With a graph, `-tr(dg/dz)` is differentiable in `g`'s parameters (needed for training)."""
    f = cnf.CNF(hidden=8)
    z = torch.randn(4, 2)
    _, dlogp = f(torch.tensor(0.3), (z, z.new_zeros(4)))
    grads = torch.autograd.grad(dlogp.sum(), list(f.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        dz, dlogp = f(torch.tensor(0.3), (z, z.new_zeros(4)))
    assert not dz.requires_grad and not dlogp.requires_grad


def test_quick_run(cnf, tmp_path):
    threads = torch.get_num_threads()
    try:
        result = cnf.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "cnf_density.png").stat().st_size > 0
    assert math.isfinite(result["loglik"]) and result["loglik"] > result["loglik_initial"]
    assert result["nfe_forward"] > 0 and result["nfe_backward"] > 0
