"""Figure: plots for states of more than two dimensions (the tutorial "Plot trajectories").

Left: each token of a transformer-style block's hidden states `[batch, tokens, dim]` drawn as
its own trajectory through depth, on the first two principal components of all tokens and
depths. Middle: an 8-dimensional dynamics `f` projected on the principal plane of its
trajectories. Right: the steps the adaptive block took in its last forward.

    python docs/scripts/trajectories_highdim.py   # writes docs/img/trajectories/highdim.png
"""

from __future__ import annotations

import io
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

import odenet  # noqa: E402
import odenet.plotting  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "img" / "trajectories" / "highdim.png"


class Attention(nn.Module):
    """dx/dt of [batch, tokens, dim] states: a Pre-LN self-attention branch plus an MLP branch."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, t, x):
        h = self.ln1(x)
        return self.attn(h, h, h, need_weights=False)[0] + self.mlp(self.ln2(x))


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT  # optional: another output file
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = odenet.ODEBlock(Attention(16), solver="dopri5", rtol=1e-6, atol=1e-6, t1=3.0).eval()
    h = torch.randn(4, 10, 16)  # [batch, tokens, dim]
    f8 = odenet.MLPDynamics(dim=8, hidden=32)
    paths = odenet.ODEBlock(f8).trajectory(torch.randn(32, 8), torch.linspace(0, 1, 20)).detach()

    fig = Figure(figsize=(16, 4.6), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[1.0, 1.15, 1.3])
    odenet.plotting.plot_trajectories(layer, h, samples=[0], tokens="all", ax=axes[0],
                                      title="10 tokens of one sample through depth")
    odenet.plotting.plot_vector_field(f8, basis="pca", trajectories=paths, ax=axes[1], title="8-D f on its PCA plane")
    with torch.no_grad():
        layer(h)
    odenet.plotting.plot_step_sizes(layer, ax=axes[2], title="steps of the block's last forward")
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    small = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)  # a small file
    small.save(out, optimize=True)


if __name__ == "__main__":
    main()
