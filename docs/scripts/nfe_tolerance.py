"""Figure: what the tolerance buys, counted in function evaluations (NFE).

One fixed random dynamics `f = odenet.MLPDynamics(dim=2, hidden=64)` (float64, weights scaled
by 2 so that the flow bends), 64 initial states, solved from t = 0 to 2 with `rtol = atol = tol`
for tol = 1e-1 … 1e-9 by `bosh3`, `dopri5` and `tsit5`.

- Left: NFE of the forward solve (`Solution.stats.nfe_forward`), with the rejected steps.
- Right: the error actually achieved, max over the batch of |x(2) − reference|, where the
  reference is dopri5 at rtol = atol = 1e-13. The tolerance bounds the *local* error per step;
  the global error tracks it, but is neither equal to it nor guaranteed below it.

    python docs/scripts/nfe_tolerance.py         # writes docs/img/concepts/nfe_tolerance.png
"""

from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import odenet  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "img" / "concepts" / "nfe_tolerance.png"
TOLS = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]
SOLVERS = {"bosh3": "C0", "dopri5": "C3", "tsit5": "C2"}


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT  # optional: another output file
    torch.set_num_threads(1)
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=2, hidden=64).double()
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(2.0)
    x0 = torch.randn(64, 2, dtype=torch.float64)
    t = [0.0, 2.0]
    with torch.no_grad():
        ref = odenet.odeint(f, x0, t, solver="dopri5", rtol=1e-13, atol=1e-13).ys[-1]
        results = {}
        for name in SOLVERS:
            rows = []
            for tol in TOLS:
                sol = odenet.odeint(f, x0, t, solver=name, rtol=tol, atol=tol)
                err = (sol.ys[-1] - ref).abs().max().item()
                rows.append((sol.stats.nfe_forward, sol.stats.n_accepted, sol.stats.n_rejected, err))
            results[name] = rows

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.0), layout="constrained")
    for name, color in SOLVERS.items():
        ax.loglog(TOLS, [r[0] for r in results[name]], "o-", color=color, label=name)
    ax.invert_xaxis()
    ax.set_xlabel("rtol = atol  (tighter →)")
    ax.set_ylabel("function evaluations (forward)")
    ax.set_title("NFE grows roughly like tol^(-1/(q+1)) for an order-q error estimate", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)

    for name, color in SOLVERS.items():
        ax2.loglog(TOLS, [r[3] for r in results[name]], "o-", color=color, label=name)
    ax2.loglog(TOLS, TOLS, ":", color="0.4", label="error = tol")
    ax2.invert_xaxis()
    ax2.set_xlabel("rtol = atol  (tighter →)")
    ax2.set_ylabel("max |x(2) − reference|")
    ax2.set_title("global error achieved", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(True, which="major", alpha=0.3)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    print(f"{'tol':>8} " + " ".join(f"{n + ' nfe':>11} {'acc/rej':>8} {'error':>9}" for n in SOLVERS))
    for i, tol in enumerate(TOLS):
        print(f"{tol:>8.0e} " + " ".join(
            f"{results[n][i][0]:>11d} {results[n][i][1]:>4d}/{results[n][i][2]:<3d} {results[n][i][3]:>9.1e}" for n in SOLVERS))


if __name__ == "__main__":
    main()
