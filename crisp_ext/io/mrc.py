"""Reading and writing micrographs (MRC) with mrcfile.

Arrays are returned as ``(ny, nx)`` exactly as stored (first array element = first pixel of the file), the frame
in which RELION's ``rlnCoordinateX/Y`` and cryoSPARC's fractions are defined. Modes 0 (int8; uint8 when the IMOD
flags say so), 1 (int16), 2 (float32), 6 (uint16) and 12 (float16); a 2D image or a one-frame stack.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .atomic import atomic_path

_SUPPORTED_MODES = {0, 1, 2, 6, 12}
_IMOD_STAMP = 1146047817


@dataclass(frozen=True)
class MrcInfo:
    shape: tuple[int, int]  # (ny, nx)
    pixel_size: float | None  # Å/px from the header; None when the header holds 0
    mode: int


def _open(path: Path):
    import mrcfile

    if not path.exists():
        raise InputError(f"{path}: micrograph not found; check the path (relative paths are taken from the "
                         f"current directory)")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an MRC micrograph")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mrcfile.mmap(path, mode="r", permissive=False)
    except ValueError as exc:
        text = str(exc)
        if "greater than file size" in text or "too small" in text or "smaller than" in text:
            raise InputError(f"{path}: MRC file is truncated (data block shorter than its header says); "
                             f"re-copy or re-export the micrograph") from None
        raise InputError(f"{path}: not a valid MRC file ({text}); give a micrograph in MRC format") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read MRC file ({exc.strerror or exc})") from None


def _check(path: Path, mrc) -> tuple[int, int]:
    mode = int(mrc.header.mode)
    if mode not in _SUPPORTED_MODES:
        raise InputError(f"{path}: MRC mode {mode} is not supported (use mode 0, 1, 2, 6 or 12)")
    data = mrc.data
    if data is None:
        raise InputError(f"{path}: MRC file holds no data")
    if data.ndim == 3:
        if data.shape[0] != 1:
            raise InputError(f"{path}: is a stack of {data.shape[0]} images; crisp-ext needs single "
                             f"(motion-corrected) micrographs")
        return int(data.shape[1]), int(data.shape[2])
    if data.ndim != 2:
        raise InputError(f"{path}: expected a 2D micrograph, found {data.ndim} dimensions")
    return int(data.shape[0]), int(data.shape[1])


def _header_pixel_size(mrc) -> float | None:
    vs = float(mrc.voxel_size.x)
    return vs if vs > 0 and np.isfinite(vs) else None


def read_info(path: str | Path) -> MrcInfo:
    """Shape, header pixel size and mode, without reading the pixels."""
    path = Path(path)
    with _open(path) as mrc:
        shape = _check(path, mrc)
        return MrcInfo(shape=shape, pixel_size=_header_pixel_size(mrc), mode=int(mrc.header.mode))


def read_micrograph(path: str | Path, pixel_size: float | None = None) -> tuple[np.ndarray, float | None]:
    """Read a micrograph as float32 ``(ny, nx)``; returns ``(image, pixel_size)``.

    ``pixel_size`` overrides the header; otherwise the header's value is returned (None when the header has 0).
    """
    path = Path(path)
    with _open(path) as mrc:
        _check(path, mrc)
        data = mrc.data
        if data.ndim == 3:
            data = data[0]
        if int(mrc.header.mode) == 0 and _is_unsigned_bytes(mrc):
            image = data.view(np.uint8).astype(np.float32)
        else:
            image = np.asarray(data, dtype=np.float32)
        header_ps = _header_pixel_size(mrc)
    if not np.isfinite(image).all():
        raise InputError(f"{path}: micrograph contains NaN or infinite values; re-export it")
    return image, (pixel_size if pixel_size else header_ps)


def _is_unsigned_bytes(mrc) -> bool:
    hdr = mrc.header
    try:
        stamp = int(hdr.imodStamp)
        flags = int(hdr.imodFlags)
    except (ValueError, AttributeError):
        return False
    return stamp == _IMOD_STAMP and not (flags & 1)


def write_mrc(path: str | Path, data: np.ndarray, pixel_size: float | None = None) -> Path:
    """Write a 2D image or a 3D stack/volume as float32 (or float16 if given float16), atomically."""
    import mrcfile

    path = Path(path)
    arr = np.asarray(data)
    if arr.dtype not in (np.float16, np.float32, np.int16, np.uint16, np.int8):
        arr = arr.astype(np.float32)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(arr))
            if pixel_size:
                mrc.voxel_size = float(pixel_size)
            if arr.ndim == 3 and path.suffix == ".mrcs":
                mrc.set_image_stack()
    return path
