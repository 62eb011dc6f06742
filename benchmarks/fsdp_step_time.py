"""Optimizer step time on an FSDP2-sharded transformer: SM3 against torch.optim.Adam.

    torchrun --nproc_per_node 2 benchmarks/fsdp_step_time.py [--d-model 256] [--layers 4] [--steps 20]

The model is ``examples/fsdp_train.py``'s TinyLM, sharded along dim 0 on
every rank (gloo, CPU, one thread per rank).  Only ``optimizer.step()`` is
timed (after forward and backward, which FSDP's collectives dominate); each
figure is the median over ``--steps`` steps of the slowest rank's time.  SM3
also pays its one ``all_reduce(MAX)`` per step; its time alone is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from fsdp_train import batch, sharded_model  # noqa: E402

import sm3fn  # noqa: E402
from sm3fn.optim import SM3  # noqa: E402


class Functional:
    """``sm3fn.sm3``'s pure update on the DTensor parameters, copied back in place."""

    def __init__(self, params, **kw):
        self.params = list(params)
        self.tx = sm3fn.sm3(**kw)
        self.state = self.tx.init({str(i): p.detach() for i, p in enumerate(self.params)})

    @torch.no_grad()
    def step(self):
        params = {str(i): p.detach() for i, p in enumerate(self.params)}
        grads = {str(i): p.grad for i, p in enumerate(self.params)}
        updates, self.state = self.tx.update(grads, self.state, params)
        for i, new in sm3fn.apply_updates(params, updates).items():
            self.params[int(i)].copy_(new)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def time_steps(make_optimizer, sizes, steps: int, rank: int) -> float:
    model = sharded_model(**sizes)
    opt = make_optimizer(model.parameters())
    seq = sizes["seq"] + 1
    times = []
    for step in range(steps + 3):  # 3 warm-up steps (state creation, allocator)
        model(*batch(step, rank, size=8, seq=seq, vocab=sizes["vocab"])).backward()
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's
        if step >= 3:
            times.append(elapsed.item())
        opt.zero_grad()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("launch with: torchrun --nproc_per_node 2 benchmarks/fsdp_step_time.py")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = dict(vocab=args.vocab, d_model=args.d_model, heads=4, layers=args.layers, seq=32)

    model = sharded_model(**sizes)
    n_params = sum(p.numel() for p in model.parameters())
    payload = sum(sum(p.shape[1:]) for p in model.parameters() if p.dim() >= 2)
    candidates = {
        "torch.optim.Adam (default)": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "torch.optim.Adam (foreach)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "sm3fn.optim.SM3 (momentum 0)": lambda ps: SM3(ps, lr=0.1),
        "sm3fn.optim.SM3 (momentum 0.9)": lambda ps: SM3(ps, lr=0.1, momentum=0.9),
        "sm3fn.sm3 functional (momentum 0.9)": lambda ps: Functional(ps, learning_rate=0.1, momentum=0.9),
    }
    results = {name: time_steps(make, sizes, args.steps, rank) for name, make in candidates.items()}

    def reduce_time(tensors) -> float:
        times = []
        for _ in range(args.steps):
            dist.barrier()
            start = time.perf_counter()
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    # what sm3fn does (one flat buffer) against one all_reduce per sharded parameter
    one = reduce_time([torch.zeros(payload)])
    per_param = [torch.zeros(sum(p.shape[1:])) for p in model.parameters() if p.dim() >= 2]
    many = reduce_time(per_param)
    if rank == 0:
        print(f"{world} ranks (gloo, CPU, 1 thread each), torch {torch.__version__}; TinyLM d_model={args.d_model}, "
              f"layers={args.layers}, vocab={args.vocab}: {n_params / 1e6:.2f} M parameters, "
              f"{sum(1 for _ in model.parameters())} tensors")
        print(f"SM3's all_reduce(MAX) per step: 1 call, {payload} float32 numbers, {one * 1e3:.2f} ms alone "
              f"(one call per sharded parameter instead: {len(per_param)} calls, {many * 1e3:.2f} ms)")
        adam = results["torch.optim.Adam (default)"]
        print(f"{'optimizer.step()':<38} {'ms/step':>8} {'vs Adam':>8}")
        for name, t in results.items():
            print(f"{name:<38} {t * 1e3:8.2f} {t / adam:8.2f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
