"""Errors that the CLI prints as one line, never as a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class VembedError(Exception):
    """Base class: a user-facing error whose message says what and where.

    `transient` is True for failures a retry may fix (network errors, HTTP 5xx, throttling);
    pipeline steps retry only those (vembed.retry). Everything else is permanent."""

    transient: bool = False


class ConfigError(VembedError):
    """A config key or value is invalid; the message names the key."""


class DataError(VembedError):
    """A data record or file is invalid; the message names `path:line`."""


class CheckpointError(VembedError):
    """A checkpoint is missing, partial or corrupt."""


class StorageError(VembedError):
    """An object-storage or local-path operation failed; the message names the URI."""


class RegistryError(VembedError):
    """A model-registry operation failed."""


# --- the one shell: every command and pipeline step turns these into one `error: ...` line -----------
ONE_LINE_ERRORS = (VembedError, OSError)  # OSError: the file system said no (read-only, full, missing)


def error_line(exc: BaseException) -> str:
    """What follows `error: `: `path: reason` for a file-system error, else the message."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    return str(exc).strip() or type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message; its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_command(fn: Callable[[], int | None]) -> int:
    """Run a CLI command: its exit code, or 2 after one `error: ...` line on stderr (no traceback);
    130 on Ctrl-C. Pipeline steps use `vembed.retry.run_step`, which ends the same way in the pod log."""
    try:
        return int(fn() or 0)
    except ONE_LINE_ERRORS as e:
        # A failure mid-training leaves tqdm's bar open: close it, so the error starts on its own line.
        for bar in list(getattr(getattr(sys.modules.get("tqdm.std"), "tqdm", None), "_instances", ())):
            bar.close()
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
