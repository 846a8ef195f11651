"""Synthetic micrographs with ground truth, for the demo, tests and benchmarks.

A particle is a small 3D phantom made of isotropic Gaussian blobs. The projection of a Gaussian blob along z is a 2D
Gaussian, so projecting at any orientation is exact and cheap: each blob centre ``c`` lands at ``(A c)_xy`` where
``A`` is RELION's ZYZ Euler matrix of the pose (the convention RELION's projector uses: volume point ``r`` appears at
image position ``(A r)_xy``). Particles are placed sparsely or densely, the image is filtered by a CTF (particles
dark on a light background, as in real micrographs), and white Gaussian noise is added at a chosen SNR.

SNR = variance of the noise-free (CTF-filtered) image over the particles' footprints / noise variance. The paper
simulates at SNR 0.005 in ASPIRE's definition (per projection image, including its empty margin), which is about the
same as 0.005–0.01 here.

Ground truth: centres (x = column, y = row, original pixels, origin at array element [0, 0]), RELION Euler angles,
and the clean-projection mask (each particle's projection thresholded at ``mask_level`` of its own maximum).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def euler_matrix(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION ZYZ Euler angles (degrees) → rotation matrices ``(N, 3, 3)``."""
    from .reprojection import euler_to_matrix

    return np.asarray(euler_to_matrix(rot, tilt, psi), dtype=np.float64).reshape(-1, 3, 3)


def random_angles(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed orientations as RELION (rot, tilt, psi) in degrees, ``(n, 3)``."""
    rot = rng.uniform(-180.0, 180.0, n)
    tilt = np.degrees(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(-180.0, 180.0, n)
    return np.stack([rot, tilt, psi], axis=1)


@dataclass(frozen=True)
class Phantom:
    """A 3D particle as Gaussian blobs; positions and sigmas in units of the particle radius."""

    centres: np.ndarray  # (K, 3) x, y, z
    sigmas: np.ndarray  # (K,)
    weights: np.ndarray  # (K,)

    @classmethod
    def globular(cls, seed: int = 7, n_blobs: int = 14) -> "Phantom":
        """A compact, asymmetric particle (roughly spherical envelope of radius 1)."""
        rng = np.random.default_rng(seed)
        pts = rng.normal(size=(n_blobs, 3))
        pts /= np.linalg.norm(pts, axis=1, keepdims=True)
        pts *= rng.uniform(0.15, 0.62, size=(n_blobs, 1))
        sig = rng.uniform(0.22, 0.34, n_blobs)
        w = rng.uniform(0.6, 1.4, n_blobs)
        return cls(pts, sig, w)

    @classmethod
    def elongated(cls, aspect: float = 3.0, seed: int = 11) -> "Phantom":
        """A rod-like asymmetric particle: length 2 (one diameter) along x, width about ``2 / aspect``, with a knob
        at one end so that no rotation maps it onto itself."""
        rng = np.random.default_rng(seed)
        half_width = 1.0 / aspect
        n = 9
        xs = np.linspace(-0.8, 0.8, n)
        pts = np.stack([xs, rng.normal(0, 0.08 * half_width, n), rng.normal(0, 0.08 * half_width, n)], axis=1)
        sig = np.full(n, 0.55 * half_width)
        w = np.ones(n)
        knob = np.array([[0.65, 0.9 * half_width, 0.2 * half_width]])
        return cls(np.vstack([pts, knob]), np.append(sig, 0.6 * half_width), np.append(w, 1.2))

    def extent(self) -> float:
        """Radius (in particle radii) that holds the phantom's blobs out to 2.5 sigma."""
        return float(np.max(np.linalg.norm(self.centres, axis=1) + 2.5 * self.sigmas))


def phantom_volume(phantom: Phantom, diameter_A: float, pixel_size: float, box: int | None = None, *,
                   mask_level: float | None = None) -> np.ndarray:
    """The phantom voxelised as a ``(box, box, box)`` ``[z, y, x]`` density map at ``pixel_size`` Å/px (centre at
    voxel ``box // 2``, particle diameter ``diameter_A``), the volume whose projections the simulator draws.
    ``box`` defaults to one that holds the phantom; with ``mask_level`` the map is thresholded at that fraction of
    its maximum into a 0/1 float32 mask (the simulator's footprints use 0.1 of each projection's maximum)."""
    radius_vox = 0.5 * float(diameter_A) / float(pixel_size)
    if box is None:
        box = 2 * int(np.ceil(phantom.extent() * radius_vox)) + 4
    c = (np.arange(box, dtype=np.float64) - box // 2) / radius_vox  # in particle radii
    vol = np.zeros((box, box, box), dtype=np.float64)
    for (cx, cy, cz), s, w in zip(phantom.centres, phantom.sigmas, phantom.weights):
        gx, gy, gz = (np.exp(-((c - m) ** 2) / (2 * s * s)) for m in (cx, cy, cz))
        vol += w * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    if mask_level is not None:
        return (vol > mask_level * vol.max()).astype(np.float32)
    return vol.astype(np.float32)


@dataclass
class SimulatedMicrograph:
    image: np.ndarray  # float32 (ny, nx), noisy, particles dark
    clean: np.ndarray  # float32 (ny, nx), noise-free CTF-filtered image
    centres: np.ndarray  # (N, 2) x = column, y = row, original pixels
    angles: np.ndarray  # (N, 3) RELION rot, tilt, psi in degrees
    mask: np.ndarray  # bool (ny, nx) union of clean-projection footprints
    instances: np.ndarray  # int32 (ny, nx): 0 background, i + 1 for particle i (last drawn wins in overlaps)
    pixel_size: float
    diameter_px: float
    defocus_A: float
    snr: float
    meta: dict = field(default_factory=dict)


def place_centres(shape: tuple[int, int], n: int, diameter_px: float, rng: np.random.Generator, *,
                  min_separation: float = 1.05, margin: float = 0.5, candidates_per_particle: int = 30) -> np.ndarray:
    """Up to ``n`` centres, at least ``min_separation`` diameters apart and ``margin`` diameters from the border.

    Random sequential adsorption over a batch of uniform candidates, checked on a cell grid; fewer than ``n`` are
    returned when the field fills up (dense placement asking for more than fit).
    """
    ny, nx = shape
    d = float(diameter_px)
    sep = min_separation * d
    lo = margin * d
    if nx - 2 * lo <= 0 or ny - 2 * lo <= 0 or n <= 0:
        return np.zeros((0, 2))
    cand = rng.uniform([lo, lo], [nx - lo, ny - lo], size=(candidates_per_particle * n + 16, 2))
    cell = sep / np.sqrt(2)  # at most one accepted point per cell
    gx, gy = int(np.ceil(nx / cell)) + 1, int(np.ceil(ny / cell)) + 1
    grid = np.full((gy + 4, gx + 4, 2), np.nan)  # padded by 2 cells on each side
    cells = (cand / cell).astype(np.int64) + 2
    sep2 = sep * sep
    accepted = []
    for (x, y), (cx, cy) in zip(cand, cells):
        near = grid[cy - 2: cy + 3, cx - 2: cx + 3].reshape(-1, 2)
        d2 = (near[:, 0] - x) ** 2 + (near[:, 1] - y) ** 2
        if np.any(d2 < sep2):  # NaN compares False
            continue
        grid[cy, cx] = (x, y)
        accepted.append((x, y))
        if len(accepted) >= n:
            break
    return np.array(accepted, dtype=np.float64).reshape(-1, 2)


def ctf_2d(shape: tuple[int, int], pixel_size: float, defocus_A: float, *, voltage_kV: float = 300.0,
           cs_mm: float = 2.7, amplitude_contrast: float = 0.1, bfactor: float = 0.0) -> np.ndarray:
    """The CTF on an ``rfft2`` grid (astigmatism-free), sign chosen so that protein density images dark."""
    ny, nx = shape
    volts = voltage_kV * 1e3
    lam = 12.2643247 / np.sqrt(volts * (1 + volts * 0.978466e-6))  # Å
    fy = np.fft.fftfreq(ny, d=pixel_size)[:, None]
    fx = np.fft.rfftfreq(nx, d=pixel_size)[None, :]
    k2 = fx ** 2 + fy ** 2
    cs = cs_mm * 1e7
    chi = np.pi * lam * defocus_A * k2 - 0.5 * np.pi * cs * lam ** 3 * k2 ** 2
    w = np.sqrt(1 - amplitude_contrast ** 2)
    ctf = -(w * np.sin(chi) + amplitude_contrast * np.cos(chi))
    if bfactor:
        ctf *= np.exp(-bfactor * k2 / 4.0)
    return ctf


def _render(shape, centres, angles, phantom: Phantom, radius_px: float, mask_level: float):
    """Projections of all particles (positive density), their footprint mask and instance map."""
    ny, nx = shape
    density = np.zeros(shape, dtype=np.float64)
    mask = np.zeros(shape, dtype=bool)
    instances = np.zeros(shape, dtype=np.int32)
    if len(centres) == 0:
        return density, mask, instances
    mats = euler_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    half = int(np.ceil(phantom.extent() * radius_px)) + 2
    offs = np.arange(-half, half + 1, dtype=np.float64)
    sig = phantom.sigmas * radius_px
    norm = phantom.weights * sig  # ∫ dz of a 3D Gaussian of amplitude w is ∝ w σ
    for i, ((x, y), A) in enumerate(zip(centres, mats)):
        pos = (phantom.centres @ A.T)[:, :2] * radius_px  # blob centres in the image plane, relative to the centre
        ix, iy = int(round(x)), int(round(y))
        xs = ix + offs
        ys = iy + offs
        dx = xs[None, :] - x - pos[:, 0:1]  # (K, W)
        dy = ys[None, :] - y - pos[:, 1:2]
        gx = np.exp(-dx ** 2 / (2 * sig[:, None] ** 2))
        gy = np.exp(-dy ** 2 / (2 * sig[:, None] ** 2))
        patch = np.einsum("k,ky,kx->yx", norm, gy, gx)
        y0, y1 = max(0, iy - half), min(ny, iy + half + 1)
        x0, x1 = max(0, ix - half), min(nx, ix + half + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        sub = patch[y0 - (iy - half): y1 - (iy - half), x0 - (ix - half): x1 - (ix - half)]
        density[y0:y1, x0:x1] += sub
        foot = sub > mask_level * patch.max()
        mask[y0:y1, x0:x1] |= foot
        instances[y0:y1, x0:x1][foot] = i + 1
    return density, mask, instances


def _contaminants(shape, rng: np.random.Generator, diameter_px: float, carbon_edge: bool, ice_blobs: int):
    """Extra density: a carbon film region with a sharp, slightly curved edge, and large dense ice blobs."""
    ny, nx = shape
    extra = np.zeros(shape, dtype=np.float64)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    excluded = np.zeros(shape, dtype=bool)
    if carbon_edge:
        theta = rng.uniform(0, 2 * np.pi)
        nxv, nyv = np.cos(theta), np.sin(theta)
        along = -(xx - nx / 2) * nyv + (yy - ny / 2) * nxv
        dist = (xx - nx / 2) * nxv + (yy - ny / 2) * nyv - 0.3 * min(nx, ny) + 1e-4 * along ** 2
        film = 1.0 / (1.0 + np.exp(-dist / 1.5))
        extra += 0.5 * film
        excluded |= dist > -0.5 * diameter_px
    for _ in range(ice_blobs):
        cx, cy = rng.uniform(0, nx), rng.uniform(0, ny)
        r = rng.uniform(1.5, 4.0) * diameter_px / 2
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        extra += np.minimum(1.0, 1.5 * np.exp(-d2 / (2 * r ** 2)))
        excluded |= d2 < (r + diameter_px / 2) ** 2
    return extra, excluded


def _junk(shape, rng: np.random.Generator, diameter_px: float, n_junk: int, phantom: "Phantom",
          mask_level: float):
    """Particle-sized objects a curator leaves unpicked: alternately an aggregate (3-6 particles overlapping,
    0.3-0.55 D apart) and a small ice crystal (an ellipse 0.4-1.2 D across with a sharp edge, a strong scatterer).

    Returns the aggregates' projected density (protein, imaged like the particles), the crystals' extra density
    (imaged like the ice blobs) and the region particles are kept out of (each object and half a diameter around).
    """
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    protein = np.zeros(shape, dtype=np.float64)
    extra = np.zeros(shape, dtype=np.float64)
    excluded = np.zeros(shape, dtype=bool)
    d = float(diameter_px)
    for j in range(n_junk):
        cx, cy = rng.uniform(0.5 * d, nx - 0.5 * d), rng.uniform(0.5 * d, ny - 0.5 * d)
        if j % 2 == 0:
            k = int(rng.integers(3, 7))
            steps = rng.uniform(0.3, 0.55, size=k - 1) * d
            turns = rng.uniform(0, 2 * np.pi, size=k - 1)
            pts = np.cumsum(np.c_[steps * np.cos(turns), steps * np.sin(turns)], axis=0)
            pts = np.vstack([[0.0, 0.0], pts])
            pts = pts - pts.mean(axis=0) + (cx, cy)
            dens, _, _ = _render(shape, pts, random_angles(k, rng), phantom, d / 2, mask_level)
            protein += dens
            reach = float(np.hypot(*(pts - (cx, cy)).T).max()) + d
        else:
            a = rng.uniform(0.2, 0.6) * d
            b = a * rng.uniform(0.5, 1.0)
            t = rng.uniform(0, np.pi)
            u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
            v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
            extra += 1.0 / (1.0 + np.exp((np.hypot(u, v) - 1.0) * 8.0))
            reach = a + 0.5 * d
        excluded |= (xx - cx) ** 2 + (yy - cy) ** 2 < reach ** 2
    return protein, extra, excluded


def simulate_micrograph(
    shape: tuple[int, int] = (1024, 1024),
    *,
    n_particles: int = 150,
    diameter_px: float = 24.0,
    pixel_size: float = 4.0,
    snr: float = 0.05,
    defocus_um: float = 1.5,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor: float = 50.0,
    placement: str = "sparse",
    min_separation: float | None = None,
    carbon_edge: bool = False,
    ice_blobs: int = 0,
    junk: int = 0,
    phantom: Phantom | None = None,
    mask_level: float = 0.1,
    seed: int | None = 0,
) -> SimulatedMicrograph:
    """One synthetic micrograph; see the module docstring for the model and conventions.

    ``placement``: ``sparse`` keeps particles at least 1.5 diameters apart, ``dense`` packs them at 1.02 diameters
    (override with ``min_separation``, in diameters). Particles avoid the carbon film and ice blobs. ``junk``
    adds that many objects a curator does not pick (aggregates and small ice crystals; not in ``centres``, drawn
    from their own random stream so that the rest of the micrograph is the same as without them).
    """
    rng = np.random.default_rng(seed)
    ny, nx = int(shape[0]), int(shape[1])
    phantom = phantom or Phantom.globular()
    if placement not in ("sparse", "dense"):
        raise ValueError(f"placement must be 'sparse' or 'dense', not {placement!r}")
    sep = min_separation if min_separation is not None else (1.5 if placement == "sparse" else 1.02)
    extra, excluded = _contaminants((ny, nx), rng, diameter_px, carbon_edge, ice_blobs)
    junk_density = None
    if junk:
        junk_density, junk_extra, junk_excluded = _junk((ny, nx), np.random.default_rng([seed or 0, 1]),
                                                        diameter_px, int(junk), phantom, mask_level)
        extra = extra + junk_extra
        excluded = excluded | junk_excluded
    want = n_particles
    centres = place_centres((ny, nx), int(want * 1.5) + 8 if excluded.any() else want, diameter_px, rng,
                            min_separation=sep)
    if excluded.any() and len(centres):
        keep = ~excluded[np.clip(centres[:, 1].astype(int), 0, ny - 1), np.clip(centres[:, 0].astype(int), 0, nx - 1)]
        centres = centres[keep][:want]
    angles = random_angles(len(centres), rng)
    radius = diameter_px / 2.0
    density, mask, instances = _render((ny, nx), centres, angles, phantom, radius, mask_level)
    if junk_density is not None:
        density = density + junk_density
    ctf = ctf_2d((ny, nx), pixel_size, defocus_um * 1e4, voltage_kV=voltage_kV, cs_mm=cs_mm,
                 amplitude_contrast=amplitude_contrast, bfactor=bfactor)
    clean = np.fft.irfft2(np.fft.rfft2(density) * ctf, s=(ny, nx))
    if extra.any():
        # Thick carbon and ice scatter strongly: they image dark well beyond what the weak-phase CTF model gives,
        # with CTF fringes at their edges.
        amp = float(np.abs(clean).max()) or 1.0
        scaled = extra * amp
        clean += np.fft.irfft2(np.fft.rfft2(scaled) * ctf, s=(ny, nx)) - 1.5 * scaled
    # Low-frequency ice-thickness variation, as real micrographs have.
    clean += _smooth_background((ny, nx), rng, scale=0.05 * (np.abs(clean).max() + 1e-9))
    region = mask if mask.any() else np.ones_like(mask)
    signal_var = float(clean[region].var()) if region.sum() > 1 else float(clean.var())
    noise_sd = np.sqrt(signal_var / snr) if snr > 0 and signal_var > 0 else 0.0
    image = clean + rng.normal(0.0, noise_sd, size=(ny, nx)) if noise_sd > 0 else clean.copy()
    return SimulatedMicrograph(
        image=image.astype(np.float32),
        clean=clean.astype(np.float32),
        centres=centres,
        angles=angles,
        mask=mask,
        instances=instances,
        pixel_size=float(pixel_size),
        diameter_px=float(diameter_px),
        defocus_A=defocus_um * 1e4,
        snr=float(snr),
        meta={"placement": placement, "carbon_edge": carbon_edge, "ice_blobs": ice_blobs, "junk": junk, "seed": seed},
    )


def _smooth_background(shape, rng: np.random.Generator, scale: float) -> np.ndarray:
    ny, nx = shape
    coarse = rng.normal(size=(6, 6))
    from scipy.ndimage import zoom

    bg = zoom(coarse, (ny / 6.0, nx / 6.0), order=3)[:ny, :nx]
    return scale * bg / (np.abs(bg).max() + 1e-9)
