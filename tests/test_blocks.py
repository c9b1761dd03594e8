"""ResBlock / ODEBlock / swap_blocks as ordinary nn.Modules, and the ResNet = Euler identity."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import odenet


def _f(dim=4, seed=0):
    torch.manual_seed(seed)
    return odenet.MLPDynamics(dim=dim, hidden=16).double()


@pytest.mark.parametrize("n", [1, 3, 6, 10])
def test_stacked_resblocks_equal_euler_odeblock(n):
    f = _f()
    x = torch.randn(5, 4, dtype=torch.float64)
    stack = nn.Sequential(*[odenet.ResBlock(f, h=1 / n, t=i / n) for i in range(n)])
    euler = odenet.ODEBlock(f, solver="euler", steps=n)
    diff = (stack(x) - euler(x)).abs().max().item()
    assert diff <= 1e-12, diff
    assert euler.last_stats.nfe_forward == n


@pytest.mark.parametrize("n", [1, 3, 6, 7, 10, 24])
def test_stacked_resblocks_equal_euler_odeblock_bit_for_bit(n):
    """What the docs promise exactly: float32 for any N, float64 for N a power of two."""
    for dtype, ok in ((torch.float32, True), (torch.float64, n & (n - 1) == 0)):
        f = _f().to(dtype)
        x = torch.randn(5, 4, dtype=dtype)
        stack = nn.Sequential(*[odenet.ResBlock(f, h=1 / n, t=i / n) for i in range(n)])
        if ok:
            assert torch.equal(stack(x), odenet.ODEBlock(f, solver="euler", steps=n)(x))
            back = odenet.swap_blocks(odenet.swap_blocks(stack, solver="dopri5"), solver="euler", steps=1)
            assert torch.equal(back(x), stack(x))
        else:  # the step sizes differ in the last bit at most: agreement to rounding
            torch.testing.assert_close(stack(x), odenet.ODEBlock(f, solver="euler", steps=n)(x), rtol=1e-14, atol=1e-15)


def test_resblock_is_one_euler_step():
    f = _f()
    x = torch.randn(5, 4, dtype=torch.float64)
    block = odenet.ResBlock(f, h=0.3, t=0.2)
    expected = x + 0.3 * f(torch.tensor(0.2, dtype=torch.float64), x)
    torch.testing.assert_close(block(x), expected, rtol=1e-14, atol=1e-14)


def test_swap_blocks_roundtrip():
    f1, f2 = _f(seed=1), _f(seed=2)
    model = nn.Sequential(
        nn.Linear(4, 4).double(), odenet.ResBlock(f1, h=0.5, t=0.0), nn.Sequential(odenet.ResBlock(f2, h=0.5, t=0.5))
    )
    x = torch.randn(3, 4, dtype=torch.float64)
    y_res = model(x)
    model = odenet.swap_blocks(model, solver="euler", steps=1)  # ResBlock -> ResBlock: unchanged
    torch.testing.assert_close(model(x), y_res, rtol=0, atol=0)

    model = odenet.swap_blocks(model, solver="dopri5", rtol=1e-3, atol=1e-3)
    assert isinstance(model[1], odenet.ODEBlock) and isinstance(model[2][0], odenet.ODEBlock)
    assert model[1].f is f1 and model[2][0].f is f2  # same parameters
    assert (model[1].t0, model[1].t1, model[2][0].t0, model[2][0].t1) == (0.0, 0.5, 0.5, 1.0)
    y_ode = model(x)
    assert (y_ode - y_res).abs().max() > 1e-6  # a different computation...

    model = odenet.swap_blocks(model, solver="euler", steps=1)  # ...and back
    assert isinstance(model[1], odenet.ResBlock) and model[1].h == 0.5 and model[2][0].t == 0.5
    torch.testing.assert_close(model(x), y_res, rtol=0, atol=0)

    model = odenet.swap_blocks(model, solver="euler", steps=4)  # Euler with 4 sub-steps per block
    assert isinstance(model[1], odenet.ODEBlock) and model[1].control == odenet.Fixed(steps=4)


def test_swap_blocks_keeps_training_mode():
    """A model in eval() stays in eval after a swap (both ways); in training mode, training."""
    model = nn.Sequential(nn.Linear(4, 4).double(), odenet.ResBlock(_f(), h=0.5), odenet.ResBlock(_f(), h=0.5, t=0.5))
    model.eval()
    model = odenet.swap_blocks(model, solver="dopri5", regularization=odenet.RNODE(kinetic=1.0))
    assert not any(m.training for m in model.modules())
    model(torch.randn(3, 4, dtype=torch.float64))
    assert model[1].last_regularization is None  # eval: the plain ODE, no regulariser
    model = odenet.swap_blocks(model, solver="euler", steps=1)
    assert not any(m.training for m in model.modules())
    model.train()
    model = odenet.swap_blocks(model, solver="rk4", steps=2)
    assert all(m.training for m in model.modules())
    model[1].f.linears.eval()  # a part of f frozen in eval inside a training model stays so
    model = odenet.swap_blocks(model, solver="dopri5")
    assert model[1].training and not model[1].f.linears.training and model[2].f.linears.training


def test_swap_blocks_single_block_and_validation():
    block = odenet.ResBlock(_f(), h=1.0)
    ode = odenet.swap_blocks(block, solver="rk4", steps=3)
    assert isinstance(ode, odenet.ODEBlock) and ode.f is block.f
    with pytest.raises(ValueError, match="steps"):
        odenet.swap_blocks(nn.Sequential(block), solver="dopri5", steps=3)


def test_unknown_keywords_name_the_block_and_the_closest_setting():
    f = _f()
    with pytest.raises(TypeError, match=r"ODEBlock got an unexpected keyword argument 'rtl'\. Did you mean 'rtol'\?"):
        odenet.ODEBlock(f, rtl=1e-3)
    with pytest.raises(TypeError, match=r"swap_blocks got an unexpected keyword argument 'max_step'\. Did you mean 'max_steps'\?"):
        odenet.swap_blocks(odenet.ResBlock(f), solver="dopri5", max_step=10)
    with pytest.raises(TypeError, match="keeps each block's own interval"):
        odenet.swap_blocks(odenet.ResBlock(f), solver="dopri5", t0=0.0)
    with pytest.raises(TypeError, match="takes no adjoint_params: blocks differentiate the parameters of f"):
        odenet.ODEBlock(f, gradient="adjoint", adjoint_params=list(f.parameters()))
    model = nn.Sequential(odenet.ResBlock(f))
    with pytest.raises(TypeError):
        odenet.swap_blocks(model, solver="dopri5", rtl=1e-3)
    assert isinstance(model[0], odenet.ResBlock)  # nothing replaced before the error


def test_numpy_scalars_are_numbers():
    """NumPy scalars are accepted for times and step sizes, as odeint accepts them for its settings."""
    import numpy as np

    f = _f()
    block = odenet.ODEBlock(f, t0=np.float32(0.0), t1=np.float32(0.5))
    assert (block.t0, block.t1) == (0.0, 0.5) and type(block.t1) is float
    res = odenet.ResBlock(f, h=np.float32(0.25), t=np.int64(1))
    assert (res.h, res.t) == (0.25, 1.0)
    with pytest.raises(TypeError, match="finite number"):
        odenet.ResBlock(f, h=torch.tensor(0.5))


def test_trajectory_shape_and_endpoints():
    f = _f()
    block = odenet.ODEBlock(f, solver="dopri5", rtol=1e-6, atol=1e-8)
    x = torch.randn(7, 4, dtype=torch.float64)
    t = torch.linspace(0, 1, 20, dtype=torch.float64)
    ys = block.trajectory(x, t)
    assert ys.shape == (20, 7, 4)
    torch.testing.assert_close(ys[0], x, rtol=0, atol=0)
    torch.testing.assert_close(ys[-1], block(x), rtol=1e-12, atol=1e-12)


def test_state_dict_roundtrip_and_nesting():
    model = nn.Sequential(nn.Linear(4, 4), odenet.ODEBlock(odenet.MLPDynamics(4, 8), solver="rk4", steps=2), nn.Linear(4, 2))
    clone = nn.Sequential(nn.Linear(4, 4), odenet.ODEBlock(odenet.MLPDynamics(4, 8), solver="rk4", steps=2), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(x), model(x))
    assert any(k.startswith("1.f.") for k in model.state_dict())


def test_deepcopy_pickle_and_torch_save():
    block = odenet.ODEBlock(odenet.MLPDynamics(3, 8), solver="dopri5", rtol=1e-4, atol=1e-4, gradient="adjoint")
    x = torch.randn(2, 3)
    y = block(x)
    for other in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        torch.testing.assert_close(other(x), y)
        assert other.options == block.options
    buf = io.BytesIO()
    torch.save(block, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), y)


def test_to_dtype_moves_block():
    block = odenet.ODEBlock(odenet.MLPDynamics(3, 8), solver="rk4", steps=2).to(torch.float64)
    y = block(torch.randn(2, 3, dtype=torch.float64))
    assert y.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    block = odenet.ODEBlock(odenet.MLPDynamics(3, 8), solver="dopri5", rtol=1e-5, atol=1e-5, gradient="adjoint").cuda()
    x = torch.randn(4, 3, device="cuda", requires_grad=True)
    block(x).sum().backward()
    assert x.grad.device.type == "cuda" and block.last_stats.nfe_backward > 0


def test_conv_dynamics_block():
    f = odenet.ConvDynamics(channels=8)
    block = odenet.ODEBlock(f, solver="rk4", steps=2, gradient="checkpoint")
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and f.conv1.conv.weight.grad is not None


def test_last_stats_backward_counts_fill_in():
    block = odenet.ODEBlock(odenet.MLPDynamics(3, 8), solver="dopri5", rtol=1e-4, atol=1e-4, gradient="adjoint")
    x = torch.randn(4, 3, requires_grad=True)
    y = block(x)
    stats = block.last_stats
    assert stats.nfe_forward > 0 and stats.nfe_backward == 0
    y.sum().backward()
    assert stats.nfe_backward > 0 and stats.n_accepted_backward > 0


def test_block_repr():
    block = odenet.ODEBlock(odenet.MLPDynamics(2), solver="dopri5", rtol=1e-3, atol=1e-4, gradient="adjoint")
    text = repr(block)
    assert "dopri5" in text and "Adaptive(rtol=0.001, atol=0.0001)" in text and "Adjoint()" in text
    assert "h=0.5" in repr(odenet.ResBlock(odenet.MLPDynamics(2), h=0.5))


def test_deepcopy_after_regularized_training_step():
    """A snapshot (deepcopy) right after a training forward with RNODE must work."""
    block = odenet.ODEBlock(odenet.MLPDynamics(2, 8), solver="rk4", steps=2, regularization=odenet.RNODE(kinetic=0.1))
    x = torch.randn(4, 2)
    block(x)
    assert block.last_regularization is not None and block.last_regularization.grad_fn is not None
    snapshot = copy.deepcopy(block)
    assert snapshot.last_regularization is None
    torch.testing.assert_close(snapshot.eval()(x), block.eval()(x))


@pytest.mark.parametrize("settings", [dict(solver="dopri5"), dict(solver="rk4", steps=2), dict(solver="dopri5", gradient="adjoint")])
def test_odeblock_under_autocast(settings):
    """Inside torch.autocast f's layers compute in bfloat16; the block, like a ResBlock, keeps
    the state in float32 (it used to raise that f returned the wrong dtype). Gradients flow."""
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=3, hidden=16)
    x = torch.randn(8, 3)
    block = odenet.ODEBlock(f, **settings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, block(x), rtol=0, atol=0.05)  # bfloat16 accuracy of f
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f.parameters())


def test_resblocks_equal_euler_odeblock_under_autocast():
    """The ResNet = Euler identity holds inside autocast too (bit for bit at h = 1/4)."""
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=3, hidden=16)
    x = torch.randn(8, 3)
    stack = nn.Sequential(*[odenet.ResBlock(f, h=1 / 4, t=i / 4) for i in range(4)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(stack(x), odenet.ODEBlock(f, solver="euler", steps=4)(x))


def test_checkpoint_recomputes_under_the_forwards_autocast():
    """checkpoint's backward recomputes f inside the autocast the solve ran in (backward itself
    runs outside it): the same bfloat16 operations, so direct's gradient. (Without autocast's
    weight cache: with it, direct sums a weight's gradient over the whole solve in bfloat16 at
    the one cached cast, and the two differ at bfloat16 precision.)"""
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=3, hidden=16)
    x = torch.randn(8, 3, requires_grad=True)
    grads = {}
    for gradient in ("direct", "checkpoint"):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            y = odenet.ODEBlock(f, solver="rk4", steps=4, gradient=gradient)(x)
        grads[gradient] = torch.autograd.grad(y.square().mean(), (x, *f.parameters()))
    for a, b in zip(grads["checkpoint"], grads["direct"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)  # recomputed in float32: ~3e-3 apart


def test_autocast_casts_only_its_own_dtype():
    """Inside autocast only f's autocast-dtype output is cast; a float64 f for a float32 state
    is still an error, as outside autocast."""
    f64 = odenet.MLPDynamics(dim=3, hidden=8).double()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="state's dtype"):
        odenet.odeint(lambda t, y: f64(t.double(), y.double()), torch.randn(2, 3), [0.0, 1.0])
