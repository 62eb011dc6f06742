"""Reliability: a failing step moves nothing, accumulators at their own size, aliased
parameters, tensor hyperparameters re-checked, states that share nothing, checkpoints
with impossible values refused, and private PyTorch APIs behind fallbacks."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from reference import ReferenceSM3

import sm3fn
from sm3fn._kernels import fused_cpu
from sm3fn.benchmark import step_peak_bytes
from sm3fn.optim import SM3, FunctionalOptimizer

KERNELS = [None, True, False]  # fused=None (default), the fused kernel, the blocked path


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(dtype)
    model(torch.randn(5, 4, dtype=dtype)).square().sum().backward()
    return model


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in opt.state.items()})


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p.detach(), before)
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]) if isinstance(v, torch.Tensor) else v == state[id(p)][k]


# -- a failing step moves nothing ------------------------------------------------


@pytest.mark.parametrize("fused", KERNELS)
@pytest.mark.parametrize("lr", [1e39, float("inf")])
def test_lr_that_overflows_the_statistics_dtype_moves_nothing(fused, lr):
    model = _model()
    opt = SM3(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    opt.step()  # state exists: the failing step must leave it as it is
    model(torch.randn(5, 4)).square().sum().backward()
    snap = _snapshot(model, opt)
    opt.param_groups[0]["lr"] = lr
    with pytest.raises(ValueError, match=r"lr.*(1e\+39|inf)"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_lr_1e39_is_fine_for_float64_statistics():
    model = _model(torch.float64)
    opt = SM3(model.parameters(), lr=1e39)
    opt.step()
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("fused", KERNELS)
def test_sm3_update_lr_overflow_moves_nothing(fused):
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    state = sm3fn.sm3(0.1, momentum=0.9).init(params)
    before_p, before_s = {k: v.clone() for k, v in params.items()}, state.clone()
    with pytest.raises(ValueError, match=r"lr=1e\+39.*float32.*params\['(w|b)'\]"):
        sm3fn.sm3_update_(params, grads, state, learning_rate=1e39, momentum=0.9, fused=fused)
    assert all(torch.equal(params[k], before_p[k]) for k in params)
    assert (state == before_s).all()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_parameters_are_refused_before_any_write(dtype):
    torch.manual_seed(0)
    good = torch.nn.Parameter(torch.randn(3, 4))
    bad = torch.nn.Parameter(torch.randn(4).to(dtype))
    good.grad, bad.grad = torch.randn(3, 4), torch.randn(4).to(dtype)
    opt = SM3([good, bad], lr=0.1)
    before = good.detach().clone()
    with pytest.raises(TypeError, match=f"parameter 1.*{dtype}"):
        opt.step()
    assert torch.equal(good.detach(), before) and not opt.state
    with pytest.raises(TypeError, match=f"params\\['b'\\].*{dtype}"):
        sm3fn.sm3().init({"w": good.detach(), "b": bad.detach()})


@pytest.mark.parametrize("make", [lambda d: sm3fn.sm3(accumulator_dtype=d), lambda d: sm3fn.ema(0.9, dtype=d),
                                  lambda d: SM3([torch.nn.Parameter(torch.ones(2))], accumulator_dtype=d)])
def test_float8_statistics_dtype_is_refused(make):
    with pytest.raises(TypeError, match=r"dtype.*float8_e4m3fn"):
        make(torch.float8_e4m3fn)


# -- aliased parameters ----------------------------------------------------------


def _aliased_pair():
    base = torch.zeros(4)
    a, b = torch.nn.Parameter(base), torch.nn.Parameter(base)  # one storage
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    return a, b


@pytest.mark.parametrize("fused", KERNELS)
def test_aliased_parameters_are_refused_by_every_kernel(fused):
    a, b = _aliased_pair()
    opt = SM3([a, b], lr=0.1, fused=fused)
    with pytest.raises(ValueError, match=r"parameter 0.*parameter 1.*share memory"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(4)) and not opt.state


@pytest.mark.parametrize("fused", KERNELS)
def test_parameter_listed_twice_is_refused(fused):
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    with pytest.warns(UserWarning, match="duplicate"):  # torch.optim's own warning
        opt = SM3([p, p], lr=0.1, fused=fused)
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4))


def test_aliased_parameters_in_other_entry_points():
    a, b = _aliased_pair()
    opt = FunctionalOptimizer([a, b], lambda lr: sm3fn.sm3(lr), lr=0.1)
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    params = {"a": a.detach(), "b": b.detach()}
    state = sm3fn.sm3(0.1).init(params)
    with pytest.raises(ValueError, match=r"params\['a'\] and params\['b'\] share memory"):
        sm3fn.sm3_update_(params, {"a": torch.ones(4), "b": torch.ones(4)}, state)
    assert torch.equal(a.detach(), torch.zeros(4))
    # the pure update writes nothing: each key is stepped on its own, as documented
    updates, _ = sm3fn.sm3(0.1).update({"a": torch.ones(4), "b": torch.ones(4)}, state, params)
    assert torch.allclose(updates["a"], torch.full((4,), -0.1))


def test_overlapping_views_are_refused_and_disjoint_views_are_not():
    base = torch.zeros(6, 5)
    cols = {"c0": base[:, 0], "c1": base[:, 1]}  # one storage, disjoint elements
    state = sm3fn.sm3(0.1).init(cols)
    sm3fn.sm3_update_(cols, {k: torch.ones(6) for k in cols}, state)
    assert torch.allclose(base[:, :2], torch.full((6, 2), -0.1))
    overlap = {"col": base[:, 0], "row": base[2]}  # share base[2, 0]
    state = sm3fn.sm3(0.1).init(overlap)
    with pytest.raises(ValueError, match=r"params\['col'\] and params\['row'\]"):
        sm3fn.sm3_update_(overlap, {"col": torch.ones(6), "row": torch.ones(5)}, state)


@pytest.mark.parametrize("fused", KERNELS)
def test_tied_weights_step_once_as_the_reference(fused):
    """One nn.Parameter used twice (tied embedding and output weights) is one parameter:
    it is stepped once, with the sum of both uses' gradients, as the reference says."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(7, 3)
    head = torch.nn.Linear(3, 7, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    params = list(model.parameters())
    assert len(params) == 1
    head(emb(torch.tensor([1, 2, 5]))).square().sum().backward()
    ref = ReferenceSM3(emb.weight.detach().numpy(), lr=0.1, momentum=0.9)
    ref.step(emb.weight.grad.numpy())
    SM3(params, lr=0.1, momentum=0.9, fused=fused).step()
    torch.testing.assert_close(emb.weight.detach(), torch.from_numpy(ref.p).float())
    assert head.weight is emb.weight


# -- tensor hyperparameters changed in place are checked again -------------------


def _pure_setup():
    gen = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    return params, grads


@pytest.mark.parametrize("name,make,bad,pattern", [
    ("lr", lambda t: sm3fn.sm3(t), -1.0, r"learning_rate.*-1\.0"),
    ("lr", lambda t: sm3fn.sm3(t), float("inf"), r"learning_rate.*inf"),
    ("lr", lambda t: sm3fn.scale_by_learning_rate(t), float("nan"), r"learning_rate.*nan"),
    ("momentum", lambda t: sm3fn.sm3(0.1, momentum=t), float("nan"), r"momentum|decay.*nan"),
    ("momentum", lambda t: sm3fn.ema(t), 1.0, r"decay.*1\.0"),
    ("momentum", lambda t: sm3fn.trace(t), -0.5, r"decay.*-0\.5"),
    ("beta", lambda t: sm3fn.sm3(0.1, beta=t), 2.0, r"beta.*2\.0"),
    ("beta", lambda t: sm3fn.scale_by_sm3(beta=t), float("nan"), r"beta.*nan"),
])
def test_tensor_hyperparameter_changed_in_place_is_refused_by_update(name, make, bad, pattern):
    value = torch.tensor(0.5)
    tx = make(value)
    params, grads = _pure_setup()
    state = tx.init(params)
    _, state = tx.update(grads, state, params)  # the value as given steps
    value.fill_(bad)
    before = state.clone()
    with pytest.raises(ValueError, match=pattern):
        tx.update(grads, state, params)
    assert (state == before).all()


def test_tensor_hyperparameters_are_not_read_under_vmap():
    """A swept tensor (vmap) is not read, as at construction: no error from the check itself."""
    lrs = torch.tensor([0.1, 0.2])
    params, grads = _pure_setup()

    def one(lr):
        tx = sm3fn.sm3(lr, momentum=0.5)
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates["w"]

    out = torch.func.vmap(one)(lrs)
    torch.testing.assert_close(out[1], 2 * out[0])


# -- state made at its own size --------------------------------------------------



def _state_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_init_allocates_only_the_state():
    """bf16 parameters with float32 statistics: a zeros_like(param, float32) temporary
    would be twice the parameter's bytes; the state is a few KiB."""
    gen = torch.Generator().manual_seed(6)
    params = {"w": torch.randn(2048, 1024, generator=gen).bfloat16(),
              "cube": torch.randn(64, 32, 16, generator=gen).bfloat16(), "b": torch.randn(1024).bfloat16()}
    tx = sm3fn.sm3(0.1)
    state = tx.init(params)
    peak = step_peak_bytes(lambda: tx.init(params))
    state_bytes = _state_bytes(state.values(True, True))
    assert peak <= state_bytes + 4096, (peak, state_bytes)
    for a in state.values(True, True):  # zeros, at the documented shapes
        assert a.dtype == torch.float32 and not a.any()
    assert state["sm3", "w", "accumulator_1"].shape == (1, 1024)
    assert state["sm3", "cube", "accumulator_1"].shape == (1, 32, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_first_step_of_the_optimizer_allocates_no_parameter_sized_memory(dtype):
    gen = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.randn(2048, 1024, generator=gen).to(dtype))
    p.grad = torch.randn(2048, 1024, generator=gen).to(dtype)
    opt = SM3([p], lr=0.1, fused=True)  # the fused kernel: no block scratch to hide a temporary
    peak = step_peak_bytes(opt.step)
    state_bytes = _state_bytes(v for v in opt.state[p].values())
    threads_maxima = torch.get_num_threads() * (2048 + 1024) * 4
    assert peak <= state_bytes + threads_maxima + 4096, (peak, state_bytes)
    assert peak < 0.05 * p.numel() * p.element_size()


def test_load_state_dict_allocates_about_the_state():
    gen = torch.Generator().manual_seed(8)
    p = torch.nn.Parameter(torch.randn(2048, 1024, generator=gen).bfloat16())
    p.grad = torch.randn(2048, 1024, generator=gen).bfloat16()
    opt = SM3([p], lr=0.1)
    opt.step()
    saved = opt.state_dict()
    fresh = SM3([p], lr=0.1)
    peak = step_peak_bytes(lambda: fresh.load_state_dict(saved))
    state_bytes = _state_bytes(v for v in opt.state[p].values())
    assert peak <= 2 * state_bytes + 4096, (peak, state_bytes)
    for k, v in opt.state[p].items():
        assert torch.equal(fresh.state[p][k], v)


# -- a new state shares no memory with the old one -------------------------------

SHARING_CASES = {
    "sm3": lambda: sm3fn.sm3(0.1, momentum=0.9),
    "scale_by_sm3": lambda: sm3fn.scale_by_sm3(beta=0.5),
    "trace": lambda: sm3fn.trace(0.9),
    "schedule": lambda: sm3fn.sm3(lambda count: 0.1 / (1 + count)),
    "tensor hyperparameters": lambda: sm3fn.sm3(torch.tensor(0.1), momentum=torch.tensor(0.9),
                                                beta=torch.tensor(0.5)),
    "inject_hyperparams": lambda: sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=0.1, momentum=0.9),
    "apply_if_finite": lambda: sm3fn.apply_if_finite(sm3fn.sm3(0.1, momentum=0.9)),
    "masked": lambda: sm3fn.masked(sm3fn.sm3(0.1, momentum=0.9), lambda path, p: p.dim() >= 2),
    "partition": lambda: sm3fn.partition({"m": sm3fn.sm3(0.1, momentum=0.9), "v": sm3fn.trace(0.5)},
                                         lambda path, p: "m" if p.dim() >= 2 else "v"),
    "averaging": lambda: sm3fn.chain(sm3fn.sm3(0.1), sm3fn.parameter_averaging(decay=0.9)),
    "weight decay, clipping": lambda: sm3fn.chain(sm3fn.add_decayed_weights(1e-2), sm3fn.clip_by_global_norm(1.0),
                                                  sm3fn.sm3(0.1, momentum=0.9)),
}


def _storages(state):
    return {t.untyped_storage().data_ptr() for t in state.values(True, True) if t.numel()}


@pytest.mark.parametrize("frozen", [(), ("w",), ("w", "b")])
@pytest.mark.parametrize("name", list(SHARING_CASES))
def test_pure_update_returns_a_state_that_shares_no_memory_with_its_input(name, frozen):
    """A snapshot kept for rollback survives an in-place step on the new state."""
    tx = SHARING_CASES[name]()
    params, grads = _pure_setup()
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    grads = {k: None if k in frozen else g for k, g in grads.items()}
    _, new_state = tx.update(grads, state, params)
    assert not _storages(state) & _storages(new_state)


def test_rollback_snapshot_survives_sm3_update_after_a_frozen_step():
    tx = sm3fn.sm3(0.1, momentum=0.9)
    params, grads = _pure_setup()
    _, snapshot = tx.update(grads, tx.init(params), params)
    kept = snapshot.clone()
    _, state = tx.update({"w": None, "b": grads["b"]}, snapshot, params)
    sm3fn.sm3_update_(params, grads, state, learning_rate=0.1, momentum=0.9)
    assert (snapshot == kept).all()


def test_sparse_updates_share_no_memory_either():
    tx = sm3fn.sm3(0.1, momentum=0.9)
    params = {"emb": torch.randn(6, 3)}
    state = tx.init(params)
    for rows in ([1, 4], []):  # touched rows, then none
        g = torch.sparse_coo_tensor(torch.tensor([rows], dtype=torch.int64), torch.ones(len(rows), 3), (6, 3),
                                    check_invariants=True)
        _, new_state = tx.update({"emb": g}, state, params)
        assert not _storages(state) & _storages(new_state)
        state = new_state


# -- checkpoints with impossible values are refused ------------------------------


def _stepped(opt_factory):
    model = _model()
    opt = opt_factory(model.parameters())
    opt.step()
    return model, opt


@pytest.mark.parametrize("make_opt,key", [
    (lambda ps: SM3(ps, lr=0.1), "accumulator_1"),
    (lambda ps: FunctionalOptimizer(ps, lambda lr: sm3fn.sm3(lr), lr=0.1), "sm3.*.accumulator_1"),
])
@pytest.mark.parametrize("bad", ["negative", "nan", "expanded"])
def test_load_state_dict_refuses_impossible_accumulators(make_opt, key, bad):
    model, opt = _stepped(make_opt)
    saved = opt.state_dict()
    state = {i: dict(s) for i, s in saved["state"].items()}
    a = state[2][key]  # the second Linear's weight, shape (2, 3)
    state[2][key] = {"negative": -a - 1, "nan": a.clone().fill_(float("nan")),
                     "expanded": a[..., :1].expand(a.shape)}[bad]
    snap = _snapshot(model, opt)
    fresh = make_opt(model.parameters())
    with pytest.raises(ValueError, match=rf"parameter 2.*{key.replace('*', '[*]')}"):
        fresh.load_state_dict(dict(saved, state=state))
    assert not fresh.state  # nothing half-loaded
    with pytest.raises(ValueError, match=r"parameter 2"):
        opt.load_state_dict(dict(saved, state=state))
    _assert_unchanged(model, opt, snap)


def test_loaded_state_is_a_copy_of_the_state_dict():
    model, opt = _stepped(lambda ps: SM3(ps, lr=0.1, momentum=0.9))
    saved = {"state": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                       for i, s in opt.state_dict()["state"].items()},
             "param_groups": opt.state_dict()["param_groups"]}
    kept = {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()}
    opt.load_state_dict(saved)
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    for i, s in saved["state"].items():
        for k, v in s.items():
            assert torch.equal(v, kept[i][k])


@pytest.mark.parametrize("edit,error,pattern", [
    (lambda a: a[:1].expand(a.shape), ValueError, r"state\['sm3'\]\['w'\]\['accumulator_0'\].*share memory"),
    (lambda a: a.to(torch.float8_e4m3fn), TypeError, r"state\['sm3'\]\['w'\]\['accumulator_0'\].*float8"),
])
def test_sm3_update_refuses_state_it_cannot_write(edit, error, pattern):
    params, grads = _pure_setup()
    tx = sm3fn.sm3(0.1, momentum=0.9)
    _, state = tx.update(grads, tx.init(params), params)
    state["sm3", "w", "accumulator_0"] = edit(state["sm3", "w", "accumulator_0"])
    before_p, before_s = {k: v.clone() for k, v in params.items()}, state.clone()
    with pytest.raises(error, match=pattern):
        sm3fn.sm3_update_(params, grads, state, learning_rate=0.1, momentum=0.9)
    assert all(torch.equal(params[k], before_p[k]) for k in params)
    for key, t in state.items(True, True):
        assert torch.equal(t.float(), before_s[key].float())


def test_torch_sm3_row_cover_with_a_nan_is_refused():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = SM3(emb.parameters(), lr=0.1)
    saved = {"state": {0: {"step": 1, "accumulator_0": torch.tensor([0.0, 1.0, float("nan"), 2.0, 0.5])}},
             "param_groups": opt.state_dict()["param_groups"]}
    with pytest.raises(ValueError, match=r"parameter 0.*'accumulator_0'.*nan"):
        opt.load_state_dict(saved)


# -- private PyTorch APIs behind fallbacks -------------------




def _fresh_fused(monkeypatch):
    """The fused kernel as in a new process: nothing built, nothing given up."""
    monkeypatch.setattr(fused_cpu, "_kernels", {})
    monkeypatch.setattr(fused_cpu, "unavailable", None)


def _one_step(fused):
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(torch.randn(4))
    w.grad, b.grad = torch.randn(5, 4), torch.randn(4)
    SM3([w, b], lr=0.1, momentum=0.9, fused=fused).step()
    return w.detach(), b.detach()


def test_missing_inductor_code_cache_falls_back_with_one_warning(monkeypatch):
    want = _one_step(fused=False)
    _fresh_fused(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch._inductor.codecache", None)  # import raises ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _one_step(fused=None)
        again = _one_step(fused=None)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "codecache" in messages[0], messages
    for g, a, w in zip(got, again, want):
        assert torch.equal(g, w) and torch.equal(a, w)


def test_missing_inductor_code_cache_with_fused_true_raises_before_writing(monkeypatch):
    _fresh_fused(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch._inductor.codecache", None)
    w = torch.nn.Parameter(torch.randn(5, 4))
    w.grad = torch.randn(5, 4)
    before = w.detach().clone()
    with pytest.raises(fused_cpu.BuildError, match="fused=False"):
        SM3([w], lr=0.1, fused=True).step()
    assert torch.equal(w.detach(), before)


def test_checks_work_without_the_private_functorch_probe(monkeypatch):
    """Another torch without torch._C._functorch.is_functorch_wrapped_tensor: eager values
    are still checked, and vmap-ped ones are still left alone (no crash)."""
    monkeypatch.delattr(torch._C._functorch, "is_functorch_wrapped_tensor")
    lr = torch.tensor(0.5)
    tx = sm3fn.sm3(lr)
    params, grads = _pure_setup()
    state = tx.init(params)
    lr.fill_(-1.0)
    with pytest.raises(ValueError, match=r"learning_rate.*-1\.0"):
        tx.update(grads, state, params)

    def one(lr):
        t = sm3fn.sm3(lr)
        return t.update(grads, t.init(params), params)[0]["w"]

    out = torch.func.vmap(one)(torch.tensor([0.1, 0.3]))
    torch.testing.assert_close(out[1], 3 * out[0])


def test_unwritable_inductor_cache_after_import_falls_back_with_one_warning(tmp_path):
    """TORCHINDUCTOR_CACHE_DIR that cannot be created: once tensordict is imported (its own
    import needs the directory: see docs), sm3fn's fused kernel falls back, with one warning."""
    script = (
        "import os, warnings, torch, tensordict\n"
        "os.environ['TORCHINDUCTOR_CACHE_DIR'] = '/proc/nonexistent/sm3fn-cache'\n"
        "import sm3fn\n"
        "from sm3fn.optim import SM3\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    for fused in (None, None, False):\n"
        "        torch.manual_seed(0)\n"
        "        p = torch.nn.Parameter(torch.randn(3, 4)); p.grad = torch.randn(3, 4)\n"
        "        SM3([p], lr=0.1, fused=fused).step()\n"
        "        print(p.detach().sum().item())\n"
        "print(sum(issubclass(w.category, RuntimeWarning) for w in caught))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[0] == lines[1] == lines[2] and lines[3] == "1", out.stdout


def test_pure_step_without_the_private_interpreter_probe_takes_the_differentiable_path(monkeypatch):
    """Another torch without torch._C._functorch.peek_interpreter_stack: the pure update still
    runs (through the differentiable math) and agrees with the float64 reference."""
    monkeypatch.delattr(torch._C._functorch, "peek_interpreter_stack")
    params, grads = _pure_setup()
    tx = sm3fn.sm3(0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    for k in params:
        ref = ReferenceSM3(params[k].numpy(), lr=0.1)
        ref.step(grads[k].numpy())
        torch.testing.assert_close(params[k] + updates[k], torch.from_numpy(ref.p).float())
