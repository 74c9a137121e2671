"""Fréchet Inception Distance from feature matrices (pytorch-fid's ``calculate_frechet_distance``).

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to two feature
sets (for FID proper: :func:`ldm_jax.eval.inception.inception_features`, [N, 2048]).
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

__all__ = ["feature_statistics", "frechet_distance", "fid_from_features", "trace_sqrt_product"]


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mean [D], covariance [D, D]), float64, unbiased (``np.cov``, rows = samples)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (pytorch-fid's algorithm).

    If the product of the covariances is singular, ``eps`` is added to both diagonals; a small
    imaginary part of the matrix square root is dropped. Where pytorch-fid raises instead (an
    imaginary diagonal above 1e-3: ``sqrtm`` of a rank-deficient product, e.g. fewer samples than
    feature dimensions), the trace term comes from :func:`trace_sqrt_product` with a warning.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals", RuntimeWarning,
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        warnings.warn(f"FID: sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g} (rank-deficient "
                      "covariances, e.g. fewer samples than feature dimensions); using the symmetric form "
                      "Tr((S1^1/2 S2 S1^1/2)^1/2)", RuntimeWarning, stacklevel=2)
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    else:
        tr_covmean = np.trace(covmean.real)  # a small imaginary part (round-off) is dropped
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def trace_sqrt_product(sigma1, sigma2) -> float:
    """Tr((S1 S2)^(1/2)) for covariance matrices [D, D], computed as Tr((S1^1/2 S2 S1^1/2)^(1/2)).

    S1 S2 is similar to the symmetric positive semi-definite S1^1/2 S2 S1^1/2, so both have the same
    non-negative eigenvalues; symmetric eigendecompositions stay real where ``sqrtm(S1 S2)`` of a
    rank-deficient product picks up imaginary round-off.
    """
    w1, v1 = linalg.eigh(np.asarray(sigma1, np.float64))
    root1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
    inner = root1 @ np.asarray(sigma2, np.float64) @ root1
    eig = linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def fid_from_features(feats_a, feats_b) -> float:
    """FID between two feature sets [N_a, D] and [N_b, D]."""
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))
