"""A small transformer sharded with FSDP2 on CPU, trained with SM3 and with Adam.

    torchrun --nproc_per_node 2 examples/fsdp_train.py [--steps 150] [--momentum 0.9]

Every parameter is a DTensor sharded along dim 0 across the ranks
(``torch.distributed.fsdp.fully_shard``, gloo backend).  ``sm3fn.optim.SM3``
steps each rank's shards; the accumulators of the unsharded dims are made
global by one ``all_reduce(MAX)`` per step.  The task is synthetic (no
download): each sequence counts up modulo the vocabulary with its own stride,
so the next token follows from the context.  At the end each rank prints how
much optimizer state it holds for SM3 and for Adam on the same model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from sm3fn.optim import SM3


class TinyLM(nn.Module):
    """Token and position embeddings, pre-norm causal transformer blocks, an output head; returns the loss."""

    def __init__(self, vocab: int = 64, d_model: int = 64, heads: int = 4, layers: int = 2, seq: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:n]
        for block in self.blocks:
            h = block(h, src_mask=self.causal[:n, :n], is_causal=True)
        logits = self.head(self.norm(h))
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def batch(step: int, rank: int, size: int = 16, seq: int = 33, vocab: int = 64):
    """Sequences ``start + stride * t (mod vocab)``; each rank and step draws its own."""
    gen = torch.Generator().manual_seed(step * 1009 + rank)
    start = torch.randint(vocab, (size, 1), generator=gen)
    stride = torch.randint(1, 8, (size, 1), generator=gen)
    tokens = (start + stride * torch.arange(seq)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def sharded_model(seed: int = 0, **sizes) -> nn.Module:
    torch.manual_seed(seed)  # the same initial values on every rank (and for both optimizers)
    model = TinyLM(**sizes)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def state_bytes(optimizer: torch.optim.Optimizer, skip: tuple = ()) -> int:
    """Bytes of optimizer state this rank holds (local shards; replicated tensors in full)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key not in skip:
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def local_param_bytes(model: nn.Module) -> int:
    return sum(p.to_local().numel() * p.element_size() for p in model.parameters())


def train(model, optimizer, steps: int, rank: int, log_every: int, label: str) -> float:
    start = time.perf_counter()
    for step in range(steps):
        loss = model(*batch(step, rank))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % log_every == 0 or step == steps - 1):
            print(f"{label:>5} step {step:4d}  loss {loss.item():.3f}", flush=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.05, help="SM3's learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SM3's momentum (0: no buffer)")
    parser.add_argument("--adam-lr", type=float, default=3e-3)
    args = parser.parse_args()

    if "RANK" not in os.environ:
        raise SystemExit("launch with: torchrun --nproc_per_node 2 examples/fsdp_train.py")
    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    sm3_model, adam_model = sharded_model(), sharded_model()
    sm3 = SM3(sm3_model.parameters(), lr=args.lr, momentum=args.momentum)
    adam = torch.optim.Adam(adam_model.parameters(), lr=args.adam_lr)
    log_every = max(1, args.steps // 6)
    sm3_s = train(sm3_model, sm3, args.steps, rank, log_every, "SM3")
    adam_s = train(adam_model, adam, args.steps, rank, log_every, "Adam")

    sizes = torch.tensor([
        local_param_bytes(sm3_model),
        state_bytes(sm3, skip=("step", "momentum_buffer")),  # the accumulators
        state_bytes(sm3),
        state_bytes(adam, skip=("step",)),
    ])
    everyone = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(everyone, sizes)
    if rank == 0:
        print(f"\n{world} ranks, {args.steps} steps: SM3 {sm3_s:.1f} s, Adam {adam_s:.1f} s (forward+backward+step)")
        print(f"optimizer state per rank, KiB (steps counters left out; SM3 momentum={args.momentum}):")
        print(f"{'rank':>4} {'params':>8} {'SM3 accumulators':>17} {'SM3 total':>10} {'Adam':>8} {'SM3/Adam':>9}")
        for r, (p, acc, s, a) in enumerate(t.tolist() for t in everyone):
            print(f"{r:>4} {p / 1024:8.1f} {acc / 1024:17.1f} {s / 1024:10.1f} {a / 1024:8.1f} {s / a:9.3f}")
    dist.barrier()  # gloo may abort a rank that tears down while the other still prints
    dist.destroy_process_group()
    # torch 2.13 + gloo: worker threads can still hold tensors when the interpreter
    # finalizes, and freeing them then aborts the process ("terminate called without
    # an active exception", about 1 run in 8 here; cf. pytorch/pytorch#179291).  All
    # work is done and the process group is gone: leave without finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
