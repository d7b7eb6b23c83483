"""Pipeline steps retry transient failures only, and fail at once, in one line, on permanent ones.

KFP's task retry (`set_retry`) cannot tell a network blip from a missing data file: it reruns the
pod on any failure, with backoff (minutes for an error that cannot change). So the steps retry here,
inside the pod: a `VembedError` whose `transient` is set (network error, HTTP 5xx, throttling; see
vembed.artifacts.storage, vembed.artifacts.registry, vembed.endpoints) is retried with backoff; anything else (bad
config, bad data, missing inputs) ends the step with `error: <what and where>` and a non-zero exit.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

from vembed.errors import ONE_LINE_ERRORS, VembedError, error_line

T = TypeVar("T")

RETRIES = 3  # after the first attempt
BACKOFF_S = 15.0  # then 30 s, 60 s
BACKOFF_FACTOR = 2.0


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, VembedError):
        return exc.transient
    return isinstance(exc, (ConnectionError, TimeoutError))


def run_step(
    fn: Callable[[], T],
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    factor: float = BACKOFF_FACTOR,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run a step body; retry transient failures, turn permanent ones into `SystemExit("error: ...")`
    (one readable line in the pod log, not a traceback). Bugs (other exceptions) propagate as they are."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except ONE_LINE_ERRORS as e:
            if is_transient(e) and attempt < retries:
                delay = backoff_s * factor**attempt
                print(f"transient failure, retrying in {delay:g}s ({attempt + 1}/{retries}): {error_line(e)}", file=sys.stderr)
                sleep(delay)
                continue
            raise SystemExit(f"error: {error_line(e)}") from None
    raise AssertionError("unreachable")
