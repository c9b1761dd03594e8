"""What every experiment script shares: a typed settings dataclass and the command line built from
it, the environment record, the results files, resume, progress bars and figure saving.

A script declares its settings as a `@dataclass` whose fields are made with `opt` (default, help
text, and how the flag is read); `build_parser` makes one `--flag` per field (`--name/--no-name`
for booleans, comma-separated values for tuples) plus `--quick`, and `parse_config` applies the
`--quick` overrides, the flags given, the bounds and the script's own `check`. Any problem is a
`UsageError`: one line on stderr, exit code 2 (`usage_error`).

Finished units of work (a run and seed, a depth, a model) are JSON lines in `OUT/results.jsonl`,
appended and flushed as each finishes under a `digest` of everything the unit depends on; a rerun
with the same settings skips them, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import types
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

C = TypeVar("C")

_TYPES = {"int": int, "float": float, "str": str}


class UsageError(Exception):
    """A problem with the command line or the data: reported as one line, exit code 2."""


def usage_error(prog: str, err: BaseException) -> int:
    """Print `prog: error: err` as one line on stderr; return the exit code 2."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


def script_main(prog: str, parse_args, run, argv=None) -> int:
    """A script's `main`: parse `argv` into its settings and `run(config, argv)`; a usage error is one line, exit 2."""
    try:
        config = parse_args(argv)
    except UsageError as err:
        return usage_error(prog, err)
    run(config, argv)
    return 0


# ---------------------------------------------------------------------------- settings -> command line


def opt(default, help: str, *, key: bool = True, minimum=None, positive: bool = False, **flag):
    """A settings field with its `--help` text. `key=False` keeps it out of the resume key: it changes no
    unit's result (output folder, threads, figure resolution) or it only lists the units (seeds, depths).
    `minimum`/`positive` bound numbers; `flag` holds argparse extras (`choices`, `metavar`,
    `action="append"`, `cli=False`, `default_text` for the help)."""
    meta = dict(help=help, key=key, minimum=minimum, positive=positive, **flag)
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _kind(tp) -> Tuple[str, bool]:
    """`(element type name, is a tuple)` of a field's annotation (`Optional[...]` unwrapped)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(types, "UnionType", typing.Union)):  # Optional[X], X | None
        return _kind(args[0])
    if typing.get_origin(tp) is tuple:
        return args[0].__name__, True
    return tp.__name__, False


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(f"{message} (see --help)")


def build_parser(cls: Type[C], *, prog: str, description: str, quick: Dict[str, Any], epilog: str = "") -> argparse.ArgumentParser:
    """One `--flag` per field of the settings dataclass `cls` (help with its default and `--quick`
    value), and `--quick`."""
    p = _Parser(prog=prog, description=description, epilog=epilog or None,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a short smoke-test run: " + ", ".join(f"--{k.replace('_', '-')} {_fmt(v)}" for k, v in quick.items())
                   + " (flags given explicitly win)")
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        meta = dict(fld.metadata)
        if not meta.get("cli", True):
            continue
        kind, many = _kind(hints[fld.name])
        default = meta.get("default_text", _fmt(fld.default))
        help_text = f"{meta['help']} (default: {default}" + (f"; --quick: {_fmt(quick[fld.name])})" if fld.name in quick else ")")
        kw: Dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_text, dest=fld.name)
        for extra in ("choices", "metavar", "action"):
            if extra in meta:
                kw[extra] = meta[extra]
        if kind == "bool" and not many:
            kw["action"] = argparse.BooleanOptionalAction
        elif many:
            if kw.get("action") != "append":
                kw.setdefault("metavar", "A,B,...")
        else:
            kw["type"] = _TYPES[kind]
        p.add_argument(meta.get("flag", "--" + fld.name.replace("_", "-")), **kw)
    return p


def _parse_list(flag: str, text: str, kind: str, minimum=None) -> tuple:
    """A comma-separated flag value as a tuple of `kind` (numbers: floats positive, integers >= `minimum`,
    default 0, without repeats), with one-line errors naming the flag."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if kind == "str":
        if not items:
            raise UsageError(f"{flag} {text!r}: expected at least one comma-separated name")
        return tuple(items)
    if kind == "int":
        try:
            values = tuple(int(s) for s in items)
        except ValueError:
            raise UsageError(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
        low = 0 if minimum is None else minimum
        if not values or any(v < low for v in values):
            raise UsageError(f"{flag} {text!r}: expected at least one integer, each >= {low}")
        if len(set(values)) != len(values):
            raise UsageError(f"{flag} {text!r}: values repeat")
        return values
    try:
        values = tuple(float(s) for s in items)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 1e-2,1e-3") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise UsageError(f"{flag} {text!r}: expected at least one positive number")
    return values


def parse_config(cls: Type[C], argv: Optional[Sequence[str]], *, parser: argparse.ArgumentParser,
                 quick: Dict[str, Any], check: Optional[Callable[[C], None]] = None) -> C:
    """Parse `argv` into `cls`: the defaults, then the `--quick` overrides, then the flags given; then
    the fields' bounds and `check` (which may also fill in derived fields). Raises `UsageError`."""
    args = vars(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    use_quick = args.pop("quick", False)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in args.items():
        kind, many = _kind(hints[name])
        if many:
            meta = fields[name].metadata
            flag = "--" + name.replace("_", "-")
            args[name] = tuple(value) if meta.get("action") == "append" else _parse_list(flag, value, kind, meta.get("minimum"))
    config = dataclasses.replace(cls(**(quick if use_quick else {})), **args)
    for name, fld in fields.items():
        value, flag = getattr(config, name), "--" + name.replace("_", "-")
        if value is None or isinstance(value, (tuple, bool, str)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        if fld.metadata.get("minimum") is not None and value < fld.metadata["minimum"]:
            raise UsageError(f"{flag} must be >= {fld.metadata['minimum']}, got {value}")
        if fld.metadata.get("positive") and not value > 0:
            raise UsageError(f"{flag} must be a positive number, got {value}")
    if check is not None:
        try:
            check(config)
        except (ValueError, TypeError) as err:
            raise UsageError(str(err)) from None
    return config


def key_fields(config) -> Dict[str, Any]:
    """The settings fields a result depends on (those not declared with `key=False`)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("key", True)}


# ---------------------------------------------------------------------------- environment record


def git_commit() -> Optional[str]:
    """The repository's commit (with `+dirty` when tracked files differ from it), or `None` outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "diff", "--quiet", "HEAD", "--"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")


def environment(device="cpu", world_size: int = 1) -> Dict[str, Any]:
    """Versions, hardware and commit, for the header of a results file."""
    import importlib.metadata as md

    import numpy
    import torch

    import odenet

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = torch.device(device)
    return dict(
        python=platform.python_version(), torch=torch.__version__, odenet=odenet.__version__, numpy=numpy.__version__,
        mnist1d=version("mnist1d"), scikit_learn=version("scikit-learn"), platform=platform.platform(),
        cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=str(device),
        world_size=world_size, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        commit=git_commit(),
    )


def command_line(script: str, argv: Optional[Sequence[str]], world_size: int = 1) -> str:
    """The command that reproduces this run, e.g. `python experiments/spiral.py --quick`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prefix = f"torchrun --nproc_per_node={world_size} " if world_size > 1 else "python "
    return prefix + f"experiments/{script}" + ("" if not argv else " " + shlex.join(argv))


# ---------------------------------------------------------------------------- results files and resume


def digest(payload: Dict[str, Any]) -> str:
    """A short key for everything a result depends on (same payload, same key)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """The JSON lines of `path` (none if it does not exist); a line cut by an interruption is skipped with a note."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"note: skipping unreadable line {i} of {path}", file=sys.stderr)
    return rows


def append_jsonl(path: str, row: Dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk, so an interruption loses at most the unit in progress."""
    # A line cut by an interruption has no newline: start on a fresh line so this one stays readable.
    cut = False
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            cut = fh.read(1) != b"\n"
    with open(path, "a") as fh:
        fh.write(("\n" if cut else "") + json.dumps(row, default=_json_default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class ResultLog:
    """`out/results.jsonl` of a script: one line per finished unit, under its key (the last line of a key
    wins). `fresh` starts over."""

    def __init__(self, out: str, fresh: bool = False):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "results.jsonl")
        if fresh and os.path.exists(self.path):
            os.remove(self.path)
        self.done = {row["key"]: row for row in read_jsonl(self.path) if "key" in row}

    def add(self, key: str, row: Dict[str, Any]) -> Dict[str, Any]:
        """Append `row` under `key` (flushed to disk at once); return it with its key."""
        row = dict(key=key, **row)
        append_jsonl(self.path, row)
        self.done[key] = row
        return row


def write_json(path: str, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=_json_default)
    os.replace(tmp, path)


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """`torch.save` `state` atomically."""
    import torch

    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, key: str) -> Optional[Dict[str, Any]]:
    """The state saved at `path` under `key`, or `None` (no file, or one saved for other settings)."""
    import torch

    if not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=False)
    return state if state.get("key") == key else None


def save_figure(fig, name: str, *, out: str, dpi: int, gallery: Optional[str] = None, prefix: str = "") -> None:
    """Write `fig` to `out/name` at `dpi` and, when `gallery` is a folder, a small copy for the
    docs gallery (72 dpi, 128 colours) as `gallery/prefix + name`."""
    fig.savefig(os.path.join(out, name), dpi=dpi)
    if gallery:
        from PIL import Image  # pillow: a matplotlib dependency

        os.makedirs(gallery, exist_ok=True)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=72)
        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(colors=128).save(os.path.join(gallery, prefix + name), optimize=True)


# ---------------------------------------------------------------------------- progress bars


class Bars:
    """tqdm bars on the main process (silent when stderr is not a terminal, absent without tqdm)."""

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            pass

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: no bars without it
            tqdm = None
        self._tqdm = tqdm

    def make(self, **kw):
        """A tqdm bar with `kw`, or a stand-in that does nothing."""
        if not self.enabled or self._tqdm is None:
            return Bars._Null()
        return self._tqdm(disable=None, dynamic_ncols=True, **kw)  # disable=None: quiet when not a TTY
