"""A small character-level transformer trained with SM3, Adam and Adagrad; plots to examples/out/.

    python examples/char_lm.py [--steps 600] [--out DIR]

The plots go to ``--out`` (default ``examples/out/``, which git ignores, so a
run leaves the checkout clean); ``--out docs`` refreshes the figures the
documentation shows.

The text is Python's own help pages (``pydoc_data.topics``, shipped with
every CPython: about 465,000 characters, no download).  The same model, the
same initial weights and the same batches are trained with

* SM3 (sm3fn, functional: ``torch.func.grad`` + ``tx.update``), without and
  with momentum,
* ``torch.optim.Adam`` and ``torch.optim.Adagrad``,

each with the SM3 authors' schedule: a quadratic warm-up over the first 5%
of the steps and a linear cool-down to zero over the last 10%
(``sm3fn.schedules.recipe``; for the torch optimizers through ``LambdaLR``).
The default learning rates are the best of a small grid at 300 steps on a
2-core CPU (SM3 0.01-0.4, SM3 with momentum 0.02-0.2, Adam 1e-3-2e-2,
Adagrad 0.01-0.3, by held-out loss); pass ``--lr-*`` to change them.
It saves ``char_lm_loss.png`` (training and held-out loss per step) and
``char_lm_memory.png`` (the bytes of optimizer state each one keeps).
Needs matplotlib and tqdm (``pip install -e ".[examples]"``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

import sm3fn

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(iterable, **kwargs):
        return iterable


# --- data --------------------------------------------------------------------------------------
def load_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


class CharData:
    """The text as int64 codes; the last 10% held out."""

    def __init__(self, text: str, context: int, seed: int):
        chars = sorted(set(text))
        self.vocab = len(chars)
        lookup = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
        split = int(0.9 * len(data))
        self.train, self.valid = data[:split], data[split:]
        self.context = context
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, size: int, split: str = "train", gen: torch.Generator | None = None):
        data = self.train if split == "train" else self.valid
        start = torch.randint(len(data) - self.context - 1, (size,), generator=gen or self.gen)
        idx = start[:, None] + torch.arange(self.context + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]


# --- model -------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.norm(self.blocks(h)))


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# --- training ----------------------------------------------------------------------------------
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def evaluate(model, params, batches) -> float:
    with torch.no_grad():
        losses = [lm_loss(functional_call(model, params, (x,)), y).item() for x, y in batches]
    return sum(losses) / len(losses)


def train_sm3(name, model, data, args, momentum, valid_batches):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = sm3fn.sm3(learning_rate=sm3fn.schedules.recipe(args.lr_sm3, args.steps), momentum=momentum)
    state = tx.init(params)
    # statistics only: the step counter of the schedule is not optimizer memory worth counting
    state_bytes = tensor_bytes(state.exclude("learning_rate").values(include_nested=True, leaves_only=True))

    def loss_fn(p, x, y):
        return lm_loss(functional_call(model, p, (x,)), y)

    step_grad = grad_and_value(loss_fn)
    curve, valid = [], []
    gen = torch.Generator().manual_seed(args.seed)
    for step in tqdm(range(args.steps), desc=name, leave=False):
        x, y = data.batch(args.batch, gen=gen)
        grads, loss = step_grad(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
        curve.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            valid.append((step + 1, evaluate(model, params, valid_batches)))
    return curve, valid, state_bytes


def train_torch(name, model, data, args, make_opt, lr, valid_batches):
    model = copy.deepcopy(model)
    opt = make_opt(model.parameters(), lr)
    recipe = sm3fn.schedules.recipe(1.0, args.steps)  # a factor: Python int step -> Python float
    sched = torch.optim.lr_scheduler.LambdaLR(opt, recipe)
    curve, valid = [], []
    gen = torch.Generator().manual_seed(args.seed)
    for step in tqdm(range(args.steps), desc=name, leave=False):
        x, y = data.batch(args.batch, gen=gen)
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            params = dict(model.named_parameters())
            valid.append((step + 1, evaluate(model, params, valid_batches)))
    state_bytes = sum(
        tensor_bytes(v for k, v in s.items() if k != "step") for s in opt.state.values()
    )
    return curve, valid, state_bytes


def smooth(values, window):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


#: git-ignored (.gitignore): running the example leaves the checkout clean
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def plot(results, args, n_params):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (curve, valid, _, _) in results.items():
        (line,) = ax.plot(smooth(curve, 25), lw=1.2, label=f"{name} (train, 25-step mean)")
        ax.plot(*zip(*valid), "o--", color=line.get_color(), ms=3, lw=0.8, label=f"{name} (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / char)")
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.set_title(f"char-level transformer ({n_params:,} params), {args.steps} steps, recipe schedule")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    loss_path = os.path.join(args.out, "char_lm_loss.png")
    fig.savefig(loss_path, dpi=110)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(results)
    kib = [results[n][2] / 1024 for n in names]
    bars = ax.barh(names, kib, color=[f"C{i}" for i in range(len(names))])
    for bar, v in zip(bars, kib):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,.1f} KiB", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=max(kib) * 8)
    ax.set_xlabel("optimizer state (KiB, log scale; float32)")
    ax.set_title(f"optimizer state for {n_params:,} parameters ({n_params * 4 / 1024:,.0f} KiB of weights)")
    fig.tight_layout()
    mem_path = os.path.join(args.out, "char_lm_memory.png")
    fig.savefig(mem_path, dpi=110)
    return loss_path, mem_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr-sm3", type=float, default=0.1)
    parser.add_argument("--lr-adam", type=float, default=1e-2)
    parser.add_argument("--lr-adagrad", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for the plots (default: %(default)s)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    torch.manual_seed(args.seed)
    data = CharData(load_text(), args.context, args.seed)
    model = CharTransformer(data.vocab, args.context)
    n_params = sum(p.numel() for p in model.parameters())
    vgen = torch.Generator().manual_seed(1234)
    valid_batches = [data.batch(64, "valid", vgen) for _ in range(4)]
    print(f"{len(data.train):,} training characters, vocabulary {data.vocab}, {n_params:,} parameters; "
          f"uniform guess: {math.log(data.vocab):.2f} nats/char")

    results = {}
    runs = [
        ("SM3", lambda: train_sm3("SM3", model, data, args, 0.0, valid_batches)),
        ("SM3 momentum 0.9", lambda: train_sm3("SM3 momentum 0.9", model, data, args, 0.9, valid_batches)),
        ("Adam", lambda: train_torch("Adam", model, data, args, lambda p, lr: torch.optim.Adam(p, lr=lr),
                                     args.lr_adam, valid_batches)),
        ("Adagrad", lambda: train_torch("Adagrad", model, data, args, lambda p, lr: torch.optim.Adagrad(p, lr=lr),
                                        args.lr_adagrad, valid_batches)),
    ]
    for name, run in runs:
        t0 = time.perf_counter()
        curve, valid, state_bytes = run()
        seconds = time.perf_counter() - t0
        results[name] = (curve, valid, state_bytes, seconds)
        print(f"{name:18s} held-out loss {valid[-1][1]:.3f}  last-50 train loss "
              f"{sum(curve[-50:]) / len(curve[-50:]):.3f}  optimizer state {state_bytes / 1024:8.1f} KiB  "
              f"({seconds:.0f} s)")
    for path in plot(results, args, n_params):
        print("wrote", path)


if __name__ == "__main__":
    main()
