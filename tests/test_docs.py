"""The README and the pages under docs/ say what is true: their code runs, their names and files exist.

Every ```python block of README.md and docs/**/*.md (not docs/_incoming/,
the notes waiting to be folded in) runs as written, in page order, all the
blocks of a page in one namespace.  A page may declare one set-up block,
its first Python block, by putting ``<!-- setup -->`` on the line before it;
it shows readers what the other blocks assume, and runs first like the rest.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SETUP_MARKER = "<!-- setup -->"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# `sm3fn.optim.SM3`, `sm3fn.func.expand(tree, n)`: a dotted name the text promises exists
DOTTED_NAME = re.compile(r"(?<![\w/])sm3fn(?:\.[A-Za-z_]\w*)+")
FILE_SUFFIXES = {"md", "py", "png", "txt"}  # `docs/api/sm3fn.md` is a file, not a name
# a file of the repository the text sends readers to (a command, a test, a module)
REPO_FILE = re.compile(r"\b((?:examples|benchmarks|tests|sm3fn|docs)/[\w/.-]*\w\.(?:py|md|png|txt))")
# [text](target): relative links, not web addresses or in-page anchors
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def _pages() -> list[Path]:
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_incoming" not in p.relative_to(ROOT / "docs").parts)
    return [ROOT / "README.md", *docs]


PAGES = _pages()


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, source, is the set-up block) of each Python block, in page order."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) not in ("python", "py"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append((line, match.group(2), before == SETUP_MARKER))
    return blocks


def test_the_block_finder_sees_fences_and_the_set_up_marker():
    text = "x\n<!-- setup -->\n```python\na = 1\n```\n\n```text\nnot code\n```\n```py\nb = a\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n", True), (10, "b = a\n", False)]


def test_there_are_pages_with_code():
    names = {_page_id(p) for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/sparse.md", "docs/func.md"} <= names
    assert sum(len(python_blocks(p.read_text())) for p in PAGES) >= 10


@pytest.mark.slow  # ~20 s in all: the README's drop-in loop builds the fused kernel, a page makes a process group
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text())], ids=_page_id)
def test_code_blocks_run(page: Path, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    setups = [i for i, (_, _, setup) in enumerate(blocks) if setup]
    assert len(setups) <= 1, f"{_page_id(page)}: more than one {SETUP_MARKER} block"
    assert setups in ([], [0]), f"{_page_id(page)}: the {SETUP_MARKER} block must be the page's first Python block"
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    namespace: dict = {"__name__": "__docs__"}
    torch.manual_seed(0)
    try:
        for line, source, _ in blocks:
            # the file name carries the page and line, so a traceback points at the block
            code = compile("\n" * line + source, f"{_page_id(page)}:{line}", "exec")
            exec(code, namespace)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # a page that made a process group
            dist.destroy_process_group()


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_names_files_and_links_exist(page: Path):
    text = page.read_text()
    missing_names = sorted({
        n for n in DOTTED_NAME.findall(text) if n.rsplit(".", 1)[-1] not in FILE_SUFFIXES and not _resolves(n)
    })
    missing_files = sorted({f for f in REPO_FILE.findall(text) if not (ROOT / f).exists()})
    missing_links = sorted(
        target
        for target in set(LINK.findall(text))
        if "://" not in target and not (page.parent / target).exists()
    )
    assert not missing_names, f"{_page_id(page)} names what sm3fn does not have: {missing_names}"
    assert not missing_files, f"{_page_id(page)} names files that do not exist: {missing_files}"
    assert not missing_links, f"{_page_id(page)} links to what does not exist: {missing_links}"


def test_readme_test_command_is_what_ci_runs():
    """`.ci/run` runs the README's test command word for word (split in an install and a run)."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^ {4}(pip install torch==\S+ -e \"\.\[test\]\") && (python -m pytest -q)$", readme, re.M)
    assert command, "README.md lost its test command"
    install, run = command.groups()
    assert install.replace("pip install", "python -m pip install --quiet", 1) in ci
    assert re.search(rf"^{re.escape(run)}$", ci, re.M)


def test_readme_stays_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250
