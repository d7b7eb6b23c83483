"""Errors that the CLI prints as one line, never as a traceback."""

from __future__ import annotations


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
