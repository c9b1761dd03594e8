"""Figure: why the skip connection is a gradient highway.

The gradient reaching the input of L layers is the upstream gradient times the product of the
layers' Jacobians. A plain layer `x -> F(x)` contributes `∂F/∂x`; a residual layer
`x -> x + F(x)` contributes `I + ∂F/∂x`.

Left, linear layers `F(x) = W x` (one random 64x64 matrix W, entries N(0, 0.8²/64), spectral
radius about 0.8): the norm of `gᵀW^L` (plain) decays geometrically with depth; `gᵀ(I + W)^L`
(residual, branch at full scale) grows geometrically, because some eigenvalues of `I + W` exceed
1 in modulus; `gᵀ(I + W/L)^L` (residual with step `h = 1/L`, the ODE scaling) tends to
`gᵀ exp(W)` and stays put however deep the network.

Right, the same with trained-network ingredients: L untied tanh MLPs
(`odenet.MLPDynamics(dim=16, hidden=64)`, PyTorch's default initialisation), stacked plainly
(`x -> f(x)`) or as `odenet.ResBlock(f, h)` with `h = 1` and `h = 1/L`; the input gradient of
`vᵀ x_L` for a random unit `v`, averaged over 5 seeds, computed by autograd in float64.

    python docs/scripts/gradient_highway.py      # writes docs/img/concepts/gradient_highway.png
"""

from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import odenet  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "img" / "concepts" / "gradient_highway.png"
DEPTHS = [1, 2, 4, 8, 16, 32, 64, 128]


def linear_products(d: int = 64, sigma: float = 0.8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=torch.float64) * sigma / d**0.5
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v /= v.norm()
    eye = torch.eye(d, dtype=torch.float64)
    plain, res, ode = [], [], []
    for L in DEPTHS:
        plain.append((v @ torch.linalg.matrix_power(W, L)).norm().item())
        res.append((v @ torch.linalg.matrix_power(eye + W, L)).norm().item())
        ode.append((v @ torch.linalg.matrix_power(eye + W / L, L)).norm().item())
    limit = (v @ torch.linalg.matrix_exp(W)).norm().item()
    return plain, res, ode, limit


def network_gradients(kind: str, L: int, seeds=range(5), dim: int = 16):
    norms = []
    for seed in seeds:
        torch.manual_seed(seed)
        fs = [odenet.MLPDynamics(dim=dim, hidden=64, time_dependent=False).double() for _ in range(L)]
        x0 = torch.randn(1, dim, dtype=torch.float64, requires_grad=True)
        v = torch.randn(1, dim, dtype=torch.float64)
        v /= v.norm()
        x = x0
        t = torch.zeros((), dtype=torch.float64)
        for f in fs:
            if kind == "plain":
                x = f(t, x)
            else:
                x = odenet.ResBlock(f, h=1.0 if kind == "res" else 1.0 / L)(x)
        (grad,) = torch.autograd.grad((x * v).sum(), x0)
        norms.append(grad.norm().item())
    return sum(norms) / len(norms)


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT  # optional: another output file
    torch.set_num_threads(1)
    plain, res, ode, limit = linear_products()
    nets = {k: [network_gradients(k, L) for L in DEPTHS] for k in ("plain", "res", "ode")}

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.0), layout="constrained")
    ax.semilogy(DEPTHS, plain, "o-", color="C0", label=r"plain: $\|g^\top W^L\|$")
    ax.semilogy(DEPTHS, res, "s-", color="C3", label=r"residual, $h=1$: $\|g^\top (I+W)^L\|$")
    ax.semilogy(DEPTHS, ode, "^-", color="C2", label=r"residual, $h=1/L$: $\|g^\top (I+W/L)^L\|$")
    ax.axhline(limit, color="C2", ls=":", lw=1, label=r"$\|g^\top \exp(W)\|$ (the ODE's)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("depth L")
    ax.set_ylabel("gradient norm at the input")
    ax.set_title("linear layers, one random W (spectral radius ≈ 0.8)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)

    ax2.semilogy(DEPTHS, nets["plain"], "o-", color="C0", label="plain: x → f(x)")
    ax2.semilogy(DEPTHS, nets["res"], "s-", color="C3", label="ResBlock(f, h=1)")
    ax2.semilogy(DEPTHS, nets["ode"], "^-", color="C2", label="ResBlock(f, h=1/L)")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("depth L (untied MLPDynamics layers)")
    ax2.set_title("tanh MLP layers, default init, autograd (mean of 5 seeds)", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(True, which="major", alpha=0.3)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    print("L      plain       (I+W)^L     (I+W/L)^L  | nets: plain    h=1         h=1/L")
    for i, L in enumerate(DEPTHS):
        print(f"{L:<5d} {plain[i]:.3e}  {res[i]:.3e}  {ode[i]:.3e}  | {nets['plain'][i]:.3e}  "
              f"{nets['res'][i]:.3e}  {nets['ode'][i]:.3e}")
    print(f"limit |g exp(W)| = {limit:.3e}")


if __name__ == "__main__":
    main()
