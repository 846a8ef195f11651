"""Normalised Gaussian filters for the dense CRF (pure PyTorch, any device, batched).

Every filter here computes the CRF message of a probability map ``q``: the Gaussian-weighted mean of ``q`` over
the *other* pixels of the image, ``F(q)_i = sum_{j != i} k_ij q_j / sum_{j != i} k_ij``. The self term is excluded
(a pixel sends no message to itself, as in the dense CRF), and dividing by the filtered ones-image normalises at
the image border, so ``F(1) = 1`` everywhere; the binary Potts update in :mod:`crisp_ext.crf` relies on that.

* :func:`gaussian_fft`, :func:`gaussian_conv`: the smoothness kernel ``k_ij = exp(-|p_i - p_j|^2 / 2 theta^2)``.
  The FFT version (zero padding by 5 theta, fast FFT sizes) costs the same for any theta and is differentiable in
  theta; the separable convolution is kept as a cross-check and for comparison in ``benchmarks/bench_crf.py``.
* :class:`WindowKernel`: the appearance kernel ``k_ij = exp(-|p_i - p_j|^2 / 2 theta_a^2 - |f_i - f_j|^2 /
  2 theta_b^2)`` for a guide ``f`` with any number of channels, evaluated on a grid of ``stride``-pixel cells
  (cell means of ``q`` and ``f`` weighted by the cell's pixel count) within ``radius`` cells, then bilinearly
  upsampled. Exact autograd for ``q``, the guide and both bandwidths.
* :class:`BilateralGrid`: the same appearance kernel for a *scalar* guide by splatting into a 3-D (y, x, guide)
  grid, blurring it and slicing (Chen, Paris & Durand). Gradients for ``q`` and the guide, not the bandwidths.
* :func:`dense_reference`: the brute-force O(N^2) filter, for tests and accuracy measurements on small images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_TINY = 1e-12


def next_fast_len(n: int) -> int:
    """Smallest integer >= n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _as_tensor(value, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(value), device=like.device, dtype=like.dtype)


def _fft_axis(n: int, sigma: Tensor, radius: int) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
    """Padded length, transfer function (full and half spectrum), border normaliser and centre tap along one
    axis of length ``n``."""
    n_pad = next_fast_len(n + radius)
    f = torch.fft.fftfreq(n_pad, device=sigma.device, dtype=sigma.dtype)
    h_full = torch.exp(-2.0 * math.pi**2 * sigma**2 * f**2)
    h_half = h_full[: n_pad // 2 + 1]
    ones = torch.zeros(n_pad, device=sigma.device, dtype=sigma.dtype)
    ones[:n] = 1.0
    norm = torch.fft.irfft(torch.fft.rfft(ones) * h_half, n=n_pad)[:n]
    centre = h_full.mean()  # kernel value at offset 0 (inverse DFT at 0)
    return n_pad, h_full, h_half, norm, centre


def gaussian_fft(q: Tensor, sigma) -> Tensor:
    """Normalised Gaussian message of ``q`` [B, C, H, W] with std ``sigma`` pixels (float or 0-d tensor), self
    term excluded, by FFT. Differentiable in ``q`` and ``sigma``."""
    sigma = _as_tensor(sigma, q)
    H, W = q.shape[-2:]
    # zero padding of 5 sigma: the wrapped-around tail is below 4e-6 of the peak. The padded size changes in
    # steps with sigma, which makes the result jump by that much there (mind it in finite-difference checks).
    radius = math.ceil(5.0 * float(sigma.detach()))
    hp, hy, _, ny, cy = _fft_axis(H, sigma, radius)
    wp, _, hx_half, nx, cx = _fft_axis(W, sigma, radius)
    # rfft2 keeps every row frequency and half of the column frequencies
    spec = torch.fft.rfft2(F.pad(q, (0, wp - W, 0, hp - H)))
    smooth = torch.fft.irfft2(spec * (hy[:, None] * hx_half[None, :]), s=(hp, wp))[..., :H, :W]
    centre = cy * cx
    norm = ny[:, None] * nx[None, :]
    return (smooth - centre * q) / (norm - centre).clamp_min(_TINY)


def gaussian_conv(q: Tensor, sigma: float) -> Tensor:
    """Same message as :func:`gaussian_fft` with a separable convolution truncated at 4 sigma."""
    sigma = float(sigma)
    radius = max(1, math.ceil(4.0 * sigma))
    t = torch.arange(-radius, radius + 1, device=q.device, dtype=q.dtype)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    B, C, H, W = q.shape

    def blur(x: Tensor) -> Tensor:
        x = x.reshape(-1, 1, x.shape[-2], x.shape[-1])
        x = F.conv2d(x, g.view(1, 1, -1, 1), padding=(radius, 0))
        return F.conv2d(x, g.view(1, 1, 1, -1), padding=(0, radius))

    smooth = blur(q).view(B, C, H, W)
    norm = blur(torch.ones(1, 1, H, W, device=q.device, dtype=q.dtype)).view(1, 1, H, W)
    centre = g[radius] ** 2
    return (smooth - centre * q) / (norm - centre).clamp_min(_TINY)


def window_geometry(theta_alpha: float, stride: int | None = None, reach: float = 2.5) -> tuple[int, int]:
    """Default (stride, radius) of :class:`WindowKernel` for a positional std ``theta_alpha``: cells of about
    theta/2 pixels and a window reaching ``reach`` theta (the truncated tail is below exp(-reach^2/2))."""
    if stride is None:
        stride = max(1, int(round(theta_alpha / 2.0)))
    radius = max(1, math.ceil(reach * theta_alpha / stride))
    return stride, radius


class WindowKernel:
    """Appearance-kernel message on ``stride``-pixel cells within ``radius`` cells (see the module docstring).

    Built once per image from the guide [B, C, H, W]; :meth:`apply` then costs one ``unfold`` of the cell means of
    ``q`` per call. The centre cell contributes its other pixels (count - 1) at zero distance.
    """

    def __init__(self, guide: Tensor, theta_alpha, theta_beta, stride: int, radius: int):
        if stride < 1 or radius < 1:
            raise ValueError(f"window stride and radius must be >= 1, got {stride} and {radius}")
        self.shape = guide.shape[-2:]
        self.stride, self.radius = int(stride), int(radius)
        H, W = self.shape
        s, r = self.stride, self.radius
        self.pad = (0, (-W) % s, 0, (-H) % s)
        ones = F.pad(torch.ones(1, 1, H, W, device=guide.device, dtype=guide.dtype), self.pad)
        self.count = F.avg_pool2d(ones, s, divisor_override=1)  # [1, 1, h, w] pixels per cell
        gsum = F.avg_pool2d(F.pad(guide, self.pad), s, divisor_override=1)
        gmean = gsum / self.count.clamp_min(1.0)
        B, C, h, w = gmean.shape
        k = 2 * r + 1
        self.cells = (h, w)
        d2 = 0  # [B, K, L]; one channel at a time keeps memory at K x L
        for c in range(C):
            gc = gmean[:, c:c + 1]
            d2 = d2 + (F.unfold(gc, k, padding=r) - gc.reshape(B, 1, h * w)) ** 2
        offs = torch.arange(-r, r + 1, device=guide.device, dtype=guide.dtype) * s
        p2 = (offs[:, None] ** 2 + offs[None, :] ** 2).reshape(1, k * k, 1)
        ta = _as_tensor(theta_alpha, guide)
        tb = _as_tensor(theta_beta, guide)
        weight = torch.exp(-0.5 * (p2 / ta**2 + d2 / tb**2))
        mass = F.unfold(self.count, k, padding=r).view(1, k * k, h * w).clone()
        mass[:, k * k // 2] -= 1.0  # the pixel itself is not its own neighbour
        self.weight = weight * mass.clamp_min(0.0)  # [B, K, L]; zero outside the image (unfold pads with 0)
        self.norm = self.weight.sum(1, keepdim=True).clamp_min(_TINY)

    def apply(self, q: Tensor) -> Tensor:
        """Message of ``q`` [B, 1, H, W] (same B as the guide, or 1 broadcast)."""
        s, r = self.stride, self.radius
        h, w = self.cells
        k = 2 * r + 1
        qmean = F.avg_pool2d(F.pad(q, self.pad), s, divisor_override=1) / self.count.clamp_min(1.0)
        nb = F.unfold(qmean, k, padding=r).view(q.shape[0], k * k, h * w)
        msg = ((self.weight * nb).sum(1, keepdim=True) / self.norm).view(-1, 1, h, w)
        if s > 1:
            msg = F.interpolate(msg, scale_factor=s, mode="bilinear", align_corners=False)
        H, W = self.shape
        return msg[..., :H, :W]


class BilateralGrid:
    """Appearance-kernel message for a scalar guide [B, 1, H, W] on a bilateral grid (see the module docstring).

    The grid spacing is ``theta / rho`` in space and in guide units; the blur is a sampled Gaussian whose
    variance, added to that of the two linear interpolations (1/6 cell^2 each), gives ``rho^2`` cells^2, i.e. the
    requested theta. The exact self weight of the splat-blur-slice operator is removed per pixel. Differentiable
    in ``q`` and, through the linear interpolation weights along the guide axis, in the guide (the gradient of
    this piecewise-linear scheme); the bandwidths are constants.
    """

    def __init__(self, guide: Tensor, theta_alpha: float, theta_beta: float, rho: float = 1.0):
        if guide.shape[1] != 1:
            raise ValueError(f"the bilateral grid needs a scalar guide (1 channel), got {guide.shape[1]} channels")
        B, _, H, W = guide.shape
        dev, dt = guide.device, guide.dtype
        self.shape = (H, W)
        sb = math.sqrt(max(rho**2 - 1.0 / 3.0, 0.05))
        rb = max(1, math.ceil(3.0 * sb))
        taps = [math.exp(-0.5 * (t / sb) ** 2) for t in range(-rb, rb + 1)]
        self.taps = [t / sum(taps) for t in taps]  # Python floats: no device synchronisation when blurring
        self.rb = rb
        hs = float(theta_alpha) / rho
        hr = float(theta_beta) / rho
        gy = torch.arange(H, device=dev, dtype=dt) / hs + rb
        gx = torch.arange(W, device=dev, dtype=dt) / hs + rb
        g = guide[:, 0]
        gmin = g.amin(dim=(1, 2), keepdim=True)
        gz = (g - gmin) / hr + rb  # [B, H, W]
        self.dims = (int(gz.detach().max()) + rb + 2, int(gy[-1]) + rb + 2, int(gx[-1]) + rb + 2)  # (Z, Y, X)
        Z, Y, X = self.dims
        iy, ix, iz = gy.floor(), gx.floor(), gz.detach().floor()
        self.fy = (gy - iy).view(1, H, 1).expand(B, H, W).reshape(B, -1)
        self.fx = (gx - ix).view(1, 1, W).expand(B, H, W).reshape(B, -1)
        self.fz = (gz - iz).reshape(B, -1)
        base = (iz.long() * Y + iy.long().view(1, H, 1)) * X + ix.long().view(1, 1, W)
        self.base = (base + torch.arange(B, device=dev).view(B, 1, 1) * (Z * Y * X)).reshape(-1)
        self.corners = [((dz * Y + dy) * X + dx, dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
        self.size = B * Z * Y * X
        self.batch = B
        b0, b1 = self.taps[rb], self.taps[rb + 1]

        def self_axis(f: Tensor) -> Tensor:
            return b0 * ((1 - f) ** 2 + f**2) + 2 * b1 * f * (1 - f)

        self.self_weight = self_axis(self.fy) * self_axis(self.fx) * self_axis(self.fz)  # [B, N]
        self.weights = [self._corner_weight(dz, dy, dx) for _, dz, dy, dx in self.corners]
        ones = torch.ones(B, H * W, device=dev, dtype=dt)
        self.norm = (self._filter(ones) - self.self_weight).clamp_min(_TINY)

    def _corner_weight(self, dz: int, dy: int, dx: int) -> Tensor:
        wz = self.fz if dz else 1 - self.fz
        wy = self.fy if dy else 1 - self.fy
        wx = self.fx if dx else 1 - self.fx
        return wz * wy * wx

    def _filter(self, v: Tensor) -> Tensor:
        """Splat, blur and slice values v [B, N] (self weight included)."""
        grid = v.new_zeros(self.size)
        for (off, _, _, _), wgt in zip(self.corners, self.weights):
            grid.index_add_(0, self.base + off, (wgt * v).reshape(-1))
        grid = grid.view(self.batch, *self.dims)
        for axis in (1, 2, 3):
            grid = self._blur_axis(grid, axis)
        grid = grid.reshape(-1)
        out = torch.zeros_like(v)
        for (off, _, _, _), wgt in zip(self.corners, self.weights):
            out.addcmul_(wgt, grid[self.base + off].view(self.batch, -1))
        return out

    def _blur_axis(self, grid: Tensor, axis: int) -> Tensor:
        # a weighted sum of shifted copies (symmetric taps): much faster than conv3d for one channel on CPU
        rb, n = self.rb, grid.shape[axis]
        padded = F.pad(grid, [0, 0] * (3 - axis) + [rb, rb])
        out = padded.narrow(axis, rb, n) * self.taps[rb]
        for t in range(1, rb + 1):
            pair = padded.narrow(axis, rb - t, n) + padded.narrow(axis, rb + t, n)
            out.add_(pair, alpha=self.taps[rb + t])
        return out

    def apply(self, q: Tensor) -> Tensor:
        """Message of ``q`` [B, 1, H, W]."""
        B = self.batch
        v = q.reshape(B, -1)
        out = (self._filter(v) - self.self_weight * v) / self.norm
        return out.view(B, 1, *self.shape)


def dense_reference(q: Tensor, guide: Tensor | None, theta_alpha: float, theta_beta: float | None) -> Tensor:
    """Brute-force normalised Gaussian message (self excluded); ``guide=None`` gives the smoothness kernel.
    O(N^2) memory: small images only."""
    B, _, H, W = q.shape
    yy, xx = torch.meshgrid(torch.arange(H, dtype=q.dtype, device=q.device),
                            torch.arange(W, dtype=q.dtype, device=q.device), indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1) / theta_alpha
    d2 = torch.cdist(pos, pos) ** 2
    out = []
    for b in range(B):
        e = d2
        if guide is not None:
            f = guide[b].reshape(guide.shape[1], -1).T / theta_beta
            e = e + torch.cdist(f, f) ** 2
        k = torch.exp(-0.5 * e)
        k.fill_diagonal_(0.0)
        out.append((k @ q[b].reshape(-1)) / k.sum(1))
    return torch.stack(out).view(B, 1, H, W)
