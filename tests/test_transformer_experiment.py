"""experiments/transformer.py: the synthetic language and its exact optimum, the importable API the
lesion study uses (train, evaluate, layers, skipping layers), the splitting methods against the
blocks, their convergence orders, and the script end to end (outputs, resume, one-line errors).

Tiny settings throughout; nothing here checks an accuracy target."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import transformer as tx  # noqa: E402

import odenet  # noqa: E402

TINY = dict(vocab=12, triggers=2, seq_len=16, n_train=64, n_val=16, dim=16, heads=2, layers=3, steps=4, warmup=1,
            batch_size=8, split_steps=(1, 2), split_batch=2)


@pytest.fixture(scope="module")
def config():
    return tx.TransformerConfig(**TINY)


@pytest.fixture(scope="module")
def data(config):
    return tx.build_data(config)


# ---------------------------------------------------------------------------- the language


def test_language_is_deterministic_and_its_optimum_exact(config, data):
    again = tx.build_data(config)
    assert torch.equal(data.train, again.train) and torch.equal(data.val, again.val)
    V, trig = config.vocab, set(data.triggers.tolist())
    assert data.train.shape == (64, 16) and data.val.shape == (16, 16) and data.train.max() < V
    val, kind, loss = data.val.numpy(), data.val_kind.numpy(), data.val_optimal_loss.numpy()
    for s in range(len(val)):
        outputs = {}
        for t in range(1, val.shape[1]):
            prev, cur = int(val[s, t - 1]), int(val[s, t])
            if prev in trig:  # after a trigger: its sequence's output, known after the first time
                assert cur not in trig
                if prev in outputs:
                    assert kind[s, t - 1] == 2 and cur == outputs[prev] and loss[s, t - 1] == 0
                else:
                    assert kind[s, t - 1] == 1 and loss[s, t - 1] == pytest.approx(math.log(V - len(trig)))
                    outputs[prev] = cur
            else:
                assert kind[s, t - 1] == 0 and loss[s, t - 1] == pytest.approx(-math.log(data.bigram[prev, cur]))
    fl = data.floors()
    assert fl["loss"] < fl["no_induction_loss"] and fl["bits"] == pytest.approx(fl["loss"] / math.log(2))
    assert sum(fl[f"fraction_{k}"] for k in ("bigram", "first", "induction")) == pytest.approx(1.0)
    assert abs(data.bigram.sum(1) - 1).max() < 1e-12


def test_bigram_loss_matches_its_entropy_on_long_chains():
    """The optimum's bigram part is -log P of the sampled transition: on many tokens its mean is the entropy."""
    c = tx.TransformerConfig(**dict(TINY, n_val=400, seq_len=64, triggers=1, trigger_mass=0.0))
    d = tx.build_data(c)
    P = torch.from_numpy(d.bigram)
    prev = d.val[:, :-1]
    entropy = -(P * P.log()).sum(1)[prev]  # expected loss of the next token given the previous one
    m = d.val_kind == 0
    assert abs(d.val_optimal_loss[m].mean() - entropy[m].mean()) < 0.05


# ---------------------------------------------------------------------------- the importable API


@pytest.mark.parametrize("name", ["untied", "tied", "ode", "strang"])
def test_train_evaluate_layers_and_skip(name, config, data):
    torch.manual_seed(0)
    model = tx.train_variant(name, config, data)
    assert not model.training and len(model.history) >= 1 and model.seconds_per_step > 0
    ev = tx.evaluate(model, data)
    assert ev["ok"] and ev["loss"] > 0 and 0 <= ev["accuracy"] <= 1 and ev["gap"] == pytest.approx(
        ev["loss"] - data.floors()["loss"])
    assert ev["nfe_forward"] >= config.layers
    layers = model.layers()
    assert len(layers) == config.layers
    idx = data.val[:4]
    with torch.no_grad():
        full = model(idx)
        by_layers = model(idx, skip={99})  # nothing skipped, run layer by layer
        lesioned = model(idx, skip={1})
    if name != "ode":
        assert all(isinstance(layer, odenet.ResBlock) for layer in layers)
        assert torch.equal(full, by_layers)  # the Euler form, step by step, is the model
    else:
        assert all(isinstance(layer, odenet.ODEBlock) for layer in layers)
        assert [layer.interval for layer in layers] == [(k, k + 1) for k in range(config.layers)]
        assert (full - by_layers).abs().max() < 0.05  # adaptive solves over [k, k+1] instead of [0, N]
    assert not torch.allclose(full, lesioned)
    ev1 = tx.evaluate(model, data, skip={1})
    assert ev1["ok"] and ev1["nfe_forward"] is None and ev1["loss"] != ev["loss"]


def test_load_or_train_reuses_saved_weights(tmp_path, config, data):
    a = tx.load_or_train("tied", config, data, str(tmp_path))
    assert list((tmp_path / "models").glob("tied-*.pt"))
    b = tx.load_or_train("tied", config, data, str(tmp_path))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    assert b.history == a.history


# ---------------------------------------------------------------------------- splitting


def _field(composition, config):
    torch.manual_seed(1)
    model = tx.TinyGPT(config, tx.Variant(composition))
    with torch.no_grad():  # larger weights than GPT-2's init, so that the sub-fields do not commute
        for p in model.field.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.double()


@pytest.mark.parametrize("composition,scheme", [("sequential", "lie"), ("strang", "strang")])
def test_splitting_steps_of_unit_size_are_the_blocks(composition, scheme, config):
    model = _field(composition, config)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        want = model.block(x)  # the model's own depth: N unit Euler steps of its field
        got = tx.split_solve(model.field, x, 0.0, float(config.layers), config.layers, scheme)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_splitting_orders(config):
    """Lie–Trotter is first order; Strang too with Euler sub-steps (what the Macaron block computes), second
    order only with sub-flows solved to at least second order (RK4 sub-steps)."""
    model = _field("sequential", config)
    x0 = torch.randn(2, 8, 16, dtype=torch.float64)
    res = tx.splitting_order(model.field, x0, 1, (8, 16, 32, 64))
    orders = {k: m["order_fine"] for k, m in res["methods"].items()}
    assert res["reference_error"] < 1e-9
    assert orders["lie (euler sub-steps)"] == pytest.approx(1, abs=0.15)
    assert orders["strang (euler sub-steps)"] == pytest.approx(1, abs=0.15)
    assert orders["lie (rk4 sub-steps)"] == pytest.approx(1, abs=0.15)
    assert orders["strang (rk4 sub-steps)"] == pytest.approx(2, abs=0.2)
    assert orders["rk4 on A+M"] > 3.5


# ---------------------------------------------------------------------------- the script


def _script(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "transformer.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_script_end_to_end_and_resume(tmp_path):
    out = tmp_path / "out"
    flags = ["--quick", "--steps", "3", "--n-train", "32", "--n-val", "8", "--runs", "untied,ode", "--split-steps", "1,2",
             "--threads", "1", "--out", str(out)]
    proc = _script(*flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout
    md = (out / "results.md").read_text()
    assert "python experiments/transformer.py --quick" in md and "| untied |" in md and "| ode |" in md
    assert "Splitting order" in md and "Cross-evaluation" in md
    res = json.loads((out / "results.json").read_text())
    assert {"python", "torch", "odenet", "cpu", "commit"} <= set(res["environment"])
    assert [r["run"] for r in res["runs"]] == ["untied", "ode"]
    ode = res["runs"][1]
    assert ode["nfe_backward_train"] > 0 and ode["activation_bytes"] < res["runs"][0]["activation_bytes"]
    assert set(res["splitting"]) == {"random initialisation", "trained ode"}
    for name in ("training.png", "cross_eval.png", "splitting.png"):
        assert (out / name).stat().st_size > 0
    lines = (out / "results.jsonl").read_text().splitlines()
    again = _script(*flags)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step 0" not in again.stdout  # nothing retrained
    assert (out / "results.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize("flag,value", [("--dim", "30"), ("--runs", "tied,nope"), ("--steps", "0"), ("--triggers", "40"),
                                        pytest.param("--device", "cuda", marks=pytest.mark.skipif(
                                            torch.cuda.is_available(), reason="CUDA is available here"))])
def test_bad_flags_are_one_line(flag, value):
    proc = _script(flag, value)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "transformer.py: error:" in proc.stderr
