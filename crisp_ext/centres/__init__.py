"""Centre finding: probability maps (working scale) → particle centres with scores, and the choice of finder.

Finders (registered in :data:`FINDERS`): ``nms`` (:mod:`.nms`), ``trackpy`` (:mod:`.trackpy_finder`),
``morphology`` (:mod:`.morphology`). :func:`pick_centres` runs one with the edge rule, de-duplication and a score
threshold; :func:`select_finder` chooses finder, settings and threshold on validation maps by average precision.
"""

from . import morphology, nms, trackpy_finder  # noqa: F401  (register the finders)
from .base import FINDERS, CentreSet, Finder, find_centres, get_finder
from .postprocess import apply_edge, dedup, deduplicate, pick_centres, postprocess
from .select import Candidate, Selection, select_finder

__all__ = [
    "FINDERS",
    "Candidate",
    "CentreSet",
    "Finder",
    "Selection",
    "apply_edge",
    "dedup",
    "deduplicate",
    "find_centres",
    "get_finder",
    "pick_centres",
    "postprocess",
    "select_finder",
]
