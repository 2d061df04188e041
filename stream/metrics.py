"""Operational metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Two ways to feed ``REGISTRY``, the one registry of a process (``/metrics`` renders it, see ``stream.ops``):

- metric objects, updated where things happen, once per batch rather than per message::

      BATCHES = counter("finpulse_x_total", "what it counts", ["topic"])
      BATCHES.labels("finpulse.news").inc(len(batch))

- collectors, called at scrape time for values that are cheaper to read than to track (consumer lag, breaker
  state, the oldest pending delivery): ``REGISTRY.add_collector(fn)``, where ``fn()`` returns ``Family`` objects
  (``gauge_family`` builds one from a dict). A part that stops removes its collector again.

Families of the same name from several collectors (two dispatchers in one process) are merged into one, so the
exposition stays valid. Label values must come from small sets (topics, endpoints, reasons): never ids.
Updates happen on the event loop; nothing here locks.
"""
from __future__ import annotations

import math
import os
import re
import resource
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Seconds, from a fast scorer batch on a GPU to a slow webhook.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class Family:
    """One metric family as it is exposed: samples are (name suffix, labels, value)."""
    name: str
    type: str                      # counter | gauge | histogram
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def gauge_family(name: str, help: str, label_names: Sequence[str], values: Mapping) -> Family:
    """A gauge family from ``{label values: value}`` (a collector's usual result); a key is a tuple of label values,
    or the one value of a single label."""
    return _family("gauge", name, help, label_names, values)


def counter_family(name: str, help: str, label_names: Sequence[str], values: Mapping) -> Family:
    """A counter family from counts a part keeps itself (they must only grow), keyed as in ``gauge_family``."""
    return _family("counter", name, help, label_names, values)


def _family(type: str, name: str, help: str, label_names: Sequence[str], values: Mapping) -> Family:
    return Family(name, type, help, [("", dict(zip(label_names, key if isinstance(key, tuple) else (key,))), value)
                                     for key, value in values.items()])


class _Metric:
    type = ""

    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()):
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in label_names:
            if not _LABEL.fullmatch(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for {name}")
        self.name, self.help, self.label_names = name, help, tuple(label_names)
        self._children: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        """The child for these label values (in ``label_names`` order), created on first use."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.label_names):
                raise ValueError(f"{self.name} takes labels {self.label_names}, got {values!r}")
            child = self._children[values] = self._new_child()
        return child

    def _new_child(self):
        raise NotImplementedError

    def _label_dict(self, values: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(self.label_names, values))

    def collect(self) -> Family:
        raise NotImplementedError


class _Value:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Counter(_Metric):
    """Only goes up (from 0 at process start). Use ``labels(...).inc(n)``; ``inc`` directly when unlabelled."""
    type = "counter"

    def _new_child(self) -> _Value:
        return _Value()

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def collect(self) -> Family:
        return Family(self.name, self.type, self.help,
                      [("", self._label_dict(key), child.value) for key, child in self._children.items()])


class Gauge(Counter):
    """Goes up and down: ``labels(...).set(v)``, ``inc``, ``dec``."""
    type = "gauge"

    def set(self, value: float) -> None:
        self.labels().set(value)


class _Buckets:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)     # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Histogram(_Metric):
    """Observations in cumulative ``le`` buckets, with their sum and count."""
    type = "histogram"

    def __init__(self, name: str, help: str, label_names: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help, label_names)
        self.buckets = tuple(sorted(float(b) for b in buckets))

    def _new_child(self) -> _Buckets:
        return _Buckets(self.buckets)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def collect(self) -> Family:
        family = Family(self.name, self.type, self.help)
        for key, child in self._children.items():
            labels = self._label_dict(key)
            running = 0
            for bound, count in zip((*self.buckets, math.inf), child.counts):
                running += count
                family.samples.append(("_bucket", {**labels, "le": _format_value(bound)}, running))
            family.samples.append(("_sum", labels, child.sum))
            family.samples.append(("_count", labels, child.count))
        return family


Collector = Callable[[], Iterable[Family]]


class Registry:
    def __init__(self):
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Collector] = []

    def register(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered already")
        self._metrics[metric.name] = metric
        return metric

    def add_collector(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def remove_collector(self, collector: Collector) -> None:
        if collector in self._collectors:
            self._collectors.remove(collector)

    def families(self) -> list[Family]:
        merged: dict[str, Family] = {}
        found = [metric.collect() for metric in self._metrics.values()]
        for collector in list(self._collectors):
            found.extend(collector())
        for family in found:
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = Family(family.name, family.type, family.help, list(family.samples))
        return list(merged.values())

    def render(self) -> bytes:
        """The exposition: every family (even one without samples yet, so dashboards see its name)."""
        lines: list[str] = []
        for family in self.families():
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.type}")
            for suffix, labels, value in family.samples:
                label_text = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
                lines.append(f"{family.name}{suffix}{{{label_text}}} {_format_value(value)}" if label_text
                             else f"{family.name}{suffix} {_format_value(value)}")
        return ("\n".join(lines) + "\n").encode("utf-8")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


REGISTRY = Registry()


def counter(name: str, help: str, label_names: Sequence[str] = ()) -> Counter:
    return REGISTRY.register(Counter(name, help, label_names))


def gauge(name: str, help: str, label_names: Sequence[str] = ()) -> Gauge:
    return REGISTRY.register(Gauge(name, help, label_names))


def histogram(name: str, help: str, label_names: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
    return REGISTRY.register(Histogram(name, help, label_names, buckets))


# ---------------------------------------------------------------- the process itself

def _process_start_time() -> float:
    """When this process started, from /proc (boot time plus the start's clock ticks); else when this module loaded."""
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith("btime "))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


_STARTED_AT = _process_start_time()


def _process_families() -> list[Family]:
    """The standard ``process_*`` metrics every Prometheus client exports (Linux ``/proc``; what cannot be read is
    left out)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    families = [
        Family("process_cpu_seconds_total", "counter", "User and system CPU time of this process, in seconds.",
               [("", {}, usage.ru_utime + usage.ru_stime)]),
        Family("process_start_time_seconds", "gauge", "When this process started, Unix time in seconds.",
               [("", {}, round(_STARTED_AT, 2))]),
    ]
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
        families.append(Family("process_resident_memory_bytes", "gauge", "Resident memory of this process, in bytes.",
                               [("", {}, resident_pages * os.sysconf("SC_PAGE_SIZE"))]))
        families.append(Family("process_open_fds", "gauge", "Open file descriptors of this process.",
                               [("", {}, len(os.listdir("/proc/self/fd")))]))
    except (OSError, ValueError, IndexError):
        pass
    return families


REGISTRY.add_collector(_process_families)
