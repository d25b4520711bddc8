"""One deadline-aware wait: look until there is an answer, ride out transient failures, back off.

Every blocking wait of the package that is not a trigger (a trigger's loop is
:class:`~airflow_wmltrain.triggers.base.PollingTrigger`) goes through :func:`wait_until`: the command
line's ``--wait`` and ``logs --follow``, the service's waits for a task, the GPU allocator waiting for
free GPUs.  One look is a callable that returns the answer (anything but ``None``) or ``None`` for "not
yet"; it may raise one of the ``transient`` exceptions (an API server that timed out, a Docker host that
did not answer), which is retried with a growing delay instead of ending the wait.

Stdlib only: the command line imports it and must start fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from airflow_wmltrain.errors import WmlTrainError

T = TypeVar("T")


class WaitTimeoutError(WmlTrainError):
    """The deadline of a wait passed before the answer came (``S002``).

    :param what: what was awaited, e.g. ``training-abc to end``.
    :param waited: seconds waited.
    :param last: the last failure or state seen, for the message.
    """

    code = "S002"

    def __init__(self, what: str, waited: float, last: str = "") -> None:
        self.what = what
        self.waited = waited
        super().__init__(f"gave up waiting for {what} after {waited:.0f} s" + (f" ({last})" if last else ""))


@dataclass(frozen=True)
class Backoff:
    """The delays between looks: ``interval`` while all is well, growing on failures up to ``max_interval``.

    :param interval: seconds between two looks that went well.
    :param max_interval: the longest delay.
    :param factor: how the delay grows with each look in a row that failed.
    """

    interval: float = 2.0
    max_interval: float = 30.0
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        """Seconds before the next look after ``failures`` failed looks in a row."""
        if failures <= 0:
            return max(self.interval, 0.0)
        return float(min(self.max_interval, max(self.interval, 0.01) * self.factor ** (failures - 1)))


def wait_until(
    look: Callable[[], T | None],
    *,
    what: str,
    timeout: float | None = None,
    backoff: Backoff = Backoff(),
    transient: tuple[type[BaseException], ...] = (),
    max_failures: int | None = None,
    on_failure: Callable[[int, float, BaseException], None] | None = None,
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``look`` until it returns something other than ``None``; return that.

    :param look: one look; ``None`` means "not yet".
    :param what: what is awaited, for the time-out message (``training-abc to end``).
    :param timeout: seconds before :class:`WaitTimeoutError`; ``None`` waits for ever.
    :param backoff: the delays between looks.
    :param transient: exceptions of ``look`` that are retried (after a growing delay) instead of raised.
    :param max_failures: transient failures in a row after which the last one is raised (``None``: no
        limit but the deadline).
    :param on_failure: told of each transient failure (failures in a row, delay before the next look, the
        exception), e.g. to log it.
    :param sleep: how to wait (tests pass a fake).
    :param clock: a monotonic clock (tests pass a fake).
    :raises WaitTimeoutError: the deadline passed.
    """
    started = clock()
    deadline = None if timeout is None else started + timeout
    failures = 0
    last = ""
    while True:
        try:
            answer = look()
        except transient as exc:
            failures += 1
            last = f"last failure: {exc}"
            if max_failures is not None and failures >= max_failures:
                raise
            delay = backoff.delay(failures)
            if on_failure is not None:
                on_failure(failures, delay, exc)
        else:
            if answer is not None:
                return answer
            failures = 0
            delay = backoff.delay(0)
        now = clock()
        if deadline is not None:
            if now >= deadline:
                raise WaitTimeoutError(what, now - started, last)
            delay = min(delay, deadline - now)
        sleep(delay)
