"""odenet.dynamics: the pre-activation conv dynamics are the ResNet-v2 residual branches (one Euler
step with h = 1 is the hand-written block), run under ODE solvers, and reject bad arguments."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import odenet
from odenet.dynamics import PreActBasicDynamics, PreActBottleneckDynamics


def conv3x3(cin, cout):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class PreActBlock(nn.Module):
    """He et al. 2016b, basic block with an identity shortcut, written as its authors would."""

    def __init__(self, planes):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(planes), conv3x3(planes, planes)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), conv3x3(planes, planes)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + x


class PreActBottleneck(nn.Module):
    """He et al. 2016b, bottleneck block (expansion 4) with an identity shortcut."""

    expansion = 4

    def __init__(self, planes):
        super().__init__()
        c = planes * self.expansion
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, planes, kernel_size=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), conv3x3(planes, planes)
        self.bn3, self.conv3 = nn.BatchNorm2d(planes), nn.Conv2d(planes, c, kernel_size=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + x


def _copy_into(f, block, n):
    """Load the block's weights (bn_i, conv_i) into f's norms[i-1], convs[i-1]; randomise BN affine and stats."""
    with torch.no_grad():
        for i in range(n):
            bn, conv = getattr(block, f"bn{i + 1}"), getattr(block, f"conv{i + 1}")
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 2.0)
            f.norms[i].load_state_dict(bn.state_dict())
            f.convs[i].conv.weight.copy_(conv.weight)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_euler_step_is_the_resnet_v2_block(kind, train):
    torch.manual_seed(0)
    if kind == "basic":
        block, f, n = PreActBlock(8), PreActBasicDynamics(8), 2
    else:
        block, f, n = PreActBottleneck(4), PreActBottleneckDynamics(16), 3
    assert [c.conv.kernel_size for c in f.convs] == [getattr(block, f"conv{i + 1}").kernel_size for i in range(n)]
    _copy_into(f, block, n)
    block.train(train), f.train(train)
    x = torch.randn(4, f.channels, 6, 6)
    ref = copy.deepcopy(block)
    expected = ref(x)
    for wrapped in (odenet.ResBlock(copy.deepcopy(f), h=1.0), odenet.ODEBlock(copy.deepcopy(f), solver="euler", steps=1)):
        assert torch.equal(wrapped(x), expected)  # bit for bit
        for (name, a), b in zip(wrapped.f.named_buffers(), ref.buffers()):  # running statistics moved alike
            assert torch.equal(a, b), name
    if kind == "bottleneck":
        assert PreActBottleneckDynamics(16).convs[1].conv.in_channels == 4  # default width: channels // 4


@pytest.mark.parametrize("cls", [PreActBasicDynamics, PreActBottleneckDynamics])
def test_runs_under_euler_and_dopri5(cls):
    torch.manual_seed(0)
    f = cls(8, norm="group", groups=2).eval()
    x = torch.randn(2, 8, 5, 5)
    euler = odenet.ODEBlock(f, solver="euler", steps=4)(x)
    block = odenet.ODEBlock(f, solver="dopri5", rtol=1e-5, atol=1e-5)
    exact = block(x)
    assert exact.shape == x.shape and torch.isfinite(exact).all()
    assert block.last_stats.nfe_forward > 6
    err4 = (euler - exact).abs().max()
    err16 = (odenet.ODEBlock(f, solver="euler", steps=16)(x) - exact).abs().max()
    assert 0 < err16 < err4 / 2  # Euler converges to the dopri5 solution (first order)


def _gradients(f, x, gradient, tol):
    """Gradients of `sum(ODEBlock(f)(x)^2)` w.r.t. `x` and `f`'s parameters, one flat vector."""
    block = odenet.ODEBlock(f, solver="dopri5", rtol=tol, atol=tol, gradient=gradient)
    f.zero_grad()
    x = x.detach().requires_grad_(True)
    (block(x) ** 2).sum().backward()
    return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in f.parameters()])


@pytest.mark.parametrize("cls,norm", [(PreActBasicDynamics, "group"), (PreActBottleneckDynamics, "group"),
                                      (PreActBasicDynamics, "batch")])
def test_adjoint_gradients_equal_direct_in_float64(cls, norm):
    """With a smooth activation the adjoint's gradients (x, every parameter, t fed as a channel)
    agree with backprop through the solver to the tolerance."""
    torch.manual_seed(0)
    f = cls(4, norm=norm, time_dependent=True, activation="softplus").double()
    f.train(norm == "group")  # BatchNorm in eval mode: running statistics, a fixed function of x
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    direct, adjoint = _gradients(f, x, "direct", 1e-8), _gradients(f, x, "adjoint", 1e-8)
    assert direct.numel() == x.numel() + sum(p.numel() for p in f.parameters())
    assert (direct != 0).float().mean() > 0.9
    torch.testing.assert_close(adjoint, direct, rtol=1e-5, atol=1e-8)


def test_adjoint_with_relu_converges_slowly():
    """ReLU's kinks: the adjoint and backprop through the solver agree only to about 1e-2..1e-3
    (relative, 2-norm) at tolerance 1e-6, closer than at 1e-4 (so for seeds 0-2, batches 1-2)."""
    torch.manual_seed(1)
    f = PreActBasicDynamics(2, norm="group", groups=1, time_dependent=True).double()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    gaps = []
    for tol in (1e-4, 1e-6):
        d, a = _gradients(f, x, "direct", tol), _gradients(f, x, "adjoint", tol)
        gaps.append(((a - d).norm() / d.norm()).item())
    assert 0 < gaps[1] < 2e-2 and gaps[1] < gaps[0]


def test_time_dependence_and_zero_init():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    f = PreActBasicDynamics(8, time_dependent=True).eval()
    assert f.convs[0].conv.in_channels == 9
    assert not torch.allclose(f(torch.tensor(0.0), x), f(torch.tensor(1.0), x))
    g = PreActBasicDynamics(8).eval()
    assert torch.equal(g(torch.tensor(0.0), x), g(torch.tensor(1.0), x))
    for cls in (PreActBasicDynamics, PreActBottleneckDynamics):
        z = cls(8, zero_init=True, time_dependent=True)
        assert torch.equal(odenet.ResBlock(z)(x), x)  # identity at initialisation
        (odenet.ResBlock(z)(x) * torch.randn_like(x)).sum().backward()
        assert z.convs[-1].conv.weight.grad.abs().sum() > 0  # ... and it trains
        assert z.convs[0].conv.weight.grad.abs().sum() == 0  # nothing reaches the others through a zero conv yet


def test_group_norm_is_the_same_function_in_train_and_eval():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 4, 4)
    f = PreActBottleneckDynamics(16, width=8, norm="group")
    assert [n.num_groups for n in f.norms] == [8, 8, 8]  # the default: the largest divisor up to 32
    assert all(isinstance(n, nn.GroupNorm) for n in f.norms)
    t = torch.tensor(0.0)
    assert torch.equal(f.train()(t, x), f.eval()(t, x))
    b = PreActBottleneckDynamics(16, width=8)
    assert all(isinstance(n, nn.BatchNorm2d) for n in b.norms)
    assert not torch.allclose(b.train()(t, x), b.eval()(t, x))


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="channels must be an integer >= 1, got 0"):
        PreActBasicDynamics(0)
    with pytest.raises(ValueError, match="hidden must be an integer >= 1, got -2"):
        PreActBasicDynamics(8, hidden=-2)
    with pytest.raises(ValueError, match="width must be an integer >= 1, got 2.5"):
        PreActBottleneckDynamics(8, width=2.5)
    with pytest.raises(ValueError, match="Unknown norm 'layer'.*'batch'.*'group'"):
        PreActBasicDynamics(8, norm="layer")
    with pytest.raises(ValueError, match="groups=4 applies to norm='group' only"):
        PreActBasicDynamics(8, groups=4)
    with pytest.raises(ValueError, match=r"groups=3 must divide the channel counts \[4, 8\]"):
        PreActBasicDynamics(8, hidden=4, norm="group", groups=3)
    with pytest.raises(ValueError, match="groups must be an integer >= 1, got 0"):
        PreActBottleneckDynamics(8, norm="group", groups=0)
    with pytest.raises(TypeError, match="time_dependent must be True or False, got 1"):
        PreActBasicDynamics(8, time_dependent=1)
    with pytest.raises(ValueError, match="Unknown activation 'gelu'"):
        PreActBottleneckDynamics(8, activation="gelu")
    with pytest.raises(TypeError, match="zero_init must be True or False"):
        PreActBottleneckDynamics(8, zero_init="yes")
    f = PreActBottleneckDynamics(8)
    with pytest.raises(ValueError, match=r"PreActBottleneckDynamics\(channels=8\) needs a \[B, 8, H, W\] state, "
                                         r"got shape \(2, 4, 3, 3\)"):
        f(torch.tensor(0.0), torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="got shape \\(2, 8\\)"):
        f(torch.tensor(0.0), torch.randn(2, 8))
