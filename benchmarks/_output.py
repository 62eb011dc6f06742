"""Where the benchmarks put what they print and plot: ``benchmarks/out/`` (ignored by git).

The docs pages quote committed copies under ``docs/`` (``docs/benchmark_output.txt``,
``docs/benchmark.png``, ...); a new run writes here, never over them, and the
copy is refreshed by hand when the figures on the page are.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

DEFAULT_DIR = Path(__file__).resolve().parent / "out"


class _Tee:
    """A stream that writes to the console and to a file."""

    def __init__(self, console: TextIO, file: TextIO):
        self.console, self.file = console, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.console.flush()


@contextlib.contextmanager
def printed_into(path: Path) -> Iterator[Path]:
    """Copies everything printed inside the ``with`` into ``path`` (made with its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as file:
        console, sys.stdout = sys.stdout, _Tee(sys.stdout, file)
        try:
            yield path
        finally:
            sys.stdout = console
    print(f"output saved to {path}")
