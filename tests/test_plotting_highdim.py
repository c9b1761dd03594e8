"""odenet.plotting for states of more than two dimensions: per-token trajectories of [batch, tokens, dim]
states, the step sizes an ODEBlock kept, and vector fields of D-dimensional dynamics on a slice or a projection."""

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.quiver import Quiver  # noqa: E402
from torch import nn  # noqa: E402

import odenet  # noqa: E402
from odenet import plotting  # noqa: E402


class Drift(nn.Module):
    """dx/dt = v: every token moves in a straight line, x(t) = x(0) + t v[token]."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.v = nn.Parameter(torch.randn(tokens, dim, dtype=torch.float64))

    def forward(self, t, x):
        return self.v.expand_as(x)


class Attention(nn.Module):
    """A Pre-LN self-attention branch, written as a transformer's author would, as the dynamics of [B, T, D]."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, t, x):
        h = self.norm(x)
        return self.attn(h, h, h, need_weights=False)[0]


def curves(fig):
    """The LineCollections of the first axes: the continuous curves first, then any discrete polygons."""
    return [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]


def legend_texts(fig):
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


# ---------------------------------------------------------------------------- per-token trajectories


@pytest.fixture
def drift():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64)  # [batch, tokens, dim]
    return odenet.ODEBlock(Drift(5, 6), rtol=1e-6, atol=1e-6), x


def test_each_token_is_a_straight_line(drift):
    """Linear motion stays a straight line under the projection; one line per sample and token."""
    block, x = drift
    fig = plotting.plot_trajectories(block, x, samples=[0, 2], tokens=[1, 3, 4], n_points=30)
    (lines,) = curves(fig)
    segs = lines.get_segments()
    assert len(segs) == 2 * 3
    for seg in segs:
        sv = np.linalg.svd(seg - seg.mean(0), compute_uv=False)
        assert sv[1] < 1e-9 * sv[0]
    # Sample-major order: line s * K + k is sample s, token k; its ends are x(0) and x(1) = x(0) + v.
    lengths = [np.linalg.norm(s[-1] - s[0]) for s in segs]
    assert lengths[:3] == pytest.approx(lengths[3:], rel=1e-6)  # the same token moves the same way in each sample
    assert legend_texts(fig)[:3] == ["token 1", "token 3", "token 4"]  # coloured by token by default


def test_token_trajectories_coloured_by_depth_sample_or_class(drift):
    block, x = drift
    fig = plotting.plot_trajectories(block, x, tokens=slice(0, 2), color_by="depth", n_points=20)
    assert len(curves(fig)[0].get_segments()) == 3 * 2 * (20 - 1)  # coloured piecewise along depth
    assert fig.axes[1].get_ylabel() == "depth $t$"
    fig = plotting.plot_trajectories(block, x, samples=[-1, 0], tokens="all", color_by="sample")
    assert len(curves(fig)[0].get_segments()) == 2 * 5
    assert legend_texts(fig)[:2] == ["sample 0", "sample 2"]
    fig = plotting.plot_trajectories(block, x, tokens=2, labels=[0, 1, 1], class_names=["a", "b"])
    assert legend_texts(fig)[:2] == ["a", "b"]
    colours = curves(fig)[0].get_colors()
    assert len(colours) == 3 and not np.allclose(colours[0], colours[1]) and np.allclose(colours[1], colours[2])


def test_many_tokens_get_a_colour_bar_and_discrete_markers():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 4, dtype=torch.float64)
    block = odenet.ODEBlock(Drift(12, 4), solver="euler", steps=3)
    fig = plotting.plot_trajectories(block, x, tokens="all", dims=3)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "token position"  # 12 tokens: a scale, not a legend
    assert fig.axes[0].name == "3d"
    fig = plotting.plot_trajectories(block, x, tokens="all")
    ode, polygons = curves(fig)
    assert len(ode.get_segments()) == len(polygons.get_segments()) == 2 * 12
    assert "token 0" not in legend_texts(fig)


def test_attention_states_through_depth():
    """A transformer-style f (attention mixes the tokens): the block runs on the whole batch, a few tokens drawn."""
    torch.manual_seed(0)
    block = odenet.ODEBlock(Attention(16), solver="rk4", steps=4).eval()
    x = torch.randn(4, 7, 16)
    fig = plotting.plot_trajectories(block, x, samples=[1], tokens=[0, 6])
    ode, polygons = curves(fig)
    assert len(ode.get_segments()) == len(polygons.get_segments()) == 2
    assert fig.axes[0].get_xlabel().startswith("PC1")


def test_token_selection_errors_name_the_fix(drift):
    block, x = drift
    with pytest.raises(ValueError, match=r"\[batch, tokens, dim\].*\(3, 30\)"):
        plotting.plot_trajectories(block, x.reshape(3, 30), tokens="all")
    with pytest.raises(ValueError, match=r"\[batch, tokens, dim\]"):
        plotting.plot_trajectories(block, x[:, None], tokens=[0])
    with pytest.raises(ValueError, match=r"tokens \[5\] out of range: x has 5 tokens; use indices 0 to 4"):
        plotting.plot_trajectories(block, x, tokens=[0, 5])
    with pytest.raises(ValueError, match=r"samples \[-4\] out of range"):
        plotting.plot_trajectories(block, x, samples=[-4], tokens="all")
    with pytest.raises(ValueError, match="selects no tokens"):
        plotting.plot_trajectories(block, x, tokens=slice(3, 3))
    with pytest.raises(TypeError, match="tokens must be 'all', an index"):
        plotting.plot_trajectories(block, x, tokens="first")
    with pytest.raises(TypeError, match="samples must be"):
        plotting.plot_trajectories(block, x, samples=[0.5], tokens="all")
    with pytest.raises(ValueError, match="color_by='token' needs tokens="):
        plotting.plot_trajectories(block, x, color_by="token")
    with pytest.raises(ValueError, match="'token' or 'sample'"):
        plotting.plot_trajectories(block, x, tokens="all", color_by="position")


def test_samples_alone_select_inputs():
    torch.manual_seed(0)
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2, hidden=8))
    x = torch.randn(10, 2)
    fig = plotting.plot_trajectories(block, x, samples=range(4), labels=torch.arange(10) % 2)
    assert len(curves(fig)[0].get_segments()) == 4
    fig = plotting.plot_trajectories(block, x, samples=[3, 7], color_by="sample")
    assert legend_texts(fig)[:2] == ["sample 3", "sample 7"]


# ---------------------------------------------------------------------------- step sizes of a block

def test_step_sizes_of_a_block_after_forward():
    torch.manual_seed(0)
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2, hidden=16), rtol=1e-6, atol=1e-6)
    x = torch.randn(8, 2)
    block(x)
    s = block.last_stats
    title = plotting.plot_step_sizes(block).axes[0].get_title()
    assert title == f"{s.n_accepted} accepted, {s.n_rejected} rejected steps"
    assert title == plotting.plot_step_sizes(block.solve(x)).axes[0].get_title()  # the same solve again
    fixed = odenet.ODEBlock(odenet.MLPDynamics(dim=2, hidden=16), solver="rk4", steps=5)
    fixed(x)
    assert plotting.plot_step_sizes(fixed).axes[0].get_title() == "5 accepted, 0 rejected steps"


def test_step_sizes_of_a_block_without_steps():
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2, hidden=4), backend="torchdiffeq")
    block(torch.randn(3, 2))
    with pytest.raises(ValueError, match="backend='odenet'"):
        plotting.plot_step_sizes(block)


def test_step_sizes_of_a_block_that_has_not_run():
    with pytest.raises(ValueError, match=r"has not run yet.*block\(x\)"):
        plotting.plot_step_sizes(odenet.ODEBlock(odenet.MLPDynamics(dim=2, hidden=4)))
    with pytest.raises(TypeError, match="ODEBlock that has run"):
        plotting.plot_step_sizes(nn.Linear(2, 2))


# ---------------------------------------------------------------------------- vector fields of D > 2

D = 4


@pytest.fixture
def linear():
    """f(x) = A x with a fixed 4x4 A, its output in float64."""
    A = torch.tensor([[0.5, -1.0, 0.0, 2.0], [1.0, 0.2, -0.3, 0.0], [0.0, 1.5, -1.0, 0.4], [-2.0, 0.0, 0.7, 0.1]],
                     dtype=torch.float64)
    return A, (lambda t, x: x @ A.T)


def quiver_arrows(fig):
    """(U, V) of the drawn arrows, from the unit arrows and their colour (the speed)."""
    (q,) = [c for c in fig.axes[0].collections if isinstance(c, Quiver)]
    S = np.asarray(q.get_array())
    return np.asarray(q.U) * S, np.asarray(q.V) * S


def grid(xlim, ylim, n):
    X, Y = np.meshgrid(np.linspace(*xlim, n), np.linspace(*ylim, n))
    return np.stack([X.ravel(), Y.ravel()], 1)


def test_slice_of_a_linear_field(linear):
    A, f = linear
    base = np.array([0.3, -0.2, 0.5, 1.0])
    fig = plotting.plot_vector_field(f, coords=(1, 3), base=base, xlim=(-1, 1), ylim=(0, 2), n=5, style="quiver",
                                     dtype=torch.float64)
    x = np.repeat(base[None], 25, 0)
    x[:, [1, 3]] = grid((-1, 1), (0, 2), 5)  # the others stay at base
    U, V = quiver_arrows(fig)
    expected = x @ A.numpy().T
    assert np.allclose(U, expected[:, 1]) and np.allclose(V, expected[:, 3])
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("$x_{2}$", "$x_{4}$")
    assert fig.axes[1].get_ylabel() == "speed in the plane"


def test_projection_of_a_linear_field_on_a_given_basis(linear):
    A, f = linear
    P = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]]) / math.sqrt(2)  # orthonormal rows
    c = np.array([1.0, 0.0, -1.0, 0.5])
    u = grid((-2, 2), (-2, 2), 4)
    for s in (1.0, 2.0):  # basis s P: grid point u is the state c + s P^T u, its arrow (B B^T)^-1 B A x = P A x / s
        fig = plotting.plot_vector_field(f, basis=torch.tensor(s * P), base=c, n=4, style="quiver",
                                         dtype=torch.float64)
        U, V = quiver_arrows(fig)
        x = c + s * u @ P
        expected = (x @ A.numpy().T) @ P.T / s
        assert np.allclose(U, expected[:, 0]) and np.allclose(V, expected[:, 1])
    assert fig.axes[0].get_xlabel() == "$u_1$"


def test_projection_on_the_principal_components_of_trajectories(linear):
    """Trajectories spread along E0 (wide) and E1 (narrow) through c: PCA finds E0, E1 and centres on c."""
    A, f = linear
    E = np.array([[0.8, 0.0, 0.6, 0.0], [0.0, -0.6, 0.0, 0.8]])  # largest entries positive, as PCA's signs are
    c = np.array([0.5, -0.5, 0.0, 1.0])
    a, b = np.linspace(-3, 3, 7), np.linspace(-1, 1, 5)
    coef = np.stack(np.meshgrid(a, b, indexing="ij"), -1)  # [7, 5, 2]: a symmetric grid, uncorrelated
    traj = c + coef @ E  # [M=7, B=5, 4]
    fig = plotting.plot_vector_field(f, basis="pca", trajectories=torch.tensor(traj), n=6, style="quiver",
                                     dtype=torch.float64)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo < -3 < 3 < hi and ax.get_ylim()[0] < -1 and ax.get_xlabel().startswith("PC1")
    u = grid(ax.get_xlim(), ax.get_ylim(), 6)
    expected = ((c + u @ E) @ A.numpy().T) @ E.T
    U, V = quiver_arrows(fig)
    assert np.allclose(U, expected[:, 0]) and np.allclose(V, expected[:, 1])
    drawn = [ln.get_xydata() for ln in ax.get_lines()][1::2]  # each path twice: white halo, then red
    assert len(drawn) == 5 and np.allclose(drawn[2], coef[:, 2])  # path b is drawn at (a_i, b[b])


def test_slice_overlays_the_chosen_coordinates():
    torch.manual_seed(0)
    f = odenet.MLPDynamics(dim=5, hidden=8)
    paths = odenet.ODEBlock(f).trajectory(torch.randn(3, 5), torch.linspace(0, 1, 10)).detach()
    fig = plotting.plot_vector_field(f, coords=(4, 0), trajectories=paths, n=6, t=[0.0, 1.0])
    drawn = fig.axes[0].get_lines()[1].get_xydata()
    assert np.allclose(drawn, paths[:, 0][:, [4, 0]].numpy(), atol=1e-6)
    assert len(fig.axes) == 3  # two panels and the colour bar


def test_higher_dimensional_f_without_a_plane_is_a_clear_error():
    """The docstring's promise: a D > 2 dynamics on the default 2-D grid raises ValueError naming base=/basis=."""
    f = odenet.MLPDynamics(dim=5, hidden=8)
    with pytest.raises(ValueError, match=r"base=.*basis=") as err:
        plotting.plot_vector_field(f)
    assert "MLPDynamics(dim=5)" in str(err.value)  # f's own message, kept
    with pytest.raises(ValueError, match=r"base=.*basis=") as err:
        plotting.plot_vector_field(lambda t, x: x @ torch.ones(5, 5))
    assert isinstance(err.value.__cause__, RuntimeError)  # torch's shape error, kept as the cause
    with pytest.raises(ValueError, match=r"\[N, 3\] to \[N, 3\].*got \(9, 2\)"):
        plotting.plot_vector_field(lambda t, x: x[:, :2], base=torch.zeros(3), n=3)


def test_plane_arguments_are_checked(linear):
    _, f = linear
    with pytest.raises(ValueError, match=r"two different indices in 0..3"):
        plotting.plot_vector_field(f, coords=(0, 4), base=np.zeros(4))
    with pytest.raises(ValueError, match="two different indices"):
        plotting.plot_vector_field(f, coords=(1, 1), base=np.zeros(4))
    with pytest.raises(TypeError, match=r"coords must be two coordinate indices"):
        plotting.plot_vector_field(f, coords=(0, 1, 2), base=np.zeros(4))
    with pytest.raises(ValueError, match="linearly independent"):
        plotting.plot_vector_field(f, basis=np.array([[1.0, 0, 0, 0], [2.0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"state dimension.*'basis': \(3, 4\)"):
        plotting.plot_vector_field(f, basis=np.eye(4)[:3])
    with pytest.raises(ValueError, match=r"state dimension.*'base': \(4,\), 'trajectories': \(10, 1, 3\)"):
        plotting.plot_vector_field(f, base=np.zeros(4), trajectories=np.zeros((10, 3)))
    with pytest.raises(ValueError, match="'pca' with trajectories="):
        plotting.plot_vector_field(f, basis="pca")
    with pytest.raises(ValueError, match="'pca' with trajectories="):
        plotting.plot_vector_field(f, basis="svd", trajectories=np.zeros((10, 4)))
    with pytest.raises(ValueError, match="pass one of them"):
        plotting.plot_vector_field(f, coords=(0, 1), basis=np.eye(4)[:2])
    with pytest.raises(ValueError, match=r"base must be one state"):
        plotting.plot_vector_field(f, base=np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[M, D\] or \[M, B, D\]"):
        plotting.plot_vector_field(f, trajectories=np.zeros(4))
