"""Real layers inside f: dropout, BatchNorm and in-place ops, written as model authors write them.

Within one solve every evaluation of f sees the same random draws (so a stochastic f is one
ODE per solve), running statistics are updated once per training forward, and an f that
writes into its input is refused on its first evaluation.
"""

import copy

import pytest
import torch
from torch import nn

import odenet

GRADIENTS = ("direct", "checkpoint", "adjoint")


class DropoutMLP(nn.Module):
    """The feed-forward half of a transformer block, as nanoGPT writes it (with dropout), time-free."""

    def __init__(self, dim: int = 8, p: float = 0.1):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(p)

    def forward(self, t, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class ConvBN(nn.Module):
    """A pre-activation conv branch (BN -> ReLU -> conv), as in pre-activation ResNets."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, t, x):
        return self.conv(torch.relu(self.bn(x)))


def _grads(f, x, **kw):
    torch.manual_seed(123)  # the same draws for every gradient method
    x = x.clone().requires_grad_()
    block = odenet.ODEBlock(f, **kw)
    block(x).square().sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in f.parameters()]
    f.zero_grad()
    return grads, block.last_stats


@pytest.mark.parametrize("solver, kw", [("rk4", dict(steps=4)), ("dopri5", dict(rtol=1e-6, atol=1e-8))])
def test_dropout_checkpoint_and_adjoint_equal_direct(solver, kw):
    torch.manual_seed(0)
    f = DropoutMLP(p=0.3).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    direct, _ = _grads(f, x, solver=solver, gradient="direct", **kw)
    ckpt, _ = _grads(f, x, solver=solver, gradient="checkpoint", **kw)
    adj, _ = _grads(f, x, solver=solver, gradient="adjoint", **kw)
    for a, b in zip(direct, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(direct, adj):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_masks_are_fixed_within_a_solve_and_new_across_solves():
    torch.manual_seed(0)
    f = DropoutMLP(p=0.5)
    masks = []
    f.dropout.register_forward_hook(lambda m, i, o: masks.append(o == 0))
    block = odenet.ODEBlock(f, "rk4", steps=3)
    x = torch.randn(4, 8)
    block(x)
    assert len(masks) == 12 and all(torch.equal(m, masks[0]) for m in masks)
    block(x)
    assert not torch.equal(masks[12], masks[0])  # the next solve draws again


def test_dropout_costs_what_the_deterministic_field_costs():
    """Under dopri5 a dropout field is one ODE per solve, so it takes about as many steps as
    the same field with dropout off (each evaluation with new masks used to break the error
    control)."""
    torch.manual_seed(0)
    f = DropoutMLP(dim=16, p=0.1)
    x = torch.randn(32, 16)
    kw = dict(solver="dopri5", rtol=1e-4, atol=1e-6, gradient="adjoint")
    _, with_dropout = _grads(f, x, **kw)
    f.dropout.p = 0.0
    _, without = _grads(f, x, **kw)
    assert with_dropout.nfe_forward <= 1.5 * without.nfe_forward
    assert with_dropout.nfe_backward <= 1.5 * without.nfe_backward


def test_solve_leaves_the_random_stream_as_one_evaluation_would():
    torch.manual_seed(5)
    f = DropoutMLP(p=0.2)
    x = torch.randn(4, 8)
    one = copy.deepcopy(f)
    state = torch.get_rng_state()
    odenet.ODEBlock(f, "dopri5", gradient="checkpoint")(x).sum().backward()
    after_solve = torch.rand(3)
    torch.set_rng_state(state)
    one(torch.zeros(()), x)
    assert torch.equal(torch.rand(3), after_solve)


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("solver, kw", [("euler", dict(steps=3)), ("dopri5", {})])
def test_batchnorm_updates_once_per_training_forward(gradient, solver, kw):
    torch.manual_seed(0)
    f = ConvBN()
    ref = copy.deepcopy(f)
    x = torch.randn(6, 4, 5, 5) * 2 + 1
    block = odenet.ODEBlock(f, solver, gradient=gradient, **kw)
    block(x).square().mean().backward()
    assert block.last_stats.nfe_forward > 1
    ref(torch.zeros(()), x)  # one evaluation at the start of the solve: the one update
    assert f.bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(f.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(f.bn.running_var, ref.bn.running_var)


def test_batchnorm_in_eval_uses_running_statistics_and_updates_nothing():
    torch.manual_seed(0)
    f = ConvBN()
    x = torch.randn(6, 4, 5, 5)
    block = odenet.ODEBlock(f, "rk4", steps=2).eval()
    before = f.bn.running_mean.clone()
    block(x)
    assert torch.equal(f.bn.running_mean, before) and f.bn.num_batches_tracked.item() == 0


class InPlaceFirst(nn.Module):
    """A branch whose first op writes into its input, as `nn.ReLU(inplace=True)` after a residual add does."""

    def __init__(self, dim: int = 3):
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.lin = nn.Linear(dim, dim)

    def forward(self, t, x):
        return self.lin(self.act(x))


@pytest.mark.parametrize("solver", ["euler", "dopri5"])
def test_f_writing_into_its_input_is_refused(solver):
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"wrote into its input state in place.*inplace=False.*x = x.clone\(\)"):
        odenet.ODEBlock(InPlaceFirst(), solver)(x)
    with pytest.raises(ValueError, match="wrote into its input"):
        odenet.odeint(lambda t, y: y.mul_(2), torch.ones(2), [0.0, 1.0], solver=solver)


def test_inplace_inside_f_on_its_own_tensors_is_fine():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.act = nn.ReLU(inplace=True)  # on the linear layer's output, not on the input

        def forward(self, t, x):
            return self.act(self.lin(x))

    x = torch.randn(5, 3)
    y = odenet.ODEBlock(Branch(), "dopri5")(x)
    assert y.shape == x.shape
