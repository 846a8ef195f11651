"""Where a cryoSPARC project path is on this machine: project-relative paths, server-to-local prefix remapping,
and symlinks (imported micrographs are links under ``J#/imported/`` whose targets are server paths)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from crisp_ext.errors import InputError


@dataclass(frozen=True)
class PathMap:
    """Prefix replacements ``SERVER=LOCAL`` for paths the server reports (longest matching prefix wins)."""

    pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, items: Iterable[str] | None) -> PathMap:
        pairs = []
        for item in items or ():
            if isinstance(item, (tuple, list)):
                server, local = item
            else:
                if "=" not in item:
                    raise InputError(f"path map {item!r}: expected SERVER_PREFIX=LOCAL_PREFIX, e.g. "
                                     f"/cryosparc/projects=/mnt/cryosparc/projects")
                server, local = item.split("=", 1)
            server, local = str(server).rstrip("/"), str(local).rstrip("/")
            if not server or not local:
                raise InputError(f"path map {item!r}: both prefixes must be non-empty")
            pairs.append((server, local))
        return cls(tuple(sorted(pairs, key=lambda p: -len(p[0]))))

    def apply(self, path: str) -> str:
        """``path`` with the longest matching server prefix (on a path-component boundary) replaced."""
        text = str(path)
        for server, local in self.pairs:
            if text == server or text.startswith(server + "/"):
                return local + text[len(server):]
        return text


NO_MAP = PathMap()


def locate(path: str, project_dir: Path | None, path_map: PathMap = NO_MAP) -> Path | None:
    """The local file for a project path (relative to the project directory, or absolute on the server).

    Follows a broken symlink's target through the path map too. Returns None when nothing readable is found.
    """
    p = PurePosixPath(str(path))
    if p.is_absolute():
        candidate = Path(path_map.apply(str(p)))
    elif project_dir is not None:
        candidate = Path(project_dir) / p
    else:
        return None
    if candidate.is_file():
        return candidate
    if candidate.is_symlink():
        target = os.readlink(candidate)
        target_path = Path(path_map.apply(target)) if os.path.isabs(target) else candidate.parent / target
        if target_path.is_file():
            return target_path
    return None
