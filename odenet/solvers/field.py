"""Keeping a module `f` with real layers one ODE within a solve.

A solver evaluates `f` many times per solve. Layers that draw random numbers (dropout) would
draw new ones at each evaluation, so the field would change from one stage to the next (no
longer an ODE: adaptive solvers then reject step after step, and recomputation in backward
sees other masks). Layers with running statistics (BatchNorm) would update them at every
evaluation. :class:`FieldScope` fixes both for one solve: every evaluation, forward and
backward, starts from the random-number state the solve started with, and running statistics
are updated by the first evaluation of the forward solve only.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["FieldScope"]


def _rng_state(device: torch.device) -> Tuple[Tensor, Optional[Tensor]]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: Tuple[Tensor, Optional[Tensor]], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class FieldScope:
    """The random-number state and the running-statistics layers of a training-mode module `f`
    for one solve (made by :meth:`of`, which returns `None` when `f` has neither)."""

    __slots__ = ("device", "rng", "stats_layers", "evaluations")

    def __init__(self, device: torch.device, random: bool, stats_layers: List[nn.Module]):
        self.device = device
        self.rng = _rng_state(device) if random else None
        self.stats_layers = stats_layers
        self.evaluations = 0

    @classmethod
    def of(cls, f, y: Tensor) -> Optional["FieldScope"]:
        """A scope for a solve of `f` from `y`, or `None` when nothing in `f` needs one (`f` is not
        a module in training mode, or has no dropout and no layer with running statistics)."""
        if not isinstance(f, nn.Module) or not f.training:
            return None
        random, stats_layers = False, []
        for m in f.modules():
            if isinstance(m, _DropoutNd) and m.training and m.p > 0:
                random = True
            elif isinstance(m, (_BatchNorm, _InstanceNorm)) and m.training and m.track_running_stats:
                stats_layers.append(m)
        if not (random or stats_layers):
            return None
        return cls(y.device, random, stats_layers)

    @contextlib.contextmanager
    def evaluation(self):
        """Around one evaluation of `f`: the solve's random draws; running statistics untouched
        after the first evaluation."""
        if self.rng is not None:
            _set_rng_state(self.rng, self.device)
        frozen = self.stats_layers if self.evaluations else []
        for m in frozen:
            m.track_running_stats = False  # in training mode: batch statistics, no update
        try:
            yield
        finally:
            for m in frozen:
                m.track_running_stats = True
            self.evaluations += 1

    @contextlib.contextmanager
    def backward(self):
        """Around a backward pass that evaluates `f` again: the caller's random-number state is
        left as it was before it."""
        if self.rng is None:
            yield
            return
        outside = _rng_state(self.device)
        try:
            yield
        finally:
            _set_rng_state(outside, self.device)
