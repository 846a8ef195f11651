"""The registry of centre finders, built from the finder modules: name -> finder."""

from __future__ import annotations

from typing import Any

from .base import CentreSet, Finder
from .morphology import MorphologyFinder
from .nms import NMSFinder
from .trackpy_finder import TrackpyFinder

FINDERS: dict[str, Finder] = {f.name: f for f in (NMSFinder(), TrackpyFinder(), MorphologyFinder())}


def get_finder(name: str) -> Finder:
    """The finder called ``name``, or an error naming the choices."""
    if name not in FINDERS:
        raise ValueError(f"unknown centre finder {name!r} (choose from {', '.join(sorted(FINDERS))})")
    return FINDERS[name]


def find_centres(prob, diameter_px: float, finder: str, params: dict[str, Any] | None = None) -> CentreSet:
    """Run the finder called ``finder`` with ``params`` (missing ones take the finder's defaults)."""
    return get_finder(finder).find(prob, diameter_px, **(params or {}))
