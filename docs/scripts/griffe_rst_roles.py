"""Griffe extension used by mkdocs.yml: render Sphinx roles in odenet's Markdown docstrings.

A few docstrings write ``:class:`Solution` `` or ``:func:`odeint` `` (reStructuredText roles).
The docstrings are otherwise plain Markdown (rendered with ``docstring_style: null``), where a
role would show up as literal text. This turns each role into inline code: `` `Solution` ``.
It changes only the rendered documentation, never the code.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const):`~?([^`]+)`")


def strip_roles(text: str) -> str:
    """`:class:`X`` -> `` `X` `` (and `:func:`~a.b.c`` -> `` `c` ``, as Sphinx shows it)."""

    def repl(m: re.Match) -> str:
        target = m.group(1)
        if m.group(0).split("`", 1)[1].startswith("~"):
            target = target.rsplit(".", 1)[-1]
        return f"`{target}`"

    return _ROLE.sub(repl, text)


class RstRoles(griffe.Extension):
    """Rewrite reStructuredText roles in every docstring as Markdown inline code."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: D401
        if obj.docstring is not None:
            obj.docstring.value = strip_roles(obj.docstring.value)
