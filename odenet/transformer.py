"""A Pre-LN transformer block as a dynamics `f(t, x)`: :class:`TransformerDynamics`.

A field cannot know the solver's step `h`, so `f(t, x)` is the block's update with its residual
sub-steps at unit step, `block(x) - x`: one Euler step of size 1 is the discrete block, and
`f` is its ODE. Read the other way, the
discrete blocks are splitting steps of size 1 of the one ODE `dx/dt = A + M` (sequential:
Lie–Trotter; strang: Strang; parallel: Euler), whose step methods with a step `h` compose the
sub-fields `f.attention` and `f.feedforward` themselves.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dynamics import _check_int

__all__ = ["TransformerDynamics", "COMPOSITIONS"]

#: The values of `composition=`.
COMPOSITIONS = ("sequential", "parallel", "strang")


class _SelfAttention(nn.Module):
    """Multi-head self-attention with nanoGPT's names (`c_attn`, `c_proj`)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)
        self.heads, self.dropout = heads, dropout

    def forward(self, x: Tensor, causal: bool, mask: Optional[Tensor]) -> Tensor:
        B, T, C = x.shape
        q, k, v = (z.view(B, T, self.heads, C // self.heads).transpose(1, 2) for z in self.c_attn(x).split(C, dim=2))
        if mask is not None and causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            causal = False
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class _FeedForward(nn.Module):
    """`dropout(c_proj(gelu(c_fc(x))))`, nanoGPT's MLP."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class TransformerDynamics(nn.Module):
    """A Pre-LN transformer block as a field `f(t, x)` for token states `[batch, tokens, dim]`.

    `f(t, x)` is the block's update at unit step, `block(x) - x`, so `odenet.ResBlock(f)` (and
    each step of `ODEBlock(f, solver="euler", steps=N, t1=N)`) is the discrete block. The
    sub-fields `attention(t, x) = A = attn(ln_1(x))` and `feedforward(t, x) = M = mlp(ln_2(x))`
    are those of the splitting view `dx/dt = A + M`. Parameter names
    are nanoGPT's (`ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`):
    a nanoGPT `Block`'s `state_dict` loads as it is (`strict=False` with `time_dependent`).

    **Arguments:**

    - `dim`: the state's last axis (embedding width).
    - `heads`: attention heads; must divide `dim`.
    - `hidden`: the feed-forward width (default `4 * dim`).
    - `composition`: `"sequential"` (default; GPT-2: `a = A(x)`, `f = a + M(x + a)`),
      `"parallel"` (GPT-J: `f = A(x) + M(x)`) or `"strang"` (Macaron with one shared `M`:
      `m = M(x)/2`, `a = A(x + m)`, `f = m + a + M(x + m + a)/2`).
    - `causal`: each token attends to itself and earlier tokens only.
    - `time_dependent`: shift and scale each LayerNorm's output by a linear function of `t`
      (adaLN-style, `ln(x) * (1 + s(t)) + b(t)`), so weight-tied steps can differ with depth.
    - `dropout`: on the attention weights and on each branch's output (training mode only;
      within one solve every evaluation sees the same masks).

    `forward(t, x, mask=None)` also takes a boolean `mask` broadcastable to
    `[batch, heads, tokens, tokens]` (`True`: may attend), passed as context to `ODEBlock`.

    **Raises:** `ValueError` for a `dim`, `heads` or `hidden` that is not a positive integer, a
    `dim` that `heads` does not divide, an unknown `composition`, a `dropout` outside `[0, 1)`,
    or (when called) a state that is not `[batch, tokens, dim]`.

    **Example:**

    ```python
    f = odenet.TransformerDynamics(dim=32, heads=4, causal=True)
    x = torch.randn(2, 10, 32)
    gpt_block = odenet.ResBlock(f)  # x + attn(ln_1 x), then + mlp(ln_2 .)
    ode = odenet.ODEBlock(f, solver="dopri5", t1=4.0, gradient="adjoint")  # four blocks' depth
    y = ode(x)
    ```
    """

    def __init__(self, dim: int, heads: int, *, hidden: Optional[int] = None, composition: str = "sequential",
                 causal: bool = False, time_dependent: bool = False, dropout: float = 0.0):
        super().__init__()
        self.dim, self.heads = _check_int("dim", dim), _check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads} (each head gets dim // heads features).")
        hidden = _check_int("hidden", 4 * dim if hidden is None else hidden)
        if composition not in COMPOSITIONS:
            raise ValueError(f"Unknown composition {composition!r}; choose one of {', '.join(COMPOSITIONS)}.")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}.")
        self.composition, self.causal = composition, bool(causal)
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads, float(dropout))
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = _FeedForward(dim, hidden, float(dropout))
        self.time: Optional[nn.Linear] = None
        if time_dependent:  # t -> (shift, scale) of ln_1, then of ln_2; small so that t starts as a nudge
            self.time = nn.Linear(1, 4 * dim)
            nn.init.normal_(self.time.weight, std=0.02)
            nn.init.zeros_(self.time.bias)

    @property
    def time_dependent(self) -> bool:
        """Whether `t` modulates the LayerNorms."""
        return self.time is not None

    def _norm(self, i: int, t: Tensor, x: Tensor) -> Tensor:
        h = (self.ln_1, self.ln_2)[i](x)
        if self.time is None:
            return h
        # One time, or one per sample (`[B, 1, 1]` under `Adaptive(per_sample=True)`).
        mod = self.time(t.to(x.dtype).reshape(-1, 1)).view(-1, 1, 4, self.dim)
        return h * (1 + mod[:, :, 2 * i + 1]) + mod[:, :, 2 * i]

    def _check(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"TransformerDynamics(dim={self.dim}) needs a [batch, tokens, {self.dim}] state, "
                             f"got shape {tuple(x.shape)}.")

    def attention(self, t: Tensor, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The attention sub-field `A(t, x) = attn(ln_1(x))`."""
        self._check(x)
        return self.attn(self._norm(0, t, x), self.causal, mask)

    def feedforward(self, t: Tensor, x: Tensor) -> Tensor:
        """The feed-forward sub-field `M(t, x) = mlp(ln_2(x))`."""
        self._check(x)
        return self.mlp(self._norm(1, t, x))

    def forward(self, t: Tensor, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """`dx/dt`: the block's update at unit step, for the composition."""
        if self.composition == "parallel":
            return self.attention(t, x, mask) + self.feedforward(t, x)
        if self.composition == "sequential":
            a = self.attention(t, x, mask)
            return a + self.feedforward(t, x + a)
        m = 0.5 * self.feedforward(t, x)
        a = self.attention(t, x + m, mask)
        return m + a + 0.5 * self.feedforward(t, x + m + a)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, composition={self.composition!r}, causal={self.causal}, "
                f"time_dependent={self.time_dependent}")
