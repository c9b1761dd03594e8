#!/usr/bin/env python
"""Benchmark odenet's solvers against torchdiffeq and torchode (issue 4).

All libraries solve the *same* problem in one process: the same `f` module (same
weights), the same initial state, the same output times, tolerances, device and dtype.
Inside every repeat the libraries run one after the other (interleaved, in an order
shuffled every repeat), so that drift of a shared machine hits them alike; the reported time is the
median over the repeats, CUDA-synchronised.

Modes (``--modes``):

- ``forward``: a solve without gradients (adaptive solvers). Reports NFE,
  accepted/rejected steps, median time, the solver overhead
  ``time / (NFE x time of one f call)`` (1.0: the solver costs nothing beyond f) and
  the time ratio to each peer.
- ``train-direct``, ``train-adjoint``, ``train-checkpoint``: one training step (solve,
  ``loss = y(t1).square().mean()``, times ``--loss-scale``, ``loss.backward()``) with that
  gradient method.
  Peers without checkpointing run their backprop-through-the-solver instead. Also
  reports the activation bytes saved for backward during the forward solve and, on
  CUDA, peak allocated memory. The overhead of a training step is its time over the
  floor ``(evals without graph) x t_f + (evals backpropagated) x t_fb``, where ``t_fb``
  is one `f` call with autograd plus its vector-Jacobian product.
- ``fixed``: fixed-step solvers (``--fixed-solvers``, ``--fixed-steps`` N) against a
  hand-written loop of N residual updates (the floor for a ResNet), forward and
  training step. Also counts host reads of device values per step (syncs on CUDA),
  and on CUDA replays odenet's fixed-step solve from a CUDA graph.
- ``memory``: activation bytes saved for backward (and CUDA peak memory) against the
  number of fixed steps (``--memory-steps``) for direct, checkpoint and adjoint.
- ``seminorm``: backward NFE of the adjoint with and without the seminorm
  (Kidger et al. 2021), for odenet and torchdiffeq.

Results go to ``<out>.json`` and ``<out>.md`` and the markdown is printed. Run
``python benchmarks/bench_solvers.py --help`` for every flag; ``--quick`` is a
seconds-long smoke configuration (used by ``tests/test_benchmarks.py``).

Notes on fairness:

- `f` is autonomous (it ignores `t`), so every library sees exactly the same vector field.
- torchode solves a batch of independent problems with one step size each; to solve
  the same problem as odenet and torchdiffeq (one step size for the whole state), the
  state is handed to torchode flattened as one problem of shape ``[1, numel]``. torchode
  runs with ``IntegralController`` (torchdiffeq's controller), odenet with its default
  controller; NFE can therefore differ, which is why the overhead divides by NFE.
- torchdiffeq's ``rk4`` is the 3/8 rule (four stages, like classical RK4).
- Timed runs call `f` unwrapped for torchdiffeq; NFE and step counts come from a
  separate instrumented run (odenet and torchode count internally in every run, as
  their users get them).

The code lives in the package ``benchmarks/solverbench/``: ``config`` (flags' values, sizes),
``problems`` (the fields `f` and the probe that times `f`), ``adapters`` (one solve builder per
library), ``timing`` (cases, timed rounds, instrumented runs), ``modes``, ``environment``,
``report`` (markdown, targets) and ``cli`` (this command line).
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # the solverbench package lives next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

# Re-exported: the entry points, and what tests/test_benchmarks.py builds a problem with.
from solverbench.adapters import build_odenet  # noqa: E402
from solverbench.cli import _out_paths, build_parser, main, parse_args, run  # noqa: E402
from solverbench.config import parse_size  # noqa: E402
from solverbench.problems import make_problem  # noqa: E402
from solverbench.timing import make_unit  # noqa: E402

__all__ = ["build_odenet", "build_parser", "main", "make_problem", "make_unit", "parse_args", "parse_size", "run",
           "_out_paths"]

if __name__ == "__main__":
    main()
