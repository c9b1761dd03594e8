"""Per-call context (`block(x, mask=m)` reaches `f(t, x, mask=m)`) and learnable depth (`t1` an `nn.Parameter`).

Ground truth: an explicitly unrolled Euler loop and finite differences for the context's
gradients; the closed form `d/dT exp(A T) y0 = A exp(A T) y0` for the end time's.
"""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import odenet  # noqa: E402
from odenet import plotting  # noqa: E402

from conftest import A_SPIRAL  # noqa: E402

GRADS = ["direct", "checkpoint", "adjoint"]
F64 = torch.float64


class Conditioned(nn.Module):
    """f(t, x, c) = tanh(W x + c) * scale: `c` (required) a per-sample conditioning vector."""

    def __init__(self, dim=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(dim, dim).double()

    def forward(self, t, x, c, scale=1.0):
        return torch.tanh(self.lin(x) + c) * scale


def _setup(seed=0):
    """f, a state x, a leaf context c and a label encoder (its output is a non-leaf context)."""
    f = Conditioned(seed=seed)
    torch.manual_seed(seed + 1)
    enc = nn.Linear(2, 3).double()
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    label = torch.randn(4, 2, dtype=F64)
    return f, enc, x, label


def _grads(block, f, enc, x, label):
    """Gradients of a loss of `block(x, c=enc(label))` for x, enc's and f's parameters."""
    y = block(x, c=enc(label), scale=0.7)
    loss = (y**2).sum() + y[:, 0].sum()
    return torch.autograd.grad(loss, (x, *enc.parameters(), *f.parameters()))


# ------------------------------------------------------------------------------------- context


@pytest.mark.parametrize("gradient", ["direct", "checkpoint"])
def test_context_euler_is_the_unrolled_loop(gradient):
    """ODEBlock(euler, N steps)(x, c=c) is N explicit steps x + h f(t, x, c): same output, same gradients
    (the adjoint's gradient is the ODE's, not Euler's: checked against direct's below)."""
    f, enc, x, label = _setup()
    n, h = 4, 0.25  # a power of two: the block's grid steps are exactly h
    block = odenet.ODEBlock(f, "euler", steps=n, gradient=gradient)
    got = _grads(block, f, enc, x, label)

    c, y = enc(label), x
    for i in range(n):
        y = torch.add(y, f(torch.tensor(i * h, dtype=F64), y, c=c, scale=0.7), alpha=h)
    assert torch.equal(block(x, c=c, scale=0.7), y)
    loss = (y**2).sum() + y[:, 0].sum()
    expected = torch.autograd.grad(loss, (x, *enc.parameters(), *f.parameters()))
    assert all(g.abs().sum() > 0 for g in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_context_direct_gradient_is_finite_differences():
    f, _, x, _ = _setup()
    block = odenet.ODEBlock(f, "rk4", steps=4)
    c = torch.randn(4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: block(x, c=c), (x, c))


@pytest.mark.parametrize("solver", ["rk4", "dopri5"])  # a fixed-step and an adaptive solver
@pytest.mark.parametrize("gradient", ["checkpoint", "adjoint"])
def test_context_gradients_match_direct(solver, gradient):
    """A context tensor (leaf or computed by an encoder) gets direct's gradient from checkpoint
    (to rounding) and adjoint (to its tolerance), as do x and the parameters."""
    f, enc, x, label = _setup()
    kw = dict(steps=40) if solver == "rk4" else dict(rtol=1e-10, atol=1e-10)
    direct = _grads(odenet.ODEBlock(f, solver, **kw), f, enc, x, label)
    got = _grads(odenet.ODEBlock(f, solver, gradient=gradient, **kw), f, enc, x, label)
    tol = 1e-10 if gradient == "checkpoint" else (1e-4 if solver == "rk4" else 1e-6)
    for g, d in zip(got, direct):
        torch.testing.assert_close(g, d, rtol=tol, atol=tol)
    # A leaf context is differentiated too.
    c = torch.randn(4, 3, dtype=F64, requires_grad=True)
    (g_c,) = torch.autograd.grad(odenet.ODEBlock(f, solver, gradient=gradient, **kw)(x, c=c).sum(), c)
    (d_c,) = torch.autograd.grad(odenet.ODEBlock(f, solver, **kw)(x, c=c).sum(), c)
    torch.testing.assert_close(g_c, d_c, rtol=tol, atol=tol)


@pytest.mark.parametrize("gradient", GRADS)
def test_context_reaches_solve_and_trajectory_and_time_gradients(gradient):
    f, _, x, _ = _setup()
    c = torch.randn(4, 3, dtype=F64, requires_grad=True)
    block = odenet.ODEBlock(f, "dopri5", rtol=1e-9, atol=1e-9, gradient=gradient)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    ys = block.trajectory(x, t, c=c)
    sol = block.solve(x, c=c)
    torch.testing.assert_close(ys[-1], sol.ys[-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ys[-1], block(x, c=c), rtol=1e-12, atol=1e-12)
    g_t, g_c = torch.autograd.grad(ys.sum(), (t, c))  # time gradients evaluate f(t, y, c=c) too
    with torch.no_grad():
        f_end = f(t[-1], ys[-1], c=c)
    torch.testing.assert_close(g_t[-1], f_end.sum(), rtol=1e-12, atol=1e-12)
    assert g_c.abs().sum() > 0


class Attention(nn.Module):
    """One head of self-attention on [B, L, D] tokens with an optional boolean mask (True: may attend)."""

    def __init__(self, dim=4):
        super().__init__()
        torch.manual_seed(3)
        self.q, self.k, self.v = (nn.Linear(dim, dim).double() for _ in range(3))

    def forward(self, t, x, mask=None):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.tanh(torch.softmax(scores, -1) @ self.v(x))


@pytest.mark.parametrize("gradient", GRADS)
def test_causal_mask_changes_the_output_as_it_should(gradient):
    """With a causal mask, token i never sees tokens after it; without, it does. A boolean mask
    (no grad) passes through every gradient method, and backward runs."""
    f = Attention()
    L = 5
    x = torch.randn(2, L, 4, dtype=F64, requires_grad=True)
    x2 = x.detach().clone()
    x2[:, -1] += 1.0  # change the last token only
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    block = odenet.ODEBlock(f, "rk4", steps=6, gradient=gradient)
    y, y2 = block(x, mask=causal), block(x2, mask=causal)
    torch.testing.assert_close(y[:, :-1], y2[:, :-1], rtol=0, atol=1e-14)  # earlier tokens unchanged
    assert (y[:, -1] - y2[:, -1]).abs().max() > 1e-3
    free, free2 = block(x), block(x2)
    assert (free[:, :-1] - free2[:, :-1]).abs().max() > 1e-3  # without the mask, they see the last token
    (g,) = torch.autograd.grad(y[:, 0].sum(), x)
    assert g[:, 1:].abs().max() == 0 and g[:, 0].abs().sum() > 0  # token 0 depends on token 0 only


@pytest.mark.parametrize("gradient", GRADS)
def test_non_tensor_context_passes_through(gradient):
    seen = []

    class Configured(Conditioned):
        def forward(self, t, x, c, scale=1.0, config=None, names=()):
            seen.append((config, names))
            return super().forward(t, x, c, scale * config["gain"])

    f, _, x, _ = _setup()
    g = Configured()
    g.load_state_dict(f.state_dict())
    config, names = {"gain": 0.5}, ("a", "b")
    c = torch.randn(4, 3, dtype=F64, requires_grad=True)
    block = odenet.ODEBlock(g, "dopri5", rtol=1e-9, atol=1e-9, gradient=gradient)
    y = block(x, c=c, scale=1.4, config=config, names=names)
    y.sum().backward()
    assert seen and all(cf is config and nm is names for cf, nm in seen)  # the objects themselves, every call
    torch.testing.assert_close(y, odenet.ODEBlock(f, "dopri5", rtol=1e-9, atol=1e-9)(x, c=c, scale=0.7))
    assert c.grad is not None and c.grad.abs().sum() > 0


@pytest.mark.parametrize("gradient", ["checkpoint", "adjoint"])
def test_context_with_regularization(gradient):
    """With regularization=, a training block threads the context through the augmented solve;
    the context's gradient (of output plus regularisation term) matches direct's."""
    f, enc, x, label = _setup()

    def grads(g):
        block = odenet.ODEBlock(f, "dopri5", rtol=1e-10, atol=1e-10, gradient=g,
                                regularization=odenet.RNODE(kinetic=0.1))
        y = block(x, c=enc(label))
        loss = y.sum() + block.last_regularization
        return torch.autograd.grad(loss, (x, *enc.parameters(), *f.parameters()))

    tol = 1e-10 if gradient == "checkpoint" else 1e-6
    for g, d in zip(grads(gradient), grads("direct")):
        torch.testing.assert_close(g, d, rtol=tol, atol=tol)


def test_context_with_torchdiffeq_backend():
    f, enc, x, label = _setup()
    kw = dict(rtol=1e-10, atol=1e-10)
    direct = _grads(odenet.ODEBlock(f, "dopri5", **kw), f, enc, x, label)
    for g in ("direct", "adjoint"):
        got = _grads(odenet.ODEBlock(f, "dopri5", backend="torchdiffeq", gradient=g, **kw), f, enc, x, label)
        for a, d in zip(got, direct):
            torch.testing.assert_close(a, d, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ learnable depth


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("A", torch.tensor(A_SPIRAL, dtype=F64))

    def forward(self, t, y):
        return y @ self.A.T


@pytest.mark.parametrize("gradient", GRADS)
@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_learnable_t1_gradient_is_the_closed_form(gradient, solver):
    """L = w · exp(A T) y0 has dL/dT = w · A exp(A T) y0."""
    T = 1.3
    A = torch.tensor(A_SPIRAL, dtype=F64)
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=F64)
    w = torch.tensor([[0.3, -0.7], [1.1, 0.2]], dtype=F64)
    kw = dict(steps=64) if solver == "rk4" else dict(rtol=1e-10, atol=1e-12)
    block = odenet.ODEBlock(Linear(), solver, t1=nn.Parameter(torch.tensor(T, dtype=F64)), gradient=gradient, **kw)
    assert [n for n, _ in block.named_parameters()] == ["t1"]
    (g,) = torch.autograd.grad((block(y0) * w).sum(), block.t1)
    exact = (w * (y0 @ torch.linalg.matrix_exp(A * T).T @ A.T)).sum()
    tol = 1e-6 if solver == "rk4" else 1e-8
    torch.testing.assert_close(g, exact, rtol=tol, atol=tol)


def test_training_t1_moves_it_to_the_target_depth():
    A = torch.tensor(A_SPIRAL, dtype=F64)
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=F64)
    target = y0 @ torch.linalg.matrix_exp(A * 1.5).T
    block = odenet.ODEBlock(Linear(), "rk4", t1=nn.Parameter(torch.tensor(1.0, dtype=F64)), steps=16,
                            gradient="adjoint")
    opt = torch.optim.Adam(block.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        ((block(y0) - target) ** 2).sum().backward()
        opt.step()
    assert abs(block.t1.item() - 1.5) < 0.02


def test_learnable_t1_with_the_rest_of_the_library():
    """repr, swap_blocks, plotting, trajectory, regularization, state_dict and dtype conversion."""
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=2, hidden=8)
    block = odenet.ODEBlock(f, "rk4", steps=4, t1=nn.Parameter(torch.tensor(1.25)))
    assert "t1=1.25 (learnable)" in repr(block) and block.interval == (0.0, 1.25)
    assert "t1" in block.state_dict()
    x = torch.randn(6, 2)
    ys = block.trajectory(x, torch.linspace(0, 1.25, 5))
    torch.testing.assert_close(ys[-1], block(x))
    ys.sum().backward()  # t is a plain tensor here: no gradient for t1
    assert block.t1.grad is None

    res = odenet.swap_blocks(block, "euler", steps=1)
    assert isinstance(res, odenet.ResBlock) and res.h == 1.25
    ode = odenet.swap_blocks(odenet.ODEBlock(f, "rk4", steps=4, t1=nn.Parameter(torch.tensor(1.25))), "dopri5")
    assert ode.interval == (0.0, 1.25)
    plotting.plot_trajectories(block, x)
    plotting.plot_trajectories(odenet.ODEBlock(f, t1=nn.Parameter(torch.tensor(0.5))), x)

    reg = odenet.ODEBlock(f, "rk4", steps=4, t1=nn.Parameter(torch.tensor(1.25)),
                          regularization=odenet.RNODE(kinetic=0.1))
    (reg(x).sum() + reg.last_regularization).backward()
    assert reg.t1.grad is not None and reg.t1.grad != 0

    double = odenet.ODEBlock(odenet.MLPDynamics(dim=2, hidden=8), t1=nn.Parameter(torch.tensor(0.5))).double()
    assert double.t1.dtype == F64 and double(x.double()).dtype == F64


@pytest.mark.parametrize("bad, error, match", [
    (nn.Parameter(torch.tensor([1.0])), ValueError, "0-dim"),
    (nn.Parameter(torch.ones(2, 2)), ValueError, "0-dim"),
    (torch.tensor(1), TypeError, "floating"),
    (torch.tensor(1.0, requires_grad=True), TypeError, "nn.Parameter"),
    (nn.Parameter(torch.tensor(float("nan"))), TypeError, "finite"),
    (nn.Parameter(torch.tensor(0.0)), ValueError, "must differ"),
])
def test_bad_t1_raises(bad, error, match):
    with pytest.raises(error, match=match):
        odenet.ODEBlock(odenet.MLPDynamics(dim=2), t1=bad)


def test_plain_tensor_t1_is_a_number():
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2), t1=torch.tensor(2.0))
    assert block.t1 == 2.0 and isinstance(block.t1, float) and not list(n for n, _ in block.named_parameters()
                                                                        if n == "t1")
