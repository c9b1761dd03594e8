"""Events: stop at the first root of event_fn(t, y), with a differentiable event time.

Checked against closed forms (free fall, torchdiffeq's bouncing ball), torchdiffeq's
`odeint_event` (times and gradients, direct and adjoint) and central finite differences.
"""

import math

import pytest
import torch
import torchdiffeq
from torch import nn

import odenet
from odenet.events import NoEventError, _EventSearch, odeint_event
from odenet.solvers.integrate import integrate
from odenet.solvers.rk import get_solver
from odenet.solvers.stats import SolveStats

D = torch.float64
GRADIENTS = ["direct", "adjoint", "checkpoint"]


def fall(g):
    """Free fall under gravity `g`, state [height, velocity]."""
    return lambda t, y: torch.stack([y[1], -g * torch.ones_like(y[1])])


def height(t, y):
    return y[0]


# ------------------------------------------------------------------ where the event is


@pytest.mark.parametrize("solver", ["bosh3", "dopri5", "tsit5", "dopri8"])
def test_free_fall_time_adaptive(solver):
    # A quadratic trajectory: every method here integrates it exactly, so only the root search is tested.
    y0 = torch.tensor([10.0, 1.5], dtype=D)
    t, sol = odeint_event(fall(9.81), y0, 0.5, height, solver=solver, rtol=1e-8, atol=1e-10)
    exact = 0.5 + (1.5 + math.sqrt(1.5**2 + 2 * 9.81 * 10.0)) / 9.81
    assert t.dtype == D and t.shape == ()
    assert abs(float(t) - exact) < 1e-12
    assert sol.success and sol.ys.shape == (2, 2) and torch.equal(sol.ys[0], y0)
    assert torch.allclose(sol.ts, torch.tensor([0.5, exact], dtype=D), rtol=0, atol=1e-12)
    # The state is on the side the solve came from, at the root up to the dense output's rounding.
    assert 0.0 < float(sol.ys[-1, 0]) < 1e-11
    assert abs(float(sol.ys[-1, 1]) - (1.5 - 9.81 * (exact - 0.5))) < 1e-10


@pytest.mark.parametrize("solver", ["midpoint", "heun", "rk4"])
def test_free_fall_time_fixed_steps(solver):
    # Second-order and higher methods with their dense output are exact on a quadratic trajectory.
    y0 = torch.tensor([10.0, 0.0], dtype=D)
    t, sol = odeint_event(fall(9.81), y0, 0.0, height, solver=solver, step_size=0.1)
    assert abs(float(t) - math.sqrt(2 * 10.0 / 9.81)) < 1e-12
    assert sol.stats.n_accepted == math.ceil(float(t) / 0.1)  # stops in the step of the event
    assert len(sol.steps) == sol.stats.n_accepted


def test_euler_uses_its_polygon():
    # Euler's dense output is linear between steps: the root of the Euler polygon.
    y0 = torch.tensor([1.0], dtype=D)
    t, _ = odeint_event(lambda t, y: -torch.ones_like(y) * (1 + t), y0, 0.0, height, solver="euler", t_max=2.0,
                        steps=4)
    # Euler at t=0.5 from 1: 1 - 0.5 = 0.5; at t=1: 0.5 - 0.5*1.5 = -0.25; linear root at 0.5 + 0.5*(0.5/0.75).
    assert abs(float(t) - (0.5 + 0.5 * (0.5 / 0.75))) < 1e-14


def test_any_element_crossing_and_torchdiffeq_times():
    # A rotating state; the first of several watched quantities to change sign ends the solve.
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=D)
    f = lambda t, y: y @ A.T
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    ev = lambda t, y: torch.stack([y[0] - 0.5, y[1] + 0.9, 3.0 - t])  # y0 = cos t reaches 0.5 at pi/3 first
    t, sol = odeint_event(f, y0, 0.0, ev, rtol=1e-10, atol=1e-12)
    assert abs(float(t) - math.pi / 3) < 1e-9
    td_t, td_sol = torchdiffeq.odeint_event(f, y0, torch.tensor(0.0, dtype=D), event_fn=ev, rtol=1e-10, atol=1e-12)
    assert abs(float(t) - float(td_t)) < 1e-10  # torchdiffeq bisects to atol in time
    assert torch.allclose(sol.ys[-1], td_sol[-1], rtol=0, atol=1e-9)


def test_reverse_time_matches_torchdiffeq():
    f = lambda t, y: torch.stack([y[1], -torch.sin(y[0])])  # a pendulum
    y0 = torch.tensor([0.0, 1.0], dtype=D)
    ev = lambda t, y: y[0] + 0.3
    grads = []
    for ours in (True, False):
        x0 = y0.clone().requires_grad_(True)
        if ours:
            t, sol = odeint_event(f, x0, 1.0, ev, reverse_time=True, rtol=1e-10, atol=1e-12)
            y = sol.ys[-1]
        else:
            t, ys = torchdiffeq.odeint_event(f, x0, torch.tensor(1.0, dtype=D), event_fn=ev, reverse_time=True,
                                             rtol=1e-10, atol=1e-12)
            y = ys[-1]
        (t + y[1]).backward()
        grads.append((t.detach(), y.detach(), x0.grad))
    (t, y, g), (td_t, td_y, td_g) = grads
    assert float(t) < 1.0 and abs(float(t) - float(td_t)) < 1e-10
    assert torch.allclose(y, td_y, rtol=0, atol=1e-9)
    assert torch.allclose(g, td_g, rtol=1e-7, atol=1e-8)


def test_float32_to_its_resolution():
    y0 = torch.tensor([10.0, 0.0])
    t, sol = odeint_event(fall(9.81), y0, 0.0, height, rtol=1e-6, atol=1e-6)
    assert t.dtype == torch.float32 and sol.ys.dtype == torch.float32
    assert abs(float(t) - math.sqrt(2 * 10.0 / 9.81)) < 1e-6


# ------------------------------------------------------------------ gradients


class Field(nn.Module):
    """A nonlinear, time-dependent field."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=D))
        self.b = nn.Parameter(torch.tensor([0.2, -0.1], dtype=D))

    def forward(self, t, y):
        return torch.tanh(y @ self.A.T + self.b) + 0.1 * torch.cos(t)


class Level(nn.Module):
    """An event with parameters and an explicit dependence on time."""

    def __init__(self):
        super().__init__()
        self.level = nn.Parameter(torch.tensor(0.3, dtype=D))
        self.slope = nn.Parameter(torch.tensor(0.05, dtype=D))

    def forward(self, t, y):
        return y[..., 0] - self.level - self.slope * t


W = torch.tensor([0.7, -1.3], dtype=D)


def _problem():
    f, ev = Field(), Level()
    y0 = torch.tensor([1.0, 0.0], dtype=D, requires_grad=True)
    t0 = torch.tensor(0.2, dtype=D, requires_grad=True)
    return f, ev, y0, t0, (y0, t0, f.A, f.b, ev.level, ev.slope)


def _loss(t, y):
    return t + (W * y).sum()  # the event time and the state there


def _odenet_grads(gradient, tol=1e-10):
    f, ev, y0, t0, inputs = _problem()
    t, sol = odeint_event(f, y0, t0, ev, rtol=tol, atol=tol, gradient=gradient)
    _loss(t, sol.ys[-1]).backward()
    return t.item(), sol, [x.grad.clone() for x in inputs]


def _finite_differences(eps=1e-5):
    f, ev, y0, t0, inputs = _problem()
    fd = []
    with torch.no_grad():
        for x in inputs:
            g = torch.zeros_like(x)
            for i in range(x.numel()):
                vals = []
                for s in (1, -1):
                    x.view(-1)[i] += s * eps
                    t, sol = odeint_event(f, y0, t0, ev, rtol=1e-12, atol=1e-12)
                    vals.append(float(_loss(t, sol.ys[-1])))
                    x.view(-1)[i] -= s * eps
                g.view(-1)[i] = (vals[0] - vals[1]) / (2 * eps)
            fd.append(g)
    return fd


@pytest.fixture(scope="module")
def fd_grads():
    return _finite_differences()


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_gradients_match_finite_differences(gradient, fd_grads):
    # y0, t0, f's parameters and event_fn's (level, slope: torchdiffeq gives these none).
    _, sol, grads = _odenet_grads(gradient)
    assert sol.stats.nfe_backward > 0
    for g, fd in zip(grads, fd_grads):
        assert torch.allclose(g, fd, rtol=1e-6, atol=1e-7), (g, fd)


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_time_and_gradients_match_torchdiffeq(gradient):
    t, sol, grads = _odenet_grads(gradient)
    f, ev, y0, t0, inputs = _problem()
    iface = torchdiffeq.odeint_adjoint if gradient == "adjoint" else torchdiffeq.odeint
    td_t, td_ys = torchdiffeq.odeint_event(f, y0, t0, event_fn=ev, rtol=1e-10, atol=1e-10, odeint_interface=iface)
    _loss(td_t, td_ys[-1]).backward()
    assert abs(t - td_t.item()) < 2e-10  # torchdiffeq's bisection stops at atol
    assert torch.allclose(sol.ys[-1], td_ys[-1].detach(), rtol=0, atol=1e-9)
    for name, g, x in zip(("y0", "A", "b"), (grads[0], grads[2], grads[3]), (y0, f.A, f.b)):
        assert torch.allclose(g, x.grad, rtol=1e-7, atol=1e-8), name


def test_checkpoint_equals_direct():
    _, _, direct = _odenet_grads("direct")
    _, _, checkpoint = _odenet_grads("checkpoint")
    for a, b in zip(direct, checkpoint):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver, steps", [("dopri5", dict(rtol=1e-10, atol=1e-12)), ("rk4", dict(step_size=0.3))])
def test_free_fall_gradient_closed_form(solver, steps):
    # t* = (v0 + sqrt(v0² + 2 g h0)) / g: gradients to g, h0, v0 and t0 under every method, adaptive and
    # fixed steps (the adjoint of a fixed-step solve runs back over the forward grid from t*).
    for gradient in GRADIENTS:
        g = torch.tensor(9.81, dtype=D, requires_grad=True)
        y0 = torch.tensor([10.0, 1.5], dtype=D, requires_grad=True)
        t0 = torch.tensor(0.5, dtype=D, requires_grad=True)
        t, _ = odeint_event(fall(g), y0, t0, height, solver=solver, gradient=gradient, adjoint_params=(g,), **steps)
        t.backward()
        gg, h, v = torch.tensor(9.81, dtype=D, requires_grad=True), *torch.tensor([10.0, 1.5], dtype=D,
                                                                                   requires_grad=True).unbind()
        exact = (v + torch.sqrt(v * v + 2 * gg * h)) / gg
        want = torch.autograd.grad(exact, (gg, h, v))
        assert abs(float(g.grad) - float(want[0])) < 1e-9, gradient
        assert torch.allclose(y0.grad, torch.stack(want[1:]), rtol=0, atol=1e-9), gradient
        assert abs(float(t0.grad) - 1.0) < 1e-9, gradient  # an autonomous system: shifting t0 shifts t*


def test_event_time_is_first_order_only():
    g = torch.tensor(9.81, dtype=D, requires_grad=True)
    t, _ = odeint_event(fall(g), torch.tensor([10.0, 0.0], dtype=D), 0.0, height, rtol=1e-10, atol=1e-12)
    (dg,) = torch.autograd.grad(t, g, create_graph=True)
    with pytest.raises(RuntimeError, match="first order"):
        torch.autograd.grad(dg, g)


def test_no_graph_without_grad():
    y0 = torch.tensor([10.0, 0.0], dtype=D, requires_grad=True)
    with torch.no_grad():
        t, sol = odeint_event(fall(9.81), y0, 0.0, height)
    assert not t.requires_grad and not sol.ys.requires_grad


# ------------------------------------------------------------------ the bouncing ball


class BouncingBall(nn.Module):
    """torchdiffeq's examples/bouncing_ball.py, on one flat state [position, velocity, log radius]."""

    def __init__(self, radius=0.2, gravity=9.8):
        super().__init__()
        self.gravity = nn.Parameter(torch.tensor([gravity], dtype=D))
        self.log_radius = nn.Parameter(torch.log(torch.tensor([radius], dtype=D)))
        self.t0 = nn.Parameter(torch.tensor([0.0], dtype=D))
        self.init_pos = nn.Parameter(torch.tensor([10.0], dtype=D))
        self.init_vel = nn.Parameter(torch.tensor([0.0], dtype=D))
        self.absorption = nn.Parameter(torch.tensor([0.2], dtype=D))

    def forward(self, t, y):
        return torch.cat([y[1:2], -self.gravity, torch.zeros_like(y[2:])])

    def event_fn(self, t, y):
        return y[0] - torch.exp(y[2])  # positive in the air

    def state_update(self, y, eps):
        return torch.cat([y[0:1] + eps, -y[1:2] * (1 - self.absorption), y[2:]])

    def collision_times(self, n, solve, eps=1e-7):
        t0, y = self.t0, torch.cat([self.init_pos, self.init_vel, self.log_radius])
        times = []
        for _ in range(n):
            t0, ys = solve(self, y, t0, self.event_fn)
            times.append(t0.reshape(()))
            y = self.state_update(ys[-1], eps)
        return times

    def closed_form(self, n, eps=1e-7):
        t, v, g = self.t0[0], self.init_vel[0], self.gravity[0]
        h = self.init_pos[0] - torch.exp(self.log_radius[0])  # height of the ball's bottom
        times = []
        for _ in range(n):
            dt = (v + torch.sqrt(v * v + 2 * g * h)) / g
            t = t + dt
            times.append(t)
            v, h = -(v - g * dt) * (1 - self.absorption[0]), eps
        return times


def _odenet_ball(gradient):
    def solve(f, y, t0, event_fn):
        t, sol = odeint_event(f, y, t0, event_fn, rtol=1e-8, atol=1e-8, gradient=gradient)
        return t, sol.ys

    return solve


def _torchdiffeq_ball(adjoint):
    def solve(f, y, t0, event_fn):
        iface = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
        return torchdiffeq.odeint_event(f, y, t0, event_fn=event_fn, rtol=1e-8, atol=1e-8, odeint_interface=iface)

    return solve


def _ball_run(n, solve=None, eps=1e-7):
    ball = BouncingBall()
    times = ball.closed_form(n, eps) if solve is None else ball.collision_times(n, solve, eps)
    times[-1].backward()
    return torch.stack(times).detach(), {k: p.grad.clone() for k, p in ball.named_parameters()}


@pytest.fixture(scope="module")
def ball_references():
    return _ball_run(10), _ball_run(10, _torchdiffeq_ball(False)), _ball_run(10, _torchdiffeq_ball(True))


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_bouncing_ball(gradient, ball_references):
    # Ten bounces, gradients of the last collision time to every parameter (as the example's gradcheck).
    (exact_t, exact_g), (td_t, td_g), (tda_t, tda_g) = ball_references
    times, grads = _ball_run(10, _odenet_ball(gradient))
    assert torch.allclose(times, exact_t, rtol=0, atol=1e-10)
    # torchdiffeq bisects to atol=1e-8 in time: each of its bounce times is off by up to half that, and they add up.
    assert torch.allclose(times, td_t, rtol=0, atol=2e-8)
    assert (td_t - exact_t).abs().max() > 1e-9  # (so its times are the less accurate here)
    ref_g = tda_g if gradient == "adjoint" else td_g
    for name, g in grads.items():
        assert torch.allclose(g, exact_g[name], rtol=1e-9, atol=1e-9), name
        assert torch.allclose(g, ref_g[name], rtol=1e-7, atol=1e-8), name


def test_bouncing_ball_restarts_without_an_offset():
    # The event state is on the side the ball came from, so no eps is needed to restart.
    times, grads = _ball_run(6, _odenet_ball("direct"), eps=0.0)
    exact_t, exact_g = _ball_run(6, eps=0.0)
    assert torch.allclose(times, exact_t, rtol=0, atol=1e-10)
    for name, g in grads.items():
        assert torch.allclose(g, exact_g[name], rtol=1e-9, atol=1e-9), name


# ------------------------------------------------------------------ never hang; clear failures


def test_no_event_before_t_max():
    y0 = torch.tensor([10.0, 5.0], dtype=D)
    with pytest.raises(NoEventError, match="No event.*t_max=0.5") as err:
        odeint_event(fall(9.81), y0, 0.0, height, t_max=0.5)
    assert isinstance(err.value, odenet.SolverError) and err.value.solution is not None
    t, sol = odeint_event(fall(9.81), y0, 0.0, height, t_max=0.5, throw=False)
    assert math.isnan(float(t)) and sol.status is odenet.Status.SUCCESS and "No event" in sol.message
    assert abs(float(sol.ys[-1, 0]) - (10.0 + 5.0 * 0.5 - 9.81 / 8)) < 1e-8  # the state at t_max


def test_no_event_ever_stops_at_the_step_limit():
    f = lambda t, y: torch.ones_like(y)  # y grows forever; the event never comes
    t, sol = odeint_event(f, torch.ones(1, dtype=D), 0.0, height, max_steps=30, throw=False)
    assert math.isnan(float(t)) and sol.status is odenet.Status.MAX_STEPS and "max_steps=30" in sol.message
    with pytest.raises(odenet.SolverError, match="before an event"):
        odeint_event(f, torch.ones(1, dtype=D), 0.0, height, max_steps=30)


def test_fixed_steps_without_t_max():
    f = lambda t, y: torch.ones_like(y)
    t, sol = odeint_event(f, torch.ones(1, dtype=D), 0.0, height, solver="euler", step_size=0.5, throw=False)
    assert math.isnan(float(t)) and sol.stats.n_accepted == 10_000
    with pytest.raises(ValueError, match="needs a finite t_max"):
        odeint_event(f, torch.ones(1, dtype=D), 0.0, height, solver="rk4", steps=10)


@pytest.mark.parametrize(
    "event_fn, error, match",
    [
        (lambda t, y: y[0] - 1.0, ValueError, "non-zero"),  # starts on the surface
        (lambda t, y: y[0] * float("nan"), ValueError, "finite"),
        (lambda t, y: 1.0, TypeError, "tensor"),
    ],
)
def test_bad_event_fn(event_fn, error, match):
    with pytest.raises(error, match=match):
        odeint_event(lambda t, y: -y, torch.ones(1, dtype=D), 0.0, event_fn)


def test_bad_t_max():
    with pytest.raises(ValueError, match="t_max"):
        odeint_event(lambda t, y: -y, torch.ones(1, dtype=D), 1.0, height, t_max=0.5)
    with pytest.raises(ValueError, match="t_max"):
        odeint_event(lambda t, y: -y, torch.ones(1, dtype=D), 1.0, height, t_max=2.0, reverse_time=True)


# ------------------------------------------------------------------ the loop


def test_loop_checks_every_step_and_searches_only_the_last():
    calls = []

    def ev(t, y):
        calls.append(float(t))
        return y[0]

    y0 = torch.tensor([10.0, 0.0], dtype=D)
    search = _EventSearch(ev, 0.0, y0)
    res = integrate(fall(9.81), y0, [0.0, 5.0], get_solver("rk4"), odenet.Fixed(step_size=0.25),
                    stats=SolveStats(), event=search)
    n_steps = len(res.steps)
    assert n_steps == 6 and abs(res.event_t - math.sqrt(20 / 9.81)) < 1e-12  # rk4 is exact here
    steps_ends = [0.25 * (i + 1) for i in range(n_steps)]
    assert calls[: 1 + n_steps] == [0.0, *steps_ends]  # t0, then each step's end
    assert len(calls) - 1 - n_steps <= 10  # the root search inside the last step (Illinois), to a few ulps
    # Without an event, the same loop, the same steps, and no event time.
    plain = integrate(fall(9.81), y0, [0.0, 5.0], get_solver("rk4"), odenet.Fixed(step_size=0.25), stats=SolveStats())
    assert plain.event_t is None and len(plain.steps) == 20
