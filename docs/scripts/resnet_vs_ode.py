"""Figure: when a trained ResNet is, and is not, the ODE of its own `f`.

Four models `Linear(2, 8) -> residual part -> Linear(8, 2)` are trained on the same 2-D
two-spirals data (1,000 points, 400 Adam steps, batch 250). Their residual parts differ only in
how the one weight-tied `f = odenet.MLPDynamics(dim=8, hidden=32)` is integrated over [0, 1]
during training: Euler with N = 1 step (one residual block with h = 1), N = 4 or N = 16
steps (weight-tied ResNets with h = 1/4, 1/16), or `dopri5` at rtol = atol = 1e-4 (an ODE-Net).

After training, each model's `f` is re-run under Euler with N = 1 … 128 steps and under
`dopri5` at 1e-6 (`odenet.swap_blocks`, same parameters):

- Left: test accuracy against the number of Euler steps used at evaluation.
- Right: the distance between the model's own output (the discretisation it was trained with)
  and the output of the accurate ODE solve of its `f`, relative to the output's size.

A model whose accuracy and outputs do not change when the steps are refined is an ODE
model; one that only works at the step count it was trained with is a discrete network that
happens to have residual form (Ott et al., *ResNet after all?*, ICLR 2021).

    python docs/scripts/resnet_vs_ode.py         # writes docs/img/concepts/resnet_vs_ode.png
"""

from __future__ import annotations

import math
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import odenet  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "img" / "concepts" / "resnet_vs_ode.png"
EVAL_STEPS = [1, 2, 4, 8, 16, 32, 64, 128]
TRAINED = {  # label -> ODEBlock settings used in training
    "trained with Euler, N = 1": dict(solver="euler", steps=1),
    "trained with Euler, N = 4": dict(solver="euler", steps=4),
    "trained with Euler, N = 16": dict(solver="euler", steps=16),
    "trained with dopri5, tol 1e-4": dict(solver="dopri5", rtol=1e-4, atol=1e-4),
}
COLORS = ["C3", "C1", "C0", "C2"]


def two_spirals(n: int, noise: float, generator: torch.Generator):
    """Two interleaved spirals (1.5 turns each) in 2-D, labels 0 and 1."""
    y = torch.randint(0, 2, (n,), generator=generator)
    r = torch.sqrt(torch.rand(n, generator=generator)) * 3 * math.pi
    x = torch.stack([r * torch.cos(r), r * torch.sin(r)], 1) / (3 * math.pi)
    x[y == 1] = -x[y == 1]
    return 2 * x + noise * torch.randn(n, 2, generator=generator), y


def make_model(settings):
    f = odenet.MLPDynamics(dim=8, hidden=32)
    return nn.Sequential(nn.Linear(2, 8), odenet.ODEBlock(f, **settings), nn.Linear(8, 2))


def train(model, x, y, steps=400, batch=250, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


@torch.no_grad()
def residual_out(model, x, **settings):
    """The residual part's output with the block swapped for other solver settings (same f), and the logits."""
    stem, block, head = model
    h = odenet.swap_blocks(block, **settings)(stem(x))  # swap_blocks on a block returns a new block
    return h, head(h)


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT  # optional: another output file
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = two_spirals(1000, 0.05, g)
    x_test, y_test = two_spirals(2000, 0.05, g)
    curves, gaps = {}, {}
    for label, settings in TRAINED.items():
        torch.manual_seed(0)
        model = train(make_model(settings), x_train, y_train).eval()
        acc = []
        for n in EVAL_STEPS:
            _, logits = residual_out(model, x_test, solver="euler", steps=n)
            acc.append((logits.argmax(1) == y_test).float().mean().item())
        own, own_logits = residual_out(model, x_test, **settings)
        ode, ode_logits = residual_out(model, x_test, solver="dopri5", rtol=1e-6, atol=1e-6)
        curves[label] = (acc, (ode_logits.argmax(1) == y_test).float().mean().item(),
                         (own_logits.argmax(1) == y_test).float().mean().item())
        gaps[label] = ((own - ode).norm() / ode.norm()).item()

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.0), layout="constrained", width_ratios=[1.6, 1])
    for (label, (acc, ode_acc, own_acc)), color in zip(curves.items(), COLORS):
        ax.plot(EVAL_STEPS, acc, "o-", color=color, label=label)
        ax.axhline(ode_acc, color=color, ls=":", lw=1)
    ax.plot([], [], ":", color="0.4", label="same f under dopri5 at 1e-6")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("Euler steps N used at evaluation (same trained f)")
    ax.set_ylabel("test accuracy")
    ax.set_title("refining the steps after training", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="major", alpha=0.3)

    labels = list(gaps)
    ax2.bar(range(len(labels)), [gaps[k] for k in labels], color=COLORS)
    ax2.set_xticks(range(len(labels)), [k.replace("trained with ", "").replace(", ", "\n") for k in labels], fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("‖own output − ODE output‖ / ‖ODE output‖")
    ax2.set_title("is the trained network the ODE of its f?", fontsize=10)
    ax2.grid(True, axis="y", which="major", alpha=0.3)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    for label, (acc, ode_acc, own_acc) in curves.items():
        print(f"{label:32s} own {own_acc:.3f}  euler N={EVAL_STEPS}: {' '.join(f'{a:.3f}' for a in acc)}  "
              f"dopri5 1e-6: {ode_acc:.3f}  relative gap to the ODE: {gaps[label]:.2e}")


if __name__ == "__main__":
    main()
