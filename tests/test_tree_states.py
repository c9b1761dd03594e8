"""Tuple and dict states in `odenet.odeint`: the structure in and out, every solver and gradient
method against closed forms, and torchdiffeq's per-leaf error norm and tolerances."""

import math
from typing import NamedTuple

import pytest
import torch
import torchdiffeq

import odenet
from conftest import Counting
from odenet.tree import NormedRK, TreeSpec, mixed_norm

D = torch.float64
T = [0.0, 0.5, 1.5]
W = 0.7  # the oscillator's angular frequency


class Oscillator(torch.nn.Module):
    """x' = v, v' = -w^2 x: x(t) = x0 cos(wt) + v0/w sin(wt); one parameter, w."""

    def __init__(self, kind=tuple):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(W, dtype=D))
        self.kind = kind

    def forward(self, t, s):
        if self.kind is dict:
            return {"x": s["v"], "v": -self.w**2 * s["x"]}
        out = (s[1], -self.w**2 * s[0])
        return self.kind._make(out) if hasattr(self.kind, "_make") else self.kind(out)


def exact(x0, v0, t, w=W):
    return x0 * math.cos(w * t) + v0 / w * math.sin(w * t), -x0 * w * math.sin(w * t) + v0 * math.cos(w * t)


def start(kind=tuple, grad=False):
    x0 = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=D, requires_grad=grad)
    v0 = torch.tensor([[0.2, -1.0], [0.0, 0.4]], dtype=D, requires_grad=grad)
    if kind is dict:
        return (x0, v0), {"x": x0, "v": v0}
    return (x0, v0), kind._make((x0, v0)) if hasattr(kind, "_make") else kind((x0, v0))


def leaves(tree):
    return list(tree.values()) if isinstance(tree, dict) else list(tree)


SETTINGS = {name: (dict(steps=400) if not odenet.solvers.SOLVERS[name]().adaptive else dict(rtol=1e-10, atol=1e-12))
            for name in odenet.SOLVERS}
ACCURACY = {"euler": 5e-3, "midpoint": 1e-5, "heun": 1e-5}


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
@pytest.mark.parametrize("solver", odenet.SOLVERS)
def test_tuple_state_against_closed_form(solver, gradient):
    """Solution and gradients (state and parameter) of every solver under every gradient method."""
    f = Oscillator()
    (x0, v0), y0 = start(grad=True)
    sol = odenet.odeint(f, y0, T, solver=solver, gradient=gradient, **SETTINGS[solver])
    assert isinstance(sol.ys, tuple) and sol.ys[0].shape == sol.ys[1].shape == (3, 2, 2)
    tol = ACCURACY.get(solver, 1e-7)
    for i, t in enumerate(T):
        x, v = exact(x0.detach(), v0.detach(), t)
        torch.testing.assert_close(sol.ys[0][i], x, rtol=0, atol=tol)
        torch.testing.assert_close(sol.ys[1][i], v, rtol=0, atol=tol)
    loss = sol.ys[0][-1].sum() + sol.ys[1][-1].sum()
    gx, gv, gw = torch.autograd.grad(loss, (x0, v0, f.w))
    x0_, v0_ = x0.detach().clone().requires_grad_(), v0.detach().clone().requires_grad_()
    x, v = exact(x0_, v0_, T[-1])
    ex = torch.autograd.grad(x.sum() + v.sum(), (x0_, v0_))  # d/dy0 of the closed form
    dw = 1e-6  # d/dw: a central difference of the closed form
    fd = sum((sum(p.sum() for p in exact(x0.detach(), v0.detach(), T[-1], W + s * dw)) * s) for s in (1, -1)) / (2 * dw)
    torch.testing.assert_close(gx, ex[0], rtol=0, atol=10 * tol)
    torch.testing.assert_close(gv, ex[1], rtol=0, atol=10 * tol)
    torch.testing.assert_close(gw, fd, rtol=0, atol=20 * tol)


class State(NamedTuple):
    x: torch.Tensor
    v: torch.Tensor


@pytest.mark.parametrize("kind", [tuple, list, dict, State])
def test_structure_is_kept(kind):
    f = Oscillator(kind if kind is not State else State)
    (x0, v0), y0 = start(kind)
    sol = odenet.odeint(f, y0, T, rtol=1e-9, atol=1e-11)
    assert type(sol.ys) is kind
    if kind is dict:
        assert list(sol.ys) == ["x", "v"]
    ref = odenet.odeint(Oscillator(), (x0, v0), T, rtol=1e-9, atol=1e-11)
    for a, b in zip(leaves(sol.ys), ref.ys):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(leaves(sol.ys)[0][0], x0) and torch.equal(leaves(sol.ys)[1][0], v0)


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_leaves_of_different_shapes(gradient):
    """a' = -k a (shape [2, 3]), b' = k (a scalar): a0 e^(-kt) and b0 + kt, and d/dk of both."""
    k = torch.tensor(0.8, dtype=D, requires_grad=True)
    a0, b0 = torch.linspace(-1, 1, 6, dtype=D).view(2, 3), torch.tensor(0.5, dtype=D)
    sol = odenet.odeint(lambda t, s: (-k * s[0], k.expand(())), (a0, b0), T, gradient=gradient,
                        adjoint_params=(k,), rtol=1e-10, atol=1e-12)
    assert sol.ys[0].shape == (3, 2, 3) and sol.ys[1].shape == (3,)
    torch.testing.assert_close(sol.ys[0][-1], a0 * math.exp(-0.8 * T[-1]), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sol.ys[1][-1], b0 + 0.8 * T[-1], rtol=1e-8, atol=1e-10)
    (g,) = torch.autograd.grad(sol.ys[0][-1].sum() + sol.ys[1][-1], k)
    expected = -T[-1] * math.exp(-0.8 * T[-1]) * a0.sum().item() + T[-1]
    assert abs(g.item() - expected) < 1e-7


def test_time_gradients_with_a_tuple_state():
    """dL/dt_i = g_i · f(t_i, y_i) summed over the leaves, and dL/dt_0 = -dL/dy0 · f(t0, y0)."""
    f = Oscillator()
    _, y0 = start()
    t = torch.tensor(T, dtype=D, requires_grad=True)
    sol = odenet.odeint(f, y0, t, rtol=1e-10, atol=1e-12)
    (sol.ys[0][-1].sum() + 2 * sol.ys[1][-1].sum()).backward()
    x, v = (y[-1].detach() for y in sol.ys)
    expected = (v.sum() + 2 * (-(W**2) * x).sum()).item()
    assert abs(t.grad[-1].item() - expected) < 1e-8 and t.grad[1].item() == 0.0
    assert abs(t.grad[0].item() + t.grad[-1].item()) < 1e-8  # an autonomous ODE: shifting both ends changes nothing


# ---------------------------------------------------------------- torchdiffeq's norm and per-leaf tolerances


def test_error_is_measured_as_torchdiffeq_measures_a_tuple():
    """One step: the ratio the loop reads is torchdiffeq's `_mixed_norm` of the error scaled by
    per-leaf tolerances, `max_i rms(err_i / (atol_i + rtol_i max(|y0_i|, |y1_i|)))`."""
    from torchdiffeq._impl.misc import _mixed_norm

    _, y0 = start()
    spec = TreeSpec.of(y0)
    flat = spec.flatten(y0).detach()
    rtol, atol = torch.tensor([1e-3] * 4 + [1e-6] * 4, dtype=D), torch.tensor([1e-4] * 4 + [1e-9] * 4, dtype=D)
    solver = NormedRK(odenet.solvers.Dopri5(), lambda x: mixed_norm(spec.unflatten(x)), rtol, atol, (1e-5, 1e-7), 8)
    fc = odenet.tree.TreeFunc(Oscillator(), spec)
    with torch.no_grad():
        res = solver.step(fc, 0.0, flat, 0.3)
        plain = odenet.solvers.Dopri5().step(fc, 0.0, flat, 0.3)
        scale_loop = torch.maximum(flat.abs(), res.y1.abs()) * 1e-5 + 1e-7
        seen = odenet.solvers.control.rms_norm(res.error / scale_loop)
        scaled = plain.error / (atol + rtol * torch.maximum(flat.abs(), plain.y1.abs()))
        wanted = _mixed_norm(spec.unflatten(scaled))
    torch.testing.assert_close(seen, wanted, rtol=1e-13, atol=0)


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_against_torchdiffeq_with_per_leaf_tolerances(gradient):
    """The same tuple problem, per-leaf tolerances, in odenet and torchdiffeq: solutions and gradients agree."""
    f = Oscillator()
    (x0, v0), y0 = start(grad=True)
    rtol, atol = (1e-8, 1e-10), (1e-10, 1e-12)
    kw = dict(gradient=gradient, adjoint_rtol=1e-10, adjoint_atol=1e-12) if gradient == "adjoint" else {}
    sol = odenet.odeint(f, y0, T, rtol=rtol, atol=atol, **kw)
    solve = torchdiffeq.odeint_adjoint if gradient == "adjoint" else torchdiffeq.odeint
    extra = dict(adjoint_rtol=1e-10, adjoint_atol=1e-12) if gradient == "adjoint" else {}
    ref = solve(f, y0, torch.tensor(T, dtype=D), rtol=rtol, atol=atol, **extra)
    for a, b in zip(sol.ys, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    grads = [torch.autograd.grad(ys[0][-1].sum() + ys[1][-1].pow(2).sum(), (x0, v0, f.w)) for ys in (sol.ys, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_per_leaf_tolerances_steer_the_steps():
    """Loosening one leaf's tolerances saves steps as in torchdiffeq (here v's error sets the
    steps, not x's); each count within 25% (+7) of torchdiffeq's, whose controller differs."""
    f = Oscillator()
    _, y0 = start()
    ours, theirs = {}, {}
    settings = [("both", 1e-9, 1e-11), ("x loose", (1e-3, 1e-9), (1e-5, 1e-11)), ("v loose", (1e-9, 1e-3), (1e-11, 1e-5)),
                ("all loose", 1e-3, 1e-5)]
    for name, rtol, atol in settings:
        ours[name] = odenet.odeint(f, y0, T, rtol=rtol, atol=atol).stats.nfe_forward
        counter = Counting(f)
        torchdiffeq.odeint(counter, y0, torch.tensor(T, dtype=D), rtol=rtol, atol=atol)
        theirs[name] = counter.calls
        assert abs(ours[name] - theirs[name]) <= 0.25 * theirs[name] + 7, (name, ours, theirs)
    for counts in (ours, theirs):
        assert counts["x loose"] >= 0.9 * counts["both"] > counts["v loose"] > counts["all loose"]


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_torchdiffeq_backend_takes_the_structure(gradient):
    f = Oscillator(dict)
    (x0, v0), y0 = start(dict, grad=True)
    kw = dict(rtol={"x": 1e-9, "v": 1e-8}, atol=1e-11, gradient=gradient)
    if gradient == "adjoint":
        kw.update(adjoint_rtol=1e-10, adjoint_atol=1e-12)
    sol = odenet.odeint(f, y0, T, backend="torchdiffeq", **kw)
    ref = odenet.odeint(f, y0, T, **kw)
    assert list(sol.ys) == ["x", "v"] and sol.stats.nfe_forward > 0
    for k in ("x", "v"):
        torch.testing.assert_close(sol.ys[k], ref.ys[k], rtol=0, atol=1e-7)
    grads = [torch.autograd.grad(s.ys["x"][-1].sum() + s.ys["v"].pow(2).sum(), (x0, v0, f.w)) for s in (sol, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_norm_by_name_or_callable_on_the_structure():
    """`norm="max"` is the largest magnitude over all leaves; a callable gets the structure."""
    f = Oscillator()
    _, y0 = start()
    seen = []

    def norm(tree):
        seen.append(type(tree))
        return max(leaf.abs().max() for leaf in tree)

    a = odenet.odeint(f, y0, T, rtol=1e-7, atol=1e-9, norm=norm)
    b = odenet.odeint(f, y0, T, rtol=1e-7, atol=1e-9, norm="max")
    assert seen and all(s is tuple for s in seen)
    assert a.stats.nfe_forward == b.stats.nfe_forward
    for x, y in zip(a.ys, b.ys):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-14)


def test_single_time_returns_the_structure():
    _, y0 = start(dict)
    sol = odenet.odeint(Oscillator(dict), y0, [0.25])
    assert sol.ys["x"].shape == sol.ys["v"].shape == (1, 2, 2)
    assert torch.equal(sol.ys["x"][0], y0["x"]) and sol.stats.nfe_forward == 0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "y0, exc, match",
    [
        ((torch.ones(2), torch.ones(2, dtype=D)), TypeError,
         r"share one dtype.*y0\[0\] is torch.float32 and y0\[1\] is torch.float64"),
        ((torch.ones(2), torch.ones(2, device="meta")), ValueError, r"one device.*y0\[1\] on meta"),
        ((torch.ones(2), (torch.ones(2),)), TypeError, r"y0\[1\] must be a tensor, got tuple.*not nested"),
        ({"x": torch.ones(2), "n": 3}, TypeError, r"y0\['n'\] must be a tensor, got int"),
        ((torch.ones(2), torch.ones(2, dtype=torch.long)), TypeError, r"y0\[1\] must be a floating-point"),
        ((), ValueError, "empty tuple"),
    ],
)
def test_bad_structured_states(y0, exc, match):
    with pytest.raises(exc, match=match):
        odenet.odeint(lambda t, y: y, y0, [0.0, 1.0])


def test_f_returning_another_structure():
    y0 = (torch.ones(2), torch.ones(3))
    with pytest.raises(TypeError, match=r"state's structure, a tuple with keys \[0, 1\].*returned Tensor"):
        odenet.odeint(lambda t, y: y[0], y0, [0.0, 1.0])
    with pytest.raises(TypeError, match=r"keys \[0, 1\].*returned tuple with keys \[0\]"):
        odenet.odeint(lambda t, y: (y[0],), y0, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"dy\[1\] with shape \(3,\), but .*<lambda> returned shape \(2,\)"):
        odenet.odeint(lambda t, y: (y[0], y[0]), y0, [0.0, 1.0])
    with pytest.raises(TypeError, match="state's dtype torch.float32"):
        odenet.odeint(lambda t, y: (y[0], y[1].double()), y0, [0.0, 1.0])


def test_bad_per_leaf_tolerances():
    y0 = (torch.ones(2), torch.ones(3))
    with pytest.raises(TypeError, match=r"rtol must be a number or one number per leaf.*\(1e-06,\)"):
        odenet.odeint(lambda t, y: y, y0, [0.0, 1.0], rtol=(1e-6,))
    with pytest.raises(ValueError, match=r"atol of y0\[1\] must be a positive"):
        odenet.odeint(lambda t, y: y, y0, [0.0, 1.0], atol=(1e-6, -1.0))
    with pytest.raises(TypeError, match="rtol must be a positive number"):
        odenet.odeint(lambda t, y: y, torch.ones(2), [0.0, 1.0], rtol=(1e-6, 1e-6))  # a tensor state: one number


def test_y_final_of_tuple_and_dict_states():
    y0 = (torch.ones(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    sol = odenet.odeint(lambda t, y: (-y[0], y[1] + 1), y0, [0.0, 0.5, 1.0])
    assert isinstance(sol.y_final, tuple) and sol.y_final[0].shape == (2,) and sol.y_final[1].shape == (3,)
    torch.testing.assert_close(sol.y_final[0], sol.ys[0][-1])
    d = odenet.odeint(lambda t, y: {"a": -y["a"]}, {"a": torch.ones(2)}, [0.0, 1.0]).y_final
    assert set(d) == {"a"} and d["a"].shape == (2,)
