import pytest
import torch

# Two CPU cores on CI: keep intra-op threads small so tests don't oversubscribe.
torch.set_num_threads(min(2, torch.get_num_threads()))

A_SPIRAL = [[-0.1, 2.0], [-2.0, -0.1]]
A_LINEAR = [[-0.5, 2.0, 0.0], [-2.0, -0.1, 0.3], [0.1, 0.0, -0.3]]  # the matrix of `linear_problem`


@pytest.fixture
def linear_problem():
    """dy/dt = A y in float64 with its exact solution via matrix_exp."""
    A = torch.tensor(A_LINEAR, dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7]], dtype=torch.float64)  # batch of 2

    def f(t, y):
        return y @ A.T

    def exact(t):
        return y0 @ torch.linalg.matrix_exp(A * float(t)).T

    return f, y0, exact


class Counting(torch.nn.Module):
    """Wraps a function `f(t, y)` and counts its calls."""

    def __init__(self, f):
        super().__init__()
        self.f, self.calls = f, 0

    def forward(self, t, y):
        self.calls += 1
        return self.f(t, y)


class CountingF(torch.nn.Module):
    """Counts its own calls: the independent check of odenet's NFE counting."""

    def __init__(self, dim=3, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin1 = torch.nn.Linear(dim + 1, 16).to(dtype)
        self.lin2 = torch.nn.Linear(16, dim).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        tt = t.expand(*y.shape[:-1], 1)
        return self.lin2(torch.tanh(self.lin1(torch.cat([y, tt], -1))))


@pytest.fixture
def counting_f():
    return CountingF()
