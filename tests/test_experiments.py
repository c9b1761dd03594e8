"""The issue-5 experiment scripts run end to end with --quick and reject bad flags in one line."""

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
    for key in FIELDS[script]:
        assert results[key], key
    assert list(out.glob("*.png"))
    if script == "degradation.py":
        assert results["experiment"] == "degradation"
        for per_depth in results["summary"].values():
            for entry in per_depth.values():
                assert entry["grad_norm_first_layer_init"] > 0 and 0 <= entry["test_accuracy"] <= 1
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
