"""One lazy-import helper for every package's __init__: public names are imported on first use, so `import aquakv`
(and the command line's --help) loads neither torch nor transformers.

    # in aquakv/kv/__init__.py
    from aquakv.lazy import lazy_exports
    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"AquaKVCache": ".aqua", "calibrate": ".calibration"})

A name maps to the module that defines it (".x" is relative to the package); a name that maps to None is a
submodule of the package (aquakv.grids). The first lookup stores the value in the package, so later ones are
ordinary attribute reads.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Mapping, Optional

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Mapping[str, Optional[str]]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """(__getattr__, __dir__, __all__) for the package `package` (pass __name__) exporting `names`."""
    names = dict(names)

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = names[name]
        if where is None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            value = getattr(importlib.import_module(where, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__, sorted(names)
