"""Ready-made dynamics `f(t, x)` for vectors and images."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["MLPDynamics", "ConvDynamics", "PreActBasicDynamics", "PreActBottleneckDynamics"]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU, "silu": nn.SiLU}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}.") from None


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


class MLPDynamics(nn.Module):
    """A multilayer perceptron `f(t, x)` for states of shape `[..., dim]`.

    **Arguments:**

    - `dim`: state dimension (last axis of `x`).
    - `hidden`, `layers`: width and number of the hidden layers.
    - `activation`: `"tanh"`, `"relu"`, `"softplus"`, `"elu"` or `"silu"`.
    - `time_dependent`: append `t` to the input of every linear layer.

    **Raises:** `ValueError` for a `dim`, `hidden` or `layers` that is not a positive integer, or
    an unknown `activation`.

    **Example:**

    ```python
    f = odenet.MLPDynamics(dim=2, hidden=64)
    dxdt = f(torch.tensor(0.0), torch.randn(10, 2))  # shape [10, 2]
    ```
    """

    def __init__(self, dim: int, hidden: int = 64, layers: int = 2, activation: str = "tanh", time_dependent: bool = True):
        super().__init__()
        self.dim = _check_int("dim", dim)
        hidden = _check_int("hidden", hidden)
        layers = _check_int("layers", layers)
        self.time_dependent = bool(time_dependent)
        extra = 1 if self.time_dependent else 0
        widths = [dim] + [hidden] * layers + [dim]
        self.linears = nn.ModuleList(nn.Linear(a + extra, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = _activation(activation)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """`dx/dt` at time `t` (a 0-dim tensor) for a state `x` of shape `[..., dim]`."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"MLPDynamics(dim={self.dim}) got a state whose last axis is {x.shape[-1]} (shape {tuple(x.shape)}).")
        tt = t.to(x.dtype).expand(*x.shape[:-1], 1) if self.time_dependent else None
        h = x
        for i, lin in enumerate(self.linears):
            if tt is not None:
                h = torch.cat([h, tt], dim=-1)
            h = lin(h)
            if i < len(self.linears) - 1:
                h = self.act(h)
        return h


class _ConcatConv2d(nn.Module):
    """3x3 convolution with `t` appended as a constant input channel."""

    def __init__(self, c_in: int, c_out: int, time_dependent: bool):
        super().__init__()
        self.time_dependent = time_dependent
        self.conv = nn.Conv2d(c_in + (1 if time_dependent else 0), c_out, kernel_size=3, padding=1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        if self.time_dependent:
            tt = t.to(x.dtype).expand(x.shape[0], 1, x.shape[2], x.shape[3])
            x = torch.cat([x, tt], dim=1)
        return self.conv(x)


def _default_groups(channels: int, hidden: int, limit: int = 32) -> int:
    """The largest GroupNorm group count `<= limit` dividing both `channels` and `hidden`.

    It is `min(limit, channels, hidden)` whenever that divides both, the default of earlier versions."""
    common = math.gcd(channels, hidden)
    return max(g for g in range(1, min(limit, common) + 1) if common % g == 0)


class ConvDynamics(nn.Module):
    """Convolutional `f(t, x)` for image states `[B, C, H, W]` (the ODE-Net block of Chen et al. 2018).

    `norm → ReLU → conv → norm → ReLU → conv → norm`: GroupNorm, and 3x3 convolutions that see `t`
    as an extra channel.

    **Arguments:**

    - `channels`: number of channels `C` of the state.
    - `hidden`: channels between the two convolutions (default `channels`).
    - `groups`: GroupNorm groups, dividing `channels` and `hidden` (default: the largest such
      number up to 32).
    - `time_dependent`: feed `t` to the convolutions.

    **Raises:** `ValueError` for a `channels`, `hidden` or `groups` that is not a positive integer,
    or a `groups` that does not divide `channels` and `hidden`.

    **Example:**

    ```python
    f = odenet.ConvDynamics(channels=16)
    dxdt = f(torch.tensor(0.0), torch.randn(2, 16, 8, 8))
    ```
    """

    def __init__(self, channels: int, hidden: Optional[int] = None, groups: Optional[int] = None, time_dependent: bool = True):
        super().__init__()
        self.channels = _check_int("channels", channels)
        hidden = _check_int("hidden", hidden if hidden is not None else channels)
        groups = groups if groups is not None else _default_groups(channels, hidden)
        _check_int("groups", groups)
        for c in (channels, hidden):
            if c % groups:
                raise ValueError(f"groups={groups} must divide the channel counts (channels={channels}, hidden={hidden}).")
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = _ConcatConv2d(channels, hidden, time_dependent)
        self.norm2 = nn.GroupNorm(groups, hidden)
        self.conv2 = _ConcatConv2d(hidden, channels, time_dependent)
        self.norm3 = nn.GroupNorm(groups, channels)
        self.act = nn.ReLU()

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """`dx/dt` at time `t` (a 0-dim tensor) for a state `x` of shape `[B, channels, H, W]`."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"ConvDynamics(channels={self.channels}) needs a [B, {self.channels}, H, W] state, got shape {tuple(x.shape)}.")
        h = self.conv1(t, self.act(self.norm1(x)))
        h = self.conv2(t, self.act(self.norm2(h)))
        return self.norm3(h)


# ---------------------------------------------------------------------------- pre-activation ResNet blocks

_NORMS = ("batch", "group")


class _TimeConv2d(nn.Module):
    """A bias-free same-size convolution (1x1 or 3x3), with `t` as an extra constant channel when `time_dependent`."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, time_dependent: bool):
        super().__init__()
        self.time_dependent = time_dependent
        self.conv = nn.Conv2d(c_in + int(time_dependent), c_out, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        if self.time_dependent:
            x = torch.cat([x, t.to(x.dtype).expand(x.shape[0], 1, x.shape[2], x.shape[3])], dim=1)
        return self.conv(x)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def _norm_layers(norm: str, groups: Optional[int], widths) -> list:
    """One normalisation layer per entry of `widths`: BatchNorm, or GroupNorm with `groups` dividing them all."""
    if norm not in _NORMS:
        raise ValueError(f"Unknown norm {norm!r}; choose 'batch' (BatchNorm, as He et al.) or 'group' (GroupNorm).")
    if norm == "batch":
        if groups is not None:
            raise ValueError(f"groups={groups!r} applies to norm='group' only; leave it out with norm='batch'.")
        return [nn.BatchNorm2d(c) for c in widths]
    common = 0
    for c in widths:
        common = math.gcd(common, c)
    groups = _check_int("groups", groups if groups is not None else _default_groups(common, common))
    if any(c % groups for c in widths):
        raise ValueError(f"groups={groups} must divide the channel counts {sorted(set(widths))}.")
    return [nn.GroupNorm(groups, c) for c in widths]


class _PreActDynamics(nn.Module):
    """`norm -> ReLU -> conv`, once per convolution (`widths[i] -> widths[i + 1]`, `kernels[i]`)."""

    def __init__(self, widths, kernels, norm: str, groups: Optional[int], time_dependent: bool, zero_init: bool,
                 activation: str):
        super().__init__()
        self.channels = widths[0]
        self.time_dependent = _check_flag("time_dependent", time_dependent)
        self.norms = nn.ModuleList(_norm_layers(norm, groups, widths[:-1]))
        self.convs = nn.ModuleList(
            _TimeConv2d(a, b, k, self.time_dependent) for a, b, k in zip(widths[:-1], widths[1:], kernels)
        )
        self.act = _activation(activation)
        if _check_flag("zero_init", zero_init):
            nn.init.zeros_(self.convs[-1].conv.weight)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """`dx/dt` at time `t` (a 0-dim tensor) for a state `x` of shape `[B, channels, H, W]`."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__}(channels={self.channels}) needs a [B, {self.channels}, H, W] state, "
                f"got shape {tuple(x.shape)}."
            )
        h = x
        for norm, conv in zip(self.norms, self.convs):
            h = conv(t, self.act(norm(h)))
        return h


class PreActBasicDynamics(_PreActDynamics):
    """The residual branch of a pre-activation basic block (He et al. 2016, "Identity mappings in
    deep residual networks") as `f(t, x)`: `norm → ReLU → conv3x3 → norm → ReLU → conv3x3`.

    `ResBlock(f)` is then the ResNet-v2 basic block with an identity shortcut, exactly.
    BatchNorm is the paper's; inside a solve its running statistics are updated by the first
    evaluation only and, in eval mode, normalise every depth alike. GroupNorm normalises each
    sample by itself: the same function in training and evaluation, under any solver.

    **Arguments:**

    - `channels`: channels `C` of the state `[B, C, H, W]`.
    - `hidden`: channels between the two convolutions (default `channels`).
    - `norm`: `"batch"` (default) or `"group"`.
    - `groups`: GroupNorm groups, dividing `channels` and `hidden` (default: the largest such
      number up to 32); only with `norm="group"`.
    - `time_dependent`: feed `t` to each convolution as an extra channel (default `False`, as
      in the paper).
    - `zero_init`: zero the last convolution, so that `f = 0` and the block starts as the identity.
    - `activation`: `"relu"` (default, the paper's) or a smooth one (`"softplus"`, `"elu"`,
      `"silu"`, `"tanh"`): ReLU's kinks make tight adaptive solves and adjoint gradients costly.

    **Raises:** `ValueError` for a `channels`, `hidden` or `groups` that is not a positive
    integer, a `groups` that does not divide the channel counts or given with `norm="batch"`,
    or an unknown `norm` or `activation`; `TypeError` for a `time_dependent` or `zero_init`
    that is not a bool.

    **Example:**

    ```python
    f = odenet.PreActBasicDynamics(channels=16, norm="group")
    block = odenet.ODEBlock(f, solver="dopri5", rtol=1e-3, atol=1e-3)
    y = block(torch.randn(2, 16, 8, 8))  # shape [2, 16, 8, 8]
    ```
    """

    def __init__(self, channels: int, hidden: Optional[int] = None, norm: str = "batch", groups: Optional[int] = None,
                 time_dependent: bool = False, zero_init: bool = False, activation: str = "relu"):
        channels = _check_int("channels", channels)
        hidden = _check_int("hidden", hidden if hidden is not None else channels)
        super().__init__((channels, hidden, channels), (3, 3), norm, groups, time_dependent, zero_init, activation)


class PreActBottleneckDynamics(_PreActDynamics):
    """The residual branch of a pre-activation bottleneck block (He et al. 2016, "Identity
    mappings in deep residual networks") as `f(t, x)`:
    `norm → ReLU → conv1x1 → norm → ReLU → conv3x3 → norm → ReLU → conv1x1`.

    `ResBlock(f)` is then the ResNet-v2 bottleneck block with an identity shortcut, exactly.

    **Arguments:**

    - `channels`: channels `C` of the state `[B, C, H, W]` (the block's output width).
    - `width`: the bottleneck width, channels of the 3x3 convolution (default `channels // 4`,
      at least 1: the papers' expansion of 4).
    - `norm`, `groups`, `time_dependent`, `zero_init`, `activation`: as in `PreActBasicDynamics`
      (`groups` dividing `channels` and `width`).

    **Raises:** as `PreActBasicDynamics`, for `width` in place of `hidden`.

    **Example:**

    ```python
    f = odenet.PreActBottleneckDynamics(channels=64, width=16, zero_init=True)
    y = odenet.ResBlock(f)(torch.randn(2, 64, 4, 4))  # the identity at initialisation
    ```
    """

    def __init__(self, channels: int, width: Optional[int] = None, norm: str = "batch", groups: Optional[int] = None,
                 time_dependent: bool = False, zero_init: bool = False, activation: str = "relu"):
        channels = _check_int("channels", channels)
        width = _check_int("width", width if width is not None else max(1, channels // 4))
        super().__init__((channels, width, width, channels), (1, 3, 1), norm, groups, time_dependent, zero_init,
                         activation)
