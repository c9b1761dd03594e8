"""Augmented neural ODEs (ANODE, Dupont et al. 2019): zero-pad the state with extra dimensions."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

__all__ = ["Augment"]


class Augment(nn.Module):
    """Append `dims` zero-valued dimensions to the feature axis of a batched input (ANODE).

    A continuous-depth block is a homeomorphism of its state space, so trajectories cannot
    cross: some classes (e.g. a ball inside a ring) cannot be made linearly separable in the
    input space. Lifting the state into `dims` extra dimensions, initialised at zero, gives the
    flow room to move the classes apart (Dupont, Doucet & Teh, *Augmented Neural ODEs*,
    NeurIPS 2019).

    **Which axis:** axis `1` by default, the feature axis of a batch of vectors `[B, D]`
    (where it is also the last axis) and the channel axis of a batch of images `[B, C, H, W]`
    or sequences `[B, C, L]`. Give `dim=-1` to pad the last axis of inputs with more axes.
    The batch axis (0) cannot be padded.

    **Arguments:**

    - `dims`: number of zero dimensions (channels) to append, an integer `>= 1`.
    - `dim`: the axis to pad (default `1`).

    **Returns** (from `forward(x)`): `x` with its axis `dim` grown from `n` to `n + dims`; the
    first `n` entries are `x`, the rest are zeros of `x`'s dtype and device. Gradients flow to `x`.

    **Raises:** `TypeError`/`ValueError` for a bad `dims` or `dim`, or an input with too few axes.

    **Example:**

    ```python
    f = odenet.MLPDynamics(dim=2 + 3, hidden=32)                 # dynamics on the augmented state
    model = nn.Sequential(odenet.Augment(dims=3), odenet.ODEBlock(f), nn.Linear(5, 2))
    model(torch.randn(16, 2)).shape                               # [16, 2]
    aug = odenet.Augment(dims=3)
    aug.strip(aug(torch.randn(16, 2))).shape                      # [16, 2]: padding removed
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
        """Append `dims` zeros along axis `dim`.

        **Arguments:**

        - `x`: a batched tensor `[B, features, ...]`.

        **Returns:** `x` with `dims` more entries (zeros) on axis `dim`.

        **Raises:** `TypeError` if `x` is not a tensor; `ValueError` if it has fewer than 2
        axes or `dim` is not one of its non-batch axes.
        """
        axis = self._axis(x)
        shape = list(x.shape)
        shape[axis] = self.dims
        return torch.cat([x, x.new_zeros(shape)], dim=axis)

    def strip(self, x: Tensor) -> Tensor:
        """Drop the `dims` augmented entries of axis `dim` again (a view of the first `n` entries).

        **Arguments:**

        - `x`: a tensor this `Augment` produced (or one of the same shape).

        **Returns:** a view of `x` without the last `dims` entries of axis `dim`.

        **Raises:** `TypeError`/`ValueError` as in `forward`; `ValueError` if the axis has no
        more than `dims` entries.
        """
        axis = self._axis(x)
        n = x.shape[axis] - self.dims
        if n < 1:
            raise ValueError(
                f"Cannot strip {self.dims} augmented dimensions from axis {axis} of size {x.shape[axis]} "
                f"(shape {tuple(x.shape)}); was this tensor produced by this Augment?"
            )
        return x.narrow(axis, 0, n)

    def extra_repr(self) -> str:
        """**Returns:** the settings shown by `repr(augment)`, e.g. `"dims=2, dim=1"`."""
        return f"dims={self.dims}, dim={self.dim}"
