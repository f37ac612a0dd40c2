"""The Fréchet distance between two Gaussians, and streaming feature moments to feed it.

FID, sFID, FD-DINOv2 and the CPU demo's distance in its own small network's features are all
this one function applied to different feature spaces:

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})

Everything is float64. The trace of the matrix square root is computed from eigenvalues of the
symmetric matrix S_1^{1/2} S_2 S_1^{1/2} (similar to S_1 S_2, so it has the same eigenvalues),
clipping the tiny negative ones that rounding produces for rank-deficient covariances (fewer
samples than feature dimensions). This avoids `scipy.linalg.sqrtm`'s complex results and its
occasional failure to converge on singular products.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    mu: (F,) means; sigma: (F, F) covariances. Returns a float >= 0 up to rounding.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"covariances must be ({dim}, {dim}) to match the means, got {sigma1.shape} and {sigma2.shape}"
        )
    # Symmetrise: covariances read from files can be asymmetric at the last bit.
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    sqrt_sigma1 = _symmetric_sqrt(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1  # symmetric PSD, eigenvalues of sigma1 @ sigma2
    trace_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)


@dataclass
class Gaussian:
    """Mean (F,) and covariance (F, F) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int = 0

    def distance(self, other: Gaussian) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


class FeatureMoments:
    """Streaming mean and covariance: add batches of (B, F) features, read a `Gaussian`.

    Sums are kept in float64 (sum x and sum x x^T), so 50,000 x 2048 Inception features never
    need to be held at once. The covariance is unbiased (divides by n - 1), as numpy's np.cov and
    torch-fidelity's statistics are. Accumulation happens on the features' device.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None  # (F,)
        self.total_outer: torch.Tensor | None = None  # (F, F)

    def update(self, features: torch.Tensor) -> None:
        if features.ndim != 2:
            raise ValueError(f"features must be (B, F), got {tuple(features.shape)}")
        features = features.detach().to(torch.float64)
        if self.total is None:
            dim = features.shape[1]
            self.total = torch.zeros(dim, dtype=torch.float64, device=features.device)
            self.total_outer = torch.zeros(dim, dim, dtype=torch.float64, device=features.device)
        self.count += features.shape[0]
        self.total += features.sum(dim=0)
        self.total_outer += features.T @ features

    def gaussian(self) -> Gaussian:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        mu = self.total / self.count
        sigma = (self.total_outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return Gaussian(mu.cpu().numpy(), sigma.cpu().numpy(), self.count)


def gaussian_of(features: torch.Tensor | np.ndarray) -> Gaussian:
    """Mean and covariance of a whole (N, F) feature array."""
    moments = FeatureMoments()
    moments.update(torch.as_tensor(np.asarray(features)))
    return moments.gaussian()
