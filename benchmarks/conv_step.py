"""SM3 step time on a ResNet-50-like conv net (contiguous and channels_last) against fused Adam.

    python benchmarks/conv_step.py                  # float32 and bfloat16, both layouts (~10 minutes)
    python benchmarks/conv_step.py --repeats 15     # more rounds
    python benchmarks/conv_step.py --splits         # the row kernel by row length and split

Runs ``python -m sm3fn.benchmark_conv`` (see :mod:`sm3fn.benchmark_conv` for what is
measured; every argument but ``--out`` goes to it) and keeps its output in ``--out``
(default ``benchmarks/out/``): ``conv_step_output.txt``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import DEFAULT_DIR, printed_into  # noqa: E402

from sm3fn import benchmark_conv  # noqa: E402


def main(argv: Optional[list[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder for the output")
    args, rest = ap.parse_known_args(argv)
    with printed_into(args.out / "conv_step_output.txt"):
        return benchmark_conv.main(rest)


if __name__ == "__main__":
    main()
