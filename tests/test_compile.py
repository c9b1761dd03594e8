"""A model containing odenet blocks runs under torch.compile."""

import pytest
import torch
from torch import nn

import odenet


def _model(block):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), block, nn.Linear(4, 2))


@pytest.mark.parametrize(
    "make",
    [
        lambda f: odenet.ODEBlock(f, solver="rk4", steps=3),
        lambda f: odenet.ResBlock(f, h=0.5),
        lambda f: odenet.ODEBlock(f, solver="dopri5", rtol=1e-4, atol=1e-4),
    ],
    ids=["rk4", "resblock", "dopri5"],
)
def test_compiled_model_matches_eager(make):
    torch._dynamo.reset()
    model = _model(make(odenet.MLPDynamics(4, 8)))
    x = torch.randn(5, 4)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert model[1].f.linears[0].weight.grad is not None


def test_compiled_inductor_fixed_step():
    """The default (inductor) backend on the fixed-step path."""
    torch._dynamo.reset()
    model = _model(odenet.ODEBlock(odenet.MLPDynamics(4, 8), solver="euler", steps=4))
    x = torch.randn(5, 4)
    torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-5, atol=1e-6)


def test_compiled_f_inside_the_loop():
    """The recipe for speed: compile f itself; the loop calls the compiled module every stage.

    t arrives as a 0-dim tensor, so new times do not trigger recompilation.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    f = odenet.MLPDynamics(4, 8)
    x = torch.randn(5, 4, requires_grad=True)
    eager = odenet.ODEBlock(f, solver="dopri5", rtol=1e-5, atol=1e-5, gradient="adjoint")
    compiled = odenet.ODEBlock(torch.compile(f, backend="aot_eager"), solver="dopri5", rtol=1e-5, atol=1e-5, gradient="adjoint")
    y_eager, y_comp = eager(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-6)
    (g_eager,) = torch.autograd.grad(y_eager.sum(), x)
    (g_comp,) = torch.autograd.grad(y_comp.sum(), x)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-6)
    assert compiled.last_stats.nfe_forward == eager.last_stats.nfe_forward


def test_compiled_time_dependent_f_does_not_recompile_per_step():
    """Stage times on a fixed grid are views into one tensor; a compiled f that uses t must not
    recompile for each of them (dynamo would fall back to eager after its cache limit)."""
    compilations = []

    def counting_backend(gm, example_inputs):
        compilations.append(gm)
        return gm.forward

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, t, y):
            return torch.tanh(self.lin(y)) * torch.cos(t)

    torch._dynamo.reset()
    torch.manual_seed(0)
    module = F()
    f = torch.compile(module, backend=counting_backend)
    y0 = torch.randn(3, 4)
    sol = odenet.odeint(f, y0, [0.0, 1.0], solver="rk4", steps=20)
    first = len(compilations)
    assert 1 <= first <= 2, first  # 80 evaluations, each handed its own view as t
    odenet.odeint(f, y0, [0.0, 2.0], solver="euler", steps=30)
    assert len(compilations) == first
    torch.testing.assert_close(sol.ys, odenet.odeint(module, y0, [0.0, 1.0], solver="rk4", steps=20).ys)
