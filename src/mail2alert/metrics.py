"""``/metrics``: what mail2alert did and holds, in the Prometheus text format.

Counts come from the outbox's ``counters`` table (see :mod:`mail2alert.outbox`), written in
the very transaction that commits a decision or a delivery attempt: the intake workers'
counts and the main process's add up without Prometheus' multiprocess mode, and survive
restarts. What only the main process knows (reloads, the configuration it runs) is passed
in as a :class:`Status`. Every label value is bounded: a manager's label, a rule's index, an
outcome, a channel; never an address or a subject.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from mail2alert import __version__
from mail2alert.managers.health import KeeperHealth
from mail2alert.outbox import DELIVERY_BUCKETS, Counter, Gauges

#: The Content-Type of the text format that :func:`render` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Status:
    """What the main process knows beyond the outbox."""

    config_hash: str
    reloads: Mapping[str, int] = field(default_factory=dict)
    """Configuration reloads since start, by result (``ok``, ``failed``)."""
    version: str = __version__
    keepers: Mapping[str, tuple[str, KeeperHealth]] = field(default_factory=dict)
    """How each manager's keeper fares, by manager label, with its manager type's name."""


def config_hash(text: str) -> str:
    """A short hash of the configuration's text: which file a process runs."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: The counters kept in the outbox: their metric name, help and labels.
_COUNTERS = {
    "messages": (
        "mail2alert_messages",
        "Messages by deciding manager and outcome",
        ("manager", "outcome"),
    ),
    "rule_matches": (
        "mail2alert_rule_matches",
        "Messages each rule matched, by manager and rule index",
        ("manager", "rule"),
    ),
    "deliveries": (
        "mail2alert_deliveries",
        "Delivery attempts by channel and result",
        ("channel", "result"),
    ),
}


def families(
    counters: Sequence[Counter], gauges: Gauges, status: Status, *, now: float
) -> Iterator[Metric]:
    """The metric families for one scrape."""
    by_name: dict[str, list[Counter]] = {}
    for counter in counters:
        by_name.setdefault(counter.name, []).append(counter)
    for name, (metric, documentation, labels) in _COUNTERS.items():
        family = CounterMetricFamily(metric, documentation, labels=labels)
        for counter in by_name.get(name, []):
            values = dict(counter.labels)
            family.add_metric([values.get(label, "") for label in labels], counter.value)
        yield family
    yield _delivery_seconds(by_name)
    yield from _keepers(status.keepers)
    items = GaugeMetricFamily(
        "mail2alert_outbox_items", "Outbox items by state (held: messages)", labels=["state"]
    )
    for state, count in (("pending", gauges.pending), ("dead", gauges.dead), ("held", gauges.held)):
        items.add_metric([state], count)
    yield items
    oldest = 0.0 if gauges.oldest_pending is None else max(0.0, now - gauges.oldest_pending)
    yield GaugeMetricFamily(
        "mail2alert_outbox_oldest_pending_seconds",
        "Age of the oldest pending item (0 when none is pending)",
        value=oldest,
    )
    reloads = CounterMetricFamily(
        "mail2alert_config_reloads", "Configuration reloads since start", labels=["result"]
    )
    for result in ("ok", "failed"):
        reloads.add_metric([result], status.reloads.get(result, 0))
    yield reloads
    info = GaugeMetricFamily(
        "mail2alert_config_info", "The configuration running (hash of its text)", labels=["hash"]
    )
    info.add_metric([status.config_hash], 1)
    yield info
    build = GaugeMetricFamily("mail2alert_build_info", "mail2alert's version", labels=["version"])
    build.add_metric([status.version], 1)
    yield build


def _delivery_seconds(by_name: Mapping[str, Sequence[Counter]]) -> Metric:
    per_bound = {
        dict(c.labels).get("le", ""): c.value for c in by_name.get("delivery_seconds_bucket", [])
    }
    buckets: list[tuple[str, float]] = []
    total = 0.0
    for bound in (*(repr(b) for b in DELIVERY_BUCKETS), "+Inf"):
        total += per_bound.get(bound, 0.0)
        buckets.append((bound, total))
    sums = by_name.get("delivery_seconds_sum", [])
    return HistogramMetricFamily(
        "mail2alert_delivery_seconds",
        "Seconds from acceptance to delivery, of each item delivered",
        buckets=buckets,
        sum_value=sums[0].value if sums else 0.0,
    )


def _keepers(keepers: Mapping[str, tuple[str, KeeperHealth]]) -> Iterator[Metric]:
    """Per manager type: its keepers' polls by result, and their snapshots' age."""
    kinds = sorted({kind for kind, _ in keepers.values()})
    for kind in kinds:
        prefix = "mail2alert_" + re.sub(r"[^a-zA-Z0-9_]", "_", kind)
        polls = CounterMetricFamily(
            f"{prefix}_polls",
            f"Polls of each {kind} manager's source",
            labels=["manager", "result"],
        )
        ages = GaugeMetricFamily(
            f"{prefix}_snapshot_age_seconds",
            f"Seconds since each {kind} manager's snapshot was last confirmed by its source",
            labels=["manager"],
        )
        for label, (of, health) in sorted(keepers.items()):
            if of != kind:
                continue
            for result, count in sorted(health.polls.items()):
                polls.add_metric([label, result], count)
            if health.snapshot_age is not None:
                ages.add_metric([label], health.snapshot_age)
        yield polls
        yield ages


class _Scrape:
    """One scrape's families, as prometheus_client's registry wants a collector."""

    def __init__(self, metrics: Sequence[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def render(counters: Sequence[Counter], gauges: Gauges, status: Status, *, now: float) -> bytes:
    """The text format of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(list(families(counters, gauges, status, now=now))))
    return generate_latest(registry)
