"""The documentation is true: its code runs, its versions agree, its site builds strictly.

- Every ```python block in `docs/**/*.md` and `README.md` is executed. The blocks of one page
  run in order in one namespace (a page reads like a notebook), in a temporary working
  directory. A block preceded by the comment `<!-- skip -->` is not run; that is only for
  blocks that need a GPU or torchrun.
- `odenet.__version__`, `pyproject.toml`, `CHANGELOG.md`, `CITATION.cff` and the docs' home page
  name the same version.
- Every ```python example in a public docstring (rendered on the API pages) runs, given the
  imports that docs/api/index.md says examples assume.
- Every concept figure exists and its caption names the script in docs/scripts/ that writes
  it; `-m slow` reruns the scripts (into a temporary folder).
- `odenet.__version__`, `pyproject.toml`, `CHANGELOG.md`, `CITATION.cff` (valid CFF 1.2.0) and
  the docs name the same version.
- `odenet.citation` names Dormand–Prince and Chen et al. for a dopri5 adjoint block, and the
  other method papers by what is in use.
- `mkdocs build --strict` succeeds and renders an entry for every public name (skipped when
  mkdocs is not installed: `pip install -e ".[docs]"`).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import pathlib
import re
import shutil
import subprocess
import sys
import zlib

import pytest
import torch

import odenet

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
_SKIP = re.compile(r"<!--\s*skip\s*-->\s*$")


def python_blocks(path: pathlib.Path):
    """`(line, code, skipped)` for each ```python block of a Markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for m in _FENCE.finditer(text):
        info = m.group("info").strip().split()
        if not info or info[0] not in ("python", "py"):
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        indent = m.group("indent")
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line
                         for line in m.group("body").splitlines())
        line = text.count("\n", 0, m.start()) + 1
        blocks.append((line, code, bool(_SKIP.search(before))))
    return blocks


def _pages():
    pages = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    return [p for p in pages if any(not skipped for _, _, skipped in python_blocks(p))]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    namespace = {"__name__": "__main__"}
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the examples are small: one thread is fastest, and kind to a shared CPU
    try:
        for line, code, skipped in python_blocks(page):
            if skipped:
                continue
            try:
                exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
            except Exception as err:  # pragma: no cover - the failure message is the point
                raise AssertionError(
                    f"the ```python block at {page.relative_to(ROOT)} line {line} failed: {type(err).__name__}: {err}"
                ) from err
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
        torch.set_num_threads(threads)


def test_skip_is_rare():
    """`<!-- skip -->` is for GPU/torchrun-only blocks; keep it an exception."""
    skipped = [(p.relative_to(ROOT), line) for p in sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
               for line, _, s in python_blocks(p) if s]
    assert len(skipped) <= 3, f"too many skipped code blocks: {skipped}"


# ---------------------------------------------------------------------------- docstring examples

def _public_names():
    """(qualified name, object) for every public name: odenet.__all__ and the public modules' __all__."""
    names = [(f"odenet.{n}", getattr(odenet, n)) for n in odenet.__all__ if n not in ("solvers", "plotting")]
    for mod in ("solvers", "measure", "plotting", "regularization", "augment"):
        try:
            module = importlib.import_module(f"odenet.{mod}")
        except ImportError:  # a module another change has not landed yet
            continue
        names += [(f"odenet.{mod}.{n}", getattr(module, n)) for n in getattr(module, "__all__", [])]
    return names


#: What the API reference says every docstring example assumes (docs/api/index.md).
PRELUDE = (
    "import torch\nfrom torch import nn\nimport odenet\n"
    "import odenet.measure, odenet.plotting, odenet.regularization\n"
)


def _documented_objects():
    """(name, object) for every public name, its public methods and properties, and the public modules."""
    out, seen = [], set()
    modules = [("odenet", odenet)] + [(f"odenet.{m}", importlib.import_module(f"odenet.{m}"))
                                      for m in ("solvers", "measure", "plotting", "regularization")
                                      if importlib.util.find_spec(f"odenet.{m}")]
    for name, obj in modules + _public_names():
        if id(obj) in seen or isinstance(obj, (str, tuple, dict, int, float)):
            continue
        seen.add(id(obj))
        out.append((name, obj))
        if isinstance(obj, type):
            for k, v in vars(obj).items():
                if not k.startswith("_") and (callable(v) or isinstance(v, property)) and id(v) not in seen:
                    seen.add(id(v))
                    out.append((f"{name}.{k}", v))
    return out


def _docstring_examples():
    import inspect

    cases = []
    for name, obj in _documented_objects():
        doc = inspect.getdoc(obj) or ""
        for i, m in enumerate(re.finditer(r"```python\n(.*?)```", doc, re.S)):
            cases.append(pytest.param(m.group(1), id=f"{name}[{i}]"))
    return cases


@pytest.mark.parametrize("code", _docstring_examples())
def test_docstring_examples_run(code, tmp_path, monkeypatch):
    """The examples rendered on the API pages run, given the imports docs/api/index.md states."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        exec(compile(PRELUDE + code, "<docstring example>", "exec"), {"__name__": "__main__"})
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- figures


def _concept_figures():
    """(image path, script path) for every figure the pages show from docs/img/concepts/."""
    pairs = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for m in re.finditer(r"\]\(((?:\.\./)*img/concepts/([\w-]+)\.png)\)", text):
            caption = text[m.end(): text.find("</figure>", m.end())]
            script = re.search(r"python (docs/scripts/\w+\.py)", caption)
            pairs.append((page, DOCS / "img" / "concepts" / f"{m.group(2)}.png", script and ROOT / script.group(1)))
    return pairs


def test_concept_figures_are_made_by_scripts():
    pairs = _concept_figures()
    assert len(pairs) >= 5, "the concepts page shows one figure per concept"
    for page, image, script in pairs:
        assert image.exists(), f"{page.name} shows {image.name}, which does not exist"
        assert script is not None, f"the caption of {image.name} in {page.name} does not name the command that made it"
        assert script.exists(), f"{script} (named in the caption of {image.name}) does not exist"
        assert image.name in script.read_text(), f"{script.name} does not write {image.name}"


FIGURE_SCRIPTS = sorted(p for p in (DOCS / "scripts").glob("*.py") if p.name != "griffe_rst_roles.py")


@pytest.mark.slow
@pytest.mark.parametrize("script", FIGURE_SCRIPTS, ids=lambda p: p.name)
def test_figure_scripts_run(script, tmp_path):
    """Each figure script runs (in under a minute) and writes its figure; select with -m slow."""
    out = tmp_path / "figure.png"
    res = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert out.stat().st_size > 10_000


# ---------------------------------------------------------------------------- versions


def _pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)


def test_versions_agree():
    version = _pyproject_version()
    assert odenet.__version__ == version, (
        f"odenet.__version__ is {odenet.__version__} but pyproject.toml says {version}; reinstall with pip install -e ."
    )
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d[^\]]*)\]", changelog, re.M)
    assert released and released[0] == version, f"latest CHANGELOG.md release {released[:1]} != {version}"
    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf'^version:\s*"?{re.escape(version)}"?\s*$', cff, re.M), f"CITATION.cff does not say version {version}"
    assert f"odenet {version}" in (DOCS / "index.md").read_text(), f"docs/index.md does not name odenet {version}"
    assert f"version = {{{version}}}" in (DOCS / "citation.md").read_text(), f"docs/citation.md's BibTeX is not {version}"
    assert f"version = {{{version}}}" in odenet.citation(file=io.StringIO())
    readme = (ROOT / "README.md").read_text()
    if "@software{odenet" in readme:
        entry = readme.split("@software{odenet", 1)[1].split("\n}", 1)[0]
        assert f"version = {{{version}}}" in entry, f"the README's BibTeX entry does not say version {version}"


def test_citation_cff_is_valid():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors", "version"):
        assert cff.get(key), f"CITATION.cff lacks {key}"
    cffconvert = shutil.which("cffconvert")  # optional: pip install cffconvert
    if cffconvert is not None:
        out = subprocess.run([cffconvert, "--validate", "-i", str(ROOT / "CITATION.cff")], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------- citation


def test_citation_of_dopri5_adjoint_block():
    block = odenet.ODEBlock(odenet.MLPDynamics(dim=2), solver="dopri5", gradient="adjoint")
    buf = io.StringIO()
    text = odenet.citation(block, file=buf)
    assert buf.getvalue() == text
    assert "@software{odenet" in text
    assert "Dormand" in text and "Prince" in text and "Chen" in text
    assert "Kidger" not in text and "Dupont" not in text and "Finlay" not in text


def test_citation_by_what_is_in_use():
    from torch import nn

    cite = lambda obj: odenet.citation(obj, file=io.StringIO())  # noqa: E731
    assert cite(None).count("@") == 1  # odenet alone
    assert "Tsitouras" in cite("tsit5") and "Bogacki" in cite(odenet.solvers.Bosh3())
    assert "Kidger" in cite(odenet.ODEBlock(odenet.MLPDynamics(2), gradient="adjoint", adjoint_seminorm=True))
    model = nn.Sequential(
        odenet.Augment(dims=2),
        odenet.ODEBlock(odenet.MLPDynamics(4), solver="rk4", steps=2, regularization=odenet.RNODE(kinetic=0.1)),
        nn.Linear(4, 2),
    )
    text = cite(model)
    assert "Dupont" in text and "Finlay" in text and "Kutta" in text and "Dormand" not in text
    assert text.count("@inproceedings{dupont2019") == 1
    with pytest.raises(ValueError, match="dopri6"):
        cite("dopri6")
    with pytest.raises(TypeError):
        cite(3.0)


# ---------------------------------------------------------------------------- the site


def _resolve(identifier: str):
    parts = identifier.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise AttributeError(identifier)


def _inventory(site: pathlib.Path):
    data = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    body = zlib.decompress(data[header_end:]).decode()
    return [line.split(" ", 1)[0] for line in body.splitlines() if line.startswith("odenet")]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARNING" not in out.stderr, out.stderr

    rendered = {}
    for ident in _inventory(site):
        try:
            rendered.setdefault(id(_resolve(ident)), ident)
        except (AttributeError, ImportError):
            pass
    missing = [name for name, obj in _public_names() if id(obj) not in rendered]
    assert not missing, f"public names without a rendered API entry: {missing}"
