"""One loop for every job backend: wait for Running, stream node-0 logs, wait for the end.

On Failed it raises with the job's own failure reason; past the timeout it raises too. Either way,
and on success, the job is deleted unless `keep_job` is set.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from vembed.errors import VembedError

LogFn = Callable[[str], None]
print_line: LogFn = functools.partial(print, flush=True)
T = TypeVar("T")


class TrainingJobError(VembedError):
    """A training launch or job failed, timed out, or could not be created."""


class Phase(enum.StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class JobState:
    phase: Phase
    reason: str = ""


class JobRun:
    """A submitted job of one backend (TrainJobRun, PyTorchJobRun), as the wait loop sees it."""

    kind = "job"

    def __init__(self, client: Any, name: str, namespace: str) -> None:
        self.client, self.name, self.namespace = client, name, namespace
        self.description = f"{self.kind} {namespace}/{name}"  # e.g. "TrainJob team-a/vembed-1a2b3c4d"

    def state(self) -> JobState:
        raise NotImplementedError

    def stream_logs(self) -> Iterator[str]:
        """Follow the logs of node 0 (the master) until its container ends."""
        raise NotImplementedError

    def delete(self) -> None:
        raise NotImplementedError


def _pump_logs(job: JobRun, log: LogFn) -> None:
    """Copy the job's node-0 log into ours (in a daemon thread: a hung stream never blocks the step)."""
    try:
        for line in job.stream_logs():
            log(line.rstrip("\n"))
    except Exception as e:  # noqa: BLE001 - losing the log stream must not fail the training
        log(f"[vembed] log stream of {job.description} ended early: {api_error_text(e)}")


def api_error_text(exc: BaseException) -> str:
    """One line for an SDK/Kubernetes error, however deeply the SDK wrapped the ApiException."""
    seen = exc
    while seen is not None:
        status = getattr(seen, "status", None)
        if isinstance(status, int):
            try:  # a Kubernetes Status object says what was wrong in its message
                message = json.loads(getattr(seen, "body", None) or "{}").get("message")
            except (TypeError, ValueError, AttributeError):
                message = None
            reason = getattr(seen, "reason", "") or ""
            return f"HTTP {status} {reason}".strip() + (f": {message}" if message else "")
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def sdk_call(what: str, call: Callable[[], T]) -> T:
    """`call()`; any failure (no credentials, HTTP 403, ...) becomes one line: `what: reason`."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - an SDK raises many types; the step needs one clear line
        raise TrainingJobError(f"{what}: {api_error_text(e)}") from None


def failure_reason(conditions: list[str], pods: Callable[[], list[Any]], container: str) -> str:
    """The Failed condition(s) plus which node container died how (when the pods can be read):
    'pod p container c: OOMKilled (exit code 137)' for the first terminated-with-error container."""
    try:
        died = (
            f"pod {pod.metadata.name} container {container}: {term.reason or 'Error'} (exit code {term.exit_code})"
            for pod in pods()
            for cs in getattr(getattr(pod, "status", None), "container_statuses", None) or []
            if cs.name == container and (term := getattr(getattr(cs, "state", None), "terminated", None)) and term.exit_code
        )
        conditions = [*conditions, next(died, "")]
    except Exception as e:  # noqa: BLE001 - report what was found; the job did fail either way
        conditions.append(f"(details unavailable: {api_error_text(e)})")
    return "; ".join(p for p in conditions if p)


class _Cancelled(BaseException):
    """Raised by the SIGTERM handler; a BaseException so that no `except Exception` in an SDK swallows it."""


@contextlib.contextmanager
def sigterm_raises(what: str) -> Iterator[None]:
    """Turn SIGTERM (a cancelled pipeline run stops its pod) into an exception, so `finally` clean-up
    runs (the job is deleted, a local launch is killed) instead of the process just vanishing."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def cancelled(signum: int, frame: Any) -> None:
        raise _Cancelled

    previous = signal.signal(signal.SIGTERM, cancelled)
    try:
        yield
    except _Cancelled:
        raise TrainingJobError(f"cancelled (SIGTERM) while {what}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_job(
    job: JobRun,
    *,
    timeout: float,
    keep_job: bool = False,
    poll_interval: float = 10.0,
    log: LogFn = print_line,
    log_grace: float = 30.0,
    max_poll_errors: int = 5,
) -> JobState:
    """Block until `job` succeeds (return its state) or fails / times out (raise TrainingJobError)."""
    deadline = time.monotonic() + timeout
    log(f"[vembed] waiting for {job.description} (timeout {timeout:g}s)")
    pump: threading.Thread | None = None
    state = JobState(Phase.PENDING)
    errors = 0
    try:
        with sigterm_raises(f"waiting for {job.description}"):
            while True:
                try:
                    state = job.state()
                    errors = 0
                except Exception as e:  # noqa: BLE001 - one failed poll of a day-long job is not a failure
                    errors += 1
                    if errors >= max_poll_errors:
                        raise TrainingJobError(
                            f"{job.description}: cannot read its status ({api_error_text(e)}); "
                            "check the RBAC in pipelines/rbac/"
                        ) from None
                    log(f"[vembed] status of {job.description} unavailable ({api_error_text(e)}); retrying")
                if state.phase is not Phase.PENDING and pump is None:
                    log(f"[vembed] {job.description} is {state.phase.value}; streaming the node-0 log")
                    pump = threading.Thread(target=_pump_logs, args=(job, log), name=f"logs {job.description}", daemon=True)
                    pump.start()
                if state.phase in (Phase.SUCCEEDED, Phase.FAILED):
                    if pump is not None:
                        pump.join(log_grace)  # let the tail of the log arrive before reporting
                    if state.phase is Phase.FAILED:
                        raise TrainingJobError(f"{job.description} failed: {state.reason or 'no reason reported'}")
                    log(f"[vembed] {job.description} succeeded")
                    return state
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TrainingJobError(
                        f"{job.description} did not finish within trainer.timeout={timeout:g}s "
                        f"(last seen {state.phase.value})"
                    )
                time.sleep(min(poll_interval, remaining))
    finally:
        if keep_job:
            log(f"[vembed] keeping {job.description} (trainer.keep_job); delete it when done")
        else:
            try:
                job.delete()
                log(f"[vembed] deleted {job.description}")
            except Exception as e:  # noqa: BLE001 - never hide the training outcome behind a cleanup error
                log(f"[vembed] could not delete {job.description}: {api_error_text(e)}")
