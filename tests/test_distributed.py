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
from distributed_harness import RankPool
from reference import ReferenceSM3, random_gradient
from torch import nn

import sm3fn

pytestmark = pytest.mark.slow

LR, STEPS = 0.05, 5


@pytest.fixture(scope="module")
def ranks():
    pool = RankPool(world_size=2)
    yield pool
    pool.close()


# --------------------------------------------------------------------------- helpers (run on ranks)


class Toy(nn.Module):
    """Parameters whose dim 0 does not split evenly on 2 ranks; ``row`` and ``gain`` leave rank 1 empty shards."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 3))
        self.t = nn.Parameter(torch.randn(7, 4, 3) * 0.5)
        self.row = nn.Parameter(torch.randn(1, 3))
        self.b = nn.Parameter(torch.randn(3))
        self.v = nn.Parameter(torch.randn(4))
        self.gain = nn.Parameter(torch.randn(1))  # 1-d, empty on rank 1 (fully_shard refuses 0-d)
        self.scale = nn.Parameter(torch.tensor([0.7]))

    def forward(self, x, y):
        h = torch.tanh(x[:, :5] @ self.w + self.b)  # (B, 3)
        z = torch.tanh(torch.einsum("bi,ijk->bjk", x, self.t))  # (B, 4, 3)
        out = (z * h[:, None, :]).sum(-1) @ self.v * self.scale + (h * self.row).sum(-1) * self.gain
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


def _unsharded_run(model, momentum, beta, world_size, steps=STEPS):
    """The single-process run: ``model``'s parameters after ``steps`` functional SM3 steps."""
    tx = sm3fn.sm3(LR, momentum=momentum, beta=beta)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    state = tx.init(params)
    for step in range(steps):
        updates, state = tx.update(_reference_grads(model, params, step, world_size), state)
        params = sm3fn.apply_updates(params, updates)
    return params, state


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

    other_mesh = init_device_mesh("cpu", (world_size, 1))
    elsewhere = dict(sharded, b=distribute_tensor(plain["b"], other_mesh, [Shard(0), Shard(0)]))
    with pytest.raises(ValueError, match=r"'b' has DTensors on different device meshes"):
        tx.update(elsewhere, state)

    # different parameters may differ: a sharded one next to a plain one is fine
    mixed_params = {"enc.w": sharded["enc.w"], "b": plain["b"]}
    s = tx.init(mixed_params)
    u, s = tx.update(mixed_params, s)
    assert isinstance(u["b"], torch.Tensor) and not hasattr(u["b"], "placements")
    assert u["enc.w"].placements == (Shard(0),)


def test_mixing_plain_tensors_and_dtensors_names_the_parameter(ranks):
    ranks.run(_mixed)


# --------------------------------------------------------------------------- FSDP2, sm3fn.optim.SM3


def _fsdp_adapter(rank, world_size, momentum, beta, generic=False):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard

    torch.manual_seed(0)
    ref_model = Toy()
    model = copy.deepcopy(ref_model)
    fully_shard(model)
    if generic:  # the functional path inside torch.optim, state under FunctionalOptimizer's names
        opt = sm3fn.optim.FunctionalOptimizer(
            model.parameters(), lambda lr: sm3fn.sm3(lr, momentum=momentum, beta=beta), lr=LR
        )
        names = {"accumulator_0": "sm3.*.accumulator_0", "accumulator_1": "sm3.*.accumulator_1",
                 "accumulator_2": "sm3.*.accumulator_2", "momentum_buffer": "momentum.*", "step": "step"}
    else:
        opt = sm3fn.optim.SM3(model.parameters(), lr=LR, momentum=momentum, beta=beta)
        names = {}
    for step in range(STEPS):
        x, y = _batches(step, world_size)[rank]
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    ref_params, ref_state = _unsharded_run(ref_model, momentum, beta, world_size)
    for k, p in model.named_parameters():
        diff = (p.full_tensor() - ref_params[k]).abs().max().item()
        assert diff < 1e-5, (k, diff)
        state = {n: opt.state[p][names.get(n, n)] for n in (*ref_state["sm3", k].keys(), "momentum_buffer")
                 if names.get(n, n) in opt.state[p]}
        if not generic:
            assert set(opt.state[p]) == {"step", *ref_state["sm3", k].keys(), *(["momentum_buffer"] if momentum else [])}
        for name in ref_state["sm3", k].keys():
            assert not any(pl.is_partial() for pl in state[name].placements)
            torch.testing.assert_close(state[name].full_tensor(), ref_state["sm3", k, name], rtol=1e-5, atol=1e-7)
        if momentum:
            torch.testing.assert_close(state["momentum_buffer"].full_tensor(), ref_state["momentum", k], rtol=1e-5, atol=1e-6)
    state = opt.state[model.w]
    assert state[names.get("accumulator_0", "accumulator_0")].placements == (Shard(0),)
    assert state[names.get("accumulator_1", "accumulator_1")].placements == (Replicate(),)


@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.5)])
def test_fsdp2_optimizer_matches_unsharded(ranks, momentum, beta):
    ranks.run(_fsdp_adapter, momentum, beta)


def test_fsdp2_functional_optimizer_matches_unsharded(ranks):
    ranks.run(_fsdp_adapter, 0.9, 0.0, True)


def _adapter_mixed(rank, world_size):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = Toy()
    plain_opt = sm3fn.optim.SM3(plain.parameters(), lr=LR)
    plain(*_batches(0, world_size)[rank]).backward()
    plain_opt.step()
    model = copy.deepcopy(plain)
    fully_shard(model)
    opt = sm3fn.optim.SM3(model.named_parameters(), lr=LR)
    opt.load_state_dict(plain_opt.state_dict())  # an unsharded checkpoint into a sharded model
    model(*_batches(1, world_size)[rank]).backward()
    before = {k: p.full_tensor() for k, p in model.named_parameters()}
    with pytest.raises(TypeError, match=r"SM3: parameter 0 \('w'\) of shape \(5, 3\) mixes DTensors \(grad, param\) "
                       r"with plain tensors \(accumulator_0, accumulator_1\)"):
        opt.step()
    for k, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), before[k]), "a rejected step must not move any parameter"


def test_optimizer_mixing_plain_state_and_dtensors_names_the_parameter(ranks):
    ranks.run(_adapter_mixed)


# --------------------------------------------------------------------------- DDP


def _ddp(rank, world_size, momentum):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ref_model = Toy()
    model = DDP(copy.deepcopy(ref_model))
    opt = sm3fn.optim.SM3(model.parameters(), lr=LR, momentum=momentum)
    for step in range(STEPS):
        x, y = _batches(step, world_size)[rank]
        model(x, y).backward()  # DDP averages the gradients over the ranks
        opt.step()
        opt.zero_grad()
    mine = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    for r, theirs in enumerate(everyone):
        assert torch.equal(theirs, mine), f"rank {r} holds other parameters than rank {rank}"
    ref_params, _ = _unsharded_run(ref_model, momentum, 0.0, world_size)
    for k, p in model.module.named_parameters():
        assert (p.detach() - ref_params[k]).abs().max() < 1e-5, k


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_ddp_parameters_identical_on_every_rank(ranks, momentum):
    ranks.run(_ddp, momentum)


# --------------------------------------------------------------------------- torch.distributed.checkpoint


def _train(model, opt, rank, world_size, steps):
    for step in steps:
        x, y = _batches(step, world_size)[rank]
        model(x, y).backward()
        opt.step()
        opt.zero_grad()


def _dcp_optimizer(rank, world_size, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def sharded(seed):
        torch.manual_seed(seed)
        model = Toy()
        fully_shard(model)
        return model, sm3fn.optim.SM3(model.parameters(), lr=LR, momentum=0.9)

    model, opt = sharded(0)
    _train(model, opt, rank, world_size, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    resumed, resumed_opt = sharded(1)  # other initial values: all must come from the checkpoint
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(resumed, resumed_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert q.placements == p.placements
        for name, value in opt.state[p].items():
            loaded = resumed_opt.state[q][name]
            if name != "step":
                assert loaded.placements == value.placements, name
            assert torch.equal(_full(loaded), _full(value)), name

    _train(model, opt, rank, world_size, range(3, STEPS + 1))
    _train(resumed, resumed_opt, rank, world_size, range(3, STEPS + 1))
    for (k, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), k
        assert torch.equal(_full(opt.state[p]["accumulator_0"]), _full(resumed_opt.state[q]["accumulator_0"]))
        assert int(resumed_opt.state[q]["step"]) == STEPS + 1


def test_dcp_optimizer_state_resumes_the_same_trajectory(ranks, tmp_path):
    ranks.run(_dcp_optimizer, str(tmp_path / "ckpt"))


def _dcp_functional(rank, world_size, path):
    import torch.distributed.checkpoint as dcp
    from tensordict import TensorDict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(5)
    shapes = {"w": (5, 3), "t": (3, 4, 2), "b": (3,)}
    params = {k: distribute_tensor(torch.randn(s, generator=gen), mesh, [Shard(0)]) for k, s in shapes.items()}
    grads = [{k: distribute_tensor(torch.randn(s, generator=gen), mesh, [Shard(0)]) for k, s in shapes.items()}
             for _ in range(STEPS)]
    tx = sm3fn.sm3(lambda count: LR * 0.8**count, momentum=0.9)  # the schedule's count is state too

    def steps(params, state, todo):
        for g in todo:
            updates, state = tx.update(g, state, params)
            params = sm3fn.apply_updates(params, updates)
        return params, state

    params, state = steps(params, tx.init(params), grads[:2])
    dcp.save({"params": params, "state": state.to_dict()}, checkpoint_id=path)

    fresh = {k: torch.zeros_like(v) for k, v in params.items()}
    sd = {"params": fresh, "state": tx.init(fresh).to_dict()}
    dcp.load(sd, checkpoint_id=path)  # in place, into the DTensors' local shards
    loaded_state = TensorDict(sd["state"], batch_size=[])
    _assert_no_partial(loaded_state)
    _assert_same_state(loaded_state, state)
    assert int(loaded_state["learning_rate", "count"]) == 2

    params, state = steps(params, state, grads[2:])
    resumed, resumed_state = steps(sd["params"], loaded_state, grads[2:])
    for k in shapes:
        assert torch.equal(params[k].full_tensor(), resumed[k].full_tensor()), k
    _assert_same_state(resumed_state, state)


def _assert_same_state(got, expected):
    got = dict(got.items(include_nested=True, leaves_only=True))
    expected = dict(expected.items(include_nested=True, leaves_only=True))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.distributed.tensor.DTensor):
            assert got[key].placements == value.placements, key
        assert torch.equal(_full(got[key]), _full(value)), key


def test_dcp_functional_state_resumes_the_same_trajectory(ranks, tmp_path):
    ranks.run(_dcp_functional, str(tmp_path / "ckpt"))


# --------------------------------------------------------------------------- communication per step


def _collectives(rank, world_size):
    from unittest import mock

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    torch.manual_seed(0)
    model = Toy()
    fully_shard(model)
    model(*_batches(0, world_size)[rank]).backward()
    # one all_reduce(MAX) carrying, per sharded parameter of >= 2 dims, n_i of every unsharded dim i
    payload = sum(sum(p.shape[1:]) for p in model.parameters() if p.dim() >= 2)
    assert payload == 3 + (4 + 3) + 3

    opt = sm3fn.optim.SM3(model.parameters(), lr=LR, momentum=0.9)
    tx = sm3fn.sm3(LR, momentum=0.9)
    params = {k: p.detach() for k, p in model.named_parameters()}
    state = tx.init(params)
    for label, step in [
        ("sm3fn.optim.SM3", opt.step),
        ("sm3fn.sm3", lambda: tx.update({k: p.grad for k, p in model.named_parameters()}, state)),
    ]:
        sizes = []
        real = dist.all_reduce

        def recording(tensor, *args, **kwargs):
            sizes.append(tensor.numel())
            return real(tensor, *args, **kwargs)

        with CommDebugMode() as comm, mock.patch.object(dist, "all_reduce", recording):
            step()
        assert comm.get_total_counts() == 1, (label, comm.get_comm_counts())
        assert sizes == [payload], (label, sizes)


def test_one_all_reduce_per_step(ranks):
    ranks.run(_collectives)


# --------------------------------------------------------------------------- the example, through torchrun


def test_fsdp_example_runs_under_torchrun():
    import os
    import subprocess
    import sys

    from distributed_harness import LOOPBACK, free_port, loopback_env

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", **loopback_env(),
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", LOOPBACK, "--master_port", str(free_port()),
           os.path.join(root, "examples", "fsdp_train.py"), "--steps", "12"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    losses = [float(line.split("loss")[1]) for line in out.stdout.splitlines() if line.strip().startswith("SM3 step")]
    assert len(losses) >= 2 and losses[-1] < losses[0], out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert len(rows) == 2, out.stdout
    for rank, params, accs, sm3_total, adam, ratio in rows:
        # the accumulators are a few percent of the parameters; Adam keeps two copies of them
        assert float(accs) < 0.1 * float(params) and float(adam) >= 2 * float(params) - 1, rows


# --------------------------------------------------------------------------- non-finite gradients on one rank only


def _nonfinite_on_one_rank(rank, world_size):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Toy()
    fully_shard(model)
    opt = sm3fn.optim.SM3(model.parameters(), lr=LR, momentum=0.9, skip_nonfinite=True)
    model(*_batches(0, world_size)[rank]).backward()
    opt.step()
    opt.zero_grad()
    model(*_batches(1, world_size)[rank]).backward()
    if rank == 1:  # only rank 1's shard sees the NaN: every rank must still skip
        model.w.grad.to_local()[0, 0] = float("nan")
    before = {k: p.full_tensor() for k, p in model.named_parameters()}
    state_before = {k: _full(v) for k, v in opt.state[model.w].items()}
    opt.step()
    assert opt.skipped_steps == 1
    for k, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), before[k]), k
    for k, v in opt.state[model.w].items():
        assert torch.equal(_full(v), state_before[k]), k

    # the functional form: apply_if_finite around sm3 on the DTensors
    tx = sm3fn.apply_if_finite(sm3fn.sm3(LR))
    params = {k: p.detach() for k, p in model.named_parameters()}
    state = tx.init(params)
    updates, state = tx.update({k: p.grad for k, p in model.named_parameters()}, state, params)
    assert int(_full(state["skipped"])) == 1
    assert all(_full(u).abs().sum() == 0 for u in updates.values())


def test_nonfinite_gradient_on_one_rank_skips_on_every_rank(ranks):
    ranks.run(_nonfinite_on_one_rank, timeout=60)


# --------------------------------------------------------------------------- the rest of the library on DTensors


def _toolbox(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(0)
    full = {"w": torch.randn(5, 3, generator=gen), "t": torch.randn(3, 2, 4, generator=gen),
            "b": torch.randn(3, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in full.items()} for _ in range(STEPS)]
    transforms = {
        "tensor hyperparameters": lambda: sm3fn.sm3(torch.tensor(LR), momentum=torch.tensor(0.9),
                                                    beta=torch.tensor(0.5)),
        "schedule": lambda: sm3fn.sm3(lambda count: LR / (1 + count), momentum=0.9),
        "clip_by_global_norm": lambda: sm3fn.chain(sm3fn.clip_by_global_norm(1.0), sm3fn.sm3(LR)),
        "add_decayed_weights": lambda: sm3fn.chain(sm3fn.sm3(LR), sm3fn.add_decayed_weights(0.01)),
        "parameter_averaging": lambda: sm3fn.chain(sm3fn.sm3(LR), sm3fn.parameter_averaging(0.9)),
        "inject_hyperparams": lambda: sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=LR, momentum=0.9),
        "trace": lambda: sm3fn.chain(sm3fn.scale_by_sm3(), sm3fn.trace(0.9, nesterov=True), sm3fn.scale(-LR)),
    }
    for name, make in transforms.items():
        tx = make()
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
        plain = {k: v.clone() for k, v in full.items()}
        s_state, p_state = tx.init(sharded), tx.init(plain)
        for g in grads:
            u, s_state = tx.update({k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in g.items()}, s_state, sharded)
            sharded = sm3fn.apply_updates(sharded, u)
            u, p_state = tx.update(g, p_state, plain)
            plain = sm3fn.apply_updates(plain, u)
        _assert_no_partial(s_state)
        for k in full:
            diff = (sharded[k].full_tensor() - plain[k]).abs().max().item()
            assert diff < 1e-5, (name, k, diff)
            assert (plain[k] - full[k]).abs().max() > 1e-3, (name, k, "did not move")


def test_toolbox_transforms_on_dtensors_match_unsharded(ranks):
    ranks.run(_toolbox)


# --------------------------------------------------------------------------- one dispatcher, four entry points


def _entry_points_on_dtensors(rank, world_size, momentum):
    """The four entry points (tests/entry_points.py) on DTensor leaves, sharded along several
    dims (an empty shard included), against tx.update on the unsharded tensors."""
    from entry_points import ENTRY_POINTS
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    layout = {"rows": ((5, 3), [Shard(0)]), "cols": ((4, 5), [Shard(1)]), "empty": ((1, 4), [Shard(0)]),
              "vector": ((7,), [Shard(0)]), "replicated": ((2, 3), [Replicate()])}
    rng = np.random.default_rng(5)
    plain0 = {k: torch.tensor(rng.standard_normal(s)) for k, (s, _) in layout.items()}
    plain_grads = [{k: torch.tensor(random_gradient(rng, s)) for k, (s, _) in layout.items()} for _ in range(3)]
    want_p, want_a = ENTRY_POINTS["tx.update"](plain0, plain_grads, LR, momentum, 0.0)
    params0 = {k: distribute_tensor(v, mesh, layout[k][1]) for k, v in plain0.items()}
    grads = [{k: distribute_tensor(g[k], mesh, layout[k][1]) for k in g} for g in plain_grads]
    for name, run in ENTRY_POINTS.items():
        got_p, got_a = run(params0, grads, LR, momentum, 0.0)
        for k in layout:
            torch.testing.assert_close(_full(got_p[k]), want_p[k], rtol=1e-12, atol=1e-12,
                                       msg=lambda m, name=name, k=k: f"{name} {k}: {m}")
            torch.testing.assert_close(_full(got_a[k]).reshape(-1), want_a[k].reshape(-1), rtol=1e-12, atol=0,
                                       msg=lambda m, name=name, k=k: f"{name} {k} accumulator_0: {m}")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_every_entry_point_steps_dtensors_alike(ranks, momentum):
    ranks.run(_entry_points_on_dtensors, momentum)
