"""One architecture, run discrete or continuous: `stem -> residual part -> head`.

The residual part is where the runs differ. A `ResidualSpec` says how it is computed:

- `ResidualSpec("euler", steps=6, tied=False)`: six `ResBlock`s, each with its own `f`
  (the classical ResNet);
- `ResidualSpec("euler", steps=6)`: six `ResBlock`s sharing one `f` (bit for bit
  `ODEBlock(f, solver="euler", steps=6)` in float32);
- `ResidualSpec("rk4", steps=2)`, `ResidualSpec("dopri5", rtol=1e-3, atol=1e-3, gradient="adjoint")`:
  one `ODEBlock` around one `f`.

`build_model(input_shape, num_classes, spec)` picks the stem, dynamics and head from the
input's shape (a vector, a 1-D sequence `[C, L]` or an image `[C, H, W]`), so every spec
gets the same stem and head and only the residual part changes. `PRESETS` holds the runs
of Chen et al. 2018's Table 1 comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .blocks import ODEBlock, ResBlock
from .dynamics import ConvDynamics, MLPDynamics
from .odeint import make_options
from .solvers.stats import SolveStats

__all__ = [
    "ResidualSpec",
    "PRESETS",
    "Conv1dDynamics",
    "StackedDynamics",
    "ContinuousDepthNet",
    "build_model",
    "count_parameters",
]


# ---------------------------------------------------------------------------- dynamics


class _ConcatConv1d(nn.Module):
    """1-D convolution with `t` appended as a constant input channel."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, time_dependent: bool):
        super().__init__()
        self.time_dependent = time_dependent
        self.conv = nn.Conv1d(c_in + (1 if time_dependent else 0), c_out, kernel_size, padding=kernel_size // 2)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        if self.time_dependent:
            x = torch.cat([x, t.to(x.dtype).expand(x.shape[0], 1, x.shape[2])], dim=1)
        return self.conv(x)


class Conv1dDynamics(nn.Module):
    """Convolutional `f(t, x)` for sequence states `[B, C, L]`, the 1-D analogue of `odenet.ConvDynamics`.

    `norm -> ReLU -> conv(t) -> norm -> ReLU -> conv(t) -> norm`, with odd-sized
    convolutions that keep the length and see `t` as an extra channel, and GroupNorm.

    **Arguments:**

    - `channels`: number of channels `C` of the state.
    - `hidden`: channels between the two convolutions (default `channels`).
    - `kernel_size`: odd kernel size (default 3).
    - `groups`: GroupNorm groups (default `gcd(8, channels, hidden)`; must divide the channel counts).
    - `time_dependent`: feed `t` to the convolutions (default `True`).

    **Raises:** `ValueError` for non-positive sizes, an even kernel, or groups that do not
    divide the channel counts.

    **Example:**

    ```python
    f = odenet.models.Conv1dDynamics(channels=16)
    dxdt = f(torch.tensor(0.0), torch.randn(4, 16, 20))
    ```
    """

    def __init__(
        self,
        channels: int,
        hidden: Optional[int] = None,
        kernel_size: int = 3,
        groups: Optional[int] = None,
        time_dependent: bool = True,
    ):
        super().__init__()
        self.channels = _check_int("channels", channels)
        hidden = _check_int("hidden", hidden if hidden is not None else channels)
        kernel_size = _check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so that the length is kept, got {kernel_size}.")
        groups = _check_int("groups", groups if groups is not None else math.gcd(8, math.gcd(channels, hidden)))
        for c in (channels, hidden):
            if c % groups:
                raise ValueError(f"groups={groups} must divide the channel counts (channels={channels}, hidden={hidden}).")
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = _ConcatConv1d(channels, hidden, kernel_size, time_dependent)
        self.norm2 = nn.GroupNorm(groups, hidden)
        self.conv2 = _ConcatConv1d(hidden, channels, kernel_size, time_dependent)
        self.norm3 = nn.GroupNorm(groups, channels)
        self.act = nn.ReLU()

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Evaluate the vector field.

        **Arguments:**

        - `t`: the time, a scalar tensor (an extra input channel when `time_dependent`).
        - `x`: the state, `[B, channels, L]`.

        **Returns:** `dx/dt`, a tensor of the shape of `x`.

        **Raises:** `ValueError` when `x` is not a `[B, channels, L]` tensor.
        """
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"Conv1dDynamics(channels={self.channels}) needs a [B, {self.channels}, L] state, got shape {tuple(x.shape)}.")
        h = self.conv1(t, self.act(self.norm1(x)))
        h = self.conv2(t, self.act(self.norm2(h)))
        return self.norm3(h)


class StackedDynamics(nn.Module):
    """The vector field of an untied ResNet: `f(t, x) = fs[i](t, x)` on the i-th of `n` equal
    slices of `[t0, t1]`.

    `ODEBlock(StackedDynamics(fs), solver="euler", steps=len(fs))` computes what the stack
    `ResBlock(fs[i], h=(t1 - t0)/n, t=t0 + i (t1 - t0)/n)` computes (bit for bit in float32;
    see `odenet.ResBlock` for float64's last bit); any other solver
    or step count re-reads the trained ResNet as an ODE with a piecewise-in-time field,
    which is how a classical ResNet is cross-evaluated.

    **Arguments:**

    - `fs`: the dynamics modules, one per slice (at least one).
    - `t0`, `t1`: the interval the slices divide (default 0 to 1).

    **Raises:** `ValueError` for an empty `fs`, or `t0 == t1`.

    **Example:**

    ```python
    fs = [odenet.MLPDynamics(dim=2, hidden=8) for _ in range(3)]
    f = odenet.models.StackedDynamics(fs)
    assert [f.index(t) for t in (0.0, 0.5, 0.99)] == [0, 1, 2]
    block = odenet.ODEBlock(f, solver="euler", steps=3)  # the untied 3-block ResNet
    y = block(torch.randn(4, 2))
    ```
    """

    def __init__(self, fs: Sequence[nn.Module], t0: float = 0.0, t1: float = 1.0):
        super().__init__()
        fs = list(fs)
        if not fs:
            raise ValueError("StackedDynamics needs at least one dynamics module, got none.")
        if t0 == t1:
            raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {t0}.")
        self.fs = nn.ModuleList(fs)
        self.t0, self.t1 = float(t0), float(t1)

    def index(self, t: float) -> int:
        """The slice `t` falls in; slice boundaries belong to the later slice (so Euler on the
        ResNet's own grid evaluates `fs[i]` at `t_i`). A relative tolerance of 1e-4 of a slice
        absorbs float32 rounding of the grid times.

        **Arguments:**

        - `t`: a time in `[t0, t1]` (times outside are clamped to the first or last slice).

        **Returns:** the slice index, an `int` in `0 .. len(fs) - 1`.
        """
        n = len(self.fs)
        u = (t - self.t0) / (self.t1 - self.t0) * n
        return min(n - 1, max(0, math.floor(u + 1e-4)))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Evaluate `fs[index(t)](t, x)`.

        **Arguments:**

        - `t`: the time, a scalar tensor.
        - `x`: the state.

        **Returns:** `dx/dt` from the dynamics module of the slice `t` falls in.
        """
        return self.fs[self.index(float(t))](t, x)


# ---------------------------------------------------------------------------- spec


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


@dataclass(frozen=True)
class ResidualSpec:
    """How the residual part of the model is computed.

    **Fields:**

    - `solver`: a name from `odenet.SOLVERS` (default `"dopri5"`).
    - `steps`: number of steps of a fixed-step solver (e.g. 6 for a 6-block ResNet).
    - `rtol`, `atol`: tolerances of an adaptive solver (default 1e-3 each, as `ODEBlock`).
    - `gradient`: `"direct"`, `"adjoint"` or `"checkpoint"`.
    - `tied`: `True` (default): one `f` shared by every step. `False`: one `f` per step,
      the classical ResNet; needs `solver="euler"` and `steps`.
    - `adjoint_rtol`, `adjoint_atol`, `adjoint_seminorm`: adjoint settings (see `odenet.odeint`).
    - `max_steps`: step limit of an adaptive solver.

    Construction validates the combination (through `odenet.odeint.make_options`), so a
    bad spec fails before any training.

    **Raises:** `ValueError`/`TypeError` naming the offending value and the fix.

    **Example:**

    ```python
    spec = odenet.models.ResidualSpec("rk4", steps=2)
    assert spec.describe() == "rk4 x2, direct" and not spec.adaptive
    assert spec.block_kwargs() == {"gradient": "direct", "steps": 2}
    ode = spec.replace(solver="dopri5", steps=None, gradient="adjoint")
    assert ode.as_dict()["gradient"] == "adjoint" and "tied" in spec.field_names()
    ```
    """

    solver: str = "dopri5"
    steps: Optional[int] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    gradient: str = "direct"
    tied: bool = True
    adjoint_rtol: Optional[float] = None
    adjoint_atol: Optional[float] = None
    adjoint_seminorm: bool = False
    max_steps: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.solver, str):
            raise TypeError(f"solver must be a solver name (a string), got {type(self.solver).__name__}.")
        if not isinstance(self.tied, bool):
            raise TypeError(f"tied must be True or False, got {self.tied!r}.")
        opts = make_options(self.solver, **self.block_kwargs())
        if not self.tied:
            if self.solver != "euler" or self.steps is None:
                raise ValueError(
                    f"tied=False (one f per step, a classical ResNet) needs solver='euler' and steps=N, got "
                    f"solver={self.solver!r}, steps={self.steps!r}."
                )
            if self.gradient != "direct":
                raise ValueError(
                    f"tied=False builds ResBlocks, which backpropagate directly; got gradient={self.gradient!r}. "
                    "Use gradient='direct' or tied=True."
                )
        if opts.adaptive is False and self.steps is None:
            raise ValueError(f"Fixed-step solver {self.solver!r} needs steps=N (the number of steps), got none.")

    @property
    def adaptive(self) -> bool:
        """Whether `solver` is an adaptive (step-size controlled) solver."""
        return make_options(self.solver).adaptive

    def block_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for `ODEBlock` (everything but `solver` and `tied`).

        **Returns:** a dict with `gradient` and every field that is set (not `None`, and
        `adjoint_seminorm` only when `True`).
        """
        kw: Dict[str, Any] = {"gradient": self.gradient}
        for name in ("steps", "rtol", "atol", "adjoint_rtol", "adjoint_atol", "max_steps"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        if self.adjoint_seminorm:
            kw["adjoint_seminorm"] = True
        return kw

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (for JSON).

        **Returns:** a dict from field name to value.
        """
        return asdict(self)

    def describe(self) -> str:
        """A short human-readable summary, e.g. `dopri5 rtol=0.001 atol=0.001, adjoint`.

        **Returns:** the summary, a string: the solver with its tolerances (adaptive) or
        step count (fixed-step), `untied` when so, and the gradient method.
        """
        if self.adaptive:
            rtol = 1e-3 if self.rtol is None else self.rtol
            atol = 1e-3 if self.atol is None else self.atol
            how = f"{self.solver} rtol={rtol:g} atol={atol:g}"
        else:
            how = f"{self.solver} x{self.steps}"
        if not self.tied:
            how += " untied"
        return f"{how}, {self.gradient}"

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """The names of the fields, in declaration order.

        **Returns:** a tuple of strings, `("solver", "steps", ...)`.
        """
        return tuple(f.name for f in fields(cls))

    def replace(self, **changes) -> "ResidualSpec":
        """A copy with some fields changed (validated again).

        **Arguments:**

        - `changes`: new values of fields, by name (e.g. `solver="rk4", steps=4`).

        **Returns:** a new `ResidualSpec`.

        **Raises:** `ValueError`/`TypeError` when the changed spec is invalid (as on
        construction), or for a name that is not a field.
        """
        return replace(self, **changes)


#: The runs of the Chen et al. 2018 Table 1 comparison, by name.
PRESETS: Dict[str, ResidualSpec] = {
    "resnet": ResidualSpec("euler", steps=6, tied=False),
    "resnet-tied": ResidualSpec("euler", steps=6),
    "rk-net": ResidualSpec("rk4", steps=2, gradient="direct"),
    "ode-net": ResidualSpec("dopri5", rtol=1e-3, atol=1e-3, gradient="adjoint"),
    "ode-net-direct": ResidualSpec("dopri5", rtol=1e-3, atol=1e-3, gradient="direct"),
    "ode-net-checkpoint": ResidualSpec("dopri5", rtol=1e-3, atol=1e-3, gradient="checkpoint"),
}


# ---------------------------------------------------------------------------- model


class ContinuousDepthNet(nn.Module):
    """`head(residual(stem(x)))`, with the residual part built from a `ResidualSpec`.

    **Arguments:**

    - `stem`, `head`: modules before and after the residual part.
    - `make_f`: a zero-argument callable returning a fresh dynamics module `f(t, x)`.
    - `spec`: the `ResidualSpec` of the residual part.

    **Attributes:** `stem`, `residual` (an `nn.Sequential` of `ResBlock`s or one
    `ODEBlock`), `head`, `spec`.

    **Raises:** `TypeError` when `spec` is not a `ResidualSpec`.

    **Example:**

    ```python
    spec = odenet.models.ResidualSpec("euler", steps=3)
    model = odenet.models.ContinuousDepthNet(
        stem=nn.Linear(2, 8), head=nn.Linear(8, 2),
        make_f=lambda: odenet.MLPDynamics(dim=8, hidden=16), spec=spec,
    )
    logits = model(torch.randn(4, 2))  # [4, 2]
    assert model.solve_stats().nfe_forward == 3  # one evaluation per ResBlock
    rk4 = model.with_solver("rk4", steps=2)  # the same parameters, another solver
    assert rk4(torch.randn(4, 2)).shape == (4, 2) and rk4[1].f is model.dynamics()
    ```
    """

    def __init__(self, stem: nn.Module, head: nn.Module, make_f, spec: ResidualSpec):
        super().__init__()
        if not isinstance(spec, ResidualSpec):
            raise TypeError(f"spec must be an odenet.models.ResidualSpec, got {type(spec).__name__}.")
        self.spec = spec
        self.stem = stem
        if spec.solver == "euler" and spec.steps is not None and spec.gradient == "direct" and set(spec.block_kwargs()) == {"gradient", "steps"}:
            # Literal residual blocks: h = 1/N, block i evaluated at t = i/N.
            n = spec.steps
            if spec.tied:
                f = make_f()
                blocks = [ResBlock(f, h=1.0 / n, t=i / n) for i in range(n)]
            else:
                blocks = [ResBlock(make_f(), h=1.0 / n, t=i / n) for i in range(n)]
            self.residual: nn.Module = nn.Sequential(*blocks)
        else:
            self.residual = ODEBlock(make_f(), spec.solver, **spec.block_kwargs())
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        """Run `head(residual(stem(x)))`.

        **Arguments:**

        - `x`: a batch of inputs, `[B, *input_shape]`.

        **Returns:** the logits, `[B, num_classes]`.
        """
        return self.head(self.residual(self.stem(x)))

    def dynamics(self) -> nn.Module:
        """The vector field of the residual part: the one `f` (tied), or a `StackedDynamics`
        of the per-block `f`s (untied).

        **Returns:** an `nn.Module` `f(t, x)` holding this model's parameters (not a copy).
        """
        if isinstance(self.residual, ODEBlock):
            return self.residual.f
        fs = [block.f for block in self.residual]
        if all(f is fs[0] for f in fs):
            return fs[0]
        return StackedDynamics(fs)

    def with_solver(self, solver: str, **block_kwargs) -> nn.Module:
        """A model sharing this one's stem, dynamics and head (the same parameters), with the
        residual part run as `ODEBlock(self.dynamics(), solver, **block_kwargs)` on [0, 1].

        **Arguments:**

        - `solver`: a name from `odenet.SOLVERS`.
        - `block_kwargs`: further keyword arguments of `ODEBlock`, e.g. `steps=4` or
          `rtol=1e-5, atol=1e-5`.

        **Returns:** an `nn.Sequential(stem, ODEBlock, head)`; its block is at index 1.
        """
        return nn.Sequential(self.stem, ODEBlock(self.dynamics(), solver, **block_kwargs), self.head)

    def solve_stats(self) -> SolveStats:
        """Cost of the last forward (and backward, once it ran) of the residual part.

        For an `ODEBlock`, its `last_stats`; for a stack of `ResBlock`s, one evaluation and
        one accepted step per block (their backward replays the graph: no evaluations).

        **Returns:** a `odenet.SolveStats`.
        """
        return residual_stats(self.residual)


def residual_stats(module: nn.Module) -> SolveStats:
    """Sum the solve statistics of every `ODEBlock` and `ResBlock` in `module`'s last forward
    (a `ResBlock` counts one evaluation and one accepted step)."""
    total = SolveStats()
    blocks = [module] if isinstance(module, (ODEBlock, ResBlock)) else list(module.modules())
    for block in blocks:
        if isinstance(block, ResBlock):
            total.nfe_forward += 1
            total.n_accepted += 1
        elif isinstance(block, ODEBlock) and block.last_stats is not None:
            s = block.last_stats
            total.nfe_forward += s.nfe_forward
            total.nfe_backward += s.nfe_backward
            total.n_accepted += s.n_accepted or 0
            total.n_rejected += s.n_rejected or 0
            total.n_accepted_backward += s.n_accepted_backward
            total.n_rejected_backward += s.n_rejected_backward
    return total


def count_parameters(model: nn.Module) -> int:
    """Number of distinct trainable parameters (shared modules counted once).

    **Arguments:**

    - `model`: the module.

    **Returns:** the number of elements of its parameters with `requires_grad`, an `int`.

    **Example:**

    ```python
    assert odenet.models.count_parameters(nn.Linear(3, 2)) == 8
    ```
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _default_width(input_shape: Tuple[int, ...]) -> int:
    return {1: 32, 2: 32, 3: 32}[len(input_shape)]


def build_model(
    input_shape: Sequence[int],
    num_classes: int,
    spec: ResidualSpec,
    width: Optional[int] = None,
) -> ContinuousDepthNet:
    """The shared architecture for inputs of `input_shape`, with the residual part given by `spec`.

    - vectors `(d,)`: `Linear(d, width)` -> `MLPDynamics(width, hidden=2*width)` -> `Linear(width, classes)`;
    - sequences `(C, L)`: `Conv1d(C, width, 5, stride 2)` -> `Conv1dDynamics(width)` on length
      `ceil(L/2)` -> `GroupNorm, ReLU, flatten, Linear`;
    - images `(C, H, W)`: `Conv2d(C, width, 3)` (plus two stride-2 convolutions when
      `H, W >= 16`, 28x28 -> 7x7 as in Chen et al. 2018) -> `odenet.ConvDynamics(width)`
      -> `GroupNorm, ReLU, average pool to at most 4x4, flatten, Linear`.

    The stem and head are small next to one `f`, so a one-`f` model (ODE-Net) has at most
    a third of the parameters of the six-`f` ResNet.

    **Arguments:**

    - `input_shape`: shape of one input (without the batch axis).
    - `num_classes`: number of output classes.
    - `spec`: the `ResidualSpec` of the residual part.
    - `width`: channels (or features) of the residual state (default 32; a multiple of 8
      for the convolutional models).

    **Returns:** a `ContinuousDepthNet`.

    **Raises:** `ValueError` for an input shape of another rank, or bad sizes.

    **Example:**

    ```python
    spec = odenet.models.PRESETS["rk-net"]
    model = odenet.models.build_model((1, 40), num_classes=10, spec=spec, width=8)
    logits = model(torch.randn(2, 1, 40))  # [2, 10]
    ```
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {tuple(input_shape)!r}.")
    num_classes = _check_int("num_classes", num_classes, 2)
    if len(shape) not in (1, 2, 3):
        raise ValueError(
            f"input_shape must be (features,), (channels, length) or (channels, height, width), got {shape}."
        )
    width = _check_int("width", width if width is not None else _default_width(shape))
    groups = math.gcd(8, width)
    if len(shape) == 1:
        stem: nn.Module = nn.Linear(shape[0], width)
        head: nn.Module = nn.Linear(width, num_classes)
        make_f = lambda: MLPDynamics(width, hidden=2 * width, layers=1, activation="softplus")  # noqa: E731
    elif len(shape) == 2:
        c, length = shape
        stem = nn.Conv1d(c, width, kernel_size=5, stride=2, padding=2)
        out_len = (length + 2 * 2 - 5) // 2 + 1
        head = nn.Sequential(nn.GroupNorm(groups, width), nn.ReLU(), nn.Flatten(), nn.Linear(width * out_len, num_classes))
        make_f = lambda: Conv1dDynamics(width, groups=groups)  # noqa: E731
    else:
        c, h, w = shape
        if h >= 16 and w >= 16:
            stem = nn.Sequential(
                nn.Conv2d(c, width, 3, stride=2, padding=1),
                nn.GroupNorm(groups, width),
                nn.ReLU(),
                nn.Conv2d(width, width, 4, stride=2, padding=1),
            )
        else:
            stem = nn.Conv2d(c, width, 3, padding=1)
        with torch.no_grad():
            hw = stem(torch.zeros(1, *shape)).shape[2:]
        pool = (max(1, hw[0] // 4), max(1, hw[1] // 4))
        with torch.no_grad():
            pooled = nn.AvgPool2d(pool)(torch.zeros(1, width, *hw)).shape[2:]
        head = nn.Sequential(
            nn.GroupNorm(groups, width), nn.ReLU(), nn.AvgPool2d(pool), nn.Flatten(),
            nn.Linear(width * pooled[0] * pooled[1], num_classes),
        )
        make_f = lambda: ConvDynamics(width, groups=groups)  # noqa: E731
    return ContinuousDepthNet(stem, head, make_f, spec)
