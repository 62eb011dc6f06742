"""The Triton kernel (sm3fn/_kernels/triton_gpu.py), run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET=1 (set per test: kernels are jitted or interpreted as it says
when they are built, and cached per mode) runs the generated kernels on CPU
tensors, atomics included.  Held to the float64 reference (tests/reference.py),
and to the fused CPU kernel, whose arithmetic is traced from the same
_sm3_math functions: in the interpreter the two agree bit for bit.  No GPU
has run these kernels; these tests are all that checks them.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="the Triton backend's tests need triton (pip install triton)")

from helpers import assert_kernel_matches_reference
from helpers import exact_in as _exact  # noqa: E402  (the same inputs as the CPU kernel's tests)
from helpers import kernel_state as _state
from reference import ReferenceSM3, random_gradient  # noqa: E402

import sm3fn  # noqa: E402
from sm3fn._kernels import fused_cpu, triton_gpu  # noqa: E402
from sm3fn._kernels.dispatch import sm3_step_  # noqa: E402
from sm3fn.optim import SM3  # noqa: E402

SHAPES = [(), (1,), (7,), (40,), (3, 37), (17, 16), (1, 5), (5, 1), (2, 3, 19), (2, 1, 3, 5)]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Kernels built in these tests run in the interpreter; small blocks, so that rows and
    columns span several blocks and end in partial ones."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_gpu, "ROWS_BLOCK", (4, 8))
    monkeypatch.setattr(triton_gpu, "FLAT_BLOCK", 16)


HYPER = dict(momentum=0.0, beta=0.0, eps=1e-30)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.3, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_float64_reference(shape, momentum, beta, dtype):
    """Four steps of random gradients (zero rows and columns included) against the reference;
    bfloat16/float16 parameters keep float32 statistics (as in test_kernels_fused_cpu.py)."""
    steps = 4
    rng = np.random.default_rng(abs(hash((shape, momentum, beta, 1))) % 2**32)
    p0 = _exact(rng.standard_normal(shape), dtype)
    ref = ReferenceSM3(p0, lr=0.07, momentum=momentum, beta=beta)
    p = torch.tensor(p0).to(dtype)
    accs, m = _state(p, momentum)
    assert triton_gpu.supported(p, p, accs, m)
    for _ in range(steps):
        g = _exact(random_gradient(rng, shape) * 10.0 ** rng.integers(-3, 3), dtype)
        ref.step(g)
        triton_gpu.sweep_(p, torch.tensor(g).to(dtype), accs, m, lr=0.07, momentum=momentum,
                          beta=beta, eps=1e-30)
    assert_kernel_matches_reference(p, accs, m, ref, steps)


def _many(shapes, dtype, momentum, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    states = [_state(p, momentum) for p in params]
    return params, [a for a, _ in states], [m for _, m in states]


def _clone(params, accs, moms):
    return ([p.clone() for p in params], [[a.clone() for a in aa] for aa in accs],
            [None if m is None else m.clone() for m in moms])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.6, 0.9)])
def test_many_tensors_in_one_call_match_the_cpu_kernel_bit_for_bit(dtype, momentum, beta):
    """Every rank 0-d to 4-d, stepped together, against fused_cpu tensor by tensor: the same
    traced arithmetic (IEEE division and square root, fused multiply-adds), the same bits."""
    shapes = [(), (1,), (33,), (9, 20), (1, 1), (5, 6, 7), (2, 3, 4, 5), (0, 3), (0,), (17,)]
    params, accs, moms = _many(shapes, dtype, momentum)
    cpu = _clone(params, accs, moms)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = [(torch.randn(s, generator=gen) * 10.0 ** (step - 1)).to(dtype) for s in shapes]
        for g in grads:
            if g.dim() >= 2 and g.numel():
                g[0] = 0  # a row with no gradient
        triton_gpu.sweep_many_(params, grads, accs, moms, lr=0.05, momentum=momentum, beta=beta, eps=1e-30)
        sm3_step_(*cpu[:1], grads, *cpu[1:], lr=0.05, momentum=momentum, beta=beta, eps=1e-30, fused=True)
    for p, q in zip(params, cpu[0]):
        assert torch.equal(p, q)
    for aa, bb in zip(accs, cpu[1]):
        assert all(torch.equal(a, b) for a, b in zip(aa, bb))
    for m, n in zip(moms, cpu[2]):
        assert (m is None and n is None) or torch.equal(m, n)


def test_default_block_sizes(monkeypatch):
    """The block sizes a GPU would use (one chunk covers these small tensors)."""
    monkeypatch.setattr(triton_gpu, "ROWS_BLOCK", (16, 256))
    monkeypatch.setattr(triton_gpu, "FLAT_BLOCK", 1024)
    params, accs, moms = _many([(40, 300), (3, 5, 7), (2000,)], torch.float32, 0.9)
    cpu = _clone(params, accs, moms)
    grads = [torch.randn(p.shape) for p in params]
    triton_gpu.sweep_many_(params, grads, accs, moms, lr=0.1, momentum=0.9, beta=0.0, eps=1e-30)
    sm3_step_(*cpu[:1], grads, *cpu[1:], lr=0.1, momentum=0.9, beta=0.0, eps=1e-30, fused=True)
    assert all(torch.equal(p, q) for p, q in zip(params, cpu[0]))
    assert all(torch.equal(a, b) for aa, bb in zip(accs, cpu[1]) for a, b in zip(aa, bb))


@pytest.mark.parametrize("shape", [(6, 7), (3, 4, 5), (11,)], ids=str)
def test_nonfinite_gradients_spread_as_on_the_cpu(shape):
    """A NaN gradient makes its row's and column's accumulators NaN (and every accumulator
    entry covering it); an overflowing g*g saturates them at float32's max, a zero step
    there: exactly as the CPU kernel."""
    p = torch.randn(shape)
    accs, _ = _state(p, 0.0)
    g = torch.randn(shape)
    flat = g.view(-1)
    flat[3] = float("nan")
    flat[-1] = 3e20  # (3e20)**2 overflows float32; it shares no index with the NaN
    q, b = p.clone(), [a.clone() for a in accs]
    triton_gpu.sweep_(p, g, accs, None, lr=0.1, **HYPER)
    sm3_step_([q], [g], [b], [None], lr=0.1, fused=True, **HYPER)
    torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
    for a, want in zip(accs, b):
        torch.testing.assert_close(a, want, rtol=0, atol=0, equal_nan=True)
    index = np.unravel_index(3, shape)
    for i, a in enumerate(accs):
        assert torch.isnan(a.view(-1)[index[i] if len(shape) > 1 else 3])
        assert a.isnan().sum() == 1  # the NaN stays in its own row/column
    top = np.unravel_index(flat.numel() - 1, shape)
    for i, a in enumerate(accs):
        assert a.view(-1)[top[i] if len(shape) > 1 else flat.numel() - 1] == torch.finfo(torch.float32).max
    assert p.view(-1)[-1] == q.view(-1)[-1]


class _Launches:
    """Counts the kernel launches (grid sizes) of triton_gpu.kernel's functions."""

    def __init__(self, monkeypatch):
        self.grids = []
        build = triton_gpu.kernel

        def counting(*args, **kwargs):
            fn = build(*args, **kwargs)
            outer = self

            class Launcher:
                def __getitem__(self, grid):
                    outer.grids.append(grid)
                    return fn[grid]
            return Launcher()
        monkeypatch.setattr(triton_gpu, "kernel", counting)


def test_small_tensors_are_one_launch(monkeypatch):
    """Forty biases and norms (0-d/1-d) are one launch, and the matrices of one configuration
    another; the results are those of stepping each tensor alone."""
    launches = _Launches(monkeypatch)
    shapes = [(n,) for n in range(1, 40)] + [()] + [(9, 20), (20, 9), (3, 3)]
    params, accs, moms = _many(shapes, torch.float32, 0.9)
    alone = _clone(params, accs, moms)
    grads = [torch.randn(s) for s in shapes]
    triton_gpu.sweep_many_(params, grads, accs, moms, lr=0.1, momentum=0.9, beta=0.0, eps=1e-30)
    assert len(launches.grids) == 2
    launches.grids.clear()
    for p, g, a, m in zip(*alone[:1], grads, *alone[1:]):
        triton_gpu.sweep_(p, g, a, m, lr=0.1, momentum=0.9, beta=0.0, eps=1e-30)
    assert len(launches.grids) == len(shapes)
    assert all(torch.equal(p, q) for p, q in zip(params, alone[0]))
    assert all(torch.equal(a, b) for aa, bb in zip(accs, alone[1]) for a, b in zip(aa, bb))


def test_out_of_place_step_writes_nothing_and_gives_the_update():
    """step_many: inputs untouched; the new state is the in-place kernel's, bit for bit; the
    update is -lr * m (lr = -1: u itself, which the in-place step moved p by)."""
    shapes = [(), (5,), (6, 7), (2, 3, 4)]
    params, accs, moms = _many(shapes, torch.float32, 0.9)
    before = _clone(params, accs, moms)
    grads = [torch.randn(s) for s in shapes]
    out = triton_gpu.step_many(params, grads, accs, moms, lr=0.25, momentum=0.9, beta=0.0, eps=1e-30)
    for now, then in zip((params, accs, moms), before):
        for x, y in zip(now, then):
            assert all(torch.equal(a, b) for a, b in zip(x, y)) if isinstance(x, list) else torch.equal(x, y)
    triton_gpu.sweep_many_(params, grads, accs, moms, lr=0.25, momentum=0.9, beta=0.0, eps=1e-30)
    for (update, new_accs, new_m), p0, p, aa, m in zip(out, before[0], params, accs, moms):
        assert all(torch.equal(a, b) for a, b in zip(new_accs, aa)) and torch.equal(new_m, m)
        assert torch.equal(update, -0.25 * m)
        torch.testing.assert_close(p0 + update, p)
    plain = triton_gpu.step(None, grads[2], before[1][2], None, lr=-1.0, **HYPER)[0]
    q = before[0][2].clone()
    triton_gpu.sweep_(q, grads[2], [a.clone() for a in before[1][2]], None, lr=1.0, **HYPER)
    torch.testing.assert_close(before[0][2] - plain, q)


def test_lr_beta_momentum_eps_are_run_time_arguments(monkeypatch):
    """A new lr, momentum or eps builds no new kernel; beta builds one for beta == 0 and one
    for beta > 0 (the one branch _sm3_math takes on a hyperparameter); a tensor lr works."""
    monkeypatch.setattr(triton_gpu, "_kernels", {})
    params, accs, moms = _many([(4, 5), (6,)], torch.float64, 0.5)
    grads = [torch.randn(p.shape, dtype=torch.float64) for p in params]
    triton_gpu.sweep_many_(params, grads, accs, moms, lr=0.1, momentum=0.5, beta=0.0, eps=1e-30)
    built = sum(len(v) for v in triton_gpu._kernels.values())
    assert built == 2  # 2-d and 1-d
    for lr, momentum, eps in [(0.2, 0.9, 1e-8), (torch.tensor(0.3), 0.1, 1e-20)]:
        triton_gpu.sweep_many_(params, grads, accs, moms, lr=lr, momentum=momentum, beta=0.0, eps=eps)
    assert sum(len(v) for v in triton_gpu._kernels.values()) == built
    for beta in (0.5, 0.9):
        triton_gpu.sweep_many_(params, grads, accs, moms, lr=0.1, momentum=0.5, beta=beta, eps=1e-30)
    assert sum(len(v) for v in triton_gpu._kernels.values()) == built + 2  # 2-d and 1-d, beta > 0
    # and the run-time values are the ones used: a tensor lr gives what the float gives
    a = _clone(params, accs, moms)
    b = _clone(params, accs, moms)
    triton_gpu.sweep_many_(a[0], grads, a[1], a[2], lr=torch.tensor(0.3, dtype=torch.float64),
                           momentum=0.7, beta=0.9, eps=1e-10)
    ref = [ReferenceSM3(p.numpy(), lr=0.3, momentum=0.7, beta=0.9, eps=1e-10) for p in b[0]]
    for r, p, aa, m in zip(ref, b[0], b[1], b[2]):
        r.acc = [x.numpy().reshape(-1).copy() for x in aa] if p.dim() > 1 else [aa[0].numpy().copy()]
        r.m = m.numpy().copy()
    for r, g, p in zip(ref, grads, a[0]):
        r.step(g.numpy())
        np.testing.assert_allclose(p.numpy(), r.p, rtol=1e-12, atol=1e-14)


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a device value to the host (``.item()``, ``bool(t)``...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_synchronisation_in_a_step(monkeypatch):
    """The Python side of a step (tables, hyperparameters, launches, the accumulators' update)
    reads no tensor value on the host, with a tensor lr: a CUDA graph could capture it.  The
    kernels are replaced by recorders here (the interpreter itself reads tensors on the host,
    as a GPU never would); the second step reuses the cached tables, as a replay does."""
    launches = []

    def recorder(*args, **kwargs):
        class Launch:
            def __getitem__(self, grid):
                return lambda *a, **k: launches.append((grid, a))
        return Launch()

    monkeypatch.setattr(triton_gpu, "kernel", recorder)
    params, accs, moms = _many([(), (7,), (6, 5), (2, 3, 4)], torch.float32, 0.9)
    grads = [torch.randn(p.shape) for p in params]
    lr = torch.tensor(0.1)
    for _ in range(2):
        with _NoHostSync():
            triton_gpu.sweep_many_(params, grads, accs, moms, lr=lr, momentum=0.9, beta=0.0, eps=1e-30)
            triton_gpu.step_many(params, grads, accs, moms, lr=lr, momentum=0.9, beta=0.0, eps=1e-30)
    # per step: one launch per configuration (0-d/1-d, 2-d, 3-d), in place and out of place
    assert len(launches) == 2 * 2 * 3
    first, second = launches[:3], launches[6:9]  # the in-place launches of each step
    assert all(a[1][0] is b[1][0] and a[1][1] is b[1][1] for a, b in zip(first, second))  # tables cached
    with pytest.raises(AssertionError, match="host synchronisation"), _NoHostSync():
        lr.item()  # the mode does catch a sync


def test_supported_answers_from_metadata():
    p = torch.randn(4, 5)
    accs, _ = _state(p, 0.0)
    assert triton_gpu.supported(p, p, accs, None)
    assert not triton_gpu.supported(p.t(), p.t(), accs, None)  # not contiguous
    half = p.half()
    assert not triton_gpu.supported(half, half, [a.half() for a in accs], None)  # float16 statistics
    assert triton_gpu.supported(half, half, accs, None)
    assert not triton_gpu.supported(p, p.double(), accs, None)
    ints = torch.ones(3, dtype=torch.int32)
    assert not triton_gpu.supported(ints, ints, [ints.float()], None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(4, 5)
        assert triton_gpu.supported(fake, fake, [torch.empty(4, 1), torch.empty(1, 5)], None)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = torch.randn(3)
    assert not triton_gpu.supported(p, p, [torch.zeros(3)], None)


def test_source_is_traced_from_the_math(monkeypatch):
    """Change precondition in _sm3_math's place and both generated kernels change with it:
    neither holds a copy of the equations."""
    values = dict(lr=0.1, momentum=0.0, beta=0.0, eps=1e-30)
    body_before, _ = triton_gpu._body(torch.float32, 2, False, values)
    cpu_before = fused_cpu.source(torch.float32, torch.float32, 2, False, True)
    changed = lambda g, nu, eps: torch.div(g, torch.sqrt(nu))  # noqa: E731
    for module in (triton_gpu, fused_cpu):
        monkeypatch.setattr(module, "precondition", changed)
    body_after, _ = triton_gpu._body(torch.float32, 2, False, values)
    cpu_after = fused_cpu.source(torch.float32, torch.float32, 2, False, True)
    assert "tl.where" in body_before and "eps" in body_before
    assert "tl.where" not in body_after and "eps" not in body_after  # the masks and eps are gone
    assert "blendv" in cpu_before and "blendv" not in cpu_after


def test_tracer_refuses_what_it_cannot_express():
    trace = triton_gpu._Trace(torch.float32)
    x = trace.input("x")
    with pytest.raises(NotImplementedError, match="exp"):
        torch.exp(x)
    beta = trace.scalar("beta", 0.5)
    with pytest.raises(TypeError):
        float(beta)  # a value read on the host would be baked into the kernel
    assert (beta == 0) is False and trace.assumptions == [("beta", "==", 0.0, False)]


def test_import_without_triton():
    """sm3fn imports, and the backend declines every tensor, where triton is missing."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, sm3fn\n"
            "from sm3fn._kernels import triton_gpu\n"
            "p = torch.randn(3)\n"
            "assert not triton_gpu.supported(p, p, [torch.zeros(3)], None)\n"
            "print('ok')")
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    import os

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_gpu_benchmark_runs_dry_and_refuses_without_cuda():
    """benchmarks/gpu_step.py executes end to end (--dry-run: interpreter, CPU, tiny shapes),
    and without --dry-run on a machine with no GPU says so instead of timing the CPU."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "gpu_step.py")
    env = {**os.environ, "PYTHONPATH": root}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself, before triton is imported
    dry = subprocess.run([sys.executable, script, "--dry-run", "--rounds", "1", "--warmup", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert dry.returncode == 0, dry.stderr
    for row in ("triton in place m=0", "triton out of place m=0.9", "SM3.step m=0.9", "tx.update", "Adam fused"):
        assert row in dry.stdout
    if not torch.cuda.is_available():
        real = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
        assert real.returncode != 0 and "needs a CUDA GPU" in real.stderr


@pytest.fixture
def gpu_route(monkeypatch):
    """The dispatcher's route for CUDA tensors, taken by CPU tensors: the fused CPU kernel
    declines them, so they reach the Triton kernel (interpreted) as CUDA tensors would."""
    monkeypatch.setattr(fused_cpu, "supported", lambda *args: False)
    monkeypatch.setattr(triton_gpu, "unavailable", None)
    return _Launches(monkeypatch)


def _model_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(9, 20), (20,), (), (3, 4, 5), (7,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_optimizer_steps_through_the_triton_kernel(gpu_route, momentum):
    """sm3fn.optim.SM3 (fused=None) sends the tensors the GPU kernel covers to it, in one launch
    per configuration, and lands where the blocked path (fused=False) does: accumulators bit for
    bit (nu has no square root in it), the rest to a few ulps (ATen's float32 sqrt is an ulp off
    IEEE's now and then, as test_kernels_fused_cpu.py notes)."""
    ours, blocked = _model_params(), _model_params()
    opt = SM3(ours, lr=0.1, momentum=momentum)
    ref = SM3(blocked, lr=0.1, momentum=momentum, fused=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(ours, blocked):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert len(gpu_route.grids) == 3 * 3  # 0-d/1-d, 2-d, 3-d, per step
    for p, q in zip(ours, blocked):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    ulps = 4 * torch.finfo(torch.float32).eps
    for p, q in zip(ours, blocked):
        assert sorted(opt.state[p]) == sorted(ref.state[q])
        for key, want in ref.state[q].items():
            exact = key.startswith("accumulator") or key == "step"
            torch.testing.assert_close(opt.state[p][key], want, rtol=0, atol=0 if exact else ulps)


def test_pure_update_steps_through_the_triton_kernel(gpu_route, monkeypatch):
    """The pure tx.update of sm3fn.sm3 and of scale_by_sm3 take the out-of-place kernel (no input
    written) and agree with the reference math (the route with the Triton kernel declining)."""
    params = {f"p{i}": p.detach() for i, p in enumerate(_model_params())}
    grads = {k: torch.randn(v.shape) for k, v in params.items()}
    before = {k: v.clone() for k, v in params.items()}

    def two_steps(tx):
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
        return updates

    for tx in (sm3fn.sm3(0.1, momentum=0.9), sm3fn.scale_by_sm3()):
        gpu_route.grids.clear()
        ours = two_steps(tx)
        assert len(gpu_route.grids) == 2 * 3  # 0-d/1-d, 2-d, 3-d, per step
        with monkeypatch.context() as m:
            m.setattr(triton_gpu, "supported", lambda *args: False)
            want = two_steps(tx)
        assert len(gpu_route.grids) == 2 * 3
        assert all(torch.equal(params[k], before[k]) for k in params)
        for k in params:
            torch.testing.assert_close(ours[k], want[k], rtol=1e-6, atol=1e-7)


def test_a_failed_build_falls_back_or_raises(gpu_route, monkeypatch):
    """fused=None: a kernel that cannot be built warns once and the blocked path steps; fused=True:
    the error, with nothing written."""
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(triton_gpu, "kernel", broken)
    ps = _model_params()
    for p in ps:
        p.grad = torch.randn(p.shape)
    before = [p.detach().clone() for p in ps]
    strict = SM3(ps, lr=0.1, fused=True)
    with pytest.raises(triton_gpu.BuildError, match="no compiler here"):
        strict.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert all(torch.equal(a, torch.zeros_like(a)) for p in ps for k, a in strict.state[p].items()
               if k.startswith("accumulator")) or not strict.state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SM3(ps, lr=0.1).step()
        SM3(ps, lr=0.1).step()
    assert sum("blocked path" in str(w.message) for w in caught) == 1
    assert not all(torch.equal(p, b) for p, b in zip(ps, before))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_optimizer_step_makes_no_host_synchronisation(gpu_route, monkeypatch, momentum):
    """The whole SM3.step on the GPU route (the dispatcher, the tables, the launches, the
    accumulators' update) reads no tensor value on the host, so a CUDA graph can capture it.
    The kernels are recorders here (the interpreter reads tensors on the host; a GPU does not)."""
    launches = []

    def recorder(*args, **kwargs):
        class Launch:
            def __getitem__(self, grid):
                return lambda *a, **k: launches.append(grid)
        return Launch()

    monkeypatch.setattr(triton_gpu, "kernel", recorder)
    ps = _model_params()
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt = SM3(ps, lr=0.1, momentum=momentum)
    opt.step()  # the warm-up a CUDA graph capture needs: state made, tables cached
    with _NoHostSync():
        opt.step()
    assert len(launches) == 2 * 3


def test_sm3_update_steps_through_the_triton_kernel(gpu_route):
    """sm3fn.sm3_update_ (the functional in-place step) takes the same route, and agrees with
    the pure update it stands for."""
    params = {f"p{i}": p.detach() for i, p in enumerate(_model_params())}
    grads = {k: torch.randn(v.shape) for k, v in params.items()}
    tx = sm3fn.sm3(0.1, momentum=0.9)
    state, pure_state = tx.init(params), tx.init(params)
    pure = {k: v.clone() for k, v in params.items()}
    for _ in range(2):
        sm3fn.sm3_update_(params, grads, state, learning_rate=0.1, momentum=0.9)
        updates, pure_state = tx.update(grads, pure_state, pure)
        pure = sm3fn.apply_updates(pure, updates)
    assert len(gpu_route.grids) == 2 * 2 * 3  # in place and out of place, 3 configurations, 2 steps
    for k in params:
        torch.testing.assert_close(params[k], pure[k], rtol=1e-6, atol=1e-6)
