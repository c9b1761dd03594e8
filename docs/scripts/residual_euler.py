"""Figure: a residual block is one Euler step.

Left: the exact trajectory of a 2-D ODE `dx/dt = f(t, x)` and the states of a 6-block ResNet
`x_{k+1} = x_k + h f(t_k, x_k)` (h = T/6) and of a 24-block one, built from the same `f`; each
arrow is one block's residual branch `h f(t_k, x_k)`. Right: the distance between the ResNet's output and the ODE's
solution shrinks like 1/N as the number of weight-tied blocks N grows (Euler is first order).

    python docs/scripts/residual_euler.py        # writes docs/img/concepts/residual_euler.png
"""

from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import odenet  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "img" / "concepts" / "residual_euler.png"
T = 3.0  # integration interval [0, T]
N_SHOWN = 6  # blocks drawn with arrows


class Spiral(nn.Module):
    """A damped rotation with a time-varying pull: dx/dt = A x + 0.3 sin(t) (1, 0)."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=torch.float64))

    def forward(self, t, x):
        return x @ self.A.T + 0.3 * torch.sin(t) * torch.tensor([1.0, 0.0], dtype=x.dtype)


def resnet_states(f, x0, n):
    """The input and the output of each of n ResBlocks sharing f, with h = T/n."""
    blocks = [odenet.ResBlock(f, h=T / n, t=i * T / n) for i in range(n)]
    states = [x0]
    for b in blocks:
        states.append(b(states[-1]))
    return torch.stack(states)


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT  # optional: another output file
    torch.set_num_threads(1)
    f = Spiral()
    x0 = torch.tensor([[1.5, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        exact = odenet.odeint(f, x0, torch.linspace(0, T, 400, dtype=torch.float64), rtol=1e-10, atol=1e-12).ys[:, 0]
        res = resnet_states(f, x0, N_SHOWN)[:, 0]
        res24 = resnet_states(f, x0, 24)[:, 0]
        # the same thing, as one block: N Euler steps of odeint are the N residual blocks, bit for bit
        euler = odenet.ODEBlock(f, solver="euler", steps=N_SHOWN, t1=T)(x0)[0]
        assert torch.equal(euler, res[-1])
        ns = [2, 4, 8, 16, 32, 64, 128, 256]
        errors = [(resnet_states(f, x0, n)[-1, 0] - exact[-1]).norm().item() for n in ns]

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.5, 4.0), layout="constrained")
    ax.plot(exact[:, 0], exact[:, 1], color="0.3", lw=1.8, label="ODE solution x(t)")
    ax.plot(res24[:, 0], res24[:, 1], ".", color="C0", ms=5, zorder=3, label="ResNet states, 24 blocks (h = T/24)")
    ax.plot(res[:, 0], res[:, 1], "o", color="C3", ms=6, zorder=3, label=f"ResNet states x_k, {N_SHOWN} blocks (h = T/{N_SHOWN})")
    for k in range(N_SHOWN):
        a, b = res[k], res[k + 1]
        ax.annotate("", xy=(b[0], b[1]), xytext=(a[0], a[1]),
                    arrowprops=dict(arrowstyle="->", color="C3", lw=1.5))
        if k < 2:
            mid = (a + b) / 2
            ax.text(mid[0] + 0.08, mid[1], f"+h·f(t{k}, x{k})", color="C3", fontsize=8)
    ax.plot(*exact[0], "s", color="k", ms=6)
    ax.text(exact[0, 0] - 0.1, exact[0, 1] + 0.12, "x(0)", fontsize=9)
    ax.set_aspect("equal")
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")
    ax.set_title(r"$x_{k+1} = x_k + h\,f(t_k, x_k)$: one block = one Euler step", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(top=ax.get_ylim()[1] + 0.9)

    ax2.loglog(ns, errors, "o-", color="C3", label="|ResNet(x₀) − x(T)|")
    ax2.loglog(ns, [errors[0] * ns[0] / n for n in ns], "--", color="0.5", label="∝ 1/N (first order)")
    ax2.set_xlabel("number of weight-tied blocks N (h = T/N)")
    ax2.set_ylabel("distance to the ODE solution")
    ax2.set_title("more, smaller blocks → the ODE", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    for n, e in zip(ns, errors):
        print(f"N={n:4d}  |ResNet - ODE| = {e:.3e}")


if __name__ == "__main__":
    main()
