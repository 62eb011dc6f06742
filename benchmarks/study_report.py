"""Tables and plots from the runs ``benchmarks/optimizer_study.py`` wrote under ``OUT/runs/``.

    python benchmarks/study_report.py OUT [lm,digits]

Writes ``OUT/study_table.md``, ``OUT/summary.json`` and ``OUT/study_<task>.png``,
``OUT/study_lr_<task>.png``, ``OUT/study_momentum.png``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

OPTIMIZERS = ["SM3", "SM3 m=0.9", "Adam", "Adafactor", "Adagrad"]
TITLES = {"lm": "byte-level LM on the Python stdlib", "digits": "CNN on scikit-learn digits"}


def load_runs(out: str) -> list[dict]:
    runs = []
    root = os.path.join(out, "runs")
    for task in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for f in sorted(os.listdir(os.path.join(root, task))):
            if f.endswith(".json"):
                with open(os.path.join(root, task, f)) as fh:
                    runs.append(json.load(fh))
    return runs


def is_default(r: dict) -> bool:
    """A grid/seed run: the optimizer's own momentum and the standard 5% warm-up."""
    return r["momentum"] is None and r["warmup_fraction"] == 0.05


def label(r: dict) -> str:
    s = r["opt"] if r["momentum"] is None else f"SM3 m={r['momentum']:g}"
    if r["warmup_fraction"] != 0.05:
        s += f", warm-up {r['warmup_fraction']:.0%}"
    return s


def fmt_lr(lr: float) -> str:
    return f"{lr:.3g}"


def spread(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if len(finite) == len(values) else float("inf"),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
    }


def summarize(runs: list[dict], tasks: list[str]) -> dict:
    summary = {}
    for task in tasks:
        per_opt = {}
        for opt in OPTIMIZERS:
            grid = sorted(
                (r for r in runs if r["task"] == task and r["opt"] == opt and r["seed"] == 0 and r["phase"] == "grid"),
                key=lambda r: r["lr"],
            )
            if not grid:
                continue
            best = min(grid, key=lambda r: r["result"]["final_loss"])
            at_best = [
                r for r in runs if r["task"] == task and r["opt"] == opt and r["lr"] == best["lr"] and is_default(r)
            ]
            at_best.sort(key=lambda r: r["seed"])
            res = [r["result"] for r in at_best]
            edge = "low" if best is grid[0] else "high" if best is grid[-1] else ""
            refine = sorted(
                (r for r in runs if r["task"] == task and r["opt"] == opt and r["phase"] == "refine"),
                key=lambda r: r["lr"],
            )
            per_opt[opt] = {
                "grid": [(r["lr"], r["result"]["final_loss"]) for r in grid],
                "refine": [(r["lr"], r["result"]["final_loss"]) for r in refine],
                "best_lr": best["lr"],
                "edge": edge,
                "seeds": [r["seed"] for r in at_best],
                "final_loss": spread([x["final_loss"] for x in res]),
                "final_accuracy": spread([x["final_accuracy"] for x in res]) if res[0]["final_accuracy"] is not None else None,
                "state_bytes": res[0]["state_bytes"],
                "param_bytes": res[0]["param_bytes"],
                "n_params": res[0]["n_params"],
                "steps": res[0]["steps"],
                "step_ms_wall": statistics.median(x["step_ms_wall"] for x in res),
                "step_ms_cpu": statistics.median(x["step_ms_cpu"] for x in res),
                "train_wall_s": statistics.median(x["train_wall_s"] for x in res),
            }
        summary[task] = per_opt
    return summary


def curves(runs: list[dict], task: str, opt: str, lr: float):
    """Held-out loss per eval point over the seeds at (opt, lr): steps, wall, cpu, mean, lo, hi, n."""
    rs = [r for r in runs if r["task"] == task and r["opt"] == opt and r["lr"] == lr and is_default(r)]
    n = min(len(r["result"]["evals"]) for r in rs)
    steps = [rs[0]["result"]["evals"][i]["step"] for i in range(n)]
    wall = [statistics.fmean(r["result"]["evals"][i]["wall"] for r in rs) for i in range(n)]
    cpu = [statistics.fmean(r["result"]["evals"][i]["cpu"] for r in rs) for i in range(n)]
    vals = [[r["result"]["evals"][i]["loss"] for r in rs] for i in range(n)]
    return steps, wall, cpu, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals], len(rs)


def mean_update_rms(r: dict) -> float:
    """Median over the measured steps (after warm-up) of RMS(param change) / lr."""
    steps = r["result"]["steps"]
    vals = [u["rms_per_lr"] for u in r["result"]["update_rms"] if u["step"] > r["warmup_fraction"] * steps]
    return statistics.median(vals) if vals else float("nan")


def plot(out: str, runs: list[dict], summary: dict, tasks: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = {o: f"C{i}" for i, o in enumerate(OPTIMIZERS)}
    for task in tasks:
        s = summary[task]
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        axes = axes.ravel()
        for opt, d in s.items():
            steps, wall, cpu, mean, lo, hi, n = curves(runs, task, opt, d["best_lr"])
            lab = f"{opt} lr={fmt_lr(d['best_lr'])} ({n} seeds)"
            for ax, x in zip(axes[:3], (steps, wall, cpu)):
                ax.plot(x, mean, "o-", ms=2.5, color=colors[opt], label=lab)
                ax.fill_between(x, lo, hi, color=colors[opt], alpha=0.2)
        finals = [d["final_loss"]["min"] for d in s.values() if math.isfinite(d["final_loss"]["min"])]
        top = max(d["final_loss"]["max"] for d in s.values() if math.isfinite(d["final_loss"]["max"]))
        span = top - min(finals)
        for ax in axes[:3]:
            ax.set_ylim(min(finals) - 0.1 * span - 0.01, top + 2.5 * span + 0.05)
            ax.set_ylabel("held-out cross-entropy (nats" + ("/byte)" if task == "lm" else ")"))
            ax.grid(alpha=0.3)
        axes[0].set_xlabel("step")
        axes[1].set_xlabel("training wall-clock, s (mean over seeds; niced beside other jobs on 2 cores)")
        axes[2].set_xlabel("training CPU time of the 1-thread process, s (mean over seeds)")
        axes[0].legend(fontsize=7)
        axes[0].set_title(f"{TITLES[task]}: held-out loss at each one's best lr\n(line: mean, band: min-max over seeds)",
                          fontsize=9)
        axes[1].set_title("the same against wall-clock (contended: see the text)", fontsize=9)
        axes[2].set_title("the same against CPU time (what an idle core would take)", fontsize=9)
        # bytes of optimizer state
        names = list(s)
        kib = [s[n]["state_bytes"] / 1024 for n in names]
        bars = axes[3].barh(names, kib, color=[colors[n] for n in names])
        for bar, v in zip(bars, kib):
            axes[3].text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,.1f} KiB", va="center", fontsize=8)
        axes[3].set_xscale("log")
        axes[3].set_xlim(right=max(kib) * 10)
        p0 = next(iter(s.values()))
        axes[3].set_xlabel("optimizer state (KiB, float32, log scale)")
        axes[3].set_title(f"optimizer state for {p0['n_params']:,} params ({p0['param_bytes'] / 1024:,.0f} KiB of weights)",
                          fontsize=9)
        axes[3].invert_yaxis()
        fig.tight_layout()
        path = os.path.join(out, f"study_{task}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

        # learning-rate sensitivity
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for opt, d in s.items():
            lrs, losses = zip(*sorted(d["grid"] + d["refine"]))
            losses = [v if math.isfinite(v) else float("nan") for v in losses]
            ax.plot(lrs, losses, "-", color=colors[opt], label=opt)
            ax.plot(*zip(*d["grid"]), "o", color=colors[opt])
            if d["refine"]:
                ax.plot(*zip(*d["refine"]), "^", color=colors[opt], ms=5)
            f = d["final_loss"]
            ax.errorbar([d["best_lr"]], [f["mean"]], yerr=[[f["mean"] - f["min"]], [f["max"] - f["mean"]]],
                        fmt="s", color=colors[opt], ms=6, capsize=3, mfc="none")
        ax.set_xscale("log")
        ax.set_ylim(min(finals) - 0.02 * (top - min(finals) + 0.1), top + 4 * (top - min(finals) + 0.05))
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final held-out loss")
        ax.set_title(f"{TITLES[task]}: lr grids (seed 0; triangles: the finer check)\n"
                     "squares: mean and min-max over the seeds at the best", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, f"study_lr_{task}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    # momentum: the step size per unit lr, SM3 without and with momentum, at the same lrs
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for opt in ("SM3", "SM3 m=0.9"):
            rs = sorted((r for r in runs if r["task"] == task and r["opt"] == opt and r["seed"] == 0
                         and r["phase"] == "grid"), key=lambda r: r["lr"])
            ax.plot([r["lr"] for r in rs], [mean_update_rms(r) for r in rs], "o-", color=colors[opt], label=opt)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("RMS(parameter change) / lr  (median after warm-up)")
        ax.set_title(f"{TITLES[task]}: step size per unit lr", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "study_momentum.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


def table(runs: list[dict], summary: dict, tasks: list[str]) -> str:
    lines = []
    for task in tasks:
        s = summary[task]
        acc = any(d["final_accuracy"] for d in s.values())
        p0 = next(iter(s.values()))
        lines.append(f"### {TITLES[task]} ({p0['n_params']:,} parameters, {p0['steps']} steps)\n")
        head = "| optimizer | peak lr grid (best in bold) | held-out loss: median [min, max]; mean ± std | "
        head += "held-out accuracy: median [min, max] | " if acc else ""
        head += "optimizer state | step time: CPU (wall) |"
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for opt, d in s.items():
            f = d["final_loss"]
            lrs = ", ".join(("**" + fmt_lr(lr) + "**") if lr == d["best_lr"] else fmt_lr(lr) for lr, _ in d["grid"])
            edge = f" (at the {d['edge']} edge)" if d["edge"] else ""
            q = 4 if task == "digits" else 3
            row = (f"| {opt} | {lrs}{edge} | {f['median']:.{q}f} [{f['min']:.{q}f}, {f['max']:.{q}f}]; "
                   f"{f['mean']:.{q}f} ± {f['std']:.{q}f} ({f['n']} seeds) | ")
            if acc:
                a = d["final_accuracy"]
                row += f"{a['median']:.2%} [{a['min']:.2%}, {a['max']:.2%}] | "
            row += f"{d['state_bytes'] / 1024:,.1f} KiB | {d['step_ms_cpu']:.1f} ms ({d['step_ms_wall']:.0f} ms) |"
            lines.append(row)
        lines.append("")
        lines.append("Grid (seed 0), final held-out loss per peak lr:\n")
        lines.append("| optimizer | " + " | ".join("lr / loss" for _ in range(1)) + " |")
        lines.append("|---|---|")
        for opt, d in s.items():
            cells = ", ".join(f"{fmt_lr(lr)}: {loss:.4f}" if math.isfinite(loss) else f"{fmt_lr(lr)}: diverged"
                              for lr, loss in d["grid"])
            lines.append(f"| {opt} | {cells} |")
        if any(d["refine"] for d in s.values()):
            lines.append("")
            lines.append("Finer check (seed 0): 10^(±1/4) times each best lr, run after the protocol above "
                         "(it did not change which lr the seeds used):\n")
            lines.append("| optimizer | lr / loss |")
            lines.append("|---|---|")
            for opt, d in s.items():
                pts = sorted(d["refine"] + [(d["best_lr"], dict(d["grid"])[d["best_lr"]])])
                best = min(pts, key=lambda x: x[1])
                cells = ", ".join(("**" if p == best else "") + f"{fmt_lr(p[0])}: {p[1]:.4f}" + ("**" if p == best else "")
                                  for p in pts)
                lines.append(f"| {opt} | {cells} |")
        lines.append("")
        # warm-up check: each at its best lr, the 5% warm-up of the protocol against a 20% one
        wu = {}
        for opt, d in s.items():
            rs = [r for r in runs if r["task"] == task and r["opt"] == opt and r["lr"] == d["best_lr"]
                  and r["momentum"] is None and r["warmup_fraction"] == 0.2]
            if rs:
                wu[opt] = spread([r["result"]["final_loss"] for r in rs])
        if wu:
            lines.append("Warm-up check, each at its best lr: the protocol's 5% warm-up against a 20% one "
                         "(run after the protocol):\n")
            lines.append("| optimizer | peak lr | 5% warm-up: median [min, max] (seeds) | 20% warm-up: median [min, max] (seeds) |")
            lines.append("|---|---|---|---|")
            for opt, w in wu.items():
                f = s[opt]["final_loss"]
                def cell(x, q=4 if task == "digits" else 3):
                    return (f"{x['median']:.{q}f} [{x['min']:.{q}f}, {x['max']:.{q}f}] ({x['n']})" if x["n"] > 1
                            else f"{x['median']:.{q}f} (1)")
                lines.append(f"| {opt} | {fmt_lr(s[opt]['best_lr'])} | {cell(f)} | {cell(w)} |")
            lines.append("")
        # momentum study
        extra = [r for r in runs if r["task"] == task and r["phase"] == "momentum"]
        if extra:
            lrs = {s["SM3"]["best_lr"], s["SM3 m=0.9"]["best_lr"]}
            rel = [r for r in runs if r["task"] == task and r["opt"] in ("SM3", "SM3 m=0.9") and r["lr"] in lrs]
            groups = {}
            for r in rel:
                groups.setdefault((label(r), r["lr"]), []).append(r)
            q = 4 if task == "digits" else 3
            lines.append("SM3 without and with momentum, at the two best lrs, with the protocol's 5% warm-up and a "
                         "20% one (all runs of these settings; seeds in brackets):\n")
            lines.append("| run | peak lr | held-out loss: median [min, max] (seeds) | RMS(step)/lr after warm-up, median |")
            lines.append("|---|---|---|---|")
            for (lab, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0].replace(", warm-up 20%", "~"), kv[0][1])):
                f = spread([r["result"]["final_loss"] for r in rs])
                cell = (f"{f['median']:.{q}f} [{f['min']:.{q}f}, {f['max']:.{q}f}] ({f['n']})" if f["n"] > 1
                        else f"{f['median']:.{q}f} (1)")
                rms = statistics.median(mean_update_rms(r) for r in rs)
                lines.append(f"| {lab} | {fmt_lr(lr)} | {cell} | {rms:.3g} |")
            lines.append("")
    return "\n".join(lines)


def report(out: str, tasks: list[str]) -> None:
    runs = load_runs(out)
    tasks = [t for t in tasks if any(r["task"] == t for r in runs)]
    summary = summarize(runs, tasks)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    md = table(runs, summary, tasks)
    with open(os.path.join(out, "study_table.md"), "w") as fh:
        fh.write(md + "\n")
    print(md)
    for p in plot(out, runs, summary, tasks):
        print("wrote", p)


if __name__ == "__main__":
    report(sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "lm,digits").split(","))
