"""The SM3 step's backends, one module each, and the dispatcher that picks one per tensor.

* ``dispatch``: :func:`sm3_step_` (in place) and :func:`sm3_step` (out of
  place, pure), the one entry every public API calls; its docstring holds the
  routing table and the backend interface.
* ``reference``: the differentiable out-of-place math.
* ``blocked``: in place, eager blocks of rows (any device, dtype, layout).
* ``fused_cpu``: one generated C++ sweep per CPU tensor, in place or out of place.
* ``triton_gpu``: one generated Triton sweep per CUDA tensor, many tensors per launch
  (triton optional, imported when a kernel is built).
* ``trace``: the symbolic values both generators run ``_sm3_math`` on.
* ``sparse``: ``torch.sparse_coo`` gradients, the touched rows only.
* ``sharded``: DTensor (FSDP2) parameters, local shards plus one all-reduce.

The equations themselves live in :mod:`sm3fn._sm3_math`, the one definition
every backend calls or traces.
"""

from sm3fn._kernels.dispatch import check_kernel_choice, needs_autograd, sm3_step, sm3_step_

__all__ = ["check_kernel_choice", "needs_autograd", "sm3_step", "sm3_step_"]
