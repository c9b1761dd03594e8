"""experiments/resnet_forms.py: its ResNets are the v1/v2 forms (the branch functions it reads them
by are right), the quick run measures what the docs page says (v2's Euler form is the original,
v1's branch reading is not), resumes, is deterministic, and rejects bad flags in one line."""

import copy
import json
import pathlib
import sys

import pytest
import torch

import odenet

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import resnet_forms as rf  # noqa: E402


@pytest.fixture
def run_script(capsys):
    """`main(argv)` in this process (torch's thread count restored): `(exit code, stdout, stderr)`."""
    threads = torch.get_num_threads()

    def run(*argv):
        try:
            code = rf.main(list(argv))
        finally:
            torch.set_num_threads(threads)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.mark.parametrize("name", rf.MODELS)
def test_blocks_are_their_form(name):
    """v2: block(x) = x + F(x); v1: block(x) = relu(x + F(x)), F = the branch the script reads."""
    torch.manual_seed(0)
    model = rf.build(name, blocks=2, width=4)
    for m in model.modules():  # BatchNorm away from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.weight.data.uniform_(0.5, 1.5)
    model.eval()
    blocks = [b for b in model.modules() if isinstance(b, rf.BLOCKS[name])]
    x = torch.randn(3, blocks[1].conv1.in_channels, 8, 8)
    block = blocks[1]  # layer1.1: same shape for every model
    s = x + rf.residual_branch(block)(x)
    expected = torch.relu(s) if name.startswith("v1") else s
    assert torch.equal(block(x.clone()), expected)
    diag = rf.block_diagnostics(model, name, torch.randn(3, 1, 8, 8))
    projections = [i for i, b in enumerate(diag) if b["projection"]]
    assert projections == ([0, 2] if name.endswith("bottleneck") else [2])  # stage boundaries (+ the bottleneck's expansion)
    assert all(b["branch_ratio"] > 0 and (b["relu_removes"] > 0) == name.startswith("v1") for b in diag if not b["projection"])


def test_v1_branch_reading_is_refused_then_drops_the_relu():
    torch.manual_seed(0)
    model = rf.build("v1-basic", blocks=2, width=4).eval()
    x = torch.randn(5, 1, 8, 8)
    message = rf.strict_refusal(model, "v1-basic", x)
    assert "Block 'layer1.0' (BasicBlock) is not its declared residual form" in message
    assert rf.strict_refusal(rf.build("v2-basic", blocks=2, width=4).eval(), "v2-basic", x) == ""
    ref = model(x)
    branch = rf.convert(model, "v1-basic", "branch", "euler", steps=1).eval()
    whole = rf.convert(model, "v1-basic", "block-x", "euler", steps=1).eval()
    assert (branch(x) - ref).abs().max() > 1e-3
    torch.testing.assert_close(whole(x), ref, rtol=1e-6, atol=1e-6)
    assert "layer2.0: discrete: changes the state's shape (5, 4, 8, 8) -> (5, 8, 4, 4)" in odenet.swap_report(whole)


def test_v2_euler_form_is_the_original_in_training_mode_too():
    torch.manual_seed(0)
    model = rf.build("v2-bottleneck", blocks=2, width=4).train()
    ref = copy.deepcopy(model)
    converted = rf.convert(model, "v2-bottleneck", "branch", "euler", steps=1)
    x = torch.randn(6, 1, 8, 8)
    assert torch.equal(converted(x), ref(x))
    for a, b in zip(converted.buffers(), ref.buffers()):
        assert torch.equal(a, b)  # BatchNorm's running statistics moved alike
    assert rf._nfe(converted) == 2  # one evaluation per same-shape block (two of four are projections)


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def test_quick_run_resumes_and_is_deterministic(tmp_path, run_script):
    out = tmp_path / "a"
    code, stdout, _ = run_script("--quick", "--out", str(out))
    assert code == 0 and str(out) in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["command"].startswith("python experiments/resnet_forms.py --quick")
    assert {"torch", "odenet", "cpu", "commit"} <= set(res["environment"])
    assert sorted(p.name for p in out.glob("*.png")) == ["blocks.png", "cross_eval.png", "euler_gap.png", "training.png"]
    assert "| v2-basic / branch |" in (out / "results.md").read_text()
    runs = {r["model"]: r for r in res["runs"]}
    assert set(runs) == set(rf.MODELS)
    for name, r in runs.items():
        euler1 = {row["reading"]: row for row in r["rows"] if row["label"] == "euler x1"}
        if name.startswith("v2"):
            assert euler1["branch"]["max_abs_logit_diff"] == 0.0 and r["strict_refusal"] == ""
        else:
            assert euler1["branch"]["max_abs_logit_diff"] > 1e-3 and euler1["block-x"]["max_abs_logit_diff"] < 1e-4
            assert "is not its declared residual form" in r["strict_refusal"]
            assert all(b["relu_removes"] > 0 for b in r["blocks"] if not b["projection"])
        assert all(row["ok"] and row["nfe"] > 0 for row in r["rows"])
        for reading, row in euler1.items():  # the ResNet is not the ODE's solution; the tightest dopri5 is the reference
            assert row["max_abs_diff_to_ode"] > 0 and r["rows"][-1]["max_abs_diff_to_ode"] == 0.0
        dopri = [row for row in r["rows"] if row["solver"] == "dopri5"]
        assert all(row["nfe"] > 2 * euler1["branch"]["nfe"] for row in dopri)
        assert "discrete: changes the state's shape" in r["swap_reports"]["branch"]
    code, stdout, _ = run_script("--quick", "--out", str(out))  # resumes: nothing is retrained
    assert code == 0 and stdout.count("(from results.jsonl)") == 4
    code, _, _ = run_script("--quick", "--models", "v2-basic", "--out", str(tmp_path / "b"))  # fresh: the same numbers
    fresh = json.loads((tmp_path / "b" / "results.json").read_text())["runs"][0]
    assert code == 0 and fresh["history"] == runs["v2-basic"]["history"]
    assert _strip(fresh["rows"]) == _strip(runs["v2-basic"]["rows"])


@pytest.mark.parametrize("flag,value", [("--models", "v3-basic"), ("--blocks", "0"), ("--dopri5-tols", "1e-3,-1")])
def test_bad_flag_is_one_line(flag, value, run_script):
    code, _, stderr = run_script(flag, value)
    assert code == 2
    assert stderr.startswith("resnet_forms.py: error:") and len(stderr.strip().splitlines()) == 1 and flag in stderr
