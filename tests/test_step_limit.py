"""The default step limit: derived from the tolerance, the span and the method, so that a solve
the peers finish at their defaults does not fail here, and every solve still ends."""

import math

import pytest
import torch

import odenet


def two_body(t, y):
    r, v = y[:2], y[2:]
    return torch.cat([v, -r / (r * r).sum() ** 1.5])


E = 0.5
Y0 = torch.tensor([1 - E, 0.0, 0.0, math.sqrt((1 + E) / (1 - E))], dtype=torch.float64)


def test_tight_bosh3_orbit_finishes_at_the_defaults():
    """bosh3 at rtol = atol = 1e-10 over a 20-unit orbit takes about 14,700 steps: more than
    the old fixed default of 10,000 (it failed there), far below the derived limit."""
    sol = odenet.odeint(two_body, Y0, [0.0, 20.0], solver="bosh3", rtol=1e-10, atol=1e-10)
    steps = sol.stats.n_accepted + sol.stats.n_rejected
    assert sol.success and 10_000 < steps < odenet.Adaptive(1e-10, 1e-10).step_limit(20.0, 2)
    exact = odenet.odeint(two_body, Y0, [0.0, 20.0], solver="dopri5", rtol=1e-12, atol=1e-12).ys[-1]
    torch.testing.assert_close(sol.ys[-1], exact, rtol=0, atol=1e-6)


def test_step_limit_rule():
    loose = odenet.Adaptive(1e-3, 1e-3)
    assert loose.max_steps is None and loose.step_limit(1.0, 4) == 10_000  # training settings: as before
    tight = odenet.Adaptive(1e-6, 1e-10)
    assert tight.step_limit(20.0, 2) == math.ceil(100 * 20 * 1e-10 ** (-1 / 3))
    assert tight.step_limit(-20.0, 2) == tight.step_limit(20.0, 2)  # backward in time alike
    assert odenet.Adaptive(1e-10, 1e-10, max_steps=50).step_limit(20.0, 2) == 50


def test_derived_limit_is_in_the_failure_message_and_still_ends_a_solve():
    """A solve that cannot finish still stops, and says which limit it reached."""
    w = 2000.0  # y = sin(w t): about 10 w steps per unit time at this tolerance, far above the limit's 1,000
    sol = odenet.odeint(lambda t, y: w * torch.cos(w * t) * torch.ones_like(y), torch.zeros(1, dtype=torch.float64),
                        [0.0, 10.0], solver="bosh3", rtol=1e-3, atol=1e-3, throw=False)
    limit = odenet.Adaptive(1e-3, 1e-3).step_limit(10.0, 2)
    assert sol.status is odenet.Status.MAX_STEPS and f"max_steps={limit}" in sol.message
    assert sol.stats.n_accepted + sol.stats.n_rejected == limit


def _batch_with_one_hard_sample():
    rates = torch.ones(16, 1, dtype=torch.float64)
    rates[0] = 40.0  # one fast sample

    def f(t, y):
        return -rates * y + torch.cos(rates * t)

    return f, torch.ones(16, 1, dtype=torch.float64)


def test_error_norm_option():
    """`norm=` picks the error norm: RMS over the batch (default), max, or a callable. Under the
    max norm the hard sample sets the steps alone; RMS dilutes it over the batch (fewer steps)."""
    f, y0 = _batch_with_one_hard_sample()
    steps = {}
    for norm in ("rms", "max"):
        sol = odenet.odeint(f, y0, [0.0, 2.0], control=odenet.Adaptive(1e-6, 1e-8, norm=norm))
        steps[norm] = sol.stats.n_accepted + sol.stats.n_rejected
    assert steps["max"] > steps["rms"]
    calls = []

    def my_max(x):
        calls.append(x.shape)
        return x.abs().max()

    sol = odenet.odeint(f, y0, [0.0, 2.0], rtol=1e-6, atol=1e-8, norm=my_max)  # the shorthand builds the same
    assert calls and sol.stats.n_accepted + sol.stats.n_rejected == steps["max"]
    assert odenet.Adaptive(1e-3, 1e-3, norm="max") != odenet.Adaptive(1e-3, 1e-3)
    with pytest.raises(ValueError, match="norm must be one of \\('rms', 'max'\\).*got 'l2'"):
        odenet.Adaptive(1e-3, 1e-3, norm="l2")
    with pytest.raises(TypeError, match="norm must be one of.*int"):
        odenet.Adaptive(1e-3, 1e-3, norm=2)
    with pytest.raises(ValueError, match="norm= was given, but solver 'rk4' takes fixed steps"):
        odenet.odeint(f, y0, [0.0, 1.0], solver="rk4", norm="max")


def test_max_norm_agrees_with_torchdiffeq_given_the_same_norm():
    import torchdiffeq

    f, y0 = _batch_with_one_hard_sample()
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    ours = odenet.odeint(f, y0, t, rtol=1e-8, atol=1e-10, norm="max").ys
    theirs = torchdiffeq.odeint(f, y0, t, rtol=1e-8, atol=1e-10, options=dict(norm=lambda x: x.abs().max()))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
