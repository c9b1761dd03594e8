"""One architecture, run discrete or continuous: `stem -> residual part -> head`.

A `ResidualSpec` says how the residual part is computed (an untied ResNet, weight-tied
`ResBlock`s, or one `ODEBlock` under any solver and gradient method); `build_model` picks stem,
dynamics and head from the input's shape, so only the residual part differs between runs.
`PRESETS` holds the runs of Chen et al. 2018's Table 1 comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from odenet import ConvDynamics, MLPDynamics, ODEBlock, ResBlock, SolveStats

__all__ = [
    "check_solver_settings",
    "ResidualSpec",
    "PRESETS",
    "Conv1dDynamics",
    "StackedDynamics",
    "ContinuousDepthNet",
    "residual_stats",
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
    """Convolutional `f(t, x)` for sequence states `[B, C, L]` (the 1-D `odenet.ConvDynamics`):
    `norm -> ReLU -> conv(t) -> norm -> ReLU -> conv(t) -> norm`, GroupNorm, `t` as an extra channel.
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
        """`dx/dt` for a `[B, channels, L]` state."""
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"Conv1dDynamics(channels={self.channels}) needs a [B, {self.channels}, L] state, got shape {tuple(x.shape)}.")
        h = self.conv1(t, self.act(self.norm1(x)))
        h = self.conv2(t, self.act(self.norm2(h)))
        return self.norm3(h)


class StackedDynamics(nn.Module):
    """The field of an untied ResNet: `fs[i](t, x)` on the i-th of `len(fs)` equal slices of `[t0, t1]`.

    Under Euler with `len(fs)` steps it is the ResNet itself (bit for bit in float32); any other
    solver re-reads the trained ResNet as an ODE, which is how it is cross-evaluated.
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
        """The slice `t` falls in (boundaries go to the later slice, with a 1e-4 slack for float32 grid times)."""
        n = len(self.fs)
        u = (t - self.t0) / (self.t1 - self.t0) * n
        return min(n - 1, max(0, math.floor(u + 1e-4)))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """`fs[index(t)](t, x)`."""
        return self.fs[self.index(float(t))](t, x)


# ---------------------------------------------------------------------------- spec


def check_solver_settings(solver: str, **settings) -> bool:
    """Validate solver settings as `ODEBlock` would (a bad name or value raises `ValueError`/`TypeError`);
    return whether the solver is adaptive."""
    from odenet.options import options_from

    return options_from(solver, **settings).adaptive


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


@dataclass(frozen=True)
class ResidualSpec:
    """How the residual part is computed: solver, steps or tolerances, gradient method, tied or one `f`
    per step (`tied=False`: the classical ResNet, Euler only). Validated on construction.
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
        adaptive = check_solver_settings(self.solver, **self.block_kwargs())
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
        if adaptive is False and self.steps is None:
            raise ValueError(f"Fixed-step solver {self.solver!r} needs steps=N (the number of steps), got none.")

    @property
    def adaptive(self) -> bool:
        """Whether `solver` is adaptive (step-size controlled)."""
        return check_solver_settings(self.solver)

    def block_kwargs(self) -> Dict[str, Any]:
        """`ODEBlock` keywords: `gradient` and every field that is set (all but `solver` and `tied`)."""
        kw: Dict[str, Any] = {"gradient": self.gradient}
        for name in ("steps", "rtol", "atol", "adjoint_rtol", "adjoint_atol", "max_steps"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        if self.adjoint_seminorm:
            kw["adjoint_seminorm"] = True
        return kw

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (for JSON)."""
        return asdict(self)

    def describe(self) -> str:
        """A short summary for tables, e.g. `dopri5 rtol=0.001 atol=0.001, adjoint` or `euler x6 untied, direct`."""
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
        """The names of the fields, in declaration order."""
        return tuple(f.name for f in fields(cls))

    def replace(self, **changes) -> "ResidualSpec":
        """A copy with some fields changed (validated again)."""
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
    """`head(residual(stem(x)))`, the residual part built from `spec`: `ResBlock`s (Euler, direct) or one `ODEBlock`."""

    def __init__(self, stem: nn.Module, head: nn.Module, make_f, spec: ResidualSpec):
        super().__init__()
        if not isinstance(spec, ResidualSpec):
            raise TypeError(f"spec must be a ResidualSpec, got {type(spec).__name__}.")
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
        """The logits `head(residual(stem(x)))`."""
        return self.head(self.residual(self.stem(x)))

    def dynamics(self) -> nn.Module:
        """The residual part's vector field (not a copy): the one `f`, or a `StackedDynamics` of an untied stack."""
        if isinstance(self.residual, ODEBlock):
            return self.residual.f
        fs = [block.f for block in self.residual]
        if all(f is fs[0] for f in fs):
            return fs[0]
        return StackedDynamics(fs)

    def with_solver(self, solver: str, **block_kwargs) -> nn.Module:
        """`nn.Sequential(stem, ODEBlock(self.dynamics(), solver, **block_kwargs), head)`: the same
        parameters run under another solver.
        """
        return nn.Sequential(self.stem, ODEBlock(self.dynamics(), solver, **block_kwargs), self.head)

    def solve_stats(self) -> SolveStats:
        """Cost of the last forward (and backward) of the residual part; see `residual_stats`."""
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
    """Number of distinct trainable parameters (shared modules counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _default_width(input_shape: Tuple[int, ...]) -> int:
    return {1: 32, 2: 32, 3: 32}[len(input_shape)]


def build_model(
    input_shape: Sequence[int],
    num_classes: int,
    spec: ResidualSpec,
    width: Optional[int] = None,
) -> ContinuousDepthNet:
    """The shared architecture for inputs of `input_shape`, with the residual part from `spec`.

    Vectors `(d,)`: linear stem, `MLPDynamics`, linear head; sequences `(C, L)`: stride-2 `Conv1d`
    stem, `Conv1dDynamics`, GroupNorm-ReLU-linear head; images `(C, H, W)`: conv stem (stride 4 from
    16x16 up), `ConvDynamics`, pooled linear head. `width` defaults to 32.
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
