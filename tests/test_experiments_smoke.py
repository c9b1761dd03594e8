"""The issue-5 experiment scripts run end to end with --quick and reject bad flags in one line."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["spiral.py", "augmented.py"])
def test_quick_run_writes_results(script, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out) in proc.stdout  # it says where the outputs went
    results = json.loads((out / "results.json").read_text())
    assert results["config"]
    assert list(out.glob("*.png"))


@pytest.mark.parametrize("script", ["spiral.py", "augmented.py"])
def test_bad_flag_is_one_line(script):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), "--hidden", "-3"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--hidden" in proc.stderr.splitlines()[-1]
