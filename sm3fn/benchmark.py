"""Benchmark: one optimizer step on GPT-2-style parameter shapes, in one process.

    python -m sm3fn.benchmark               # presets 16m and 124m, a few minutes on 2 cores
    python -m sm3fn.benchmark --quick       # a tiny preset, seconds (CI smoke test)
    python -m sm3fn.benchmark --presets 16m --repeats 15 --plot out.png

Every optimizer steps the same parameters with the same random gradients;
the steps are interleaved round-robin (the order rotates each round) so
that a noisy, shared machine slows them all alike, and ratios are taken
within the process.  Reported per optimizer: median step time with its
interquartile range and min, the median (and IQR) over rounds of its step
time divided by fused Adam's in the same round, the optimizer-state bytes, and the extra peak
memory of one step (the peak of the CPU allocator's live bytes during the
step above what was live before it, read from ``torch.profiler``'s memory
events).  It runs on one thread (``torch.set_num_threads(1)``) in float32.

The rows ``sm3fn pure ...`` are the optax-style loop (``tx.update`` +
``apply_updates``, eager and under ``torch.compile``); after each preset a
breakdown says where the pure step's time goes (its parts, and what writing
fresh memory costs with and without huge pages).

Also measured: the overhead of the functional, differentiable update
(``tx.update`` + ``apply_updates`` on dicts, with TensorDict state) over a
plain Python loop calling the same math on the same 200 tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch

import sm3fn
from sm3fn._sm3_math import init_accumulators, sm3_block

__all__ = ["main", "bench_preset", "bench_functional_overhead", "format_table"]

#: name -> (n_embd, n_layer, vocab, n_ctx)
PRESETS = {
    "tiny": (64, 2, 4096, 256),  # ~0.4M parameters, for --quick
    "16m": (256, 4, 50257, 1024),  # ~16.3M
    "124m": (768, 12, 50257, 1024),  # ~124.4M (GPT-2 small, tied head)
}


def gpt2_shapes(n_embd: int, n_layer: int, vocab: int, n_ctx: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a GPT-2 (HF layout: Conv1D weights are (in, out); head tied to wte)."""
    shapes = {"wte": (vocab, n_embd), "wpe": (n_ctx, n_embd)}
    for i in range(n_layer):
        h, e = f"h.{i}.", n_embd
        shapes.update({
            h + "ln_1.weight": (e,), h + "ln_1.bias": (e,),
            h + "attn.c_attn.weight": (e, 3 * e), h + "attn.c_attn.bias": (3 * e,),
            h + "attn.c_proj.weight": (e, e), h + "attn.c_proj.bias": (e,),
            h + "ln_2.weight": (e,), h + "ln_2.bias": (e,),
            h + "mlp.c_fc.weight": (e, 4 * e), h + "mlp.c_fc.bias": (4 * e,),
            h + "mlp.c_proj.weight": (4 * e, e), h + "mlp.c_proj.bias": (e,),
        })
    shapes.update({"ln_f.weight": (n_embd,), "ln_f.bias": (n_embd,)})
    return shapes


def sm3_min_state_bytes(params, itemsize: int = 4) -> int:
    """SM3's own minimum: one accumulator per dimension (the whole tensor for 0-d/1-d)."""
    return itemsize * sum(p.numel() if p.dim() <= 1 else sum(p.shape) for p in params)


def state_bytes(state_tensors) -> int:
    """Bytes of the distinct tensors among ``state_tensors``."""
    seen, total = set(), 0
    for t in state_tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def _kineto_quiet():
    """Sends file descriptor 2 to /dev/null for the block: kineto's C++ writes a
    ``USDT: ... profiler_start``/``profiler_stop`` line there at every profile,
    which no logging setting silences, and the table should be the output."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def step_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the CPU allocator's live bytes while ``fn`` runs, above those live before it.

    Read from ``torch.profiler``'s memory events (every allocation and free
    of the c10 allocator, in order), so it counts the temporaries of fused
    kernels too.  Memory that ``fn`` keeps (new state) counts as well: call
    it after a warm-up step.
    """
    from torch.profiler import ProfilerActivity, profile

    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def _torch_state(opt: torch.optim.Optimizer):
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


#: sm3fn.optim.SM3 variants: name suffix -> keyword arguments
SM3_KERNELS = {
    "fused": {"fused": True},  # what SM3(...) runs by default on a CPU
    "blocked": {"fused": False},  # the eager path: no compiler needed
    "compiled": {"compiled": True},  # the blocked step through torch.compile
}


def make_optimizers(params, include_compiled: bool, include_torch_sm3: bool):
    """name -> (step function, state-tensor function, what runs)."""
    from sm3fn.optim import SM3

    lr = 1e-6  # tiny: every optimizer steps the same shared parameters
    out = {}
    for momentum in (0.0, 0.9):
        for kernel, kwargs in SM3_KERNELS.items():
            if kernel == "compiled" and not include_compiled:
                continue
            opt = SM3(params, lr=lr, momentum=momentum, **kwargs)
            args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            out[f"sm3fn m={momentum:g} {kernel}"] = (
                opt.step, lambda opt=opt: _torch_state(opt), f"sm3fn.optim.SM3({args})")
    candidates = {
        "Adam fused": lambda: torch.optim.Adam(params, lr=lr, fused=True),
        "Adam foreach": lambda: torch.optim.Adam(params, lr=lr, foreach=True),
        "Adagrad": lambda: torch.optim.Adagrad(params, lr=lr),
        "Adafactor": lambda: torch.optim.Adafactor(params, lr=lr),
    }
    if include_torch_sm3:
        try:
            from SM3 import SM3 as TorchSM3

            candidates["torch-SM3"] = lambda: TorchSM3(params, lr=lr)
        except ImportError:
            pass
    for name, make in candidates.items():
        opt = make()
        out[name] = (opt.step, lambda opt=opt: _torch_state(opt), type(opt).__module__ + "." + type(opt).__name__)
    out.update(make_pure_steps(params, lr, include_compiled))
    return out


def make_pure_steps(params, lr: float, include_compiled: bool) -> dict:
    """The optax-style loop, ``tx.update`` + ``apply_updates``, as rows: name -> (step, state, what runs).

    Each row keeps its own parameters (a copy of the shared ones: the pure
    step returns new tensors) and reads the shared ``.grad``.  Eager: the
    fused out-of-place sweep; compiled: ``torch.compile`` of the whole step
    (the differentiable math, fused by inductor).
    """
    out = {}
    for momentum in (0.0, 0.9):
        for compiled in (False, True) if include_compiled else (False,):
            tx = sm3fn.sm3(lr, momentum=momentum)
            box = {"params": {f"p{i}": p.detach().clone() for i, p in enumerate(params)}}
            box["state"] = tx.init(box["params"])

            def pure_step(params, grads, state, tx=tx):
                updates, state = tx.update(grads, state, params)
                return sm3fn.apply_updates(params, updates), state

            run = torch.compile(pure_step) if compiled else pure_step

            def step(run=run, box=box):
                grads = {f"p{i}": p.grad for i, p in enumerate(params)}
                box["params"], box["state"] = run(box["params"], grads, box["state"])

            name = f"sm3fn pure m={momentum:g}" + (" compiled" if compiled else "")
            what = (f"{'torch.compile of ' if compiled else ''}tx.update + apply_updates, "
                    f"tx = sm3fn.sm3(lr, momentum={momentum:g})")
            out[name] = (step, lambda box=box: list(box["state"].values(True, True)), what)
    return out


def bench_preset(preset: str, repeats: int, include_compiled: bool, include_torch_sm3: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    shapes = gpt2_shapes(*PRESETS[preset])
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes.values()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    n = sum(p.numel() for p in params)
    param_bytes = 4 * n
    log(f"[{preset}] {n / 1e6:.1f}M parameters in {len(params)} tensors")
    opts = make_optimizers(params, include_compiled, include_torch_sm3)
    for name, (step, *_) in opts.items():  # warm-up: lazy state, compilation
        t = time.perf_counter()
        step()
        step()
        if time.perf_counter() - t > 5:
            log(f"[{preset}] warm-up of {name}: {time.perf_counter() - t:.0f} s")
    names = list(opts)
    times = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            opts[name][0]()
            times[name].append(time.perf_counter() - t)
    rows = {}
    for name in names:
        ts = sorted(times[name])
        q = _quartiles(ts)
        rows[name] = {
            "median_ms": 1e3 * q[1], "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2],
            "min_ms": 1e3 * ts[0], "state_bytes": state_bytes(opts[name][1]()),
            "peak_bytes": step_peak_bytes(opts[name][0]), "runs": opts[name][2],
        }
        if "Adam fused" in times:
            # paired: each round's step over fused Adam's step of the same round
            rows[name]["x_adam"] = _quartiles([t / a for t, a in zip(times[name], times["Adam fused"])])
    return {"preset": preset, "params": n, "tensors": len(params), "param_bytes": param_bytes,
            "sm3_min_state_bytes": sm3_min_state_bytes(params), "rows": rows}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of ``values``."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def bench_functional_overhead(n_tensors: int = 200, repeats: int = 30, size: int = 64) -> dict:
    """``tx.update`` + ``apply_updates`` (dict in, TensorDict state) vs a plain loop of the same math."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(size, size) if i % 2 == 0 else (size,) for i in range(n_tensors)]
    params = {f"layer{i}.{'weight' if len(s) == 2 else 'bias'}": torch.randn(s, generator=gen)
              for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    tx = sm3fn.sm3(learning_rate=0.01)
    state = tx.init(params)
    plain_accs = [list(init_accumulators(p, torch.float32)) for p in params.values()]

    def functional():
        updates, new_state = tx.update(grads, state, params)
        return sm3fn.apply_updates(params, updates), new_state

    def plain_loop():
        new_params, new_accs = [], []
        for p, g, accs in zip(params.values(), grads.values(), plain_accs):
            u, acc = sm3_block(g, accs, 0.0, 1e-30)
            new_params.append(p + u * -0.01)
            new_accs.append(acc)
        return new_params, new_accs

    from sm3fn import _tree

    flat = _tree.flatten(params, "params")

    def tree_only():  # what the containers alone cost: flatten, rebuild, state TensorDicts
        _tree.flatten(grads, "grads")
        sm3fn.transforms.preconditioner.accumulators_by_param(state["sm3"])
        _tree.unflatten_like(grads, flat)
        _tree.state_tree({k + (f"{sm3fn.base.ACCUMULATOR_PREFIX}0",): v for k, v in flat.items()})

    fns = {"functional": functional, "plain loop": plain_loop, "tree/TensorDict only": tree_only}
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for r in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"tensors": n_tensors, "median_ms": med, "ratio": med["functional"] / med["plain loop"]}


def bench_pure_breakdown(preset: str, repeats: int) -> dict:
    """Where the pure step's time goes: its parts and what fresh memory costs, interleaved.

    Rows (median ms, and over fused Adam's step in the same round): the whole
    pure step (``sm3fn.sm3``, momentum 0), ``tx.update`` alone,
    ``apply_updates`` alone, the in-place ``SM3.step``; and, for one
    parameter-sized set of tensors, writing existing memory (the bandwidth
    floor), writing fresh memory with 4 KiB pages (``empty_like`` + ``fill_``:
    mostly page faults), and fresh memory with huge pages (what the pure path
    allocates, :func:`sm3fn._kernels.fused_cpu.fresh_like`).
    """
    from sm3fn._kernels.fused_cpu import fresh_like
    from sm3fn.optim import SM3

    shapes = gpt2_shapes(*PRESETS[preset])
    gen = torch.Generator().manual_seed(0)
    params = {f"p{i}": torch.randn(s, generator=gen) * 0.02 for i, s in enumerate(shapes.values())}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    tx = sm3fn.sm3(1e-6)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    in_place = [torch.nn.Parameter(p.clone()) for p in params.values()]
    adam_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    for a, b, g in zip(in_place, adam_params, grads.values()):
        a.grad, b.grad = g, g
    sm3_opt, adam = SM3(in_place, lr=1e-6), torch.optim.Adam(adam_params, lr=1e-6, fused=True)
    existing = [torch.empty_like(p) for p in params.values()]
    fns = {
        "pure step m=0": lambda: sm3fn.apply_updates(params, tx.update(grads, state, params)[0]),
        "  tx.update alone": lambda: tx.update(grads, state, params),
        "  apply_updates alone": lambda: sm3fn.apply_updates(params, updates),
        "SM3.step (in place)": sm3_opt.step,
        "write existing memory": lambda: [t.fill_(1.0) for t in existing],
        "write fresh, 4 KiB pages": lambda: [torch.empty_like(p).fill_(1.0) for p in params.values()],
        "write fresh, huge pages": lambda: [fresh_like(p).fill_(1.0) for p in params.values()],
        "Adam fused": adam.step,
    }
    for f in fns.values():
        f()
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {"preset": preset, "rows": {
        name: {"median_ms": 1e3 * statistics.median(ts),
               "x_adam": _quartiles([t / a for t, a in zip(ts, times["Adam fused"])])}
        for name, ts in times.items()}}


def format_breakdown(result: dict) -> str:
    lines = [f"pure step breakdown, preset {result['preset']} (1 thread):",
             f"{'part':28s} {'median ms':>9s} {'x Adam fused (IQR)':>18s}"]
    for name, r in result["rows"].items():
        lines.append(f"{name:28s} {r['median_ms']:9.1f} {_ratio(r):>18s}")
    return "\n".join(lines)


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def format_table(result: dict) -> str:
    rows = result["rows"]
    tsm3 = rows.get("torch-SM3", {}).get("median_ms")
    lines = [
        f"preset {result['preset']}: {result['params'] / 1e6:.1f}M params, {result['tensors']} tensors, "
        f"{_mib(result['param_bytes'])} MiB; SM3 minimum state {_mib(result['sm3_min_state_bytes'])} MiB",
        f"{'optimizer':22s} {'median ms':>9s} {'IQR ms':>15s} {'min ms':>7s} {'x Adam fused (IQR)':>18s} "
        f"{'torch-SM3 /':>11s} {'state MiB':>9s} {'step peak MiB':>13s} {'peak % params':>13s}",
    ]
    for name, r in rows.items():
        lines.append(
            f"{name:22s} {r['median_ms']:9.1f} {r['q1_ms']:7.1f}-{r['q3_ms']:<7.1f} {r['min_ms']:7.1f} "
            f"{_ratio(r):>18s} "
            f"{(tsm3 / r['median_ms'] if tsm3 else float('nan')):11.1f} "
            f"{_mib(r['state_bytes']):>9s} {_mib(r['peak_bytes']):>13s} "
            f"{100 * r['peak_bytes'] / result['param_bytes']:13.2f}"
        )
    lines += [f"  {name}: {r['runs']}" for name, r in rows.items() if name.startswith("sm3fn")]
    return "\n".join(lines)


def _ratio(row: dict) -> str:
    if "x_adam" not in row:
        return "n/a"
    q1, med, q3 = row["x_adam"]
    return f"{med:.2f} ({q1:.2f}-{q3:.2f})"


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(14, 3.6 * len(results)), squeeze=False)
    for ax_t, ax_m, res in zip(axes[:, 0], axes[:, 1], results):
        names = list(res["rows"])
        rows = [res["rows"][n] for n in names]
        med = [r["median_ms"] for r in rows]
        err = [[r["median_ms"] - r["q1_ms"] for r in rows], [r["q3_ms"] - r["median_ms"] for r in rows]]
        colors = ["tab:green" if n.startswith("sm3fn") else "tab:gray" for n in names]
        ax_t.barh(names, med, xerr=err, color=colors)
        ax_t.set_xscale("log")
        ax_t.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax_t.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax_t.set_xlabel("step time, ms (median, IQR; log scale)")
        ax_t.set_title(f"{res['preset']}: {res['params'] / 1e6:.1f}M params, 1 thread")
        ax_t.invert_yaxis()
        state = [r["state_bytes"] / 2**20 for r in rows]
        peak = [r["peak_bytes"] / 2**20 for r in rows]
        y = range(len(names))
        ax_m.barh([i - 0.2 for i in y], state, height=0.4, label="optimizer state", color="tab:blue")
        ax_m.barh([i + 0.2 for i in y], peak, height=0.4, label="extra peak in a step", color="tab:orange")
        ax_m.set_yticks(list(y), names)
        ax_m.set_xscale("symlog", linthresh=0.1)
        ax_m.set_xlabel("MiB (symlog)")
        ax_m.axvline(res["param_bytes"] / 2**20, color="k", ls=":", lw=1, label="parameters")
        ax_m.invert_yaxis()
        ax_m.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), 1 thread")


def main(argv: Optional[list[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=None, choices=sorted(PRESETS) + ["conv"],
                    help="GPT-2 sizes, or conv: a ResNet-50-like net (sm3fn.benchmark_conv)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per optimizer")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 3 repeats, no torch.compile")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled sm3fn variants")
    ap.add_argument("--plot", default="sm3fn_benchmark.png", help="PNG path ('' for none)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the pure step's breakdown")
    args = ap.parse_args(argv)
    presets = args.presets or (["tiny"] if args.quick else ["16m", "124m"])
    repeats = args.repeats or (3 if args.quick else 11)
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    results = []
    for preset in presets:
        if preset == "conv":  # per-shape ratios, contiguous and channels_last, float32 and bfloat16
            from sm3fn import benchmark_conv

            benchmark_conv.run(repeats)
            continue
        res = bench_preset(preset, repeats, include_compiled=not (args.quick or args.no_compile))
        print(format_table(res), flush=True)
        results.append(res)
        if not (args.quick or args.no_breakdown):
            print(format_breakdown(bench_pure_breakdown(preset, repeats)), flush=True)
    over = bench_functional_overhead(repeats=5 if args.quick else 30)
    print(
        f"functional update, {over['tensors']} tensors: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in over["median_ms"].items())
        + f"; functional / plain loop = {over['ratio']:.2f}x"
    )
    if args.plot and results:  # the GPT-2 presets' (the conv preset prints its own tables)
        plot(results, args.plot)
        print(f"plot saved to {args.plot}")
    return results


if __name__ == "__main__":
    main()
