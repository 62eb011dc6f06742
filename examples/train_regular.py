"""A regular PyTorch training loop with sm3fn's SM3: the drop-in for torch-SM3.

Only the import differs from torch-SM3 (``from SM3 import SM3``):

    from sm3fn.optim import SM3

A small convolutional network learns scikit-learn's bundled 8x8 digits (no
download), with the authors' learning-rate recipe through ``LambdaLR``: a
quadratic warm-up, then a linear cool-down to zero over the last 10% of steps.

    python examples/train_regular.py [--epochs 15] [--momentum 0.9]
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from sm3fn.optim import SM3


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),  # 8x8 -> 4x4
        torch.nn.Flatten(),
        torch.nn.LayerNorm(16 * 4 * 4),
        torch.nn.Linear(16 * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=args.seed)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True
    )

    model = make_model()
    opt = SM3(model.parameters(), lr=args.lr, momentum=args.momentum)
    total = args.epochs * len(loader)
    warm_up = max(1, total // 20)
    # the authors' recipe (torch-SM3's README): quadratic warm-up, linear cool-down over the last 10%
    lr_lambda = lambda step: min(1.0, (step / warm_up) ** 2, (total - step) / (0.1 * total))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        model.train()
        return acc

    print(f"test accuracy before training: {accuracy():.3f}")
    bar = tqdm(total=total, desc="SM3", unit="step")
    for epoch in range(args.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
    bar.close()
    state_numbers = sum(v.numel() for s in opt.state.values() for k, v in s.items() if k != "step")
    params = sum(p.numel() for p in model.parameters())
    print(f"test accuracy after training: {accuracy():.3f}")
    print(f"{params} parameters, {state_numbers} optimizer-state numbers "
          f"(momentum={args.momentum}; with momentum=0 only the accumulators remain)")


if __name__ == "__main__":
    main()
