"""Footprints of a 3D mask at each particle's pose: rotate, project, threshold, paste.

Conventions (checked against Debian's RELION 3.1.3 ``relion_project``, see ``tests/test_reprojection.py``):

* Volumes are numpy/torch arrays indexed ``[z, y, x]`` as ``mrcfile`` returns them; the centre is voxel
  ``(D//2, H//2, W//2)``. Images are ``[y, x]`` (x = column) with the centre at ``(n//2, n//2)``.
* Angles are RELION's ZYZ Euler angles (rot, tilt, psi) in degrees. ``euler_to_matrix`` gives RELION's matrix
  ``A`` (``Euler_angles2matrix``): a feature at volume position ``r`` (x, y, z, relative to the centre) appears in
  the projection at ``(A @ r)[:2]``; equivalently ``A = Rz(rot) Ry(tilt) Rz(psi)`` (active, intrinsic) transposed.
* Origin offsets follow RELION: the image is the projection shifted by **minus** the origin, so the map centre
  lands at ``image centre - origin`` (``rlnOriginXAngst = 6`` at 2 Å/px moves a feature 3 px towards -x).
* cryoSPARC ``alignments3D/pose`` is an axis-angle (rotation) vector in radians whose standard (Rodrigues) matrix
  is ``A.T``; ``alignments3D/shift`` is in pixels of ``alignments3D/psize_A`` with the sign of RELION's origin
  (``rlnOriginXAngst = shift * psize_A``). These are the facts pyem's ``csparc2star`` relies on.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLD_METHODS = ("li", "otsu", "yen", "triangle", "mean", "fraction")


# ---------------------------------------------------------------------------------------------------------------
# Rotations
# ---------------------------------------------------------------------------------------------------------------
def euler_to_matrix(rot, tilt, psi):
    """RELION's rotation matrix ``A`` for ZYZ Euler angles in degrees; batched, shape ``(..., 3, 3)``.

    Takes scalars, numpy arrays or torch tensors (broadcast together) and returns the same kind (numpy float64 for
    scalars/arrays, torch in the input's dtype for tensors).
    """
    if any(isinstance(a, torch.Tensor) for a in (rot, tilt, psi)):
        ref = next(a for a in (rot, tilt, psi) if isinstance(a, torch.Tensor))
        dtype = ref.dtype if ref.is_floating_point() else torch.float64
        a, b, g = (torch.deg2rad(torch.as_tensor(v, dtype=dtype, device=ref.device)) for v in (rot, tilt, psi))
        a, b, g = torch.broadcast_tensors(a, b, g)
        lib = torch
    else:
        a, b, g = np.broadcast_arrays(*(np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi)))
        lib = np
    ca, sa, cb, sb, cg, sg = lib.cos(a), lib.sin(a), lib.cos(b), lib.sin(b), lib.cos(g), lib.sin(g)
    rows = [
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ]
    return lib.stack([lib.stack(r, -1) for r in rows], -2)


def angles_to_matrices(angles_deg) -> np.ndarray | torch.Tensor:
    """``(N, 3)`` (rot, tilt, psi) in degrees -> ``(N, 3, 3)`` RELION matrices."""
    if isinstance(angles_deg, torch.Tensor):
        ang = angles_deg.reshape(-1, 3)
    else:
        ang = np.asarray(angles_deg, dtype=np.float64).reshape(-1, 3)
    return euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])


def matrix_to_euler(matrices) -> np.ndarray:
    """RELION matrices ``(..., 3, 3)`` -> (rot, tilt, psi) in degrees, ``(..., 3)``, with tilt in [0, 180]."""
    m = np.asarray(matrices.detach().cpu() if isinstance(matrices, torch.Tensor) else matrices, dtype=np.float64)
    sin_tilt = np.hypot(m[..., 0, 2], m[..., 1, 2])
    regular = sin_tilt > 16 * np.finfo(np.float64).eps
    rot = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    tilt = np.arctan2(sin_tilt, m[..., 2, 2])
    psi_regular = np.arctan2(m[..., 1, 2], -m[..., 0, 2])
    # tilt = 0: A = Rz(rot + psi), only the sum is defined; tilt = 180: only psi - rot. Put it all in psi.
    psi_up = np.arctan2(m[..., 0, 1], m[..., 0, 0])
    psi_down = np.arctan2(m[..., 0, 1], -m[..., 0, 0])
    psi = np.where(regular, psi_regular, np.where(m[..., 2, 2] > 0, psi_up, psi_down))
    tilt = np.where(regular, tilt, np.where(m[..., 2, 2] > 0, 0.0, np.pi))
    return np.rad2deg(np.stack([rot, tilt, psi], -1))


def axis_angle_to_matrix(vectors) -> np.ndarray:
    """Rotation vectors (axis × angle in radians, ``(..., 3)``) -> standard active rotation matrices (Rodrigues)."""
    v = np.asarray(vectors, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1)[..., None, None]
    axis = v / np.where(theta[..., 0] > 0, theta[..., 0], 1.0)
    k = np.zeros(v.shape[:-1] + (3, 3))
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 2] = -axis[..., 2], axis[..., 1], -axis[..., 0]
    k[..., 1, 0], k[..., 2, 0], k[..., 2, 1] = axis[..., 2], -axis[..., 1], axis[..., 0]
    return np.eye(3) + np.sin(theta) * k + (1.0 - np.cos(theta)) * (k @ k)


# ---------------------------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------------------------
def _gaussian_blur3d(vol: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with zero padding, as one banded matrix product per axis (fast on CPU and GPU)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    norm = float(torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2).sum())
    out = vol
    for dim in range(3):
        i = torch.arange(vol.shape[dim], dtype=vol.dtype, device=vol.device)
        diff = i[:, None] - i[None, :]
        band = torch.exp(-0.5 * (diff / sigma) ** 2) * (diff.abs() <= radius) / norm
        out = torch.tensordot(out, band, dims=([dim], [0])).movedim(-1, dim)
    return out


def _support_radius(vol: torch.Tensor) -> float:
    """Distance from the centre voxel to the farthest voxel holding signal (>1e-6 of the peak), in voxels."""
    mag = vol.abs()
    peak = float(mag.max())
    if peak == 0.0:
        return 0.0
    d2 = None
    for axis, size in enumerate(vol.shape):
        c = (torch.arange(size, dtype=vol.dtype, device=vol.device) - size // 2) ** 2
        view = [1, 1, 1]
        view[axis] = size
        d2 = c.reshape(view) if d2 is None else d2 + c.reshape(view)
    return float(torch.where(mag > 1e-6 * peak, d2, torch.zeros((), dtype=vol.dtype, device=vol.device)).max()) ** 0.5


def _as_tensor(values, device) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)


class Projector:
    """A volume prepared for projection at one output pixel size; call it with poses to get projections.

    ``volume`` ``[z, y, x]`` (numpy or torch, centre at ``shape//2``) with ``map_pixel_size`` Å/px; projections
    come out with ``out_pixel_size`` Å/px (default: the map's). When the output is coarser, the volume is low-passed
    once here (Gaussian, sigma = (scale - 1) / 2 voxels, as ``skimage.transform.rescale`` does) so that the
    projections are not aliased. ``device``: where to work (default: the volume's; CPU for numpy).
    """

    def __init__(self, volume, map_pixel_size: float = 1.0, out_pixel_size: float | None = None, *,
                 antialias: bool = True, device=None):
        vol = volume if isinstance(volume, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(volume))
        if vol.ndim != 3 or min(vol.shape) < 2:
            raise ValueError(f"volume must be a 3D array of at least 2 voxels per side, got shape {tuple(vol.shape)}")
        if not map_pixel_size > 0 or (out_pixel_size is not None and not out_pixel_size > 0):
            raise ValueError(f"pixel sizes must be positive, got map {map_pixel_size}, output {out_pixel_size}")
        vol = vol.detach().to(device=device if device is not None else vol.device, dtype=torch.float32)
        if not bool(torch.isfinite(vol).all()):
            raise ValueError("volume holds NaN or infinite values; fix or re-export the map/mask")
        self.map_pixel_size = float(map_pixel_size)
        self.out_pixel_size = float(out_pixel_size) if out_pixel_size is not None else self.map_pixel_size
        self.scale = self.out_pixel_size / self.map_pixel_size  # map voxels per output pixel
        if antialias and self.scale > 1.0:
            vol = _gaussian_blur3d(vol, (self.scale - 1.0) / 2.0)
        self.volume = vol
        self.device = vol.device
        self.dz = max(1.0, self.scale / 2.0)  # depth step in voxels; the (blurred) volume is smooth on this scale
        self.radius = _support_radius(vol) + 1.0  # voxels; +1: trilinear reaches one voxel beyond the support
        half = int(math.ceil(self.radius / self.dz))
        self.z = torch.arange(-half, half + 1, dtype=torch.float32, device=self.device) * self.dz

    @property
    def default_size(self) -> int:
        """The output size that covers the map's box."""
        return max(1, int(math.ceil(max(self.volume.shape) / self.scale)))

    def __call__(self, angles_deg=None, shifts_px=None, out_size: int | None = None, *, matrices=None,
                 max_points: int = 1 << 22) -> torch.Tensor:
        """Projections ``(N, out_size, out_size)`` (float32, on ``self.device``); see :func:`project`."""
        if matrices is None:
            if angles_deg is None:
                raise ValueError("project: give angles_deg (N, 3) or matrices (N, 3, 3)")
            ang = _as_tensor(angles_deg, "cpu")
            if ang.ndim > 2 or ang.shape[-1] != 3:
                raise ValueError(f"angles_deg must have shape (N, 3), got {tuple(ang.shape)}")
            mats = angles_to_matrices(ang.reshape(-1, 3))
        else:
            mats = _as_tensor(matrices, "cpu")
            if mats.shape[-2:] != (3, 3):
                raise ValueError(f"matrices must have shape (N, 3, 3), got {tuple(mats.shape)}")
            mats = mats.reshape(-1, 3, 3)
        n = mats.shape[0]
        mats = mats.to(device=self.device, dtype=torch.float32)
        if shifts_px is None:
            shifts = torch.zeros(n, 2, device=self.device)
        else:
            shifts = _as_tensor(shifts_px, self.device).to(torch.float32)
            if shifts.numel() != 2 * n:
                raise ValueError(f"shifts_px must have shape ({n}, 2) to match the poses, got {tuple(shifts.shape)}")
            shifts = shifts.reshape(n, 2)
        out_size = self.default_size if out_size is None else int(out_size)
        if out_size < 1:
            raise ValueError(f"out_size must be at least 1, got {out_size}")
        out = torch.zeros(n, out_size, out_size, dtype=torch.float32, device=self.device)
        if n == 0:
            return out

        vol, z, scale = self.volume, self.z, self.scale
        u_all = torch.arange(out_size, dtype=torch.float32, device=self.device) - out_size // 2
        size_xyz = torch.tensor([vol.shape[2], vol.shape[1], vol.shape[0]], dtype=torch.float32, device=self.device)
        centre_xyz = torch.floor(size_xyz / 2)
        to_norm = 2.0 / (size_xyz - 1.0)  # grid_sample(align_corners=True): index 0 -> -1, size-1 -> +1
        vol5 = vol[None, None]
        chunk = max(1, max_points // (z.numel() * out_size * out_size))
        for start in range(0, n, chunk):
            a = mats[start:start + chunk]  # (c, 3, 3); a volume point r appears at the image point A r
            c = a.shape[0]
            # only the window that can hold signal: |image point + shift| <= support radius
            reach = int(math.ceil(self.radius / scale + float(shifts[start:start + c].abs().max()))) + 1
            lo, hi = max(0, out_size // 2 - reach), min(out_size, out_size // 2 + reach + 1)
            if lo >= hi:
                continue
            u = u_all[lo:hi]
            # image point (x, y) of the output, in map voxels; the image is the projection shifted by -shift
            x = (u[None, :] + shifts[start:start + c, 0:1]) * scale
            y = (u[None, :] + shifts[start:start + c, 1:2]) * scale
            # volume coordinates r = A^T (x, y, z) = x A[0] + y A[1] + z A[2], as (c, nz, rows, cols, xyz)
            plane = y[:, :, None, None] * a[:, None, None, 1, :] + x[:, None, :, None] * a[:, None, None, 0, :]
            plane = (plane + centre_xyz) * to_norm - 1.0  # normalised here, on the small factors
            depth = z[None, :, None] * a[:, None, 2, :] * to_norm
            grid = plane[:, None] + depth[:, :, None, None, :]
            m = hi - lo
            sampled = F.grid_sample(vol5, grid.reshape(1, c * z.numel(), m, m, 3), mode="bilinear",
                                    padding_mode="zeros", align_corners=True)
            out[start:start + c, lo:hi, lo:hi] = sampled.reshape(c, z.numel(), m, m).sum(1) * self.dz
        return out


def project(volume, angles_deg, shifts_px=None, out_size: int | None = None, *, map_pixel_size: float = 1.0,
            out_pixel_size: float | None = None, matrices=None, antialias: bool = True, device=None,
            max_points: int = 1 << 22) -> torch.Tensor:
    """Project ``volume`` at each pose: rotate (trilinear ``grid_sample``) and integrate along z.

    ``angles_deg`` ``(N, 3)`` RELION (rot, tilt, psi) in degrees (or pass ``matrices`` ``(N, 3, 3)`` and
    ``angles_deg=None``). ``shifts_px`` ``(N, 2)`` are RELION origin offsets (x, y) in pixels of the *output*
    (``rlnOriginXAngst / out_pixel_size``): the image is the projection shifted by ``-shift``; ``None`` = centred.
    The output has ``out_size``² pixels of ``out_pixel_size`` Å (defaults: the map's pixel size, and the size that
    covers the map's box); with zero shift the map centre lands on pixel ``(out_size//2, out_size//2)``. Values are
    line integrals in map voxels (independent of the output pixel size). Works in chunks of about ``max_points``
    samples. Returns float32 ``(N, out_size, out_size)`` on ``device`` (default: the volume's; CPU for numpy).
    To project the same volume many times, build a :class:`Projector` once and call it.
    """
    projector = Projector(volume, map_pixel_size, out_pixel_size, antialias=antialias, device=device)
    return projector(angles_deg, shifts_px, out_size, matrices=matrices, max_points=max_points)


# ---------------------------------------------------------------------------------------------------------------
# Footprints
# ---------------------------------------------------------------------------------------------------------------
def threshold_value(image: np.ndarray, method: str = "li", fraction: float = 0.1) -> float:
    """The level above which ``image`` is foreground: a scikit-image method, or for ``"fraction"``
    ``min + fraction * (max - min)``; ``inf`` for a flat image."""
    from skimage import filters

    method = method.lower()
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; use one of {', '.join(THRESHOLD_METHODS)}")
    img = np.asarray(image, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    if not hi > lo:
        return math.inf  # a flat image has no foreground
    if method == "fraction":
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"threshold fraction must be in (0, 1), got {fraction}")
        return lo + fraction * (hi - lo)
    func = {"li": filters.threshold_li, "otsu": filters.threshold_otsu, "yen": filters.threshold_yen,
            "triangle": filters.threshold_triangle, "mean": filters.threshold_mean}[method]
    return float(func(img))


def clean_footprint(mask: np.ndarray, keep_centre: bool = True, min_size: int = 4) -> np.ndarray:
    """Drop components smaller than ``min_size`` pixels; with ``keep_centre`` keep only the component under the
    centre pixel ``(h//2, w//2)`` (or, if the centre is background, the component nearest to it)."""
    from skimage.measure import label

    lab, count = label(mask, connectivity=2, return_num=True)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(lab.ravel(), minlength=count + 1)
    big = sizes >= min_size
    big[0] = False
    if not keep_centre:
        return big[lab]
    ch, cw = mask.shape[0] // 2, mask.shape[1] // 2
    keep = lab[ch, cw]
    if keep == 0 or not big[keep]:
        rows, cols = np.nonzero(big[lab])
        if rows.size == 0:
            return np.zeros(mask.shape, dtype=bool)
        nearest = np.argmin((rows - ch) ** 2 + (cols - cw) ** 2)
        keep = lab[rows[nearest], cols[nearest]]
    return lab == keep


def threshold(projections, method: str = "li", fraction: float = 0.1, keep_centre: bool = True,
              min_size: int = 4) -> np.ndarray:
    """Binary footprints ``(N, h, w)`` (bool) from projections ``(N, h, w)`` or one ``(h, w)``: each image gets its
    own threshold (``threshold_value``), then ``clean_footprint``."""
    arr = projections.detach().cpu().numpy() if isinstance(projections, torch.Tensor) else np.asarray(projections)
    single = arr.ndim == 2
    arr = arr[None] if single else arr
    if arr.ndim != 3:
        raise ValueError(f"projections must have shape (N, h, w) or (h, w), got {arr.shape}")
    out = np.zeros(arr.shape, dtype=bool)
    for i, img in enumerate(arr):
        out[i] = clean_footprint(img > threshold_value(img, method, fraction), keep_centre, min_size)
    return out[0] if single else out


def subpixel_shifts(centres_xy) -> np.ndarray:
    """Shifts ``(N, 2)`` for :func:`project` that move each footprint by the fraction of a pixel that
    :func:`paste_footprints` rounds away (``round(centre) - centre``), so that the pasted footprint is centred on the
    exact sub-pixel centre. Add them to the particles' own origin offsets (in output pixels) when using both."""
    c = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    return np.floor(c + 0.5) - c


def paste_footprints(shape: tuple[int, int], centres_xy, footprints, out: np.ndarray | None = None) -> np.ndarray:
    """A bool label map of ``shape`` (rows, cols) with each footprint's centre pixel ``(h//2, w//2)`` put on
    ``round(centre)`` (x = column, y = row; halves round up), union where footprints overlap, clipped at the
    borders. ``footprints`` is ``(N, h, w)``, a list of 2D arrays, or one 2D footprint used for every centre.
    Pass ``out`` to paste into an existing map (modified in place and returned)."""
    h_img, w_img = int(shape[0]), int(shape[1])
    canvas = np.zeros((h_img, w_img), dtype=bool) if out is None else out
    if canvas.shape != (h_img, w_img) or canvas.dtype != bool:
        raise ValueError(f"out must be a bool array of shape {(h_img, w_img)}, got {canvas.dtype} {canvas.shape}")
    centres = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    if isinstance(footprints, torch.Tensor):
        footprints = footprints.detach().cpu().numpy()
    if isinstance(footprints, np.ndarray) and footprints.ndim == 2:
        footprints = [footprints] * len(centres)
    if len(footprints) != len(centres):
        raise ValueError(f"{len(footprints)} footprints for {len(centres)} centres")
    for (x, y), fp in zip(centres, footprints):
        fp = np.asarray(fp, dtype=bool)
        if not (np.isfinite(x) and np.isfinite(y)):
            raise ValueError(f"particle centre ({x}, {y}) is not finite")
        h, w = fp.shape
        top = int(math.floor(y + 0.5)) - h // 2
        left = int(math.floor(x + 0.5)) - w // 2
        r0, r1 = max(top, 0), min(top + h, h_img)
        c0, c1 = max(left, 0), min(left + w, w_img)
        if r0 >= r1 or c0 >= c1:
            continue
        canvas[r0:r1, c0:c1] |= fp[r0 - top:r1 - top, c0 - left:c1 - left]
    return canvas


# ---------------------------------------------------------------------------------------------------------------
# Mask from a map
# ---------------------------------------------------------------------------------------------------------------
def mask_from_map(volume, level: float | None = None, *, lowpass_sigma_px: float = 1.0, dilate_px: float = 2.0,
                  min_component_fraction: float = 0.1) -> np.ndarray:
    """A binary mask (float32 0/1, same shape) from a refined map: Gaussian low-pass (``lowpass_sigma_px`` voxels,
    0 = off), threshold at ``level`` (``None`` = Otsu on the low-passed map), drop connected components smaller than
    ``min_component_fraction`` of the largest (noise; 1 keeps only the largest, 0 keeps all), fill internal
    cavities, and dilate by a ball of ``dilate_px`` voxels."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    vol = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"map must be a 3D array, got shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise ValueError("map holds NaN or infinite values; fix or re-export the map")
    smooth = ndimage.gaussian_filter(vol, lowpass_sigma_px) if lowpass_sigma_px > 0 else vol
    if smooth.max() <= smooth.min():
        raise ValueError("map is constant: nothing to threshold; give a map with density or a mask instead")
    level = float(threshold_otsu(smooth)) if level is None else float(level)
    mask = smooth > level
    if not mask.any():
        raise ValueError(f"map threshold {level:g} is above the map's maximum {float(smooth.max()):g}; lower it")
    lab, count = ndimage.label(mask)
    if count > 1 and min_component_fraction > 0:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = (sizes >= min_component_fraction * sizes.max())[lab]
    mask = ndimage.binary_fill_holes(mask)
    if dilate_px > 0:  # a Euclidean ball, via the distance transform (cheap for large radii)
        mask = ndimage.distance_transform_edt(~mask) <= dilate_px
    return mask.astype(np.float32)


__all__: Sequence[str] = (
    "THRESHOLD_METHODS", "euler_to_matrix", "angles_to_matrices", "matrix_to_euler", "axis_angle_to_matrix",
    "Projector", "project",
    "threshold_value", "clean_footprint", "threshold", "subpixel_shifts", "paste_footprints", "mask_from_map",
)
