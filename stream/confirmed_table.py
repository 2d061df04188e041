"""Table writes a batch can wait for: the changelog is an output like any other, so a batch is acked only once
the broker has its table writes.

Faust queues each write's changelog record (``table[key] = value``) in the producer's buffer, and a background
task sends it later. Nothing waits for it before the batch is acked; the flush Faust runs before it commits
offsets gives up after 0.1 s without a send (``ProducerBuffer.flush_atmost``); and a worker stopping while writes
were still queued stopped its producer first, crashed sending them (``NotReady: Producer service not yet started``,
exit code 1) and lost them (faust-streaming 0.15.3). A lost write whose input offsets were committed leaves its key
without those messages after the restart.

``ConfirmedTable`` (the app's ``Table`` class, see ``stream.app.create_app``) remembers the future of every
changelog record it queues; ``await table.writes_delivered()`` returns once the broker has all of them, sending
again, in order, any the broker refused. The agents call it after a batch's writes and before its body ends; the
timers before their work is done.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust

log = logging.getLogger(__name__)

RETRY_MAX_S = 30.0


class ConfirmedTable(faust.Table):
    """A ``faust.Table`` whose queued changelog records ``writes_delivered()`` waits for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (future, the arguments that queued it): kept until delivered, so a refused record can be sent again.
        self._unconfirmed: list[tuple[asyncio.Future, tuple]] = []

    def send_changelog(self, partition, key, value, key_serializer=None, value_serializer=None):
        fut = super().send_changelog(partition, key, value, key_serializer, value_serializer)
        self._unconfirmed.append((fut, (partition, key, value, key_serializer, value_serializer)))
        return fut

    async def writes_delivered(self) -> None:
        """Wait until the broker has every changelog record queued so far. A refused record is queued again (after
        a backoff) with the records refused beside it; the writer holds the table meanwhile (the agents and timers
        take one lock), so no newer value of its key can overtake it."""
        backoff = 0.5
        while self._unconfirmed:
            waiting, self._unconfirmed = self._unconfirmed, []
            outcomes = await asyncio.gather(*(fut for fut, _ in waiting), return_exceptions=True)
            # A refused record that a later delivered write of its key replaced is not sent again: it would land
            # after the newer value.
            newest = {queued[1]: i for i, (_, queued) in enumerate(waiting)}
            refused = [queued for i, ((_, queued), outcome) in enumerate(zip(waiting, outcomes))
                       if isinstance(outcome, BaseException) and newest[queued[1]] == i]
            if refused:
                first = next(outcome for outcome in outcomes if isinstance(outcome, BaseException))
                log.error("table %s: %d of %d changelog records not delivered (%r): sending the newest of each key "
                          "again in %.1fs", self.name, len(refused), len(waiting), first, backoff)
                await asyncio.sleep(backoff)
                backoff = min(RETRY_MAX_S, backoff * 2)
                for queued in refused:
                    self.send_changelog(*queued)
