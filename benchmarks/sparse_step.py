"""How much a sparse SM3 step costs next to a dense one on the same table.

A 1,000,000 x 32 float32 embedding; the sparse gradient comes from
``nn.Embedding(sparse=True)`` on a batch of 512 lookups touching 256 distinct
rows (each twice, so the step also coalesces repeats).  The dense gradient is
the same table's full gradient.  Steps run interleaved (sparse, dense,
sparse, ...) on one thread; the script prints median and spread (min to
max) of each, for ``sm3fn.optim.SM3.step`` (in place) and for the functional
``tx.update`` (out of place: it returns a new row accumulator, so its cost
grows with the number of rows, not with the table's size).

    python benchmarks/sparse_step.py [--rows 1000000] [--dim 32] [--touched 256] [--repeats 15] [--out DIR]

What it prints is also saved in ``--out`` (default ``benchmarks/out/``) as
``sparse_step_output.txt``; docs/sparse.md quotes its figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import DEFAULT_DIR, printed_into  # noqa: E402

import sm3fn  # noqa: E402
from sm3fn.optim import SM3  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(name: str, times: list[float]) -> str:
    ms = [t * 1e3 for t in times]
    return f"{name:<34} median {statistics.median(ms):9.3f} ms   (min {min(ms):.3f}, max {max(ms):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--touched", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder for the saved output")
    args = parser.parse_args()
    with printed_into(args.out / "sparse_step_output.txt"):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)

    emb = torch.nn.Embedding(args.rows, args.dim, sparse=True)
    dense = torch.nn.Parameter(emb.weight.detach().clone())
    rows = torch.randperm(args.rows)[: args.touched]
    lookups = rows.repeat(2)[torch.randperm(2 * args.touched)]  # every row twice
    (emb(lookups) * torch.randn(lookups.numel(), args.dim)).sum().backward()
    sparse_grad = emb.weight.grad
    dense.grad = torch.randn(args.rows, args.dim) * 1e-2
    print(f"table {args.rows} x {args.dim} float32; sparse gradient: {lookups.numel()} lookups, "
          f"{args.touched} distinct rows, layout {sparse_grad.layout}, coalesced={sparse_grad.is_coalesced()}")

    opt_sparse, opt_dense = SM3([emb.weight], lr=0.01), SM3([dense], lr=0.01)
    tx_sparse = sm3fn.scale_by_sm3(sparse={"w"})
    tx_dense = sm3fn.scale_by_sm3()
    p = {"w": dense.detach()}
    st_sparse, st_dense = tx_sparse.init(p), tx_dense.init(p)
    for _ in range(2):  # warm-up: state creation, allocator
        opt_sparse.step(), opt_dense.step()
        tx_sparse.update({"w": sparse_grad}, st_sparse), tx_dense.update({"w": dense.grad}, st_dense)

    results = {k: [] for k in ("optim sparse", "optim dense", "functional sparse", "functional dense")}
    for _ in range(args.repeats):  # interleaved, so drift in the machine hits both alike
        results["optim sparse"].append(timed(opt_sparse.step))
        results["optim dense"].append(timed(opt_dense.step))
        results["functional sparse"].append(timed(lambda: tx_sparse.update({"w": sparse_grad}, st_sparse)))
        results["functional dense"].append(timed(lambda: tx_dense.update({"w": dense.grad}, st_dense)))

    print(summary("sm3fn.optim.SM3.step, sparse", results["optim sparse"]))
    print(summary("sm3fn.optim.SM3.step, dense", results["optim dense"]))
    print(summary("scale_by_sm3 update, sparse", results["functional sparse"]))
    print(summary("scale_by_sm3 update, dense", results["functional dense"]))
    for kind in ("optim", "functional"):
        ratio = statistics.median(results[f"{kind} sparse"]) / statistics.median(results[f"{kind} dense"])
        print(f"{kind}: sparse step / dense step (medians) = {100 * ratio:.2f}%")


if __name__ == "__main__":
    main()
