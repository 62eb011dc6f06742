"""Sparse gradients through sm3fn.optim.SM3, against the float64 row reference."""

import numpy as np
import pytest
import torch

from helpers import saved_and_loaded
from reference import ReferenceSM3, random_gradient
from sparse_reference import ReferenceRowSM3, dense_from_entries
from sm3fn.optim import SM3
from test_kernels_sparse import D, N, bits, make_batch


class Model(torch.nn.Module):
    """A sparse embedding, a sparse embedding bag and a dense head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(N, D, sparse=True)
        self.bag = torch.nn.EmbeddingBag(N, D, mode="sum", sparse=True)
        self.head = torch.nn.Linear(D, 1, bias=False)


def backward(model, rng):
    """Fills the gradients; returns the entries of each embedding and the head's gradient."""
    model.zero_grad(set_to_none=True)
    loss, entries = 0.0, {}
    for name in ("emb", "bag"):
        module = getattr(model, name)
        args, kwargs, c, entries[name] = make_batch(module, rng, module.weight.dtype)
        loss = loss + (module(*args, **kwargs) * c).sum()
    g_head = random_gradient(rng, (1, D))
    loss = loss + (model.head.weight * torch.as_tensor(g_head, dtype=model.head.weight.dtype)).sum()
    loss.backward()
    return entries, g_head


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_sm3_optimizer_matches_row_reference(beta):
    rng = np.random.default_rng(int(beta * 10))
    model = Model().double()
    lr, momentum = 0.05, 0.9
    refs = {n: ReferenceRowSM3(getattr(model, n).weight.detach().numpy(), lr=lr, beta=beta) for n in ("emb", "bag")}
    ref_head = ReferenceSM3(model.head.weight.detach().numpy(), lr=lr, momentum=momentum, beta=beta)
    opt = SM3(model.parameters(), lr=lr, momentum=momentum, beta=beta)
    for step in range(12):
        entries, g_head = backward(model, rng)
        assert model.emb.weight.grad.layout == torch.sparse_coo
        for n, ref in refs.items():
            ref.step(*dense_from_entries((N, D), [e[0] for e in entries[n]], [e[1] for e in entries[n]]))
        ref_head.step(g_head)
        opt.step()
        for n, ref in refs.items():
            np.testing.assert_allclose(getattr(model, n).weight.detach().numpy(), ref.p, rtol=1e-9, atol=1e-12)
            st = opt.state[getattr(model, n).weight]
            # the row accumulator only, no momentum buffer: O(n_1) state
            assert sorted(st) == ["accumulator_0", "step"] and st["step"] == step + 1
            assert st["accumulator_0"].shape == (N, 1)
            np.testing.assert_allclose(st["accumulator_0"].reshape(-1).numpy(), ref.acc, rtol=1e-9)
        np.testing.assert_allclose(model.head.weight.detach().numpy(), ref_head.p, rtol=1e-9, atol=1e-12)
        assert "momentum_buffer" in opt.state[model.head.weight]


def test_absent_rows_bit_identical_in_place():
    rng = np.random.default_rng(3)
    emb = torch.nn.Embedding(N, D, sparse=True)
    opt = SM3(emb.parameters(), lr=0.1)
    for _ in range(3):
        args, _, c, _ = make_batch(emb, rng, torch.float32)
        emb.zero_grad()
        (emb(*args) * c).sum().backward()
        opt.step()
    args, _, c, entries = make_batch(emb, rng, torch.float32)
    emb.zero_grad()
    (emb(*args) * c).sum().backward()
    touched = sorted({r for r, _ in entries})
    absent = [r for r in range(N) if r not in touched]
    p_before, a_before = bits(emb.weight), bits(opt.state[emb.weight]["accumulator_0"])
    grad_before = emb.weight.grad._values().clone()
    opt.step()
    assert torch.equal(bits(emb.weight)[absent], p_before[absent])
    assert torch.equal(bits(opt.state[emb.weight]["accumulator_0"])[absent], a_before[absent])
    assert not torch.equal(bits(emb.weight)[touched], p_before[touched])
    assert torch.equal(emb.weight.grad._values(), grad_before)  # the gradient is only read


def test_dense_state_then_sparse_gradient_uses_row_accumulator_only():
    """A parameter whose state began dense keeps its column accumulator and momentum buffer."""
    rng = np.random.default_rng(8)
    w = torch.nn.Parameter(torch.tensor(rng.standard_normal((N, D))))
    opt = SM3([w], lr=0.1, momentum=0.5)
    w.grad = torch.tensor(random_gradient(rng, (N, D)))
    opt.step()
    ref = ReferenceRowSM3(w.detach().numpy(), lr=0.1)
    ref.acc = opt.state[w]["accumulator_0"].reshape(-1).numpy().copy()
    col, buf = opt.state[w]["accumulator_1"].clone(), opt.state[w]["momentum_buffer"].clone()
    rows = rng.choice(N, size=6)
    vals = rng.standard_normal((6, D))
    w.grad = torch.sparse_coo_tensor(torch.as_tensor(rows)[None], torch.as_tensor(vals), (N, D),
                                     check_invariants=True)
    ref.step(*dense_from_entries((N, D), rows, vals))
    opt.step()
    np.testing.assert_allclose(w.detach().numpy(), ref.p, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(opt.state[w]["accumulator_0"].reshape(-1).numpy(), ref.acc, rtol=1e-9)
    assert torch.equal(opt.state[w]["accumulator_1"], col)
    assert torch.equal(opt.state[w]["momentum_buffer"], buf)


def test_sparse_state_round_trips_and_loads_torch_sm3_layout():
    rng = np.random.default_rng(6)
    model = Model()
    opt = SM3(model.parameters(), lr=0.1, momentum=0.5)
    for _ in range(2):
        backward(model, rng)
        opt.step()
    saved = saved_and_loaded({"model": model.state_dict(), "opt": opt.state_dict()})
    twin = Model()
    twin.load_state_dict(saved["model"])
    twin_opt = SM3(twin.parameters(), lr=0.1, momentum=0.5)
    # torch-SM3 keeps a sparse parameter's accumulator flat, (n,): it loads too
    saved["opt"]["state"][0]["accumulator_0"] = saved["opt"]["state"][0]["accumulator_0"].reshape(-1)
    twin_opt.load_state_dict(saved["opt"])
    state = np.random.default_rng(1).bit_generator.state
    for m, o in ((model, opt), (twin, twin_opt)):
        r = np.random.default_rng(1)
        r.bit_generator.state = state
        backward(m, r)
        o.step()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n
    bad = twin_opt.state_dict()
    bad["state"][0]["accumulator_0"] = torch.zeros(N + 1)
    with pytest.raises(ValueError, match="parameter 0.*row cover"):
        SM3(Model().parameters()).load_state_dict(bad)


def test_bad_sparse_gradient_names_the_parameter_and_changes_nothing():
    model = Model()
    opt = SM3([{"params": [p], "param_names": [n]} for n, p in model.named_parameters()], lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model.head.weight.grad = torch.randn(1, D)
    model.emb.weight.grad = torch.sparse_coo_tensor(
        torch.zeros(0, 1, dtype=torch.long), torch.randn(1, N, D), (N, D), check_invariants=True
    )
    with pytest.raises(ValueError, match="'emb.weight'.*no sparse dimension"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0


def test_compiled_step_names_a_sparse_parameter():
    rng = np.random.default_rng(0)
    emb = torch.nn.Embedding(N, D, sparse=True)
    opt = SM3([{"params": [emb.weight], "param_names": ["emb.weight"]}], lr=0.1)
    args, _, c, _ = make_batch(emb, rng, torch.float32)
    (emb(*args) * c).sum().backward()
    opt.step()  # eager: the state is now the row cover
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"'emb.weight'.* takes sparse gradients"):
        torch.compile(opt.step, fullgraph=True)()
    torch._dynamo.reset()


def test_bfloat16_embedding_keeps_float32_row_accumulator():
    rng = np.random.default_rng(12)
    emb = torch.nn.Embedding(N, D, sparse=True).to(torch.bfloat16)
    ref = ReferenceRowSM3(emb.weight.detach().double().numpy(), lr=0.01)
    opt = SM3(emb.parameters(), lr=0.01)
    for _ in range(5):
        args, _, c, entries = make_batch(emb, rng, torch.bfloat16)
        emb.zero_grad()
        (emb(*args) * c).sum().backward()
        # the reference sees the gradient bf16 autograd made (its rows, summed in float64)
        g = emb.weight.grad.coalesce()
        ref.step(*dense_from_entries((N, D), g.indices()[0].tolist(), g.values().double().numpy()))
        opt.step()
    acc = opt.state[emb.weight]["accumulator_0"]
    assert acc.dtype == torch.float32 and emb.weight.dtype == torch.bfloat16
    np.testing.assert_allclose(acc.reshape(-1).double().numpy(), ref.acc, rtol=1e-2)
    np.testing.assert_allclose(emb.weight.double().detach().numpy(), ref.p, rtol=2e-2, atol=2e-3)
