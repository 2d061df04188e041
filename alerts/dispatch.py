"""The alert dispatcher: every alert event on ``finpulse.alerts`` reaches every matching endpoint, once, in order,
retried until acknowledged, in the spirit of Alertmanager's notifier.

How it works:

- It consumes ``finpulse.alerts`` in its own consumer group (``<worker.app_id>-dispatcher`` unless
  ``[alerts] group_id`` says otherwise). For each event and each endpoint whose filters match, it writes a
  ``pending`` record to the compacted ``finpulse.deliveries`` topic and waits for the broker's ack; only then does
  it commit the alert's offset. A crash before that re-reads the alert; one after it finds the pending record.
- At most one delivery per (alert event, endpoint) once acknowledged: a key that already has a state (pending,
  delivered or failed) is never taken on again, and every state change is in Kafka before the next step. The one
  window left is a crash between an endpoint's 2xx and the ``delivered`` record: the resend carries the same
  ``webhook-id``, which receivers use to deduplicate (``finpulse receiver`` does).
- Attempts back off exponentially with full jitter (``[alerts] backoff_initial_s`` doubling up to
  ``backoff_max_s``); a ``Retry-After`` (seconds or HTTP date) on 429/503 replaces the backoff and pauses the whole
  endpoint, for at most ``backoff_max_s``. No delivery waits past its retry window: one whose next attempt would
  come after it is recorded ``failed`` at once. Timeouts, connection errors, 408, 425, 429 and 5xx are retried until the endpoint's
  ``retry_horizon_s``; other answers (4xx, redirects, refused addresses) fail at once (``alerts.attempts``: one
  signed POST and what its answer means). ``failed`` is recorded with the attempts and the last error.
- Isolation: a request takes a slot of its endpoint's ``max_concurrency`` before one of the shared
  ``[alerts] max_concurrency``, so an endpoint whose requests hang until their timeout holds at most its own number
  of shared slots, never those the healthy endpoints need. After ``breaker_failures`` consecutive failed attempts
  (retryable failures: timeouts, connection errors, 408/425/429/5xx) the endpoint's circuit breaker opens
  (``alerts.breaker``): the endpoint is paused like a Retry-After pauses it, its deliveries wait instead of each
  hammering a dead service, and one probe at a time tries it, the pause doubling from ``backoff_initial_s`` up to
  ``backoff_max_s``, until it answers; the waiting deliveries take turns to probe, in the order they came. Waiting
  costs a delivery no attempt; its retry window still ends it (``failed``, "the retry window ended before the next
  attempt").
- Transport (``alerts.transport``): per endpoint TLS trust and client certificate, extra headers and an HTTP proxy.
  A certificate that fails verification fails the delivery at once, saying what to set. Through a proxy the
  target's host is resolved and checked by the address guard before the request is handed over.
- Age: a live alert's retry window runs from when it was emitted, not from when a dispatcher takes it on, and an
  alert already older than ``[alerts] max_alert_age_s`` then is recorded ``expired`` and never sent, so a new
  dispatcher group (which reads the topic from its start) or one back from a long outage sends no stale alerts
  (``_window``).
- Who gets what (``route``): a firing goes to the endpoints whose filters accept it. An escalation (a firing of a
  higher severity, same alert id) goes to those whose filters accept it now, including one whose ``min_severity``
  skipped the firing, and to every endpoint given the episode before, so that each learns it got worse. A resolve
  goes to every endpoint given the episode's firing or an escalation, whatever its severity, so an incident opened
  is always closed. An endpoint that names the incident it opened (``incident_id_from``) has one an episode: a
  later escalation goes there only as an update of it (``update_template``, to ``update_url`` with its method).
- Order: deliveries of one alert id to one endpoint form a chain (firing, escalations, resolve), so neither an
  escalation nor a resolve overtakes what came before it (the detector keys every event of a key alike, so they
  come from one partition, in order).
- Grouping (``alerts.grouping``, an endpoint with ``group_by``): an event taken on for such an endpoint is recorded
  ``pending`` like any other, then waits in its group (``_Group``, in memory) until the group's next flush
  (``group_wait_s`` / ``group_interval_s``). A flush (``_flush``) records, in this order, each step acknowledged
  before the next: (1) the group notification, one key listing its members' keys (``new_group``); (2) each member,
  naming it (``DeliveryState.group``); then delivers the notification like any delivery (retries, breaker, its own
  ``webhook-id``), and on its outcome writes (3) the notification's final state, (4) each member's, the same.
  A stop after (1) leaves members that a pending notification lists: they are never grouped again (``claimed``),
  and the notification is resumed and resent with the same webhook-id. A stop after (3) leaves pending members of a
  finished notification: ``_settle_members`` gives them its outcome on adoption. So an event is in at most one
  acknowledged notification, and nothing waiting is lost: waiting members are pending records, grouped again by
  whoever owns their partition. A notification belongs to the owner of its members' lowest alerts partition (its
  chain stops when that partition is revoked); its members are written only by it once it lists them. An event
  whose episode has an earlier event still pending at the endpoint (in another notification, another group, or
  held) is held for the group's next flush (``_after_unsent``), so order holds as for single deliveries; a firing
  and its resolve in one flush go in one notification, in order. ``--redeliver`` re-queues a failed notification's
  failed members, not the notification: re-queued, a member leaves it and is grouped anew.
- Silences (``alerts.silences``, on the compacted ``finpulse.silences`` topic, read to its end at start and followed
  between alert batches): an event that a silence in force at its emission covers for an endpoint is recorded
  ``silenced`` (naming the silence) instead of ``pending``, and never sent; deciding at emission makes every
  dispatcher decide alike, now or after a restart. An event still on its way when a silence begins (retrying, or
  waiting for its group) is checked again before each attempt and silenced then (``_silenced_on_the_way``). A
  resolve is never withheld from an endpoint given an event of its episode, and always from one whose every event
  of it was silenced (``_silenced``). When a silence ends, the
  owner of the alert's partition takes on the highest silenced firing or escalation of each episode it held that is
  still open at the endpoint (no resolve recorded there, nothing of that severity sent, no other silence covering it
  now): ``silenced`` becomes ``pending`` with a fresh retry window (``unsilenced``) and it goes out like any other,
  in its chain. Adoption does the same, so an end missed while no dispatcher ran is acted on by the next one.
  Replays' alerts are never silenced. Inhibition (``alerts.inhibition``) rides on the same path: an event that a
  firing alert mutes by an ``[[alerts.inhibit]]`` rule is recorded ``silenced`` with ``inhibited:<alert id>``, and
  goes out when that alert resolves if its episode is still open.
- Pending deliveries belong to the dispatcher that owns the alert's partition. On start and on every rebalance it
  reads the deliveries topic to its true end, then resumes the pending ones of the partitions it was given; on
  revocation it lets in-flight requests finish and stops the rest.
- Replays and live alerts stay apart: an alert with a ``run_id`` goes only to the endpoint named by
  ``[alerts] replay_endpoint`` (nowhere when none is named), and live alerts never go there. A replay's events
  carry the run id in their event id, webhook-id and PagerDuty dedup_key (``AlertRecord.episode_id``), so a
  receiver never mistakes one run's alert for another's or for the live one.
- Failed deliveries are sent again on request: ``finpulse dispatch --redeliver`` (``redeliver``) turns the matching
  ``failed`` records back into ``pending`` ones on the deliveries topic, with a fresh retry horizon, and exits. The
  dispatcher follows the deliveries topic (``_follow``, between alert batches) and takes the re-queued deliveries
  of its partitions on like resumed ones: same key, same ``webhook-id``, same chain order. If no dispatcher runs,
  the next one to start resumes them from the topic.

  Why the command re-queues instead of sending them itself: a delivery belongs to the dispatcher that owns its
  alert's partition, and only that owner writes its state, which is what keeps one writer per key and a resolve
  behind its firing. A one-shot sender in the command would be a second writer racing a running dispatcher (or one
  that starts meanwhile) on the same keys. As a state change on the topic the re-queue survives restarts and shows
  in ``--status`` and on the dashboard, and the delivery itself goes through the one code path, ``_deliver``.
  Only ``failed`` can be re-queued, so an acknowledged delivery is never sent again.

Run it inside the Faust worker (``install``) or alone (``finpulse dispatch``).
"""
from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from stream.config import ConfigError, Settings
from stream.kafka_io import bootstrap_list, stop_client
from stream.kafka_security import client_security
from stream.metrics import REGISTRY, Family, counter, gauge_family, histogram
from stream.ops import LAG_HELP, READINESS, OpsServer, broker_silence
from stream.records import AlertRecord, format_time, severity_rank, utcnow
from stream.topics import TopicNames, ensure_topics

from .deliveries import (DELIVERED, EXPIRED, FAILED, PENDING, SILENCED, DeliveryLog, DeliveryState, delivery_key,
                         new_pending, read_delivery_states, redelivery_plan, requeued, summarize, unsilenced)
from .breaker import CircuitBreaker
from .grouping import member_order, new_group
from .attempts import ERROR_TEXT_MAX, PAUSING_STATUS, Outcome, WebhookSender
from .endpoints import AlertsSettings, Endpoint, build_endpoints, load_delivery_config, preflight
from .formats import DeliveryContext, GroupContext, body_template, render, render_group
from .inhibition import INHIBITED, FiringAlerts, parse_rules
from .silences import SilenceBook, read_silences

log = logging.getLogger(__name__)

DELIVERIES = counter("finpulse_deliveries_total", "Deliveries that reached a final state, by endpoint and state "
                     "(delivered, failed, expired, silenced; one sent when its silence ended counts again as "
                     "delivered or failed).", ["endpoint", "state"])
ATTEMPTS = counter("finpulse_delivery_attempts_total", "Requests to endpoints, by endpoint and outcome (success; "
                   "retryable: timeouts, connection errors, 408/425/429/5xx; permanent: any other refusal).",
                   ["endpoint", "outcome"])
ATTEMPT_DURATION = histogram("finpulse_delivery_attempt_duration_seconds", "One request to an endpoint, in seconds, "
                             "until its answer or failure.", ["endpoint"])


def full_jitter(attempts: int, initial_s: float, max_s: float) -> float:
    """AWS-style full jitter: uniform in [0, min(max, initial * 2^(attempts-1))]."""
    return random.uniform(0.0, min(max_s, initial_s * 2 ** max(0, attempts - 1)))


@dataclass
class _Chain:
    """The deliveries of one alert id to one endpoint, delivered strictly one after the other."""
    partition: int
    keys: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


@dataclass
class _Group:
    """The alert events of one group of a grouped endpoint that wait for their notification (Alertmanager's
    aggregation group): member delivery keys, when the group last notified, and the timer of its next flush."""
    endpoint: str
    label: str
    waiting: list[str] = field(default_factory=list)
    last_flush: float | None = None
    timer: asyncio.Task | None = None


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, dispatcher: "Dispatcher"):
        self.dispatcher = dispatcher

    async def on_partitions_revoked(self, revoked):
        await self.dispatcher._release({tp.partition for tp in revoked if tp.topic == self.dispatcher.names.alerts})

    async def on_partitions_assigned(self, assigned):
        await self.dispatcher._adopt({tp.partition for tp in assigned if tp.topic == self.dispatcher.names.alerts})


class Dispatcher:
    """Consumes alerts and delivers them; ``start()``, then ``wait()`` (raises if it breaks) and ``stop()``."""

    def __init__(self, settings: Settings, names: TopicNames | None = None, environ=None):
        self.kafka = settings.kafka
        self.names = names or TopicNames(self.kafka.topic_prefix)
        self.config = load_delivery_config(settings)
        self.options = self.config.options
        self.endpoints: dict[str, Endpoint] = {e.name: e for e in build_endpoints(self.config, environ)}
        self.group_id = self.options.group_id or f"{settings.worker.app_id}-dispatcher"
        self.log = DeliveryLog(self.kafka, self.names.deliveries)
        # Replays have no silences topic: a backtest's alerts all reach its test endpoint.
        self.silences = SilenceBook(self.kafka, self.names.silences) if self.names.silences else None
        # Inhibition too is for live alerts only; it reads the alerts topic for what fires (alerts.inhibition).
        self.inhibit_rules = self.config.inhibit_rules if self.silences is not None else []
        self.firing = FiringAlerts(self.kafka, self.names.alerts) if self.inhibit_rules else None
        self._silences_seen_at = utcnow()   # silences that ended before this were acted on
        self._inhibitors_ended_seen = 0
        self._chains: dict[tuple[str, str], _Chain] = {}
        self._groups: dict[tuple[str, str], _Group] = {}   # (endpoint, group label) of grouped endpoints
        self._owned: set[int] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._sender = WebhookSender()
        self._shared_slots: asyncio.Semaphore | None = None
        self._endpoint_slots: dict[str, asyncio.Semaphore] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._main: asyncio.Task | None = None
        self._fatal: BaseException | None = None
        self._ignored_runs: set[str] = set()
        self._in_flight: Counter[str] = Counter()
        self._adopted = False     # the group assigned partitions (maybe none) and their deliveries were read
        # Records of a newly assigned partition can arrive while its adoption is still reading the deliveries
        # topic: taking alerts on waits for that, or it could miss that an event was taken on already.
        self._adopting = asyncio.Lock()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        READINESS.add("dispatcher", self._readiness)
        REGISTRY.add_collector(self._metric_families)
        await self.log.start()
        if self.silences is not None:
            await self.silences.start()
        if self.firing is not None:
            await self.firing.start()
        self._shared_slots = asyncio.Semaphore(self.options.max_concurrency)
        for endpoint in self.endpoints.values():
            for final in (DELIVERED, FAILED, EXPIRED, SILENCED):  # every series from 0, so rate() sees the first one
                DELIVERIES.labels(endpoint.name, final)
            for outcome in ("success", "retryable", "permanent"):
                ATTEMPTS.labels(endpoint.name, outcome)
            self._endpoint_slots[endpoint.name] = asyncio.Semaphore(endpoint.settings.max_concurrency)
            self._breakers[endpoint.name] = CircuitBreaker(endpoint.name, endpoint.settings.breaker_failures,
                                                           self.options.backoff_initial_s, self.options.backoff_max_s)
            if len(self.endpoints) > 1 and endpoint.settings.max_concurrency >= self.options.max_concurrency:
                log.warning("endpoint %s may use all %d shared request slots ([alerts] max_concurrency): if its "
                            "requests hang, the other endpoints wait for them; give it a smaller max_concurrency",
                            endpoint.name, self.options.max_concurrency)
        self._sender.open()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_list(self.kafka.bootstrap_servers), group_id=self.group_id, client_id=self.group_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=int(self.kafka.session_timeout_s * 1000),
            heartbeat_interval_ms=int(self.kafka.heartbeat_interval_s * 1000), **client_security(self.kafka))
        self._consumer.subscribe([self.names.alerts], listener=_Rebalance(self))
        await self._consumer.start()
        self._main = asyncio.create_task(self._consume(), name="finpulse-dispatcher")
        log.info("dispatcher %s started: %d endpoint(s) [%s]", self.group_id, len(self.endpoints),
                 ", ".join(repr(e) for e in self.endpoints.values()))
        if self.options.replay_endpoint:
            log.info("endpoint %r is [alerts] replay_endpoint: it receives replays' alerts only, no live ones",
                     self.options.replay_endpoint)

    async def wait(self) -> None:
        """Return when the dispatcher stops; raise what broke it, if anything did."""
        await self._main

    async def stop(self) -> None:
        for group in self._groups.values():
            if group.timer is not None:
                group.timer.cancel()
        if self._main is not None and not self._main.done():
            self._main.cancel()
            try:
                await self._main
            except asyncio.CancelledError:
                pass
        await self._release(set(self._owned))
        if self._consumer is not None:
            await stop_client(self._consumer)
        await self._sender.close()
        await self.log.stop()
        if self.silences is not None:
            await self.silences.stop()
        if self.firing is not None:
            await self.firing.stop()
        READINESS.remove("dispatcher", self._readiness)
        REGISTRY.remove_collector(self._metric_families)
        log.info("dispatcher %s stopped", self.group_id)

    # ------------------------------------------------------------ what operators see (stream.ops)

    def _readiness(self) -> tuple[bool, str]:
        if self._fatal is not None:
            return False, f"could not take over its partitions: {self._fatal}"
        if self._main is None:
            return False, "starting"
        if self._main.done():
            return False, "stopped"
        if not self._adopted:
            return False, (f"joining consumer group {self.group_id} and reading {self.names.deliveries} to its end")
        if self._consumer._coordinator.coordinator_id is None:
            return False, "the Kafka group coordinator is unknown: the broker does not answer"
        silence = broker_silence(self._consumer, self.kafka.session_timeout_s)
        if silence:
            return False, silence
        return True, f"group {self.group_id} owns alerts partitions {sorted(self._owned)}"

    def _metric_families(self) -> list[Family]:
        """Read at scrape time: in-flight requests, pending deliveries and the oldest one's age, breaker state and
        pauses per endpoint, and the alerts topic's lag."""
        now = time.time()
        names = list(self.endpoints)
        pending: Counter[str] = Counter({name: 0 for name in names})
        oldest = {name: 0.0 for name in names}
        for state in self.log.states.values():
            # Alert events only: a group notification's members are pending themselves.
            if state.state == PENDING and not state.is_group and state.alerts_partition in self._owned:
                pending[state.endpoint] += 1
                waiting_s = now - (state.requeued_at or state.created_at).timestamp()
                oldest[state.endpoint] = max(oldest.get(state.endpoint, 0.0), waiting_s)
        families = [
            gauge_family("finpulse_deliveries_in_flight", "Requests to the endpoint in flight now.", ["endpoint"],
                         {name: self._in_flight[name] for name in names}),
            gauge_family("finpulse_deliveries_pending", "Deliveries taken on and not yet final (waiting for an "
                         "attempt, a retry or an earlier event of their alert), of the partitions this dispatcher "
                         "owns.", ["endpoint"], pending),
            gauge_family("finpulse_delivery_oldest_pending_age_seconds", "How long the oldest pending delivery has "
                         "waited since it was taken on (or re-queued); 0 when none is pending.", ["endpoint"], oldest),
            gauge_family("finpulse_endpoint_breaker_open", "1 while the endpoint's circuit breaker is open (its "
                         "deliveries wait; one probe at a time tries it), else 0.", ["endpoint"],
                         {name: int(breaker.is_open) for name, breaker in self._breakers.items()}),
            gauge_family("finpulse_endpoint_consecutive_failures", "Consecutive failed attempts to the endpoint (the "
                         "breaker opens at breaker_failures).", ["endpoint"],
                         {name: breaker.failures for name, breaker in self._breakers.items()}),
            gauge_family("finpulse_endpoint_paused_seconds", "Seconds until the endpoint may be tried again (a "
                         "Retry-After or the open breaker); 0 when it is not paused.", ["endpoint"],
                         {name: max(0.0, round(e.not_before - now, 3)) for name, e in self.endpoints.items()}),
        ]
        if self.silences is not None:
            families.append(gauge_family("finpulse_silences_active", "Silences in force now (finpulse silence list).",
                                         [], {(): self.silences.active_count(utcnow())}))
        lag = self._alerts_lag()
        if lag is not None:
            families.append(gauge_family("finpulse_consumer_lag_messages", LAG_HELP, ["topic"], {self.names.alerts: lag}))
        return families

    def _alerts_lag(self) -> int | None:
        """The alerts not yet taken on: end minus position over the owned partitions whose both are known. (The
        dispatcher commits right after taking a batch on, so its position is its committed offset but for a moment.)"""
        subscription = self._consumer._subscription.subscription if self._consumer is not None else None
        if subscription is None or subscription.assignment is None:
            return None
        total, known = 0, False
        for tp in subscription.assignment.tps:
            # What aiokafka's own highwater() reads, and the position beside it (no request: both from the last fetch).
            tp_state = subscription.assignment.state_value(tp)
            if tp_state is None or tp_state.highwater is None or not tp_state.has_valid_position:
                continue
            total += max(0, tp_state.highwater - tp_state.position)
            known = True
        return total if known else None

    # ------------------------------------------------------------ taking alerts on

    async def _consume(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=1000, max_records=500)
            if self._fatal is not None:
                raise RuntimeError("the dispatcher could not take over its partitions") from self._fatal
            for tp, records in batch.items():
                await self._take(tp, records)
            await self._follow()

    async def _take(self, tp: TopicPartition, records) -> None:
        async with self._adopting:
            if self.firing is not None:
                await self.firing.poll()    # a source alert written just before its targets mutes them
            planned: list[DeliveryState] = []
            for record in records:
                alert = self._parse(record)
                if alert is None:
                    continue
                for endpoint in self._targets(alert):
                    if self.log.get(delivery_key(alert.event_id, endpoint.name)) is not None:
                        continue  # taken on already (pending, delivered or failed): never twice
                    window_from, too_old = self._window(alert, endpoint)
                    state = new_pending(alert, endpoint.name, tp.partition, record.offset,
                                        endpoint.settings.retry_horizon_s, window_from)
                    silence, why = self._silenced(alert, endpoint.name) if not too_old else ("", "")
                    if too_old:
                        state = replace(state, state=EXPIRED, next_attempt_at=None, last_error=too_old)
                        DELIVERIES.labels(endpoint.name, EXPIRED).inc()
                    elif why:
                        state = replace(state, state=SILENCED, next_attempt_at=None, silence=silence, last_error=why)
                        DELIVERIES.labels(endpoint.name, SILENCED).inc()
                    self.log.merge(state)  # visible at once: to duplicates and to a resolve later in this batch
                    planned.append(state)
            for state in await asyncio.gather(*(self.log.save(s) for s in planned)):
                if state.state == PENDING:
                    self._enqueue(state)
            silenced = [s for s in planned if s.state == SILENCED]
            if silenced:
                log.info("%d alert event(s) silenced, not sent: %s", len(silenced),
                         ", ".join(f"{s.event_id} to {s.endpoint} ({s.silence})" for s in silenced))
            expired = sum(s.state == EXPIRED for s in planned)
            if expired:
                log.warning("%d alert event(s) older than [alerts] max_alert_age_s (%.0fs) recorded as expired, "
                            "not sent", expired, self.options.max_alert_age_s)
        try:
            await self._consumer.commit({tp: records[-1].offset + 1})
        except (CommitFailedError, KafkaError) as exc:
            # The partition moved on: its new owner re-reads these alerts and finds their pending records.
            log.warning("could not commit %s@%d (%s); its next owner resumes from the pending records",
                        tp, records[-1].offset + 1, exc)

    async def _follow(self) -> None:
        """Take on the deliveries that ``--redeliver`` re-queued since the last look (failed → pending)."""
        async with self._adopting:
            reopened = await self.log.poll()
            await self._reassert_stale()
            await self._after_silences()
            if not reopened:
                return
            # `--redeliver` writes a firing's re-queue (and waits for its ack) before its resolve's, but the two can
            # sit on different partitions of the deliveries topic: read to the end, so that a resolve never starts
            # alone and overtakes its firing.
            await self.log.catch_up()
            for state in self.log.pending_for(self._owned):
                self._enqueue(state)  # keys already queued are not queued twice
        mine = [s for s in reopened if s.alerts_partition in self._owned]
        if mine:
            log.info("dispatcher %s took on %d re-queued deliveries: %s", self.group_id, len(mine),
                     ", ".join(f"{s.event_id} to {s.endpoint}" for s in mine))

    async def _reassert_stale(self) -> None:
        """A record older than the newest state of its delivery landed last (overlapping ``--redeliver`` runs):
        write the newest state again, or compaction would keep the older record and a later dispatcher act on it."""
        for key in self.log.stale_keys(self._owned):
            state = await self.log.reassert(key)
            log.warning("a late, older record of delivery %s to %s landed after its newest state (%s): wrote that "
                        "state again so that it stays the delivery's last record", state.event_id, state.endpoint,
                        state.state)

    def _parse(self, record) -> AlertRecord | None:
        try:
            alert = AlertRecord.from_json(record.value)
            if not alert.id or alert.status not in ("firing", "resolved"):
                raise ValueError(f"id {alert.id!r} / status {alert.status!r}")
            return alert
        except (ValueError, TypeError, KeyError) as exc:
            log.error("%s[%d]@%d is not a valid alert (%s): not delivered; it stays on the topic",
                      record.topic, record.partition, record.offset, exc)
            return None

    def _window(self, alert: AlertRecord, endpoint: Endpoint) -> tuple[datetime, str]:
        """When the retry window of ``alert`` to ``endpoint`` starts, and why it is not sent at all ('' if it is).

        A live alert's window starts when it was emitted (or now, if the detector's clock runs ahead). Two kinds
        start now and never expire: a replay's alerts, whose emitted_at is event time, possibly months ago; and a
        resolve whose firing or an escalation was delivered or is on its way, since it closes an incident open at
        the endpoint. A resolve whose every firing and escalation there expired is not sent either."""
        now = utcnow()
        if alert.run_id:
            return now, ""
        if alert.status == "resolved":
            given = self._given(alert, endpoint.name)
            if any(s.state in (PENDING, DELIVERED) for s in given):
                return now, ""
            if given and all(s.state == EXPIRED for s in given):
                return now, "not sent: its firing expired, so the endpoint never saw the incident open"
        emitted = min(alert.emitted_at, now)
        age_s = (now - emitted).total_seconds()
        if age_s > self.options.max_alert_age_s:
            return emitted, (f"not sent: emitted {age_s / 3600:.1f} h before it was taken on, more than "
                             f"[alerts] max_alert_age_s ({self.options.max_alert_age_s / 3600:g} h)")
        return emitted, ""

    def _targets(self, alert: AlertRecord) -> list[Endpoint]:
        if alert.run_id:
            endpoint = self.endpoints.get(self.options.replay_endpoint) if self.options.replay_endpoint else None
            if endpoint is None:
                if alert.run_id not in self._ignored_runs:
                    self._ignored_runs.add(alert.run_id)
                    log.warning("ignoring alerts of replay run %s: replays never go to live endpoints "
                                "(name a test endpoint in [alerts] replay_endpoint)", alert.run_id)
                return []
            candidates = [endpoint]
        else:
            # The replay endpoint is the test sink of replays: live alerts there would mix with a backtest's.
            candidates = [e for e in self.endpoints.values() if e.name != self.options.replay_endpoint]
        return route(alert, candidates, lambda e: bool(self._given(alert, e.name)),
                     lambda e: any(s.state in (PENDING, DELIVERED) for s in self._given(alert, e.name)))

    def _given(self, alert: AlertRecord, endpoint: str) -> list[DeliveryState]:
        """The deliveries of the firing and escalations of ``alert``'s episode to ``endpoint`` taken on so far (in
        any state), lowest severity first."""
        found = (self.log.get(delivery_key(event_id, endpoint)) for event_id in alert.firing_event_ids())
        return [state for state in found if state is not None]

    # ------------------------------------------------------------ silences (alerts.silences)

    def _silenced(self, alert: AlertRecord, endpoint: str, at: datetime | None = None) -> tuple[str, str]:
        """Whether a silence withholds ``alert`` from ``endpoint``: (silence id, why), or ("", "") to send it.

        Decided at the alert's emission (``at`` None), so that whichever dispatcher takes it on, whenever, decides
        alike; and again before each attempt of an event still on its way (``at`` now), so that a silence added
        during an incident also stops what is still being retried. A replay's alert is never silenced (a backtest
        must see everything). A resolve is never withheld from an endpoint given an event of its episode (an
        incident opened there is always closed), and always from one whose every event of the episode was silenced
        (there is nothing to close)."""
        if self.silences is None or alert.run_id:
            return "", ""
        if alert.status == "resolved":
            given = self._given(alert, endpoint)
            if given and not any(s.state in (PENDING, DELIVERED, FAILED) for s in given):
                held = [s.silence for s in given if s.state == SILENCED]
                if held:
                    return held[-1], "silenced: every event of its episode was silenced at this endpoint"
            if given:
                return "", ""
        silence = self.silences.silencing(alert, endpoint, at or min(alert.emitted_at, utcnow()))
        if silence is not None:
            return silence.id, (f"silenced by {silence.id} until {format_time(silence.ends_at)} "
                                f"({silence.created_by}: {silence.comment})")[:ERROR_TEXT_MAX]
        muted = self.firing.muting(self.inhibit_rules, alert, endpoint) if self.firing is not None else None
        if muted is None:
            return "", ""
        source, rule = muted
        return INHIBITED + source.id, (f"inhibited by firing alert {source.id} ({source.key_type} {source.key}, "
                                       f"{source.severity}): {rule}")[:ERROR_TEXT_MAX]

    async def _silenced_on_the_way(self, state: DeliveryState, regroup: bool = True) -> bool:
        """An event not delivered yet that a silence covers now is recorded ``silenced`` instead of sent (True):
        a silence added while an alert is still being retried (its endpoint down, a Retry-After, waiting in its
        group) stops it, and it goes out when the silence ends if its episode is still open, as any silenced one."""
        if state.is_group:
            return False    # a group notification made already goes out whole: its members were checked when made
        silence, why = self._silenced(state.alert_record, state.endpoint, at=utcnow())
        if not why:
            return False
        await self.log.save(replace(state, state=SILENCED, next_attempt_at=None, silence=silence, last_error=why))
        DELIVERIES.labels(state.endpoint, SILENCED).inc()
        log.info("alert event %s to %s silenced on its way (after %d attempt(s)): %s", state.event_id,
                 state.endpoint, state.attempts, why)
        if regroup:
            self._regroup(state.endpoint)   # events of its group held back behind it may go now
        return True

    async def _after_silences(self, force: bool = False) -> None:
        """Once a silence has ended (expired, or expired early), an episode it held that is still open at an
        endpoint goes out there: its highest silenced firing or escalation is taken on again (``unsilenced``),
        as Alertmanager notifies what still fires after a silence. Runs when silences change or one ends, and on
        adoption, so a restarted dispatcher does the same from the topics."""
        if self.silences is None:
            return
        now = utcnow()
        changed = await self.silences.poll()
        ended = any(self._silences_seen_at < s.ends_at <= now for s in self.silences.silences.values())
        self._silences_seen_at = now
        if self.firing is not None:
            await self.firing.poll()
            ended |= self.firing.ended != self._inhibitors_ended_seen     # a muting alert resolved
            self._inhibitors_ended_seen = self.firing.ended
        if not (force or changed or ended):
            return
        highest: dict[tuple[str, str], DeliveryState] = {}
        for state in self.log.states.values():
            if (state.state == SILENCED and state.alert_status == "firing" and not state.is_group
                    and state.alerts_partition in self._owned):
                ck = (state.endpoint, state.alert_id)
                if ck not in highest or severity_rank(state.alert_severity) > severity_rank(highest[ck].alert_severity):
                    highest[ck] = state
        for (endpoint_name, _), state in sorted(highest.items()):
            endpoint = self.endpoints.get(endpoint_name)
            alert = state.alert_record
            if endpoint is None or self._silenced(alert, endpoint_name, at=now)[1]:
                continue  # its silence, another one or an inhibition still holds it: it waits for that to end
            if self.log.get(delivery_key(alert.event_id_of("resolved"), endpoint_name)) is not None:
                continue  # the episode is over: nothing to open now
            sent = [s for s in self._given(alert, endpoint_name) if s.state in (PENDING, DELIVERED)]
            if any(severity_rank(s.alert_severity) >= severity_rank(alert.severity) for s in sent):
                continue  # the endpoint has this severity of the episode already
            state = await self.log.save(unsilenced(state, endpoint.settings.retry_horizon_s))
            held_by = (f"the firing of {state.silence.removeprefix(INHIBITED)} that muted it"
                       if state.silence.startswith(INHIBITED) else f"silence {state.silence}")
            log.info("%s is over: %s to %s goes out now (its episode is still open)", held_by, state.event_id,
                     endpoint_name)
            self._enqueue(state)

    # ------------------------------------------------------------ ownership

    async def _adopt(self, partitions: set[int]) -> None:
        try:
            async with self._adopting:
                self._owned |= partitions
                await self.log.catch_up()
                await self._settle_members(partitions)
                resumed = self.log.pending_for(partitions)
                for state in resumed:
                    self._enqueue(state)
                await self._after_silences(force=True)
                await self._reassert_stale()
                self._adopted = True
            log.info("dispatcher %s owns alerts partitions %s; deliveries known %s, %d pending resumed",
                     self.group_id, sorted(self._owned), summarize(self.log.states.values()), len(resumed))
        except Exception as exc:  # a half-adopted partition must not go on silently: stop the dispatcher
            log.exception("taking over partitions %s failed", sorted(partitions))
            self._fatal = exc

    async def _release(self, partitions: set[int]) -> None:
        self._owned -= partitions
        leaving = {ck: chain for ck, chain in self._chains.items() if chain.partition in partitions}
        for chain in leaving.values():
            chain.stop.set()
        # Waiting group members of those partitions are the new owner's to group (they are on the topic).
        for group in self._groups.values():
            group.waiting = [k for k in group.waiting if self.log.get(k).alerts_partition not in partitions]
            if not group.waiting and group.timer is not None:
                group.timer.cancel()
                group.timer = None
        await asyncio.gather(*(c.task for c in leaving.values() if c.task is not None), return_exceptions=True)
        for ck in leaving:
            self._chains.pop(ck, None)

    def _enqueue(self, state: DeliveryState) -> None:
        if state.alerts_partition not in self._owned:
            return  # another dispatcher owns it now and resumes it from the deliveries topic
        if state.group:
            return  # a member of a group notification: the group sends it and records its outcome
        endpoint = self.endpoints.get(state.endpoint)
        if not state.is_group and endpoint is not None and endpoint.grouping is not None:
            self._hold(state, endpoint)
            return
        # One chain per alert id (its firing, escalations and resolve in order), or per group notification.
        ck = (state.endpoint, state.event_id if state.is_group else state.alert_id)
        chain = self._chains.get(ck)
        if chain is None:
            chain = self._chains[ck] = _Chain(partition=state.alerts_partition)
        if state.key not in chain.keys:
            chain.keys.append(state.key)
            chain.keys.sort(key=lambda k: self.log.get(k).order)
        if chain.task is None or chain.task.done():
            chain.task = asyncio.create_task(self._run_chain(ck, chain), name=f"deliver {ck}")

    async def _run_chain(self, ck: tuple[str, str], chain: _Chain) -> None:
        try:
            while chain.keys and not chain.stop.is_set():
                key = chain.keys[0]
                if not await self._deliver(key, chain.stop):
                    return
                chain.keys.remove(key)
        except Exception:
            log.exception("delivering %s stopped; it resumes when the dispatcher restarts or rebalances", ck)
        finally:
            if not chain.keys and self._chains.get(ck) is chain:
                del self._chains[ck]

    # ------------------------------------------------------------ grouping (alerts.grouping)

    def _hold(self, state: DeliveryState, endpoint: Endpoint) -> None:
        """Put an alert event of a grouped endpoint in its group, to go out with the group's next notification."""
        label = endpoint.grouping.label(state.alert_record)
        group = self._groups.get((endpoint.name, label))
        if group is None:
            group = self._groups[(endpoint.name, label)] = _Group(endpoint.name, label,
                                                                 last_flush=self._last_notified(endpoint.name, label))
        if state.key not in group.waiting:
            group.waiting.append(state.key)
        self._schedule(group)

    def _last_notified(self, endpoint: str, label: str) -> float | None:
        """When the group last notified, by the deliveries topic (a restarted dispatcher keeps group_interval_s)."""
        times = [s.created_at.timestamp() for s in self.log.states.values()
                 if s.is_group and s.endpoint == endpoint and s.group_label == label]
        return max(times, default=None)

    def _schedule(self, group: _Group) -> None:
        endpoint = self.endpoints.get(group.endpoint)
        if not group.waiting or endpoint is None or (group.timer is not None and not group.timer.done()):
            return
        when = endpoint.grouping.next_flush(time.time(), group.last_flush)
        group.timer = asyncio.create_task(self._flush_at(group, when), name=f"group {group.endpoint} {group.label}")

    async def _flush_at(self, group: _Group, when: float) -> None:
        await asyncio.sleep(max(0.0, when - time.time()))
        try:
            async with self._adopting:
                group.timer = None
                await self._flush(group)
        except Exception:
            log.exception("grouping %s for %s stopped; its events resume when the dispatcher restarts or "
                          "rebalances", group.label, group.endpoint)

    async def _flush(self, group: _Group) -> None:
        """Send what waits in ``group`` as one notification: record it (its member keys), then each member naming
        it, then deliver it. Events whose episode still has an earlier event on its way to the endpoint wait for the
        group's next notification, so that neither an escalation nor a resolve overtakes what came before it."""
        claimed = {key for s in self.log.states.values() if s.is_group and s.state == PENDING for key in s.members}
        waiting = [self.log.get(key) for key in group.waiting]
        ready = sorted((s for s in waiting if s.state == PENDING and not s.group and s.key not in claimed
                        and s.alerts_partition in self._owned), key=member_order)
        chosen: list[DeliveryState] = []
        held: list[str] = []
        too_late: list[DeliveryState] = []
        for state in ready:
            if await self._silenced_on_the_way(state, regroup=False):
                continue
            if self._after_unsent(state, {c.key for c in chosen}):
                held.append(state.key)
            elif state.deadline_at <= utcnow():
                too_late.append(state)
            else:
                chosen.append(state)
        group.waiting = held
        for state in too_late:
            await self._finish(state, FAILED, "the retry window ended while it waited for its group notification", None)
        if not chosen:
            return
        notification = await self.log.save(new_group(group.endpoint, group.label, chosen))
        await asyncio.gather(*(self.log.save(replace(m, group=notification.key)) for m in chosen))
        group.last_flush = notification.created_at.timestamp()
        log.info("group %s of %s: %d alert event(s) in notification %s%s", group.label, group.endpoint, len(chosen),
                 notification.event_id, f"; {len(held)} wait for an earlier event of their episode" if held else "")
        self._enqueue(notification)

    def _after_unsent(self, state: DeliveryState, going_with: set[str]) -> bool:
        """Whether an earlier event of ``state``'s episode is still on its way to the endpoint, and not in the
        same notification."""
        return any(earlier.state == PENDING and earlier.key not in going_with and earlier.order < state.order
                   for earlier in self._given(state.alert_record, state.endpoint))

    def _regroup(self, endpoint: str) -> None:
        """A delivery to ``endpoint`` ended: groups holding events back for it may notify now."""
        for group in self._groups.values():
            if group.endpoint == endpoint:
                self._schedule(group)

    async def _settle_members(self, partitions: set[int]) -> None:
        """A dispatcher stopped between a group notification's outcome and its members' records: give the members
        of ``partitions`` that name a finished notification its outcome."""
        for state in self.log.pending_for(partitions):
            notification = self.log.get(state.group) if state.group else None
            if notification is not None and notification.terminal:
                await self.log.save(self._member_outcome(state, notification))

    @staticmethod
    def _member_outcome(member: DeliveryState, notification: DeliveryState) -> DeliveryState:
        return replace(member, state=notification.state, attempts=notification.attempts, group=notification.key,
                       last_error=notification.last_error, last_status=notification.last_status,
                       next_attempt_at=None, delivered_at=notification.delivered_at)

    # ------------------------------------------------------------ delivering

    async def _deliver(self, key: str, stop: asyncio.Event) -> bool:
        """Attempt one delivery until it is delivered or failed (True), or ``stop`` is set (False)."""
        state = self.log.get(key)
        if state is None or state.terminal:
            return True
        endpoint = self.endpoints.get(state.endpoint)
        if endpoint is None:
            await self._finish(state, FAILED, f"endpoint {state.endpoint!r} is no longer configured", None)
            return True
        breaker = self._breakers[endpoint.name]
        try:
            return await self._attempt_until_done(state, endpoint, breaker, stop)
        finally:
            breaker.leave(key)  # ended or stopped: its turn to probe passes to the next in line

    async def _attempt_until_done(self, state: DeliveryState, endpoint: Endpoint, breaker: CircuitBreaker,
                                  stop: asyncio.Event) -> bool:
        """``_deliver``'s attempts, each after its backoff, the endpoint's pause and its turn on an open breaker."""
        while True:
            due = max(state.next_attempt_at.timestamp() if state.next_attempt_at else 0.0, endpoint.not_before)
            if due > state.deadline_at.timestamp():
                # Never sleep past the retry window (a pause another delivery's Retry-After set, a resumed delivery).
                await self._finish(state, FAILED, f"the retry window ended before the next attempt after "
                                                  f"{state.attempts} attempt(s); last: {state.last_error or 'none'}",
                                   state.last_status)
                return True
            if not await _sleep_until(due, stop):
                return False
            if await self._silenced_on_the_way(state):
                return True
            # The endpoint's own slot first: while its requests hang, its other deliveries queue here, holding none
            # of the shared slots the healthy endpoints need.
            async with self._endpoint_slots[endpoint.name], self._shared_slots:
                if stop.is_set():
                    return False
                if endpoint.not_before > time.time():
                    continue  # a Retry-After or the breaker paused the endpoint while this attempt waited for a slot
                with breaker.admission(state.key) as admitted:
                    if admitted:
                        outcome = await self._measured_attempt(endpoint, state)
                        self._count(endpoint, breaker, outcome)
                    else:
                        turn_changed = breaker.turn_changed
            if not admitted:
                # The breaker is open, and another delivery's probe is out or it is another's turn: wait for a change.
                if not await _wait_for(turn_changed, stop):
                    return False
                continue
            attempts = state.attempts + 1
            if outcome.ok:
                await self._finish(replace(state, attempts=attempts, incident_id=outcome.incident_id), DELIVERED, "",
                                   outcome.status)
                return True
            if not outcome.retryable:
                await self._finish(replace(state, attempts=attempts), FAILED, outcome.error, outcome.status)
                return True
            delay = outcome.retry_after
            if delay is not None:
                # Capped like our own backoff: a Retry-After of a day would hold alerts until they are useless.
                delay = min(delay, self.options.backoff_max_s)
            if delay is not None and outcome.status in PAUSING_STATUS:
                endpoint.not_before = max(endpoint.not_before, time.time() + delay)
            if delay is None:
                delay = full_jitter(attempts, self.options.backoff_initial_s, self.options.backoff_max_s)
            # Not before the endpoint's pause (a Retry-After, the breaker) ends: that is when it can go out.
            delay = max(delay, endpoint.not_before - time.time())
            next_at = utcnow() + timedelta(seconds=delay)
            if next_at > state.deadline_at:
                await self._finish(replace(state, attempts=attempts), FAILED,
                                   f"gave up after {attempts} attempt(s) within the retry horizon; last: {outcome.error}",
                                   outcome.status)
                return True
            state = await self.log.save(replace(state, attempts=attempts, last_error=outcome.error,
                                                last_status=outcome.status, next_attempt_at=next_at))
            log.warning("delivery %s to %s: attempt %d failed (%s); next in %.2fs", state.event_id, endpoint.name,
                        attempts, outcome.error, delay)

    def _count(self, endpoint: Endpoint, breaker: CircuitBreaker, outcome: Outcome) -> None:
        """Tell the endpoint's breaker what an attempt came to; pause the endpoint while the breaker is open."""
        failed = not outcome.ok and outcome.retryable
        answered = outcome.ok or (outcome.status is not None and not outcome.retryable)
        if breaker.record(failed, answered, outcome.error):
            endpoint.not_before = max(endpoint.not_before, time.time() + breaker.pause_s)

    async def _finish(self, state: DeliveryState, final: str, error: str, status: int | None) -> None:
        state = await self.log.save(replace(state, state=final, last_error=error, last_status=status,
                                            next_attempt_at=None, delivered_at=utcnow() if final == DELIVERED else None))
        # Deliveries are counted per alert event: a group notification's outcome is its members'.
        DELIVERIES.labels(state.endpoint, final).inc(len(state.members) if state.is_group else 1)
        what = f"group notification {state.event_id} ({len(state.members)} events)" if state.is_group else state.event_id
        if final == DELIVERED:
            log.info("delivered %s to %s (attempt %d)", what, state.endpoint, state.attempts)
        else:
            log.error("delivery %s to %s failed after %d attempt(s): %s", what, state.endpoint, state.attempts, error)
        if state.is_group:
            # After the notification's own record: a stop in between leaves members that _settle_members completes.
            members = [self.log.get(key) for key in state.members]
            await asyncio.gather(*(self.log.save(self._member_outcome(m, state)) for m in members
                                   if m is not None and not m.terminal))
        self._regroup(state.endpoint)

    async def _measured_attempt(self, endpoint: Endpoint, state: DeliveryState) -> Outcome:
        """``_attempt``, counted: in flight while it runs, then its duration and outcome."""
        self._in_flight[endpoint.name] += 1
        started = time.monotonic()
        try:
            outcome = await self._attempt(endpoint, state)
        finally:
            self._in_flight[endpoint.name] -= 1
        ATTEMPT_DURATION.labels(endpoint.name).observe(time.monotonic() - started)
        ATTEMPTS.labels(endpoint.name, "success" if outcome.ok else "retryable" if outcome.retryable
                        else "permanent").inc()
        return outcome

    def _request(self, endpoint: Endpoint, state: DeliveryState) -> tuple[bytes, str | None, str, bool]:
        """The body of this delivery's next attempt, where it goes (None: the endpoint's url; a template endpoint's
        resolve or update may go to its ``resolve_url`` or ``update_url``), the method (``resolve_method``,
        ``update_method``), and whether it opens an incident whose id the answer names (``incident_id_from``)."""
        if not state.is_group:
            alert = state.alert_record
            ctx = self._context(endpoint, state, alert)
            return (render(endpoint.format, alert, ctx), endpoint.url_for(alert, ctx), endpoint.method_for(alert, ctx),
                    endpoint.opens_incident_with(alert, ctx))
        members = [self.log.get(key) for key in state.members]
        group = GroupContext(webhook_id=state.webhook_id, event_id=state.event_id, endpoint=endpoint.name,
                             label=state.group_label, attempt=state.attempts + 1, sent_at=format_time(utcnow()),
                             dashboard_url=self.options.dashboard_url, template=endpoint.settings.group_template)
        # Each member as it would have gone alone: its own event id and webhook-id, this attempt's number.
        return render_group(endpoint.format, group, [
            (m.alert_record, self._context(endpoint, replace(m, attempts=state.attempts), m.alert_record))
            for m in members]), None, "POST", False

    async def _attempt(self, endpoint: Endpoint, state: DeliveryState) -> Outcome:
        try:
            body, url, method, opens = self._request(endpoint, state)
        except ValueError as exc:  # a group its endpoint's format no longer takes; a resolve with no incident to close
            return Outcome(ok=False, retryable=False, error=f"{exc}; not retried"[:ERROR_TEXT_MAX])
        except Exception as exc:  # noqa: BLE001 - a body that cannot be rendered now never will be: say so, go on
            log.exception("cannot render %s for %s", state.event_id, endpoint.name)
            return Outcome(ok=False, retryable=False, error=f"cannot render the {endpoint.format} body: "
                                                            f"{type(exc).__name__}: {exc}; not retried"[:ERROR_TEXT_MAX])
        outcome = await self._sender.send(endpoint, state.webhook_id, body, url, method, opens)
        if opens and outcome.ok and not outcome.incident_id:
            log.warning("delivery %s to %s: taken, but its answer has nothing at %s: the episode's resolve cannot say "
                        "which incident to close", state.event_id, endpoint.name, endpoint.settings.incident_id_from)
        return outcome

    def _context(self, endpoint: Endpoint, state: DeliveryState, alert: AlertRecord) -> DeliveryContext:
        # What this endpoint was sent of the episode before this event: a resolve follows all of it, a firing or an
        # escalation only the lower severities. An expired or silenced delivery was never sent.
        given = self._given(alert, endpoint.name)
        earlier = [s for s in given if alert.status == "resolved"
                   or severity_rank(s.alert_severity) < severity_rank(alert.severity)]
        before = tuple(dict.fromkeys(s.alert_severity for s in earlier if s.state not in (EXPIRED, SILENCED)))
        # An update goes where an earlier event was delivered: a refused firing opened nothing to update.
        update = endpoint.updates(alert, any(s.state == DELIVERED for s in earlier))
        return DeliveryContext(
            webhook_id=state.webhook_id, event_id=state.event_id, endpoint=endpoint.name, attempt=state.attempts + 1,
            sent_at=format_time(utcnow()), dashboard_url=self.options.dashboard_url,
            routing_key=endpoint.routing_key.reveal() if endpoint.routing_key else "",
            sent_severities=before, update=update, template=body_template(endpoint.settings, alert, update),
            # What the endpoint opened for the episode: the first event it was given (the firing, or the escalation
            # that reached its min_severity) named it; later escalations update it there, or are not sent.
            incident_id=next((s.incident_id for s in given if s.incident_id), ""))


def route(alert: AlertRecord, candidates: list[Endpoint], given: Callable[[Endpoint], bool],
          may_be_open: Callable[[Endpoint], bool] | None = None) -> list[Endpoint]:
    """Which of ``candidates`` take ``alert`` on; ``given(endpoint)`` says whether the endpoint was given a firing or
    an escalation of the alert's episode already (see the module docstring), ``may_be_open(endpoint)`` whether one
    of them was delivered there or is on its way (default: ``given``).

    A resolve whose episode reached none of them (its firing came before they were configured) goes to those whose
    filters accept it, as a firing would, but for endpoints that open incidents: they opened nothing to close. Such
    an endpoint (``incident_id_from``) opens one incident an episode, with the first event it is given (the firing,
    or the escalation that reaches its ``min_severity``): a later escalation, POSTed again, would open a second one
    that nothing closes, so it goes only where it is sent as an update of the open one (``update_template``), or
    where nothing of the episode may have opened one (every event of it refused, silenced or expired there). An
    endpoint whose ``events`` leave out this kind of event takes none."""
    may_be_open = may_be_open or given
    if alert.status == "resolved":
        went_to = [e for e in candidates if given(e)]
        if went_to:
            return [e for e in went_to if e.wants(alert)]
        return [e for e in candidates if e.accepts(alert) and e.wants(alert) and not e.opens_incidents]
    if alert.escalated_from:
        return [e for e in candidates if (e.accepts(alert) or given(e)) and e.wants(alert)
                and not (e.opens_incidents and may_be_open(e) and not e.sends_updates)]
    return [e for e in candidates if e.accepts(alert) and e.wants(alert)]


async def _wait_for(event: asyncio.Event, stop: asyncio.Event) -> bool:
    """Wait until ``event`` is set; False if ``stop`` was set first."""
    stopping = asyncio.ensure_future(stop.wait())
    happening = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({stopping, happening}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        happening.cancel()
    return not stop.is_set()


async def _sleep_until(when: float, stop: asyncio.Event) -> bool:
    """Wait until epoch time ``when``; False if ``stop`` was set first."""
    delay = when - time.time()
    if stop.is_set():
        return False
    if delay <= 0:
        return True
    try:
        await asyncio.wait_for(stop.wait(), delay)
        return False
    except asyncio.TimeoutError:
        return True


# ---------------------------------------------------------------- inside the Faust worker

def install(app, settings: Settings, names: TopicNames | None = None):
    """Run a Dispatcher as a service of the Faust ``app`` (started with the worker, stopped with it; if it breaks,
    the worker crashes rather than silently not delivering). Returns the service class, or None when no endpoint is
    configured. Raises ConfigError at once for bad endpoints or missing secret env vars."""
    import mode

    config = load_delivery_config(settings)
    if not config.endpoints:
        log.info("no [alerts] endpoints configured: this worker delivers no alerts")
        return None
    build_endpoints(config)  # fail at worker start, not at the first alert, when a secret is missing

    class AlertDispatcherService(mode.Service):
        dispatcher: Dispatcher

        async def on_start(self) -> None:
            self.dispatcher = Dispatcher(settings, names)
            await self.dispatcher.start()

        @mode.Service.task
        async def _watch(self) -> None:
            await self.dispatcher.wait()

        async def on_stop(self) -> None:
            await self.dispatcher.stop()

    app.service(AlertDispatcherService)
    return AlertDispatcherService


# ---------------------------------------------------------------- `finpulse dispatch`

def run_dispatch(settings: Settings, check: bool = False, status: bool = False, redeliver: bool = False,
                 endpoint: str | None = None, alert_id: str | None = None, dry_run: bool = False,
                 preview: str | None = None) -> int:
    names = TopicNames(settings.kafka.topic_prefix)
    config = load_delivery_config(settings)
    if preview:
        from .preview import preview as preview_of
        print(preview_of(config, preview, config.options.dashboard_url))
        return 0
    if status:
        return _print_status(settings, names)
    if not config.endpoints:
        raise ConfigError("no endpoints: add [[alerts.endpoints]] tables to the config (see finpulse.example.toml)")
    if check:
        return asyncio.run(_check(config))
    if redeliver:
        asyncio.run(redeliver_failed(settings, names, endpoint=endpoint, alert_id=alert_id, dry_run=dry_run))
        return 0
    ensure_topics(settings.kafka, [names.alerts, names.deliveries, names.silences], names.compacted())
    return asyncio.run(_serve(settings, names))


async def _serve(settings: Settings, names: TopicNames) -> int:
    dispatcher = Dispatcher(settings, names)
    options = dispatcher.options
    # Up before the dispatcher starts, so that a probe sees "not ready" rather than nothing while it joins.
    server = OpsServer(options.metrics_host, options.metrics_port) if options.metrics_port else None
    if server is not None:
        await server.start()
    try:
        return await _dispatch_until_stopped(dispatcher, names)
    finally:
        if server is not None:
            await server.stop()


async def _dispatch_until_stopped(dispatcher: Dispatcher, names: TopicNames) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await dispatcher.start()
    print(f"dispatching {names.alerts} to {len(dispatcher.endpoints)} endpoint(s) as group {dispatcher.group_id} "
          f"(state in {names.deliveries}); Ctrl-C stops", flush=True)
    waiting = asyncio.create_task(dispatcher.wait())
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({stopped, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if waiting in done and waiting.exception() is not None:
            log.error("the dispatcher broke: %s", waiting.exception())
            return 1
        return 0
    finally:
        for task in (stopped, waiting):
            task.cancel()
        await dispatcher.stop()


async def _check(config) -> int:
    problems = 0
    endpoints = build_endpoints(config)
    for endpoint in endpoints:
        try:
            verdict = await preflight(endpoint)
        except OSError as exc:
            verdict = f"REFUSED: {endpoint.scrub(str(exc))}"
            problems += 1
        signed = f"{len(endpoint.signing_secrets)} signing key(s)" if endpoint.signing_secrets else "unsigned"
        print(f"{endpoint.name:<20} {endpoint.format:<13} {endpoint.display_url:<40} {signed:<18} {verdict}")
    return 1 if problems else 0


def _print_status(settings: Settings, names: TopicNames) -> int:
    states = read_delivery_states(settings.kafka, names.deliveries)
    deliveries = sum(not s.is_group for s in states.values())
    print(f"{names.deliveries}: {deliveries} deliveries {summarize(states.values())}")
    groups = summarize(states.values(), groups=True)
    if groups:
        print(f"  of them in {sum(groups.values())} group notifications {groups}")
    now = utcnow()
    ensure_topics(settings.kafka, [names.silences], names.compacted())   # a deployment from before silences has none
    silences = asyncio.run(read_silences(settings.kafka, names.silences)).values()
    print(f"{names.silences}: {sum(s.active(now) for s in silences)} in force, "
          f"{sum(now < s.starts_at for s in silences)} to come (`finpulse silence list`)")
    rules = parse_rules(settings.section("alerts", AlertsSettings).inhibit)
    muted = sum(s.silence.startswith(INHIBITED) for s in states.values() if s.state == SILENCED)
    print(f"inhibition: {len(rules)} rule(s){''.join(f'; {rule}' for rule in rules)}; {muted} alert event(s) muted "
          f"by one (counted in silenced)")
    for state in sorted(states.values(), key=lambda s: s.updated_at):
        if not state.terminal or state.state in (FAILED, EXPIRED):
            requeued_note = f"  re-queued {state.requeues}x, last {format_time(state.requeued_at)}" if state.requeues else ""
            grouped = f"  ({len(state.members)} events, group {state.group_label})" if state.is_group else ""
            opened = _incident_note(state, states)
            print(f"  {state.state:<9} {state.key}{grouped}{opened}  attempts={state.attempts}{requeued_note}  "
                  f"{state.last_error}")
    return 0


def _incident_note(state: DeliveryState, states: dict[str, DeliveryState]) -> str:
    """What ``--status`` says of the incident beside a delivery: the one its episode opened at the endpoint, and
    whether this delivery was an update of it (an escalation that another event's incident was open for)."""
    incident = _incident_of(state, states)
    if not incident:
        return ""
    update = not state.is_group and state.alert_record.event_kind == "escalation" and state.incident_id != incident
    return f"  {'update of ' if update else ''}incident {incident}"


def _incident_of(state: DeliveryState, states: dict[str, DeliveryState]) -> str:
    """The incident this delivery's episode opened at its endpoint (``incident_id_from``), for a person to close
    by hand when its resolve failed; "" when none is known."""
    if state.is_group:
        return ""
    found = (states.get(delivery_key(event_id, state.endpoint)) for event_id in state.alert_record.firing_event_ids())
    return next((s.incident_id for s in found if s is not None and s.incident_id), "")


async def redeliver_failed(settings: Settings, names: TopicNames, endpoint: str | None = None,
                           alert_id: str | None = None, dry_run: bool = False, out=print) -> list[DeliveryState]:
    """``finpulse dispatch --redeliver``: re-queue the failed deliveries matching ``endpoint`` / ``alert_id``
    (see ``redelivery_plan``) and return their new pending states; with ``dry_run``, only say what it would do.

    Each re-queue is one record on the deliveries topic, acknowledged before the next (a firing before its
    resolve). The dispatcher owning the alert's partition delivers them (see the module docstring for why this
    command does not). Prints endpoint names and alert ids only: never URLs, keys or error texts.

    Two overlapping runs that both read a delivery as failed both write its re-queue; if the second lands after the
    dispatcher's ``delivered``, merging by ``seq`` ignores it and the dispatcher owning the delivery writes
    ``delivered`` again (``Dispatcher._reassert_stale``), so compaction keeps the newest state."""
    horizons = {e.name: e.retry_horizon_s for e in load_delivery_config(settings).endpoints}
    log_ = DeliveryLog(settings.kafka, names.deliveries, writable=not dry_run)
    done: list[DeliveryState] = []
    try:
        await log_.start()
        await log_.catch_up()
        chosen, skipped = redelivery_plan(log_.states.values(), horizons, endpoint, alert_id)
        for state, why in skipped:
            out(f"left failed  {state.endpoint}  {state.alert_id} ({state.alert_record.event_kind}): {why}")
        for state in chosen:
            if not dry_run:
                done.append(await log_.save(requeued(state, horizons[state.endpoint])))
            out(f"{'would re-queue' if dry_run else 're-queued'}  {state.endpoint}  {state.alert_id} "
                f"({state.alert_record.event_kind})")
    finally:
        await log_.stop()
    if not chosen:
        out("no failed delivery matches: nothing re-queued")
    elif dry_run:
        out(f"dry run: {len(chosen)} failed deliveries would be re-queued; nothing was written")
    else:
        out(f"{len(done)} failed deliveries re-queued on {names.deliveries}: the running dispatcher (worker or "
            f"`finpulse dispatch`) sends them within seconds; if none runs, the next one to start does")
    return done
