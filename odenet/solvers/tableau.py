"""Butcher tableaus: explicit Runge–Kutta methods as data, one frozen object per method.

Dense output: `y(t0 + θh) ≈ y0 + h Σ_i b_i(θ) k_i` with `b_i(1) = b_i`; `dense[i]` holds the
coefficients of `θ, θ², …` of `b_i(θ)` (no constant term, since `y(t0) = y0`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "ButcherTableau",
    "EULER",
    "MIDPOINT",
    "HEUN",
    "RK4",
    "BOSH3",
    "DOPRI5",
    "TSIT5",
    "DOPRI8",
]

Row = Tuple[float, ...]


def _tuple(x: Sequence) -> Row:
    return tuple(float(v) for v in x)


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method as data; `ExplicitRK(tableau)` runs it.

    **Arguments:**

    - `name`: short name, used in messages and by `odenet.citation`.
    - `c`, `a`, `b`: nodes (`c[0] == 0`), the strictly lower-triangular stage matrix (row `i`
      has `i` entries) and the solution weights (summing to 1), one per stage.
    - `order`: order of the solution.
    - `b_err`, `embedded_order`: error weights `b - b_embedded` and order of an embedded
      method; with them the method can run adaptively.
    - `b_err_low`, `low_order`: optionally a second, lower-order embedded method's error
      weights and order; the step is then controlled by the blend `a² / sqrt(a² + 0.01 b²)` of
      the two scaled error norms (`a` of `b_err`, `b` of `b_err_low`), as in DOP853.
    - `dense`: per-stage coefficients of the continuous extension (default: linear, `θ b_i`).
    - `reference`: where the method comes from (printed by `odenet.citation`).

    **Raises:** `ValueError` if the shapes disagree, `c` is not the row sums of `a`, the weights
    do not sum to 1 (`b_err` to 0), or `dense` does not give `b` at `θ = 1`.

    **Example:**

    ```python
    from odenet.solvers import ButcherTableau, ExplicitRK

    ralston = ButcherTableau(name="ralston", c=(0, 2 / 3), a=((), (2 / 3,)), b=(1 / 4, 3 / 4), order=2)
    sol = odenet.odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver=ExplicitRK(ralston), steps=8)
    ```
    """

    name: str
    c: Row
    a: Tuple[Row, ...]
    b: Row
    order: int
    b_err: Optional[Row] = None
    embedded_order: Optional[int] = None
    b_err_low: Optional[Row] = None
    low_order: Optional[int] = None
    dense: Optional[Tuple[Row, ...]] = None
    reference: str = ""
    fsal: bool = field(init=False)

    def __post_init__(self):
        s = len(self.c)
        object.__setattr__(self, "c", _tuple(self.c))
        object.__setattr__(self, "a", tuple(_tuple(r) for r in self.a))
        object.__setattr__(self, "b", _tuple(self.b))
        if self.b_err is not None:
            object.__setattr__(self, "b_err", _tuple(self.b_err))
        if self.b_err_low is not None:
            object.__setattr__(self, "b_err_low", _tuple(self.b_err_low))
        if self.dense is None:
            object.__setattr__(self, "dense", tuple((bi,) for bi in self.b))
        else:
            object.__setattr__(self, "dense", tuple(_tuple(r) for r in self.dense))

        def bad(msg):
            raise ValueError(f"ButcherTableau {self.name!r}: {msg}")

        if s == 0:
            bad("needs at least one stage (got an empty `c`).")
        if self.c[0] != 0.0:
            bad(f"explicit methods need c[0] == 0, got c[0] = {self.c[0]}.")
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            bad(
                "`a` must be strictly lower triangular with row i holding i entries; got row "
                f"lengths {[len(r) for r in self.a]} for {s} stages."
            )
        if len(self.b) != s:
            bad(f"`b` has {len(self.b)} entries for {s} stages.")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > 1e-10:
                bad(f"row {i} of `a` sums to {sum(row)} but c[{i}] = {self.c[i]}.")
        if abs(sum(self.b) - 1.0) > 1e-10:
            bad(f"weights `b` sum to {sum(self.b)}, not 1.")
        if self.b_err is not None:
            if len(self.b_err) != s:
                bad(f"`b_err` has {len(self.b_err)} entries for {s} stages.")
            if abs(sum(self.b_err)) > 1e-10:
                bad(f"error weights `b_err` must sum to 0 (b and the embedded weights both sum to 1), got {sum(self.b_err)}.")
            if self.embedded_order is None:
                bad("`embedded_order` is required when `b_err` is given.")
        if self.b_err_low is not None:
            if self.b_err is None or self.low_order is None or len(self.b_err_low) != s:
                bad("`b_err_low` needs `b_err`, `low_order` and one entry per stage.")
            if abs(sum(self.b_err_low)) > 1e-10:
                bad(f"error weights `b_err_low` must sum to 0, got {sum(self.b_err_low)}.")
        if len(self.dense) != s:
            bad(f"`dense` has {len(self.dense)} rows for {s} stages.")
        for i, row in enumerate(self.dense):
            if abs(sum(row) - self.b[i]) > 1e-8:
                bad(f"dense output of stage {i} gives {sum(row)} at θ=1 but b[{i}] = {self.b[i]}.")
        fsal = s > 1 and self.c[-1] == 1.0 and all(abs(x - y) < 1e-15 for x, y in zip(self.a[-1], self.b)) and self.b[-1] == 0.0
        object.__setattr__(self, "fsal", fsal)

    @property
    def stages(self) -> int:
        """Number of stages `s`."""
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        """Whether the tableau carries an embedded error estimate."""
        return self.b_err is not None

    @property
    def error_order(self) -> int:
        """Order `q` of the error estimate, `min(order, embedded_order)`; for a blend of estimates
        of orders p (`embedded_order`) and r (`low_order`), which shrinks like h^(2(p+1) - (r+1)),
        that power less one."""
        if self.embedded_order is None:
            return self.order
        if self.b_err_low is not None:
            return min(self.order, 2 * (self.embedded_order + 1) - (self.low_order + 1) - 1)
        return min(self.order, self.embedded_order)

    def dense_weights(self, theta: float) -> Tuple[float, ...]:
        """The weights `b_i(θ)` of the continuous extension at `θ = theta` in `[0, 1]`."""
        return tuple(sum(coef * theta ** (j + 1) for j, coef in enumerate(row)) for row in self.dense)


# ---------------------------------------------------------------- helpers to build dense outputs


def _poly(*coefs) -> np.ndarray:
    """Polynomial in θ as an object array of Fractions (constant term first)."""
    return np.array([Fraction(c) for c in coefs], dtype=object)


def _pmul(p, q):
    out = np.array([Fraction(0)] * (len(p) + len(q) - 1), dtype=object)
    for i, x in enumerate(p):
        for j, y in enumerate(q):
            out[i + j] += x * y
    return out


def _padd(*ps):
    n = max(len(p) for p in ps)
    out = np.array([Fraction(0)] * n, dtype=object)
    for p in ps:
        out[: len(p)] += p
    return out


def _scale(p, s):
    return np.array([x * Fraction(s) for x in p], dtype=object)


def _to_dense(polys) -> Tuple[Row, ...]:
    rows = []
    for p in polys:
        assert p[0] == 0
        coefs = [float(x) for x in p[1:]]
        while len(coefs) > 1 and coefs[-1] == 0.0:
            coefs.pop()
        rows.append(tuple(coefs))
    return tuple(rows)


def _hermite_dense(b: Sequence[Fraction]) -> Tuple[Row, ...]:
    """Cubic Hermite continuous extension of an FSAL method, whose last stage is f(t1, y1)."""
    # y(θ) = (2θ³-3θ²+1) y0 + (θ³-2θ²+θ) h f0 + (3θ²-2θ³) y1 + (θ³-θ²) h f1, with
    # y1 = y0 + h Σ b_i k_i, f0 = k_0 and f1 = k_{s-1}.
    s = len(b)
    h00_f0 = _poly(0, 1, -2, 1)
    h01 = _poly(0, 0, 3, -2)
    h11 = _poly(0, 0, -1, 1)
    polys = []
    for i in range(s):
        p = _scale(h01, b[i])
        if i == 0:
            p = _padd(p, h00_f0)
        if i == s - 1:
            p = _padd(p, h11)
        polys.append(p)
    return _to_dense(polys)


F = Fraction

# ---------------------------------------------------------------- fixed-step methods

EULER = ButcherTableau(
    name="euler",
    c=(0,),
    a=((),),
    b=(1,),
    order=1,
    dense=((1.0,),),  # the Euler polygon: linear between steps
    reference="L. Euler, Institutionum calculi integralis, 1768.",
)

MIDPOINT = ButcherTableau(
    name="midpoint",
    c=(0, 0.5),
    a=((), (0.5,)),
    b=(0, 1),
    order=2,
    # b1 = θ - θ², b2 = θ²: second-order continuous extension.
    dense=((1.0, -1.0), (0.0, 1.0)),
    reference="C. Runge, Über die numerische Auflösung von Differentialgleichungen, Math. Ann. 46, 1895.",
)

HEUN = ButcherTableau(
    name="heun",
    c=(0, 1),
    a=((), (1.0,)),
    b=(0.5, 0.5),
    order=2,
    # b1 = θ - θ²/2, b2 = θ²/2
    dense=((1.0, -0.5), (0.0, 0.5)),
    reference="K. Heun, Neue Methode zur approximativen Integration der Differentialgleichungen "
    "einer unabhängigen Veränderlichen, Z. Math. Phys. 45, 1900.",
)

RK4 = ButcherTableau(
    name="rk4",
    c=(0, 0.5, 0.5, 1),
    a=((), (0.5,), (0, 0.5), (0, 0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    order=4,
    # Third-order continuous extension (Hairer, Nørsett & Wanner, Solving ODEs I, II.6).
    dense=(
        (1.0, -1.5, 2 / 3),
        (0.0, 1.0, -2 / 3),
        (0.0, 1.0, -2 / 3),
        (0.0, -0.5, 2 / 3),
    ),
    reference="W. Kutta, Beitrag zur näherungsweisen Integration totaler Differentialgleichungen, "
    "Z. Math. Phys. 46, 1901.",
)

# ---------------------------------------------------------------- adaptive (embedded) methods

_BOSH3_B = (F(2, 9), F(1, 3), F(4, 9), F(0))
_BOSH3_BHAT = (F(7, 24), F(1, 4), F(1, 3), F(1, 8))

BOSH3 = ButcherTableau(
    name="bosh3",
    c=(0, 0.5, 0.75, 1),
    a=((), (0.5,), (0, 0.75), tuple(float(x) for x in _BOSH3_B[:3])),
    b=tuple(float(x) for x in _BOSH3_B),
    b_err=tuple(float(x - y) for x, y in zip(_BOSH3_B, _BOSH3_BHAT)),
    order=3,
    embedded_order=2,
    dense=_hermite_dense(_BOSH3_B),
    reference="P. Bogacki and L. F. Shampine, A 3(2) pair of Runge–Kutta formulas, "
    "Appl. Math. Lett. 2(4), 1989.",
)

_DP_B = (F(35, 384), F(0), F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), F(0))
_DP_BHAT = (F(5179, 57600), F(0), F(7571, 16695), F(393, 640), F(-92097, 339200), F(187, 2100), F(1, 40))
# Shampine (1986) dense-output coefficients, as used in Hairer's DOPRI5 (CONTD5).
_DP_D = (
    F(-12715105075, 11282082432), F(0), F(87487479700, 32700410799), F(-10690763975, 1880347072),
    F(701980252875, 199316789632), F(-1453857185, 822651844), F(69997945, 29380423),
)


def _dopri5_dense() -> Tuple[Row, ...]:
    # y(θ) = y0 + θΔ + θ(1-θ)(h k1 - Δ) + θ²(1-θ)(2Δ - h k1 - h k7) + θ²(1-θ)² h Σ d_i k_i,
    # with Δ = h Σ b_i k_i (Hairer, Nørsett & Wanner, Solving ODEs I, II.6).
    t1 = _poly(0, 1)
    t1m = _poly(0, 1, -1)  # θ(1-θ)
    t2m = _poly(0, 0, 1, -1)  # θ²(1-θ)
    t2m2 = _pmul(t2m, _poly(1, -1))  # θ²(1-θ)²
    polys = []
    for i in range(7):
        e1 = F(1 if i == 0 else 0)
        e7 = F(1 if i == 6 else 0)
        p = _padd(
            _scale(t1, _DP_B[i]),
            _scale(t1m, e1 - _DP_B[i]),
            _scale(t2m, 2 * _DP_B[i] - e1 - e7),
            _scale(t2m2, _DP_D[i]),
        )
        polys.append(p)
    return _to_dense(polys)


DOPRI5 = ButcherTableau(
    name="dopri5",
    c=(0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        tuple(float(x) for x in _DP_B[:6]),
    ),
    b=tuple(float(x) for x in _DP_B),
    b_err=tuple(float(x - y) for x, y in zip(_DP_B, _DP_BHAT)),
    order=5,
    embedded_order=4,
    dense=_dopri5_dense(),
    reference="J. R. Dormand and P. J. Prince, A family of embedded Runge–Kutta formulae, "
    "J. Comput. Appl. Math. 6(1), 1980; dense output: L. F. Shampine, Some practical "
    "Runge–Kutta formulas, Math. Comp. 46(173), 1986.",
)


def _tsit5_dense() -> Tuple[Row, ...]:
    # Tsitouras (2011), section 3: the continuous extension b_i(θ) in factored form.
    P = np.polynomial.Polynomial
    th = P([0.0, 1.0])
    basis = [
        -1.0530884977290216 * th * (th - 1.3299890189751412) * (th**2 - 1.4364028541716351 * th + 0.7139816917074209),
        0.1017 * th**2 * (th**2 - 2.1966568338249754 * th + 1.2949852507374631),
        2.490627285651252793 * th**2 * (th**2 - 2.38535645472061657 * th + 1.57803468208092486),
        -16.54810288924490272 * (th - 1.21712927295533244) * (th - 0.61620406037800089) * th**2,
        47.37952196281928122 * (th - 1.203071208372362603) * (th - 0.658047292653547382) * th**2,
        -34.87065786149660974 * (th - 1.2) * (th - 2 / 3) * th**2,
        2.5 * (th - 1) * (th - 0.6) * th**2,
    ]
    rows = []
    for p in basis:
        coef = np.zeros(5)
        coef[: len(p.coef)] = p.coef
        rows.append(tuple(float(x) for x in coef[1:]))
    return tuple(rows)


_TS_B = (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742,
         -3.290069515436081, 2.324710524099774, 0.0)

TSIT5 = ButcherTableau(
    name="tsit5",
    c=(0, 0.161, 0.327, 0.9, 0.9800255409045097, 1, 1),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.897153057105493, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383),
        _TS_B[:6],
    ),
    b=_TS_B,
    # b - b_embedded; the sign of the last entry is the corrected one (-1/66).
    b_err=(0.001780011052226, 0.000816434459657, -0.007880878010262, 0.144711007173263,
           -0.582357165452555, 0.458082105929187, -1 / 66),
    order=5,
    embedded_order=4,
    dense=_tsit5_dense(),
    reference="Ch. Tsitouras, Runge–Kutta pairs of order 5(4) satisfying only the first column "
    "simplifying assumption, Comput. Math. Appl. 62(2), 2011.",
)


# Dormand–Prince 8(5,3), "DOP853": the coefficients of Hairer's dop853.f (Hairer, Nørsett &
# Wanner, Solving ODEs I, 2nd ed., 1993), entered as printed there (30 digits; float64 rounds
# them). Stages 1–12 make the step, stage 13 is f(t1, y1) (FSAL: 12 evaluations per step, as
# dop853.f counts). Stages 2–5 have no weight in b. c4, c5 = (6 ∓ √6)/30, c3 = 2/3 c4, c2 = 4/9 c4.
_D8_C = (
    0.0, 0.526001519587677318785587544488e-01, 0.789002279381515978178381316732e-01,
    0.118350341907227396726757197510, 0.281649658092772603273242802490,
    0.333333333333333333333333333333, 0.25, 0.307692307692307692307692307692,
    0.651282051282051282051282051282, 0.6, 0.857142857142857142857142857142, 1.0, 1.0,
)
_D8_B = (
    5.42937341165687622380535766363e-2, 0.0, 0.0, 0.0, 0.0, 4.45031289275240888144113950566,
    1.89151789931450038304281599044, -5.8012039600105847814672114227, 3.1116436695781989440891606237e-1,
    -1.52160949662516078556178806805e-1, 2.01365400804030348374776537501e-1,
    4.47106157277725905176885569043e-2, 0.0,
)
_D8_A = (
    (),
    (5.26001519587677318785587544488e-2,),
    (1.97250569845378994544595329183e-2, 5.91751709536136983633785987549e-2),
    (2.95875854768068491816892993775e-2, 0.0, 8.87627564304205475450678981324e-2),
    (2.41365134159266685502369798665e-1, 0.0, -8.84549479328286085344864962717e-1,
     9.24834003261792003115737966543e-1),
    (3.7037037037037037037037037037e-2, 0.0, 0.0, 1.70828608729473871279604482173e-1,
     1.25467687566822425016691814123e-1),
    (3.7109375e-2, 0.0, 0.0, 1.70252211019544039314978060272e-1, 6.02165389804559606850219397283e-2,
     -1.7578125e-2),
    (3.70920001185047927108779319836e-2, 0.0, 0.0, 1.70383925712239993810214054705e-1,
     1.07262030446373284651809199168e-1, -1.53194377486244017527936158236e-2,
     8.27378916381402288758473766002e-3),
    (6.24110958716075717114429577812e-1, 0.0, 0.0, -3.36089262944694129406857109825,
     -8.68219346841726006818189891453e-1, 2.75920996994467083049415600797e1,
     2.01540675504778934086186788979e1, -4.34898841810699588477366255144e1),
    (4.77662536438264365890433908527e-1, 0.0, 0.0, -2.48811461997166764192642586468,
     -5.90290826836842996371446475743e-1, 2.12300514481811942347288949897e1,
     1.52792336328824235832596922938e1, -3.32882109689848629194453265587e1,
     -2.03312017085086261358222928593e-2),
    (-9.3714243008598732571704021658e-1, 0.0, 0.0, 5.18637242884406370830023853209,
     1.09143734899672957818500254654, -8.14978701074692612513997267357,
     -1.85200656599969598641566180701e1, 2.27394870993505042818970056734e1,
     2.49360555267965238987089396762, -3.0467644718982195003823669022),
    (2.27331014751653820792359768449, 0.0, 0.0, -1.05344954667372501984066689879e1,
     -2.00087205822486249909675718444, -1.79589318631187989172765950534e1,
     2.79488845294199600508499808837e1, -2.85899827713502369474065508674,
     -8.87285693353062954433549289258, 1.23605671757943030647266201528e1,
     6.43392746015763530355970484046e-1),
    _D8_B[:12],
)
# Error estimate, as dop853.f: err5 = h Σ er_i k_i (y1 minus a 5th-order solution) and err3 = h Σ
# (b_i - bhh_i) k_i (minus a 3rd-order one, bhh at dop853.f's stages 1, 9 and 12), blended by the
# loop as |err5|² / sqrt(|err5|² + 0.01 |err3|²) of the scaled norms, which shrinks like h^8
# (error order 7: the controller's exponent is 1/8, as dop853.f's). (torchdiffeq's "dopri8" is
# another method, RK8(7)13M.)
_D8_ERR5 = (
    0.1312004499419488073250102996e-01, 0.0, 0.0, 0.0, 0.0, -0.1225156446376204440720569753e+01,
    -0.4957589496572501915214079952, 0.1664377182454986536961530415e+01,
    -0.3503288487499736816886487290, 0.3341791187130174790297318841,
    0.8192320648511571246570742613e-01, -0.2235530786388629525884427845e-01, 0.0,
)
_D8_BHH = {0: 0.244094488188976377952755905512, 8: 0.733846688281611857341361741547,
           11: 0.220588235294117647058823529412e-01}
_D8_ERR3 = tuple(bi - _D8_BHH.get(i, 0.0) for i, bi in enumerate(_D8_B))
# Dense output. dop853.f's 7th-order continuous extension needs three more evaluations of f per
# step (its stages 14-16), which a tableau's per-stage polynomials cannot express. This one uses
# only the 13 stages above: b_i(θ) (degree 7, b_i(1) = b_i) satisfies every order condition of a
# continuous extension up to order 6, Σ_i b_i(θ) Φ_i(t) = θ^|t| / γ(t) for all trees |t| <= 6
# (Hairer, Nørsett & Wanner, Solving ODEs I, II.6); the one direction these leave free is fixed by
# least squares on the order-7 conditions (residuals weighted by 1/σ(t), as in the local error),
# which gives b(0) = 0 and b(1) = b. Solved in 60-digit arithmetic (mpmath) from the 30-digit
# coefficients above; `tests/test_solvers.py` checks the conditions. Stages 2–5 get no weight.
# The coefficients are large (to 2e4; the values b_i(θ) stay below 8), so evaluating the weights
# in float64 costs a few 1e-12 in them: far below the tolerances an interpolated output meets.
_D8_DENSE = (
    (1.0, -6.958943759515109, 26.877329786570783, -61.29987130490701, 79.80345430751804, -54.04183891020666,
     14.674163614656521),
    (0.0,),
    (0.0,),
    (0.0,),
    (0.0,),
    (0.0, 303.2318257688779, -2696.350996192115, 9747.072975295534, -16575.418358219773, 13210.014836726285,
     -3984.099970486055),
    (0.0, 136.39977814593945, -1043.7898062272827, 3410.9487113918394, -5454.415164341449, 4182.385153982014,
     -1229.6371550517474),
    (0.0, -425.863817265868, 3632.5142397710056, -12746.865256143574, 21282.28903062054, -16765.32859328512,
     5017.453192343003),
    (0.0, 8.409240642766456, -146.0881908918266, 727.125516658807, -1465.8824134532022, 1294.872987852162,
     -418.125976441749),
    (0.0, -15.309461749017338, 222.5908013536793, -1048.3471125012977, 2073.0871718704093, -1816.0140295541937,
     583.8404696307576),
    (0.0, 0.17281430977232698, 4.3544115032643536, -31.012214991483848, 65.37340703004358, -54.58232884192646,
     15.895276391134075),
    (0.0, 1.2518972403776325, -5.663344658851194, 7.377251595082478, -2.503794480755265, -0.4172990801258775),
    (0.0, -1.3333333333333333, 5.555555555555555, -5.0, -2.3333333333333335, 3.111111111111111),
)

DOPRI8 = ButcherTableau(
    name="dopri8",
    c=_D8_C,
    a=_D8_A,
    b=_D8_B,
    b_err=_D8_ERR5,
    order=8,
    embedded_order=5,
    b_err_low=_D8_ERR3,
    low_order=3,
    dense=_D8_DENSE,
    reference="E. Hairer, S. P. Nørsett and G. Wanner, Solving Ordinary Differential Equations I: "
    "Nonstiff Problems, 2nd ed., Springer, 1993 (method DOP853 of Dormand and Prince, "
    "coefficients of the code dop853.f).",
)
