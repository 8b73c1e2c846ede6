"""Public names of a package imported on first use (PEP 562): `import transferlab.models.weights`
or the command line's checks must not pay for Lightning, which some of the package's modules import."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """The package's module-level `__getattr__`: each name in `homes` from the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
