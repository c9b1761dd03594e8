"""odenet.transformer.TransformerDynamics against a Pre-LN block written as nanoGPT writes it: the
same function with the same weights, a causal mask that blocks the future, time conditioning, the
three compositions, gradients under ODEBlock (direct, adjoint, finite differences) and the errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import odenet
from odenet.transformer import COMPOSITIONS, TransformerDynamics

# ---------------------------------------------------------------------------- nanoGPT, as its author writes it


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout, flash=True):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout, self.flash = n_head, n_embd, dropout, flash
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                               is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd=32, n_head=4, dropout=0.0, flash=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, flash)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def _randomise(module, seed=0):
    """Non-trivial weights everywhere (LayerNorm gains and biases too), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] > 0 else 0))
    return module


def _pair(dtype=torch.float64, dropout=0.0, flash=True, **kw):
    block = _randomise(Block(32, 4, dropout, flash)).to(dtype)
    f = TransformerDynamics(32, 4, causal=True, dropout=dropout, **kw).to(dtype)
    missing, unexpected = f.load_state_dict(block.state_dict(), strict=False)
    assert unexpected == ["attn.bias"] and all(k.startswith("time.") for k in missing)
    return block, f


# ---------------------------------------------------------------------------- the same function


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "explicit-softmax"])
def test_sequential_is_the_nanogpt_block_float64(flash):
    block, f = _pair(flash=flash)
    block.eval(), f.eval()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    want = block(x)
    got = odenet.ResBlock(f)(x)
    assert (got - want).abs().max() <= 1e-13 * want.abs().max()
    ode = odenet.ODEBlock(f, solver="euler", steps=1)  # one unit Euler step of the ODE
    assert (ode(x) - want).abs().max() <= 1e-13 * want.abs().max()


def test_sub_fields_are_the_nanogpt_branches_bit_for_bit():
    block, f = _pair(dtype=torch.float32)
    block.eval(), f.eval()
    x = torch.randn(2, 9, 32)
    t = torch.tensor(0.0)
    y = x + f.attention(t, x)
    y = y + f.feedforward(t, y)
    assert torch.equal(y, block(x))
    assert torch.allclose(odenet.ResBlock(f)(x), block(x), atol=1e-5, rtol=1e-5)


def test_dropout_draws_match_nanogpt_in_training():
    block, f = _pair(dtype=torch.float32, dropout=0.2)
    block.train(), f.train()
    x = torch.randn(2, 9, 32)
    torch.manual_seed(5)
    want = block(x)
    torch.manual_seed(5)
    t = torch.tensor(0.0)
    y = x + f.attention(t, x)
    y = y + f.feedforward(t, y)
    assert torch.equal(y, want)
    torch.manual_seed(5)
    assert torch.allclose(odenet.ResBlock(f)(x), want, atol=1e-5, rtol=1e-5)
    f.eval()
    assert torch.equal(f(t, x), f(t, x))  # no dropout in eval mode


def test_n_unit_euler_steps_are_n_tied_blocks():
    block, f = _pair()
    block.eval(), f.eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    want = x
    for _ in range(3):
        want = block(want)
    got = odenet.ODEBlock(f, solver="euler", steps=3, t1=3.0)(x)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_parallel_and_strang_fields():
    torch.manual_seed(0)
    t = torch.tensor(0.0, dtype=torch.float64)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    par = _randomise(TransformerDynamics(16, 2, composition="parallel", causal=True)).double()
    assert torch.allclose(par(t, x), par.attention(t, x) + par.feedforward(t, x), rtol=0, atol=1e-14)
    st = _randomise(TransformerDynamics(16, 2, composition="strang", causal=True)).double()
    y = x + 0.5 * st.feedforward(t, x)  # Macaron: half feed-forward, attention, half feed-forward
    y = y + st.attention(t, y)
    y = y + 0.5 * st.feedforward(t, y)
    assert (odenet.ResBlock(st)(x) - y).abs().max() <= 1e-13 * y.abs().max()
    seq = TransformerDynamics(16, 2, composition="sequential", causal=True).double()
    seq.load_state_dict(st.state_dict())
    assert not torch.allclose(seq(t, x), st(t, x))  # the same weights, three different fields


# ---------------------------------------------------------------------------- masks and time


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_causal_mask_blocks_the_future(composition):
    torch.manual_seed(1)
    f = _randomise(TransformerDynamics(16, 4, composition=composition, causal=True, time_dependent=True)).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6] += torch.randn(16, dtype=torch.float64)  # not a constant: LayerNorm removes those
    t = torch.tensor(0.3, dtype=torch.float64)
    a, b = f(t, x), f(t, x2)
    assert torch.equal(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().amax(dim=(0, 2)).min() > 1e-6  # every later token sees it
    for solver in ("euler", "rk4"):  # fixed steps: whole solves keep the past exactly
        block = odenet.ODEBlock(f, solver=solver, steps=4, t1=2.0)
        assert torch.equal(block(x)[:, :6], block(x2)[:, :6])
    # An adaptive solver's step sizes see every token, so the past moves, at the tolerance's scale only.
    block = odenet.ODEBlock(f, solver="dopri5", rtol=1e-9, atol=1e-9, t1=2.0)
    assert (block(x)[:, :6] - block(x2)[:, :6]).abs().max() < 1e-6
    full = _randomise(TransformerDynamics(16, 4, composition=composition, causal=False)).double()
    assert not torch.allclose(full(t, x)[:, :6], full(t, x2)[:, :6])


def test_mask_context_padding_and_causal():
    torch.manual_seed(2)
    f = _randomise(TransformerDynamics(16, 4, causal=True)).double()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    keep = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    keep[0, ..., 2] = False  # sequence 0: nobody attends to token 2
    x2 = x.clone()
    x2[0, 2] += torch.randn(16, dtype=torch.float64)
    t = torch.tensor(0.0, dtype=torch.float64)
    a, b = f(t, x, mask=keep), f(t, x2, mask=keep)
    others = [0, 1, 3, 4, 5, 6, 7]
    assert torch.equal(a[0, others], b[0, others])
    assert torch.equal(a[1], b[1])
    y1, y2 = f(t, x, mask=keep), f(t, x2)  # the mask is combined with the causal one
    assert torch.equal(y1[:, :2], y2[:, :2]) or torch.allclose(y1[:, :2], y2[:, :2], atol=1e-14)
    block = odenet.ODEBlock(f, solver="rk4", steps=2)
    assert torch.equal(block(x, mask=keep)[0, others], block(x2, mask=keep)[0, others])  # mask as solve context


def test_time_conditioning():
    torch.manual_seed(3)
    f = TransformerDynamics(16, 2, time_dependent=True).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    t0, t1 = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    assert f.time_dependent and (f(t0, x) - f(t1, x)).abs().max() > 1e-6
    g = TransformerDynamics(16, 2, time_dependent=False).double()
    assert not g.time_dependent and torch.equal(g(t0, x), g(t1, x))
    assert f(t0, x).dtype == torch.float64  # t in float64 with a float64 state


def test_time_conditioning_takes_a_time_per_sample():
    """Under per-sample error control `t` is `[B, 1, 1]`: each sample is modulated by its own
    time, as if solved alone."""
    torch.manual_seed(3)
    f = TransformerDynamics(16, 2, time_dependent=True).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64).view(3, 1, 1)
    solo = torch.cat([f(t[b].reshape(()), x[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(f(t, x), solo, rtol=1e-12, atol=1e-12)
    sol = odenet.odeint(f, x, [0.0, 1.0], rtol=1e-6, atol=1e-8, per_sample=True)
    alone = odenet.odeint(f, x[2:], [0.0, 1.0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sol.ys[-1, 2:], alone.ys[-1], rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------- under ODEBlock: gradients


def _tiny(composition="sequential"):
    """A small, gentle field (weights ~0.3, LayerNorm gains 1 + noise) that adaptive solvers cross in a few steps."""
    torch.manual_seed(4)
    f = TransformerDynamics(4, 2, hidden=6, composition=composition, causal=True, time_dependent=True).double()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in f.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if name.endswith("ln_1.weight")
                                                                               or name.endswith("ln_2.weight") else 0.0))
    return f


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_gradcheck_euler_and_dopri5(composition):
    f = _tiny(composition)
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    euler = odenet.ODEBlock(f, solver="euler", steps=3, t1=1.5)
    assert torch.autograd.gradcheck(lambda x: euler(x), (x,))
    dopri = odenet.ODEBlock(f, solver="dopri5", rtol=1e-9, atol=1e-9, t1=1.5)
    assert torch.autograd.gradcheck(lambda x: dopri(x), (x,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_direct_and_adjoint_gradients_agree(composition):
    f = _tiny(composition)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64)
    grads = {}
    for gradient in ("direct", "adjoint"):
        block = odenet.ODEBlock(f, solver="dopri5", rtol=1e-10, atol=1e-10, t1=2.0, gradient=gradient,
                                **(dict(adjoint_rtol=1e-10, adjoint_atol=1e-10) if gradient == "adjoint" else {}))
        f.zero_grad()
        x.grad = None
        (block(x) * w).sum().backward()
        grads[gradient] = [x.grad.clone()] + [p.grad.clone() for p in f.parameters()]
        assert block.last_stats.nfe_forward > 0
        assert (block.last_stats.nfe_backward > 0) == (gradient == "adjoint")
    for a, b in zip(grads["direct"], grads["adjoint"]):
        assert (a - b).abs().max().item() <= 1e-6 * max(1.0, a.abs().max().item())


def test_adjoint_matches_finite_differences_in_a_parameter():
    f = _tiny("strang")
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    block = odenet.ODEBlock(f, solver="dopri5", rtol=1e-10, atol=1e-10, t1=1.0, gradient="adjoint",
                            adjoint_rtol=1e-10, adjoint_atol=1e-10)
    p = f.mlp.c_fc.weight
    block(x).square().sum().backward()
    g = p.grad[0, 0].item()
    eps = 1e-6
    with torch.no_grad():
        p[0, 0] += eps
        up = block(x).square().sum().item()
        p[0, 0] -= 2 * eps
        down = block(x).square().sum().item()
        p[0, 0] += eps
    assert abs(g - (up - down) / (2 * eps)) <= 1e-6 * max(1.0, abs(g))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=30, heads=4), "divisible by heads"),
    (dict(dim=32, heads=4, composition="macaron"), "Unknown composition"),
    (dict(dim=0, heads=1), "dim must be an integer >= 1"),
    (dict(dim=32, heads=True), "heads must be an integer >= 1"),
    (dict(dim=32, heads=4, hidden=-1), "hidden must be an integer >= 1"),
    (dict(dim=32, heads=4, dropout=1.0), "dropout must be a number in"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerDynamics(**kwargs)


@pytest.mark.parametrize("shape", [(10, 32), (2, 10, 16), (1, 2, 10, 32)])
def test_state_shape_errors(shape):
    f = TransformerDynamics(32, 4)
    with pytest.raises(ValueError, match=r"needs a \[batch, tokens, 32\] state"):
        f(torch.tensor(0.0), torch.randn(*shape))
    with pytest.raises(ValueError, match=r"needs a \[batch, tokens, 32\] state"):
        odenet.ODEBlock(f, solver="euler", steps=1)(torch.randn(*shape))
