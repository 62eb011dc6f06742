"""An independent float64 row-cover SM3 for sparse gradients, in NumPy.

Written from the equations (Anil et al. 2019, SM3-II with the row cover; the
sparse rule of torch-SM3: only the rows a sparse gradient touches are updated) with coordinate loops: one accumulator per row;
a step touches only the rows that appear in the gradient; no momentum.  It
shares no code with sm3fn: it sums repeated entries itself, walks rows and
coordinates one at a time, and never sees a torch tensor.
"""

from __future__ import annotations

import numpy as np


def dense_from_entries(shape, index_rows, values) -> tuple[np.ndarray, set]:
    """Sums COO entries into a dense float64 gradient; returns it and the touched rows.

    ``index_rows[j]`` is entry ``j``'s index tuple over the leading sparse
    dims, ``values[j]`` its value (a scalar, or a block over the rest).
    """
    g = np.zeros(shape)
    touched = set()
    for idx, v in zip(index_rows, values):
        idx = tuple(int(i) for i in np.atleast_1d(idx))
        g[idx] = g[idx] + np.asarray(v, dtype=np.float64)
        touched.add(idx[0])
    return g, touched


class ReferenceRowSM3:
    def __init__(self, param, lr=0.1, beta=0.0, eps=1e-30):
        self.p = np.array(param, dtype=np.float64)
        self.lr, self.beta, self.eps = lr, beta, eps
        self.acc = np.zeros(self.p.shape[0])  # the row cover: one number per row

    def step(self, g: np.ndarray, touched) -> None:
        """One step with dense gradient ``g`` of which only the ``touched`` rows count."""
        for r in sorted(touched):
            row = np.asarray(g[r], dtype=np.float64)
            nu = np.zeros(row.shape)
            for idx in np.ndindex(*row.shape):
                if self.beta == 0:
                    nu[idx] = self.acc[r] + row[idx] ** 2
                else:
                    nu[idx] = self.beta * self.acc[r] + (1 - self.beta) * row[idx] ** 2
            new_p = np.array(self.p[r], dtype=np.float64)
            top = -np.inf
            for idx in np.ndindex(*row.shape):
                u = row[idx] / np.sqrt(nu[idx] + self.eps) if nu[idx] > 0 else 0.0
                new_p[idx] = new_p[idx] - self.lr * u
                top = max(top, nu[idx])
            self.p[r] = new_p
            self.acc[r] = top
