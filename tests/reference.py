"""An independent float64 SM3-II, written from the paper's equations in NumPy.

Anil et al. 2019, Algorithm SM3-II, with torch-SM3's EMA momentum.  It loops
over coordinates on purpose: it shares no code, layout or broadcasting trick
with sm3fn, so agreement means something.
"""

from __future__ import annotations

import itertools

import numpy as np


class ReferenceSM3:
    def __init__(self, param, lr=0.1, momentum=0.0, beta=0.0, eps=1e-30):
        self.p = np.array(param, dtype=np.float64)
        self.shape = self.p.shape
        self.lr, self.momentum, self.beta, self.eps = lr, momentum, beta, eps
        k = len(self.shape)
        # cover: one accumulator per dimension; 0-d and 1-d: one per coordinate
        self.acc = [np.zeros(self.shape)] if k <= 1 else [np.zeros(n) for n in self.shape]
        self.m = np.zeros(self.shape)

    def cover_min(self, idx):
        if len(self.shape) <= 1:
            return self.acc[0][idx]
        return min(self.acc[i][j] for i, j in enumerate(idx))

    def step(self, g):
        """Returns the preconditioned gradient u; updates p, accumulators, momentum."""
        g = np.asarray(g, dtype=np.float64)
        nu = np.zeros(self.shape)
        for idx in itertools.product(*(range(n) for n in self.shape)):
            prev = self.cover_min(idx)
            if self.beta == 0:
                nu[idx] = prev + g[idx] ** 2
            else:
                nu[idx] = self.beta * prev + (1 - self.beta) * g[idx] ** 2
        u = np.zeros(self.shape)
        for idx in itertools.product(*(range(n) for n in self.shape)):
            u[idx] = g[idx] / np.sqrt(nu[idx] + self.eps) if nu[idx] > 0 else 0.0
        if len(self.shape) <= 1:
            self.acc = [nu.copy()]
        else:
            new = [np.full(n, -np.inf) for n in self.shape]
            for idx in itertools.product(*(range(n) for n in self.shape)):
                for i, j in enumerate(idx):
                    new[i][j] = max(new[i][j], nu[idx])
            self.acc = new
        if self.momentum > 0:
            self.m = self.momentum * self.m + (1 - self.momentum) * u
            step = self.m
        else:
            step = u
        self.p = self.p - self.lr * step
        return u


def random_gradient(rng: np.random.Generator, shape, zero_slices: bool = True) -> np.ndarray:
    """Gaussian entries whose scale varies over orders of magnitude, with zero slices."""
    g = rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 3, size=shape)
    if zero_slices and len(shape) >= 1 and shape[0] > 1:
        g[rng.integers(shape[0])] = 0.0  # a whole slice with no gradient
        if len(shape) >= 2 and shape[-1] > 1:
            g[..., rng.integers(shape[-1])] = 0.0
    return g
