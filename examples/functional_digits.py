"""Train a small MLP on scikit-learn's bundled digits with the functional API.

    python examples/functional_digits.py [--steps 300]

torch.func.grad computes the gradients as a dict, sm3fn turns them into
updates, and sm3fn.apply_updates makes the next parameters: no parameter is
mutated in place.  The optimizer follows the SM3 authors' advice: the
learning rate warms up quadratically over the first 5% of the steps and
cools down linearly to zero over the last 10% (``sm3fn.schedules.recipe``),
and an exponential moving average of the parameters is kept alongside
(``sm3fn.parameter_averaging``); both the final and the averaged parameters
are evaluated.  Needs scikit-learn (``pip install -e ".[examples]"``).
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch.func import functional_call, grad_and_value

import sm3fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the recipe schedule")
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    parser.add_argument("--cooldown-fraction", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.98, help="decay of the parameter average")
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x))
    train, test = perm[:1400], perm[1400:]

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(params, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb)

    def accuracy(params) -> float:
        with torch.no_grad():
            logits = functional_call(model, params, (x[test],))
        return (logits.argmax(-1) == y[test]).float().mean().item()

    schedule = sm3fn.schedules.recipe(
        args.lr, args.steps, warmup_fraction=args.warmup_fraction, cooldown_fraction=args.cooldown_fraction
    )
    tx = sm3fn.named_chain(
        ("opt", sm3fn.sm3(learning_rate=schedule, momentum=args.momentum)),
        # last in the chain: it averages params + updates, the parameters after each step
        ("average", sm3fn.parameter_averaging(decay=args.ema_decay)),
    )
    state = tx.init(params)
    state_numbers = sum(
        t.numel() for t in state["opt"].exclude("learning_rate").values(include_nested=True, leaves_only=True)
    )
    param_numbers = sum(p.numel() for p in params.values())
    print(f"{param_numbers} parameters; SM3 state holds {state_numbers} numbers "
          f"(Adam would hold {2 * param_numbers}); the parameter average holds {param_numbers} more")

    for step in range(args.steps):
        batch = train[torch.randint(len(train), (128,))]
        grads, loss = grad_and_value(loss_fn)(params, x[batch], y[batch])
        updates, state = tx.update(grads, state, params)  # params: needed by the averaging
        params = sm3fn.apply_updates(params, updates)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  lr {schedule(step):.4f}  train loss {loss.item():.4f}")

    averaged = sm3fn.averaged_params(state, like=params)
    print(f"test accuracy {accuracy(params):.3f} (final parameters)")
    print(f"test accuracy {accuracy(averaged):.3f} (parameter EMA, decay {args.ema_decay})")


if __name__ == "__main__":
    main()
