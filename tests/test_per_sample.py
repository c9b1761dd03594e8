"""Per-sample error control, `Adaptive(per_sample=True)`: the leading axis of the state is a batch
of independent problems, each under its own error control.

Ground truth: every sample solved alone with the same settings (the same accepted and rejected
steps, the same solution to rounding), the closed form `matrix_exp` forward and backward in
time, analytic gradients and finite differences. Float64 throughout.
"""

import json
import math

import pytest
import torch
from torch import nn

import odenet
from odenet.measure import host_reads
from odenet.solvers import SolveStats, integrate
from odenet.solvers.control import rms_norm
from odenet.solvers.integrate import CountedFunc

DT = torch.float64
ADAPTIVE = ["bosh3", "dopri5", "tsit5", "dopri8"]


def linear(A):
    """`dy/dt = A_b y` for each sample `b` (`A`: `[B, n, n]`)."""
    return lambda t, y: torch.einsum("bij,bj->bi", A, y)


def batch(B=6, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, n, n, generator=g, dtype=DT) * torch.linspace(0.3, 4.0, B, dtype=DT).view(B, 1, 1)
    return A, torch.randn(B, n, generator=g, dtype=DT)


def per_sample(rtol=1e-7, atol=1e-9, **kw):
    return odenet.Adaptive(rtol, atol, per_sample=True, **kw)


def easy_and_hard(omega=50.0):
    """15 samples of `dy/dt = -y` and one fast rotation `dy/dt = ω·rot(y)`, as `[16, 2, 2]` matrices."""
    hard = torch.tensor([[0.0, -omega], [omega, 0.0]], dtype=DT)
    return torch.stack([-torch.eye(2, dtype=DT)] * 15 + [hard]), torch.ones(16, 2, dtype=DT)


# ---------------------------------------------------------------------------- the option


def test_default_is_off_and_unchanged():
    assert odenet.Adaptive(1e-6, 1e-8) == odenet.Adaptive(1e-6, 1e-8, per_sample=False)
    assert repr(odenet.Adaptive(1e-6, 1e-8)) == "Adaptive(rtol=1e-06, atol=1e-08)"
    assert "per_sample=True" in repr(per_sample())
    A, y0 = batch()
    sol = odenet.odeint(linear(A), y0, [0.0, 1.0], rtol=1e-7, atol=1e-9)
    assert sol.stats.n_accepted_per_sample is None and sol.stats.final_step is not None and sol.steps


@pytest.mark.parametrize("value", [1, "yes", None])
def test_per_sample_must_be_a_bool(value):
    with pytest.raises(TypeError, match="per_sample must be True or False"):
        odenet.Adaptive(1e-6, 1e-8, per_sample=value)


# ---------------------------------------------------------------------------- against solo solves


@pytest.mark.parametrize("solver", ADAPTIVE)
@pytest.mark.parametrize("norm", ["rms", "max"])
def test_each_sample_takes_its_solo_steps(solver, norm):
    """A sample's steps and solution do not depend on the rest of the batch."""
    A, y0 = batch()
    ts = torch.linspace(0.0, 2.0, 7, dtype=DT)
    tol = (1e-5, 1e-7) if solver == "bosh3" else (1e-7, 1e-9)
    sol = odenet.odeint(linear(A), y0, ts, solver=solver, control=per_sample(*tol, norm=norm))
    assert sol.success
    for b in range(len(y0)):
        alone = odenet.odeint(linear(A[b : b + 1]), y0[b : b + 1], ts, solver=solver,
                              control=odenet.Adaptive(*tol, norm=norm))
        assert sol.stats.n_accepted_per_sample[b] == alone.stats.n_accepted
        assert sol.stats.n_rejected_per_sample[b] == alone.stats.n_rejected
        # The same steps; the dense output's weights are rounded differently (ulps).
        torch.testing.assert_close(sol.ys[:, b], alone.ys[:, 0], rtol=1e-11, atol=1e-13)
    assert sol.stats.n_accepted == sum(sol.stats.n_accepted_per_sample)
    assert sol.stats.n_rejected == sum(sol.stats.n_rejected_per_sample)
    assert max(sol.stats.n_accepted_per_sample) > 2 * min(sol.stats.n_accepted_per_sample)


CONTROLS = [
    dict(controller=odenet.solvers.PIController(pcoeff=0.0, icoeff=1.0)),
    dict(controller=odenet.solvers.PIController(error_per_unit_step=True)),
    dict(first_step=0.01, min_step=1e-9),
]


@pytest.mark.parametrize("settings", CONTROLS)
def test_controller_settings_apply_per_sample(settings):
    A, y0 = batch(B=4)
    ts = [0.0, 0.3, 1.0]
    sol = odenet.odeint(linear(A), y0, ts, control=per_sample(1e-6, 1e-8, **settings))
    for b in range(4):
        alone = odenet.odeint(linear(A[b : b + 1]), y0[b : b + 1], ts, control=odenet.Adaptive(1e-6, 1e-8, **settings))
        assert (sol.stats.n_accepted_per_sample[b], sol.stats.n_rejected_per_sample[b]) == (
            alone.stats.n_accepted, alone.stats.n_rejected)
        torch.testing.assert_close(sol.ys[:, b], alone.ys[:, 0], rtol=1e-11, atol=1e-13)


def test_one_hard_sample_no_longer_sets_the_steps():
    """15 easy samples and a fast rotation: under joint control every sample takes the batch's
    steps; per sample the easy ones take their solo steps, and each sample meets the tolerance.
    (dopri5, rtol=1e-6, atol=1e-8: joint RMS 192 steps for all at 1358 evaluations; per sample
    6 steps for each easy sample and 255 for the hard one at 1736 evaluations, the hard sample's
    solo cost; the joint RMS norm dilutes the hard sample's error by the batch size.)"""
    A, y0 = easy_and_hard()
    exact = torch.einsum("bij,bj->bi", torch.linalg.matrix_exp(A), y0)
    joint = odenet.odeint(linear(A), y0, [0.0, 1.0], rtol=1e-6, atol=1e-8)
    sol = odenet.odeint(linear(A), y0, [0.0, 1.0], control=per_sample(1e-6, 1e-8))
    easy = odenet.odeint(linear(A[:1]), y0[:1], [0.0, 1.0], rtol=1e-6, atol=1e-8)
    hard = odenet.odeint(linear(A[15:]), y0[15:], [0.0, 1.0], rtol=1e-6, atol=1e-8)
    assert sol.stats.n_accepted_per_sample == [easy.stats.n_accepted] * 15 + [hard.stats.n_accepted]
    assert sol.stats.n_rejected_per_sample == [easy.stats.n_rejected] * 15 + [hard.stats.n_rejected]
    assert easy.stats.n_accepted * 10 < joint.stats.n_accepted  # the easy samples' cost, joint: all of the batch's
    assert sol.stats.nfe_forward == hard.stats.nfe_forward  # the batch costs what its hardest sample costs alone
    torch.testing.assert_close(sol.ys[-1, :15], easy.ys[-1].expand(15, 2), rtol=1e-14, atol=1e-16)  # ulps: torch's pow
    err = (sol.ys[-1] - exact).abs().amax(1)
    joint_err = (joint.ys[-1] - exact).abs().amax(1)
    assert err[15] < joint_err[15] / 2  # the hard sample meets its own tolerance, not the batch's average
    assert err.max() < 1e-4


# ---------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("solver", ["dopri5", "tsit5", "dopri8"])
@pytest.mark.parametrize("backward", [False, True])
def test_closed_form_at_many_output_times(solver, backward):
    A, y0 = batch(B=5, n=2, seed=1)
    A = A - 2.0 * torch.eye(2, dtype=DT)  # stable forward; backward in time it grows
    ts = torch.linspace(0.0, 1.5, 11, dtype=DT)
    if backward:
        ts = ts.flip(0)
    sol = odenet.odeint(linear(A), y0, ts, solver=solver, control=per_sample(1e-9, 1e-11))
    for i, t in enumerate(ts):
        exact = torch.einsum("bij,bj->bi", torch.linalg.matrix_exp(A * (t - ts[0])), y0)
        torch.testing.assert_close(sol.ys[i], exact, rtol=1e-6, atol=1e-8)


def test_time_argument_is_each_samples_time():
    """`f` gets `t` of shape `[B, 1, 1]`, each sample at its own stage time; `dy/dt = -k_b t y`."""
    k = torch.tensor([0.5, 2.0, 8.0], dtype=DT)
    seen = []

    def f(t, y):
        seen.append(t)
        return -k.view(3, 1, 1) * t * y

    y0 = torch.ones(3, 2, 2, dtype=DT)
    ts = torch.tensor([0.0, 0.7, 2.0], dtype=DT)
    sol = odenet.odeint(f, y0, ts, control=per_sample(1e-9, 1e-11))
    assert all(t.shape == (3, 1, 1) and t.dtype == DT for t in seen)
    assert any(len(set(t.flatten().tolist())) == 3 for t in seen)  # the samples are at different times
    exact = torch.exp(-k.view(1, 3) * ts.view(3, 1) ** 2 / 2).view(3, 3, 1, 1).expand(3, 3, 2, 2)
    torch.testing.assert_close(sol.ys, exact, rtol=1e-7, atol=1e-9)


def test_callable_norm_applies_per_sample():
    A, y0 = batch(B=4)
    by_name = odenet.odeint(linear(A), y0, [0.0, 1.0], control=per_sample())
    by_call = odenet.odeint(linear(A), y0, [0.0, 1.0], control=per_sample(norm=lambda x: rms_norm(x)))
    assert by_call.stats.n_accepted_per_sample == by_name.stats.n_accepted_per_sample
    torch.testing.assert_close(by_call.ys, by_name.ys, rtol=1e-13, atol=0)


def test_module_dynamics_in_a_block():
    """A time-dependent `MLPDynamics` takes the `[B, 1]` time; each row as its own solve."""
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=3, hidden=16).double()
    x = torch.randn(4, 3, dtype=DT) * torch.tensor([[0.1], [1.0], [3.0], [10.0]], dtype=DT)
    block = odenet.ODEBlock(f, solver="dopri5", control=per_sample(1e-6, 1e-8))
    out = block(x)
    for b in range(4):
        alone = odenet.odeint(f, x[b : b + 1], [0.0, 1.0], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(out[b], alone.ys[-1, 0], rtol=1e-12, atol=1e-14)
        assert block.last_stats.n_accepted_per_sample[b] == alone.stats.n_accepted


# ---------------------------------------------------------------------------- gradients


def _decay_problem():
    k = torch.tensor([0.5, 1.0, 3.0, 20.0], dtype=DT, requires_grad=True)
    y0 = torch.tensor([[1.0], [2.0], [-1.0], [0.5]], dtype=DT, requires_grad=True)
    return k, y0, (lambda t, y: -k.view(-1, 1) * y * (1 + t))  # y = y0·exp(-k(t + t²/2))


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_gradients_match_the_closed_form(gradient):
    k, y0, f = _decay_problem()
    extra = dict(adjoint_params=(k,)) if gradient == "adjoint" else {}
    sol = odenet.odeint(f, y0, [0.0, 0.5, 1.0], control=per_sample(1e-9, 1e-11), gradient=gradient, **extra)
    gk, gy = torch.autograd.grad(sol.ys[-1].sum(), (k, y0))
    decay = torch.exp(-1.5 * k.detach())
    torch.testing.assert_close(gk, -1.5 * y0.detach().squeeze(1) * decay, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gy.squeeze(1), decay, rtol=1e-7, atol=1e-9)


def test_direct_gradient_equals_each_samples_solo_gradient():
    """Backprop through the masked loop: a shared parameter's gradient is the sum of the samples'
    solo gradients, and each sample's state gradient its solo one."""
    w = torch.tensor([[0.3, -1.0], [1.2, -0.4]], dtype=DT, requires_grad=True)
    f = lambda t, y: torch.tanh(y @ w.T) * (1.0 + 0.5 * t)
    y0 = (torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
          * torch.tensor([[0.1], [0.5], [1.0], [3.0], [6.0]], dtype=DT)).requires_grad_()
    ts = [0.0, 0.4, 1.0]
    sol = odenet.odeint(f, y0, ts, control=per_sample(1e-8, 1e-10))
    gw, gy = torch.autograd.grad((sol.ys[1:] ** 2).sum(), (w, y0))
    total = torch.zeros_like(w)
    for b in range(5):
        yb = y0[b : b + 1].detach().requires_grad_()
        alone = odenet.odeint(f, yb, ts, rtol=1e-8, atol=1e-10)
        gwb, gyb = torch.autograd.grad((alone.ys[1:] ** 2).sum(), (w, yb))
        total += gwb
        torch.testing.assert_close(gy[b : b + 1], gyb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, total, rtol=1e-10, atol=1e-12)


def test_direct_gradient_against_finite_differences():
    k, y0, _ = _decay_problem()
    a = torch.tensor([0.2, -0.1, 0.4, 1.0], dtype=DT, requires_grad=True)

    def loss(a_):
        g = lambda t, y: -k.view(-1, 1).detach() * y + a_.view(-1, 1) * torch.sin(3 * t)
        return odenet.odeint(g, y0.detach(), [0.0, 1.0], control=per_sample(1e-9, 1e-11)).ys[-1].pow(2).sum()

    grad = torch.autograd.grad(loss(a), a)[0]
    eps = 1e-5
    fd = torch.stack([(loss(a.detach() + eps * e) - loss(a.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(4, dtype=DT)])
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-7)


def test_an_overflowing_rejected_trial_leaves_gradients_finite():
    """`dy/dt = -w y³` from y0 = 10 with a first step of 1 overflows float32 in the trial's stages;
    the rejected trial must not turn the shared parameter's gradient into NaN (0·inf)."""
    w = torch.tensor(1.0, requires_grad=True)
    f = lambda t, y: -w * y**3
    y0 = torch.tensor([[10.0], [0.5]])
    sol = odenet.odeint(f, y0, [0.0, 1.0], control=per_sample(1e-4, 1e-6, first_step=1.0))
    grad = torch.autograd.grad(sol.ys[-1].sum(), w)[0]
    solo = sum(torch.autograd.grad(odenet.odeint(f, y0[b : b + 1], [0.0, 1.0], rtol=1e-4, atol=1e-6,
                                                 first_step=1.0).ys[-1].sum(), w)[0] for b in range(2))
    assert sol.stats.n_rejected_per_sample[0] > 0
    torch.testing.assert_close(grad, solo, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- statistics and failures


def test_stats_are_plain_and_one_host_read_per_iteration():
    A, y0 = easy_and_hard(omega=10.0)
    stats = SolveStats()
    with host_reads() as reads:
        res = integrate(CountedFunc(linear(A), stats), y0, [0.0, 0.5, 1.0], odenet.solvers.Dopri5(),
                        per_sample(1e-5, 1e-7), stats=stats)
    iterations = max(a + r for a, r in zip(stats.n_accepted_per_sample, stats.n_rejected_per_sample))
    assert res.status is odenet.Status.SUCCESS and res.steps == [] and stats.final_step is None
    assert reads.count <= iterations + 3  # start, one per iteration, the final statuses and counts
    json.dumps(stats.as_dict())


def test_a_failing_sample_is_named_and_the_others_finish():
    """`dy/dt = y²` blows up at t = 1/y0: the sample with y0 = 2 fails at 0.5, the rest reach 0.4 or 1."""
    y0 = torch.tensor([[0.1], [0.5], [2.0], [0.2]], dtype=DT)
    ts = [0.0, 0.4, 0.9]
    with pytest.raises(odenet.SolverError, match=r"1 sample\(s\) of the batch failed: 2 \(") as err:
        odenet.odeint(lambda t, y: y**2, y0, ts, control=per_sample(1e-6, 1e-8))
    sol = err.value.solution
    assert sol.status in (odenet.Status.STEP_UNDERFLOW, odenet.Status.MAX_STEPS, odenet.Status.NONFINITE)
    exact = y0 / (1 - y0 * torch.tensor(ts, dtype=DT).view(3, 1, 1))
    for b in (0, 1, 3):
        torch.testing.assert_close(sol.ys[:, b], exact[:, b], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sol.ys[1, 2], exact[1, 2], rtol=1e-5, atol=1e-7)  # reached before the blow-up
    assert torch.isnan(sol.ys[2, 2]).all()


def test_max_steps_per_sample():
    A, y0 = easy_and_hard()
    sol = odenet.odeint(linear(A), y0, [0.0, 1.0], control=per_sample(1e-6, 1e-8, max_steps=50), throw=False)
    assert sol.status is odenet.Status.MAX_STEPS and "15 (max_steps_reached)" in sol.message
    assert sol.stats.n_accepted_per_sample[:15] == [6] * 15 and torch.isfinite(sol.ys[-1, :15]).all()
    assert sol.stats.n_accepted_per_sample[15] + sol.stats.n_rejected_per_sample[15] == 50


def test_nonfinite_start_fails_only_that_sample():
    y0 = torch.tensor([[1.0], [float("nan")], [2.0]], dtype=DT)
    sol = odenet.odeint(lambda t, y: -y, y0, [0.0, 1.0], control=per_sample(), throw=False)
    assert sol.status is odenet.Status.NONFINITE and "1 (nonfinite_state)" in sol.message
    torch.testing.assert_close(sol.ys[-1, [0, 2]], y0[[0, 2]] * math.exp(-1.0), rtol=1e-7, atol=1e-9)


def test_a_nonfinite_start_leaves_the_others_gradients_finite():
    """The NaN sample must not reach the shared parameter's gradient through the masks (0·NaN)."""
    w = torch.tensor(0.7, dtype=DT, requires_grad=True)
    y0 = torch.tensor([[1.0], [float("nan")], [2.0]], dtype=DT)
    sol = odenet.odeint(lambda t, y: -w * y, y0, [0.0, 1.0], control=per_sample(1e-9, 1e-11), throw=False)
    (grad,) = torch.autograd.grad(sol.ys[-1, [0, 2]].sum(), w)
    torch.testing.assert_close(grad, -3.0 * math.exp(-0.7) * torch.ones((), dtype=DT), rtol=1e-7, atol=0)  # d/dw 3e^{-w}
    assert torch.isnan(sol.ys[0, 1]).all()  # the output at t0 is y0 itself


def test_a_state_of_one_number_per_sample():
    k = torch.tensor([0.5, 1.0, 4.0], dtype=DT)
    sol = odenet.odeint(lambda t, y: -k * y, torch.ones(3, dtype=DT), [0.0, 1.0], control=per_sample(1e-9, 1e-11))
    torch.testing.assert_close(sol.ys[-1], torch.exp(-k), rtol=1e-7, atol=0)
    assert sol.stats.n_accepted_per_sample[0] < sol.stats.n_accepted_per_sample[2]


# ---------------------------------------------------------------------------- what it refuses


def test_refused_combinations_say_what_to_do():
    f, y0, ts = (lambda t, y: -y), torch.ones(3, 2, dtype=DT), [0.0, 1.0]
    with pytest.raises(ValueError, match="checkpoint.*gradient='direct'"):
        odenet.odeint(f, y0, ts, control=per_sample(), gradient="checkpoint")
    with pytest.raises(ValueError, match="backend='odenet'"):
        odenet.odeint(f, y0, ts, solver="dopri5", control=per_sample(), backend="torchdiffeq")
    with pytest.raises(ValueError, match="tuple, list or dict"):
        odenet.odeint(lambda t, y: tuple(-v for v in y), (y0, y0), ts, control=per_sample())
    with pytest.raises(ValueError, match="0-dim"):
        odenet.odeint(f, torch.tensor(1.0, dtype=DT), ts, control=per_sample())
    with pytest.raises(ValueError, match="takes fixed steps"):
        odenet.odeint(f, y0, ts, solver="rk4", control=per_sample())
    with pytest.raises(ValueError, match="per_sample=True.*adaptive"):
        integrate(f, y0, ts, odenet.solvers.Dopri5(adaptive=False), per_sample(), stats=SolveStats())
    with pytest.raises(ValueError, match="events"):
        integrate(f, y0, ts, odenet.solvers.Dopri5(), per_sample(), stats=SolveStats(), event=lambda *a: None)
    with pytest.raises(ValueError, match="events"):
        odenet.events.odeint_event(f, y0, 0.0, event_fn=lambda t, y: y.sum() - 0.5, control=per_sample())
    with pytest.raises(ValueError, match="checkpoint"):
        odenet.ODEBlock(nn.Identity(), control=per_sample(), gradient="checkpoint")(y0)


def test_flat_shorthand_builds_the_same_control():
    y0 = torch.linspace(0.5, 2.0, 8, dtype=torch.float64).reshape(4, 2)
    flat = odenet.odeint(lambda t, y: -t * y, y0, [0.0, 1.0], rtol=1e-6, atol=1e-8, per_sample=True)
    typed = odenet.odeint(lambda t, y: -t * y, y0, [0.0, 1.0],
                          control=odenet.Adaptive(rtol=1e-6, atol=1e-8, per_sample=True))
    assert torch.equal(flat.ys, typed.ys)
    assert flat.stats.n_accepted_per_sample == typed.stats.n_accepted_per_sample
    with pytest.raises(ValueError, match="per_sample= was given, but solver 'euler' takes fixed steps"):
        odenet.odeint(lambda t, y: -y, y0, [0.0, 1.0], solver="euler", steps=3, per_sample=True)
