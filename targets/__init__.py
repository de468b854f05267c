"""Hardware targets, keyed by target triple.  Importing the package registers every target
file in it, so a new target is one new file here and nothing else."""

import importlib
import pkgutil

from lastbit.targets.registry import Target, get_target, list_targets, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Target", "get_target", "list_targets", "register"]
