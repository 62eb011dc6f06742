"""SM3 step time and memory on GPT-2-style shapes against torch's optimizers and torch-SM3.

    python examples/benchmark.py            # presets 16m and 124m (a few minutes)
    python examples/benchmark.py --quick    # seconds

The same as ``python -m sm3fn.benchmark``; see :mod:`sm3fn.benchmark` for what is measured.
"""

from sm3fn.benchmark import main

if __name__ == "__main__":
    main()
