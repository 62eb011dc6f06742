"""mkdocs hook: the docstrings' reStructuredText cross-references as links in the API reference.

The docstrings are read in the terminal (``help()``) and by IDEs, and say
``:func:`sm3fn.sm3``` as Sphinx would.  mkdocstrings renders Markdown, so
without this hook the page shows ``:func:`` before the name.  Each
``:role:`name``` becomes a link to the name's entry (through mkdocs-autorefs;
a name relative to the page's module, like ``SM3`` on the ``sm3fn.optim``
page, is qualified with it), or stays plain code where the site has no entry
(``torch.optim.Optimizer``).  ``Example::`` (reST's literal-block marker)
loses its second colon.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj):<code>~?([\w.]+)</code>")
LITERAL_MARKER = re.compile(r"::</p>")


def _module_of(page_src: str) -> str | None:
    """``api/optim.md`` documents ``sm3fn.optim``; ``api/sm3fn.md`` the package."""
    match = re.fullmatch(r"api/(\w+)\.md", page_src)
    if match is None:
        return None
    return "sm3fn" if match.group(1) == "sm3fn" else f"sm3fn.{match.group(1)}"


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    module = _module_of(page.file.src_uri)

    def link(match: re.Match) -> str:
        name = match.group(1)
        identifier = name if module is None or name.split(".")[0] in ("sm3fn", "torch") else f"{module}.{name}"
        return f'<autoref identifier="{identifier}" optional><code>{name}</code></autoref>'

    return LITERAL_MARKER.sub(":</p>", ROLE.sub(link, html))
