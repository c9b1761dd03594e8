"""Figures for continuous-depth networks: trajectories through depth, vector fields, step sizes, costs.

Every function draws with matplotlib's object API and never touches pyplot's global state
or calls `plt.show()`, so it works headless (the Agg backend, CI, servers) as well as in
notebooks. Each takes an optional `ax` to draw into (its figure is returned) and otherwise
makes a new `matplotlib.figure.Figure`; save it with `fig.savefig("name.png")`.

| function | shows |
|---|---|
| :func:`plot_trajectories` | hidden states through depth (2-D/3-D, PCA for more dimensions), each token of `[batch, tokens, dim]` states on its own with `tokens=`; discrete residual states on top of the continuous ODE curve of the same `f` |
| :func:`plot_vector_field` | a dynamics `f(t, x)` as streamlines or arrows, at one or several times; over two dimensions on a slice or a projection |
| :func:`plot_step_sizes` | the accepted and rejected steps of one solve (a `Solution`, or an `ODEBlock` after a forward) and their sizes over `t` |
| :func:`plot_nfe_over_training` | function evaluations per iteration during training |
| :func:`plot_pareto` | accuracy against cost (NFE, memory, ...) with the Pareto front |
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .blocks import ODEBlock, ResBlock
from .odeint import solve_with_options
from .options import options_from
from .solvers.control import Fixed
from .solvers.stats import SolveStats

__all__ = [
    "plot_trajectories",
    "plot_vector_field",
    "plot_step_sizes",
    "plot_nfe_over_training",
    "plot_pareto",
]

# A qualitative palette (matplotlib's tab10) for classes and compared models.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


# ---------------------------------------------------------------------------- figure helpers


def _new_axes(ax, figsize: Tuple[float, float], projection: Optional[str] = None):
    """`(figure, axes)`: the given axes and its figure, or a new Figure (no pyplot) with one axes."""
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.add_subplot(projection=projection)
        return fig, ax
    from matplotlib.axes import Axes

    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes (or None for a new figure), got {type(ax).__name__}.")
    if projection == "3d" and getattr(ax, "name", "") != "3d":
        raise ValueError(
            "This plot is 3-D but ax is a 2-D Axes. Create it with fig.add_subplot(projection='3d'), "
            "or pass ax=None."
        )
    if projection is None and getattr(ax, "name", "") == "3d":
        raise ValueError("This plot is 2-D but ax is a 3-D Axes; pass a 2-D Axes or ax=None.")
    return ax.get_figure(), ax


def _style(ax) -> None:
    """Light grid, no top/right spines: the house style of 2-D plots."""
    ax.grid(True, color="0.9", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _numpy(x) -> np.ndarray:
    """`x` (tensor or array-like) as a float64 NumPy array; names the torch/NumPy pair to install if they clash."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().double()
        try:
            return x.numpy()
        except RuntimeError as err:
            if "Numpy is not available" not in str(err):
                raise
            # torch 2.2 was built against NumPy 1.x and cannot convert under NumPy 2.
            raise RuntimeError(
                f"torch {torch.__version__} cannot hand tensors to NumPy {np.__version__} ({err}). Install a "
                "matching pair: pip install 'numpy<2' for torch 2.2, or torch>=2.3 with NumPy 2."
            ) from err
    return np.asarray(x, dtype=float)


# ---------------------------------------------------------------------------- trajectories


class _Segment:
    """One block of depth: dynamics `f` over `[t0, t1]`, and how the model steps through it."""

    def __init__(self, f, t0: float, t1: float, grid: Optional[List[float]], options, name: str):
        self.f, self.t0, self.t1 = f, t0, t1
        self.grid = grid  # the model's discrete step points, or None for an adaptive block
        self.options = options  # how the model solves it (None for a ResBlock: one Euler step)
        self.name = name


def _segments(block) -> List[_Segment]:
    if isinstance(block, ResBlock):
        return [_Segment(block.f, block.t, block.t + block.h, [block.t, block.t + block.h], None, "euler")]
    if isinstance(block, ODEBlock):
        o, (t0, t1) = block.options, block.interval  # numbers, also for a learnable t1
        if o.adaptive:
            return [_Segment(block.f, t0, t1, None, o, o.solver_name)]
        grid = list(o.control.grid([t0, t1]))  # one step over the block without steps/step_size
        stepper = dataclasses.replace(o, control=Fixed())  # one step per grid interval
        return [_Segment(block.f, t0, t1, grid, stepper, o.solver_name)]
    if isinstance(block, (nn.Sequential, nn.ModuleList)):
        children = list(block)
        bad = [type(c).__name__ for c in children if not isinstance(c, (ResBlock, ODEBlock))]
        if not children or bad:
            raise TypeError(
                "plot_trajectories takes an ODEBlock, a ResBlock, or an nn.Sequential/ModuleList made only of "
                f"those; this one holds {bad or 'nothing'}. Apply any other layers (e.g. odenet.Augment or an "
                "input projection) to x first and pass the blocks alone."
            )
        return [s for c in children for s in _segments(c)]
    raise TypeError(
        f"block must be an odenet.ODEBlock, odenet.ResBlock, or an nn.Sequential of them, got {type(block).__name__}."
    )


def _trajectory_data(block, x: Tensor, n_points: int, reference: str, rtol: float, atol: float):
    """Continuous curve (depth [M], states [M, B, ...]) and discrete states (depth [K], states [K, B, ...] or None)."""
    segs = _segments(block)
    total = sum(abs(s.t1 - s.t0) for s in segs)
    ref_opts = options_from(reference, rtol=rtol, atol=atol)
    depth0 = segs[0].t0
    c_depth: List[np.ndarray] = []
    c_states: List[Tensor] = []
    d_depth: List[float] = [depth0]
    d_states: List[Tensor] = [x]
    any_discrete = any(s.grid is not None for s in segs)
    yc, yd, s0 = x, x, depth0
    with torch.no_grad():
        for i, seg in enumerate(segs):
            span = seg.t1 - seg.t0
            m = max(8, int(round(n_points * abs(span) / total)))
            frac = np.linspace(0.0, 1.0, m)
            times = torch.tensor(seg.t0 + span * frac, dtype=torch.float64)
            opts = ref_opts if seg.grid is not None else seg.options
            ys = solve_with_options(seg.f, yc, times, opts).ys
            keep = slice(0 if i == 0 else 1, None)  # the first point repeats the previous segment's end
            c_depth.append((s0 + abs(span) * frac)[keep])
            c_states.append(ys[keep])
            yc = ys[-1]
            if any_discrete:
                if seg.grid is None:  # an adaptive block inside a discrete stack: the model's output
                    yd = solve_with_options(seg.f, yd, (seg.t0, seg.t1), seg.options).ys[-1]
                    d_states.append(yd)
                    d_depth.append(s0 + abs(span))
                elif seg.options is None:  # ResBlock: one Euler step, x + h f(t, x)
                    k = seg.f(torch.full((), seg.t0, dtype=yd.dtype, device=yd.device), yd)
                    yd = torch.add(yd, k, alpha=span)
                    d_states.append(yd)
                    d_depth.append(s0 + abs(span))
                else:
                    g = torch.tensor(seg.grid, dtype=torch.float64)
                    ys_d = solve_with_options(seg.f, yd, g, seg.options).ys
                    d_states.extend(ys_d[1:])
                    d_depth.extend(s0 + abs(gi - seg.t0) for gi in seg.grid[1:])
                    yd = ys_d[-1]
            s0 += abs(span)
    cont = (np.concatenate(c_depth), torch.cat(c_states))
    disc = (np.asarray(d_depth), torch.stack(d_states)) if any_discrete else None
    names = sorted({s.name for s in segs if s.grid is not None})
    return cont, disc, segs, names


def _pca(flat: np.ndarray, k: int):
    """Mean, the first `k` principal directions [k, D] (each with its largest entry positive), variance fractions."""
    mean = flat.mean(0)
    _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
    comps = vt[:k]
    comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]  # deterministic signs
    return mean, comps, s**2 / max(float((s**2).sum()), 1e-300)


def _project(c: np.ndarray, d: Optional[np.ndarray], dims: Optional[int]):
    """Project [M, B, D] (and [K, B, D]) states to `dims` coordinates; PCA when dims < D."""
    D = c.shape[-1]
    if dims is None:
        dims = D if D <= 3 else 2
    if dims > D:
        raise ValueError(f"dims={dims} is more than the state's {D} dimensions; use dims <= {D}.")
    if dims == D:
        return c, d, [f"$x_{i + 1}$" for i in range(D)]
    mean, comps, var = _pca(c.reshape(-1, D), dims)
    labels = [f"PC{i + 1} ({100 * var[i]:.0f}% var.)" for i in range(dims)]
    proj = lambda a: (a - mean) @ comps.T  # noqa: E731
    return proj(c), (proj(d) if d is not None else None), labels


def _indices(name: str, value, size: int) -> np.ndarray:
    """`value` (`"all"`, an index, a sequence of them or a slice) as indices in `[0, size)`."""
    if isinstance(value, slice):
        idx = np.arange(size)[value]
    elif isinstance(value, str) and value == "all":
        idx = np.arange(size)
    else:
        value = value.tolist() if isinstance(value, (Tensor, np.ndarray)) else value
        try:
            idx = np.array([operator.index(v) for v in ([value] if isinstance(value, numbers.Integral) else value)],
                           dtype=int)
        except TypeError:
            raise TypeError(f"{name} must be 'all', an index, a sequence of indices or a slice, "
                            f"got {value!r}.") from None
        bad = idx[(idx < -size) | (idx >= size)]
        if len(bad):
            raise ValueError(f"{name} {bad.tolist()} out of range: x has {size} {name}; use indices 0 to {size - 1} "
                             "(or negative ones, counted from the end).")
        idx = idx % size
    if not len(idx):
        raise ValueError(f"{name}={value!r} selects no {name}; select at least one.")
    return idx


def _selection(x: Tensor, samples, tokens):
    """The drawn samples and tokens as `(sample indices, token indices or None)`, or None for all samples, no tokens."""
    if samples is None and tokens is None:
        return None
    s_idx = np.arange(x.shape[0]) if samples is None else _indices("samples", samples, x.shape[0])
    if tokens is None:
        return s_idx, None
    if x.dim() != 3:
        raise ValueError(
            f"tokens= draws each token of states shaped [batch, tokens, dim], but x has shape {tuple(x.shape)}; "
            "pass x of rank 3, or leave tokens=None for one trajectory per input."
        )
    return s_idx, _indices("tokens", tokens, x.shape[1])


def _select(states: Tensor, sel) -> Tensor:
    """States [N, B, ...] of the selected samples, as [N, S, ...], or [N, S * K, D] with tokens (sample-major)."""
    if sel is None:
        return states
    states = states[:, torch.as_tensor(sel[0])]
    if sel[1] is None:
        return states
    return states[:, :, torch.as_tensor(sel[1])].reshape(states.shape[0], -1, states.shape[-1])


def _trajectory_args(x, n_points, dims, labels, color_by, samples, tokens):
    """Check plot_trajectories' inputs; return the labels as integers (or None), the colouring and the selection."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}.")
    if x.dim() < 2:
        raise ValueError(f"x must be batched, [B, ...], got shape {tuple(x.shape)}; use x.unsqueeze(0) for one input.")
    if isinstance(n_points, bool) or not isinstance(n_points, numbers.Integral) or n_points < 2:
        raise ValueError(f"n_points must be an integer >= 2, got {n_points!r}.")
    if dims is not None and dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3 (or None for automatic), got {dims!r}.")
    sel = _selection(x, samples, tokens)
    lab = None
    if labels is not None:
        lab = _numpy(labels).astype(int).reshape(-1)
        if lab.shape[0] != x.shape[0]:
            raise ValueError(
                f"labels has {lab.shape[0]} entries but x has a batch of {x.shape[0]}; give one label per input."
            )
        if (lab < 0).any():
            raise ValueError("labels must be non-negative class indices.")
    if color_by is None:
        color_by = "class" if lab is not None else ("token" if tokens is not None else "depth")
    if color_by not in ("class", "depth", "token", "sample"):
        raise ValueError(f"color_by must be 'class', 'depth', 'token' or 'sample', got {color_by!r}.")
    if color_by == "class" and lab is None:
        raise ValueError("color_by='class' needs labels=; pass the class of each input or use color_by='depth'.")
    if color_by == "token" and tokens is None:
        raise ValueError("color_by='token' needs tokens= (which token positions to draw), e.g. tokens='all'.")
    return lab, color_by, sel


def _with_depth(states: np.ndarray, depth: np.ndarray, first: bool) -> np.ndarray:
    """States [N, B, P] with their depth [N] added as the first (depth on x) or last (depth on z) coordinate."""
    dep = np.broadcast_to(depth[:, None, None], states.shape[:2] + (1,))
    return np.concatenate([dep, states], -1) if first else np.concatenate([states, dep], -1)


def _trajectory_coords(c_depth: np.ndarray, c_states: Tensor, disc, dims: Optional[int], depth_axis: bool):
    """Plot coordinates of the curves [M, B, k] and of the discrete states [K, B, k] (or None),
    their axis labels, and whether depth is one of them."""
    B = c_states.shape[1]
    c = _numpy(c_states).reshape(c_states.shape[0], B, -1)
    d = _numpy(disc[1]).reshape(disc[1].shape[0], B, -1) if disc is not None else None
    if c.shape[-1] == 1:
        depth_axis = True
        if dims not in (None, 1):
            raise ValueError(f"the state has one dimension; dims={dims} is not possible.")
    c, d, labels = _project(c, d, dims)
    P = c.shape[-1]
    if P == 1:  # one plotted coordinate (a 1-D state, or dims=1): drawn against depth
        depth_axis = True
    if depth_axis and P == 3:
        raise ValueError("depth_axis=True with 3 state coordinates would need 4 axes; use dims=2 or depth_axis=False.")
    if not depth_axis:
        return c, d, labels, False
    # Depth is the x axis of one coordinate, the vertical (z) axis of two.
    C = _with_depth(c, c_depth, P == 1)
    Dd = _with_depth(d, disc[0], P == 1) if d is not None else None
    return C, Dd, (["depth $t$", labels[0]] if P == 1 else labels + ["depth $t$"]), True


def _line_collection(ax, lines, **kw) -> None:
    """Add a collection of `lines` (3-D ones on 3-D axes) to `ax`."""
    if ax.name == "3d":
        from mpl_toolkits.mplot3d.art3d import Line3DCollection

        ax.add_collection3d(Line3DCollection(lines, **kw))
    else:
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection(lines, **kw))


def _scatter(ax, points: np.ndarray, **kw) -> None:
    """Scatter points [N, 2], or [N, 3] on 3-D axes (without depth shading)."""
    if ax.name == "3d":
        ax.scatter(points[:, 0], points[:, 1], points[:, 2], depthshade=False, **kw)
    else:
        ax.scatter(points[:, 0], points[:, 1], **kw)


def _colour_kw(depths: np.ndarray, B: int, colours, cmap, norm) -> Dict[str, Any]:
    """Scatter colours of B trajectories' states at `depths`: one per trajectory (`colours`), or by depth."""
    if colours is not None:
        return dict(c=list(np.tile(np.array(colours, dtype=object), len(depths))))
    return dict(c=np.repeat(depths, B), cmap=cmap, norm=norm)


def _draw_curves(ax, C: np.ndarray, c_depth: np.ndarray, colours, cmap, norm, discrete: bool) -> None:
    """Draw the continuous curves [M, B, k]: one colour per curve (`colours`), or coloured by depth."""
    B, k = C.shape[1], C.shape[2]
    lw = 0.9 if B > 100 else 1.3
    alpha = 0.55 if discrete else (0.5 if B > 100 else 0.75)
    if colours is not None:
        _line_collection(ax, [C[:, b, :] for b in range(B)], colors=colours, linewidths=lw, alpha=alpha, zorder=2)
        return
    segs = np.stack([C[:-1], C[1:]], axis=2).transpose(1, 0, 2, 3).reshape(-1, 2, k)  # [B * (M-1), 2, k]
    mid = np.repeat(0.5 * (c_depth[:-1] + c_depth[1:])[None, :], B, 0).reshape(-1)
    _line_collection(ax, segs, cmap=cmap, norm=norm, linewidths=lw, alpha=alpha, zorder=2, array=mid)


def _draw_states(ax, C, Dd, c_depth, d_depth, colours, cmap, norm) -> None:
    """Mark the discrete states (dashed polygons, markers) or else the curves' ends, and the inputs (hollow)."""
    B, k = C.shape[1], C.shape[2]
    big = B > 100
    if Dd is not None:
        _line_collection(ax, [Dd[:, b, :] for b in range(B)], colors="0.25", linewidths=0.5, linestyles=(0, (2, 2)),
                         alpha=0.6, zorder=3)
        _scatter(ax, Dd[1:].reshape(-1, k), s=10 if big else 22, edgecolors="0.15", linewidths=0.5, zorder=4,
                 **_colour_kw(d_depth[1:], B, colours, cmap, norm))
    else:
        _scatter(ax, C[-1], s=8 if big else 18, edgecolors="0.15", linewidths=0.5, zorder=4,
                 **_colour_kw(c_depth[-1:], B, colours, cmap, norm))
    _scatter(ax, C[0], facecolors="white", edgecolors="0.2", s=7 if big else 14, linewidths=0.7, zorder=5)


def _finish_trajectory_axes(ax, C: np.ndarray, Dd: Optional[np.ndarray], axis_labels: List[str], depth_axis: bool):
    """Fit the limits to all states (collections do not autoscale 3-D axes), label and style the axes."""
    k = C.shape[-1]
    pts = C.reshape(-1, k) if Dd is None else np.concatenate([C.reshape(-1, k), Dd.reshape(-1, k)])
    pts = pts[np.isfinite(pts).all(1)]
    three_d = ax.name == "3d"
    if three_d and len(pts):
        lo, hi = pts.min(0), pts.max(0)
        pad = 0.05 * np.maximum(hi - lo, 1e-9)
        for i, setter in enumerate((ax.set_xlim, ax.set_ylim, ax.set_zlim)):
            setter(lo[i] - pad[i], hi[i] + pad[i])
    elif len(pts):
        ax.update_datalim(pts)
        ax.autoscale_view()
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    if three_d:
        ax.set_zlabel(axis_labels[2])
        ax.view_init(elev=22, azim=-60)
        for a in (ax.xaxis, ax.yaxis, ax.zaxis):
            a.pane.set_alpha(0.0)
    else:
        _style(ax)
        if not depth_axis:
            ax.set_aspect("equal", adjustable="datalim")


def _line_colours(color_by: str, lab, sel, n_lines: int, class_names, cmap):
    """Colours of the drawn lines (None: by depth), legend entries `{name: colour}`, and for over ten
    tokens or samples the `(norm, label)` of a colour bar instead of entries."""
    from matplotlib import colormaps
    from matplotlib.colors import Colormap, Normalize, to_hex

    if color_by == "depth":
        return None, {}, None
    s_idx, t_idx = sel if sel is not None else (np.arange(n_lines), None)
    per = 1 if t_idx is None else len(t_idx)  # lines per sample
    if color_by == "class":
        values = np.repeat(lab[s_idx], per)
        names = list(class_names) if class_names is not None else []
        name = lambda v: names[v] if v < len(names) else f"class {v}"  # noqa: E731
    else:
        values = np.tile(t_idx, len(s_idx)) if color_by == "token" else np.repeat(s_idx, per)
        name = lambda v: f"{color_by} {v}"  # noqa: E731
    cats = sorted(set(values.tolist()))
    if color_by == "class" or len(cats) <= len(_PALETTE):
        colour = {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(cats)}
        return [colour[v] for v in values], {name(c): colour[c] for c in cats}, None
    cm = cmap if isinstance(cmap, Colormap) else colormaps[cmap]
    norm = Normalize(vmin=cats[0], vmax=cats[-1])
    return [to_hex(cm(norm(v))) for v in values], {}, (norm, "token position" if color_by == "token" else "sample")


def _trajectory_title(Dd: Optional[np.ndarray], disc_names: List[str], segs: List[_Segment]) -> str:
    """The default title: the discrete steps on the flow, or the continuous block's solver."""
    if Dd is not None:
        return f"{Dd.shape[0] - 1} discrete steps ({', '.join(disc_names)}) on the continuous flow of the same $f$"
    return f"Continuous-depth trajectories ({segs[0].name})"


def _depth_norm(depth: np.ndarray):
    """The colour scale of depth: from its lowest to its highest value."""
    from matplotlib.colors import Normalize

    return Normalize(vmin=float(depth.min()), vmax=float(depth.max()))


def _colour_bar(fig, ax, norm, label: str, cmap, pad: float) -> None:
    """A colour bar of `cmap` over `norm` beside `ax`."""
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label, shrink=0.8, pad=pad)


def _trajectory_legend(ax, named_colours: Dict[str, str], discrete: bool, reference_solver: str) -> None:
    """Legend: the groups in `named_colours`, the curves, the residual states (if discrete), the inputs."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, lw=2, label=name) for name, colour in named_colours.items()]
    handles.append(Line2D([], [], color="0.35", lw=1.3,
                          label=f"continuous ODE ({reference_solver})" if discrete else "trajectory"))
    if discrete:
        handles.append(Line2D([], [], color="0.25", lw=0.6, ls=(0, (2, 2)), marker="o", markersize=5,
                              markerfacecolor="0.6", markeredgecolor="0.15", label="residual states"))
    handles.append(Line2D([], [], ls="", marker="o", markersize=5, markerfacecolor="white",
                          markeredgecolor="0.2", label="input $x(t_0)$"))
    ax.legend(handles=handles, fontsize=8, framealpha=0.85, loc="best")


def plot_trajectories(
    block: nn.Module,
    x: Tensor,
    *,
    labels: Optional[Union[Tensor, Sequence[int]]] = None,
    color_by: Optional[str] = None,
    samples=None,
    tokens=None,
    dims: Optional[int] = None,
    depth_axis: bool = False,
    n_points: int = 100,
    reference_solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    class_names: Optional[Sequence[str]] = None,
    cmap: str = "viridis",
    title: Optional[str] = None,
    legend: bool = True,
    ax=None,
):
    """Draw hidden states through depth: the trajectories `x(t)` along which a block moves its inputs.

    A **continuous** block (an adaptive `ODEBlock`) is drawn as its own solve. A **discrete** one
    (a `ResBlock`, a fixed-step `ODEBlock`, or a stack of them) draws the states it computes after
    each step as markers on the continuous ODE curve of the same `f`: where they leave it, the
    ResNet and its ODE part ways. States over three dimensions (images too) go on principal components.

    **Arguments:**

    - `block`: an `odenet.ODEBlock`, an `odenet.ResBlock`, or an `nn.Sequential`/`nn.ModuleList` of them.
    - `x`: batched inputs of the block, `[B, ...]` (apply `odenet.Augment` or any input layer first).
    - `labels`: optional class of each input, `[B]` integers.
    - `color_by`: `"class"` (default with `labels`), `"token"` (default with `tokens`), `"sample"`,
      or `"depth"` (along `cmap`, with a colour bar; the default otherwise).
    - `samples`, `tokens`: what is drawn (the block runs on all of `x`): batch indices (default all),
      and for `[B, T, D]` states (a transformer's) token positions, each token its own trajectory
      (PCA over all drawn tokens and depths): `"all"`, an index, a sequence of them or a slice.
    - `dims`: plotted state coordinates, 1, 2 or 3 (default: the state dimension up to 3, else 2).
    - `depth_axis`: add depth as an axis (a 2-D state then gives a 3-D picture; always on for one coordinate).
    - `n_points`: points along each continuous curve (default 100).
    - `reference_solver`, `rtol`, `atol`: how a discrete block's curve is solved (default `"dopri5"`, `1e-5`).
    - `class_names`: legend names of the classes (default `"class k"`).
    - `cmap`: colour map for depth, and for over ten tokens or samples (default `"viridis"`).
    - `title`, `legend`: the axes title (default: a description of the block); whether to draw the legend.
    - `ax`: a matplotlib `Axes` to draw into (3-D for a 3-D picture); default a new figure.

    **Returns:** the `matplotlib.figure.Figure`.

    **Raises:** `TypeError`/`ValueError` for an unsupported block, an unbatched `x`, labels of the
    wrong length, `tokens` with `x` not `[B, T, D]`, indices out of range, or `dims`/`color_by` out of range.

    **Example:**

    ```python
    x = torch.randn(64, 2)
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2, hidden=32), solver="euler", steps=8)
    fig = odenet.plotting.plot_trajectories(block, x, labels=(x.norm(dim=1) > 1).long())
    block8 = odenet.ODEBlock(odenet.MLPDynamics(dim=8))       # states [batch, tokens, dim]
    fig = odenet.plotting.plot_trajectories(block8, torch.randn(4, 6, 8), samples=[0], tokens="all")
    ```
    """
    lab, color_by, sel = _trajectory_args(x, n_points, dims, labels, color_by, samples, tokens)
    (c_depth, c_states), disc, segs, disc_names = _trajectory_data(block, x, n_points, reference_solver, rtol, atol)
    c_states, disc = _select(c_states, sel), (disc[0], _select(disc[1], sel)) if disc is not None else None
    C, Dd, axis_labels, depth_axis = _trajectory_coords(c_depth, c_states, disc, dims, depth_axis)
    k = C.shape[-1]
    size = (6.4, 5.6) if k == 3 else ((7.0, 4.2) if k == 2 and depth_axis else (5.8, 5.2))
    fig, ax = _new_axes(ax, size, "3d" if k == 3 else None)
    norm = _depth_norm(c_depth)
    colours, named, bar = _line_colours(color_by, lab, sel, C.shape[1], class_names, cmap)
    _draw_curves(ax, C, c_depth, colours, cmap, norm, discrete=Dd is not None)
    _draw_states(ax, C, Dd, c_depth, disc[0] if disc is not None else None, colours, cmap, norm)
    _finish_trajectory_axes(ax, C, Dd, axis_labels, depth_axis)
    if colours is None or bar is not None:
        _colour_bar(fig, ax, *(bar or (norm, "depth $t$")), cmap, pad=0.08 if k == 3 else 0.02)
    ax.set_title(title if title is not None else _trajectory_title(Dd, disc_names, segs), fontsize=10)
    if legend:
        _trajectory_legend(ax, named, Dd is not None, reference_solver)
    return fig


# ---------------------------------------------------------------------------- vector field


def _dtype_device(f, dtype, device):
    """The grid's dtype and device: as given, else those of `f`'s first parameter, else the defaults."""
    if dtype is None or device is None:
        p = next(f.parameters(), None) if isinstance(f, nn.Module) else None
        if dtype is None:
            dtype = p.dtype if p is not None and p.is_floating_point() else torch.get_default_dtype()
        if device is None:
            device = p.device if p is not None else torch.device("cpu")
    return dtype, device


def _check_range(name: str, r) -> Tuple[float, float]:
    """`r` as a finite `(low, high)` pair with `low < high`."""
    try:
        a, b = (float(v) for v in r)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (low, high) of numbers, got {r!r}.") from None
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ValueError(f"{name} must be (low, high) with low < high, got {r!r}.")
    return a, b


def _field_args(f, n, style: str, t) -> List[float]:
    """Check plot_vector_field's inputs; return the times."""
    if not callable(f):
        raise TypeError(f"f must be callable as f(t, x), got {type(f).__name__}.")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise ValueError(f"n (grid points per axis) must be an integer >= 2, got {n!r}.")
    if style not in ("stream", "quiver"):
        raise ValueError(f"style must be 'stream' or 'quiver', got {style!r}.")
    times = [t] if isinstance(t, numbers.Real) or (isinstance(t, Tensor) and t.dim() == 0) else list(t)
    try:
        times = [float(v) for v in times]
    except (TypeError, ValueError):
        raise TypeError(f"t must be a number or a sequence of numbers, got {t!r}.") from None
    if not times:
        raise ValueError("t is empty; give at least one time.")
    return times


@dataclasses.dataclass
class _Plane:
    """The plane of the state space that a vector field plot shows: plot point `u` is the state
    `origin + u @ basis`, or for a slice (`coords`) the state `origin` with those two entries set to `u`."""

    origin: np.ndarray  # [D]
    basis: np.ndarray  # [2, D]
    coords: Optional[Tuple[int, int]]
    labels: Tuple[str, str]

    def states(self, u: np.ndarray) -> np.ndarray:
        """Plot points [N, 2] as states [N, D]."""
        if self.coords is None:
            return self.origin + u @ self.basis
        x = np.repeat(self.origin[None], len(u), 0)
        x[:, list(self.coords)] = u
        return x

    def field(self, v: np.ndarray) -> np.ndarray:
        """Vectors [..., D] in plot coordinates [..., 2]: the slice's two entries, or the orthogonal
        projection on the basis' span written in the basis, `(B Bᵀ)⁻¹ B v`."""
        if self.coords is not None:
            return v[..., list(self.coords)]
        return v @ np.linalg.solve(self.basis @ self.basis.T, self.basis).T

    def where(self, x: np.ndarray) -> np.ndarray:
        """States [..., D] in plot coordinates [..., 2]."""
        return self.field(x if self.coords is not None else x - self.origin)


def _check_coords(coords, D: int) -> Tuple[int, int]:
    """`coords` as two different coordinate indices of a D-dimensional state (default `(0, 1)`)."""
    if coords is None:
        return 0, 1
    try:
        i, j = (operator.index(c) for c in coords)
    except (TypeError, ValueError):
        raise TypeError(f"coords must be two coordinate indices (i, j), got {coords!r}.") from None
    if not (0 <= i < D and 0 <= j < D) or i == j:
        raise ValueError(f"coords must be two different indices in 0..{D - 1} (the state has {D} dimensions), "
                         f"got {coords!r}.")
    return i, j


def _plane(coords, base, basis, traj: Optional[np.ndarray]) -> _Plane:
    """The plane drawn: the slice along `coords` through `base`, or the span of `basis` (`[2, D]`, or
    `"pca"` of the trajectories) through `base`; the state dimension D comes from them (default 2)."""
    pca = isinstance(basis, str)
    if pca and (basis != "pca" or traj is None):
        raise ValueError(f"basis={basis!r}: give a [2, D] basis, or 'pca' with trajectories= (the states whose "
                         "first two principal components span the plane).")
    B = None if basis is None or pca else _numpy(basis)
    p = None if base is None else _numpy(base)
    if p is not None and p.ndim != 1:
        raise ValueError(f"base must be one state, shape [D], got shape {p.shape}.")
    D = next(a.shape[-1] for a in (p, B, traj, np.zeros(2)) if a is not None)
    if (B is not None and B.shape != (2, D)) or (traj is not None and traj.shape[-1] != D) or D < 2:
        shapes = {k: v.shape for k, v in (("base", p), ("basis", B), ("trajectories", traj)) if v is not None}
        raise ValueError(f"the state dimension D >= 2 must agree: base [D], basis [2, D], trajectories [..., D]; "
                         f"got shapes {shapes}.")
    origin = np.zeros(D) if p is None else p
    if basis is None:
        i, j = _check_coords(coords, D)
        return _Plane(origin, np.eye(D)[[i, j]], (i, j), (f"$x_{{{i + 1}}}$", f"$x_{{{j + 1}}}$"))
    if coords is not None:
        raise ValueError("coords= chooses a slice, basis= a projection; pass one of them.")
    if not pca:
        if np.linalg.matrix_rank(B) < 2:
            raise ValueError(f"the two rows of basis must be linearly independent to span a plane, got {B.tolist()}.")
        return _Plane(origin, B, None, ("$u_1$", "$u_2$"))
    flat = traj.reshape(-1, D)
    flat = flat[np.isfinite(flat).all(1)]
    if len(flat) < 2:
        raise ValueError("basis='pca' needs at least two finite states in trajectories=.")
    mean, comps, var = _pca(flat, 2)
    labels = tuple(f"PC{k + 1} ({100 * var[k]:.0f}% var.)" for k in range(2))
    return _Plane(mean if p is None else origin, comps, None, labels)


def _field_limits(xlim, ylim, fit: Optional[np.ndarray]):
    """The checked plot ranges: as given, else `(-2, 2)`, or (with `fit`, points [..., 2]) their padded range."""
    default = [(-2.0, 2.0)] * 2
    pts = fit.reshape(-1, 2)[np.isfinite(fit.reshape(-1, 2)).all(1)] if fit is not None else np.zeros((0, 2))
    if len(pts):
        lo, hi = pts.min(0), pts.max(0)
        pad = 0.1 * np.maximum(hi - lo, 1e-3)
        default = [(lo[k] - pad[k], hi[k] + pad[k]) for k in range(2)]
    return (_check_range("xlim", default[0] if xlim is None else xlim),
            _check_range("ylim", default[1] if ylim is None else ylim))


def _field_on_grid(f, times: List[float], xr, yr, n: int, dtype, device, plane: _Plane):
    """The plane's n × n grid `xs`, `ys` over the ranges `xr`, `yr`, and `f(t, ·)` there at each time, in plot
    coordinates, as `(U, V)` arrays [n, n]."""
    xs, ys = np.linspace(*xr, n), np.linspace(*yr, n)
    X, Y = np.meshgrid(xs, ys)
    grid = torch.tensor(plane.states(np.stack([X.ravel(), Y.ravel()], 1)), dtype=dtype, device=device)
    D, fields = grid.shape[1], []
    with torch.no_grad():
        for tv in times:
            try:
                out = f(torch.full((), tv, dtype=dtype, device=device), grid)
            except (RuntimeError, ValueError) as err:  # e.g. torch's shape error for a D-dimensional f
                raise ValueError(
                    f"f failed on a batch of {D}-D states {tuple(grid.shape)}: {err}. If f acts on states of another "
                    "dimension D, say which plane to draw: base= (a state [D]; the slice through it along coords=) "
                    "or basis= ([2, D], or 'pca' with trajectories=)."
                ) from err
            if not isinstance(out, Tensor) or out.shape != grid.shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"f must map a batch of states [N, {D}] to [N, {D}] (the dynamics of a {D}-D state), got {got} "
                    f"for input {tuple(grid.shape)}. For states of another dimension give base= or basis=."
                )
            v = plane.field(_numpy(out))
            fields.append((v[:, 0].reshape(X.shape), v[:, 1].reshape(X.shape)))
    return xs, ys, fields


def _field_axes(ax, K: int):
    """`(figure, axes)`: K panels side by side in a new figure, or the given Axes, one per time."""
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4.2 * K + 0.8, 4.2), layout="constrained")
        return fig, [fig.add_subplot(1, K, i + 1) for i in range(K)]
    axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
    axes = list(np.asarray(axes, dtype=object).ravel())
    if len(axes) != K:
        raise ValueError(f"got {len(axes)} axes for {K} times; give one Axes per time in t.")
    fig, _ = _new_axes(axes[0], (5, 5))
    for a in axes[1:]:
        _new_axes(a, (5, 5))
    return fig, axes


def _overlay(trajectories) -> Optional[np.ndarray]:
    """The trajectories to overlay as [M, B, D] (from [M, D] or [M, B, D]), or None."""
    if trajectories is None:
        return None
    traj = _numpy(trajectories)
    if traj.ndim == 2:
        traj = traj[:, None, :]
    if traj.ndim != 3:
        raise ValueError(f"trajectories must have shape [M, D] or [M, B, D], got {traj.shape}.")
    return traj


def _draw_field(a, xs: np.ndarray, ys: np.ndarray, U: np.ndarray, V: np.ndarray, style: str, cmap, norm):
    """Draw one field as streamlines or unit arrows coloured by speed; return the colour mappable."""
    S = np.hypot(U, V)
    if style == "stream":
        sp = a.streamplot(xs, ys, U, V, color=S, cmap=cmap, norm=norm, density=1.1, linewidth=1.0, arrowsize=0.9)
        return sp.lines
    X, Y = np.meshgrid(xs, ys)
    scale = np.where(S > 0, S, 1.0)
    return a.quiver(X, Y, U / scale, V / scale, S, cmap=cmap, norm=norm, pivot="mid",
                    scale=len(xs) * 1.3, width=0.004, headwidth=3.5)


def _draw_paths(a, traj: np.ndarray) -> None:
    """Overlay trajectories [M, B, 2]: red lines on a white halo, their starts as circles."""
    for b in range(traj.shape[1]):
        a.plot(traj[:, b, 0], traj[:, b, 1], color="white", lw=3.0, alpha=0.9, zorder=4)
        a.plot(traj[:, b, 0], traj[:, b, 1], color="#d62728", lw=1.4, zorder=5)
    a.scatter(traj[0, :, 0], traj[0, :, 1], s=18, c="white", edgecolors="#d62728", zorder=6)


def _speed_norm(fields):
    """One colour scale from 0 to the largest speed over all times' `(U, V)`."""
    from matplotlib.colors import Normalize

    speed_max = max(float(np.nanmax(np.hypot(u, w))) for u, w in fields)
    return Normalize(vmin=0.0, vmax=speed_max if speed_max > 0 else 1.0)


def _field_panel(a, xr, yr, labels, title: str) -> None:
    """Limits, equal aspect, axis labels, title and open spines of one vector field panel."""
    a.set_xlim(*xr)
    a.set_ylim(*yr)
    a.set_aspect("equal")
    a.set_xlabel(labels[0])
    a.set_ylabel(labels[1])
    a.set_title(title, fontsize=10)
    for side in ("top", "right"):
        a.spines[side].set_visible(False)


def plot_vector_field(
    f,
    *,
    xlim: Optional[Tuple[float, float]] = None,
    ylim: Optional[Tuple[float, float]] = None,
    t: Union[float, Sequence[float]] = 0.0,
    n: int = 25,
    style: str = "stream",
    trajectories=None,
    coords: Optional[Tuple[int, int]] = None,
    base=None,
    basis=None,
    cmap: str = "viridis",
    dtype: Optional[torch.dtype] = None,
    device=None,
    colorbar: bool = True,
    title: Optional[str] = None,
    ax=None,
):
    """Draw a dynamics `dx/dt = f(t, x)` on a 2-D grid, at one time or at several ("slider") times.

    Streamlines or arrows are coloured by speed, on one colour scale for all times. States of D > 2
    dimensions are drawn on a **slice** (coordinates `coords` vary, the others stay at `base`; arrows are
    those two components of `f`) or a **projection** (the span of `basis` through `base`; `f` projected on it).

    **Arguments:**

    - `f`: a callable `f(t, x)` (e.g. an `nn.Module`) mapping `t` (0-dim tensor) and `[N, D]` to `[N, D]`.
    - `xlim`, `ylim`: the plotted ranges (default `(-2, 2)`; with `basis="pca"`, the trajectories' range).
    - `t`: the time, or a sequence of times: one panel per time, side by side.
    - `n`: grid points per axis (default 25).
    - `style`: `"stream"` (streamlines, default) or `"quiver"` (unit arrows).
    - `trajectories`: optional states to overlay, `[M, D]` or `[M, B, D]` (tensor or array),
      e.g. `block.trajectory(x, t)`; drawn in the plane's coordinates.
    - `coords`: the two coordinates `(i, j)` of a slice (default `(0, 1)`).
    - `base`: the state `[D]` the plane passes through (default zeros; with `basis="pca"` the trajectories' mean).
    - `basis`: a projection instead of a slice: a `[2, D]` tensor/array whose rows span the
      plane (plot coordinates along them), or `"pca"`, the first two principal components of `trajectories`.
    - `cmap`: colour map of the speed (default `"viridis"`).
    - `dtype`, `device`: of the grid passed to `f` (default: those of `f`'s parameters).
    - `colorbar`: draw the speed colour bar (default `True`).
    - `title`: axes title (default `"t = <time>"`; with several times, a prefix to it).
    - `ax`: an `Axes`, or a sequence of one `Axes` per time; default a new figure.

    **Returns:** the `matplotlib.figure.Figure`.

    **Raises:** `TypeError`/`ValueError` for a non-callable `f`, an `f` that fails on or does not return
    `[N, D]` (D = 2 unless `base`, `basis` or `trajectories` say otherwise), bad ranges, `coords` or
    `basis`, shapes that disagree on D, or a number of axes that does not match the times.

    **Example:**

    ```python
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    fig = odenet.plotting.plot_vector_field(lambda t, y: (y**3) @ A.T, xlim=(-2, 2), ylim=(-2, 2))
    f = odenet.MLPDynamics(dim=2, hidden=16)                          # time-dependent
    fig = odenet.plotting.plot_vector_field(f, t=[0.0, 0.5, 1.0])     # three panels
    f8 = odenet.MLPDynamics(dim=8)
    fig = odenet.plotting.plot_vector_field(f8, coords=(0, 3), base=torch.zeros(8))     # a slice
    paths = odenet.ODEBlock(f8).trajectory(torch.randn(16, 8), torch.linspace(0, 1, 20))
    fig = odenet.plotting.plot_vector_field(f8, basis="pca", trajectories=paths.detach())
    ```
    """
    times = _field_args(f, n, style, t)
    traj = _overlay(trajectories)
    plane = _plane(coords, base, basis, traj)
    traj = plane.where(traj) if traj is not None else None
    xr, yr = _field_limits(xlim, ylim, traj if isinstance(basis, str) else None)
    xs, ys, fields = _field_on_grid(f, times, xr, yr, n, *_dtype_device(f, dtype, device), plane)
    norm = _speed_norm(fields)
    fig, axes = _field_axes(ax, len(times))
    for a, tv, (U, V) in zip(axes, times, fields):
        mappable = _draw_field(a, xs, ys, U, V, style, cmap, norm)
        if traj is not None:
            _draw_paths(a, traj)
        _field_panel(a, xr, yr, plane.labels, f"{title + ', ' if title else ''}$t = {tv:g}$")
    if colorbar:  # a projected field's speed is the length of its arrows, in the plane
        fig.colorbar(mappable, ax=axes, shrink=0.85, label="speed in the plane" if plane.basis.shape[1] > 2 else
                     "speed $\\|f(t, x)\\|$")
    return fig


# ---------------------------------------------------------------------------- step sizes


def _block_steps(block: ODEBlock):
    """The steps an ODEBlock kept of its last forward solve (`last_steps`)."""
    steps = getattr(block, "last_steps", None)
    if block.last_stats is None:
        raise ValueError("This ODEBlock has not run yet, so it kept no steps: call block(x) first (or plot "
                         "block.solve(x), a Solution).")
    if steps is None:
        raise ValueError("This ODEBlock kept no step log of its last solve; plot block.solve(x), a Solution.")
    return steps


def _steps_of(solution) -> List[Tuple[float, float, bool]]:
    """The steps of a Solution or an ODEBlock's last solve, or a sequence of them, as checked `(t, h, accepted)`."""
    steps = getattr(solution, "steps", solution)
    if isinstance(solution, nn.Module):  # an ODEBlock's log of its last solve; no other module keeps one
        steps = _block_steps(solution) if isinstance(solution, ODEBlock) else None
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
        raise TypeError(
            "plot_step_sizes needs an odenet.Solution (with .steps), an odenet.ODEBlock that has run, or a sequence "
            f"of (t, h, accepted) tuples, got {type(solution).__name__}."
        )
    out = []
    for i, s in enumerate(steps):
        try:
            t, h, acc = s
            t, h = float(t), float(h)
        except (TypeError, ValueError):
            raise TypeError(f"step {i} must be (t, h, accepted), got {s!r}.") from None
        if not (math.isfinite(t) and math.isfinite(h)):
            raise ValueError(f"step {i} has a non-finite time or step size: {s!r}.")
        out.append((t, h, bool(acc)))
    if not out:
        raise ValueError(
            "No steps to plot: the solve recorded none. The torchdiffeq backend records no steps (use "
            "backend='odenet'), and a per-sample solve (Adaptive(per_sample=True)) has no shared steps (its "
            "stats.n_accepted_per_sample counts each sample's; solve one sample alone to plot its steps). Or pass "
            "(t, h, accepted) tuples."
        )
    return out


def plot_step_sizes(solution, *, log: bool = True, title: Optional[str] = None, ax=None):
    """Draw the steps of one solve: each accepted step as a bar over the interval it covers at
    the height of its size, and each rejected attempt as a cross at its start time and size.

    **Arguments:**

    - `solution`: an `odenet.Solution` (its `steps`, a list of `StepInfo(t, h, accepted)`), an
      `odenet.ODEBlock` after a forward (the steps of its last solve, `block.last_steps`), or any
      sequence of `(t, h, accepted)`: start time, signed step size, whether accepted.
    - `log`: logarithmic step-size axis (default `True`).
    - `title`: axes title (default: the counts of accepted and rejected steps).
    - `ax`: a matplotlib `Axes` to draw into; default a new figure.

    **Returns:** the `matplotlib.figure.Figure`.

    **Raises:** `TypeError`/`ValueError` when there are no steps (a block that has not run yet,
    the torchdiffeq backend) or they are malformed.

    **Example:**

    ```python
    sol = odenet.odeint(lambda t, y: torch.cos(5 * t) * y, torch.ones(2, dtype=torch.float64),
                        [0.0, 10.0], solver="dopri5", rtol=1e-6, atol=1e-8)
    fig = odenet.plotting.plot_step_sizes(sol)       # sol.steps: StepInfo(t, h, accepted)
    fig = odenet.plotting.plot_step_sizes([(0.0, 0.5, True), (0.5, 1.0, False), (0.5, 0.4, True)])
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2), rtol=1e-6, atol=1e-6)
    block(torch.randn(8, 2))
    fig = odenet.plotting.plot_step_sizes(block)     # the steps of its last forward
    ```
    """
    steps = _steps_of(solution)
    fig, ax = _new_axes(ax, (7.0, 3.6))
    acc = [(t, h) for t, h, a in steps if a]
    rej = [(t, h) for t, h, a in steps if not a]
    if acc:
        t0 = np.array([min(t, t + h) for t, h in acc])
        t1 = np.array([max(t, t + h) for t, h in acc])
        hs = np.array([abs(h) for _, h in acc])
        ax.hlines(hs, t0, t1, colors="#1f77b4", linewidth=2.2, label=f"accepted ({len(acc)})", zorder=3)
        ax.plot(np.column_stack([t0, t1]).ravel(), np.repeat(hs, 2), color="#1f77b4", lw=0.6, alpha=0.5, zorder=2)
        starts = np.array([t for t, _ in acc])
        ax.scatter(starts, hs, s=10, color="#1f77b4", zorder=4)
    if rej:
        ax.scatter([t for t, _ in rej], [abs(h) for _, h in rej], marker="x", s=36, color="#d62728",
                   linewidths=1.4, label=f"rejected ({len(rej)})", zorder=5)
    if log and any(abs(h) > 0 for _, h, _ in steps):
        ax.set_yscale("log")
    ax.set_xlabel("$t$")
    ax.set_ylabel("step size $|h|$")
    ax.set_title(title if title is not None else f"{len(acc)} accepted, {len(rej)} rejected steps", fontsize=10)
    _style(ax)
    ax.legend(fontsize=8, framealpha=0.85)
    return fig


# ---------------------------------------------------------------------------- NFE over training

_NFE_KEYS = ("nfe_forward", "nfe_backward", "nfe")
_NFE_NAMES = {"nfe_forward": "forward", "nfe_backward": "backward", "nfe": "total"}
_NFE_STYLE = {"nfe_forward": "-", "nfe_backward": "--", "nfe": ":"}


def _columns(history) -> Dict[str, List[float]]:
    """The history as columns `{key: [value per iteration]}`, None where an iteration lacks the key."""
    if isinstance(history, Mapping):
        return {str(k): list(v) for k, v in history.items() if hasattr(v, "__len__") and not isinstance(v, str)}
    if isinstance(history, (str, bytes)) or not hasattr(history, "__iter__"):
        raise TypeError(
            "history must be a dict of lists, a list of dicts, or a list of odenet.SolveStats, "
            f"got {type(history).__name__}."
        )
    rows = list(history)
    if not rows:
        raise ValueError("history is empty; record at least one iteration.")
    if all(isinstance(r, numbers.Real) for r in rows):
        return {"nfe": [float(r) for r in rows]}
    cols: Dict[str, List[Any]] = {}
    for i, r in enumerate(rows):
        if isinstance(r, SolveStats):
            r = r.as_dict()
        if not isinstance(r, Mapping):
            raise TypeError(f"history entry {i} must be a dict or an odenet.SolveStats, got {type(r).__name__}.")
        for k, v in r.items():
            cols.setdefault(str(k), [None] * i).append(v)
        for k in cols:
            if len(cols[k]) < i + 1:
                cols[k].append(None)
    return cols


def _floats(values) -> np.ndarray:
    """A history column as a float array, NaN for None."""
    return np.array([np.nan if v is None else float(v) for v in values])


def _nfe_keys(cols: Dict[str, List[Any]], keys) -> List[str]:
    """The series to draw: the given `keys`, all in the history, or else the NFE series it has."""
    if keys is not None:
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in cols]
        if missing:
            raise ValueError(f"keys {missing} are not in history (it has {sorted(cols)}).")
        return keys
    keys = []
    for k in _NFE_KEYS:
        if k in cols:
            vals = _floats(cols[k])
            if k == "nfe_backward" and not np.nan_to_num(vals).any():
                continue
            if k == "nfe" and "nfe_forward" in cols and "nfe_backward" not in keys:
                continue  # total equals forward when there is no backward series
            keys.append(k)
    if not keys:
        raise ValueError(
            f"history has none of the keys {_NFE_KEYS}; it has {sorted(cols)}. Record "
            "block.last_stats.as_dict() each iteration, or name the series with keys=."
        )
    return keys


def _moving_average(y: np.ndarray, w: int) -> np.ndarray:
    """Trailing moving average of `y` over windows of `w`, skipping NaNs."""
    out = np.full_like(y, np.nan)
    valid = np.isfinite(y)
    c = np.convolve(np.where(valid, y, 0.0), np.ones(w), mode="full")[: len(y)]
    n = np.convolve(valid.astype(float), np.ones(w), mode="full")[: len(y)]
    np.divide(c, n, out=out, where=n > 0)
    return out


def plot_nfe_over_training(
    history,
    *,
    keys: Optional[Sequence[str]] = None,
    x: Optional[str] = None,
    label: Optional[str] = None,
    smooth: Optional[int] = None,
    color: Optional[str] = None,
    log: bool = False,
    ax=None,
):
    """Draw the number of function evaluations per training iteration (forward, backward, total).

    **Arguments:**

    - `history`: one entry per iteration, as a list of dicts (e.g. `block.last_stats.as_dict()`
      plus an `"iteration"`), a list of `odenet.SolveStats`, a dict of lists, or a list of numbers.
    - `keys`: which series to draw (default: those of `"nfe_forward"`, `"nfe_backward"`,
      `"nfe"` present; an all-zero backward series, as with `gradient="direct"`, is skipped).
    - `x`: the key of the x-axis (default: `"iteration"`, `"step"` or `"epoch"` if present, else
      the entry index).
    - `label`: a name for this run, prefixed to the legend entries (call again with the same
      `ax` to compare runs).
    - `smooth`: window of a trailing moving average drawn over the raw (faint) values.
    - `color`: one colour for all series of this run (default: the axes' colour cycle).
    - `log`: logarithmic NFE axis.
    - `ax`: a matplotlib `Axes` to draw into; default a new figure.

    **Returns:** the `matplotlib.figure.Figure`.

    **Raises:** `TypeError`/`ValueError` for an empty or malformed history, unknown keys, or
    a bad `smooth`.

    **Example:**

    ```python
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2, hidden=16), gradient="adjoint")
    optimiser = torch.optim.Adam(block.parameters(), lr=1e-2)
    history = []
    for it in range(20):
        optimiser.zero_grad()
        block(torch.randn(32, 2)).pow(2).mean().backward()
        optimiser.step()
        history.append({"iteration": it, **block.last_stats.as_dict()})  # after backward()
    fig = odenet.plotting.plot_nfe_over_training(history, smooth=5)
    ```
    """
    cols = _columns(history)
    if smooth is not None and (isinstance(smooth, bool) or not isinstance(smooth, numbers.Integral) or smooth < 1):
        raise ValueError(f"smooth must be a window length >= 1 (or None), got {smooth!r}.")
    keys = _nfe_keys(cols, keys)
    if x is None:
        x = next((k for k in ("iteration", "step", "epoch") if k in cols), None)
    elif x not in cols:
        raise ValueError(f"x={x!r} is not a key of history (it has {sorted(cols)}).")
    xs = np.array([float(v) for v in cols[x]]) if x is not None else np.arange(len(cols[keys[0]]), dtype=float)

    fig, ax = _new_axes(ax, (7.0, 3.8))
    for k in keys:
        ys = _floats(cols[k])
        ls = _NFE_STYLE.get(k, "-")
        name = _NFE_NAMES.get(k, k)
        lab = f"{label}: {name}" if label else name
        if smooth and smooth > 1:
            (raw,) = ax.plot(xs, ys, color=color, lw=0.7, alpha=0.3, ls=ls)
            ax.plot(xs, _moving_average(ys, smooth), color=raw.get_color(), lw=1.8, ls=ls, label=lab)
        else:
            ax.plot(xs, ys, color=color, lw=1.5, ls=ls, label=lab)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(x or "iteration")
    ax.set_ylabel("function evaluations (NFE)")
    ax.set_title("NFE over training", fontsize=10)
    _style(ax)
    ax.legend(fontsize=8, framealpha=0.85)
    return fig


# ---------------------------------------------------------------------------- Pareto

_AXIS_NAMES = {
    "nfe": "function evaluations (NFE)",
    "nfe_forward": "forward NFE",
    "memory": "activation memory (bytes)",
    "accuracy": "accuracy",
    "time": "time (s)",
}
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]


def _rows(results) -> List[Dict[str, Any]]:
    """The results as a list of metric dicts; `{label: dict or [dicts]}` gets the label as `"label"`."""
    if isinstance(results, Mapping):  # {label: {metrics}} or {label: [{metrics}, ...]}
        rows = []
        for name, v in results.items():
            for r in (v if isinstance(v, (list, tuple)) else [v]):
                if not isinstance(r, Mapping):
                    raise TypeError(f"results[{name!r}] must be a dict of metrics (or a list of them), got {type(r).__name__}.")
                rows.append({"label": str(name), **r})
        return rows
    if isinstance(results, (str, bytes)) or not hasattr(results, "__iter__"):
        raise TypeError(f"results must be a list of dicts or a dict of dicts, got {type(results).__name__}.")
    rows = list(results)
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise TypeError(f"results[{i}] must be a dict of metrics, got {type(r).__name__}.")
    return [dict(r) for r in rows]


def _metrics(rows: List[Dict[str, Any]], x: str, y: str) -> Tuple[np.ndarray, np.ndarray]:
    """The rows' `x` and `y` values as float arrays; every row must hold both as numbers."""
    if not rows:
        raise ValueError("results is empty; give at least one result.")
    for i, r in enumerate(rows):
        for key in (x, y):
            if key not in r:
                raise ValueError(f"result {i} has no {key!r} (it has {sorted(r)}); pass x=/y= to choose the keys.")
            if isinstance(r[key], bool) or not isinstance(r[key], numbers.Real):
                raise TypeError(f"result {i}: {key!r} must be a number, got {r[key]!r}.")
    return np.array([float(r[x]) for r in rows]), np.array([float(r[y]) for r in rows])


def _pareto_front(xs: np.ndarray, ys: np.ndarray, y_higher: bool) -> np.ndarray:
    """Indices of the points not dominated by another (lower x and better y), ordered by x."""
    order = np.lexsort((-ys if y_higher else ys, xs))
    front, best = [], -np.inf
    for i in order:
        yv = ys[i] if y_higher else -ys[i]
        if yv > best:
            front.append(i)
            best = yv
    return np.array(front, dtype=int)


def _error_bars(rows: List[Dict[str, Any]], order: np.ndarray, key: str) -> Optional[List[float]]:
    """The rows' `"<key>_std"` (0 where absent) in `order`, or None when all are 0."""
    err = [float(rows[i].get(f"{key}_std", 0.0) or 0.0) for i in order]
    return err if any(err) else None


def _annotate(ax, rows: List[Dict[str, Any]], order: np.ndarray, xs: np.ndarray, ys: np.ndarray, key: str) -> None:
    """Write each row's `key` value (where it has one) next to its point."""
    for i in order:
        if key in rows[i]:
            v = rows[i][key]
            ax.annotate(f"{v:g}" if isinstance(v, float) else str(v), (xs[i], ys[i]), xytext=(5, 4),
                        textcoords="offset points", fontsize=7, color="0.3")


def plot_pareto(
    results,
    *,
    x: str = "nfe",
    y: str = "accuracy",
    label: str = "label",
    y_higher_is_better: bool = True,
    logx: bool = False,
    logy: bool = False,
    annotate: Optional[str] = None,
    front: bool = True,
    connect: bool = True,
    ax=None,
):
    """Draw accuracy (or any quality) against a cost (NFE, memory, time) and the Pareto front.

    Points of the same `label` share a colour and marker. Error bars are drawn where a row has
    `"<x>_std"` or `"<y>_std"`. The front joins the points no other point beats on both axes
    (lower cost and better quality).

    **Arguments:**

    - `results`: a list of dicts, each with the keys `x`, `y` and optionally `label` (e.g.
      `{"label": "dopri5", "tol": 1e-3, "nfe": 26, "accuracy": 0.97}`), or a dict
      `{label: dict}` / `{label: [dict, ...]}`.
    - `x`, `y`: the keys plotted (default `"nfe"` and `"accuracy"`; `"memory"` for memory).
    - `label`: the key that groups points (default `"label"`).
    - `y_higher_is_better`: direction of `y` for the front (default `True`).
    - `logx`, `logy`: logarithmic axes.
    - `annotate`: a key whose value is written next to each point (e.g. `"tol"`).
    - `front`: draw the Pareto front (default `True`).
    - `connect`: join the points of one label in order of cost, as for a tolerance sweep
      (default `True`; `False` for repeats such as seeds).
    - `ax`: a matplotlib `Axes` to draw into; default a new figure.

    **Returns:** the `matplotlib.figure.Figure`.

    **Raises:** `TypeError`/`ValueError` for empty or malformed results or missing keys.

    **Example:**

    ```python
    results = [{"label": "dopri5", "nfe": 26, "accuracy": 0.97},
               {"label": "euler", "nfe": 10, "accuracy": 0.95}]
    fig = odenet.plotting.plot_pareto(results, x="nfe", y="accuracy")
    ```
    """
    rows = _rows(results)
    xs, ys = _metrics(rows, x, y)
    groups: Dict[str, List[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(str(r.get(label, "")), []).append(i)

    fig, ax = _new_axes(ax, (6.0, 4.4))
    if front and len(rows) > 1:
        idx = _pareto_front(xs, ys, y_higher_is_better)
        ax.step(xs[idx], ys[idx], where="post", color="0.55", lw=1.2, ls="--", zorder=2, label="Pareto front")
        ax.scatter(xs[idx], ys[idx], s=160, facecolors="none", edgecolors="0.55", linewidths=1.0, zorder=2)
    for j, (name, idx) in enumerate(groups.items()):
        order = np.array(idx)[np.argsort(xs[idx])]
        ax.errorbar(xs[order], ys[order], xerr=_error_bars(rows, order, x), yerr=_error_bars(rows, order, y),
                    fmt=_MARKERS[j % len(_MARKERS)], color=_PALETTE[j % len(_PALETTE)], ms=7, mec="0.15", mew=0.6,
                    ls="-" if connect else "none", lw=1.0, alpha=0.95, capsize=3, elinewidth=0.8, zorder=3,
                    label=name or None)
        if annotate:
            _annotate(ax, rows, order, xs, ys, annotate)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(_AXIS_NAMES.get(x, x))
    ax.set_ylabel(_AXIS_NAMES.get(y, y))
    better = "up and to the left" if y_higher_is_better else "down and to the left"
    ax.set_title(f"{_AXIS_NAMES.get(y, y)} against cost (better: {better})", fontsize=10)
    _style(ax)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, framealpha=0.85)
    return fig
