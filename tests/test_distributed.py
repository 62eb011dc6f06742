"""SM3 on 2 CPU processes (gloo, loopback): FSDP2 DTensor shards, DDP, distributed checkpoints.

Each test spawns 2 ranks (see ``distributed_harness``); the body runs on both
and compares the sharded run with an unsharded single-process run of the same
steps (which every rank also computes), or with the float64 NumPy reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import sm3fn
from distributed_harness import RankPool
from reference import ReferenceSM3, random_gradient

pytestmark = pytest.mark.slow

LR, STEPS = 0.05, 5


@pytest.fixture(scope="module")
def ranks():
    pool = RankPool(world_size=2)
    yield pool
    pool.close()


# --------------------------------------------------------------------------- helpers (run on ranks)


class Toy(nn.Module):
    """Parameters whose dim 0 does not split evenly on 2 ranks; ``row`` leaves rank 1 an empty shard."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 3))
        self.t = nn.Parameter(torch.randn(7, 4, 3) * 0.5)
        self.row = nn.Parameter(torch.randn(1, 3))
        self.b = nn.Parameter(torch.randn(3))
        self.v = nn.Parameter(torch.randn(4))

    def forward(self, x, y):
        h = torch.tanh(x[:, :5] @ self.w + self.b)  # (B, 3)
        z = torch.tanh(torch.einsum("bi,ijk->bjk", x, self.t))  # (B, 4, 3)
        out = (z * h[:, None, :]).sum(-1) @ self.v + (h * self.row).sum(-1)
        return ((out - y) ** 2).mean()


def _batches(step: int, world_size: int, n: int = 6):
    """Each rank's batch at ``step``: the same on every rank, so each can compute the unsharded run."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(n, 7, generator=gen), torch.randn(n, generator=gen)) for _ in range(world_size)]


def _reference_grads(model, params, step, world_size):
    """The gradient of the mean of every rank's loss: what FSDP/DDP hand each rank."""

    def loss(ps):
        return sum(torch.func.functional_call(model, ps, b) for b in _batches(step, world_size)) / world_size

    return torch.func.grad(loss)(params)


def _full(t):
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def _assert_no_partial(state):
    for key, value in state.items(include_nested=True, leaves_only=True):
        if isinstance(value, torch.distributed.tensor.DTensor):
            assert not any(p.is_partial() for p in value.placements), (key, value.placements)


# --------------------------------------------------------------------------- FSDP2, functional path


def _fsdp_functional(rank, world_size, momentum, beta):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard

    torch.manual_seed(0)
    ref_model = Toy()
    model = copy.deepcopy(ref_model)
    fully_shard(model)
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for p in params.values())
    assert params["row"].to_local().shape[0] == (1 if rank == 0 else 0)  # an empty shard on rank 1

    tx = sm3fn.sm3(LR, momentum=momentum, beta=beta)
    state = tx.init({k: p.detach() for k, p in params.items()})
    ref_params = {k: p.detach().clone() for k, p in ref_model.named_parameters()}
    ref_state = tx.init(ref_params)
    for step in range(STEPS):
        x, y = _batches(step, world_size)[rank]
        model(x, y).backward()
        grads = {k: p.grad for k, p in params.items()}
        updates, state = tx.update(grads, state)
        new = sm3fn.apply_updates({k: p.detach() for k, p in params.items()}, updates)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(new[k])
                p.grad = None

        ref_updates, ref_state = tx.update(_reference_grads(ref_model, ref_params, step, world_size), ref_state)
        ref_params = sm3fn.apply_updates(ref_params, ref_updates)

    _assert_no_partial(state)
    # the accumulator of the sharded dim is sharded like the parameter, the others replicated
    assert state["sm3", "w", "accumulator_0"].placements == (Shard(0),)
    assert state["sm3", "w", "accumulator_1"].placements == (Replicate(),)
    assert state["sm3", "t", "accumulator_2"].placements == (Replicate(),)
    for k, p in params.items():
        diff = (p.full_tensor() - ref_params[k]).abs().max().item()
        assert diff < 1e-5, (k, diff)
        assert (p.full_tensor() - ref_model.get_parameter(k)).abs().max() > 1e-3, "the model did not move"
        for name in state["sm3", k].keys():
            torch.testing.assert_close(
                _full(state["sm3", k, name]), ref_state["sm3", k, name], rtol=1e-5, atol=1e-7
            )
        if momentum:
            torch.testing.assert_close(_full(state["momentum", k]), ref_state["momentum", k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.5)])
def test_fsdp2_functional_matches_unsharded(ranks, momentum, beta):
    ranks.run(_fsdp_functional, momentum, beta)


# --------------------------------------------------------------------------- placements vs the NumPy reference


def _placements_reference(rank, world_size, momentum, beta):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    mesh2d = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("dp", "tp"))
    layout = {  # name: (shape, mesh, placements)
        "rows": ((5, 3), mesh, [Shard(0)]),
        "cols": ((4, 5), mesh, [Shard(1)]),  # tensor-parallel style: a_0 needs the all-reduce
        "last": ((3, 2, 5), mesh, [Shard(2)]),
        "empty_shard": ((1, 4), mesh, [Shard(0)]),
        "vector": ((7,), mesh, [Shard(0)]),
        "replicated": ((2, 3), mesh, [Replicate()]),
        "scalar": ((), mesh, [Replicate()]),
        "two_mesh_dims": ((5, 3, 2), mesh2d, [Shard(0), Shard(1)]),
        "partial_grad": ((4, 3), mesh, [Shard(0)]),
    }
    rng = np.random.default_rng(11)
    p0 = {k: rng.standard_normal(shape) for k, (shape, _, _) in layout.items()}
    refs = {k: ReferenceSM3(v, lr=LR, momentum=momentum, beta=beta) for k, v in p0.items()}
    params = {
        k: distribute_tensor(torch.tensor(p0[k]), m, pl) for k, (_, m, pl) in layout.items()
    }
    tx = sm3fn.sm3(LR, momentum=momentum, beta=beta)
    state = tx.init(params)
    for _ in range(STEPS):
        grads = {}
        for k, (shape, m, pl) in layout.items():
            g = random_gradient(rng, shape)
            refs[k].step(g)
            if k == "partial_grad":  # pending sum: rank r holds (r + 1) / 3 of it
                local = torch.tensor(g) * (rank + 1) / 3
                grads[k] = DTensor.from_local(local, m, [Partial()], run_check=False)
            else:
                grads[k] = distribute_tensor(torch.tensor(g), m, pl)
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
    _assert_no_partial(state)
    for k, p in params.items():
        assert p.placements == tuple(layout[k][2]), k
        np.testing.assert_allclose(p.full_tensor().numpy(), refs[k].p, rtol=1e-9, atol=1e-12, err_msg=k)
        for i, a_ref in enumerate(refs[k].acc):
            a = state["sm3", k, f"accumulator_{i}"].full_tensor().numpy()
            np.testing.assert_allclose(a.reshape(a_ref.shape), a_ref, rtol=1e-12, atol=0, err_msg=f"{k} a_{i}")


@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.5, 0.9)])
def test_dtensor_placements_match_numpy_reference(ranks, momentum, beta):
    ranks.run(_placements_reference, momentum, beta)


# --------------------------------------------------------------------------- mixing plain tensors and DTensors


def _mixed(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(3)
    plain = {"enc.w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in plain.items()}
    tx = sm3fn.sm3(LR, momentum=0.9)

    state = tx.init(sharded)
    before = state.clone()
    grads = dict(sharded, **{"enc.w": torch.randn(4, 3, generator=gen)})  # one plain gradient
    with pytest.raises(TypeError, match=r"'enc\.w' mixes DTensors \(accumulator_0, accumulator_1\) with plain tensors \(grad\)"):
        tx.update(grads, state)
    assert (state == before).all(), "a rejected update must not touch the state"

    plain_state = tx.init(plain)  # state made before sharding, gradients sharded
    with pytest.raises(TypeError, match=r"'b' mixes DTensors \(grad\) with plain"):
        tx.update({"enc.w": plain["enc.w"], "b": sharded["b"]}, plain_state)

    with pytest.raises(TypeError, match=r"apply_updates: parameter 'enc\.w' mixes"):
        sm3fn.apply_updates(plain, {"enc.w": sharded["enc.w"]})

    ema_state = sm3fn.ema(0.9).init(plain)
    with pytest.raises(TypeError, match=r"ema: parameter 'b' mixes"):
        sm3fn.ema(0.9).update({"enc.w": plain["enc.w"], "b": sharded["b"]}, ema_state)

    # different parameters may differ: a sharded one next to a plain one is fine
    mixed_params = {"enc.w": sharded["enc.w"], "b": plain["b"]}
    s = tx.init(mixed_params)
    u, s = tx.update(mixed_params, s)
    assert isinstance(u["b"], torch.Tensor) and not hasattr(u["b"], "placements")
    assert u["enc.w"].placements == (Shard(0),)


def test_mixing_plain_tensors_and_dtensors_names_the_parameter(ranks):
    ranks.run(_mixed)
