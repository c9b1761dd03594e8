"""Every error path: the exception type, and that the message names the offending value."""

import math

import pytest
import torch

import odenet


def f_ok(t, y):
    return -y


Y0 = torch.ones(3)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(solver="rk45"), ValueError, "'rk45'"),
        (dict(solver=3), TypeError, "int"),
        (dict(rtol=0.0), ValueError, "rtol.*0.0"),
        (dict(atol=-1e-3), ValueError, "atol.*-0.001"),
        (dict(rtol=float("nan")), ValueError, "rtol.*nan"),
        (dict(rtol="1e-3"), TypeError, "rtol.*'1e-3'"),
        (dict(solver="dopri5", steps=10), ValueError, "steps=.*'dopri5' is adaptive"),
        (dict(solver="tsit5", step_size=0.1), ValueError, "step_size=.*'tsit5'"),
        (dict(solver="rk4", rtol=1e-3), ValueError, "rtol=.*'rk4' takes fixed steps"),
        (dict(solver="euler", max_steps=10), ValueError, "max_steps=.*'euler'"),
        (dict(solver="euler", steps=0), ValueError, "steps.*0"),
        (dict(solver="euler", steps=2.5), TypeError, "steps.*2.5"),
        (dict(solver="euler", steps=2, step_size=0.1), ValueError, "not both"),
        (dict(gradient="backprop"), ValueError, "'backprop'"),
        (dict(backend="jax"), ValueError, "'jax'"),
        (dict(max_steps=0), ValueError, "max_steps.*0"),
        (dict(first_step=-0.1), ValueError, "first_step.*-0.1"),
        (dict(gradient="direct", adjoint_rtol=1e-3), ValueError, "adjoint_rtol.*'direct'"),
        (dict(backend="torchdiffeq", gradient="checkpoint"), ValueError, "checkpoint"),
        (dict(backend="torchdiffeq", solver="nope"), ValueError, "'nope'"),
        (dict(min_step=0.5, first_step=0.1), ValueError, "first_step=0.1 is below min_step=0.5"),
    ],
)
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        odenet.odeint(f_ok, Y0, [0.0, 1.0], **kwargs)


@pytest.mark.parametrize(
    "t, exc, match",
    [
        ([0.0, 1.0, 0.5], ValueError, r"t\[1\]=1.0 and t\[2\]=0.5"),
        ([0.0, 0.0], ValueError, r"t\[0\]=0.0 and t\[1\]=0.0"),
        ([], ValueError, r"at least one time"),  # one time alone returns y0 (tests/test_compat.py)
        ([0.0, math.inf], ValueError, "finite.*inf"),
        (torch.zeros(2, 2), ValueError, r"one-dimensional.*\(2, 2\)"),
        ("abc", TypeError, "'abc'"),
    ],
)
def test_bad_times(t, exc, match):
    with pytest.raises(exc, match=match):
        odenet.odeint(f_ok, Y0, t)


def test_bad_state_and_function():
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        odenet.odeint(f_ok, torch.ones(3, dtype=torch.long), [0.0, 1.0])
    with pytest.raises(TypeError, match="list"):
        odenet.odeint(f_ok, [1.0, 2.0], [0.0, 1.0])
    with pytest.raises(TypeError, match="callable"):
        odenet.odeint("f", Y0, [0.0, 1.0])


def test_f_wrong_shape_and_dtype():
    with pytest.raises(ValueError, match=r"shape \(3,\).*returned shape \(1,\)"):
        odenet.odeint(lambda t, y: y.sum(0, keepdim=True), Y0, [0.0, 1.0])
    with pytest.raises(TypeError, match="dtype torch.float32.*torch.float64"):
        odenet.odeint(lambda t, y: y.double(), Y0, [0.0, 1.0])
    with pytest.raises(TypeError, match="returned tuple"):
        odenet.odeint(lambda t, y: (y,), Y0, [0.0, 1.0], solver="euler")


def test_block_construction_errors():
    f = odenet.MLPDynamics(3)
    with pytest.raises(ValueError, match="'dopri5' is adaptive"):
        odenet.ODEBlock(f, solver="dopri5", steps=6)
    with pytest.raises(ValueError, match="'euler' takes fixed steps"):
        odenet.ODEBlock(f, solver="euler", rtol=1e-3)
    with pytest.raises(TypeError, match="nn.Module"):
        odenet.ODEBlock(lambda t, x: x)
    with pytest.raises(ValueError, match="t0 = t1 = 1.0"):
        odenet.ODEBlock(f, t0=1.0, t1=1.0)
    with pytest.raises(ValueError, match="h must be non-zero"):
        odenet.ResBlock(f, h=0.0)
    with pytest.raises(ValueError, match="activation 'gelu2'"):
        odenet.MLPDynamics(3, activation="gelu2")
    with pytest.raises(ValueError, match="last axis is 5"):
        f(torch.tensor(0.0), torch.ones(2, 5))


# ---------------------------------------------------------------- solver failures


def test_max_steps_raises_with_stats_and_message():
    with pytest.raises(odenet.SolverError, match="max_steps=5") as info:
        odenet.odeint(lambda t, y: torch.cos(50 * t) * y, Y0, [0.0, 10.0], rtol=1e-10, atol=1e-10, max_steps=5)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.status is odenet.Status.MAX_STEPS
    assert err.stats.n_accepted + err.stats.n_rejected == 5 and err.stats.nfe_forward > 0
    assert "Increase max_steps" in str(err)
    assert err.solution is not None and torch.isnan(err.solution.ys[-1]).all()


def test_throw_false_returns_status():
    sol = odenet.odeint(lambda t, y: torch.cos(50 * t) * y, Y0, [0.0, 10.0], rtol=1e-10, atol=1e-10, max_steps=5, throw=False)
    assert not sol.success and sol.status is odenet.Status.MAX_STEPS and "max_steps" in sol.message
    ok = odenet.odeint(f_ok, Y0, [0.0, 1.0])
    assert ok.success and ok.status is odenet.Status.SUCCESS


def test_step_size_underflow():
    """y' = y^2 blows up at t = 1 for y0 = 1: the step size collapses before it."""
    y0 = torch.ones(1, dtype=torch.float64)
    with pytest.raises(odenet.SolverError, match="step size fell") as info:
        odenet.odeint(lambda t, y: y**2, y0, [0.0, 2.0], rtol=1e-6, atol=1e-6, min_step=1e-4)
    assert info.value.status is odenet.Status.STEP_UNDERFLOW
    assert "min_step=0.0001" in str(info.value)
    assert info.value.solution.ys.shape == (2, 1)


@pytest.mark.parametrize("min_step", [1e-3, None])
def test_step_size_underflow_while_steps_are_accepted(min_step):
    """At the default tolerances in float64 the blow-up of y' = y^2 is approached by accepted
    steps only (no rejection), each a little smaller than the last. The solve must stop once
    the next step is below min_step, or cannot move t, rather than go on accepting steps that
    leave t where it is (it used to: 20456 evaluations, then NONFINITE)."""
    sol = odenet.odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64), [0.0, 2.0], min_step=min_step, throw=False)
    assert sol.status is odenet.Status.STEP_UNDERFLOW
    accepted = [s for s in sol.steps if s.accepted]
    assert all(s.t + s.h != s.t for s in accepted)
    if min_step is not None:
        assert all(abs(s.h) >= min_step for s in accepted)
        assert f"min_step={min_step:g}" in sol.message
    assert sol.stats.nfe_forward < 3000 and abs(sol.steps[-1].t - 1.0) < 0.05  # it stopped near the blow-up


@pytest.mark.parametrize("f", [lambda t, y: torch.zeros_like(y), lambda t, y: -50.0 * (y - torch.cos(t))])
def test_min_step_allows_a_growing_first_step(f):
    """The initial-step heuristic can pick a first step far below min_step (1e-6 for f = 0;
    0.01 |y|/|f| for a fast f); accepted steps growing from it are not an underflow."""
    sol = odenet.odeint(f, torch.ones(3, dtype=torch.float64), [0.0, 1.0], rtol=1e-3, atol=1e-3, min_step=1e-3)
    assert sol.success and sol.steps[0].h < 1e-3 and sol.stats.n_rejected == 0
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2, hidden=8), min_step=1e-4)
    assert block(torch.randn(0, 2)).shape == (0, 2)  # an empty batch: f = 0, first step 1e-6


def test_nonfinite_initial_state():
    with pytest.raises(odenet.SolverError, match="non-finite") as info:
        odenet.odeint(f_ok, torch.tensor([1.0, float("nan")]), [0.0, 1.0])
    assert info.value.status is odenet.Status.NONFINITE


@pytest.mark.parametrize("first_step", [None, 0.1])
def test_nonfinite_initial_derivative(first_step):
    """inf in f(t0, y0), found both by the initial-step heuristic and without it."""
    sol = odenet.odeint(lambda t, y: y / 0.0, torch.ones(3), [0.0, 1.0], first_step=first_step, throw=False)
    assert sol.status is odenet.Status.NONFINITE
    assert sol.stats.nfe_forward == 1  # no further evaluation once the start is non-finite
    assert torch.isnan(sol.ys[-1]).all()


def test_huge_but_finite_derivative_is_not_a_failure():
    """|f| / atol overflows float32 in the initial-step norms; the solve must still run (it used
    to divide by a zero first step) and track y = 1 + 1e37 t."""
    sol = odenet.odeint(lambda t, y: torch.full_like(y, 1e37), torch.ones(4), [0.0, 1.0], rtol=1e-7, atol=1e-9)
    assert sol.status is odenet.Status.SUCCESS
    torch.testing.assert_close(sol.ys[-1], torch.full((4,), 1e37), rtol=1e-6, atol=0)


def test_nonfinite_during_solve_adaptive_terminates():
    """f returns NaN beyond t = 0.5: steps keep being rejected, then a clear failure (no hang)."""

    def f(t, y):
        return -y if float(t) < 0.5 else y * float("nan")

    sol = odenet.odeint(f, Y0, [0.0, 1.0], rtol=1e-6, atol=1e-6, throw=False)
    assert sol.status is odenet.Status.NONFINITE
    assert sol.stats.nfe_forward < 2000
    assert "NaN" in sol.message


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_fixed_step(bad):
    f = (lambda t, y: y * 1e300) if bad == float("inf") else (lambda t, y: y * bad)
    sol = odenet.odeint(f, torch.ones(2, dtype=torch.float64), [0.0, 1.0], solver="euler", steps=5, throw=False)
    assert sol.status is odenet.Status.NONFINITE
    # Checked once, at the end: the message must not place the failure at t=1 itself.
    assert "by t=1 (a fixed-step solve checks once, at its end" in sol.message and "near t=" not in sol.message


def test_fixed_step_large_finite_state_is_success():
    """The end-of-solve check is a max-norm, which cannot overflow the way a sum could."""
    sol = odenet.odeint(lambda t, y: y, torch.full((1000,), 3e38), [0.0, 0.01], solver="euler", steps=1, throw=False)
    assert torch.isfinite(sol.ys[-1]).all() and sol.status is odenet.Status.SUCCESS


def test_torchdiffeq_backend_max_steps():
    with pytest.raises(odenet.SolverError) as info:
        odenet.odeint(lambda t, y: torch.cos(50 * t) * y, Y0, [0.0, 10.0], rtol=1e-10, atol=1e-10, max_steps=5, backend="torchdiffeq")
    assert info.value.status is odenet.Status.MAX_STEPS
    assert "nan" not in str(info.value)  # torchdiffeq does not say where it stopped; neither do we


def test_underflow_message_gives_the_step_size_unsigned():
    """Integrating backwards, h is negative; the message reports the step's size."""
    sol = odenet.odeint(lambda t, y: -(y**2), torch.ones(1, dtype=torch.float64), [0.0, -2.0], min_step=1e-3, throw=False)
    assert sol.status is odenet.Status.STEP_UNDERFLOW
    assert "fell to -" not in sol.message and "fell to 0.000" in sol.message, sol.message


def test_messages_leave_out_unknown_time_and_step():
    for status in (odenet.Status.MAX_STEPS, odenet.Status.STEP_UNDERFLOW, odenet.Status.NONFINITE):
        assert "nan" not in status.message() and "nan" not in status.message(fixed=True)
    assert "at t=0.5 with step size 0.01" in odenet.Status.MAX_STEPS.message(0.5, 0.01, 100)


def test_adjoint_backward_failure_is_a_solver_error():
    f = torch.nn.Linear(3, 3)

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = f
            self.backward_pass = False

        def forward(self, t, y):
            return self.lin(y) * (50.0 if self.backward_pass else 1.0) * torch.cos(50 * t)

    func = F()
    y0 = torch.ones(2, 3, requires_grad=True)
    sol = odenet.odeint(func, y0, [0.0, 1.0], rtol=1e-6, atol=1e-6, gradient="adjoint", max_steps=60)
    func.backward_pass = True  # make the backward problem much harder than the forward one
    with pytest.raises(odenet.SolverError, match="adjoint .*backward.*max_steps=60"):
        sol.ys[-1].sum().backward()


# ---------------------------------------------------------------- errors that say what to do


@pytest.mark.parametrize(
    "key, value, fix", [("method", "rk4", "solver="), ("options", {}, "step_size="), ("tol", 1e-3, "rtol= and atol=")]
)
def test_torchdiffeq_keywords_name_odenets_and_compat(key, value, fix):
    with pytest.raises(TypeError, match=f"got {key}=, torchdiffeq's keyword; odenet's is .*{fix}.*odenet.compat.odeint"):
        odenet.odeint(f_ok, Y0, [0.0, 1.0], **{key: value})


class OneArgument(torch.nn.Module):
    """A block written for a ResNet: forward(x)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("f, name", [(OneArgument(), "OneArgument has the signature \\(x\\)"), (lambda x: -x, "<lambda>")])
def test_f_of_one_argument(f, name):
    with pytest.raises(TypeError, match=f"f must take \\(t, x\\).*{name}.*forward\\(self, t, x\\)") as info:
        odenet.odeint(f, Y0, [0.0, 1.0])
    assert "positional argument" in str(info.value.__cause__)  # torch's own message stays in the chain
    with pytest.raises(TypeError, match="f must take \\(t, x\\)"):
        odenet.ODEBlock(OneArgument())(torch.ones(2, 3))


def test_an_error_inside_f_is_left_alone():
    def f(t, y):
        return torch.cat(y)  # a TypeError from inside f, whose signature is right

    with pytest.raises(TypeError, match="cat\\(\\)") as info:
        odenet.odeint(f, Y0, [0.0, 1.0])
    assert "f must take" not in str(info.value)


def test_parameters_in_another_dtype():
    f = odenet.MLPDynamics(dim=3)  # float32
    match = "f's parameters are torch.float32 but the state is torch.float64.*f.to\\(torch.float64\\)"
    with pytest.raises(TypeError, match=match) as info:
        odenet.odeint(f, torch.ones(2, 3, dtype=torch.float64), [0.0, 1.0])
    assert "dtype" in str(info.value.__cause__)


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, "0.0078125"), (torch.float16, "0.000976562")])
def test_half_precision_state_with_tolerances_below_its_resolution(dtype, eps):
    f = lambda t, y: -y  # noqa: E731
    match = f"rtol=1e-07 is below the resolution of the {dtype} state \\(its epsilon is {eps}\\)"
    with pytest.raises(ValueError, match=match):
        odenet.odeint(f, torch.ones(3, dtype=dtype), [0.0, 1.0])
    with pytest.raises(ValueError, match="adjoint_rtol=0.0001 is below"):
        odenet.odeint(f, torch.ones(3, dtype=dtype), [0.0, 1.0], rtol=1e-2, atol=1e-2, gradient="adjoint",
                      adjoint_rtol=1e-4)
    sol = odenet.odeint(f, torch.ones(3, dtype=dtype), [0.0, 1.0], rtol=1e-2, atol=1e-2)
    assert sol.ys.dtype == dtype and abs(float(sol.ys[-1, 0]) - math.exp(-1)) < 0.02
    assert odenet.odeint(f, torch.ones(3, dtype=dtype), [0.0, 1.0], solver="rk4", steps=4).success  # no tolerance


@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
@pytest.mark.parametrize("where", ["y0", "f"])
def test_nonfinite_under_the_torchdiffeq_backend(solver, where):
    """torchdiffeq reports a NaN state as "underflow in dt 0.0" (adaptive) or not at all (fixed steps)."""
    y0 = torch.tensor([float("nan"), 1.0]) if where == "y0" else torch.ones(2)
    f = f_ok if where == "y0" else (lambda t, y: -y * (float("nan") if float(t) > 0.5 else 1.0))
    sol = odenet.odeint(f, y0, [0.0, 1.0], solver=solver, backend="torchdiffeq", throw=False)
    assert sol.status is odenet.Status.NONFINITE and "non-finite" in sol.message
    blow_up = odenet.odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64), [0.0, 2.0], backend="torchdiffeq",
                            throw=False)
    assert blow_up.status is odenet.Status.STEP_UNDERFLOW  # a step that shrinks at a singularity stays an underflow


def test_faq_blow_up_example_status():
    """docs/faq.md: y' = y^2 from y(0) = 1 ends in STEP_UNDERFLOW (the steps shrink towards the
    singularity at t = 1 while the state stays finite), as the page says."""
    sol = odenet.odeint(lambda t, y: y**2, torch.ones(1, dtype=torch.float64), [0.0, 0.5, 2.0], throw=False)
    assert sol.status is odenet.Status.STEP_UNDERFLOW and torch.isfinite(sol.ys[:2]).all()
    import pathlib

    faq = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "faq.md").read_text()
    assert "# False, STEP_UNDERFLOW" in faq
