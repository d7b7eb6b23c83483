"""Bounded waits on servers: one quick reachability check before a client that would retry for minutes.

MLflow's client retries a dead server with exponential backoff (minutes), and boto3 waits up to
60 s per connection attempt. A check here fails within about `timeout` seconds, with one line that
names the endpoint (credentials redacted), and marks the error transient so that pipeline steps
retry it (vembed.retry).
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from vembed.errors import VembedError
from vembed.redaction import redact

DEFAULT_TIMEOUT_S = 5.0
# Endpoints that answered once in this process (set.add is atomic: threads need no lock).
_reachable: set[str] = set()


def check_tcp(url: str, what: str, error: type[VembedError], timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise `error` unless a TCP connection to the URL's host and port opens within `timeout`."""
    if url in _reachable:
        return
    try:
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"no host in {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (getattr(e, "strerror", None) or str(e))
        raise unreachable(error, what, url, reason, timeout) from None
    _reachable.add(url)


def check_http(
    url: str, path: str, what: str, error: type[VembedError], timeout: float = DEFAULT_TIMEOUT_S,
    verify: bool | str = True, cert: str | None = None,
) -> None:  # fmt: skip
    """Raise `error` unless `GET url/path` answers within `timeout` with anything but a 5xx
    (a proxy in front of a dead server answers 502/503; MLflow would retry those for minutes).
    `verify` and `cert`: the TLS settings of the client that will use the server, as `requests` takes them."""
    if url in _reachable:
        return
    import requests

    try:
        got = requests.get(url.rstrip("/") + path, timeout=(timeout, timeout), allow_redirects=False, verify=verify, cert=cert)
        status = got.status_code
    except requests.RequestException as e:
        reason = "timed out" if isinstance(e, requests.Timeout) else type(e).__name__
        raise unreachable(error, what, url, reason, timeout) from None
    if status >= 500:
        raise unreachable(error, what, url, f"HTTP {status}", timeout)
    _reachable.add(url)


def unreachable(error: type[VembedError], what: str, url: str, reason: str, timeout: float) -> VembedError:
    err = error(f"cannot reach {what} at {redact(url)} ({reason}; waited up to {timeout:g}s)")
    err.transient = True
    return err
