"""experiments/lesion.py: deleting blocks does what it says on known models, and the script runs,
writes its results and resumes."""

import json
import math
import pathlib
import sys

import pytest
import torch
from torch import nn

import odenet

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))  # the scripts and their kit

import lesion  # noqa: E402


class Scaled(nn.Module):
    """`f(t, x) = a x` (`a` may be a per-block constant); counts its calls."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.calls = 0

    def forward(self, t, x):
        self.calls += 1
        return self.a * x


def _branch(seed: int, width: int = 4) -> lesion.Branch:
    torch.manual_seed(seed)
    return lesion.Branch(width, "group").double().eval()


def _x(width: int = 4):
    return torch.randn(3, width, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def test_deleting_a_zero_branch_changes_nothing():
    fs = [_branch(i) for i in range(4)]
    with torch.no_grad():
        fs[2].conv2.weight.zero_()
        fs[2].conv2.bias.zero_()
    body = nn.Sequential(*[odenet.ResBlock(f, h=1.0, t=float(i)) for i, f in enumerate(fs)])
    x = _x()
    assert torch.equal(lesion.delete_blocks(body, {2})(x), body(x))
    assert not torch.allclose(lesion.delete_blocks(body, {1})(x), body(x))


@pytest.mark.parametrize("residual", [True, False])
def test_a_deleted_block_of_an_untied_stack_is_skipped(residual):
    fs = [_branch(i) for i in range(4)]
    t = torch.zeros((), dtype=torch.float64)
    blocks = [odenet.ResBlock(f, h=1.0, t=0.0) if residual else lesion.Plain(f) for f in fs]
    body = nn.Sequential(*blocks)
    x = _x()
    expected = x
    for i, f in enumerate(fs):
        if i not in (0, 3):
            expected = expected + f(t, expected) if residual else f(t, expected)
    lesioned = lesion.delete_blocks(body, {0, 3})
    assert torch.equal(lesioned(x), expected)
    assert [type(m) for m in lesioned] == [nn.Identity, type(blocks[1]), type(blocks[2]), nn.Identity]
    assert lesioned[1] is blocks[1]  # parameters shared, not copied
    assert torch.equal(lesion.delete_blocks(body, set())(x), body(x))


def test_skipping_an_euler_interval_is_the_resnet_without_that_block():
    f = lesion.Branch(4, "group", time_scale=0.25).double().eval()
    block = odenet.ODEBlock(f, solver="euler", t0=0.0, t1=4.0, steps=4)
    stack = [odenet.ResBlock(f, h=1.0, t=float(i)) for i in range(4)]
    x = _x()
    assert torch.equal(block(x), nn.Sequential(*stack)(x))
    for deleted in ({1}, {0, 2}, {3}, {0, 1, 2, 3}):
        kept = nn.Sequential(*[b for i, b in enumerate(stack) if i not in deleted])
        assert torch.equal(lesion.delete_blocks(block, deleted)(x), kept(x)), deleted


def test_skipping_an_interval_of_a_linear_ode_under_dopri5():
    # dx/dt = a x over [0, 2] cut in 4 slices of length 1/2: skipping k slices leaves exp(a (2 - k/2)) x.
    f = Scaled(-0.7)
    block = odenet.ODEBlock(f, solver="dopri5", t0=0.0, t1=2.0, rtol=1e-7, atol=1e-9)
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    with torch.no_grad():
        for deleted in ({0}, {2}, {1, 3}, {0, 1, 2}):
            got = lesion.delete_blocks(block, deleted, slices=4)(x)
            torch.testing.assert_close(got, x * math.exp(-0.7 * (2 - len(deleted) / 2)), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="slices"):
        lesion.delete_blocks(block, {0})


def test_resolving_with_fewer_steps():
    f = Scaled(-0.5)
    block = odenet.ODEBlock(f, solver="euler", t0=0.0, t1=4.0, steps=4)
    x = torch.ones(1, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lesion.resolve(block, 3)(x), x * (1 - 0.5 * 4 / 3) ** 3, rtol=1e-12, atol=0)
        # skipping one interval instead: three unit steps of (1 - 0.5)
        torch.testing.assert_close(lesion.delete_blocks(block, {1})(x), x * 0.5 ** 3, rtol=1e-12, atol=0)
        f.calls = 0
        assert torch.equal(lesion.resolve(block, 0)(x), x) and f.calls == 0


def test_delete_blocks_rejects_bad_input():
    body = nn.Sequential(nn.Identity(), nn.Identity())
    with pytest.raises(ValueError, match=r"0\.\.1, got \[2\]"):
        lesion.delete_blocks(body, {2})
    with pytest.raises(TypeError, match="nn.Sequential"):
        lesion.delete_blocks(nn.Linear(2, 2), {0})
    block = odenet.ODEBlock(Scaled(1.0), solver="euler", t0=0.0, t1=4.0, steps=4)
    with pytest.raises(ValueError, match="divide"):
        lesion.delete_blocks(block, {0}, slices=3)
    with pytest.raises(ValueError, match="steps"):
        lesion.resolve(block, -1)


def test_random_subsets():
    subsets = lesion.draw_subsets(6, (1, 3, 6), draws=6, seed=0)
    assert subsets[1] == [(i,) for i in range(6)]  # no more subsets than draws: all of them, in order
    assert subsets[6] == [tuple(range(6))]
    assert len(subsets[3]) == 6 == len(set(subsets[3]))  # 20 subsets: 6 distinct draws
    assert all(len(s) == 3 and list(s) == sorted(s) for s in subsets[3])
    assert subsets == lesion.draw_subsets(6, (1, 3, 6), draws=6, seed=0)
    assert subsets[3] != lesion.draw_subsets(6, (3,), draws=6, seed=1)[3]


TINY = ["--models", "resnet,plain,ode-euler", "--depth", "3", "--width", "4", "--epochs", "1", "--n-train", "128",
        "--draws", "2"]


def _strip(path):
    """results.json without what changes from one invocation to the next."""
    drop = {"train_seconds", "total_seconds", "seconds", "train_cpu_seconds", "cpu_seconds", "command", "environment"}

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in drop}
        return [strip(v) for v in o] if isinstance(o, list) else o

    return strip(json.loads(path.read_text()))


def test_run_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    args = TINY + ["--out", str(out)]
    assert lesion.main(args) == 0
    first = capsys.readouterr().out
    assert str(out) in first and "| resnet | test accuracy |" in first
    for name in ("results.json", "results.jsonl", "single.png", "random.png", "ode.png"):
        assert (out / name).stat().st_size > 0, name
    before = _strip(out / "results.json")
    lesions = before["lesions"]
    assert set(lesions) == {"resnet", "plain", "ode-euler"}
    for name, row in lesions.items():
        assert len(row["single"]) == 3 and set(row["random"]) == {"1", "2", "3"}
        assert len(row["random"]["3"]) == 1 and row["random"]["3"][0]["deleted"] == [0, 1, 2]
        assert ("resolve" in row) == (name == "ode-euler")
    # every interval of the ODE skipped, or the ODE re-solved with no steps: the same model, stem -> head
    assert lesions["ode-euler"]["random"]["3"][0]["loss"] == pytest.approx(lesions["ode-euler"]["resolve"]["3"]["loss"])
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6  # per model: trained, lesioned

    # interrupted while writing the last lesion line: the rerun reloads that model's weights, trains nothing
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert lesion.main(args) == 0
    again = capsys.readouterr().out
    assert again.count("(from results.jsonl)") == 2
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.endswith("}")]
    assert sum("history" in r for r in rows) == 3  # no model trained twice
    assert _strip(out / "results.json") == before


def test_transformer_layers_are_deleted(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--models", "transformer,transformer-tied", "--tx-layers", "2", "--tx-dim", "8", "--tx-steps", "3",
            "--tx-eval", "16", "--draws", "2", "--out", str(out)]
    assert lesion.main(args) == 0
    lesions = json.loads((out / "results.json").read_text())["lesions"]
    untied, tied = lesions["transformer"], lesions["transformer-tied"]
    assert "resolve" not in untied and set(tied["resolve"]) == {"1", "2"}
    for row in (untied, tied):
        assert row["metric"] == "loss" and len(row["single"]) == 2
        assert all(r["loss"] != row["intact"]["loss"] for r in row["single"])  # a deleted layer changes the model
    # both layers skipped, or the tied model solved with zero steps: embeddings straight to the head
    assert tied["random"]["2"][0]["loss"] == tied["resolve"]["2"]["loss"]
    assert list(out.glob("transformer/models/*.pt"))  # the trained weights, for a rerun
    assert lesion.main(args) == 0 and capsys.readouterr().out.count("(from results.jsonl)") == 2


def test_bad_flags_are_one_line(capsys):
    for flags in (["--models", "resnet,vgg"], ["--depth", "0"], ["--ks", "1,99"], ["--width", "-3"]):
        assert lesion.main(flags + ["--out", "/nonexistent"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flags[0] in err[0], err
