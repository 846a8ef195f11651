"""Centre finding: probability maps (working scale) → particle centres with scores, and the choice of finder.

Finders (the registry :data:`FINDERS` in :mod:`.finders`): ``nms`` (:mod:`.nms`), ``trackpy`` (:mod:`.trackpy_finder`),
``morphology`` (:mod:`.morphology`). :func:`pick_centres` runs one with the edge rule, de-duplication and a score
threshold; :func:`select_finder` chooses finder, settings and threshold on validation maps by average precision.
"""

from .base import CentreSet, Finder
from .finders import FINDERS, find_centres, get_finder
from .postprocess import apply_edge, deduplicate, finish_picks, pick_centres
from .select import Candidate, Selection, select_finder

__all__ = [
    "FINDERS",
    "Candidate",
    "CentreSet",
    "Finder",
    "Selection",
    "apply_edge",
    "deduplicate",
    "find_centres",
    "finish_picks",
    "get_finder",
    "pick_centres",
    "select_finder",
]
