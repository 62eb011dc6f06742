"""SM3 step time and memory on GPT-2-style shapes against torch's optimizers and torch-SM3.

    python benchmarks/optimizer_step.py                 # presets 16m and 124m (a few minutes)
    python benchmarks/optimizer_step.py --quick         # seconds
    python benchmarks/optimizer_step.py --repeats 15    # as for the figures in docs/speed.md

Runs ``python -m sm3fn.benchmark`` (see :mod:`sm3fn.benchmark` for what is
measured; every argument but ``--out`` goes to it) and keeps its output and
plot in ``--out`` (default ``benchmarks/out/``): ``benchmark_output.txt`` and
``benchmark.png``, the files that docs/speed.md shows from ``docs/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import DEFAULT_DIR, printed_into  # noqa: E402

from sm3fn import benchmark  # noqa: E402


def main(argv: Optional[list[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder for the output and the plot")
    args, rest = ap.parse_known_args(argv)
    if not any(a == "--plot" or a.startswith("--plot=") for a in rest):
        rest += ["--plot", str(args.out / "benchmark.png")]
    with printed_into(args.out / "benchmark_output.txt"):
        return benchmark.main(rest)


if __name__ == "__main__":
    main()
