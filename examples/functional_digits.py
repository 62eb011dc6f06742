"""Train a small MLP on scikit-learn's bundled digits with the functional API.

    python examples/functional_digits.py [--steps 300]

torch.func.grad computes the gradients as a dict, sm3fn.sm3 turns them into
updates, and sm3fn.apply_updates makes the next parameters: no parameter is
mutated in place.  Needs scikit-learn (`pip install -e ".[examples]"`).
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch.func import functional_call, grad_and_value

import sm3fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.0)
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

    tx = sm3fn.sm3(learning_rate=args.lr, momentum=args.momentum)
    state = tx.init(params)
    state_numbers = sum(t.numel() for t in state.values(include_nested=True, leaves_only=True))
    param_numbers = sum(p.numel() for p in params.values())
    print(f"{param_numbers} parameters; SM3 state holds {state_numbers} numbers "
          f"(Adam would hold {2 * param_numbers})")

    for step in range(args.steps + 1):
        batch = train[torch.randint(len(train), (128,))]
        grads, loss = grad_and_value(loss_fn)(params, x[batch], y[batch])
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
        if step % 50 == 0:
            print(f"step {step:4d}  train loss {loss.item():.4f}")

    with torch.no_grad():
        logits = functional_call(model, params, (x[test],))
        accuracy = (logits.argmax(-1) == y[test]).float().mean().item()
    print(f"test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
