"""Inputs for checking GGUF quantizers byte for byte: ties, signed zeros, all-zero and constant blocks,
negative extremes, tiny and huge magnitudes, sparse rows, zero importance weights."""

from __future__ import annotations

import numpy as np


def edge_rows(cols: int = 512) -> np.ndarray:
    """Rows that hit the corner cases of ggml-quants.c (cols a multiple of 256)."""
    rng = np.random.default_rng(1234)
    rows = [rng.standard_normal(cols) for _ in range(4)]                      # gaussian
    for _ in range(2):                                                        # heavy tails + outliers
        r = rng.standard_t(2, cols) * 0.02
        r[rng.random(cols) < 0.01] *= 50
        rows.append(r)
    rows.append(np.zeros(cols))                                               # zeros
    rows.append(np.full(cols, -0.0))                                          # negative zeros
    rows.append(rng.standard_normal(cols) * 1e-8)                             # tiny (fp16 scales underflow)
    rows.append(rng.standard_normal(cols) * 1e-30)
    rows.append(np.full(cols, 0.37))                                          # constant
    rows.append(np.full(cols, -1.25))
    rows.append(-np.abs(rng.standard_normal(cols)))                           # all negative
    r = rng.standard_normal(cols) * 0.1
    r[::32] = -3.0                                                            # largest value negative
    rows.append(r)
    r = rng.standard_normal(cols) * 0.1
    r[5::32], r[9::32] = 2.0, -2.0                                            # +max and -max tie
    rows.append(r)
    rows.append(rng.integers(-8, 9, cols) / 8.0)                              # rounding ties
    rows.append(np.abs(rng.standard_normal(cols)))                            # all positive
    r = np.abs(rng.standard_normal(cols))
    r[rng.random(cols) < 0.3] = 0.0
    r[rng.random(cols) < 0.2] = -0.0                                          # zero minimum, mixed signs
    rows.append(r)
    r = rng.standard_normal(cols)
    r[rng.random(cols) < 0.9] = 0.0                                           # sparse
    rows.append(r)
    rows.append(rng.standard_normal(cols) * np.exp(rng.uniform(-6, 6, cols)))  # wide dynamic range
    rows.append(rng.standard_normal(cols) * 300 + 1000)                       # large, offset
    return np.stack(rows).astype(np.float32)


def edge_imatrices(cols: int = 512) -> dict:
    rng = np.random.default_rng(99)
    with_zeros = rng.random(cols) * (rng.random(cols) > 0.3)
    wide = np.exp(rng.uniform(-12, 12, cols))
    return {"random-with-zeros": with_zeros.astype(np.float32), "wide": wide.astype(np.float32)}
