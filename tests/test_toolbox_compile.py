"""A whole toolbox training step under torch.compile(fullgraph=True): same numbers as eager, no recompiles."""

import pytest
import torch

import sm3fn


@pytest.mark.slow
def test_toolbox_step_compiles_fullgraph():
    torch.manual_seed(0)
    total = 30
    tx = sm3fn.named_chain(
        ("clip", sm3fn.clip_by_global_norm(1.0)),
        ("sm3", sm3fn.masked(sm3fn.scale_by_sm3(), lambda path, p: p.ndim > 1)),
        ("decay", sm3fn.add_decayed_weights(1e-2, mask=lambda path, p: not path.endswith("b"))),
        ("learning_rate", sm3fn.scale_by_learning_rate(sm3fn.schedules.recipe(0.1, total))),
        ("average", sm3fn.parameter_averaging()),
    )

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return sm3fn.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)
    params = {"w": torch.randn(6, 4), "b": torch.randn(4)}
    p_eager, s_eager = params, tx.init(params)
    p_comp, s_comp = params, tx.init(params)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(6):
            grads = {"w": torch.randn(6, 4) * 3, "b": torch.randn(4)}
            p_eager, s_eager = step(p_eager, grads, s_eager)
            p_comp, s_comp = compiled(p_comp, grads, s_comp)
    for k in params:
        torch.testing.assert_close(p_comp[k], p_eager[k])
        torch.testing.assert_close(
            sm3fn.averaged_params(s_comp, like=p_comp)[k], sm3fn.averaged_params(s_eager, like=p_eager)[k]
        )
    assert int(s_comp["learning_rate", "count"]) == 6
