"""Pick scores and how they are shown to host tools.

Finder scores live in [0, 1] (higher is better). RELION's figure of merit is shown on a −5…10 slider and Extract
keeps picks with ``FOM > threshold``: crisp-ext writes ``FOM = logit(score) − logit(threshold)`` clipped to −5…10, so
that the threshold chosen on the validation micrographs sits at FOM 0 (Extract's "minimum FOM 0" keeps exactly
crisp-ext's picks; raising it keeps the more confident ones).
"""

from __future__ import annotations

import numpy as np

FOM_RANGE = (-5.0, 10.0)
_EPS = 1e-6


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def figure_of_merit(score, threshold: float) -> np.ndarray:
    """RELION ``rlnAutopickFigureOfMerit`` for finder scores in [0, 1] given the applied threshold."""
    fom = _logit(score) - _logit(threshold)
    return np.clip(fom, *FOM_RANGE)


def score_from_figure_of_merit(fom, threshold: float) -> np.ndarray:
    """Inverse of :func:`figure_of_merit` inside the unclipped range."""
    z = np.asarray(fom, dtype=np.float64) + _logit(threshold)
    return 1.0 / (1.0 + np.exp(-z))
