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


def run_step(
    fn: Callable[[], T],
    retries: int = 3,  # after the first attempt
    backoff_s: float = 15.0,  # then 30 s, 60 s
    factor: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run a step body; retry transient failures, turn permanent ones into `SystemExit("error: ...")`
    (one readable line in the pod log, not a traceback). Bugs (other exceptions) propagate as they are."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except ONE_LINE_ERRORS as e:
            transient = e.transient if isinstance(e, VembedError) else isinstance(e, ConnectionError | TimeoutError)
            if transient and attempt < retries:
                delay = backoff_s * factor**attempt
                print(f"transient failure, retrying in {delay:g}s ({attempt + 1}/{retries}): {error_line(e)}", file=sys.stderr)
                sleep(delay)
                continue
            raise SystemExit(f"error: {error_line(e)}") from None
    raise AssertionError("unreachable")
