"""odenet.dynamics: ConvDynamics' default GroupNorm groups always divide the channel counts."""

import pytest
import torch

import odenet


def _groups(f):
    return (f.norm1.num_groups, f.norm2.num_groups, f.norm3.num_groups)


@pytest.mark.parametrize("channels, hidden", [(48, None), (100, None), (64, 48), (24, 40), (33, None)])
def test_conv_dynamics_default_groups_build_and_run(channels, hidden):
    """Sizes where min(32, channels, hidden) does not divide both used to raise; now they build and run."""
    torch.manual_seed(0)
    f = odenet.ConvDynamics(channels, hidden=hidden)
    h = channels if hidden is None else hidden
    g = f.norm1.num_groups
    assert 1 <= g <= 32 and channels % g == 0 and h % g == 0
    assert _groups(f) == (g, g, g)
    assert not any(d for d in range(g + 1, 33) if channels % d == 0 and h % d == 0)  # the largest such divisor
    x = torch.randn(2, channels, 5, 5)
    with torch.no_grad():
        y = f(torch.tensor(0.3), x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_conv_dynamics_known_defaults():
    assert odenet.ConvDynamics(48).norm1.num_groups == 24  # not gcd(32, 48) = 16
    assert odenet.ConvDynamics(100).norm1.num_groups == 25
    assert odenet.ConvDynamics(64, hidden=48).norm1.num_groups == 16
    assert odenet.ConvDynamics(24).norm1.num_groups == 24  # min(32, 24) divides: unchanged
    assert odenet.ConvDynamics(96).norm1.num_groups == 32
    assert odenet.ConvDynamics(7, hidden=5).norm1.num_groups == 1


def test_conv_dynamics_default_unchanged_where_it_worked():
    """Wherever the earlier default min(32, channels, hidden) divided both counts, the default is the same."""
    checked = 0
    for channels in range(1, 131):
        for hidden in range(1, 131):
            old = min(32, channels, hidden)
            if channels % old == 0 and hidden % old == 0:
                assert odenet.ConvDynamics(channels, hidden=hidden).norm1.num_groups == old, (channels, hidden)
                checked += 1
    assert checked > 1000


def test_conv_dynamics_explicit_groups_that_do_not_divide_raise():
    with pytest.raises(ValueError, match="must divide"):
        odenet.ConvDynamics(48, groups=32)
    with pytest.raises(ValueError, match="must divide"):
        odenet.ConvDynamics(64, hidden=48, groups=32)
    with pytest.raises(ValueError, match="must divide"):
        odenet.ConvDynamics(16, groups=3)
    with pytest.raises(ValueError, match="groups"):
        odenet.ConvDynamics(16, groups=0)
    assert odenet.ConvDynamics(48, groups=8).norm1.num_groups == 8  # an explicit divisor is kept
