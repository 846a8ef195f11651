"""cryoSPARC poses and shifts in RELION's conventions (what the core's projector takes): the one place they are
converted."""

from __future__ import annotations

import numpy as np

from crisp_ext.reprojection import axis_angle_to_matrix, matrix_to_euler


def cryosparc_pose_to_matrix(pose) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` ``(N, 3)`` -> RELION matrices ``A`` ``(N, 3, 3)`` (the transpose of the
    pose's Rodrigues matrix)."""
    return np.swapaxes(axis_angle_to_matrix(pose), -1, -2)


def cryosparc_pose_to_euler(pose) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` ``(N, 3)`` (radians) -> RELION (rot, tilt, psi) in degrees ``(N, 3)``."""
    return matrix_to_euler(cryosparc_pose_to_matrix(pose))


def cryosparc_shift_to_origin_A(shift_px, psize_A) -> np.ndarray:
    """cryoSPARC ``alignments3D/shift`` ``(N, 2)`` in pixels of ``alignments3D/psize_A`` -> RELION
    ``rlnOriginX/YAngst`` ``(N, 2)`` (same sign)."""
    shift = np.asarray(shift_px, dtype=np.float64).reshape(-1, 2)
    return shift * np.asarray(psize_A, dtype=np.float64).reshape(-1, 1)
