"""Errors that edgec reports as one clean line (never a traceback) with a meaningful exit code."""

from __future__ import annotations


class EdgecError(Exception):
    """Bad input or an impossible request: printed as one line, exit code 2."""

    exit_code = 2


class ParityFailure(EdgecError):
    """A converted model is not faithful enough: exit code 1."""

    exit_code = 1


class MissingBackend(EdgecError):
    """An optional backend (mlx, onnxruntime, an execution provider) is not available here: exit code 3."""

    exit_code = 3


class Interrupted(EdgecError):
    """Ctrl-C or SIGTERM stopped the work (after cleaning up): exit code 130."""

    exit_code = 130


def require(module: str, extra: str):
    """Import an optional backend module or raise a one-line install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the platform
        raise MissingBackend(f"{module.split('.')[0]} is not installed; install it with: "
                             f"pip install 'edgec[{extra}]'") from e
