"""``PollingTrigger``: the one polling loop of the package's triggers (and of the sensor's ``poke``).

As the amazon provider's ``AwsBaseWaiterTrigger`` does for its waiters, the loop lives here once:
look every ``poll_interval`` seconds (the look runs in a thread: every look is a blocking call to the
Docker Engine API or an object store), fire one event when the look has an answer, back off (doubling,
capped) on failures worth retrying and give up after :attr:`PollingTrigger.max_failures` of them in a
row, say every :attr:`PollingTrigger.still_every` seconds that the wait goes on.  A subclass gives only
its fields (:meth:`fields`), one look (:meth:`look`), and its messages (:attr:`waiting_for`,
:meth:`error_payload`).  The look is synchronous, so a sensor's ``poke`` calls the same one.

An answer that comes within :attr:`PollingTrigger.settle` seconds of the deferral is held until then.
Airflow 3.3 fails a deferred task whose trigger fires before the scheduler has processed the executor's
"success" of the try that deferred (the worker leaving on ``defer()``): the scheduler queues the resumed
task, then reads that stale event and reports a "state mismatch" (apache/airflow#66374, #67287, #72716;
3.3.2 guards only the ``scheduled`` state).  A training run whose container ends a few seconds after the
operator deferred met it on the services' Airflow: the task failed and the run stayed PROCESSING.  The
hold costs a run that short a few seconds and a longer run nothing; ``deferred_at`` travels in the
trigger's kwargs, so a trigger rebuilt after a triggerer restart does not hold again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class LookFailed(Exception):
    """A look failed.

    :param message: what failed (no secret).
    :param retry: whether the next look may succeed (the host or the store did not answer).
    """

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class PollingTrigger(BaseTrigger):
    """Look until there is an answer; one event.

    :param poll_interval: seconds between two looks.
    :param deferred_at: when the task deferred (seconds since the epoch); now when not given.
    """

    #: Failed looks in a row before the trigger gives up with an error event.
    max_failures = 10
    #: The longest wait between two looks after failures, in seconds.
    max_backoff = 300.0
    #: How often the trigger says that it is still waiting, in seconds.
    still_every = 600.0
    #: The shortest time between the deferral and the event, in seconds (see the module's docstring: the
    #: defer-exit of the try, then one scheduler loop; the longest seen on a loaded 2-core machine was 8 s).
    settle = 15.0

    def __init__(self, *, poll_interval: float, deferred_at: float | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.poll_interval = poll_interval
        self.deferred_at = time.time() if deferred_at is None else float(deferred_at)

    # --- what a subclass gives ------------------------------------------------------------------------

    @property
    def waiting_for(self) -> str:
        """What is awaited, for the log (``container 1a2b3c of training-abc on unix://...``)."""
        raise NotImplementedError

    def fields(self) -> dict[str, Any]:
        """The trigger's kwargs but ``poll_interval`` (plain JSON, no secret)."""
        raise NotImplementedError

    def look(self) -> dict[str, Any] | str:
        """One look (blocking): the event's payload when the wait is over, else what is seen now.

        :raises LookFailed: the look failed.
        """
        raise NotImplementedError

    def error_payload(self, message: str) -> dict[str, Any]:
        """The payload of the event that ends a wait that failed."""
        raise NotImplementedError

    def after_failure(self) -> None:
        """Called after each failed look (e.g. to drop a client with a dead connection pool)."""

    # --- the loop -------------------------------------------------------------------------------------

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {**self.fields(), "poll_interval": self.poll_interval, "deferred_at": self.deferred_at},
        )

    def backoff(self, failures: int) -> float:
        """Seconds before the next look after ``failures`` failed looks in a row."""
        return float(min(self.max_backoff, max(self.poll_interval, 0.01) * 2 ** (failures - 1)))

    def _event(self, payload: dict[str, Any]) -> TriggerEvent:
        return TriggerEvent(payload)  # type: ignore[no-untyped-call]

    def _error(self, message: str) -> TriggerEvent:
        self.log.error("%s", message)
        return self._event(self.error_payload(message))

    async def _settle(self) -> None:
        """Hold an answer that came too soon after the deferral (the module's docstring says why)."""
        hold = self.deferred_at + self.settle - time.time()
        if hold > 0:
            self.log.info(
                "%s: answer ready %.1fs after the deferral; firing it in %.1fs, once Airflow has seen the "
                "deferred try leave (apache/airflow#72716)",
                self.waiting_for,
                self.settle - hold,
                hold,
            )
            await asyncio.sleep(hold)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        self.log.info("Waiting for %s (a look every %ss)", self.waiting_for, self.poll_interval)
        started = last_report = time.monotonic()
        failures = 0
        while True:
            try:
                outcome = await asyncio.to_thread(self.look)
            except LookFailed as exc:
                if not exc.retry:
                    yield self._error(str(exc))
                    return
                failures += 1
                if failures >= self.max_failures:
                    yield self._error(f"{self.waiting_for}: no answer in {failures} tries: {exc}")
                    return
                delay = self.backoff(failures)
                self.log.warning(
                    "Could not look at %s (try %d of %d, again in %.1fs): %s",
                    self.waiting_for,
                    failures,
                    self.max_failures,
                    delay,
                    exc,
                )
                self.after_failure()
                await asyncio.sleep(delay)
                continue
            if isinstance(outcome, dict):
                await self._settle()
                yield self._event(outcome)
                return
            if failures:
                self.log.info("%s answers again", self.waiting_for)
            failures = 0
            now = time.monotonic()
            if now - last_report >= self.still_every:
                last_report = now
                self.log.info(
                    "Still waiting for %s: %s (%d min)", self.waiting_for, outcome, (now - started) // 60
                )
            await asyncio.sleep(self.poll_interval)
