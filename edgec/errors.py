"""Errors that edgec reports as one clean line (never a traceback) with a meaningful exit code."""

from __future__ import annotations


class EdgecError(Exception):
    """Bad input or an impossible request: printed as one line, exit code 2."""

    exit_code = 2


class ParityFailure(EdgecError):
    """A converted model is not faithful enough: exit code 1."""

    exit_code = 1


class MissingBackend(EdgecError):
    """An optional backend (mlx, onnxruntime, ...) is not installed: exit code 3."""

    exit_code = 3

    def __init__(self, module: str, extra: str):
        super().__init__(f"{module} is not installed; install it with: pip install 'edgec[{extra}]'")


def require(module: str, extra: str):
    """Import an optional backend module or raise a one-line install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the platform
        raise MissingBackend(module.split(".")[0], extra) from e
