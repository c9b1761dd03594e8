"""Augmented neural ODEs (ANODE, Dupont et al. 2019): zero-pad the state with extra dimensions."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

__all__ = ["Augment"]


class Augment(nn.Module):
    """Append `dims` zeros to the feature axis of a batched input (ANODE; Dupont et al., NeurIPS 2019).

    A flow cannot cross its own trajectories, so some classes (a ball inside a ring) cannot be
    separated in the input space; extra dimensions, starting at zero, give the flow room.

    **Arguments:**

    - `dims`: number of zero dimensions (channels) to append, `>= 1`.
    - `dim`: the axis to pad: `1` (default) is the features of `[B, D]` and the channels of
      `[B, C, H, W]`; `-1` is the last axis. Not the batch axis 0.

    **Raises:** `TypeError`/`ValueError` for a bad `dims` or `dim`, or an input with too few axes.

    **Example:**

    ```python
    aug = odenet.Augment(dims=3)
    model = nn.Sequential(aug, odenet.ODEBlock(odenet.MLPDynamics(dim=2 + 3)), nn.Linear(5, 2))
    model(torch.randn(16, 2)).shape                # [16, 2]
    aug.strip(aug(torch.randn(16, 2))).shape       # [16, 2]: padding removed
    ```
    """

    def __init__(self, dims: int, dim: int = 1):
        super().__init__()
        if isinstance(dims, bool) or not isinstance(dims, numbers.Integral):
            raise TypeError(f"dims must be a positive integer (the number of zero dimensions to add), got {dims!r}.")
        if dims < 1:
            raise ValueError(f"dims must be >= 1 (the number of zero dimensions to add), got {dims}.")
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"dim must be an integer axis, got {dim!r}.")
        if dim == 0:
            raise ValueError("dim=0 is the batch axis; pad the feature axis instead (dim=1, the default, or dim=-1).")
        self.dims = int(dims)
        self.dim = int(dim)

    def _axis(self, x: Tensor) -> int:
        if not isinstance(x, Tensor):
            raise TypeError(f"Augment needs a torch.Tensor, got {type(x).__name__}.")
        if x.dim() < 2:
            raise ValueError(
                f"Augment needs a batched input [B, features, ...] with at least 2 axes, got shape {tuple(x.shape)}. "
                "Add a batch axis with x.unsqueeze(0)."
            )
        axis = self.dim if self.dim >= 0 else x.dim() + self.dim
        if not 1 <= axis < x.dim():
            raise ValueError(
                f"Augment(dim={self.dim}) does not name a non-batch axis of an input of shape {tuple(x.shape)}."
            )
        return axis

    def forward(self, x: Tensor) -> Tensor:
        """`x` with `dims` zeros appended on axis `dim`."""
        axis = self._axis(x)
        shape = list(x.shape)
        shape[axis] = self.dims
        return torch.cat([x, x.new_zeros(shape)], dim=axis)

    def strip(self, x: Tensor) -> Tensor:
        """A view of `x` without the last `dims` entries of axis `dim`: what `forward` added."""
        axis = self._axis(x)
        n = x.shape[axis] - self.dims
        if n < 1:
            raise ValueError(
                f"Cannot strip {self.dims} augmented dimensions from axis {axis} of size {x.shape[axis]} "
                f"(shape {tuple(x.shape)}); was this tensor produced by this Augment?"
            )
        return x.narrow(axis, 0, n)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, dim={self.dim}"
