"""odenet.plotting: every function renders headless to a non-blank PNG, into a new figure or a given Axes."""

import io
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

import odenet  # noqa: E402
from odenet import plotting  # noqa: E402
from odenet.plotting import _trajectory_data  # noqa: E402

A_SPIRAL = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


def render(fig) -> np.ndarray:
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    buf.seek(0)
    return mpimg.imread(buf, format="png")


def assert_not_blank(img: np.ndarray):
    rgb = img[..., :3]
    colours = np.unique((rgb * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert rgb.std() > 0.02, "image is (nearly) uniform"
    assert len(colours) > 20, f"only {len(colours)} distinct colours"
    non_white = (rgb < 0.95).any(-1).mean()
    assert non_white > 0.01, "almost nothing drawn"


@pytest.fixture
def f2():
    torch.manual_seed(0)
    return odenet.MLPDynamics(dim=2, hidden=16)


@pytest.fixture
def data2():
    torch.manual_seed(1)
    x = torch.randn(24, 2)
    return x, (x.norm(dim=1) > 1).long()


def test_trajectories_continuous_block(f2, data2):
    x, y = data2
    assert_not_blank(render(plotting.plot_trajectories(odenet.ODEBlock(f2), x, labels=y)))
    assert_not_blank(render(plotting.plot_trajectories(odenet.ODEBlock(f2), x)))  # coloured by depth


def test_trajectories_discrete_blocks(f2, data2):
    x, y = data2
    assert_not_blank(render(plotting.plot_trajectories(odenet.ODEBlock(f2, solver="euler", steps=6), x, labels=y)))
    stack = nn.Sequential(*[odenet.ResBlock(f2, h=0.25, t=0.25 * i) for i in range(4)])
    assert_not_blank(render(plotting.plot_trajectories(stack, x, labels=y, depth_axis=True)))  # 3-D
    assert_not_blank(render(plotting.plot_trajectories(odenet.ResBlock(f2, h=0.5), x, color_by="depth")))


def test_trajectories_pca_and_one_dimensional():
    torch.manual_seed(0)
    f5 = odenet.MLPDynamics(dim=5, hidden=16)
    x = torch.randn(20, 5)
    assert_not_blank(render(plotting.plot_trajectories(odenet.ODEBlock(f5, solver="rk4", steps=4), x, labels=torch.arange(20) % 3)))
    assert_not_blank(render(plotting.plot_trajectories(odenet.ODEBlock(f5), x, dims=3)))
    f1 = odenet.MLPDynamics(dim=1, hidden=8)
    x1 = torch.linspace(-2, 2, 15)[:, None]
    assert_not_blank(render(plotting.plot_trajectories(odenet.ODEBlock(f1), x1, labels=(x1[:, 0].abs() > 1).long())))


def _assert_drawn_against_depth(fig):
    """One 2-D axes with depth on x (the only one: the other is the colour bar, if any)."""
    ax = fig.axes[0]
    assert getattr(ax, "name", "") != "3d"
    assert ax.get_xlabel() == "depth $t$"
    lo, hi = ax.get_xlim()
    assert lo <= 0.0 and hi >= 1.0  # the block's depth [0, 1] spans the x axis


def test_trajectories_dims_1_of_a_5d_state_against_depth():
    """dims=1 projects on the first principal component and, like a 1-D state, draws it against depth."""
    torch.manual_seed(0)
    f5 = odenet.MLPDynamics(dim=5, hidden=16)
    x = torch.randn(30, 5)
    fig = plotting.plot_trajectories(odenet.ODEBlock(f5), x, dims=1)  # coloured by depth
    _assert_drawn_against_depth(fig)
    assert fig.axes[0].get_ylabel().startswith("PC1")
    assert_not_blank(render(fig))
    fig = plotting.plot_trajectories(odenet.ODEBlock(f5, solver="rk4", steps=4), x, dims=1, labels=torch.arange(30) % 3)
    _assert_drawn_against_depth(fig)
    assert_not_blank(render(fig))


def test_trajectories_dims_1_of_a_2d_state_against_depth(f2, data2):
    x, y = data2
    fig = plotting.plot_trajectories(odenet.ODEBlock(f2), x, dims=1)
    _assert_drawn_against_depth(fig)
    assert_not_blank(render(fig))
    fig = plotting.plot_trajectories(odenet.ODEBlock(f2, solver="euler", steps=6), x, labels=y, dims=1)
    _assert_drawn_against_depth(fig)
    assert_not_blank(render(fig))
    # The same picture as asking for the depth axis explicitly.
    explicit = plotting.plot_trajectories(odenet.ODEBlock(f2), x, dims=1, depth_axis=True)
    assert explicit.axes[0].get_xlabel() == fig.axes[0].get_xlabel()
    assert explicit.axes[0].get_ylabel() == fig.axes[0].get_ylabel()


def test_trajectory_markers_are_the_models_states(f2, data2):
    """The discrete markers are exactly what the model computes; the curve is the accurate ODE of the same f."""
    x, _ = data2
    block = odenet.ODEBlock(f2, solver="euler", steps=5)
    (c_depth, c_states), (d_depth, d_states), _, _ = _trajectory_data(block, x, 50, "dopri5", 1e-6, 1e-6)
    assert d_states.shape[0] == 6 and np.allclose(d_depth, np.linspace(0, 1, 6))
    with torch.no_grad():
        assert torch.equal(d_states[-1], block(x))
        exact = odenet.odeint(f2, x, [0.0, 1.0], rtol=1e-6, atol=1e-6).ys[-1]
    assert torch.allclose(c_states[-1], exact, atol=1e-4)
    assert c_depth[0] == 0.0 and c_depth[-1] == 1.0
    stack = nn.Sequential(*[odenet.ResBlock(f2, h=0.2, t=0.2 * i) for i in range(5)])
    _, (_, s_states), _, _ = _trajectory_data(stack, x, 50, "dopri5", 1e-6, 1e-6)
    with torch.no_grad():
        assert torch.equal(s_states[-1], stack(x))
        assert torch.equal(s_states, d_states)  # N ResBlocks = Euler with N steps, bit for bit


def test_vector_field(f2):
    assert_not_blank(render(plotting.plot_vector_field(lambda t, y: (y**3) @ A_SPIRAL)))
    traj = odenet.ODEBlock(f2).trajectory(torch.randn(3, 2), torch.linspace(0, 1, 20))
    assert_not_blank(render(plotting.plot_vector_field(f2, t=[0.0, 0.5, 1.0], style="quiver", trajectories=traj)))


def test_step_sizes_from_solution_and_tuples():
    sol = odenet.odeint(lambda t, y: torch.cos(5 * t) * 3 * y, torch.ones(2, dtype=torch.float64), [0.0, 3.0],
                        rtol=1e-6, atol=1e-6)
    assert any(not s.accepted for s in sol.steps), "the test problem should reject some steps"
    assert_not_blank(render(plotting.plot_step_sizes(sol)))
    steps = [(0.0, 0.1, True), (0.1, 0.4, False), (0.1, 0.2, True), (0.3, 0.05, True)]
    assert_not_blank(render(plotting.plot_step_sizes(steps, log=False)))


def test_nfe_over_training_inputs():
    rows = [{"iteration": i, "nfe_forward": 20 + i // 7, "nfe_backward": 30 + i // 4} for i in range(60)]
    assert_not_blank(render(plotting.plot_nfe_over_training(rows, smooth=5)))
    cols = {"epoch": list(range(10)), "nfe_forward": [14 + 3 * i for i in range(10)]}
    assert_not_blank(render(plotting.plot_nfe_over_training(cols, log=True)))
    stats = [odenet.SolveStats(nfe_forward=10 + i, nfe_backward=0) for i in range(10)]
    assert_not_blank(render(plotting.plot_nfe_over_training(stats)))


def test_pareto():
    results = [
        {"label": "dopri5", "tol": 1e-3, "nfe": 26, "accuracy": 0.970, "accuracy_std": 0.01},
        {"label": "dopri5", "tol": 1e-5, "nfe": 62, "accuracy": 0.975},
        {"label": "euler", "nfe": 10, "accuracy": 0.95},
        {"label": "euler", "nfe": 20, "accuracy": 0.96},
        {"label": "rk4", "nfe": 40, "accuracy": 0.94},
    ]
    assert_not_blank(render(plotting.plot_pareto(results, annotate="tol")))
    by_name = {"adjoint": {"memory": 1e4, "accuracy": 0.9}, "direct": {"memory": 1e6, "accuracy": 0.91}}
    assert_not_blank(render(plotting.plot_pareto(by_name, x="memory", logx=True, logy=True)))


def test_pareto_front_is_the_non_dominated_set():
    xs = np.array([10.0, 20.0, 26.0, 40.0, 62.0])
    ys = np.array([0.95, 0.96, 0.97, 0.94, 0.975])
    assert plotting._pareto_front(xs, ys, True).tolist() == [0, 1, 2, 4]


def test_every_function_draws_into_a_given_axes(f2, data2):
    x, y = data2
    fig = Figure(figsize=(12, 6))
    axes = [fig.add_subplot(2, 3, i + 1) for i in range(5)]
    sol = odenet.odeint(lambda t, z: -z, torch.ones(2), [0.0, 1.0], rtol=1e-4, atol=1e-4)
    outs = [
        plotting.plot_trajectories(odenet.ODEBlock(f2, solver="rk4", steps=3), x, labels=y, ax=axes[0]),
        plotting.plot_vector_field(f2, ax=axes[1]),
        plotting.plot_step_sizes(sol, ax=axes[2]),
        plotting.plot_nfe_over_training([5, 6, 7, 9], ax=axes[3]),
        plotting.plot_pareto([{"nfe": 3, "accuracy": 0.5}, {"nfe": 5, "accuracy": 0.7}], ax=axes[4]),
    ]
    assert all(o is fig for o in outs)
    assert all(a.has_data() for a in axes)
    assert_not_blank(render(fig))


def test_bad_input_names_the_fix(f2, data2):
    x, y = data2
    block = odenet.ODEBlock(f2)
    with pytest.raises(TypeError, match="ODEBlock"):
        plotting.plot_trajectories(nn.Linear(2, 2), x)
    with pytest.raises(TypeError, match="Augment"):
        plotting.plot_trajectories(nn.Sequential(odenet.Augment(1), block), x)
    with pytest.raises(ValueError, match="batched"):
        plotting.plot_trajectories(block, x[0])
    with pytest.raises(ValueError, match="one label per input"):
        plotting.plot_trajectories(block, x, labels=y[:3])
    with pytest.raises(ValueError, match="labels="):
        plotting.plot_trajectories(block, x, color_by="class")
    with pytest.raises(ValueError, match="3-D"):
        plotting.plot_trajectories(block, x, depth_axis=True, ax=Figure().add_subplot())
    with pytest.raises(TypeError, match="Axes"):
        plotting.plot_trajectories(block, x, ax="left")
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        plotting.plot_vector_field(lambda t, z: z[:, :1])
    with pytest.raises(ValueError, match="low < high"):
        plotting.plot_vector_field(f2, xlim=(1, -1))
    with pytest.raises(ValueError, match="one Axes per time"):
        plotting.plot_vector_field(f2, t=[0, 1], ax=Figure().add_subplot())
    with pytest.raises(ValueError, match="No steps"):
        plotting.plot_step_sizes([])
    with pytest.raises(TypeError, match=r"\(t, h, accepted\)"):
        plotting.plot_step_sizes([(0.0, 0.1)])
    with pytest.raises(ValueError, match="nfe_forward"):
        plotting.plot_nfe_over_training([{"loss": 1.0}])
    with pytest.raises(ValueError, match="'nfe'"):
        plotting.plot_pareto([{"accuracy": 0.5}])


def test_plotting_never_touches_pyplot(tmp_path):
    """Headless by construction: a full round of plots imports no pyplot (so no plt.show, no GUI backend)."""
    code = (
        "import sys, torch, odenet\n"
        "from odenet import plotting as P\n"
        "f = odenet.MLPDynamics(dim=2, hidden=4)\n"
        "P.plot_trajectories(odenet.ODEBlock(f, solver='euler', steps=2), torch.randn(4, 2)).savefig(sys.argv[1])\n"
        "P.plot_vector_field(f, n=5)\n"
        "P.plot_step_sizes([(0.0, 0.5, True), (0.5, 0.5, True)])\n"
        "P.plot_nfe_over_training([1, 2, 3])\n"
        "P.plot_pareto([{'nfe': 1, 'accuracy': 0.5}])\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    png = tmp_path / "t.png"
    out = subprocess.run([sys.executable, "-c", code, str(png)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert_not_blank(mpimg.imread(png))


def test_numpy_mismatch_names_the_fix(monkeypatch, f2, data2):
    """torch 2.2 under NumPy 2 cannot convert tensors ("Numpy is not available"): say which pair to install."""
    x, y = data2

    def unavailable(self):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", unavailable)
    with pytest.raises(RuntimeError, match="numpy<2"):
        plotting.plot_trajectories(odenet.ODEBlock(f2, solver="rk4", steps=2), x, labels=y)


def test_vector_field_into_one_axes_per_time(f2):
    """A grid of Axes takes one time each, in order; the figure returned is theirs, with one shared colour bar."""
    fig = Figure()
    axes = np.array([[fig.add_subplot(2, 2, 2 * r + c + 1) for c in range(2)] for r in range(2)])
    assert plotting.plot_vector_field(f2, t=[0.0, 0.25, 0.5, 0.75], n=6, ax=axes, title="f") is fig
    assert [a.get_title() for a in axes.ravel()] == [f"f, $t = {t:g}$" for t in (0.0, 0.25, 0.5, 0.75)]
    assert all(a.has_data() for a in axes.ravel()) and len(fig.axes) == 5


def test_trajectory_legend_and_colour_bar_follow_color_by(f2, data2):
    """Coloured by class: class entries (named by class_names), no colour bar. By depth: a colour bar, no classes."""
    x, y = data2
    block = odenet.ODEBlock(f2, solver="euler", steps=4)
    fig = plotting.plot_trajectories(block, x, labels=y, class_names=["in", "out"])
    assert len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "in", "out", "continuous ODE (dopri5)", "residual states", "input $x(t_0)$"]
    fig = plotting.plot_trajectories(block, x, labels=y, color_by="depth")
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "depth $t$"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "continuous ODE (dopri5)", "residual states", "input $x(t_0)$"]


def test_nfe_series_and_x_axis_chosen_or_named():
    rows = [{"epoch": i, "nfe_forward": 10 + i, "nfe_backward": 0, "nfe": 10 + i, "loss": 1 / (i + 1)} for i in range(5)]
    ax = plotting.plot_nfe_over_training(rows).axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == ["forward"]  # zero backward; total = forward
    assert ax.get_xlabel() == "epoch"
    with_backward = [{**r, "nfe_backward": 20, "nfe": 30 + i} for i, r in enumerate(rows)]
    ax = plotting.plot_nfe_over_training(with_backward).axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == ["forward", "backward", "total"]
    ax = plotting.plot_nfe_over_training(rows, keys="loss", x="nfe_forward", label="run").axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == ["run: loss"] and ax.get_xlabel() == "nfe_forward"
    with pytest.raises(ValueError, match="not in history"):
        plotting.plot_nfe_over_training(rows, keys=["nfe_forward", "accuracy"])
    with pytest.raises(ValueError, match="not a key of history"):
        plotting.plot_nfe_over_training(rows, x="iteration")
    with pytest.raises(ValueError, match="window length"):
        plotting.plot_nfe_over_training(rows, smooth=0)


def test_pareto_groups_error_bars_and_annotations():
    results = {"dopri5": [{"nfe": 62, "accuracy": 0.975, "tol": 1e-5},
                          {"nfe": 26, "accuracy": 0.97, "tol": 1e-3, "accuracy_std": 0.01}],
               "euler": {"nfe": 10, "accuracy": 0.95}}
    ax = plotting.plot_pareto(results, annotate="tol").axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["0.001", "1e-05"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Pareto front", "dopri5", "euler"]
    assert [(c.has_xerr, c.has_yerr) for c in ax.containers] == [(False, True), (False, False)]
    with pytest.raises(TypeError, match="must be a number"):
        plotting.plot_pareto([{"nfe": 1, "accuracy": "high"}])
