"""MAML on sinusoid regression with an SM3 inner loop, tasks batched with vmap.

Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of
Deep Networks", ICML 2017, section 5.1: each task is ``y = A sin(x - phase)``
with ``A`` in [0.1, 5], ``phase`` in [0, pi], ``x`` in [-5, 5]; the learner
sees K = 10 points of a new task and adapts in a few gradient steps.

Here the inner loop is ``sm3fn.sm3`` (pure, so the outer loss differentiates
through it with ``torch.func.grad``), the tasks of a meta-batch run in one
``torch.func.vmap``, and the meta-parameters are trained with sm3fn too.

    python examples/maml_sinusoid.py            # about a minute on a laptop CPU
    python examples/maml_sinusoid.py --meta-steps 200 --plot /tmp/fits.png
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch.func import functional_call, grad, grad_and_value, vmap

import sm3fn


def sample_tasks(gen: torch.Generator, n_tasks: int, k: int):
    """Support and query sets of ``n_tasks`` sinusoids, ``k`` points each: shapes (T, k, 1)."""
    amp = torch.empty(n_tasks, 1, 1).uniform_(0.1, 5.0, generator=gen)
    phase = torch.empty(n_tasks, 1, 1).uniform_(0.0, math.pi, generator=gen)
    xs = torch.empty(n_tasks, k, 1).uniform_(-5.0, 5.0, generator=gen)
    xq = torch.empty(n_tasks, k, 1).uniform_(-5.0, 5.0, generator=gen)
    return xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase), (amp, phase)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meta-steps", type=int, default=500)
    ap.add_argument("--meta-batch", type=int, default=25)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--inner-lr", type=float, default=0.03)
    ap.add_argument("--meta-lr", type=float, default=0.1)
    ap.add_argument("--test-tasks", type=int, default=200)
    ap.add_argument("--k", type=int, default=10, help="points per task (K-shot)")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "maml_sinusoid.png"),
                    help="where to save the plot ('' for none; default: examples/out/, which git ignores)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1)
    )
    meta_params = {k: v.detach() for k, v in model.named_parameters()}
    inner_tx = sm3fn.sm3(learning_rate=args.inner_lr)

    def mse(params, x, y):
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    def adapt(params, x, y):
        """``inner_steps`` SM3 steps on one task's support set; differentiable."""
        state = inner_tx.init(params)
        for _ in range(args.inner_steps):
            updates, state = inner_tx.update(grad(mse)(params, x, y), state, params)
            params = sm3fn.apply_updates(params, updates)
        return params

    def post_adaptation_loss(params, xs, ys, xq, yq):
        return mse(adapt(params, xs, ys), xq, yq)

    def meta_loss(params, xs, ys, xq, yq):
        # shared meta-params (in_dims None), per-task data (dim 0): one vmap over the batch
        return vmap(post_adaptation_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq).mean()

    test_tasks = sample_tasks(torch.Generator().manual_seed(12345), args.test_tasks, args.k)

    def evaluate(params) -> float:
        return float(meta_loss(params, *test_tasks[:4]))

    print(f"post-adaptation query MSE on {args.test_tasks} test tasks ({args.inner_steps} SM3 steps, K={args.k})")
    before = evaluate(meta_params)
    print(f"  before meta-training: {before:.3f}")
    initial = dict(meta_params)

    outer_tx = sm3fn.sm3(learning_rate=args.meta_lr, momentum=0.9)
    outer_state = outer_tx.init(meta_params)
    start = time.perf_counter()
    for step in range(1, args.meta_steps + 1):
        xs, ys, xq, yq, _ = sample_tasks(gen, args.meta_batch, args.k)
        g, loss = grad_and_value(meta_loss)(meta_params, xs, ys, xq, yq)
        updates, outer_state = outer_tx.update(g, outer_state, meta_params)
        meta_params = sm3fn.apply_updates(meta_params, updates)
        if step % max(1, args.meta_steps // 10) == 0:
            print(f"  meta-step {step:5d}  meta-batch loss {float(loss):.3f}  ({time.perf_counter() - start:.0f} s)")
    after = evaluate(meta_params)
    print(f"  after meta-training:  {after:.3f}   (before: {before:.3f})")

    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(args, model, initial, meta_params, adapt, test_tasks)


def plot(args, model, initial, meta_params, adapt, test_tasks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, _, _, (amp, phase) = test_tasks
    grid = torch.linspace(-5, 5, 200).unsqueeze(1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for i, ax in enumerate(axes):
        ax.plot(grid, amp[i] * torch.sin(grid - phase[i]), "k", lw=2, label="true task")
        ax.plot(xs[i], ys[i], "k^", label=f"{args.k} support points")
        with torch.no_grad():
            for params, name, style in ((initial, "random init", ":"), (meta_params, "MAML init", "-")):
                pre = functional_call(model, params, (grid,))
                ax.plot(grid, pre, style, color="tab:gray" if name == "random init" else "tab:blue",
                        alpha=0.6, label=f"{name}, before adapting")
            for params, name, color in ((initial, "random init", "tab:orange"), (meta_params, "MAML init", "tab:red")):
                adapted = adapt(params, xs[i], ys[i])
                with torch.no_grad():
                    ax.plot(grid, functional_call(model, adapted, (grid,)), color=color, lw=1.5,
                            label=f"{name}, {args.inner_steps} SM3 steps")
        ax.set_title(f"test task {i}: A={float(amp[i]):.2f}, phase={float(phase[i]):.2f}")
        ax.set_xlabel("x")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
