"""Data files shipped inside installed PyPI packages, found without importing the packages' code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import AdapterError


class PackageDataError(AdapterError):
    """A data package that is not installed, or that lacks the file asked for."""


def package_file(package: str, relative: str, hint: str = "see the README's set-up") -> Path:
    """The file `relative` inside installed `package` (a dotted name imports its parent only)."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PackageDataError(f"package {package!r} is not installed ({hint})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise PackageDataError(f"{path} is missing from the installed {package!r}")
    return path
