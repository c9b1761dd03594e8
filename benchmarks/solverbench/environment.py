"""Where a run happened: command, machine, device, versions (and glibc's `--malloc-keep`)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
from typing import Any, Dict, Optional, Sequence

import torch

import odenet

from .adapters import torchdiffeq, torchode
from .config import SCHEMA_VERSION, Config
from .machine import cpu_model, git_commit


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory (no trimming, no mmap up to 32 MiB), so that tensors of a few MiB are
    reused instead of page-faulted in on every allocation; whether it took effect (False off glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1
        ok &= libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1
        return bool(ok)
    except Exception:
        return False


def version_of(mod) -> Optional[str]:
    """The installed version of a module (None when it is missing)."""
    if mod is None:
        return None
    try:
        from importlib.metadata import version

        return version(mod.__name__)
    except Exception:
        return getattr(mod, "__version__", None)


def environment(cfg: Config, argv: Sequence[str]) -> Dict[str, Any]:
    """The command, machine, device and versions of a run (the JSON's `environment`)."""
    env = dict(
        command="python benchmarks/bench_solvers.py " + " ".join(shlex.quote(a) for a in argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(),
        platform=platform.platform(),
        python=platform.python_version(),
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        device=cfg.device,
        gpu=torch.cuda.get_device_name(torch.device(cfg.device)) if torch.device(cfg.device).type == "cuda" else None,
        torch=torch.__version__,
        odenet=odenet.__version__,
        torchdiffeq=version_of(torchdiffeq),
        torchode=version_of(torchode),
        git_commit=git_commit(),
        malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or None,
        malloc_keep=cfg.malloc_keep,
        schema_version=SCHEMA_VERSION,
    )
    return env
