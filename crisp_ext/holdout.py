"""Validation on a held-out strip of the only curated micrograph.

With picks on one micrograph there is nothing to validate on but the micrograph trained on, and an epoch, finder and
threshold chosen on picks the network has learnt are chosen on what it knows by heart. Instead a strip at the far end
of the micrograph's longer side (:data:`SHARE` of it) is set aside: training sees the rest less a gap of half a
particle diameter (so that no held-out particle's label is learnt), and validation sees the strip alone.

Coordinates are working pixels (x = column, y = row). The strip is cut out as an image of its own: its picks are
shifted to its first row (or column), and those within ``band_px`` of the cut are not scored — the edge rule drops
picks there, as it does at the micrograph's edges, where the curated picks also keep their distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .labels import Labels
from .train import LabeledImage

SHARE = 0.25  # of the micrograph's longer side, held out for validation
MIN_PICKS = 10  # fewer curated picks than this in the strip: validate on the whole micrograph as before
MIN_DIAMETERS = 2.0  # the strip and the part trained on must each be at least this many diameters wide


@dataclass(frozen=True)
class HeldOutStrip:
    """One micrograph split for training and validation: ``val`` is ``[start, end)`` along ``axis`` (0: rows,
    the strip is the last rows; 1: columns), ``train`` is ``[0, start - gap)``."""

    axis: int
    start: int
    gap: int
    train: LabeledImage
    val: LabeledImage

    def describe(self) -> str:
        what = "rows" if self.axis == 0 else "columns"
        end = self.start + self.val.image.shape[self.axis]
        return (f"one curated micrograph: training on {what} 0-{self.start - self.gap} and validating on {what} "
                f"{self.start}-{end} (working px; {len(self.val.truth_xy)} of its picks scored there)")


def _crop(item: LabeledImage, axis: int, lo: int, hi: int, name: str) -> LabeledImage:
    sl = (slice(lo, hi), slice(None)) if axis == 0 else (slice(None), slice(lo, hi))
    labels = item.labels
    cropped = Labels(labels.target[sl].copy(), labels.weight[sl].copy(),
                     None if labels.centre is None else labels.centre[sl].copy())
    xy = np.asarray(item.truth_xy, dtype=np.float64).reshape(-1, 2)
    along = xy[:, 1 - axis]  # y for a cut across rows, x for a cut across columns
    keep = (along >= lo) & (along < hi)
    xy = xy[keep].copy()
    xy[:, 1 - axis] -= lo
    return LabeledImage(image=item.image[sl].copy(), labels=cropped, name=name, truth_xy=xy,
                        diameter_px=item.diameter_px)


def hold_out_strip(item: LabeledImage, diameter_px: float, band_px: float = 0.0,
                   share: float = SHARE) -> HeldOutStrip | None:
    """Split ``item`` (a labelled micrograph at the working scale) into a part to train on and a strip to validate
    on (module docstring); None when either would be narrower than :data:`MIN_DIAMETERS` diameters or the strip
    holds fewer than :data:`MIN_PICKS` scored picks."""
    ny, nx = item.image.shape
    axis = 0 if ny >= nx else 1
    n = (ny, nx)[axis]
    start = int(round(n * (1.0 - share)))
    gap = int(np.ceil(0.5 * diameter_px))
    if min(n - start, start - gap) < MIN_DIAMETERS * diameter_px:
        return None
    val = _crop(item, axis, start, n, f"{item.name} (held-out strip)")
    scored = val.truth_xy[:, 1 - axis] >= band_px
    if int(scored.sum()) < MIN_PICKS:
        return None
    val.truth_xy = val.truth_xy[scored]
    return HeldOutStrip(axis, start, gap, _crop(item, axis, 0, start - gap, item.name), val)
