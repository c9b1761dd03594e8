"""torch.func.vmap over odeint: fixed-step solvers run (per example, the same as the batched
solve), every other setting raises one clear error."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import odenet


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, t, x):
        return torch.tanh(self.lin(x)) * (1 + t)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4"])
def test_vmap_fixed_step_equals_the_batched_solve(solver):
    torch.manual_seed(0)
    f = Field().double()
    y0 = torch.randn(6, 3, dtype=torch.float64)
    t = [0.0, 0.5, 1.0]
    per_example = vmap(lambda y: odenet.odeint(f, y, t, solver=solver, steps=5).ys)(y0)  # [6, 3 times, 3]
    batched = odenet.odeint(f, y0, t, solver=solver, steps=5).ys  # [3 times, 6, 3]
    torch.testing.assert_close(per_example.transpose(0, 1), batched, rtol=1e-12, atol=1e-12)


def test_per_example_gradients_with_vmap_and_grad():
    """The usual per-example-gradient recipe (functional_call, grad, vmap) through an rk4 solve."""
    torch.manual_seed(0)
    f = Field().double()
    params = {k: v.detach() for k, v in f.named_parameters()}
    y0 = torch.randn(4, 3, dtype=torch.float64)

    def loss(p, y):
        g = lambda t, x: functional_call(f, p, (t, x))  # noqa: E731
        return odenet.odeint(g, y, [0.0, 1.0], solver="rk4", steps=4).ys[-1].square().sum()

    per_example = vmap(grad(loss), in_dims=(None, 0))(params, y0)
    for i in range(len(y0)):
        ref = torch.autograd.grad(loss(dict(f.named_parameters()), y0[i]), list(f.parameters()))
        for (name, g), r in zip(per_example.items(), ref):
            torch.testing.assert_close(g[i], r, msg=name)


@pytest.mark.parametrize("kw", [dict(solver="dopri5"), dict(solver="bosh3", rtol=1e-4, atol=1e-4),
                                dict(solver="rk4", steps=3, backend="torchdiffeq")])
def test_vmap_with_adaptive_or_torchdiffeq_raises_one_clear_error(kw):
    with pytest.raises(ValueError, match="torch.func.vmap over odenet.odeint needs a fixed-step solver"):
        vmap(lambda y: odenet.odeint(lambda t, x: -x, y, [0.0, 1.0], **kw).ys[-1])(torch.ones(4, 2))
