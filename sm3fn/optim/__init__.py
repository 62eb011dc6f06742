"""``torch.optim`` optimizers on sm3fn's functional core.

* :class:`SM3`: a drop-in for torch-SM3's ``from SM3 import SM3``.
* :class:`FunctionalOptimizer`: any ``GradientTransformation`` as a
  ``torch.optim.Optimizer``.
"""

from sm3fn.optim.functional import FunctionalOptimizer
from sm3fn.optim.sm3_optimizer import SM3

__all__ = ["FunctionalOptimizer", "SM3"]
