"""Picks against reference picks, per micrograph and pooled: what ``crisp-ext evaluate`` and the demo report.

Coordinates are original pixels of each micrograph (see :mod:`crisp_ext.types`); one-to-one matching within
``radius`` diameters (and within half of it), AP ranked by the picks' scores (picks without a score rank last).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .metrics import match_centres, picking_metrics
from .progress import ProgressEvent
from .types import Micrograph, Particles


def evaluate_picks(micrographs: Sequence[Micrograph], picks: Particles, truth: Particles,
                   diameter: tuple[float | None, float | None], *, radius: float = 0.5,
                   pixel_size: float | None = None, pictures: Path | None = None, progress=None) -> dict:
    """``{"total", "half_radius", "micrographs", "diameter_px", "radius_fraction"}`` over the micrographs that have
    reference picks; ``diameter`` is ``(Å, px)`` as :func:`crisp_ext.config.parse_diameter` gives it. With
    ``pictures``, a PNG per micrograph there (:func:`picture_matches`), reported to ``progress``; each row then
    names its ``picture``."""
    from .io.mrc import read_info
    from .preprocess import diameter_in_pixels

    finite = picks.score[np.isfinite(picks.score)] if picks.score is not None else np.zeros(0)
    floor = float(finite.min()) - 1.0 if len(finite) else 0.0  # below every real score
    rows, preds, scores, truths, diam = [], [], [], [], []
    with_truth = [(m, t) for m in micrographs if len(t := truth.for_micrograph(m.id))]
    for i, (m, t) in enumerate(with_truth):
        p = picks.for_micrograph(m.id)
        ps = pixel_size or m.pixel_size or (read_info(m.path).pixel_size if diameter[0] else None)
        d = diameter_in_pixels(diameter[0], diameter[1], ps, where=str(m.path))
        s = np.where(np.isfinite(p.score), p.score, floor) if p.score is not None else np.ones(len(p))
        preds.append(p.xy)
        scores.append(s)
        truths.append(t.xy)
        diam.append(d)
        rows.append({"micrograph": m.name, **picking_metrics([p.xy], [s], [t.xy], radius * d).as_dict()})
        if pictures is not None:
            rows[-1]["picture"] = str(picture_matches(m, p.xy, t.xy, d, radius, ps, Path(pictures)))
            if progress is not None:
                progress(ProgressEvent("pictures", i + 1, len(with_truth), m.name))
    if not truths:
        raise InputError("no micrograph has both reference picks and a name among the micrographs")
    d = float(sorted(diam)[len(diam) // 2])
    total = picking_metrics(preds, scores, truths, radius * d)
    half = picking_metrics(preds, scores, truths, 0.5 * radius * d)
    return {"total": total.as_dict(), "half_radius": half.as_dict(), "micrographs": rows, "diameter_px": d,
            "radius_fraction": radius}


def picture_matches(mic: Micrograph, picks_xy: np.ndarray, truth_xy: np.ndarray, diameter_px: float, radius: float,
                    pixel_size: float | None, folder: Path) -> Path:
    """``folder/matches_<name>.png``: the micrograph binned as for picking (at most 2048 px wide) with the picks
    matched to a reference pick, those matched to none and the reference picks missed (one-to-one within
    ``radius`` diameters); whether the unmatched picks sit on particles the reference left out is for the eye to
    judge. Coordinates are original pixels."""
    from .config import PreprocessConfig
    from .io.mrc import read_info
    from .preprocess import load_working

    cfg = PreprocessConfig()
    cfg.target_diameter_px = min(cfg.target_diameter_px, 2048.0 * diameter_px / max(read_info(mic.path).shape))
    wi = load_working(mic.path, diameter_px, cfg, pixel_size)
    return matches_picture(wi.image, wi.scale.to_working(picks_xy), wi.scale.to_working(truth_xy),
                           wi.scale.length_to_working(diameter_px), radius, folder / f"matches_{mic.name}.png",
                           f"{mic.name}: {len(picks_xy)} picks, {len(truth_xy)} reference",
                           f" (match within {radius:g} D)")


def matches_picture(image: np.ndarray, picks_xy, truth_xy, diameter_px: float, radius: float, path: Path,
                    heading: str, tail: str = "") -> Path:
    """Match ``picks_xy`` to ``truth_xy`` one-to-one within ``radius`` diameters and draw the matches on ``image``
    (:func:`crisp_ext.plots.plot_matches`; coordinates and diameter in its pixels), titled ``heading`` with the
    precision and recall, then ``tail``."""
    from .plots import plot_matches

    pi, ti, _ = match_centres(picks_xy, truth_xy, radius * diameter_px)
    title = (f"{heading}; precision {len(pi) / max(len(picks_xy), 1):.2f}, "
             f"recall {len(pi) / max(len(truth_xy), 1):.2f}{tail}")
    return plot_matches(image, picks_xy, truth_xy, pi, ti, path, diameter_px=diameter_px, title=title)
