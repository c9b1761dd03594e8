"""Figure: activation memory and cost of the three gradient methods against the number of steps.

One `odenet.ODEBlock(f, solver="rk4", steps=N, gradient=...)` with
`f = odenet.MLPDynamics(dim=32, hidden=64)`, a batch of 256 states, for N = 1 … 64, in float64
(so that the right panel shows the methods, not float32 round-off).

- Left: bytes autograd saves for backward (parameters excluded), counted by
  `odenet.measure.saved_tensors`. Exact and device-independent.
- Middle: evaluations of `f` in the forward and the backward pass (`last_stats.nfe_forward`,
  `nfe_backward`). All three methods also do one vector–Jacobian product of `f` per stage in
  backward (`direct` replays the recorded graph; the others call `f` again first).
- Right: how far the adjoint's gradient (with respect to the parameters) is from the exact
  gradient of the discrete forward pass, which `direct` and `checkpoint` both compute.

    python docs/scripts/memory.py                # writes docs/img/concepts/memory.png
"""

from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import odenet  # noqa: E402
import odenet.measure  # noqa: E402  (not imported by `import odenet`)

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "img" / "concepts" / "memory.png"
STEPS = [1, 2, 4, 8, 16, 32, 64]
METHODS = ("direct", "checkpoint", "adjoint")
COLORS = {"direct": "C0", "checkpoint": "C1", "adjoint": "C2"}
STYLE = {"direct": dict(marker="o", ls="-"), "checkpoint": dict(marker="s", ls="-", ms=8), "adjoint": dict(marker="^", ls="--")}


def measure(f, x, steps: int, gradient: str):
    block = odenet.ODEBlock(f, solver="rk4", steps=steps, gradient=gradient)
    f.zero_grad()
    with odenet.measure.saved_tensors(exclude=f.parameters()) as saved:
        loss = block(x).square().mean()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in f.parameters()])
    return saved.bytes, block.last_stats.nfe_forward, block.last_stats.nfe_backward, grad


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT  # optional: another output file
    torch.set_num_threads(1)
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=32, hidden=64).double()
    x = torch.randn(256, 32, dtype=torch.float64)
    state_bytes = x.numel() * x.element_size()
    rows = {m: [] for m in METHODS}
    for n in STEPS:
        for m in METHODS:
            rows[m].append(measure(f, x, n, m))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), layout="constrained")
    ax = axes[0]
    for m in METHODS:
        ax.plot(STEPS, [r[0] / state_bytes for r in rows[m]], color=COLORS[m], label=m, **STYLE[m])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("steps N (rk4, 4 stages each)")
    ax.set_ylabel("saved for backward, in states\n(1 state = 256×32 float64 = 64 KiB)")
    ax.set_title("activation memory", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)

    ax = axes[1]
    for m in METHODS:
        ax.plot(STEPS, [r[1] + r[2] for r in rows[m]], color=COLORS[m], label=f"{m}: forward + backward", **STYLE[m])
    ax.plot(STEPS, [r[1] for r in rows["direct"]], "k:", lw=1, label="forward only (all three)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("steps N")
    ax.set_ylabel("evaluations of f")
    ax.set_title("cost: f evaluations (plus 4N VJPs for each)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)

    ax = axes[2]
    d0 = rows["direct"][0][3]
    rows_ref = ((rows["adjoint"][0][3] - d0).norm() / d0.norm()).item()
    for m in ("checkpoint", "adjoint"):
        diffs = [((r[3] - d[3]).norm() / d[3].norm()).item() for r, d in zip(rows[m], rows["direct"])]
        diffs = [max(v, 1e-17) for v in diffs]  # an exact 0 would not show on the log axis
        ax.plot(STEPS, diffs, color=COLORS[m], label=m, **STYLE[m])
    ax.plot(STEPS, [rows_ref * STEPS[0] ** 4 / n**4 for n in STEPS], ":", color="0.5", label="∝ N⁻⁴ (rk4's order)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("steps N")
    ax.set_ylabel("‖∇θ − ∇θ(direct)‖ / ‖∇θ(direct)‖")
    ax.set_title("gradient against direct backprop", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    print(f"{'steps':>5} " + " ".join(f"{m + ' MiB':>15} {'nfe f+b':>9}" for m in METHODS))
    for i, n in enumerate(STEPS):
        print(f"{n:>5} " + " ".join(f"{rows[m][i][0] / 2**20:>15.3f} {rows[m][i][1] + rows[m][i][2]:>9d}" for m in METHODS))


if __name__ == "__main__":
    main()
