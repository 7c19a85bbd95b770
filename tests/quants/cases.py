"""Input values that stress the quantizers: the cases every type is checked on against ggml.

Each case is ``f(rng, n_rows, n_cols) -> float32 (n_rows, n_cols)``.  Several
of them mix patterns per 32-value segment, so one row holds zero, constant,
one-sided and spiky blocks and sub-blocks side by side, within and across
K-quant super-blocks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Case = Callable[[np.random.Generator, int, int], np.ndarray]

FP16_MAX = 65504.0


def _normal(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    return rng.standard_normal((n_rows, n_cols), dtype=np.float32)


def normal_with_outliers(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    x = _normal(rng, n_rows, n_cols) * np.float32(0.02)
    spikes = rng.random((n_rows, n_cols)) < 0.002
    x[spikes] = rng.standard_normal(int(spikes.sum())).astype(np.float32) * np.float32(2.0)
    return x


def bf16_values(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Values a bf16 checkpoint holds: float32 with the low 16 bits zero."""
    x = normal_with_outliers(rng, n_rows, n_cols)
    return (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def _segment_patterns(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """One 32-value segment per pattern (n = 32, or fewer for tiny rows)."""
    base = rng.standard_normal(n).astype(np.float32)
    spike = np.full(n, 1e-3, np.float32) * base
    spike[rng.integers(n)] = np.float32(1e4)
    neg_spike = spike.copy()
    neg_spike[np.argmax(np.abs(neg_spike))] *= -1
    ties = np.where(np.arange(n) % 2 == 0, np.float32(3.0), np.float32(-3.0))  # equal |x|, first wins
    return [
        np.zeros(n, np.float32),
        np.full(n, 0.75, np.float32),
        np.full(n, -1.25, np.float32),
        np.abs(base),
        -np.abs(base),
        spike,
        neg_spike,
        ties,
        base * np.float32(FP16_MAX / 4),
        np.clip(base * np.float32(FP16_MAX), -FP16_MAX, FP16_MAX),
        base * np.float32(1e-6),
        base * np.float32(1e-30),
        base * np.float32(1e-40),  # float32 subnormals
        np.where(base > 1, base, 0).astype(np.float32),  # mostly zero
        np.round(base * 4).astype(np.float32),  # small integers: exact grid hits
        base,
    ]


def mixed_blocks(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Every row is a shuffle of 32-value segment patterns."""
    seg = min(32, n_cols)
    rows = []
    for _ in range(n_rows):
        patterns = _segment_patterns(rng, seg)
        order = rng.integers(len(patterns), size=n_cols // seg)
        rows.append(np.concatenate([patterns[i] for i in order]))
    return np.stack(rows).astype(np.float32)


def whole_row_patterns(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Each row repeats one segment pattern, so whole super-blocks are zero, constant, one-sided..."""
    seg = min(32, n_cols)
    patterns = _segment_patterns(rng, seg)
    return np.stack([np.tile(patterns[r % len(patterns)], n_cols // seg) for r in range(n_rows)])


def tiny_and_huge_rows(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Whole rows scaled to the extremes: fp16 overflow of the scale, subnormal scales."""
    scales = np.array([0.0, 1e-38, 1e-20, 1e-7, 6e-5, 1.0, 3e4, FP16_MAX, 1e6, 1e38], np.float32)
    x = _normal(rng, n_rows, n_cols) / np.float32(4)
    return (x * scales[np.arange(n_rows) % len(scales)][:, None]).astype(np.float32)


CASES: dict[str, Case] = {
    "normal_outliers": normal_with_outliers,
    "bf16": bf16_values,
    "mixed_blocks": mixed_blocks,
    "whole_row_patterns": whole_row_patterns,
    "tiny_and_huge": tiny_and_huge_rows,
}

#: Row widths to try, where the type's block size divides them.
WIDTHS = (32, 256, 4096, 11008)
