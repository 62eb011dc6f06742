"""Meta-learn SM3's per-layer learning rates by differentiating through training.

A small MLP is trained from a fresh random init with ``sm3fn`` for
``--inner-steps`` full-batch steps on scikit-learn's bundled digits.  The
validation loss at the end is differentiated (``torch.func.grad``) with
respect to the log learning rate of every layer, through all the inner SM3
steps, and the rates follow that hypergradient (Maclaurin, Duvenaud, Adams,
"Gradient-based Hyperparameter Optimization through Reversible Learning",
ICML 2015; Baydin et al., "Online Learning Rate Adaptation with Hypergradient
Descent", ICLR 2018).

The per-layer rates are a six-line transform chained after
``scale_by_sm3``; the rates come in as tensors, so gradients reach them.

    python examples/meta_learn_lr.py          # well under a minute on a laptop CPU
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.func import functional_call, grad, grad_and_value

import sm3fn
from sm3fn.base import GradientTransformation, empty_state


def scale_by_layer(rates: dict[str, torch.Tensor]) -> GradientTransformation:
    """``u -> -rate[layer] * u``, one (differentiable) rate per parameter tensor."""

    def init(params):
        return empty_state()

    def update(updates, state, params=None):
        return {k: -rates[k] * u for k, u in updates.items()}, state

    return GradientTransformation(init, update)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inner-steps", type=int, default=30)
    ap.add_argument("--meta-steps", type=int, default=40)
    ap.add_argument("--initial-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y))
    train, val, test = perm[:1000], perm[1000:1400], perm[1400:]

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    names = [n for n, _ in model.named_parameters()]

    def fresh_init(gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in model.named_parameters():
            bound = 1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1
            out[n] = torch.empty(p.shape).uniform_(-bound, bound, generator=gen)
        return out

    def loss(params, idx):
        return F.cross_entropy(functional_call(model, params, (x[idx],)), y[idx])

    def train_from(params, log_rates):
        tx = sm3fn.chain(sm3fn.scale_by_sm3(), scale_by_layer({n: log_rates[n].exp() for n in names}))
        state = tx.init(params)
        for _ in range(args.inner_steps):
            updates, state = tx.update(grad(loss)(params, train), state, params)
            params = sm3fn.apply_updates(params, updates)
        return params

    def val_loss_after_training(log_rates, params0):
        return loss(train_from(params0, log_rates), val)

    def report(log_rates, label):
        """Test loss and accuracy after training from 5 fresh inits with these rates."""
        losses, accs = [], []
        for s in range(5):
            params = train_from(fresh_init(torch.Generator().manual_seed(10_000 + s)), log_rates)
            with torch.no_grad():
                logits = functional_call(model, params, (x[test],))
            losses.append(float(F.cross_entropy(logits, y[test])))
            accs.append(float((logits.argmax(1) == y[test]).float().mean()))
        rates = ", ".join(f"{n}={float(log_rates[n].exp()):.4f}" for n in names)
        print(f"{label:8s} test loss {sum(losses) / 5:.3f}  accuracy {sum(accs) / 5:.1%}  rates: {rates}")

    log_rates = {n: torch.tensor(args.initial_lr).log() for n in names}
    print(f"SM3 for {args.inner_steps} full-batch steps on digits; meta-learning per-layer learning rates")
    report(log_rates, "initial")

    # hypergradient descent on the log-rates, with sm3fn itself as the meta-optimizer
    meta_tx = sm3fn.sm3(learning_rate=0.3)
    meta_state = meta_tx.init(log_rates)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.meta_steps + 1):
        hypergrad, val_loss = grad_and_value(val_loss_after_training)(log_rates, fresh_init(gen))
        updates, meta_state = meta_tx.update(hypergrad, meta_state, log_rates)
        log_rates = sm3fn.apply_updates(log_rates, updates)
        if step % max(1, args.meta_steps // 8) == 0:
            rates = " ".join(f"{float(log_rates[n].exp()):.4f}" for n in names)
            print(f"  meta-step {step:3d}  val loss {float(val_loss):.3f}  rates [{rates}]  ({time.perf_counter() - start:.0f} s)")
    report(log_rates, "learned")


if __name__ == "__main__":
    main()
