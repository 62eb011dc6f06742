"""The SM3 step's backends, one module each; the dispatcher that picks one per tensor lands here.

* ``blocked``: in place, eager blocks of rows (any device, dtype, layout).
* ``fused_cpu``: in place, one generated C++ sweep per CPU tensor.
* ``sparse``: ``torch.sparse_coo`` gradients, the touched rows only.
* ``sharded``: DTensor (FSDP2) parameters, local shards plus one all-reduce.

The equations themselves live in :mod:`sm3fn._sm3_math`, the one definition
every backend calls or traces.
"""
