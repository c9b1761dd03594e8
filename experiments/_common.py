"""What the experiment scripts share: settings-dataclass flags, figure saving, MNIST-1D arrays.

Each settings field is declared with :func:`opt` (default and help text); :func:`parse_config` builds
one ``--flag`` per field (``--name/--no-name`` for booleans), applies ``--quick`` overrides,
validates with the script's ``check`` and turns a ``ValueError`` into argparse's one-line
usage error (exit code 2, no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
from typing import Callable, Optional, Sequence, Type, TypeVar

C = TypeVar("C")

_TYPES = {"int": int, "float": float, "str": str}


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


def mnist1d_arrays(n_train: int = 0):
    """`(x_train, y_train, x_test, y_test)` of MNIST-1D, the training set cut to its first
    `n_train` examples (0: all)."""
    from odenet.data import load_dataset

    ds = load_dataset("mnist1d")
    n = n_train or ds.num_train
    return ds.x_train[:n], ds.y_train[:n], ds.x_test, ds.y_test


def opt(default, help: str):
    """A dataclass field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_config(
    cls: Type[C],
    argv: Optional[Sequence[str]],
    *,
    description: str,
    quick: dict,
    check: Callable[[C], None],
) -> C:
    """Parse `argv` into an instance of the settings dataclass `cls`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=f"a short smoke-test run: {quick}")
    for fld in dataclasses.fields(cls):
        flag = "--" + fld.name.replace("_", "-")
        help_text = f"{fld.metadata['help']} (default: {fld.default})"
        kind = fld.type if isinstance(fld.type, str) else fld.type.__name__
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=_TYPES[kind], default=argparse.SUPPRESS, help=help_text)
    args = vars(parser.parse_args(argv))
    config = dataclasses.replace(cls(**(quick if args.pop("quick") else {})), **args)
    try:
        check(config)
    except ValueError as err:
        parser.error(str(err))  # exits with the usage line and the message
    return config
