"""Lazy access to the framework backends, so that `import blenderbot_mb` imports no framework."""

from __future__ import annotations

import importlib
import importlib.util

from .errors import MissingBackendError

# backend name -> (framework module to probe, pip extra that installs it)
BACKENDS = {
    "torch": ("torch", "torch"),
    "tf": ("tensorflow", "tf"),
    "flax": ("flax", "flax"),
}


def require(backend: str) -> None:
    """Raise MissingBackendError naming the extra when `backend`'s framework is not installed."""
    module, extra = BACKENDS[backend]
    if not _installed(module):
        others = [name for name in BACKENDS if name != backend and available(name)]
        hint = f", or use a backend installed here ({', '.join(others)}: --backend on the command line)" if others \
            else ""
        raise MissingBackendError(
            f"The {backend!r} backend of blenderbot-mb needs {module!r}, which is not installed. "
            f"Install it with: pip install 'blenderbot-mb[{extra}]'{hint}"
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module set to None in sys.modules (blocked): not importable
        return False


def require_module(module: str, extra: str, purpose: str):
    """Import an optional dependency that is not a backend (h5py, msgpack, ...), or explain which extra."""
    if importlib.util.find_spec(module) is None:
        raise MissingBackendError(
            f"{purpose} needs the {module!r} package. Install it with: pip install 'blenderbot-mb[{extra}]'"
        )
    return importlib.import_module(module)


def available(backend: str) -> bool:
    return _installed(BACKENDS[backend][0])
