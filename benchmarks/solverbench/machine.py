"""The machine and checkout a run is on, without importing torch (so `gpu_run.py` can ask before any piece runs)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Optional

from .config import REPO_ROOT


def cpu_model() -> str:
    """The CPU model name (lscpu, /proc/cpuinfo, or `platform.processor()`)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def git_commit() -> Optional[str]:
    """The checkout's HEAD commit (None outside git)."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except Exception:
        return None
