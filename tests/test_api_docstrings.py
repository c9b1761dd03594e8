"""Lean docstrings: full sections on the entry points, a line or two elsewhere, and at most about
0.35 docstring lines per code line in `odenet/` (the architecture issue; DESIGN.md, "Style").

**Which names.** `odenet` and every public module of the package (found on disk, no part of the
dotted name starting with `_`); the functions and classes in their `__all__`; and the public
methods and properties defined in those classes' bodies (what mkdocstrings renders). Data
(`SOLVERS`, `__version__`, the tableau objects) is documented in the page text and skipped.

**Every name** has a docstring of at least one line: a class its own (not a base class's, nor a
dataclass's generated signature); a method that overrides a documented one
(`nn.Module.extra_repr`) may inherit it, as `inspect.getdoc` does.

**Entry points** (`ENTRY_POINTS`: `odeint`, the blocks, `swap_blocks`, the typed options, the
plotting functions, and the public classes and functions listed with them) keep full Markdown
sections, rendered by mkdocstrings (`docstring_style: null`). For each, itself (not its methods):

1. **Example:** an `**Example:**` section with code: a ```python block (`tests/test_docs.py`
   runs it), or inline code where one line shows it all (`odenet.Direct()`).
2. **Arguments:** when it takes parameters (a class: those of `inspect.signature(cls)`, not for
   an `Enum`; private `_names` left out), an `**Arguments:**` (a class may say `**Fields:**`)
   bullet list naming each one in backticks (`*args`/`**kwargs` as `args`/`kwargs`); one
   bullet may name several.
3. **Returns:** a function that returns something (a return annotation other than `None`, or
   without one a `return <value>` or `yield` in its own body) has a `**Returns:**` section.
4. **Raises:** when the code raises, a `**Raises:**` section. "The code" is the function's body,
   or a class's own `__init__`, `__new__` and `__post_init__` (not `Enum.__new__`), plus the
   private helpers it calls from its module (`_helper(...)`) or class (`self._helper(...)`),
   transitively. A bare re-`raise` and `raise AssertionError` (an unreachable branch) do not count.

**The ratio.** For each `.py` file under `odenet/`: *docstring lines* are the lines spanned by the
docstrings of the module, its classes and its functions (the string literal that is the first
statement of the body, as `ast.get_docstring` finds it), from the opening to the closing quotes,
blank lines inside included. *Code lines* are the other lines that are neither blank nor a
comment (first non-blank character `#`). The ratio is the sum of docstring lines over the sum of
code lines, over all files; it must be at most `MAX_DOC_RATIO`.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import pathlib
import pkgutil
import re
import textwrap

import pytest

import odenet

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "odenet"
MAX_DOC_RATIO = 0.35

#: The names that keep full sections: the issue's entry points, then the public classes and
#: functions a reader starts from. Every other public name needs a line or two.
ENTRY_POINTS = (
    "odenet.odeint", "odenet.ResBlock", "odenet.ODEBlock", "odenet.swap_blocks",
    "odenet.Fixed", "odenet.Adaptive", "odenet.Direct", "odenet.Adjoint", "odenet.Checkpoint",
    *(f"odenet.plotting.{n}" for n in odenet.plotting.__all__),
    "odenet.Solution", "odenet.SolveStats", "odenet.SolverError", "odenet.Status",
    "odenet.MLPDynamics", "odenet.ConvDynamics", "odenet.PreActBasicDynamics", "odenet.PreActBottleneckDynamics",
    "odenet.TransformerDynamics",
    "odenet.Augment", "odenet.RNODE", "odenet.citation",
    "odenet.solvers.ButcherTableau", "odenet.solvers.ExplicitRK", "odenet.solvers.PIController",
    "odenet.measure.saved_tensors", "odenet.measure.host_reads", "odenet.measure.median_time",
    "odenet.measure.cuda_peak_memory", "odenet.measure.synchronize",
)


def _resolve(dotted: str):
    """The object an `ENTRY_POINTS` name stands for (`odenet.citation` is the function)."""
    obj = odenet
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def _public_modules():
    """`odenet` and its public modules, as (name, module), found on disk."""
    out = [("odenet", odenet)]
    for info in pkgutil.walk_packages(odenet.__path__, "odenet."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            out.append((info.name, importlib.import_module(info.name)))
    return out


def _public_names():
    """(name, object) for every public module, `__all__` function and class, and public method
    and property of those classes; each object once, under its first name."""
    out, seen = [], set()

    def add(name, obj):
        if id(obj) not in seen:
            seen.add(id(obj))
            out.append((name, obj))

    for mod_name, module in _public_modules():
        add(f"module {mod_name}", module)
        for n in getattr(module, "__all__", []):
            member = getattr(module, n)
            if inspect.isfunction(member) or isinstance(member, type):
                add(f"{mod_name}.{n}", member)
                for k, v in vars(member).items() if isinstance(member, type) else ():
                    v = v.__func__ if isinstance(v, (staticmethod, classmethod)) else v
                    if not k.startswith("_") and (inspect.isfunction(v) or isinstance(v, property)):
                        add(f"{mod_name}.{n}.{k}", v)
    return out


PUBLIC = _public_names()


# ---------------------------------------------------------------------------- code analysis


def _tree(func):
    """The AST of a function's definition (or None when its source is unavailable)."""
    try:
        src = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    node = ast.parse(src).body[0]
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _own_nodes(fn: ast.AST):
    """The nodes of a function's body, not descending into nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _returns_something(func) -> bool:
    fn = _tree(func)
    if fn is None:
        return False
    if fn.returns is not None:
        return not (isinstance(fn.returns, ast.Constant) and fn.returns.value in (None, "None"))
    for node in _own_nodes(fn):
        if isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                return True
        if isinstance(node, (ast.Yield, ast.YieldFrom)):
            return True
    return False


def _helper(node: ast.Call, module_globals, owner):
    """The private module- or class-level function a call names, or None."""
    f = node.func
    if isinstance(f, ast.Name) and f.id.startswith("_"):
        return module_globals.get(f.id)
    if (isinstance(f, ast.Attribute) and f.attr.startswith("_") and not f.attr.startswith("__")
            and isinstance(f.value, ast.Name) and f.value.id in ("self", "cls") and owner is not None):
        helper = inspect.getattr_static(owner, f.attr, None)
        return helper.__func__ if isinstance(helper, (staticmethod, classmethod)) else helper
    return None


def _raises(func, owner=None, _seen=None) -> bool:
    """Whether `func` raises, directly or through private helpers of its module or class."""
    _seen = set() if _seen is None else _seen
    if id(func) in _seen:
        return False
    _seen.add(id(func))
    fn = _tree(func)
    if fn is None:
        return False
    for node in ast.walk(fn):  # nested validation helpers count too
        if isinstance(node, ast.Raise) and node.exc is not None and not _is_assertion(node.exc):
            return True
        if isinstance(node, ast.Call):
            helper = _helper(node, getattr(func, "__globals__", {}), owner)
            if inspect.isfunction(helper) and _raises(helper, owner, _seen):
                return True
    return False


def _is_assertion(exc: ast.AST) -> bool:
    """`raise AssertionError(...)` marks an unreachable branch, not a documented error."""
    target = exc.func if isinstance(exc, ast.Call) else exc
    return isinstance(target, ast.Name) and target.id == "AssertionError"


def _class_raises(cls) -> bool:
    for k in ("__init__", "__new__", "__post_init__"):
        f = vars(cls).get(k)
        if isinstance(f, staticmethod):
            f = f.__func__
        own = inspect.isfunction(f) and f.__qualname__.startswith(cls.__qualname__ + ".")  # not Enum.__new__
        if own and _raises(f, cls):
            return True
    return False


def _parameters(obj):
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return []
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if not p.name.startswith("_")]


# ---------------------------------------------------------------------------- sections


def _section(doc: str, title: str):
    """The text of section `**title:**` up to the next `**Section:**` heading, or None."""
    m = re.search(rf"^\*\*{title}:\*\*(.*?)(?=^\*\*[A-Z][\w ]*:\*\*|\Z)", doc, re.M | re.S)
    return None if m is None else m.group(1)


def _problems(name, obj):
    """What the full sections of an entry point lack (rules 1–4 of the module docstring)."""
    doc = inspect.getdoc(obj) or ""
    problems = []
    example = _section(doc, "Example")
    if example is None or not re.search(r"^```python\n.*?^```|`[^`\n]+`", example, re.M | re.S):
        problems.append(f"{name}: no **Example:** section with code")
    params = _parameters(obj)
    if params:
        args = _section(doc, "Arguments")
        if args is None and isinstance(obj, type):
            args = _section(doc, "Fields")  # a dataclass may list its fields instead
        if args is None or not re.search(r"^\s*- ", args, re.M):
            problems.append(f"{name}: takes {params} but has no **Arguments:** bullet list")
        else:
            missing = [p for p in params if not re.search(rf"`(\*{{0,2}}){p}[`=:(]", args)]
            if missing:
                problems.append(f"{name}: **Arguments:** does not name {missing}")
    if not isinstance(obj, type) and _returns_something(obj) and _section(doc, "Returns") is None:
        problems.append(f"{name}: returns a value but has no **Returns:** section")
    raises = _class_raises(obj) if isinstance(obj, type) else _raises(obj)
    if raises and _section(doc, "Raises") is None:
        problems.append(f"{name}: raises but has no **Raises:** section")
    return problems


def test_entry_points_are_public_names():
    public = {id(obj) for _, obj in PUBLIC}
    assert [n for n in ENTRY_POINTS if id(_resolve(n)) not in public] == []
    assert len(PUBLIC) >= 60


def test_public_names_are_the_installed_package():
    # The experiments' kit (data sets, model presets, training loops) lives in experiments/kit,
    # outside the installed package, so every name here is odenet's own.
    assert not [n for n, _ in PUBLIC if n.split(".")[1:2] in (["data"], ["models"], ["training"])]


def _docstring(obj) -> str:
    """A class's own docstring, from its source (not a base class's, nor a dataclass's generated
    signature); a module's; a function's or property's, inherited when it overrides one."""
    if isinstance(obj, type):
        return ast.get_docstring(ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]) or ""
    return inspect.getdoc(obj) or ""


@pytest.mark.parametrize("name,obj", [pytest.param(n, o, id=n) for n, o in PUBLIC])
def test_every_public_name_has_a_docstring(name, obj):
    assert _docstring(obj).strip(), f"{name} has no docstring"


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_points_have_full_sections(name):
    problems = _problems(name, _resolve(name))
    assert not problems, "\n".join(problems)


def test_rules_on_examples():
    """The rules themselves: a tiny function of each kind is judged as the module docstring says."""

    def good(x: int) -> int:
        """Double.

        **Arguments:**

        - `x`: a number.

        **Returns:** `2 * x`.

        **Raises:** `ValueError` if `x` is negative.

        **Example:**

        ```python
        assert 1 + 1 == 2
        ```
        """
        if x < 0:
            raise ValueError(x)
        return 2 * x

    def bad(x):
        """Double, undocumented."""
        return _check(x)

    assert _problems("good", good) == []
    assert len(_problems("bad", bad)) == 4  # example, arguments, returns, raises (via _check)


def _check(x):
    if x < 0:
        raise ValueError(x)
    return 2 * x


# ---------------------------------------------------------------------------- the ratio


def doc_and_code_lines(source: str):
    """(docstring lines, code lines) of one module's source, counted as the module docstring says."""
    doc = set()
    for node in ast.walk(ast.parse(source)):
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        if isinstance(node, kinds) and ast.get_docstring(node, clean=False) is not None:
            doc.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    code = sum(1 for i, line in enumerate(source.splitlines(), 1)
               if i not in doc and line.strip() and not line.lstrip().startswith("#"))
    return len(doc), code


def test_ratio_counts_as_documented():
    source = '"""Module.\n\nMore."""\n\nimport os  # a comment\n\n\ndef f():\n    """One line."""\n' \
             '    # a comment line\n    s = """not a docstring"""\n    return s\n'
    assert doc_and_code_lines(source) == (4, 4)  # docstrings 3 + 1; import, def, s = ..., return


def test_docstring_to_code_ratio():
    counts = {p.relative_to(ROOT): doc_and_code_lines(p.read_text(encoding="utf-8"))
              for p in sorted(PACKAGE.rglob("*.py"))}
    doc, code = sum(d for d, _ in counts.values()), sum(c for _, c in counts.values())
    worst = sorted(counts.items(), key=lambda kv: -kv[1][0] / max(kv[1][1], 1))[:5]
    assert doc / code <= MAX_DOC_RATIO, (
        f"odenet/ has {doc} docstring lines for {code} code lines, ratio {doc / code:.3f} > {MAX_DOC_RATIO}; "
        "the highest: " + ", ".join(f"{p} {d}/{c}" for p, (d, c) in worst)
    )
