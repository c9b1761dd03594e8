"""Typed options (Fixed, Adaptive, Direct, Adjoint, Checkpoint) and the flat shorthand that builds them."""

import pytest
import torch
from torch import nn

import odenet
from odenet.options import SolveOptions, options_from

from conftest import A_LINEAR

A = torch.tensor(A_LINEAR, dtype=torch.float64)


def f_linear(t, y):
    return y @ A.T


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(A.clone())

    def forward(self, t, y):
        return torch.tanh(y @ self.w.T) + 0.1 * t


Y0 = torch.tensor([[1.0, 0.5, 0.0], [-0.3, 0.8, 0.2]], dtype=torch.float64)
T = torch.linspace(0.0, 1.5, 4, dtype=torch.float64)

# (typed keywords, the shorthand that must build the same objects)
PAIRS = [
    (dict(solver="rk4", control=odenet.Fixed(steps=7)), dict(solver="rk4", steps=7)),
    (dict(solver="euler", control=odenet.Fixed(step_size=0.1)), dict(solver="euler", step_size=0.1)),
    (dict(solver="midpoint", control=odenet.Fixed()), dict(solver="midpoint")),
    (dict(control=odenet.Adaptive(1e-7, 1e-9)), dict()),
    (dict(solver="tsit5", control=odenet.Adaptive(1e-5, 1e-7, first_step=0.01, max_steps=500)),
     dict(solver="tsit5", rtol=1e-5, atol=1e-7, first_step=0.01, max_steps=500)),
    (dict(solver="bosh3", control=odenet.Adaptive(1e-4, 1e-6, min_step=1e-8,
                                                 controller=odenet.solvers.PIController(pcoeff=0.0, icoeff=1.0))),
     dict(solver="bosh3", rtol=1e-4, atol=1e-6, min_step=1e-8, controller=odenet.solvers.PIController(pcoeff=0.0, icoeff=1.0))),
]
GRADS = [
    (odenet.Direct(), dict(gradient="direct")),
    (odenet.Checkpoint(), dict(gradient="checkpoint")),
    (odenet.Adjoint(), dict(gradient="adjoint")),
    (odenet.Adjoint(rtol=1e-6, atol=1e-8, seminorm=True),
     dict(gradient="adjoint", adjoint_rtol=1e-6, adjoint_atol=1e-8, adjoint_seminorm=True)),
]


@pytest.mark.parametrize("typed, flat", PAIRS)
def test_shorthand_builds_the_same_objects_and_solution(typed, flat):
    assert options_from(**typed) == options_from(**flat)
    a = odenet.odeint(f_linear, Y0, T, **typed)
    b = odenet.odeint(f_linear, Y0, T, **flat)
    assert torch.equal(a.ys, b.ys) and a.stats == b.stats


@pytest.mark.parametrize("gradient, flat", GRADS)
@pytest.mark.parametrize("solver, control", [("dopri5", odenet.Adaptive(1e-6, 1e-8)), ("rk4", odenet.Fixed(steps=5))])
def test_gradient_objects_equal_their_names(gradient, flat, solver, control):
    if not isinstance(control, odenet.Adaptive) and "adjoint_rtol" in flat:
        pytest.skip("adjoint tolerances need an adaptive solver (tested below)")
    grads = []
    for kw in (dict(gradient=gradient), flat):
        f = Linear().double()
        y0 = Y0.clone().requires_grad_()
        block = odenet.ODEBlock(f, solver, control=control, **kw)
        block(y0).square().sum().backward()
        grads.append((y0.grad, f.w.grad, block.last_stats))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][2] == grads[1][2]


def test_block_defaults_and_properties():
    f = odenet.MLPDynamics(2, 8)
    block = odenet.ODEBlock(f)
    assert block.control == odenet.Adaptive(1e-3, 1e-3) and block.gradient == odenet.Direct()
    assert odenet.ODEBlock(f, rtol=1e-5).control == odenet.Adaptive(1e-5, 1e-3)  # atol keeps the block default
    assert odenet.ODEBlock(f, "rk4").control == odenet.Fixed()
    typed = odenet.ODEBlock(f, "rk4", control=odenet.Fixed(steps=3), gradient=odenet.Checkpoint())
    assert typed.options == odenet.ODEBlock(f, "rk4", steps=3, gradient="checkpoint").options
    assert repr(odenet.Adaptive(1e-3, 1e-4, max_steps=50)) == "Adaptive(rtol=0.001, atol=0.0001, max_steps=50)"
    assert repr(odenet.Fixed(steps=3)) == "Fixed(steps=3)" and repr(odenet.Adjoint()) == "Adjoint()"


def test_options_are_immutable_and_hashable():
    control = odenet.Adaptive(1e-3, 1e-3)
    with pytest.raises(AttributeError):
        control.rtol = 1.0
    assert len({odenet.Adaptive(1e-3, 1e-3), control, odenet.Fixed(), odenet.Fixed(), odenet.Adjoint()}) == 3


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: odenet.Fixed(steps=0), ValueError, "steps.*0"),
        (lambda: odenet.Fixed(steps=2.5), TypeError, "steps.*2.5"),
        (lambda: odenet.Fixed(steps=2, step_size=0.1), ValueError, "not both.*steps=2, step_size=0.1"),
        (lambda: odenet.Adaptive(0.0, 1e-3), ValueError, "rtol.*0.0"),
        (lambda: odenet.Adaptive("1e-3", 1e-3), TypeError, "rtol.*'1e-3'"),
        (lambda: odenet.Adaptive(1e-3), TypeError, "atol"),
        (lambda: odenet.Adaptive(1e-3, 1e-3, max_steps=0), ValueError, "max_steps.*0"),
        (lambda: odenet.Adaptive(1e-3, 1e-3, controller="pi"), TypeError, "PIController.*str"),
        (lambda: odenet.Adaptive(1e-3, 1e-3, first_step=0.1, min_step=0.5), ValueError,
         "first_step=0.1 is below min_step=0.5"),
        (lambda: odenet.Adjoint(rtol=-1.0), ValueError, "rtol.*-1.0"),
        (lambda: odenet.Adjoint(seminorm="yes"), TypeError, "seminorm.*'yes'"),
    ],
)
def test_constructors_validate(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(solver="dopri5", control=odenet.Fixed(steps=4)), ValueError,
         r"control=Fixed\(steps=4\).*'dopri5' is adaptive"),
        (dict(solver="rk4", control=odenet.Adaptive(1e-3, 1e-3)), ValueError,
         r"control=Adaptive\(rtol=0.001, atol=0.001\).*'rk4' takes fixed steps"),
        (dict(control=odenet.Adaptive(1e-3, 1e-3), rtol=1e-4), TypeError,
         r"control=Adaptive\(rtol=0.001, atol=0.001\) was given together with rtol=0.0001"),
        (dict(solver="rk4", control=odenet.Fixed(), steps=3), TypeError, r"control=Fixed\(\).*steps=3"),
        (dict(gradient=odenet.Adjoint(), adjoint_rtol=1e-4), TypeError,
         r"gradient=Adjoint\(\) was given together with adjoint_rtol=0.0001"),
        (dict(solver="rk4", steps=3, gradient=odenet.Adjoint(rtol=1e-4)), ValueError,
         r"adjoint_rtol/adjoint_atol need an adaptive solver.*Adjoint\(rtol=0.0001\).*'rk4'"),
        (dict(control=odenet.Fixed), TypeError, "control must be odenet.Fixed"),
        (dict(gradient=odenet.Adjoint), TypeError, "gradient must be odenet.Direct"),
        (dict(gradient=3), TypeError, "gradient must be.*got 3"),
        (dict(backend="torchdiffeq", gradient=odenet.Checkpoint()), ValueError, "checkpoint"),
        (dict(backend="torchdiffeq", control=odenet.Adaptive(1e-3, 1e-3, min_step=1e-6)), ValueError, "min_step"),
        (dict(rtl=1e-3), TypeError, "odeint got an unexpected keyword argument 'rtl'. Did you mean 'rtol'"),
    ],
)
def test_invalid_combinations_name_both(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        odenet.odeint(f_linear, Y0, T, **kwargs)
    if "rtl" not in kwargs:  # blocks take the same settings and fail the same way, at construction
        with pytest.raises(exc, match=match):
            odenet.ODEBlock(Linear(), **kwargs)


def test_solve_options_checks_itself():
    with pytest.raises(ValueError, match="'dopri5' is adaptive"):
        SolveOptions("dopri5", odenet.Fixed())
    opts = SolveOptions("rk4", odenet.Fixed(steps=2))
    assert opts.solver == odenet.solvers.RK4() and not opts.adaptive and opts.solver_name == "rk4"


def test_citation_reads_the_typed_options():
    import re

    def keys(obj):
        return re.findall(r"@\w+\{(\w+)", odenet.citation(obj, file=open("/dev/null", "w")))

    assert keys(odenet.Adjoint(seminorm=True)) == ["odenet", "chen2018", "kidger2021"]
    assert keys(odenet.Checkpoint()) == ["odenet", "gholami2019"]
    assert keys(odenet.Adaptive(1e-3, 1e-3)) == ["odenet", "gustafsson1991"]
    assert keys(odenet.Adaptive(1e-3, 1e-3, controller=odenet.solvers.PIController(pcoeff=0.0))) == ["odenet"]
    assert keys([odenet.Fixed(), odenet.Direct()]) == ["odenet"]
    block = odenet.ODEBlock(odenet.MLPDynamics(2), "tsit5", gradient=odenet.Adjoint())
    assert {"chen2018", "tsitouras2011"} <= set(keys(block))
