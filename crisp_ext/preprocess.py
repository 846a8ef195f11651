"""Preprocessing to the working scale: binning, normalisation, and the one place where coordinates convert
between original and working pixels.

Working scale: the micrograph is resampled so that the particle diameter becomes ``target_diameter_px`` (default
24). Two methods:

- ``fourier``: Fourier cropping (or padding, at most 2×) to ``(my, mx) = round((ny, nx) * f)``. Working sample
  ``j`` sits at original position ``j * n / m`` on each axis (the FFT grid keeps sample 0 at the origin), so
  ``x_w = x * mx / nx`` and ``y_w = y * my / ny``.
- ``mean``: area average over ``b × b`` blocks with the integer factor ``b = round(1 / f)`` (trailing rows and
  columns that do not fill a block are dropped). Working pixel ``j`` covers original pixels ``[j b, j b + b)``, whose
  centre is ``j b + (b - 1) / 2``, so ``x_w = (x - (b - 1) / 2) / b``.

:class:`Scale` holds the affine map per axis and converts both ways exactly (floating point).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import PreprocessConfig
from .errors import InputError

MAX_UPSAMPLING = 2.0


@dataclass(frozen=True)
class Scale:
    """Affine map original → working pixels per axis: ``x_w = x * factor_x + offset_x`` (same for y)."""

    factor_x: float
    factor_y: float
    offset_x: float
    offset_y: float
    original_shape: tuple[int, int]  # (ny, nx)
    working_shape: tuple[int, int]  # (my, mx)
    method: str = "fourier"

    @property
    def factor(self) -> float:
        """Mean working pixels per original pixel (< 1 when binning)."""
        return 0.5 * (self.factor_x + self.factor_y)

    def to_working(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return np.stack([xy[:, 0] * self.factor_x + self.offset_x, xy[:, 1] * self.factor_y + self.offset_y], 1)

    def to_original(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return np.stack([(xy[:, 0] - self.offset_x) / self.factor_x, (xy[:, 1] - self.offset_y) / self.factor_y], 1)

    def length_to_working(self, length_px: float) -> float:
        return float(length_px) * self.factor

    def length_to_original(self, length_px: float) -> float:
        return float(length_px) / self.factor

    def to_dict(self) -> dict:
        d = asdict(self)
        d["original_shape"] = list(self.original_shape)
        d["working_shape"] = list(self.working_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scale":
        d = dict(d)
        d["original_shape"] = tuple(d["original_shape"])
        d["working_shape"] = tuple(d["working_shape"])
        return cls(**d)


def working_factor(diameter_px: float, target_diameter_px: float) -> float:
    """Resampling factor (working px per original px) that brings the diameter to the target."""
    if not diameter_px or diameter_px <= 0:
        raise InputError(f"particle diameter must be positive (got {diameter_px} px)")
    return min(MAX_UPSAMPLING, float(target_diameter_px) / float(diameter_px))


def make_scale(shape: tuple[int, int], diameter_px: float, cfg: PreprocessConfig) -> Scale:
    """The working scale for a micrograph of ``shape`` (ny, nx) in original pixels."""
    ny, nx = int(shape[0]), int(shape[1])
    f = working_factor(diameter_px, cfg.target_diameter_px)
    if cfg.binning == "mean":
        b = max(1, int(round(1.0 / f)))
        my, mx = ny // b, nx // b
        off = -(b - 1) / (2.0 * b)
        return Scale(1.0 / b, 1.0 / b, off, off, (ny, nx), (my, mx), "mean")
    if cfg.binning != "fourier":
        raise InputError(f"unknown binning method {cfg.binning!r} (use fourier or mean)")
    my, mx = max(1, int(round(ny * f))), max(1, int(round(nx * f)))
    return Scale(mx / nx, my / ny, 0.0, 0.0, (ny, nx), (my, mx), "fourier")


def resample(image: np.ndarray, scale: Scale) -> np.ndarray:
    """Resample an original-scale image to ``scale.working_shape`` (float32)."""
    image = np.asarray(image, dtype=np.float32)
    if tuple(image.shape) != tuple(scale.original_shape):
        raise ValueError(f"image shape {image.shape} does not match the scale's {scale.original_shape}")
    my, mx = scale.working_shape
    if scale.method == "mean":
        b = int(round(1.0 / scale.factor_x))
        if b == 1:
            return image.copy()
        return image[: my * b, : mx * b].reshape(my, b, mx, b).mean(axis=(1, 3), dtype=np.float32)
    if (my, mx) == image.shape:
        return image.copy()
    return fourier_resample(image, (my, mx))


def fourier_resample(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Fourier crop (or zero-pad) a real image to ``shape``, keeping the mean value."""
    import scipy.fft as sfft

    ny, nx = image.shape
    my, mx = shape
    spec = sfft.rfft2(image, workers=-1)
    out = np.zeros((my, mx // 2 + 1), dtype=spec.dtype)
    ky = min(ny, my)
    kx = min(nx // 2 + 1, mx // 2 + 1)
    lo = (ky + 1) // 2  # non-negative frequencies 0 .. lo-1
    hi = ky // 2  # negative frequencies
    out[:lo, :kx] = spec[:lo, :kx]
    if hi:
        out[my - hi:, :kx] = spec[ny - hi:, :kx]
    result = sfft.irfft2(out, s=(my, mx), workers=-1)
    result *= (my * mx) / float(ny * nx)
    return result.astype(np.float32, copy=False)


def _subsample(image: np.ndarray, max_pixels: int = 1 << 18) -> np.ndarray:
    step = max(1, int(np.sqrt(image.size / max_pixels)))
    return image[::step, ::step].ravel()


def normalise(image: np.ndarray, method: str = "robust") -> np.ndarray:
    """Zero-centre and scale a micrograph.

    ``robust``: median and 1.4826 × MAD, then values clipped to ±8 (contamination and hot pixels cannot dominate).
    ``gmm``: a two-component Gaussian mixture on the pixel values (after a robust standardisation); the micrograph is
    standardised by the dominant component's mean and std, so that ice/carbon do not set the scale (in the spirit of
    Topaz's GMM normalisation). ``none``: unchanged.
    """
    image = np.asarray(image, dtype=np.float32)
    if method == "none":
        return image.copy()
    sample = _subsample(image).astype(np.float64)
    med = float(np.median(sample))
    mad = float(np.median(np.abs(sample - med))) * 1.4826
    if not np.isfinite(mad) or mad <= 0:
        mad = float(sample.std()) or 1.0
    if method == "robust":
        out = (image - med) / mad
        return np.clip(out, -8.0, 8.0, out=out).astype(np.float32, copy=False)
    if method == "gmm":
        z = np.clip((sample - med) / mad, -8, 8)
        mu, sd = _dominant_gaussian(z)
        out = ((image - med) / mad - mu) / sd
        return np.clip(out, -8.0, 8.0, out=out).astype(np.float32, copy=False)
    raise InputError(f"unknown normalisation {method!r} (use robust, gmm or none)")


def _dominant_gaussian(z: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """EM for a 2-component 1D Gaussian mixture on a 512-bin histogram of ``z``; returns the mean and std of the
    heavier component."""
    counts, edges = np.histogram(z, bins=512)
    c = 0.5 * (edges[:-1] + edges[1:])
    h = counts.astype(np.float64) / max(1, counts.sum())
    w = np.array([0.5, 0.5])
    mu = np.percentile(z, [35, 65]).astype(np.float64)
    var = np.array([z.var(), z.var()]) + 1e-6
    for _ in range(iterations):
        logp = -0.5 * (c[:, None] - mu) ** 2 / var - 0.5 * np.log(2 * np.pi * var) + np.log(w + 1e-12)
        logp -= logp.max(axis=1, keepdims=True)
        r = np.exp(logp)
        r /= r.sum(axis=1, keepdims=True)
        r *= h[:, None]
        nk = r.sum(axis=0) + 1e-12
        w = nk / nk.sum()
        mu_new = (r * c[:, None]).sum(axis=0) / nk
        var = (r * (c[:, None] - mu_new) ** 2).sum(axis=0) / nk + 1e-6
        converged = np.allclose(mu_new, mu, atol=1e-6)
        mu = mu_new
        if converged:
            break
    k = int(np.argmax(w))
    return float(mu[k]), float(np.sqrt(var[k]))


def highpass(image: np.ndarray, cutoff_px: float) -> np.ndarray:
    """Remove structure larger than ``cutoff_px`` (a Gaussian high-pass in Fourier space: the image minus its blur
    with a Gaussian of sigma ``cutoff_px / 2``), the image mirrored at its borders first so that one side's
    brightness does not wrap round onto the other."""
    import scipy.fft as sfft

    ny, nx = image.shape
    py, px = (min(int(np.ceil(2 * cutoff_px)), n - 1) for n in (ny, nx))
    my, mx = (sfft.next_fast_len(n + 2 * p, real=True) for n, p in ((ny, py), (nx, px)))
    # mirrored by twice the cutoff (four sigma) on each side, then on to a size the FFT is fast at
    padded = np.pad(image.astype(np.float32, copy=False), ((py, my - ny - py), (px, mx - nx - px)), mode="reflect")
    fy = sfft.fftfreq(my).astype(np.float32)[:, None]
    fx = sfft.rfftfreq(mx).astype(np.float32)[None, :]
    sigma_f = 1.0 / (2 * np.pi * (cutoff_px / 2.0))
    keep = -np.expm1(-(fx ** 2 + fy ** 2) / np.float32(2 * sigma_f ** 2))  # 1 - Gaussian
    spec = sfft.rfft2(padded, workers=-1)
    spec *= keep
    return sfft.irfft2(spec, s=(my, mx), workers=-1)[py:py + ny, px:px + nx].astype(np.float32)


@dataclass
class WorkingImage:
    """A micrograph at the working scale, normalised, with the scale to convert coordinates."""

    image: np.ndarray  # float32 (my, mx)
    scale: Scale
    pixel_size: float | None  # Å/px of the original micrograph


def to_working(image: np.ndarray, diameter_px: float, cfg: PreprocessConfig,
               pixel_size: float | None = None) -> WorkingImage:
    """Bin and normalise an original-scale micrograph."""
    scale = make_scale(image.shape, diameter_px, cfg)
    if min(scale.working_shape) < 2:
        raise InputError(f"micrograph of {image.shape[1]}×{image.shape[0]} px is too small for a particle "
                         f"diameter of {diameter_px:g} px")
    work = resample(image, scale)
    if cfg.highpass_A and pixel_size:
        work = highpass(work, cfg.highpass_A / (pixel_size / scale.factor))
    if cfg.flatten:
        work = highpass(work, scale.length_to_working(cfg.flatten * diameter_px))
    return WorkingImage(normalise(work, cfg.normalise), scale, pixel_size)


def load_working(path: str | Path, diameter_px: float, cfg: PreprocessConfig,
                 pixel_size: float | None = None) -> WorkingImage:
    """Read an MRC micrograph and bring it to the working scale."""
    from .io.mrc import read_micrograph

    image, ps = read_micrograph(path, pixel_size or cfg.pixel_size)
    check_particle_fits(path, diameter_px, image.shape)
    # e.g. a motion correction that failed and wrote zeros: nothing to pick, and no picks to learn from. The first
    # row clears almost every real micrograph at no cost, before a pass over all of it (5 ms at 4096²)
    if image.size and (image[0] == image.flat[0]).all() and image.min() == image.max():
        raise InputError(f"{path}: micrograph is blank (every pixel {float(image.flat[0]):g}); re-export it, or "
                         f"leave it out")
    return to_working(image, diameter_px, cfg, ps)


MIN_WORKING_DIAMETER = 4.0  # px: below this (after at most MAX_UPSAMPLING) no network can find a particle


def check_particle_fits(path: str | Path, diameter_px: float, shape: tuple[int, int]) -> None:
    """An :class:`InputError` naming ``path`` unless the particle is smaller than the micrograph ``(ny, nx)`` and
    at least :data:`MIN_WORKING_DIAMETER` px wide at the working scale (so: at least 2 original px)."""
    if not diameter_px > 0 or diameter_px * MAX_UPSAMPLING < MIN_WORKING_DIAMETER:
        raise InputError(f"{path}: particle diameter {diameter_px:.3g} px is too small to pick (under "
                         f"{MIN_WORKING_DIAMETER / MAX_UPSAMPLING:g} px); check the diameter and its unit (Å or px) "
                         f"and the pixel size")
    if diameter_px >= min(shape):
        raise InputError(f"{path}: particle diameter {diameter_px:g} px is not smaller than the micrograph "
                         f"({shape[1]}×{shape[0]} px); check the diameter and its unit (Å or px)")


def diameter_in_pixels(diameter_A: float | None, diameter_px: float | None, pixel_size: float | None,
                       where: str = "") -> float:
    """The particle diameter in original pixels from whichever of Å / px the user gave."""
    if diameter_px:
        return float(diameter_px)
    if diameter_A:
        if not pixel_size:
            raise InputError(f"{where + ': ' if where else ''}particle diameter given in Å but the pixel size is "
                             f"unknown (MRC header holds 0); give the pixel size or the diameter in pixels")
        return float(diameter_A) / float(pixel_size)
    raise InputError("no particle diameter given; set it in Å (diameter_A) or pixels (diameter_px)")
