"""Does SM3 train as well as Adam, Adafactor and Adagrad, at equal tuning effort?

    nice -n 19 python benchmarks/optimizer_study.py --jobs 2 [--out benchmarks/out]   # the protocol
    nice -n 19 python benchmarks/optimizer_study.py --jobs 2 --warmup-check --refine    # + the follow-ups
    python benchmarks/optimizer_study.py --quick --out /tmp/study           # a few steps, tiny models
    python benchmarks/optimizer_study.py --report-only --out benchmarks/out # plots + table again

The results and what they say: docs/study.md.

Two tasks, both on data that ships with every machine (no download):

* ``lm``: a byte-level causal transformer on the Python standard library's own
  ``.py`` files (``sysconfig``'s ``stdlib`` directory, ``site-packages``
  excluded).  Whole files are held out for evaluation: a file is held out when
  the CRC-32 of its path relative to the stdlib is 0 mod 10.
* ``digits``: a small CNN on scikit-learn's 8x8 digits (1,797 images; a fixed
  stratified 25% held out), with random one-pixel shifts as augmentation.

Optimizers, each with the same schedule shape (the SM3 authors' recipe,
``sm3fn.schedules.recipe``: quadratic warm-up over the first 5% of the steps,
constant, linear cool-down to zero over the last 10%) through
``torch.optim.lr_scheduler.LambdaLR``:

* ``sm3fn.optim.SM3`` with ``momentum=0`` and ``momentum=0.9``,
* ``torch.optim.Adam``, ``torch.optim.Adafactor``, ``torch.optim.Adagrad``
  (all at their defaults except the learning rate).

Protocol (equal tuning effort): a grid of learning rates per optimizer and
task (seed 0; a value is added beyond an edge while the best sits at that
edge, at most ``--max-extend`` times), then seeds 1 and 2 at each one's best
(so 3 seeds there), then a few extra runs on SM3 with momentum (a 20%
warm-up, the other one's best lr, momentum 0.5) to see why it does worse
than without.  ``--warmup-check`` then gives every optimizer the 20% warm-up
at its best lr and runs all seeds of SM3's momentum 2x2; ``--refine`` runs
seed 0 at 10**(+-1/4) times each best lr.  Each run is a
JSON file under ``OUT/runs/`` and a run whose file exists is skipped, so the
study resumes where it stopped.  ``OUT/study_table.md`` and ``OUT/*.png`` are
the report.

Not run by CI; ``tests/test_study.py`` runs ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sm3fn  # noqa: E402
from sm3fn.optim import SM3  # noqa: E402

OPTIMIZERS = ["SM3", "SM3 m=0.9", "Adam", "Adafactor", "Adagrad"]

# learning-rate grids (factor sqrt(10) apart); the best is checked against the edges
GRIDS = {
    "SM3": [0.01, 0.0316, 0.1, 0.316, 1.0],
    "SM3 m=0.9": [0.01, 0.0316, 0.1, 0.316, 1.0],
    "Adam": [3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2],
    "Adafactor": [1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1],
    "Adagrad": [0.01, 0.0316, 0.1, 0.316, 1.0],
}
GRID_STEP = math.sqrt(10.0)


# --- configuration -------------------------------------------------------------------------------
@dataclass
class TaskConfig:
    steps: int
    batch: int
    evals: int  # held-out evaluations per run (evenly spaced, the last at the final step)
    # lm
    context: int = 0
    dim: int = 0
    layers: int = 0
    heads: int = 0
    eval_batches: int = 0
    # digits
    channels: tuple = ()
    hidden: int = 0


FULL = {
    "lm": TaskConfig(steps=800, batch=32, evals=8, context=64, dim=64, layers=2, heads=4, eval_batches=16),
    "digits": TaskConfig(steps=1000, batch=32, evals=10, channels=(16, 32), hidden=64),
}
QUICK = {
    "lm": TaskConfig(steps=6, batch=4, evals=2, context=16, dim=16, layers=1, heads=2, eval_batches=1),
    "digits": TaskConfig(steps=6, batch=8, evals=2, channels=(4, 8), hidden=8),
}


@dataclass
class Run:
    task: str
    opt: str
    lr: float
    seed: int = 0
    momentum: float | None = None  # SM3 only; None: the optimizer's own (0 or 0.9)
    warmup_fraction: float = 0.05
    phase: str = "grid"
    result: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        name = self.opt.replace(" ", "").replace("=", "")
        extra = ""
        if self.momentum is not None:
            extra += f"_mom{self.momentum:g}"
        if self.warmup_fraction != 0.05:
            extra += f"_wu{self.warmup_fraction:g}"
        return f"{self.task}/{name}_lr{self.lr:.4g}{extra}_s{self.seed}"


# --- data ----------------------------------------------------------------------------------------
def stdlib_files() -> list[tuple[str, str]]:
    """``(relative path, absolute path)`` of the stdlib's ``.py`` files, sorted, site-packages excluded."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                full = os.path.join(dirpath, f)
                out.append((os.path.relpath(full, root), full))
    return sorted(out)


class ByteData:
    """The stdlib's source as bytes; whole files held out (CRC-32 of the relative path % 10 == 0)."""

    def __init__(self, max_bytes: int | None = None):
        train, valid = [], []
        self.n_files = [0, 0]
        for rel, full in stdlib_files():
            try:
                with open(full, "rb") as fh:
                    blob = fh.read()
            except OSError:
                continue
            held = zlib.crc32(rel.encode()) % 10 == 0
            (valid if held else train).append(blob + b"\n")
            self.n_files[held] += 1
        tr, va = b"".join(train), b"".join(valid)
        if max_bytes is not None:
            tr, va = tr[:max_bytes], va[: max_bytes // 4]
        self.train = torch.frombuffer(bytearray(tr), dtype=torch.uint8)
        self.valid = torch.frombuffer(bytearray(va), dtype=torch.uint8)
        self.vocab = 256

    def batch(self, split: str, size: int, context: int, gen: torch.Generator):
        data = self.train if split == "train" else self.valid
        start = torch.randint(len(data) - context - 1, (size,), generator=gen)
        chunk = data[start[:, None] + torch.arange(context + 1)].long()
        return chunk[:, :-1], chunk[:, 1:]


class DigitsData:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1]; a fixed stratified 25% held out."""

    def __init__(self):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        y = torch.tensor(d.target, dtype=torch.int64)
        itr, iva = train_test_split(range(len(y)), test_size=0.25, random_state=0, stratify=d.target)
        self.x_train, self.y_train = x[itr], y[itr]
        self.x_valid, self.y_valid = x[iva], y[iva]

    def batch(self, size: int, gen: torch.Generator):
        idx = torch.randint(len(self.y_train), (size,), generator=gen)
        x = F.pad(self.x_train[idx], (1, 1, 1, 1))
        dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()  # one shift per batch: cheap
        return x[:, :, dy : dy + 8, dx : dx + 8], self.y_train[idx]


# --- models --------------------------------------------------------------------------------------
# The byte-level model is examples/char_lm.py's transformer (one definition of it).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from char_lm import CharTransformer as ByteTransformer  # noqa: E402


class DigitsCNN(nn.Module):
    def __init__(self, channels: tuple, hidden: int):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.head(self.features(x))


# --- optimizers ----------------------------------------------------------------------------------
def make_optimizer(run: Run, params):
    if run.opt.startswith("SM3"):
        momentum = run.momentum if run.momentum is not None else (0.9 if run.opt == "SM3 m=0.9" else 0.0)
        return SM3(params, lr=run.lr, momentum=momentum)
    if run.opt == "Adam":
        return torch.optim.Adam(params, lr=run.lr)
    if run.opt == "Adafactor":
        return torch.optim.Adafactor(params, lr=run.lr)
    if run.opt == "Adagrad":
        return torch.optim.Adagrad(params, lr=run.lr)
    raise ValueError(run.opt)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer statistics: every tensor in ``opt.state`` except the step counters."""
    total = 0
    for s in opt.state.values():
        for k, v in s.items():
            if k != "step" and isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


# --- one run -------------------------------------------------------------------------------------
_DATA: dict = {}


def get_data(task: str, quick: bool):
    if task not in _DATA:
        _DATA[task] = ByteData(max_bytes=200_000 if quick else None) if task == "lm" else DigitsData()
    return _DATA[task]


def build(task: str, cfg: TaskConfig, data):
    if task == "lm":
        model = ByteTransformer(data.vocab, cfg.context, cfg.dim, cfg.heads, cfg.layers)

        def loss_fn(model, batch):
            x, y = batch
            logits = model(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

        def train_batch(gen):
            return data.batch("train", cfg.batch, cfg.context, gen)

        vgen = torch.Generator().manual_seed(1234)
        valid = [data.batch("valid", 32, cfg.context, vgen) for _ in range(cfg.eval_batches)]

        def evaluate(model):
            with torch.no_grad():
                return {"loss": sum(loss_fn(model, b).item() for b in valid) / len(valid)}

    else:
        model = DigitsCNN(cfg.channels, cfg.hidden)

        def loss_fn(model, batch):
            x, y = batch
            return F.cross_entropy(model(x), y)

        def train_batch(gen):
            return data.batch(cfg.batch, gen)

        def evaluate(model):
            with torch.no_grad():
                logits = model(data.x_valid)
                return {
                    "loss": F.cross_entropy(logits, data.y_valid).item(),
                    "accuracy": (logits.argmax(1) == data.y_valid).float().mean().item(),
                }

    return model, loss_fn, train_batch, evaluate


def train(run: Run, cfg: TaskConfig, quick: bool) -> dict:
    data = get_data(run.task, quick)
    torch.manual_seed(run.seed)
    model, loss_fn, train_batch, evaluate = build(run.task, cfg, data)
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(run, model.parameters())
    factor = sm3fn.schedules.recipe(1.0, cfg.steps, warmup_fraction=run.warmup_fraction)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(10_000 + run.seed)
    eval_at = sorted({round(cfg.steps * (i + 1) / cfg.evals) for i in range(cfg.evals)})
    train_loss, evals = [], []
    wall = cpu = 0.0
    update_rms = []  # RMS of the parameter change / current lr, at each eval step (the step's size per unit lr)
    ev = evaluate(model)
    evals.append({"step": 0, "wall": 0.0, "cpu": 0.0, **ev})
    for step in range(1, cfg.steps + 1):
        measure = step in eval_at or step == eval_at[0] // 2
        lr_now = opt.param_groups[0]["lr"]
        if measure:
            before = [p.detach().clone() for p in model.parameters()]
        w0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(model, train_batch(gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        lv = loss.item()
        train_loss.append(lv)
        if not math.isfinite(lv):
            # diverged: record and stop (the remaining evaluations are inf)
            evals.append({"step": step, "wall": wall, "cpu": cpu, "loss": float("inf")})
            break
        if measure and lr_now > 0:
            sq = sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(model.parameters(), before))
            update_rms.append({"step": step, "rms_per_lr": math.sqrt(sq / n_params) / lr_now})
        if step in eval_at:
            ev = evaluate(model)
            if not math.isfinite(ev["loss"]):
                ev["loss"] = float("inf")
            evals.append({"step": step, "wall": wall, "cpu": cpu, **ev})
    final = evals[-1]["loss"] if evals[-1]["step"] == cfg.steps else float("inf")
    return {
        "n_params": n_params,
        "state_bytes": state_bytes(opt),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "steps": cfg.steps,
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "step_ms_wall": 1000 * wall / max(1, len(train_loss)),
        "step_ms_cpu": 1000 * cpu / max(1, len(train_loss)),
        "final_loss": final,
        "final_accuracy": evals[-1].get("accuracy"),
        "evals": evals,
        "train_loss": train_loss,
        "update_rms": update_rms,
    }


# --- orchestration -------------------------------------------------------------------------------
def run_path(out: str, run: Run) -> str:
    return os.path.join(out, "runs", run.key + ".json")


_WARM = []


def _warm_up() -> None:
    """One SM3 step on a dummy parameter, once per process: the first step loads sm3fn's compiled
    CPU kernel (about 1-2 s of wall-clock), which is not what the study's step times should hold."""
    if not _WARM:
        p = torch.nn.Parameter(torch.zeros(2, 2))
        p.grad = torch.ones(2, 2)
        SM3([p], lr=0.1, momentum=0.9).step()
        _WARM.append(True)


def _worker(args):
    run_dict, cfg_dict, quick, out, deadline = args
    if deadline is not None and time.time() > deadline:
        return Run(**run_dict).key, None, 0.0  # past the deadline: start no more runs
    torch.set_num_threads(1)
    _warm_up()
    run = Run(**run_dict)
    cfg = TaskConfig(**cfg_dict)
    t0 = time.time()
    run.result = train(run, cfg, quick)
    path = run_path(out, run)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(asdict(run), fh)
    os.replace(tmp, path)
    return run.key, run.result["final_loss"], time.time() - t0


def load(out: str, run: Run) -> Run | None:
    path = run_path(out, run)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return Run(**json.load(fh))


def execute(runs: list[Run], configs: dict, args) -> None:
    todo = [r for r in runs if load(args.out, r) is None]
    # the cheap task first: on a crowded machine it is done whatever happens to the long one
    todo.sort(key=lambda r: (r.task == "lm",))
    if not todo:
        return
    payload = [(asdict(r), asdict(configs[r.task]), args.quick, args.out, args.deadline_ts) for r in todo]
    print(f"{len(todo)} runs to do", flush=True)
    if args.jobs <= 1:
        results = map(_worker, payload)
    else:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(args.jobs, maxtasksperchild=None)
        results = pool.imap_unordered(_worker, payload)
    for key, loss, secs in results:
        if loss is None:
            print(f"  skipped {key}: past the deadline", flush=True)
            continue
        print(f"  {time.strftime('%H:%M:%S')}  {key:45s} held-out {loss:.4f}  ({secs:.0f} s)", flush=True)
    if args.jobs > 1:
        pool.close()
        pool.join()


def grid_results(out: str, task: str, opt: str) -> list[Run]:
    """Every seed-0 grid run of (task, opt) on disk, sorted by lr."""
    found = []
    d = os.path.join(out, "runs", task)
    if not os.path.isdir(d):
        return found
    for f in os.listdir(d):
        if f.endswith(".json"):
            with open(os.path.join(d, f)) as fh:
                r = Run(**json.load(fh))
            if r.opt == opt and r.seed == 0 and r.phase == "grid":
                found.append(r)
    return sorted(found, key=lambda r: r.lr)


def best_of(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.result["final_loss"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--quick", action="store_true", help="a few steps, tiny models (for the test)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--tasks", default="lm,digits")
    parser.add_argument("--seeds", type=int, default=3, help="seeds at each optimizer's best lr (incl. seed 0)")
    parser.add_argument("--max-extend", type=int, default=2, help="grid values added beyond an edge, at most")
    parser.add_argument("--no-momentum-study", action="store_true")
    parser.add_argument("--warmup-check", action="store_true",
                        help="afterwards, a 20%% warm-up at each best lr (3 seeds for SM3 m=0.9 and Adam) and 3 seeds "
                             "of SM3's momentum 2x2 (momentum 0/0.9 x both best lrs x 5%%/20%% warm-up)")
    parser.add_argument("--refine", action="store_true",
                        help="afterwards, seed 0 at 10**(+-1/4) times each best lr (a grid twice as fine there)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--deadline", default=None,
                        help="HH:MM (UTC, today): start no run after it; the report covers what finished")
    args = parser.parse_args(argv)
    args.deadline_ts = None
    if args.deadline:
        import datetime as dt

        hh, mm = map(int, args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        args.deadline_ts = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    tasks = args.tasks.split(",")
    configs = QUICK if args.quick else FULL
    grids = {k: (v[1:4] if args.quick else v) for k, v in GRIDS.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump({"configs": {t: asdict(configs[t]) for t in tasks}, "grids": grids, "quick": args.quick}, fh)

    if not args.report_only:
        t_start = time.time()
        # 1. the grid, seed 0
        execute([Run(t, o, lr) for t in tasks for o in OPTIMIZERS for lr in grids[o]], configs, args)
        # 2. extend a grid while its best sits at an edge
        for _ in range(0 if args.quick else args.max_extend):
            more = []
            for t in tasks:
                for o in OPTIMIZERS:
                    rs = grid_results(args.out, t, o)
                    if len(rs) < 2:
                        continue
                    b = best_of(rs)
                    if b is rs[0]:
                        more.append(Run(t, o, float(f"{b.lr / GRID_STEP:.3g}")))
                    elif b is rs[-1]:
                        more.append(Run(t, o, float(f"{b.lr * GRID_STEP:.3g}")))
            if not more:
                break
            execute(more, configs, args)
        # 3. more seeds at each one's best
        best = {(t, o): best_of(grid_results(args.out, t, o)) for t in tasks for o in OPTIMIZERS
                if grid_results(args.out, t, o)}
        seeds = [Run(t, o, best[t, o].lr, seed=s, phase="seeds") for (t, o) in best for s in range(1, args.seeds)]
        execute(seeds, configs, args)
        # 4. SM3 with momentum: a longer warm-up (20%) at its best lr (and SM3 without momentum
        #    with the same), and momentum 0.5 at the best lr of SM3 without momentum
        if not args.no_momentum_study:
            extra = []
            for t in tasks:
                if (t, "SM3") not in best or (t, "SM3 m=0.9") not in best:
                    continue
                lr_m, lr_0 = best[t, "SM3 m=0.9"].lr, best[t, "SM3"].lr
                # a 2x2 at the 20% warm-up: {no momentum, momentum 0.9} x {the two best lrs}
                extra += [Run(t, "SM3 m=0.9", lr_m, warmup_fraction=0.2, phase="momentum")]
                extra += [Run(t, "SM3", lr_0, warmup_fraction=0.2, phase="momentum")]
                extra += [Run(t, "SM3", lr_0, momentum=0.5, phase="momentum")]
                if lr_m != lr_0:
                    extra += [Run(t, "SM3", lr_m, warmup_fraction=0.2, phase="momentum")]
                    extra += [Run(t, "SM3 m=0.9", lr_0, warmup_fraction=0.2, phase="momentum")]
            execute(extra, configs, args)
        # 5. optional: does a 4x longer warm-up (20%) help SM3 with momentum, and the others too?
        #    SM3 m=0.9 and Adam on 3 seeds, the rest on seed 0, each at its best lr.
        if args.warmup_check:
            wu = []
            for (t, o), b in best.items():
                n = args.seeds if o in ("SM3 m=0.9", "Adam") else 1
                wu += [Run(t, o, b.lr, seed=sd, warmup_fraction=0.2, phase="warmup") for sd in range(n)]
            # and every seed of the momentum 2x2 (momentum 0 / 0.9, both best lrs, 5% / 20% warm-up)
            for t in tasks:
                if (t, "SM3") in best and (t, "SM3 m=0.9") in best:
                    for o in ("SM3", "SM3 m=0.9"):
                        for lr in {best[t, "SM3"].lr, best[t, "SM3 m=0.9"].lr}:
                            for w in (0.05, 0.2):
                                wu += [Run(t, o, lr, seed=sd, warmup_fraction=w, phase="momentum")
                                       for sd in range(args.seeds)]
            execute(wu, configs, args)
        # 6. optional: is the best between two grid values?  The same two extra values for everyone.
        if args.refine:
            fine = [Run(t, o, float(f"{best[t, o].lr * f:.3g}"), phase="refine")
                    for (t, o) in best for f in (10 ** -0.25, 10 ** 0.25)]
            execute(fine, configs, args)
        print(f"study runs took {time.time() - t_start:.0f} s wall", flush=True)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from study_report import report  # noqa: E402  (benchmarks/study_report.py)

    report(args.out, tasks)


if __name__ == "__main__":
    main()
