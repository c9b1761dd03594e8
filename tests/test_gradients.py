"""Gradients three ways (direct, adjoint, checkpoint) against each other, gradcheck and torchdiffeq."""

import pytest
import torch
import torchdiffeq

import odenet

from conftest import CountingF

GRADS = ["direct", "adjoint", "checkpoint"]


def _grads(f, y0, t, **kw):
    sol = odenet.odeint(f, y0, t, **kw)
    loss = (sol.ys[1:] ** 2).sum() + sol.ys[-1].sum()
    return torch.autograd.grad(loss, [y0, t, *f.parameters()]), sol


def _inputs(seed=0):
    torch.manual_seed(seed)
    y0 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64, requires_grad=True)
    return y0, t


@pytest.mark.parametrize("solver", ["rk4", "dopri5", "tsit5"])
def test_three_methods_agree(solver):
    f = CountingF()
    y0, t = _inputs()
    kw = dict(rtol=1e-10, atol=1e-10) if solver != "rk4" else dict(steps=40)
    direct, _ = _grads(f, y0, t, solver=solver, gradient="direct", **kw)
    ckpt, _ = _grads(f, y0, t, solver=solver, gradient="checkpoint", **kw)
    adj, _ = _grads(f, y0, t, solver=solver, gradient="adjoint", **kw)
    for d, c in zip(direct, ckpt):  # checkpoint recomputes the same steps: same gradient
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)
    adj_tol = 1e-6 if solver != "rk4" else 1e-4  # adjoint of the ODE vs gradient of the discretisation
    for d, a in zip(direct, adj):
        torch.testing.assert_close(a, d, rtol=adj_tol, atol=adj_tol)


@pytest.mark.parametrize("gradient", GRADS)
def test_gradcheck(gradient):
    """torch.autograd.gradcheck (finite differences) for y0, t and a parameter."""
    f = CountingF(dim=2)
    w = f.lin1.weight
    y0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.8], dtype=torch.float64, requires_grad=True)

    def fn(y0, t, w_):
        with torch.no_grad():
            w.copy_(w_)
        # Route the parameter through a functional call so gradcheck sees it as an input.
        out = odenet.odeint(
            lambda tt, y: torch.func.functional_call(f, {"lin1.weight": w_}, (tt, y)),
            y0, t, solver="dopri5", rtol=1e-12, atol=1e-12, gradient=gradient,
            adjoint_params=(w_,) if gradient != "direct" else None,
        )
        return out.ys

    w_ = w.detach().clone().requires_grad_(True)
    # Adaptive steps change with the inputs; at tight tolerance the solution is smooth to ~1e-10.
    assert torch.autograd.gradcheck(fn, (y0, t, w_), eps=1e-5, atol=1e-5, rtol=1e-4)


def test_direct_second_order_gradgradcheck():
    """gradient='direct' differentiates twice (gradient penalties, Hessian-vector products):
    torch.autograd.gradgradcheck of a fixed-step solve in y0 and a parameter."""
    f = CountingF(dim=2)
    y0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    w_ = f.lin1.weight.detach().clone().requires_grad_(True)

    def fn(y0, w_):
        field = lambda tt, y: torch.func.functional_call(f, {"lin1.weight": w_}, (tt, y))  # noqa: E731
        return odenet.odeint(field, y0, [0.0, 0.5], solver="rk4", steps=3).ys[-1]

    assert torch.autograd.gradgradcheck(fn, (y0, w_))


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
@pytest.mark.parametrize("loss", ["square", "sum"])
def test_second_order_through_first_order_methods_raises(gradient, loss):
    """The adjoint's and checkpoint's gradients are first order only. Differentiating one again
    (a gradient penalty, via create_graph=True) raises, naming the fix; it used to add nothing
    to the parameter gradients, silently. With create_graph=True alone the values are the usual."""
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=3, hidden=8).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    block = odenet.ODEBlock(f, gradient=gradient)
    lossfn = (lambda out: out.pow(2).sum()) if loss == "square" else (lambda out: out.sum())
    out = block(x)
    (gx,) = torch.autograd.grad(lossfn(out), x, create_graph=True)
    (plain,) = torch.autograd.grad(lossfn(block(x)), x)
    assert torch.equal(gx.detach(), plain)
    with pytest.raises(RuntimeError, match="first-order gradients only.*Use gradient='direct'"):
        (gx.pow(2).sum() + out.sum()).backward()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # torch's own advice, wanted here
@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_second_order_through_autograd_grad_and_functional_raises(gradient):
    """torch.autograd.grad with inputs=, functional.hessian and hvp run only the graph nodes on a
    path to their inputs; the error must be on that path (they used to return zeros)."""
    f = CountingF(dim=2)
    y0 = torch.randn(1, 2, dtype=torch.float64)

    def fn(y):
        return odenet.odeint(f, y, [0.0, 0.5], solver="rk4", steps=3, gradient=gradient).ys[-1].square().sum()

    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.functional.hessian(fn, y0)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.functional.hvp(fn, y0, torch.ones_like(y0))
    y = y0.clone().requires_grad_()
    (gy,) = torch.autograd.grad(fn(y), y, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(gy.square().sum(), tuple(f.parameters()))
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(gy.square().sum(), y)
    # create_graph=True alone, then an optimiser step on the values: still fine
    opt = torch.optim.SGD(f.parameters(), lr=0.0)
    fn(y).backward(create_graph=True)
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_second_order_time_gradient_raises():
    """A time gradient is computed outside the graph; differentiating it again raises. The
    state's gradient still differentiates twice with gradient='direct' while t requires grad."""
    f = CountingF(dim=2)
    y0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64, requires_grad=True)
    out = odenet.odeint(f, y0, t, solver="rk4", steps=3).ys[-1]
    g_y0, g_t = torch.autograd.grad(out.pow(2).sum(), (y0, t), create_graph=True)
    (hvp,) = torch.autograd.grad(g_y0.sum(), y0, retain_graph=True)
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0
    with pytest.raises(RuntimeError, match="output times t are first order under every gradient method"):
        g_t.sum().backward()
    with pytest.raises(RuntimeError, match="output times t are first order"):
        torch.autograd.grad(g_t.sum(), t)


class _Conditioned(torch.nn.Module):
    """f(t, x) = tanh(W x + ctx): a context computed outside f and stored on it (latent ODEs)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2).double()
        self.ctx = None

    def forward(self, t, x):
        return torch.tanh(self.lin(x) + self.ctx)


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_tensor_f_uses_outside_its_parameters_raises(gradient):
    """adjoint and checkpoint differentiate the state and f's parameters only. A context that
    requires grad, computed outside f, used to get no gradient, silently; now backward says so
    and names the fixes. The same model trains with gradient='direct'."""
    torch.manual_seed(0)
    enc, f = torch.nn.Linear(3, 2).double(), _Conditioned()
    x = torch.randn(4, 2, dtype=torch.float64)
    f.ctx = enc(torch.randn(4, 3, dtype=torch.float64))
    out = odenet.ODEBlock(f, gradient=gradient)(x)
    with pytest.raises(RuntimeError, match=r"neither the state nor a parameter of f.*gradient='direct'.*adjoint_params"):
        out.sum().backward()
    odenet.ODEBlock(f, gradient="direct")(x).sum().backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_adjoint_params_take_a_tensor_f_closes_over(gradient):
    """A plain function closing over W: without adjoint_params the backward raises; with
    adjoint_params=(W,) W gets the gradient direct backprop gives (no check: the caller chose)."""
    W = torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    kw = dict(solver="rk4", steps=8)
    out = odenet.odeint(lambda t, y: y @ W, y0, [0.0, 1.0], gradient=gradient, **kw).ys[-1]
    with pytest.raises(RuntimeError, match="neither the state nor a parameter"):
        out.sum().backward()
    (expected,) = torch.autograd.grad(odenet.odeint(lambda t, y: y @ W, y0, [0.0, 1.0], **kw).ys[-1].sum(), W)
    sol = odenet.odeint(lambda t, y: y @ W, y0, [0.0, 1.0], gradient=gradient, adjoint_params=(W,), **kw)
    (got,) = torch.autograd.grad(sol.ys[-1].sum(), W)
    tol = 1e-4 if gradient == "adjoint" else 1e-12  # adjoint: the ODE's gradient, O(h^4) from rk4's
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_f_that_sets_requires_grad_on_t_is_not_an_untracked_input(gradient):
    """FFJORD's f calls t.requires_grad_(): the time tensor odenet made for that call becomes a
    leaf of f's graph, which is not a tensor the user needs a gradient for."""

    class TimeGradF(CountingF):
        def forward(self, t, y):
            t.requires_grad_(True)
            return super().forward(t, y)

    f = TimeGradF(dim=2)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    grads = {}
    for g in ("direct", gradient):
        out = odenet.odeint(f, y0, [0.0, 1.0], rtol=1e-9, atol=1e-9, gradient=g).ys[-1]
        grads[g] = torch.autograd.grad(out.square().sum(), (y0, *f.parameters()))
    for a, b in zip(grads[gradient], grads["direct"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_leaf_f_makes_itself_is_not_an_untracked_input(gradient):
    """An energy-based f takes its energy's gradient at a leaf it makes from the state at every
    call (x = y.detach().requires_grad_()); that leaf is f's own, not a tensor from outside.
    The gradients of f's parameters are direct's (the state's gradient through f is cut by the
    detach under every method)."""

    class Energy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([[0.8, -0.3], [0.2, 1.1]], dtype=torch.float64))

        def forward(self, t, y):
            with torch.enable_grad():
                x = y.detach().requires_grad_()
                energy = (torch.tanh(x @ self.w) ** 2).sum()
                (dx,) = torch.autograd.grad(energy, x, create_graph=True)
            return -dx

    f = Energy()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    grads = {}
    for g in ("direct", gradient):
        out = odenet.odeint(f, y0, [0.0, 1.0], solver="rk4", steps=10, gradient=g).ys[-1]
        grads[g] = torch.autograd.grad(out.square().sum(), f.w)[0]
    tol = 1e-12 if gradient == "checkpoint" else 1e-3  # the adjoint: the ODE's gradient
    torch.testing.assert_close(grads[gradient], grads["direct"], rtol=tol, atol=tol)


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_input_check_under_saved_tensor_hooks(gradient):
    """Under saved-tensor hooks (activation measurements, offloading) the saved parameters
    unpack as other objects; f's own parameters must still be recognised as such."""
    f = CountingF()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with odenet.measure.saved_tensors():
        out = odenet.ODEBlock(f, gradient=gradient)(y0)
    out.sum().backward()
    assert all(p.grad is not None for p in f.parameters())


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_gradients_match_torchdiffeq(gradient):
    """Same problem through torchdiffeq: gradients within 1e-6 relative."""
    f = CountingF()
    y0, t = _inputs(1)
    ours, _ = _grads(f, y0, t, solver="dopri5", rtol=1e-11, atol=1e-11, gradient=gradient)
    if gradient == "adjoint":
        ys = torchdiffeq.odeint_adjoint(f, y0, t, method="dopri5", rtol=1e-11, atol=1e-11)
    else:
        ys = torchdiffeq.odeint(f, y0, t, method="dopri5", rtol=1e-11, atol=1e-11)
    loss = (ys[1:] ** 2).sum() + ys[-1].sum()
    ref = torch.autograd.grad(loss, [y0, t, *f.parameters()])
    names = ["y0", "t"] + [n for n, _ in f.named_parameters()]
    for name, a, b in zip(names, ours, ref):
        if name == "t" and gradient == "direct":
            # torchdiffeq's direct mode differentiates its step sizes; odenet gives the ODE's
            # time derivative f(t_i, y_i) for every method. Compare with the adjoint instead.
            continue
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1e-6, f"{name}: relative difference {rel:.2e}"


def test_time_gradient_closed_form():
    """y(t) = y0 exp(-k (t1 - t0)): d/dt1 = -k y(t1), d/dt0 = +k y(t1)."""
    k = 0.7
    y0 = torch.tensor([1.5, -0.5], dtype=torch.float64)
    for gradient in GRADS:
        t = torch.tensor([0.2, 1.1], dtype=torch.float64, requires_grad=True)
        sol = odenet.odeint(lambda tt, y: -k * y, y0, t, solver="dopri5", rtol=1e-12, atol=1e-12, gradient=gradient)
        (g,) = torch.autograd.grad(sol.ys[-1].sum(), t)
        y1 = (y0 * torch.exp(torch.tensor(-k * 0.9, dtype=torch.float64))).sum()
        torch.testing.assert_close(g, torch.stack([k * y1, -k * y1]), rtol=1e-8, atol=1e-10)


def test_decreasing_time_gradients():
    f = CountingF()
    y0 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    results = [_grads(f, y0, t, solver="dopri5", rtol=1e-10, atol=1e-10, gradient=g)[0] for g in GRADS]
    for direct, adjoint, checkpoint in zip(*results):
        torch.testing.assert_close(adjoint, direct, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(checkpoint, direct, rtol=1e-10, atol=1e-12)


def test_adjoint_seminorm_same_gradient_fewer_evaluations():
    f = CountingF()
    y0, t = _inputs(2)
    full, sol_full = _grads(f, y0, t, solver="dopri5", rtol=1e-8, atol=1e-8, gradient="adjoint")
    semi, sol_semi = _grads(f, y0, t, solver="dopri5", rtol=1e-8, atol=1e-8, gradient="adjoint", adjoint_seminorm=True)
    for a, b in zip(full, semi):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert sol_semi.stats.nfe_backward <= sol_full.stats.nfe_backward


def test_adjoint_tolerances_are_used():
    f = CountingF()
    y0, t = _inputs(3)
    _, loose = _grads(f, y0, t, solver="dopri5", rtol=1e-8, atol=1e-8, gradient="adjoint", adjoint_rtol=1e-3, adjoint_atol=1e-3)
    _, tight = _grads(f, y0, t, solver="dopri5", rtol=1e-8, atol=1e-8, gradient="adjoint")
    assert loose.stats.nfe_backward < tight.stats.nfe_backward


def test_adjoint_fixed_step():
    """The adjoint with a fixed-step solver runs backward over the forward grid."""
    f = CountingF()
    y0, t = _inputs(4)
    direct, _ = _grads(f, y0, t, solver="rk4", steps=50, gradient="direct")
    adj, sol = _grads(f, y0, t, solver="rk4", steps=50, gradient="adjoint")
    for d, a in zip(direct, adj):
        torch.testing.assert_close(a, d, rtol=1e-6, atol=1e-7)
    # 50 steps forward; backward: 50 steps of rk4 on the augmented state, 4 evals each, + t-grads.
    assert sol.stats.nfe_backward == 50 * 4 + 3


def test_float32_gradients():
    f = CountingF(dtype=torch.float32)
    y0 = torch.randn(4, 3, requires_grad=True)
    for g in GRADS:
        sol = odenet.odeint(f, y0, [0.0, 1.0], solver="dopri5", rtol=1e-5, atol=1e-6, gradient=g)
        (gy,) = torch.autograd.grad(sol.ys[-1].sum(), y0)
        assert gy.dtype == torch.float32 and torch.isfinite(gy).all()


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_f_may_differentiate_its_input(gradient):
    """f that takes d/dx inside (as RNODE/FFJORD do) works in the no-grad forward of adjoint/checkpoint."""

    class GradF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, t, z):
            x = z[:2]  # sliced before enabling grad, as augmented dynamics do
            with torch.enable_grad():
                x_ = x if x.requires_grad else x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad((self.w * x_**2).sum() / 2, x_, create_graph=True)
            return torch.cat([-g, torch.zeros_like(z[2:])])  # = -w x, and a constant

    y0 = torch.ones(3, dtype=torch.float64, requires_grad=True)
    sol = odenet.odeint(GradF(), y0, [0.0, 1.0], rtol=1e-9, atol=1e-9, gradient=gradient)
    expected = torch.tensor([0.6065306597126334, 0.6065306597126334, 1.0], dtype=torch.float64)  # exp(-1/2)
    torch.testing.assert_close(sol.ys[-1], expected, rtol=1e-7, atol=1e-9)
