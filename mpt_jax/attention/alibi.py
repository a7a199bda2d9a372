"""ALiBi slopes (Press et al.), exactly as MPT computes them.

For ``n`` heads MPT takes ``n2 = 2**ceil(log2(n))`` geometric slopes ``2**(-k * bias_max / n2)``,
k = 1..n2; when ``n`` is not a power of two it keeps the odd-indexed ones first, then the even
ones, and truncates to ``n``. With ``bias_max = 8`` this is the slope set of the ALiBi paper.
"""

from __future__ import annotations

import math

import numpy as np


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0) -> np.ndarray:
    """The [n_heads] float32 slopes; head h's bias for key j seen from query i is -slope[h]*|i-j|."""
    if n_heads < 1:
        raise ValueError(f"alibi_slopes: n_heads={n_heads} must be positive")
    n2 = 2 ** math.ceil(math.log2(n_heads))
    m = np.arange(1, n2 + 1, dtype=np.float64) * (alibi_bias_max / n2)
    slopes = 1.0 / np.power(2.0, m)
    if n2 != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[0::2]])[:n_heads]
    return slopes.astype(np.float32)
