"""What a benchmark run depends on: libraries, modes, solvers, problem sizes and the run's `Config`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "bench_solvers"

LIBRARIES = ("odenet", "torchdiffeq", "torchode")
MODES = ("forward", "train-direct", "train-adjoint", "train-checkpoint", "fixed", "memory", "seminorm")
GRADIENTS = ("direct", "adjoint", "checkpoint")
ADAPTIVE = ("dopri5", "bosh3", "tsit5")
FIXED = ("euler", "midpoint", "heun", "rk4")


@dataclass(frozen=True)
class Size:
    """One problem size: an MLP state ``[batch, dim]`` or a conv state ``[batch, C, H, W]``."""

    name: str  # preset name or the spec it was parsed from
    kind: str  # "mlp" (Linear-Tanh-Linear) or "conv" (Conv3x3-Tanh-Conv3x3)
    shape: Tuple[int, ...]  # the state's shape
    hidden: int  # hidden width (mlp) or hidden channels (conv)

    @property
    def label(self) -> str:
        """How the size reads in tables: ``mlp 256x2 h64``, ``conv 128x64x28x28 h64``."""
        if self.kind == "mlp":
            b, d = self.shape
            return f"mlp {b}x{d} h{self.hidden}"
        return "conv " + "x".join(map(str, self.shape)) + f" h{self.hidden}"


SIZE_PRESETS: Dict[str, Size] = {
    "tiny": Size("tiny", "mlp", (32, 2), 16),  # smoke tests
    "small": Size("small", "mlp", (256, 2), 64),
    "medium": Size("medium", "mlp", (256, 64), 256),
    "large": Size("large", "mlp", (1024, 128), 512),
    "conv": Size("conv", "conv", (128, 64, 28, 28), 64),
    "conv-tiny": Size("conv-tiny", "conv", (4, 8, 8, 8), 8),  # smoke tests
}


def parse_size(spec: str) -> Size:
    """A preset name (``small``) or ``mlp:BATCHxDIMxHIDDEN`` / ``conv:BATCHxCxHxW[xHIDDEN]``."""
    spec = spec.strip()
    if spec in SIZE_PRESETS:
        return SIZE_PRESETS[spec]
    kind, _, rest = spec.partition(":")
    try:
        nums = [int(x) for x in rest.split("x")] if rest else []
    except ValueError:
        nums = []
    if kind == "mlp" and len(nums) == 3 and min(nums) > 0:
        return Size(spec, "mlp", (nums[0], nums[1]), nums[2])
    if kind == "conv" and len(nums) in (4, 5) and min(nums) > 0:
        return Size(spec, "conv", tuple(nums[:4]), nums[4] if len(nums) == 5 else nums[1])
    raise ValueError(
        f"Unknown size {spec!r}: use a preset ({', '.join(SIZE_PRESETS)}) or mlp:BATCHxDIMxHIDDEN or "
        "conv:BATCHxCxHxW[xHIDDEN] (e.g. mlp:256x64x256, conv:32x64x28x28)."
    )


@dataclass
class Config:
    """Everything a run depends on (written into the JSON)."""

    sizes: List[Size]  # problem sizes
    modes: List[str]  # what to measure (see MODES)
    solvers: List[str]  # adaptive solvers for forward / train / seminorm
    fixed_solvers: List[str]  # fixed-step solvers for the fixed mode
    libraries: List[str]  # which libraries to run
    repeats: int  # timed repeats per case (median reported)
    warmup: int  # untimed runs per case before timing
    threads: int  # torch.set_num_threads
    device: str  # cpu or cuda
    dtype: str  # float32 or float64
    rtol: float  # relative tolerance (adaptive)
    atol: float  # absolute tolerance (adaptive)
    t_end: float  # integrate over [0, t_end]
    fixed_steps: int  # N of the fixed mode
    memory_steps: List[int]  # step counts of the memory mode
    memory_sizes: List[Size]  # sizes of the memory mode
    memory_solver: str  # fixed-step solver of the memory mode
    seminorm_t_ends: List[float]  # integration horizons of the seminorm mode
    f_time_s: float  # seconds spent timing one f call (per size)
    seed: int  # weights and initial state
    compile: bool  # torch.compile the f module (all libraries get the compiled f)
    malloc_keep: bool  # glibc mallopt: keep freed memory (see --malloc-keep)
    loss_scale: float  # the training loss is loss_scale * y(T).square().mean()
    out: Optional[str]  # output prefix (.json, .md); None: do not write
    quick: bool  # smoke configuration



def asdict_shallow(cfg: Config) -> Dict[str, Any]:
    """The config's fields as a dict, values not copied (sizes stay `Size` objects)."""
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
