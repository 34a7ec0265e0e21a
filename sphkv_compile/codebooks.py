"""Lloyd-Max codebooks for the angle distributions of the polar tree, derived once.

After randomized-Hadamard preconditioning a key is (close to) isotropic, so:
  - a level-1 angle theta is uniform on [0, 2pi): its Lloyd-Max quantizer is uniform;
  - a node joining subtrees of a and b coordinates has psi = atan2(r_b, r_a) with density
        f(psi) = 2 / B(a/2, b/2) · cos^(a-1)(psi) · sin^(b-1)(psi),  psi in [0, pi/2].
    (a = b = 2^(l-1) gives the spec's sin^(2^(l-1)-1)(2 psi) at level l.)
The densities are built symbolically with sympy (normalisation by the Beta function),
then Lloyd-Max runs on a fine grid. Nothing here is typed in by hand; results are cached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import sympy as sp

MAX_BITS = 16
_psi = sp.Symbol("psi", positive=True)
_x = sp.Symbol("x", real=True)


@dataclass(frozen=True)
class Codebook:
    """Centroids (ascending) and the decision thresholds between them, float64."""

    centroids: np.ndarray
    thresholds: np.ndarray  # len(centroids) - 1 interior boundaries
    mse: float  # expected squared error under the design density
    bits: int


@lru_cache(maxsize=None)
def angle_log_density(a: int, b: int):
    """log f(psi) for the joint angle of subtrees of a and b coordinates, as a numpy function."""
    norm = 2 * sp.gamma(sp.Rational(a + b, 2)) / (sp.gamma(sp.Rational(a, 2)) * sp.gamma(sp.Rational(b, 2)))
    expr = sp.Float(sp.log(norm).evalf(30), 30) + (a - 1) * sp.log(sp.cos(_psi)) + (b - 1) * sp.log(sp.sin(_psi))
    return sp.lambdify(_psi, expr, "numpy")


@lru_cache(maxsize=None)
def sphere_coordinate_log_density(dim: int):
    """log density of one coordinate of a uniform point on the sphere of radius sqrt(dim).

    x = sqrt(dim)·u_1, u uniform on S^(dim-1): f(x) ∝ (1 - x²/dim)^((dim-3)/2) on |x| < sqrt(dim).
    This is the exact marginal used by the rotated scalar codec (it tends to N(0,1)).
    """
    n = sp.Integer(dim)
    norm = sp.gamma(n / 2) / (sp.sqrt(sp.pi * n) * sp.gamma((n - 1) / 2))
    expr = sp.Float(sp.log(norm).evalf(30), 30) + (n - 3) / 2 * sp.log(1 - _x**2 / n)
    return sp.lambdify(_x, expr, "numpy")


def _lloyd_max(grid: np.ndarray, pdf: np.ndarray, levels: int, iters: int | None = None) -> Codebook:
    """Lloyd-Max on a sampled density. Initialised at the f^(1/3) quantiles (the high-rate
    optimum), which makes a few iterations enough even for thousands of levels."""
    dx = np.diff(grid)
    mid_pdf = 0.5 * (pdf[1:] + pdf[:-1])
    mid_x = 0.5 * (grid[1:] + grid[:-1])
    m0 = np.concatenate(([0.0], np.cumsum(mid_pdf * dx)))
    m1 = np.concatenate(([0.0], np.cumsum(mid_pdf * mid_x * dx)))
    m2 = np.concatenate(([0.0], np.cumsum(mid_pdf * mid_x**2 * dx)))
    total = m0[-1]
    m0, m1, m2 = m0 / total, m1 / total, m2 / total

    if iters is None:  # the compander start is already within ~1% of optimal at many levels
        iters = 300 if levels <= 256 else 30
    comp = np.concatenate(([0.0], np.cumsum(np.cbrt(mid_pdf) * dx)))
    comp /= comp[-1]
    edges = np.interp((np.arange(levels + 1)) / levels, comp, grid)
    cents = None
    for _ in range(iters):
        p = np.diff(np.interp(edges, grid, m0))
        s = np.diff(np.interp(edges, grid, m1))
        safe = p > 1e-300
        new = np.where(safe, s / np.where(safe, p, 1.0), 0.5 * (edges[1:] + edges[:-1]))
        if cents is not None and np.max(np.abs(new - cents)) < 1e-13:
            cents = new
            break
        cents = new
        edges = np.concatenate(([grid[0]], 0.5 * (cents[1:] + cents[:-1]), [grid[-1]]))
    p = np.diff(np.interp(edges, grid, m0))
    s1 = np.diff(np.interp(edges, grid, m1))
    s2 = np.diff(np.interp(edges, grid, m2))
    mse = float(np.sum(s2 - 2 * cents * s1 + cents**2 * p))
    return Codebook(centroids=cents, thresholds=edges[1:-1].copy(), mse=max(mse, 0.0), bits=0)


def _grid_size(levels: int) -> int:
    return int(min(max(1 << 16, 64 * levels), 1 << 22))


@lru_cache(maxsize=None)
def angle_codebook(a: int, b: int, bits: int) -> Codebook:
    """Lloyd-Max codebook for psi in [0, pi/2] joining subtrees of a and b coordinates."""
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bits per angle must be in [0, {MAX_BITS}], got {bits}")
    n = _grid_size(1 << bits)
    grid = np.linspace(0.0, math.pi / 2, n + 1)
    inner = grid[1:-1]
    if a < 2 or b < 2:
        raise ValueError(f"every polar subtree holds at least 2 coordinates, got ({a}, {b})")
    logf = np.broadcast_to(angle_log_density(a, b)(inner), inner.shape)
    pdf = np.concatenate(([0.0], np.exp(logf), [0.0]))
    cb = _lloyd_max(grid, pdf, 1 << bits)
    return Codebook(cb.centroids, cb.thresholds, cb.mse, bits)


@lru_cache(maxsize=None)
def circle_codebook(bits: int) -> Codebook:
    """Level-1 angle theta, uniform on [0, 2pi): the uniform quantizer is Lloyd-Max optimal."""
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bits per angle must be in [0, {MAX_BITS}], got {bits}")
    levels = 1 << bits
    step = sp.Rational(2, levels) * sp.pi
    cents = np.array([float((k + sp.Rational(1, 2)) * step) for k in range(levels)]) if levels <= 4096 else (
        (np.arange(levels) + 0.5) * (2 * math.pi / levels))
    mse = float(step**2 / 12)
    return Codebook(cents, (np.arange(1, levels) * (2 * math.pi / levels)), mse, bits)


@lru_cache(maxsize=None)
def sphere_coordinate_codebook(dim: int, bits: int) -> Codebook:
    """Lloyd-Max codebook for one coordinate of a uniform point on the sphere of radius sqrt(dim)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits per coordinate must be in [1, {MAX_BITS}], got {bits}")
    lim = math.sqrt(dim) if dim > 3 else math.sqrt(dim) * (1 - 1e-9)
    lim = min(lim, 12.0)  # beyond 12 sigma the mass is < 1e-30
    n = _grid_size(1 << bits)
    grid = np.linspace(-lim, lim, n + 1)
    inner = np.clip(grid, -math.sqrt(dim) * (1 - 1e-12), math.sqrt(dim) * (1 - 1e-12))
    pdf = np.exp(sphere_coordinate_log_density(dim)(inner)) if dim > 2 else np.ones_like(grid)
    cb = _lloyd_max(grid, pdf, 1 << bits)
    return Codebook(cb.centroids, cb.thresholds, cb.mse, bits)


@lru_cache(maxsize=None)
def angle_mse_high_rate(a: int, b: int, bits: int) -> float:
    """Panter-Dite high-rate MSE, (∫ f^(1/3))^3 / 12 · 4^-bits: what Lloyd-Max reaches at many
    levels. Used by the bit allocator above 8 bits, where building the codebook is costly."""
    n = 1 << 16
    grid = np.linspace(0.0, math.pi / 2, n + 1)[1:-1]
    f = np.exp(np.broadcast_to(angle_log_density(a, b)(grid), grid.shape))
    integral = float(np.sum(np.cbrt(f)) * (math.pi / 2) / n)
    return integral**3 / 12 * 4.0 ** (-bits)
