"""Morphology: threshold, erode, label regions, keep regions of particle-like area, take their centres.

The map is thresholded at ``threshold`` (the filtering strength); the mask is eroded by a disk of radius ``erosion``
particle radii to split touching particles (the candidate density); 4-connected regions are labelled with
scikit-image. A region is kept when its area lies between ``min_area`` and
``max_area`` times the area of a particle disk eroded the same way. Its centre is the centre of its bounding box
(``centre="box"``; the minimal enclosing box, as CASSPER's contour finder uses the enclosing circle) or its
probability-weighted centroid (``centre="centroid"``, the default: about 0.15 px closer on test maps).

Score of a pick: the mean probability over the region's pixels (so in [threshold, 1]).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label

from .base import CentreSet, Finder


def _erode(mask: np.ndarray, r: float) -> np.ndarray:
    """Binary erosion by the disk ``x² + y² <= r²`` (outside the map counts as foreground)."""
    n = int(math.floor(r))
    if n < 1:
        return mask
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    return ndi.binary_erosion(mask, structure=xx**2 + yy**2 <= r * r, border_value=1)


class MorphologyFinder(Finder):
    name = "morphology"
    defaults: ClassVar[dict[str, Any]] = {
        "erosion": 0.25,  # erosion radius, in particle radii (more erosion splits more regions: candidate density)
        "threshold": 0.5,  # probability threshold for the mask (filtering strength)
        "min_area": 0.1,  # least region area, fraction of an eroded particle disk
        "max_area": 4.0,  # largest region area, same unit (larger blobs are not particles)
        "centre": "centroid",  # centroid | box
    }
    grid: ClassVar[dict[str, list]] = {"erosion": [0.2, 0.4, 0.6], "threshold": [0.3, 0.5, 0.7]}

    def _find(self, prob: np.ndarray, diameter_px: float, params: dict[str, Any], cache: dict) -> CentreSet:
        e = float(params["erosion"])
        if not 0 <= e < 1:
            raise ValueError(f"morphology: erosion must be in [0, 1) particle radii, got {e}")
        if params["centre"] not in ("box", "centroid"):
            raise ValueError(f"morphology: centre must be 'box' or 'centroid', got {params['centre']!r}")
        radius = diameter_px / 2
        key = ("mask", params["threshold"])
        if key not in cache:
            cache[key] = prob >= params["threshold"]
        mask = cache[key]
        key = ("regions", params["threshold"], e)
        if key not in cache:
            cache[key] = self._regions(prob, _erode(mask, e * radius))
        area, xy_box, xy_cen, score = cache[key]
        particle_area = math.pi * (radius * (1 - e)) ** 2
        keep = (area >= params["min_area"] * particle_area) & (area <= params["max_area"] * particle_area)
        xy = xy_box if params["centre"] == "box" else xy_cen
        return CentreSet(xy[keep], score[keep])

    @staticmethod
    def _regions(prob: np.ndarray, mask: np.ndarray):
        """Per region: area, bounding-box centre, weighted centroid, mean probability."""
        labels = label(mask, connectivity=1)
        n = int(labels.max())
        if n == 0:
            z = np.zeros(0)
            return z, np.zeros((0, 2)), np.zeros((0, 2)), z
        rows, cols = np.nonzero(labels)
        lab = labels[rows, cols]
        w = prob[rows, cols].astype(np.float64)
        area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
        wsum = np.bincount(lab, weights=w, minlength=n + 1)[1:]
        safe = np.maximum(wsum, 1e-12)
        cx = np.bincount(lab, weights=w * cols, minlength=n + 1)[1:] / safe
        cy = np.bincount(lab, weights=w * rows, minlength=n + 1)[1:] / safe
        boxes = ndi.find_objects(labels)
        bx = np.array([(s[1].start + s[1].stop - 1) / 2 for s in boxes])
        by = np.array([(s[0].start + s[0].stop - 1) / 2 for s in boxes])
        return area, np.stack([bx, by], 1), np.stack([cx, cy], 1), wsum / area

