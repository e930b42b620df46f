"""Files that ship inside the ``specframe`` package (found with :mod:`importlib.resources`, so a source
tree, an editable install, ``pip install .`` and a wheel all find the same files)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import SpecframeError


def package_path(*parts: str) -> Path:
    """The file-system path of ``specframe/<parts...>`` as installed (it may not exist)."""
    root = resources.files("specframe").joinpath(*parts)
    if not isinstance(root, Path):  # e.g. imported from a zip archive: the drafters' weights need real files
        raise SpecframeError(f"specframe is imported from {root}, not a directory; install it unzipped (pip install)")
    return root


def shipped_drafters_dir() -> Path:
    """Where the block drafters shipped with specframe live (one folder per drafter)."""
    return package_path("drafters")
