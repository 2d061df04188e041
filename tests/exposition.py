"""A strict reader of the Prometheus text exposition format (0.0.4) for tests: a malformed exposition fails the test
that scrapes it, instead of being half-read.

``parse(text)`` returns ``Exposition``: ``types[name]`` and ``value(name, **labels)`` of every sample. It checks
what Prometheus would refuse or misread: lines that are neither comments nor samples, bad metric or label names,
bad escapes, unparsable values, samples of an undeclared family or before its TYPE, a family declared twice,
the same series twice, histogram buckets that are not cumulative or whose ``+Inf`` bucket differs from ``_count``.
``scrape(url)`` fetches and parses, checking the Content-Type too; ``probe(url)`` is (status, JSON body) of a
``/healthz`` or ``/readyz``, or (None, None) while nothing answers.
"""
from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
SAMPLE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? (\S+)$")
LABEL_PAIR = re.compile(rf'({LABEL})="((?:[^"\\]|\\[\\"n])*)"(,|$)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


class MalformedExposition(AssertionError):
    pass


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, frozenset], float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            near = sorted((dict(k[1]) for k in self.samples if k[0] == name), key=lambda labels: sorted(labels.items()))
            raise KeyError(f"no sample {name}{labels}; that name has: {near}")
        return self.samples[key]

    def series(self, name: str) -> dict[frozenset, float]:
        return {labels: value for (n, labels), value in self.samples.items() if n == name}


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], text)


def _labels(text: str, line: str) -> frozenset:
    pairs, position = {}, 0
    while position < len(text):
        match = LABEL_PAIR.match(text, position)
        if not match:
            raise MalformedExposition(f"bad labels in {line!r}")
        name, value = match.group(1), _unescape(match.group(2))
        if name in pairs:
            raise MalformedExposition(f"label {name} twice in {line!r}")
        pairs[name] = value
        position = match.end()
    return frozenset(pairs.items())


def _number(text: str, line: str) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in special:
        return special[text]
    try:
        return float(text)
    except ValueError:
        raise MalformedExposition(f"bad value in {line!r}") from None


def _family_of(name: str, types: dict[str, str]) -> str | None:
    if name in types and types[name] not in SUFFIXES:
        return name
    for family, kind in types.items():
        for suffix in SUFFIXES.get(kind, ()):
            if name == family + suffix:
                return family
    return None


def parse(text: str) -> Exposition:
    out = Exposition()
    helped: set[str] = set()
    if text and not text.endswith("\n"):
        raise MalformedExposition("the exposition must end with a newline")
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] == "TYPE":
                name, kind = parts[2], parts[3] if len(parts) > 3 else ""
                if not re.fullmatch(NAME, name) or kind not in TYPES:
                    raise MalformedExposition(f"bad TYPE line {line!r}")
                if name in out.types:
                    raise MalformedExposition(f"{name} declared twice")
                if any(n == name or _family_of(n, {name: kind}) for n, _ in out.samples):
                    raise MalformedExposition(f"TYPE of {name} after its samples")
                out.types[name] = kind
            elif len(parts) >= 3 and parts[1] == "HELP":
                if parts[2] in helped:
                    raise MalformedExposition(f"HELP of {parts[2]} twice")
                helped.add(parts[2])
            continue
        match = SAMPLE.match(line)
        if not match:
            raise MalformedExposition(f"not a sample line: {line!r}")
        name, label_text, value = match.groups()
        if _family_of(name, out.types) is None:
            raise MalformedExposition(f"sample {name} of no declared family: {line!r}")
        key = (name, _labels(label_text or "", line))
        if key in out.samples:
            raise MalformedExposition(f"series twice: {line!r}")
        out.samples[key] = _number(value, line)
    _check_histograms(out)
    return out


def _check_histograms(out: Exposition) -> None:
    for family, kind in out.types.items():
        if kind != "histogram":
            continue
        buckets: dict[frozenset, list[tuple[float, float]]] = {}
        for (name, labels), value in out.samples.items():
            if name == family + "_bucket":
                le = dict(labels).get("le")
                if le is None:
                    raise MalformedExposition(f"{name} without le")
                rest = frozenset((k, v) for k, v in labels if k != "le")
                buckets.setdefault(rest, []).append((_number(le, name), value))
        for labels, pairs in buckets.items():
            pairs.sort()
            counts = [count for _, count in pairs]
            if pairs[-1][0] != math.inf or counts != sorted(counts):
                raise MalformedExposition(f"{family}{dict(labels)}: buckets not cumulative or no +Inf: {pairs}")
            if out.samples.get((family + "_count", labels)) != counts[-1]:
                raise MalformedExposition(f"{family}{dict(labels)}: +Inf bucket differs from _count")


def scrape(url: str, timeout: float = 10.0) -> Exposition:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith("text/plain") or "version=0.0.4" not in content_type:
            raise MalformedExposition(f"Content-Type {content_type!r} is not the text exposition format")
        return parse(response.read().decode("utf-8"))


def probe(url: str, timeout: float = 5.0) -> tuple[int | None, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return None, None
