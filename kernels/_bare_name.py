"""What `import kernels` means when it reaches this folder (see __init__.py): the installed
distribution of that name if there is one; else this folder stays an empty module under that
name, as transformers' availability probe expects (it imports the name and finds no version)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _other_entries(folder: str) -> list[str]:
    """sys.path without the entries that resolve to the directory holding this folder."""
    here = os.path.realpath(os.path.dirname(folder))
    return [p for p in sys.path if os.path.realpath(p or os.getcwd()) != here]


def defer_to_installed_distribution(init_file: str) -> None:
    folder = os.path.dirname(os.path.abspath(init_file))
    spec = importlib.machinery.PathFinder.find_spec("kernels", _other_entries(folder))
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    # the import statement returns whatever sys.modules holds once this module has run
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
