"""Squared maximum mean discrepancy between generated and reference features, its unbiased estimate and
its jackknife over the generated samples (eval.stats): KID's polynomial kernel and CMMD's Gaussian one.

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (n(n-1)) + Σ_{i≠j} k(y_i, y_j) / (m(m-1)) - 2 Σ_{i,j} k(x_i, y_j) / (nm)

KID (Bińkowski et al. 2018): k(x, y) = (x·y / d + 1)³ on Inception features. Its point estimate is
clean-fid's `kernel_distance` (the mean over random subsets of up to 1,000); with N ≤ 1,000 on both sides
those subsets are the whole sets, so the jackknife here is of the very same statistic.

CMMD (Jayasumana et al. 2024, "Rethinking FID", arXiv 2401.09603): k(x, y) = exp(-‖x - y‖² / (2σ²)),
σ = 10, on unit-length CLIP image embeddings, reported ×1000 as the paper's reference code does. That code
computes the biased estimate (the diagonals k(x_i, x_i) = 1 included); this is the unbiased one above.

Leaving a group of generated rows out is a 0/1 weight per row, c, so each jackknife value is a quadratic
form of the kernel matrices computed once: Σ_{i≠j} = cᵀKc - c·diag(K).

    value, held_out = mmd_jackknife(clip_generated, clip_reference, gaussian_kernel, groups=128)
    cmmd, (low, high) = CMMD_SCALE * value, CMMD_SCALE * np.array(jackknife_interval(value, held_out))
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .stats import jackknife_groups

CMMD_SIGMA = 10.0  # the paper's bandwidth
CMMD_SCALE = 1000.0  # the paper reports MMD² × 1000

Kernel = Callable[[np.ndarray, np.ndarray], np.ndarray]


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel, (N, D) × (M, D) -> (N, M)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def gaussian_kernel(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA) -> np.ndarray:
    """CMMD's kernel, (N, D) × (M, D) -> (N, M)."""
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.exp(-squared.clip(min=0) / (2 * sigma**2))


def _within(k: np.ndarray) -> float:
    """Mean of k over the pairs i ≠ j."""
    n = len(k)
    return float((k.sum() - np.trace(k)) / (n * (n - 1)))


def _terms(generated: np.ndarray, reference: np.ndarray, kernel: Kernel) -> tuple[np.ndarray, np.ndarray, float]:
    """What every resample shares: k(generated, generated), each generated row's mean k to the reference,
    and the reference's within-term."""
    if min(len(generated), len(reference)) < 2:
        raise ValueError("MMD needs at least 2 samples on each side")
    return kernel(generated, generated), kernel(generated, reference).mean(1), _within(kernel(reference, reference))


def _mmd_by_weights(terms: tuple[np.ndarray, np.ndarray, float], weights: np.ndarray) -> np.ndarray:
    """MMD²_u of (B, N) 0/1 selections of the generated rows."""
    k_gg, k_gr_mean, within_r = terms
    n = weights.sum(1)
    pairs = ((weights @ k_gg) * weights).sum(1) - weights @ np.diag(k_gg)
    return pairs / (n * (n - 1)) + within_r - 2 * (weights @ k_gr_mean) / n


def mmd(generated: np.ndarray, reference: np.ndarray, kernel: Kernel) -> float:
    """Unbiased MMD² between (N, D) generated and (M, D) reference features."""
    return float(_mmd_by_weights(_terms(generated, reference, kernel), np.ones((1, len(generated))))[0])


def mmd_jackknife(
    generated: np.ndarray, reference: np.ndarray, kernel: Kernel, groups: int
) -> tuple[float, np.ndarray]:
    """MMD²_u, and the values without each jackknife group of generated rows (eval.stats.jackknife_interval)."""
    terms = _terms(generated, reference, kernel)
    weights = np.ones((1 + min(len(generated), groups), len(generated)))
    for i, rows in enumerate(jackknife_groups(len(generated), groups), start=1):
        weights[i, rows] = 0
    values = _mmd_by_weights(terms, weights)  # the whole set, then without each group
    return float(values[0]), values[1:]
