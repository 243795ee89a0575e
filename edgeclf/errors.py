"""The one error tree users can cause. The CLI maps EdgeclfError to one line and exit code 2.

Kept Python 3.8 compatible: the device side (edgeclf.runtime, edgeclf.devices) imports it.
"""
from __future__ import annotations

from typing import Set

__all__ = [
    "EdgeclfError",
    "ConfigError",
    "DataError",
    "ModelError",
    "BundleError",
    "IntegrityError",
    "SourceError",
    "BackendError",
    "MissingExtraError",
    "require",
]


class EdgeclfError(Exception):
    """An error the user can cause and fix. Its message is one line: what, what is allowed, the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(EdgeclfError):
    """A bad option or configuration value."""


class DataError(EdgeclfError):
    """A data spec, file or array that cannot be used."""


class ModelError(EdgeclfError):
    """An unknown model name or weights that cannot be loaded."""


class BundleError(EdgeclfError):
    """A bundle folder or manifest that does not follow the contract."""


class IntegrityError(BundleError):
    """A bundle whose files do not match its checksums."""


class SourceError(EdgeclfError):
    """A frame source that cannot be opened or read."""


class BackendError(EdgeclfError):
    """An inference backend that cannot be created or run."""


class ProviderUnavailableError(BackendError):
    """An onnxruntime execution provider this build lists but whose libraries did not load here (the session ran on
    another one): a device profile's choice moves on to its next backend."""


class MissingExtraError(EdgeclfError):
    """An optional dependency is not installed, or is installed but fails to import."""


def require(module: str, extra: str):  # type: ignore[no-untyped-def]
    """Import `module`, or raise one line naming the pip extra that provides it: "not installed" only when the module
    (or a package above it) is not there; anything else that failed its import (a C extension that did not initialise,
    a broken install) says so with its first line. Ctrl-C during the import stays a KeyboardInterrupt."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        interrupt = _interrupt_behind(exc)
        if interrupt is not None:  # a C extension's init turns Ctrl-C into ImportError("initialization failed")
            raise interrupt from None
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing and (module == missing or module.startswith(missing + ".")):
            raise MissingExtraError(
                f"{module} is not installed ({exc}); install it with: pip install 'edgeclf[{extra}]'"
            ) from None
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise MissingExtraError(
            f"{module} is installed but failed to import: {first}; reinstall it with: "
            f"pip install --force-reinstall 'edgeclf[{extra}]'"
        ) from exc


def _interrupt_behind(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt `exc` was raised from or while handling, if any."""
    seen: Set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None
