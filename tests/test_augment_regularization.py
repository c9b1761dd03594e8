"""odenet.Augment (ANODE) and RNODE regularisation (kinetic energy, Hutchinson Jacobian norm)."""

import itertools
import math

import pytest
import torch
from torch import nn

import odenet
from odenet.options import options_from
from odenet.regularization import RNODE, solve_regularized

D64 = torch.float64


# ---------------------------------------------------------------------------- Augment


def test_augment_vectors_shape_zeros_and_identity_part():
    x = torch.randn(7, 3, dtype=D64)
    aug = odenet.Augment(dims=4)
    y = aug(x)
    assert y.shape == (7, 7) and y.dtype == D64
    assert torch.equal(y[:, :3], x)
    assert torch.count_nonzero(y[:, 3:]) == 0
    assert torch.equal(aug.strip(y), x)


def test_augment_images_pad_channels():
    x = torch.randn(2, 3, 5, 4)
    y = odenet.Augment(dims=2)(x)
    assert y.shape == (2, 5, 5, 4)
    assert torch.equal(y[:, :3], x) and torch.count_nonzero(y[:, 3:]) == 0
    z = odenet.Augment(dims=2, dim=-1)(x)  # the last axis instead
    assert z.shape == (2, 3, 5, 6) and torch.equal(z[..., :4], x)


def test_augment_gradient_flows_to_input():
    x = torch.randn(4, 2, dtype=D64, requires_grad=True)
    w = torch.randn(5, dtype=D64)
    (odenet.Augment(dims=3)(x) @ w).sum().backward()
    assert torch.allclose(x.grad, w[:2].expand(4, 2))


def test_augment_in_a_model_trains_end_to_end():
    torch.manual_seed(0)
    model = nn.Sequential(odenet.Augment(dims=2), odenet.ODEBlock(odenet.MLPDynamics(dim=4, hidden=8)), nn.Linear(4, 1))
    out = model(torch.randn(6, 2))
    out.sum().backward()
    assert out.shape == (6, 1)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "make, err",
    [
        (lambda: odenet.Augment(0), ValueError),
        (lambda: odenet.Augment(1.5), TypeError),
        (lambda: odenet.Augment(True), TypeError),
        (lambda: odenet.Augment(2, dim=0), ValueError),
        (lambda: odenet.Augment(2)(torch.randn(3)), ValueError),
        (lambda: odenet.Augment(2, dim=3)(torch.randn(3, 2)), ValueError),
        (lambda: odenet.Augment(2)([1.0, 2.0]), TypeError),
        (lambda: odenet.Augment(2).strip(torch.randn(3, 2)), ValueError),
    ],
)
def test_augment_bad_input(make, err):
    with pytest.raises(err):
        make()


# ---------------------------------------------------------------------------- RNODE


class Decay(nn.Module):
    """f(t, x) = -k x with a learnable scalar k."""

    def __init__(self, k: float):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k, dtype=D64))

    def forward(self, t, x):
        return -self.k * x


class Linear(nn.Module):
    """f(t, x) = x Aᵀ with a learnable matrix A."""

    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, t, x):
        return x @ self.A.T


def exact_kinetic(k, x0, T):
    # x(t) = x0 exp(-k t), so ||f||² = k² ||x0||² exp(-2 k t) and E = k ||x0||² (1 - exp(-2 k T)) / 2
    return k * (x0**2).sum(1) * (1 - math.exp(-2 * k * T)) / 2


def exact_kinetic_dk(k, x0, T):
    n2 = (x0**2).sum(1)
    return n2 / 2 * (1 - math.exp(-2 * k * T)) + k * n2 * T * math.exp(-2 * k * T)


X0 = torch.tensor([[1.0, 2.0, -0.5], [0.3, 0.0, 1.0]], dtype=D64)


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_kinetic_energy_and_its_gradient_match_closed_form(gradient):
    k, T = 0.7, 2.0
    f = Decay(k)
    opts = options_from("dopri5", rtol=1e-10, atol=1e-12, gradient=gradient)
    res = solve_regularized(f, X0, (0.0, T), opts, RNODE(kinetic=1.0))
    E = exact_kinetic(k, X0, T)
    assert torch.allclose(res.kinetic, E, rtol=1e-8, atol=0)
    assert res.jacobian is None
    assert torch.allclose(res.regularization, E.mean(), rtol=1e-8)
    assert torch.allclose(res.solution.ys[-1], X0 * math.exp(-k * T), rtol=1e-8)
    res.regularization.backward()
    assert f.k.grad.item() == pytest.approx(exact_kinetic_dk(k, X0, T).mean().item(), rel=1e-6)


def test_kinetic_energy_is_positive_backward_in_time():
    k, T = 0.7, 2.0
    res = solve_regularized(Decay(k), X0, (T, 0.0), options_from("dopri5", rtol=1e-10, atol=1e-12), RNODE(kinetic=1.0))
    # backward in time the state grows: x(s) = x0 exp(k s), E = k ||x0||² (exp(2 k T) - 1) / 2
    E = k * (X0**2).sum(1) * (math.exp(2 * k * T) - 1) / 2
    assert torch.allclose(res.kinetic, E, rtol=1e-8)


def test_hutchinson_with_fixed_noise_is_exact_on_a_linear_f():
    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=D64)
    eps = torch.randn(4, 3, dtype=D64)
    x0 = torch.randn(4, 3, dtype=D64)
    T = 0.5
    res = solve_regularized(Linear(A), x0, (0.0, T), options_from("dopri5", rtol=1e-10, atol=1e-12),
                            RNODE(jacobian=1.0), noise=eps)
    # ∂f/∂x = A everywhere, so the integrand ||εᵀ A||² is constant in t
    assert torch.allclose(res.jacobian, T * ((eps @ A) ** 2).sum(1), rtol=1e-9)


def test_hutchinson_expectation_is_the_frobenius_norm():
    torch.manual_seed(1)
    A = torch.randn(3, 3, dtype=D64)
    T = 0.5
    frob = T * (A**2).sum()
    opts = options_from("dopri5", rtol=1e-10, atol=1e-12)
    # Rademacher: the mean over all 2^3 sign vectors is the expectation, exactly.
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=D64)
    res = solve_regularized(Linear(A), torch.randn(8, 3, dtype=D64), (0.0, T), opts, RNODE(jacobian=1.0), noise=signs)
    assert res.jacobian.mean().item() == pytest.approx(frob.item(), rel=1e-9)
    # Gaussian noise drawn by RNODE itself: a sample mean within 5 standard errors of the truth.
    gen = torch.Generator().manual_seed(2)
    res = solve_regularized(Linear(A), torch.zeros(4000, 3, dtype=D64), (0.0, T), opts,
                            RNODE(jacobian=1.0, noise="gaussian"), generator=gen)
    M = A @ A.T  # ||εᵀA||² = εᵀ M ε has variance 2 ||M||_F² for Gaussian ε
    se = T * math.sqrt(2 * (M**2).sum().item() / 4000)
    assert abs(res.jacobian.mean().item() - frob.item()) < 5 * se


def test_rademacher_noise_is_plus_minus_one():
    eps = RNODE(jacobian=1.0, noise="rademacher").sample_noise(torch.zeros(50, 4))
    assert set(eps.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("other, rel", [("adjoint", 1e-6), ("checkpoint", 1e-10)])
def test_gradients_agree_between_direct_and_other_methods(other, rel):
    """Adjoint: the same gradient up to the solver tolerance; checkpoint: the same to round-off."""
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=3, hidden=8).double()
    x = torch.randn(4, 3, dtype=D64)
    eps = torch.randn(4, 3, dtype=D64)
    grads = {}
    for gradient in ("direct", other):
        f.zero_grad()
        xx = x.clone().requires_grad_(True)
        opts = options_from("dopri5", rtol=1e-7, atol=1e-7, gradient=gradient)
        res = solve_regularized(f, xx, (0.0, 1.0), opts, RNODE(kinetic=0.5, jacobian=0.3), noise=eps)
        (res.solution.ys[-1].pow(2).sum() + res.regularization).backward()
        grads[gradient] = torch.cat([p.grad.flatten() for p in f.parameters()] + [xx.grad.flatten()])
        assert res.solution.ys.shape == (2, 4, 3)
    scale = grads["direct"].abs().max()
    assert (grads["direct"] - grads[other]).abs().max() < rel * scale


def test_odeblock_regularization_option():
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=2, hidden=16)
    block = odenet.ODEBlock(f, regularization=RNODE(kinetic=0.1, jacobian=0.1), gradient="adjoint")
    x = torch.randn(8, 2)
    y = block(x)
    assert y.shape == (8, 2)
    term = block.last_regularization
    assert term is not None and term.dim() == 0 and term.requires_grad and term.item() > 0
    term.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())
    assert block.last_stats.nfe_backward > 0
    # the state matches the plain block's (the integrals only add state dimensions)
    plain = odenet.ODEBlock(f, rtol=1e-3, atol=1e-3)
    assert torch.allclose(y, plain(x), atol=5e-3)
    block.eval()
    block(x)
    assert block.last_regularization is None
    with pytest.raises(TypeError, match="RNODE"):
        odenet.ODEBlock(f, regularization={"kinetic": 1.0})


def test_odeblock_regularization_works_for_images():
    torch.manual_seed(0)
    f = odenet.ConvDynamics(channels=4).double()
    block = odenet.ODEBlock(f, solver="rk4", steps=2, regularization=RNODE(kinetic=1.0, jacobian=1.0))
    y = block(torch.randn(2, 4, 5, 5, dtype=D64))
    assert y.shape == (2, 4, 5, 5) and torch.isfinite(block.last_regularization)


@pytest.mark.parametrize(
    "make, err",
    [
        (lambda: RNODE(), ValueError),
        (lambda: RNODE(kinetic=-1.0), ValueError),
        (lambda: RNODE(kinetic=float("nan")), ValueError),
        (lambda: RNODE(kinetic="1"), TypeError),
        (lambda: RNODE(jacobian=1.0, noise="uniform"), ValueError),
        (lambda: solve_regularized(Decay(1.0), X0[0], (0, 1), options_from("dopri5"), RNODE(kinetic=1.0)), ValueError),
        (lambda: solve_regularized(Decay(1.0), X0, (0, 1), options_from("dopri5"), {"kinetic": 1.0}), TypeError),
        (lambda: solve_regularized(Decay(1.0), X0, (0, 1), options_from("dopri5"), RNODE(jacobian=1.0),
                                   noise=torch.zeros(3)), ValueError),
    ],
)
def test_rnode_bad_input(make, err):
    with pytest.raises(err):
        make()


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_regularized_block_on_an_empty_batch(gradient):
    """A batch of size 0 goes through a regularised block (its reshape was ambiguous); the
    term is a mean over no samples, NaN, as torch's own losses are on an empty batch."""
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2, hidden=8), gradient=gradient,
                            regularization=odenet.RNODE(kinetic=1.0, jacobian=1.0))
    x = torch.randn(0, 2, requires_grad=True)
    y = block(x)
    y.sum().backward()
    assert y.shape == (0, 2) and x.grad.shape == (0, 2)
    assert torch.isnan(block.last_regularization)
