"""`odenet.compat`: torchdiffeq's calls on odenet's engine, checked against torchdiffeq itself on
the same calls (solutions, gradients, options and errors), and a single output time.

Tolerances of the comparisons: fixed-step methods agree with torchdiffeq to rounding (1e-12 in
float64), output times between grid points included (both interpolate linearly). Adaptive
methods take their own steps (their first step, the last one ending on t[-1], the controller's
acceptance rule), so they agree to the solve's accuracy: odenet's error against a reference at
most 3x torchdiffeq's, solutions within 1e-6 at rtol=1e-8 (1e-4 at rtol=1e-6), adjoint
gradients within 1e-5 at rtol=1e-9; step counts within 15%.
"""

import math
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import odenet
from conftest import Counting
from odenet import compat

D = torch.float64
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=D)
Y0 = torch.tensor([[2.0, 0.0], [0.5, -1.0]], dtype=D)
T = torch.linspace(0, 5, 11, dtype=D)


def spiral(t, y):
    return y @ A


def cubic(t, y):
    return (y**3) @ A


# ---------------------------------------------------------------- fixed steps: torchdiffeq to rounding


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "rk4"])
@pytest.mark.parametrize("options", [None, dict(step_size=0.07),
                                     dict(grid_constructor=lambda f, y, t: torch.linspace(t[0], t[-1], 30, dtype=t.dtype))])
@pytest.mark.parametrize("reverse", [False, True])
def test_fixed_steps_equal_torchdiffeq(method, options, reverse):
    t = T.flip(0) if reverse else T
    ours = compat.odeint(spiral, Y0, t, method=method, options=options)
    theirs = torchdiffeq.odeint(spiral, Y0, t, method=method, options=options)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    stages = {"euler": 1, "midpoint": 2, "heun2": 2, "rk4": 4}[method]
    counter = Counting(spiral)
    torchdiffeq.odeint(counter, Y0, t, method=method, options=options)
    assert compat.last_solution().stats.nfe_forward == counter.calls == stages * compat.last_solution().stats.n_accepted


def test_rk4_is_torchdiffeqs_three_eighths_rule():
    """torchdiffeq's `rk4` is Kutta's 3/8 rule, odenet's `solver="rk4"` the classical method:
    the compat name runs torchdiffeq's method."""
    ours = compat.odeint(cubic, Y0 / 2, T, method="rk4")
    classical = odenet.odeint(cubic, Y0 / 2, T, solver="rk4").ys
    torch.testing.assert_close(ours, torchdiffeq.odeint(cubic, Y0 / 2, T, method="rk4"), rtol=0, atol=1e-12)
    assert (ours - classical).abs().max() > 1e-6


# ---------------------------------------------------------------- adaptive: torchdiffeq to the solve's accuracy


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8"])
@pytest.mark.parametrize("reverse", [False, True])
def test_adaptive_agrees_with_torchdiffeq(method, reverse):
    """Against a reference (torchdiffeq's dopri8 at rtol=1e-12), odenet's error is at most 3x
    torchdiffeq's (+1e-7) on the same call; step counts within 15% (not for dopri8: odenet's is
    DOP853, torchdiffeq's another 8th-order pair)."""
    t = T.flip(0) if reverse else T
    reference = torchdiffeq.odeint(cubic, Y0 / 2, t, method="dopri8", rtol=1e-12, atol=1e-13)
    ours = compat.odeint(cubic, Y0 / 2, t, method=method, rtol=1e-7, atol=1e-9)
    counter = Counting(cubic)
    theirs = torchdiffeq.odeint(counter, Y0 / 2, t, method=method, rtol=1e-7, atol=1e-9)
    error, their_error = (float((x - reference).abs().max()) for x in (ours, theirs))
    assert error <= 3 * their_error + 1e-7, (error, their_error)
    if method != "dopri8":
        assert abs(compat.last_solution().stats.nfe_forward - counter.calls) <= 0.15 * counter.calls


def test_default_method_and_tolerances_are_torchdiffeqs():
    ours = compat.odeint(cubic, Y0 / 2, T)
    sol = compat.last_solution()
    assert sol.stats.nfe_forward > 0 and len(sol.steps) > 0
    torch.testing.assert_close(ours, torchdiffeq.odeint(cubic, Y0 / 2, T), rtol=0, atol=1e-6)


def test_tuple_state():
    def f(t, s):
        x, v = s
        return v, -x - 0.1 * v

    y0 = (torch.tensor([1.0, 2.0], dtype=D), torch.tensor([[0.5], [0.0]], dtype=D).view(2))
    for method in ("dopri5", "rk4"):
        ours = compat.odeint(f, y0, T, method=method, rtol=(1e-8, 1e-9), atol=1e-10)
        theirs = torchdiffeq.odeint(f, y0, T, method=method, rtol=(1e-8, 1e-9), atol=1e-10)
        assert type(ours) is tuple and [o.shape for o in ours] == [(11, 2), (11, 2)]
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- options


def test_first_step_and_max_num_steps():
    compat.odeint(cubic, Y0 / 2, T, options=dict(first_step=0.01))
    assert compat.last_solution().steps[0].h == 0.01
    t2 = torch.tensor([0.0, 5.0], dtype=D)
    with pytest.raises(AssertionError, match="max_num_steps"):
        torchdiffeq.odeint(cubic, Y0 / 2, t2, options=dict(max_num_steps=5))
    with pytest.raises(odenet.SolverError, match="max_num_steps=5 allows 5 × 1 steps") as info:
        compat.odeint(cubic, Y0 / 2, t2, options=dict(max_num_steps=5))
    assert info.value.status is odenet.Status.MAX_STEPS
    assert compat.last_solution().status is odenet.Status.MAX_STEPS  # the partial solution
    assert len(compat.last_solution().steps) == 5


def test_norm_option_matches_torchdiffeq_given_it():
    def max_norm(x):
        return x.abs().max()

    ours = compat.odeint(cubic, Y0 / 2, T, rtol=1e-6, atol=1e-8, options=dict(norm=max_norm))
    n_ours = compat.last_solution().stats.nfe_forward
    counter = Counting(cubic)
    theirs = torchdiffeq.odeint(counter, Y0 / 2, T, rtol=1e-6, atol=1e-8, options=dict(norm=max_norm))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert abs(n_ours - counter.calls) <= 0.15 * counter.calls
    compat.odeint(cubic, Y0 / 2, T, rtol=1e-6, atol=1e-8)
    assert compat.last_solution().stats.nfe_forward < n_ours  # the max norm is the stricter


def test_controller_gains_are_passed_on():
    """safety, ifactor, dfactor reach the controller: a cautious one takes more steps in both.
    (torchdiffeq never shrinks the step after an accepted one, odenet's controller may: with
    these gains the counts differ by about 45%, with the default ones by under 15%.)"""
    ours, theirs = {}, {}
    for gains in (dict(), dict(safety=0.5, ifactor=2.0, dfactor=0.5)):
        ys = compat.odeint(cubic, Y0 / 2, T, rtol=1e-8, atol=1e-10, options=gains)
        ours[len(gains)] = compat.last_solution().stats.nfe_forward
        counter = Counting(cubic)
        torch.testing.assert_close(ys, torchdiffeq.odeint(counter, Y0 / 2, T, rtol=1e-8, atol=1e-10, options=gains),
                                   rtol=0, atol=1e-6)
        theirs[len(gains)] = counter.calls
    assert ours[3] > ours[0] and theirs[3] > theirs[0]


@pytest.mark.parametrize(
    "method, options, name",
    [
        ("dopri5", dict(step_t=torch.tensor([1.0])), "step_t"),
        ("dopri5", dict(jump_t=torch.tensor([1.0])), "jump_t"),
        ("dopri5", dict(min_step=0.01), "min_step"),
        ("dopri5", dict(max_step=0.1), "max_step"),
        ("dopri5", dict(dtype=torch.float32), "dtype"),
        ("euler", dict(interp="cubic"), "interp"),
    ],
)
def test_options_odenet_cannot_honour_raise(method, options, name):
    torchdiffeq.odeint(spiral, Y0, T, method=method, options=options)  # torchdiffeq takes them
    with pytest.raises(ValueError, match=f"'{name}'.*" + ("backend='torchdiffeq'" if name != "dtype" else "")):
        compat.odeint(spiral, Y0, T, method=method, options=options)
    ours = compat.odeint(spiral, Y0, T, method=method, options=options, backend="torchdiffeq")
    assert torch.equal(ours, torchdiffeq.odeint(spiral, Y0, T, method=method, options=options))


def test_options_that_mean_off_are_accepted():
    compat.odeint(spiral, Y0, T, method="rk4", options=dict(perturb=False, interp="linear"))
    compat.odeint(spiral, Y0, T, options=dict(min_step=0, max_step=math.inf, step_t=None, dtype=torch.float64))


def test_unknown_options_warn_as_in_torchdiffeq():
    with pytest.warns(UserWarning, match="Unexpected arguments"):
        torchdiffeq.odeint(spiral, Y0, T, options=dict(step_size=0.1))
    with pytest.warns(UserWarning, match="unexpected options.*step_size"):
        compat.odeint(spiral, Y0, T, options=dict(step_size=0.1))
    with pytest.raises(ValueError, match="mutually exclusive"):
        torchdiffeq.odeint(spiral, Y0, T, method="euler", options=dict(step_size=0.1, grid_constructor=lambda *a: T))
    with pytest.raises(ValueError, match="mutually exclusive"):
        compat.odeint(spiral, Y0, T, method="euler", options=dict(step_size=0.1, grid_constructor=lambda *a: T))


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")  # torchdiffeq's implicit_adams
@pytest.mark.parametrize("method", ["fehlberg2", "adaptive_heun", "heun3", "explicit_adams", "implicit_adams"])
def test_other_methods_name_the_torchdiffeq_backend(method):
    with pytest.raises(ValueError, match=f"Invalid method '{method}'.*'dopri5'.*'rk4'.*backend='torchdiffeq'"):
        compat.odeint(spiral, Y0, T, method=method)
    ours = compat.odeint(spiral, Y0, T, method=method, rtol=1e-4, atol=1e-6, backend="torchdiffeq")  # handed over
    assert torch.equal(ours, torchdiffeq.odeint(spiral, Y0, T, method=method, rtol=1e-4, atol=1e-6))
    assert compat.last_solution() is None


def test_invalid_method_is_a_value_error_in_both():
    for solve in (torchdiffeq.odeint, compat.odeint):
        with pytest.raises(ValueError, match="nope"):
            solve(spiral, Y0, T, method="nope")
    with pytest.raises(ValueError, match="backend 'jax'"):
        compat.odeint(spiral, Y0, T, backend="jax")


def test_event_fn_on_both_backends():
    def event(t, y):
        return y[0, 0] - 1.0

    t2 = torch.tensor([0.0, 5.0], dtype=D)
    ours_t, ours = compat.odeint(spiral, Y0, t2, event_fn=event)
    event_t, ys = compat.odeint(spiral, Y0, t2, event_fn=event, backend="torchdiffeq")
    assert 0 < float(event_t) < 5 and abs(float(ys[-1, 0, 0]) - 1.0) < 1e-6
    assert abs(float(ours_t) - float(event_t)) < 1e-6 and ours.shape == ys.shape
    torch.testing.assert_close(ours[-1], ys[-1], rtol=0, atol=1e-6)


def test_per_element_tolerances_are_not_taken():
    with pytest.raises(ValueError, match="rtol is a tensor of 4 elements.*backend='torchdiffeq'"):
        compat.odeint(spiral, Y0, T, rtol=torch.full((2, 2), 1e-6))
    compat.odeint(spiral, Y0, T, rtol=torch.tensor(1e-6), atol=torch.tensor(1e-8))  # one number as a tensor


# ---------------------------------------------------------------- the adjoint


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin1 = torch.nn.Linear(2, 16).double()
        self.lin2 = torch.nn.Linear(16, 2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=D) * 0.5)

    def forward(self, t, y):
        return self.lin2(torch.tanh(self.lin1(y)))


@pytest.mark.parametrize(
    "kw, tol",
    [
        (dict(rtol=1e-9, atol=1e-11), 1e-6),
        (dict(rtol=1e-9, atol=1e-11, adjoint_options=dict(norm="seminorm")), 1e-6),
        (dict(rtol=1e-9, atol=1e-11, adjoint_rtol=1e-10, adjoint_atol=1e-12), 1e-6),
        (dict(method="rk4", options=dict(step_size=0.05)), 1e-12),  # the backward grid is the forward's: 1.0/0.05 steps
    ],
)
def test_adjoint_gradients_agree_with_torchdiffeq(kw, tol):
    func = Field()
    y0 = Y0.clone().requires_grad_()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    results = []
    for solve in (compat.odeint_adjoint, torchdiffeq.odeint_adjoint):
        ys = solve(func, y0, t, **kw)
        results.append((ys, torch.autograd.grad(ys.pow(2).sum(), (y0, *func.parameters()))))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=0, atol=tol)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=10 * tol)


def test_adjoint_stats_and_tuple_state():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.3, dtype=D))

        def forward(self, t, s):
            return s[1], -s[0] - self.w * s[1]

    m = M()
    x0 = (torch.tensor([1.0, 2.0], dtype=D, requires_grad=True), torch.tensor([0.5, -1.0], dtype=D, requires_grad=True))
    grads = []
    for solve in (compat.odeint_adjoint, torchdiffeq.odeint_adjoint):
        ys = solve(m, x0, T, rtol=1e-9, atol=1e-11)
        grads.append(torch.autograd.grad(ys[0][-1].sum() + ys[1].pow(2).sum(), (*x0, m.w)))
        if solve is compat.odeint_adjoint:
            assert compat.last_solution().stats.nfe_backward > 0 and type(ys) is tuple
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adjoint_errors_as_torchdiffeq():
    for solve in (torchdiffeq.odeint_adjoint, compat.odeint_adjoint):
        with pytest.raises(ValueError, match="nn.Module.*adjoint_params"):
            solve(spiral, Y0, T)
    compat.odeint_adjoint(spiral, Y0, T, adjoint_params=())  # allowed, as in torchdiffeq
    with pytest.raises(ValueError, match="adjoint_method='rk4' differs from method='dopri5'.*backend='torchdiffeq'"):
        compat.odeint_adjoint(Field(), Y0, T, adjoint_method="rk4")
    with pytest.raises(ValueError, match=r"adjoint_options=\{'norm': \.\.\.\}"):
        compat.odeint_adjoint(Field(), Y0, T, adjoint_options=dict(norm=lambda x: x.abs().max()))
    with pytest.raises(ValueError, match=r"adjoint_options\['step_size'\]=0.1 differs"):
        compat.odeint_adjoint(Field(), Y0, T, method="rk4", adjoint_options=dict(step_size=0.1))
    compat.odeint_adjoint(Field(), Y0, T, method="rk4", options=dict(step_size=0.1), adjoint_options=dict(step_size=0.1))


# ---------------------------------------------------------------- failures and last_solution


def test_failures_raise_where_torchdiffeq_asserts():
    nan = torch.tensor([[float("nan"), 1.0]], dtype=D)
    with pytest.raises(AssertionError, match="underflow"):
        torchdiffeq.odeint(spiral, nan, T)
    with pytest.raises(odenet.SolverError, match="non-finite") as info:
        compat.odeint(spiral, nan, T)
    assert info.value.status is odenet.Status.NONFINITE
    with pytest.raises(odenet.SolverError) as info:
        compat.odeint(lambda t, y: y**2, torch.ones(1, dtype=D), torch.tensor([0.0, 2.0], dtype=D))
    assert info.value.status is odenet.Status.STEP_UNDERFLOW


def test_last_solution_follows_the_calls():
    compat.odeint(spiral, Y0, T, method="rk4")
    first = compat.last_solution()
    assert first.stats.nfe_forward == 40 and first.ys.shape == (11, 2, 2) and first.success
    compat.odeint(spiral, Y0, T, method="euler", backend="torchdiffeq")
    assert compat.last_solution() is None


# ---------------------------------------------------------------- a single output time


@pytest.mark.parametrize("backend", ["odenet", "torchdiffeq"])
@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_single_output_time_returns_y0(backend, gradient):
    if backend == "torchdiffeq" and gradient == "checkpoint":
        pytest.skip("checkpoint is odenet's own")
    y0 = Y0.clone().requires_grad_()
    counter = Counting(spiral)
    sol = odenet.odeint(counter, y0, [0.3], gradient=gradient, backend=backend)
    assert sol.ys.shape == (1, 2, 2) and torch.equal(sol.ys[0], Y0) and sol.ys.data_ptr() != y0.data_ptr()
    assert counter.calls == 0 and sol.stats.nfe_forward == 0 and sol.success
    (g,) = torch.autograd.grad(sol.ys.sum(), y0)
    assert torch.equal(g, torch.ones_like(Y0))


def test_single_output_time_in_compat_as_torchdiffeq():
    t = torch.tensor([0.3], dtype=D)
    for method in ("dopri5", "rk4"):
        ours = compat.odeint(spiral, Y0, t, method=method)
        assert torch.equal(ours, torchdiffeq.odeint(spiral, Y0, t, method=method))
        assert compat.last_solution().stats.nfe_forward == 0


def test_no_output_time_is_an_error():
    with pytest.raises(ValueError, match="at least one time"):
        odenet.odeint(spiral, Y0, [])


def test_compat_is_documented_as_torchdiffeq_signatures():
    """The same keywords as torchdiffeq's functions, plus `backend`."""
    import inspect

    for ours, theirs in ((compat.odeint, torchdiffeq.odeint), (compat.odeint_adjoint, torchdiffeq.odeint_adjoint)):
        a, b = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
        assert [k for k in a if k != "backend"] == list(b)
        assert all(a[k].default == b[k].default for k in b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.odeint(spiral, Y0, T)  # no warning on a plain call


def _fall(t, y):
    return torch.stack([y[1], torch.full_like(y[1], -9.81)])


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_odeint_event_against_torchdiffeq_and_closed_form(interface):
    """A ball dropped from height 1: the first root of y[0] at sqrt(2/9.81); the event time's
    gradient with respect to the height, d/dh sqrt(2h/g) = 1/sqrt(2 g h)."""
    ours_fn = getattr(odenet.compat, interface)
    theirs_fn = getattr(torchdiffeq, interface)
    out = []
    for event, fn in ((odenet.compat.odeint_event, ours_fn), (torchdiffeq.odeint_event, theirs_fn)):
        h = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        f = _Fall() if interface == "odeint_adjoint" else _fall
        y0 = torch.stack([h, torch.zeros((), dtype=torch.float64)])
        t, ys = event(f, y0, torch.tensor(0.0, dtype=torch.float64), event_fn=lambda t, y: y[0],
                      odeint_interface=fn, rtol=1e-10, atol=1e-10)
        (grad,) = torch.autograd.grad(t, h)
        out.append((t.item(), ys.shape, grad.item()))
    (t_ours, shape, g_ours), (t_theirs, _, g_theirs) = out
    assert shape == (2, 2) and abs(t_ours - math.sqrt(2 / 9.81)) < 1e-9 and abs(t_ours - t_theirs) < 1e-7
    assert abs(g_ours - 1 / math.sqrt(2 * 9.81)) < 1e-7 and abs(g_ours - g_theirs) < 1e-6


class _Fall(nn.Module):
    def forward(self, t, y):
        return _fall(t, y)


def _fall_tuple(t, state):
    x, v = state
    return v, torch.full_like(x, -9.81)


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_odeint_event_with_a_tuple_state_and_per_leaf_tolerances(interface):
    """A tuple `(height, velocity)` thrown up at v0 from height 1: the first root of the height at
    t = (v0 + sqrt(v0² + 2g)) / g, with dt/dv0 = (1 + v0 / sqrt(v0² + 2g)) / g; torchdiffeq on the
    same call gives the same time and states of the same structure."""
    g, v = 9.81, 0.5
    out = []
    for event, fn in ((odenet.compat.odeint_event, getattr(odenet.compat, interface)),
                      (torchdiffeq.odeint_event, getattr(torchdiffeq, interface))):
        v0 = torch.tensor([v], dtype=torch.float64, requires_grad=True)
        f = _FallTuple() if interface == "odeint_adjoint" else _fall_tuple
        # (torchdiffeq's adjoint takes no per-leaf rtol for a tuple state)
        kw = dict(adjoint_params=(v0,), rtol=1e-10) if interface == "odeint_adjoint" else dict(rtol=(1e-10, 1e-8))
        t, ys = event(f, (torch.ones(1, dtype=torch.float64), v0), torch.tensor(0.0, dtype=torch.float64),
                      event_fn=lambda t, s: s[0], odeint_interface=fn, atol=1e-12, **kw)
        (grad,) = torch.autograd.grad(t, v0)
        out.append((t.item(), ys, grad.item()))
    (t_ours, ys, g_ours), (t_theirs, ys_theirs, _) = out
    root = math.sqrt(v * v + 2 * g)
    assert abs(t_ours - (v + root) / g) < 1e-9 and abs(t_ours - t_theirs) < 1e-7
    assert abs(g_ours - (1 + v / root) / g) < 1e-7
    assert type(ys) is tuple and [y.shape for y in ys] == [y.shape for y in ys_theirs] == [(2, 1), (2, 1)]
    assert abs(ys[1][-1].item() + root) < 1e-7 and abs(ys[0][-1].item()) < 1e-9


class _FallTuple(nn.Module):
    def forward(self, t, state):
        return _fall_tuple(t, state)


def test_odenet_odeint_event_with_a_dict_state_and_per_leaf_tolerances():
    t, sol = odenet.events.odeint_event(lambda t, s: {"x": s["v"], "v": -9.81 * torch.ones_like(s["x"])},
                                        {"x": torch.ones(()), "v": torch.zeros(())}, 0.0,
                                        lambda t, s: s["x"], rtol={"x": 1e-8, "v": 1e-6}, atol=1e-10)
    assert abs(t.item() - math.sqrt(2 / 9.81)) < 1e-5
    assert set(sol.ys) == {"x", "v"} and sol.ys["x"].shape == (2,) and abs(sol.ys["x"][-1].item()) < 1e-5


def _jump(t, y):
    """(1 + y) times 2 before t = 0.5, 1 after, 0 exactly there: only one-sided times see the jump as it is."""
    return (1.0 + y) * ((t > 0.5).to(y.dtype) + 2.0 * (t < 0.5).to(y.dtype))


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "rk4"])
@pytest.mark.parametrize("reverse", [False, True])
def test_perturb_against_torchdiffeq(method, reverse):
    """options={'perturb': True}: stage times at a step's ends are their one-sided limits, as in
    torchdiffeq (which sees the jump at a grid point where the plain call does not)."""
    t = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=torch.float64)
    y0 = torch.zeros(1, dtype=torch.float64)
    kw = dict(method=method, options=dict(step_size=0.25, perturb=True))
    ours, theirs = compat.odeint(_jump, y0, t, **kw), torchdiffeq.odeint(_jump, y0, t, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    plain = compat.odeint(_jump, y0, t, method=method, options=dict(step_size=0.25))
    assert not torch.allclose(ours, plain)


def test_perturb_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="fixed-grid methods"):
        compat.odeint(_jump, torch.zeros(1), torch.tensor([0.0, 1.0]), options=dict(perturb=True))
    f = _Fall()
    with pytest.raises(ValueError, match="odeint_adjoint"):
        compat.odeint_adjoint(f, torch.zeros(2), torch.tensor([0.0, 1.0]), method="euler",
                              options=dict(step_size=0.25, perturb=True))
