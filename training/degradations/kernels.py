"""Blur kernels of the Real-ESRGAN degradation model, in closed form.

kornia has isotropic/anisotropic Gaussians but not the generalized-Gaussian, plateau or the
circular low-pass (sinc) kernels, and its Gaussians are parameterised differently (separable,
no rotation by an arbitrary angle with the BasicSR covariance), so all six kernel families are
written here from their formulas (BasicSR `basicsr/data/degradations.py`):

  covariance  S = R(theta) diag(sx^2, sy^2) R(theta)^T,  d(x) = x^T S^-1 x on the integer grid
  gaussian              exp(-d / 2)
  generalized gaussian  exp(-(d^beta) / 2)
  plateau               1 / (d^beta + 1)
  sinc (circular LP)    wc * J1(wc r) / (2 pi r), centre wc^2 / (4 pi)

Each kernel is normalised to sum 1. All are computed in float64 and returned as float32.
"""

from __future__ import annotations

import math

import torch

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def grid(kernel_size: int) -> torch.Tensor:
    """(k, k, 2) integer coordinates (x, y) centred on the middle pixel (BasicSR `mesh_grid`)."""
    ax = torch.arange(-(kernel_size // 2), kernel_size // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def covariance(sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    rotation = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                            dtype=torch.float64)
    diagonal = torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64))
    return rotation @ diagonal @ rotation.T


def _quadratic_form(kernel_size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    xy = grid(kernel_size)
    inverse = torch.linalg.inv(covariance(sigma_x, sigma_y, theta))
    return torch.einsum("hwi,ij,hwj->hw", xy, inverse, xy)


def _normalised(kernel: torch.Tensor) -> torch.Tensor:
    return (kernel / kernel.sum()).float()


def gaussian_kernel(kernel_size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    return _normalised(torch.exp(-0.5 * _quadratic_form(kernel_size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(kernel_size: int, sigma_x: float, sigma_y: float, theta: float,
                                beta: float) -> torch.Tensor:
    return _normalised(torch.exp(-0.5 * _quadratic_form(kernel_size, sigma_x, sigma_y, theta) ** beta))


def plateau_kernel(kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> torch.Tensor:
    return _normalised(1.0 / (_quadratic_form(kernel_size, sigma_x, sigma_y, theta) ** beta + 1.0))


def bessel_j1(x: torch.Tensor) -> torch.Tensor:
    """J1 in float64 (torch.special.bessel_j1 where present, else its series; both tested)."""
    if hasattr(torch.special, "bessel_j1"):
        return torch.special.bessel_j1(x)
    total = torch.zeros_like(x)
    for m in range(40):
        total = total + (-1) ** m / (math.factorial(m) * math.factorial(m + 1)) * (x / 2) ** (2 * m + 1)
    return total


def sinc_kernel(kernel_size: int, cutoff: float, pad_to: int = 0) -> torch.Tensor:
    """Circular low-pass kernel with cut-off `cutoff` (radians), optionally zero-padded to `pad_to`."""
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {kernel_size}")
    r = grid(kernel_size).norm(dim=-1)
    centre = kernel_size // 2
    safe = torch.where(r == 0, torch.ones_like(r), r)
    kernel = cutoff * bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    kernel[centre, centre] = cutoff**2 / (4 * math.pi)
    kernel = _normalised(kernel)
    return pad_kernel(kernel, pad_to) if pad_to > kernel_size else kernel


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    pad = (size - kernel.shape[-1]) // 2
    return torch.nn.functional.pad(kernel, (pad, pad, pad, pad))


def pulse(size: int) -> torch.Tensor:
    """The identity kernel (Real-ESRGAN's `pulse_tensor`) for 'no final sinc'."""
    kernel = torch.zeros(size, size)
    kernel[size // 2, size // 2] = 1.0
    return kernel


def make_kernel(kind: str, kernel_size: int, sigma_x: float, sigma_y: float, theta: float,
                beta: float = 1.0) -> torch.Tensor:
    """One kernel of a named family; iso families ignore sigma_y and theta (BasicSR semantics)."""
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}; known: {', '.join(KERNEL_TYPES)}")
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(kernel_size, sigma_x, sigma_y, theta, beta)
    if kind.startswith("plateau"):
        return plateau_kernel(kernel_size, sigma_x, sigma_y, theta, beta)
    return gaussian_kernel(kernel_size, sigma_x, sigma_y, theta)
