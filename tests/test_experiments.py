"""The issue-5 experiment scripts run end to end with --quick, record their environment, resume an
interrupted run, and reject bad flags in one line."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Result fields each script must fill, beyond "config".
FIELDS = {
    "spiral.py": (),
    "augmented.py": (),
    "degradation.py": ("summary", "runs"),
    "nfe_tolerance.py": ("sweep", "training", "rnode_saving", "histories"),
}


def _run(script, *args, timeout):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("script", sorted(FIELDS))
def test_quick_run_writes_results(script, tmp_path):
    out = tmp_path / "out"
    proc = _run(script, "--quick", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out) in proc.stdout  # it says where the outputs went
    results = json.loads((out / "results.json").read_text())
    assert results["config"]
    assert results["command"].startswith(f"python experiments/{script} --quick")
    assert {"python", "torch", "odenet", "cpu", "commit"} <= set(results["environment"])
    for key in FIELDS[script]:
        assert results[key], key
    assert list(out.glob("*.png"))
    if script == "degradation.py":
        assert results["experiment"] == "degradation"
        for per_depth in results["summary"].values():
            for entry in per_depth.values():
                assert entry["grad_w_stem"] > 0 and 0 <= entry["test_accuracy"] <= 1
    elif script == "nfe_tolerance.py":
        assert results["experiment"] == "nfe_tolerance"
        for rows in results["sweep"].values():
            for row in rows:
                assert row["nfe_forward"] > 0 and row["nfe_backward_adjoint"] > 0 and row["nfe_backward_seminorm"] > 0
        assert set(results["rnode_saving"]) == {"at_train_tol", "at_equal_accuracy", "at_equal_error"}


@pytest.mark.parametrize("script,flag,value", [
    ("spiral.py", "--hidden", "-3"),
    ("augmented.py", "--hidden", "-3"),
    ("degradation.py", "--width", "-3"),
    ("degradation.py", "--depths", "2,x"),
    ("nfe_tolerance.py", "--hidden", "-3"),
    ("nfe_tolerance.py", "--tols", "1e-3,-1"),
])
def test_bad_flag_is_one_line(script, flag, value):
    proc = _run(script, flag, value, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and flag in proc.stderr.splitlines()[-1]


def _results(out):
    """results.json without what changes from one invocation to the next (times, command, environment)."""
    drop = {"train_seconds", "total_seconds", "train_seconds_std", "command", "environment"}

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in drop}
        return [strip(v) for v in o] if isinstance(o, list) else o

    return strip(json.loads((out / "results.json").read_text()))


def test_spiral_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "out"
    args = ("--iterations", "20", "--snapshot-every", "10", "--data-size", "200", "--out", str(out))
    assert _run("spiral.py", *args, timeout=300).returncode == 0
    before = _results(out)
    again = _run("spiral.py", *args, timeout=300)
    assert again.returncode == 0 and "resuming after iteration 20" in again.stdout
    assert _results(out) == before
